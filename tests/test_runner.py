"""``run_program``: the example programs, the tour and external trackers through the runner.

Every program of ../shared/programs runs under TDP and shadow paging; the
expected dirty-log rounds and port output are computed here from what each
program's comments describe.  The tour (a guest editing its own page tables
under shadow paging) is checked through its JSON-lines audit log.
"""

from __future__ import annotations

import json
from pathlib import Path

import pagetrack
import pytest
from pagetrack.program import DATA_BASE, DATA_GFN, assemble, build_page_tables, load_program
from pagetrack.runner import GfnRangeTracker, parse_gfn_range, run_program
from pagetrack.tour import TOUR_TRACKED, run_tour

PROGRAMS = Path(__file__).resolve().parents[2] / "shared" / "programs"
if not PROGRAMS.is_dir():  # a checkout elsewhere: the shared folder next to the repository
    PROGRAMS = Path("/work/shared/programs")

LCG_A, LCG_C, M64 = 6364136223846793005, 1442695040888963407, (1 << 64) - 1
PAGING = pytest.mark.parametrize("tdp", [True, False], ids=["tdp", "shadow"])


def expect_a_pages(N: int = 64, PER_ROUND: int = 8, FIRST: int = 0) -> tuple[list, list]:
    pages = [DATA_GFN + FIRST + i for i in range(N)]
    rounds = [pages[i : i + PER_ROUND] for i in range(0, N - N % PER_ROUND, PER_ROUND)]
    rounds.append(pages[N - N % PER_ROUND :])  # the HLT round: empty or the remainder
    return rounds, []


def expect_b_lcg(K: int = 8, W: int = 64, SEED: int = 12345, AREA_PAGES: int = 1024,
                 AREA_OFF: int = 0) -> tuple[list, list]:
    x = SEED
    rounds = []
    for _ in range(K):
        pages = set()
        for _ in range(W):
            x = (x * LCG_A + LCG_C) & M64
            pages.add(DATA_GFN + AREA_OFF + ((x >> 33) & (AREA_PAGES - 1)))
        rounds.append(sorted(pages))
    rounds.append([])
    return rounds, [x & 0xFFFF_FFFF]


def expect_c_mixed() -> tuple[list, list]:
    rel = [{4, 5, 6, 7}, {10, 11, 12, 13}, {20, 21, 22, 23, 24}, {31, 32, 50, 51}, {4, 5}, {61}, set()]
    return [sorted(DATA_GFN + p for p in r) for r in rel], []


def expect_d_reads() -> tuple[list, list]:
    return [[], [DATA_GFN + 4], [], [DATA_GFN + 7], []], []


EXPECT = {"a_pages": expect_a_pages, "b_lcg": expect_b_lcg, "c_mixed": expect_c_mixed,
          "d_reads": expect_d_reads}
VARIANTS = [
    ("a_pages", {}),
    ("a_pages", {"N": 100, "PER_ROUND": 7, "FIRST": 5}),
    ("b_lcg", {}),
    ("b_lcg", {"W": 2000}),
    ("b_lcg", {"K": 3, "W": 10, "SEED": 7, "AREA_PAGES": 256, "AREA_OFF": 100}),
    ("c_mixed", {}),
    ("d_reads", {}),
]


def test_every_shared_program_has_an_expectation() -> None:
    assert sorted(p.stem for p in PROGRAMS.glob("*.s")) == sorted(EXPECT)


@PAGING
@pytest.mark.parametrize(("name", "defines"), VARIANTS,
                         ids=[n + "".join(f"-{k}={v}" for k, v in d.items()) for n, d in VARIANTS])
def test_shared_program_rounds(name: str, defines: dict, tdp: bool) -> None:
    program = load_program(PROGRAMS / f"{name}.s", defines)
    result = run_program(program, tdp=tdp)
    rounds, io = EXPECT[name](**defines)
    assert result["exit"] == "hlt"
    assert result["rounds"] == rounds
    assert result["io"] == io
    assert result["paging"] == ("tdp" if tdp else "shadow")
    if name == "b_lcg":
        assert result["regs"]["r12"] & 0xFFFF_FFFF == io[0]
    assert result["counters"]["track_write_calls"] == result["counters"]["emulations"] == 0 or name == "c_mixed"


@PAGING
def test_shared_programs_with_a_tracked_range_give_the_same_rounds(tdp: bool) -> None:
    """Tracking data pages turns their stores into emulated writes; the dirty log is unchanged
    (page 21's failing cmpxchg included: the emulator still makes its write cycle)."""
    program = load_program(PROGRAMS / "c_mixed.s")
    plain = run_program(program, tdp=tdp)
    tracked = run_program(program, tdp=tdp, track=[(DATA_GFN, DATA_GFN + 63)])
    assert tracked["exit"] == "hlt"
    assert tracked["rounds"] == plain["rounds"]
    assert tracked["counters"]["tracked_writes"] > 0
    assert tracked["counters"]["emulations"] > 0


class Recorder:
    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []

    @pagetrack.hookimpl
    def track_write(self, gpa: int, new: bytes) -> None:
        self.writes.append((gpa, bytes(new)))


@PAGING
def test_case_30_through_run_program_with_a_plugin_recorder(tdp: bool) -> None:
    rec = Recorder()
    src = """
        mov rax, 0x1122334455667788
        mov qword ptr [DATA_BASE + 0x3ffc], rax
        hlt
    """
    g = DATA_GFN + 3
    result = run_program(assemble(src), tdp=tdp, track=[(g, g)], plugins=[rec])
    assert result["exit"] == "hlt"
    assert rec.writes == [((g << 12) + 0xFFC, bytes.fromhex("88776655")),
                          ((g + 1) << 12, bytes.fromhex("44332211"))]
    assert result["counters"]["tracked_writes"] == 1  # GfnRangeTracker counts its own gfns only
    assert result["rounds"][-1] == [g, g + 1]


