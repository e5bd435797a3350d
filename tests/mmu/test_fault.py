"""The page-fault handler and its helpers (mmu.c, paging_tmpl.h, 6.12 fault path).

Spec: kvm-page-track.md §3.1–§3.2, §4.4 (flood reset), §7 cases 10, 35–38, 65.
Faults are raised by calling ``Mmu.page_fault`` the way the vCPU does, or by
running guest code.
"""

from __future__ import annotations

import pytest
from pagetrack.emulator import PortOut
from pagetrack.mmu import (
    RET_PF_EMULATE,
    RET_PF_FIXED,
    RET_PF_SPURIOUS,
    SPTE_D,
    SPTE_HOST_WRITABLE,
    SPTE_MMU_WRITABLE,
    SPTE_P,
    SPTE_W,
    HwFault,
    MmioAccess,
    Role,
    Translation,
)
from pagetrack.mmu.paging import (
    PFERR_GUEST_FINAL,
    PFERR_GUEST_PAGE,
    PFERR_PRESENT,
    PFERR_RSVD,
    PFERR_WRITE,
)
from track_helpers import (
    DATA_BASE,
    PF_READ,
    PF_WRITE_NP,
    PF_WRITE_P,
    Guest,
    Recorder,
    make_vm,
    slot_of,
)

X = DATA_BASE + 0x5000  # a data page (gva == gpa)
XG = X >> 12


def shadow_leaf(vm, vcpu, gva: int) -> int | None:
    """The shadow leaf SPTE that maps ``gva`` for ``vcpu`` (None if the walk stops)."""
    sp = vm.mmu._shadow_root_for(vcpu, gva)
    while sp is not None:
        idx = (gva >> (12 + 9 * (sp.role.level - 1))) & 511
        if not sp.spt[idx] & SPTE_P:
            return None
        if sp.children[idx] is None:
            return sp.spt[idx]
        sp = sp.children[idx]
    return None


def leaf_spte(g: Guest, gva: int) -> int | None:
    vm = g.vm
    if vm.mmu.tdp_enabled:
        found = vm.mmu.tdp.lookup(gva >> 12)
        return None if found is None else found[1]
    return shadow_leaf(vm, g.vcpu, gva)


@pytest.fixture(params=[True, False], ids=["tdp", "shadow"])
def guest(request):
    rec = Recorder()
    g = Guest("hlt", tdp=request.param, plugins=[rec])
    g.rec = rec
    yield g
    g.vm.close()


# ---- case 10: mapping level ------------------------------------------------------------------

def test_case_10_disallowed_2m_frame_maps_4k_and_others_map_huge() -> None:
    vm = make_vm(True, plugins=[Recorder()], host_huge_pages=True)
    vm.add_memory(0x40000000, 0x40000000)  # one whole, aligned 1 GiB frame
    vcpu = vm.create_vcpu()
    base = 0x40000000 >> 12
    wt = vm.write_track
    slot = slot_of(vm, base)
    assert wt.max_mapping_level(slot, base + 5) == 3
    vm.write_track_add_gfn(base + 5)
    assert wt.max_mapping_level(slot, base + 5) == 1
    assert wt.max_mapping_level(slot, base + 511) == 1  # same 2 MiB frame
    assert wt.max_mapping_level(slot, base + 512) == 2  # 1 GiB disallowed, this 2 MiB frame not
    vm.mmu.page_fault(vcpu, (base + 7) << 12, PF_WRITE_NP)
    assert vm.mmu.tdp.lookup(base + 7)[0] == 1
    vm.mmu.page_fault(vcpu, (base + 600) << 12, PF_WRITE_NP)
    assert vm.mmu.tdp.lookup(base + 600)[0] == 2
    vm.write_track_remove_gfn(base + 5)
    assert wt.max_mapping_level(slot, base + 5) == 3


def test_case_10_partial_huge_frames_at_slot_edges_map_4k() -> None:
    vm = make_vm(True, plugins=[Recorder()], host_huge_pages=True)
    vm.add_memory(0x400000, 0x300000)  # 3 MiB: one full 2 MiB frame, one half
    vcpu = vm.create_vcpu()
    vm.mmu.page_fault(vcpu, 0x401000, PF_WRITE_NP)
    vm.mmu.page_fault(vcpu, 0x601000, PF_WRITE_NP)
    assert vm.mmu.tdp.lookup(0x401)[0] == 2
    assert vm.mmu.tdp.lookup(0x601)[0] == 1


