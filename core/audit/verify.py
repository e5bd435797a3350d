"""``verify(path)``: prove an audit log complete and untampered, then replay its invariants.

Chain checks (kind ``"chain"``): every line is a JSON object with the envelope,
``seq`` runs 0, 1, 2 ..., ``prev`` is the sha256 of the previous raw line, and
the last line is a ``log_end`` whose ``events`` and ``head`` match.  A change
to a line shows at the next line (its ``prev`` no longer matches); a deleted,
reordered or truncated log shows where ``seq`` or ``prev`` break.

Invariant checks (kind ``"invariant"``), replaying ``update_gfn_write_track``
and the page-track notifier contract:

* per gfn, ``track_add`` count == previous + 1, ``track_remove`` count ==
  previous - 1 (from 0), within 0..65535; ``track_warn`` count == the current
  value, which is 65535 for ``op=add`` and 0 for ``op=remove`` (the WARN fires
  only on overflow or underflow);
* a ``memslot`` delete or move resets the old range (and a move's new range)
  to 0; a delete that leaves non-zero counts needs a ``track_remove_region``
  (or ``[<=6.5]`` ``track_flush_slot``) of the same range, either since the
  previous ``memslot`` event or before the next one (KVM 6.6 calls it from
  ``kvm_arch_commit_memory_region``, after the slot is gone);
* each ``track_write`` is followed, before the next ``track_write``, by one
  ``track_write_call`` per listed plugin, in that order, with the same gpa.

A file that is not an audit log at all (missing, empty, binary, first line not
an event) raises :class:`~pagetrack.errors.InputError`.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

import attrs
import orjson

from ..errors import InputError
from ._log import GENESIS, SCHEMA_VERSION
from .events import (
    CATALOG,
    LEVELS,
    LOG_END,
    MEMSLOT,
    MEMSLOT_CHANGES,
    TRACK_ADD,
    TRACK_FLUSH_SLOT,
    TRACK_REMOVE,
    TRACK_REMOVE_REGION,
    TRACK_WARN,
    TRACK_WRITE,
    TRACK_WRITE_CALL,
)

__all__ = ["SUPPORTED_SCHEMAS", "AuditReport", "Problem", "verify"]

SUPPORTED_SCHEMAS = frozenset({SCHEMA_VERSION})
TRACK_MAX = 0xFFFF
_ENVELOPE = ("schema", "seq", "vm", "event", "level", "ts", "prev")
_TRAILER_KEYS = frozenset((*_ENVELOPE, "events", "head"))
# Fields the replay does arithmetic on, per event.
_INT_FIELDS = {
    TRACK_ADD: ("gfn", "count"),
    TRACK_REMOVE: ("gfn", "count"),
    TRACK_WARN: ("gfn", "count"),
    MEMSLOT: ("base_gfn", "npages"),
    TRACK_REMOVE_REGION: ("gfn", "nr_pages"),
    TRACK_FLUSH_SLOT: ("base_gfn", "npages"),
}


@attrs.frozen
class Problem:
    """One finding: where (1-based ``line``, ``seq`` if readable) and what."""

    seq: int | None
    line: int
    message: str
    kind: str = "chain"  # "chain" or "invariant"

    def __str__(self) -> str:
        seq = "" if self.seq is None else f" (seq {self.seq})"
        return f"line {self.line}{seq}: {self.message}"


@attrs.frozen
class AuditReport:
    """The outcome of :func:`verify`; ``ok`` iff no problem was found."""

    path: str
    vm: str | None
    events: int  # event lines, the trailer not counted
    head: str | None  # sha256 of the last line before the trailer
    problems: list[Problem]
    counts_by_event: dict[str, int]
    counts_by_plugin: dict[str, dict[str, int]]  # track_write_call outcomes
    problems_dropped: int = 0  # problems beyond ``max_problems``, not listed

    @property
    def ok(self) -> bool:
        return not self.problems and not self.problems_dropped

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``pagetrack audit --json``)."""
        out = attrs.asdict(self)
        out["ok"] = self.ok
        return out


