//! The ACPI tables a VM's guest sees, built into one checksummed blob at a guest-physical base.
//!
//! A Linux guest (or any ACPI OS) finds its platform here: how many CPUs and where their local
//! APICs are (MADT), the I/O APIC and the legacy IRQ overrides (MADT), the PM1 event/control
//! and PM timer ports and the SCI (FADT), how to power off (`\_S5` in the DSDT) and which
//! devices exist (DSDT: the PCI root bridge, COM1).
//!
//! Builders: the rust-vmm `acpi_tables` crate (cloud-hypervisor's) for the RSDP, XSDT, FADT,
//! FACS, the generic SDT (header + checksum) and all AML. It has no MADT entries for interrupt
//! source overrides or local APIC NMIs and no setter for the MADT's PCAT_COMPAT flag, so the
//! MADT is laid out here on its generic `Sdt` with those two 6-byte entries encoded in
//! `madt.rs`; likewise the legacy `IRQNoFlags` resource descriptor in `dsdt.rs`.
//!
//! Layout of the blob (`base` must be 16-byte aligned so the RSDP can sit where a BIOS scan
//! finds it, e.g. 0xE0000; every address inside the tables is `base` + offset):
//! ```text
//! base + 0x000  RSDP  (36 bytes, revision 2, -> XSDT)
//!        8-aligned  XSDT  (-> FADT, MADT)
//!        8-aligned  FADT  (revision 6.5, 276 bytes; -> DSDT, FACS)
//!       64-aligned  FACS  (64 bytes; required by a non-hardware-reduced FADT)
//!        8-aligned  DSDT  (AML)
//!        8-aligned  MADT
//! ```
//!
//! See: ACPI 6.5 spec, 5.2.5 "Root System Description Pointer", 5.2.8 "XSDT", 5.2.9 "FADT",
//! 5.2.10 "FACS", 5.2.11.1 "DSDT", 5.2.12 "MADT", 7.4.2 "\_Sx", 6.4 "Resource Data Types".

#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

mod dsdt;
mod fadt;
mod madt;
pub mod smbios;

use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use alloc::vec::Vec;
use core::fmt;

pub use dsdt::{PCI_MMIO32_WINDOW_END, PCI_MMIO32_WINDOW_START};

/// OEM ID in every table header (6 bytes, ASCII).
pub const OEM_ID: [u8; 6] = *b"RINGZ0";
/// OEM table ID in every table header (8 bytes, ASCII).
pub const OEM_TABLE_ID: [u8; 8] = *b"RINGZERO";
/// OEM revision in every table header.
pub const OEM_REVISION: u32 = 1;

/// The platform a VM's tables describe. The device models behind these ports and addresses
/// are the VMM's; this crate only tells the guest where they are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlatformDescription {
    /// Number of vCPUs; their local APIC IDs (and ACPI processor UIDs) are `0..cpus`.
    /// 1..=255 (xAPIC IDs are 8-bit and 0xFF is the broadcast ID).
    pub cpus: u32,
    /// I/O APIC MMIO base, normally 0xFEC0_0000. Its GSI base is 0 (it takes ISA IRQs 0..15).
    pub io_apic_address: u32,
    /// I/O APIC ID.
    pub io_apic_id: u8,
    /// Local APIC MMIO base, normally 0xFEE0_0000.
    pub local_apic_address: u32,
    /// PM1a event block (4 bytes: PM1_STS then PM1_EN, 16 bits each).
    pub pm1a_event_port: u16,
    /// PM1a control block (2 bytes: PM1_CNT). The model must read SCI_EN = 1: the FADT has
    /// no SMI command port, which tells the OS ACPI mode is always on.
    pub pm1a_control_port: u16,
    /// PM timer (4 bytes, 24-bit counter at 3.579545 MHz); 0 means no PM timer.
    pub pm_timer_port: u16,
    /// ISA IRQ of the SCI, normally 9 (routed to the same GSI, level, active high).
    pub sci_irq: u8,
    /// SLP_TYP value for S5 (soft off), 0..=7, normally 5.
    pub s5_sleep_type: u8,
    /// Expose a PCI root bridge (`\_SB.PCI0`, PNP0A03) using configuration mechanism 1
    /// (ports 0xCF8..0xCFF).
    pub pci_config_ports: bool,
    /// Expose COM1 (`\_SB.COM1`, PNP0501, ports 0x3F8..0x3FF, IRQ 4).
    pub com1: bool,
}