# ---- cases 35–37: page_fault_handle_page_track ------------------------------------------------

def test_case_35_present_write_fault_on_tracked_gfn_is_emulated_without_installing(guest) -> None:
    vm, vcpu = guest.vm, guest.vcpu
    assert vm.mmu.page_fault(vcpu, X, PF_READ) == RET_PF_FIXED
    vm.write_track_add_gfn(XG)
    before = leaf_spte(guest, X)
    assert before is not None and not before & SPTE_W
    stats = vm.mmu.stats.as_dict()
    assert vm.mmu.page_fault(vcpu, X, PF_WRITE_P) == RET_PF_EMULATE
    assert leaf_spte(guest, X) == before
    after = vm.mmu.stats
    assert after.pf_emulate == stats["pf_emulate"] + 1 and after.pf_fixed == stats["pf_fixed"]
    assert after.pf_taken == stats["pf_taken"] + 1


def test_case_35_guest_store_to_tracked_page_is_emulated_and_notified(guest) -> None:
    g2 = Guest("""
        mov rax, qword ptr [DATA_BASE + 0x5000]
        mov qword ptr [DATA_BASE + 0x5008], 0x1234
        hlt
    """, tdp=guest.vm.tdp, plugins=[rec := Recorder()])
    g2.vm.write_track_add_gfn(XG)
    assert g2.run() == "hlt"
    assert rec.writes == [(X + 8, (0x1234).to_bytes(8, "little"))]
    assert g2.vm.mmu.stats.insn_emulation == 1
    assert g2.vm.read_guest(X + 8, 8) == (0x1234).to_bytes(8, "little")
    spte = leaf_spte(g2, X)
    assert spte is not None and not spte & SPTE_W and not spte & SPTE_MMU_WRITABLE
    g2.vm.close()


def test_case_36_read_fault_on_tracked_gfn_installs_read_only_spte(guest) -> None:
    vm, vcpu = guest.vm, guest.vcpu
    ctrl = X + 0x1000  # an untracked control page, prepared the same way
    for gva in (X, ctrl):
        vm.write_guest(gva, b"populated")  # host page populated: TDP may map it writable
        pte = guest.layout.pt_page_of(gva) + 8 * ((gva >> 12) & 511)
        vm.write_guest(pte, (gva | 0x67).to_bytes(8, "little"))  # guest PTE dirty: shadow too
    vm.write_track_add_gfn(XG)
    assert vm.mmu.page_fault(vcpu, X, PF_READ) == RET_PF_FIXED
    assert vm.mmu.page_fault(vcpu, ctrl, PF_READ) == RET_PF_FIXED
    spte = leaf_spte(guest, X)
    assert spte & SPTE_P and not spte & (SPTE_W | SPTE_MMU_WRITABLE)
    assert leaf_spte(guest, ctrl) & SPTE_W  # the same read maps an untracked page writable


def test_case_36_not_present_write_fault_installs_read_only_spte_then_emulates(guest) -> None:
    vm, vcpu = guest.vm, guest.vcpu
    vm.write_track_add_gfn(XG)
    assert leaf_spte(guest, X) is None
    assert vm.mmu.page_fault(vcpu, X, PF_WRITE_NP) == RET_PF_EMULATE
    spte = leaf_spte(guest, X)
    assert spte is not None and spte & SPTE_P
    assert not spte & (SPTE_W | SPTE_MMU_WRITABLE)
    assert spte & SPTE_HOST_WRITABLE


def test_case_37_reserved_bit_fault_is_not_diverted(guest) -> None:
    vm = guest.vm
    vm.write_track_add_gfn(XG)
    slot = slot_of(vm, XG)
    handle = vm.mmu.page_fault_handle_page_track
    assert handle(PF_WRITE_P, slot, XG) is True
    assert handle(PF_WRITE_P | PFERR_RSVD, slot, XG) is False
    assert handle(PF_WRITE_NP, slot, XG) is False
    assert handle(PFERR_PRESENT, slot, XG) is False
    assert handle(PF_WRITE_P, slot, XG + 1) is False
    assert handle(PF_WRITE_P, None, XG) is False


