"""What the trust checks cost: peak memory and time of an audit with trust on against trust off.

    python benchmarks/bench_trust.py [--images 1000] [--image-size 224]
        [--archs resnet18 timm:vit_tiny_patch16_224] [--data MANIFEST]

A doctor/nurse set with `--images` test images is generated (or `--data` is used); for each arch a
model with random weights (seed 0, saved as a state dict, built offline) is audited twice with
`audit run --no-report` and the default settings (Grad-CAM and Guided Grad-CAM, the default
`[trust]` table), once with `[trust] enabled = false`. The peak memory of the whole process tree
is sampled every 0.1 s by bench_scale's sampler (summed PSS, and summed RSS for comparison), with
the run.log line written last before the peak; the trust stage's time is the audit's own lap
("trust checks on N images in X s"), and the CPU time (user + system) of the whole tree is given
beside the wall time, being steadier on a shared machine. Extra `--trust KEY=VALUE` pairs go into the `[trust]` table
(e.g. `--trust samples=64`). Timings on a shared machine are noisy; memory is not. `--only on`
runs the audit with the checks only; `--keep DIR` keeps the run folders (and a generated data set)
in DIR, so run.log's stage laps can be read afterwards (docs/benchmarks.md derives the 20,000-image
"off" time as the audit less its trust lap).

    python benchmarks/bench_trust.py --unit-costs 8 --data MANIFEST [--archs resnet18]

measures instead, in this process, the CPU seconds per image of each check on the first 8 test
images (the maps of both methods, one measured cascade step, deletion / insertion at 20 steps,
occlusion of every region and union with both fills) and prints what a `[trust]` table costs
from them (forward and explanation passes counted per image): for the defaults, for the defaults
with every region and both fills occluded, and for 256 / 64 samples with every one of the
cascade's steps, 20 steps, every region and both fills.

    python benchmarks/bench_trust.py --stage AUDIT_TOML --out DIR [--trust KEY=VALUE ...]

runs the trust stage alone, as the audit runs it (same sample, seeds and settings), for each
model of an audit config (loaded from its checkpoints), on one thread, and prints its CPU and
wall seconds per model; DIR/metrics.json holds each model's trust block, for
benchmarks/compare_trust.py (run it once with the code before a change and once after).
"""

from __future__ import annotations

import argparse
import re
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import default_collate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_scale import run_measured, stage_at  # noqa: E402

from audit.data.doctor_nurse import DoctorNurseSpec, generate  # noqa: E402
from audit.models.io import save_checkpoint  # noqa: E402
from audit.models.sources import build_model  # noqa: E402


def write_config(
    folder: Path, manifest: Path, arch: str, image_size: int, trust: dict[str, str]
) -> Path:
    """An audit of one random-weight `arch` model at the default explain / trust settings."""
    torch.manual_seed(0)
    save_checkpoint(
        build_model(arch, 2), folder / "m.pt", arch=arch, classes=["doctor", "nurse"], meta={}
    )
    table = "\n".join(f"{key} = {value}" for key, value in trust.items())
    config = folder / "audit.toml"
    config.write_text(
        f"""bootstrap = 200
[data]
manifest = "{manifest}"
image_size = {image_size}
protected_regions = ["hair", "face"]
core_regions = ["stethoscope", "badge"]
[[model]]
name = "m"
arch = "{arch}"
checkpoint = "m.pt"
[trust]
{table}
"""
    )
    return config


def trust_seconds(run_log: Path) -> float | None:
    """The trust stage's own lap from run.log (None when it did not run)."""
    found = re.search(r"trust checks on \d+ images in ([0-9.]+) s", run_log.read_text())
    return float(found.group(1)) if found else None


