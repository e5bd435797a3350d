"""Run a guest program of the ABI on the host's KVM with dirty logging.

The run loop (KVM_RUN and its exits) and the user-mode monitor protocol live here;
ioctls, dirty-log harvesting, stats and guest tables are in sibling modules.

Execution modes:

* ``native`` – the program runs at CPL 0; ``out``/``in``/``hlt`` exit to the VMM
  directly (KVM_EXIT_IO, KVM_EXIT_HLT).
* ``user-mode monitor`` – the program runs at CPL 3 with IOPL 0, so ``out``/``in``/
  ``hlt`` raise #GP; the stub at vector 13 reports to the VMM on ``MON_PORT``, the
  VMM decodes the faulting instruction, performs it, advances the saved RIP, and
  the stub ``iretq``s.  Used on hosts whose KVM emulates supervisor-mode code (some
  nested/paravirtual hosts): emulated stores bypass the MMU write-protection path,
  so a native run's dirty log is wrong there.  :func:`detect_execution` decides.
"""

from __future__ import annotations

import contextlib
import mmap
import struct
import time
from typing import Any

from ..program import (
    CODE_BASE,
    DATA_BASE,
    DATA_GFN,
    LOW_SIZE,
    ROUND_PORT,
    STACK_TOP,
    Program,
)
from . import ioctls as k
from .dirty import DirtyLog, Slot, make_dirty_log
from .guest import (
    GDT_BASE,
    MON_CODE,
    MON_END,
    MON_PORT,
    MON_STACK_TOP,
    setup_low_memory,
    setup_sregs,
)
from .stats import StatsReader
from .vm import GuestMemory, Kvm, KvmUnavailable, Vcpu, Vm

__all__ = ["EXECUTION_MODES", "Machine", "detect_execution", "run_on_kvm"]

NATIVE = "native"
USER = "user-mode monitor"
EXECUTION_MODES = (NATIVE, USER)
LOW_SLOT, DATA_SLOT = 0, 1
_RFLAGS_RF = 1 << 16
MON_FIRST_GFN = GDT_BASE >> 12  # low-slot pages of the monitor: GDT, TSS, IDT, stubs, stack
_EXC_NAMES = {0: "#DE", 1: "#DB", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM", 8: "#DF",
              10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF", 17: "#AC",
              18: "#MC", 19: "#XM", 20: "#VE", 21: "#CP"}


