//! The MSRs a guest may read and write, and what they hold. Every RDMSR/WRMSR exits (the MSR
//! permission map / bitmap intercepts all); MSRs the hardware keeps in the guest state area
//! (EFER, PAT, STAR, ...) are passed to the backend, a few are emulated here, and anything
//! else raises #GP in the guest (logged once per VM and MSR).

/// IA32_TIME_STAMP_COUNTER. See: SDM Vol 4 Table 2-2.
pub const IA32_TIME_STAMP_COUNTER: u32 = 0x10;
/// IA32_APIC_BASE. See: SDM Vol 3A 11.4.4.
pub const IA32_APIC_BASE: u32 = 0x1B;
/// The value guests read from IA32_APIC_BASE: the default base 0xFEE0_0000, enabled (bit 11),
/// bootstrap processor (bit 8).
pub const APIC_BASE_VALUE: u64 = 0xFEE0_0900;
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
        IA32_APIC_BASE => MsrRead::Value(APIC_BASE_VALUE),
        IA32_MISC_ENABLE => MsrRead::Value(MISC_ENABLE_VALUE),
        AMD_NB_CFG => MsrRead::Value(0),
        _ => MsrRead::Hardware,
    }
}

/// What to do with a WRMSR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsrWrite {
    /// Accepted and ignored (e.g. APIC base unchanged).
    Ignore,
    /// Pass to the backend (`Vcpu::set_hardware_msr`), then #GP if it does not hold it.
    Hardware,
    /// Refused with #GP.
    Fault,
}

/// The core's policy for WRMSR of `msr` = `value`.
pub fn write(msr: u32, value: u64) -> MsrWrite {
    match msr {
        IA32_APIC_BASE if value == APIC_BASE_VALUE => MsrWrite::Ignore,
        IA32_APIC_BASE => MsrWrite::Fault,
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
        assert_eq!(read(IA32_APIC_BASE, 0), MsrRead::Value(0xFEE0_0900));
        assert_eq!(read(IA32_EFER, 0), MsrRead::Hardware);
        assert_eq!(read(0x1234_5678, 0), MsrRead::Hardware);
    }

    #[test]
    fn write_policy() {
        assert_eq!(write(IA32_APIC_BASE, APIC_BASE_VALUE), MsrWrite::Ignore);
        assert_eq!(write(IA32_APIC_BASE, 0), MsrWrite::Fault);
        assert_eq!(write(IA32_TIME_STAMP_COUNTER, 0), MsrWrite::Fault);
        assert_eq!(write(IA32_EFER, 0xD00), MsrWrite::Hardware);
    }
}
