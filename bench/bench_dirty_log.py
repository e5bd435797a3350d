"""Dirty logging, every mode: harvest time of a 64 MiB slot, and the cost of a first store after a re-arm.

Run: ``python3 bench/bench_dirty_log.py [--shadow] [--reps N] [--modes bitmap,ring,...]``.

For each mode and each number D of dirtied pages (1, 1 024, 16 384 of the slot's 16 384) the
guest writes 8 bytes to D pages spread evenly over a 64 MiB data slot, once to map them, then
``reps`` more times, each followed by a harvest:

* ``harvest ms``: one harvest of the round (for ``ring`` including the reaps done at ring-full
  exits during the stores), best of ``reps``;
* ``µs/page``: the store pass after a re-arm divided by D, best of ``reps``;
* ``re-arm µs``: that minus the same pass with nothing re-armed (bitmap mode, no harvest between
  passes: pages writable and cached), i.e. what logging costs per dirtied page (fault + fast path,
  PML log and flush, emulation, ring reaps excluded, ...).

Nothing here is a test; figures are for comparing modes on one machine.
"""

from __future__ import annotations

import argparse
import gc
import time
from typing import Any

from pagetrack.emulator import PortOut
from pagetrack.plugins.dirty_log import MODES, logger_of
from pagetrack.program import ROUND_PORT, assemble
from pagetrack.runner import setup_vm

SLOT = 64 << 20
SLOT_PAGES = SLOT >> 12
DIRTY = (1, 1024, 16384)

# write one qword to each of D pages, STRIDE pages apart; one round per pass; forever
PASS = """
again:
    mov rbx, rdi
    mov rcx, D
next:
    mov qword ptr [rbx], rcx
    add rbx, STRIDE * 4096
    dec rcx
    jnz next
    out ROUND_PORT, al
    jmp again
"""


class _Timed:
    """A VM running PASS for one mode; each :meth:`store_pass` runs to the next round."""

    def __init__(self, mode: str, dirty: int, tdp: bool) -> None:
        prog = assemble(PASS, defines={"D": dirty, "STRIDE": SLOT_PAGES // dirty}, data_size=SLOT)
        self.env = setup_vm(SLOT, prog.code, tdp=tdp, options={"dirty_log": {"mode": mode}})
        self.vm, self.vcpu = self.env.vm, self.env.vcpu
        self.logger = logger_of(self.vm)
        self.logger.start(self.vm)
        self.collect_s = 0.0

    def store_pass(self) -> float:
        """Seconds of guest execution up to the next round (ring-full reaps excluded)."""
        self.collect_s = 0.0
        t0 = time.perf_counter()
        while True:
            ex = self.vcpu.run()
            if ex.kind == "dirty_ring_full":
                t = time.perf_counter()
                self.logger.collect(self.vm)
                self.collect_s += time.perf_counter() - t
                continue
            if ex.kind == "io" and isinstance(ex.exit, PortOut) and ex.exit.port == ROUND_PORT:
                return time.perf_counter() - t0 - self.collect_s
            raise RuntimeError(f"unexpected exit {ex.kind} {ex.message}")

    def harvest(self) -> float:
        self.logger.harvest(self.vm)
        return float(self.logger.round_stats[-1]["harvest_time"])

    def close(self) -> None:
        self.vm.close()


def baseline(dirty: int, tdp: bool, reps: int) -> float:
    """Seconds of one store pass with nothing re-armed (bitmap mode, no harvest between passes)."""
    run = _Timed("bitmap", dirty, tdp)
    try:
        run.store_pass()  # map the pages; no harvest: they stay writable and cached
        return min(run.store_pass() for _ in range(reps))
    finally:
        run.close()


def measure(mode: str, dirty: int, tdp: bool, reps: int, base: float) -> dict[str, Any]:
    run = _Timed(mode, dirty, tdp)
    try:
        run.store_pass()  # map the pages
        run.harvest()
        stores, harvests = [], []
        for _ in range(reps):
            stores.append(run.store_pass())
            harvests.append(run.harvest())
        stats = run.logger.round_stats[-1]
        return {
            "mode": mode, "dirty": dirty,
            "harvest_ms": min(harvests) * 1e3,
            "us_per_page": min(stores) / dirty * 1e6,
            "rearm_us": (min(stores) - base) / dirty * 1e6,
            "faults": stats["faults"], "emulations": stats["emulations"],
            "ring_full": stats["ring_full_exits"], "pml_flushes": stats["pml_flushes"],
        }
    finally:
        run.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shadow", action="store_true", help="shadow paging instead of TDP")
    ap.add_argument("--reps", type=int, default=3, help="measured passes per case (best is shown)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated modes")
    args = ap.parse_args()
    print(f"64 MiB slot ({SLOT_PAGES} pages), {'shadow' if args.shadow else 'TDP'} paging, best of {args.reps}")
    head = f"{'mode':<20} {'dirty':>6} {'harvest ms':>11} {'µs/page':>9} {'re-arm µs':>10} " \
           f"{'faults':>7} {'emul':>6} {'ring-full':>9} {'pml flush':>9}"
    print(head)
    print("-" * len(head))
    gc.disable()  # collections would land in random passes
    base = {dirty: baseline(dirty, not args.shadow, args.reps) for dirty in DIRTY}
    for mode in args.modes.split(","):
        for dirty in DIRTY:
            r = measure(mode, dirty, not args.shadow, args.reps, base[dirty])
            gc.collect()
            print(f"{r['mode']:<20} {r['dirty']:>6} {r['harvest_ms']:>11.3f} {r['us_per_page']:>9.2f} "
                  f"{r['rearm_us']:>10.2f} {r['faults']:>7} {r['emulations']:>6} {r['ring_full']:>9} "
                  f"{r['pml_flushes']:>9}")


if __name__ == "__main__":
    main()
