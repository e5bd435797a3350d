"""Guest memory: host mappings, memslots and the memslot set.

Models ``KVM_SET_USER_MEMORY_REGION`` as implemented by ``kvm_set_memory_region``
and ``check_memory_region_flags`` (virt/kvm/kvm_main.c): validation, and the
classification of a request into CREATE, DELETE, MOVE or FLAGS_ONLY.  The staged
update itself (invalidate, prepare, commit) is run by :class:`pagetrack.VM`,
because it involves the MMU and the trackers.

Host memory is anonymous ``mmap`` with ``MAP_NORESERVE``: pages cost host RAM only
once touched, so a VM with a terabyte of memslots is cheap to create.
"""

from __future__ import annotations

import bisect
import contextlib
import mmap
import mmap as _mmap
from enum import Enum
from typing import TYPE_CHECKING, Any

import attrs

from .errors import KvmError

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "KVM_ADDRESS_SPACE_NUM",
    "KVM_MEM_LOG_DIRTY_PAGES",
    "KVM_MEM_MAX_NR_PAGES",
    "KVM_MEM_READONLY",
    "KVM_MEM_SLOTS_NUM",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "Change",
    "HostMemory",
    "MemSlot",
    "MemSlots",
    "SlotArch",
]

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEM_SLOTS_NUM = 32764  # KVM_USER_MEM_SLOTS on x86
KVM_ADDRESS_SPACE_NUM = 2  # normal and SMM
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
_HVA_BASE = 0x7F00_0000_0000
_VALID_FLAGS = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY


class Change(Enum):
    """``enum kvm_mr_change``."""

    CREATE = "create"
    DELETE = "delete"
    MOVE = "move"
    FLAGS_ONLY = "flags_only"


