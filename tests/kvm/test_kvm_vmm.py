"""VMM mechanics: ports, exceptions, dirty-ring overflow handling, probing, errors."""

from __future__ import annotations

import re

import pytest
from kvm_helpers import a_pages_rounds, expected, programs_dir, requires_kvm
from pagetrack.program import DATA_GFN, assemble, load_program

pytestmark = pytest.mark.kvm

EXECUTIONS = ["native", "user-mode monitor"]


def test_ioctl_numbers_match_linux_headers():
    from pagetrack.kvm import ioctls as k

    # values printed by a C program including <linux/kvm.h> on x86-64
    assert k.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert k.KVM_GET_DIRTY_LOG == 0x4010AE42
    assert k.KVM_CLEAR_DIRTY_LOG == 0xC018AEC0
    assert k.KVM_ENABLE_CAP == 0x4068AEA3
    assert k.KVM_RESET_DIRTY_RINGS == 0xAEC7
    assert k.KVM_GET_STATS_FD == 0xAECE
    assert k.KVM_GET_REGS == 0x8090AE81
    assert k.KVM_SET_SREGS == 0x4138AE84
    assert k.KVM_SET_CPUID2 == 0x4008AE90
    assert k.KVM_GET_SUPPORTED_CPUID == 0xC008AE05


def test_missing_device_is_a_clear_error(tmp_path):
    from pagetrack.kvm.vm import Kvm, KvmUnavailable

    with pytest.raises(KvmUnavailable, match=r"^cannot open .*nokvm: No such file") as ei:
        Kvm(str(tmp_path / "nokvm"))
    assert "\n" not in str(ei.value)


def test_argument_errors():
    from pagetrack.kvm import run_program
    from pagetrack.kvm.dirty import RingLog

    prog = assemble("hlt")
    with pytest.raises(ValueError, match="initially_set"):
        run_program(prog, "bitmap", initially_set=True)
    with pytest.raises(ValueError, match="unknown dirty-log mode"):
        run_program(prog, "pml")
    with pytest.raises(ValueError, match="execution"):
        run_program(prog, execution="emulated")
    with pytest.raises(ValueError, match="power of two"):
        RingLog(1000)


PORTS = """
    mov eax, 0x12345678
    out 0x20, eax
    mov dx, 0x300
    out dx, al
    out dx, ax
    in al, 0x60
    mov r8, rax
    in eax, dx
    mov r9, rax
    mov rax, 0x1122334455667788
    in ax, dx
    mov r10, rax
    mov eax, 0xdeadbeef
    out LOG_PORT, eax
    out ROUND_PORT, al
    hlt
"""


@requires_kvm
@pytest.mark.parametrize("execution", EXECUTIONS)
def test_ports(execution):
    from pagetrack.kvm import run_program

    r = run_program(assemble(PORTS), execution=execution)
    assert r["exit"] == "hlt"
    assert r["io"] == [0x12345678, 0x78, 0x5678, 0xDEADBEEF]
    assert r["regs"]["r8"] == 0x123456FF  # in al: only al changes
    assert r["regs"]["r9"] == 0xFFFFFFFF  # in eax: zero-extended to rax
    assert r["regs"]["r10"] == 0x112233445566FFFF  # in ax: only ax changes
    assert r["rounds"] == [[], []]
    assert r["execution"] == execution


@requires_kvm
@pytest.mark.parametrize("execution", EXECUTIONS)
@pytest.mark.parametrize(("source", "pattern"), [
    ("mov qword ptr [0], rax", r"guest exception #PF error 0x\w+ at rip 0x100000 .*cr2 0x0"),
    ("ud2", r"guest exception #UD error 0x0 at rip 0x100000"),
    ("xor ecx, ecx\ndiv rcx", r"guest exception #DE"),
])
def test_guest_exceptions_are_reported(execution, source, pattern):
    from pagetrack.kvm import run_program

    r = run_program(assemble(source + "\nhlt"), execution=execution)
    assert r["exit"] is not None
    assert re.match(pattern, r["exit"]), r["exit"]
    assert len(r["rounds"]) == 1


@requires_kvm
def test_exit_budget():
    from pagetrack.kvm import run_on_kvm

    r = run_on_kvm(assemble("again: out 0x20, al\njmp again"), max_exits=50)
    assert r["exit"] == "too many exits (max_exits=50)"
    assert len(r["io"]) in (49, 50)


