"""Plugin host: entry-point discovery, registration, isolated typed hook dispatch.

Models KVM's page-track notifier list (``struct kvm_page_track_notifier_head``,
arch/x86/kvm/mmu/page_track.c) on top of pluggy:

* :class:`PluginHost` owns one ``pluggy.PluginManager("pagetrack")`` per VM.
  :meth:`PluginHost.register` is ``kvm_page_track_register_notifier``,
  :meth:`PluginHost.unregister` is ``kvm_page_track_unregister_notifier``
  (it returns only after in-flight notifications finished: ``synchronize_srcu``),
  :meth:`PluginHost.has_external_tracker` is ``kvm_page_track_has_external_user``.
* :class:`HookBus` is the typed facade core code calls instead of ``pm.hook``.
  It calls every hookimpl itself, in pluggy's order (tryfirst, then most
  recently registered first, trylast last), so that one plugin raising does
  not stop the others (pluggy does not isolate, pluggy#419).

Error policy (``strict=False``, the default): an impl that raises is reported
(audit ``plugin_error``), **quarantined** (never called again, for any hook;
audit ``plugin_quarantined``), the remaining impls of the call still run and
the caller carries on: a write already committed stays committed, once.
With ``strict=True`` the exception propagates at once (for tests).

Concurrency: dispatchers enter a cheap read side and iterate an immutable
snapshot of the per-hook impl lists; register/unregister build a new snapshot
and swap it in; unregister then waits until no reader of an older snapshot is
left (SRCU: ``srcu_read_lock`` / ``synchronize_srcu`` on ``track_srcu``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Mapping
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Protocol

import pluggy

from . import hookspecs
from .errors import InputError
from .plugin_info import (
    ENTRY_POINT_GROUP,
    PluginInfo,
    _describe,
    _entry_point_dist,
    _hooks_declared,
    _is_external,
    _one_line,
    _unknown_hook_message,
    discover_entry_points,
    hook_names,
)

if TYPE_CHECKING:
    from .memory import MemSlot

__all__ = ["AuditSink", "HookBus", "PluginHost"]

_get_ident = threading.get_ident


class AuditSink(Protocol):
    """What the host needs of an audit log (``pagetrack.audit.AuditLog`` has it)."""

    @property
    def enabled(self) -> bool: ...

    def emit(self, event: str, level: str = "info", **fields: Any) -> Any: ...


class _NullAudit:
    """Audit sink used when none is given: records nothing."""

    enabled = False

    def emit(self, event: str, level: str = "info", **fields: Any) -> None:
        return None


# --- the read side: snapshots and the SRCU-like gate --------------------------------------


class _Live:
    """Per-plugin switch checked before every call; cleared on unregister and quarantine."""

    __slots__ = ("live", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.live = True


# One impl in call order: (plugin name, callable taking the hook's args positionally, switch).
_Entry = tuple[str, Callable[..., Any], _Live]


class _Snapshot:
    """Immutable per-hook impl lists plus the threads currently iterating them.

    ``readers`` holds one thread ident per read section (a thread nests by
    appearing several times); ``list.append``/``list.remove`` are atomic, so
    the read side takes no lock.
    """

    __slots__ = ("external", "readers", "retired", "table")

    def __init__(self, table: dict[str, tuple[_Entry, ...]], external: bool) -> None:
        self.table = table
        self.external = external
        self.readers: list[int] = []
        self.retired = False


def _adapter(
    fn: Callable[..., Any], spec_args: tuple[str, ...], impl_args: tuple[str, ...]
) -> Callable[..., Any]:
    """A callable taking all of the hook's args positionally and passing ``fn`` its subset."""
    if impl_args == spec_args:
        return fn
    idx = [spec_args.index(a) for a in impl_args]
    if not idx:
        return lambda *args: fn()
    if len(idx) == 1:
        (i,) = idx
        return lambda *args: fn(args[i])
    pick = itemgetter(*idx)
    return lambda *args: fn(*pick(args))


