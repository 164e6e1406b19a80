"""Errors of the attribution engine that callers tell apart from other bad input."""

from __future__ import annotations


class LayerError(ValueError):
    """A layer the engine cannot explain: unknown, not run once per forward, or whose output is
    neither a map nor patch tokens. One line naming the layer."""
