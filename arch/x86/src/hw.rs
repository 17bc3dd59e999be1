//! Every privileged x86-64 instruction the hypervisor executes directly, in one place.
//!
//! Manuals cited: Intel SDM (Intel 64 and IA-32 Architectures Software Developer's Manual,
//! order 325462, rev. 084) and AMD APM (AMD64 Architecture Programmer's Manual, pub. 24593,
//! rev. 3.42). Wrappers from the `x86_64` crate are used where it has them (control registers,
//! MSRs, ports); only what it lacks (VMXON/VMXOFF, CR2, FXSAVE/FXRSTOR, XSAVE/XRSTOR and
//! XSETBV/XGETBV, the STI windows) is written here with `asm!`, and the application
//! processors' real-mode start-up code (`global_asm!`) lives in [`ap_trampoline`].
//!
//! Every function here is `unsafe` or documents why it is safe: each executes an instruction
//! that can fault or change machine state for the whole CPU.

use core::arch::asm;
use x86_64::registers::control::{Cr0, Cr0Flags, Cr4, Cr4Flags};
use x86_64::registers::model_specific::Msr;
use x86_64::structures::port::{PortRead, PortWrite};

pub mod ap_trampoline;

/// The result of one CPUID query.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidResult {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// Executes CPUID with EAX = `leaf`, ECX = `subleaf`. See: SDM Vol 2A 3.3 "CPUID".
pub fn cpuid(leaf: u32, subleaf: u32) -> CpuidResult {
    let result = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    CpuidResult {
        eax: result.eax,
        ebx: result.ebx,
        ecx: result.ecx,
        edx: result.edx,
    }
}

/// CPUID as `[eax, ebx, ecx, edx]`: the form the VM core's CPUID policies take their host
/// answers in (`host(leaf, subleaf)`).
pub fn cpuid_words(leaf: u32, subleaf: u32) -> [u32; 4] {
    let result = cpuid(leaf, subleaf);
    [result.eax, result.ebx, result.ecx, result.edx]
}

/// Reads the time-stamp counter. See: SDM Vol 2B 4.3 "RDTSC".
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC reads a counter; it has no side effects and cannot fault at CPL 0.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Reads a model-specific register. See: SDM Vol 2B 4.3 "RDMSR".
///
/// # Safety
/// The MSR must exist on this CPU (otherwise #GP); the caller checks CPUID or a capability
/// MSR first.
pub unsafe fn read_msr(msr: u32) -> u64 {
    // SAFETY: the caller guarantees the MSR exists.
    unsafe { Msr::new(msr).read() }
}

/// Writes a model-specific register. See: SDM Vol 2B 4.3 "WRMSR".
///
/// # Safety
/// The MSR must exist and the value must be valid for it; writing it must not break the
/// invariants of the running hypervisor (e.g. EFER.LME).
pub unsafe fn write_msr(msr: u32, value: u64) {
    // SAFETY: the caller guarantees the MSR exists and the value is harmless.
    unsafe { Msr::new(msr).write(value) }
}

/// Reads CR0.
pub fn read_cr0() -> u64 {
    Cr0::read_raw()
}

/// Writes CR0.
///
/// # Safety
/// The value must keep paging and protection on (the hypervisor runs in long mode).
pub unsafe fn write_cr0(value: u64) {
    // SAFETY: the caller keeps PE, PG and the other bits long mode needs.
    unsafe { Cr0::write_raw(value) }
}

/// Writes CR2 (the page-fault address register).
///
/// # Safety
/// Only the meaning of the next page-fault report changes; used to give a guest the CR2 of a
/// page fault the hypervisor injects (VMX keeps the guest's CR2 in the real register).
pub unsafe fn write_cr2(value: u64) {
    // SAFETY: CR2 holds no state the hypervisor depends on.
    unsafe { core::arch::asm!("mov cr2, {0}", in(reg) value, options(nomem, nostack)) };
}

/// Reads CR2 (the page-fault address register). VMX leaves the guest's CR2 in the real register,
/// so a vCPU switch saves it with this and gives it back with [`write_cr2`].
pub fn read_cr2() -> u64 {
    let value: u64;
    // SAFETY: reading CR2 has no side effect; the hypervisor runs at CPL 0.
    unsafe { core::arch::asm!("mov {0}, cr2", out(reg) value, options(nomem, nostack)) };
    value
}

/// The x87/MMX/SSE register image FXSAVE writes and FXRSTOR reads: 512 bytes, 16-byte aligned.
/// A guest's FPU and SSE registers live in the real registers while it runs (the hypervisor,
/// built soft-float, never touches them), so a vCPU switch saves and restores this image.
/// See: SDM Vol 1 10.5.1 "FXSAVE Area", Vol 2A "FXSAVE".
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FpuState(pub [u8; 512]);

