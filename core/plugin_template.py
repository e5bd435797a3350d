'''The files ``pagetrack new-plugin`` writes: a pip-installable tracker package.

:func:`render_package` returns ``{relative path: text}`` for a package whose
distribution is ``pagetrack-<name>`` and whose module ``<module>`` is both the
tracker and its ``pagetrack`` entry point.  The tracker counts the emulated
writes KVM reports for the gfns it watches (given as the VM option
``{<module>: {"watch": [...]}}`` or with ``watch(vm, gfn)``), keeps its state
per VM, and implements one hook per job, each with a docstring.  Its tests use
the ``pagetrack.testing`` fixtures and a real guest program, and pass as
generated.
'''

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["render_package"]

_PYPROJECT = """\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "0.1.0"
description = "A pagetrack write tracker: counts emulated writes to the guest frames it watches"
readme = "README.md"
requires-python = ">=3.10"
dependencies = ["pagetrack>={pagetrack_version}"]

[project.optional-dependencies]
test = ["pytest>=8"]

# This is what makes the package a pagetrack plugin: group "pagetrack", name = module.
[project.entry-points.pagetrack]
{module} = "{module}"

[tool.setuptools]
py-modules = ["{module}"]

[tool.pytest.ini_options]
testpaths = ["tests"]
"""

_MODULE = '''\
"""{module}: a pagetrack write tracker.

It write-protects the guest frames it is asked to watch
(``kvm_write_track_add_gfn``) and counts the emulated writes KVM reports for
them through ``track_write``, per gfn: the skeleton of any external page-track
user (KVMGT, VM introspection, a snapshotting tool).

Watch frames with a VM option::

    vm = pagetrack.VM(options={{"{module}": {{"watch": ["0x400-0x40f", 0x500]}}}})

or from code, once the memslot exists::

    {module}.watch(vm, 0x400)
    ...                                     # run the guest
    {module}.write_counts(vm)               # {{0x400: 3}}

The module itself is the plugin (entry point ``{module} = "{module}"``): one
module object is registered on every VM in the process, so state is kept per
VM, created in ``vm_created`` and dropped in ``vm_destroyed``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import pagetrack

__all__ = [
    "memslot_commit",
    "plugin_options",
    "track_remove_region",
    "track_write",
    "unwatch",
    "vm_created",
    "vm_destroyed",
    "watch",
    "watched",
    "write_counts",
]

NAME = "{module}"
PAGE_SHIFT = 12


class _State:
    """What the tracker knows about one VM."""

    def __init__(self) -> None:
        self.wanted: list[tuple[int, int]] = []  # option ranges, watched as their memslots appear
        self.watched: set[int] = set()
        self.writes: Counter[int] = Counter()


_vms: dict[int, _State] = {{}}  # id(vm) -> state


def _state(vm: Any) -> _State:
    return _vms.setdefault(id(vm), _State())


def _parse_range(item: Any) -> tuple[int, int]:
    """``0x400``, ``"0x400"``, ``"0x400-0x40f"`` or ``[0x400, 0x40f]`` (inclusive)."""
    try:
        if isinstance(item, (list, tuple)) and len(item) == 2:
            lo, hi = int(item[0]), int(item[1])
        elif isinstance(item, str):
            first, _, last = item.partition("-")
            lo = int(first, 0)
            hi = int(last, 0) if last else lo
        else:
            lo = hi = int(item)
    except (TypeError, ValueError):
        raise pagetrack.InputError(f"bad gfn range {{item!r}}", f"{{NAME}}.watch") from None
    if lo < 0 or hi < lo:
        raise pagetrack.InputError(f"empty or negative gfn range {{item!r}}", f"{{NAME}}.watch")
    return lo, hi


# ---- the tracker's own API ------------------------------------------------------------


def watch(vm: Any, gfn: int) -> None:
    """Start counting writes to ``gfn``: write-protect it (``kvm_write_track_add_gfn``).

    The gfn must be in a memslot.  Watching a gfn twice is a no-op: the tracker
    holds one write-track count per gfn.
    """
    state = _state(vm)
    if gfn not in state.watched:
        vm.write_track_add_gfn(gfn)
        state.watched.add(gfn)


def unwatch(vm: Any, gfn: int) -> None:
    """Stop watching ``gfn`` and drop this tracker's count (``kvm_write_track_remove_gfn``)."""
    state = _state(vm)
    if gfn in state.watched:
        state.watched.discard(gfn)
        vm.write_track_remove_gfn(gfn)


def watched(vm: Any) -> set[int]:
    """The gfns watched on ``vm``."""
    return set(_state(vm).watched)


def write_counts(vm: Any) -> dict[int, int]:
    """Emulated writes seen per watched gfn on ``vm`` (a copy)."""
    return dict(_state(vm).writes)


# ---- hooks: pagetrack calls these; each takes only the arguments it needs ---------------


@pagetrack.hookimpl
def vm_created(vm: Any) -> None:
    """A VM was created with this plugin registered: start its state.

    Kernel: ``kvm_create_vm``.  No memslot exists yet, so nothing can be
    write-tracked here.
    """
    _vms[id(vm)] = _State()


@pagetrack.hookimpl
def plugin_options(vm: Any, options: Mapping[str, Mapping[str, Any]]) -> None:
    """Read ``options["{module}"]``: ``watch`` is a list of gfns or ranges.

    Called once, right after ``vm_created``.  The ranges are watched as the
    memslots that hold them are created (``memslot_commit``).  A bad option
    raises :class:`pagetrack.InputError`, which quarantines this plugin on
    that VM (or fails the test, with ``strict=True``).
    """
    mine = dict(options.get(NAME, {{}}))
    unknown = sorted(set(mine) - {{"watch"}})
    if unknown:
        raise pagetrack.InputError(f"unknown option(s) {{', '.join(unknown)}}", NAME)
    _state(vm).wanted = [_parse_range(item) for item in mine.get("watch", [])]


@pagetrack.hookimpl
def memslot_commit(vm: Any, change: str, new: Any) -> None:
    """A memslot was created (or changed): watch the wanted gfns that are now in it.

    Kernel: ``kvm_commit_memory_region``.
    """
    if change != "create" or new is None:
        return
    for lo, hi in _state(vm).wanted:
        for gfn in range(max(lo, new.base_gfn), min(hi + 1, new.base_gfn + new.npages)):
            watch(vm, gfn)


@pagetrack.hookimpl
def track_write(vm: Any, gpa: int, new: bytes) -> None:
    """An emulated write was committed to guest memory: count it if its gfn is watched.

    KVM calls every tracker for every emulated write, tracked or not, so a
    tracker filters for itself.  A piece never crosses a page, so ``gpa``
    gives the gfn.  Kernel: ``node->track_write(gpa, new, bytes, node)``.
    """
    state = _vms.get(id(vm))
    if state is not None:
        gfn = gpa >> PAGE_SHIFT
        if gfn in state.watched:
            state.writes[gfn] += 1


@pagetrack.hookimpl
def track_remove_region(vm: Any, gfn: int, nr_pages: int) -> None:
    """A memslot was deleted: KVM dropped its write-track counts; forget its gfns.

    Kernel: ``node->track_remove_region(gfn, nr_pages, node)`` (6.6+).
    """
    state = _vms.get(id(vm))
    if state is None:
        return
    gone = {{g for g in state.watched if gfn <= g < gfn + nr_pages}}
    state.watched -= gone
    for g in gone:
        state.writes.pop(g, None)


@pagetrack.hookimpl
def vm_destroyed(vm: Any) -> None:
    """The VM is going away: drop everything kept for it (``kvm_destroy_vm``)."""
    _vms.pop(id(vm), None)
'''

