"""Shadow/TDP page-table entries (arch/x86/kvm/mmu/spte.h, spte.c).

An SPTE is a Python ``int`` with KVM's bit layout (non-EPT defaults):

* bit 0 present, bit 1 ``PT_WRITABLE_MASK`` (hardware W), bit 2 user, bit 5 A,
  bit 6 D, bit 7 PS (huge leaf);
* bit 9 ``shadow_host_writable_mask`` and bit 10 ``shadow_mmu_writable_mask``
  (software bits);
* bits 12..51 the target frame (here: the guest frame, as the simulation has no
  separate host frames).

The two kinds of write protection are kept distinct:
``wrprot_for_tracking`` clears W and MMU-writable (shadow-page protection: the
SPTE can only become writable again under ``mmu_lock`` after an unsync), while
``wrprot_for_logging`` clears only W (the fast page fault may restore it).
"""

from __future__ import annotations

__all__ = [
    "SPTE_A",
    "SPTE_D",
    "SPTE_HOST_WRITABLE",
    "SPTE_MMU_WRITABLE",
    "SPTE_P",
    "SPTE_PS",
    "SPTE_U",
    "SPTE_W",
    "check_writable_invariants",
    "is_mmu_writable",
    "is_shadow_present",
    "is_writable",
    "leaf_change_needs_tlb_flush",
    "spte_pfn",
    "wrprot_for_logging",
    "wrprot_for_tracking",
]

SPTE_P = 1 << 0
SPTE_W = 1 << 1
SPTE_U = 1 << 2
SPTE_A = 1 << 5
SPTE_D = 1 << 6
SPTE_PS = 1 << 7
SPTE_HOST_WRITABLE = 1 << 9
SPTE_MMU_WRITABLE = 1 << 10
_PFN_MASK = ((1 << 52) - 1) & ~0xFFF


def is_shadow_present(spte: int) -> bool:
    """``is_shadow_present_pte``."""
    return bool(spte & SPTE_P)


def is_writable(spte: int) -> bool:
    """``is_writable_pte``: the hardware W bit."""
    return bool(spte & SPTE_W)


def is_mmu_writable(spte: int) -> bool:
    """``is_mmu_writable_spte``: the shadow MMU allows making it writable."""
    return bool(spte & SPTE_MMU_WRITABLE)


def spte_pfn(spte: int) -> int:
    """``spte_to_pfn``."""
    return (spte & _PFN_MASK) >> 12


def leaf_change_needs_tlb_flush(old: int, new: int) -> bool:
    """``leaf_spte_change_needs_tlb_flush``: old MMU-writable and new not."""
    return bool(old & SPTE_MMU_WRITABLE) and not new & SPTE_MMU_WRITABLE


def wrprot_for_tracking(spte: int) -> int:
    """``spte_write_protect`` with ``pt_protect``: clear W and MMU-writable."""
    return spte & ~(SPTE_W | SPTE_MMU_WRITABLE)


def wrprot_for_logging(spte: int) -> int:
    """Dirty-logging protection: clear only W (``spte_wrprot_for_clear_dirty``)."""
    return spte & ~SPTE_W


def check_writable_invariants(spte: int) -> None:
    """``check_spte_writable_invariants``: W ⇒ MMU-writable ⇒ host-writable."""
    if spte & SPTE_W and not spte & SPTE_MMU_WRITABLE:
        raise AssertionError(f"SPTE {spte:#x}: writable but not MMU-writable")
    if spte & SPTE_MMU_WRITABLE and not spte & SPTE_HOST_WRITABLE:
        raise AssertionError(f"SPTE {spte:#x}: MMU-writable but not host-writable")
