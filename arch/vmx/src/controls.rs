//! The VM-execution, VM-exit and VM-entry controls ringzero asks for, adjusted to what the CPU
//! allows (bits it requires are added; a wanted bit it forbids is an error naming the bit).
//! See: SDM Vol 3C 25.6 (execution controls), 25.7 (exit), 25.8 (entry); Vol 3D A.3-A.5
//! (allowed-0/allowed-1 settings, TRUE_* MSRs).

use ringzero_x86::caps::vmx::{AllowedControls, VmxCapabilities};

/// Pin-based controls. See: SDM Vol 3C Table 25-5.
pub mod pin {
    pub const EXTERNAL_INTERRUPT_EXITING: u32 = 1 << 0;
    pub const NMI_EXITING: u32 = 1 << 3;
}

/// Primary processor-based controls. See: SDM Vol 3C Table 25-6.
pub mod primary {
    pub const HLT_EXITING: u32 = 1 << 7;
    pub const INVLPG_EXITING: u32 = 1 << 9;
    pub const CR3_LOAD_EXITING: u32 = 1 << 15;
    pub const CR3_STORE_EXITING: u32 = 1 << 16;
    pub const USE_IO_BITMAPS: u32 = 1 << 25;
    pub const USE_MSR_BITMAPS: u32 = 1 << 28;
    pub const ACTIVATE_SECONDARY_CONTROLS: u32 = 1 << 31;
}

/// Secondary processor-based controls. See: SDM Vol 3C Table 25-7.
pub mod secondary {
    pub const ENABLE_EPT: u32 = 1 << 1;
    pub const ENABLE_RDTSCP: u32 = 1 << 3;
    pub const ENABLE_VPID: u32 = 1 << 5;
    pub const UNRESTRICTED_GUEST: u32 = 1 << 7;
}

/// VM-exit controls. See: SDM Vol 3C Table 25-13.
pub mod exit {
    pub const HOST_ADDRESS_SPACE_SIZE: u32 = 1 << 9;
    pub const SAVE_IA32_PAT: u32 = 1 << 18;
    pub const LOAD_IA32_PAT: u32 = 1 << 19;
    pub const SAVE_IA32_EFER: u32 = 1 << 20;
    pub const LOAD_IA32_EFER: u32 = 1 << 21;
}

/// VM-entry controls. See: SDM Vol 3C Table 25-15.
pub mod entry {
    pub const IA32E_MODE_GUEST: u32 = 1 << 9;
    pub const LOAD_IA32_PAT: u32 = 1 << 14;
    pub const LOAD_IA32_EFER: u32 = 1 << 15;
}

/// The adjusted control values for one VMCS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Controls {
    pub pin: u32,
    pub primary: u32,
    pub secondary: u32,
    pub exit: u32,
    /// Without IA32E_MODE_GUEST: the caller adds it for a 64-bit guest.
    pub entry: u32,
}

/// A control the hypervisor needs but the CPU does not allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnsupportedControl {
    pub set: &'static str,
    pub missing_bits: u32,
}

impl core::fmt::Display for UnsupportedControl {
    fn fmt(&self, formatter: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            formatter,
            "the CPU does not allow {} controls {:#x} (SDM Vol 3D A.3-A.5)",
            self.set, self.missing_bits
        )
    }
}

fn adjust(
    set: &'static str,
    allowed: AllowedControls,
    wanted: u32,
) -> Result<u32, UnsupportedControl> {
    allowed
        .adjust(wanted)
        .map_err(|missing_bits| UnsupportedControl { set, missing_bits })
}

/// Every guest's controls: exits on external interrupts and NMIs, HLT, all port I/O (I/O
/// bitmaps of ones), all MSR accesses (MSR bitmap of ones); CPUID and triple faults exit
/// unconditionally. EPT + VPID + unrestricted guest (so Multiboot's paging-off protected mode
/// runs as it is). EFER and PAT are switched on entry and exit.
///
/// With `shadow_paging`, EPT and unrestricted guest are off and the guest's paging state
/// changes exit instead: CR3 loads and stores, INVLPG (plus CR0/CR4 masks and #PF in the
/// exception bitmap, set by the vCPU). See: SDM Vol 3C 25.6.2, 25.6.3.
pub fn compute(
    capabilities: &VmxCapabilities,
    shadow_paging: bool,
) -> Result<Controls, UnsupportedControl> {
    let mut wanted_secondary = if shadow_paging {
        0
    } else {
        secondary::ENABLE_EPT | secondary::UNRESTRICTED_GUEST
    };
    let mut wanted_primary = primary::HLT_EXITING
        | primary::USE_IO_BITMAPS
        | primary::USE_MSR_BITMAPS
        | primary::ACTIVATE_SECONDARY_CONTROLS;
    if shadow_paging {
        wanted_primary |=
            primary::INVLPG_EXITING | primary::CR3_LOAD_EXITING | primary::CR3_STORE_EXITING;
    }
    if capabilities.vpid {
        wanted_secondary |= secondary::ENABLE_VPID;
    }
    if capabilities.procbased2.may_be_one & secondary::ENABLE_RDTSCP != 0 {
        // Without it RDTSCP would raise #UD in the guest even though CPUID announces it.
        wanted_secondary |= secondary::ENABLE_RDTSCP;
    }
    Ok(Controls {
        pin: adjust(
            "pin-based",
            capabilities.pinbased,
            pin::EXTERNAL_INTERRUPT_EXITING | pin::NMI_EXITING,
        )?,
        primary: adjust(
            "primary processor-based",
            capabilities.procbased,
            wanted_primary,
        )?,
        secondary: adjust(
            "secondary processor-based",
            capabilities.procbased2,
            wanted_secondary,
        )?,
        exit: adjust(
            "VM-exit",
            capabilities.exit,
            exit::HOST_ADDRESS_SPACE_SIZE
                | exit::SAVE_IA32_PAT
                | exit::LOAD_IA32_PAT
                | exit::SAVE_IA32_EFER
                | exit::LOAD_IA32_EFER,
        )?,
        entry: adjust(
            "VM-entry",
            capabilities.entry,
            entry::LOAD_IA32_PAT | entry::LOAD_IA32_EFER,
        )?,
    })
}

