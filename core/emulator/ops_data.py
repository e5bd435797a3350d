"""Data movement: MOV (incl. moffs, imm64, control registers), MOVZX/MOVSX/MOVSXD,
LEA, XCHG, XADD, CMPXCHG/CMPXCHG8B/CMPXCHG16B, BSWAP, CBW..CQO, PUSH/POP/LEAVE,
PUSHF/POPF, LAHF/SAHF, CMOVcc, SETcc.

CMPXCHG performs the locked write-back cycle of a failed compare in both of
its callers: native execution (so a write-protected page faults as on
hardware) and KVM's emulator, whose ``em_cmpxchg`` writes the value it read
back through ``emulator_cmpxchg_emulated`` (so the page is dirtied and trackers
are notified; see ``_EmulatorMemory.cmpxchg`` in :mod:`pagetrack.vcpu`).
"""

from __future__ import annotations

from collections.abc import Callable

import iced_x86

from .codegen import ENV, M64, Builder, NotHandled, RegRef, mask
from .errors import GP, GuestFault
from .exits import MovToCr
from .flags import ARITH_MASK, K_ADD, K_FLAGS, K_SUB, OF, ZF, flags_of
from .state import CpuState

__all__ = ["HANDLERS"]

_M = iced_x86.Mnemonic
_R = iced_x86.Register

Handler = Callable[[Builder], None]

_RSP = RegRef(4, 8, False)
_RBP = RegRef(5, 8, False)
_ACC = {n: RegRef(0, n, False) for n in (1, 2, 4, 8)}
_RF_VM_VIF_VIP = 0x1B0000


def _load_popped_flags(cpu: CpuState, value: int) -> None:
    """POPF at CPL 0: everything but RF, VM, VIF and VIP is loaded."""
    keep = cpu.rflags_rest & _RF_VM_VIF_VIP
    cpu.set_rflags((value & ~_RF_VM_VIF_VIP) | keep)


def _rflags(cpu: CpuState) -> int:
    """RFLAGS image PUSHF stores (RF and VM read as 0)."""
    return cpu.get_rflags() & ~0x30000


ENV.update(GuestFault=GuestFault, MovToCr=MovToCr, flags_of=flags_of, popf=_load_popped_flags,
           rflags=_rflags)


def _cr_number(reg: int) -> int:
    n = int(reg) - int(_R.CR0)
    if n not in (0, 2, 3, 4):
        raise NotHandled(f"control register CR{n}")
    return n


def _mov(b: Builder) -> None:
    """MOV r/m, r | r, r/m | r/m, imm | r64, imm64 | moffs | CRn."""
    ins = b.instr
    if b.is_reg(0) and iced_x86.RegisterExt.is_cr(ins.op0_register):
        n = _cr_number(ins.op0_register)
        b.emit(f"v = {b.read_reg(b.reg(1))}", f"cpu.cr{n} = v")
        b.next_rip()
        if n != 2:
            b.emit(f"return MovToCr({n}, v)")
        return
    if b.is_reg(1) and iced_x86.RegisterExt.is_cr(ins.op1_register):
        n = _cr_number(ins.op1_register)
        b.write_reg(b.reg(0), f"cpu.cr{n}")
        b.next_rip()
        return
    b.write(0, b.read(1, b.size(0)))
    b.next_rip()


def _movx(signed: bool) -> Handler:
    """MOVZX / MOVSX / MOVSXD."""

    def handler(b: Builder) -> None:
        dst = b.reg(0)
        src_size = b.size(1)
        v = b.read(1)
        if signed and src_size < dst.size:
            sg = hex(1 << (8 * src_size - 1))
            v = f"(({v} ^ {sg}) - {sg}) & {mask(dst.size)}"
        elif src_size > dst.size:
            v = f"{v} & {mask(dst.size)}"
        b.write_reg(dst, v)
        b.next_rip()

    return handler


def _lea(b: Builder) -> None:
    """LEA: the address (no segment base, no memory access), truncated to the operand size."""
    dst = b.reg(0)
    addr = b.ea(segment=False)
    b.write_reg(dst, addr if dst.size == 8 else f"{addr} & {mask(dst.size)}")
    b.next_rip()


def _xchg(b: Builder) -> None:
    """XCHG (the memory form is implicitly locked; here just read then write)."""
    x = b.let("x", b.read(0))
    y = b.let("y", b.read(1))
    if b.is_mem(0):
        b.write(0, y)
        b.write(1, x)
    else:
        b.write(1, x)
        b.write(0, y)
    b.next_rip()


