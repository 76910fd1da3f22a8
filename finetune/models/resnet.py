"""ResNet-18/34/50/101/152, written out as the lecture states the residual block.

Module names and shapes equal torchvision's, so ImageNet state dicts load straight in and give
torchvision's outputs. ``norm_layer`` picks torch's batch norm or ours
(``finetune.models.batchnorm``). The layers are torch's own, nothing device- or shape-dependent:
the models script, trace and export as they are (CPU training's small-map speed-up is a swap
the trainer applies: ``finetune.cpu_convs``).
"""

from __future__ import annotations

from torch import Tensor, nn

from finetune.models.registry import make_cfg, register_model


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


def shortcut(in_ch: int, out_ch: int, stride: int, norm_layer: type[nn.Module]) -> nn.Module:
    """Identity, or a strided 1x1 conv (+ norm, as torchvision) when the shape changes."""
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(conv1x1(in_ch, out_ch, stride), norm_layer(out_ch))


class BasicBlock(nn.Module):
    """3x3 conv, BN, ReLU, 3x3 conv, BN; add the shortcut; ReLU."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int, norm_layer: type[nn.Module]) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv3x3(in_ch, width, stride), norm_layer(width)
        self.conv2, self.bn2 = conv3x3(width, width), norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = shortcut(in_ch, width, stride, norm_layer)

    def zero_init_last(self) -> None:
        """The residual branch's last norm scaled to 0: the block starts as the identity."""
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + self.downsample(x))


class Bottleneck(nn.Module):
    """1x1 conv (reduce), 3x3 conv (stride here, "ResNet v1.5"), 1x1 conv (expand x4), each
    with BN, ReLU between; add the shortcut; ReLU."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int, norm_layer: type[nn.Module]) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1, self.bn1 = conv1x1(in_ch, width), norm_layer(width)
        self.conv2, self.bn2 = conv3x3(width, width, stride), norm_layer(width)
        self.conv3, self.bn3 = conv1x1(width, out_ch), norm_layer(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = shortcut(in_ch, out_ch, stride, norm_layer)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + self.downsample(x))


class ResNet(nn.Module):
    """Stem (7x7/2 conv, BN, ReLU, 3x3/2 max-pool), four stages of blocks, global average
    pool, linear classifier."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int],
                 num_classes: int = 1000, in_chans: int = 3,
                 norm_layer: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_ch = 64
        for i, (width, blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            stage = []
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                stage.append(block(in_ch, width, stride, norm_layer))
                in_ch = width * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        # torchvision's initialisation, so a from-scratch run starts where torchvision's would.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """Stages for fine-tuning (timm's convention): the stem, then each layer (coarse) or
        each block (fine); the classifier, matched by nothing, comes last."""
        return {"stem": r"^conv1\.|^bn1\.",
                "layer": r"^layer(\d+)\." if coarse else r"^layer(\d+)\.(\d+)\."}

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def _cfg(tv_weights: str, hf_hub_id: str) -> dict:
    # timm's ResNets have the same state dict: an export loads there unchanged.
    return make_cfg("conv1", tv_weights, hf_hub_id, timm_compatible=True)


@register_model(_cfg("ResNet18_Weights", "timm/resnet18.a1_in1k"))
def resnet18(num_classes: int = 1000, in_chans: int = 3, image_size: int = 224,
             norm_layer: type[nn.Module] = nn.BatchNorm2d) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_chans, norm_layer)


@register_model(_cfg("ResNet34_Weights", "timm/resnet34.a1_in1k"))
def resnet34(num_classes: int = 1000, in_chans: int = 3, image_size: int = 224,
             norm_layer: type[nn.Module] = nn.BatchNorm2d) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, in_chans, norm_layer)


@register_model(_cfg("ResNet50_Weights", "timm/resnet50.a1_in1k"))
def resnet50(num_classes: int = 1000, in_chans: int = 3, image_size: int = 224,
             norm_layer: type[nn.Module] = nn.BatchNorm2d) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, in_chans, norm_layer)


@register_model(_cfg("ResNet101_Weights", "timm/resnet101.a1h_in1k"))
def resnet101(num_classes: int = 1000, in_chans: int = 3, image_size: int = 224,
              norm_layer: type[nn.Module] = nn.BatchNorm2d) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 23, 3], num_classes, in_chans, norm_layer)


@register_model(_cfg("ResNet152_Weights", "timm/resnet152.a1h_in1k"))
def resnet152(num_classes: int = 1000, in_chans: int = 3, image_size: int = 224,
              norm_layer: type[nn.Module] = nn.BatchNorm2d) -> ResNet:
    return ResNet(Bottleneck, [3, 8, 36, 3], num_classes, in_chans, norm_layer)
