"""PPGTT shadowing (spec gvt-shadow-gtt.md §5–§6, §13 cases 14–35, 41, 42, 46, 50).

gtt.c: shadow_ppgtt_mm, ppgtt_populate_spt(_by_guest_entry), ppgtt_populate_shadow_entry,
the split helpers, ppgtt_handle_guest_write_page_table(_bytes), the post-shadow list,
mm find/pin/reclaim and the out-of-sync pages.
"""

from __future__ import annotations

import errno
import re

import pytest
from gvt_helpers import (
    DATA,
    PD,
    PDP,
    PML4,
    PT,
    P,
    chain,
    events,
    guest_write32,
    guest_write64,
    gvt,
    peek,
    poke,
    pte,
    spt_of,
)
from pagetrack.plugins.gvt_shadow_gtt import GvtError, check_mm
from pagetrack.plugins.gvt_shadow_gtt import entry as E
from pagetrack.plugins.gvt_shadow_gtt.dma import HUGE_BASE_PFN
from pagetrack.plugins.gvt_shadow_gtt.entry import GttType as T
from pagetrack.plugins.gvt_shadow_gtt.mm import intel_vgpu_pin_mm, shadow_ppgtt_mm
from pagetrack.plugins.gvt_shadow_gtt.shadow import intel_vgpu_sync_oos_pages
from pagetrack.plugins.gvt_shadow_gtt.spt import intel_vgpu_find_spt_by_gfn

__all__ = ["gvt"]

IPS = E.GEN8_PDE_IPS_64K
PS = E.PAGE_PSE
FLAG64K = E.GTT_SPTE_FLAG_64K_SPLITED
FRAME = E.ADDR_4K_MASK


def dma_pfn(vgpu, gfn: int) -> int:
    entry = vgpu.dma.lookup(gfn)
    assert entry is not None, f"gfn {gfn:#x} is not DMA-mapped"
    return entry.dma_addr >> 12


def with_frame(value: int, pfn: int) -> int:
    return (value & ~FRAME) | (pfn << 12)


# ---- case 14 --------------------------------------------------------------------------


def test_case_14_creating_an_l4_mm_shadows_the_whole_chain(gvt) -> None:
    vm, vgpu = gvt()
    pdps0 = chain(vm, leaves={0: 0x600})
    mm = vgpu.get_ppgtt_mm([pdps0])
    types = [spt_of(vgpu, g).shadow_type for g in (PML4, PDP, PD, PT)]
    assert types == [T.PPGTT_PML4_PT, T.PPGTT_PDP_PT, T.PPGTT_PDE_PT, T.PPGTT_PTE_PT]
    assert vgpu.ptable == {PML4, PDP, PD, PT}
    assert all(vm.write_track_count(g) == 1 for g in (PML4, PDP, PD, PT))
    assert vgpu.dma.maps == 1 and vgpu.dma.lookup(0x600).ref == 1
    assert mm.shadow_pdps[0] == with_frame(pdps0, spt_of(vgpu, PML4).mfn)
    assert check_mm(mm).ok


# ---- case 15 --------------------------------------------------------------------------


def test_case_15_l3_roots_are_present_iff_non_zero(gvt) -> None:
    vm, vgpu = gvt()
    poke(vm, 0x1000, 0)
    mm = vgpu.get_ppgtt_mm([0x1000, 0, 0, 0], levels=3)
    pd = spt_of(vgpu, 1)
    assert pd.shadow_type == T.PPGTT_PDE_PT
    assert mm.shadow_pdps == [pd.mfn << 12, 0, 0, 0]


# ---- case 16 --------------------------------------------------------------------------


def test_case_16_a_new_pde_shadows_and_protects_its_pt(gvt) -> None:
    vm, vgpu = gvt()  # gen9 without IPS: bit 11 is not honoured but still cleared
    vgpu.get_ppgtt_mm([chain(vm)])
    poke(vm, 0x504 << 12, pte(0x610))
    poke(vm, (0x504 << 12) + 24, pte(0x611))
    assert 0x504 not in vgpu.ptable
    guest_write64(vm, (PD << 12) + 8, pte(0x504) | IPS)
    spt = spt_of(vgpu, 0x504)
    assert spt.shadow_type == T.PPGTT_PTE_PT
    assert 0x504 in vgpu.ptable and vm.write_track_count(0x504) == 1
    assert spt.shadow[0] == pte(dma_pfn(vgpu, 0x610)) and spt.shadow[3] == pte(dma_pfn(vgpu, 0x611))
    assert spt_of(vgpu, PD).shadow[1] == pte(spt.mfn)  # frame := spt mfn, bit 11 cleared


