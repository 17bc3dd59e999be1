//! The VM's PCI configuration space: configuration mechanism #1 at ports 0xCF8..=0xCFF, bus 0
//! with a host bridge at 00:00.0, and the interface later PCI device models (virtio) plug into.
//!
//! Spec: PCI Local Bus Specification, Revision 3.0 (PCI-SIG, 2004). Section numbers below refer
//! to it: 3.2.2.3.2 (configuration mechanism #1, the CONFIG_ADDRESS layout in Figure 3-2), 6.1
//! (configuration space organization, the type 0 header in Figure 6-1), 6.2.1 (device
//! identification), 6.2.2 (Command and Status), 6.2.4 (miscellaneous registers), 6.2.5.1
//! (Base Address Registers and how software sizes them).
//!
//! The host bridge is an Intel 82441FX ("i440FX", vendor 0x8086 device 0x1237, revision 0x02),
//! the PMC of the 440FX chipset that QEMU's default `pc` machine also shows, so guests have
//! seen it many times. Reference: Intel "82440FX PCIset: 82441FX PCI and Memory Controller (PMC)
//! and 82442FX Data Bus Accelerator (DBX)" datasheet, order number 290549-001, configuration
//! registers table. Only its standard header is modelled: its chipset registers (0x40 and up:
//! PAM, SMRAM, DRAM control) read 0 and ignore writes, which the guest does not need under a
//! hypervisor that owns the memory map.
//!
//! Model decisions:
//! - Only bus 0 exists. Functions nobody added read as all-ones and ignore writes, as a master
//!   abort does on real hardware (3.2.2.3.2).
//! - CONFIG_ADDRESS is reached only by 32-bit accesses at 0xCF8 (3.2.2.3.2: other accesses there
//!   are ordinary I/O); byte and word accesses to 0xCF8..=0xCFB read all-ones and ignore writes.
//!   Its reserved bits 30:24 and bits 1:0 read 0.
//! - CONFIG_DATA at 0xCFC..=0xCFF takes any size at any offset: the bytes inside 0xCFC..=0xCFF
//!   map to the bytes of the selected register at the same offset; bytes past 0xCFF read 0xFF
//!   and are not written.
//! - Devices see whole 32-bit registers: [`PciDevice::read_config`] returns the register and the
//!   bus picks the bytes; [`PciDevice::write_config`] gets a byte mask of the bytes written.
//! - The multi-function bit (header type bit 7, 6.2.1) of function 0 is set by the bus when other
//!   functions of the same device exist, so device models need not know their neighbours.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::any::Any;
use core::ops::RangeInclusive;

use crate::bus::{access_width, DeviceEvent, PortDevice};

// CONFIG_ADDRESS fields. See: PCI 3.0 3.2.2.3.2, Figure 3-2.
const ADDRESS_ENABLE: u32 = 1 << 31;
const ADDRESS_BUS_SHIFT: u32 = 16;
const ADDRESS_DEVICE_SHIFT: u32 = 11;
const ADDRESS_FUNCTION_SHIFT: u32 = 8;
/// Enable, bus, device, function, register; reserved bits 30:24 and 1:0 read 0.
const ADDRESS_IMPLEMENTED: u32 = 0x80FF_FFFC;

/// The number of 32-bit registers of a function's configuration space (256 bytes, 6.1).
const CONFIG_REGISTERS: usize = 64;

// Type 0 header register offsets. See: PCI 3.0 6.1, Figure 6-1.
const OFFSET_ID: u16 = 0x00;
const OFFSET_COMMAND_STATUS: u16 = 0x04;
const OFFSET_CLASS_REVISION: u16 = 0x08;
const OFFSET_HEADER_TYPE: u16 = 0x0C;
const OFFSET_FIRST_BAR: u16 = 0x10;
const OFFSET_SUBSYSTEM: u16 = 0x2C;
const OFFSET_CAPABILITIES: u16 = 0x34;
const OFFSET_INTERRUPT: u16 = 0x3C;

/// Header type bit 7: the device has more than one function. See: PCI 3.0 6.2.1.
const HEADER_TYPE_MULTI_FUNCTION: u32 = 0x80 << 16;

/// The Command bits a guest can change: I/O space (0), memory space (1), bus master (2), parity
/// error response (6), SERR# enable (8), interrupt disable (10). The others are hardwired to 0
/// here (special cycles, memory write and invalidate, VGA snoop, fast back-to-back).
/// See: PCI 3.0 6.2.2, Table 6-1.
pub const COMMAND_WRITABLE: u16 = 0x0547;
/// Command bit 0: the device answers I/O space accesses to its BARs.
pub const COMMAND_IO_SPACE: u16 = 1 << 0;
/// Command bit 1: the device answers memory space accesses to its BARs.
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
/// Command bit 2: the device may master the bus (DMA).
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Status bit 4 (bit 20 of the Command/Status register): a capabilities list starts at the
/// pointer at 0x34. See: PCI 3.0 6.2.3.
const STATUS_CAPABILITIES_LIST: u32 = 1 << 20;

