"""Tests for hello_tracker, written with pagetrack's pytest fixtures (no conftest needed).

Run from this folder with ``pytest`` once pagetrack is installed; hello_tracker
itself need not be installed (the VM gets the module through ``plugins=``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the module, when not installed

import hello_tracker

DATA = 0x400000  # guest-physical base of the test memslot
GFN = DATA >> 12


def _vm(make_vm: Any) -> Any:
    # disable=: if hello_tracker is installed, its entry point would register the
    # same module a second time; the test passes it explicitly instead.
    vm = make_vm(plugins=[hello_tracker], disable=["hello_tracker"])
    vm.add_memory(DATA, 16 * 4096)
    return vm


def test_counts_writes_to_watched_gfns(make_vm: Any) -> None:
    vm = _vm(make_vm)
    hello_tracker.watch(vm, GFN)
    assert vm.gfn_is_write_tracked(GFN)
    # What the emulator does after committing a write (emulator_write_phys).
    vm.hooks.track_write(vm, None, DATA + 8, b"\x01\x02")
    vm.hooks.track_write(vm, None, DATA + 0xFFF, b"\x03")
    vm.hooks.track_write(vm, None, DATA + 0x1000, b"\x04")  # next gfn: not watched
    assert hello_tracker.write_counts(vm) == {GFN: 2}


def test_unwatch_drops_the_write_track_count(make_vm: Any) -> None:
    vm = _vm(make_vm)
    hello_tracker.watch(vm, GFN)
    hello_tracker.watch(vm, GFN)  # no second count
    hello_tracker.unwatch(vm, GFN)
    assert not vm.gfn_is_write_tracked(GFN)
    assert hello_tracker.watched(vm) == set()


def test_memslot_delete_forgets(make_vm: Any, hook_recorder: Any) -> None:
    vm = _vm(make_vm)
    calls = hook_recorder(vm)
    hello_tracker.watch(vm, GFN + 1)
    vm.hooks.track_write(vm, None, DATA + 0x1000, b"x")
    slot = next(s for s in vm.memslots.slots(0) if s.base_gfn == GFN)
    vm.set_user_memory_region(slot.key, 0, DATA, 0, slot.userspace_addr)  # KVM: delete
    assert calls.calls_of("track_remove_region") == [{"vm": vm, "gfn": GFN, "nr_pages": 16}]
    assert hello_tracker.watched(vm) == set()
    assert hello_tracker.write_counts(vm) == {}


def test_audit_log_shows_each_call(make_vm: Any, audit_events: Any) -> None:
    vm = _vm(make_vm)
    hello_tracker.watch(vm, GFN)
    vm.hooks.track_write(vm, None, DATA, b"\xaa")
    (call,) = [e for e in audit_events(vm, "track_write_call") if e["plugin"] == "hello_tracker"]
    assert call["outcome"] == "ok"


def test_guest_stores_end_to_end() -> None:
    """A real guest program: stores to watched pages fault, are emulated and counted.

    The 8-byte store at offset 0xffc crosses into the next page, so KVM notifies
    two pieces (spec/kvm-page-track.md case 30): one per page.
    """
    from importlib.metadata import entry_points

    import pagetrack
    from pagetrack.program import assemble

    program = assemble(
        """
        mov dword ptr [rdi], 1
        mov dword ptr [rdi + 4], 2
        mov qword ptr [rdi + 0x1ffc], rax
        hlt
        """
    )
    counts: dict[int, int] = {}

    class Snapshot:
        """Registered after hello_tracker, so called before it (LIFO) at teardown."""

        @pagetrack.hookimpl
        def vm_destroyed(self, vm: Any) -> None:
            counts.update(hello_tracker.write_counts(vm))

    installed = any(ep.name == "hello_tracker" for ep in entry_points(group="pagetrack"))
    result = pagetrack.run_program(
        program,
        plugins=[Snapshot()] if installed else [hello_tracker, Snapshot()],
        vm_hook=lambda vm, vcpu: [hello_tracker.watch(vm, g) for g in (GFN, GFN + 1, GFN + 2)],
    )
    assert result["exit"] == "hlt"
    assert counts == {GFN: 2, GFN + 1: 1, GFN + 2: 1}
