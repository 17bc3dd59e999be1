//! The instructions a hypervisor intercepts, each wrapped once and counted: CPUID, IN, OUT,
//! RDMSR and HLT (RDTSC too, not counted: ringzero does not intercept it). A guest reads the
//! counters (`counts()`) to predict the hypervisor's exit statistics for it. All inline assembly
//! of guest-lib is in this module.
//!
//! See: Intel SDM Vol 2 (instruction reference) for CPUID, IN, OUT, RDMSR, HLT, STI, LIDT, UD2.

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

static CPUID_COUNT: AtomicU64 = AtomicU64::new(0);
static IO_COUNT: AtomicU64 = AtomicU64::new(0);
static MSR_READ_COUNT: AtomicU64 = AtomicU64::new(0);
static HLT_COUNT: AtomicU64 = AtomicU64::new(0);

/// How many of each intercepted instruction this guest has executed so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counts {
    pub cpuid: u64,
    /// IN and OUT of every width.
    pub io: u64,
    pub msr_read: u64,
    pub hlt: u64,
}

/// The counters now.
pub fn counts() -> Counts {
    Counts {
        cpuid: CPUID_COUNT.load(Ordering::Relaxed),
        io: IO_COUNT.load(Ordering::Relaxed),
        msr_read: MSR_READ_COUNT.load(Ordering::Relaxed),
        hlt: HLT_COUNT.load(Ordering::Relaxed),
    }
}

fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// CPUID result registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuidResult {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// CPUID with EAX = `leaf`, ECX = `subleaf`. Counted.
pub fn cpuid(leaf: u32, subleaf: u32) -> CpuidResult {
    count(&CPUID_COUNT);
    let (eax, ebx, ecx, edx): (u32, u32, u32, u32);
    // SAFETY: CPUID has no side effects besides the registers. RBX is reserved by LLVM, so it is
    // saved in another register and restored around the instruction.
    unsafe {
        asm!(
            "mov {rbx_save:r}, rbx",
            "cpuid",
            "xchg {rbx_save:r}, rbx",
            rbx_save = out(reg) ebx,
            inout("eax") leaf => eax,
            inout("ecx") subleaf => ecx,
            out("edx") edx,
            options(nostack, preserves_flags),
        );
    }
    CpuidResult { eax, ebx, ecx, edx }
}

/// 1-byte IN. Counted.
pub fn inb(port: u16) -> u8 {
    count(&IO_COUNT);
    let value: u8;
    // SAFETY: guest ports have no memory effects visible to Rust; the guest owns the machine.
    unsafe {
        asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack, preserves_flags))
    };
    value
}

/// 1-byte OUT. Counted.
pub fn outb(port: u16, value: u8) {
    count(&IO_COUNT);
    // SAFETY: as for `inb`.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}

/// 4-byte IN. Counted.
pub fn inl(port: u16) -> u32 {
    count(&IO_COUNT);
    let value: u32;
    // SAFETY: as for `inb`.
    unsafe {
        asm!("in eax, dx", out("eax") value, in("dx") port, options(nomem, nostack, preserves_flags))
    };
    value
}

/// 4-byte OUT. Counted.
pub fn outl(port: u16, value: u32) {
    count(&IO_COUNT);
    // SAFETY: as for `inb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    };
}

/// RDMSR of `msr`. Counted. An MSR the CPU (or hypervisor) does not know raises #GP, which with
/// no IDT ends the guest in a triple fault.
pub fn rdmsr(msr: u32) -> u64 {
    count(&MSR_READ_COUNT);
    let (low, high): (u32, u32);
    // SAFETY: reading an MSR has no memory effects; the guest runs at CPL 0.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") low, out("edx") high, options(nomem, nostack, preserves_flags))
    };
    (u64::from(high) << 32) | u64::from(low)
}

/// `sti; hlt; cli`: halt with interrupts enabled, so the next interrupt (or, under ringzero, the
/// hypervisor at once) resumes the guest. The HLT is counted. STI's one-instruction shadow
/// guarantees no interrupt is taken between STI and HLT.
pub fn sti_hlt() {
    count(&HLT_COUNT);
    // SAFETY: the guest has no interrupt handlers; under ringzero no interrupt is ever injected.
    // Interrupts are off again when this returns.
    unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) };
}

/// RDTSC: the time-stamp counter. Not counted: ringzero does not intercept it (it reads the
/// host TSC; docs/guest-interface.md "MSRs").
pub fn rdtsc() -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: RDTSC only reads the counter into EDX:EAX (CR4.TSD is clear at CPL 0 anyway).
    unsafe {
        asm!("rdtsc", out("eax") low, out("edx") high, options(nomem, nostack, preserves_flags))
    };
    (u64::from(high) << 32) | u64::from(low)
}

/// Stops the CPU for good: `cli; hlt` in a loop (not counted: under ringzero the first HLT with
/// interrupts off stops the VM).
pub fn stop() -> ! {
    loop {
        // SAFETY: disables interrupts and halts; no memory effects.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// The 10-byte operand of LIDT/LGDT.
#[repr(C, packed)]
pub struct DescriptorTablePointer {
    pub limit: u16,
    pub base: u64,
}

// `guest_lidt_and_ud2(idt)`: LIDT [RDI], then UD2 at the global label `guest_ud2_instruction`
// (a global label needs global_asm!; inline asm! may be duplicated by the compiler).
core::arch::global_asm!(
    ".pushsection .text.guest_lidt_and_ud2, \"ax\"",
    ".global guest_lidt_and_ud2",
    "guest_lidt_and_ud2:",
    "    lidt [rdi]",
    ".global guest_ud2_instruction",
    "guest_ud2_instruction:",
    "    ud2",
    "    ret",
    ".popsection",
);

extern "C" {
    fn guest_lidt_and_ud2(idt: *const DescriptorTablePointer);
    fn guest_ud2_instruction();
}

/// Loads `idt` with LIDT and executes UD2 at `ud2_address()`. With an empty IDT (limit 0) the
/// #UD's gate lies beyond the limit: #GP; its gate too: #DF; its gate too: triple fault (SDM
/// Vol 3A 6.15, "Interrupt 8", and 6.10: a vector beyond the IDT limit raises #GP). Returns
/// only if the CPU somehow resumes after the UD2.
pub fn lidt_and_ud2(idt: &DescriptorTablePointer) {
    // SAFETY: `idt` points to a valid 10-byte LIDT operand. The routine deliberately faults; if
    // something resumes the guest past the UD2, it returns like a plain function (System V ABI).
    unsafe { guest_lidt_and_ud2(idt) }
}

/// The address of the UD2 that `lidt_and_ud2` executes.
pub fn ud2_address() -> u64 {
    guest_ud2_instruction as *const () as usize as u64
}
