"""The vCPU and KVM's emulator write path, driven by guest code.

Spec: kvm-page-track.md §3.2–§3.3 and §7 cases 29–34 (and 35 end to end); the
shadow-paging scenario of a guest editing its own page tables (§4, audit log
order page_fault → emulate → track_write → zap); the unsync/resync contract
(§2.9) seen by the guest.  Every scenario runs under TDP and shadow paging.
"""

from __future__ import annotations

import pagetrack
import pytest
from pagetrack.audit import AuditLog
from track_helpers import DATA_BASE, Guest, Recorder

PARAMS = pytest.mark.parametrize("tdp", [True, False], ids=["tdp", "shadow"])
P1 = DATA_BASE + 0x1000  # data page 1 (tracked in most scenarios)
P2 = DATA_BASE + 0x2000  # data page 2 (untracked)


def run(src: str, tdp: bool, track=(), data_size: int = 2 << 20, defines=None, edit=None):
    rec = Recorder()
    g = Guest(src, tdp=tdp, plugins=[rec], data_size=data_size, defines=defines)
    for gfn in track:
        g.vm.write_track_add_gfn(gfn)
    if edit is not None:
        edit(g)
    g.exit = g.run()
    g.rec = rec
    return g


def le(value: int, n: int) -> bytes:
    return value.to_bytes(n, "little")


# ---- cases 29–31: the split write path ---------------------------------------------------------

@PARAMS
def test_case_30_page_crossing_store_notifies_two_pieces_in_order(tdp: bool) -> None:
    g = run("""
        mov rax, 0x1122334455667788
        mov qword ptr [DATA_BASE + 0x1ffc], rax
        hlt
    """, tdp, track=[P1 >> 12])
    assert g.exit == "hlt"
    assert g.rec.writes == [(P1 + 0xFFC, le(0x55667788, 4)), (P2, le(0x11223344, 4))]
    assert g.vm.read_guest(P1 + 0xFFC, 8) == le(0x1122334455667788, 8)
    g.vm.close()


@PARAMS
def test_case_30_second_piece_is_translated_independently(tdp: bool) -> None:
    """The next virtual page maps a far-away frame: the second piece's gpa is that frame."""
    far = DATA_BASE + 0x9000

    def remap(g: Guest) -> None:
        pte2 = g.layout.pt_page_of(P2) + 8 * ((P2 >> 12) & 511)
        g.vm.write_guest(pte2, le(far | 0x27, 8))

    g = run("""
        mov dword ptr [DATA_BASE + 0x1ffe], 0xaabbccdd
        hlt
    """, tdp, track=[P1 >> 12], edit=remap)
    assert g.exit == "hlt"
    assert g.rec.writes == [(P1 + 0xFFE, le(0xCCDD, 2)), (far, le(0xAABB, 2))]
    assert g.vm.read_guest(far, 2) == le(0xAABB, 2)
    assert g.vm.read_guest(P2, 2) == b"\0\0"
    g.vm.close()


@PARAMS
def test_case_29_untracked_page_written_by_the_emulator_still_notifies(tdp: bool) -> None:
    """The second half of a straddling store lands in an untracked page: external
    trackers are told anyway (each filters for itself)."""
    g = run("""
        mov qword ptr [DATA_BASE + 0x1ff8 + 4], 0x7f
        hlt
    """, tdp, track=[P1 >> 12])
    assert not g.vm.gfn_is_write_tracked(P2 >> 12)
    assert [gpa for gpa, _ in g.rec.writes] == [P1 + 0xFFC, P2]
    assert g.rec.writes[1] == (P2, b"\0\0\0\0")
    g.vm.close()


@PARAMS
def test_plain_stores_to_untracked_pages_never_notify(tdp: bool) -> None:
    g = run("""
        mov qword ptr [DATA_BASE + 0x2000], 1
        mov qword ptr [DATA_BASE + 0x2ffc], rbx
        hlt
    """, tdp)
    assert g.exit == "hlt" and g.rec.writes == []
    assert g.vm.mmu.stats.insn_emulation == 0
    g.vm.close()


