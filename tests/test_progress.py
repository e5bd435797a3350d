"""The progress display: the runner's slices, and a status line only on a terminal and after a delay."""

from __future__ import annotations

import io

from pagetrack.program import assemble
from pagetrack.progress import RunProgress
from pagetrack.runner import SLICE_INSTRUCTIONS, run_program
from rich.console import Console

LOOP = """
    mov ecx, 1200000
again:
    dec ecx
    jnz again
    out ROUND_PORT, al
    hlt
"""


def test_the_runner_reports_between_slices_and_at_round_ends() -> None:
    seen: list[tuple[int, int]] = []
    result = run_program(assemble(LOOP), progress=lambda n, r: seen.append((n, r)))
    assert result["exit"] == "hlt"
    executed = result["counters"]["instructions"]
    assert executed > 2 * SLICE_INSTRUCTIONS
    slices = [n for n, r in seen if r == 0]
    assert slices[:2] == [SLICE_INSTRUCTIONS, 2 * SLICE_INSTRUCTIONS]
    assert seen[-1] == (executed, 2)  # the ROUND_PORT round and the last one
    assert [r for _, r in seen] == sorted(r for _, r in seen)


def test_slices_do_not_change_the_result() -> None:
    program = assemble(LOOP)
    plain = run_program(program)
    sliced = run_program(program, progress=lambda n, r: None)
    assert plain["rounds"] == sliced["rounds"] and plain["regs"] == sliced["regs"]
    assert plain["counters"]["instructions"] == sliced["counters"]["instructions"]


def test_the_instruction_limit_still_holds_with_slices() -> None:
    result = run_program(assemble(LOOP), max_instructions=1_500_000, progress=lambda n, r: None)
    assert result["exit"].startswith("instruction limit of 1500000")
    assert result["counters"]["instructions"] == 1_500_000


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=terminal, width=80), out


def test_status_shows_on_a_terminal_once_the_delay_passed() -> None:
    console, out = _console(True)
    with RunProgress("run", console=console, delay=0.0) as progress:
        progress(1_000_000, 1)
        assert progress.shown
    assert not progress.shown  # transient: gone when the run ends
    assert "1,000,000 instructions" in out.getvalue()


def test_no_status_before_the_delay_or_off_a_terminal_or_when_disabled() -> None:
    for terminal, enabled, delay in ((True, True, 60.0), (False, True, 0.0), (True, False, 0.0)):
        console, out = _console(terminal)
        with RunProgress("run", console=console, delay=delay, enabled=enabled) as progress:
            progress.status("busy")
            assert not progress.shown
        assert out.getvalue() == ""
