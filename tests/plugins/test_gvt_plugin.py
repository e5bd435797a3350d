"""The gvt_shadow_gtt entry point: inert until a vGPU is attached; options; the port; the lock."""

from __future__ import annotations

import errno
import threading
import time

import pytest
from gvt_helpers import PT, chain, guest_write64, gvt, pte
from pagetrack import VM
from pagetrack.errors import InputError
from pagetrack.plugins.gvt_shadow_gtt import GVT_PORT, vgpu_of
from pagetrack.plugins.gvt_shadow_gtt.port import GVT_OP_SUBMIT, pack_descriptor

__all__ = ["gvt"]


def test_the_entry_point_is_registered_on_every_vm_and_inert() -> None:
    with VM() as vm:
        vm.add_memory(0x400000, 1 << 20)
        assert "gvt_shadow_gtt" in vm.plugins.names()
        assert vgpu_of(vm) is None
        assert "gvt_shadow_gtt" not in vm.plugins.call_order("track_write")
        assert not vm.plugins.has_external_tracker()
        assert not vm.write_track.external_write_tracking_enabled  # nothing allocated
        # the port is claimed, and says "no vGPU"
        assert vm.hooks.guest_port_io(vm, None, GVT_PORT, 4, 0x400000, True) == 0
        assert vm.hooks.guest_port_io(vm, None, GVT_PORT, 4, 0, False) == -errno.ENODEV & 0xFFFFFFFF
        assert vm.hooks.guest_port_io(vm, None, 0x21, 4, 0, True) is None  # other ports: not ours


def test_option_attach_attaches_at_vm_creation() -> None:
    with VM(options={"gvt_shadow_gtt": {"attach": True, "gen": 11}}) as vm:
        vgpu = vgpu_of(vm)
        assert vgpu is not None and vgpu.attached and vgpu.ips_enabled
        assert vm.plugins.has_external_tracker()
    assert not vgpu.attached and vgpu.destroyed  # closed with the VM


@pytest.mark.parametrize("options", [{"atach": True}, {"backing": "2m"}, {"gen": 7}])
def test_bad_options_are_input_errors(options) -> None:
    with pytest.raises(InputError):
        VM(options={"gvt_shadow_gtt": options}, strict=True)
    with VM(options={"gvt_shadow_gtt": options}) as vm:  # the default policy: quarantined
        assert vm.plugins.is_quarantined("gvt_shadow_gtt") and vgpu_of(vm) is None


def test_the_port_runs_a_descriptor_and_reports_its_status(gvt) -> None:
    vm, vgpu = gvt()
    pdps0 = chain(vm, leaves={0: 0x600})
    vm.write_guest(0x400000, pack_descriptor(GVT_OP_SUBMIT, [pdps0], 4, gma=0x10, value=0x77))
    assert vm.hooks.guest_port_io(vm, None, GVT_PORT, 4, 0x400000, True) == 0
    assert vm.hooks.guest_port_io(vm, None, GVT_PORT, 4, 0, False) == 0
    assert int.from_bytes(vm.read_guest(0x600010, 8), "little") == 0x77
    vm.write_guest(0x400000, pack_descriptor(9, [pdps0]))  # unknown op
    vm.hooks.guest_port_io(vm, None, GVT_PORT, 4, 0x400000, True)
    assert vm.hooks.guest_port_io(vm, None, GVT_PORT, 4, 0, False) == -errno.EINVAL & 0xFFFFFFFF
    vm.hooks.guest_port_io(vm, None, GVT_PORT, 4, 0x7FFFF000, True)  # descriptor outside RAM
    assert vgpu.last_status == -errno.EFAULT


def test_track_write_waits_for_vgpu_lock(gvt) -> None:
    """kvmgt_page_track_write takes vgpu_lock (6.6+): a write that arrives while GVT is busy
    elsewhere (here another thread holds the lock) is handled only after the lock is free."""
    vm, vgpu = gvt()
    vgpu.get_ppgtt_mm([chain(vm)])
    done = threading.Event()

    def writer() -> None:
        guest_write64(vm, (PT << 12) + 8, pte(0x601))
        done.set()

    with vgpu.lock:
        t = threading.Thread(target=writer)
        t.start()
        time.sleep(0.05)
        assert not done.is_set() and vgpu.stats.handled_writes == 0
    t.join(5)
    assert done.is_set() and vgpu.stats.handled_writes == 1
    assert vgpu.dma.lookup(0x601) is not None


def test_an_attached_vgpu_does_not_keep_its_vm_alive() -> None:
    import gc
    import weakref

    from pagetrack.plugins.gvt_shadow_gtt import attach_vgpu

    vm = VM(load_entry_points=False)
    vgpu = attach_vgpu(vm)
    ref = weakref.ref(vm)
    del vm
    gc.collect()
    assert ref() is None and vgpu.attached  # never closed, but collectable
