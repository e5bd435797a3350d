"""The guest page-table walker (``FNAME(walk_addr_generic)``) in its three modes.

The walker gives the shadow MMU the guest table gfns per level (which shadow
pages shadow, spec §2.8) and the 4-byte/8-byte entry geometry the quadrant logic
of §4.5 depends on; A/D updates go through ``set_bits`` (KVM's cmpxchg on the
guest entry, not an emulated write, hence never a page-track notification).
"""

from __future__ import annotations

import pytest
from pagetrack.mmu import PagingMode, walk_addr
from pagetrack.mmu.paging import (
    ACC_USER,
    ACC_WRITE,
    PFERR_PRESENT,
    PFERR_USER,
    PFERR_WRITE,
)

P, RW, US, A, D, PS = 1, 2, 4, 0x20, 0x40, 0x80


class Mem:
    """Guest-physical memory as a dict of entries, with a log of A/D updates."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self.cells: dict[int, int] = {}
        self.updates: list[tuple[int, int, int]] = []
        self.fail_next = 0

    def set(self, gpa: int, value: int) -> None:
        self.cells[gpa] = value

    def read(self, gpa: int, size: int) -> int:
        assert size == self.size
        return self.cells.get(gpa, 0)

    def set_bits(self, gpa: int, size: int, old: int, new: int) -> bool:
        if self.fail_next:
            self.fail_next -= 1
            return False
        assert self.cells.get(gpa, 0) == old
        self.cells[gpa] = new
        self.updates.append((gpa, old, new))
        return True


def long_tables(mem: Mem, gva: int, leaf_flags: int = P | RW | US, frame: int = 0x777000) -> None:
    """PML4 at 0x1000, PDPT 0x2000, PD 0x3000, PT 0x4000 mapping ``gva`` to ``frame``."""
    mode = PagingMode.LONG
    mem.set(0x1000 + 8 * mode.index(gva, 4), 0x2000 | P | RW | US)
    mem.set(0x2000 + 8 * mode.index(gva, 3), 0x3000 | P | RW | US)
    mem.set(0x3000 + 8 * mode.index(gva, 2), 0x4000 | P | RW | US)
    mem.set(0x4000 + 8 * mode.index(gva, 1), frame | leaf_flags)


GVA = 0x0000_7F12_3456_7ABC


def test_long_mode_walk_reports_every_table_and_entry() -> None:
    mem = Mem(8)
    long_tables(mem, GVA)
    w = walk_addr(PagingMode.LONG, 0x1000, GVA, 0, mem.read, None)
    assert w.fault is None
    assert w.gfn == 0x777 and w.gpa == 0x777ABC and w.level == 1
    assert w.table_gfn[4:0:-1] == [1, 2, 3, 4]
    mode = PagingMode.LONG
    assert w.pte_gpa[1] == 0x4000 + 8 * mode.index(GVA, 1)
    assert w.pte_gpa[4] == 0x1000 + 8 * mode.index(GVA, 4)
    assert w.access == ACC_WRITE | ACC_USER
    assert mem.updates == []  # set_bits=None: no A/D update


def test_accessed_bits_top_down_and_dirty_on_the_leaf_for_a_write() -> None:
    mem = Mem(8)
    long_tables(mem, GVA)
    w = walk_addr(PagingMode.LONG, 0x1000, GVA, PFERR_WRITE, mem.read, mem.set_bits)
    assert w.fault is None and w.dirty
    gpas = [u[0] for u in mem.updates]
    assert gpas == [w.pte_gpa[lv] for lv in (4, 3, 2, 1)]
    assert all(new == old | A for _, old, new in mem.updates[:3])
    assert mem.updates[3][2] == mem.updates[3][1] | A | D
    # a read only sets A; nothing to do the second time
    mem2 = Mem(8)
    long_tables(mem2, GVA)
    walk_addr(PagingMode.LONG, 0x1000, GVA, 0, mem2.read, mem2.set_bits)
    assert all(not new & D for _, _, new in mem2.updates)
    mem2.updates.clear()
    walk_addr(PagingMode.LONG, 0x1000, GVA, 0, mem2.read, mem2.set_bits)
    assert mem2.updates == []


def test_a_lost_cmpxchg_restarts_the_walk() -> None:
    mem = Mem(8)
    long_tables(mem, GVA)
    mem.fail_next = 1
    w = walk_addr(PagingMode.LONG, 0x1000, GVA, PFERR_WRITE, mem.read, mem.set_bits)
    assert w.fault is None and len(mem.updates) == 4


def test_not_present_fault_has_no_present_bit() -> None:
    mem = Mem(8)
    long_tables(mem, GVA)
    mem.set(0x3000 + 8 * PagingMode.LONG.index(GVA, 2), 0)
    w = walk_addr(PagingMode.LONG, 0x1000, GVA, PFERR_WRITE | PFERR_USER, mem.read, mem.set_bits)
    assert w.fault == PFERR_WRITE | PFERR_USER
    assert mem.updates == []


@pytest.mark.parametrize(("flags", "ec"), [
    (P | US, PFERR_WRITE),  # read-only leaf, write
    (P | RW, PFERR_USER),  # supervisor page, user access
])
def test_protection_fault_has_present_bit(flags: int, ec: int) -> None:
    mem = Mem(8)
    long_tables(mem, GVA, leaf_flags=flags)
    w = walk_addr(PagingMode.LONG, 0x1000, GVA, ec, mem.read, mem.set_bits)
    assert w.fault == ec | PFERR_PRESENT
    assert mem.updates == []


def test_read_only_upper_level_entry_restricts_access() -> None:
    mem = Mem(8)
    long_tables(mem, GVA)
    mem.set(0x2000 + 8 * PagingMode.LONG.index(GVA, 3), 0x3000 | P | US)
    w = walk_addr(PagingMode.LONG, 0x1000, GVA, 0, mem.read, None)
    assert w.fault is None and w.access == ACC_USER
    assert walk_addr(PagingMode.LONG, 0x1000, GVA, PFERR_WRITE, mem.read, None).fault == PFERR_WRITE | PFERR_PRESENT


def test_2m_and_1g_pages_in_long_mode() -> None:
    mem = Mem(8)
    gva = 0x4060_1234
    mode = PagingMode.LONG
    mem.set(0x1000 + 8 * mode.index(gva, 4), 0x2000 | P | RW)
    mem.set(0x2000 + 8 * mode.index(gva, 3), 0x3000 | P | RW)
    mem.set(0x3000 + 8 * mode.index(gva, 2), 0x8000_0000 | P | RW | PS)
    w = walk_addr(mode, 0x1000, gva, 0, mem.read, None)
    assert (w.level, w.gfn) == (2, (0x8000_0000 | (gva & 0x1F_FFFF)) >> 12)
    mem.set(0x2000 + 8 * mode.index(gva, 3), 0x1_0000_0000 | P | RW | PS)
    w = walk_addr(mode, 0x1000, gva, 0, mem.read, None)
    assert (w.level, w.gfn) == (3, (0x1_0000_0000 | (gva & 0x3FFF_FFFF)) >> 12)


def test_pt32_two_levels_four_byte_entries_and_pse() -> None:
    mem = Mem(4)
    mode = PagingMode.PT32
    gva = 0xC05F_F123
    assert (mode.index(gva, 2), mode.index(gva, 1)) == (gva >> 22, (gva >> 12) & 1023)
    mem.set(0x5000 + 4 * (gva >> 22), 0x6000 | P | RW | US)
    mem.set(0x6000 + 4 * ((gva >> 12) & 1023), 0x0012_3000 | P | RW | US)
    w = walk_addr(mode, 0x5000, gva, PFERR_WRITE, mem.read, mem.set_bits)
    assert w.fault is None and w.gfn == 0x123 and w.level == 1
    assert (w.table_gfn[2], w.table_gfn[1]) == (5, 6)
    assert w.pte_gpa[1] == 0x6000 + 4 * 0x1FF  # 4-byte entries
    # a 4 MiB PSE page
    mem.set(0x5000 + 4 * (gva >> 22), 0x0840_0000 | P | RW | PS)
    w = walk_addr(mode, 0x5000, gva, 0, mem.read, None)
    assert (w.level, w.gfn) == (2, (0x0840_0000 | (gva & 0x3F_FFFF)) >> 12)
    # without CR4.PSE the PS bit is ignored: the PDE points to a table
    w = walk_addr(mode, 0x5000, gva, 0, mem.read, None, pse=False)
    assert w.level == 1 and w.table_gfn[1] == 0x8400


def test_pae_uses_four_pdptes_at_cr3() -> None:
    mem = Mem(8)
    mode = PagingMode.PAE
    gva = 0x8040_2000  # PDPTE 2
    assert mode.index(gva, 3) == 2
    mem.set(0x7020 + 8 * 2, 0x9000 | P)
    mem.set(0x9000 + 8 * mode.index(gva, 2), 0xA000 | P | RW)
    mem.set(0xA000 + 8 * mode.index(gva, 1), 0x55000 | P | RW)
    w = walk_addr(mode, 0x7020, gva, 0, mem.read, mem.set_bits)
    assert w.fault is None and w.gfn == 0x55
    assert (w.table_gfn[3], w.table_gfn[2], w.table_gfn[1]) == (7, 9, 0xA)
    assert w.pte_gpa[3] == 0x7030
    # the PDPTE has no A bit to set; the PDE and PTE do
    assert [u[0] for u in mem.updates] == [w.pte_gpa[2], w.pte_gpa[1]]
    mem.set(0x7030, 0)
    assert walk_addr(mode, 0x7020, gva, PFERR_WRITE, mem.read, None).fault == PFERR_WRITE
