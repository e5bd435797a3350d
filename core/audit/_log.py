"""The audit log writer: structlog events rendered by orjson, one hash-chained JSON line each."""

from __future__ import annotations

import atexit
import hashlib
import io
import os
import pathlib
import threading
from collections.abc import Callable
from typing import Any, BinaryIO

import orjson
import structlog

from .events import LEVELS, LOG_END

__all__ = ["GENESIS", "SCHEMA_VERSION", "AuditLog"]

SCHEMA_VERSION = 1
#: ``prev`` of the first event.
GENESIS = "0" * 64
#: Envelope keys written by the log itself; callers may not pass them as fields.
RESERVED = frozenset({"schema", "seq", "vm", "level", "ts", "prev"})

_RANK = {name: rank for rank, name in enumerate(LEVELS)}
_OFF = len(LEVELS)  # threshold of a disabled log: above every level


def _hex_bytes(value: object) -> object:
    """orjson ``default``: bytes-like values become hex strings."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    raise TypeError(f"audit field of type {type(value).__name__} is not JSON-serialisable")


class _ChainSink:
    """structlog's "wrapped logger": receives each rendered line under the log's lock."""

    def __init__(self, commit: Callable[[bytes], None]) -> None:
        self.msg = self.debug = self.info = self.warning = self.error = commit


class AuditLog:
    """An append-only, hash-chained JSON-lines audit log of one VM.

    ``sink`` is a path (created or truncated), a binary stream (written to and
    flushed, never closed: it belongs to the caller) or ``None`` for a disabled
    log whose :meth:`emit` does nothing.  Events below ``level`` are dropped;
    callers test :attr:`debug` before building per-write fields.
    """

    def __init__(
        self,
        sink: str | os.PathLike[str] | BinaryIO | None,
        vm_id: str,
        level: str = "info",
    ) -> None:
        if level not in _RANK:
            raise ValueError(f"unknown audit level {level!r}; expected one of {', '.join(LEVELS)}")
        self.vm_id = vm_id
        self.level = level
        self.enabled = sink is not None
        self._threshold = _RANK[level] if self.enabled else _OFF
        self.debug = self._threshold == 0
        #: Raw lines (without newline) and parsed events; filled by :meth:`in_memory` logs only.
        self.lines: list[bytes] = []
        self.events: list[dict[str, Any]] = []
        self.path: pathlib.Path | None = None
        self._keep = False
        self._owned = False
        self._out: BinaryIO | None = None
        if isinstance(sink, (str, os.PathLike)):
            self.path = pathlib.Path(sink)
            self._out = open(self.path, "wb")  # noqa: SIM115 - closed by close()
            self._owned = True
        elif sink is not None:
            self._out = sink
            name = getattr(sink, "name", None)
            self.path = pathlib.Path(name) if isinstance(name, str) else None
        self._lock = threading.Lock()
        self._seq = 0
        self._prev = GENESIS
        self._closed = not self.enabled
        bound = structlog.wrap_logger(
            _ChainSink(self._commit),
            processors=[
                self._envelope,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
                structlog.processors.JSONRenderer(
                    serializer=orjson.dumps, option=orjson.OPT_SORT_KEYS, default=_hex_bytes
                ),
            ],
            wrapper_class=structlog.make_filtering_bound_logger(0),
        ).bind()
        self._methods: dict[str, Callable[..., Any]] = {
            name: getattr(bound, name) for name in LEVELS
        }
        if self.enabled:
            atexit.register(self.close)

    @classmethod
    def in_memory(cls, vm_id: str = "vm0", level: str = "debug") -> AuditLog:
        """A log kept in memory: ``.lines`` holds the raw lines, ``.events`` them parsed."""
        log = cls(io.BytesIO(), vm_id, level)
        log._out = None
        log._keep = True
        atexit.unregister(log.close)
        return log

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran (always true for a disabled log)."""
        return self._closed

    @property
    def next_seq(self) -> int:
        """The sequence number the next event will carry (= events written so far)."""
        return self._seq

    def emit(self, event: str, level: str = "info", **fields: object) -> None:
        """Append one event; bytes values are written as hex.  Thread-safe."""
        rank = _RANK.get(level)
        if rank is None:
            raise ValueError(f"unknown audit level {level!r}")
        if rank < self._threshold:
            return
        with self._lock:
            if self._closed:
                raise ValueError(f"audit log of {self.vm_id} is closed")
            self._methods[level](event, **fields)

    def close(self) -> None:
        """Write the ``log_end`` trailer and close (or flush) the sink; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._methods["info"](LOG_END, events=self._seq, head=self._prev)
            self._closed = True
            if self._out is not None:
                if self._owned:
                    self._out.close()
                else:
                    self._out.flush()
        atexit.unregister(self.close)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = self.path or ("memory" if self._keep else "stream" if self.enabled else "off")
        return f"<AuditLog vm={self.vm_id} level={self.level} {where} events={self._seq}>"

    # ---- processor and sink (called with self._lock held) ---------------------
    def _envelope(self, _logger: object, _method: str, event_dict: Any) -> Any:
        if not RESERVED.isdisjoint(event_dict):
            clash = ", ".join(sorted(RESERVED.intersection(event_dict)))
            raise ValueError(f"audit fields may not be named {clash}")
        event_dict["schema"] = SCHEMA_VERSION
        event_dict["seq"] = self._seq
        event_dict["vm"] = self.vm_id
        event_dict["prev"] = self._prev
        return event_dict

    def _commit(self, line: bytes) -> None:
        if self._out is not None:
            self._out.write(line + b"\n")
            self._out.flush()
        if self._keep:
            self.lines.append(line)
            self.events.append(orjson.loads(line))
        self._prev = hashlib.sha256(line).hexdigest()
        self._seq += 1