# ---- case 17 --------------------------------------------------------------------------


def test_case_17_two_pdes_share_one_spt(gvt) -> None:
    vm, vgpu = gvt()
    pdps0 = chain(vm)
    poke(vm, (PD << 12) + 8, pte(PT))
    vgpu.get_ppgtt_mm([pdps0])
    spt = spt_of(vgpu, PT)
    assert spt.refcount == 2
    assert [s for s in vgpu.spt_tree.values() if s.guest_gfn == PT] == [spt]
    guest_write64(vm, (PD << 12) + 8, 0)
    assert spt.refcount == 1 and PT in vgpu.ptable and spt.mfn in vgpu.spt_tree


# ---- case 18 --------------------------------------------------------------------------


def test_case_18_clearing_the_last_pde_frees_the_pt(gvt) -> None:
    vm, vgpu = gvt()
    vgpu.get_ppgtt_mm([chain(vm, leaves={0: 0x600, 1: 0x601})])
    pd, pt = spt_of(vgpu, PD), spt_of(vgpu, PT)
    old = pd.shadow[0]
    guest_write64(vm, PD << 12, 0)
    assert vgpu.dma.lookup(0x600) is None and vgpu.dma.lookup(0x601) is None
    assert PT not in vgpu.ptable and vm.write_track_count(PT) == 0
    assert pt.mfn not in vgpu.spt_tree and intel_vgpu_find_spt_by_gfn(vgpu, PT) is None
    assert pd.shadow[0] == with_frame(old, vgpu.scratch_pt[T.PPGTT_PDE_PT])
    assert pd.shadow[0] & P == P  # still present, pointing at scratch


# ---- case 19 --------------------------------------------------------------------------


def test_case_19_a_remap_maps_b_before_dropping_a(gvt) -> None:
    vm, vgpu = gvt()
    vgpu.get_ppgtt_mm([chain(vm, leaves={0: 0x600})])
    guest_write64(vm, PT << 12, pte(0x601))
    dma = [(e["action"], e["gfn"]) for e in events(vm, "gvt_dma")]
    assert dma.index(("map", 0x601)) < dma.index(("unmap", 0x600))
    assert spt_of(vgpu, PT).shadow[0] == pte(dma_pfn(vgpu, 0x601))
    assert vgpu.dma.lookup(0x600) is None


# ---- case 20 --------------------------------------------------------------------------


def test_case_20_writing_zero_scratches_the_pte(gvt) -> None:
    vm, vgpu = gvt()
    vgpu.get_ppgtt_mm([chain(vm, leaves={0: 0x600})])
    spt = spt_of(vgpu, PT)
    old = spt.shadow[0]
    guest_write64(vm, PT << 12, 0)
    assert vgpu.dma.lookup(0x600) is None
    assert spt.shadow[0] == with_frame(old, vgpu.scratch_pt[T.PPGTT_PTE_PT])
    assert spt.shadow[0] & P


# ---- case 21 --------------------------------------------------------------------------


def test_case_21_an_identical_rewrite_nets_out(gvt) -> None:
    vm, vgpu = gvt()
    vgpu.get_ppgtt_mm([chain(vm, leaves={0: 0x600})])
    pt = spt_of(vgpu, PT)
    before = (vgpu.dma.lookup(0x600).ref, pt.refcount, list(pt.shadow), list(spt_of(vgpu, PD).shadow))
    guest_write64(vm, PT << 12, pte(0x600))
    guest_write64(vm, PD << 12, pte(PT))
    assert (vgpu.dma.lookup(0x600).ref, pt.refcount, list(pt.shadow), list(spt_of(vgpu, PD).shadow)) == before


# ---- cases 22, 23, 24 -----------------------------------------------------------------


