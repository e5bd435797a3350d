"""The MMU: hardware translation, the page-fault handler and its paths (mmu.c, paging_tmpl.h).

:class:`Mmu` ties the pieces together for one VM:

* ``hw_translate`` is what the CPU does: walk the guest tables under TDP (each
  table access checked against the TDP map, A/D updates needing write access),
  or walk the shadow tables under shadow paging; it returns a translation or a
  fault for KVM;
* ``page_fault`` is ``kvm_mmu_page_fault``: the page-track check, the fast path
  for dirty logging, the slow path (``make_spte``, unsync), and the 6.12
  ``RET_PF_WRITE_PROTECTED`` handling with unprotect-and-retry;
* the dirty-logging primitives (W-only protection) used by the dirty logger.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import attrs

from ..memory import PAGE_SHIFT, HostMemory, MemSlot, MemSlots
from ..page_track import WriteTrack
from .paging import (
    ACC_WRITE,
    PFERR_GUEST_FINAL,
    PFERR_GUEST_PAGE,
    PFERR_PRESENT,
    PFERR_RSVD,
    PFERR_WRITE,
    GuestWalk,
    PagingMode,
    walk_addr,
)
from .pml import PML_FULL, PmlFull
from .shadow import Role, ShadowMmu, ShadowPage
from .spte import (
    SPTE_A,
    SPTE_D,
    SPTE_HOST_WRITABLE,
    SPTE_MMU_WRITABLE,
    SPTE_P,
    SPTE_PS,
    SPTE_U,
    SPTE_W,
    spte_pfn,
)
from .stats import MmuStats
from .tdp import TdpMap

if TYPE_CHECKING:
    from ..page_track import AuditSink

__all__ = [
    "RET_PF_EMULATE",
    "RET_PF_FIXED",
    "RET_PF_RETRY",
    "RET_PF_SPURIOUS",
    "RET_PF_WRITE_PROTECTED",
    "GuestPageFault",
    "MmioAccess",
    "Mmu",
    "MmuHost",
    "Translation",
]

RET_PF_CONTINUE = "continue"
RET_PF_RETRY = "retry"
RET_PF_EMULATE = "emulate"
RET_PF_WRITE_PROTECTED = "write_protected"
RET_PF_FIXED = "fixed"
RET_PF_SPURIOUS = "spurious"


class GuestPageFault(Exception):
    """The guest's own page tables do not allow the access: a #PF for the guest."""

    def __init__(self, gva: int, error_code: int) -> None:
        super().__init__(f"guest page fault at {gva:#x} (error code {error_code:#x})")
        self.gva = gva
        self.error_code = error_code


class MmioAccess(Exception):
    """An access to a guest-physical address outside every memslot (or a write to a read-only slot)."""

    def __init__(self, gpa: int, write: bool) -> None:
        kind = "write to" if write else "read of"
        super().__init__(f"{kind} gpa {gpa:#x}, which no writable memslot backs")
        self.gpa = gpa
        self.write = write


@attrs.frozen
class Translation:
    """A TLB fill: the slot and gfn behind a guest-virtual page, and whether writes may go direct."""

    slot: MemSlot
    gfn: int
    writable: bool


@attrs.frozen
class HwFault:
    """A fault that exits to KVM: the address (gva under shadow paging, gpa under TDP)."""

    addr: int
    error_code: int


class _TdpFault(Exception):
    def __init__(self, gpa: int, error_code: int) -> None:
        self.gpa = gpa
        self.error_code = error_code


class _PmlFullExit(Exception):
    """A guest-table A/D update needed a PML log while the buffer was full."""


class MmuHost(Protocol):
    """What the MMU needs from its VM."""

    memslots: MemSlots
    host: HostMemory
    write_track: WriteTrack

    @property
    def audit(self) -> AuditSink: ...

    def mark_page_dirty(self, vcpu: Any, slot: MemSlot, gfn: int) -> None: ...

    def flush_remote_tlbs(self, reason: str) -> None: ...


# Instructions KVM's emulator flags ``PageTable`` (``x86_page_table_writing_insn``):
# mov to memory, or/and, xchg, cmpxchg/8b/16b, bts/btr/btc.
PAGE_TABLE_WRITING_MNEMONICS = frozenset(
    {"mov", "or", "and", "xchg", "cmpxchg", "cmpxchg8b", "cmpxchg16b", "bts", "btr", "btc"}
)


