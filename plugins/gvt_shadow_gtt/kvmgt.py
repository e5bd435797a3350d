"""The KVM glue of a vGPU (i915 gvt/kvmgt.c, 6.6+).

* ``ptable`` (``kvmgt_pgfn`` hash): the gfns for which this vGPU holds exactly
  one KVM write-track reference — idempotence and the write-callback filter.
* :class:`KvmgtTracker` is the ``kvm_page_track_notifier_node`` embedded in the
  vGPU: registered with ``vm.register_tracker`` at open, unregistered at close.
  Its ``track_write`` is ``kvmgt_page_track_write`` and its
  ``track_remove_region`` is ``kvmgt_page_track_remove_region``; it has no
  ``track_flush_slot`` (that notifier is the ≤ 6.5 one).
* Only pagetrack's public page-track API is used: ``register_tracker`` /
  ``unregister_tracker`` (``kvm_page_track_(un)register_notifier``) and
  ``write_track_add_gfn`` / ``write_track_remove_gfn``
  (``kvm_write_track_add_gfn`` / ``kvm_write_track_remove_gfn``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pagetrack import hookimpl
from pagetrack.errors import KvmError

from .errors import GvtError

if TYPE_CHECKING:
    from .vgpu import Vgpu

__all__ = [
    "KvmgtTracker",
    "intel_gvt_page_track_add",
    "intel_gvt_page_track_remove",
    "kvmgt_gfn_is_write_protected",
    "kvmgt_page_track_remove_region",
    "kvmgt_page_track_write",
    "kvmgt_protect_table_add",
    "kvmgt_protect_table_del",
    "kvmgt_protect_table_destroy",
]


# ---- the protect table (ptable) --------------------------------------------------------


def kvmgt_gfn_is_write_protected(vgpu: Vgpu, gfn: int) -> bool:
    """``kvmgt_gfn_is_write_protected``: is gfn in ptable (asserts ``vgpu_lock``)."""
    vgpu.lock.assert_held()
    return gfn in vgpu.ptable


def kvmgt_protect_table_add(vgpu: Vgpu, gfn: int) -> None:
    """``kvmgt_protect_table_add``: no-op if present."""
    vgpu.lock.assert_held()
    vgpu.ptable.add(gfn)


def kvmgt_protect_table_del(vgpu: Vgpu, gfn: int) -> None:
    """``kvmgt_protect_table_del``."""
    vgpu.lock.assert_held()
    vgpu.ptable.discard(gfn)


def kvmgt_protect_table_destroy(vgpu: Vgpu) -> None:
    """``kvmgt_protect_table_destroy``: forget every entry without calling KVM."""
    vgpu.ptable.clear()


# ---- intel_gvt_page_track_add / _remove ------------------------------------------------


def intel_gvt_page_track_add(vgpu: Vgpu, gfn: int) -> None:
    """``intel_gvt_page_track_add``: -ESRCH unless attached; one KVM reference per gfn.

    A gfn already in ptable → 0 without calling KVM.  ``kvm_write_track_add_gfn``
    failing (-EINVAL: no memslot) leaves ptable unchanged and is returned.
    """
    vgpu.lock.assert_held()
    if not vgpu.attached:
        raise GvtError("ESRCH", "vGPU is not attached")
    if kvmgt_gfn_is_write_protected(vgpu, gfn):
        return
    try:
        vgpu.vm.write_track_add_gfn(gfn)
    except KvmError as exc:
        raise GvtError(exc.errno_name, f"kvm_write_track_add_gfn({gfn:#x}): {exc.strerror}") from exc
    kvmgt_protect_table_add(vgpu, gfn)


def intel_gvt_page_track_remove(vgpu: Vgpu, gfn: int) -> None:
    """``intel_gvt_page_track_remove``: -ESRCH unless attached; 0 if gfn is not in ptable."""
    vgpu.lock.assert_held()
    if not vgpu.attached:
        raise GvtError("ESRCH", "vGPU is not attached")
    if not kvmgt_gfn_is_write_protected(vgpu, gfn):
        return
    try:
        vgpu.vm.write_track_remove_gfn(gfn)
    except KvmError as exc:
        raise GvtError(exc.errno_name, f"kvm_write_track_remove_gfn({gfn:#x}): {exc.strerror}") from exc
    kvmgt_protect_table_del(vgpu, gfn)


# ---- the notifier callbacks ------------------------------------------------------------


def kvmgt_page_track_write(vgpu: Vgpu, gpa: int, val: bytes) -> None:
    """``kvmgt_page_track_write`` (6.6+): under ``vgpu_lock``, filter by ptable, dispatch.

    The handler's result is ignored: nothing goes back to KVM or the guest.
    """
    from .page_track import intel_vgpu_page_track_handler

    vgpu.stats.track_write_calls += 1
    with vgpu.lock:
        gfn = gpa >> 12
        if not kvmgt_gfn_is_write_protected(vgpu, gfn):
            return
        vgpu.stats.handled_writes += 1
        if vgpu.audit_on:
            vgpu.emit("gvt_handler", gfn=gfn, gpa=gpa, len=len(val))
        intel_vgpu_page_track_handler(vgpu, gpa, val, len(val))


def kvmgt_page_track_remove_region(vgpu: Vgpu, gfn: int, nr_pages: int) -> None:
    """``kvmgt_page_track_remove_region``: drop ptable entries of a deleted slot, no KVM call.

    GVT's page-track records and shadow pages are left alone (they keep
    ``tracked = True``).
    """
    with vgpu.lock:
        dropped = [g for g in vgpu.ptable if gfn <= g < gfn + nr_pages]
        for g in dropped:
            kvmgt_protect_table_del(vgpu, g)
        if vgpu.audit_on:
            vgpu.emit("gvt_remove_region", gfn=gfn, nr_pages=nr_pages, dropped=len(dropped))


class KvmgtTracker:
    """The vGPU's ``kvm_page_track_notifier_node`` (``vgpu->track_node``).

    Besides the two notifier callbacks it claims the GVT guest port while its
    vGPU is attached (the VMM forwarding the guest's PV notifications and ELSP
    submissions to GVT) and closes the vGPU when the VM is destroyed.
    """

    def __init__(self, vgpu: Vgpu) -> None:
        self.vgpu = vgpu

    @hookimpl
    def track_write(self, gpa: int, new: bytes) -> None:
        """``node->track_write`` = ``kvmgt_page_track_write``."""
        kvmgt_page_track_write(self.vgpu, gpa, new)

    @hookimpl
    def track_remove_region(self, gfn: int, nr_pages: int) -> None:
        """``node->track_remove_region`` = ``kvmgt_page_track_remove_region``."""
        kvmgt_page_track_remove_region(self.vgpu, gfn, nr_pages)

    @hookimpl
    def guest_port_io(self, port: int, size: int, value: int, is_write: bool) -> int | None:
        """The GVT port (see :mod:`.port`); other ports are left to other plugins."""
        from .port import handle_port

        return handle_port(self.vgpu, port, size, value, is_write)

    @hookimpl
    def vm_destroyed(self, vm: Any) -> None:
        """QEMU closes the vfio device before the VM goes: close and destroy the vGPU."""
        from . import detach_vgpu

        detach_vgpu(vm)
