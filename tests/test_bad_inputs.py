"""Bad input, case by case: exit status 2, one ``error:`` line naming the file or key, no
traceback, nothing written (docs/errors.md lists the messages)."""

import json
import struct

import numpy as np
import pytest
import torch
from conftest import refused, write_fake_fmnist, write_idx
from PIL import Image

from finetune.cli import main as cli_main
from finetune.config import load_config
from finetune.data.samples import preload
from finetune.data.sources import load_imagefolder
from finetune.train import main


def _train(tmp_path, data, *extra) -> list[str]:
    return ["train", "recipe=resnet18_scratch_fmnist", f"data.root={data}", "data.image_size=16",
            "train.epochs=1", "train.batch_size=16", "train.checkpoint=false",
            f"output_dir={tmp_path / 'run'}", *extra]


def _write_raw_idx(path, array: np.ndarray, code: int) -> None:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    path.write_bytes(header + array.astype(array.dtype.newbyteorder(">")).tobytes())


@pytest.mark.parametrize("split, what, array, code, needle", [
    ("t10k", "labels", np.array([0, 1, -1] + [2] * 50, np.int8), 0x09, "labels include -1"),
    ("train", "labels", np.arange(96, dtype=np.float32) % 10, 0x0D, "labels are >f4"),
    ("train", "images", np.zeros((96, 28, 28), np.float32), 0x0D, "images are >f4"),
])
def test_idx_files_of_the_wrong_kind(tmp_path, capsys, split, what, array, code, needle):
    data = write_fake_fmnist(tmp_path / "d", gz=False)
    stem = f"{split}-{what}-idx{3 if what == 'images' else 1}-ubyte"
    _write_raw_idx(data / stem, array, code)
    refused(capsys, _train(tmp_path, data), str(data), needle)
    assert not (tmp_path / "run").exists()


def test_one_class_and_duplicate_class_names(tmp_path, capsys):
    data = write_fake_fmnist(tmp_path / "d")
    (data / "classes.txt").write_text("a\nb\nc\nd\ne\nf\ng\nh\ni\na\n")
    refused(capsys, _train(tmp_path, data), "at least two classes with distinct names")
    (data / "classes.txt").unlink()
    refused(capsys, _train(tmp_path, data, "data.classes=[Trouser]"),
             "at least two classes", "'Trouser'")


def test_sixteen_bit_and_animated_images_are_read_right(tmp_path):
    for cls, value in (("dark", 1000), ("light", 60000)):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(np.full((8, 8), value, np.uint16)).save(tmp_path / cls / f"{i}.png")
    frames = [Image.new("L", (8, 8), 200), Image.new("L", (8, 8), 10)]
    frames[0].save(tmp_path / "light" / "anim.gif", save_all=True, append_images=frames[1:])
    train, test = load_imagefolder(tmp_path)
    (a, la, _), (b, lb, _) = preload(train, 8), preload(test, 8)
    data = {c: torch.cat([a[la == k], b[lb == k]]) for k, c in enumerate(train.classes)}
    assert a.dtype == torch.uint8 and train.channels == 1
    assert (data["dark"] == round(1000 / 257)).all()  # 4, not 255
    light = sorted(int(x.float().mean()) for x in data["light"])
    assert light == [200, 233, 233, 233]  # the GIF's first frame; 60000 / 257 = 233.5


def test_predict_refuses_bombs_and_bad_top_k(tmp_path, capsys, tiny_args):
    main(load_config(tiny_args + ["train.epochs=1"]))
    run = tmp_path / "run"
    big = tmp_path / "big.png"
    Image.new("L", (14_000, 14_000)).save(big)  # over twice PIL's limit: an error
    refused(capsys, ["predict", str(run), str(big)], str(big), "Downscale")
    assert cli_main(["predict", str(run), str(big), "--top-k", "-1"]) == 2
    assert "--top-k: must be a positive integer, got -1" in capsys.readouterr().err
    grey16 = tmp_path / "g16.png"
    Image.fromarray(np.full((28, 28), 51400, np.uint16)).save(grey16)
    from finetune.inference import load

    predictor = load(run)
    with Image.open(grey16) as im:
        assert predictor.to_uint8(im).unique().tolist() == [200]  # 51400 / 257


@pytest.mark.parametrize("text, needle", [
    ("train:\n  epochs: [3\n", "is not valid YAML"),
    ("train:\n\tepochs: 3\n", "is not valid YAML"),
    ("train:\n  epochs: 3\n  epochs: 4\n", "is not valid YAML"),
    ("- train\n- data\n", "must be a mapping of keys"),
])
def test_recipe_files_that_are_not_a_mapping(tmp_path, capsys, text, needle):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    refused(capsys, ["show", f"recipe={recipe}"], str(recipe), needle)


@pytest.mark.parametrize("arg, needle", [
    ("train.lr=nan", "'train.lr' must be a finite number, got nan"),
    ("train.lr=inf", "'train.lr' must be a finite number, got inf"),
    ("finetune.layer_decay=inf", "'finetune.layer_decay' must be a finite number"),
    ("data.image_size=20000", "'data.image_size' is at most 4096, got 20000"),
])
def test_values_checked_before_any_work(tmp_path, capsys, arg, needle):
    refused(capsys, _train(tmp_path, tmp_path / "nowhere", arg), needle)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage, needle", [
    (lambda m: "{not json", "is not JSON"),
    (lambda m: json.dumps([1, 2]), "holds no JSON object"),
    (lambda m: json.dumps({**m, "architecture": "resnet999"}), "cannot build: unknown model"),
    (lambda m: json.dumps({**m, "class_names": m["class_names"][:3]}),
     "'class_names' must be a list of 10 distinct names"),
])
def test_a_damaged_model_json(tmp_path, capsys, tiny_args, damage, needle):
    main(load_config(tiny_args + ["train.epochs=1"]))
    meta_file = tmp_path / "run" / "model.json"
    meta_file.write_text(damage(json.loads(meta_file.read_text())))
    refused(capsys, ["evaluate", str(tmp_path / "run")], "model.json", needle)
    img = tmp_path / "x.png"
    Image.new("L", (28, 28)).save(img)
    refused(capsys, ["predict", str(tmp_path / "run"), str(img)], "model.json", needle)


def test_write_idx_helper_is_what_the_reader_reads(tmp_path):
    # (the fixtures above write raw IDX files by hand; the shared helper stays the reference)
    path = write_idx(tmp_path / "x", np.arange(6, dtype=np.uint8).reshape(2, 3), gz=False)
    from finetune.data.idx import read_idx

    assert read_idx(path).tolist() == [[0, 1, 2], [3, 4, 5]]
