"""pagetrack.testing: the pytest plugin tracker authors get through the pytest11 entry point."""

from __future__ import annotations

from typing import Any

import pytest
from pagetrack.hookspecs import hookimpl
from pagetrack.testing import HookCalls

pytest_plugins = ["pytester"]


class Seen:
    def __init__(self) -> None:
        self.gpas: list[int] = []

    @hookimpl
    def track_write(self, gpa: int) -> None:
        self.gpas.append(gpa)


class Raises:
    @hookimpl
    def track_write(self) -> None:
        raise RuntimeError("tracker bug")


class TestMakeVm:
    def test_defaults(self, make_vm: Any) -> None:
        """strict=True and an in-memory audit log at debug level, unless overridden."""
        vm = make_vm(load_entry_points=False)
        assert vm.plugins.strict is True
        assert vm.audit.level == "debug" and vm.audit.events is not None
        assert vm.plugins is vm.hooks.host

    def test_kwargs_pass_through(self, make_vm: Any) -> None:
        seen = Seen()
        vm = make_vm(plugins=[seen], load_entry_points=False, strict=False)
        assert vm.plugins.strict is False
        assert seen in [vm.plugins.get(n) for n in vm.plugins.names()]

    def test_strict_failure_reaches_the_test(self, make_vm: Any) -> None:
        vm = make_vm(plugins=[Raises()], load_entry_points=False)
        with pytest.raises(RuntimeError, match="tracker bug"):
            vm.hooks.track_write(vm, None, 0x1000, b"x")

    def test_vms_are_closed_at_teardown(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile(
            """
            CREATED = []

            def test_make(make_vm):
                CREATED.append(make_vm(load_entry_points=False))
                CREATED.append(make_vm(load_entry_points=False))
                assert not any(vm.closed for vm in CREATED)

            def test_after():
                assert len(CREATED) == 2 and all(vm.closed for vm in CREATED)
            """
        )
        pytester.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(passed=2)


class TestHookRecorder:
    def test_records_every_call(self, make_vm: Any, hook_recorder: Any) -> None:
        seen = Seen()
        vm = make_vm(plugins=[seen], load_entry_points=False)
        calls = hook_recorder(vm)
        assert isinstance(calls, HookCalls)
        vm.hooks.track_write(vm, None, 0x2000, b"ab")
        vm.hooks.round_end(vm, None, 0, False)  # recorded although nobody implements it
        assert calls.names() == ["track_write", "round_end"]
        assert calls.calls_of("track_write") == [
            {"vm": vm, "vcpu": None, "gpa": 0x2000, "new": b"ab"}
        ]
        assert seen.gpas == [0x2000]
        calls.clear()
        assert calls.calls == []

    def test_stops_at_teardown(self, pytester: pytest.Pytester) -> None:
        pytester.makepyfile(
            """
            KEPT = []

            def test_record(make_vm, hook_recorder):
                vm = make_vm(load_entry_points=False)
                KEPT.append((vm, hook_recorder(vm)))

            def test_after():
                vm, calls = KEPT[0]
                assert vm.hooks._monitors == ()
            """
        )
        pytester.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(passed=2)


class TestAuditEvents:
    def test_filter_by_event(self, make_vm: Any, audit_events: Any) -> None:
        vm = make_vm(plugins=[Seen()], load_entry_points=False)
        vm.hooks.track_write(vm, None, 0x3000, b"z")
        (write,) = audit_events(vm, "track_write")
        assert write["gpa"] == 0x3000 and write["plugins"] == ["Seen"]
        names = [e["event"] for e in audit_events(vm)]
        assert "plugin_registered" in names and "track_write_call" in names
