"""Runs that collide and machines that die: each fault is made for real on an `audit run` started as
a subprocess (kill -9, SIGTERM, SIGINT, a second run, a Ray worker killed, a full tmpfs), and the
finished run is compared byte for byte with an uninterrupted one.

The subprocesses get `tests/slow_site` on PYTHONPATH: with AUDIT_TEST_SLOW set, its sitecustomize
makes chosen functions sleep first, so that a run can be caught at a given stage.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from audit.cli import main
from audit.pipeline.rundir import list_files
from tests.conftest import write_config

ROOT = Path(__file__).resolve().parents[1]
SITE = Path(__file__).resolve().parent / "slow_site"
SLOW_MAP = "audit.pipeline.map:map_batch:0.1"  # 40 batches of 2: 3 shards over > 4 s
SLOW_AFTER_MAP = "audit.pipeline.gallery:explain_details:3"


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def config(path: Path, manifest: Path, checkpoint: Path | None = None) -> Path:
    """One small CNN (trained 1 epoch, or loaded), batches of 2 (3 shards of the 80 test images),
    no trust checks: the cheapest run that still has several shards."""
    model = {"name": "a", "train_split": "train_biased", "epochs": 1}
    if checkpoint is not None:
        model = {"name": "a", "arch": "small_cnn", "checkpoint": str(checkpoint)}
    return write_config(
        path,
        manifest,
        bootstrap=50,
        model=[model],
        explain={"methods": ["gradcam"], "samples_per_cell": 1, "batch_size": 2},
        trust={"enabled": False},
    )


def run_args(config_path: Path, out: Path, *extra: object) -> list[str]:
    return [
        "run",
        str(config_path),
        "--out",
        str(out),
        "--no-report",
        "--quiet",
        "--workers",
        "0",
        *map(str, extra),
    ]


def start(args: list[str], slow: str = "", cwd: Path | None = None) -> subprocess.Popen:
    """`audit <args>` in a new process (its own session, so signals reach only it)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SITE), str(ROOT)]),
        "PYTHONUNBUFFERED": "1",
        "AUDIT_TEST_SLOW": slow,
    }
    return subprocess.Popen(
        [sys.executable, "-c", "from audit.cli import main; main()", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        cwd=cwd,
    )


def wait_for(
    condition: Callable[[], bool], process: subprocess.Popen, timeout: float = 300
) -> None:
    """Poll until `condition` holds while `process` is still running (else fail with its output)."""
    end = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"the run ended (rc {process.returncode}) too early:\n{out}\n{err}")
        if time.monotonic() > end:
            process.kill()
            pytest.fail("timed out")
        time.sleep(0.02)


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=600)
    return process.returncode, out, err


def same_results(a: Path, b: Path) -> None:
    assert (a / "samples.csv").read_bytes() == (b / "samples.csv").read_bytes()
    assert (a / "metrics.json").read_bytes() == (b / "metrics.json").read_bytes()


def shards(work: Path) -> list[Path]:
    return sorted((work / "shards" / "a").glob("*.parquet"))


@pytest.fixture(scope="module")
def data(small_dataset, tmp_path_factory) -> Path:
    """A copy of the small data set (the Ray test breaks and restores one of its images)."""
    root = tmp_path_factory.mktemp("reliability") / "data"
    shutil.copytree(small_dataset.parent, root)
    return root / "manifest.csv"


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    """An uninterrupted run that trains its model (compared with the killed and resumed one)."""
    root = tmp_path_factory.mktemp("trained")
    result = invoke(*run_args(config(root / "audit.toml", data), root / "run"))
    assert result.exit_code == 0, result.output
    return root / "run"


@pytest.fixture(scope="module")
def loaded(data, trained, tmp_path_factory) -> tuple[Path, Path]:
    """(config, run) of an uninterrupted run that loads the trained model: the other faults are
    made on runs that need no training."""
    root = tmp_path_factory.mktemp("loaded")
    checkpoint = root / "a.pt"
    shutil.copy(trained / "models" / "a.pt", checkpoint)
    config_path = config(root / "audit.toml", data, checkpoint)
    result = invoke(*run_args(config_path, root / "run"))
    assert result.exit_code == 0, result.output
    return config_path, root / "run"


