"""PluginHost and HookBus: registration, order, isolation, firstresult, audit events.

Case numbers refer to spec/kvm-page-track.md §7.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from pagetrack.errors import InputError
from pagetrack.hookspecs import hookimpl
from pagetrack.plugin_host import HookBus, PluginHost
from pagetrack.plugin_info import MMU_TRACKER, PluginInfo, hook_names


class FakeAudit:
    """Test double of the audit-log interface (``enabled``, ``emit``)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.events: list[dict[str, Any]] = []

    def emit(self, event: str, level: str = "info", **fields: Any) -> None:
        self.events.append({"event": event, "level": level, **fields})

    def of(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == event]

    def names(self) -> list[str]:
        return [e["event"] for e in self.events]


class Writer:
    """A tracker that logs its track_write calls into a shared list."""

    def __init__(self, label: str, log: list[str]) -> None:
        self.label = label
        self.log = log

    @hookimpl
    def track_write(self, gpa: int, new: bytes) -> None:
        self.log.append(self.label)


class Mmu:
    """Stand-in for the built-in MMU tracker: trylast, like kvm_mmu_track_write."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    @hookimpl(trylast=True)
    def track_write(self, vm: Any, vcpu: Any, gpa: int, new: bytes) -> None:
        self.log.append(MMU_TRACKER)

    @hookimpl(trylast=True)
    def track_flush_slot(self, slot: Any) -> None:
        self.log.append(MMU_TRACKER)


class Boom:
    """A tracker whose hooks raise."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    @hookimpl
    def track_write(self, gpa: int) -> None:
        self.log.append("boom")
        raise RuntimeError(f"bad write at {gpa:#x}\nsecond line")

    @hookimpl
    def track_remove_region(self, gfn: int) -> None:
        self.log.append("boom-remove")


class Vcpu:
    index = 3


@pytest.fixture
def audit() -> FakeAudit:
    return FakeAudit()


@pytest.fixture
def host(audit: FakeAudit) -> PluginHost:
    return PluginHost(audit=audit)


@pytest.fixture
def bus(host: PluginHost) -> HookBus:
    return HookBus(host)


