"""Run a guest program of the ABI on a simulated VM and report what KVM would have logged.

This is the VMM side (what QEMU does around ``KVM_RUN``): two dirty-logged
memslots, page tables and code written into guest memory through the VMM's own
mapping, one vCPU, and a loop that handles port I/O — ``ROUND_PORT`` ends a
dirty-log round, other ports are recorded — until ``hlt``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from . import hookimpl
from .emulator import PortOut
from .errors import InputError
from .memory import KVM_MEM_LOG_DIRTY_PAGES, PAGE_SHIFT, MemSlot
from .program import (
    CODE_BASE,
    DATA_BASE,
    DEFAULT_DATA_SIZE,
    LOW_SIZE,
    ROUND_PORT,
    STACK_TOP,
    PageTableLayout,
    Program,
    build_page_tables,
)
from .vm import VM

if TYPE_CHECKING:
    from .vcpu import Vcpu

__all__ = [
    "SLICE_INSTRUCTIONS",
    "GfnRangeTracker",
    "GuestExit",
    "Progress",
    "VmSetup",
    "counters",
    "load_guest",
    "parse_gfn_range",
    "reset_vcpu",
    "result_of",
    "run_guest",
    "run_program",
    "setup_vm",
]

DEFAULT_MAX_INSTRUCTIONS = 200_000_000
#: Instructions per ``vcpu.run`` slice when a progress display is watching.
SLICE_INSTRUCTIONS = 1_000_000


def parse_gfn_range(text: str) -> tuple[int, int]:
    """Parse ``GFN`` or ``GFN-GFN`` (hex with 0x, or decimal), inclusive."""
    first, sep, last = text.partition("-")
    try:
        lo = int(first.strip(), 0)
        hi = int(last.strip(), 0) if sep else lo
    except ValueError:
        raise InputError(f"--track {text!r}: expected GFN or GFN-GFN (decimal or 0x hex)") from None
    if lo < 0 or hi < lo:
        raise InputError(f"--track {text!r}: empty or negative range")
    return lo, hi


class GfnRangeTracker:
    """An external tracker for ``--track``: holds a count on each gfn of some ranges.

    It registers like any external user (``kvm_page_track_register_notifier``),
    adds its gfns with ``kvm_write_track_add_gfn``, counts the notifications
    that hit them, and forgets gfns whose slot is removed.
    """

    def __init__(self, ranges: Iterable[tuple[int, int]]) -> None:
        self.ranges = list(ranges)
        self.gfns: set[int] = set()
        self.writes = 0
        self.bytes = 0

    def attach(self, vm: VM) -> None:
        vm.register_tracker(self, "track")
        for lo, hi in self.ranges:
            for gfn in range(lo, hi + 1):
                vm.write_track_add_gfn(gfn)
                self.gfns.add(gfn)

    @hookimpl
    def track_write(self, gpa: int, new: bytes) -> None:
        if gpa >> PAGE_SHIFT in self.gfns:
            self.writes += 1
            self.bytes += len(new)

    @hookimpl
    def track_remove_region(self, gfn: int, nr_pages: int) -> None:
        self.gfns.difference_update(range(gfn, gfn + nr_pages))


def _poke(vm: VM, gpa: int, data: bytes) -> None:
    """The VMM writing guest memory through its own mapping (no KVM involved)."""
    slot = vm.memslots.gfn_to_memslot(gpa >> PAGE_SHIFT)
    assert slot is not None
    off = gpa - (slot.base_gfn << PAGE_SHIFT)
    slot.mem[off : off + len(data)] = data
    first = slot.hva_page(gpa >> PAGE_SHIFT)
    vm.host.populated.update(range(first, first + ((gpa + len(data) - 1) >> PAGE_SHIFT) - (gpa >> PAGE_SHIFT) + 1))


@attrs.define(eq=False)
class VmSetup:
    """What :func:`setup_vm` built: the VM, its first vCPU, the two memslots, the guest page tables."""

    vm: VM
    vcpu: Vcpu
    low: MemSlot
    data: MemSlot
    layout: PageTableLayout
    tracker: GfnRangeTracker | None = None

    @property
    def vcpus(self) -> list[Vcpu]:
        """Every vCPU of the VM, ``vcpu`` first."""
        return list(self.vm.vcpus)


def reset_vcpu(vcpu: Vcpu, layout: PageTableLayout, data_size: int) -> None:
    """Put ``vcpu`` in the ABI's entry state (``KVM_SET_REGS`` / ``KVM_SET_SREGS``).

    Every GPR zero except RSP = ``STACK_TOP``, RDI = ``DATA_BASE``, RSI = the
    data size; RIP = ``CODE_BASE``; RFLAGS its reset value 0x2; CR3 the
    identity-mapping tables (``kvm_set_cr3``: new roots, TLB flushed).
    """
    cpu = vcpu.cpu
    cpu.regs[:] = [0] * 16
    cpu.rip = CODE_BASE
    cpu.regs[4] = STACK_TOP
    cpu.regs[7] = DATA_BASE
    cpu.regs[6] = data_size
    cpu.set_rflags(0x2)  # the reset value: only the fixed bit 1
    vcpu.set_cr3(layout.cr3)


def setup_vm(
    data_size: int = DEFAULT_DATA_SIZE,
    code: bytes = b"",
    *,
    tdp: bool = True,
    track: Iterable[tuple[int, int]] = (),
    audit: str | os.PathLike[str] | None = None,
    audit_level: str = "info",
    plugins: Iterable[object] = (),
    options: Mapping[str, Mapping[str, Any]] | None = None,
    vcpus: int = 1,
    enable: Collection[str] | None = None,
    disable: Collection[str] = (),
) -> VmSetup:
    """The VMM's set-up before the first ``KVM_RUN``, as the guest ABI wants it.

    Two dirty-logged memslots (``KVM_SET_USER_MEMORY_REGION`` with
    ``KVM_MEM_LOG_DIRTY_PAGES``: ``low`` and ``data`` of ``data_size`` bytes),
    identity-mapping page tables and ``code`` written through the VMM's own
    mapping, the ``--track`` tracker if any ranges are given, and ``vcpus``
    vCPUs (``KVM_CREATE_VCPU``) at the ABI's entry state.  ``enable`` /
    ``disable`` choose the entry-point plugins (see :class:`~pagetrack.VM`).
    The VM is closed if any step fails.
    """
    track = list(track)
    if vcpus < 1:
        raise InputError(f"a VM needs at least one vCPU, not {vcpus}")
    vm = VM(tdp=tdp, audit=audit, audit_level=audit_level, plugins=plugins, options=options,
            enable=enable, disable=disable)
    try:
        low = vm.add_memory(0, LOW_SIZE, flags=KVM_MEM_LOG_DIRTY_PAGES, slot=0)
        data = vm.add_memory(DATA_BASE, data_size, flags=KVM_MEM_LOG_DIRTY_PAGES, slot=1)
        layout = build_page_tables(data_size, lambda gpa, v: _poke(vm, gpa, v.to_bytes(8, "little")))
        if code:
            _poke(vm, CODE_BASE, code)
        tracker = None
        if track:
            tracker = GfnRangeTracker(track)
            tracker.attach(vm)
        for _ in range(vcpus):
            reset_vcpu(vm.create_vcpu(), layout, data_size)
    except BaseException:
        vm.close()
        raise
    return VmSetup(vm, vm.vcpus[0], low, data, layout, tracker)


def load_guest(env: VmSetup, program: Program) -> None:
    """Load another program into a VM that already ran one, and reset vCPU 0 to the entry state.

    The VMM writes the code through its own mapping (no dirty marking, no
    tracker sees it, as with a QEMU write to guest RAM), drops vCPU 0's decoded
    instructions (the simulator's stand-in for the coherent instruction cache
    of real hardware) and sets the ABI's registers.  The program must fit the
    VM's data slot.
    """
    if program.data_size > env.data.npages << PAGE_SHIFT:
        raise InputError(f"needs a data slot of {program.data_size >> 20} MiB; this VM has "
                         f"{env.data.npages >> 8} MiB", program.name)
    _poke(env.vm, CODE_BASE, program.code)
    env.vcpu.cache.clear()
    env.vcpu.flush_tlb()
    reset_vcpu(env.vcpu, env.layout, env.data.npages << PAGE_SHIFT)


#: A progress callback: ``progress(instructions, rounds)`` — instructions executed
#: and rounds closed so far by the run that calls it.
Progress = Callable[[int, int], None]


@attrs.define
class GuestExit:
    """How :func:`run_guest` ended: ``exit`` is ``"hlt"`` or an error text."""

    exit: str
    io: list[int]
    rounds: int  #: rounds closed by the run (``ROUND_PORT`` exits, plus the last one)
    instructions: int  #: instructions executed by the run


def run_guest(
    env: VmSetup,
    *,
    max_instructions: int = DEFAULT_MAX_INSTRUCTIONS,
    progress: Progress | None = None,
    slice_instructions: int = SLICE_INSTRUCTIONS,
    first_round: int = 0,
) -> GuestExit:
    """``KVM_RUN`` vCPU 0 until ``hlt``, an error or ``max_instructions``, handling its exits.

    ``ROUND_PORT`` ends a dirty-log round (the ``round_end`` hook, which the
    dirty logger harvests on); other port writes go to ``guest_port_io`` and,
    unclaimed, into ``io``; port reads are answered by ``guest_port_io`` (all
    ones when unclaimed); ``KVM_EXIT_DIRTY_RING_FULL`` reaps the rings into the
    current round.  The last round is closed at the end.  The vCPU runs in
    slices of ``slice_instructions`` and ``progress`` is called between them
    and at every round end.  ``first_round`` numbers the rounds for the hook
    when the VM ran other guests before.  The logger must have been started.
    """
    from pagetrack.plugins.dirty_log import logger_of

    vm, vcpu = env.vm, env.vcpu
    cpu = vcpu.cpu
    logger = logger_of(vm)
    io: list[int] = []
    closed = 0
    start = vcpu.instructions
    exit_text = "hlt"
    while True:
        done = vcpu.instructions - start
        left = max_instructions - done
        ex = vcpu.run(min(left, slice_instructions) if progress is not None else left)
        if ex.kind == "io":
            port_exit = ex.exit
            if isinstance(port_exit, PortOut):
                if port_exit.port == ROUND_PORT:
                    vm.hooks.round_end(vm, vcpu, first_round + closed, False)
                    closed += 1
                    if progress is not None:
                        progress(vcpu.instructions - start, closed)
                    continue
                claimed = vm.hooks.guest_port_io(vm, vcpu, port_exit.port, port_exit.size, port_exit.value, True)
                if claimed is None:
                    io.append(port_exit.value & ((1 << (8 * port_exit.size)) - 1))
            else:
                value = vm.hooks.guest_port_io(vm, vcpu, port_exit.port, port_exit.size, 0, False)
                port_exit.complete(cpu, (1 << (8 * port_exit.size)) - 1 if value is None else value)
            continue
        if ex.kind == "dirty_ring_full":  # KVM_EXIT_DIRTY_RING_FULL: reap into this round, re-enter
            logger.collect(vm)
            continue
        if ex.kind == "limit" and vcpu.instructions - start < max_instructions:
            assert progress is not None
            progress(vcpu.instructions - start, closed)  # a slice ended: show where we are
            continue
        if ex.kind == "hlt":
            exit_text = "hlt"
        elif ex.kind == "limit":
            exit_text = f"instruction limit of {max_instructions} reached at rip {cpu.rip:#x}"
        else:
            exit_text = ex.message
        vm.hooks.round_end(vm, vcpu, first_round + closed, True)
        closed += 1
        break
    if progress is not None:
        progress(vcpu.instructions - start, closed)
    return GuestExit(exit_text, io, closed, vcpu.instructions - start)


def counters(env: VmSetup) -> dict[str, int]:
    """The run's counters: the MMU's and vCPUs' KVM stats, plus the ``--track`` tracker's writes."""
    stats = env.vm.mmu.stats
    tracker = env.tracker
    return {
        "instructions": sum(v.instructions for v in env.vm.vcpus),
        "faults": stats.pf_taken,
        "fast_path_fixes": stats.pf_fast,
        "emulations": stats.insn_emulation,
        "track_write_calls": stats.track_write_calls,
        "tracked_writes": tracker.writes if tracker else 0,
        "zaps": stats.mmu_shadow_zapped,
        "tlb_flushes": stats.remote_tlb_flush,
        **{f"kvm.{k}": v for k, v in stats.as_dict().items()},
    }


def run_program(
    program: Program,
    *,
    tdp: bool = True,
    track: Iterable[tuple[int, int]] = (),
    audit: str | os.PathLike[str] | None = None,
    audit_level: str = "info",
    plugins: Iterable[object] = (),
    options: Mapping[str, Mapping[str, Any]] | None = None,
    max_instructions: int = DEFAULT_MAX_INSTRUCTIONS,
    vm_hook: Any = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run ``program`` and return the JSON contract of DESIGN.md.

    Keys: ``rounds`` / ``low_rounds`` (sorted absolute gfns dirtied per round in
    the data / low slot), ``exit`` (``"hlt"`` or an error), ``io`` (values sent
    to ports other than ``ROUND_PORT``), ``regs``, and ``counters``.
    ``vm_hook(vm, vcpu)``, if given, runs after set-up and before the guest.
    ``progress(instructions, rounds)``, if given, is called about every
    :data:`SLICE_INSTRUCTIONS` instructions and at every round end.
    """
    env = setup_vm(program.data_size, program.code, tdp=tdp, track=track, audit=audit,
                   audit_level=audit_level, plugins=plugins, options=options)
    vm = env.vm
    try:
        if vm_hook is not None:
            vm_hook(vm, env.vcpu)
        from pagetrack.plugins.dirty_log import logger_of

        logger = logger_of(vm)
        logger.start(vm)
        run = run_guest(env, max_instructions=max_instructions, progress=progress)
        return result_of(env, run)
    finally:
        vm.close()


def result_of(env: VmSetup, run: GuestExit) -> dict[str, Any]:
    """The JSON contract of DESIGN.md for a VM after ``run`` (see :func:`run_program`)."""
    from pagetrack.plugins.dirty_log import logger_of

    vm = env.vm
    logger = logger_of(vm)
    result: dict[str, Any] = {
        "rounds": logger.rounds_of(env.data.key),
        "low_rounds": logger.rounds_of(env.low.key),
        "exit": run.exit,
        "io": run.io,
        "regs": env.vcpu.cpu.dump(),
        "mode": logger.mode,
        "paging": "tdp" if vm.tdp else "shadow",
        "round_stats": logger.round_stats,
        "counters": counters(env),
    }
    if vm.audit.path is not None:
        result["audit_log"] = str(vm.audit.path)
    return result