impl FpuState {
    /// Overwrites the image with zeros (volatile writes the compiler keeps), so a guest's
    /// register contents do not linger in the hypervisor's memory once its vCPU is gone.
    pub fn erase(&mut self) {
        for byte in self.0.iter_mut() {
            // SAFETY: `byte` is a valid, exclusive reference into the image.
            unsafe { core::ptr::write_volatile(byte, 0) };
        }
    }

    /// The state a new vCPU starts with, as after FNINIT with SSE's default MXCSR: FCW 0x037F
    /// (bytes 0-1), every x87 register empty (abridged tag byte 4 = 0), MXCSR 0x1F80 (bytes
    /// 24-27: every SIMD exception masked), all data registers 0. See: SDM Vol 1 8.1.5, 10.2.3.3.
    pub const fn initial() -> FpuState {
        let mut image = [0u8; 512];
        image[0] = 0x7F;
        image[1] = 0x03;
        image[24] = 0x80;
        image[25] = 0x1F;
        FpuState(image)
    }
}

impl Default for FpuState {
    fn default() -> FpuState {
        FpuState::initial()
    }
}

/// Runs `body` with FXSAVE/FXRSTOR usable and covering the XMM registers: CR0.EM and CR0.TS
/// clear (else #UD / #NM), CR4.OSFXSR set (else the XMM registers and MXCSR may be left out);
/// CR0 and CR4 are given back afterwards. See: SDM Vol 2A "FXSAVE" (exceptions, "Operation").
fn with_fxsr_usable(body: impl FnOnce()) {
    let cr0 = Cr0::read_raw();
    let cr4 = Cr4::read_raw();
    let wanted_cr0 = cr0 & !(Cr0Flags::EMULATE_COPROCESSOR | Cr0Flags::TASK_SWITCHED).bits();
    let wanted_cr4 = cr4 | Cr4Flags::OSFXSR.bits();
    // SAFETY: only EM, TS and OSFXSR change, none of which the soft-float hypervisor relies on;
    // paging, protection and VMX/SVM bits are untouched.
    unsafe {
        if wanted_cr0 != cr0 {
            Cr0::write_raw(wanted_cr0);
        }
        if wanted_cr4 != cr4 {
            Cr4::write_raw(wanted_cr4);
        }
    }
    body();
    // SAFETY: restores the values read above.
    unsafe {
        if wanted_cr4 != cr4 {
            Cr4::write_raw(cr4);
        }
        if wanted_cr0 != cr0 {
            Cr0::write_raw(cr0);
        }
    }
}

/// FXSAVE64: the x87/MMX/SSE registers into `state`. See: SDM Vol 2A "FXSAVE".
pub fn fxsave(state: &mut FpuState) {
    with_fxsr_usable(|| {
        // SAFETY: `state` is 512 writable bytes aligned to 16 (its type); EM and TS are clear,
        // so FXSAVE cannot fault; it only writes the area.
        unsafe { asm!("fxsave64 [{0}]", in(reg) state.0.as_mut_ptr(), options(nostack)) };
    });
}

/// FXRSTOR64: the x87/MMX/SSE registers from `state`.
///
/// # Safety
/// `state` came from [`fxsave`] or [`FpuState::initial`]: FXRSTOR raises #GP when the MXCSR
/// image sets reserved bits. See: SDM Vol 2A "FXRSTOR".
pub unsafe fn fxrstor(state: &FpuState) {
    with_fxsr_usable(|| {
        // SAFETY: the caller guarantees a valid image (MXCSR reserved bits clear); the area is
        // 512 readable bytes aligned to 16; EM and TS are clear.
        unsafe { asm!("fxrstor64 [{0}]", in(reg) state.0.as_ptr(), options(nostack, readonly)) };
    });
}

/// CR4.OSXSAVE (bit 18): XSAVE, XRSTOR, XSETBV and XGETBV usable. See: SDM Vol 3A 2.5.
pub const CR4_OSXSAVE: u64 = 1 << 18;

/// Whether CR4.OSXSAVE is set on this CPU, from CPUID.1:ECX.OSXSAVE (which mirrors it and,
/// unlike CR4, can be read at any privilege level: host tests build vCPUs too).
/// See: SDM Vol 2A CPUID, Table 3-10 (bit 27).
pub fn osxsave_enabled() -> bool {
    cpuid(1, 0).ecx & (1 << 27) != 0
}

