"""Every hookspec is documented (docs/hooks.md) and versioned; the guide names every fixture."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
from pagetrack import hookspecs, testing
from pagetrack.plugin_info import hook_names

DOCS = Path(__file__).resolve().parents[1] / "docs"
HOOKS_MD = (DOCS / "hooks.md").read_text()


@pytest.mark.parametrize("name", hook_names())
def test_hookspec_has_a_section(name: str) -> None:
    """A `### \\`name\\`` heading, the exact signature, and a row in the summary table."""
    assert re.search(rf"^### `{name}`$", HOOKS_MD, re.M), f"docs/hooks.md has no section for {name}"
    args = ", ".join(inspect.signature(getattr(hookspecs, name)).parameters)
    assert f"\n{name}({args})\n" in HOOKS_MD, f"docs/hooks.md lacks the signature {name}({args})"
    assert f"| [`{name}`](#{name}) |" in HOOKS_MD, f"docs/hooks.md's table lacks {name}"


@pytest.mark.parametrize("name", hook_names())
def test_hookspec_docstring_is_versioned(name: str) -> None:
    doc = inspect.getdoc(getattr(hookspecs, name)) or ""
    assert ".. versionadded::" in doc


def test_no_section_for_a_hook_that_does_not_exist() -> None:
    documented = set(re.findall(r"^### `(\w+)`$", HOOKS_MD, re.M))
    assert documented == set(hook_names())


def test_guide_names_every_fixture() -> None:
    guide = (DOCS / "writing-a-plugin.md").read_text()
    for fixture in ("make_vm", "hook_recorder", "audit_events"):
        assert hasattr(testing, fixture)
        assert f"`{fixture}" in guide
