"""Run mypy on the package as it is imported (``core/`` → ``pagetrack``, ``plugins/`` → ``pagetrack.plugins``).

The package-dir mapping is invisible to mypy, so this builds a throw-away tree
of symlinks with the import layout and checks that.  Usage: ``python3 tools/typecheck.py``.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _link_tree(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.name == "__pycache__":
            continue
        if item.is_dir():
            _link_tree(item, dst / item.name)
        elif item.suffix in (".py", ".pyi") or item.name == "py.typed":
            (dst / item.name).symlink_to(item)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / "pagetrack"
        _link_tree(ROOT / "core", pkg)
        _link_tree(ROOT / "plugins", pkg / "plugins")
        cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "-p", "pagetrack"]
        return subprocess.call(cmd, cwd=tmp)


if __name__ == "__main__":
    raise SystemExit(main())
