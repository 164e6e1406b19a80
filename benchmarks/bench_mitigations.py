"""Mitigations on the doctor/nurse `train_biased` split, selected as their papers do: worst cell,
attention, occlusion, time, and the paired difference against plain training.

Per seed (`--seeds`), the built-in SmallCNN (AdamW, lr 3e-3 one-cycle, batch 64, flips, 64 px) is
trained plainly on `train_biased` (no selection: what a team gets by default), then with each
mitigation through `audit.models.selection.train_selected`: its default grid
(audit.models.mitigations.DEFAULT_GRIDS), every point stopped at its best validation epoch, the
point with the best validation worst class x sex accuracy kept. DFR retrains the plain model's
last layer on `val` (audit.models.dfr). Every model is measured once on `--eval-split` (test):

- accuracy and the worst class x sex cell, with a Wilson 95% interval;
- the paired bootstrap difference of worst-cell accuracy against the same seed's plain model
  (same test images, `audit.metrics.performance.headline_samples`, 1,000 resamples): "harmful"
  when its whole 95% interval is below 0, as the report marks it;
- the share of the Grad-CAM mass (predicted class, layer `features`) on hair + face, and the
  occlusion effect of hair + face (mean fill, against a same-shaped control; the audit's own
  `region_occlusion`): how much the prediction still depends on those pixels;
- training time in CPU seconds of this process (one torch thread; robust to other load) and its
  ratio to plain training's with the same seed; DFR's is plain training plus the refit.

    .venv/bin/audit data doctor-nurse --out /tmp/dn95 --doctor-male 0.95 --nurse-female 0.95
    nice .venv/bin/python benchmarks/bench_mitigations.py /tmp/dn95/manifest.csv --seeds 0 \
        --out benchmarks/results/mitigations_seed0.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from in_memory import load_samples  # benchmarks/in_memory.py, beside this script

from audit.data.manifest import read_manifest
from audit.explain import explain
from audit.metrics.attention import mass_share
from audit.metrics.bootstrap import estimate, resample_weights
from audit.metrics.performance import headline_samples
from audit.metrics.trust.occlusion import region_occlusion
from audit.models.dfr import reweight_last_layer
from audit.models.mitigations import MITIGATIONS, MitigationConfig
from audit.models.selection import train_selected
from audit.models.train import TensorDictDataset, TrainConfig, predict_logits, train_model
from audit.models.zoo import SmallCNN

PROTECTED = ("hair", "face")
CORE = ("stethoscope", "badge")


def load(manifest_path: str, split: str, groups: list[str], classes: list[str], size: int):  # noqa: ANN201
    """The split as a TensorDictDataset (protected = hair + face) and the core regions' union."""
    manifest = read_manifest(manifest_path)
    samples = load_samples(manifest, manifest.split(split), classes, size)
    group_index = {g: i for i, g in enumerate(groups)}
    group = torch.tensor([group_index.get(g, -1) for g in samples.rows["group"]])
    protected = torch.stack([samples.regions[r] for r in PROTECTED]).any(0)
    core = torch.stack([samples.regions[r] for r in CORE if r in samples.regions]).any(0)
    return TensorDictDataset(samples.images, samples.labels, group, protected), core


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson 95% interval of a proportion k / n."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def evaluate(model: torch.nn.Module, data: TensorDictDataset, core: torch.Tensor, names) -> dict:  # noqa: ANN001
    """Accuracy, cells, worst cell, Grad-CAM share and occlusion effect on hair + face."""
    classes, groups = names
    correct = predict_logits(model, data).argmax(1) == data.labels
    cells = {}
    for c, cls in enumerate(classes):
        for g, group in enumerate(groups):
            sel = (data.labels == c) & (data.groups == g)
            k, n = int(correct[sel].sum()), int(sel.sum())
            cells[f"{cls}/{group}"] = {"accuracy": k / n, "ci": wilson(k, n), "n": n}
    worst = min(cells, key=lambda key: cells[key]["accuracy"])
    shares = []
    for start in range(0, len(data), 200):
        maps = explain(model, data.images[start : start + 200], "gradcam", layer="features")
        shares.append(mass_share(maps, data.protected[start : start + 200]))
    present = data.protected.flatten(1).any(1)
    occlusion = region_occlusion(
        model, data.images, {"protected": data.protected}, {"protected": present},
        fills=("mean",), seed=0, avoid=core,
    )  # fmt: skip
    return {
        "accuracy": float(correct.float().mean()),
        "correct": correct.numpy().astype(float),
        "worst_cell": worst,
        "worst_cell_accuracy": cells[worst]["accuracy"],
        "worst_cell_ci": cells[worst]["ci"],
        "cells": cells,
        "protected_share": float(torch.cat(shares).nanmean()),
        "protected_area": float(data.protected.float().mean()),
        "occlusion_effect": float(np.nanmean(occlusion["regions"]["protected"]["mean"]["effect"])),
    }


