"""Entry-point discovery: per-entry-point error capture, de-duplication, enable/disable.

Fake distributions are real ``*.dist-info`` folders on ``sys.path``, so the
code under test goes through ``importlib.metadata`` exactly as for an install.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from pagetrack import plugin_info
from pagetrack.errors import InputError
from pagetrack.plugin_host import PluginHost
from pagetrack.plugin_info import discover_entry_points

GOOD = '''
from pagetrack.hookspecs import hookimpl

@hookimpl
def track_write(gpa, new):
    """Count nothing."""

@hookimpl
def vm_created(vm):
    pass
'''


class FakeAudit:
    enabled = False

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def emit(self, event: str, level: str = "info", **fields: Any) -> None:
        self.events.append({"event": event, "level": level, **fields})


MakeDist = Callable[..., dict[str, str]]


@pytest.fixture
def make_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MakeDist]:
    """``make_dist(dist, {ep_name: (module_source_or_None, "value")})`` → {ep_name: module name}.

    Module names get a unique suffix so tests never share ``sys.modules`` entries.
    """
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    created: list[str] = []

    def make(
        dist: str, eps: dict[str, tuple[str | None, str]], version: str = "1.2.3"
    ) -> dict[str, str]:
        tag = uuid.uuid4().hex[:8]
        lines = ["[pagetrack]"]
        names: dict[str, str] = {}
        for ep, (source, value) in eps.items():
            module = f"{value.split(':')[0]}_{tag}"
            attr = value.partition(":")[2]
            if source is not None:
                (site / f"{module}.py").write_text(source)
            created.append(module)
            names[ep] = module
            lines.append(f"{ep} = {module}{':' + attr if attr else ''}")
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        return names

    yield make
    for module in created:
        sys.modules.pop(module, None)


def _mine(
    found: list[tuple[Any, Any, str | None]], names: dict[str, str]
) -> dict[str, tuple[Any, Any, str | None]]:
    return {ep.name: (ep, obj, err) for ep, obj, err in found if ep.name in names}


def test_each_failure_kind_is_captured(make_dist: MakeDist) -> None:
    """ImportError, SyntaxError, missing attribute, any exception, SystemExit: recorded, never raised."""
    names = make_dist(
        "broken-dist",
        {
            "imports_missing": ("import no_such_module_pagetrack_test\n", "imp"),
            "bad_syntax": ("def f(:\n    pass\n", "syn"),
            "missing_attr": (GOOD, "attr:no_such_attr"),
            "raises": ("raise RuntimeError('plugin exploded\\nsecond line')\n", "rt"),
            "exits": ("import sys\nsys.exit(3)\n", "ex"),
            "no_module": (None, "absent"),
            "good": (GOOD, "good"),
        },
    )
    found = _mine(discover_entry_points(), names)
    assert set(found) == set(names)
    errors = {name: err for name, (_, _, err) in found.items()}
    assert (
        errors["imports_missing"]
        == "ModuleNotFoundError: No module named 'no_such_module_pagetrack_test'"
    )
    assert errors["bad_syntax"] is not None and errors["bad_syntax"].startswith("SyntaxError: ")
    assert errors["missing_attr"] is not None and errors["missing_attr"].startswith(
        "AttributeError: "
    )
    assert "no_such_attr" in errors["missing_attr"]
    assert errors["raises"] == "RuntimeError: plugin exploded"
    assert errors["exits"] == "SystemExit: 3"
    assert errors["no_module"] is not None and errors["no_module"].startswith(
        "ModuleNotFoundError: "
    )
    assert errors["good"] is None
    assert found["good"][1].__name__ == names["good"]
    assert all("\n" not in (e or "") for e in errors.values())


def test_results_in_name_order(make_dist: MakeDist) -> None:
    names = make_dist("order-dist", {"zeta": (GOOD, "z"), "alpha": (GOOD, "a"), "mid": (GOOD, "m")})
    order = [ep.name for ep, _, _ in discover_entry_points() if ep.name in names]
    assert order == ["alpha", "mid", "zeta"]


def test_duplicates_are_loaded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry point listed twice (editable install seen through two paths) is loaded once."""
    ep = metadata.EntryPoint(name="dup", value="pagetrack.hookspecs", group="pagetrack")
    other = metadata.EntryPoint(name="dup2", value="pagetrack.errors", group="pagetrack")
    monkeypatch.setattr(plugin_info.metadata, "entry_points", lambda group: [ep, other, ep])
    found = discover_entry_points()
    assert [(e.name, err) for e, _, err in found] == [("dup", None), ("dup2", None)]


