"""The migration dirty logger: KVM's dirty bitmap, harvested at every round boundary.

The bitmap half of KVM's dirty logging (virt/kvm/kvm_main.c) lives here:
``mark_page_dirty_in_slot`` sets a bit, ``KVM_GET_DIRTY_LOG`` gets and clears
the bitmap and re-protects the reported pages with dirty-logging protection
(W cleared, MMU-writable kept, so the next write is fixed on the fast path).
At every ``round_end`` the logger harvests every dirty-logged slot, as a VMM
doing pre-copy migration does.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np
from pagetrack import hookimpl
from pagetrack.errors import InputError, KvmError
from pagetrack.memory import MemSlot

__all__ = ["MODES", "DirtyLogger", "bitmap_gfns", "get_dirty_log", "logger_of"]


def _alloc_bitmap(slot: MemSlot) -> np.ndarray:
    """``kvm_alloc_dirty_bitmap``: ``ALIGN(npages, 64) / 8`` bytes of little-endian u64 words."""
    return np.zeros((slot.npages + 63) // 64, dtype=np.uint64)


def get_dirty_log(vm: Any, slot: MemSlot | None) -> np.ndarray:
    """``KVM_GET_DIRTY_LOG`` without manual protect (``kvm_get_dirty_log_protect``).

    Every non-zero word is swapped with zero, the pages it names are
    re-protected (``kvm_arch_mmu_enable_log_dirty_pt_masked``), one TLB flush
    follows if anything was dirty, and the snapshot is returned.  A slot that
    does not exist or does not log gives ``ENOENT``.
    """
    if slot is None or slot.dirty_bitmap is None:
        raise KvmError("ENOENT", "memslot has no dirty bitmap (dirty logging is off)")
    bitmap: np.ndarray = slot.dirty_bitmap
    words = np.flatnonzero(bitmap)
    snapshot = np.zeros_like(bitmap)
    if len(words):
        with vm.mmu_lock:
            snapshot[words] = bitmap[words]
            bitmap[words] = 0
            for w in words.tolist():
                vm.mmu.enable_log_dirty_pt_masked(slot, w * 64, int(snapshot[w]))
        vm.flush_remote_tlbs("get_dirty_log")
    return snapshot


def bitmap_gfns(slot: MemSlot, bitmap: np.ndarray) -> list[int]:
    """Absolute gfns of the set bits (bit i of word w is page ``64 * w + i``)."""
    bits = np.unpackbits(bitmap.view(np.uint8), bitorder="little")
    return (np.flatnonzero(bits[: slot.npages]) + slot.base_gfn).tolist()


class DirtyLogger:
    """One VM's dirty-logging state: the mode and the harvested rounds of every logged slot."""

    def __init__(self, mode: str = "bitmap") -> None:
        self.mode = mode
        #: slot key → list of rounds, each a sorted list of absolute gfns
        self.rounds: dict[int, list[list[int]]] = {}

    def harvest(self, vm: Any) -> None:
        """Harvest every dirty-logged slot (``KVM_GET_DIRTY_LOG`` on each) into a new round."""
        for slot in vm.memslots.all_slots():
            if slot.dirty_bitmap is None:
                continue
            gfns = bitmap_gfns(slot, get_dirty_log(vm, slot))
            rounds = self.rounds.setdefault(slot.key, [])
            rounds.append(gfns)
            if vm.audit.enabled:
                vm.audit.emit("harvest", round=len(rounds) - 1, mode=self.mode, pages=len(gfns), gfns=gfns)

    def rounds_of(self, slot_key: int) -> list[list[int]]:
        """The harvested rounds of one slot (empty if it never logged)."""
        return self.rounds.get(slot_key, [])


_loggers: weakref.WeakKeyDictionary[Any, DirtyLogger] = weakref.WeakKeyDictionary()
MODES = ("bitmap",)


def logger_of(vm: Any) -> DirtyLogger:
    """The dirty logger state of ``vm`` (created on first use)."""
    found = _loggers.get(vm)
    if found is None:
        found = _loggers[vm] = DirtyLogger()
    return found


@hookimpl
def plugin_options(vm: Any, options: Mapping[str, Mapping[str, Any]]) -> None:
    """Option ``mode`` (default ``bitmap``)."""
    mode = options.get("dirty_log", {}).get("mode", "bitmap")
    if mode not in MODES:
        raise InputError(f"unknown mode {mode!r} (supported: {', '.join(MODES)})", "dirty_log.mode")
    logger_of(vm).mode = mode


@hookimpl
def memslot_commit(new: MemSlot | None) -> None:
    """``kvm_prepare_memory_region``: a bitmap exists iff the slot logs; it survives moves."""
    if new is None:
        return
    if new.logging and new.dirty_bitmap is None:
        new.dirty_bitmap = _alloc_bitmap(new)
    elif not new.logging:
        new.dirty_bitmap = None


@hookimpl
def mark_page_dirty(slot: MemSlot, gfn: int) -> None:
    """``mark_page_dirty_in_slot``: ``set_bit_le(gfn - base_gfn, bitmap)``."""
    bitmap = slot.dirty_bitmap
    if bitmap is None:
        return
    rel = gfn - slot.base_gfn
    bitmap[rel >> 6] |= np.uint64(1 << (rel & 63))


@hookimpl
def round_end(vm: Any) -> None:
    """The VMM's harvest point: get-and-clear every slot's log."""
    logger_of(vm).harvest(vm)