@pytest.mark.slow
def test_kills_and_signals_at_several_points_then_resume_give_the_same_bytes(
    trained, data, tmp_path
):
    args = run_args(config(tmp_path / "audit.toml", data), Path("run"))  # run from tmp_path
    work, out = tmp_path / ".run.partial", tmp_path / "run"
    resume_line = (
        "error: interrupted; the finished part is kept in .run.partial - continue with the "
        "same command and --resume"
    )

    # 1. kill -9 before the map (loading data, training): only resume.json is durable.
    run = start(args, SLOW_MAP, tmp_path)
    wait_for(lambda: (work / "resume.json").exists(), run)
    run.kill()
    assert run.wait() == -signal.SIGKILL and not out.exists()

    # 2. SIGTERM once the first shard is written: exit 143, one line saying how to resume.
    run = start([*args, "--resume"], SLOW_MAP, tmp_path)
    wait_for(lambda: len(shards(work)) >= 1, run)
    run.send_signal(signal.SIGTERM)
    code, stdout, stderr = finish(run)
    assert code == 143, stderr
    assert stderr.strip().splitlines() == [resume_line]
    assert "resuming the unfinished run" in stdout

    # 3. kill -9 once a second shard is written; the first was skipped, not redone.
    done = shards(work)
    run = start([*args, "--resume"], SLOW_MAP, tmp_path)
    wait_for(lambda: len(shards(work)) > len(done), run)
    run.kill()
    run.wait()
    assert 2 <= len(shards(work)) < 3 and not out.exists()
    assert f"{len(done)} of 3 shards resumed" in run.stdout.read()

    # 4. Ctrl-C (SIGINT) after the map, while the gallery is explained: exit 130.
    run = start([*args, "--resume"], f"{SLOW_MAP},{SLOW_AFTER_MAP}", tmp_path)
    wait_for(lambda: len(shards(work)) == 3, run)
    time.sleep(0.5)
    run.send_signal(signal.SIGINT)
    code, _, stderr = finish(run)
    assert code == 130 and stderr.strip().splitlines() == [resume_line]

    # 5. A torn shard (as a power loss can leave) and a temporary file a crash left behind.
    torn = shards(work)[1]
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])
    (work / "shards" / "a" / "000000064.tmp").write_bytes(b"PAR1 half")

    # 6. Resumed to the end: the torn shard is redone, the results are those of a run never stopped.
    code, stdout, stderr = finish(start([*args, "--resume"], cwd=tmp_path))
    assert code == 0, stderr
    assert "2 of 3 shards resumed" in stdout
    same_results(out, trained)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.toml", "run"]  # no work, no lock
    assert json.loads((out / "run.json").read_text())["files"] == list_files(out)


@pytest.mark.slow
def test_a_second_run_of_the_same_out_is_refused_and_force_deletes_nothing(loaded, tmp_path):
    config_path, reference = loaded
    out, work = tmp_path / "run", tmp_path / ".run.partial"
    first = start(run_args(config_path, out), SLOW_MAP)
    wait_for(lambda: len(shards(work)) >= 1, first)
    for extra in ([], ["--force"], ["--resume"], ["--force", "--resume"]):
        second = invoke(*run_args(config_path, out, *extra))
        assert second.exit_code == 2, second.output
        lines = second.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: --out ")
        assert f"is being written by another audit run (pid {first.pid} on " in lines[0]
        assert "wait for it to finish or choose another --out" in lines[0]
        assert shards(work) and not out.exists()  # nothing of the first run was touched
    code, _, stderr = finish(first)
    assert code == 0, stderr
    same_results(out, reference)
    # The finished folder holds exactly what its run.json lists: no stray shard of another run.
    assert json.loads((out / "run.json").read_text())["files"] == list_files(out)
    assert not (out / "shards").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the lock file is gone


def _ray_workers_of(raylet_pid: int) -> list:
    """The worker processes a Ray node (its raylet) started that hold a map actor."""
    import psutil

    found = []
    for process in psutil.Process(raylet_pid).children(recursive=True):
        try:
            if "ShardMapper" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:  # ended while listed
            pass
    return found