def test_cases_22_23_24_partial_writes_wait_for_the_next_submit(gvt) -> None:
    vm, vgpu = gvt()
    pdps0 = chain(vm, leaves={2: 0x600})
    vgpu.get_ppgtt_mm([pdps0])
    spt = spt_of(vgpu, PT)
    old = spt.shadow[2]
    new = pte(0x1234)  # gfn 0x1234: in the data slot
    # case 22: the low half
    guest_write32(vm, (PT << 12) + 16, new & 0xFFFFFFFF)
    assert vgpu.dma.lookup(0x600) is None  # old mapping released
    assert spt.shadow[2] == with_frame(old, vgpu.scratch_pt[T.PPGTT_PTE_PT])
    assert spt.post_shadow_bitmap == {2} and list(vgpu.post_shadow_list) == [spt]
    assert vgpu.dma.lookup(0x1234) is None  # not interpreted yet
    scratched = spt.shadow[2]
    # case 23: the high half, bit already set
    guest_write32(vm, (PT << 12) + 20, new >> 32)
    assert spt.shadow[2] == scratched and list(vgpu.post_shadow_list) == [spt]
    # case 24: the submit flushes
    assert vgpu.submit([pdps0]) == 0
    assert spt.post_shadow_bitmap == set() and not vgpu.post_shadow_list
    assert spt.shadow[2] == pte(dma_pfn(vgpu, 0x1234))
    assert vgpu.reports[-1].ok


def test_case_24_an_8_byte_write_with_the_bit_set_is_processed_again_at_flush(gvt) -> None:
    vm, vgpu = gvt()
    pdps0 = chain(vm, leaves={2: 0x600})
    vgpu.get_ppgtt_mm([pdps0])
    spt = spt_of(vgpu, PT)
    guest_write32(vm, (PT << 12) + 16, 0x601003)
    guest_write64(vm, (PT << 12) + 16, pte(0x602))  # handled now, bit stays set
    assert spt.post_shadow_bitmap == {2}
    assert vgpu.dma.lookup(0x602).ref == 1
    assert vgpu.submit([pdps0]) == 0  # re-processed: map +1, unmap -1
    assert vgpu.dma.lookup(0x602).ref == 1 and spt.post_shadow_bitmap == set()


# ---- case 25 --------------------------------------------------------------------------


def test_case_25_an_8_byte_write_at_0x2c_is_entry_5(gvt) -> None:
    vm, vgpu = gvt()
    pdps0 = chain(vm, leaves={6: 0x650})
    vgpu.get_ppgtt_mm([pdps0])
    spt = spt_of(vgpu, PT)
    entry6 = spt.shadow[6]
    poke(vm, (PT << 12) + 0x28, pte(0x640))  # entry 5, written behind GVT's back
    # bytes 0x2c..0x33: the high half of entry 5 (0) and the low half of entry 6
    guest_write64(vm, (PT << 12) + 0x2C, (pte(0x651) & 0xFFFFFFFF) << 32)
    assert spt.shadow[5] == pte(dma_pfn(vgpu, 0x640))  # entry 5 re-read in full and shadowed
    assert spt.shadow[6] == entry6 and vgpu.dma.lookup(0x651) is None  # entry 6 not looked at


# ---- case 26 --------------------------------------------------------------------------


@pytest.mark.parametrize("platform", [{"gen": 11}, {"gen": 9, "ips": True}])
def test_case_26_64k_entries_split_into_16(gvt, platform) -> None:
    vm, vgpu = gvt(**platform)
    pdps0 = chain(vm, leaves={0: 0x700, 1: 0x650, 16: 0x710})
    poke(vm, PD << 12, pte(PT) | IPS)
    vgpu.get_ppgtt_mm([pdps0])
    spt = spt_of(vgpu, PT)
    assert spt.pde_ips
    for base, gfn in ((0, 0x700), (16, 0x710)):
        for k in range(16):
            assert spt.shadow[base + k] == pte(dma_pfn(vgpu, gfn + k)) | FLAG64K
    assert vgpu.dma.lookup(0x650) is None  # entry 1 is not a 64K slot
    before = list(spt.shadow)
    guest_write64(vm, (PT << 12) + 8 * 3, pte(0x660))  # not divisible by 16: ignored
    assert spt.shadow == before and vgpu.dma.lookup(0x660) is None


