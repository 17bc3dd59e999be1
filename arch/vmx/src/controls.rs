//! The VM-execution, VM-exit and VM-entry controls ringzero asks for, adjusted to what the CPU
//! allows (bits it requires are added; a wanted bit it forbids is an error naming the bit).
//! See: SDM Vol 3C 25.6 (execution controls), 25.7 (exit), 25.8 (entry); Vol 3D A.3-A.5
//! (allowed-0/allowed-1 settings, TRUE_* MSRs).

use ringzero_x86::caps::vmx::{AllowedControls, VmxCapabilities};

/// Pin-based controls. See: SDM Vol 3C Table 25-5.
pub mod pin {
    pub const EXTERNAL_INTERRUPT_EXITING: u32 = 1 << 0;
    pub const NMI_EXITING: u32 = 1 << 3;
    /// The VMX-preemption timer counts down in VMX non-root operation; at zero: exit reason 52.
    /// See: SDM Vol 3C 26.5.1.
    pub const ACTIVATE_PREEMPTION_TIMER: u32 = 1 << 6;
}

/// Primary processor-based controls. See: SDM Vol 3C Table 25-6.
pub mod primary {
    /// Exit (reason 7) before any instruction once RFLAGS.IF = 1 and nothing blocks
    /// interrupts. See: SDM Vol 3C 26.7.5.
    pub const INTERRUPT_WINDOW_EXITING: u32 = 1 << 2;
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
    /// Never set by ringzero: with it the CPU would acknowledge a physical interrupt at the
    /// exit and the host would have to dispatch the vector itself; without it the interrupt
    /// stays pending and the host takes it through its IDT once it enables interrupts.
    /// See: SDM Vol 3C 25.7.1, 28.2.2.
    pub const ACKNOWLEDGE_INTERRUPT_ON_EXIT: u32 = 1 << 15;
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

/// The primary processor-based controls with interrupt-window exiting on or off, or `None`
/// when the CPU does not allow it. See: SDM Vol 3C 25.6.2, 26.7.5.
pub fn with_interrupt_window(
    capabilities: &VmxCapabilities,
    primary_controls: u32,
    enabled: bool,
) -> Option<u32> {
    if enabled {
        capabilities
            .procbased
            .adjust(primary_controls | primary::INTERRUPT_WINDOW_EXITING)
            .ok()
    } else {
        Some(primary_controls & !primary::INTERRUPT_WINDOW_EXITING)
    }
}

/// The pin-based controls with the VMX-preemption timer on or off, or `None` when the CPU does
/// not offer the timer. See: SDM Vol 3C 25.6.1, 26.5.1; Vol 3D A.3.1.
pub fn with_preemption_timer(
    capabilities: &VmxCapabilities,
    pin_controls: u32,
    enabled: bool,
) -> Option<u32> {
    if !capabilities.preemption_timer {
        return None;
    }
    if enabled {
        capabilities
            .pinbased
            .adjust(pin_controls | pin::ACTIVATE_PREEMPTION_TIMER)
            .ok()
    } else {
        Some(pin_controls & !pin::ACTIVATE_PREEMPTION_TIMER)
    }
}

/// The VMX-preemption timer value for about `tsc_cycles` of guest time: the timer ticks once
/// every 2^X TSC cycles, X = IA32_VMX_MISC[4:0] (`rate_shift`), and the field is 32 bits wide
/// (longer bounds saturate). 0 makes the exit happen before the guest's first instruction.
/// See: SDM Vol 3C 26.5.1, Vol 3D A.6.
pub fn preemption_timer_value(tsc_cycles: u64, rate_shift: u8) -> u32 {
    u32::try_from(tsc_cycles >> rate_shift.min(63)).unwrap_or(u32::MAX)
}

/// The EPT pointer for tables rooted at `root`: write-back paging-structure memory type when
/// the CPU supports it (else uncacheable), 4-level walk. See: SDM Vol 3C 25.6.11.
pub fn ept_pointer(root: u64, capabilities: &VmxCapabilities) -> u64 {
    let memory_type = if capabilities.ept_write_back { 6 } else { 0 };
    const WALK_LENGTH_4: u64 = 3 << 3;
    root | WALK_LENGTH_4 | memory_type
}

/// Bochs 2.7 corei7_skylake_x, as ringzero's boot log prints them (TRUE controls): the
/// capabilities the crate's tests compute against.
#[cfg(test)]
pub(crate) fn bochs_capabilities() -> VmxCapabilities {
    tests::bochs()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringzero_x86::caps::vmx::{VmxCapabilities, VmxMsrs};

    /// Bochs 2.7 corei7_skylake_x, as ringzero's boot log prints them (TRUE controls).
    pub(super) fn bochs() -> VmxCapabilities {
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
    fn physical_interrupts_exit_and_stay_pending_for_the_host() {
        // External-interrupt exiting on, "acknowledge interrupt on exit" off: the interrupt is
        // still pending in the interrupt controller after the exit. See: SDM Vol 3C 25.7.1.
        for shadow_paging in [false, true] {
            let controls = compute(&bochs(), shadow_paging).unwrap();
            assert_ne!(controls.pin & pin::EXTERNAL_INTERRUPT_EXITING, 0);
            assert_ne!(controls.pin & pin::NMI_EXITING, 0);
            assert_eq!(controls.exit & exit::ACKNOWLEDGE_INTERRUPT_ON_EXIT, 0);
            assert_eq!(controls.primary & primary::INTERRUPT_WINDOW_EXITING, 0);
            assert_eq!(controls.pin & pin::ACTIVATE_PREEMPTION_TIMER, 0);
        }
    }

    #[test]
    fn interrupt_window_on_and_off() {
        let capabilities = bochs();
        let controls = compute(&capabilities, false).unwrap();
        let on = with_interrupt_window(&capabilities, controls.primary, true).unwrap();
        assert_eq!(on, controls.primary | primary::INTERRUPT_WINDOW_EXITING);
        assert_eq!(
            with_interrupt_window(&capabilities, on, false),
            Some(controls.primary)
        );
        let mut without = capabilities;
        without.procbased.may_be_one &= !primary::INTERRUPT_WINDOW_EXITING;
        assert_eq!(
            with_interrupt_window(&without, controls.primary, true),
            None
        );
    }

    #[test]
    fn preemption_timer_on_and_off() {
        let capabilities = bochs();
        assert!(
            capabilities.preemption_timer,
            "Bochs offers pin-based bit 6"
        );
        let controls = compute(&capabilities, false).unwrap();
        let on = with_preemption_timer(&capabilities, controls.pin, true).unwrap();
        assert_eq!(on, controls.pin | pin::ACTIVATE_PREEMPTION_TIMER);
        assert_eq!(
            with_preemption_timer(&capabilities, on, false),
            Some(controls.pin)
        );
        // A CPU without the timer: neither on nor off.
        let mut without = capabilities;
        without.preemption_timer = false;
        without.pinbased.may_be_one &= !pin::ACTIVATE_PREEMPTION_TIMER;
        assert_eq!(with_preemption_timer(&without, controls.pin, true), None);
        assert_eq!(with_preemption_timer(&without, controls.pin, false), None);
    }

    #[test]
    fn preemption_timer_values() {
        // Bochs: rate 2^0; a real Skylake-X: 2^7 (IA32_VMX_MISC[4:0]).
        assert_eq!(preemption_timer_value(1_000_000, 0), 1_000_000);
        assert_eq!(preemption_timer_value(1_000_000, 7), 7812);
        assert_eq!(preemption_timer_value(100, 7), 0);
        assert_eq!(preemption_timer_value(u64::MAX, 0), u32::MAX);
        assert_eq!(preemption_timer_value(u64::MAX, 31), u32::MAX);
        assert_eq!(preemption_timer_value(1 << 40, 8), u32::MAX);
        assert_eq!(preemption_timer_value((1 << 40) - 1, 8), u32::MAX);
        assert_eq!(preemption_timer_value(1 << 39, 8), 1 << 31);
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