/// One function's configuration registers, as the guest reaches them through the bus. All
/// arguments come from the guest; implementations must not panic on any of them.
pub trait PciDevice: Send {
    /// A short fixed name for logs ("i440fx-host-bridge").
    fn name(&self) -> &'static str;
    /// The 32-bit register at `offset` (a multiple of 4 below 0x100).
    fn read_config(&mut self, offset: u16) -> u32;
    /// Writes the bytes of `value` selected by `byte_mask` (0xFF in each byte lane written) to
    /// the register at `offset` (a multiple of 4 below 0x100).
    fn write_config(&mut self, offset: u16, value: u32, byte_mask: u32);
    /// The device as `Any`, so the hypervisor can reach a concrete model with
    /// [`PciBus::device_mut`]. Devices that do not need that keep the default `None`.
    fn as_any_mut(&mut self) -> Option<&mut dyn Any> {
        None
    }
}

/// Who a function is: the read-only identification fields of its header.
/// See: PCI 3.0 6.2.1 and 6.2.4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIdentity {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision: u8,
    /// Base class code (0x06 bridge, 0x01 storage, 0x02 network...).
    pub class: u8,
    pub subclass: u8,
    pub programming_interface: u8,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
    /// 0 for none, 1..=4 for INTA#..INTD#. See: PCI 3.0 6.2.4.
    pub interrupt_pin: u8,
}

/// A Base Address Register a device declares. Sizes are powers of two.
/// See: PCI 3.0 6.2.5.1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PciBar {
    /// An I/O space range of 4..=256 bytes.
    Io { size: u32 },
    /// A memory range below 4 GiB, 16 bytes..=2 GiB.
    Memory32 { size: u32, prefetchable: bool },
    /// A memory range anywhere in 64-bit space, 16 bytes..=2^63 bytes; takes two BAR slots.
    Memory64 { size: u64, prefetchable: bool },
}

impl PciBar {
    /// The read-only type bits of the BAR's low register. See: PCI 3.0 6.2.5.1.
    fn type_bits(self) -> u32 {
        match self {
            Self::Io { .. } => 0x1,
            Self::Memory32 { prefetchable, .. } => u32::from(prefetchable) << 3,
            Self::Memory64 { prefetchable, .. } => 0x4 | u32::from(prefetchable) << 3,
        }
    }

    /// The writable address bits as one 64-bit mask (`!(size - 1)` without the type bits), or
    /// `None` if the size is not allowed.
    fn address_mask(self) -> Option<u64> {
        let (size, minimum, maximum, type_mask) = match self {
            Self::Io { size } => (u64::from(size), 4, 256, 0x3),
            Self::Memory32 { size, .. } => (u64::from(size), 16, 1 << 31, 0xF),
            Self::Memory64 { size, .. } => (size, 16, 1 << 63, 0xF),
        };
        if !size.is_power_of_two() || size < minimum || size > maximum {
            return None;
        }
        let mask = !(size - 1) & !type_mask;
        Some(match self {
            Self::Memory64 { .. } => mask,
            _ => mask & 0xFFFF_FFFF,
        })
    }
}

/// Why [`PciConfigSpace::set_bar`] refused a BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PciBarError {
    /// The index is past BAR 5 (or BAR 5 for a 64-bit BAR, which needs two slots).
    IndexOutOfRange,
    /// The slot (or the upper slot of a 64-bit BAR) is already used.
    SlotTaken,
    /// The size is not a power of two in the range the BAR type allows.
    BadSize,
}

/// What occupies one of the six BAR slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BarSlot {
    Unused,
    Bar(PciBar),
    /// The upper 32 bits of the 64-bit BAR in the slot before.
    UpperHalf,
}

/// A type 0 configuration header with write masks: the helper device models build on. Holds
/// the identification, the Command register, cache line size and interrupt line (writable),
/// and the BARs a device declares, which answer the sizing protocol by construction: a BAR's
/// writable bits are exactly its address bits, so writing all-ones reads back `!(size - 1)`
/// with the type bits (PCI 3.0 6.2.5.1). Everything else reads 0 unless the device sets it with
/// [`Self::set_register`] and makes it writable with [`Self::set_writable`].
#[derive(Clone, Debug)]
pub struct PciConfigSpace {
    registers: [u32; CONFIG_REGISTERS],
    /// Bits the guest may change in each register.
    writable: [u32; CONFIG_REGISTERS],
    bars: [BarSlot; 6],
}