/// The EPT pointer for tables rooted at `root`: write-back paging-structure memory type when
/// the CPU supports it (else uncacheable), 4-level walk. See: SDM Vol 3C 25.6.11.
pub fn ept_pointer(root: u64, capabilities: &VmxCapabilities) -> u64 {
    let memory_type = if capabilities.ept_write_back { 6 } else { 0 };
    const WALK_LENGTH_4: u64 = 3 << 3;
    root | WALK_LENGTH_4 | memory_type
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringzero_x86::caps::vmx::{VmxCapabilities, VmxMsrs};

    /// Bochs 2.7 corei7_skylake_x, as ringzero's boot log prints them (TRUE controls).
    fn bochs() -> VmxCapabilities {
        VmxCapabilities::decode(&VmxMsrs {
            feature_control: 0x5,
            basic: 0x00D8_1000_0000_002B,
            pinbased_ctls: 0x0000_007F_0000_0016,
            procbased_ctls: 0xF7F9_FFFE_0400_6172,
            exit_ctls: 0x007F_FFFF_0003_6DFB,
            entry_ctls: 0x0000_FFFF_0000_11FB,
            misc: 0x6004_01E0,
            cr0_fixed0: 0x8000_0021,
            cr0_fixed1: 0xFFFF_FFFF,
            cr4_fixed0: 0x2000,
            cr4_fixed1: 0x3727FF,
            procbased_ctls2: Some(0x0217_7FFF_0000_0000),
            ept_vpid_cap: Some(0x0000_0F01_0633_4141),
            true_pinbased_ctls: Some(0x0000_007F_0000_0016),
            true_procbased_ctls: Some(0xF7F9_FFFE_0400_6172),
            true_exit_ctls: Some(0x007F_FFFF_0003_6DFB),
            true_entry_ctls: Some(0x0000_FFFF_0000_11FB),
        })
    }

    #[test]
    fn bochs_controls() {
        let controls = compute(&bochs(), false).unwrap();
        assert_ne!(controls.primary & primary::HLT_EXITING, 0);
        assert_ne!(
            controls.primary & 0x0400_6172,
            0,
            "must-be-one bits are kept"
        );
        assert_eq!(controls.primary & 0x0400_6172, 0x0400_6172);
        assert_eq!(
            controls.secondary
                & (secondary::ENABLE_EPT | secondary::ENABLE_VPID | secondary::UNRESTRICTED_GUEST),
            0xA2
        );
        assert_ne!(controls.exit & exit::HOST_ADDRESS_SPACE_SIZE, 0);
        assert_eq!(controls.entry & entry::IA32E_MODE_GUEST, 0);
        assert_eq!(ept_pointer(0x1234_5000, &bochs()), 0x1234_501E);
    }

    #[test]
    fn shadow_paging_controls() {
        let controls = compute(&bochs(), true).unwrap();
        assert_eq!(
            controls.secondary & (secondary::ENABLE_EPT | secondary::UNRESTRICTED_GUEST),
            0
        );
        let wanted =
            primary::INVLPG_EXITING | primary::CR3_LOAD_EXITING | primary::CR3_STORE_EXITING;
        assert_eq!(controls.primary & wanted, wanted);
    }

    #[test]
    fn missing_ept_is_named() {
        let mut capabilities = bochs();
        capabilities.procbased2.may_be_one &= !secondary::ENABLE_EPT;
        let error = compute(&capabilities, false).unwrap_err();
        assert_eq!(error.set, "secondary processor-based");
        assert_eq!(error.missing_bits, secondary::ENABLE_EPT);
    }
}
