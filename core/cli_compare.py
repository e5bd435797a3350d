"""``pagetrack compare``: the same program on the simulator and on real KVM."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import orjson
from rich.console import Console
from rich.table import Table

from .cli_common import EXIT_FINDING, fail, guarded
from .program import load_program, parse_defines

__all__ = ["compare"]


def _hexes(gfns: list[int]) -> str:
    return ", ".join(f"{g:#x}" for g in gfns) or "-"


@click.command(epilog="\b\nExample:\n  pagetrack compare prog.s --mode ring -D N=100")
@click.argument("program", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-D", "defines", multiple=True, metavar="NAME=VALUE", help="Override or add an .equ symbol.")
@click.option("--mode", type=click.Choice(["bitmap", "clear", "ring"]), default="bitmap", show_default=True)
@click.option("--initially-set", is_flag=True, help="With --mode clear: KVM_DIRTY_LOG_INITIALLY_SET.")
@click.option("--shadow/--tdp", default=True, help="Simulator paging (default: shadow, like this host's KVM).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@guarded
def compare(program: Path, defines: tuple[str, ...], mode: str, initially_set: bool, shadow: bool,
            as_json: bool) -> None:
    """Run PROGRAM on the simulator and on /dev/kvm; show per-round differences.

    Exit 0 when the data-slot rounds, the exit and the registers agree, 1 when
    they differ, 2 on bad input or without a usable /dev/kvm.
    """
    from .compare import compare_program
    from .kvm import KvmUnavailable

    if initially_set and mode != "clear":
        fail("--initially-set needs --mode clear")
    prog = load_program(program, parse_defines(list(defines)))
    try:
        result = compare_program(prog, mode=mode, initially_set=initially_set, tdp=not shadow)
    except KvmUnavailable as exc:
        fail(str(exc))
    if as_json:
        sys.stdout.buffer.write(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    else:
        console = Console()
        console.print(f"[bold]{program}[/]: mode {mode}{' + initially-set' if initially_set else ''}, "
                      f"simulator {result['paging']} paging, KVM {result['execution']}")
        console.print(f"rounds: simulator {result['rounds']['sim']}, KVM {result['rounds']['kvm']}; "
                      f"exit: simulator {result['exit']['sim']!r}, KVM {result['exit']['kvm']!r}")
        for title, key in (("data slot", "round_differences"), ("low slot (informational)", "low_round_differences")):
            rows = result[key]
            if not rows:
                console.print(f"{title}: no differences")
                continue
            table = Table(title=f"{title}: differences")
            for col in ("round", "only simulator", "only KVM"):
                table.add_column(col)
            for row in rows:
                table.add_row(str(row["round"]), _hexes(row["only_sim"]), _hexes(row["only_kvm"]))
            console.print(table)
        if result["register_differences"]:
            for name, pair in result["register_differences"].items():
                console.print(f"register {name}: simulator {pair['sim']:#x}, KVM {pair['kvm']:#x}")
        else:
            console.print("registers: identical")
        counters = Table(title="counters")
        counters.add_column("KVM stat")
        counters.add_column("simulator", justify="right")
        counters.add_column("KVM", justify="right")
        for row in result["counters"]:
            counters.add_row(row["name"], str(row["sim"]), str(row["kvm"]))
        console.print(counters)
        console.print("[green]same[/]" if result["same"] else "[red]different[/]")
    if not result["same"]:
        sys.exit(EXIT_FINDING)
