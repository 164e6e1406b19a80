"""Data-set-scale audits: peak memory against the evaluation set's size, map throughput, Ray.

    python benchmarks/bench_scale.py [--sizes 5000 20000] [--image-size 224] [--arch resnet18]

A doctor/nurse set with the largest size's number of test images (each with a twin) is generated
once; each size audits the first that many of them. For each size, two models of `--arch` (random
weights, saved as state dicts) are audited with `audit run --no-report` (Grad-CAM on every image),
and the peak memory of the whole process tree (DataLoader workers included) is sampled every 0.1 s:
the sum of the processes' proportional set sizes (PSS, each shared page split between its sharers),
and, for comparison, the sum of their RSS (shared pages counted per process), with the run.log line
written last before the peak (the stage it fell in). Then, on the largest set, the map stage's
throughput is compared with plain batched inference of the same model over the same DataLoader,
and the run is repeated on a local Ray with two workers (its time, and whether samples.csv and
metrics.json are identical).
"""

from __future__ import annotations

import argparse
import filecmp
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from audit.data.doctor_nurse import DoctorNurseSpec, generate  # noqa: E402
from audit.data.manifest import read_manifest  # noqa: E402
from audit.models.inference import use_channels_last  # noqa: E402
from audit.models.io import save_checkpoint  # noqa: E402
from audit.models.sources import build_model  # noqa: E402
from audit.pipeline.frames import FrameDataset, float_pixels, squash  # noqa: E402
from audit.pipeline.map import MapSpec, loader, map_shards  # noqa: E402


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(c) for c in task.read_text().split()]
        except OSError:
            continue
    return found


def tree_memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process and all its descendants, summed, from /proc (Linux).

    The RSS sum counts pages shared between processes (a forked DataLoader worker's libraries, the
    shared-memory batches it hands over) once per process; the PSS sum divides each shared page
    between its sharers, so it is the tree's actual footprint.
    """
    rss = pss = 0
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1]) * 1024
            for line in Path(f"/proc/{current}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
        except OSError:
            continue
        stack += _children(current)
    return rss, pss


def run_measured(args: list[str]) -> tuple[float, int, int, float]:
    """Wall time and peak memory of a command: the process tree's summed RSS and summed PSS, and
    the clock time (time.time()) of the PSS peak."""
    started = time.perf_counter()
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak_rss = peak_pss = 0
    peak_at = 0.0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_rss, peak_pss, peak_at
        while not done.is_set():
            rss, pss = tree_memory(process.pid)
            if pss > peak_pss:
                peak_pss, peak_at = pss, time.time()
            peak_rss = max(peak_rss, rss)
            time.sleep(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, err = process.communicate()
    done.set()
    thread.join()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{err.decode()[-2000:]}")
    return time.perf_counter() - started, peak_rss, peak_pss, peak_at


def stage_at(run_log: Path, moment: float) -> str:
    """The run.log line last written before `moment` (what the audit was doing then)."""
    stamp = time.strftime("%H:%M:%S", time.localtime(moment))
    last = "(before the first log line)"
    for line in run_log.read_text().splitlines():
        if line[:8] > stamp:
            break
        last = line
    return last


def subset_manifest(manifest: Path, test_rows: int) -> Path:
    """A manifest beside `manifest` with its first `test_rows` test rows (and every other row):
    the smaller sets are parts of the largest, generated once."""
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    test = table["split"] == "test"
    keep = ~test | (test.cumsum() <= test_rows)
    out = manifest.with_name(f"manifest_{test_rows}.csv")
    table[keep].to_csv(out, index=False, lineterminator="\n")
    return out


def write_config(folder: Path, manifest: Path, arch: str, image_size: int, batch: int) -> Path:
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build_model(arch, 2)
        save_checkpoint(
            model, folder / f"m{seed}.pt", arch=arch, classes=["doctor", "nurse"], meta={}
        )
    config = folder / "audit.toml"
    config.write_text(
        f"""bootstrap = 200
[data]
manifest = "{manifest}"
image_size = {image_size}
[[model]]
name = "m0"
arch = "{arch}"
checkpoint = "m0.pt"
[[model]]
name = "m1"
arch = "{arch}"
checkpoint = "m1.pt"
[explain]
methods = ["gradcam"]
samples_per_cell = 2
mistakes_per_cell = 2
batch_size = {batch}
[trust]
enabled = false
"""
    )
    return config


def _rate(n: int, run: Callable[[], object], repeats: int) -> float:
    """Images/s of the fastest of `repeats` passes (the machine may be shared)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return n / best


