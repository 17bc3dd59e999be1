//! The DSDT: `\_S5` (soft off) and the devices the guest cannot find by probing: the PCI root
//! bridge and COM1.
//!
//! In ASL, what this builds is:
//! ```text
//! DefinitionBlock ("", "DSDT", 2, "RINGZ0", "RINGZERO", 1) {
//!     Name (\_S5, Package (4) { S5, S5, 0, 0 })
//!     Scope (\_SB) {
//!         Device (PCI0) {                        // if pci_config_ports
//!             Name (_HID, EisaId ("PNP0A03"))  Name (_ADR, 0)  Name (_SEG, 0)
//!             Name (_UID, 0)  Name (_BBN, 0)
//!             Name (_PRT, Package () {             // INTx: devices 1-31, pins A-D
//!                 Package () { 0x0001FFFF, 0, 0, 17 }, ...  // GSI 16 + (device + pin) % 4
//!             })
//!             Name (_CRS, ResourceTemplate () {
//!                 WordBusNumber (0x00-0xFF)
//!                 IO (Decode16, 0xCF8, 0xCF8, 1, 8)         // configuration mechanism 1
//!                 WordIO (0x0000-0x0CF7)  WordIO (0x0D00-0xFFFF)
//!                 DWordMemory (0x000A0000-0x000BFFFF)       // legacy VGA window
//!                 DWordMemory (0xC0000000-0xFEBFFFFF)       // 32-bit BAR window
//!             })
//!         }
//!         Device (COM1) {                        // if com1
//!             Name (_HID, EisaId ("PNP0501"))  Name (_UID, 1)
//!             Name (_CRS, ResourceTemplate () { IO (Decode16, 0x3F8, 0x3F8, 8, 8) IRQNoFlags () {4} })
//!         }
//!     }
//! }
//! ```
//! `\_S5` is a literal package so that a byte scan (`ringzero_x86::acpi_sleep::find_s5`)
//! finds it as well as an AML interpreter does. PCI INTx lines go to I/O APIC pins 16-19 with
//! the usual swizzle (`crate::pci_intx_gsi`), which the VMM's routing follows.
//!
//! See: ACPI 6.5 spec, 7.4.2 "\_Sx", 6.1.5 "\_HID", 6.2.2 "\_CRS", 6.4.2.1 "IRQ Descriptor",
//! 6.4.2.5 "I/O Port Descriptor", 6.4.3.5 "Address Space Resource Descriptors"; PCI Firmware
//! Specification 3.3, 4.1 (host bridge `_CRS`).

