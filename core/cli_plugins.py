"""``pagetrack plugins``: every entry point of group ``pagetrack``, loaded or not.

Each entry point is loaded and registered on a throw-away
:class:`~pagetrack.plugin_host.PluginHost` (no VM is created), so the listing
shows what a VM would get: name, distribution and version, module, hooks
implemented, and status (``loaded`` or ``failed`` with the one-line error).
Broken plugins are listed, not fatal: the exit status is 0.
"""

from __future__ import annotations

from typing import Any

import click
import orjson

from .plugin_host import PluginHost
from .plugin_info import ENTRY_POINT_GROUP, PluginInfo

__all__ = ["plugin_records", "plugins"]


def plugin_records(group: str = ENTRY_POINT_GROUP) -> list[dict[str, Any]]:
    """One JSON-ready record per entry point of ``group``, by name."""
    infos = PluginHost().load_entry_points(group=group)
    return [_record(info) for info in sorted(infos, key=lambda i: i.name)]


def _record(info: PluginInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "dist": info.dist,
        "version": info.version,
        "module": info.module,
        "hooks": list(info.hooks),
        "external": info.external,
        "status": info.status,
        "error": info.error,
    }


_EXAMPLE = """
\b
Examples:
  pagetrack plugins
  pagetrack plugins --json | jq '.[] | select(.status == "failed")'
"""


@click.command("plugins", epilog=_EXAMPLE)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array instead of a table.")
def plugins(as_json: bool) -> None:
    """List installed plugins (entry points of group 'pagetrack') and whether they load.

    A plugin that fails to load is listed with its error; the exit status is
    still 0.
    """
    from .cli import guarded  # late: cli imports this module while it is being set up

    guarded(_show)(as_json)


def _show(as_json: bool) -> None:
    records = plugin_records()
    if as_json:
        click.echo(orjson.dumps(records, option=orjson.OPT_INDENT_2).decode())
        return
    _print_table(records)


def _print_table(records: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="pagetrack plugins (entry-point group 'pagetrack')")
    for column in ("plugin", "distribution", "module", "hooks", "status"):
        table.add_column(column, overflow="fold")
    for r in records:
        dist = f"{r['dist']} {r['version']}" if r["dist"] else "-"
        if r["status"] == "failed":
            status = f"[red]failed[/red]: {r['error']}"
        elif r["status"] == "loaded":
            status = "[green]loaded[/green]"
        else:
            status = r["status"]
        name = r["name"] + (" (tracker)" if r["external"] else "")
        table.add_row(name, dist, r["module"] or "-", ", ".join(r["hooks"]) or "-", status)
    console = Console()
    console.print(table)
    failed = sum(r["status"] == "failed" for r in records)
    console.print(f"{len(records)} plugin(s), {len(records) - failed} loaded, {failed} failed")
