"""Integer arithmetic and logic: ADD..CMP, TEST, INC/DEC/NEG/NOT, shifts and rotates,
SHLD/SHRD, MUL/IMUL/DIV/IDIV, BT*, BSF/BSR/TZCNT/LZCNT/POPCNT.

Flags follow the Intel SDM; where the SDM leaves a flag undefined the value is
QEMU's (so differential tests against Unicorn stay simple), but callers must not
rely on it.  Memory read-modify-write forms read, compute, write, and only then
commit flags and RIP (a LOCK prefix changes nothing: one thread runs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import iced_x86

from .codegen import ENV, M64, Builder, NotHandled, RegRef, mask
from .errors import DE, GuestFault
from .flags import (
    K_ADD,
    K_DEC,
    K_FLAGS,
    K_IMUL,
    K_INC,
    K_LOGIC,
    K_MUL,
    K_SAR,
    K_SHL,
    K_SHR,
    K_SUB,
    carry,
    flags_of,
)

__all__ = ["HANDLERS"]

_M = iced_x86.Mnemonic
_OK = iced_x86.OpKind

ENV.update(carry=carry, flags_of=flags_of, GuestFault=GuestFault)

Handler = Callable[[Builder], None]


def _sign(size: int) -> str:
    return hex(1 << (8 * size - 1))


# --- two-operand ALU -----------------------------------------------------------------

def _binary(op: str) -> Handler:
    """ADD ADC SUB SBB AND OR XOR CMP TEST."""

    def handler(b: Builder) -> None:
        size = b.size(0)
        m = mask(size)
        a = b.let("a", b.read(0))
        s = b.let("s", b.read(1, size))
        writes = op not in ("cmp", "test")
        if op == "add":
            b.emit(f"r = ({a} + {s}) & {m}")
        elif op == "sub" or op == "cmp":
            b.emit(f"r = ({a} - {s}) & {m}")
        elif op in ("adc", "sbb"):
            b.emit("c = carry(cpu.lf)")
            sign = "+" if op == "adc" else "-"
            b.emit(f"r = ({a} {sign} {s} {sign} c) & {m}")
        else:
            sym = {"and": "&", "or": "|", "xor": "^", "test": "&"}[op]
            b.emit(f"r = {a} {sym} {s}")
        if writes:
            b.write(0, "r")
        if op in ("add", "sub", "cmp"):
            b.lazy(K_ADD if op == "add" else K_SUB, size, "r", a, s)
        elif op in ("adc", "sbb"):
            base = b.k((K_ADD if op == "adc" else K_SUB) + _idx(size))
            b.emit(f"cpu.lf = ({base} + (c << 2), r, {a}, {s})")
        else:
            b.lazy(K_LOGIC, size, "r", "0", "0")
        b.next_rip()

    return handler


def _idx(size: int) -> int:
    return {1: 0, 2: 1, 4: 2, 8: 3}[size]


# --- one-operand ALU --------------------------------------------------------------------

def _incdec(inc: bool) -> Handler:
    def handler(b: Builder) -> None:
        size = b.size(0)
        a = b.let("a", b.read(0))
        b.emit(f"r = ({a} {'+' if inc else '-'} 1) & {mask(size)}")
        b.write(0, "r")
        b.emit("p = cpu.lf")
        with b.block(f"if p[0] >= {K_INC}:"):
            b.emit("p = p[3]")
        b.lazy(K_INC if inc else K_DEC, size, "r", a, "p")
        b.next_rip()

    return handler


def _neg(b: Builder) -> None:
    size = b.size(0)
    a = b.let("a", b.read(0))
    b.emit(f"r = -{a} & {mask(size)}")
    b.write(0, "r")
    b.lazy(K_SUB, size, "r", "0", a)
    b.next_rip()


def _not(b: Builder) -> None:
    size = b.size(0)
    a = b.read(0)
    b.write(0, f"{a} ^ {mask(size)}" if a.isidentifier() else f"({a} ^ {mask(size)})")
    b.next_rip()


# --- shifts and rotates ------------------------------------------------------------------

def _count(b: Builder, i: int, size: int) -> tuple[str, int | None]:
    """The masked shift count: (expression, constant value or None for CL)."""
    cmask = 0x3F if size == 8 else 0x1F
    if b.is_imm(i):
        c = b.imm(i, 1) & cmask
        return b.k(c), c
    r = b.reg(i)
    if r.num != 1 or r.size != 1 or r.high:
        raise NotHandled("shift count must be CL or an immediate")
    b.emit(f"c = regs[{b.k(1)}] & {hex(cmask)}")
    return "c", None


def _counted(b: Builder, i: int) -> tuple[int, str, int | None, str] | None:
    """Read the destination and the count of a shift or rotate.

    Returns ``(size, count expression, constant count or None, destination)``;
    ``None`` when the count is the constant 0, after emitting the whole
    instruction (the operand is still written back, nothing else changes).
    """
    size = b.size(0)
    c, const = _count(b, i, size)
    a = b.let("a", b.read(0))
    if const == 0:
        b.write(0, a)
        b.next_rip()
        return None
    return size, c, const, a


@contextmanager
def _if_counted(b: Builder, const: int | None) -> Iterator[None]:
    """Emit the flag update only for a non-zero count (a CL count of 0 leaves the flags)."""
    if const is None:
        with b.block("if c:"):
            yield
    else:
        yield


def _shift(kind: str) -> Handler:
    """SHL/SAL, SHR, SAR: a count of 0 leaves the flags alone (operand still written)."""

    def handler(b: Builder) -> None:
        counted = _counted(b, 1)
        if counted is None:
            return
        size, c, const, a = counted
        m = mask(size)
        if kind == "shl":
            b.emit(f"r = ({a} << {c}) & {m}")
            base = K_SHL
        elif kind == "shr":
            b.emit(f"r = {a} >> {c}")
            base = K_SHR
        else:
            sg = _sign(size)
            b.emit(f"r = ((({a} ^ {sg}) - {sg}) >> {c}) & {m}")
            base = K_SAR
        b.write(0, "r")
        with _if_counted(b, const):
            b.lazy(base, size, "r", a, c)
        b.next_rip()

    return handler


def _rotate(kind: str) -> Handler:
    """ROL ROR RCL RCR: only CF and OF change (OF defined for a count of 1)."""

    def handler(b: Builder) -> None:
        counted = _counted(b, 1)
        if counted is None:
            return
        size, c, const, a = counted
        n = 8 * size
        m = mask(size)
        through = kind in ("rcl", "rcr")
        modulo = n + 1 if through else n
        if size <= 2 or through:
            b.emit(f"t = {c} % {modulo}")
        else:
            b.emit(f"t = {c}")
        if kind == "rol":
            b.emit(f"r = (({a} << t) | ({a} >> ({n} - t))) & {m}")
            flags = f"(r & 1) | ((((r >> {n - 1}) ^ r) & 1) << 11)"
        elif kind == "ror":
            b.emit(f"r = (({a} >> t) | ({a} << ({n} - t))) & {m}")
            flags = f"((r >> {n - 1}) & 1) | ((((r >> {n - 1}) ^ (r >> {n - 2})) & 1) << 11)"
        else:
            wide = hex((1 << (n + 1)) - 1)
            b.emit("p = cpu.lf", f"v = {a} | (carry(p) << {n})")
            if kind == "rcl":
                b.emit(f"v = ((v << t) | (v >> ({n + 1} - t))) & {wide}")
            else:
                b.emit(f"v = ((v >> t) | (v << ({n + 1} - t))) & {wide}")
            b.emit(f"r = v & {m}")
            flags = f"(v >> {n}) | (((({a} ^ r) >> {n - 1}) & 1) << 11)"
        b.write(0, "r")
        update = f"cpu.lf = ({b.k(K_FLAGS)}, (flags_of(cpu.lf) & 0xfffff7fe) | {flags}, 0, 0)"
        with _if_counted(b, const):
            b.emit(update)
        b.next_rip()

    return handler


def _double_shift(left: bool) -> Handler:
    """SHLD/SHRD r/m, reg, imm8/CL (16-bit counts above 16 give QEMU's undefined result)."""

    def handler(b: Builder) -> None:
        counted = _counted(b, 2)
        if counted is None:
            return
        size, c, const, a = counted
        n = 8 * size
        m = mask(size)
        s = b.let("s", b.read(1))
        if left:
            b.emit(f"r = ((({a} << {2 * n}) | ({s} << {n}) | {a}) << {c} >> {2 * n}) & {m}")
        else:
            b.emit(f"r = ((({a} << {2 * n}) | ({s} << {n}) | {a}) >> {c}) & {m}")
        b.write(0, "r")
        base = K_SHL if left else K_SHR
        with _if_counted(b, const):
            b.lazy(base, size, "r", a, c)
        b.next_rip()

    return handler


# --- multiply and divide ----------------------------------------------------------------

_ACC = {1: RegRef(0, 1, False), 2: RegRef(0, 2, False), 4: RegRef(0, 4, False),
        8: RegRef(0, 8, False)}
_DXR = {2: RegRef(2, 2, False), 4: RegRef(2, 4, False), 8: RegRef(2, 8, False)}


def _mul_wide(signed: bool) -> Handler:
    """MUL r/m and one-operand IMUL r/m: AX / DX:AX / EDX:EAX / RDX:RAX = acc * src."""

    def handler(b: Builder) -> None:
        size = b.size(0)
        n = 8 * size
        m = mask(size)
        s = b.let("s", b.read(0))
        acc = b.let("x", b.read_reg(_ACC[size]))
        if signed:
            sg = _sign(size)
            b.emit(f"p = (({acc} ^ {sg}) - {sg}) * (({s} ^ {sg}) - {sg})",
                   f"lo = p & {m}",
                   f"hi = (p >> {n}) & {m}",
                   f"of = 1 if p != (lo ^ {sg}) - {sg} else 0")
        else:
            b.emit(f"p = {acc} * {s}", f"lo = p & {m}", f"hi = p >> {n}",
                   "of = 1 if hi else 0")
        if size == 1:
            b.write_reg(_ACC[2], "((hi << 8) | lo)")
        else:
            b.write_reg(_ACC[size], "lo")
            b.write_reg(_DXR[size], "hi")
        b.lazy(K_MUL, size, "lo", "of", "0")
        b.next_rip()

    return handler


def _imul(b: Builder) -> None:
    """IMUL: one operand (wide), two operands (reg *= r/m) or three (reg = r/m * imm)."""
    count = b.instr.op_count
    if count == 1:
        _mul_wide(True)(b)
        return
    size = b.size(0)
    if count == 2:
        a = b.let("a", b.read(0))
        s = b.let("s", b.read(1))
    else:
        a = b.let("a", b.read(1))
        s = b.read(2, size)
    b.emit(f"r = ({a} * {s}) & {mask(size)}")
    b.write(0, "r")
    b.lazy(K_IMUL, size, "r", a, s)
    b.next_rip()


def _div(signed: bool) -> Handler:
    """DIV/IDIV r/m: #DE on a zero divisor or a quotient that does not fit; flags unchanged."""

    def handler(b: Builder) -> None:
        size = b.size(0)
        n = 8 * size
        m = mask(size)
        s = b.let("s", b.read(0))
        if size == 1:
            b.emit(f"x = {b.read_reg(_ACC[2])}")
        else:
            lo = b.read_reg(_ACC[size])
            hi = b.read_reg(_DXR[size])
            b.emit(f"x = ({hi} << {n}) | {lo}")
        if signed:
            sg = _sign(size)
            wsg = hex(1 << (2 * n - 1))
            b.emit(f"d = ({s} ^ {sg}) - {sg}",
                   f"x = (x ^ {wsg}) - {wsg}")
            with b.block("if not d:"):
                b.emit(f"raise GuestFault({DE})")
            b.emit("q = abs(x) // abs(d)")
            with b.block("if (x < 0) != (d < 0):"):
                b.emit("q = -q")
            b.emit("rm = x - q * d")
            with b.block(f"if not -{sg} <= q < {sg}:"):
                b.emit(f"raise GuestFault({DE})")
            b.emit(f"q &= {m}", f"rm &= {m}")
        else:
            with b.block(f"if not {s}:"):
                b.emit(f"raise GuestFault({DE})")
            b.emit(f"q, rm = divmod(x, {s})")
            with b.block(f"if q > {m}:"):
                b.emit(f"raise GuestFault({DE})")
        if size == 1:
            b.write_reg(_ACC[2], "((rm << 8) | q)")
        else:
            b.write_reg(_ACC[size], "q")
            b.write_reg(_DXR[size], "rm")
        b.next_rip()

    return handler


# --- bit test / scan ----------------------------------------------------------------------

def _bittest(op: str) -> Handler:
    """BT BTS BTR BTC: CF = selected bit; a register offset on memory addresses
    ``ea + (offset >> log2(bits)) * bytes`` with the offset signed, as on x86."""

    def handler(b: Builder) -> None:
        size = b.size(0)
        n = 8 * size
        m = mask(size)
        if b.is_mem(0) and b.is_reg(1):
            sg = _sign(size)
            off = b.read(1)
            b.emit(f"o = ({off} ^ {sg}) - {sg}")
            ea = b.ea()
            shift = {2: 4, 4: 5, 8: 6}[size]
            lb = {2: 1, 4: 2, 8: 3}[size]
            b.emit(f"ad = ({ea} + ((o >> {shift}) << {lb})) & {hex(M64)}",
                   f"bit = o & {n - 1}", f"a = mem.read(ad, {size})")
            a = "a"

            def store(value: str) -> None:
                b.emit(f"mem.write(ad, {size}, {value})")
        else:
            if b.is_imm(1):
                bit = b.k(b.imm(1, 1) & (n - 1))
                b.emit(f"bit = {bit}")
            else:
                b.emit(f"bit = {b.read(1)} & {n - 1}")
            a = b.let("a", b.read(0))

            def store(value: str) -> None:
                b.write(0, value)
        if op == "bts":
            b.emit(f"r = {a} | (1 << bit)")
        elif op == "btr":
            b.emit(f"r = {a} & ~(1 << bit) & {m}")
        elif op == "btc":
            b.emit(f"r = {a} ^ (1 << bit)")
        if op != "bt":
            store("r")
        b.emit(f"cpu.lf = ({b.k(K_FLAGS)}, (flags_of(cpu.lf) & 0xffe) | (({a} >> bit) & 1), 0, 0)")
        b.next_rip()

    return handler


def _bitscan(op: str) -> Handler:
    """BSF BSR (zero source: ZF=1, destination unchanged), TZCNT LZCNT POPCNT."""

    def handler(b: Builder) -> None:
        size = b.size(0)
        n = 8 * size
        s = b.let("s", b.read(1))
        dst = b.reg(0)
        if op in ("bsf", "bsr"):
            with b.block(f"if {s}:"):
                expr = f"({s} & -{s}).bit_length() - 1" if op == "bsf" else f"{s}.bit_length() - 1"
                b.write_reg(dst, f"({expr})")
            b.lazy(K_LOGIC, size, s, "0", "0")
        elif op == "popcnt":
            b.write_reg(dst, f"{s}.bit_count()")
            b.emit(f"cpu.lf = ({b.k(K_FLAGS)}, 0 if {s} else 0x40, 0, 0)")
        else:
            if op == "tzcnt":
                b.emit(f"r = ({s} & -{s}).bit_length() - 1 if {s} else {n}")
            else:
                b.emit(f"r = {n} - {s}.bit_length()")
            b.write_reg(dst, "r")
            b.emit(f"cpu.lf = ({b.k(K_FLAGS)}, (0 if {s} else 1) | (0 if r else 0x40), 0, 0)")
        b.next_rip()

    return handler


HANDLERS: dict[int, Handler] = {
    _M.ADD: _binary("add"),
    _M.ADC: _binary("adc"),
    _M.SUB: _binary("sub"),
    _M.SBB: _binary("sbb"),
    _M.AND: _binary("and"),
    _M.OR: _binary("or"),
    _M.XOR: _binary("xor"),
    _M.CMP: _binary("cmp"),
    _M.TEST: _binary("test"),
    _M.INC: _incdec(True),
    _M.DEC: _incdec(False),
    _M.NEG: _neg,
    _M.NOT: _not,
    _M.SHL: _shift("shl"),
    _M.SAL: _shift("shl"),
    _M.SHR: _shift("shr"),
    _M.SAR: _shift("sar"),
    _M.ROL: _rotate("rol"),
    _M.ROR: _rotate("ror"),
    _M.RCL: _rotate("rcl"),
    _M.RCR: _rotate("rcr"),
    _M.SHLD: _double_shift(True),
    _M.SHRD: _double_shift(False),
    _M.MUL: _mul_wide(False),
    _M.IMUL: _imul,
    _M.DIV: _div(False),
    _M.IDIV: _div(True),
    _M.BT: _bittest("bt"),
    _M.BTS: _bittest("bts"),
    _M.BTR: _bittest("btr"),
    _M.BTC: _bittest("btc"),
    _M.BSF: _bitscan("bsf"),
    _M.BSR: _bitscan("bsr"),
    _M.TZCNT: _bitscan("tzcnt"),
    _M.LZCNT: _bitscan("lzcnt"),
    _M.POPCNT: _bitscan("popcnt"),
}
"""iced-x86 ``Mnemonic`` -> handler."""
