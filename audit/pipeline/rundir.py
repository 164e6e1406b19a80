"""The run folder's life: built in a hidden work folder, resumable, moved into place when finished.

- The work folder is `.<name>.partial` beside the run folder. It holds `resume.json` (what the run
  was started with) and the map's shards, so an interrupted run (Ctrl-C, SIGTERM, a bad image) can
  continue with `--resume` and skip what is done. It never looks like a finished run.
- A finished run folder lists the files the tool wrote in `run.json`. Replacing it (only with
  `--force`) deletes those files and no others: files a user put into the folder stay.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class RunFolderError(ValueError):
    """A run folder that cannot be written as asked (exists, foreign files, stale resume state)."""


class RunInterrupted(Exception):
    """The run was stopped (Ctrl-C or SIGTERM); its work folder is kept for --resume."""


RESUME_FILE = "resume.json"


def work_folder(out: Path) -> Path:
    return out.with_name(f".{out.name}.partial")


def written_files(run_dir: Path) -> list[str] | None:
    """The files a finished run folder says the tool wrote, or None if it is not a run folder."""
    try:
        listed = json.loads((run_dir / "run.json").read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    return [str(f) for f in listed] if isinstance(listed, list) else None


def _rel(path: Path) -> str:
    """A path as the user would type it: relative to the current folder where it lies below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def check_target(out: Path, force: bool) -> None:
    """Refuse to write over an existing folder unless forced; never over a user's own files."""
    if not out.exists():
        return
    if not out.is_dir():
        raise RunFolderError(f"--out {_rel(out)} exists and is not a folder")
    if not any(out.iterdir()):
        return
    ours = written_files(out)
    if ours is None:
        raise RunFolderError(
            f"--out {_rel(out)} exists and is not an audit run folder; choose another --out"
        )
    if not force:
        raise RunFolderError(
            f"--out {_rel(out)} holds an earlier run; add --force to replace it "
            "(only the files the audit wrote are removed)"
        )


def prepare_work(
    out: Path, identity: dict[str, Any], *, resume: bool, force: bool
) -> tuple[Path, bool]:
    """Create (or, with resume, reopen) the work folder. Returns (folder, resumed)."""
    work = work_folder(out)
    if work.exists():
        if resume:
            try:
                saved = json.loads((work / RESUME_FILE).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                saved = None
            if saved != json.loads(json.dumps(identity)):
                raise RunFolderError(
                    f"cannot resume {_rel(out)}: the unfinished run in {_rel(work)} was started "
                    "with another config or data set; run without --resume and with --force to start over"
                )
            return work, True
        if not force:
            raise RunFolderError(
                f"an unfinished run of {_rel(out)} exists in {_rel(work)}: continue it with --resume, "
                "or start over with --force"
            )
        shutil.rmtree(work)
    work.parent.mkdir(parents=True, exist_ok=True)
    work.mkdir()
    (work / RESUME_FILE).write_text(json.dumps(identity, indent=2) + "\n", encoding="utf-8")
    return work, False


def list_files(folder: Path) -> list[str]:
    """Every file below `folder`, relative, sorted (what run.json records as written by the tool)."""
    return sorted(
        str(p.relative_to(folder)).replace(os.sep, "/") for p in folder.rglob("*") if p.is_file()
    )


def install(work: Path, out: Path) -> None:
    """Move a finished work folder into place. An earlier run's own files are replaced; others stay."""
    (work / RESUME_FILE).unlink(missing_ok=True)
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        if out.exists():
            out.rmdir()
        os.replace(work, out)
        return
    old = written_files(out) or []
    new = list_files(work)
    clash = [n for n in new if n not in old and (out / n).exists()]
    if clash:
        raise RunFolderError(
            f"{_rel(out / clash[0])} was not written by the audit and would be replaced; "
            f"move it away (the finished run waits in {_rel(work)})"
        )
    for name in old:
        target = out / name
        if target.is_file():
            target.unlink()
    for name in new:
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(work / name, target)
    for folder in sorted((p for p in out.rglob("*") if p.is_dir()), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()
    shutil.rmtree(work, ignore_errors=True)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM stops the run like Ctrl-C, so the same clean-up path runs."""
    try:
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