def test_untracked_write_faults_map_writable(guest) -> None:
    vm, vcpu = guest.vm, guest.vcpu
    assert vm.mmu.page_fault(vcpu, X, PF_WRITE_NP) == RET_PF_FIXED
    spte = leaf_spte(guest, X)
    assert spte & SPTE_W and spte & SPTE_MMU_WRITABLE and spte & SPTE_HOST_WRITABLE and spte & SPTE_D


# ---- case 38: write-flooding reset on the tracked-write path --------------------------------------

def test_case_38_shadow_tracked_write_fault_resets_flooding_on_the_walk() -> None:
    g = Guest("hlt", tdp=False, plugins=[Recorder()])
    vm, vcpu = g.vm, g.vcpu
    vm.mmu.page_fault(vcpu, X, PF_READ)
    walk = []
    sp = vm.mmu._shadow_root_for(vcpu, X)
    while sp is not None:
        walk.append(sp)
        idx = (X >> (12 + 9 * (sp.role.level - 1))) & 511
        sp = sp.children[idx]
    assert [s.role.level for s in walk] == [4, 3, 2, 1]
    others = [s for s in vm.mmu.shadow.pages() if s not in walk]
    for s in vm.mmu.shadow.pages():
        s.write_flooding_count = 2
    vm.write_track_add_gfn(XG)
    assert vm.mmu.page_fault(vcpu, X, PF_WRITE_P) == RET_PF_EMULATE
    assert [s.write_flooding_count for s in walk] == [0, 0, 0, 0]
    assert all(s.write_flooding_count == 2 for s in others)
    g.vm.close()


def test_case_38_tdp_tracked_write_fault_resets_nothing() -> None:
    vm = make_vm(True, plugins=[Recorder()])
    vm.add_memory(0, 0x800000)
    vcpu = vm.create_vcpu()
    sp = vm.mmu.shadow.alloc_shadow_page(0x10, Role(level=2))  # some shadow page (nested-style)
    sp.write_flooding_count = 2
    vm.mmu.page_fault(vcpu, 0x5000, PF_READ)
    vm.write_track_add_gfn(5)
    assert vm.mmu.page_fault(vcpu, 0x5000, PF_WRITE_P) == RET_PF_EMULATE
    assert sp.write_flooding_count == 2


def test_fetch_resets_flooding_of_every_page_on_a_handled_fault() -> None:
    g = Guest("hlt", tdp=False)
    vm, vcpu = g.vm, g.vcpu
    vm.mmu.page_fault(vcpu, X, PF_READ)
    for s in vm.mmu.shadow.pages():
        s.write_flooding_count = 2
    assert vm.mmu.page_fault(vcpu, X + 0x1000, PF_READ) == RET_PF_FIXED
    on_walk = [s for s in vm.mmu.shadow.pages() if s.write_flooding_count == 0]
    assert sorted(s.role.level for s in on_walk) == [1, 2, 3, 4]
    g.vm.close()


# ---- case 65 and the 6.12 unprotect-and-retry rules ---------------------------------------------

def _run_until_io(g: Guest) -> None:
    ex = g.vcpu.run(10_000)
    assert ex.kind == "io" and isinstance(ex.exit, PortOut), ex


@pytest.mark.parametrize("tdp", [True, False], ids=["tdp", "shadow"])
def test_case_65_externally_tracked_gfn_is_emulated_on_the_first_fault(tdp: bool) -> None:
    rec = Recorder()
    g = Guest("""
        mov rax, qword ptr [DATA_BASE + 0x5000]     # map it (read-only: tracked)
        out 0x11, al
        add qword ptr [DATA_BASE + 0x5000], 5       # not a page-table-writing instruction
        out 0x11, al
        hlt
    """, tdp=tdp, plugins=[rec])
    vm = g.vm
    vm.write_guest(X, (37).to_bytes(8, "little"))
    vm.write_track_add_gfn(XG)
    _run_until_io(g)
    if tdp:
        assert vm.mmu.shadow.indirect_shadow_pages == 0
    else:  # shadow pages exist, but none for this gfn: nothing to zap either
        assert vm.mmu.shadow.indirect_shadow_pages > 0
        assert list(vm.mmu.shadow.valid_sps_with_gptes(XG)) == []
    before = vm.mmu.stats.as_dict()
    _run_until_io(g)
    after = vm.mmu.stats.as_dict()
    assert after["pf_taken"] - before["pf_taken"] == 1  # no retry, no second fault
    assert after["insn_emulation"] - before["insn_emulation"] == 1
    assert after["unprotect_retry"] == before["unprotect_retry"] == 0
    assert rec.writes == [(X, (42).to_bytes(8, "little"))]
    assert vm.read_guest(X, 8) == (42).to_bytes(8, "little")
    assert g.vcpu.last_retry_rip == 0 and g.vcpu.last_retry_addr == 0
    vm.close()


