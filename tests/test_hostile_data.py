"""Hostile data, case by case (issue 28): Hugging Face rows streamed or held, image folders
with a class too small to train on or a name that is not UTF-8, bad images no epoch draws.
Each case is exit status 2, one ``error:`` line naming the row and split, the folder, the
file or the key, and no traceback."""

import io
import json
import os

import numpy as np
import pytest
import torch
from conftest import refused, write_photos
from PIL import Image

from finetune.cli import main as cli_main
from finetune.config import DataConfig
from finetune.data import DataError, load_data, validation_split
from finetune.data.loader import TrainLoader
from finetune.data.stream import TrainBatches, epoch_permutation

NAMES = ["a", "b", "c"]



def _train(root, out, *extra) -> list[str]:
    return ["train", "recipe=resnet18_scratch_fmnist", f"data.root={root}", "data.image_size=16",
            "train.epochs=1", "train.batch_size=16", "train.eval_batch_size=12",
            "train.checkpoint=false", "data.workers=0", f"output_dir={out}", *extra]


def _stream(root, out, *extra) -> list[str]:
    return _train(root, out, "data.source=hf", "data.streaming=true", "data.test_split=test",
                  *extra)


# --- Hugging Face rows -----------------------------------------------------------------------

def _png(k: int) -> bytes:
    a = np.full((12, 12, 3), 20, np.uint8)
    a[:, 4 * k:4 * k + 4] = 230
    out = io.BytesIO()
    Image.fromarray(a).save(out, format="PNG")
    return out.getvalue()


def _hf(root, train=32, test=12, names=None, test_names=None, image=None, label=None,
        integer_labels=False):
    """A two-split dataset saved to disk, written as Arrow rows so that nothing checks them:
    ``image``/``label``: ``{(split, row): value}`` put in place of the good cell (``None``,
    bytes, a label outside the classes); ``integer_labels``: a plain int64 label column."""
    import datasets

    image, label = image or {}, label or {}
    splits = {}
    for split, n, classes in (("train", train, names or NAMES),
                              ("test", test, test_names or names or NAMES)):
        kind = datasets.Value("int64") if integer_labels else datasets.ClassLabel(names=classes)
        features = datasets.Features({"img": datasets.Image(), "label": kind})
        rows = [{"img": {"bytes": image.get((split, i), _png(i % 3)), "path": None},
                 "label": label.get((split, i), i % 3)} for i in range(n)]
        for (s, i), value in image.items():
            if s == split and value is None:
                rows[i]["img"] = None
        table = __import__("pyarrow").Table.from_pylist(rows, schema=features.arrow_schema)
        splits[split] = datasets.Dataset(table, info=datasets.DatasetInfo(features=features))
    datasets.DatasetDict(splits).save_to_disk(str(root))
    return root


@pytest.mark.parametrize("split, row, cell, workers", [
    ("train", 5, None, 0), ("train", 5, None, 2), ("test", 3, b"not an image", 2)])
def test_a_streamed_none_or_undecodable_image_names_row_and_split(tmp_path, capsys, split, row,
                                                                  cell, workers):
    root = _hf(tmp_path / "hf", image={(split, row): cell})
    refused(capsys, _stream(root, tmp_path / "run", f"data.workers={workers}"),
             f"split '{split}' row {row}", "data.skip_bad_images=true")
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_streamed_bad_images_are_skipped_and_counted(tmp_path, capsys):
    root = _hf(tmp_path / "hf", image={("train", 5): None, ("train", 9): b"junk",
                                       ("test", 3): None})
    assert cli_main(_stream(root, tmp_path / "run", "data.skip_bad_images=true")) == 0
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    # 12 test rows, 1 skipped: 11 scored
    assert (record["bad_images"], record["test_skipped"], record["test_total"]) == (2, 1, 11)


@pytest.mark.parametrize("split, row, value, workers", [
    ("train", 7, 7, 2), ("train", 2, -1, 0), ("test", 4, 3, 0), ("test", 4, 3, 2)])
def test_a_streamed_label_outside_the_classes_names_row_and_split(tmp_path, capsys, split, row,
                                                                  value, workers):
    root = _hf(tmp_path / "hf", label={(split, row): value})
    refused(capsys, _stream(root, tmp_path / "run", f"data.workers={workers}"),
             f"split '{split}' row {row}", f"label {value}")


def test_a_streamed_test_split_with_classes_in_another_order_isrefused(tmp_path, capsys):
    root = _hf(tmp_path / "hf", test_names=["b", "a", "c"])
    refused(capsys, _stream(root, tmp_path / "run"), "test split", "['b', 'a', 'c']",
             "['a', 'b', 'c']")


