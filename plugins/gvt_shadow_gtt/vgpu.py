"""The vGPU (``struct intel_vgpu``): its options, lifecycle, locks, workloads.

A :class:`Vgpu` is created and opened by :func:`pagetrack.plugins.gvt_shadow_gtt.attach_vgpu`
(``intel_gvt_create_vgpu`` + ``intel_vgpu_open_device``) and closed and
destroyed by ``detach_vgpu`` (``intel_vgpu_close_device`` +
``intel_gvt_destroy_vgpu``).  Public methods take ``vgpu_lock`` themselves; the
functions of :mod:`.shadow`, :mod:`.mm` and :mod:`.kvmgt` expect it held.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import attrs
from pagetrack.audit.events import CATALOG
from pagetrack.errors import InputError, KvmError

from . import kvmgt
from . import mm as mmops
from .device import PREALLOCATED_OOS_PAGES, GvtDevice
from .dma import DmaCache, HostBacking, Iommu, Vfio
from .entry import GttType
from .errors import GvtError, status_of
from .ggtt import (
    GTT_START,
    Ggtt,
    emulate_ggtt_mmio_read,
    emulate_ggtt_mmio_write,
    intel_vgpu_reset_ggtt,
    intel_vgpu_write,
)
from .shadow import intel_vgpu_flush_post_shadow, intel_vgpu_sync_oos_pages
from .spt import create_scratch_page_tree, release_scratch_page_tree
from .translate import InvariantReport, check_mm, gpu_translate

if TYPE_CHECKING:
    from .device import OosPage
    from .mm import Mm
    from .page_track import PageTrack
    from .spt import Spt

__all__ = [
    "VGT_G2V_PPGTT_L3_PAGE_TABLE_CREATE",
    "VGT_G2V_PPGTT_L3_PAGE_TABLE_DESTROY",
    "VGT_G2V_PPGTT_L4_PAGE_TABLE_CREATE",
    "VGT_G2V_PPGTT_L4_PAGE_TABLE_DESTROY",
    "GvtOptions",
    "Vgpu",
    "VgpuLock",
    "VgpuStats",
]

#: ``enum vgt_g2v_type`` (i915 pvinfo.h).
VGT_G2V_PPGTT_L3_PAGE_TABLE_CREATE = 2
VGT_G2V_PPGTT_L3_PAGE_TABLE_DESTROY = 3
VGT_G2V_PPGTT_L4_PAGE_TABLE_CREATE = 4
VGT_G2V_PPGTT_L4_PAGE_TABLE_DESTROY = 5


def _range_list(value: Any) -> tuple[tuple[int, int], ...]:
    return tuple((int(lo), int(hi)) for lo, hi in value)


@attrs.frozen
class GvtOptions:
    """Plugin options (``VM(options={"gvt_shadow_gtt": {...}})`` or ``attach_vgpu(vm, **kw)``).

    ``attach`` attaches a vGPU when the VM is created.  ``gen`` / ``ips`` decide
    64 KiB support (gen11+ always; gen9 when the guest set the IPS field of
    GAMW_ECO_DEV_RW_IA, modelled by ``ips``; gen8 never); ``has_2m`` 2 MiB GTT
    pages; ``out_of_sync`` / ``oos_pages`` the OOS machinery (off, 8192);
    ``backing`` / ``huge_ranges`` / ``pin_limit`` the host memory and
    ``iommu`` DMA remapping (off: passthrough, DMA address = host address; see
    :mod:`.dma`); ``max_shadow_pages`` the shadow-page budget;
    ``check_invariant`` runs :func:`~.translate.check_mm` after every submit;
    ``aperture`` / ``hidden`` the vGPU's GGTT slices ``(base, size)``.
    """

    attach: bool = False
    gen: int = 9
    ips: bool = False
    has_2m: bool = True
    out_of_sync: bool = False
    oos_pages: int = PREALLOCATED_OOS_PAGES
    backing: str = "4k"
    huge_ranges: tuple[tuple[int, int], ...] = attrs.field(default=(), converter=_range_list)
    pin_limit: int | None = None
    iommu: bool = True
    max_shadow_pages: int | None = None
    check_invariant: bool = True
    aperture: tuple[int, int] = (0x08000000, 0x04000000)
    hidden: tuple[int, int] = (0x80000000, 0x10000000)

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> GvtOptions:
        """Validate a user mapping (unknown keys and bad values are an ``InputError``)."""
        known = {f.name for f in attrs.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise InputError(f"unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})",
                             "gvt_shadow_gtt")
        try:
            opts = cls(**dict(options))
        except (TypeError, ValueError) as exc:
            raise InputError(str(exc), "gvt_shadow_gtt") from None
        if opts.backing not in ("4k", "huge"):
            raise InputError(f"backing must be '4k' or 'huge', not {opts.backing!r}", "gvt_shadow_gtt.backing")
        if opts.gen < 8:
            raise InputError("GVT-g needs gen8 (Broadwell) or later", "gvt_shadow_gtt.gen")
        return opts


class VgpuLock:
    """``vgpu->vgpu_lock``: a non-recursive mutex that knows its owner (for lockdep asserts)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.owner: int | None = None

    def __enter__(self) -> VgpuLock:
        self._lock.acquire()
        self.owner = threading.get_ident()
        return self

    def __exit__(self, *exc: object) -> None:
        self.owner = None
        self._lock.release()

    def held(self) -> bool:
        return self.owner == threading.get_ident()

    def assert_held(self) -> None:
        """``lockdep_assert_held(&vgpu->vgpu_lock)``."""
        if not self.held():
            raise AssertionError("vgpu_lock is not held")


