//! What the guest may not do by itself: the intercept bits ringzero sets in every VMCB.
//! See: APM Vol 2 15.9-15.14 and Table B-1 (intercept vectors).
//!
//! Under nested paging the guest owns its control registers, page tables and TLB, so CR
//! accesses and INVLPG are not intercepted; shadow paging adds `SHADOW_CR_INTERCEPTS`,
//! `SHADOW_EXCEPTION_INTERCEPTS` and `misc1::INVLPG` (see `vcpu.rs`).

/// Misc vector 1 (VMCB 0x00C) bits.
pub mod misc1 {
    /// Physical maskable interrupt. See: APM Vol 2 15.21.
    pub const INTR: u32 = 1 << 0;
    /// Physical NMI.
    pub const NMI: u32 = 1 << 1;
    /// CPUID. See: APM Vol 2 15.12.
    pub const CPUID: u32 = 1 << 18;
    /// HLT.
    pub const HLT: u32 = 1 << 24;
    /// INVLPG (shadow paging only). See: APM Vol 2 15.12.
    pub const INVLPG: u32 = 1 << 25;
    /// INVLPGA (an SVM instruction: #UD for the guest).
    pub const INVLPGA: u32 = 1 << 26;
    /// IN/OUT/INS/OUTS, filtered by the I/O permission map. See: APM Vol 2 15.10.
    pub const IOIO_PROT: u32 = 1 << 27;
    /// RDMSR/WRMSR, filtered by the MSR permission map. See: APM Vol 2 15.11.
    pub const MSR_PROT: u32 = 1 << 28;
    /// SHUTDOWN (the guest triple-faulted). See: APM Vol 2 15.12.
    pub const SHUTDOWN: u32 = 1 << 31;
}

/// Misc vector 2 (VMCB 0x010) bits.
pub mod misc2 {
    /// VMRUN: the hardware requires this intercept (VMRUN fails its consistency checks without it).
    pub const VMRUN: u32 = 1 << 0;
    pub const VMMCALL: u32 = 1 << 1;
    pub const VMLOAD: u32 = 1 << 2;
    pub const VMSAVE: u32 = 1 << 3;
    pub const STGI: u32 = 1 << 4;
    pub const CLGI: u32 = 1 << 5;
    pub const SKINIT: u32 = 1 << 6;
}

/// The misc-1 intercepts of every ringzero guest.
pub const MISC1: u32 = misc1::INTR
    | misc1::NMI
    | misc1::CPUID
    | misc1::HLT
    | misc1::INVLPGA
    | misc1::IOIO_PROT
    | misc1::MSR_PROT
    | misc1::SHUTDOWN;
/// The misc-2 intercepts: VMMCALL (hypercalls) and every SVM instruction (#UD for the guest).
pub const MISC2: u32 = misc2::VMRUN
    | misc2::VMMCALL
    | misc2::VMLOAD
    | misc2::VMSAVE
    | misc2::STGI
    | misc2::CLGI
    | misc2::SKINIT;

/// Size of the I/O permission map: one bit per port plus one byte. See: APM Vol 2 15.10.1.
pub const IOPM_SIZE: usize = 12 * 1024;
/// Size of the MSR permission map: two bits (read, write) per MSR in three ranges. See: APM Vol 2 15.11.
pub const MSRPM_SIZE: usize = 8 * 1024;

/// V_INTR_MASKING (VMCB 0x060 bit 24): the guest's RFLAGS.IF masks only virtual interrupts;
/// physical ones stay under the host's RFLAGS.IF. See: APM Vol 2 15.21.1.
pub const V_INTR_MASKING: u64 = 1 << 24;

/// Shadow paging: intercept reads (bits 0, 3, 4) and writes (bits 16, 19, 20) of CR0, CR3, CR4.
/// See: APM Vol 2 15.9 "Instruction intercepts", Table B-1 offset 0x000.
pub const SHADOW_CR_INTERCEPTS: u32 =
    (1 << 0) | (1 << 3) | (1 << 4) | (1 << 16) | (1 << 19) | (1 << 20);
/// Shadow paging: intercept #PF (exception vector 14). See: APM Vol 2 15.12.
pub const SHADOW_EXCEPTION_INTERCEPTS: u32 = 1 << 14;
