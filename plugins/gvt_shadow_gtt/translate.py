"""GPU-side translation and the shadow invariant.

* :func:`gpu_translate` is what the GPU does with a submitted workload: walk
  the **shadow** PPGTT from the shadow root through GVT's host pages (it knows
  nothing of ``spt_tree``) to a host pfn.  Landing in a scratch page counts as
  "not mapped".
* :func:`guest_translate` is what the guest meant: walk the guest tables in
  guest memory (64 KiB entries when the PDE has IPS and the vGPU honours it,
  2 MiB and 1 GiB leaves) to a gfn.
* :func:`check_mm` is the invariant: for every GPU virtual page, the shadow
  translation equals the guest translation followed by the vGPU's gfn → pfn
  map (its DMA cache).  Both trees are enumerated in full, so this covers every
  address, not a sample.
* :func:`intel_vgpu_gma_to_gpa` is GVT's own helper for the command parser.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING

import attrs

from . import entry as E
from .entry import GttEntry, GttType
from .spt import intel_vgpu_find_spt_by_mfn, ppgtt_get_guest_entry, ppgtt_get_shadow_entry

if TYPE_CHECKING:
    from .mm import Mm

__all__ = [
    "INTEL_GVT_INVALID_ADDR",
    "InvariantReport",
    "check_mm",
    "gpu_translate",
    "guest_mappings",
    "guest_translate",
    "intel_vgpu_gma_to_gpa",
    "shadow_mappings",
]

INTEL_GVT_INVALID_ADDR = (1 << 64) - 1
_PAGE = struct.Struct("<512Q")
_L4_LEVELS = ((GttType.PPGTT_PML4_PT, 39), (GttType.PPGTT_PDP_PT, 30),
              (GttType.PPGTT_PDE_PT, 21), (GttType.PPGTT_PTE_PT, 12))
_L3_LEVELS = ((GttType.PPGTT_PDE_PT, 21), (GttType.PPGTT_PTE_PT, 12))
_4K = E.ADDR_4K_MASK
_P = E.GEN8_PAGE_PRESENT
_PS = E.PAGE_PSE
#: Enumeration limit: a guest can make its tables alias each other without bound.
MAX_PAGES = 1 << 22


def _root(mm: Mm, gma: int, shadow: bool) -> int:
    pdps = mm.shadow_pdps if shadow else mm.guest_pdps
    return pdps[0] if mm.levels == 4 else pdps[(gma >> 30) & 3]


# ---- single addresses ------------------------------------------------------------------


def gpu_translate(mm: Mm, gma: int) -> int | None:
    """Host pfn the GPU reaches for ``gma`` through the shadow tables, or ``None``."""
    vgpu = mm.vgpu
    pages = vgpu.gvt.host_pages
    root = _root(mm, gma, True)
    if not root:
        return None
    table = (root & _4K) >> 12
    levels = _L4_LEVELS if mm.levels == 4 else _L3_LEVELS
    for ty, shift in levels:
        page = pages.get(table)
        if page is None:
            return None
        val = page[(gma >> shift) & 0x1FF]
        if not val & _P:
            return None
        if ty == GttType.PPGTT_PDE_PT and val & _PS:
            table = ((val & E.ADDR_2M_MASK) >> 12) + ((gma >> 12) & 0x1FF)
            break
        if ty == GttType.PPGTT_PDP_PT and val & _PS:
            table = ((val & E.ADDR_1G_MASK) >> 12) + ((gma >> 12) & 0x3FFFF)
            break
        table = (val & _4K) >> 12
    if table == vgpu.scratch_pt[GttType.PPGTT_PTE_PT]:
        return None
    return vgpu.dma.iommu.translate(table)


def _guest_page(mm: Mm, gfn: int, cache: dict[int, tuple[int, ...]]) -> tuple[int, ...] | None:
    page = cache.get(gfn)
    if page is None:
        try:
            page = _PAGE.unpack(mm.vgpu.vm.read_guest(gfn << 12, 4096))
        except Exception:
            return None
        cache[gfn] = page
    return page


def guest_translate(mm: Mm, gma: int) -> int | None:
    """The gfn the guest's own tables map ``gma`` to, or ``None``."""
    cache: dict[int, tuple[int, ...]] = {}
    root = _root(mm, gma, False)
    if not root:
        return None
    table = (root & _4K) >> 12
    ips = False
    levels = _L4_LEVELS if mm.levels == 4 else _L3_LEVELS
    for ty, shift in levels:
        page = _guest_page(mm, table, cache)
        if page is None:
            return None
        idx = (gma >> shift) & 0x1FF
        if ty == GttType.PPGTT_PTE_PT and ips:
            val = page[idx & ~0xF]
            if not val & _P:
                return None
            return ((val & E.ADDR_64K_MASK) >> 12) + (idx & 0xF)
        val = page[idx]
        if not val & _P:
            return None
        if ty == GttType.PPGTT_PDE_PT and val & _PS:
            return ((val & E.ADDR_2M_MASK) >> 12) + ((gma >> 12) & 0x1FF)
        if ty == GttType.PPGTT_PDP_PT and val & _PS:
            return ((val & E.ADDR_1G_MASK) >> 12) + ((gma >> 12) & 0x3FFFF)
        if ty == GttType.PPGTT_PDE_PT:
            ips = mm.vgpu.ips_enabled and bool(val & E.GEN8_PDE_IPS_64K)
        table = (val & _4K) >> 12
    return table


