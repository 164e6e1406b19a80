"""Vectorised bootstrap: resampling weights as a (B, n) multinomial matrix, statistics as matmuls.

Intervals of means and of gaps between two means can be bias-corrected and accelerated (BCa,
Efron 1987; the method of `scipy.stats.bootstrap(method="BCa")`), with the jackknife acceleration
in closed form per group, so a thousand cells cost no loop over rows or cells.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

CI_QUANTILES = (2.5, 97.5)
Z_CI = 1.959963984540054  # the standard normal quantile of 97.5%: two-sided 95% intervals


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


# -- grouped statistics by integer codes ------------------------------------------------------
# The functions above take dense membership matrices (G, n): fine for a handful of groups, but a
# 1,000-class x group table would need a (cells, n) matrix per statistic. The ones below take one
# integer code per row instead (which cell it belongs to) and sum through a sparse one-hot matrix,
# so a resample costs O(n) whatever the number of cells, and resamples are processed in column
# chunks that keep the (B, cells) intermediate below CHUNK_FLOATS.

CHUNK_FLOATS = 4_000_000


def grouped_sums(
    values: np.ndarray, codes: np.ndarray, n_codes: int, weights_t: np.ndarray
) -> np.ndarray:
    """Weighted sum of `values` per code, per resample: returns (B, n_codes).

    `weights_t` is the transposed weight matrix (n, B), C-contiguous (see `transposed`); rows with
    a code outside [0, n_codes) are left out, which lets a caller sum a slice of the codes.
    """
    from scipy.sparse import csr_matrix

    values = np.asarray(values, dtype=np.float64)
    codes = np.asarray(codes, dtype=np.int64)
    keep = (codes >= 0) & (codes < n_codes) & (values != 0)
    rows = np.flatnonzero(keep)
    onehot = csr_matrix((values[rows], (codes[rows], rows)), shape=(n_codes, len(codes)))
    return np.asarray(onehot @ weights_t).T


def transposed(weights: np.ndarray) -> np.ndarray:
    """The (n, B) C-contiguous copy of resampling weights that `grouped_sums` multiplies."""
    return np.ascontiguousarray(np.asarray(weights, dtype=np.float64).T)


def grouped_point(values: np.ndarray, codes: np.ndarray, n_codes: int) -> tuple[np.ndarray, ...]:
    """Mean of the finite `values` per code and the number of finite values: (n_codes,) each.

    The mean is NaN for a code without a finite value."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    counts = np.bincount(codes[finite], minlength=n_codes)[:n_codes].astype(np.float64)
    totals = np.bincount(codes[finite], weights=values[finite], minlength=n_codes)[:n_codes]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, totals / np.where(counts > 0, counts, 1), np.nan), counts


def column_percentiles(samples: np.ndarray, quantiles: tuple[float, ...]) -> np.ndarray:
    """Percentiles of each column's finite values, as np.percentile's default (linear) method gives
    them, without np.nanpercentile's Python loop over columns: (len(quantiles), C), NaN for a column
    without a finite value."""
    samples = np.asarray(samples, dtype=np.float64)
    levels = np.broadcast_to(
        np.asarray(quantiles, np.float64)[:, None], (len(quantiles), samples.shape[1])
    )
    return column_quantiles(samples, levels)


