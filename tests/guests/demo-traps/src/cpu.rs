//! All of demo-traps' inline assembly: the hypercall instruction (VMMCALL or VMCALL), the
//! privileged instructions the demo executes in ring 0, its own page tables (identity map with
//! the user bit set, so that its ring-3 task can run from the same image), descriptor tables (GDT
//! with ring-3 segments and a TSS, IDT), the exception entry stubs, the ring-3 entry/return path
//! and the ring-3 task itself, whose privileged instructions carry labels so that the kernel
//! knows where each one faults and where to resume.
//!
//! See: Intel SDM Vol 3A (2.5 control registers, 4.5 4-level paging, 5.9 privileged
//! instructions, 6.12-6.14 64-bit IDT and exception frames, 7.7 64-bit TSS); Vol 2 for the
//! instructions; AMD APM Vol 3 (VMMCALL).

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;

/// A global of a single-CPU program with interrupts off, accessed with volatile reads and writes
/// so that values the exception handler changes are never cached in registers. Transparent:
/// the ring-3 task reads `DEMO_IS_AMD` and `DEMO_KERNEL_CR3` by their symbols.
#[repr(transparent)]
pub struct Global<T>(UnsafeCell<T>);

// SAFETY: one CPU; the only other "thread" is the exception handler, which runs synchronously
// inside an instruction of the main flow and uses volatile accesses too.
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
        // SAFETY: see the Sync impl.
        unsafe { core::ptr::read_volatile(self.0.get()) }
    }
    pub fn set(&self, value: T) {
        // SAFETY: see the Sync impl.
        unsafe { core::ptr::write_volatile(self.0.get(), value) }
    }
}

/// Kernel code, kernel data, user data (DPL 3), user code (DPL 3), TSS (two slots).
pub const KERNEL_CODE: u16 = 0x08;
pub const KERNEL_DATA: u16 = 0x10;
pub const USER_DATA: u16 = 0x18 | 3;
pub const USER_CODE: u16 = 0x20 | 3;
pub const TSS_SELECTOR: u16 = 0x28;
/// INT 0x80: the ring-3 task is done (back to the kernel). DPL 3.
pub const EXIT_VECTOR: u64 = 0x80;
/// INT 0x81: the ring-3 task reports (RDI = event). DPL 3.
pub const REPORT_VECTOR: u64 = 0x81;

/// 1 when the CPU is AMD (VMMCALL), 0 when Intel (VMCALL). Read by the ring-3 task too.
#[no_mangle]
pub static DEMO_IS_AMD: Global<u8> = Global::new(1);
/// The CR3 the ring-3 task tries to load (it faults before loading anything).
#[no_mangle]
pub static DEMO_KERNEL_CR3: Global<u64> = Global::new(0);

// ---- hypercalls -----------------------------------------------------------------------------

/// The registers a hypercall returns (docs/hypercalls.md).
#[derive(Clone, Copy, Debug)]
pub struct HypercallResult {
    pub rax: u64,
    pub rbx: u64,
}

/// One hypercall: RAX = `number`, RBX, RCX, RDX, RSI = `arguments`; VMMCALL on AMD, VMCALL on
/// Intel (the other vendor's instruction is #UD).
pub fn hypercall(number: u64, arguments: [u64; 4]) -> HypercallResult {
    let (rax, rbx): (u64, u64);
    // SAFETY: the hypercall reads guest memory (CONSOLE_WRITE) but changes only the registers
    // declared here. RBX is reserved by LLVM: swapped with a scratch register around the call.
    unsafe {
        if DEMO_IS_AMD.get() != 0 {
            asm!(
                "xchg {b}, rbx",
                "vmmcall",
                "xchg {b}, rbx",
                b = inout(reg) arguments[0] => rbx,
                inout("rax") number => rax,
                inout("rcx") arguments[1] => _,
                inout("rdx") arguments[2] => _,
                inout("rsi") arguments[3] => _,
                options(nostack),
            );
        } else {
            asm!(
                "xchg {b}, rbx",
                "vmcall",
                "xchg {b}, rbx",
                b = inout(reg) arguments[0] => rbx,
                inout("rax") number => rax,
                inout("rcx") arguments[1] => _,
                inout("rdx") arguments[2] => _,
                inout("rsi") arguments[3] => _,
                options(nostack),
            );
        }
    }
    HypercallResult { rax, rbx }
}

/// The hypercall instruction's name on this CPU.
pub fn hypercall_name() -> &'static str {
    if DEMO_IS_AMD.get() != 0 {
        "vmmcall"
    } else {
        "vmcall"
    }
}

// ---- privileged instructions, ring 0 --------------------------------------------------------

