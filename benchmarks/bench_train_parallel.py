"""The demo's two trainings one after the other (every thread) against in two forked processes of
one thread each (audit.models.parallel, as `audit demo` trains them).

    python benchmarks/bench_train_parallel.py MANIFEST [--epochs 1] [--mode both|sequential|forked]

MANIFEST is the doctor/nurse set's (`audit demo --data DIR` writes DIR/manifest.csv). Prints per
model the wall and CPU seconds and the last epoch's loss, and per mode the total wall time and
the CPU seconds of this process and its children (steadier than wall time on a shared machine).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from audit.cli import demo_config  # noqa: E402
from audit.config import from_dict  # noqa: E402
from audit.models.parallel import run_forked  # noqa: E402
from audit.models.train import TrainConfig, train_model  # noqa: E402
from audit.runner import TRAIN_CACHE_BYTES, Auditor, RunLog, RunOptions  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--mode", choices=["both", "sequential", "forked"], default="both")
    args = parser.parse_args()
    config = from_dict(demo_config(args.manifest.resolve(), 0))
    auditor = Auditor(config, Path("unused"), RunLog(lambda _: None), RunOptions(device="cpu"))
    auditor.load_data()
    initial = {
        s.name: {k: v.clone() for k, v in auditor.prepared[s.name].model.state_dict().items()}
        for s in config.model
    }

    def train(spec: object) -> float:
        model = auditor.prepared[spec.name].model
        model.load_state_dict(initial[spec.name])
        rows = auditor.manifest.split(spec.train_split)
        data = auditor.dataset(spec, rows, cache_bytes=TRAIN_CACHE_BYTES)
        wall, cpu = time.perf_counter(), time.process_time()
        with auditor.prepared[spec.name].preprocess.attach(model):
            history = train_model(
                model,
                data,
                TrainConfig(epochs=args.epochs, batch_size=spec.batch_size, lr=spec.lr),
                progress=False,
                device="cpu",
            )
        print(
            f"  {spec.name}: {torch.get_num_threads()} thread(s), "
            f"{time.perf_counter() - wall:.1f} s wall, {time.process_time() - cpu:.1f} CPU s, "
            f"last loss {history.loss[-1]:.6f}",
            flush=True,
        )
        return history.loss[-1]

    modes = ["sequential", "forked"] if args.mode == "both" else [args.mode]
    for mode in modes:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall, cpu = time.perf_counter(), time.process_time()
        print(f"{mode}, {args.epochs} epoch(s):", flush=True)
        if mode == "sequential":
            for spec in config.model:
                train(spec)
        else:
            run_forked({s.name: lambda s=s: train(s) for s in config.model}, len(config.model))
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        children = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        print(
            f"{mode}: {time.perf_counter() - wall:.1f} s wall, "
            f"{time.process_time() - cpu + children:.1f} CPU s",
            flush=True,
        )


if __name__ == "__main__":
    main()
