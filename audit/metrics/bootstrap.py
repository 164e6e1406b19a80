"""Vectorised bootstrap: resampling weights as a (B, n) multinomial matrix, statistics as matmuls."""

from __future__ import annotations

import warnings

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
    ordered = np.sort(np.where(np.isfinite(samples), samples, np.inf), axis=0)  # finite first
    count = np.isfinite(samples).sum(axis=0)
    out = np.full((len(quantiles), samples.shape[1]), np.nan)
    some = count > 0
    if not some.any():
        return out
    ordered, count = ordered[:, some], count[some]
    columns = np.arange(ordered.shape[1])
    for i, q in enumerate(quantiles):
        position = (count - 1) * (q / 100.0)
        below = np.floor(position).astype(np.int64)
        above = np.minimum(below + 1, count - 1)
        fraction = position - below
        lo, hi = ordered[below, columns], ordered[above, columns]
        out[i, some] = lo + (hi - lo) * fraction
    return out


def grouped_summary(
    values: np.ndarray,
    codes: np.ndarray,
    n_codes: int,
    weights_t: np.ndarray,
    judged: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Per-code mean with its bootstrap interval, and the per-resample min and max over `judged` codes.

    Returns point, n (finite values per code), ci_low, ci_high (NaN where no resample has a value),
    and boot_min / boot_max, (B,) arrays: the smallest and largest code mean in each resample over
    the codes where `judged` is true (all by default), NaN-aware, NaN when none has a value.
    The resample means are built a chunk of codes at a time, so memory stays bounded.
    """
    values = np.asarray(values, dtype=np.float64)
    codes = np.asarray(codes, dtype=np.int64)
    point, n = grouped_point(values, codes, n_codes)
    judged = np.ones(n_codes, bool) if judged is None else np.asarray(judged, bool)
    n_boot = weights_t.shape[1]
    low = np.full(n_codes, np.nan)
    high = np.full(n_codes, np.nan)
    boot_min = np.full(n_boot, np.nan)
    boot_max = np.full(n_boot, np.nan)
    if n_boot == 0:
        return {
            "point": point,
            "n": n,
            "ci_low": low,
            "ci_high": high,
            "boot_min": boot_min,
            "boot_max": boot_max,
        }
    finite = np.isfinite(values)
    clean = np.where(finite, values, 0.0)
    step = max(1, CHUNK_FLOATS // max(n_boot, 1))
    for start in range(0, n_codes, step):
        stop = min(n_codes, start + step)
        local = np.where(finite, codes - start, -1)
        totals = grouped_sums(clean, local, stop - start, weights_t)
        counts = grouped_sums(finite.astype(np.float64), local, stop - start, weights_t)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = np.where(counts > 0, totals / np.where(counts > 0, counts, 1), np.nan)
        low[start:stop], high[start:stop] = column_percentiles(means, CI_QUANTILES)
        chosen = means[:, judged[start:stop]]
        if chosen.shape[1]:
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                boot_min = np.fmin(boot_min, np.nanmin(chosen, axis=1))
                boot_max = np.fmax(boot_max, np.nanmax(chosen, axis=1))
    return {
        "point": point,
        "n": n,
        "ci_low": low,
        "ci_high": high,
        "boot_min": boot_min,
        "boot_max": boot_max,
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
