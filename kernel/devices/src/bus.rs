//! The I/O-port bus of one VM: which device owns which ports, routing of guest IN/OUT accesses,
//! and the bookkeeping of accesses to ports nobody owns.
//!
//! Contract with the hypervisor core:
//! - One [`PortBus`] per VM, so "first time" for an unowned port means first time for this VM.
//! - Access sizes are 1, 2 or 4 bytes (what IN/OUT can encode). Any other size is never produced
//!   by hardware; so that the behaviour is still defined, it is treated as 4 (see
//!   [`access_width`]). Values read are masked to the size; values written are masked to the size
//!   before a device sees them.
//! - An access that straddles the end of a device's range (a 4-byte IN at 0x3FE on a device
//!   ending at 0x3FF, or one that wraps past port 0xFFFF) goes entirely to the device owning the
//!   FIRST port; the device decides what the bytes outside its range mean (the devices in this
//!   crate read them as 0xFF and ignore writes to them). If the first port is unowned, the whole
//!   access is unowned, even if later bytes fall on an owned port. This mirrors how a decoder
//!   claims a bus cycle by its start address, and keeps one access = one device.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::any::Any;
use core::ops::RangeInclusive;

/// What a device asks the hypervisor to do after a guest access.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceEvent {
    /// One byte the guest sent to its console (the UART's transmitter). The hypervisor collects
    /// bytes into lines and prints them with the VM's name as prefix.
    ConsoleByte(u8),
    /// Stop this VM with this status (the test exit port).
    StopVm { status: u32 },
    /// The guest powered its VM off (ACPI S5: SLP_EN with SLP_TYPx = 5 in PM1_CNT, see
    /// [`crate::AcpiPm`]). Stop the VM as a clean power-off.
    PowerOff,
    /// The guest asked for a reset of the machine (the reset control register, see
    /// [`crate::PciBus`]). ringzero does not restart VMs: stop the VM and say so.
    Reset,
}

/// A device on the I/O-port bus. Sizes are 1, 2 or 4 bytes; `port` is the first port accessed
/// (inside `ports()` when called through the bus). Implementations must not panic for any
/// `port`, `size` or `value`: all three come from the guest.
pub trait PortDevice: Send {
    /// A short fixed name for logs ("uart16550").
    fn name(&self) -> &'static str;
    /// The ports this device owns. Must not change while the device is on a bus.
    fn ports(&self) -> RangeInclusive<u16>;
    /// A guest IN of `size` bytes starting at `port`. The bus masks the result to `size`.
    fn read(&mut self, port: u16, size: u8) -> u32;
    /// A guest OUT of `size` bytes starting at `port`; `value` is already masked to `size` by
    /// the bus. Requests for the hypervisor are appended to `events`.
    fn write(&mut self, port: u16, size: u8, value: u32, events: &mut Vec<DeviceEvent>);
    /// The device as `Any`, so the hypervisor can reach a concrete device on the bus (for
    /// example [`crate::Uart16550::push_input`]) with [`PortBus::device_mut`]. Devices that do
    /// not need that keep the default `None`.
    fn as_any_mut(&mut self) -> Option<&mut dyn Any> {
        None
    }
}

/// [`PortBus::add`] refused a device because `port` is already owned by another device (or the
/// new device's range is empty, in which case `port` is its start).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortsOverlap {
    pub port: u16,
}

/// The result of an access: `unowned_first_time` is true the first time this VM touched this
/// unowned port (so the caller logs it once per VM and port).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortAccess {
    /// The value read (masked to the access size), or 0 for a write.
    pub value: u32,
    /// Whether a device owns the first port of the access.
    pub owned: bool,
    /// True only for the first access (read or write) of this VM to this unowned port.
    pub unowned_first_time: bool,
}

/// The number of bytes an access of `size` covers: 1 and 2 as given, anything else 4.
pub fn access_width(size: u8) -> u8 {
    match size {
        1 => 1,
        2 => 2,
        _ => 4,
    }
}

/// All-ones of the access size: 0xFF, 0xFFFF or 0xFFFF_FFFF (sizes other than 1 and 2 count as
/// 4, see [`access_width`]). What a read from a port nobody drives returns on a PC.
pub fn all_ones(size: u8) -> u32 {
    match access_width(size) {
        1 => 0xFF,
        2 => 0xFFFF,
        _ => 0xFFFF_FFFF,
    }
}

