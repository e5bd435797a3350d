"""``pagetrack run``: the tour, programs, the real-KVM backend (bad input: test_cli_bad_input.py)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner
from kvm_available import needs_kvm
from pagetrack.cli import main

PROGRAMS = Path(__file__).resolve().parents[2] / "shared" / "programs"


def invoke(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, list(args))


def test_tour_runs_and_its_audit_log_verifies(tmp_path: Path) -> None:
    log = tmp_path / "tour.jsonl"
    r = invoke("run", "--json", "--audit-log", str(log))
    assert r.exit_code == 0, r.output
    result = orjson.loads(r.output)
    assert result["exit"] == "hlt"
    assert result["io"] == [1, 4, 4, 2]
    assert result["tour"]["audit_ok"]
    assert invoke("audit", str(log)).exit_code == 0


def test_a_guest_that_stops_on_an_error_exits_2(tmp_path: Path) -> None:
    prog = tmp_path / "bad.s"
    prog.write_text("mov qword ptr [0x7000000000], rax\nhlt\n")
    r = invoke("run", str(prog))
    assert r.exit_code == 2
    assert "guest stopped" in r.output


@needs_kvm
@pytest.mark.parametrize("mode", ["bitmap", "clear", "clear-initially-set", "ring"])
def test_backend_kvm_gives_the_same_rounds_as_the_simulator(mode: str) -> None:
    prog = str(PROGRAMS / "c_mixed.s")
    real = orjson.loads(invoke("run", prog, "--backend", "kvm", "--dirty-log", mode, "--json").output)
    sim = orjson.loads(invoke("run", prog, "--shadow", "--dirty-log", mode, "--json").output)
    assert real["exit"] == sim["exit"] == "hlt"
    assert real["rounds"] == sim["rounds"]
    assert real["regs"] == {k: v for k, v in sim["regs"].items() if k in real["regs"]}
