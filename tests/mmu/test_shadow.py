"""Shadow pages: accounting, unsync, rmap recycle, zapping (mmu.c).

Spec: kvm-page-track.md §2.8–§2.10, §4.6–§4.7, §5 (zap_all_fast) and §7 cases
39–46, 56–58.  Shadow pages are built by hand through :class:`ShadowMmu`, which
is what the fault path does too (``kvm_mmu_get_shadow_page`` + ``link``).
"""

from __future__ import annotations

import pytest
from pagetrack.audit import AuditLog
from pagetrack.mmu import (
    RMAP_RECYCLE_THRESHOLD,
    SPTE_HOST_WRITABLE,
    SPTE_MMU_WRITABLE,
    SPTE_P,
    SPTE_W,
    Role,
)
from track_helpers import Recorder, build_chain, make_vm, slot_of

EPERM, EEXIST = -1, -17
# guest page tables of a 4-level chain (gfns), and a data gfn
PML4, PDPT, PD, PT = 0x10, 0x11, 0x12, 0x13
DATA = 0x40


@pytest.fixture
def vm():
    v = make_vm(False, audit=AuditLog.in_memory("shadow", "debug"))
    v.add_memory(0, 0x400000)  # gfns 0..0x3ff
    yield v
    v.close()


def lpage2(vm, gfn: int) -> int:
    return vm.write_track.disallow_lpage(slot_of(vm, gfn), gfn, 2)


def writable_leaf(vm, gfn: int, host_sp_gfn: int = 0x300, idx: int = 0):
    """A writable 4K leaf SPTE mapping ``gfn``, in a direct page (no accounting)."""
    sp = vm.mmu.shadow.get_shadow_page(host_sp_gfn, Role(level=1, direct=True))
    sp.spt[idx] = SPTE_P | SPTE_W | SPTE_MMU_WRITABLE | SPTE_HOST_WRITABLE | (gfn << 12)
    sp.gfns[idx] = gfn
    vm.mmu.shadow.rmap_add(sp, idx, gfn, 1)
    return sp


# ---- cases 39–42: mmu_try_to_unsync_pages ----------------------------------------------------

def test_case_39_tracked_gfn_refuses_unsync_and_make_spte_is_read_only(vm) -> None:
    vcpu = vm.create_vcpu()
    vm.write_track_add_gfn(PT)
    slot = slot_of(vm, PT)
    assert vm.mmu.shadow.try_to_unsync_pages(slot, PT, False, False) == EPERM  # no shadow page at all
    l1 = vm.mmu.shadow.alloc_shadow_page(PT, Role(level=1))
    assert vm.mmu.shadow.try_to_unsync_pages(slot, PT, False, False) == EPERM
    assert not l1.unsync
    spte, wrprot = vm.mmu.make_spte(vcpu, slot, PT, 1, True, 0)
    assert wrprot
    assert spte & SPTE_P and spte & SPTE_HOST_WRITABLE
    assert not spte & (SPTE_W | SPTE_MMU_WRITABLE)


def test_case_40_unsync_marks_parents_up_to_the_first_ancestor_with_children(vm) -> None:
    l4, l3, l2, l1 = build_chain(vm, (PML4, PDPT, PD, PT))
    # give L3 an unsync child already (another L2 under index 7 with an unsync L1)
    other_l2 = vm.mmu.shadow.alloc_shadow_page(0x20, Role(level=2))
    other_l1 = vm.mmu.shadow.alloc_shadow_page(0x21, Role(level=1))
    vm.mmu.shadow.link_shadow_page(l3, 7, other_l2)
    vm.mmu.shadow.link_shadow_page(other_l2, 3, other_l1)
    assert vm.mmu.shadow.try_to_unsync_pages(slot_of(vm, 0x21), 0x21, False, False) == 0
    assert (l3.unsync_children, l3.unsync_child_bitmap) == (1, 1 << 7)
    assert (l4.unsync_children, l4.unsync_child_bitmap) == (1, 1 << 0)
    stat = vm.mmu.stats.mmu_unsync
    assert vm.mmu.shadow.try_to_unsync_pages(slot_of(vm, PT), PT, False, False) == 0
    assert l1.unsync
    assert vm.mmu.stats.mmu_unsync == stat + 1
    assert (l2.unsync_children, l2.unsync_child_bitmap) == (1, 1 << 0)
    assert (l3.unsync_children, l3.unsync_child_bitmap) == (2, 1 << 7 | 1 << 0)
    assert (l4.unsync_children, l4.unsync_child_bitmap) == (1, 1 << 0)  # stopped at L3
    # and a writable SPTE may now map PT
    spte, wrprot = vm.mmu.make_spte(vm.create_vcpu(), slot_of(vm, PT), PT, 1, True, 0)
    assert not wrprot and spte & SPTE_W and spte & SPTE_MMU_WRITABLE


