"""``pagetrack migrate``: a QEMU-style pre-copy migration of a simulated guest.

Bandwidths (``--bandwidth RATE``) are bytes per second: a plain number, or a
number with a unit — ``K``/``M``/``G``/``T`` alone or with ``iB`` are powers of
1024 (QEMU's size suffixes: ``1G`` = 1 GiB/s), with ``B`` powers of 1000
(``125MB/s`` = 125 000 000 B/s), with ``bit`` or ``b`` bits per second in powers
of 1000 (``10Gbit/s`` = 1.25 GB/s); ``/s`` or ``ps`` may follow.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import orjson
from rich import box
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from .cli_common import fail, guarded
from .errors import InputError

if TYPE_CHECKING:
    from pagetrack.plugins.dirty_log.migration import MigrationReport, RoundRow

__all__ = ["migrate", "parse_rate"]

DEFAULT_MEM_MIB = 128
_RATE = re.compile(r"(?P<num>\d+(?:\.\d*)?|\.\d+)\s*(?P<prefix>[kKmMgGtT]?)(?P<unit>iB|B|bits?|b)?(?:/s|ps)?")
_POWER = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}

_EXAMPLE = """
\b
Examples:
  pagetrack migrate                                   # 128 MiB guest, hot-set workload
  pagetrack migrate --workload fixed-rate --rate 40000 --auto-converge
  pagetrack migrate --workload uniform --bandwidth 1G --json
  pagetrack migrate prog.s --bandwidth 100MB/s --plot rounds.png
"""


def parse_rate(text: str) -> float:
    """Bytes per second from ``1G``, ``100M``, ``125MB/s``, ``10Gbit/s`` ... (see the module docstring)."""
    m = _RATE.fullmatch(text.strip())
    if m is None:
        raise InputError(f"--bandwidth {text!r}: expected a rate like 1G, 100M, 125MB/s or 10Gbit/s")
    num = float(m["num"])
    power = _POWER[m["prefix"].lower()]
    unit = m["unit"] or ""
    if unit == "iB" and not power:
        raise InputError(f"--bandwidth {text!r}: iB needs a prefix (KiB, MiB, GiB, TiB)")
    if unit == "B":
        value = num * 1000**power
    elif unit.startswith("b"):
        value = num * 1000**power / 8
    else:
        value = num * 1024**power
    if value <= 0:
        raise InputError(f"--bandwidth {text!r}: must be more than 0 bytes/s")
    return value


class _OneLineCommand(click.Command):
    """Usage errors as one line and exit 2, like every other bad input."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            fail(f"migrate: {exc.format_message()}")


def _mib(nbytes: float) -> str:
    return f"{nbytes / (1 << 20):,.1f}"


def _render(report: MigrationReport, console: Console) -> None:
    console.print(f"[bold]pre-copy migration[/] of {report.memory_pages:,} pages — {report.workload}, "
                  f"{report.mode} dirty log, {_mib(report.bandwidth)} MiB/s, "
                  f"downtime limit {report.downtime_limit * 1000:g} ms"
                  + (", auto-converge" if report.auto_converge else ""))
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for name in ("round", "phase", "pages sent", "MiB", "seconds", "throttle", "stores", "dirty pages"):
        table.add_column(name, justify="left" if name == "phase" else "right")
    for r in report.rounds:
        table.add_row(str(r.round), r.phase, f"{r.pages_sent:,}", _mib(r.bytes), f"{r.seconds:.3f}",
                      f"{r.throttle}%", f"{r.stores:,}", f"{r.dirty_pages:,}")
    console.print(table)
    if report.converged:
        n = len(report.rounds) - 1
        console.print(f"[green]converged[/] after {n} round{'s' if n > 1 else ''}: {report.total_pages_sent:,} pages "
                      f"({_mib(report.total_bytes)} MiB) in {report.total_seconds:.3f} s, "
                      f"downtime {report.expected_downtime * 1000:.0f} ms")
    else:
        console.print(f"[red]did not converge[/]: {report.reason}; {report.total_pages_sent:,} pages sent in "
                      f"{report.total_seconds:.3f} s, expected downtime {report.expected_downtime * 1000:.0f} ms")


