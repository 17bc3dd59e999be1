//! The test exit device: a guest stops its own VM with a status by writing to port 0xF4.
//!
//! Follows QEMU's `isa-debug-exit` device (hw/misc/debugexit.c) with `iobase=0xf4,iosize=0x04`,
//! the convention the test guests and the rust-osdev test runner use, with one difference: QEMU
//! exits the emulator with status `(V << 1) | 1`, here the VM stops with status `V` itself.
//!
//! Contract (guest-visible, documented in docs/ and stable):
//! - a write of `V` of any size (1, 2 or 4 bytes) to any port in 0xF4..=0xF7 stops the VM with
//!   status `V` masked to the access size (like QEMU, which ignores the offset in the region);
//! - reads return all-ones of the access size, as if nothing were there.

use alloc::vec::Vec;
use core::ops::RangeInclusive;

use crate::bus::{all_ones, DeviceEvent, PortDevice};

/// The test exit device on ports 0xF4..=0xF7.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitPort;

impl ExitPort {
    /// The first port of the device, the one guests write to.
    pub const PORT: u16 = 0xF4;
    /// The last port of the device (QEMU's `iosize=0x04`).
    pub const LAST_PORT: u16 = Self::PORT + 3;

    pub fn new() -> Self {
        Self
    }
}

impl PortDevice for ExitPort {
    fn name(&self) -> &'static str {
        "exit-port"
    }

    fn ports(&self) -> RangeInclusive<u16> {
        Self::PORT..=Self::LAST_PORT
    }

    fn read(&mut self, _port: u16, size: u8) -> u32 {
        all_ones(size)
    }

    fn write(&mut self, port: u16, size: u8, value: u32, events: &mut Vec<DeviceEvent>) {
        if !self.ports().contains(&port) {
            return;
        }
        events.push(DeviceEvent::StopVm {
            status: value & all_ones(size),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::PortBus;
    use alloc::boxed::Box;

    #[test]
    fn write_of_each_size_stops_with_that_status() {
        let mut bus = PortBus::new();
        bus.add(Box::new(ExitPort::new())).unwrap();
        for (size, value, status) in [
            (1, 0x1234_5610, 0x10),
            (2, 0x1234_5678, 0x5678),
            (4, 0x1234_5678, 0x1234_5678),
            (4, 0, 0),
        ] {
            let mut events = Vec::new();
            let access = bus.write(ExitPort::PORT, size, value, &mut events);
            assert!(access.owned);
            assert_eq!(events, [DeviceEvent::StopVm { status }], "size {size}");
        }
    }

    #[test]
    fn reads_are_all_ones_and_whole_range_is_owned() {
        let mut bus = PortBus::new();
        bus.add(Box::new(ExitPort::new())).unwrap();
        assert_eq!(bus.read(ExitPort::PORT, 1).value, 0xFF);
        assert_eq!(bus.read(ExitPort::PORT, 2).value, 0xFFFF);
        assert_eq!(bus.read(ExitPort::PORT, 4).value, 0xFFFF_FFFF);
        assert_eq!(bus.owner_name(0xF7), Some("exit-port"));
        assert_eq!(bus.owner_name(0xF8), None);
        let mut events = Vec::new();
        bus.write(0xF5, 1, 3, &mut events);
        assert_eq!(events, [DeviceEvent::StopVm { status: 3 }]);
    }

    #[test]
    fn direct_write_outside_range_is_ignored() {
        let mut events = Vec::new();
        ExitPort::new().write(0x3F8, 1, 1, &mut events);
        assert!(events.is_empty());
    }
}
