"""Photos of any size: the streaming path, the standard transforms, stratified limits, Hugging
Face datasets with images of mixed sizes, bad images, preprocessing that travels with the model."""

import json
import logging
import re

import numpy as np
import pytest
import torch
from conftest import (
    CLASSES,
    HOOKS,
    launch_two_cpu_processes,
    photo,
    resumes_identically,
    untimed_metrics,
    write_photos,
)
from PIL import Image

from finetune.cli import main as cli_main
from finetune.config import DataConfig, load_config
from finetune.data import DataError, Samples, load_data
from finetune.data.images import eval_transform, open_image
from finetune.data.samples import preload
from finetune.data.stream import TrainBatches
from finetune.evaluation import evaluate_run
from finetune.inference import load
from finetune.train import main


@pytest.fixture
def photos(tmp_path):
    return write_photos(tmp_path / "photos")


def _args(root, out, *extra):
    return ["recipe=resnet18_scratch_fmnist", f"data.root={root}", "data.image_size=16",
            "train.epochs=1", "train.batch_size=16", "train.eval_batch_size=12", "train.lr=0.01",
            "train.checkpoint=false", "data.workers=0", f"output_dir={out}", *extra]


def test_train_limit_takes_every_class_of_a_class_sorted_folder(tmp_path):
    root = write_photos(tmp_path / "p", per_class=40)
    train, test, _ = load_data(DataConfig(root=str(root), train_limit=300))
    counts = torch.bincount(train.labels, minlength=CLASSES).tolist()
    assert sum(counts) == 300 and all(29 <= c <= 31 for c in counts), counts
    # Drawn with data.split_seed, not in folder order, and the same draw every time.
    again, _, _ = load_data(DataConfig(root=str(root), train_limit=300))
    assert again.items == train.items
    other, _, _ = load_data(DataConfig(root=str(root), train_limit=300, split_seed=1))
    assert other.items != train.items


def test_eval_transform_resizes_the_shorter_side_and_crops_the_center():
    """Not squashed: a 2:1 image whose outer quarters are black keeps only its white middle."""
    a = np.zeros((100, 200), np.uint8)
    a[:, 50:150] = 255
    out = eval_transform(32, 1.0, "bilinear")(Image.fromarray(a))
    assert out.shape == (1, 32, 32) and out.dtype == torch.uint8
    assert int(out.min()) > 200  # squashed, a quarter of each side would be black
    # crop_pct 0.5: the shorter side goes to 64 first, the center 32 of it is kept.
    b = np.zeros((100, 100), np.uint8)
    b[25:75, 25:75] = 255
    assert int(eval_transform(32, 0.5, "bilinear")(Image.fromarray(b)).min()) > 150


def test_jpeg_draft_decoding_keeps_what_the_pipeline_needs(tmp_path):
    big = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1200, 1600, 3), np.uint8)
                    ).save(big)
    assert open_image(big, 3).size == (1600, 1200)
    assert open_image(big, 3, need=140).size == (200, 150)  # 1/8: the shorter side >= 140
    assert open_image(big, 1, need=300).size == (400, 300)  # 1/4
    assert open_image(big, 1, need=301).size == (800, 600)  # 1/4 would be too small
    assert open_image(big, 1).mode == "L"


def test_streamed_batches_do_not_depend_on_workers(photos):
    """A batch's pixels are fixed by (seed, epoch, step, rank): any worker, any count."""
    train, _, _ = load_data(DataConfig(root=str(photos)))
    from finetune.data.images import train_transform

    make = lambda: TrainBatches(train, train_transform(16, (0.08, 1.0), (0.75, 4 / 3),  # noqa
                                                       "bilinear", True, "trivial"),
                                16, 57, 8, seed=3, rank=0, world_size=1, skip_bad=False)
    a, b = make(), make()
    x1, y1, bad = a[(2, 5)]
    a[(1, 0)]  # another epoch in between
    x2, y2, _ = b[(2, 5)]
    assert bad == () and x1.shape == (8, 3, 16, 16) and x1.dtype == torch.uint8
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, a[(2, 6)][0])
    state = torch.get_rng_state()
    a[(3, 0)]
    assert torch.equal(state, torch.get_rng_state())  # the caller's stream is untouched


