"""KVM's own tracker: ``kvm_mmu_track_write`` and its helpers (plugins/shadow_mmu).

Spec: kvm-page-track.md §4 and §7 cases 47–56.  Shadow pages are built by hand
(64-bit roles) or by real page faults of a 32-bit non-PAE guest (quadrants).
The emulator's order is kept: guest memory is written first, then
``track_write`` is dispatched.
"""

from __future__ import annotations

import pagetrack.plugins.shadow_mmu as shadow_mmu
import pytest
from pagetrack.mmu import SPTE_HOST_WRITABLE, SPTE_P, SPTE_W, Role
from pagetrack.plugins.shadow_mmu import (
    detect_write_flooding,
    detect_write_misaligned,
    get_written_sptes,
    kvm_mmu_track_write,
)
from track_helpers import make_vm

T = 0x20  # gfn of a guest page table
TA = T << 12


@pytest.fixture
def vm():
    v = make_vm(False)
    v.add_memory(0, 0x800000)
    yield v
    v.close()


def emulated_write(vm, vcpu, gpa: int, data: bytes) -> None:
    """What ``emulator_write_phys`` does: commit, then notify every tracker."""
    vm.write_guest(gpa, data)
    vm.hooks.track_write(vm, vcpu, gpa, data)


def l2_with_child(vm, idx: int = 5):
    """A level-2 page for T whose SPTE ``idx`` links a level-1 page (gfn 0x30)."""
    shadow = vm.mmu.shadow
    parent = shadow.alloc_shadow_page(T, Role(level=2))
    child = shadow.alloc_shadow_page(0x30, Role(level=1))
    shadow.link_shadow_page(parent, idx, child)
    return parent, child


def l1_with_leaves(vm, gfn: int = T, idxs=(0, 1, 2, 3), role: Role | None = None):
    sp = vm.mmu.shadow.alloc_shadow_page(gfn, role or Role(level=1))
    for i in idxs:
        target = 0x100 + i
        sp.spt[i] = SPTE_P | SPTE_HOST_WRITABLE | (target << 12)
        sp.gfns[i] = target
        vm.mmu.shadow.rmap_add(sp, i, target, 1)
    return sp


# ---- case 47 ------------------------------------------------------------------------------------

class CountingLock:
    def __init__(self, inner) -> None:
        self.inner = inner
        self.taken = 0

    def __enter__(self):
        self.taken += 1
        return self.inner.__enter__()

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)


def test_case_47_no_indirect_shadow_pages_returns_without_lock_or_stats(vm) -> None:
    vcpu = vm.create_vcpu()
    vm.mmu.shadow.alloc_shadow_page(T, Role(level=2, direct=True))  # direct: not counted
    assert vm.mmu.shadow.indirect_shadow_pages == 0
    spy = CountingLock(vm.mmu_lock)
    vm.mmu_lock = spy
    kvm_mmu_track_write(vm, vcpu, TA + 8, 8)
    emulated_write(vm, vcpu, TA + 16, b"\x01" * 8)
    assert spy.taken == 0
    assert vm.mmu.stats.mmu_pte_write == 0
    l2_with_child(vm)
    kvm_mmu_track_write(vm, vcpu, TA + 8, 8)
    assert spy.taken == 1 and vm.mmu.stats.mmu_pte_write == 1


# ---- cases 48–50: aligned writes, flooding ----------------------------------------------------------

def test_case_48_aligned_write_zaps_spte_5_counts_and_flushes(vm) -> None:
    vcpu = vm.create_vcpu()
    parent, child = l2_with_child(vm, 5)
    stats = vm.mmu.stats
    flushes = stats.remote_tlb_flush
    emulated_write(vm, vcpu, TA + 0x28, (0x31000 | 0x27).to_bytes(8, "little"))
    assert parent.spt[5] == 0
    assert stats.mmu_pte_write == 1
    assert stats.mmu_pde_zapped == 1  # new gentry non-zero, level != 1
    assert parent.write_flooding_count == 1
    assert stats.remote_tlb_flush == flushes + 1
    # case 56: the child is only unlinked
    assert child.parent_ptes == [] and not child.invalid and child in vm.mmu.shadow.pages()


