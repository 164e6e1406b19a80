"""The generated doctor/nurse data set: the Grad-CAM paper's bias experiment with exact masks.

The class (doctor, nurse) is carried by small job cues (a stethoscope, a badge), equally visible
in every group; two protected attributes by larger cues: sex (male, female: long hair, lips or
beard) and age (young, old: grey hair, wrinkles). `train_biased` follows the paper for sex (78% of
doctors male, 93% of nurses female) and adds a weaker age bias (70% of doctors old, 70% of nurses
young), the two independent within a class, so the minority intersections (young female doctors,
old male nurses) are the rarest; `train_balanced` is 50/50 on both attributes in each class,
`val` and `test` are balanced over the eight class x sex x age cells, and every test image has two
counterfactual twins: `twin:sex` (sex swapped) and `twin:age` (age swapped).

Manifest columns: image, label, group (= sex, for one-attribute readers), group:sex, group:age,
split, twin (= twin:sex), twin:sex, twin:age, mask:<region> for REGIONS, box:person, job_cue.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from audit.data.draw import AGES, JOB_CUES, PROTECTED_PARTS, SEXES, render, sample_params

LABELS = ("doctor", "nurse")
GROUPS = SEXES  # the first attribute, kept under its old name
ATTRIBUTES = {"sex": SEXES, "age": AGES}
REGIONS = ("hair", "face", "clothes", "stethoscope", "badge", "wrinkles")
SPLITS = ("train_biased", "train_balanced", "val", "test")
Cell = tuple[str, str, str]  # (label, sex, age)


@dataclass(frozen=True)
class DoctorNurseSpec:
    """What to generate; every field has the default used by `audit demo`."""

    seed: int = 0
    image_size: int = 64
    n_train: int = 1600  # per training split
    n_val: int = 400
    n_test: int = 800
    doctor_male: float = 0.78  # share of doctors who are men in train_biased
    nurse_female: float = 0.93  # share of nurses who are women in train_biased
    doctor_old: float = 0.7  # share of doctors who are old in train_biased (each sex alike)
    nurse_young: float = 0.7  # share of nurses who are young in train_biased (each sex alike)
    # A hidden shortcut no manifest column names: a small mark in the top-left corner on this
    # class's images ("" for none), on `mark_train` of them in an extra split `train_marked`
    # (balanced like train_balanced) and on `mark_test` of them in val and test. Which images
    # carry it is written to hidden_mark.csv beside the manifest, for checking a discovery only.
    mark_class: str = ""
    mark_train: float = 0.95
    mark_test: float = 0.5

    def validate(self) -> None:
        if self.image_size < 32:
            raise ValueError(f"image size must be at least 32 pixels, got {self.image_size}")
        for name in ("n_train", "n_val", "n_test"):
            if getattr(self, name) < 4:
                raise ValueError(f"{name} must be at least 4, got {getattr(self, name)}")
        if self.mark_class and self.mark_class not in LABELS:
            raise ValueError(
                f"mark class must be one of {', '.join(LABELS)}, got {self.mark_class}"
            )
        for name in (
            "doctor_male",
            "nurse_female",
            "doctor_old",
            "nurse_young",
            "mark_train",
            "mark_test",
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie between 0 and 1, got {getattr(self, name)}")


def cell_counts(
    n: int, male_share: dict[str, float], old_share: dict[str, float] | None = None
) -> dict[Cell, int]:
    """Images per (label, sex, age) cell for a split of n images, half of each class.

    Within a class, sex is split by `male_share`, then each sex by `old_share` (default 50/50),
    each rounded to whole images, so age is independent of sex within a class.
    """
    old_share = old_share or {label: 0.5 for label in LABELS}
    counts = {}
    per_class = {"doctor": n // 2, "nurse": n - n // 2}
    for label in LABELS:
        males = round(per_class[label] * male_share[label])
        for sex, count in (("male", males), ("female", per_class[label] - males)):
            olds = round(count * old_share[label])
            counts[label, sex, "young"] = count - olds
            counts[label, sex, "old"] = olds
    return counts


def split_plan(spec: DoctorNurseSpec) -> dict[str, dict[Cell, int]]:
    """The (label, sex, age) cell counts of every split."""
    balanced = {"doctor": 0.5, "nurse": 0.5}
    plan = {
        "train_biased": cell_counts(
            spec.n_train,
            {"doctor": spec.doctor_male, "nurse": 1 - spec.nurse_female},
            {"doctor": spec.doctor_old, "nurse": 1 - spec.nurse_young},
        ),
        "train_balanced": cell_counts(spec.n_train, balanced),
        "val": cell_counts(spec.n_val, balanced),
        "test": cell_counts(spec.n_test, balanced),
    }
    if spec.mark_class:
        plan["train_marked"] = cell_counts(spec.n_train, balanced)
    return plan


def mark_share(spec: DoctorNurseSpec, split: str, label: str) -> float:
    """The share of a split's images of `label` that carry the hidden mark."""
    if not spec.mark_class or label != spec.mark_class:
        return 0.0
    return {"train_marked": spec.mark_train, "val": spec.mark_test, "test": spec.mark_test}.get(
        split, 0.0
    )


