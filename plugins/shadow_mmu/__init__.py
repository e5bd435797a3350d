"""The MMU's own write tracker: ``kvm_mmu_track_write`` (arch/x86/kvm/mmu/mmu.c).

KVM calls it directly after every external tracker (6.6+); here it is a plugin
registered ``trylast``, so it too runs after every external tracker.  When the
guest writes a page that KVM shadows as a page table, the shadow entries that
mirrored the written guest entries are zapped, so that the next access refaults
and sees the new guest entry.
"""

from __future__ import annotations

from typing import Any

from pagetrack import hookimpl
from pagetrack.mmu import ShadowPage

__all__ = [
    "detect_write_flooding",
    "detect_write_misaligned",
    "get_written_sptes",
    "kvm_mmu_track_write",
    "track_write",
]

_PT32_ROOT_LEVEL = 2
_CR4_PAE = 1 << 5


def detect_write_misaligned(sp: ShadowPage, gpa: int, nbytes: int) -> bool:
    """``detect_write_misaligned``: the write does not update exactly one guest PTE.

    A one-byte write at a PTE boundary is not misaligned (guests clear status
    bits with byte-wide ``and``); otherwise a write spanning two PTE slots, or
    shorter than 4 bytes, is.
    """
    offset = gpa & 0xFFF
    pte_size = 4 if sp.role.has_4_byte_gpte else 8
    if not offset & (pte_size - 1) and nbytes == 1:
        return False
    spans = (offset ^ (offset + nbytes - 1)) & ~(pte_size - 1)
    return bool(spans) or nbytes < 4


def detect_write_flooding(sp: ShadowPage) -> bool:
    """``detect_write_flooding``: the third emulated write without a reset zaps an upper-level page.

    Last-level pages never flood: they can become unsync instead.
    """
    if sp.role.level == 1:
        return False
    sp.write_flooding_count += 1
    return sp.write_flooding_count >= 3


def get_written_sptes(sp: ShadowPage, gpa: int) -> tuple[int, int] | None:
    """``get_written_sptes``: ``(first index, count)`` of the SPTEs shadowing the write.

    For 4-byte guest PTEs the offset is scaled to 8-byte slots; a 32-bit page
    directory entry maps 4 MiB and is shadowed by two PAE PDEs.  ``None`` when
    the write falls in a quadrant this page does not shadow.
    """
    offset = gpa & 0xFFF
    nspte = 1
    if sp.role.has_4_byte_gpte:
        offset <<= 1
        if sp.role.level == _PT32_ROOT_LEVEL:
            offset &= ~7
            offset <<= 1
            nspte = 2
        quadrant = offset >> 12
        offset &= 0xFFF
        if quadrant != sp.role.quadrant:
            return None
    return offset >> 3, nspte


def _fetch_gpte(vm: Any, vcpu: Any, gpa: int, nbytes: int) -> tuple[int, int, int]:
    """``mmu_pte_write_fetch_gpte``: widen a 4-byte write under PAE and re-read the entry."""
    if vcpu is not None and vcpu.cpu.cr4 & _CR4_PAE and nbytes == 4:
        gpa &= ~7
        nbytes = 8
    gentry = 0
    if nbytes in (4, 8):
        try:
            gentry = vm.mmu.read_gpa(gpa, nbytes)
        except Exception:
            gentry = 0
    return gentry, gpa, nbytes


def kvm_mmu_track_write(vm: Any, vcpu: Any, gpa: int, nbytes: int) -> None:
    """``kvm_mmu_track_write``: zap what shadowed the written guest PTEs."""
    mmu = vm.mmu
    shadow = mmu.shadow
    gfn = gpa >> 12
    if shadow.indirect_shadow_pages == 0:
        return
    stats = mmu.stats
    with vm.mmu_lock:
        gentry, gpa, nbytes = _fetch_gpte(vm, vcpu, gpa, nbytes)
        stats.mmu_pte_write += 1
        invalid_list: list[ShadowPage] = []
        flush = False
        for sp in shadow.valid_sps_with_gptes(gfn):
            if detect_write_misaligned(sp, gpa, nbytes):
                shadow.prepare_zap(sp, invalid_list, "misaligned")
                stats.mmu_flooded += 1
                continue
            if detect_write_flooding(sp):
                shadow.prepare_zap(sp, invalid_list, "flooded")
                stats.mmu_flooded += 1
                continue
            written = get_written_sptes(sp, gpa)
            if written is None:
                continue
            first, count = written
            zapped = 0
            for idx in range(first, first + count):
                present = shadow.zap_pte(sp, idx)
                if gentry and sp.role.level != 1:
                    stats.mmu_pde_zapped += 1
                flush |= present
                zapped += present
            if vm.audit.debug:
                vm.audit.emit("zap", "debug", gfn=gfn, pg_level=sp.role.level, reason="pte", sptes=zapped)
        if invalid_list:
            shadow.commit_zap(invalid_list)
        elif flush:
            vm.flush_remote_tlbs("track_write")


@hookimpl(trylast=True)
def track_write(vm: Any, vcpu: Any, gpa: int, new: bytes) -> None:
    """Zap the shadow entries of a written guest page table (runs after external trackers)."""
    kvm_mmu_track_write(vm, vcpu, gpa, len(new))
