"""The pre-copy migration model (spec kvm-dirty-log.md §4.4–4.6, §7 cases 45 and 46).

Small guests (4 MiB of data + the 2 MiB low slot = 1536 pages) and a small
bandwidth (8 MiB/s = 2048 pages/s, so a 300 ms downtime limit is 614 pages)
keep every migration under a second or two of host time.
"""

from __future__ import annotations

import itertools

import orjson
import pytest
from pagetrack.errors import InputError
from pagetrack.plugins.dirty_log import MODES
from pagetrack.plugins.dirty_log.migration import (
    AutoConverge,
    MigrationConfig,
    MigrationReport,
    RoundRow,
    migrate,
    migrate_guest,
    should_complete,
)
from pagetrack.plugins.dirty_log.workloads import FixedRate, HotSet, ProgramWorkload
from pagetrack.program import assemble
from pagetrack.runner import setup_vm

MEM = 4 << 20
BANDWIDTH = 8 << 20  # bytes/s = 2048 pages/s
MEMORY_PAGES = (MEM >> 12) + 512  # data + low slot
THRESHOLD_PAGES = int(BANDWIDTH * 0.3) // 4096


def _check_accounting(report: MigrationReport, config: MigrationConfig) -> None:
    """Rows add up: round 0 sends everything, each round sends what the last sync found."""
    rows = report.rounds
    assert rows[0].phase == "bulk" and rows[0].pages_sent == report.memory_pages == MEMORY_PAGES
    for prev, row in itertools.pairwise(rows):
        assert row.pages_sent == prev.dirty_pages
    for row in rows:
        assert row.bytes == row.pages_sent * 4096
        assert row.seconds == pytest.approx(row.bytes / config.bandwidth)
        if row.phase != "completion":
            assert row.guest_seconds == pytest.approx(row.seconds * (100 - row.throttle) / 100)
            assert row.pending_bytes == row.dirty_pages * 4096
    assert report.total_pages_sent == sum(r.pages_sent for r in rows)
    assert report.total_bytes == report.total_pages_sent * 4096
    assert report.total_seconds == pytest.approx(sum(r.seconds for r in rows))


def test_converges_when_the_dirty_rate_is_well_below_bandwidth() -> None:
    config = MigrationConfig(bandwidth=BANDWIDTH)
    report = migrate_guest(FixedRate(rate=200, seed=1), MEM, config=config)
    _check_accounting(report, config)
    assert report.converged
    assert [r.phase for r in report.rounds] == ["bulk", "completion"]
    bulk, completion = report.rounds
    # 0.75 s of guest time at 200 pages/s, plus the guest's page-table pages (6 for 4 MiB):
    # a guest page walk's accesses count as writes for TDP dirty logging.
    assert 150 <= bulk.dirty_pages <= 150 + 6
    assert completion.pages_sent == bulk.dirty_pages
    assert report.expected_downtime == pytest.approx(completion.seconds)
    assert report.expected_downtime == pytest.approx(bulk.dirty_pages * 4096 / BANDWIDTH)
    assert report.dirty_sync_count == 3  # setup, after round 0, completion


def test_does_not_converge_above_bandwidth_without_auto_converge() -> None:
    config = MigrationConfig(bandwidth=BANDWIDTH, max_rounds=8)
    report = migrate_guest(FixedRate(rate=2560, seed=1), MEM, config=config)
    _check_accounting(report, config)
    assert not report.converged and "max rounds" in report.reason
    assert len(report.rounds) == 8 and report.rounds[-1].phase == "iterate"
    assert all(r.dirty_pages > THRESHOLD_PAGES for r in report.rounds)
    assert set(report.throttles) == {0} and report.throttle_triggers == 0
    assert report.expected_downtime == pytest.approx(report.rounds[-1].pending_bytes / BANDWIDTH)


def test_converges_with_auto_converge_throttle_20_then_30() -> None:
    """Spec §7 case 46 end to end: the throttle goes 20, 30, ... and the guest converges."""
    config = MigrationConfig(bandwidth=BANDWIDTH, auto_converge=True)
    report = migrate_guest(FixedRate(rate=2560, seed=1), MEM, config=config)
    _check_accounting(report, config)
    assert report.converged
    steps = [t for i, t in enumerate(report.throttles) if i == 0 or t != report.throttles[i - 1]]
    assert steps[0] == 0 and steps[1:] == [20 + 10 * i for i in range(len(steps) - 1)]
    assert len(steps) >= 3  # at least 20 then 30
    assert report.throttle_triggers == len(steps) - 1
    # The guest ran (1 - throttle) of each round: fewer pages dirtied per second of migration.
    last = report.rounds[-2]
    assert last.dirty_pages < THRESHOLD_PAGES <= report.rounds[-3].dirty_pages


def test_case_45_switch_over_threshold() -> None:
    """Spec §7 case 45: stop when the exact pending size < bandwidth × downtime_limit (300 ms)."""
    b = 1000.0  # bytes per ms
    assert should_complete(300 * b - 1, b * 1000, 0.3)
    assert not should_complete(300 * b, b * 1000, 0.3)  # not below: keep iterating
    assert not should_complete(300 * b + 4096, b * 1000, 0.3)
    assert should_complete(0, b * 1000, 0.3)
    report = migrate_guest(HotSet(rate=20_000, hot_fraction=0.1, hot_share=0.99, seed=2), MEM,
                           config=MigrationConfig(bandwidth=BANDWIDTH))
    assert report.converged
    threshold = BANDWIDTH * 0.3
    iterations = [r for r in report.rounds if r.phase != "completion"]
    assert iterations[-1].pending_bytes < threshold
    assert all(r.pending_bytes >= threshold for r in iterations[:-1])


