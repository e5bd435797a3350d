"""gfn → host pfn → DMA address: host backing, VFIO pinning and KVMGT's DMA cache.

* :class:`HostBacking` decides which host page backs each guest page (the VMM's
  RAM).  ``4k`` pages come from a deterministic allocator that hands out pages
  from the top of a free list, so pages pinned one after another are adjacent
  but *descending*: 512 consecutive gfns are never host-contiguous.  gfns in a
  ``huge`` range are backed by 2 MiB host pages, gfn-linear and 2 MiB aligned,
  so a 2 MiB-aligned guest frame there is host-contiguous.  A gfn keeps its host
  page for the life of the VM.
* :class:`Vfio` is ``vfio_pin_pages`` / ``vfio_unpin_pages`` against that
  backing: a gfn outside every memslot fails with ``-EINVAL`` (no DMA mapping
  covers the IOVA); ``pin_limit`` models ``RLIMIT_MEMLOCK`` (``-ENOMEM``).
* :class:`Iommu` is what ``dma_map_page`` / ``dma_unmap_page`` program: with
  DMA remapping on (the default) each mapping gets a fresh, naturally aligned
  IOVA and the GPU reaches host memory only through live mappings; in
  passthrough mode (``iommu=pt``) a DMA address is the host physical address.
* :class:`DmaCache` is kvmgt.c's ``gfn_cache`` / ``dma_addr_cache``:
  ``intel_gvt_dma_map_guest_page`` / ``intel_gvt_dma_unmap_guest_page`` /
  ``intel_gvt_dma_pin_guest_page``, ``intel_vgpu_dma_unmap``, ``gvt_cache_destroy``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import attrs

from .errors import GvtError

__all__ = ["HUGE_BASE_PFN", "IOVA_BASE_PFN", "PAGES_PER_2M", "DmaCache", "GvtDma", "HostBacking",
           "Iommu", "Vfio"]

PAGE_SHIFT = 12
PAGES_PER_2M = 512
#: Host pfn of gfn 0 in the huge-page backed ranges (2 MiB aligned: 16 GiB).
HUGE_BASE_PFN = 0x400000
#: First (highest) pfn the 4 KiB allocator hands out; it counts down.
SMALL_TOP_PFN = 0x3FFFFF
#: First IOVA page handed out with DMA remapping on (64 GiB, above every host pfn).
IOVA_BASE_PFN = 0x1000000


class HostBacking:
    """Which host pfn backs each gfn of one VM (assigned on first use, then fixed).

    :param backing: ``"4k"`` (default) or ``"huge"`` for every gfn.
    :param huge_ranges: ``[(first_gfn, end_gfn), ...]`` backed by huge pages
        whatever ``backing`` says.
    """

    def __init__(self, backing: str = "4k", huge_ranges: Iterable[tuple[int, int]] = ()) -> None:
        if backing not in ("4k", "huge"):
            raise ValueError(f"backing must be '4k' or 'huge', not {backing!r}")
        self.backing = backing
        self.huge_ranges = [(int(lo), int(hi)) for lo, hi in huge_ranges]
        self._pfn: dict[int, int] = {}
        self._gfn: dict[int, int] = {}
        self._next_small = SMALL_TOP_PFN

    def is_huge(self, gfn: int) -> bool:
        if self.backing == "huge":
            return True
        return any(lo <= gfn < hi for lo, hi in self.huge_ranges)

    def pfn_of(self, gfn: int) -> int:
        """The host pfn backing ``gfn`` (allocating it on first use)."""
        pfn = self._pfn.get(gfn)
        if pfn is None:
            if self.is_huge(gfn):
                pfn = HUGE_BASE_PFN + gfn
            else:
                pfn = self._next_small
                self._next_small -= 1
            self._pfn[gfn] = pfn
            self._gfn[pfn] = gfn
        return pfn

    def gfn_of(self, pfn: int) -> int | None:
        """Reverse lookup: the gfn a host pfn backs, if any."""
        return self._gfn.get(pfn)


class Vfio:
    """``vfio_pin_pages`` / ``vfio_unpin_pages`` for one vGPU (type1 IOMMU, external pins).

    ``valid(gfn)`` says whether the VMM's DMA mappings cover the IOVA of ``gfn``
    (guest RAM = the memslots).  Pins are counted per page; a page is charged to
    the memlock budget on its first pin only.
    """

    def __init__(self, backing: HostBacking, valid: Callable[[int], bool],
                 pin_limit: int | None = None) -> None:
        self.backing = backing
        self.valid = valid
        self.pin_limit = pin_limit
        self.pins: dict[int, int] = {}  # gfn -> pin count

    @property
    def locked(self) -> int:
        """Pages currently charged to the memlock budget."""
        return len(self.pins)

    def pin(self, gfn: int) -> int:
        """Pin one page, return its host pfn, or raise ``GvtError`` (EINVAL / ENOMEM)."""
        if not self.valid(gfn):
            raise GvtError("EINVAL", f"vfio_pin_pages: no DMA mapping covers iova {gfn << PAGE_SHIFT:#x}")
        if gfn not in self.pins and self.pin_limit is not None and self.locked >= self.pin_limit:
            raise GvtError("ENOMEM", f"vfio_pin_pages: RLIMIT_MEMLOCK ({self.pin_limit} pages) exceeded")
        self.pins[gfn] = self.pins.get(gfn, 0) + 1
        return self.backing.pfn_of(gfn)

    def unpin(self, gfn: int, npages: int = 1) -> None:
        for g in range(gfn, gfn + npages):
            n = self.pins.get(g, 0)
            if n <= 1:
                self.pins.pop(g, None)
            else:
                self.pins[g] = n - 1


class Iommu:
    """The DMA API under the GPU: IOVA → host pfn, one entry per mapped page.

    ``remapping=False`` is passthrough: the IOVA is the host address and any
    pfn is reachable.  With remapping, IOVAs are handed out once (bump
    allocator, aligned to the mapping size) and an unmapped IOVA faults.
    """

    def __init__(self, remapping: bool = True) -> None:
        self.remapping = remapping
        self.table: dict[int, int] = {}  # iova pfn -> host pfn
        self._next = IOVA_BASE_PFN

    def map(self, pfn: int, npages: int) -> int:
        """``dma_map_page``: the IOVA page of a mapping of ``npages`` from host ``pfn``."""
        if not self.remapping:
            return pfn
        iova = (self._next + npages - 1) // npages * npages
        self._next = iova + npages
        for k in range(npages):
            self.table[iova + k] = pfn + k
        return iova

    def unmap(self, iova: int, npages: int) -> None:
        """``dma_unmap_page``."""
        if self.remapping:
            for k in range(npages):
                self.table.pop(iova + k, None)

    def translate(self, iova: int) -> int | None:
        """The host pfn a device access to IOVA page ``iova`` reaches (``None``: IOMMU fault)."""
        if not self.remapping:
            return iova
        return self.table.get(iova)


@attrs.define(eq=False)
class GvtDma:
    """``struct gvt_dma``: one cached mapping."""

    gfn: int
    dma_addr: int
    size: int
    ref: int = 1


class DmaCache:
    """The per-vGPU DMA cache (kvmgt.c), keyed by gfn and by DMA address.

    ``attached()`` is the vGPU's ATTACHED bit; ``emit`` writes a debug audit
    event (``gvt_dma``) and may be ``None``.
    """

    def __init__(self, vfio: Vfio, attached: Callable[[], bool],
                 emit: Callable[..., Any] | None = None, iommu: Iommu | None = None) -> None:
        self.vfio = vfio
        self.iommu = iommu if iommu is not None else Iommu()
        self.attached = attached
        self.emit = emit
        self.by_gfn: dict[int, GvtDma] = {}
        self.by_dma: dict[int, GvtDma] = {}
        self.maps = 0  # gvt_dma_map_page calls that succeeded

    def _event(self, action: str, entry: GvtDma) -> None:
        if self.emit is not None:
            self.emit(action=action, gfn=entry.gfn, size=entry.size, dma=entry.dma_addr, ref=entry.ref)

    # ---- gvt_pin_guest_page / gvt_dma_map_page / gvt_dma_unmap_page -----------------
    def _pin_guest_page(self, gfn: int, size: int) -> int:
        """``gvt_pin_guest_page``: pin page by page; > 4 KiB must be host-contiguous."""
        total = max(1, size >> PAGE_SHIFT)
        base = 0
        for n in range(total):
            try:
                pfn = self.vfio.pin(gfn + n)
            except GvtError:
                if n:
                    self.vfio.unpin(gfn, n)
                raise
            if n == 0:
                base = pfn
            elif base + n != pfn:
                self.vfio.unpin(gfn, n + 1)
                raise GvtError("EINVAL", f"gfn {gfn:#x}: {size >> 10} KiB not contiguous in host memory")
        if total > 1 and base % total:
            # dma_map_page of a huge page gives a naturally aligned address; a
            # contiguous but misaligned run cannot back one GTT entry.
            self.vfio.unpin(gfn, total)
            raise GvtError("EINVAL", f"gfn {gfn:#x}: host pages not {size >> 10} KiB aligned")
        return base

    def _map_page(self, gfn: int, size: int) -> int:
        """``gvt_dma_map_page``: pin, then ``dma_map_page``."""
        pfn = self._pin_guest_page(gfn, size)
        self.maps += 1
        return self.iommu.map(pfn, max(1, size >> PAGE_SHIFT)) << PAGE_SHIFT

    def _unmap_page(self, entry: GvtDma) -> None:
        """``gvt_dma_unmap_page``: ``dma_unmap_page`` then unpin."""
        npages = max(1, entry.size >> PAGE_SHIFT)
        self.iommu.unmap(entry.dma_addr >> PAGE_SHIFT, npages)
        self.vfio.unpin(entry.gfn, npages)

    def _add(self, gfn: int, dma: int, size: int) -> GvtDma:
        entry = GvtDma(gfn, dma, size)
        self.by_gfn[gfn] = entry
        self.by_dma[dma] = entry
        return entry

    def _remove(self, entry: GvtDma) -> None:
        if self.by_gfn.get(entry.gfn) is entry:
            del self.by_gfn[entry.gfn]
        if self.by_dma.get(entry.dma_addr) is entry:
            del self.by_dma[entry.dma_addr]

    # ---- the exported API ------------------------------------------------------------
    def map_guest_page(self, gfn: int, size: int) -> int:
        """``intel_gvt_dma_map_guest_page``: the DMA address of ``gfn`` (``size`` bytes).

        Not attached → EINVAL.  Cached with the same size → one more reference.
        Cached with another size → the old mapping is unmapped and dropped at
        once, whatever its reference count, and ``gfn`` is mapped anew.
        """
        if not self.attached():
            raise GvtError("EINVAL", "vGPU is not attached")
        entry = self.by_gfn.get(gfn)
        if entry is not None and entry.size == size:
            entry.ref += 1
            self._event("ref", entry)
            return entry.dma_addr
        if entry is not None:
            self._unmap_page(entry)
            self._remove(entry)
            self._event("replace", entry)
        dma = self._map_page(gfn, size)
        entry = self._add(gfn, dma, size)
        self._event("map", entry)
        return dma

    def unmap_guest_page(self, dma_addr: int) -> None:
        """``intel_gvt_dma_unmap_guest_page``: drop one reference; unmap at zero.

        Unknown addresses and a detached vGPU are ignored.
        """
        if not self.attached():
            return
        entry = self.by_dma.get(dma_addr)
        if entry is None:
            return
        entry.ref -= 1
        if entry.ref == 0:
            self._unmap_page(entry)
            self._remove(entry)
            self._event("unmap", entry)
        else:
            self._event("unref", entry)

    def pin_guest_page(self, dma_addr: int) -> None:
        """``intel_gvt_dma_pin_guest_page``: one more reference on an existing mapping."""
        if not self.attached():
            raise GvtError("EINVAL", "vGPU is not attached")
        entry = self.by_dma.get(dma_addr)
        if entry is None:
            raise GvtError("ENOMEM", f"dma address {dma_addr:#x} is not mapped")
        entry.ref += 1

    def vfio_dma_unmap(self, iova: int, length: int) -> int:
        """``intel_vgpu_dma_unmap``: userspace unmapped ``[iova, iova+length)``.

        Every cached gfn in the range is unmapped and dropped regardless of its
        reference count.  Returns how many entries went.
        """
        first, end = iova >> PAGE_SHIFT, (iova + length + 0xFFF) >> PAGE_SHIFT
        gone = [e for g, e in self.by_gfn.items() if first <= g < end]
        for entry in gone:
            self._unmap_page(entry)
            self._remove(entry)
            self._event("vfio_unmap", entry)
        return len(gone)

    def destroy(self) -> None:
        """``gvt_cache_destroy``: unmap and unpin everything."""
        for entry in list(self.by_gfn.values()):
            self._unmap_page(entry)
            self._remove(entry)

    def lookup(self, gfn: int) -> GvtDma | None:
        """The cached mapping of ``gfn`` (``__gvt_cache_find_gfn``)."""
        return self.by_gfn.get(gfn)

    def translate(self, gfn: int) -> int | None:
        """Host pfn of ``gfn`` through the cache (its own entry, or a 2 MiB entry covering
        it) and the IOMMU; ``None`` if no live mapping covers it."""
        entry = self.by_gfn.get(gfn)
        if entry is not None:
            return self.iommu.translate(entry.dma_addr >> PAGE_SHIFT)
        base = gfn & ~(PAGES_PER_2M - 1)
        entry = self.by_gfn.get(base)
        if entry is not None and entry.size >= PAGES_PER_2M << PAGE_SHIFT:
            return self.iommu.translate((entry.dma_addr >> PAGE_SHIFT) + (gfn - base))
        return None
