"""Guest page-table walks (arch/x86/kvm/mmu/paging_tmpl.h, ``FNAME(walk_addr_generic)``).

Three guest paging modes, as KVM's ``paging_tmpl.h`` instantiates them:

* ``LONG`` — 64-bit 4-level, 8-byte entries (``PTTYPE 64``, root level 4);
* ``PAE`` — 3-level, 8-byte entries; the root is four PDPTEs at CR3;
* ``PT32`` — 32-bit 2-level, 4-byte entries (``PTTYPE 32``), 4 MiB pages with PSE.

A walk returns the guest frame, the accumulated permissions and, for each level,
the guest table gfn and the entry's address: the shadow MMU needs the tables to
build shadow pages, and ``update_accessed_dirty_bits`` needs the entries.
Accessed/dirty bits are set the way KVM's software walker sets them: A on every
level walked, D on the leaf for a write, each through ``set_bits`` (a
compare-exchange on guest memory that also marks the table page dirty).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

import attrs

__all__ = [
    "ACC_USER",
    "ACC_WRITE",
    "PFERR_FETCH",
    "PFERR_GUEST_FINAL",
    "PFERR_GUEST_PAGE",
    "PFERR_PRESENT",
    "PFERR_RSVD",
    "PFERR_USER",
    "PFERR_WRITE",
    "PTE_A",
    "PTE_D",
    "PTE_P",
    "PTE_PS",
    "PTE_RW",
    "PTE_US",
    "GuestWalk",
    "PagingMode",
    "walk_addr",
]

PFERR_PRESENT = 1 << 0
PFERR_WRITE = 1 << 1
PFERR_USER = 1 << 2
PFERR_RSVD = 1 << 3
PFERR_FETCH = 1 << 4
PFERR_GUEST_FINAL = 1 << 32
PFERR_GUEST_PAGE = 1 << 33

ACC_WRITE = 1 << 1
ACC_USER = 1 << 2

#: Guest page-table entry bits (the same in 4- and 8-byte entries).
PTE_P = 1 << 0
PTE_RW = 1 << 1
PTE_US = 1 << 2
PTE_A = 1 << 5
PTE_D = 1 << 6
PTE_PS = 1 << 7
_P, _RW, _US, _A, _D, _PS = PTE_P, PTE_RW, PTE_US, PTE_A, PTE_D, PTE_PS


class PagingMode(Enum):
    """Guest paging mode: (root level, entry size, index bits)."""

    LONG = (4, 8, 9)
    PAE = (3, 8, 9)
    PT32 = (2, 4, 10)

    @property
    def root_level(self) -> int:
        return self.value[0]

    @property
    def pte_size(self) -> int:
        return self.value[1]

    @property
    def bits(self) -> int:
        return self.value[2]

    def index(self, gva: int, level: int) -> int:
        """Entry index of ``gva`` in a level-``level`` table."""
        if self is PagingMode.PAE and level == 3:
            return (gva >> 30) & 3
        bits = self.bits
        return (gva >> (12 + bits * (level - 1))) & ((1 << bits) - 1)


@attrs.define(slots=True)
class GuestWalk:
    """Result of ``walk_addr``.

    ``fault`` is ``None`` on success, else the #PF error code to inject.
    ``table_gfn[level]``, ``pte_gpa[level]`` and ``pte[level]`` describe the entry
    used at each level (index 0 unused); ``level`` is the leaf level.
    """

    gva: int
    gfn: int = 0
    level: int = 1
    access: int = 0
    dirty: bool = False
    fault: int | None = None
    table_gfn: list[int] = attrs.field(factory=lambda: [0] * 5)
    pte_gpa: list[int] = attrs.field(factory=lambda: [0] * 5)
    pte: list[int] = attrs.field(factory=lambda: [0] * 5)

    @property
    def gpa(self) -> int:
        return (self.gfn << 12) | (self.gva & 0xFFF)


def walk_addr(
    mode: PagingMode,
    cr3: int,
    gva: int,
    error_code: int,
    read: Callable[[int, int], int],
    set_bits: Callable[[int, int, int, int], bool] | None,
    pse: bool = True,
) -> GuestWalk:
    """Translate ``gva`` for an access described by ``error_code`` (W/U/FETCH bits).

    ``read(gpa, size)`` reads a guest entry; ``set_bits(gpa, size, old, new)``
    compare-exchanges an entry to set A/D (``None``: do not update A/D).  Models
    ``FNAME(walk_addr_generic)`` and ``FNAME(update_accessed_dirty_bits)``; CR0.WP
    is assumed set and NX/SMEP/SMAP are not modelled.
    """
    w = GuestWalk(gva)
    size = mode.pte_size
    write = bool(error_code & PFERR_WRITE)
    user = bool(error_code & PFERR_USER)
    level = mode.root_level
    if mode is PagingMode.PAE:
        table = cr3 & ~0x1F
        w.table_gfn[3] = table >> 12
        gpa = table + 8 * mode.index(gva, 3)
        pdpte = read(gpa, 8)
        w.pte_gpa[3], w.pte[3] = gpa, pdpte
        if not pdpte & _P:
            w.fault = error_code & ~PFERR_PRESENT
            return w
        table = pdpte & 0x000F_FFFF_FFFF_F000
        level = 2
    else:
        table = cr3 & (0x000F_FFFF_FFFF_F000 if size == 8 else 0xFFFF_F000)
    access = ACC_WRITE | ACC_USER
    addr_mask = 0x000F_FFFF_FFFF_F000 if size == 8 else 0xFFFF_F000
    while True:
        w.table_gfn[level] = table >> 12
        gpa = table + size * mode.index(gva, level)
        pte = read(gpa, size)
        w.pte_gpa[level], w.pte[level] = gpa, pte
        if not pte & _P:
            w.fault = error_code & ~PFERR_PRESENT
            return w
        access &= (pte & (_RW | _US)) | ~(_RW | _US)
        # PS is honoured at every level but the PML4 (where the bit is reserved),
        # including a 32-bit page directory, the root of PT32 (4 MiB pages, CR4.PSE).
        leaf = level == 1 or (pte & _PS and (level < mode.root_level or mode is not PagingMode.LONG) and (size == 8 or pse))
        if leaf:
            break
        table = pte & addr_mask
        level -= 1
    access &= ACC_WRITE | ACC_USER
    if (write and not access & ACC_WRITE) or (user and not access & ACC_USER):
        w.fault = error_code | PFERR_PRESENT
        return w
    pte = w.pte[level]
    if level == 1:
        gfn = (pte & addr_mask) >> 12
    else:
        span_bits = 12 + mode.bits * (level - 1)
        if size == 4:  # PSE 4 MiB page: bits 31:22
            base = pte & 0xFFC0_0000
        else:
            base = pte & 0x000F_FFFF_FFFF_F000 & ~((1 << span_bits) - 1)
        gfn = (base | (gva & ((1 << span_bits) - 1))) >> 12
    w.gfn, w.level, w.access = gfn, level, access
    w.dirty = bool(pte & _D)
    if set_bits is not None:
        # Accessed bits top-down, then the dirty bit of the leaf for a write.
        for lv in range(mode.root_level if mode is not PagingMode.PAE else 2, level - 1, -1):
            old = w.pte[lv]
            new = old | _A
            if lv == level and write:
                new |= _D
            if new != old:
                if not set_bits(w.pte_gpa[lv], size, old, new):
                    # The entry changed under us: KVM restarts the walk.
                    return walk_addr(mode, cr3, gva, error_code, read, set_bits, pse)
                w.pte[lv] = new
        if write:
            w.dirty = True
    return w
