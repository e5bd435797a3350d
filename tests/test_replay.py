"""``replay``: bulk trace replay is the same as the stores made one by one by guest instructions.

The reference runs one real ``mov [rdi], rsi`` (or its 1/2/4-byte form) per
store on the vCPU — fetch, fault, fast path, emulation and ``track_write`` as
for any guest instruction.  Replay must leave the same memory, the same dirty
rounds, the same notifications (in order) and the same fault counts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pagetrack.replay as replay_mod
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pagetrack import hookimpl
from pagetrack.errors import InputError
from pagetrack.mmu import GuestPageFault
from pagetrack.plugins.dirty_log import logger_of
from pagetrack.program import CODE_BASE, DATA_BASE, DATA_GFN, assemble
from pagetrack.replay import ReplayStats, replay, store
from pagetrack.runner import VmSetup, setup_vm

PAGES = 8  # data pages in the small guest
STACK_PAGE = 0x1F0  # a low-slot page that is neither code nor page table
_REG = {1: "sil", 2: "si", 4: "esi", 8: "rsi"}
_PTR = {1: "byte", 2: "word", 4: "dword", 8: "qword"}
_SLOT = 16  # bytes of code per store size, so rip = CODE_BASE + _SLOT * index


def _code() -> bytes:
    out = b""
    for size in (1, 2, 4, 8):
        insn = assemble(f"mov {_PTR[size]} ptr [rdi], {_REG[size]}", "store", data_size=PAGES << 12).code
        out += insn.ljust(_SLOT, b"\x90")
    return out


_CODE = _code()
_RIP = {size: CODE_BASE + _SLOT * i for i, size in enumerate((1, 2, 4, 8))}


class Recorder:
    """An external tracker that records every notification, in order."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, bytes]] = []

    @hookimpl
    def track_write(self, gpa: int, new: bytes) -> None:
        self.seen.append((gpa, bytes(new)))


def _guest(tdp: bool, tracked: list[int]) -> tuple[VmSetup, Recorder]:
    rec = Recorder()
    env = setup_vm(PAGES << 12, _CODE, tdp=tdp, track=[(g, g) for g in tracked], plugins=[rec])
    # Fetch the code once, so that the reference's first instruction fetch costs no fault.
    env.vcpu.native.fetch(CODE_BASE, 15)
    return env, rec


def _by_instructions(env: VmSetup, gpas: list[int], values: list[int], size: int) -> None:
    vcpu = env.vcpu
    cpu = vcpu.cpu
    for gpa, value in zip(gpas, values, strict=True):
        cpu.rip = _RIP[size]
        cpu.regs[7] = gpa
        cpu.regs[6] = value
        ex = vcpu.run(1)
        assert ex.kind == "limit", ex


def _state(env: VmSetup, rec: Recorder) -> dict[str, Any]:
    vm = env.vm
    logger = logger_of(vm)
    s = vm.mmu.stats
    return {
        "data": bytes(env.data.mem),
        "low": bytes(env.low.mem),
        "rounds": {key: rounds for key, rounds in logger.rounds.items()},
        "notified": rec.seen,
        "counters": (s.pf_taken, s.pf_fast, s.pf_fixed, s.pf_emulate, s.insn_emulation, s.track_write_calls),
    }


def _check_same(tdp: bool, tracked: list[int], rounds: list[list[tuple[list[int], list[int]]]], size: int) -> None:
    ref, ref_rec = _guest(tdp, tracked)
    sim, sim_rec = _guest(tdp, tracked)
    try:
        for chunks in rounds:
            for gpas, values in chunks:
                _by_instructions(ref, gpas, values, size)
                replay(sim.vm, sim.vcpu, np.array(gpas, dtype=np.int64), np.array(values, dtype=np.uint64), size)
            logger_of(ref.vm).harvest(ref.vm)
            logger_of(sim.vm).harvest(sim.vm)
        assert _state(sim, sim_rec) == _state(ref, ref_rec)
    finally:
        ref.vm.close()
        sim.vm.close()


