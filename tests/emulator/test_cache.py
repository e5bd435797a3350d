"""InstructionCache: decode once per RIP, per-page invalidation, decode errors."""

from __future__ import annotations

import pytest
from emu_helpers import Machine, asm
from pagetrack.emulator import (
    FlatMemory,
    GuestFault,
    Hlt,
    InstructionCache,
    UnsupportedInstruction,
)

BASE = 0x100000


def test_each_rip_is_decoded_once() -> None:
    m = Machine("mov ecx, 100\nloop_top: add rax, rcx\ndec rcx\njnz loop_top\nhlt")
    assert isinstance(m.run(), Hlt)
    assert m.reg("rax") == sum(range(1, 101))
    assert m.cache.decodes == 5
    assert len(m.cache) == 5
    assert m.cache.code_pages() == {BASE >> 12}
    assert m.cpu.icount == 1 + 300 + 1


def test_self_modifying_code_after_invalidate_page() -> None:
    m = Machine("mov eax, 1\nhlt")
    m.run()
    assert m.reg("rax") == 1
    # the guest rewrites the immediate; the vCPU notices the code page and drops it
    m.mem.load(BASE + 1, (2).to_bytes(4, "little"))
    m.cpu.rip = BASE
    m.run()
    assert m.reg("rax") == 1  # stale closure still cached
    assert m.cache.invalidate_page(BASE >> 12) == 2
    assert m.cache.code_pages() == set()
    m.cpu.rip = BASE
    m.run()
    assert m.reg("rax") == 2
    assert m.cache.decodes == 4


def test_instruction_straddling_pages_is_dropped_by_either_page() -> None:
    code = asm("movabs rax, 0x1122334455667788", BASE + 0xFFC)
    for page in ((BASE >> 12), (BASE >> 12) + 1):
        mem = FlatMemory()
        mem.load(BASE + 0xFFC, code)
        cache = InstructionCache()
        cache.get(BASE + 0xFFC, mem)
        assert set(cache.code_pages()) == {BASE >> 12, (BASE >> 12) + 1}
        assert cache.has_code(page)
        assert cache.invalidate_page(page) == 1
        assert set(cache.code_pages()) == set()
        assert BASE + 0xFFC not in cache


def test_invalidate_other_page_keeps_closures() -> None:
    m = Machine("nop\nhlt")
    m.run()
    assert m.cache.invalidate_page(0x999) == 0
    assert len(m.cache) == 2
    m.cache.clear()
    assert len(m.cache) == 0 and not m.cache.code_pages()


def test_invalid_encoding_is_ud() -> None:
    mem = FlatMemory()
    mem.load(BASE, b"\x06")  # push es: invalid in 64-bit mode
    with pytest.raises(GuestFault) as info:
        InstructionCache().get(BASE, mem)
    assert info.value.vector == 6


def test_truncated_fetch_at_untranslated_page_is_pf() -> None:
    class Edge(FlatMemory):
        def fetch(self, addr: int, size: int) -> bytes:
            end = (BASE | 0xFFF) + 1
            if addr >= end:
                raise GuestFault(14, 0x10, addr)
            return self.read_bytes(addr, min(size, end - addr))

    mem = Edge()
    code = asm("movabs rax, 0x1122334455667788", BASE + 0xFFC)
    mem.load(BASE + 0xFFC, code)
    with pytest.raises(GuestFault) as info:
        InstructionCache().get(BASE + 0xFFC, mem)
    assert (info.value.vector, info.value.address) == (14, BASE + 0x1000)


def test_unsupported_instruction_names_instruction_and_rip() -> None:
    m = Machine("nop\nrdrand rax")
    m.step()
    with pytest.raises(UnsupportedInstruction) as info:
        m.step()
    assert str(info.value) == "unsupported instruction 'rdrand rax' at rip 0x100001"
    assert info.value.rip == BASE + 1
    assert BASE + 1 not in m.cache


@pytest.mark.parametrize("src", ["syscall", "int3", "movaps xmm0, xmm1", "mov ds, ax",
                                 "mov rax, cr8", "enter 8, 0", "rdtsc"])
def test_other_unsupported_instructions(src: str) -> None:
    m = Machine(src)
    with pytest.raises(UnsupportedInstruction, match=r"at rip 0x100000$"):
        m.step()


def test_instruction_source_shows_the_closure() -> None:
    import iced_x86
    from pagetrack.emulator import instruction_source

    instr = iced_x86.Decoder(64, asm("add qword ptr [rbx + 8], rax", BASE), ip=BASE).decode()
    text = instruction_source(instr)
    assert text.startswith("# add [rbx+8],rax @ 0x100000")
    assert "mem.read(ea, 8)" in text and "mem.write(ea, 8, r)" in text
    assert text.index("mem.write") < text.index("cpu.lf =") < text.index("cpu.rip =")
