"""Reports, comparisons and resumes of run folders a hostile user damaged, and the budget a
report claims for runs whose data did not come from the hub (bugs 18, 24-27, 30, 31)."""

import shutil
from pathlib import Path

import pytest
from conftest import refused, write_fake_fmnist, write_photos
from test_photos import _hf_dataset

from finetune.cli import main as cli_main
from finetune.config import load_config
from finetune.train import main as train_main


def _args(root, out, *extra):
    return ["recipe=resnet18_scratch_fmnist", f"data.root={root}", "data.image_size=16",
            "train.epochs=1", "train.batch_size=16", "train.checkpoint=false", "data.workers=0",
            f"output_dir={out}", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A finished run on IDX files, an image folder and a save_to_disk folder, and one with
    checkpoints (two epochs)."""
    tmp = tmp_path_factory.mktemp("hostile_reports2")
    fmnist = write_fake_fmnist(tmp / "fmnist")
    args = {"idx": _args(fmnist, tmp / "idx"),
            "folder": _args(write_photos(tmp / "photos", per_class=12), tmp / "folder"),
            "hub": _args(_hf_dataset(tmp / "hf"), tmp / "hub", "data.source=hf"),
            "ckpt": _args(fmnist, tmp / "ckpt", "train.epochs=2", "train.checkpoint=true")}
    for a in args.values():
        train_main(load_config(a))
    return {kind: tmp / kind for kind in args}


def _budget(folder: Path) -> str:
    md = (folder / "report.md").read_text()
    return next(line for line in md.splitlines() if line.startswith("Budget:"))


def test_a_comparison_of_folder_and_idx_claims_no_hub_settings(runs, tmp_path):
    """Was: "shared by every run: ..., `data.hf_name=zalando-datasets/fashion_mnist`"."""
    out = tmp_path / "cmp"
    assert cli_main(["compare", str(runs["folder"]), str(runs["idx"]),
                     f"output_dir={out}"]) == 0
    budget = _budget(out)
    assert "hf_name" not in budget and "hf_config" not in budget, budget
    assert "`train.epochs=1`" in budget and "`data.image_size=16`" in budget, budget


def test_a_report_of_a_saved_hub_dataset_claims_no_hub_name(runs, tmp_path):
    out = tmp_path / "report"
    assert cli_main(["report", str(runs["hub"]), f"output_dir={out}"]) == 0
    budget = _budget(out)
    assert "hf_name" not in budget, budget
    assert "`data.source=hf`" in budget and "`data.train_split=train`" in budget, budget


def _damaged(run: Path, tmp_path: Path, line: str) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    with open(copy / "metrics.jsonl", "a") as f:
        f.write(line)
    return copy


TRUNCATED = '{"epoch": 2, "test_acc": "x"'


@pytest.mark.parametrize("command", ["report", "compare"])
def test_a_truncated_metrics_line_is_one_error(runs, tmp_path, capsys, command):
    """Was: json.decoder.JSONDecodeError."""
    run = _damaged(runs["idx"], tmp_path, TRUNCATED)
    refused(capsys, [command, str(run), f"output_dir={tmp_path / 'out'}"],
            f"{run / 'metrics.jsonl'}, line 2", "resume=auto")


@pytest.mark.parametrize("command", ["report", "compare"])
@pytest.mark.parametrize("record, field", [
    ('{"epoch": 1, "test_acc": NaN, "train_loss": 1}', "test_acc"),
    ('{"epoch": 1, "test_acc": 0.5, "epoch_time": Infinity}', "epoch_time"),
    ('{"epoch": "1", "test_acc": 0.5}', "epoch"),
    ('[1, 2]', "JSON object")])
def test_a_bad_metrics_record_is_one_error(runs, tmp_path, capsys, command, record, field):
    """Was: ValueError: cannot convert float NaN to integer (compare.default_targets)."""
    run = tmp_path / "run"
    shutil.copytree(runs["idx"], run)
    (run / "metrics.jsonl").write_text(record + "\n")
    refused(capsys, [command, str(run), f"output_dir={tmp_path / 'out'}"],
            f"{run / 'metrics.jsonl'}, line 1", field)


def test_resume_after_a_truncated_metrics_line_is_one_error(runs, tmp_path, capsys):
    """Was: JSONDecodeError from metrics_before."""
    run = _damaged(runs["ckpt"], tmp_path, TRUNCATED)
    args = _args(run.parent / "fmnist", run, "train.epochs=2", "train.checkpoint=true")
    args = [a for a in args if not a.startswith("data.root=")]
    refused(capsys, ["train", *args, f"data.root={runs['ckpt'].parent / 'fmnist'}",
                     "resume=auto"], f"{run / 'metrics.jsonl'}, line 3")


def test_a_null_recipe_section_says_it_must_be_a_mapping(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  name: resnet18\ntrain: null\n")
    line = refused(capsys, ["train", f"recipe={recipe}"], str(recipe), "'train'", "mapping")
    assert "Did you mean" not in line, line


def test_a_folder_named_like_a_recipe_is_not_missing(tmp_path, capsys):
    folder = tmp_path / "dir.yaml"
    folder.mkdir()
    line = refused(capsys, ["train", f"recipe={folder}"], str(folder), "folder")
    assert "does not exist" not in line, line
