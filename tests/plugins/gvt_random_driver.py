"""A random guest GPU driver: a Python planner that emits an x86 guest program.

The planner keeps the guest's PPGTT in a Python model (which table pages exist,
what each entry holds) so that every store it emits is one a well-behaved driver
could make: it builds tables on demand, maps, unmaps and remaps 4K pages, maps
2M pages (host-contiguous or not) and 64K pages (under an IPS PDE), shares and
drops page tables, rewrites entries in two 4-byte halves, and submits
workloads whose GPU store is read back by the guest.  The emitted program runs
on a real vCPU, so every store to a shadowed table faults and is emulated.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import attrs

DATA = 0x400000
DESC = DATA  # descriptor page, gfn 0x400
TABLE_GFNS = range(0x500, 0x600)  # fresh table pages, never reused
LEAF_GFNS = range(0x600, 0x700)  # 4K targets
LEAF64_GFNS = range(0x700, 0x800, 16)  # 64K targets
HUGE_FRAMES = (0x800, 0xC00)  # 2M targets backed by host huge pages: mapped 2M
SPLIT_FRAMES = (0xA00, 0xE00, 0x1000, 0x1200)  # 2M targets that are not: split
HUGE_RANGES = [(0x800, 0xA00), (0xC00, 0xE00)]
P, PS, IPS = 0x3, 0x80, 0x800
GVT_PORT, LOG_PORT = 0x20, 0x11
PD_64K = 7  # the PD index whose PT holds 64K entries (in PD tables of the first PDP)

#: op tuples the strategy draws; see GuestDriver.apply.
Op = tuple[Any, ...]


@attrs.define
class GuestDriver:
    """The planner: model tables and emitted assembly lines."""

    levels: int = 4
    ips: bool = False
    lines: list[str] = attrs.field(factory=list)
    expected_io: list[int] = attrs.field(factory=list)
    tables: dict[int, dict[int, int]] = attrs.field(factory=dict)  # gfn -> {index: value}
    pdps: list[int] = attrs.field(factory=lambda: [0, 0, 0, 0])
    _free: Iterator[int] = attrs.field(factory=lambda: iter(TABLE_GFNS))
    created: bool = False
    submits: int = 0

    # ---- emission ------------------------------------------------------------------------
    def _store64(self, gfn: int, index: int, value: int) -> None:
        self.tables.setdefault(gfn, {})[index] = value
        self.lines += [f"    mov rax, {value:#x}", f"    mov qword ptr [{(gfn << 12) + 8 * index:#x}], rax"]

    def _store_halves(self, gfn: int, index: int, value: int, high_first: bool) -> None:
        self.tables.setdefault(gfn, {})[index] = value
        halves = [(0, value & 0xFFFFFFFF), (4, value >> 32)]
        for off, half in reversed(halves) if high_first else halves:
            self.lines += [f"    mov eax, {half:#x}",
                           f"    mov dword ptr [{(gfn << 12) + 8 * index + off:#x}], eax"]

    def _write(self, gfn: int, index: int, value: int, style: int) -> None:
        """style 0: one 8-byte store; 1: low then high half; 2: high then low half."""
        if style == 0:
            self._store64(gfn, index, value)
        else:
            self._store_halves(gfn, index, value, style == 2)

    def _new_table(self) -> int:
        gfn = next(self._free)
        self.tables[gfn] = {}
        return gfn

    def _gvt(self, op: int, levels: int, store: tuple[int, int] | None = None) -> None:
        fields = [(0, 4, op), (4, 2, levels), (6, 2, 1 if store else 0)]
        fields += [(8 + 8 * i, 8, p) for i, p in enumerate(self.pdps)]
        fields += [(40, 8, store[0] if store else 0), (48, 8, store[1] if store else 0)]
        for off, size, value in fields:
            width = {2: "word", 4: "dword", 8: "qword"}[size]
            reg = {2: "ax", 4: "eax", 8: "rax"}[size]
            self.lines += [f"    mov rax, {value:#x}", f"    mov {width} ptr [{DESC + off:#x}], {reg}"]
        self.lines += [f"    mov eax, {DESC:#x}", f"    out {GVT_PORT:#x}, eax",
                       f"    in eax, {GVT_PORT:#x}", f"    out {LOG_PORT:#x}, eax"]
        self.expected_io.append(0)

    # ---- structure ----------------------------------------------------------------------
    def start(self) -> None:
        """Root tables, then the PV CREATE notification (shadowing starts here)."""
        if self.levels == 4:
            self.pdps[0] = self._new_table() << 12
        else:
            self.pdps[0] = self._new_table() << 12
            self.pdps[1] = self._new_table() << 12
        self._gvt(4 if self.levels == 4 else 2, self.levels)
        self.created = True

    def _pd_of(self, top: int, style: int) -> int:
        """The PD for ``top`` (L4: PML4 index 0, PDP index ``top``; L3: root ``top``)."""
        if self.levels == 3:
            return self.pdps[top & 1] >> 12
        pml4 = self.pdps[0] >> 12
        pdp = self.tables[pml4].get(0, 0) >> 12
        if not pdp:
            pdp = self._new_table()
            self._write(pml4, 0, (pdp << 12) | P, style)
        pd = self.tables[pdp].get(top, 0)
        if pd & P:
            return pd >> 12
        pd_gfn = self._new_table()
        self._write(pdp, top, (pd_gfn << 12) | P, style)
        return pd_gfn

    def _pt_of(self, pd: int, slot: int, style: int, prefill: dict[int, int] | None = None) -> int:
        """The PT under PD entry ``slot`` (replacing a 2M leaf); new PTs may be prefilled."""
        pde = self.tables[pd].get(slot, 0)
        if pde & P and not pde & PS:
            return pde >> 12
        pt = self._new_table()
        for index, value in (prefill or {}).items():
            self._store64(pt, index, value)  # not tracked yet: plain stores
        flags = P | (IPS if slot == PD_64K and self.ips else 0)
        self._write(pd, slot, (pt << 12) | flags, style)
        return pt

    # ---- operations ---------------------------------------------------------------------
    def apply(self, op: Op) -> None:
        kind = op[0]
        if kind == "map":
            _, top, slot, index, leaf, style, prefill = op
            if slot == PD_64K and self.ips:
                slot = (slot + 1) % 8
            pd = self._pd_of(top, style)
            value = (LEAF_GFNS[leaf] << 12) | P
            if prefill and not self.tables[pd].get(slot, 0) & P:
                self._pt_of(pd, slot, style, {index: value})
            else:
                self._write(self._pt_of(pd, slot, style), index, value, style)
        elif kind == "unmap":
            _, top, slot, index, style = op
            pd = self._pd_of(top, style)
            pde = self.tables[pd].get(slot, 0)
            if pde & P and not pde & PS and not (slot == PD_64K and self.ips):
                self._write(pde >> 12, index, 0, style)
        elif kind == "drop_pt":
            _, top, slot, style = op
            pd = self._pd_of(top, style)
            if self.tables[pd].get(slot, 0) & P:
                self._write(pd, slot, 0, style)
        elif kind == "share_pt":
            _, top, slot, other, style = op
            pd = self._pd_of(top, style)
            src = self.tables[pd].get(slot, 0)
            if (src & P and not src & PS and other != slot and not (self.ips and PD_64K in (slot, other))):
                self._write(pd, other, src, style)
        elif kind == "map2m":
            _, top, slot, huge, style = op
            if slot == PD_64K and self.ips:
                return
            if huge:
                frame = HUGE_FRAMES[(top + slot) % len(HUGE_FRAMES)]
            else:
                # A frame GVT must split may be live under one PDE only: a second
                # split's 2 MiB attempt drops the first one's mapping of the frame's
                # first page (see test_a_split_2m_frame_mapped_twice_loses_a_page).
                live = {v >> 12 for t in self.tables.values() for v in t.values() if v & PS and v & P}
                free = [f for f in SPLIT_FRAMES if f not in live]
                if not free:
                    return
                frame = free[0]
            pd = self._pd_of(top, style)
            self._write(pd, slot, (frame << 12) | PS | P, style)
        elif kind == "map64k":
            _, top, chunk, leaf, style = op
            if not self.ips:
                return
            pt = self._pt_of(self._pd_of(top, style), PD_64K, style)
            self._write(pt, 16 * chunk, (LEAF64_GFNS[leaf] << 12) | P, style)
        elif kind == "submit":
            _, pick, value = op
            self.submit(pick, value)
        else:
            raise ValueError(kind)

    def submit(self, pick: int, value: int) -> None:
        """Submit; the GPU stores ``value`` at one mapped address, the guest reads it back."""
        mapped = sorted(self.mappings().items())
        store = None
        if mapped:
            gma, gfn = mapped[pick % len(mapped)]
            store = (gma + 8 * (pick % 512), value)
        self._gvt(1, self.levels, store)
        self.submits += 1
        if store is not None:
            gpa = (gfn << 12) + 8 * (pick % 512)
            self.lines += [f"    mov rax, qword ptr [{gpa:#x}]", f"    out {LOG_PORT:#x}, eax"]
            self.expected_io.append(value & 0xFFFFFFFF)

    def mappings(self) -> dict[int, int]:
        """The model's GPU page → gfn map (what the guest tables say)."""
        out: dict[int, int] = {}

        def pt(gfn: int, base: int, ips: bool) -> None:
            for i, v in self.tables.get(gfn, {}).items():
                if not v & P or (ips and i % 16):
                    continue
                if ips:
                    for k in range(16):
                        out[base + ((i + k) << 12)] = (v >> 12) + k
                else:
                    out[base + (i << 12)] = v >> 12

        def pd(gfn: int, base: int) -> None:
            for i, v in self.tables.get(gfn, {}).items():
                if not v & P:
                    continue
                va = base + (i << 21)
                if v & PS:
                    for k in range(512):
                        out[va + (k << 12)] = (v >> 12) + k
                else:
                    pt(v >> 12, va, bool(self.ips and v & IPS))

        if self.levels == 3:
            for r in (0, 1):
                pd(self.pdps[r] >> 12, r << 30)
        else:
            pml4 = self.pdps[0] >> 12
            for i, v in self.tables.get(pml4, {}).items():
                if v & P:
                    for j, w in self.tables.get(v >> 12, {}).items():
                        if w & P:
                            pd(w >> 12, (i << 39) | (j << 30))
        return out

    def program(self) -> str:
        return "\n".join([*self.lines, "    hlt", ""])