def test_case_26_gen9_without_ips_ignores_bit_11(gvt) -> None:
    vm, vgpu = gvt(gen=9, ips=False)
    pdps0 = chain(vm, leaves={0: 0x700, 1: 0x650})
    poke(vm, PD << 12, pte(PT) | IPS)
    vgpu.get_ppgtt_mm([pdps0])
    spt = spt_of(vgpu, PT)
    assert not spt.pde_ips
    assert spt.shadow[1] == pte(dma_pfn(vgpu, 0x650)) and not spt.shadow[1] & FLAG64K


# ---- case 27 --------------------------------------------------------------------------


def test_case_27_an_ips_change_repopulates_without_releasing(gvt) -> None:
    vm, vgpu = gvt(gen=11)
    pdps0 = chain(vm, leaves={0: 0x700, 1: 0x650})
    vgpu.get_ppgtt_mm([pdps0])
    spt = spt_of(vgpu, PT)
    assert not spt.pde_ips and spt.shadow[1] == pte(dma_pfn(vgpu, 0x650))
    guest_write64(vm, PD << 12, pte(PT) | IPS)
    assert spt.pde_ips and spt.refcount == 1
    assert [spt.shadow[k] for k in range(16)] == [pte(dma_pfn(vgpu, 0x700 + k)) | FLAG64K for k in range(16)]
    assert vgpu.dma.lookup(0x650).ref == 1  # the old 4K mapping was never released
    assert vgpu.dma.lookup(0x700).ref == 2  # mapped by the 4K entry and again by the split


# ---- case 28 --------------------------------------------------------------------------


def test_case_28_scratching_a_64k_entry_releases_only_its_first_page(gvt) -> None:
    vm, vgpu = gvt(gen=11)
    pdps0 = chain(vm, leaves={16: 0x710})
    poke(vm, PD << 12, pte(PT) | IPS)
    vgpu.get_ppgtt_mm([pdps0])
    spt = spt_of(vgpu, PT)
    guest_write64(vm, (PT << 12) + 8 * 16, 0)
    scratch = vgpu.scratch_pt[T.PPGTT_PTE_PT]
    for k in range(16, 32):
        assert E.get_pfn(E.GttEntry(T.PPGTT_PTE_4K_ENTRY, spt.shadow[k])) == scratch
        assert not spt.shadow[k] & FLAG64K
    assert vgpu.dma.lookup(0x710) is None
    assert all(vgpu.dma.lookup(0x710 + k).ref == 1 for k in range(1, 16))  # leaked


# ---- case 29 --------------------------------------------------------------------------


def test_case_29_a_contiguous_2m_page_stays_2m(gvt) -> None:
    vm, vgpu = gvt(huge_ranges=[(0x800, 0xA00)])
    pdps0 = chain(vm, leaves={})
    poke(vm, (PD << 12) + 8, pte(0x800) | PS)
    mm = vgpu.get_ppgtt_mm([pdps0])
    entry = vgpu.dma.lookup(0x800)
    assert entry.size == 2 << 20 and entry.dma_addr % (2 << 20) == 0
    assert vgpu.dma.iommu.translate(entry.dma_addr >> 12) == HUGE_BASE_PFN + 0x800
    assert spt_of(vgpu, PD).shadow[1] == pte(entry.dma_addr >> 12) | PS
    assert check_mm(mm).ok and check_mm(mm).pages == 512


@pytest.mark.parametrize("options", [{}, {"has_2m": False, "huge_ranges": [(0x800, 0xA00)]}],
                         ids=["not-contiguous", "no-2m-pages"])
def test_case_29_otherwise_it_is_split_into_an_untracked_pt(gvt, options) -> None:
    vm, vgpu = gvt(**options)
    pdps0 = chain(vm, leaves={})
    guest_pde = pte(0x800) | PS | E.PAGE_DIRTY | IPS | E.PAGE_PAT_LARGE
    poke(vm, (PD << 12) + 8, guest_pde)
    mm = vgpu.get_ppgtt_mm([pdps0])
    shadow_pde = spt_of(vgpu, PD).shadow[1]
    sub = vgpu.spt_tree[E.get_pfn(E.GttEntry(T.PPGTT_PDE_ENTRY, shadow_pde))]
    assert sub.guest_gfn == 0 and sub.shadow_type == T.PPGTT_PTE_PT and sub.refcount == 1
    assert 0 not in vgpu.page_track_tree
    assert shadow_pde == pte(sub.mfn)  # bits 6, 7, 11 (and the frame's bit 12) cleared
    for k in (0, 1, 511):  # the guest PDE's other bits are copied as they are; PAT 12 -> 7
        assert sub.shadow[k] == pte(dma_pfn(vgpu, 0x800 + k)) | E.PAGE_PAT | E.PAGE_DIRTY | IPS
        assert vgpu.dma.lookup(0x800 + k).size == 4096
    assert check_mm(mm).ok


