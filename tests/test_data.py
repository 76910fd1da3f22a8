import numpy as np
import pytest
import torch
from conftest import make_images
from PIL import Image

from finetune.config import DataConfig
from finetune.data import DataError, load_data
from finetune.data.images import eval_transform
from finetune.data.loader import (
    BatchTransform,
    index_loader,
    match_channels,
    random_crop,
    train_batches,
)
from finetune.data.samples import preload
from finetune.data.sources import load_imagefolder, stratified_mask


def test_idx_source_from_root_with_limits(fmnist_dir):
    train, test, source = load_data(DataConfig(root=str(fmnist_dir), train_limit=40,
                                               eval_limit=7))
    assert source == f"idx:{fmnist_dir}"
    assert (len(train), len(test)) == (40, 7)
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (1, 28, 28)


def test_missing_root_is_clear(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        load_data(DataConfig(root=str(tmp_path / "nope")))
    with pytest.raises(DataError, match="no IDX files"):
        load_data(DataConfig(root=str(tmp_path), source="idx"))


def _fake_hf(monkeypatch, n_train=12, n_test=5):
    import datasets

    names = ["T - shirt / top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
             "Sneaker", "Bag", "Ankle boot"]
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=names)})

    def split(n, seed):
        images, labels = make_images(n, seed)
        return datasets.Dataset.from_dict(
            {"image": [Image.fromarray(im) for im in images], "label": labels.tolist()},
            features=features), images, labels

    train, train_images, train_labels = split(n_train, 0)
    test, _, _ = split(n_test, 1)
    calls = []

    def load_dataset(name, *args, **kwargs):
        calls.append(name)
        return datasets.DatasetDict({"train": train, "test": test})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return names, train_images, train_labels, calls


def test_hf_source_in_memory(monkeypatch):
    names, images, labels, calls = _fake_hf(monkeypatch)
    train, test, source = load_data(DataConfig(source="hf"))
    assert calls == ["zalando-datasets/fashion_mnist"] and source.startswith("hf:")
    assert train.classes == names  # class names come from the source
    assert train.channels == 1 and len(train) == 12 and len(test) == 5  # read row by row
    decoded, decoded_labels, _ = preload(train, 28)
    np.testing.assert_array_equal(decoded[:, 0].numpy(), images)
    np.testing.assert_array_equal(decoded_labels.numpy(), labels)


def test_auto_falls_back_to_hf_when_no_local_copy(monkeypatch, tmp_path):
    import finetune.data as data

    monkeypatch.setattr(data, "DEFAULT_IDX_DIRS", [tmp_path / "absent"])
    _, _, _, calls = _fake_hf(monkeypatch)
    _, _, source = load_data(DataConfig())
    assert calls and source == "hf:zalando-datasets/fashion_mnist"


def test_auto_without_any_source_says_where_it_looked(monkeypatch, tmp_path):
    import datasets

    import finetune.data as data

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(data, "DEFAULT_IDX_DIRS", [tmp_path / "absent"])
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as e:
        load_data(DataConfig())
    msg = str(e.value)
    assert str(tmp_path / "absent") in msg and "apt-get install dataset-fashion-mnist" in msg
    assert "data.root=PATH" in msg and "ConnectionError" in msg


def _png_tree(root, classes, per_class, size=(20, 14), mode="L"):
    for k, cls in enumerate(classes):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            value = 25 * k + i
            Image.new(mode, size, color=value if mode == "L" else (value, 0, 255 - value)) \
                .save(root / cls / f"{i}.png")


