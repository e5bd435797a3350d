"""A pre-copy live-migration model, as QEMU's RAM migration does it (spec kvm-dirty-log.md §4).

The source side of QEMU's migration thread, on the simulated VM:

* ``ram_save_setup``: every page of every dirty-logged memslot is pending (the
  migration bitmap starts all-ones) and one initial ``migration_bitmap_sync``.
* ``ram_save_iterate``: one round sends every pending page; the transfer takes
  ``bytes / bandwidth`` seconds, and the guest keeps running meanwhile — the
  workload runs for that much guest time, times ``1 − throttle``.
* ``migration_bitmap_sync``: after each round, ``KVM_GET_DIRTY_LOG`` on every
  logged slot (the dirty logger's ``harvest``); the pages found dirty are the
  next round's pending pages.  Once a rate period of more than 1 s has passed,
  ``migration_trigger_throttle`` runs (auto-converge, :class:`AutoConverge`).
* ``migration_iteration_run``: when the pending bytes are zero or below
  ``bandwidth × downtime_limit`` (spec §7 case 45) the source stops the guest
  and ``migration_completion`` sends the rest after a final sync; the expected
  downtime is ``pending / bandwidth``.

The bandwidth is given, not measured, and pages are sent whole (no zero-page
or compression savings).  Rounds and time are bounded by ``max_rounds`` and
``max_time`` (QEMU itself iterates until cancelled).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from pagetrack.errors import InputError

from . import logger_of
from .workloads import ProgramWorkload, Workload

__all__ = [
    "CPU_THROTTLE_PCT_MAX",
    "CPU_THROTTLE_PCT_MIN",
    "DEFAULT_DOWNTIME_LIMIT",
    "MAX_THROTTLE",
    "AutoConverge",
    "MigrationConfig",
    "MigrationReport",
    "RoundRow",
    "migrate",
    "migrate_guest",
    "should_complete",
    "sync_dirty_log",
]

PAGE_SIZE = 4096
MAX_THROTTLE = 128 << 20  #: QEMU's default max-bandwidth, 128 MiB/s (spec §4.6)
DEFAULT_DOWNTIME_LIMIT = 0.300  #: DEFAULT_MIGRATE_SET_DOWNTIME, 300 ms
CPU_THROTTLE_PCT_MIN = 1
CPU_THROTTLE_PCT_MAX = 99
_RATE_PERIOD = 1.0  #: seconds between throttle checks / dirty-rate updates (> 1000 ms)


@attrs.frozen
class MigrationConfig:
    """Migration parameters, QEMU's defaults (spec §4.6); ``bandwidth`` in bytes/s."""

    bandwidth: float = MAX_THROTTLE
    downtime_limit: float = DEFAULT_DOWNTIME_LIMIT
    auto_converge: bool = False
    throttle_trigger_threshold: int = 50
    cpu_throttle_initial: int = 20
    cpu_throttle_increment: int = 10
    max_cpu_throttle: int = 99
    max_rounds: int = 30
    max_time: float = 600.0

    def __attrs_post_init__(self) -> None:
        if not self.bandwidth > 0:
            raise InputError(f"bandwidth must be > 0 bytes/s, not {self.bandwidth!r}")
        if not self.downtime_limit > 0:
            raise InputError(f"downtime limit must be > 0 s, not {self.downtime_limit!r}")
        if self.max_rounds < 1:
            raise InputError("max_rounds must be >= 1")
        if not 1 <= self.throttle_trigger_threshold <= 100:
            raise InputError("throttle-trigger-threshold must be 1..100")
        if not 1 <= self.cpu_throttle_initial <= 99 or not 1 <= self.cpu_throttle_increment <= 99:
            raise InputError("cpu-throttle-initial and cpu-throttle-increment must be 1..99")
        if not 1 <= self.max_cpu_throttle <= 99:
            raise InputError("max-cpu-throttle must be 1..99")

    @property
    def threshold_bytes(self) -> float:
        """``threshold_size`` = bandwidth × downtime_limit."""
        return self.bandwidth * self.downtime_limit