class TestOrder:
    def test_case25_lifo(self, host: PluginHost, bus: HookBus) -> None:
        """Case 25: A then B registered → B's track_write runs before A's."""
        log: list[str] = []
        host.register(Writer("A", log), "A")
        host.register(Writer("B", log), "B")
        bus.track_write(None, None, 0x1000, b"x")
        assert log == ["B", "A"]
        assert host.call_order("track_write") == ["B", "A"]

    @pytest.mark.parametrize("mmu_first", [True, False])
    def test_case26_mmu_tracker_last(self, host: PluginHost, bus: HookBus, mmu_first: bool) -> None:
        """Case 26: external trackers all run before the MMU's own (trylast) tracker."""
        log: list[str] = []
        if mmu_first:
            host.register(Mmu(log), MMU_TRACKER)
        host.register(Writer("A", log), "A")
        host.register(Writer("B", log), "B")
        if not mmu_first:
            host.register(Mmu(log), MMU_TRACKER)
        bus.track_write(None, None, 0x1000, b"x")
        assert log == ["B", "A", MMU_TRACKER]

    def test_tryfirst_runs_first(self, host: PluginHost, bus: HookBus) -> None:
        """tryfirst keeps its bucket however early it was registered."""
        log: list[str] = []

        class First:
            @hookimpl(tryfirst=True)
            def track_write(self) -> None:
                log.append("first")

        host.register(First(), "first")
        host.register(Writer("A", log), "A")
        bus.track_write(None, None, 0, b"")
        assert log == ["first", "A"]

    def test_opt_in_arguments(self, host: PluginHost, bus: HookBus) -> None:
        """Impls get the subset of arguments they name, in their own order."""
        seen: dict[str, Any] = {}

        class P:
            @hookimpl
            def track_write(self, new: bytes, gpa: int) -> None:
                seen["tw"] = (new, gpa)

            @hookimpl
            def track_remove_region(self, nr_pages: int) -> None:
                seen["rr"] = nr_pages

            @hookimpl
            def vm_created(self) -> None:
                seen["vc"] = True

            @hookimpl
            def round_end(self, vm: Any, vcpu: Any, index: int, final: bool) -> None:
                seen["re"] = (vm, vcpu, index, final)

        host.register(P(), "p")
        bus.track_write("vm", "vcpu", 0x2000, b"ab")
        bus.track_remove_region("vm", 0x400, 16)
        bus.vm_created("vm")
        bus.round_end("vm", "vcpu", 2, True)
        assert seen == {"tw": (b"ab", 0x2000), "rr": 16, "vc": True, "re": ("vm", "vcpu", 2, True)}

    def test_module_plugin(self, host: PluginHost, bus: HookBus) -> None:
        """A module with hookimpl functions is a plugin too."""
        import types

        mod = types.ModuleType("mod_tracker")
        calls: list[int] = []

        @hookimpl
        def track_write(gpa: int) -> None:
            calls.append(gpa)

        mod.track_write = track_write  # type: ignore[attr-defined]
        assert host.register(mod) == "mod_tracker"
        bus.track_write(None, None, 5, b"x")
        assert calls == [5]

    def test_hooks_implemented(self, host: PluginHost, bus: HookBus) -> None:
        """hooks_implemented reflects registration, so core code can skip empty hooks."""
        assert not bus.hooks_implemented("track_write")
        host.register(Writer("A", []), "A")
        assert bus.hooks_implemented("track_write")
        assert host.hooks_implemented("track_write")
        assert not bus.hooks_implemented("track_flush_slot")
        host.unregister("A")
        assert not bus.hooks_implemented("track_write")


