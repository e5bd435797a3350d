"""Scenario files: a whole run described in TOML, validated into an attrs model.

``pagetrack run SCENARIO.toml`` reads one with :func:`load_scenario` and runs it
with :func:`pagetrack.scenario_run.run_scenario`.  Every key is checked and
unknown keys are refused; a bad file is one :class:`ScenarioError` naming the
file, the key and the reason::

    scenario.toml: vm.memory_mib: must be an integer between 1 and 246

The format (every table and key optional except ``[workload]``)::

    name = "shadow paging: page-table edits"    # shown in the report
    description = "..."

    [vm]
    memory_mib = 16          # the data slot, 1..246 MiB (the page tables must fit below 0x80000)
    paging = "shadow"        # or "tdp" (the default)
    vcpus = 1                # 1..64; a program runs on vCPU 0, a trace is shared out

    [plugins]
    enable = ["hello_tracker"]   # entry points to load (shadow_mmu and dirty_log always are)
    disable = ["gvt_shadow_gtt"] # entry points to skip
    [plugins.options.gvt_shadow_gtt]   # options={name: {...}} for that plugin
    attach = true

    [workload]               # either a guest program ...
    program = "tour"         # a built-in name (no "/" or ".") or a path, relative to this file
    defines = { N = 128 }    # -D NAME=VALUE
    max_instructions = 200000000
    # ... or a trace generator of pagetrack.plugins.dirty_log.workloads:
    # trace = "hotset"       # sequential, uniform, hotset, zipf, fixed_rate
    # rate = 200000          # stores (fixed_rate: pages) per second of guest time
    # seed = 0
    # duration = 0.02        # seconds of guest time in all
    # rounds = 4             # harvests, evenly spaced
    # params = { hot_fraction = 0.05, hot_share = 0.99 }

    [track]
    ranges = ["0x410-0x411", 0x500]   # gfns an external tracker write-tracks (--track)

    [dirty_log]
    mode = "bitmap"          # bitmap, clear, clear-initially-set, ring, pml (TDP), track

    [output]
    json = "result.json"     # also write the JSON result here (relative to the current directory)
    audit_log = "audit.jsonl"
    audit_level = "info"     # or "debug": every fault, emulation, zap and dirty mark
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from .errors import InputError
from .program import MAX_DATA_SIZE, builtin_names

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "DIRTY_LOG_MODES",
    "MAX_VCPUS",
    "OutputSpec",
    "PluginSpec",
    "ProgramSpec",
    "Scenario",
    "ScenarioError",
    "TraceSpec",
    "VmSpec",
    "load_scenario",
    "parse_scenario",
]

#: The dirty logger's modes (``pagetrack.plugins.dirty_log.MODES``).
DIRTY_LOG_MODES = ("bitmap", "clear", "clear-initially-set", "ring", "pml", "track")
#: A simulator limit (KVM's is 1024 on x86); each vCPU is an object with its own TLBs.
MAX_VCPUS = 64
MAX_MEMORY_MIB = MAX_DATA_SIZE >> 20
#: Plugins a scenario run cannot do without: KVM's own tracker, and the logger that makes the rounds.
REQUIRED_PLUGINS = ("shadow_mmu", "dirty_log")
#: Most stores one trace scenario may ask for (rate × duration), to keep a typo from running all day.
MAX_TRACE_STORES = 100_000_000
_LOW_GFNS = (0, 0x200)
_DATA_GFN = 0x400
_DIRTY_LOG_OPTIONS = {"initially_set": bool, "ring_size": int, "pml": bool, "eager_split": bool}


class ScenarioError(InputError):
    """A bad scenario file: ``str()`` is ``FILE: KEY: reason``."""

    def __init__(self, file: str, key: str | None, message: str) -> None:
        super().__init__(message, f"{file}: {key}" if key else file)
        self.file = file
        self.key = key


@attrs.frozen
class VmSpec:
    """``[vm]``: the data slot's size, the paging mode and the vCPUs."""

    memory_mib: int = 16
    paging: str = "tdp"
    vcpus: int = 1

    @property
    def tdp(self) -> bool:
        return self.paging == "tdp"


@attrs.frozen
class PluginSpec:
    """``[plugins]``: which entry points load (``None``: all) and their options."""

    enable: tuple[str, ...] | None = None
    disable: tuple[str, ...] = ()
    options: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)