impl PciConfigSpace {
    /// A header for `identity`: header type 0, Command 0 (decoding off), no BARs.
    pub fn new(identity: PciIdentity) -> Self {
        let mut space = Self {
            registers: [0; CONFIG_REGISTERS],
            writable: [0; CONFIG_REGISTERS],
            bars: [BarSlot::Unused; 6],
        };
        // See: PCI 3.0 6.1 Figure 6-1, 6.2.1, 6.2.4.
        space.set_register(
            OFFSET_ID,
            u32::from(identity.vendor_id) | u32::from(identity.device_id) << 16,
        );
        space.set_register(
            OFFSET_CLASS_REVISION,
            u32::from(identity.revision)
                | u32::from(identity.programming_interface) << 8
                | u32::from(identity.subclass) << 16
                | u32::from(identity.class) << 24,
        );
        space.set_register(
            OFFSET_SUBSYSTEM,
            u32::from(identity.subsystem_vendor_id) | u32::from(identity.subsystem_id) << 16,
        );
        space.set_register(OFFSET_INTERRUPT, u32::from(identity.interrupt_pin) << 8);
        // Command (6.2.2), cache line size (6.2.4: read/write), interrupt line (6.2.4: a
        // scratch byte for software).
        space.set_writable(OFFSET_COMMAND_STATUS, u32::from(COMMAND_WRITABLE));
        space.set_writable(OFFSET_HEADER_TYPE, 0xFF);
        space.set_writable(OFFSET_INTERRUPT, 0xFF);
        space
    }

    /// Declares BAR `index` (0..=5; a 64-bit BAR also takes `index + 1`). Its address starts
    /// at 0; the guest assigns it.
    pub fn set_bar(&mut self, index: usize, bar: PciBar) -> Result<(), PciBarError> {
        let wide = matches!(bar, PciBar::Memory64 { .. });
        let last = if wide {
            index.checked_add(1)
        } else {
            Some(index)
        };
        let Some(last) = last.filter(|last| *last < self.bars.len()) else {
            return Err(PciBarError::IndexOutOfRange);
        };
        if self.bars[index..=last]
            .iter()
            .any(|slot| *slot != BarSlot::Unused)
        {
            return Err(PciBarError::SlotTaken);
        }
        let mask = bar.address_mask().ok_or(PciBarError::BadSize)?;
        let offset = Self::bar_offset(index);
        self.set_register(offset, bar.type_bits());
        self.set_writable(offset, mask as u32);
        self.bars[index] = BarSlot::Bar(bar);
        if wide {
            self.set_register(offset + 4, 0);
            self.set_writable(offset + 4, (mask >> 32) as u32);
            self.bars[last] = BarSlot::UpperHalf;
        }
        Ok(())
    }

    /// The address the guest assigned to BAR `index`, or `None` if no BAR starts there.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let BarSlot::Bar(bar) = *self.bars.get(index)? else {
            return None;
        };
        let offset = Self::bar_offset(index);
        let low = u64::from(self.register(offset));
        Some(match bar {
            PciBar::Io { .. } => low & !0x3,
            PciBar::Memory32 { .. } => low & !0xF,
            PciBar::Memory64 { .. } => (low & !0xF) | u64::from(self.register(offset + 4)) << 32,
        })
    }

    /// The BAR declared at `index`, if one starts there.
    pub fn bar(&self, index: usize) -> Option<PciBar> {
        match self.bars.get(index)? {
            BarSlot::Bar(bar) => Some(*bar),
            _ => None,
        }
    }

    /// The Command register (which decoders the guest turned on).
    pub fn command(&self) -> u16 {
        self.register(OFFSET_COMMAND_STATUS) as u16
    }

    /// Points the capabilities list at `offset` (0x40..=0xFC, dword aligned; the device writes
    /// the capability structures with [`Self::set_register`]) and sets Status bit 4.
    /// See: PCI 3.0 6.2.3 (Status) and 6.7 (capabilities list).
    pub fn set_capabilities_pointer(&mut self, offset: u8) {
        self.set_register(OFFSET_CAPABILITIES, u32::from(offset & 0xFC));
        let status = self.register(OFFSET_COMMAND_STATUS) | STATUS_CAPABILITIES_LIST;
        self.set_register(OFFSET_COMMAND_STATUS, status);
    }

    /// The register at `offset` (rounded down to a multiple of 4); 0 past 0xFC.
    pub fn register(&self, offset: u16) -> u32 {
        Self::index(offset)
            .map(|index| self.registers[index])
            .unwrap_or(0)
    }

    /// Sets the register at `offset` (rounded down to a multiple of 4) as the device sees fit,
    /// whatever its write mask; ignored past 0xFC.
    pub fn set_register(&mut self, offset: u16, value: u32) {
        if let Some(index) = Self::index(offset) {
            self.registers[index] = value;
        }
    }

    /// Makes the bits of `mask` of the register at `offset` writable by the guest (the others
    /// become read-only); ignored past 0xFC.
    pub fn set_writable(&mut self, offset: u16, mask: u32) {
        if let Some(index) = Self::index(offset) {
            self.writable[index] = mask;
        }
    }

    /// A guest read of the register at `offset`.
    pub fn read(&self, offset: u16) -> u32 {
        self.register(offset)
    }

    /// A guest write: the bytes of `value` in `byte_mask` that are writable change.
    pub fn write(&mut self, offset: u16, value: u32, byte_mask: u32) {
        if let Some(index) = Self::index(offset) {
            let changed = self.writable[index] & byte_mask;
            self.registers[index] = (self.registers[index] & !changed) | (value & changed);
        }
    }

    fn index(offset: u16) -> Option<usize> {
        let index = usize::from(offset / 4);
        (index < CONFIG_REGISTERS).then_some(index)
    }

    fn bar_offset(index: usize) -> u16 {
        // `index` < 6 at every call site.
        OFFSET_FIRST_BAR + 4 * (index as u16)
    }
}

