"""The verifier: clean logs pass, tampering is located, invariant violations are found."""

from __future__ import annotations

import hashlib
from pathlib import Path

import orjson
import pytest
from audit_helpers import Op, build, ops, write_lines
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pagetrack.audit import AuditLog, Problem, verify
from pagetrack.errors import InputError

# tmp_path is per test, not per example: each example overwrites the same file.
HYP = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def chain(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if p.kind == "chain"]


def invariant(problems: list[Problem]) -> list[str]:
    return [p.message for p in problems if p.kind == "invariant"]


def seq_of(line: bytes) -> int | None:
    try:
        seq = orjson.loads(line).get("seq")
    except orjson.JSONDecodeError:
        return None
    return seq if isinstance(seq, int) else None


def _changed(value: object) -> object:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return [*value, "x"]
    return "x"


# ---- clean logs ---------------------------------------------------------------------
@HYP
@given(st.lists(ops, max_size=25))
def test_a_clean_log_passes(tmp_path: Path, history: list[Op]) -> None:
    log = build(history)
    report = verify(write_lines(tmp_path / "a.jsonl", log.lines))
    assert report.ok, report.problems
    assert report.events == len(log.lines) - 1
    assert sum(report.counts_by_event.values()) == report.events
    assert report.head == hashlib.sha256(log.lines[-2]).hexdigest()


def test_counts_per_event_and_plugin(tmp_path: Path) -> None:
    log = build(
        [("write", ["gvt", "dirty_log"], b"\x01"), ("write", ["gvt"], b"\x02"), ("add", 0x400)]
    )
    report = verify(write_lines(tmp_path / "a.jsonl", log.lines))
    assert report.counts_by_event == {
        "track_add": 1,
        "track_write": 2,
        "track_write_call": 3,
        "vm_create": 1,
        "vm_destroy": 1,
    }
    assert report.counts_by_plugin == {"dirty_log": {"ok": 1}, "gvt": {"ok": 2}}
    assert report.vm == "vm0"


def test_a_real_file_log_passes(tmp_path: Path) -> None:
    path = tmp_path / "real.jsonl"
    with AuditLog(path, "vm1", level="debug") as log:
        log.emit("vm_create", tdp=True)
        log.emit("zap", "debug", gfn=1, pg_level=2, reason="flooded", sptes=3)
    assert verify(path).ok
    assert verify(str(path)).ok


# ---- tampering (hypothesis over random logs and positions) ------------------------------
@HYP
@given(st.lists(ops, min_size=1, max_size=20), st.data())
def test_an_edited_field_is_located(tmp_path: Path, history: list[Op], data: st.DataObject) -> None:
    lines = list(build(history).lines)
    i = data.draw(st.integers(0, len(lines) - 1), label="line")
    ev = orjson.loads(lines[i])
    keys = sorted(k for k in ev if not (i == 0 and k == "schema"))  # schema of line 1: InputError
    if i == len(lines) - 1:
        keys.remove("ts")  # the trailer's ts is the one field no hash covers (documented)
    key = data.draw(st.sampled_from(keys), label="key")
    ev[key] = _changed(ev[key])
    lines[i] = orjson.dumps(ev, option=orjson.OPT_SORT_KEYS)
    report = verify(write_lines(tmp_path / "t.jsonl", lines))
    assert not report.ok
    first = chain(report.problems)[0]
    # a changed line is caught on that line (seq, prev, envelope) or at the next line's prev
    must_be_here = key in ("seq", "prev") or i == len(lines) - 1
    assert first.line == i + 1 if must_be_here else first.line in (i + 1, i + 2)
    assert first.seq == seq_of(lines[first.line - 1])


@HYP
@given(st.lists(ops, min_size=1, max_size=20), st.data())
def test_a_deleted_line_is_located(tmp_path: Path, history: list[Op], data: st.DataObject) -> None:
    lines = list(build(history).lines)
    i = data.draw(st.integers(0, len(lines) - 1), label="deleted")
    del lines[i]
    report = verify(write_lines(tmp_path / "t.jsonl", lines))
    first = chain(report.problems)[0]
    if i == len(lines):  # the trailer: the log now ends without one
        assert (first.line, first.seq) == (len(lines), len(lines) - 1)
        assert "no log_end trailer" in first.message
    else:
        assert (first.line, first.seq) == (i + 1, i + 1)
        assert "1 event(s) missing" in first.message


@HYP
@given(st.lists(ops, min_size=1, max_size=20), st.data())
def test_swapped_lines_are_located(tmp_path: Path, history: list[Op], data: st.DataObject) -> None:
    lines = list(build(history).lines)
    i = data.draw(st.integers(0, len(lines) - 2), label="i")
    j = data.draw(st.integers(i + 1, len(lines) - 1), label="j")
    lines[i], lines[j] = lines[j], lines[i]
    report = verify(write_lines(tmp_path / "t.jsonl", lines))
    first = chain(report.problems)[0]
    assert (first.line, first.seq) == (i + 1, j)


