"""The report's discovery section: slices and explanation strategies found from the model itself.

Reads `models.<name>.discovery` from metrics.json and the overlays the run drew for each
finding's most typical images; the mean Grad-CAM of a finding is drawn here from its 8x8 grid.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from PIL import Image

from audit.report.fmt import ci_html, pct

MEAN_MAP_PIXELS = 96  # side of the drawn mean Grad-CAM
FINDINGS_SHOWN = 4  # failing slices (worst first) shown per model; strategies: twice as many
THUMBS_SHOWN = 4  # typical images shown per slice
THUMB_QUALITY = 72  # JPEG quality of the embedded thumbnails


def mean_map_uri(values: list[float]) -> str | None:
    """A PNG data URI of an 8x8 (or any square) mean map, scaled to its own maximum."""
    grid = np.asarray(values, dtype=np.float64)
    side = int(round(np.sqrt(grid.size)))
    if side * side != grid.size or side == 0:
        return None
    grid = grid.reshape(side, side)
    top = grid.max()
    scaled = grid / top if top > 0 else grid
    rgb = (colormaps["jet"](scaled)[..., :3] * 255).astype(np.uint8)
    image = Image.fromarray(rgb).resize((MEAN_MAP_PIXELS, MEAN_MAP_PIXELS), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _thumbs(run_dir: Path, model: str, positions: list[int]) -> list[str]:
    """Small JPEG data URIs of the Grad-CAM overlays the run drew for these eval positions."""
    uris = []
    for position in positions[:THUMBS_SHOWN]:
        path = run_dir / "overlays" / model / "gradcam" / "pred" / f"{position:05d}.png"
        if path.is_file():
            with Image.open(path) as image:
                buffer = io.BytesIO()
                image.convert("RGB").save(buffer, format="JPEG", quality=THUMB_QUALITY)
            uris.append("data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode())
    return uris


def _match_text(matches: list[dict[str, Any]]) -> str:
    """The annotation a finding coincides with best, in words (or that none names it)."""
    if not matches or matches[0]["f1"] == 0:
        return "no annotated group"
    best = matches[0]
    return f"{best['group']} (precision {pct(best['precision'])}, recall {pct(best['recall'])})"


def _finding(run_dir: Path, model: str, entry: dict[str, Any], kind: str) -> dict[str, Any]:
    gap = entry.get("gap")
    return {
        "id": entry["id"],
        "kind": kind,
        "class": entry["class"],
        "size": entry["size"],
        "accuracy": ci_html(entry["accuracy"], 1),
        "gap": None if gap is None else f"{gap * 100:+.1f} pts",
        "match": _match_text(entry.get("matches") or []),
        "regions": ", ".join(
            f"{region} {pct(share)}" for region, share in (entry.get("region_shares") or {}).items()
        ),
        "mean_map": mean_map_uri(entry.get("mean_gradcam") or []),
        "thumbs": (
            _thumbs(run_dir, model, entry.get("typical_positions") or []) if kind == "slice" else []
        ),
    }


def alert(model: str, block: dict[str, Any]) -> str | None:
    """The first page's sentence when a discovered slice is far worse than every named group."""
    worst = block.get("worst_slice") or {}
    if not block.get("unnamed_failure") or worst.get("id") is None:
        return None
    floor = block.get("worst_annotated_accuracy")
    return (
        f"The model fails on a group that the data set does not name: see slice {worst['id']} "
        f"({pct(worst['accuracy']['value'], 1)} right, against {pct(floor, 1)} in the worst "
        "annotated cell)."
    )


def discovery_context(run_dir: Path, metrics: dict[str, Any]) -> dict[str, Any] | None:
    """Per model: the alert, the slices worst first and the strategies; None without discovery."""
    found = {}
    for name, model in metrics["models"].items():
        block = model.get("discovery")
        if not block:
            continue
        if "skipped" in block:
            found[name] = {"skipped": block["skipped"], "slices": [], "strategies": []}
            continue
        slices = sorted(block["slices"], key=lambda s: (s["accuracy"]["value"], s["id"]))
        failing = [s for s in slices if s["gap"] < 0][:FINDINGS_SHOWN]
        found[name] = {
            "alert": alert(name, block),
            "method": block["method"],
            "slices": [_finding(run_dir, name, s, "slice") for s in failing],
            "slices_more": len(slices) - len(failing),
            "too_small": block.get("classes_too_small") or [],
            "strategies": [
                _finding(run_dir, name, s, "strategy")
                for s in block["strategies"][: FINDINGS_SHOWN * 2]
            ],
        }
    return found or None