/// Number of 64-bit words in the bitmap of unowned ports seen (one bit per port, 8 KiB).
const UNOWNED_BITMAP_WORDS: usize = (u16::MAX as usize + 1) / 64;

/// One device with its port range, cached so routing never calls back into the device.
struct Slot {
    first_port: u16,
    last_port: u16,
    device: Box<dyn PortDevice>,
}

/// The I/O-port bus of one VM.
pub struct PortBus {
    /// Sorted by `first_port`; ranges never overlap.
    slots: Vec<Slot>,
    /// Bit `port` is set once this VM has touched unowned `port`.
    unowned_seen: Vec<u64>,
    unowned_accesses: u64,
    unowned_ports_seen: usize,
}

impl Default for PortBus {
    fn default() -> Self {
        Self::new()
    }
}

impl PortBus {
    /// An empty bus: every port unowned.
    pub fn new() -> Self {
        Self {
            slots: Vec::new(),
            unowned_seen: alloc::vec![0; UNOWNED_BITMAP_WORDS],
            unowned_accesses: 0,
            unowned_ports_seen: 0,
        }
    }

    /// Puts `device` on the bus. Refused (and the device dropped) if any of its ports is already
    /// owned; `PortsOverlap::port` is the first port owned by both. A device with an empty
    /// range is refused too, since it could never be reached.
    pub fn add(&mut self, device: Box<dyn PortDevice>) -> Result<(), PortsOverlap> {
        let range = device.ports();
        let (first_port, last_port) = (*range.start(), *range.end());
        if first_port > last_port {
            return Err(PortsOverlap { port: first_port });
        }
        if let Some(existing) = self
            .slots
            .iter()
            .find(|slot| slot.first_port <= last_port && first_port <= slot.last_port)
        {
            return Err(PortsOverlap {
                port: first_port.max(existing.first_port),
            });
        }
        let index = self
            .slots
            .partition_point(|slot| slot.first_port < first_port);
        self.slots.insert(
            index,
            Slot {
                first_port,
                last_port,
                device,
            },
        );
        Ok(())
    }

    /// Reads `size` bytes starting at `port`. Ports nobody owns read as all-ones of the access
    /// size (0xFF, 0xFFFF, 0xFFFF_FFFF).
    pub fn read(&mut self, port: u16, size: u8) -> PortAccess {
        let mask = all_ones(size);
        match self.slot_index(port) {
            Some(index) => PortAccess {
                value: self.slots[index].device.read(port, size) & mask,
                owned: true,
                unowned_first_time: false,
            },
            None => PortAccess {
                value: mask,
                owned: false,
                unowned_first_time: self.note_unowned(port),
            },
        }
    }

    /// Writes `size` bytes of `value` starting at `port`; the device sees `value` masked to the
    /// size. Writes to ports nobody owns are ignored. The result's `value` is always 0.
    pub fn write(
        &mut self,
        port: u16,
        size: u8,
        value: u32,
        events: &mut Vec<DeviceEvent>,
    ) -> PortAccess {
        match self.slot_index(port) {
            Some(index) => {
                self.slots[index]
                    .device
                    .write(port, size, value & all_ones(size), events);
                PortAccess {
                    value: 0,
                    owned: true,
                    unowned_first_time: false,
                }
            }
            None => PortAccess {
                value: 0,
                owned: false,
                unowned_first_time: self.note_unowned(port),
            },
        }
    }

    /// Count of all accesses (reads and writes) to unowned ports.
    pub fn unowned_accesses(&self) -> u64 {
        self.unowned_accesses
    }

    /// Number of distinct unowned ports touched.
    pub fn unowned_ports_seen(&self) -> usize {
        self.unowned_ports_seen
    }

    /// Number of devices on the bus.
    pub fn device_count(&self) -> usize {
        self.slots.len()
    }

