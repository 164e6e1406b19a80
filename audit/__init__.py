"""Bias audits of image classifiers; the Python API is `audit.run` (see audit.api)."""

from __future__ import annotations

from typing import Any

from audit.version import __version__

__all__ = ["AuditError", "AuditResult", "RunOptions", "__version__", "run"]


def __getattr__(name: str) -> Any:
    """`audit.run`, `audit.AuditResult`, ... imported on first use: `import audit` (the command
    line's start) stays light, torch is loaded only when the API is used."""
    if name in ("run", "AuditResult"):
        from audit import api

        return getattr(api, name)
    if name in ("RunOptions", "AuditError"):
        from audit import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'audit' has no attribute {name!r}")
