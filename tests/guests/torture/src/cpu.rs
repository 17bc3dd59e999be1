//! All of torture's inline assembly: control registers, INVLPG, descriptor tables (GDT with
//! ring-3 segments and a TSS, IDT), the exception entry stubs, the memory probes whose faulting
//! instructions have known addresses, the ring-3 entry/return path and the ring-3 task itself.
//!
//! See: Intel SDM Vol 3A (2.5 control registers, 3.4.5 segment descriptors, 4.5 4-level paging,
//! 4.7 page-fault exceptions, 4.10.4 TLB invalidation, 6.12-6.14 64-bit IDT and exception frames,
//! 7.7 64-bit TSS); Vol 2 for the instructions.

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;

/// A global of a single-CPU, interrupts-off program, read and written with volatile accesses so
/// that values changed by the exception handler (which the compiler does not see being called)
/// are never cached in registers.
pub struct Global<T>(UnsafeCell<T>);

// SAFETY: torture runs on one CPU with interrupts off; the only "concurrency" is the exception
// handler, which runs synchronously in the middle of a probe and uses volatile accesses too.
unsafe impl<T> Sync for Global<T> {}

impl<T> Global<T> {
    pub const fn new(value: T) -> Self {
        Self(UnsafeCell::new(value))
    }
    pub fn pointer(&self) -> *mut T {
        self.0.get()
    }
}

impl<T: Copy> Global<T> {
    pub fn get(&self) -> T {
        // SAFETY: see the Sync impl: no other reference to the value is live.
        unsafe { core::ptr::read_volatile(self.0.get()) }
    }
    pub fn set(&self, value: T) {
        // SAFETY: as for `get`.
        unsafe { core::ptr::write_volatile(self.0.get(), value) }
    }
}

/// Kernel code, kernel data, user data (DPL 3), user code (DPL 3), TSS (two slots).
pub const KERNEL_CODE: u16 = 0x08;
pub const KERNEL_DATA: u16 = 0x10;
pub const USER_DATA: u16 = 0x18 | 3;
pub const USER_CODE: u16 = 0x20 | 3;
pub const TSS_SELECTOR: u16 = 0x28;

/// The vector the ring-3 task uses (INT 0x80) to hand control back to ring 0.
pub const SYSCALL_VECTOR: usize = 0x80;

// ---- control registers, TLB, MSRs -------------------------------------------------------

