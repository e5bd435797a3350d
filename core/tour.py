"""The built-in tour: one shadow-paging VM, a guest that edits its own page tables,
an external tracker on two data pages, dirty logging per round, and an audit log
that is verified at the end."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from .audit import verify
from .program import DATA_BASE, DATA_GFN, DEFAULT_DATA_SIZE, build_page_tables, builtin_program
from .runner import run_program

__all__ = ["TOUR_TRACKED", "run_tour"]

#: Data page index the tour's external tracker watches (it watches this page and the next).
TOUR_TRACKED = 0x10


def run_tour(audit_log: str | Path | None = None) -> dict[str, Any]:
    """Run the tour; return the run result plus the audit verification summary."""
    layout = build_page_tables(DEFAULT_DATA_SIZE, lambda gpa, value: None)
    defines = {
        "PTE_DATA": layout.pt_page_of(DATA_BASE) + 8 * ((DATA_BASE >> 12) & 511),
        "PD_ADDR": layout.pages[2],
        "PDE_OFF": 8 * ((DATA_BASE >> 21) & 511),
        "TRACKED_OFF": TOUR_TRACKED << 12,
    }
    program = builtin_program("tour", defines)
    if audit_log is None:
        audit_log = Path(tempfile.mkdtemp(prefix="pagetrack-tour-")) / "audit.jsonl"
    tracked = (DATA_GFN + TOUR_TRACKED, DATA_GFN + TOUR_TRACKED + 1)
    result = run_program(program, tdp=False, track=[tracked], audit=audit_log, audit_level="debug")
    report = verify(Path(audit_log))
    result["tour"] = {
        "tracked_gfns": list(range(tracked[0], tracked[1] + 1)),
        "audit_ok": report.ok,
        "audit_events": report.events,
        "audit_problems": [p.message for p in report.problems[:5]],
        "events": dict(report.counts_by_event),
        "plugins": {k: dict(v) if isinstance(v, dict) else v for k, v in report.counts_by_plugin.items()},
    }
    result["audit_log"] = str(audit_log)
    return result
