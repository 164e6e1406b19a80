"""Batched building blocks of the trust checks: ranks, Spearman, SSIM, blur, chunked probabilities."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from audit.explain.layers import OutputSelector, default_output
from audit.metrics.bootstrap import estimate, weighted_means


def average_ranks(values: Tensor) -> Tensor:
    """Ranks 1..M of each row of an (N, M) tensor, ties given their average rank (as scipy's rankdata).

    Sort once, find each run of equal values by its first and last sorted position (cummax / reversed
    cummin), give every member (first + last) / 2 + 1 and scatter back: no Python loop over rows.
    """
    n, m = values.shape
    ordered, index = values.sort(dim=1, stable=True)
    pos = torch.arange(m, device=values.device).expand(n, m)
    change = ordered[:, 1:] != ordered[:, :-1]
    edge = torch.ones((n, 1), dtype=torch.bool, device=values.device)
    starts_run = torch.cat([edge, change], dim=1)
    ends_run = torch.cat([change, edge], dim=1)
    first = torch.where(starts_run, pos, 0).cummax(dim=1).values
    last = torch.where(ends_run, pos, m).flip(1).cummin(dim=1).values.flip(1)
    average = (first + last).to(torch.float64) / 2 + 1
    return torch.empty_like(average).scatter_(1, index, average)


def spearman_rows(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of each row pair of two (N, M) tensors; NaN where a row is constant."""
    ra = average_ranks(a.flatten(1))
    rb = average_ranks(b.flatten(1))
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    denom = (ra.pow(2).sum(1) * rb.pow(2).sum(1)).sqrt()
    return torch.where(denom > 0, (ra * rb).sum(1) / denom.clamp(min=1e-300), torch.nan)


def gaussian_kernel(sigma: float, radius: int, device: torch.device | None = None) -> Tensor:
    """A normalised 1-D gaussian of half-width `radius` (float64)."""
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def _band(kernel: Tensor, length: int) -> Tensor:
    """(length, length - 2r) matrix of a 'valid' 1-D correlation with `kernel` (half-width r)."""
    taps = len(kernel)
    out = length - taps + 1
    matrix = kernel.new_zeros((length, out))
    cols = torch.arange(out, device=kernel.device)
    rows = cols[:, None] + torch.arange(taps, device=kernel.device)[None]
    matrix[rows, cols[:, None].expand_as(rows)] = kernel[None].expand_as(rows)
    return matrix


def _separable(x: Tensor, kernel: Tensor, pad_mode: str | None) -> Tensor:
    """Filter (N, C, H, W) with the same 1-D kernel along H and W, as two banded matmuls (faster on
    the CPU than a depthwise conv); `pad_mode` None keeps only the 'valid' positions."""
    k = kernel.to(device=x.device, dtype=x.dtype)
    radius = (len(k) - 1) // 2
    if pad_mode is not None:
        x = F.pad(x, (radius, radius, radius, radius), mode=pad_mode)
    return _band(k, x.shape[2]).T @ x @ _band(k, x.shape[3])


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Gaussian blur of (N, C, H, W) images, radius ceil(3 sigma) (at most the image size - 1),
    mirrored borders (torch 'reflect' = scipy.ndimage 'mirror'), so the colours stay in range."""
    radius = min(math.ceil(3 * sigma), images.shape[2] - 1, images.shape[3] - 1)
    kernel = gaussian_kernel(sigma, radius, images.device)
    return _separable(images, kernel, "reflect")


def ssim_rows(a: Tensor, b: Tensor, sigma: float = 1.5, data_range: float = 1.0) -> Tensor:
    """Mean SSIM (Wang et al. 2004) of each pair of (N, H, W) maps with a gaussian window.

    The constants of the paper (K1 0.01, K2 0.03), an 11-px window (sigma 1.5, truncated at 3.5 sigma)
    and population covariances; the mean is over the 'valid' window positions, which equals
    skimage.metrics.structural_similarity(gaussian_weights=True, use_sample_covariance=False).
    Maps smaller than the window are padded by reflection and averaged over all positions.
    """
    x = a[:, None].to(torch.float64)
    y = b[:, None].to(torch.float64)
    radius = int(3.5 * sigma + 0.5)
    kernel = gaussian_kernel(sigma, radius, a.device)
    small = min(x.shape[2], x.shape[3]) <= 2 * radius
    pad = "reflect" if small else None
    if small:
        radius = min(radius, x.shape[2] - 1, x.shape[3] - 1)
        kernel = gaussian_kernel(sigma, radius, a.device)
    moments = _separable(torch.cat([x, y, x * x, y * y, x * y], dim=1), kernel, pad)
    mu_x, mu_y, xx, yy, xy = moments.unbind(dim=1)
    var_x = xx - mu_x**2
    var_y = yy - mu_y**2
    cov = xy - mu_x * mu_y
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return ssim.flatten(1).mean(dim=1)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode and restore each one's own training flag afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def class_probs(
    model: nn.Module,
    images: Tensor,
    batch_size: int,
    output: OutputSelector | None = None,
) -> Tensor:
    """Softmax probabilities (N, classes) of a stack of images, `batch_size` per forward, no grad."""
    select = output or default_output
    parts = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            parts.append(select(model(images[start : start + batch_size])).float().softmax(dim=1))
    return torch.cat(parts)


def model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def mean_estimate(values: np.ndarray, weights: np.ndarray | None) -> dict[str, float | int | None]:
    """Mean over the finite values with a bootstrap 95% CI from the (B, n) resample weights, and n."""
    values = np.asarray(values, dtype=np.float64)
    everyone = np.ones((1, len(values)))
    point = weighted_means(values, everyone, everyone)[0, 0]
    boot = (
        weighted_means(values, everyone, weights)[:, 0]
        if weights is not None and len(weights)
        else None
    )
    return estimate(point, boot) | {"n": int(np.isfinite(values).sum())}
