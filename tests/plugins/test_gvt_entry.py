"""Gen8+ GTT entry formats and the GTT_TYPE_* system (spec gvt-shadow-gtt.md §5)."""

from __future__ import annotations

import pytest
from pagetrack.plugins.gvt_shadow_gtt import entry as E
from pagetrack.plugins.gvt_shadow_gtt.entry import GttEntry
from pagetrack.plugins.gvt_shadow_gtt.entry import GttType as T


def test_gtt_type_numbers_match_the_kernel_logs() -> None:
    """§5.2: the numbers appear in GVT error logs ("type 9")."""
    assert [t.value for t in T] == list(range(19))
    assert (T.PPGTT_PTE_4K_ENTRY, T.PPGTT_PDE_ENTRY, T.PPGTT_PDP_ENTRY, T.PPGTT_PML4_ENTRY,
            T.PPGTT_ROOT_L4_ENTRY) == (2, 7, 8, 9, 12)
    assert (T.PPGTT_PTE_PT, T.PPGTT_PML4_PT, T.MAX) == (14, 17, 18)


def test_type_predicates() -> None:
    entries = [t for t in T if E.is_entry_type(t)]
    assert entries == [T.GGTT_PTE, T.PPGTT_PTE_4K_ENTRY, T.PPGTT_PTE_64K_ENTRY, T.PPGTT_PTE_2M_ENTRY,
                       T.PPGTT_PTE_1G_ENTRY, T.PPGTT_PDE_ENTRY, T.PPGTT_PDP_ENTRY, T.PPGTT_PML4_ENTRY,
                       T.PPGTT_ROOT_L3_ENTRY, T.PPGTT_ROOT_L4_ENTRY]
    assert [t for t in T if E.is_pt_type(t)] == [T.PPGTT_PTE_PT, T.PPGTT_PDE_PT, T.PPGTT_PDP_PT,
                                                T.PPGTT_PML4_PT]
    assert E.is_pte_pt(T.PPGTT_PTE_PT) and not E.is_pte_pt(T.PPGTT_PDE_PT)


@pytest.mark.parametrize(("t", "entry", "pt", "next_pt", "pse"), [
    (T.PPGTT_ROOT_L4_ENTRY, T.PPGTT_ROOT_L4_ENTRY, T.INVALID, T.PPGTT_PML4_PT, T.INVALID),
    (T.PPGTT_PML4_PT, T.PPGTT_PML4_ENTRY, T.PPGTT_PML4_PT, T.PPGTT_PDP_PT, T.INVALID),
    (T.PPGTT_ROOT_L3_ENTRY, T.PPGTT_ROOT_L3_ENTRY, T.INVALID, T.PPGTT_PDE_PT, T.PPGTT_PTE_1G_ENTRY),
    (T.PPGTT_PDP_ENTRY, T.PPGTT_PDP_ENTRY, T.PPGTT_PDP_PT, T.PPGTT_PDE_PT, T.PPGTT_PTE_1G_ENTRY),
    (T.PPGTT_PDE_PT, T.PPGTT_PDE_ENTRY, T.PPGTT_PDE_PT, T.PPGTT_PTE_PT, T.PPGTT_PTE_2M_ENTRY),
    (T.PPGTT_PTE_PT, T.PPGTT_PTE_4K_ENTRY, T.PPGTT_PTE_PT, T.INVALID, T.PPGTT_PTE_64K_ENTRY),
    (T.PPGTT_PTE_64K_ENTRY, T.PPGTT_PTE_4K_ENTRY, T.PPGTT_PTE_PT, T.INVALID, T.PPGTT_PTE_64K_ENTRY),
    (T.PPGTT_PTE_2M_ENTRY, T.PPGTT_PDE_ENTRY, T.PPGTT_PDE_PT, T.INVALID, T.PPGTT_PTE_2M_ENTRY),
    (T.PPGTT_PTE_1G_ENTRY, T.PPGTT_PDP_ENTRY, T.PPGTT_PDP_PT, T.INVALID, T.PPGTT_PTE_1G_ENTRY),
    (T.GGTT_PTE, T.GGTT_PTE, T.INVALID, T.INVALID, T.INVALID),
])
def test_type_table(t, entry, pt, next_pt, pse) -> None:
    """§5.3 gtt_type_table, restated."""
    assert (E.get_entry_type(t), E.get_pt_type(t), E.get_next_pt_type(t), E.get_pse_type(t)) == \
        (entry, pt, next_pt, pse)


