import copy
import urllib.error

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

from finetune.config import ModelConfig
from finetune.models import WeightsError, build_model, create_model
from finetune.models.pretrained import (
    adapt_state_dict,
    channel_stats,
    fetch_state_dict,
    load_pretrained,
)


@pytest.fixture(scope="module")
def tv_resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()

TIMM_R18 = ModelConfig(name="resnet18", pretrained=True, weights="timm:resnet18.a1_in1k")


def _load(name, weights, num_classes, in_chans):
    model = create_model(name, num_classes=num_classes, in_chans=in_chans)
    return model, load_pretrained(model, name, fetch_state_dict(name, weights))


def _save_pth(tmp_path, model, name="tv.pth"):
    path = tmp_path / name
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize("channels", [1, 5])
def test_the_first_conv_is_adapted_as_timm_adapts_it(channels):
    model = create_model("resnet18", num_classes=10, in_chans=channels)
    w = torch.randn(64, 3, 7, 7)
    state = {"conv1.weight": w.clone()}
    notes = adapt_state_dict(state, model, "conv1", "fc")
    got = state["conv1.weight"]
    assert got.shape == (64, channels, 7, 7) and f"3 -> {channels} input channels" in notes[0]
    if channels == 1:  # a grey image x gets the response the RGB filters give to (x, x, x)
        torch.testing.assert_close(got, w.sum(1, keepdim=True))
    else:  # filters cycled, rescaled so that the summed response keeps its magnitude
        torch.testing.assert_close(got[:, 3], w[:, 0] * 3 / 5)


def test_channel_stats():
    assert channel_stats((0.485, 0.456, 0.406), 1) == pytest.approx((0.449,))
    assert channel_stats((1.0, 2.0, 3.0), 4) == (1.0, 2.0, 3.0, 1.0)


def test_torchvision_layout_1_channel_and_new_head(tmp_path, tv_resnet18):
    path = _save_pth(tmp_path, tv_resnet18)
    model, loaded = _load("resnet18", str(path), 10, 1)
    sd, ref = model.state_dict(), tv_resnet18.state_dict()
    # conv1 equals the sum of the RGB filters; a grey image x == RGB image (x, x, x).
    torch.testing.assert_close(sd["conv1.weight"], ref["conv1.weight"].sum(1, keepdim=True))
    assert sd["fc.weight"].shape == (10, 512) and sd["fc.bias"].shape == (10,)
    for key in ("layer4.1.conv2.weight", "bn1.running_var", "layer2.0.downsample.0.weight"):
        torch.testing.assert_close(sd[key], ref[key])
    assert any("summed RGB" in n for n in loaded.notes)
    assert any("1000 -> 10 classes" in n for n in loaded.notes)
    assert loaded.mean == pytest.approx((0.449,)) and loaded.std == pytest.approx((0.226,))
    # The backbone computes the same features as torchvision's on the grey image as RGB.
    x = torch.rand(2, 1, 64, 64)
    ref_model = copy.deepcopy(tv_resnet18)
    model.fc = ref_model.fc = torch.nn.Identity()
    torch.testing.assert_close(model.eval()(x), ref_model(x.expand(-1, 3, -1, -1)),
                               rtol=1e-4, atol=1e-4)


def test_timm_layout_safetensors_loads(tmp_path):
    torch.manual_seed(1)
    timm_model = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in timm_model.state_dict().items()}, str(path))
    model, loaded = _load("resnet18", str(path), 7, 3)
    sd = model.state_dict()
    torch.testing.assert_close(sd["conv1.weight"], timm_model.state_dict()["conv1.weight"])
    assert sd["fc.weight"].shape == (7, 512)
    assert loaded.source == str(path.resolve())


def test_prefixed_and_nested_checkpoints_load(tmp_path, tv_resnet18):
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tv_resnet18.state_dict().items()}},
               path)
    model, _ = _load("resnet18", str(path), 10, 3)
    torch.testing.assert_close(model.state_dict()["layer1.0.conv1.weight"],
                               tv_resnet18.state_dict()["layer1.0.conv1.weight"])


def test_wrong_architecture_is_refused(tmp_path):
    path = _save_pth(tmp_path, torchvision.models.resnet34(), "r34.pth")
    with pytest.raises(WeightsError, match="do not fit resnet18.*unexpected.*model.weights=PATH"):
        _load("resnet18", str(path), 10, 1)
    path = _save_pth(tmp_path, torchvision.models.resnet50(), "r50.pth")
    with pytest.raises(WeightsError, match="other shapes"):
        _load("resnet18", str(path), 10, 1)


