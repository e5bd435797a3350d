"""Gen8+ GTT entry formats and the GTT_TYPE_* system (i915 gvt/gtt.h, gtt.c).

An entry is 8 bytes, 512 per 4 KiB table page.  Bit 0 present, bit 1 RW, bit 7
PS in a PDE (2 MiB) or PDPE (1 GiB), bit 11 IPS in a PDE (64 KiB PT below),
bits 45..12 the frame (masks per page size), bits 62..52 GVT's own flags in
shadow entries (bit 52: a 4 KiB entry split from a guest 64 KiB entry).  Root
pointers are present iff non-zero (i915 writes PDP registers without bit 0).

:class:`GttEntry` is ``struct intel_gvt_gtt_entry`` {type, val64}; the functions
are the ``gen8_gtt_*`` pte_ops and the type-table helpers.
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple

import attrs

__all__ = [
    "ADDR_1G_MASK",
    "ADDR_2M_MASK",
    "ADDR_4K_MASK",
    "ADDR_64K_MASK",
    "GEN8_PAGE_PRESENT",
    "GEN8_PAGE_RW",
    "GEN8_PDE_IPS_64K",
    "GTT_64K_PTE_STRIDE",
    "GTT_ENTRIES",
    "GTT_HAW",
    "GTT_SPTE_FLAG_64K_SPLITED",
    "GTT_SPTE_FLAG_MASK",
    "PAGE_DIRTY",
    "PAGE_PAT",
    "PAGE_PAT_LARGE",
    "PAGE_PSE",
    "PPAT_CACHED",
    "GttEntry",
    "GttType",
    "clear_64k_splited",
    "clear_ips",
    "clear_pse",
    "get_entry_type",
    "get_next_pt_type",
    "get_pfn",
    "get_pse_type",
    "get_pt_type",
    "gma_index",
    "is_entry_type",
    "is_pt_type",
    "is_pte_pt",
    "set_64k_splited",
    "set_pfn",
    "test_64k_splited",
    "test_ips",
    "test_present",
    "test_pse",
    "update_entry_type_for_real",
]

GTT_HAW = 46  #: host address width of the GTT
GTT_ENTRIES = 512  #: 8-byte entries per 4 KiB table page
GTT_64K_PTE_STRIDE = 16

GEN8_PAGE_PRESENT = 1 << 0
GEN8_PAGE_RW = 1 << 1
PAGE_DIRTY = 1 << 6  #: ``_PAGE_DIRTY``
PAGE_PSE = 1 << 7  #: ``_PAGE_PSE`` (GEN8_PDE_PS_2M / GEN8_PDPE_PS_1G)
PAGE_PAT = 1 << 7  #: ``_PAGE_PAT`` in a 4 KiB PTE
PPAT_CACHED = PAGE_PAT
PAGE_PAT_LARGE = 1 << 12  #: ``_PAGE_PAT_LARGE`` in a 2 MiB / 1 GiB entry
GEN8_PDE_IPS_64K = 1 << 11
GTT_SPTE_FLAG_MASK = ((1 << 63) - 1) & ~((1 << 52) - 1)  # bits 62..52
GTT_SPTE_FLAG_64K_SPLITED = 1 << 52


def _genmask(high: int, low: int) -> int:
    return ((1 << (high + 1)) - 1) & ~((1 << low) - 1)


ADDR_4K_MASK = _genmask(GTT_HAW - 1, 12)
ADDR_64K_MASK = _genmask(GTT_HAW - 1, 16)
ADDR_2M_MASK = _genmask(GTT_HAW - 1, 21)
ADDR_1G_MASK = _genmask(GTT_HAW - 1, 30)


class GttType(IntEnum):
    """``enum intel_gvt_gtt_type``; the numbers appear in GVT's logs ("type 9")."""

    INVALID = 0
    GGTT_PTE = 1
    PPGTT_PTE_4K_ENTRY = 2
    PPGTT_PTE_64K_ENTRY = 3
    PPGTT_PTE_2M_ENTRY = 4
    PPGTT_PTE_1G_ENTRY = 5
    PPGTT_PTE_ENTRY = 6
    PPGTT_PDE_ENTRY = 7
    PPGTT_PDP_ENTRY = 8
    PPGTT_PML4_ENTRY = 9
    PPGTT_ROOT_ENTRY = 10
    PPGTT_ROOT_L3_ENTRY = 11
    PPGTT_ROOT_L4_ENTRY = 12
    PPGTT_ENTRY = 13
    PPGTT_PTE_PT = 14
    PPGTT_PDE_PT = 15
    PPGTT_PDP_PT = 16
    PPGTT_PML4_PT = 17
    MAX = 18


T = GttType