class Machine:
    """One VM with the ABI's two memslots (``low``, ``data``) and one vCPU in long mode."""

    def __init__(self, program: Program, dirty: DirtyLog, user: bool) -> None:
        self.program = program
        self.dirty = dirty
        self.user = user
        self._closers: list[Any] = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        self.kvm = Kvm()
        self._closers.append(self.kvm)
        self.vm = Vm(self.kvm)
        self._closers.append(self.vm)
        self.dirty.enable(self.vm)
        self._closers.append(self.dirty)
        with contextlib.suppress(OSError):  # only VMX needs it (real mode); harmless elsewhere
            self.vm.set_tss_addr(0xFFFBD000)
        size = self.program.data_size
        self.low = GuestMemory(LOW_SIZE)
        self.data = GuestMemory(size)
        self._closers += [self.low, self.data]
        for sid, gpa, mem in ((LOW_SLOT, 0, self.low), (DATA_SLOT, DATA_BASE, self.data)):
            self.vm.set_memory_region(sid, gpa, mem, self.dirty.memslot_flags)
            self.dirty.add_slot(Slot(sid, gpa >> 12, mem.size >> 12))
        layout = setup_low_memory(self.write, self.program.code, size)
        self.vcpu = Vcpu(self.vm)
        self._closers.append(self.vcpu)
        self.vcpu.set_cpuid(self.kvm.supported_cpuid())
        self.dirty.attach(self.vcpu)
        sregs = self.vcpu.get_sregs()
        setup_sregs(sregs, layout.cr3, self.user)
        self.vcpu.set_sregs(sregs)
        regs = k.KvmRegs(rip=CODE_BASE, rsp=STACK_TOP, rdi=DATA_BASE, rsi=size, rflags=0x2)
        self.vcpu.set_regs(regs)
        self.vm_stats = StatsReader(self.vm.stats_fd())
        self.vcpu_stats = StatsReader(self.vcpu.stats_fd())
        self._closers += [self.vm_stats, self.vcpu_stats]

    # guest memory -------------------------------------------------------------
    def _locate(self, gpa: int, n: int) -> tuple[mmap.mmap, int]:
        for base, mem in ((0, self.low), (DATA_BASE, self.data)):
            if base <= gpa and gpa + n <= base + mem.size:
                return mem.map, gpa - base
        raise ValueError(f"gpa range {gpa:#x}+{n} is not inside one memslot")

    def read_upto(self, gpa: int, n: int) -> bytes:
        """Up to ``n`` bytes from ``gpa``, fewer at the end of its memslot."""
        for base, mem in ((0, self.low), (DATA_BASE, self.data)):
            if base <= gpa < base + mem.size:
                off = gpa - base
                return mem.map[off: min(off + n, mem.size)]
        return b""

    def read(self, gpa: int, n: int) -> bytes:
        m, off = self._locate(gpa, n)
        return m[off: off + n]

    def write(self, gpa: int, data: bytes) -> None:
        m, off = self._locate(gpa, len(data))
        m[off: off + len(data)] = data

    def stats(self) -> dict[str, int]:
        """VM and vCPU counters of the binary stats fds, merged (vCPU names win)."""
        out: dict[str, Any] = dict(self.vm_stats.read())
        out.update(self.vcpu_stats.read())
        return out

    def close(self) -> None:
        for c in reversed(self._closers):
            c.close()
        self._closers.clear()


