"""Control transfer: Jcc, JMP, CALL, RET, LOOP/LOOPE/LOOPNE, JRCXZ/JECXZ.

Near branches only (64-bit targets).  CALL writes the return address before it
changes RSP or RIP, so a faulting push leaves the state untouched.
"""

from __future__ import annotations

from collections.abc import Callable

import iced_x86

from .codegen import M64, Builder, NotHandled

__all__ = ["HANDLERS"]

_M = iced_x86.Mnemonic
_OK = iced_x86.OpKind
_C = iced_x86.Code

Handler = Callable[[Builder], None]

_ECX_FORMS = frozenset((_C.LOOP_REL8_64_ECX, _C.LOOPE_REL8_64_ECX, _C.LOOPNE_REL8_64_ECX))


def _target(b: Builder) -> str:
    if b.instr.op_kind(0) != _OK.NEAR_BRANCH64:
        raise NotHandled("branch is not a 64-bit near branch")
    return b.k(b.instr.near_branch_target)


def _jcc(b: Builder) -> None:
    target = _target(b)
    cond = b.cond(b.instr.condition_code)
    b.emit(f"cpu.rip = {target} if {cond} else {b.k(b.instr.next_ip)}")


def _jmp(b: Builder) -> None:
    if b.instr.op_kind(0) == _OK.NEAR_BRANCH64:
        b.emit(f"cpu.rip = {_target(b)}")
    elif b.is_reg(0) or b.is_mem(0):
        if b.size(0) != 8:
            raise NotHandled("far or 16/32-bit indirect jmp")
        b.emit(f"cpu.rip = {b.read(0)}")
    else:
        raise NotHandled("far jmp")


def _call(b: Builder) -> None:
    if b.instr.op_kind(0) == _OK.NEAR_BRANCH64:
        target = _target(b)
    elif (b.is_reg(0) or b.is_mem(0)) and b.size(0) == 8:
        target = b.let("t", b.read(0))
    else:
        raise NotHandled("far or 16/32-bit call")
    sp = b.k(4)
    b.emit(f"sp = (regs[{sp}] - 8) & {hex(M64)}",
           f"mem.write(sp, 8, {b.k(b.instr.next_ip)})",
           f"regs[{sp}] = sp",
           f"cpu.rip = {target}")


def _ret(b: Builder) -> None:
    if b.instr.code not in (_C.RETNQ, _C.RETNQ_IMM16):
        raise NotHandled("far or 16-bit ret")
    extra = 8 + (b.imm(0, 2) if b.instr.op_count else 0)
    sp = b.k(4)
    b.emit(f"sp = regs[{sp}]", "t = mem.read(sp, 8)",
           f"regs[{sp}] = (sp + {extra}) & {hex(M64)}", "cpu.rip = t")


def _loop(kind: str) -> Handler:
    """LOOP / LOOPE / LOOPNE: decrement RCX (ECX with an address-size prefix), branch."""

    def handler(b: Builder) -> None:
        target = _target(b)
        cmask = 0xFFFFFFFF if b.instr.code in _ECX_FORMS else M64
        rc = b.k(1)
        b.emit(f"c = (regs[{rc}] - 1) & {hex(cmask)}", f"regs[{rc}] = c")
        cond = "c"
        if kind != "loop":
            zf = b.cond(5 if kind == "loope" else 6)
            cond = f"c and {zf}"
        b.emit(f"cpu.rip = {target} if {cond} else {b.k(b.instr.next_ip)}")

    return handler


def _jrcxz(b: Builder) -> None:
    target = _target(b)
    reg = f"regs[{b.k(1)}]"
    if b.instr.code == _C.JECXZ_REL8_64:
        reg = f"({reg} & 0xffffffff)"
    elif b.instr.code != _C.JRCXZ_REL8_64:
        raise NotHandled("jcxz")
    b.emit(f"cpu.rip = {b.k(b.instr.next_ip)} if {reg} else {target}")


HANDLERS: dict[int, Handler] = {
    _M.JMP: _jmp,
    _M.CALL: _call,
    _M.RET: _ret,
    _M.LOOP: _loop("loop"),
    _M.LOOPE: _loop("loope"),
    _M.LOOPNE: _loop("loopne"),
    _M.JRCXZ: _jrcxz,
    _M.JECXZ: _jrcxz,
}
"""iced-x86 ``Mnemonic`` -> handler (Jcc added below)."""

for _cc in ("O", "NO", "B", "AE", "E", "NE", "BE", "A", "S", "NS", "P", "NP", "L", "GE", "LE", "G"):
    HANDLERS[getattr(_M, "J" + _cc)] = _jcc
