"""``pagetrack new-plugin NAME [DIR]``: write a pip-installable tracker package.

The package (``DIR/NAME``, see :mod:`pagetrack.plugin_template`) installs with
pip, is discovered by ``pagetrack plugins`` through its ``pagetrack`` entry
point, and passes its own tests as generated.  NAME is checked first: a
Python-identifier-like name (letters, digits, ``_`` or ``-``, starting with a
letter), not a Python keyword, not the name of an installed plugin or of an
importable module (the tracker module would shadow it), and not an existing
path.
"""

from __future__ import annotations

import importlib.util
import keyword
import re
from pathlib import Path

import click

from .cli_common import guarded
from .errors import InputError

__all__ = ["check_free", "module_name", "new_plugin", "write_package"]

_EXAMPLE = """
\b
Examples:
  pagetrack new-plugin gpa_watch                 # writes ./gpa_watch/
  pagetrack new-plugin my-tracker ~/src          # writes ~/src/my-tracker/ (module my_tracker)
  cd gpa_watch && pip install -e . && pytest && pagetrack plugins
"""

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def module_name(name: str) -> str:
    """The import name of plugin ``name`` (``my-tracker`` → ``my_tracker``), or :class:`InputError`.

    Only the spelling is checked here; :func:`check_free` checks for clashes.
    """
    if not _NAME.fullmatch(name):
        raise InputError("must start with a letter and hold only letters, digits, '_' and '-'", f"NAME {name!r}")
    module = name.replace("-", "_").lower()
    if keyword.iskeyword(module) or module in ("pagetrack", "test", "tests"):
        raise InputError(f"{module!r} cannot be a module name", f"NAME {name!r}")
    return module


def check_free(name: str, module: str) -> None:
    """:class:`InputError` if ``module`` is an installed plugin's name or an importable module."""
    from importlib.metadata import entry_points

    if module in {ep.name for ep in entry_points(group="pagetrack")}:
        raise InputError(f"a plugin called {module!r} is already installed", f"NAME {name!r}")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        raise InputError(f"a module {module!r} already exists ({spec.origin}); the tracker would shadow it",
                         f"NAME {name!r}")


def write_package(name: str, parent: Path) -> Path:
    """Write the package for plugin ``name`` into ``parent/name``; returns that folder."""
    from .plugin_template import render_package

    module = module_name(name)
    if parent.exists() and not parent.is_dir():
        raise InputError("is not a directory", f"DIR {str(parent)!r}")
    target = parent / name
    if target.exists():
        raise InputError(f"{target} already exists; choose another NAME or DIR", f"NAME {name!r}")
    check_free(name, module)
    files = render_package(name, module)
    for rel, text in files.items():
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return target


@click.command("new-plugin", epilog=_EXAMPLE)
@click.argument("name")
@click.argument("directory", required=False, default=".", metavar="[DIR]",
                type=click.Path(file_okay=True, path_type=Path))
@guarded
def new_plugin(name: str, directory: Path) -> None:
    """Write a new tracker package NAME into DIR (default: the current directory).

    The package has a pyproject.toml declaring the 'pagetrack' entry point, a
    tracker module with one documented function per hook, a README, and tests
    that use pagetrack's pytest fixtures and a real guest program.  It installs
    with pip, shows in 'pagetrack plugins', and its tests pass as written.
    """
    target = write_package(name, directory)
    module = module_name(name)
    click.echo(f"wrote {target}/ (module {module}, distribution pagetrack-{module.replace('_', '-')})")
    click.echo("next:")
    click.echo(f"  cd {target}")
    click.echo("  pip install -e .        # registers the entry point")
    click.echo("  pytest                  # its tests, with pagetrack's fixtures")
    click.echo(f"  pagetrack plugins       # lists {module}")
