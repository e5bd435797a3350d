"""The dirty ring: enable rules, push, soft-full exits, harvest and KVM_RESET_DIRTY_RINGS.

Spec: kvm-dirty-log.md §1.6, §2.5, §7 cases 24–35.
"""

from __future__ import annotations

import numpy as np
import pytest
from dirty_log_helpers import DATA_GFN, LoggedGuest, make_vm
from pagetrack.errors import InputError, KvmError
from pagetrack.memory import KVM_MEM_LOG_DIRTY_PAGES
from pagetrack.mmu import SPTE_W
from pagetrack.plugins.dirty_log import (
    DIRTY_GFN_DTYPE,
    check_extension,
    clear_dirty_log,
    enable_dirty_ring,
    enable_pml,
    get_dirty_log,
    logger_of,
    reap_dirty_rings,
    reset_dirty_rings,
)
from pagetrack.plugins.dirty_log.uapi import (
    KVM_CAP_DIRTY_LOG_RING,
    KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP,
    KVM_DIRTY_GFN_F_DIRTY,
    KVM_DIRTY_GFN_F_RESET,
)
from pagetrack.program import DATA_BASE

PAGING = pytest.mark.parametrize("tdp", [True, False], ids=["tdp", "shadow"])

# writes 8 bytes to data pages 0, 1, 2, ... (N pages), one round, hlt
STORES = """
    mov rbx, rdi
    mov rcx, N
next:
    mov qword ptr [rbx], rcx
    add rbx, 4096
    dec rcx
    jnz next
    out ROUND_PORT, al
    hlt
"""


def errno_of(fn, *args) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(KvmError) as err:
        fn(*args)
    return err.value.errno_name


def ring_vm(entries: int = 256, pml: bool = False) -> tuple:  # type: ignore[type-arg]
    """A ring-mode VM with a 64-page logged slot and one vCPU (not running guest code)."""
    vm = make_vm("ring", ring_size=entries, pml=pml)
    slot = vm.add_memory(DATA_BASE, 64 << 12, flags=KVM_MEM_LOG_DIRTY_PAGES, slot=1)
    vcpu = vm.create_vcpu()
    return vm, slot, vcpu


def test_case_24_enable_rules() -> None:
    """§7 case 24: not a power of two → EINVAL; > 65536 entries → E2BIG; < PAGE_SIZE → EINVAL;
    after a vCPU exists → EINVAL; a second enable → EINVAL."""
    vm = make_vm()
    assert check_extension(vm, KVM_CAP_DIRTY_LOG_RING) == 65536 * 16
    assert check_extension(vm, KVM_CAP_DIRTY_LOG_RING_ACQ_REL) == 65536 * 16
    assert check_extension(vm, KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP) == 0  # arm64 only
    assert errno_of(enable_dirty_ring, vm, 3000) == "EINVAL"
    assert errno_of(enable_dirty_ring, vm, 0) == "EINVAL"
    assert errno_of(enable_dirty_ring, vm, 1 << 21) == "E2BIG"
    assert errno_of(enable_dirty_ring, vm, 2048) == "EINVAL"
    assert enable_dirty_ring(vm, 1 << 20, KVM_CAP_DIRTY_LOG_RING_ACQ_REL) == 0  # the maximum
    assert errno_of(enable_dirty_ring, vm, 4096) == "EINVAL"  # only once
    vm.close()
    vm = make_vm()
    vm.create_vcpu()
    assert errno_of(enable_dirty_ring, vm, 4096) == "EINVAL"  # vCPUs exist
    vm.close()


def test_case_25_reserved_entries_and_soft_limit() -> None:
    """§7 case 25: with PML (576 reserved) 8 KiB → EINVAL, 16 KiB → soft limit 448; without PML
    4 KiB works with soft limit 256 − 64."""
    vm = make_vm(pml=True)
    assert errno_of(enable_dirty_ring, vm, 8192) == "EINVAL"
    assert enable_dirty_ring(vm, 16384) == 0
    assert vm.create_vcpu().dirty_ring.soft_limit == 1024 - 576
    vm.close()
    vm = make_vm()
    assert enable_dirty_ring(vm, 4096) == 0
    ring = vm.create_vcpu().dirty_ring
    assert (ring.size, ring.soft_limit) == (256, 192)
    assert ring.entries.dtype == DIRTY_GFN_DTYPE and ring.entries.nbytes == 4096
    vm.close()


