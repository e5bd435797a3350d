"""``pagetrack plugins [--json]``: lists every entry point, loaded or failed, exit 0."""

from __future__ import annotations

import re
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

GOOD = """
from pagetrack.hookspecs import hookimpl

@hookimpl
def track_write(gpa, new):
    pass
"""


@pytest.fixture
def fake_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """Install (on sys.path) one good and one broken plugin distribution."""
    tag = uuid.uuid4().hex[:8]
    site = tmp_path / "site"
    site.mkdir()
    modules = {"cli_good": f"cli_good_{tag}", "cli_broken": f"cli_broken_{tag}"}
    (site / f"{modules['cli_good']}.py").write_text(GOOD)
    (site / f"{modules['cli_broken']}.py").write_text(
        "raise ImportError('libfoo.so: cannot open')\n"
    )
    for ep, module in modules.items():
        info = site / f"{ep}_dist-0.{len(ep)}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {ep}-dist\nVersion: 0.{len(ep)}\n"
        )
        (info / "entry_points.txt").write_text(f"[pagetrack]\n{ep} = {module}\n")
    monkeypatch.syspath_prepend(str(site))
    yield modules
    for module in modules.values():
        sys.modules.pop(module, None)


def _run(*args: str) -> Any:
    from pagetrack.cli import main

    return CliRunner().invoke(
        main, ["plugins", *args], catch_exceptions=False, env={"COLUMNS": "200"}
    )


def test_json_lists_loaded_and_failed(fake_plugins: dict[str, str]) -> None:
    result = _run("--json")
    assert result.exit_code == 0, result.output
    records = {r["name"]: r for r in orjson.loads(result.output)}
    good, broken = records["cli_good"], records["cli_broken"]
    assert good == {
        "name": "cli_good",
        "dist": "cli_good-dist",
        "version": "0.8",
        "module": fake_plugins["cli_good"],
        "hooks": ["track_write"],
        "external": True,
        "status": "loaded",
        "error": None,
    }
    assert broken["status"] == "failed"
    assert broken["error"] == "ImportError: libfoo.so: cannot open"
    assert broken["dist"] == "cli_broken-dist" and broken["hooks"] == []
    assert list(records) == sorted(records)


def test_json_lists_builtins() -> None:
    """The built-in plugins are entry points like any other and appear in the listing."""
    records = {r["name"]: r for r in orjson.loads(_run("--json").output)}
    for name in ("shadow_mmu", "dirty_log"):
        assert records[name]["dist"] == "pagetrack"
        assert records[name]["module"] == f"pagetrack.plugins.{name}"
    assert records["shadow_mmu"]["external"] is False


def test_table(fake_plugins: dict[str, str]) -> None:
    result = _run()
    assert result.exit_code == 0
    rows = {line.split()[1]: line for line in result.output.splitlines() if line.startswith("│")}
    assert "loaded" in rows["cli_good"] and "cli_good-dist 0.8" in rows["cli_good"]
    assert "failed: ImportError: libfoo.so: cannot open" in rows["cli_broken"]
    summary = result.output.splitlines()[-1]
    assert re.fullmatch(r"\d+ plugin\(s\), \d+ loaded, [1-9]\d* failed", summary), summary
