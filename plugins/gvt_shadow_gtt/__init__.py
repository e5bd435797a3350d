"""GVT-g shadow GTT: Intel's mediated vGPU keeping shadow PPGTTs through KVM write tracking.

Models the 6.6+ KVMGT era (spec gvt-shadow-gtt.md §0): ``kvm_write_track_add_gfn``
/ ``_remove_gfn``, ``track_remove_region``, memslot MOVE refused while a vGPU is
attached, ``vgpu_lock`` taken in ``kvmgt_page_track_write``.

Using it
--------
The module is the ``gvt_shadow_gtt`` entry point, registered on every VM and
**inert** there: it claims no tracker hooks and tracks nothing until a vGPU is
attached, either by option::

    VM(options={"gvt_shadow_gtt": {"attach": True, ...}})

or by API::

    vgpu = attach_vgpu(vm, huge_ranges=[(0x800, 0xa00)])   # intel_vgpu_open_device
    ...
    detach_vgpu(vm)                                       # close + destroy

Attaching registers the vGPU's own notifier node (``vm.register_tracker(obj,
"kvmgt.vgpu<N>")``, one per vGPU as KVMGT does) and unregisters it at detach.
Options: see :class:`~.vgpu.GvtOptions`.

Guest interface (port ``GVT_PORT`` = 0x20)
------------------------------------------
``out 0x20, eax`` with eax = gpa of a 56-byte descriptor — op (1 submit a
workload, 2/3 L3 create/destroy, 4/5 L4 create/destroy: the PV notifications
``VGT_G2V_PPGTT_L{3,4}_PAGE_TABLE_{CREATE,DESTROY}``), levels, flags (bit 0: the
workload's GPU stores ``value`` at ``gma``), ``pdp[4]``, ``gma``, ``value``;
``in eax, 0x20`` reads the status (0 or -errno; -ENODEV without a vGPU).
Details in :mod:`.port`; the built-in guest driver is
``pagetrack.program.builtin_program("gvt_driver", ...)``.

Modules: :mod:`.entry` (formats and types), :mod:`.dma` (host pages, VFIO,
DMA cache), :mod:`.kvmgt` (KVM glue), :mod:`.page_track` (GVT page tracks),
:mod:`.spt` / :mod:`.shadow` (shadow pages and write handling), :mod:`.mm`
(mm lifecycle), :mod:`.ggtt` (GGTT MMIO), :mod:`.translate` (GPU walk and the
invariant), :mod:`.vgpu` (the vGPU), :mod:`.port` (the guest port),
:mod:`.tour` (the guest driver tour).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

from pagetrack import hookimpl

from .device import GvtDevice
from .errors import GvtError
from .port import GVT_PORT, NO_VGPU
from .translate import InvariantReport, check_mm, gpu_translate, guest_translate
from .vgpu import GvtOptions, Vgpu

__all__ = [
    "GVT_PORT",
    "GvtDevice",
    "GvtError",
    "GvtOptions",
    "InvariantReport",
    "Vgpu",
    "attach_vgpu",
    "check_mm",
    "detach_vgpu",
    "gpu_translate",
    "guest_port_io",
    "guest_translate",
    "plugin_options",
    "vgpu_of",
]

_vgpus: weakref.WeakKeyDictionary[Any, Vgpu] = weakref.WeakKeyDictionary()
_options: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def vgpu_of(vm: Any) -> Vgpu | None:
    """The vGPU attached to ``vm`` (``None`` if none)."""
    return _vgpus.get(vm)


def attach_vgpu(vm: Any, gvt: GvtDevice | None = None, **options: Any) -> Vgpu:
    """Create a vGPU for ``vm`` and open it (``intel_gvt_create_vgpu`` + ``intel_vgpu_open_device``).

    ``options`` override the VM's ``gvt_shadow_gtt`` options.  ``gvt`` is the
    physical GPU to share with other vGPUs (a private one by default).  Raises
    :class:`GvtError` ``EEXIST`` if a vGPU is already attached to this VM, and
    the notifier registration's error (``ESRCH`` from another process).
    """
    current = _vgpus.get(vm)
    if current is not None and current.attached:
        raise GvtError("EEXIST", "a vGPU is already attached to this VM")
    merged = {**_options.get(vm, {}), **options}
    merged.pop("attach", None)
    opts = GvtOptions.from_mapping(merged)
    if gvt is None:
        gvt = GvtDevice(gen=opts.gen, has_2m=opts.has_2m, out_of_sync=opts.out_of_sync,
                        oos_pages=opts.oos_pages, max_shadow_pages=opts.max_shadow_pages)
    vgpu = Vgpu(vm, gvt, opts)
    try:
        vgpu.open()
    except GvtError:
        vgpu.destroy()
        raise
    _vgpus[vm] = vgpu
    return vgpu


def detach_vgpu(vm: Any) -> Vgpu | None:
    """Close and destroy the vGPU of ``vm`` (``intel_vgpu_close_device``, ``intel_gvt_destroy_vgpu``)."""
    vgpu = _vgpus.pop(vm, None)
    if vgpu is not None:
        vgpu.close()
        vgpu.destroy()
    return vgpu


@hookimpl
def plugin_options(vm: Any, options: Mapping[str, Mapping[str, Any]]) -> None:
    """Read ``options["gvt_shadow_gtt"]``; attach a vGPU if ``attach`` is true."""
    mine = dict(options.get("gvt_shadow_gtt", {}))
    opts = GvtOptions.from_mapping(mine)  # validate now, whatever happens next
    _options[vm] = mine
    if opts.attach:
        attach_vgpu(vm)


@hookimpl
def guest_port_io(vm: Any, port: int, size: int, is_write: bool) -> int | None:
    """``GVT_PORT`` without an attached vGPU: claimed, status -ENODEV (the vGPU's own
    notifier node, registered later and so called first, handles it when attached)."""
    if port != GVT_PORT:
        return None
    vgpu = _vgpus.get(vm)
    if vgpu is not None and vgpu.attached:
        return None
    if is_write:
        return 0
    return NO_VGPU & ((1 << (8 * size)) - 1)
