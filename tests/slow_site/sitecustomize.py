"""Test helper, imported by every Python process started with this folder on PYTHONPATH (the
reliability tests' `audit run` subprocesses and the Ray workers they start).

With AUDIT_TEST_SLOW="module:function:seconds,..." each named function sleeps that long before it
runs, so that a test can kill a run at a chosen stage (mid-map, after the map). "crash" instead of
seconds makes the function end its process (exit code 1) when it runs in a Ray worker, as a poison
input that kills every worker it reaches would. Nothing is imported or changed unless the variable
is set and the module is imported anyway.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import os
import sys
import time

_SLOW: dict[str, list[tuple[str, float]]] = {}
for _item in filter(None, os.environ.get("AUDIT_TEST_SLOW", "").split(",")):
    _module, _function, _seconds = _item.split(":")
    _SLOW.setdefault(_module, []).append((_function, _seconds))


def _in_ray_worker() -> bool:
    return any("default_worker.py" in argument for argument in sys.argv)


def _slowed(function, seconds):
    @functools.wraps(function)
    def slow(*args, **kwargs):
        if seconds == "crash":
            if _in_ray_worker():
                os._exit(1)
        else:
            time.sleep(float(seconds))
        return function(*args, **kwargs)

    return slow


class _SlowFinder(importlib.abc.MetaPathFinder):
    """Patches the named functions right after their module is executed."""

    def find_spec(self, name, path, target=None):
        if name not in _SLOW:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            for function, seconds in _SLOW[name]:
                setattr(module, function, _slowed(getattr(module, function), seconds))

        spec.loader.exec_module = exec_module
        return spec


if _SLOW:
    sys.meta_path.insert(0, _SlowFinder())