def audit_once(folder: Path, config: Path, workers: int) -> dict:
    """Wall and CPU time (user + system, the whole process tree: steadier than the wall clock on
    a shared machine), peak PSS / RSS of the process tree, the stage at the peak, the trust lap."""
    audit = str(Path(sys.executable).parent / "audit")
    out = folder / "run"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall, peak_rss, peak_pss, peak_at = run_measured(
        [audit, "run", str(config), "--out", str(out), "--no-report", "--quiet"]
        + ["--force", "--workers", str(workers)]
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {
        "cpu": cpu,
        "wall": wall,
        "rss": peak_rss,
        "pss": peak_pss,
        "stage": stage_at(out / "run.log", peak_at),
        "trust": trust_seconds(out / "run.log"),
    }


def _cpu(run: Callable[[], object]) -> tuple[float, object]:
    started = time.process_time()
    result = run()
    return time.process_time() - started, result


def unit_costs(manifest_path: Path, arch: str, image_size: int, n: int) -> None:
    """CPU seconds per image of each check, and the cost of a trust table estimated from them."""
    from audit.data.manifest import read_manifest
    from audit.metrics.trust import TrustConfig, deletion_insertion, region_occlusion
    from audit.metrics.trust.ops import class_probs
    from audit.metrics.trust.randomization import absolute_maps, cascade_steps
    from audit.pipeline.frames import FrameDataset, squash
    from audit.pipeline.map import MapSpec

    torch.manual_seed(0)
    model = build_model(arch, 2).eval()
    manifest = read_manifest(manifest_path)
    regions = list(manifest.regions)
    data = FrameDataset(
        manifest, manifest.split("test"), ["doctor", "nurse"], squash(image_size), regions=regions
    )
    unions = {"protected": ["hair", "face"], "core": ["stethoscope", "badge"]}
    spec = MapSpec(layer=None, regions=regions, unions=unions, batch_size=32)
    batch = default_collate([data[i] for i in range(n)])
    x = batch["image"]
    methods = ["gradcam", "guided_gradcam"]
    class_probs(model, x[:2], 32)  # warm-up
    forward, _ = _cpu(lambda: class_probs(model, x, 32))
    explained, (heats, targets) = _cpu(lambda: absolute_maps(model, x, methods, None, 32))
    curves, _ = _cpu(lambda: deletion_insertion(model, x, heats, steps=20, targets=targets))
    masks, present = spec.region_tensors(batch, torch.device("cpu"))
    avoid = batch["regions"].any(dim=1)
    occluded, _ = _cpu(lambda: region_occlusion(model, x, masks, present, avoid=avoid))
    per = {k: v / n for k, v in (("forward", forward), ("explain", explained))}
    per["faithfulness_forward"] = curves / n / (3 + 2 * (len(methods) + 1) * 19)
    per["occlusion_forward"] = occluded / n / (1 + 2 * 2 * len(masks))
    print(
        f"{arch} at {image_size} px, CPU s per image: forward {per['forward']:.3f}, both maps "
        f"{per['explain']:.3f}, deletion / insertion at 20 steps {curves / n:.2f} "
        f"({per['faithfulness_forward']:.3f} per forward), occlusion of {len(masks)} regions x 2 "
        f"fills {occluded / n:.2f} ({per['occlusion_forward']:.3f} per forward)",
        flush=True,
    )
    n_steps = len(cascade_steps(model, "block"))
    old = TrustConfig(samples=256, faithfulness_samples=64, randomization_samples=256, steps=20)
    old.cascade_cuts = n_steps
    old.occlusion_regions, old.occlusion_fills = "all", ["mean", "blur"]
    every = TrustConfig(occlusion_regions="all", occlusion_fills=["mean", "blur"])
    tables = (
        ("256 / 64 samples, every cascade step, 20 steps, every region, both fills", old),
        ("defaults with every region and both fills", every),
        ("defaults", TrustConfig()),
    )
    for label, config in tables:
        occluded = len(unions) if config.occlusion_regions == "unions" else len(masks)
        cuts = min(config.cascade_cuts, n_steps)
        r = min(config.randomization_samples, config.samples)
        f = min(config.faithfulness_samples, config.samples)
        parts = {
            "randomization": r * (1 + cuts) * per["explain"],
            "deletion / insertion": f
            * (3 + 2 * (len(methods) + 1) * (config.steps - 1))
            * per["faithfulness_forward"],
            "occlusion": config.samples
            * (1 + 2 * len(config.occlusion_fills) * occluded)
            * per["occlusion_forward"],
        }
        shown = ", ".join(f"{k} {v:.0f}" for k, v in parts.items())
        print(f"  {label}: about {sum(parts.values()):.0f} CPU s per model ({shown})", flush=True)


def trust_stage_only(config_path: Path, out: Path, trust: dict[str, str]) -> None:
    """The trust stage of every model of an audit config, one thread, timed; metrics to `out`."""
    import json

    from audit.config import load_config
    from audit.metrics.aggregate import groups_of
    from audit.pipeline.trust_stage import run_trust, trust_sample
    from audit.runner import Auditor, RunLog, RunOptions, _clean_nan

    torch.set_num_threads(1)
    config = load_config(config_path)
    for key, value in trust.items():
        setattr(config.trust, key, json.loads(value))
    config.trust.check()
    out.mkdir(parents=True, exist_ok=True)
    auditor = Auditor(config, out, RunLog(lambda _: None), RunOptions(device="cpu"))
    auditor.preflight()
    auditor.load_data()
    rows = auditor.eval_rows
    sample = trust_sample(len(rows), config.trust, config.seed)
    metrics: dict = {"models": {}}
    for spec in config.model:
        model, _ = auditor.obtain_model(spec)
        map_spec = auditor.map_spec(spec)
        dataset = auditor.dataset(spec, rows, regions=map_spec.regions)
        with auditor.prepared[spec.name].preprocess.attach(model):
            cpu, wall = time.process_time(), time.perf_counter()
            block, _, _ = run_trust(
                spec.name, model, map_spec, dataset, sample, groups_of(rows.iloc[sample]),
                rows["label"].to_numpy()[sample], config.explain.methods, config.trust,
                config.bootstrap, config.seed, out / "overlays", auditor.device,
            )  # fmt: skip
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        metrics["models"][spec.name] = {"trust": _clean_nan(block)}
        print(
            f"{spec.name}: trust stage {cpu:.1f} CPU s ({wall:.1f} s wall, one thread); "
            f"randomization on {block['n_randomization_images']} images",
            flush=True,
        )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--archs", nargs="+", default=["resnet18", "timm:vit_tiny_patch16_224"])
    parser.add_argument("--data", type=Path, help="an existing manifest (else one is generated)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--trust", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--only", choices=["on", "off"], help="run one of the two audits")
    parser.add_argument("--keep", type=Path, help="keep the run folders (run.log's laps) here")
    parser.add_argument("--unit-costs", type=int, metavar="N", help="per-image costs on N images")
    parser.add_argument("--stage", type=Path, metavar="AUDIT_TOML", help="time the trust stage")
    parser.add_argument("--out", type=Path, help="with --stage: where metrics.json goes")
    args = parser.parse_args()
    if args.stage:
        if args.out is None:
            parser.error("--stage needs --out DIR")
        trust_stage_only(args.stage, args.out, dict(item.split("=", 1) for item in args.trust))
        return
    if args.unit_costs:
        for arch in args.archs:
            unit_costs(args.data, arch, args.image_size, args.unit_costs)
        return
    trust = dict(item.split("=", 1) for item in args.trust)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        manifest = args.data or generate(
            DoctorNurseSpec(
                seed=0, image_size=args.image_size, n_train=4, n_val=4, n_test=args.images
            ),
            root / "data",
            progress=False,
        )
        for arch in args.archs:
            results = {}
            for mode in ("off", "on"):
                if args.only and mode != args.only:
                    continue
                folder = root / arch.replace(":", "_") / mode
                folder.mkdir(parents=True, exist_ok=bool(args.keep))
                table = {"enabled": "false"} if mode == "off" else trust
                config = write_config(folder, manifest.resolve(), arch, args.image_size, table)
                results[mode] = result = audit_once(folder, config, args.workers)
                lap = "" if result["trust"] is None else f", trust stage {result['trust']:.0f} s"
                print(
                    f"{arch}, {args.images} images at {args.image_size} px, trust {mode}: "
                    f"audit {result['wall']:.0f} s ({result['cpu']:.0f} CPU s){lap}; peak PSS {result['pss'] / 2**30:.2f} GiB"
                    f" (summed RSS {result['rss'] / 2**30:.2f} GiB); the peak came after: "
                    f"{result['stage']}",
                    flush=True,
                )
            if len(results) == 2:
                on, off = results["on"], results["off"]
                print(
                    f"{arch}: trust on / off: peak PSS {on['pss'] / off['pss']:.2f}x, "
                    f"wall time {on['wall'] / off['wall']:.2f}x, "
                    f"CPU time {on['cpu'] / off['cpu']:.2f}x "
                    f"(+{on['cpu'] - off['cpu']:.0f} CPU s)",
                    flush=True,
                )


if __name__ == "__main__":
    main()
