"""Guest workloads for the migration model: seeded store traces, and guest programs.

A workload runs the guest for a slice of *guest* time: ``run(vm, vcpu, seconds)``.
The trace workloads generate the slice's stores with numpy
(``trace(seconds, data_size)`` → gpas and values in the data slot) and replay
them through the MMU (:func:`pagetrack.replay.replay`):

* :class:`Sequential` — pages in order, one 8-byte store at the start of each,
  wrapping around (the guest loop of ``dirty_log_perf_test`` / memstress);
* :class:`Uniform` — random pages;
* :class:`HotSet` — a hot fraction of the pages gets most of the stores;
* :class:`Zipf` — page popularity follows a Zipf law;
* :class:`FixedRate` — a fixed number of distinct pages dirtied per second.

Rates are per second of guest time; a slice's count carries its fraction to
the next slice, so slices add up exactly.  :class:`ProgramWorkload` runs a
guest program of the ABI instead: a slice ends at the program's next
``ROUND_PORT`` exit.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Protocol

import attrs
import numpy as np
from pagetrack.emulator import PortOut
from pagetrack.errors import InputError
from pagetrack.program import DATA_BASE, ROUND_PORT, Program
from pagetrack.replay import ReplayStats, replay

from . import logger_of

__all__ = [
    "WORKLOADS",
    "FixedRate",
    "HotSet",
    "ProgramWorkload",
    "Sequential",
    "Trace",
    "TraceWorkload",
    "Uniform",
    "Workload",
    "Zipf",
    "make_workload",
    "vmm_exit",
]

PAGE_SIZE = 4096


@attrs.frozen
class Trace:
    """One slice of stores: ``gpas`` (int64, 8-byte aligned) and ``values`` (uint64)."""

    gpas: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.gpas)


class Workload(Protocol):
    """What the migration model drives: the guest, for ``seconds`` of guest time."""

    name: str

    def run(self, vm: Any, vcpu: Any, seconds: float) -> ReplayStats: ...


@attrs.define
class TraceWorkload:
    """Base of the trace workloads: ``rate`` stores per second of guest time, seeded.

    Subclasses pick the pages (``_pages``); offsets in a page are random
    8-byte slots, values a running store counter.
    """

    rate: float = 1e6
    seed: int = 0
    base: int = DATA_BASE
    name: ClassVar[str] = "trace"
    _rng: np.random.Generator = attrs.field(init=False, repr=False)
    _carry: float = attrs.field(default=0.0, init=False, repr=False)
    _count: int = attrs.field(default=0, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if not (math.isfinite(self.rate) and self.rate >= 0):
            raise InputError(f"{self.name}: rate must be a finite number >= 0, not {self.rate!r}")
        self._rng = np.random.default_rng(self.seed)

    def _take(self, seconds: float) -> int:
        """How many events fall in a slice of ``seconds`` (fractions carried over)."""
        if seconds < 0:
            raise InputError(f"negative guest time {seconds!r}")
        total = self._carry + self.rate * seconds
        n = int(total)
        self._carry = total - n
        return n

    def _pages(self, n: int, npages: int) -> np.ndarray:
        raise NotImplementedError

    def _offsets(self, n: int) -> np.ndarray:
        return self._rng.integers(0, PAGE_SIZE // 8, n, dtype=np.int64) * 8

    def trace(self, seconds: float, data_size: int) -> Trace:
        """The stores of the next ``seconds`` of guest time in a data slot of ``data_size`` bytes."""
        npages = data_size // PAGE_SIZE
        if npages <= 0:
            raise InputError(f"data size {data_size} is smaller than a page")
        n = self._take(seconds)
        pages = self._pages(n, npages).astype(np.int64, copy=False)
        gpas = self.base + pages * PAGE_SIZE + self._offsets(len(pages))
        values = np.arange(self._count + 1, self._count + len(pages) + 1, dtype=np.uint64)
        self._count += len(pages)
        return Trace(gpas, values)

    def run(self, vm: Any, vcpu: Any, seconds: float) -> ReplayStats:
        """Generate the slice's trace for the VM's data slot and replay it."""
        slot = vm.memslots.gfn_to_memslot(self.base >> 12)
        if slot is None:
            raise InputError(f"{self.name}: no memslot at {self.base:#x}")
        t = self.trace(seconds, (slot.end_gfn << 12) - self.base)
        return replay(vm, vcpu, t.gpas, t.values, on_exit=lambda exc: vmm_exit(vm, vcpu))


@attrs.define
class Sequential(TraceWorkload):
    """One store per page, pages in order, wrapping (memstress's sequential pass, spec §3.3)."""

    name: ClassVar[str] = "sequential"
    _next: int = attrs.field(default=0, init=False, repr=False)

    def _pages(self, n: int, npages: int) -> np.ndarray:
        pages = (self._next + np.arange(n, dtype=np.int64)) % npages
        self._next = (self._next + n) % npages
        return pages

    def _offsets(self, n: int) -> np.ndarray:
        return np.zeros(n, dtype=np.int64)  # memstress writes the first 8 bytes of each page


@attrs.define
class Uniform(TraceWorkload):
    """Pages drawn uniformly at random."""

    name: ClassVar[str] = "uniform"

    def _pages(self, n: int, npages: int) -> np.ndarray:
        return self._rng.integers(0, npages, n, dtype=np.int64)


def _permutation(seed: int, npages: int) -> np.ndarray:
    """A fixed shuffle of the pages (which pages are hot does not depend on the slice)."""
    return np.random.default_rng([seed, npages]).permutation(npages)


@attrs.define
class HotSet(TraceWorkload):
    """``hot_share`` of the stores go to a random ``hot_fraction`` of the pages, the rest to the others."""

    hot_fraction: float = 0.05
    hot_share: float = 0.99
    name: ClassVar[str] = "hotset"

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if not (0 < self.hot_fraction <= 1 and 0 <= self.hot_share <= 1):
            raise InputError("hotset: hot_fraction must be in (0, 1] and hot_share in [0, 1]")

    def _pages(self, n: int, npages: int) -> np.ndarray:
        perm = _permutation(self.seed, npages)
        nhot = max(1, round(npages * self.hot_fraction))
        ncold = npages - nhot
        hot = self._rng.random(n) < (self.hot_share if ncold else 1.0)
        idx = np.empty(n, dtype=np.int64)
        idx[hot] = self._rng.integers(0, nhot, int(hot.sum()))
        idx[~hot] = nhot + self._rng.integers(0, max(ncold, 1), int(n - hot.sum()))
        return perm[idx]


@attrs.define
class Zipf(TraceWorkload):
    """Page of popularity rank k (from 1) is written with probability ∝ 1 / k**s."""

    s: float = 1.1
    name: ClassVar[str] = "zipf"
    _cdf: np.ndarray | None = attrs.field(default=None, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if not (math.isfinite(self.s) and self.s > 0):
            raise InputError("zipf: exponent s must be > 0")

    def _pages(self, n: int, npages: int) -> np.ndarray:
        if self._cdf is None or len(self._cdf) != npages:
            weights = 1.0 / np.arange(1, npages + 1, dtype=np.float64) ** self.s
            self._cdf = np.cumsum(weights) / weights.sum()
        rank = np.minimum(np.searchsorted(self._cdf, self._rng.random(n), side="right"), npages - 1)
        return _permutation(self.seed, npages)[rank]


@attrs.define
class FixedRate(TraceWorkload):
    """``rate`` distinct pages dirtied per second of guest time, ``stores_per_page`` stores each.

    The pages of consecutive slices follow one fixed shuffle of the data slot,
    so a slice dirties ``min(rate × seconds, pages)`` distinct pages.
    """

    rate: float = 10_000.0
    stores_per_page: int = 1
    name: ClassVar[str] = "fixed_rate"
    _next: int = attrs.field(default=0, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if self.stores_per_page < 1:
            raise InputError("fixed_rate: stores_per_page must be >= 1")

    def _pages(self, n: int, npages: int) -> np.ndarray:
        n = min(n, npages)
        perm = _permutation(self.seed, npages)
        pages = perm[(self._next + np.arange(n, dtype=np.int64)) % npages]
        self._next = (self._next + n) % npages
        if self.stores_per_page > 1:
            pages = self._rng.permutation(np.repeat(pages, self.stores_per_page))
        return pages


@attrs.define
class ProgramWorkload:
    """A guest program of the ABI; each slice runs it to its next ``ROUND_PORT`` exit.

    ``ROUND_PORT`` is where the migration thread syncs the dirty log
    (``migration_bitmap_sync``), in place of the VMM's ``round_end`` harvest.
    With ``ips`` (instructions per second of guest time) a slice also ends
    when its share of instructions is used, so the throttle slows the guest;
    without it a slice is one program round whatever its length.  After
    ``hlt`` (or an error, kept in ``exit``) the guest is idle.
    """

    program: Program
    ips: float | None = None
    max_instructions: int = 50_000_000
    exit: str | None = None
    io: list[int] = attrs.field(factory=list)
    rounds: int = 0

    @property
    def name(self) -> str:
        return self.program.name

    def run(self, vm: Any, vcpu: Any, seconds: float) -> ReplayStats:
        """``KVM_RUN`` until the program's round ends; counts instructions as ``stores``."""
        if self.exit is not None:
            return ReplayStats()
        budget = self.max_instructions if self.ips is None else min(self.max_instructions, int(seconds * self.ips))
        cpu = vcpu.cpu
        start, faults0 = vcpu.instructions, vm.mmu.stats.pf_taken
        emulations0 = vcpu.emulations
        while budget > vcpu.instructions - start:
            ex = vcpu.run(budget - (vcpu.instructions - start))
            if ex.kind == "dirty_ring_full":
                vmm_exit(vm, vcpu)
                continue
            if ex.kind == "io":
                port_exit = ex.exit
                if isinstance(port_exit, PortOut):
                    if port_exit.port == ROUND_PORT:
                        self.rounds += 1
                        break
                    claimed = vm.hooks.guest_port_io(vm, vcpu, port_exit.port, port_exit.size, port_exit.value, True)
                    if claimed is None:
                        self.io.append(port_exit.value & ((1 << (8 * port_exit.size)) - 1))
                else:
                    value = vm.hooks.guest_port_io(vm, vcpu, port_exit.port, port_exit.size, 0, False)
                    port_exit.complete(cpu, (1 << (8 * port_exit.size)) - 1 if value is None else value)
                continue
            if ex.kind == "hlt":
                self.exit = "hlt"
            elif ex.kind == "error":
                self.exit = ex.message
            elif self.ips is None:
                self.exit = f"no ROUND_PORT exit within {self.max_instructions} instructions (rip {cpu.rip:#x})"
            break
        executed = vcpu.instructions - start
        return ReplayStats(executed, 0, 0, vm.mmu.stats.pf_taken - faults0, vcpu.emulations - emulations0)


def vmm_exit(vm: Any, vcpu: Any) -> bool:
    """The VMM's ``KVM_EXIT_DIRTY_RING_FULL`` handling (QEMU's ``kvm_dirty_ring_reap``), if that is the exit.

    With a dirty-ring request pending on ``vcpu``: collect (reap every ring,
    ``KVM_RESET_DIRTY_RINGS``) into the current round and re-enter until the
    ring is no longer soft-full; returns True.  Any other exit: False.
    """
    if not getattr(vcpu, "req_dirty_ring_soft_full", False):
        return False
    logger = logger_of(vm)
    while True:
        logger.collect(vm)
        if vcpu.run(0).kind != "dirty_ring_full":  # re-entry: KVM checks the request first
            return True


WORKLOADS: dict[str, type[TraceWorkload]] = {
    cls.name: cls for cls in (Sequential, Uniform, HotSet, Zipf, FixedRate)
}


def make_workload(name: str, rate: float | None = None, seed: int = 0, **params: Any) -> TraceWorkload:
    """A trace workload by name (``-`` and ``_`` are the same), ``rate`` as that workload counts it."""
    cls = WORKLOADS.get(name.replace("-", "_"))
    if cls is None:
        raise InputError(f"unknown workload {name!r} (choose from: {', '.join(WORKLOADS)})")
    if rate is not None:
        params["rate"] = rate
    return cls(seed=seed, **params)