def test_placement_auto_streams_large_photos_and_says_why(photos, tmp_path, caplog,
                                                          monkeypatch):
    import finetune.data.loader as loader

    monkeypatch.setattr(loader, "PRELOAD_LIMIT", 10_000)  # bytes: these photos are "large"
    with caplog.at_level(logging.INFO, logger="finetune"):
        result = main(load_config(_args(photos, tmp_path / "run", "data.hflip=true")))
    assert "data streamed from its files or rows" in caplog.text
    assert "above the" in caplog.text
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["crop_pct"] == 0.875 and meta["resize"] == 18  # floor(16 / 0.875)
    assert untimed_metrics(tmp_path / "run")[0]["placement"] == "stream"
    # Preprocessing travels with the model: `finetune evaluate` (and predict) rebuild the
    # evaluation transform from model.json and reproduce training's test accuracy exactly.
    again = evaluate_run(tmp_path / "run", [])
    assert again["confusion"] == result["confusion"]
    predictor = load(tmp_path / "run")
    _, test, _ = load_data(DataConfig(root=str(photos)))
    preds = [max(p, key=lambda cp: cp[1])[0] for p in
             predictor.predict([test.items[i] for i in range(len(test))], top_k=1)]
    matrix = np.zeros((CLASSES, CLASSES), int)
    for label, pred in zip(test.labels.tolist(), preds, strict=True):
        matrix[label, predictor.class_names.index(pred)] += 1
    assert matrix.tolist() == result["confusion"]
    timm_cfg = json.loads((tmp_path / "run" / "config.json").read_text())["pretrained_cfg"]
    assert timm_cfg["crop_pct"] == 0.875 and timm_cfg["input_size"] == [3, 16, 16]


def test_resident_data_forced_to_stream_is_evaluated_as_trained(fmnist_dir, tmp_path):
    """Fashion-MNIST streamed (RandomResizedCrop; evaluation: resize to 18, center 16):
    `finetune evaluate` reads it the same way, not as resident batches."""
    result = main(load_config(_args(fmnist_dir, tmp_path / "run", "data.placement=stream")))
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert (meta["crop_pct"], meta["resample"]) == (0.875, "image")
    assert evaluate_run(tmp_path / "run", [])["confusion"] == result["confusion"]


def test_resident_folder_photos_are_resized_and_cropped_not_squashed(photos, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="finetune"):
        main(load_config(_args(photos, tmp_path / "run")))
    assert "data resident on the device" in caplog.text
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["crop_pct"] == 1.0 and meta["resize"] == 16
    train, _, _ = load_data(DataConfig(root=str(photos)))
    images, labels, bad = preload(train, 16)
    first = open_image(train.items[0], 3, need=16)
    assert torch.equal(images[0], eval_transform(16, 1.0, "bilinear")(first)) and bad == []


def test_a_bad_image_stops_the_run_or_is_skipped_and_counted(tmp_path, capsys):
    root = tmp_path / "photos"
    write_photos(root / "train")
    write_photos(root / "test", per_class=2, seed=1)
    bad_test, bad_train = root / "test" / "class3" / "x.jpg", root / "train" / "class5" / "x.jpg"
    for bad in (bad_test, bad_train):
        bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    # Decoded in 2 workers: the error still reaches the user as one line naming the file.
    args = _args(root, tmp_path / "run", "data.placement=stream", "train.epochs=2",
                 "data.workers=2")
    assert cli_main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert "x.jpg: cannot decode image" in err and "data.skip_bad_images=true" in err
    assert "Traceback" not in err and "Caught" not in err
    assert not (tmp_path / "run" / "model.safetensors").exists()
    assert cli_main(["train", *args, "data.skip_bad_images=true", "overwrite=true"]) == 0
    records = untimed_metrics(tmp_path / "run")
    assert [(r["test_skipped"], r["test_total"]) for r in records] == [(1, 20)] * 2
    # The bad training image counts in the epochs whose full batches reach it.
    from finetune.data.stream import epoch_permutation

    train, _, _ = load_data(DataConfig(root=str(root)))
    at = train.items.index(bad_train)
    steps = len(train) // 16
    expected = [int(int((epoch_permutation(len(train), 0, e) == at).nonzero()) < steps * 16)
                for e in (1, 2)]
    assert [r["bad_images"] for r in records] == expected


def _hf_dataset(root, sizes_seed: int = 0, with_test: bool = True, test_label: int | None = None):
    """A Hugging Face DatasetDict of PIL images of mixed sizes and modes, saved to disk
    (``test_label``: every test row's label, e.g. -1 for an unlabelled split)."""
    import datasets

    rng = np.random.default_rng(sizes_seed)
    features = datasets.Features({"img": datasets.Image(),
                                  "fine_label": datasets.ClassLabel(
                                      names=[f"k{k}" for k in range(CLASSES)]),
                                  "note": datasets.Value("string")})

    def split(n, label=None):
        labels = [i % CLASSES if label is None else label for i in range(n)]
        return datasets.Dataset.from_dict(
            {"img": [photo(k, rng, grey=i % 5 == 0) for i, k in enumerate(labels)],
             "fine_label": labels, "note": ["x"] * n}, features=features)

    splits = {"train": split(80)}
    if with_test:
        splits["test"] = split(23, test_label)
    datasets.DatasetDict(splits).save_to_disk(str(root))
    return root