def _plot(report: MigrationReport, path: Path) -> None:
    """Dirty pages and pages sent per round (bars), throttle (step line), as a PNG."""
    from matplotlib.figure import Figure

    rounds = [r.round for r in report.rounds]
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    width = 0.4
    ax.bar([x - width / 2 for x in rounds], [r.pages_sent for r in report.rounds], width, label="pages sent")
    ax.bar([x + width / 2 for x in rounds], [r.dirty_pages for r in report.rounds], width, label="dirty pages")
    ax.set_xlabel("round")
    ax.set_ylabel("pages")
    ax.set_title(f"pre-copy: {report.workload}, {_mib(report.bandwidth)} MiB/s, "
                 f"{'converged' if report.converged else 'not converged'}")
    ax2 = ax.twinx()
    ax2.step(rounds, [r.throttle for r in report.rounds], where="mid", color="black", label="throttle %")
    ax2.set_ylabel("throttle %")
    ax2.set_ylim(0, 100)
    handles, labels = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(handles + h2, labels + l2, loc="upper right")
    fig.savefig(path, format="png")


@click.command(cls=_OneLineCommand, epilog=_EXAMPLE)
@click.argument("program", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--workload", metavar="NAME",
              help="Trace workload: sequential, uniform, hotset, zipf, fixed-rate (default: hotset).")
@click.option("--rate", type=float, help="Stores per second of guest time (fixed-rate: distinct pages per second).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the trace workload.")
@click.option("--ips", type=float, help="PROGRAM speed, instructions per guest second "
                                        "(default: one program round per migration round).")
@click.option("--mode", default="bitmap", show_default=True, help="Dirty-log mode of the logger.")
@click.option("--bandwidth", default="128MiB", show_default=True, metavar="RATE",
              help="Migration bandwidth in bytes/s: 1G, 100M, 125MB/s, 10Gbit/s.")
@click.option("--mem-mib", type=click.IntRange(1), default=DEFAULT_MEM_MIB, show_default=True,
              help="Guest data memory in MiB.")
@click.option("--downtime-ms", type=click.FloatRange(0, min_open=True), default=300, show_default=True,
              help="Downtime limit in ms.")
@click.option("--auto-converge/--no-auto-converge", default=False, show_default=True,
              help="Throttle the guest when it dirties memory too fast (QEMU's auto-converge).")
@click.option("--max-rounds", type=click.IntRange(1), default=30, show_default=True)
@click.option("--shadow/--tdp", default=False, help="Shadow paging instead of TDP (default: TDP).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.png",
              help="Write a PNG of dirty pages and pages sent per round (needs pagetrack[plot]).")
@guarded
def migrate(program: Path | None, workload: str | None, rate: float | None, seed: int, ips: float | None,
            mode: str, bandwidth: str, mem_mib: int, downtime_ms: float, auto_converge: bool, max_rounds: int,
            shadow: bool, as_json: bool, plot: Path | None) -> None:
    """Migrate a guest running PROGRAM or a trace workload, as QEMU's pre-copy does.

    Round 0 sends every page; each later round sends the pages the dirty log
    reported since the last sync, while the guest keeps running; when what
    is left fits in the downtime limit, the guest stops and the rest is sent.
    """
    from pagetrack.plugins.dirty_log.migration import MigrationConfig, migrate_guest
    from pagetrack.plugins.dirty_log.workloads import ProgramWorkload, make_workload

    from .program import load_program

    rate_bps = parse_rate(bandwidth)
    if plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            fail("--plot needs matplotlib: pip install 'pagetrack[plot]'")
    if program is not None and workload is not None:
        raise InputError("give a PROGRAM or --workload, not both")
    wl: Any
    if program is not None:
        if rate is not None:
            raise InputError("--rate applies to --workload; a PROGRAM takes --ips")
        if ips is not None and ips <= 0:
            raise InputError("--ips must be more than 0")
        wl = ProgramWorkload(load_program(program, None, mem_mib << 20), ips=ips)
    else:
        if ips is not None:
            raise InputError("--ips applies to a PROGRAM")
        wl = make_workload(workload or "hotset", rate, seed)
    config = MigrationConfig(bandwidth=rate_bps, downtime_limit=downtime_ms / 1000,
                             auto_converge=auto_converge, max_rounds=max_rounds)
    err = Console(stderr=True)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err,
                  transient=True, disable=as_json or not err.is_terminal) as progress:
        task = progress.add_task(f"migrating {wl.name}: round 0 (every page)")

        def on_round(row: RoundRow) -> None:
            progress.update(task, description=f"migrating {wl.name}: round {row.round + 1}, "
                                              f"{_mib(row.pending_bytes)} MiB pending, throttle {row.throttle}%")

        report = migrate_guest(wl, mem_mib << 20, mode=mode, tdp=not shadow, config=config, on_round=on_round)
    if as_json:
        sys.stdout.buffer.write(orjson.dumps(report.to_dict()) + b"\n")
    else:
        _render(report, Console())
    if plot is not None:
        _plot(report, plot)
    if isinstance(wl, ProgramWorkload) and wl.exit not in (None, "hlt"):
        raise InputError(f"guest stopped: {wl.exit}")
