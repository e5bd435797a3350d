"""Manual protect: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_CLEAR_DIRTY_LOG, INITIALLY_SET.

Spec: kvm-dirty-log.md §1.4, §1.5, §4.2, §7 cases 5–12, 36, 37, 43.
"""

from __future__ import annotations

import numpy as np
import pytest
from dirty_log_helpers import DATA_GFN, LoggedGuest, make_vm
from pagetrack.errors import KvmError
from pagetrack.memory import KVM_MEM_LOG_DIRTY_PAGES
from pagetrack.mmu import SPTE_W
from pagetrack.plugins.dirty_log import (
    bitmap_gfns,
    check_extension,
    clear_dirty_log,
    enable_dirty_ring,
    enable_manual_dirty_log_protect,
    get_dirty_log,
    gfns_to_bitmap,
    qemu_log_clear,
)
from pagetrack.plugins.dirty_log.uapi import (
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
)
from pagetrack.program import DATA_BASE

PAGING = pytest.mark.parametrize("tdp", [True, False], ids=["tdp", "shadow"])
PE, IS = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_DIRTY_LOG_INITIALLY_SET

# round 1: pages 3 and 70; round 2: page 3 again; round 3: nothing
ROUNDS = """
    mov qword ptr [rdi + 3*4096], 1
    mov qword ptr [rdi + 70*4096], 1
    out ROUND_PORT, al
    mov qword ptr [rdi + 3*4096], 2
    out ROUND_PORT, al
    out ROUND_PORT, al
    hlt
"""


def errno_of(fn, *args) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(KvmError) as err:
        fn(*args)
    return err.value.errno_name


def test_case_11_enable_cap_rules() -> None:
    """§7 case 11 / §1.4: INITIALLY_SET alone → EINVAL; PROTECT_ENABLE|INITIALLY_SET → 0; cap.flags,
    unknown bits → EINVAL; 0 turns it off; CHECK_EXTENSION offers 3."""
    vm = make_vm()
    assert check_extension(vm, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) == PE | IS
    assert errno_of(enable_manual_dirty_log_protect, vm, IS) == "EINVAL"
    assert errno_of(enable_manual_dirty_log_protect, vm, 1 << 2) == "EINVAL"
    assert errno_of(enable_manual_dirty_log_protect, vm, PE | 1 << 2) == "EINVAL"
    assert errno_of(enable_manual_dirty_log_protect, vm, PE, 1) == "EINVAL"
    assert vm.manual_dirty_log_protect == 0
    assert enable_manual_dirty_log_protect(vm, PE | IS) == 0 and vm.manual_dirty_log_protect == PE | IS
    assert enable_manual_dirty_log_protect(vm, PE) == 0 and vm.manual_dirty_log_protect == PE
    assert enable_manual_dirty_log_protect(vm, 0) == 0 and vm.manual_dirty_log_protect == 0
    vm.close()


@PAGING
def test_case_5_manual_get_never_clears(tdp: bool) -> None:
    """§7 case 5: with PROTECT_ENABLE two GETs return the same bits plus new ones; no flush."""
    g = LoggedGuest(ROUNDS, mode="clear", tdp=tdp)
    g.run()
    flushes = g.vm.mmu.stats.remote_tlb_flush
    first = get_dirty_log(g.vm, g.data)
    assert bitmap_gfns(g.data, first) == [DATA_GFN + 3, DATA_GFN + 70]
    assert np.array_equal(get_dirty_log(g.vm, g.data), first)
    assert g.vm.mmu.stats.remote_tlb_flush == flushes
    g.vm.write_guest(DATA_BASE + 9 * 4096, b"x")
    assert bitmap_gfns(g.data, get_dirty_log(g.vm, g.data)) == [DATA_GFN + 3, DATA_GFN + 9, DATA_GFN + 70]
    g.close()


@PAGING
def test_case_6_clear_rearms_exactly_the_cleared_pages(tdp: bool) -> None:
    """§7 case 6: after CLEAR of page 3 and 70, a re-write of 3 is reported, 70 (not written) is not."""
    g = LoggedGuest(ROUNDS, mode="clear", tdp=tdp)
    g.run()
    bm = get_dirty_log(g.vm, g.data)
    flushes = g.vm.mmu.stats.remote_tlb_flush
    assert clear_dirty_log(g.vm, g.data, 0, g.data.npages, bm) == 0
    assert g.vm.mmu.stats.remote_tlb_flush == flushes + 1
    if tdp:
        assert not g.data_spte(3) & SPTE_W and not g.data_spte(70) & SPTE_W
    assert not get_dirty_log(g.vm, g.data).any()
    g.run()
    assert bitmap_gfns(g.data, get_dirty_log(g.vm, g.data)) == [DATA_GFN + 3]
    g.close()


