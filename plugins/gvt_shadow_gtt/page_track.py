"""GVT's own page-track layer (i915 gvt/page_track.c).

A record per guest gfn says which handler owns trapped writes to that page and
whether GVT currently holds KVM write protection on it (``tracked``).
Registration does not protect; enabling does, through
:func:`~.kvmgt.intel_gvt_page_track_add`.  Callers hold ``vgpu_lock``.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

from . import kvmgt
from .errors import GvtError, status_of

if TYPE_CHECKING:
    from .vgpu import Vgpu

__all__ = [
    "PageTrack",
    "intel_vgpu_disable_page_track",
    "intel_vgpu_enable_page_track",
    "intel_vgpu_find_page_track",
    "intel_vgpu_page_track_handler",
    "intel_vgpu_register_page_track",
    "intel_vgpu_unregister_page_track",
]

#: handler(page_track, gpa, data, bytes); raises GvtError on failure.
Handler = Callable[["PageTrack", int, bytes, int], None]


@attrs.define(eq=False)
class PageTrack:
    """``struct intel_vgpu_page_track``."""

    handler: Handler
    priv_data: Any
    tracked: bool = False


def intel_vgpu_find_page_track(vgpu: Vgpu, gfn: int) -> PageTrack | None:
    """``intel_vgpu_find_page_track``: radix-tree lookup by gfn."""
    return vgpu.page_track_tree.get(gfn)


def intel_vgpu_register_page_track(vgpu: Vgpu, gfn: int, handler: Handler, priv: Any) -> None:
    """``intel_vgpu_register_page_track``: -EEXIST if a record exists; KVM is not touched."""
    if gfn in vgpu.page_track_tree:
        raise GvtError("EEXIST", f"gfn {gfn:#x} already has a page-track record")
    vgpu.page_track_tree[gfn] = PageTrack(handler, priv)


def intel_vgpu_unregister_page_track(vgpu: Vgpu, gfn: int) -> None:
    """``intel_vgpu_unregister_page_track``: drop the record; untrack in KVM if it was tracked.

    The untrack result is ignored (after detach it is -ESRCH and KVM's count stays).
    """
    track = vgpu.page_track_tree.pop(gfn, None)
    if track is None:
        return
    if track.tracked:
        with contextlib.suppress(GvtError):
            kvmgt.intel_gvt_page_track_remove(vgpu, gfn)


def intel_vgpu_enable_page_track(vgpu: Vgpu, gfn: int) -> None:
    """``intel_vgpu_enable_page_track``: -ENXIO without a record; write-protect once."""
    track = vgpu.page_track_tree.get(gfn)
    if track is None:
        raise GvtError("ENXIO", f"gfn {gfn:#x} has no page-track record")
    if track.tracked:
        return
    kvmgt.intel_gvt_page_track_add(vgpu, gfn)
    track.tracked = True


def intel_vgpu_disable_page_track(vgpu: Vgpu, gfn: int) -> None:
    """``intel_vgpu_disable_page_track``: -ENXIO without a record; unprotect once."""
    track = vgpu.page_track_tree.get(gfn)
    if track is None:
        raise GvtError("ENXIO", f"gfn {gfn:#x} has no page-track record")
    if not track.tracked:
        return
    kvmgt.intel_gvt_page_track_remove(vgpu, gfn)
    track.tracked = False


def intel_vgpu_page_track_handler(vgpu: Vgpu, gpa: int, data: bytes, nbytes: int) -> int:
    """``intel_vgpu_page_track_handler`` (6.6+: the caller holds ``vgpu_lock``).

    No record → -ENXIO.  In failsafe mode KVM write protection is dropped
    directly (the record keeps ``tracked = True``) and the handler is not run.
    A handler error is logged as "guest page write error" and returned.
    """
    gfn = gpa >> 12
    track = vgpu.page_track_tree.get(gfn)
    if track is None:
        return -errno.ENXIO
    if vgpu.failsafe:
        with contextlib.suppress(GvtError):
            kvmgt.intel_gvt_page_track_remove(vgpu, gfn)
        return 0
    try:
        track.handler(track, gpa, data, nbytes)
    except GvtError as exc:
        vgpu.error(f"guest page write error, gpa {gpa:#x}: {exc}")
        return status_of(exc)
    return 0
