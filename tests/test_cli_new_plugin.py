"""``pagetrack new-plugin``: the package it writes installs, is discovered and passes its own tests.

Bad NAMEs and DIRs are in ``test_cli_bad_input.py``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import orjson
import pytest
import tomllib
from click.testing import CliRunner
from pagetrack.cli import main
from pagetrack.cli_new_plugin import write_package
from pagetrack.plugin_info import hook_names
from venv_helpers import make_venv, pip_install, run, why_no_wheels


def test_the_command_writes_the_package(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["new-plugin", "gpa-watch", str(tmp_path)])
    assert r.exit_code == 0, r.output
    pkg = tmp_path / "gpa-watch"
    assert sorted(p.relative_to(pkg).as_posix() for p in pkg.rglob("*") if p.is_file()) == [
        "README.md", "gpa_watch.py", "pyproject.toml", "tests/test_gpa_watch.py"]
    assert "pip install -e ." in r.output


def test_pyproject_declares_the_entry_point(tmp_path: Path) -> None:
    pkg = write_package("gpa_watch", tmp_path)
    meta = tomllib.loads((pkg / "pyproject.toml").read_text())
    assert meta["project"]["name"] == "pagetrack-gpa-watch"
    assert meta["project"]["entry-points"]["pagetrack"] == {"gpa_watch": "gpa_watch"}
    assert meta["tool"]["setuptools"]["py-modules"] == ["gpa_watch"]
    assert any(d.startswith("pagetrack>=") for d in meta["project"]["dependencies"])


def test_every_hook_has_a_docstring(tmp_path: Path) -> None:
    pkg = write_package("gpa_watch", tmp_path)
    tree = ast.parse((pkg / "gpa_watch.py").read_text())
    assert ast.get_docstring(tree)
    hooks = [f for f in tree.body if isinstance(f, ast.FunctionDef)
             and any(ast.unparse(d) == "pagetrack.hookimpl" for d in f.decorator_list)]
    assert {f.name for f in hooks} <= set(hook_names())
    assert {"track_write", "track_remove_region", "vm_destroyed", "plugin_options"} <= {f.name for f in hooks}
    for f in hooks:
        assert ast.get_docstring(f), f.name


def test_its_tests_pass_without_installing(tmp_path: Path) -> None:
    pkg = write_package("gpa_watch", tmp_path)
    r = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=pkg)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "6 passed" in r.stdout


@pytest.mark.slow
def test_installs_is_discovered_and_passes_its_tests_in_a_fresh_venv(tmp_path: Path) -> None:
    why = why_no_wheels()
    if why:
        pytest.skip(why)
    pkg = write_package("gpa-watch", tmp_path / "src")
    bin_dir = make_venv(tmp_path / "venv")
    install = pip_install(bin_dir, pkg, cwd=tmp_path)
    assert install.returncode == 0, install.stdout + install.stderr

    listing = run([bin_dir / "python", "-m", "pagetrack", "plugins", "--json"], cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    record = {r["name"]: r for r in orjson.loads(listing.stdout)}["gpa_watch"]
    assert record["status"] == "loaded", record
    assert (record["dist"], record["version"], record["module"]) == ("pagetrack-gpa-watch", "0.1.0", "gpa_watch")
    assert record["external"] is True
    assert set(record["hooks"]) == {"memslot_commit", "plugin_options", "track_remove_region", "track_write",
                                    "vm_created", "vm_destroyed"}

    tests = run([bin_dir / "python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=pkg)
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "6 passed" in tests.stdout

    # installed, its option works from a scenario file
    scenario = tmp_path / "s.toml"
    scenario.write_text('[workload]\nprogram = "tour"\n[plugins.options.gpa_watch]\nwatch = ["0x410-0x411"]\n')
    r = run([bin_dir / "python", "-m", "pagetrack", "run", scenario, "--json"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert orjson.loads(r.stdout)["counters"]["track_write_calls"] >= 3
