"""KVM_GET_DIRTY_LOG, the bitmap and KVM_MEM_LOG_DIRTY_PAGES flag changes.

Spec: kvm-dirty-log.md §1.1–§1.3, §2.1–§2.2, §7 cases 1–4, 17, 18, 38, 39.
"""

from __future__ import annotations

import numpy as np
import pytest
from dirty_log_helpers import DATA_GFN, LoggedGuest, Tracker, make_vm
from pagetrack.errors import KvmError
from pagetrack.memory import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY
from pagetrack.mmu import SPTE_W
from pagetrack.plugins.dirty_log import bitmap_gfns, get_dirty_log
from pagetrack.program import DATA_BASE

PAGING = pytest.mark.parametrize("tdp", [True, False], ids=["tdp", "shadow"])

# write data page 5, round, write page 5 again and page 99, round, hlt
TWO_ROUNDS = """
    mov qword ptr [rdi + 5*4096], 1
    out ROUND_PORT, al
    mov qword ptr [rdi + 5*4096], 2
    mov qword ptr [rdi + 99*4096 + 8], 3
    out ROUND_PORT, al
    hlt
"""


def test_case_1_get_on_a_slot_without_logging_is_enoent() -> None:
    """§7 case 1: GET on a slot created without KVM_MEM_LOG_DIRTY_PAGES → ENOENT."""
    vm = make_vm()
    slot = vm.add_memory(DATA_BASE, 0x10000, slot=1)
    with pytest.raises(KvmError) as err:
        get_dirty_log(vm, slot)
    assert err.value.errno_name == "ENOENT"
    for missing in (slot.key + 1, None):  # no such slot
        with pytest.raises(KvmError, match="ENOENT"):
            get_dirty_log(vm, missing)
    with pytest.raises(KvmError, match="EINVAL"):  # as_id 2 does not exist on x86
        get_dirty_log(vm, 2 << 16 | 1)
    vm.close()


@PAGING
def test_case_2_bit_layout_little_endian_words_nothing_past_npages(tdp: bool) -> None:
    """§7 case 2: bit k of word k/64, ALIGN(npages, 64)/8 bytes, no bit ≥ npages."""
    g = LoggedGuest(TWO_ROUNDS, tdp=tdp, data_size=100 << 12)  # 100 pages: not a multiple of 64
    g.run()
    g.run()  # past both rounds without harvesting
    bm = get_dirty_log(g.vm, g.data)
    assert bm.dtype == np.uint64 and bm.nbytes == 128 // 8  # ALIGN(100, 64) / 8
    raw = bm.tobytes()  # as copied to userspace: little-endian u64 words
    assert int.from_bytes(raw[0:8], "little") == 1 << 5
    assert int.from_bytes(raw[8:16], "little") == 1 << (99 - 64)
    assert bitmap_gfns(g.data, bm) == [DATA_GFN + 5, DATA_GFN + 99]
    g.close()


@PAGING
def test_cases_3_and_4_get_clears_and_rearms(tdp: bool) -> None:
    """§7 case 3: a second GET without writes is all zero; case 4: a re-write after GET is reported again."""
    g = LoggedGuest(TWO_ROUNDS, tdp=tdp)
    assert g.run() == "round"
    first = get_dirty_log(g.vm, g.data)
    assert bitmap_gfns(g.data, first) == [DATA_GFN + 5]
    assert not get_dirty_log(g.vm, g.data).any()  # case 3
    if tdp:
        assert not g.data_spte(5) & SPTE_W  # re-protected (W cleared)
    assert g.run() == "round"
    assert bitmap_gfns(g.data, get_dirty_log(g.vm, g.data)) == [DATA_GFN + 5, DATA_GFN + 99]  # case 4
    g.close()


@PAGING
def test_case_18_get_flushes_once_only_if_something_was_dirty(tdp: bool) -> None:
    """§7 case 18: no dirty word → no TLB flush; some → exactly one."""
    g = LoggedGuest(TWO_ROUNDS, tdp=tdp)
    g.run()
    stats = g.vm.mmu.stats
    before = stats.remote_tlb_flush
    get_dirty_log(g.vm, g.data)
    assert stats.remote_tlb_flush == before + 1
    get_dirty_log(g.vm, g.data)
    assert stats.remote_tlb_flush == before + 1
    g.close()


