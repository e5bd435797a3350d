# gvt_driver: a guest GPU driver that builds, edits and tears down PPGTTs under a vGPU.
#
# Run with a vGPU attached (option {"gvt_shadow_gtt": {"attach": true, "ips": true,
# "huge_ranges": [[0x800, 0xa00]]}}): once a table page is shadowed, every store to
# it faults, is emulated and reaches GVT through track_write.  GVT is driven through
# the GVT port (plugins/gvt_shadow_gtt/port.py): a 56-byte descriptor at DESC, then
# `out GVT_PORT, eax` with its address; `in eax, GVT_PORT` reads the status.
# Every status and every value read back after a GPU store is sent to LOG_PORT, so
# the run's `io` list is the transcript (see plugins/gvt_shadow_gtt/tour.py).
#
# Memory (data slot): DESC page, table pages T*, buffer pages B*, a 64 KiB buffer,
# a 2 MiB frame backed by host huge pages (HUGE, contiguous) and one that is not
# (SPLIT).  GPU addresses: PT T3 maps [0, 2M), T4 [2M, 4M) and, shared, [4M, 6M),
# a direct 2M page at 6M, a split one at 8M, a 64K-entry PT T5 at 10M.

.equ GVT_PORT, 0x20
.equ OP_SUBMIT, 1
.equ OP_L3_CREATE, 2
.equ OP_L3_DESTROY, 3
.equ OP_L4_CREATE, 4
.equ OP_L4_DESTROY, 5
.equ P, 3                       # present | RW
.equ PS, 0x80                   # 2M / 1G page
.equ IPS, 0x800                 # the PT below holds 64K entries
.equ DESC, DATA_BASE
.equ TBL, DATA_BASE + 0x100000
.equ BUF, DATA_BASE + 0x200000
.equ BUF64, DATA_BASE + 0x300000
.equ HUGE, DATA_BASE + 0x400000
.equ SPLIT, DATA_BASE + 0x600000
.equ BAD, 0x40000000            # no memslot here
.equ T0, TBL
.equ T1, TBL + 0x1000
.equ T2, TBL + 0x2000
.equ T3, TBL + 0x3000
.equ T4, TBL + 0x4000
.equ T5, TBL + 0x5000
.equ T6, TBL + 0x6000
.equ T7, TBL + 0x7000
.equ T8, TBL + 0x8000
.equ T9, TBL + 0x9000
.equ T10, TBL + 0xa000
.equ T11, TBL + 0xb000
.equ T12, TBL + 0xc000
.equ T13, TBL + 0xd000
.equ T14, TBL + 0xe000
.equ T15, TBL + 0xf000
.equ T16, TBL + 0x10000
.equ T17, TBL + 0x11000
.equ B0, BUF
.equ B8, BUF + 0x8000
.equ B9, BUF + 0x9000
.equ B10, BUF + 0xa000
.equ B11, BUF + 0xb000
.equ B12, BUF + 0xc000
.equ B13, BUF + 0xd000
.equ B14, BUF + 0xe000
.equ B15, BUF + 0xf000

    jmp main

# ---- GVT calls: rdx = root (pdp[0]); r8 = gma, r9 = value for a GPU store -------------
kick:                                   # descriptor filled: go, then log the status
    mov eax, DESC
    out GVT_PORT, eax
    in eax, GVT_PORT
    out LOG_PORT, eax
    ret
clear_desc:
    xor eax, eax
    mov qword ptr [DESC], rax
    mov qword ptr [DESC + 8], rax
    mov qword ptr [DESC + 16], rax
    mov qword ptr [DESC + 24], rax
    mov qword ptr [DESC + 32], rax
    mov qword ptr [DESC + 40], rax
    mov qword ptr [DESC + 48], rax
    ret
g2v:                                    # ecx = op
    call clear_desc
    mov dword ptr [DESC], ecx
    mov qword ptr [DESC + 8], rdx
    jmp kick
submit_store:                           # ecx = levels: submit, the GPU stores r9 at r8
    call clear_desc
    mov dword ptr [DESC], OP_SUBMIT
    mov word ptr [DESC + 4], cx
    mov word ptr [DESC + 6], 1
    mov qword ptr [DESC + 8], rdx
    mov qword ptr [DESC + 40], r8
    mov qword ptr [DESC + 48], r9
    jmp kick
submit4:                                # 4-level submit + GPU store, then log what landed at rsi
    mov ecx, 4
    call submit_store
    mov rax, qword ptr [rsi]
    out LOG_PORT, eax
    ret