# ---- whole address spaces --------------------------------------------------------------


class _TooBig(Exception):
    pass


def _roots(mm: Mm, shadow: bool) -> Iterator[tuple[int, int]]:
    pdps = mm.shadow_pdps if shadow else mm.guest_pdps
    if mm.levels == 4:
        if pdps[0]:
            yield 0, (pdps[0] & _4K) >> 12
    else:
        for i in range(4):
            if pdps[i]:
                yield i << 30, (pdps[i] & _4K) >> 12


def guest_mappings(mm: Mm, limit: int = MAX_PAGES) -> dict[int, int]:
    """Every mapped GPU page of the guest tables: ``{gma >> 12: gfn}``."""
    out: dict[int, int] = {}
    cache: dict[int, tuple[int, ...]] = {}
    levels = _L4_LEVELS if mm.levels == 4 else _L3_LEVELS
    ips_on = mm.vgpu.ips_enabled

    def walk(depth: int, gfn: int, base: int, ips: bool) -> None:
        ty, shift = levels[depth]
        page = _guest_page(mm, gfn, cache)
        if page is None:
            return
        if ty == GttType.PPGTT_PTE_PT:
            for i in range(0, 512, 16 if ips else 1):
                val = page[i]
                if not val & _P:
                    continue
                if ips:
                    g = (val & E.ADDR_64K_MASK) >> 12
                    for k in range(16):
                        out[(base >> 12) + i + k] = g + k
                else:
                    out[(base >> 12) + i] = (val & _4K) >> 12
            if len(out) > limit:
                raise _TooBig
            return
        for i, val in enumerate(page):
            if not val & _P:
                continue
            va = base + (i << shift)
            if ty in (GttType.PPGTT_PDE_PT, GttType.PPGTT_PDP_PT) and val & _PS:
                mask, n = ((E.ADDR_2M_MASK, 512) if ty == GttType.PPGTT_PDE_PT
                           else (E.ADDR_1G_MASK, 1 << 18))
                g = (val & mask) >> 12
                for k in range(n):
                    out[(va >> 12) + k] = g + k
                if len(out) > limit:
                    raise _TooBig
                continue
            child_ips = ty == GttType.PPGTT_PDE_PT and ips_on and bool(val & E.GEN8_PDE_IPS_64K)
            walk(depth + 1, (val & _4K) >> 12, va, child_ips)

    for base, gfn in _roots(mm, False):
        walk(0, gfn, base, False)
    return out


