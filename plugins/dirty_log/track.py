"""Dirty logging done with the page-track API instead of KVM's dirty log, for comparison.

:class:`WriteTrackLogger` is an external write tracker (``kvm_page_track_register_notifier``)
that works like a userfaultfd-wp tracker: it write-tracks every page of the
dirty-logged slots (``kvm_write_track_add_gfn``), and when ``track_write`` reports
the first write to one of them it records the page and drops the tracking
(``kvm_write_track_remove_gfn``); at the next round it tracks the recorded pages
again.  The cost is visible in the counters: every first write to a tracked page
faults and is emulated.  It also sees only what KVM's ``track_write`` sees: writes
the emulator commits (a failed ``lock cmpxchg`` counts: ``em_cmpxchg`` writes the old
value back), not the guest-table A/D updates of the CPU or KVM's walker, so the
page-table pages of the low slot are missing from its rounds.
"""

from __future__ import annotations

from typing import Any

from pagetrack import hookimpl
from pagetrack.memory import PAGE_SHIFT, MemSlot

__all__ = ["TRACKER_NAME", "WriteTrackLogger"]

TRACKER_NAME = "dirty_log_track"


class WriteTrackLogger:
    """Per-VM write-track based logger: ``armed`` gfns hold one count each, ``dirty`` are recorded."""

    def __init__(self) -> None:
        self.armed: set[int] = set()
        self.dirty: set[int] = set()
        self.vm: Any = None

    def attach(self, vm: Any) -> None:
        """Register as an external tracker (enables write tracking for the VM for good)."""
        self.vm = vm
        vm.register_tracker(self, TRACKER_NAME)

    def arm_slot(self, slot: MemSlot) -> None:
        """Write-track every page of ``slot`` not tracked by us yet."""
        add = self.vm.write_track_add_gfn
        armed = self.armed
        for gfn in range(slot.base_gfn, slot.end_gfn):
            if gfn not in armed:
                add(gfn)
                armed.add(gfn)

    def disarm_slot(self, slot: MemSlot) -> None:
        """Drop our counts in ``slot`` (its logging was turned off)."""
        for gfn in range(slot.base_gfn, slot.end_gfn):
            if gfn in self.armed:
                self.armed.discard(gfn)
                self.vm.write_track_remove_gfn(gfn)
            self.dirty.discard(gfn)

    def rearm(self, gfns: set[int]) -> None:
        """Start of a round: track the pages recorded in the last one again."""
        add = self.vm.write_track_add_gfn
        for gfn in gfns:
            if gfn not in self.armed and self.vm.memslots.gfn_to_memslot(gfn) is not None:
                add(gfn)
                self.armed.add(gfn)

    def take(self) -> set[int]:
        """The gfns recorded since the last call."""
        out, self.dirty = self.dirty, set()
        return out

    @hookimpl
    def track_write(self, vm: Any, gpa: int) -> None:
        """First write to an armed page: record it, stop tracking it."""
        gfn = gpa >> PAGE_SHIFT
        if gfn in self.armed:
            self.armed.discard(gfn)
            self.dirty.add(gfn)
            vm.write_track_remove_gfn(gfn)

    @hookimpl
    def track_remove_region(self, gfn: int, nr_pages: int) -> None:
        """The slot is gone, and its counts with it."""
        gone = range(gfn, gfn + nr_pages)
        self.armed.difference_update(gone)
        self.dirty.difference_update(gone)
