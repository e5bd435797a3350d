"""KVMGT glue and GVT's page-track layer (spec gvt-shadow-gtt.md §2–§4, §13 cases 1–13, 45, 47).

kvmgt.c: ptable, intel_gvt_page_track_add/_remove, kvmgt_page_track_write,
kvmgt_page_track_remove_region, open/close; page_track.c: records and the
handler dispatch; KVM: memslot DELETE and MOVE with a vGPU attached.
"""

from __future__ import annotations

import errno
import multiprocessing

import pytest
from gvt_helpers import DATA, PD, PT, P, chain, events, guest_write, guest_write64, gvt, pte, spt_of
from pagetrack.errors import KvmError
from pagetrack.plugins.gvt_shadow_gtt import GvtError, attach_vgpu, detach_vgpu, vgpu_of
from pagetrack.plugins.gvt_shadow_gtt.device import GvtDevice
from pagetrack.plugins.gvt_shadow_gtt.page_track import (
    intel_vgpu_register_page_track,
    intel_vgpu_unregister_page_track,
)
from pagetrack.plugins.gvt_shadow_gtt.shadow import ppgtt_write_protection_handler
from pagetrack.plugins.gvt_shadow_gtt.vgpu import GvtOptions, Vgpu
from track_helpers import Guest, make_vm

__all__ = ["gvt"]

G = 0x480  # a data-slot gfn


# ---- case 1 ---------------------------------------------------------------------------


def test_case_1_add_when_not_attached_is_esrch(gvt) -> None:
    vm, _ = gvt(attach=False)
    vgpu = Vgpu(vm, GvtDevice(), GvtOptions())  # created, never opened: ATTACHED clear
    assert vgpu.page_track_add(G) == -errno.ESRCH
    assert vm.write_track_count(G) == 0
    assert vgpu.ptable == set()


# ---- case 2 ---------------------------------------------------------------------------


def test_case_2_add_is_idempotent(gvt) -> None:
    vm, vgpu = gvt()
    assert vgpu.page_track_add(G) == 0
    assert vgpu.page_track_add(G) == 0
    assert vm.write_track_count(G) == 1
    assert len([e for e in events(vm, "track_add") if e["gfn"] == G]) == 1
    assert vgpu.ptable == {G}


# ---- case 3 ---------------------------------------------------------------------------


def test_case_3_add_outside_memslots_is_einval(gvt) -> None:
    _, vgpu = gvt()
    assert vgpu.page_track_add(0x100000) == -errno.EINVAL
    assert 0x100000 not in vgpu.ptable


# ---- case 4 ---------------------------------------------------------------------------


def test_case_4_remove_of_an_unknown_gfn_does_not_call_kvm(gvt) -> None:
    vm, vgpu = gvt()
    vm.write_track_add_gfn(G)  # someone else's count
    assert vgpu.page_track_remove(G) == 0
    assert vm.write_track_count(G) == 1


# ---- case 5 ---------------------------------------------------------------------------


def test_case_5_writes_to_gfns_kvm_tracks_for_itself_reach_no_gvt_handler() -> None:
    """Shadow paging: the guest rewrites a PDE of its own x86 page directory, which KVM's
    shadow MMU write-protects; kvmgt_page_track_write is called and filters it out."""
    vm = make_vm(False)
    try:
        source = """
            mov rax, qword ptr [DATA_BASE]      # fault in the data mapping: KVM shadows the PD
            mov rdi, PD
            mov rax, qword ptr [rdi + 8*2]
            mov qword ptr [rdi + 8*511], rax    # emulated: a write to a KVM-tracked gfn
            hlt
        """
        guest = Guest(source, tdp=False, vm=vm, defines=Guest.symbols())
        vgpu = attach_vgpu(vm)
        pd_gfn = Guest.symbols()["PD"] >> 12
        assert guest.run() == "hlt"
        assert vm.gfn_is_write_tracked(pd_gfn) and pd_gfn not in vgpu.ptable
        assert vgpu.stats.track_write_calls >= 1  # kvmgt_page_track_write was called ...
        assert vgpu.stats.handled_writes == 0  # ... and filtered the write out
        assert not vgpu.spt_tree and not vgpu.log and not events(vm, "gvt_handler")
    finally:
        detach_vgpu(vm)
        vm.close()


# ---- case 6 ---------------------------------------------------------------------------


def test_case_6_handler_rereads_the_entry_from_guest_memory(gvt) -> None:
    vm, vgpu = gvt()
    vgpu.get_ppgtt_mm([chain(vm)])
    spt = spt_of(vgpu, PT)
    vm.write_guest((PT << 12) + 8, pte(0x601).to_bytes(8, "little"))  # committed first
    vm.hooks.track_write(vm, None, (PT << 12) + 8, b"\xff" * 8)  # bogus "new" bytes
    assert spt.shadow[1] == (vgpu.dma.lookup(0x601).dma_addr | P)
    assert events(vm, "gvt_handler")[-1]["gpa"] == (PT << 12) + 8


