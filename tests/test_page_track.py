"""Write-track counters, lpage counts, add/remove, enablement and notifiers (page_track.c).

Spec: kvm-page-track.md §1–§2 and §7 cases 1–9, 12–28, 64, 66 (6.6+/6.9+ semantics).
SPTE-level effects (12–16) are observed on TDP leaves created by real page faults.
"""

from __future__ import annotations

import os
import threading

import pagetrack
import pytest
from pagetrack import KvmError
from pagetrack.audit import AuditLog
from pagetrack.mmu import SPTE_HOST_WRITABLE, SPTE_MMU_WRITABLE, SPTE_P, SPTE_W
from pagetrack.mmu.fault import RET_PF_FIXED
from pagetrack.page_track import TRACK_MAX
from track_helpers import PF_READ, PF_WRITE_NP, Recorder, make_vm, slot_of

BASE = 0x400000
GFN = BASE >> 12  # 2 MiB aligned, not 1 GiB aligned
NPAGES = 1024  # two full 2 MiB frames; the 1 GiB frame is only partly covered (starts at 1)


def tracked_vm(tdp: bool = False, **kw: object):
    """A VM whose write tracking is enabled (shadow paging, or TDP + an external node)."""
    rec = Recorder()
    vm = make_vm(tdp, plugins=[rec] if tdp else [], audit=AuditLog.in_memory("t", "debug"), **kw)
    vm.add_memory(BASE, NPAGES * 4096)
    return vm, rec


def lpage(vm, gfn: int) -> tuple[int, int]:
    slot = slot_of(vm, gfn)
    return (vm.write_track.disallow_lpage(slot, gfn, 2), vm.write_track.disallow_lpage(slot, gfn, 3))


def events(vm, name: str) -> list[dict]:
    return [e for e in vm.audit.events if e["event"] == name]


# ---- cases 1–3: add / remove / query ---------------------------------------------------

@pytest.mark.parametrize("tdp", [False, True], ids=["shadow", "tdp+external"])
def test_case_01_add_returns_0_counts_1_and_is_tracked(tdp: bool) -> None:
    vm, _ = tracked_vm(tdp)
    assert vm.write_track_count(GFN + 7) == 0
    assert not vm.gfn_is_write_tracked(GFN + 7)
    assert vm.write_track_add_gfn(GFN + 7) == 0
    assert vm.write_track_count(GFN + 7) == 1
    assert vm.gfn_is_write_tracked(GFN + 7)
    assert not vm.gfn_is_write_tracked(GFN + 8)


def test_case_02_remove_once_of_two_leaves_it_tracked() -> None:
    vm, _ = tracked_vm()
    vm.write_track_add_gfn(GFN)
    vm.write_track_add_gfn(GFN)
    assert vm.write_track_count(GFN) == 2
    assert vm.write_track_remove_gfn(GFN) == 0
    assert vm.write_track_count(GFN) == 1
    assert vm.gfn_is_write_tracked(GFN)


def test_case_03_remove_last_tracker_untracks() -> None:
    vm, _ = tracked_vm()
    vm.write_track_add_gfn(GFN)
    assert vm.write_track_remove_gfn(GFN) == 0
    assert vm.write_track_count(GFN) == 0
    assert not vm.gfn_is_write_tracked(GFN)


# ---- case 4: no address-space-0 slot ------------------------------------------------------

def test_case_04_gfn_outside_every_slot_gives_einval_and_changes_nothing() -> None:
    vm, _ = tracked_vm()
    smm_hva = vm.host.mmap(16 * 4096)
    smm_gpa = 0x30000000
    vm.set_user_memory_region(1 << 16 | 3, 0, smm_gpa, 16 * 4096, smm_hva)  # SMM address space
    smm_slot = slot_of(vm, smm_gpa >> 12, as_id=1)
    assert smm_slot.arch.gfn_write_track is not None
    before = [(s.key, s.arch.gfn_write_track.tobytes(), [a.tobytes() for a in s.arch.lpage_info])
              for s in vm.memslots.all_slots()]
    for gfn in (GFN - 1, GFN + NPAGES, smm_gpa >> 12, (smm_gpa >> 12) + 15):
        for op in (vm.write_track_add_gfn, vm.write_track_remove_gfn):
            with pytest.raises(KvmError) as err:
                op(gfn)
            assert err.value.errno_name == "EINVAL"
    after = [(s.key, s.arch.gfn_write_track.tobytes(), [a.tobytes() for a in s.arch.lpage_info])
             for s in vm.memslots.all_slots()]
    assert after == before
    assert not vm.gfn_is_write_tracked(smm_gpa >> 12)  # address space 0 has no slot there


