//! The VMX instructions and the world switch. See: SDM Vol 3C chapter 31 "VMX Instruction
//! Reference" (VMCLEAR, VMPTRLD, VMPTRST, VMREAD, VMWRITE, VMLAUNCH/VMRESUME, INVEPT, INVVPID) and 31.2
//! for how they report failure (CF = VMfailInvalid, ZF = VMfailValid).

use crate::vmcs::{self, Field};
use core::arch::{asm, global_asm};
pub use ringzero_x86::hw::VmxInstructionError;

fn result(rflags: u64) -> Result<(), VmxInstructionError> {
    if rflags & 1 != 0 {
        Err(VmxInstructionError::FailInvalid)
    } else if rflags & (1 << 6) != 0 {
        Err(VmxInstructionError::FailValid)
    } else {
        Ok(())
    }
}

/// VMCLEAR: flushes a VMCS to memory and marks it clear (launch state "clear").
///
/// # Safety
/// VMX is on; `vmcs` is the physical address of a 4 KiB VMCS region with the right revision.
pub unsafe fn vmclear(vmcs: u64) -> Result<(), VmxInstructionError> {
    let rflags: u64;
    // SAFETY: the caller guarantees VMX operation and a valid region.
    unsafe { asm!("vmclear [{0}]", "pushfq", "pop {1}", in(reg) &vmcs, lateout(reg) rflags) };
    result(rflags)
}

/// VMPTRLD: makes a VMCS the current one.
///
/// # Safety
/// As for [`vmclear`].
pub unsafe fn vmptrld(vmcs: u64) -> Result<(), VmxInstructionError> {
    let rflags: u64;
    // SAFETY: the caller guarantees VMX operation and a valid region.
    unsafe { asm!("vmptrld [{0}]", "pushfq", "pop {1}", in(reg) &vmcs, lateout(reg) rflags) };
    result(rflags)
}

/// VMPTRST: the physical address of the current VMCS, or all ones when none is current.
/// See: SDM Vol 3C 31.3 "VMPTRST".
pub fn vmptrst() -> u64 {
    let mut current: u64 = u64::MAX;
    // SAFETY: VMPTRST only stores the current-VMCS pointer into the local given; it is legal in
    // VMX root operation at CPL 0, where every caller of this crate runs.
    unsafe { asm!("vmptrst [{0}]", in(reg) &mut current, options(nostack)) };
    current
}

/// VMREAD of a field of the current VMCS (0 when it fails: every field read is architectural).
pub fn vmread(field: Field) -> u64 {
    let value: u64;
    // SAFETY: VMREAD only reads the current VMCS; with no current VMCS or an unsupported field
    // it fails with flags set and leaves the destination unchanged (initialised to 0 here).
    unsafe {
        asm!("xor {0}, {0}", "vmread {0}, {1}", out(reg) value, in(reg) u64::from(field.0), options(nostack))
    };
    value
}

/// VMWRITE of a field of the current VMCS.
///
/// # Safety
/// A VMCS is current and owned by the caller; the value is valid for the field (bad values
/// make the next VM entry fail, which is reported, but host-state fields must be right).
pub unsafe fn vmwrite(field: Field, value: u64) -> Result<(), VmxInstructionError> {
    let rflags: u64;
    // SAFETY: the caller guarantees a current VMCS it owns.
    unsafe {
        asm!("vmwrite {0}, {1}", "pushfq", "pop {2}", in(reg) u64::from(field.0), in(reg) value, lateout(reg) rflags)
    };
    result(rflags)
}

/// INVEPT single-context (type 1) or all-context (type 2). See: SDM Vol 3C 31.3 "INVEPT".
///
/// # Safety
/// VMX is on and the CPU supports the type.
pub unsafe fn invept(kind: u64, ept_pointer: u64) -> Result<(), VmxInstructionError> {
    let descriptor: [u64; 2] = [ept_pointer, 0];
    let rflags: u64;
    // SAFETY: the caller guarantees VMX operation and support for the type.
    unsafe {
        asm!("invept {0}, [{1}]", "pushfq", "pop {2}", in(reg) kind, in(reg) &descriptor, lateout(reg) rflags)
    };
    result(rflags)
}

