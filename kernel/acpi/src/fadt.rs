//! The FADT (fixed hardware: PM1a event/control blocks, PM timer, SCI; the DSDT and FACS
//! pointers) and the FACS it points to.
//!
//! Full (not hardware-reduced) ACPI, because Linux then drives the fixed PM registers itself:
//! S5 through PM1a_CNT and the PM timer as a clocksource. There is no SMI command port, which
//! tells the OS the platform is always in ACPI mode (PM1_CNT.SCI_EN must read 1). No
//! RESET_REG: the VMM has no reset register model yet; Linux then resets through the keyboard
//! controller or a triple fault, both of which end the VM.
//!
//! See: ACPI 6.5 spec, 5.2.9 "Fixed ACPI Description Table" (Table 5.9, field offsets; Table
//! 5.10 flags; Table 5.11 IA-PC boot architecture flags), 5.2.10 "FACS", 4.8.3 "PM1 Event
//! and Control Registers", 5.2.3.2 "Generic Address Structure".

use crate::{PlatformDescription, OEM_ID, OEM_REVISION, OEM_TABLE_ID};
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags, PmProfile, FADT};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};

/// FADT length for major version 6 (through HYPERVISOR_VENDOR_IDENTITY). See: Table 5.9.
pub const LENGTH: u64 = 276;
/// FACS length. See: ACPI 6.5 Table 5.14.
pub const FACS_LENGTH: u64 = 64;
/// PM1_EVT_LEN: PM1_STS and PM1_EN, 16 bits each. See: ACPI 6.5 4.8.3.1.
pub const PM1_EVENT_LENGTH: u8 = 4;
/// PM1_CNT_LEN. See: ACPI 6.5 4.8.3.2.
pub const PM1_CONTROL_LENGTH: u8 = 2;
/// PM_TMR_LEN. See: ACPI 6.5 4.8.3.3.
pub const PM_TIMER_LENGTH: u8 = 4;

/// IAPC_BOOT_ARCH bit 2: VGA Not Present (there is no VGA model). Bit 1 (8042) stays clear, so
/// Linux skips probing a keyboard controller that is not there. See: ACPI 6.5 Table 5.11.
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;

/// Builds the FADT for `platform`, pointing at the DSDT and FACS at these guest-physical
/// addresses (64-bit fields always; the 32-bit DSDT too when it fits, FIRMWARE_CTRL instead of
/// X_FIRMWARE_CTRL when it fits, since the spec allows only one of those two non-zero).
pub fn build(platform: &PlatformDescription, dsdt_address: u64, facs_address: u64) -> FADT {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .preferred_pm_profile(PmProfile::Unspecified)
        // See: Table 5.10. WBINVD works; C1 on all CPUs; no fixed-feature power or sleep
        // button (the bits mean "control method button", and no such device is in the DSDT).
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);

    // Pointers. See: Table 5.9 FIRMWARE_CTRL (offset 36), DSDT (40), X_FIRMWARE_CTRL (132),
    // X_DSDT (140).
    match u32::try_from(facs_address) {
        Ok(address) => fadt.firmware_ctrl = address.into(),
        Err(_) => fadt.x_firmware_ctrl = facs_address.into(),
    }
    fadt.dsdt = u32::try_from(dsdt_address).unwrap_or(0).into();
    fadt.x_dsdt = dsdt_address.into();

    // SCI and fixed PM registers, in both the legacy 32-bit fields and the X_ GAS fields.
    fadt.sci_int = u16::from(platform.sci_irq).into();
    fadt.pm1a_evt_blk = u32::from(platform.pm1a_event_port).into();
    fadt.pm1_evt_len = PM1_EVENT_LENGTH;
    fadt.x_pm1a_evt_blk = io_register(
        platform.pm1a_event_port,
        PM1_EVENT_LENGTH,
        AccessSize::WordAccess,
    );
    fadt.pm1a_cnt_blk = u32::from(platform.pm1a_control_port).into();
    fadt.pm1_cnt_len = PM1_CONTROL_LENGTH;
    fadt.x_pm1a_cnt_blk = io_register(
        platform.pm1a_control_port,
        PM1_CONTROL_LENGTH,
        AccessSize::WordAccess,
    );
    if platform.pm_timer_port != 0 {
        // 24-bit counter (TMR_VAL_EXT clear): a 32-bit model reads correctly too.
        fadt.pm_tmr_blk = u32::from(platform.pm_timer_port).into();
        fadt.pm_tmr_len = PM_TIMER_LENGTH;
        fadt.x_pm_tmr_blk = io_register(
            platform.pm_timer_port,
            PM_TIMER_LENGTH,
            AccessSize::DwordAccess,
        );
    }
    // The reset register: a byte write of 0x06 to port 0xCF9 (the PCI bus model's reset
    // control register). See: ACPI 6.5 Table 5.9 RESET_REG, RESET_VALUE; 4.8.3.6.
    fadt.reset_reg = io_register(RESET_PORT, 1, AccessSize::ByteAccess);
    fadt.reset_value = RESET_VALUE;
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH_VGA_NOT_PRESENT.into();
    fadt.finalize()
}

/// Where and what the guest writes to reset the machine (`ringzero_devices::PciBus`).
const RESET_PORT: u16 = 0xCF9;
const RESET_VALUE: u8 = 0x06;

/// The FACS: no global lock, no S4BIOS, waking vector 0 (the guest writes it on suspend).
pub fn build_facs() -> FACS {
    FACS::new()
}

/// A system-I/O Generic Address Structure for a `length`-byte register block at `port`.
fn io_register(port: u16, length: u8, access: AccessSize) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        length * 8,
        0,
        access,
        u64::from(port),
    )
}
