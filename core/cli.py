"""The ``pagetrack`` command line.

Exit codes, the same for every command: 0 success; 1 a finding (a difference,
a failed audit); 2 bad input or a missing prerequisite.  Bad input is reported
in one line on stderr, never as a traceback.
"""

from __future__ import annotations

import click

from . import cli_audit, cli_compare, cli_migrate, cli_new_plugin, cli_plugins, cli_run
from .cli_common import EXIT_BAD_INPUT, EXIT_FINDING, EXIT_OK, OneLineGroup, fail, guarded

__all__ = ["EXIT_BAD_INPUT", "EXIT_FINDING", "EXIT_OK", "fail", "guarded", "main"]


_EPILOG = """
\b
Examples:
  pagetrack run                          # the built-in tour: every tracker on one VM
  pagetrack run examples/scenarios/shadow-pt-edits.toml
  pagetrack new-plugin my_tracker        # a tracker package to start from
  pagetrack COMMAND --help               # options and examples of each command

\b
Exit codes: 0 success; 1 a finding (a difference, a failed audit);
2 bad input or a missing prerequisite (one line on stderr).
Documentation: docs/getting-started.md, docs/cli.md.
"""


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=_EPILOG)
@click.version_option(package_name="pagetrack", prog_name="pagetrack")
def main() -> None:
    """pagetrack: KVM's x86 write tracking, simulated, with trackers as plugins."""


main.add_command(cli_run.run)
main.add_command(cli_plugins.plugins)
main.add_command(cli_audit.audit)
main.add_command(cli_compare.compare)
main.add_command(cli_migrate.migrate)
main.add_command(cli_new_plugin.new_plugin)
