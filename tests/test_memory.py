"""Memslots: KVM_SET_USER_MEMORY_REGION validation and the memslot lifecycle seen by trackers.

Spec: kvm-page-track.md §5 and §7 cases 11, 59–63 (63 is [<=6.5]: its 6.6+
counterpart is tested), plus a hypothesis state machine of memslots and
write-track counters against a plain-Python reference model.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pagetrack
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from pagetrack import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, VM, Change, KvmError
from pagetrack.memory import KVM_MEM_MAX_NR_PAGES, KVM_MEM_SLOTS_NUM
from pagetrack.mmu import Role
from pagetrack.page_track import TRACK_MAX
from track_helpers import DATA_BASE, Guest, Recorder, make_vm

PAGE = 4096


def errno_of(fn, *args) -> str | None:
    try:
        fn(*args)
    except KvmError as exc:
        return exc.errno_name
    return None


@pytest.fixture
def vm():
    v = make_vm(False)
    yield v
    v.close()


# ---- validation ---------------------------------------------------------------------------------

def test_create_and_lookup(vm: VM) -> None:
    hva = vm.host.mmap(16 * PAGE)
    assert vm.set_user_memory_region(2, 0, 0x10000, 16 * PAGE, hva) == 0
    slot = vm.memslots.get(0, 2)
    assert (slot.base_gfn, slot.npages, slot.flags, slot.userspace_addr) == (0x10, 16, 0, hva)
    assert vm.memslots.gfn_to_memslot(0x10) is slot
    assert vm.memslots.gfn_to_memslot(0x1F) is slot
    assert vm.memslots.gfn_to_memslot(0x20) is None
    assert vm.memslots.gfn_to_memslot(0xF) is None
    assert vm.memslots.gfn_to_memslot(0x10, as_id=1) is None


@pytest.mark.parametrize(
    ("slot", "flags", "gpa", "size", "hva_delta", "why"),
    [
        (0, 0, 0x10000, 16 * PAGE + 1, 0, "size not page aligned"),
        (0, 0, 0x10800, 16 * PAGE, 0, "gpa not page aligned"),
        (0, 0, 0x10000, 16 * PAGE, 0x10, "hva not page aligned"),
        (0, 1 << 2, 0x10000, 16 * PAGE, 0, "unknown flag"),
        (0, 1 << 31, 0x10000, 16 * PAGE, 0, "unknown flag"),
        (2 << 16, 0, 0x10000, 16 * PAGE, 0, "address space 2"),
        (KVM_MEM_SLOTS_NUM, 0, 0x10000, 16 * PAGE, 0, "slot id too large"),
        (0, 0, 0x10000, 64 * PAGE, 0, "host range not mapped"),
        (0, 0, (1 << 64) - 8 * PAGE, 16 * PAGE, 0, "gpa range wraps"),
        (0, 0, 0, 0, 0, "delete of a missing slot"),
    ],
)
def test_invalid_requests_are_einval_and_change_nothing(vm, slot, flags, gpa, size, hva_delta, why) -> None:
    hva = vm.host.mmap(16 * PAGE)
    gen = vm.memslots.generation
    assert errno_of(vm.set_user_memory_region, slot, flags, gpa, size, hva + hva_delta) == "EINVAL", why
    assert vm.memslots.all_slots() == []
    assert vm.memslots.generation == gen


def test_too_many_pages_is_einval(vm: VM) -> None:
    hva = vm.host.mmap((KVM_MEM_MAX_NR_PAGES + 1) * PAGE)  # MAP_NORESERVE: free
    assert errno_of(vm.set_user_memory_region, 0, 0, 0, (KVM_MEM_MAX_NR_PAGES + 1) * PAGE, hva) == "EINVAL"


def test_overlap_is_eexist_for_create_and_move(vm: VM) -> None:
    a = vm.add_memory(0x100000, 0x10000, slot=0)
    b = vm.add_memory(0x200000, 0x10000, slot=1)
    hva = vm.host.mmap(0x10000)
    for gpa in (0x100000, 0x10F000, 0x0F1000, 0x0F0000 + 0x1000):
        assert errno_of(vm.set_user_memory_region, 5, 0, gpa, 0x10000, hva) == "EEXIST"
    # adjacent is fine
    assert vm.set_user_memory_region(5, 0, 0x110000, 0x10000, hva) == 0
    # a MOVE onto another slot
    assert errno_of(vm.set_user_memory_region, b.key, 0, 0x108000, 0x10000, b.userspace_addr) == "EEXIST"
    # a MOVE that overlaps only its own old range is fine
    assert vm.set_user_memory_region(a.key, 0, 0x0F8000, 0x10000, a.userspace_addr) == 0
    # other address space: no overlap
    assert vm.set_user_memory_region(1 << 16 | 5, 0, 0x200000, 0x10000, hva) == 0


def test_size_change_readonly_toggle_and_hva_change_are_einval(vm: VM) -> None:
    s = vm.add_memory(0x100000, 0x10000, slot=3)
    other = vm.host.mmap(0x20000)
    cases = [
        (0, 0x100000, 0x8000, s.userspace_addr),  # shrink
        (0, 0x100000, 0x20000, other),  # grow (mapped elsewhere)
        (KVM_MEM_READONLY, 0x100000, 0x10000, s.userspace_addr),  # READONLY on
        (0, 0x100000, 0x10000, other),  # another hva
    ]
    for flags, gpa, size, hva in cases:
        assert errno_of(vm.set_user_memory_region, 3, flags, gpa, size, hva) == "EINVAL"
    assert vm.memslots.get(0, 3) is s
    r = vm.add_memory(0x400000, 0x10000, flags=KVM_MEM_READONLY, slot=4)
    assert errno_of(vm.set_user_memory_region, 4, 0, 0x400000, 0x10000, r.userspace_addr) == "EINVAL"
    # LOG_DIRTY can be toggled on a read-only slot (FLAGS_ONLY), READONLY cannot be dropped
    assert vm.set_user_memory_region(4, KVM_MEM_READONLY | KVM_MEM_LOG_DIRTY_PAGES, 0x400000,
                                     0x10000, r.userspace_addr) == 0


def test_identical_request_is_a_noop(vm: VM, hook_recorder) -> None:
    s = vm.add_memory(0x100000, 0x10000, slot=0)
    calls = hook_recorder(vm)
    gen = vm.memslots.generation
    assert vm.set_user_memory_region(0, 0, 0x100000, 0x10000, s.userspace_addr) == 0
    assert vm.memslots.get(0, 0) is s and vm.memslots.generation == gen
    assert calls.calls == []


def test_size_zero_deletes_whatever_the_gpa(vm: VM) -> None:
    s = vm.add_memory(0x100000, 0x10000, slot=0)
    assert vm.set_user_memory_region(0, 0, 0x999000, 0, s.userspace_addr) == 0
    assert vm.memslots.get(0, 0) is None
    assert vm.memslots.gfn_to_memslot(0x100) is None
    assert errno_of(vm.set_user_memory_region, 0, 0, 0x100000, 0, s.userspace_addr) == "EINVAL"


def test_change_kinds_reported_to_memslot_commit(vm: VM, hook_recorder) -> None:
    calls = hook_recorder(vm)
    s = vm.add_memory(0x100000, 0x10000, slot=0)
    vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0x100000, 0x10000, s.userspace_addr)
    vm.set_user_memory_region(0, KVM_MEM_LOG_DIRTY_PAGES, 0x300000, 0x10000, s.userspace_addr)
    vm.set_user_memory_region(0, 0, 0x300000, 0, s.userspace_addr)
    assert [c["change"] for c in calls.calls_of("memslot_commit")] == [
        Change.CREATE.value, Change.FLAGS_ONLY.value, Change.MOVE.value, Change.DELETE.value]


# ---- case 11: lpage_info edge rules ---------------------------------------------------------------

def test_case_11_unaligned_base_and_end_start_at_1_and_a_track_raises_to_2(vm: VM) -> None:
    hva = vm.host.mmap(0x800000)
    # base gfn 0x601 (not 2 MiB aligned), hva offset by the same amount so that
    # host and guest are co-aligned: only the edge entries are disallowed.
    base_gfn, npages = 0x601, 3 * 512
    vm.set_user_memory_region(0, 0, base_gfn << 12, npages << 12, hva + 0x1000)
    s = vm.memslots.get(0, 0)
    info2 = s.arch.lpage_info[0].tolist()
    assert info2 == [1, 0, 0, 1]  # frames 0x600, 0x800, 0xa00, 0xc00 (end 0xc01 unaligned)
    assert s.arch.lpage_info[1].tolist() == [1]
    vm.write_track_add_gfn(base_gfn + 5)
    assert s.arch.lpage_info[0].tolist() == [2, 0, 0, 1]
    vm.write_track_add_gfn(base_gfn + 600)
    assert s.arch.lpage_info[0].tolist() == [2, 1, 0, 1]


def test_case_11_aligned_slot_has_no_disallowed_frames(vm: VM) -> None:
    s = vm.add_memory(0x40000000, 0x40000000)  # 1 GiB at 1 GiB: host hva is 1 GiB aligned too
    assert not s.arch.lpage_info[0].any() and not s.arch.lpage_info[1].any()
    assert len(s.arch.lpage_info[0]) == 512 and len(s.arch.lpage_info[1]) == 1


def test_case_11_host_guest_misalignment_disallows_every_frame(vm: VM) -> None:
    hva = vm.host.mmap(0x800000)
    vm.set_user_memory_region(0, 0, 0x400000, 0x400000, hva + 0x1000)  # gfn aligned, hva not
    s = vm.memslots.get(0, 0)
    assert s.arch.lpage_info[0].tolist() == [1, 1]


# ---- cases 59–63: memslot changes and trackers -----------------------------------------------------

def _shadow_pages_for(vm: VM, gfn: int) -> None:
    """Give the VM an upper-level (counted) and a last-level shadow page on ``gfn``."""
    vm.mmu.shadow.alloc_shadow_page(gfn, Role(level=2))
    vm.mmu.shadow.alloc_shadow_page(gfn + 1, Role(level=1))


def test_case_59_delete_order_zap_remove_notify_free_then_einval() -> None:
    vm = make_vm(False)
    s = vm.add_memory(0x100000, 0x10000, slot=0)
    keep = vm.add_memory(0x200000, 0x10000, slot=1)
    order: list[str] = []

    class Node(Recorder):
        @pagetrack.hookimpl
        def track_remove_region(self, gfn: int, nr_pages: int) -> None:
            order.append("remove_region")
            assert vm.memslots.get(0, 0) is None  # S already left the memslot set
            assert vm.mmu.shadow.pages() == []  # all shadow pages already zapped
            assert s.arch.gfn_write_track is not None  # not freed yet
            super().track_remove_region(gfn, nr_pages)

    node = Node()
    vm.register_tracker(node, "node")
    vm.write_track_add_gfn(0x105)
    _shadow_pages_for(vm, 0x200)  # pages in *another* slot are zapped as well
    assert vm.write_track_count(0x200) == 1
    vm.set_user_memory_region(0, 0, 0x100000, 0, s.userspace_addr)
    assert order == ["remove_region"]
    assert node.removed == [(0x100, 16)]
    assert s.arch.gfn_write_track is None  # freed, external count discarded
    assert vm.mmu.shadow.pages() == []
    assert vm.mmu.shadow.indirect_shadow_pages == 0
    assert vm.write_track_count(0x200) == 0  # KVM's own count went with the zap
    assert vm.memslots.get(0, 1) is keep
    for op in (vm.write_track_add_gfn, vm.write_track_remove_gfn):
        assert errno_of(op, 0x105) == "EINVAL"


def test_case_60_move_with_external_node_is_einval_after_zapping() -> None:
    vm = make_vm(False)
    s = vm.add_memory(0x100000, 0x10000, slot=0)
    node = Recorder()
    vm.register_tracker(node, "node")
    vm.write_track_add_gfn(0x101)
    _shadow_pages_for(vm, 0x108)
    assert vm.write_track_count(0x108) == 1
    assert errno_of(vm.set_user_memory_region, 0, 0, 0x300000, 0x10000, s.userspace_addr) == "EINVAL"
    assert vm.memslots.get(0, 0) is s and s.base_gfn == 0x100  # unchanged
    assert vm.write_track_count(0x101) == 1  # the external count survives
    assert vm.mmu.shadow.pages() == []  # ... but every shadow page was zapped already
    assert vm.write_track_count(0x108) == 0
    assert node.removed == []
    # after the node leaves, the same MOVE is accepted
    vm.unregister_tracker("node")
    assert vm.set_user_memory_region(0, 0, 0x300000, 0x10000, s.userspace_addr) == 0


def test_case_61_moved_slot_counters_are_zero_and_no_notifier_runs(hook_recorder) -> None:
    vm = make_vm(False)
    s = vm.add_memory(0x100000, 0x10000, slot=0)
    for g in (0x100, 0x105, 0x10F):
        vm.write_track_add_gfn(g)
    calls = hook_recorder(vm)
    vm.set_user_memory_region(0, 0, 0x300000, 0x10000, s.userspace_addr)
    new = vm.memslots.get(0, 0)
    assert new is not s and new.base_gfn == 0x300
    assert new.arch.gfn_write_track is not None and not new.arch.gfn_write_track.any()
    assert not any(vm.gfn_is_write_tracked(g) for g in range(0x300, 0x310))
    assert calls.calls_of("track_remove_region") == [] and calls.calls_of("track_write") == []
    assert errno_of(vm.write_track_add_gfn, 0x105) == "EINVAL"
    # the memory moved with the slot
    vm.write_guest(0x300000, b"moved")
    assert vm.read_guest(0x300000, 5) == b"moved"


def test_case_62_flags_only_change_preserves_counters_and_calls_no_notifier(hook_recorder) -> None:
    vm = make_vm(False)
    node = Recorder()
    vm.register_tracker(node, "node")
    s = vm.add_memory(0x100000, 0x10000, slot=0)
    vm.write_track_add_gfn(0x103)
    vm.write_track_add_gfn(0x103)
    lp = s.arch.lpage_info[0].tolist()
    calls = hook_recorder(vm)
    vm.enable_dirty_logging(s)
    new = vm.memslots.get(0, 0)
    assert new.logging
    assert new.arch is s.arch  # shared metadata
    assert vm.write_track_count(0x103) == 2
    assert new.arch.lpage_info[0].tolist() == lp
    vm.enable_dirty_logging(new, False)
    assert vm.write_track_count(0x103) == 2
    assert node.removed == [] and node.flushed == []
    assert calls.calls_of("track_remove_region") == [] and calls.calls_of("track_flush_slot") == []


def test_case_63_6_6_counterpart_flush_slot_before_delete_and_move_remove_region_only_on_delete() -> None:
    """[<=6.5] track_flush_slot is kept as a hook: it fires for DELETE and MOVE before
    anything changes (also for a MOVE that then fails); 6.6+ track_remove_region
    fires only for a DELETE, at commit."""
    vm = make_vm(False)
    s = vm.add_memory(0x100000, 0x10000, slot=0)
    seen: list = []
    node = Recorder("node", seen)
    vm.register_tracker(node, "node")
    _shadow_pages_for(vm, 0x100)

    class Probe:
        @pagetrack.hookimpl
        def track_flush_slot(self, slot) -> None:
            # before the change: the slot is still installed and not yet zapped
            seen.append(("probe", vm.memslots.get(0, 0) is slot, len(vm.mmu.shadow.pages())))

    vm.register_tracker(Probe(), "probe")
    # MOVE refused (external node attached): flush_slot fired anyway
    assert errno_of(vm.set_user_memory_region, 0, 0, 0x300000, 0x10000, s.userspace_addr) == "EINVAL"
    assert seen == [("probe", True, 2), ("node", "track_flush_slot", 0x100, 16)]
    seen.clear()
    vm.set_user_memory_region(0, 0, 0x100000, 0, s.userspace_addr)  # DELETE
    assert seen == [("probe", True, 0), ("node", "track_flush_slot", 0x100, 16),
                    ("node", "track_remove_region", 0x100, 16)]


def test_readonly_slot_write_fault_is_mmio() -> None:
    g = Guest("""
        mov rax, qword ptr [DATA_BASE]
        mov qword ptr [DATA_BASE], rax
        hlt
    """, tdp=True)
    ro = g.vm.add_memory(0x800000, 0x10000, flags=KVM_MEM_READONLY)
    assert ro.readonly
    # remap data page 0 onto the read-only slot: guest PTE edited by the VMM
    pte = g.layout.pt_page_of(DATA_BASE) + 8 * ((DATA_BASE >> 12) & 511)
    g.vm.write_guest(pte, (0x800000 | 0x27).to_bytes(8, "little"))
    exit_text = g.run()
    assert "0x800000" in exit_text and "memslot" in exit_text


# ---- 1 TiB of memslots ------------------------------------------------------------------------------

def test_one_tib_of_memslots_costs_little_host_memory() -> None:
    code = textwrap.dedent("""
        import resource
        from pagetrack import VM
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for tdp in (True, False):
            vm = VM(tdp=tdp, load_entry_points=False)
            a = vm.add_memory(0, 512 << 30)
            b = vm.add_memory(1 << 40, 512 << 30)
            assert a.npages + b.npages == 1 << 28
            vm.write_track_add_gfn(a.npages - 1) if not tdp else None
            vm.write_guest((1 << 40) + 12345, b"x")
            assert vm.read_guest((1 << 40) + 12345, 1) == b"x"
            vm.close()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(after - before)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    grown_kib = int(out.stdout.split()[-1])
    assert grown_kib < 100 * 1024


