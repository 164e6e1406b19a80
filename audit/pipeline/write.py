"""The write stage: the run folder's files, written into the work folder before it is installed.

samples.csv, per_cell.csv and mistakes.csv (the rows every metric comes from), config.json and
metrics.json, the gates as log lines, run.json (how and where the run was computed, with the
software's versions) and run.log; the report is rendered last, from those files alone.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from audit.metrics import validity
from audit.models.io import sha256
from audit.pipeline.gallery import cell_names
from audit.pipeline.plan import RunContext
from audit.pipeline.rundir import list_files
from audit.version import __version__


def write_tables(work: Path, tables: dict[str, pd.DataFrame], per_cell: pd.DataFrame) -> None:
    """per_cell.csv, samples.csv and mistakes.csv; the map's shards are then no longer needed."""
    per_cell.to_csv(work / "per_cell.csv", index=False, lineterminator="\n")
    samples = pd.concat(tables.values(), ignore_index=True)
    samples.to_csv(work / "samples.csv", index=False, lineterminator="\n")
    mistakes = samples[~samples["correct"]].assign(cell=lambda t: cell_names(t))
    mistakes.sort_values(
        ["model", "cell", "confidence"], ascending=[True, True, False], kind="stable"
    )[["model", "image", "label", "group", "prediction", "confidence"]].to_csv(
        work / "mistakes.csv", index=False, lineterminator="\n"
    )
    shutil.rmtree(work / "shards", ignore_errors=True)


def write_metrics(ctx: RunContext, metrics: dict[str, Any]) -> None:
    """config.json (the config as resolved) and metrics.json; each gate logged in the report's
    units (percent for shares and accuracies, points for gaps)."""
    from audit.report.words import gate_figure, threshold_text

    work = ctx.work
    (work / "config.json").write_text(json.dumps(ctx.plan.config.to_dict(), indent=2) + "\n")
    write_json(work / "metrics.json", metrics)
    for gate in metrics["gates"]:
        status = "PASS" if gate["passed"] else "FAIL"
        if gate.get("status") in (*validity.STATUS_ORDER, "not trusted"):
            status = gate["status"].upper()
        value = gate_figure(gate, interval=False)
        ctx.log(
            f"gate {status}: {gate['model']}: {gate['label']} {value} "
            f"(must be {gate['op']} {threshold_text(gate)})"
        )


def run_info(ctx: RunContext, started: float) -> dict[str, Any]:
    """run.json's record of how the run was computed (written again once the run has finished)."""
    plan = ctx.plan
    info = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "device": str(plan.device),
        "workers": plan.workers,
        "precision": plan.options.precision,
        "ray": plan.options.ray,
        "manifest_sha256": sha256(plan.manifest.path),
        "dataset_sha256": plan.manifest.checksum(),
        "versions": software_versions(),
        "platform": platform.platform(),
    }
    write_json(ctx.work / "run.json", info)
    (ctx.work / "run.log").write_text("\n".join(ctx.log.lines) + "\n")
    return info


def finish(ctx: RunContext, info: dict[str, Any], out: Path, started: float) -> None:
    """The report (unless switched off), then run.log and run.json with the duration and files."""
    work, log = ctx.work, ctx.log
    if ctx.plan.options.render:
        from audit.report.render import render_report

        render_report(work, echo=lambda m: log(m.replace(str(work), str(out))))
    info["duration_s"] = round(time.time() - started, 2)
    (work / "run.log").write_text("\n".join(log.lines) + "\n")
    info["files"] = sorted({*list_files(work), "run.json"} - {"resume.json"})
    write_json(work / "run.json", info)


def software_versions() -> dict[str, str]:
    """The versions of the software that computed the run, for its reproducibility section.

    Read from the installed distributions' metadata: importing fairlearn or WeasyPrint only to
    read `__version__` cost seconds of every run."""
    import torchvision  # imported by the model sources anyway; its version names the build

    versions = {"audit": __version__, "python": platform.python_version()}
    versions |= {"torch": torch.__version__, "torchvision": torchvision.__version__}
    names = ["numpy", "pandas", "scikit-learn", "fairlearn", "matplotlib", "jinja2", "weasyprint"]
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def write_json(path: Path, data: Any) -> None:
    """`data` as indented JSON (NumPy scalars as numbers; NaN refused)."""
    path.write_text(
        json.dumps(data, indent=2, allow_nan=False, default=_json_default) + "\n", encoding="utf-8"
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.bool_):
        return bool(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
