"""Measure a generated doctor/nurse set: job-cue visibility per group, twin cue equality, cells.

    python benchmarks/measure_doctor_nurse.py datasets/doctor_nurse/manifest.csv

Reads the files only (masks and images as written), so it checks the data set, not the drawing
code: the visible cue area is the pixel count of the row's `mask:stethoscope` (doctors) or
`mask:badge` (nurses); a twin keeps the cue when every pixel under the original's cue mask is
equal in the twin image.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

CUE = {"doctor": "stethoscope", "nurse": "badge"}


def _read(root: Path, relative: str) -> np.ndarray:
    with Image.open(root / relative) as image:
        return np.asarray(image)


def cue_areas(manifest: Path) -> pd.DataFrame:
    """The manifest's rows with a `cue_area` column (visible job-cue pixels)."""
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    root = manifest.parent
    masks = [_read(root, row[f"mask:{CUE[row['label']]}"]) for _, row in table.iterrows()]
    table["cue_area"] = (np.stack(masks) > 0).sum(axis=(1, 2))
    return table


def group_gaps(table: pd.DataFrame) -> pd.DataFrame:
    """Per split, class and attribute: mean cue area of each group and the relative gap."""
    rows = []
    for attribute in ("sex", "age"):
        means = table.groupby(["split", "label", f"group:{attribute}"])["cue_area"].mean()
        for (split, label), by_group in means.groupby(level=[0, 1]):
            values = by_group.droplevel([0, 1])
            rows.append(
                {
                    "split": split,
                    "label": label,
                    "attribute": attribute,
                    **{str(k): round(float(v), 2) for k, v in values.items()},
                    "gap_%": round(100 * (values.max() - values.min()) / values.mean(), 2),
                }
            )
    return pd.DataFrame(rows)


def twin_cue_equality(table: pd.DataFrame, root: Path) -> dict[str, str]:
    """Per twin column: rows whose twin equals the original at every pixel of the cue mask."""
    test = table[table["split"] == "test"]
    result = {}
    for column in ("twin:sex", "twin:age"):
        equal = 0
        for _, row in test.iterrows():
            cue = _read(root, row[f"mask:{CUE[row['label']]}"]) > 0
            original, twin = _read(root, row["image"]), _read(root, row[column])
            equal += bool((original[cue] == twin[cue]).all())
        result[column] = f"{equal}/{len(test)}"
    return result


def main(manifest: Path) -> None:
    table = cue_areas(manifest)
    pd.set_option("display.width", 140)
    print("visible job-cue pixels per group (gap = (max - min) / mean):")
    print(group_gaps(table).to_string(index=False))
    print(
        "\ntwins equal to their original on every cue pixel:",
        twin_cue_equality(table, manifest.parent),
    )
    cells = ["label", "group:sex", "group:age"]
    print("\nimages per cell:")
    print(table.groupby(["split", *cells]).size().unstack(cells, fill_value=0).to_string())


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "datasets/doctor_nurse/manifest.csv"))
