"""The memory interface instruction closures use, and a flat test implementation.

The same compiled closures run under two callers: the vCPU's native execution
(accesses go through its software TLB / MMU and may raise
:class:`~pagetrack.emulator.errors.GuestFault`) and KVM's instruction emulator
(``x86_emulate_insn``; writes go through ``emulator_write_emulated`` and
``emulator_cmpxchg_emulated``, which notify page-track).  A closure only ever
sees a :class:`Memory`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["FlatMemory", "Memory"]

_M64 = 0xFFFFFFFFFFFFFFFF
_PAGE = 0x1000


@runtime_checkable
class Memory(Protocol):
    """Guest-virtual memory as seen by one instruction.

    Addresses are 64-bit and wrap.  Values are little-endian unsigned integers of
    ``size`` bytes (1, 2, 4, 8 or 16).  Any method may raise ``GuestFault``.
    ``emulating`` is True while KVM's emulator runs the instruction.
    """

    emulating: bool

    def read(self, addr: int, size: int) -> int:
        """Read ``size`` bytes at ``addr``."""
        ...

    def write(self, addr: int, size: int, value: int) -> None:
        """Write ``size`` bytes of ``value`` at ``addr``."""
        ...

    def cmpxchg(self, addr: int, size: int, expected: int, new: int) -> tuple[bool, int]:
        """Atomically replace ``expected`` by ``new``; return ``(success, old value)``.

        On failure memory is left untouched by this call (the instruction decides
        whether a write-back cycle follows).
        """
        ...

    def fetch(self, addr: int, size: int) -> bytes:
        """Instruction fetch of up to ``size`` bytes.

        Shorter only when the bytes run into a page that does not translate.
        """
        ...


class FlatMemory:
    """Sparse guest memory for tests: every address is mapped, pages appear on write.

    Backed by a dict of 4 KiB ``bytearray`` pages; unwritten memory reads as 0.
    Never faults.
    """

    __slots__ = ("emulating", "pages")

    def __init__(self) -> None:
        self.pages: dict[int, bytearray] = {}
        self.emulating = False

    def _page(self, vpn: int) -> bytearray:
        page = self.pages.get(vpn)
        if page is None:
            page = self.pages[vpn] = bytearray(_PAGE)
        return page

    def read_bytes(self, addr: int, n: int) -> bytes:
        """``n`` bytes starting at ``addr`` (wrapping at 2**64)."""
        out = bytearray()
        while n > 0:
            addr &= _M64
            off = addr & 0xFFF
            chunk = min(n, _PAGE - off)
            page = self.pages.get(addr >> 12)
            out += page[off:off + chunk] if page is not None else bytes(chunk)
            addr += chunk
            n -= chunk
        return bytes(out)

    def load(self, addr: int, data: bytes) -> None:
        """Copy ``data`` into memory at ``addr``."""
        pos = 0
        n = len(data)
        while pos < n:
            a = (addr + pos) & _M64
            off = a & 0xFFF
            chunk = min(n - pos, _PAGE - off)
            self._page(a >> 12)[off:off + chunk] = data[pos:pos + chunk]
            pos += chunk

    def read(self, addr: int, size: int) -> int:
        """Little-endian read of ``size`` bytes."""
        off = addr & 0xFFF
        if off + size <= _PAGE:
            page = self.pages.get(addr >> 12)
            if page is None:
                return 0
            return int.from_bytes(page[off:off + size], "little")
        return int.from_bytes(self.read_bytes(addr, size), "little")

    def write(self, addr: int, size: int, value: int) -> None:
        """Little-endian write of ``size`` bytes."""
        off = addr & 0xFFF
        if off + size <= _PAGE:
            page = self.pages.get(addr >> 12)
            if page is None:
                page = self.pages[addr >> 12] = bytearray(_PAGE)
            page[off:off + size] = value.to_bytes(size, "little")
        else:
            self.load(addr, value.to_bytes(size, "little"))

    def cmpxchg(self, addr: int, size: int, expected: int, new: int) -> tuple[bool, int]:
        """Compare-exchange (single-threaded, so trivially atomic)."""
        old = self.read(addr, size)
        if old != expected:
            return False, old
        self.write(addr, size, new)
        return True, old

    def fetch(self, addr: int, size: int) -> bytes:
        """Instruction fetch; all memory is mapped so always ``size`` bytes."""
        return self.read_bytes(addr, size)
