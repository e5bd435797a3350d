"""CpuState (RFLAGS, names, dump), lazy-flag bookkeeping, FlatMemory, PortIn.complete."""

from __future__ import annotations

from emu_helpers import Machine
from hypothesis import given, settings
from hypothesis import strategies as st
from pagetrack.emulator import REG_NAMES, CpuState, FlatMemory, Memory, PortIn
from pagetrack.emulator.flags import K_INC

M64 = (1 << 64) - 1


@settings(max_examples=200, deadline=None, database=None)
@given(st.integers(0, 0xFFFFFFFF))
def test_rflags_roundtrip(value: int) -> None:
    cpu = CpuState()
    cpu.set_rflags(value)
    got = cpu.get_rflags()
    assert got == (value | 2) & ~0x8028  # bit 1 reads 1; bits 3, 5, 15 read 0
    assert cpu.df == (1 if value & 0x400 else 0)


def test_defaults_and_names() -> None:
    cpu = CpuState(0x1000)
    assert cpu.get_rflags() == 0x202
    assert cpu.rip == 0x1000
    cpu.set_reg_by_name("R11", -1)
    assert cpu.reg_by_name("r11") == M64
    cpu.set_reg_by_name("rip", 0x2000)
    cpu.set_reg_by_name("rflags", 0x1)
    dump = cpu.dump()
    assert list(dump) == [*REG_NAMES, "rip", "rflags"]
    assert dump["r11"] == M64 and dump["rip"] == 0x2000 and dump["rflags"] == 0x3


def test_copy_and_equality() -> None:
    cpu = CpuState()
    other = cpu.copy()
    assert other == cpu
    other.regs[3] = 1
    assert other != cpu and cpu.regs[3] == 0


def test_inc_dec_chains_stay_one_deep() -> None:
    m = Machine("add rax, rbx\n" + "inc rcx\ndec rdx\n" * 500 + "hlt")
    m.set(rax=M64, rbx=1)
    m.run()
    lf = m.cpu.lf
    assert lf[0] >= K_INC and lf[3][0] < K_INC
    assert m.cpu.get_rflags() & 1  # CF from the ADD survives 1000 INC/DEC


def test_flat_memory_cross_page_and_wrap() -> None:
    mem = FlatMemory()
    assert isinstance(mem, Memory)
    mem.write(0xFFE, 8, 0x1122334455667788)
    assert mem.read(0xFFE, 8) == 0x1122334455667788
    assert mem.read_bytes(0x1000, 2) == b"\x66\x55"
    mem.write(M64 - 1, 4, 0xAABBCCDD)  # wraps to address 0
    assert mem.read_bytes(M64 - 1, 2) == b"\xdd\xcc"
    assert mem.read(0, 2) == 0xAABB
    assert mem.read(0x123456789000, 16) == 0
    mem.write(0x5000, 16, (1 << 128) - 1)
    assert mem.read(0x5008, 8) == M64
    assert mem.fetch(0xFFE, 4) == bytes.fromhex("88776655")


def test_flat_memory_cmpxchg() -> None:
    mem = FlatMemory()
    mem.write(0x10, 8, 5)
    assert mem.cmpxchg(0x10, 8, 4, 9) == (False, 5)
    assert mem.read(0x10, 8) == 5
    assert mem.cmpxchg(0x10, 8, 5, 9) == (True, 5)
    assert mem.read(0x10, 8) == 9


def test_port_in_complete_merge_rules() -> None:
    cpu = CpuState()
    for size, expect in ((1, 0xFFFFFFFFFFFFFF78), (2, 0xFFFFFFFFFFFF5678), (4, 0x12345678)):
        cpu.regs[0] = M64
        PortIn(0x60, size, 0).complete(cpu, 0x12345678)
        assert cpu.regs[0] == expect