@pytest.mark.parametrize("streaming", [False, True])
def test_none_labels_arerefused(tmp_path, capsys, streaming):
    """An integer label column (held) or a ClassLabel column (streamed) with an empty cell:
    never a class named "None"."""
    root = _hf(tmp_path / "hf", label={("train", 6): None}, integer_labels=not streaming)
    args = (_stream(root, tmp_path / "run") if streaming else
            _train(root, tmp_path / "run", "data.source=hf"))
    refused(capsys, args, "split 'train' row 6", "no label")


# --- Image folders ---------------------------------------------------------------------------

def _small_class(root, images: int = 1):
    """Ten classes of 8 photos, and class 'lonely' with ``images`` photos."""
    write_photos(root, per_class=8)
    (root / "lonely").mkdir()
    for i in range(images):
        Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(root / "lonely" / f"{i}.png")
    return root


@pytest.mark.parametrize("extra", [[], ["data.sampler=balanced"],
                                   ["train.class_weights=balanced"]])
def test_a_class_the_test_split_takes_whole_isrefused(tmp_path, capsys, extra):
    root = _small_class(tmp_path / "photos")
    refused(capsys, _train(root, tmp_path / "run", *extra), "'lonely'", "no training images",
             "data.allow_empty_classes=true")


def test_allow_empty_classes_trains_with_a_warning(tmp_path, capsys):
    root = _small_class(tmp_path / "photos")
    assert cli_main(_train(root, tmp_path / "run", "data.allow_empty_classes=true")) == 0
    err = capsys.readouterr().err
    assert "'lonely'" in err and "no training images" in err and "Traceback" not in err


def test_a_class_a_train_limit_empties_isrefused(tmp_path, capsys):
    root = _small_class(tmp_path / "photos", images=2)  # 1 left for training, of 73
    refused(capsys, _train(root, tmp_path / "run", "data.train_limit=30"), "'lonely'",
             "data.train_limit=30", "data.allow_empty_classes=true")


def test_a_class_the_validation_split_empties_isrefused(tmp_path):
    root = _small_class(tmp_path / "photos", images=3)  # 2 left for training
    train, _, _ = load_data(DataConfig(root=str(root)))
    with pytest.raises(DataError, match="'lonely'.*data.val_split=0.8.*allow_empty_classes"):
        validation_split(train, 0.8, 0)
    kept, _ = validation_split(train, 0.8, 0, allow_empty=True)
    assert 10 not in kept.labels.tolist()


def test_a_class_folder_whose_name_is_not_utf8_isrefused(tmp_path, capsys):
    root = write_photos(tmp_path / "photos", per_class=4)
    os.rename(root / "class3", os.path.join(os.fsencode(root), b"caf\xe9"))
    refused(capsys, _train(root, tmp_path / "run"), "caf\\xe9", "UTF-8")
    assert not (tmp_path / "run").exists()


# --- Bad images no epoch draws, and what was read --------------------------------------------

def test_a_bad_image_no_epoch_draws_still_stops_the_run(tmp_path, capsys):
    """Streamed files: 50 training images in batches of 16 leave 2 undrawn; one is corrupt."""
    root = tmp_path / "photos"
    write_photos(root / "train", per_class=5)
    write_photos(root / "test", per_class=2, seed=1)
    train, _, _ = load_data(DataConfig(root=str(root)))
    undrawn = train.items[int(epoch_permutation(len(train), 0, 1)[-1])]
    undrawn.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    err = refused(capsys, _train(root, tmp_path / "run", "data.placement=stream"),
                   f"{undrawn}: cannot decode image", "data.skip_bad_images=true")
    assert "skipping" not in err


def test_the_loader_counts_the_images_it_read(tmp_path):
    """data.skip_bad_images=true: what train_acc and model.json's train_images divide by."""
    root = write_photos(tmp_path / "photos", per_class=4)
    train, _, _ = load_data(DataConfig(root=str(root)))  # 30 training images
    bad = sorted({int(i) for i in epoch_permutation(len(train), 0, 1)[:16]})[:2]
    for i in bad:
        train.items[i].write_bytes(b"junk")
    from finetune.data.images import eval_transform

    batches = TrainBatches(train, eval_transform(16, 1.0, "bilinear"), 16, 16, 16, seed=0,
                           rank=0, world_size=1, skip_bad=True)
    loader = TrainLoader(train, "stream", 16, 0, 0, 1, torch.device("cpu"), 0, batches)
    images = sum(len(x) for x, _ in loader.epoch(1))
    assert (images, loader.read, loader.bad) == (14, 14, 2)
    assert loader.bad_items == set(bad)


# --- Empty splits, unlearnable streamed classes, internal columns, predict's files -----------

@pytest.mark.parametrize("streaming", [False, True])
def test_an_empty_train_split_says_so(tmp_path, capsys, streaming):
    root = _hf(tmp_path / "hf", train=0)
    argv = (_stream(root, tmp_path / "run") if streaming
            else _train(root, tmp_path / "run", "data.source=hf"))
    line = refused(capsys, argv, "split 'train'", "no rows")
    assert "hub" not in line and "IndexError" not in line


