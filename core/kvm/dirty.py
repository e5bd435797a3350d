"""Dirty-log harvesters for the three KVM interfaces.

* :class:`BitmapLog` – KVM_GET_DIRTY_LOG (fetch and re-protect in one call).
* :class:`ClearLog` – KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: KVM_GET_DIRTY_LOG only copies,
  KVM_CLEAR_DIRTY_LOG re-protects what was reported; optionally INITIALLY_SET.
* :class:`RingLog` – KVM_CAP_DIRTY_LOG_RING(_ACQ_REL): per-vCPU ring of ``kvm_dirty_gfn``
  mmap'ed from the vCPU fd, collected entries get RESET, then KVM_RESET_DIRTY_RINGS.

Order constraints (Documentation/virt/kvm/api.rst): manual protect must be enabled
before memslots exist, the ring before any vCPU; KVM_GET_DIRTY_LOG fails while the
ring is on.  Every harvester is driven as ``enable(vm)`` → memslots → ``attach(vcpu)``
→ ``start()`` → ``harvest()``…
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from dataclasses import dataclass
from typing import ClassVar

from . import ioctls as k
from .vm import KvmUnavailable, Vcpu, Vm

__all__ = ["MODES", "BitmapLog", "ClearLog", "DirtyLog", "RingLog", "Slot", "make_dirty_log"]


@dataclass(frozen=True)
class Slot:
    """A memslot as the harvesters see it."""

    id: int
    base_gfn: int
    npages: int


def _bits_to_gfns(bitmap: ctypes.Array, base_gfn: int) -> list[int]:
    out: list[int] = []
    for wi, word in enumerate(bitmap):
        while word:
            low = word & -word
            out.append(base_gfn + wi * 64 + low.bit_length() - 1)
            word ^= low
    return out


class DirtyLog:
    """Base class: holds the VM and the slots; subclasses implement the KVM protocol."""

    name: ClassVar[str] = ""
    memslot_flags: ClassVar[int] = k.KVM_MEM_LOG_DIRTY_PAGES

    def __init__(self) -> None:
        self.vm: Vm | None = None
        self.slots: list[Slot] = []

    def enable(self, vm: Vm) -> None:
        """Called right after KVM_CREATE_VM, before memslots and vCPUs."""
        self.vm = vm

    def add_slot(self, slot: Slot) -> None:
        self.slots.append(slot)

    def attach(self, vcpu: Vcpu) -> None:
        """Called after KVM_CREATE_VCPU."""

    def start(self) -> None:
        """Called once before the first KVM_RUN."""

    def harvest(self) -> dict[int, list[int]]:
        """Slot id → gfns dirtied since the previous harvest; re-arms write protection."""
        raise NotImplementedError

    def close(self) -> None:
        """Release mappings."""


class BitmapLog(DirtyLog):
    """KVM_GET_DIRTY_LOG: returns and clears the slot's bitmap, write-protecting the pages."""

    name = "bitmap"

    def __init__(self) -> None:
        super().__init__()
        self._bitmaps: dict[int, ctypes.Array] = {}

    def add_slot(self, slot: Slot) -> None:
        super().add_slot(slot)
        self._bitmaps[slot.id] = (ctypes.c_uint64 * ((slot.npages + 63) // 64))()

    def _get(self, slot: Slot) -> ctypes.Array:
        assert self.vm is not None
        bm = self._bitmaps[slot.id]
        self.vm.get_dirty_log(slot.id, bm)
        return bm

    def harvest(self) -> dict[int, list[int]]:
        return {s.id: _bits_to_gfns(self._get(s), s.base_gfn) for s in self.slots}


class ClearLog(BitmapLog):
    """KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: KVM_GET_DIRTY_LOG then KVM_CLEAR_DIRTY_LOG.

    With ``initially_set`` (KVM_DIRTY_LOG_INITIALLY_SET) every bit starts set and no page
    starts write-protected; :meth:`start` does one GET + CLEAR of everything so that the
    first round reports only what the guest wrote, as in bitmap mode.
    """

    name = "clear"

    def __init__(self, initially_set: bool = False) -> None:
        super().__init__()
        self.initially_set = initially_set

    def enable(self, vm: Vm) -> None:
        super().enable(vm)
        supported = vm.check_extension(k.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
        want = k.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
        if self.initially_set:
            want |= k.KVM_DIRTY_LOG_INITIALLY_SET
        if supported & want != want:
            raise KvmUnavailable(f"KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 offers {supported:#x}, need {want:#x}")
        vm.enable_cap(k.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, want)

    def _get_and_clear(self, slot: Slot) -> ctypes.Array:
        assert self.vm is not None
        bm = self._get(slot)
        if any(bm):
            self.vm.clear_dirty_log(slot.id, 0, slot.npages, bm)
        return bm

    def start(self) -> None:
        if self.initially_set:
            for s in self.slots:
                self._get_and_clear(s)

    def harvest(self) -> dict[int, list[int]]:
        return {s.id: _bits_to_gfns(self._get_and_clear(s), s.base_gfn) for s in self.slots}


class RingLog(DirtyLog):
    """KVM_CAP_DIRTY_LOG_RING_ACQ_REL (or KVM_CAP_DIRTY_LOG_RING): a per-vCPU ring of gfns."""

    name = "ring"

    def __init__(self, entries: int = 4096) -> None:
        super().__init__()
        if entries <= 0 or entries & (entries - 1):
            raise ValueError(f"ring size {entries} must be a power of two")
        self.entries = entries
        self.cap = 0
        self._ring: mmap.mmap | None = None
        self._next = 0  # fetch index (free-running)

    def enable(self, vm: Vm) -> None:
        super().enable(vm)
        size = self.entries * ctypes.sizeof(k.KvmDirtyGfn)
        for cap in (k.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, k.KVM_CAP_DIRTY_LOG_RING):
            limit = vm.check_extension(cap)
            if limit:
                if size > limit:
                    raise KvmUnavailable(f"dirty ring of {self.entries} entries exceeds KVM's {limit} bytes")
                vm.enable_cap(cap, size)
                self.cap = cap
                return
        raise KvmUnavailable("KVM offers no dirty ring (KVM_CAP_DIRTY_LOG_RING)")

    def attach(self, vcpu: Vcpu) -> None:
        self._ring = vcpu.map_dirty_ring(self.entries * ctypes.sizeof(k.KvmDirtyGfn))

    def harvest(self) -> dict[int, list[int]]:
        assert self._ring is not None and self.vm is not None
        ring, mask = self._ring, self.entries - 1
        base = {s.id: s.base_gfn for s in self.slots}
        out: dict[int, list[int]] = {s.id: [] for s in self.slots}
        n = 0
        while True:
            off = ((self._next + n) & mask) * 16
            flags, slot, offset = struct.unpack_from("<IIQ", ring, off)
            if not flags & k.KVM_DIRTY_GFN_F_DIRTY:
                break
            sid = slot & 0xFFFF
            out.setdefault(sid, []).append(base.get(sid, 0) + offset)
            struct.pack_into("<I", ring, off, k.KVM_DIRTY_GFN_F_RESET)
            n += 1
            if n == self.entries:
                break
        self._next += n
        if n:
            self.vm.reset_dirty_rings()
        return {sid: sorted(set(g)) for sid, g in out.items()}

    def close(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None


MODES = ("bitmap", "clear", "ring")


def make_dirty_log(mode: str, initially_set: bool = False, ring_size: int = 4096) -> DirtyLog:
    """The harvester for ``mode`` (``bitmap``, ``clear`` or ``ring``)."""
    if mode == "bitmap":
        return BitmapLog()
    if mode == "clear":
        return ClearLog(initially_set)
    if mode == "ring":
        return RingLog(ring_size)
    raise ValueError(f"unknown dirty-log mode {mode!r}; expected one of {', '.join(MODES)}")