class Mmu:
    """One VM's MMU (TDP or shadow paging)."""

    def __init__(self, vm: MmuHost, *, tdp: bool, host_huge_pages: bool = False) -> None:
        self.vm = vm
        self.tdp_enabled = tdp
        self.host_huge_pages = host_huge_pages
        self.stats = MmuStats()
        self.shadow = ShadowMmu(vm.memslots, vm.write_track, vm.audit, self.stats, vm.flush_remote_tlbs)
        self.shadow.sync_page = self._sync_page
        self.tdp = TdpMap()
        self._last_gfn: int | None = None
        #: ``kvm_x86_ops.cpu_dirty_log_size``: 512 when the CPU has PML (EPT only), else 0.
        #: With it, re-arming a page for dirty logging clears the SPTE's D bit instead of W.
        self.cpu_dirty_log_size = 0
        #: module parameter ``kvm.eager_page_split`` (default Y; TDP MMU only).
        self.eager_page_split = True
        vm.write_track.write_protect = self.write_protect_gfn

    # ---- helpers ------------------------------------------------------------------
    def _slot(self, gfn: int) -> MemSlot | None:
        return self.vm.memslots.gfn_to_memslot(gfn)

    def read_gpa(self, gpa: int, size: int) -> int:
        """Read guest-physical memory (``kvm_vcpu_read_guest``)."""
        slot = self._slot(gpa >> PAGE_SHIFT)
        if slot is None:
            raise MmioAccess(gpa, False)
        off = ((gpa >> PAGE_SHIFT) - slot.base_gfn) << PAGE_SHIFT | (gpa & 0xFFF)
        return int.from_bytes(slot.mem[off : off + size], "little")

    def _kvm_set_bits(self, vcpu: Any) -> Any:
        """A/D update by KVM's software walker: cmpxchg on host memory, mark the table dirty."""

        def set_bits(gpa: int, size: int, old: int, new: int) -> bool:
            gfn = gpa >> PAGE_SHIFT
            slot = self._slot(gfn)
            if slot is None:
                return True
            off = (gfn - slot.base_gfn) << PAGE_SHIFT | (gpa & 0xFFF)
            if int.from_bytes(slot.mem[off : off + size], "little") != old:
                return False
            slot.mem[off : off + size] = new.to_bytes(size, "little")
            self.vm.host.populated.add(slot.hva_page(gfn))
            if slot.logging:
                self.vm.mark_page_dirty(vcpu, slot, gfn)
            return True

        return set_bits

    def write_protect_gfn(self, slot: MemSlot, gfn: int) -> bool:
        """``kvm_mmu_slot_gfn_write_protect``: shadow rmaps and TDP leaves, all levels."""
        flush = self.shadow.write_protect_gfn(slot, gfn)
        if self.tdp_enabled:
            flush |= self.tdp.write_protect_gfn(gfn)
        if flush and self.vm.audit.debug:
            self.vm.audit.emit("write_protect", "debug", gfn=gfn, sptes=-1, flush=flush)
        return flush

    # ---- hardware translation -----------------------------------------------------
    def hw_translate(self, vcpu: Any, gva: int, write: bool) -> Translation | HwFault | PmlFull:
        """What the CPU does on a TLB miss; a fault here is an exit to KVM.

        Under TDP with PML, a write that would set a D bit while the vCPU's PML
        buffer is full returns :data:`~pagetrack.mmu.pml.PML_FULL` (a PML-full exit).
        """
        if self.tdp_enabled:
            return self._tdp_translate(vcpu, gva, write)
        return self._shadow_translate(vcpu, gva, write)

    def _tdp_translate(self, vcpu: Any, gva: int, write: bool) -> Translation | HwFault | PmlFull:
        tdp = self.tdp

        def read(gpa: int, size: int) -> int:
            if tdp.lookup(gpa >> PAGE_SHIFT) is None:
                raise _TdpFault(gpa, PFERR_GUEST_PAGE)
            return self.read_gpa(gpa, size)

        def set_bits(gpa: int, size: int, old: int, new: int) -> bool:
            found = tdp.lookup(gpa >> PAGE_SHIFT)
            if found is None or not found[1] & SPTE_W:
                raise _TdpFault(gpa, PFERR_GUEST_PAGE | PFERR_WRITE | (PFERR_PRESENT if found else 0))
            if not found[1] & SPTE_D and not self._ept_set_dirty(vcpu, found[0], gpa >> PAGE_SHIFT, found[1]):
                raise _PmlFullExit
            gfn = gpa >> PAGE_SHIFT
            slot = self._slot(gfn)
            assert slot is not None
            off = (gfn - slot.base_gfn) << PAGE_SHIFT | (gpa & 0xFFF)
            slot.mem[off : off + size] = new.to_bytes(size, "little")
            return True

        cpu = vcpu.cpu
        ec = PFERR_WRITE if write else 0
        try:
            w = walk_addr(vcpu.paging_mode, cpu.cr3, gva, ec, read, set_bits)
        except _TdpFault as f:
            return HwFault(f.gpa, f.error_code)
        except _PmlFullExit:
            return PML_FULL
        if w.fault is not None:
            raise GuestPageFault(gva, w.fault)
        found = tdp.lookup(w.gfn)
        if found is None:
            return HwFault(w.gpa, ec | PFERR_GUEST_FINAL)
        level, spte = found
        if write and not spte & SPTE_W:
            return HwFault(w.gpa, PFERR_PRESENT | PFERR_WRITE | PFERR_GUEST_FINAL)
        if write and not spte & SPTE_D:
            if not self._ept_set_dirty(vcpu, level, w.gfn, spte):
                return PML_FULL
            spte |= SPTE_D
        slot = self._slot(w.gfn)
        assert slot is not None
        # Only a D=1 leaf may be cached writable: a write through a D=0 leaf must
        # come back here so that the CPU sets D (and logs it under PML).
        writable = bool(spte & SPTE_W) and bool(spte & SPTE_D) and bool(w.access & ACC_WRITE) and w.dirty
        return Translation(slot, w.gfn, writable)

    # ---- EPT A/D and PML (the CPU side of vmx PML) ----------------------------------------------
    def _ept_set_dirty(self, vcpu: Any, level: int, gfn: int, spte: int) -> bool:
        """The CPU sets the D bit of a writable EPT leaf on a write; with PML on it logs the gpa first.

        Returns false, changing nothing, when the PML buffer is full: the access
        becomes a PML-full VM-exit (``handle_pml_full``) and is retried after it.
        """
        pml = getattr(vcpu, "pml", None)
        if pml is not None and vcpu.pml_enabled and not pml.log(gfn << PAGE_SHIFT):
            return False
        self.tdp.set(level, gfn, spte | SPTE_D)
        return True

    def _shadow_translate(self, vcpu: Any, gva: int, write: bool) -> Translation | HwFault:
        ec = PFERR_WRITE if write else 0
        sp = self._shadow_root_for(vcpu, gva)
        if sp is None:
            return HwFault(gva, ec)
        while True:
            idx = (gva >> (12 + 9 * (sp.role.level - 1))) & 511
            spte = sp.spt[idx]
            if not spte & SPTE_P:
                return HwFault(gva, ec)
            child = sp.children[idx]
            if child is None:
                break
            sp = child
        if write and not spte & SPTE_W:
            return HwFault(gva, PFERR_PRESENT | PFERR_WRITE)
        gfn = spte_pfn(spte)
        if sp.role.level > 1:
            gfn |= (gva >> 12) & ((1 << (9 * (sp.role.level - 1))) - 1)
        slot = self._slot(gfn)
        if slot is None:
            raise MmioAccess(gfn << 12 | (gva & 0xFFF), write)
        return Translation(slot, gfn, bool(spte & SPTE_W))

    # ---- shadow roots -------------------------------------------------------------------
    def _shadow_root_for(self, vcpu: Any, gva: int) -> ShadowPage | None:
        roots = vcpu.roots
        if not roots:
            return None
        if len(roots) == 1:
            return roots[0]
        return roots[(gva >> 30) & 3]

    def load_roots(self, vcpu: Any) -> None:
        """``kvm_mmu_load`` → ``mmu_alloc_shadow_roots`` (or nothing under TDP).

        64-bit guests get one level-4 root for CR3.  PAE guests get four level-2
        roots, one per PDPTE; 32-bit guests get four level-2 roots for the same
        page directory, quadrants 0..3 (each shadows 256 guest PDEs).
        """
        self.free_roots(vcpu)
        if self.tdp_enabled:
            return
        self.vm.write_track.first_shadow_root_alloc()
        mode: PagingMode = vcpu.paging_mode
        cr3 = vcpu.cpu.cr3
        roots: list[ShadowPage] = []
        if mode is PagingMode.LONG:
            roots.append(self.shadow.get_shadow_page(cr3 >> PAGE_SHIFT, Role(level=4)))
        elif mode is PagingMode.PAE:
            for i in range(4):
                pdpte = self.read_gpa((cr3 & ~0x1F) + 8 * i, 8)
                roots.append(self.shadow.get_shadow_page((pdpte >> PAGE_SHIFT) & 0xFF_FFFF_FFFF, Role(level=2)))
        else:
            for i in range(4):
                roots.append(self.shadow.get_shadow_page((cr3 & 0xFFFF_F000) >> PAGE_SHIFT,
                                                         Role(level=2, has_4_byte_gpte=True, quadrant=i)))
        for sp in roots:
            sp.root_count += 1
            sp.write_flooding_count = 0
        vcpu.roots = roots
        for sp in roots:
            if sp.unsync_children:
                self.shadow.sync_children(sp)

    def free_roots(self, vcpu: Any) -> None:
        """``kvm_mmu_free_roots``."""
        for sp in vcpu.roots:
            self.shadow.put_root(sp)
        vcpu.roots = []

    def roots_obsolete(self, vcpu: Any) -> bool:
        return any(self.shadow.is_obsolete(sp) for sp in vcpu.roots)

    def new_pgd(self, vcpu: Any) -> None:
        """``kvm_mmu_new_pgd`` + ``kvm_mmu_sync_roots`` on a CR3 load."""
        if not self.tdp_enabled:
            self.load_roots(vcpu)
        vcpu.flush_tlb()

    def invalidate_addr(self, vcpu: Any, gva: int) -> None:
        """INVLPG: ``__kvm_mmu_invalidate_addr`` — re-sync the SPTE of an unsync leaf."""
        if not self.tdp_enabled:
            sp = self._shadow_root_for(vcpu, gva)
            while sp is not None:
                idx = (gva >> (12 + 9 * (sp.role.level - 1))) & 511
                if sp.role.level == 1 or sp.children[idx] is None:
                    if sp.unsync and sp.spt[idx] & SPTE_P:
                        self._sync_spte(sp, idx)
                    break
                sp = sp.children[idx]
        vcpu.flush_tlb()

    # ---- sync of unsync pages -------------------------------------------------------------
    def _gpte_size(self, sp: ShadowPage) -> int:
        return 4 if sp.role.has_4_byte_gpte else 8

    def _gpte_gpa(self, sp: ShadowPage, idx: int) -> int:
        if sp.role.has_4_byte_gpte:
            return (sp.gfn << PAGE_SHIFT) + 4 * (idx + 512 * sp.role.quadrant)
        return (sp.gfn << PAGE_SHIFT) + 8 * idx

    def _sync_spte(self, sp: ShadowPage, idx: int) -> bool:
        """``kvm_sync_spte``: re-derive one leaf SPTE from its guest PTE.

        A guest entry that changed its frame, lost presence or lost write
        permission drops the SPTE (it refaults); otherwise write access is
        re-checked with ``synchronizing`` set.
        """
        size = self._gpte_size(sp)
        gpte = self.read_gpa(self._gpte_gpa(sp, idx), size)
        mask = 0x000F_FFFF_FFFF_F000 if size == 8 else 0xFFFF_F000
        old = sp.spt[idx]
        if not gpte & 1 or (gpte & mask) >> PAGE_SHIFT != sp.gfns[idx]:
            self.shadow.drop_spte(sp, idx)
            return True
        if old & SPTE_W and not (gpte & 2 and gpte & 0x40):
            sp.spt[idx] = old & ~(SPTE_W | SPTE_MMU_WRITABLE)
        return True

    def _sync_page(self, sp: ShadowPage) -> bool:
        """``kvm_sync_page``: re-sync every present leaf SPTE of an unsync page."""
        for idx in range(512):
            if sp.spt[idx] & SPTE_P and sp.children[idx] is None:
                self._sync_spte(sp, idx)
        return True

    # ---- make_spte / mmu_set_spte ----------------------------------------------------------
    def make_spte(self, vcpu: Any, slot: MemSlot, gfn: int, level: int, write_access: bool,
                  old: int, *, prefetch: bool = False, synchronizing: bool = False,
                  host_writable: bool = True) -> tuple[int, bool]:
        """``make_spte``: returns ``(spte, wrprot)``.

        Write access sets W and MMU-writable unless the old SPTE was writable;
        otherwise ``mmu_try_to_unsync_pages`` decides, and a refusal makes the
        SPTE read-only (``wrprot``).  A writable SPTE in a dirty-logged slot marks
        the page dirty now.
        """
        frame = gfn & ~((1 << (9 * (level - 1))) - 1)
        spte = SPTE_P | SPTE_U | SPTE_A | (frame << PAGE_SHIFT)
        if level > 1:
            spte |= SPTE_PS
        wrprot = False
        if host_writable:
            spte |= SPTE_HOST_WRITABLE
        else:
            write_access = False
        if write_access:
            spte |= SPTE_W | SPTE_MMU_WRITABLE
            if not old & SPTE_W and self.shadow.try_to_unsync_pages(slot, gfn, synchronizing, prefetch):
                wrprot = True
                spte &= ~(SPTE_W | SPTE_MMU_WRITABLE)
            if spte & SPTE_W:
                spte |= SPTE_D
        if spte & SPTE_W and slot.logging:
            self.vm.mark_page_dirty(vcpu, slot, gfn)
        return spte, wrprot

    def _mmu_set_spte(self, vcpu: Any, slot: MemSlot, sp: ShadowPage, idx: int, gfn: int,
                      write_access: bool, write_fault: bool, host_writable: bool) -> str:
        """``mmu_set_spte`` for a shadow leaf."""
        old = sp.spt[idx]
        flush = False
        if old & SPTE_P:
            child = sp.children[idx]
            if child is not None:
                self.shadow.drop_parent_pte(child, sp, idx)
                flush = True
                old = 0
            elif spte_pfn(old) != gfn:
                self.shadow.drop_spte(sp, idx)
                flush = True
                old = 0
        spte, wrprot = self.make_spte(vcpu, slot, gfn, 1, write_access, old, host_writable=host_writable)
        if spte == old:
            return RET_PF_SPURIOUS
        was_present = bool(old & SPTE_P)
        if old & SPTE_W and not spte & SPTE_W:
            flush = True
        sp.spt[idx] = spte
        sp.gfns[idx] = gfn
        if not was_present:
            self.shadow.rmap_add(sp, idx, gfn, 1)
        if flush:
            self.vm.flush_remote_tlbs("mmu_set_spte")
        if wrprot and write_fault:
            return RET_PF_WRITE_PROTECTED
        return RET_PF_FIXED

    # ---- the page-fault handler -----------------------------------------------------------
    def page_fault_handle_page_track(self, error_code: int, slot: MemSlot | None, gfn: int) -> bool:
        """``page_fault_handle_page_track``: a present write to a tracked gfn must be emulated."""
        if error_code & PFERR_RSVD:
            return False
        if not (error_code & PFERR_PRESENT and error_code & PFERR_WRITE):
            return False
        return self.vm.write_track.is_tracked(slot, gfn)

    def page_fault(self, vcpu: Any, addr: int, error_code: int) -> str:
        """``kvm_mmu_page_fault``: returns ``fixed``, ``spurious``, ``retry`` or ``emulate``.

        Raises :class:`GuestPageFault` when the guest's tables refuse the access
        and :class:`MmioAccess` outside every memslot.
        """
        stats = self.stats
        stats.pf_taken += 1
        if self.tdp_enabled:
            r = self._direct_page_fault(vcpu, addr, error_code)
        else:
            r = self._shadow_page_fault(vcpu, addr, error_code)
        if r == RET_PF_WRITE_PROTECTED:
            r = self._write_protect_fault(vcpu, addr, error_code)
        if r == RET_PF_FIXED:
            stats.pf_fixed += 1
        elif r == RET_PF_EMULATE:
            stats.pf_emulate += 1
        elif r == RET_PF_SPURIOUS:
            stats.pf_spurious += 1
        audit = self.vm.audit
        if audit.debug:
            gfn = addr >> PAGE_SHIFT if self.tdp_enabled else self._last_gfn
            audit.emit("page_fault", "debug", vcpu=vcpu.index, addr=addr, gfn=gfn, error_code=error_code, result=r)
        return r

    def _direct_page_fault(self, vcpu: Any, gpa: int, error_code: int) -> str:
        """``kvm_tdp_mmu_page_fault``."""
        gfn = gpa >> PAGE_SHIFT
        slot = self._slot(gfn)
        write = bool(error_code & PFERR_WRITE)
        if slot is None:
            raise MmioAccess(gpa, write)
        if self.page_fault_handle_page_track(error_code, slot, gfn):
            return RET_PF_WRITE_PROTECTED
        if write and error_code & PFERR_PRESENT:
            r = self._fast_page_fault(vcpu, slot, gfn)
            if r is not None:
                return r
        if write and slot.readonly:
            raise MmioAccess(gpa, True)
        host = self.vm.host
        hpage = slot.hva_page(gfn)
        map_writable = not slot.readonly and (write or hpage in host.populated)
        if write:
            host.populated.add(hpage)
        level = 1 if slot.logging or not self.host_huge_pages else self.vm.write_track.max_mapping_level(slot, gfn)
        found = self.tdp.lookup(gfn)
        old = 0
        if found is not None:
            cur_level, old = found
            while cur_level > level:
                self.tdp.split(cur_level, gfn)
                cur_level -= 1
            found = self.tdp.lookup(gfn)
            assert found is not None
            old = found[1]
        spte, wrprot = self.make_spte(vcpu, slot, gfn, level, True, old, host_writable=map_writable)
        if spte == old:
            return RET_PF_SPURIOUS
        self.tdp.set(level, gfn, spte)
        if old & SPTE_W and not spte & SPTE_W:
            self.vm.flush_remote_tlbs("tdp_map")
        if wrprot and write:
            return RET_PF_WRITE_PROTECTED
        return RET_PF_FIXED

    def _fast_page_fault(self, vcpu: Any, slot: MemSlot, gfn: int) -> str | None:
        """``fast_page_fault``: restore W on a dirty-log-protected SPTE without mmu_lock."""
        found = self.tdp.lookup(gfn)
        if found is None:
            return None
        level, spte = found
        if spte & SPTE_W:
            return RET_PF_SPURIOUS
        if not spte & SPTE_MMU_WRITABLE:
            return None
        if level > 1 and slot.logging:
            return None  # huge SPTEs are split by the slow path while logging
        self.tdp.set(level, gfn, spte | SPTE_W)
        self.stats.pf_fast += 1
        if slot.logging:
            self.vm.mark_page_dirty(vcpu, slot, gfn)
        return RET_PF_FIXED

    def _shadow_page_fault(self, vcpu: Any, gva: int, error_code: int) -> str:
        """``FNAME(page_fault)``: walk the guest tables, then ``FNAME(fetch)``."""
        if self.roots_obsolete(vcpu) or not vcpu.roots:
            self.load_roots(vcpu)
        w = walk_addr(vcpu.paging_mode, vcpu.cpu.cr3, gva, error_code, self.read_gpa, self._kvm_set_bits(vcpu))
        if w.fault is not None:
            self.stats.pf_guest += 1
            raise GuestPageFault(gva, w.fault)
        slot = self._slot(w.gfn)
        write = bool(error_code & PFERR_WRITE)
        self._last_gfn = w.gfn
        if slot is None:
            raise MmioAccess(w.gpa, write)
        if self.page_fault_handle_page_track(error_code, slot, w.gfn):
            self._clear_flood(vcpu, gva)
            return RET_PF_WRITE_PROTECTED
        if write and slot.readonly:
            raise MmioAccess(w.gpa, True)
        host = self.vm.host
        hpage = slot.hva_page(w.gfn)
        map_writable = not slot.readonly and (write or hpage in host.populated)
        if write:
            host.populated.add(hpage)
        return self._fetch(vcpu, w, slot, write, map_writable)

    def _clear_flood(self, vcpu: Any, gva: int) -> None:
        """``shadow_page_table_clear_flood``: reset the pages on the walk of ``gva``."""
        sp = self._shadow_root_for(vcpu, gva)
        while sp is not None:
            sp.write_flooding_count = 0
            idx = (gva >> (12 + 9 * (sp.role.level - 1))) & 511
            sp = sp.children[idx] if sp.spt[idx] & SPTE_P else None

    def _fetch(self, vcpu: Any, w: GuestWalk, slot: MemSlot, write: bool, map_writable: bool) -> str:
        """``FNAME(fetch)``: link shadow pages for the guest tables, then set the leaf."""
        mode: PagingMode = vcpu.paging_mode
        gva = w.gva
        sp = self._shadow_root_for(vcpu, gva)
        assert sp is not None
        four_byte = mode is PagingMode.PT32
        access = w.access | 1
        while sp.role.level > 1:
            sp.write_flooding_count = 0
            level = sp.role.level
            idx = (gva >> (12 + 9 * (level - 1))) & 511
            child = sp.children[idx] if sp.spt[idx] & SPTE_P else None
            if child is None:
                child_level = level - 1
                if child_level >= w.level:
                    # A guest table exists at this level: shadow it (indirect).
                    table_gfn = w.table_gfn[child_level]
                    quadrant = idx & 1 if four_byte and child_level == 1 else 0
                    role = Role(level=child_level, has_4_byte_gpte=four_byte, quadrant=quadrant, access=access)
                else:
                    # The guest maps a huge page here: a direct page for its frames.
                    span = 9 * child_level
                    table_gfn = (w.gfn >> span) << span
                    role = Role(level=child_level, direct=True, access=access)
                child = self.shadow.get_shadow_page(table_gfn, role)
                self.shadow.link_shadow_page(sp, idx, child)
            sp = child
        sp.write_flooding_count = 0
        idx = (gva >> 12) & 511
        write_access = bool(w.access & ACC_WRITE) and (write or w.dirty)
        return self._mmu_set_spte(vcpu, slot, sp, idx, w.gfn, write_access, write, map_writable)

    # ---- RET_PF_WRITE_PROTECTED (6.12) ------------------------------------------------------
    def _write_protect_fault(self, vcpu: Any, addr: int, error_code: int) -> str:
        """``kvm_mmu_write_protect_fault``."""
        rip = vcpu.cpu.rip
        if vcpu.last_retry_rip == rip and vcpu.last_retry_addr == addr:
            return RET_PF_EMULATE
        vcpu.last_retry_rip = vcpu.last_retry_addr = 0
        walk_write = PFERR_GUEST_PAGE | PFERR_WRITE | PFERR_PRESENT
        if self.tdp_enabled and error_code & walk_write == walk_write and self.unprotect_gfn_and_retry(vcpu, addr, True):
            return RET_PF_RETRY
        vcpu.allow_retry_pf = True
        return RET_PF_EMULATE

    def unprotect_gfn_and_retry(self, vcpu: Any, addr: int, always_retry: bool) -> bool:
        """``__kvm_mmu_unprotect_gfn_and_retry``: zap the shadow pages of the gfn."""
        if self.shadow.indirect_shadow_pages == 0:
            return False
        if self.tdp_enabled:
            gpa = addr
        else:
            w = walk_addr(vcpu.paging_mode, vcpu.cpu.cr3, addr, PFERR_WRITE, self.read_gpa, None)
            if w.fault is not None:
                return False
            gpa = w.gpa
        zapped = self.shadow.zap_gfn(gpa >> PAGE_SHIFT, "unprotect")
        if zapped or always_retry:
            vcpu.last_retry_rip = vcpu.cpu.rip
            vcpu.last_retry_addr = addr
        if zapped:
            self.stats.unprotect_retry += 1
        return zapped

    # ---- dirty logging primitives -----------------------------------------------------------
    def slot_wrprot_for_logging(self, slot: MemSlot, pml: bool = False) -> None:
        """``kvm_mmu_slot_apply_flags`` (enable): arm dirty logging on every SPTE of the slot.

        With ``kvm.eager_page_split`` under TDP, huge leaves are first split to 4K
        (``kvm_mmu_slot_try_split_huge_pages``; children inherit W and D).  Without
        PML every leaf loses W (``kvm_mmu_slot_remove_write_access`` from 4K up);
        with PML the 4K leaves keep W and lose D (``kvm_mmu_slot_leaf_clear_dirty``)
        and only leaves of 2M and up are write-protected.  Shadow-MMU SPTEs always
        lose W (PML needs EPT).  The caller flushes TLBs.
        """
        if self.tdp_enabled and self.eager_page_split:
            self.split_huge_pages(slot, slot.base_gfn, slot.end_gfn - 1)
        for level, frame in list(self.tdp.leaves_in(slot.base_gfn, slot.npages)):
            if pml and level == 1:
                self.tdp.clear_dirty(frame)
            else:
                self.tdp.wrprot_for_logging(level, frame)
        for (gfn, _level), entries in list(self.shadow.rmap.items()):
            if slot.base_gfn <= gfn < slot.end_gfn:
                for sp, idx in entries:
                    sp.spt[idx] &= ~SPTE_W

    def enable_log_dirty_pt_masked(self, slot: MemSlot, offset: int, mask: int, *,
                                   pml: bool = False, init_set: bool = False) -> None:
        """``kvm_arch_mmu_enable_log_dirty_pt_masked``: re-arm logging for the masked 4K pages.

        ``init_set`` is ``kvm_dirty_log_manual_protect_and_init_set``: logging began
        without protection, so huge leaves covering the first and last masked gfn
        are split (eager splitting) or write-protected at 2M+ first.  Then each
        masked 4K TDP leaf loses D with PML (``kvm_mmu_clear_dirty_pt_masked``) or
        W without (``kvm_mmu_write_protect_pt_masked``); huge and absent leaves are
        skipped, as in the TDP MMU.  Shadow-MMU SPTEs lose W.  No TLB flush here.
        """
        base = slot.base_gfn + offset
        if init_set and mask:
            start = base + (mask & -mask).bit_length() - 1
            end = base + mask.bit_length() - 1
            if self.tdp_enabled and self.eager_page_split:
                self.split_huge_pages(slot, start, end)
            for gfn in {start, end}:
                found = self.tdp.lookup(gfn)
                if found is not None and found[0] > 1:
                    self.tdp.wrprot_for_logging(found[0], gfn >> (9 * (found[0] - 1)))
        level1 = self.tdp.levels[1]
        rmap = self.shadow.rmap
        bit_off = SPTE_D if pml else SPTE_W
        while mask:
            bit = (mask & -mask).bit_length() - 1
            mask &= mask - 1
            gfn = base + bit
            spte = level1.get(gfn)
            if spte is not None and spte & bit_off:
                level1[gfn] = spte & ~bit_off
            for sp, idx in rmap.get((gfn, 1), ()):
                sp.spt[idx] &= ~SPTE_W

    def split_huge_pages(self, slot: MemSlot, first: int, last: int) -> int:
        """``kvm_mmu_try_split_huge_pages``: split every huge TDP leaf over ``[first, last]`` to 4K.

        Returns the number of leaves split.  Children inherit W and D, so no TLB
        flush is needed (``tdp_mmu_split_huge_page``).
        """
        split = 0
        for level in (3, 2):
            shift = 9 * (level - 1)
            for frame in [f for f in self.tdp.levels[level] if f << shift <= last and first < (f + 1) << shift]:
                self.tdp.split(level, frame << shift)
                split += 1
        return split

    def recover_huge_pages(self, slot: MemSlot) -> int:
        """``kvm_mmu_zap_collapsible_sptes`` (logging turned off): zap 4K leaves that could be huge.

        The next access maps them at the largest level the slot and the host
        allow again.  Returns the number of leaves zapped; the caller flushes.
        """
        if not self.tdp_enabled or not self.host_huge_pages:
            return 0
        level1 = self.tdp.levels[1]
        max_level = self.vm.write_track.max_mapping_level
        doomed = [g for g in range(slot.base_gfn, slot.end_gfn) if g in level1 and max_level(slot, g) > 1]
        for g in doomed:
            del level1[g]
        if doomed and self.vm.audit.debug:
            self.vm.audit.emit("zap", "debug", gfn=slot.base_gfn, pg_level=1, reason="collapsible", sptes=len(doomed))
        return len(doomed)

    def zap_all_fast(self) -> None:
        """``kvm_mmu_zap_all_fast``: obsolete every shadow page, invalidate TDP roots."""
        n = self.shadow.zap_all_fast()
        leaves = self.tdp.clear()
        if self.vm.audit.debug:
            self.vm.audit.emit("zap", "debug", gfn=0, pg_level=0, reason="zap_all_fast", sptes=n + leaves)
        self.vm.flush_remote_tlbs("zap_all_fast")