def test_cases_7_8_9_clear_alignment_and_range_rules() -> None:
    """§7 cases 7–9 on a 1 GiB + 3 pages slot (262147 pages): first_page % 64 → EINVAL; a
    num_pages that is not a multiple of 64 only if it reaches the slot end; out of range → EINVAL."""
    vm = make_vm("clear")
    slot = vm.add_memory(1 << 32, (1 << 30) + 3 * 4096, flags=KVM_MEM_LOG_DIRTY_PAGES, slot=1)
    n = slot.npages
    assert n == 262147
    full = np.zeros((n + 63) // 64, dtype=np.uint64)
    assert errno_of(clear_dirty_log, vm, slot, 32, 64, full) == "EINVAL"  # case 7
    assert clear_dirty_log(vm, slot, 0, n, full) == 0  # case 8: reaches the end
    assert errno_of(clear_dirty_log, vm, slot, 0, 100, full) == "EINVAL"
    last = (n - 3) & ~63
    assert clear_dirty_log(vm, slot, last, n - last, full) == 0
    assert clear_dirty_log(vm, slot, 64, 128, full) == 0  # aligned, inside
    assert clear_dirty_log(vm, slot, 0, 0, full) == 0  # zero length: nothing
    assert errno_of(clear_dirty_log, vm, slot, n + 61, 0, full) == "EINVAL"  # case 9: first > npages
    assert errno_of(clear_dirty_log, vm, slot, last, n - last + 1, full) == "EINVAL"  # num too big
    assert errno_of(clear_dirty_log, vm, slot, 0, n, full[:10]) == "EFAULT"  # short user buffer
    assert errno_of(clear_dirty_log, vm, slot.key + 1, 0, 64, full) == "ENOENT"
    assert errno_of(clear_dirty_log, vm, 3 << 16 | 1, 0, 64, full) == "EINVAL"
    # EINVAL for first_page is checked before ENOENT, as in kvm_clear_dirty_log_protect
    assert errno_of(clear_dirty_log, vm, slot.key + 1, 32, 64, full) == "EINVAL"
    vm.close()


@PAGING
def test_case_10_clear_bits_for_clean_pages_or_past_the_end_do_nothing(tdp: bool) -> None:
    """§7 case 10: input bits of clean pages and of bit positions ≥ npages: success, no re-protect, no flush."""
    g = LoggedGuest(ROUNDS, mode="clear", tdp=tdp, data_size=100 << 12)
    g.run()
    rearmed: list[tuple[int, int]] = []
    orig = g.vm.mmu.enable_log_dirty_pt_masked
    g.vm.mmu.enable_log_dirty_pt_masked = lambda slot, off, mask, **kw: (rearmed.append((off, mask)),
                                                                         orig(slot, off, mask, **kw))
    flushes = g.vm.mmu.stats.remote_tlb_flush
    junk = np.array([(1 << 64) - 1 - (1 << 3), ((1 << 64) - 1) ^ (1 << (70 - 64))], dtype=np.uint64)
    assert clear_dirty_log(g.vm, g.data, 0, 100, junk) == 0
    assert rearmed == [] and g.vm.mmu.stats.remote_tlb_flush == flushes
    assert bitmap_gfns(g.data, get_dirty_log(g.vm, g.data)) == [DATA_GFN + 3, DATA_GFN + 70]
    clear_dirty_log(g.vm, g.data, 0, 100, np.array([1 << 3, 1 << 6], dtype=np.uint64))
    assert rearmed == [(0, 1 << 3), (64, 1 << 6)]
    g.close()


@PAGING
def test_case_12_initially_set_reports_every_page_and_skips_protection(tdp: bool) -> None:
    """§7 case 12 (+ §2.2 step 1): with PROTECT_ENABLE|INITIALLY_SET, enabling logging sets bits
    0..npages−1 (none past), write-protects nothing and does not flush."""
    g = LoggedGuest(ROUNDS, mode="clear-initially-set", tdp=tdp, log=False, data_size=100 << 12)
    g.run()
    flushes = g.vm.mmu.stats.remote_tlb_flush
    g.vm.enable_dirty_logging(g.data)
    assert g.vm.mmu.stats.remote_tlb_flush == flushes
    if tdp:
        assert g.data_spte(3) & SPTE_W  # still writable
    bm = get_dirty_log(g.vm, g.data)
    assert bitmap_gfns(g.data, bm) == list(range(DATA_GFN, DATA_GFN + 100))
    assert int(bm[1]) == (1 << 36) - 1  # bits 100..127 stay clear
    g.close()


@PAGING
def test_case_37_protect_enable_alone_starts_clean_and_protected(tdp: bool) -> None:
    """§7 case 37: PROTECT_ENABLE without INITIALLY_SET: zero bitmap, whole slot protected at enable."""
    g = LoggedGuest(ROUNDS, mode="clear", tdp=tdp, log=False)
    g.run()
    flushes = g.vm.mmu.stats.remote_tlb_flush
    g.vm.enable_dirty_logging(g.data)
    assert g.vm.mmu.stats.remote_tlb_flush == flushes + 1
    assert not get_dirty_log(g.vm, g.data).any()
    if tdp:
        assert not g.data_spte(3) & SPTE_W and not g.data_spte(70) & SPTE_W
    g.run()
    assert bitmap_gfns(g.data, get_dirty_log(g.vm, g.data)) == [DATA_GFN + 3]
    g.close()


def test_case_36_ring_with_initially_set_loses_writes() -> None:
    """§7 case 36: ring + INITIALLY_SET: enabling logging neither protects nor allocates a bitmap,
    so writes through existing writable mappings go unreported (why QEMU never combines them)."""
    vm = make_vm()
    enable_dirty_ring(vm, 4096)
    enable_manual_dirty_log_protect(vm, PE | IS)
    g = LoggedGuest(ROUNDS, vm=vm, log=False)
    g.run()  # pages 3 and 70 now mapped writable
    g.vm.enable_dirty_logging(g.data)
    assert g.data.dirty_bitmap is None and g.data_spte(3) & SPTE_W
    g.run()  # rewrites page 3
    assert g.vcpu.dirty_ring.dirty_index == 0  # nothing pushed: the write went unreported
    g.close()


def test_case_43_qemu_aligned_clear_carries_only_the_requested_bits() -> None:
    """§7 case 43 (QEMU kvm_log_clear_one_slot): a clear of [70, 75) is issued as [64, 128) with
    zero bits outside [70, 75), so pages dirtied but not asked for keep their bits."""
    vm = make_vm("clear")
    slot = vm.add_memory(DATA_BASE, 200 << 12, flags=KVM_MEM_LOG_DIRTY_PAGES, slot=1)
    for rel in (65, 70, 74, 75, 130):
        vm.write_guest(DATA_BASE + rel * 4096, b"x")
    copy = get_dirty_log(vm, slot)
    req = qemu_log_clear(vm, slot, copy, 70, 5)
    assert (req.first_page, req.num_pages) == (64, 64)
    assert bitmap_gfns(slot, req.bitmap, req.first_page) == [DATA_GFN + 70, DATA_GFN + 74]
    assert bitmap_gfns(slot, get_dirty_log(vm, slot)) == [DATA_GFN + r for r in (65, 75, 130)]
    assert bitmap_gfns(slot, copy) == [DATA_GFN + r for r in (65, 75, 130)]  # dropped from the copy
    # the tail: [190, 200) is clipped to the slot end, not rounded up to 256
    vm.write_guest(DATA_BASE + 199 * 4096, b"y")
    copy = get_dirty_log(vm, slot)
    req = qemu_log_clear(vm, slot, copy, 190, 10)
    assert (req.first_page, req.num_pages) == (128, 72)
    assert bitmap_gfns(slot, req.bitmap, 128) == [DATA_GFN + 199]
    assert DATA_GFN + 130 in bitmap_gfns(slot, get_dirty_log(vm, slot))
    vm.close()


def test_gfns_to_bitmap_round_trips() -> None:
    vm = make_vm()
    slot = vm.add_memory(DATA_BASE, 130 << 12, flags=KVM_MEM_LOG_DIRTY_PAGES, slot=1)
    gfns = [DATA_GFN, DATA_GFN + 63, DATA_GFN + 64, DATA_GFN + 129]
    assert bitmap_gfns(slot, gfns_to_bitmap(slot, gfns)) == gfns
    assert bitmap_gfns(slot, gfns_to_bitmap(slot, gfns, 64, 66), 64) == gfns[2:]
    vm.close()
