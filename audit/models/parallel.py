"""Work on several small models at once on a CPU: each job in its own forked process, one thread.

A small network on small images (the demo's SmallCNN at 64 px) keeps two threads poorly busy:
its convolutions are too small to split well, every step waits for both threads, and the
audit's Python between the forwards runs on one core. Two such models trained and audited in two
processes of one thread each finish sooner than the same two one after the other with two
threads each (docs/benchmarks.md, "The demo"). Large models split well across threads, so the
caller decides when this pays (`worth_forking`).

The jobs are callables run in forked children (nothing is pickled on the way in; the result and
any error are pickled on the way back, by value). A child runs with one torch thread: GNU OpenMP, which
torch uses on Linux, is not safe to use with several threads in a child forked from a process
that already used it. A job's error is raised in the parent as itself, so a user's mistake still
ends as one line; an interrupted parent terminates its children.
"""

from __future__ import annotations

import multiprocessing
import pickle
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def worth_forking(jobs: int, threads: int, device: torch.device) -> bool:
    """Fork when there are at least two jobs, at least two threads, no more threads than jobs
    (each child gets one) and the work runs on the CPU; also not on a platform without fork."""
    return (
        device.type == "cpu"
        and 2 <= threads <= jobs
        and "fork" in multiprocessing.get_all_start_methods()
    )


def _child(job: Callable[[], Any], connection: Connection) -> None:
    """Run one job with one thread and send (True, result) or (False, error) to the parent."""
    torch.set_num_threads(1)
    try:
        message: tuple[bool, Any] = (True, job())
    except BaseException as error:  # handed to the parent, which raises it
        message = (False, error)
    try:
        data = pickle.dumps(message)
    except Exception as error:  # an error (or result) that cannot be pickled
        data = pickle.dumps((False, RuntimeError(f"{type(error).__name__}: {error}")))
    connection.send_bytes(data)  # plain pickle: torch's own reducer would pass tensors by a file
    connection.close()  # descriptor that dies with this process


def run_forked(jobs: Mapping[str, Callable[[], T]], processes: int) -> dict[str, T]:
    """{name: job()} with each job in its own forked child, at most `processes` at a time, in the
    order given. The first job that fails has its error raised here (the others are stopped)."""
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    context = multiprocessing.get_context("fork")
    names = list(jobs)
    results: dict[str, T] = {}
    for first in range(0, len(names), processes):
        running = []
        try:
            for name in names[first : first + processes]:
                receive, send = context.Pipe(duplex=False)
                child = context.Process(target=_child, args=(jobs[name], send), daemon=True)
                child.start()
                send.close()
                running.append((name, child, receive))
            for name, child, receive in running:
                try:
                    ok, value = pickle.loads(receive.recv_bytes())
                except EOFError:
                    child.join()
                    raise RuntimeError(
                        f"{name}: the process it ran in ended without a result "
                        f"(exit code {child.exitcode})"
                    ) from None
                child.join()
                if not ok:
                    raise value
                results[name] = value
        finally:
            for _, child, receive in running:
                if child.is_alive():
                    child.terminate()
                    child.join()
                receive.close()
    return results
