//! The emulated devices of a VM and the I/O-port bus that routes guest IN/OUT accesses to them.
//!
//! Host-testable and free of `unsafe`. Every value here comes from a guest and is treated as
//! hostile: no access (any port, any size, any value) can panic; the worst a guest can do is
//! confuse its own devices.
//!
//! The hypervisor core, on a guest IN/OUT exit, calls [`PortBus::read`] or [`PortBus::write`] and
//! then acts on the [`DeviceEvent`]s a write produced (console bytes, stopping the VM).
//!
//! Device models are written here rather than taken from a crate: the `uart_16550` crate drives a
//! real UART from the host side, it does not emulate one for a guest.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod acpi_pm;
pub mod bus;
pub mod exit_port;
pub mod ioapic;
pub mod lapic;
pub mod mmio;
pub mod pci;
pub mod pic;
pub mod pit;
pub mod rtc;
pub mod uart;

pub use acpi_pm::AcpiPm;
pub use bus::{access_width, all_ones, DeviceEvent, PortAccess, PortBus, PortDevice, PortsOverlap};
pub use exit_port::ExitPort;
pub use ioapic::{Delivery, DeliveryMode, DestinationMode, IoApic};
pub use lapic::{ApicEvent, IpiDelivery, IpiDestination, LocalApic, TimerClock, APIC_BASE};
pub use mmio::{MmioBus, MmioDevice, MmioOverlap};
pub use pci::{
    HostBridge, PciBar, PciBarError, PciBus, PciConfigSpace, PciDevice, PciIdentity, PciSlotError,
};
pub use pic::Pic;
pub use pit::{NmiStatusControl, Pit};
pub use rtc::Rtc;
pub use uart::Uart16550;