# ---- cases 5–7: counter saturation and WARN_ON_ONCE ----------------------------------------

def test_case_05_add_at_65535_warns_keeps_counter_but_still_disallows_lpage_and_wrprots() -> None:
    vm, _ = tracked_vm(True)
    vcpu = vm.create_vcpu()
    g = GFN + 3
    assert vm.mmu.page_fault(vcpu, g << 12, PF_WRITE_NP) == RET_PF_FIXED
    assert vm.mmu.tdp.lookup(g)[1] & SPTE_W
    slot = slot_of(vm, g)
    slot.arch.gfn_write_track[g - slot.base_gfn] = TRACK_MAX
    lp = lpage(vm, g)
    flushes = vm.mmu.stats.remote_tlb_flush
    assert vm.write_track_add_gfn(g) == 0
    assert vm.write_track_count(g) == TRACK_MAX
    assert lpage(vm, g) == (lp[0] + 1, lp[1] + 1)
    spte = vm.mmu.tdp.lookup(g)[1]
    assert not spte & (SPTE_W | SPTE_MMU_WRITABLE)  # write protection still ran
    assert vm.mmu.stats.remote_tlb_flush == flushes + 1
    (warn,) = events(vm, "track_warn")
    assert warn["warned"] is True and warn["count"] == TRACK_MAX and warn["op"] == "add"
    assert not vm.write_track.vm_bugged


def test_case_06_remove_at_zero_warns_keeps_counter_and_still_allows_lpage() -> None:
    vm, _ = tracked_vm()
    slot = slot_of(vm, GFN)
    vm.write_track.disallow_lpage_add(slot, GFN)
    vm.write_track.disallow_lpage_add(slot, GFN)  # another reason holds two lpage counts
    assert lpage(vm, GFN) == (2, 3)
    assert vm.write_track_remove_gfn(GFN) == 0
    assert vm.write_track_count(GFN) == 0
    assert lpage(vm, GFN) == (1, 2)
    (warn,) = events(vm, "track_warn")
    assert warn["warned"] is True and warn["op"] == "remove" and warn["count"] == 0


def test_case_07_second_overflow_does_not_warn_again_6_6_warn_on_once() -> None:
    """6.6+ WARN_ON_ONCE: one site, one WARN (the <=6.5 half, WARN_ON every time, is not modelled)."""
    vm, _ = tracked_vm()
    slot = slot_of(vm, GFN)
    slot.arch.gfn_write_track[0] = TRACK_MAX
    slot.arch.gfn_write_track[1] = TRACK_MAX
    vm.write_track_add_gfn(GFN)
    vm.write_track_add_gfn(GFN + 1)
    vm.write_track_remove_gfn(GFN + 2)  # underflow: the same WARN_ON_ONCE site
    warns = events(vm, "track_warn")
    assert [w["warned"] for w in warns] == [True, False, False]
    assert vm.write_track_count(GFN) == vm.write_track_count(GFN + 1) == TRACK_MAX


# ---- cases 8–9: large-page disallow counts --------------------------------------------------

def test_case_08_add_then_remove_raises_and_restores_2m_and_1g_counts() -> None:
    vm, _ = tracked_vm()
    g = GFN + 600  # second 2 MiB frame of the slot
    assert lpage(vm, g) == (0, 1)  # the 1 GiB frame is only partly covered by the slot
    vm.write_track_add_gfn(g)
    assert lpage(vm, g) == (1, 2)
    vm.write_track_remove_gfn(g)
    assert lpage(vm, g) == (0, 1)


def test_case_08_aligned_1g_slot_both_counts_go_0_1_0() -> None:
    vm = make_vm(False)
    vm.add_memory(1 << 30, 1 << 30)  # exactly one 1 GiB frame, host-aligned
    g = (1 << 30 >> 12) + 12345
    assert lpage(vm, g) == (0, 0)
    vm.write_track_add_gfn(g)
    assert lpage(vm, g) == (1, 1)
    vm.write_track_remove_gfn(g)
    assert lpage(vm, g) == (0, 0)