class HostMemory:
    """The VMM's address space: anonymous mappings at simulated host addresses.

    ``mmap(size)`` returns a host virtual address (hva) to pass as a memslot's
    ``userspace_addr``, like ``mmap(2)`` in a VMM.
    """

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._maps: dict[int, mmap.mmap] = {}
        self._next = _HVA_BASE
        #: Host page numbers (hva >> 12) that have been written: a read fault may
        #: map such a page writable (``hva_to_pfn`` finds a writable host PTE),
        #: while an untouched page is mapped read-only (the zero page).
        self.populated: set[int] = set()

    def mmap(self, size: int) -> int:
        """Map ``size`` bytes (rounded up to pages) of zeroed memory; return its hva."""
        if size <= 0:
            raise KvmError("EINVAL", f"cannot map {size} bytes")
        size = (size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
        hva = self._next
        self._next += size + (1 << 30)  # a guard gap, and 1 GiB alignment for huge pages
        self._next = (self._next + (1 << 30) - 1) & ~((1 << 30) - 1)
        bisect.insort(self._starts, hva)
        self._maps[hva] = m
        return hva

    def munmap(self, hva: int) -> None:
        """Unmap the mapping that starts at ``hva``."""
        m = self._maps.pop(hva, None)
        if m is None:
            raise KvmError("EINVAL", f"no mapping starts at hva {hva:#x}")
        self._starts.remove(hva)
        first = hva >> PAGE_SHIFT
        last = first + (len(m) >> PAGE_SHIFT)
        self.populated = {p for p in self.populated if not first <= p < last}
        m.close()

    def lookup(self, hva: int, size: int) -> tuple[_mmap.mmap, int] | None:
        """The mapping holding ``[hva, hva + size)`` and the offset in it, or ``None``."""
        i = bisect.bisect_right(self._starts, hva) - 1
        if i < 0:
            return None
        start = self._starts[i]
        m = self._maps[start]
        off = hva - start
        if off + size > len(m):
            return None
        return m, off

    def close(self) -> None:
        """Unmap everything."""
        for m in self._maps.values():
            # A view may still be alive somewhere; the GC unmaps it then.
            with contextlib.suppress(BufferError):
                m.close()
        self._maps.clear()
        self._starts.clear()


@attrs.define(eq=False)
class SlotArch:
    """x86 per-slot metadata (``struct kvm_arch_memory_slot``).

    ``gfn_write_track`` is the 16-bit write-track counter array (``None`` until
    write tracking is enabled for the VM); ``lpage_info[0]`` / ``[1]`` are the
    ``disallow_lpage`` counts of the 2 MiB and 1 GiB frames the slot touches.
    """

    gfn_write_track: np.ndarray | None = None
    lpage_info: list[np.ndarray] = attrs.field(factory=list)


@attrs.define(eq=False)
class MemSlot:
    """One memslot (``struct kvm_memory_slot``).

    ``mem`` is a writable view of the backing host memory (``npages`` pages).
    ``dirty_bitmap`` belongs to the dirty logger and is ``None`` unless it set one.
    """

    as_id: int
    id: int
    base_gfn: int
    npages: int
    flags: int
    userspace_addr: int
    mem: memoryview = attrs.field(repr=False)
    arch: SlotArch = attrs.field(factory=SlotArch, repr=False)
    dirty_bitmap: Any = attrs.field(default=None, repr=False)

    @property
    def key(self) -> int:
        """``as_id << 16 | id``, the encoding of ``struct kvm_dirty_log.slot``."""
        return self.as_id << 16 | self.id

    @property
    def end_gfn(self) -> int:
        """First gfn past the slot."""
        return self.base_gfn + self.npages

    @property
    def readonly(self) -> bool:
        return bool(self.flags & KVM_MEM_READONLY)

    @property
    def logging(self) -> bool:
        """``kvm_slot_dirty_track_enabled``: the slot has ``KVM_MEM_LOG_DIRTY_PAGES``."""
        return bool(self.flags & KVM_MEM_LOG_DIRTY_PAGES)

    def hva_page(self, gfn: int) -> int:
        """Host page number (hva >> 12) backing ``gfn`` (``__gfn_to_hva_memslot``)."""
        return (self.userspace_addr >> PAGE_SHIFT) + gfn - self.base_gfn

    def contains(self, gfn: int) -> bool:
        return self.base_gfn <= gfn < self.base_gfn + self.npages


@attrs.frozen
class SlotRequest:
    """A validated ``KVM_SET_USER_MEMORY_REGION`` request and what it changes."""

    change: Change
    as_id: int
    id: int
    flags: int
    base_gfn: int
    npages: int
    userspace_addr: int
    old: MemSlot | None


class MemSlots:
    """The memslot sets of one VM (one per address space), with O(log n) lookup.

    Models ``struct kvm_memslots`` and ``__gfn_to_memslot`` (which searches a
    gfn tree; here a sorted list and ``bisect``, plus a last-hit cache as
    ``kvm_vcpu_gfn_to_memslot`` keeps one).
    """

    def __init__(self, host: HostMemory) -> None:
        self.host = host
        self._by_id: list[dict[int, MemSlot]] = [{} for _ in range(KVM_ADDRESS_SPACE_NUM)]
        self._bases: list[list[int]] = [[] for _ in range(KVM_ADDRESS_SPACE_NUM)]
        self._sorted: list[list[MemSlot]] = [[] for _ in range(KVM_ADDRESS_SPACE_NUM)]
        self._last: MemSlot | None = None
        self.generation = 0

    # ---- queries -------------------------------------------------------------
    def get(self, as_id: int, id: int) -> MemSlot | None:
        """The slot with this id, if any (``id_to_memslot``)."""
        return self._by_id[as_id].get(id)

    def slots(self, as_id: int = 0) -> list[MemSlot]:
        """Slots of one address space, by base gfn."""
        return list(self._sorted[as_id])

    def all_slots(self) -> list[MemSlot]:
        """Slots of every address space."""
        return [s for space in self._sorted for s in space]

    def gfn_to_memslot(self, gfn: int, as_id: int = 0) -> MemSlot | None:
        """The slot containing ``gfn`` in address space ``as_id`` (``gfn_to_memslot``)."""
        last = self._last
        if last is not None and last.as_id == as_id and last.base_gfn <= gfn < last.base_gfn + last.npages:
            return last
        bases = self._bases[as_id]
        i = bisect.bisect_right(bases, gfn) - 1
        if i < 0:
            return None
        slot = self._sorted[as_id][i]
        if gfn < slot.base_gfn + slot.npages:
            self._last = slot
            return slot
        return None

    # ---- validation (kvm_set_memory_region) -----------------------------------
    def check(self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, userspace_addr: int) -> SlotRequest | None:
        """Validate a request the way ``kvm_set_memory_region`` does.

        Returns the classified change, or ``None`` for a request identical to the
        existing slot (a no-op that returns 0).  Raises :class:`KvmError`.
        """
        if flags & ~_VALID_FLAGS:
            raise KvmError("EINVAL", f"unknown memslot flags {flags & ~_VALID_FLAGS:#x}")
        as_id, id_ = slot >> 16, slot & 0xFFFF
        if as_id >= KVM_ADDRESS_SPACE_NUM or id_ >= KVM_MEM_SLOTS_NUM:
            raise KvmError("EINVAL", f"slot {slot:#x}: address space {as_id} / id {id_} out of range")
        if memory_size < 0 or memory_size & (PAGE_SIZE - 1):
            raise KvmError("EINVAL", f"memory_size {memory_size:#x} is not page aligned")
        if guest_phys_addr < 0 or guest_phys_addr & (PAGE_SIZE - 1):
            raise KvmError("EINVAL", f"guest_phys_addr {guest_phys_addr:#x} is not page aligned")
        if userspace_addr & (PAGE_SIZE - 1):
            raise KvmError("EINVAL", f"userspace_addr {userspace_addr:#x} is not page aligned")
        if memory_size and self.host.lookup(userspace_addr, memory_size) is None:
            raise KvmError("EINVAL", f"userspace range {userspace_addr:#x}+{memory_size:#x} is not mapped")
        if guest_phys_addr + memory_size > 1 << 64 or guest_phys_addr + memory_size < guest_phys_addr:
            raise KvmError("EINVAL", "guest physical range wraps around")
        npages = memory_size >> PAGE_SHIFT
        if npages > KVM_MEM_MAX_NR_PAGES:
            raise KvmError("EINVAL", f"{npages} pages exceed KVM_MEM_MAX_NR_PAGES")
        base_gfn = guest_phys_addr >> PAGE_SHIFT
        old = self._by_id[as_id].get(id_)
        if npages == 0:
            if old is None:
                raise KvmError("EINVAL", f"slot {slot:#x} does not exist, cannot delete it")
            return SlotRequest(Change.DELETE, as_id, id_, flags, old.base_gfn, old.npages, old.userspace_addr, old)
        if old is None:
            change = Change.CREATE
        else:
            if userspace_addr != old.userspace_addr or npages != old.npages or (flags ^ old.flags) & KVM_MEM_READONLY:
                raise KvmError("EINVAL", f"slot {slot:#x}: size, userspace_addr and READONLY cannot change")
            if base_gfn != old.base_gfn:
                change = Change.MOVE
            elif flags != old.flags:
                change = Change.FLAGS_ONLY
            else:
                return None
        if change in (Change.CREATE, Change.MOVE):
            for other in self._sorted[as_id]:
                if other is old:
                    continue
                if base_gfn < other.base_gfn + other.npages and other.base_gfn < base_gfn + npages:
                    raise KvmError("EEXIST", f"gfns {base_gfn:#x}+{npages:#x} overlap slot {other.id} at {other.base_gfn:#x}+{other.npages:#x}")
        return SlotRequest(change, as_id, id_, flags, base_gfn, npages, userspace_addr, old)

    def build(self, req: SlotRequest) -> MemSlot:
        """A new ``MemSlot`` for a CREATE, MOVE or FLAGS_ONLY request (not installed)."""
        found = self.host.lookup(req.userspace_addr, req.npages << PAGE_SHIFT)
        assert found is not None
        m, off = found
        mem = memoryview(m)[off : off + (req.npages << PAGE_SHIFT)]
        return MemSlot(req.as_id, req.id, req.base_gfn, req.npages, req.flags, req.userspace_addr, mem)

    # ---- installation (kvm_replace_memslot) ----------------------------------
    def install(self, old: MemSlot | None, new: MemSlot | None) -> None:
        """Replace ``old`` with ``new`` (either may be ``None``) and bump the generation."""
        if old is not None:
            space = self._sorted[old.as_id]
            space.remove(old)
            del self._by_id[old.as_id][old.id]
        if new is not None:
            space = self._sorted[new.as_id]
            bisect.insort(space, new, key=lambda s: s.base_gfn)
            self._by_id[new.as_id][new.id] = new
        for as_id in range(KVM_ADDRESS_SPACE_NUM):
            self._bases[as_id] = [s.base_gfn for s in self._sorted[as_id]]
        self._last = None
        self.generation += 1
