//! Reads the built tables back as a guest would: the `acpi` crate (rust-osdev, the parser the
//! hypervisor itself uses on the host's tables) walks RSDP -> XSDT -> FADT/MADT -> DSDT through
//! a `Handler` that maps "physical" addresses into the blob; checksums are also summed here
//! independently; the project's `\_S5` scanner must find the sleep type; and, where `iasl` is
//! installed (Debian package acpica-tools), ACPICA's disassembler must accept every table.

use acpi::address::AddressSpace;
use acpi::rsdp::Rsdp;
use acpi::sdt::fadt::Fadt;
use acpi::sdt::madt::{Madt, MadtEntry};
use acpi::sdt::{SdtHeader, Signature};
use acpi::{AcpiTable, AcpiTables, Handler, PciAddress, PhysicalMapping, RawPhysicalMapping};
use core::ptr::NonNull;
use ringzero_acpi::{build, PlatformDescription};
use ringzero_x86::acpi_sleep::{find_s5, SleepType};

/// Guest-physical memory holding nothing but the blob, at `base`.
#[derive(Clone, Copy)]
struct BlobMemory {
    base: usize,
    bytes: &'static [u8],
}

impl BlobMemory {
    fn new(bytes: Vec<u8>, base: u64) -> Self {
        Self {
            base: usize::try_from(base).unwrap(),
            bytes: Box::leak(bytes.into_boxed_slice()),
        }
    }

    /// The blob bytes at guest-physical `address`, `length` long; panics (fails the test) when
    /// a pointer in the tables leads outside the blob.
    fn slice(&self, address: u64, length: usize) -> &'static [u8] {
        let offset = usize::try_from(address)
            .ok()
            .and_then(|address| address.checked_sub(self.base))
            .unwrap_or_else(|| panic!("address {address:#x} is below the blob"));
        self.bytes
            .get(offset..offset + length)
            .unwrap_or_else(|| panic!("{length} bytes at {address:#x} run past the blob"))
    }
}

impl Handler for BlobMemory {
    unsafe fn map_physical_region<T>(
        &self,
        physical_address: usize,
        size: usize,
    ) -> RawPhysicalMapping<T> {
        let region = self.slice(physical_address as u64, size);
        let virtual_start = NonNull::from(region).cast::<T>();
        // SAFETY: `region` is `size` bytes of a leaked (never freed, never written) blob; every
        // type the `acpi` crate maps there is `repr(C, packed)` (alignment 1).
        unsafe { RawPhysicalMapping::new(physical_address, virtual_start, size, size) }
    }

    unsafe fn unmap_physical_region<T>(&self, _region: RawPhysicalMapping<T>) {}

    fn read_u8(&self, _address: usize) -> u8 {
        unreachable!("static tables only")
    }
    fn read_u16(&self, _address: usize) -> u16 {
        unreachable!("static tables only")
    }
    fn read_u32(&self, _address: usize) -> u32 {
        unreachable!("static tables only")
    }
    fn read_u64(&self, _address: usize) -> u64 {
        unreachable!("static tables only")
    }
    fn write_u8(&self, _address: usize, _value: u8) {}
    fn write_u16(&self, _address: usize, _value: u16) {}
    fn write_u32(&self, _address: usize, _value: u32) {}
    fn write_u64(&self, _address: usize, _value: u64) {}
    fn read_io_u8(&self, _port: u16) -> u8 {
        unreachable!("static tables only")
    }
    fn read_io_u16(&self, _port: u16) -> u16 {
        unreachable!("static tables only")
    }
    fn read_io_u32(&self, _port: u16) -> u32 {
        unreachable!("static tables only")
    }
    fn write_io_u8(&self, _port: u16, _value: u8) {}
    fn write_io_u16(&self, _port: u16, _value: u16) {}
    fn write_io_u32(&self, _port: u16, _value: u32) {}
    fn read_pci_u8(&self, _address: PciAddress, _offset: u16) -> u8 {
        unreachable!("static tables only")
    }
    fn read_pci_u16(&self, _address: PciAddress, _offset: u16) -> u16 {
        unreachable!("static tables only")
    }
    fn read_pci_u32(&self, _address: PciAddress, _offset: u16) -> u32 {
        unreachable!("static tables only")
    }
    fn write_pci_u8(&self, _address: PciAddress, _offset: u16, _value: u8) {}
    fn write_pci_u16(&self, _address: PciAddress, _offset: u16, _value: u16) {}
    fn write_pci_u32(&self, _address: PciAddress, _offset: u16, _value: u32) {}
    fn nanos_since_boot(&self) -> u64 {
        0
    }
    fn stall(&self, _microseconds: u64) {}
    fn sleep(&self, _milliseconds: u64) {}
}

