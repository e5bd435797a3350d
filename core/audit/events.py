"""The audit event catalog: every event name, its level and its fields.

Callers emit exactly these names (``log.emit(TRACK_ADD, gfn=..., count=..., by=...)``).
Every line also carries the envelope ``schema seq vm event level ts prev``
(see :mod:`pagetrack.audit`).  A field ending in ``?`` is optional.
``docs/audit-log.md`` documents each event; the verifier checks that the fields
listed here are present.

=====================  =======  ==========================================================
event                  level    fields
=====================  =======  ==========================================================
vm_create              info     tdp
vm_destroy             info     –
vm_bugged              error    reason (``KVM_BUG_ON``: the VM is marked dead)
plugin_registered      info     plugin dist version external
plugin_unregistered    info     plugin
plugin_load_failed     warning  entry_point error
plugin_error           error    plugin hook error
plugin_quarantined     warning  plugin hook
memslot                info     change slot base_gfn npages flags old_base_gfn? (move only)
track_add              info     gfn count by   (count: value after; by: external|mmu)
track_remove           info     gfn count by
track_warn             warning  gfn op count   (``update_gfn_write_track`` WARN; unchanged)
write_protect          debug    gfn sptes flush
tlb_flush              debug    scope reason   (scope: vm|gfn|slot)
page_fault             debug    vcpu addr gfn error_code result
emulate                debug    vcpu rip insn
track_write            info     vcpu gpa len data plugins   (one per page piece)
track_write_call       info     plugin gpa outcome   (ok|error|skipped; one per listed plugin)
track_flush_slot       info     slot base_gfn npages   (``[<=6.5]`` notifier)
track_remove_region    info     gfn nr_pages
zap                    debug    gfn pg_level reason sptes   (``level`` is the envelope's)
dirty                  debug    gfn slot
harvest                info     round mode pages gfns
log_end                info     events head   (trailer, written by ``AuditLog.close``)
gvt_attach             info     vgpu plugin   (a vGPU opened: its notifier node registered)
gvt_detach             info     vgpu action   (close|destroy)
gvt_handler            info     vgpu gfn gpa len   (``kvmgt_page_track_write`` passed the ptable filter)
gvt_shadow_update      info     vgpu gfn index old new action cause mfn mm?   (one shadow entry written)
gvt_spt                info     vgpu gfn mfn type action   (alloc|track|free)
gvt_mm                 info     vgpu mm action levels pdps   (create|shadow|invalidate|reclaim|release)
gvt_submit             info     vgpu op levels pdps status   (a workload or a PV notification)
gvt_invariant          info     vgpu mm pages mismatches   (shadow vs guest translation after a submit)
gvt_oos                info     vgpu gfn action   (out_of_sync|sync|reassign)
gvt_dma                debug    vgpu action gfn size dma ref   (the DMA cache)
gvt_ggtt_update        info     vgpu index guest old new   (an emulated GGTT MMIO write)
gvt_gpu_store          info     vgpu mm gma pfn gfn   (the GPU stored through the shadow)
gvt_remove_region      info     vgpu gfn nr_pages dropped   (``kvmgt_page_track_remove_region``)
gvt_error              error    vgpu message   (``gvt_vgpu_err``)
=====================  =======  ==========================================================
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "CATALOG",
    "DIRTY",
    "EMULATE",
    "GVT_EVENTS",
    "HARVEST",
    "LEVELS",
    "LOG_END",
    "MEMSLOT",
    "MEMSLOT_CHANGES",
    "PAGE_FAULT",
    "PF_RESULTS",
    "PLUGIN_ERROR",
    "PLUGIN_LOAD_FAILED",
    "PLUGIN_QUARANTINED",
    "PLUGIN_REGISTERED",
    "PLUGIN_UNREGISTERED",
    "TLB_FLUSH",
    "TRACK_ADD",
    "TRACK_FLUSH_SLOT",
    "TRACK_REMOVE",
    "TRACK_REMOVE_REGION",
    "TRACK_WARN",
    "TRACK_WRITE",
    "TRACK_WRITE_CALL",
    "VM_BUGGED",
    "VM_CREATE",
    "VM_DESTROY",
    "WRITE_PROTECT",
    "ZAP",
    "ZAP_REASONS",
]

#: Log levels in increasing order of severity.
LEVELS: Final = ("debug", "info", "warning", "error")

VM_CREATE: Final = "vm_create"
VM_DESTROY: Final = "vm_destroy"
VM_BUGGED: Final = "vm_bugged"
PLUGIN_REGISTERED: Final = "plugin_registered"
PLUGIN_UNREGISTERED: Final = "plugin_unregistered"
PLUGIN_LOAD_FAILED: Final = "plugin_load_failed"
PLUGIN_ERROR: Final = "plugin_error"
PLUGIN_QUARANTINED: Final = "plugin_quarantined"
MEMSLOT: Final = "memslot"
TRACK_ADD: Final = "track_add"
TRACK_REMOVE: Final = "track_remove"
TRACK_WARN: Final = "track_warn"
WRITE_PROTECT: Final = "write_protect"
TLB_FLUSH: Final = "tlb_flush"
PAGE_FAULT: Final = "page_fault"
EMULATE: Final = "emulate"
TRACK_WRITE: Final = "track_write"
TRACK_WRITE_CALL: Final = "track_write_call"
TRACK_FLUSH_SLOT: Final = "track_flush_slot"
TRACK_REMOVE_REGION: Final = "track_remove_region"
ZAP: Final = "zap"
DIRTY: Final = "dirty"
HARVEST: Final = "harvest"
LOG_END: Final = "log_end"
#: Events of the gvt_shadow_gtt plugin (plugins/gvt_shadow_gtt).
GVT_EVENTS: Final = (
    "gvt_attach", "gvt_detach", "gvt_handler", "gvt_shadow_update", "gvt_spt", "gvt_mm",
    "gvt_submit", "gvt_invariant", "gvt_oos", "gvt_dma", "gvt_ggtt_update", "gvt_gpu_store",
    "gvt_remove_region", "gvt_error",
)

MEMSLOT_CHANGES: Final = ("create", "delete", "move", "flags_only")
PF_RESULTS: Final = ("fixed", "emulate", "fast", "spurious", "retry")
ZAP_REASONS: Final = (
    "misaligned",
    "flooded",
    "pte",
    "zap_all_fast",
    "unprotect",
    "obsolete",
    "rmap_recycle",
    "sync",
    "collapsible",
)

#: event name -> (level, field names); a trailing ``?`` marks an optional field.
CATALOG: Final[dict[str, tuple[str, tuple[str, ...]]]] = {
    VM_CREATE: ("info", ("tdp",)),
    VM_DESTROY: ("info", ()),
    VM_BUGGED: ("error", ("reason",)),
    PLUGIN_REGISTERED: ("info", ("plugin", "dist", "version", "external")),
    PLUGIN_UNREGISTERED: ("info", ("plugin",)),
    PLUGIN_LOAD_FAILED: ("warning", ("entry_point", "error")),
    PLUGIN_ERROR: ("error", ("plugin", "hook", "error")),
    PLUGIN_QUARANTINED: ("warning", ("plugin", "hook")),
    MEMSLOT: ("info", ("change", "slot", "base_gfn", "npages", "flags", "old_base_gfn?")),
    TRACK_ADD: ("info", ("gfn", "count", "by")),
    TRACK_REMOVE: ("info", ("gfn", "count", "by")),
    TRACK_WARN: ("warning", ("gfn", "op", "count")),
    WRITE_PROTECT: ("debug", ("gfn", "sptes", "flush")),
    TLB_FLUSH: ("debug", ("scope", "reason")),
    PAGE_FAULT: ("debug", ("vcpu", "addr", "gfn", "error_code", "result")),
    EMULATE: ("debug", ("vcpu", "rip", "insn")),
    TRACK_WRITE: ("info", ("vcpu", "gpa", "len", "data", "plugins")),
    TRACK_WRITE_CALL: ("info", ("plugin", "gpa", "outcome")),
    TRACK_FLUSH_SLOT: ("info", ("slot", "base_gfn", "npages")),
    TRACK_REMOVE_REGION: ("info", ("gfn", "nr_pages")),
    ZAP: ("debug", ("gfn", "pg_level", "reason", "sptes")),
    DIRTY: ("debug", ("gfn", "slot")),
    HARVEST: ("info", ("round", "mode", "pages", "gfns")),
    LOG_END: ("info", ("events", "head")),
    "gvt_attach": ("info", ("vgpu", "plugin")),
    "gvt_detach": ("info", ("vgpu", "action")),
    "gvt_handler": ("info", ("vgpu", "gfn", "gpa", "len")),
    "gvt_shadow_update": ("info", ("vgpu", "gfn", "index", "old", "new", "action", "cause", "mfn", "mm?")),
    "gvt_spt": ("info", ("vgpu", "gfn", "mfn", "type", "action")),
    "gvt_mm": ("info", ("vgpu", "mm", "action", "levels", "pdps")),
    "gvt_submit": ("info", ("vgpu", "op", "levels", "pdps", "status")),
    "gvt_invariant": ("info", ("vgpu", "mm", "pages", "mismatches")),
    "gvt_oos": ("info", ("vgpu", "gfn", "action")),
    "gvt_dma": ("debug", ("vgpu", "action", "gfn", "size", "dma", "ref")),
    "gvt_ggtt_update": ("info", ("vgpu", "index", "guest", "old", "new")),
    "gvt_gpu_store": ("info", ("vgpu", "mm", "gma", "pfn", "gfn")),
    "gvt_remove_region": ("info", ("vgpu", "gfn", "nr_pages", "dropped")),
    "gvt_error": ("error", ("vgpu", "message")),
}
