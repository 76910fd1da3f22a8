import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import finetune
from finetune.cli import main as cli_main
from finetune.cpu_convs import SmallMapConv2d
from finetune.evaluation import evaluate_run, per_class


def test_per_class_by_hand():
    rows = per_class([[3, 1, 0], [0, 2, 0], [1, 0, 0]], ["a", "b", "c"])
    assert rows[0] == {"class": "a", "precision": 0.75, "recall": 0.75, "f1": 0.75,
                       "support": 4}
    assert rows[1] == {"class": "b", "precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2}
    assert rows[2] == {"class": "c", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_evaluate_matches_hand_computation(trained):
    run, test = trained
    predictor = finetune.load(run)
    preds = predictor.logits(list(test.images)).argmax(1)
    labels = test.labels
    result = evaluate_run(run, [])
    assert result["test_correct"] == int((preds == labels).sum())
    for k, row in enumerate(result["per_class"]):
        tp = int(((preds == k) & (labels == k)).sum())
        assert row["support"] == int((labels == k).sum())
        assert row["recall"] == pytest.approx(tp / row["support"])
        assert row["precision"] == pytest.approx(tp / max(1, int((preds == k).sum())))
    saved = json.loads((run / "evaluation.json").read_text())
    assert saved["confusion"] == result["confusion"] and sum(map(sum, saved["confusion"])) == 53
    png = (run / "confusion.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(run / "confusion.png").size[0] > 200


def test_predict_files_of_other_sizes_and_modes(trained, tmp_path, capsys):
    run, test = trained
    predictor = finetune.load(run)
    reference = predictor.logits(list(test.images[:10])).argmax(1).tolist()
    names = predictor.class_names
    files = []
    for i, image in enumerate(test.images[:10, 0].numpy()):
        grey = Image.fromarray(image)
        variants = {"L.png": grey, "RGB.png": grey.convert("RGB"), "LA.png": grey.convert("LA"),
                    "big.png": grey.resize((56, 56), Image.NEAREST).convert("RGB"),
                    "q.jpg": grey.convert("RGB")}
        for suffix, im in variants.items():
            path = tmp_path / f"{i:02d}_{suffix}"
            im.save(path, quality=95) if suffix.endswith("jpg") else im.save(path)
            files.append((path, reference[i]))
    assert cli_main(["predict", str(run), str(tmp_path), "--json", "--top-k", "2"]) == 0
    out = {r["file"]: r["top_k"] for r in json.loads(capsys.readouterr().out)}
    assert len(out) == len(files)
    for path, expected in files:
        top = out[str(path)]
        assert top[0]["class"] == names[expected], path.name
        assert len(top) == 2 and top[0]["probability"] >= top[1]["probability"]
    # Same pixels in another mode: the very same probabilities as in memory.
    probs = predictor.logits([test.images[0]]).softmax(1)[0]
    assert out[str(tmp_path / "00_RGB.png")][0]["probability"] == pytest.approx(
        float(probs.max()), abs=1e-6)


def test_python_api_and_table_output(trained, tmp_path, capsys):
    run, test = trained
    images = [Image.fromarray(im) for im in test.images[:3, 0].numpy()]
    by_path = finetune.predict(run, images, top_k=3)
    by_predictor = finetune.predict(finetune.load(run), list(test.images[:3]), top_k=3)
    assert by_path == by_predictor and len(by_path) == 3 and len(by_path[0]) == 3
    assert sum(p for _, p in finetune.predict(run, images, top_k=10)[0]) == pytest.approx(1.0)
    images[0].save(tmp_path / "one.png")
    assert cli_main(["predict", str(run / "model.safetensors"), str(tmp_path / "one.png")]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(str(tmp_path / "one.png")) and by_path[0][0][0] in line
    assert cli_main(["predict", str(run), str(tmp_path / "missing.png")]) == 2
    assert "no such image" in capsys.readouterr().err


def test_timm_and_torchvision_rebuild_the_export(trained):
    import timm
    import torchvision

    run, _ = trained
    ours = finetune.load(run).model
    x = torch.randn(4, 1, 28, 28)
    expected = ours(x)
    # Equal up to rounding: the loaded model is plain torch layers, as timm's and
    # torchvision's (CPU training's small-map products are the trainer's swap, not exported).
    assert not any(isinstance(m, SmallMapConv2d) for m in ours.modules())
    same = functools.partial(torch.testing.assert_close, expected=expected, rtol=1e-5,
                             atol=1e-5)
    # timm, from the run folder alone: architecture, channels, head, preprocessing.
    model = timm.create_model(f"local-dir:{run}", pretrained=True).eval()
    same(model(x))
    cfg = timm.data.resolve_data_config({}, model=model)
    meta = json.loads((run / "model.json").read_text())
    assert cfg["input_size"] == (1, 28, 28) and list(cfg["mean"]) == meta["mean"]
    # torchvision: its resnet18 with a 1-channel conv1 and a 10-class head.
    tv = torchvision.models.resnet18(num_classes=10)
    tv.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    tv.load_state_dict(load_file(run / "model.safetensors"))
    same(tv.eval()(x))


@pytest.mark.slow
def test_onnx_export_matches_pytorch(trained, tmp_path, capsys):
    import onnxruntime

    run, _ = trained
    out = tmp_path / "m.onnx"
    assert cli_main(["export-onnx", str(run), "--out", str(out)]) == 0
    session = onnxruntime.InferenceSession(str(out))
    # The preprocessing the input needs travels in the file, as in model.json.
    props = session.get_modelmeta().custom_metadata_map
    meta = json.loads((run / "model.json").read_text())
    for key in ("image_size", "crop_pct", "resize", "interpolation", "mean", "std"):
        assert json.loads(props[key]) == meta[key], key
    model = finetune.load(run).model
    for batch in (1, 5):
        x = torch.randn(batch, 1, 28, 28)
        got = session.run(None, {"input": x.numpy()})[0]
        np.testing.assert_allclose(got, model(x).detach().numpy(), atol=1e-4, rtol=1e-4)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary left behind
    # A standard graph: ResNet-18's 20 convolutions as Conv nodes (no small-map products
    # that fusion, quantizers and TensorRT would not see as convolutions), one Gemm.
    import onnx

    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count("Conv") == 20 and not {"MatMul", "Where", "Equal"} & set(ops), ops


def test_load_in_a_fresh_interpreter(trained):
    """`import finetune; finetune.load(...)` alone must register the model builders."""
    import subprocess
    import sys

    run, _ = trained
    code = (f"import finetune; p = finetune.load({str(run)!r}); "
            f"print(type(p.model).__name__, len(p.class_names))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["ResNet", "10"]


def _image_folder(test, folder: Path, n: int, bad: int | None = None) -> Path:
    folder.mkdir()
    for i, image in enumerate(test.images[:n, 0].numpy()):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    if bad is not None:
        (folder / f"{bad:03d}.png").write_bytes(b"not a png")
    return folder


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_batch_prediction_writes_what_predict_prints(trained, tmp_path, capsys, suffix):
    run, test = trained
    images = _image_folder(test, tmp_path / "images", 23, bad=5)
    out = tmp_path / f"p{suffix}"
    assert cli_main(["predict", str(run), str(images), "--out", str(out), "--top-k", "2",
                     "--batch-size", "4", "--workers", "1"]) == 0
    assert "23 images; 1 could not be read" in capsys.readouterr().out
    if suffix == ".csv":
        import csv

        rows = list(csv.DictReader(out.open()))
        got = {r["file"]: r["class_1"] and [(r["class_1"], float(r["probability_1"])),
                                            (r["class_2"], float(r["probability_2"]))]
               for r in rows}
        errors = {r["file"]: r["error"] for r in rows}
    else:
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        got = {r["file"]: r["top_k"] and [(t["class"], t["probability"]) for t in r["top_k"]]
               for r in rows}
        errors = {r["file"]: r["error"] for r in rows}
    files = sorted(str(p) for p in images.iterdir())
    assert [r["file"] for r in rows] == files  # every image, in order
    bad = str(images / "005.png")
    assert "cannot" in errors[bad] or "decode" in errors[bad].lower(), errors[bad]
    assert not got[bad] and all(not e for f, e in errors.items() if f != bad)
    good = [Path(f) for f in files if f != bad]
    for f, expected in zip(good, finetune.predict(run, good, top_k=2), strict=True):
        assert [c for c, _ in got[str(f)]] == [c for c, _ in expected]
        assert [p for _, p in got[str(f)]] == pytest.approx([p for _, p in expected], abs=1e-5)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_killed_batch_prediction_resumes_to_the_same_file(trained, tmp_path, monkeypatch,
                                                             capsys, suffix):
    import finetune.batch_predict as batch

    run, test = trained
    images = _image_folder(test, tmp_path / "images", 30)
    whole, cut = tmp_path / f"whole{suffix}", tmp_path / f"cut{suffix}"
    args = [str(run), str(images), "--batch-size", "4", "--workers", "0"]
    assert cli_main(["predict", *args, "--out", str(whole)]) == 0
    real, calls = batch._scored, []

    def dies(*a, **k):  # killed during its third batch, after two were written
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(batch, "_scored", dies)
    assert cli_main(["predict", *args, "--out", str(cut)]) == 130
    with cut.open("a") as f:  # and a kill in the middle of a line
        f.write('{"file": "half' if suffix == ".jsonl" else "/half,writ")
    monkeypatch.setattr(batch, "_scored", real)
    capsys.readouterr()
    assert cli_main(["predict", *args, "--out", str(cut)]) == 2  # not silently overwritten
    assert "--resume" in capsys.readouterr().err
    assert cli_main(["predict", *args, "--out", str(cut), "--resume"]) == 0
    assert "(8 from before, --resume)" in capsys.readouterr().out
    assert cut.read_bytes() == whole.read_bytes()
    # resuming with other images, or another --top-k, is refused, the file untouched
    other = _image_folder(test, tmp_path / "other", 3)
    assert cli_main(["predict", str(run), str(other), "--out", str(cut), "--resume"]) == 2
    assert "other images" in capsys.readouterr().err and cut.read_bytes() == whole.read_bytes()
    assert cli_main(["predict", *args, "--out", str(cut), "--resume", "--top-k", "2"]) == 2
    assert "--top-k 2" in capsys.readouterr().err and cut.read_bytes() == whole.read_bytes()
    # a file killed before its first row (an empty file, a cut CSV header) is started again
    cut.write_bytes(whole.read_bytes()[:7])
    assert cli_main(["predict", *args, "--out", str(cut), "--resume"]) == 0
    assert cut.read_bytes() == whole.read_bytes()
    # resuming with other options or another model, or without the settings, is refused
    cut.write_bytes(whole.read_bytes()[:300])
    assert cli_main(["predict", *args, "--out", str(cut), "--resume", "--tta"]) == 2
    assert "written with other tta (tta=False)" in capsys.readouterr().err
    settings = tmp_path / f"cut{suffix}.settings.json"
    settings.write_text(settings.read_text().replace('"model_sha256": "', '"model_sha256": "0'))
    assert cli_main(["predict", *args, "--out", str(cut), "--resume"]) == 2
    assert "written with other model_sha256" in capsys.readouterr().err
    settings.unlink()
    assert cli_main(["predict", *args, "--out", str(cut), "--resume"]) == 2
    assert f"no readable cut{suffix}.settings.json beside it" in capsys.readouterr().err
    assert cut.read_bytes() == whole.read_bytes()[:300]  # untouched by every refusal


def test_batch_prediction_resumes_names_that_quote_or_are_not_utf8(trained, tmp_path, capsys):
    import os

    run, test = trained
    images = _image_folder(test, tmp_path / "images", 6)
    for i, name in enumerate([b'a,"b"\nc.png', b"caf\xe9.png"]):  # quotes, a new line, Latin-1
        os.rename(images / f"{i:03d}.png", os.path.join(bytes(images), name))
    whole, cut = tmp_path / "whole.csv", tmp_path / "cut.csv"
    args = [str(run), str(images), "--batch-size", "2", "--workers", "0"]
    assert cli_main(["predict", *args, "--out", str(whole)]) == 0
    data = whole.read_bytes()
    assert b"caf\xe9.png" in data and data.count(b"\n") == 8  # header, 6 rows, 1 in a name
    inside = data.index(b"\nc.png")  # killed in the quoted new line, and every 120 bytes
    shutil.copy(tmp_path / "whole.csv.settings.json", tmp_path / "cut.csv.settings.json")
    for keep in sorted({*range(0, len(data), 120), *range(inside - 2, inside + 3)}):
        cut.write_bytes(data[:keep])
        assert cli_main(["predict", *args, "--out", str(cut), "--resume"]) == 0, keep
        assert cut.read_bytes() == data, keep


@pytest.mark.slow
def test_batch_prediction_killed_for_real_resumes_to_the_same_file(trained, tmp_path):
    """SIGKILL (no clean-up at all) part-way through: the rows flushed so far are a valid
    prefix, and --resume completes the very same file."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run, test = trained
    images = _image_folder(test, tmp_path / "images", 53)
    for copy in range(1, 8):  # 424 files: long enough to be killed part-way
        shutil.copytree(images, tmp_path / "images" / f"copy{copy}",
                        ignore=shutil.ignore_patterns("copy*"))
    whole, cut = tmp_path / "whole.jsonl", tmp_path / "cut.jsonl"
    base = [sys.executable, "-m", "finetune", "predict", str(run), str(images),
            "--batch-size", "1", "--workers", "0"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([*base, "--out", str(cut)], env=env)
    while proc.poll() is None and (not cut.exists() or cut.read_bytes().count(b"\n") < 20):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lines = cut.read_bytes().count(b"\n")
    assert proc.returncode == -signal.SIGKILL and 20 <= lines < 424, lines
    subprocess.run([*base, "--out", str(cut), "--resume"], env=env, check=True)
    subprocess.run([*base, "--out", str(whole)], env=env, check=True)
    assert cut.read_bytes() == whole.read_bytes()


def test_batch_prediction_bad_outputs_are_one_line(trained, tmp_path, capsys, monkeypatch):
    import errno

    from conftest import refused

    import finetune.batch_predict as batch

    run, test = trained
    images = str(_image_folder(test, tmp_path / "images", 2))
    refused(capsys, ["predict", str(run), images, "--out", str(tmp_path / "p.txt")],
            "write .csv or .jsonl")
    refused(capsys, ["predict", str(run), images, "--out", str(tmp_path)], "is a folder")
    refused(capsys, ["predict", str(run), images, "--resume"], "pass it with --out FILE")
    junk = tmp_path / "junk.jsonl"
    junk.write_text("not json\n")
    refused(capsys, ["predict", str(run), images, "--out", str(junk), "--resume"],
            "not a predictions file")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(batch, "_stream", full)
    refused(capsys, ["predict", str(run), images, "--out", str(tmp_path / "p.csv")],
            "no space left", "--resume")


def test_tta_on_a_model_without_views_is_refused_before_anything_is_written(trained, tmp_path,
                                                                            capsys):
    """Trained with neither mirror images nor shifts, a model has no test-time views: --tta
    would answer the plain numbers under the name of TTA, so it is one line instead."""
    from conftest import refused, without_views

    from finetune.errors import ConfigError

    run, test = trained
    plain = without_views(run, tmp_path / "plain")
    (plain / "evaluation.json").unlink(missing_ok=True)  # from another test's evaluation
    images = str(_image_folder(test, tmp_path / "images", 2))
    out = tmp_path / "p.csv"
    for argv in (["predict", str(plain), images, "--tta"],
                 ["predict", str(plain), images, "--tta", "--out", str(out)],
                 ["evaluate", str(plain), "--tta"]):
        refused(capsys, argv, "no views to add", "data.hflip=false")
    assert not out.exists() and not (plain / "evaluation.json").exists()
    predictor = finetune.load(plain)
    with pytest.raises(ConfigError, match="no views to add"):
        predictor.predict([test.images[0]], tta=True)
    assert predictor.predict([test.images[0]]) == finetune.load(run).predict([test.images[0]])


@pytest.mark.slow
def test_int8_onnx_is_calibrated_measured_and_recorded(trained, tmp_path, capsys):
    import onnx
    import onnxruntime
    from conftest import refused

    source, test = trained
    run = tmp_path / "run"
    shutil.copytree(source, run, ignore=shutil.ignore_patterns("checkpoints"))
    refused(capsys, ["export-onnx", str(run), "data.eval_limit=10"], "only with --int8")
    for _ in range(2):  # a second export replaces the numbers, the card keeps one section
        assert cli_main(["export-onnx", str(run), "--int8", "--calibration-images", "32"]) == 0
    assert "int8 calibrated on 32 training images" in capsys.readouterr().out
    int8 = onnx.load(str(run / "model.int8.onnx"))
    ops = {n.op_type for n in int8.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    props = {p.key for p in int8.metadata_props}
    assert {"image_size", "mean", "std", "class_names"} <= props  # preprocessing travels too
    report = json.loads((run / "model.json").read_text())["onnx"]
    assert report["calibration_images"] == 32 and report["test_images"] == len(test)
    # the recorded accuracy is the int8 file's, recomputed here
    predictor = finetune.load(run)
    x = predictor.batch_inputs(test.images).numpy()
    got = onnxruntime.InferenceSession(str(run / "model.int8.onnx")).run(None, {"input": x})[0]
    acc = float((got.argmax(1) == test.labels.numpy()).mean())
    assert report["int8"]["test_acc"] == pytest.approx(acc, abs=1e-4)
    assert abs(report["int8"]["test_acc"] - report["fp32"]["test_acc"]) <= 0.05
    assert report["int8"]["size_mb"] < report["fp32"]["size_mb"] / 2
    card = (run / "README.md").read_text()
    assert card.count("## ONNX") == 1 and "model.int8.onnx" in card