def test_case_46_throttle_steps() -> None:
    """Spec §7 case 46: two periods with dirty > 50 % of transferred → 20 %, then +10 %, at most 99 %."""
    ac = AutoConverge(enabled=True)
    assert ac.period(bytes_dirty=600, bytes_xfer=1000) == 0  # the first high period only counts
    assert ac.period(600, 1000) == 20
    seen = []
    for _ in range(20):
        ac.period(600, 1000)
        seen.append(ac.period(600, 1000))
    assert seen[:8] == [30, 40, 50, 60, 70, 80, 90, 99]
    assert set(seen[7:]) == {99}


def test_case_46_threshold_is_strict_and_configurable() -> None:
    ac = AutoConverge(enabled=True)
    for _ in range(4):
        assert ac.period(500, 1000) == 0  # exactly 50 % is not above the threshold
    ac = AutoConverge(enabled=True, threshold=10, initial=5, increment=50, maximum=60)
    assert [ac.period(101, 1000) for _ in range(6)] == [0, 5, 5, 55, 55, 60]


def test_auto_converge_count_is_not_reset_by_a_calm_period() -> None:
    """QEMU's dirty_rate_high_cnt only resets when it fires: high, calm, high also throttles."""
    ac = AutoConverge(enabled=True)
    assert [ac.period(d, 1000) for d in (900, 100, 900)] == [0, 0, 20]


def test_auto_converge_off_never_throttles() -> None:
    ac = AutoConverge(enabled=False)
    assert {ac.period(900, 1000) for _ in range(10)} == {0}


def test_rate_period_spans_short_rounds() -> None:
    """The throttle check runs once more than 1 s of migration has passed, not after every sync."""
    config = MigrationConfig(bandwidth=BANDWIDTH, auto_converge=True)
    report = migrate_guest(FixedRate(rate=2560, seed=1), MEM, config=config)
    assert all(r.seconds < 1.0 for r in report.rounds)
    first = report.throttles.index(20)
    assert sum(r.seconds for r in report.rounds[:first]) > 2.0  # two periods of more than 1 s each
    assert report.throttles.count(20) >= 2  # the next step needs two more periods


def test_program_workload_migrates() -> None:
    src = """
        mov rcx, 40
    again:
        mov qword ptr [rdi], rcx
        mov qword ptr [rdi + 4096], rcx
        out ROUND_PORT, al
        dec rcx
        jnz again
        hlt
    """
    prog = assemble(src, "two-pages", data_size=MEM)
    wl = ProgramWorkload(prog)
    report = migrate_guest(wl, config=MigrationConfig(bandwidth=BANDWIDTH))
    assert report.converged and report.workload == "two-pages"
    # One program round per migration round: its 4 instructions dirty the two data pages
    # (and, on first use, the guest page-table pages its walks went through).
    assert report.rounds[0].stores == 4
    assert 2 <= report.rounds[0].dirty_pages <= 2 + 6


def test_migrate_on_a_prepared_vm_and_json() -> None:
    env = setup_vm(MEM)
    try:
        seen: list[RoundRow] = []
        report = migrate(env.vm, env.vcpu, FixedRate(rate=100), MigrationConfig(bandwidth=BANDWIDTH),
                         on_round=seen.append)
    finally:
        env.vm.close()
    assert list(report.rounds) == seen
    data = orjson.loads(orjson.dumps(report.to_dict()))
    assert data["converged"] is True and data["mode"] == "bitmap" and data["workload"] == "fixed_rate"
    assert set(data["rounds"][0]) == {"round", "phase", "pages_sent", "bytes", "seconds", "throttle",
                                      "guest_seconds", "stores", "faults", "dirty_pages", "pending_bytes"}


def test_max_time_guard() -> None:
    report = migrate_guest(FixedRate(rate=5000, seed=1), MEM,
                           config=MigrationConfig(bandwidth=BANDWIDTH, max_time=1.0))
    assert not report.converged and "max time" in report.reason
    assert report.total_seconds >= 1.0


def test_unknown_mode_is_reported() -> None:
    with pytest.raises(InputError, match="unknown mode 'nope'"):
        migrate_guest(FixedRate(rate=10), MEM, mode="nope")


@pytest.mark.parametrize("kwargs", [{"bandwidth": 0}, {"downtime_limit": 0}, {"max_rounds": 0},
                                    {"max_cpu_throttle": 100}, {"cpu_throttle_initial": 0},
                                    {"throttle_trigger_threshold": 0}])
def test_bad_config(kwargs: dict[str, float]) -> None:
    with pytest.raises(InputError):
        MigrationConfig(**kwargs)


@pytest.mark.parametrize("mode", MODES)
def test_every_dirty_log_mode_migrates(mode: str) -> None:
    """Whatever the logger's mode, the sync reports the same dirty pages (``track``: converges)."""
    config = MigrationConfig(bandwidth=BANDWIDTH, max_rounds=4)
    base = migrate_guest(HotSet(rate=20_000, seed=3), MEM, config=config)
    report = migrate_guest(HotSet(rate=20_000, seed=3), MEM, mode=mode, config=config)
    assert report.mode == mode and report.converged == base.converged
    if mode != "track":
        assert [r.dirty_pages for r in report.rounds] == [r.dirty_pages for r in base.rounds]