# ---- case 30 --------------------------------------------------------------------------


def test_case_30_1g_entries_are_rejected(gvt) -> None:
    vm, vgpu = gvt()
    poke(vm, PML4 << 12, pte(PDP))
    poke(vm, PDP << 12, pte(0x40000) | PS)
    with pytest.raises(GvtError) as err:
        vgpu.get_ppgtt_mm([PML4 << 12])
    assert err.value.errno_name == "EINVAL"
    assert "GVT doesn't support 1GB entry" in vgpu.log
    assert not vgpu.spt_tree and not vgpu.ptable and vgpu.find_ppgtt_mm([PML4 << 12]) is None


# ---- case 31 --------------------------------------------------------------------------


def test_case_31_an_unpinnable_leaf_fails_creation_up_to_the_root(gvt) -> None:
    vm, vgpu = gvt(pin_limit=2)
    pt_a, pt_b = 0x503, 0x504
    pdps0 = chain(vm, leaves={0: 0x600, 1: 0x601})  # PD[0] -> PT A, completed first
    poke(vm, (PD << 12) + 8, pte(pt_b))  # PD[1] -> PT B, whose leaf cannot be pinned
    poke(vm, pt_b << 12, pte(0x602))
    with pytest.raises(GvtError) as err:
        vgpu.get_ppgtt_mm([pdps0])
    assert err.value.errno_name == "ENXIO"
    types = [int(m) for line in vgpu.log for m in re.findall(r"type (\d+)", line)]
    assert [t for i, t in enumerate(types) if i == 0 or types[i - 1] != t] == [2, 7, 8, 9, 12]
    assert "fail to populate guest root pointer" in vgpu.log
    assert "failed to shadow ppgtt mm" in vgpu.log
    assert vgpu.find_ppgtt_mm([pdps0]) is None
    for gfn in (PML4, PDP, PD, pt_b):  # the failing path: freed and untracked
        assert intel_vgpu_find_spt_by_gfn(vgpu, gfn) is None
        assert gfn not in vgpu.ptable and vm.write_track_count(gfn) == 0
    # the sibling completed earlier under the freed PD is left behind (code reading)
    assert [s.guest_gfn for s in vgpu.spt_tree.values()] == [pt_a]
    assert pt_a in vgpu.ptable and vm.write_track_count(pt_a) == 1
    assert vgpu.dma.lookup(0x600).ref == 1 and vgpu.dma.lookup(0x602) is None


# ---- case 32 --------------------------------------------------------------------------


def test_case_32_a_failed_add_keeps_the_old_entry(gvt) -> None:
    vm, vgpu = gvt()
    vgpu.get_ppgtt_mm([chain(vm, leaves={0: 0x600})])
    spt = spt_of(vgpu, PT)
    old = spt.shadow[0]
    guest_write64(vm, PT << 12, pte(0x100000))  # outside guest RAM
    assert spt.shadow[0] == old and vgpu.dma.lookup(0x600).ref == 1
    assert any(line.startswith("guest page write error") for line in vgpu.log)


# ---- case 33 --------------------------------------------------------------------------


def test_case_33_shadowing_needs_an_attached_vgpu(gvt) -> None:
    vm, vgpu = gvt()
    pdps0 = chain(vm)
    mm = vgpu.get_ppgtt_mm([pdps0])
    vgpu.close()
    with vgpu.lock:
        mm.shadowed = False
        with pytest.raises(GvtError) as err:
            shadow_ppgtt_mm(mm)
    assert err.value.errno_name == "EINVAL" and not mm.shadowed


# ---- case 34 --------------------------------------------------------------------------


