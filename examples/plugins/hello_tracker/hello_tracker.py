"""hello_tracker: the smallest useful pagetrack write tracker.

It write-protects the guest frames you ask it to watch and counts the emulated
writes KVM reports for them, per gfn: a Python rendering of what an external
page-track user such as KVMGT does with ``kvm_write_track_add_gfn`` and a
``track_write`` notifier.

Usage::

    import hello_tracker, pagetrack

    vm = pagetrack.VM()                      # loads hello_tracker from its entry point
    hello_tracker.watch(vm, 0x400)           # kvm_write_track_add_gfn
    ...                                      # run the guest
    hello_tracker.write_counts(vm)           # {0x400: 3}

The module itself is the plugin (entry point ``hello_tracker = "hello_tracker"``),
and one module object is registered on every VM, so its state is kept per VM.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pagetrack

__all__ = [
    "track_remove_region",
    "track_write",
    "unwatch",
    "vm_destroyed",
    "watch",
    "watched",
    "write_counts",
]

PAGE_SHIFT = 12


class _State:
    """What the tracker knows about one VM."""

    def __init__(self) -> None:
        self.watched: set[int] = set()
        self.writes: Counter[int] = Counter()


_vms: dict[int, _State] = {}  # id(vm) -> state; dropped in vm_destroyed


def _state(vm: Any) -> _State:
    return _vms.setdefault(id(vm), _State())


# ---- the tracker's own API ----------------------------------------------------------


def watch(vm: Any, gfn: int) -> None:
    """Start counting writes to ``gfn``: write-protect it (``kvm_write_track_add_gfn``).

    Watching a gfn twice is a no-op: the tracker holds one write-track count per gfn.
    """
    state = _state(vm)
    if gfn not in state.watched:
        vm.write_track_add_gfn(gfn)
        state.watched.add(gfn)


def unwatch(vm: Any, gfn: int) -> None:
    """Stop watching ``gfn`` and drop the count this tracker holds (``kvm_write_track_remove_gfn``)."""
    state = _state(vm)
    if gfn in state.watched:
        state.watched.discard(gfn)
        vm.write_track_remove_gfn(gfn)


def watched(vm: Any) -> set[int]:
    """The gfns currently watched on ``vm``."""
    return set(_state(vm).watched)


def write_counts(vm: Any) -> dict[int, int]:
    """Emulated writes seen per watched gfn on ``vm`` (a copy)."""
    return dict(_state(vm).writes)


# ---- hooks ----------------------------------------------------------------------------


@pagetrack.hookimpl
def track_write(vm: Any, gpa: int, new: bytes) -> None:
    """An emulated write was committed: count it if its gfn is watched.

    KVM calls every tracker for every emulated write, tracked or not, so a
    tracker filters for itself.  A piece never crosses a page, so ``gpa``
    alone gives the gfn.  Kernel: ``node->track_write(gpa, new, bytes, node)``.
    """
    state = _vms.get(id(vm))
    if state is not None:
        gfn = gpa >> PAGE_SHIFT
        if gfn in state.watched:
            state.writes[gfn] += 1


@pagetrack.hookimpl
def track_remove_region(vm: Any, gfn: int, nr_pages: int) -> None:
    """A memslot was deleted: its frames are gone and KVM dropped their counts; forget them.

    Kernel: ``node->track_remove_region(gfn, nr_pages, node)`` (6.6+).
    """
    state = _vms.get(id(vm))
    if state is None:
        return
    gone = {g for g in state.watched if gfn <= g < gfn + nr_pages}
    state.watched -= gone
    for g in gone:
        state.writes.pop(g, None)


@pagetrack.hookimpl
def vm_destroyed(vm: Any) -> None:
    """The VM is going away: drop everything kept for it (``kvm_destroy_vm``)."""
    _vms.pop(id(vm), None)