def should_complete(pending_bytes: int, bandwidth: float, downtime_limit: float) -> bool:
    """``migration_iteration_run``'s switch-over test: nothing pending, or less than ``threshold_size``."""
    return pending_bytes == 0 or pending_bytes < bandwidth * downtime_limit


@attrs.define
class AutoConverge:
    """QEMU's auto-converge: ``migration_trigger_throttle`` + ``mig_throttle_guest_down``.

    At the end of each rate period: if the bytes dirtied in the period exceed
    ``threshold``% of the bytes transferred in it, a counter is incremented;
    when it reaches 2 it is reset and the throttle starts at ``initial``% or
    grows by ``increment``%, capped at ``maximum``% (``cpu_throttle_set`` keeps
    it within 1..99).  As in QEMU, a calm period does not reset the counter.
    """

    enabled: bool = False
    threshold: int = 50
    initial: int = 20
    increment: int = 10
    maximum: int = 99
    throttle: int = 0  #: ``cpu_throttle_get_percentage``; 0 = not active
    high_count: int = 0  #: ``dirty_rate_high_cnt``
    triggers: int = 0

    @classmethod
    def from_config(cls, config: MigrationConfig) -> AutoConverge:
        return cls(config.auto_converge, config.throttle_trigger_threshold, config.cpu_throttle_initial,
                   config.cpu_throttle_increment, config.max_cpu_throttle)

    def period(self, bytes_dirty: int, bytes_xfer: int) -> int:
        """``migration_trigger_throttle`` for one rate period; returns the throttle in %."""
        bytes_dirty_threshold = bytes_xfer * self.threshold // 100
        if bytes_dirty > bytes_dirty_threshold:
            self.high_count += 1
            if self.high_count >= 2:
                self.high_count = 0
                if self.enabled:
                    self.guest_down()
        return self.throttle

    def guest_down(self) -> None:
        """``mig_throttle_guest_down`` (without x-cpu-throttle-tailslow), then ``cpu_throttle_set``."""
        new = self.initial if self.throttle == 0 else min(self.throttle + self.increment, self.maximum)
        self.throttle = max(CPU_THROTTLE_PCT_MIN, min(new, CPU_THROTTLE_PCT_MAX))
        self.triggers += 1


@attrs.frozen
class RoundRow:
    """One round: what was sent, how long it took, what the sync after it found.

    ``phase`` is ``bulk`` (round 0, every page), ``iterate``, or ``completion``
    (stop-and-copy: the guest is stopped, ``seconds`` is the downtime).
    ``throttle`` is the auto-converge throttle (%) during the round;
    ``stores`` / ``faults`` what the guest did meanwhile (a program: instructions);
    ``dirty_pages`` what the sync after the round harvested.
    """

    round: int
    phase: str
    pages_sent: int
    bytes: int
    seconds: float
    throttle: int
    guest_seconds: float
    stores: int
    faults: int
    dirty_pages: int
    pending_bytes: int


@attrs.frozen
class MigrationReport:
    """The outcome of a pre-copy migration; :meth:`to_dict` is its JSON form."""

    rounds: tuple[RoundRow, ...]
    converged: bool
    reason: str
    total_pages_sent: int
    total_bytes: int
    total_seconds: float
    expected_downtime: float
    memory_pages: int
    dirty_sync_count: int
    dirty_pages_rate: float
    throttle_triggers: int
    bandwidth: float
    downtime_limit: float
    auto_converge: bool
    mode: str
    workload: str

    @property
    def throttles(self) -> list[int]:
        """The throttle (%) of each round, in order."""
        return [r.throttle for r in self.rounds]

    def to_dict(self) -> dict[str, Any]:
        out = attrs.asdict(self, recurse=True)
        out["rounds"] = [attrs.asdict(r) for r in self.rounds]
        return out


