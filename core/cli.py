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


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pagetrack", prog_name="pagetrack")
def main() -> None:
    """pagetrack: KVM's x86 write tracking, simulated, with trackers as plugins."""


main.add_command(cli_run.run)
main.add_command(cli_plugins.plugins)
main.add_command(cli_audit.audit)
main.add_command(cli_compare.compare)
main.add_command(cli_migrate.migrate)
main.add_command(cli_new_plugin.new_plugin)