def test_non_page_table_insn_on_a_shadowed_table_unprotects_retries_then_emulates() -> None:
    """6.12: the first fault zaps the shadow pages (RET_PF_RETRY-like resume), the identical
    second fault (same RIP and address) is emulated (anti-loop)."""
    sym = Guest.symbols()
    rec = Recorder()
    g = Guest("""
        mov rax, qword ptr [PD + 8*511]
        out 0x11, al
        add qword ptr [PD + 8*511], 0       # PD is shadowed (level 2): tracked by KVM
        out 0x11, al
        hlt
    """, tdp=False, plugins=[rec], defines=sym)
    vm = g.vm
    pd_gfn = sym["PD"] >> 12
    _run_until_io(g)
    assert vm.write_track_count(pd_gfn) == 1
    before = vm.mmu.stats.as_dict()
    _run_until_io(g)
    after = vm.mmu.stats.as_dict()
    assert after["unprotect_retry"] - before["unprotect_retry"] == 1
    assert after["insn_emulation"] - before["insn_emulation"] == 1
    assert rec.writes == [(sym["PD"] + 8 * 511, bytes(8))]
    assert g.run() == "hlt"
    vm.close()


def test_page_table_writing_insn_is_emulated_without_unprotect() -> None:
    sym = Guest.symbols()
    g = Guest("""
        mov rax, qword ptr [PD + 8*511]
        mov qword ptr [PD + 8*511], rax
        hlt
    """, tdp=False, defines=sym)
    assert g.run() == "hlt"
    stats = g.vm.mmu.stats
    assert stats.unprotect_retry == 0 and stats.insn_emulation == 1
    assert g.vm.write_track_count(sym["PD"] >> 12) == 1  # still shadowed
    g.vm.close()


def test_unprotect_with_no_indirect_shadow_pages_zaps_nothing() -> None:
    """§3.2.8: nothing to zap when indirect_shadow_pages == 0 (an externally tracked gfn)."""
    vm = make_vm(True, plugins=[Recorder()])
    vm.add_memory(0, 0x100000)
    vcpu = vm.create_vcpu()
    vcpu.cpu.rip = 0x1234
    vm.write_track_add_gfn(5)
    assert vm.mmu.unprotect_gfn_and_retry(vcpu, 0x5000, False) is False
    assert (vcpu.last_retry_rip, vcpu.last_retry_addr) == (0, 0)
    assert vm.mmu.unprotect_gfn_and_retry(vcpu, 0x5000, True) is False
    assert vm.write_track_count(5) == 1  # external counts are never touched


def test_write_protect_fault_same_rip_and_address_emulates_and_resets() -> None:
    vm = make_vm(True, plugins=[Recorder()])
    vm.add_memory(0, 0x100000)
    vcpu = vm.create_vcpu()
    vcpu.cpu.rip = 0x1234
    vcpu.last_retry_rip, vcpu.last_retry_addr = 0x1234, 0x5000
    vm.write_track_add_gfn(5)
    vm.mmu.page_fault(vcpu, 0x5000, PF_READ)
    assert vm.mmu.page_fault(vcpu, 0x5000, PF_WRITE_P) == RET_PF_EMULATE
    assert not vcpu.allow_retry_pf  # the anti-loop path does not allow a retry
    vcpu.last_retry_rip, vcpu.last_retry_addr = 0x1234, 0x6000
    assert vm.mmu.page_fault(vcpu, 0x5000, PF_WRITE_P) == RET_PF_EMULATE
    assert (vcpu.last_retry_rip, vcpu.last_retry_addr) == (0, 0)
    assert vcpu.allow_retry_pf


