"""The x86 MMU model: guest walks, shadow pages, the TDP map and the fault paths."""

from .fault import (
    PAGE_TABLE_WRITING_MNEMONICS,
    RET_PF_EMULATE,
    RET_PF_FIXED,
    RET_PF_RETRY,
    RET_PF_SPURIOUS,
    RET_PF_WRITE_PROTECTED,
    GuestPageFault,
    HwFault,
    MmioAccess,
    Mmu,
    Translation,
)
from .paging import GuestWalk, PagingMode, walk_addr
from .pml import PML_ENTITY_NUM, PML_FULL, PML_HEAD_INDEX, PmlBuffer, PmlFull
from .shadow import RMAP_RECYCLE_THRESHOLD, Role, ShadowMmu, ShadowPage
from .spte import (
    SPTE_A,
    SPTE_D,
    SPTE_HOST_WRITABLE,
    SPTE_MMU_WRITABLE,
    SPTE_P,
    SPTE_PS,
    SPTE_W,
    is_mmu_writable,
    is_shadow_present,
    is_writable,
)
from .stats import MmuStats
from .tdp import TdpMap

__all__ = [
    "PAGE_TABLE_WRITING_MNEMONICS",
    "PML_ENTITY_NUM",
    "PML_FULL",
    "PML_HEAD_INDEX",
    "RET_PF_EMULATE",
    "RET_PF_FIXED",
    "RET_PF_RETRY",
    "RET_PF_SPURIOUS",
    "RET_PF_WRITE_PROTECTED",
    "RMAP_RECYCLE_THRESHOLD",
    "SPTE_A",
    "SPTE_D",
    "SPTE_HOST_WRITABLE",
    "SPTE_MMU_WRITABLE",
    "SPTE_P",
    "SPTE_PS",
    "SPTE_W",
    "GuestPageFault",
    "GuestWalk",
    "HwFault",
    "MmioAccess",
    "Mmu",
    "MmuStats",
    "PagingMode",
    "PmlBuffer",
    "PmlFull",
    "Role",
    "ShadowMmu",
    "ShadowPage",
    "TdpMap",
    "Translation",
    "is_mmu_writable",
    "is_shadow_present",
    "is_writable",
    "walk_addr",
]
