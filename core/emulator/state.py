"""Architectural state of one x86-64 vCPU (the part the interpreter touches).

Models the register file KVM keeps in ``struct kvm_vcpu_arch`` (``regs[]``,
``rip``, ``rflags``, ``cr0``/``cr3``/``cr4``, ``efer``) and what
``KVM_GET_REGS`` / ``KVM_GET_SREGS`` report.  Arithmetic flags are lazy (see
:mod:`pagetrack.emulator.flags`); read and write RFLAGS through
:meth:`CpuState.get_rflags` / :meth:`CpuState.set_rflags`.
"""

from __future__ import annotations

from .flags import ARITH_MASK, DF, K_FLAGS, LazyFlags, flags_of

__all__ = ["REG_NAMES", "CpuState"]

REG_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
"""GPR names in encoding order: ``regs[i]`` is ``REG_NAMES[i]``."""

_REG_INDEX = {name: i for i, name in enumerate(REG_NAMES)}
_M64 = 0xFFFFFFFFFFFFFFFF
_IF = 0x200
_FIXED1 = 0x002  # RFLAGS bit 1 always reads as 1
_RESERVED0 = 0x8028  # bits 3, 5 and 15 always read as 0


class CpuState:
    """Registers of one vCPU.

    * ``regs``: 16 unsigned 64-bit GPRs, RAX=0 RCX=1 RDX=2 RBX=3 RSP=4 RBP=5
      RSI=6 RDI=7 R8..R15=8..15;
    * ``rip``; ``lf`` the lazy arithmetic flags; ``df`` the direction flag (0/1);
      ``rflags_rest`` every other RFLAGS bit (IF, bit 1 ...);
    * ``cr0``, ``cr2``, ``cr3``, ``cr4``, ``efer``, ``fs_base``, ``gs_base``: plain
      storage for the vCPU (defaults describe long mode with paging);
    * ``icount``: instructions retired by :func:`pagetrack.emulator.run`.
    """

    __slots__ = ("cr0", "cr2", "cr3", "cr4", "df", "efer", "fs_base", "gs_base", "icount",
                 "lf", "regs", "rflags_rest", "rip")

    def __init__(self, rip: int = 0) -> None:
        self.regs: list[int] = [0] * 16
        self.rip: int = rip
        self.lf: LazyFlags = (K_FLAGS, 0, 0, 0)
        self.df: int = 0
        self.rflags_rest: int = _FIXED1 | _IF
        self.cr0: int = 0x80000011  # PG | ET | PE
        self.cr2: int = 0
        self.cr3: int = 0
        self.cr4: int = 0x20  # PAE
        self.efer: int = 0x500  # LMA | LME
        self.fs_base: int = 0
        self.gs_base: int = 0
        self.icount: int = 0

    def get_rflags(self) -> int:
        """RFLAGS as the guest would see it with PUSHFQ (bit 1 set)."""
        return flags_of(self.lf) | (DF if self.df else 0) | self.rflags_rest

    def set_rflags(self, value: int) -> None:
        """Load RFLAGS (POPFQ / ``KVM_SET_REGS``); bit 1 forced to 1, bits 3/5/15 to 0."""
        self.lf = (K_FLAGS, value & ARITH_MASK, 0, 0)
        self.df = 1 if value & DF else 0
        self.rflags_rest = ((value & ~(ARITH_MASK | DF | _RESERVED0)) | _FIXED1) & 0xFFFFFFFF

    def reg_by_name(self, name: str) -> int:
        """Value of ``rax``..``r15``, ``rip`` or ``rflags`` (case-insensitive)."""
        key = name.lower()
        if key == "rip":
            return self.rip
        if key == "rflags":
            return self.get_rflags()
        try:
            return self.regs[_REG_INDEX[key]]
        except KeyError:
            raise KeyError(f"unknown register {name!r}") from None

    def set_reg_by_name(self, name: str, value: int) -> None:
        """Set ``rax``..``r15``, ``rip`` or ``rflags`` (value masked to 64 bits)."""
        key = name.lower()
        value &= _M64
        if key == "rip":
            self.rip = value
        elif key == "rflags":
            self.set_rflags(value)
        else:
            try:
                self.regs[_REG_INDEX[key]] = value
            except KeyError:
                raise KeyError(f"unknown register {name!r}") from None

    def dump(self) -> dict[str, int]:
        """All GPRs, ``rip`` and ``rflags`` by lower-case name."""
        out = dict(zip(REG_NAMES, self.regs, strict=True))
        out["rip"] = self.rip
        out["rflags"] = self.get_rflags()
        return out

    def copy(self) -> CpuState:
        """An independent copy (tests compare states before and after)."""
        new = CpuState.__new__(CpuState)
        for slot in CpuState.__slots__:
            setattr(new, slot, getattr(self, slot))
        new.regs = list(self.regs)
        return new

    def __eq__(self, other: object) -> bool:
        """Architectural equality: registers, RIP, RFLAGS, control registers, bases."""
        if not isinstance(other, CpuState):
            return NotImplemented
        return all(getattr(self, s) == getattr(other, s) for s in _ARCH_SLOTS) \
            and self.get_rflags() == other.get_rflags()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        regs = " ".join(f"{k}={v:#x}" for k, v in self.dump().items())
        return f"CpuState({regs})"


_ARCH_SLOTS = tuple(s for s in CpuState.__slots__ if s not in ("lf", "icount"))