def test_ring_option_errors_are_input_errors() -> None:
    with pytest.raises(InputError, match="ring of 100 entries refused"):
        make_vm("ring", ring_size=100)
    with pytest.raises(InputError, match="initially_set"):
        make_vm("ring", initially_set=True)


def test_case_26_get_and_clear_are_enxio_with_a_ring() -> None:
    """§7 case 26: with a ring (no RING_WITH_BITMAP on x86) GET and CLEAR fail with ENXIO, and
    logging slots get no bitmap."""
    vm, slot, _ = ring_vm()
    assert slot.dirty_bitmap is None
    assert errno_of(get_dirty_log, vm, slot) == "ENXIO"
    assert errno_of(clear_dirty_log, vm, slot, 0, 64, np.zeros(1, np.uint64)) == "ENXIO"
    vm.close()
    vm = make_vm()
    assert errno_of(reset_dirty_rings, vm) == "EINVAL"  # no ring configured
    vm.close()


@PAGING
def test_case_27_a_first_write_pushes_one_entry(tdp: bool) -> None:
    """§7 case 27: the first write to page k pushes {DIRTY, as_id<<16|id, k} at dirty_index mod size
    on the writing vCPU's ring, and dirty_index increments."""
    g = LoggedGuest("mov qword ptr [rdi + 7*4096], 1\nout ROUND_PORT, al\nhlt", mode="ring",
                    ring_size=256, tdp=tdp)
    ring = g.vcpu.dirty_ring
    g.run()
    data = [tuple(e) for e in ring.entries[: ring.dirty_index].tolist() if e[1] == g.data.key]
    assert data == [(KVM_DIRTY_GFN_F_DIRTY, 1, 7)]
    assert ring.dirty_index == ring.used and ring.reset_index == 0
    g.close()


@PAGING
def test_case_28_soft_full_exits_before_guest_code_until_reset(tdp: bool) -> None:
    """§7 case 28: at used ≥ soft_limit the next KVM_RUN returns KVM_EXIT_DIRTY_RING_FULL before
    running guest code, and again on every KVM_RUN until a reset drains the ring."""
    g = LoggedGuest(STORES, mode="ring", ring_size=256, tdp=tdp, defines={"N": 250})
    ring = g.vcpu.dirty_ring
    assert g.run(collect_on_full=False) == "dirty_ring_full"
    # one exit may push a little past the limit (shadow paging: the guest PTE's page, then the data
    # page); the reserved entries are there for that
    assert ring.soft_limit == 192 <= ring.used <= 194
    used = ring.used
    rip, insns = g.vcpu.cpu.rip, g.vcpu.instructions
    for _ in range(3):
        assert g.vcpu.run().kind == "dirty_ring_full"
        assert (g.vcpu.cpu.rip, g.vcpu.instructions) == (rip, insns)
    assert g.vcpu.dirty_ring_full_exits == 4
    assert len(reap_dirty_rings(g.vm)) == used and reset_dirty_rings(g.vm) == used
    # under shadow paging each first write also pushes the guest page-table page (its D-bit
    # update): the rest needs one more drain
    while (why := g.run(collect_on_full=False)) == "dirty_ring_full":
        reap_dirty_rings(g.vm)
        reset_dirty_rings(g.vm)
    assert why == "round" and ring.used < ring.soft_limit
    g.close()