def plan(levels: int, ips: bool, ops: list[Op]) -> GuestDriver:
    """Start, apply every op, and end with a submit (so the last edits are checked too)."""
    driver = GuestDriver(levels=levels, ips=ips)
    driver.start()
    for op in ops:
        driver.apply(op)
    driver.submit(0, 0x5EED)
    return driver


def op_strategy() -> Any:
    """A hypothesis strategy of driver ops (imported lazily: hypothesis is a test dependency)."""
    from hypothesis import strategies as st

    top = st.integers(0, 1)
    slot = st.integers(0, 7)
    index = st.integers(0, 511)
    style = st.sampled_from([0, 0, 0, 1, 2])  # mostly 8-byte stores
    return st.one_of(
        st.tuples(st.just("map"), top, slot, index, st.integers(0, len(LEAF_GFNS) - 1), style, st.booleans()),
        st.tuples(st.just("unmap"), top, slot, index, style),
        st.tuples(st.just("drop_pt"), top, slot, style),
        st.tuples(st.just("share_pt"), top, slot, slot, style),
        st.tuples(st.just("map2m"), top, slot, st.booleans(), style),
        st.tuples(st.just("map64k"), top, st.integers(0, 31), st.integers(0, len(LEAF64_GFNS) - 1), style),
        st.tuples(st.just("submit"), st.integers(0, 1 << 16), st.integers(1, (1 << 32) - 1)),
    )
