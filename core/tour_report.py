"""The tour's report: rich tables of what each tracker saw, per section and per round."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["render_tour"]

_COUNTERS = (
    ("instructions", "instructions"),
    ("stores", "trace stores"),
    ("faults", "faults"),
    ("fast_path_fixes", "fast-path fixes"),
    ("emulations", "emulations"),
    ("track_write_calls", "track_write"),
    ("zaps", "zaps"),
    ("tlb_flushes", "TLB flushes"),
)


def _ranges(gfns: list[int], limit: int = 3) -> str:
    """Sorted gfns as hex ranges: ``0x400-0x403, 0x410`` (at most ``limit`` ranges, then a count)."""
    if not gfns:
        return "-"
    runs: list[tuple[int, int]] = []
    for g in gfns:
        if runs and g == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], g)
        else:
            runs.append((g, g))
    shown = ", ".join(f"{a:#x}" if a == b else f"{a:#x}-{b:#x}" for a, b in runs[:limit])
    return shown + (", …" if len(runs) > limit else "")


def _mark(ok: bool) -> str:
    return "[green]ok[/]" if ok else "[red]FAILED[/]"


def _sections(result: dict[str, Any]) -> Table:
    sections = result["sections"]
    table = Table(title="Per section: KVM's counters")
    table.add_column("")
    for s in sections:
        table.add_column(f"{s['name']}\n({s['plugin']})", justify="right")
    for key, title in _COUNTERS:
        if any(key in s["counters"] for s in sections):
            table.add_row(title, *(f"{s['counters'][key]:,}" if key in s["counters"] else "-" for s in sections))
    table.add_row("result", *(_mark(s["ok"]) for s in sections))
    return table


def _notifications(result: dict[str, Any]) -> Table:
    sections = result["sections"]
    table = Table(title="track_write notifications per plugin (audit log)")
    table.add_column("plugin")
    for s in sections:
        table.add_column(s["name"], justify="right")
    table.add_column("total", justify="right")
    for plugin, total in result["tour"]["notifications"].items():
        per = [str(s["notifications"].get(plugin, 0)) for s in sections]
        table.add_row(plugin, *per, str(total))
    return table


def _rounds(result: dict[str, Any]) -> Table:
    table = Table(title=f"Dirty pages per round ({result.get('mode', 'bitmap')} dirty log, harvested each round)")
    table.add_column("round", justify="right", no_wrap=True, min_width=5)
    table.add_column("section", no_wrap=True, min_width=11)
    table.add_column("pages", justify="right", no_wrap=True, min_width=5)
    table.add_column("data gfns", no_wrap=True, overflow="ellipsis", max_width=22)
    table.add_column("low gfns", no_wrap=True, overflow="ellipsis", max_width=12)
    table.add_column("faults", justify="right", no_wrap=True, min_width=6)
    owner: dict[int, str] = {}
    for s in result["sections"]:
        for r in range(s["first_round"], s["first_round"] + s["rounds"]):
            owner[r] = s["name"]
    low = result["low_rounds"]
    stats = result["round_stats"]
    for i, gfns in enumerate(result["rounds"]):
        st = stats[i] if i < len(stats) else {}
        table.add_row(str(i), owner.get(i, "-"), str(len(gfns)), _ranges(gfns),
                      _ranges(low[i] if i < len(low) else [], 2), str(st.get("faults", "-")))
    return table


def _story(result: dict[str, Any], console: Console) -> None:
    by_name = {s["name"]: s for s in result["sections"]}
    pt = by_name.get("page tables")
    if pt:
        d = pt["detail"]
        console.print(f"page tables: the guest read back {', '.join(map(str, d['io']))} "
                      f"(expected {', '.join(map(str, d['expected_io']))}); the external tracker 'track' "
                      f"on gfns {_ranges(d['tracked_gfns'])} saw {d['tracked_writes']} writes")
    gpu = by_name.get("gpu")
    if gpu:
        d = gpu["detail"]
        console.print(f"gpu: {d['tracker']} handled {d['handled_writes']} trapped PPGTT writes, "
                      f"{d['shadow_updates']} shadow entries written, {d['submits']} submits, "
                      f"shadow invariant {d['invariant_checks_passed']}/{d['invariant_checks']} passed, "
                      f"driver transcript {'as expected' if d['transcript_ok'] else 'DIFFERENT'} "
                      f"({d['io_values']} values); {d['gvt_errors']} gvt_error events from the driver's "
                      "deliberately bad entries")
    dl = by_name.get("dirty log")
    if dl:
        d = dl["detail"]
        console.print(f"dirty log: {d['stores']:,} stores of a {d['workload']} trace (seed {d['seed']}) "
                      f"in {dl['rounds']} rounds of {d['round_seconds'] * 1000:g} ms guest time")


def render_tour(result: dict[str, Any], console: Console) -> None:
    """Print the tour's result (:func:`pagetrack.tour.run_tour`) as tables and a few lines."""
    tour = result["tour"]
    console.print(f"[bold]pagetrack tour[/] — one VM, {result['paging']} paging, every tracker: "
                  + ", ".join(f"{s['name']} ({s['plugin']})" for s in result["sections"]))
    console.print(_sections(result))
    console.print(_notifications(result))
    console.print(_rounds(result))
    _story(result, console)
    verdict = "[green]verified[/]" if tour["audit_ok"] else "[red]FAILED[/]"
    console.print(f"audit log: {result['audit_log']} ({tour['audit_events']:,} events, {verdict}; "
                  f"check it again with: pagetrack audit {result['audit_log']})")
    for problem in tour["audit_problems"]:
        console.print(f"  {problem}")