class TestRegistration:
    def test_register_returns_name_and_audits(self, host: PluginHost, audit: FakeAudit) -> None:
        """register → plugin_registered {plugin, dist, version, external}."""
        assert host.register(Writer("A", []), "A") == "A"
        assert audit.of("plugin_registered") == [
            {
                "event": "plugin_registered",
                "level": "info",
                "plugin": "A",
                "dist": None,
                "version": None,
                "external": True,
            }
        ]

    def test_unregister_by_name_and_object(
        self, host: PluginHost, bus: HookBus, audit: FakeAudit
    ) -> None:
        """Case 28 (sequential part): an unregistered plugin is not called by later writes."""
        log: list[str] = []
        a, b = Writer("A", log), Writer("B", log)
        host.register(a, "A")
        host.register(b, "B")
        assert host.unregister("A") == "A"
        assert host.unregister(b) == "B"
        bus.track_write(None, None, 0, b"x")
        assert log == []
        assert [e["plugin"] for e in audit.of("plugin_unregistered")] == ["A", "B"]
        assert host.get("A") is None

    def test_unregister_unknown(self, host: PluginHost) -> None:
        with pytest.raises(InputError, match="no plugin 'nope'"):
            host.unregister("nope")

    def test_duplicate_name(self, host: PluginHost) -> None:
        host.register(Writer("A", []), "A")
        with pytest.raises(InputError, match="'A'"):
            host.register(Writer("A2", []), "A")

    def test_unknown_argument(self, host: PluginHost) -> None:
        """An impl argument the spec does not have is refused at registration."""

        class Bad:
            @hookimpl
            def track_write(self, gpa: int, bytes_: int) -> None: ...

        with pytest.raises(InputError, match="bytes_"):
            host.register(Bad(), "bad")
        assert host.get("bad") is None

    def test_misspelled_hook_refused(self, host: PluginHost) -> None:
        """A hook name with no spec is refused with the plugin, the hook and a suggestion."""

        class Typo:
            @hookimpl
            def track_wrte(self, gpa: int) -> None: ...

        with pytest.raises(InputError, match=r"'typo'.*'track_wrte'.*did you mean 'track_write'"):
            host.register(Typo(), "typo")
        assert host.get("typo") is None

    def test_optionalhook_allowed(self, host: PluginHost) -> None:
        class Opt:
            @hookimpl(optionalhook=True)
            def some_future_hook(self) -> None: ...

        assert host.register(Opt(), "opt") == "opt"
        host.check_pending()

    def test_check_pending_on_misspelled_hook(self, host: PluginHost) -> None:
        """check_pending (pluggy's) → InputError naming the plugin and the unknown hook."""

        class Typo:
            @hookimpl
            def track_flush_slto(self) -> None: ...

        host.pm.register(Typo(), "typo")  # bypasses register()'s own check
        with pytest.raises(InputError) as err:
            host.check_pending()
        assert "'typo'" in str(err.value) and "'track_flush_slto'" in str(err.value)
        assert "track_flush_slot" in str(err.value)

    def test_wrappers_refused(self, host: PluginHost) -> None:
        class Wrap:
            @hookimpl(wrapper=True)
            def track_write(self) -> Any:
                return (yield)

        with pytest.raises(InputError, match="wrapper"):
            host.register(Wrap(), "wrap")
        assert host.get("wrap") is None

    def test_has_external_tracker(self, host: PluginHost) -> None:
        """kvm_page_track_has_external_user: only non-MMU trackers count."""
        assert not host.has_external_tracker()
        host.register(Mmu([]), MMU_TRACKER)
        assert not host.has_external_tracker()

        class Lifecycle:
            @hookimpl
            def vm_created(self) -> None: ...

        host.register(Lifecycle(), "life")
        assert not host.has_external_tracker()

        class Remover:
            @hookimpl
            def track_remove_region(self) -> None: ...

        host.register(Remover(), "rem")
        assert host.has_external_tracker()
        host.unregister("rem")
        assert not host.has_external_tracker()

    def test_infos(self, host: PluginHost) -> None:
        host.register(Mmu([]), MMU_TRACKER)
        host.register(Writer("A", []), "A")
        infos = {i.name: i for i in host.infos()}
        assert infos["A"] == PluginInfo(
            name="A",
            dist=None,
            version=None,
            module=f"{__name__}:Writer",
            hooks=("track_write",),
            error=None,
            enabled=True,
            external=True,
        )
        assert infos[MMU_TRACKER].hooks == ("track_flush_slot", "track_write")
        assert not infos[MMU_TRACKER].external
        assert infos["A"].status == "loaded"
        assert infos["A"].to_dict()["hooks"] == ["track_write"]


