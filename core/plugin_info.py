"""Plugin metadata and entry-point discovery (no pluggy manager involved).

:class:`PluginInfo` describes one plugin as ``pagetrack plugins`` and
:meth:`pagetrack.plugin_host.PluginHost.infos` show it; :func:`discover_entry_points`
loads the ``pagetrack`` entry-point group one entry point at a time, so that a
broken distribution is recorded instead of aborting discovery (pluggy's
``load_setuptools_entrypoints`` has no error handling; conda#12460, llm#1351).
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Iterable, Mapping
from importlib import metadata
from typing import Any

import attrs

from . import hookspecs

__all__ = [
    "ENTRY_POINT_GROUP",
    "MMU_TRACKER",
    "TRACKER_HOOKS",
    "PluginInfo",
    "discover_entry_points",
    "hook_names",
]

#: Entry-point group scanned for plugins, built-in and third-party alike.
ENTRY_POINT_GROUP = "pagetrack"
#: Name of the MMU's own tracker (``kvm_mmu_track_write``); it is not "external".
MMU_TRACKER = "shadow_mmu"
#: Hooks of KVM's notifier node; implementing one makes a plugin a tracker.
TRACKER_HOOKS = frozenset({"track_write", "track_flush_slot", "track_remove_region"})


def hook_names() -> tuple[str, ...]:
    """Names of every hookspec in :mod:`pagetrack.hookspecs`, in source order."""
    return tuple(
        name
        for name, obj in vars(hookspecs).items()
        if callable(obj) and hasattr(obj, f"{hookspecs.PROJECT}_spec")
    )


@attrs.frozen
class PluginInfo:
    """One plugin as the host sees it: loaded, disabled or failed to load.

    ``external`` is true for a plugin that implements a tracker hook
    (:data:`TRACKER_HOOKS`) and is not the MMU's own tracker: what
    ``kvm_page_track_has_external_user`` counts.
    """

    name: str
    dist: str | None
    version: str | None
    module: str | None
    hooks: tuple[str, ...] = ()
    error: str | None = None
    enabled: bool = True
    external: bool = False
    quarantined: bool = False

    @property
    def status(self) -> str:
        """``"loaded"``, ``"quarantined"``, ``"disabled"`` or ``"failed"``."""
        if self.error is not None and not self.quarantined:
            return "failed"
        if self.quarantined:
            return "quarantined"
        return "loaded" if self.enabled else "disabled"

    def to_dict(self) -> dict[str, Any]:
        """Plain fields plus ``status``, for JSON output."""
        out = attrs.asdict(self)
        out["hooks"] = list(self.hooks)
        out["status"] = self.status
        return out


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def discover_entry_points(
    group: str = ENTRY_POINT_GROUP,
) -> list[tuple[metadata.EntryPoint, object | None, str | None]]:
    """Load every entry point of ``group``; never raise.

    Returns ``(entry_point, loaded_object, error)`` in entry-point name order.
    Each entry point is loaded on its own; any exception (``ImportError``,
    ``SyntaxError``, ``AttributeError`` for a missing attribute, or whatever
    the module raises) becomes ``error`` (``"<ExcType>: <first line>"``) and
    discovery goes on (pluggy's ``load_setuptools_entrypoints`` would abort).
    An entry point seen twice (an editable install visible through two paths)
    is loaded once.
    """
    seen: set[tuple[str, str]] = set()
    unique: list[metadata.EntryPoint] = []
    for ep in metadata.entry_points(group=group):
        key = (ep.name, ep.value)
        if key not in seen:
            seen.add(key)
            unique.append(ep)
    unique.sort(key=lambda ep: (ep.name, ep.value))
    found: list[tuple[metadata.EntryPoint, object | None, str | None]] = []
    for ep in unique:
        try:
            found.append((ep, ep.load(), None))
        except (Exception, SystemExit) as exc:  # a plugin may raise anything at import
            found.append((ep, None, _one_line(exc)))
    return found


def _entry_point_dist(ep: metadata.EntryPoint) -> tuple[str | None, str | None]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    try:
        return dist.name, dist.version
    except Exception:  # broken metadata must not break discovery
        return None, None


def _describe(plugin: object) -> str:
    if isinstance(plugin, types.ModuleType):
        return plugin.__name__
    cls = plugin if isinstance(plugin, type) else type(plugin)
    return f"{cls.__module__}:{cls.__qualname__}"


def _is_external(name: str, hooks: Iterable[str]) -> bool:
    return name != MMU_TRACKER and not TRACKER_HOOKS.isdisjoint(hooks)


def _hooks_declared(plugin: object) -> tuple[str, ...]:
    """Hook names a not-registered plugin declares (for disabled entry points)."""
    marker = f"{hookspecs.PROJECT}_impl"
    found = set()
    for attr in dir(plugin):
        try:
            obj = getattr(plugin, attr)
        except Exception:
            continue
        opts = getattr(obj, marker, None)
        if isinstance(opts, Mapping):
            found.add(opts.get("specname") or attr)
    return tuple(sorted(found))


def _unknown_hook_message(plugin: str, hook: str) -> str:
    close = difflib.get_close_matches(hook, hook_names(), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"plugin {plugin!r} implements unknown hook {hook!r}{hint}"