def test_case_09_two_gfns_in_one_2m_frame_count_twice() -> None:
    vm, _ = tracked_vm()
    vm.write_track_add_gfn(GFN + 1)
    vm.write_track_add_gfn(GFN + 511)
    assert lpage(vm, GFN + 1)[0] == 2
    assert lpage(vm, GFN + 512)[0] == 0  # the next frame is untouched
    assert vm.write_track_count(GFN + 1) == vm.write_track_count(GFN + 511) == 1


# ---- cases 12–16: write protection on add, none on remove -------------------------------------

def _mapped_writable(vm, gfn: int) -> int:
    vcpu = vm.vcpus[0] if vm.vcpus else vm.create_vcpu()
    vm.mmu.page_fault(vcpu, gfn << 12, PF_WRITE_NP)
    spte = vm.mmu.tdp.lookup(gfn)[1]
    assert spte & SPTE_W and spte & SPTE_MMU_WRITABLE
    return spte


def test_case_12_add_write_protects_writable_spte_and_flushes() -> None:
    vm, _ = tracked_vm(True)
    _mapped_writable(vm, GFN + 9)
    flushes = vm.mmu.stats.remote_tlb_flush
    vm.write_track_add_gfn(GFN + 9)
    level, spte = vm.mmu.tdp.lookup(GFN + 9)
    assert level == 1
    assert spte & SPTE_P and spte & SPTE_HOST_WRITABLE
    assert not spte & SPTE_W and not spte & SPTE_MMU_WRITABLE
    assert vm.mmu.stats.remote_tlb_flush == flushes + 1  # one whole-VM flush


def test_case_12_shadow_add_write_protects_rmap_spte() -> None:
    """Under shadow paging the rmap of the gfn is walked (a writable leaf of a shadow page)."""
    vm, _ = tracked_vm(False)
    from pagetrack.mmu import Role

    sp = vm.mmu.shadow.alloc_shadow_page(0x12345, Role(level=1, direct=True))
    g = GFN + 4
    sp.spt[3] = SPTE_P | SPTE_W | SPTE_MMU_WRITABLE | SPTE_HOST_WRITABLE | (g << 12)
    sp.gfns[3] = g
    vm.mmu.shadow.rmap_add(sp, 3, g, 1)
    flushes = vm.mmu.stats.remote_tlb_flush
    vm.write_track_add_gfn(g)
    assert not sp.spt[3] & (SPTE_W | SPTE_MMU_WRITABLE)
    assert sp.spt[3] & SPTE_P
    assert vm.mmu.stats.remote_tlb_flush == flushes + 1


def test_case_13_readonly_spte_without_mmu_writable_needs_no_flush() -> None:
    vm, _ = tracked_vm(True)
    vcpu = vm.create_vcpu()
    g = GFN + 20
    assert vm.mmu.page_fault(vcpu, g << 12, PF_READ) == RET_PF_FIXED  # untouched host page: RO
    spte = vm.mmu.tdp.lookup(g)[1]
    assert spte & SPTE_P and not spte & (SPTE_W | SPTE_MMU_WRITABLE)
    flushes = vm.mmu.stats.remote_tlb_flush
    vm.write_track_add_gfn(g)
    assert vm.mmu.tdp.lookup(g)[1] == spte
    assert vm.mmu.stats.remote_tlb_flush == flushes


def test_case_14_dirty_log_protected_spte_loses_mmu_writable_and_flushes() -> None:
    vm, _ = tracked_vm(True)
    g = GFN + 30
    _mapped_writable(vm, g)
    vm.enable_dirty_logging(slot_of(vm, g))  # clears W only
    spte = vm.mmu.tdp.lookup(g)[1]
    assert not spte & SPTE_W and spte & SPTE_MMU_WRITABLE
    flushes = vm.mmu.stats.remote_tlb_flush
    vm.write_track_add_gfn(g)
    assert not vm.mmu.tdp.lookup(g)[1] & SPTE_MMU_WRITABLE
    assert vm.mmu.stats.remote_tlb_flush == flushes + 1