class TestIsolation:
    def test_raising_plugin_is_quarantined(
        self, host: PluginHost, bus: HookBus, audit: FakeAudit
    ) -> None:
        """One raising impl: the others still run, it is quarantined and never called again."""
        log: list[str] = []
        host.register(Mmu(log), MMU_TRACKER)
        host.register(Writer("A", log), "A")
        host.register(Boom(log), "boom")
        host.register(Writer("B", log), "B")
        bus.track_write(None, Vcpu(), 0x1FF8, b"12345678")  # returns normally
        assert log == ["B", "boom", "A", MMU_TRACKER]
        assert audit.of("plugin_error") == [
            {
                "event": "plugin_error",
                "level": "error",
                "plugin": "boom",
                "hook": "track_write",
                "error": "RuntimeError: bad write at 0x1ff8",
            }
        ]
        assert [(e["plugin"], e["hook"]) for e in audit.of("plugin_quarantined")] == [
            ("boom", "track_write")
        ]
        log.clear()
        bus.track_write(None, None, 0x2000, b"x")
        bus.track_remove_region(None, 0x400, 1)  # quarantine covers every hook
        assert log == ["B", "A", MMU_TRACKER]
        assert host.is_quarantined("boom")
        assert host.call_order("track_write") == ["B", "A", MMU_TRACKER]
        info = {i.name: i for i in host.infos()}["boom"]
        assert info.status == "quarantined" and info.error == "RuntimeError: bad write at 0x1ff8"
        assert len(audit.of("plugin_error")) == 1

    def test_strict_reraises(self, audit: FakeAudit) -> None:
        """strict=True: the exception propagates at once; later impls are not called."""
        host = PluginHost(audit=audit, strict=True)
        bus = HookBus(host)
        log: list[str] = []
        host.register(Writer("A", log), "A")
        host.register(Boom(log), "boom")
        with pytest.raises(RuntimeError, match="bad write"):
            bus.track_write(None, None, 0, b"x")
        assert log == ["boom"]
        assert not host.is_quarantined("boom")
        assert audit.of("plugin_error")
        assert host._snap.readers == []  # the read side was left

    def test_error_in_lifecycle_hook(
        self, host: PluginHost, bus: HookBus, audit: FakeAudit
    ) -> None:
        class Bad:
            @hookimpl
            def vm_destroyed(self) -> None:
                raise KeyError("k")

        seen: list[str] = []

        class Good:
            @hookimpl
            def vm_destroyed(self) -> None:
                seen.append("good")

        host.register(Good(), "good")
        host.register(Bad(), "bad")
        bus.vm_destroyed(None)
        assert seen == ["good"]
        assert audit.of("plugin_error")[0]["error"] == "KeyError: 'k'"

    def test_base_exceptions_propagate(self, host: PluginHost, bus: HookBus) -> None:
        """KeyboardInterrupt is not a plugin error."""

        class Stop:
            @hookimpl
            def vm_created(self) -> None:
                raise KeyboardInterrupt

        host.register(Stop(), "stop")
        with pytest.raises(KeyboardInterrupt):
            bus.vm_created(None)
        assert not host.is_quarantined("stop")


class TestTrackWriteAudit:
    def test_events_in_call_order(self, host: PluginHost, bus: HookBus, audit: FakeAudit) -> None:
        """track_write {vcpu, gpa, len, data, plugins} then one track_write_call per plugin."""
        log: list[str] = []
        host.register(Mmu(log), MMU_TRACKER)
        host.register(Boom(log), "boom")
        host.register(Writer("B", log), "B")
        audit.events.clear()
        bus.track_write(None, Vcpu(), 0x3000, bytearray(b"ab"))
        head = audit.events[0]
        assert head["event"] == "track_write"
        assert (head["vcpu"], head["gpa"], head["len"], head["data"]) == (3, 0x3000, 2, b"ab")
        assert type(head["data"]) is bytes
        assert head["plugins"] == ["B", "boom", MMU_TRACKER]
        calls = [(e["plugin"], e["outcome"]) for e in audit.of("track_write_call")]
        assert calls == [("B", "ok"), ("boom", "error"), (MMU_TRACKER, "ok")]
        assert all(e["gpa"] == 0x3000 for e in audit.of("track_write_call"))

    def test_vcpu_without_index(self, host: PluginHost, bus: HookBus, audit: FakeAudit) -> None:
        host.register(Writer("A", []), "A")
        bus.track_write(None, object(), 0, b"x")
        assert audit.of("track_write")[0]["vcpu"] is None

    def test_disabled_audit_emits_no_write_events(self, host: PluginHost, audit: FakeAudit) -> None:
        audit.enabled = False
        bus = HookBus(host)
        host.register(Writer("A", []), "A")
        bus.track_write(None, None, 0, b"x")
        assert not audit.of("track_write") and not audit.of("track_write_call")

    def test_bus_audit_override(self, host: PluginHost) -> None:
        other = FakeAudit()
        bus = HookBus(host, other)
        host.register(Writer("A", []), "A")
        bus.track_write(None, None, 0, b"x")
        assert other.names() == ["track_write", "track_write_call"]


