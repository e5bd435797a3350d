"""Intel PML as KVM drives it (arch/x86/kvm/vmx/vmx.c, arch/x86/kvm/x86.c).

PML needs EPT with A/D bits: with shadow paging the CPU offers nothing and KVM
logs by write protection.  ``enable_pml`` sets ``kvm_x86_ops.cpu_dirty_log_size``
(512), which makes every re-arm clear D instead of W and reserves 512 more dirty
ring entries; each vCPU gets its PML page at creation; the PML execution control
is on while at least one memslot is dirty-logged.
"""

from __future__ import annotations

from typing import Any

from pagetrack.errors import KvmError
from pagetrack.mmu import PML_ENTITY_NUM, PmlBuffer

__all__ = ["attach_pml", "enable_pml", "nr_memslots_dirty_logging", "update_cpu_dirty_logging"]


def enable_pml(vm: Any, on: bool = True) -> bool:
    """The ``kvm_intel.pml`` module parameter for this VM; returns whether PML is in use.

    Only TDP VMs get it (``enable_pml`` requires EPT A/D bits); it must be chosen
    before any vCPU exists (``vmx_vcpu_create`` allocates the PML page).
    """
    if vm.vcpus:
        raise KvmError("EINVAL", "PML must be chosen before any vCPU is created")
    vm.mmu.cpu_dirty_log_size = PML_ENTITY_NUM if on and vm.tdp else 0
    return bool(vm.mmu.cpu_dirty_log_size)


def nr_memslots_dirty_logging(vm: Any) -> int:
    """``kvm->nr_memslots_dirty_logging``: memslots with ``KVM_MEM_LOG_DIRTY_PAGES``."""
    return sum(1 for slot in vm.memslots.all_slots() if slot.logging)


def attach_pml(vm: Any, vcpu: Any) -> None:
    """``vmx_vcpu_create``: the PML page, with the execution control as the VM needs it."""
    if vm.mmu.cpu_dirty_log_size:
        vcpu.pml = PmlBuffer()
        vcpu.pml_enabled = nr_memslots_dirty_logging(vm) > 0


def update_cpu_dirty_logging(vm: Any) -> None:
    """``kvm_mmu_update_cpu_dirty_logging`` → ``vmx_update_cpu_dirty_logging`` on every vCPU.

    PML logging is on exactly while some memslot is dirty-logged; turning it off
    leaves logged entries in the buffer for the next exit to flush.
    """
    if not vm.mmu.cpu_dirty_log_size:
        return
    on = nr_memslots_dirty_logging(vm) > 0
    for vcpu in vm.vcpus:
        vcpu.pml_enabled = on
