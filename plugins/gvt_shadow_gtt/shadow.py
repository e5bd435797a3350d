"""PPGTT shadowing: populate, invalidate, trapped guest writes, post-shadow, OOS (gvt/gtt.c).

Every function here runs with ``vgpu_lock`` held and raises
:class:`~.errors.GvtError` where the C code returns a negative errno.  The
upstream quirks are kept (spec gvt-shadow-gtt.md §9.6): direct 2 MiB mappings
are skipped by ``ppgtt_invalidate_spt``; an IPS change re-populates without
releasing; scratching a 64K-split entry releases only the first 4 KiB mapping;
``ppgtt_free_spt`` does not recurse; an spt found by gfn is reused whatever its
level; a gfn-0 table is never unregistered; OOS sync re-shadows without
releasing and ignores entries that became not present.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import entry as E
from .entry import GTT_64K_PTE_STRIDE, GTT_ENTRIES, GttEntry, GttType
from .errors import GvtError
from .page_track import (
    PageTrack,
    intel_vgpu_disable_page_track,
    intel_vgpu_enable_page_track,
    intel_vgpu_register_page_track,
    intel_vgpu_unregister_page_track,
)
from .spt import (
    Spt,
    intel_vgpu_find_spt_by_gfn,
    intel_vgpu_find_spt_by_mfn,
    ppgtt_alloc_spt,
    ppgtt_get_guest_entry,
    ppgtt_get_shadow_entry,
    ppgtt_set_shadow_entry,
    read_guest_entry,
    read_guest_page,
)

if TYPE_CHECKING:
    from .device import OosPage
    from .vgpu import Vgpu

__all__ = [
    "intel_vgpu_flush_post_shadow",
    "intel_vgpu_sync_oos_pages",
    "ppgtt_alloc_spt_gfn",
    "ppgtt_free_spt",
    "ppgtt_generate_shadow_entry",
    "ppgtt_handle_guest_entry_add",
    "ppgtt_handle_guest_entry_removal",
    "ppgtt_handle_guest_write_page_table",
    "ppgtt_handle_guest_write_page_table_bytes",
    "ppgtt_invalidate_pte",
    "ppgtt_invalidate_spt",
    "ppgtt_invalidate_spt_by_shadow_entry",
    "ppgtt_populate_shadow_entry",
    "ppgtt_populate_spt",
    "ppgtt_populate_spt_by_guest_entry",
    "ppgtt_write_protection_handler",
    "split_2MB_gtt_entry",
    "split_64KB_gtt_entry",
]

PAGE_SIZE = 4096
SIZE_2M = 2 << 20
_ROOTS = (GttType.PPGTT_ROOT_L3_ENTRY, GttType.PPGTT_ROOT_L4_ENTRY)
_TABLE_ENTRIES = (GttType.PPGTT_PML4_ENTRY, GttType.PPGTT_PDP_ENTRY, GttType.PPGTT_PDE_ENTRY)


def _fail(vgpu: Vgpu, what: str, e: GttEntry) -> None:
    vgpu.error(f"fail: {what} guest entry {e.val64:#x} type {int(e.type)}")


# ---- free / invalidate -----------------------------------------------------------------


def ppgtt_free_spt(spt: Spt) -> None:
    """``ppgtt_free_spt``: unmap the shadow page, leave ``spt_tree``, unregister the gfn.

    A gfn-0 spt keeps its page-track record (the free path reads gfn 0 as "no
    guest page").  Children are not touched.
    """
    if spt.freed:
        return
    vgpu = spt.vgpu
    spt.freed = True
    vgpu.gvt.free_spt_page(spt.mfn)
    vgpu.spt_tree.pop(spt.mfn, None)
    if spt.guest_gfn:
        if spt.oos_page is not None:
            detach_oos_page(vgpu, spt.oos_page)
        intel_vgpu_unregister_page_track(vgpu, spt.guest_gfn)
    vgpu.post_shadow_list.pop(spt, None)
    if vgpu.audit_on:
        vgpu.emit("gvt_spt", gfn=spt.guest_gfn, mfn=spt.mfn, type=int(spt.shadow_type), action="free")


def ppgtt_invalidate_pte(spt: Spt, e: GttEntry) -> None:
    """``ppgtt_invalidate_pte``: drop the DMA reference unless the frame is 0 or scratch."""
    vgpu = spt.vgpu
    pfn = E.get_pfn(e)
    if not pfn or pfn == vgpu.scratch_pt[spt.shadow_type]:
        return
    vgpu.dma.unmap_guest_page(pfn << 12)


def ppgtt_invalidate_spt_by_shadow_entry(vgpu: Vgpu, e: GttEntry) -> None:
    """``ppgtt_invalidate_spt_by_shadow_entry``: invalidate the child unless it is scratch."""
    if e.type not in _ROOTS:
        cur = E.get_next_pt_type(e.type)
        if not E.is_pt_type(cur) or not E.is_pt_type(cur + 1):
            raise GvtError("EINVAL", f"invalid page table type {int(cur)}")
        if E.get_pfn(e) == vgpu.scratch_pt[GttType(cur + 1)]:
            return
    s = intel_vgpu_find_spt_by_mfn(vgpu, E.get_pfn(e))
    if s is None:
        vgpu.error(f"fail to find shadow page: mfn: {E.get_pfn(e):#x}")
        raise GvtError("ENXIO", "no shadow page at that mfn")
    ppgtt_invalidate_spt(s)


def ppgtt_invalidate_spt(spt: Spt) -> None:
    """``ppgtt_invalidate_spt``: drop a reference; at zero release every present entry, free.

    4K → DMA unref; 64K and 1G → skipped (warning); direct 2M → skipped (no
    unmap); table entries → recurse.  A failure leaves the spt allocated.
    """
    spt.refcount -= 1
    if spt.refcount > 0:
        return
    vgpu = spt.vgpu
    for index in range(GTT_ENTRIES):
        if not spt.shadow[index] & E.GEN8_PAGE_PRESENT:
            continue
        e = ppgtt_get_shadow_entry(spt, index)
        t = e.type
        if t == GttType.PPGTT_PTE_4K_ENTRY:
            ppgtt_invalidate_pte(spt, e)
        elif t in (GttType.PPGTT_PTE_64K_ENTRY, GttType.PPGTT_PTE_1G_ENTRY, GttType.PPGTT_PTE_2M_ENTRY):
            continue
        elif t in _TABLE_ENTRIES:
            try:
                ppgtt_invalidate_spt_by_shadow_entry(vgpu, e)
            except GvtError:
                vgpu.error(f"fail: shadow page {spt.mfn:#x} shadow entry {e.val64:#x} type {int(t)}")
                raise
    ppgtt_free_spt(spt)


# ---- populate --------------------------------------------------------------------------


def ppgtt_generate_shadow_entry(s: Spt, ge: GttEntry) -> GttEntry:
    """``ppgtt_generate_shadow_entry``: the guest entry with frame := child mfn, IPS cleared."""
    se = ge.copy()
    if se.type == GttType.PPGTT_PDE_ENTRY:
        E.clear_ips(se)
    E.set_pfn(se, s.mfn)
    return se


def ppgtt_alloc_spt_gfn(vgpu: Vgpu, type_: GttType, gfn: int, ips: bool) -> Spt:
    """``ppgtt_alloc_spt_gfn``: an spt plus its page-track record (not yet protected)."""
    spt = ppgtt_alloc_spt(vgpu, type_)
    try:
        intel_vgpu_register_page_track(vgpu, gfn, ppgtt_write_protection_handler, spt)
    except GvtError:
        ppgtt_free_spt(spt)
        raise
    spt.guest_type = type_
    spt.guest_gfn = gfn
    spt.pde_ips = ips
    if vgpu.audit_on:
        vgpu.emit("gvt_spt", gfn=gfn, mfn=spt.mfn, type=int(type_), action="track")
    return spt


def ppgtt_populate_spt(spt: Spt) -> None:
    """``ppgtt_populate_spt``: shadow every present guest entry (stride 16 under IPS).

    The first error aborts, leaving what was built (the caller cleans up).
    """
    vgpu = spt.vgpu
    entries = read_guest_page(vgpu, spt.guest_gfn)
    step = GTT_64K_PTE_STRIDE if spt.pde_ips else 1
    for i in range(0, GTT_ENTRIES, step):
        ge = ppgtt_get_guest_entry(spt, i, entries[i])
        if not E.test_present(ge):
            continue
        try:
            if E.is_pt_type(E.get_next_pt_type(ge.type)):
                s = ppgtt_populate_spt_by_guest_entry(vgpu, ge)
                ppgtt_set_shadow_entry(spt, ppgtt_generate_shadow_entry(s, ge), i, "link")
            else:
                ppgtt_populate_shadow_entry(vgpu, spt, i, ge)
        except GvtError:
            _fail(vgpu, f"shadow page {spt.mfn:#x}", ge)
            raise


def ppgtt_populate_spt_by_guest_entry(vgpu: Vgpu, we: GttEntry) -> Spt:
    """``ppgtt_populate_spt_by_guest_entry``: get or create the spt of the table ``we`` points to.

    An existing spt (found by gfn) gains a reference; if the IPS setting
    differs it is zeroed and re-populated.  A new one is allocated, **write-
    protected** (``intel_vgpu_enable_page_track``) and populated; any error
    frees it (untracking it) and propagates.
    """
    ips = False
    if we.type == GttType.PPGTT_PDE_ENTRY:
        ips = vgpu.ips_enabled and E.test_ips(we)
    gfn = E.get_pfn(we)
    spt = intel_vgpu_find_spt_by_gfn(vgpu, gfn)
    try:
        if spt is not None:
            spt.refcount += 1
            if ips != spt.pde_ips:
                spt.pde_ips = ips
                spt.shadow[:] = [0] * GTT_ENTRIES  # clear_page: prior mappings not released
                try:
                    ppgtt_populate_spt(spt)
                except GvtError:
                    spt.refcount -= 1
                    raise
            return spt
        type_ = E.get_next_pt_type(we.type)
        if not E.is_pt_type(type_):
            raise GvtError("EINVAL", f"entry type {int(we.type)} points to no table")
        spt = ppgtt_alloc_spt_gfn(vgpu, type_, gfn, ips)
        try:
            intel_vgpu_enable_page_track(vgpu, gfn)
            ppgtt_populate_spt(spt)
        except GvtError:
            ppgtt_free_spt(spt)
            raise
        return spt
    except GvtError:
        _fail(vgpu, "populate", we)
        raise


def split_64KB_gtt_entry(vgpu: Vgpu, spt: Spt, index: int, se: GttEntry) -> None:
    """``split_64KB_gtt_entry``: 16 shadow 4K entries with bit 52, mapping gfn .. gfn+15.

    A mapping failure returns at once; entries already written stay.
    """
    start_gfn = E.get_pfn(se)
    e = GttEntry(GttType.PPGTT_PTE_4K_ENTRY, se.val64)
    E.set_64k_splited(e)
    for i in range(GTT_64K_PTE_STRIDE):
        dma = vgpu.dma.map_guest_page(start_gfn + i, PAGE_SIZE)
        E.set_pfn(e, dma >> 12)
        ppgtt_set_shadow_entry(spt, e, index + i, "map_64k")


def split_2MB_gtt_entry(vgpu: Vgpu, spt: Spt, index: int, se: GttEntry) -> None:
    """``split_2MB_gtt_entry``: an untracked PTE_PT sub-spt of 512 4K entries.

    Each sub-entry is the 2M entry with PAT moved from bit 12 to bit 7 and
    frame := dma(gfn + k); the PDE loses D, PS and IPS and points at the
    sub-spt.  A mapping failure releases what the sub-spt holds and frees it.
    """
    start_gfn = E.get_pfn(se)
    sub = ppgtt_alloc_spt(vgpu, GttType.PPGTT_PTE_PT)
    try:
        for k in range(GTT_ENTRIES):
            dma = vgpu.dma.map_guest_page(start_gfn + k, PAGE_SIZE)
            sub_se = GttEntry(GttType.PPGTT_PTE_4K_ENTRY, se.val64)
            sub_se.val64 &= ~E.PAGE_PAT
            sub_se.val64 |= (se.val64 & E.PAGE_PAT_LARGE) >> 5
            E.set_pfn(sub_se, dma >> 12)
            ppgtt_set_shadow_entry(sub, sub_se, k, "map")
    except GvtError:
        for k in range(GTT_ENTRIES):
            if sub.shadow[k] & E.GEN8_PAGE_PRESENT:
                ppgtt_invalidate_pte(sub, ppgtt_get_shadow_entry(sub, k))
        ppgtt_free_spt(sub)
        raise
    pde = se.copy()
    pde.val64 &= ~E.PAGE_DIRTY
    E.clear_pse(pde)
    E.clear_ips(pde)
    E.set_pfn(pde, sub.mfn)
    ppgtt_set_shadow_entry(spt, pde, index, "split_2m")


def ppgtt_populate_shadow_entry(vgpu: Vgpu, spt: Spt, index: int, ge: GttEntry) -> None:
    """``ppgtt_populate_shadow_entry``: shadow one leaf entry.

    4K: map or -ENXIO.  64K: split in 16.  2M: direct if the platform has 2 MiB
    GTT pages and the 2 MiB mapping succeeds (host-contiguous), else split.
    1G: "GVT doesn't support 1GB entry", -EINVAL.  Not present: nothing.
    """
    if not E.test_present(ge):
        return
    se = ge.copy()
    gfn = E.get_pfn(ge)
    t = ge.type
    if t == GttType.PPGTT_PTE_4K_ENTRY:
        try:
            dma = vgpu.dma.map_guest_page(gfn, PAGE_SIZE)
        except GvtError as exc:
            raise GvtError("ENXIO", f"cannot map gfn {gfn:#x}: {exc}") from exc
    elif t == GttType.PPGTT_PTE_64K_ENTRY:
        split_64KB_gtt_entry(vgpu, spt, index, se)
        return
    elif t == GttType.PPGTT_PTE_2M_ENTRY:
        if not vgpu.gvt.has_2m:
            split_2MB_gtt_entry(vgpu, spt, index, se)
            return
        try:
            dma = vgpu.dma.map_guest_page(gfn, SIZE_2M)
        except GvtError:
            split_2MB_gtt_entry(vgpu, spt, index, se)
            return
    elif t == GttType.PPGTT_PTE_1G_ENTRY:
        vgpu.error("GVT doesn't support 1GB entry")
        raise GvtError("EINVAL", "1 GiB GTT entries are not supported")
    else:
        raise GvtError("EINVAL", f"unexpected leaf entry type {int(t)}")
    E.set_pfn(se, dma >> 12)
    ppgtt_set_shadow_entry(spt, se, index, "map")


# ---- trapped guest writes ------------------------------------------------------------


def ppgtt_handle_guest_entry_add(spt: Spt, we: GttEntry, index: int) -> None:
    """``ppgtt_handle_guest_entry_add``: link a (new or shared) child spt, or map a leaf."""
    vgpu = spt.vgpu
    try:
        if E.is_pt_type(E.get_next_pt_type(we.type)):
            s = ppgtt_populate_spt_by_guest_entry(vgpu, we)
            ppgtt_set_shadow_entry(spt, ppgtt_generate_shadow_entry(s, we), index, "link")
        else:
            ppgtt_populate_shadow_entry(vgpu, spt, index, we)
    except GvtError:
        _fail(vgpu, f"spt {spt.mfn:#x}", we)
        raise


def ppgtt_handle_guest_entry_removal(spt: Spt, se: GttEntry, index: int) -> None:
    """``ppgtt_handle_guest_entry_removal``: release what a shadow entry refers to.

    Not present or scratch → nothing; a table → ``ppgtt_invalidate_spt`` of the
    child found by mfn (-ENXIO if none); a leaf → ``ppgtt_invalidate_pte``.
    """
    vgpu = spt.vgpu
    if not E.test_present(se):
        return
    if E.get_pfn(se) == vgpu.scratch_pt[spt.shadow_type]:
        return
    try:
        if E.is_pt_type(E.get_next_pt_type(se.type)):
            s = intel_vgpu_find_spt_by_mfn(vgpu, E.get_pfn(se))
            if s is None:
                vgpu.error("fail to find guest page")
                raise GvtError("ENXIO", "no shadow page at that mfn")
            ppgtt_invalidate_spt(s)
        else:
            ppgtt_invalidate_pte(spt, se)
    except GvtError:
        vgpu.error(f"fail: shadow page {spt.mfn:#x} guest entry {se.val64:#x} type {int(se.type)}")
        raise


def ppgtt_handle_guest_write_page_table(spt: Spt, we: GttEntry, index: int) -> None:
    """``ppgtt_handle_guest_write_page_table``: add the new entry first, then remove the old.

    A failed add leaves the old shadow entry and its mappings in place.  A new
    non-present value scratches the old shadow entry, keeping its other bits
    (all 16 entries of a 64K split; PS cleared for 2M/1G).
    """
    vgpu = spt.vgpu
    type_ = spt.shadow_type
    new_present = E.test_present(we)
    old = ppgtt_get_shadow_entry(spt, index)
    try:
        if new_present:
            ppgtt_handle_guest_entry_add(spt, we, index)
        ppgtt_handle_guest_entry_removal(spt, old, index)
    except GvtError:
        vgpu.error(f"fail: shadow page {spt.mfn:#x} guest entry {we.val64:#x} type {int(we.type)}")
        raise
    if new_present:
        return
    scratch = vgpu.scratch_pt[type_]
    if E.test_64k_splited(old) and index % GTT_64K_PTE_STRIDE == 0:
        for i in range(GTT_64K_PTE_STRIDE):
            E.clear_64k_splited(old)
            E.set_pfn(old, scratch)
            ppgtt_set_shadow_entry(spt, old, index + i, "scratch")
    elif old.type in (GttType.PPGTT_PTE_2M_ENTRY, GttType.PPGTT_PTE_1G_ENTRY):
        E.clear_pse(old)
        E.set_pfn(old, scratch)
        ppgtt_set_shadow_entry(spt, old, index, "scratch")
    else:
        E.set_pfn(old, scratch)
        ppgtt_set_shadow_entry(spt, old, index, "scratch")


def ppgtt_set_post_shadow(spt: Spt, index: int) -> None:
    """``ppgtt_set_post_shadow``: set the bit; list the spt once."""
    spt.post_shadow_bitmap.add(index)
    spt.vgpu.post_shadow_list.setdefault(spt, None)


def ppgtt_handle_guest_write_page_table_bytes(spt: Spt, pa: int, data: bytes, nbytes: int) -> None:
    """``ppgtt_handle_guest_write_page_table_bytes``.

    index = offset >> 3; the entry is re-read from guest memory (``data`` is not
    used).  A write to a non-stride 64K entry is ignored.  8 bytes → handled
    now.  4 bytes → the old shadow entry is released and scratched (once per
    pending bit) and the entry waits for the next submit (post-shadow).  Then
    the OOS bookkeeping, if enabled.
    """
    vgpu = spt.vgpu
    index = (pa & 0xFFF) >> 3
    we = ppgtt_get_guest_entry(spt, index)
    if we.type == GttType.PPGTT_PTE_64K_ENTRY and index % GTT_64K_PTE_STRIDE:
        return
    if nbytes == 8:
        ppgtt_handle_guest_write_page_table(spt, we, index)
    else:
        if index not in spt.post_shadow_bitmap:
            se = ppgtt_get_shadow_entry(spt, index)
            ppgtt_handle_guest_entry_removal(spt, se, index)
            E.set_pfn(se, vgpu.scratch_pt[spt.shadow_type])
            ppgtt_set_shadow_entry(spt, se, index, "post_shadow")
        ppgtt_set_post_shadow(spt, index)
    if not vgpu.gvt.enable_out_of_sync:
        return
    spt.write_cnt += 1
    if spt.oos_page is not None:
        assert spt.oos_page.mem is not None
        spt.oos_page.mem[index] = we.val64
    if can_do_out_of_sync(spt):
        if spt.oos_page is None:
            ppgtt_allocate_oos_page(spt)
        ppgtt_set_guest_page_oos(spt)


def ppgtt_write_protection_handler(track: PageTrack, gpa: int, data: bytes, nbytes: int) -> None:
    """``ppgtt_write_protection_handler``: only 4- and 8-byte writes (else -EINVAL)."""
    if nbytes not in (4, 8):
        raise GvtError("EINVAL", f"{nbytes}-byte write to a PPGTT page")
    spt: Spt = track.priv_data
    with spt.vgpu.caused("write"):
        ppgtt_handle_guest_write_page_table_bytes(spt, gpa, data, nbytes)


def intel_vgpu_flush_post_shadow(vgpu: Vgpu) -> None:
    """``intel_vgpu_flush_post_shadow``: fully process every pending partially written entry.

    Each flagged entry is re-read and handled, then its bit cleared; the first
    error stops (remaining bits stay set).  Each spt then leaves the list.
    """
    with vgpu.caused("flush"):
        for spt in list(vgpu.post_shadow_list):
            if spt not in vgpu.post_shadow_list:
                continue  # freed by an earlier entry
            for index in sorted(spt.post_shadow_bitmap):
                ge = ppgtt_get_guest_entry(spt, index)
                ppgtt_handle_guest_write_page_table(spt, ge, index)
                spt.post_shadow_bitmap.discard(index)
            vgpu.post_shadow_list.pop(spt, None)


# ---- out-of-sync pages (compiled in, disabled by default) ------------------------------


def can_do_out_of_sync(spt: Spt) -> bool:
    """``can_do_out_of_sync``: OOS on, a PTE page, at least two trapped writes."""
    return (spt.vgpu.gvt.enable_out_of_sync and E.is_pte_pt(spt.guest_type)
            and spt.write_cnt >= 2)


def attach_oos_page(oos: OosPage, spt: Spt) -> None:
    """``attach_oos_page``: snapshot the guest page; move the descriptor to the in-use tail."""
    gvt = spt.vgpu.gvt
    oos.mem = read_guest_page(spt.vgpu, spt.guest_gfn)
    spt.oos_page = oos
    oos.spt = spt
    if oos in gvt.oos_free:
        gvt.oos_free.remove(oos)
    gvt.oos_used.pop(oos, None)
    gvt.oos_used[oos] = None


def detach_oos_page(vgpu: Vgpu, oos: OosPage) -> None:
    """``detach_oos_page``: ``write_cnt = 0``, unlink both ways, back to the free list."""
    spt = oos.spt
    if spt is not None:
        spt.write_cnt = 0
        spt.oos_page = None
        spt.vgpu.oos_page_list.pop(oos, None)
    oos.spt = None
    gvt = vgpu.gvt
    gvt.oos_used.pop(oos, None)
    gvt.oos_free.append(oos)


def ppgtt_allocate_oos_page(spt: Spt) -> None:
    """``ppgtt_allocate_oos_page``: a free descriptor, or sync and take the oldest in use."""
    gvt = spt.vgpu.gvt
    if not gvt.oos_free:
        oos = next(iter(gvt.oos_used))
        old = oos.spt
        assert old is not None
        ppgtt_set_guest_page_sync(old)
        detach_oos_page(spt.vgpu, oos)
        if spt.vgpu.audit_on:
            spt.vgpu.emit("gvt_oos", gfn=old.guest_gfn, action="reassign")
    else:
        oos = gvt.oos_free[0]
    attach_oos_page(oos, spt)


def ppgtt_set_guest_page_oos(spt: Spt) -> None:
    """``ppgtt_set_guest_page_oos``: list the page out of sync and drop write protection."""
    vgpu = spt.vgpu
    oos = spt.oos_page
    if oos is None:
        raise GvtError("EINVAL", "shadow PPGTT page should have a oos page")
    vgpu.oos_page_list[oos] = None
    intel_vgpu_disable_page_track(vgpu, spt.guest_gfn)
    if vgpu.audit_on:
        vgpu.emit("gvt_oos", gfn=spt.guest_gfn, action="out_of_sync")


def sync_oos_page(vgpu: Vgpu, oos: OosPage) -> None:
    """``sync_oos_page``: re-shadow entries that differ from the snapshot (or are flagged).

    Entries are typed 4K without the IPS upgrade and re-shadowed with
    ``ppgtt_populate_shadow_entry`` only: the previous mapping is not released
    and an entry that became not present keeps its old shadow.  A flagged bit
    is cleared only when the value did not change.
    """
    spt = oos.spt
    assert spt is not None and oos.mem is not None
    etype = E.get_entry_type(spt.guest_type)
    with vgpu.caused("oos_sync"):
        for index in range(GTT_ENTRIES):
            old = oos.mem[index]
            new = GttEntry(etype, read_guest_entry(vgpu, (spt.guest_gfn << 12) + 8 * index))
            if old == new.val64:
                if index not in spt.post_shadow_bitmap:
                    continue
                spt.post_shadow_bitmap.discard(index)
            ppgtt_populate_shadow_entry(vgpu, spt, index, new)
            oos.mem[index] = new.val64
    spt.write_cnt = 0
    vgpu.post_shadow_list.pop(spt, None)


def ppgtt_set_guest_page_sync(spt: Spt) -> None:
    """``ppgtt_set_guest_page_sync``: re-protect, leave the OOS list, ``sync_oos_page``."""
    vgpu = spt.vgpu
    intel_vgpu_enable_page_track(vgpu, spt.guest_gfn)
    assert spt.oos_page is not None
    vgpu.oos_page_list.pop(spt.oos_page, None)
    if vgpu.audit_on:
        vgpu.emit("gvt_oos", gfn=spt.guest_gfn, action="sync")
    sync_oos_page(vgpu, spt.oos_page)


def intel_vgpu_sync_oos_pages(vgpu: Vgpu) -> int:
    """``intel_vgpu_sync_oos_pages``: 0 at once when OOS is disabled; else sync every OOS page."""
    if not vgpu.gvt.enable_out_of_sync:
        return 0
    for oos in list(vgpu.oos_page_list):
        assert oos.spt is not None
        ppgtt_set_guest_page_sync(oos.spt)
    return 0