/// The i440FX host bridge at 00:00.0: identification only. See the module documentation.
#[derive(Clone, Debug)]
pub struct HostBridge {
    config: PciConfigSpace,
}

impl HostBridge {
    /// The identity of the 82441FX PMC. See: 82441FX datasheet, configuration registers table
    /// (VID 8086h, DID 1237h, RID 02h, class code 060000h: host bridge).
    pub const IDENTITY: PciIdentity = PciIdentity {
        vendor_id: 0x8086,
        device_id: 0x1237,
        revision: 0x02,
        class: 0x06,
        subclass: 0x00,
        programming_interface: 0x00,
        subsystem_vendor_id: 0,
        subsystem_id: 0,
        interrupt_pin: 0,
    };

    pub fn new() -> Self {
        Self {
            config: PciConfigSpace::new(Self::IDENTITY),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn name(&self) -> &'static str {
        "i440fx-host-bridge"
    }

    fn read_config(&mut self, offset: u16) -> u32 {
        self.config.read(offset)
    }

    fn write_config(&mut self, offset: u16, value: u32, byte_mask: u32) {
        self.config.write(offset, value, byte_mask);
    }
}

/// Why [`PciBus::add`] refused a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PciSlotError {
    /// Device above 31 or function above 7.
    OutOfRange,
    /// A device is already at that device and function.
    Occupied,
}

/// Configuration mechanism #1 and bus 0. See the module documentation.
pub struct PciBus {
    /// CONFIG_ADDRESS. See: PCI 3.0 3.2.2.3.2.
    address: u32,
    /// Keyed by `device << 3 | function`.
    functions: BTreeMap<u8, Box<dyn PciDevice>>,
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new()
    }
}

impl PciBus {
    /// CONFIG_ADDRESS.
    pub const ADDRESS_PORT: u16 = 0xCF8;
    /// The reset control register (a byte inside CONFIG_ADDRESS's dword).
    pub const RESET_CONTROL_PORT: u16 = 0xCF9;
    /// The first port of CONFIG_DATA.
    pub const DATA_PORT: u16 = 0xCFC;
    /// The last port the bus owns.
    pub const LAST_PORT: u16 = 0xCFF;

    /// Bus 0 with the host bridge at 00:00.0 and nothing else.
    pub fn new() -> Self {
        let mut bus = Self {
            address: 0,
            functions: BTreeMap::new(),
        };
        bus.functions.insert(0, Box::new(HostBridge::new()));
        bus
    }

    /// Plugs `model` in at bus 0, `device` (0..=31), `function` (0..=7). Guests find a device
    /// only if it has a function 0 (PCI 3.0 6.2.1).
    pub fn add(
        &mut self,
        device: u8,
        function: u8,
        model: Box<dyn PciDevice>,
    ) -> Result<(), PciSlotError> {
        if device > 31 || function > 7 {
            return Err(PciSlotError::OutOfRange);
        }
        let key = device << 3 | function;
        if self.functions.contains_key(&key) {
            return Err(PciSlotError::Occupied);
        }
        self.functions.insert(key, model);
        Ok(())
    }

    /// The model at `device`, `function` as its concrete type `T`, if it is one and opted in
    /// through [`PciDevice::as_any_mut`].
    pub fn device_mut<T: Any>(&mut self, device: u8, function: u8) -> Option<&mut T> {
        if device > 31 || function > 7 {
            return None;
        }
        self.functions
            .get_mut(&(device << 3 | function))?
            .as_any_mut()?
            .downcast_mut::<T>()
    }

    /// The value of CONFIG_ADDRESS.
    pub fn config_address(&self) -> u32 {
        self.address
    }

    /// The function key and register offset CONFIG_ADDRESS selects, or `None` when the enable
    /// bit is clear or the bus is not 0. See: PCI 3.0 3.2.2.3.2, Figure 3-2.
    fn selected(&self) -> Option<(u8, u16)> {
        if self.address & ADDRESS_ENABLE == 0 || (self.address >> ADDRESS_BUS_SHIFT) & 0xFF != 0 {
            return None;
        }
        let device = ((self.address >> ADDRESS_DEVICE_SHIFT) & 0x1F) as u8;
        let function = ((self.address >> ADDRESS_FUNCTION_SHIFT) & 0x7) as u8;
        let offset = (self.address & 0xFC) as u16;
        Some((device << 3 | function, offset))
    }

