import pytest
import torch
import torchvision
from torch import nn

from finetune.models import create_model, list_models
from finetune.models.batchnorm import BatchNorm1d, BatchNorm2d
from finetune.models.registry import make_cfg, register_model
from finetune.models.summary import summarize


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, expected", [
    ("alexnet", 61_100_840), ("vgg11", 132_863_336), ("resnet18", 11_689_512),
    ("resnet152", 60_192_808), ("vgg11_bn", 132_868_840), ("resnet50", 25_557_032),
])
def test_parameter_counts_equal_torchvision(name, expected):
    with torch.device("meta"):
        ours = _params(create_model(name))
        theirs = _params(getattr(torchvision.models, name)())
    assert ours == theirs == expected


@pytest.mark.parametrize("name", ["alexnet", "vgg11", "vgg11_bn", "resnet18", "resnet50"])
def test_state_dict_layout_equals_torchvision(name):
    with torch.device("meta"):
        ours = create_model(name).state_dict()
        theirs = getattr(torchvision.models, name)().state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_lecture_alexnet_matches_the_lecture():
    model = create_model("alexnet_lecture", num_classes=10, in_chans=1, image_size=224)
    assert _params(model) == 46_764_746  # the lecture's printed count
    assert model.classifier[0].in_features == 256 * 5 * 5
    assert create_model("alexnet_lecture", in_chans=1, image_size=96).classifier[0] \
        .in_features == 256


SHAPE_CASES = [(name, size, chans)
               for name in ("alexnet_lecture", "alexnet", "vgg11_narrow", "vgg11_narrow_bn",
                            "resnet18", "resnet34", "resnet50")
               for size, chans in ((64, 1), (96, 3), (224, 1))
               if not (name == "resnet50" and size == 224)]  # the slowest; smaller sizes do


@pytest.mark.parametrize("name, size, chans", SHAPE_CASES)
def test_output_shapes(name, size, chans):
    model = create_model(name, num_classes=7, in_chans=chans, image_size=size).eval()
    with torch.no_grad():
        assert model(torch.rand(2, chans, size, size)).shape == (2, 7)


def test_vgg_classifier_follows_input_size():
    assert create_model("vgg11_narrow", image_size=224).classifier[0].in_features == 128 * 49
    assert create_model("vgg11_narrow", image_size=64).classifier[0].in_features == 128 * 4
    with pytest.raises(ValueError, match="needs image_size >= 32"):
        create_model("vgg11_narrow", image_size=16)


def test_vgg_bn_puts_norm_after_each_conv():
    model = create_model("vgg11_narrow_bn", norm="scratch")
    kinds = [type(m).__name__ for m in model.features]
    assert kinds[:4] == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"]
    assert isinstance(model.features[1], BatchNorm2d)
    assert kinds.count("BatchNorm2d") == kinds.count("Conv2d") == 8


def _calibrated_torchvision(name: str) -> nn.Module:
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)()
    # Real BN statistics (one calibration batch), so that every buffer matters and the
    # activations keep a sane scale through 50 blocks.
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 1.0
    with torch.no_grad():
        reference.train()(torch.randn(8, 3, 64, 64))
    return reference.eval()


@pytest.mark.parametrize("name", ["resnet18", "resnet152"])
def test_resnet_loads_torchvision_weights_and_gives_its_logits(name):
    reference = _calibrated_torchvision(name)
    ours = create_model(name).eval()
    ours.load_state_dict(reference.state_dict())  # strict: same keys, same shapes
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-5)


def test_resnet_with_scratch_batchnorm_gives_torchvision_logits():
    reference = _calibrated_torchvision("resnet18")
    scratch = create_model("resnet18", norm="scratch").eval()
    scratch.load_state_dict(reference.state_dict())
    assert isinstance(scratch.layer1[0].bn1, BatchNorm2d)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        # Rounding differs from torch's fused kernel and compounds over 20 layers: 1e-4.
        torch.testing.assert_close(scratch(x), reference(x), rtol=1e-4, atol=1e-4)


def _bn_pair(cls_ours, cls_torch, features):
    torch.manual_seed(0)
    ours, theirs = cls_ours(features, momentum=0.2), cls_torch(features, momentum=0.2)
    with torch.no_grad():
        for bn in (ours, theirs):
            bn.weight.copy_(torch.linspace(0.5, 1.5, features))
            bn.bias.copy_(torch.linspace(-0.2, 0.2, features))
    return ours, theirs


