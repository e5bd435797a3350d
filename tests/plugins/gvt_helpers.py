"""Shared helpers of the GVT-g shadow GTT tests (spec gvt-shadow-gtt.md).

VMs get a 2 MiB low slot and a 16 MiB data slot at 0x400000 (gfns 0x400..0x13ff).
Guest GPU tables are written through the VMM's mapping (``poke``: no
notification) before they are shadowed, and through the emulator's order
(``guest_write``: commit, then ``track_write``) afterwards.  Full guest-program
runs live in test_gvt_guest.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
from pagetrack import VM
from pagetrack.audit import AuditLog
from pagetrack.plugins.gvt_shadow_gtt import attach_vgpu, detach_vgpu
from pagetrack.plugins.gvt_shadow_gtt.spt import Spt, intel_vgpu_find_spt_by_gfn
from pagetrack.plugins.gvt_shadow_gtt.vgpu import Vgpu
from track_helpers import make_vm

__all__ = [
    "DATA",
    "P",
    "chain",
    "events",
    "guest_write",
    "guest_write32",
    "guest_write64",
    "gvt",
    "peek",
    "poke",
    "pte",
    "spt_of",
]

DATA = 0x400000
P = 0x3  #: present | RW
PML4, PDP, PD, PT = 0x500, 0x501, 0x502, 0x503  #: gfns of the default chain


def pte(gfn: int, flags: int = P) -> int:
    return (gfn << 12) | flags


def poke(vm: VM, gpa: int, value: int) -> None:
    """The VMM writes 8 bytes of guest memory (no notification)."""
    vm.write_guest(gpa, value.to_bytes(8, "little"))


def peek(vm: VM, gpa: int) -> int:
    return int.from_bytes(vm.read_guest(gpa, 8), "little")


def guest_write(vm: VM, gpa: int, data: bytes) -> None:
    """What ``emulator_write_phys`` does: commit to guest memory, then notify every tracker."""
    vm.write_guest(gpa, data)
    vm.hooks.track_write(vm, None, gpa, data)


def guest_write64(vm: VM, gpa: int, value: int) -> None:
    guest_write(vm, gpa, value.to_bytes(8, "little"))


def guest_write32(vm: VM, gpa: int, value: int) -> None:
    guest_write(vm, gpa, value.to_bytes(4, "little"))


def chain(vm: VM, gfns: tuple[int, int, int, int] = (PML4, PDP, PD, PT),
          leaves: Mapping[int, int] | None = None) -> int:
    """PML4[0] → PDP[0] → PD[0] → PT with ``{index: gfn}`` 4K leaves; returns pdps[0]."""
    pml4, pdp, pd, pt = gfns
    poke(vm, pml4 << 12, pte(pdp))
    poke(vm, pdp << 12, pte(pd))
    poke(vm, pd << 12, pte(pt))
    for i, gfn in (leaves if leaves is not None else {0: 0x600}).items():
        poke(vm, (pt << 12) + 8 * i, pte(gfn))
    return pml4 << 12


def spt_of(vgpu: Vgpu, gfn: int) -> Spt:
    spt = intel_vgpu_find_spt_by_gfn(vgpu, gfn)
    assert spt is not None, f"gfn {gfn:#x} is not shadowed"
    return spt


def events(vm: VM, name: str | None = None) -> list[dict[str, Any]]:
    evs = list(vm.audit.events)
    return evs if name is None else [e for e in evs if e["event"] == name]


@pytest.fixture
def gvt() -> Iterator[Callable[..., tuple[VM, Vgpu]]]:
    """``gvt(tdp=True, **options) -> (vm, vgpu)``: a VM with memory and an attached vGPU."""
    made: list[VM] = []

    def factory(tdp: bool = True, *, attach: bool = True, data_size: int = 16 << 20,
                **options: Any) -> tuple[VM, Vgpu]:
        vm = make_vm(tdp, audit=AuditLog.in_memory(f"gvt-{len(made)}", "debug"))
        made.append(vm)
        vm.add_memory(0, 0x200000, slot=0)
        vm.add_memory(DATA, data_size, slot=1)
        vgpu = attach_vgpu(vm, **options) if attach else None
        return vm, vgpu  # type: ignore[return-value]

    yield factory
    for vm in made:
        detach_vgpu(vm)
        vm.close()
