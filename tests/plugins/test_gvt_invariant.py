"""The shadow invariant over a hypothesis-driven random guest driver, on shadow-paging and TDP VMs.

After every submit GVT checks that translating any GPU virtual address through
the shadow PPGTT equals translating it through the guest tables and the gfn →
pfn map (plugins/gvt_shadow_gtt/translate.py ``check_mm``).  The driver
(gvt_random_driver.py) builds, maps, unmaps, remaps, shares and drops tables,
uses 2M, 64K and two-halves writes and submits; every program runs on a vCPU.
"""

from __future__ import annotations

from typing import Any

import pytest
from gvt_helpers import PD, P, chain, guest_write64, gvt, poke
from gvt_random_driver import HUGE_RANGES, PS, op_strategy, plan
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pagetrack.plugins.gvt_shadow_gtt import check_mm, vgpu_of
from pagetrack.program import assemble
from pagetrack.runner import run_program

__all__ = ["gvt"]

PAGING = pytest.mark.parametrize("tdp", [False, True], ids=["shadow", "tdp"])


def run_driver(driver, tdp: bool, **options: Any):
    box: dict[str, Any] = {}
    opts = {"attach": True, "ips": driver.ips, "huge_ranges": HUGE_RANGES, **options}
    result = run_program(assemble(driver.program(), "random-driver"), tdp=tdp,
                         options={"gvt_shadow_gtt": opts},
                         vm_hook=lambda vm, vcpu: box.update(vgpu=vgpu_of(vm)))
    return result, box["vgpu"]


@PAGING
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(levels=st.sampled_from([4, 4, 3]), ips=st.booleans(),
       ops=st.lists(op_strategy(), min_size=5, max_size=60))
def test_the_shadow_matches_the_guest_after_every_submit(tdp: bool, levels: int, ips: bool, ops) -> None:
    driver = plan(levels, ips, ops)
    result, vgpu = run_driver(driver, tdp)
    assert result["exit"] == "hlt"
    assert result["io"] == driver.expected_io  # statuses 0 and every GPU store read back
    bad = [r for r in vgpu.reports if not r.ok]
    assert not bad, bad[0]
    assert vgpu.stats.invariant_checks == vgpu.stats.invariant_passed == driver.submits
    assert not vgpu.log, vgpu.log[:3]


def test_a_split_2m_frame_mapped_twice_loses_a_page(gvt) -> None:
    """A quirk the checker finds (spec §8.1, code reading): mapping a gfn with another size
    first drops its cached mapping, whatever its references.  With DMA remapping, a second
    PDE's 2 MiB attempt on a non-contiguous frame unmaps the first PDE's 4K mapping of the
    frame's first page before it fails and splits: the first PDE's page now faults."""
    vm, vgpu = gvt()
    pdps0 = chain(vm, leaves={})
    poke(vm, (PD << 12) + 8, (0xA00 << 12) | PS | P)
    mm = vgpu.get_ppgtt_mm([pdps0])
    assert check_mm(mm).ok
    guest_write64(vm, PD << 12, (0xA00 << 12) | PS | P)  # PD[0] -> the same frame
    assert check_mm(mm).mismatches == ((0x200000, vgpu.backing.pfn_of(0xA00), None),)


def test_in_passthrough_mode_an_identical_split_rewrite_loses_a_page(gvt) -> None:
    """Without remapping the DMA address of a page is its host address, so the old sub-table
    of a rewritten split PDE unmaps the new sub-table's mapping of the frame's first page."""
    vm, vgpu = gvt(iommu=False)
    pdps0 = chain(vm, leaves={})
    poke(vm, (PD << 12) + 8, (0xA00 << 12) | PS | P)
    mm = vgpu.get_ppgtt_mm([pdps0])
    guest_write64(vm, (PD << 12) + 8, (0xA00 << 12) | PS | P)
    assert check_mm(mm).mismatches == ((0x200000, None, vgpu.backing.pfn_of(0xA00)),)
    vm2, vgpu2 = gvt()  # with remapping the same rewrite is harmless
    mm2 = vgpu2.get_ppgtt_mm([chain(vm2, leaves={})])
    guest_write64(vm2, (PD << 12) + 8, (0xA00 << 12) | PS | P)
    guest_write64(vm2, (PD << 12) + 8, (0xA00 << 12) | PS | P)
    assert check_mm(mm2).ok


@PAGING
def test_a_busy_driver_traps_every_table_store(tdp: bool) -> None:
    ops = [("map", 0, 0, i, i, i % 3, False) for i in range(32)]
    ops += [("map2m", 1, 3, True, 0), ("map2m", 1, 4, False, 1), ("map64k", 0, 2, 1, 0)]
    ops += [("submit", 5, 0x1234), ("share_pt", 0, 0, 5, 0), ("unmap", 0, 5, 3, 2)]
    ops += [("drop_pt", 0, 0, 0), ("submit", 7, 0x4321)]
    driver = plan(4, True, ops)
    result, vgpu = run_driver(driver, tdp)
    assert result["io"] == driver.expected_io
    assert vgpu.stats.invariant_passed == vgpu.stats.invariant_checks == 3
    assert vgpu.stats.handled_writes >= 40
    assert max(r.pages for r in vgpu.reports) >= 1024 + 32
