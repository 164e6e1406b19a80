"""Matplotlib charts for the report, as deterministic SVG text (no dates, fixed ids).

Three separate, colour-blind-safe palettes, so that a colour never means two things:
models take Okabe-Ito colours, groups take colours of Paul Tol's palettes, and the verdict colours
(pass/fail) are used only for verdicts, always together with a text and an icon. Charts are drawn
at about the width of a phone (3.9 in plus labels) with text of at least 9 pt, and keep their text as SVG text,
so that they stay readable when a browser or a PDF scales them to the page.
"""

from __future__ import annotations

import io
import textwrap
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

MIN_FONT_PT = 9
matplotlib.rcParams.update(
    {
        "svg.hashsalt": "audit-report",
        "svg.fonttype": "none",  # text stays text: searchable, sharp, measurable in tests
        "font.family": "DejaVu Sans",
        "font.size": MIN_FONT_PT,
        "axes.titlesize": 10,
        "axes.labelsize": MIN_FONT_PT,
        "xtick.labelsize": MIN_FONT_PT,
        "ytick.labelsize": MIN_FONT_PT,
        "legend.fontsize": MIN_FONT_PT,
        "axes.spines.top": False,
        "axes.spines.right": False,
    }
)
# Okabe & Ito (2008), without its green and vermillion, which read as pass and fail.
MODEL_COLOURS = ["#E69F00", "#56B4E9", "#CC79A7", "#0072B2", "#F0E442", "#000000"]
# Paul Tol's "muted" scheme (indigo, teal, sand, wine, ...): disjoint from the model colours.
GROUP_COLOURS = ["#332288", "#44AA99", "#DDCC77", "#882255", "#88CCEE", "#999933", "#AA4499"]
# Only for verdicts, always with an icon and the word PASS/FAIL beside the colour.
VERDICT_COLOURS = {"pass": "#1A7F37", "fail": "#B42318"}
REFERENCE_COLOUR = "#BBBBBB"  # the "uniform attention" reference bars (hatched)
CHART_WIDTH_IN = 3.9
CURVES_WIDTH_IN = 3.3  # two deletion / insertion charts side by side on an A4 page
HEATMAP_CMAP = "jet"  # the overlays' colour map (audit.report.overlays), shown by colour_bar


def model_colours(names: list[str]) -> dict[str, str]:
    """One fixed colour per model, in the run's model order."""
    return {n: MODEL_COLOURS[i % len(MODEL_COLOURS)] for i, n in enumerate(names)}


def group_colours(groups: list[str]) -> dict[str, str]:
    """One fixed colour per group, in the run's (sorted) group order."""
    return {g: GROUP_COLOURS[i % len(GROUP_COLOURS)] for i, g in enumerate(groups)}


def _svg(fig: plt.Figure) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    return buffer.getvalue()


def _wrap(label: str, width: int = 16) -> str:
    return "\n".join(textwrap.wrap(label, width, break_long_words=True)) or label


def _errors(estimates: list[dict[str, Any] | None]) -> tuple[np.ndarray, np.ndarray]:
    def get(e: dict[str, Any] | None, key: str) -> float:
        return e[key] if e and e.get(key) is not None else np.nan

    values = np.array([get(e, "value") for e in estimates], dtype=float)
    low = np.array([get(e, "ci_low") for e in estimates], dtype=float)
    high = np.array([get(e, "ci_high") for e in estimates], dtype=float)
    err = np.stack([np.nan_to_num(values - low), np.nan_to_num(high - values)])
    return values, err


def grouped_bars(
    categories: list[str],
    series: dict[str, list[dict[str, Any] | None]],
    xlabel: str,
    title: str,
    colours: dict[str, str],
    *,
    percent: bool = True,
    reference: str | None = None,
    signed: bool = False,
) -> str:
    """Horizontal bars, one row of bars per category and one bar per series, with 95% CI whiskers.

    Horizontal so that long category names never collide, whatever their number. `colours` maps
    each series to its colour; the series named `reference` (if any) is drawn grey and hatched.
    `signed`: the axis spans the data and its intervals (negative values included, a line at 0)
    instead of 0 to 100%.
    """
    n_series = max(1, len(series))
    bar = 0.8 / n_series
    height = 0.9 + len(categories) * (0.19 * n_series + 0.12)
    fig, ax = plt.subplots(figsize=(CHART_WIDTH_IN, height))
    y = np.arange(len(categories))
    ends = [0.0]
    for i, (name, estimates) in enumerate(series.items()):
        values, err = _errors(estimates)
        ends += [
            v for v in (values - err[0]).tolist() + (values + err[1]).tolist() if np.isfinite(v)
        ]
        is_ref = name == reference
        ax.barh(
            y + (i - (n_series - 1) / 2) * bar,
            np.nan_to_num(values),
            bar,
            xerr=None if is_ref else err,
            capsize=2,
            label=name,
            color=REFERENCE_COLOUR if is_ref else colours[name],
            hatch="///" if is_ref else None,
            edgecolor="white" if is_ref else "none",
            error_kw={"elinewidth": 0.8, "ecolor": "#333333"},
        )
    ax.set_yticks(y, [_wrap(c) for c in categories])
    ax.invert_yaxis()  # first category on top, as in the tables
    ax.set_xlabel(xlabel)
    ax.set_title(_wrap(title, 60), loc="left")
    if signed:
        low, high = min(ends), max(max(ends), 0.01)
        pad = 0.05 * (high - low)
        ax.set_xlim(low - pad if low < 0 else 0.0, high + pad)
        ax.axvline(0, color="#333333", linewidth=0.8)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5))
        if percent:
            ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, decimals=None))
    elif percent:
        ax.set_xlim(0, 1.0)
        ax.xaxis.set_major_locator(matplotlib.ticker.MultipleLocator(0.25))
        ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, decimals=0))
    ax.grid(axis="x", color="#e5e5e5", linewidth=0.6)
    ax.set_axisbelow(True)
    ax.legend(
        frameon=False,
        loc="lower left",
        bbox_to_anchor=(0.0, 1.0 + 0.35 / height),
        ncol=min(2, n_series),
        handlelength=1.2,
        columnspacing=1.0,
    )
    return _svg(fig)


