"""Core costs: untracked stores, track_write dispatch, add/remove, emulated tracked writes, guest speed.

Run: ``python3 bench/bench_core.py`` (or ``python3 bench/run.py`` for everything).
Prints one line per figure; nothing here is a test.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pagetrack import VM, hookimpl
from pagetrack.program import assemble, load_program
from pagetrack.runner import run_program

PROGRAMS = __import__("pathlib").Path(__file__).resolve().parent.parent.parent / "shared" / "programs"


def _best(fn: Callable[[], float], repeat: int = 5) -> float:
    return min(fn() for _ in range(repeat))


class _Counter:
    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def track_write(self, gpa: int, new: bytes) -> None:
        self.calls += 1


def untracked_store_ns() -> tuple[float, int]:
    """ns per 8-byte store through the vCPU's memory path to an untracked page, and hook calls seen."""
    counter = _Counter()
    vm = VM(plugins=[counter])
    vm.add_memory(0, 1 << 21)
    from pagetrack.program import build_page_tables

    layout = build_page_tables(4096, lambda gpa, v: vm.write_guest(gpa, v.to_bytes(8, "little")))
    vm.add_memory(0x400000, 1 << 20)
    vcpu = vm.create_vcpu()
    vcpu.set_cr3(layout.cr3)
    mem = vcpu.native
    mem.write(0x400000, 8, 1)  # fault it in once
    n = 200_000

    def once() -> float:
        t = time.perf_counter()
        w = mem.write
        for i in range(n):
            w(0x400008, 8, i)
        return (time.perf_counter() - t) / n * 1e9

    ns = _best(once)
    calls = counter.calls
    vm.close()
    return ns, calls


def dispatch_us(nplugins: int) -> float:
    """µs per HookBus.track_write with ``nplugins`` trivial external trackers plus the MMU's."""
    vm = VM(plugins=[_Counter() for _ in range(nplugins)])
    vm.add_memory(0, 1 << 20)
    n = 20_000
    data = b"\0" * 8

    def once() -> float:
        t = time.perf_counter()
        tw = vm.hooks.track_write
        for _ in range(n):
            tw(vm, None, 0x1000, data)
        return (time.perf_counter() - t) / n * 1e6

    us = _best(once)
    vm.close()
    return us


def add_remove_us() -> float:
    """µs per kvm_write_track_add_gfn + kvm_write_track_remove_gfn pair."""
    vm = VM(tdp=False)
    vm.add_memory(0, 1 << 24)
    n = 20_000

    def once() -> float:
        t = time.perf_counter()
        for i in range(n):
            g = i & 4095
            vm.write_track_add_gfn(g)
            vm.write_track_remove_gfn(g)
        return (time.perf_counter() - t) / n * 1e6

    us = _best(once, 3)
    vm.close()
    return us


def emulated_tracked_write_us() -> tuple[float, int]:
    """µs per guest store to a write-tracked page (fault → emulate → track_write)."""
    src = """
    mov rbx, DATA_BASE
    mov rcx, 20000
again:
    mov qword ptr [rbx + 8], rcx
    dec rcx
    jnz again
    hlt
"""
    prog = assemble(src, "tracked-store")
    base = 0x400
    t = time.perf_counter()
    r = run_program(prog, track=[(base, base)])
    total = time.perf_counter() - t
    t = time.perf_counter()
    run_program(prog)
    untracked = time.perf_counter() - t
    n = r["counters"]["emulations"]
    return (total - untracked) / max(n, 1) * 1e6, n


def guest_speed(program: str, defines: dict[str, int], tdp: bool) -> dict[str, Any]:
    """Instructions/s and stores/s of a whole guest run."""
    prog = load_program(PROGRAMS / program, defines)
    t = time.perf_counter()
    r = run_program(prog, tdp=tdp)
    dt = time.perf_counter() - t
    stores = defines.get("W", 64) * defines.get("K", 8)
    return {"instructions": r["counters"]["instructions"], "seconds": dt,
            "ips": r["counters"]["instructions"] / dt, "stores_per_s": stores / dt,
            "faults": r["counters"]["faults"]}


def main() -> None:
    ns, calls = untracked_store_ns()
    print(f"untracked 8-byte store (vCPU memory path): {ns:8.0f} ns   hook calls: {calls}")
    for k in (1, 3):
        print(f"track_write dispatch, {k} external plugin(s) + shadow_mmu: {dispatch_us(k):6.2f} µs")
    print(f"write_track add+remove pair: {add_remove_us():6.2f} µs")
    us, n = emulated_tracked_write_us()
    print(f"emulated tracked write (fault, emulate, notify): {us:6.1f} µs  ({n} emulations)")
    for tdp in (True, False):
        g = guest_speed("b_lcg.s", {"W": 20000}, tdp)
        print(f"b_lcg.s -D W=20000 ({'tdp' if tdp else 'shadow'}): {g['ips'] / 1e6:5.2f} M instr/s, "
              f"{g['stores_per_s'] / 1e6:5.2f} M stores/s, {g['instructions']} instructions in "
              f"{g['seconds']:.2f} s, {g['faults']} faults")


if __name__ == "__main__":
    main()
