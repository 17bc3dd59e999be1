//! The host machine as ACPI describes it: its CPUs (the MADT's local APICs) and how to power
//! off (FADT's PM1 control blocks plus the DSDT's `\_S5` sleep type). Parsing is the `acpi` crate's; this
//! file only gives it access to physical memory and keeps what the hypervisor needs.

use crate::memory::{self, HostPhysAddr};
use acpi::address::AddressSpace;
use acpi::sdt::fadt::Fadt;
use acpi::sdt::madt::{Madt, MadtEntry};
use acpi::{AcpiTables, Handler, PciAddress, PhysicalMapping};
use alloc::vec::Vec;
use core::ptr::NonNull;
use ringzero_x86::acpi_sleep::{self, SleepType};

/// How to enter ACPI S5 on this machine.
#[derive(Clone, Copy, Debug)]
pub struct AcpiPowerOff {
    pub pm1a_control_port: u16,
    pub pm1b_control_port: Option<u16>,
    pub sleep_type: SleepType,
    /// SMI command port and value that hand the PM registers to the OS (0 when ACPI is
    /// already enabled or the platform is hardware-reduced).
    pub smi_command_port: u16,
    pub acpi_enable: u8,
}

/// What the hypervisor keeps from the host's ACPI tables.
#[derive(Clone, Copy, Debug)]
pub struct HostPlatform {
    /// CPUs the MADT lists as usable (enabled or online-capable), the boot CPU included.
    pub cpu_count: u32,
    /// Local APIC IDs of the enabled CPUs, the boot CPU's first, then the others in MADT
    /// order (the same list as [`cpu_apic_ids`]).
    pub cpu_apic_ids: &'static [u32],
    pub power_off: Option<AcpiPowerOff>,
}

static CPU_APIC_IDS: spin::Once<Vec<u32>> = spin::Once::new();

/// The local APIC IDs of the host's enabled CPUs, the boot CPU's first (what [`discover`]
/// found; just the boot CPU's before it ran or without a MADT).
pub fn cpu_apic_ids() -> &'static [u32] {
    match CPU_APIC_IDS.get() {
        Some(ids) => ids,
        None => CPU_APIC_IDS.call_once(|| alloc::vec![boot_cpu_apic_id()]),
    }
}

/// The boot CPU's initial APIC ID. See: SDM Vol 2A 3.3 "CPUID", leaf 1 EBX bits 31:24.
fn boot_cpu_apic_id() -> u32 {
    ringzero_x86::hw::cpuid(1, 0).ebx >> 24
}

/// Maps physical memory for the `acpi` crate through the physical window (nothing to unmap).
#[derive(Clone, Copy)]
struct WindowHandler;

impl Handler for WindowHandler {
    unsafe fn map_physical_region<T>(
        &self,
        physical_address: usize,
        size: usize,
    ) -> acpi::RawPhysicalMapping<T> {
        let virtual_start =
            memory::physical_window(HostPhysAddr(physical_address as u64)).cast::<T>();
        let virtual_start = NonNull::new(virtual_start).expect("the physical window is never at 0");
        // SAFETY: the physical window maps all of RAM (and the firmware's ACPI regions) at a
        // fixed offset, so `size` bytes from this address are readable for the kernel's life.
        unsafe { acpi::RawPhysicalMapping::new(physical_address, virtual_start, size, size) }
    }

    unsafe fn unmap_physical_region<T>(&self, _region: acpi::RawPhysicalMapping<T>) {}