use crate::{PlatformDescription, OEM_ID, OEM_REVISION, OEM_TABLE_ID};
use acpi_tables::aml::{
    AddressSpace, AddressSpaceCacheable, Device, EISAName, Name, Package, Path, ResourceTemplate,
    Scope, IO,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::{Aml, AmlSink};
use alloc::vec::Vec;

/// First address of the PCI root bridge's 32-bit MMIO window for BARs. Guest RAM below 4 GiB
/// must end at or below this address.
pub const PCI_MMIO32_WINDOW_START: u32 = 0xC000_0000;
/// Last address of the 32-bit MMIO window: just below the I/O APIC at 0xFEC0_0000.
pub const PCI_MMIO32_WINDOW_END: u32 = 0xFEBF_FFFF;

/// DSDT revision 2: integers are 64 bits. See: ACPI 6.5 5.2.11.1.
const REVISION: u8 = 2;

const PCI_CONFIG_ADDRESS_PORT: u16 = 0xCF8;
const PCI_CONFIG_PORTS: u8 = 8;
const COM1_PORT: u16 = 0x3F8;
const COM1_PORTS: u8 = 8;
const COM1_IRQ: u8 = 4;

/// Builds the DSDT bytes (header + AML, checksummed).
pub fn build(platform: &PlatformDescription) -> Sdt {
    let mut aml = Vec::new();

    // Name (\_S5, Package (4) { S5, S5, 0, 0 }): SLP_TYPa, SLP_TYPb, reserved.
    let sleep_type = platform.s5_sleep_type;
    Name::new(
        Path::new("\\_S5_"),
        &Package::new(alloc::vec![&sleep_type, &sleep_type, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut aml);

    let pci0 = pci_root_bridge();
    let com1 = com1();
    let mut devices: Vec<&dyn Aml> = Vec::new();
    if platform.pci_config_ports {
        devices.push(&pci0);
    }
    if platform.com1 {
        devices.push(&com1);
    }
    if !devices.is_empty() {
        Scope::new(Path::new("\\_SB_"), devices).to_aml_bytes(&mut aml);
    }

    let mut dsdt = Sdt::new(*b"DSDT", 36, REVISION, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&aml);
    dsdt
}

/// `Device (PCI0)`, serialized: a PNP0A03 host bridge decoding bus 0 through ports
/// 0xCF8..0xCFF, forwarding the rest of the I/O space and the usual memory windows.
fn pci_root_bridge() -> Serialized {
    let bus_numbers = AddressSpace::<u16>::new_bus_number(0x00, 0xFF);
    let config_ports = IO::new(
        PCI_CONFIG_ADDRESS_PORT,
        PCI_CONFIG_ADDRESS_PORT,
        1,
        PCI_CONFIG_PORTS,
    );
    let io_below_config = AddressSpace::<u16>::new_io(0x0000, PCI_CONFIG_ADDRESS_PORT - 1, None);
    let io_above_config = AddressSpace::<u16>::new_io(0x0D00, 0xFFFF, None);
    let vga_window = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::Cacheable,
        true,
        0xA_0000,
        0xB_FFFF,
        None,
    );
    let bar_window = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO32_WINDOW_START,
        PCI_MMIO32_WINDOW_END,
        None,
    );
    let resources = ResourceTemplate::new(alloc::vec![
        &bus_numbers,
        &config_ports,
        &io_below_config,
        &io_above_config,
        &vga_window,
        &bar_window,
    ]);

    let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0A03"));
    let adr = Name::new(Path::new("_ADR"), &0u8);
    let seg = Name::new(Path::new("_SEG"), &0u8);
    let uid = Name::new(Path::new("_UID"), &0u8);
    let bbn = Name::new(Path::new("_BBN"), &0u8);
    let crs = Name::new(Path::new("_CRS"), &resources);
    let prt = interrupt_routing_table();
    let prt = Name::new(Path::new("_PRT"), &prt);
    serialize(&Device::new(
        Path::new("PCI0"),
        alloc::vec![&hid, &adr, &seg, &uid, &bbn, &crs, &prt],
    ))
}

/// `_PRT`, serialized: for every device 1..=31 on bus 0 and each pin INTA#..INTD#,
/// `Package { 0xDDDDFFFF, pin, 0, gsi }` (no link device: the GSI is hard-wired, level
/// triggered, active low) with the GSI from [`crate::pci_intx_gsi`].
/// See: ACPI 6.5 6.2.13 "_PRT (PCI Routing Table)".
fn interrupt_routing_table() -> Serialized {
    let mut entries = Vec::new();
    for device in 1u8..32 {
        for pin in 0u8..4 {
            let address = u32::from(device) << 16 | 0xFFFF;
            let gsi = crate::pci_intx_gsi(device, pin);
            entries.push(serialize(&Package::new(alloc::vec![
                &address, &pin, &0u8, &gsi
            ])));
        }
    }
    let children: Vec<&dyn Aml> = entries.iter().map(|entry| entry as &dyn Aml).collect();
    serialize(&Package::new(children))
}

/// `Device (COM1)`, serialized: the first 16550 UART at 0x3F8, ISA IRQ 4.
fn com1() -> Serialized {
    let ports = IO::new(COM1_PORT, COM1_PORT, COM1_PORTS, COM1_PORTS);
    let irq = IrqNoFlags { irq: COM1_IRQ };
    let resources = ResourceTemplate::new(alloc::vec![&ports, &irq]);
    let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0501"));
    let uid = Name::new(Path::new("_UID"), &1u8);
    let crs = Name::new(Path::new("_CRS"), &resources);
    serialize(&Device::new(
        Path::new("COM1"),
        alloc::vec![&hid, &uid, &crs],
    ))
}

/// The short IRQ descriptor without the flags byte (`IRQNoFlags () {n}`): edge-triggered,
/// active-high, exclusive, as ISA devices are. `acpi_tables` only has the extended (GSI)
/// interrupt descriptor. See: ACPI 6.5 6.4.2.1, Table 6.201.
struct IrqNoFlags {
    irq: u8,
}

/// Small resource item tag: type 0x04 (IRQ) in bits 6:3, length 2 in bits 2:0.
const IRQ_NO_FLAGS_TAG: u8 = (0x04 << 3) | 2;

impl Aml for IrqNoFlags {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.byte(IRQ_NO_FLAGS_TAG);
        sink.word(1u16 << (self.irq & 0xF));
    }
}

