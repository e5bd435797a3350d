"""The vCPU: the run loop, its software TLB, and KVM's emulation of faulting instructions.

``Vcpu.run`` is ``KVM_RUN``: it executes guest code until an exit that the VMM
must handle (port I/O, ``hlt``, an error).  Guest memory accesses go through a
software TLB holding views of guest pages; a miss is a hardware page walk
(:meth:`pagetrack.mmu.Mmu.hw_translate`), and a walk that fails exits to KVM's
page-fault handler.  When that handler says "emulate", the instruction is run
again by the emulator, whose writes take ``emulator_write_emulated``'s path:
split at page boundaries, committed, marked dirty, then ``track_write``.

Plain stores to pages whose translation is cached writable cost a dict lookup
and a slice assignment: no hook, no log.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs
import iced_x86

from .emulator import (
    CpuState,
    GuestFault,
    Hlt,
    InstructionCache,
    Invlpg,
    MovToCr,
    PortIn,
    PortOut,
    UnsupportedInstruction,
)
from .memory import PAGE_SHIFT, MemSlot
from .mmu import (
    PAGE_TABLE_WRITING_MNEMONICS,
    RET_PF_EMULATE,
    GuestPageFault,
    MmioAccess,
    PagingMode,
    Translation,
    walk_addr,
)
from .mmu.paging import PFERR_WRITE
from .mmu.pml import PmlBuffer, PmlFull

if TYPE_CHECKING:
    from .vm import VM

__all__ = ["RunExit", "Vcpu"]

_MASK64 = (1 << 64) - 1
_CR0_PE, _CR0_WP, _CR0_PG = 1, 1 << 16, 1 << 31
_CR4_PAE = 1 << 5
_EFER_LME, _EFER_LMA = 1 << 8, 1 << 10
_FAULT_LOOP_LIMIT = 16
_FORMATTER = iced_x86.Formatter(iced_x86.FormatterSyntax.INTEL)
_PAGE_TABLE_WRITERS = frozenset(getattr(iced_x86.Mnemonic, m.upper()) for m in PAGE_TABLE_WRITING_MNEMONICS)


class _DirtyRingRequest(Exception):
    """``KVM_REQ_DIRTY_RING_SOFT_FULL`` was raised while handling an exit: stop before re-entry."""


class EmulationFailure(Exception):
    """KVM's emulator cannot handle the instruction (``X86EMUL_UNHANDLEABLE``)."""


class NeedEmulation(Exception):
    """The page-fault handler returned ``RET_PF_EMULATE`` for an access of this instruction."""

    def __init__(self, addr: int, error_code: int) -> None:
        self.addr = addr
        self.error_code = error_code


@attrs.frozen
class RunExit:
    """Why ``Vcpu.run`` returned (``struct kvm_run`` ``exit_reason``).

    ``kind`` is ``"io"`` (``exit`` holds the :class:`PortOut` / :class:`PortIn`),
    ``"hlt"``, ``"limit"`` (instruction budget used up), ``"dirty_ring_full"``
    (``KVM_EXIT_DIRTY_RING_FULL``: harvest the ring, reset, run again) or
    ``"error"`` (``message``).
    """

    kind: str
    exit: Any = None
    message: str = ""


