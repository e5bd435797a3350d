"""The assembler front end: ABI symbols, -D overrides, constant resolution, bad input."""

from __future__ import annotations

import iced_x86
import pytest
from pagetrack.errors import InputError
from pagetrack.program import CODE_BASE, DATA_BASE, assemble, parse_defines


def _disasm(code: bytes) -> list[str]:
    fmt = iced_x86.Formatter(iced_x86.FormatterSyntax.INTEL)
    return [fmt.format(i) for i in iced_x86.Decoder(64, code, ip=CODE_BASE)]


def test_two_symbols_in_one_memory_operand_are_both_applied() -> None:
    # keystone alone drops DATA_BASE here; the front end substitutes numbers first.
    code = assemble("mov qword ptr [DATA_BASE + DATA_SIZE - 4], rax", data_size=1 << 20).code
    assert _disasm(code) == [f"mov [{DATA_BASE + (1 << 20) - 4:X}h],rax"]


def test_define_overrides_equ_and_forward_references_resolve() -> None:
    src = ".equ X, Y*2\n.equ Y, 3\nmov eax, X\nmov ebx, Z\n"
    assert _disasm(assemble(src, defines={"Z": 7}).code) == ["mov eax,6", "mov ebx,7"]
    assert _disasm(assemble(src, defines={"Y": 10, "Z": 1}).code) == ["mov eax,14h", "mov ebx,1"]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("mov dword ptr [rdi], 1 ; (gfn 0x400)", "not an instruction"),
        ("frobnicate rax", "line 1"),
        (".equ A, B + 1\nmov eax, A", "undefined symbol"),
        (".equ A, 1 +\nmov eax, A", "not a constant expression"),
        ("# nothing\n", "no instructions"),
    ],
)
def test_bad_sources_give_one_clear_error(source: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        assemble(source, "bad.s")


def test_parse_defines() -> None:
    assert parse_defines(["N=0x10", "W=2_000"]) == {"N": 16, "W": 2000}
    with pytest.raises(InputError):
        parse_defines(["N"])
    with pytest.raises(InputError):
        parse_defines(["N=abc"])