def paired_worst(plain: np.ndarray, other: np.ndarray, data: TensorDictDataset, seed: int) -> dict:
    """Worst-cell accuracy difference (other - plain) with its paired bootstrap 95% interval."""
    weights = resample_weights(len(plain), 1000, seed)
    labels, groups = data.labels.numpy(), data.groups.numpy()
    a = headline_samples(plain, labels, groups, weights)["worst_group_accuracy"]
    b = headline_samples(other, labels, groups, weights)["worst_group_accuracy"]
    diff = estimate(b[0] - a[0], b[1:] - a[1:])
    return diff | {"harmful": diff["ci_high"] is not None and diff["ci_high"] < 0}


def run_one(
    name: str, seed: int, sets: dict, args: argparse.Namespace
) -> tuple[dict, torch.nn.Module]:  # noqa: E501
    """Train one model (plain, a selected mitigation, or DFR on the plain model)."""
    torch.manual_seed(seed)
    model = SmallCNN(num_classes=2)
    base = TrainConfig(epochs=args.epochs, seed=seed)
    started = time.process_time()
    if name == "none":
        history = train_model(model, sets["train"], base, val=sets["val"], progress=False)
        record = {"config": {"mitigation": "none"}}
    elif name == "dfr":
        model.load_state_dict(sets["plain_state"])
        record = {"dfr": reweight_last_layer(model, sets["val"], 2, seed=seed)}
        record["config"] = {"mitigation": "dfr", "C": record["dfr"]["C"]}
        history = None
    else:
        grid = {k: [json.loads(v) for v in vs.split(",")] for k, vs in args.grid}
        mitigation = MitigationConfig(name, grid=grid)
        config = TrainConfig(epochs=args.epochs, seed=seed, mitigation=mitigation)
        history = train_selected(model, sets["train"], config, val=sets["val"], progress=False)
        chosen = (history.selection or {}).get("chosen") or {}
        record = {  # the values the selection chose, not the mitigation's unsearched defaults
            "config": mitigation.with_values(chosen).resolved(),
            "selection": history.selection,
        }
    record["cpu_seconds"] = time.process_time() - started
    if history is not None:
        record |= {"val_worst_group_curve": history.val_worst_group_accuracy}
    return record, model


