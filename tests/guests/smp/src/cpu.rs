//! All of the smp guest's inline assembly and hardware access: the real-mode trampoline an AP
//! starts in (copied below 1 MiB), the local APIC registers (xAPIC MMIO at 0xFEE00000), the IDT
//! with the exception stubs and the IPI handler, and the few instructions the guest needs (LIDT,
//! PAUSE, `sti; hlt`).
//!
//! See: Intel SDM Vol 3A 9.4.4 (MP initialization: INIT, then STARTUP IPIs; the AP starts in real
//! mode at CS:IP = (V << 8):0000), 10.8.5 (initializing IA-32e mode: protected mode, PAE, CR3,
//! EFER.LME, then CR0.PG), 11.4 (local APIC registers), 11.6.1 (the ICR), 11.8.5 (EOI), 11.9
//! (spurious interrupts, SVR), 6.14.1 (64-bit IDT gates).

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering};

/// Where the trampoline is copied: 64 KiB, clear of the boot layout (0x0-0x8FFF), of the stack
/// that grows down from 0x80000 (the BSP uses a few KiB of it) and of the image at 1 MiB.
pub const TRAMPOLINE_ADDRESS: u64 = 0x1_0000;
/// The STARTUP IPI vector: the AP starts at CS:IP = (vector << 8):0000 = 0x10000.
pub const SIPI_VECTOR: u32 = (TRAMPOLINE_ADDRESS >> 12) as u32;
const _: () = assert!(TRAMPOLINE_ADDRESS & 0xFFF == 0 && TRAMPOLINE_ADDRESS < 0x10_0000);

/// The vector of the fixed IPI the BSP sends the AP.
pub const IPI_VECTOR: u8 = 0x40;
/// The spurious-interrupt vector programmed into the SVR (low 4 bits all ones, as P6 wants).
pub const SPURIOUS_VECTOR: u8 = 0xFF;

// ---- the trampoline ---------------------------------------------------------------------------

// The AP's way from the STARTUP IPI to Rust, assembled here and copied to TRAMPOLINE_ADDRESS
// (position-dependent: every address in it is TRAMPOLINE_ADDRESS + an offset). Layout (offsets
// fixed with .org, mirrored by the TRAMPOLINE_* constants): 0x00 a jump over the data; 0x08 u64
// stack top, 0x10 u64 Rust entry, 0x18 u64 CR3 (written by the BSP before the SIPI); 0x20 u32
// entry counter; 0x28 GDT (0x00 null, 0x08 64-bit code, 0x10 flat data, 0x18 32-bit flat code;
// SDM Vol 3A 3.4.5); 0x48 its GDTR operand; 0x50 the code:
// 1. Real mode, CS = 0x1000, IP = 0: DS = CS; count the entry (a second SIPI that restarted the
//    AP would show as a second entry); load the trampoline's GDT.
// 2. CR0.PE, far jump to 32-bit protected mode (selector 0x18).
// 3. 32-bit: data segments, CR4.PAE, CR3 from the parameters (the BSP's, 0x2000: the flat64
//    identity map), EFER.LME|NXE, then CR0 = 0x80050033 (PG, and caches on: the AP started with
//    CD and NW set) as on the BSP; far jump to 64-bit code (selector 0x08).
// 4. 64-bit: data segments, RSP and the Rust entry from the parameters; call it (never returns).
global_asm!(
    ".pushsection .text.smp_trampoline, \"ax\"",
    ".global smp_trampoline_start",
    "smp_trampoline_start:",
    ".code16",
    "    jmp smp_trampoline_code",
    ".org 0x08",
    "    .quad 0",
    "    .quad 0",
    "    .quad 0",
    "    .long 0",
    ".org 0x28",
    "    .quad 0",
    "    .quad 0x00AF9A000000FFFF",
    "    .quad 0x00CF92000000FFFF",
    "    .quad 0x00CF9A000000FFFF",
    ".org 0x48",
    "    .word 31",
    "    .long {base} + 0x28",
    ".org 0x50",
    "smp_trampoline_code:",
    "    cli",
    "    cld",
    "    mov ax, cs",
    "    mov ds, ax",
    "    lock inc dword ptr [0x20]",
    "    lgdt [0x48]",
    "    mov eax, cr0",
    "    or eax, 1",
    "    mov cr0, eax",
    // ljmpl 0x18:(base + offset of protected): 0x66 0xEA, 32-bit offset, selector.
    "    .byte 0x66, 0xEA",
    "    .long {base} + (smp_trampoline_protected - smp_trampoline_start)",
    "    .word 0x18",
    ".code32",
    "smp_trampoline_protected:",
    "    mov ax, 0x10",
    "    mov ds, ax",
    "    mov es, ax",
    "    mov ss, ax",
    "    mov eax, 0x20",
    "    mov cr4, eax",
    "    mov eax, dword ptr [{base} + 0x18]",
    "    mov cr3, eax",
    "    mov ecx, 0xC0000080",
    "    rdmsr",
    "    or eax, 0x900",
    "    wrmsr",
    "    mov eax, 0x80050033",
    "    mov cr0, eax",
    // ljmp 0x08:(base + offset of long): 0xEA, 32-bit offset, selector.
    "    .byte 0xEA",
    "    .long {base} + (smp_trampoline_long - smp_trampoline_start)",
    "    .word 0x08",
    ".code64",
    "smp_trampoline_long:",
    "    mov ax, 0x10",
    "    mov ds, ax",
    "    mov es, ax",
    "    mov ss, ax",
    "    mov fs, ax",
    "    mov gs, ax",
    "    mov eax, {base} + 0x08",
    "    mov rsp, [rax]",
    "    mov rax, [rax + 8]",
    "    and rsp, -16",
    "    xor ebp, ebp",
    "    call rax",
    "2:  cli",
    "    hlt",
    "    jmp 2b",
    ".global smp_trampoline_end",
    "smp_trampoline_end:",
    ".popsection",
    base = const TRAMPOLINE_ADDRESS,
);

