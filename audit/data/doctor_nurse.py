"""The generated doctor/nurse data set: the Grad-CAM paper's bias experiment with exact masks.

The class (doctor, nurse) is carried by small job cues (a stethoscope, a badge); the group (male,
female) by large hair and face cues. `train_biased` follows the paper (78% of doctors male, 93% of
nurses female), `train_balanced` is 50/50 in each class, `val` and `test` are balanced over the four
cells, and every test image has a counterfactual twin with the group swapped.
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

from audit.data.draw import JOB_CUES, PROTECTED_PARTS, render, sample_params

LABELS = ("doctor", "nurse")
GROUPS = ("male", "female")
REGIONS = ("hair", "face", "clothes", "stethoscope", "badge")
SPLITS = ("train_biased", "train_balanced", "val", "test")


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

    def validate(self) -> None:
        if self.image_size < 32:
            raise ValueError(f"image size must be at least 32 pixels, got {self.image_size}")
        for name in ("n_train", "n_val", "n_test"):
            if getattr(self, name) < 4:
                raise ValueError(f"{name} must be at least 4, got {getattr(self, name)}")
        for name in ("doctor_male", "nurse_female"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie between 0 and 1, got {getattr(self, name)}")


def cell_counts(n: int, male_share: dict[str, float]) -> dict[tuple[str, str], int]:
    """Images per (label, group) cell for a split of n images, half of each class."""
    counts = {}
    per_class = {"doctor": n // 2, "nurse": n - n // 2}
    for label in LABELS:
        males = round(per_class[label] * male_share[label])
        counts[label, "male"] = males
        counts[label, "female"] = per_class[label] - males
    return counts


def split_plan(spec: DoctorNurseSpec) -> dict[str, dict[tuple[str, str], int]]:
    """The cell counts of every split."""
    balanced = {"doctor": 0.5, "nurse": 0.5}
    return {
        "train_biased": cell_counts(
            spec.n_train, {"doctor": spec.doctor_male, "nurse": 1 - spec.nurse_female}
        ),
        "train_balanced": cell_counts(spec.n_train, balanced),
        "val": cell_counts(spec.n_val, balanced),
        "test": cell_counts(spec.n_test, balanced),
    }


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
    items: tuple[tuple[int, str, str], ...]  # (index, label, group)


def _render_chunk(job: _Job) -> list[dict]:
    spec = DoctorNurseSpec(**job.spec)
    root = Path(job.root)
    rows = []
    for index, label, group in job.items:
        rng = np.random.default_rng([spec.seed, job.split_index, index])
        params = sample_params(rng, spec.image_size)
        image, masks = render(params, label, group)
        stem = f"{job.split}/{index:05d}"
        row = {"image": f"images/{stem}.png", "label": label, "group": group, "split": job.split}
        image.save(root / row["image"], optimize=False)
        if job.split == "test":
            other = GROUPS[1 - GROUPS.index(group)]
            twin, _ = render(params, label, other)
            row["twin"] = f"twins/{stem}.png"
            twin.save(root / row["twin"], optimize=False)
        else:
            row["twin"] = ""
        for region in REGIONS:
            if masks[region].any():
                row[f"mask:{region}"] = f"masks/{stem}_{region}.png"
                _save_mask(masks[region], root / row[f"mask:{region}"])
            else:
                row[f"mask:{region}"] = ""
        row["box:person"] = _box(masks["person"])
        row["job_cue"] = JOB_CUES[label]
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
    counts = (
        frame.groupby(["split", "label", "group"]).size().unstack(["label", "group"], fill_value=0)
    )
    lines = [
        "# Generated doctor/nurse data set",
        "",
        f"Made by `audit data doctor-nurse` with {asdict(spec)}.",
        f"Protected regions: {', '.join(PROTECTED_PARTS)}; job cues: {JOB_CUES}.",
        "",
        "Images per split and (label, group) cell:",
        "",
        "```",
        counts.to_string(),
        "```",
        "",
    ]
    return "\n".join(lines)
