"""Write-track counters and large-page disallow counts (arch/x86/kvm/mmu/page_track.c).

Models KVM 6.9+ (the 6.6 API with on-demand allocation):

* every gfn of a memslot has a 16-bit counter (``slot->arch.gfn_write_track``), a
  numpy ``uint16`` array allocated only once write tracking is enabled for the VM
  (``kvm_page_track_write_tracking_enabled``: shadow paging, a first shadow root,
  or an external tracker);
* ``disallow_lpage`` counts per 2 MiB and 1 GiB frame (``lpage_info``), with the
  edge rules of ``kvm_alloc_memslot_metadata``;
* add/remove with the kernel's order of effects and its WARNs.

Write-protecting SPTEs belongs to the MMU; this layer calls the two functions it
is given (``write_protect`` and ``flush``), so it never imports the MMU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from .errors import KvmError
from .memory import PAGE_SHIFT, MemSlot, MemSlots

__all__ = [
    "KVM_NR_HUGE_LEVELS",
    "TRACK_MAX",
    "AuditSink",
    "WriteTrack",
    "hpage_index",
    "pages_per_hpage",
]

TRACK_MAX = 0xFFFF  # USHRT_MAX
KVM_NR_HUGE_LEVELS = 2  # PG_LEVEL_2M, PG_LEVEL_1G


class AuditSink(Protocol):
    """What the tracking layers need of an audit log (``pagetrack.audit.AuditLog``)."""

    @property
    def enabled(self) -> bool: ...

    @property
    def debug(self) -> bool: ...

    def emit(self, event: str, level: str = "info", **fields: object) -> None: ...


def pages_per_hpage(level: int) -> int:
    """``KVM_PAGES_PER_HPAGE(level)``: 1, 512, 262144 for levels 1, 2, 3."""
    return 1 << (9 * (level - 1))


def hpage_index(gfn: int, base_gfn: int, level: int) -> int:
    """``gfn_to_index``: index of gfn's frame at ``level`` within a slot."""
    shift = 9 * (level - 1)
    return (gfn >> shift) - (base_gfn >> shift)