class PluginHost:
    """The plugins of one VM: discovery, registration, order, isolation policy.

    Models KVM's notifier head (``kvm->arch.track_notifier_head``): an SRCU
    domain plus an LIFO list, here a ``pluggy.PluginManager`` whose impl lists
    are snapshotted for :class:`HookBus`.
    """

    def __init__(self, *, audit: AuditSink | None = None, strict: bool = False) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        #: Re-raise a hookimpl's exception instead of quarantining the plugin.
        self.strict = strict
        self.audit: AuditSink = audit if audit is not None else _NullAudit()
        self._spec_args: dict[str, tuple[str, ...]] = {}
        for name in self.hook_names():
            spec = getattr(self.pm.hook, name).spec
            assert spec is not None
            self._spec_args[name] = tuple(spec.argnames)
        self._dists: dict[str, tuple[str | None, str | None, str | None]] = {}
        self._not_loaded: dict[str, PluginInfo] = {}  # disabled or failed entry points
        self._switches: dict[str, _Live] = {}
        self._errors: dict[str, str] = {}  # quarantined plugin -> error
        self._write_lock = threading.RLock()
        self._quarantine_lock = threading.Lock()
        self._cond = threading.Condition(threading.Lock())  # writers wait here for readers
        self._retired: list[_Snapshot] = []
        self._snap = _Snapshot({}, False)

    # -- introspection ------------------------------------------------------------------

    @staticmethod
    def hook_names() -> tuple[str, ...]:
        """Names of every hookspec in :mod:`pagetrack.hookspecs`, in source order."""
        return hook_names()

    def spec_args(self, hookname: str) -> tuple[str, ...]:
        """The argument names of hookspec ``hookname``, in order."""
        return self._spec_args[hookname]

    def get(self, name: str) -> object | None:
        """The registered plugin called ``name``, or ``None``."""
        return self.pm.get_plugin(name)

    def names(self) -> list[str]:
        """Names of the registered plugins, in registration order."""
        return [name for name, _ in self.pm.list_name_plugin()]

    def hooks_implemented(self, hookname: str) -> bool:
        """Whether any live plugin implements ``hookname`` (cheap: one dict lookup)."""
        return bool(self._snap.table.get(hookname))

    def has_external_tracker(self) -> bool:
        """``kvm_page_track_has_external_user``: a tracker other than the MMU's is registered.

        A quarantined tracker still counts: like a notifier node whose owner
        misbehaves, it stays on the list (and holds its counts) until unregistered.
        """
        return self._snap.external

    def call_order(self, hookname: str) -> list[str]:
        """Plugin names in the order :class:`HookBus` calls them for ``hookname``."""
        return [name for name, _, sw in self._snap.table.get(hookname, ()) if sw.live]

    def is_quarantined(self, name: str) -> bool:
        """Whether plugin ``name`` was quarantined after raising."""
        return name in self._errors

    def infos(self) -> list[PluginInfo]:
        """Every plugin known: registered (loaded or quarantined), disabled, failed; by name."""
        out = dict(self._not_loaded)
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:
                continue
            out[name] = self._info(name, plugin)
        return [out[name] for name in sorted(out)]

    def _hooks_of(self, plugin: object) -> tuple[str, ...]:
        callers = self.pm.get_hookcallers(plugin) or []
        return tuple(sorted({c.name for c in callers}))

    def _info(self, name: str, plugin: object) -> PluginInfo:
        dist, version, module = self._dists.get(name, (None, None, None))
        hooks = self._hooks_of(plugin)
        error = self._errors.get(name)
        return PluginInfo(
            name=name,
            dist=dist,
            version=version,
            module=module or _describe(plugin),
            hooks=hooks,
            error=error,
            enabled=error is None,
            external=_is_external(name, hooks),
            quarantined=error is not None,
        )

    # -- registration -------------------------------------------------------------------

    def load_entry_points(
        self,
        enable: Collection[str] | None = None,
        disable: Collection[str] = (),
        *,
        group: str = ENTRY_POINT_GROUP,
    ) -> list[PluginInfo]:
        """Discover and register the plugins of entry-point group ``group``.

        ``enable=None`` enables every entry point, otherwise only the names
        listed (an unknown name is an :class:`InputError`); ``disable`` wins
        over ``enable``.  Entry points are registered in name order, so (LIFO)
        the last name is called first.  One that fails to load or to register
        (bad hook arguments, unknown hook) is recorded as failed
        (audit ``plugin_load_failed``) and the others still load.
        Returns the infos of the entry points seen.
        """
        found = discover_entry_points(group)
        if enable is not None:
            unknown = sorted(set(enable) - {ep.name for ep, _, _ in found})
            if unknown:
                known = ", ".join(sorted(ep.name for ep, _, _ in found)) or "none"
                raise InputError(
                    f"no plugin entry point named {', '.join(unknown)} (installed: {known})",
                    where="enable",
                )
        infos: list[PluginInfo] = []
        for ep, obj, error in found:
            dist, version = _entry_point_dist(ep)
            if error is None and self.get(ep.name) is obj:
                infos.append(self._info(ep.name, obj))  # loaded by an earlier call
                continue
            if error is None and (
                ep.name in disable or (enable is not None and ep.name not in enable)
            ):
                hooks = _hooks_declared(obj)
                info = PluginInfo(
                    ep.name,
                    dist,
                    version,
                    ep.value,
                    hooks,
                    enabled=False,
                    external=_is_external(ep.name, hooks),
                )
                self._not_loaded[ep.name] = info
                infos.append(info)
                continue
            if error is None:
                try:
                    self._register(obj, ep.name, (dist, version, ep.value))
                    infos.append(self._info(ep.name, obj))
                    continue
                except InputError as exc:
                    error = f"{type(exc.__cause__ or exc).__name__}: {exc}"
            info = PluginInfo(ep.name, dist, version, ep.value, error=error, enabled=False)
            self._not_loaded[ep.name] = info
            self.audit.emit("plugin_load_failed", "warning", entry_point=ep.name, error=error)
            infos.append(info)
        return infos

    def register(self, plugin: object, name: str | None = None) -> str:
        """``kvm_page_track_register_notifier``: add ``plugin``, return its name.

        ``name`` defaults to the module's or class's ``__name__``, or for an
        instance its class name (``Tracker``, ``Tracker#2`` ...).

        The plugin is called before every plugin registered earlier (LIFO),
        except that ``tryfirst``/``trylast`` impls keep their bucket.  Raises
        :class:`InputError` (and registers nothing) for a name already in
        use, an impl argument the hookspec does not have, a hook wrapper
        (isolated dispatch cannot run them), or a hook name that is not in
        :mod:`pagetrack.hookspecs` unless marked ``optionalhook``.
        """
        return self._register(plugin, name, None)

    def _register(
        self,
        plugin: object,
        name: str | None,
        origin: tuple[str | None, str | None, str | None] | None,
    ) -> str:
        with self._write_lock:
            if name is None:
                name = self._default_name(plugin)
            label = name
            try:
                canonical = self.pm.register(plugin, name)
            except pluggy.PluginValidationError as exc:
                # pluggy has already recorded the name and the impls checked before the bad one
                if self.pm.is_registered(plugin):
                    self.pm.unregister(plugin)
                raise InputError(f"plugin {label!r}: {exc}") from exc
            except ValueError as exc:  # duplicate name or object
                raise InputError(f"plugin {label!r}: {exc}") from exc
            if canonical is None:  # blocked name
                raise InputError(f"plugin {label!r} is blocked")
            try:
                self._validate(canonical, plugin)
            except InputError:
                self.pm.unregister(plugin)
                raise
            self._not_loaded.pop(canonical, None)
            self._errors.pop(canonical, None)
            if origin is not None:
                self._dists[canonical] = origin
            self._switches[canonical] = _Live(canonical)
            self._publish(wait=False)
            info = self._info(canonical, plugin)
        self.audit.emit(
            "plugin_registered",
            plugin=canonical,
            dist=info.dist,
            version=info.version,
            external=info.external,
        )
        return canonical

    def _default_name(self, plugin: object) -> str:
        """pluggy's name for modules and classes (``__name__``); the class name for an
        instance (pluggy would use ``str(id(obj))``), made unique with ``#2``, ``#3`` ..."""
        base = getattr(plugin, "__name__", None)
        if not isinstance(base, str):
            base = type(plugin).__name__
        name, n = base, 1
        while self.pm.has_plugin(name) or self.pm.is_blocked(name):
            n += 1
            name = f"{base}#{n}"
        return name

    def _validate(self, name: str, plugin: object) -> None:
        for caller in self.pm.get_hookcallers(plugin) or []:
            for impl in caller.get_hookimpls():
                if impl.plugin is not plugin:
                    continue
                if caller.spec is None and not impl.optionalhook:
                    raise InputError(_unknown_hook_message(name, caller.name))
                if impl.hookwrapper or impl.wrapper:
                    raise InputError(
                        f"plugin {name!r}: hook wrapper {caller.name!r} is not supported "
                        "(pagetrack calls each impl itself to isolate errors)"
                    )

    def unregister(self, name_or_plugin: str | object) -> str:
        """``kvm_page_track_unregister_notifier``: remove a plugin, return its name.

        When this returns, no call of the plugin is in flight in any thread and
        none will start (``synchronize_srcu``).  Called from inside a hook, the
        calling thread's own dispatch is not waited for; it just skips the
        plugin from then on.  As in KVM, write-track counts the plugin added
        are not removed for it.
        """
        with self._write_lock:
            if isinstance(name_or_plugin, str):
                name = name_or_plugin
                plugin = self.pm.get_plugin(name)
            else:
                plugin = name_or_plugin
                name = self.pm.get_name(plugin) or ""
            if plugin is None or not name:
                raise InputError(f"no plugin {name_or_plugin!r} is registered")
            self.pm.unregister(plugin, name)
            switch = self._switches.pop(name, None)
            if switch is not None:
                switch.live = False
            self._dists.pop(name, None)
            self._errors.pop(name, None)
            self._publish(wait=True)
        self.audit.emit("plugin_unregistered", plugin=name)
        return name

    def check_pending(self) -> None:
        """pluggy's ``check_pending``: every registered impl must have a hookspec.

        Raises :class:`InputError` naming the plugin and the unknown hook
        (``register`` already refuses these; this catches plugins registered
        on :attr:`pm` directly).
        """
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            plugin = exc.plugin
            name = self.pm.get_name(plugin) or _describe(plugin)
            hooks = [c.name for c in self.pm.get_hookcallers(plugin) or [] if c.spec is None]
            raise InputError(_unknown_hook_message(name, hooks[0] if hooks else "?")) from exc

    # -- quarantine (called by HookBus on the read side) ----------------------------------

    def _plugin_failed(self, name: str, hook: str, exc: Exception) -> None:
        error = _one_line(exc)
        self.audit.emit("plugin_error", "error", plugin=name, hook=hook, error=error)
        if self.strict:
            raise exc
        with self._quarantine_lock:  # two threads failing in one plugin quarantine it once
            switch = self._switches.get(name)
            if switch is None or not switch.live:
                return
            switch.live = False
            self._errors[name] = error
        self.audit.emit("plugin_quarantined", "warning", plugin=name, hook=hook)
        # Drop it from the snapshot if no writer is busy; never block a reader on a writer
        # (an unregister in another thread may be waiting for this very reader).
        if self._write_lock.acquire(blocking=False):
            try:
                self._publish(wait=False)
            finally:
                self._write_lock.release()

    # -- snapshots ------------------------------------------------------------------------

    def _build(self) -> _Snapshot:
        table: dict[str, tuple[_Entry, ...]] = {}
        external = False
        for hook, spec_args in self._spec_args.items():
            entries: list[_Entry] = []
            for impl in reversed(getattr(self.pm.hook, hook).get_hookimpls()):
                name = impl.plugin_name
                switch = self._switches.get(name)
                if switch is None or not switch.live or impl.hookwrapper or impl.wrapper:
                    continue
                entries.append(
                    (name, _adapter(impl.function, spec_args, tuple(impl.argnames)), switch)
                )
            if entries:
                table[hook] = tuple(entries)
        for name, plugin in self.pm.list_name_plugin():
            if (
                plugin is not None
                and name in self._switches
                and _is_external(name, self._hooks_of(plugin))
            ):
                external = True
        return _Snapshot(table, external)

    def _publish(self, wait: bool) -> None:
        """Swap in a fresh snapshot; with ``wait``, ``synchronize_srcu`` on the old ones.

        Why readers need no lock: a reader loads ``_snap``, appends its thread
        id to that snapshot's ``readers``, then checks each plugin's switch
        right before calling it.  Unregister clears the switch *before* the
        swap and scans ``readers`` *after* it.  A reader whose append the scan
        missed appended after the scan, hence after the switch was cleared,
        and so skips the plugin; every other reader is waited for.  The
        calling thread's own read sections (unregister from inside a hook) are
        not waited for: it checks the switch itself before each later call.
        """
        new = self._build()
        me = threading.get_ident()
        with self._cond:
            old = self._snap
            old.retired = True
            self._snap = new
            self._retired = [s for s in (*self._retired, old) if s.readers]
            if wait:
                self._cond.wait_for(lambda: not self._others_reading(me))

    def _others_reading(self, me: int) -> bool:
        return any(tid != me for snap in self._retired for tid in tuple(snap.readers))

    def _wake(self) -> None:
        """A reader left a retired snapshot: let a waiting unregister re-check."""
        with self._cond:
            self._cond.notify_all()

    def _enter(self) -> tuple[_Snapshot, int]:
        """``srcu_read_lock``: pin the current snapshot for this thread."""
        tid = threading.get_ident()
        snap = self._snap
        snap.readers.append(tid)
        return snap, tid

    def _exit(self, snap: _Snapshot, tid: int) -> None:
        """``srcu_read_unlock``."""
        snap.readers.remove(tid)
        if snap.retired:
            self._wake()


