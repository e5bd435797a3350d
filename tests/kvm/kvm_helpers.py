"""Expected dirty rounds of the example programs (from their comments) and skip logic."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
from pagetrack.program import DATA_BASE, DATA_GFN, build_page_tables

MASK64 = (1 << 64) - 1
LCG_A, LCG_C = 6364136223846793005, 1442695040888963407


def programs_dir() -> Path:
    """../shared/programs next to the checkout (CI lays shared/ beside the clone)."""
    env = os.environ.get("PAGETRACK_PROGRAMS")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        cand = parent.parent / "shared" / "programs"
        if cand.is_dir():
            return cand
    return Path("/work/shared/programs")


@functools.cache
def kvm_skip_reason() -> str | None:
    """None when /dev/kvm can create a VM, else why not."""
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm is absent"
    try:
        from pagetrack.kvm.vm import Kvm, KvmUnavailable, Vm

        kvm = Kvm()
        try:
            Vm(kvm).close()
        finally:
            kvm.close()
    except (KvmUnavailable, OSError) as exc:
        return f"/dev/kvm is not usable: {exc}"
    return None


requires_kvm = pytest.mark.skipif(kvm_skip_reason() is not None, reason=kvm_skip_reason() or "")


def a_pages_rounds(N: int = 64, PER_ROUND: int = 8, FIRST: int = 0) -> list[list[int]]:
    rounds = [[DATA_GFN + FIRST + i for i in range(r * PER_ROUND, min((r + 1) * PER_ROUND, N))]
              for r in range(N // PER_ROUND)]
    rounds.append([DATA_GFN + FIRST + i for i in range((N // PER_ROUND) * PER_ROUND, N)])
    return rounds


def b_lcg(K: int = 8, W: int = 64, SEED: int = 12345, AREA_PAGES: int = 1024,
          AREA_OFF: int = 0) -> tuple[list[list[int]], int]:
    """(rounds, final x) of the LCG program."""
    x = SEED
    rounds = []
    for _ in range(K):
        pages = set()
        for _ in range(W):
            x = (x * LCG_A + LCG_C) & MASK64
            pages.add(DATA_GFN + AREA_OFF + ((x >> 33) & (AREA_PAGES - 1)))
        rounds.append(sorted(pages))
    rounds.append([])
    return rounds, x


def rel(pages: list[list[int]]) -> list[list[int]]:
    return [[DATA_GFN + p for p in r] for r in pages]


C_MIXED = rel([[4, 5, 6, 7], [10, 11, 12, 13], [20, 21, 22, 23, 24], [31, 32, 50, 51], [4, 5],
               [61], []])
D_READS = rel([[], [4], [], [7], []])


def expected(name: str, defines: dict[str, int]) -> tuple[list[list[int]], list[int]]:
    """(rounds, io values) the program's comment promises."""
    if name == "a_pages":
        return a_pages_rounds(**defines), []
    if name == "b_lcg":
        rounds, x = b_lcg(**defines)
        return rounds, [x & 0xFFFFFFFF]
    if name == "c_mixed":
        return C_MIXED, []
    if name == "d_reads":
        return D_READS, []
    raise KeyError(name)


def pt_gfn_map(data_size: int) -> dict[int, int]:
    """Data gfn → gfn of the guest page-table page holding its PTE."""
    layout = build_page_tables(data_size, lambda gpa, v: None)
    return {g: layout.pt_page_of(g << 12) >> 12
            for g in range(DATA_GFN, DATA_GFN + data_size // 4096)}


def expected_pt_rounds(rounds: list[list[int]], data_size: int) -> list[set[int]]:
    """Page-table pages whose PTE D bits the guest's first write to a page sets, per round.

    Data PTEs start with D clear, so the first store to a page (and only that one)
    writes its PTE, which dirties the low-slot page-table page.
    """
    pt = pt_gfn_map(data_size)
    seen: set[int] = set()
    out = []
    for r in rounds:
        new = set(r) - seen
        seen |= new
        out.append({pt[g] for g in new})
    return out


def all_pt_gfns(data_size: int) -> set[int]:
    return set(pt_gfn_map(data_size).values())


assert DATA_BASE >> 12 == DATA_GFN