# ---- stateful: memslots and counters against a reference model ------------------------------------

HOST_PAGES = 2048
GFN_SPACE = 3072
IDS = [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (2, 0)]


def _lpage_init(base: int, npages: int, hva_gfn: int, level: int) -> list[int]:
    """``kvm_alloc_memslot_metadata`` edge rules, written from spec §1.4."""
    per = 1 << (9 * (level - 1))
    shift = 9 * (level - 1)
    n = ((base + npages - 1) >> shift) - (base >> shift) + 1
    arr = [0] * n
    if base % per:
        arr[0] = 1
    if (base + npages) % per:
        arr[-1] = 1
    if (base ^ hva_gfn) % per:
        arr = [1] * n
    return arr


class ModelSlot:
    def __init__(self, base: int, npages: int, flags: int, hva: int) -> None:
        self.base, self.npages, self.flags, self.hva = base, npages, flags, hva
        self.reset_metadata()

    def reset_metadata(self) -> None:
        self.counts = [0] * self.npages
        self.lpage = {lv: _lpage_init(self.base, self.npages, self.hva >> 12, lv) for lv in (2, 3)}

    def lp_index(self, gfn: int, level: int) -> int:
        shift = 9 * (level - 1)
        return (gfn >> shift) - (self.base >> shift)


