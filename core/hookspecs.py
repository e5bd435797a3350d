"""Hook specifications: the contract between the simulated KVM and trackers.

The first three hooks are KVM's page-track notifier contract
(``struct kvm_page_track_notifier_node`` in arch/x86/include/asm/kvm_page_track.h).
The rest are lifecycle hooks that a tracker needs around them.

Implementations take any subset of the arguments (pluggy's opt-in arguments), so
a tracker that only needs ``gpa`` and ``new`` declares just those.  Mark them with
:data:`pagetrack.hookimpl`.

Ordering follows KVM 6.6+: external trackers are called first, most recently
registered first (the notifier list is LIFO, ``kvm_page_track_register_notifier``
inserts at the head); the MMU's own tracker (``kvm_mmu_track_write``) is
registered ``trylast`` and so always runs last.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .memory import MemSlot

__all__ = ["PROJECT", "hookimpl", "hookspec"]

PROJECT = "pagetrack"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def track_write(vm: Any, vcpu: Any, gpa: int, new: bytes) -> None:
    """An emulated guest write has been committed to guest memory.

    Called once per page piece, in ascending address order: a store that crosses
    a page boundary gives two calls, the first with the bytes up to the boundary.
    It is called for every write that the instruction emulator commits to guest
    RAM, whether or not the gfn is write-tracked (each tracker filters for
    itself, as in the kernel); plain guest stores that did not fault never reach
    it.  A ``cmpxchg`` whose compare fails is notified too: ``em_cmpxchg``
    writes the value it read back (a write cycle with the same bytes).

    :param vm: the :class:`pagetrack.VM`.
    :param vcpu: the :class:`pagetrack.Vcpu` whose instruction wrote.
    :param gpa: guest-physical address of the first byte of this piece.
    :param new: the bytes written (``len(new)`` is the kernel's ``bytes``).

    Kernel: ``kvm_page_track_write`` → ``__kvm_page_track_write`` →
    ``node->track_write(gpa, new, bytes, node)``, called from
    ``emulator_write_phys`` and ``emulator_cmpxchg_emulated``.

    .. versionadded:: 0.1
    """


@hookspec
def track_flush_slot(vm: Any, slot: MemSlot) -> None:
    """A memslot is about to be deleted or moved.

    Called before the change is prepared, so it also fires when the change then
    fails (a MOVE refused because an external tracker is attached).  Trackers
    drop the write protection they hold in the slot.

    :param vm: the VM.
    :param slot: the :class:`pagetrack.MemSlot` as it is before the change.

    Kernel: ``kvm_page_track_flush_slot`` → ``node->track_flush_slot`` (up to
    6.5, from ``kvm_arch_flush_shadow_memslot``).

    .. versionadded:: 0.1
    """


@hookspec
def track_remove_region(vm: Any, gfn: int, nr_pages: int) -> None:
    """A memslot was deleted: ``nr_pages`` frames from ``gfn`` are gone.

    Called once, at commit time of a DELETE, after the slot has left the memslot
    set and before its write-track counters are freed.  Counts a tracker still
    holds there are discarded; it should forget them.

    :param vm: the VM.
    :param gfn: the slot's base gfn.
    :param nr_pages: the slot's size in 4 KiB pages.

    Kernel: ``kvm_page_track_delete_slot`` → ``node->track_remove_region``
    (6.6+, from ``kvm_arch_commit_memory_region``).

    .. versionadded:: 0.1
    """


@hookspec
def mark_page_dirty(vm: Any, vcpu: Any, slot: MemSlot, gfn: int) -> None:
    """A page of a dirty-logged memslot was dirtied.

    Called only for slots with ``KVM_MEM_LOG_DIRTY_PAGES``: when the fast page
    fault makes a dirty-log-protected SPTE writable, when a writable SPTE is
    installed in a logged slot, after KVM itself writes guest memory
    (emulated instructions, host-side writes), and for each gpa of a vCPU's
    Intel PML buffer when it is flushed (``vmx_flush_pml_buffer``).

    :param vm: the VM.
    :param vcpu: the vCPU running on this thread, or ``None`` for a write made
        outside vCPU context (the kernel then falls back to the bitmap).
    :param slot: the memslot.
    :param gfn: the absolute guest frame number.

    Kernel: ``mark_page_dirty_in_slot`` (virt/kvm/kvm_main.c).

    .. versionadded:: 0.1
    """


@hookspec
def memslot_commit(vm: Any, change: str, old: MemSlot | None, new: MemSlot | None) -> None:
    """A memslot change has been committed.

    :param vm: the VM.
    :param change: ``"create"``, ``"delete"``, ``"move"`` or ``"flags_only"``.
    :param old: the slot before the change (``None`` for create).
    :param new: the slot after the change (``None`` for delete).

    Kernel: ``kvm_commit_memory_region`` / ``kvm_arch_commit_memory_region``.

    .. versionadded:: 0.1
    """


@hookspec
def vm_created(vm: Any) -> None:
    """The VM exists and its plugins are registered; no vCPU exists yet.

    Kernel: ``kvm_create_vm`` (``KVM_CREATE_VM``).

    .. versionadded:: 0.1
    """


@hookspec
def vcpu_created(vm: Any, vcpu: Any) -> None:
    """A vCPU was created.

    Kernel: ``kvm_vm_ioctl_create_vcpu`` (``KVM_CREATE_VCPU``).

    .. versionadded:: 0.1
    """


@hookspec
def vm_destroyed(vm: Any) -> None:
    """The VM is being torn down; its memslots still exist.

    Kernel: ``kvm_destroy_vm``.

    .. versionadded:: 0.1
    """


@hookspec
def plugin_options(vm: Any, options: Mapping[str, Mapping[str, Any]]) -> None:
    """Options for plugins, keyed by plugin name; each plugin reads its own.

    Called once after ``vm_created``, before any vCPU runs.  No kernel
    counterpart: this is how a scenario or the CLI configures trackers.

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def guest_port_io(vm: Any, vcpu: Any, port: int, size: int, value: int, is_write: bool) -> int | None:
    """The guest executed ``out`` or ``in`` on a port the ABI does not reserve.

    The first implementation that returns non-``None`` claims the access; for
    ``in`` its result is the value read.  Unclaimed ``out`` values are recorded
    in the run's ``io`` list; unclaimed ``in`` reads all ones.  No kernel
    counterpart (``KVM_EXIT_IO`` is handled by the VMM).

    .. versionadded:: 0.1
    """


@hookspec
def round_end(vm: Any, vcpu: Any, index: int, final: bool) -> None:
    """A dirty-log round ended: the guest wrote ``ROUND_PORT`` or halted.

    :param index: number of the round that ended, from 0.
    :param final: true when the round was closed by ``hlt``.

    No kernel counterpart: this is the VMM's harvest point.

    .. versionadded:: 0.1
    """
