"""``pagetrack run``: run a guest program (or the built-in tour) on the simulator."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
import orjson
from rich.console import Console
from rich.table import Table

from .cli_common import fail, guarded
from .errors import InputError
from .program import DEFAULT_DATA_SIZE, MAX_DATA_SIZE, load_program, parse_defines

__all__ = ["run"]

_EXAMPLE = """
\b
Examples:
  pagetrack run                                  # the built-in tour
  pagetrack run prog.s -D N=128 --shadow --json
  pagetrack run prog.s --track 0x400-0x40f --audit-log run.jsonl
  pagetrack run prog.s --dirty-log ring --json   # KVM's dirty ring instead of the bitmap
"""

#: ``--dirty-log`` choices: the dirty logger's modes (``pagetrack.plugins.dirty_log.MODES``).
DIRTY_LOG_MODES = ("bitmap", "clear", "clear-initially-set", "ring", "pml", "track")


def _gfns(gfns: list[int]) -> str:
    if not gfns:
        return "-"
    shown = ", ".join(f"{g:#x}" for g in gfns[:12])
    return shown + (f" … (+{len(gfns) - 12})" if len(gfns) > 12 else "")


def render(result: dict[str, Any], console: Console, title: str) -> None:
    """Print a run result as rich tables."""
    console.print(f"[bold]{title}[/] — {result['paging']} paging, exit: {result['exit']}")
    rounds = Table(title=f"Dirty pages per round (dirty log, {result.get('mode', 'bitmap')} mode)")
    rounds.add_column("round", justify="right")
    rounds.add_column("data pages", justify="right")
    rounds.add_column("data gfns")
    rounds.add_column("low gfns")
    low = result["low_rounds"]
    for i, gfns in enumerate(result["rounds"]):
        rounds.add_row(str(i), str(len(gfns)), _gfns(gfns), _gfns(low[i] if i < len(low) else []))
    console.print(rounds)
    counters = Table(title="Counters")
    counters.add_column("counter")
    counters.add_column("value", justify="right")
    for key, value in result["counters"].items():
        if not key.startswith("kvm."):
            counters.add_row(key, str(value))
    console.print(counters)
    if result["io"]:
        console.print("io: " + ", ".join(f"{v:#x}" for v in result["io"]))
    tour = result.get("tour")
    if tour:
        plugins = Table(title="track_write notifications per plugin (from the audit log)")
        plugins.add_column("plugin")
        plugins.add_column("calls", justify="right")
        for name, outcomes in tour["plugins"].items():
            plugins.add_row(name, str(sum(outcomes.values()) if isinstance(outcomes, dict) else outcomes))
        console.print(plugins)
        verdict = "[green]verified[/]" if tour["audit_ok"] else "[red]FAILED[/]"
        console.print(f"audit log: {result['audit_log']} ({tour['audit_events']} events, {verdict})")
    elif result.get("audit_log"):
        console.print(f"audit log: {result['audit_log']}")


@click.command(epilog=_EXAMPLE)
@click.argument("program", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("-D", "defines", multiple=True, metavar="NAME=VALUE", help="Override or add an .equ symbol.")
@click.option("--mem-mib", type=click.IntRange(1, MAX_DATA_SIZE >> 20), default=DEFAULT_DATA_SIZE >> 20,
              show_default=True,
              help="Size of the data slot in MiB.")
@click.option("--shadow/--tdp", default=False, help="Shadow paging instead of TDP (default: TDP).")
@click.option("--track", "tracks", multiple=True, metavar="GFN[-GFN]",
              help="Write-track an inclusive gfn range as an external tracker would.")
@click.option("--dirty-log", "dirty_log", type=click.Choice(DIRTY_LOG_MODES), default="bitmap", show_default=True,
              help="KVM dirty-logging mode: GET_DIRTY_LOG, manual CLEAR (optionally INITIALLY_SET), "
                   "dirty ring, Intel PML, or a write tracker instead.")
@click.option("--backend", type=click.Choice(["sim", "kvm"]), default="sim", show_default=True,
              help="The simulator, or the host's real /dev/kvm (modes bitmap, clear, clear-initially-set, ring).")
@click.option("--audit-log", type=click.Path(dir_okay=False, path_type=Path), help="Write the audit log here.")
@click.option("--audit-level", type=click.Choice(["debug", "info"]), default="info", show_default=True)
@click.option("--max-instructions", type=click.IntRange(1), default=200_000_000, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@guarded
def run(program: Path | None, defines: tuple[str, ...], mem_mib: int, shadow: bool, tracks: tuple[str, ...],
        dirty_log: str, backend: str, audit_log: Path | None, audit_level: str, max_instructions: int,
        as_json: bool) -> None:
    """Run PROGRAM (x86-64 assembly .s, or raw machine code) on the simulated VM.

    Without PROGRAM, runs the built-in tour. The JSON output has rounds,
    low_rounds, exit, io, regs, counters and round_stats (per-round costs of
    the --dirty-log mode).
    """
    from .runner import parse_gfn_range, run_program

    if program is None:
        if defines or tracks or dirty_log != "bitmap" or backend != "sim":
            fail("-D, --track, --dirty-log and --backend apply to a PROGRAM; the tour takes none")
        from .tour import run_tour

        result = run_tour(audit_log)
        title = "pagetrack tour"
    elif backend == "kvm":
        result = _run_on_kvm(program, defines, mem_mib, tracks, dirty_log, audit_log)
        title = f"{program} on /dev/kvm ({result['execution']})"
    else:
        ranges = [parse_gfn_range(t) for t in tracks]
        prog = load_program(program, parse_defines(list(defines)), mem_mib << 20)
        result = run_program(prog, tdp=not shadow, track=ranges, audit=audit_log, audit_level=audit_level,
                             max_instructions=max_instructions, options={"dirty_log": {"mode": dirty_log}})
        title = str(program)
    if as_json:
        sys.stdout.buffer.write(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    else:
        render(result, Console(), title)
    if result["exit"] != "hlt":
        raise InputError(f"guest stopped: {result['exit']}")


def _run_on_kvm(program: Path, defines: tuple[str, ...], mem_mib: int, tracks: tuple[str, ...],
                dirty_log: str, audit_log: Path | None) -> dict[str, Any]:
    """``--backend kvm``: the same program and JSON contract on the host's real KVM."""
    from .kvm import KvmUnavailable, run_on_kvm

    if tracks or audit_log is not None:
        fail("--track and --audit-log need the simulator (--backend sim)")
    if dirty_log not in ("bitmap", "clear", "clear-initially-set", "ring"):
        fail(f"--dirty-log {dirty_log} is simulator-only; real KVM here runs bitmap, clear, "
             "clear-initially-set or ring")
    prog = load_program(program, parse_defines(list(defines)), mem_mib << 20)
    mode, initially_set = ("clear", True) if dirty_log == "clear-initially-set" else (dirty_log, False)
    try:
        result = run_on_kvm(prog, mode=mode, initially_set=initially_set)
    except KvmUnavailable as exc:
        fail(str(exc))
    stats = result.get("stats", {})
    result.setdefault("paging", "kvm")
    result["counters"] = {
        "faults": stats.get("pf_taken"),
        "fixed": stats.get("pf_fixed"),
        "emulations": stats.get("insn_emulation"),
        "vm_exits": stats.get("exits"),
        **{f"kvm.{k}": v for k, v in stats.items()},
    }
    return result
