"""DMA cache and GGTT (spec gvt-shadow-gtt.md §7–§8, §13 cases 36–40, 43, 44, 48, 49).

kvmgt.c: intel_gvt_dma_map_guest_page / _unmap_guest_page, gvt_pin_guest_page,
intel_vgpu_dma_unmap, intel_vgpu_write; gtt.c: emulate_ggtt_mmio_write / _read.
"""

from __future__ import annotations

import pytest
from gvt_helpers import events, gvt
from pagetrack.plugins.gvt_shadow_gtt import GvtError
from pagetrack.plugins.gvt_shadow_gtt import entry as E
from pagetrack.plugins.gvt_shadow_gtt.dma import HUGE_BASE_PFN, HostBacking
from pagetrack.plugins.gvt_shadow_gtt.entry import GttEntry, GttType

__all__ = ["gvt"]

SZ_4K, SZ_2M = 4096, 2 << 20
APERTURE = 0x08000000
IDX = APERTURE >> 12  # first GGTT index of the vGPU's aperture slice


def frame(value: int) -> int:
    return E.get_pfn(GttEntry(GttType.GGTT_PTE, value))


# ---- host backing ---------------------------------------------------------------------


def test_host_backing_4k_pages_are_never_contiguous_huge_ones_are() -> None:
    backing = HostBacking("4k", [(0x800, 0xA00)])
    small = [backing.pfn_of(g) for g in range(0xA00, 0xA00 + 512)]
    assert small == sorted(small, reverse=True)  # adjacent but descending
    huge = [backing.pfn_of(g) for g in range(0x800, 0x800 + 512)]
    assert huge == list(range(HUGE_BASE_PFN + 0x800, HUGE_BASE_PFN + 0x800 + 512))
    assert huge[0] % 512 == 0
    assert backing.pfn_of(0xA00) == small[0]  # stable
    assert backing.gfn_of(huge[3]) == 0x803


def test_pin_limit_is_the_memlock_budget(gvt) -> None:
    _, vgpu = gvt(pin_limit=2)
    with vgpu.lock:
        vgpu.dma.map_guest_page(0x600, SZ_4K)
        vgpu.dma.map_guest_page(0x601, SZ_4K)
        vgpu.dma.map_guest_page(0x601, SZ_4K)  # cached: no new pin
        with pytest.raises(GvtError) as err:
            vgpu.dma.map_guest_page(0x602, SZ_4K)
    assert err.value.errno_name == "ENOMEM" and vgpu.vfio.locked == 2


def test_unmappable_gfns_and_detached_vgpus(gvt) -> None:
    _, vgpu = gvt()
    with vgpu.lock, pytest.raises(GvtError) as err:
        vgpu.dma.map_guest_page(0x100000, SZ_4K)
    assert err.value.errno_name == "EINVAL"
    vgpu.close()
    with pytest.raises(GvtError):
        vgpu.dma.map_guest_page(0x600, SZ_4K)
    vgpu.dma.unmap_guest_page(0x600000)  # ignored


def test_a_non_contiguous_2m_pin_is_undone(gvt) -> None:
    _, vgpu = gvt()
    with vgpu.lock, pytest.raises(GvtError) as err:
        vgpu.dma.map_guest_page(0xA00, SZ_2M)
    assert err.value.errno_name == "EINVAL" and vgpu.vfio.locked == 0


# ---- case 43 --------------------------------------------------------------------------


def test_case_43_a_gfn_is_mapped_once_and_unmapped_after_its_last_user(gvt) -> None:
    _, vgpu = gvt(huge_ranges=[(0x800, 0xA00)])
    dma = vgpu.dma
    with vgpu.lock:
        a = dma.map_guest_page(0x800, SZ_4K)
        assert dma.map_guest_page(0x800, SZ_4K) == a and dma.maps == 1
        dma.unmap_guest_page(a)
        assert dma.lookup(0x800).ref == 1 and vgpu.vfio.locked == 1
        dma.unmap_guest_page(a)
        assert dma.lookup(0x800) is None and vgpu.vfio.locked == 0
        dma.map_guest_page(0x800, SZ_4K)
        big = dma.map_guest_page(0x800, SZ_2M)
    entry = dma.lookup(0x800)
    assert entry.size == SZ_2M and entry.dma_addr == big and entry.ref == 1
    assert vgpu.vfio.locked == 512