/// Where a BIOS scans for the RSDP (0xE0000..0xFFFFF).
const BIOS_AREA: u64 = 0xE0000;

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

fn byte_sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, byte| sum.wrapping_add(*byte))
}

/// A whole SDT (by its header's length) at `address`.
fn table(memory: &BlobMemory, address: u64) -> &'static [u8] {
    let length = read_u32(memory.slice(address, 8), 4) as usize;
    memory.slice(address, length)
}

/// Builds the tables for `platform` at `base` and checks everything a guest relies on.
fn check(platform: &PlatformDescription, base: u64) {
    let tables = build(platform, base).unwrap();
    assert_eq!(tables.rsdp_offset, 0);
    let memory = BlobMemory::new(tables.bytes, base);
    let rsdp_address = base as usize + tables.rsdp_offset;

    // RSDP: signature, both checksums, revision 2, an XSDT and no RSDT.
    // SAFETY: the handler maps the blob, which holds the RSDP at this address.
    let rsdp = unsafe { PhysicalMapping::<_, Rsdp>::new(rsdp_address, size_of::<Rsdp>(), memory) };
    rsdp.validate().unwrap();
    assert_eq!(rsdp.revision(), 2);
    assert_eq!(rsdp.rsdt_address(), 0);
    assert_eq!(rsdp.length(), 36);
    let xsdt_address = rsdp.xsdt_address();

    // SAFETY: as above; the RSDP's pointers lead into the blob (the handler checks).
    let acpi_tables = unsafe { AcpiTables::from_rsdp(memory, rsdp_address) }.unwrap();
    let signatures: Vec<Signature> = acpi_tables
        .table_headers()
        .map(|(_, header)| header.signature)
        .collect();
    assert_eq!(signatures, [Signature::FADT, Signature::MADT]);

    // FADT.
    let fadt = acpi_tables.find_table::<Fadt>().unwrap();
    fadt.validate().unwrap();
    assert_eq!(fadt.header.revision, 6);
    assert_eq!({ fadt.fadt_minor_version }, 5);
    assert_eq!({ fadt.header.length }, 276);
    assert_eq!({ fadt.sci_interrupt }, u16::from(platform.sci_irq));
    assert_eq!({ fadt.smi_cmd_port }, 0, "always in ACPI mode");
    let pm1a_event = fadt.pm1a_event_block().unwrap();
    assert_eq!(pm1a_event.address_space, AddressSpace::SystemIo);
    assert_eq!(pm1a_event.address, u64::from(platform.pm1a_event_port));
    assert_eq!(pm1a_event.bit_width, 32);
    assert_eq!(
        { fadt.pm1a_event_block },
        u32::from(platform.pm1a_event_port)
    );
    let pm1a_control = fadt.pm1a_control_block().unwrap();
    assert_eq!(pm1a_control.address_space, AddressSpace::SystemIo);
    assert_eq!(pm1a_control.address, u64::from(platform.pm1a_control_port));
    assert_eq!(pm1a_control.bit_width, 16);
    assert_eq!(
        { fadt.pm1a_control_block },
        u32::from(platform.pm1a_control_port)
    );
    let timer = fadt.pm_timer_block().unwrap().unwrap();
    assert_eq!(timer.address_space, AddressSpace::SystemIo);
    assert_eq!(timer.address, u64::from(platform.pm_timer_port));
    assert_eq!(timer.bit_width, 32);
    assert!(fadt.pm1b_event_block().unwrap().is_none());
    assert!(fadt.pm1b_control_block().unwrap().is_none());
    let flags = { fadt.flags };
    assert!(flags.supports_equivalent_to_wbinvd());
    assert!(flags.all_procs_support_c1_power_state());
    assert!(flags.power_button_is_control_method());
    assert!(flags.sleep_button_is_control_method());
    assert!(!flags.system_is_hw_reduced_acpi());
    assert!(!flags.pm_timer_is_32_bit());

    // DSDT: where the FADT says (32- and 64-bit fields agree), checksummed.
    let dsdt_address = fadt.dsdt_address().unwrap();
    assert_eq!({ fadt.dsdt_address } as usize, dsdt_address);
    let dsdt_info = acpi_tables.dsdt().unwrap();
    assert_eq!(dsdt_info.phys_address, dsdt_address);
    assert_eq!(dsdt_info.revision, 2);
    // SAFETY: the DSDT lies in the blob; the whole table is mapped for the checksum.
    let dsdt_header = unsafe {
        PhysicalMapping::<_, SdtHeader>::new(dsdt_address, dsdt_info.length as usize, memory)
    };
    // SAFETY: `dsdt_header` maps the table's full length.
    unsafe { dsdt_header.validate(Signature::DSDT) }.unwrap();
    let dsdt = memory.slice(dsdt_address as u64, dsdt_info.length as usize);
    let s5 = platform.s5_sleep_type;
    assert_eq!(find_s5(dsdt), Some(SleepType { a: s5, b: s5 }));

    // FACS: 64-byte aligned, signature, length.
    let facs_address = fadt.facs_address().unwrap();
    assert_eq!(facs_address % 64, 0);
    let facs = memory.slice(facs_address as u64, 64);
    assert_eq!(&facs[..4], b"FACS");
    assert_eq!(read_u32(facs, 4), 64);

    // MADT.
    let madt_mapping = acpi_tables.find_table::<Madt>().unwrap();
    let madt = madt_mapping.get();
    madt.validate().unwrap();
    assert_eq!({ madt.local_apic_address }, platform.local_apic_address);
    assert!(madt.supports_8259());
    let mut local_apic_ids = Vec::new();
    let mut io_apics = Vec::new();
    let mut overrides = Vec::new();
    let mut nmis = Vec::new();
    for entry in madt.entries() {
        match entry {
            MadtEntry::LocalApic(local_apic) => {
                assert_eq!(local_apic.processor_id, local_apic.apic_id);
                assert_eq!({ local_apic.flags } & 1, 1, "enabled");
                local_apic_ids.push(u32::from(local_apic.apic_id));
            }
            MadtEntry::IoApic(io_apic) => {
                io_apics.push((io_apic.io_apic_id, { io_apic.io_apic_address }, {
                    io_apic.global_system_interrupt_base
                }))
            }
            MadtEntry::InterruptSourceOverride(entry) => {
                overrides.push((entry.bus, entry.irq, { entry.global_system_interrupt }, {
                    entry.flags
                }))
            }
            MadtEntry::LocalApicNmi(entry) => {
                nmis.push((entry.processor_id, { entry.flags }, entry.nmi_line))
            }
            other => panic!("unexpected MADT entry {other:?}"),
        }
    }
    assert_eq!(local_apic_ids, (0..platform.cpus).collect::<Vec<_>>());
    assert_eq!(
        io_apics,
        [(platform.io_apic_id, platform.io_apic_address, 0)]
    );
    let sci = platform.sci_irq;
    // (bus ISA, IRQ, GSI, MPS INTI flags): IRQ 0 -> GSI 2 edge/high; SCI level/high.
    assert_eq!(overrides, [(0, 0, 2, 0x5), (0, sci, u32::from(sci), 0xD)]);
    assert_eq!(nmis, [(0xFF, 0x5, 1)]);

    // Independently of the `acpi` crate: every table's bytes sum to 0 and every pointer in
    // the XSDT and FADT leads to the table it should.
    let rsdp_bytes = memory.slice(rsdp_address as u64, 36);
    assert_eq!(byte_sum(&rsdp_bytes[..20]), 0);
    assert_eq!(byte_sum(rsdp_bytes), 0);
    assert_eq!(read_u64(rsdp_bytes, 24), xsdt_address);
    let xsdt = table(&memory, xsdt_address);
    assert_eq!(&xsdt[..4], b"XSDT");
    assert_eq!(byte_sum(xsdt), 0);
    assert_eq!(xsdt.len(), 36 + 2 * 8);
    let fadt_bytes = table(&memory, read_u64(xsdt, 36));
    let madt_bytes = table(&memory, read_u64(xsdt, 44));
    assert_eq!(&fadt_bytes[..4], b"FACP");
    assert_eq!(&madt_bytes[..4], b"APIC");
    let dsdt_bytes = table(&memory, read_u64(fadt_bytes, 140));
    assert_eq!(
        u64::from(read_u32(fadt_bytes, 40)),
        read_u64(fadt_bytes, 140)
    );
    assert_eq!(&dsdt_bytes[..4], b"DSDT");
    for bytes in [xsdt, fadt_bytes, madt_bytes, dsdt_bytes] {
        assert_eq!(
            byte_sum(bytes),
            0,
            "{:?}",
            core::str::from_utf8(&bytes[..4])
        );
    }
}

