"""A team's own model code, as an audit imports it with `arch = "python:team_models:build"`.

`audit run` imports this module from the config file's folder (or PYTHONPATH) and calls
`build(num_classes=K, **kwargs)` with the config's `[model.kwargs]`: an audit of a `python:` arch runs
this code, so audit only code you would run yourself.
"""

from __future__ import annotations

from torch import Tensor, nn


class TeamCNN(nn.Module):
    """Two conv blocks, global average pooling and one linear layer."""

    def __init__(self, num_classes: int, width: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1),
            nn.BatchNorm2d(4 * width),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


def build(num_classes: int, width: int = 16) -> nn.Module:
    """The factory the audit calls: `num_classes` from the manifest, `width` from [model.kwargs]."""
    return TeamCNN(num_classes, width)
