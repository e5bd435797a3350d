"""The VMM side of dirty logging: one :class:`DirtyLogger` per VM, harvesting rounds.

The logger configures KVM for its mode when the VM is created (the capability
ioctls a VMM issues right after ``KVM_CREATE_VM``) and harvests every
dirty-logged slot at each round boundary, as a pre-copy migration loop does:

============================  =========================================================
mode                          KVM set-up, and one collection
============================  =========================================================
``bitmap``                    none; ``KVM_GET_DIRTY_LOG`` (get, clear, re-protect)
``clear``                     ``MANUAL_DIRTY_LOG_PROTECT2`` = PROTECT_ENABLE;
                              GET, then ``KVM_CLEAR_DIRTY_LOG`` of what GET reported
``clear-initially-set``       as ``clear`` plus INITIALLY_SET; :meth:`~DirtyLogger.start`
                              does one GET + CLEAR of everything before the guest runs
``ring``                      ``KVM_CAP_DIRTY_LOG_RING``; reap every vCPU ring, then
                              ``KVM_RESET_DIRTY_RINGS`` (its count must match)
``pml``                       Intel PML (TDP); GET as in ``bitmap`` (GET flushes PML)
``track``                     a write tracker (page-track API) instead of the dirty log
============================  =========================================================

Options (``{"dirty_log": {...}}``): ``mode``; ``initially_set`` (with ``clear``);
``ring_size`` in entries (default 4096, QEMU's suggestion); ``pml`` (PML hardware
in any mode; ``pml`` mode implies it); ``eager_split`` (``kvm.eager_page_split``,
default true).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Mapping
from typing import Any

from pagetrack.errors import InputError, KvmError
from pagetrack.memory import MemSlot

from .bitmap import bitmap_gfns, get_dirty_log, sync_dirty_log
from .clear import clear_dirty_log, enable_manual_dirty_log_protect
from .counters import RoundCounters
from .pml import enable_pml
from .ring import enable_dirty_ring, reap_dirty_rings, reset_dirty_rings
from .track import WriteTrackLogger
from .uapi import (
    KVM_DIRTY_GFN_SIZE,
    KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
)

__all__ = ["DEFAULT_RING_ENTRIES", "MODES", "DirtyLogger", "logger_of"]

MODES = ("bitmap", "clear", "clear-initially-set", "ring", "pml", "track")
DEFAULT_RING_ENTRIES = 4096
_OPTION_KEYS = {"mode", "initially_set", "ring_size", "pml", "eager_split"}


class DirtyLogger:
    """One VM's harvesting state: the mode, the harvested rounds and their counters.

    :attr:`rounds` maps a slot key (``as_id << 16 | id``) to its rounds, each a
    sorted list of absolute gfns; :attr:`round_stats` has one dict per
    :meth:`harvest` (see :mod:`.counters`).
    """

    def __init__(self, mode: str = "bitmap") -> None:
        self.mode = mode
        self.initially_set = False
        self.ring_entries = 0
        self.rounds: dict[int, list[list[int]]] = {}
        self.counters = RoundCounters()
        self.tracker: WriteTrackLogger | None = None
        self.started = False
        self.error: Exception | None = None
        #: gfns collected in the current round (ring-full exits), by slot key
        self._pending: dict[int, set[int]] = {}
        #: ring entries naming no valid slot/offset (QEMU ignores them)
        self.ring_entries_ignored = 0
        #: marks on a ring VM without a running vCPU (the kernel WARNs and drops them on x86)
        self.marks_without_vcpu = 0

    @property
    def round_stats(self) -> list[dict[str, Any]]:
        return self.counters.rounds

    # ---- configuration (right after KVM_CREATE_VM) ---------------------------------------
    def configure(self, vm: Any, options: Mapping[str, Any]) -> None:
        """Apply ``options`` to a VM that has no memslot and no vCPU yet."""
        unknown = set(options) - _OPTION_KEYS
        if unknown:
            raise InputError(f"unknown option(s) {', '.join(sorted(unknown))}", "dirty_log")
        mode = options.get("mode", "bitmap")
        if mode not in MODES:
            raise InputError(f"unknown mode {mode!r} (supported: {', '.join(MODES)})", "dirty_log.mode")
        initially_set = bool(options.get("initially_set", False)) or mode == "clear-initially-set"
        if initially_set and mode not in ("clear", "clear-initially-set"):
            raise InputError("initially_set needs mode 'clear' (QEMU never combines it with the ring)",
                             "dirty_log.initially_set")
        if mode == "clear-initially-set":
            mode = "clear"
        self.mode = "clear-initially-set" if initially_set else mode
        self.initially_set = initially_set
        vm.mmu.eager_page_split = bool(options.get("eager_split", True))
        if options.get("pml", False) or mode == "pml":
            enable_pml(vm)
        if mode == "clear":
            caps = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | (KVM_DIRTY_LOG_INITIALLY_SET if initially_set else 0)
            enable_manual_dirty_log_protect(vm, caps)
        elif mode == "ring":
            entries = int(options.get("ring_size", DEFAULT_RING_ENTRIES))
            try:
                enable_dirty_ring(vm, entries * KVM_DIRTY_GFN_SIZE)
            except KvmError as exc:
                raise InputError(f"ring of {entries} entries refused: {exc}", "dirty_log.ring_size") from exc
            self.ring_entries = entries
        elif mode == "track":
            self.tracker = WriteTrackLogger()
            self.tracker.attach(vm)

    # ---- the VMM's loop ---------------------------------------------------------------------
    def start(self, vm: Any) -> None:
        """Before the first ``KVM_RUN``: start counting; with INITIALLY_SET, GET + CLEAR everything.

        The initial sync drops the "all dirty" bits INITIALLY_SET starts with (what
        QEMU's first bitmap sync and the real-KVM backend's ``start`` do), so the
        first round holds only guest writes.  Raises the configuration error, if
        the options were refused.
        """
        if self.error is not None:
            raise self.error
        self.started = True
        if self.initially_set:
            for slot in _logged(vm):
                self._get_and_clear(vm, slot)
        self.counters.begin(vm)

    def collect(self, vm: Any) -> int:
        """One collection without closing the round (e.g. on ``KVM_EXIT_DIRTY_RING_FULL``).

        Returns the number of pages (or ring entries) collected.
        """
        t0 = time.perf_counter()
        n = self._collect(vm)
        self.counters.collected(time.perf_counter() - t0)
        return n

    def harvest(self, vm: Any) -> dict[int, list[int]]:
        """Collect, then close one round for every dirty-logged slot (appended to :attr:`rounds`).

        Returns the round: slot key → sorted gfns.
        """
        t0 = time.perf_counter()
        self._collect(vm)
        self.counters.collected(time.perf_counter() - t0)
        t1 = time.perf_counter()
        pending, self._pending = self._pending, {}
        pages = 0
        out: dict[int, list[int]] = {}
        for slot in _logged(vm):
            gfns = out[slot.key] = sorted(pending.get(slot.key, ()))
            pages += len(gfns)
            rounds = self.rounds.setdefault(slot.key, [])
            rounds.append(gfns)
            if vm.audit.enabled:
                vm.audit.emit("harvest", round=len(rounds) - 1, mode=self.mode, pages=len(gfns), gfns=gfns)
        self.counters.close(vm, pages, time.perf_counter() - t1)
        return out

    def rounds_of(self, slot_key: int) -> list[list[int]]:
        """The harvested rounds of one slot (empty if it never logged)."""
        return self.rounds.get(slot_key, [])

    # ---- collections, per mode -------------------------------------------------------------
    def _add(self, slot_key: int, gfns: Any) -> None:
        self._pending.setdefault(slot_key, set()).update(gfns)

    def _get_and_clear(self, vm: Any, slot: MemSlot) -> list[int]:
        """QEMU's manual-protect sync: GET, then CLEAR exactly what it returned."""
        bitmap = get_dirty_log(vm, slot)
        if bitmap.any():
            clear_dirty_log(vm, slot, 0, slot.npages, bitmap)
        return bitmap_gfns(slot, bitmap)

    def _collect(self, vm: Any) -> int:
        mode = self.mode
        if mode == "ring":
            return self._collect_ring(vm)
        if mode == "track":
            assert self.tracker is not None
            got = self.tracker.take()
            for slot in _logged(vm):
                self._add(slot.key, (g for g in got if slot.contains(g)))
            self.tracker.rearm(got)
            return len(got)
        n = 0
        for slot in vm.memslots.all_slots():
            if slot.dirty_bitmap is None:
                continue
            if mode in ("clear", "clear-initially-set"):
                gfns = self._get_and_clear(vm, slot)
            else:
                gfns = bitmap_gfns(slot, get_dirty_log(vm, slot))
            self._add(slot.key, gfns)
            n += len(gfns)
        return n

    def _collect_ring(self, vm: Any) -> int:
        """QEMU's ``kvm_dirty_ring_reap``: kick (flush PML), reap all rings, reset, check the count."""
        sync_dirty_log(vm)
        entries = reap_dirty_rings(vm)
        if entries:
            reset = reset_dirty_rings(vm)
            if reset != len(entries):
                raise RuntimeError(f"KVM_RESET_DIRTY_RINGS reset {reset} entries, {len(entries)} harvested")
        for key, offset in entries:
            slot = vm.memslots.get(key >> 16, key & 0xFFFF) if key >> 16 < 2 else None
            if slot is None or offset >= slot.npages:
                self.ring_entries_ignored += 1
                continue
            self._add(key, (slot.base_gfn + offset,))
        return len(entries)


def _logged(vm: Any) -> list[MemSlot]:
    return [slot for slot in vm.memslots.all_slots() if slot.logging]


_loggers: weakref.WeakKeyDictionary[Any, DirtyLogger] = weakref.WeakKeyDictionary()


def logger_of(vm: Any) -> DirtyLogger:
    """The dirty logger of ``vm`` (created on first use)."""
    found = _loggers.get(vm)
    if found is None:
        found = _loggers[vm] = DirtyLogger()
    return found
