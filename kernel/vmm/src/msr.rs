//! The MSRs a guest may read and write, and what they hold. Every RDMSR/WRMSR exits (the MSR
//! permission map / bitmap intercepts all); MSRs the hardware keeps in the guest state area
//! (EFER, PAT, STAR, ...) are passed to the backend, a few are emulated here, and anything
//! else raises #GP in the guest (logged once per VM and MSR).

/// IA32_TIME_STAMP_COUNTER. See: SDM Vol 4 Table 2-2.
pub const IA32_TIME_STAMP_COUNTER: u32 = 0x10;
/// IA32_EFER.
pub const IA32_EFER: u32 = 0xC000_0080;
/// IA32_MISC_ENABLE (Intel): Linux reads it unconditionally early in boot on Intel CPUs (before
/// it has an IDT, so a #GP there is a triple fault). See: SDM Vol 4 Table 2-2.
pub const IA32_MISC_ENABLE: u32 = 0x1A0;
/// What the guest reads: fast strings enabled (bit 0), branch trace storage and PEBS
/// unavailable (bits 11, 12); XD not disabled (bit 34 clear).
pub const MISC_ENABLE_VALUE: u64 = (1 << 0) | (1 << 11) | (1 << 12);
/// AMD NB_CFG: Linux reads it, then writes it (not "safely") to enable extended PCI
/// configuration access; it reads 0 and writes are ignored, as KVM does. See: AMD BKDG for
/// family 10h, MSRC001_001F.
pub const AMD_NB_CFG: u32 = 0xC001_001F;
/// IA32_TSC_AUX: what RDTSCP and RDPID return in ECX. The core keeps it per vCPU as a plain value
/// (the hardware register is not loaded with it: RDTSCP in the guest still reads the host's).
/// See: SDM Vol 4 Table 2-2; Vol 2B RDTSCP.
pub const IA32_TSC_AUX: u32 = 0xC000_0103;
// IA32_APIC_BASE, IA32_TSC_DEADLINE and the x2APIC registers are each vCPU's local APIC's
// (`ringzero_devices::LocalApic`, routed by the core before these policies).

/// What to do with an RDMSR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsrRead {
    Value(u64),
    /// Ask the backend (`Vcpu::hardware_msr`), then #GP if it does not hold it either.
    Hardware,
}

/// The core's own answer to RDMSR of `msr`; `timestamp` is the host TSC now.
pub fn read(msr: u32, timestamp: u64) -> MsrRead {
    match msr {
        IA32_TIME_STAMP_COUNTER => MsrRead::Value(timestamp),
        IA32_MISC_ENABLE => MsrRead::Value(MISC_ENABLE_VALUE),
        AMD_NB_CFG => MsrRead::Value(0),
        _ => MsrRead::Hardware,
    }
}

/// What to do with a WRMSR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsrWrite {
    /// Accepted and ignored.
    Ignore,
    /// Pass to the backend (`Vcpu::set_hardware_msr`), then #GP if it does not hold it.
    Hardware,
    /// Refused with #GP.
    Fault,
}

/// The core's policy for WRMSR of `msr` (no policy here depends on the value written).
pub fn write(msr: u32) -> MsrWrite {
    match msr {
        // Writing the TSC would need a per-VM offset; refuse until a guest needs it.
        IA32_TIME_STAMP_COUNTER => MsrWrite::Fault,
        // Writes are accepted and ignored (the guest reads the fixed value back).
        IA32_MISC_ENABLE | AMD_NB_CFG => MsrWrite::Ignore,
        _ => MsrWrite::Hardware,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emulated_reads() {
        assert_eq!(read(IA32_TIME_STAMP_COUNTER, 1234), MsrRead::Value(1234));
        assert_eq!(read(IA32_MISC_ENABLE, 0), MsrRead::Value(0x1801));
        assert_eq!(read(IA32_EFER, 0), MsrRead::Hardware);
        assert_eq!(read(0x1234_5678, 0), MsrRead::Hardware);
    }

    #[test]
    fn write_policy() {
        assert_eq!(write(IA32_MISC_ENABLE), MsrWrite::Ignore);
        assert_eq!(write(IA32_TIME_STAMP_COUNTER), MsrWrite::Fault);
        assert_eq!(write(IA32_EFER), MsrWrite::Hardware);
    }
}
