"""pytest plugin for tracker authors: ``make_vm``, ``hook_recorder``, ``audit_events``.

Installed with pagetrack through the ``pytest11`` entry point, so any test suite
in an environment that has pagetrack gets these fixtures without a conftest::

    def test_counts(make_vm, hook_recorder):
        vm = make_vm(plugins=[MyTracker()])
        calls = hook_recorder(vm)
        ...
        assert calls.calls_of("track_write")

This module is imported by *every* pytest run in such an environment, so it
imports nothing heavy at module level; the VM and audit classes are imported
when a fixture is first used.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pytest

__all__ = ["HookCalls", "audit_events", "hook_recorder", "make_vm"]

#: Level of the in-memory audit log ``make_vm`` gives a VM: everything, per-write events included.
AUDIT_LEVEL = "debug"

_vm_ids = itertools.count(1)


@attrs.define
class HookCalls:
    """Every hook call made through one VM's :class:`pagetrack.plugins.HookBus`.

    ``calls`` is a list of ``(hook_name, kwargs)`` in call order; it is filled
    whether or not any plugin implements the hook.
    """

    calls: list[tuple[str, dict[str, Any]]] = attrs.field(factory=list)

    def calls_of(self, name: str) -> list[dict[str, Any]]:
        """The kwargs of every call of hook ``name``, in order."""
        return [kwargs for hook, kwargs in self.calls if hook == name]

    def names(self) -> list[str]:
        """The hook names called, in order."""
        return [hook for hook, _ in self.calls]

    def clear(self) -> None:
        """Forget the calls recorded so far."""
        self.calls.clear()

    def _record(self, hook: str, kwargs: dict[str, Any]) -> None:
        self.calls.append((hook, kwargs))


@pytest.fixture
def make_vm() -> Iterator[Callable[..., Any]]:
    """Factory of :class:`pagetrack.VM` objects, closed at teardown.

    Keyword arguments go to ``pagetrack.VM``.  Defaults differ from the VM's in
    two ways suited to tests: ``strict=True`` (a raising hookimpl fails the test
    instead of being quarantined) and an in-memory audit log at debug level
    (``vm.audit.events``), unless ``audit=`` is given.
    """
    vms: list[Any] = []

    def factory(**kwargs: Any) -> Any:
        from pagetrack import VM  # late: keep this plugin cheap to import

        kwargs.setdefault("strict", True)
        if kwargs.get("audit") is None:
            from pagetrack.audit import AuditLog

            kwargs["audit"] = AuditLog.in_memory(f"test-vm-{next(_vm_ids)}", AUDIT_LEVEL)
        vm = VM(**kwargs)
        vms.append(vm)
        return vm

    yield factory
    errors: list[BaseException] = []
    for vm in reversed(vms):
        try:
            vm.close()
        except Exception as exc:  # close every VM, then report the first failure
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture
def hook_recorder() -> Iterator[Callable[[Any], HookCalls]]:
    """``recorder(vm)`` starts recording every hook call on ``vm`` and returns a :class:`HookCalls`.

    Calls made before ``recorder(vm)`` (``vm_created`` during construction) are
    not recorded.  Recording stops at teardown.
    """
    undo: list[Callable[[], None]] = []

    def recorder(vm: Any) -> HookCalls:
        calls = HookCalls()
        undo.append(vm.hooks.add_monitor(calls._record))
        return calls

    yield recorder
    for fn in reversed(undo):
        fn()


@pytest.fixture
def audit_events() -> Callable[..., list[Any]]:
    """``audit_events(vm, event=None)``: the VM's in-memory audit events, optionally of one kind."""

    def events(vm: Any, event: str | None = None) -> list[Any]:
        found = list(vm.audit.events)
        if event is None:
            return found
        return [e for e in found if _event_name(e) == event]

    return events


def _event_name(event: Any) -> Any:
    if isinstance(event, dict):
        return event.get("event")
    return getattr(event, "event", None)
