"""The built-in tour: three sections, every tracker, one VM, one verified audit log."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import orjson
import pytest
from pagetrack.audit import verify
from pagetrack.program import DATA_GFN, TOUR_TRACKED
from pagetrack.tour import TOUR_WORKLOAD, run_tour


@pytest.fixture(scope="module")
def tour(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_tour(tmp_path_factory.mktemp("tour") / "audit.jsonl")


def _events(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in Path(result["audit_log"]).read_bytes().splitlines()]


def test_every_section_passes_and_the_log_verifies(tour: dict[str, Any]) -> None:
    assert [s["name"] for s in tour["sections"]] == ["page tables", "gpu", "dirty log"]
    assert all(s["ok"] and s["exit"] == "hlt" for s in tour["sections"]), tour["sections"]
    assert tour["exit"] == "hlt" and tour["tour"]["ok"]
    assert tour["tour"]["audit_ok"] and verify(tour["audit_log"]).ok


def test_one_vm_for_all_three_trackers(tour: dict[str, Any]) -> None:
    events = _events(tour)
    assert [e["event"] for e in events].count("vm_create") == 1
    assert len({e["vm"] for e in events}) == 1
    # the vGPU is attached to that VM for the gpu section only
    gpu = tour["sections"][1]
    attach = next(e for e in events if e["event"] == "gvt_attach")
    detach = [e for e in events if e["event"] == "gvt_detach"]
    assert gpu["first_seq"] <= attach["seq"] and all(e["seq"] < gpu["end_seq"] for e in detach)


def test_each_tracker_is_notified_in_its_section(tour: dict[str, Any]) -> None:
    pt, gpu, dirty = tour["sections"]
    assert pt["notifications"]["shadow_mmu"] >= 2  # the page-directory edits
    assert pt["counters"]["zaps"] >= 1
    assert gpu["plugin"].startswith("kvmgt.vgpu") and gpu["notifications"][gpu["plugin"]] > 0
    assert gpu["detail"]["transcript_ok"]
    assert gpu["detail"]["invariant_checks"] == gpu["detail"]["invariant_checks_passed"] > 0
    assert dirty["rounds"] == TOUR_WORKLOAD["rounds"]
    assert dirty["counters"]["stores"] > 0 and dirty["counters"]["emulations"] == 0
    totals = tour["tour"]["notifications"]
    assert totals == {k: sum(s["notifications"].get(k, 0) for s in tour["sections"]) for k in totals}


def test_rounds_are_shared_out_to_sections(tour: dict[str, Any]) -> None:
    sections = tour["sections"]
    assert sum(s["rounds"] for s in sections) == len(tour["rounds"]) == len(tour["round_stats"])
    for before, after in itertools.pairwise(sections):
        assert after["first_round"] == before["first_round"] + before["rounds"]
    pt = sections[0]
    assert pt["rounds"] == 4 and pt["detail"]["io"] == [1, 4, 4, 2]
    tracked = [DATA_GFN + TOUR_TRACKED, DATA_GFN + TOUR_TRACKED + 1]
    assert tour["rounds"][3] == tracked
    dirty = sections[2]
    assert all(len(tour["rounds"][i]) > 50 for i in range(dirty["first_round"], dirty["first_round"] + 4))


def test_the_page_table_guest_puts_its_mapping_back(tour: dict[str, Any]) -> None:
    """The gpu section's descriptor at DATA_BASE is read by GVT at gpa DATA_BASE: the remap is undone."""
    events = _events(tour)
    pt = tour["sections"][0]
    submits = [e for e in events if e["event"] == "gvt_submit"]
    assert submits and all(e["seq"] >= pt["end_seq"] for e in submits)
    assert tour["sections"][1]["detail"]["transcript_ok"]
