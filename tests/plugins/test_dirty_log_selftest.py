"""The kernel selftest's invariant (dirty_log_test.c), as hypothesis tests over random store programs.

Spec: kvm-dirty-log.md §3.1–§3.2, §7 cases 40–42.  The guest does iterations N = 1..K; each
does W ≥ 0x100 stores of the value N at pseudo-random 8-byte slots of random data pages (an LCG,
as the selftest's guest picks random pages) and ends with ``out ROUND_PORT``.

* Case 40 (current test, vCPU stopped at the end of iteration N, then collected): a data page
  whose content changed since the previous collection is in the log; a page in the log holds N;
  a page outside the log is unchanged and holds only values < N.
* Case 41 (legacy test, collection while the guest runs): collected at a random instruction
  inside iteration N: dirty ⇒ values ∈ {N−1, N}; clean ⇒ values ≤ N; clean with a value N ⇒
  dirty at the next collection.
* Case 42: every iteration performs ≥ 0x100 guest writes.

Every mode (bitmap, clear, clear with INITIALLY_SET, ring with ring-full exits, ring with PML,
PML, write tracking) under TDP and shadow paging.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from dirty_log_helpers import LoggedGuest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pagetrack.program import DATA_GFN

DATA_PAGES = 256
CONFIGS: dict[str, dict[str, Any]] = {
    "bitmap": {"mode": "bitmap"},
    "clear": {"mode": "clear"},
    "clear-initially-set": {"mode": "clear-initially-set"},
    "ring": {"mode": "ring", "ring_size": 256},  # soft limit 192 < W: ring-full exits
    "ring-pml": {"mode": "ring", "pml": True, "ring_size": 1024},
    "pml": {"mode": "pml"},
    "track": {"mode": "track"},
}
PAGING = pytest.mark.parametrize("tdp", [True, False], ids=["tdp", "shadow"])
CONFIG = pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))

GUEST = """
    mov r12, SEED
    mov r13, 6364136223846793005
    mov r14, 1442695040888963407
    mov r15, 1                      # iteration N
iteration:
    mov rcx, W
store:
    imul r12, r13
    add r12, r14
    mov rax, r12
    shr rax, 33
    and rax, NPAGES - 1
    shl rax, 12
    mov rdx, r12
    shr rdx, 16
    and rdx, 0xff8
    add rax, rdx
    mov qword ptr [rdi + rax], r15  # value N
    dec rcx
    jnz store
    out ROUND_PORT, al
    inc r15
    cmp r15, K + 1
    jne iteration
    hlt
"""
INSNS_PER_STORE = 13

programs = st.fixed_dictionaries({
    "SEED": st.integers(0, 2**32),
    "K": st.integers(2, 4),
    "W": st.integers(0x100, 0x140),
    "NPAGES": st.sampled_from([8, 64, 256]),
})


def words(g: LoggedGuest) -> np.ndarray:
    """The data slot as [page, qword] u64 (a copy)."""
    return np.frombuffer(bytes(g.data.mem), dtype="<u8").reshape(DATA_PAGES, 512).copy()


def guest(config: str, tdp: bool, defines: dict[str, int]) -> LoggedGuest:
    g = LoggedGuest(GUEST, tdp=tdp, data_size=DATA_PAGES << 12, defines=defines, **CONFIGS[config])
    g.start()
    return g


@PAGING
@CONFIG
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(defines=programs)
def test_case_40_stopped_vcpu_invariant(config: str, tdp: bool, defines: dict[str, int]) -> None:
    g = guest(config, tdp, defines)
    try:
        before = words(g)
        for n in range(1, defines["K"] + 1):
            insns = g.vcpu.instructions
            assert g.run() == "round"
            assert g.vcpu.instructions - insns >= 0x100  # case 42: forward progress
            dirty = np.zeros(DATA_PAGES, dtype=bool)
            dirty[[gfn - DATA_GFN for gfn in g.harvest()]] = True
            now = words(g)
            changed = (now != before).any(axis=1)
            assert not (changed & ~dirty).any(), f"iteration {n}: changed pages missing from the log"
            assert (now[dirty] == n).any(axis=1).all(), f"iteration {n}: a logged page does not hold {n}"
            assert (now[~dirty] < n).all(), f"iteration {n}: a clean page holds a value ≥ {n}"
            before = now
        assert g.run() == "hlt"
    finally:
        g.close()


@PAGING
@CONFIG
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(defines=programs, cut=st.lists(st.floats(0.05, 0.95), min_size=4, max_size=4))
def test_case_41_running_vcpu_invariant(config: str, tdp: bool, defines: dict[str, int],
                                        cut: list[float]) -> None:
    g = guest(config, tdp, defines)
    try:
        track_next = np.zeros(DATA_PAGES, dtype=bool)
        for n in range(1, defines["K"] + 1):
            # collect at a random instruction inside iteration n, then let it finish
            assert g.run(budget=int(cut[n - 1] * defines["W"] * INSNS_PER_STORE)) == "limit"
            dirty = np.zeros(DATA_PAGES, dtype=bool)
            dirty[[gfn - DATA_GFN for gfn in g.harvest()]] = True
            v = words(g).max(axis=1)  # a page's value: its latest iteration (0: never written)
            assert not (track_next & ~dirty).any(), f"iteration {n}: a page written late was not logged"
            assert np.isin(v[dirty], (n - 1, n)).all(), f"iteration {n}: a logged page holds an old value"
            assert (v <= n).all()
            track_next = ~dirty & (v == n)  # written after the collection: must be in the next one
            assert g.run() == "round"
        assert g.run() == "hlt"
        final = np.zeros(DATA_PAGES, dtype=bool)
        final[[gfn - DATA_GFN for gfn in g.harvest()]] = True
        assert not (track_next & ~final).any()
    finally:
        g.close()