@PAGING
def test_case_17_enabling_logging_write_protects_and_flushes(tdp: bool) -> None:
    """§7 case 17 (and §2.2): enabling logging (FLAGS_ONLY) write-protects the slot and flushes,
    so no vCPU keeps a writable translation; the next write is logged."""
    g = LoggedGuest(TWO_ROUNDS, tdp=tdp, log=False)
    assert g.run() == "round"
    vpn = (DATA_BASE >> 12) + 5
    assert vpn in g.vcpu.wtlb  # cached writable before
    flushes = g.vm.mmu.stats.remote_tlb_flush
    g.vm.enable_dirty_logging(g.data)
    assert g.vm.mmu.stats.remote_tlb_flush == flushes + 1
    assert vpn not in g.vcpu.wtlb
    if tdp:
        assert not g.data_spte(5) & SPTE_W
    assert not get_dirty_log(g.vm, g.data).any()
    assert g.run() == "round"
    assert bitmap_gfns(g.data, get_dirty_log(g.vm, g.data)) == [DATA_GFN + 5, DATA_GFN + 99]
    g.close()


def test_case_38_flags_only_and_move_keep_the_bitmap_off_on_gives_a_fresh_one() -> None:
    """§7 case 38: FLAGS_ONLY (logging kept) and MOVE preserve the bits; off then on starts at zero."""
    vm = make_vm()
    slot = vm.add_memory(DATA_BASE, 0x10000, flags=KVM_MEM_LOG_DIRTY_PAGES, slot=1)
    vm.write_guest(DATA_BASE + 0x3000, b"x")
    bitmap = slot.dirty_bitmap
    vm.set_user_memory_region(slot.key, KVM_MEM_LOG_DIRTY_PAGES, DATA_BASE + 0x100000, 0x10000,
                              slot.userspace_addr)  # MOVE
    moved = vm.memslots.get(0, 1)
    assert moved is not None and moved.dirty_bitmap is bitmap
    assert bitmap_gfns(moved, get_dirty_log(vm, moved)) == [moved.base_gfn + 3]
    vm.write_guest(DATA_BASE + 0x100000 + 0x2000, b"y")
    vm.enable_dirty_logging(moved, False)
    off = vm.memslots.get(0, 1)
    assert off is not None and off.dirty_bitmap is None
    with pytest.raises(KvmError, match="ENOENT"):
        get_dirty_log(vm, off)
    vm.enable_dirty_logging(off)
    again = vm.memslots.get(0, 1)
    assert again is not None and not get_dirty_log(vm, again).any()
    vm.close()


@PAGING
def test_case_39_kvm_own_writes_are_logged(tdp: bool) -> None:
    """§7 case 39: host-side writes (kvm_write_guest) and emulated writes mark pages dirty."""
    g = LoggedGuest("hlt", tdp=tdp)
    g.vm.write_guest(DATA_BASE + 3 * 4096 + 10, b"host")  # kvm_write_guest: marks, never notifies
    assert bitmap_gfns(g.data, get_dirty_log(g.vm, g.data)) == [DATA_GFN + 3]
    # emulated write: write-track page 9 so the store faults into the emulator
    g2 = LoggedGuest("mov dword ptr [rdi + 9*4096], 5\nout ROUND_PORT, al\nhlt", tdp=tdp)
    tracker = Tracker()
    g2.vm.register_tracker(tracker, "t")
    g2.vm.write_track_add_gfn(DATA_GFN + 9)
    g2.run()
    assert g2.vm.mmu.stats.insn_emulation == 1 and tracker.writes == [(DATA_BASE + 9 * 4096, b"\5\0\0\0")]
    assert bitmap_gfns(g2.data, get_dirty_log(g2.vm, g2.data)) == [DATA_GFN + 9]
    g.close()
    g2.close()


def test_read_only_slots_log_flag_accepted_but_nothing_to_do() -> None:
    """§1.1 / §2.2: the kernel does not refuse LOG_DIRTY_PAGES on a READONLY slot (only toggling
    READONLY is EINVAL); kvm_mmu_slot_apply_flags does no MMU work and no flush for it."""
    vm = make_vm()
    ro = vm.add_memory(DATA_BASE, 0x10000, flags=KVM_MEM_READONLY, slot=1)
    flushes = vm.mmu.stats.remote_tlb_flush
    vm.set_user_memory_region(ro.key, KVM_MEM_READONLY | KVM_MEM_LOG_DIRTY_PAGES, DATA_BASE, 0x10000,
                              ro.userspace_addr)
    assert vm.mmu.stats.remote_tlb_flush == flushes
    logged = vm.memslots.get(0, 1)
    assert logged is not None and logged.logging and not get_dirty_log(vm, logged).any()
    with pytest.raises(KvmError, match="EINVAL"):  # READONLY may not toggle
        vm.set_user_memory_region(ro.key, KVM_MEM_LOG_DIRTY_PAGES, DATA_BASE, 0x10000, ro.userspace_addr)
    with pytest.raises(KvmError, match="EFAULT"):  # nor can the host write it through KVM
        vm.write_guest(DATA_BASE, b"x")
    with pytest.raises(KvmError, match="EINVAL"):  # unknown flag bits
        vm.add_memory(DATA_BASE + 0x100000, 0x1000, flags=1 << 2)
    vm.close()
