"""Offline virtual environments for install tests (the approach of test_plugins_acceptance.py).

A venv made with ``--system-site-packages --without-pip`` sees the outer
environment's dependencies (pluggy, attrs, keystone ...) and its pip; packages
are installed into it with ``pip install --no-deps --no-build-isolation
--no-index``, so nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: What a build of pagetrack needs from the repository (pyproject's package-dir and readme).
SOURCES = ("pyproject.toml", "README.md", "core", "plugins")


def why_no_wheels() -> str | None:
    """Why pip cannot build packages offline here, or None."""
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
            return f"setuptools {setuptools.__version__} cannot build wheels without 'wheel'"
    return None


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def make_venv(where: Path) -> Path:
    """Create the venv; returns its bin (Scripts) folder."""
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(where)],
                   check=True)
    return where / ("Scripts" if os.name == "nt" else "bin")


def run(cmd: list[str | Path], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=clean_env(), capture_output=True, text=True,
                          timeout=timeout)


def pip_install(bin_dir: Path, *paths: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``pip install --no-deps --no-build-isolation --no-index PATH...`` (non-editable) into the venv."""
    return run([bin_dir / "python", "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                *paths], cwd=cwd)


def copy_pagetrack_sources(dest: Path) -> Path:
    """Copy what a build of pagetrack needs (an in-tree build would leave build/ in the repository)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", ".hypothesis")
    dest.mkdir(parents=True)
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)
    return dest