def test_case_15_huge_2m_spte_covering_gfn_is_write_protected() -> None:
    vm, _ = tracked_vm(True, host_huge_pages=True)
    vcpu = vm.create_vcpu()
    g = GFN + 512 + 17
    vm.mmu.page_fault(vcpu, g << 12, PF_WRITE_NP)
    level, spte = vm.mmu.tdp.lookup(g)
    assert level == 2 and spte & SPTE_W
    flushes = vm.mmu.stats.remote_tlb_flush
    vm.write_track_add_gfn(g + 100)  # another gfn of the same 2 MiB frame
    level, spte = vm.mmu.tdp.lookup(g)
    assert level == 2
    assert not spte & (SPTE_W | SPTE_MMU_WRITABLE)
    assert vm.mmu.stats.remote_tlb_flush == flushes + 1


def test_case_16_removing_last_tracker_changes_no_spte_and_does_not_flush() -> None:
    vm, _ = tracked_vm(True)
    g = GFN + 40
    _mapped_writable(vm, g)
    vm.write_track_add_gfn(g)
    spte = vm.mmu.tdp.lookup(g)[1]
    flushes = vm.mmu.stats.remote_tlb_flush
    vm.write_track_remove_gfn(g)
    assert vm.mmu.tdp.lookup(g)[1] == spte  # still read-only, MMU-writable clear
    assert vm.mmu.stats.remote_tlb_flush == flushes
    # a later write fault goes the normal way and may make it writable again
    vm.mmu.page_fault(vm.vcpus[0], g << 12, 3)
    assert vm.mmu.tdp.lookup(g)[1] & SPTE_W


# ---- cases 17–23: query and enablement --------------------------------------------------------

def test_case_17_no_slot_is_not_tracked() -> None:
    vm, _ = tracked_vm()
    assert vm.write_track.is_tracked(None, GFN) is False
    assert vm.gfn_is_write_tracked(0x99999) is False


def test_case_18_tdp_without_shadow_root_or_external_user_is_disabled() -> None:
    vm = make_vm(True, audit=AuditLog.in_memory("t", "debug"))
    vm.add_memory(BASE, NPAGES * 4096)
    slot = slot_of(vm, GFN)
    assert not vm.write_track.enabled
    assert slot.arch.gfn_write_track is None
    assert vm.gfn_is_write_tracked(GFN) is False
    lp = lpage(vm, GFN)
    assert vm.write_track_add_gfn(GFN) == 0  # the exported wrapper still returns 0
    assert vm.write_track.vm_bugged  # KVM_BUG_ON
    assert slot.arch.gfn_write_track is None and vm.write_track_count(GFN) == 0
    assert lpage(vm, GFN) == lp  # nothing changed
    assert vm.write_track_remove_gfn(GFN) == 0
    assert lpage(vm, GFN) == lp
    assert events(vm, "vm_bugged")


def test_case_19_shadow_paging_allocates_arrays_at_creation() -> None:
    vm = make_vm(False)
    assert vm.write_track.enabled
    for i in range(3):
        slot = vm.add_memory(BASE + i * 0x100000, 0x10000)
        assert slot.arch.gfn_write_track is not None
        assert len(slot.arch.gfn_write_track) == 16 and not slot.arch.gfn_write_track.any()


def test_case_20_external_registration_allocates_everywhere_and_is_sticky() -> None:
    vm = make_vm(True)
    a = vm.add_memory(BASE, 0x10000)
    smm_hva = vm.host.mmap(0x10000)
    vm.set_user_memory_region(1 << 16, 0, 0x800000, 0x10000, smm_hva)
    smm = vm.memslots.get(1, 0)
    assert a.arch.gfn_write_track is None and smm.arch.gfn_write_track is None
    rec = Recorder()
    vm.register_tracker(rec, "ext")
    assert vm.write_track.external_write_tracking_enabled
    assert a.arch.gfn_write_track is not None and smm.arch.gfn_write_track is not None
    vm.unregister_tracker("ext")
    assert vm.write_track.external_write_tracking_enabled  # sticky
    later = vm.add_memory(0x1000000, 0x10000)
    assert later.arch.gfn_write_track is not None
    assert vm.write_track_add_gfn(later.base_gfn) == 0 and vm.gfn_is_write_tracked(later.base_gfn)


