//! The host's PCI bus as the hypervisor's own drivers see it: configuration mechanism #1 at
//! ports 0xCF8/0xCFC (the `ConfigurationAccess` that `virtio-drivers`' `PciRoot` reads and
//! writes through), a walk of bus 0 and every bus behind a PCI-to-PCI bridge, and the set-up a
//! driver needs before it touches a function: its memory BARs assigned and mapped, memory
//! decoding and bus mastering on.
//!
//! Spec: PCI Local Bus Specification, Revision 3.0. Sections: 3.2.2.3.2 (configuration
//! mechanism #1, CONFIG_ADDRESS in Figure 3-2), 6.1 (header types; bit 7 of the header type
//! marks a multi-function device), 6.2.2 (Command register), 6.2.5.1 (BARs). PCI-to-PCI
//! Bridge Architecture Specification 1.2, 3.2.5.3 (secondary bus number at offset 0x19).
//!
//! The bus is walked once ([`functions`]); the hypervisor's virtio drivers (`disk`, `net`) pick
//! their function from that list ([`find_virtio`]) and get a ready transport from
//! [`virtio_transport`], with `virtio_hal::DmaHal` as their HAL.
//!
//! Port I/O always works on QEMU's `pc` machine and on Bochs (neither has ECAM); a PCIe host
//! would also answer it for the first 256 bytes of each function, which is all virtio needs.

use alloc::vec::Vec;
use core::mem::ManuallyDrop;
use ringzero_x86::hw;
use virtio_drivers::transport::pci::bus::{
    BarInfo, Command, ConfigurationAccess, DeviceFunction, MemoryBarType, PciRoot,
};
use virtio_drivers::transport::pci::{PciTransport, VirtioPciError};

use crate::memory::{self, HostPhysAddr};
use crate::virtio_hal::DmaHal;

/// CONFIG_ADDRESS and CONFIG_DATA. See: PCI 3.0 3.2.2.3.2.
const CONFIG_ADDRESS_PORT: u16 = 0xCF8;
const CONFIG_DATA_PORT: u16 = 0xCFC;
/// CONFIG_ADDRESS bit 31: the access goes to configuration space.
const CONFIG_ENABLE: u32 = 1 << 31;
/// Header type register (byte 2 of dword 0x0C); bit 7: the device has more functions.
const HEADER_TYPE_OFFSET: u8 = 0x0C;
const MULTI_FUNCTION: u32 = 1 << 23;
const HEADER_TYPE_MASK: u32 = 0x7F << 16;
const HEADER_TYPE_BRIDGE: u32 = 0x01 << 16;
/// Bridge bus numbers: primary (byte 0), secondary (byte 1), subordinate (byte 2).
const BRIDGE_BUS_NUMBERS_OFFSET: u8 = 0x18;
/// Vendor ID of an absent function (a master abort reads all ones).
const NO_VENDOR: u16 = 0xFFFF;

/// Serializes the two-step CONFIG_ADDRESS / CONFIG_DATA sequence across CPUs.
static CONFIG_LOCK: spin::Mutex<()> = spin::Mutex::new(());

/// Configuration mechanism #1 through I/O ports. Zero-sized: every copy reaches the same bus,
/// and the lock above keeps each address/data pair whole.
#[derive(Debug)]
pub struct PortConfigurationAccess;

fn config_address(device_function: DeviceFunction, register_offset: u8) -> u32 {
    CONFIG_ENABLE
        | u32::from(device_function.bus) << 16
        | u32::from(device_function.device & 0x1F) << 11
        | u32::from(device_function.function & 0x7) << 8
        | u32::from(register_offset & 0xFC)
}

impl ConfigurationAccess for PortConfigurationAccess {
    fn read_word(&self, device_function: DeviceFunction, register_offset: u8) -> u32 {
        let _whole = CONFIG_LOCK.lock();
        // SAFETY: 0xCF8/0xCFC are the host bridge's configuration ports, used by nothing else in
        // the hypervisor (guests reach a modelled bus, never these); the lock keeps the address
        // write and the data read together. See: PCI 3.0 3.2.2.3.2.
        unsafe {
            hw::outl(
                CONFIG_ADDRESS_PORT,
                config_address(device_function, register_offset),
            );
            hw::inl(CONFIG_DATA_PORT)
        }
    }

    fn write_word(&mut self, device_function: DeviceFunction, register_offset: u8, data: u32) {
        let _whole = CONFIG_LOCK.lock();
        // SAFETY: as in `read_word`; the callers write only the registers of the function they
        // are setting up (command, BARs). See: PCI 3.0 3.2.2.3.2.
        unsafe {
            hw::outl(
                CONFIG_ADDRESS_PORT,
                config_address(device_function, register_offset),
            );
            hw::outl(CONFIG_DATA_PORT, data);
        }
    }

