"""pagetrack's x86-64 instruction interpreter (long mode, 64-bit code).

Real machine code is decoded once per RIP with iced-x86 and compiled into a
closure ``fn(cpu, mem) -> Exit | None`` (:class:`InstructionCache`).  The same
closures serve the vCPU's native execution and KVM's instruction emulator
(``x86_emulate_insn``): they see memory only through :class:`Memory`, and faults
are precise (every memory access happens before any register, flag or RIP
change).
"""

from .cache import InstructionCache
from .codegen import InsnFn
from .compile import compile_instruction, format_instruction, instruction_source
from .errors import DE, GP, PF, UD, GuestFault, UnsupportedInstruction
from .exits import HLT, Exit, Hlt, Invlpg, MovToCr, PortIn, PortOut
from .memory import FlatMemory, Memory
from .ops_system import CPUID_LEAVES
from .run import run, step
from .state import REG_NAMES, CpuState

__all__ = [
    "CPUID_LEAVES",
    "DE",
    "GP",
    "HLT",
    "PF",
    "REG_NAMES",
    "UD",
    "CpuState",
    "Exit",
    "FlatMemory",
    "GuestFault",
    "Hlt",
    "InsnFn",
    "InstructionCache",
    "Invlpg",
    "Memory",
    "MovToCr",
    "PortIn",
    "PortOut",
    "UnsupportedInstruction",
    "compile_instruction",
    "format_instruction",
    "instruction_source",
    "run",
    "step",
]