def _xadd(b: Builder) -> None:
    """XADD r/m, r: r/m = r/m + r, r = old r/m; flags of the addition."""
    size = b.size(0)
    a = b.let("a", b.read(0))
    s = b.let("s", b.read(1))
    b.emit(f"r = ({a} + {s}) & {mask(size)}")
    if b.is_mem(0):
        b.write(0, "r")
        b.write(1, a)
    else:
        b.write(1, a)
        b.write(0, "r")
    b.lazy(K_ADD, size, "r", a, s)
    b.next_rip()


def _cmpxchg(b: Builder) -> None:
    """CMPXCHG r/m, r (SDM: on failure accumulator = DEST and DEST = DEST)."""
    size = b.size(0)
    m = mask(size)
    acc = _ACC[size]
    if b.is_mem(0):
        ea = b.ea()
        x = b.let("x", b.read_reg(acc))
        s = b.let("s", b.read(1))
        b.emit(f"ok, old = mem.cmpxchg({ea}, {size}, {x}, {s})")
        with b.block("if not ok:"):
            with b.block("if not mem.emulating:"):
                b.emit(f"mem.write({ea}, {size}, old)")
            b.write_reg(acc, "old")
        b.lazy(K_SUB, size, f"({x} - old) & {m}", x, "old")
    else:
        x = b.let("x", b.read_reg(acc))
        d = b.let("d", b.read(0))
        s = b.let("s", b.read(1))
        with b.block(f"if {x} == {d}:"):
            b.write(0, s)
        with b.block("else:"):
            b.write_reg(acc, d)
            b.write(0, d)
        b.lazy(K_SUB, size, f"({x} - {d}) & {m}", x, d)
    b.next_rip()


def _cmpxchg_wide(size: int) -> Handler:
    """CMPXCHG8B / CMPXCHG16B m: EDX:EAX (RDX:RAX) vs memory; only ZF changes."""
    half = size // 2
    hm = mask(half)
    bits = 8 * half

    def handler(b: Builder) -> None:
        ea = b.ea()
        if size == 16:
            with b.block(f"if {ea} & 15:"):
                b.emit(f"raise GuestFault({GP})")
        ax, cx, dx, bx = (f"regs[{b.k(i)}]" for i in (0, 1, 2, 3))
        b.emit(f"exp = (({dx} & {hm}) << {bits}) | ({ax} & {hm})",
               f"new = (({cx} & {hm}) << {bits}) | ({bx} & {hm})",
               f"ok, old = mem.cmpxchg({ea}, {size}, exp, new)")
        with b.block("if ok:"):
            b.emit(f"cpu.lf = ({b.k(K_FLAGS)}, flags_of(cpu.lf) | {ZF}, 0, 0)")
        with b.block("else:"):
            with b.block("if not mem.emulating:"):
                b.emit(f"mem.write({ea}, {size}, old)")
            b.emit(f"{ax} = old & {hm}", f"{dx} = old >> {bits}",
                   f"cpu.lf = ({b.k(K_FLAGS)}, flags_of(cpu.lf) & {hex(~ZF & ARITH_MASK)}, 0, 0)")
        b.next_rip()

    return handler


def _bswap(b: Builder) -> None:
    """BSWAP r32/r64 (the 16-bit form is undefined and not supported)."""
    r = b.reg(0)
    if r.size < 4:
        raise NotHandled("bswap r16")
    b.write_reg(r, f"int.from_bytes({b.read_reg(r)}.to_bytes({r.size}, 'little'), 'big')")
    b.next_rip()


def _sext_acc(src: int, dst: int) -> Handler:
    """CBW / CWDE / CDQE: sign-extend the low half of the accumulator."""

    def handler(b: Builder) -> None:
        sg = hex(1 << (8 * src - 1))
        b.write_reg(_ACC[dst], f"(({b.read_reg(_ACC[src])} ^ {sg}) - {sg}) & {mask(dst)}")
        b.next_rip()

    return handler


def _sign_to_dx(size: int) -> Handler:
    """CWD / CDQ / CQO: DX/EDX/RDX = sign of AX/EAX/RAX."""

    def handler(b: Builder) -> None:
        sg = hex(1 << (8 * size - 1))
        b.write_reg(RegRef(2, size, False),
                    f"({mask(size)} if {b.read_reg(_ACC[size])} & {sg} else 0)")
        b.next_rip()

    return handler


def _push(b: Builder) -> None:
    """PUSH r/m/imm: write the stack first, then RSP (a faulting push changes nothing)."""
    n = -b.instr.stack_pointer_increment
    if n not in (2, 8):
        raise NotHandled("push size")
    v = b.let("v", b.read(0, n))
    b.emit(f"sp = (regs[{b.k(4)}] - {n}) & {hex(M64)}", f"mem.write(sp, {n}, {v})",
           f"regs[{b.k(4)}] = sp")
    b.next_rip()