class _Row(NamedTuple):
    entry_type: GttType
    pt_type: GttType
    next_pt_type: GttType
    pse_entry_type: GttType


#: ``gtt_type_table``: type -> (entry type inside, table it lives in, next level, PS/IPS type).
TYPE_TABLE: dict[GttType, _Row] = {
    T.PPGTT_ROOT_L4_ENTRY: _Row(T.PPGTT_ROOT_L4_ENTRY, T.INVALID, T.PPGTT_PML4_PT, T.INVALID),
    T.PPGTT_PML4_PT: _Row(T.PPGTT_PML4_ENTRY, T.PPGTT_PML4_PT, T.PPGTT_PDP_PT, T.INVALID),
    T.PPGTT_PML4_ENTRY: _Row(T.PPGTT_PML4_ENTRY, T.PPGTT_PML4_PT, T.PPGTT_PDP_PT, T.INVALID),
    T.PPGTT_PDP_PT: _Row(T.PPGTT_PDP_ENTRY, T.PPGTT_PDP_PT, T.PPGTT_PDE_PT, T.PPGTT_PTE_1G_ENTRY),
    T.PPGTT_ROOT_L3_ENTRY: _Row(T.PPGTT_ROOT_L3_ENTRY, T.INVALID, T.PPGTT_PDE_PT, T.PPGTT_PTE_1G_ENTRY),
    T.PPGTT_PDP_ENTRY: _Row(T.PPGTT_PDP_ENTRY, T.PPGTT_PDP_PT, T.PPGTT_PDE_PT, T.PPGTT_PTE_1G_ENTRY),
    T.PPGTT_PDE_PT: _Row(T.PPGTT_PDE_ENTRY, T.PPGTT_PDE_PT, T.PPGTT_PTE_PT, T.PPGTT_PTE_2M_ENTRY),
    T.PPGTT_PDE_ENTRY: _Row(T.PPGTT_PDE_ENTRY, T.PPGTT_PDE_PT, T.PPGTT_PTE_PT, T.PPGTT_PTE_2M_ENTRY),
    T.PPGTT_PTE_PT: _Row(T.PPGTT_PTE_4K_ENTRY, T.PPGTT_PTE_PT, T.INVALID, T.PPGTT_PTE_64K_ENTRY),
    T.PPGTT_PTE_4K_ENTRY: _Row(T.PPGTT_PTE_4K_ENTRY, T.PPGTT_PTE_PT, T.INVALID, T.PPGTT_PTE_64K_ENTRY),
    T.PPGTT_PTE_64K_ENTRY: _Row(T.PPGTT_PTE_4K_ENTRY, T.PPGTT_PTE_PT, T.INVALID, T.PPGTT_PTE_64K_ENTRY),
    T.PPGTT_PTE_2M_ENTRY: _Row(T.PPGTT_PDE_ENTRY, T.PPGTT_PDE_PT, T.INVALID, T.PPGTT_PTE_2M_ENTRY),
    T.PPGTT_PTE_1G_ENTRY: _Row(T.PPGTT_PDP_ENTRY, T.PPGTT_PDP_PT, T.INVALID, T.PPGTT_PTE_1G_ENTRY),
    T.GGTT_PTE: _Row(T.GGTT_PTE, T.INVALID, T.INVALID, T.INVALID),
}
_INVALID_ROW = _Row(T.INVALID, T.INVALID, T.INVALID, T.INVALID)


def get_entry_type(t: GttType) -> GttType:
    """``get_entry_type``."""
    return TYPE_TABLE.get(t, _INVALID_ROW).entry_type


def get_pt_type(t: GttType) -> GttType:
    """``get_pt_type``."""
    return TYPE_TABLE.get(t, _INVALID_ROW).pt_type


def get_next_pt_type(t: GttType) -> GttType:
    """``get_next_pt_type``: the table an entry of type ``t`` points to (INVALID for leaves)."""
    return TYPE_TABLE.get(t, _INVALID_ROW).next_pt_type


def get_pse_type(t: GttType) -> GttType:
    """``get_pse_type``: the type of ``t`` with PS (or the parent's IPS) set."""
    return TYPE_TABLE.get(t, _INVALID_ROW).pse_entry_type


def is_entry_type(t: int) -> bool:
    """``gtt_type_is_entry``: strictly between INVALID and PPGTT_ENTRY, minus the markers."""
    return (T.INVALID < t < T.PPGTT_ENTRY and t != T.PPGTT_PTE_ENTRY
            and t != T.PPGTT_ROOT_ENTRY)


def is_pt_type(t: int) -> bool:
    """``gtt_type_is_pt``: PTE_PT .. PML4_PT."""
    return T.PPGTT_PTE_PT <= t < T.MAX


