"""The audit log writer: envelope, seq, hash chain, trailer, levels, threads, bytes."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import threading
from datetime import datetime, timedelta
from pathlib import Path

import orjson
import pytest
import structlog
from audit_helpers import Op, build, ops
from hypothesis import given
from hypothesis import strategies as st
from pagetrack.audit import GENESIS, SCHEMA_VERSION, AuditLog, events, verify

ENVELOPE = {"schema", "seq", "vm", "event", "level", "ts", "prev"}


def sha(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def test_every_event_carries_the_envelope_and_its_fields() -> None:
    log = AuditLog.in_memory("vm7")
    log.emit("track_add", gfn=0x400, count=1, by="external")
    ev = log.events[0]
    assert set(ev) == ENVELOPE | {"gfn", "count", "by"}
    assert ev["schema"] == SCHEMA_VERSION == 1
    assert (ev["seq"], ev["vm"], ev["event"], ev["level"]) == (0, "vm7", "track_add", "info")
    assert (ev["gfn"], ev["count"], ev["by"]) == (0x400, 1, "external")
    ts = datetime.fromisoformat(ev["ts"].replace("Z", "+00:00"))
    assert ts.utcoffset() == timedelta(0)


def test_lines_are_compact_json_with_sorted_keys() -> None:
    log = AuditLog.in_memory()
    log.emit("memslot", change="create", slot=1, base_gfn=0x400, npages=16, flags=0)
    line = log.lines[0]
    assert b"\n" not in line
    assert line == orjson.dumps(orjson.loads(line), option=orjson.OPT_SORT_KEYS)


@given(st.lists(ops, max_size=20))
def test_seq_and_chain(history: list[Op]) -> None:
    log = build(history)
    prev = GENESIS
    for i, (line, ev) in enumerate(zip(log.lines, log.events, strict=True)):
        assert ev["seq"] == i
        assert ev["prev"] == prev
        prev = sha(line)


def test_trailer_counts_events_and_names_the_head() -> None:
    log = AuditLog.in_memory()
    log.emit("vm_create", tdp=True)
    log.emit("vm_destroy")
    log.close()
    end = log.events[-1]
    assert end["event"] == "log_end"
    assert (end["events"], end["seq"]) == (2, 2)
    assert end["head"] == end["prev"] == sha(log.lines[1])


def test_close_twice_writes_one_trailer_and_emit_after_close_fails(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl", "vm0")
    assert log.path == tmp_path / "a.jsonl"
    log.emit("vm_create", tdp=False)
    log.close()
    log.close()
    assert log.closed
    lines = (tmp_path / "a.jsonl").read_bytes().splitlines()
    assert [orjson.loads(x)["event"] for x in lines] == ["vm_create", "log_end"]
    with pytest.raises(ValueError, match="closed"):
        log.emit("vm_destroy")


def test_context_manager_closes() -> None:
    stream = io.BytesIO()
    with AuditLog(stream, "vm0") as log:
        log.emit("vm_create", tdp=False)
    assert not stream.closed  # a stream belongs to the caller: flushed, not closed
    assert orjson.loads(stream.getvalue().splitlines()[-1])["event"] == "log_end"


def test_debug_events_absent_at_info() -> None:
    log = AuditLog.in_memory(level="info")
    assert log.enabled and not log.debug
    log.emit("zap", "debug", gfn=1, pg_level=1, reason="pte", sptes=1)
    log.emit("track_add", gfn=1, count=1, by="mmu")
    log.emit("track_warn", "warning", gfn=1, op="add", count=1)
    assert [e["event"] for e in log.events] == ["track_add", "track_warn"]
    assert [e["seq"] for e in log.events] == [0, 1]  # no hole where the debug event was dropped


def test_debug_level_writes_debug_events() -> None:
    log = AuditLog.in_memory(level="debug")
    assert log.debug
    log.emit("dirty", "debug", gfn=0x400, slot=1)
    assert log.events[0]["level"] == "debug"


def test_trailer_is_written_whatever_the_level() -> None:
    log = AuditLog.in_memory(level="error")
    log.emit("vm_create", tdp=False)
    log.emit("plugin_error", "error", plugin="p", hook="track_write", error="boom")
    log.close()
    assert [e["event"] for e in log.events] == ["plugin_error", "log_end"]
    assert log.events[-1]["level"] == "info"


def test_disabled_log_does_nothing() -> None:
    log = AuditLog(None, "vm0", level="debug")
    assert not log.enabled and not log.debug and log.path is None
    log.emit("track_add", gfn=1, count=1, by="mmu")
    log.close()
    log.close()
    assert log.events == [] and log.lines == []


def test_bad_level_and_reserved_fields_are_refused() -> None:
    log = AuditLog.in_memory()
    with pytest.raises(ValueError, match="level"):
        log.emit("vm_create", "verbose", tdp=False)
    with pytest.raises(ValueError, match="seq"):
        log.emit("vm_create", seq=3)
    with pytest.raises(ValueError, match="level"):
        AuditLog.in_memory(level="trace")
    assert log.lines == []


def test_unserialisable_field_leaves_no_hole() -> None:
    log = AuditLog.in_memory()
    with pytest.raises(TypeError):
        log.emit("vm_create", tdp=object())
    log.emit("vm_create", tdp=True)
    assert log.events[0]["seq"] == 0 and log.events[0]["prev"] == GENESIS


def test_bytes_become_hex() -> None:
    log = AuditLog.in_memory()
    log.emit(
        "track_write",
        vcpu=0,
        gpa=0x1000,
        len=3,
        data=b"\x00\xab\xff",
        plugins=["a"],
        more=[bytearray(b"\x01"), memoryview(b"\x02\x03")],
    )
    assert log.events[0]["data"] == "00abff"
    assert log.events[0]["more"] == ["01", "0203"]


def test_threads_share_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "threads.jsonl"
    log = AuditLog(path, "vm0")
    start = threading.Barrier(8)

    def vcpu(n: int) -> None:
        start.wait()
        for i in range(300):
            log.emit("emulate", "info", vcpu=n, rip=i, insn="mov [rdi], al")

    threads = [threading.Thread(target=vcpu, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    report = verify(path)
    assert report.ok, report.problems
    assert report.events == 8 * 300


def test_structlog_global_configuration_is_untouched() -> None:
    before = structlog.get_config()
    AuditLog.in_memory().emit("vm_create", tdp=False)
    assert structlog.get_config() == before


def test_interpreter_exit_closes_the_log(tmp_path: Path) -> None:
    path = tmp_path / "exit.jsonl"
    code = (
        "from pagetrack.audit import AuditLog\n"
        f"log = AuditLog({str(path)!r}, 'vm0')\n"
        "log.emit('vm_create', tdp=False)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    report = verify(path)
    assert report.ok and report.events == 1


def test_every_catalog_event_is_documented() -> None:
    docs = (Path(__file__).parents[2] / "docs" / "audit-log.md").read_text()
    for name, (level, fields) in events.CATALOG.items():
        assert f"\n### {name}\n{level}." in docs, name
        assert name in (events.__doc__ or ""), name
        for field in fields:
            assert f"`{field.rstrip('?')}`" in docs, (name, field)