@HYP
@given(st.lists(ops, min_size=1, max_size=20), st.data())
def test_a_cut_last_line_is_located(tmp_path: Path, history: list[Op], data: st.DataObject) -> None:
    lines = build(history).lines
    body = b"".join(line + b"\n" for line in lines)
    cut = data.draw(st.integers(len(body) - len(lines[-1]), len(body) - 1), label="cut")
    path = tmp_path / "t.jsonl"
    path.write_bytes(body[:cut])
    report = verify(path)
    first = chain(report.problems)[0]
    assert first.line == len(lines)
    assert "truncated" in first.message


def test_an_edited_trailer_is_rejected(tmp_path: Path) -> None:
    lines = build([("add", 0x400)]).lines
    for key, value in (
        ("events", 99),
        ("head", "0" * 64),
        ("event", "vm_destroy"),
        ("level", "error"),
    ):
        ev = orjson.loads(lines[-1])
        ev[key] = value
        report = verify(write_lines(tmp_path / "t.jsonl", [*lines[:-1], orjson.dumps(ev)]))
        assert [p.line for p in chain(report.problems)] == [len(lines)] * len(
            chain(report.problems)
        ), key
        assert report.problems, key


def test_an_appended_event_after_the_trailer_is_rejected(tmp_path: Path) -> None:
    first = build([]).lines
    second = build([], vm_id="vm0").lines
    report = verify(write_lines(tmp_path / "t.jsonl", [*first, *second]))
    assert chain(report.problems)[0].line == len(first) + 1


def test_problems_beyond_the_cap_are_counted(tmp_path: Path) -> None:
    lines = list(build([("add", 0x400)] * 30).lines)
    report = verify(write_lines(tmp_path / "t.jsonl", lines[::-1]), max_problems=5)
    assert len(report.problems) == 5 and report.problems_dropped > 0 and not report.ok


# ---- invariants -------------------------------------------------------------------------
def _replay(tmp_path: Path, *events: tuple[str, dict[str, object]]) -> list[str]:
    log = AuditLog.in_memory()
    for name, fields in events:
        log.emit(name, **fields)
    log.close()
    report = verify(write_lines(tmp_path / "inv.jsonl", log.lines))
    assert not chain(report.problems)
    return invariant(report.problems)


def add(gfn: int, count: int) -> tuple[str, dict[str, object]]:
    return "track_add", {"gfn": gfn, "count": count, "by": "external"}


def remove(gfn: int, count: int) -> tuple[str, dict[str, object]]:
    return "track_remove", {"gfn": gfn, "count": count, "by": "external"}


def memslot(
    change: str, base: int = 0x400, npages: int = 16, **more: object
) -> tuple[str, dict[str, object]]:
    return "memslot", {
        "change": change,
        "slot": 1,
        "base_gfn": base,
        "npages": npages,
        "flags": 0,
        **more,
    }


def region(gfn: int = 0x400, nr_pages: int = 16) -> tuple[str, dict[str, object]]:
    return "track_remove_region", {"gfn": gfn, "nr_pages": nr_pages}


def write(*plugins: str, gpa: int = 0x400008) -> tuple[str, dict[str, object]]:
    return "track_write", {
        "vcpu": 0,
        "gpa": gpa,
        "len": 1,
        "data": b"\x01",
        "plugins": list(plugins),
    }


def call(plugin: str, gpa: int = 0x400008, outcome: str = "ok") -> tuple[str, dict[str, object]]:
    return "track_write_call", {"plugin": plugin, "gpa": gpa, "outcome": outcome}


def test_counts_step_by_one(tmp_path: Path) -> None:
    # kvm-page-track.md §2.2/2.3: add +1, remove -1 (__kvm_write_track_add_gfn / _remove_gfn)
    assert _replay(tmp_path, add(0x400, 1), add(0x400, 2), remove(0x400, 1), remove(0x400, 0)) == []


def test_a_count_jump_is_found(tmp_path: Path) -> None:
    (msg,) = _replay(tmp_path, add(0x400, 1), add(0x400, 3), remove(0x400, 2))
    assert "count 3, expected 2" in msg


def test_a_negative_count_is_found(tmp_path: Path) -> None:
    (msg,) = _replay(tmp_path, remove(0x400, -1))
    assert "outside 0..65535" in msg
    (msg,) = _replay(tmp_path, add(0x401, 1), remove(0x401, 0), remove(0x401, 0))
    assert "track_remove from 0" in msg


def test_a_count_past_65535_is_found(tmp_path: Path) -> None:
    (msg,) = _replay(tmp_path, add(0x400, 65536))
    assert "outside 0..65535" in msg


