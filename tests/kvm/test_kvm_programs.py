"""The example programs on the real KVM: rounds, io and registers as their comments say."""

from __future__ import annotations

import json

import pytest
from kvm_helpers import (
    LCG_A,
    LCG_C,
    MASK64,
    all_pt_gfns,
    expected,
    expected_pt_rounds,
    programs_dir,
    requires_kvm,
)
from pagetrack.program import CODE_BASE, DATA_BASE, STACK_TOP, load_program

pytestmark = [requires_kvm, pytest.mark.kvm]

VARIANTS = [
    ("a_pages", {}),
    ("a_pages", {"N": 100, "PER_ROUND": 7, "FIRST": 5}),
    ("a_pages", {"N": 600, "PER_ROUND": 600, "FIRST": 3000}),
    ("b_lcg", {}),
    ("b_lcg", {"W": 2000}),
    ("b_lcg", {"K": 3, "W": 10, "SEED": 7, "AREA_PAGES": 256, "AREA_OFF": 100}),
    ("c_mixed", {}),
    ("d_reads", {}),
]
MODES = [("bitmap", False), ("clear", False), ("clear", True), ("ring", False)]


def _id(v: tuple[str, dict[str, int]]) -> str:
    name, d = v
    return name + "".join(f"-{k}={val}" for k, val in d.items())


@pytest.fixture(scope="module")
def run_on_kvm():
    from pagetrack.kvm import run_on_kvm

    return run_on_kvm


@pytest.mark.parametrize(("mode", "initially_set"), MODES,
                         ids=["bitmap", "clear", "clear+initially_set", "ring"])
@pytest.mark.parametrize("variant", VARIANTS, ids=[_id(v) for v in VARIANTS])
def test_program_rounds(variant, mode, initially_set, run_on_kvm):
    name, defines = variant
    prog = load_program(programs_dir() / f"{name}.s", defines)
    r = run_on_kvm(prog, mode=mode, initially_set=initially_set)
    want_rounds, want_io = expected(name, defines)
    assert r["exit"] == "hlt"
    assert r["rounds"] == want_rounds
    assert r["io"] == want_io
    assert len(r["low_rounds"]) == len(r["rounds"])
    # the page-table pages in each low round are exactly those whose PTE D bits
    # the round's first writes set
    pts = all_pt_gfns(prog.data_size)
    got_pt = [set(lr) & pts for lr in r["low_rounds"]]
    assert got_pt == expected_pt_rounds(want_rounds, prog.data_size)
    regs = r["regs"]
    assert set(regs) == {"rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9",
                         "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags"}
    assert all(0 <= v <= MASK64 for v in regs.values())
    assert CODE_BASE < regs["rip"] <= CODE_BASE + len(prog.code)
    assert prog.code[regs["rip"] - CODE_BASE - 1] == 0xF4  # stopped right after the hlt
    assert regs["rsp"] == STACK_TOP
    assert regs["rflags"] & 0x2 and not regs["rflags"] & (1 << 16)
    if name != "c_mixed":  # c_mixed uses rsi/rdi for string instructions
        assert regs["rsi"] == prog.data_size and regs["rdi"] == DATA_BASE
    if name == "b_lcg":
        d = {"K": 8, "W": 64, "SEED": 12345} | defines
        x = d["SEED"]
        for _ in range(d["K"] * d["W"]):
            x = (x * LCG_A + LCG_C) & MASK64
        assert regs["r12"] == x and regs["rax"] == x
        assert regs["r13"] == LCG_A and regs["r14"] == LCG_C and regs["r15"] == 0
    if name == "a_pages":
        assert regs["rcx"] == defines.get("N", 64)
        assert regs["rbx"] == DATA_BASE + defines.get("FIRST", 0) * 4096
    assert r["mode"] == mode and r["execution"] in ("native", "user-mode monitor")
    for key in ("exits", "io_exits", "pf_fixed", "pf_taken", "insn_emulation"):
        assert isinstance(r["stats"][key], int)
    json.dumps(r)


@pytest.mark.parametrize("name", ["a_pages", "b_lcg", "c_mixed", "d_reads"])
def test_low_rounds_shape(name, run_on_kvm):
    """Low-slot pages seen: page tables, the stack page, monitor pages, the code page."""
    from pagetrack.kvm.guest import MON_STACK_TOP

    prog = load_program(programs_dir() / f"{name}.s")
    r = run_on_kvm(prog)
    allowed = all_pt_gfns(prog.data_size) | {(STACK_TOP >> 12) - 1, CODE_BASE >> 12,
                                             (MON_STACK_TOP >> 12) - 1}
    for lr in r["low_rounds"]:
        assert set(lr) <= allowed, lr
    pushes = name == "c_mixed"  # round 6 pushes and pops through the stack page
    stack_rounds = [i for i, lr in enumerate(r["low_rounds"]) if (STACK_TOP >> 12) - 1 in lr]
    assert stack_rounds == ([5] if pushes else [])
