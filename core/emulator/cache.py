"""Decoded-instruction cache: one compiled closure per RIP.

Decoding with iced-x86 on every step is 3-5x slower than running a cached
closure (DESIGN.md, performance notes), so ``get`` decodes a RIP once.  The
cache remembers the 4 KiB page(s) holding each instruction's bytes so the vCPU
can write-protect code pages and drop stale closures on self-modifying code.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet

import iced_x86

from .codegen import InsnFn
from .compile import compile_instruction
from .errors import PF, UD, GuestFault
from .memory import Memory

__all__ = ["InstructionCache"]

_MAX_LEN = 15
_M64 = 0xFFFFFFFFFFFFFFFF


class InstructionCache:
    """RIP -> compiled closure, with a page -> RIPs index for invalidation.

    ``table`` is the plain dict the run loop reads directly; it is only ever
    mutated in place.  ``decodes`` counts decodes (tests check "once per RIP").
    """

    __slots__ = ("_by_page", "decodes", "table")

    def __init__(self) -> None:
        self.table: dict[int, InsnFn] = {}
        self._by_page: dict[int, set[int]] = {}
        self.decodes = 0

    def get(self, rip: int, mem: Memory) -> InsnFn:
        """The closure for the instruction at ``rip``, decoding it on a miss.

        Raises ``GuestFault`` #UD for an invalid encoding, #PF (from ``mem``) when
        the bytes cannot be fetched, and ``UnsupportedInstruction``.
        """
        fn = self.table.get(rip)
        if fn is not None:
            return fn
        instr = self._decode(rip, mem)
        fn = compile_instruction(instr)
        self.table[rip] = fn
        first = rip >> 12
        last = ((rip + instr.len - 1) & _M64) >> 12
        self._by_page.setdefault(first, set()).add(rip)
        if last != first:
            self._by_page.setdefault(last, set()).add(rip)
        return fn

    def _decode(self, rip: int, mem: Memory) -> iced_x86.Instruction:
        code = mem.fetch(rip, _MAX_LEN)
        self.decodes += 1
        decoder = iced_x86.Decoder(64, code, ip=rip)
        instr = decoder.decode()
        if instr.code == iced_x86.Code.INVALID:
            if decoder.last_error == iced_x86.DecoderError.NO_MORE_BYTES and len(code) < _MAX_LEN:
                # the instruction runs into a page that does not translate: let the
                # memory raise its #PF for that page, or raise one ourselves
                nxt = (rip + len(code)) & _M64
                mem.fetch(nxt, _MAX_LEN - len(code))
                raise GuestFault(PF, 0x10, nxt)
            raise GuestFault(UD, 0, rip)
        return instr

    def invalidate_page(self, page: int) -> int:
        """Drop every closure whose bytes lie on 4 KiB page ``page``; return how many."""
        rips = self._by_page.pop(page, None)
        if not rips:
            return 0
        table = self.table
        for rip in rips:
            table.pop(rip, None)
            # an instruction straddling two pages is indexed under both
            other = rip >> 12 if rip >> 12 != page else page + 1
            peers = self._by_page.get(other)
            if peers is not None:
                peers.discard(rip)
                if not peers:
                    del self._by_page[other]
        return len(rips)

    def code_pages(self) -> AbstractSet[int]:
        """Pages holding the bytes of at least one cached instruction.

        A live, read-only set view (O(1) ``in``, no copy); do not iterate it while
        invalidating, take ``set(cache.code_pages())`` for that.
        """
        return self._by_page.keys()

    def has_code(self, page: int) -> bool:
        """Whether page ``page`` holds the bytes of a cached instruction."""
        return page in self._by_page

    def clear(self) -> None:
        """Forget every cached instruction."""
        self.table.clear()
        self._by_page.clear()

    def __len__(self) -> int:
        return len(self.table)

    def __contains__(self, rip: object) -> bool:
        return rip in self.table
