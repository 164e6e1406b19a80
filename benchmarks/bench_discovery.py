"""Time slice and strategy discovery on N synthetic rows (the map's kept columns), no model.

    .venv/bin/python benchmarks/bench_discovery.py --sizes 1000 5000 20000 --dims 512

Rows carry a 512-d float16 embedding (resnet18's layer4, pooled) and an 8x8 pooled Grad-CAM map,
two classes, 10% errors concentrated in a planted slice: the cost of `discover` itself, to set
beside an audit's map time at the same size (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from audit.pipeline.discover import DiscoveryInput, discover


def synthetic(n: int, dims: int, seed: int = 0) -> DiscoveryInput:
    """Two classes, a planted failing slice in each, float16 like the map's shards."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    planted = rng.uniform(size=n) < 0.1
    emb = rng.normal(size=(n, dims)) + planted[:, None] * 2.0
    correct = np.where(planted, rng.uniform(size=n) < 0.3, rng.uniform(size=n) < 0.97)
    heat = rng.uniform(size=(n, 64))
    rows = pd.DataFrame(
        {
            "correct": correct,
            "embedding": list(emb.astype(np.float16)),
            "heat": list(heat.astype(np.float16)),
        }
    )
    sex = np.where(rng.uniform(size=n) < 0.5, "female", "male")
    return DiscoveryInput(
        rows=rows,
        images=np.array([f"img/{i}.png" for i in range(n)]),
        labels=labels,
        classes=["a", "b"],
        attributes={"sex": sex},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--dims", type=int, default=512)
    args = parser.parse_args()
    for n in args.sizes:
        data = synthetic(n, args.dims)
        start = time.perf_counter()
        block, _ = discover(data, seed=0)
        took = time.perf_counter() - start
        print(
            f"{n:>6} rows x {args.dims} dims: {took:6.1f} s "
            f"({len(block['slices'])} slices, {len(block['strategies'])} strategies)"
        )


if __name__ == "__main__":
    main()