class WriteTrack:
    """Per-VM write tracking state and API.

    ``write_protect(slot, gfn) -> bool`` must apply shadow-page protection to
    every SPTE mapping ``gfn`` at every level and say whether a TLB flush is
    needed (``kvm_mmu_slot_gfn_write_protect``); ``flush(reason)`` is
    ``kvm_flush_remote_tlbs``.
    """

    def __init__(
        self,
        memslots: MemSlots,
        audit: AuditSink,
        *,
        tdp_enabled: bool,
        write_protect: Callable[[MemSlot, int], bool] | None = None,
        flush: Callable[[str], None] | None = None,
    ) -> None:
        self.memslots = memslots
        self.audit = audit
        self.tdp_enabled = tdp_enabled
        self.external_write_tracking_enabled = False
        self.shadow_root_allocated = False
        self.write_protect = write_protect or (lambda slot, gfn: False)
        self.flush = flush or (lambda reason: None)
        self.vm_bugged = False
        self._warned: set[str] = set()

    # ---- enablement (kvm_page_track_write_tracking_enabled) -------------------
    @property
    def enabled(self) -> bool:
        """``kvm_page_track_write_tracking_enabled`` (6.9+)."""
        return self.external_write_tracking_enabled or self.shadow_root_allocated or not self.tdp_enabled

    def _alloc_all(self) -> None:
        for slot in self.memslots.all_slots():
            self.alloc_slot(slot)

    def enable_external(self) -> None:
        """``kvm_enable_external_write_tracking``: sticky; arrays for every slot."""
        if not self.enabled:
            self._alloc_all()
        self.external_write_tracking_enabled = True

    def first_shadow_root_alloc(self) -> None:
        """``mmu_first_shadow_root_alloc``: arrays for every slot, then the sticky flag."""
        if self.shadow_root_allocated:
            return
        if not self.enabled:
            self._alloc_all()
        self.shadow_root_allocated = True

    # ---- metadata (kvm_alloc_memslot_metadata / kvm_page_track_create_memslot) -
    def alloc_slot(self, slot: MemSlot) -> None:
        """``kvm_page_track_write_tracking_alloc``: idempotent zeroed counter array."""
        if slot.arch.gfn_write_track is None:
            slot.arch.gfn_write_track = np.zeros(slot.npages, dtype=np.uint16)

    def create_slot_metadata(self, slot: MemSlot) -> None:
        """``kvm_alloc_memslot_metadata``: lpage_info with the edge rules; counters if enabled."""
        infos = []
        hva_gfn = slot.userspace_addr >> PAGE_SHIFT
        for level in (2, 3):
            per = pages_per_hpage(level)
            last = hpage_index(slot.base_gfn + slot.npages - 1, slot.base_gfn, level)
            info = np.zeros(last + 1, dtype=np.int32)
            if slot.base_gfn & (per - 1):
                info[0] = 1
            if (slot.base_gfn + slot.npages) & (per - 1):
                info[last] = 1
            if (slot.base_gfn ^ hva_gfn) & (per - 1):
                info[:] = 1
            infos.append(info)
        slot.arch.lpage_info = infos
        slot.arch.gfn_write_track = None
        if self.enabled:
            self.alloc_slot(slot)

    # ---- queries -------------------------------------------------------------
    def is_tracked(self, slot: MemSlot | None, gfn: int) -> bool:
        """``kvm_gfn_is_write_tracked``: false without a slot or without arrays."""
        if slot is None:
            return False
        arr = slot.arch.gfn_write_track
        if arr is None:
            return False
        return bool(arr[gfn - slot.base_gfn])

    def count(self, slot: MemSlot, gfn: int) -> int:
        """The counter value (0 when no array exists)."""
        arr = slot.arch.gfn_write_track
        return 0 if arr is None else int(arr[gfn - slot.base_gfn])

    def disallow_lpage(self, slot: MemSlot, gfn: int, level: int) -> int:
        """``lpage_info_slot(gfn, slot, level)->disallow_lpage``."""
        return int(slot.arch.lpage_info[level - 2][hpage_index(gfn, slot.base_gfn, level)])

    def max_mapping_level(self, slot: MemSlot, gfn: int, max_level: int = 3) -> int:
        """``__kvm_mmu_max_mapping_level`` (lpage part): largest level whose frame is allowed."""
        for level in range(max_level, 1, -1):
            per = pages_per_hpage(level)
            start = gfn & ~(per - 1)
            # The frame must lie inside the slot and nobody may disallow it.
            if start < slot.base_gfn or start + per > slot.end_gfn:
                continue
            if self.disallow_lpage(slot, gfn, level) == 0:
                return level
        return 1

    # ---- counter helpers -----------------------------------------------------
    def _warn_once(self, site: str) -> bool:
        """``WARN_ON_ONCE``: true the first time a site fires in this VM."""
        if site in self._warned:
            return False
        self._warned.add(site)
        return True

    def _update_track(self, slot: MemSlot, gfn: int, delta: int, by: str) -> None:
        """``update_gfn_write_track``: refuse (and WARN once) past 0 or 65535."""
        arr = slot.arch.gfn_write_track
        assert arr is not None
        i = gfn - slot.base_gfn
        val = int(arr[i])
        new = val + delta
        if new < 0 or new > TRACK_MAX:
            warned = self._warn_once("update_gfn_write_track")
            if self.audit.enabled:
                self.audit.emit(
                    "track_warn",
                    "warning",
                    gfn=gfn,
                    op="add" if delta > 0 else "remove",
                    count=val,
                    by=by,
                    warned=warned,
                )
            return
        arr[i] = new
        if self.audit.enabled:
            self.audit.emit("track_add" if delta > 0 else "track_remove", gfn=gfn, count=new, by=by)

    def _update_lpage(self, slot: MemSlot, gfn: int, delta: int) -> None:
        """``update_gfn_disallow_lpage_count`` for the 2 MiB and 1 GiB frames."""
        for level in (2, 3):
            info = slot.arch.lpage_info[level - 2]
            i = hpage_index(gfn, slot.base_gfn, level)
            new = int(info[i]) + delta
            if new < 0:
                self._warn_once("update_gfn_disallow_lpage_count")
            info[i] = new

    def disallow_lpage_add(self, slot: MemSlot, gfn: int) -> None:
        """``kvm_mmu_gfn_disallow_lpage``."""
        self._update_lpage(slot, gfn, 1)

    def allow_lpage(self, slot: MemSlot, gfn: int) -> None:
        """``kvm_mmu_gfn_allow_lpage``."""
        self._update_lpage(slot, gfn, -1)

    # ---- internal add/remove (__kvm_write_track_add_gfn / _remove_gfn) -------
    def _check_enabled(self) -> bool:
        if self.enabled:
            return True
        # KVM_BUG_ON: WARN once and mark the VM dead; nothing changes.
        self._warn_once("kvm_write_track_not_enabled")
        self.vm_bugged = True
        if self.audit.enabled:
            self.audit.emit("vm_bugged", "error", reason="write tracking not enabled")
        return False

    def add(self, slot: MemSlot, gfn: int, by: str = "mmu") -> None:
        """``__kvm_write_track_add_gfn``: counter, lpage, write-protect, flush — in that order."""
        if not self._check_enabled():
            return
        self._update_track(slot, gfn, 1, by)
        self.disallow_lpage_add(slot, gfn)
        if self.write_protect(slot, gfn):
            self.flush("track_add")

    def remove(self, slot: MemSlot, gfn: int, by: str = "mmu") -> None:
        """``__kvm_write_track_remove_gfn``: counter, lpage; no SPTE change, no flush."""
        if not self._check_enabled():
            return
        self._update_track(slot, gfn, -1, by)
        self.allow_lpage(slot, gfn)

    # ---- exported add/remove (kvm_write_track_add_gfn / _remove_gfn) ---------
    def add_gfn(self, gfn: int) -> int:
        """``kvm_write_track_add_gfn``: address space 0 only; ``-EINVAL`` without a slot."""
        slot = self.memslots.gfn_to_memslot(gfn, 0)
        if slot is None:
            raise KvmError("EINVAL", f"gfn {gfn:#x} is not in any memslot")
        self.add(slot, gfn, by="external")
        return 0

    def remove_gfn(self, gfn: int) -> int:
        """``kvm_write_track_remove_gfn``: ``-EINVAL`` without a slot, else 0."""
        slot = self.memslots.gfn_to_memslot(gfn, 0)
        if slot is None:
            raise KvmError("EINVAL", f"gfn {gfn:#x} is not in any memslot")
        self.remove(slot, gfn, by="external")
        return 0
