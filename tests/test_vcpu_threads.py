"""Several vCPUs as threads under the VM's mmu_lock, and trackers unregistered while they run."""

from __future__ import annotations

import threading
import time

from pagetrack import VM, hookimpl
from pagetrack.memory import KVM_MEM_LOG_DIRTY_PAGES
from pagetrack.program import CODE_BASE, DATA_BASE, DATA_GFN, LOW_SIZE, assemble, build_page_tables

# Each vCPU hammers its own 16 tracked data pages; every store is emulated.
LOOP = """
    mov rcx, 4000
again:
    mov rax, rcx
    and rax, 15
    shl rax, 12
    mov qword ptr [rbx + rax], rcx
    dec rcx
    jnz again
    hlt
"""


class Recorder:
    """A tracker that counts notifications and notices calls after its unregistration."""

    def __init__(self) -> None:
        self.calls = 0
        self.gone = False
        self.late = 0
        self.lock = threading.Lock()

    @hookimpl
    def track_write(self, gpa: int, new: bytes) -> None:
        with self.lock:
            self.calls += 1
            if self.gone:
                self.late += 1


def _vm_with_vcpus(n: int) -> tuple[VM, list, list[int]]:
    vm = VM(tdp=True, strict=True)
    vm.add_memory(0, LOW_SIZE, flags=KVM_MEM_LOG_DIRTY_PAGES, slot=0)
    vm.add_memory(DATA_BASE, 1 << 20, slot=1)
    layout = build_page_tables(1 << 20, lambda gpa, v: vm.write_guest(gpa, v.to_bytes(8, "little")))
    code = assemble(LOOP, "loop").code
    vm.write_guest(CODE_BASE, code)
    vcpus, bases = [], []
    for i in range(n):
        vcpu = vm.create_vcpu()
        vcpu.cpu.rip = CODE_BASE
        base = DATA_BASE + i * 16 * 4096
        vcpu.cpu.regs[3] = base  # rbx
        vcpu.cpu.regs[4] = 0x1F0000 - i * 0x1000
        vcpu.set_cr3(layout.cr3)
        vcpus.append(vcpu)
        bases.append(base)
    return vm, vcpus, bases


def test_two_vcpus_in_threads_all_writes_notified_and_committed() -> None:
    recorder = Recorder()
    vm, vcpus, bases = _vm_with_vcpus(2)
    vm.register_tracker(recorder, "rec")
    for base in bases:
        for p in range(16):
            vm.write_track_add_gfn((base >> 12) + p)
    exits = []
    threads = [threading.Thread(target=lambda v=v: exits.append(v.run().kind)) for v in vcpus]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert exits == ["hlt", "hlt"]
    assert recorder.calls == 2 * 4000
    assert vm.mmu.stats.insn_emulation == 2 * 4000
    # The last store to each page holds the smallest rcx with that low nibble.
    for base in bases:
        for p in range(16):
            want = p if p else 16
            assert int.from_bytes(vm.read_guest(base + p * 4096, 8), "little") == want
    vm.close()


def test_unregister_while_vcpus_run_case_28() -> None:
    """Spec kvm-page-track.md §7 case 28: no callback after unregister returns."""
    recorder = Recorder()
    vm, vcpus, bases = _vm_with_vcpus(2)
    vm.register_tracker(recorder, "rec")
    for base in bases:
        for p in range(16):
            vm.write_track_add_gfn((base >> 12) + p)
    threads = [threading.Thread(target=v.run) for v in vcpus]
    for t in threads:
        t.start()
    while recorder.calls < 200:
        time.sleep(0.001)
    vm.unregister_tracker("rec")
    with recorder.lock:
        recorder.gone = True
    for t in threads:
        t.join(60)
    assert recorder.late == 0
    assert 200 <= recorder.calls < 2 * 4000, "unregistered too late to observe anything"
    assert vm.mmu.stats.insn_emulation == 2 * 4000
    vm.close()


def test_data_gfn_constant_matches_base() -> None:
    assert DATA_BASE >> 12 == DATA_GFN


class LockingTracker:
    """Like KVMGT: one lock taken in track_write (which then uses the track API,
    taking mmu_lock) and in track_remove_region."""

    def __init__(self, vm: VM) -> None:
        self.vm = vm
        self.lock = threading.Lock()
        self.calls = 0

    @hookimpl
    def track_write(self, gpa: int, new: bytes) -> None:
        with self.lock:
            self.calls += 1
            self.vm.write_track_add_gfn(gpa >> 12)
            self.vm.write_track_remove_gfn(gpa >> 12)

    @hookimpl
    def track_remove_region(self, gfn: int, nr_pages: int) -> None:
        with self.lock:
            pass


def test_slot_delete_while_a_tracker_works_does_not_deadlock() -> None:
    """Trackers are notified without mmu_lock held (kvm_page_track_delete_slot runs
    under slots_lock only), so a tracker lock taken on both paths cannot deadlock."""
    vm, vcpus, bases = _vm_with_vcpus(1)
    tracker = LockingTracker(vm)
    vm.register_tracker(tracker, "locking")
    for p in range(16):
        vm.write_track_add_gfn((bases[0] >> 12) + p)
    spare = vm.add_memory(0x8000_0000, 1 << 20)
    thread = threading.Thread(target=vcpus[0].run)
    thread.start()
    while tracker.calls < 50:
        time.sleep(0.001)
    done = threading.Event()

    def delete() -> None:
        vm.set_user_memory_region(spare.key, 0, spare.base_gfn << 12, 0, spare.userspace_addr)
        done.set()

    deleter = threading.Thread(target=delete, daemon=True)
    deleter.start()
    assert done.wait(30), "memslot delete deadlocked against the tracker"
    thread.join(60)
    assert not thread.is_alive()
    vm.close()