@PARAMS
def test_case_31_second_page_not_translating_first_piece_written_then_guest_pf(tdp: bool) -> None:
    size = 2 << 20
    last = DATA_BASE + size - 0x1000  # the last data page; the next one is not mapped
    g = run("""
        mov rax, 0x1122334455667788
        mov rdi, LAST
        mov qword ptr [rdi + 0xffc], rax
        hlt
    """, tdp, track=[last >> 12], data_size=size, defines={"LAST": last})
    assert "page fault" in g.exit.lower() or "#PF" in g.exit
    assert hex(DATA_BASE + size) in g.exit
    assert g.rec.writes == [(last + 0xFFC, le(0x55667788, 4))]
    assert g.vm.read_guest(last + 0xFFC, 4) == le(0x55667788, 4)  # already committed
    g.vm.close()


@PARAMS
def test_case_32_store_to_unbacked_gpa_is_mmio_and_not_notified(tdp: bool) -> None:
    hole = 0x3000_0000  # no memslot here

    def remap(g: Guest) -> None:
        pte = g.layout.pt_page_of(P2) + 8 * ((P2 >> 12) & 511)
        g.vm.write_guest(pte, le(hole | 0x27, 8))

    g = run("""
        mov qword ptr [DATA_BASE + 0x2008], 5
        hlt
    """, tdp, edit=remap)
    assert "memslot" in g.exit and hex(hole + 8) in g.exit
    assert g.rec.writes == []
    g.vm.close()


@PARAMS
def test_case_32_emulated_straddling_store_into_mmio_notifies_only_the_ram_piece(tdp: bool) -> None:
    hole = 0x3000_0000

    def remap(g: Guest) -> None:
        pte = g.layout.pt_page_of(P2) + 8 * ((P2 >> 12) & 511)
        g.vm.write_guest(pte, le(hole | 0x27, 8))

    g = run("""
        mov rax, 0x1122334455667788
        mov qword ptr [DATA_BASE + 0x1ffc], rax
        hlt
    """, tdp, track=[P1 >> 12], edit=remap)
    assert "memslot" in g.exit and hex(hole) in g.exit
    assert g.rec.writes == [(P1 + 0xFFC, le(0x55667788, 4))]
    g.vm.close()


# ---- cases 33–34: emulated compare-exchange -----------------------------------------------------

@PARAMS
def test_case_33_emulated_cmpxchg_success_notifies_once_failure_rewrites_the_old_value(tdp: bool) -> None:
    """Case 33 at the instruction level.  A successful compare is one notification of
    the new value (bytes = 8).  A failed compare is not silent in KVM: ``em_cmpxchg``
    keeps the memory operand and writes back the value it read, so the writeback
    (``emulator_cmpxchg_emulated`` with old == new) succeeds and notifies the unchanged
    bytes.  The "no notification" of case 33 is the atomic itself failing
    (``X86EMUL_CMPXCHG_FAILED``, memory changed under the emulator), which a
    single emulation step here cannot produce."""
    g = run("""
        mov qword ptr [DATA_BASE + 0x2000], 0      # untouched page, to compare with
        mov qword ptr [DATA_BASE + 0x1108], 9
        xor eax, eax
        mov rcx, 0xaa
        lock cmpxchg qword ptr [DATA_BASE + 0x1100], rcx    # 0 == 0: succeeds
        mov r8, rax
        mov rax, 5
        lock cmpxchg qword ptr [DATA_BASE + 0x1108], rcx    # 5 != 9: fails
        mov r9, rax
        hlt
    """, tdp, track=[P1 >> 12])
    assert g.exit == "hlt"
    writes = [w for w in g.rec.writes if w[0] >> 12 == P1 >> 12]
    assert writes[0] == (P1 + 0x108, le(9, 8))  # the plain mov
    assert writes[1:] == [(P1 + 0x100, le(0xAA, 8)), (P1 + 0x108, le(9, 8))]
    assert g.vm.read_guest(P1 + 0x100, 16) == le(0xAA, 8) + le(9, 8)
    regs = g.vcpu.cpu.regs
    assert regs[8] == 0 and regs[9] == 9 and regs[0] == 9
    g.vm.close()