@attrs.define
class VgpuStats:
    """Counters of one vGPU."""

    track_write_calls: int = 0  #: kvmgt_page_track_write invocations (every emulated write)
    handled_writes: int = 0  #: of those, writes to a gfn in ptable (handler run)
    shadow_updates: int = 0  #: shadow entries and shadow roots written
    submits: int = 0
    submit_errors: int = 0
    invariant_checks: int = 0
    invariant_passed: int = 0
    reclaims: int = 0
    gpu_stores: int = 0
    gpu_faults: int = 0

    def as_dict(self) -> dict[str, int]:
        return attrs.asdict(self)


class Vgpu:
    """One vGPU on one VM (``intel_gvt_create_vgpu``: scratch tree, GGTT, caches)."""

    def __init__(self, vm: Any, gvt: GvtDevice, options: GvtOptions) -> None:
        # A weak reference: the plugin's WeakKeyDictionary maps the VM to this vGPU.
        self._vm = weakref.ref(vm)
        self.gvt = gvt
        self.options = options
        self.id = gvt.add_vgpu(self)
        self.lock = VgpuLock()
        self.attached = False  #: INTEL_VGPU_STATUS_ATTACHED
        self.active = False
        self.failsafe = False
        self.destroyed = False
        self.ptable: set[int] = set()
        self.page_track_tree: dict[int, PageTrack] = {}
        self.spt_tree: dict[int, Spt] = {}
        self.post_shadow_list: dict[Spt, None] = {}
        self.oos_page_list: dict[OosPage, None] = {}
        self.scratch_pt: dict[GttType, int] = {}
        self.ppgtt_mm_list: list[Mm] = []
        self.backing = HostBacking(options.backing, options.huge_ranges)
        self.vfio = Vfio(self.backing, self._gfn_is_ram, options.pin_limit)
        self.dma = DmaCache(self.vfio, lambda: self.attached, self._dma_event, Iommu(options.iommu))
        self.ggtt = Ggtt(tuple(options.aperture), tuple(options.hidden))  # type: ignore[arg-type]
        self.stats = VgpuStats()
        self.tracker = kvmgt.KvmgtTracker(self)
        self.tracker_name: str | None = None
        self.cause = "api"
        self.log: list[str] = []  #: gvt_vgpu_err lines
        self.last_status = 0
        self.reports: list[InvariantReport] = []
        create_scratch_page_tree(self)
        intel_vgpu_reset_ggtt(self, False)

    @property
    def vm(self) -> Any:
        """The VM (``vgpu->vfio_device.kvm``)."""
        vm = self._vm()
        if vm is None:
            raise GvtError("ESRCH", "the VM of this vGPU is gone")
        return vm

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"<Vgpu {self.id} {state} spts={len(self.spt_tree)} ptable={len(self.ptable)}>"

    # ---- facts --------------------------------------------------------------------------
    @property
    def ips_enabled(self) -> bool:
        """``vgpu_ips_enabled``: gen11+ always, gen9 iff the guest enabled 64K IPS, gen8 never."""
        gen = self.gvt.gen
        return gen >= 11 or (gen == 9 and self.options.ips)

    def _gfn_is_ram(self, gfn: int) -> bool:
        return self.vm.memslots.gfn_to_memslot(gfn) is not None

    # ---- audit and logs -----------------------------------------------------------------
    @property
    def audit_on(self) -> bool:
        audit = self.vm.audit
        return bool(audit.enabled) and not audit.closed

    def emit(self, event: str, **fields: Any) -> None:
        """Emit a catalogued GVT audit event with this vGPU's id."""
        self.vm.audit.emit(event, CATALOG[event][0], vgpu=self.id, **fields)

    def _dma_event(self, **fields: Any) -> None:
        if self.audit_on and self.vm.audit.debug:
            self.emit("gvt_dma", **fields)

    def error(self, message: str) -> None:
        """``gvt_vgpu_err``: keep the line and emit ``gvt_error``."""
        self.log.append(message)
        if self.audit_on:
            self.emit("gvt_error", message=message)

    @contextmanager
    def caused(self, cause: str) -> Iterator[None]:
        """Label shadow updates made inside with ``cause`` (outermost label wins)."""
        if self.cause != "api":
            yield
            return
        self.cause = cause
        try:
            yield
        finally:
            self.cause = "api"

    # ---- open / close / destroy ---------------------------------------------------------
    def open(self) -> None:
        """``intel_vgpu_open_device`` (6.6+): register the notifier, set ATTACHED, activate."""
        name = f"kvmgt.vgpu{self.id}"
        try:
            self.tracker_name = self.vm.register_tracker(self.tracker, name)
        except KvmError as exc:
            self.error("KVM is required to use Intel vGPU")
            raise GvtError(exc.errno_name, "kvm_page_track_register_notifier failed") from exc
        self.attached = True
        self.active = True
        if self.audit_on:
            self.emit("gvt_attach", plugin=name)

    def close(self) -> None:
        """``intel_vgpu_close_device``: deactivate, clear ATTACHED, unregister, forget ptable and DMA.

        The mms and their page-track records stay until :meth:`destroy`.
        """
        if not self.attached:
            return
        with self.lock:
            self.active = False
            self.attached = False
        if self.tracker_name is not None:
            self.vm.unregister_tracker(self.tracker_name)
            self.tracker_name = None
        with self.lock:
            kvmgt.kvmgt_protect_table_destroy(self)
            self.dma.destroy()
        if self.audit_on:
            self.emit("gvt_detach", action="close")

    def destroy(self) -> None:
        """``intel_gvt_destroy_vgpu``: reset the GGTT, ``intel_vgpu_clean_gtt``.

        Untracking is refused now (not attached), so KVM's counts taken by this
        vGPU stay (harmless when the VM is going away too).
        """
        if self.destroyed:
            return
        with self.lock, self.caused("invalidate"):
            intel_vgpu_reset_ggtt(self, True)
            mmops.intel_vgpu_destroy_all_ppgtt_mm(self)
            release_scratch_page_tree(self)
        self.destroyed = True
        self.gvt.remove_vgpu(self.id)
        if self.audit_on:
            self.emit("gvt_detach", action="destroy")

    def enter_failsafe(self) -> None:
        """``enter_failsafe_mode``: from now on trapped writes only drop protection."""
        with self.lock:
            self.failsafe = True

    # ---- page tracking (locked wrappers of kvmgt / page_track) ----------------------------
    def page_track_add(self, gfn: int) -> int:
        """``intel_gvt_page_track_add`` under ``vgpu_lock``: 0 or -errno."""
        with self.lock:
            try:
                kvmgt.intel_gvt_page_track_add(self, gfn)
            except GvtError as exc:
                return status_of(exc)
        return 0

    def page_track_remove(self, gfn: int) -> int:
        """``intel_gvt_page_track_remove`` under ``vgpu_lock``: 0 or -errno."""
        with self.lock:
            try:
                kvmgt.intel_gvt_page_track_remove(self, gfn)
            except GvtError as exc:
                return status_of(exc)
        return 0

    # ---- mms ---------------------------------------------------------------------------
    def get_ppgtt_mm(self, pdps: Sequence[int], levels: int = 4) -> Mm:
        """``intel_vgpu_get_ppgtt_mm`` (raises :class:`GvtError`)."""
        with self.lock:
            return mmops.intel_vgpu_get_ppgtt_mm(self, mmops.root_type_of_levels(levels), pdps)

    def put_ppgtt_mm(self, pdps: Sequence[int]) -> None:
        """``intel_vgpu_put_ppgtt_mm`` (raises :class:`GvtError`)."""
        with self.lock:
            mmops.intel_vgpu_put_ppgtt_mm(self, pdps)

    def find_ppgtt_mm(self, pdps: Sequence[int]) -> Mm | None:
        """``intel_vgpu_find_ppgtt_mm``."""
        with self.lock:
            return mmops.intel_vgpu_find_ppgtt_mm(self, pdps)

    def g2v_notify(self, op: int, pdps: Sequence[int]) -> int:
        """``handle_g2v_notification`` for the PPGTT create/destroy notifications: 0 or -errno."""
        status = self._g2v_locked(op, pdps)
        self.last_status = status
        if self.audit_on:
            levels = 3 if op in (VGT_G2V_PPGTT_L3_PAGE_TABLE_CREATE, VGT_G2V_PPGTT_L3_PAGE_TABLE_DESTROY) else 4
            self.emit("gvt_submit", op=op, levels=levels, pdps=[int(p) for p in pdps[:4]], status=status)
        return status

    def _g2v_locked(self, op: int, pdps: Sequence[int]) -> int:
        with self.lock:
            try:
                if op in (VGT_G2V_PPGTT_L3_PAGE_TABLE_CREATE, VGT_G2V_PPGTT_L4_PAGE_TABLE_CREATE):
                    levels = 3 if op == VGT_G2V_PPGTT_L3_PAGE_TABLE_CREATE else 4
                    mmops.intel_vgpu_get_ppgtt_mm(self, mmops.root_type_of_levels(levels), pdps)
                elif op in (VGT_G2V_PPGTT_L3_PAGE_TABLE_DESTROY, VGT_G2V_PPGTT_L4_PAGE_TABLE_DESTROY):
                    mmops.intel_vgpu_put_ppgtt_mm(self, pdps)
                else:
                    raise GvtError("EINVAL", f"unknown g2v notification {op}")
            except GvtError as exc:
                return status_of(exc)
        return 0

    def submit(self, pdps: Sequence[int], levels: int = 4,
               gpu_store: tuple[int, int] | None = None) -> int:
        """Create, prepare, run and complete one workload whose context has these root pointers.

        ``prepare_mm`` (get the mm: find, else create and shadow) →
        ``prepare_workload`` (``intel_vgpu_pin_mm``, ``intel_vgpu_sync_oos_pages``,
        ``intel_vgpu_flush_post_shadow``) → the GPU runs: the invariant check
        (option ``check_invariant``) and ``gpu_store = (gma, value)``, an 8-byte
        store through the shadow tables → completion (unpin, put).  Returns 0 or
        -errno; the status is also what the guest reads from the GVT port.
        """
        with self.lock:
            status = self._submit_locked(pdps, levels, gpu_store)
        self.last_status = status
        return status

    def _submit_locked(self, pdps: Sequence[int], levels: int,
                       gpu_store: tuple[int, int] | None) -> int:
        self.stats.submits += 1
        status = 0
        try:
            if not self.active:
                raise GvtError("EINVAL", "vGPU is not active")
            mm = mmops.intel_vgpu_get_ppgtt_mm(self, mmops.root_type_of_levels(levels), pdps)
            try:
                mmops.intel_vgpu_pin_mm(mm)
                intel_vgpu_sync_oos_pages(self)
                intel_vgpu_flush_post_shadow(self)
                if self.options.check_invariant:
                    self._check(mm)
                if gpu_store is not None:
                    self._gpu_store(mm, *gpu_store)
            finally:
                mmops.intel_vgpu_unpin_mm(mm)
                mmops.intel_vgpu_mm_put(mm)
        except GvtError as exc:
            status = status_of(exc)
            self.stats.submit_errors += 1
            self.error(f"workload submission failed: {exc}")
        if self.audit_on:
            self.emit("gvt_submit", op=1, levels=levels, pdps=[int(p) for p in pdps[:4]], status=status)
        return status

    # ---- the GPU ----------------------------------------------------------------------
    def _check(self, mm: Mm) -> InvariantReport:
        report = check_mm(mm)
        self.reports.append(report)
        self.stats.invariant_checks += 1
        if report.ok:
            self.stats.invariant_passed += 1
        if self.audit_on:
            self.emit("gvt_invariant", mm=mm.id, pages=report.pages, mismatches=len(report.mismatches))
        return report

    def check_invariant(self, mm: Mm) -> InvariantReport:
        """Run the shadow invariant on ``mm`` now (counted like a submit's check)."""
        with self.lock:
            return self._check(mm)

    def check_all(self) -> list[InvariantReport]:
        """The invariant for every shadowed mm of this vGPU."""
        with self.lock:
            return [check_mm(mm) for mm in self.ppgtt_mm_list if mm.shadowed]

    def _gpu_store(self, mm: Mm, gma: int, value: int) -> None:
        """The GPU stores 8 bytes at ``gma``: device DMA into guest RAM, invisible to trackers."""
        pfn = gpu_translate(mm, gma)
        gfn = None if pfn is None else self.backing.gfn_of(pfn)
        if self.audit_on:
            self.emit("gvt_gpu_store", mm=mm.id, gma=gma, pfn=pfn, gfn=gfn)
        if gfn is None:
            self.stats.gpu_faults += 1  # fault, or the scratch page: the store is lost
            return
        self.stats.gpu_stores += 1
        self.vm.write_guest((gfn << 12) | (gma & 0xFFF), (value & ((1 << 64) - 1)).to_bytes(8, "little"))

    def gpu_translate(self, mm: Mm, gma: int) -> int | None:
        """Host pfn the GPU reaches for ``gma`` through ``mm``'s shadow tables."""
        with self.lock:
            return gpu_translate(mm, gma)

    # ---- GGTT and VFIO ----------------------------------------------------------------
    def ggtt_mmio_write(self, off: int, data: bytes) -> None:
        """``intel_vgpu_emulate_ggtt_mmio_write``: ``off`` relative to the GTT start."""
        with self.lock:
            emulate_ggtt_mmio_write(self, off, data)

    def ggtt_mmio_read(self, off: int, nbytes: int) -> bytes:
        """``intel_vgpu_emulate_ggtt_mmio_read``."""
        with self.lock:
            return emulate_ggtt_mmio_read(self, off, nbytes)

    def vfio_write(self, pos: int, data: bytes) -> int:
        """``intel_vgpu_write``: a write to the vfio device file (``pos`` = region << 40 | offset)."""
        return intel_vgpu_write(self, pos, data)

    def bar0_gtt_pos(self, index: int) -> int:
        """The vfio file position of GGTT entry ``index`` in BAR0 (region 0)."""
        return GTT_START + 8 * index

    def vfio_dma_unmap(self, iova: int, length: int) -> int:
        """``intel_vgpu_dma_unmap``: userspace unmapped an IOVA range."""
        with self.lock:
            return self.dma.vfio_dma_unmap(iova, length)
