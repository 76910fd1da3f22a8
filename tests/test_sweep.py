"""finetune sweep: every model ranked or listed with why it has no numbers, a second call that
keeps finished models and reads the cached features, bad arguments refused before anything
runs, and --train-best's run folder. Tiny data, a 16 px ResNet-18, no downloads."""

import contextlib
import io
import json
from pathlib import Path

import pytest
from conftest import write_fake_fmnist

from finetune.cli import main


def _run(argv: list[str]) -> str:
    """``finetune ARGV`` must succeed; its stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    assert code == 0, out.getvalue()[-3000:]
    return out.getvalue()


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, Path]:
    """Fake IDX data and a finetune export to sweep from: a linear probe on a randomly
    initialised ResNet-18 at 16 px (a run folder with model.json, no training loop)."""
    root = tmp_path_factory.mktemp("sweep")
    data = write_fake_fmnist(root / "fmnist")
    _run(["train", "model.name=resnet18", f"data.root={data}", "data.image_size=16",
          "finetune.method=linear", "finetune.probe_weight_decay=[1e-3]",
          f"output_dir={root / 'src'}"])
    return data, root / "src"


def sweep_args(source: tuple[Path, Path]) -> list[str]:
    """Five models: the run folder itself (16 px, from its model.json); ResNet-18 with its
    weights at 20 px; local weights that do not exist, as an entry and as an override; VGG-11,
    which cannot take 16 px."""
    data, run = source
    missing = run.parent / "gone" / "model.safetensors"
    return ["sweep", f"models={run},resnet18,{missing},resnet34,vgg11",
            f"resnet18:model.weights={run / 'model.safetensors'}", "resnet18:data.image_size=20",
            f"resnet34:model.weights={run.parent / 'missing.safetensors'}",
            f"vgg11:model.weights={run}", "vgg11:data.image_size=16",
            f"data.root={data}", "seeds=2", "finetune.probe_weight_decay=[1e-3,1e-1]",
            "train.eval_batch_size=64", f"output_dir={run.parent / 'out'}"]


@pytest.fixture(scope="module")
def first(source) -> tuple[Path, str, dict]:
    """The sweep's first call: its folder, stdout and summary."""
    out = source[1].parent / "out"
    stdout = _run(sweep_args(source))
    return out, stdout, json.loads((out / "summary.json").read_text())


def test_the_table_ranks_every_model_and_says_why_some_have_no_numbers(source, first):
    out, stdout, summary = first
    run = source[1]
    rows = {r["name"]: r for r in summary["models"]}
    assert list(rows)[:2] in ([str(run), "resnet18"], ["resnet18", str(run)])
    assert set(rows) == {str(run), "resnet18", str(run.parent / "gone" / "model.safetensors"),
                         "resnet34", "vgg11"}
    for name in (str(run), "resnet18"):
        r = rows[name]
        assert r["status"] == "ok" and r["architecture"] == "resnet18"
        assert len(r["probe_accs"]) == 2 and r["probe_ci"] is not None
        assert 0 <= r["knn_acc"] <= 1 and r["knn_top5_acc"] is not None  # 10 classes
        assert r["feature_dim"] == 512 and r["parameters"] > 11_000_000
        assert r["extract_images_per_sec"] > 0 and not r["features_reused"]
        assert r["probe_fit_seconds"] > 0
    assert rows[str(run)]["image_size"] == 16 and rows["resnet18"]["image_size"] == 20
    accs = [(r["probe_acc"], r["knn_acc"]) for r in summary["models"][:2]]
    assert accs == sorted(accs, reverse=True) and summary["best"] == summary["models"][0]["name"]
    gone = rows[str(run.parent / "gone" / "model.safetensors")]
    assert gone["status"] == "no weights" and "do not exist" in gone["reason"]
    assert rows["resnet34"]["status"] == "no weights"
    assert "missing.safetensors' does not exist" in rows["resnet34"]["reason"]
    assert rows["vgg11"]["status"] == "failed" and "image_size" in rows["vgg11"]["reason"]
    table = stdout[stdout.index("linear probe acc %"):]
    for name, r in rows.items():  # every model in the printed table, the failed with reasons
        assert name in table
        if r["status"] != "ok":
            assert f"{r['status']}: {r['reason']}" in table
    md = (out / "report.md").read_text()
    assert all(name in md for name in rows) and "does not exist" in md
    assert "data:image/png;base64," in (out / "report.html").read_text()
    assert (out / "accuracy_vs_cost.png").stat().st_size > 0
    assert len(list((out / "models").glob("*.json"))) == 5