def sync_dirty_log(vm: Any) -> int:
    """``memory_global_dirty_log_sync``: harvest every logged slot; returns the dirty page count.

    Uses the dirty logger's ``harvest`` (``KVM_GET_DIRTY_LOG`` per slot in bitmap
    mode); its result, if it returns ``{slot_key: gfns}``, else the round it recorded.
    """
    logger = logger_of(vm)
    got = logger.harvest(vm)
    if isinstance(got, dict):
        return sum(len(g) for g in got.values())
    total = 0
    for slot in vm.memslots.all_slots():
        if slot.logging:
            rounds = logger.rounds_of(slot.key)
            total += len(rounds[-1]) if rounds else 0
    return total


class _Migration:
    """QEMU's ``MigrationState`` + ``RAMState`` for one outgoing migration, in simulated time."""

    def __init__(self, vm: Any, vcpu: Any, workload: Workload, config: MigrationConfig) -> None:
        self.vm, self.vcpu, self.workload, self.config = vm, vcpu, workload, config
        self.memory_pages = sum(s.npages for s in vm.memslots.all_slots() if s.logging)
        if self.memory_pages == 0:
            raise InputError("no dirty-logged memslot to migrate")
        self.migration_dirty_pages = self.memory_pages  # the bitmap starts all-ones
        self.now = 0.0
        self.bytes_transferred = 0
        self.time_last_bitmap_sync = 0.0
        self.num_dirty_pages_period = 0
        self.bytes_xfer_prev = 0
        self.dirty_pages_rate = 0.0
        self.dirty_sync_count = 0
        self.throttle = AutoConverge.from_config(config)
        self.rows: list[RoundRow] = []

    def ram_save_setup(self) -> None:
        """Start the logger, then ``ram_init_bitmaps``' initial sync: nothing new, every page pending."""
        start = getattr(logger_of(self.vm), "start", None)
        if start is not None:  # a logger with a start step (counters, INITIALLY_SET, option errors)
            start(self.vm)
        sync_dirty_log(self.vm)
        self.dirty_sync_count += 1

    def ram_save_iterate(self) -> RoundRow:
        """One pass over the migration bitmap while the guest runs, then ``migration_bitmap_sync``."""
        config = self.config
        index = len(self.rows)
        pages = self.migration_dirty_pages
        nbytes = pages * PAGE_SIZE
        seconds = nbytes / config.bandwidth
        throttle = self.throttle.throttle
        guest_seconds = seconds * (100 - throttle) / 100  # cpu_throttle: asleep throttle% of the time
        work = self.workload.run(self.vm, self.vcpu, guest_seconds)
        self.now += seconds
        self.bytes_transferred += nbytes
        dirty = self.migration_bitmap_sync()
        row = RoundRow(index, "bulk" if index == 0 else "iterate", pages, nbytes, seconds, throttle,
                       guest_seconds, work.stores, work.faults, dirty, dirty * PAGE_SIZE)
        self.rows.append(row)
        return row

    def migration_bitmap_sync(self) -> int:
        """Sync after a round: the dirty pages become pending; every > 1 s, the throttle check."""
        self.dirty_sync_count += 1
        dirty = sync_dirty_log(self.vm)
        self.migration_dirty_pages = dirty  # every pending page was sent by the round just ended
        self.num_dirty_pages_period += dirty
        elapsed = self.now - self.time_last_bitmap_sync
        if elapsed > _RATE_PERIOD:
            self.throttle.period(self.num_dirty_pages_period * PAGE_SIZE,
                                 self.bytes_transferred - self.bytes_xfer_prev)
            self.dirty_pages_rate = self.num_dirty_pages_period / elapsed
            self.time_last_bitmap_sync = self.now
            self.num_dirty_pages_period = 0
            self.bytes_xfer_prev = self.bytes_transferred
        return dirty

    def migration_completion(self) -> RoundRow:
        """Stop the guest, a final sync, send what is left: the downtime."""
        self.dirty_sync_count += 1
        final = self.migration_dirty_pages + sync_dirty_log(self.vm)
        nbytes = final * PAGE_SIZE
        downtime = nbytes / self.config.bandwidth
        self.bytes_transferred += nbytes
        row = RoundRow(len(self.rows), "completion", final, nbytes, downtime, self.throttle.throttle,
                       0.0, 0, 0, 0, 0)
        self.rows.append(row)
        return row

    def report(self, converged: bool, reason: str, expected_downtime: float) -> MigrationReport:
        config = self.config
        return MigrationReport(
            rounds=tuple(self.rows),
            converged=converged,
            reason=reason,
            total_pages_sent=sum(r.pages_sent for r in self.rows),
            total_bytes=self.bytes_transferred,
            total_seconds=sum(r.seconds for r in self.rows),
            expected_downtime=expected_downtime,
            memory_pages=self.memory_pages,
            dirty_sync_count=self.dirty_sync_count,
            dirty_pages_rate=self.dirty_pages_rate,
            throttle_triggers=self.throttle.triggers,
            bandwidth=config.bandwidth,
            downtime_limit=config.downtime_limit,
            auto_converge=config.auto_converge,
            mode=logger_of(self.vm).mode,
            workload=self.workload.name,
        )


