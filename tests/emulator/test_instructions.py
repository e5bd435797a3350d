"""Per-family unit tests for semantics the differential tests cannot see (memory
access order and addresses, no-access forms) or that deserve a named example."""

from __future__ import annotations

import pytest
from emu_helpers import Machine, RecordingMemory
from pagetrack.emulator import Hlt

DATA = 0x400000
M64 = (1 << 64) - 1


def _run(src: str, **regs: int) -> Machine:
    m = Machine(src + "\nhlt", mem=RecordingMemory()).set(**regs)
    assert isinstance(m.run(), Hlt)
    return m


def _ops(m: Machine) -> list[tuple[str, int, int]]:
    assert isinstance(m.mem, RecordingMemory)
    return m.mem.data_ops()


def test_register_write_widths() -> None:
    m = _run("mov ah, 0x12\nmov bx, 0x3456\nmov ecx, edx\nmov sil, 0x9a",
             rax=M64, rbx=M64, rcx=M64, rdx=0xFFFFFFFF00000007, rsi=M64)
    assert m.reg("rax") == 0xFFFFFFFFFFFF12FF
    assert m.reg("rbx") == 0xFFFFFFFFFFFF3456
    assert m.reg("rcx") == 7  # 32-bit writes zero-extend
    assert m.reg("rsi") == 0xFFFFFFFFFFFFFF9A


def test_cmov_32_bit_zero_extends_when_false() -> None:
    m = _run("cmp eax, eax\ncmovne ecx, edx", rcx=0xFFFFFFFF12345678, rdx=1)
    assert m.reg("rcx") == 0x12345678


def test_cmov_reads_memory_even_when_false() -> None:
    m = _run("cmp eax, eax\ncmovne rcx, qword ptr [rbx]", rbx=DATA, rcx=5)
    assert _ops(m) == [("read", DATA, 8)]
    assert m.reg("rcx") == 5


@pytest.mark.parametrize("offset,addr,bit", [(-1, DATA - 8, 63), (64, DATA + 8, 0),
                                             (-65, DATA - 16, 63), (3, DATA, 3)])
def test_bts_register_offset_addresses_memory_by_signed_bit_index(
        offset: int, addr: int, bit: int) -> None:
    m = _run("bts qword ptr [rbx], rcx", rbx=DATA, rcx=offset & M64)
    assert _ops(m) == [("read", addr, 8), ("write", addr, 8)]
    assert m.mem.read(addr, 8) == 1 << bit


def test_bt_immediate_offset_is_masked_to_operand_size() -> None:
    m = _run("bt dword ptr [rbx], 35\nsetc al", rbx=DATA)
    assert _ops(m) == [("read", DATA, 4)]
    m.mem.write(DATA, 4, 8)
    m.cpu.rip = m.base
    m.run()
    assert m.reg("rax") & 0xFF == 1


def test_bsf_zero_source_keeps_destination_and_sets_zf() -> None:
    m = _run("bsf rax, rdx\nsetz cl\nbsr r8, r9", rax=0x1234, rdx=0, r9=0x10)
    assert m.reg("rax") == 0x1234 and m.reg("rcx") & 0xFF == 1
    assert m.reg("r8") == 4


def test_pop_memory_uses_incremented_rsp() -> None:
    m = Machine("pop qword ptr [rsp + 8]\nhlt", mem=RecordingMemory())
    sp = m.reg("rsp") - 0x40
    m.set(rsp=sp)
    m.mem.write(sp, 8, 0xABCD)
    m.run()
    assert m.mem.read(sp + 16, 8) == 0xABCD
    assert m.reg("rsp") == sp + 8


def test_push_rsp_pushes_old_value_and_pop_rsp_loads_it() -> None:
    m = Machine("push rsp\npop rsp\nhlt")
    sp = m.reg("rsp")
    m.run()
    assert m.reg("rsp") == sp


def test_rip_relative_and_segment_bases() -> None:
    m = Machine("mov rax, qword ptr [rip + 0x100]\nmov rcx, qword ptr fs:[rbx - 8]\n"
                "mov rdx, qword ptr gs:[rbx]\nlea rsi, fs:[rbx + 4]\nhlt")
    base = m.base
    m.mem.write(base + 7 + 0x100, 8, 0x11)
    m.cpu.fs_base = DATA
    m.cpu.gs_base = DATA + 0x100
    m.mem.write(DATA + 8, 8, 0x22)
    m.mem.write(DATA + 0x110, 8, 0x33)
    m.set(rbx=0x10)
    m.run()
    assert (m.reg("rax"), m.reg("rcx"), m.reg("rdx")) == (0x11, 0x22, 0x33)
    assert m.reg("rsi") == 0x14  # LEA ignores the segment base


