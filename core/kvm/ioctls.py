"""KVM ioctl numbers, ``<linux/kvm.h>`` structures as ctypes, and the ioctl call itself.

Request numbers are computed with the ``_IOC`` encoding of ``<asm-generic/ioctl.h>``.
Calls go through ``libc.ioctl`` via ctypes: ``fcntl.ioctl`` takes a signed C int
request and cannot pass every ``_IOW``/``_IOWR`` number on every Python build.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Any

__all__ = [
    "KvmClearDirtyLog",
    "KvmDirtyGfn",
    "KvmDirtyLog",
    "KvmDtable",
    "KvmEnableCap",
    "KvmRegs",
    "KvmRunHeader",
    "KvmSegment",
    "KvmSregs",
    "KvmStatsDesc",
    "KvmStatsHeader",
    "KvmUserspaceMemoryRegion",
    "ioctl",
]

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _iow(nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, nr, size)


def _ior(nr: int, size: int) -> int:
    return _ioc(_IOC_READ, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


u8, u16, u32, u64, s16 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int16


class KvmUserspaceMemoryRegion(ctypes.Structure):
    """``struct kvm_userspace_memory_region`` (KVM_SET_USER_MEMORY_REGION)."""

    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64),
                ("memory_size", u64), ("userspace_addr", u64)]


class KvmDirtyLog(ctypes.Structure):
    """``struct kvm_dirty_log`` (KVM_GET_DIRTY_LOG)."""

    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class KvmClearDirtyLog(ctypes.Structure):
    """``struct kvm_clear_dirty_log`` (KVM_CLEAR_DIRTY_LOG)."""

    _fields_ = [("slot", u32), ("num_pages", u32), ("first_page", u64), ("dirty_bitmap", u64)]


class KvmEnableCap(ctypes.Structure):
    """``struct kvm_enable_cap`` (KVM_ENABLE_CAP on the VM fd)."""

    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


REG_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")


class KvmRegs(ctypes.Structure):
    """``struct kvm_regs`` (KVM_GET_REGS / KVM_SET_REGS)."""

    _fields_ = [(n, u64) for n in REG_NAMES]


class KvmSegment(ctypes.Structure):
    """``struct kvm_segment``."""

    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8),
                ("present", u8), ("dpl", u8), ("db", u8), ("s", u8), ("l", u8),
                ("g", u8), ("avl", u8), ("unusable", u8), ("padding", u8)]


class KvmDtable(ctypes.Structure):
    """``struct kvm_dtable`` (GDTR / IDTR)."""

    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class KvmSregs(ctypes.Structure):
    """``struct kvm_sregs`` (KVM_GET_SREGS / KVM_SET_SREGS)."""

    _fields_ = [("cs", KvmSegment), ("ds", KvmSegment), ("es", KvmSegment),
                ("fs", KvmSegment), ("gs", KvmSegment), ("ss", KvmSegment),
                ("tr", KvmSegment), ("ldt", KvmSegment), ("gdt", KvmDtable),
                ("idt", KvmDtable), ("cr0", u64), ("cr2", u64), ("cr3", u64),
                ("cr4", u64), ("cr8", u64), ("efer", u64), ("apic_base", u64),
                ("interrupt_bitmap", u64 * 4)]


class KvmRunHeader(ctypes.Structure):
    """The fixed head of ``struct kvm_run`` plus its exit union (first 0x130 bytes)."""

    _fields_ = [("request_interrupt_window", u8), ("immediate_exit", u8),
                ("padding1", u8 * 6), ("exit_reason", u32),
                ("ready_for_interrupt_injection", u8), ("if_flag", u8), ("flags", u16),
                ("cr8", u64), ("apic_base", u64), ("exit", u8 * 256)]


class KvmIoExit(ctypes.Structure):
    """``kvm_run.io`` (KVM_EXIT_IO); the data lives at ``data_offset`` in the run page."""

    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32),
                ("data_offset", u64)]


class KvmInternalExit(ctypes.Structure):
    """``kvm_run.internal`` (KVM_EXIT_INTERNAL_ERROR)."""

    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class KvmFailEntryExit(ctypes.Structure):
    """``kvm_run.fail_entry`` (KVM_EXIT_FAIL_ENTRY)."""

    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class KvmDirtyGfn(ctypes.Structure):
    """``struct kvm_dirty_gfn``: one dirty-ring entry."""

    _fields_ = [("flags", u32), ("slot", u32), ("offset", u64)]


class KvmStatsHeader(ctypes.Structure):
    """``struct kvm_stats_header`` at offset 0 of a binary stats fd."""

    _fields_ = [("flags", u32), ("name_size", u32), ("num_desc", u32),
                ("id_offset", u32), ("desc_offset", u32), ("data_offset", u32)]


class KvmStatsDesc(ctypes.Structure):
    """``struct kvm_stats_desc`` without its trailing ``name[name_size]``."""

    _fields_ = [("flags", u32), ("exponent", s16), ("size", u16), ("offset", u32),
                ("bucket_size", u32)]


class KvmCpuidEntry2(ctypes.Structure):
    """``struct kvm_cpuid_entry2``."""

    _fields_ = [("function", u32), ("index", u32), ("flags", u32), ("eax", u32),
                ("ebx", u32), ("ecx", u32), ("edx", u32), ("padding", u32 * 3)]


def kvm_cpuid2(n: int) -> type[ctypes.Structure]:
    """``struct kvm_cpuid2`` with room for ``n`` entries."""

    class KvmCpuid2(ctypes.Structure):
        _fields_ = [("nent", u32), ("padding", u32), ("entries", KvmCpuidEntry2 * n)]

    return KvmCpuid2


# /dev/kvm
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, 8)
# VM fd
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, ctypes.sizeof(KvmDirtyLog))
KVM_SET_USER_MEMORY_REGION = _iow(0x46, ctypes.sizeof(KvmUserspaceMemoryRegion))
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, 8)
KVM_ENABLE_CAP = _iow(0xA3, ctypes.sizeof(KvmEnableCap))
KVM_CLEAR_DIRTY_LOG = _iowr(0xC0, ctypes.sizeof(KvmClearDirtyLog))
KVM_RESET_DIRTY_RINGS = _io(0xC7)
KVM_GET_STATS_FD = _io(0xCE)
# vCPU fd
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, ctypes.sizeof(KvmRegs))
KVM_SET_REGS = _iow(0x82, ctypes.sizeof(KvmRegs))
KVM_GET_SREGS = _ior(0x83, ctypes.sizeof(KvmSregs))
KVM_SET_SREGS = _iow(0x84, ctypes.sizeof(KvmSregs))
KVM_SET_CPUID2 = _iow(0x90, 8)

KVM_API_VERSION = 12

# capabilities
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_DIRTY_LOG_RING = 192
KVM_CAP_BINARY_STATS_FD = 203
KVM_CAP_DIRTY_LOG_RING_ACQ_REL = 223

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1
KVM_DIRTY_LOG_PAGE_OFFSET = 64
KVM_DIRTY_GFN_F_DIRTY = 1 << 0
KVM_DIRTY_GFN_F_RESET = 1 << 1

# exit reasons
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_DIRTY_RING_FULL = 31
KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

EXIT_NAMES = {
    0: "UNKNOWN", 1: "EXCEPTION", 2: "IO", 3: "HYPERCALL", 4: "DEBUG", 5: "HLT",
    6: "MMIO", 7: "IRQ_WINDOW_OPEN", 8: "SHUTDOWN", 9: "FAIL_ENTRY", 10: "INTR",
    17: "INTERNAL_ERROR", 24: "SYSTEM_EVENT", 29: "X86_RDMSR", 30: "X86_WRMSR",
    31: "DIRTY_RING_FULL", 33: "X86_BUS_LOCK", 37: "NOTIFY",
}
INTERNAL_ERROR_NAMES = {1: "EMULATION", 2: "SIMUL_EX", 3: "DELIVERY_EV", 4: "UNEXPECTED_EXIT_REASON"}

# binary stats descriptor flags
KVM_STATS_TYPE_MASK = 0xF
KVM_STATS_TYPE_LINEAR_HIST = 3
KVM_STATS_TYPE_LOG_HIST = 4

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


def ioctl(fd: int, request: int, arg: Any = None) -> int:
    """Call ``ioctl(fd, request, arg)``; ``arg`` is None, an int or a ctypes object.

    Raises ``OSError`` with the errno on failure; returns the (non-negative) result.
    """
    if arg is None:
        ptr: Any = None
    elif isinstance(arg, int):
        ptr = ctypes.c_void_p(arg)
    else:
        ptr = ctypes.byref(arg)
    ret = _libc.ioctl(fd, request, ptr)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"ioctl {request:#x}: {os.strerror(err)}")
    return ret
