"""Models trained in forked processes (audit.models.parallel) are those trained in-process with
one thread; a child's error reaches the parent as itself."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import write_config

from audit.config import load_config
from audit.models.io import read_state_dict
from audit.models.parallel import run_forked, worth_forking
from audit.runner import RunOptions, run_audit


def _where() -> tuple[int, int]:
    return os.getpid(), torch.get_num_threads()


def _fails() -> None:
    raise ValueError("model 'x': bad setting")


def test_jobs_run_in_children_with_one_thread_each() -> None:
    results = run_forked({"a": _where, "b": _where, "c": _where}, processes=2)
    assert list(results) == ["a", "b", "c"]
    pids = {pid for pid, _ in results.values()}
    assert os.getpid() not in pids and len(pids) == 3
    assert {threads for _, threads in results.values()} == {1}


def test_a_childs_error_is_raised_as_itself() -> None:
    with pytest.raises(ValueError, match="model 'x': bad setting"):
        run_forked({"a": _where, "x": _fails}, processes=2)
    with pytest.raises(RuntimeError, match=r"b: the process it ran in ended .*exit code 3"):
        run_forked({"b": lambda: os._exit(3)}, processes=1)


def test_worth_forking() -> None:
    cpu = torch.device("cpu")
    assert worth_forking(2, 2, cpu)
    assert not worth_forking(2, 4, cpu)  # more threads than models: train one after the other
    assert not worth_forking(1, 1, cpu)
    assert not worth_forking(2, 2, torch.device("cuda"))


def test_forked_models_give_the_one_thread_audit(small_dataset: Path, tmp_path: Path) -> None:
    """The same audit with each model trained and audited in its own process, and one after the
    other with one thread: the same weights, rows and figures; the children's log lines reach
    run.log."""
    config = write_config(
        tmp_path / "audit.toml",
        small_dataset,
        trust={"enabled": False},
        explain={"methods": ["gradcam"], "samples_per_cell": 1},
        bootstrap=20,
    )
    threads = torch.get_num_threads()
    runs = {}
    try:
        for parallel, n_threads in ((True, 2), (False, 1)):
            torch.set_num_threads(n_threads)
            out = tmp_path / f"parallel_{parallel}"
            options = RunOptions(device="cpu", workers=0, progress=False, render=False)
            options.parallel_models = parallel
            runs[parallel] = run_audit(
                load_config(config), out, echo=lambda _: None, options=options
            )
    finally:
        torch.set_num_threads(threads)
    forked, sequential = runs[True], runs[False]
    for name in ("a", "b"):
        ours = read_state_dict(forked / "models" / f"{name}.pt")
        theirs = read_state_dict(sequential / "models" / f"{name}.pt")
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), key
    a, b = (json.loads((run / "metrics.json").read_text()) for run in (forked, sequential))
    assert a["models"] == b["models"]
    assert (forked / "samples.csv").read_bytes() == (sequential / "samples.csv").read_bytes()
    log = (forked / "run.log").read_text()
    for name in ("a", "b"):
        assert f"{name}: trained in" in log and f"{name}: map of" in log