def test_case_49_third_write_without_reset_zaps_the_page_and_drops_the_count(vm) -> None:
    vcpu = vm.create_vcpu()
    parent, _ = l2_with_child(vm, 5)
    assert vm.write_track_count(T) == 1
    stats = vm.mmu.stats
    emulated_write(vm, vcpu, TA + 0x28, b"\0" * 8)
    emulated_write(vm, vcpu, TA + 0x30, b"\0" * 8)
    assert parent.write_flooding_count == 2 and not parent.invalid
    assert stats.mmu_flooded == 0 and stats.mmu_pde_zapped == 0  # gentry 0: not counted
    zapped = stats.mmu_shadow_zapped
    flushes = stats.remote_tlb_flush
    emulated_write(vm, vcpu, TA + 0x38, b"\0" * 8)
    assert parent.invalid and parent not in vm.mmu.shadow.pages()
    assert stats.mmu_flooded == 1
    assert stats.mmu_shadow_zapped == zapped + 1
    assert stats.remote_tlb_flush == flushes + 1  # the commit's flush
    assert vm.write_track_count(T) == 0
    assert vm.mmu.shadow.indirect_shadow_pages == 1  # only the child is left


def test_case_49_a_reset_in_between_prevents_flooding(vm) -> None:
    vcpu = vm.create_vcpu()
    parent, _ = l2_with_child(vm, 5)
    for _ in range(5):
        emulated_write(vm, vcpu, TA + 0x28, b"\0" * 8)
        emulated_write(vm, vcpu, TA + 0x30, b"\0" * 8)
        assert vm.mmu.shadow.get_shadow_page(T, Role(level=2)) is parent  # reuse resets
        assert parent.write_flooding_count == 0
    assert not parent.invalid and vm.mmu.stats.mmu_flooded == 0


def test_case_50_level_1_page_never_floods_only_the_written_spte_goes(vm) -> None:
    vcpu = vm.create_vcpu()
    sp = l1_with_leaves(vm)
    flushes = vm.mmu.stats.remote_tlb_flush
    for _ in range(10):
        emulated_write(vm, vcpu, TA + 0x10, b"\0" * 8)
    assert sp.write_flooding_count == 0 and not sp.invalid
    assert sp.spt[2] == 0
    assert all(sp.spt[i] & SPTE_P for i in (0, 1, 3))
    assert vm.mmu.stats.mmu_flooded == 0 and vm.mmu.stats.mmu_pte_write == 10
    assert vm.mmu.stats.mmu_pde_zapped == 0  # level 1
    assert vm.mmu.stats.remote_tlb_flush == flushes + 1  # only the first zap was present
    assert vm.mmu.shadow.rmap_sptes(0x102, 1) == []


# ---- cases 51–53: misaligned writes and the PAE widening -----------------------------------------

@pytest.mark.parametrize("level", [1, 2])
def test_case_51_two_byte_write_zaps_the_page_as_misaligned(vm, level: int) -> None:
    vcpu = vm.create_vcpu()
    sp = l1_with_leaves(vm) if level == 1 else l2_with_child(vm, 5)[0]
    emulated_write(vm, vcpu, TA + 0x28, b"\x01\x02")
    assert sp.invalid
    assert sp.write_flooding_count == 0
    assert vm.mmu.stats.mmu_flooded == 1


def test_case_52_one_byte_at_a_pte_boundary_is_not_misaligned(vm) -> None:
    vcpu = vm.create_vcpu()
    sp = l1_with_leaves(vm)
    emulated_write(vm, vcpu, TA + 0x10, b"\x01")
    assert not sp.invalid and sp.spt[2] == 0 and sp.spt[3] & SPTE_P
    emulated_write(vm, vcpu, TA + 0x03, b"\x01")
    assert sp.invalid and vm.mmu.stats.mmu_flooded == 1


def test_case_52_53_detect_write_misaligned_table() -> None:
    l1_8 = Role(level=1)
    l1_4 = Role(level=1, has_4_byte_gpte=True)
    from pagetrack.mmu import ShadowPage

    sp8, sp4 = ShadowPage(T, l1_8, 0, 0), ShadowPage(T, l1_4, 0, 1)
    cases = [
        (sp8, 0x10, 1, False), (sp8, 0x13, 1, True), (sp8, 0x10, 2, True), (sp8, 0x10, 4, False),
        (sp8, 0x14, 4, False), (sp8, 0x10, 8, False), (sp8, 0x14, 8, True), (sp8, 0x16, 4, True),
        (sp4, 0x14, 4, False), (sp4, 0x14, 1, False), (sp4, 0x16, 1, True), (sp4, 0x12, 4, True),
        (sp4, 0x10, 8, True), (sp8, 0xFF8, 8, False), (sp8, 0x10, 3, True),
    ]
    for sp, off, n, want in cases:
        assert detect_write_misaligned(sp, TA + off, n) is want, (sp.role, hex(off), n)


