"""Random store programs on the simulator and on the real KVM: same rounds, same registers.

Every dirty-log mode the real KVM offers here, under both simulated paging modes.
The low slot is compared too under shadow paging (this host's KVM shadows guest
page tables), leaving out the real-KVM monitor's own pages.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvm_helpers import requires_kvm
from pagetrack.program import assemble
from pagetrack.runner import run_program
from test_kvm_random_stores import SIZE, ops

pytestmark = [requires_kvm, pytest.mark.kvm]

MODES = st.sampled_from(["bitmap", "clear", "clear-initially-set", "ring"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=ops, mode=MODES, tdp=st.booleans())
def test_simulator_matches_real_kvm(program, mode: str, tdp: bool) -> None:
    from pagetrack.kvm import run_on_kvm

    source = "mov rbx, rdi\n" + "\n".join(op.asm for op in program) + "\nhlt"
    prog = assemble(source, "random", data_size=SIZE)
    kvm_mode, initially_set = ("clear", True) if mode == "clear-initially-set" else (mode, False)
    real = run_on_kvm(prog, mode=kvm_mode, initially_set=initially_set)
    sim = run_program(prog, tdp=tdp, options={"dirty_log": {"mode": mode}})
    assert sim["exit"] == real["exit"] == "hlt", source
    assert sim["rounds"] == real["rounds"], source
    assert {k: sim["regs"][k] for k in real["regs"]} == real["regs"], source
    if not tdp:
        monitor = set(real.get("monitor_gfns", ()))
        assert [sorted(set(r) - monitor) for r in real["low_rounds"]] == sim["low_rounds"], source