def test_case_41_prefetch_is_eexist_and_synchronizing_is_eperm(vm) -> None:
    *_, l1 = build_chain(vm, (PML4, PDPT, PD, PT))
    slot = slot_of(vm, PT)
    assert vm.mmu.shadow.try_to_unsync_pages(slot, PT, False, True) == EEXIST
    assert not l1.unsync and vm.mmu.stats.mmu_unsync == 0
    assert vm.mmu.shadow.try_to_unsync_pages(slot, PT, True, False) == EPERM
    assert not l1.unsync
    spte, wrprot = vm.mmu.make_spte(vm.create_vcpu(), slot, PT, 1, True, 0, prefetch=True)
    assert wrprot and not spte & SPTE_W
    # a gfn without shadow pages may always be writable
    assert vm.mmu.shadow.try_to_unsync_pages(slot, DATA, True, True) == 0


def test_case_42_all_pages_already_unsync_is_0_even_for_prefetch(vm) -> None:
    *_, l1 = build_chain(vm, (PML4, PDPT, PD, PT))
    other = vm.mmu.shadow.alloc_shadow_page(PT, Role(level=1, access=0b011))  # same gfn, other role
    slot = slot_of(vm, PT)
    assert vm.mmu.shadow.try_to_unsync_pages(slot, PT, False, False) == 0
    assert l1.unsync and other.unsync
    stat = vm.mmu.stats.mmu_unsync
    assert vm.mmu.shadow.try_to_unsync_pages(slot, PT, False, True) == 0
    assert vm.mmu.stats.mmu_unsync == stat


# ---- cases 43–46: account_shadowed / unaccount_shadowed ---------------------------------------

def test_case_43_level_2_page_counts_disallows_and_write_protects(vm) -> None:
    leaf = writable_leaf(vm, PD)
    n, count, lp = vm.mmu.shadow.indirect_shadow_pages, vm.write_track_count(PD), lpage2(vm, PD)
    flushes = vm.mmu.stats.remote_tlb_flush
    vm.mmu.shadow.alloc_shadow_page(PD, Role(level=2))
    assert vm.mmu.shadow.indirect_shadow_pages == n + 1
    assert vm.write_track_count(PD) == count + 1
    assert vm.gfn_is_write_tracked(PD)
    assert lpage2(vm, PD) == lp + 1
    assert not leaf.spt[0] & (SPTE_W | SPTE_MMU_WRITABLE)
    assert vm.mmu.stats.remote_tlb_flush == flushes + 1
    # a second upper-level page (another role) for the same table counts again
    vm.mmu.shadow.alloc_shadow_page(PD, Role(level=3))
    assert vm.write_track_count(PD) == count + 2
    assert vm.mmu.stats.remote_tlb_flush == flushes + 1  # nothing left to protect


