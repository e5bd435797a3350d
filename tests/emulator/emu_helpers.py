"""Shared helpers for the emulator tests: assembling, running one instruction on
the interpreter and on Unicorn, and the memory layout both use."""

from __future__ import annotations

from dataclasses import dataclass, field

import keystone
import unicorn
from pagetrack.emulator import (
    REG_NAMES,
    CpuState,
    Exit,
    FlatMemory,
    GuestFault,
    InstructionCache,
    step,
)
from pagetrack.emulator.flags import ARITH_MASK
from unicorn import x86_const as ux

REGION = 0x200000
"""Start of the mapped region: one code page, then DATA_SIZE bytes of data."""
CODE = 0x200800
"""Where a test instruction is assembled (mid-page so rel8 targets stay mapped)."""
DATA = 0x201000
DATA_SIZE = 0x4000
PTR_BASE = DATA + 0x1000
"""RBX, RSI and RDI point into [PTR_BASE, PTR_BASE + 0x1000)."""
STACK = DATA + 0x3000
"""RSP points into [STACK, STACK + 0x800)."""

M64 = 0xFFFFFFFFFFFFFFFF
DF = 0x400

_KS = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_64)
_UC_REGS = [getattr(ux, f"UC_X86_REG_{n.upper()}") for n in REG_NAMES]


def asm(src: str, addr: int = CODE) -> bytes:
    """Assemble Intel-syntax ``src`` at ``addr`` with keystone."""
    enc, _ = _KS.asm(src, addr)
    if not enc:
        raise ValueError(f"keystone produced nothing for {src!r}")
    return bytes(enc)


@dataclass
class Outcome:
    """State after one instruction (or the fault it raised)."""

    regs: list[int]
    rip: int
    rflags: int
    data: bytes = field(repr=False)
    fault: int | None = None
    exit: Exit | None = None
    extra: dict[str, int] = field(default_factory=dict)


def run_interp(code: bytes, regs: list[int], rflags: int, data: bytes,
               fs_base: int = 0, emulating: bool = False) -> Outcome:
    """Run the instruction at CODE on the interpreter over a FlatMemory."""
    mem = FlatMemory()
    mem.emulating = emulating
    mem.load(CODE, code)
    mem.load(DATA, data)
    cpu = CpuState(CODE)
    cpu.regs = list(regs)
    cpu.set_rflags(rflags)
    cpu.fs_base = fs_base
    before = cpu.copy()
    fault = None
    ex = None
    try:
        ex = step(cpu, mem, InstructionCache())
    except GuestFault as f:
        fault = f.vector
        assert cpu == before, "a faulting instruction changed the CPU state"
    return Outcome(list(cpu.regs), cpu.rip, cpu.get_rflags(), mem.read_bytes(DATA, DATA_SIZE),
                   fault, ex)


class UnicornRunner:
    """One reusable Unicorn x86-64 instance with the test memory layout."""

    def __init__(self) -> None:
        self.intno: int | None = None
        self.uc = self._fresh()

    def _fresh(self) -> unicorn.Uc:
        uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
        uc.mem_map(REGION, 0x1000 + DATA_SIZE)
        uc.hook_add(unicorn.UC_HOOK_INTR, self._on_interrupt)
        return uc

    def _on_interrupt(self, uc: unicorn.Uc, intno: int, _user: object) -> None:
        self.intno = intno
        uc.emu_stop()

    def run(self, code: bytes, regs: list[int], rflags: int, data: bytes,
            fs_base: int = 0, whole: bool = False) -> Outcome:
        """Run one instruction; ``whole`` runs until RIP reaches its end (Unicorn counts
        each REP iteration as one instruction)."""
        uc = self.uc
        uc.mem_write(REGION, bytes(0x1000))
        uc.mem_write(CODE, code)
        uc.mem_write(DATA, data)
        for reg, value in zip(_UC_REGS, regs, strict=True):
            uc.reg_write(reg, value)
        uc.reg_write(ux.UC_X86_REG_EFLAGS, rflags)
        uc.reg_write(ux.UC_X86_REG_FS_BASE, fs_base)
        self.intno = None
        uc.emu_start(CODE, CODE + len(code), count=0 if whole else 1)
        if self.intno is not None:
            # Unicorn keeps the pending exception (the next one becomes #DF): start over
            self.uc = self._fresh()
        return Outcome([uc.reg_read(r) for r in _UC_REGS], uc.reg_read(ux.UC_X86_REG_RIP),
                       uc.reg_read(ux.UC_X86_REG_EFLAGS), bytes(uc.mem_read(DATA, DATA_SIZE)),
                       self.intno)


def flag_names(value: int) -> str:
    """``CF ZF ...`` for the arithmetic flags in ``value`` (assertion messages)."""
    names = {0x1: "CF", 0x4: "PF", 0x10: "AF", 0x40: "ZF", 0x80: "SF", 0x800: "OF", DF: "DF"}
    return " ".join(n for bit, n in names.items() if value & bit) or "-"


__all__ = ["ARITH_MASK", "CODE", "DATA", "DATA_SIZE", "DF", "M64", "PTR_BASE", "STACK",
           "Outcome", "UnicornRunner", "asm", "flag_names", "run_interp"]
