"""HookBus events through the real audit log: levels, fields, and `pagetrack audit` replay."""

from __future__ import annotations

import threading
from pathlib import Path

from pagetrack.audit import AuditLog, events, verify
from pagetrack.hookspecs import hookimpl
from pagetrack.plugin_host import HookBus, PluginHost


class Good:
    @hookimpl
    def track_write(self, gpa: int) -> None:
        pass


class Bad:
    @hookimpl
    def track_write(self, gpa: int) -> None:
        raise RuntimeError("nope")


class Mmu:
    @hookimpl(trylast=True)
    def track_write(self) -> None:
        pass


def test_events_match_catalog_and_verify(tmp_path: Path) -> None:
    """Every event the host and bus emit is in the catalog, at its level, and the log verifies."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, "vm-test", "info")
    host = PluginHost(audit=log)
    bus = HookBus(host)
    host.register(Mmu(), "shadow_mmu")
    host.register(Good(), "good")
    host.register(Bad(), "bad")
    for gpa in (0x1000, 0x1FFC, 0x2000):
        bus.track_write(None, None, gpa, b"\x01\x02\x03\x04")
    host.unregister("good")
    bus.track_write(None, None, 0x3000, b"\xff")
    log.close()
    report = verify(path)
    assert report.ok, [str(p) for p in report.problems]
    assert report.counts_by_plugin == {
        "bad": {"error": 1},
        "good": {"ok": 3},
        "shadow_mmu": {"ok": 4},
    }
    from orjson import loads

    lines = [loads(line) for line in path.read_bytes().splitlines()]
    for ev in lines:
        level, fields = events.CATALOG[ev["event"]]
        assert ev["level"] == level, ev
        assert {f.rstrip("?") for f in fields if not f.endswith("?")} <= set(ev), ev
    first = next(ev for ev in lines if ev["event"] == "track_write")
    assert first["data"] == "01020304" and first["plugins"] == ["bad", "good", "shadow_mmu"]


def test_concurrent_audited_writes_stay_grouped(tmp_path: Path) -> None:
    """Several vCPU threads: each track_write is followed by its own calls (the log verifies)."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, "vm-mt", "info")
    host = PluginHost(audit=log)
    bus = HookBus(host)
    host.register(Mmu(), "shadow_mmu")
    host.register(Good(), "good")

    def vcpu(base: int) -> None:
        for i in range(50):
            bus.track_write(None, None, base + i, b"x")

    threads = [threading.Thread(target=vcpu, args=(n << 20,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    report = verify(path)
    assert report.ok, [str(p) for p in report.problems[:5]]
    assert report.counts_by_plugin["good"] == {"ok": 200}