class _Run:
    """State of one program run: rounds, io values, exit string."""

    def __init__(self, m: Machine, max_exits: int) -> None:
        self.m = m
        self.max_exits = max_exits
        self.rounds: list[list[int]] = []
        self.low_rounds: list[list[int]] = []
        self._cur: dict[int, set[int]] = {LOW_SLOT: set(), DATA_SLOT: set()}
        self.io: list[int] = []
        self.exit: str | None = None
        self.user_regs: dict[str, int] | None = None
        self.exits = 0
        self.ring_full_exits = 0
        self.stuck_full = 0

    def collect(self) -> int:
        """Harvest into the current round; returns how many gfns came back."""
        n = 0
        for sid, gfns in self.m.dirty.harvest().items():
            self._cur.setdefault(sid, set()).update(gfns)
            n += len(gfns)
        return n

    def close_round(self) -> None:
        self.collect()
        self.rounds.append(sorted(self._cur[DATA_SLOT]))
        self.low_rounds.append(sorted(self._cur[LOW_SLOT]))
        self._cur = {LOW_SLOT: set(), DATA_SLOT: set()}

    def port_io(self, port: int, out: bool, size: int, values: list[int]) -> list[int]:
        """The ABI's port semantics; returns the values an ``in`` reads (all ones)."""
        if out:
            if port == ROUND_PORT:
                self.close_round()
            else:
                self.io.extend(values)
            return []
        return [(1 << (8 * size)) - 1] * len(values)

    def loop(self) -> None:
        vcpu = self.m.vcpu
        while self.exit is None:
            if self.exits >= self.max_exits:
                self.exit = f"too many exits (max_exits={self.max_exits})"
                break
            reason = vcpu.run_once()
            self.exits += 1
            if reason == k.KVM_EXIT_IO:
                self._on_io()
            elif reason == k.KVM_EXIT_HLT:
                self.exit = "hlt"
            elif reason == k.KVM_EXIT_DIRTY_RING_FULL:
                self.ring_full_exits += 1
                if not self.collect():
                    self.stuck_full += 1
                    if self.stuck_full >= 2:
                        self.exit = "dirty ring full but nothing to harvest (ring overflowed?)"
                else:
                    self.stuck_full = 0
            elif reason == k.KVM_EXIT_INTR:
                continue
            else:
                self.exit = self._describe_exit(reason)
        self.close_round()

    def _describe_exit(self, reason: int) -> str:
        vcpu = self.m.vcpu
        rip = vcpu.get_regs().rip
        name = k.EXIT_NAMES.get(reason, str(reason))
        if reason == k.KVM_EXIT_SHUTDOWN:
            return f"shutdown (triple fault) at rip {rip:#x}"
        if reason == k.KVM_EXIT_INTERNAL_ERROR:
            ie = vcpu.internal
            sub = k.INTERNAL_ERROR_NAMES.get(ie.suberror, str(ie.suberror))
            data = " ".join(f"{ie.data[i]:#x}" for i in range(min(ie.ndata, 16)))
            return f"internal error {sub} at rip {rip:#x}" + (f" data {data}" if data else "")
        if reason == k.KVM_EXIT_FAIL_ENTRY:
            fe = vcpu.fail_entry
            return f"fail entry: hardware reason {fe.hardware_entry_failure_reason:#x} on cpu {fe.cpu}"
        if reason == k.KVM_EXIT_MMIO:
            return f"mmio access outside memory at rip {rip:#x}"
        return f"unexpected exit {name} at rip {rip:#x}"

    def _on_io(self) -> None:
        vcpu = self.m.vcpu
        io = vcpu.io
        port, size, count, out = int(io.port), int(io.size), int(io.count), io.direction == k.KVM_EXIT_IO_OUT
        if out and port == MON_PORT:
            regs = vcpu.get_regs()
            if MON_CODE <= regs.rip < MON_END:
                self._on_monitor(regs)
                return
        buf = vcpu.io_data()
        fmt = "<" + {1: "B", 2: "H", 4: "I"}[size] * count
        values = list(struct.unpack(fmt, buf)) if out else [0] * count
        result = self.port_io(port, out, size, values)
        if not out:
            buf[:] = struct.pack(fmt, *result)

    def _on_monitor(self, regs: k.KvmRegs) -> None:
        """An exception reached the stubs; forward OUT/IN/HLT from CPL 3, else stop."""
        m = self.m
        try:
            frame = m.read(regs.rsp, 56)
        except ValueError:
            self.exit = f"guest exception with its frame outside memory (rsp {regs.rsp:#x})"
            return
        vector, err, rip, cs, rflags, rsp, _ss = struct.unpack("<7Q", frame)
        if vector == 13 and cs & 3 == 3 and err == 0:
            decoded = _decode_port_insn(m.read_upto(rip, 16))
            if decoded is not None:
                kind, length, port, size = decoded
                if port == -1:
                    port = regs.rdx & 0xFFFF
                if kind == "hlt":  # KVM_EXIT_HLT leaves RIP after the HLT; do the same
                    self.exit = "hlt"
                    self.user_regs = _user_view(regs, rip + length, rflags, rsp)
                    return
                mask = (1 << (8 * size)) - 1
                result = self.port_io(port, kind == "out", size, [regs.rax & mask])
                if kind == "in":
                    regs.rax = result[0] if size == 4 else (regs.rax & ~mask) | result[0]
                    m.vcpu.set_regs(regs)
                m.write(regs.rsp + 16, struct.pack("<Q", rip + length))
                return
        name = _EXC_NAMES.get(vector, f"vector {vector}")
        extra = ""
        if vector == 14:
            extra = f" cr2 {m.vcpu.get_sregs().cr2:#x}"
        self.exit = f"guest exception {name} error {err:#x} at rip {rip:#x} (cpl {cs & 3}){extra}"
        self.user_regs = _user_view(regs, rip, rflags, rsp)


def _user_view(regs: k.KvmRegs, rip: int, rflags: int, rsp: int) -> dict[str, int]:
    """The CPL-3 program's registers: GPRs as the stubs left them, RIP/RFLAGS/RSP from
    the exception frame (RF, which the CPU sets in a fault's saved RFLAGS, dropped)."""
    out = {n: int(getattr(regs, n)) for n in k.REG_NAMES}
    out.update(rip=rip, rflags=rflags & ~_RFLAGS_RF, rsp=rsp)
    return out


