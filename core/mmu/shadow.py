"""Shadow pages, their hash, rmaps, accounting, unsync and zapping (arch/x86/kvm/mmu/mmu.c).

This module holds the shadow MMU's data structures and the operations on them;
the fault paths that drive them are in :mod:`pagetrack.mmu.fault`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import attrs

from .spte import (
    SPTE_A,
    SPTE_MMU_WRITABLE,
    SPTE_P,
    SPTE_U,
    SPTE_W,
    leaf_change_needs_tlb_flush,
    wrprot_for_tracking,
)
from .stats import MmuStats

if TYPE_CHECKING:
    from ..memory import MemSlot, MemSlots
    from ..page_track import AuditSink, WriteTrack

__all__ = [
    "KVM_PAGE_ARRAY_NR",
    "RMAP_RECYCLE_THRESHOLD",
    "Role",
    "ShadowMmu",
    "ShadowPage",
]

RMAP_RECYCLE_THRESHOLD = 1000
KVM_PAGE_ARRAY_NR = 16
SPTE_ENT_PER_PAGE = 512
_NONLEAF = SPTE_P | SPTE_W | SPTE_U | SPTE_A


@attrs.frozen
class Role:
    """``union kvm_mmu_page_role`` (the fields this model uses).

    ``invalid`` lives on :class:`ShadowPage` instead, because it changes while the
    role is used as a hash key.
    """

    level: int
    has_4_byte_gpte: bool = False
    quadrant: int = 0
    direct: bool = False
    access: int = 0b111
    passthrough: bool = False
    smm: int = 0


class ShadowPage:
    """``struct kvm_mmu_page``: one shadow page table of 512 SPTEs."""

    __slots__ = (
        "children",
        "gfn",
        "gfns",
        "id",
        "invalid",
        "mmu_valid_gen",
        "parent_ptes",
        "role",
        "root_count",
        "spt",
        "unsync",
        "unsync_child_bitmap",
        "unsync_children",
        "write_flooding_count",
    )

    def __init__(self, gfn: int, role: Role, gen: int, id_: int) -> None:
        self.gfn = gfn
        self.role = role
        self.spt = [0] * SPTE_ENT_PER_PAGE
        self.children: list[ShadowPage | None] = [None] * SPTE_ENT_PER_PAGE
        self.gfns = [0] * SPTE_ENT_PER_PAGE  # shadowed_translation: gfn per leaf SPTE
        self.parent_ptes: list[tuple[ShadowPage, int]] = []
        self.unsync = False
        self.unsync_children = 0
        self.unsync_child_bitmap = 0
        self.root_count = 0
        self.mmu_valid_gen = gen
        self.write_flooding_count = 0
        self.invalid = False
        self.id = id_

    @property
    def has_gptes(self) -> bool:
        """``sp_has_gptes``: neither direct nor passthrough."""
        return not self.role.direct and not self.role.passthrough

    def __repr__(self) -> str:
        r = self.role
        return f"<sp#{self.id} gfn={self.gfn:#x} L{r.level} q{r.quadrant}{' direct' if r.direct else ''}{' unsync' if self.unsync else ''}{' invalid' if self.invalid else ''}>"


class ShadowMmu:
    """The shadow-page state of one VM (``kvm->arch`` shadow MMU fields).

    ``flush(reason)`` is ``kvm_flush_remote_tlbs``; ``read_gpte(gpa, size)`` reads a
    guest entry for re-syncing unsync pages.
    """

    def __init__(
        self,
        memslots: MemSlots,
        write_track: WriteTrack,
        audit: AuditSink,
        stats: MmuStats,
        flush: Callable[[str], None],
    ) -> None:
        self.memslots = memslots
        self.write_track = write_track
        self.audit = audit
        self.stats = stats
        self.flush = flush
        self.hash: dict[int, list[ShadowPage]] = {}
        self.active: dict[ShadowPage, None] = {}  # insertion order: oldest first
        self.rmap: dict[tuple[int, int], list[tuple[ShadowPage, int]]] = {}
        self.mmu_valid_gen = 0
        self.indirect_shadow_pages = 0
        self._next_id = 0
        #: Re-syncs an unsync page from guest memory; set by the fault layer.
        self.sync_page: Callable[[ShadowPage], bool] = lambda sp: False

    # ---- iteration ------------------------------------------------------------
    def is_obsolete(self, sp: ShadowPage) -> bool:
        """``is_obsolete_sp``."""
        return sp.invalid or sp.mmu_valid_gen != self.mmu_valid_gen

    def valid_sps_with_gptes(self, gfn: int) -> Iterator[ShadowPage]:
        """``for_each_gfn_valid_sp_with_gptes``: a snapshot, safe against zaps."""
        for sp in list(self.hash.get(gfn, ())):
            if sp.gfn == gfn and sp.has_gptes and not self.is_obsolete(sp):
                yield sp

    def pages(self) -> list[ShadowPage]:
        """Every shadow page still on the active list (oldest first)."""
        return list(self.active)

    # ---- allocation and accounting -------------------------------------------
    def find_shadow_page(self, gfn: int, role: Role, invalid_list: list[ShadowPage]) -> ShadowPage | None:
        """``kvm_mmu_find_shadow_page``."""
        for sp in list(self.hash.get(gfn, ())):
            if sp.gfn != gfn or self.is_obsolete(sp):
                continue
            if sp.role != role:
                # An upper-level request for a gfn that has an unsync leaf page:
                # the gfn is a page table again, so the unsync page must go.
                if role.level > 1 and sp.unsync:
                    self.prepare_zap(sp, invalid_list, "sync")
                continue
            # An unsync match is synced in place but *not* marked synchronized: its
            # gfn is still writable, so only mmu_sync_children (which write-protects
            # it first) may clear ``unsync``.
            if sp.unsync and not self.sync_page(sp):
                self.prepare_zap(sp, invalid_list, "sync")
                continue
            sp.write_flooding_count = 0
            return sp
        self.stats.mmu_cache_miss += 1
        return None

    def get_shadow_page(self, gfn: int, role: Role) -> ShadowPage:
        """``kvm_mmu_get_shadow_page``: find, or allocate and account."""
        invalid_list: list[ShadowPage] = []
        sp = self.find_shadow_page(gfn, role, invalid_list)
        self.commit_zap(invalid_list)
        if sp is not None:
            return sp
        return self.alloc_shadow_page(gfn, role)

    def alloc_shadow_page(self, gfn: int, role: Role) -> ShadowPage:
        """``kvm_mmu_alloc_shadow_page``: new page at the bucket head; account it."""
        sp = ShadowPage(gfn, role, self.mmu_valid_gen, self._next_id)
        self._next_id += 1
        self.hash.setdefault(gfn, []).insert(0, sp)
        self.active[sp] = None
        if sp.has_gptes:
            self.account_shadowed(sp)
        return sp

    def account_shadowed(self, sp: ShadowPage) -> None:
        """``account_shadowed``: upper levels take a write-track count; level 1 does not."""
        self.indirect_shadow_pages += 1
        slot = self.memslots.gfn_to_memslot(sp.gfn, sp.role.smm)
        if slot is None:
            return
        if sp.role.level > 1:
            self.write_track.add(slot, sp.gfn, by="mmu")
            return
        self.write_track.disallow_lpage_add(slot, sp.gfn)
        if self.write_protect_gfn(slot, sp.gfn):
            self.flush("account_shadowed")

    def unaccount_shadowed(self, sp: ShadowPage) -> None:
        """``unaccount_shadowed``."""
        self.indirect_shadow_pages -= 1
        slot = self.memslots.gfn_to_memslot(sp.gfn, sp.role.smm)
        if slot is None:
            return
        if sp.role.level > 1:
            self.write_track.remove(slot, sp.gfn, by="mmu")
        else:
            self.write_track.allow_lpage(slot, sp.gfn)

    # ---- rmap -------------------------------------------------------------------
    def rmap_add(self, sp: ShadowPage, idx: int, gfn: int, level: int) -> None:
        """``rmap_add``: recycle (zap all) an rmap that already holds > 1000 SPTEs."""
        key = (gfn, level)
        entries = self.rmap.setdefault(key, [])
        had = len(entries)
        entries.append((sp, idx))
        self.stats.max_mmu_rmap_size = max(self.stats.max_mmu_rmap_size, had + 1)
        if had > RMAP_RECYCLE_THRESHOLD:
            for osp, oidx in list(entries):
                self.drop_spte(osp, oidx)
            self._zap_event(gfn, level, "rmap_recycle", had + 1)
            self.flush("rmap_recycle")

    def rmap_remove(self, sp: ShadowPage, idx: int) -> None:
        key = (sp.gfns[idx], sp.role.level)
        entries = self.rmap.get(key)
        if entries is None:
            return
        try:
            entries.remove((sp, idx))
        except ValueError:
            return
        if not entries:
            del self.rmap[key]

    def rmap_sptes(self, gfn: int, level: int) -> list[tuple[ShadowPage, int]]:
        """Leaf SPTEs mapping the frame of ``gfn`` at ``level``."""
        frame = gfn & ~((1 << (9 * (level - 1))) - 1)
        return list(self.rmap.get((frame, level), ()))

    def write_protect_gfn(self, slot: MemSlot, gfn: int) -> bool:
        """``kvm_mmu_slot_gfn_write_protect`` (shadow part): levels 4K, 2M, 1G.

        Applies shadow-page protection (clear W and MMU-writable) to every SPTE
        with either bit set; returns whether a TLB flush is needed.
        """
        flush = False
        for level in (1, 2, 3):
            for sp, idx in self.rmap_sptes(gfn, level):
                old = sp.spt[idx]
                if old & (SPTE_W | SPTE_MMU_WRITABLE):
                    new = wrprot_for_tracking(old)
                    sp.spt[idx] = new
                    flush |= leaf_change_needs_tlb_flush(old, new)
        return flush

    # ---- linking and unsync ------------------------------------------------------
    def link_shadow_page(self, parent: ShadowPage, idx: int, child: ShadowPage) -> None:
        """``__link_shadow_page``: point ``parent.spt[idx]`` at ``child``."""
        if parent.spt[idx] & SPTE_P:
            self.zap_pte(parent, idx)
        parent.spt[idx] = _NONLEAF | (child.gfn << 12)
        parent.children[idx] = child
        child.parent_ptes.append((parent, idx))
        if child.unsync_children or child.unsync:
            self.mark_unsync(parent, idx)

    def mark_unsync(self, sp: ShadowPage, idx: int) -> None:
        """``mark_unsync``: set the bit; propagate up while counts go 0 → 1."""
        bit = 1 << idx
        if sp.unsync_child_bitmap & bit:
            return
        sp.unsync_child_bitmap |= bit
        sp.unsync_children += 1
        if sp.unsync_children > 1:
            return
        self.mark_parents_unsync(sp)

    def mark_parents_unsync(self, sp: ShadowPage) -> None:
        """``kvm_mmu_mark_parents_unsync``."""
        for parent, idx in list(sp.parent_ptes):
            self.mark_unsync(parent, idx)

    def unsync_page(self, sp: ShadowPage) -> None:
        """``kvm_unsync_page``."""
        self.stats.mmu_unsync += 1
        sp.unsync = True
        self.mark_parents_unsync(sp)

    def _clear_unsync(self, sp: ShadowPage) -> None:
        """``kvm_unlink_unsync_page``: the page is in sync again."""
        if sp.unsync:
            sp.unsync = False
            self.stats.mmu_unsync -= 1

    def try_to_unsync_pages(self, slot: MemSlot, gfn: int, synchronizing: bool, prefetch: bool) -> int:
        """``mmu_try_to_unsync_pages``: 0 when the SPTE may be writable, else -errno."""
        if self.write_track.is_tracked(slot, gfn):
            return -1  # -EPERM
        for sp in self.valid_sps_with_gptes(gfn):
            if synchronizing:
                return -1  # -EPERM
            if sp.unsync:
                continue
            if prefetch:
                return -17  # -EEXIST
            assert sp.role.level == 1, "upper-level shadow pages are always write-tracked"
            self.unsync_page(sp)
        return 0

    def clear_child_unsync(self, parent: ShadowPage, idx: int) -> None:
        """``clear_unsync_child_bit``."""
        bit = 1 << idx
        if parent.unsync_child_bitmap & bit:
            parent.unsync_child_bitmap &= ~bit
            parent.unsync_children -= 1

    def collect_unsync(self, sp: ShadowPage, out: list[ShadowPage]) -> None:
        """``mmu_unsync_walk``: the unsync leaf pages below ``sp``, clearing stale bits."""
        bitmap = sp.unsync_child_bitmap
        while bitmap:
            idx = (bitmap & -bitmap).bit_length() - 1
            bitmap &= bitmap - 1
            child = sp.children[idx]
            if child is None or not sp.spt[idx] & SPTE_P:
                self.clear_child_unsync(sp, idx)
                continue
            if child.unsync_children:
                self.collect_unsync(child, out)
                if not child.unsync_children:
                    self.clear_child_unsync(sp, idx)
            elif child.unsync:
                out.append(child)
                self.clear_child_unsync(sp, idx)
            else:
                self.clear_child_unsync(sp, idx)

    def sync_children(self, root: ShadowPage) -> int:
        """``mmu_sync_children``: write-protect, flush, and re-sync every unsync leaf.

        Batches of ``KVM_PAGE_ARRAY_NR``.  Returns the number of pages synced.
        """
        pages: list[ShadowPage] = []
        self.collect_unsync(root, pages)
        done = 0
        for start in range(0, len(pages), KVM_PAGE_ARRAY_NR):
            batch = pages[start : start + KVM_PAGE_ARRAY_NR]
            flush = False
            for sp in batch:
                slot = self.memslots.gfn_to_memslot(sp.gfn, sp.role.smm)
                if slot is not None:
                    flush |= self.write_protect_gfn(slot, sp.gfn)
            if flush:
                self.flush("sync")
            invalid_list: list[ShadowPage] = []
            for sp in batch:
                if self.is_obsolete(sp):
                    continue
                self._clear_unsync(sp)
                if not self.sync_page(sp):
                    self.prepare_zap(sp, invalid_list, "sync")
                done += 1
            self.commit_zap(invalid_list)
        return done

    # ---- zapping -------------------------------------------------------------------
    def drop_spte(self, sp: ShadowPage, idx: int) -> bool:
        """``drop_spte`` of a leaf: clear it and remove it from the rmap."""
        old = sp.spt[idx]
        if not old & SPTE_P:
            return False
        self.rmap_remove(sp, idx)
        sp.spt[idx] = 0
        return True

    def drop_parent_pte(self, child: ShadowPage, parent: ShadowPage, idx: int) -> None:
        """``drop_parent_pte``: unlink ``child`` from ``parent.spt[idx]``."""
        with contextlib.suppress(ValueError):
            child.parent_ptes.remove((parent, idx))
        parent.spt[idx] = 0
        parent.children[idx] = None

    def zap_pte(self, sp: ShadowPage, idx: int) -> bool:
        """``mmu_page_zap_pte``: drop a leaf, or unlink a child page (which survives).

        Returns whether the old SPTE was shadow-present.
        """
        old = sp.spt[idx]
        if not old & SPTE_P:
            sp.spt[idx] = 0
            return False
        child = sp.children[idx]
        if child is not None:
            self.drop_parent_pte(child, sp, idx)
        else:
            self.drop_spte(sp, idx)
        return True

    def prepare_zap(self, sp: ShadowPage, invalid_list: list[ShadowPage], reason: str) -> None:
        """``__kvm_mmu_prepare_zap_page``."""
        self.stats.mmu_shadow_zapped += 1
        if sp.role.level > 1 and not sp.invalid:
            children: list[ShadowPage] = []
            self.collect_unsync(sp, children)
            for child in children:
                self.prepare_zap(child, invalid_list, reason)
        present = 0
        for idx in range(SPTE_ENT_PER_PAGE):
            if sp.spt[idx]:
                present += self.zap_pte(sp, idx)
        for parent, idx in list(sp.parent_ptes):
            self.drop_parent_pte(sp, parent, idx)
        if not sp.invalid and sp.has_gptes:
            self.unaccount_shadowed(sp)
        self._clear_unsync(sp)
        if sp.root_count == 0:
            if sp not in invalid_list:
                invalid_list.append(sp)
        else:
            self.active.pop(sp, None)
        sp.invalid = True
        self._zap_event(sp.gfn, sp.role.level, reason, present)

    def commit_zap(self, invalid_list: list[ShadowPage]) -> None:
        """``kvm_mmu_commit_zap_page``: flush remote TLBs, then free the pages."""
        if not invalid_list:
            return
        self.flush("commit_zap")
        for sp in invalid_list:
            self.free_page(sp)
        invalid_list.clear()

    def free_page(self, sp: ShadowPage) -> None:
        """``kvm_mmu_free_shadow_page``: leave the hash and the active list."""
        bucket = self.hash.get(sp.gfn)
        if bucket is not None and sp in bucket:
            bucket.remove(sp)
            if not bucket:
                del self.hash[sp.gfn]
        self.active.pop(sp, None)

    def zap_all_fast(self) -> int:
        """``kvm_mmu_zap_all_fast``: toggle the generation, then zap obsolete pages oldest first."""
        self.mmu_valid_gen ^= 1
        invalid_list: list[ShadowPage] = []
        zapped = 0
        for sp in list(self.active):
            if not self.is_obsolete(sp):
                break
            if sp.invalid:
                continue
            self.prepare_zap(sp, invalid_list, "zap_all_fast")
            zapped += 1
        self.commit_zap(invalid_list)
        return zapped

    def zap_gfn(self, gfn: int, reason: str) -> bool:
        """Zap every valid shadow page with gptes at ``gfn`` (``kvm_mmu_unprotect_gfn_and_retry``)."""
        invalid_list: list[ShadowPage] = []
        zapped = 0
        for sp in self.valid_sps_with_gptes(gfn):
            self.prepare_zap(sp, invalid_list, reason)
            zapped += 1
        self.commit_zap(invalid_list)
        return zapped > 0

    def put_root(self, sp: ShadowPage) -> None:
        """``mmu_free_root_page``: drop a root reference; free an invalid root at zero."""
        sp.root_count -= 1
        if sp.root_count == 0 and sp.invalid:
            self.free_page(sp)

    def _zap_event(self, gfn: int, level: int, reason: str, sptes: int) -> None:
        if self.audit.debug:
            self.audit.emit("zap", "debug", gfn=gfn, pg_level=level, reason=reason, sptes=sptes)
