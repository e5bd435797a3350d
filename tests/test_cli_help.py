"""Every command has --help with an example, and docs/cli.md documents every command and option."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from pagetrack.cli import main

CLI_MD = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
COMMANDS = sorted(main.commands)


def test_the_group_help_names_exit_codes_and_examples() -> None:
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0
    assert "Examples:" in r.output and "Exit codes" in r.output
    for name in COMMANDS:
        assert name in r.output


def test_version() -> None:
    from importlib.metadata import version

    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0 and version("pagetrack") in r.output


@pytest.mark.parametrize("name", COMMANDS)
def test_help_has_an_example(name: str) -> None:
    r = CliRunner().invoke(main, [name, "--help"])
    assert r.exit_code == 0, r.output
    assert re.search(r"^\s+Examples?:$", r.output, re.M), r.output
    assert re.search(rf"^\s+pagetrack {name}\b", r.output, re.M), r.output


def _section(name: str) -> str:
    m = re.search(rf"^## `pagetrack {name}`$(.*?)(?=^## |\Z)", CLI_MD, re.M | re.S)
    assert m, f"docs/cli.md has no section for pagetrack {name}"
    return m.group(1)


@pytest.mark.parametrize("name", COMMANDS)
def test_cli_md_documents_every_option(name: str) -> None:
    section = _section(name)
    assert f"| [`pagetrack {name}`](#pagetrack-{name}) |" in CLI_MD
    for param in main.commands[name].params:
        if isinstance(param, click.Option):
            for opt in (*param.opts, *param.secondary_opts):
                assert f"`{opt}" in section, f"docs/cli.md, pagetrack {name}: {opt} is not documented"
    assert "```console" in section
