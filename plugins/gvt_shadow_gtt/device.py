"""GVT-wide state (``struct intel_gvt`` / ``intel_gvt_gtt``): one per physical GPU.

* host memory for GVT's own pages (shadow tables, scratch pages), each a list of
  512 entries keyed by its mfn (the GPU reads these; ``spt_tree`` only indexes);
* the shadow-page budget whose exhaustion triggers ``reclaim_one_ppgtt_mm``;
* the out-of-sync page pool (``preallocated_oos_pages``, free and in-use lists),
  created only when ``enable_out_of_sync``;
* the LRU of PPGTT mms (``ppgtt_mm_lru_list_head`` under ``ppgtt_mm_lock``);
* the GVT-wide scratch page used by the GGTT (``scratch_mfn``);
* platform facts: graphics generation and 2 MiB GTT page support.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING

import attrs

from .entry import GTT_ENTRIES
from .errors import GvtError

if TYPE_CHECKING:
    from .mm import Mm
    from .spt import Spt
    from .vgpu import Vgpu

__all__ = ["GVT_MFN_BASE", "PREALLOCATED_OOS_PAGES", "GvtDevice", "OosPage"]

#: First mfn of GVT's own pages (far above guest-backing pfns).
GVT_MFN_BASE = 0x10000000
#: ``preallocated_oos_pages``.
PREALLOCATED_OOS_PAGES = 8192


@attrs.define(eq=False)
class OosPage:
    """``struct intel_vgpu_oos_page``: a snapshot buffer lent to one PTE page."""

    id: int
    mem: list[int] | None = None
    spt: Spt | None = None


class GvtDevice:
    """One physical GPU shared by its vGPUs.

    :param gen: graphics generation (8, 9, 11 ...): decides 64 KiB IPS support.
    :param has_2m: the platform has 2 MiB GTT pages (``HAS_PAGE_SIZES(.., 2M)``).
    :param out_of_sync: ``enable_out_of_sync`` (a static ``false`` upstream).
    :param oos_pages: size of the OOS pool.
    :param max_shadow_pages: shadow-page budget (``None``: unlimited);
        allocating past it fails as ``alloc_spt`` does and reclaims an mm.
    """

    def __init__(self, *, gen: int = 9, has_2m: bool = True, out_of_sync: bool = False,
                 oos_pages: int = PREALLOCATED_OOS_PAGES, max_shadow_pages: int | None = None) -> None:
        self.gen = gen
        self.has_2m = has_2m
        self.enable_out_of_sync = out_of_sync
        self.max_shadow_pages = max_shadow_pages
        self.host_pages: dict[int, list[int]] = {}
        self._next_mfn = GVT_MFN_BASE
        self.spt_pages = 0  # shadow pages allocated (not scratch)
        self.ppgtt_mm_lock = threading.Lock()
        self.lru: dict[Mm, None] = {}  # ordered: head first
        self.oos_free: deque[OosPage] = deque()
        self.oos_used: dict[OosPage, None] = {}  # ordered: oldest first
        if out_of_sync:
            self.oos_free.extend(OosPage(i) for i in range(oos_pages))
        self.vgpus: dict[int, Vgpu] = {}
        self.scratch_mfn = self.alloc_page()  # GVT-wide scratch page (GGTT only)

    # ---- host pages ------------------------------------------------------------------
    def alloc_page(self) -> int:
        """A zeroed host page, DMA-mapped (identity); returns its mfn."""
        mfn = self._next_mfn
        self._next_mfn += 1
        self.host_pages[mfn] = [0] * GTT_ENTRIES
        return mfn

    def free_page(self, mfn: int) -> None:
        self.host_pages.pop(mfn, None)

    def alloc_spt_page(self) -> int:
        """``alloc_spt`` + ``dma_map_page``: -ENOMEM (as a NULL return) past the budget."""
        if self.max_shadow_pages is not None and self.spt_pages >= self.max_shadow_pages:
            raise GvtError("ENOMEM", "fail to allocate ppgtt shadow page")
        self.spt_pages += 1
        return self.alloc_page()

    def free_spt_page(self, mfn: int) -> None:
        self.spt_pages -= 1
        self.free_page(mfn)

    # ---- vGPU ids (idr from 1) ---------------------------------------------------------
    def add_vgpu(self, vgpu: Vgpu) -> int:
        vid = 1
        while vid in self.vgpus:
            vid += 1
        self.vgpus[vid] = vgpu
        return vid

    def remove_vgpu(self, vid: int) -> None:
        self.vgpus.pop(vid, None)
