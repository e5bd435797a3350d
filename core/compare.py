"""Run one guest program on the simulator and on the host's real KVM, and diff the results.

The verdict compares what both sides must agree on: the data slot's dirty pages
per round and the final registers.  The low slot is shown for information: the
real-KVM run may add its monitor's pages, and which page-table pages a first
access dirties depends on the host MMU (EPT marks the tables the walker reads,
shadow paging does not).
"""

from __future__ import annotations

from typing import Any

from .program import Program

__all__ = ["COUNTER_PAIRS", "compare_program", "diff_rounds"]

#: (simulator counter, KVM stat) pairs shown side by side.
COUNTER_PAIRS = (
    ("kvm.pf_taken", "pf_taken"),
    ("kvm.pf_fixed", "pf_fixed"),
    ("kvm.pf_emulate", "pf_emulate"),
    ("kvm.pf_spurious", "pf_spurious"),
    ("kvm.insn_emulation", "insn_emulation"),
    ("kvm.remote_tlb_flush", "remote_tlb_flush"),
    ("kvm.mmu_shadow_zapped", "mmu_shadow_zapped"),
    ("kvm.mmu_unsync", "mmu_unsync"),
)


def diff_rounds(sim: list[list[int]], real: list[list[int]], ignore: set[int] | None = None) -> list[dict[str, Any]]:
    """Per-round differences: gfns only the simulator or only KVM reported."""
    ignore = ignore or set()
    out = []
    for i in range(max(len(sim), len(real))):
        a = set(sim[i]) if i < len(sim) else set()
        b = set(real[i]) if i < len(real) else set()
        a -= ignore
        b -= ignore
        if a != b or i >= len(sim) or i >= len(real):
            out.append({"round": i, "only_sim": sorted(a - b), "only_kvm": sorted(b - a),
                        "missing_round": "sim" if i >= len(sim) else "kvm" if i >= len(real) else None})
    return out


def compare_program(program: Program, *, mode: str = "bitmap", initially_set: bool = False,
                    tdp: bool = False) -> dict[str, Any]:
    """Run ``program`` on both backends; raises ``KvmUnavailable`` without a usable /dev/kvm."""
    from .kvm import run_on_kvm
    from .runner import run_program

    real = run_on_kvm(program, mode=mode, initially_set=initially_set)
    options: dict[str, Any] = {"dirty_log": {"mode": mode}}
    if initially_set:
        options["dirty_log"]["initially_set"] = True
    sim = run_program(program, tdp=tdp, options=options)
    monitor = set(real.get("monitor_gfns", ()))
    rounds = diff_rounds(sim["rounds"], real["rounds"])
    low = diff_rounds(sim["low_rounds"], real["low_rounds"], ignore=monitor)
    regs = {name: {"sim": sim["regs"].get(name), "kvm": value}
            for name, value in real["regs"].items() if sim["regs"].get(name) != value}
    counters = [{"name": kvm_name, "sim": sim["counters"].get(sim_name), "kvm": real["stats"].get(kvm_name)}
                for sim_name, kvm_name in COUNTER_PAIRS]
    return {
        "program": program.name,
        "mode": mode,
        "initially_set": initially_set,
        "paging": "tdp" if tdp else "shadow",
        "execution": real.get("execution"),
        "exit": {"sim": sim["exit"], "kvm": real["exit"]},
        "rounds": {"sim": len(sim["rounds"]), "kvm": len(real["rounds"])},
        "round_differences": rounds,
        "low_round_differences": low,
        "register_differences": regs,
        "counters": counters,
        "same": not rounds and not regs and sim["exit"] == real["exit"],
    }
