"""Procedural drawing of one person for the doctor/nurse data set, with exact part masks.

A person is drawn from `PersonParams` (all random draws made up front), so the same parameters with
the other group give the counterfactual twin: only hair and face cues change, everything else is
byte-identical. Every drawing call paints the RGB canvas and a label canvas with the same shape, so
region masks are exact and follow occlusion.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Part ids on the label canvas (0 is background).
PARTS = {"clothes": 1, "neck": 2, "hair": 3, "face": 4, "stethoscope": 5, "badge": 6}
PROTECTED_PARTS = ("hair", "face")
JOB_CUES = {"doctor": "stethoscope", "nurse": "badge"}

SKIN = np.array(
    [[255, 224, 196], [241, 194, 160], [224, 172, 125], [198, 134, 90], [141, 85, 54], [92, 56, 38]]
)
HAIR = np.array(
    [[25, 20, 18], [70, 45, 30], [120, 80, 45], [200, 160, 90], [150, 60, 30], [140, 140, 140]]
)


@dataclass
class PersonParams:
    """Every random choice for one person, so that the image and its twin share them."""

    size: int
    background: np.ndarray  # (3,) base colour
    gradient: np.ndarray  # (3,) colour change from top to bottom
    noise: np.ndarray  # (size, size, 3) int16 pixel noise
    cx: float
    head_y: float
    head_r: float
    skin: np.ndarray
    hair: np.ndarray
    clothes: np.ndarray
    shoulder: float  # half-width of the shoulders in head radii
    cue_shift: float  # job cue colour = clothes colour + this shift: low contrast on purpose
    cue_dx: float
    lips: np.ndarray
    beard_alpha: float


def sample_params(rng: np.random.Generator, size: int) -> PersonParams:
    s = size / 64
    return PersonParams(
        size=size,
        background=rng.integers(40, 216, 3),
        gradient=rng.integers(-40, 41, 3),
        noise=rng.normal(0, 6, (size, size, 3)).round().astype(np.int16),
        cx=size / 2 + rng.uniform(-6, 6) * s,
        head_y=20 * s + rng.uniform(-3, 3) * s,
        head_r=rng.uniform(7.5, 9.5) * s,
        skin=np.clip(SKIN[rng.integers(len(SKIN))] + rng.integers(-12, 13, 3), 0, 255),
        hair=np.clip(HAIR[rng.integers(len(HAIR))] + rng.integers(-15, 16, 3), 0, 255),
        clothes=rng.integers(30, 226, 3),
        shoulder=rng.uniform(1.5, 1.9),
        cue_shift=rng.uniform(55, 80) * rng.choice([-1, 1]),
        cue_dx=rng.uniform(-1.5, 1.5) * s,
        lips=np.array([200, 30, 60]) + rng.integers(-25, 26, 3),
        beard_alpha=rng.uniform(0.45, 0.7),
    )


def _colour(value: np.ndarray) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.clip(value, 0, 255))


def render(p: PersonParams, label: str, group: str) -> tuple[Image.Image, dict[str, np.ndarray]]:
    """Draw the person; return the RGB image and a boolean mask per visible part."""
    size, s, r = p.size, p.size / 64, p.head_r
    ramp = np.linspace(0, 1, size)[:, None, None]
    base = p.background[None, None, :] + ramp * p.gradient[None, None, :]
    rgb = Image.fromarray(np.clip(np.broadcast_to(base, (size, size, 3)), 0, 255).astype(np.uint8))
    parts = Image.new("L", (size, size), 0)
    draw_rgb, draw_part = ImageDraw.Draw(rgb), ImageDraw.Draw(parts)

    def paint(kind: str, part: str, shape, colour, **kw) -> None:  # noqa: ANN001
        getattr(draw_rgb, kind)(shape, fill=_colour(colour), **kw)
        getattr(draw_part, kind)(shape, fill=PARTS[part], **kw)

    cx, hy = p.cx, p.head_y
    top = hy + r + 3 * s
    # Torso and neck.
    half = p.shoulder * r
    paint(
        "polygon",
        "clothes",
        [(cx - half, top), (cx + half, top), (cx + half * 1.25, size), (cx - half * 1.25, size)],
        p.clothes,
    )
    paint("rectangle", "neck", [cx - 0.35 * r, hy + 0.6 * r, cx + 0.35 * r, top + 1 * s], p.skin)
    # Job cue, in a colour close to the clothes': a thin stethoscope or a small badge.
    cue = p.clothes + p.cue_shift * (1 if p.clothes.mean() < 128 else -1) * np.sign(p.cue_shift)
    if label == "doctor":
        y0, y1 = top - 1 * s, top + 8 * s
        left = [(cx - 0.45 * r, y0), (cx - 0.6 * r, y0 + 3 * s), (cx - 0.3 * r + p.cue_dx, y1)]
        right = [(cx + 0.45 * r, y0), (cx + 0.6 * r, y0 + 3 * s), (cx + 0.3 * r + p.cue_dx, y1)]
        paint("line", "stethoscope", left, cue, width=max(1, round(s)))
        paint("line", "stethoscope", right, cue, width=max(1, round(s)))
        disc = 1.8 * s
        px, py = cx + 0.3 * r + p.cue_dx, y1 + 1.5 * s
        paint("ellipse", "stethoscope", [px - disc, py - disc, px + disc, py + disc], cue)
    else:
        bx, by, bw = cx - 0.8 * r + p.cue_dx, top + 9 * s, 1.8 * s
        paint("rectangle", "badge", [bx - bw, by - bw, bx + bw, by + bw], cue)
        light = p.clothes
        paint("line", "badge", [(bx - bw + 1, by), (bx + bw - 1, by)], light, width=1)
        paint("line", "badge", [(bx, by - bw + 1), (bx, by + bw - 1)], light, width=1)
    # Hair behind the head: long hair falls to the shoulders for women.
    if group == "female":
        paint(
            "rounded_rectangle",
            "hair",
            [cx - 1.45 * r, hy - 1.15 * r, cx + 1.45 * r, top + 5 * s],
            p.hair,
            radius=r,
        )
    # Face, with its group cue: red lips or a beard shadow.
    paint("ellipse", "face", [cx - r, hy - r, cx + r, hy + r], p.skin)
    if group == "female":
        paint(
            "ellipse", "face", [cx - 0.35 * r, hy + 0.4 * r, cx + 0.35 * r, hy + 0.62 * r], p.lips
        )
    else:
        beard = p.skin * (1 - p.beard_alpha) + p.hair * p.beard_alpha
        paint("chord", "face", [cx - r, hy - r, cx + r, hy + r], beard, start=20, end=160)
    eye = max(1.0, 1.0 * s)
    for ex in (cx - 0.4 * r, cx + 0.4 * r):
        paint(
            "ellipse",
            "face",
            [ex - eye, hy - 0.15 * r - eye, ex + eye, hy - 0.15 * r + eye],
            (30, 30, 30),
        )
    # Hair on top of the head: a fringe for women, a short crop for men.
    if group == "female":
        paint(
            "chord",
            "hair",
            [cx - 1.1 * r, hy - 1.2 * r, cx + 1.1 * r, hy + 0.2 * r],
            p.hair,
            start=180,
            end=360,
        )
    else:
        paint(
            "chord",
            "hair",
            [cx - 1.02 * r, hy - 1.12 * r, cx + 1.02 * r, hy - 0.1 * r],
            p.hair,
            start=190,
            end=350,
        )

    pixels = np.asarray(rgb, dtype=np.int16) + p.noise
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    labels = np.asarray(parts)
    masks = {name: labels == pid for name, pid in PARTS.items() if name != "neck"}
    masks["person"] = labels > 0
    return image, masks
