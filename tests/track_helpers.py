"""Shared helpers of the page-track conformance tests (spec/kvm-page-track.md §7).

Imported as ``track_helpers`` by the tests in ``tests/``, ``tests/mmu`` and
``tests/plugins`` (the conftest.py of the sub-folders puts this folder on
``sys.path``).  Nothing here asserts anything: helpers build VMs, guests and
shadow-page topologies; the tests check the behaviour.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import pagetrack
from pagetrack import VM
from pagetrack.audit import AuditLog
from pagetrack.emulator import PortOut
from pagetrack.memory import PAGE_SHIFT, PAGE_SIZE, MemSlot
from pagetrack.mmu import Role, ShadowPage
from pagetrack.mmu.paging import PFERR_PRESENT, PFERR_WRITE
from pagetrack.program import (
    CODE_BASE,
    DATA_BASE,
    DATA_GFN,
    LOW_SIZE,
    PageTableLayout,
    assemble,
    build_page_tables,
)
from pagetrack.runner import reset_vcpu

__all__ = [
    "CODE_BASE",
    "DATA_BASE",
    "DATA_GFN",
    "PAGE_SIZE",
    "PF_READ",
    "PF_WRITE_NP",
    "PF_WRITE_P",
    "Guest",
    "Recorder",
    "build_chain",
    "make_vm",
    "poke_u64",
    "slot_of",
]

PF_WRITE_P = PFERR_PRESENT | PFERR_WRITE  #: write to a present, read-only translation
PF_WRITE_NP = PFERR_WRITE  #: write to a not-present translation
PF_READ = 0  #: read of a not-present translation


class Recorder:
    """An external tracker (a notifier node) that records what it is told.

    ``writes`` holds ``(gpa, bytes)`` per ``track_write`` in call order;
    ``log`` (optional, shared between recorders) gets ``(name, hook, args)``.
    """

    def __init__(self, name: str = "rec", log: list[Any] | None = None) -> None:
        self.name = name
        self.log = log if log is not None else []
        self.writes: list[tuple[int, bytes]] = []
        self.removed: list[tuple[int, int]] = []
        self.flushed: list[tuple[int, int]] = []

    @pagetrack.hookimpl
    def track_write(self, vm: Any, gpa: int, new: bytes) -> None:
        self.writes.append((gpa, bytes(new)))
        self.log.append((self.name, "track_write", gpa, vm.mmu.stats.mmu_pte_write))

    @pagetrack.hookimpl
    def track_remove_region(self, gfn: int, nr_pages: int) -> None:
        self.removed.append((gfn, nr_pages))
        self.log.append((self.name, "track_remove_region", gfn, nr_pages))

    @pagetrack.hookimpl
    def track_flush_slot(self, slot: MemSlot) -> None:
        self.flushed.append((slot.base_gfn, slot.npages))
        self.log.append((self.name, "track_flush_slot", slot.base_gfn, slot.npages))


def make_vm(tdp: bool = True, *, plugins: Iterable[object] = (), audit: AuditLog | None = None,
            **kwargs: Any) -> VM:
    """A VM with only the built-in plugins (shadow_mmu, dirty_log) and strict plugin errors."""
    return VM(tdp=tdp, plugins=plugins, audit=audit, enable=("shadow_mmu", "dirty_log"),
              strict=True, **kwargs)


def slot_of(vm: VM, gfn: int, as_id: int = 0) -> MemSlot:
    slot = vm.memslots.gfn_to_memslot(gfn, as_id)
    assert slot is not None, f"gfn {gfn:#x} has no slot"
    return slot


def poke_u64(vm: VM, gpa: int, value: int) -> None:
    """The VMM writes guest memory through its own mapping (no KVM, no notification)."""
    vm.write_guest(gpa, value.to_bytes(8, "little"))


class Guest:
    """A 64-bit guest of the program ABI on a hand-built VM, kept open for inspection.

    ``io`` collects ``(port, value)`` of every ``out``; :meth:`run` returns the
    exit text (``"hlt"`` or the error message).
    """

    def __init__(self, source: str, *, tdp: bool, data_size: int = 2 << 20,
                 plugins: Iterable[object] = (), audit: AuditLog | None = None,
                 defines: dict[str, int] | None = None, vm: VM | None = None) -> None:
        self.vm = vm if vm is not None else make_vm(tdp, plugins=plugins, audit=audit)
        vm = self.vm
        self.low = vm.add_memory(0, LOW_SIZE, slot=0)
        self.data = vm.add_memory(DATA_BASE, data_size, slot=1)
        self.layout: PageTableLayout = build_page_tables(data_size, lambda gpa, v: poke_u64(vm, gpa, v))
        self.program = assemble(source, defines=defines, data_size=data_size)
        vm.write_guest(CODE_BASE, self.program.code)
        self.vcpu = vm.create_vcpu()
        reset_vcpu(self.vcpu, self.layout, data_size)
        self.io: list[tuple[int, int]] = []

    @staticmethod
    def symbols(data_size: int = 2 << 20) -> dict[str, int]:
        """Addresses of the guest page tables, for ``defines=``: PML4, PDPT, PD, PT_DATA, PT_LOW."""
        layout = build_page_tables(data_size, lambda gpa, v: None)
        return {
            "PML4": layout.pages[0],
            "PDPT": layout.pages[1],
            "PD": layout.pages[2],
            "PT_LOW": layout.pt_page_of(0x1000),
            "PT_DATA": layout.pt_page_of(DATA_BASE),
        }

    def run(self, max_instructions: int = 100_000) -> str:
        while True:
            ex = self.vcpu.run(max_instructions)
            if ex.kind == "io" and isinstance(ex.exit, PortOut):
                self.io.append((ex.exit.port, ex.exit.value & ((1 << (8 * ex.exit.size)) - 1)))
                continue
            if ex.kind == "hlt":
                return "hlt"
            return ex.message or ex.kind

    def values(self, port: int = 0x11) -> list[int]:
        return [v for p, v in self.io if p == port]

    def gpa_to_gfn(self, gpa: int) -> int:
        return gpa >> PAGE_SHIFT


def build_chain(vm: VM, gfns: tuple[int, int, int, int], *, level1_quadrant: int = 0,
                four_byte: bool = False) -> list[ShadowPage]:
    """Allocate indirect shadow pages L4 → L3 → L2 → L1 for guest tables ``gfns`` and link them.

    Each child is linked at index 0 of its parent.  Returns ``[L4, L3, L2, L1]``.
    """
    shadow = vm.mmu.shadow
    pages = []
    for level, gfn in zip((4, 3, 2, 1), gfns, strict=True):
        role = Role(level=level, has_4_byte_gpte=four_byte,
                    quadrant=level1_quadrant if level == 1 else 0)
        pages.append(shadow.alloc_shadow_page(gfn, role))
    for parent, child in itertools.pairwise(pages):
        shadow.link_shadow_page(parent, 0, child)
    return pages
