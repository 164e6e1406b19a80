"""Matplotlib charts for the report, as deterministic SVG text (no dates, fixed ids)."""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

matplotlib.rcParams.update(
    {
        "svg.hashsalt": "audit-report",
        "font.size": 9,
        "axes.spines.top": False,
        "axes.spines.right": False,
    }
)
PALETTE = ["#c0392b", "#2471a3", "#229954", "#b9770e", "#7d3c98", "#566573"]


def _svg(fig: plt.Figure) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    return buffer.getvalue()


def _errors(estimates: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    values = np.array([e["value"] if e and e["value"] is not None else np.nan for e in estimates])
    low = np.array([e["ci_low"] if e and e["ci_low"] is not None else np.nan for e in estimates])
    high = np.array([e["ci_high"] if e and e["ci_high"] is not None else np.nan for e in estimates])
    err = np.stack([np.nan_to_num(values - low), np.nan_to_num(high - values)])
    return values, err


def grouped_bars(
    categories: list[str],
    series: dict[str, list[dict[str, Any]]],
    ylabel: str,
    title: str,
    percent: bool = True,
) -> str:
    """Bars per category, one per series, with 95% CI error bars."""
    fig, ax = plt.subplots(
        figsize=(max(4.5, 0.9 * len(categories) * max(1, len(series)) ** 0.5 + 2), 2.8)
    )
    width = 0.8 / max(1, len(series))
    x = np.arange(len(categories))
    for i, (name, estimates) in enumerate(series.items()):
        values, err = _errors(estimates)
        ax.bar(
            x + (i - (len(series) - 1) / 2) * width,
            values,
            width,
            yerr=err,
            capsize=3,
            label=name,
            color=PALETTE[i % len(PALETTE)],
        )
    ax.set_xticks(
        x,
        categories,
        rotation=15 if len(categories) > 4 else 0,
        ha="right" if len(categories) > 4 else "center",
    )
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if percent:
        ax.set_ylim(0, 1.05)
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _svg(fig)


def stacked_shares(splits: dict[str, dict[str, dict[str, float]]], title: str) -> str:
    """Per split and class, the share of each group: the bias of each training split at a glance."""
    labels, groups = [], sorted({g for s in splits.values() for c in s.values() for g in c})
    rows = []
    for split, classes in splits.items():
        for label, shares in classes.items():
            labels.append(f"{split}\n{label}")
            rows.append([shares.get(g, 0.0) for g in groups])
    data = np.array(rows) if rows else np.zeros((0, len(groups)))
    fig, ax = plt.subplots(figsize=(max(4.5, 0.8 * len(labels) + 1.5), 2.6))
    bottom = np.zeros(len(labels))
    for i, group in enumerate(groups):
        ax.bar(labels, data[:, i], bottom=bottom, label=group, color=PALETTE[i % len(PALETTE)])
        for j, value in enumerate(data[:, i]):
            if value >= 0.08:
                ax.text(
                    j,
                    bottom[j] + value / 2,
                    f"{value:.0%}",
                    ha="center",
                    va="center",
                    color="white",
                    fontsize=7,
                )
        bottom += data[:, i]
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    return _svg(fig)
