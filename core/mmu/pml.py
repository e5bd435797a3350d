"""Intel Page Modification Logging: the per-vCPU hardware log (arch/x86/kvm/vmx/vmx.c).

With EPT A/D bits and the PML execution control on, the CPU logs the guest-physical
address of every write that sets the D bit of an EPT leaf: it stores the gpa (bits
11:0 cleared) at ``GUEST_PML_INDEX`` of a 4 KiB page of 512 u64 entries and
decrements the index, from 511 (``PML_HEAD_INDEX``) down to 0.  When the index has
underflowed the next logging attempt is a "PML full" VM-exit (exit reason 62)
instead.  KVM drains the buffer at the start of every VM-exit
(``vmx_flush_pml_buffer``): entries 511 down to index + 1, in that order, each
marked dirty with ``kvm_vcpu_mark_page_dirty``, then the index goes back to 511.

Only the hardware half lives here; :meth:`pagetrack.Vcpu.flush_pml_buffer` is the
KVM half, and :meth:`pagetrack.mmu.Mmu.hw_translate` is where the CPU logs.
"""

from __future__ import annotations

import attrs
import numpy as np

__all__ = ["PML_ENTITY_NUM", "PML_FULL", "PML_HEAD_INDEX", "PmlBuffer", "PmlFull"]

PML_ENTITY_NUM = 512  #: ``PML_LOG_NR_ENTRIES``: one 4 KiB page of u64 gpas
PML_HEAD_INDEX = PML_ENTITY_NUM - 1  #: first index the CPU writes


@attrs.frozen
class PmlFull:
    """What :meth:`~pagetrack.mmu.Mmu.hw_translate` returns instead of logging: a PML-full exit."""


#: The single :class:`PmlFull` value (``EXIT_REASON_PML_FULL``).
PML_FULL = PmlFull()


class PmlBuffer:
    """One vCPU's PML page and its ``GUEST_PML_INDEX`` (kept in ``[-1, 511]``; -1 = full)."""

    __slots__ = ("entries", "index")

    def __init__(self) -> None:
        self.entries = np.zeros(PML_ENTITY_NUM, dtype=np.uint64)
        self.index = PML_HEAD_INDEX

    @property
    def full(self) -> bool:
        """The index underflowed: the next log attempt exits instead."""
        return self.index < 0

    @property
    def empty(self) -> bool:
        return self.index == PML_HEAD_INDEX

    def __len__(self) -> int:
        return PML_HEAD_INDEX - self.index

    def log(self, gpa: int) -> bool:
        """The CPU logs ``gpa`` (page aligned); false when the buffer is full (PML-full exit)."""
        if self.index < 0:
            return False
        self.entries[self.index] = gpa & ~0xFFF
        self.index -= 1
        return True

    def drain(self) -> list[int]:
        """Entries 511 down to index + 1, in the order the CPU wrote them; resets the index."""
        if self.index == PML_HEAD_INDEX:
            return []
        out = self.entries[self.index + 1 :][::-1].tolist()
        self.index = PML_HEAD_INDEX
        return out
