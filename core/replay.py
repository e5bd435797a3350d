"""Trace replay: a guest's stores, in bulk, through the same MMU path as its instructions.

``replay(vm, vcpu, gpas, values)`` performs the stores of a trace at guest-virtual
== guest-physical addresses.  The first store to a page whose translation is not
cached writable goes through :meth:`Vcpu.native.write <pagetrack.vcpu.Vcpu>` — the
CPU's path: software-TLB miss, hardware walk, an exit to ``kvm_mmu_page_fault``,
``fast_page_fault`` and ``mark_page_dirty_in_slot`` for a dirty-log-protected
page, and ``x86_emulate_instruction`` (then ``track_write``) for a write-tracked
one.  Once the translation is cached writable, the page's later stores are what
the hardware does without any exit: plain stores, applied here with numpy,
last writer winning in trace order.  Stores to write-tracked pages, to pages
holding cached code and stores that straddle two pages take the slow path
every time.

The result is identical to doing every store one by one through the CPU's path
(memory, dirty bits, faults, notifications): pending bulk stores are committed
before each slow store, so every fault, walk and tracker sees memory as the
one-by-one run would.
"""

from __future__ import annotations

import bisect
import ctypes
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np

from .errors import InputError
from .vcpu import NeedEmulation

if TYPE_CHECKING:
    from .vcpu import Vcpu
    from .vm import VM

__all__ = ["ReplayStats", "replay", "store"]