@PARAMS
def test_case_34_cmpxchg16b_is_not_emulated(tdp: bool) -> None:
    """``em_cmpxchg8b`` returns ``X86EMUL_UNHANDLEABLE`` for 16 bytes: with no shadow page
    to unprotect, emulation fails and the run stops with KVM's internal error.  (Case
    34's 16-byte fallback of ``emulator_cmpxchg_emulated`` is therefore unreachable
    from CMPXCHG16B; the page-crossing form below exercises the fallback.)"""
    g = run("""
        xor eax, eax
        xor edx, edx
        mov rbx, 0x1111
        mov rcx, 0x2222
        lea rdi, [DATA_BASE + 0x1200]
        lock cmpxchg16b xmmword ptr [rdi]
        hlt
    """, tdp, track=[P1 >> 12])
    assert "emulation failure" in g.exit and "cmpxchg16b" in g.exit
    assert g.rec.writes == []
    g.vm.close()


@PARAMS
def test_case_34_page_crossing_cmpxchg_goes_through_the_write_path(tdp: bool) -> None:
    g = run("""
        xor eax, eax
        mov rcx, 0x0102030405060708
        lock cmpxchg qword ptr [DATA_BASE + 0x1ffc], rcx
        hlt
    """, tdp, track=[P1 >> 12])
    assert g.exit == "hlt"
    assert g.rec.writes == [(P1 + 0xFFC, le(0x05060708, 4)), (P2, le(0x01020304, 4))]
    g.vm.close()


@PARAMS
def test_emulated_1_2_4_byte_cmpxchg_notifies_its_size(tdp: bool) -> None:
    g = run("""
        xor eax, eax
        mov ecx, 0x11223344
        lock cmpxchg byte ptr [DATA_BASE + 0x1001], cl
        xor eax, eax
        lock cmpxchg word ptr [DATA_BASE + 0x1002], cx
        xor eax, eax
        lock cmpxchg dword ptr [DATA_BASE + 0x1004], ecx
        hlt
    """, tdp, track=[P1 >> 12])
    assert g.rec.writes == [(P1 + 1, b"\x44"), (P1 + 2, le(0x3344, 2)), (P1 + 4, le(0x11223344, 4))]
    g.vm.close()


@PARAMS
def test_failed_emulated_cmpxchg_still_marks_the_page_dirty(tdp: bool) -> None:
    """§3.3.5: a failed compare still makes a write cycle (``em_cmpxchg`` writes back
    the value it read), so the page is dirtied and the unchanged value notified."""
    from pagetrack.memory import KVM_MEM_LOG_DIRTY_PAGES

    rec = Recorder()
    g = Guest("""
        mov rax, 5
        mov rcx, 6
        lock cmpxchg qword ptr [DATA_BASE + 0x1000], rcx    # memory is 0: fails
        hlt
    """, tdp=tdp, plugins=[rec])
    g.vm.write_track_add_gfn(P1 >> 12)
    dirty: list[int] = []

    class Dirty:
        @pagetrack.hookimpl
        def mark_page_dirty(self, gfn: int) -> None:
            dirty.append(gfn)

    g.vm.register_tracker(Dirty(), "dirty")
    g.vm.set_user_memory_region(g.data.key, KVM_MEM_LOG_DIRTY_PAGES, DATA_BASE,
                                g.data.npages << 12, g.data.userspace_addr)
    assert g.run() == "hlt"
    assert rec.writes == [(P1, le(0, 8))]
    assert P1 >> 12 in dirty
    g.vm.close()


# ---- page tables edited by the guest under shadow paging ------------------------------------------

