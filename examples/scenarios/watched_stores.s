# Stores into PAGES data pages, STORES stores each, one dirty-log round per 4 pages.
# Used by external-tracker.toml, whose tracker watches the first four pages.
.equ PAGES, 16
.equ STORES, 3

    mov rbx, DATA_BASE
    xor ecx, ecx                # page index
next_page:
    mov rax, rcx
    shl rax, 12
    add rax, rbx                # the page
    xor edx, edx                # store index
next_store:
    mov qword ptr [rax + rdx*8], rcx
    inc edx
    cmp edx, STORES
    jb next_store
    inc ecx
    test ecx, 3
    jnz same_round
    out ROUND_PORT, al
same_round:
    cmp ecx, PAGES
    jb next_page
    hlt