@pytest.mark.parametrize("placement", ["auto", "stream"])
def test_a_hugging_face_dataset_of_mixed_sizes_trains(tmp_path, placement):
    root = _hf_dataset(tmp_path / "hf")
    train, test, source = load_data(DataConfig(source="hf", root=str(root)))
    assert isinstance(train, Samples) and (len(train), len(test)) == (80, 23)
    assert train.channels == 3 and train.classes[0] == "k0"  # columns found by feature type
    assert source.startswith("hf-disk:")
    result = main(load_config(_args(root, tmp_path / "run", "data.source=hf",
                                    f"data.placement={placement}")))
    assert result["test_total"] == 23
    records = untimed_metrics(tmp_path / "run")
    assert records[-1]["placement"] == ("device" if placement == "auto" else "stream")


def test_hugging_face_splits_columns_and_holdout(tmp_path):
    root = _hf_dataset(tmp_path / "hf", with_test=False)
    train, test, source = load_data(DataConfig(source="hf", root=str(root)))
    assert (len(train), len(test)) == (70, 10)  # a seeded tenth (one) of each class held out
    sliced, _, _ = load_data(DataConfig(source="hf", root=str(root), train_split="train[:50%]",
                                        test_split="train[50%:]"))
    assert len(sliced) == 40
    with pytest.raises(DataError, match="no label column 'nope'.*fine_label \\(ClassLabel\\)"):
        load_data(DataConfig(source="hf", root=str(root), label_column="nope"))
    with pytest.raises(DataError, match="column 'note' is Value, not an Image feature"):
        load_data(DataConfig(source="hf", root=str(root), image_column="note"))
    with pytest.raises(DataError, match="split 'validation' is not one of \\['train'\\]"):
        load_data(DataConfig(source="hf", root=str(root), test_split="validation"))
    unlabelled = _hf_dataset(tmp_path / "unlabelled", test_label=-1)
    with pytest.raises(DataError, match="rows without a label \\(-1\\).*data.test_split"):
        load_data(DataConfig(source="hf", root=str(unlabelled)))


@pytest.mark.slow
def test_two_processes_stream_their_own_share_and_evaluate_like_one(photos, tmp_path):
    """2 processes on the streaming path: each trains on its half of every global batch, and
    evaluating the exported model with 2 processes (20 test images in batches of 12: padded
    shards) gives the
    1-process confusion matrix exactly."""
    record = tmp_path / "record"
    record.mkdir()
    run = tmp_path / "run"
    launch_two_cpu_processes(HOOKS, "train", *_args(photos, run, "data.placement=stream",
                                                    "train.mixed_precision=fp32"),
                             env={"FT_RECORD_BATCHES": str(record)})
    (mine,), (theirs,) = (torch.load(record / f"rank{r}.pt") for r in (0, 1))
    assert len(mine) == len(theirs) == 180 // 16
    for a, b in zip(mine, theirs, strict=True):
        assert len(a) == len(b) == 8 and not set(a.tolist()) & set(b.tolist())
    one = evaluate_run(run, [])
    out = launch_two_cpu_processes(HOOKS, "evaluate", str(run))
    assert f"test accuracy {one['test_acc']:.4f} ({one['test_correct']}/20)" in out
    two = json.loads((run / "evaluation.json").read_text())
    assert two["confusion"] == one["confusion"]
    # A Hugging Face stream: each process reads its every second row; the 23 test rows are
    # counted once in all.
    hf = _hf_dataset(tmp_path / "hf")
    out = launch_two_cpu_processes(HOOKS, "train", *_args(hf, tmp_path / "hf-run",
                                                          "data.source=hf",
                                                          "data.streaming=true",
                                                          "data.test_split=test"))
    assert re.search(r"test accuracy \d\.\d{4} \(\d+/23\)", out), out[-2000:]


