"""The global GTT: MMIO-trapped, never write-tracked (gvt/gtt.c, kvmgt.c).

The guest reaches its GGTT through BAR0 at 8 MiB; KVMGT never maps BAR0 into
the guest, so every GGTT store is an emulated MMIO write that QEMU forwards
through the vfio device file (:func:`intel_vgpu_write` chunks it) to
:func:`emulate_ggtt_mmio_write`.  The vGPU owns an aperture slice and a hidden
slice of the graphics address space; writes elsewhere are ignored (ballooning).
Entries are shadowed one-for-one at the same index: ``virtual`` holds what the
guest wrote, ``host`` the translated entries the GPU uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from . import entry as E
from .entry import GttEntry, GttType
from .errors import GvtError

if TYPE_CHECKING:
    from .vgpu import Vgpu

__all__ = [
    "GTT_START",
    "VFIO_PCI_OFFSET_SHIFT",
    "Ggtt",
    "emulate_ggtt_mmio_read",
    "emulate_ggtt_mmio_write",
    "intel_vgpu_reset_ggtt",
    "intel_vgpu_write",
]

GTT_START = 8 << 20  #: device_info.gtt_start_offset within BAR0
GGTT_ENTRY_SIZE = 8
VFIO_PCI_OFFSET_SHIFT = 40
VFIO_PCI_BAR0_REGION_INDEX = 0
PCI_BASE_ADDRESS_0 = 0x10  #: a config-space offset, which gtt_entry() compares a region index with


@attrs.define(eq=False)
class PartialPte:
    """``struct intel_gvt_partial_pte``: a saved half of an entry."""

    offset: int
    data: int


@attrs.define(eq=False)
class Ggtt:
    """The vGPU's ``ggtt_mm``: virtual and host entries, the partial-PTE list, its slices.

    ``aperture`` and ``hidden`` are ``(base, size)`` in graphics-address bytes.
    """

    aperture: tuple[int, int]
    hidden: tuple[int, int]
    size: int = 4 << 30  #: graphics address space covered by the GGTT
    virtual: dict[int, int] = attrs.field(factory=dict)
    host: dict[int, int] = attrs.field(factory=dict)  #: written entries; others read scratch
    partial: list[PartialPte] = attrs.field(factory=list)
    scratch_entry: int = 0  #: scratch_mfn | present, what a reset leaves in the slices

    def valid(self, gma: int) -> bool:
        """``vgpu_gmadr_is_valid``: inside the aperture or hidden slice."""
        return any(base <= gma < base + size for base, size in (self.aperture, self.hidden))

    def host_entry(self, index: int) -> int:
        """The host GGTT entry at ``index`` (0 outside the vGPU's slices)."""
        if not self.valid(index << 12):
            return 0
        return self.host.get(index, self.scratch_entry)


def intel_vgpu_reset_ggtt(vgpu: Vgpu, invalidate_old: bool) -> None:
    """``intel_vgpu_reset_ggtt``: every host entry of the slices := scratch_mfn | present.

    Kept lazily: entries never written read as ``scratch_entry``.
    """
    ggtt = vgpu.ggtt
    e = GttEntry(GttType.GGTT_PTE)
    E.set_pfn(e, vgpu.gvt.scratch_mfn)
    e.val64 |= E.GEN8_PAGE_PRESENT
    if invalidate_old:
        for value in ggtt.host.values():
            _ggtt_invalidate_pte(vgpu, GttEntry(GttType.GGTT_PTE, value))
    ggtt.scratch_entry = e.val64
    ggtt.host.clear()


def _ggtt_invalidate_pte(vgpu: Vgpu, e: GttEntry) -> None:
    """``ggtt_invalidate_pte``: unmap the old target unless it is scratch_mfn."""
    pfn = E.get_pfn(e)
    if pfn != vgpu.gvt.scratch_mfn:
        vgpu.dma.unmap_guest_page(pfn << 12)


def emulate_ggtt_mmio_write(vgpu: Vgpu, off: int, data: bytes) -> None:
    """``emulate_ggtt_mmio_write``: ``off`` is relative to the GTT start.

    A 4-byte write is half an entry: the first half is saved (host entry made
    non-present scratch), the other half merges with it and the full entry is
    shadowed; a repeated write to the same half only updates the saved half and
    the virtual entry.  A present full entry maps its gfn (failure → present
    scratch); anything else → scratch with present cleared.  The old host
    target is unmapped unless it was scratch.
    """
    nbytes = len(data)
    if nbytes not in (4, 8):
        raise GvtError("EINVAL", f"{nbytes}-byte GGTT write")
    ggtt = vgpu.ggtt
    index = off >> 3
    gma = index << 12
    if not ggtt.valid(gma):
        return
    shift = 8 * (off & 7)
    e = GttEntry(GttType.GGTT_PTE, (int.from_bytes(data, "little") << shift) & ((1 << 64) - 1))
    partial_update = False
    if nbytes < GGTT_ENTRY_SIZE:
        found = False
        for pos in list(ggtt.partial):
            if pos.offset >> 3 != index:
                continue
            if off != pos.offset:
                last = 8 * (pos.offset & 7)
                half = ((1 << (8 * nbytes)) - 1) << last
                e.val64 |= pos.data & half
                ggtt.partial.remove(pos)
                found = True
                break
            pos.data = e.val64
            ggtt.virtual[index] = e.val64
            return
        if not found:
            ggtt.partial.append(PartialPte(off, e.val64))
            partial_update = True
    m = e.copy()
    if not partial_update and E.test_present(e):
        gfn = E.get_pfn(e)
        try:
            dma = vgpu.dma.map_guest_page(gfn, 4096)
            E.set_pfn(m, dma >> 12)
        except GvtError:
            vgpu.error("fail to populate guest ggtt entry")
            E.set_pfn(m, vgpu.gvt.scratch_mfn)
    else:
        E.set_pfn(m, vgpu.gvt.scratch_mfn)
        m.val64 &= ~E.GEN8_PAGE_PRESENT
    ggtt.virtual[index] = e.val64
    old = ggtt.host_entry(index)
    _ggtt_invalidate_pte(vgpu, GttEntry(GttType.GGTT_PTE, old))
    ggtt.host[index] = m.val64
    if vgpu.audit_on:
        vgpu.emit("gvt_ggtt_update", index=index, guest=e.val64, old=old, new=m.val64)


def emulate_ggtt_mmio_read(vgpu: Vgpu, off: int, nbytes: int) -> bytes:
    """``emulate_ggtt_mmio_read``: 4 or 8 bytes of the virtual entry; zeros outside the slices."""
    if nbytes not in (4, 8):
        raise GvtError("EINVAL", f"{nbytes}-byte GGTT read")
    index = off >> 3
    if not vgpu.ggtt.valid(index << 12):
        return bytes(nbytes)
    value = vgpu.ggtt.virtual.get(index, 0).to_bytes(8, "little")
    start = off & 7
    return value[start:start + nbytes]


def _gtt_entry(pos: int) -> bool:
    """``gtt_entry``: as written it compares the region index with PCI_BASE_ADDRESS_0 (0x10).

    BAR0 is region 0, so this is never true for BAR0 accesses.
    """
    index = pos >> VFIO_PCI_OFFSET_SHIFT
    offset = pos & ((1 << VFIO_PCI_OFFSET_SHIFT) - 1)
    if index != PCI_BASE_ADDRESS_0:
        return False
    return GTT_START <= offset < GTT_START + (4 << 20)  # pragma: no cover - unreachable as written


def _mmio_write(vgpu: Vgpu, bar_off: int, data: bytes) -> None:
    """The MMIO layer: GTT accesses must be 4 or 8 bytes, 4-aligned, inside the GTT range."""
    off = bar_off - GTT_START
    gtt_bytes = (vgpu.ggtt.size >> 12) * GGTT_ENTRY_SIZE
    if len(data) not in (4, 8) or off & 3 or off + len(data) > gtt_bytes:
        raise GvtError("EINVAL", f"bad GTT access: {len(data)} bytes at {off:#x}")
    emulate_ggtt_mmio_write(vgpu, off, data)


def intel_vgpu_write(vgpu: Vgpu, pos: int, data: bytes) -> int:
    """``intel_vgpu_write``: QEMU's write to the vfio device file, chopped into chunks.

    8 bytes only if ``pos`` is 8-aligned and ``gtt_entry`` agrees (never, for
    BAR0), else 4, 2 or 1 by alignment.  Only BAR0 GTT offsets are modelled.
    Returns the bytes written.
    """
    done = 0
    while done < len(data):
        left = len(data) - done
        cur = pos + done
        if left >= 8 and not cur % 8 and _gtt_entry(cur):
            n = 8
        elif left >= 4 and not cur % 4:
            n = 4
        elif left >= 2 and not cur % 2:
            n = 2
        else:
            n = 1
        region = cur >> VFIO_PCI_OFFSET_SHIFT
        if region != VFIO_PCI_BAR0_REGION_INDEX:
            raise GvtError("EINVAL", f"region {region} is not modelled")
        with vgpu.lock:
            _mmio_write(vgpu, cur & ((1 << VFIO_PCI_OFFSET_SHIFT) - 1), data[done:done + n])
        done += n
    return done
