"""Intel PML: D-bit re-arming, the 512-entry buffer, PML-full exits, flushes; the no-PML path.

Spec: kvm-dirty-log.md §2.6–§2.8, §6 (guest write model), §7 cases 19–22.
"""

from __future__ import annotations

from typing import Any

import pagetrack
import pytest
from dirty_log_helpers import DATA_GFN, LoggedGuest
from pagetrack.mmu import PML_HEAD_INDEX, PmlBuffer
from pagetrack.plugins.dirty_log import bitmap_gfns, get_dirty_log, reap_dirty_rings
from pagetrack.program import DATA_BASE

# round 1: write pages 0..N-1; round 2: the same again; hlt
TWICE = """
    mov r8, 2
pass:
    mov rbx, rdi
    mov rcx, N
next:
    mov qword ptr [rbx], r8
    add rbx, 4096
    dec rcx
    jnz next
    out ROUND_PORT, al
    dec r8
    jnz pass
    hlt
"""


class DirtyRecorder:
    """Records every ``mark_page_dirty`` (the order pages reach the dirty log)."""

    def __init__(self) -> None:
        self.gfns: list[int] = []

    @pagetrack.hookimpl
    def mark_page_dirty(self, gfn: int) -> None:
        self.gfns.append(gfn)


def pml_guest(n: int, mode: str = "pml", **kw: Any) -> LoggedGuest:
    return LoggedGuest(TWICE, mode=mode, data_size=4 << 20, defines={"N": n}, **kw)


def test_pml_buffer_fills_downwards_and_drains_oldest_first() -> None:
    buf = PmlBuffer()
    assert buf.empty and buf.index == PML_HEAD_INDEX == 511
    for i in range(512):
        assert buf.log((i << 12) | 0x123)
    assert buf.full and not buf.log(0x999000)
    out = buf.drain()
    assert out == [i << 12 for i in range(512)] and buf.empty


def test_case_19_rearm_clears_d_and_the_next_write_logs_without_an_exit() -> None:
    """§7 case 19: with PML a page re-armed by GET keeps W and loses D; the next guest write sets D
    and logs the gpa in the PML buffer without a VM-exit (no fault)."""
    g = pml_guest(4)
    g.run()
    assert g.writable_dirty(2) == (True, True)
    assert bitmap_gfns(g.data, get_dirty_log(g.vm, g.data)) == [DATA_GFN + i for i in range(4)]
    assert g.writable_dirty(2) == (True, False)
    assert (DATA_BASE >> 12) + 2 not in g.vcpu.wtlb  # flushed by GET
    faults = g.vm.mmu.stats.pf_taken
    g.vcpu.native.read(DATA_BASE + 2 * 4096, 8)  # a read does not log, and is not cached writable
    assert len(g.vcpu.pml) == 0 and (DATA_BASE >> 12) + 2 not in g.vcpu.wtlb
    g.vcpu.native.write(DATA_BASE + 2 * 4096 + 8, 8, 7)  # the CPU's store
    assert g.vm.mmu.stats.pf_taken == faults
    assert len(g.vcpu.pml) == 1 and int(g.vcpu.pml.entries[511]) == DATA_BASE + 2 * 4096
    assert g.writable_dirty(2) == (True, True) and (DATA_BASE >> 12) + 2 in g.vcpu.wtlb
    g.close()


def test_case_20_513_clean_pages_give_one_pml_full_exit_and_write_order() -> None:
    """§7 case 20: dirtying 513 clean (re-armed) 4K pages without other exits gives exactly one
    PML-full exit; after the flush all 513 pages are marked dirty in write order."""
    rec = DirtyRecorder()
    g = pml_guest(513)
    g.vm.register_tracker(rec, "rec")
    g.run()
    g.harvest()  # GET re-arms by clearing D
    rec.gfns.clear()
    faults = g.vm.mmu.stats.pf_taken
    assert g.run() == "round"
    assert g.vcpu.pml_full_exits == 1 and g.vm.mmu.stats.pf_taken == faults
    assert rec.gfns == [DATA_GFN + i for i in range(513)]
    assert g.harvest() == [DATA_GFN + i for i in range(513)]
    g.close()


