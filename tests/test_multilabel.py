"""Multi-label data end to end: tags from a labels.csv folder and from a Hugging Face
Sequence(ClassLabel) column, stratified splits and folds over tags, the binary cross-entropy
step, thresholds tuned on the validation split and used by predict, evaluate (1 and 2
processes), and the refusals of what multi-label data cannot go with."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import launch_two_cpu_processes, refused
from PIL import Image

from finetune.data import fold_split, load_data, validation_split
from finetune.data.samples import strata
from finetune.data.sources import fold_ids
from finetune.data.tags import read_tags
from finetune.mixing import mix_batch
from finetune.step import StepOptions, pos_weight

TAGS = ["bottom_left", "bottom_right", "top_left", "top_right"]  # sorted: the class order
QUADRANTS = {"top_left": (0, 0), "top_right": (0, 1), "bottom_left": (1, 0),
             "bottom_right": (1, 1)}


def tagged_images(n: int, seed: int, size: int = 16) -> tuple[list[np.ndarray], list[list[str]]]:
    """Learnable tags: each quadrant bright (its tag) with probability 0.4, on noise; some
    images have no tag."""
    rng = np.random.default_rng(seed)
    images, tags = [], []
    half = size // 2
    for _ in range(n):
        a = rng.integers(0, 60, (size, size), dtype=np.uint8)
        on = [t for t in TAGS if rng.random() < 0.4]
        for t in on:
            y, x = QUADRANTS[t]
            a[y * half:(y + 1) * half, x * half:(x + 1) * half] += 150
        images.append(a)
        tags.append(on)
    return images, tags


def write_tagged(root: Path, n_train: int = 120, n_test: int = 40) -> Path:
    """root/train and root/test, PNGs and a labels.csv each."""
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        folder = root / split
        folder.mkdir(parents=True)
        images, tags = tagged_images(n, seed)
        with (folder / "labels.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "tags"])
            for i, (a, t) in enumerate(zip(images, tags, strict=True)):
                Image.fromarray(a).save(folder / f"{i:03d}.png")
                writer.writerow([f"{i:03d}.png", " ".join(t)])
    return root


def write_tagged_hf(root: Path, n_train: int = 120, n_test: int = 40) -> Path:
    """The same images as :func:`write_tagged` in a save_to_disk DatasetDict whose labels are
    a Sequence(ClassLabel) column."""
    import datasets

    features = datasets.Features({"image": datasets.Image(),
                                  "labels": datasets.Sequence(datasets.ClassLabel(names=TAGS))})
    splits = {}
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        images, tags = tagged_images(n, seed)
        pngs = []
        for a in images:
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="PNG")
            pngs.append({"bytes": buf.getvalue(), "path": None})
        splits[split] = datasets.Dataset.from_dict(
            {"image": pngs, "labels": [[TAGS.index(t) for t in ts] for ts in tags]},
            features=features)
    datasets.DatasetDict(splits).save_to_disk(str(root))
    return root


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["recipe=resnet18_scratch_fmnist", f"data.root={root}", "data.image_size=16",
            "train.epochs=4", "train.batch_size=16", "train.eval_batch_size=20",
            "train.lr=0.05", "train.checkpoint=false", "data.workers=0",
            f"output_dir={out}", *extra]


@pytest.fixture(scope="module")
def tagged_run(tmp_path_factory, _fixed_cpu_precision):
    """One multi-label run on a Sequence(ClassLabel) dataset (a validation split to tune the
    thresholds on), shared by the tests of what comes after training."""
    from finetune.config import load_config
    from finetune.train import main as train_main

    root = tmp_path_factory.mktemp("tagged")
    data = write_tagged_hf(root / "hf")
    train_main(load_config(_args(data, root / "run", "data.source=hf", "data.val_split=0.25",
                                 "train.epochs=6", "train.ema_decay=0.9")))
    return root / "run", data


# --- data ------------------------------------------------------------------------------------

def test_a_tagged_folder_loads_as_multi_hot_rows(tmp_path):
    from finetune.config import DataConfig

    root = write_tagged(tmp_path / "tagged")
    train, test, source = load_data(DataConfig(root=str(root)))
    images, tags = tagged_images(120, 0)
    assert source.startswith("tagged:") and train.classes == TAGS
    assert train.labels.shape == (120, 4) and train.labels.dtype == torch.uint8
    for row, t in zip(train.labels.tolist(), tags, strict=True):
        assert [TAGS[k] for k, v in enumerate(row) if v] == sorted(t)
    assert (train.labels.sum(1) == 0).any()  # images without a tag are kept, all targets 0
    assert test.labels.shape == (40, 4)


def test_the_hf_sequence_column_gives_the_same_labels_as_the_folder(tmp_path):
    from finetune.config import DataConfig

    folder, _, _ = load_data(DataConfig(root=str(write_tagged(tmp_path / "f"))))
    hub, _, _ = load_data(DataConfig(root=str(write_tagged_hf(tmp_path / "h")), source="hf"))
    assert hub.classes == folder.classes and torch.equal(hub.labels, folder.labels)


def test_labels_csv_rows_are_read_in_either_separator(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        Image.new("L", (4, 4)).save(tmp_path / name)
    (tmp_path / "labels.csv").write_text('file,tags\na.png,"dog, beach"\nb.png,dog sunset\n'
                                         'c.png,\n')
    rows = read_tags(tmp_path / "labels.csv")
    assert [tags for _, tags in rows] == [["dog", "beach"], ["dog", "sunset"], []]


@pytest.mark.parametrize("csv_text, needles", [
    ("file,tags\nmissing.png,dog\n", ["missing.png", "is not a file"]),
    ("file,tags\na.png,dog\na.png,cat\n", ["rows 2 and 3", "a.png"]),
    ("file,tags\n", ["no rows"]),
    ("file,tags\n../a.png,dog\n", ["'../a.png'", "is outside"]),
    ("file,tags\n/etc/passwd,dog\n", ["'/etc/passwd'", "is outside"]),
    ("file,tags\na.png,dog\n./a.png,cat\n", ["rows 2 and 3", "'./a.png'"]),
])
def test_bad_labels_csv_is_one_line(tmp_path, capsys, csv_text, needles):
    root = tmp_path / "data"
    root.mkdir()
    Image.new("L", (16, 16)).save(root / "a.png")
    (root / "labels.csv").write_text(csv_text)
    refused(capsys, ["train", *_args(root, tmp_path / "run")], "labels.csv", *needles)


def test_a_test_tag_outside_the_training_tags_is_one_line(tmp_path, capsys):
    root = write_tagged(tmp_path / "tagged", 40, 10)
    rows = (root / "test" / "labels.csv").read_text().splitlines()
    rows[3] = rows[3].split(",")[0] + ",zebra"
    (root / "test" / "labels.csv").write_text("\n".join(rows) + "\n")
    refused(capsys, ["train", *_args(root, tmp_path / "run")], "'zebra'", "not among",
            "bottom_left", "002.png")


def test_a_file_in_both_the_training_and_the_test_csv_is_one_line(tmp_path, capsys):
    root = write_tagged(tmp_path / "tagged", 40, 10)
    (root / "test" / "copy.png").symlink_to(root / "train" / "005.png")
    with (root / "test" / "labels.csv").open("a") as f:
        f.write("copy.png,top_left\n")
    refused(capsys, ["train", *_args(root, tmp_path / "run")], "both the training and the test",
            "005.png")


def test_data_classes_on_tags_keeps_every_image(tmp_path):
    from finetune.config import DataConfig

    root = write_tagged(tmp_path / "tagged")
    full, _, _ = load_data(DataConfig(root=str(root)))
    kept, _, _ = load_data(DataConfig(root=str(root), classes=["top_right", "bottom_left"]))
    assert kept.classes == ["top_right", "bottom_left"] and len(kept) == len(full)
    assert torch.equal(kept.labels, full.labels[:, [3, 0]])  # untagged now: targets all 0


def test_source_imagefolder_reads_the_class_folders_beside_a_labels_csv(tmp_path):
    from finetune.config import DataConfig

    root = tmp_path / "both"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(10):
            Image.new("L", (8, 8), i * 20).save(root / c / f"{i}.png")
    (root / "labels.csv").write_text("".join(f"{c}/{i}.png,{c} pet\n" for c in ("cat", "dog")
                                             for i in range(10)))
    tagged, _, source = load_data(DataConfig(root=str(root)))
    assert source.startswith("tagged:") and tagged.classes == ["cat", "dog", "pet"]
    single, _, source = load_data(DataConfig(root=str(root), source="imagefolder"))
    assert source.startswith("imagefolder:") and single.labels.ndim == 1


def test_integer_tags_are_classes_in_numeric_order(tmp_path):
    import datasets

    from finetune.config import DataConfig

    pngs = []
    for a in tagged_images(20, 0)[0]:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        pngs.append({"bytes": buf.getvalue(), "path": None})
    features = datasets.Features({"image": datasets.Image(),
                                  "labels": datasets.Sequence(datasets.Value("int64"))})
    tags = [[10, 2], [1], [], [2, 1, 10]] * 5
    datasets.Dataset.from_dict({"image": pngs, "labels": tags}, features=features) \
        .save_to_disk(str(tmp_path / "ints"))
    train, test, _ = load_data(DataConfig(root=str(tmp_path / "ints"), source="hf"))
    assert train.classes == ["1", "2", "10"]
    both = torch.cat([train.labels, test.labels])
    assert sorted(map(tuple, both.tolist())) == sorted(
        [tuple(int(str(c) in map(str, t)) for c in (1, 2, 10)) for t in tags])


def test_single_labels_become_one_tag_each_with_task_multilabel(fmnist_dir):
    from finetune.config import DataConfig

    single, _, _ = load_data(DataConfig(root=str(fmnist_dir)))
    multi, _, _ = load_data(DataConfig(root=str(fmnist_dir), task="multilabel"))
    assert torch.equal(multi.labels, F.one_hot(single.labels, 10).to(torch.uint8))


def test_splits_and_folds_keep_every_tag(tmp_path):
    from finetune.config import DataConfig

    train, _, _ = load_data(DataConfig(root=str(write_tagged(tmp_path / "t"))))
    rest, val = validation_split(train, 0.25, seed=0)
    assert len(val) == 30 and (val.labels.sum(0) > 0).all() and (rest.labels.sum(0) > 0).all()
    ids = fold_ids(train.labels, 4, 3, seed=0)
    assert sorted(torch.bincount(ids).tolist()) == [40, 40, 40]
    for fold in range(3):
        held = train.labels[ids == fold].sum(0).double()
        share = held / train.labels.sum(0).double()
        assert (share - 1 / 3).abs().max() < 0.1, share  # each tag about a third per fold
        _, part = fold_split(train, 3, fold, seed=0)
        assert torch.equal(part.labels, train.labels[ids == fold])


def test_strata_are_the_rarest_tag_and_none_for_no_tag():
    labels = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 0, 1]], dtype=torch.uint8)
    stratum, count = strata(labels, 3)
    assert count == 4 and stratum.tolist() == [1, 0, 3, 2]


# --- the step ---------------------------------------------------------------------------------

def test_the_step_loss_is_binary_cross_entropy_with_pos_weight():
    from finetune.config import load_config

    labels = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0]], dtype=torch.uint8)
    weights = pos_weight("balanced", labels)
    assert weights.tolist() == pytest.approx([1 / 3, 3.0, 1.0])  # negatives / positives; none: 1
    cfg = load_config(["recipe=resnet18_scratch_fmnist", "train.pos_weight=balanced"])
    opts = StepOptions.from_config(cfg, 3, labels)
    assert opts.multilabel and torch.equal(opts.pos_weight, weights)


def test_the_test_loss_comes_from_the_logits_not_rounded_sigmoids():
    from finetune.multilabel import _scores

    logits = torch.tensor([[40.0, -40.0, 0.0]])
    targets = torch.tensor([[0.0, 1.0, 1.0]])
    probs, losses = _scores(lambda v: v, [logits], targets)
    expected = F.binary_cross_entropy_with_logits(logits, targets).item()  # (40 + 40 + ln 2) / 3
    assert losses.item() == pytest.approx(expected, rel=1e-6) and expected > 26.8
    assert torch.equal(probs, torch.sigmoid(logits))


def test_mixup_mixes_multi_hot_targets():
    x = torch.randn(4, 1, 8, 8)
    labels = torch.tensor([[1, 0, 1], [0, 1, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.uint8)
    mixed, target = mix_batch(x, labels, 3, 0.0, "mixup", 0.7, None)
    assert torch.allclose(target, 0.7 * labels.float() + 0.3 * labels.flip(0).float())
    assert torch.allclose(mixed, 0.7 * x + 0.3 * x.flip(0))


@pytest.mark.parametrize("extra, needles", [
    (["data.sampler=balanced"], ["data.sampler=balanced", "pos_weight"]),
    (["train.class_weights=balanced"], ["train.class_weights", "pos_weight"]),
    (["finetune.method=knn", "model.pretrained=false"], ["finetune.method=knn", "full"]),
    (["data.task=single"], ["data.task=single", "multi-label"]),
])
def test_what_multi_label_data_cannot_go_with_is_one_line(tmp_path, capsys, extra, needles):
    root = write_tagged(tmp_path / "tagged", 40, 10)
    refused(capsys, ["train", *_args(root, tmp_path / "run", *extra)], *needles)


def test_pos_weight_on_single_label_data_is_one_line(fmnist_dir, tmp_path, capsys):
    refused(capsys, ["train", *_args(fmnist_dir, tmp_path / "run", "train.pos_weight=balanced")],
            "train.pos_weight=balanced", "one class per image")


def test_a_sweep_of_tagged_data_is_refused_before_any_model(tmp_path, capsys, fmnist_dir):
    root = write_tagged(tmp_path / "tagged", 40, 10)
    refused(capsys, ["sweep", "models=resnet18", f"data.root={root}",
                     f"output_dir={tmp_path / 'sweep'}"], "multi-label", "finetune compare")
    # one model's own data, not the last model's
    refused(capsys, ["sweep", "models=resnet18,resnet34", f"data.root={fmnist_dir}",
                     f"resnet18:data.root={root}", f"output_dir={tmp_path / 'sweep'}"],
            "multi-label", "finetune compare")
    assert not (tmp_path / "sweep").exists()


def test_a_search_on_tags_scores_val_map_by_default(tmp_path):
    from finetune.tune import plan_tune

    root = write_tagged(tmp_path / "tagged", 40, 10)
    args = ["recipe=resnet18_scratch_fmnist", f"data.root={root}", "data.val_split=0.25",
            "train.lr=loguniform(0.001,0.1)", f"output_dir={tmp_path / 'tune'}"]
    assert plan_tune(args).metric == "val_map"
    assert plan_tune([*args, "metric=val_acc"]).metric == "val_acc"
    assert plan_tune([*args[:1], *args[2:]]).metric == "val_acc"  # Fashion-MNIST


def test_the_hub_fallback_is_probed_for_tags_as_load_data_would_read_it(tmp_path,
                                                                         monkeypatch):
    from finetune import data
    from finetune.config import DataConfig
    from finetune.data import hub

    asked = []
    monkeypatch.setattr(hub, "tagged_hub", lambda cfg: asked.append(cfg.hf_name) or True)
    monkeypatch.setattr(data, "DEFAULT_IDX_DIRS", [tmp_path / "absent"])  # no local copy
    assert data.multilabel_data(DataConfig(hf_name="me/tags")) and asked == ["me/tags"]
    monkeypatch.setattr(data, "_local_idx", lambda: tmp_path)  # a local Fashion-MNIST
    assert not data.multilabel_data(DataConfig(hf_name="me/tags")) and len(asked) == 1

    def offline(cfg):
        raise data.DataError("no network")
    monkeypatch.setattr(hub, "tagged_hub", offline)
    monkeypatch.setattr(data, "_local_idx", lambda: None)
    assert not data.multilabel_data(DataConfig(hf_name="me/tags"))


# --- after training ---------------------------------------------------------------------------

def test_the_run_exports_thresholds_tuned_on_the_validation_split(tagged_run):
    run, _ = tagged_run
    meta = json.loads((run / "model.json").read_text())
    record = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert meta["task"] == "multilabel" and len(meta["thresholds"]) == 4
    assert "validation split (30 images)" in meta["thresholds_from"]
    assert record["test_map"] > 0.7, record["test_map"]  # learnt: chance is about 0.4
    assert {"val_map", "val_f1_micro", "test_f1_macro"} <= set(record)
    card = (run / "README.md").read_text()
    assert "mean average precision" in card and "multi-label-classification" in card


def test_predict_returns_the_tags_over_their_thresholds(tagged_run, tmp_path):
    import finetune

    run, data = tagged_run
    predictor = finetune.load(run)
    images = [Image.fromarray(a) for a in tagged_images(6, 1)[0]]
    probs = predictor.probabilities(images)
    cut = predictor.thresholds
    got = predictor.predict(images)
    for row, p in zip(got, probs, strict=True):
        assert {name for name, _ in row} == {TAGS[k] for k in range(4) if p[k] >= cut[k]}
        assert [q for _, q in row] == sorted((q for _, q in row), reverse=True)
    # The stored thresholds decide: moved to 0 every tag is returned, to 1 almost none.
    predictor.meta["thresholds"] = [0.0] * 4
    assert all(len(row) == 4 for row in predictor.predict(images))
    predictor.meta["thresholds"] = [1.0] * 4
    assert sum(len(row) for row in predictor.predict(images)) == int((probs >= 1.0).sum())


def test_evaluate_scores_the_thresholds_and_matches_training(tagged_run, tmp_path):
    from finetune.evaluation import evaluate_run

    run, data = tagged_run
    out = tmp_path / "eval"
    result = evaluate_run(run, [f"output_dir={out}"])
    record = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert result["test_map"] == pytest.approx(record["test_map"], abs=1e-6)
    # training's epoch scored F1 at 0.5; evaluate at the tuned thresholds, 0.5 beside them
    assert result["at_0.5"]["f1_micro"] == pytest.approx(record["test_f1_micro"], abs=1e-6)
    assert result["thresholds"] == json.loads((run / "model.json").read_text())["thresholds"]
    assert (out / "pr_curves.png").stat().st_size > 0 and (out / "evaluation.json").is_file()


@pytest.mark.slow
def test_two_process_multilabel_evaluation_equals_one_process(tagged_run, tmp_path):
    from finetune.evaluation import evaluate_run

    run, _ = tagged_run
    single = evaluate_run(run, [f"output_dir={tmp_path / 'one'}"])
    launch_two_cpu_processes("-m", "finetune.cli", "evaluate", str(run),
                             "train.eval_batch_size=7", f"output_dir={tmp_path / 'two'}")
    two = json.loads((tmp_path / "two" / "evaluation.json").read_text())
    assert two["test_total"] == single["test_total"] == 40  # 40 = 2 x 7 x 3 - 2: padding dropped
    for key in ("test_map", "test_f1_micro", "test_f1_macro", "test_acc", "test_loss"):
        assert two[key] == pytest.approx(single[key], abs=1e-6), key


@pytest.fixture(scope="module")
def tagged_files(tagged_run, tmp_path_factory) -> list[Path]:
    """Six tagged test images as PNG files."""
    folder = tmp_path_factory.mktemp("tagged-files")
    files = [folder / f"{i}.png" for i in range(6)]
    for a, f in zip(tagged_images(6, 1)[0], files, strict=True):
        Image.fromarray(a).save(f)
    return files


def test_batch_prediction_writes_tags_and_every_probability(tagged_run, tagged_files,
                                                            tmp_path):
    import finetune
    from finetune.cli import main

    run, _ = tagged_run
    predictor = finetune.load(run)
    expected, probs = predictor.predict(tagged_files), predictor.probabilities(tagged_files)
    out = tmp_path / "tags.jsonl"
    assert main(["predict", str(run), *map(str, tagged_files[:4]), "--out", str(out),
                 "--batch-size", "3", "--workers", "0"]) == 0
    assert main(["predict", str(run), *map(str, tagged_files), "--out", str(out),
                 "--batch-size", "3", "--workers", "0", "--resume"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["file"] for r in rows] == list(map(str, tagged_files))
    for row, want, p in zip(rows, expected, probs, strict=True):
        assert [t["class"] for t in row["labels"]] == [c for c, _ in want]
        assert [row["probabilities"][t] for t in TAGS] == pytest.approx(p.tolist(), abs=1e-6)
    table = tmp_path / "tags.csv"
    assert main(["predict", str(run), *map(str, tagged_files), "--out", str(table),
                 "--workers", "0"]) == 0
    lines = list(csv.reader(table.open()))
    assert lines[0] == ["file", "labels", *(f"probability_{t}" for t in TAGS), "error"]
    assert [r[1] for r in lines[1:]] == [" ".join(c for c, _ in want) for want in expected]


def test_a_tag_with_a_space_is_refused_in_a_csv_labels_cell(tmp_path):
    from finetune.batch_predict import Columns, start_output
    from finetune.errors import ConfigError

    columns = Columns(3, 2, ("sea lion", "dog"), (0.5, 0.5))
    with pytest.raises(ConfigError, match="'sea lion' holds a space.*write .jsonl"):
        start_output(tmp_path / "p.csv", ["a.png"], False, columns)
    assert not (tmp_path / "p.csv").exists()
    assert start_output(tmp_path / "p.jsonl", ["a.png"], False, columns) == 0


def test_serving_a_multi_label_model_answers_its_tags(tagged_run, tagged_files):
    import httpx
    from conftest import serving

    import finetune

    run, _ = tagged_run
    predictor = finetune.load(run)
    expected, probs = predictor.predict(tagged_files), predictor.probabilities(tagged_files)
    with serving(run) as url:
        meta = httpx.get(f"{url}/metadata", timeout=30).json()
        answer = httpx.post(f"{url}/predict", params={"top_k": 4}, timeout=60,
                            files=[("files", (f.name, f.read_bytes())) for f in tagged_files])
        page = _page_rows(url, tagged_files[:2])
    assert meta["task"] == "multilabel" and meta["thresholds"] == predictor.meta["thresholds"]
    assert "test_map" in meta["metrics"]
    assert answer.status_code == 200, answer.text
    for got, want, p in zip(answer.json()["predictions"], expected, probs, strict=True):
        assert [t["class"] for t in got["labels"]] == [c for c, _ in want]
        assert [t["probability"] for t in got["labels"]] == pytest.approx(
            [v for _, v in want], abs=2e-6)
        assert sorted(t["class"] for t in got["top_k"]) == sorted(TAGS)
        assert [t["probability"] for t in got["top_k"]] == pytest.approx(
            sorted(p.tolist(), reverse=True), abs=2e-6)
    if page is not None:  # the page in a real browser: the labels line of each image
        facts, labels = page
        assert "4 tags, test mAP" in facts
        assert labels == [("labels: " + ", ".join(c for c, _ in want)) if want
                          else "no tag over its threshold" for want in expected[:2]]


def _page_rows(url: str, files: list[Path]) -> tuple[str, list[str]] | None:
    """The page's facts line and each result's labels line, in headless Chromium (None where
    Playwright or Chromium is missing)."""
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    if chromium is None:
        return None
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(url)
        page.set_input_files("#files", [str(f) for f in files])
        page.wait_for_selector(".result", timeout=30_000)
        page.wait_for_function("document.querySelector('#facts').textContent.length > 0")
        labels = page.locator(".result .labels").all_inner_texts()
        facts = page.locator("#facts").inner_text()
        browser.close()
    return facts, labels


def test_inspecting_a_multi_label_model_is_one_line(tagged_run, capsys, tmp_path):
    run, _ = tagged_run
    refused(capsys, ["inspect", str(run), "--out", str(tmp_path / "i")], "finetune inspect",
            "multi-label")
    pytest.importorskip("onnxruntime")
    refused(capsys, ["export-onnx", str(run), "--out", str(tmp_path / "m.onnx"), "--int8"],
            "--int8", "multi-label")
    assert not (tmp_path / "m.onnx").exists()  # refused before the fp32 file is written


def test_the_weight_average_exports_its_own_thresholds(tagged_run):
    """ema/model.json holds the thresholds tuned on the average's own validation scores."""
    import finetune
    from finetune.config import load_config
    from finetune.multilabel_metrics import tune_thresholds

    run, _ = tagged_run
    cfg = load_config(["recipe=" + str(run / "config.yaml")])
    train, _, _ = load_data(cfg.data)
    _, val = validation_split(train, cfg.data.val_split, cfg.data.split_seed)
    images = torch.stack([torch.from_numpy(np.array(val.open(i))) for i in range(len(val))])
    for folder in (run, run / "ema"):
        predictor = finetune.load(folder)
        probs = predictor.probabilities(images[:, None])
        tuned = tune_thresholds(probs, val.labels, 0.5).tolist()
        assert predictor.meta["thresholds"] == pytest.approx(tuned, abs=1e-6), folder
    raw, ema = (json.loads((f / "model.json").read_text())["thresholds"]
                for f in (run, run / "ema"))
    assert raw != ema