def test_presence_roots_need_only_a_non_zero_value() -> None:
    assert E.test_present(GttEntry(T.PPGTT_ROOT_L4_ENTRY, 0x1000))
    assert E.test_present(GttEntry(T.PPGTT_ROOT_L3_ENTRY, 0x1000))
    assert not E.test_present(GttEntry(T.PPGTT_ROOT_L4_ENTRY, 0))
    assert not E.test_present(GttEntry(T.PPGTT_PDE_ENTRY, 0x1000))
    assert E.test_present(GttEntry(T.PPGTT_PDE_ENTRY, 0x1001))


@pytest.mark.parametrize(("t", "low"), [(T.PPGTT_PTE_4K_ENTRY, 12), (T.PPGTT_PTE_64K_ENTRY, 16),
                                        (T.PPGTT_PTE_2M_ENTRY, 21), (T.PPGTT_PTE_1G_ENTRY, 30)])
def test_address_masks_are_bits_45_down(t, low: int) -> None:
    value = (1 << 63) | (1 << 52) | ((1 << 46) - 1)
    e = GttEntry(t, value)
    assert E.get_pfn(e) == (((1 << 46) - 1) & ~((1 << low) - 1)) >> 12
    E.set_pfn(e, 0)
    assert e.val64 == value & ~(((1 << 46) - 1) & ~((1 << low) - 1))
    E.set_pfn(e, (1 << 40) | 0x12345)  # bits beyond the mask are dropped
    assert E.get_pfn(e) == 0x12345 & ~((1 << (low - 12)) - 1)


def test_flags_pse_ips_and_the_64k_split_bit() -> None:
    e = GttEntry(T.PPGTT_PDE_ENTRY, 0x5000 | E.PAGE_PSE | E.GEN8_PDE_IPS_64K | 1)
    assert E.test_ips(e) and E.test_pse(e)
    E.update_entry_type_for_real(e, False)
    assert e.type == T.PPGTT_PTE_2M_ENTRY
    assert not E.test_ips(e)  # only PDE entries carry IPS
    E.clear_pse(e)
    assert e.type == T.PPGTT_PDE_ENTRY and not E.test_pse(e)
    E.clear_ips(e)
    assert e.val64 == 0x5001
    pdp = GttEntry(T.PPGTT_PDP_ENTRY, E.PAGE_PSE | 1)
    E.update_entry_type_for_real(pdp, False)
    assert pdp.type == T.PPGTT_PTE_1G_ENTRY
    pte = GttEntry(T.PPGTT_PTE_4K_ENTRY, 1)
    E.update_entry_type_for_real(pte, True)
    assert pte.type == T.PPGTT_PTE_64K_ENTRY
    E.set_64k_splited(pte)
    assert pte.val64 == 1 | (1 << 52) and E.test_64k_splited(pte)
    E.clear_64k_splited(pte)
    assert not E.test_64k_splited(pte)
    assert sum(1 << b for b in range(52, 63)) == E.GTT_SPTE_FLAG_MASK


def test_gma_decomposition() -> None:
    gma = (3 << 39) | (5 << 30) | (7 << 21) | (9 << 12) | 0xABC
    assert E.gma_index(gma, T.PPGTT_PML4_PT) == 3
    assert E.gma_index(gma, T.PPGTT_PDP_PT) == 5
    assert E.gma_index(gma, T.PPGTT_PDP_PT, l3=True) == 1  # 3-level: bits 31..30
    assert E.gma_index(gma, T.PPGTT_PDE_PT) == 7
    assert E.gma_index(gma, T.PPGTT_PTE_PT) == 9
    with pytest.raises(ValueError):
        E.gma_index(gma, T.PPGTT_PDE_ENTRY)