def column_quantiles(samples: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Percentiles of each column's finite values at levels of its own: `levels` (k, C) in percent,
    linear interpolation as np.percentile; (k, C), NaN for a column without a finite value or level."""
    samples = np.asarray(samples, dtype=np.float64)
    levels = np.asarray(levels, dtype=np.float64)
    ordered = np.sort(np.where(np.isfinite(samples), samples, np.inf), axis=0)  # finite first
    count = np.isfinite(samples).sum(axis=0)
    out = np.full(levels.shape, np.nan)
    some = count > 0
    if not some.any():
        return out
    ordered, count = ordered[:, some], count[some]
    columns = np.arange(ordered.shape[1])
    for i, q in enumerate(levels[:, some]):
        position = (count - 1) * (np.clip(np.nan_to_num(q, nan=50.0), 0.0, 100.0) / 100.0)
        below = np.floor(position).astype(np.int64)
        above = np.minimum(below + 1, count - 1)
        fraction = position - below
        lo, hi = ordered[below, columns], ordered[above, columns]
        out[i, some] = np.where(np.isfinite(q), lo + (hi - lo) * fraction, np.nan)
    return out


def bca_columns(
    samples: np.ndarray, point: np.ndarray, acceleration: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The 95% BCa interval of each column of bootstrap `samples` (B, C), NaN ignored.

    `point` (C,) is the estimate on the data, `acceleration` (C,) the jackknife acceleration. The
    bias correction z0 is the normal quantile of the share of samples below the point (ties count
    half, as scipy.stats.bootstrap), clipped to half a sample from 0 and 1 so it stays finite.
    Unlike the percentile interval of a biased statistic, the interval moves with its estimate.
    """
    from scipy.special import ndtr, ndtri

    samples = np.asarray(samples, dtype=np.float64)
    point = np.asarray(point, dtype=np.float64)
    finite = np.isfinite(samples)
    count = finite.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        below = ((samples < point) & finite).sum(axis=0) + ((samples <= point) & finite).sum(axis=0)
        share = np.clip(below / (2.0 * count), 0.5 / count, 1 - 0.5 / count)
        z0 = ndtri(share)
        a = np.nan_to_num(np.asarray(acceleration, dtype=np.float64), nan=0.0)
        levels = []
        for z in (-Z_CI, Z_CI):
            shifted = z0 + z
            levels.append(100.0 * ndtr(z0 + shifted / (1 - a * shifted)))
    levels = np.where(np.isfinite(point) & (count > 0), np.array(levels), np.nan)
    low, high = column_quantiles(samples, levels)
    return low, high


def jackknife_sums(
    values: np.ndarray, codes: np.ndarray, n_codes: int, point: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per code, the sums of U^2 and U^3 over the jackknife influences of its mean.

    Leaving out row i of a code with m finite values moves the code's mean by (mean - x_i)/(m - 1)
    and leaves the other codes' means as they are, so U_i = (x_i - mean)/(m - 1) and the BCa
    acceleration of a mean is s3 / (6 s2^1.5), of a difference of two codes' means
    (s3_a - s3_b) / (6 (s2_a + s2_b)^1.5) (see `acceleration`). Codes with fewer than 2 values: 0.
    """
    values = np.asarray(values, dtype=np.float64)
    codes = np.asarray(codes, dtype=np.int64)
    keep = np.isfinite(values) & (codes >= 0) & (codes < n_codes)
    codes, values = codes[keep], values[keep]
    m = np.bincount(codes, minlength=n_codes)[:n_codes].astype(np.float64)
    deviation = values - np.asarray(point, dtype=np.float64)[codes]
    scale = np.where(m > 1, m - 1, np.inf)
    s2 = np.bincount(codes, weights=deviation**2, minlength=n_codes)[:n_codes] / scale**2
    s3 = np.bincount(codes, weights=deviation**3, minlength=n_codes)[:n_codes] / scale**3
    return s2, s3


def acceleration(s2: np.ndarray, s3: np.ndarray) -> np.ndarray:
    """BCa acceleration from jackknife sums (0 where the jackknife does not move the statistic)."""
    s2, s3 = np.asarray(s2, dtype=np.float64), np.asarray(s3, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(s2 > 0, s3 / (6.0 * np.where(s2 > 0, s2, 1.0) ** 1.5), 0.0)


def grouped_summary(
    values: np.ndarray,
    codes: np.ndarray,
    n_codes: int,
    weights_t: np.ndarray,
    judged: np.ndarray | None = None,
    bca: bool = False,
) -> dict[str, Any]:
    """Per-code mean with its bootstrap interval; the lowest and highest judged codes.

    Returns point, n (finite values per code), ci_low, ci_high (NaN where no resample has a value;
    BCa intervals with `bca`, else percentile ones); boot_min / boot_max, (B,) arrays: the smallest
    and largest code mean in each resample over the codes where `judged` is true (all by default),
    NaN-aware; worst (the code of the lowest judged mean, or -1) with worst_samples, its mean per
    resample; gap, the highest minus the lowest judged mean as an estimate dict whose interval is
    that of the difference between these two named codes in every resample (+ high, low: their
    codes, -1 with fewer than two), and gap_samples, that difference per resample.
    The resample means are built a chunk of codes at a time, so memory stays bounded.
    """
    values = np.asarray(values, dtype=np.float64)
    codes = np.asarray(codes, dtype=np.int64)
    point, n = grouped_point(values, codes, n_codes)
    judged = np.ones(n_codes, bool) if judged is None else np.asarray(judged, bool)
    ranked = np.where(judged, point, np.nan)
    has = np.isfinite(ranked)
    low_code = int(np.nanargmin(ranked)) if has.any() else -1
    high_code = int(np.nanargmax(ranked)) if has.sum() >= 2 else -1
    if high_code >= 0 and high_code == low_code:  # all equal: any other judged code
        high_code = int(np.flatnonzero(has & (np.arange(n_codes) != low_code))[0])
    n_boot = weights_t.shape[1]
    low = np.full(n_codes, np.nan)
    high = np.full(n_codes, np.nan)
    boot_min = np.full(n_boot, np.nan)
    boot_max = np.full(n_boot, np.nan)
    picked = {low_code: np.full(n_boot, np.nan), high_code: np.full(n_boot, np.nan)}
    s2, s3 = jackknife_sums(values, codes, n_codes, point) if bca else (None, None)
    finite = np.isfinite(values)
    clean = np.where(finite, values, 0.0)
    step = max(1, CHUNK_FLOATS // max(n_boot, 1))
    for start in range(0, n_codes if n_boot else 0, step):
        stop = min(n_codes, start + step)
        local = np.where(finite, codes - start, -1)
        totals = grouped_sums(clean, local, stop - start, weights_t)
        counts = grouped_sums(finite.astype(np.float64), local, stop - start, weights_t)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = np.where(counts > 0, totals / np.where(counts > 0, counts, 1), np.nan)
        if bca:
            accel = acceleration(s2[start:stop], s3[start:stop])
            low[start:stop], high[start:stop] = bca_columns(means, point[start:stop], accel)
        else:
            low[start:stop], high[start:stop] = column_percentiles(means, CI_QUANTILES)
        for code in picked:
            if start <= code < stop:
                picked[code] = means[:, code - start]
        chosen = means[:, judged[start:stop]]
        if chosen.shape[1]:
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                boot_min = np.fmin(boot_min, np.nanmin(chosen, axis=1))
                boot_max = np.fmax(boot_max, np.nanmax(chosen, axis=1))
    gap_samples = picked[high_code] - picked[low_code]
    gap = {"value": None, "ci_low": None, "ci_high": None}
    if high_code >= 0:
        gap_point = point[high_code] - point[low_code]
        if n_boot and bca:
            accel = acceleration(s2[high_code] + s2[low_code], s3[high_code] - s3[low_code])
            lo, hi = bca_columns(gap_samples[:, None], np.array([gap_point]), np.array([accel]))
            gap = stamp(gap_point, lo[0], hi[0])
        else:
            gap = estimate(gap_point, gap_samples if n_boot else None)
    return {
        "point": point,
        "n": n,
        "ci_low": low,
        "ci_high": high,
        "boot_min": boot_min,
        "boot_max": boot_max,
        "worst": low_code,
        "worst_samples": picked[low_code],
        "gap": gap | {"high": high_code, "low": low_code if high_code >= 0 else -1},
        "gap_samples": gap_samples,
    }


def nan_spread(rates: np.ndarray, axis: int = -1) -> np.ndarray:
    """max - min along `axis`, ignoring NaN (a group absent from a resample); NaN if none is left."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmax(rates, axis=axis) - np.nanmin(rates, axis=axis)


def stamp(value: float | None, low: float | None, high: float | None, n: int | None = None) -> dict:
    """An estimate dict from an already computed point and interval (NaN becomes None)."""

    def clean(x: float | None) -> float | None:
        return float(x) if x is not None and np.isfinite(x) else None

    out = {"value": clean(value), "ci_low": clean(low), "ci_high": clean(high)}
    return out if n is None else out | {"n": int(n)}
