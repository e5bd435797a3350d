"""Huge pages under dirty logging (TDP with host huge pages): split, disallow, recover.

Spec: kvm-dirty-log.md §2.2, §2.4, §7 cases 13–16 and 23 (after dirty_log_page_splitting_test).
"""

from __future__ import annotations

from dirty_log_helpers import DATA_GFN, LoggedGuest
from pagetrack.mmu import SPTE_W
from pagetrack.plugins.dirty_log import bitmap_gfns, clear_dirty_log, get_dirty_log

MIB4 = 4 << 20  # two 2 MiB regions at DATA_BASE (2 MiB aligned)
NPAGES = MIB4 >> 12

# every round writes one byte to every data page
TOUCH_ALL = """
again:
    mov rbx, rdi
    mov rcx, DATA_PAGES
next:
    mov byte ptr [rbx], 1
    add rbx, 4096
    dec rcx
    jnz next
    out ROUND_PORT, al
    jmp again
"""


def huge_guest(mode: str = "bitmap", **options: object) -> LoggedGuest:
    g = LoggedGuest(TOUCH_ALL, mode=mode, log=False, data_size=MIB4, host_huge_pages=True, **options)
    assert g.run() == "round"
    return g


def data_counts(g: LoggedGuest) -> tuple[int, int]:
    """(4K leaves, 2M leaves) inside the data slot."""
    tdp = g.vm.mmu.tdp
    small = sum(1 for gfn in tdp.levels[1] if DATA_GFN <= gfn < DATA_GFN + NPAGES)
    big = sum(1 for frame in tdp.levels[2] if DATA_GFN <= frame << 9 < DATA_GFN + NPAGES)
    return small, big


def test_population_maps_the_slot_with_2m_pages() -> None:
    g = huge_guest()
    assert data_counts(g) == (0, 2)
    g.close()


def test_case_14_enabling_logging_splits_eagerly() -> None:
    """§7 case 14: no manual caps, eager_page_split=Y, TDP: right after enabling logging there are
    no huge mappings and ≥ npages 4K mappings, all write-protected; a write logs one page."""
    g = huge_guest()
    g.vm.enable_dirty_logging(g.data)
    small, big = data_counts(g)
    assert big == 0 and small >= NPAGES
    assert not any(g.vm.mmu.tdp.levels[1][DATA_GFN + i] & SPTE_W for i in range(NPAGES))
    g.close()


def test_case_13_initially_set_splits_at_the_first_clear() -> None:
    """§7 case 13: PROTECT_ENABLE|INITIALLY_SET: enabling logging keeps the huge mappings; the first
    full CLEAR splits them all (eager splitting) and protects the cleared pages."""
    g = huge_guest("clear-initially-set")
    g.vm.enable_dirty_logging(g.data)
    assert data_counts(g) == (0, 2)
    bm = get_dirty_log(g.vm, g.data)
    assert len(bitmap_gfns(g.data, bm)) == NPAGES
    clear_dirty_log(g.vm, g.data, 0, NPAGES, bm)
    small, big = data_counts(g)
    assert big == 0 and small == NPAGES
    assert not g.data_spte(0) & SPTE_W
    g.close()


def test_case_13_without_eager_split_the_clear_write_protects_the_huge_leaf() -> None:
    """§2.3 step 1 without eager splitting: CLEAR write-protects the 2M leaf around the cleared range;
    the next write splits it lazily (fault, slow path) and logs that one page."""
    g = huge_guest("clear-initially-set", eager_split=False)
    g.vm.enable_dirty_logging(g.data)
    bm = get_dirty_log(g.vm, g.data)
    clear_dirty_log(g.vm, g.data, 0, NPAGES, bm)
    assert data_counts(g) == (0, 2)
    assert not g.data_spte(0) & SPTE_W
    g.close()


def test_case_15_faults_in_a_logged_slot_map_4k() -> None:
    """§7 case 15: while the slot logs, a fault on an unmapped page installs a 4K mapping."""
    g = LoggedGuest(TOUCH_ALL, log=True, data_size=MIB4, host_huge_pages=True)
    assert g.run() == "round"
    assert data_counts(g) == (NPAGES, 0)
    g.close()


def test_case_16_disabling_logging_brings_huge_pages_back() -> None:
    """§7 case 16: after logging is turned off and memory touched again, the 2M count equals the
    count after the original population (kvm_mmu_zap_collapsible_sptes)."""
    g = huge_guest()
    populated = data_counts(g)
    g.vm.enable_dirty_logging(g.data)
    assert g.run() == "round"
    assert data_counts(g)[1] == 0
    flushes = g.vm.mmu.stats.remote_tlb_flush
    g.vm.enable_dirty_logging(g.data, False)
    assert g.vm.mmu.stats.remote_tlb_flush == flushes + 1
    assert data_counts(g) == (0, 0)
    assert g.run() == "round"
    assert data_counts(g) == populated
    g.close()


def test_case_23_huge_writable_for_logging_spte_is_split_by_the_slow_path() -> None:
    """§7 case 23: without eager splitting, enabling logging only write-protects the 2M leaves; a
    write into one is refused by the fast path and the slow path maps 4K and logs only that gfn."""
    g = LoggedGuest("""
        mov rbx, rdi
        mov rcx, DATA_PAGES
    touch:
        mov byte ptr [rbx], 1
        add rbx, 4096
        dec rcx
        jnz touch
        out ROUND_PORT, al
        mov byte ptr [rdi + 5*4096 + 9], 2
        out ROUND_PORT, al
        hlt
    """, log=False, data_size=MIB4, host_huge_pages=True, eager_split=False)
    assert g.run() == "round"
    g.vm.enable_dirty_logging(g.data)
    assert data_counts(g) == (0, 2) and not g.data_spte(5) & SPTE_W
    stats = g.vm.mmu.stats
    fast, faults = stats.pf_fast, stats.pf_taken
    assert g.run() == "round"
    assert stats.pf_fast == fast and stats.pf_taken == faults + 1  # one fault, not fixed by the fast path
    assert bitmap_gfns(g.data, get_dirty_log(g.vm, g.data)) == [DATA_GFN + 5]
    assert data_counts(g) == (512, 1)  # the first region was split, its leaves inherit W=0
    assert sum(1 for i in range(512) if g.data_spte(i) & SPTE_W) == 0  # GET re-protected page 5 too
    g.close()
