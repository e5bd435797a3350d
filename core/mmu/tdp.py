"""The TDP MMU's gpa → SPTE map (arch/x86/kvm/mmu/tdp_mmu.c).

A direct map with 4 KiB, 2 MiB and 1 GiB leaves, one dict per level keyed by the
frame number at that level.  Only leaves are modelled: the non-leaf TDP pages
carry no state that write tracking or dirty logging observes.
"""

from __future__ import annotations

from collections.abc import Iterator

from .spte import (
    SPTE_D,
    SPTE_MMU_WRITABLE,
    SPTE_PS,
    SPTE_W,
    leaf_change_needs_tlb_flush,
    wrprot_for_logging,
    wrprot_for_tracking,
)

__all__ = ["TdpMap"]


class TdpMap:
    """Leaf SPTEs of the TDP roots, by level."""

    def __init__(self) -> None:
        self.levels: dict[int, dict[int, int]] = {1: {}, 2: {}, 3: {}}

    def lookup(self, gfn: int) -> tuple[int, int] | None:
        """``(level, spte)`` of the leaf mapping ``gfn``, or ``None``."""
        spte = self.levels[1].get(gfn)
        if spte is not None:
            return 1, spte
        for level in (2, 3):
            spte = self.levels[level].get(gfn >> (9 * (level - 1)))
            if spte is not None:
                return level, spte
        return None

    def set(self, level: int, gfn: int, spte: int) -> None:
        self.levels[level][gfn >> (9 * (level - 1))] = spte

    def remove(self, level: int, gfn: int) -> None:
        self.levels[level].pop(gfn >> (9 * (level - 1)), None)

    def split(self, level: int, gfn: int) -> None:
        """``tdp_mmu_split_huge_page``: replace a huge leaf by 512 children inheriting W and D."""
        frame = gfn >> (9 * (level - 1))
        spte = self.levels[level].pop(frame)
        child = level - 1
        base = frame << (9 * (level - 1))
        step = 1 << (9 * (child - 1))
        bits = spte & 0xFFF
        if child == 1:
            bits &= ~SPTE_PS
        for i in range(512):
            g = base + i * step
            self.levels[child][g >> (9 * (child - 1))] = bits | (g << 12)

    def leaves_in(self, base_gfn: int, npages: int) -> Iterator[tuple[int, int]]:
        """``(level, frame)`` of every leaf overlapping ``[base_gfn, base_gfn + npages)``."""
        end = base_gfn + npages
        for level, table in self.levels.items():
            shift = 9 * (level - 1)
            if level == 1 and len(table) > npages:
                for g in range(base_gfn, end):
                    if g in table:
                        yield 1, g
                continue
            for frame in list(table):
                start = frame << shift
                if start < end and base_gfn < start + (1 << shift):
                    yield level, frame

    def write_protect_gfn(self, gfn: int) -> bool:
        """``kvm_tdp_mmu_write_protect_gfn``: shadow-page protection at every level."""
        flush = False
        for level in (1, 2, 3):
            key = gfn >> (9 * (level - 1))
            table = self.levels[level]
            old = table.get(key)
            if old is not None and old & (SPTE_W | SPTE_MMU_WRITABLE):
                new = wrprot_for_tracking(old)
                table[key] = new
                flush |= leaf_change_needs_tlb_flush(old, new)
        return flush

    def wrprot_for_logging(self, level: int, frame: int) -> bool:
        """Clear W of one leaf; true if it was writable."""
        table = self.levels[level]
        old = table[frame]
        if old & SPTE_W:
            table[frame] = wrprot_for_logging(old)
            return True
        return False

    def clear_dirty(self, gfn: int) -> bool:
        """``clear_dirty_gfn_range`` for one 4K leaf: clear D (PML re-arm); true if it was set."""
        table = self.levels[1]
        old = table.get(gfn)
        if old is not None and old & SPTE_D:
            table[gfn] = old & ~SPTE_D
            return True
        return False

    def clear(self) -> int:
        """Zap everything (roots invalidated); returns the number of leaves."""
        n = sum(len(t) for t in self.levels.values())
        for t in self.levels.values():
            t.clear()
        return n

    def counts(self) -> dict[int, int]:
        """Number of leaves per level (``pages_4k`` / ``pages_2m`` / ``pages_1g``)."""
        return {level: len(t) for level, t in self.levels.items()}