@PAGING
def test_case_29_reset_counts_clears_rearms_and_flushes_once(tdp: bool) -> None:
    """§7 case 29: reset returns the harvested count, zeroes those flags, advances reset_index,
    re-protects the pages and issues one VM-wide flush (none when nothing was harvested)."""
    g = LoggedGuest(STORES, mode="ring", ring_size=256, tdp=tdp, defines={"N": 10})
    g.run()
    ring = g.vcpu.dirty_ring
    flushes = g.vm.mmu.stats.remote_tlb_flush
    assert reset_dirty_rings(g.vm) == 0 and g.vm.mmu.stats.remote_tlb_flush == flushes
    got = reap_dirty_rings(g.vm)
    assert all(ring.entries["flags"][: len(got)] == KVM_DIRTY_GFN_F_RESET)
    assert reset_dirty_rings(g.vm) == len(got)
    assert g.vm.mmu.stats.remote_tlb_flush == flushes + 1
    assert ring.reset_index == len(got) and not ring.entries["flags"][: len(got)].any()
    if tdp:
        assert not any(g.data_spte(i) & SPTE_W for i in range(10))
    g.close()


def test_cases_30_31_reset_stops_at_the_first_unharvested_entry() -> None:
    """§7 case 30: e0 DIRTY (not harvested), e1 RESET → reset returns 0, e1 stays RESET.
    Case 31: flags 3 (DIRTY|RESET) count as harvested."""
    vm, slot, vcpu = ring_vm()
    ring = vcpu.dirty_ring
    ring.push(slot.key, 0)
    ring.push(slot.key, 1)
    ring.entries["flags"][1] = KVM_DIRTY_GFN_F_RESET
    assert reset_dirty_rings(vm) == 0
    assert ring.entries["flags"][1] == KVM_DIRTY_GFN_F_RESET and ring.reset_index == 0
    ring.entries["flags"][0] = KVM_DIRTY_GFN_F_DIRTY | KVM_DIRTY_GFN_F_RESET
    assert reset_dirty_rings(vm) == 2 and ring.used == 0
    vm.close()


def test_case_32_reset_coalesces_64_page_windows() -> None:
    """§7 case 32 (kvm_dirty_ring_reset): runs of one slot are re-armed as (offset, 64-bit mask)
    batches; the window starts at the batch's lowest offset and may move backwards.

    Note: the spec says 100, 101, 99, 160 give two batches; the kernel's loop puts 160 in the
    first (160 − 99 = 61 < 64).  The model follows the kernel; 170 starts a second batch."""
    vm, _slot, vcpu = ring_vm()
    vm.add_memory(DATA_BASE + (1 << 20), 256 << 12, flags=KVM_MEM_LOG_DIRTY_PAGES, slot=2)
    big = vm.memslots.get(0, 2)
    calls: list[tuple[int, int]] = []
    orig = vm.mmu.enable_log_dirty_pt_masked
    vm.mmu.enable_log_dirty_pt_masked = lambda s, off, mask, **kw: (calls.append((off, mask)),
                                                                    orig(s, off, mask, **kw))
    ring = vcpu.dirty_ring
    for offsets, want in (([100, 101, 99, 160], [(99, 0b111 | 1 << 61)]),
                          ([100, 101, 99, 170], [(99, 0b111), (170, 1)]),
                          ([5, 200, 6], [(5, 1), (200, 1), (6, 1)])):
        calls.clear()
        for off in offsets:
            ring.push(big.key, off)
        reap_dirty_rings(vm)
        assert reset_dirty_rings(vm) == len(offsets)
        assert calls == want
    vm.close()


def test_case_33_entries_for_deleted_slots_or_bad_offsets_are_counted_not_rearmed() -> None:
    """§7 case 33: a harvested entry naming a deleted slot, an unknown id or an offset past the slot
    is reset and counted, but nothing is re-protected; the VMM ignores it (QEMU)."""
    vm, slot, vcpu = ring_vm()
    calls: list[int] = []
    vm.mmu.enable_log_dirty_pt_masked = lambda s, off, mask, **kw: calls.append(off)
    ring = vcpu.dirty_ring
    ring.push(slot.key, 64)  # offset == npages
    ring.push(7, 0)  # no slot 7
    ring.push(5 << 16 | 1, 0)  # address space 5
    other = vm.add_memory(DATA_BASE + (1 << 20), 4096, flags=KVM_MEM_LOG_DIRTY_PAGES, slot=3)
    ring.push(other.key, 0)
    vm.set_user_memory_region(other.key, 0, other.base_gfn << 12, 0, other.userspace_addr)  # delete
    logger = logger_of(vm)
    logger.harvest(vm)
    assert calls == [] and ring.used == 0
    assert logger.ring_entries_ignored == 4 and logger.rounds_of(slot.key) == [[]]
    vm.close()