    /// The name of the device owning `port`, if any (for log lines).
    pub fn owner_name(&self, port: u16) -> Option<&'static str> {
        self.slot_index(port)
            .map(|index| self.slots[index].device.name())
    }

    /// The device owning `port` as its concrete type `T`, if it is one and opted in through
    /// [`PortDevice::as_any_mut`]. Example: `bus.device_mut::<Uart16550>(Uart16550::COM1)`.
    pub fn device_mut<T: Any>(&mut self, port: u16) -> Option<&mut T> {
        let index = self.slot_index(port)?;
        self.slots[index].device.as_any_mut()?.downcast_mut::<T>()
    }

    /// Index of the slot whose range contains `port`.
    fn slot_index(&self, port: u16) -> Option<usize> {
        // Slots are sorted and disjoint: the only candidate is the last one starting at or
        // before `port`.
        let after = self.slots.partition_point(|slot| slot.first_port <= port);
        let index = after.checked_sub(1)?;
        (port <= self.slots[index].last_port).then_some(index)
    }

    /// Counts an unowned access; returns whether this is the first one to `port`.
    fn note_unowned(&mut self, port: u16) -> bool {
        self.unowned_accesses = self.unowned_accesses.saturating_add(1);
        let word = usize::from(port) / 64;
        let bit = 1u64 << (port % 64);
        let Some(seen) = self.unowned_seen.get_mut(word) else {
            return false;
        };
        if *seen & bit != 0 {
            return false;
        }
        *seen |= bit;
        self.unowned_ports_seen += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device that records accesses and reads as a fixed pattern.
    struct Probe {
        range: RangeInclusive<u16>,
        last_write: Option<(u16, u8, u32)>,
        reads: u32,
    }

    impl Probe {
        fn boxed(first: u16, last: u16) -> Box<Self> {
            Box::new(Self {
                range: first..=last,
                last_write: None,
                reads: 0,
            })
        }
    }

    impl PortDevice for Probe {
        fn name(&self) -> &'static str {
            "probe"
        }
        fn ports(&self) -> RangeInclusive<u16> {
            self.range.clone()
        }
        fn read(&mut self, port: u16, _size: u8) -> u32 {
            self.reads += 1;
            // Deliberately wider than any access, to check the bus masks it.
            0xA5A5_0000 | u32::from(port)
        }
        fn write(&mut self, port: u16, size: u8, value: u32, _events: &mut Vec<DeviceEvent>) {
            self.last_write = Some((port, size, value));
        }
        fn as_any_mut(&mut self) -> Option<&mut dyn Any> {
            Some(self)
        }
    }

    #[test]
    fn routes_reads_and_writes_to_the_owner() {
        let mut bus = PortBus::new();
        bus.add(Probe::boxed(0x60, 0x64)).unwrap();
        bus.add(Probe::boxed(0x10, 0x1F)).unwrap();
        bus.add(Probe::boxed(0xFFF0, 0xFFFF)).unwrap();
        assert_eq!(bus.device_count(), 3);

        let access = bus.read(0x12, 2);
        assert_eq!(
            access,
            PortAccess {
                value: 0x0012,
                owned: true,
                unowned_first_time: false
            }
        );
        assert_eq!(bus.read(0x64, 4).value, 0xA5A5_0064);
        assert_eq!(bus.read(0xFFFF, 1).value, 0xFF);

        let mut events = Vec::new();
        let access = bus.write(0x61, 1, 0x1234, &mut events);
        assert!(access.owned);
        assert_eq!(access.value, 0);
        let probe = bus.device_mut::<Probe>(0x60).unwrap();
        assert_eq!(
            probe.last_write,
            Some((0x61, 1, 0x34)),
            "value masked to size"
        );
        assert_eq!(bus.device_mut::<Probe>(0x10).unwrap().last_write, None);
        assert_eq!(bus.owner_name(0x1F), Some("probe"));
        assert_eq!(bus.owner_name(0x20), None);
        assert_eq!(bus.unowned_accesses(), 0);
    }

    #[test]
    fn straddling_access_goes_to_owner_of_first_port() {
        let mut bus = PortBus::new();
        bus.add(Probe::boxed(0x3F8, 0x3FF)).unwrap();
        bus.add(Probe::boxed(0x400, 0x407)).unwrap();
        let mut events = Vec::new();
        bus.write(0x3FE, 4, 0xDEAD_BEEF, &mut events);
        let first = bus.device_mut::<Probe>(0x3F8).unwrap();
        assert_eq!(first.last_write, Some((0x3FE, 4, 0xDEAD_BEEF)));
        assert_eq!(bus.device_mut::<Probe>(0x400).unwrap().last_write, None);
        // First port unowned: the whole access is unowned.
        assert!(!bus.read(0x3F6, 4).owned);
        assert_eq!(bus.device_mut::<Probe>(0x3F8).unwrap().reads, 0);
    }

    #[test]
    fn refuses_overlapping_and_empty_ranges() {
        let mut bus = PortBus::new();
        bus.add(Probe::boxed(0x3F8, 0x3FF)).unwrap();
        assert_eq!(
            bus.add(Probe::boxed(0x3FF, 0x400)),
            Err(PortsOverlap { port: 0x3FF })
        );
        assert_eq!(
            bus.add(Probe::boxed(0x3F0, 0x3F8)),
            Err(PortsOverlap { port: 0x3F8 })
        );
        assert_eq!(
            bus.add(Probe::boxed(0x3FA, 0x3FB)),
            Err(PortsOverlap { port: 0x3FA })
        );
        assert_eq!(
            bus.add(Probe::boxed(0x300, 0x4FF)),
            Err(PortsOverlap { port: 0x3F8 })
        );
        assert_eq!(
            bus.add(Probe::boxed(0x10, 0x0F)),
            Err(PortsOverlap { port: 0x10 })
        );
        assert_eq!(bus.device_count(), 1);
        // Neighbours are fine.
        bus.add(Probe::boxed(0x3F0, 0x3F7)).unwrap();
        bus.add(Probe::boxed(0x400, 0x400)).unwrap();
        assert_eq!(bus.device_count(), 3);
    }

    #[test]
    fn unowned_reads_are_all_ones_of_the_size() {
        let mut bus = PortBus::new();
        assert_eq!(bus.read(0x80, 1).value, 0xFF);
        assert_eq!(bus.read(0x80, 2).value, 0xFFFF);
        assert_eq!(bus.read(0x80, 4).value, 0xFFFF_FFFF);
        // Sizes hardware never produces count as 4.
        assert_eq!(bus.read(0x80, 0).value, 0xFFFF_FFFF);
        assert_eq!(bus.read(0x80, 3).value, 0xFFFF_FFFF);
        assert_eq!(bus.read(0x80, 255).value, 0xFFFF_FFFF);
        let mut events = Vec::new();
        let access = bus.write(0x80, 4, 0x1234_5678, &mut events);
        assert_eq!(access.value, 0);
        assert!(!access.owned);
        assert!(events.is_empty());
    }

    #[test]
    fn unowned_first_time_once_per_port_and_counts() {
        let mut bus = PortBus::new();
        bus.add(Probe::boxed(0x3F8, 0x3FF)).unwrap();
        let mut events = Vec::new();

        assert!(bus.read(0x80, 1).unowned_first_time);
        assert!(!bus.read(0x80, 1).unowned_first_time);
        assert!(!bus.write(0x80, 1, 0, &mut events).unowned_first_time);
        assert!(bus.write(0x81, 2, 0, &mut events).unowned_first_time);
        assert!(!bus.read(0x81, 4).unowned_first_time);
        assert!(bus.read(0, 1).unowned_first_time);
        assert!(bus.read(0xFFFF, 4).unowned_first_time);
        assert!(!bus.read(0xFFFF, 1).unowned_first_time);
        // Owned accesses are not counted.
        assert!(!bus.read(0x3F8, 1).unowned_first_time);

        assert_eq!(bus.unowned_accesses(), 8);
        assert_eq!(bus.unowned_ports_seen(), 4);
    }

    #[test]
    fn every_port_and_size_is_safe() {
        let mut bus = PortBus::new();
        bus.add(Probe::boxed(0x3F8, 0x3FF)).unwrap();
        let mut events = Vec::new();
        for port in 0..=u16::MAX {
            for size in [0, 1, 2, 3, 4, 8] {
                let value = bus.read(port, size).value;
                assert_eq!(value & !all_ones(size), 0);
                bus.write(port, size, u32::MAX, &mut events);
            }
        }
        assert_eq!(bus.unowned_ports_seen(), 65536 - 8);
    }
}
