"""Guest programs and the guest ABI shared by the simulator and the real-KVM backend.

Memory map (guest physical == guest virtual, identity-mapped 4 KiB pages, long mode):

* slot 0 ``low`` ``[0, 0x200000)``: page 0 unmapped; page tables from ``PT_BASE``;
  the program at ``CODE_BASE``; the stack below ``STACK_TOP``.
* slot 1 ``data`` from ``DATA_BASE`` (gfn 0x400), ``DATA_SIZE`` bytes.

Guest paging entries: every upper-level entry is present, writable, user, with A
set; low-slot PTEs have A and D set; data-slot PTEs have A set and D clear, so the
first write to a data page sets its D bit and so dirties the page-table page.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import attrs

from .errors import InputError
from .mmu.paging import PTE_A, PTE_D, PTE_P, PTE_PS, PTE_RW, PTE_US

__all__ = [
    "CODE_BASE",
    "DATA_BASE",
    "DATA_GFN",
    "DEFAULT_DATA_SIZE",
    "LOG_PORT",
    "LOW_SIZE",
    "MAX_DATA_SIZE",
    "PTE_A",
    "PTE_D",
    "PTE_P",
    "PTE_PS",
    "PTE_RW",
    "PTE_US",
    "PT_BASE",
    "ROUND_PORT",
    "STACK_TOP",
    "TOUR_TRACKED",
    "PageTableLayout",
    "Program",
    "assemble",
    "build_page_tables",
    "builtin_defines",
    "builtin_names",
    "builtin_program",
    "load_program",
    "parse_defines",
]

PAGE_SIZE = 4096
LOW_SIZE = 0x200000
CODE_BASE = 0x100000
STACK_TOP = 0x200000
DATA_BASE = 0x400000
DATA_GFN = DATA_BASE >> 12
DEFAULT_DATA_SIZE = 16 << 20
ROUND_PORT = 0x10
LOG_PORT = 0x11
PT_BASE = 0x1000  # PML4 here, then the PDPT, PDs and PTs
PT_LIMIT = 0x80000  # page tables must stay below this (the real-KVM monitor lives above)
#: The largest data slot whose page tables fit below PT_LIMIT: one PML4, one PDPT,
#: one PD, one table for the low slot, and one table per 2 MiB of data.
MAX_DATA_SIZE = ((PT_LIMIT - PT_BASE) // PAGE_SIZE - 4) << 21


_UPPER = PTE_P | PTE_RW | PTE_US | PTE_A
_LOW_LEAF = _UPPER | PTE_D
_DATA_LEAF = _UPPER


@attrs.frozen
class PageTableLayout:
    """Where the guest page tables live: ``cr3`` and the gpa of every table page."""

    cr3: int
    pages: tuple[int, ...]

    def pt_page_of(self, gpa: int) -> int:
        """Guest-physical address of the last-level table that maps ``gpa``."""
        return self.pages[self._pt_index[gpa >> 21]]

    _pt_index: Mapping[int, int] = attrs.field(factory=dict, repr=False, eq=False)


def build_page_tables(data_size: int, write_u64: Callable[[int, int], None]) -> PageTableLayout:
    """Write identity-mapping 4-level page tables into guest memory.

    ``write_u64(gpa, value)`` stores one entry.  Covers the low slot (except page
    0) and ``[DATA_BASE, DATA_BASE + data_size)``.
    """
    if data_size <= 0 or data_size % PAGE_SIZE:
        raise InputError(f"data size {data_size:#x} must be a positive multiple of 4 KiB")
    end = DATA_BASE + data_size
    regions = [0, *range(DATA_BASE >> 21, (end + (1 << 21) - 1) >> 21)]
    gib = sorted({r >> 9 for r in regions})
    need = 2 + len(gib) + len(regions)
    if PT_BASE + need * PAGE_SIZE > PT_LIMIT:
        raise InputError(f"data size {data_size >> 20} MiB needs {need} page-table pages; at most {(PT_LIMIT - PT_BASE) // PAGE_SIZE} fit below {PT_LIMIT:#x}")
    pml4, pdpt = PT_BASE, PT_BASE + PAGE_SIZE
    nxt = pdpt + PAGE_SIZE
    pages = [pml4, pdpt]
    write_u64(pml4, pdpt | _UPPER)
    pd_of: dict[int, int] = {}
    for g in gib:
        pd_of[g] = nxt
        pages.append(nxt)
        write_u64(pdpt + 8 * g, nxt | _UPPER)
        nxt += PAGE_SIZE
    pt_index: dict[int, int] = {}
    for r in regions:
        pt = nxt
        nxt += PAGE_SIZE
        pt_index[r] = len(pages)
        pages.append(pt)
        write_u64(pd_of[r >> 9] + 8 * (r & 511), pt | _UPPER)
        for i in range(512):
            gpa = (r << 21) | (i << 12)
            if r == 0:
                if gpa == 0:
                    continue
                write_u64(pt + 8 * i, gpa | _LOW_LEAF)
            elif DATA_BASE <= gpa < end:
                write_u64(pt + 8 * i, gpa | _DATA_LEAF)
    return PageTableLayout(pml4, tuple(pages), pt_index)


@attrs.frozen
class Program:
    """A guest program: machine code loaded at ``CODE_BASE`` and its data size."""

    code: bytes
    name: str
    data_size: int = DEFAULT_DATA_SIZE
    source: str | None = attrs.field(default=None, repr=False)


def parse_defines(items: list[str] | tuple[str, ...]) -> dict[str, int]:
    """Parse ``-D NAME=VALUE`` options (VALUE in any Python integer notation)."""
    out: dict[str, int] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise InputError(f"-D {item!r}: expected NAME=VALUE")
        try:
            out[name] = int(value.strip().replace("_", ""), 0)
        except ValueError:
            raise InputError(f"-D {item!r}: {value!r} is not an integer") from None
    return out


def _abi_symbols(data_size: int) -> dict[str, int]:
    return {
        "DATA_BASE": DATA_BASE,
        "DATA_SIZE": data_size,
        "DATA_PAGES": data_size // PAGE_SIZE,
        "DATA_GFN": DATA_GFN,
        "CODE_BASE": CODE_BASE,
        "STACK_TOP": STACK_TOP,
        "PAGE_SIZE": PAGE_SIZE,
        "ROUND_PORT": ROUND_PORT,
        "LOG_PORT": LOG_PORT,
    }


def assemble(source: str, name: str = "<program>", defines: Mapping[str, int] | None = None,
             data_size: int = DEFAULT_DATA_SIZE) -> Program:
    """Assemble x86-64 Intel-syntax source with keystone, ABI symbols predefined.

    ``defines`` replace the program's own ``.equ NAME, ...`` lines or add new ones.
    Constants are resolved here and substituted as numbers before keystone sees
    the text: keystone mis-assembles a memory operand that adds two symbols
    (``[DATA_BASE + DATA_SIZE - 4]`` comes out as ``[DATA_SIZE - 4]``).
    """
    import keystone

    lines = source.splitlines()
    _check_statements(lines, name)
    symbols = _resolve_constants(lines, _abi_symbols(data_size), dict(defines or {}), name)
    body = [_substitute(line, symbols) for line in lines if not _EQU.match(line)]
    ks = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_64)
    text = "\n".join(body) + "\n"
    try:
        encoding, _ = ks.asm(text, CODE_BASE)
    except keystone.KsError as exc:
        raise InputError(f"cannot assemble: {exc}{_find_bad_line(ks, [], body)}", name) from None
    if not encoding:
        raise InputError("assembles to no instructions", name)
    if CODE_BASE + len(encoding) > STACK_TOP - 0x10000:
        raise InputError(f"program is {len(encoding)} bytes; it must end below {STACK_TOP - 0x10000:#x}", name)
    return Program(bytes(encoding), name, data_size, source)


_EQU = re.compile(r"^\s*\.(?:equ|set)\s+([A-Za-z_][A-Za-z0-9_]*)\s*,\s*(.*?)\s*(?:#.*)?$")
_NAME = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]*\b")
_BINOPS: dict[type, Any] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.LShift: operator.lshift,
    ast.RShift: operator.rshift, ast.BitAnd: operator.and_, ast.BitOr: operator.or_,
    ast.BitXor: operator.xor,
}


def _evaluate(expr: str, symbols: Mapping[str, int]) -> int:
    """Evaluate an assembler constant expression (integers, symbols, + - * / % << >> & | ^ ~)."""
    text = re.sub(r"(?<![/])/(?![/])", "//", expr)

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in symbols:
                raise KeyError(node.id)
            return symbols[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return int(_BINOPS[type(node.op)](ev(node.left), ev(node.right)))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd, ast.Invert)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else ~v if isinstance(node.op, ast.Invert) else v
        raise ValueError("not a constant expression")

    return ev(ast.parse(text, mode="eval"))


def _resolve_constants(lines: list[str], symbols: dict[str, int], defines: dict[str, int],
                       name: str) -> dict[str, int]:
    """Values of every ``.equ``: ``-D`` overrides win, forward references resolve."""
    pending: list[tuple[int, str, str]] = []
    for i, line in enumerate(lines):
        m = _EQU.match(line)
        if m and m.group(1) not in defines:
            pending.append((i, m.group(1), m.group(2)))
    symbols.update(defines)
    while pending:
        left = []
        for i, sym, expr in pending:
            try:
                symbols[sym] = _evaluate(expr, symbols)
            except KeyError:
                left.append((i, sym, expr))
            except (ValueError, SyntaxError, ZeroDivisionError):
                raise InputError(f"line {i + 1}: .equ {sym}: {expr!r} is not a constant expression", name) from None
        if len(left) == len(pending):
            i, sym, expr = left[0]
            raise InputError(f"line {i + 1}: .equ {sym}: {expr!r} uses an undefined symbol", name)
        pending = left
    return symbols


def _substitute(line: str, symbols: Mapping[str, int]) -> str:
    """Replace constant names by their values (comments left alone)."""
    code, hash_, comment = line.partition("#")
    code = _NAME.sub(lambda m: hex(symbols[m.group(0)]) if m.group(0) in symbols else m.group(0), code)
    return code + hash_ + comment


_STATEMENT_START = re.compile(r"[A-Za-z_.]")


def _check_statements(lines: list[str], name: str) -> None:
    """Reject statements keystone cannot parse before it sees them.

    Keystone hangs on some malformed input (a statement starting with ``(``),
    so every statement — lines split at ``;``, comments after ``#`` removed —
    must start with a mnemonic, a label or a directive.
    """
    for i, line in enumerate(lines):
        for stmt in line.split("#", 1)[0].split(";"):
            stmt = stmt.strip()
            if stmt and not _STATEMENT_START.match(stmt):
                raise InputError(f"line {i + 1}: {stmt!r} is not an instruction, label or directive "
                                 "(comments start with '#')", name)


def _find_bad_line(ks: object, prologue: list[str], lines: list[str]) -> str:
    """Locate the first source line keystone rejects on its own (best effort).

    Each instruction line is assembled alone; an unknown symbol (a label defined
    elsewhere) does not count against it.
    """
    import keystone

    for i, line in enumerate(lines):
        stmt = line.split("#", 1)[0].strip()
        if ":" in stmt and not stmt.startswith("."):
            stmt = stmt.split(":", 1)[1].strip()
        if not stmt or stmt.startswith("."):
            continue
        try:
            ks.asm("\n".join([*prologue, stmt]), CODE_BASE)  # type: ignore[attr-defined]
        except keystone.KsError as exc:
            if "SYMBOL" not in str(exc).upper():
                return f" (line {i + 1}: {stmt!r})"
    return ""


def load_program(path: str | Path, defines: Mapping[str, int] | None = None,
                 data_size: int = DEFAULT_DATA_SIZE) -> Program:
    """Load a ``.s`` source (assembled) or any other file as raw machine code."""
    p = Path(path)
    if not p.is_file():
        raise InputError("no such file", str(p))
    if p.suffix in (".s", ".S", ".asm"):
        try:
            src = p.read_text()
        except UnicodeDecodeError:
            raise InputError("assembly source is not UTF-8 text", str(p)) from None
        return assemble(src, str(p), defines, data_size)
    if defines:
        raise InputError("-D applies to assembly sources only", str(p))
    code = p.read_bytes()
    if not code:
        raise InputError("empty program", str(p))
    return Program(code, str(p), data_size)


#: Data page (index in the data slot) the tour's external tracker watches, with the next one.
TOUR_TRACKED = 0x10


def builtin_defines(name: str, data_size: int = DEFAULT_DATA_SIZE) -> dict[str, int]:
    """Symbols a built-in program takes from its VM's layout (``-D`` overrides them).

    ``tour`` edits its own page tables, so it needs their addresses:
    ``PTE_DATA`` (the PTE that maps ``DATA_BASE``), ``PD_ADDR`` (the page
    directory of the first GiB), ``PDE_OFF`` (the offset of the PDE that maps
    ``DATA_BASE``) and ``TRACKED_OFF`` (the externally tracked data page).
    Other programs need none.
    """
    if name != "tour":
        return {}
    layout = build_page_tables(data_size, lambda gpa, value: None)
    return {
        "PTE_DATA": layout.pt_page_of(DATA_BASE) + 8 * ((DATA_BASE >> 12) & 511),
        "PD_ADDR": layout.pages[2],
        "PDE_OFF": 8 * ((DATA_BASE >> 21) & 511),
        "TRACKED_OFF": TOUR_TRACKED << 12,
    }


def builtin_names() -> list[str]:
    """The names of the programs packaged in ``pagetrack.programs`` (``tour``, ``gvt_driver`` ...)."""
    root = resources.files("pagetrack.programs")
    return sorted(p.name[:-2] for p in root.iterdir() if p.name.endswith(".s"))


def builtin_program(name: str, defines: Mapping[str, int] | None = None,
                    data_size: int = DEFAULT_DATA_SIZE) -> Program:
    """Assemble a program packaged in ``pagetrack.programs``, with its :func:`builtin_defines`."""
    ref = resources.files("pagetrack.programs").joinpath(f"{name}.s")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or not ref.is_file():
        raise InputError(f"no built-in program {name!r} (built-in: {', '.join(builtin_names())})")
    symbols = {**builtin_defines(name, data_size), **(defines or {})}
    return assemble(ref.read_text(), f"pagetrack:{name}", symbols, data_size)
