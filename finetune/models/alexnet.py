"""AlexNet: the lecture's 1-channel version and torchvision's classic one."""

from __future__ import annotations

from torch import Tensor, nn

from finetune.models.interface import FeaturesClassifier
from finetune.models.registry import make_cfg, register_model


def _pool(size: int) -> tuple[nn.MaxPool2d, int]:
    """3x3 stride-2 max-pool; below 3 px the window shrinks to the map so small inputs work."""
    k = min(3, size)
    return nn.MaxPool2d(k, stride=2), (size - k) // 2 + 1


def _conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class AlexNet(FeaturesClassifier):
    """The lecture's AlexNet: five convs (96@11x11/4, 256@5x5, 384, 384, 256 @3x3), three
    max-pools, two 4096-wide hidden layers with dropout 0.5. The first linear layer's width
    follows from ``image_size``."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, image_size: int = 224) -> None:
        super().__init__()
        s = _conv_out(image_size, 11, 4, 1)
        if s < 1:
            raise ValueError(f"AlexNet needs image_size >= 9, got {image_size}")
        pool1, s = _pool(s)
        pool2, s = _pool(s)
        pool3, s = _pool(s)
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 96, 11, stride=4, padding=1), nn.ReLU(inplace=True), pool1,
            nn.Conv2d(96, 256, 5, padding=2), nn.ReLU(inplace=True), pool2,
            nn.Conv2d(256, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True), pool3,
        )
        self.classifier = nn.Sequential(
            nn.Linear(256 * s * s, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


class ClassicAlexNet(FeaturesClassifier):
    """torchvision's AlexNet (64, 192, 384, 256, 256 channels; 6x6 adaptive pool), same
    module names, so its ImageNet weights load."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 64, 11, stride=4, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(6)
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True),
            nn.Dropout(0.5), nn.Linear(4096, 4096), nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


@register_model(make_cfg("features.0"))
def alexnet_lecture(num_classes: int = 1000, in_chans: int = 3, image_size: int = 224,
                    norm_layer: type[nn.Module] | None = None) -> AlexNet:
    """The lecture's AlexNet (no normalization layers: ``norm_layer`` is unused)."""
    return AlexNet(num_classes, in_chans, image_size)


@register_model(make_cfg("features.0", "AlexNet_Weights"))
def alexnet(num_classes: int = 1000, in_chans: int = 3, image_size: int = 224,
            norm_layer: type[nn.Module] | None = None) -> ClassicAlexNet:
    """torchvision's AlexNet (no normalization layers: ``norm_layer`` is unused)."""
    return ClassicAlexNet(num_classes, in_chans)