/// INVVPID single-context (type 1) or all-context (type 2). See: SDM Vol 3C 31.3 "INVVPID".
///
/// # Safety
/// VMX is on and the CPU supports the type.
pub unsafe fn invvpid(kind: u64, vpid: u16) -> Result<(), VmxInstructionError> {
    let descriptor: [u64; 2] = [u64::from(vpid), 0];
    let rflags: u64;
    // SAFETY: the caller guarantees VMX operation and support for the type.
    unsafe {
        asm!("invvpid {0}, [{1}]", "pushfq", "pop {2}", in(reg) kind, in(reg) &descriptor, lateout(reg) rflags)
    };
    result(rflags)
}

/// The guest's general-purpose registers (the VMCS holds RSP, RIP and RFLAGS). The field
/// order is the world switch's offsets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestRegisters {
    pub rax: u64,
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

const _: () = assert!(core::mem::offset_of!(GuestRegisters, rdi) == 40);
const _: () = assert!(core::mem::offset_of!(GuestRegisters, r15) == 112);

// The world switch, SysV ABI:
//   ringzero_vmx_world_switch(registers: *mut GuestRegisters, launched: u64) -> u64
// returns 0 after a VM exit, 1 when VMLAUNCH/VMRESUME failed with VMfailInvalid, 2 with
// VMfailValid (the VM-instruction error field says why).
// Step 1: save the host's callee-saved registers and the registers pointer on the stack, and
//         tell the VMCS where the host stack and the exit path are (HOST_RSP, HOST_RIP).
// Step 2: load the guest's GPRs; VMRESUME if this VMCS was launched before, else VMLAUNCH.
// Step 3 (failure): fall through, restore the host registers, return 1 or 2.
// Step 4 (VM exit): the CPU loads RSP = HOST_RSP and jumps to HOST_RIP; store the guest's GPRs
//         through the saved pointer, restore the host registers, return 0.
global_asm!(
    ".global ringzero_vmx_world_switch",
    "ringzero_vmx_world_switch:",
    "push rbx",
    "push rbp",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "push rdi",
    "mov rax, {host_rsp}",
    "vmwrite rax, rsp",
    "mov rax, {host_rip}",
    "lea rbx, [rip + 2f]",
    "vmwrite rax, rbx",
    "test rsi, rsi",
    "mov rax, [rdi + 0]",
    "mov rbx, [rdi + 8]",
    "mov rcx, [rdi + 16]",
    "mov rdx, [rdi + 24]",
    "mov rsi, [rdi + 32]",
    "mov rbp, [rdi + 48]",
    "mov r8, [rdi + 56]",
    "mov r9, [rdi + 64]",
    "mov r10, [rdi + 72]",
    "mov r11, [rdi + 80]",
    "mov r12, [rdi + 88]",
    "mov r13, [rdi + 96]",
    "mov r14, [rdi + 104]",
    "mov r15, [rdi + 112]",
    "mov rdi, [rdi + 40]",
    "jnz 3f",
    "vmlaunch",
    "jmp 4f",
    "3:",
    "vmresume",
    "4:",
    // Step 3: the entry instruction failed: CF or ZF tells which.
    "mov eax, 1",
    "mov ecx, 2",
    "cmovz eax, ecx",
    "add rsp, 8",
    "jmp 5f",
    // Step 4: VM exit.
    "2:",
    "push rax",
    "mov rax, [rsp + 8]",
    "mov [rax + 8], rbx",
    "mov [rax + 16], rcx",
    "mov [rax + 24], rdx",
    "mov [rax + 32], rsi",
    "mov [rax + 40], rdi",
    "mov [rax + 48], rbp",
    "mov [rax + 56], r8",
    "mov [rax + 64], r9",
    "mov [rax + 72], r10",
    "mov [rax + 80], r11",
    "mov [rax + 88], r12",
    "mov [rax + 96], r13",
    "mov [rax + 104], r14",
    "mov [rax + 112], r15",
    "pop rbx",
    "mov [rax + 0], rbx",
    "add rsp, 8",
    "xor eax, eax",
    "5:",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbp",
    "pop rbx",
    "ret",
    host_rsp = const vmcs::HOST_RSP.0,
    host_rip = const vmcs::HOST_RIP.0,
);