def test_imagefolder_train_test_split(tmp_path):
    _png_tree(tmp_path / "train", ["ant", "bee", "cat"], 4)
    _png_tree(tmp_path / "test", ["ant", "bee", "cat"], 2)
    train, test, source = load_data(DataConfig(root=str(tmp_path), image_size=16))
    assert source.startswith("imagefolder:") and train.classes == ["ant", "bee", "cat"]
    assert train.channels == 1 and len(train) == 12 and len(test) == 6  # grey PNGs: 1 channel
    images, labels, bad = preload(train, 16)
    assert images.shape == (12, 1, 16, 16) and bad == []
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert int(images[5, 0, 8, 8]) == 26  # bee/1.png is a flat 26 after resizing


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_preloaded_images_equal_the_per_image_transform_at_and_off_the_size(tmp_path, mode):
    """Files already at the size skip resize and crop (both would return them as they are):
    the decoded pixels, channel order included, equal the transform's, as do those resized."""
    rng = np.random.default_rng(0)
    for k, (height, width) in enumerate([(12, 12), (12, 12), (12, 15), (20, 23)]):
        shape = (height, width) + ((3,) if mode == "RGB" else ())
        image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
        for split in ("train", "test"):
            (tmp_path / split / f"c{k}").mkdir(parents=True)
            image.save(tmp_path / split / f"c{k}" / "0.png")
    samples = load_imagefolder(tmp_path)[0]
    images, _, _ = preload(samples, 12)
    transform = eval_transform(12, 1.0, "bilinear")
    expected = torch.stack([transform(samples.open(i, 12)) for i in range(len(samples))])
    assert images.shape == (4, 3 if mode == "RGB" else 1, 12, 12)
    assert torch.equal(images, expected)


def test_imagefolder_single_tree_rgb_is_held_out_per_class(tmp_path):
    _png_tree(tmp_path, ["a", "b"], 10, mode="RGB")
    train, test = load_imagefolder(tmp_path)
    assert preload(train, 8)[0].shape == (18, 3, 8, 8)
    assert preload(test, 8)[0].shape == (2, 3, 8, 8)
    assert sorted(test.labels.tolist()) == [0, 1]


def test_imagefolder_bad_inputs(tmp_path):
    _png_tree(tmp_path / "t", ["a"], 1)
    (tmp_path / "t" / "empty").mkdir()
    with pytest.raises(DataError, match="class folder 'empty' holds no images"):
        load_imagefolder(tmp_path / "t")
    (tmp_path / "t" / "empty" / "x.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="x.png: cannot decode image"):
        for split in load_imagefolder(tmp_path / "t"):  # found when decoded, not when listed
            preload(split, 8)
    (tmp_path / "t" / "empty" / "x.png").unlink()
    (tmp_path / "t" / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="notes.txt: not an image file"):
        load_imagefolder(tmp_path / "t")


def test_transform_resizes_and_normalizes():
    images = torch.full((3, 1, 28, 28), 51, dtype=torch.uint8)  # 51/255 = 0.2
    out = BatchTransform(64, 1, mean=(0.1,), std=(0.5,))(images)
    assert out.shape == (3, 1, 64, 64) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full_like(out, (0.2 - 0.1) / 0.5))
    rgb = BatchTransform(32, 3, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))(images)
    assert rgb.shape == (3, 3, 32, 32)


def test_match_channels_rgb_to_grey_uses_luma():
    x = torch.zeros(1, 3, 2, 2)
    x[:, 1] = 1.0
    torch.testing.assert_close(match_channels(x, 1), torch.full((1, 1, 2, 2), 0.587))


def test_random_crop_translates_each_image_by_up_to_pad_pixels():
    n = 300
    x = torch.arange(1, 1 + n * 2 * 5 * 5, dtype=torch.float32).reshape(n, 2, 5, 5)  # no zeros
    gen = torch.Generator().manual_seed(0)
    torch.testing.assert_close(random_crop(x, 0, gen), x)
    out = random_crop(x, 1, gen)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    shifts = [(dy, dx) for dy in range(3) for dx in range(3)]
    used = []
    for i in range(n):  # each output is exactly one window of the zero-padded input
        (hit,) = [s for s in shifts if torch.equal(out[i], padded[i, :, s[0]:s[0] + 5,
                                                                   s[1]:s[1] + 5])]
        used.append(hit)
    # All nine offsets occur, each about 1/9 of the time; most images moved.
    counts = [used.count(s) for s in shifts]
    assert min(counts) > n / 9 / 2 and used.count((1, 1)) < n / 4


