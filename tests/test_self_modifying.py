"""Decoded instructions are cached per RIP; writing a code page drops them."""

from __future__ import annotations

import pytest
from pagetrack.program import CODE_BASE, assemble
from pagetrack.runner import run_program

# `patch` overwrites the imm32 of the `mov eax, 1` at `target` with 2, then runs
# it again: a stale decode cache would still send 1.
SMC = """
    mov rcx, 2
loop:
target:
    mov eax, 1
    out LOG_PORT, eax
    mov rdi, target
    mov dword ptr [rdi + 1], 2
    dec rcx
    jnz loop
    hlt
"""


@pytest.mark.parametrize("tdp", [True, False])
@pytest.mark.parametrize("tracked", [False, True])
def test_writing_code_invalidates_decoded_instructions(tdp: bool, tracked: bool) -> None:
    prog = assemble(SMC, "smc")
    code_gfn = CODE_BASE >> 12
    r = run_program(prog, tdp=tdp, track=[(code_gfn, code_gfn)] if tracked else [])
    assert r["exit"] == "hlt"
    assert r["io"] == [1, 2]
    if tracked:
        # Both stores to the tracked code page were emulated and notified.
        assert r["counters"]["tracked_writes"] == 2