def test_case_44_level_1_page_write_protects_but_does_not_count(vm) -> None:
    leaf = writable_leaf(vm, PT)
    n, lp = vm.mmu.shadow.indirect_shadow_pages, lpage2(vm, PT)
    flushes = vm.mmu.stats.remote_tlb_flush
    vm.mmu.shadow.alloc_shadow_page(PT, Role(level=1))
    assert vm.mmu.shadow.indirect_shadow_pages == n + 1
    assert vm.write_track_count(PT) == 0 and not vm.gfn_is_write_tracked(PT)
    assert lpage2(vm, PT) == lp + 1
    assert not leaf.spt[0] & (SPTE_W | SPTE_MMU_WRITABLE)
    assert vm.mmu.stats.remote_tlb_flush == flushes + 1
    # nothing writable left: no flush for a second level-1 page
    vm.mmu.shadow.alloc_shadow_page(PT, Role(level=1, access=0b011))
    assert vm.mmu.stats.remote_tlb_flush == flushes + 1


@pytest.mark.parametrize("role", [Role(level=2, direct=True), Role(level=1, direct=True),
                                  Role(level=2, passthrough=True)], ids=["direct2", "direct1", "passthrough"])
def test_case_45_direct_and_passthrough_pages_account_nothing(vm, role) -> None:
    leaf = writable_leaf(vm, PD, host_sp_gfn=0x301)
    before = (vm.mmu.shadow.indirect_shadow_pages, vm.write_track_count(PD), lpage2(vm, PD))
    sp = vm.mmu.shadow.alloc_shadow_page(PD, role)
    assert not sp.has_gptes
    assert (vm.mmu.shadow.indirect_shadow_pages, vm.write_track_count(PD), lpage2(vm, PD)) == before
    assert leaf.spt[0] & SPTE_W
    invalid: list = []
    vm.mmu.shadow.prepare_zap(sp, invalid, "test")
    vm.mmu.shadow.commit_zap(invalid)
    assert (vm.mmu.shadow.indirect_shadow_pages, vm.write_track_count(PD), lpage2(vm, PD)) == before
    assert sp not in vm.mmu.shadow.pages()


def test_case_46_zapping_a_level_2_page_unaccounts_once(vm) -> None:
    before = (vm.mmu.shadow.indirect_shadow_pages, vm.write_track_count(PD), lpage2(vm, PD))
    sp = vm.mmu.shadow.alloc_shadow_page(PD, Role(level=2))
    sp.root_count = 1  # a root in use: prepared, not freed, can be prepared again
    invalid: list = []
    vm.mmu.shadow.prepare_zap(sp, invalid, "test")
    assert sp.invalid
    assert (vm.mmu.shadow.indirect_shadow_pages, vm.write_track_count(PD), lpage2(vm, PD)) == before
    vm.mmu.shadow.prepare_zap(sp, invalid, "again")
    assert (vm.mmu.shadow.indirect_shadow_pages, vm.write_track_count(PD), lpage2(vm, PD)) == before
    assert not any(e["event"] == "track_warn" for e in vm.audit.events)
    assert vm.write_track_count(PD) == 0


def test_case_46_level_1_unaccount_only_allows_lpage(vm) -> None:
    vm.write_track_add_gfn(PT)  # an external-style count on the same gfn
    sp = vm.mmu.shadow.alloc_shadow_page(PT, Role(level=1))
    assert (vm.write_track_count(PT), lpage2(vm, PT)) == (1, 2)
    vm.mmu.shadow.zap_gfn(PT, "test")
    assert sp.invalid
    assert (vm.write_track_count(PT), lpage2(vm, PT)) == (1, 1)
    assert vm.mmu.shadow.indirect_shadow_pages == 0


# ---- case 56: zapping a non-leaf SPTE unlinks the child -----------------------------------------

def test_case_56_zap_pte_of_a_non_leaf_unlinks_the_child_which_survives(vm) -> None:
    _l4, _l3, l2, l1 = build_chain(vm, (PML4, PDPT, PD, PT))
    assert (l2, 0) in l1.parent_ptes
    assert vm.mmu.shadow.zap_pte(l2, 0) is True
    assert l2.spt[0] == 0 and l2.children[0] is None
    assert l1.parent_ptes == []
    assert not l1.invalid and l1 in vm.mmu.shadow.pages()
    assert l1 in list(vm.mmu.shadow.valid_sps_with_gptes(PT))