def test_case_21_not_modelled_6_9_counterpart_slot_gets_array_once_enabled() -> None:
    """[5.16..6.8] (config on ⇒ always an array) is not the modelled kernel; the 6.9+
    counterpart: a slot created on a TDP VM gets an array iff tracking is enabled then."""
    vm = make_vm(True)
    assert vm.add_memory(BASE, 0x10000).arch.gfn_write_track is None
    vm.register_tracker(Recorder(), "ext")
    assert vm.add_memory(0x800000, 0x10000).arch.gfn_write_track is not None


def test_case_22_first_shadow_root_allocates_all_arrays_then_sets_sticky_flag() -> None:
    vm = make_vm(True)
    slots = [vm.add_memory(BASE, 0x10000), vm.add_memory(0x800000, 0x10000)]
    seen: list[bool] = []
    wt = vm.write_track
    real_alloc = wt.alloc_slot

    def alloc(slot):
        seen.append(wt.shadow_root_allocated)
        real_alloc(slot)

    wt.alloc_slot = alloc
    wt.first_shadow_root_alloc()
    assert seen == [False, False]  # every array exists before the flag is set
    assert wt.shadow_root_allocated and wt.enabled
    assert all(s.arch.gfn_write_track is not None for s in slots)
    wt.first_shadow_root_alloc()
    assert wt.shadow_root_allocated


def test_case_22_shadow_vm_load_roots_sets_shadow_root_allocated() -> None:
    vm = make_vm(False)
    vm.add_memory(0, 0x200000)
    vcpu = vm.create_vcpu()
    assert not vm.write_track.shadow_root_allocated
    vcpu.set_cr3(0x1000)
    assert vm.write_track.shadow_root_allocated


def _fail_second_alloc(wt):
    real = wt.alloc_slot
    calls = []

    def alloc(slot):
        calls.append(slot)
        if len(calls) == 2:
            raise KvmError("ENOMEM", "injected allocation failure")
        real(slot)

    wt.alloc_slot = alloc
    return calls


def test_case_23_external_enable_failure_keeps_partial_arrays_and_adds_no_node() -> None:
    vm = make_vm(True)
    slots = [vm.add_memory(BASE, 0x10000), vm.add_memory(0x800000, 0x10000)]
    _fail_second_alloc(vm.write_track)
    names = vm.plugins.names()
    with pytest.raises(KvmError) as err:
        vm.register_tracker(Recorder(), "ext")
    assert err.value.errno_name == "ENOMEM"
    assert [s.arch.gfn_write_track is not None for s in slots] == [True, False]  # kept
    assert not vm.write_track.external_write_tracking_enabled
    assert not vm.write_track.enabled
    assert vm.plugins.names() == names  # the node was not added
    assert not vm.plugins.has_external_tracker()


def test_case_23_first_shadow_root_failure_keeps_partial_arrays_and_flag_false() -> None:
    vm = make_vm(True)
    slots = [vm.add_memory(BASE, 0x10000), vm.add_memory(0x800000, 0x10000)]
    _fail_second_alloc(vm.write_track)
    with pytest.raises(KvmError):
        vm.write_track.first_shadow_root_alloc()
    assert [s.arch.gfn_write_track is not None for s in slots] == [True, False]
    assert not vm.write_track.shadow_root_allocated


# ---- cases 24–28: notifier registration and dispatch ------------------------------------------

def test_case_24_register_from_another_process_is_esrch(monkeypatch: pytest.MonkeyPatch) -> None:
    vm = make_vm(True)
    names = vm.plugins.names()
    real_pid = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: real_pid + 1)
    with pytest.raises(KvmError) as err:
        vm.register_tracker(Recorder(), "ext")
    assert err.value.errno_name == "ESRCH"
    assert vm.plugins.names() == names
    assert not vm.plugins.has_external_tracker()
    assert not vm.write_track.external_write_tracking_enabled
    monkeypatch.setattr(os, "getpid", lambda: real_pid)
    assert vm.register_tracker(Recorder(), "ext") == "ext"


def test_case_25_most_recently_registered_node_is_notified_first() -> None:
    vm = make_vm(True)
    vm.add_memory(BASE, 0x10000)
    log: list = []
    vm.register_tracker(Recorder("A", log), "A")
    vm.register_tracker(Recorder("B", log), "B")
    vm.hooks.track_write(vm, None, BASE + 8, b"\x01" * 8)
    assert [entry[0] for entry in log] == ["B", "A"]