impl PlatformDescription {
    /// The usual PC layout for `cpus` vCPUs: I/O APIC 0 at 0xFEC0_0000, local APICs at
    /// 0xFEE0_0000, PIIX4-style PM registers at 0x600 (event), 0x604 (control), 0x608 (timer),
    /// SCI on IRQ 9, S5 type 5, PCI config ports and COM1.
    pub fn pc(cpus: u32) -> Self {
        Self {
            cpus,
            io_apic_address: 0xFEC0_0000,
            io_apic_id: 0,
            local_apic_address: 0xFEE0_0000,
            pm1a_event_port: 0x600,
            pm1a_control_port: 0x604,
            pm_timer_port: 0x608,
            sci_irq: 9,
            s5_sleep_type: 5,
            pci_config_ports: true,
            com1: true,
        }
    }
}

/// A VM's ACPI tables: `bytes` is copied to guest-physical `base` (the `base` given to
/// [`build`]); the RSDP is at `base + rsdp_offset`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiTables {
    pub bytes: Vec<u8>,
    pub rsdp_offset: usize,
}

/// Why a table set cannot be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcpiBuildError {
    /// `cpus` is 0 or above [`MAX_CPUS`].
    CpuCount { cpus: u32 },
    /// `base` is not 16-byte aligned (the RSDP must be, ACPI 6.5 5.2.5.1).
    BaseMisaligned { base: u64 },
    /// The blob would run past the end of the 64-bit physical address space.
    AddressOverflow { base: u64 },
    /// `s5_sleep_type` does not fit PM1_CNT.SLP_TYP (3 bits).
    SleepType { value: u8 },
    /// `sci_irq` is not an ISA IRQ that can carry the SCI (1, 3..=15).
    SciIrq { irq: u8 },
    /// A required PM register port is 0, or its block runs past port 0xFFFF.
    PmPort { register: &'static str, port: u16 },
}

impl fmt::Display for AcpiBuildError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::CpuCount { cpus } => {
                write!(formatter, "cpus = {cpus}: must be 1..={MAX_CPUS}")
            }
            Self::BaseMisaligned { base } => {
                write!(formatter, "ACPI base {base:#x} is not 16-byte aligned")
            }
            Self::AddressOverflow { base } => {
                write!(
                    formatter,
                    "ACPI tables at {base:#x} overflow the address space"
                )
            }
            Self::SleepType { value } => {
                write!(
                    formatter,
                    "S5 sleep type {value} does not fit SLP_TYP (0..=7)"
                )
            }
            Self::SciIrq { irq } => {
                write!(formatter, "SCI IRQ {irq}: must be an ISA IRQ 1 or 3..=15")
            }
            Self::PmPort { register, port } => {
                write!(
                    formatter,
                    "{register} port {port:#x} is 0 or runs past 0xffff"
                )
            }
        }
    }
}

/// The first I/O APIC pin of the PCI INTx lines (pins 16-19: above the ISA IRQs).
pub const PCI_INTX_FIRST_GSI: u32 = 16;

/// The GSI (I/O APIC pin) that INTx pin `pin` (0 = INTA#) of PCI device `device` on bus 0 is
/// wired to: the conventional swizzle `16 + (device + pin) % 4`, so neighbouring devices'
/// INTA# lines land on different pins. The DSDT's `_PRT` says the same to the guest; the VMM
/// routes the device models' lines with it.
pub const fn pci_intx_gsi(device: u8, pin: u8) -> u32 {
    PCI_INTX_FIRST_GSI + (device as u32 + pin as u32) % 4
}

/// Most vCPUs the MADT can describe with (8-bit) Processor Local APIC entries.
pub const MAX_CPUS: u32 = 255;

/// The RSDP's structure size (ACPI 2.0+). See: ACPI 6.5 Table 5.3.
const RSDP_LENGTH: u64 = 36;
/// XSDT entries: FADT and MADT.
const XSDT_ENTRIES: u64 = 2;
/// SDT header size. See: ACPI 6.5 Table 5.4.
const SDT_HEADER_LENGTH: u64 = 36;
/// The FACS must be 64-byte aligned. See: ACPI 6.5 5.2.10.
const FACS_ALIGNMENT: u64 = 64;
/// Alignment of the other tables (not required; keeps 64-bit fields naturally aligned).
const TABLE_ALIGNMENT: u64 = 8;