def is_pte_pt(t: int) -> bool:
    """``gtt_type_is_pte_pt``."""
    return t == T.PPGTT_PTE_PT


@attrs.define(slots=True)
class GttEntry:
    """``struct intel_gvt_gtt_entry``: a typed 64-bit entry value."""

    type: GttType
    val64: int = 0

    def copy(self) -> GttEntry:
        return GttEntry(self.type, self.val64)


_ROOTS = (T.PPGTT_ROOT_L3_ENTRY, T.PPGTT_ROOT_L4_ENTRY)


def test_present(e: GttEntry) -> bool:
    """``gen8_gtt_test_present``: roots are present iff non-zero, others iff bit 0."""
    if e.type in _ROOTS:
        return e.val64 != 0
    return bool(e.val64 & GEN8_PAGE_PRESENT)


def _addr_mask(t: GttType) -> int:
    if t == T.PPGTT_PTE_1G_ENTRY:
        return ADDR_1G_MASK
    if t == T.PPGTT_PTE_2M_ENTRY:
        return ADDR_2M_MASK
    if t == T.PPGTT_PTE_64K_ENTRY:
        return ADDR_64K_MASK
    return ADDR_4K_MASK


def get_pfn(e: GttEntry) -> int:
    """``gen8_gtt_get_pfn``: ``(val & mask) >> 12`` with the mask of the entry's page size."""
    return (e.val64 & _addr_mask(e.type)) >> 12


def set_pfn(e: GttEntry, pfn: int) -> None:
    """``gen8_gtt_set_pfn``: clear the frame bits, OR in ``pfn`` masked to them."""
    mask = _addr_mask(e.type)
    e.val64 = (e.val64 & ~mask) | ((pfn & (mask >> 12)) << 12)


def test_pse(e: GttEntry) -> bool:
    """``gen8_gtt_test_pse``: bit 7."""
    return bool(e.val64 & PAGE_PSE)


def clear_pse(e: GttEntry) -> None:
    """``gen8_gtt_clear_pse``: a 2M/1G entry back to a PDE/PDP entry without bit 7."""
    if not test_pse(e):
        return
    if e.type == T.PPGTT_PTE_2M_ENTRY:
        e.val64 &= ~PAGE_PSE
        e.type = T.PPGTT_PDE_ENTRY
    elif e.type == T.PPGTT_PTE_1G_ENTRY:
        e.val64 &= ~PAGE_PSE
        e.type = T.PPGTT_PDP_ENTRY


def test_ips(e: GttEntry) -> bool:
    """``gen8_gtt_test_ips``: bit 11 of a PDE entry (false for any other type)."""
    if e.type != T.PPGTT_PDE_ENTRY:
        return False
    return bool(e.val64 & GEN8_PDE_IPS_64K)


def clear_ips(e: GttEntry) -> None:
    """``gen8_gtt_clear_ips``: only PDE entries."""
    if e.type == T.PPGTT_PDE_ENTRY:
        e.val64 &= ~GEN8_PDE_IPS_64K


def test_64k_splited(e: GttEntry) -> bool:
    """``gen8_gtt_test_64k_splited``: bit 52."""
    return bool(e.val64 & GTT_SPTE_FLAG_64K_SPLITED)


def set_64k_splited(e: GttEntry) -> None:
    """``gen8_gtt_set_64k_splited``."""
    e.val64 |= GTT_SPTE_FLAG_64K_SPLITED


def clear_64k_splited(e: GttEntry) -> None:
    """``gen8_gtt_clear_64k_splited``."""
    e.val64 &= ~GTT_SPTE_FLAG_64K_SPLITED


def update_entry_type_for_real(e: GttEntry, ips: bool) -> None:
    """``update_entry_type_for_real``: PDE/PDP with bit 7 → 2M/1G; a 4K PTE under IPS → 64K."""
    if e.type in (T.PPGTT_PDE_ENTRY, T.PPGTT_PDP_ENTRY):
        if test_pse(e):
            e.type = get_pse_type(e.type)
    elif e.type == T.PPGTT_PTE_4K_ENTRY and ips:
        e.type = get_pse_type(e.type)


def gma_index(gma: int, level: GttType, l3: bool = False) -> int:
    """Index of ``gma`` in a table of type ``level`` (gen8_gma_to_*_entry_index)."""
    if level == T.PPGTT_PTE_PT:
        return (gma >> 12) & 0x1FF
    if level == T.PPGTT_PDE_PT:
        return (gma >> 21) & 0x1FF
    if level == T.PPGTT_PDP_PT:
        return (gma >> 30) & (0x3 if l3 else 0x1FF)
    if level == T.PPGTT_PML4_PT:
        return (gma >> 39) & 0x1FF
    raise ValueError(f"not a table type: {level!r}")
