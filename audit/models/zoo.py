"""The built-in small GAP CNN; `build_model`, `check_arch`, `default_layer` for every model source."""

from __future__ import annotations

import torchvision
from torch import nn

SMALL_CNN = "small_cnn"


class SmallCNN(nn.Module):
    """A compact CNN ending in global average pooling + one linear layer, so CAM applies.

    Three conv stages (64x64 input -> a 16x16 feature map named `features`), then GAP and `fc`.
    """

    def __init__(self, num_classes: int = 2, width: int = 32, in_channels: int = 3) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]

        self.features = nn.Sequential(
            *block(in_channels, width // 2),
            nn.MaxPool2d(2),
            *block(width // 2, width),
            nn.MaxPool2d(2),
            *block(width, 2 * width),
            *block(2 * width, 2 * width),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):  # noqa: ANN001, ANN201
        return self.fc(self.pool(self.features(x)).flatten(1))


def torchvision_classifiers() -> list[str]:
    """Names of torchvision's image classification architectures."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


class ArchError(ValueError):
    """An architecture that cannot be built: unknown name, bad hf: folder, python: import error."""


def default_layer(arch: str) -> str | None:
    """The layer explained by default: the last conv feature map (None lets the engine find it)."""
    return "features" if arch == SMALL_CNN else None
