"""String instructions MOVS STOS LODS CMPS SCAS, with REP / REPE / REPNE and DF.

Addresses come from RSI/RDI and the count from RCX (ESI/EDI/ECX with an
address-size prefix).  A REP instruction commits RCX/RSI/RDI (and flags) after
every completed iteration, so a fault in iteration k leaves the state of k-1
iterations with RIP still at the instruction; a zero count touches no memory.

Under KVM's emulator (``mem.emulating``) a REP instruction stops after an
iteration that leaves RCX != 0 with ``RCX & 0x3ff == 0`` and keeps RIP at the
instruction: ``x86_emulate_insn``'s string restart re-enters the guest every
1024 iterations instead of returning ``EMULATION_RESTART``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import iced_x86

from .codegen import M64, Builder, NotHandled, mask
from .flags import K_SUB

__all__ = ["HANDLERS"]

_M = iced_x86.Mnemonic
_OK = iced_x86.OpKind
_R = iced_x86.Register

Handler = Callable[[Builder], None]

_RSI_KINDS = {_OK.MEMORY_SEG_RSI: M64, _OK.MEMORY_SEG_ESI: 0xFFFFFFFF}
_RDI_KINDS = {_OK.MEMORY_ESRDI: M64, _OK.MEMORY_ESEDI: 0xFFFFFFFF}


def _string(op: str) -> Handler:
    def handler(b: Builder) -> None:
        ins = b.instr
        am = None
        for i in range(ins.op_count):
            kind = ins.op_kind(i)
            am = _RSI_KINDS.get(kind, _RDI_KINDS.get(kind, am))
        if am is None:
            raise NotHandled("not a string instruction form")  # e.g. SSE MOVSD
        n = int(iced_x86.MemorySizeExt.size(ins.memory_size))
        uses_si = op in ("movs", "lods", "cmps")
        uses_di = op in ("movs", "stos", "cmps", "scas")
        seg = ins.memory_segment if uses_si else _R.NONE
        src = "si"
        if seg in (_R.FS, _R.GS):
            src = f"(cpu.{'fs' if seg == _R.FS else 'gs'}_base + si) & {hex(M64)}"
        rep = ins.has_rep_prefix or ins.has_repne_prefix
        amask = hex(am)
        if rep:
            b.emit(f"cnt = regs[{b.k(1)}] & {amask}")
            with b.block("if not cnt:"):
                b.next_rip()
                b.emit("return None")
            b.emit("emu = mem.emulating")
        b.emit(f"step = -{n} if cpu.df else {n}")
        if uses_si:
            b.emit(f"si = regs[{b.k(6)}] & {amask}")
        if uses_di:
            b.emit(f"di = regs[{b.k(7)}] & {amask}")
        if op in ("stos", "scas"):
            b.emit(f"x = regs[{b.k(0)}] & {mask(n)}")
        with b.block("while True:") if rep else nullcontext():
            _iteration(b, op, n, src, amask)
            if rep:
                b.emit("cnt -= 1", f"regs[{b.k(1)}] = cnt", "if not cnt: break")
                if op in ("cmps", "scas"):
                    b.emit("if r: break" if ins.has_repe_prefix else "if not r: break")
                b.emit("if emu and not cnt & 0x3ff: return None")
        b.next_rip()

    return handler


def _iteration(b: Builder, op: str, n: int, src: str, amask: str) -> None:
    """One iteration: memory accesses first, then commit RSI/RDI and the result."""
    m = mask(n)
    if op == "movs":
        b.emit(f"mem.write(di, {n}, mem.read({src}, {n}))")
    elif op == "stos":
        b.emit(f"mem.write(di, {n}, x)")
    elif op == "lods":
        b.emit(f"v = mem.read({src}, {n})")
    elif op == "cmps":
        b.emit(f"a = mem.read({src}, {n})", f"s = mem.read(di, {n})", f"r = (a - s) & {m}")
    else:  # scas
        b.emit(f"s = mem.read(di, {n})", f"r = (x - s) & {m}")
    if op in ("movs", "lods", "cmps"):
        b.emit(f"si = (si + step) & {amask}", f"regs[{b.k(6)}] = si")
    if op != "lods":
        b.emit(f"di = (di + step) & {amask}", f"regs[{b.k(7)}] = di")
    if op == "lods":
        b.write_reg(b.reg(0), "v")
    elif op == "cmps":
        b.lazy(K_SUB, n, "r", "a", "s")
    elif op == "scas":
        b.lazy(K_SUB, n, "r", "x", "s")


HANDLERS: dict[int, Handler] = {
    _M.MOVSB: _string("movs"), _M.MOVSW: _string("movs"), _M.MOVSD: _string("movs"),
    _M.MOVSQ: _string("movs"),
    _M.STOSB: _string("stos"), _M.STOSW: _string("stos"), _M.STOSD: _string("stos"),
    _M.STOSQ: _string("stos"),
    _M.LODSB: _string("lods"), _M.LODSW: _string("lods"), _M.LODSD: _string("lods"),
    _M.LODSQ: _string("lods"),
    _M.CMPSB: _string("cmps"), _M.CMPSW: _string("cmps"), _M.CMPSD: _string("cmps"),
    _M.CMPSQ: _string("cmps"),
    _M.SCASB: _string("scas"), _M.SCASW: _string("scas"), _M.SCASD: _string("scas"),
    _M.SCASQ: _string("scas"),
}
"""iced-x86 ``Mnemonic`` -> handler."""
