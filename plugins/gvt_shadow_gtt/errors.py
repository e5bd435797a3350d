"""GVT's negative errno returns, as an exception carrying the errno name."""

from __future__ import annotations

import errno as _errno

from pagetrack.errors import KvmError

__all__ = ["GvtError", "errno_name", "status_of"]


class GvtError(OSError):
    """A GVT function failed with ``-errno`` (``errno_name``: ``"EINVAL"``, ``"ENXIO"`` ...)."""

    def __init__(self, errno_name: str, message: str) -> None:
        super().__init__(getattr(_errno, errno_name), message)
        self.errno_name = errno_name

    def __str__(self) -> str:
        return f"{self.errno_name}: {self.strerror}"


def errno_name(exc: BaseException) -> str:
    """The errno name of a :class:`GvtError` or :class:`~pagetrack.errors.KvmError`."""
    if isinstance(exc, (GvtError, KvmError)):
        return exc.errno_name
    return "EIO"


def status_of(exc: BaseException | None) -> int:
    """0, or the negative errno number of ``exc`` (what the C function would return)."""
    if exc is None:
        return 0
    return -int(getattr(_errno, errno_name(exc)))
