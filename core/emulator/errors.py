"""Exceptions raised while executing guest instructions.

:class:`GuestFault` is an x86 exception delivered to the guest (the vCPU injects
it, as KVM does with ``kvm_queue_exception``); :class:`UnsupportedInstruction` is
a limitation of this interpreter, never something the guest could see on
hardware (KVM's emulator answers ``EMULATION_FAILED`` in the same situation).
"""

from __future__ import annotations

__all__ = ["DE", "GP", "PF", "UD", "GuestFault", "UnsupportedInstruction"]

DE = 0
"""Divide error vector (#DE)."""
UD = 6
"""Invalid opcode vector (#UD)."""
GP = 13
"""General protection vector (#GP)."""
PF = 14
"""Page fault vector (#PF)."""

_NAMES = {DE: "#DE", UD: "#UD", GP: "#GP", PF: "#PF"}


class GuestFault(Exception):
    """An x86 exception raised by an instruction or by a memory access.

    ``vector`` is the exception number (14 #PF, 13 #GP, 0 #DE, 6 #UD),
    ``error_code`` the pushed error code (0 when the vector has none) and
    ``address`` the faulting linear address (CR2 for #PF) or ``None``.
    Faults are precise: the instruction that raised it has changed no register,
    flag or RIP (REP string instructions keep the iterations already completed).
    """

    def __init__(self, vector: int, error_code: int = 0, address: int | None = None) -> None:
        self.vector = vector
        self.error_code = error_code
        self.address = address
        name = _NAMES.get(vector, f"vector {vector}")
        where = "" if address is None else f" at {address:#x}"
        super().__init__(f"{name}{where} (error code {error_code:#x})")


class UnsupportedInstruction(Exception):
    """The interpreter does not implement an instruction.

    The message names the instruction (iced-x86 Intel syntax) and its RIP, e.g.
    ``unsupported instruction 'rdrand rax' at rip 0x100012``.
    """

    def __init__(self, text: str, rip: int) -> None:
        self.text = text
        self.rip = rip
        super().__init__(f"unsupported instruction {text!r} at rip {rip:#x}")