@pytest.mark.parametrize("cls_ours, cls_torch, shape", [
    (BatchNorm1d, nn.BatchNorm1d, (16, 5)),
    (BatchNorm2d, nn.BatchNorm2d, (4, 3, 5, 6)),
])
def test_batchnorm_matches_torch(cls_ours, cls_torch, shape):
    ours, theirs = _bn_pair(cls_ours, cls_torch, shape[1])
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for step in range(3):  # training: outputs, all gradients, running statistics
        x = (torch.randn(shape) * (step + 1) + step).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        upstream = torch.randn(shape)
        y, y2 = ours(x), theirs(x2)
        torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
        (y * upstream).sum().backward()
        (y2 * upstream).sum().backward()
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, rtol=1e-5, atol=1e-5)
        ours.zero_grad()
        theirs.zero_grad()
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, key), getattr(theirs, key), rtol=1e-5,
                                   atol=1e-5)
    ours.eval()
    theirs.eval()  # evaluation: running statistics, gradients too
    x = torch.randn(shape).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    torch.testing.assert_close(ours(x), theirs(x2), rtol=1e-5, atol=1e-5)
    ours(x).sum().backward()
    theirs(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)


def test_batchnorm_rejects_wrong_rank():
    with pytest.raises(ValueError, match="expects"):
        BatchNorm2d(3)(torch.randn(4, 3))


def test_xavier_init():
    model = create_model("alexnet_lecture", num_classes=10, in_chans=1, image_size=64,
                         init="xavier")
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            fan_in = m.weight[0].numel()
            fan_out = m.weight.shape[0] * m.weight[0, 0].numel()
            bound = (6 / (fan_in + fan_out)) ** 0.5
            assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.9 * bound
            assert torch.count_nonzero(m.bias) == 0
    with pytest.raises(ValueError, match="valid: default, xavier"):
        create_model("resnet18", init="he")


def test_zero_residual_init_starts_every_block_as_the_identity():
    model = create_model("resnet18", num_classes=10, in_chans=1, init="zero_residual")
    default = create_model("resnet18", num_classes=10, in_chans=1)
    blocks = [m for m in model.modules() if hasattr(m, "zero_init_last")]
    assert len(blocks) == 8
    for block in blocks:
        assert torch.count_nonzero(block.bn2.weight) == 0
        assert torch.equal(block.bn1.weight, torch.ones_like(block.bn1.weight))
    block = model.layer1[0].eval()  # identity shortcut: the block is relu(x)
    x = torch.randn(2, 64, 7, 7)
    torch.testing.assert_close(block(x), torch.relu(x))
    assert not torch.allclose(default.layer1[0].eval()(x), torch.relu(x))
    bottleneck = create_model("resnet50", init="zero_residual").layer2[1]
    assert torch.count_nonzero(bottleneck.bn3.weight) == 0
    assert torch.count_nonzero(bottleneck.bn2.weight) > 0
    with pytest.raises(ValueError, match="zero_residual needs residual blocks.*AlexNet"):
        create_model("alexnet_lecture", num_classes=10, in_chans=1, image_size=64,
                     init="zero_residual")
    tv = create_model("tv:resnet50", num_classes=10, init="zero_residual")
    assert torch.count_nonzero(tv.layer1[0].bn3.weight) == 0
    assert torch.count_nonzero(tv.layer1[0].bn2.weight) > 0


def test_model_init_is_refused_where_it_means_nothing(tmp_path, capsys):
    from conftest import refused

    from finetune.config import ConfigError, load_config

    refused(capsys, ["train", "model.name=vgg11_narrow", "data.image_size=32",
                     "model.init=zero_residual",
                     f"output_dir={tmp_path / 'run'}"], "zero_residual needs residual blocks",
            "VGG")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="model.init=xavier initialises random weights"):
        load_config(["model.pretrained=true", "model.init=xavier"])


def test_registry_refuses_duplicates_and_unknown_names():
    with pytest.raises(ValueError, match="already registered"):
        @register_model(make_cfg("conv1"))
        def resnet18(**kwargs):  # noqa: ARG001
            return nn.Identity()
    with pytest.raises(ValueError, match="Did you mean 'vgg11'"):
        create_model("vgg111")
    assert {"alexnet", "alexnet_lecture", "vgg11", "vgg11_narrow", "resnet18",
            "resnet152"} <= set(list_models())


def test_summary_prints_every_layer_shape():
    model = create_model("vgg11_narrow", num_classes=10, in_chans=1, image_size=64)
    text = summarize(model, (1, 1, 64, 64))
    assert "features.0    Conv2d           (1, 16, 64, 64)" in text
    assert "classifier.6  Linear           (1, 10)" in text
    assert f"total: {_params(model):,d} parameters" in text