def test_case_53_pae_vcpu_widens_a_4_byte_write_to_the_whole_gpte(vm, monkeypatch) -> None:
    vcpu = vm.create_vcpu()
    assert vcpu.cpu.cr4 & 0x20  # long mode implies CR4.PAE
    parent, _ = l2_with_child(vm, 0)
    seen: list = []
    real = shadow_mmu.detect_write_misaligned

    def spy(sp, gpa, nbytes):
        seen.append((gpa, nbytes))
        return real(sp, gpa, nbytes)

    monkeypatch.setattr(shadow_mmu, "detect_write_misaligned", spy)
    vm.write_guest(TA, (0x31000 | 0x27).to_bytes(4, "little"))  # low half non-zero
    emulated_write(vm, vcpu, TA + 4, b"\0\0\0\0")  # the guest writes the high half
    assert seen == [(TA, 8)]
    assert parent.spt[0] == 0 and not parent.invalid
    assert vm.mmu.stats.mmu_pde_zapped == 1  # the re-read gentry is the full, non-zero PTE
    # an 8-byte write at offset 4 spans two PTEs: misaligned
    emulated_write(vm, vcpu, TA + 4, b"\0" * 8)
    assert parent.invalid


def test_case_53_non_pae_vcpu_does_not_widen(vm, monkeypatch) -> None:
    vcpu = vm.create_vcpu()
    vcpu.cpu.cr4 = 0
    vcpu.cpu.efer = 0
    l2_with_child(vm, 0)
    seen: list = []
    real = shadow_mmu.detect_write_misaligned
    monkeypatch.setattr(shadow_mmu, "detect_write_misaligned",
                        lambda sp, gpa, n: seen.append((gpa, n)) or real(sp, gpa, n))
    emulated_write(vm, vcpu, TA + 4, b"\0\0\0\0")
    assert seen == [(TA + 4, 4)]
    assert vm.mmu.stats.mmu_pde_zapped == 0  # gentry = the 4 bytes written: zero


# ---- cases 54–55: 32-bit guests and quadrants --------------------------------------------------------

PD32, PT32 = 0x10, 0x11  # guest page directory and page table gfns (4-byte entries)


@pytest.fixture
def pt32(vm):
    """A 32-bit non-PAE guest: PDE 0 and PDE 257 both point to PT32, which maps 4 MiB."""
    for pde in (0, 257):
        vm.write_guest((PD32 << 12) + 4 * pde, ((PT32 << 12) | 0x27).to_bytes(4, "little"))
    vm.write_guest(PT32 << 12, b"".join(((i << 12) | 0x27).to_bytes(4, "little") for i in range(1024)))
    vcpu = vm.create_vcpu()
    vcpu.cpu.cr4 = 0
    vcpu.cpu.efer = 0
    vcpu.set_cr3(PD32 << 12)
    return vcpu


def test_case_55_pt32_page_directory_gets_four_pae_roots_quadrants_0_to_3(vm, pt32) -> None:
    roots = pt32.roots
    assert [(r.gfn, r.role.level, r.role.quadrant, r.role.has_4_byte_gpte) for r in roots] == [
        (PD32, 2, q, True) for q in range(4)]
    assert vm.write_track_count(PD32) == 4


def test_case_54_level_1_quadrants_from_faults_and_writes_hit_only_their_quadrant(vm, pt32) -> None:
    for gva in (0x0000_1000, 0x0020_0000):  # guest entries 1 and 512 of PT32
        vm.mmu.page_fault(pt32, gva, 0)
    l1 = {sp.role.quadrant: sp for sp in vm.mmu.shadow.valid_sps_with_gptes(PT32)}
    assert sorted(l1) == [0, 1]
    q0, q1 = l1[0], l1[1]
    assert q0.spt[1] & SPTE_P and q1.spt[0] & SPTE_P
    emulated_write(vm, pt32, (PT32 << 12) + 0x800, ((0x77 << 12) | 0x27).to_bytes(4, "little"))
    assert q1.spt[0] == 0 and q0.spt[1] & SPTE_P
    emulated_write(vm, pt32, (PT32 << 12) + 0x004, ((0x78 << 12) | 0x27).to_bytes(4, "little"))
    assert q0.spt[1] == 0
    assert not q0.invalid and not q1.invalid