unsafe extern "sysv64" {
    fn ringzero_vmx_world_switch(registers: *mut GuestRegisters, launched: u64) -> u64;
}

/// How an entry attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryOutcome {
    /// The guest ran and exited: read the exit reason.
    Exited,
    /// VMLAUNCH/VMRESUME itself failed.
    Failed(VmxInstructionError),
}

/// Enters the guest of the current VMCS and returns at its next exit.
///
/// # Safety
/// VMX is on; the current VMCS has complete host state (everything but HOST_RSP/HOST_RIP, which
/// this function writes) describing the running hypervisor; `launched` tells whether
/// VMLAUNCH already succeeded on this VMCS. Host interrupts are off.
pub unsafe fn world_switch(registers: &mut GuestRegisters, launched: bool) -> EntryOutcome {
    // SAFETY: the caller guarantees the preconditions; the assembly preserves the callee-saved
    // registers and the stack.
    match unsafe { ringzero_vmx_world_switch(registers, u64::from(launched)) } {
        0 => EntryOutcome::Exited,
        1 => EntryOutcome::Failed(VmxInstructionError::FailInvalid),
        _ => EntryOutcome::Failed(VmxInstructionError::FailValid),
    }
}

/// The host state the VMCS needs: this CPU's current selectors and descriptor-table bases.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostSegments {
    pub cs: u16,
    pub ss: u16,
    pub ds: u16,
    pub es: u16,
    pub fs: u16,
    pub gs: u16,
    pub tr: u16,
    pub gdtr_base: u64,
    pub idtr_base: u64,
    pub tr_base: u64,
}

/// Reads the running CPU's selectors, GDTR/IDTR and the TSS base (from its GDT descriptor).
pub fn host_segments() -> HostSegments {
    let mut segments = HostSegments::default();
    let mut gdtr = [0u8; 10];
    let mut idtr = [0u8; 10];
    // SAFETY: these instructions only read segment registers and descriptor-table registers
    // into the locals given.
    unsafe {
        asm!("mov {0:x}, cs", out(reg) segments.cs, options(nomem, nostack));
        asm!("mov {0:x}, ss", out(reg) segments.ss, options(nomem, nostack));
        asm!("mov {0:x}, ds", out(reg) segments.ds, options(nomem, nostack));
        asm!("mov {0:x}, es", out(reg) segments.es, options(nomem, nostack));
        asm!("mov {0:x}, fs", out(reg) segments.fs, options(nomem, nostack));
        asm!("mov {0:x}, gs", out(reg) segments.gs, options(nomem, nostack));
        asm!("str {0:x}", out(reg) segments.tr, options(nomem, nostack));
        asm!("sgdt [{0}]", in(reg) gdtr.as_mut_ptr(), options(nostack));
        asm!("sidt [{0}]", in(reg) idtr.as_mut_ptr(), options(nostack));
    }
    segments.gdtr_base = u64::from_le_bytes(gdtr[2..10].try_into().unwrap_or([0; 8]));
    segments.idtr_base = u64::from_le_bytes(idtr[2..10].try_into().unwrap_or([0; 8]));
    // A 64-bit TSS descriptor is 16 bytes: base 15:0 at bytes 2-3, 23:16 at byte 4, 31:24 at
    // byte 7, 63:32 at bytes 8-11. See: SDM Vol 3A 8.2.3.
    let descriptor = (segments.gdtr_base + u64::from(segments.tr & !7)) as *const u8;
    let mut bytes = [0u8; 16];
    // SAFETY: TR names a descriptor inside the live GDT, which the hypervisor mapped.
    unsafe { core::ptr::copy_nonoverlapping(descriptor, bytes.as_mut_ptr(), 16) };
    segments.tr_base = u64::from(bytes[2])
        | (u64::from(bytes[3]) << 8)
        | (u64::from(bytes[4]) << 16)
        | (u64::from(bytes[7]) << 24)
        | (u64::from(u32::from_le_bytes([
            bytes[8], bytes[9], bytes[10], bytes[11],
        ])) << 32);
    segments
}
