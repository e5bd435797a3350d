"""pagetrack: Linux KVM's x86 write tracking, simulated, with trackers as pluggy plugins.

The public API: :class:`VM` (memslots, the page-track API, vCPUs, plugins),
:data:`hookimpl` to mark tracker hooks, the errors, and the guest program ABI.
"""

from .errors import InputError, KvmError
from .hookspecs import hookimpl, hookspec
from .memory import KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, Change, HostMemory, MemSlot
from .plugin_host import HookBus, PluginHost
from .plugin_info import PluginInfo, discover_entry_points
from .vm import VM

__all__ = [
    "KVM_MEM_LOG_DIRTY_PAGES",
    "KVM_MEM_READONLY",
    "VM",
    "Change",
    "HookBus",
    "HostMemory",
    "InputError",
    "KvmError",
    "MemSlot",
    "PluginHost",
    "PluginInfo",
    "discover_entry_points",
    "hookimpl",
    "hookspec",
]


def __getattr__(name: str) -> object:
    # Vcpu and the runner import the emulator (iced-x86); load them on first use.
    if name == "Vcpu":
        from .vcpu import Vcpu

        return Vcpu
    if name == "run_program":
        from .runner import run_program

        return run_program
    raise AttributeError(f"module 'pagetrack' has no attribute {name!r}")
