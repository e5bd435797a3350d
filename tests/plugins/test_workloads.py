"""Trace workloads (seeded numpy generators) and the guest-program workload of the migration model."""

from __future__ import annotations

import numpy as np
import pytest
from pagetrack.errors import InputError
from pagetrack.plugins.dirty_log import logger_of
from pagetrack.plugins.dirty_log.workloads import (
    WORKLOADS,
    FixedRate,
    HotSet,
    ProgramWorkload,
    Sequential,
    Uniform,
    Zipf,
    make_workload,
)
from pagetrack.program import DATA_BASE, DATA_GFN, assemble
from pagetrack.runner import setup_vm

MEM = 4 << 20
PAGES = MEM >> 12


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_traces_are_seeded_aligned_and_inside_the_data_slot(name: str) -> None:
    a = make_workload(name, seed=3).trace(0.01, MEM)
    b = make_workload(name, seed=3).trace(0.01, MEM)
    c = make_workload(name, seed=4).trace(0.01, MEM)
    assert np.array_equal(a.gpas, b.gpas) and np.array_equal(a.values, b.values)
    assert len(a) > 0
    assert ((a.gpas >= DATA_BASE) & (a.gpas < DATA_BASE + MEM)).all()
    assert not (a.gpas % 8).any()
    assert a.values.dtype == np.uint64 and a.gpas.dtype == np.int64
    if name != "sequential":
        assert not np.array_equal(a.gpas, c.gpas)


def test_slices_add_up_to_the_rate() -> None:
    w = Uniform(rate=1000)
    counts = [len(w.trace(0.0013, MEM)) for _ in range(1000)]
    assert sum(counts) in (1299, 1300)  # the fractions carry over: no drift
    assert set(counts) <= {1, 2}
    assert Uniform(rate=1000).trace(0.5, MEM).values.tolist() == list(range(1, 501))


def test_sequential_is_memstress_pass() -> None:
    t = Sequential(rate=PAGES + 5).trace(1.0, MEM)
    pages = (t.gpas - DATA_BASE) >> 12
    assert pages.tolist() == [*range(PAGES), 0, 1, 2, 3, 4]
    assert not ((t.gpas - DATA_BASE) & 0xFFF).any()  # the first 8 bytes of each page


def test_hotset_concentrates_on_its_hot_pages() -> None:
    t = HotSet(rate=100_000, hot_fraction=0.05, hot_share=0.99, seed=1).trace(1.0, MEM)
    pages, counts = np.unique((t.gpas - DATA_BASE) >> 12, return_counts=True)
    top = np.sort(counts)[::-1][: round(PAGES * 0.05)]
    assert 0.985 < top.sum() / len(t) < 0.995
    same = HotSet(rate=100_000, hot_fraction=0.05, hot_share=0.99, seed=1).trace(1.0, MEM)
    assert set(((same.gpas - DATA_BASE) >> 12).tolist()) == set(pages.tolist())


def test_zipf_rank_one_is_the_most_written() -> None:
    t = Zipf(rate=50_000, s=1.2, seed=2).trace(1.0, MEM)
    _, counts = np.unique((t.gpas - DATA_BASE) >> 12, return_counts=True)
    counts = np.sort(counts)[::-1]
    harmonic = (1.0 / np.arange(1, PAGES + 1) ** 1.2).sum()
    assert counts[0] / len(t) == pytest.approx(1 / harmonic, rel=0.1)
    assert counts[0] > 1.8 * counts[1]


def test_fixed_rate_dirties_distinct_pages_per_second() -> None:
    w = FixedRate(rate=300, stores_per_page=3, seed=5)
    seen: list[set[int]] = []
    for _ in range(4):
        t = w.trace(1.0, MEM)
        pages = set(((t.gpas - DATA_BASE) >> 12).tolist())
        assert len(pages) == 300 and len(t) == 900
        seen.append(pages)
    assert not (seen[0] & seen[1])  # consecutive slices: the next pages of one shuffle
    assert len(FixedRate(rate=10 * PAGES).trace(1.0, MEM)) == PAGES  # capped at the slot


def test_run_replays_into_the_data_slot_and_dirties_it() -> None:
    env = setup_vm(MEM)
    try:
        stats = FixedRate(rate=100, seed=1).run(env.vm, env.vcpu, 0.5)
        assert stats.stores == 50 and stats.slow == 50
        logger_of(env.vm).harvest(env.vm)
        assert len(logger_of(env.vm).rounds_of(env.data.key)[-1]) == 50
    finally:
        env.vm.close()


@pytest.mark.parametrize("kwargs", [{"rate": -1.0}, {"rate": float("nan")}])
def test_bad_rates(kwargs: dict[str, float]) -> None:
    with pytest.raises(InputError):
        Uniform(**kwargs)


def test_bad_parameters() -> None:
    with pytest.raises(InputError, match="unknown workload"):
        make_workload("ring")
    with pytest.raises(InputError):
        HotSet(hot_fraction=0.0)
    with pytest.raises(InputError):
        Zipf(s=0)
    with pytest.raises(InputError):
        FixedRate(stores_per_page=0)
    with pytest.raises(InputError):
        Uniform().trace(-1.0, MEM)
    assert isinstance(make_workload("fixed-rate", 5.0), FixedRate)


ROUNDS_PROG = """
    mov rcx, 3
outer:
    mov rax, 0
inner:
    mov qword ptr [rdi + rax*8], rcx
    add rax, 512
    cmp rax, 512*4
    jne inner
    out ROUND_PORT, al
    add rdi, 4*4096
    dec rcx
    jnz outer
    hlt
"""


def test_program_workload_slices_end_at_round_port() -> None:
    prog = assemble(ROUNDS_PROG, "rounds", data_size=MEM)
    wl = ProgramWorkload(prog)
    env = setup_vm(MEM, prog.code)
    try:
        logger = logger_of(env.vm)
        for r in range(3):
            stats = wl.run(env.vm, env.vcpu, 1.0)
            assert stats.stores > 0 and wl.exit is None
            logger.harvest(env.vm)
            assert logger.rounds_of(env.data.key)[-1] == list(range(DATA_GFN + 4 * r, DATA_GFN + 4 * r + 4))
        wl.run(env.vm, env.vcpu, 1.0)
        assert wl.exit == "hlt" and wl.rounds == 3
        assert wl.run(env.vm, env.vcpu, 1.0).stores == 0  # idle after hlt
    finally:
        env.vm.close()


def test_program_workload_with_a_guest_speed() -> None:
    prog = assemble(ROUNDS_PROG, "rounds", data_size=MEM)
    wl = ProgramWorkload(prog, ips=5)
    env = setup_vm(MEM, prog.code)
    try:
        assert wl.run(env.vm, env.vcpu, 1.0).stores == 5  # the budget ends the slice
        assert wl.exit is None and wl.rounds == 0
    finally:
        env.vm.close()
