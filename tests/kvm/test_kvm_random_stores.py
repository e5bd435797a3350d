"""Random store programs on the real KVM against a model of the pages each instruction writes.

The model: every instruction with a memory destination writes its whole footprint
(an x86 RMW instruction performs a write cycle even when the value does not change,
and a failed CMPXCHG still writes the old value back); string instructions with
RCX = 0 write nothing; with DF = 1 they walk down from RDI.  Loads never dirty.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvm_helpers import expected_pt_rounds, pt_gfn_map, requires_kvm
from pagetrack.program import DATA_GFN, assemble

pytestmark = [requires_kvm, pytest.mark.kvm]

NPAGES = 24
SIZE = NPAGES * 4096
PTR = {1: "byte", 2: "word", 4: "dword", 8: "qword"}
ACC = {1: "al", 2: "ax", 4: "eax", 8: "rax"}
SRC = {1: "cl", 2: "cx", 4: "ecx", 8: "rcx"}
SUF = {1: "b", 2: "w", 4: "d", 8: "q"}


@dataclass
class Op:
    asm: str
    writes: tuple[int, int] | None  # byte range [start, end) of data-slot offsets, or None


def _addr(draw, width: int, aligned: bool, span: int = 0) -> int:
    """A data offset for an access of ``width`` bytes, often near a page end."""
    page = draw(st.integers(0, NPAGES - 2 - span // 4096))
    off = draw(st.one_of(st.integers(0, 4095), st.sampled_from([0, 4088, 4092, 4093, 4094, 4095])))
    addr = page * 4096 + off
    if aligned:
        addr -= addr % width
    return min(addr, SIZE - width - span)


@st.composite
def store(draw) -> Op:
    w = draw(st.sampled_from([1, 2, 4, 8]))
    a = _addr(draw, w, draw(st.booleans()))
    v = draw(st.integers(0, (1 << (8 * w)) - 1))
    return Op(f"mov rax, {v}\nmov {PTR[w]} ptr [rbx + {a}], {ACC[w]}", (a, a + w))


@st.composite
def string_store(draw) -> Op:
    """rep stos / rep movs, up or down (std), including zero counts."""
    w = draw(st.sampled_from([1, 2, 4, 8]))
    count = draw(st.one_of(st.just(0), st.integers(1, 8), st.integers(1, 1200 // w)))
    down = draw(st.booleans())
    span = max(count - 1, 0) * w
    dst = _addr(draw, w, False, span)
    if down:
        dst += span  # RDI starts at the highest element
        lo, hi = dst - span, dst + w
    else:
        lo, hi = dst, dst + count * w
    pre = "std\n" if down else ""
    post = "\ncld" if down else ""
    if draw(st.booleans()):
        body = f"lea rdi, [rbx + {dst}]\nmov rcx, {count}\nmov rax, -1\n{pre}rep stos{SUF[w]}{post}"
    else:
        src = draw(st.integers(span if down else 0, SIZE - w - (0 if down else span)))
        body = (f"lea rsi, [rbx + {src}]\nlea rdi, [rbx + {dst}]\nmov rcx, {count}\n"
                f"{pre}rep movs {PTR[w]} ptr [rdi], {PTR[w]} ptr [rsi]{post}")
    return Op(body, (lo, hi) if count else None)


@st.composite
def rmw(draw) -> Op:
    """cmpxchg (hit and miss), xchg, xadd, bts, setcc: all write their footprint."""
    kind = draw(st.sampled_from(["cmpxchg_hit", "cmpxchg_miss", "xchg", "xadd", "bts", "setcc"]))
    w = 1 if kind == "setcc" else draw(st.sampled_from([2, 4, 8] if kind == "bts" else [1, 2, 4, 8]))
    lock = draw(st.booleans())
    # locked (and xchg, always locked) accesses stay aligned: no split locks
    a = _addr(draw, w, lock or kind == "xchg")
    m = f"{PTR[w]} ptr [rbx + {a}]"
    pfx = "lock " if lock else ""
    if kind == "cmpxchg_hit":
        asm = f"mov {ACC[w]}, {m}\nmov rcx, 0x5a5a5a5a5a5a5a5a\n{pfx}cmpxchg {m}, {SRC[w]}"
    elif kind == "cmpxchg_miss":
        asm = f"mov {ACC[w]}, {m}\nnot rax\nmov rcx, 7\n{pfx}cmpxchg {m}, {SRC[w]}"
    elif kind == "xchg":
        asm = f"mov rcx, 3\nxchg {m}, {SRC[w]}"
    elif kind == "xadd":
        asm = f"mov rcx, 1\n{pfx}xadd {m}, {SRC[w]}"
    elif kind == "bts":
        asm = f"{pfx}bts {m}, {draw(st.integers(0, 8 * w - 1))}"
    else:
        asm = f"cmp rax, rax\n{draw(st.sampled_from(['sete', 'setne']))} {m}"
    return Op(asm, (a, a + w))


@st.composite
def load(draw) -> Op:
    a = _addr(draw, 8, False)
    return Op(draw(st.sampled_from([f"mov rax, qword ptr [rbx + {a}]",
                                    f"cmp qword ptr [rbx + {a}], rax"])), None)


ROUND = Op("out ROUND_PORT, al", None)
ops = st.lists(st.one_of(store(), string_store(), rmw(), load(), st.just(ROUND)),
               min_size=1, max_size=14)


def model(program: list[Op]) -> list[list[int]]:
    rounds: list[set[int]] = [set()]
    for op in program:
        if op is ROUND:
            rounds.append(set())
        elif op.writes:
            lo, hi = op.writes
            rounds[-1].update(DATA_GFN + p for p in range(lo // 4096, (hi - 1) // 4096 + 1))
    return [sorted(r) for r in rounds]


MODES = st.sampled_from([("bitmap", False), ("clear", False), ("clear", True), ("ring", False)])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=ops, mode=MODES)
def test_random_stores_match_model(program, mode):
    from pagetrack.kvm import run_on_kvm

    source = "mov rbx, rdi\n" + "\n".join(op.asm for op in program) + "\nhlt"
    prog = assemble(source, "random", data_size=SIZE)
    r = run_on_kvm(prog, mode=mode[0], initially_set=mode[1])
    want = model(program)
    assert r["exit"] == "hlt", source
    assert r["rounds"] == want, source
    pts = set(pt_gfn_map(SIZE).values())
    assert [set(lr) & pts for lr in r["low_rounds"]] == expected_pt_rounds(want, SIZE)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=ops, mode=st.sampled_from([("bitmap", False), ("clear", True)]))
def test_random_stores_native(program, mode):
    """The same model holds for CPL-0 runs (on an emulating host: KVM's emulator)."""
    from pagetrack.kvm import detect_execution, run_program

    if not detect_execution()["native"]["reprotect_ok"]:
        pytest.skip("native bitmap probe failed on this host")
    source = "mov rbx, rdi\n" + "\n".join(op.asm for op in program) + "\nhlt"
    r = run_program(assemble(source, "random", data_size=SIZE), mode[0], mode[1],
                    execution="native")
    assert r["exit"] == "hlt", source
    assert r["rounds"] == model(program), source
