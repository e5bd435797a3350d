"""Run every benchmark, one after the other: ``python3 bench/run.py``.

Each script prints its own table; a script that needs /dev/kvm says so and is
skipped where the device is missing.  Benchmarks are not tests: nothing here
asserts a time.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = [
    "bench_core.py",
    "bench_emulator.py",
    "bench_replay.py",
    "bench_dirty_log.py",
    "bench_gvt.py",
    "bench_kvm.py",
    "bench_harvest_vs_kvm.py",
]


def main() -> int:
    worst = 0
    for name in SCRIPTS:
        path = HERE / name
        if not path.exists():
            continue
        print(f"\n=== {name} ===", flush=True)
        rc = subprocess.call([sys.executable, str(path)])
        if rc == 2:
            print(f"({name} skipped: prerequisite missing)")
        elif rc:
            worst = rc
    return worst


if __name__ == "__main__":
    raise SystemExit(main())
