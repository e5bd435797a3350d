"""Acceptance: third-party plugin packages installed with pip into a fresh venv.

A venv with ``--system-site-packages`` (so pagetrack, installed in the outer
environment, is importable) gets the ``hello_tracker`` and ``broken_tracker``
example packages installed offline; then ``python -m pagetrack plugins --json``
in that venv must list hello_tracker loaded, broken_tracker failed with its
error, and the built-in plugins loaded; and hello_tracker's own tests must
pass there with pagetrack's pytest fixtures.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "plugins"


def _can_build_wheels() -> str | None:
    """Why pip cannot build the examples offline here, or None."""
    try:
        import setuptools
    except ImportError:
        return "setuptools is not installed"
    try:
        import setuptools.command.bdist_wheel
    except ImportError:
        try:
            import wheel  # noqa: F401
        except ImportError:
            return f"setuptools {setuptools.__version__} cannot build wheels without 'wheel'; install setuptools>=70.1"
    return None


def _run(cmd: list[str | Path], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_installed_plugins_are_discovered(tmp_path: Path) -> None:
    why = _can_build_wheels()
    if why:
        pytest.skip(why)
    # Copy the sources: an in-place build would leave build/ and *.egg-info in the repo.
    src = tmp_path / "src"
    for name in ("hello_tracker", "broken_tracker"):
        shutil.copytree(
            EXAMPLES / name, src / name, ignore=shutil.ignore_patterns("build", "*.egg-info")
        )
    venv = tmp_path / "venv"
    # --without-pip: the outer environment's pip (and setuptools) serve the venv.
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
        check=True,
    )
    python = venv / ("Scripts" if os.name == "nt" else "bin") / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    install = _run(
        [
            python,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            src / "hello_tracker",
            src / "broken_tracker",
        ],
        cwd=tmp_path,
        env=env,
    )
    assert install.returncode == 0, install.stdout + install.stderr

    listing = _run([python, "-m", "pagetrack", "plugins", "--json"], cwd=tmp_path, env=env)
    assert listing.returncode == 0, listing.stderr
    records = {r["name"]: r for r in orjson.loads(listing.stdout)}
    hello = records["hello_tracker"]
    assert hello["status"] == "loaded", hello
    assert (hello["dist"], hello["version"], hello["module"]) == (
        "pagetrack-hello-tracker",
        "0.1.0",
        "hello_tracker",
    )
    assert hello["hooks"] == ["track_remove_region", "track_write", "vm_destroyed"]
    assert hello["external"] is True
    broken = records["broken_tracker"]
    assert broken["status"] == "failed"
    assert (
        broken["error"] == "ImportError: broken_tracker needs libgvt.so.1, which is not installed"
    )
    for builtin in ("shadow_mmu", "dirty_log"):
        assert records[builtin]["status"] == "loaded", records[builtin]
        assert records[builtin]["dist"] == "pagetrack"

    # The example's own test suite, with pagetrack's fixtures, in the venv where it is installed.
    tests = _run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=src / "hello_tracker",
        env=env,
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