class TestLoadEntryPoints:
    def test_loaded_and_failed(self, make_dist: MakeDist) -> None:
        """Failures are listed with their error and audited; the good plugin still loads."""
        make_dist("pt-good", {"pt_good": (GOOD, "good")}, version="0.4")
        make_dist("pt-bad", {"pt_bad": ("raise ImportError('needs libfoo')\n", "bad")})
        audit = FakeAudit()
        host = PluginHost(audit=audit)
        infos = {i.name: i for i in host.load_entry_points() if i.name.startswith("pt_")}
        good, bad = infos["pt_good"], infos["pt_bad"]
        assert (good.status, good.dist, good.version, good.hooks) == (
            "loaded",
            "pt-good",
            "0.4",
            ("track_write", "vm_created"),
        )
        assert good.external and good.enabled and good.module.startswith("good_")
        assert (bad.status, bad.error, bad.dist, bad.enabled) == (
            "failed",
            "ImportError: needs libfoo",
            "pt-bad",
            False,
        )
        failed = [e for e in audit.events if e["event"] == "plugin_load_failed"]
        assert {
            "event": "plugin_load_failed",
            "level": "warning",
            "entry_point": "pt_bad",
            "error": "ImportError: needs libfoo",
        } in failed
        registered = [
            e
            for e in audit.events
            if e["event"] == "plugin_registered" and e["plugin"] == "pt_good"
        ]
        assert registered == [
            {
                "event": "plugin_registered",
                "level": "info",
                "plugin": "pt_good",
                "dist": "pt-good",
                "version": "0.4",
                "external": True,
            }
        ]
        assert {i.name for i in host.infos()} >= {"pt_good", "pt_bad"}
        assert host.get("pt_good") is not None and host.get("pt_bad") is None

    def test_second_load_is_idempotent(self, make_dist: MakeDist) -> None:
        make_dist("pt-good", {"pt_good": (GOOD, "good")})
        host = PluginHost()
        host.load_entry_points(enable=["pt_good"])
        host.load_entry_points(enable=["pt_good"])
        assert host.names() == ["pt_good"]

    def test_misspelled_hook_in_entry_point(self, make_dist: MakeDist) -> None:
        """An entry point whose module implements an unknown hook is failed, not fatal."""
        make_dist(
            "pt-typo",
            {
                "pt_typo": (
                    "from pagetrack.hookspecs import hookimpl\n"
                    "@hookimpl\ndef track_remove_regoin(gfn):\n    pass\n",
                    "typo",
                )
            },
        )
        host = PluginHost()
        info = {i.name: i for i in host.load_entry_points()}["pt_typo"]
        assert info.status == "failed"
        assert info.error is not None and "'track_remove_regoin'" in info.error
        assert "did you mean 'track_remove_region'" in info.error
        host.check_pending()  # nothing unknown stayed registered

    def test_enable_and_disable(self, make_dist: MakeDist) -> None:
        make_dist("pt-three", {"pt_a": (GOOD, "a"), "pt_b": (GOOD, "b"), "pt_c": (GOOD, "c")})
        host = PluginHost()
        infos = {
            i.name: i for i in host.load_entry_points(enable=["pt_a", "pt_b"], disable=["pt_b"])
        }
        assert host.names() == ["pt_a"]
        assert infos["pt_b"].status == "disabled" and infos["pt_c"].status == "disabled"
        assert infos["pt_c"].hooks == ("track_write", "vm_created") and infos["pt_c"].external
        assert {i.name: i.status for i in host.infos()}["pt_c"] == "disabled"

    def test_disable_only(self, make_dist: MakeDist) -> None:
        make_dist("pt-two", {"pt_a": (GOOD, "a"), "pt_b": (GOOD, "b")})
        host = PluginHost()
        host.load_entry_points(disable=["pt_b"])
        assert "pt_a" in host.names() and "pt_b" not in host.names()

    def test_unknown_enable_name(self, make_dist: MakeDist) -> None:
        make_dist("pt-one", {"pt_a": (GOOD, "a")})
        with pytest.raises(InputError, match="no plugin entry point named pt_nope"):
            PluginHost().load_entry_points(enable=["pt_a", "pt_nope"])

    def test_lifo_across_entry_points(self, make_dist: MakeDist) -> None:
        """Entry points register in name order, so the last name is called first (case 25)."""
        make_dist("pt-order", {"pt_a": (GOOD, "a"), "pt_b": (GOOD, "b")})
        host = PluginHost()
        host.load_entry_points(enable=["pt_a", "pt_b"])
        assert host.call_order("track_write") == ["pt_b", "pt_a"]
