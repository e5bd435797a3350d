"""``pagetrack migrate``: defaults, JSON shape, the plot, programs and one-line errors (exit 2)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner
from pagetrack.cli_migrate import parse_rate
from pagetrack.errors import InputError

SMALL = ["--mem-mib", "4", "--bandwidth", "8MiB"]


def _run(*args: str) -> Any:
    from pagetrack.cli import main

    return CliRunner().invoke(main, ["migrate", *args], catch_exceptions=False, env={"COLUMNS": "200"})


def test_no_arguments_migrates_the_builtin_workload() -> None:
    result = _run()
    assert result.exit_code == 0, result.output
    assert "hotset" in result.output and "converged after" in result.output
    assert "completion" in result.output


def test_json_is_one_object() -> None:
    result = _run("--workload", "fixed-rate", "--rate", "200", *SMALL, "--json")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("\n") == 1
    data = orjson.loads(result.stdout)
    assert data["converged"] is True and data["workload"] == "fixed_rate" and data["mode"] == "bitmap"
    assert data["bandwidth"] == 8 << 20 and data["downtime_limit"] == 0.3
    assert data["memory_pages"] == 1024 + 512
    assert [r["phase"] for r in data["rounds"]] == ["bulk", "completion"]
    assert {"total_pages_sent", "total_seconds", "expected_downtime", "reason", "throttle_triggers",
            "dirty_sync_count", "dirty_pages_rate", "auto_converge"} <= set(data)


def test_auto_converge_and_limits() -> None:
    args = ["--workload", "fixed-rate", "--rate", "2560", *SMALL, "--json"]
    stuck = orjson.loads(_run(*args, "--max-rounds", "5").stdout)
    assert stuck["converged"] is False and len(stuck["rounds"]) == 5
    done = orjson.loads(_run(*args, "--auto-converge").stdout)
    assert done["converged"] is True and max(r["throttle"] for r in done["rounds"]) >= 30
    loose = orjson.loads(_run(*args, "--downtime-ms", "1000", "--max-rounds", "5").stdout)
    assert loose["converged"] is True  # 1 s of downtime allows the whole 4 MiB slot


def test_table_output() -> None:
    result = _run("--workload", "uniform", "--rate", "5000", "--seed", "3", *SMALL)
    assert result.exit_code == 0, result.output
    assert "pre-copy migration" in result.output and "bulk" in result.output


def test_program(tmp_path: Path) -> None:
    prog = tmp_path / "prog.s"
    prog.write_text("mov qword ptr [rdi], 1\nout ROUND_PORT, al\nmov qword ptr [rdi + 8], 2\nhlt\n")
    data = orjson.loads(_run(str(prog), *SMALL, "--json").stdout)
    assert data["converged"] is True and data["workload"] == str(prog)


def test_program_that_fails_exits_2(tmp_path: Path) -> None:
    prog = tmp_path / "bad.s"
    prog.write_text("mov rax, 0x7fff0000000\nmov qword ptr [rax], 1\nhlt\n")
    result = _run(str(prog), *SMALL)
    assert result.exit_code == 2
    assert result.stderr.startswith("pagetrack: guest stopped:") and result.stderr.count("\n") == 1


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "rounds.png"
    result = _run("--workload", "hotset", "--rate", "20000", *SMALL, "--plot", str(out))
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    result = _run(*SMALL, "--plot", str(tmp_path / "x.png"))
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "pagetrack[plot]" in result.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("args", [
    ["--bandwidth", "fast"],
    ["--bandwidth", "0"],
    ["--bandwidth", "-1G"],
    ["--bandwidth", "5iB"],
    ["--mem-mib", "abc"],
    ["--mem-mib", "0"],
    ["--mem-mib", "4096"],
    ["--downtime-ms", "0"],
    ["--downtime-ms", "soon"],
    ["--workload", "nope"],
    ["--workload", "uniform", "--rate", "-5"],
    ["--mode", "nope"],
    ["--max-rounds", "0"],
    ["--no-such-option"],
    ["/no/such/program.s"],
    ["/no/such/program.s", "--workload", "uniform"],
    ["--ips", "100"],
])
def test_bad_input_is_one_line_exit_2(args: list[str]) -> None:
    result = _run(*args)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("pagetrack: ") and result.stderr.count("\n") == 1, result.stderr


def test_rate_with_a_program_is_refused(tmp_path: Path) -> None:
    prog = tmp_path / "p.s"
    prog.write_text("hlt\n")
    result = _run(str(prog), "--rate", "5")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1


@pytest.mark.parametrize(("text", "expected"), [
    ("1G", 1 << 30), ("100M", 100 << 20), ("128MiB", 128 << 20), ("125MB/s", 125e6), ("64KiBps", 65536),
    ("10Gbit/s", 1.25e9), ("1Gb/s", 125e6), ("1.5G", 1.5 * (1 << 30)), ("4096", 4096), ("2k", 2048),
])
def test_parse_rate(text: str, expected: float) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize("text", ["", "G", "1X", "1 G B", "0", "0.0M", "1e9"])
def test_parse_rate_rejects(text: str) -> None:
    with pytest.raises(InputError, match="--bandwidth"):
        parse_rate(text)