    /// The selected register, all-ones if no function answers.
    fn read_selected(&mut self) -> u32 {
        let Some((key, offset)) = self.selected() else {
            return u32::MAX;
        };
        // Other functions of the same device, for the multi-function bit of function 0.
        let siblings = key & 0x7 == 0
            && offset == OFFSET_HEADER_TYPE
            && self.functions.range(key + 1..=key | 0x7).next().is_some();
        let Some(model) = self.functions.get_mut(&key) else {
            return u32::MAX;
        };
        let value = model.read_config(offset);
        if siblings {
            value | HEADER_TYPE_MULTI_FUNCTION
        } else {
            value
        }
    }

    fn write_selected(&mut self, value: u32, byte_mask: u32) {
        let Some((key, offset)) = self.selected() else {
            return;
        };
        if let Some(model) = self.functions.get_mut(&key) {
            model.write_config(offset, value, byte_mask);
        }
    }

    /// The byte lane in CONFIG_DATA of byte `index` of an access at `port`, if it is one.
    fn data_lane(port: u16, index: u8) -> Option<u32> {
        let port = u32::from(port) + u32::from(index);
        let lane = port.checked_sub(u32::from(Self::DATA_PORT))?;
        (lane < 4).then_some(lane)
    }
}

impl PortDevice for PciBus {
    fn name(&self) -> &'static str {
        "pci-config"
    }

    fn ports(&self) -> RangeInclusive<u16> {
        Self::ADDRESS_PORT..=Self::LAST_PORT
    }

    fn read(&mut self, port: u16, size: u8) -> u32 {
        let width = access_width(size);
        if port == Self::ADDRESS_PORT && width == 4 {
            return self.address;
        }
        if port < Self::DATA_PORT {
            return u32::MAX;
        }
        let register = self.read_selected();
        let mut value = 0;
        for index in 0..width {
            let byte = match Self::data_lane(port, index) {
                Some(lane) => (register >> (8 * lane)) & 0xFF,
                None => 0xFF,
            };
            value |= byte << (8 * u32::from(index));
        }
        value
    }

    fn write(&mut self, port: u16, size: u8, value: u32, events: &mut Vec<DeviceEvent>) {
        let width = access_width(size);
        if port == Self::ADDRESS_PORT && width == 4 {
            self.address = value & ADDRESS_IMPLEMENTED;
            return;
        }
        // The reset control register: a byte write to 0xCF9 with RST_CPU (bit 2) set resets
        // the machine (the FADT's RESET_REG points here). See: Intel PCH datasheets, "Reset
        // Control Register (RST_CNT), I/O 0xCF9"; ACPI 6.5 4.8.3.6 (reset register).
        if port == Self::RESET_CONTROL_PORT && width == 1 {
            if value & RESET_CPU != 0 {
                events.push(DeviceEvent::Reset);
            }
            return;
        }
        if port < Self::DATA_PORT {
            return;
        }
        let (mut shifted, mut byte_mask) = (0u32, 0u32);
        for (index, byte) in (0..width).zip(value.to_le_bytes()) {
            if let Some(lane) = Self::data_lane(port, index) {
                shifted |= u32::from(byte) << (8 * lane);
                byte_mask |= 0xFF << (8 * lane);
            }
        }
        if byte_mask != 0 {
            self.write_selected(shifted, byte_mask);
        }
    }

    fn as_any_mut(&mut self) -> Option<&mut dyn Any> {
        Some(self)
    }
}