def test_case_34_a_page_is_rearmed_only_by_the_reset() -> None:
    """§7 case 34: harvesting without a reset leaves the page writable: a later write is not logged
    (the spec's 'reset before reading the page'); after the reset it is."""
    g = LoggedGuest("""
        mov qword ptr [rdi + 3*4096], 1
        out ROUND_PORT, al
        mov qword ptr [rdi + 3*4096], 2
        out ROUND_PORT, al
        mov qword ptr [rdi + 3*4096], 3
        out ROUND_PORT, al
        hlt
    """, mode="ring", ring_size=256)
    ring = g.vcpu.dirty_ring
    g.run()
    assert (1, 3) in reap_dirty_rings(g.vm)  # harvested, not reset
    g.run()
    assert (1, 3) not in reap_dirty_rings(g.vm)  # the second write went unlogged
    reset_dirty_rings(g.vm)
    g.run()
    assert (1, 3) in reap_dirty_rings(g.vm) and ring.dirty_index > ring.reset_index
    g.close()


@PAGING
def test_case_35_ring_full_exit_before_the_write_retires(tdp: bool) -> None:
    """§7 case 35: when the push for a write fault fills the ring, the vCPU exits before the write
    retires: the newest entry's page still holds its old value; re-entry completes it."""
    g = LoggedGuest(STORES, mode="ring", ring_size=256, tdp=tdp, defines={"N": 250})
    assert g.run(collect_on_full=False) == "dirty_ring_full"
    ring = g.vcpu.dirty_ring
    last = ring.entries[(ring.dirty_index - 1) % ring.size]
    assert last["slot"] == g.data.key
    rel = int(last["offset"])
    assert g.page(rel)[:8] == bytes(8)  # not written yet
    assert g.page(rel - 1)[:8] != bytes(8)  # the one before was
    reap_dirty_rings(g.vm)
    reset_dirty_rings(g.vm)
    g.run(collect_on_full=False)
    assert g.page(rel)[:8] != bytes(8)
    g.close()


def test_marks_without_a_running_vcpu_are_lost_on_a_ring_vm() -> None:
    """§2.1 routing: on a ring VM a host write (no running vCPU) finds no bitmap: WARN, not logged."""
    vm, _slot, vcpu = ring_vm()
    vm.write_guest(DATA_BASE, b"host")
    assert vcpu.dirty_ring.dirty_index == 0 and logger_of(vm).marks_without_vcpu == 1
    vm.write_guest(DATA_BASE + 4096, b"host", vcpu=vcpu)  # on behalf of a running vCPU: pushed
    assert [tuple(e) for e in vcpu.dirty_ring.entries[:1].tolist()] == [(1, 1, 1)]
    vm.close()


def test_entries_are_harvested_in_order_and_the_round_deduplicates() -> None:
    """The ring does not deduplicate; the VMM folds entries into a sorted round."""
    vm, slot, vcpu = ring_vm()
    for off in (9, 3, 9, 1):
        vcpu.dirty_ring.push(slot.key, off)
    assert reap_dirty_rings(vm) == [(1, 9), (1, 3), (1, 9), (1, 1)]
    assert reset_dirty_rings(vm) == 4
    for off in (9, 3, 9, 1):
        vcpu.dirty_ring.push(slot.key, off)
    assert logger_of(vm).harvest(vm)[slot.key] == [DATA_GFN + 1, DATA_GFN + 3, DATA_GFN + 9]
    vm.close()


def test_pml_must_be_chosen_before_vcpus() -> None:
    vm = make_vm()
    vm.create_vcpu()
    assert errno_of(enable_pml, vm) == "EINVAL"
    vm.close()