def _pop(b: Builder) -> None:
    """POP r/m: a memory destination's address uses the incremented RSP (SDM)."""
    n = b.instr.stack_pointer_increment
    if n not in (2, 8):
        raise NotHandled("pop size")
    b.emit(f"sp = regs[{b.k(4)}]", f"v = mem.read(sp, {n})", f"nsp = (sp + {n}) & {hex(M64)}")
    if b.is_mem(0):
        addr = b.ea(sp="nsp")
        b.emit(f"mem.write({addr}, {n}, v)")
        b.write_reg(_RSP, "nsp")
    else:
        b.write_reg(_RSP, "nsp")
        b.write_reg(b.reg(0), "v")
    b.next_rip()


def _leave(b: Builder) -> None:
    """LEAVE: RSP = RBP, then POP RBP."""
    b.emit(f"sp = regs[{b.k(5)}]", "v = mem.read(sp, 8)")
    b.write_reg(_RSP, f"(sp + 8) & {hex(M64)}")
    b.write_reg(_RBP, "v")
    b.next_rip()


def _pushf_insn(b: Builder) -> None:
    n = -b.instr.stack_pointer_increment
    b.emit(f"sp = (regs[{b.k(4)}] - {n}) & {hex(M64)}",
           f"mem.write(sp, {n}, rflags(cpu) & {mask(n)})", f"regs[{b.k(4)}] = sp")
    b.next_rip()


def _popf_insn(b: Builder) -> None:
    n = b.instr.stack_pointer_increment
    b.emit(f"sp = regs[{b.k(4)}]", f"v = mem.read(sp, {n})")
    if n == 2:
        b.emit("v |= rflags(cpu) & 0xffff0000")
    b.write_reg(_RSP, f"(sp + {n}) & {hex(M64)}")
    b.emit("popf(cpu, v)")
    b.next_rip()


def _lahf(b: Builder) -> None:
    b.write_reg(RegRef(0, 1, True), "((flags_of(cpu.lf) & 0xd5) | 2)")
    b.next_rip()


def _sahf(b: Builder) -> None:
    b.emit(f"cpu.lf = ({b.k(K_FLAGS)}, (flags_of(cpu.lf) & {OF}) | ((regs[{b.k(0)}] >> 8) & 0xd5), 0, 0)")
    b.next_rip()


def _cmov(b: Builder) -> None:
    """CMOVcc: the source is always read; a 32-bit destination is zero-extended even
    when the condition is false."""
    dst = b.reg(0)
    v = b.let("v", b.read(1))
    cond = b.cond(b.instr.condition_code)
    with b.block(f"if {cond}:"):
        b.write_reg(dst, v)
    if dst.size == 4:
        with b.block("else:"):
            b.write_reg(dst, b.read_reg(dst))
    b.next_rip()


def _setcc(b: Builder) -> None:
    if b.is_mem(0):
        b.ea()
    cond = b.cond(b.instr.condition_code)
    b.write(0, f"(1 if {cond} else 0)")
    b.next_rip()


HANDLERS: dict[int, Handler] = {
    _M.MOV: _mov,
    _M.MOVZX: _movx(False),
    _M.MOVSX: _movx(True),
    _M.MOVSXD: _movx(True),
    _M.LEA: _lea,
    _M.XCHG: _xchg,
    _M.XADD: _xadd,
    _M.CMPXCHG: _cmpxchg,
    _M.CMPXCHG8B: _cmpxchg_wide(8),
    _M.CMPXCHG16B: _cmpxchg_wide(16),
    _M.BSWAP: _bswap,
    _M.CBW: _sext_acc(1, 2),
    _M.CWDE: _sext_acc(2, 4),
    _M.CDQE: _sext_acc(4, 8),
    _M.CWD: _sign_to_dx(2),
    _M.CDQ: _sign_to_dx(4),
    _M.CQO: _sign_to_dx(8),
    _M.PUSH: _push,
    _M.POP: _pop,
    _M.LEAVE: _leave,
    _M.PUSHF: _pushf_insn,
    _M.PUSHFQ: _pushf_insn,
    _M.POPF: _popf_insn,
    _M.POPFQ: _popf_insn,
    _M.LAHF: _lahf,
    _M.SAHF: _sahf,
}
"""iced-x86 ``Mnemonic`` -> handler (CMOVcc / SETcc added below)."""

for _cc in ("O", "NO", "B", "AE", "E", "NE", "BE", "A", "S", "NS", "P", "NP", "L", "GE", "LE", "G"):
    HANDLERS[getattr(_M, "CMOV" + _cc)] = _cmov
    HANDLERS[getattr(_M, "SET" + _cc)] = _setcc