# ---- case 44 --------------------------------------------------------------------------


def test_case_44_a_vfio_unmap_drops_cached_gfns_whatever_their_refcount(gvt) -> None:
    _, vgpu = gvt()
    with vgpu.lock:
        for gfn in (0x600, 0x600, 0x601, 0x700):
            vgpu.dma.map_guest_page(gfn, SZ_4K)
    assert vgpu.vfio_dma_unmap(0x600000, 0x2000) == 2
    assert vgpu.dma.lookup(0x600) is None and vgpu.dma.lookup(0x601) is None
    assert vgpu.dma.lookup(0x700).ref == 1 and vgpu.vfio.locked == 1


# ---- case 49 --------------------------------------------------------------------------


def test_case_49_a_2m_map_replaces_a_shared_4k_mapping_at_once(gvt) -> None:
    vm, vgpu = gvt(huge_ranges=[(0x800, 0xA00)])
    with vgpu.lock:
        vgpu.dma.map_guest_page(0x800, SZ_4K)
        vgpu.dma.map_guest_page(0x800, SZ_4K)
        assert vgpu.dma.lookup(0x800).ref == 2
        vgpu.dma.map_guest_page(0x800, SZ_2M)
    entry = vgpu.dma.lookup(0x800)
    assert entry.size == SZ_2M and entry.ref == 1
    assert [e["action"] for e in events(vm, "gvt_dma")][-2:] == ["replace", "map"]


# ---- case 36 --------------------------------------------------------------------------


def test_case_36_a_ggtt_write_is_shadowed_one_for_one(gvt) -> None:
    vm, vgpu = gvt()
    adds = len(events(vm, "track_add"))
    value = (0x600 << 12) | E.GEN8_PAGE_PRESENT | 0x6
    vgpu.ggtt_mmio_write(8 * (IDX + 3), value.to_bytes(8, "little"))
    assert len(events(vm, "track_add")) == adds  # no write tracking involved
    assert vgpu.ggtt.virtual[IDX + 3] == value
    host = vgpu.ggtt.host_entry(IDX + 3)
    assert host == (value & ~E.ADDR_4K_MASK) | vgpu.dma.lookup(0x600).dma_addr
    vgpu.ggtt_mmio_write(8 * (IDX + 3), ((0x601 << 12) | 1).to_bytes(8, "little"))
    assert vgpu.dma.lookup(0x600) is None  # the old target was unmapped
    before = dict(vgpu.dma.by_gfn)
    vgpu.ggtt_mmio_write(8 * (IDX + 4), ((0x602 << 12) | 1).to_bytes(8, "little"))
    assert set(vgpu.dma.by_gfn) == set(before) | {0x602}  # a scratch target is not unmapped


# ---- case 37 --------------------------------------------------------------------------


def test_case_37_an_unmappable_ggtt_entry_points_at_present_scratch(gvt) -> None:
    _, vgpu = gvt()
    vgpu.ggtt_mmio_write(8 * IDX, ((0x100000 << 12) | 1).to_bytes(8, "little"))
    host = vgpu.ggtt.host_entry(IDX)
    assert frame(host) == vgpu.gvt.scratch_mfn and host & E.GEN8_PAGE_PRESENT
    assert "fail to populate guest ggtt entry" in vgpu.log


# ---- case 38 --------------------------------------------------------------------------


