"""The guest driver (core/programs/gvt_driver.s) under a vGPU: real faults, real emulation.

The GTT stores of the program fault on write-protected pages, are emulated by
the vCPU and reach GVT through ``track_write``; the audit log shows the chain
and ``pagetrack audit`` verifies it (run_gvt_tour, plugins/gvt_shadow_gtt/tour.py).
"""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from pagetrack.plugins.gvt_shadow_gtt import vgpu_of
from pagetrack.plugins.gvt_shadow_gtt.tour import EXPECTED_IO, TOUR_OPTIONS, run_gvt_tour
from pagetrack.program import builtin_program
from pagetrack.runner import run_program

PAGING = pytest.mark.parametrize("tdp", [False, True], ids=["shadow", "tdp"])
T3 = 0x503000  # the driver's first PT page
T4 = 0x504000


def load(path: str | Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in Path(path).read_bytes().splitlines()]


@pytest.fixture(scope="module")
def tours(tmp_path_factory) -> dict[bool, dict[str, Any]]:
    out = {}
    for tdp in (False, True):
        path = tmp_path_factory.mktemp("gvt") / "audit.jsonl"
        out[tdp] = run_gvt_tour(path, tdp=tdp)
    return out


@PAGING
def test_tour_runs_the_driver_and_every_check_passes(tours, tdp: bool) -> None:
    r = tours[tdp]
    assert r["exit"] == "hlt"
    assert tuple(r["io"]) == EXPECTED_IO and r["transcript_ok"]
    assert r["submits"] == 13 and r["gpu_stores"] == 13
    assert r["invariant_checks"] == r["invariant_checks_passed"] == 13
    assert r["track_write_calls"] == r["handled_writes"] == r["tracker_calls"]["ok"] == 21
    assert r["shadow_updates"] > r["handled_writes"]
    assert r["audit_ok"], r["audit_problems"]


@PAGING
def test_audit_log_shows_store_fault_emulate_track_write_handler_update(tours, tdp: bool) -> None:
    """For every trapped GTT store: page_fault(emulate) → emulate → track_write → gvt_handler →
    gvt_shadow_update(s) → track_write_call of the vGPU's tracker, in that order."""
    evs = load(tours[tdp]["audit_log"])
    tracker = tours[tdp]["tracker"]
    chains = 0
    for i, ev in enumerate(evs):
        if ev["event"] != "gvt_handler":
            continue
        gfn, gpa = ev["gfn"], ev["gpa"]
        tw = max(j for j in range(i) if evs[j]["event"] == "track_write")
        assert evs[tw]["gpa"] == gpa and evs[tw]["plugins"][0] == tracker
        em = max(j for j in range(tw) if evs[j]["event"] == "emulate")
        pf = max(j for j in range(em) if evs[j]["event"] == "page_fault")
        assert evs[pf]["result"] == "emulate" and evs[pf]["error_code"] & 2  # a write fault
        assert evs[pf]["gfn"] == gfn or (gpa & 0xFFF) == 0  # (the 2nd piece of a split store)
        call = next(j for j in range(i, len(evs)) if evs[j]["event"] == "track_write_call")
        assert evs[call]["plugin"] == tracker and evs[call]["gpa"] == gpa
        updates = [e for e in evs[i:call] if e["event"] == "gvt_shadow_update"]
        errors = [e for e in evs[i:call] if e["event"] == "gvt_error"]
        # a second half of a pending partial entry, or a 64K non-stride entry: nothing to do
        assert updates or errors or ev["len"] == 4 or gpa == 0x505000 + 8 * 3
        if updates:
            chains += 1
    assert chains >= 10


@PAGING
def test_pagetrack_audit_verifies_the_log(tours, tdp: bool) -> None:
    proc = subprocess.run([sys.executable, "-m", "pagetrack", "audit", tours[tdp]["audit_log"]],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "audit OK" in proc.stdout


def test_the_transcript_of_the_driver_steps(tours) -> None:
    evs = load(tours[False]["audit_log"])
    handlers = [(e["gpa"], e["len"]) for e in evs if e["event"] == "gvt_handler"]
    assert (T3 + 0xFFC, 4) in handlers and (T4, 4) in handlers  # a store split across two pages
    i = handlers.index((T3 + 0xFFC, 4))
    assert handlers[i + 1] == (T4, 4)
    errors = [e["message"] for e in evs if e["event"] == "gvt_error"]
    assert f"guest page write error, gpa {T3 + 8 * 20:#x}: EINVAL: 2-byte write to a PPGTT page" in errors
    assert any("0xdeadbeefcafe0001 type 2" in m for m in errors)  # gvt-linux #153
    assert "fail to populate guest root pointer" in errors
    assert "GVT doesn't support 1GB entry" in errors
    actions = {e["action"] for e in evs if e["event"] == "gvt_shadow_update"}
    assert {"link", "map", "map_64k", "split_2m", "scratch", "post_shadow", "root"} <= actions
    submits = [(e["op"], e["status"]) for e in evs if e["event"] == "gvt_submit"]
    assert submits[-2:] == [(4, -errno.ENXIO), (4, -errno.EINVAL)]


def test_destroy_releases_the_shadow_and_stores_stop_trapping(tours) -> None:
    evs = load(tours[False]["audit_log"])
    destroy = next(i for i, e in enumerate(evs) if e["event"] == "gvt_submit" and e["op"] == 5)
    after = evs[destroy + 1:]
    first_c = next(i for i, e in enumerate(after) if e["event"] == "gvt_submit")
    # between DESTROY of A and CREATE of C the driver writes A's old tables: no trap
    assert not [e for e in after[:first_c] if e["event"] in ("track_write", "gvt_handler")]
    freed = {e["gfn"] for e in evs[:destroy + 1] if e["event"] == "gvt_spt" and e["action"] == "free"}
    assert {0x500, 0x501, 0x502, 0x503, 0x504, 0x505} <= freed


@PAGING
def test_without_a_vgpu_the_plugin_is_inert_and_answers_enodev(tdp: bool) -> None:
    box: dict[str, Any] = {}
    result = run_program(builtin_program("gvt_driver"), tdp=tdp,
                         vm_hook=lambda vm, vcpu: box.update(names=vm.plugins.names(), vm_ok=vgpu_of(vm)))
    assert result["exit"] == "hlt"
    assert "gvt_shadow_gtt" in box["names"] and box["vm_ok"] is None
    enodev = -errno.ENODEV & 0xFFFFFFFF
    assert result["io"][0] == enodev
    assert set(result["io"]) == {enodev, 0}  # statuses, and GPU stores that never happened
    assert result["counters"]["tracked_writes"] == 0


def test_a_vgpu_attached_by_api_serves_the_guest_too() -> None:
    from pagetrack.plugins.gvt_shadow_gtt import attach_vgpu

    options = {k: v for k, v in TOUR_OPTIONS.items() if k != "attach"}
    box: dict[str, Any] = {}
    result = run_program(builtin_program("gvt_driver"), tdp=True,
                         vm_hook=lambda vm, vcpu: box.update(vgpu=attach_vgpu(vm, **options)))
    assert tuple(result["io"]) == EXPECTED_IO
    assert box["vgpu"].stats.invariant_passed == 13 and not box["vgpu"].attached  # closed with the VM