#[test]
fn tables_parse_back_for_1_2_and_4_cpus() {
    for cpus in [1, 2, 4] {
        check(&PlatformDescription::pc(cpus), BIOS_AREA);
    }
}

#[test]
fn tables_parse_back_with_other_values_and_places() {
    let platform = PlatformDescription {
        cpus: 255,
        io_apic_address: 0xFEC1_0000,
        io_apic_id: 3,
        local_apic_address: 0xFEE0_0000,
        pm1a_event_port: 0xB000,
        pm1a_control_port: 0xB004,
        pm_timer_port: 0xB008,
        sci_irq: 10,
        s5_sleep_type: 7,
        pci_config_ports: false,
        com1: false,
    };
    check(&platform, 0x9_FC00);
    check(&PlatformDescription::pc(3), 0x7FFF_0010);
}

#[test]
fn the_blob_fits_the_bios_area_for_many_cpus() {
    let tables = build(&PlatformDescription::pc(255), BIOS_AREA).unwrap();
    assert!(BIOS_AREA + tables.bytes.len() as u64 <= 0x10_0000);
}

/// ACPICA's disassembler (`iasl -d`) accepts every table, and the DSDT decompiles to the
/// expected objects. Skipped with a note when `iasl` is not installed.
#[test]
fn iasl_disassembles_the_tables() {
    if std::process::Command::new("iasl")
        .arg("-v")
        .output()
        .is_err()
    {
        eprintln!(
            "note: iasl not installed (apt package acpica-tools); skipping the disassembly check"
        );
        return;
    }
    let base = BIOS_AREA;
    let tables = build(&PlatformDescription::pc(2), base).unwrap();
    let memory = BlobMemory::new(tables.bytes, base);
    let xsdt_address = read_u64(memory.slice(base, 36), 24);
    let xsdt = table(&memory, xsdt_address);
    let fadt = table(&memory, read_u64(xsdt, 36));
    let madt = table(&memory, read_u64(xsdt, 44));
    let dsdt = table(&memory, read_u64(fadt, 140));

    let directory = std::env::temp_dir().join(format!("ringzero-acpi-iasl-{}", std::process::id()));
    std::fs::create_dir_all(&directory).unwrap();
    let mut listings = Vec::new();
    for (name, bytes) in [
        ("xsdt", xsdt),
        ("facp", fadt),
        ("apic", madt),
        ("dsdt", dsdt),
    ] {
        let path = directory.join(format!("{name}.dat"));
        std::fs::write(&path, bytes).unwrap();
        let output = std::process::Command::new("iasl")
            .arg("-d")
            .arg(&path)
            .current_dir(&directory)
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "iasl -d {name}: {log}");
        let listing = std::fs::read_to_string(directory.join(format!("{name}.dsl"))).unwrap();
        assert!(!listing.contains("Incorrect checksum"), "{name}: {listing}");
        listings.push(listing);
    }
    let dsdt_listing = &listings[3];
    for expected in [
        "Name (\\_S5, Package (0x04)",
        "Scope (\\_SB)",
        "Device (PCI0)",
        "EisaId (\"PNP0A03\")",
        "Device (COM1)",
        "EisaId (\"PNP0501\")",
        "IRQNoFlags ()",
        "{4}",
        "0x0CF8,",
    ] {
        assert!(
            dsdt_listing.contains(expected),
            "DSDT listing lacks {expected:?}:\n{dsdt_listing}"
        );
    }
    std::fs::remove_dir_all(&directory).unwrap();
}