/// Offsets of the trampoline's parameters (see the layout above).
const TRAMPOLINE_STACK: u64 = 0x08;
const TRAMPOLINE_ENTRY: u64 = 0x10;
const TRAMPOLINE_CR3: u64 = 0x18;
const TRAMPOLINE_ENTRIES: u64 = 0x20;

extern "C" {
    static smp_trampoline_start: u8;
    static smp_trampoline_end: u8;
}

/// Copies the trampoline to TRAMPOLINE_ADDRESS with its parameters: the AP's stack top, its
/// Rust entry (`extern "C" fn() -> !`) and CR3. The entry counter starts at 0.
pub fn install_trampoline(stack_top: u64, entry: extern "C" fn() -> !, cr3: u64) {
    let start = core::ptr::addr_of!(smp_trampoline_start);
    let length = core::ptr::addr_of!(smp_trampoline_end) as usize - start as usize;
    // SAFETY: [TRAMPOLINE_ADDRESS, + length) is free guest RAM below 1 MiB (see
    // TRAMPOLINE_ADDRESS; length is about 200 bytes), identity-mapped; no AP runs yet.
    unsafe {
        core::ptr::copy_nonoverlapping(start, TRAMPOLINE_ADDRESS as *mut u8, length);
        let base = TRAMPOLINE_ADDRESS;
        core::ptr::write_volatile((base + TRAMPOLINE_STACK) as *mut u64, stack_top);
        core::ptr::write_volatile((base + TRAMPOLINE_ENTRY) as *mut u64, entry as usize as u64);
        core::ptr::write_volatile((base + TRAMPOLINE_CR3) as *mut u64, cr3);
        core::ptr::write_volatile((base + TRAMPOLINE_ENTRIES) as *mut u32, 0);
    }
}

/// How many times an AP entered the installed trampoline.
pub fn trampoline_entries() -> u32 {
    // SAFETY: the counter inside the installed trampoline (see install_trampoline); the AP
    // changes it with a locked increment, a volatile read sees either value.
    unsafe { core::ptr::read_volatile((TRAMPOLINE_ADDRESS + TRAMPOLINE_ENTRIES) as *const u32) }
}