def test_case_34_l4_mms_match_on_pdp0_l3_on_all_four(gvt) -> None:
    vm, vgpu = gvt()
    l4 = vgpu.get_ppgtt_mm([chain(vm), 0x11, 0x22, 0x33])
    assert l4.guest_pdps == [PML4 << 12, 0, 0, 0]
    assert vgpu.find_ppgtt_mm([PML4 << 12, 1, 2, 3]) is l4
    poke(vm, 0x510000, 0)
    poke(vm, 0x511000, 0)
    l3 = vgpu.get_ppgtt_mm([0x510000, 0x511000, 0, 0], levels=3)
    assert vgpu.find_ppgtt_mm([0x510000, 0x511000, 0, 0]) is l3
    assert vgpu.find_ppgtt_mm([0x510000, 0, 0, 0]) is None


# ---- case 35 --------------------------------------------------------------------------


def test_case_35_allocation_failure_reclaims_the_lru_unpinned_mm(gvt) -> None:
    vm, vgpu = gvt(max_shadow_pages=5)
    first = chain(vm, (0x500, 0x501, 0x502, 0x503), {0: 0x600})
    second = chain(vm, (0x510, 0x511, 0x512, 0x513), {0: 0x610})
    mm1 = vgpu.get_ppgtt_mm([first])
    mm2 = vgpu.get_ppgtt_mm([second])  # needs 4 more pages: mm1 loses its shadow
    assert vgpu.stats.reclaims >= 1
    assert not mm1.shadowed and mm2.shadowed
    assert all(vm.write_track_count(g) == 0 for g in (0x500, 0x501, 0x502, 0x503))
    assert vgpu.ppgtt_mm_list == [mm1, mm2]  # the mm object survives
    assert vgpu.submit([first]) == 0  # pinned: re-shadowed (reclaiming mm2 in turn)
    assert mm1.shadowed and not mm2.shadowed
    assert all(vm.write_track_count(g) == 1 for g in (0x500, 0x501, 0x502, 0x503))
    assert vgpu.reports[-1].ok


def test_case_35_a_pinned_mm_is_not_reclaimed(gvt) -> None:
    vm, vgpu = gvt(max_shadow_pages=5)
    first = chain(vm, (0x500, 0x501, 0x502, 0x503), {0: 0x600})
    second = chain(vm, (0x510, 0x511, 0x512, 0x513), {0: 0x610})
    mm1 = vgpu.get_ppgtt_mm([first])
    with vgpu.lock:
        intel_vgpu_pin_mm(mm1)
    with pytest.raises(GvtError) as err:
        vgpu.get_ppgtt_mm([second])
    assert err.value.errno_name == "ENOMEM" and mm1.shadowed
    assert "fail to allocate ppgtt shadow page" in vgpu.log


# ---- case 41 --------------------------------------------------------------------------


def test_case_41_oos_disabled_counts_nothing(gvt) -> None:
    vm, vgpu = gvt()
    vgpu.get_ppgtt_mm([chain(vm)])
    spt = spt_of(vgpu, PT)
    for i in range(10):
        guest_write64(vm, (PT << 12) + 8 * i, pte(0x600 + i))
    assert spt.write_cnt == 0 and spt.oos_page is None
    with vgpu.lock:
        assert intel_vgpu_sync_oos_pages(vgpu) == 0
    assert not vgpu.oos_page_list and not vgpu.gvt.oos_free and not vgpu.gvt.oos_used


# ---- case 42 --------------------------------------------------------------------------


def test_case_42_oos_pages_go_out_of_sync_and_sync_at_submit(gvt) -> None:
    vm, vgpu = gvt(out_of_sync=True)
    assert len(vgpu.gvt.oos_free) == 8192
    pdps0 = chain(vm, leaves={0: 0x600})
    vgpu.get_ppgtt_mm([pdps0])
    spt = spt_of(vgpu, PT)
    guest_write64(vm, (PT << 12) + 8, pte(0x601))
    assert spt.oos_page is None and PT in vgpu.ptable
    guest_write64(vm, (PT << 12) + 16, pte(0x602))  # second trapped write
    assert spt.oos_page is not None and spt.oos_page.mem[:3] == [pte(0x600), pte(0x601), pte(0x602)]
    assert PT not in vgpu.ptable and vm.write_track_count(PT) == 0  # protection dropped
    assert list(vgpu.oos_page_list) == [spt.oos_page]
    maps = vgpu.dma.maps
    poke(vm, (PT << 12) + 24, pte(0x603))  # untrapped now
    assert spt.shadow[3] == 0
    assert vgpu.submit([pdps0]) == 0
    assert PT in vgpu.ptable and vm.write_track_count(PT) == 1  # re-protected
    assert spt.shadow[3] == pte(dma_pfn(vgpu, 0x603))
    assert vgpu.dma.maps == maps + 1  # only the differing entry was re-shadowed
    assert spt.write_cnt == 0 and not vgpu.oos_page_list and vgpu.reports[-1].ok


