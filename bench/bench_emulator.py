"""Benchmark the pure-Python interpreter on a store loop (not a test).

Runs ``/work/shared/programs/b_lcg.s``-style code (imul, add, mov, shr, and, shl,
store, dec, jnz) on :class:`pagetrack.emulator.FlatMemory` and prints
instructions per second.  Usage::

    python3 bench/bench_emulator.py [--rounds K] [--stores W] [--repeat N] [--program PATH]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from pagetrack.emulator import CpuState, FlatMemory, Hlt, InstructionCache, PortOut, run
from pagetrack.program import CODE_BASE, DATA_BASE, STACK_TOP, load_program

_DEFAULT = Path("/work/shared/programs/b_lcg.s")
_FALLBACK = """
    mov r12, 12345
    mov r13, 6364136223846793005
    mov r14, 1442695040888963407
    mov rbx, DATA_BASE
    mov r15, K
next_round:
    mov rcx, W
next_store:
    imul r12, r13
    add r12, r14
    mov rax, r12
    shr rax, 33
    and rax, 1023
    shl rax, 12
    mov rdx, r12
    shr rdx, 16
    and rdx, 0xff8
    add rax, rdx
    mov qword ptr [rbx + rax], r12
    dec rcx
    jnz next_store
    out ROUND_PORT, al
    dec r15
    jnz next_round
    hlt
"""


def _once(code: bytes) -> tuple[int, float]:
    mem = FlatMemory()
    mem.load(CODE_BASE, code)
    cpu = CpuState(CODE_BASE)
    cpu.regs[4] = STACK_TOP
    cpu.regs[7] = DATA_BASE
    cache = InstructionCache()
    start = time.perf_counter()
    while True:
        ex = run(cpu, mem, cache, 1 << 30)
        if isinstance(ex, Hlt):
            break
        if not isinstance(ex, PortOut):
            raise SystemExit(f"unexpected exit {ex!r}")
    return cpu.icount, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=200, help="K (rounds)")
    ap.add_argument("--stores", type=int, default=512, help="W (stores per round)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--program", type=Path, default=_DEFAULT)
    args = ap.parse_args()
    defines = {"K": args.rounds, "W": args.stores}
    if args.program.is_file():
        code = load_program(args.program, defines).code
    else:
        from pagetrack.program import assemble

        code = assemble(_FALLBACK, "fallback", defines).code
    best = 0.0
    for _ in range(args.repeat):
        n, dt = _once(code)
        rate = n / dt
        best = max(best, rate)
        print(f"{n} instructions in {dt:.3f} s: {rate / 1e6:.2f} M instr/s")
    print(f"best: {best / 1e6:.2f} M instr/s")


if __name__ == "__main__":
    main()