def _text_colour(hex_colour: str) -> str:
    r, g, b = (int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5))
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "white"


def stacked_shares(
    splits: dict[str, dict[str, dict[str, float]]], title: str, colours: dict[str, str]
) -> str:
    """Per split and class, the share of each group (horizontal stacked bars): the bias of each
    split at a glance."""
    groups = list(colours)
    labels, rows = [], []
    for split, classes in splits.items():
        for label, shares in classes.items():
            labels.append(_wrap(f"{split}: {label}", 20))
            rows.append([shares.get(g, 0.0) for g in groups])
    data = np.array(rows) if rows else np.zeros((0, len(groups)))
    height = 0.9 + 0.3 * len(labels)
    fig, ax = plt.subplots(figsize=(CHART_WIDTH_IN, height))
    y = np.arange(len(labels))
    left = np.zeros(len(labels))
    for i, group in enumerate(groups):
        ax.barh(y, data[:, i], 0.7, left=left, label=group, color=colours[group])
        for j, value in enumerate(data[:, i]):
            if value >= 0.1:
                ax.text(
                    left[j] + value / 2,
                    j,
                    f"{value:.0%}",
                    ha="center",
                    va="center",
                    color=_text_colour(colours[group]),
                )
        left += data[:, i]
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, decimals=0))
    ax.set_title(_wrap(title, 60), loc="left")
    ax.legend(
        frameon=False,
        loc="lower left",
        bbox_to_anchor=(0.0, 1.0 + 0.35 / height),
        ncol=min(4, len(groups)),
    )
    return _svg(fig)


METHOD_STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1)), "v")]
RANDOM_COLOUR = "#666666"  # the random-order reference curves (dashed, no marker)


def deletion_insertion(series: dict[str, dict[str, Any]], title: str, colour: str) -> str:
    """Deletion and insertion curves of one model (two panels, one above the other): the mean
    probability of the predicted class against the fraction of pixels deleted / revealed, one line
    per method (the model's colour; methods told apart by line style and marker) and the random
    order in grey. `series`: method name -> faithfulness block (fractions, *_curve, *_auc)."""
    first = next(iter(series.values()))
    fig, axes = plt.subplots(1, 2, figsize=(CURVES_WIDTH_IN, 2.2), sharey=True)
    for ax, curve, verb in zip(
        axes, ("deletion", "insertion"), ("deleted", "revealed"), strict=True
    ):
        x = np.asarray(first.get("fractions") or np.linspace(0, 1, len(first[f"{curve}_curve"])))
        for i, (name, block) in enumerate(series.items()):
            line, marker = METHOD_STYLES[i % len(METHOD_STYLES)]
            label = name
            ax.plot(
                x,
                block[f"{curve}_curve"],
                linestyle=line,
                marker=marker,
                markersize=3,
                color=colour,
                label=label,
            )
        rnd = first.get(f"random_{curve}_curve")
        if rnd is not None:
            label = "random order"
            ax.plot(x, rnd, linestyle="--", color=RANDOM_COLOUR, label=label)
        ax.set_ylim(0, 1.02)
        ax.set_title(curve, loc="left")
        ax.set_xlabel(f"pixels {verb}")
        ax.set_xticks([0, 0.5, 1])
        ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, decimals=0))
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, decimals=0))
        ax.grid(color="#e5e5e5", linewidth=0.6)
    axes[0].set_ylabel("probability")
    handles, _ = axes[0].get_legend_handles_labels()
    labels = [
        f"{h.get_label()}: AUC {auc_text}"
        for h, auc_text in zip(handles, _auc_pairs(series), strict=False)
    ]
    fig.legend(
        handles,
        labels,
        frameon=False,
        loc="upper left",
        bbox_to_anchor=(0.0, 0.0),
        ncol=1,
        handlelength=2.2,
    )
    fig.suptitle(_wrap(title, 60), x=0.02, ha="left", fontsize=10)
    fig.tight_layout()
    return _svg(fig)


def _auc_pairs(series: dict[str, dict[str, Any]]) -> list[str]:
    """'deletion 0.21, insertion 0.64' per method, then for the random order."""

    def pair(block: dict[str, Any], prefix: str) -> str:
        values = [
            (block.get(f"{prefix}{c}_auc") or {}).get("value") for c in ("deletion", "insertion")
        ]
        return ", ".join(
            f"{c} {v:.2f}" if v is not None else f"{c} n/a"
            for c, v in zip(("del.", "ins."), values, strict=True)
        )

    first = next(iter(series.values()))
    return [pair(b, "") for b in series.values()] + [pair(first, "random_")]


def colour_bar(label: str, cmap: str = HEATMAP_CMAP) -> str:
    """The heat maps' colour scale: each map is scaled to its own maximum before colouring."""
    fig, ax = plt.subplots(figsize=(CHART_WIDTH_IN, 0.75))
    gradient = np.linspace(0, 1, 256)[None, :]
    ax.imshow(gradient, aspect="auto", cmap=cmap, extent=(0, 1, 0, 1))
    ax.set_yticks([])
    ax.set_xticks([0, 0.5, 1], ["0 (none)", "half", "the map's maximum"])
    ax.set_xlabel(label)
    for spine in ax.spines.values():
        spine.set_visible(False)
    return _svg(fig)