def test_a_streamed_class_missing_from_training_isrefused(tmp_path, capsys):
    """A local dataset's labels are read without its images: the held path's check."""
    root = _hf(tmp_path / "hf", names=["a", "b", "c", "d"],
               label={("test", i): 3 for i in range(4)})
    refused(capsys, _stream(root, tmp_path / "run"), "'d'", "no training images",
             "4 in the test split", "data.allow_empty_classes=true")
    assert cli_main(_stream(root, tmp_path / "run", "data.allow_empty_classes=true")) == 0
    assert "'d' has no training images" in capsys.readouterr().err


def test_a_streamed_dataset_without_images_hides_the_row_column(tmp_path, capsys):
    import datasets

    features = datasets.Features({"pix": datasets.Value("int64"),
                                  "label": datasets.ClassLabel(names=NAMES)})
    split = datasets.Dataset.from_dict({"pix": list(range(8)), "label": [i % 3 for i in range(8)]},
                                       features=features)
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "hf"))
    line = refused(capsys, _stream(tmp_path / "hf", tmp_path / "run"), "no image column",
                    "pix (Value)", "data.image_column")
    assert "__finetune_row__" not in line


def test_streaming_with_a_placement_names_the_placement(tmp_path, capsys):
    root = _hf(tmp_path / "hf")
    line = refused(capsys, _stream(root, tmp_path / "run", "data.placement=device"),
                    "data.placement=device", "data.placement=stream")
    assert "val_split" not in line


def test_skipping_a_resident_bad_image_logs_no_advice_to_skip(tmp_path, capsys):
    root = write_photos(tmp_path / "photos", per_class=4)
    train, _, _ = load_data(DataConfig(root=str(root)))
    train.items[0].write_bytes(train.items[0].read_bytes()[:300])
    assert cli_main(_train(root, tmp_path / "run", "data.skip_bad_images=true",
                           "data.placement=host")) == 0
    err = capsys.readouterr().err
    assert f"{train.items[0]}" in err and "skipped 1 bad image" in err
    assert "or set data.skip_bad_images=true" not in err
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["bad_images"] == 1  # left out up front: no epoch draws it


def test_float_tiffs_are_read_as_0_to_255_and_nan_isrefused(tmp_path):
    from finetune.data.images import open_image

    for value, top, want in ((200.0, 255, 200), (0.5, 1, 128), (300.0, 300, 255)):
        a = np.full((8, 8), value, np.float32)
        a[0, 0] = top
        Image.fromarray(a, mode="F").save(tmp_path / "f.tif")
        assert np.asarray(open_image(tmp_path / "f.tif", 1))[4, 4] == want
    a = np.full((8, 8), 100.0, np.float32)
    a[2, 2] = np.nan
    Image.fromarray(a, mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(DataError, match=r"nan\.tif: 1 pixels are NaN") as e:
        open_image(tmp_path / "nan.tif", 3)
    assert "cannot decode" not in str(e.value)


def test_predict_does_not_offer_a_training_option_for_bad_files(tmp_path, capsys, tiny_args):
    from finetune.config import load_config
    from finetune.train import main

    main(load_config(tiny_args + ["train.epochs=1", "train.batch_size=64"]))
    empty, text = tmp_path / "zero.png", tmp_path / "text.png"
    empty.write_bytes(b"")
    text.write_text("not a picture")
    for f in (empty, text):
        line = refused(capsys, ["predict", str(tmp_path / "run"), str(f)], str(f),
                        "cannot decode image")
        assert "skip_bad_images" not in line


@pytest.mark.parametrize("column", ["labels", "tags"])
@pytest.mark.parametrize("streaming", [False, True])
def test_a_list_valued_label_column_is_never_trained_per_combination(
        tmp_path, capsys, column, streaming):
    """Sequence(ClassLabel) holds several tags per image: trained as single-label, it became
    a class per combination of tags, silently. Streamed, or with data.task=single, it is
    refused (held, data.task=auto trains it multi-label: test_multilabel)."""
    import datasets

    tags = ["beach", "dog", "sunset", "car"]
    features = datasets.Features({"img": datasets.Image(),
                                  column: datasets.Sequence(datasets.ClassLabel(names=tags))})
    rows = {"img": [{"bytes": _png(i % 3), "path": None} for i in range(24)],
            column: [[i % 4, (i + 1) % 4][: 1 + i % 2] for i in range(24)]}
    split = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "hf"))
    if streaming:
        refused(capsys, _stream(tmp_path / "hf", tmp_path / "run"), f"label column '{column}'",
                "multi-label", "data.streaming=false")
    else:
        refused(capsys, _train(tmp_path / "hf", tmp_path / "run", "data.source=hf",
                               "data.task=single"), "data.task=single", "multi-label")