def test_guest_edits_an_upper_level_entry_audit_order_and_new_mapping() -> None:
    sym = Guest.symbols()
    audit = AuditLog.in_memory("scenario", "debug")
    g = Guest("""
        mov qword ptr [DATA_BASE], 0x11                 # data page 0 (2 MiB region A)
        mov qword ptr [DATA_BASE + 0x200000], 0x22      # data page 512 (region B)
        mov rax, qword ptr [DATA_BASE]
        out 0x11, eax                                   # 0x11 through region A's table
        mov rsi, PD
        mov rax, qword ptr [rsi + 8*3]                  # PDE of region B
        mov qword ptr [rsi + 8*2], rax                  # region A now uses B's table
        mov rax, qword ptr [DATA_BASE]
        out 0x11, eax                                   # 0x22: the new mapping
        hlt
    """, tdp=False, data_size=4 << 20, defines=sym, audit=audit)
    pd_gfn = sym["PD"] >> 12
    assert g.run() == "hlt"
    assert g.values() == [0x11, 0x22]
    evs = [e for e in audit.events if e["event"] in ("page_fault", "emulate", "track_write", "zap")]
    i = next(i for i, e in enumerate(evs) if e["event"] == "page_fault" and e["result"] == "emulate")
    pf, em, tw, zap = evs[i : i + 4]
    assert (pf["event"], em["event"], tw["event"], zap["event"]) == (
        "page_fault", "emulate", "track_write", "zap")
    assert pf["gfn"] == pd_gfn and pf["error_code"] & 3 == 3
    assert em["insn"] == "mov"
    assert (tw["gpa"], tw["len"]) == (sym["PD"] + 16, 8)
    assert (zap["gfn"], zap["pg_level"], zap["reason"], zap["sptes"]) == (pd_gfn, 2, "pte", 1)
    assert pf["seq"] < em["seq"] < tw["seq"] < zap["seq"]
    assert g.vm.write_track_count(pd_gfn) >= 1  # the PD stays shadowed, hence tracked
    g.vm.close()


@PARAMS
def test_guest_pte_edit_with_invlpg_is_seen_even_after_the_table_is_relinked(tdp: bool) -> None:
    """A last-level table goes unsync when the guest writes it; after its shadow page is
    unlinked and found again (kvm_mmu_find_shadow_page), it must stay unsync so that a
    later PTE edit + INVLPG is still honoured."""
    sym = Guest.symbols()
    g = Guest("""
        mov rbx, DATA_BASE
        mov qword ptr [rbx], 0x10
        mov qword ptr [rbx + 0x1000], 0x11
        mov qword ptr [rbx + 0x2000], 0x12
        mov qword ptr [rbx + 0x3000], 0x13
        mov rax, qword ptr [rbx + 0x1000]
        out 0x11, eax                       # 0x11
        mov rdi, PT_DATA
        mov rax, qword ptr [rdi + 8*3]
        mov qword ptr [rdi + 8*1], rax      # page 1 -> frame of page 3
        invlpg byte ptr [rbx + 0x1000]
        mov rax, qword ptr [rbx + 0x1000]
        out 0x11, eax                       # 0x13
        mov rsi, PD
        mov rax, qword ptr [rsi + 16]
        mov qword ptr [rsi + 16], rax       # rewrite the live PDE: its SPTE is zapped
        mov rax, qword ptr [rbx + 0x1000]
        out 0x11, eax                       # 0x13, through the re-linked table
        mov rax, qword ptr [rdi + 8*2]
        mov qword ptr [rdi + 8*1], rax      # page 1 -> frame of page 2
        invlpg byte ptr [rbx + 0x1000]
        mov rax, qword ptr [rbx + 0x1000]
        out 0x11, eax                       # 0x12
        hlt
    """, tdp=tdp, defines=sym)
    assert g.run() == "hlt"
    assert g.values() == [0x11, 0x13, 0x13, 0x12]
    g.vm.close()


@PARAMS
def test_guest_pte_edit_seen_after_cr3_reload(tdp: bool) -> None:
    sym = Guest.symbols()
    g = Guest("""
        mov rbx, DATA_BASE
        mov qword ptr [rbx + 0x1000], 0x11
        mov qword ptr [rbx + 0x4000], 0x14
        mov rax, qword ptr [rbx + 0x1000]
        out 0x11, eax
        mov rdi, PT_DATA
        mov rax, qword ptr [rdi + 8*4]
        mov qword ptr [rdi + 8*1], rax      # last-level write: not emulated under shadow (unsync)
        mov rax, cr3
        mov cr3, rax                        # sync every unsync page
        mov rax, qword ptr [rbx + 0x1000]
        out 0x11, eax
        hlt
    """, tdp=tdp, defines=sym)
    assert g.run() == "hlt"
    assert g.values() == [0x11, 0x14]
    if not tdp:
        assert g.vm.mmu.stats.insn_emulation == 0  # the PT write went direct (unsync)
        assert g.vm.mmu.stats.mmu_unsync == 0  # and was re-synced at the CR3 load
    g.vm.close()