/// Builds RSDP, XSDT, FADT, FACS, DSDT and MADT for `platform` into one blob to be placed at
/// guest-physical `base` (16-byte aligned). All checksums are valid and every pointer inside
/// the tables is `base` + the pointee's offset in the blob; the RSDP is first.
pub fn build(platform: &PlatformDescription, base: u64) -> Result<AcpiTables, AcpiBuildError> {
    validate(platform, base)?;

    // 1. The tables without pointers to other tables: their sizes fix the layout.
    let dsdt = dsdt::build(platform);
    let madt = madt::build(platform);

    // 2. Layout: physical addresses from `base`, checked against overflow.
    let overflow = AcpiBuildError::AddressOverflow { base };
    let rsdp_address = base;
    let xsdt_address = after(rsdp_address, RSDP_LENGTH, TABLE_ALIGNMENT).ok_or(overflow)?;
    let xsdt_length = SDT_HEADER_LENGTH + 8 * XSDT_ENTRIES;
    let fadt_address = after(xsdt_address, xsdt_length, TABLE_ALIGNMENT).ok_or(overflow)?;
    let facs_address = after(fadt_address, fadt::LENGTH, FACS_ALIGNMENT).ok_or(overflow)?;
    let dsdt_address = after(facs_address, fadt::FACS_LENGTH, TABLE_ALIGNMENT).ok_or(overflow)?;
    let madt_address = after(dsdt_address, dsdt.len() as u64, TABLE_ALIGNMENT).ok_or(overflow)?;
    let end = madt_address
        .checked_add(madt.len() as u64)
        .ok_or(overflow)?;

    // 3. The tables that point at others.
    let fadt = fadt::build(platform, dsdt_address, facs_address);
    let facs = fadt::build_facs();
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_address);
    xsdt.add_entry(madt_address);
    let rsdp = Rsdp::new(OEM_ID, xsdt_address);

    // 4. One blob, zero-filled between tables.
    let length = usize::try_from(end - base).map_err(|_| overflow)?;
    let mut bytes = alloc::vec![0u8; length];
    let mut place = |address: u64, table: &dyn Aml| {
        let mut serialized = Vec::new();
        table.to_aml_bytes(&mut serialized);
        let offset = (address - base) as usize;
        bytes[offset..offset + serialized.len()].copy_from_slice(&serialized);
        serialized.len()
    };
    let placed = [
        (place(rsdp_address, &rsdp), RSDP_LENGTH),
        (place(xsdt_address, &xsdt), xsdt_length),
        (place(fadt_address, &fadt), fadt::LENGTH),
        (place(facs_address, &facs), fadt::FACS_LENGTH),
        (place(dsdt_address, &dsdt), dsdt.len() as u64),
        (place(madt_address, &madt), madt.len() as u64),
    ];
    debug_assert!(placed
        .iter()
        .all(|&(written, planned)| written as u64 == planned));

    Ok(AcpiTables {
        bytes,
        rsdp_offset: 0,
    })
}

/// Rejects descriptions the tables cannot express.
fn validate(platform: &PlatformDescription, base: u64) -> Result<(), AcpiBuildError> {
    if platform.cpus == 0 || platform.cpus > MAX_CPUS {
        return Err(AcpiBuildError::CpuCount {
            cpus: platform.cpus,
        });
    }
    if !base.is_multiple_of(16) {
        return Err(AcpiBuildError::BaseMisaligned { base });
    }
    if platform.s5_sleep_type > 7 {
        return Err(AcpiBuildError::SleepType {
            value: platform.s5_sleep_type,
        });
    }
    // IRQ 0 is the timer (overridden to GSI 2), IRQ 2 the cascade; beyond 15 is not ISA.
    if matches!(platform.sci_irq, 0 | 2) || platform.sci_irq > 15 {
        return Err(AcpiBuildError::SciIrq {
            irq: platform.sci_irq,
        });
    }
    let ports = [
        (
            "PM1a event",
            platform.pm1a_event_port,
            fadt::PM1_EVENT_LENGTH,
        ),
        (
            "PM1a control",
            platform.pm1a_control_port,
            fadt::PM1_CONTROL_LENGTH,
        ),
        ("PM timer", platform.pm_timer_port, fadt::PM_TIMER_LENGTH),
    ];
    for (register, port, length) in ports {
        let optional = register == "PM timer";
        let fits = port.checked_add(u16::from(length) - 1).is_some();
        if (port == 0 && !optional) || !fits {
            return Err(AcpiBuildError::PmPort { register, port });
        }
    }
    Ok(())
}