def test_case_42_a_full_pool_syncs_and_reassigns_the_oldest(gvt) -> None:
    vm, vgpu = gvt(out_of_sync=True, oos_pages=1)
    pdps0 = chain(vm, leaves={0: 0x600})
    poke(vm, (PD << 12) + 8, pte(0x504))
    vgpu.get_ppgtt_mm([pdps0])
    first, second = spt_of(vgpu, PT), spt_of(vgpu, 0x504)
    for i in (1, 2):
        guest_write64(vm, (PT << 12) + 8 * i, pte(0x600 + i))
    assert first.oos_page is not None and PT not in vgpu.ptable
    oos = first.oos_page
    for i in (1, 2):
        guest_write64(vm, (0x504 << 12) + 8 * i, pte(0x610 + i))
    assert second.oos_page is oos and first.oos_page is None
    assert PT in vgpu.ptable and 0x504 not in vgpu.ptable
    assert [e["action"] for e in events(vm, "gvt_oos")] == ["out_of_sync", "sync", "reassign", "out_of_sync"]


def test_oos_sync_keeps_a_stale_mapping_for_a_cleared_entry(gvt) -> None:
    """Code reading (§6.12): sync_oos_page re-shadows with ppgtt_populate_shadow_entry only,
    so an entry cleared while out of sync keeps its old shadow — the invariant catches it."""
    vm, vgpu = gvt(out_of_sync=True)
    pdps0 = chain(vm, leaves={0: 0x600})
    mm = vgpu.get_ppgtt_mm([pdps0])
    for i in (1, 2):
        guest_write64(vm, (PT << 12) + 8 * i, pte(0x600 + i))
    poke(vm, PT << 12, 0)  # unmap gma 0 while the page is out of sync
    assert vgpu.submit([pdps0]) == 0
    report = vgpu.reports[-1]
    assert not report.ok and report.mismatches == ((0, None, vgpu.dma.translate(0x600)),)
    assert check_mm(mm).mismatches == report.mismatches


# ---- case 46 --------------------------------------------------------------------------


def test_case_46_a_table_page_reused_for_data_is_read_as_entries(gvt) -> None:
    vm, vgpu = gvt()
    pdps0 = chain(vm, leaves={0: 0x600, 1: 0x601})
    vgpu.get_ppgtt_mm([pdps0])  # no DESTROY follows: GVT still protects the pages
    spt = spt_of(vgpu, PT)
    guest_write64(vm, PT << 12, 0xDEADBEEF_CAFE0001)  # data with bit 0 set, garbage frame
    assert any("guest page write error" in line for line in vgpu.log)
    assert any("0xdeadbeefcafe0001 type 2" in line for line in vgpu.log)
    assert spt.shadow[0] == pte(dma_pfn(vgpu, 0x600))  # old mapping kept
    guest_write64(vm, (PT << 12) + 8, 0x0000_0000_0123_4001)  # a frame that happens to be RAM
    assert vgpu.dma.lookup(0x1234) is not None  # GVT pinned and mapped a data value
    guest_write64(vm, (PT << 12) + 16, 0x2222_2222_2222_2222)  # bit 0 clear: an unmap
    assert vgpu.stats.handled_writes == 3


# ---- case 50 --------------------------------------------------------------------------


def test_case_50_a_table_at_gfn_0_is_never_unregistered(gvt) -> None:
    vm, vgpu = gvt()
    poke(vm, PML4 << 12, pte(0))  # PML4[0] -> a PDP table at gfn 0
    poke(vm, 0, 0)
    vgpu.get_ppgtt_mm([PML4 << 12])
    pdp = spt_of(vgpu, 0)
    assert pdp.shadow_type == T.PPGTT_PDP_PT and 0 in vgpu.ptable
    guest_write64(vm, PML4 << 12, 0)  # refcount 0: the spt is freed
    assert pdp.mfn not in vgpu.spt_tree
    assert vgpu.page_track_tree[0].tracked and 0 in vgpu.ptable
    assert vm.write_track_count(0) == 1


