"""System and miscellaneous instructions: NOP forms, PAUSE, fences, flag bits
(CLC STC CMC CLD STD), HLT, IN/OUT, CPUID, INVLPG, UD0/UD1/UD2.

HLT, IN, OUT and INVLPG advance RIP and return an exit for the vCPU
(:mod:`pagetrack.emulator.exits`); CPUID is answered here with fixed leaves
(KVM: ``kvm_emulate_cpuid`` over the table userspace set).
"""

from __future__ import annotations

from collections.abc import Callable

import iced_x86

from .codegen import ENV, Builder, NotHandled
from .errors import UD, GuestFault
from .exits import HLT, Invlpg, PortIn, PortOut
from .flags import CF, K_FLAGS, flags_of
from .state import CpuState

__all__ = ["CPUID_LEAVES", "HANDLERS", "cpuid"]

_M = iced_x86.Mnemonic
_OK = iced_x86.OpKind

Handler = Callable[[Builder], None]


def _ascii(text: str) -> int:
    return int.from_bytes(text.encode("ascii"), "little")


CPUID_LEAVES: dict[int, tuple[int, int, int, int]] = {
    # max leaf 1, "GenuineIntel" in EBX, EDX, ECX
    0: (1, _ascii("Genu"), _ascii("ntel"), _ascii("ineI")),
    # family 6 model 0x3a stepping 9; ECX: CX16 POPCNT; EDX: FPU TSC CX8 CMOV
    1: (0x000306A9, 0, (1 << 13) | (1 << 23), 1 | (1 << 4) | (1 << 8) | (1 << 15)),
}
"""leaf -> (EAX, EBX, ECX, EDX); every other leaf reads as zeros."""


def cpuid(cpu: CpuState) -> None:
    """Execute CPUID for leaf EAX (32-bit results zero-extend into RAX..RDX)."""
    regs = cpu.regs
    eax, ebx, ecx, edx = CPUID_LEAVES.get(regs[0] & 0xFFFFFFFF, (0, 0, 0, 0))
    regs[0], regs[3], regs[1], regs[2] = eax, ebx, ecx, edx


ENV.update(GuestFault=GuestFault, HLT=HLT, Invlpg=Invlpg, PortIn=PortIn, PortOut=PortOut,
           cpuid=cpuid, flags_of=flags_of)


def _nop(b: Builder) -> None:
    """NOP / NOP r/m (no memory access) / PAUSE / fences / prefetches / ENDBR64."""
    b.next_rip()


def _flag_bit(op: str) -> Handler:
    def handler(b: Builder) -> None:
        if op == "cld":
            b.emit("cpu.df = 0")
        elif op == "std":
            b.emit("cpu.df = 1")
        else:
            expr = {"clc": f"flags_of(cpu.lf) & ~{CF}", "stc": f"flags_of(cpu.lf) | {CF}",
                    "cmc": f"flags_of(cpu.lf) ^ {CF}"}[op]
            b.emit(f"cpu.lf = ({b.k(K_FLAGS)}, {expr}, 0, 0)")
        b.next_rip()

    return handler


def _hlt(b: Builder) -> None:
    b.next_rip()
    b.emit("return HLT")


def _port(b: Builder, i: int) -> str:
    if b.is_imm(i):
        return b.k(b.imm(i, 1))
    r = b.reg(i)
    if r.num != 2 or r.size != 2:
        raise NotHandled("port must be DX or imm8")
    return f"(regs[{b.k(2)}] & 0xffff)"


def _out(b: Builder) -> None:
    """OUT imm8/DX, AL/AX/EAX -> :class:`PortOut`."""
    data = b.reg(1)
    port = _port(b, 0)
    b.emit(f"v = {b.read_reg(data)}")
    b.next_rip()
    b.emit(f"return PortOut({port}, {data.size}, v)")


def _in(b: Builder) -> None:
    """IN AL/AX/EAX, imm8/DX -> :class:`PortIn` (the vCPU completes the register)."""
    data = b.reg(0)
    b.emit(f"port = {_port(b, 1)}")
    b.next_rip()
    b.emit(f"return PortIn(port, {data.size}, {b.k(data.num)})")


def _cpuid(b: Builder) -> None:
    b.emit("cpuid(cpu)")
    b.next_rip()


def _invlpg(b: Builder) -> None:
    """INVLPG m: no memory access; the vCPU drops the translation."""
    if not b.is_mem(0):
        raise NotHandled("invlpg operand")
    addr = b.ea()
    b.next_rip()
    b.emit(f"return Invlpg({addr})")


def _ud(b: Builder) -> None:
    b.emit(f"raise GuestFault({UD})")


HANDLERS: dict[int, Handler] = {
    _M.NOP: _nop,
    _M.RESERVEDNOP: _nop,  # 0F 19..0F 1F hint space with a non-zero reg field
    _M.PAUSE: _nop,
    _M.LFENCE: _nop,
    _M.SFENCE: _nop,
    _M.MFENCE: _nop,
    _M.PREFETCHT0: _nop,
    _M.PREFETCHT1: _nop,
    _M.PREFETCHT2: _nop,
    _M.PREFETCHNTA: _nop,
    _M.PREFETCHW: _nop,
    _M.ENDBR64: _nop,
    _M.CLC: _flag_bit("clc"),
    _M.STC: _flag_bit("stc"),
    _M.CMC: _flag_bit("cmc"),
    _M.CLD: _flag_bit("cld"),
    _M.STD: _flag_bit("std"),
    _M.HLT: _hlt,
    _M.OUT: _out,
    _M.IN: _in,
    _M.CPUID: _cpuid,
    _M.INVLPG: _invlpg,
    _M.UD0: _ud,
    _M.UD1: _ud,
    _M.UD2: _ud,
}
"""iced-x86 ``Mnemonic`` -> handler."""