main:
    in eax, GVT_PORT                    # 1: probe: 0 with a vGPU, -ENODEV without
    out LOG_PORT, eax

    # ---- PPGTT A (4-level), built with plain stores: nothing is tracked yet ----
    mov rax, T1 + P
    mov qword ptr [T0], rax             # PML4[0] -> PDP
    mov rax, T2 + P
    mov qword ptr [T1], rax             # PDP[0]  -> PD
    mov rax, T3 + P
    mov qword ptr [T2], rax             # PD[0]   -> PT
    mov rdi, T3
    mov rax, B0 + P
    mov ecx, 8
fill_pt:                                # PT[0..7] -> B0..B7
    mov qword ptr [rdi], rax
    add rdi, 8
    add rax, 0x1000
    dec ecx
    jnz fill_pt
    mov rdx, T0
    mov ecx, OP_L4_CREATE
    call g2v                            # 2: 0  (shadowed: T0..T3 now write-protected)

    mov rdx, T0
    xor r8d, r8d
    mov r9, 0xa1
    mov rsi, B0
    call submit4                        # 3: 0   4: 0xa1 (GPU store landed in B0)

    # ---- 8-byte entry updates: each store traps and is applied at once ----
    mov rax, B8 + P
    mov qword ptr [T3 + 8*8], rax       # map gma 0x8000 -> B8
    mov rax, B9 + P
    mov qword ptr [T3], rax             # remap gma 0 -> B9 (B9 mapped before B0 dropped)
    xor eax, eax
    mov qword ptr [T3 + 8*1], rax       # unmap gma 0x1000
    mov rdx, T0
    xor r8d, r8d
    mov r9, 0xa2
    mov rsi, B9
    call submit4                        # 5: 0   6: 0xa2
    mov rdx, T0
    mov r8, 0x8000
    mov r9, 0xa3
    mov rsi, B8
    call submit4                        # 7: 0   8: 0xa3

    # ---- 4-byte partial writes: scratched now, resolved at the next submit ----
    mov eax, B10 + P
    mov dword ptr [T3 + 8*2], eax       # low half
    xor eax, eax
    mov dword ptr [T3 + 8*2 + 4], eax   # high half
    mov rdx, T0
    mov r8, 0x2000
    mov r9, 0xa4
    mov rsi, B10
    call submit4                        # 9: 0   10: 0xa4

    # ---- a new PDE: the PT below is shadowed (and protected) by this store ----
    mov rax, B11 + P
    mov qword ptr [T4], rax             # T4 not yet tracked: a plain store
    mov rax, T4 + P
    mov qword ptr [T2 + 8*1], rax       # PD[1] -> T4: populate T4
    mov rdx, T0
    mov r8, 0x200000
    mov r9, 0xa5
    mov rsi, B11
    call submit4                        # 11: 0   12: 0xa5

    # ---- a shared PT: PD[2] -> T4 as well (refcount 2), then dropped again ----
    mov rax, T4 + P
    mov qword ptr [T2 + 8*2], rax
    mov rdx, T0
    mov r8, 0x400008
    mov r9, 0xa6
    mov rsi, B11 + 8
    call submit4                        # 13: 0   14: 0xa6
    xor eax, eax
    mov qword ptr [T2 + 8*2], rax       # refcount back to 1, T4 stays tracked
    mov rax, B12 + P
    mov qword ptr [T4 + 8*1], rax       # still trapped
    mov rdx, T0
    mov r8, 0x201000
    mov r9, 0xa7
    mov rsi, B12
    call submit4                        # 15: 0   16: 0xa7

    # ---- 2M pages: host-contiguous (direct 2M) and not (split into 512 x 4K) ----
    mov rax, HUGE + PS + P
    mov qword ptr [T2 + 8*3], rax
    mov rdx, T0
    mov r8, 0x603008
    mov r9, 0xa8
    mov rsi, HUGE + 0x3008
    call submit4                        # 17: 0   18: 0xa8
    mov rax, SPLIT + PS + P
    mov qword ptr [T2 + 8*4], rax
    mov rdx, T0
    mov r8, 0x805010
    mov r9, 0xa9
    mov rsi, SPLIT + 0x5010
    call submit4                        # 19: 0   20: 0xa9

    # ---- 64K entries (PDE with IPS): entries 0, 16, ... each map 16 pages ----
    mov rax, BUF64 + P
    mov qword ptr [T5], rax
    mov rax, BUF64 + 0x10000 + P
    mov qword ptr [T5 + 8*16], rax
    mov rax, T5 + IPS + P
    mov qword ptr [T2 + 8*5], rax       # PD[5] -> T5 (64K)
    mov rdx, T0
    mov r8, 0xa05000
    mov r9, 0xaa
    mov rsi, BUF64 + 0x5000
    call submit4                        # 21: 0   22: 0xaa
    mov rax, B15 + P
    mov qword ptr [T5 + 8*3], rax       # not a 64K slot: ignored by GVT
    xor eax, eax
    mov qword ptr [T5 + 8*16], rax      # unmap the second 64K page: 16 entries scratched

    # ---- a 2-byte store GVT refuses ("guest page write error"; KVM cannot emulate the
    #      16-byte ones, cmpxchg16b and SSE, so none reach GVT from this guest) ----
    mov ax, 0x1234
    mov word ptr [T3 + 8*20], ax

    # ---- a store across two table pages: two 4-byte pieces, two post-shadow entries ----
    mov rax, B11 + P
    shl rax, 32                         # T3[511] high half := 0, T4[0] low half := B11 + P
    mov qword ptr [T3 + 0xffc], rax

    # ---- PPGTT B (3-level): pdp[0] -> PD T6 -> PT T7 ----
    mov rax, T7 + P
    mov qword ptr [T6], rax
    mov rax, B13 + P
    mov qword ptr [T7], rax
    mov rdx, T6
    mov ecx, OP_L3_CREATE
    call g2v                            # 23: 0
    mov rdx, T6
    xor r8d, r8d
    mov r9, 0xab
    mov ecx, 3
    call submit_store                   # 24: 0
    mov rax, qword ptr [B13]
    out LOG_PORT, eax                   # 25: 0xab
    mov rax, B14 + P
    mov qword ptr [T7 + 8*1], rax       # trapped
    mov rdx, T6
    mov r8, 0x1000
    mov r9, 0xac
    mov ecx, 3
    call submit_store                   # 26: 0
    mov rax, qword ptr [B14]
    out LOG_PORT, eax                   # 27: 0xac
    mov rdx, T6
    mov ecx, OP_L3_DESTROY
    call g2v                            # 28: 0

    # ---- tear down A: DESTROY releases the shadow; its pages are plain memory again ----
    mov rdx, T0
    mov ecx, OP_L4_DESTROY
    call g2v                            # 29: 0
    mov rax, 0x5555555555555555
    mov qword ptr [T3], rax             # data now: not trapped
    mov qword ptr [T2], rax

    # ---- PPGTT C, then its PT reused for data without DESTROY (gvt-linux #153) ----
    mov rax, T9 + P
    mov qword ptr [T8], rax
    mov rax, T10 + P
    mov qword ptr [T9], rax
    mov rax, T11 + P
    mov qword ptr [T10], rax
    mov rax, B15 + P
    mov qword ptr [T11], rax
    mov rdx, T8
    mov ecx, OP_L4_CREATE
    call g2v                            # 30: 0
    mov rdx, T8
    xor r8d, r8d
    mov r9, 0xad
    mov rsi, B15
    call submit4                        # 31: 0   32: 0xad
    mov rax, 0xdeadbeefcafe0001         # "data": bit 0 set, frame outside guest RAM
    mov qword ptr [T11], rax            # GVT maps garbage, fails, keeps the old entry
    mov rax, 0x00000000cafe0001
    mov qword ptr [T11 + 8], rax
    mov rax, 0x2222222222222222         # bit 0 clear: read as an unmap
    mov qword ptr [T11 + 16], rax
    mov rdx, T8
    mov ecx, OP_L4_DESTROY
    call g2v                            # 33: 0 (late DESTROY)

    # ---- shadowing fails: an unmappable leaf (-ENXIO), a 1G entry (-EINVAL) ----
    mov rax, T13 + P
    mov qword ptr [T12], rax
    mov rax, T14 + P
    mov qword ptr [T13], rax
    mov rax, T15 + P
    mov qword ptr [T14], rax
    mov rax, BAD + P
    mov qword ptr [T15], rax
    mov rdx, T12
    mov ecx, OP_L4_CREATE
    call g2v                            # 34: -ENXIO (0xfffffffa)
    mov rax, T17 + P
    mov qword ptr [T16], rax
    mov rax, PS + P
    mov qword ptr [T17], rax            # PDP[0]: a 1G page
    mov rdx, T16
    mov ecx, OP_L4_CREATE
    call g2v                            # 35: -EINVAL (0xffffffea)
    hlt
