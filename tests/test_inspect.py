"""``finetune inspect``: top losses against a direct computation, confused pairs against the
confusion matrix, Grad-CAM heatmaps of the input's size that differ between classes, on
finetune's, timm's and torchvision's models."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import refused

import finetune
from finetune.cli import main as cli_main
from finetune.errors import ConfigError
from finetune.gradcam import grad_cam, target_layer
from finetune.models.registry import create_model


def test_inspect_finds_the_highest_losses_and_the_confused_pairs(trained, tmp_path):
    run, test = trained
    out = tmp_path / "inspect"
    cli_main(["inspect", str(run), "--out", str(out), "--top", "8", "--pairs", "3",
              "--cams", "2"])
    record = json.loads((out / "inspect.json").read_text())
    predictor = finetune.load(run)
    logits = predictor.logits(test.images)
    losses = F.cross_entropy(logits, test.labels.long(), reduction="none")
    expected = losses.sort(descending=True).values[:8]
    got = torch.tensor([r["loss"] for r in record["top_losses"]])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    for r in record["top_losses"]:  # each index carries its own loss and prediction
        assert r["loss"] == pytest.approx(float(losses[r["index"]]), abs=1e-5)
        assert r["predicted"] == predictor.class_names[int(logits[r["index"]].argmax())]
    assert record["test_images"] == len(test)
    assert record["test_acc"] == pytest.approx(
        float((logits.argmax(1) == test.labels).float().mean()))

    k = len(predictor.class_names)
    confusion = torch.bincount(test.labels.long() * k + logits.argmax(1), minlength=k * k)
    confusion = confusion.view(k, k).fill_diagonal_(0)
    counts = [r["count"] for r in record["confused_pairs"]]
    assert counts == confusion.flatten().sort(descending=True).values[:len(counts)].tolist()
    for r in record["confused_pairs"]:
        t, p = (predictor.class_names.index(r[key]) for key in ("true", "predicted"))
        assert r["count"] == int(confusion[t, p])
        assert all(int(test.labels[i]) == t and int(logits[i].argmax()) == p
                   for i in r["examples"])

    cams = record["gradcam"]
    assert cams["input_size"] == [28, 28] and len(cams["images"]) >= 2
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 + bool(record["confused_pairs"])
    assert "Top losses" in page and "Grad-CAM" in page
    assert "confused_pairs.png" in (out / "report.md").read_text() or not counts


def test_gradcam_heatmaps_have_the_input_size_and_differ_between_classes(trained):
    run, test = trained
    predictor = finetune.load(run)
    x = predictor.batch_inputs(test.images[:6])
    layer = target_layer(predictor.model, x)
    maps = [grad_cam(predictor.model, layer, x, torch.full((6,), c)) for c in range(2)]
    for cam in maps:
        assert cam.shape == (6, 28, 28) and torch.isfinite(cam).all()
        assert cam.min() >= 0 and cam.amax(dim=(1, 2)).max() == pytest.approx(1)
    assert (maps[0] - maps[1]).abs().amax(dim=(1, 2)).min() > 0.1  # every image's two maps


@pytest.mark.parametrize("name", ["timm:resnet10t", "tv:mobilenet_v3_small", "resnet18"])
def test_gradcam_on_timm_torchvision_and_finetune_models(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, in_chans=3, image_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    layer = target_layer(model, x)
    cams = grad_cam(model, layer, x, torch.tensor([0, 2]))
    assert cams.shape == (2, 64, 64) and torch.isfinite(cams).all()
    assert 0 <= cams.min() and cams.max() <= 1


@pytest.mark.parametrize("size,needle", [(224, "turns its feature maps into tokens after "
                                                "patch_embed.proj"),
                                          (32, "no convolutional feature map of at least 3x3")])
def test_a_vision_transformer_is_refused_in_one_line(size, needle):
    model = create_model("timm:vit_tiny_patch16_224", num_classes=3, in_chans=3,
                         image_size=size).eval()
    with pytest.raises(ConfigError, match=needle):
        target_layer(model, torch.randn(1, 3, size, size))


@pytest.mark.parametrize("argv,needle", [(["--top", "100000"], "--top 100000: between 1 and 128"),
                                         (["--cams", "-1"], "--cams -1: between 0 and 16"),
                                         (["--layer", "layer9"], "--layer layer9: no such module"),
                                         (["--layer", "fc"], "is not a feature map")])
def test_bad_inspect_options_are_one_line(trained, tmp_path, capsys, argv, needle):
    run, _ = trained
    refused(capsys, ["inspect", str(run), "--out", str(tmp_path / "i"), *argv], needle)
    assert not (tmp_path / "i" / "report.html").exists()
