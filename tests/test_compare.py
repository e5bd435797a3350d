"""``pagetrack compare`` and the simulator-versus-real-KVM agreement it reports."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner
from kvm_available import needs_kvm
from pagetrack.cli import main
from pagetrack.compare import diff_rounds

PROGRAMS = Path(__file__).resolve().parents[2] / "shared" / "programs"


def test_diff_rounds_reports_both_sides_and_missing_rounds() -> None:
    d = diff_rounds([[1, 2], [3]], [[2, 4], [3], [5]], ignore={4})
    assert d == [
        {"round": 0, "only_sim": [1], "only_kvm": [], "missing_round": None},
        {"round": 2, "only_sim": [], "only_kvm": [5], "missing_round": "sim"},
    ]


def test_compare_rejects_initially_set_without_clear(tmp_path: Path) -> None:
    prog = tmp_path / "p.s"
    prog.write_text("hlt\n")
    r = CliRunner().invoke(main, ["compare", str(prog), "--initially-set"])
    assert r.exit_code == 2
    assert "needs --mode clear" in r.output


def test_compare_bad_program_is_one_line_exit_2(tmp_path: Path) -> None:
    prog = tmp_path / "p.s"
    prog.write_text("frobnicate rax\n")
    r = CliRunner().invoke(main, ["compare", str(prog)])
    assert r.exit_code == 2
    assert len(r.output.strip().splitlines()) == 1


@needs_kvm
@pytest.mark.parametrize("name", ["a_pages", "b_lcg", "c_mixed", "d_reads"])
@pytest.mark.parametrize("mode", ["bitmap", "clear", "ring"])
def test_example_programs_agree_with_real_kvm(name: str, mode: str) -> None:
    r = CliRunner().invoke(main, ["compare", str(PROGRAMS / f"{name}.s"), "--mode", mode, "--json"])
    result = orjson.loads(r.output)
    assert result["round_differences"] == []
    assert result["register_differences"] == {}
    assert result["exit"] == {"sim": "hlt", "kvm": "hlt"}
    assert r.exit_code == 0