/// XGETBV(0): XCR0, the state components XSAVE manages and the CPU lets software use, or
/// `None` when CR4.OSXSAVE is clear (XGETBV would raise #UD). See: SDM Vol 2C "XGETBV".
pub fn xcr0() -> Option<u64> {
    if read_cr4() & CR4_OSXSAVE == 0 {
        return None;
    }
    let (low, high): (u32, u32);
    // SAFETY: CR4.OSXSAVE is set (checked above) and ECX = 0 names XCR0, so XGETBV cannot
    // fault; it only reads the register.
    unsafe {
        asm!("xgetbv", in("ecx") 0u32, out("eax") low, out("edx") high, options(nomem, nostack))
    };
    Some(u64::from(high) << 32 | u64::from(low))
}

/// XSETBV(0): loads XCR0. See: SDM Vol 2C "XSETBV", Vol 1 13.3.
///
/// # Safety
/// CR4.OSXSAVE is set and `value` is a valid XCR0 for this CPU (bit 0 set, only bits CPUID
/// 0DH:EDX:EAX reports, AVX only with SSE, the AVX-512 bits together and with AVX), else #GP.
/// State components the change disables must not hold anything the caller still needs.
pub unsafe fn set_xcr0(value: u64) {
    // SAFETY: the caller guarantees OSXSAVE and a valid value.
    unsafe {
        asm!("xsetbv", in("ecx") 0u32, in("eax") value as u32, in("edx") (value >> 32) as u32,
            options(nomem, nostack))
    };
}

/// XSAVE64: the state components in XCR0 & `mask` into the standard-form area at `area`.
/// See: SDM Vol 1 13.7, Vol 2C "XSAVE".
///
/// # Safety
/// CR4.OSXSAVE is set; `area` is 64-byte aligned, writable, and at least as large as CPUID
/// 0DH reports for the components in XCR0 & `mask`.
pub unsafe fn xsave(area: *mut u8, mask: u64) {
    with_fxsr_usable(|| {
        // SAFETY: the caller guarantees OSXSAVE and a large, aligned area; CR0.TS is clear
        // (no #NM). XSAVE only writes the area.
        unsafe {
            asm!("xsave64 [{0}]", in(reg) area, in("eax") mask as u32,
                in("edx") (mask >> 32) as u32, options(nostack))
        };
    });
}

/// XRSTOR64: the state components in XCR0 & `mask` from the standard-form area at `area`;
/// those whose XSTATE_BV bit is clear are put in their initial configuration.
/// See: SDM Vol 1 13.8, Vol 2C "XRSTOR".
///
/// # Safety
/// As [`xsave`], and the area is valid for XRSTOR: XCOMP_BV and header bytes 16-63 zero,
/// XSTATE_BV only bits set in XCR0, a valid MXCSR image (written by XSAVE or initialized).
pub unsafe fn xrstor(area: *const u8, mask: u64) {
    with_fxsr_usable(|| {
        // SAFETY: the caller guarantees OSXSAVE and a valid, large, aligned area; CR0.TS is
        // clear. XRSTOR only reads the area.
        unsafe {
            asm!("xrstor64 [{0}]", in(reg) area, in("eax") mask as u32,
                in("edx") (mask >> 32) as u32, options(nostack, readonly))
        };
    });
}

/// Reads CR4.
pub fn read_cr4() -> u64 {
    Cr4::read_raw()
}

/// Writes CR4.
///
/// # Safety
/// The value must keep PAE (long mode) and any bit the running code relies on.
pub unsafe fn write_cr4(value: u64) {
    // SAFETY: the caller keeps the bits long mode needs.
    unsafe { Cr4::write_raw(value) }
}

/// CR0 bits long mode cannot run without (for callers that sanity-check a CR0 value).
pub const CR0_LONG_MODE_BITS: u64 =
    Cr0Flags::PROTECTED_MODE_ENABLE.bits() | Cr0Flags::PAGING.bits();
/// CR4.VMXE: VMX enable. See: SDM Vol 3C 24.7 "Enabling and entering VMX operation".
pub const CR4_VMXE: u64 = Cr4Flags::VIRTUAL_MACHINE_EXTENSIONS.bits();

/// Reads a byte from an I/O port.
///
/// # Safety
/// Reading the port must have no side effect that breaks the hypervisor's devices.
pub unsafe fn inb(port: u16) -> u8 {
    // SAFETY: the caller owns the port.
    unsafe { u8::read_from_port(port) }
}

/// Reads a word from an I/O port.
///
/// # Safety
/// As for [`inb`].
pub unsafe fn inw(port: u16) -> u16 {
    // SAFETY: the caller owns the port.
    unsafe { u16::read_from_port(port) }
}

/// Reads a doubleword from an I/O port.
///
/// # Safety
/// As for [`inb`].
pub unsafe fn inl(port: u16) -> u32 {
    // SAFETY: the caller owns the port.
    unsafe { u32::read_from_port(port) }
}

