"""GVT-g shadow GTT costs: what one trapped GTT entry update costs, end to end and in parts.

Run: ``python3 bench/bench_gvt.py``.  Prints one line per figure; nothing here is a test.

* guest: a guest program rewrites the 512 PTEs of a shadowed page table in a
  loop (each store faults, is emulated, reaches ``kvmgt_page_track_write``, maps
  the new page and unmaps the old one); the cost per update is the time of the
  run with the loop minus the run without it, divided by the updates;
* the same loop on a page nobody tracks, for scale;
* hook path: the emulator's order (commit, then ``track_write``) called from
  Python, without a vCPU — the GVT share of the cost;
* a 4-byte half (post-shadow) and the submit that resolves it;
* shadowing a 512-entry page table at mm creation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pagetrack import VM
from pagetrack.plugins.gvt_shadow_gtt import attach_vgpu, detach_vgpu
from pagetrack.program import assemble
from pagetrack.runner import run_program

P = 3
PML4, PDP, PD, PT = 0x500, 0x501, 0x502, 0x503
LEAF = 0x600

GUEST = """
.equ GVT_PORT, 0x20
.equ DESC, DATA_BASE
.equ PML4, 0x500000
.equ PDP, 0x501000
.equ PD, 0x502000
.equ PT, 0x503000
    mov rax, PDP + 3
    mov qword ptr [PML4], rax
    mov rax, PD + 3
    mov qword ptr [PDP], rax
    mov rax, PT + 3
    mov qword ptr [PD], rax
    mov rdi, PT
    mov rax, 0x600003
    mov ecx, 512
fill:                                   # PT[i] -> gfn 0x600 + i
    mov qword ptr [rdi], rax
    add rdi, 8
    add rax, 0x1000
    dec ecx
    jnz fill
    mov dword ptr [DESC], 4             # VGT_G2V_PPGTT_L4_PAGE_TABLE_CREATE
    mov rax, PML4
    mov qword ptr [DESC + 8], rax
    mov eax, DESC
    out GVT_PORT, eax
    mov r12, ROUNDS
    test r12, r12
    jz done
again:
    mov rdi, PT
    mov ecx, 512
remap:                                  # PT[i] -> the other page of its pair: trapped
    mov rax, qword ptr [rdi]
    xor rax, 0x1000
    mov qword ptr [rdi], rax
    add rdi, 8
    dec ecx
    jnz remap
    dec r12
    jnz again
done:
    hlt
"""


def _best(fn: Callable[[], float], repeat: int = 3) -> float:
    return min(fn() for _ in range(repeat))


def _run(rounds: int, attach: bool, tdp: bool) -> tuple[float, dict[str, Any]]:
    program = assemble(GUEST, "bench-gvt", {"ROUNDS": rounds})
    options = {"gvt_shadow_gtt": {"attach": True, "check_invariant": False}} if attach else None
    box: dict[str, Any] = {}

    def hook(vm: Any, vcpu: Any) -> None:
        box["vm"] = vm

    t = time.perf_counter()
    result = run_program(program, tdp=tdp, options=options, vm_hook=hook)
    elapsed = time.perf_counter() - t
    assert result["exit"] == "hlt", result["exit"]
    return elapsed, result


def guest_update_us(tdp: bool, attach: bool = True, rounds: int = 8) -> float:
    """µs per guest PTE store in the remap loop (trapped with a vGPU, plain without)."""
    updates = rounds * 512
    base = _best(lambda: _run(0, attach, tdp)[0])
    full = _best(lambda: _run(rounds, attach, tdp)[0])
    return (full - base) / updates * 1e6


def _vm_with_pt() -> tuple[VM, Any]:
    vm = VM(enable=("shadow_mmu", "dirty_log"))
    vm.add_memory(0, 0x200000, slot=0)
    vm.add_memory(0x400000, 16 << 20, slot=1)
    vgpu = attach_vgpu(vm, check_invariant=False)
    w = vm.write_guest
    w(PML4 << 12, ((PDP << 12) | P).to_bytes(8, "little"))
    w(PDP << 12, ((PD << 12) | P).to_bytes(8, "little"))
    w(PD << 12, ((PT << 12) | P).to_bytes(8, "little"))
    w(PT << 12, b"".join((((LEAF + i) << 12) | P).to_bytes(8, "little") for i in range(512)))
    return vm, vgpu


def hook_update_us(nbytes: int = 8) -> float:
    """µs per trapped update through the hook path (commit + track_write), no vCPU."""
    vm, vgpu = _vm_with_pt()
    vgpu.get_ppgtt_mm([PML4 << 12])
    n = 512
    flip = [0]

    def once() -> float:
        flip[0] ^= 1
        t = time.perf_counter()
        for i in range(n):
            gpa = (PT << 12) + 8 * i
            data = ((((LEAF + i) ^ flip[0]) << 12) | P).to_bytes(8, "little")[:nbytes]
            vm.write_guest(gpa, data)
            vm.hooks.track_write(vm, None, gpa, data)
        return (time.perf_counter() - t) / n * 1e6

    us = _best(once)
    detach_vgpu(vm)
    vm.close()
    return us


def submit_flush_us() -> float:
    """µs per entry for a submit that resolves 512 pending 4-byte writes."""
    vm, vgpu = _vm_with_pt()
    vgpu.get_ppgtt_mm([PML4 << 12])
    flip = [0]

    def once() -> float:
        flip[0] ^= 1
        for i in range(512):
            gpa = (PT << 12) + 8 * i
            data = ((((LEAF + i) ^ flip[0]) << 12) | P).to_bytes(8, "little")[:4]
            vm.write_guest(gpa, data)
            vm.hooks.track_write(vm, None, gpa, data)
        t = time.perf_counter()
        assert vgpu.submit([PML4 << 12]) == 0
        return (time.perf_counter() - t) / 512 * 1e6

    us = _best(once)
    detach_vgpu(vm)
    vm.close()
    return us


def shadow_pt_us() -> float:
    """µs per entry to shadow a fully populated page table (mm create, then destroy)."""
    vm, vgpu = _vm_with_pt()

    def once() -> float:
        t = time.perf_counter()
        vgpu.get_ppgtt_mm([PML4 << 12])
        elapsed = time.perf_counter() - t
        vgpu.put_ppgtt_mm([PML4 << 12])
        return elapsed / 512 * 1e6

    us = _best(once)
    detach_vgpu(vm)
    vm.close()
    return us


def main() -> None:
    for tdp in (True, False):
        paging = "tdp" if tdp else "shadow"
        trapped = guest_update_us(tdp)
        plain = guest_update_us(tdp, attach=False)
        print(f"guest GTT entry update, trapped ({paging} paging): {trapped:8.1f} µs per update")
        print(f"same store to an untracked page   ({paging} paging): {plain:8.2f} µs per store")
    print(f"hook path, 8-byte update (no vCPU):                {hook_update_us(8):8.1f} µs per update")
    print(f"hook path, 4-byte half (post-shadow):              {hook_update_us(4):8.1f} µs per half")
    print(f"submit resolving 512 pending halves:               {submit_flush_us():8.1f} µs per entry")
    print(f"shadowing a 512-entry page table:                  {shadow_pt_us():8.1f} µs per entry")


if __name__ == "__main__":
    main()