_TESTS = '''\
"""Tests of {module}, with pagetrack's pytest fixtures (``make_vm``, ``hook_recorder``, ``audit_events``).

pagetrack installs its pytest plugin, so no conftest is needed.  The tracker
module is passed to each VM explicitly (``plugins=[{module}]``) and its
entry point disabled, so the tests pass whether or not the package is installed.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the module, when not installed

import pagetrack
from pagetrack.program import assemble

import {module}

DATA = 0x400000  # guest-physical base of the test memslot (gfn 0x400)
GFN = DATA >> 12


def _vm(make_vm: Any, **kwargs: Any) -> Any:
    vm = make_vm(plugins=[{module}], disable=["{module}"], **kwargs)
    vm.add_memory(DATA, 16 * 4096)
    return vm


def test_counts_writes_to_watched_gfns(make_vm: Any) -> None:
    vm = _vm(make_vm)
    {module}.watch(vm, GFN)
    assert vm.gfn_is_write_tracked(GFN)
    # What the emulator does after committing a write (emulator_write_phys).
    vm.hooks.track_write(vm, None, DATA + 8, b"\\x01\\x02")
    vm.hooks.track_write(vm, None, DATA + 0x1000, b"\\x03")  # the next gfn: not watched
    assert {module}.write_counts(vm) == {{GFN: 1}}


def test_the_watch_option_protects_frames_as_their_memslot_appears(make_vm: Any) -> None:
    vm = _vm(make_vm, options={{"{module}": {{"watch": ["0x401-0x402", 0x40f]}}}})
    assert {module}.watched(vm) == {{GFN + 1, GFN + 2, GFN + 15}}
    assert vm.write_track_count(GFN + 1) == 1 and not vm.gfn_is_write_tracked(GFN)


def test_unwatch_drops_the_count(make_vm: Any) -> None:
    vm = _vm(make_vm)
    {module}.watch(vm, GFN)
    {module}.unwatch(vm, GFN)
    assert not vm.gfn_is_write_tracked(GFN) and {module}.watched(vm) == set()


def test_memslot_delete_forgets(make_vm: Any, hook_recorder: Any) -> None:
    vm = _vm(make_vm)
    calls = hook_recorder(vm)
    {module}.watch(vm, GFN + 1)
    slot = next(s for s in vm.memslots.slots(0) if s.base_gfn == GFN)
    vm.set_user_memory_region(slot.key, 0, DATA, 0, slot.userspace_addr)  # KVM: delete
    assert calls.calls_of("track_remove_region") == [{{"vm": vm, "gfn": GFN, "nr_pages": 16}}]
    assert {module}.watched(vm) == set()


def test_the_audit_log_shows_each_call(make_vm: Any, audit_events: Any) -> None:
    vm = _vm(make_vm)
    {module}.watch(vm, GFN)
    vm.hooks.track_write(vm, None, DATA, b"\\xaa")
    (call,) = [e for e in audit_events(vm, "track_write_call") if e["plugin"] == "{module}"]
    assert call["outcome"] == "ok"


def test_a_guest_program_end_to_end() -> None:
    """Guest stores to watched pages fault, are emulated and reach track_write.

    The 8-byte store at offset 0xffc crosses into the next page, so KVM
    notifies two pieces, one per page.
    """
    program = assemble("""
        mov dword ptr [rdi], 1
        mov dword ptr [rdi + 4], 2
        mov qword ptr [rdi + 0x1ffc], rax
        hlt
    """)
    counts: dict[int, int] = {{}}

    class Snapshot:
        """Registered after {module}, so called before it (LIFO) when the VM goes."""

        @pagetrack.hookimpl
        def vm_destroyed(self, vm: Any) -> None:
            counts.update({module}.write_counts(vm))

    installed = any(ep.name == "{module}" for ep in entry_points(group="pagetrack"))
    result = pagetrack.run_program(
        program,
        plugins=[Snapshot()] if installed else [{module}, Snapshot()],
        options={{"{module}": {{"watch": ["0x400-0x402"]}}}},
    )
    assert result["exit"] == "hlt"
    assert counts == {{GFN: 2, GFN + 1: 1, GFN + 2: 1}}
'''

