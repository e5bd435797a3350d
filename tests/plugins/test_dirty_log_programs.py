"""The example programs in every dirty-log mode: same rounds as bitmap mode (and as the real KVM).

Every mode must give the per-round ``rounds`` of bitmap mode, which the runner tests check against
the programs' comments and ``tests/kvm`` checks against /dev/kvm.  Also: ``round_stats`` in the
runner's JSON, ``pagetrack run --dirty-log``, and, when /dev/kvm is usable, the simulator's
rounds per mode against ``pagetrack.kvm.run_on_kvm``.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from click.testing import CliRunner
from dirty_log_helpers import programs_dir
from pagetrack.plugins.dirty_log import MODES, ROUND_STAT_KEYS
from pagetrack.program import DATA_GFN, load_program
from pagetrack.runner import run_program

PAGING = pytest.mark.parametrize("tdp", [True, False], ids=["tdp", "shadow"])

VARIANTS = [
    ("a_pages", {}),
    ("a_pages", {"N": 600, "PER_ROUND": 600, "FIRST": 3000}),  # more pages than a small ring holds
    ("b_lcg", {}),
    ("b_lcg", {"K": 3, "W": 10, "SEED": 7, "AREA_PAGES": 256, "AREA_OFF": 100}),
    ("c_mixed", {}),
    ("d_reads", {}),
]

CONFIGS: dict[str, dict[str, Any]] = {
    "bitmap": {"mode": "bitmap"},
    "clear": {"mode": "clear"},
    "clear-initially-set": {"mode": "clear-initially-set"},
    "ring": {"mode": "ring"},
    "ring-256": {"mode": "ring", "ring_size": 256},  # ring-full exits in the big variants
    "ring-pml": {"mode": "ring", "pml": True, "ring_size": 1024},
    "pml": {"mode": "pml"},
    "clear-pml": {"mode": "clear", "pml": True},
    "bitmap-no-eager-split": {"mode": "bitmap", "eager_split": False},
    "track": {"mode": "track"},
}

def _id(v: tuple[str, dict[str, int]]) -> str:
    name, d = v
    return name + "".join(f"-{k}={val}" for k, val in d.items())


_bitmap_cache: dict[tuple[str, bool], dict[str, Any]] = {}


def _bitmap(name: str, defines: dict[str, int], tdp: bool) -> dict[str, Any]:
    key = (_id((name, defines)), tdp)
    if key not in _bitmap_cache:
        prog = load_program(programs_dir() / f"{name}.s", defines)
        _bitmap_cache[key] = run_program(prog, tdp=tdp)
    return _bitmap_cache[key]


@PAGING
@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("variant", VARIANTS, ids=[_id(v) for v in VARIANTS])
def test_every_mode_gives_bitmap_rounds(variant: tuple[str, dict[str, int]], config: str, tdp: bool) -> None:
    name, defines = variant
    want = _bitmap(name, defines, tdp)
    prog = load_program(programs_dir() / f"{name}.s", defines)
    got = run_program(prog, tdp=tdp, options={"dirty_log": CONFIGS[config]})
    assert got["exit"] == "hlt" and got["io"] == want["io"] and got["regs"] == want["regs"]
    # c_mixed's failing lock cmpxchg is seen by the write tracker too: KVM's emulator writes the
    # old value back (em_cmpxchg), which page-track notifies
    assert got["rounds"] == want["rounds"]
    if config != "track":  # the write tracker does not see KVM's guest-table A/D updates
        assert got["low_rounds"] == want["low_rounds"]
    if config == "ring-256" and variant[1].get("N") == 600:
        assert sum(s["ring_full_exits"] for s in got["round_stats"]) >= 2


@pytest.mark.parametrize("mode", MODES)
def test_round_stats_in_the_runner_json(mode: str) -> None:
    """One ``round_stats`` entry per round, with the counters named in the issue."""
    prog = load_program(programs_dir() / "b_lcg.s", {"K": 3, "W": 20})
    r = run_program(prog, options={"dirty_log": {"mode": mode}})
    assert r["mode"] == mode
    stats = r["round_stats"]
    assert len(stats) == len(r["rounds"]) == 4
    for s in stats:
        assert tuple(s) == ROUND_STAT_KEYS
        assert s["harvest_time"] > 0 and s["collections"] >= 1
    assert sum(s["faults"] for s in stats) <= r["counters"]["faults"]
    data_pages = sum(len(x) for x in r["rounds"]) + sum(len(x) for x in r["low_rounds"])
    assert sum(s["pages"] for s in stats) == data_pages
    if mode == "track":
        assert all(s["emulations"] > 0 for s in stats[:3])
    if mode == "pml":
        assert sum(s["pml_flushes"] for s in stats) > 0 and sum(s["fast_path_fixes"] for s in stats) == 0
    orjson.dumps(r)


@pytest.mark.parametrize("mode", MODES)
def test_cli_dirty_log_option(mode: str) -> None:
    from pagetrack.cli import main

    path = str(programs_dir() / "d_reads.s")
    res = CliRunner().invoke(main, ["run", path, "--dirty-log", mode, "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = orjson.loads(res.output)
    assert out["mode"] == mode and out["rounds"] == [[], [DATA_GFN + 4], [], [DATA_GFN + 7], []]
    assert len(out["round_stats"]) == 5
    table = CliRunner().invoke(main, ["run", path, "--dirty-log", mode], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and f"{mode} mode" in table.output


def test_cli_rejects_an_unknown_mode() -> None:
    from pagetrack.cli import main

    res = CliRunner().invoke(main, ["run", str(programs_dir() / "d_reads.s"), "--dirty-log", "nope"])
    assert res.exit_code == 2 and "nope" in res.output


def test_a_refused_option_stops_the_run() -> None:
    """A non-strict VM quarantines the plugin on a bad option; the runner still reports it."""
    from pagetrack.errors import InputError

    prog = load_program(programs_dir() / "d_reads.s")
    with pytest.raises(InputError, match="unknown mode"):
        run_program(prog, options={"dirty_log": {"mode": "nope"}})
    with pytest.raises(InputError, match="unknown option"):
        run_program(prog, options={"dirty_log": {"mode": "ring", "size": 3}})


# ---- against the real KVM ------------------------------------------------------------------------

KVM_MODES = {  # simulator config → run_on_kvm arguments
    "bitmap": ("bitmap", False),
    "clear": ("clear", False),
    "clear-initially-set": ("clear", True),
    "ring": ("ring", False),
    "pml": ("bitmap", False),  # the real KVM's own PML use (if any) is invisible to userspace
    "track": ("bitmap", False),
}


@pytest.fixture(scope="module")
def kvm_run() -> Any:
    try:
        from pagetrack.kvm import KvmUnavailable, run_on_kvm
    except ImportError as exc:  # pragma: no cover
        pytest.skip(f"pagetrack.kvm is not importable: {exc}")
    cache: dict[tuple[str, str, bool], dict[str, Any]] = {}

    def run(name: str, mode: str, initially_set: bool) -> dict[str, Any]:
        key = (name, mode, initially_set)
        if key not in cache:
            try:
                cache[key] = run_on_kvm(load_program(programs_dir() / f"{name}.s"), mode=mode,
                                        initially_set=initially_set)
            except (KvmUnavailable, OSError) as exc:
                pytest.skip(f"/dev/kvm is not usable: {exc}")
        return cache[key]

    return run


@pytest.mark.kvm
@pytest.mark.parametrize("mode", list(KVM_MODES))
@pytest.mark.parametrize("name", ["a_pages", "b_lcg", "c_mixed", "d_reads"])
def test_simulator_rounds_match_the_real_kvm(name: str, mode: str, kvm_run: Any) -> None:
    kvm_mode, initially_set = KVM_MODES[mode]
    want = kvm_run(name, kvm_mode, initially_set)
    got = run_program(load_program(programs_dir() / f"{name}.s"), options={"dirty_log": {"mode": mode}})
    assert got["rounds"] == want["rounds"]