def shadow_mappings(mm: Mm, limit: int = MAX_PAGES) -> dict[int, int | None]:
    """Every GPU page the shadow tables map to a non-scratch frame: ``{gma >> 12: host pfn}``
    (``None`` where the IOMMU has no mapping for the frame)."""
    out: dict[int, int | None] = {}
    vgpu = mm.vgpu
    pages = vgpu.gvt.host_pages
    scratch = vgpu.scratch_pt[GttType.PPGTT_PTE_PT]
    scratch_tables = set(vgpu.scratch_pt.values())
    iommu = vgpu.dma.iommu.translate
    levels = _L4_LEVELS if mm.levels == 4 else _L3_LEVELS

    def walk(depth: int, mfn: int, base: int) -> None:
        if mfn in scratch_tables:
            return
        page = pages.get(mfn)
        if page is None:
            return
        ty, shift = levels[depth]
        for i, val in enumerate(page):
            if not val & _P:
                continue
            va = base + (i << shift)
            if ty == GttType.PPGTT_PTE_PT:
                frame = (val & _4K) >> 12
                if frame != scratch:
                    out[va >> 12] = iommu(frame)
                continue
            if ty == GttType.PPGTT_PDE_PT and val & _PS:
                frame = (val & E.ADDR_2M_MASK) >> 12
                for k in range(512):
                    out[(va >> 12) + k] = iommu(frame + k)
                continue
            walk(depth + 1, (val & _4K) >> 12, va)
        if len(out) > limit:
            raise _TooBig

    for base, mfn in _roots(mm, True):
        walk(0, mfn, base)
    return out


@attrs.frozen
class InvariantReport:
    """The result of :func:`check_mm`: pages compared and every disagreement.

    A mismatch is ``(gma, expected_pfn, shadow_pfn)``; ``None`` means "not mapped".
    """

    mm: int
    pages: int
    mismatches: tuple[tuple[int, int | None, int | None], ...]
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return not self.mismatches and not self.truncated


def check_mm(mm: Mm, limit: int = MAX_PAGES) -> InvariantReport:
    """The shadow invariant of one shadowed mm (see the module docstring)."""
    dma = mm.vgpu.dma
    try:
        guest = guest_mappings(mm, limit)
        shadow = shadow_mappings(mm, limit)
    except _TooBig:
        return InvariantReport(mm.id, 0, (), truncated=True)
    bad: list[tuple[int, int | None, int | None]] = []
    for page, gfn in guest.items():
        want = dma.translate(gfn)
        got = shadow.get(page)
        if want is None or got != want:
            bad.append((page << 12, want, got))
    for page, got in shadow.items():
        if page not in guest and got is not None:
            bad.append((page << 12, None, got))
    bad.sort(key=lambda m: m[0])
    return InvariantReport(mm.id, len(guest.keys() | shadow.keys()), tuple(bad))


# ---- intel_vgpu_gma_to_gpa -----------------------------------------------------------


def intel_vgpu_gma_to_gpa(mm: Mm, gma: int) -> int:
    """``intel_vgpu_gma_to_gpa`` for a PPGTT mm: shadow walk via ``spt_tree``, last level guest.

    Returns ``INTEL_GVT_INVALID_ADDR`` for a missing spt or a non-present entry.
    """
    vgpu = mm.vgpu
    if mm.levels == 4:
        e = GttEntry(mm.root_entry_type, mm.shadow_pdps[0])
        idx = [(gma >> 39) & 0x1FF, (gma >> 30) & 0x1FF, (gma >> 21) & 0x1FF, (gma >> 12) & 0x1FF]
    else:
        e = GttEntry(mm.root_entry_type, mm.shadow_pdps[(gma >> 30) & 3])
        idx = [(gma >> 21) & 0x1FF, (gma >> 12) & 0x1FF]
    for i, index in enumerate(idx):
        s = intel_vgpu_find_spt_by_mfn(vgpu, E.get_pfn(e))
        if s is None:
            return INTEL_GVT_INVALID_ADDR
        e = ppgtt_get_guest_entry(s, index) if i == len(idx) - 1 else ppgtt_get_shadow_entry(s, index)
        if not E.test_present(e):
            return INTEL_GVT_INVALID_ADDR
    return (E.get_pfn(e) << 12) + (gma & 0xFFF)
