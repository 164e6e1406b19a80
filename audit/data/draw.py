"""Procedural drawing of one person for the doctor/nurse data set, with exact part masks.

A person is drawn from `PersonParams` (all random draws made up front), so the same parameters with
another sex or age give the counterfactual twin: a sex twin changes only hair and face cues (long
hair, lips or beard), an age twin only the hair colour (grey) and the wrinkles; everything else is
byte-identical. Every drawing call paints the RGB canvas and a label canvas with the same shape, so
region masks are exact and follow occlusion.

The job cue (stethoscope or badge) is painted last, so nothing of the protected cues covers it:
its pixels and its mask are the same whatever the person's sex and age, so the class evidence is
equally visible in every group and a twin never touches it. Long hair falls beside the neck, not
over the chest, so from 64 pixels up the cue also lies on the same background (clothes, neck) in
every group. The
wrinkles (crow's feet, under-eye lines, nasolabial folds) lie inside the face below the fringe and
above the beard, and are painted after both, so they are as visible on men as on women.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Part ids on the label canvas (0 is background).
PARTS = {"clothes": 1, "neck": 2, "hair": 3, "face": 4, "stethoscope": 5, "badge": 6, "wrinkles": 7}
PROTECTED_PARTS = ("hair", "face")  # every sex and age cue lies inside these (wrinkles in the face)
ATTRIBUTE_PARTS = {"sex": ("hair", "face"), "age": ("hair", "wrinkles")}  # where each twin differs
JOB_CUES = {"doctor": "stethoscope", "nurse": "badge"}
SEXES = ("male", "female")
AGES = ("young", "old")

SKIN = np.array(
    [[255, 224, 196], [241, 194, 160], [224, 172, 125], [198, 134, 90], [141, 85, 54], [92, 56, 38]]
)
# Natural hair colours of the young; grey is the age cue, so none of them is grey.
HAIR = np.array(
    [[25, 20, 18], [70, 45, 30], [120, 80, 45], [200, 160, 90], [150, 60, 30], [95, 55, 35]]
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
    grey: float  # grey level the hair turns to when old
    grey_alpha: float  # how far the hair turns to it
    wrinkle_shade: float  # wrinkle colour = skin colour times this


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
        grey=rng.uniform(165, 215),
        grey_alpha=rng.uniform(0.7, 0.9),
        wrinkle_shade=rng.uniform(0.55, 0.7),
    )


def _colour(value: np.ndarray) -> tuple[int, int, int]:
    return tuple(min(255, max(0, int(v))) for v in np.asarray(value).tolist())


def render(
    p: PersonParams, label: str, group: str, age: str = "young"
) -> tuple[Image.Image, dict[str, np.ndarray]]:
    """Draw the person (group = sex); return the RGB image and a boolean mask per visible part.

    Masks: one per part of PARTS but the neck, with `face` including the wrinkles drawn on it, and
    `person` (every part).
    """
    if group not in SEXES or age not in AGES:
        raise ValueError(f"unknown sex {group!r} or age {age!r} (sexes {SEXES}, ages {AGES})")
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
    female, old = group == "female", age == "old"
    hair = p.hair * (1 - p.grey_alpha) + p.grey * p.grey_alpha if old else p.hair
    # Torso and neck.
    half = p.shoulder * r
    paint(
        "polygon",
        "clothes",
        [(cx - half, top), (cx + half, top), (cx + half * 1.25, size), (cx - half * 1.25, size)],
        p.clothes,
    )
    paint("rectangle", "neck", [cx - 0.35 * r, hy + 0.6 * r, cx + 0.35 * r, top + 1 * s], p.skin)
    # Hair behind the head: for women it reaches the chin and falls in two locks beside the neck
    # to the shoulders, clear of the chest where the job cue lies.
    if female:
        paint(
            "rounded_rectangle",
            "hair",
            [cx - 1.45 * r, hy - 1.15 * r, cx + 1.45 * r, hy + 1.0 * r],
            hair,
            radius=r,
        )
        for x0, x1 in ((cx - 1.5 * r, cx - 0.95 * r), (cx + 0.95 * r, cx + 1.5 * r)):
            paint("rounded_rectangle", "hair", [x0, hy, x1, top + 5 * s], hair, radius=0.3 * r)
    # Face, with its sex cue: red lips or a beard shadow (the beard keeps the natural colour, so
    # an age twin changes only hair and wrinkles).
    paint("ellipse", "face", [cx - r, hy - r, cx + r, hy + r], p.skin)
    if female:
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
    if female:
        paint(
            "chord",
            "hair",
            [cx - 1.1 * r, hy - 1.2 * r, cx + 1.1 * r, hy + 0.2 * r],
            hair,
            start=180,
            end=360,
        )
    else:
        paint(
            "chord",
            "hair",
            [cx - 1.02 * r, hy - 1.12 * r, cx + 1.02 * r, hy - 0.1 * r],
            hair,
            start=190,
            end=350,
        )
    # Age cue on the face: crow's feet, under-eye lines and nasolabial folds, between the fringe
    # (above hy - 0.5 r) and the beard (below hy + 0.34 r), painted over both.
    if old:
        width = max(1, round(s))
        wrinkle = p.skin * p.wrinkle_shade
        for side in (-1, 1):
            for y0, y1 in ((-0.2, -0.32), (-0.08, 0.02)):  # crow's feet, fanning out
                line = [(cx + side * 0.6 * r, hy + y0 * r), (cx + side * 0.86 * r, hy + y1 * r)]
                paint("line", "wrinkles", line, wrinkle, width=width)
            under_eye = [
                (cx + side * 0.28 * r, hy + 0.05 * r),
                (cx + side * 0.5 * r, hy + 0.05 * r),
            ]
            paint("line", "wrinkles", under_eye, wrinkle, width=width)
            fold = [(cx + side * 0.2 * r, hy + 0.12 * r), (cx + side * 0.36 * r, hy + 0.3 * r)]
            paint("line", "wrinkles", fold, wrinkle, width=width)
    # Job cue, last and clear of every protected cue, in a colour close to the clothes': the chest
    # piece and lower tubes of a stethoscope (its upper part is under the collar), or a small badge.
    # Its shape is fixed (a nominal head radius) and anchored on whole pixels, so its area is the
    # same for every person: the class evidence is as visible in one group as in another. Both
    # are about as large (about 20 pixels at 64 x 64) as the stethoscope that long hair used to leave
    # visible, so the job stays harder to see than the protected cues, and a shortcut pays.
    cue = p.clothes + p.cue_shift * (1 if p.clothes.mean() < 128 else -1) * np.sign(p.cue_shift)
    ox, oy, dx, nominal = round(cx), round(top), round(p.cue_dx), 8.5 * s
    if label == "doctor":
        y0, y1, width = oy + 5 * s, oy + 8 * s, max(1, round(s))
        for side in (-1, 1):
            tube = [(ox + side * 0.45 * nominal + dx / 2, y0), (ox + side * 0.3 * nominal + dx, y1)]
            paint("line", "stethoscope", tube, cue, width=width)
        disc = 1.5 * s
        px, py = ox + 0.3 * nominal + dx, y1 + 1.5 * s
        paint("ellipse", "stethoscope", [px - disc, py - disc, px + disc, py + disc], cue)
    else:
        bx, by, half = ox - round(0.8 * nominal) + dx, oy + round(9 * s), round(2 * s)
        paint("rectangle", "badge", [bx - half, by - half, bx + half, by + half - 1], cue)
        light = p.clothes
        paint("line", "badge", [(bx - half + 1, by), (bx + half - 1, by)], light, width=1)
        paint("line", "badge", [(bx, by - half + 1), (bx, by + half - 2)], light, width=1)

    pixels = np.asarray(rgb, dtype=np.int16) + p.noise
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    labels = np.asarray(parts)
    masks = {name: labels == pid for name, pid in PARTS.items() if name != "neck"}
    masks["face"] |= masks["wrinkles"]
    masks["person"] = labels > 0
    return image, masks