def migrate(vm: Any, vcpu: Any, workload: Workload, config: MigrationConfig | None = None, *,
            on_round: Callable[[RoundRow], None] | None = None) -> MigrationReport:
    """Migrate ``vm`` (pre-copy) while ``workload`` runs on ``vcpu``: QEMU's ``migration_thread``.

    Each iteration is ``migration_iteration_run``: a round, then the switch-over
    test (:func:`should_complete`), then the guards.  ``on_round(row)`` is called
    after every round (for a progress display).
    """
    config = config or MigrationConfig()
    mig = _Migration(vm, vcpu, workload, config)
    mig.ram_save_setup()
    while True:
        row = mig.ram_save_iterate()
        if on_round is not None:
            on_round(row)
        if should_complete(row.pending_bytes, config.bandwidth, config.downtime_limit):
            reason = f"pending {row.pending_bytes} B < threshold {config.threshold_bytes:.0f} B"
            break
        if len(mig.rows) >= config.max_rounds:
            return mig.report(False, f"max rounds ({config.max_rounds}) reached", row.pending_bytes / config.bandwidth)
        if mig.now >= config.max_time:
            return mig.report(False, f"max time ({config.max_time:g} s) reached", row.pending_bytes / config.bandwidth)
    expected_downtime = row.pending_bytes / config.bandwidth
    done = mig.migration_completion()
    if on_round is not None:
        on_round(done)
    return mig.report(True, reason, expected_downtime)


def _check_logger(vm: Any) -> None:
    """The dirty logger refuses bad options (an unknown mode) by failing its hook: report it."""
    if vm.plugins.is_quarantined("dirty_log"):
        error = next((i.error for i in vm.plugins.infos() if i.name == "dirty_log"), None) or "failed"
        raise InputError(error.removeprefix("InputError: "))


def migrate_guest(workload: Workload, mem_bytes: int | None = None, *, mode: str = "bitmap", tdp: bool = True,
                  config: MigrationConfig | None = None,
                  on_round: Callable[[RoundRow], None] | None = None) -> MigrationReport:
    """Build a guest of the ABI (``setup_vm``) with ``mem_bytes`` of data memory and migrate it.

    A :class:`ProgramWorkload` brings its own code and data size.
    """
    from pagetrack.runner import setup_vm

    if isinstance(workload, ProgramWorkload):
        code, size = workload.program.code, workload.program.data_size
    else:
        code, size = b"", mem_bytes if mem_bytes is not None else 128 << 20
    env = setup_vm(size, code, tdp=tdp, options={"dirty_log": {"mode": mode}})
    try:
        _check_logger(env.vm)
        return migrate(env.vm, env.vcpu, workload, config, on_round=on_round)
    finally:
        env.vm.close()
