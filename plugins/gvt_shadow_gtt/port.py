"""The guest's door to GVT: one I/O port of the guest program ABI.

A real guest driver reaches GVT through MMIO: PV notifications in the PV info
page (``g2v_notify`` + ``pdp[0..3]`` of ``struct vgt_if``) and ELSP writes that
submit a logical ring context holding the PDP root pointers.  The simulated
guest has port I/O instead, so both collapse into a descriptor in guest memory
and one port:

``out GVT_PORT (0x20), eax``
    eax = guest-physical address of a 56-byte descriptor (little endian)::

        +0   u32 op      1 GVT_OP_SUBMIT: submit a workload (ELSP)
                         2 VGT_G2V_PPGTT_L3_PAGE_TABLE_CREATE   3 ..._L3_..._DESTROY
                         4 VGT_G2V_PPGTT_L4_PAGE_TABLE_CREATE   5 ..._L4_..._DESTROY
        +4   u16 levels  3 or 4 (SUBMIT only; CREATE/DESTROY imply it)
        +6   u16 flags   bit 0 GVT_FLAG_GPU_STORE: the workload stores ``value``
                         at GPU virtual address ``gma`` (through the shadow PPGTT)
        +8   u64 pdp[4]  root pointers (4-level: pdp[0] only)
        +40  u64 gma
        +48  u64 value

    GVT handles it synchronously, as the VMM exits to it.
``in eax, GVT_PORT``
    the status of the last operation: 0, or a negative errno (two's
    complement); ``-ENODEV`` (0xffffffed) when no vGPU is attached.

Without an attached vGPU the port is still claimed (the module-level plugin
answers ``-ENODEV``), so a guest can probe for a vGPU.
"""

from __future__ import annotations

import errno
import struct
from typing import TYPE_CHECKING

from .errors import status_of
from .vgpu import (
    VGT_G2V_PPGTT_L3_PAGE_TABLE_CREATE,
    VGT_G2V_PPGTT_L3_PAGE_TABLE_DESTROY,
    VGT_G2V_PPGTT_L4_PAGE_TABLE_CREATE,
    VGT_G2V_PPGTT_L4_PAGE_TABLE_DESTROY,
)

if TYPE_CHECKING:
    from .vgpu import Vgpu

__all__ = [
    "DESCRIPTOR",
    "GVT_FLAG_GPU_STORE",
    "GVT_OP_SUBMIT",
    "GVT_PORT",
    "NO_VGPU",
    "handle_port",
    "pack_descriptor",
]

GVT_PORT = 0x20
GVT_OP_SUBMIT = 1
GVT_FLAG_GPU_STORE = 1 << 0
NO_VGPU = -errno.ENODEV
#: op, levels, flags, pdp[4], gma, value
DESCRIPTOR = struct.Struct("<IHH4QQQ")
_G2V = (VGT_G2V_PPGTT_L3_PAGE_TABLE_CREATE, VGT_G2V_PPGTT_L3_PAGE_TABLE_DESTROY,
        VGT_G2V_PPGTT_L4_PAGE_TABLE_CREATE, VGT_G2V_PPGTT_L4_PAGE_TABLE_DESTROY)


def pack_descriptor(op: int, pdps: tuple[int, ...] | list[int], levels: int = 4, *,
                    gma: int | None = None, value: int = 0) -> bytes:
    """The descriptor bytes (for tests and hosts that build one)."""
    p = [*list(pdps)[:4], 0, 0, 0, 0][:4]
    flags = GVT_FLAG_GPU_STORE if gma is not None else 0
    return DESCRIPTOR.pack(op, levels, flags, *p, gma or 0, value)


def _read_status(status: int, size: int) -> int:
    return status & ((1 << (8 * size)) - 1)


def handle_port(vgpu: Vgpu, port: int, size: int, value: int, is_write: bool) -> int | None:
    """Claim ``GVT_PORT``; run the descriptor's operation on ``out``, give the status on ``in``."""
    if port != GVT_PORT:
        return None
    if not is_write:
        return _read_status(vgpu.last_status, size)
    if not vgpu.attached:
        vgpu.last_status = NO_VGPU
        return 0
    gpa = value & 0xFFFFFFFF
    try:
        raw = vgpu.vm.read_guest(gpa, DESCRIPTOR.size)
    except Exception as exc:
        vgpu.last_status = status_of(exc) if hasattr(exc, "errno_name") else -errno.EFAULT
        return 0
    op, levels, flags, p0, p1, p2, p3, gma, val = DESCRIPTOR.unpack(raw)
    pdps = (p0, p1, p2, p3)
    if op == GVT_OP_SUBMIT:
        store = (gma, val) if flags & GVT_FLAG_GPU_STORE else None
        vgpu.submit(pdps, levels, store)
    elif op in _G2V:
        vgpu.last_status = vgpu.g2v_notify(op, pdps)
    else:
        vgpu.last_status = -errno.EINVAL
    return 0
