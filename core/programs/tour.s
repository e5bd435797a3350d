# The built-in tour: a 64-bit guest that writes data, then edits its own page tables.
# Symbols supplied by builtin_program("tour") from the VM's page-table layout
# (pagetrack.program.builtin_defines): PTE_DATA (gpa of the PTE that maps
# DATA_BASE), PD_ADDR (gpa of the page directory that maps the first GiB), PDE_OFF
# (index of the PDE that maps DATA_BASE, times 8), TRACKED_OFF (offset of the data
# page write-tracked by an external tracker; -D overrides it).

    mov rbx, DATA_BASE

    # ---- round 1: plain stores to data pages 0..3 ----
    mov qword ptr [rbx], 1
    mov qword ptr [rbx + 0x1000], 2
    mov qword ptr [rbx + 0x2000], 3
    mov qword ptr [rbx + 0x3000], 4
    out ROUND_PORT, al

    # ---- round 2: remap data page 0 onto page 3's frame by editing a last-level PTE ----
    mov rax, qword ptr [rbx]
    out LOG_PORT, eax                       # 1: the old mapping
    mov rdi, PTE_DATA
    mov r8, qword ptr [rdi]                 # kept, to put back at the end
    mov rax, qword ptr [rdi + 8*3]
    mov qword ptr [rdi], rax                # last-level table: KVM lets it go unsync
    invlpg byte ptr [rbx]                   # ... and re-syncs it here
    mov rax, qword ptr [rbx]
    out LOG_PORT, eax                       # 4: the new mapping
    out ROUND_PORT, al

    # ---- round 3: edit the page directory (write-tracked by KVM itself) ----
    mov rdi, PD_ADDR
    mov rax, qword ptr [rdi + PDE_OFF]
    mov qword ptr [rdi + 8*511], rax        # alias 0x3fe00000 onto the data window: emulated
    mov rax, qword ptr [0x3fe00000]
    out LOG_PORT, eax                       # 4 again, through the alias
    mov rax, qword ptr [rdi + PDE_OFF]
    mov qword ptr [rdi + PDE_OFF], rax   # rewrite a live PDE: its SPTE is zapped
    mov rax, qword ptr [rbx + 0x1000]
    out LOG_PORT, eax                       # 2: refaulted through the rebuilt shadow page
    out ROUND_PORT, al

    # ---- round 4: stores to a page an external tracker watches ----
    mov qword ptr [rbx + TRACKED_OFF + 0x10], 0x55
    mov qword ptr [rbx + TRACKED_OFF + 0xffc], rbx   # straddles two tracked pages

    # ---- put data page 0's mapping back: the tour runs more guests on this VM ----
    mov rdi, PTE_DATA
    mov qword ptr [rdi], r8
    invlpg byte ptr [rbx]
    hlt
