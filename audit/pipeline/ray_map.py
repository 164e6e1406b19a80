"""The map stage on Ray Data: one actor per worker slot holds the model; each task maps one shard.

The driver turns the pending shards into a Ray dataset of `(start, end)` rows and runs
`map_batches` with `ShardMapper`, whose `__init__` receives the model once through the object store
and whose `__call__` runs the very function of a local run (`audit.pipeline.map.map_shards`) on its
shard. Shards hold whole batches, so every image is computed in the same batch as locally, and the
rows - and the metrics reduced from them on the driver - are the same.

Workers must be able to read the manifest's files at the same paths (a shared file system).

Faults: a shard's task only reads images and returns rows, so Ray may run it again. An actor that
dies with its node is restarted elsewhere (without limit, Ray Data's default for actor pools) and
its shard retried, at most `SHARD_RETRIES` times: a shard that kills every worker it reaches (an
input that crashes a decoder, a batch that exhausts a worker's memory) stops the map instead of
looping for ever. That, and a failure Ray does not retry (an error raised in the map, a lost
cluster), stop the map with `ResumableError`: the shards written so far are kept.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from audit.pipeline.frames import FrameDataset, ImageDecodeError
from audit.pipeline.map import MapSpec, map_shards
from audit.pipeline.rundir import ResumableError

SHARD_RETRIES = 3  # a shard whose worker died is run again at most this many times


class RayError(ValueError):
    """Ray is missing or the cluster cannot be reached (one line for the user)."""


class ShardMapper:
    """A Ray actor: the model loaded once, then one shard per call."""

    def __init__(self, model_ref: Any, spec: MapSpec, dataset: FrameDataset, threads: int) -> None:
        import ray

        torch.set_num_threads(max(1, threads))
        self.model = ray.get(model_ref) if isinstance(model_ref, ray.ObjectRef) else model_ref
        self.model.eval()
        self.spec = spec
        self.dataset = dataset
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tables = []
        for start, end in zip(batch["start"], batch["end"], strict=True):
            shards = [(int(start), int(end))]
            for _, table in map_shards(self.model, self.spec, self.dataset, shards, self.device, 0):
                tables.append(table.assign(shard=int(start)))
        table = pd.concat(tables, ignore_index=True)
        return {column: table[column].to_numpy() for column in table.columns}


def _check_reachable(address: str) -> None:
    """Fail fast (5 s) on a host:port nobody answers, instead of Ray's long connection retries."""
    if address == "auto":
        return
    host_port = address.split("://", 1)[-1].rstrip("/")
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise RayError(f"--ray {address}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as error:
        raise RayError(f"--ray {address}: cannot reach the Ray cluster: {error}") from None


def _silence() -> None:
    """No progress bars or log lines of Ray's own on the console (`--quiet`)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.ERROR)


def connect(address: str, workers: int, quiet: bool = False) -> None:
    """Join the cluster at `address`, or start a local Ray ("local") with `workers` CPUs."""
    try:
        import ray
    except ImportError:
        raise RayError("--ray needs Ray: pip install 'ray[data]'") from None
    if quiet:
        _silence()
    if ray.is_initialized():
        return
    if address != "local":
        _check_reachable(address)
    try:
        if address == "local":
            ray.init(
                address="local",  # a fresh instance, never a cluster found in /tmp/ray or RAY_ADDRESS
                num_cpus=max(1, workers),
                include_dashboard=False,
                log_to_driver=False,
                object_store_memory=256 * 1024 * 1024,
                configure_logging=False,
                logging_level=logging.ERROR if quiet else logging.INFO,
            )
        else:
            ray.init(
                address=address,
                log_to_driver=False,
                configure_logging=False,
                logging_level=logging.ERROR if quiet else logging.INFO,
            )
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RayError(f"--ray {address}: cannot connect to a Ray cluster: {first}") from None


def ray_map(
    address: str,
    model: nn.Module,
    spec: MapSpec,
    dataset: FrameDataset,
    shards: list[tuple[int, int]],
    workers: int,
) -> Iterator[tuple[tuple[int, int], pd.DataFrame]]:
    """(shard, rows) for every pending shard, computed by Ray actors, in shard order."""
    if not shards:
        return
    import ray

    workers = max(1, workers)
    connect(address, workers)
    cpus = ray.cluster_resources().get("CPU", 1)
    gpus = ray.cluster_resources().get("GPU", 0)
    slots = int(gpus) if gpus >= 1 else max(1, min(workers, int(cpus)))
    # Each actor computes with the driver's thread count: float reductions then run the same way
    # as in a local run, so the rows are the same (fewer threads change the last bits).
    threads = torch.get_num_threads()
    model_ref = ray.put(copy.deepcopy(model).cpu())
    items = ray.data.from_items([{"start": s, "end": e} for s, e in shards])
    with warnings.catch_warnings():
        # Ray 2.60 takes max_task_retries only as an actor remote arg, which it marks deprecated.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        mapped = items.map_batches(
            ShardMapper,
            fn_constructor_kwargs={
                "model_ref": model_ref,
                "spec": spec,
                "dataset": dataset,
                "threads": threads,
            },
            batch_size=1,
            concurrency=slots,
            num_cpus=0 if gpus >= 1 else max(1, int(cpus) // slots),
            num_gpus=1 if gpus >= 1 else 0,
            max_task_retries=SHARD_RETRIES,
        )
    ends = dict(shards)
    batches = iter(mapped.iter_batches(batch_format="pandas", batch_size=None))
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as error:  # noqa: BLE001 - not retried by Ray (or a lost cluster)
            cause = remote_error(error)
            decode = f"{ImageDecodeError.__module__}.{ImageDecodeError.__qualname__}: "
            if cause.startswith(decode):  # the runner names the image and how to resume
                raise ImageDecodeError(cause.removeprefix(decode)) from None
            raise ResumableError(
                f"--ray {address}: the map failed on the cluster: {cause}"
            ) from None
        for start, table in batch.groupby("shard", sort=True):
            rows = table.drop(columns="shard").sort_values("index", kind="stable")
            yield (int(start), ends[int(start)]), rows.reset_index(drop=True)


@contextmanager
def quiet_stderr(log: Path, quiet: bool) -> Iterator[None]:
    """With --quiet, what Ray's C++ core prints on this process's stderr while the map runs (its
    warnings about actors, for one) goes to `log` instead; an empty log is removed."""
    if not quiet:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with open(log, "ab") as file:
        os.dup2(file.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        if log.is_file() and log.stat().st_size == 0:
            log.unlink()


def remote_error(error: BaseException) -> str:
    """The line `Type: message` of the exception raised on the cluster, from a Ray error's text.

    Ray Data passes a map's exception to the driver as a UserCodeException whose only trace of the
    original is the remote traceback in its text, ending with that line before "The above
    exception was the direct cause of the following exception"."""
    lines = str(error).splitlines()
    for i, line in enumerate(lines):
        if line.startswith("The above exception was the direct cause"):
            before = [text.strip() for text in lines[:i] if text.strip()]
            if before:
                return before[-1]
    first = next((text.strip() for text in lines if text.strip()), "")
    return f"{type(error).__name__}: {first}"


def shutdown() -> None:
    """Stop a Ray instance this process started (tests and local runs)."""
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        ray.shutdown()
