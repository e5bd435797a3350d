"""Scenario files: parsing into the model, the examples, and running them.

Bad scenarios (one line, exit 2) are in ``test_cli_bad_input.py``.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner
from pagetrack.audit import verify
from pagetrack.cli import main
from pagetrack.scenario import ProgramSpec, Scenario, TraceSpec, load_scenario, parse_scenario
from pagetrack.scenario_run import TRACE_EXIT, run_scenario

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "scenarios"
INSTALLED = {"shadow_mmu", "dirty_log", "gvt_shadow_gtt"}


def parse(data: dict, base: Path | None = None) -> Scenario:  # type: ignore[type-arg]
    return parse_scenario(data, "s.toml", base=base, installed=INSTALLED)


def test_defaults() -> None:
    sc = parse({"workload": {"program": "tour"}})
    assert (sc.vm.memory_mib, sc.vm.paging, sc.vm.vcpus) == (16, "tdp", 1)
    assert sc.workload == ProgramSpec("tour", True)
    assert sc.dirty_log == "bitmap" and sc.track == () and sc.name == "s"
    assert sc.plugins.enable is None and sc.plugins.disable == ()
    assert sc.options == {"dirty_log": {"mode": "bitmap"}}
    assert sc.output.json is None and sc.output.audit_level == "info"


def test_every_table(tmp_path: Path) -> None:
    (tmp_path / "p.s").write_text("hlt\n")
    sc = parse({
        "name": "n", "description": "d",
        "vm": {"memory_mib": 8, "paging": "shadow", "vcpus": 3},
        "plugins": {"enable": ["gvt_shadow_gtt"], "disable": [],
                    "options": {"gvt_shadow_gtt": {"attach": True}, "dirty_log": {"ring_size": 512}}},
        "workload": {"program": "p.s", "defines": {"N": 3}, "max_instructions": 10},
        "track": {"ranges": ["0x400-0x401", 0x500, "0x10"]},
        "dirty_log": {"mode": "ring"},
        "output": {"json": "r.json", "audit_log": "a.jsonl", "audit_level": "debug"},
    }, base=tmp_path)
    assert sc.vm.vcpus == 3 and not sc.vm.tdp
    assert sc.plugins.enable == ("shadow_mmu", "dirty_log", "gvt_shadow_gtt")
    assert sc.options == {"gvt_shadow_gtt": {"attach": True}, "dirty_log": {"ring_size": 512, "mode": "ring"}}
    assert isinstance(sc.workload, ProgramSpec) and sc.workload.path == (tmp_path / "p.s").resolve()
    assert not sc.workload.builtin and sc.workload.defines == {"N": 3}
    assert sc.track == ((0x400, 0x401), (0x500, 0x500), (0x10, 0x10))
    assert sc.output.json == Path("r.json") and sc.output.audit_level == "debug"


def test_a_trace_workload() -> None:
    sc = parse({"workload": {"trace": "fixed-rate", "rate": 1000, "seed": 3, "duration": 0.5, "rounds": 2,
                             "params": {"stores_per_page": 2}}})
    assert sc.workload == TraceSpec("fixed_rate", 1000.0, 3, 0.5, 2, {"stores_per_page": 2})


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_every_example_runs(path: Path, tmp_path: Path) -> None:
    sc = load_scenario(path)
    result = run_scenario(sc, audit_log=str(tmp_path / "audit.jsonl"))
    assert result["exit"] in ("hlt", TRACE_EXIT)
    assert result["scenario"]["name"] == sc.name
    assert any(result["rounds"])
    assert verify(tmp_path / "audit.jsonl").ok


def test_the_examples_cover_the_issue() -> None:
    """Shadow-paging page-table edits, a dirty-log comparison, an external tracker range."""
    by_name = {p.stem: load_scenario(p) for p in EXAMPLES.glob("*.toml")}
    pt = by_name["shadow-pt-edits"]
    assert pt.vm.paging == "shadow" and isinstance(pt.workload, ProgramSpec) and pt.workload.program == "tour"
    ring, pml = by_name["dirty-log-ring"], by_name["dirty-log-pml"]
    assert ring.workload == pml.workload and ring.dirty_log != pml.dirty_log
    assert by_name["external-tracker"].track


def test_the_dirty_log_comparison_gives_the_same_rounds() -> None:
    ring = run_scenario(load_scenario(EXAMPLES / "dirty-log-ring.toml"))
    pml = run_scenario(load_scenario(EXAMPLES / "dirty-log-pml.toml"))
    assert ring["rounds"] == pml["rounds"]
    assert sum(r["collections"] for r in ring["round_stats"]) > len(ring["rounds"])  # ring-full reaps
    assert sum(r["pml_flushes"] for r in pml["round_stats"]) > 0


def test_the_external_tracker_sees_its_pages_only() -> None:
    result = run_scenario(load_scenario(EXAMPLES / "external-tracker.toml"))
    assert result["counters"]["tracked_writes"] == 4 * 3  # 4 watched pages, 3 stores each
    assert result["rounds"][0] == [0x400, 0x401, 0x402, 0x403]


def test_a_program_runs_on_vcpu_0_and_says_so() -> None:
    sc = parse({"vm": {"vcpus": 4}, "workload": {"program": "tour"}})
    result = run_scenario(sc)
    assert result["exit"] == "hlt" and result["io"] == [1, 4, 4, 2]
    (note,) = result["scenario"]["notes"]
    assert "vCPU 0" in note and "1-3" in note


def test_a_trace_is_shared_out_to_the_vcpus() -> None:
    one = run_scenario(parse({"workload": {"trace": "uniform", "rate": 20000, "duration": 0.1, "rounds": 2}}))
    three = run_scenario(parse({"vm": {"vcpus": 3},
                                "workload": {"trace": "uniform", "rate": 20000, "duration": 0.1, "rounds": 2}}))
    assert one["rounds"] == three["rounds"]  # the same stores, whoever makes them
    assert one["scenario"]["stores"] == three["scenario"]["stores"] == 2000
    assert "3 vCPUs" in three["scenario"]["notes"][0]


def test_ring_mode_with_several_vcpus_gives_each_a_ring() -> None:
    sc = parse({"vm": {"vcpus": 2}, "dirty_log": {"mode": "ring"},
                "plugins": {"options": {"dirty_log": {"ring_size": 256}}},
                "workload": {"trace": "sequential", "rate": 4000, "duration": 0.1}})
    result = run_scenario(sc)
    assert result["rounds"] == [list(range(0x400, 0x400 + 400))]


def test_cli_runs_a_scenario_and_writes_its_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sc = tmp_path / "s.toml"
    sc.write_text('[workload]\nprogram = "tour"\n[output]\njson = "out.json"\naudit_log = "a.jsonl"\n')
    monkeypatch.chdir(tmp_path)  # outputs are relative to the current directory
    r = CliRunner().invoke(main, ["run", str(sc), "--json"])
    assert r.exit_code == 0, r.output
    result = orjson.loads(r.output)
    assert result == orjson.loads((tmp_path / "out.json").read_bytes())
    assert result["audit_log"] == "a.jsonl" and verify(tmp_path / "a.jsonl").ok


def test_cli_audit_log_overrides_the_file(tmp_path: Path) -> None:
    sc = tmp_path / "s.toml"
    sc.write_text('[workload]\nprogram = "tour"\n[output]\naudit_log = "never.jsonl"\n')
    log = tmp_path / "here.jsonl"
    r = CliRunner().invoke(main, ["run", str(sc), "--audit-log", str(log)])
    assert r.exit_code == 0, r.output
    assert "audit log:" in r.output and log.exists() and not (tmp_path / "never.jsonl").exists()


def test_cli_report_names_the_scenario(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["run", str(EXAMPLES / "external-tracker.toml")])
    assert r.exit_code == 0, r.output
    assert "external tracker on gfns 0x400-0x403" in r.output and "Dirty pages per round" in r.output
    assert (tmp_path / "external-tracker.json").exists()