def throughput(
    manifest_path: Path, arch: str, image_size: int, size: int, workers: int, repeats: int = 1
) -> dict:
    """Images/s of the map stage against plain inference over the same DataLoader.

    Two pairs: the map without counterfactuals (Grad-CAM, region shares, hits, CAM boxes) against
    plain inference of the images, and the full map (one more forward for each image's twin)
    against plain inference of images and twins, the same forwards.
    """
    manifest = read_manifest(manifest_path)
    rows = manifest.split("test")
    torch.manual_seed(0)
    model = build_model(arch, 2).eval()
    regions = list(manifest.regions)
    frames = {
        twins: FrameDataset(
            manifest,
            rows,
            ["doctor", "nurse"],
            squash(image_size),
            regions=regions,
            twins=["twin"] if twins else None,
            uint8_pixels=True,  # as the audit's map reads them
        )
        for twins in (False, True)
    }
    device = torch.device("cpu")
    n = len(rows)
    # Both sides use the model as the audit runs it (channels-last where it gives the same outputs).
    probe = torch.stack([frames[False][i]["image"] for i in range(min(n, 8))])
    use_channels_last(model, float_pixels(probe))

    def plain(with_twins: bool) -> None:
        with torch.inference_mode():
            for batch in loader(frames[with_twins], size, workers, device):
                model(float_pixels(batch["image"]))
                if with_twins:
                    model(float_pixels(batch["twins"][:, 0]))

    def mapped(with_twins: bool) -> None:
        spec = MapSpec(
            layer=None,
            regions=regions,
            unions={"protected": ["hair", "face"], "core": ["stethoscope", "badge"]},
            twin_attributes=["sex"] if with_twins else [],
            batch_size=size,
        )
        for _ in map_shards(model, spec, frames[with_twins], [(0, n)], device, workers):
            pass

    return {
        "plain": _rate(n, lambda: plain(False), repeats),
        "map_no_twins": _rate(n, lambda: mapped(False), repeats),
        "plain_with_twins": _rate(n, lambda: plain(True), repeats),
        "map": _rate(n, lambda: mapped(True), repeats),
    }


def report_throughput(rates: dict, images: int, workers: int) -> None:
    print(
        f"throughput on {images} images (workers={workers}):\n"
        f"  without counterfactuals: plain inference {rates['plain']:.1f} img/s, map stage "
        f"{rates['map_no_twins']:.1f} img/s ({rates['map_no_twins'] / rates['plain']:.2f}x)\n"
        f"  with each image's twin: plain inference of images + twins "
        f"{rates['plain_with_twins']:.1f} img/s, map stage {rates['map']:.1f} img/s "
        f"({rates['map'] / rates['plain_with_twins']:.2f}x the same forwards, "
        f"{rates['map'] / rates['plain']:.2f}x plain inference of the images alone)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true", help="memory only")
    parser.add_argument(
        "--throughput-only",
        type=Path,
        metavar="MANIFEST",
        help="only compare the map's throughput with plain inference on this set's test split",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="passes per rate; the fastest counts"
    )
    args = parser.parse_args()
    if args.throughput_only:
        rates = throughput(
            args.throughput_only, args.arch, args.image_size, args.batch, args.workers, args.repeats
        )
        report_throughput(
            rates, len(read_manifest(args.throughput_only).split("test")), args.workers
        )
        return
    audit = [str(Path(sys.executable).parent / "audit")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        results = []
        started = time.perf_counter()
        generated = generate(
            DoctorNurseSpec(
                seed=0, image_size=args.image_size, n_train=4, n_val=4, n_test=max(args.sizes)
            ),
            root / "data",
            progress=False,
        )
        generation = time.perf_counter() - started
        print(f"{max(args.sizes)} test images generated in {generation:.0f} s", flush=True)
        for size in args.sizes:
            folder = root / f"n{size}"
            folder.mkdir()
            manifest = subset_manifest(generated, size)
            config = write_config(folder, manifest, args.arch, args.image_size, args.batch)
            wall, peak_rss, peak_pss, peak_at = run_measured(
                [
                    *audit,
                    "run",
                    str(config),
                    "--out",
                    str(folder / "run"),
                    "--no-report",
                    "--quiet",
                    "--workers",
                    str(args.workers),
                ]
            )
            results.append((size, wall, peak_pss))
            print(
                f"{size} images at {args.image_size} px, {args.arch} x 2: "
                f"audit run {wall:.0f} s ({2 * size / wall:.1f} img/s over both models), "
                f"peak memory of the process tree: PSS {peak_pss / 2**30:.2f} GiB "
                f"(summed RSS, shared pages counted per process: {peak_rss / 2**30:.2f} GiB); "
                f"the peak came after: {stage_at(folder / 'run' / 'run.log', peak_at)}",
                flush=True,
            )
        if len(results) > 1:
            small, large = results[0][2], results[-1][2]
            print(f"peak PSS, largest / smallest: {large / small:.3f}")
        largest = root / f"n{args.sizes[-1]}"
        if args.skip_throughput:
            return
        rates = throughput(
            root / "data" / f"manifest_{args.sizes[-1]}.csv",
            args.arch,
            args.image_size,
            args.batch,
            args.workers,
        )
        report_throughput(rates, args.sizes[-1], args.workers)
        if not args.skip_ray:
            wall, _, _, _ = run_measured(
                [
                    *audit,
                    "run",
                    str(largest / "audit.toml"),
                    "--out",
                    str(largest / "ray"),
                    "--no-report",
                    "--quiet",
                    "--ray",
                    "--workers",
                    "2",
                ]
            )
            same = all(
                filecmp.cmp(largest / "run" / f, largest / "ray" / f, shallow=False)
                for f in ("samples.csv", "metrics.json")
            )
            print(
                f"local Ray, 2 workers: {wall:.0f} s against {results[-1][1]:.0f} s locally; "
                f"samples.csv and metrics.json identical: {same}"
            )


if __name__ == "__main__":
    main()
