"""Compile-time builder that turns one decoded instruction into a Python closure.

A handler (one per instruction family, in ``ops_*.py``) describes the
instruction as a few lines of Python source over ``cpu``, ``mem`` and
``regs = cpu.regs``; operand reads/writes, the effective address and every
constant (register numbers, immediates, displacement, next RIP, flag kind) are
spliced in at compile time, so the closure does no decoding and no operand-kind
branching at run time.

Source text with the constants replaced by parameters ``k0, k1 ...`` is compiled
once into a *factory* ``def _factory(k0, k1, ...): def _insn(cpu, mem): ...``
and cached by text, so ``add rax, rbx`` and ``add rcx, 5`` with the same shape
share one code object and compiling a new RIP is just a factory call.

Precise faults are a rule for handlers: emit every ``mem.read`` / ``mem.write``
before the first store to ``regs``, ``cpu.lf``, ``cpu.df`` or ``cpu.rip``.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NamedTuple

import iced_x86

from .flags import SIZE_INDEX, cond_fn

if TYPE_CHECKING:
    from .exits import Exit
    from .memory import Memory
    from .state import CpuState

__all__ = ["ENV", "M64", "Builder", "InsnFn", "NotHandled", "RegRef", "gpr", "mask"]

InsnFn = Callable[["CpuState", "Memory"], "Exit | None"]
"""A compiled instruction: returns ``None`` (continue) or an exit."""

M64 = 0xFFFFFFFFFFFFFFFF

ENV: dict[str, Any] = {"__builtins__": builtins}
"""Globals of the generated code; families register their helpers here."""

_FACTORIES: dict[str, Callable[..., InsnFn]] = {}

_R = iced_x86.Register
_OK = iced_x86.OpKind
_RAX = _R.RAX
_HIGH8 = frozenset((_R.AH, _R.CH, _R.DH, _R.BH))
_IMM_KINDS = frozenset((_OK.IMMEDIATE8, _OK.IMMEDIATE16, _OK.IMMEDIATE32, _OK.IMMEDIATE64,
                        _OK.IMMEDIATE8TO16, _OK.IMMEDIATE8TO32, _OK.IMMEDIATE8TO64,
                        _OK.IMMEDIATE32TO64, _OK.IMMEDIATE8_2ND))


class NotHandled(Exception):
    """Raised by a handler for a form it does not implement."""


class RegRef(NamedTuple):
    """A general-purpose register operand: ``regs[num]``, ``size`` bytes, AH-style ``high``."""

    num: int
    size: int
    high: bool


def gpr(reg: iced_x86.Register_) -> RegRef:
    """Map an iced-x86 GPR (AL..R15, AH/CH/DH/BH included) to a :class:`RegRef`."""
    if not iced_x86.RegisterExt.is_gpr(reg):
        raise NotHandled(f"register {reg} is not a GPR")
    return RegRef(iced_x86.RegisterExt.full_register(reg) - _RAX,
                  iced_x86.RegisterExt.size(reg), reg in _HIGH8)


def mask(size: int) -> str:
    """Literal mask of an operand of ``size`` bytes."""
    return hex((1 << (8 * size)) - 1)


class Builder:
    """Accumulates the source of one instruction closure."""

    def __init__(self, instr: iced_x86.Instruction) -> None:
        self.instr = instr
        self.params: list[Any] = []
        self.lines: list[str] = []
        self._depth = 2
        self._ea: str | None = None
        self._tmp = 0

    # --- source assembly ----------------------------------------------------------
    def k(self, value: Any) -> str:
        """A closure constant; returns its parameter name."""
        self.params.append(value)
        return f"k{len(self.params) - 1}"

    def emit(self, *lines: str) -> None:
        """Append statements at the current indentation."""
        pad = "    " * self._depth
        self.lines.extend(pad + line for line in lines)

    @contextmanager
    def block(self, header: str) -> Iterator[None]:
        """``with b.block("if x:"):`` emits an indented suite."""
        self.emit(header)
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1

    def tmp(self, prefix: str = "t") -> str:
        """A fresh local variable name."""
        self._tmp += 1
        return f"{prefix}{self._tmp}"

    def let(self, name: str, expr: str) -> str:
        """Bind ``expr`` to local ``name`` unless it already is a plain name; return the name."""
        if expr.isidentifier():
            return expr
        self.emit(f"{name} = {expr}")
        return name

    def next_rip(self) -> None:
        """``cpu.rip = <address of the next instruction>``."""
        self.emit(f"cpu.rip = {self.k(self.instr.next_ip)}")

    def source(self) -> str:
        """The factory source: ``def _factory(k0, ...): def _insn(cpu, mem): ...``."""
        body = self.lines
        if any("regs" in line for line in body):
            body = ["        regs = cpu.regs", *body]
        params = ", ".join(f"k{i}" for i in range(len(self.params)))
        return (f"def _factory({params}):\n    def _insn(cpu, mem):\n"
                + "\n".join(body) + "\n    return _insn\n")

    def build(self) -> InsnFn:
        """Compile (or reuse) the factory for this source and bind the constants."""
        src = self.source()
        factory = _FACTORIES.get(src)
        if factory is None:
            scope: dict[str, Any] = {}
            exec(compile(src, "<pagetrack.emulator>", "exec"), ENV, scope)
            factory = _FACTORIES[src] = scope["_factory"]
        return factory(*self.params)

    # --- operands -------------------------------------------------------------------
    def kind(self, i: int) -> int:
        """iced-x86 ``OpKind`` of operand ``i``."""
        return int(self.instr.op_kind(i))

    def is_mem(self, i: int) -> bool:
        """Operand ``i`` is an explicit memory operand."""
        return self.instr.op_kind(i) == _OK.MEMORY

    def is_reg(self, i: int) -> bool:
        """Operand ``i`` is a register."""
        return self.instr.op_kind(i) == _OK.REGISTER

    def is_imm(self, i: int) -> bool:
        """Operand ``i`` is an immediate."""
        return self.instr.op_kind(i) in _IMM_KINDS

    def reg(self, i: int) -> RegRef:
        """Operand ``i`` as a GPR."""
        if not self.is_reg(i):
            raise NotHandled("operand is not a register")
        return gpr(self.instr.op_register(i))

    def mem_size(self) -> int:
        """Size in bytes of the memory operand."""
        return int(iced_x86.MemorySizeExt.size(self.instr.memory_size))

    def size(self, i: int) -> int:
        """Size in bytes of register or memory operand ``i``."""
        if self.is_reg(i):
            return self.reg(i).size
        if self.is_mem(i):
            return self.mem_size()
        raise NotHandled("operand has no intrinsic size")

    def imm(self, i: int, size: int) -> int:
        """Immediate operand ``i`` truncated to ``size`` bytes."""
        return int(self.instr.immediate(i)) & ((1 << (8 * size)) - 1)

    def read_reg(self, r: RegRef) -> str:
        """Expression for the current value of register ``r``."""
        src = f"regs[{self.k(r.num)}]"
        if r.high:
            return f"(({src} >> 8) & 0xff)"
        if r.size == 8:
            return src
        return f"({src} & {mask(r.size)})"

    def write_reg(self, r: RegRef, value: str) -> None:
        """Store ``value`` (already masked to the size) into ``r`` with x86 merge rules."""
        idx = self.k(r.num)
        if r.size >= 4:  # 32-bit writes zero-extend to 64
            self.emit(f"regs[{idx}] = {value}")
        elif r.high:
            self.emit(f"regs[{idx}] = (regs[{idx}] & 0xffffffffffff00ff) | ({value} << 8)")
        else:
            keep = hex(M64 ^ ((1 << (8 * r.size)) - 1))
            self.emit(f"regs[{idx}] = (regs[{idx}] & {keep}) | {value}")

    def read(self, i: int, size: int | None = None) -> str:
        """Expression for operand ``i``; a memory operand is read into a local first."""
        kind = self.instr.op_kind(i)
        if kind == _OK.REGISTER:
            return self.read_reg(self.reg(i))
        if kind == _OK.MEMORY:
            var = self.tmp("m")
            self.emit(f"{var} = mem.read({self.ea()}, {size or self.mem_size()})")
            return var
        if kind in _IMM_KINDS:
            if size is None:
                raise NotHandled("immediate without a size")
            return self.k(self.imm(i, size))
        raise NotHandled(f"operand kind {kind}")

    def write(self, i: int, value: str, size: int | None = None) -> None:
        """Store ``value`` into operand ``i`` (register or memory)."""
        if self.is_reg(i):
            self.write_reg(self.reg(i), value)
        elif self.is_mem(i):
            self.emit(f"mem.write({self.ea()}, {size or self.mem_size()}, {value})")
        else:
            raise NotHandled("operand is not writable")

    def ea(self, sp: str | None = None, segment: bool = True) -> str:
        """Name of (or expression for) the memory operand's effective address.

        The address is computed once per closure from base + index*scale + disp
        (iced-x86 gives RIP-relative operands as an absolute ``memory_displacement``);
        FS/GS overrides add ``cpu.fs_base`` / ``cpu.gs_base``.  ``sp`` replaces RSP
        as a base/index (POP m computes its address after incrementing RSP).
        """
        if self._ea is not None and sp is None and segment:
            return self._ea
        ins = self.instr
        base, index = ins.memory_base, ins.memory_index
        disp = int(ins.memory_displacement)
        terms: list[str] = []
        addr_mask = M64
        if base in (_R.RIP, _R.EIP):
            if base == _R.EIP:
                disp &= 0xFFFFFFFF
        elif base != _R.NONE:
            r = gpr(base)
            addr_mask = M64 if r.size == 8 else 0xFFFFFFFF
            terms.append(sp if sp is not None and r.num == 4 else f"regs[{self.k(r.num)}]")
        if index != _R.NONE:
            r = gpr(index)
            addr_mask = M64 if r.size == 8 else 0xFFFFFFFF
            term = sp if sp is not None and r.num == 4 else f"regs[{self.k(r.num)}]"
            scale = ins.memory_index_scale
            terms.append(term if scale == 1 else f"{term} * {scale}")
        disp &= addr_mask
        if not terms:
            expr = self.k(disp)
        else:
            if disp:
                terms.append(self.k(disp))
            expr = " + ".join(terms)
            if len(terms) > 1 or addr_mask != M64:
                expr = f"({expr}) & {hex(addr_mask)}"
        seg = ins.memory_segment
        if segment and seg in (_R.FS, _R.GS):
            expr = f"(cpu.{'fs' if seg == _R.FS else 'gs'}_base + {expr}) & {hex(M64)}"
        if sp is not None or not segment:
            var = self.tmp("a")
            self.emit(f"{var} = {expr}")
            return var
        self.emit(f"ea = {expr}")
        self._ea = "ea"
        return "ea"

    def cond(self, cc: int) -> str:
        """Expression true when iced-x86 condition code ``cc`` holds (ZF tests inline)."""
        self.emit("lf = cpu.lf")
        if cc == 5:  # E/Z
            return "(not lf[1] if lf[0] else lf[1] & 0x40)"
        if cc == 6:  # NE/NZ
            return "(lf[1] if lf[0] else not lf[1] & 0x40)"
        return f"{self.k(cond_fn(cc))}(lf)"

    def lazy(self, base: int, size: int, res: str, a: str, b: str) -> None:
        """``cpu.lf = (kind, res, a, b)`` for flag kind ``base`` at ``size`` bytes."""
        self.emit(f"cpu.lf = ({self.k(base + SIZE_INDEX[size])}, {res}, {a}, {b})")
