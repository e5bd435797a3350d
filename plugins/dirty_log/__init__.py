"""The migration dirty logger: KVM's dirty logging in every mode, harvested at each round.

The kernel side lives in small modules named after what they model —
:mod:`.bitmap` (the bitmap, ``KVM_GET_DIRTY_LOG``), :mod:`.clear`
(``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2``, ``KVM_CLEAR_DIRTY_LOG``), :mod:`.ring`
(``KVM_CAP_DIRTY_LOG_RING``, ``KVM_RESET_DIRTY_RINGS``), :mod:`.pml` (Intel PML);
the VMM side in :mod:`.logger` (modes, rounds, :meth:`DirtyLogger.harvest`),
:mod:`.track` (the same job with the page-track API) and :mod:`.counters`.
This module only wires them to the hooks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pagetrack import hookimpl
from pagetrack.memory import MemSlot

from .bitmap import (
    alloc_dirty_bitmap,
    bitmap_gfns,
    get_dirty_log,
    gfns_to_bitmap,
    set_dirty_bit,
    use_dirty_bitmap,
)
from .clear import (
    ClearRequest,
    check_extension,
    clear_dirty_log,
    enable_manual_dirty_log_protect,
    qemu_log_clear,
)
from .counters import ROUND_STAT_KEYS
from .logger import DEFAULT_RING_ENTRIES, MODES, DirtyLogger, logger_of
from .pml import attach_pml, enable_pml, update_cpu_dirty_logging
from .ring import DIRTY_GFN_DTYPE, DirtyRing, enable_dirty_ring, reap_dirty_rings, reset_dirty_rings
from .track import WriteTrackLogger

__all__ = [
    "DEFAULT_RING_ENTRIES",
    "DIRTY_GFN_DTYPE",
    "MODES",
    "ROUND_STAT_KEYS",
    "ClearRequest",
    "DirtyLogger",
    "DirtyRing",
    "WriteTrackLogger",
    "bitmap_gfns",
    "check_extension",
    "clear_dirty_log",
    "enable_dirty_ring",
    "enable_manual_dirty_log_protect",
    "enable_pml",
    "get_dirty_log",
    "gfns_to_bitmap",
    "logger_of",
    "qemu_log_clear",
    "reap_dirty_rings",
    "reset_dirty_rings",
]


@hookimpl
def plugin_options(vm: Any, options: Mapping[str, Mapping[str, Any]]) -> None:
    """``{"dirty_log": {"mode": ..., ...}}`` (see :mod:`.logger`); a refusal is kept for ``start``."""
    logger = logger_of(vm)
    try:
        logger.configure(vm, options.get("dirty_log", {}))
    except Exception as exc:
        logger.error = exc
        raise


@hookimpl
def vcpu_created(vm: Any, vcpu: Any) -> None:
    """``kvm_vm_ioctl_create_vcpu``: the vCPU's dirty ring (``kvm_dirty_ring_alloc``) and PML page."""
    if vm.dirty_ring_size:
        vcpu.dirty_ring = DirtyRing.for_vcpu(vm)
    attach_pml(vm, vcpu)


@hookimpl
def memslot_commit(vm: Any, old: MemSlot | None, new: MemSlot | None) -> None:
    """``kvm_prepare_memory_region`` / ``kvm_commit_memory_region`` for dirty logging.

    A logging slot has a bitmap unless the VM uses a dirty ring; a kept bitmap
    (FLAGS_ONLY or MOVE with logging on) survives, a new one starts zeroed or,
    with INITIALLY_SET, all ones.  A change in the number of logging slots
    switches PML; the ``track`` mode arms or disarms the slot's pages.
    """
    was = old is not None and old.logging
    now = new is not None and new.logging
    if new is not None:
        if now and new.dirty_bitmap is None and use_dirty_bitmap(vm):
            new.dirty_bitmap = alloc_dirty_bitmap(vm, new)
        elif not now:
            new.dirty_bitmap = None
    if was != now:
        update_cpu_dirty_logging(vm)
        tracker = logger_of(vm).tracker
        if tracker is not None:
            if now:
                assert new is not None
                tracker.arm_slot(new)
            elif new is not None:
                tracker.disarm_slot(new)


@hookimpl
def mark_page_dirty(vm: Any, vcpu: Any, slot: MemSlot, gfn: int) -> None:
    """``mark_page_dirty_in_slot``: the running vCPU's ring if the VM has one, else the bitmap.

    On a ring VM a mark without a running vCPU finds no bitmap: x86 WARNs and the
    page is not reported (counted in ``marks_without_vcpu``).
    """
    if vm.dirty_ring_size:
        ring = getattr(vcpu, "dirty_ring", None)
        if ring is not None:
            if ring.push(slot.key, gfn - slot.base_gfn):
                vcpu.req_dirty_ring_soft_full = True  # KVM_REQ_DIRTY_RING_SOFT_FULL
            return
        logger_of(vm).marks_without_vcpu += 1
    if slot.dirty_bitmap is not None:
        set_dirty_bit(slot, gfn)


@hookimpl
def round_end(vm: Any) -> None:
    """The VMM's harvest point: one round for every dirty-logged slot."""
    logger_of(vm).harvest(vm)
