"""Behaviour that depends on who runs the instruction: native execution vs KVM's
emulator (``mem.emulating``) — cmpxchg write-back and the REP string restart."""

from __future__ import annotations

import pytest
from emu_helpers import Machine, RecordingMemory
from pagetrack.emulator import GuestFault

DATA = 0x400000


def _cmpxchg_machine(src: str, emulating: bool) -> tuple[Machine, RecordingMemory]:
    mem = RecordingMemory()
    mem.emulating = emulating
    m = Machine(src, mem=mem)
    m.set(rbx=DATA, rcx=0x5555, rax=0x1111, rdx=0)
    return m, mem


@pytest.mark.parametrize("src,size", [("lock cmpxchg qword ptr [rbx], rcx", 8),
                                      ("lock cmpxchg byte ptr [rbx], cl", 1),
                                      ("cmpxchg dword ptr [rbx], ecx", 4)])
def test_failed_cmpxchg_native_writes_back_old_value(src: str, size: int) -> None:
    m, mem = _cmpxchg_machine(src, emulating=False)
    mem.write(DATA, 8, 0x2222)
    mem.log.clear()
    m.step()
    assert mem.data_ops() == [("cmpxchg", DATA, size), ("write", DATA, size)]
    assert mem.read(DATA, 8) == 0x2222
    assert m.reg("rax") & ((1 << (8 * size)) - 1) == 0x2222 & ((1 << (8 * size)) - 1)
    assert not m.cpu.get_rflags() & 0x40


def test_failed_cmpxchg_emulated_does_not_write() -> None:
    """``emulator_cmpxchg_emulated``: X86EMUL_CMPXCHG_FAILED, no write, no track_write."""
    m, mem = _cmpxchg_machine("lock cmpxchg qword ptr [rbx], rcx", emulating=True)
    mem.write(DATA, 8, 0x2222)
    mem.log.clear()
    m.step()
    assert mem.data_ops() == [("cmpxchg", DATA, 8)]
    assert m.reg("rax") == 0x2222
    assert m.cpu.rip == m.base + len(m.code)


@pytest.mark.parametrize("emulating", [False, True])
def test_successful_cmpxchg_is_one_compare_exchange(emulating: bool) -> None:
    m, mem = _cmpxchg_machine("lock cmpxchg qword ptr [rbx], rcx", emulating)
    mem.write(DATA, 8, 0x1111)
    mem.log.clear()
    m.step()
    assert mem.data_ops() == [("cmpxchg", DATA, 8)]
    assert mem.read(DATA, 8) == 0x5555
    assert m.reg("rax") == 0x1111
    assert m.cpu.get_rflags() & 0x40


@pytest.mark.parametrize("emulating", [False, True])
def test_cmpxchg16b_miss_and_hit(emulating: bool) -> None:
    mem = RecordingMemory()
    mem.emulating = emulating
    m = Machine("lock cmpxchg16b xmmword ptr [rbx]\nlock cmpxchg16b xmmword ptr [rbx]", mem=mem)
    old = (0xAAAA << 64) | 0xBBBB
    mem.write(DATA, 16, old)
    m.set(rbx=DATA, rax=1, rdx=2, rcx=7)
    mem.log.clear()
    m.step()
    assert (m.reg("rdx"), m.reg("rax")) == (0xAAAA, 0xBBBB)
    assert not m.cpu.get_rflags() & 0x40
    expected = [("cmpxchg", DATA, 16)] + ([] if emulating else [("write", DATA, 16)])
    assert mem.data_ops() == expected
    m.step()  # now RDX:RAX matches: RCX:RBX is stored
    assert m.cpu.get_rflags() & 0x40
    assert mem.read(DATA, 16) == (7 << 64) | DATA


def test_cmpxchg16b_misaligned_is_gp() -> None:
    m = Machine("lock cmpxchg16b xmmword ptr [rbx]")
    m.set(rbx=DATA + 8)
    before = m.cpu.copy()
    with pytest.raises(GuestFault) as info:
        m.step()
    assert info.value.vector == 13
    assert m.cpu == before


def test_failed_cmpxchg_write_back_faults_natively_on_write_protected_page() -> None:
    """Native: the locked write-back cycle of a failed compare hits a read-only page."""

    class ReadOnlyCompare(RecordingMemory):
        def cmpxchg(self, addr: int, size: int, expected: int, new: int) -> tuple[bool, int]:
            return False, self.read(addr, size)  # compare fails without a write

    mem = ReadOnlyCompare()
    m = Machine("lock cmpxchg qword ptr [rbx], rcx", mem=mem)
    m.set(rbx=DATA, rax=1)
    mem.no_write.add(DATA >> 12)
    before = m.cpu.copy()
    with pytest.raises(GuestFault):
        m.step()
    assert m.cpu == before
    mem.emulating = True  # the emulator never writes on failure
    m.step()
    assert m.cpu.rip == m.base + len(m.code)


# --- REP under emulation -------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 1023, 1024, 1025, 3000])
def test_rep_stos_emulated_reenters_guest_every_1024_iterations(count: int) -> None:
    """``x86_emulate_insn`` string restart: stop when RCX != 0 and RCX % 1024 == 0."""
    mem = RecordingMemory()
    mem.emulating = True
    m = Machine("rep stosb", mem=mem)
    m.set(rcx=count, rdi=DATA, rax=0x5A)
    stops = []
    while m.cpu.rip == m.base:
        m.step()
        stops.append(m.reg("rcx"))
    expected = [c for c in range(count - 1, 0, -1) if c % 1024 == 0] + [0]
    assert stops == expected
    assert mem.read_bytes(DATA, count) == b"\x5a" * count
    assert m.reg("rdi") == DATA + count


def test_rep_native_runs_to_completion() -> None:
    m = Machine("rep movsb")
    m.set(rcx=5000, rsi=DATA, rdi=DATA + 0x10000)
    m.mem.load(DATA, bytes(range(256)) * 20)
    m.step()
    assert m.reg("rcx") == 0
    assert m.mem.read_bytes(DATA + 0x10000, 5000) == (bytes(range(256)) * 20)[:5000]


@pytest.mark.parametrize("emulating", [False, True])
@pytest.mark.parametrize("src", ["rep movsq", "rep stosd", "repe cmpsb", "repne scasw", "rep lodsb"])
def test_zero_count_rep_touches_no_memory(src: str, emulating: bool) -> None:
    mem = RecordingMemory()
    mem.emulating = emulating
    m = Machine(src, mem=mem)
    m.set(rcx=0, rsi=DATA, rdi=DATA + 0x100)
    m.cpu.set_rflags(0x8D5 | 2)
    before = m.cpu.copy()
    mem.log.clear()
    assert m.step() is None
    assert mem.data_ops() == []
    assert m.cpu.rip == m.base + len(m.code)
    m.cpu.rip = before.rip
    assert m.cpu == before


def test_repe_cmps_stops_on_mismatch_before_restart_point() -> None:
    mem = RecordingMemory()
    mem.emulating = True
    m = Machine("repe cmpsb", mem=mem)
    m.mem.load(DATA, b"x" * 2000)
    m.mem.load(DATA + 0x1000, b"x" * 1500 + b"y")
    m.set(rcx=2000, rsi=DATA, rdi=DATA + 0x1000)
    m.step()  # 976 iterations -> RCX 1024, restart point
    assert (m.cpu.rip, m.reg("rcx")) == (m.base, 1024)
    m.step()  # mismatch at index 1500
    assert m.reg("rcx") == 2000 - 1501
    assert m.cpu.rip == m.base + len(m.code)
    assert not m.cpu.get_rflags() & 0x40
