"""``pagetrack run``: a guest program, a scenario file, or the built-in tour, on the simulator."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import orjson
from click.core import ParameterSource
from rich.console import Console
from rich.table import Table

from .cli_common import EXIT_FINDING, fail, guarded
from .errors import InputError
from .program import DEFAULT_DATA_SIZE, MAX_DATA_SIZE, load_program, parse_defines
from .progress import RunProgress

__all__ = ["run"]

_EXAMPLE = """
\b
Examples:
  pagetrack run                                  # the built-in tour
  pagetrack run examples/scenarios/shadow-pt-edits.toml
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
    """Print a run result (a program's or a scenario's) as rich tables."""
    console.print(f"[bold]{title}[/] — {result['paging']} paging, exit: {result['exit']}")
    scenario = result.get("scenario")
    if scenario:
        console.print(f"workload: {scenario['workload']}; {scenario['vcpus']} vCPU(s), "
                      f"{scenario['memory_mib']} MiB of data")
        for note in scenario["notes"]:
            console.print(f"note: {note}")
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
    if result.get("audit_log"):
        console.print(f"audit log: {result['audit_log']} (verify it with: pagetrack audit {result['audit_log']})")


def _given(ctx: click.Context) -> list[str]:
    """The options given on the command line (or in the environment), as the user spells them."""
    out = []
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or param.name is None:
            continue
        if ctx.get_parameter_source(param.name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
            out.append("/".join([*param.opts, *param.secondary_opts]))
    return out


def _emit(result: dict[str, Any], as_json: bool, draw: Callable[[Console], None]) -> None:
    if as_json:
        sys.stdout.buffer.write(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    else:
        draw(Console())


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
@click.option("--audit-log", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the audit log here (a scenario's output.audit_log is overridden).")
@click.option("--audit-level", type=click.Choice(["debug", "info"]), default="info", show_default=True)
@click.option("--max-instructions", type=click.IntRange(1), default=200_000_000, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (and no progress display).")
@click.pass_context
@guarded
def run(ctx: click.Context, program: Path | None, defines: tuple[str, ...], mem_mib: int, shadow: bool,
        tracks: tuple[str, ...], dirty_log: str, backend: str, audit_log: Path | None, audit_level: str,
        max_instructions: int, as_json: bool) -> None:
    """Run PROGRAM (x86-64 assembly .s, or raw machine code) or a SCENARIO.toml on the simulated VM.

    Without PROGRAM, runs the built-in tour: one VM, every tracker, a
    verified audit log.  A file ending in .toml is a scenario (docs/cli.md);
    it sets everything but --json and --audit-log.  The JSON output has
    rounds, low_rounds, exit, io, regs, counters and round_stats (per-round
    costs of the --dirty-log mode).  A progress line shows on a terminal when
    a run takes more than a second.
    """
    given = [g for g in _given(ctx) if g not in ("--json", "--audit-log")]
    if program is None:
        if given:
            fail(f"{', '.join(given)}: the options apply to a PROGRAM or a scenario; the tour takes none "
                 "(only --json and --audit-log)")
        _tour(audit_log, as_json)
        return
    if program.suffix == ".toml":
        if given:
            fail(f"{', '.join(given)}: set in the scenario file {program}, not on the command line "
                 "(only --json and --audit-log apply)")
        _scenario(program, audit_log, as_json)
        return
    if backend == "kvm":
        result = _run_on_kvm(program, defines, mem_mib, tracks, dirty_log, audit_log)
        title = f"{program} on /dev/kvm ({result['execution']})"
    else:
        from .runner import parse_gfn_range, run_program

        ranges = [parse_gfn_range(t) for t in tracks]
        prog = load_program(program, parse_defines(list(defines)), mem_mib << 20)
        with RunProgress(str(program), enabled=not as_json) as progress:
            result = run_program(prog, tdp=not shadow, track=ranges, audit=audit_log, audit_level=audit_level,
                                 max_instructions=max_instructions, options={"dirty_log": {"mode": dirty_log}},
                                 progress=progress if progress.enabled else None)
        title = str(program)
    _emit(result, as_json, lambda console: render(result, console, title))
    if result["exit"] != "hlt":
        raise InputError(f"guest stopped: {result['exit']}")


def _tour(audit_log: Path | None, as_json: bool) -> None:
    """The built-in tour; exit 1 if one of its checks or the audit log failed."""
    from .tour import run_tour
    from .tour_report import render_tour

    with RunProgress("pagetrack tour", enabled=not as_json) as progress:
        result = run_tour(audit_log, status=progress.status)
    _emit(result, as_json, lambda console: render_tour(result, console))
    if not result["tour"]["ok"]:
        failed = [s["name"] for s in result["sections"] if not s["ok"]]
        if not result["tour"]["audit_ok"]:
            failed.append("the audit log")
        fail(f"tour: {', '.join(failed)} failed", EXIT_FINDING)


def _scenario(path: Path, audit_log: Path | None, as_json: bool) -> None:
    """``pagetrack run SCENARIO.toml``: validate, run, report; write output.json if asked."""
    from .scenario import load_scenario
    from .scenario_run import TRACE_EXIT, run_scenario

    scenario = load_scenario(path)
    with RunProgress(scenario.name, enabled=not as_json) as progress:
        result = run_scenario(scenario, audit_log=str(audit_log) if audit_log else None,
                              progress=progress if progress.enabled else None, status=progress.status)
    if scenario.output.json is not None:
        scenario.output.json.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    _emit(result, as_json, lambda console: render(result, console, f"{scenario.name} ({path})"))
    if result["exit"] not in ("hlt", TRACE_EXIT):
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