def test_zap_pte_of_a_leaf_drops_it_from_the_rmap(vm) -> None:
    sp = writable_leaf(vm, DATA)
    assert vm.mmu.shadow.rmap_sptes(DATA, 1) == [(sp, 0)]
    assert vm.mmu.shadow.zap_pte(sp, 0) is True
    assert sp.spt[0] == 0 and vm.mmu.shadow.rmap_sptes(DATA, 1) == []
    assert vm.mmu.shadow.zap_pte(sp, 0) is False  # not present: nothing


def test_prepare_zap_unlinks_children_and_parents_then_commit_frees_and_flushes(vm) -> None:
    _l4, l3, l2, l1 = build_chain(vm, (PML4, PDPT, PD, PT))
    flushes = vm.mmu.stats.remote_tlb_flush
    invalid: list = []
    vm.mmu.shadow.prepare_zap(l2, invalid, "test")
    assert l2.invalid and invalid == [l2]
    assert l3.spt[0] == 0 and l1.parent_ptes == [] and l2.parent_ptes == []
    assert vm.write_track_count(PD) == 0
    assert l2 in vm.mmu.shadow.hash[PD]  # stays hashed until the commit
    assert list(vm.mmu.shadow.valid_sps_with_gptes(PD)) == []  # but is skipped
    vm.mmu.shadow.commit_zap(invalid)
    assert vm.mmu.stats.remote_tlb_flush == flushes + 1
    assert PD not in vm.mmu.shadow.hash and l2 not in vm.mmu.shadow.pages()
    assert not l1.invalid  # the child is not zapped with its parent


def test_prepare_zap_of_upper_page_zaps_its_unsync_children(vm) -> None:
    _l4, _l3, l2, l1 = build_chain(vm, (PML4, PDPT, PD, PT))
    vm.mmu.shadow.try_to_unsync_pages(slot_of(vm, PT), PT, False, False)
    assert l1.unsync and vm.mmu.stats.mmu_unsync == 1
    invalid: list = []
    vm.mmu.shadow.prepare_zap(l2, invalid, "test")
    assert l1.invalid and not l1.unsync and vm.mmu.stats.mmu_unsync == 0
    vm.mmu.shadow.commit_zap(invalid)


# ---- case 57: rmap recycle -------------------------------------------------------------------

def _fill_rmap(vm, gfn: int, n: int) -> list:
    pages = []
    shadow = vm.mmu.shadow
    for i in range(n):
        if i % 512 == 0:
            pages.append(shadow.alloc_shadow_page(0x200 + len(pages), Role(level=1, direct=True)))
        sp, idx = pages[-1], i % 512
        sp.spt[idx] = SPTE_P | SPTE_HOST_WRITABLE | (gfn << 12)
        sp.gfns[idx] = gfn
        shadow.rmap_add(sp, idx, gfn, 1)
    return pages


def test_case_57_rmap_with_1001_entries_is_recycled_on_the_next_add(vm) -> None:
    pages = _fill_rmap(vm, DATA, RMAP_RECYCLE_THRESHOLD + 1)
    assert len(vm.mmu.shadow.rmap_sptes(DATA, 1)) == 1001
    flushes = vm.mmu.stats.remote_tlb_flush
    _fill_rmap_one(vm, pages, DATA, 1001)
    assert vm.mmu.shadow.rmap_sptes(DATA, 1) == []
    assert all(sp.spt[i] == 0 for sp in pages for i in range(512))
    assert vm.mmu.stats.remote_tlb_flush == flushes + 1
    assert vm.mmu.stats.max_mmu_rmap_size == 1002