def test_32_bit_address_size_truncates() -> None:
    m = Machine("mov eax, dword ptr [ebx + 4]\nlea ecx, [ebx + 8]\nhlt")
    m.set(rbx=0x1_0040_0000 | 0xFFFFFFFC)
    m.mem.write(0, 4, 0x77)  # 0xfffffffc + 4 wraps to 0 in 32 bits
    m.run()
    assert m.reg("rax") == 0x77
    assert m.reg("rcx") == 4


@pytest.mark.parametrize("src", ["lock add qword ptr [rbx], rax", "xchg qword ptr [rbx], rax",
                                 "lock xadd qword ptr [rbx], rax", "not qword ptr [rbx]",
                                 "shl qword ptr [rbx], 0"])
def test_read_modify_write_is_one_read_then_one_write(src: str) -> None:
    m = _run(src, rbx=DATA, rax=1)
    assert _ops(m) == [("read", DATA, 8), ("write", DATA, 8)]


@pytest.mark.parametrize("src", ["nop dword ptr [rax]", "lea rax, [rax + rbx*8]",
                                 "prefetcht0 byte ptr [rax]", "pause", "mfence"])
def test_no_memory_access(src: str) -> None:
    m = _run(src, rax=0xDEAD0000, rbx=3)
    assert _ops(m) == []


def test_shift_count_is_masked_and_zero_count_keeps_flags() -> None:
    m = _run("shl eax, 33\nstc\nshl rdx, 64\nsetc cl", rax=3, rdx=5)
    assert m.reg("rax") == 6
    assert m.reg("rdx") == 5 and m.reg("rcx") & 0xFF == 1


def test_division() -> None:
    m = _run("div rcx\nmov r8, rax\nmov r9, rdx\nmov rax, -7\ncqo\nmov rcx, 2\nidiv rcx",
             rax=10, rdx=1, rcx=3)
    assert (m.reg("r8"), m.reg("r9")) == (((1 << 64) + 10) // 3, ((1 << 64) + 10) % 3)
    assert (m.reg("rax"), m.reg("rdx")) == ((-3) & M64, (-1) & M64)


def test_multi_precision_add_with_adc() -> None:
    m = _run("add rax, rcx\nadc rdx, r8\nadc r9, 0", rax=M64, rcx=1, rdx=M64, r8=0, r9=0)
    assert (m.reg("rax"), m.reg("rdx"), m.reg("r9")) == (0, 0, 1)


def test_loop_and_jrcxz() -> None:
    m = _run("xor eax, eax\njrcxz done\nagain: add rax, rcx\nloop again\ndone: nop", rcx=10)
    assert m.reg("rax") == 55 and m.reg("rcx") == 0


def test_pushf_popf_roundtrip_keeps_df_and_arith_flags() -> None:
    m = _run("std\nstc\npushfq\ncld\nclc\npopfq\nsetc al")
    assert m.cpu.df == 1 and m.reg("rax") & 0xFF == 1


def test_lahf_sahf() -> None:
    m = _run("sahf\nlahf", rax=0xD5 << 8)
    assert (m.reg("rax") >> 8) & 0xFF == 0xD7
    assert m.cpu.get_rflags() & 0xD5 == 0xD5


def test_cmpxchg_32_bit_register_form_follows_the_sdm() -> None:
    """Success writes only DEST (zero-extended); failure writes EAX and DEST := DEST.

    (Unicorn 2.1's QEMU also rewrites EAX on success, clearing RAX[63:32].)
    """
    hit = _run("cmpxchg edx, ecx", rax=0xFFFFFFFF00000005, rdx=0xAAAAAAAA00000005, rcx=0x77)
    assert (hit.reg("rax"), hit.reg("rdx")) == (0xFFFFFFFF00000005, 0x77)
    assert hit.cpu.get_rflags() & 0x40
    miss = _run("cmpxchg edx, ecx", rax=0xFFFFFFFF00000005, rdx=0xAAAAAAAA00000006, rcx=0x77)
    assert (miss.reg("rax"), miss.reg("rdx")) == (6, 6)
    assert not miss.cpu.get_rflags() & 0x40
