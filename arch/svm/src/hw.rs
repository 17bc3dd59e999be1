//! The SVM instructions: turning SVM on for this CPU and the world switch into a guest and
//! back. See: APM Vol 2 15.4 "Enabling SVM", 15.5 "VMRUN Instruction", 15.5.2 "VMSAVE and
//! VMLOAD Instructions", 15.17 "Global Interrupt Flag, STGI and CLGI".

use core::arch::global_asm;
use ringzero_x86::hw;

/// The guest's general-purpose registers that the VMCB does not hold (RAX, RSP, RIP and
/// RFLAGS live in its state save area). The field order is the world switch's offsets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestRegisters {
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
}

const _: () = assert!(core::mem::offset_of!(GuestRegisters, rdi) == 32);
const _: () = assert!(core::mem::offset_of!(GuestRegisters, r15) == 104);

/// IA32_EFER and its SVME bit. See: APM Vol 2 3.1.7.
const IA32_EFER: u32 = 0xC000_0080;
pub const EFER_SVME: u64 = 1 << 12;
/// VM_HSAVE_PA: where VMRUN keeps the host's state. See: APM Vol 2 15.30.4.
const VM_HSAVE_PA: u32 = 0xC001_0117;

// The world switch, as a function with the SysV ABI:
//   ringzero_svm_world_switch(registers: *mut GuestRegisters, guest_vmcb: u64, host_vmcb: u64)
// Step 1: save the host's callee-saved registers and arguments on the stack.
// Step 2: CLGI (nothing interrupts the switch from here), save the caller's RFLAGS and set IF:
//         with V_INTR_MASKING the host's IF at VMRUN (HIF) decides whether physical interrupts
//         are recognized while the guest runs, and so whether the INTR intercept can fire
//         (APM Vol 2 15.21.1). GIF = 0 holds any interrupt until STGI. Then VMSAVE the host's
//         hidden state (FS/GS/TR/LDTR, KernelGsBase, STAR, ...: what VMRUN does not switch)
//         into the host's own VMCB-format page.
// Step 3: load the guest's GPRs, VMLOAD the guest's hidden state, VMRUN (RAX = guest VMCB).
// Step 4: at #VMEXIT the CPU has restored RSP and RAX (= the guest VMCB address) from the
//         host save area: VMSAVE the guest's hidden state, store the guest's GPRs.
// Step 5: VMLOAD the host's hidden state, the caller's RFLAGS back (its IF: a physical
//         interrupt that made the exit stays pending until the host enables interrupts),
//         STGI, restore the host registers, return.
global_asm!(
    ".global ringzero_svm_world_switch",
    "ringzero_svm_world_switch:",
    "push rbx",
    "push rbp",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "push rdi",
    "push rsi",
    "push rdx",
    "clgi",
    "pushfq",
    "sti",
    "mov rax, rdx",
    "vmsave rax",
    "mov rax, rdi",
    "mov rbx, [rax + 0]",
    "mov rcx, [rax + 8]",
    "mov rdx, [rax + 16]",
    "mov rsi, [rax + 24]",
    "mov rbp, [rax + 40]",
    "mov r8, [rax + 48]",
    "mov r9, [rax + 56]",
    "mov r10, [rax + 64]",
    "mov r11, [rax + 72]",
    "mov r12, [rax + 80]",
    "mov r13, [rax + 88]",
    "mov r14, [rax + 96]",
    "mov r15, [rax + 104]",
    "mov rdi, [rax + 32]",
    "mov rax, [rsp + 16]",
    "vmload rax",
    "vmrun rax",
    "vmsave rax",
    "push rdi",
    "mov rdi, [rsp + 32]",
    "mov [rdi + 0], rbx",
    "mov [rdi + 8], rcx",
    "mov [rdi + 16], rdx",
    "mov [rdi + 24], rsi",
    "mov [rdi + 40], rbp",
    "mov [rdi + 48], r8",
    "mov [rdi + 56], r9",
    "mov [rdi + 64], r10",
    "mov [rdi + 72], r11",
    "mov [rdi + 80], r12",
    "mov [rdi + 88], r13",
    "mov [rdi + 96], r14",
    "mov [rdi + 104], r15",
    "pop rax",
    "mov [rdi + 32], rax",
    "mov rax, [rsp + 8]",
    "vmload rax",
    "popfq",
    "stgi",
    "add rsp, 24",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbp",
    "pop rbx",
    "ret",
);

unsafe extern "sysv64" {
    fn ringzero_svm_world_switch(registers: *mut GuestRegisters, guest_vmcb: u64, host_vmcb: u64);
}

/// Runs the guest until its next #VMEXIT.
///
/// # Safety
/// SVM is enabled on this CPU ([`enable`]); `guest_vmcb` is the physical address of a VMCB
/// whose state passes VMRUN's checks or whose failure is reported as VMEXIT_INVALID, with
/// intercepts that bring control back (VMRUN intercept set); `host_vmcb` is a 4 KiB page
/// reserved for the host's hidden state. The caller's RFLAGS (its IF) is kept; while the guest
/// runs, physical interrupts exit (INTR intercept) whatever the caller's IF, and one that did
/// stays pending for the host to take when it enables interrupts.
pub unsafe fn world_switch(registers: &mut GuestRegisters, guest_vmcb: u64, host_vmcb: u64) {
    // SAFETY: the caller guarantees the preconditions above; the assembly preserves every
    // callee-saved register and the stack.
    unsafe { ringzero_svm_world_switch(registers, guest_vmcb, host_vmcb) }
}

/// Turns SVM on for this CPU: EFER.SVME and the host save area.
///
/// # Safety
/// The CPU has SVM and VM_CR.SVMDIS is clear; `host_save_area` is a 4 KiB page reserved for
/// the CPU's whole time in SVM operation.
pub unsafe fn enable(host_save_area: u64) {
    // SAFETY: the caller guarantees SVM exists and the page is dedicated; setting SVME only
    // makes the SVM instructions legal.
    unsafe {
        let efer = hw::read_msr(IA32_EFER);
        hw::write_msr(IA32_EFER, efer | EFER_SVME);
        hw::write_msr(VM_HSAVE_PA, host_save_area);
    }
}
