//! The memory-mapped I/O bus of a VM: guest-physical ranges outside RAM that a device model
//! answers (the local APIC at 0xFEE0_0000, the I/O APIC at 0xFEC0_0000, later virtio). The
//! hypervisor reaches it from a nested page fault (or shadow fault) on such an address, after
//! decoding the guest's instruction (`ringzero_vmm::mmio`).

use crate::bus::DeviceEvent;
use alloc::boxed::Box;
use alloc::vec::Vec;

/// A device on the MMIO bus. `offset` is relative to the device's base; sizes are 1, 2, 4 or 8.
pub trait MmioDevice: Send {
    fn name(&self) -> &'static str;
    /// Base guest-physical address and length in bytes of the registers.
    fn range(&self) -> (u64, u64);
    fn read(&mut self, offset: u64, size: u8) -> u64;
    fn write(&mut self, offset: u64, size: u8, value: u64, events: &mut Vec<DeviceEvent>);
}

/// Two devices would answer the same address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioOverlap {
    pub address: u64,
}

/// The VM's MMIO devices.
#[derive(Default)]
pub struct MmioBus {
    devices: Vec<Box<dyn MmioDevice>>,
}

impl MmioBus {
    pub fn new() -> Self {
        MmioBus::default()
    }

    /// Adds a device; refuses an empty range or one that overlaps another device's.
    pub fn add(&mut self, device: Box<dyn MmioDevice>) -> Result<(), MmioOverlap> {
        let (base, length) = device.range();
        let end = base
            .checked_add(length)
            .filter(|_| length > 0)
            .ok_or(MmioOverlap { address: base })?;
        for other in &self.devices {
            let (other_base, other_length) = other.range();
            if base < other_base + other_length && other_base < end {
                return Err(MmioOverlap {
                    address: base.max(other_base),
                });
            }
        }
        self.devices.push(device);
        Ok(())
    }

    /// Whether some device answers `address`.
    pub fn owns(&self, address: u64) -> bool {
        self.find(address).is_some()
    }

    fn find(&self, address: u64) -> Option<usize> {
        self.devices.iter().position(|device| {
            let (base, length) = device.range();
            address >= base && address - base < length
        })
    }

    /// Reads `size` bytes at `address`; `None` when no device answers it.
    pub fn read(&mut self, address: u64, size: u8) -> Option<u64> {
        let index = self.find(address)?;
        let device = &mut self.devices[index];
        let offset = address - device.range().0;
        Some(device.read(offset, size) & size_mask(size))
    }

    /// Writes `size` bytes at `address`; false when no device answers it.
    pub fn write(
        &mut self,
        address: u64,
        size: u8,
        value: u64,
        events: &mut Vec<DeviceEvent>,
    ) -> bool {
        let Some(index) = self.find(address) else {
            return false;
        };
        let device = &mut self.devices[index];
        let offset = address - device.range().0;
        device.write(offset, size, value & size_mask(size), events);
        true
    }

    /// The name of the device answering `address` (for logs).
    pub fn owner_name(&self, address: u64) -> Option<&'static str> {
        self.find(address).map(|index| self.devices[index].name())
    }
}

/// All-ones of `size` bytes (8 for anything above 4).
pub fn size_mask(size: u8) -> u64 {
    match size {
        1 => 0xFF,
        2 => 0xFFFF,
        4 => 0xFFFF_FFFF,
        _ => u64::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Scratch {
        base: u64,
        value: u64,
    }

    impl MmioDevice for Scratch {
        fn name(&self) -> &'static str {
            "scratch"
        }
        fn range(&self) -> (u64, u64) {
            (self.base, 0x1000)
        }
        fn read(&mut self, _offset: u64, _size: u8) -> u64 {
            self.value
        }
        fn write(&mut self, _offset: u64, _size: u8, value: u64, _events: &mut Vec<DeviceEvent>) {
            self.value = value;
        }
    }

    #[test]
    fn routes_masks_and_refuses_overlaps() {
        let mut bus = MmioBus::new();
        bus.add(Box::new(Scratch {
            base: 0xFEE0_0000,
            value: 0,
        }))
        .unwrap();
        assert_eq!(
            bus.add(Box::new(Scratch {
                base: 0xFEE0_0800,
                value: 0
            })),
            Err(MmioOverlap {
                address: 0xFEE0_0800
            })
        );
        bus.add(Box::new(Scratch {
            base: 0xFEC0_0000,
            value: 0,
        }))
        .unwrap();
        let mut events = Vec::new();
        assert!(bus.write(0xFEE0_0080, 4, 0x1_2345_6789, &mut events));
        assert_eq!(bus.read(0xFEE0_0080, 4), Some(0x2345_6789));
        assert_eq!(bus.read(0xFEE0_0080, 1), Some(0x89));
        assert_eq!(bus.read(0xFEB0_0000, 4), None);
        assert!(!bus.write(0xFEB0_0000, 4, 1, &mut events));
        assert_eq!(bus.owner_name(0xFEC0_0010), Some("scratch"));
        assert!(bus.owns(0xFEE0_0FFF) && !bus.owns(0xFEE0_1000));
    }
}
