"""Formatting of figures for the report: shares, intervals, differences, unbreakable pieces.

Shared by render.py (page one, tables) and sections.py (trust, fairness, classes, mitigations), so
that a figure reads the same wherever it appears. Every function returns escaped text or Markup.
"""

from __future__ import annotations

from typing import Any

from markupsafe import Markup


def pct(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}%"


def share_text(value: float | None) -> str:
    """A share for a sentence: '38%', but '4.4%' below 10% so small regions keep a figure."""
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}%" if abs(value) < 0.095 else f"{100 * value:.0f}%"


def ci(estimate: dict[str, Any] | None, digits: int = 0, percent: bool = True) -> str:
    """'61% [57–65]' from a {"value", "ci_low", "ci_high"} estimate."""
    if not estimate or estimate.get("value") is None:
        return "n/a"
    fmt = (lambda v: f"{100 * v:.{digits}f}") if percent else (lambda v: f"{v:.{digits + 2}f}")
    text = fmt(estimate["value"]) + ("%" if percent else "")
    if estimate.get("ci_low") is not None:
        text += f" [{fmt(estimate['ci_low'])}–{fmt(estimate['ci_high'])}]"
    return text


def nowrap(text: Any) -> Markup:
    """Text that must not break across lines (a figure with its interval), escaped."""
    return Markup('<span class="nw">{}</span>').format(text)


def ci_html(estimate: dict[str, Any] | None, digits: int = 0, percent: bool = True) -> Markup:
    """A figure and its interval as two unbreakable pieces: a line may break between them only."""
    value, _, interval = ci(estimate, digits, percent).partition(" ")
    return nowrap(value) + (Markup(" ") + nowrap(interval) if interval else Markup(""))


def points(estimate: dict[str, Any] | None) -> str:
    """A difference of shares in percentage points: '-18.1 pts [-19.7 to -16.6]'."""
    return signed(estimate, 1, scale=100.0, unit=" pts")


def signed(
    estimate: dict[str, Any] | None, digits: int = 2, *, scale: float = 1.0, unit: str = ""
) -> str:
    """A signed difference on its own scale (AUC, probability): '-0.14 [-0.20 to -0.08]'."""
    if not estimate or estimate.get("value") is None:
        return "n/a"
    text = f"{scale * estimate['value']:+.{digits}f}{unit}"
    if estimate.get("ci_low") is not None:
        low, high = scale * estimate["ci_low"], scale * estimate["ci_high"]
        text += f" [{low:+.{digits}f} to {high:+.{digits}f}]"
    return text


def signed_html(estimate: dict[str, Any] | None, digits: int = 2) -> Markup:
    """`signed` as two unbreakable pieces (the figure, then its interval)."""
    value, _, interval = signed(estimate, digits).partition(" ")
    return nowrap(value) + (Markup(" ") + nowrap(interval) if interval else Markup(""))


def points_html(estimate: dict[str, Any] | None) -> Markup:
    """`points` as two unbreakable pieces (the difference, then its interval)."""
    value, _, interval = points(estimate).partition(" [")
    return nowrap(value) + (Markup(" ") + nowrap("[" + interval) if interval else Markup(""))


# -- units: shares and accuracies in percent, gaps and effects in points -------------------------
def amount(estimate: dict[str, Any] | None, digits: int = 1) -> str:
    """A gap or an effect in percentage points, unsigned: '4.0 pts [-1.0 to 7.0]' (its interval
    may cross zero: the named groups may be the other way round)."""
    if not estimate or estimate.get("value") is None:
        return "n/a"
    text = f"{_unsigned_zero(100 * estimate['value'], digits)} pts"
    if estimate.get("ci_low") is not None:
        low = _unsigned_zero(100 * estimate["ci_low"], digits)
        high = _unsigned_zero(100 * estimate["ci_high"], digits)
        text += f" [{low} to {high}]"
    return text


def _unsigned_zero(value: float, digits: int) -> str:
    """`value` to `digits` decimals, without the sign of a value that rounds to zero ('-0.0')."""
    text = f"{value:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def amount_html(estimate: dict[str, Any] | None, digits: int = 1) -> Markup:
    """`amount` as two unbreakable pieces (the figure, then its interval)."""
    value, _, interval = amount(estimate, digits).partition(" [")
    return nowrap(value) + (Markup(" ") + nowrap("[" + interval) if interval else Markup(""))


def limit_text(threshold: float, unit: str) -> str:
    """A gate's threshold as its unit writes it, with no more digits than it has: '85%', '5 pts'."""
    digits = next(
        (d for d in range(4) if abs(round(100 * threshold, d) - 100 * threshold) < 1e-9), 4
    )
    return f"{100 * threshold:.{digits}f}" + (" pts" if unit == "points" else "%")


def digits_against(value: float | None, threshold: float, digits: int = 1) -> int:
    """Digits enough to tell a failing value from the threshold it is judged against: '10.03%'
    where 10.0% would read as the 10% limit it failed (at most 4; `digits` where even 4 do not
    tell them apart, a difference of rounding noise)."""
    if value is None or value == threshold:
        return digits
    for more in range(digits, 5):
        if f"{100 * value:.{more}f}" != f"{100 * threshold:.{more}f}":
            return more
    return digits
