"""Unregister while vCPU threads dispatch: spec/kvm-page-track.md §2.5 and case 28.

``kvm_page_track_unregister_notifier`` removes the node, then ``synchronize_srcu``:
it returns only after every in-flight notification that might still see the
node has finished, and no notification of the node starts afterwards.
"""

from __future__ import annotations

import threading
import time

from pagetrack.hookspecs import hookimpl
from pagetrack.plugin_host import HookBus, PluginHost


class Gate:
    """A tracker whose track_write blocks until released, counting calls in flight."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.in_flight = 0
        self.calls = 0

    @hookimpl
    def track_write(self, gpa: int) -> None:
        with self.lock:
            self.in_flight += 1
            self.calls += 1
        self.entered.set()
        self.release.wait(5)
        with self.lock:
            self.in_flight -= 1


class Counter:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.in_flight = 0
        self.calls = 0

    @hookimpl
    def track_write(self, gpa: int) -> None:
        with self.lock:
            self.in_flight += 1
            self.calls += 1
        time.sleep(0)  # let other threads interleave mid-call
        with self.lock:
            self.in_flight -= 1


def test_case28_unregister_waits_for_in_flight_call() -> None:
    """Case 28: unregister blocks while a vCPU thread is inside the plugin, then returns."""
    host = PluginHost()
    bus = HookBus(host)
    gate = Gate()
    host.register(gate, "gate")
    vcpu = threading.Thread(target=bus.track_write, args=(None, None, 0x1000, b"x"))
    vcpu.start()
    assert gate.entered.wait(5)
    done = threading.Event()
    unregisterer = threading.Thread(target=lambda: (host.unregister("gate"), done.set()))
    unregisterer.start()
    assert not done.wait(0.2), "unregister returned while a call was in flight"
    assert not bus.hooks_implemented("track_write")  # new dispatches no longer see it
    gate.release.set()
    assert done.wait(5)
    assert gate.in_flight == 0
    vcpu.join(5)
    unregisterer.join(5)
    bus.track_write(None, None, 0x1000, b"x")
    assert gate.calls == 1


def test_case28_stress_no_call_after_unregister_returns() -> None:
    """Case 28 under load: after unregister returns, the plugin is never entered again."""
    host = PluginHost()
    bus = HookBus(host)
    victim, bystander = Counter(), Counter()
    host.register(bystander, "bystander")
    host.register(victim, "victim")
    stop = threading.Event()
    errors: list[BaseException] = []

    def vcpu_loop() -> None:
        try:
            while not stop.is_set():
                bus.track_write(None, None, 0x2000, b"y")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=vcpu_loop) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        while victim.calls < 200:
            time.sleep(0.001)
        host.unregister("victim")
        assert victim.in_flight == 0
        frozen = victim.calls
        before = bystander.calls
        while bystander.calls < before + 200:
            time.sleep(0.001)
        assert victim.calls == frozen
    finally:
        stop.set()
        for t in threads:
            t.join(5)
    assert not errors
    assert host._retired == [] or all(not s.readers for s in host._retired)


def test_register_and_unregister_churn_while_dispatching() -> None:
    """Plugins come and go while threads dispatch; nothing breaks, no reader is left behind."""
    host = PluginHost()
    bus = HookBus(host)
    stop = threading.Event()
    errors: list[BaseException] = []

    def vcpu_loop() -> None:
        try:
            while not stop.is_set():
                bus.track_write(None, None, 0, b"z")
                bus.track_remove_region(None, 0, 1)
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=vcpu_loop) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(100):
            c = Counter()
            host.register(c, f"c{i}")
            host.unregister(f"c{i}")
            assert c.in_flight == 0
            calls = c.calls
            bus.track_write(None, None, 0, b"z")
            assert c.calls == calls
    finally:
        stop.set()
        for t in threads:
            t.join(5)
    assert not errors
    assert host._snap.readers == []


def test_unregister_from_inside_a_hook() -> None:
    """A plugin may unregister another (or itself) from a hook: no deadlock, and the
    removed plugin is skipped for the rest of the very dispatch that removed it."""
    host = PluginHost()
    bus = HookBus(host)
    log: list[str] = []

    class Victim:
        @hookimpl
        def track_write(self) -> None:
            log.append("victim")

    class Remover:
        @hookimpl
        def track_write(self) -> None:
            log.append("remover")
            host.unregister("victim")
            host.unregister("remover")

    host.register(Victim(), "victim")
    host.register(Remover(), "remover")  # LIFO: called first
    t = threading.Thread(target=bus.track_write, args=(None, None, 0, b"x"))
    t.start()
    t.join(5)
    assert not t.is_alive(), "unregister from inside a hook deadlocked"
    assert log == ["remover"]
    assert host.names() == []


def test_quarantine_while_another_thread_unregisters() -> None:
    """A reader that quarantines a plugin never blocks on a writer waiting for it."""
    host = PluginHost()
    bus = HookBus(host)
    gate = Gate()
    entered_bad = threading.Event()
    proceed = threading.Event()

    class Bad:
        @hookimpl(tryfirst=True)
        def track_write(self) -> None:
            entered_bad.set()
            proceed.wait(5)
            raise RuntimeError("late failure")

    host.register(gate, "gate")
    host.register(Bad(), "bad")
    gate.release.set()
    vcpu = threading.Thread(target=bus.track_write, args=(None, None, 0, b"x"))
    vcpu.start()
    assert entered_bad.wait(5)
    unregisterer = threading.Thread(target=host.unregister, args=("gate",))
    unregisterer.start()
    time.sleep(0.05)  # the writer now holds the write lock and waits for the vCPU thread
    proceed.set()
    vcpu.join(5)
    unregisterer.join(5)
    assert not vcpu.is_alive() and not unregisterer.is_alive()
    assert host.is_quarantined("bad")
    assert gate.calls == 0  # switched off before the vCPU thread reached it


def test_concurrent_failures_quarantine_once() -> None:
    """Threads failing in the same plugin at once: one plugin_quarantined event."""
    events: list[str] = []

    class Audit:
        enabled = False

        def emit(self, event: str, level: str = "info", **fields: object) -> None:
            events.append(event)

    host = PluginHost(audit=Audit())
    bus = HookBus(host)
    barrier = threading.Barrier(4)

    class Bad:
        @hookimpl
        def track_write(self) -> None:
            barrier.wait(5)
            raise RuntimeError("all at once")

    host.register(Bad(), "bad")
    threads = [
        threading.Thread(target=bus.track_write, args=(None, None, 0, b"x")) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert events.count("plugin_error") == 4
    assert events.count("plugin_quarantined") == 1