def test_a_hugging_face_stream_trains_and_resumes_exactly(tmp_path):
    """data.streaming=true: the splits are iterated (2 workers, a seeded shuffle buffer), every
    test row counted once, and a run resumed mid-epoch ends bit-identical."""
    root = _hf_dataset(tmp_path / "hf")
    run = tmp_path / "run"
    args = _args(root, run, "data.source=hf", "data.streaming=true", "data.test_split=test",
                 "train.epochs=2", "train.checkpoint=true", "train.checkpoint_every=2",
                 "train.keep_checkpoints=10", "train.mixed_precision=fp32", "data.workers=2",
                 "data.shuffle_buffer=16", "data.hflip=true", "data.auto_augment=trivial")
    result = main(load_config(args))  # 80 rows: 5 steps of 16 per epoch
    assert result["test_total"] == 23
    assert evaluate_run(run, [])["confusion"] == result["confusion"]  # read as trained
    assert [r["placement"] for r in untimed_metrics(run)] == ["stream", "stream"]  # 2 epochs
    resumes_identically(args, run, "epoch0002-step000002")


def test_a_stream_needs_a_test_split_and_known_sizes(tmp_path):
    root = _hf_dataset(tmp_path / "hf", with_test=False)
    with pytest.raises(DataError, match="needs data.test_split=NAME"):
        load_data(DataConfig(source="hf", root=str(root), streaming=True))
    train, test, _ = load_data(DataConfig(source="hf", root=str(root), streaming=True,
                                          test_split="train[:10]", train_limit=30))
    assert (len(train), len(test), train.classes[2]) == (30, 10, "k2")
    with pytest.raises(DataError, match="cannot select classes of a stream"):
        load_data(DataConfig(source="hf", root=str(root), streaming=True, test_split="train",
                             classes=["k1", "k2"]))


def test_the_weights_own_preprocessing_is_the_default(caplog):
    from torchvision.models import get_weight

    from finetune.assemble import preprocessing
    from finetune.models.backbones import timm_cfg, tv_cfg
    from finetune.models.pretrained import LoadedWeights

    tv = tv_cfg(get_weight("ResNet50_Weights.IMAGENET1K_V2"))
    assert (tv["crop_pct"], tv["interpolation"], tv["input_size"]) == (224 / 232, "bilinear",
                                                                       (3, 224, 224))
    timm = timm_cfg("resnet18.a1_in1k")
    assert (timm["crop_pct"], timm["interpolation"]) == (0.95, "bicubic")
    loaded = LoadedWeights("timm:timm/resnet18.a1_in1k", (0.5,), (0.5,), [],
                           {"crop_pct": 0.95, "interpolation": "bicubic"})
    d = DataConfig(image_size=224)
    assert preprocessing(d, loaded, "stream") == (0.95, "bicubic")
    assert preprocessing(d, None, "stream") == (0.875, "bilinear")
    assert preprocessing(d, loaded, "device") == (1.0, "bicubic")  # kept whole
    with caplog.at_level(logging.INFO, logger="finetune"):
        assert preprocessing(DataConfig(image_size=224, crop_pct=0.8), loaded, "stream") == (
            0.8, "bicubic")
    assert "data.crop_pct=0.8 overrides the pretrained weights' 0.95" in caplog.text


def test_hugging_face_parquet_files_and_the_imagefolder_builder(tmp_path, photos):
    import datasets

    saved = datasets.load_from_disk(str(_hf_dataset(tmp_path / "hf")))
    parquet = tmp_path / "parquet"
    parquet.mkdir()
    for split in ("train", "test"):
        saved[split].to_parquet(str(parquet / f"{split}-00000-of-00001.parquet"))
    train, test, source = load_data(DataConfig(source="hf", root=str(parquet)))
    assert (len(train), len(test), source) == (80, 23, f"hf-parquet:{parquet}")
    assert train.classes[3] == "k3"
    train, test, source = load_data(DataConfig(source="hf", hf_name="imagefolder",
                                               root=str(photos)))
    assert len(train) + len(test) == 200 and len(test) == 20  # a tenth of each class held out
    assert train.classes == [f"class{k}" for k in range(CLASSES)]


@pytest.mark.parametrize("override, needle", [
    ("data.crop_pct=1.5", "'data.crop_pct' must be in (0, 1], got 1.5."),
    ("data.scale=[0.5,0.1]", "'data.scale' is a range [min, max] with 0 < min <= max <= 1"),
    ("data.ratio=[2.0]", "'data.ratio' is a range [min, max]"),
    ("data.auto_augment=rand", "Valid values: none, trivial, randaugment, autoaugment"),
    ("data.interpolation=cubic", "Valid values: bilinear, bicubic, nearest, lanczos."),
    ("data.placement=everywhere", "Valid values: auto, device, host, stream."),
])
def test_bad_transform_settings_are_one_line_errors(override, needle):
    from finetune.config import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(["recipe=resnet18_scratch_fmnist", override])
    assert needle in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="cannot hold out data.val_split"):
        load_config(["data.streaming=true", "data.val_split=0.1"])
