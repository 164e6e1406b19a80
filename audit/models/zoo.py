"""Classifier architectures: the built-in small GAP CNN and any torchvision classifier by name."""

from __future__ import annotations

import difflib

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
    """An architecture name that is neither small_cnn nor a torchvision classifier."""


def check_arch(arch: str) -> None:
    """Raise a clear error for an architecture name that is neither small_cnn nor torchvision's."""
    names = torchvision_classifiers()
    if arch != SMALL_CNN and arch not in names:
        close = difflib.get_close_matches(arch, [SMALL_CNN, *names], n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ArchError(
            f"unknown arch {arch!r}: use {SMALL_CNN!r} or a torchvision classifier{hint}"
        )


def build_model(arch: str, num_classes: int) -> nn.Module:
    """A freshly initialised classifier (no pretrained weights: nothing is downloaded)."""
    check_arch(arch)
    if arch == SMALL_CNN:
        return SmallCNN(num_classes=num_classes)
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def default_layer(arch: str) -> str | None:
    """The layer explained by default: the last conv feature map (None lets the engine find it)."""
    return "features" if arch == SMALL_CNN else None