@attrs.frozen
class ProgramSpec:
    """``[workload]`` with ``program``: a built-in program or a file."""

    program: str
    builtin: bool
    path: Path | None = None  #: resolved against the scenario's folder (files only)
    defines: Mapping[str, int] = attrs.field(factory=dict)
    max_instructions: int = 200_000_000


@attrs.frozen
class TraceSpec:
    """``[workload]`` with ``trace``: a seeded trace generator, harvested ``rounds`` times."""

    trace: str
    rate: float | None = None
    seed: int = 0
    duration: float = 0.02
    rounds: int = 1
    params: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class OutputSpec:
    """``[output]``: where to write the JSON result and the audit log (relative to the cwd)."""

    json: Path | None = None
    audit_log: Path | None = None
    audit_level: str = "info"


@attrs.frozen
class Scenario:
    """A validated scenario file."""

    file: str
    name: str
    description: str = ""
    vm: VmSpec = VmSpec()
    plugins: PluginSpec = PluginSpec()
    workload: ProgramSpec | TraceSpec = ProgramSpec("tour", True)
    track: tuple[tuple[int, int], ...] = ()
    dirty_log: str = "bitmap"
    output: OutputSpec = OutputSpec()

    @property
    def options(self) -> dict[str, dict[str, Any]]:
        """``options=`` for the VM: the plugins' options plus the dirty-log mode."""
        out = {name: dict(opts) for name, opts in self.plugins.options.items()}
        out["dirty_log"] = {**out.get("dirty_log", {}), "mode": self.dirty_log}
        return out