def test_case_38_a_non_present_ggtt_entry_points_at_scratch_not_present(gvt) -> None:
    _, vgpu = gvt()
    value = (0x600 << 12) | 0x2
    vgpu.ggtt_mmio_write(8 * IDX, value.to_bytes(8, "little"))
    host = vgpu.ggtt.host_entry(IDX)
    assert host == (value & ~E.ADDR_4K_MASK) | (vgpu.gvt.scratch_mfn << 12)
    assert not host & E.GEN8_PAGE_PRESENT and vgpu.dma.lookup(0x600) is None


# ---- case 39 --------------------------------------------------------------------------


def test_case_39_ggtt_halves_are_paired(gvt) -> None:
    _, vgpu = gvt()
    value = (0x0_0060_5000) | 1 | (0xAB << 52)
    lo, hi = value & 0xFFFFFFFF, value >> 32
    vgpu.ggtt_mmio_write(8 * IDX, lo.to_bytes(4, "little"))
    assert vgpu.ggtt.virtual[IDX] == lo
    host = vgpu.ggtt.host_entry(IDX)
    assert frame(host) == vgpu.gvt.scratch_mfn and not host & E.GEN8_PAGE_PRESENT
    vgpu.ggtt_mmio_write(8 * IDX, (lo | 0x2).to_bytes(4, "little"))  # the same half again
    assert vgpu.ggtt.partial[0].data == lo | 0x2 and vgpu.ggtt.virtual[IDX] == lo | 0x2
    assert vgpu.ggtt.host_entry(IDX) == host
    vgpu.ggtt_mmio_write(8 * IDX + 4, hi.to_bytes(4, "little"))
    assert not vgpu.ggtt.partial
    assert vgpu.ggtt.virtual[IDX] == value | 0x2
    assert vgpu.ggtt.host_entry(IDX) == ((value | 0x2) & ~E.ADDR_4K_MASK) | vgpu.dma.lookup(0x605).dma_addr


# ---- case 40 --------------------------------------------------------------------------


def test_case_40_outside_the_vgpu_slices_writes_are_ignored(gvt) -> None:
    _, vgpu = gvt()
    vgpu.ggtt_mmio_write(8 * 5, ((0x600 << 12) | 1).to_bytes(8, "little"))
    assert 5 not in vgpu.ggtt.virtual and vgpu.dma.lookup(0x600) is None
    assert vgpu.ggtt_mmio_read(8 * 5, 8) == bytes(8)
    hidden = vgpu.ggtt.hidden[0] >> 12
    vgpu.ggtt_mmio_write(8 * hidden, ((0x600 << 12) | 1).to_bytes(8, "little"))
    assert vgpu.ggtt_mmio_read(8 * hidden, 8) == ((0x600 << 12) | 1).to_bytes(8, "little")
    assert vgpu.ggtt_mmio_read(8 * hidden + 4, 4) == bytes(4)


# ---- case 48 --------------------------------------------------------------------------


def test_case_48_an_8_byte_vfio_write_reaches_the_ggtt_as_two_halves(gvt) -> None:
    vm, vgpu = gvt()
    value = (0x600 << 12) | 1
    assert vgpu.vfio_write(vgpu.bar0_gtt_pos(IDX + 7), value.to_bytes(8, "little")) == 8
    updates = [e for e in events(vm, "gvt_ggtt_update") if e["index"] == IDX + 7]
    assert len(updates) == 2
    first, second = updates
    assert frame(first["new"]) == vgpu.gvt.scratch_mfn and not first["new"] & E.GEN8_PAGE_PRESENT
    assert second["new"] == vgpu.dma.lookup(0x600).dma_addr | 1


def test_bad_ggtt_accesses_are_rejected(gvt) -> None:
    _, vgpu = gvt()
    with pytest.raises(GvtError):
        vgpu.ggtt_mmio_write(8 * IDX, b"\x01\x02")
    with pytest.raises(GvtError):
        vgpu.vfio_write(vgpu.bar0_gtt_pos(IDX) + 2, b"\x01\x02")  # 2-byte chunk: not a GTT access