def test_a_multilabel_model_without_thresholds_is_refused(tagged_run, tmp_path, capsys):
    import shutil

    run, _ = tagged_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(".lock"))
    meta = json.loads((copy / "model.json").read_text())
    del meta["thresholds"]
    (copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(Exception, match="without 'thresholds'"):
        __import__("finetune").load(copy)
    meta["thresholds"] = [0.5, 0.5]
    (copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(Exception, match="thresholds"):
        __import__("finetune").load(copy)


def test_onnx_and_timm_exports_say_multi_label(tagged_run, tmp_path):
    """The ONNX file's metadata carries the task and thresholds; its logits through a sigmoid
    are predict's probabilities. timm's config.json names the problem type."""
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    import finetune
    from finetune.export import export_onnx, timm_config

    run, _ = tagged_run
    path = export_onnx(run, tmp_path / "model.onnx")
    props = {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}
    meta = json.loads((run / "model.json").read_text())
    assert props["task"] == "multilabel" and props["thresholds"] == meta["thresholds"]
    predictor = finetune.load(run)
    images = torch.from_numpy(np.stack(tagged_images(4, 1)[0]))[:, None]
    x = predictor.batch_inputs(images).contiguous().numpy()
    (logits,) = onnxruntime.InferenceSession(str(path)).run(None, {"input": x})
    assert np.allclose(torch.sigmoid(torch.from_numpy(logits)).numpy(),
                       predictor.probabilities(images).numpy(), atol=1e-4)
    assert timm_config(meta, predictor.model)["problem_type"] == "multi_label_classification"


def test_the_report_of_a_multi_label_run_lists_its_map(tagged_run, tmp_path):
    """finetune report (and compare's report) on a run without a confusion matrix."""
    from finetune.cli import main

    run, _ = tagged_run
    assert main(["report", str(run), f"output_dir={tmp_path / 'report'}"]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "mAP %" in text and not (tmp_path / "report" / "confusion.png").exists()


def test_a_streamed_tagged_folder_warms_up_compile_with_multi_hot_rows(tmp_path):
    """TrainLoader.sample (torch.compile's warm-up batch) of files streamed per batch."""
    from finetune.config import DataConfig
    from finetune.data.images import eval_transform
    from finetune.data.loader import TrainBatches, TrainLoader

    train, _, _ = load_data(DataConfig(root=str(write_tagged(tmp_path / "t", 40, 10))))
    batches = TrainBatches(train, eval_transform(16, 1.0, "bilinear"), 16, 16, 8, seed=0,
                           rank=0, world_size=1, skip_bad=False)
    loader = TrainLoader(train, "stream", 8, 0, 0, 1, torch.device("cpu"), 0, batches)
    images, labels = loader.sample(3)
    assert images.shape == (3, 1, 16, 16) and labels.shape == (3, 4)
    assert labels.dtype == torch.uint8
    x, y = next(iter(loader.epoch(1)))
    assert y.shape[1:] == labels.shape[1:] and y.dtype == labels.dtype
