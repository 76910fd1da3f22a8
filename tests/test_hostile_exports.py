"""Hostile exports and weights files (issue 28): every field of ``model.json`` (and timm's
``config.json``) checked when read, damaged or mislabelled weights files named with what they
hold. Each case through the CLI: exit status 2, one ``error:`` line naming the file and the
field, no traceback."""

import json
import math
import pickle
import struct

import pytest
import torch
from conftest import refused
from PIL import Image

from finetune.config import load_config
from finetune.train import main as train_main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One small finished run (ResNet-18 from scratch, 16 px, 1 epoch) to damage copies of."""
    from accelerate.state import AcceleratorState
    from conftest import write_fake_fmnist

    root = tmp_path_factory.mktemp("hostile")
    data = write_fake_fmnist(root / "fmnist")
    train_main(load_config([
        "recipe=resnet18_scratch_fmnist", f"data.root={data}", "data.image_size=16",
        "train.epochs=1", "train.batch_size=16", "train.checkpoint=false",
        f"output_dir={root / 'run'}"]))
    AcceleratorState._reset_state(reset_partial_state=True)
    return root / "run"



def _copy(run, tmp_path, skip: tuple[str, ...] = ()):
    """A copy of the run folder: links to its files but those in ``skip``."""
    out = tmp_path / "run"
    out.mkdir()
    for f in run.iterdir():
        if f.is_file() and f.name not in skip:
            (out / f.name).symlink_to(f)
    return out


def _image(tmp_path):
    img = tmp_path / "x.png"
    Image.new("L", (20, 20), 128).save(img)
    return str(img)


def _with_meta(run, tmp_path, text: str):
    out = _copy(run, tmp_path, skip=("model.json",))
    (out / "model.json").write_text(text)
    return out


NAN, INF = math.nan, math.inf


# --- model.json: every field, through predict and evaluate -----------------------------------

@pytest.mark.parametrize("field, value, needle", [
    ("architecture", 7, "a model name"),
    ("architecture", "", "a model name"),
    ("in_chans", 0, "an integer from 1 to 64"),
    ("in_chans", "1", "an integer from 1 to 64"),
    ("in_chans", 100_000, "an integer from 1 to 64"),
    ("num_classes", "10", "an integer"),
    ("num_classes", 0, "an integer >= 1"),
    ("image_size", 1_000_000, "an integer from 1 to 4096"),
    ("image_size", -16, "an integer from 1 to 4096"),
    ("image_size", "16", "an integer from 1 to 4096"),
    ("image_size", 16.5, "an integer from 1 to 4096"),
    ("image_size", True, "an integer from 1 to 4096"),
    ("mean", [0.5, 0.5, 0.5], "1 number"),
    ("mean", [NAN], "1 number"),
    ("mean", "0.5", "1 number"),
    ("std", [0], "1 number"),
    ("std", [-0.3], "1 number"),
    ("std", [INF], "1 number"),
    ("std", [0.2, 0.2], "1 number"),
    ("class_names", "abcdefghij", "a list of 10 distinct names"),
    ("class_names", list(range(10)), "a list of 10 distinct names"),
    ("class_names", ["a"] * 10, "a list of 10 distinct names"),
    ("crop_pct", 0, "a number in (0, 1]"),
    ("crop_pct", 2.5, "a number in (0, 1]"),
    ("crop_pct", 1e-9, "a number in (0, 1]"),
    ("interpolation", "cubic", "one of"),
    ("norm", 3, "one of"),
    ("resample", "pixels", "one of"),
    ("augment", [True], "an object"),
    ("augment", {"hflip": "yes", "crop_pad": 0}, "'augment.hflip' must be true or false"),
    ("augment", {"hflip": False, "crop_pad": -4}, "'augment.crop_pad' must be an integer"),
])
@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_a_field_of_model_json(run, tmp_path, capsys, command, field, value, needle):
    meta = json.loads((run / "model.json").read_text())
    out = _with_meta(run, tmp_path, json.dumps({**meta, field: value}))
    argv = [command, str(out)] + ([_image(tmp_path)] if command == "predict" else [])
    refused(capsys, argv, str(out / "model.json"), f"'{field}", needle)


def test_num_classes_against_class_names(run, tmp_path, capsys):
    meta = json.loads((run / "model.json").read_text())
    out = _with_meta(run, tmp_path, json.dumps({**meta, "num_classes": 12}))
    refused(capsys, ["predict", str(out), _image(tmp_path)], str(out / "model.json"),
             "'class_names' must be a list of 12 distinct names", "(num_classes=12)")


@pytest.mark.parametrize("change, needle", [
    ({"architecture": "resnet34"}, "'architecture' does not fit the weights: 96 of its tensors"),
    ({"architecture": "alexnet"}, "in the weights are not among its tensors (e.g. bn1."),
    ({"in_chans": 3, "mean": [0.5] * 3, "std": [0.2] * 3},
     "'in_chans'=3 gives conv1.weight the shape (64, 3, 7, 7), the weights hold (64, 1, 7, 7)"),
    ({"num_classes": 3, "class_names": ["a", "b", "c"]},
     "'num_classes'=3 gives fc.weight the shape (3, 512), the weights hold (10, 512)"),
])
def test_model_json_that_does_not_fit_the_weights(run, tmp_path, capsys, change, needle):
    meta = json.loads((run / "model.json").read_text())
    out = _with_meta(run, tmp_path, json.dumps({**meta, **change}))
    refused(capsys, ["predict", str(out), _image(tmp_path)], str(out / "model.safetensors"),
             "does not match model.json", needle)


@pytest.mark.parametrize("text, needle", [
    ("{not json", "is not JSON"),
    ("[1, 2]", "holds no JSON object"),
    ("", "is not JSON"),
    ('{"architecture": "resnet18"}', "missing fields"),
])
def test_model_json_that_is_no_object(run, tmp_path, capsys, text, needle):
    out = _with_meta(run, tmp_path, text)
    refused(capsys, ["predict", str(out), _image(tmp_path)], str(out / "model.json"), needle)


def test_model_json_that_is_not_text(run, tmp_path, capsys):
    out = _copy(run, tmp_path, skip=("model.json",))
    (out / "model.json").write_bytes(b'{"architecture": "\xff\xfe"}')
    refused(capsys, ["evaluate", str(out)], str(out / "model.json"), "is not JSON")


# --- an export's model.safetensors, damaged ------------------------------------------------------

def _state(run):
    from safetensors.torch import load_file

    return load_file(run / "model.safetensors")


@pytest.mark.parametrize("damage, needle", [
    (lambda run: b"", "it is empty"),
    (lambda run: (run / "model.safetensors").read_bytes()[:5], "truncated"),
    (lambda run: (run / "model.safetensors").read_bytes()[:300],
     "truncated: its header alone needs"),
    (lambda run: (run / "model.safetensors").read_bytes()[:-1000], "truncated: its tensors need"),
    (lambda run: bytes(range(256)) * 8, "no safetensors header: it starts with bytes 00 01"),
    (lambda run: b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all", "its header is not JSON"),
    (lambda run: _saved(_state(run)), "it is a zip archive as torch.save writes); the export"),
    (lambda run: _saved(_state(run), zip=False), "it is a pickle as torch.save writes); the"),
])
@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_a_damaged_export_weights_file(run, tmp_path, capsys, command, damage, needle):
    data = damage(run)
    out = _copy(run, tmp_path, skip=("model.safetensors",))
    (out / "model.safetensors").write_bytes(data)
    argv = [command, str(out)] + ([_image(tmp_path)] if command == "predict" else [])
    refused(capsys, argv, str(out / "model.safetensors"), needle)


def _saved(obj, zip: bool = True) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=zip)
    return buf.getvalue()


# --- model.weights=FILE: what it holds, said in one line ------------------------------------------

def _train(tmp_path, run, *extra) -> list[str]:
    data = load_config([f"recipe={run / 'config.yaml'}"]).data.root
    return ["train", "recipe=resnet18_scratch_fmnist", f"data.root={data}", "data.image_size=16",
            "train.epochs=1", "train.batch_size=16", "train.checkpoint=false",
            "model.pretrained=true", f"output_dir={tmp_path / 'out'}", *extra]


@pytest.mark.parametrize("name, damage, needle", [
    ("w.safetensors", lambda run: _saved(_state(run)),
     "it is a zip archive as torch.save writes); rename it to .pth. Fix:"),
    ("w.safetensors", lambda run: _saved(_state(run), zip=False),
     "it is a pickle as torch.save writes); rename it to .pth. Fix:"),
    ("w.safetensors", lambda run: b"", "it is empty"),
    ("w.safetensors", lambda run: (run / "model.safetensors").read_bytes()[:4000],
     "truncated"),
    ("w.pth", lambda run: b"", "it is empty"),
    ("w.pth", lambda run: b"garbage, not a checkpoint" * 10, "not a torch checkpoint"),
    ("w.pth", lambda run: _saved(_state(run))[:5000], "a damaged or truncated zip archive"),
    ("w.pt", lambda run: (run / "model.safetensors").read_bytes(),
     "a safetensors file; rename it to .safetensors"),
    ("w.pth", lambda run: _saved({"fc.weight": torch.zeros(1), "hook": print}),
     "refused to load"),
])
def test_a_weights_file_that_is_not_what_it_says(run, tmp_path, capsys, name, damage, needle):
    weights = tmp_path / name
    weights.write_bytes(damage(run))
    refused(capsys, _train(tmp_path, run, f"model.weights={weights}"), str(weights), needle)
    assert not (tmp_path / "out").exists()


def test_a_pickle_payload_in_a_weights_file_never_runs(run, tmp_path, capsys):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    weights = tmp_path / "w.pth"
    weights.write_bytes(pickle.dumps({"fc.weight": Payload()}, protocol=2))
    refused(capsys, _train(tmp_path, run, f"model.weights={weights}"), str(weights))
    assert not marker.exists()


# --- model.weights=FOLDER: its model.json and timm's config.json ---------------------------------

@pytest.mark.parametrize("cfg, field, needle", [
    ({"mean": "abc"}, "pretrained_cfg.mean", "a list of 3 numbers"),
    ({"mean": [0.5, NAN, 0.5]}, "pretrained_cfg.mean", "a list of 3 numbers"),
    ({"std": [0.2, 0.0, 0.2]}, "pretrained_cfg.std", "a list of 3 numbers"),
    ({"std": [0.2, 0.2]}, "pretrained_cfg.std", "3 numbers"),
    ({"crop_pct": "0.9"}, "pretrained_cfg.crop_pct", "a number in (0, 1]"),
    ({"interpolation": 5}, "pretrained_cfg.interpolation", "one of"),
    ({"input_size": [3, 100_000, 100_000]}, "pretrained_cfg.input_size",
     "[channels, height, width]"),
    ({"input_size": "224"}, "pretrained_cfg.input_size", "[channels, height, width]"),
])
@pytest.mark.parametrize("size", ["data.image_size=16", None])
def test_a_field_of_timm_config_json(run, tmp_path, capsys, cfg, field, needle, size):
    folder = _copy(run, tmp_path, skip=("model.json", "config.json"))
    good = json.loads((run / "config.json").read_text())
    good["pretrained_cfg"].update({"mean": [0.5] * 3, "std": [0.2] * 3,
                                   "input_size": [3, 16, 16]})
    good["pretrained_cfg"].update(cfg)
    (folder / "config.json").write_text(json.dumps(good))
    argv = _train(tmp_path, run, f"model.weights={folder}")
    argv = [a for a in argv if not a.startswith("data.image_size=")] + ([size] if size else [])
    refused(capsys, argv, str(folder / "config.json"), f"'{field}'", needle)


@pytest.mark.parametrize("config, needle", [
    ("[1]", "holds no JSON object"),
    ('{"pretrained_cfg": 3}', "'pretrained_cfg' must be an object"),
    ('{"num_classes": "ten", "pretrained_cfg": {}}', "'num_classes' must be an integer"),
])
def test_timm_config_json_that_is_no_config(run, tmp_path, capsys, config, needle):
    folder = _copy(run, tmp_path, skip=("model.json", "config.json"))
    (folder / "config.json").write_text(config)
    refused(capsys, _train(tmp_path, run, f"model.weights={folder}"),
             str(folder / "config.json"), needle)


@pytest.mark.parametrize("size", ["data.image_size=16", None])
def test_model_json_beside_weights_is_checked_before_the_data(run, tmp_path, capsys, size):
    meta = json.loads((run / "model.json").read_text())
    folder = _with_meta(run, tmp_path, json.dumps({**meta, "image_size": 10**9}))
    argv = _train(tmp_path, run, f"model.weights={folder}")
    argv = [a for a in argv if not a.startswith("data.image_size=")] + ([size] if size else [])
    refused(capsys, argv, str(folder / "model.json"), "'image_size'", "from 1 to 4096")


def test_header_of_the_fixture_is_what_the_checks_read(run):
    # the damage above cuts a real file: its header must be shorter than 300 bytes + 8
    head = (run / "model.safetensors").read_bytes()[:8]
    assert 300 < struct.unpack("<Q", head)[0] + 8


@pytest.mark.parametrize("values, needle", [
    (lambda w: w.to(torch.int64), "as int64, not floating-point weights"),
    (lambda w: w.fill_(float("nan")), "non-finite values (NaN or inf) in conv1.weight"),
])
def test_weights_that_are_not_finite_floats(run, tmp_path, capsys, values, needle):
    from safetensors.torch import load_file, save_file

    state = load_file(run / "model.safetensors")
    state["conv1.weight"] = values(state["conv1.weight"].clone())
    weights = tmp_path / "w.safetensors"
    save_file(state, weights)
    refused(capsys, _train(tmp_path, run, f"model.weights={weights}"), str(weights), needle)
    out = _copy(run, tmp_path, skip=("model.safetensors",))  # the same as a run's export
    save_file(state, out / "model.safetensors")
    refused(capsys, ["predict", str(out), _image(tmp_path)], str(out / "model.safetensors"),
            needle, "the export is damaged")


def test_evaluate_refuses_to_write_into_another_run(run, tmp_path, capsys):
    other = _copy(run, tmp_path)
    before = (other / "metrics.jsonl").read_text()
    refused(capsys, ["evaluate", str(run), f"output_dir={other}"],
            f"output_dir={other} holds another run")
    assert not (other / "evaluation.json").exists()
    assert (other / "metrics.jsonl").read_text() == before