class _Table:
    """One TOML table being validated: typed getters that name the key, then :meth:`done`."""

    def __init__(self, file: str, prefix: str, data: Mapping[str, Any]) -> None:
        self.file = file
        self.prefix = prefix
        self.data = data
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str | None, message: str) -> ScenarioError:
        return ScenarioError(self.file, self.key(name) if name else self.prefix or None, message)

    def has(self, name: str) -> bool:
        return name in self.data

    def raw(self, name: str, default: Any = None) -> Any:
        self.seen.add(name)
        return self.data.get(name, default)

    def integer(self, name: str, default: int, lo: int, hi: int | None = None) -> int:
        value = self.raw(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
            bound = f"between {lo} and {hi}" if hi is not None else f"of at least {lo}"
            raise self.error(name, f"must be an integer {bound}")
        return value

    def number(self, name: str, default: float | None, *, positive: bool = False) -> float | None:
        value = self.raw(name, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or (
                value <= 0 if positive else value < 0):
            raise self.error(name, "must be a number " + ("> 0" if positive else ">= 0"))
        return float(value)

    def string(self, name: str, default: str | None = None, choices: tuple[str, ...] | None = None) -> str | None:
        value = self.raw(name, default)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.error(name, "must be a string")
        if choices is not None and value not in choices:
            raise self.error(name, f"must be one of {', '.join(choices)}, not {value!r}")
        return value

    def names(self, name: str) -> tuple[str, ...] | None:
        value = self.raw(name)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(name, "must be a list of plugin names (strings)")
        return tuple(value)

    def table(self, name: str) -> _Table:
        value = self.raw(name, {})
        if not isinstance(value, dict):
            raise self.error(name, "must be a table")
        return _Table(self.file, self.key(name), value)

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise self.error(unknown[0], "unknown key" + _did_you_mean(unknown[0], self.seen))


def _did_you_mean(name: str, known: set[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(known))})"


def load_scenario(path: str | Path, *, installed: set[str] | None = None) -> Scenario:
    """Read and validate the scenario file at ``path`` (:class:`ScenarioError` if it is bad)."""
    p = Path(path)
    file = str(path)
    if not p.is_file():
        raise ScenarioError(file, None, "no such file")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ScenarioError(file, None, "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(file, None, f"not valid TOML: {exc}") from None
    return parse_scenario(data, file, base=p.parent, installed=installed)


def parse_scenario(data: Mapping[str, Any], file: str = "<scenario>", *, base: Path | None = None,
                   installed: set[str] | None = None) -> Scenario:
    """Validate a decoded TOML document.

    ``base`` is the folder program paths are relative to; ``installed`` the
    plugin names that exist (default: the ``pagetrack`` entry points).
    """
    top = _Table(file, "", data)
    name = top.string("name", Path(file).stem) or Path(file).stem
    description = top.string("description", "") or ""
    vm = _vm(top.table("vm"))
    if not top.has("workload"):
        raise ScenarioError(file, "workload", "missing: give workload.program or workload.trace")
    workload = _workload(top.table("workload"), base or Path.cwd())
    plugins = _plugins(top.table("plugins"), installed if installed is not None else _installed())
    track = _track(top.table("track"), vm.memory_mib)
    dirty = top.table("dirty_log")
    mode = dirty.string("mode", "bitmap", DIRTY_LOG_MODES) or "bitmap"
    dirty.done()
    if mode == "pml" and not vm.tdp:
        raise ScenarioError(file, "dirty_log.mode", 'pml needs vm.paging = "tdp" (Intel PML logs through EPT)')
    output = _output(top.table("output"))
    top.done()
    return Scenario(file, name, description, vm, plugins, workload, track, mode, output)


def _vm(t: _Table) -> VmSpec:
    spec = VmSpec(
        memory_mib=t.integer("memory_mib", 16, 1, MAX_MEMORY_MIB),
        paging=t.string("paging", "tdp", ("tdp", "shadow")) or "tdp",
        vcpus=t.integer("vcpus", 1, 1, MAX_VCPUS),
    )
    t.done()
    return spec


def _installed() -> set[str]:
    from importlib.metadata import entry_points

    return {ep.name for ep in entry_points(group="pagetrack")}


def _plugins(t: _Table, installed: set[str]) -> PluginSpec:
    def check(key: str, names: tuple[str, ...] | None) -> None:
        for plugin in names or ():
            if plugin not in installed:
                raise t.error(key, f"no installed plugin {plugin!r} (installed: {', '.join(sorted(installed))})")

    enable = t.names("enable")
    disable = t.names("disable") or ()
    check("enable", enable)
    check("disable", disable)
    for plugin in REQUIRED_PLUGINS:
        if plugin in disable:
            raise t.error("disable", f"{plugin} cannot be disabled: "
                          + ("it is KVM's own tracker" if plugin == "shadow_mmu" else "it harvests the rounds"))
    if enable is not None:
        enable = tuple(dict.fromkeys((*REQUIRED_PLUGINS, *enable)))
    opts = t.table("options")
    options: dict[str, dict[str, Any]] = {}
    for plugin in list(opts.data):
        sub = opts.table(plugin)
        if plugin not in installed:
            raise sub.error(None, f"no installed plugin {plugin!r}")
        options[plugin] = _plugin_options(plugin, sub)
    opts.done()
    t.done()
    return PluginSpec(enable, tuple(disable), options)


def _plugin_options(plugin: str, t: _Table) -> dict[str, Any]:
    """Check the options of the built-in plugins here; a third party's go through as they are."""
    values = dict(t.data)
    t.seen.update(values)
    if plugin == "dirty_log":
        if "mode" in values:
            raise t.error("mode", "set the mode with dirty_log.mode")
        for key, value in values.items():
            kind = _DIRTY_LOG_OPTIONS.get(key)
            if kind is None:
                raise t.error(key, "unknown key" + _did_you_mean(key, set(_DIRTY_LOG_OPTIONS)))
            if kind is bool and not isinstance(value, bool):
                raise t.error(key, "must be true or false")
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)
                                or value < 256 or value > 65536 or value & (value - 1)):
                raise t.error(key, "must be a power of two between 256 and 65536 (ring entries)")
    elif plugin == "gvt_shadow_gtt":
        from pagetrack.plugins.gvt_shadow_gtt import GvtOptions

        try:
            GvtOptions.from_mapping(values)
        except InputError as exc:
            where = exc.where or ""
            raise t.error(where.split(".", 1)[1] if "." in where else None, str(exc.args[0])) from None
    return values


def _workload(t: _Table, base: Path) -> ProgramSpec | TraceSpec:
    if t.has("program") == t.has("trace"):
        raise t.error(None, "give exactly one of program (a guest program) or trace (a trace generator)")
    if t.has("program"):
        return _program(t, base)
    return _trace(t)


def _program(t: _Table, base: Path) -> ProgramSpec:
    program = t.string("program") or ""
    builtin = re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", program) is not None
    path = None
    if builtin:
        if program not in builtin_names():
            raise t.error("program", f"no built-in program {program!r} (built-in: {', '.join(builtin_names())}; "
                                     "a file name needs a suffix or a '/')")
    else:
        path = (base / program).resolve()
        if not path.is_file():
            raise t.error("program", f"no such file: {path}")
    defines_t = t.table("defines")
    defines: dict[str, int] = {}
    for key, value in defines_t.data.items():
        defines_t.seen.add(key)
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise defines_t.error(key, "is not a symbol name")
        if isinstance(value, bool) or not isinstance(value, int):
            raise defines_t.error(key, "must be an integer")
        defines[key] = value
    max_instructions = t.integer("max_instructions", 200_000_000, 1)
    for key in ("rate", "seed", "duration", "rounds", "params"):
        if t.has(key):
            raise t.error(key, "applies to a trace workload, not a program")
    t.done()
    return ProgramSpec(program, builtin, path, defines, max_instructions)


