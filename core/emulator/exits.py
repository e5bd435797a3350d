"""What an instruction closure returns when the vCPU must act.

``None`` means "continue"; the closure has already advanced RIP.  Any other
value is one of the frozen exits below, returned *after* RIP has been moved
past the instruction, like a VM exit whose instruction has completed (KVM's
``complete_emulated_pio`` / ``kvm_emulate_cpuid`` style): the vCPU handles it
and resumes at ``cpu.rip``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from .state import CpuState

__all__ = ["HLT", "Exit", "Hlt", "Invlpg", "MovToCr", "PortIn", "PortOut"]


class Exit:
    """Base class of every exit value."""

    __slots__ = ()


@attrs.frozen
class Hlt(Exit):
    """``HLT`` executed (KVM: ``kvm_emulate_halt``); the program is done."""


HLT = Hlt()
"""The shared :class:`Hlt` instance closures return."""


@attrs.frozen
class PortOut(Exit):
    """``OUT``: ``size`` bytes of ``value`` written to I/O ``port`` (``KVM_EXIT_IO`` out)."""

    port: int
    size: int
    value: int


@attrs.frozen
class PortIn(Exit):
    """``IN``: ``size`` bytes read from I/O ``port`` into register ``dest_reg_index`` (RAX=0).

    The vCPU obtains the value and calls :meth:`complete` (KVM:
    ``complete_emulated_pio`` writing the accumulator).
    """

    port: int
    size: int
    dest_reg_index: int

    def complete(self, cpu: CpuState, value: int) -> None:
        """Store ``value`` into AL/AX/EAX: AL and AX keep the upper bits, EAX zero-extends."""
        regs = cpu.regs
        i = self.dest_reg_index
        if self.size == 1:
            regs[i] = (regs[i] & ~0xFF & 0xFFFFFFFFFFFFFFFF) | (value & 0xFF)
        elif self.size == 2:
            regs[i] = (regs[i] & ~0xFFFF & 0xFFFFFFFFFFFFFFFF) | (value & 0xFFFF)
        else:
            regs[i] = value & 0xFFFFFFFF


@attrs.frozen
class MovToCr(Exit):
    """``MOV CRn, reg`` completed: ``cpu.cr<cr>`` already holds ``value``.

    The vCPU reacts as ``kvm_set_cr0`` / ``kvm_set_cr3`` / ``kvm_set_cr4`` do
    (flush the TLB, reload the MMU context).
    """

    cr: int
    value: int


@attrs.frozen
class Invlpg(Exit):
    """``INVLPG m`` at linear address ``addr`` (KVM: ``kvm_mmu_invlpg``)."""

    addr: int
