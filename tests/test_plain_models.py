"""Model definitions stay plain: every built-in model scripts, FX-traces and gives torchvision's
feature extractor; CPU training's small-map matrix products are a swap of the trainer's
(finetune.cpu_convs), with the convolution's numbers and gradients."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from finetune.cpu_convs import SmallMapConv2d, swap_small_map_convs
from finetune.models import create_model, list_models

# The built-in models at a size each accepts (AlexNet and VGG need 32 px and more).
SIZES = {"alexnet": 64, "alexnet_lecture": 64}


@pytest.mark.parametrize("name, norm", [(n, "torch") for n in list_models()]
                         + [("resnet18", "scratch"), ("vgg11_narrow_bn", "scratch")])
def test_every_built_in_model_scripts_traces_and_extracts_features(name, norm):
    size = SIZES.get(name, 32)
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_chans=1, image_size=size, norm=norm).eval()
    x = torch.randn(2, 1, size, size)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), expected)
        torch.testing.assert_close(torch.jit.script(model)(x), expected)
        nodes = get_graph_node_names(model)[1]
        features = create_feature_extractor(model, {nodes[-2]: "features", nodes[-1]: "out"})
        out = features(x)
    torch.testing.assert_close(out["out"], expected)
    assert out["features"].shape[0] == 2


def _count_convolutions(monkeypatch) -> list[tuple[int, int]]:
    """The input sizes of every convolution oneDNN computes from now on."""
    convolved = []
    plain = nn.Conv2d._conv_forward

    def conv_forward(self, x, weight, bias):
        convolved.append(tuple(x.shape[-2:]))
        return plain(self, x, weight, bias)

    monkeypatch.setattr(nn.Conv2d, "_conv_forward", conv_forward)
    return convolved


def test_the_swap_takes_the_maps_smaller_than_the_kernel_and_only_while_training(monkeypatch):
    model = create_model("resnet18", num_classes=10, in_chans=1, image_size=28)
    params, state = list(model.parameters()), model.state_dict()
    swapped = swap_small_map_convs(model, (2, 1, 28, 28))
    # layer3's 3x3 convolutions over 2x2 maps, layer4's over 1x1 (its strided one sees 2x2)
    assert swapped == ["layer3.0.conv2", "layer3.1.conv1", "layer3.1.conv2", "layer4.0.conv1",
                       "layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2"]
    assert all(isinstance(model.get_submodule(n), SmallMapConv2d) for n in swapped)
    # the same parameters (the optimizer and checkpoints see nothing new), the same state dict
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert list(model.state_dict()) == list(state)
    convolved = _count_convolutions(monkeypatch)
    model.train()(torch.randn(2, 1, 28, 28))
    assert len(convolved) == 13  # the other 13 of ResNet-18's 20 convolutions
    convolved.clear()
    model.eval()(torch.randn(2, 1, 28, 28))
    assert len(convolved) == 20  # evaluation: every one a convolution
    # 3x3 maps (96 px) are not smaller than the kernel: nothing to gain, nothing swapped
    assert swap_small_map_convs(create_model("resnet18", num_classes=10), (2, 3, 96, 96)) == []


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("kernel, stride, padding, dilation",
                         [(3, 1, 1, 1), (3, 2, 1, 1), (7, 2, 3, 1), (5, 1, 2, 1), (3, 1, 2, 2)])
def test_small_maps_as_matrix_products_compute_the_convolution(size, kernel, stride, padding,
                                                               dilation):
    torch.manual_seed(0)
    plain = nn.Conv2d(3, 5, kernel, stride=stride, padding=padding, dilation=dilation,
                      bias=True).double()
    ours = SmallMapConv2d(3, 5, kernel, stride=stride, padding=padding, dilation=dilation,
                          bias=True).double()
    ours.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, size, size + 1, dtype=torch.double)
    y, expected = ours(x), plain(x)
    assert y.shape == expected.shape
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)
    (y * torch.arange(y.numel()).view_as(y)).sum().backward()
    (expected * torch.arange(y.numel()).view_as(y)).sum().backward()
    torch.testing.assert_close(ours.weight.grad, plain.weight.grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(ours.bias.grad, plain.bias.grad, rtol=0, atol=1e-10)


def test_a_swapped_resnet18_trains_as_torchvisions():
    """At 28 px layer4 sees 1x1 maps, where the products leave out the padding's taps: the
    logits and every gradient are still torchvision's."""
    torch.manual_seed(0)
    ours = create_model("resnet18", num_classes=10, in_chans=1, image_size=28).double()
    theirs = torchvision.models.resnet18(num_classes=10).double()
    theirs.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False).double()
    theirs.load_state_dict(ours.state_dict())
    assert swap_small_map_convs(ours, (4, 1, 28, 28))
    x = torch.randn(4, 1, 28, 28, dtype=torch.double)
    y, expected = ours(x), theirs(x)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-10)
    y.square().sum().backward()
    expected.square().sum().backward()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-9, msg=name)


def test_small_maps_keep_the_convolutions_dtype_and_errors():
    conv = SmallMapConv2d(3, 4, 3, padding=1, bias=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(torch.randn(2, 3, 2, 2)).dtype == torch.bfloat16
    # A map too small for the kernel: the convolution's own error, not a reshape's.
    with pytest.raises(RuntimeError, match="Kernel size can't be greater than actual input"):
        SmallMapConv2d(3, 4, 3)(torch.randn(2, 3, 1, 1))