/// Writes a byte to an I/O port.
///
/// # Safety
/// The caller owns the port (or intends the side effect, e.g. a power-off register).
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: the caller owns the port.
    unsafe { u8::write_to_port(port, value) }
}

/// Writes a word to an I/O port.
///
/// # Safety
/// As for [`outb`].
pub unsafe fn outw(port: u16, value: u16) {
    // SAFETY: the caller owns the port.
    unsafe { u16::write_to_port(port, value) }
}

/// Writes a doubleword to an I/O port.
///
/// # Safety
/// As for [`outb`].
pub unsafe fn outl(port: u16, value: u32) {
    // SAFETY: the caller owns the port.
    unsafe { u32::write_to_port(port, value) }
}

/// Why a VMX instruction failed. See: SDM Vol 3C 31.2 "Conventions" (VMfailInvalid sets CF,
/// VMfailValid sets ZF and leaves an error number in the VM-instruction error field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmxInstructionError {
    /// CF = 1: no current VMCS, or the operand itself was bad (e.g. VMXON's region).
    FailInvalid,
    /// ZF = 1: the VM-instruction error field holds the reason.
    FailValid,
}

/// Decodes RFLAGS after a VMX instruction. See: SDM Vol 3C 31.2.
fn vmx_result(rflags: u64) -> Result<(), VmxInstructionError> {
    const CARRY: u64 = 1 << 0;
    const ZERO: u64 = 1 << 6;
    if rflags & CARRY != 0 {
        Err(VmxInstructionError::FailInvalid)
    } else if rflags & ZERO != 0 {
        Err(VmxInstructionError::FailValid)
    } else {
        Ok(())
    }
}

/// Enters VMX root operation. See: SDM Vol 3C 31.3 "VMXON".
///
/// # Safety
/// CR4.VMXE is set, CR0/CR4 satisfy the IA32_VMX_CR*_FIXED MSRs, IA32_FEATURE_CONTROL allows
/// VMX outside SMX, and `vmxon_region` is the physical address of a 4 KiB-aligned region
/// whose first dword holds the VMCS revision identifier and which stays reserved until VMXOFF.
pub unsafe fn vmxon(vmxon_region: u64) -> Result<(), VmxInstructionError> {
    let rflags: u64;
    // SAFETY: the caller established every precondition listed above.
    unsafe {
        asm!(
            "vmxon [{region}]",
            "pushfq",
            "pop {rflags}",
            region = in(reg) &vmxon_region,
            rflags = lateout(reg) rflags,
        );
    }
    vmx_result(rflags)
}

/// Leaves VMX operation. See: SDM Vol 3C 31.3 "VMXOFF".
///
/// # Safety
/// The CPU is in VMX root operation (a successful [`vmxon`]) and no VMCS of it is in use.
pub unsafe fn vmxoff() -> Result<(), VmxInstructionError> {
    let rflags: u64;
    // SAFETY: the caller guarantees the CPU is in VMX root operation.
    unsafe {
        asm!("vmxoff", "pushfq", "pop {rflags}", rflags = lateout(reg) rflags);
    }
    vmx_result(rflags)
}

/// Halts until the next interrupt. See: SDM Vol 2A 3.3 "HLT".
pub fn halt() {
    x86_64::instructions::hlt();
}

/// Disables interrupts and halts forever: the end of the line when power-off failed.
pub fn halt_forever() -> ! {
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}

/// Opens a one-instruction window for pending maskable interrupts: `STI; NOP; CLI`. STI takes
/// effect after the instruction that follows it, so an interrupt already pending is delivered
/// between the NOP and the CLI, and none after. See: SDM Vol 2B 4.3 "STI" (interrupt shadow),
/// Vol 3A 7.8.1 "Masking maskable hardware interrupts".
///
/// Safe: the hypervisor's IDT has a handler for every vector its local APIC can deliver, and
/// RFLAGS.IF is clear again when this returns. Acts as a compiler barrier (the handlers write
/// memory).
pub fn take_pending_interrupts() {
    // SAFETY: see above; the asm only toggles RFLAGS.IF and leaves it clear.
    unsafe { asm!("sti", "nop", "cli", options(nostack, preserves_flags)) };
}

/// Sleeps until the next maskable interrupt and returns after its handler ran: `STI; HLT;
/// CLI`. HLT sits in STI's interrupt shadow, so an interrupt that arrives between the two
/// still wakes the HLT (no lost wake-up). See: SDM Vol 2A 3.3 "HLT", Vol 2B 4.3 "STI".
///
/// Safe for the same reason as [`take_pending_interrupts`]; RFLAGS.IF is clear on return.
pub fn idle_until_interrupt() {
    // SAFETY: see above.
    unsafe { asm!("sti", "hlt", "cli", options(nostack, preserves_flags)) };
}