class TestFirstResult:
    def test_guest_port_io_first_non_none(self, host: PluginHost, bus: HookBus) -> None:
        """guest_port_io is firstresult: the first non-None claims; later impls are not called."""
        log: list[str] = []

        def make(label: str, value: int | None) -> object:
            class P:
                @hookimpl
                def guest_port_io(self, port: int) -> int | None:
                    log.append(label)
                    return value

            return P()

        host.register(make("late", 9), "late")
        host.register(make("claims", 7), "claims")
        host.register(make("passes", None), "passes")
        assert bus.guest_port_io(None, None, 0x80, 1, 0, False) == 7
        assert log == ["passes", "claims"]

    def test_zero_is_a_result(self, host: PluginHost, bus: HookBus) -> None:
        class Zero:
            @hookimpl
            def guest_port_io(self) -> int:
                return 0

        host.register(Zero(), "zero")
        assert bus.guest_port_io(None, None, 0x80, 1, 0, False) == 0

    def test_unclaimed_and_raising(self, host: PluginHost, bus: HookBus, audit: FakeAudit) -> None:
        class Bad:
            @hookimpl
            def guest_port_io(self) -> int:
                raise ValueError("no")

        assert bus.guest_port_io(None, None, 0x80, 1, 0, False) is None
        host.register(Bad(), "bad")
        assert bus.guest_port_io(None, None, 0x80, 1, 0, True) is None
        assert host.is_quarantined("bad")


class TestFacade:
    def test_one_method_per_hookspec(self) -> None:
        """HookBus has one method per hookspec, with the spec's argument names."""
        from pagetrack import hookspecs

        for name in hook_names():
            method = getattr(HookBus, name)
            spec = inspect.signature(getattr(hookspecs, name))
            params = list(inspect.signature(method).parameters)
            assert params == ["self", *spec.parameters], name
        assert set(hook_names()) == {
            "track_write",
            "track_flush_slot",
            "track_remove_region",
            "mark_page_dirty",
            "memslot_commit",
            "vm_created",
            "vcpu_created",
            "vm_destroyed",
            "plugin_options",
            "guest_port_io",
            "round_end",
        }

    def test_every_method_dispatches(self, host: PluginHost, bus: HookBus) -> None:
        """Each facade method reaches the impls of its own hook with the right kwargs."""
        got: dict[str, dict[str, Any]] = {}

        class All:
            pass

        for name in hook_names():
            args = host.spec_args(name)

            def impl(*a: Any, _name: str = name, _args: tuple[str, ...] = args) -> None:
                got[_name] = dict(zip(_args, a, strict=True))

            impl.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
                [inspect.Parameter(a, inspect.Parameter.POSITIONAL_OR_KEYWORD) for a in args]
            )
            setattr(All, name, staticmethod(hookimpl(impl)))
        host.register(All(), "all")
        for name in hook_names():
            args = host.spec_args(name)
            values = [f"{name}.{a}".encode() for a in args]
            getattr(bus, name)(*values)
            assert got[name] == dict(zip(args, values, strict=True))

    def test_monitor(self, host: PluginHost, bus: HookBus) -> None:
        """add_monitor sees every call (implemented or not) until undone."""
        seen: list[tuple[str, dict[str, Any]]] = []
        undo = bus.add_monitor(lambda hook, kw: seen.append((hook, kw)))
        bus.track_write("vm", None, 1, b"x")
        bus.vm_created("vm")
        undo()
        bus.vm_created("vm")
        assert seen == [
            ("track_write", {"vm": "vm", "vcpu": None, "gpa": 1, "new": b"x"}),
            ("vm_created", {"vm": "vm"}),
        ]


def test_default_names(host: PluginHost) -> None:
    """Unnamed instances are named after their class, made unique; not pluggy's str(id(obj))."""
    assert host.register(Writer("a", [])) == "Writer"
    assert host.register(Writer("b", [])) == "Writer#2"
    host.unregister("Writer")
    assert host.register(Writer("c", [])) == "Writer"
