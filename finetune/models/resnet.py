"""ResNet-18/34/50/101/152 in torchvision's layout, so torchvision and timm weights load as is."""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet as tv_resnet

from finetune.registry import register_model


def _resnet(builder, num_classes: int, in_chans: int) -> nn.Module:
    model = builder(weights=None, num_classes=num_classes)
    if in_chans != 3:
        old = model.conv1
        model.conv1 = nn.Conv2d(in_chans, old.out_channels, old.kernel_size, old.stride,
                                old.padding, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


@register_model
def resnet18(num_classes: int = 1000, in_chans: int = 3) -> nn.Module:
    return _resnet(tv_resnet.resnet18, num_classes, in_chans)


@register_model
def resnet34(num_classes: int = 1000, in_chans: int = 3) -> nn.Module:
    return _resnet(tv_resnet.resnet34, num_classes, in_chans)


@register_model
def resnet50(num_classes: int = 1000, in_chans: int = 3) -> nn.Module:
    return _resnet(tv_resnet.resnet50, num_classes, in_chans)


@register_model
def resnet101(num_classes: int = 1000, in_chans: int = 3) -> nn.Module:
    return _resnet(tv_resnet.resnet101, num_classes, in_chans)


@register_model
def resnet152(num_classes: int = 1000, in_chans: int = 3) -> nn.Module:
    return _resnet(tv_resnet.resnet152, num_classes, in_chans)