_WINDOW = 1 << 16  # stores planned at a time (bounds the cost of re-planning after a flush)
_SMALL = 48  # runs of bulk stores up to this length are written one by one (cheaper than numpy)
_DTYPES: dict[int, np.dtype[Any]] = {1: np.dtype("<u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}


@attrs.frozen
class ReplayStats:
    """What a replay did: ``stores`` = ``slow`` (through the CPU's path) + ``bulk``.

    ``faults`` counts exits to KVM's page-fault handler (``pf_taken``),
    ``emulated`` the stores KVM emulated (write-tracked pages).
    """

    stores: int = 0
    slow: int = 0
    bulk: int = 0
    faults: int = 0
    emulated: int = 0

    def __add__(self, other: ReplayStats) -> ReplayStats:
        return ReplayStats(*(a + b for a, b in zip(attrs.astuple(self), attrs.astuple(other), strict=True)))

    def to_dict(self) -> dict[str, int]:
        return attrs.asdict(self)


def store(vcpu: Vcpu, addr: int, size: int, value: int) -> bool:
    """One guest store as a ``mov`` instruction makes it; returns True if KVM emulated it.

    The CPU's path first; when the page-fault handler answers ``RET_PF_EMULATE``
    the store is emulated as ``x86_emulate_instruction`` does for a ``mov``
    (a page-table-writing mnemonic, so no unprotect-and-retry): committed,
    marked dirty, then ``track_write``.
    """
    try:
        vcpu.native.write(addr, size, value)
        return False
    except NeedEmulation:
        vm = vcpu.vm
        vcpu.allow_retry_pf = False
        vm.mmu.stats.insn_emulation += 1
        vcpu.emulations += 1
        if vm.audit.debug:
            vm.audit.emit("emulate", "debug", vcpu=vcpu.index, rip=vcpu.cpu.rip, insn="mov")
        vcpu.emulator_memory.write(addr, size, value)
        return True


def _as_trace(gpas: Any, values: Any, size: int) -> tuple[np.ndarray, np.ndarray]:
    if size not in _DTYPES:
        raise InputError(f"store size {size}: expected 1, 2, 4 or 8")
    addrs = np.asarray(gpas)
    if addrs.ndim != 1 or (addrs.size and addrs.dtype.kind not in "iu"):
        raise InputError("gpas must be a 1-D array of integers")
    if addrs.dtype.kind == "i" and addrs.size and int(addrs.min()) < 0:
        raise InputError("gpas must not be negative")
    addrs = addrs.astype(np.int64, copy=False)
    n = len(addrs)
    if values is None:
        vals = np.arange(1, n + 1, dtype=np.uint64)
    else:
        vals = np.asarray(values)
        if vals.shape != (n,) or (vals.size and vals.dtype.kind not in "iu"):
            raise InputError(f"values must be {n} integers, one per store")
        vals = vals.astype(np.uint64, copy=False)
    return addrs, vals


class _SlotMemory:
    """Guest memory of every memslot as numpy arrays, located by host address."""

    def __init__(self, vm: VM) -> None:
        # Fresh views, so the slots' own memoryviews carry no export and can be released.
        arrays = [np.frombuffer(slot.mem[:], dtype=np.uint8) for slot in vm.memslots.all_slots()]
        arrays.sort(key=lambda a: a.ctypes.data)
        self.arrays = arrays
        self.bases = [a.ctypes.data for a in arrays]

    def locate(self, page: memoryview) -> tuple[int, int]:
        """(slot index, byte offset) of a page view from the software TLB."""
        addr = _address(page)
        i = bisect.bisect_right(self.bases, addr) - 1
        return i, addr - self.bases[i]


def _page_ids(vpn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Small ids for the pages of a trace: ``pages[uid[i]] == vpn[i]``.

    Dense (``vpn - min``, no sort) when the pages span a range not much larger
    than the trace, else the ranks of the distinct pages.
    """
    if len(vpn) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    lo, hi = int(vpn.min()), int(vpn.max())
    if hi - lo < max(4 * len(vpn), 1 << 16):
        return np.arange(lo, hi + 1, dtype=np.int64), vpn - lo
    pages, uid = np.unique(vpn, return_inverse=True)
    return pages, uid.reshape(-1).astype(np.int64)


def _address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


class _Replay:
    """The state of one :func:`replay` call (see the module docstring)."""

    def __init__(self, vm: VM, vcpu: Vcpu, addrs: np.ndarray, vals: np.ndarray, size: int,
                 on_exit: Callable[[BaseException], bool] | None) -> None:
        self.vm, self.vcpu, self.size, self.on_exit = vm, vcpu, size, on_exit
        self.addrs, self.vals = addrs, vals
        self.vpn = addrs >> 12
        self.off = addrs & 0xFFF
        self.pages, self.uid = _page_ids(self.vpn)
        nu = len(self.pages)
        # np.unique sorts small unsigned integers by radix: plan with 16-bit ids when they fit.
        self.uid_plan = self.uid.astype(np.uint16) if nu <= 1 << 16 else self.uid
        self.cached = np.zeros(nu, dtype=bool)  # translation known cached writable, page located
        self.always = np.zeros(nu, dtype=bool)  # every store takes the slow path
        self.classified = np.zeros(nu, dtype=bool)
        self.slot_of = np.zeros(nu, dtype=np.int64)
        self.page_off = np.zeros(nu, dtype=np.int64)
        self.memory = _SlotMemory(vm)
        self.gen = vcpu.tlb_gen
        self.slow = self.bulk = self.emulated = 0
        crossing = self.off + size > 4096
        if crossing.any():
            # A straddling store and every other store to either of its pages stay in order.
            self.always[np.unique(self.uid[crossing])] = True
            nxt = np.isin(self.pages, self.vpn[crossing] + 1)
            self.always[nxt] = True
        present = np.zeros(nu, dtype=bool)
        present[self.uid] = True
        wtlb = vcpu.wtlb
        for u in np.flatnonzero(present & ~self.always).tolist():
            view = wtlb.get(int(self.pages[u]))
            if view is not None:
                self._locate(u, view)

    def _locate(self, u: int, view: memoryview) -> None:
        self.slot_of[u], self.page_off[u] = self.memory.locate(view)
        self.cached[u] = True

    def _classify(self, us: np.ndarray) -> None:
        """Pages that never get a writable cached translation: write-tracked or holding code."""
        vm = self.vm
        code = self.vcpu.cache.code_pages()
        todo = us[~self.classified[us]]
        for u, page in zip(todo.tolist(), self.pages[todo].tolist(), strict=True):
            if page in code or vm.gfn_is_write_tracked(page):
                self.always[u] = True
        self.classified[todo] = True

    def _plan(self, i: int, j: int) -> np.ndarray:
        """Indices in ``[i, j)`` of the stores that must take the slow path."""
        u = self.uid[i:j]
        uu, first = np.unique(self.uid_plan[i:j], return_index=True)
        uu = uu.astype(np.int64)
        self._classify(uu[~self.cached[uu]])
        slow = self.always[u]
        slow[first[~self.cached[uu] & ~self.always[uu]]] = True
        return np.flatnonzero(slow) + i

    def run(self) -> None:
        n = len(self.addrs)
        i = 0
        while i < n:
            j = min(n, i + _WINDOW)
            pos = i
            replan = False
            for k in self._plan(i, j).tolist():
                self._bulk(pos, k)
                self._slow(k)
                pos = k + 1
                if self._after_slow(k):
                    replan = True
                    break
            if replan:
                i = pos
                continue
            self._bulk(pos, j)
            i = j

    def _slow(self, k: int) -> None:
        addr, value = int(self.addrs[k]), int(self.vals[k])
        while True:
            try:
                emulated = store(self.vcpu, addr, self.size, value)
                break
            except Exception as exc:
                # An exit to the VMM before the store retired: if it handles it, re-enter and retry.
                if self.on_exit is None or not self.on_exit(exc):
                    raise
        self.emulated += emulated
        self.slow += 1

    def _after_slow(self, k: int) -> bool:
        """Update the cache state after slow store ``k``; True if the plan must be redone."""
        u = int(self.uid[k])
        vcpu = self.vcpu
        replan = False
        if vcpu.tlb_gen != self.gen:  # a TLB flush: no cached translation survives
            self.gen = vcpu.tlb_gen
            self.cached[:] = False
            replan = True
        if self.always[u]:
            return replan
        view = vcpu.wtlb.get(int(self.pages[u]))
        if view is None:
            self.always[u] = True
            return True
        self._locate(u, view)
        return replan

    def _bulk(self, p: int, k: int) -> None:
        """Stores ``[p, k)``, all to pages cached writable: what the hardware does without an exit."""
        m = k - p
        if m <= 0:
            return
        self.bulk += m
        size = self.size
        if m <= _SMALL:
            wtlb = self.vcpu.wtlb
            for addr, value in zip(self.addrs[p:k].tolist(), self.vals[p:k].tolist(), strict=True):
                o = addr & 0xFFF
                wtlb[addr >> 12][o : o + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            return
        u = self.uid[p:k]
        where = self.page_off[u] + self.off[p:k]
        vals = self.vals[p:k]
        slots = self.slot_of[u]
        if slots.min() == slots.max():
            self._scatter(int(slots[0]), where, vals)
        else:
            for s in np.unique(slots).tolist():
                sel = slots == s
                self._scatter(s, where[sel], vals[sel])

    def _scatter(self, s: int, where: np.ndarray, vals: np.ndarray) -> None:
        """``mem[where[i]:+size] = vals[i]`` in order (last writer wins), vectorized."""
        size = self.size
        mem = self.memory.arrays[s]
        if not (where & (size - 1)).any():
            dest, data = mem.view(_DTYPES[size]), vals.astype(_DTYPES[size])
            idx = where // size
        else:
            dest = mem
            idx = (where[:, None] + np.arange(size)).reshape(-1)
            data = vals.astype("<u8").view(np.uint8).reshape(-1, 8)[:, :size].reshape(-1)
        # Keep the last store to every target: numpy promises no order for repeated indices.
        # Sort (target, position) keys; the last key of each target is its last store.
        n = len(idx)
        shift = n.bit_length()
        key = (idx << shift) | np.arange(n, dtype=np.int64)
        key.sort()
        target = key >> shift
        last = np.empty(n, dtype=bool)
        last[-1] = True
        np.not_equal(target[1:], target[:-1], out=last[:-1])
        dest[target[last]] = data[key[last] & ((1 << shift) - 1)]

    def close(self) -> None:
        self.memory.arrays.clear()


def replay(vm: VM, vcpu: Vcpu, gpas: np.ndarray | Sequence[int], values: np.ndarray | Sequence[int] | None = None,
           size: int = 8, on_exit: Callable[[BaseException], bool] | None = None) -> ReplayStats:
    """Perform the guest stores of a trace, in order, at guest-virtual == guest-physical addresses.

    ``values`` (default: the 1-based index of each store) are stored
    little-endian in ``size`` bytes (1, 2, 4 or 8).  Only the first store to a
    page whose translation is not cached writable takes the CPU's slow path;
    the rest are applied in bulk.  A fault the guest cannot survive
    (:class:`~pagetrack.mmu.GuestPageFault`, MMIO) propagates after the stores
    before it are done, as for one store at a time.

    ``on_exit(exc)`` is the VMM's side of an exit that stopped a store before it
    retired (such as ``KVM_EXIT_DIRTY_RING_FULL``): it handles the exit and
    returns True to re-enter and retry the store, False to let ``exc`` propagate.
    """
    addrs, vals = _as_trace(gpas, values, size)
    faults0 = vm.mmu.stats.pf_taken
    state = _Replay(vm, vcpu, addrs, vals, size, on_exit)
    try:
        state.run()
    finally:
        state.close()
    return ReplayStats(len(addrs), state.slow, state.bulk, vm.mmu.stats.pf_taken - faults0, state.emulated)
