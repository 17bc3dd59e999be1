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
    /// VINTR: exit when the guest is about to take the virtual interrupt V_IRQ asks for (the
    /// interrupt window). See: APM Vol 2 15.21.4.
    pub const VINTR: u32 = 1 << 4;
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
    /// XSETBV: the guest's XCR0 is checked and kept by the hypervisor (without the intercept
    /// the guest would load the real XCR0 unchecked). See: APM Vol 2 15.12, Table B-1 (bit 13).
    pub const XSETBV: u32 = 1 << 13;
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
/// The misc-2 intercepts: VMMCALL (hypercalls), XSETBV and every SVM instruction (#UD for the
/// guest).
pub const MISC2: u32 = misc2::VMRUN
    | misc2::XSETBV
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
/// physical ones stay under the host's RFLAGS.IF as it was at VMRUN (HIF), so the world switch
/// runs VMRUN with IF = 1 (under CLGI) for the INTR intercept to fire. See: APM Vol 2 15.21.1.
pub const V_INTR_MASKING: u64 = 1 << 24;
/// V_IRQ (VMCB 0x060 bit 8): a virtual interrupt is pending. See: APM Vol 2 15.21.4.
pub const V_IRQ: u64 = 1 << 8;
/// V_INTR_PRIO (VMCB 0x060 bits 19:16): the pending virtual interrupt's priority.
pub const V_INTR_PRIO_SHIFT: u32 = 16;
pub const V_INTR_PRIO_MASK: u64 = 0xF << V_INTR_PRIO_SHIFT;
/// V_IGN_TPR (VMCB 0x060 bit 20): the virtual interrupt ignores the virtual TPR.
pub const V_IGN_TPR: u64 = 1 << 20;

/// The virtual-interrupt control and misc-1 intercepts with the interrupt window asked for or
/// not. Asking: a virtual interrupt pending (V_IRQ) at the highest priority (V_INTR_PRIO 0xF)
/// whatever the virtual TPR (V_IGN_TPR), and the VINTR intercept, so the guest exits (0x64)
/// exactly when it could take an interrupt (RFLAGS.IF = 1, no interrupt shadow); the virtual
/// interrupt itself is never delivered. Not asking: all four cleared.
/// See: APM Vol 2 15.21.4 "Injecting Virtual (INTR) Interrupts", Table B-1 offset 0x060.
pub fn with_interrupt_window(
    virtual_interrupt_control: u64,
    intercept_misc1: u32,
    enabled: bool,
) -> (u64, u32) {
    let window = V_IRQ | V_INTR_PRIO_MASK | V_IGN_TPR;
    if enabled {
        (
            virtual_interrupt_control | window,
            intercept_misc1 | misc1::VINTR,
        )
    } else {
        (
            virtual_interrupt_control & !window,
            intercept_misc1 & !misc1::VINTR,
        )
    }
}

/// Shadow paging: intercept reads (bits 0, 3, 4) and writes (bits 16, 19, 20) of CR0, CR3, CR4.
/// See: APM Vol 2 15.9 "Instruction intercepts", Table B-1 offset 0x000.
pub const SHADOW_CR_INTERCEPTS: u32 =
    (1 << 0) | (1 << 3) | (1 << 4) | (1 << 16) | (1 << 19) | (1 << 20);
/// Shadow paging: intercept #PF (exception vector 14). See: APM Vol 2 15.12.
pub const SHADOW_EXCEPTION_INTERCEPTS: u32 = 1 << 14;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn physical_interrupts_exit() {
        // INTR and NMI intercepted, with V_INTR_MASKING in every VMCB (vcpu.rs): the guest's
        // IF cannot hold physical interrupts back. See: APM Vol 2 15.21.1.
        assert_ne!(MISC1 & misc1::INTR, 0);
        assert_ne!(MISC1 & misc1::NMI, 0);
        assert_eq!(MISC1 & misc1::VINTR, 0, "no window asked for at creation");
    }

    #[test]
    fn interrupt_window_on_and_off() {
        let (control, misc1_on) = with_interrupt_window(V_INTR_MASKING, MISC1, true);
        assert_eq!(control, V_INTR_MASKING | V_IRQ | (0xF << 16) | V_IGN_TPR);
        assert_eq!(control, 0x011F_0100);
        assert_eq!(misc1_on, MISC1 | (1 << 4));
        assert_eq!(
            with_interrupt_window(control, misc1_on, false),
            (V_INTR_MASKING, MISC1)
        );
        // V_TPR (bits 3:0) and the vector (39:32) are left alone.
        let (control, _) = with_interrupt_window(V_INTR_MASKING | 0x5 | (0x41 << 32), MISC1, false);
        assert_eq!(control, V_INTR_MASKING | 0x5 | (0x41 << 32));
    }
}
