"""Thin wrappers over the KVM file descriptors: the system fd, a VM, guest memory, a vCPU.

Each method names the ioctl it issues.  Nothing here knows about the guest ABI.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

from . import ioctls as k
from .ioctls import ioctl

__all__ = ["GuestMemory", "Kvm", "KvmUnavailable", "Vcpu", "Vm"]

PAGE_SIZE = mmap.PAGESIZE


class KvmUnavailable(RuntimeError):
    """``/dev/kvm`` is missing, not accessible, or lacks a capability we need."""


class Kvm:
    """The system fd (``open("/dev/kvm")``, KVM_GET_API_VERSION, KVM_CHECK_EXTENSION)."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise KvmUnavailable(f"cannot open {path}: {exc.strerror}") from None
        try:
            version = ioctl(self.fd, k.KVM_GET_API_VERSION)
        except OSError as exc:
            os.close(self.fd)
            raise KvmUnavailable(f"{path}: KVM_GET_API_VERSION failed: {exc.strerror}") from None
        if version != k.KVM_API_VERSION:
            os.close(self.fd)
            raise KvmUnavailable(f"{path}: KVM API version {version}, expected {k.KVM_API_VERSION}")
        self.vcpu_mmap_size = ioctl(self.fd, k.KVM_GET_VCPU_MMAP_SIZE)

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the system fd (0 when unsupported)."""
        try:
            return ioctl(self.fd, k.KVM_CHECK_EXTENSION, cap)
        except OSError:
            return 0

    def supported_cpuid(self) -> ctypes.Structure:
        """KVM_GET_SUPPORTED_CPUID, retried with a bigger buffer on E2BIG."""
        n = 64
        while True:
            cpuid = k.kvm_cpuid2(n)()
            cpuid.nent = n
            try:
                ioctl(self.fd, k.KVM_GET_SUPPORTED_CPUID, cpuid)
                return cpuid
            except OSError as exc:
                if exc.errno != errno.E2BIG or n > 4096:
                    raise
                n *= 2

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class GuestMemory:
    """Private anonymous mapping (MAP_NORESERVE, populated lazily) that backs one memslot."""

    def __init__(self, size: int) -> None:
        self.size = size
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
        self.map = mmap.mmap(-1, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._anchor = ctypes.c_char.from_buffer(self.map)
        self.hva = ctypes.addressof(self._anchor)

    def close(self) -> None:
        del self._anchor
        self.map.close()


class Vm:
    """A VM fd (KVM_CREATE_VM) with memslots, capabilities, dirty-log ioctls and stats."""

    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm
        self.fd = ioctl(kvm.fd, k.KVM_CREATE_VM, 0)

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd."""
        try:
            return ioctl(self.fd, k.KVM_CHECK_EXTENSION, cap)
        except OSError:
            return 0

    def enable_cap(self, cap: int, *args: int) -> None:
        """KVM_ENABLE_CAP with up to four arguments."""
        ec = k.KvmEnableCap(cap=cap)
        for i, a in enumerate(args):
            ec.args[i] = a
        ioctl(self.fd, k.KVM_ENABLE_CAP, ec)

    def set_tss_addr(self, addr: int) -> None:
        """KVM_SET_TSS_ADDR (needed by VMX for real mode; harmless elsewhere)."""
        ioctl(self.fd, k.KVM_SET_TSS_ADDR, addr)

    def set_memory_region(self, slot: int, gpa: int, mem: GuestMemory, flags: int) -> None:
        """KVM_SET_USER_MEMORY_REGION."""
        region = k.KvmUserspaceMemoryRegion(slot=slot, flags=flags, guest_phys_addr=gpa,
                                            memory_size=mem.size, userspace_addr=mem.hva)
        ioctl(self.fd, k.KVM_SET_USER_MEMORY_REGION, region)

    def get_dirty_log(self, slot: int, bitmap: ctypes.Array) -> None:
        """KVM_GET_DIRTY_LOG into ``bitmap`` (one bit per page of the slot)."""
        log = k.KvmDirtyLog(slot=slot, dirty_bitmap=ctypes.addressof(bitmap))
        ioctl(self.fd, k.KVM_GET_DIRTY_LOG, log)

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int,
                        bitmap: ctypes.Array) -> None:
        """KVM_CLEAR_DIRTY_LOG: re-protect the pages whose bits are set in ``bitmap``."""
        log = k.KvmClearDirtyLog(slot=slot, num_pages=num_pages, first_page=first_page,
                                 dirty_bitmap=ctypes.addressof(bitmap))
        ioctl(self.fd, k.KVM_CLEAR_DIRTY_LOG, log)

    def reset_dirty_rings(self) -> int:
        """KVM_RESET_DIRTY_RINGS: returns how many ring entries KVM reset."""
        return ioctl(self.fd, k.KVM_RESET_DIRTY_RINGS)

    def stats_fd(self) -> int:
        """KVM_GET_STATS_FD on the VM fd."""
        return ioctl(self.fd, k.KVM_GET_STATS_FD)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Vcpu:
    """A vCPU fd (KVM_CREATE_VCPU) with its mmap'ed ``struct kvm_run``."""

    def __init__(self, vm: Vm, index: int = 0) -> None:
        self.vm = vm
        self.fd = ioctl(vm.fd, k.KVM_CREATE_VCPU, index)
        self.run_map = mmap.mmap(self.fd, vm.kvm.vcpu_mmap_size, flags=mmap.MAP_SHARED,
                                 prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.run = k.KvmRunHeader.from_buffer(self.run_map)
        self.io = k.KvmIoExit.from_buffer(self.run_map, 0x20)
        self.internal = k.KvmInternalExit.from_buffer(self.run_map, 0x20)
        self.fail_entry = k.KvmFailEntryExit.from_buffer(self.run_map, 0x20)

    def set_cpuid(self, cpuid: ctypes.Structure) -> None:
        """KVM_SET_CPUID2."""
        ioctl(self.fd, k.KVM_SET_CPUID2, cpuid)

    def get_regs(self) -> k.KvmRegs:
        """KVM_GET_REGS."""
        regs = k.KvmRegs()
        ioctl(self.fd, k.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: k.KvmRegs) -> None:
        """KVM_SET_REGS."""
        ioctl(self.fd, k.KVM_SET_REGS, regs)

    def get_sregs(self) -> k.KvmSregs:
        """KVM_GET_SREGS."""
        sregs = k.KvmSregs()
        ioctl(self.fd, k.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: k.KvmSregs) -> None:
        """KVM_SET_SREGS."""
        ioctl(self.fd, k.KVM_SET_SREGS, sregs)

    def run_once(self) -> int:
        """KVM_RUN until the next exit; returns ``kvm_run.exit_reason`` (EINTR → KVM_EXIT_INTR)."""
        try:
            ioctl(self.fd, k.KVM_RUN)
        except OSError as exc:
            if exc.errno in (errno.EINTR, errno.EAGAIN):
                return k.KVM_EXIT_INTR
            raise
        return int(self.run.exit_reason)

    def io_data(self) -> memoryview:
        """The PIO data area of the current KVM_EXIT_IO (``size * count`` bytes)."""
        off = int(self.io.data_offset)
        return memoryview(self.run_map)[off: off + self.io.size * self.io.count]

    def map_dirty_ring(self, size_bytes: int) -> mmap.mmap:
        """mmap the vCPU's dirty ring at KVM_DIRTY_LOG_PAGE_OFFSET pages into the vCPU fd."""
        return mmap.mmap(self.fd, size_bytes, flags=mmap.MAP_SHARED,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE,
                         offset=k.KVM_DIRTY_LOG_PAGE_OFFSET * PAGE_SIZE)

    def stats_fd(self) -> int:
        """KVM_GET_STATS_FD on the vCPU fd."""
        return ioctl(self.fd, k.KVM_GET_STATS_FD)

    def close(self) -> None:
        if self.fd >= 0:
            del self.run, self.io, self.internal, self.fail_entry
            self.run_map.close()
            os.close(self.fd)
            self.fd = -1
