"""The ``track`` mode: dirty logging through the page-track API (a userfaultfd-wp-like tracker)."""

from __future__ import annotations

import pytest
from dirty_log_helpers import DATA_GFN, LoggedGuest
from pagetrack.errors import KvmError

PAGING = pytest.mark.parametrize("tdp", [True, False], ids=["tdp", "shadow"])

ROUNDS = """
    mov qword ptr [rdi + 3*4096], 1
    mov qword ptr [rdi + 3*4096 + 8], 1
    mov qword ptr [rdi + 9*4096], 1
    out ROUND_PORT, al
    mov qword ptr [rdi + 3*4096], 2
    out ROUND_PORT, al
    out ROUND_PORT, al
    hlt
"""


@PAGING
def test_track_mode_records_first_writes_and_rearms_each_round(tdp: bool) -> None:
    """Every page of a logged slot is write-tracked; the first write is emulated, recorded through
    track_write and untracked; the next round tracks it again."""
    g = LoggedGuest(ROUNDS, mode="track", tdp=tdp)
    tracker = g.logger.tracker
    assert tracker is not None and g.vm.plugins.has_external_tracker()
    assert g.vm.write_track_count(DATA_GFN + 3) == 1
    assert g.step() == ("round", [DATA_GFN + 3, DATA_GFN + 9])
    assert g.vm.mmu.stats.insn_emulation >= 2  # one per first write, the second store is native
    assert g.vm.write_track_count(DATA_GFN + 3) == 1  # re-armed by the harvest
    assert g.step() == ("round", [DATA_GFN + 3])
    assert g.step() == ("round", [])
    stats = g.logger.round_stats
    assert stats[1]["emulations"] == 1 and stats[2]["emulations"] == 0
    g.close()


def test_track_mode_disarms_when_logging_stops_and_forgets_deleted_slots() -> None:
    g = LoggedGuest(ROUNDS, mode="track")
    tracker = g.logger.tracker
    assert tracker is not None
    g.vm.enable_dirty_logging(g.data, False)
    assert g.vm.write_track_count(DATA_GFN + 3) == 0 and DATA_GFN + 3 not in tracker.armed
    g.vm.enable_dirty_logging(g.data)
    assert g.vm.write_track_count(DATA_GFN + 3) == 1
    # an external tracker forbids MOVE (6.6+); DELETE drops the counts with the slot
    data = g.data
    with pytest.raises(KvmError, match="EINVAL"):
        g.vm.set_user_memory_region(data.key, data.flags, (data.base_gfn + 4096) << 12,
                                    data.npages << 12, data.userspace_addr)
    g.vm.set_user_memory_region(data.key, 0, data.base_gfn << 12, 0, data.userspace_addr)
    assert not any(DATA_GFN <= gfn < DATA_GFN + 256 for gfn in tracker.armed)
    g.close()
