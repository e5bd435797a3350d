"""Builders of audit logs for the audit tests: valid logs from random operations, and files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import strategies as st
from pagetrack.audit import AuditLog

#: One step of a history: ``(kind, *arguments)``.
Op = tuple[Any, ...]

GFNS = (0x400, 0x401, 0x402, 0x7FF)
PLUGINS = ("gvt", "dirty_log", "shadow_mmu")

#: One operation of a random but valid VM history.
ops = st.one_of(
    st.tuples(st.just("add"), st.sampled_from(GFNS)),
    st.tuples(st.just("remove"), st.sampled_from(GFNS)),
    st.tuples(
        st.just("write"),
        st.lists(st.sampled_from(PLUGINS), unique=True, max_size=3),
        st.binary(min_size=1, max_size=8),
    ),
    st.tuples(st.just("fault"), st.sampled_from(GFNS)),
    st.tuples(st.just("delete"), st.booleans()),
    st.tuples(st.just("move")),
)


def build(history: list[Op], vm_id: str = "vm0") -> AuditLog:
    """A closed in-memory log of ``history`` that satisfies every invariant."""
    log = AuditLog.in_memory(vm_id)
    log.emit("vm_create", tdp=False)
    counts: dict[int, int] = {}
    for op in history:
        kind = op[0]
        if kind in ("add", "remove"):
            gfn = op[1]
            before = counts.get(gfn, 0)
            after = before + (1 if kind == "add" else -1)
            if 0 <= after <= 0xFFFF:
                counts[gfn] = after
                log.emit(f"track_{kind}", gfn=gfn, count=after, by="external")
            else:
                log.emit("track_warn", "warning", gfn=gfn, op=kind, count=before)
        elif kind == "write":
            plugins, data = op[1], op[2]
            assert isinstance(plugins, list) and isinstance(data, bytes)
            log.emit("track_write", vcpu=0, gpa=0x400010, len=len(data), data=data, plugins=plugins)
            for name in plugins:
                log.emit("track_write_call", plugin=name, gpa=0x400010, outcome="ok")
        elif kind == "fault":
            log.emit(
                "page_fault",
                "debug",
                vcpu=0,
                addr=op[1] << 12,
                gfn=op[1],
                error_code=3,
                result="emulate",
            )
        elif kind == "delete":
            if op[1]:  # tell the trackers first, as kvm_page_track_delete_slot does
                log.emit("track_remove_region", gfn=0x400, nr_pages=0x400)
            elif any(counts.values()):
                continue  # would drop counts unannounced: not a valid history
            log.emit("memslot", change="delete", slot=1, base_gfn=0x400, npages=0x400, flags=0)
            counts.clear()
            log.emit("memslot", change="create", slot=1, base_gfn=0x400, npages=0x400, flags=0)
        elif kind == "move":  # away and back: every count of the slot is lost (fresh metadata)
            for old, new in ((0x400, 0x10000), (0x10000, 0x400)):
                log.emit(
                    "memslot",
                    change="move",
                    slot=1,
                    base_gfn=new,
                    npages=0x400,
                    flags=0,
                    old_base_gfn=old,
                )
            counts.clear()
    log.emit("vm_destroy")
    log.close()
    return log


def write_lines(path: Path, lines: list[bytes]) -> Path:
    """Write raw lines (without newlines) as a JSON-lines file."""
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path