@requires_kvm
@pytest.mark.parametrize("n", [150, 600, 3000])
def test_ring_full_exits_are_harvested_into_the_round(n):
    """More dirty pages in one round than a 256-entry ring holds: KVM_EXIT_DIRTY_RING_FULL."""
    from pagetrack.kvm import run_on_kvm

    prog = load_program(programs_dir() / "a_pages.s", {"N": n, "PER_ROUND": n})
    r = run_on_kvm(prog, mode="ring", ring_size=256)
    assert r["exit"] == "hlt"
    assert r["rounds"] == a_pages_rounds(N=n, PER_ROUND=n)
    assert r["ring_full_exits"] >= 1


@requires_kvm
def test_ring_larger_than_kvm_allows():
    from pagetrack.kvm import KvmUnavailable, run_on_kvm

    with pytest.raises(KvmUnavailable, match="exceeds"):
        run_on_kvm(assemble("hlt"), mode="ring", ring_size=1 << 30)


@requires_kvm
def test_detect_execution_evidence():
    from pagetrack.kvm import detect_execution

    d = detect_execution()
    assert d["execution"] in ("native", "user-mode monitor")
    native = d["native"]
    emulated = native["insn_emulation"] >= native["probe_instructions"]
    if d["execution"] == "native":
        assert native["dirty_log_ok"] and not emulated
    else:
        assert not native["dirty_log_ok"] or emulated
        assert d["user"]["dirty_log_ok"]
        assert d["user"]["pf_fixed"] >= 3  # the probe's stores took real write faults
    assert d["reason"]


@requires_kvm
@pytest.mark.parametrize("name", ["a_pages", "b_lcg", "c_mixed", "d_reads"])
@pytest.mark.parametrize(("mode", "initially_set"), [("bitmap", False), ("clear", True)])
def test_native_bitmap_cross_check(name, mode, initially_set):
    """Native CPL-0 runs agree too where the bitmap probe passed natively.

    (On a host that emulates supervisor code the bitmap is still right, since every
    emulated store marks its page dirty; the dirty ring is what goes wrong there.)
    """
    from pagetrack.kvm import detect_execution, run_program

    if not detect_execution()["native"]["reprotect_ok"]:
        pytest.skip("native bitmap probe failed on this host")
    r = run_program(load_program(programs_dir() / f"{name}.s"), mode, initially_set,
                    execution="native")
    assert r["exit"] == "hlt"
    assert (r["rounds"], r["io"]) == expected(name, {})


@requires_kvm
def test_stats_and_first_round():
    from pagetrack.kvm import run_on_kvm

    r = run_on_kvm(assemble("mov byte ptr [rdi + 3*4096], 1\nhlt"))
    assert r["rounds"] == [[DATA_GFN + 3]]
    s = r["stats"]
    assert s["exits"] >= 1 and "pages_4k" in s and "remote_tlb_flush" in s


@requires_kvm
def test_triple_fault_is_a_shutdown_exit():
    """An empty IDT makes #UD → #DF → triple fault: KVM_EXIT_SHUTDOWN (CPL 0 only)."""
    from pagetrack.kvm import run_program

    src = "lidt [rip + idtr]\nud2\nidtr:\n.word 0\n.quad 0"
    r = run_program(assemble(src), execution="native")
    assert r["exit"].startswith("shutdown (triple fault)")
    r = run_program(assemble(src), execution="user-mode monitor")
    assert r["exit"] == "guest exception #GP error 0x0 at rip 0x100000 (cpl 3)"


@requires_kvm
def test_reads_of_populated_dirty_pte_pages_show_in_user_mode():
    """Documented quirk behind the code page in round 1 of every user-mode run.

    A CPL-3 read of a low page whose guest PTE has D set and whose host page the
    VMM already wrote gets a writable SPTE, and KVM marks the page dirty when it
    installs it.  Data pages (D clear) never do this, so ``rounds`` is unaffected.
    """
    from pagetrack.kvm import run_program
    from pagetrack.kvm.guest import TSS_BASE

    src = f"out ROUND_PORT, al\nmov rax, qword ptr [0x150000]\nmov rax, qword ptr [{TSS_BASE}]\nhlt"
    r = run_program(assemble(src), execution="user-mode monitor")
    assert r["exit"] == "hlt" and r["rounds"] == [[], []]
    assert TSS_BASE >> 12 in r["low_rounds"][1]
    assert 0x150 not in r["low_rounds"][1]
