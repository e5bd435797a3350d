"""Real-KVM dirty-logging costs: KVM_GET_DIRTY_LOG on a 64 MiB slot and µs per dirtying store.

    python bench/bench_kvm.py [--rounds 30] [--execution auto|native|user|both]

The guest writes one byte to each of the first N data pages, then ends the round
(``out ROUND_PORT``); the VMM harvests with KVM_GET_DIRTY_LOG, which re-protects
those pages, so every store of the next round takes a write fault.  We time the
GET of the data slot alone, and the guest time between two harvests; the store
cost is that time minus the N = 0 baseline (exit + harvest of the low slot), over N.
The first two rounds (page population) are discarded; medians are reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from pagetrack.kvm import KvmUnavailable, detect_execution
from pagetrack.kvm.dirty import BitmapLog
from pagetrack.kvm.run import NATIVE, USER, run_program
from pagetrack.program import assemble

SLOT_MIB = 64
SIZES = (0, 1, 1024, 16384)
WARMUP = 2

SOURCE = """
    mov rbx, rdi
    mov r15, R
next_round:
    mov rcx, N
    mov rdx, rbx
    test rcx, rcx
    jz boundary
store:
    mov byte ptr [rdx], 1
    add rdx, 4096
    dec rcx
    jnz store
boundary:
    out ROUND_PORT, al
    dec r15
    jnz next_round
    hlt
"""


class TimedBitmap(BitmapLog):
    """BitmapLog that times KVM_GET_DIRTY_LOG of the data slot and the guest time between."""

    def __init__(self) -> None:
        super().__init__()
        self.get_ns: list[int] = []
        self.guest_ns: list[int] = []
        self.counts: list[int] = []
        self._last_end: int | None = None

    def harvest(self) -> dict[int, list[int]]:
        start = t0 = time.perf_counter_ns()
        bm = self._get(self.slots[1])
        t1 = time.perf_counter_ns()
        self.counts.append(sum(int(w).bit_count() for w in bm))
        self._get(self.slots[0])  # the low slot, to keep its log drained
        if self._last_end is not None:
            self.guest_ns.append(start - self._last_end)
        self.get_ns.append(t1 - t0)
        self._last_end = time.perf_counter_ns()
        return {}  # the bench checks counts only


def measure(n: int, rounds: int, execution: str) -> tuple[float, float, int]:
    """(median GET µs, median guest µs per round, dirty pages seen) for N pages."""
    prog = assemble(SOURCE, f"bench-{n}", {"N": n, "R": rounds + WARMUP}, data_size=SLOT_MIB << 20)
    log = TimedBitmap()
    r = run_program(prog, "bitmap", execution=execution, dirty_log=log,
                    max_exits=10 * (rounds + WARMUP) + 10)
    if r["exit"] != "hlt":
        raise RuntimeError(f"bench guest stopped: {r['exit']}")
    counts = log.counts[WARMUP:-1]
    if any(c != n for c in counts):
        raise RuntimeError(f"expected {n} dirty pages per round, saw {sorted(set(counts))}")
    return (statistics.median(log.get_ns[WARMUP:-1]) / 1000,
            statistics.median(log.guest_ns[WARMUP - 1:]) / 1000, counts[0] if counts else 0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30, help="timed rounds per size")
    ap.add_argument("--execution", choices=["auto", "native", "user", "both"], default="both")
    args = ap.parse_args(argv)
    try:
        detected = detect_execution()
    except KvmUnavailable as exc:
        print(f"bench_kvm: {exc}", file=sys.stderr)
        return 2
    execs = {"auto": [detected["execution"]], "native": [NATIVE], "user": [USER],
             "both": [NATIVE, USER]}[args.execution]
    print(f"host execution mode: {detected['execution']} ({detected['reason']})")
    print(f"data slot {SLOT_MIB} MiB, {args.rounds} rounds per row, medians\n")
    print(f"{'execution':<18} {'dirty pages':>11} {'GET_DIRTY_LOG µs':>17} {'round µs':>10} {'µs/store':>9}")
    for ex in execs:
        base = None
        for n in SIZES:
            get_us, round_us, seen = measure(n, args.rounds, ex)
            if base is None:
                base = round_us
            per = f"{(round_us - base) / n:9.2f}" if n else f"{'-':>9}"
            print(f"{ex:<18} {seen:>11} {get_us:>17.2f} {round_us:>10.1f} {per}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