/// An AML object already serialized, so builders can return it without borrowing their
/// parts; its bytes are emitted as they are.
struct Serialized(Vec<u8>);

impl Aml for Serialized {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

fn serialize(object: &dyn Aml) -> Serialized {
    let mut bytes = Vec::new();
    object.to_aml_bytes(&mut bytes);
    Serialized(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_routing_table_follows_the_swizzle() {
        let dsdt = build(&PlatformDescription::pc(1));
        let aml = dsdt.as_slice();
        let at = aml
            .windows(4)
            .position(|window| window == b"_PRT")
            .expect("a _PRT");
        // NameOp "_PRT" PackageOp PkgLength(2 bytes) NumElements(124), then the first entry:
        // PackageOp PkgLength NumElements(4) DWordPrefix 0x0001FFFF Zero Zero BytePrefix 17.
        assert_eq!(aml[at + 7], 124);
        assert_eq!(
            &aml[at + 8..at + 20],
            &[0x12, 0x0B, 0x04, 0x0C, 0xFF, 0xFF, 0x01, 0x00, 0x00, 0x00, 0x0A, 17]
        );
        assert_eq!(crate::pci_intx_gsi(1, 0), 17);
        assert_eq!(crate::pci_intx_gsi(3, 1), 16);
        if let Ok(path) = std::env::var("RINGZERO_DUMP_DSDT") {
            std::fs::write(path, aml).unwrap();
        }
    }

    #[test]
    fn s5_package_is_literal() {
        let dsdt = build(&PlatformDescription::pc(1));
        let aml = &dsdt.as_slice()[36..];
        // NameOp '\' "_S5_" PackageOp PkgLength(8) NumElements(4) 0x0A 5 0x0A 5 Zero Zero
        assert_eq!(
            &aml[..15],
            &[0x08, b'\\', b'_', b'S', b'5', b'_', 0x12, 0x08, 0x04, 0x0A, 5, 0x0A, 5, 0, 0]
        );
        assert_eq!(crate::byte_sum(dsdt.as_slice()), 0);
    }

    #[test]
    fn devices_follow_the_description() {
        let contains = |haystack: &[u8], needle: &[u8]| {
            haystack
                .windows(needle.len())
                .any(|window| window == needle)
        };
        let all = build(&PlatformDescription::pc(1));
        assert!(contains(all.as_slice(), b"PCI0"));
        assert!(contains(all.as_slice(), b"COM1"));
        // IO (Decode16, 0xCF8, 0xCF8, 1, 8) and IRQNoFlags () {4}.
        assert!(contains(
            all.as_slice(),
            &[0x47, 1, 0xF8, 0x0C, 0xF8, 0x0C, 1, 8]
        ));
        assert!(contains(all.as_slice(), &[0x22, 0x10, 0x00]));
        let none = build(&PlatformDescription {
            pci_config_ports: false,
            com1: false,
            ..PlatformDescription::pc(1)
        });
        assert!(!contains(none.as_slice(), b"_SB_"));
        assert_eq!(crate::byte_sum(none.as_slice()), 0);
    }
}