# ---- case 7 ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [2, 16])
def test_case_7_odd_sized_writes_are_rejected(gvt, size: int) -> None:
    vm, vgpu = gvt()
    vgpu.get_ppgtt_mm([chain(vm)])
    spt = spt_of(vgpu, PT)
    before = list(spt.shadow)
    guest_write(vm, (PT << 12) + 16, b"\x01" * size)  # the guest sees nothing: no exception
    assert spt.shadow == before
    assert vgpu.log[-1].startswith(f"guest page write error, gpa {(PT << 12) + 16:#x}")
    assert events(vm, "gvt_error")[-1]["message"] == vgpu.log[-1]


# ---- case 8 ---------------------------------------------------------------------------


def test_case_8_failsafe_drops_protection_and_skips_the_handler(gvt) -> None:
    vm, vgpu = gvt()
    vgpu.get_ppgtt_mm([chain(vm)])
    spt = spt_of(vgpu, PT)
    before = list(spt.shadow)
    vgpu.enter_failsafe()
    guest_write64(vm, PT << 12, pte(0x605))
    assert spt.shadow == before  # handler not run
    assert PT not in vgpu.ptable and vm.write_track_count(PT) == 0
    assert vgpu.page_track_tree[PT].tracked  # the record still says tracked


# ---- case 9 ---------------------------------------------------------------------------


def test_case_9_slot_delete_drops_exactly_its_ptable_entries(gvt) -> None:
    vm, vgpu = gvt()
    other = vm.add_memory(0x2000000, 1 << 20, slot=2)  # gfns 0x2000..0x20ff
    pt2 = 0x2000
    pdps0 = chain(vm, leaves={0: 0x600})
    vm.write_guest((PD << 12) + 8, pte(pt2).to_bytes(8, "little"))  # PD[1] -> a PT in slot 2
    vm.write_guest(pt2 << 12, pte(0x601).to_bytes(8, "little"))
    vgpu.get_ppgtt_mm([pdps0])
    assert pt2 in vgpu.ptable
    kvm_removes = len(events(vm, "track_remove"))
    spts = dict(vgpu.spt_tree)
    vm.set_user_memory_region(other.key, 0, 0x2000000, 0, other.userspace_addr)  # DELETE
    assert vgpu.ptable == {0x500, 0x501, 0x502, 0x503}
    assert len(events(vm, "track_remove")) == kvm_removes  # no KVM call
    assert vgpu.spt_tree == spts and vgpu.page_track_tree[pt2].tracked
    region = events(vm, "gvt_remove_region")[-1]
    assert (region["gfn"], region["nr_pages"], region["dropped"]) == (0x2000, 256, 1)
    # code reading: a later add for it fails, no memslot covers it
    assert vgpu.page_track_add(pt2) == -errno.EINVAL


# ---- case 10 --------------------------------------------------------------------------


def test_case_10_memslot_move_is_refused_while_a_vgpu_is_attached(gvt) -> None:
    vm, _ = gvt()
    extra = vm.add_memory(0x2000000, 1 << 20, slot=2)
    with pytest.raises(KvmError) as err:
        vm.set_user_memory_region(extra.key, 0, 0x3000000, 1 << 20, extra.userspace_addr)
    assert err.value.errno_name == "EINVAL"
    detach_vgpu(vm)  # no external tracker left: the move goes through
    assert vm.set_user_memory_region(extra.key, 0, 0x3000000, 1 << 20, extra.userspace_addr) == 0


def test_case_10_an_inert_plugin_does_not_block_moves() -> None:
    """The entry-point module alone (no vGPU) is not an external tracker."""
    from pagetrack import VM

    with VM() as vm:
        assert "gvt_shadow_gtt" in vm.plugins.names()
        assert not vm.plugins.has_external_tracker()
        slot = vm.add_memory(0x2000000, 1 << 20, slot=2)
        assert vm.set_user_memory_region(slot.key, 0, 0x3000000, 1 << 20, slot.userspace_addr) == 0


# ---- case 11 (era <= 6.5, not modelled) ---------------------------------------------------


def test_case_11_era_6_6_has_no_flush_slot_notifier(gvt) -> None:
    """Case 11 is the ≤ 6.5 track_flush_slot path; the 6.6+ node has only track_remove_region,
    so a DELETE drops ptable entries (case 9) and a MOVE is refused (case 10)."""
    vm, vgpu = gvt()
    assert not hasattr(vgpu.tracker, "track_flush_slot")
    name = vgpu.tracker_name
    assert name in vm.plugins.call_order("track_remove_region")
    assert name not in vm.plugins.call_order("track_flush_slot")