    unsafe fn unsafe_clone(&self) -> Self {
        PortConfigurationAccess
    }
}

/// The host PCI root, reached through the ports.
pub fn root() -> PciRoot<PortConfigurationAccess> {
    PciRoot::new(PortConfigurationAccess)
}

/// One present function found by [`enumerate`].
#[derive(Clone, Copy, Debug)]
pub struct Function {
    pub location: DeviceFunction,
    pub vendor_id: u16,
    pub device_id: u16,
}

/// The functions [`enumerate`] found on its one walk of the bus.
static FUNCTIONS: spin::Once<Vec<Function>> = spin::Once::new();

/// Every present function of the host's PCI bus, walked on the first call (on the boot CPU,
/// before the drivers start) and remembered: the bus does not change under a running hypervisor.
pub fn functions() -> &'static [Function] {
    FUNCTIONS.call_once(enumerate)
}

/// The virtio vendor ID. See: VIRTIO 1.2 4.1.2.
pub const VIRTIO_VENDOR: u16 = 0x1AF4;

/// The first virtio function (in bus order) whose device ID is one of `device_ids` (a device
/// type's transitional and modern IDs, VIRTIO 1.2 4.1.2).
pub fn find_virtio(device_ids: &[u16]) -> Option<Function> {
    functions()
        .iter()
        .find(|function| {
            function.vendor_id == VIRTIO_VENDOR && device_ids.contains(&function.device_id)
        })
        .copied()
}

/// Readies the virtio function at `location` ([`prepare`]) and opens its PCI transport (the
/// capabilities that locate its common, notify, ISR and device configuration structures) with
/// [`DmaHal`]. The driver on top resets and negotiates (VIRTIO 1.2 3.1.1).
pub fn virtio_transport(location: DeviceFunction) -> Result<PciTransport, SetupError> {
    let mut root = root();
    prepare(&mut root, functions(), location)?;
    PciTransport::new::<DmaHal, _>(&mut root, location).map_err(SetupError::Transport)
}

/// A second transport onto a function [`virtio_transport`] already opened, for reading its
/// device configuration (e.g. a NIC's link status) beside the driver that owns the first. Use it
/// only to read: the driver alone changes the device. Wrapped so it is never dropped (dropping a
/// transport resets the device).
pub fn virtio_transport_view(
    location: DeviceFunction,
) -> Result<ManuallyDrop<PciTransport>, SetupError> {
    PciTransport::new::<DmaHal, _>(&mut root(), location)
        .map(ManuallyDrop::new)
        .map_err(SetupError::Transport)
}

/// Every function on bus 0 and on the buses behind PCI-to-PCI bridges (each bus visited once,
/// so a misconfigured bridge cannot loop the walk). Functions above 0 are probed only on
/// multi-function devices (PCI 3.0 6.2.1), as some single-function devices alias them.
fn enumerate() -> Vec<Function> {
    let access = &PortConfigurationAccess;
    let mut found = Vec::new();
    let mut visited = [false; 256];
    let mut pending = Vec::from([0u8]);
    while let Some(bus) = pending.pop() {
        if core::mem::replace(&mut visited[usize::from(bus)], true) {
            continue;
        }
        for device in 0..32 {
            let first = DeviceFunction {
                bus,
                device,
                function: 0,
            };
            if access.read_word(first, 0) as u16 == NO_VENDOR {
                continue;
            }
            let functions = if access.read_word(first, HEADER_TYPE_OFFSET) & MULTI_FUNCTION != 0 {
                8
            } else {
                1
            };
            for function in 0..functions {
                let location = DeviceFunction {
                    bus,
                    device,
                    function,
                };
                let ids = access.read_word(location, 0);
                if ids as u16 == NO_VENDOR {
                    continue;
                }
                found.push(Function {
                    location,
                    vendor_id: ids as u16,
                    device_id: (ids >> 16) as u16,
                });
                let header = access.read_word(location, HEADER_TYPE_OFFSET);
                if header & HEADER_TYPE_MASK == HEADER_TYPE_BRIDGE {
                    let secondary =
                        (access.read_word(location, BRIDGE_BUS_NUMBERS_OFFSET) >> 8) as u8;
                    if secondary != 0 {
                        pending.push(secondary);
                    }
                }
            }
        }
    }
    found
}