def test_missing_file_and_pickled_code_are_refused(tmp_path):
    with pytest.raises(WeightsError, match="does not exist.*model.weights=PATH"):
        _load("resnet18", str(tmp_path / "nope.pth"), 10, 1)
    evil = tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.zeros(1), "hook": print}, evil)
    with pytest.raises(WeightsError, match="refused to load.*pickled"):
        _load("resnet18", str(evil), 10, 1)


def test_offline_torchvision_weights_fail_with_fix(monkeypatch):
    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(WeightsError) as e:
        build_model(ModelConfig(name="resnet18", pretrained=True), num_classes=10, in_chans=1,
                    image_size=64)
    msg = str(e.value)
    assert "ResNet18_Weights.IMAGENET1K_V1" in msg and "resnet18-f37072fd.pth" in msg
    assert "model.weights=PATH" in msg and "model.pretrained=false" in msg


def test_offline_timm_hub_fails_with_fix(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("not cached, offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(WeightsError, match="timm/resnet18.a1_in1k.*model.weights=PATH"):
        build_model(TIMM_R18, num_classes=10, in_chans=1, image_size=64)


def test_timm_hub_file_is_used(monkeypatch, tmp_path):
    import huggingface_hub

    torch.manual_seed(2)
    ref = timm.create_model("resnet18").state_dict()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.items()}, str(path))
    asked = []

    def cached(repo, filename, **kwargs):
        asked.append((repo, filename))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", cached)
    model, loaded = build_model(TIMM_R18, num_classes=10, in_chans=3, image_size=64)
    assert asked[0] == ("timm/resnet18.a1_in1k", "model.safetensors")
    assert loaded.source == "timm:timm/resnet18.a1_in1k"
    key = "layer3.1.bn2.weight"
    torch.testing.assert_close(model.state_dict()[key], ref[key])


def test_scratch_model_has_requested_shape():
    model, loaded = build_model(ModelConfig(name="resnet152"), num_classes=10, in_chans=1,
                                image_size=64)
    assert loaded is None and model.conv1.in_channels == 1 and model.fc.out_features == 10
    assert model.eval()(torch.rand(1, 1, 32, 32)).shape == (1, 10)


def test_torchvision_alexnet_weights_adapt_to_one_channel(tmp_path):
    torch.manual_seed(3)
    reference = torchvision.models.alexnet()
    path = _save_pth(tmp_path, reference, "alexnet.pth")
    model, loaded = _load("alexnet", str(path), 10, 1)
    sd, ref = model.state_dict(), reference.state_dict()
    torch.testing.assert_close(sd["features.0.weight"],
                               ref["features.0.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(sd["classifier.4.weight"], ref["classifier.4.weight"])
    assert sd["classifier.6.weight"].shape == (10, 4096)
    assert any("classifier.6: classifier replaced" in n for n in loaded.notes)


def _export(tmp_path, class_names):
    """A finetune export (model.safetensors + model.json) of a 5-class 1-channel ResNet-18."""
    from finetune.export import save_model

    torch.manual_seed(1)
    model = create_model("resnet18", num_classes=5, in_chans=1, image_size=28)
    meta = {"architecture": "resnet18", "num_classes": 5, "in_chans": 1, "image_size": 28,
            "mean": [0.3], "std": [0.4], "class_names": class_names}
    save_model(model, meta, tmp_path)
    return model, tmp_path / "model.safetensors"


@pytest.mark.parametrize("same_classes", [True, False])
def test_export_trained_on_other_classes_gets_a_new_head(tmp_path, same_classes):
    source, path = _export(tmp_path, ["a", "b", "c", "d", "e"])
    target_classes = ["a", "b", "c", "d", "e"] if same_classes else ["f", "g", "h", "i", "j"]
    torch.manual_seed(2)
    from finetune.export import meta_beside

    model, loaded = build_model(ModelConfig(pretrained=True, weights=str(path)), num_classes=5,
                                in_chans=1, image_size=28, class_names=target_classes,
                                exported=meta_beside(path))
    # The body always comes from the export, and so do its normalisation statistics.
    torch.testing.assert_close(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert loaded.mean == (0.3,) and loaded.std == (0.4,)
    # The head (same shape either way) is kept only for the same classes.
    assert torch.equal(model.fc.weight, source.fc.weight) == same_classes
    assert any("classifier replaced" in n for n in loaded.notes) != same_classes