# ---- translation helpers -----------------------------------------------------------------


def test_gma_to_gpa_walks_the_shadow_and_reads_the_last_level_from_the_guest(gvt) -> None:
    from pagetrack.plugins.gvt_shadow_gtt.translate import (
        INTEL_GVT_INVALID_ADDR,
        intel_vgpu_gma_to_gpa,
    )

    vm, vgpu = gvt()
    mm = vgpu.get_ppgtt_mm([chain(vm, leaves={5: 0x605})])
    assert intel_vgpu_gma_to_gpa(mm, 0x5123) == 0x605123
    assert intel_vgpu_gma_to_gpa(mm, 0x6000) == INTEL_GVT_INVALID_ADDR
    assert intel_vgpu_gma_to_gpa(mm, 1 << 39) == INTEL_GVT_INVALID_ADDR


def test_gpu_store_lands_in_guest_memory_and_is_invisible_to_trackers(gvt) -> None:
    vm, vgpu = gvt()
    pdps0 = chain(vm, leaves={5: 0x605})
    vgpu.get_ppgtt_mm([pdps0])
    writes = len(events(vm, "track_write"))
    assert vgpu.submit([pdps0], gpu_store=(0x5010, 0xABCD)) == 0
    assert peek(vm, 0x605010) == 0xABCD
    assert len(events(vm, "track_write")) == writes
    assert vgpu.submit([pdps0], gpu_store=(0x7000, 1)) == 0  # unmapped: a GPU fault
    assert vgpu.stats.gpu_faults == 1


def test_unknown_gfn_leaf_in_a_submitted_mm_is_enxio(gvt) -> None:
    vm, vgpu = gvt()
    pdps0 = chain(vm, leaves={0: 0x100000})
    assert vgpu.submit([pdps0]) == -errno.ENXIO
    assert vgpu.stats.submit_errors == 1 and not vgpu.spt_tree and DATA


# ---- code-reading quirks of §6.1 and §6.9 ----------------------------------------------


def test_an_spt_found_by_gfn_is_reused_whatever_its_level(gvt) -> None:
    vm, vgpu = gvt()
    vgpu.get_ppgtt_mm([chain(vm)])
    guest_write64(vm, (PD << 12) + 8, pte(PD))  # a PDE pointing at the PD itself, as a "PT"
    pd = spt_of(vgpu, PD)
    assert pd.refcount == 2 and pd.shadow_type == T.PPGTT_PDE_PT
    assert pd.shadow[1] == pte(pd.mfn)


def test_an_8_byte_store_at_offset_4_is_a_full_write_of_the_entry_it_starts_in(gvt) -> None:
    vm, vgpu = gvt()
    vgpu.get_ppgtt_mm([chain(vm, leaves={})])
    spt = spt_of(vgpu, PT)
    poke(vm, PT << 12, pte(0x640))  # entry 0 behind GVT's back
    guest_write64(vm, (PT << 12) + 4, 0)  # high half of 0, low half of 1
    assert spt.shadow[0] == pte(dma_pfn(vgpu, 0x640)) and spt.shadow[1] == 0


def test_invalidating_a_pd_skips_its_direct_2m_mappings(gvt) -> None:
    """§6.8 code reading: ppgtt_invalidate_spt does not unmap a direct 2 MiB entry
    (a guest write that removes the PDE itself does, through ppgtt_invalidate_pte)."""
    vm, vgpu = gvt(huge_ranges=[(0x800, 0xC00)])
    pdps0 = chain(vm, leaves={})
    poke(vm, (PD << 12) + 8, pte(0x800) | PS)
    poke(vm, (PD << 12) + 16, pte(0xA00) | PS)
    vgpu.get_ppgtt_mm([pdps0])
    guest_write64(vm, (PD << 12) + 16, 0)
    assert vgpu.dma.lookup(0xA00) is None  # removed by the write: unmapped
    guest_write64(vm, PDP << 12, 0)  # the PD goes: its 2M entry is skipped
    assert intel_vgpu_find_spt_by_gfn(vgpu, PD) is None
    assert vgpu.dma.lookup(0x800).ref == 1  # leaked
