"""Run a validated :class:`~pagetrack.scenario.Scenario` and return the run's JSON.

The VM is the runner's (:func:`pagetrack.runner.setup_vm`): the ABI's two
memslots, ``vm.vcpus`` vCPUs, the scenario's plugins, options, tracked ranges
and dirty-log mode.  The workload is either

* a guest program — it runs on vCPU 0 (the guest ABI has one entry point and
  no way to start other vCPUs); any other vCPUs are created, so that per-vCPU
  state such as dirty rings and PML buffers exists, and stay idle.  The JSON
  says so in ``scenario.notes``;
* or a trace generator — each round replays ``duration / rounds`` seconds of
  guest time, dealt out to the vCPUs in equal consecutive shares (vCPU 0 the
  first), then harvests.

The result is :func:`pagetrack.runner.run_program`'s JSON plus ``scenario``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import InputError
from .program import Program, builtin_program, load_program
from .runner import GuestExit, Progress, VmSetup, result_of, run_guest, setup_vm
from .scenario import ProgramSpec, Scenario, TraceSpec

__all__ = ["TRACE_EXIT", "run_scenario"]

#: ``exit`` of a trace workload that replayed every store.
TRACE_EXIT = "end of trace"


def _program(spec: ProgramSpec, data_size: int) -> Program:
    if spec.builtin:
        return builtin_program(spec.program, spec.defines, data_size)
    assert spec.path is not None
    return load_program(spec.path, spec.defines, data_size)


def run_scenario(scenario: Scenario, *, audit_log: str | None = None, progress: Progress | None = None,
                 status: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run ``scenario``; ``audit_log`` overrides ``output.audit_log``.

    ``progress(instructions, rounds)`` hears a program's progress, ``status(text)``
    a trace's.  Errors of set-up (a plugin refusing its options, say) are
    :class:`~pagetrack.errors.InputError` naming the scenario file.
    """
    data_size = scenario.vm.memory_mib << 20
    workload = scenario.workload
    program = _program(workload, data_size) if isinstance(workload, ProgramSpec) else None
    audit = audit_log or scenario.output.audit_log
    try:
        env = setup_vm(data_size, program.code if program else b"", tdp=scenario.vm.tdp, track=scenario.track,
                       audit=audit, audit_level=scenario.output.audit_level, options=scenario.options,
                       vcpus=scenario.vm.vcpus, enable=scenario.plugins.enable, disable=scenario.plugins.disable)
    except InputError as exc:
        raise InputError(str(exc), scenario.file) from None
    notes: list[str] = []
    stores = 0
    try:
        from pagetrack.plugins.dirty_log import logger_of

        try:
            logger_of(env.vm).start(env.vm)
        except InputError as exc:
            raise InputError(str(exc), scenario.file) from None
        if isinstance(workload, ProgramSpec):
            if scenario.vm.vcpus > 1:
                notes.append(f"the program ran on vCPU 0; vCPUs 1-{scenario.vm.vcpus - 1} were created and "
                             "stayed idle (the guest ABI starts one vCPU)")
            run = run_guest(env, max_instructions=workload.max_instructions, progress=progress)
        else:
            run, stores = _run_trace(env, workload, status or (lambda text: None))
            if scenario.vm.vcpus > 1:
                notes.append(f"each round's stores were dealt out to {scenario.vm.vcpus} vCPUs in equal "
                             "consecutive shares")
        result = result_of(env, run)
    finally:
        env.vm.close()
    result["scenario"] = {
        "file": scenario.file,
        "name": scenario.name,
        "description": scenario.description,
        "vcpus": scenario.vm.vcpus,
        "memory_mib": scenario.vm.memory_mib,
        "workload": _describe(workload, program),
        "tracked": [[lo, hi] for lo, hi in scenario.track],
        "plugin_options": sorted(scenario.plugins.options),
        "stores": stores,
        "notes": notes,
    }
    return result


def _describe(workload: ProgramSpec | TraceSpec, program: Program | None) -> str:
    if isinstance(workload, ProgramSpec):
        assert program is not None
        defines = "".join(f" -D {k}={v}" for k, v in workload.defines.items())
        return f"program {program.name}{defines}"
    params = "".join(f", {k}={v}" for k, v in workload.params.items())
    rate = f", rate={workload.rate:g}" if workload.rate is not None else ""
    return (f"trace {workload.trace} (seed={workload.seed}{rate}{params}), {workload.duration:g} s of guest time "
            f"in {workload.rounds} round{'s' if workload.rounds > 1 else ''}")


def _ring_full_handler(vm: Any, vcpu: Any) -> Callable[[BaseException], bool]:
    """The VMM's exit handler for one vCPU's replay (``KVM_EXIT_DIRTY_RING_FULL``: reap, re-enter)."""
    from pagetrack.plugins.dirty_log.workloads import vmm_exit

    return lambda exc: vmm_exit(vm, vcpu)


def _run_trace(env: VmSetup, spec: TraceSpec, status: Callable[[str], None]) -> tuple[GuestExit, int]:
    """Replay the trace round by round, each round's stores shared out to the vCPUs, then harvest.

    Returns the run's exit and the number of stores replayed.
    """
    from pagetrack.plugins.dirty_log.workloads import make_workload

    from .replay import replay

    vm = env.vm
    workload = make_workload(spec.trace, spec.rate, spec.seed, **spec.params)
    vcpus = list(vm.vcpus)
    data_size = env.data.npages << 12
    seconds = spec.duration / spec.rounds
    stores = 0
    for i in range(spec.rounds):
        status(f"round {i + 1} of {spec.rounds}, {stores:,} stores so far")
        trace = workload.trace(seconds, data_size)
        n = len(trace.gpas)
        for k, vcpu in enumerate(vcpus):
            lo, hi = n * k // len(vcpus), n * (k + 1) // len(vcpus)
            if hi > lo:
                replay(vm, vcpu, trace.gpas[lo:hi], trace.values[lo:hi], on_exit=_ring_full_handler(vm, vcpu))
        stores += n
        vm.hooks.round_end(vm, vcpus[0], i, i == spec.rounds - 1)
    return GuestExit(TRACE_EXIT, [], spec.rounds, 0), stores