@PAGING
def test_case_31_through_run_program_exit_mentions_the_guest_page_fault(tdp: bool) -> None:
    rec = Recorder()
    size = 1 << 20
    last = DATA_GFN + (size >> 12) - 1
    src = f"""
        mov rdi, {(last << 12) + 0xffc:#x}
        mov qword ptr [rdi], rdi
        hlt
    """
    result = run_program(assemble(src, data_size=size), tdp=tdp, track=[(last, last)], plugins=[rec])
    assert "page fault" in result["exit"].lower() or result["exit"].startswith("#PF")
    assert rec.writes == [((last << 12) + 0xFFC, ((last << 12) + 0xFFC).to_bytes(8, "little")[:4])]


@PAGING
def test_case_65_through_run_program_first_fault_is_emulated(tdp: bool) -> None:
    src = """
        add qword ptr [DATA_BASE + 0x8000], 3
        hlt
    """
    result = run_program(assemble(src), tdp=tdp, track=[(DATA_GFN + 8, DATA_GFN + 8)])
    c = result["counters"]
    assert result["exit"] == "hlt"
    assert c["emulations"] == 1 and c["kvm.unprotect_retry"] == 0
    assert c["tracked_writes"] == 1


# ---- the tour ---------------------------------------------------------------------------------------

def test_tour_io_and_audit_order(tmp_path: Path) -> None:
    log = tmp_path / "tour.jsonl"
    result = run_tour(log)
    assert result["exit"] == "hlt"
    assert result["io"] == [1, 4, 4, 2]
    assert result["tour"]["audit_ok"], result["tour"]["audit_problems"]
    events = [json.loads(line) for line in log.read_text().splitlines()]
    layout = build_page_tables(16 << 20, lambda gpa, v: None)
    pd_gfn = layout.pages[2] >> 12
    # round 3 edits the page directory: fault → emulate → track_write → zap, in that order
    kinds = ("page_fault", "emulate", "track_write", "zap")
    seq = [e for e in events if e["event"] in kinds]
    chains = []
    for i, e in enumerate(seq[:-3]):
        if e["event"] == "page_fault" and e["result"] == "emulate" and e["gfn"] == pd_gfn:
            chains.append(seq[i : i + 4])
    assert len(chains) == 2
    for pf, em, tw, zap in chains:
        assert [pf["event"], em["event"], tw["event"], zap["event"]] == list(kinds)
        assert tw["gpa"] >> 12 == pd_gfn and tw["plugins"][-1] == "shadow_mmu"
        assert (zap["gfn"], zap["pg_level"], zap["reason"]) == (pd_gfn, 2, "pte")
    assert chains[1][3]["sptes"] == 1  # the live PDE's SPTE was zapped
    # round 4: the straddling store gives two notifications, both to the external tracker
    tracked = (DATA_GFN + TOUR_TRACKED) << 12
    tws = [e for e in events if e["event"] == "track_write" and e["gpa"] >> 12 in
           (tracked >> 12, (tracked >> 12) + 1)]
    assert [(e["gpa"], e["len"]) for e in tws] == [(tracked + 0x10, 8), (tracked + 0xFFC, 4),
                                                   (tracked + 0x1000, 4)]
    assert result["counters"]["tracked_writes"] == 3


def test_run_program_audit_path_writes_json_lines(tmp_path: Path) -> None:
    log = tmp_path / "a.jsonl"
    sym = build_page_tables(2 << 20, lambda gpa, v: None)
    src = f"""
        mov rax, qword ptr [{sym.pages[2] + 16:#x}]
        mov qword ptr [{sym.pages[2] + 8 * 400:#x}], rax
        hlt
    """
    result = run_program(assemble(src, data_size=2 << 20), tdp=False, audit=log, audit_level="debug")
    assert result["exit"] == "hlt" and result["audit_log"] == str(log)
    names = [json.loads(line)["event"] for line in log.read_text().splitlines()]
    i = names.index("emulate")
    assert names[i - 1] == "page_fault"
    assert names.index("track_write", i) < names.index("zap", i)


# ---- GfnRangeTracker / --track parsing ------------------------------------------------------------

def test_parse_gfn_range() -> None:
    assert parse_gfn_range("0x400") == (0x400, 0x400)
    assert parse_gfn_range("0x400-0x40f") == (0x400, 0x40F)
    assert parse_gfn_range("10-12") == (10, 12)
    for bad in ("x", "5-3", "-1"):
        with pytest.raises(pagetrack.InputError):
            parse_gfn_range(bad)


def test_gfn_range_tracker_forgets_removed_regions() -> None:
    vm = pagetrack.VM(tdp=True, enable=("shadow_mmu",))
    slot = vm.add_memory(DATA_BASE, 0x10000)
    tracker = GfnRangeTracker([(DATA_GFN + 1, DATA_GFN + 2)])
    tracker.attach(vm)
    assert vm.write_track_count(DATA_GFN + 1) == 1 and vm.plugins.has_external_tracker()
    vm.hooks.track_write(vm, None, DATA_BASE + 0x1008, b"ab")
    vm.hooks.track_write(vm, None, DATA_BASE + 0x3008, b"ab")
    assert (tracker.writes, tracker.bytes) == (1, 2)
    vm.set_user_memory_region(slot.key, 0, DATA_BASE, 0, slot.userspace_addr)
    assert tracker.gfns == set()
    vm.close()
