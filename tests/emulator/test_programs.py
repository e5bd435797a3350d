"""Whole programs on FlatMemory, checked against Python models."""

from __future__ import annotations

import pytest
from emu_helpers import Machine
from pagetrack.emulator import Hlt, PortOut

DATA = 0x400000
M64 = (1 << 64) - 1

LCG = """
    mov r12, 12345
    mov r13, 6364136223846793005
    mov r14, 1442695040888963407
    mov rbx, 0x400000
    mov r15, 3
next_round:
    mov rcx, 40
next_store:
    imul r12, r13
    add r12, r14
    mov rax, r12
    shr rax, 33
    and rax, 63
    shl rax, 12
    mov rdx, r12
    shr rdx, 16
    and rdx, 0xff8
    add rax, rdx
    mov qword ptr [rbx + rax], r12
    dec rcx
    jnz next_store
    out 0x10, al
    dec r15
    jnz next_round
    mov rax, r12
    out 0x11, eax
    hlt
"""


def _run_to_hlt(m: Machine) -> list[PortOut]:
    outs: list[PortOut] = []
    while True:
        ex = m.run(1_000_000)
        if isinstance(ex, PortOut):
            outs.append(ex)
            continue
        assert isinstance(ex, Hlt), ex
        return outs


def test_lcg_store_loop_matches_python_model() -> None:
    m = Machine(LCG)
    outs = _run_to_hlt(m)
    x = 12345
    expected: dict[int, int] = {}
    for _ in range(3 * 40):
        x = (x * 6364136223846793005 + 1442695040888963407) & M64
        expected[DATA + ((x >> 33) & 63) * 4096 + ((x >> 16) & 0xFF8)] = x
    for addr, value in expected.items():
        assert m.mem.read(addr, 8) == value
    assert [o.port for o in outs] == [0x10, 0x10, 0x10, 0x11]
    assert outs[-1] == PortOut(0x11, 4, x & 0xFFFFFFFF)
    assert m.cpu.icount == 5 + 3 * (1 + 40 * 13 + 3) + 3


FIB = """
    mov rdi, 15
    call fib
    hlt
fib:                      # rax = fib(rdi), recursive
    cmp rdi, 2
    jb small
    push rbx
    push rdi
    dec rdi
    call fib
    mov rbx, rax
    pop rdi
    push rdi
    sub rdi, 2
    call fib
    add rax, rbx
    pop rdi
    pop rbx
    ret
small:
    mov rax, rdi
    ret
"""


def test_recursive_calls() -> None:
    m = Machine(FIB)
    sp = m.reg("rsp")
    _run_to_hlt(m)
    assert m.reg("rax") == 610
    assert m.reg("rsp") == sp


STRINGS = """
    mov rdi, 0x400000          # memset(0x400000, 'a', 3000)
    mov rcx, 3000
    mov al, 0x61
    rep stosb
    mov byte ptr [rdi], 0
    mov rsi, 0x400000          # memcpy(0x410000, 0x400000, 3001) backwards, DF=1
    add rsi, 3000
    mov rdi, 0x410000
    add rdi, 3000
    mov rcx, 3001
    std
    rep movsb
    cld
    mov rdi, 0x410000          # strlen via repne scasb
    xor eax, eax
    mov rcx, -1
    repne scasb
    not rcx
    dec rcx
    mov r8, rcx
    mov rsi, 0x400000          # memcmp via repe cmpsq
    mov rdi, 0x410000
    mov rcx, 375
    repe cmpsq
    sete r9b
    hlt
"""


@pytest.mark.parametrize("emulating", [False, True])
def test_string_routines(emulating: bool) -> None:
    """Under KVM's emulator the REP instructions re-enter every 1024 iterations; the
    run loop simply executes the same RIP again and the result is the same."""
    m = Machine(STRINGS)
    m.mem.emulating = emulating
    _run_to_hlt(m)
    assert m.mem.read_bytes(0x410000, 3001) == b"a" * 3000 + b"\0"
    assert m.reg("r8") == 3000
    assert m.reg("r9") & 0xFF == 1
