"""Lazy flags across instruction boundaries, against Unicorn.

Single-instruction tests start from materialised RFLAGS; here random straight-line
sequences mix flag producers (ADD/CMP/INC/logic/shifts/MUL/BT ...) with consumers
(Jcc, SETcc, CMOVcc, ADC/SBB, RCL, LAHF, PUSHF), so every consumer reads flags a
previous instruction left lazy.  A consumer is only placed where every flag it
reads is defined by the SDM, and the final flags are compared on the defined set.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from emu_helpers import CODE, DATA, DATA_SIZE, PTR_BASE, STACK, UnicornRunner, asm, flag_names
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pagetrack.emulator import CpuState, FlatMemory, InstructionCache, step

FC, FP, FA, FZ, FS, FO = 0x1, 0x4, 0x10, 0x40, 0x80, 0x800
ALL = FC | FP | FA | FZ | FS | FO
M64 = (1 << 64) - 1

REGS = {8: ("rax", "rcx", "rdx", "rsi", "r8", "r11"),
        4: ("eax", "ecx", "edx", "esi", "r8d", "r11d"),
        2: ("ax", "cx", "dx", "si", "r8w", "r11w"),
        1: ("al", "cl", "dl", "sil", "r8b", "r11b")}
PTR = {1: "byte", 2: "word", 4: "dword", 8: "qword"}
CONDS = {"o": FO, "no": FO, "b": FC, "ae": FC, "e": FZ, "ne": FZ, "be": FC | FZ, "a": FC | FZ,
         "s": FS, "ns": FS, "p": FP, "np": FP, "l": FS | FO, "ge": FS | FO, "le": FZ | FS | FO,
         "g": FZ | FS | FO}


@dataclass(frozen=True)
class Step:
    src: str
    reads: int
    defines: int
    undefines: int = 0


def _producers(rnd: random.Random) -> Step:
    size = rnd.choice((1, 2, 4, 8))
    r0, r1 = rnd.sample(REGS[size], 2)
    m = f"{PTR[size]} ptr [rbx + {rnd.randrange(0, 0x40)}]"
    dst = rnd.choice((r0, r0, m))
    kind = rnd.randrange(12)
    if kind == 0:
        op = rnd.choice(("add", "sub", "cmp"))
        src = rnd.choice((r1, str(rnd.choice((1, -1, 0x7F, 0x55)))))
        return Step(f"{op} {dst}, {src}", 0, ALL)
    if kind == 1:
        return Step(f"{rnd.choice(('adc', 'sbb'))} {dst}, {r1}", FC, ALL)
    if kind == 2:
        return Step(f"{rnd.choice(('inc', 'dec'))} {dst}", 0, FP | FA | FZ | FS | FO)
    if kind == 3:
        return Step(f"neg {dst}", 0, ALL)
    if kind == 4:
        op = rnd.choice(("and", "or", "xor", "test"))
        return Step(f"{op} {dst}, {r1}", 0, FC | FP | FZ | FS | FO, FA)
    if kind == 5:
        op = rnd.choice(("shl", "shr", "sar"))
        if rnd.random() < 0.5:
            return Step(f"{op} {dst}, 1", 0, FC | FP | FZ | FS | FO, FA)
        return Step(f"{op} {dst}, 3", 0, FC | FP | FZ | FS, FA | FO)
    if kind == 6:
        op = rnd.choice(("rol", "ror"))
        if rnd.random() < 0.5:
            return Step(f"{op} {dst}, 1", 0, FC | FO)
        return Step(f"{op} {dst}, 3", 0, FC, FO)
    if kind == 7:
        return Step(f"{rnd.choice(('rcl', 'rcr'))} {dst}, 1", FC, FC | FO)
    if kind == 8:
        if size == 1 or rnd.random() < 0.3:
            return Step(f"{rnd.choice(('mul', 'imul'))} {REGS[size][1]}", 0, FC | FO, FP | FA | FZ | FS)
        return Step(f"imul {r0}, {r1}", 0, FC | FO, FP | FA | FZ | FS)
    if kind == 9:
        size = rnd.choice((2, 4, 8))
        return Step(f"bt {REGS[size][1]}, {rnd.randrange(8 * size)}", 0, FC, FP | FA | FS | FO)
    if kind == 10:
        return Step(rnd.choice(("clc", "stc", "sahf")), 0, FC) if rnd.random() < 0.6 \
            else Step("cmc", FC, FC)
    return Step(f"popcnt {REGS[8][0]}, {REGS[8][2]}", 0, ALL)


def _consumers(rnd: random.Random) -> Step:
    cc = rnd.choice(tuple(CONDS))
    kind = rnd.randrange(7)
    size = rnd.choice((2, 4, 8))
    r0, r1 = rnd.sample(REGS[size], 2)
    if kind == 0:
        return Step(f"set{cc} {rnd.choice(REGS[1])}", CONDS[cc], 0)
    if kind == 1:
        return Step(f"cmov{cc} {r0}, {r1}", CONDS[cc], 0)
    if kind == 2:
        label = f"skip{rnd.getrandbits(32)}"
        return Step(f"j{cc} {label}\nmov r9d, {rnd.randrange(1000)}\n{label}:", CONDS[cc], 0)
    if kind == 3:
        return Step(f"{rnd.choice(('adc', 'sbb'))} {r0}, {r1}", FC, ALL)
    if kind == 4:
        return Step("lahf", FC | FP | FA | FZ | FS, 0)
    if kind == 5:
        return Step("pushfq\npop r10", ALL, 0)
    return Step(f"{rnd.choice(('rcl', 'rcr'))} {r0}, 1", FC, FC | FO)


def program(rnd: random.Random, length: int) -> tuple[str, int]:
    """Random straight-line code and the flags defined at its end."""
    defined = ALL
    lines: list[str] = []
    while len(lines) < length:
        s = _producers(rnd) if rnd.random() < 0.55 else _consumers(rnd)
        if s.reads & ~defined:
            continue
        lines.append(s.src)
        defined = (defined | s.defines) & ~s.undefines
    return "\n".join(lines), defined


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.integers(0, 2**64 - 1), st.integers(2, 8), st.integers(0, ALL))
def test_random_flag_sequences_match_unicorn(seed: int, length: int, rflags: int) -> None:
    rnd = random.Random(seed)
    src, defined = program(rnd, length)
    code = asm(src)
    regs = [rnd.choice((0, 1, 0x7F, 0x80, 0xFFFFFFFF, 1 << 63, M64, rnd.getrandbits(64)))
            if rnd.random() < 0.4 else rnd.getrandbits(64) for _ in range(16)]
    regs[3] = PTR_BASE + rnd.randrange(0x100)
    regs[4] = STACK + 8 * rnd.randrange(0x40)
    data = rnd.randbytes(DATA_SIZE)
    rflags = (rflags & ALL) | 2

    mem = FlatMemory()
    mem.load(CODE, code)
    mem.load(DATA, data)
    cpu = CpuState(CODE)
    cpu.regs = list(regs)
    cpu.set_rflags(rflags)
    cache = InstructionCache()
    for _ in range(4 * length):
        if cpu.rip == CODE + len(code):
            break
        step(cpu, mem, cache)
    theirs = UNICORN.run(code, regs, rflags, data, whole=True)

    ctx = f"\n{src}\nregs={[hex(r) for r in regs]} rflags={flag_names(rflags)}"
    assert cpu.regs == theirs.regs, f"{[hex(r) for r in cpu.regs]} vs {[hex(r) for r in theirs.regs]}{ctx}"
    assert cpu.rip == theirs.rip
    got, want = cpu.get_rflags() & defined, theirs.rflags & defined
    assert got == want, f"{flag_names(got)} vs {flag_names(want)}{ctx}"
    assert mem.read_bytes(DATA, DATA_SIZE) == theirs.data, ctx


UNICORN = UnicornRunner()