def _decode_port_insn(code: bytes) -> tuple[str, int, int, int] | None:
    """Decode IN/OUT/HLT at ``code``: (kind, length, port or -1 for DX, operand size)."""
    i, opsize = 0, 4
    while i < len(code) and (code[i] == 0x66 or 0x40 <= code[i] <= 0x4F):
        if code[i] == 0x66:
            opsize = 2
        i += 1
    if i >= len(code):
        return None
    op = code[i]
    if op == 0xF4:
        return ("hlt", i + 1, 0, 0)
    if op in (0xE4, 0xE5, 0xE6, 0xE7) and i + 1 < len(code):
        return ("in" if op < 0xE6 else "out", i + 2, code[i + 1], 1 if op % 2 == 0 else opsize)
    if op in (0xEC, 0xED, 0xEE, 0xEF):
        return ("in" if op < 0xEE else "out", i + 1, -1, 1 if op % 2 == 0 else opsize)
    return None


def run_program(program: Program, mode: str = "bitmap", initially_set: bool = False,
                ring_size: int = 4096, max_exits: int = 1_000_000,
                execution: str = NATIVE, dirty_log: DirtyLog | None = None) -> dict[str, Any]:
    """Run ``program`` once in the given execution mode (no probing).

    ``dirty_log`` replaces the harvester built from ``mode`` (benchmarks use it to time
    the ioctls); ``mode`` is then only reported.
    """
    if execution not in EXECUTION_MODES:
        raise ValueError(f"execution must be one of {EXECUTION_MODES}, not {execution!r}")
    if initially_set and mode != "clear":
        raise ValueError("initially_set applies to mode='clear' only")
    dirty = dirty_log or make_dirty_log(mode, initially_set, ring_size)
    m = Machine(program, dirty, user=execution == USER)
    try:
        r = _Run(m, max_exits)
        dirty.start()
        t0 = time.perf_counter()
        r.loop()
        elapsed = time.perf_counter() - t0
        regs = r.user_regs or {n: int(getattr(m.vcpu.get_regs(), n)) for n in k.REG_NAMES}
        stats = m.stats()
    finally:
        m.close()
    result: dict[str, Any] = {
        "rounds": r.rounds,
        "low_rounds": r.low_rounds,
        "exit": r.exit,
        "io": r.io,
        "regs": regs,
        "stats": stats,
        "execution": execution,
        "monitor_gfns": list(range(MON_FIRST_GFN, MON_STACK_TOP >> 12)),
        "mode": mode,
        "initially_set": initially_set,
        "vmm_exits": r.exits,
        "seconds": elapsed,
    }
    if mode == "ring":
        result["ring_full_exits"] = r.ring_full_exits
        result["ring_size"] = ring_size
    return result


# Probe 1 (bitmap): store to data page 0, round; store to page 0 again (re-protected
# by the harvest) and to page 1, round; hlt.  Expected rounds {0}, {0, 1}, {}.
_PROBE_REPROTECT = bytes.fromhex("c60701" "e610" "c60702" "c6870010000003" "e610" "f4")
_PROBE_REPROTECT_ROUNDS = [[DATA_GFN], [DATA_GFN, DATA_GFN + 1], []]
_PROBE_REPROTECT_INSNS = 6
# Probe 2 (ring of 256 entries, the smallest KVM takes): one store to each of 250
# pages in one round, more than the ring's soft limit, so KVM must exit with
# KVM_EXIT_DIRTY_RING_FULL in between.  mov ecx, 250 / 1: mov byte [rdi], 1 /
# add rdi, 4096 / dec ecx / jnz 1b / out 0x10, al / hlt.
_RING_PAGES, _RING_ENTRIES = 250, 256
_PROBE_RING = bytes.fromhex("b9fa000000" "c60701" "4881c700100000" "ffc9" "75f2" "e610" "f4")
_PROBE_RING_ROUNDS = [list(range(DATA_GFN, DATA_GFN + _RING_PAGES)), []]
_detected: dict[str, Any] | None = None