# ---- hardware translation, MMIO, fast page fault -------------------------------------------------

def test_tdp_hw_translate_faults_on_guest_tables_then_on_the_final_gpa() -> None:
    g = Guest("hlt", tdp=True)
    vm, vcpu = g.vm, g.vcpu
    faults = []
    for _ in range(8):
        t = vm.mmu.hw_translate(vcpu, X, True)
        if isinstance(t, Translation):
            break
        faults.append(t)
        vm.mmu.page_fault(vcpu, t.addr, t.error_code)
    assert isinstance(t, Translation) and t.gfn == XG and t.writable
    # the walk reads each guest table through the TDP map first (PFERR_GUEST_PAGE) ...
    assert [f.addr >> 12 for f in faults[:4]] == [p >> 12 for p in g.layout.pages[:2]] + [
        g.layout.pages[2] >> 12, g.layout.pt_page_of(X) >> 12]
    assert all(f.error_code & PFERR_GUEST_PAGE for f in faults[:4])
    # ... then faults on the final gpa of the write
    assert faults[-1] == HwFault(X, PFERR_WRITE | PFERR_GUEST_FINAL)
    g.vm.close()


def test_shadow_hw_translate_faults_to_kvm_with_gva() -> None:
    g = Guest("hlt", tdp=False, plugins=[Recorder()])
    vm, vcpu = g.vm, g.vcpu
    assert vm.mmu.hw_translate(vcpu, X, False) == HwFault(X, 0)
    vm.mmu.page_fault(vcpu, X, PF_READ)
    assert isinstance(vm.mmu.hw_translate(vcpu, X, False), Translation)
    vm.write_track_add_gfn(XG)
    assert vm.mmu.hw_translate(vcpu, X, True) == HwFault(X, PF_WRITE_P)
    g.vm.close()


def test_fault_outside_every_memslot_is_mmio() -> None:
    vm = make_vm(True)
    vm.add_memory(0, 0x100000)
    vcpu = vm.create_vcpu()
    with pytest.raises(MmioAccess) as exc:
        vm.mmu.page_fault(vcpu, 0x90000000, PF_WRITE_NP)
    assert exc.value.gpa == 0x90000000 and exc.value.write


def test_fast_page_fault_restores_w_of_dirty_log_protected_spte() -> None:
    vm = make_vm(True)
    s = vm.add_memory(0x400000, 0x10000)
    vcpu = vm.create_vcpu()
    vm.mmu.page_fault(vcpu, 0x401000, PF_WRITE_NP)
    vm.enable_dirty_logging(s)
    spte = vm.mmu.tdp.lookup(0x401)[1]
    assert not spte & SPTE_W and spte & SPTE_MMU_WRITABLE
    assert vm.mmu.page_fault(vcpu, 0x401000, PF_WRITE_P) == RET_PF_FIXED
    assert vm.mmu.stats.pf_fast == 1
    assert vm.mmu.tdp.lookup(0x401)[1] & SPTE_W
    assert vm.mmu.page_fault(vcpu, 0x401000, PF_WRITE_P) == RET_PF_SPURIOUS


def test_tracked_gfn_is_never_fixed_by_the_fast_path() -> None:
    vm = make_vm(True, plugins=[Recorder()])
    s = vm.add_memory(0x400000, 0x10000)
    vcpu = vm.create_vcpu()
    vm.mmu.page_fault(vcpu, 0x401000, PF_WRITE_NP)
    vm.enable_dirty_logging(s)
    vm.write_track_add_gfn(0x401)
    assert vm.mmu.page_fault(vcpu, 0x401000, PF_WRITE_P) == RET_PF_EMULATE
    assert vm.mmu.stats.pf_fast == 0
    assert not vm.mmu.tdp.lookup(0x401)[1] & SPTE_W


def test_new_pgd_resets_flooding_of_the_root() -> None:
    """§4.4: the page that becomes the root on a CR3 load starts with a zero flooding count."""
    g = Guest("hlt", tdp=False)
    (root,) = g.vcpu.roots
    root.write_flooding_count = 2
    g.vcpu.set_cr3(g.layout.cr3)
    assert g.vcpu.roots == [root] and root.write_flooding_count == 0
    g.vm.close()