/// Why a function could not be made ready for its driver.
#[derive(Debug)]
pub enum SetupError {
    /// Reading a BAR failed (an invalid BAR type).
    Bar(u8),
    /// A memory BAR has no address and no room was found for it.
    Unassigned(u8),
    /// The register range could not be mapped.
    Map(alloc::string::String),
    /// The virtio capabilities are missing or malformed.
    Transport(VirtioPciError),
}

impl core::fmt::Display for SetupError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            SetupError::Bar(index) => write!(f, "BAR {index} is malformed"),
            SetupError::Unassigned(index) => write!(
                f,
                "BAR {index} has no address and the firmware left no room to place it"
            ),
            SetupError::Map(message) => write!(f, "{message}"),
            SetupError::Transport(error) => write!(f, "{error}"),
        }
    }
}

/// Readies `function` for a driver: every memory BAR has an address (assigning one above the
/// other devices' 32-bit BARs when the firmware left it at 0; SeaBIOS and OVMF assign them all),
/// is mapped uncacheable (`memory::map_mmio`, remembered for [`mapped_registers`]), and memory
/// decoding and bus mastering are on. I/O BARs are left alone (virtio's modern interface uses
/// memory BARs only).
pub fn prepare(
    root: &mut PciRoot<PortConfigurationAccess>,
    others: &[Function],
    function: DeviceFunction,
) -> Result<(), SetupError> {
    let bars = root.bars(function).map_err(|_| SetupError::Bar(0))?;
    for (index, bar) in bars.iter().enumerate() {
        let index = index as u8;
        let Some(BarInfo::Memory {
            address_type,
            address,
            size,
            ..
        }) = *bar
        else {
            continue;
        };
        let address = if address == 0 && size != 0 {
            let placed =
                free_32_bit_address(root, others, size).ok_or(SetupError::Unassigned(index))?;
            match address_type {
                MemoryBarType::Width64 => root.set_bar_64(function, index, placed),
                _ => root.set_bar_32(function, index, placed as u32),
            }
            log::info!("pci: {function} BAR {index}: assigned {placed:#x} ({size:#x} bytes)");
            placed
        } else {
            address
        };
        log::debug!("pci: {function} BAR {index} at {address:#x}, {size:#x} bytes");
        let virtual_address =
            memory::map_mmio(HostPhysAddr(address), size).map_err(SetupError::Map)?;
        MAPPED.lock().push(MappedRange {
            physical: address,
            size,
            virtual_address: virtual_address as u64,
        });
    }
    let (_, command) = root.get_status_command(function);
    root.set_command(
        function,
        command | Command::MEMORY_SPACE | Command::BUS_MASTER,
    );
    Ok(())
}

/// The ranges [`prepare`] mapped, for `mmio_phys_to_virt` of the virtio HAL.
static MAPPED: spin::Mutex<Vec<MappedRange>> = spin::Mutex::new(Vec::new());

#[derive(Clone, Copy)]
struct MappedRange {
    physical: u64,
    size: u64,
    virtual_address: u64,
}

/// The kernel virtual address of `size` bytes of device registers at host-physical `address`
/// when [`prepare`] mapped a BAR that holds them whole.
pub fn mapped_registers(address: u64, size: u64) -> Option<*mut u8> {
    MAPPED.lock().iter().find_map(|range| {
        let end = range.physical.checked_add(range.size)?;
        let wanted_end = address.checked_add(size)?;
        (range.physical <= address && wanted_end <= end)
            .then(|| (range.virtual_address + (address - range.physical)) as *mut u8)
    })
}

/// Where the PCI hole of a PC ends: the I/O APIC and the local APIC live above. See: the
/// `pc` machine's (and the 440FX's) memory map; Intel 82093AA I/O APIC datasheet 3.0.
const PCI_HOLE_END: u64 = 0xFEC0_0000;

/// A `size`-aligned address for a new BAR of `size` bytes above every 32-bit memory BAR the
/// other functions have (a simple placement that keeps clear of what the firmware set up),
/// below the APICs. `None` when there is no room.
fn free_32_bit_address(
    root: &mut PciRoot<PortConfigurationAccess>,
    others: &[Function],
    size: u64,
) -> Option<u64> {
    let mut top = 0u64;
    for other in others {
        let Ok(bars) = root.bars(other.location) else {
            continue;
        };
        for (address, bar_size) in bars
            .iter()
            .flatten()
            .filter_map(BarInfo::memory_address_size)
        {
            if address != 0 && address < PCI_HOLE_END {
                top = top.max(address + bar_size);
            }
        }
    }
    if top == 0 {
        return None;
    }
    let placed = top.checked_next_multiple_of(size)?;
    (placed.checked_add(size)? <= PCI_HOLE_END).then_some(placed)
}
