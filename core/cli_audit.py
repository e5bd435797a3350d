"""``pagetrack audit LOG``: verify an audit log (chain and invariants) and summarise it.

Exit 0 when the log is intact and every invariant holds, 1 (``EXIT_FINDING``)
when a problem was found, 2 when LOG is not an audit log at all.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import orjson
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .audit.verify import AuditReport, verify
from .cli_common import EXIT_FINDING, guarded

__all__ = ["audit"]


_EXAMPLE = """
\b
Examples:
  pagetrack run --audit-log tour.jsonl && pagetrack audit tour.jsonl
  pagetrack audit run.jsonl --json
"""


@click.command("audit", epilog=_EXAMPLE)
@click.argument("log", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
def _command(log: Path, as_json: bool) -> None:
    """Prove the audit log LOG complete and untampered and replay its invariants.

    Exit 0 when the hash chain is intact and every invariant holds, 1 when a
    problem was found, 2 when LOG is missing or not an audit log.
    """
    _audit(log, as_json)


audit: click.Command = _command


@guarded
def _audit(log: Path, as_json: bool) -> None:
    report = verify(log)
    if as_json:
        click.echo(orjson.dumps(report.to_dict(), option=orjson.OPT_SORT_KEYS).decode())
    else:
        _print(report)
    if not report.ok:
        sys.exit(EXIT_FINDING)


def _print(report: AuditReport) -> None:
    console = Console(highlight=False)
    events = Table(title=Text(f"audit log of {report.vm}: events"))
    events.add_column("event")
    events.add_column("count", justify="right")
    for name, n in report.counts_by_event.items():
        events.add_row(Text(name), str(n))
    console.print(events)
    if report.counts_by_plugin:
        plugins = Table(title="track_write calls per plugin")
        plugins.add_column("plugin")
        plugins.add_column("ok", justify="right")
        plugins.add_column("error", justify="right")
        for name, outcomes in report.counts_by_plugin.items():
            plugins.add_row(Text(name), str(outcomes.get("ok", 0)), str(outcomes.get("error", 0)))
        console.print(plugins)
    if report.ok:
        click.echo(f"audit OK: {report.events} events, chain intact")
        return
    total = len(report.problems) + report.problems_dropped
    click.echo(f"audit FAILED: {total} problem(s) in {report.events} events")
    for problem in report.problems:
        click.echo(f"  {problem}")
    if report.problems_dropped:
        click.echo(f"  ... and {report.problems_dropped} more")
