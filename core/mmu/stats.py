"""MMU and vCPU statistics, named after KVM's (``struct kvm_vm_stat`` / ``kvm_vcpu_stat``)."""

from __future__ import annotations

import attrs

__all__ = ["MmuStats"]


@attrs.define
class MmuStats:
    """Counters; each field is the KVM stat of the same name unless noted."""

    pf_taken: int = 0
    pf_fixed: int = 0
    pf_emulate: int = 0
    pf_spurious: int = 0
    pf_fast: int = 0
    pf_mmio_spte_created: int = 0
    pf_guest: int = 0  #: faults injected into the guest (not a KVM stat)
    insn_emulation: int = 0
    insn_emulation_fail: int = 0
    mmu_cache_miss: int = 0
    mmu_unsync: int = 0
    mmu_shadow_zapped: int = 0
    mmu_pte_write: int = 0
    mmu_pde_zapped: int = 0
    mmu_flooded: int = 0
    mmu_recycled: int = 0
    max_mmu_rmap_size: int = 0
    remote_tlb_flush: int = 0
    remote_tlb_flush_requests: int = 0
    track_write_calls: int = 0  #: track_write dispatches (one per page piece)
    unprotect_retry: int = 0  #: faults resolved by unprotect-and-retry

    def as_dict(self) -> dict[str, int]:
        return attrs.asdict(self)