    fn read_u8(&self, _address: usize) -> u8 {
        unimplemented_access()
    }
    fn read_u16(&self, _address: usize) -> u16 {
        unimplemented_access()
    }
    fn read_u32(&self, _address: usize) -> u32 {
        unimplemented_access()
    }
    fn read_u64(&self, _address: usize) -> u64 {
        unimplemented_access()
    }
    fn write_u8(&self, _address: usize, _value: u8) {}
    fn write_u16(&self, _address: usize, _value: u16) {}
    fn write_u32(&self, _address: usize, _value: u32) {}
    fn write_u64(&self, _address: usize, _value: u64) {}
    fn read_io_u8(&self, _port: u16) -> u8 {
        unimplemented_access()
    }
    fn read_io_u16(&self, _port: u16) -> u16 {
        unimplemented_access()
    }
    fn read_io_u32(&self, _port: u16) -> u32 {
        unimplemented_access()
    }
    fn write_io_u8(&self, _port: u16, _value: u8) {}
    fn write_io_u16(&self, _port: u16, _value: u16) {}
    fn write_io_u32(&self, _port: u16, _value: u32) {}
    fn read_pci_u8(&self, _address: PciAddress, _offset: u16) -> u8 {
        unimplemented_access()
    }
    fn read_pci_u16(&self, _address: PciAddress, _offset: u16) -> u16 {
        unimplemented_access()
    }
    fn read_pci_u32(&self, _address: PciAddress, _offset: u16) -> u32 {
        unimplemented_access()
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

/// Register access is only needed by the AML interpreter, which this build does not include
/// (`acpi` without its `aml` feature); reading the static tables never calls these.
fn unimplemented_access<T: Default>() -> T {
    log::warn!("acpi: unexpected register access request (AML is not enabled)");
    T::default()
}

/// Reads the host's ACPI tables from the RSDP the bootloader found. Errors are logged and
/// give a platform with one CPU and no ACPI power-off (the emulator exit ports still work).
pub fn discover(rsdp_address: Option<u64>) -> HostPlatform {
    // (A function: the APIC ID list is fixed by its first use.)
    let fallback = || HostPlatform {
        cpu_count: 1,
        cpu_apic_ids: cpu_apic_ids(),
        power_off: None,
    };
    let Some(rsdp_address) = rsdp_address else {
        log::warn!("acpi: the bootloader found no RSDP; assuming one CPU and no ACPI power-off");
        return fallback();
    };
    // SAFETY: the bootloader located this RSDP (checksummed) in firmware memory, which the
    // physical window maps.
    let tables = match unsafe { AcpiTables::from_rsdp(WindowHandler, rsdp_address as usize) } {
        Ok(tables) => tables,
        Err(error) => {
            log::warn!("acpi: cannot read the tables at RSDP {rsdp_address:#x}: {error:?}");
            return fallback();
        }
    };
    let (cpu_count, apic_ids) = match tables.find_table::<Madt>() {
        Some(madt) => (count_usable_cpus(&madt), enabled_apic_ids(&madt)),
        None => {
            log::warn!("acpi: no MADT; assuming one CPU");
            (1, alloc::vec![boot_cpu_apic_id()])
        }
    };
    let cpu_apic_ids = CPU_APIC_IDS.call_once(|| apic_ids);
    let power_off = tables
        .find_table::<Fadt>()
        .and_then(|fadt| power_off_from(&tables, &fadt));
    HostPlatform {
        cpu_count,
        cpu_apic_ids,
        power_off,
    }
}

/// The APIC IDs of the enabled local APIC / x2APIC entries, the boot CPU's moved to the front
/// (added if the MADT forgot it). Online-capable but disabled entries are hot-plug slots, not
/// CPUs to start. See: ACPI 6.5 5.2.12.2 and 5.2.12.12 (flags bit 0 Enabled).
fn enabled_apic_ids(madt: &PhysicalMapping<WindowHandler, Madt>) -> Vec<u32> {
    const ENABLED: u32 = 1;
    let mut ids: Vec<u32> = madt
        .get()
        .entries()
        .filter_map(|entry| match entry {
            MadtEntry::LocalApic(local) if local.flags & ENABLED != 0 => {
                Some(u32::from(local.apic_id))
            }
            MadtEntry::LocalX2Apic(local) if local.flags & ENABLED != 0 => Some(local.x2apic_id),
            _ => None,
        })
        .collect();
    let boot = boot_cpu_apic_id();
    let mut seen = Vec::with_capacity(ids.len());
    ids.retain(|&id| {
        let fresh = id != boot && !seen.contains(&id);
        seen.push(id);
        fresh
    });
    ids.insert(0, boot);
    ids
}

/// Counts the local APIC / x2APIC entries that are enabled or online-capable.
/// See: ACPI 6.5 5.2.12.2 "Processor Local APIC Structure" (flags bit 0 Enabled, bit 1
/// Online Capable). (The `acpi` crate's own processor list needs a nightly feature this
/// toolchain no longer has, so the entries are walked here.)
fn count_usable_cpus(madt: &PhysicalMapping<WindowHandler, Madt>) -> u32 {
    const ENABLED_OR_ONLINE_CAPABLE: u32 = 0b11;
    let count = madt
        .get()
        .entries()
        .filter(|entry| match entry {
            MadtEntry::LocalApic(local) => local.flags & ENABLED_OR_ONLINE_CAPABLE != 0,
            MadtEntry::LocalX2Apic(local) => local.flags & ENABLED_OR_ONLINE_CAPABLE != 0,
            _ => false,
        })
        .count();
    u32::try_from(count).unwrap_or(u32::MAX).max(1)
}

fn io_port(address: acpi::address::GenericAddress) -> Option<u16> {
    (address.address_space == AddressSpace::SystemIo && address.address != 0)
        .then(|| u16::try_from(address.address).ok())
        .flatten()
}

fn power_off_from(
    tables: &AcpiTables<WindowHandler>,
    fadt: &PhysicalMapping<WindowHandler, Fadt>,
) -> Option<AcpiPowerOff> {
    let pm1a_control_port = fadt.pm1a_control_block().ok().and_then(io_port);
    let pm1b_control_port = fadt.pm1b_control_block().ok().flatten().and_then(io_port);
    let dsdt = tables.dsdt().ok()?;
    let window = memory::physical_window(HostPhysAddr(dsdt.phys_address as u64));
    // SAFETY: the DSDT's header said it is `length` bytes long; the firmware keeps it in
    // ACPI-reclaimable or NVS memory, which the physical window maps and nothing writes.
    let aml = unsafe { core::slice::from_raw_parts(window, dsdt.length as usize) };
    let sleep_type = acpi_sleep::find_s5(aml);
    if sleep_type.is_none() {
        log::warn!("acpi: no literal \\_S5 package in the DSDT; ACPI power-off unavailable");
    }
    Some(AcpiPowerOff {
        pm1a_control_port: pm1a_control_port?,
        pm1b_control_port,
        sleep_type: sleep_type?,
        smi_command_port: u16::try_from(fadt.smi_cmd_port).unwrap_or(0),
        acpi_enable: fadt.acpi_enable,
    })
}