def verify(path: str | os.PathLike[str], *, max_problems: int = 1000) -> AuditReport:
    """Check the audit log at ``path``; see the module docstring for what is checked."""
    where = os.fspath(path)
    try:
        f = open(where, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise InputError("no such audit log", where) from None
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", where) from None
    with f:
        replay = _Replay(where, max_problems)
        for lineno, raw in enumerate(f, 1):
            replay.feed(lineno, raw)
        return replay.finish()


def _utc_iso(ts: object) -> bool:
    if not isinstance(ts, str):
        return False
    try:  # Python 3.10's fromisoformat does not take "Z"
        when = datetime.fromisoformat(ts[:-1] + "+00:00" if ts.endswith("Z") else ts)
    except ValueError:
        return False
    return when.utcoffset() == timedelta(0)


def _not_a_log(ev: object) -> str | None:
    """Why the first line shows the file is not an audit log, or None."""
    if not isinstance(ev, dict):
        return "not an audit log: the first line is not a JSON object"
    missing = [k for k in _ENVELOPE if k not in ev]
    if missing:
        return f"not an audit log: the first line lacks {', '.join(missing)}"
    if ev["schema"] not in SUPPORTED_SCHEMAS:
        return f"unsupported audit schema {ev['schema']!r} (this pagetrack reads {SCHEMA_VERSION})"
    return None


class _Replay:
    """Line-by-line state of one verification."""

    def __init__(self, path: str, max_problems: int) -> None:
        self.path = path
        self.max_problems = max_problems
        self.problems: list[Problem] = []
        self.dropped = 0
        self.vm: str | None = None
        self.prev = GENESIS  # sha256 of the previous raw line
        self.next_seq = 0
        self.events = 0
        self.head: str | None = None
        self.last: tuple[int, int | None, str | None] | None = None  # line, seq, event
        self.trailer_line: int | None = None
        self.by_event: Counter[str] = Counter()
        self.by_plugin: dict[str, Counter[str]] = {}
        self.counts: dict[int, int] = {}  # gfn -> write-track count (non-zero only)
        # track_write whose calls are still due: (line, seq, gpa, remaining plugins)
        self.write: tuple[int, int | None, object, list[str]] | None = None
        self.notified: set[tuple[int, int]] = set()  # (gfn, npages) told since the last memslot
        # a delete that dropped counts, awaiting its notice: (line, seq, base, npages)
        self.delete: tuple[int, int | None, int, int] | None = None

    # ---- reporting -----------------------------------------------------------
    def problem(self, line: int, seq: int | None, message: str, kind: str = "chain") -> None:
        if len(self.problems) < self.max_problems:
            self.problems.append(Problem(seq, line, message, kind))
        else:
            self.dropped += 1

    # ---- chain ---------------------------------------------------------------
    def feed(self, lineno: int, raw: bytes) -> None:
        line = raw[:-1] if raw.endswith(b"\n") else raw
        digest = hashlib.sha256(line).hexdigest()
        try:
            ev = orjson.loads(line)
        except orjson.JSONDecodeError:
            ev = None
        if lineno == 1:
            if not line:
                raise InputError("not an audit log: the file is empty", self.path)
            why = _not_a_log(ev)
            if why:
                raise InputError(why, self.path)
        expected_prev, self.prev = self.prev, digest
        if not isinstance(ev, dict):
            cut = "" if raw.endswith(b"\n") else " (cut short: the log is truncated)"
            self.problem(lineno, None, f"not a JSON object{cut}")
            self.next_seq += 1
            self.last = (lineno, None, None)
            return
        seq = ev.get("seq")
        seq = seq if isinstance(seq, int) else None
        name = ev.get("event")
        name = name if isinstance(name, str) else None
        self.last = (lineno, seq, name)
        self._envelope(lineno, seq, ev, expected_prev)
        if not raw.endswith(b"\n"):
            self.problem(lineno, seq, "the last line has no newline: the log is truncated")
        if self.trailer_line is not None:
            self.problem(
                lineno, seq, f"event after the log_end trailer of line {self.trailer_line}"
            )
        if name == LOG_END:
            self.trailer_line = lineno
            self._trailer(lineno, seq, ev, expected_prev)
        elif name is not None:
            self.events += 1
            self.head = digest
            self.by_event[name] += 1
            self._replay(lineno, seq, name, ev)

    def _envelope(self, lineno: int, seq: int | None, ev: dict[str, Any], prev: str) -> None:
        missing = [k for k in _ENVELOPE if k not in ev]
        if missing:
            self.problem(lineno, seq, f"lacks {', '.join(missing)}")
        if seq is None:
            self.problem(lineno, None, "seq is not an integer")
            self.next_seq += 1
        else:
            if seq != self.next_seq:
                gap = seq - self.next_seq
                what = f"{gap} event(s) missing before it" if gap > 0 else "out of order"
                self.problem(lineno, seq, f"seq {seq} where {self.next_seq} was expected: {what}")
            self.next_seq = seq + 1
        if ev.get("prev") != prev:
            after = "the start" if lineno == 1 else f"line {lineno - 1}"
            self.problem(
                lineno,
                seq,
                f"prev does not match the hash of {after}: "
                "that line was changed, or lines were removed or reordered",
            )
        if "schema" in ev and ev["schema"] not in SUPPORTED_SCHEMAS:
            self.problem(lineno, seq, f"unsupported schema {ev['schema']!r}")
        if self.vm is None:
            self.vm = ev.get("vm")
        elif "vm" in ev and ev["vm"] != self.vm:
            self.problem(lineno, seq, f"vm {ev['vm']!r} where the log is of {self.vm!r}")
        if "level" in ev and ev["level"] not in LEVELS:
            self.problem(lineno, seq, f"unknown level {ev['level']!r}")
        if "ts" in ev and not _utc_iso(ev["ts"]):
            self.problem(lineno, seq, f"ts {ev['ts']!r} is not a UTC ISO time")

    def _trailer(self, lineno: int, seq: int | None, ev: dict[str, Any], prev: str) -> None:
        if ev.get("events") != lineno - 1:
            self.problem(
                lineno, seq, f"log_end says {ev.get('events')!r} events, the log has {lineno - 1}"
            )
        if ev.get("head") != prev:
            self.problem(lineno, seq, "log_end head is not the hash of the line before it")
        if ev.get("level") != "info" or set(ev) != _TRAILER_KEYS:
            self.problem(lineno, seq, "log_end is not a well-formed trailer")

    def finish(self) -> AuditReport:
        if self.last is None:
            raise InputError("not an audit log: the file is empty", self.path)
        lineno, seq, name = self.last
        if name != LOG_END:
            self.problem(
                lineno, seq, f"no log_end trailer: the log is truncated after line {lineno}"
            )
        self._write_done()
        self._delete_done()
        self.problems.sort(key=lambda p: p.line)
        return AuditReport(
            path=self.path,
            vm=self.vm,
            events=self.events,
            head=self.head,
            problems=self.problems,
            counts_by_event=dict(sorted(self.by_event.items())),
            counts_by_plugin={
                p: dict(sorted(c.items())) for p, c in sorted(self.by_plugin.items())
            },
            problems_dropped=self.dropped,
        )

    # ---- invariants ----------------------------------------------------------
    def _replay(self, lineno: int, seq: int | None, name: str, ev: dict[str, Any]) -> None:
        spec = CATALOG.get(name)
        if spec is None:
            return  # an event this verifier does not know: counted, not replayed
        missing = [f for f in spec[1] if not f.endswith("?") and f not in ev]
        bad = [f for f in _INT_FIELDS.get(name, ()) if f in ev and type(ev[f]) is not int]
        if missing or bad:
            faults = [f"lacks {f}" for f in missing] + [f"{f} is not an integer" for f in bad]
            self.problem(lineno, seq, f"{name}: {'; '.join(faults)}", "invariant")
            return
        if name == TRACK_WRITE:
            self._write_done()
            plugins = ev["plugins"]
            if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
                self.problem(lineno, seq, "track_write plugins is not a list of names", "invariant")
                return
            if plugins:
                self.write = (lineno, seq, ev["gpa"], list(plugins))
        elif name == TRACK_WRITE_CALL:
            self._write_call(lineno, seq, ev)
        elif name in (TRACK_ADD, TRACK_REMOVE):
            self._count(lineno, seq, name, ev["gfn"], ev["count"], 1 if name == TRACK_ADD else -1)
        elif name == TRACK_WARN:
            self._warn(lineno, seq, ev)
        elif name == MEMSLOT:
            self._memslot(lineno, seq, ev)
        elif name == TRACK_REMOVE_REGION:
            self._notified(ev["gfn"], ev["nr_pages"])
        elif name == TRACK_FLUSH_SLOT:
            self._notified(ev["base_gfn"], ev["npages"])

    def _count(
        self, lineno: int, seq: int | None, name: str, gfn: int, count: int, delta: int
    ) -> None:
        before = self.counts.get(gfn, 0)
        expected = before + delta
        if not 0 <= count <= TRACK_MAX:
            self.problem(
                lineno, seq, f"gfn {gfn:#x}: count {count} is outside 0..{TRACK_MAX}", "invariant"
            )
        elif not 0 <= expected <= TRACK_MAX:
            self.problem(
                lineno,
                seq,
                f"gfn {gfn:#x}: {name} from {before} (KVM WARNs and leaves the counter: track_warn)",
                "invariant",
            )
        elif count != expected:
            self.problem(
                lineno, seq, f"gfn {gfn:#x}: {name} count {count}, expected {expected}", "invariant"
            )
        self._set(gfn, count)  # resynchronise so one slip is reported once

    def _set(self, gfn: int, count: int) -> None:
        if count:
            self.counts[gfn] = count
        else:
            self.counts.pop(gfn, None)

    def _warn(self, lineno: int, seq: int | None, ev: dict[str, Any]) -> None:
        gfn, count, op = ev["gfn"], ev["count"], ev["op"]
        current = self.counts.get(gfn, 0)
        if count != current:
            self.problem(
                lineno,
                seq,
                f"gfn {gfn:#x}: track_warn count {count}, the counter is {current}",
                "invariant",
            )
        limit = {"add": TRACK_MAX, "remove": 0}.get(op)
        if limit is None:
            self.problem(lineno, seq, f"track_warn op {op!r} is not add or remove", "invariant")
        elif current != limit:
            self.problem(
                lineno,
                seq,
                f"gfn {gfn:#x}: track_warn on {op} at count {current} (no overflow)",
                "invariant",
            )

    def _in_range(self, base: int, npages: int) -> list[int]:
        return [g for g in self.counts if base <= g < base + npages]

    def _memslot(self, lineno: int, seq: int | None, ev: dict[str, Any]) -> None:
        self._delete_done()
        change, base, npages = ev["change"], ev["base_gfn"], ev["npages"]
        if change not in MEMSLOT_CHANGES:
            self.problem(lineno, seq, f"memslot change {change!r} is unknown", "invariant")
        elif change == "delete":
            if self._in_range(base, npages) and (base, npages) not in self.notified:
                self.delete = (lineno, seq, base, npages)
            self._reset(base, npages)
        elif change == "move":
            old = ev.get("old_base_gfn")
            if type(old) is not int:
                self.problem(lineno, seq, "memslot move lacks an integer old_base_gfn", "invariant")
            else:
                self._reset(old, npages)
            self._reset(base, npages)
        self.notified.clear()

    def _reset(self, base: int, npages: int) -> None:
        for gfn in self._in_range(base, npages):
            del self.counts[gfn]

    def _notified(self, gfn: int, npages: int) -> None:
        if self.delete is not None and self.delete[2:] == (gfn, npages):
            self.delete = None
        else:
            self.notified.add((gfn, npages))

    def _delete_done(self) -> None:
        if self.delete is not None:
            lineno, seq, base, npages = self.delete
            self.problem(
                lineno,
                seq,
                f"memslot delete of gfns {base:#x}+{npages:#x} drops non-zero write-track "
                "counts without track_remove_region",
                "invariant",
            )
            self.delete = None

    def _write_call(self, lineno: int, seq: int | None, ev: dict[str, Any]) -> None:
        plugin, outcome = ev["plugin"], ev["outcome"]
        self.by_plugin.setdefault(str(plugin), Counter())[str(outcome)] += 1
        if outcome not in ("ok", "error", "skipped"):
            self.problem(
                lineno, seq, f"track_write_call outcome {outcome!r} is not ok, error or skipped", "invariant"
            )
        if self.write is None:
            self.problem(
                lineno,
                seq,
                f"track_write_call for {plugin!r} with no call due (duplicate or stray)",
                "invariant",
            )
            return
        wline, _, gpa, due = self.write
        if plugin not in due:
            self.problem(
                lineno,
                seq,
                f"track_write_call for {plugin!r}, not due for the track_write of line {wline} "
                "(duplicate or not listed)",
                "invariant",
            )
            return
        skipped = due[: due.index(plugin)]
        if skipped:
            self.problem(
                lineno,
                seq,
                f"track_write_call for {plugin!r} before {', '.join(skipped)}",
                "invariant",
            )
        if ev["gpa"] != gpa:
            self.problem(
                lineno,
                seq,
                f"track_write_call gpa {ev['gpa']!r}, its track_write has {gpa!r}",
                "invariant",
            )
        del due[: len(skipped) + 1]
        if not due:
            self.write = None

    def _write_done(self) -> None:
        """The pending track_write gets no more calls: any still due are missing."""
        if self.write is not None:
            wline, wseq, _, due = self.write
            self.problem(
                wline,
                wseq,
                f"track_write without track_write_call for {', '.join(due)}",
                "invariant",
            )
            self.write = None