def test_a_second_call_keeps_finished_models_and_reads_cached_features(source, first):
    out, _, summary = first
    ok = [r["name"] for r in summary["models"] if r["status"] == "ok"]
    files = {p: p.stat().st_mtime_ns for p in [*(out / "models").glob("*.json"),
                                               *(out / "features").iterdir()]}
    rows = {json.loads(p.read_text())["name"]: p for p in (out / "models").glob("*.json")}
    stdout = _run(sweep_args(source))
    for name in ok:  # kept, not measured again: their rows and features untouched
        assert f"{name}: measured earlier, kept" in stdout
        assert rows[name].stat().st_mtime_ns == files[rows[name]]
    assert "vgg11: measuring" in stdout  # a failed model is tried again
    assert all(p.stat().st_mtime_ns == t for p, t in files.items() if p.parent.name == "features")
    # A model whose row is lost is measured again, from the cached features.
    before = json.loads(rows["resnet18"].read_text())
    rows["resnet18"].unlink()
    stdout = _run(sweep_args(source))
    after = json.loads(rows["resnet18"].read_text())
    other = next(name for name in ok if name != "resnet18")
    assert "resnet18: measuring" in stdout and f"{other}: measured earlier, kept" in stdout
    assert after["features_reused"] and after["extract_images_per_sec"] is None
    assert after["probe_accs"] == before["probe_accs"] and after["knn_acc"] == before["knn_acc"]
    assert all(p.stat().st_mtime_ns == t for p, t in files.items() if p.parent.name == "features")
    assert "cached" in stdout[stdout.index("linear probe acc %"):]


@pytest.mark.parametrize("args, needle", [
    (["models=timm:zzz_no_such_net*"], "'timm:zzz_no_such_net*' matches no model"),
    (["models=resnet18", "resnet50:data.image_size=32"], "overrides for resnet50"),
    (["models=resnet18", "resnet18:data.imagesize=32"], "Did you mean 'data.image_size'?"),
    (["models=resnet18", "model.name=vgg11"], "use models="),
])
def test_bad_arguments_are_one_line_errors_before_anything_runs(capsys, tmp_path, args, needle):
    assert main(["sweep", *args, f"output_dir={tmp_path / 'out'}"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error:") and len(captured.err.strip().splitlines()) == 1
    assert needle in captured.err and captured.out == ""
    assert not (tmp_path / "out").exists()


def test_train_best_trains_the_winner_into_a_run_folder(source, first):
    out, _, summary = first
    stdout = _run([*sweep_args(source), "--train-best", "linear"])
    best = out / "best-linear"
    assert f"best model {summary['best']} trained with finetune.method=linear: {best}" in stdout
    meta = json.loads((best / "model.json").read_text())
    assert meta["architecture"] == "resnet18" and (best / "model.safetensors").is_file()
    record = json.loads((best / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["method"] == "linear" and record["features_reused"]  # the sweep's features


def test_model_names_patterns_and_their_overrides():
    from finetune.sweep import matching, split_overrides

    common, own = split_overrides(["data.image_size=32", "timm:convnext_atto:model.weights=a:b",
                                   "timm:convnext_atto.d2_in1k:data.image_size=64"])
    assert common == ["data.image_size=32"]
    assert own == {"timm:convnext_atto": ["model.weights=a:b"],
                   "timm:convnext_atto.d2_in1k": ["data.image_size=64"]}
    # One model per architecture with pretrained weights (its default ones), or per tag.
    assert matching("timm:convnext_atto*") == ["timm:convnext_atto", "timm:convnext_atto_ols"]
    assert matching("timm:convnext_atto.*") == ["timm:convnext_atto.d2_in1k"]
