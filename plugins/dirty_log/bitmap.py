"""The dirty bitmap and ``KVM_GET_DIRTY_LOG`` (virt/kvm/kvm_main.c, arch/x86/kvm/x86.c).

Layout (api.rst §4.8): one bit per 4 KiB page of the memslot, bit ``i`` is gfn
``base_gfn + i``, little-endian 64-bit words (``set_bit_le``), ``ALIGN(npages, 64) / 8``
bytes; the kernel never sets a bit at or past ``npages``.  Here a bitmap is a numpy
``uint64`` array of ``ALIGN(npages, 64) / 64`` words.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from pagetrack.errors import KvmError
from pagetrack.memory import KVM_ADDRESS_SPACE_NUM, KVM_MEM_SLOTS_NUM, MemSlot

from .uapi import KVM_DIRTY_LOG_INITIALLY_SET

__all__ = [
    "alloc_dirty_bitmap",
    "bitmap_gfns",
    "get_dirty_log",
    "gfns_to_bitmap",
    "reprotect",
    "resolve_slot",
    "set_dirty_bit",
    "sync_dirty_log",
    "use_dirty_bitmap",
]


def use_dirty_bitmap(vm: Any) -> bool:
    """``kvm_use_dirty_bitmap``: no dirty ring (x86 has no ``RING_WITH_BITMAP``)."""
    return not vm.dirty_ring_size


def alloc_dirty_bitmap(vm: Any, slot: MemSlot) -> np.ndarray:
    """``kvm_alloc_dirty_bitmap`` in ``kvm_prepare_memory_region``.

    With manual protect and ``KVM_DIRTY_LOG_INITIALLY_SET`` the bits of all
    ``npages`` pages start set (``bitmap_set(..., 0, npages)``); the tail stays 0.
    """
    bitmap = np.zeros((slot.npages + 63) // 64, dtype=np.uint64)
    if vm.manual_dirty_log_protect & KVM_DIRTY_LOG_INITIALLY_SET:
        full, rest = divmod(slot.npages, 64)
        bitmap[:full] = np.uint64((1 << 64) - 1)
        if rest:
            bitmap[full] = np.uint64((1 << rest) - 1)
    return bitmap


def set_dirty_bit(slot: MemSlot, gfn: int) -> None:
    """``set_bit_le(gfn - base_gfn, memslot->dirty_bitmap)``."""
    rel = gfn - slot.base_gfn
    slot.dirty_bitmap[rel >> 6] |= np.uint64(1 << (rel & 63))


def resolve_slot(vm: Any, slot: MemSlot | int | None) -> MemSlot | None:
    """The memslot a ``slot`` field names (``as_id << 16 | id``); ``EINVAL`` for a bad id."""
    if slot is None or isinstance(slot, MemSlot):
        return slot
    as_id, id_ = slot >> 16, slot & 0xFFFF
    if not 0 <= as_id < KVM_ADDRESS_SPACE_NUM or id_ >= KVM_MEM_SLOTS_NUM:
        raise KvmError("EINVAL", f"slot {slot:#x}: address space {as_id} / id {id_} out of range")
    found: MemSlot | None = vm.memslots.get(as_id, id_)
    return found


def sync_dirty_log(vm: Any) -> None:
    """``kvm_arch_sync_dirty_log``: with PML, kick every vCPU so its buffer is flushed.

    The kernel's kick is asynchronous (late entries show up in a later GET); the
    model flushes synchronously.
    """
    if not vm.mmu.cpu_dirty_log_size:
        return
    for vcpu in vm.vcpus:
        vcpu.flush_pml_buffer()


def reprotect(vm: Any, slot: MemSlot, offset: int, mask: int) -> None:
    """``kvm_arch_mmu_enable_log_dirty_pt_masked`` with this VM's PML and INITIALLY_SET state."""
    vm.mmu.enable_log_dirty_pt_masked(
        slot, offset, mask,
        pml=bool(vm.mmu.cpu_dirty_log_size),
        init_set=bool(vm.manual_dirty_log_protect & KVM_DIRTY_LOG_INITIALLY_SET),
    )


def get_dirty_log(vm: Any, slot: MemSlot | int | None) -> np.ndarray:
    """``KVM_GET_DIRTY_LOG`` (``kvm_get_dirty_log_protect``): the slot's bitmap, as copied out.

    Checks, in the kernel's order: ``ENXIO`` while a dirty ring is on, ``EINVAL``
    for a bad slot id, ``ENOENT`` for a missing slot or one that does not log.
    Then the PML buffers are synced.  Without manual protect every non-zero word
    is swapped with zero and its pages re-protected under ``mmu_lock``, with one
    TLB flush if any word was non-zero.  With manual protect (any option set) the
    live bitmap is copied unchanged: no clearing, no protection, no flush.
    """
    if not use_dirty_bitmap(vm):
        raise KvmError("ENXIO", "the VM uses a dirty ring: KVM_GET_DIRTY_LOG is unavailable")
    memslot = resolve_slot(vm, slot)
    if memslot is None or memslot.dirty_bitmap is None:
        raise KvmError("ENOENT", "memslot has no dirty bitmap (dirty logging is off)")
    sync_dirty_log(vm)
    bitmap: np.ndarray = memslot.dirty_bitmap
    if vm.manual_dirty_log_protect:
        return bitmap.copy()
    snapshot = np.zeros_like(bitmap)
    words = np.flatnonzero(bitmap)
    if len(words):
        with vm.mmu_lock:
            snapshot[words] = bitmap[words]
            bitmap[words] = 0
            for w in words.tolist():
                reprotect(vm, memslot, w * 64, int(snapshot[w]))
        vm.flush_remote_tlbs("get_dirty_log")
    return snapshot


def bitmap_gfns(slot: MemSlot, bitmap: np.ndarray, first_page: int = 0) -> list[int]:
    """Absolute gfns of the set bits (bit ``i`` of word ``w`` is page ``first_page + 64 * w + i``)."""
    bits = np.unpackbits(np.ascontiguousarray(bitmap, dtype=np.uint64).view(np.uint8), bitorder="little")
    rel = np.flatnonzero(bits) + first_page
    return (rel[rel < slot.npages] + slot.base_gfn).tolist()


def gfns_to_bitmap(slot: MemSlot, gfns: Iterable[int], first_page: int = 0,
                   num_pages: int | None = None) -> np.ndarray:
    """A bitmap for ``[first_page, first_page + num_pages)`` of the slot with the given gfns set."""
    if num_pages is None:
        num_pages = slot.npages - first_page
    out = np.zeros((num_pages + 63) // 64, dtype=np.uint64)
    for gfn in gfns:
        rel = gfn - slot.base_gfn - first_page
        if 0 <= rel < num_pages:
            out[rel >> 6] |= np.uint64(1 << (rel & 63))
    return out
