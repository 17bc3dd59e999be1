//! The MADT: local APIC address, one Processor Local APIC per vCPU, the I/O APIC, the ISA
//! interrupt source overrides and the LINT1 NMI.
//!
//! Laid out on `acpi_tables`' generic `Sdt` (header + checksum) because its `MADT` builder has
//! no interrupt source override or local APIC NMI entry types and no way to set the
//! PCAT_COMPAT flag; the Processor Local APIC and I/O APIC entries are still its types.
//!
//! See: ACPI 6.5 spec, 5.2.12 "Multiple APIC Description Table" (Table 5.19 header, Table 5.20
//! flags), 5.2.12.2 "Processor Local APIC", 5.2.12.3 "I/O APIC", 5.2.12.5 "Interrupt Source
//! Override" (Table 5.26 MPS INTI flags), 5.2.12.7 "Local APIC NMI".

use crate::{PlatformDescription, OEM_ID, OEM_REVISION, OEM_TABLE_ID};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;
use alloc::vec::Vec;

/// MADT revision 5 (ACPI 6.3 and later; every entry used here dates from ACPI 1.0/2.0).
const REVISION: u8 = 5;
/// Flags bit 0, PCAT_COMPAT: the VM also has the PC-AT dual 8259 setup, which the ISA IRQ
/// overrides below assume (QEMU sets it the same way). See: Table 5.20.
const PCAT_COMPAT: u32 = 1;

const INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
/// See: Table 5.25.
const INTERRUPT_SOURCE_OVERRIDE_LENGTH: u8 = 10;
const LOCAL_APIC_NMI: u8 = 4;
/// See: Table 5.28.
const LOCAL_APIC_NMI_LENGTH: u8 = 6;

/// MPS INTI flags. See: Table 5.26: polarity bits 1:0 (01 active high), trigger mode bits
/// 3:2 (01 edge, 11 level).
const ACTIVE_HIGH: u16 = 0b01;
const EDGE: u16 = 0b01 << 2;
const LEVEL: u16 = 0b11 << 2;

/// ISA bus for interrupt source overrides.
const BUS_ISA: u8 = 0;
/// Processor UID 0xFF means "all processors" in a Local APIC NMI entry.
const ALL_PROCESSORS: u8 = 0xFF;
/// The PIT's IRQ 0 arrives at I/O APIC pin 2 on PCs.
const TIMER_IRQ: u8 = 0;
const TIMER_GSI: u32 = 2;
/// The NMI pin of every local APIC.
const LINT1: u8 = 1;

/// Builds the MADT bytes (checksummed).
pub fn build(platform: &PlatformDescription) -> Sdt {
    let mut body = Vec::new();
    body.extend_from_slice(&platform.local_apic_address.to_le_bytes());
    body.extend_from_slice(&PCAT_COMPAT.to_le_bytes());
    // `validate` bounds `cpus` to 1..=255, so every ID fits 8 bits.
    for cpu in 0..platform.cpus {
        let id = u8::try_from(cpu).unwrap_or(u8::MAX);
        ProcessorLocalApic::new(id, id, EnabledStatus::Enabled).to_aml_bytes(&mut body);
    }
    // The only I/O APIC takes GSIs from 0, so ISA IRQ n is GSI n unless overridden.
    IoApic::new(platform.io_apic_id, platform.io_apic_address, 0).to_aml_bytes(&mut body);
    interrupt_source_override(&mut body, TIMER_IRQ, TIMER_GSI, EDGE | ACTIVE_HIGH);
    interrupt_source_override(
        &mut body,
        platform.sci_irq,
        u32::from(platform.sci_irq),
        LEVEL | ACTIVE_HIGH,
    );
    local_apic_nmi(&mut body, ALL_PROCESSORS, EDGE | ACTIVE_HIGH, LINT1);

    let mut madt = Sdt::new(*b"APIC", 36, REVISION, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    madt.append_slice(&body);
    madt
}

/// Appends an Interrupt Source Override: ISA `irq` arrives at `gsi` with `flags`.
/// See: Table 5.25.
fn interrupt_source_override(body: &mut Vec<u8>, irq: u8, gsi: u32, flags: u16) {
    body.extend_from_slice(&[
        INTERRUPT_SOURCE_OVERRIDE,
        INTERRUPT_SOURCE_OVERRIDE_LENGTH,
        BUS_ISA,
        irq,
    ]);
    body.extend_from_slice(&gsi.to_le_bytes());
    body.extend_from_slice(&flags.to_le_bytes());
}

/// Appends a Local APIC NMI: the processor's LINT`lint` pin is the NMI. See: Table 5.28.
fn local_apic_nmi(body: &mut Vec<u8>, processor_uid: u8, flags: u16, lint: u8) {
    body.extend_from_slice(&[LOCAL_APIC_NMI, LOCAL_APIC_NMI_LENGTH, processor_uid]);
    body.extend_from_slice(&flags.to_le_bytes());
    body.push(lint);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_laid_out_as_the_spec_tables_say() {
        let madt = build(&PlatformDescription::pc(2));
        let bytes = madt.as_slice();
        assert_eq!(&bytes[..4], b"APIC");
        assert_eq!(bytes.len(), 44 + 2 * 8 + 12 + 2 * 10 + 6);
        assert_eq!(crate::byte_sum(bytes), 0);
        // Header: local APIC address, PCAT_COMPAT.
        assert_eq!(&bytes[36..44], &[0, 0, 0xE0, 0xFE, 1, 0, 0, 0]);
        // CPU 1: type 0, length 8, UID 1, APIC ID 1, enabled.
        assert_eq!(&bytes[52..60], &[0, 8, 1, 1, 1, 0, 0, 0]);
        // I/O APIC: type 1, length 12, ID 0, reserved, 0xFEC00000, GSI base 0.
        assert_eq!(&bytes[60..72], &[1, 12, 0, 0, 0, 0, 0xC0, 0xFE, 0, 0, 0, 0]);
        // IRQ 0 -> GSI 2, edge high; IRQ 9 -> GSI 9, level high.
        assert_eq!(&bytes[72..82], &[2, 10, 0, 0, 2, 0, 0, 0, 0x05, 0]);
        assert_eq!(&bytes[82..92], &[2, 10, 0, 9, 9, 0, 0, 0, 0x0D, 0]);
        // LINT1 NMI on all processors.
        assert_eq!(&bytes[92..98], &[4, 6, 0xFF, 0x05, 0, 1]);
    }
}
