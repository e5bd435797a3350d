"""Lazy arithmetic flags.

An instruction that sets flags stores one tuple ``cpu.lf = (kind, res, a, b)``
instead of computing CF/PF/AF/ZF/SF/OF: ``kind`` names the operation and operand
size (``base + size_index``, size_index 0..3 for 8/16/32/64 bits), ``res`` the
result masked to the operand size, ``a``/``b`` the operands.  The flags are
computed only when something reads them (Jcc, SETcc, CMOVcc, ADC, PUSHF ...).
This is the same idea as QEMU's ``cc_op`` and Bochs' lazy flags, and the single
biggest speed win of the interpreter.

``kind == K_FLAGS`` (0) means "materialised": ``res`` holds the six arithmetic
flag bits in their RFLAGS positions.  Every other kind computes ZF as
``res == 0``, which lets JE/JNE test it inline.  INC/DEC leave CF alone, so their
tuple's ``b`` is the *previous* tuple (never itself an INC/DEC tuple, so the
chain is at most one deep).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = [
    "AF",
    "ARITH_MASK",
    "CF",
    "DF",
    "K_ADC",
    "K_ADD",
    "K_DEC",
    "K_FLAGS",
    "K_IMUL",
    "K_INC",
    "K_LOGIC",
    "K_MUL",
    "K_SAR",
    "K_SBB",
    "K_SHL",
    "K_SHR",
    "K_SUB",
    "OF",
    "PARITY",
    "PF",
    "SF",
    "SIZE_INDEX",
    "ZF",
    "LazyFlags",
    "carry",
    "cond_fn",
    "flags_of",
    "with_flags",
]

LazyFlags = tuple[int, int, Any, Any]
"""``(kind, res, a, b)``; see the module docstring."""

CF = 0x001
PF = 0x004
AF = 0x010
ZF = 0x040
SF = 0x080
DF = 0x400
OF = 0x800
ARITH_MASK = CF | PF | AF | ZF | SF | OF

K_FLAGS = 0
K_ADD = 4
K_ADC = 8  # ADC with carry-in 1 (carry-in 0 is recorded as K_ADD)
K_SUB = 12
K_SBB = 16  # SBB with borrow-in 1
K_LOGIC = 20
K_SHL = 24  # (res, a, count); also SHLD
K_SHR = 28  # (res, a, count)
K_SAR = 32  # (res, a, count)
K_MUL = 36  # (res, cf_and_of, _) for MUL and one-operand IMUL
K_IMUL = 40  # (res, a, b): two/three-operand IMUL, CF=OF computed from a*b
K_INC = 44  # (res, a, previous_tuple); INC/DEC are the highest kinds on purpose
K_DEC = 48
_N_KINDS = 52

SIZE_INDEX = {1: 0, 2: 1, 4: 2, 8: 3}
"""Operand size in bytes -> the value added to a ``K_*`` base."""

PARITY = tuple(PF if bin(i).count("1") % 2 == 0 else 0 for i in range(256))
"""``PARITY[byte]`` is PF (4) when the byte has an even number of set bits."""

_FlagFn = Callable[[int, Any, Any], int]


def _sized(bits: int) -> dict[int, _FlagFn]:
    """Build the flag functions of every kind for one operand size."""
    sb = bits - 1
    sign = 1 << sb
    par = PARITY

    def szp(r: int) -> int:
        return par[r & 0xFF] | (ZF if r == 0 else 0) | (((r >> sb) & 1) << 7)

    def f_add(r: int, a: int, b: int) -> int:
        return (szp(r) | (r < a) | ((a ^ b ^ r) & AF)
                | ((((a ^ r) & (b ^ r)) >> sb & 1) << 11))

    def f_adc(r: int, a: int, b: int) -> int:
        return (szp(r) | (r <= a) | ((a ^ b ^ r) & AF)
                | ((((a ^ r) & (b ^ r)) >> sb & 1) << 11))

    def f_sub(r: int, a: int, b: int) -> int:
        return (szp(r) | (a < b) | ((a ^ b ^ r) & AF)
                | ((((a ^ b) & (a ^ r)) >> sb & 1) << 11))

    def f_sbb(r: int, a: int, b: int) -> int:
        return (szp(r) | (a <= b) | ((a ^ b ^ r) & AF)
                | ((((a ^ b) & (a ^ r)) >> sb & 1) << 11))

    def f_logic(r: int, a: Any, b: Any) -> int:
        return szp(r)

    def f_shl(r: int, a: int, c: int) -> int:
        cf = (a >> (bits - c)) & 1 if c <= bits else 0
        return szp(r) | cf | ((((r >> sb) & 1) ^ cf) << 11)

    def f_shr(r: int, a: int, c: int) -> int:
        t = a >> (c - 1)
        return szp(r) | (t & 1) | ((((t ^ r) >> sb) & 1) << 11)

    def f_sar(r: int, a: int, c: int) -> int:
        return szp(r) | ((((a ^ sign) - sign) >> (c - 1)) & 1)

    def f_mul(r: int, cf: int, _b: Any) -> int:
        return szp(r) | (CF | OF if cf else 0)

    def f_imul(r: int, a: int, b: int) -> int:
        full = ((a ^ sign) - sign) * ((b ^ sign) - sign)
        return szp(r) | (CF | OF if full != (r ^ sign) - sign else 0)

    def f_inc(r: int, a: int, prev: LazyFlags) -> int:
        return (szp(r) | (flags_of(prev) & CF) | ((a ^ r) & AF)
                | (OF if r == sign else 0))

    def f_dec(r: int, a: int, prev: LazyFlags) -> int:
        return (szp(r) | (flags_of(prev) & CF) | ((a ^ r) & AF)
                | (OF if a == sign else 0))

    return {K_ADD: f_add, K_ADC: f_adc, K_SUB: f_sub, K_SBB: f_sbb, K_LOGIC: f_logic,
            K_SHL: f_shl, K_SHR: f_shr, K_SAR: f_sar, K_MUL: f_mul, K_IMUL: f_imul,
            K_INC: f_inc, K_DEC: f_dec}


def _materialised(r: int, _a: Any, _b: Any) -> int:
    return r


def _build_table() -> list[_FlagFn]:
    table: list[_FlagFn] = [_materialised] * _N_KINDS
    for size, idx in SIZE_INDEX.items():
        for base, fn in _sized(size * 8).items():
            table[base + idx] = fn
    return table


_TABLE = _build_table()


def flags_of(lf: LazyFlags) -> int:
    """The six arithmetic flags (RFLAGS bit positions) described by ``lf``."""
    return _TABLE[lf[0]](lf[1], lf[2], lf[3])


def carry(lf: LazyFlags) -> int:
    """CF (0 or 1) of ``lf``, with shortcuts for the common producers."""
    k = lf[0]
    if K_SUB <= k < K_SUB + 4:
        return 1 if lf[2] < lf[3] else 0
    if K_ADD <= k < K_ADD + 4:
        return 1 if lf[1] < lf[2] else 0
    if K_LOGIC <= k < K_LOGIC + 4:
        return 0
    return _TABLE[k](lf[1], lf[2], lf[3]) & CF


def with_flags(lf: LazyFlags, clear: int, set_: int) -> LazyFlags:
    """A materialised tuple: ``lf``'s flags with bits ``clear`` removed and ``set_`` added."""
    return (K_FLAGS, (flags_of(lf) & ~clear) | set_, 0, 0)