def _addresses(size: int) -> st.SearchStrategy[int]:
    """Data pages (any offset that stays in the slot, so stores may straddle) and a stack page."""
    data = st.integers(DATA_BASE, DATA_BASE + (PAGES << 12) - size)
    stack = st.integers(0, 4096 // size - 1).map(lambda i: (STACK_PAGE << 12) + i * size)
    hot = st.sampled_from([DATA_BASE + 8, DATA_BASE + 0x1008, DATA_BASE + 0x2FFC])
    return st.one_of(data, stack, hot)


@st.composite
def _traces(draw: Any) -> tuple[int, list[int], list[list[tuple[list[int], list[int]]]]]:
    size = draw(st.sampled_from([1, 2, 4, 8]))
    tracked = draw(st.lists(st.integers(DATA_GFN, DATA_GFN + PAGES - 1), max_size=3, unique=True))
    aligned = draw(st.booleans())
    addr = _addresses(size).map(lambda a: a - a % size) if aligned else _addresses(size)
    store_ = st.tuples(addr, st.integers(0, (1 << 64) - 1))
    chunk = st.lists(store_, max_size=160).map(lambda xs: ([a for a, _ in xs], [v for _, v in xs]))
    rounds = draw(st.lists(st.lists(chunk, min_size=1, max_size=3), min_size=1, max_size=3))
    return size, tracked, rounds


@pytest.mark.parametrize("tdp", [True, False], ids=["tdp", "shadow"])
@pytest.mark.parametrize("tuning", ["default", "numpy-always", "tiny-window"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_traces())
def test_replay_equals_instructions(tdp: bool, tuning: str, case: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    if tuning == "numpy-always":
        monkeypatch.setattr(replay_mod, "_SMALL", 0)
    elif tuning == "tiny-window":
        monkeypatch.setattr(replay_mod, "_WINDOW", 5)
    size, tracked, rounds = case
    _check_same(tdp, tracked, rounds, size)


def test_replay_equals_native_writes_with_many_repeats() -> None:
    """Untracked pages: replay == ``vcpu.native.write`` one by one (bulk path, numpy scatter)."""
    rng = np.random.default_rng(7)
    gpas = DATA_BASE + rng.integers(0, PAGES, 20_000) * 4096 + rng.integers(0, 64, 20_000) * 8
    values = rng.integers(0, 1 << 63, 20_000, dtype=np.uint64)
    ref, _ = _guest(True, [])
    sim, _ = _guest(True, [])
    try:
        for _round in range(2):
            for a, v in zip(gpas.tolist(), values.tolist(), strict=True):
                ref.vcpu.native.write(a, 8, v)
            stats = replay(sim.vm, sim.vcpu, gpas, values)
            assert stats.slow == PAGES and stats.bulk == len(gpas) - PAGES and stats.emulated == 0
            for env in (ref, sim):
                logger_of(env.vm).harvest(env.vm)
        assert bytes(sim.data.mem) == bytes(ref.data.mem)
        assert logger_of(sim.vm).rounds == logger_of(ref.vm).rounds
        assert sim.vm.mmu.stats.pf_taken == ref.vm.mmu.stats.pf_taken
    finally:
        ref.vm.close()
        sim.vm.close()


def test_tracked_page_takes_the_slow_path_every_time() -> None:
    env, rec = _guest(True, [DATA_GFN + 1])
    try:
        gpas = [DATA_BASE + 0x1000 + 8 * i for i in range(5)] + [DATA_BASE + 8 * i for i in range(5)]
        stats = replay(env.vm, env.vcpu, gpas)
        assert stats == ReplayStats(stores=10, slow=6, bulk=4, faults=stats.faults, emulated=5)
        assert [g for g, _ in rec.seen] == gpas[:5]
        assert [int.from_bytes(b, "little") for _, b in rec.seen] == [1, 2, 3, 4, 5]
    finally:
        env.vm.close()


def test_first_store_per_page_per_round() -> None:
    """After a harvest re-protects the pages, the first store to each is slow again (and only it)."""
    env, _ = _guest(True, [])
    try:
        gpas = np.array([DATA_BASE + (p << 12) + 8 * i for i in range(10) for p in range(PAGES)])
        first = replay(env.vm, env.vcpu, gpas)
        again = replay(env.vm, env.vcpu, gpas)  # same round: every translation is cached
        logger_of(env.vm).harvest(env.vm)
        rearm = replay(env.vm, env.vcpu, gpas)
        assert (first.slow, first.bulk) == (PAGES, len(gpas) - PAGES)
        assert (again.slow, again.faults) == (0, 0)
        assert (rearm.slow, rearm.faults) == (PAGES, PAGES)  # one fast-path fix per page
        logger_of(env.vm).harvest(env.vm)
        data_rounds = logger_of(env.vm).rounds_of(env.data.key)
        assert data_rounds[-1] == data_rounds[-2] == list(range(DATA_GFN, DATA_GFN + PAGES))
    finally:
        env.vm.close()


def test_last_writer_wins() -> None:
    env, _ = _guest(True, [])
    try:
        gpas = [DATA_BASE + 16] * 100 + [DATA_BASE + 17] * 3
        replay(env.vm, env.vcpu, gpas, [*range(100), 0xAA, 0xBB, 0xCC], size=1)
        assert env.vm.read_guest(DATA_BASE + 16, 2) == bytes([99, 0xCC])
    finally:
        env.vm.close()


def test_stores_before_a_guest_fault_are_done() -> None:
    env, _ = _guest(True, [])
    try:
        gpas = [DATA_BASE] * 3 + [DATA_BASE + (PAGES << 12) + 0x10000] + [DATA_BASE + 8]
        with pytest.raises(GuestPageFault):
            replay(env.vm, env.vcpu, gpas, [1, 2, 3, 4, 5])
        assert env.vm.read_guest(DATA_BASE, 16) == (3).to_bytes(8, "little") + bytes(8)
    finally:
        env.vm.close()


def test_store_emulates_on_a_tracked_page() -> None:
    env, rec = _guest(True, [DATA_GFN])
    try:
        assert store(env.vcpu, DATA_BASE + 8, 8, 42) is True
        assert store(env.vcpu, DATA_BASE + 0x1000, 8, 43) is False
        assert rec.seen == [(DATA_BASE + 8, (42).to_bytes(8, "little"))]
    finally:
        env.vm.close()


@pytest.mark.parametrize(("gpas", "values", "size"), [
    ([[1, 2]], None, 8), ([-8], None, 8), ([0.5], None, 8), ([DATA_BASE], [1, 2], 8), ([DATA_BASE], None, 3),
])
def test_bad_traces(gpas: Any, values: Any, size: int) -> None:
    env, _ = _guest(True, [])
    try:
        with pytest.raises(InputError):
            replay(env.vm, env.vcpu, np.array(gpas), values, size)
    finally:
        env.vm.close()


def test_a_million_stores() -> None:
    """1 M stores over 32 MiB finish (the time is measured by bench/bench_replay.py, not asserted)."""
    env = setup_vm(32 << 20)
    try:
        rng = np.random.default_rng(1)
        n = 1_000_000
        gpas = DATA_BASE + rng.integers(0, 8192, n) * 4096 + rng.integers(0, 512, n) * 8
        stats = replay(env.vm, env.vcpu, gpas)
        assert stats.stores == n and stats.slow == len(np.unique(gpas >> 12))
        for a in rng.choice(gpas, 50).tolist():
            last = int(np.flatnonzero(gpas == a)[-1]) + 1  # default values: the 1-based store index
            assert env.vm.read_guest(a, 8) == last.to_bytes(8, "little")
    finally:
        env.vm.close()


@pytest.mark.parametrize("tdp", [True, False], ids=["tdp", "shadow"])
def test_a_later_walk_sees_bulk_stores_to_a_page_table(tdp: bool) -> None:
    """Bulk stores are committed before the next slow store, whose page walk reads them.

    The trace rewrites the guest PTE of data page 3 to map page 6's frame (after
    many stores to the same page-table page), then stores through page 3.
    """
    probe, _ = _guest(tdp, [])
    pt = probe.layout.pt_page_of(DATA_BASE)
    pte = lambda page: pt + 8 * ((DATA_GFN + page) & 511)  # noqa: E731
    keep5 = int.from_bytes(probe.vm.read_guest(pte(5), 8), "little")
    remap = int.from_bytes(probe.vm.read_guest(pte(6), 8), "little")
    probe.vm.close()
    gpas = [pte(5)] * 60 + [pte(3), DATA_BASE + 0x3000 + 16]
    values = [keep5] * 60 + [remap, 0x5EED]
    _check_same(tdp, [], [[(gpas, values)]], 8)
    env, _ = _guest(tdp, [])
    try:
        replay(env.vm, env.vcpu, gpas, values)
        assert env.vm.read_guest(DATA_BASE + 0x6000 + 16, 8) == (0x5EED).to_bytes(8, "little")
        assert env.vm.read_guest(DATA_BASE + 0x3000 + 16, 8) == bytes(8)
    finally:
        env.vm.close()
