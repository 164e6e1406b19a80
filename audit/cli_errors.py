"""One-line errors for the command line: a user's mistake is `error: ...`, exit 2, no traceback."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

EXIT_GATES_FAILED = 1
EXIT_BAD_INPUT = 2


class BadInput(click.ClickException):
    """A user's mistake: one line on stderr, exit code 2, no traceback."""

    exit_code = EXIT_BAD_INPUT

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def user_errors(func: Callable) -> Callable:
    """Turn the project's input errors into one-line BadInput errors."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from audit.data.manifest import EmptySplitError, ManifestError
        from audit.errors import ConfigError
        from audit.models.io import CheckpointError
        from audit.models.zoo import ArchError
        from audit.pipeline.frames import ImageDecodeError
        from audit.pipeline.rundir import RunFolderError
        from audit.report.render import ReportError
        from audit.runner import AuditError

        try:
            return func(*args, **kwargs)
        except (
            ConfigError,
            ManifestError,
            EmptySplitError,
            CheckpointError,
            ReportError,
            AuditError,
            ArchError,
            FileExistsError,
            RunFolderError,
            ImageDecodeError,
        ) as error:
            raise BadInput(" ".join(str(error).split())) from None

    return wrapper