def table(paths: list[str]) -> str:
    """A Markdown table of saved runs: per mitigation, each seed's test worst cell (and the
    paired difference against plain with its 95% CI), the Grad-CAM share and occlusion effect on
    hair + face, and time against plain."""
    runs = [r | {"file": Path(p).stem} for p in paths for r in json.loads(Path(p).read_text())]
    lines = [
        "| file | training | seed | test acc | worst cell [95% CI] | vs plain, worst cell [95% CI] "
        "| hair+face Grad-CAM share | hair+face occlusion effect | CPU s (x plain) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = {n: i for i, n in enumerate(MITIGATIONS)}
    for r in sorted(runs, key=lambda r: (r["file"], order.get(r["name"], 99), r["seed"])):
        low, high = r["worst_cell_ci"]
        d = r.get("worst_cell_difference")
        vs = (
            f"{d['value']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
            + (" harmful" if d["harmful"] else "")
            if d
            else "-"
        )
        chosen = (r.get("selection") or {}).get("chosen")
        name = r["name"] + (f" ({json.dumps(chosen)})" if chosen else "")
        name += f" (C {r['dfr']['C']})" if "dfr" in r else ""
        lines.append(
            f"| {r['file']} | {name} | {r['seed']} | {r['accuracy']:.3f} | {r['worst_cell']} "
            f"{r['worst_cell_accuracy']:.3f} [{low:.3f}, {high:.3f}] | {vs} | "
            f"{r['protected_share']:.3f} | {r['occlusion_effect']:+.3f} | "
            f"{r['cpu_seconds']:.1f} (x{r['time_vs_plain']:.3f}) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("manifest", nargs="?")
    parser.add_argument("--table", nargs="+", default=None, help="print saved runs as Markdown")
    parser.add_argument("--eval-split", default="test")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed")
    parser.add_argument("--only", action="append", choices=MITIGATIONS, default=None)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        type=lambda text: tuple(text.split("=", 1)),
        help="KEY=v1,v2: this grid instead of the mitigation's default (repeatable)",
    )
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
        return
    if not args.manifest:
        parser.error("the manifest is required (or --table FILE ...)")
    torch.set_num_threads(args.threads)
    manifest = read_manifest(args.manifest)
    classes = sorted(set(manifest.table["label"]))
    groups = sorted(set(manifest.table["group"]) - {""})
    train, _ = load(args.manifest, "train_biased", groups, classes, 64)
    val, _ = load(args.manifest, "val", groups, classes, 64)
    data, core = load(args.manifest, args.eval_split, groups, classes, 64)
    names = ["none", *(n for n in (args.only or MITIGATIONS) if n != "none")]
    runs = []
    for seed in args.seeds:
        sets = {"train": train, "val": val}
        plain = None
        for name in names:
            record, model = run_one(name, seed, sets, args)
            if name == "none":
                sets["plain_state"] = {k: v.clone() for k, v in model.state_dict().items()}
            result = evaluate(model, data, core, (classes, groups))
            correct = result.pop("correct")
            if name == "none":
                plain = (correct, record["cpu_seconds"])
            else:
                result["worst_cell_difference"] = paired_worst(plain[0], correct, data, seed)
            seconds = record["cpu_seconds"] + (plain[1] if name == "dfr" else 0.0)
            result |= record | {
                "name": name,
                "seed": seed,
                "epochs": args.epochs,
                "eval_split": args.eval_split,
                "time_vs_plain": seconds / plain[1],
            }
            runs.append(result)
            diff = result.get("worst_cell_difference")
            print(
                f"{name:18s} seed {seed}: acc {result['accuracy']:.3f}  worst "
                f"{result['worst_cell']} {result['worst_cell_accuracy']:.3f} "
                f"[{result['worst_cell_ci'][0]:.3f}-{result['worst_cell_ci'][1]:.3f}]"
                + (
                    f"  vs plain {diff['value']:+.3f} [{diff['ci_low']:+.3f}, {diff['ci_high']:+.3f}]"
                    if diff
                    else ""
                )
                + f"  hair+face share {result['protected_share']:.3f}"
                + f"  occlusion {result['occlusion_effect']:+.3f}"
                + f"  cpu {record['cpu_seconds']:.0f}s (x{result['time_vs_plain']:.2f})"
                + (
                    f"  chosen {record['selection'].get('chosen')}"
                    if record.get("selection")
                    else ""
                )
                + (f"  C {record['dfr']['C']}" if "dfr" in record else ""),
                flush=True,
            )
            if args.out:  # after every run, so a long sweep that is stopped keeps what it did
                Path(args.out).write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