def test_externally_tracked_last_level_table_edit_is_emulated_and_zaps_the_spte() -> None:
    """An external count on a guest last-level table forbids unsync (case 39): the PTE
    edit is emulated, notified to the node first, then kvm_mmu_track_write zaps the SPTE
    (cases 26, 50) and the next access sees the new frame without any INVLPG."""
    sym = Guest.symbols()
    log: list = []
    rec = Recorder("ext", log)
    g = Guest("""
        mov rbx, DATA_BASE
        mov qword ptr [rbx + 0x1000], 0x11
        mov qword ptr [rbx + 0x3000], 0x13
        mov rax, qword ptr [rbx + 0x1000]
        out 0x11, eax
        mov rdi, PT_DATA
        mov rax, qword ptr [rdi + 8*3]
        mov qword ptr [rdi + 8*1], rax      # page 1 -> frame of page 3 (emulated)
        mov rax, qword ptr [rbx + 0x1000]
        out 0x11, eax
        hlt
    """, tdp=False, plugins=[rec], defines=sym)
    pt_gfn = sym["PT_DATA"] >> 12
    g.vm.write_track_add_gfn(pt_gfn)
    assert g.run() == "hlt"
    assert g.values() == [0x11, 0x13]
    assert rec.writes == [(sym["PT_DATA"] + 8, g.vm.read_guest(sym["PT_DATA"] + 24, 8))]
    assert log[0][3] == 0  # the node ran before kvm_mmu_track_write counted the write
    stats = g.vm.mmu.stats
    assert stats.mmu_pte_write == 1 and stats.mmu_unsync == 0 and stats.insn_emulation == 1
    assert g.vm.write_track_count(pt_gfn) == 1  # level-1 pages add no count
    g.vm.close()


def test_guest_edit_of_its_pml4_is_emulated_and_the_root_entry_rebuilt() -> None:
    sym = Guest.symbols()
    g = Guest("""
        mov rbx, DATA_BASE
        mov qword ptr [rbx], 0x77
        mov rdi, PML4
        mov rax, qword ptr [rdi]
        mov qword ptr [rdi], rax            # rewrite the only PML4 entry in place
        mov rax, qword ptr [rbx]
        out 0x11, eax
        hlt
    """, tdp=False, defines=sym)
    assert g.run() == "hlt"
    assert g.values() == [0x77]
    zaps = g.vm.mmu.stats
    assert zaps.insn_emulation == 1 and zaps.mmu_pte_write == 1
    assert g.vm.write_track_count(sym["PML4"] >> 12) == 1
    g.vm.close()


def test_repeated_page_directory_writes_do_not_flood_a_table_on_their_own_walk() -> None:
    """Each tracked write fault clears the flooding count of the pages on the walk of the
    faulting address (case 38) — here that includes the page directory's own shadow page,
    so it never reaches the flooding threshold (case 49) however often it is written."""
    sym = Guest.symbols()
    g = Guest("""
        mov rdi, PD
        mov ecx, 6
    again:
        mov qword ptr [rdi + 8*400], rcx
        dec ecx
        jnz again
        hlt
    """, tdp=False, defines=sym)
    assert g.run() == "hlt"
    stats = g.vm.mmu.stats
    assert stats.insn_emulation == 6 and stats.mmu_pte_write == 6
    assert stats.mmu_flooded == 0
    pd_pages = list(g.vm.mmu.shadow.valid_sps_with_gptes(sym["PD"] >> 12))
    assert [sp.write_flooding_count for sp in pd_pages] == [1]
    g.vm.close()


def test_code_page_write_is_seen_by_the_next_fetch() -> None:
    """Self-modifying code through an emulated write invalidates decoded instructions."""
    g = Guest("""
        lea rdi, [rip + patch]
        mov byte ptr [rdi + 1], 0x22        # mov al, 0x11 -> mov al, 0x22
    patch:
        mov al, 0x11
        out 0x11, al
        hlt
    """, tdp=True, plugins=[rec := Recorder()])
    g.vm.write_track_add_gfn(g.vcpu.cpu.rip >> 12)
    assert g.run() == "hlt"
    assert g.values() == [0x22]
    assert len(rec.writes) == 1
    g.vm.close()