def test_case_26_external_nodes_run_before_kvm_mmu_track_write(monkeypatch) -> None:
    import pagetrack.plugins.shadow_mmu as shadow_mmu

    vm = make_vm(False)
    vm.add_memory(BASE, 0x10000)
    log: list = []
    vm.register_tracker(Recorder("A", log), "A")
    vm.register_tracker(Recorder("B", log), "B")
    real = shadow_mmu.kvm_mmu_track_write

    def spy(vm_, vcpu, gpa, nbytes):
        log.append(("kvm", "kvm_mmu_track_write", gpa, None))
        real(vm_, vcpu, gpa, nbytes)

    monkeypatch.setattr(shadow_mmu, "kvm_mmu_track_write", spy)
    vm.hooks.track_write(vm, None, BASE, b"\x00" * 8)
    assert [entry[0] for entry in log] == ["B", "A", "kvm"]
    assert vm.plugins.call_order("track_write")[-1] == "shadow_mmu"


def test_case_27_node_without_a_callback_is_skipped() -> None:
    class OnlyRemove:
        def __init__(self) -> None:
            self.removed: list = []

        @pagetrack.hookimpl
        def track_remove_region(self, gfn: int, nr_pages: int) -> None:
            self.removed.append((gfn, nr_pages))

    class OnlyWrite:
        def __init__(self) -> None:
            self.writes: list = []

        @pagetrack.hookimpl
        def track_write(self, gpa: int) -> None:
            self.writes.append(gpa)

    vm = make_vm(True)
    slot = vm.add_memory(BASE, 0x10000)
    r, w = OnlyRemove(), OnlyWrite()
    vm.register_tracker(r, "r")
    vm.register_tracker(w, "w")
    vm.hooks.track_write(vm, None, BASE, b"\x01")
    assert w.writes == [BASE] and r.removed == []
    vm.set_user_memory_region(slot.key, 0, BASE, 0, slot.userspace_addr)
    assert r.removed == [(GFN, 16)] and w.writes == [BASE]


def test_case_28_unregistered_node_is_not_called_and_unregister_waits_for_in_flight() -> None:
    vm = make_vm(True)
    vm.add_memory(BASE, 0x10000)
    entered, release = threading.Event(), threading.Event()
    calls: list[int] = []

    class Slow:
        @pagetrack.hookimpl
        def track_write(self, gpa: int) -> None:
            calls.append(gpa)
            if len(calls) == 1:
                entered.set()
                assert release.wait(5)

    vm.register_tracker(Slow(), "slow")
    writer = threading.Thread(target=vm.hooks.track_write, args=(vm, None, BASE, b"\x01"))
    writer.start()
    assert entered.wait(5)
    done = threading.Event()
    unreg = threading.Thread(target=lambda: (vm.unregister_tracker("slow"), done.set()))
    unreg.start()
    assert not done.wait(0.2)  # synchronize_srcu: the in-flight call still runs
    release.set()
    writer.join(5)
    unreg.join(5)
    assert done.is_set()
    vm.hooks.track_write(vm, None, BASE + 8, b"\x02")
    assert calls == [BASE]
    # its counts are not removed for it
    assert vm.write_track.external_write_tracking_enabled


# ---- case 64: has_external_user -----------------------------------------------------------------

def test_case_64_has_external_user_false_when_empty_true_with_one_node() -> None:
    vm = make_vm(True)
    assert not vm.plugins.has_external_tracker()  # only the MMU's own tracker and dirty_log
    vm.register_tracker(Recorder(), "ext")
    assert vm.plugins.has_external_tracker()
    vm.unregister_tracker("ext")
    assert not vm.plugins.has_external_tracker()


# ---- case 66: writes that are not emulated instruction stores -------------------------------

def test_case_66_host_side_guest_writes_do_not_notify() -> None:
    """The std/host write path (``kvm_write_guest``) never calls ``track_write``."""
    vm, rec = tracked_vm(True)
    vm.write_track_add_gfn(GFN)
    vm.write_guest(BASE + 0xFF8, b"\x11" * 16)  # tracked page and its neighbour
    assert rec.writes == []
    assert vm.read_guest(BASE + 0xFF8, 16) == b"\x11" * 16
    assert vm.mmu.stats.track_write_calls == 0