def test_case_55_pde_write_at_0x404_zaps_sptes_2_and_3_of_the_quadrant_1_root(vm, pt32) -> None:
    for gva in (0x0000_1000, 0x0020_0000, 0x4040_0000, 0x4060_0000):
        vm.mmu.page_fault(pt32, gva, 0)
    roots = pt32.roots
    assert [i for i in range(512) if roots[0].spt[i] & SPTE_P] == [0, 1]
    assert [i for i in range(512) if roots[1].spt[i] & SPTE_P] == [2, 3]
    children = [roots[1].children[2], roots[1].children[3]]
    emulated_write(vm, pt32, (PD32 << 12) + 0x404, ((PT32 << 12) | 0x27).to_bytes(4, "little"))
    assert roots[1].spt[2] == 0 and roots[1].spt[3] == 0
    assert [i for i in range(512) if roots[0].spt[i] & SPTE_P] == [0, 1]  # other quadrants untouched
    assert all(not c.invalid for c in children)  # case 56: only unlinked
    # the flooding count moves on every page of the gfn, even those of other quadrants
    assert [r.write_flooding_count for r in roots] == [1, 1, 1, 1]


def test_get_written_sptes_worked_examples() -> None:
    from pagetrack.mmu import ShadowPage

    def sp(level, quadrant, four=True):
        return ShadowPage(T, Role(level=level, has_4_byte_gpte=four, quadrant=quadrant), 0, 0)

    assert get_written_sptes(sp(1, 0), TA + 0x004) == (1, 1)
    assert get_written_sptes(sp(1, 1), TA + 0x004) is None
    assert get_written_sptes(sp(1, 1), TA + 0x800) == (0, 1)
    assert get_written_sptes(sp(1, 0), TA + 0x800) is None
    assert get_written_sptes(sp(2, 1), TA + 0x404) == (2, 2)
    assert get_written_sptes(sp(2, 0), TA + 0x404) is None
    assert get_written_sptes(sp(2, 3), TA + 0xFFC) == (510, 2)
    assert get_written_sptes(sp(1, 0, four=False), TA + 0x28) == (5, 1)
    assert get_written_sptes(sp(3, 2, four=False), TA + 0xFF8) == (511, 1)  # quadrant ignored


def test_detect_write_flooding_rules() -> None:
    from pagetrack.mmu import ShadowPage

    leaf, upper = ShadowPage(T, Role(level=1), 0, 0), ShadowPage(T, Role(level=3), 0, 1)
    assert [detect_write_flooding(leaf) for _ in range(5)] == [False] * 5
    assert leaf.write_flooding_count == 0
    assert [detect_write_flooding(upper) for _ in range(4)] == [False, False, True, True]


def test_other_gfn_and_obsolete_pages_are_left_alone(vm) -> None:
    vcpu = vm.create_vcpu()
    sp = l1_with_leaves(vm)
    emulated_write(vm, vcpu, TA + 0x1000, b"\0" * 8)  # the next gfn
    assert all(sp.spt[i] & SPTE_P for i in range(4))
    vm.mmu.shadow.mmu_valid_gen ^= 1  # obsolete (as zap_all_fast does first)
    emulated_write(vm, vcpu, TA, b"\0" * 8)
    assert sp.spt[0] & SPTE_P


def test_writable_leaf_in_level_1_page_is_zapped_with_flush(vm) -> None:
    vcpu = vm.create_vcpu()
    sp = l1_with_leaves(vm, idxs=(4,))
    sp.spt[4] |= SPTE_W
    flushes = vm.mmu.stats.remote_tlb_flush
    emulated_write(vm, vcpu, TA + 0x20, b"\0" * 8)
    assert sp.spt[4] == 0 and vm.mmu.stats.remote_tlb_flush == flushes + 1