/// The first `alignment`-aligned address after a table of `length` bytes at `address`.
fn after(address: u64, length: u64, alignment: u64) -> Option<u64> {
    align_up(address.checked_add(length)?, alignment)
}

fn align_up(address: u64, alignment: u64) -> Option<u64> {
    Some(address.checked_add(alignment - 1)? & !(alignment - 1))
}

/// The 8-bit sum of `bytes` (0 for a correctly checksummed table).
#[cfg(test)]
fn byte_sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, byte| sum.wrapping_add(*byte))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_impossible_descriptions() {
        let good = PlatformDescription::pc(2);
        assert!(build(&good, 0xE0000).is_ok());
        for cpus in [0, 256] {
            let platform = PlatformDescription { cpus, ..good };
            assert_eq!(
                build(&platform, 0xE0000),
                Err(AcpiBuildError::CpuCount { cpus })
            );
        }
        assert_eq!(
            build(&good, 0xE0008),
            Err(AcpiBuildError::BaseMisaligned { base: 0xE0008 })
        );
        assert_eq!(
            build(&good, u64::MAX - 15),
            Err(AcpiBuildError::AddressOverflow {
                base: u64::MAX - 15
            })
        );
        let platform = PlatformDescription {
            s5_sleep_type: 8,
            ..good
        };
        assert_eq!(
            build(&platform, 0),
            Err(AcpiBuildError::SleepType { value: 8 })
        );
        for irq in [0, 2, 16] {
            let platform = PlatformDescription {
                sci_irq: irq,
                ..good
            };
            assert_eq!(build(&platform, 0), Err(AcpiBuildError::SciIrq { irq }));
        }
        let platform = PlatformDescription {
            pm1a_control_port: 0,
            ..good
        };
        assert!(matches!(
            build(&platform, 0),
            Err(AcpiBuildError::PmPort { .. })
        ));
        let platform = PlatformDescription {
            pm_timer_port: 0xFFFE,
            ..good
        };
        assert!(matches!(
            build(&platform, 0),
            Err(AcpiBuildError::PmPort { .. })
        ));
    }

    #[test]
    fn planned_lengths_match_the_builders() {
        assert_eq!(Rsdp::len() as u64, RSDP_LENGTH);
        assert_eq!(acpi_tables::fadt::FADT::len() as u64, fadt::LENGTH);
        assert_eq!(acpi_tables::facs::FACS::len() as u64, fadt::FACS_LENGTH);
    }

    #[test]
    fn rsdp_is_first_and_checksummed() {
        let tables = build(&PlatformDescription::pc(1), 0xE0000).unwrap();
        assert_eq!(tables.rsdp_offset, 0);
        assert_eq!(&tables.bytes[..8], b"RSD PTR ");
        assert_eq!(byte_sum(&tables.bytes[..20]), 0);
        assert_eq!(byte_sum(&tables.bytes[..36]), 0);
    }

    #[test]
    fn tables_above_4_gib_use_only_64_bit_pointers() {
        let base = 0x1_0000_0000;
        let tables = build(&PlatformDescription::pc(1), base).unwrap();
        let at = (0..tables.bytes.len() - 4)
            .step_by(8)
            .find(|&at| &tables.bytes[at..at + 4] == b"FACP")
            .unwrap();
        let fadt = &tables.bytes[at..at + fadt::LENGTH as usize];
        let read_u32 = |at: usize| u32::from_le_bytes(fadt[at..at + 4].try_into().unwrap());
        let read_u64 = |at: usize| u64::from_le_bytes(fadt[at..at + 8].try_into().unwrap());
        // FIRMWARE_CTRL, DSDT (32-bit) are 0; X_FIRMWARE_CTRL, X_DSDT point above 4 GiB.
        assert_eq!(read_u32(36), 0);
        assert_eq!(read_u32(40), 0);
        assert!(read_u64(132) >= base);
        assert!(read_u64(140) >= base);
        assert_eq!(byte_sum(fadt), 0);
    }
}
