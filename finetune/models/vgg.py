"""VGG-11 described as data: a list of (channels, convs) blocks."""

from __future__ import annotations

from torch import Tensor, nn

from finetune.models.interface import FeaturesClassifier
from finetune.models.registry import make_cfg, register_model

VGG11 = [(64, 1), (128, 1), (256, 2), (512, 2), (512, 2)]
VGG11_NARROW = [(16, 1), (32, 1), (64, 2), (128, 2), (128, 2)]  # the lecture's, width / 4


def vgg_block(num_convs: int, in_ch: int, out_ch: int,
              norm_layer: type[nn.Module] | None = None) -> list[nn.Module]:
    """``num_convs`` 3x3 pad-1 convs, each followed by [norm and] ReLU, then a 2x2/2 max-pool."""
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers.append(nn.Conv2d(in_ch, out_ch, 3, padding=1))
        if norm_layer is not None:
            layers.append(norm_layer(out_ch))
        layers.append(nn.ReLU(inplace=True))
        in_ch = out_ch
    layers.append(nn.MaxPool2d(2, stride=2))
    return layers


class VGG(FeaturesClassifier):
    """VGG blocks, flatten, two 4096-wide hidden layers with dropout 0.5, linear.

    The first linear layer's width follows from ``image_size`` (each block halves it); module
    names follow torchvision's (``features.N``, ``classifier.N``).
    """

    def __init__(self, arch: list[tuple[int, int]], num_classes: int = 1000, in_chans: int = 3,
                 image_size: int = 224, norm_layer: type[nn.Module] | None = None) -> None:
        super().__init__()
        side = image_size // 2 ** len(arch)
        if side < 1:
            raise ValueError(f"VGG with {len(arch)} blocks needs image_size >= "
                             f"{2 ** len(arch)}, got {image_size}")
        layers, in_ch = [], in_chans
        for out_ch, num_convs in arch:
            layers += vgg_block(num_convs, in_ch, out_ch, norm_layer)
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(in_ch * side * side, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(4096, num_classes),
        )
        if norm_layer is None:
            return
        for m in self.modules():  # BN variant: torchvision's conv init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


def _cfg(tv_weights: str = "") -> dict:
    # timm's VGGs name their layers differently: torchvision's weights only.
    return make_cfg("features.0", tv_weights)


@register_model(_cfg("VGG11_Weights"))
def vgg11(num_classes: int = 1000, in_chans: int = 3, image_size: int = 224,
          norm_layer: type[nn.Module] | None = None) -> VGG:
    """VGG-11 with the original widths; no normalization (``norm_layer`` is unused)."""
    return VGG(VGG11, num_classes, in_chans, image_size)


@register_model(_cfg("VGG11_BN_Weights"))
def vgg11_bn(num_classes: int = 1000, in_chans: int = 3, image_size: int = 224,
             norm_layer: type[nn.Module] = nn.BatchNorm2d) -> VGG:
    return VGG(VGG11, num_classes, in_chans, image_size, norm_layer)


@register_model(_cfg())
def vgg11_narrow(num_classes: int = 1000, in_chans: int = 3, image_size: int = 224,
                 norm_layer: type[nn.Module] | None = None) -> VGG:
    """The lecture's VGG-11, a quarter of the widths; no normalization."""
    return VGG(VGG11_NARROW, num_classes, in_chans, image_size)


@register_model(_cfg())
def vgg11_narrow_bn(num_classes: int = 1000, in_chans: int = 3, image_size: int = 224,
                    norm_layer: type[nn.Module] = nn.BatchNorm2d) -> VGG:
    return VGG(VGG11_NARROW, num_classes, in_chans, image_size, norm_layer)
