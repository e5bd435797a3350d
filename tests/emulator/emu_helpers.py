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
        uc.ctl_remove_cache(REGION, REGION + 0x1000)  # stale blocks keep an old stop address
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





class RecordingMemory(FlatMemory):
    """FlatMemory that logs every access and can fault on chosen pages.

    ``log`` holds ``(op, addr, size)`` for op in read/write/cmpxchg/fetch;
    ``no_write`` / ``no_read`` are sets of 4 KiB page numbers that raise #PF.
    """

    __slots__ = ("log", "no_read", "no_write")

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, int, int]] = []
        self.no_write: set[int] = set()
        self.no_read: set[int] = set()

    def _check(self, addr: int, size: int, pages: set[int], code: int) -> None:
        for page in {addr >> 12, ((addr + size - 1) & M64) >> 12}:
            if page in pages:
                raise GuestFault(14, code, max(addr, page << 12))

    def read(self, addr: int, size: int) -> int:
        self._check(addr, size, self.no_read, 0)
        self.log.append(("read", addr, size))
        return super().read(addr, size)

    def write(self, addr: int, size: int, value: int) -> None:
        self._check(addr, size, self.no_write, 2)
        self.log.append(("write", addr, size))
        super().write(addr, size, value)

    def cmpxchg(self, addr: int, size: int, expected: int, new: int) -> tuple[bool, int]:
        self._check(addr, size, self.no_write, 2)
        self.log.append(("cmpxchg", addr, size))
        old = FlatMemory.read(self, addr, size)
        if old != expected:
            return False, old
        FlatMemory.write(self, addr, size, new)
        return True, old

    def data_ops(self) -> list[tuple[str, int, int]]:
        """The log without instruction fetches."""
        return [e for e in self.log if e[0] != "fetch"]


class Machine:
    """A tiny test VM: code at ``base``, RSP at ``stack``, FlatMemory or a subclass."""

    def __init__(self, src: str | bytes, base: int = 0x100000, stack: int = 0x200000,
                 mem: FlatMemory | None = None) -> None:
        self.code = src if isinstance(src, bytes) else asm(src, base)
        self.mem = mem if mem is not None else FlatMemory()
        self.mem.load(base, self.code)
        self.cpu = CpuState(base)
        self.cpu.regs[4] = stack
        self.cache = InstructionCache()
        self.base = base

    def step(self) -> Exit | None:
        return step(self.cpu, self.mem, self.cache)

    def run(self, limit: int = 100_000) -> Exit | None:
        from pagetrack.emulator import run

        return run(self.cpu, self.mem, self.cache, limit)

    def reg(self, name: str) -> int:
        return self.cpu.reg_by_name(name)

    def set(self, **regs: int) -> Machine:
        for name, value in regs.items():
            self.cpu.set_reg_by_name(name, value)
        return self


__all__ = [
    "ARITH_MASK",
    "CODE",
    "DATA",
    "DATA_SIZE",
    "DF",
    "M64",
    "PTR_BASE",
    "STACK",
    "Machine",
    "Outcome",
    "RecordingMemory",
    "UnicornRunner",
    "asm",
    "flag_names",
    "run_interp",
]