class _NativeMemory:
    """Guest memory as the CPU sees it: software TLB, else a page walk and maybe a fault."""

    emulating = False

    def __init__(self, vcpu: Vcpu) -> None:
        self.vcpu = vcpu
        self.rtlb = vcpu.rtlb
        self.wtlb = vcpu.wtlb

    def read(self, addr: int, size: int) -> int:
        off = addr & 0xFFF
        if off + size <= 4096:
            page = self.rtlb.get(addr >> 12)
            if page is None:
                page = self.vcpu.fill(addr, False)
            return int.from_bytes(page[off : off + size], "little")
        n1 = 4096 - off
        lo = self.read(addr, n1)
        hi = self.read((addr + n1) & _MASK64, size - n1)
        return lo | hi << (8 * n1)

    def write(self, addr: int, size: int, value: int) -> None:
        off = addr & 0xFFF
        if off + size <= 4096:
            page = self.wtlb.get(addr >> 12)
            if page is None:
                page = self.vcpu.fill(addr, True)
            page[off : off + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            return
        # A store that straddles two pages: both translations are checked before
        # either part is written, as the processor does.
        n1 = 4096 - off
        second = (addr + n1) & _MASK64
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        vcpu = self.vcpu
        for _ in range(_FAULT_LOOP_LIMIT):
            gen = vcpu.tlb_gen
            p1 = self.wtlb.get(addr >> 12) or vcpu.fill(addr, True)
            p2 = self.wtlb.get(second >> 12) or vcpu.fill(second, True)
            if gen == vcpu.tlb_gen or self.wtlb.get(addr >> 12) is p1:
                p1[off:] = data[:n1]
                p2[: size - n1] = data[n1:]
                return
        raise RuntimeError(f"page-straddling store at {addr:#x} keeps faulting")

    def cmpxchg(self, addr: int, size: int, expected: int, new: int) -> tuple[bool, int]:
        # A locked compare-exchange needs write access whatever the outcome.
        self._probe_write(addr, size)
        old = self.read(addr, size)
        if old != expected:
            return False, old
        self.write(addr, size, new)
        return True, old

    def _probe_write(self, addr: int, size: int) -> None:
        if self.wtlb.get(addr >> 12) is None:
            self.vcpu.fill(addr, True)
        end = (addr + size - 1) & _MASK64
        if end >> 12 != addr >> 12 and self.wtlb.get(end >> 12) is None:
            self.vcpu.fill(end, True)

    def fetch(self, addr: int, size: int) -> bytes:
        off = addr & 0xFFF
        page = self.rtlb.get(addr >> 12) or self.vcpu.fill(addr, False)
        first = bytes(page[off : off + size])
        if len(first) < size:
            try:
                nxt = (addr + len(first)) & _MASK64
                page2 = self.rtlb.get(nxt >> 12) or self.vcpu.fill(nxt, False)
            except GuestPageFault:
                return first
            first += bytes(page2[: size - len(first)])
        return first


class _EmulatorMemory:
    """KVM's emulator memory ops (``emulator_read_emulated`` / ``emulator_write_emulated`` /
    ``emulator_cmpxchg_emulated``): software walks, then guest memory, then trackers."""

    emulating = True

    def __init__(self, vcpu: Vcpu) -> None:
        self.vcpu = vcpu
        self.vm = vcpu.vm

    def _gpa(self, gva: int, write: bool) -> int:
        """``kvm_mmu_gva_to_gpa_{read,write}``: KVM's software walk (sets A/D)."""
        vcpu = self.vcpu
        mmu = self.vm.mmu
        w = walk_addr(vcpu.paging_mode, vcpu.cpu.cr3, gva, PFERR_WRITE if write else 0,
                      mmu.read_gpa, mmu._kvm_set_bits(vcpu))
        if w.fault is not None:
            raise GuestFault(14, w.fault, gva)
        return w.gpa

    def _slot(self, gpa: int, write: bool) -> tuple[MemSlot, int]:
        slot = self.vm.memslots.gfn_to_memslot(gpa >> PAGE_SHIFT)
        if slot is None or (write and slot.readonly):
            raise MmioAccess(gpa, write)
        return slot, ((gpa >> PAGE_SHIFT) - slot.base_gfn) << PAGE_SHIFT | (gpa & 0xFFF)

    def _pieces(self, addr: int, size: int) -> list[tuple[int, int, int]]:
        off = addr & 0xFFF
        if off + size <= 4096:
            return [(addr, 0, size)]
        n1 = 4096 - off
        return [(addr, 0, n1), ((addr + n1) & _MASK64, n1, size - n1)]

    def read(self, addr: int, size: int) -> int:
        out = 0
        for gva, done, n in self._pieces(addr, size):
            slot, off = self._slot(self._gpa(gva, False), False)
            out |= int.from_bytes(slot.mem[off : off + n], "little") << (8 * done)
        return out

    def fetch(self, addr: int, size: int) -> bytes:
        out = b""
        for gva, _done, n in self._pieces(addr, size):
            try:
                slot, off = self._slot(self._gpa(gva, False), False)
            except GuestFault:
                if out:
                    return out
                raise
            out += bytes(slot.mem[off : off + n])
        return out

    def _commit(self, gva: int, gpa: int, data: bytes) -> None:
        """``emulator_write_phys``: write, mark dirty, then notify (``kvm_page_track_write``)."""
        vm = self.vm
        slot, off = self._slot(gpa, True)
        slot.mem[off : off + len(data)] = data
        gfn = gpa >> PAGE_SHIFT
        vm.host.populated.add(slot.hva_page(gfn))
        if self.vcpu.is_code_page(gva >> 12):
            self.vcpu.cache.invalidate_page(gva >> 12)
        vm.mark_page_dirty(self.vcpu, slot, gfn)
        vm.mmu.stats.track_write_calls += 1
        vm.hooks.track_write(vm, self.vcpu, gpa, data)

    def write(self, addr: int, size: int, value: int) -> None:
        """``emulator_read_write``: one piece per page, in address order.

        The first piece is committed and notified before the second is
        translated, so a fault on the second leaves the first written.
        """
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        for gva, done, n in self._pieces(addr, size):
            self._commit(gva, self._gpa(gva, True), data[done : done + n])

    def cmpxchg(self, addr: int, size: int, expected: int, new: int) -> tuple[bool, int]:
        """``em_cmpxchg`` / ``em_cmpxchg8b`` + writeback through ``emulator_cmpxchg_emulated``.

        The emulator compares first.  On success it writes ``new``; on failure it
        still makes a write cycle, writing back the value it read ("create
        write-cycle to dest by writing the same value"), so the page is dirtied
        and trackers are notified either way.  The writeback of 1/2/4/8 bytes
        within a page is one atomic write and one notification; any other size,
        or a page-crossing one, goes through the write path.  ``cmpxchg16b`` is
        not emulated: ``em_cmpxchg8b`` returns ``X86EMUL_UNHANDLEABLE``.
        """
        if size == 16:
            raise EmulationFailure("cmpxchg16b is not emulated by KVM (em_cmpxchg8b: X86EMUL_UNHANDLEABLE)")
        old = self.read(addr, size)
        value = new if old == expected else old
        if size > 8 or size & (size - 1) or (addr & 0xFFF) + size > 4096:
            self.write(addr, size, value)
        else:
            self._commit(addr, self._gpa(addr, True), value.to_bytes(size, "little"))
        return old == expected, old


class Vcpu:
    """One virtual CPU (``struct kvm_vcpu``) in 64-bit long mode by default."""

    def __init__(self, vm: VM, index: int) -> None:
        self.vm = vm
        self.index = index
        self.cpu = CpuState()
        self.cpu.cr0 = _CR0_PE | _CR0_WP | _CR0_PG
        self.cpu.cr4 = _CR4_PAE
        self.cpu.efer = _EFER_LME | _EFER_LMA
        self.tlb_gen = 0
        self.rtlb: dict[int, memoryview] = {}
        self.wtlb: dict[int, memoryview] = {}
        self.roots: list[Any] = []
        self.last_retry_rip = 0
        self.last_retry_addr = 0
        self.allow_retry_pf = False
        self.cache = InstructionCache()
        self.native = _NativeMemory(self)
        self.emulator_memory = _EmulatorMemory(self)
        self.instructions = 0
        self.emulations = 0
        #: Intel PML: the hardware buffer (``None`` without PML) and the execution
        #: control, on while some memslot is dirty-logged (``vmx_update_cpu_dirty_logging``).
        self.pml: PmlBuffer | None = None
        self.pml_enabled = False
        self.pml_flushes = 0  #: non-empty ``vmx_flush_pml_buffer`` calls
        self.pml_full_exits = 0  #: ``EXIT_REASON_PML_FULL`` exits
        #: KVM's dirty ring of this vCPU (set by the dirty logger; needs ``soft_full``)
        #: and ``KVM_REQ_DIRTY_RING_SOFT_FULL``.
        self.dirty_ring: Any = None
        self.req_dirty_ring_soft_full = False
        self.dirty_ring_full_exits = 0  #: ``KVM_EXIT_DIRTY_RING_FULL`` exits

    # ---- paging state ---------------------------------------------------------
    @property
    def paging_mode(self) -> PagingMode:
        """Guest paging mode from CR0.PG, CR4.PAE and EFER.LMA."""
        cpu = self.cpu
        if not cpu.cr0 & _CR0_PG:
            raise GuestFault(13, 0, None)
        if cpu.efer & _EFER_LMA:
            return PagingMode.LONG
        return PagingMode.PAE if cpu.cr4 & _CR4_PAE else PagingMode.PT32

    def set_cr3(self, cr3: int) -> None:
        """``kvm_set_cr3``: new guest page tables, new shadow roots, TLB flushed."""
        self.cpu.cr3 = cr3
        with self.vm.mmu_lock:
            self.vm.mmu.new_pgd(self)

    def flush_tlb(self) -> None:
        """Drop every cached translation (a TLB flush reaching this vCPU)."""
        self.tlb_gen += 1
        self.rtlb.clear()
        self.wtlb.clear()

    def is_code_page(self, vpn: int) -> bool:
        return vpn in self.cache.code_pages()

    # ---- PML and dirty-ring requests ---------------------------------------------------
    def flush_pml_buffer(self) -> int:
        """``vmx_flush_pml_buffer``: mark every logged gpa dirty, oldest first; returns how many.

        KVM calls it at the start of every VM-exit; here: on exits to KVM's fault
        handler, on a PML-full exit, whenever :meth:`run` returns, and from
        ``kvm_arch_sync_dirty_log`` (a GET kicks the vCPUs).
        """
        pml = self.pml
        if pml is None or pml.empty:
            return 0
        gpas = pml.drain()
        self.pml_flushes += 1
        vm = self.vm
        for gpa in gpas:
            gfn = gpa >> PAGE_SHIFT
            slot = vm.memslots.gfn_to_memslot(gfn)
            if slot is not None:
                vm.mark_page_dirty(self, slot, gfn)  # kvm_vcpu_mark_page_dirty
        return len(gpas)

    def _dirty_ring_check_request(self) -> bool:
        """``kvm_dirty_ring_check_request``: exit to userspace while the ring is soft-full.

        The request is consumed, and re-raised when the ring is still soft-full,
        so every ``KVM_RUN`` exits again until a reset drains it.
        """
        self.req_dirty_ring_soft_full = False
        ring = self.dirty_ring
        if ring is not None and ring.soft_full:
            self.req_dirty_ring_soft_full = True
            self.dirty_ring_full_exits += 1
            return True
        return False

    # ---- TLB fill -------------------------------------------------------------------
    def fill(self, addr: int, write: bool) -> memoryview:
        """Translate ``addr`` for an access, handling exits to KVM; returns the page view.

        Raises :class:`NeedEmulation` when KVM decides to emulate.
        """
        vm = self.vm
        mmu = vm.mmu
        vpn = addr >> 12
        for _ in range(_FAULT_LOOP_LIMIT):
            if not mmu.tdp_enabled and (not self.roots or mmu.roots_obsolete(self)):
                with vm.mmu_lock:
                    mmu.load_roots(self)
            t = mmu.hw_translate(self, addr, write)
            if isinstance(t, PmlFull):
                # handle_pml_full: the exit drains the buffer; the access is retried.
                self.pml_full_exits += 1
                self.flush_pml_buffer()
                if self.req_dirty_ring_soft_full:
                    raise _DirtyRingRequest
                continue
            if isinstance(t, Translation):
                slot = t.slot
                off = (t.gfn - slot.base_gfn) << PAGE_SHIFT
                page = slot.mem[off : off + 4096]
                self.rtlb[vpn] = page
                if t.writable:
                    if vpn in self.cache.code_pages():
                        # Self-modifying code: drop the decoded instructions, keep
                        # the page out of the write TLB while code is cached on it.
                        self.cache.invalidate_page(vpn)
                    else:
                        self.wtlb[vpn] = page
                return page
            if self.pml is not None:
                self.flush_pml_buffer()  # vmx_handle_exit drains PML on every exit
            with vm.mmu_lock:
                r = mmu.page_fault(self, t.addr, t.error_code)
            if r == RET_PF_EMULATE:
                raise NeedEmulation(t.addr, t.error_code)
            if self.req_dirty_ring_soft_full:
                raise _DirtyRingRequest  # the faulting access has not retired (§7 case 35)
        raise RuntimeError(f"access to {addr:#x} keeps faulting")

    # ---- emulation (x86_emulate_instruction) --------------------------------------
    def _decode_at(self, rip: int) -> iced_x86.Instruction:
        return iced_x86.Decoder(64, self.emulator_memory.fetch(rip, 15), ip=rip).decode()

    def _mnemonic(self, rip: int) -> str:
        return _FORMATTER.format_mnemonic(self._decode_at(rip)).split()[-1]

    def _writes_page_tables(self, rip: int) -> bool:
        """``x86_page_table_writing_insn``: the emulator's ``PageTable`` instructions."""
        return self._decode_at(rip).mnemonic in _PAGE_TABLE_WRITERS

    def emulate(self, fault: NeedEmulation) -> object | None:
        """``x86_emulate_instruction`` for ``EMULTYPE_PF``: run the instruction in the emulator.

        With ``EMULTYPE_ALLOW_RETRY_PF`` (6.12), an instruction that is not a
        typical page-table write first tries unprotect-and-retry: if that zapped
        a shadow page, the guest simply re-executes it.
        """
        vm = self.vm
        cpu = self.cpu
        rip = cpu.rip
        if self.allow_retry_pf:
            self.allow_retry_pf = False
            if not self._writes_page_tables(rip):
                with vm.mmu_lock:
                    if vm.mmu.unprotect_gfn_and_retry(self, fault.addr, False):
                        return None
        vm.mmu.stats.insn_emulation += 1
        self.emulations += 1
        if vm.audit.debug:
            vm.audit.emit("emulate", "debug", vcpu=self.index, rip=rip, insn=self._mnemonic(rip))
        mem = self.emulator_memory
        fn = self.cache.get(rip, mem)
        try:
            return fn(cpu, mem)
        except EmulationFailure:
            # kvm_unprotect_and_retry_on_failure: if KVM's own shadow pages are
            # what write-protects the gfn, drop them and let the guest retry.
            vm.mmu.stats.insn_emulation_fail += 1
            with vm.mmu_lock:
                if vm.mmu.unprotect_gfn_and_retry(self, fault.addr, True):
                    return None
            raise

    # ---- KVM_RUN ----------------------------------------------------------------------
    def run(self, max_instructions: int | None = None) -> RunExit:
        """Execute until an exit the VMM must handle (``KVM_RUN``).

        A pending ``KVM_REQ_DIRTY_RING_SOFT_FULL`` is checked before guest code
        runs, after an exit handler marked pages dirty and after an emulated
        instruction (``vcpu_enter_guest`` → ``kvm_dirty_ring_check_request``).
        Every return is an exit, so the PML buffer is drained first.
        """
        if self.req_dirty_ring_soft_full and self._dirty_ring_check_request():
            return RunExit("dirty_ring_full")
        cpu = self.cpu
        mem = self.native
        table = self.cache.table
        decode = self._decode
        budget = -1 if max_instructions is None else max_instructions
        executed = 0
        try:
            while executed != budget:
                try:
                    fn = table.get(cpu.rip)
                    if fn is None:
                        fn = decode(cpu.rip)
                    r: object = fn(cpu, mem)
                except NeedEmulation as need:
                    r = self.emulate(need)
                    if self.req_dirty_ring_soft_full and r is None:
                        executed += 1
                        if self._dirty_ring_check_request():
                            return RunExit("dirty_ring_full")
                        continue
                except _DirtyRingRequest:
                    if self._dirty_ring_check_request():
                        return RunExit("dirty_ring_full")
                    continue
                executed += 1
                if r is None:
                    continue
                if isinstance(r, (PortOut, PortIn)):
                    return RunExit("io", r)
                if isinstance(r, Hlt):
                    return RunExit("hlt")
                if isinstance(r, MovToCr):
                    self._mov_to_cr(r)
                elif isinstance(r, Invlpg):
                    with self.vm.mmu_lock:
                        self.vm.mmu.invalidate_addr(self, r.addr)
            return RunExit("limit")
        except UnsupportedInstruction as exc:
            return RunExit("error", message=str(exc))
        except GuestPageFault as exc:
            return RunExit("error", message=f"{exc} at rip {cpu.rip:#x}")
        except GuestFault as exc:
            return RunExit("error", message=f"{exc} at rip {cpu.rip:#x}")
        except MmioAccess as exc:
            return RunExit("error", message=f"{exc} at rip {cpu.rip:#x}")
        except EmulationFailure as exc:
            return RunExit("error", message=f"emulation failure (KVM_EXIT_INTERNAL_ERROR): {exc} at rip {cpu.rip:#x}")
        finally:
            self.instructions += executed
            if self.pml is not None:
                self.flush_pml_buffer()

    def _decode(self, rip: int) -> Any:
        """Decode and cache the instruction at ``rip``; keep its pages out of the write TLB.

        A store to a page holding cached code must take the slow path, which
        drops the stale closures (self-modifying code).
        """
        fn = self.cache.get(rip, self.native)
        self.wtlb.pop(rip >> 12, None)
        self.wtlb.pop(((rip + 14) & _MASK64) >> 12, None)
        return fn

    def _mov_to_cr(self, r: MovToCr) -> None:
        """``kvm_set_cr0`` / ``kvm_set_cr3`` / ``kvm_set_cr4``: reload the MMU context."""
        if r.cr == 3:
            with self.vm.mmu_lock:
                self.vm.mmu.new_pgd(self)
        else:
            with self.vm.mmu_lock:
                self.vm.mmu.load_roots(self)
            self.flush_tlb()
