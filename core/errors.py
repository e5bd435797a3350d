"""Exceptions of pagetrack.

Two kinds of failure exist and are kept apart:

* :class:`KvmError` is what a KVM API call returns when the kernel would return a
  negative errno (``-EINVAL``, ``-EEXIST``, ``-ENOENT`` ...).  It carries the errno
  number and name, so callers can test ``err.errno_name == "EINVAL"`` exactly as
  a VMM tests the ioctl result.
* :class:`InputError` is bad user input (a malformed program, scenario, trace,
  audit log or plugin).  The CLI prints its one-line message and exits with 2.
"""

from __future__ import annotations

import errno as _errno

__all__ = ["InputError", "KvmError"]


class KvmError(OSError):
    """A KVM API call failed the way the kernel fails it (negative errno).

    ``errno`` is the positive errno number, ``errno_name`` its symbolic name.
    """

    def __init__(self, errno_name: str, message: str) -> None:
        number = getattr(_errno, errno_name)
        super().__init__(number, message)
        self.errno_name = errno_name

    def __str__(self) -> str:
        return f"{self.errno_name}: {self.strerror}"


class InputError(ValueError):
    """Bad input from the user; ``where`` names the file, key or line at fault."""

    def __init__(self, message: str, where: str | None = None) -> None:
        super().__init__(message)
        self.where = where

    def __str__(self) -> str:
        msg = self.args[0] if self.args else ""
        return f"{self.where}: {msg}" if self.where else str(msg)
