"""The GVT-g tour: the built-in guest driver under a vGPU, with a verified audit log.

``run_gvt_tour`` runs ``pagetrack.programs/gvt_driver.s`` on a shadow-paging VM
with a vGPU attached (64 KiB IPS honoured, one 2 MiB frame backed by host huge
pages), at audit level debug so that every trapped GTT store shows as
``page_fault`` → ``emulate`` → ``track_write`` → ``gvt_handler`` →
``gvt_shadow_update`` → ``track_write_call``, then verifies the log with
:func:`pagetrack.audit.verify` and returns the counts.
"""

from __future__ import annotations

import errno
import tempfile
from pathlib import Path
from typing import Any

from pagetrack.audit import verify
from pagetrack.program import builtin_program
from pagetrack.runner import run_program

from . import vgpu_of

__all__ = ["EXPECTED_IO", "TOUR_OPTIONS", "run_gvt_tour"]

#: The vGPU options of the tour (the 2 MiB frame at gfn 0x800 is host-contiguous).
TOUR_OPTIONS: dict[str, Any] = {"attach": True, "ips": True, "huge_ranges": [[0x800, 0xA00]]}

_OK = 0
_ENXIO = -errno.ENXIO & 0xFFFFFFFF
_EINVAL = -errno.EINVAL & 0xFFFFFFFF
#: What gvt_driver.s sends to LOG_PORT with a vGPU attached (see the numbers in its comments).
EXPECTED_IO: tuple[int, ...] = (
    _OK, _OK, _OK, 0xA1, _OK, 0xA2, _OK, 0xA3, _OK, 0xA4, _OK, 0xA5, _OK, 0xA6, _OK, 0xA7,
    _OK, 0xA8, _OK, 0xA9, _OK, 0xAA, _OK, _OK, 0xAB, _OK, 0xAC, _OK, _OK, _OK, _OK, 0xAD,
    _OK, _ENXIO, _EINVAL,
)


def run_gvt_tour(audit_log: str | Path | None = None, *, tdp: bool = False) -> dict[str, Any]:
    """Run the guest driver with a vGPU; return counts, the transcript and the audit verdict.

    Keys: ``exit``, ``io``, ``transcript_ok``, ``track_write_calls`` (calls of
    the vGPU's tracker), ``handled_writes`` (those that hit a shadowed table),
    ``shadow_updates``, ``submits``, ``invariant_checks``,
    ``invariant_checks_passed``, ``gpu_stores``, ``gvt_errors``, ``tracker``,
    ``audit_ok``, ``audit_events``, ``audit_problems``, ``events`` (counts by
    event name) and ``audit_log``.
    """
    if audit_log is None:
        audit_log = Path(tempfile.mkdtemp(prefix="pagetrack-gvt-tour-")) / "audit.jsonl"
    box: dict[str, Any] = {}
    result = run_program(
        builtin_program("gvt_driver"),
        tdp=tdp,
        audit=audit_log,
        audit_level="debug",
        options={"gvt_shadow_gtt": TOUR_OPTIONS},
        vm_hook=lambda vm, vcpu: box.update(vgpu=vgpu_of(vm)),
    )
    vgpu = box["vgpu"]
    stats = vgpu.stats
    report = verify(Path(audit_log))
    tracker = f"kvmgt.vgpu{vgpu.id}"
    return {
        "exit": result["exit"],
        "io": result["io"],
        "transcript_ok": tuple(result["io"]) == EXPECTED_IO,
        "tracker": tracker,
        "track_write_calls": stats.track_write_calls,
        "handled_writes": stats.handled_writes,
        "shadow_updates": stats.shadow_updates,
        "submits": stats.submits,
        "invariant_checks": stats.invariant_checks,
        "invariant_checks_passed": stats.invariant_passed,
        "gpu_stores": stats.gpu_stores,
        "gvt_errors": len(vgpu.log),
        "audit_ok": report.ok,
        "audit_events": report.events,
        "audit_problems": [str(p) for p in report.problems[:5]],
        "events": dict(report.counts_by_event),
        "tracker_calls": dict(report.counts_by_plugin.get(tracker, {})),
        "audit_log": str(audit_log),
    }
