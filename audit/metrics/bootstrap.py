"""Vectorised bootstrap: resampling weights as a (B, n) multinomial matrix, statistics as matmuls."""

from __future__ import annotations

import numpy as np

CI_QUANTILES = (2.5, 97.5)


def resample_weights(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) counts of how often each row is drawn in each bootstrap resample."""
    if n_boot == 0 or n == 0:
        return np.zeros((0, n))
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)


def weighted_means(values: np.ndarray, members: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mean of `values` within each member set, per resample: (B, n) x (n,) x (G, n) -> (B, G).

    NaN where a resample holds no member of a set (or no finite value).
    """
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    members = np.asarray(members, dtype=np.float64) * finite
    clean = np.where(finite, values, 0.0)
    totals = weights @ (members * clean).T
    counts = weights @ members.T
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, totals / np.where(counts > 0, counts, 1), np.nan)


def point_means(values: np.ndarray, members: np.ndarray) -> np.ndarray:
    """Mean of `values` within each member set (the unresampled estimate)."""
    return weighted_means(values, members, np.ones((1, len(values))))[0]


def interval(samples: np.ndarray) -> tuple[float | None, float | None]:
    """The 95% percentile interval of bootstrap samples, ignoring NaN; None when there are none."""
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return None, None
    low, high = np.percentile(samples, CI_QUANTILES)
    return float(low), float(high)


def estimate(point: float, samples: np.ndarray | None) -> dict[str, float | None]:
    """{"value", "ci_low", "ci_high"}: the metric schema used throughout metrics.json."""
    low, high = interval(samples) if samples is not None else (None, None)
    value = float(point) if point is not None and np.isfinite(point) else None
    return {"value": value, "ci_low": low, "ci_high": high}
