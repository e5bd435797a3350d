"""Exit codes and error handling shared by every ``pagetrack`` command.

Exit codes, the same for every command: 0 success; 1 a finding (a difference,
a failed audit); 2 bad input or a missing prerequisite.  Bad input is reported
in one line on stderr, never as a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, NoReturn, TypeVar

import click

from .errors import InputError, KvmError

__all__ = ["EXIT_BAD_INPUT", "EXIT_FINDING", "EXIT_OK", "OneLineGroup", "fail", "guarded"]

EXIT_OK = 0
EXIT_FINDING = 1
EXIT_BAD_INPUT = 2

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    """Print one line to stderr and exit with ``code``."""
    click.echo(f"pagetrack: {message}", err=True)
    sys.exit(code)


def guarded(fn: F) -> F:
    """Turn :class:`InputError`, :class:`KvmError` and ``OSError`` into one line + exit 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (InputError, KvmError) as exc:
            fail(str(exc))
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            fail(f"{where}{exc.strerror or exc}")

    return wrapper  # type: ignore[return-value]


class OneLineGroup(click.Group):
    """A command group whose usage errors are one line on stderr and exit 2.

    Click prints a usage block for a bad option; every other bad input of
    pagetrack is one line, so option errors are too.
    """

    def main(self, *args: Any, **kwargs: Any) -> Any:
        standalone = kwargs.pop("standalone_mode", True)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)  # type: ignore[call-overload]
        except click.ClickException as exc:
            fail(exc.format_message().replace("\n", " "))
        except click.Abort:
            fail("aborted", EXIT_FINDING)
        if not standalone:
            return rv
        sys.exit(rv if isinstance(rv, int) else EXIT_OK)