class HookBus:
    """Typed facade over the hooks: one method per hookspec, same arguments.

    Each method calls the impls itself, in pluggy's order, isolating errors
    as described in the module docstring.  Core code calls these and never
    ``pm.hook``.  :meth:`hooks_implemented` lets a caller skip building
    arguments when nobody listens.
    """

    def __init__(self, host: PluginHost, audit: AuditSink | None = None) -> None:
        self.host = host
        self.audit: AuditSink = audit if audit is not None else host.audit
        self._monitors: tuple[Callable[[str, dict[str, Any]], None], ...] = ()
        self._audit_lock = threading.RLock()

    def hooks_implemented(self, hookname: str) -> bool:
        """Whether any live plugin implements ``hookname``."""
        return bool(self.host._snap.table.get(hookname))

    def add_monitor(self, fn: Callable[[str, dict[str, Any]], None]) -> Callable[[], None]:
        """Call ``fn(hook_name, kwargs)`` before every hook call; returns an undo function.

        The bus counterpart of pluggy's ``add_hookcall_monitoring`` (which never
        fires here, as the bus does not go through ``pm.hook``).
        """
        self._monitors = (*self._monitors, fn)

        def undo() -> None:
            self._monitors = tuple(m for m in self._monitors if m is not fn)

        return undo

    def _monitor(self, hook: str, args: tuple[Any, ...]) -> None:
        kwargs = dict(zip(self.host._spec_args[hook], args, strict=True))
        for fn in self._monitors:
            fn(hook, kwargs)

    def _dispatch(self, hook: str, args: tuple[Any, ...], firstresult: bool = False) -> Any:
        if self._monitors:
            self._monitor(hook, args)
        host = self.host
        if hook not in host._snap.table:
            return None
        snap, tid = host._enter()
        try:
            for name, call, switch in snap.table.get(hook, ()):
                if not switch.live:
                    continue
                try:
                    result = call(*args)
                except Exception as exc:
                    host._plugin_failed(name, hook, exc)
                    continue
                if firstresult and result is not None:
                    return result
            return None
        finally:
            host._exit(snap, tid)

    # -- KVM's notifier callbacks ---------------------------------------------------------

    def track_write(self, vm: Any, vcpu: Any, gpa: int, new: bytes) -> None:
        """``kvm_page_track_write`` → ``__kvm_page_track_write``, then ``kvm_mmu_track_write`` (trylast).

        With the audit log enabled, emits ``track_write`` (the plugins in call
        order) then one ``track_write_call`` per plugin with its outcome
        (``ok``, ``error``, or ``skipped`` for a plugin unregistered or
        quarantined by another thread after it was listed), at level info.
        """
        if self._monitors:
            self._monitor("track_write", (vm, vcpu, gpa, new))
        host = self.host
        if self.audit.enabled:
            self._track_write_audited(vm, vcpu, gpa, new)
            return
        snap = host._snap
        if "track_write" not in snap.table:
            return
        # The read section of PluginHost._enter/_exit, inlined: this is the hot path.
        tid = _get_ident()
        readers = snap.readers
        readers.append(tid)
        try:
            for name, call, switch in snap.table["track_write"]:
                if switch.live:
                    try:
                        call(vm, vcpu, gpa, new)
                    except Exception as exc:
                        host._plugin_failed(name, "track_write", exc)
        finally:
            readers.remove(tid)
            if snap.retired:
                host._wake()

    def _track_write_audited(self, vm: Any, vcpu: Any, gpa: int, new: bytes) -> None:
        # One audited dispatch at a time, so that each track_write event is followed by
        # its own track_write_call events (what `pagetrack audit` replays).  The lock is
        # taken before the read section: a thread waiting for it is not a reader, so an
        # unregister from inside a hook never waits for it.
        audit = self.audit
        host = self.host
        with self._audit_lock:
            snap, tid = host._enter()
            try:
                live = [e for e in snap.table.get("track_write", ()) if e[2].live]
                audit.emit(
                    "track_write",
                    vcpu=getattr(vcpu, "index", None),
                    gpa=gpa,
                    len=len(new),
                    data=bytes(new),
                    plugins=[e[0] for e in live],
                )
                for name, call, switch in live:
                    if not switch.live:  # unregistered or quarantined since it was listed
                        audit.emit("track_write_call", plugin=name, gpa=gpa, outcome="skipped")
                        continue
                    try:
                        call(vm, vcpu, gpa, new)
                    except Exception as exc:
                        audit.emit("track_write_call", plugin=name, gpa=gpa, outcome="error")
                        host._plugin_failed(name, "track_write", exc)
                        continue
                    audit.emit("track_write_call", plugin=name, gpa=gpa, outcome="ok")
            finally:
                host._exit(snap, tid)

    def track_flush_slot(self, vm: Any, slot: MemSlot) -> None:
        """``kvm_page_track_flush_slot``: a slot is about to be deleted or moved."""
        self._dispatch("track_flush_slot", (vm, slot))

    def track_remove_region(self, vm: Any, gfn: int, nr_pages: int) -> None:
        """``kvm_page_track_delete_slot`` → ``track_remove_region`` (6.6+)."""
        self._dispatch("track_remove_region", (vm, gfn, nr_pages))

    # -- lifecycle and VMM hooks ----------------------------------------------------------

    def mark_page_dirty(self, vm: Any, vcpu: Any, slot: MemSlot, gfn: int) -> None:
        """``mark_page_dirty_in_slot``."""
        self._dispatch("mark_page_dirty", (vm, vcpu, slot, gfn))

    def memslot_commit(
        self, vm: Any, change: str, old: MemSlot | None, new: MemSlot | None
    ) -> None:
        """``kvm_commit_memory_region``."""
        self._dispatch("memslot_commit", (vm, change, old, new))

    def vm_created(self, vm: Any) -> None:
        """``kvm_create_vm``."""
        self._dispatch("vm_created", (vm,))

    def vcpu_created(self, vm: Any, vcpu: Any) -> None:
        """``kvm_vm_ioctl_create_vcpu``."""
        self._dispatch("vcpu_created", (vm, vcpu))

    def vm_destroyed(self, vm: Any) -> None:
        """``kvm_destroy_vm``."""
        self._dispatch("vm_destroyed", (vm,))

    def plugin_options(self, vm: Any, options: Mapping[str, Mapping[str, Any]]) -> None:
        """Per-plugin options (no kernel counterpart)."""
        self._dispatch("plugin_options", (vm, options))

    def guest_port_io(
        self, vm: Any, vcpu: Any, port: int, size: int, value: int, is_write: bool
    ) -> int | None:
        """Port I/O outside the ABI's ports; first non-``None`` result wins (``KVM_EXIT_IO``)."""
        result: int | None = self._dispatch(
            "guest_port_io", (vm, vcpu, port, size, value, is_write), firstresult=True
        )
        return result

    def round_end(self, vm: Any, vcpu: Any, index: int, final: bool) -> None:
        """A dirty-log round ended (the VMM's harvest point)."""
        self._dispatch("round_end", (vm, vcpu, index, final))
