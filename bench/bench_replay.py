"""Trace replay speed: stores/s of ``pagetrack.replay.replay`` for 1 M-store traces.

Run: ``python3 bench/bench_replay.py``.  Prints one line per figure; nothing here is a test.

Each trace is replayed on a fresh 128 MiB guest (first round: every first store
to a page is a fault into KVM's handler), again in the same round (every
translation cached: bulk only), and after a harvest (every first store is a
dirty-logging fast-path fix).  The one-by-one figure is ``vcpu.native.write``
per store, for comparison.
"""

from __future__ import annotations

import time

import numpy as np
from pagetrack.plugins.dirty_log import logger_of
from pagetrack.plugins.dirty_log.workloads import HotSet, Uniform
from pagetrack.replay import replay
from pagetrack.runner import setup_vm

MEM = 128 << 20
N = 1_000_000


def _line(name: str, phase: str, n: int, seconds: float, slow: int) -> None:
    print(f"{name:8} {phase:22} {n / seconds / 1e6:6.2f} M stores/s  ({seconds:5.2f} s, {slow:6} slow-path stores)")


def bench(name: str, gpas: np.ndarray, values: np.ndarray) -> None:
    env = setup_vm(MEM)
    vm, vcpu = env.vm, env.vcpu
    try:
        for phase in ("first touch", "same round (cached)", "after harvest"):
            if phase == "after harvest":
                logger_of(vm).harvest(vm)
            t = time.perf_counter()
            stats = replay(vm, vcpu, gpas, values)
            _line(name, phase, len(gpas), time.perf_counter() - t, stats.slow)
    finally:
        vm.close()


def one_by_one(gpas: np.ndarray, values: np.ndarray, n: int = 200_000) -> None:
    env = setup_vm(MEM)
    vm, vcpu = env.vm, env.vcpu
    try:
        write = vcpu.native.write
        pairs = list(zip(gpas[:n].tolist(), values[:n].tolist(), strict=True))
        for a, v in pairs:  # fault everything in first
            write(a, 8, v)
        t = time.perf_counter()
        for a, v in pairs:
            write(a, 8, v)
        _line("native", "one by one (cached)", n, time.perf_counter() - t, 0)
    finally:
        vm.close()


def main() -> None:
    print(f"trace replay, {N:,} stores on a {MEM >> 20} MiB guest")
    for wl in (Uniform(rate=N, seed=1), HotSet(rate=N, seed=1)):
        t = wl.trace(1.0, MEM)
        bench(wl.name, t.gpas, t.values)
    t = Uniform(rate=N, seed=1).trace(1.0, MEM)
    one_by_one(t.gpas, t.values)


if __name__ == "__main__":
    main()
