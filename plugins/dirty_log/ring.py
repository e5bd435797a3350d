"""The dirty ring: ``KVM_CAP_DIRTY_LOG_RING`` (virt/kvm/dirty_ring.c, kvm_main.c).

Each vCPU owns a ring of ``struct kvm_dirty_gfn`` {u32 flags, u32 slot, u64 offset}
shared with userspace (here a numpy structured array).  The kernel pushes an entry
(flags DIRTY) for every page dirtied on that vCPU; userspace harvests entries in
order, marking them RESET; ``KVM_RESET_DIRTY_RINGS`` recycles harvested entries and
re-arms dirty tracking for their pages.  A vCPU whose ring is soft-full exits with
``KVM_EXIT_DIRTY_RING_FULL`` before it enters the guest again.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pagetrack.errors import KvmError
from pagetrack.memory import KVM_ADDRESS_SPACE_NUM, KVM_MEM_SLOTS_NUM

from .bitmap import reprotect
from .uapi import (
    KVM_CAP_DIRTY_LOG_RING,
    KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_DIRTY_GFN_F_DIRTY,
    KVM_DIRTY_GFN_F_RESET,
    KVM_DIRTY_GFN_SIZE,
    KVM_DIRTY_RING_MAX_ENTRIES,
    KVM_DIRTY_RING_RSVD_ENTRIES,
    PAGE_SIZE,
)

__all__ = ["DIRTY_GFN_DTYPE", "DirtyRing", "enable_dirty_ring", "reap_dirty_rings", "reset_dirty_rings",
           "rsvd_entries"]

#: ``struct kvm_dirty_gfn``: 16 bytes, little-endian.
DIRTY_GFN_DTYPE = np.dtype([("flags", "<u4"), ("slot", "<u4"), ("offset", "<u8")])
assert DIRTY_GFN_DTYPE.itemsize == KVM_DIRTY_GFN_SIZE

_MASK64 = (1 << 64) - 1


def rsvd_entries(vm: Any) -> int:
    """``kvm_dirty_ring_get_rsvd_entries``: 64, plus the PML buffer size when the CPU has PML."""
    return KVM_DIRTY_RING_RSVD_ENTRIES + int(vm.mmu.cpu_dirty_log_size)


def enable_dirty_ring(vm: Any, size: int, cap: int = KVM_CAP_DIRTY_LOG_RING) -> int:
    """``KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING[_ACQ_REL], args[0] = size in bytes)``.

    ``kvm_vm_ioctl_enable_dirty_log_ring``, in the kernel's order: ``EINVAL`` unless
    ``size`` is a non-zero power of two; ``EINVAL`` below ``PAGE_SIZE`` or below the
    reserved entries; ``E2BIG`` above 65536 entries; ``EINVAL`` when a ring is
    already configured or a vCPU exists.
    """
    if cap not in (KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL):
        raise KvmError("EINVAL", f"capability {cap} is not a dirty-ring capability")
    if size <= 0 or size & (size - 1):
        raise KvmError("EINVAL", f"dirty ring size {size} is not a power of two")
    if size < rsvd_entries(vm) * KVM_DIRTY_GFN_SIZE or size < PAGE_SIZE:
        raise KvmError("EINVAL", f"dirty ring size {size} is below PAGE_SIZE or the "
                                 f"{rsvd_entries(vm)} reserved entries")
    if size > KVM_DIRTY_RING_MAX_ENTRIES * KVM_DIRTY_GFN_SIZE:
        raise KvmError("E2BIG", f"dirty ring size {size} exceeds {KVM_DIRTY_RING_MAX_ENTRIES} entries")
    if vm.dirty_ring_size:
        raise KvmError("EINVAL", "the dirty ring is already enabled")
    if vm.vcpus:
        raise KvmError("EINVAL", "the dirty ring must be enabled before any vCPU is created")
    vm.dirty_ring_size = size
    return 0


class DirtyRing:
    """One vCPU's ring (``struct kvm_dirty_ring``) and the VMM's fetch index into it.

    ``dirty_index`` / ``reset_index`` are the kernel's free-running counters;
    ``fetch_index`` is the VMM's (QEMU's ``cpu->kvm_fetch_index``).
    """

    def __init__(self, size: int, soft_limit: int) -> None:
        self.entries = np.zeros(size, dtype=DIRTY_GFN_DTYPE)
        self.size = size
        self.soft_limit = soft_limit
        self.dirty_index = 0
        self.reset_index = 0
        self.fetch_index = 0
        self.overflows = 0  #: pushes into a full ring (the kernel's WARN_ON_ONCE)

    @classmethod
    def for_vcpu(cls, vm: Any) -> DirtyRing:
        """``kvm_dirty_ring_alloc`` at ``KVM_CREATE_VCPU``: soft limit = size − reserved entries."""
        size = vm.dirty_ring_size // KVM_DIRTY_GFN_SIZE
        return cls(size, size - rsvd_entries(vm))

    @property
    def used(self) -> int:
        """``kvm_dirty_ring_used``."""
        return self.dirty_index - self.reset_index

    @property
    def soft_full(self) -> bool:
        """``kvm_dirty_ring_soft_full``: used ≥ soft limit."""
        return self.used >= self.soft_limit

    def push(self, slot: int, offset: int) -> bool:
        """``kvm_dirty_ring_push``: publish {DIRTY, slot, offset}; true if the ring is now soft-full
        (the caller raises ``KVM_REQ_DIRTY_RING_SOFT_FULL``)."""
        if self.used >= self.size:
            self.overflows += 1
        self.entries[self.dirty_index & (self.size - 1)] = (KVM_DIRTY_GFN_F_DIRTY, slot, offset)
        self.dirty_index += 1
        return self.used >= self.soft_limit

    def _run(self, start: int, want: Any) -> np.ndarray:
        """Ring positions from ``start`` (free-running) while ``want(flags)`` holds, at most one lap."""
        idx = (start + np.arange(self.size)) & (self.size - 1)
        ok = want(self.entries["flags"][idx])
        stop = int(np.argmin(ok)) if not ok.all() else self.size
        return idx[:stop]

    def harvest(self) -> list[tuple[int, int]]:
        """The VMM's reap (QEMU ``kvm_dirty_ring_reap_one``): ``(slot, offset)`` of each entry.

        Walks from the fetch index while an entry's flags are exactly DIRTY,
        marks each RESET, and stops at the first other entry: harvesting is in
        order and never skips.
        """
        idx = self._run(self.fetch_index, lambda f: f == KVM_DIRTY_GFN_F_DIRTY)
        got = self.entries[idx]
        self.entries["flags"][idx] = KVM_DIRTY_GFN_F_RESET
        self.fetch_index += len(idx)
        return list(zip(got["slot"].tolist(), got["offset"].tolist(), strict=True))

    def reset(self, vm: Any) -> int:
        """``kvm_dirty_ring_reset``: recycle harvested entries from ``reset_index``; returns the count.

        Stops at the first entry without the RESET bit (bit 0 is ignored).  Runs
        of one slot whose offsets fit a 64-page window starting at the current
        batch offset (forwards, or backwards while the shifted mask keeps every
        bit) are re-armed as one ``(offset, mask)`` batch.
        """
        idx = self._run(self.reset_index, lambda f: (f & KVM_DIRTY_GFN_F_RESET) != 0)
        got = self.entries[idx]
        self.entries["flags"][idx] = 0
        self.reset_index += len(idx)
        count = len(idx)
        cur_slot = cur_offset = mask = 0
        first = True
        for next_slot, next_offset in zip(got["slot"].tolist(), got["offset"].tolist(), strict=True):
            if not first and next_slot == cur_slot:
                delta = next_offset - cur_offset
                if 0 <= delta < 64:
                    mask |= 1 << delta
                    continue
                if -64 < delta < 0 and ((mask << -delta) & _MASK64) >> -delta == mask:
                    cur_offset = next_offset
                    mask = ((mask << -delta) & _MASK64) | 1
                    continue
            _reset_dirty_gfn(vm, cur_slot, cur_offset, mask)
            cur_slot, cur_offset, mask, first = next_slot, next_offset, 1, False
        _reset_dirty_gfn(vm, cur_slot, cur_offset, mask)
        return count


def _reset_dirty_gfn(vm: Any, slot: int, offset: int, mask: int) -> None:
    """``kvm_reset_dirty_gfn``: re-arm one batch; an invalid slot or offset is skipped."""
    if not mask:
        return
    as_id, id_ = slot >> 16, slot & 0xFFFF
    if as_id >= KVM_ADDRESS_SPACE_NUM or id_ >= KVM_MEM_SLOTS_NUM:
        return
    memslot = vm.memslots.get(as_id, id_)
    if memslot is None or offset + mask.bit_length() - 1 >= memslot.npages:
        return
    with vm.mmu_lock:
        reprotect(vm, memslot, offset, mask)


def reset_dirty_rings(vm: Any) -> int:
    """``KVM_RESET_DIRTY_RINGS`` (``kvm_vm_ioctl_reset_dirty_pages``): entries reset on all vCPUs.

    ``EINVAL`` without a ring.  One VM-wide TLB flush if anything was reset.
    """
    if not vm.dirty_ring_size:
        raise KvmError("EINVAL", "no dirty ring is configured")
    cleared = 0
    for vcpu in vm.vcpus:
        if vcpu.dirty_ring is not None:
            cleared += vcpu.dirty_ring.reset(vm)
    if cleared:
        vm.flush_remote_tlbs("reset_dirty_rings")
    return cleared


def reap_dirty_rings(vm: Any) -> list[tuple[int, int]]:
    """Harvest every vCPU's ring in vCPU order (QEMU ``kvm_dirty_ring_reap_locked``)."""
    out: list[tuple[int, int]] = []
    for vcpu in vm.vcpus:
        if vcpu.dirty_ring is not None:
            out.extend(vcpu.dirty_ring.harvest())
    return out
