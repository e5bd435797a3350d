"""Guest-side setup: low memory (code, page tables, GDT/TSS/IDT, monitor stubs) and sregs.

The page tables come from :func:`pagetrack.program.build_page_tables`, the layout the
simulator uses too.  The descriptor tables and the exception stubs live in low-slot
pages that layout leaves free (``0x80000``–``0x8ffff``, identity-mapped):

======== =========================================================
0x80000  GDT: null, kernel code64 (0x08), kernel data (0x10),
         user code64 (0x1b), user data (0x23), 64-bit TSS (0x28)
0x81000  TSS (RSP0 = MON_STACK_TOP, no I/O permission bitmap)
0x82000  IDT: vectors 0–31, interrupt gates to the stubs
0x83000  stubs: ``[push 0] ; push vector ; jmp common``;
         common: ``out MON_PORT, al ; add rsp, 16 ; iretq``
0x90000  MON_STACK_TOP (ring-0 stack for exceptions taken in user mode)
======== =========================================================

Every exception reaches the VMM as a PIO exit on ``MON_PORT`` whose RIP lies in the
stub page; the VMM reads the frame at RSP: vector, error code, RIP, CS, RFLAGS, RSP, SS.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from ..program import CODE_BASE, DATA_BASE, STACK_TOP, PageTableLayout, build_page_tables
from . import ioctls as k

__all__ = [
    "GDT_BASE",
    "IDT_BASE",
    "MON_CODE",
    "MON_COMMON",
    "MON_END",
    "MON_PORT",
    "MON_STACK_TOP",
    "TSS_BASE",
    "setup_low_memory",
    "setup_sregs",
]

GDT_BASE = 0x80000
TSS_BASE = 0x81000
IDT_BASE = 0x82000
MON_CODE = 0x83000
MON_COMMON = MON_CODE + 0x200
MON_END = MON_CODE + 0x1000
MON_STACK_TOP = 0x90000
MON_PORT = 0x12

KCODE, KDATA, UCODE, UDATA, TSS_SEL = 0x08, 0x10, 0x1B, 0x23, 0x28
TSS_LIMIT = 103
_ERRCODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})

CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 2, 0x10, 0x20, 1 << 16, 1 << 31
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT = 1 << 5, 1 << 9, 1 << 10
EFER_LME, EFER_LMA = 1 << 8, 1 << 10


def _gdt() -> bytes:
    tss_lo = (TSS_LIMIT & 0xFFFF) | ((TSS_BASE & 0xFFFFFF) << 16) | (0x8B << 40) \
        | (((TSS_LIMIT >> 16) & 0xF) << 48) | (((TSS_BASE >> 24) & 0xFF) << 56)
    entries = [0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x00AFFB000000FFFF,
               0x00CFF3000000FFFF, tss_lo, TSS_BASE >> 32]
    return struct.pack(f"<{len(entries)}Q", *entries)


def _tss() -> bytes:
    tss = bytearray(TSS_LIMIT + 1)
    struct.pack_into("<Q", tss, 4, MON_STACK_TOP)  # RSP0
    struct.pack_into("<H", tss, 0x66, TSS_LIMIT + 1)  # I/O map base past the limit: no bitmap
    return bytes(tss)


def _stub_addr(vector: int) -> int:
    return MON_CODE + 16 * vector


def _idt() -> bytes:
    out = bytearray()
    for v in range(32):
        off = _stub_addr(v)
        out += struct.pack("<HHBBHII", off & 0xFFFF, KCODE, 0, 0x8E, (off >> 16) & 0xFFFF,
                           off >> 32, 0)
    return bytes(out)


def _stubs() -> bytes:
    code = bytearray(b"\xcc" * (MON_END - MON_CODE))
    for v in range(32):
        at = _stub_addr(v) - MON_CODE
        body = b"" if v in _ERRCODE_VECTORS else b"\x6a\x00"  # push 0 (no error code)
        body += bytes((0x6A, v))  # push vector
        rel = MON_COMMON - (_stub_addr(v) + len(body) + 5)
        body += b"\xe9" + struct.pack("<i", rel)  # jmp common
        code[at: at + len(body)] = body
    common = bytes((0xE6, MON_PORT)) + b"\x48\x83\xc4\x10" + b"\x48\xcf"  # out; add rsp,16; iretq
    at = MON_COMMON - MON_CODE
    code[at: at + len(common)] = common
    return bytes(code)


def setup_low_memory(write: Callable[[int, bytes], None], code: bytes,
                     data_size: int) -> PageTableLayout:
    """Write the program, the page tables and the monitor tables into guest memory."""
    write(CODE_BASE, code)
    layout = build_page_tables(data_size, lambda gpa, v: write(gpa, struct.pack("<Q", v)))
    write(GDT_BASE, _gdt())
    write(TSS_BASE, _tss())
    write(IDT_BASE, _idt())
    write(MON_CODE, _stubs())
    return layout


def _seg(selector: int, code: bool, dpl: int) -> k.KvmSegment:
    return k.KvmSegment(base=0, limit=0xFFFFFFFF, selector=selector, type=11 if code else 3,
                        present=1, dpl=dpl, db=0 if code else 1, s=1, l=1 if code else 0, g=1)


def setup_sregs(sregs: k.KvmSregs, cr3: int, user: bool) -> None:
    """Fill ``sregs`` for 64-bit long mode at CPL 0 (native) or CPL 3 (user-mode monitor)."""
    dpl = 3 if user else 0
    sregs.cs = _seg(UCODE if user else KCODE, True, dpl)
    data = _seg(UDATA if user else KDATA, False, dpl)
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.tr = k.KvmSegment(base=TSS_BASE, limit=TSS_LIMIT, selector=TSS_SEL, type=11, present=1)
    sregs.ldt = k.KvmSegment(base=0, limit=0xFFFF, selector=0, type=2, present=1)
    sregs.gdt = k.KvmDtable(base=GDT_BASE, limit=7 * 8 - 1)
    sregs.idt = k.KvmDtable(base=IDT_BASE, limit=32 * 16 - 1)
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    sregs.cr3 = cr3
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
    sregs.efer = EFER_LME | EFER_LMA


ENTRY_REGS = {"rip": CODE_BASE, "rsp": STACK_TOP, "rdi": DATA_BASE, "rflags": 0x2}
