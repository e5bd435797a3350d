"""KVM_GET_DIRTY_LOG on the simulator and on the host's real KVM, measured in the same run.

64 MiB data slot, 1 / 1 024 / 16 384 dirty pages per round, bitmap mode, the
simulator under shadow paging (what this host's KVM does).  Run:
``python3 bench/bench_harvest_vs_kvm.py``.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_dirty_log
import bench_kvm
from pagetrack.kvm import KvmUnavailable, detect_execution

DIRTY = (1, 1024, 16384)


def main() -> int:
    try:
        execution = detect_execution()["execution"]
    except KvmUnavailable as exc:
        print(f"bench_harvest_vs_kvm: {exc}", file=sys.stderr)
        return 2
    print(f"64 MiB slot, bitmap mode; simulator: shadow paging; real KVM: {execution}")
    print(f"{'dirty pages':>11} {'sim GET µs':>11} {'KVM GET µs':>11} {'sim µs/store':>13} {'KVM µs/store':>13}")
    gc.disable()
    base_sim = {n: bench_dirty_log.baseline(n, False, 3) for n in DIRTY}
    kvm_base = None
    for n in DIRTY:
        sim = bench_dirty_log.measure("bitmap", n, False, 3, base_sim[n])
        gc.collect()
        get_us, round_us, _ = bench_kvm.measure(n, 30, execution)
        if kvm_base is None:
            kvm_base = round_us
        kvm_store = f"{(round_us - kvm_base) / n:13.2f}" if n > 1 else f"{'-':>13}"
        print(f"{n:>11} {sim['harvest_ms'] * 1000:>11.1f} {get_us:>11.1f} {sim['rearm_us']:>13.2f} {kvm_store}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