def test_hflip_mirrors_about_half_of_the_images():
    n = 400
    imgs = torch.randint(0, 256, (n, 1, 6, 6), dtype=torch.uint8, generator=torch.Generator()
                         .manual_seed(0))
    t = BatchTransform(6, 1, (0.0,), (1.0,), hflip=True)
    plain = t(imgs)
    flipped = t(imgs, train=True, gen=torch.Generator().manual_seed(1))
    mirrored = [torch.equal(flipped[i], plain[i].flip(-1)) for i in range(n)]
    kept = [torch.equal(flipped[i], plain[i]) for i in range(n)]
    assert all(m != k for m, k in zip(mirrored, kept, strict=True))  # one or the other
    assert 0.4 < sum(mirrored) / n < 0.6
    assert torch.equal(t(imgs, train=False, gen=torch.Generator()), plain)  # eval: no flip


def test_train_batches_shard_one_permutation():
    world = [list(train_batches(50, 8, epoch=3, seed=1, rank=r, world_size=2,
                                device=torch.device("cpu"))) for r in range(2)]
    assert len(world[0]) == len(world[1]) == 50 // 8
    seen = torch.cat([torch.cat(world[0]), torch.cat(world[1])])
    assert len(seen) == 48 and len(set(seen.tolist())) == 48  # disjoint, no repeats
    single = torch.cat(list(train_batches(50, 8, 3, 1, 0, 1, torch.device("cpu"))))
    # Global batch k is rank 0's slice followed by rank 1's slice of the same permutation.
    assert torch.equal(single[:8], torch.cat([world[0][0], world[1][0]]))
    other_epoch = torch.cat(list(train_batches(50, 8, 4, 1, 0, 1, torch.device("cpu"))))
    assert not torch.equal(single, other_epoch)


def test_index_loader_covers_every_sample_once():
    batches = list(index_loader(45, 20))
    assert [len(b) for b in batches] == [20, 20, 5]
    assert torch.cat(batches).tolist() == list(range(45))


def test_datasets_is_imported_only_when_used():
    import subprocess
    import sys

    code = ("import sys, finetune.cli, finetune.train, finetune.data; "
            "assert 'datasets' not in sys.modules, 'datasets imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_class_subset_relabels_in_the_given_order(fmnist_dir):
    full_train, full_test, _ = load_data(DataConfig(root=str(fmnist_dir)))
    train, test, _ = load_data(DataConfig(root=str(fmnist_dir), classes=["7", "T-shirt/top"],
                                          train_limit=15))
    assert train.classes == ["Sneaker", "T-shirt/top"]
    # Class 7 becomes 0 and class 0 becomes 1; the limit then takes the same share of each
    # (drawn with data.split_seed), in the full split's order.
    keep = (full_train.labels == 7) | (full_train.labels == 0)
    relabelled = torch.where(full_train.labels[keep] == 7, 0, 1)
    drawn = stratified_mask(relabelled, 2, 15, seed=0)
    assert torch.equal(train.labels, relabelled[drawn]) and len(train) == 15
    assert torch.equal(train.images, full_train.images[keep][drawn])
    assert sorted(torch.bincount(train.labels).tolist()) == [7, 8]
    assert len(test) == int(((full_test.labels == 7) | (full_test.labels == 0)).sum())
    with pytest.raises(DataError, match="'Boots' is neither a class.*0=T-shirt/top"):
        load_data(DataConfig(root=str(fmnist_dir), classes=["Boots"]))
    with pytest.raises(DataError, match="twice"):
        load_data(DataConfig(root=str(fmnist_dir), classes=["0", "T-shirt/top"]))
    with pytest.raises(DataError, match="index below 10"):
        load_data(DataConfig(root=str(fmnist_dir), classes=["10"]))
