"""``pagetrack audit LOG``: tables and verdict, --json, exit codes 0 / 1 / 2."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import orjson
import pytest
from audit_helpers import Op, build, write_lines
from click.testing import CliRunner

# pagetrack.cli imports every command module; until all of them exist, it cannot be imported.
_missing = [
    m for m in ("cli_plugins", "cli_run") if importlib.util.find_spec(f"pagetrack.{m}") is None
]
if _missing:
    pytest.skip(f"pagetrack.{_missing[0]} does not exist yet", allow_module_level=True)

from pagetrack.cli import EXIT_BAD_INPUT, EXIT_FINDING, EXIT_OK  # noqa: E402
from pagetrack.cli_audit import audit  # noqa: E402

HISTORY: list[Op] = [
    ("add", 0x400),
    ("write", ["gvt", "dirty_log"], b"\xaa"),
    ("remove", 0x400),
]


def clean_log(tmp_path: Path) -> Path:
    return write_lines(tmp_path / "audit.jsonl", build(HISTORY).lines)


def tampered_log(tmp_path: Path) -> Path:
    lines = list(build(HISTORY).lines)
    del lines[2]
    return write_lines(tmp_path / "audit.jsonl", lines)


def test_a_clean_log_exits_0_with_tables(tmp_path: Path) -> None:
    result = CliRunner().invoke(audit, [str(clean_log(tmp_path))])
    assert result.exit_code == EXIT_OK, result.output
    assert "audit OK: 7 events, chain intact" in result.stdout
    assert "track_write_call" in result.stdout and "dirty_log" in result.stdout


def test_a_tampered_log_exits_1_with_its_problems(tmp_path: Path) -> None:
    result = CliRunner().invoke(audit, [str(tampered_log(tmp_path))])
    assert result.exit_code == EXIT_FINDING
    assert "audit FAILED" in result.stdout
    assert "line 3 (seq 3): seq 3 where 2 was expected" in result.stdout


def test_not_a_log_exits_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello\n")
    for target in (path, tmp_path / "missing.jsonl"):
        result = CliRunner().invoke(audit, [str(target)])
        assert result.exit_code == EXIT_BAD_INPUT
        assert result.stdout == ""
        assert result.stderr.startswith("pagetrack: ") and result.stderr.count("\n") == 1


def test_json_output(tmp_path: Path) -> None:
    result = CliRunner().invoke(audit, [str(clean_log(tmp_path)), "--json"])
    assert result.exit_code == EXIT_OK
    report = orjson.loads(result.stdout)
    assert report["ok"] is True and report["events"] == 7 and report["problems"] == []
    assert report["counts_by_plugin"] == {"dirty_log": {"ok": 1}, "gvt": {"ok": 1}}
    result = CliRunner().invoke(audit, [str(tampered_log(tmp_path)), "--json"])
    assert result.exit_code == EXIT_FINDING
    report = orjson.loads(result.stdout)
    assert report["ok"] is False
    assert report["problems"][0] == {
        "seq": 3,
        "line": 3,
        "kind": "chain",
        "message": report["problems"][0]["message"],
    }