def draw_mark(image: Image.Image) -> Image.Image:
    """The hidden mark: a small white square with a black border, in the top-left corner."""
    pixels = np.array(image)
    side = max(3, image.width // 12)
    pixels[1 : 1 + side, 1 : 1 + side] = 0
    pixels[2:side, 2:side] = 255
    return Image.fromarray(pixels)


def _swap(value: str, values: tuple[str, str]) -> str:
    return values[1 - values.index(value)]


def _save_mask(mask: np.ndarray, path: Path) -> None:
    Image.fromarray(mask.astype(np.uint8) * 255).save(path, optimize=False)


def _box(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    return f"{xs.min()} {ys.min()} {xs.max() + 1} {ys.max() + 1}"


@dataclass(frozen=True)
class _Job:
    root: str
    spec: dict
    split: str
    split_index: int
    items: tuple[tuple[int, str, str, str], ...]  # (index, label, sex, age)


def _render_chunk(job: _Job) -> list[dict]:
    spec = DoctorNurseSpec(**job.spec)
    root = Path(job.root)
    rows = []
    for index, label, sex, age in job.items:
        rng = np.random.default_rng([spec.seed, job.split_index, index])
        params = sample_params(rng, spec.image_size)
        image, masks = render(params, label, sex, age)
        share = mark_share(spec, job.split, label)
        marked = (
            bool(share)
            and np.random.default_rng([spec.seed, job.split_index, index, 7]).uniform() < share
        )
        if marked:
            image = draw_mark(image)
        stem = f"{job.split}/{index:05d}"
        row = {
            "image": f"images/{stem}.png",
            "label": label,
            "group": sex,
            "group:sex": sex,
            "group:age": age,
            "split": job.split,
        }
        image.save(root / row["image"], optimize=False)
        twins = {"sex": "", "age": ""}
        if job.split == "test":
            for attribute, person in (
                ("sex", (_swap(sex, SEXES), age)),
                ("age", (sex, _swap(age, AGES))),
            ):
                twin, _ = render(params, label, *person)
                twin = draw_mark(twin) if marked else twin
                twins[attribute] = f"twins/{stem}_{attribute}.png"
                twin.save(root / twins[attribute], optimize=False)
        row["twin"] = twins["sex"]
        row["twin:sex"] = twins["sex"]
        row["twin:age"] = twins["age"]
        for region in REGIONS:
            if masks[region].any():
                row[f"mask:{region}"] = f"masks/{stem}_{region}.png"
                _save_mask(masks[region], root / row[f"mask:{region}"])
            else:
                row[f"mask:{region}"] = ""
        row["box:person"] = _box(masks["person"])
        row["job_cue"] = JOB_CUES[label]
        if spec.mark_class:
            row["hidden_mark"] = marked  # moved out of the manifest into hidden_mark.csv
        rows.append(row)
    return rows


def _jobs(spec: DoctorNurseSpec, root: Path, chunk: int = 200) -> Iterator[_Job]:
    for split_index, (split, counts) in enumerate(split_plan(spec).items()):
        cells = [cell for cell, count in counts.items() for _ in range(count)]
        order = np.random.default_rng([spec.seed, split_index]).permutation(len(cells))
        items = tuple((i, *cells[j]) for i, j in enumerate(order))
        for directory in ("images", "masks") + (("twins",) if split == "test" else ()):
            (root / directory / split).mkdir(parents=True, exist_ok=True)
        for start in range(0, len(items), chunk):
            yield _Job(str(root), asdict(spec), split, split_index, items[start : start + chunk])


def generate(
    spec: DoctorNurseSpec,
    out: Path,
    *,
    overwrite: bool = False,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Write images, masks, twins and `manifest.csv` under `out`; return the manifest's path.

    Files are written to a temporary folder beside `out` and moved into place at the end, so an
    interrupted run never leaves a half-written data set behind.
    """
    spec.validate()
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        jobs = list(_jobs(spec, tmp))
        workers = workers or min(len(jobs), os.cpu_count() or 1)
        rows: list[dict] = []
        bar = tqdm(
            total=sum(len(j.items) for j in jobs),
            desc="doctor/nurse",
            unit="img",
            disable=not progress,
        )
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                for chunk_rows in pool.map(_render_chunk, jobs):
                    rows.extend(chunk_rows)
                    bar.update(len(chunk_rows))
        else:
            for job in jobs:
                chunk_rows = _render_chunk(job)
                rows.extend(chunk_rows)
                bar.update(len(chunk_rows))
        bar.close()
        frame = pd.DataFrame(rows)
        if spec.mark_class:
            frame[["image", "hidden_mark"]].to_csv(
                tmp / "hidden_mark.csv", index=False, lineterminator="\n"
            )
            frame = frame.drop(columns="hidden_mark")
        frame.to_csv(tmp / "manifest.csv", index=False, lineterminator="\n")
        (tmp / "README.md").write_text(describe(spec, frame))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "manifest.csv"


def describe(spec: DoctorNurseSpec, frame: pd.DataFrame) -> str:
    """A short README for a generated data set: its parameters and cell counts."""
    attributes = ", ".join(f"{name} ({'/'.join(values)})" for name, values in ATTRIBUTES.items())
    cells = ["label", "group:sex", "group:age"]
    counts = frame.groupby(["split", *cells]).size().unstack(cells, fill_value=0)
    lines = [
        "# Generated doctor/nurse data set",
        "",
        f"Made by `audit data doctor-nurse` with {asdict(spec)}.",
        f"Protected attributes: {attributes};"
        f" protected regions: {', '.join(PROTECTED_PARTS)} (the age cue region: wrinkles);"
        f" job cues: {JOB_CUES}.",
        "",
        "Images per split and (label, sex, age) cell:",
        "",
        "```",
        counts.to_string(),
        "```",
        "",
    ]
    return "\n".join(lines)
