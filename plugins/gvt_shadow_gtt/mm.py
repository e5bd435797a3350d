"""PPGTT mm lifecycle: create, find, get/put, pin/unpin, shadow/invalidate, reclaim (gvt/gtt.c).

An mm (``struct intel_vgpu_mm``, type PPGTT) is one guest GPU address space,
named by its root pointers: ``pdps[0]`` for a 4-level (ROOT_L4) table, all four
``pdps`` for a 3-level (ROOT_L3) one.  It holds shadow root pointers, a
reference count (``kref``) and a pin count; the GVT-wide LRU decides which
unpinned mm loses its shadow when shadow pages run out.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs

from . import entry as E
from .entry import GttEntry, GttType
from .errors import GvtError
from .shadow import (
    ppgtt_generate_shadow_entry,
    ppgtt_invalidate_spt_by_shadow_entry,
    ppgtt_populate_spt_by_guest_entry,
)

if TYPE_CHECKING:
    from .device import GvtDevice
    from .vgpu import Vgpu

__all__ = [
    "Mm",
    "intel_vgpu_create_ppgtt_mm",
    "intel_vgpu_destroy_all_ppgtt_mm",
    "intel_vgpu_find_ppgtt_mm",
    "intel_vgpu_get_ppgtt_mm",
    "intel_vgpu_invalidate_ppgtt",
    "intel_vgpu_mm_get",
    "intel_vgpu_mm_put",
    "intel_vgpu_pin_mm",
    "intel_vgpu_put_ppgtt_mm",
    "intel_vgpu_unpin_mm",
    "invalidate_ppgtt_mm",
    "reclaim_one_ppgtt_mm",
    "root_type_of_levels",
    "shadow_ppgtt_mm",
]

_mm_ids = itertools.count(1)


def root_type_of_levels(levels: int) -> GttType:
    """3 → ROOT_L3_ENTRY, 4 → ROOT_L4_ENTRY."""
    if levels == 4:
        return GttType.PPGTT_ROOT_L4_ENTRY
    if levels == 3:
        return GttType.PPGTT_ROOT_L3_ENTRY
    raise GvtError("EINVAL", f"a PPGTT has 3 or 4 levels, not {levels}")


@attrs.define(eq=False)
class Mm:
    """``struct intel_vgpu_mm`` of type ``INTEL_GVT_MM_PPGTT``."""

    vgpu: Vgpu
    root_entry_type: GttType
    guest_pdps: list[int] = attrs.field(factory=lambda: [0, 0, 0, 0])
    shadow_pdps: list[int] = attrs.field(factory=lambda: [0, 0, 0, 0])
    shadowed: bool = False
    ref: int = 1
    pincount: int = 0
    id: int = attrs.field(factory=lambda: next(_mm_ids))
    released: bool = False

    @property
    def levels(self) -> int:
        return 4 if self.root_entry_type == GttType.PPGTT_ROOT_L4_ENTRY else 3

    def __hash__(self) -> int:
        return id(self)

    def __repr__(self) -> str:
        return (f"<Mm {self.id} L{self.levels} pdps={[hex(p) for p in self.guest_pdps]} "
                f"shadowed={self.shadowed} ref={self.ref} pin={self.pincount}>")


def _emit(mm: Mm, action: str) -> None:
    vgpu = mm.vgpu
    if vgpu.audit_on:
        vgpu.emit("gvt_mm", mm=mm.id, action=action, levels=mm.levels, pdps=list(mm.guest_pdps))


def ppgtt_get_guest_root_entry(mm: Mm, index: int) -> GttEntry:
    """``ppgtt_get_guest_root_entry``."""
    return GttEntry(mm.root_entry_type, mm.guest_pdps[index])


def ppgtt_get_shadow_root_entry(mm: Mm, index: int) -> GttEntry:
    """``ppgtt_get_shadow_root_entry``."""
    return GttEntry(mm.root_entry_type, mm.shadow_pdps[index])


def _set_shadow_root(mm: Mm, e: GttEntry, index: int) -> None:
    """``ppgtt_set_shadow_root_entry``."""
    old = mm.shadow_pdps[index]
    mm.shadow_pdps[index] = e.val64
    vgpu = mm.vgpu
    vgpu.stats.shadow_updates += 1
    if vgpu.audit_on:
        vgpu.emit("gvt_shadow_update", gfn=0, index=index, old=old, new=e.val64, action="root",
                  cause=vgpu.cause, mfn=0, mm=mm.id)


# ---- shadow / invalidate --------------------------------------------------------------


def invalidate_ppgtt_mm(mm: Mm) -> None:
    """``invalidate_ppgtt_mm``: invalidate the spt under each present shadow root; zero it."""
    if not mm.shadowed:
        return
    vgpu = mm.vgpu
    with vgpu.caused("invalidate"):
        for index in range(4):
            se = ppgtt_get_shadow_root_entry(mm, index)
            if not E.test_present(se):
                continue
            with contextlib.suppress(GvtError):  # the C code ignores the result here
                ppgtt_invalidate_spt_by_shadow_entry(vgpu, se)
            se.val64 = 0
            _set_shadow_root(mm, se, index)
    mm.shadowed = False
    _emit(mm, "invalidate")


def shadow_ppgtt_mm(mm: Mm) -> None:
    """``shadow_ppgtt_mm``: populate each present guest root, set the shadow roots.

    Already shadowed → nothing; vGPU not attached → -EINVAL (6.6); any error →
    ``invalidate_ppgtt_mm`` and the error.
    """
    if mm.shadowed:
        return
    vgpu = mm.vgpu
    if not vgpu.attached:
        raise GvtError("EINVAL", "vGPU is not attached")
    mm.shadowed = True
    with vgpu.caused("populate"):
        for index in range(4):
            ge = ppgtt_get_guest_root_entry(mm, index)
            if not E.test_present(ge):
                continue
            try:
                spt = ppgtt_populate_spt_by_guest_entry(vgpu, ge)
            except GvtError:
                vgpu.error("fail to populate guest root pointer")
                invalidate_ppgtt_mm(mm)
                raise
            _set_shadow_root(mm, ppgtt_generate_shadow_entry(spt, ge), index)
    _emit(mm, "shadow")


# ---- create / find / get / put -------------------------------------------------------


def intel_vgpu_create_ppgtt_mm(vgpu: Vgpu, root_entry_type: GttType, pdps: Sequence[int]) -> Mm:
    """``intel_vgpu_create_ppgtt_mm``: record the roots (L4: pdps[0] only), shadow at once.

    Then the mm joins the vGPU's list and the LRU tail.  A shadowing failure
    frees the mm and returns the error.
    """
    mm = Mm(vgpu, root_entry_type)
    if root_entry_type == GttType.PPGTT_ROOT_L4_ENTRY:
        mm.guest_pdps[0] = pdps[0]
    else:
        mm.guest_pdps[:] = list(pdps[:4]) + [0] * (4 - len(pdps[:4]))
    _emit(mm, "create")
    try:
        shadow_ppgtt_mm(mm)
    except GvtError:
        vgpu.error("failed to shadow ppgtt mm")
        mm.released = True
        raise
    vgpu.ppgtt_mm_list.append(mm)
    gvt = vgpu.gvt
    with gvt.ppgtt_mm_lock:
        gvt.lru[mm] = None
    return mm


def intel_vgpu_find_ppgtt_mm(vgpu: Vgpu, pdps: Sequence[int]) -> Mm | None:
    """``intel_vgpu_find_ppgtt_mm``: L4 mms match on pdps[0]; L3 mms on all four."""
    want = list(pdps[:4]) + [0] * (4 - len(pdps[:4]))
    for mm in vgpu.ppgtt_mm_list:
        if mm.root_entry_type == GttType.PPGTT_ROOT_L4_ENTRY:
            if want[0] == mm.guest_pdps[0]:
                return mm
        elif want == mm.guest_pdps:
            return mm
    return None


def intel_vgpu_mm_get(mm: Mm) -> None:
    """``intel_vgpu_mm_get`` (``kref_get``)."""
    mm.ref += 1


def _intel_vgpu_mm_release(mm: Mm) -> None:
    """``_intel_vgpu_mm_release``: leave the lists, invalidate."""
    vgpu = mm.vgpu
    if mm.pincount:
        vgpu.error("vgpu mm pin count bug detected")
    if mm in vgpu.ppgtt_mm_list:
        vgpu.ppgtt_mm_list.remove(mm)
    with vgpu.gvt.ppgtt_mm_lock:
        vgpu.gvt.lru.pop(mm, None)
    invalidate_ppgtt_mm(mm)
    mm.released = True
    _emit(mm, "release")


def intel_vgpu_mm_put(mm: Mm) -> None:
    """``intel_vgpu_mm_put`` (``kref_put``): release at zero."""
    mm.ref -= 1
    if mm.ref == 0:
        _intel_vgpu_mm_release(mm)


def intel_vgpu_get_ppgtt_mm(vgpu: Vgpu, root_entry_type: GttType, pdps: Sequence[int]) -> Mm:
    """``intel_vgpu_get_ppgtt_mm``: find and take a reference, else create (and shadow)."""
    mm = intel_vgpu_find_ppgtt_mm(vgpu, pdps)
    if mm is not None:
        intel_vgpu_mm_get(mm)
        return mm
    try:
        return intel_vgpu_create_ppgtt_mm(vgpu, root_entry_type, pdps)
    except GvtError:
        vgpu.error("fail to create mm")
        raise


def intel_vgpu_put_ppgtt_mm(vgpu: Vgpu, pdps: Sequence[int]) -> None:
    """``intel_vgpu_put_ppgtt_mm``: -EINVAL if no mm matches, else drop a reference."""
    mm = intel_vgpu_find_ppgtt_mm(vgpu, pdps)
    if mm is None:
        vgpu.error("fail to find ppgtt instance.")
        raise GvtError("EINVAL", "no such ppgtt mm")
    intel_vgpu_mm_put(mm)


# ---- pin / unpin / reclaim -----------------------------------------------------------


def intel_vgpu_pin_mm(mm: Mm) -> None:
    """``intel_vgpu_pin_mm``: pincount++, shadow if needed, move to the LRU tail.

    A shadowing failure returns with the pin count still raised (as upstream).
    """
    mm.pincount += 1
    shadow_ppgtt_mm(mm)
    gvt = mm.vgpu.gvt
    with gvt.ppgtt_mm_lock:
        gvt.lru.pop(mm, None)
        gvt.lru[mm] = None


def intel_vgpu_unpin_mm(mm: Mm) -> None:
    """``intel_vgpu_unpin_mm``: pincount-- if positive."""
    if mm.pincount > 0:
        mm.pincount -= 1


def reclaim_one_ppgtt_mm(gvt: GvtDevice) -> bool:
    """``reclaim_one_ppgtt_mm``: unshadow the first unpinned mm of the LRU (it survives)."""
    with gvt.ppgtt_mm_lock:
        victim = next((mm for mm in gvt.lru if mm.pincount == 0), None)
        if victim is None:
            return False
        del gvt.lru[victim]
    vgpu = victim.vgpu
    vgpu.stats.reclaims += 1
    _emit(victim, "reclaim")
    invalidate_ppgtt_mm(victim)
    return True


def intel_vgpu_invalidate_ppgtt(vgpu: Vgpu) -> None:
    """``intel_vgpu_invalidate_ppgtt``: unshadow every mm of the vGPU (GT / DMLR reset)."""
    for mm in list(vgpu.ppgtt_mm_list):
        if mm.shadowed:
            with vgpu.gvt.ppgtt_mm_lock:
                vgpu.gvt.lru.pop(mm, None)
            invalidate_ppgtt_mm(mm)


def intel_vgpu_destroy_all_ppgtt_mm(vgpu: Vgpu) -> None:
    """``intel_vgpu_destroy_all_ppgtt_mm``: one put per mm, then free stray spts.

    ``intel_vgpu_destroy_mm`` is a single ``kref_put``: an mm with more
    references stays ("not fully destroyed").  The final ``ppgtt_free_all_spt``
    ("Why we still has spt not freed?") frees what is left in ``spt_tree``
    without releasing mappings.
    """
    from .shadow import ppgtt_free_spt

    for mm in list(vgpu.ppgtt_mm_list):
        intel_vgpu_mm_put(mm)
    if vgpu.ppgtt_mm_list:
        vgpu.error("vgpu ppgtt mm is not fully destroyed")
    if vgpu.spt_tree:
        vgpu.error("Why we still has spt not freed?")
        for spt in list(vgpu.spt_tree.values()):
            ppgtt_free_spt(spt)
