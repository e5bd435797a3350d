"""Manual dirty-log protection: ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` and ``KVM_CLEAR_DIRTY_LOG``.

Kernel side: ``kvm_vm_ioctl_enable_cap_generic`` (the capability) and
``kvm_clear_dirty_log_protect`` (virt/kvm/kvm_main.c).  VMM side: QEMU's
``kvm_log_clear_one_slot`` (accel/kvm/kvm-all.c), which widens a clear to the
64-page alignment the kernel wants without clearing bits it has not synced.
"""

from __future__ import annotations

from typing import Any

import attrs
import numpy as np
from pagetrack.errors import KvmError
from pagetrack.memory import MemSlot

from .bitmap import reprotect, resolve_slot, sync_dirty_log, use_dirty_bitmap
from .uapi import (
    KVM_CAP_DIRTY_LOG_RING,
    KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_GFN_SIZE,
    KVM_DIRTY_LOG_MANUAL_CAPS,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    KVM_DIRTY_RING_MAX_ENTRIES,
)

__all__ = ["ClearRequest", "check_extension", "clear_dirty_log", "enable_manual_dirty_log_protect",
           "qemu_log_clear"]

_MASK64 = (1 << 64) - 1


def check_extension(vm: Any, cap: int) -> int:
    """``KVM_CHECK_EXTENSION`` for the dirty-logging capabilities (x86); 0 when unsupported.

    ``MANUAL_DIRTY_LOG_PROTECT2`` → the option mask (3); ``DIRTY_LOG_RING`` and
    ``_ACQ_REL`` → the largest ring in bytes; ``RING_WITH_BITMAP`` is arm64-only → 0.
    """
    if cap == KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2:
        return KVM_DIRTY_LOG_MANUAL_CAPS
    if cap in (KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL):
        return KVM_DIRTY_RING_MAX_ENTRIES * KVM_DIRTY_GFN_SIZE
    return 0


def enable_manual_dirty_log_protect(vm: Any, options: int, cap_flags: int = 0) -> int:
    """``KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, args[0] = options)``.

    ``kvm_vm_ioctl_enable_cap_generic``: INITIALLY_SET is only allowed together
    with PROTECT_ENABLE; ``cap.flags`` must be 0; anything else is ``EINVAL``.  The
    value replaces the previous one (0 turns manual protect off); nothing is
    checked against existing memslots or vCPUs.
    """
    allowed = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
    if options & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
        allowed = KVM_DIRTY_LOG_MANUAL_CAPS
    if cap_flags or options & ~allowed:
        raise KvmError("EINVAL", f"manual dirty-log options {options:#x} (flags {cap_flags:#x}) not allowed")
    vm.manual_dirty_log_protect = options
    return 0


def _user_words(bitmap: Any, words: int) -> np.ndarray:
    """``copy_from_user`` of ``words`` u64s; ``EFAULT`` if the buffer is shorter."""
    arr = np.frombuffer(bitmap, dtype="<u8") if isinstance(bitmap, (bytes, bytearray, memoryview)) \
        else np.asarray(bitmap, dtype=np.uint64)
    if arr.size < words:
        raise KvmError("EFAULT", f"bitmap holds {arr.size} words, {words} needed")
    return arr[:words]


def clear_dirty_log(vm: Any, slot: MemSlot | int | None, first_page: int, num_pages: int,
                    bitmap: Any) -> int:
    """``KVM_CLEAR_DIRTY_LOG`` (``kvm_clear_dirty_log_protect``): returns 0 or raises.

    Checks in the kernel's order: ``ENXIO`` with a dirty ring; ``EINVAL`` for a bad
    slot id or ``first_page`` not a multiple of 64; ``ENOENT`` without a slot or
    bitmap; ``EINVAL`` when ``first_page > npages``, ``num_pages > npages -
    first_page``, or ``num_pages`` is not a multiple of 64 and the range stops
    short of the slot end; ``EFAULT`` for a short buffer.  Then, per word, only
    bits that were really set are cleared (``atomic_long_fetch_andnot``) and
    re-armed; one TLB flush follows if anything was cleared.  Input bits for
    clean pages or past ``npages`` do nothing.
    """
    if not use_dirty_bitmap(vm):
        raise KvmError("ENXIO", "the VM uses a dirty ring: KVM_CLEAR_DIRTY_LOG is unavailable")
    memslot = resolve_slot(vm, slot)
    if first_page & 63:
        raise KvmError("EINVAL", f"first_page {first_page} is not a multiple of 64")
    if memslot is None or memslot.dirty_bitmap is None:
        raise KvmError("ENOENT", "memslot has no dirty bitmap (dirty logging is off)")
    npages = memslot.npages
    if (first_page > npages or num_pages > npages - first_page
            or (num_pages < npages - first_page and num_pages & 63)):
        raise KvmError("EINVAL", f"pages [{first_page}, +{num_pages}) do not fit slot of {npages} pages")
    sync_dirty_log(vm)
    words = (num_pages + 63) // 64
    user = _user_words(bitmap, words)
    kernel: np.ndarray = memslot.dirty_bitmap
    flush = False
    with vm.mmu_lock:
        base = first_page // 64
        for i in np.flatnonzero(user).tolist():
            req = int(user[i])
            old = int(kernel[base + i])
            cleared = req & old
            kernel[base + i] = np.uint64(old & ~req & _MASK64)
            if cleared:
                flush = True
                reprotect(vm, memslot, first_page + 64 * i, cleared)
    if flush:
        vm.flush_remote_tlbs("clear_dirty_log")
    return 0


@attrs.frozen
class ClearRequest:
    """The ``struct kvm_clear_dirty_log`` a VMM issued."""

    first_page: int
    num_pages: int
    bitmap: np.ndarray = attrs.field(eq=False)


def qemu_log_clear(vm: Any, slot: MemSlot, copy: np.ndarray, start: int, npages: int) -> ClearRequest:
    """QEMU's ``kvm_log_clear_one_slot``: clear pages ``[start, start + npages)`` of ``slot``.

    ``copy`` is the VMM's own copy of the slot's dirty bitmap (what its last GET
    returned).  The request is widened to the kernel's rules — start rounded down
    to 64 pages, length rounded up to 64 pages or clipped at the slot end — but
    carries only the bits of ``copy`` inside ``[start, start + npages)``; bits the
    alignment added are zero, so dirty bits not yet synced are never cleared
    (§7 case 43).  ``ENOENT`` from the kernel is ignored, as QEMU does.  The
    cleared range is then dropped from ``copy``.
    """
    bmap_start = start & ~63
    delta = start - bmap_start
    bmap_npages = min(-(-(npages + delta) // 64) * 64, slot.npages - bmap_start)
    bits = np.unpackbits(np.ascontiguousarray(copy, dtype=np.uint64).view(np.uint8), bitorder="little")
    want = np.zeros(-(-bmap_npages // 64) * 64, dtype=np.uint8)
    want[delta : delta + npages] = bits[start : start + npages]
    request = np.packbits(want, bitorder="little").view(np.uint64).copy()
    try:
        clear_dirty_log(vm, slot, bmap_start, bmap_npages, request)
    except KvmError as exc:
        if exc.errno_name != "ENOENT":
            raise
    bits[start : start + npages] = 0
    copy[:] = np.packbits(bits, bitorder="little").view(np.uint64)[: copy.size]
    return ClearRequest(bmap_start, bmap_npages, request)
