import functools
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import finetune
from finetune.cli import main as cli_main
from finetune.config import load_config
from finetune.cpu_convs import SmallMapConv2d
from finetune.data.sources import load_idx
from finetune.evaluation import evaluate_run, per_class
from finetune.train import main as train_main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A ResNet-18 that learned the fake band task, and its test split."""
    from accelerate.state import AcceleratorState
    from conftest import write_fake_fmnist

    root = tmp_path_factory.mktemp("inference")
    data = write_fake_fmnist(root / "fmnist")
    run = root / "run"
    train_main(load_config([
        "recipe=resnet18_scratch_fmnist", f"data.root={data}", "data.image_size=28",
        "train.epochs=4", "train.batch_size=16", "train.lr=0.01", f"output_dir={run}"]))
    AcceleratorState._reset_state(reset_partial_state=True)
    _, test = load_idx(data)
    return run, test


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
