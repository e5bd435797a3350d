"""``compile_instruction``: one decoded iced-x86 instruction -> one Python closure.

The closure has the signature ``fn(cpu, mem) -> Exit | None`` and serves both
native execution and KVM's emulator (``x86_emulate_insn``): it touches memory
only through the :class:`~pagetrack.emulator.memory.Memory` it is given, and it
performs every memory access before committing any register, flag or RIP change.
"""

from __future__ import annotations

import iced_x86

from . import ops_alu, ops_control, ops_data, ops_string, ops_system
from .codegen import Builder, InsnFn, NotHandled
from .errors import UD, UnsupportedInstruction

__all__ = ["compile_instruction", "format_instruction", "instruction_source"]

_M = iced_x86.Mnemonic
_HANDLERS = {**ops_alu.HANDLERS, **ops_data.HANDLERS, **ops_control.HANDLERS,
             **ops_string.HANDLERS, **ops_system.HANDLERS}
_LOCKABLE = frozenset((_M.ADD, _M.ADC, _M.AND, _M.BTC, _M.BTR, _M.BTS, _M.CMPXCHG,
                       _M.CMPXCHG8B, _M.CMPXCHG16B, _M.DEC, _M.INC, _M.NEG, _M.NOT, _M.OR,
                       _M.SBB, _M.SUB, _M.XOR, _M.XADD, _M.XCHG))
_FORMATTER = iced_x86.Formatter(iced_x86.FormatterSyntax.INTEL)


def format_instruction(instr: iced_x86.Instruction) -> str:
    """Intel-syntax text of ``instr`` (as in error messages)."""
    return str(_FORMATTER.format(instr))


def _builder(instr: iced_x86.Instruction) -> Builder:
    b = Builder(instr)
    mnemonic = instr.mnemonic
    if instr.has_lock_prefix and (mnemonic not in _LOCKABLE
                                  or instr.op0_kind != iced_x86.OpKind.MEMORY):
        b.emit(f"raise GuestFault({UD})")
        return b
    handler = _HANDLERS.get(mnemonic)
    try:
        if handler is None:
            raise NotHandled("no handler")
        handler(b)
    except NotHandled:
        raise UnsupportedInstruction(format_instruction(instr), instr.ip) from None
    return b


def instruction_source(instr: iced_x86.Instruction) -> str:
    """The Python source the closure of ``instr`` is built from, with its constants.

    For debugging and teaching: shows exactly what runs for one instruction.
    """
    b = _builder(instr)
    consts = "\n".join(f"# k{i} = {v!r}" for i, v in enumerate(b.params))
    return f"# {format_instruction(instr)} @ {instr.ip:#x}\n{consts}\n{b.source()}"


def compile_instruction(instr: iced_x86.Instruction) -> InsnFn:
    """Compile ``instr`` (decoded in 64-bit mode) into a closure ``fn(cpu, mem)``.

    Raises :class:`UnsupportedInstruction` (naming the instruction and its RIP)
    for anything the interpreter does not implement.  A LOCK prefix on a
    non-lockable instruction or a register destination compiles to #UD.
    """
    return _builder(instr).build()
