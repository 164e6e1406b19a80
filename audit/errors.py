"""Errors every layer may raise for a user's mistake; the command line turns each into one line."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config problem, naming the key."""


class AuditError(ValueError):
    """A user-facing problem with the audit's inputs."""