def _fill_rmap_one(vm, pages, gfn: int, i: int) -> None:
    sp, idx = pages[i // 512], i % 512
    sp.spt[idx] = SPTE_P | SPTE_HOST_WRITABLE | (gfn << 12)
    sp.gfns[idx] = gfn
    vm.mmu.shadow.rmap_add(sp, idx, gfn, 1)


def test_case_57_rmap_with_1000_entries_accepts_one_more(vm) -> None:
    pages = _fill_rmap(vm, DATA, RMAP_RECYCLE_THRESHOLD)
    flushes = vm.mmu.stats.remote_tlb_flush
    _fill_rmap_one(vm, pages, DATA, 1000)
    assert len(vm.mmu.shadow.rmap_sptes(DATA, 1)) == 1001
    assert vm.mmu.stats.remote_tlb_flush == flushes
    assert pages[1].spt[1000 % 512] & SPTE_P


# ---- case 58: kvm_mmu_zap_all_fast --------------------------------------------------------------

def test_case_58_zap_all_fast_obsoletes_everything_and_keeps_external_counts(vm) -> None:
    vm.register_tracker(Recorder(), "ext")
    l4, l3, l2, l1 = build_chain(vm, (PML4, PDPT, PD, PT))
    l4.root_count = 1  # a vCPU's root: unaccounted now, freed when released
    vm.write_track_add_gfn(PD)  # external
    vm.write_track_add_gfn(DATA)  # external
    assert [vm.write_track_count(g) for g in (PML4, PDPT, PD, PT, DATA)] == [1, 1, 2, 0, 1]
    gen = vm.mmu.shadow.mmu_valid_gen
    vm.mmu.zap_all_fast()
    assert vm.mmu.shadow.mmu_valid_gen == gen ^ 1
    assert all(vm.mmu.shadow.is_obsolete(sp) for sp in (l4, l3, l2, l1))
    assert [vm.write_track_count(g) for g in (PML4, PDPT, PD, PT, DATA)] == [0, 0, 1, 0, 1]
    assert vm.mmu.shadow.indirect_shadow_pages == 0
    assert vm.mmu.shadow.pages() == []
    for g in (PML4, PDPT, PD, PT):
        assert list(vm.mmu.shadow.valid_sps_with_gptes(g)) == []
    assert l4 in vm.mmu.shadow.hash[PML4]  # the root survives until put
    vm.mmu.shadow.put_root(l4)
    assert PML4 not in vm.mmu.shadow.hash


def test_case_58_obsolete_pages_are_invisible_to_unsync(vm) -> None:
    *_, l1 = build_chain(vm, (PML4, PDPT, PD, PT))
    vm.mmu.zap_all_fast()
    assert vm.mmu.shadow.try_to_unsync_pages(slot_of(vm, PT), PT, False, True) == 0
    assert not l1.unsync


# ---- kvm_mmu_find_shadow_page -------------------------------------------------------------------

def test_find_reuses_a_matching_page_and_resets_flooding(vm) -> None:
    sp = vm.mmu.shadow.get_shadow_page(PD, Role(level=2))
    sp.write_flooding_count = 2
    misses = vm.mmu.stats.mmu_cache_miss
    assert vm.mmu.shadow.get_shadow_page(PD, Role(level=2)) is sp
    assert sp.write_flooding_count == 0
    assert vm.mmu.stats.mmu_cache_miss == misses
    assert vm.write_track_count(PD) == 1  # not accounted twice
    other = vm.mmu.shadow.get_shadow_page(PD, Role(level=2, access=0b101))
    assert other is not sp and vm.mmu.stats.mmu_cache_miss == misses + 1


def test_find_upper_level_zaps_an_unsync_page_of_the_same_gfn(vm) -> None:
    *_, l1 = build_chain(vm, (PML4, PDPT, PD, PT))
    vm.mmu.shadow.try_to_unsync_pages(slot_of(vm, PT), PT, False, False)
    assert l1.unsync
    up = vm.mmu.shadow.get_shadow_page(PT, Role(level=2))
    assert l1.invalid and not up.invalid
    assert vm.write_track_count(PT) == 1


def test_find_keeps_a_matching_unsync_page_unsync_after_syncing_it(vm) -> None:
    """``kvm_mmu_find_shadow_page`` syncs an unsync match in place but does not mark it
    synchronized (its gfn stays writable; only mmu_sync_children write-protects)."""
    _l4, _l3, l2, l1 = build_chain(vm, (PML4, PDPT, PD, PT))
    vm.mmu.shadow.try_to_unsync_pages(slot_of(vm, PT), PT, False, False)
    vm.mmu.shadow.zap_pte(l2, 0)  # unlink: l2 forgets its unsync child
    synced: list = []
    real = vm.mmu.shadow.sync_page
    vm.mmu.shadow.sync_page = lambda sp: (synced.append(sp), real(sp))[1]
    again = vm.mmu.shadow.get_shadow_page(PT, Role(level=1))
    assert again is l1 and synced == [l1]
    assert l1.unsync and vm.mmu.stats.mmu_unsync == 1
    vm.mmu.shadow.link_shadow_page(l2, 0, l1)
    assert l2.unsync_child_bitmap == 1 and l2.unsync_children == 1


def test_sync_children_write_protects_and_resyncs(vm) -> None:
    l4, l3, l2, l1 = build_chain(vm, (PML4, PDPT, PD, PT))
    vm.mmu.shadow.try_to_unsync_pages(slot_of(vm, PT), PT, False, False)
    leaf = writable_leaf(vm, PT)
    flushes = vm.mmu.stats.remote_tlb_flush
    assert vm.mmu.shadow.sync_children(l4) == 1
    assert not l1.unsync and vm.mmu.stats.mmu_unsync == 0
    assert not leaf.spt[0] & (SPTE_W | SPTE_MMU_WRITABLE)
    assert vm.mmu.stats.remote_tlb_flush == flushes + 1
    assert (l4.unsync_children, l3.unsync_children, l2.unsync_children) == (0, 0, 0)


# ---- address spaces (role.smm) ------------------------------------------------------------------

def test_case_43_smm_page_is_accounted_in_the_smm_address_space(vm) -> None:
    """account_shadowed looks the slot up in the address space of ``sp->role.smm``."""
    hva = vm.host.mmap(0x10000)
    vm.set_user_memory_region(1 << 16, 0, 0x800000, 0x10000, hva)
    smm_slot = vm.memslots.get(1, 0)
    vm.mmu.shadow.alloc_shadow_page(0x801, Role(level=2, smm=1))
    assert vm.write_track.count(smm_slot, 0x801) == 1
    assert not vm.gfn_is_write_tracked(0x801)  # address space 0 has no slot there
    # a non-SMM page for a gfn of slot 0 counts in slot 0, not in the SMM slot
    vm.mmu.shadow.alloc_shadow_page(PD, Role(level=2))
    assert vm.write_track_count(PD) == 1


def test_case_56_track_write_visits_smm_and_normal_pages_of_the_gfn(vm) -> None:
    """§8.8: kvm_mmu_track_write does not filter by address space."""
    hva = vm.host.mmap(0x400000)
    vm.set_user_memory_region(1 << 16, 0, 0, 0x400000, hva)  # SMM view of the same gfns
    normal = vm.mmu.shadow.alloc_shadow_page(PD, Role(level=2))
    smm = vm.mmu.shadow.alloc_shadow_page(PD, Role(level=2, smm=1))
    for sp in (normal, smm):
        child = vm.mmu.shadow.alloc_shadow_page(0x30 + sp.role.smm, Role(level=1, smm=sp.role.smm))
        vm.mmu.shadow.link_shadow_page(sp, 1, child)
    vm.write_guest((PD << 12) + 8, bytes(8))
    vm.hooks.track_write(vm, vm.create_vcpu(), (PD << 12) + 8, bytes(8))
    assert normal.spt[1] == 0 and smm.spt[1] == 0
    assert normal.write_flooding_count == smm.write_flooding_count == 1