pub fn read_cr3() -> u64 {
    let value: u64;
    // SAFETY: reading CR3 has no side effects (CPL 0).
    unsafe { asm!("mov {}, cr3", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

// ---- the local APIC -----------------------------------------------------------------------------

/// The local APIC's MMIO page (xAPIC mode). See: SDM Vol 3A 11.4.1.
const APIC_BASE: u64 = 0xFEE0_0000;
pub const APIC_ID: u64 = 0x20;
pub const APIC_TPR: u64 = 0x80;
pub const APIC_EOI: u64 = 0xB0;
pub const APIC_SVR: u64 = 0xF0;
pub const APIC_ICR_LOW: u64 = 0x300;
pub const APIC_ICR_HIGH: u64 = 0x310;

/// ICR low: delivery modes (bits 10:8), delivery status (bit 12), level assert (bit 14).
/// See: SDM Vol 3A 11.6.1, Figure 11-12.
pub const ICR_FIXED: u32 = 0b000 << 8;
pub const ICR_INIT: u32 = 0b101 << 8;
pub const ICR_STARTUP: u32 = 0b110 << 8;
pub const ICR_DELIVERY_PENDING: u32 = 1 << 12;
pub const ICR_ASSERT: u32 = 1 << 14;
/// SVR bit 8: APIC software enable. See: SDM Vol 3A 11.9.
pub const SVR_ENABLE: u32 = 1 << 8;

pub fn apic_read(register: u64) -> u32 {
    // SAFETY: an aligned 32-bit read of a local APIC register (xAPIC MMIO, identity-mapped by the
    // boot page tables); reading has no side effects on these registers.
    unsafe { core::ptr::read_volatile((APIC_BASE + register) as *const u32) }
}

pub fn apic_write(register: u64, value: u32) {
    // SAFETY: an aligned 32-bit write of a local APIC register; callers write only the
    // registers this guest programs (TPR, EOI, SVR, ICR).
    unsafe { core::ptr::write_volatile((APIC_BASE + register) as *mut u32, value) }
}

/// This CPU's APIC ID (ID register bits 31:24).
pub fn apic_id() -> u32 {
    apic_read(APIC_ID) >> 24
}

/// Software-enables this CPU's local APIC (SVR: enable, spurious vector) and accepts every
/// priority (TPR 0).
pub fn apic_enable() {
    apic_write(APIC_TPR, 0);
    apic_write(APIC_SVR, SVR_ENABLE | u32::from(SPURIOUS_VECTOR));
}

/// Sends an IPI: destination APIC ID into ICR high bits 31:24, then the command into ICR low
/// (the write to the low word sends it). See: SDM Vol 3A 11.6.1.
pub fn send_ipi(destination: u32, command: u32) {
    apic_write(APIC_ICR_HIGH, destination << 24);
    apic_write(APIC_ICR_LOW, command);
}

// ---- interrupts -------------------------------------------------------------------------------

/// Interrupts received on the IPI vector, and the APIC ID of the CPU that took the last one.
pub static IPI_COUNT: AtomicU64 = AtomicU64::new(0);
pub static IPI_CPU: AtomicU64 = AtomicU64::new(u64::MAX);

#[repr(C, align(16))]
struct Idt([u64; 2 * 256]);

static mut IDT: Idt = Idt([0; 512]);

/// What the exception stubs pass to `crate::exception`: the vector, the error code (0 for
/// vectors without one), then the CPU's frame. See: SDM Vol 3A 6.14.2.
#[repr(C)]
pub struct ExceptionFrame {
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

extern "C" {
    static smp_exception_table: [u64; 32];
    fn smp_ipi_handler();
    fn smp_spurious_handler();
}

// Exception stubs (vectors with an error code skip the dummy push) call `exception(frame)`,
// which never returns. The IPI handler records the interrupt and the APIC ID of the CPU taking
// it, EOIs (SDM Vol 3A 11.8.5) and returns; the spurious handler returns without an EOI
// (SDM Vol 3A 11.9).
global_asm!(
    ".pushsection .text.smp_interrupts, \"ax\"",
    ".irp v, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31",
    "smp_exception_\\v:",
    "    push 0",
    "    push \\v",
    "    jmp smp_exception_common",
    ".endr",
    ".irp v, 8,10,11,12,13,14,17,21,29,30",
    "smp_exception_\\v:",
    "    push \\v",
    "    jmp smp_exception_common",
    ".endr",
    "smp_exception_common:",
    "    mov rdi, rsp",
    "    and rsp, -16",
    "    cld",
    "    call {exception}",
    "    ud2",
    ".global smp_ipi_handler",
    "smp_ipi_handler:",
    "    push rax",
    "    push rcx",
    "    mov rax, {apic}",
    "    mov ecx, [rax + {id}]",
    "    shr ecx, 24",
    "    mov [rip + {ipi_cpu}], rcx",
    "    lock inc qword ptr [rip + {ipi_count}]",
    "    mov dword ptr [rax + {eoi}], 0",
    "    pop rcx",
    "    pop rax",
    "    iretq",
    ".global smp_spurious_handler",
    "smp_spurious_handler:",
    "    iretq",
    ".popsection",
    ".pushsection .rodata.smp_exception_table, \"a\"",
    ".balign 8",
    ".global smp_exception_table",
    "smp_exception_table:",
    ".irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    "    .quad smp_exception_\\v",
    ".endr",
    ".popsection",
    exception = sym crate::exception,
    apic = const APIC_BASE,
    id = const APIC_ID,
    eoi = const APIC_EOI,
    ipi_cpu = sym IPI_CPU,
    ipi_count = sym IPI_COUNT,
);

/// An interrupt gate (present, DPL 0, selector 0x08) to `handler`. See: SDM Vol 3A 6.14.1.
fn gate(handler: u64) -> [u64; 2] {
    [
        (handler & 0xFFFF) | 0x08 << 16 | 0x8E << 40 | ((handler >> 16) & 0xFFFF) << 48,
        handler >> 32,
    ]
}

/// Fills the IDT shared by both CPUs: exceptions 0-31, the IPI vector, the spurious vector.
/// Called once, by the BSP, before any CPU loads it.
pub fn build_idt() {
    // SAFETY: called once before any CPU uses the IDT; nothing else references it.
    let idt = unsafe { &mut *core::ptr::addr_of_mut!(IDT) };
    // SAFETY: a table of 32 stub addresses defined in the global_asm above.
    let stubs = unsafe { &*core::ptr::addr_of!(smp_exception_table) };
    let mut set = |vector: usize, handler: u64| {
        let [low, high] = gate(handler);
        idt.0[2 * vector] = low;
        idt.0[2 * vector + 1] = high;
    };
    for (vector, &stub) in stubs.iter().enumerate() {
        set(vector, stub);
    }
    set(usize::from(IPI_VECTOR), smp_ipi_handler as *const () as u64);
    set(
        usize::from(SPURIOUS_VECTOR),
        smp_spurious_handler as *const () as u64,
    );
}

/// Loads the IDT built by `build_idt` on this CPU.
pub fn load_idt() {
    let pointer = guest_lib::hw::DescriptorTablePointer {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: core::ptr::addr_of!(IDT) as u64,
    };
    // SAFETY: the IDT is static and filled with valid gates (build_idt ran first).
    unsafe { asm!("lidt [{}]", in(reg) &pointer, options(readonly, nostack, preserves_flags)) };
}

/// `sti; hlt; cli`: waits for an interrupt (STI's shadow keeps it from arriving before HLT).
pub fn wait_for_interrupt() {
    // SAFETY: the IDT has handlers for every vector this CPU can receive (the IPI, spurious).
    unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) };
}

/// PAUSE: the spin-loop hint.
pub fn pause() {
    core::hint::spin_loop();
}

/// Parks this CPU for good with interrupts on (a waiting vCPU, not a stopped one).
pub fn park() -> ! {
    loop {
        // SAFETY: as for wait_for_interrupt.
        unsafe { asm!("sti", "hlt", options(nomem, nostack)) };
    }
}

/// Reads the TSC.
pub fn tsc() -> u64 {
    guest_lib::hw::rdtsc()
}

/// Keeps an atomic referenced so the IPI handler's symbols stay linked.
pub fn ipi_count() -> u64 {
    IPI_COUNT.load(Ordering::SeqCst)
}
