"""Shadow page tables: ``struct intel_vgpu_ppgtt_spt``, its entries, allocation, scratch tree.

An spt pairs a host page (``shadow``: 512 entries the GPU walks, at ``mfn``)
with the guest page it shadows (``guest_gfn``; 0 for the untracked sub-table of
a split 2 MiB entry).  ``spt_tree`` indexes spts by mfn, ``page_track_tree``
maps a guest gfn to the page-track record whose ``priv_data`` is the spt.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import attrs

from . import entry as E
from .device import OosPage
from .entry import GttEntry, GttType
from .errors import GvtError

if TYPE_CHECKING:
    from .vgpu import Vgpu

__all__ = [
    "Spt",
    "create_scratch_page_tree",
    "intel_vgpu_find_spt_by_gfn",
    "intel_vgpu_find_spt_by_mfn",
    "ppgtt_alloc_spt",
    "ppgtt_get_guest_entry",
    "ppgtt_get_shadow_entry",
    "ppgtt_set_shadow_entry",
    "read_guest_page",
    "release_scratch_page_tree",
]

_PAGE = struct.Struct("<512Q")


@attrs.define(eq=False)
class Spt:
    """``struct intel_vgpu_ppgtt_spt``."""

    vgpu: Vgpu
    shadow_type: GttType
    mfn: int
    shadow: list[int]
    refcount: int = 1
    guest_type: GttType = GttType.INVALID
    guest_gfn: int = 0
    pde_ips: bool = False
    write_cnt: int = 0
    oos_page: OosPage | None = None
    post_shadow_bitmap: set[int] = attrs.field(factory=set)
    freed: bool = False

    def __repr__(self) -> str:
        return (f"<Spt {self.shadow_type.name} gfn={self.guest_gfn:#x} mfn={self.mfn:#x} "
                f"ref={self.refcount}>")


# ---- entries ---------------------------------------------------------------------------


def read_guest_entry(vgpu: Vgpu, gpa: int) -> int:
    """``intel_gvt_read_gpa`` of one 8-byte entry; a failed read gives 0 (the error is ignored)."""
    try:
        return int.from_bytes(vgpu.vm.read_guest(gpa, 8), "little")
    except Exception:
        return 0


def read_guest_page(vgpu: Vgpu, gfn: int) -> list[int]:
    """The 512 entries of a guest table page (zeros if it cannot be read)."""
    try:
        return list(_PAGE.unpack(vgpu.vm.read_guest(gfn << 12, 4096)))
    except Exception:
        return [0] * E.GTT_ENTRIES


def ppgtt_get_guest_entry(spt: Spt, index: int, value: int | None = None) -> GttEntry:
    """``ppgtt_get_guest_entry``: re-read from guest memory, typed with the spt's ``pde_ips``."""
    if value is None:
        value = read_guest_entry(spt.vgpu, (spt.guest_gfn << 12) + 8 * index)
    e = GttEntry(E.get_entry_type(spt.guest_type), value)
    E.update_entry_type_for_real(e, spt.pde_ips)
    return e


def ppgtt_get_shadow_entry(spt: Spt, index: int) -> GttEntry:
    """``ppgtt_get_shadow_entry``: shadow entries are typed with IPS = false."""
    e = GttEntry(E.get_entry_type(spt.shadow_type), spt.shadow[index])
    E.update_entry_type_for_real(e, False)
    return e


def ppgtt_set_shadow_entry(spt: Spt, e: GttEntry, index: int, action: str) -> None:
    """``ppgtt_set_shadow_entry``, plus the ``gvt_shadow_update`` audit event."""
    old = spt.shadow[index]
    spt.shadow[index] = e.val64
    vgpu = spt.vgpu
    vgpu.stats.shadow_updates += 1
    if vgpu.audit_on and spt.guest_type != GttType.INVALID:
        vgpu.emit("gvt_shadow_update", gfn=spt.guest_gfn, index=index, old=old, new=e.val64,
                  action=action, cause=vgpu.cause, mfn=spt.mfn)


# ---- lookups ---------------------------------------------------------------------------


def intel_vgpu_find_spt_by_mfn(vgpu: Vgpu, mfn: int) -> Spt | None:
    """``intel_vgpu_find_spt_by_mfn``: ``spt_tree`` lookup."""
    return vgpu.spt_tree.get(mfn)


def intel_vgpu_find_spt_by_gfn(vgpu: Vgpu, gfn: int) -> Spt | None:
    """``intel_vgpu_find_spt_by_gfn``: the record's spt if its handler is the PPGTT one.

    The spt's type is not compared with the level being populated.
    """
    from .shadow import ppgtt_write_protection_handler

    track = vgpu.page_track_tree.get(gfn)
    if track is not None and track.handler is ppgtt_write_protection_handler:
        spt: Spt = track.priv_data
        return spt
    return None


# ---- allocation ------------------------------------------------------------------------


def ppgtt_alloc_spt(vgpu: Vgpu, type_: GttType) -> Spt:
    """``ppgtt_alloc_spt``: a zeroed, DMA-mapped shadow page in ``spt_tree``.

    When the page allocation fails, ``reclaim_one_ppgtt_mm`` unshadows the
    least recently pinned unpinned mm and the allocation is retried.
    """
    from .mm import reclaim_one_ppgtt_mm

    gvt = vgpu.gvt
    while True:
        try:
            mfn = gvt.alloc_spt_page()
            break
        except GvtError:
            if reclaim_one_ppgtt_mm(gvt):
                continue
            vgpu.error("fail to allocate ppgtt shadow page")
            raise
    spt = Spt(vgpu, type_, mfn, gvt.host_pages[mfn])
    vgpu.spt_tree[mfn] = spt
    if vgpu.audit_on:
        vgpu.emit("gvt_spt", gfn=0, mfn=mfn, type=int(type_), action="alloc")
    return spt


# ---- scratch tree (create_scratch_page_tree / alloc_scratch_pages) ---------------------


def create_scratch_page_tree(vgpu: Vgpu) -> None:
    """``create_scratch_page_tree``: ``scratch_pt[T]`` for T = PTE_PT .. PML4_PT.

    ``scratch_pt[PTE_PT]`` is a zero data page; above it, ``scratch_pt[T]`` is
    a table of type T-1 whose 512 entries point at ``scratch_pt[T-1]`` with
    present | RW (and PPAT_CACHED for the PTEs of the scratch PT).
    """
    gvt = vgpu.gvt
    for t in range(GttType.PPGTT_PTE_PT, GttType.MAX):
        ty = GttType(t)
        mfn = gvt.alloc_page()
        vgpu.scratch_pt[ty] = mfn
        if ty > GttType.PPGTT_PTE_PT:
            se = GttEntry(E.get_entry_type(GttType(t - 1)))
            E.set_pfn(se, vgpu.scratch_pt[GttType(t - 1)])
            se.val64 |= E.GEN8_PAGE_PRESENT | E.GEN8_PAGE_RW
            if ty == GttType.PPGTT_PDE_PT:
                se.val64 |= E.PPAT_CACHED
            gvt.host_pages[mfn][:] = [se.val64] * E.GTT_ENTRIES


def release_scratch_page_tree(vgpu: Vgpu) -> None:
    """``release_scratch_page_tree``."""
    for mfn in vgpu.scratch_pt.values():
        vgpu.gvt.free_page(mfn)
    vgpu.scratch_pt.clear()
