"""The interpreter loop: fetch the cached closure for RIP, call it, repeat.

Used by the vCPU for native execution (``run``) and by KVM's emulator for a
single instruction (``step``).
"""

from __future__ import annotations

from .cache import InstructionCache
from .exits import Exit
from .memory import Memory
from .state import CpuState

__all__ = ["run", "step"]


def step(cpu: CpuState, mem: Memory, cache: InstructionCache) -> Exit | None:
    """Execute one instruction; return its exit or ``None``."""
    fn = cache.table.get(cpu.rip) or cache.get(cpu.rip, mem)
    result = fn(cpu, mem)
    cpu.icount += 1
    return result


def run(cpu: CpuState, mem: Memory, cache: InstructionCache,
        max_instructions: int) -> Exit | None:
    """Run until an instruction returns an exit (returned, RIP already past it) or
    ``max_instructions`` have retired (returns ``None``).

    ``GuestFault`` / ``UnsupportedInstruction`` propagate with the faulting
    instruction not retired.  ``cpu.icount`` counts retired instructions.
    """
    get = cache.table.get
    miss = cache.get
    retired = 0
    try:
        for retired in range(max_instructions):
            fn = get(cpu.rip)
            if fn is None:
                fn = miss(cpu.rip, mem)
            result = fn(cpu, mem)
            if result is not None:
                retired += 1
                return result
        retired = max_instructions
        return None
    finally:
        cpu.icount += retired