def _trace(t: _Table) -> TraceSpec:
    from pagetrack.plugins.dirty_log.workloads import WORKLOADS

    name = (t.string("trace") or "").replace("-", "_")
    cls = WORKLOADS.get(name)
    if cls is None:
        raise t.error("trace", f"unknown trace generator {name!r} (choose from: {', '.join(WORKLOADS)})")
    rate = t.number("rate", None)
    seed = t.integer("seed", 0, 0)
    duration = t.number("duration", 0.02, positive=True) or 0.02
    rounds = t.integer("rounds", 1, 1, 10_000)
    for key in ("defines", "max_instructions"):
        if t.has(key):
            raise t.error(key, "applies to a program workload, not a trace")
    params_t = t.table("params")
    params = _trace_params(cls, params_t)
    t.done()
    kwargs = dict(params)
    if rate is not None:
        kwargs["rate"] = rate
    try:
        workload = cls(seed=seed, **kwargs)
    except InputError as exc:
        raise params_t.error(None, str(exc.args[0])) from None
    if workload.rate * duration > MAX_TRACE_STORES:
        raise t.error("duration", f"rate × duration is {workload.rate * duration:,.0f} stores; "
                                  f"at most {MAX_TRACE_STORES:,} per scenario")
    return TraceSpec(name, rate, seed, duration, rounds, params)


def _trace_params(cls: type, t: _Table) -> dict[str, Any]:
    """The generator's own parameters (its attrs fields besides rate, seed and base), typed by their defaults."""
    fields = {f.name: f.default for f in attrs.fields(cls)
              if f.init and not f.name.startswith("_") and f.name not in ("rate", "seed", "base")}
    out: dict[str, Any] = {}
    for key, value in t.data.items():
        t.seen.add(key)
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise t.error(key, f"not a parameter of {cls.name} (its parameters: {known})")  # type: ignore[attr-defined]
        default = fields[key]
        ok = (isinstance(value, int) and not isinstance(value, bool)) if isinstance(default, int) else (
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value))
        if not ok:
            raise t.error(key, "must be an integer" if isinstance(default, int) else "must be a number")
        out[key] = value
    return out


def _track(t: _Table, memory_mib: int) -> tuple[tuple[int, int], ...]:
    value = t.raw("ranges", [])
    t.done()
    if not isinstance(value, list):
        raise t.error("ranges", 'must be a list of gfns or "GFN-GFN" ranges')
    data_end = _DATA_GFN + (memory_mib << 8)
    out = []
    for i, item in enumerate(value):
        key = f"ranges[{i}]"
        if isinstance(item, int) and not isinstance(item, bool):
            lo = hi = item
        elif isinstance(item, str):
            first, sep, last = item.partition("-")
            try:
                lo = int(first.strip(), 0)
                hi = int(last.strip(), 0) if sep else lo
            except ValueError:
                raise t.error(key, f'{item!r}: expected GFN or "GFN-GFN" (decimal or 0x hex)') from None
        else:
            raise t.error(key, 'must be a gfn or a "GFN-GFN" string')
        if lo < 0 or hi < lo:
            raise t.error(key, f"{item!r}: empty or negative range")
        in_low = _LOW_GFNS[0] <= lo and hi < _LOW_GFNS[1]
        if not in_low and not (lo >= _DATA_GFN and hi < data_end):
            raise t.error(key, f"{lo:#x}-{hi:#x} is not inside one memslot "
                               f"(low: {_LOW_GFNS[0]:#x}-{_LOW_GFNS[1] - 1:#x}, data: {_DATA_GFN:#x}-{data_end - 1:#x})")
        out.append((lo, hi))
    return tuple(out)


def _output(t: _Table) -> OutputSpec:
    def path(name: str) -> Path | None:
        value = t.string(name)
        if value is not None and not value.strip():
            raise t.error(name, "must be a file path")
        return Path(value) if value is not None else None

    spec = OutputSpec(path("json"), path("audit_log"), t.string("audit_level", "info", ("info", "debug")) or "info")
    t.done()
    return spec
