"""Helpers for the dirty-log tests: a logged guest of the program ABI, stepped round by round."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pagetrack
from pagetrack.emulator import PortOut
from pagetrack.memory import KVM_MEM_LOG_DIRTY_PAGES, PAGE_SHIFT, MemSlot
from pagetrack.mmu import SPTE_D, SPTE_W
from pagetrack.plugins.dirty_log import logger_of
from pagetrack.program import (
    CODE_BASE,
    DATA_BASE,
    DATA_GFN,
    LOW_SIZE,
    ROUND_PORT,
    assemble,
    build_page_tables,
)
from pagetrack.runner import reset_vcpu

__all__ = ["DATA_GFN", "LoggedGuest", "Tracker", "make_vm", "programs_dir", "spte", "tdp_counts"]


class Tracker:
    """An external write tracker that records ``track_write`` calls (enables write tracking)."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []

    @pagetrack.hookimpl
    def track_write(self, gpa: int, new: bytes) -> None:
        self.writes.append((gpa, bytes(new)))


def programs_dir() -> Path:
    """../shared/programs next to the checkout, or $PAGETRACK_PROGRAMS."""
    env = os.environ.get("PAGETRACK_PROGRAMS")
    if env:
        return Path(env)
    for parent in Path(__file__).resolve().parents:
        cand = parent.parent / "shared" / "programs"
        if cand.is_dir():
            return cand
    return Path("/work/shared/programs")


def make_vm(mode: str = "bitmap", tdp: bool = True, *, host_huge_pages: bool = False,
            **options: Any) -> pagetrack.VM:
    """A VM with only the built-in plugins, strict plugin errors, dirty_log in ``mode``."""
    return pagetrack.VM(tdp=tdp, enable=("shadow_mmu", "dirty_log"), strict=True,
                        host_huge_pages=host_huge_pages,
                        options={"dirty_log": {"mode": mode, **options}})


def spte(vm: pagetrack.VM, gfn: int) -> int:
    """The TDP leaf mapping ``gfn`` (0 if none)."""
    found = vm.mmu.tdp.lookup(gfn)
    return 0 if found is None else found[1]


def tdp_counts(vm: pagetrack.VM) -> dict[int, int]:
    """``pages_4k`` / ``pages_2m`` / ``pages_1g`` of the TDP map."""
    return vm.mmu.tdp.counts()


class LoggedGuest:
    """A 64-bit guest of the program ABI whose two memslots may log dirty pages.

    ``log=False`` creates the slots without ``KVM_MEM_LOG_DIRTY_PAGES`` (enable
    it later with ``vm.enable_dirty_logging``).  :meth:`step` runs to the next
    round boundary and harvests it as the runner does.
    """

    def __init__(self, source: str, *, mode: str = "bitmap", tdp: bool = True, data_size: int = 1 << 20,
                 log: bool = True, host_huge_pages: bool = False, vm: pagetrack.VM | None = None,
                 defines: dict[str, int] | None = None, **options: Any) -> None:
        self.vm = vm if vm is not None else make_vm(mode, tdp, host_huge_pages=host_huge_pages, **options)
        vm = self.vm
        flags = KVM_MEM_LOG_DIRTY_PAGES if log else 0
        vm.add_memory(0, LOW_SIZE, flags=flags, slot=0)
        vm.add_memory(DATA_BASE, data_size, flags=flags, slot=1)
        self.layout = build_page_tables(data_size, self._poke_u64)
        self.program = assemble(source, defines=defines, data_size=data_size)
        self._poke(CODE_BASE, self.program.code)
        self.vcpu = vm.create_vcpu()
        reset_vcpu(self.vcpu, self.layout, data_size)
        self.logger = logger_of(vm)
        self.exits: list[str] = []

    @property
    def low(self) -> MemSlot:
        """The low slot as it is now (a flags change installs a new MemSlot)."""
        slot = self.vm.memslots.get(0, 0)
        assert slot is not None
        return slot

    @property
    def data(self) -> MemSlot:
        slot = self.vm.memslots.get(0, 1)
        assert slot is not None
        return slot

    # the VMM writes through its own mapping: no KVM, no dirty bit
    def _poke(self, gpa: int, data: bytes) -> None:
        slot = self.vm.memslots.gfn_to_memslot(gpa >> PAGE_SHIFT)
        assert slot is not None
        off = gpa - (slot.base_gfn << PAGE_SHIFT)
        slot.mem[off : off + len(data)] = data
        for g in range(gpa >> PAGE_SHIFT, ((gpa + len(data) - 1) >> PAGE_SHIFT) + 1):
            self.vm.host.populated.add(slot.hva_page(g))

    def _poke_u64(self, gpa: int, value: int) -> None:
        self._poke(gpa, value.to_bytes(8, "little"))

    def start(self) -> None:
        self.logger.start(self.vm)

    def run(self, budget: int | None = None, collect_on_full: bool = True) -> str:
        """Run until ``round``, ``hlt``, ``limit``, ``dirty_ring_full`` (if not collected) or an error.

        ``budget`` counts guest instructions over the whole call (ring-full re-entries included).
        """
        start = self.vcpu.instructions
        while True:
            left = None if budget is None else budget - (self.vcpu.instructions - start)
            ex = self.vcpu.run(left)
            self.exits.append(ex.kind)
            if ex.kind == "dirty_ring_full" and collect_on_full:
                self.logger.collect(self.vm)
                continue
            if ex.kind == "io" and isinstance(ex.exit, PortOut):
                if ex.exit.port == ROUND_PORT:
                    return "round"
                continue
            if ex.kind in ("hlt", "limit", "dirty_ring_full"):
                return ex.kind
            raise AssertionError(f"guest stopped: {ex.kind} {ex.message}")

    def harvest(self) -> list[int]:
        """Close a round; the data slot's gfns."""
        return self.logger.harvest(self.vm)[self.data.key]

    def step(self) -> tuple[str, list[int]]:
        """Run to the next boundary and harvest it."""
        why = self.run()
        return why, self.harvest()

    def page(self, rel: int) -> bytes:
        """Data page ``rel`` as the VMM reads it."""
        off = rel << PAGE_SHIFT
        return bytes(self.data.mem[off : off + 4096])

    def data_spte(self, rel: int) -> int:
        return spte(self.vm, DATA_GFN + rel)

    def writable_dirty(self, rel: int) -> tuple[bool, bool]:
        s = self.data_spte(rel)
        return bool(s & SPTE_W), bool(s & SPTE_D)

    def close(self) -> None:
        self.vm.close()
