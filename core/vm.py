"""The VM: memslots, write tracking, the MMU, vCPUs, plugins and the audit log.

Models ``struct kvm`` and the VM-level ioctls a VMM uses:
``KVM_SET_USER_MEMORY_REGION`` (``kvm_set_memslot``: invalidate, prepare,
install, commit), the page-track API (``kvm_write_track_add_gfn`` ...,
``kvm_page_track_register_notifier``), host-side guest memory access
(``kvm_read_guest`` / ``kvm_write_guest``) and ``KVM_CREATE_VCPU``.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .audit import AuditLog
from .errors import KvmError
from .memory import (
    KVM_MEM_LOG_DIRTY_PAGES,
    PAGE_SHIFT,
    PAGE_SIZE,
    Change,
    HostMemory,
    MemSlot,
    MemSlots,
)
from .mmu import Mmu
from .page_track import WriteTrack
from .plugin_host import HookBus, PluginHost

if TYPE_CHECKING:
    from .vcpu import Vcpu

__all__ = ["KVM_DIRTY_LOG_INITIALLY_SET", "KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE", "VM"]

#: ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` options (include/uapi/linux/kvm.h).
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1

_ids = itertools.count()


class VM:
    """A simulated KVM virtual machine.

    :param tdp: two-dimensional paging (EPT/NPT) when true, shadow paging when false.
    :param plugins: tracker objects to register (in order; the last registered is
        notified first, as KVM's notifier list is LIFO).
    :param load_entry_points: discover plugins of the ``pagetrack`` entry-point group.
    :param enable: entry-point plugin names to load (``None``: all); ``disable``: names to skip.
    :param audit: an :class:`~pagetrack.audit.AuditLog`, a path for a JSON-lines log, or ``None``.
    :param strict: re-raise plugin exceptions instead of quarantining the plugin.
    :param options: per-plugin options, ``{plugin_name: {key: value}}``.
    :param host_huge_pages: back guest memory with huge host pages, so TDP may map 2M/1G.
    """

    def __init__(
        self,
        *,
        tdp: bool = True,
        plugins: Iterable[object] = (),
        load_entry_points: bool = True,
        enable: Collection[str] | None = None,
        disable: Collection[str] = (),
        audit: AuditLog | str | os.PathLike[str] | None = None,
        strict: bool = False,
        options: Mapping[str, Mapping[str, Any]] | None = None,
        host_huge_pages: bool = False,
        audit_level: str = "info",
    ) -> None:
        self.id = f"vm{next(_ids)}-{os.getpid()}"
        self._owner_pid = os.getpid()
        if isinstance(audit, AuditLog):
            self.audit = audit
        else:
            self.audit = AuditLog(Path(audit) if audit is not None else None, self.id, audit_level)
        self.tdp = tdp
        self.mmu_lock = threading.RLock()
        self.slots_lock = threading.RLock()
        self.host = HostMemory()
        self.memslots = MemSlots(self.host)
        self.write_track = WriteTrack(self.memslots, self.audit, tdp_enabled=tdp, flush=self.flush_remote_tlbs)
        self.mmu = Mmu(self, tdp=tdp, host_huge_pages=host_huge_pages)
        self.vcpus: list[Vcpu] = []
        #: ``kvm->manual_dirty_log_protect`` (``KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)``)
        #: and ``kvm->dirty_ring_size`` in bytes (``KVM_ENABLE_CAP(DIRTY_LOG_RING)``).
        self.manual_dirty_log_protect = 0
        self.dirty_ring_size = 0
        self.closed = False
        if self.audit.enabled:
            self.audit.emit("vm_create", tdp=tdp)
        self.plugins = PluginHost(audit=self.audit, strict=strict)
        self.hooks = HookBus(self.plugins, self.audit)
        if load_entry_points:
            self.plugins.load_entry_points(enable=enable, disable=disable)
        for plugin in plugins:
            self.plugins.register(plugin)
        self.plugins.check_pending()
        self._sync_external()
        self.hooks.vm_created(self)
        self.hooks.plugin_options(self, dict(options or {}))

    # ---- plugins (kvm_page_track_register_notifier / _unregister_notifier) -------
    def _sync_external(self) -> None:
        if self.plugins.has_external_tracker():
            self.write_track.enable_external()

    def register_tracker(self, plugin: object, name: str | None = None) -> str:
        """Register a tracker (``kvm_page_track_register_notifier``).

        Raises ``KvmError(ESRCH)`` from a process other than the VM's owner (the
        kernel's ``kvm->mm != current->mm`` check).  An external tracker enables
        write tracking for the VM for good (6.9+ on-demand allocation); if that
        allocation fails, the error propagates and the tracker is not left
        registered (``kvm_enable_external_write_tracking`` runs before the node
        is added).
        """
        if os.getpid() != self._owner_pid:
            raise KvmError("ESRCH", "only the process that created the VM may register trackers")
        with self.mmu_lock:
            registered = self.plugins.register(plugin, name)
            try:
                self._sync_external()
            except BaseException:
                self.plugins.unregister(registered)
                raise
        return registered

    def unregister_tracker(self, name_or_plugin: str | object) -> str:
        """Unregister (``kvm_page_track_unregister_notifier``): returns after in-flight calls end.

        The tracker's counts are not removed: it must remove them itself.
        """
        return self.plugins.unregister(name_or_plugin)

    def plugin(self, name: str) -> Any:
        """The registered plugin object called ``name`` (``KeyError`` if absent)."""
        obj = self.plugins.get(name)
        if obj is None:
            raise KeyError(name)
        return obj

    # ---- memslots (kvm_set_memory_region / kvm_set_memslot) ----------------------
    def set_user_memory_region(self, slot: int, flags: int, guest_phys_addr: int,
                               memory_size: int, userspace_addr: int) -> int:
        """``KVM_SET_USER_MEMORY_REGION``: returns 0 or raises :class:`KvmError`.

        DELETE and MOVE first notify ``track_flush_slot`` and zap all shadow
        pages (``kvm_invalidate_memslot`` → ``kvm_mmu_zap_all_fast``); a MOVE is then
        refused with EINVAL while an external tracker is registered
        (``kvm_arch_prepare_memory_region``, 6.6+).  CREATE and MOVE get fresh
        metadata (counters zero), FLAGS_ONLY shares the old.  A DELETE calls
        ``track_remove_region`` at commit.
        """
        # slots_lock serialises memslot updates (kvm->slots_lock); mmu_lock is taken
        # only around MMU work, so trackers are notified without it, as in KVM.
        with self.slots_lock:
            req = self.memslots.check(slot, flags, guest_phys_addr, memory_size, userspace_addr)
            if req is None:
                return 0
            old = req.old
            change = req.change
            if change in (Change.DELETE, Change.MOVE):
                assert old is not None
                if self.audit.enabled:
                    self.audit.emit("track_flush_slot", slot=old.key, base_gfn=old.base_gfn, npages=old.npages)
                self.hooks.track_flush_slot(self, old)
                with self.mmu_lock:
                    self.mmu.zap_all_fast()
                if change is Change.MOVE and self.plugins.has_external_tracker():
                    raise KvmError("EINVAL", "cannot move a memslot while an external write tracker is attached")
            new: MemSlot | None = None
            if change is not Change.DELETE:
                new = self.memslots.build(req)
                if change is Change.FLAGS_ONLY:
                    assert old is not None
                    new.arch = old.arch
                else:
                    self.write_track.create_slot_metadata(new)
                if old is not None and old.logging and new.logging:
                    new.dirty_bitmap = old.dirty_bitmap
            with self.mmu_lock:
                self.memslots.install(old, new)
            # ---- commit (kvm_arch_commit_memory_region) ----
            if change is Change.DELETE:
                assert old is not None
                if self.audit.enabled:
                    self.audit.emit("track_remove_region", gfn=old.base_gfn, nr_pages=old.npages)
                self.hooks.track_remove_region(self, old.base_gfn, old.npages)
            if self.audit.enabled:
                shown = new if new is not None else old
                assert shown is not None
                fields: dict[str, Any] = {
                    "change": change.value, "slot": shown.key, "base_gfn": shown.base_gfn,
                    "npages": shown.npages, "flags": shown.flags,
                }
                if change is Change.MOVE:
                    assert old is not None
                    fields["old_base_gfn"] = old.base_gfn
                self.audit.emit("memslot", **fields)
            if change is Change.DELETE:
                assert old is not None
                old.arch.gfn_write_track = None
                old.dirty_bitmap = None
            if (change is Change.FLAGS_ONLY and new is not None and old is not None
                    and new.logging != old.logging and not new.readonly):
                with self.mmu_lock:
                    if new.logging:
                        self.apply_dirty_logging(new)
                    else:
                        self.stop_dirty_logging(new)
            self.hooks.memslot_commit(self, change.value, old, new)
            return 0

    def apply_dirty_logging(self, slot: MemSlot) -> None:
        """``kvm_mmu_slot_apply_flags``, logging turned on (FLAGS_ONLY, not read-only).

        With manual protect and ``KVM_DIRTY_LOG_INITIALLY_SET`` nothing happens:
        every page is assumed dirty and CLEAR protects gradually.  Otherwise huge
        pages are split (eager splitting, TDP), the slot is write-protected — or
        its 4K leaves lose D when the CPU has PML — and TLBs are flushed
        unconditionally (a read-only SPTE may still be cached writable).
        """
        if self.manual_dirty_log_protect & KVM_DIRTY_LOG_INITIALLY_SET:
            return
        self.mmu.slot_wrprot_for_logging(slot, pml=bool(self.mmu.cpu_dirty_log_size))
        self.flush_remote_tlbs("log_dirty_enable")

    def stop_dirty_logging(self, slot: MemSlot) -> None:
        """``kvm_mmu_slot_apply_flags``, logging turned off: recover huge mappings.

        ``kvm_mmu_zap_collapsible_sptes``: 4K leaves that could be mapped huge are
        zapped (with a flush) so that the next access maps them huge again.
        """
        if self.mmu.recover_huge_pages(slot):
            self.flush_remote_tlbs("log_dirty_disable")

    def add_memory(self, guest_phys_addr: int, size: int, flags: int = 0, slot: int | None = None) -> MemSlot:
        """Map host memory and create a memslot for it (a VMM's usual two steps)."""
        if slot is None:
            used = {s.id for s in self.memslots.slots(0)}
            slot = next(i for i in itertools.count() if i not in used)
        hva = self.host.mmap(size)
        try:
            self.set_user_memory_region(slot, flags, guest_phys_addr, size, hva)
        except KvmError:
            self.host.munmap(hva)
            raise
        found = self.memslots.get(slot >> 16, slot & 0xFFFF)
        assert found is not None
        return found

    def enable_dirty_logging(self, slot: MemSlot, on: bool = True) -> None:
        """Set or clear ``KVM_MEM_LOG_DIRTY_PAGES`` on a slot (a FLAGS_ONLY change)."""
        flags = slot.flags | KVM_MEM_LOG_DIRTY_PAGES if on else slot.flags & ~KVM_MEM_LOG_DIRTY_PAGES
        self.set_user_memory_region(slot.key, flags, slot.base_gfn << PAGE_SHIFT,
                                    slot.npages << PAGE_SHIFT, slot.userspace_addr)

    # ---- page track API ----------------------------------------------------------
    def write_track_add_gfn(self, gfn: int) -> int:
        """``kvm_write_track_add_gfn``: 0, or ``KvmError(EINVAL)`` without a slot."""
        with self.mmu_lock:
            return self.write_track.add_gfn(gfn)

    def write_track_remove_gfn(self, gfn: int) -> int:
        """``kvm_write_track_remove_gfn``: 0, or ``KvmError(EINVAL)`` without a slot."""
        with self.mmu_lock:
            return self.write_track.remove_gfn(gfn)

    def gfn_is_write_tracked(self, gfn: int) -> bool:
        """``kvm_gfn_is_write_tracked`` (address space 0)."""
        return self.write_track.is_tracked(self.memslots.gfn_to_memslot(gfn), gfn)

    def write_track_count(self, gfn: int) -> int:
        """The raw counter of ``gfn`` (0 if untracked or no array)."""
        slot = self.memslots.gfn_to_memslot(gfn)
        if slot is None:
            raise KvmError("EINVAL", f"gfn {gfn:#x} is not in any memslot")
        return self.write_track.count(slot, gfn)

    # ---- dirty marking and TLB flushes ------------------------------------------
    def mark_page_dirty(self, vcpu: Any, slot: MemSlot, gfn: int) -> None:
        """``mark_page_dirty_in_slot``: only for dirty-logged slots; the logger records it."""
        if not slot.logging:
            return
        if self.audit.debug:
            self.audit.emit("dirty", "debug", gfn=gfn, slot=slot.key)
        self.hooks.mark_page_dirty(self, vcpu, slot, gfn)

    def flush_remote_tlbs(self, reason: str = "") -> None:
        """``kvm_flush_remote_tlbs``: every vCPU drops its cached translations."""
        self.mmu.stats.remote_tlb_flush += 1
        for vcpu in self.vcpus:
            vcpu.flush_tlb()
        if self.audit.debug:
            self.audit.emit("tlb_flush", "debug", scope="vm", reason=reason)

    # ---- host access to guest memory (kvm_read_guest / kvm_write_guest) ----------
    def _pieces(self, gpa: int, size: int) -> Iterable[tuple[MemSlot, int, int, int]]:
        done = 0
        while done < size:
            cur = gpa + done
            gfn = cur >> PAGE_SHIFT
            slot = self.memslots.gfn_to_memslot(gfn)
            if slot is None:
                raise KvmError("EFAULT", f"gpa {cur:#x} is not in any memslot")
            n = min(size - done, PAGE_SIZE - (cur & (PAGE_SIZE - 1)))
            off = ((gfn - slot.base_gfn) << PAGE_SHIFT) | (cur & (PAGE_SIZE - 1))
            yield slot, off, done, n
            done += n

    def read_guest(self, gpa: int, size: int) -> bytes:
        """``kvm_read_guest``."""
        return b"".join(bytes(slot.mem[off : off + n]) for slot, off, _, n in self._pieces(gpa, size))

    def write_guest(self, gpa: int, data: bytes, vcpu: Any = None) -> None:
        """``kvm_write_guest``: write, then mark each page dirty; never notifies trackers."""
        pieces = list(self._pieces(gpa, len(data)))
        for slot, _off, done, _n in pieces:
            if slot.readonly:
                raise KvmError("EFAULT", f"gpa {gpa + done:#x} is in a read-only memslot")
        for slot, off, done, n in pieces:
            slot.mem[off : off + n] = data[done : done + n]
            gfn = slot.base_gfn + (off >> PAGE_SHIFT)
            self.host.populated.add(slot.hva_page(gfn))
            self.mark_page_dirty(vcpu, slot, gfn)

    # ---- vCPUs and lifecycle --------------------------------------------------------
    def create_vcpu(self) -> Vcpu:
        """``KVM_CREATE_VCPU``."""
        from .vcpu import Vcpu

        vcpu = Vcpu(self, len(self.vcpus))
        self.vcpus.append(vcpu)
        self.hooks.vcpu_created(self, vcpu)
        return vcpu

    def close(self) -> None:
        """Destroy the VM: ``vm_destroyed`` hook, audit trailer, host memory unmapped."""
        if self.closed:
            return
        self.closed = True
        self.hooks.vm_destroyed(self)
        if self.audit.enabled:
            self.audit.emit("vm_destroy")
        self.audit.close()
        self.vcpus.clear()
        for slot in self.memslots.all_slots():
            slot.mem.release()
        self.host.close()

    def __enter__(self) -> VM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