def test_case_21_get_flushes_the_pml_buffers_first() -> None:
    """§7 case 21: a GET with entries still in a vCPU's PML buffer kicks the vCPU
    (kvm_arch_sync_dirty_log); modelled synchronously, so nothing is lost or late."""
    g = pml_guest(4)
    g.run()
    g.harvest()
    g.vcpu.native.write(DATA_BASE + 3 * 4096, 8, 1)
    assert len(g.vcpu.pml) == 1
    assert bitmap_gfns(g.data, get_dirty_log(g.vm, g.data)) == [DATA_GFN + 3]
    assert g.vcpu.pml.empty
    g.close()


@pytest.mark.parametrize("tdp", [True, False], ids=["tdp", "shadow"])
def test_case_22_without_pml_every_first_write_after_rearm_is_a_fast_path_fault(tdp: bool) -> None:
    """§7 case 22: no PML: logging write-protects the slot; each first write after a re-arm takes a
    write-protection fault fixed by the fast path (TDP; shadow takes the slow path)."""
    g = pml_guest(16, mode="bitmap", tdp=tdp)
    g.run()
    g.harvest()
    if tdp:
        assert all(g.writable_dirty(i) == (False, True) for i in range(16))
    stats = g.vm.mmu.stats
    faults, fast = stats.pf_taken, stats.pf_fast
    g.run()
    assert stats.pf_taken - faults == 16
    assert stats.pf_fast - fast == (16 if tdp else 0)
    assert g.vcpu.pml is None
    g.close()


def test_pml_needs_ept_shadow_paging_falls_back_to_write_protection() -> None:
    """§2.7/§2.8: with shadow paging the CPU has no PML: no buffer, re-arming clears W."""
    g = pml_guest(8, tdp=False)
    assert g.vm.mmu.cpu_dirty_log_size == 0 and g.vcpu.pml is None
    g.run()
    assert g.harvest() == [DATA_GFN + i for i in range(8)]
    g.run()
    assert g.harvest() == [DATA_GFN + i for i in range(8)]
    g.close()


def test_pml_enable_follows_the_number_of_logging_slots() -> None:
    """kvm_mmu_update_cpu_dirty_logging: PML logging is on only while a memslot logs."""
    g = pml_guest(4, log=False)
    assert g.vcpu.pml is not None and not g.vcpu.pml_enabled
    g.vm.enable_dirty_logging(g.data)
    assert g.vcpu.pml_enabled
    g.vm.enable_dirty_logging(g.data, False)
    assert not g.vcpu.pml_enabled
    g.close()


def test_pml_counters_and_exit_flush() -> None:
    """Every return from KVM_RUN drains the buffer (vmx_flush_pml_buffer at each exit)."""
    g = pml_guest(8)
    g.run()
    g.harvest()
    flushes = g.vcpu.pml_flushes
    g.run()
    assert g.vcpu.pml.empty and g.vcpu.pml_flushes == flushes + 1
    assert g.logger.harvest(g.vm)[g.data.key] == [DATA_GFN + i for i in range(8)]
    assert g.logger.round_stats[-1]["pml_flushes"] == 1
    g.close()


def test_ring_with_pml_pushes_flushed_entries_in_write_order() -> None:
    """PML + ring: the flush pushes to the vCPU's ring in the order the CPU logged; the soft limit
    reserves 512 more entries (§1.6)."""
    g = pml_guest(20, mode="ring", pml=True, ring_size=1024)
    ring = g.vcpu.dirty_ring
    assert ring.soft_limit == 1024 - 576
    g.run()
    g.harvest()
    g.run()
    got = [off for slot, off in reap_dirty_rings(g.vm) if slot == g.data.key]
    assert got == list(range(20))
    g.close()
