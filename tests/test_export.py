import json

import pytest
import torch

from finetune.errors import OutputError
from finetune.export import ExportError, load_model, save_model
from finetune.models import create_model

META = {"architecture": "resnet18", "num_classes": 10, "in_chans": 1, "image_size": 32,
        "mean": [0.5], "std": [0.25], "class_names": [str(i) for i in range(10)]}


def test_round_trip_gives_identical_logits(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, in_chans=1).eval()
    # Non-trivial BN statistics, so a forgotten buffer would show.
    model.train()
    model(torch.randn(8, 1, 32, 32))
    model.eval()
    save_model(model, META, tmp_path)
    # config.json is timm's (ResNets only): see tests/test_inference.py.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.json",
                                                          "model.safetensors"]
    loaded, meta = load_model(tmp_path)
    assert meta == META and not loaded.training
    x = torch.randn(4, 1, 32, 32)
    assert torch.equal(model(x), loaded(x))
    # A path to the weights file works as well as the folder.
    again, _ = load_model(tmp_path / "model.safetensors")
    assert torch.equal(again(x), loaded(x))


def test_compiled_prefix_is_unwrapped(tmp_path):
    model = create_model("resnet18", num_classes=10, in_chans=1)

    class Wrapper(torch.nn.Module):  # what torch.compile returns looks like this to state_dict
        def __init__(self):
            super().__init__()
            self._orig_mod = model

    save_model(Wrapper(), META, tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "conv1.weight" in f.keys()


def test_missing_or_mismatched_export_is_clear(tmp_path):
    with pytest.raises(ExportError, match="no exported model"):
        load_model(tmp_path)
    save_model(create_model("resnet18", num_classes=10, in_chans=1), META, tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({**META, "architecture": "resnet34"}))
    with pytest.raises(ExportError, match="does not match model.json"):
        load_model(tmp_path)


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    import finetune.export as export

    def broken(state, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "save_file", broken)
    with pytest.raises(OutputError, match=r"could not write .*model.safetensors: no space left "
                                          r"on the device"):
        save_model(create_model("resnet18", num_classes=10, in_chans=1), META, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_no_space_left_while_exporting_keeps_nothing_partial(tiny_args, tmp_path, monkeypatch,
                                                             capsys):
    import finetune.export as export
    from finetune.cli import main as cli_main

    def full_disk(state, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "save_file", full_disk)
    assert cli_main(["train", *tiny_args, "train.epochs=1", "train.checkpoint=false"]) == 2
    err = capsys.readouterr().err
    assert (f"error: could not write {tmp_path / 'run' / 'model.safetensors'}: no space left "
            f"on the device. Free space or write elsewhere (output_dir=PATH); nothing partially "
            f"written was kept.") in err
    run = tmp_path / "run"
    assert not (run / "model.safetensors").exists()
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "metrics.jsonl"]
