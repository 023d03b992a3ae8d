/* Multiboot v1 header and entry: set a stack and call guest_main(magic, mbi). */
#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00000003 /* page-align modules, want memory info */

    .section .multiboot, "a"
    .align 4
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)

    .text
    .globl _start
_start:
    cli
    movl $stack_top, %esp
    pushl %ebx /* multiboot info */
    pushl %eax /* loader magic */
    call guest_main
1:  hlt
    jmp 1b

/* IRQ0 (the PIT): count the tick, end the interrupt at the PIC. */
    .globl irq0_stub
irq0_stub:
    pushl %eax
    incl irq_ticks
    movb $0x20, %al
    outb %al, $0x20
    popl %eax
    iret

/* Everything else (only a spurious IRQ7 can come: the other lines are masked). */
    .globl ignore_stub
ignore_stub:
    iret

    .bss
    .align 16
    .space 16384
stack_top:

    .section .note.GNU-stack, "", @progbits