def _probe(execution: str) -> dict[str, Any]:
    """Run both probes in ``execution`` mode; summarise what KVM did."""
    a = run_program(Program(_PROBE_REPROTECT, "probe-reprotect", 2 << 20), "bitmap",
                    execution=execution, max_exits=100)
    b = run_program(Program(_PROBE_RING, "probe-ring", 2 << 20), "ring",
                    ring_size=_RING_ENTRIES, execution=execution, max_exits=100)
    ok_a = a["exit"] == "hlt" and a["rounds"] == _PROBE_REPROTECT_ROUNDS
    ok_b = b["exit"] == "hlt" and b["rounds"] == _PROBE_RING_ROUNDS
    return {
        "reprotect_ok": ok_a,
        "reprotect_rounds": a["rounds"],
        "reprotect_exit": a["exit"],
        "insn_emulation": a["stats"].get("insn_emulation"),
        "probe_instructions": _PROBE_REPROTECT_INSNS,
        "pf_taken": a["stats"].get("pf_taken"),
        "pf_fixed": a["stats"].get("pf_fixed"),
        "ring_ok": ok_b,
        "ring_pages_written": _RING_PAGES,
        "ring_pages_reported": len(b["rounds"][0]) if b["rounds"] else 0,
        "ring_full_exits": b["ring_full_exits"],
        "ring_exit": b["exit"],
        "dirty_log_ok": ok_a and ok_b,
    }


def detect_execution(force: bool = False) -> dict[str, Any]:
    """Decide how guest programs must run on this host; cached for the process.

    Runs two tiny probes natively (CPL 0): KVM_GET_DIRTY_LOG must report a page
    stored to again after the previous GET re-protected it, and a 256-entry dirty
    ring must report all 250 pages of a round that overflows its soft limit (via
    KVM_EXIT_DIRTY_RING_FULL).  It also reads ``insn_emulation`` from the vCPU stats
    fd: if KVM emulated every probe instruction, supervisor code is not run natively
    here and stores bypass the MMU's write-protection path.  Either sign means the
    user-mode monitor is used, provided its own probes pass.  Returns
    ``{"execution": ..., "reason": ..., "native": {...}, "user": {...}}``.
    """
    global _detected
    if _detected is not None and not force:
        return _detected
    native = _probe(NATIVE)
    emulated = (native["insn_emulation"] or 0) >= _PROBE_REPROTECT_INSNS
    out: dict[str, Any] = {"native": native}
    if native["dirty_log_ok"] and not emulated:
        out.update(execution=NATIVE, reason="native probes correct and executed by the CPU")
    else:
        user = _probe(USER)
        out["user"] = user
        why = []
        if not native["dirty_log_ok"]:
            why.append("native dirty log wrong")
        if emulated:
            why.append(f"KVM emulated {native['insn_emulation']} of {_PROBE_REPROTECT_INSNS} "
                       "native probe instructions")
        if user["dirty_log_ok"]:
            out.update(execution=USER, reason="; ".join(why))
        elif native["dirty_log_ok"]:
            out.update(execution=NATIVE, reason="; ".join(why) + "; user-mode probes failed too")
        else:
            raise KvmUnavailable(f"dirty logging is wrong natively ({native}) and in user mode ({user})")
    _detected = out
    return out


def run_on_kvm(program: Program, mode: str = "bitmap", initially_set: bool = False,
               ring_size: int = 4096, max_exits: int = 1_000_000,
               execution: str | None = None) -> dict[str, Any]:
    """Run ``program`` on /dev/kvm with dirty logging; the simulator's JSON-able result.

    ``mode``: ``bitmap`` (KVM_GET_DIRTY_LOG), ``clear`` (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    ``initially_set`` for KVM_DIRTY_LOG_INITIALLY_SET) or ``ring`` (dirty ring of
    ``ring_size`` entries).  ``execution`` None probes the host (:func:`detect_execution`).
    Raises :class:`KvmUnavailable` when /dev/kvm cannot be used.
    """
    if execution is None:
        execution = detect_execution()["execution"]
    return run_program(program, mode, initially_set, ring_size, max_exits, execution)