_README = """\
# {dist}

A [pagetrack](https://pypi.org/project/pagetrack/) write tracker, generated by
`pagetrack new-plugin {name}`. It write-protects the guest frames it watches
and counts the emulated writes KVM reports for them, per gfn.

```console
$ pip install -e .            # or: pip install .
$ pagetrack plugins           # lists {module} as loaded
$ pytest                      # its tests, with pagetrack's fixtures
```

Use it:

```python
import pagetrack, {module}

vm = pagetrack.VM(options={{"{module}": {{"watch": ["0x400-0x40f"]}}}})
vm.add_memory(0x400000, 1 << 20)       # gfns 0x400-0x40f are watched from here on
...                                    # run a guest
print({module}.write_counts(vm))
```

or from a scenario file (`pagetrack run my.toml`):

```toml
[workload]
program = "tour"

[plugins.options.{module}]
watch = ["0x410-0x411"]
```

`{module}.py` is the whole tracker: one function per hook, each saying when
pagetrack calls it and which kernel function that models. Change
`track_write` to do your tracker's job. The hooks are documented in
pagetrack's `docs/hooks.md`, writing and packaging a tracker in
`docs/writing-a-plugin.md`.
"""


def _pagetrack_version() -> str:
    try:
        return ".".join(version("pagetrack").split(".")[:2])
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0.1"


def render_package(name: str, module: str) -> dict[str, str]:
    """The package's files: ``{relative path: text}``; ``name`` as typed, ``module`` its import name."""
    dist = "pagetrack-" + module.replace("_", "-")
    fields = {"name": name, "module": module, "dist": dist, "pagetrack_version": _pagetrack_version()}
    return {
        "pyproject.toml": _PYPROJECT.format(**fields),
        f"{module}.py": _MODULE.format(**fields),
        f"tests/test_{module}.py": _TESTS.format(**fields),
        "README.md": _README.format(**fields),
    }