def test_track_warn_only_at_the_limits(tmp_path: Path) -> None:
    # kvm-page-track.md §2.1: update_gfn_write_track WARNs past 0 or 65535 and changes nothing
    warn_remove = ("track_warn", {"gfn": 0x400, "op": "remove", "count": 0})
    assert _replay(tmp_path, warn_remove) == []
    (msg,) = _replay(
        tmp_path, add(0x400, 1), ("track_warn", {"gfn": 0x400, "op": "remove", "count": 1})
    )
    assert "no overflow" in msg
    msgs = _replay(tmp_path, add(0x400, 1), ("track_warn", {"gfn": 0x400, "op": "add", "count": 7}))
    assert any("the counter is 1" in m for m in msgs)


def test_missing_fields_are_found(tmp_path: Path) -> None:
    (msg,) = _replay(tmp_path, ("track_add", {"gfn": 0x400, "by": "mmu"}))
    assert "lacks count" in msg
    (msg,) = _replay(tmp_path, ("track_add", {"gfn": "0x400", "count": 1, "by": "mmu"}))
    assert "gfn is not an integer" in msg


def test_track_write_calls_in_order_pass(tmp_path: Path) -> None:
    events = (write("gvt", "shadow_mmu"), call("gvt"), call("shadow_mmu", outcome="error"), write())
    assert _replay(tmp_path, *events) == []


def test_a_missing_track_write_call_is_found(tmp_path: Path) -> None:
    (msg,) = _replay(tmp_path, write("gvt", "shadow_mmu"), call("gvt"), write("gvt"), call("gvt"))
    assert "without track_write_call for shadow_mmu" in msg
    (msg,) = _replay(tmp_path, write("gvt"))  # none before the end of the log
    assert "without track_write_call for gvt" in msg


def test_a_duplicate_track_write_call_is_found(tmp_path: Path) -> None:
    (msg,) = _replay(
        tmp_path, write("gvt", "dirty_log"), call("gvt"), call("gvt"), call("dirty_log")
    )
    assert "duplicate" in msg
    (msg,) = _replay(tmp_path, write("gvt"), call("gvt"), call("gvt"))
    assert "no call due" in msg


def test_track_write_calls_out_of_order_or_elsewhere_are_found(tmp_path: Path) -> None:
    msgs = _replay(tmp_path, write("gvt", "dirty_log"), call("dirty_log"), call("gvt"))
    assert "before gvt" in msgs[0]
    (msg,) = _replay(tmp_path, write("gvt"), call("gvt", gpa=0x999000))
    assert "gpa" in msg


def test_delete_with_counts_needs_track_remove_region(tmp_path: Path) -> None:
    # kvm-page-track.md §5: DELETE drops external counts; 6.6+ tells trackers via track_remove_region
    (msg,) = _replay(tmp_path, add(0x404, 1), memslot("delete"))
    assert "without track_remove_region" in msg
    assert _replay(tmp_path, add(0x404, 1), region(), memslot("delete")) == []
    # kvm_arch_commit_memory_region notifies after the slot is gone: accepted too
    assert _replay(tmp_path, add(0x404, 1), memslot("delete"), region()) == []
    (msg,) = _replay(tmp_path, add(0x404, 1), region(0x400, 8), memslot("delete"))  # wrong range
    assert "without track_remove_region" in msg


def test_delete_and_move_reset_counts(tmp_path: Path) -> None:
    events = (add(0x404, 1), region(), memslot("delete"), memslot("create"), add(0x404, 1))
    assert _replay(tmp_path, *events) == []
    # MOVE: the new slot gets fresh, zeroed metadata (kvm_alloc_memslot_metadata); no notice needed
    moved = (
        add(0x404, 1),
        memslot("move", base=0x800, old_base_gfn=0x400),
        add(0x404, 1),
        add(0x804, 1),
    )
    assert _replay(tmp_path, *moved) == []
    # FLAGS_ONLY shares the counter array: counts survive
    (msg,) = _replay(tmp_path, add(0x404, 1), memslot("flags_only"), add(0x404, 1))
    assert "expected 2" in msg


def test_a_delete_of_an_untracked_slot_needs_no_notice(tmp_path: Path) -> None:
    assert _replay(tmp_path, add(0x404, 1), remove(0x404, 0), memslot("delete")) == []
    assert _replay(tmp_path, add(0x900, 1), memslot("delete")) == []  # outside the slot


# ---- not an audit log ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"\n", "empty"),
        (bytes(range(256)).replace(b"\n", b""), "not a JSON object"),
        (b"hello world\n", "not a JSON object"),
        (b"[1, 2, 3]\n", "not a JSON object"),
        (b'{"a": 1}\n', "lacks schema, seq, vm, event, level, ts, prev"),
        (
            b'{"schema": 9, "seq": 0, "vm": "v", "event": "e", "level": "info", "ts": "", "prev": ""}\n',
            "unsupported audit schema 9",
        ),
    ],
    ids=["empty", "blank", "binary", "text", "array", "fields", "schema"],
)
def test_not_an_audit_log(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message) as exc:
        verify(path)
    assert "\n" not in str(exc.value) and str(path) in str(exc.value)


def test_a_missing_file_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such audit log"):
        verify(tmp_path / "nope.jsonl")


def test_a_directory_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError):
        verify(tmp_path)
