"""Per-round counters of the dirty logger: what each harvest round cost.

Each round's entry is the difference of ``vm.mmu.stats`` and the vCPUs' exit
counters between the end of the previous harvest and the end of this one (so a
harvest's own re-protection and TLB flush count in the round it closes), plus the
wall-clock time spent harvesting (``time.perf_counter``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["ROUND_STAT_KEYS", "RoundCounters"]

_MMU = {"faults": "pf_taken", "fast_path_fixes": "pf_fast", "emulations": "insn_emulation",
        "tlb_flushes": "remote_tlb_flush"}
_VCPU = {"ring_full_exits": "dirty_ring_full_exits", "pml_flushes": "pml_flushes",
         "pml_full_exits": "pml_full_exits"}
#: Keys of every round's dict, in order.
ROUND_STAT_KEYS = (*_MMU, *_VCPU, "collections", "pages", "harvest_time")


def _snapshot(vm: Any) -> dict[str, int]:
    stats = vm.mmu.stats
    out = {key: int(getattr(stats, name)) for key, name in _MMU.items()}
    for key, name in _VCPU.items():
        out[key] = sum(int(getattr(v, name, 0)) for v in vm.vcpus)
    return out


class RoundCounters:
    """Accumulates one dict per harvested round in :attr:`rounds`."""

    def __init__(self) -> None:
        self.rounds: list[dict[str, Any]] = []
        self._base: dict[str, int] | None = None
        self._time = 0.0
        self._collections = 0

    def begin(self, vm: Any) -> None:
        """Start counting now (the VMM's start, before the first ``KVM_RUN``)."""
        self._base = _snapshot(vm)
        self._time = 0.0
        self._collections = 0

    def collected(self, seconds: float) -> None:
        """One collection (GET, GET+CLEAR, ring reap+reset, ...) took ``seconds``."""
        self._time += seconds
        self._collections += 1

    def close(self, vm: Any, pages: int, seconds: float) -> dict[str, Any]:
        """End the round: deltas since the last close (or :meth:`begin`; else since VM creation)."""
        now = _snapshot(vm)
        base = self._base or dict.fromkeys(now, 0)
        entry: dict[str, Any] = {key: now[key] - base[key] for key in now}
        entry["collections"] = self._collections
        entry["pages"] = pages
        entry["harvest_time"] = self._time + seconds
        self.rounds.append(entry)
        self._base = now
        self._time = 0.0
        self._collections = 0
        return entry