class Model:
    """Plain-Python KVM_SET_USER_MEMORY_REGION + write-track counters (tracking enabled)."""

    def __init__(self, host_lo: int, host_pages: int) -> None:
        self.slots: dict[tuple[int, int], ModelSlot] = {}
        self.external = False
        self.host_lo, self.host_hi = host_lo, host_lo + host_pages * PAGE

    def set_region(self, as_id: int, id_: int, flags: int, gpa: int, size: int, hva: int) -> str | None:
        if flags & ~3 or as_id >= 2 or id_ >= KVM_MEM_SLOTS_NUM:
            return "EINVAL"
        if size % PAGE or gpa % PAGE or hva % PAGE:
            return "EINVAL"
        if size and not (self.host_lo <= hva and hva + size <= self.host_hi):
            return "EINVAL"
        npages, base = size // PAGE, gpa // PAGE
        old = self.slots.get((as_id, id_))
        if npages == 0:
            if old is None:
                return "EINVAL"
            del self.slots[(as_id, id_)]
            return None
        if old is not None:
            if hva != old.hva or npages != old.npages or (flags ^ old.flags) & KVM_MEM_READONLY:
                return "EINVAL"
            if base == old.base:
                if flags == old.flags:
                    return None
                old.flags = flags  # FLAGS_ONLY: metadata shared
                return None
        for (a, i), s in self.slots.items():
            if a == as_id and i != id_ and base < s.base + s.npages and s.base < base + npages:
                return "EEXIST"
        if old is not None:  # MOVE
            if self.external:
                return "EINVAL"
            old.base, old.flags = base, flags  # a MOVE may change LOG_DIRTY as well
            old.reset_metadata()
            return None
        self.slots[(as_id, id_)] = ModelSlot(base, npages, flags, hva)
        return None

    def slot_of(self, gfn: int) -> ModelSlot | None:
        for (a, _), s in self.slots.items():
            if a == 0 and s.base <= gfn < s.base + s.npages:
                return s
        return None

    def track(self, gfn: int, delta: int) -> str | None:
        s = self.slot_of(gfn)
        if s is None:
            return "EINVAL"
        i = gfn - s.base
        if 0 <= s.counts[i] + delta <= TRACK_MAX:
            s.counts[i] += delta
        for lv in (2, 3):
            s.lpage[lv][s.lp_index(gfn, lv)] += delta
        return None


class MemslotMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.vm = VM(tdp=False, load_entry_points=False)
        self.hva = self.vm.host.mmap(HOST_PAGES * PAGE)
        self.model = Model(self.hva, HOST_PAGES)
        self.node = Recorder()

    def teardown(self) -> None:
        self.vm.close()

    def snapshot(self) -> list:
        out = []
        for s in self.vm.memslots.all_slots():
            out.append((s.as_id, s.id, s.base_gfn, s.npages, s.flags, s.userspace_addr,
                        s.arch.gfn_write_track.tobytes(),
                        tuple(a.tobytes() for a in s.arch.lpage_info)))
        return out

    def _request(self, as_id: int, id_: int, flags: int, gpa: int, size: int, hva: int) -> None:
        expected = self.model.set_region(as_id, id_, flags, gpa, size, hva)
        before = self.snapshot()
        got = errno_of(self.vm.set_user_memory_region, as_id << 16 | id_, flags, gpa, size, hva)
        assert got == expected, (as_id, id_, flags, hex(gpa), hex(size), hex(hva))
        if got is not None:
            assert self.snapshot() == before

    # -- memslot requests ---------------------------------------------------------------------
    @rule(key=st.sampled_from(IDS), flags=st.sampled_from([0, 1, 2, 3, 4]),
          gfn=st.integers(0, GFN_SPACE), npages=st.integers(0, 700),
          hva_page=st.integers(0, HOST_PAGES), odd=st.sampled_from([0, 0, 0, 0, 0x800, 1]))
    def arbitrary_request(self, key, flags, gfn, npages, hva_page, odd) -> None:
        gpa = gfn * PAGE + (0x800 if odd == 0x800 else 0)
        size = npages * PAGE + (1 if odd == 1 else 0)
        self._request(*key, flags, gpa, size, self.hva + hva_page * PAGE)

    @rule(key=st.sampled_from(IDS[:6]), flags=st.integers(0, 3), gfn=st.integers(0, GFN_SPACE),
          npages=st.integers(1, 600), data=st.data())
    def create(self, key, flags, gfn, npages, data) -> None:
        hva_page = data.draw(st.integers(0, HOST_PAGES - npages))
        self._request(*key, flags, gfn * PAGE, npages * PAGE, self.hva + hva_page * PAGE)

    @rule(data=st.data())
    @precondition(lambda self: self.model.slots)
    def modify_existing(self, data) -> None:
        key = data.draw(st.sampled_from(sorted(self.model.slots)))
        s = self.model.slots[key]
        kind = data.draw(st.sampled_from(["move", "flags", "delete", "resize", "readonly", "hva", "same"]))
        gpa, size, hva, flags = s.base * PAGE, s.npages * PAGE, s.hva, s.flags
        if kind == "move":
            gpa = data.draw(st.integers(0, GFN_SPACE)) * PAGE
        elif kind == "flags":
            flags ^= KVM_MEM_LOG_DIRTY_PAGES
        elif kind == "delete":
            size = 0
        elif kind == "resize":
            size += data.draw(st.sampled_from([-PAGE, PAGE])) if s.npages > 1 else PAGE
        elif kind == "readonly":
            flags ^= KVM_MEM_READONLY
        elif kind == "hva":
            hva += PAGE
        self._request(*key, flags, gpa, size, hva)

    # -- counters ------------------------------------------------------------------------------
    def _gfn(self, data) -> int:
        slots = [s for (a, _), s in self.model.slots.items() if a == 0]
        if slots and data.draw(st.booleans()):
            s = data.draw(st.sampled_from(slots))
            return data.draw(st.integers(s.base, s.base + s.npages - 1))
        return data.draw(st.integers(0, GFN_SPACE + 700))

    @rule(data=st.data(), times=st.integers(1, 3))
    def add(self, data, times) -> None:
        gfn = self._gfn(data)
        for _ in range(times):
            expected = self.model.track(gfn, +1)
            before = self.snapshot()
            assert errno_of(self.vm.write_track_add_gfn, gfn) == expected
            if expected:
                assert self.snapshot() == before

    @rule(data=st.data())
    def remove(self, data) -> None:
        gfn = self._gfn(data)
        expected = self.model.track(gfn, -1)
        before = self.snapshot()
        assert errno_of(self.vm.write_track_remove_gfn, gfn) == expected
        if expected:
            assert self.snapshot() == before

    @rule(data=st.data())
    @precondition(lambda self: any(a == 0 for a, _ in self.model.slots))
    def saturate(self, data) -> None:
        """Put one counter at 65535 by hand (the model and the VM alike)."""
        key = data.draw(st.sampled_from(sorted(k for k in self.model.slots if k[0] == 0)))
        s = self.model.slots[key]
        i = data.draw(st.integers(0, s.npages - 1))
        s.counts[i] = TRACK_MAX
        self.vm.memslots.get(*key).arch.gfn_write_track[i] = TRACK_MAX

    # -- external node -------------------------------------------------------------------------
    @rule()
    @precondition(lambda self: not self.model.external)
    def register(self) -> None:
        self.vm.register_tracker(self.node, "node")
        self.model.external = True

    @rule()
    @precondition(lambda self: self.model.external)
    def unregister(self) -> None:
        self.vm.unregister_tracker("node")
        self.model.external = False

    # -- invariants ----------------------------------------------------------------------------
    @invariant()
    def same_slots_counters_and_lpage(self) -> None:
        vm, model = self.vm, self.model
        got = {(s.as_id, s.id): s for s in vm.memslots.all_slots()}
        assert set(got) == set(model.slots)
        for key, m in model.slots.items():
            s = got[key]
            assert (s.base_gfn, s.npages, s.flags, s.userspace_addr) == (m.base, m.npages, m.flags, m.hva)
            assert s.arch.gfn_write_track.tolist() == m.counts
            assert s.arch.lpage_info[0].tolist() == m.lpage[2]
            assert s.arch.lpage_info[1].tolist() == m.lpage[3]
        assert vm.plugins.has_external_tracker() == model.external

    @invariant()
    def is_tracked_agrees(self) -> None:
        for (a, _), m in self.model.slots.items():
            for i in {0, m.npages // 2, m.npages - 1}:
                gfn = m.base + i
                want = a == 0 and m.counts[i] != 0
                # a gfn of an SMM slot may also be covered by an address-space-0 slot
                if a != 0:
                    s0 = self.model.slot_of(gfn)
                    want = s0 is not None and s0.counts[gfn - s0.base] != 0
                assert self.vm.gfn_is_write_tracked(gfn) == want


MemslotMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_memslots_and_counters_state_machine = MemslotMachine.TestCase
