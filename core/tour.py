"""The built-in tour: every tracker, one VM, one audit log that is verified at the end.

One shadow-paging VM (the ABI's two memslots, 16 MiB of data, one vCPU, every
entry-point plugin, an external tracker on data pages 0x10-0x11, KVM's
``GET_DIRTY_LOG`` bitmap harvested at every round) runs three sections in turn:

1. ``page tables`` — the built-in ``tour`` guest writes data, edits a
   last-level PTE (unsync + INVLPG re-sync), edits its page directory
   (write-tracked by KVM itself: fault → emulate → ``track_write`` →
   ``shadow_mmu`` zaps the SPTE), stores into the externally tracked pages,
   and puts its mapping back;
2. ``gpu`` — a vGPU is attached to the same VM (``attach_vgpu``, the options
   of :func:`pagetrack.plugins.gvt_shadow_gtt.tour.run_gvt_tour`) and the
   built-in ``gvt_driver`` guest builds, edits and tears down PPGTTs: every
   store to a shadowed GPU page table reaches ``gvt_shadow_gtt`` through
   ``track_write``; the vGPU is detached at the end (the mdev closed);
3. ``dirty log`` — a hot-set trace workload (:mod:`pagetrack.plugins.dirty_log.workloads`)
   dirties the data slot for a few rounds, each harvested by the dirty logger.

:func:`run_tour` returns the run's JSON (rounds, counters, ``sections`` with
per-section counts) and the audit verdict; :mod:`pagetrack.tour_report` prints it.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import orjson

from .audit import verify
from .program import DATA_GFN, DEFAULT_DATA_SIZE, TOUR_TRACKED, builtin_program
from .runner import GuestExit, VmSetup, counters, load_guest, result_of, run_guest, setup_vm

__all__ = ["TOUR_TRACKED", "TOUR_WORKLOAD", "Section", "run_tour"]

#: The dirty-log section's trace: a hot set of 5 % of the pages takes 99 % of the stores.
TOUR_WORKLOAD: dict[str, Any] = {"name": "hotset", "rate": 200_000, "seed": 7, "rounds": 4, "round_seconds": 0.005}
#: What the ``tour`` guest sends to LOG_PORT: old mapping, new mapping, through the alias, after the zap.
TOUR_IO = (1, 4, 4, 2)

#: ``status(text)``: the tour tells a progress display where it is.
Status = Callable[[str], None]


@attrs.define
class Section:
    """One part of the tour and what it cost (deltas of the VM's counters)."""

    name: str
    plugin: str  #: the tracker the section is about
    what: str
    first_round: int = 0
    rounds: int = 0
    first_seq: int = 0  #: audit sequence numbers [first_seq, end_seq) belong to the section
    end_seq: int = 0
    exit: str = "hlt"
    ok: bool = True  #: the section did what it should (transcript, invariant checks)
    detail: dict[str, Any] = attrs.field(factory=dict)
    counters: dict[str, int] = attrs.field(factory=dict)
    notifications: dict[str, int] = attrs.field(factory=dict)  #: track_write calls per plugin


_DELTA_KEYS = ("instructions", "faults", "fast_path_fixes", "emulations", "track_write_calls", "tlb_flushes")


class _Meter:
    """Measures one section: rounds, audit sequence numbers and counter deltas."""

    def __init__(self, env: VmSetup, section: Section) -> None:
        from pagetrack.plugins.dirty_log import logger_of

        self.env = env
        self.section = section
        self.logger = logger_of(env.vm)
        self.before = counters(env)
        section.first_round = len(self.logger.rounds_of(env.data.key))
        section.first_seq = env.vm.audit.next_seq

    def done(self) -> Section:
        s = self.section
        after = counters(self.env)
        s.counters = {k: after[k] - self.before[k] for k in _DELTA_KEYS}
        s.counters["shadow_pages_zapped"] = after["zaps"] - self.before["zaps"]
        s.rounds = len(self.logger.rounds_of(self.env.data.key)) - s.first_round
        s.end_seq = self.env.vm.audit.next_seq
        return s


def _page_tables(env: VmSetup, status: Status) -> tuple[Section, GuestExit]:
    section = Section("page tables", "shadow_mmu", "a guest edits its own page tables under shadow paging")
    meter = _Meter(env, section)
    status("page tables: the guest edits its PTE and page directory")
    run = run_guest(env, max_instructions=1_000_000)
    section.exit = run.exit
    section.ok = run.exit == "hlt" and tuple(run.io) == TOUR_IO
    section.detail = {"io": run.io, "expected_io": list(TOUR_IO),
                      "tracked_gfns": [DATA_GFN + TOUR_TRACKED, DATA_GFN + TOUR_TRACKED + 1],
                      "tracked_writes": env.tracker.writes if env.tracker else 0}
    return meter.done(), run


def _gpu(env: VmSetup, status: Status) -> tuple[Section, GuestExit]:
    from pagetrack.plugins.gvt_shadow_gtt import attach_vgpu, detach_vgpu
    from pagetrack.plugins.gvt_shadow_gtt.tour import EXPECTED_IO, TOUR_OPTIONS

    section = Section("gpu", "gvt_shadow_gtt", "a GPU driver builds and edits PPGTTs under a vGPU")
    meter = _Meter(env, section)
    status("gpu: the guest driver updates PPGTT entries")
    vgpu = attach_vgpu(env.vm, **{k: v for k, v in TOUR_OPTIONS.items() if k != "attach"})
    section.plugin = tracker = f"kvmgt.vgpu{vgpu.id}"
    load_guest(env, builtin_program("gvt_driver", data_size=env.data.npages << 12))
    from pagetrack.plugins.dirty_log import logger_of

    run = run_guest(env, max_instructions=5_000_000, first_round=len(logger_of(env.vm).round_stats))
    stats = vgpu.stats
    detach_vgpu(env.vm)
    section.exit = run.exit
    transcript_ok = tuple(run.io) == EXPECTED_IO
    section.ok = run.exit == "hlt" and transcript_ok and stats.invariant_passed == stats.invariant_checks
    section.detail = {
        "tracker": tracker, "transcript_ok": transcript_ok, "io_values": len(run.io),
        "handled_writes": stats.handled_writes, "shadow_updates": stats.shadow_updates,
        "submits": stats.submits, "invariant_checks": stats.invariant_checks,
        "invariant_checks_passed": stats.invariant_passed, "gpu_stores": stats.gpu_stores,
        "gvt_errors": len(vgpu.log),
    }
    return meter.done(), run


def _dirty_log(env: VmSetup, status: Status) -> Section:
    from pagetrack.plugins.dirty_log import logger_of
    from pagetrack.plugins.dirty_log.workloads import make_workload

    spec = TOUR_WORKLOAD
    section = Section("dirty log", "dirty_log",
                      f"a {spec['name']} trace workload, harvested at every round ({logger_of(env.vm).mode})")
    meter = _Meter(env, section)
    workload = make_workload(spec["name"], spec["rate"], spec["seed"])
    vm, vcpu = env.vm, env.vcpu
    stores = 0
    first = len(logger_of(vm).round_stats)
    for i in range(spec["rounds"]):
        status(f"dirty log: round {i + 1} of {spec['rounds']}")
        stores += workload.run(vm, vcpu, spec["round_seconds"]).stores
        vm.hooks.round_end(vm, vcpu, first + i, i == spec["rounds"] - 1)
    section.detail = {"workload": spec["name"], "rate": spec["rate"], "seed": spec["seed"],
                      "round_seconds": spec["round_seconds"], "stores": stores}
    done = meter.done()
    done.counters["stores"] = stores
    return done


def _from_audit_log(log: Path, sections: list[Section]) -> None:
    """Per section, from its slice of the audit log: ``track_write`` calls per plugin, and zaps.

    ``counters["zaps"]`` is the number of ``zap`` events (SPTEs or shadow pages
    dropped because a guest page table changed, a memslot went ...), which is
    what a reader of the tour wants to see; ``shadow_pages_zapped`` is KVM's
    ``mmu_shadow_zapped`` stat.
    """
    calls = [Counter[str]() for _ in sections]
    zaps = [0] * len(sections)
    with log.open("rb") as f:
        for line in f:
            ev = orjson.loads(line)
            name = ev.get("event")
            if name not in ("track_write_call", "zap"):
                continue
            i = next((i for i, s in enumerate(sections) if s.first_seq <= ev["seq"] < s.end_seq), None)
            if i is None:
                continue
            if name == "zap":
                zaps[i] += 1
            elif ev.get("outcome") == "ok":
                calls[i][ev["plugin"]] += 1
    for s, counts, n in zip(sections, calls, zaps, strict=True):
        s.notifications = dict(sorted(counts.items()))
        s.counters["zaps"] = n


def run_tour(audit_log: str | Path | None = None, status: Status | None = None) -> dict[str, Any]:
    """Run the tour; return the run's JSON plus ``sections`` and the audit verification summary.

    ``status(text)``, if given, hears where the tour is (for a progress display).
    """
    say = status or (lambda text: None)
    if audit_log is None:
        audit_log = Path(tempfile.mkdtemp(prefix="pagetrack-tour-")) / "audit.jsonl"
    audit_log = Path(audit_log)
    program = builtin_program("tour")
    tracked = (DATA_GFN + TOUR_TRACKED, DATA_GFN + TOUR_TRACKED + 1)
    env = setup_vm(DEFAULT_DATA_SIZE, program.code, tdp=False, track=[tracked], audit=audit_log,
                   audit_level="debug")
    try:
        from pagetrack.plugins.dirty_log import logger_of

        logger_of(env.vm).start(env.vm)
        first, run = _page_tables(env, say)
        second, _ = _gpu(env, say)
        third = _dirty_log(env, say)
        sections = [first, second, third]
        result = result_of(env, run)
    finally:
        env.vm.close()
    say("verifying the audit log")
    report = verify(audit_log)
    _from_audit_log(audit_log, sections)
    failed = next((s for s in sections if s.exit != "hlt"), None)
    result["exit"] = "hlt" if failed is None else f"{failed.name}: {failed.exit}"
    result["io"] = first.detail["io"]
    result["sections"] = [attrs.asdict(s) for s in sections]
    plugins: Counter[str] = Counter()
    for s in sections:
        plugins.update(s.notifications)
    result["tour"] = {
        "tracked_gfns": list(range(tracked[0], tracked[1] + 1)),
        "ok": all(s.ok for s in sections) and report.ok,
        "audit_ok": report.ok,
        "audit_events": report.events,
        "audit_problems": [str(p) for p in report.problems[:5]],
        "events": dict(report.counts_by_event),
        "plugins": {k: dict(v) for k, v in report.counts_by_plugin.items()},
        "notifications": dict(sorted(plugins.items())),
    }
    result["audit_log"] = str(audit_log)
    return result