@pytest.mark.slow
def test_ray_survives_a_killed_node_and_stops_cleanly_when_it_cannot(loaded, data, tmp_path):
    pytest.importorskip("ray")
    psutil = pytest.importorskip("psutil")
    from ray.cluster_utils import Cluster

    config_path, reference = loaded
    environment = {
        "PYTHONPATH": os.pathsep.join([str(SITE), str(ROOT)]),
        "AUDIT_TEST_SLOW": SLOW_MAP,  # the Ray workers inherit it from their node
    }
    saved = {k: os.environ.get(k) for k in environment}
    os.environ.update(environment)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        worker_node = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        out = tmp_path / "run"
        ray_args = ["--ray", cluster.address, "--workers", 2]
        run = start(run_args(config_path, out, *ray_args), SLOW_MAP)
        raylet = worker_node.all_processes["raylet"][0].process.pid
        wait_for(lambda: bool(_ray_workers_of(raylet)), run)
        time.sleep(1.0)  # into the actor's first shard (16 batches of at least 0.1 s)
        killed = _ray_workers_of(raylet)
        assert killed and not out.exists()
        for process in killed:
            process.kill()
        psutil.wait_procs(killed, timeout=30)
        code, stdout, stderr = finish(run)
        assert code == 0, stderr
        assert stderr == ""  # --quiet: no line of Ray's own
        same_results(out, reference)

        # An error Ray does not retry (an image that cannot be read on the worker): one line,
        # the finished shards kept, and the run resumes (here without Ray) to the same results.
        image = data.parent / json_image_of_last_shard(data)
        whole = image.read_bytes()
        image.write_bytes(whole[: len(whole) // 2])
        try:
            out2, work2 = tmp_path / "run2", tmp_path / ".run2.partial"
            code, _, stderr = finish(start(run_args(config_path, out2, *ray_args)))
        finally:
            image.write_bytes(whole)
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), stderr
        assert image.name in lines[0] and "--resume" in lines[0]
        assert (work2 / "resume.json").is_file() and not out2.exists()
        resumed = invoke(*run_args(config_path, out2, "--resume"))
        assert resumed.exit_code == 0, resumed.output
        same_results(out2, reference)
    finally:
        cluster.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.mark.slow
def test_a_shard_that_kills_every_ray_worker_stops_the_map_instead_of_looping(loaded, tmp_path):
    """Ray restarts a dead actor and retries its shard; a shard that kills every worker it
    reaches is retried a bounded number of times, then the run stops with one resumable line."""
    pytest.importorskip("ray")
    config_path, _ = loaded
    out = tmp_path / "run"
    crash = "audit.pipeline.map:map_batch:crash"  # only in Ray workers: the driver is unharmed
    run = start(run_args(config_path, out, "--ray", "local", "--workers", 1), crash)
    try:
        _, stderr = run.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        pytest.fail("the map kept retrying a shard that kills its worker")
    lines = stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1, stderr
    assert lines[0].startswith("error: --ray local: the map failed on the cluster: "), stderr
    assert "--resume" in lines[0]
    assert (tmp_path / ".run.partial" / "resume.json").is_file() and not out.exists()


def json_image_of_last_shard(manifest: Path) -> str:
    """An image of the test split's last shard (rows 64-79), as the manifest names it."""
    import pandas as pd

    table = pd.read_csv(manifest, keep_default_na=False)
    return table[table["split"] == "test"].iloc[70]["image"]


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)])
    return done.returncode == 0


@pytest.mark.slow
def test_a_full_disk_stops_with_one_line_and_resumes_once_space_is_freed(loaded, tmp_path):
    config_path, reference = loaded
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "4m"):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        out, work = disk / "run", disk / ".run.partial"
        # Leave room for the model's checkpoint (248 KiB) and about one shard.
        filler = disk / "filler"
        free = shutil.disk_usage(disk).free
        filler.write_bytes(b"\0" * (free - (reference / "models" / "a.pt").stat().st_size - 40_000))
        code, _, stderr = finish(start(run_args(config_path, out)))
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1, stderr
        assert lines[0].startswith(f"error: no space left on the device of {work}")
        assert "--resume" in lines[0]
        # Nothing that looks finished: no run folder, no run.json, no metrics in the work folder.
        assert not out.exists() and (work / "resume.json").is_file()
        assert not (work / "run.json").exists() and not (work / "metrics.json").exists()
        filler.unlink()
        code, stdout, stderr = finish(start(run_args(config_path, out, "--resume")))
        assert code == 0, stderr
        same_results(out, reference)
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_the_lock_names_its_holder_and_is_removed_after(tmp_path):
    from audit.pipeline.rundir import RunFolderError, lock_path, run_lock

    out = tmp_path / "new" / "run"
    with run_lock(out):
        info = json.loads(lock_path(out).read_text())
        assert info["pid"] == os.getpid()
        holder = f"another audit run \\(pid {os.getpid()} on "
        with pytest.raises(RunFolderError, match=holder), run_lock(out):
            pass
    assert not (tmp_path / "new").exists()  # the folder made for the lock only is removed too
    # A lock file removed by its holder between another run's open and flock is not trusted:
    # the other run locks the file now at the path.
    import fcntl

    out = tmp_path / "run"
    stale = os.open(lock_path(out), os.O_RDWR | os.O_CREAT)
    fcntl.flock(stale, fcntl.LOCK_EX)
    lock_path(out).unlink()
    with run_lock(out):
        assert lock_path(out).exists()
    os.close(stale)