# ---- case 12 --------------------------------------------------------------------------


def test_case_12_register_page_track_twice_is_eexist(gvt) -> None:
    vm, vgpu = gvt()
    with vgpu.lock:
        intel_vgpu_register_page_track(vgpu, G, ppgtt_write_protection_handler, None)
        assert vgpu.page_track_tree[G].tracked is False
        assert vm.write_track_count(G) == 0
        with pytest.raises(GvtError) as err:
            intel_vgpu_register_page_track(vgpu, G, ppgtt_write_protection_handler, None)
    assert err.value.errno_name == "EEXIST"


# ---- case 13 --------------------------------------------------------------------------


def test_case_13_unregister_untracks_only_tracked_records(gvt) -> None:
    vm, vgpu = gvt()
    with vgpu.lock:
        intel_vgpu_register_page_track(vgpu, G, ppgtt_write_protection_handler, None)
        intel_vgpu_register_page_track(vgpu, G + 1, ppgtt_write_protection_handler, None)
        from pagetrack.plugins.gvt_shadow_gtt.page_track import intel_vgpu_enable_page_track

        intel_vgpu_enable_page_track(vgpu, G)
        assert vm.write_track_count(G) == 1
        removes = len(events(vm, "track_remove"))
        intel_vgpu_unregister_page_track(vgpu, G)
        assert G not in vgpu.page_track_tree and vm.write_track_count(G) == 0
        assert len(events(vm, "track_remove")) == removes + 1
        intel_vgpu_unregister_page_track(vgpu, G + 1)  # tracked = false: no KVM call
        assert len(events(vm, "track_remove")) == removes + 1


# ---- case 45 --------------------------------------------------------------------------


def test_case_45_close_then_destroy_leaves_kvm_counts_behind(gvt) -> None:
    vm, vgpu = gvt()
    vgpu.get_ppgtt_mm([chain(vm)])
    gfns = {0x500, 0x501, 0x502, 0x503}
    assert vgpu.ptable == gfns
    removes = len(events(vm, "track_remove"))
    vgpu.close()
    assert not vgpu.attached
    assert vgpu.tracker_name is None and not any(n.startswith("kvmgt.") for n in vm.plugins.names())
    assert vgpu.ptable == set()
    assert len(events(vm, "track_remove")) == removes  # emptied without KVM calls
    assert vgpu.spt_tree and vgpu.ppgtt_mm_list  # mms survive close
    vgpu.destroy()
    assert not vgpu.spt_tree and not vgpu.ppgtt_mm_list
    assert all(vm.write_track_count(g) == 1 for g in gfns)  # untrack refused: -ESRCH
    assert len(events(vm, "track_remove")) == removes


# ---- case 47 --------------------------------------------------------------------------


def _attach_in_child(vm, conn) -> None:  # runs in a forked child
    try:
        attach_vgpu(vm)
        conn.send("attached")
    except GvtError as exc:
        conn.send(exc.errno_name)


def test_case_47_open_from_another_process_is_esrch(gvt) -> None:
    vm, _ = gvt(attach=False)
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_attach_in_child, args=(vm, child))
    proc.start()
    proc.join(30)
    assert parent.recv() == "ESRCH"
    assert vgpu_of(vm) is None


# ---- attach / detach ------------------------------------------------------------------


def test_attach_registers_one_notifier_node_per_vgpu_and_detach_removes_it(gvt) -> None:
    vm, vgpu = gvt()
    assert vgpu.tracker_name == f"kvmgt.vgpu{vgpu.id}"
    assert vm.plugins.call_order("track_write")[0] == vgpu.tracker_name
    assert vm.plugins.has_external_tracker()
    with pytest.raises(GvtError) as err:
        attach_vgpu(vm)
    assert err.value.errno_name == "EEXIST"
    assert detach_vgpu(vm) is vgpu
    assert vgpu.tracker_name is None and not vm.plugins.has_external_tracker()
    assert [e["action"] for e in events(vm, "gvt_detach")] == ["close", "destroy"]


def test_ptable_access_asserts_vgpu_lock(gvt) -> None:
    from pagetrack.plugins.gvt_shadow_gtt.kvmgt import kvmgt_gfn_is_write_protected

    _, vgpu = gvt()
    with pytest.raises(AssertionError):
        kvmgt_gfn_is_write_protected(vgpu, G)


def test_track_write_outside_a_tracked_page_is_filtered(gvt) -> None:
    vm, vgpu = gvt()
    vgpu.get_ppgtt_mm([chain(vm)])
    guest_write64(vm, DATA + 0x10, 5)
    assert vgpu.stats.track_write_calls == 1 and vgpu.stats.handled_writes == 0