# --- conditions (Jcc / SETcc / CMOVcc) ----------------------------------------------
# iced-x86 ConditionCode numbering: O=1 NO=2 B=3 AE=4 E=5 NE=6 BE=7 A=8 S=9 NS=10
# P=11 NP=12 L=13 GE=14 LE=15 G=16.

_SIGN_BY_INDEX = (0x80, 0x8000, 0x80000000, 0x8000000000000000)


def _from_flags(cc: int) -> Callable[[int], bool]:
    tests: dict[int, Callable[[int], bool]] = {
        1: lambda f: bool(f & OF),
        2: lambda f: not f & OF,
        3: lambda f: bool(f & CF),
        4: lambda f: not f & CF,
        5: lambda f: bool(f & ZF),
        6: lambda f: not f & ZF,
        7: lambda f: bool(f & (CF | ZF)),
        8: lambda f: not f & (CF | ZF),
        9: lambda f: bool(f & SF),
        10: lambda f: not f & SF,
        11: lambda f: bool(f & PF),
        12: lambda f: not f & PF,
        13: lambda f: bool(f & SF) != bool(f & OF),
        14: lambda f: bool(f & SF) == bool(f & OF),
        15: lambda f: bool(f & ZF) or bool(f & SF) != bool(f & OF),
        16: lambda f: not f & ZF and bool(f & SF) == bool(f & OF),
    }
    return tests[cc]


def _from_sub(cc: int) -> Callable[[int, int, int], bool] | None:
    """Condition as a direct comparison of CMP/SUB operands (size index ``i``)."""
    tests: dict[int, Callable[[int, int, int], bool]] = {
        3: lambda a, b, i: a < b,
        4: lambda a, b, i: a >= b,
        7: lambda a, b, i: a <= b,
        8: lambda a, b, i: a > b,
        13: lambda a, b, i: a ^ _SIGN_BY_INDEX[i] < b ^ _SIGN_BY_INDEX[i],
        14: lambda a, b, i: a ^ _SIGN_BY_INDEX[i] >= b ^ _SIGN_BY_INDEX[i],
        15: lambda a, b, i: a ^ _SIGN_BY_INDEX[i] <= b ^ _SIGN_BY_INDEX[i],
        16: lambda a, b, i: a ^ _SIGN_BY_INDEX[i] > b ^ _SIGN_BY_INDEX[i],
    }
    return tests.get(cc)


def _make_cond(cc: int) -> Callable[[LazyFlags], bool]:
    table = _TABLE
    by_flags = _from_flags(cc)
    by_sub = _from_sub(cc)
    if cc in (5, 6):
        want_zero = cc == 5

        def zf_cond(lf: LazyFlags) -> bool:
            if lf[0]:
                return (lf[1] == 0) is want_zero
            return bool(lf[1] & ZF) is want_zero

        return zf_cond
    if by_sub is not None:
        sub_test = by_sub

        def sub_cond(lf: LazyFlags) -> bool:
            k = lf[0]
            if K_SUB <= k < K_SUB + 4:
                return sub_test(lf[2], lf[3], k - K_SUB)
            return by_flags(table[k](lf[1], lf[2], lf[3]))

        return sub_cond

    def generic(lf: LazyFlags) -> bool:
        return by_flags(table[lf[0]](lf[1], lf[2], lf[3]))

    return generic


_CONDS = {cc: _make_cond(cc) for cc in range(1, 17)}


def cond_fn(cc: int) -> Callable[[LazyFlags], bool]:
    """The predicate for iced-x86 condition code ``cc`` over a lazy-flags tuple."""
    return _CONDS[cc]
