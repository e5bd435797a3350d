"""Instructions that exit to the vCPU: HLT, IN/OUT, MOV CRn, INVLPG; CPUID, #UD."""

from __future__ import annotations

import pytest
from emu_helpers import Machine, RecordingMemory
from pagetrack.emulator import HLT, GuestFault, Invlpg, MovToCr, PortIn, PortOut

BASE = 0x100000


def test_hlt_advances_rip() -> None:
    m = Machine("hlt")
    assert m.step() is HLT
    assert m.cpu.rip == BASE + 1


@pytest.mark.parametrize("src,port,size,value", [
    ("out 0x10, al", 0x10, 1, 0x88),
    ("out 0x11, eax", 0x11, 4, 0x55667788),
    ("out dx, ax", 0x3F8, 2, 0x7788),
])
def test_out(src: str, port: int, size: int, value: int) -> None:
    m = Machine(src).set(rax=0x1122334455667788, rdx=0xFFFF03F8)
    ex = m.step()
    assert ex == PortOut(port, size, value)
    assert m.cpu.rip == BASE + len(m.code)


@pytest.mark.parametrize("src,size,expect", [
    ("in al, 0x60", 1, 0x11223344556677AB),
    ("in ax, dx", 2, 0x112233445566ABCD),
    ("in eax, dx", 4, 0x89ABCDEF),
])
def test_in_and_complete(src: str, size: int, expect: int) -> None:
    m = Machine(src).set(rax=0x1122334455667788, rdx=0x60)
    ex = m.step()
    assert isinstance(ex, PortIn)
    assert (ex.port, ex.size, ex.dest_reg_index) == (0x60, size, 0)
    ex.complete(m.cpu, 0x89ABCDEF if size == 4 else 0xABCD if size == 2 else 0xAB)
    assert m.reg("rax") == expect


def test_mov_to_and_from_cr() -> None:
    m = Machine("mov cr3, rax\nmov rbx, cr3\nmov rcx, cr0\nmov cr4, rdx")
    m.set(rax=0x5000, rdx=0x6A0)
    assert m.step() == MovToCr(3, 0x5000)
    assert m.cpu.cr3 == 0x5000
    m.step()
    assert m.reg("rbx") == 0x5000
    m.step()
    assert m.reg("rcx") == m.cpu.cr0
    assert m.step() == MovToCr(4, 0x6A0)
    assert m.cpu.cr4 == 0x6A0


def test_invlpg_does_not_touch_memory() -> None:
    mem = RecordingMemory()
    m = Machine("invlpg byte ptr [rax + 0x10]", mem=mem).set(rax=0x7000)
    mem.log.clear()
    assert m.step() == Invlpg(0x7010)
    assert mem.data_ops() == []
    assert m.cpu.rip == BASE + len(m.code)


def test_cpuid() -> None:
    m = Machine("cpuid\ncpuid\ncpuid").set(rax=0, rcx=0xFFFFFFFF00000000)
    m.step()
    vendor = b"".join(m.reg(r).to_bytes(4, "little") for r in ("rbx", "rdx", "rcx"))
    assert vendor == b"GenuineIntel"
    assert m.reg("rax") == 1
    m.set(rax=1)
    m.step()
    eax = m.reg("rax")
    assert (eax >> 8) & 0xF == 6
    m.set(rax=0x80000000)
    m.step()
    assert [m.reg(r) for r in ("rax", "rbx", "rcx", "rdx")] == [0, 0, 0, 0]


@pytest.mark.parametrize("src", ["ud2", "lock add rax, rbx", "lock mov qword ptr [rax], rbx"])
def test_undefined_opcode(src: str) -> None:
    m = Machine(src)
    before = m.cpu.copy()
    with pytest.raises(GuestFault) as info:
        m.step()
    assert info.value.vector == 6
    assert m.cpu == before
