"""Channels-last inference is used only where the model gives the same outputs with it."""

from __future__ import annotations

import torch
from torch import nn

from audit.models.inference import use_channels_last
from audit.models.zoo import SmallCNN


class ViewsItsFeatures(nn.Module):
    """Own code that `.view`s a convolution's output: fails on channels-last strides."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.conv(x)
        return self.fc(features.view(features.shape[0], -1))


def test_a_cnn_switches_and_keeps_its_outputs():
    torch.manual_seed(0)
    model = SmallCNN(2).eval()
    probe = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        before = model(probe)
    assert use_channels_last(model, probe)
    assert model.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        after = model(probe)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_a_model_that_views_nhwc_stays_as_it_was():
    torch.manual_seed(0)
    model = ViewsItsFeatures().eval()
    probe = torch.rand(2, 3, 8, 8)
    assert not use_channels_last(model, probe)
    assert model.conv.weight.is_contiguous()
    model(probe)  # still runs


def test_a_model_without_convolutions_is_left_alone():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).eval()
    assert not use_channels_last(model, torch.rand(2, 3, 4, 4))