pub fn read_cr2() -> u64 {
    let value: u64;
    // SAFETY: reading CR2 has no side effects (CPL 0).
    unsafe { asm!("mov {}, cr2", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

pub fn read_cr3() -> u64 {
    let value: u64;
    // SAFETY: reading CR3 has no side effects (CPL 0).
    unsafe { asm!("mov {}, cr3", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

/// Loads CR3 (flushes the non-global TLB entries). See: SDM Vol 3A 4.10.4.1.
///
/// # Safety
/// `pml4` must map this program's code, data and stack at their identity addresses.
pub unsafe fn write_cr3(pml4: u64) {
    // SAFETY: the caller's contract. No `nomem`: memory accesses must not move across it.
    unsafe { asm!("mov cr3, {}", in(reg) pml4, options(nostack, preserves_flags)) };
}

/// Drops the TLB entry of the page holding `address`. See: SDM Vol 3A 4.10.4.1.
pub fn invlpg(address: u64) {
    // SAFETY: INVLPG only drops cached translations.
    unsafe { asm!("invlpg [{}]", in(reg) address, options(nostack, preserves_flags)) };
}

/// WRMSR of `msr` with `value`.
///
/// # Safety
/// The write must not change anything the program relies on (the demo writes IA32_APIC_BASE
/// with the value it just read).
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the caller's contract.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
             options(nostack, preserves_flags))
    };
}

// demo_wrmsr_tsc(): WRMSR IA32_TIME_STAMP_COUNTER (0x10) with 0 at the label demo_wrmsr_tsc_insn.
// The hypervisor refuses it and injects #GP(0); the guest's #GP handler resumes at
// demo_wrmsr_tsc_resume (the WRMSR is 2 bytes, 0F 30).
global_asm!(
    ".pushsection .text.demo_wrmsr_tsc, \"ax\"",
    ".global demo_wrmsr_tsc",
    "demo_wrmsr_tsc:",
    "    mov ecx, 0x10",
    "    xor eax, eax",
    "    xor edx, edx",
    ".global demo_wrmsr_tsc_insn",
    "demo_wrmsr_tsc_insn:",
    "    wrmsr",
    ".global demo_wrmsr_tsc_resume",
    "demo_wrmsr_tsc_resume:",
    "    ret",
    ".popsection",
);

extern "C" {
    fn demo_wrmsr_tsc();
    fn demo_wrmsr_tsc_insn();
    fn demo_wrmsr_tsc_resume();
}

/// Executes WRMSR 0x10 (faulting and resumed by the #GP handler, if all goes as planned).
pub fn wrmsr_tsc() {
    // SAFETY: the routine clobbers only RAX, RCX, RDX (declared by the C ABI as caller-saved).
    unsafe { demo_wrmsr_tsc() }
}

/// (fault RIP, resume RIP) of `wrmsr_tsc`.
pub fn wrmsr_tsc_labels() -> (u64, u64) {
    (
        demo_wrmsr_tsc_insn as *const () as u64,
        demo_wrmsr_tsc_resume as *const () as u64,
    )
}

// ---- page tables ----------------------------------------------------------------------------

#[repr(C, align(4096))]
struct Tables([[u64; 512]; 6]);

static TABLES: Global<Tables> = Global::new(Tables([[0; 512]; 6]));

/// Builds the demo's own page tables: [0, 4 GiB) identity-mapped with 2 MiB pages like the boot
/// tables, but with the user bit (U/S) set at every level, so that the ring-3 task may run the
/// image's code and use its data. (A real kernel would map only the task's own pages as user;
/// here the point is which *instructions* fault, not which pages.) Returns the PML4's address.
pub fn build_page_tables() -> u64 {
    const PRESENT_WRITABLE_USER: u64 = 0x7;
    const LARGE: u64 = 1 << 7;
    // SAFETY: one CPU; nothing else references TABLES; the tables are not in use yet.
    let tables = unsafe { &mut *TABLES.pointer() };
    let base = tables as *mut Tables as u64;
    let [pml4, pdpt, directories @ ..] = &mut tables.0;
    pml4[0] = (base + 4096) | PRESENT_WRITABLE_USER;
    for (gib, directory) in directories.iter_mut().enumerate() {
        pdpt[gib] = (base + 4096 * (2 + gib as u64)) | PRESENT_WRITABLE_USER;
        for (index, entry) in directory.iter_mut().enumerate() {
            let physical = ((gib as u64) << 30) | ((index as u64) << 21);
            *entry = physical | LARGE | PRESENT_WRITABLE_USER;
        }
    }
    base
}

// ---- descriptor tables ----------------------------------------------------------------------

/// 64-bit TSS as 32-bit words (RSP0 sits at byte 4, unaligned for a u64). See: SDM Vol 3A 7.7.
#[repr(C, align(16))]
struct Tss([u32; 26]);
#[repr(C, align(16))]
struct Gdt([u64; 7]);
#[repr(C, align(16))]
struct Idt([u64; 2 * 256]);
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

/// Loads the demo's GDT (kernel and user segments, TSS with RSP0 = the trap stack), reloads
/// CS/SS/DS/ES, loads TR, then the IDT: interrupt gates (DPL 0) for exceptions 0-31, and DPL-3
/// gates for INT 0x80 and INT 0x81, the ring-3 task's only ways into the kernel.
pub fn install_descriptor_tables() {
    let tss_base = TSS.pointer() as u64;
    let rsp0 = TRAP_STACK.pointer() as u64 + core::mem::size_of::<TrapStack>() as u64;
    // SAFETY: one CPU; nothing else holds references into these statics.
    unsafe {
        let tss = &mut *TSS.pointer();
        tss.0[1] = rsp0 as u32; // RSP0 low
        tss.0[2] = (rsp0 >> 32) as u32; // RSP0 high
        tss.0[25] = 104 << 16; // I/O map base beyond the limit: no I/O bitmap, IN/OUT need IOPL
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
        let stubs = &*core::ptr::addr_of!(demo_isr_table);
        for (index, &stub) in stubs.iter().enumerate() {
            let (vector, attributes): (usize, u64) = match index {
                0..=31 => (index, 0x8E),             // interrupt gate, DPL 0
                32 => (EXIT_VECTOR as usize, 0xEE),  // interrupt gate, DPL 3
                _ => (REPORT_VECTOR as usize, 0xEE), // interrupt gate, DPL 3
            };
            idt.0[2 * vector] = (stub & 0xFFFF)
                | u64::from(KERNEL_CODE) << 16
                | attributes << 40
                | ((stub >> 16) & 0xFFFF) << 48;
            idt.0[2 * vector + 1] = stub >> 32;
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

// ---- exception entry ------------------------------------------------------------------------

/// What the entry stubs push (general registers, R15 last), the vector, the error code (0 for
/// vectors without one), then the CPU's frame. See: SDM Vol 3A 6.14.2.
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
    /// Entry stub addresses: vectors 0-31, then INT 0x80, then INT 0x81.
    static demo_isr_table: [u64; 34];
}

// Vectors with an error code (8, 10-14, 17, 21, 29, 30) skip the dummy push. The common path
// saves every general register, calls `trap(frame)` on a 16-byte-aligned stack, restores the
// (possibly edited) registers and returns with IRETQ.
global_asm!(
    ".pushsection .text.demo_isr, \"ax\"",
    ".irp v, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31,128,129",
    "demo_isr_\\v:",
    "    push 0",
    "    push \\v",
    "    jmp demo_isr_common",
    ".endr",
    ".irp v, 8,10,11,12,13,14,17,21,29,30",
    "demo_isr_\\v:",
    "    push \\v",
    "    jmp demo_isr_common",
    ".endr",
    "demo_isr_common:",
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
    ".pushsection .rodata.demo_isr_table, \"a\"",
    ".balign 8",
    ".global demo_isr_table",
    "demo_isr_table:",
    ".irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,128,129",
    "    .quad demo_isr_\\v",
    ".endr",
    ".popsection",
    trap = sym crate::trap,
);

// ---- ring 3 ---------------------------------------------------------------------------------

/// The kernel RSP saved by `demo_enter_user`, where `demo_user_return` picks it up.
pub static KERNEL_RSP: Global<u64> = Global::new(0);

#[repr(C, align(16))]
struct UserStack([u8; 8192]);
static USER_STACK: Global<UserStack> = Global::new(UserStack([0; 8192]));

// demo_enter_user(rip, rsp): the way down to ring 3.
// 1. save the callee-saved registers and the kernel RSP (the INT 0x80 handler sends the CPU
//    back to `demo_user_return` on this stack);
// 2. build the frame IRETQ pops: SS = user data, RSP, RFLAGS = 0x2 (IOPL 0, interrupts off),
//    CS = user code, RIP;
// 3. IRETQ: the CPU loads CS with RPL 3, so CPL becomes 3.
// demo_user_return: reached by IRETQ from the INT 0x80 handler at CPL 0; restores the
// callee-saved registers and returns to the caller of demo_enter_user.
global_asm!(
    ".pushsection .text.demo_enter_user, \"ax\"",
    ".global demo_enter_user",
    "demo_enter_user:",
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
    ".global demo_user_return",
    "demo_user_return:",
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
    fn demo_enter_user(rip: u64, rsp: u64);
    fn demo_user_return();
}

pub fn user_return_address() -> u64 {
    demo_user_return as *const () as u64
}

/// Events the ring-3 task reports with INT 0x81 (RDI).
pub mod event {
    /// 0..=6: "about to execute" step N (see `USER_STEPS` in main.rs).
    pub const CPUID_RESULT: u64 = 100;
    pub const HYPERCALL_RESULT: u64 = 101;
}

// The ring-3 task. Before each instruction it reports "about to execute" with INT 0x81
// (RDI = step). Steps 0-4 are privileged: each must raise #GP inside the guest; the kernel's
// handler resumes at the matching demo_user_rN label. Step 5 is CPUID (reported with RDI = 100),
// step 6 the hypercall instruction with RAX = 0 (VERSION; reported with RDI = 101). INT 0x80
// with RAX = 0x600D ends the task.
global_asm!(
    ".pushsection .text.demo_user, \"ax\"",
    ".global demo_user_start",
    "demo_user_start:",
    "    mov edi, 0",
    "    int 0x81",
    ".global demo_user_f0",
    "demo_user_f0:",
    "    hlt", // 1 byte: F4
    ".global demo_user_r0",
    "demo_user_r0:",
    "    mov edi, 1",
    "    int 0x81",
    ".global demo_user_f1",
    "demo_user_f1:",
    "    cli", // 1 byte: FA
    ".global demo_user_r1",
    "demo_user_r1:",
    "    mov edi, 2",
    "    int 0x81",
    "    mov dx, 0x3FF",
    "    mov al, 0x33",
    ".global demo_user_f2",
    "demo_user_f2:",
    "    out dx, al", // 1 byte: EE
    ".global demo_user_r2",
    "demo_user_r2:",
    "    mov edi, 3",
    "    int 0x81",
    "    mov rax, [rip + DEMO_KERNEL_CR3]",
    ".global demo_user_f3",
    "demo_user_f3:",
    "    mov cr3, rax", // 3 bytes: 0F 22 D8
    ".global demo_user_r3",
    "demo_user_r3:",
    "    mov edi, 4",
    "    int 0x81",
    "    mov ecx, 0x1B",
    "    mov eax, 0xFEE00900",
    "    xor edx, edx",
    ".global demo_user_f4",
    "demo_user_f4:",
    "    wrmsr", // 2 bytes: 0F 30
    ".global demo_user_r4",
    "demo_user_r4:",
    "    mov edi, 5",
    "    int 0x81",
    "    xor eax, eax",
    "    xor ecx, ecx",
    "    cpuid", // exits to the hypervisor; no fault
    "    mov edi, 100",
    "    int 0x81",
    "    mov edi, 6",
    "    int 0x81",
    "    xor eax, eax",
    "    xor ebx, ebx",
    "    cmp byte ptr [rip + DEMO_IS_AMD], 0",
    "    je 1f",
    "    vmmcall",
    "    jmp 2f",
    "1:  vmcall",
    "2:  mov edi, 101",
    "    int 0x81",
    "    mov eax, 0x600D",
    "    int 0x80",
    "    ud2",
    ".popsection",
);

extern "C" {
    fn demo_user_start();
    fn demo_user_f0();
    fn demo_user_r0();
    fn demo_user_f1();
    fn demo_user_r1();
    fn demo_user_f2();
    fn demo_user_r2();
    fn demo_user_f3();
    fn demo_user_r3();
    fn demo_user_f4();
    fn demo_user_r4();
}

/// The (fault, resume) label pairs of the ring-3 task's privileged steps 0-4.
pub fn user_labels() -> [(u64, u64); 5] {
    let address = |f: unsafe extern "C" fn()| f as *const () as u64;
    [
        (address(demo_user_f0), address(demo_user_r0)),
        (address(demo_user_f1), address(demo_user_r1)),
        (address(demo_user_f2), address(demo_user_r2)),
        (address(demo_user_f3), address(demo_user_r3)),
        (address(demo_user_f4), address(demo_user_r4)),
    ]
}

/// Runs the ring-3 task until its INT 0x80. Needs `install_descriptor_tables` and page tables
/// that let ring 3 use the image and the user stack.
pub fn run_user_task() {
    let stack_top = USER_STACK.pointer() as u64 + core::mem::size_of::<UserStack>() as u64;
    // SAFETY: the IDT's INT 0x80 gate brings the CPU back to demo_user_return with the kernel
    // RSP and callee-saved registers demo_enter_user saved; caller-saved registers are
    // clobbered as for any call.
    unsafe { demo_enter_user(demo_user_start as *const () as u64, stack_top) }
}
