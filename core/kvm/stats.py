"""KVM's own counters through the binary stats interface (KVM_GET_STATS_FD).

The fd holds ``struct kvm_stats_header``, an id string, ``num_desc`` descriptors
(``struct kvm_stats_desc`` + ``name[name_size]``) and the data block; the data is
re-read with ``pread`` each time, the descriptors only once.
"""

from __future__ import annotations

import ctypes
import os
import struct

from . import ioctls as k

__all__ = ["StatsReader"]


class StatsReader:
    """Reads one VM's or vCPU's binary stats fd; owns (and closes) the fd."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        head = k.KvmStatsHeader.from_buffer_copy(os.pread(fd, ctypes.sizeof(k.KvmStatsHeader), 0))
        self.id = os.pread(fd, head.name_size, head.id_offset).split(b"\0", 1)[0].decode()
        dsize = ctypes.sizeof(k.KvmStatsDesc) + head.name_size
        raw = os.pread(fd, dsize * head.num_desc, head.desc_offset)
        self._fields: list[tuple[str, int, int, bool]] = []
        end = 0
        for i in range(head.num_desc):
            chunk = raw[i * dsize: (i + 1) * dsize]
            desc = k.KvmStatsDesc.from_buffer_copy(chunk)
            name = chunk[ctypes.sizeof(k.KvmStatsDesc):].split(b"\0", 1)[0].decode()
            hist = (desc.flags & k.KVM_STATS_TYPE_MASK) in (k.KVM_STATS_TYPE_LINEAR_HIST,
                                                           k.KVM_STATS_TYPE_LOG_HIST)
            self._fields.append((name, desc.offset, desc.size, hist))
            end = max(end, desc.offset + 8 * desc.size)
        self._data_offset = head.data_offset
        self._data_size = end

    @property
    def names(self) -> list[str]:
        return [f[0] for f in self._fields]

    def read(self, histograms: bool = False) -> dict[str, int | list[int]]:
        """Current values: name → u64 (histograms as bucket lists when asked)."""
        data = os.pread(self.fd, self._data_size, self._data_offset)
        out: dict[str, int | list[int]] = {}
        for name, off, size, hist in self._fields:
            if hist:
                if histograms:
                    out[name] = list(struct.unpack_from(f"<{size}Q", data, off))
                continue
            out[name] = struct.unpack_from("<Q", data, off)[0] if size == 1 else \
                list(struct.unpack_from(f"<{size}Q", data, off))
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
