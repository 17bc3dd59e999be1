//! The guest-facing virtio 1.x devices of a VM: split virtqueues parsed as hostile input, the
//! virtio-blk device model over a [`ringzero_vdisk::BlockDevice`], the virtio-net device model
//! whose other end is the hypervisor, and the virtio-pci modern transport that puts a device
//! on the VM's emulated PCI bus.
//!
//! Spec: Virtual I/O Device (VIRTIO) Version 1.2, OASIS Committee Specification 01 (2022).
//! Section numbers in this crate refer to it: 2.1 (device status), 2.2 (feature bits), 2.7
//! (split virtqueues), 4.1 (virtio over PCI), 5.1 (network device), 5.2 (block device), 6
//! (reserved feature bits).
//!
//! Host-testable and free of `unsafe`. Everything a guest wrote (ring indices, descriptors,
//! request headers, register values) is hostile: no input panics, every loop is bounded by the
//! queue size, every allocation by a constant, and every guest-memory access goes through
//! [`GuestMemory`], which refuses bytes outside the VM's RAM.
//!
//! How the hypervisor uses it: it builds a [`VirtioPci`] around a device model
//! ([`blk::Block`]), adds it to the VM's `PciBus`, routes MMIO exits that
//! [`VirtioPci::bar_containing`] claims to [`VirtioPci::bar_read`] / [`VirtioPci::bar_write`],
//! runs [`VirtioPci::process`] for the queue a notify write names, and drives the VM's INTx
//! line (level-triggered) from [`VirtioPci::interrupt_line`], read again after every
//! `bar_read` (an ISR read lowers it), `bar_write` and `process`. A notification written
//! through the configuration access window is collected with
//! [`VirtioPci::take_window_notifications`] after a PCI configuration write. Statistics:
//! [`Block::stats`] and [`Net::stats`], whose `Display` is one line each.
//!
//! A network card: `VirtioPci::new(Net::new(NetConfig::new(mac_from_name(vm_name)))?)`. The
//! hypervisor takes the frames the guest sent with `device_mut().take_transmitted()` (and runs
//! `process(net::TX_QUEUE)` again after draining a full outbox: back-pressure, see [`net`]),
//! hands frames to the guest with [`VirtioPci::deliver`] (dropped and counted when the guest
//! has no buffer posted) and changes the link with [`VirtioPci::set_link_up`]; the interrupt
//! line is read again after each of them.
//!
//! Written here rather than taken from a crate: `virtio-drivers` is the driver side (the
//! hypervisor's own disk and NIC); the device-side crates (`virtio-queue`, `virtio-device` of
//! rust-vmm) need `std` and vm-memory's mmap model, which a no_std kernel does not have.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod blk;
pub mod device;
pub mod memory;
pub mod net;
pub mod pci;
pub mod queue;
mod stream;

#[cfg(test)]
mod testing;

pub use blk::{Block, BlockErrors, BlockStats, BoxedBackend};
pub use device::VirtioDevice;
#[cfg(any(test, feature = "fake"))]
pub use memory::FakeMemory;
pub use memory::{GuestMemory, OutOfRam};
pub use net::{mac_from_name, Net, NetConfig, NetConfigError, NetDrops, NetStats, RxDropped};
pub use pci::{Notify, UseChainError, VirtioPci};
pub use queue::{ChainError, Descriptor, DescriptorChain, Queue, QueueError};
