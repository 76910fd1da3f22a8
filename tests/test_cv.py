"""k-fold cross-validation: the folds (stratified, seeded, disjoint), the fold keys, and
``finetune cv`` end to end (every training image out of fold exactly once, resumable)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import refused, write_fake_fmnist
from PIL import Image

from finetune.cli import main as cli_main
from finetune.config import load_config
from finetune.cv import plan_cv
from finetune.data import fold_split
from finetune.data.sources import ImageData, fold_ids
from finetune.errors import ConfigError, DataError


def _labels(counts: list[int]) -> torch.Tensor:
    """Class-sorted labels, ``counts[k]`` of class k."""
    return torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])


@pytest.mark.parametrize("counts,folds", [([10, 10, 10], 5), ([7, 3, 11, 1], 4), ([5, 5], 3)])
def test_folds_are_balanced_per_class_and_overall(counts, folds):
    labels = _labels(counts)
    ids = fold_ids(labels, len(counts), folds, seed=0)
    assert ids.min() >= 0 and ids.max() < folds
    sizes = torch.bincount(ids, minlength=folds)
    assert sizes.max() - sizes.min() <= 1
    for k in range(len(counts)):  # stratified: each class spread evenly over the folds
        per = torch.bincount(ids[labels == k], minlength=folds)
        assert per.max() - per.min() <= 1


def test_folds_are_seeded_and_shuffled_within_classes():
    labels = _labels([20, 20, 20])
    a, b = fold_ids(labels, 3, 5, seed=0), fold_ids(labels, 3, 5, seed=0)
    assert torch.equal(a, b)
    assert not torch.equal(a, fold_ids(labels, 3, 5, seed=1))
    assert not torch.equal(a[:20], torch.arange(20) % 5)  # not dealt in file order


def test_fold_split_is_disjoint_and_covers_the_data():
    images, labels = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1), _labels([16, 24])
    data = ImageData(images.expand(40, 1, 2, 2).clone(), labels, ["a", "b"])
    seen = []
    for fold in range(4):
        train, val = fold_split(data, 4, fold, seed=3)
        held = set(val.images[:, 0, 0, 0].tolist())
        assert held.isdisjoint(train.images[:, 0, 0, 0].tolist())
        assert len(train) + len(val) == 40 and len(val) == 10
        seen += held
    assert sorted(seen) == list(range(40))


@pytest.mark.parametrize("args,needle", [
    (["data.folds=1"], "2 to 100 folds"),
    (["data.folds=3", "data.fold=3"], "not a fold of data.folds=3"),
    (["data.fold=2"], "needs data.folds"),
    (["data.folds=3", "data.val_split=0.1"], "drop data.val_split"),
    (["data.folds=3", "data.streaming=true"], "cannot split a stream"),
])
def test_fold_keys_are_checked(args, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(["recipe=resnet18_scratch_fmnist", *args])


def test_early_stopping_watches_the_held_out_fold():
    cfg = load_config(["recipe=resnet18_scratch_fmnist", "data.folds=3",
                       "train.early_stopping=2"])
    assert cfg.data.folds == 3 and cfg.train.early_stopping == 2
    with pytest.raises(ConfigError, match="needs a validation split"):
        load_config(["recipe=resnet18_scratch_fmnist", "train.early_stopping=2"])


@pytest.mark.parametrize("args,needle", [
    (["folds=1"], "folds=1: cross-validation needs 2 to 100 folds"),
    (["folds=five"], "folds=five"),
    (["data.val_split=0.2"], "data.val_split=0.2: finetune cv sets it"),
    (["data.fold=1"], "finetune cv sets it"),
    (["launcher=\"accelerate launch"], "launcher=.*quot"),
])
def test_cv_arguments_are_checked_before_training(tmp_path, args, needle):
    with pytest.raises(ConfigError, match=needle):
        plan_cv(["recipe=resnet18_scratch_fmnist", f"output_dir={tmp_path}", *args])
    assert not any(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="usage: finetune cv recipe=NAME"):
        plan_cv(["folds=3"])


def test_cv_replaces_the_recipes_validation_split(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("recipe: r\ndata:\n  val_split: 0.1\n")
    plan = plan_cv([f"recipe={recipe}", "folds=3", f"output_dir={tmp_path / 'cv'}",
                    f"data.root={write_fake_fmnist(tmp_path / 'data')}"])
    assert [(c.data.val_split, c.data.folds, c.data.fold) for c in plan.configs] == [
        (0.0, 3, 0), (0.0, 3, 1), (0.0, 3, 2)]
    assert [j[1].name for j in plan.jobs] == ["fold0", "fold1", "fold2"]


@pytest.mark.slow
def test_cv_end_to_end(tmp_path, capsys):
    data = write_fake_fmnist(tmp_path / "fmnist", n_train=60)
    out = tmp_path / "cv"
    argv = ["cv", "recipe=resnet18_scratch_fmnist", "folds=2", f"data.root={data}",
            "data.image_size=16", "train.epochs=2", "train.batch_size=16", "train.lr=0.01",
            "train.checkpoint=false", "data.split_seed=4", f"output_dir={out}"]
    assert cli_main(argv) == 0
    oof = [json.loads(line) for line in (out / "oof.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in oof) == list(range(60))  # each image once
    train = load_config(["recipe=resnet18_scratch_fmnist", f"data.root={data}"])
    from finetune.data import load_data

    labels = load_data(train.data)[0].labels
    ids = fold_ids(labels, 10, 2, seed=4)  # the folds the runs held out
    assert all(ids[r["index"]] == r["fold"] and labels[r["index"]] == r["label"] for r in oof)
    result = json.loads((out / "cv.json").read_text())
    for row in result["folds"]:  # the fold's own validation numbers, from oof.jsonl
        mine = [r for r in oof if r["fold"] == row["fold"]]
        acc = sum(r["label"] == r["predicted"] for r in mine) / len(mine)
        loss = sum(-math.log(r["probs"][r["label"]]) for r in mine) / len(mine)
        assert acc == pytest.approx(row["val_acc"], abs=1e-9)
        assert loss == pytest.approx(row["val_loss"], abs=1e-4)
        assert abs(sum(mine[0]["probs"]) - 1) < 1e-4
    accs = [row["val_acc"] for row in result["folds"]]
    assert result["summary"]["metrics"]["val_acc"]["mean"] == pytest.approx(sum(accs) / 2)
    assert "val_acc" in (out / "cv.md").read_text()
    capsys.readouterr()
    assert cli_main(argv) == 0  # run again: both folds kept, nothing trained
    assert capsys.readouterr().out.count("finished earlier, kept") == 2
    refused(capsys, [*argv[:-1], "train.lr=0.02", f"output_dir={out}"],
            "cannot resume the run in", "train.lr=0.02 (was 0.01)")


def test_a_fold_that_empties_a_class_stops_cv_before_any_training(tmp_path):
    """Class b has one training image: the fold holding it out leaves b untrained."""
    root = tmp_path / "photos"
    for split, counts in (("train", {"a": 8, "b": 1}), ("test", {"a": 2, "b": 2})):
        for name, n in counts.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new("L", (8, 8), 30 * i).save(root / split / name / f"{i}.png")
    with pytest.raises(DataError, match="no training images outside fold 0 of data.folds=2"):
        plan_cv(["recipe=resnet18_scratch_fmnist", "folds=2", f"data.root={root}",
                 f"output_dir={tmp_path / 'cv'}"])
    assert not (tmp_path / "cv").exists()


def test_cv_output_and_fold_count_refusals(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        plan_cv(["recipe=resnet18_scratch_fmnist", f"output_dir={tmp_path / 'file'}"])
    with pytest.raises(ConfigError, match="folds of under two images"):
        plan_cv(["recipe=resnet18_scratch_fmnist", "folds=10", "data.train_limit=15",
                 f"output_dir={tmp_path / 'cv'}"])
