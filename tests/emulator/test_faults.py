"""Precise faults: a faulting memory access leaves the CPU exactly as before the
instruction; REP string instructions keep the iterations already completed."""

from __future__ import annotations

import pytest
from emu_helpers import Machine, RecordingMemory
from pagetrack.emulator import GuestFault

DATA = 0x400000
STACK = 0x200000

WRITE_FAULTING = [
    "add qword ptr [rbx], rax",
    "lock add dword ptr [rbx + 8], 5",
    "inc byte ptr [rbx]",
    "neg word ptr [rbx]",
    "not qword ptr [rbx]",
    "shl dword ptr [rbx], cl",
    "rcl qword ptr [rbx], 1",
    "mov qword ptr [rbx], rax",
    "mov byte ptr [rbx], 7",
    "xchg qword ptr [rbx], rax",
    "lock xadd qword ptr [rbx], rcx",
    "lock cmpxchg qword ptr [rbx], rcx",
    "lock cmpxchg16b xmmword ptr [rbx]",
    "lock cmpxchg8b qword ptr [rbx]",
    "bts qword ptr [rbx], rcx",
    "btr dword ptr [rbx], 3",
    "sete byte ptr [rbx]",
    "pop qword ptr [rbx]",
    "movsq",
    "stosd",
    "rep stosb",
    "rep movsq",
]

STACK_FAULTING = [
    "push rax",
    "push qword ptr [rbx]",
    "push 5",
    "call 0x100100",
    "call rax",
    "pushfq",
]

READ_FAULTING = [
    "mov rax, qword ptr [rbx]",
    "add rax, qword ptr [rbx]",
    "cmovne eax, dword ptr [rbx]",
    "div qword ptr [rbx]",
    "imul rcx, qword ptr [rbx], 3",
    "bt qword ptr [rbx], rcx",
    "lodsq",
    "cmpsb",
    "repe scasd",
    "jmp qword ptr [rbx]",
    "ret",
    "pop rax",
    "leave",
    "popfq",
]


def _machine(src: str) -> Machine:
    mem = RecordingMemory()
    m = Machine(src, mem=mem)
    m.set(rax=0x1122334455667788, rbx=DATA + 0x10, rcx=3, rdx=0, rsi=DATA + 0x100,
          rdi=DATA + 0x200, rbp=STACK - 0x40)
    m.cpu.set_rflags(0x8D5 | 2)
    mem.write(DATA + 0x10, 8, 0x1122334455667788)  # make cmpxchg hit
    mem.write(STACK - 0x40, 8, 0x1234)
    return m


@pytest.mark.parametrize("src", WRITE_FAULTING)
def test_write_fault_leaves_state_unchanged(src: str) -> None:
    m = _machine(src)
    assert isinstance(m.mem, RecordingMemory)
    m.mem.no_write.add(DATA >> 12)
    before = m.cpu.copy()
    with pytest.raises(GuestFault) as info:
        m.step()
    assert info.value.vector == 14
    assert m.cpu == before


@pytest.mark.parametrize("src", STACK_FAULTING)
def test_stack_write_fault_leaves_state_unchanged(src: str) -> None:
    m = _machine(src)
    assert isinstance(m.mem, RecordingMemory)
    m.mem.no_write.add((STACK - 8) >> 12)
    before = m.cpu.copy()
    with pytest.raises(GuestFault):
        m.step()
    assert m.cpu == before


@pytest.mark.parametrize("src", READ_FAULTING)
def test_read_fault_leaves_state_unchanged(src: str) -> None:
    m = _machine(src)
    assert isinstance(m.mem, RecordingMemory)
    m.mem.no_read.update({DATA >> 12, (STACK - 0x40) >> 12, (STACK - 8) >> 12})
    m.set(rsp=STACK - 0x40)
    before = m.cpu.copy()
    with pytest.raises(GuestFault):
        m.step()
    assert m.cpu == before


def test_fault_on_second_page_of_split_write() -> None:
    """The memory layer may commit the first piece; the CPU state still does not move."""
    m = _machine("mov qword ptr [rbx], rax")
    assert isinstance(m.mem, RecordingMemory)
    m.set(rbx=DATA + 0xFFC)
    m.mem.no_write.add((DATA >> 12) + 1)
    before = m.cpu.copy()
    with pytest.raises(GuestFault) as info:
        m.step()
    assert info.value.address == DATA + 0x1000
    assert m.cpu == before


@pytest.mark.parametrize("df", [0, 1])
def test_rep_movs_fault_keeps_completed_iterations(df: int) -> None:
    """A fault in iteration k leaves RCX/RSI/RDI after k-1 iterations, RIP at the insn."""
    mem = RecordingMemory()
    m = Machine("rep movsq", mem=mem)
    step = -8 if df else 8
    src, dst = DATA + 0x800, DATA + 0x1FE0 if not df else DATA + 0x1018
    m.set(rcx=10, rsi=src, rdi=dst)
    m.cpu.df = df
    for i in range(10):
        mem.write(src + i * step, 8, 0x100 + i)
    mem.no_write.add((DATA >> 12) + (2 if not df else 0))  # 5th store crosses into it
    rip = m.cpu.rip
    with pytest.raises(GuestFault):
        m.step()
    done = 4
    assert m.cpu.rip == rip
    assert m.reg("rcx") == 10 - done
    assert m.reg("rsi") == src + done * step
    assert m.reg("rdi") == dst + done * step
    for i in range(done):
        assert mem.read(dst + i * step, 8) == 0x100 + i
    # the vCPU fixes the fault and re-executes: the copy completes
    mem.no_write.clear()
    assert m.step() is None
    assert m.reg("rcx") == 0
    assert m.cpu.rip == rip + len(m.code)
    for i in range(10):
        assert mem.read(dst + i * step, 8) == 0x100 + i


def test_repe_cmps_fault_keeps_flags_of_last_completed_iteration() -> None:
    mem = RecordingMemory()
    m = Machine("repe cmpsb", mem=mem)
    m.set(rcx=8, rsi=DATA + 0xFFE, rdi=DATA + 0x3000)
    mem.load(DATA + 0xFFE, b"ab")
    mem.load(DATA + 0x3000, b"ab")
    mem.no_read.add((DATA >> 12) + 1)
    with pytest.raises(GuestFault):
        m.step()
    assert m.reg("rcx") == 6
    assert m.cpu.get_rflags() & 0x40  # ZF from the last equal compare
    assert m.cpu.rip == m.base


def test_divide_error_is_precise() -> None:
    m = Machine("div rcx")
    m.set(rax=5, rdx=7, rcx=3)  # quotient does not fit
    before = m.cpu.copy()
    with pytest.raises(GuestFault) as info:
        m.step()
    assert info.value.vector == 0
    assert m.cpu == before


def test_run_counts_only_retired_instructions() -> None:
    mem = RecordingMemory()
    m = Machine("nop\nnop\nmov qword ptr [rbx], rax\nhlt", mem=mem).set(rbx=DATA)
    mem.no_write.add(DATA >> 12)
    with pytest.raises(GuestFault):
        m.run()
    assert m.cpu.icount == 2 and m.cpu.rip == m.base + 2
    mem.no_write.clear()
    assert m.run(1) is None and m.cpu.icount == 3
    assert m.run(0) is None and m.cpu.icount == 3
    assert m.run() is not None and m.cpu.icount == 4