pub fn read_cr0() -> u64 {
    let value: u64;
    // SAFETY: reading CR0 has no side effects (CPL 0).
    unsafe { asm!("mov {}, cr0", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

/// Writes CR0. See: SDM Vol 3A 2.5 (WP is bit 16).
pub fn write_cr0(value: u64) {
    // SAFETY: the callers only toggle WP; memory clobber keeps accesses ordered around it.
    unsafe { asm!("mov cr0, {}", in(reg) value, options(nostack, preserves_flags)) };
}

pub fn read_cr2() -> u64 {
    let value: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

pub fn read_cr3() -> u64 {
    let value: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe { asm!("mov {}, cr3", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

/// Switches address space (and flushes all non-global TLB entries). See: SDM Vol 3A 4.10.4.1.
///
/// # Safety
/// `pml4` must be a PML4 that maps this program's code, data and stack identity.
pub unsafe fn write_cr3(pml4: u64) {
    // SAFETY: the caller's contract. No `nomem`: memory accesses must not move across it.
    unsafe { asm!("mov cr3, {}", in(reg) pml4, options(nostack, preserves_flags)) };
}

/// Invalidates the TLB entries of the page holding `address` (and the paging-structure caches).
/// See: SDM Vol 3A 4.10.4.1, INVLPG.
pub fn invlpg(address: u64) {
    // SAFETY: INVLPG only drops cached translations. No `nomem`: orders the PTE write before it.
    unsafe { asm!("invlpg [{}]", in(reg) address, options(nostack, preserves_flags)) };
}

// ---- descriptor tables -------------------------------------------------------------------

/// 64-bit TSS, as 32-bit words (it is packed: RSP0 sits at byte 4). See: SDM Vol 3A 7.7.
#[repr(C, align(16))]
struct Tss([u32; 26]);

#[repr(C, align(16))]
struct Gdt([u64; 7]);

#[repr(C, align(16))]
struct Idt([u64; 2 * 256]);

/// The stack the CPU switches to (TSS.RSP0) when an exception or INT 0x80 arrives in ring 3.
#[repr(C, align(16))]
struct TrapStack([u8; 16384]);

static GDT: Global<Gdt> = Global::new(Gdt([0; 7]));
static TSS: Global<Tss> = Global::new(Tss([0; 26]));
static IDT: Global<Idt> = Global::new(Idt([0; 512]));
static TRAP_STACK: Global<TrapStack> = Global::new(TrapStack([0; 16384]));

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

/// Loads torture's own GDT (kernel + user segments, TSS), reloads CS/SS/DS/ES, loads TR, then
/// its own IDT: gates for vectors 0-31 (DPL 0) and INT 0x80 (DPL 3), all interrupt gates.
pub fn install_descriptor_tables() {
    let tss_base = TSS.pointer() as u64;
    let rsp0 = TRAP_STACK.pointer() as u64 + core::mem::size_of::<TrapStack>() as u64;
    // SAFETY: one CPU; nothing else holds references into these statics.
    unsafe {
        let tss = &mut *TSS.pointer();
        tss.0[1] = rsp0 as u32; // RSP0 low
        tss.0[2] = (rsp0 >> 32) as u32; // RSP0 high
        tss.0[25] = 104 << 16; // I/O map base = limit + 1: no I/O bitmap
        let gdt = &mut *GDT.pointer();
        gdt.0[0] = 0;
        gdt.0[1] = 0x00AF_9A00_0000_FFFF; // 64-bit code, DPL 0
        gdt.0[2] = 0x00CF_9200_0000_FFFF; // data, DPL 0
        gdt.0[3] = 0x00CF_F200_0000_FFFF; // data, DPL 3
        gdt.0[4] = 0x00AF_FA00_0000_FFFF; // 64-bit code, DPL 3
                                          // Available 64-bit TSS (type 9), present, limit 103. See: SDM Vol 3A 7.2.3.
        gdt.0[5] =
            103 | (tss_base & 0xFF_FFFF) << 16 | 0x89 << 40 | ((tss_base >> 24) & 0xFF) << 56;
        gdt.0[6] = tss_base >> 32;
        let idt = &mut *IDT.pointer();
        let stubs = &*core::ptr::addr_of!(torture_isr_table);
        for (vector, &stub) in stubs.iter().enumerate() {
            let target = if vector < 32 { vector } else { SYSCALL_VECTOR };
            let attributes: u64 = if target == SYSCALL_VECTOR { 0xEE } else { 0x8E };
            idt.0[2 * target] = (stub & 0xFFFF)
                | u64::from(KERNEL_CODE) << 16
                | attributes << 40
                | ((stub >> 16) & 0xFFFF) << 48;
            idt.0[2 * target + 1] = stub >> 32;
        }
    }
    let gdt_pointer = DescriptorPointer {
        limit: (core::mem::size_of::<Gdt>() - 1) as u16,
        base: GDT.pointer() as u64,
    };
    let idt_pointer = DescriptorPointer {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: IDT.pointer() as u64,
    };
    // SAFETY: the new GDT keeps 0x08/0x10 meaning what they meant; CS is reloaded with a far
    // return to the next instruction; the TSS descriptor is valid and not busy.
    unsafe {
        asm!(
            "lgdt [{gdt}]",
            "push {code}",
            "lea {scratch}, [rip + 2f]",
            "push {scratch}",
            "retfq",
            "2:",
            "mov {scratch:e}, {data}",
            "mov ss, {scratch:x}",
            "mov ds, {scratch:x}",
            "mov es, {scratch:x}",
            "mov {scratch:e}, {tss}",
            "ltr {scratch:x}",
            "lidt [{idt}]",
            gdt = in(reg) &gdt_pointer,
            idt = in(reg) &idt_pointer,
            code = const KERNEL_CODE as u64,
            data = const KERNEL_DATA as u32,
            tss = const TSS_SELECTOR as u32,
            scratch = out(reg) _,
        );
    }
}

// ---- exception entry -----------------------------------------------------------------------

/// What the entry stubs push: general registers (pushed by the stub, R15 last), the vector, the
/// error code (0 for vectors without one), then the CPU's frame. See: SDM Vol 3A 6.14.2.
#[repr(C)]
#[derive(Debug)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

extern "C" {
    /// Entry stub addresses: vectors 0-31, then INT 0x80.
    static torture_isr_table: [u64; 33];
}

// Stubs: vectors with an error code (8, 10-14, 17, 21, 29, 30) skip the dummy push. The common
// path saves all general registers, calls `trap(frame)` with a 16-byte-aligned stack, restores
// the (possibly edited) registers and returns with IRETQ.
global_asm!(
    ".pushsection .text.torture_isr, \"ax\"",
    ".irp v, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31,128",
    "torture_isr_\\v:",
    "    push 0",
    "    push \\v",
    "    jmp torture_isr_common",
    ".endr",
    ".irp v, 8,10,11,12,13,14,17,21,29,30",
    "torture_isr_\\v:",
    "    push \\v",
    "    jmp torture_isr_common",
    ".endr",
    "torture_isr_common:",
    "    push rax",
    "    push rbx",
    "    push rcx",
    "    push rdx",
    "    push rsi",
    "    push rdi",
    "    push rbp",
    "    push r8",
    "    push r9",
    "    push r10",
    "    push r11",
    "    push r12",
    "    push r13",
    "    push r14",
    "    push r15",
    "    mov rdi, rsp",
    "    mov rbp, rsp",
    "    and rsp, -16",
    "    cld",
    "    call {trap}",
    "    mov rsp, rbp",
    "    pop r15",
    "    pop r14",
    "    pop r13",
    "    pop r12",
    "    pop r11",
    "    pop r10",
    "    pop r9",
    "    pop r8",
    "    pop rbp",
    "    pop rdi",
    "    pop rsi",
    "    pop rdx",
    "    pop rcx",
    "    pop rbx",
    "    pop rax",
    "    add rsp, 16",
    "    iretq",
    ".popsection",
    ".pushsection .rodata.torture_isr_table, \"a\"",
    ".balign 8",
    ".global torture_isr_table",
    "torture_isr_table:",
    ".irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,128",
    "    .quad torture_isr_\\v",
    ".endr",
    ".popsection",
    trap = sym crate::trap::trap,
);

// ---- probes ----------------------------------------------------------------------------------

// Memory probes with global labels on their one memory-touching instruction, so that the
// exception handler can check the faulting RIP and resume at the label after it.
//   torture_read(address) -> u64:          mov rax, [rdi]
//   torture_write(address, value):         mov [rdi], rsi
//   torture_exec(address):                 call rdi (a fetch fault reports RIP = CR2 = address)
global_asm!(
    ".pushsection .text.torture_probes, \"ax\"",
    ".global torture_read",
    "torture_read:",
    ".global torture_read_insn",
    "torture_read_insn:",
    "    mov rax, [rdi]",
    ".global torture_read_resume",
    "torture_read_resume:",
    "    ret",
    ".global torture_write",
    "torture_write:",
    ".global torture_write_insn",
    "torture_write_insn:",
    "    mov [rdi], rsi",
    ".global torture_write_resume",
    "torture_write_resume:",
    "    ret",
    ".global torture_exec",
    "torture_exec:",
    "    call rdi",
    "    ret",
    ".popsection",
);

extern "C" {
    pub fn torture_read(address: u64) -> u64;
    pub fn torture_write(address: u64, value: u64);
    pub fn torture_exec(address: u64);
    fn torture_read_insn();
    fn torture_read_resume();
    fn torture_write_insn();
    fn torture_write_resume();
}

pub fn read_insn() -> u64 {
    torture_read_insn as *const () as u64
}
pub fn read_resume() -> u64 {
    torture_read_resume as *const () as u64
}
pub fn write_insn() -> u64 {
    torture_write_insn as *const () as u64
}
pub fn write_resume() -> u64 {
    torture_write_resume as *const () as u64
}

// ---- ring 3 ----------------------------------------------------------------------------------

/// The kernel RSP saved by `torture_enter_user`, where `torture_user_return` picks it up.
pub static KERNEL_RSP: Global<u64> = Global::new(0);

// torture_enter_user(rip, rsp): the ring-3 entry.
// 1. save the callee-saved registers and the kernel RSP (the INT 0x80 handler sends the task
//    back to `torture_user_return` on this stack);
// 2. build an IRETQ frame: SS = user data, RSP, RFLAGS = 0x2 (interrupts stay off), CS = user
//    code, RIP;
// 3. IRETQ to CPL 3.
// torture_user_return: reached by IRETQ from the INT 0x80 handler at CPL 0; restores the
// callee-saved registers and returns to the caller of torture_enter_user.
global_asm!(
    ".pushsection .text.torture_enter_user, \"ax\"",
    ".global torture_enter_user",
    "torture_enter_user:",
    "    push rbx",
    "    push rbp",
    "    push r12",
    "    push r13",
    "    push r14",
    "    push r15",
    "    mov [rip + {saved}], rsp",
    "    push {user_data}",
    "    push rsi",
    "    push 2",
    "    push {user_code}",
    "    push rdi",
    "    iretq",
    ".global torture_user_return",
    "torture_user_return:",
    "    mov rsp, [rip + {saved}]",
    "    pop r15",
    "    pop r14",
    "    pop r13",
    "    pop r12",
    "    pop rbp",
    "    pop rbx",
    "    ret",
    ".popsection",
    saved = sym KERNEL_RSP,
    user_data = const USER_DATA as u64,
    user_code = const USER_CODE as u64,
);

extern "C" {
    pub fn torture_enter_user(rip: u64, rsp: u64);
    fn torture_user_return();
}

pub fn user_return_address() -> u64 {
    torture_user_return as *const () as u64
}

/// Where the ring-3 task's pages are (virtual addresses in the test space; see main.rs).
pub mod user_layout {
    pub const DATA: u64 = crate::REGION + 18 * 4096;
    pub const SUPERVISOR: u64 = crate::REGION + 19 * 4096;
    pub const UNMAPPED: u64 = crate::REGION + 20 * 4096;
    pub const READ_ONLY: u64 = crate::REGION + 21 * 4096;
    pub const NO_EXECUTE: u64 = crate::REGION + 22 * 4096;
    /// A page whose PTE allows user access but whose PDE does not.
    pub const PDE_SUPERVISOR: u64 = crate::REGION + 2 * 0x20_0000 + 0x800;
    /// The image's first byte, identity-mapped by a supervisor 2 MiB page.
    pub const KERNEL_IMAGE: u64 = 0x10_0000;
}

// The ring-3 task: one page of its own (mapped user, read-only, executable at USER_CODE_VA).
// It uses only registers and the user_layout addresses. Each `torture_user_fN` instruction must
// fault; the kernel resumes at `torture_user_rN`. It ends with INT 0x80, RAX = 0x600D.
global_asm!(
    ".pushsection .text.torture_user, \"ax\"",
    ".balign 4096",
    ".global torture_user_start",
    "torture_user_start:",
    "    mov rbx, {data}",
    "    mov rax, [rbx]",          // read own data: ok
    "    add rax, 1",
    "    mov [rbx + 8], rax",      // write own data: ok
    "    push rax",                // own stack: ok
    "    pop rdx",
    "    call 3f",                 // call within the user code page: ok
    "    mov rcx, {supervisor}",
    ".global torture_user_f1",
    "torture_user_f1:",
    "    mov rax, [rcx]",          // #PF 5: read of a supervisor page
    ".global torture_user_r1",
    "torture_user_r1:",
    ".global torture_user_f2",
    "torture_user_f2:",
    "    mov [rcx], rdx",          // #PF 7: write of a supervisor page
    ".global torture_user_r2",
    "torture_user_r2:",
    "    mov rcx, {unmapped}",
    ".global torture_user_f3",
    "torture_user_f3:",
    "    mov rax, [rcx]",          // #PF 4: read, not present
    ".global torture_user_r3",
    "torture_user_r3:",
    ".global torture_user_f4",
    "torture_user_f4:",
    "    mov [rcx], rdx",          // #PF 6: write, not present
    ".global torture_user_r4",
    "torture_user_r4:",
    "    mov rcx, {read_only}",
    "    mov rax, [rcx]",          // read of a read-only user page: ok
    "    mov [rbx + 16], rax",
    ".global torture_user_f5",
    "torture_user_f5:",
    "    mov [rcx], rdx",          // #PF 7: write of a read-only user page
    ".global torture_user_r5",
    "torture_user_r5:",
    "    mov rcx, {pde_supervisor}",
    ".global torture_user_f6",
    "torture_user_f6:",
    "    mov rax, [rcx]",          // #PF 5: the PDE says supervisor
    ".global torture_user_r6",
    "torture_user_r6:",
    "    mov rcx, {no_execute}",
    ".global torture_user_f7",
    "torture_user_f7:",
    "    call rcx",                // #PF 0x15 at the target: fetch from an NX user page
    ".global torture_user_r7",
    "torture_user_r7:",
    ".global torture_user_f8",
    "torture_user_f8:",
    "    hlt",                     // #GP(0): privileged instruction
    ".global torture_user_r8",
    "torture_user_r8:",
    "    mov rcx, {kernel}",
    ".global torture_user_f9",
    "torture_user_f9:",
    "    mov rax, [rcx]",          // #PF 5: the kernel's identity map is supervisor
    ".global torture_user_r9",
    "torture_user_r9:",
    "    mov eax, 0x600D",
    "    int 0x80",
    "    ud2",
    "3:",
    "    mov qword ptr [rbx + 24], 0x5a5a",
    "    ret",
    ".balign 4096",
    ".popsection",
    data = const user_layout::DATA,
    supervisor = const user_layout::SUPERVISOR,
    unmapped = const user_layout::UNMAPPED,
    read_only = const user_layout::READ_ONLY,
    pde_supervisor = const user_layout::PDE_SUPERVISOR,
    no_execute = const user_layout::NO_EXECUTE,
    kernel = const user_layout::KERNEL_IMAGE,
);

extern "C" {
    fn torture_user_start();
    fn torture_user_f1();
    fn torture_user_r1();
    fn torture_user_f2();
    fn torture_user_r2();
    fn torture_user_f3();
    fn torture_user_r3();
    fn torture_user_f4();
    fn torture_user_r4();
    fn torture_user_f5();
    fn torture_user_r5();
    fn torture_user_f6();
    fn torture_user_r6();
    fn torture_user_f7();
    fn torture_user_r7();
    fn torture_user_f8();
    fn torture_user_r8();
    fn torture_user_f9();
    fn torture_user_r9();
}

/// The physical (= identity) address of the ring-3 task's code page.
pub fn user_code_page() -> u64 {
    torture_user_start as *const () as u64
}

/// The (fault, resume) label pairs of the ring-3 task, as image addresses, in order.
pub fn user_labels() -> [(u64, u64); 9] {
    let address = |f: unsafe extern "C" fn()| f as *const () as u64;
    [
        (address(torture_user_f1), address(torture_user_r1)),
        (address(torture_user_f2), address(torture_user_r2)),
        (address(torture_user_f3), address(torture_user_r3)),
        (address(torture_user_f4), address(torture_user_r4)),
        (address(torture_user_f5), address(torture_user_r5)),
        (address(torture_user_f6), address(torture_user_r6)),
        (address(torture_user_f7), address(torture_user_r7)),
        (address(torture_user_f8), address(torture_user_r8)),
        (address(torture_user_f9), address(torture_user_r9)),
    ]
}
