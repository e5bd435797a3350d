"""Acceptance: pagetrack installed (non-editable) into a fresh venv runs the tour from anywhere.

The repository's sources are copied and pip-installed offline, as a wheel, into
a venv made with ``--system-site-packages`` (for the dependencies); then
``<venv>/bin/pagetrack run`` runs from an empty temporary directory.  That
proves the package data (``pagetrack/programs/*.s``, the built-in guests) ships
in the wheel: nothing is read from the repository.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from venv_helpers import ROOT, copy_pagetrack_sources, make_venv, pip_install, run, why_no_wheels


@pytest.fixture(scope="module")
def venv_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    why = why_no_wheels()
    if why:
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("fresh")
    src = copy_pagetrack_sources(tmp / "src")
    bin_dir = make_venv(tmp / "venv")
    install = pip_install(bin_dir, src, cwd=tmp)
    assert install.returncode == 0, install.stdout + install.stderr
    return bin_dir


@pytest.mark.slow
def test_the_installed_package_is_the_one_imported(venv_bin: Path, tmp_path: Path) -> None:
    where = run([venv_bin / "python", "-c", "import pagetrack, pagetrack.programs as p; "
                 "print(pagetrack.__file__); print(p.__file__)"], cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    for line in where.stdout.splitlines():
        assert Path(line).is_relative_to(venv_bin.parent), line
        assert not Path(line).is_relative_to(ROOT), line


@pytest.mark.slow
def test_pagetrack_run_gives_the_tour_report_from_any_directory(venv_bin: Path, tmp_path: Path) -> None:
    r = run([venv_bin / "pagetrack", "run"], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "pagetrack tour" in r.stdout
    for section in ("page tables", "gpu", "dirty log"):
        assert section in r.stdout
    assert "track_write notifications per plugin" in r.stdout
    assert "Dirty pages per round" in r.stdout
    assert "verified" in r.stdout and "audit log:" in r.stdout
    assert r.stderr == ""  # no progress display off a terminal


@pytest.mark.slow
def test_pagetrack_run_json_from_the_venv(venv_bin: Path, tmp_path: Path) -> None:
    log = tmp_path / "tour.jsonl"
    r = run([venv_bin / "pagetrack", "run", "--json", "--audit-log", log], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    result = orjson.loads(r.stdout)
    assert result["tour"]["ok"] and result["audit_log"] == str(log)
    audit = run([venv_bin / "pagetrack", "audit", log], cwd=tmp_path)
    assert audit.returncode == 0 and "audit OK" in audit.stdout