def test_a_torn_or_corrupted_shard_is_found(tmp_path):
    import numpy as np
    import pandas as pd

    from audit.pipeline.map import pending_shards, shard_is_whole, shard_path, write_shard

    table = pd.DataFrame({"index": np.arange(32), "x": np.linspace(0, 1, 32)})
    bounds = [(0, 32), (32, 64)]
    for start, _ in bounds:
        write_shard(table, shard_path(tmp_path, start))
    assert list(pending_shards(tmp_path, bounds)) == []
    first, second = (shard_path(tmp_path, s) for s, _ in bounds)
    data = bytearray(second.read_bytes())
    data[data.find(table["x"].to_numpy()[5].tobytes())] ^= 0xFF  # a flipped byte in a value
    second.write_bytes(bytes(data))
    assert shard_is_whole(first, 32) and not shard_is_whole(second, 32)
    assert not shard_is_whole(first, 31)  # a shard of another size is not this shard
    first.write_bytes(first.read_bytes()[:100])  # cut short
    (tmp_path / "000000064.tmp").write_bytes(b"half")
    assert list(pending_shards(tmp_path, bounds)) == bounds
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # torn files and leftovers removed


def test_a_replacement_killed_while_moving_files_is_finished_by_the_next_install(
    tmp_path, monkeypatch
):
    from audit.pipeline import rundir

    out, work = tmp_path / "run", tmp_path / ".run.partial"
    out.mkdir()
    (out / "old.csv").write_text("old")
    (out / "both.csv").write_text("old")
    (out / "mine.txt").write_text("mine")
    (out / "run.json").write_text(json.dumps({"files": ["both.csv", "old.csv", "run.json"]}))

    def finished_work() -> None:
        work.mkdir(exist_ok=True)
        (work / "resume.json").write_text("{}")
        (work / "both.csv").write_text("new")
        (work / "new.csv").write_text("new")
        (work / "run.json").write_text(json.dumps({"files": ["both.csv", "new.csv", "run.json"]}))

    finished_work()
    real, moved = os.replace, []

    def dies_after_one_file(src, dst):
        if moved:
            raise KeyboardInterrupt  # the process dies here
        moved.append(dst)
        real(src, dst)

    monkeypatch.setattr(rundir.os, "replace", dies_after_one_file)
    with pytest.raises(KeyboardInterrupt):
        rundir.install(work, out)
    monkeypatch.setattr(rundir.os, "replace", real)
    half = json.loads((out / "run.json").read_text())
    assert "unfinished" in half and set(half["files"]) >= {"both.csv", "new.csv", "old.csv"}
    assert (work / "resume.json").exists()  # --resume is still possible
    finished_work()  # what the resumed run computes again
    rundir.install(work, out)
    assert sorted(p.name for p in out.iterdir()) == ["both.csv", "mine.txt", "new.csv", "run.json"]
    assert json.loads((out / "run.json").read_text()) == {
        "files": ["both.csv", "new.csv", "run.json"]
    }
    assert not work.exists()


def test_the_remote_error_is_read_from_rays_text():
    from audit.pipeline.ray_map import remote_error

    # The shape of a RayTaskError(UserCodeException)'s text in Ray 2.60 (abridged).
    text = (
        "ray::MapWorker(MapBatches(ShardMapper)).submit() (pid=1, ip=10.0.0.2)\n"
        '  File "audit/pipeline/frames.py", line 90, in __getitem__\n'
        "audit.pipeline.frames.ImageDecodeError: images/x.png (manifest line 7): truncated\n"
        "\n"
        "The above exception was the direct cause of the following exception:\n"
        "\n"
        "ray::MapWorker(MapBatches(ShardMapper)).submit() (pid=1, ip=10.0.0.2)\n"
        "ray.exceptions.UserCodeException: UDF failed to process a data block.\n"
    )
    assert remote_error(RuntimeError(text)) == (
        "audit.pipeline.frames.ImageDecodeError: images/x.png (manifest line 7): truncated"
    )
    assert remote_error(ConnectionError("lost the head node\nmore")) == (
        "ConnectionError: lost the head node"
    )


def test_audit_report_refuses_a_run_folder_another_command_is_writing(tmp_path):
    """`audit report` takes the run folder's lock: while a run (here this test) holds it, the
    report is refused with one line naming the folder and the holder, and nothing is written."""
    from click.testing import CliRunner

    from audit.cli import main
    from audit.pipeline.rundir import run_lock

    run = tmp_path / "run"
    run.mkdir()
    with run_lock(run):
        result = CliRunner().invoke(main, ["report", str(run)])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert f"RUN_DIR {run} is being written by another audit run (pid {os.getpid()} on " in lines[0]
    assert "Traceback" not in result.output and list(run.iterdir()) == []