/// RST_CNT bit 2: reset the CPU (with bit 1, SYS_RST, a full reset). Linux writes 0x06.
const RESET_CPU: u32 = 1 << 2;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::PortBus;

    #[test]
    fn a_byte_write_of_rst_cpu_to_0xcf9_asks_for_a_reset() {
        let mut pci = PciBus::new();
        let mut events = Vec::new();
        pci.write(0xCF9, 1, 0x02, &mut events);
        assert!(events.is_empty(), "SYS_RST alone does not reset");
        pci.write(0xCF9, 1, 0x06, &mut events);
        assert_eq!(events, [DeviceEvent::Reset]);
        // A dword write at 0xCF8 is CONFIG_ADDRESS, not a reset.
        let mut events = Vec::new();
        pci.write(0xCF8, 4, 0x8000_0600, &mut events);
        assert!(events.is_empty());
    }

    /// A device with three BARs, for the sizing protocol.
    struct TestDevice {
        config: PciConfigSpace,
    }

    impl TestDevice {
        fn boxed() -> Box<Self> {
            let mut config = PciConfigSpace::new(PciIdentity {
                vendor_id: 0x1AF4,
                device_id: 0x1042,
                revision: 1,
                class: 0x01,
                subclass: 0x00,
                programming_interface: 0,
                subsystem_vendor_id: 0x1AF4,
                subsystem_id: 2,
                interrupt_pin: 1,
            });
            config.set_bar(0, PciBar::Io { size: 0x40 }).unwrap();
            config
                .set_bar(
                    1,
                    PciBar::Memory32 {
                        size: 0x1000,
                        prefetchable: false,
                    },
                )
                .unwrap();
            config
                .set_bar(
                    4,
                    PciBar::Memory64 {
                        size: 0x4000,
                        prefetchable: true,
                    },
                )
                .unwrap();
            Box::new(Self { config })
        }
    }

    impl PciDevice for TestDevice {
        fn name(&self) -> &'static str {
            "test"
        }
        fn read_config(&mut self, offset: u16) -> u32 {
            self.config.read(offset)
        }
        fn write_config(&mut self, offset: u16, value: u32, byte_mask: u32) {
            self.config.write(offset, value, byte_mask);
        }
        fn as_any_mut(&mut self) -> Option<&mut dyn Any> {
            Some(self)
        }
    }

    fn address(device: u8, function: u8, offset: u8) -> u32 {
        ADDRESS_ENABLE
            | u32::from(device) << ADDRESS_DEVICE_SHIFT
            | u32::from(function) << ADDRESS_FUNCTION_SHIFT
            | u32::from(offset)
    }

    fn bus_with_test_device() -> PortBus {
        let mut pci = PciBus::new();
        pci.add(3, 0, TestDevice::boxed()).unwrap();
        let mut bus = PortBus::new();
        bus.add(Box::new(pci)).unwrap();
        bus
    }

    fn config_read(bus: &mut PortBus, device: u8, function: u8, offset: u8, size: u8) -> u32 {
        let mut events = Vec::new();
        bus.write(
            0xCF8,
            4,
            address(device, function, offset & 0xFC),
            &mut events,
        );
        bus.read(0xCFC + u16::from(offset & 3), size).value
    }

    fn config_write(bus: &mut PortBus, device: u8, function: u8, offset: u8, size: u8, value: u32) {
        let mut events = Vec::new();
        bus.write(
            0xCF8,
            4,
            address(device, function, offset & 0xFC),
            &mut events,
        );
        bus.write(0xCFC + u16::from(offset & 3), size, value, &mut events);
        assert!(events.is_empty());
    }

    #[test]
    fn host_bridge_identification() {
        let mut bus = bus_with_test_device();
        assert_eq!(config_read(&mut bus, 0, 0, 0x00, 4), 0x1237_8086);
        assert_eq!(config_read(&mut bus, 0, 0, 0x08, 4), 0x0600_0002);
        // Word at 0xCFE: class and subclass, as Linux's pci_sanity_check reads it.
        assert_eq!(config_read(&mut bus, 0, 0, 0x0A, 2), 0x0600);
        // Bytes at 0xCFD and 0xCFF.
        assert_eq!(config_read(&mut bus, 0, 0, 0x01, 1), 0x80);
        assert_eq!(config_read(&mut bus, 0, 0, 0x03, 1), 0x12);
        assert_eq!(
            config_read(&mut bus, 0, 0, 0x0C, 4),
            0,
            "header type 0, single function"
        );
        // No BARs; registers past the header read 0 and ignore writes.
        config_write(&mut bus, 0, 0, 0x10, 4, u32::MAX);
        assert_eq!(config_read(&mut bus, 0, 0, 0x10, 4), 0);
        config_write(&mut bus, 0, 0, 0x58, 4, u32::MAX);
        assert_eq!(config_read(&mut bus, 0, 0, 0x58, 4), 0);
        assert_eq!(config_read(&mut bus, 0, 0, 0xFC, 4), 0);
    }

    #[test]
    fn command_register_writable_bits() {
        let mut bus = bus_with_test_device();
        config_write(&mut bus, 0, 0, 0x04, 4, u32::MAX);
        assert_eq!(
            config_read(&mut bus, 0, 0, 0x04, 4),
            0x0000_0547,
            "status stays 0"
        );
        config_write(&mut bus, 0, 0, 0x04, 2, 0x0006);
        assert_eq!(config_read(&mut bus, 0, 0, 0x04, 2), 0x0006);
        // A byte write to the high byte leaves the low byte alone.
        config_write(&mut bus, 0, 0, 0x05, 1, 0x04);
        assert_eq!(config_read(&mut bus, 0, 0, 0x04, 2), 0x0406);
        // Interrupt line is a scratch byte; interrupt pin is read-only.
        config_write(&mut bus, 0, 0, 0x3C, 2, 0xFF0B);
        assert_eq!(config_read(&mut bus, 0, 0, 0x3C, 4), 0x0000_000B);
    }

    #[test]
    fn address_register_and_enable_bit() {
        let mut bus = bus_with_test_device();
        let mut events = Vec::new();
        // Linux's pci_check_type1: write 0x80000000, read it back.
        bus.write(0xCFB, 1, 0x01, &mut events);
        bus.write(0xCF8, 4, 0x8000_0000, &mut events);
        assert_eq!(bus.read(0xCF8, 4).value, 0x8000_0000);
        // Reserved bits read 0.
        bus.write(0xCF8, 4, 0xFFFF_FFFF, &mut events);
        assert_eq!(bus.read(0xCF8, 4).value, 0x80FF_FFFC);
        // Narrow accesses to 0xCF8..=0xCFB are not CONFIG_ADDRESS.
        bus.write(0xCF8, 2, 0, &mut events);
        assert_eq!(bus.read(0xCF8, 4).value, 0x80FF_FFFC);
        assert_eq!(bus.read(0xCF8, 2).value, 0xFFFF);
        assert_eq!(bus.read(0xCF9, 1).value, 0xFF);
        // Enable bit clear: no configuration cycle.
        bus.write(0xCF8, 4, 0x0000_0000, &mut events);
        assert_eq!(bus.read(0xCFC, 4).value, 0xFFFF_FFFF);
        bus.write(0xCFC, 4, 0x0000_0007, &mut events);
        assert_eq!(
            config_read(&mut bus, 0, 0, 0x04, 2),
            0,
            "write without enable ignored"
        );
    }

    #[test]
    fn decoding_and_absent_functions() {
        let mut bus = bus_with_test_device();
        assert_eq!(config_read(&mut bus, 3, 0, 0x00, 4), 0x1042_1AF4);
        assert_eq!(config_read(&mut bus, 3, 0, 0x2C, 4), 0x0002_1AF4);
        assert_eq!(config_read(&mut bus, 3, 0, 0x3D, 1), 0x01, "INTA#");
        assert_eq!(config_read(&mut bus, 3, 1, 0x00, 4), 0xFFFF_FFFF);
        assert_eq!(config_read(&mut bus, 2, 0, 0x00, 2), 0xFFFF);
        assert_eq!(config_read(&mut bus, 31, 7, 0x00, 1), 0xFF);
        // Bus 1 does not exist even for device 0.
        let mut events = Vec::new();
        bus.write(0xCF8, 4, address(0, 0, 0) | 1 << 16, &mut events);
        assert_eq!(bus.read(0xCFC, 4).value, 0xFFFF_FFFF);
        bus.write(0xCFC, 4, 0, &mut events);
        // Writes to absent functions are ignored.
        config_write(&mut bus, 5, 0, 0x04, 4, u32::MAX);
        assert_eq!(config_read(&mut bus, 5, 0, 0x04, 4), 0xFFFF_FFFF);
        // Accesses straddling 0xCFF: outside bytes read 0xFF.
        bus.write(0xCF8, 4, address(0, 0, 0), &mut events);
        assert_eq!(bus.read(0xCFE, 4).value, 0xFFFF_1237);
        assert_eq!(bus.read(0xCFD, 4).value, 0xFF12_3780);
    }

    #[test]
    fn bar_sizing_protocol() {
        let mut bus = bus_with_test_device();
        assert_eq!(config_read(&mut bus, 3, 0, 0x10, 4), 0x0000_0001, "I/O BAR");
        assert_eq!(
            config_read(&mut bus, 3, 0, 0x20, 4),
            0x0000_000C,
            "64-bit prefetchable"
        );
        for (offset, size_mask) in [
            (0x10, 0xFFFF_FFC1),
            (0x14, 0xFFFF_F000),
            (0x18, 0x0000_0000),
            (0x1C, 0x0000_0000),
            (0x20, 0xFFFF_C00C),
            (0x24, 0xFFFF_FFFF),
        ] {
            let original = config_read(&mut bus, 3, 0, offset, 4);
            config_write(&mut bus, 3, 0, offset, 4, u32::MAX);
            assert_eq!(
                config_read(&mut bus, 3, 0, offset, 4),
                size_mask,
                "BAR at {offset:#x}"
            );
            config_write(&mut bus, 3, 0, offset, 4, original);
        }
        // Assign addresses as firmware would.
        config_write(&mut bus, 3, 0, 0x10, 4, 0xC041);
        config_write(&mut bus, 3, 0, 0x14, 4, 0xFEBF_1234);
        config_write(&mut bus, 3, 0, 0x20, 4, 0x8000_0000);
        config_write(&mut bus, 3, 0, 0x24, 4, 0x0000_0001);
        config_write(&mut bus, 3, 0, 0x04, 2, u32::from(COMMAND_MEMORY_SPACE));
        let pci = bus.device_mut::<PciBus>(0xCF8).unwrap();
        let device = pci.device_mut::<TestDevice>(3, 0).unwrap();
        assert_eq!(device.config.bar_address(0), Some(0xC040));
        assert_eq!(device.config.bar_address(1), Some(0xFEBF_1000));
        assert_eq!(device.config.bar_address(2), None);
        assert_eq!(device.config.bar_address(4), Some(0x1_8000_0000));
        assert_eq!(device.config.bar_address(5), None, "upper half");
        assert_eq!(device.config.bar_address(6), None);
        assert_eq!(device.config.command(), COMMAND_MEMORY_SPACE);
        assert_eq!(device.config.bar(0), Some(PciBar::Io { size: 0x40 }));
        assert!(
            pci.device_mut::<HostBridge>(0, 0).is_none(),
            "host bridge did not opt in"
        );
        assert!(pci.device_mut::<TestDevice>(32, 0).is_none());
    }

    #[test]
    fn bar_declaration_errors() {
        let mut config = PciConfigSpace::new(HostBridge::IDENTITY);
        let memory = |size| PciBar::Memory32 {
            size,
            prefetchable: false,
        };
        assert_eq!(
            config.set_bar(6, memory(16)),
            Err(PciBarError::IndexOutOfRange)
        );
        let wide = PciBar::Memory64 {
            size: 1 << 32,
            prefetchable: false,
        };
        assert_eq!(config.set_bar(5, wide), Err(PciBarError::IndexOutOfRange));
        assert_eq!(
            config.set_bar(usize::MAX, wide),
            Err(PciBarError::IndexOutOfRange)
        );
        assert_eq!(config.set_bar(0, memory(0)), Err(PciBarError::BadSize));
        assert_eq!(config.set_bar(0, memory(8)), Err(PciBarError::BadSize));
        assert_eq!(config.set_bar(0, memory(0x3000)), Err(PciBarError::BadSize));
        assert_eq!(config.set_bar(0, memory(1 << 31)), Ok(()));
        assert_eq!(config.set_bar(0, memory(16)), Err(PciBarError::SlotTaken));
        assert_eq!(
            config.set_bar(1, PciBar::Io { size: 512 }),
            Err(PciBarError::BadSize)
        );
        assert_eq!(
            config.set_bar(1, PciBar::Io { size: 2 }),
            Err(PciBarError::BadSize)
        );
        assert_eq!(config.set_bar(2, wide), Ok(()));
        assert_eq!(config.set_bar(3, memory(16)), Err(PciBarError::SlotTaken));
        assert_eq!(config.set_bar(1, wide), Err(PciBarError::SlotTaken));
        // A 4 GiB 64-bit BAR: the low dword has no address bits, the high one is all address.
        config.write(0x18, u32::MAX, u32::MAX);
        config.write(0x1C, u32::MAX, u32::MAX);
        assert_eq!(config.read(0x18), 0x0000_0004);
        assert_eq!(config.read(0x1C), 0xFFFF_FFFF);
    }

    #[test]
    fn registration_and_multi_function_bit() {
        let mut pci = PciBus::new();
        assert_eq!(
            pci.add(0, 0, TestDevice::boxed()),
            Err(PciSlotError::Occupied)
        );
        assert_eq!(
            pci.add(32, 0, TestDevice::boxed()),
            Err(PciSlotError::OutOfRange)
        );
        assert_eq!(
            pci.add(1, 8, TestDevice::boxed()),
            Err(PciSlotError::OutOfRange)
        );
        pci.add(1, 0, TestDevice::boxed()).unwrap();
        pci.add(1, 2, TestDevice::boxed()).unwrap();
        let mut bus = PortBus::new();
        bus.add(Box::new(pci)).unwrap();
        assert_eq!(
            config_read(&mut bus, 1, 0, 0x0E, 1),
            0x80,
            "function 0 multi-function"
        );
        assert_eq!(config_read(&mut bus, 1, 2, 0x0E, 1), 0x00);
        assert_eq!(
            config_read(&mut bus, 0, 0, 0x0E, 1),
            0x00,
            "host bridge alone"
        );
        assert_eq!(config_read(&mut bus, 1, 2, 0x00, 2), 0x1AF4);
    }

    #[test]
    fn capabilities_pointer() {
        let mut config = PciConfigSpace::new(HostBridge::IDENTITY);
        config.set_capabilities_pointer(0x43);
        assert_eq!(config.read(0x34), 0x40);
        assert_eq!(config.read(0x04) >> 16, 0x0010);
        config.set_register(0x40, 0x0000_0009);
        assert_eq!(config.read(0x40), 9);
        config.write(0x40, u32::MAX, u32::MAX);
        assert_eq!(config.read(0x40), 9, "read-only unless made writable");
        config.set_writable(0x40, 0xFF00_0000);
        config.write(0x40, u32::MAX, 0xFFFF_0000);
        assert_eq!(config.read(0x40), 0xFF00_0009);
        // Out-of-range offsets are ignored.
        config.set_register(0x100, 1);
        config.set_writable(0xFFFF, 1);
        config.write(0x100, 1, u32::MAX);
        assert_eq!(config.read(0x100), 0);
    }

    #[test]
    fn every_access_is_safe() {
        let mut bus = bus_with_test_device();
        let mut events = Vec::new();
        for address in [
            0,
            0x8000_0000,
            0x80FF_FFFC,
            0xFFFF_FFFF,
            0x8000_18FC,
            0x8000_1810,
        ] {
            bus.write(0xCF8, 4, address, &mut events);
            for port in 0xCF8..=0xCFF {
                for size in [0, 1, 2, 3, 4, 255] {
                    bus.read(port, size);
                    bus.write(port, size, u32::MAX, &mut events);
                    bus.write(0xCF8, 4, address, &mut events);
                }
            }
        }
        let mut pci = PciBus::new();
        pci.read(0xFFFF, 4);
        pci.write(0xFFFF, 4, 0, &mut events);
        pci.read(0, 4);
        pci.write(0, 4, 0, &mut events);
        // The only event any of this may raise: the reset, from the byte writes to 0xCF9.
        assert!(events.iter().all(|event| *event == DeviceEvent::Reset));
    }
}
