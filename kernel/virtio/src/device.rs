//! The contract between a virtio transport and a device model ([`VirtioDevice`]), and the
//! numbers every device shares: device status bits (2.1) and the reserved feature bits (6).

use crate::memory::GuestMemory;
use crate::queue::{ChainError, DescriptorChain};

/// Device status bits. See: spec 2.1.
pub mod status {
    /// The guest OS has found the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest OS knows how to drive it.
    pub const DRIVER: u8 = 2;
    /// The driver is set up and ready to drive the device.
    pub const DRIVER_OK: u8 = 4;
    /// The driver acknowledged the features it understands; feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error it cannot recover from without a reset (2.1.2).
    pub const DEVICE_NEEDS_RESET: u8 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u8 = 128;
}

/// Reserved feature bits. See: spec 6.
pub mod feature {
    /// Indirect descriptors (2.7.5.3): not offered.
    pub const INDIRECT_DESC: u64 = 1 << 28;
    /// used_event / avail_event (2.7.10): not offered.
    pub const EVENT_IDX: u64 = 1 << 29;
    /// Compliance with this version of the spec (no legacy interface). Linux's modern PCI
    /// driver refuses a device without it.
    pub const VERSION_1: u64 = 1 << 32;
}

/// A virtio device model behind a transport. The transport owns the queues, the status and
/// the feature negotiation; the device owns its configuration space and what a chain means.
/// All arguments come from the guest; implementations must not panic on any of them.
pub trait VirtioDevice: Send {
    /// A short fixed name for logs ("virtio-blk").
    fn name(&self) -> &'static str;
    /// The virtio device ID (5: 2 for block, 1 for network).
    fn device_type(&self) -> u16;
    /// PCI base class and subclass (the transport sets programming interface 0).
    fn pci_class(&self) -> (u8, u8);
    /// The feature bits offered, including [`feature::VERSION_1`].
    fn features(&self) -> u64;
    /// The driver accepted `features` (a subset of [`Self::features`]) with FEATURES_OK.
    fn set_driver_features(&mut self, features: u64);
    /// The number of virtqueues.
    fn queue_count(&self) -> u16;
    /// The largest size of queue `queue` (a power of two, at most 256).
    fn queue_max_size(&self, queue: u16) -> u16;
    /// Reads the device-specific configuration at `offset` into `data`; bytes past the end
    /// read 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// A driver write to the device-specific configuration; read-only fields ignore it.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Handles one checked chain of queue `queue` and returns the number of bytes written to
    /// its device-writable part (the used element's `len`, 2.7.8).
    fn process_chain(
        &mut self,
        queue: u16,
        chain: &DescriptorChain,
        memory: &mut dyn GuestMemory,
    ) -> u32;
    /// Whether [`crate::VirtioPci::process`] may take chains of queue `queue` now; checked
    /// before each chain. `false` leaves the driver's chains available: for a queue the device
    /// fills on its own initiative (a network receive queue, whose buffers wait for a frame),
    /// or as back-pressure while the device's output is full (the hypervisor runs `process`
    /// again once it has room). The default takes every chain.
    fn accepts_chains(&self, _queue: u16) -> bool {
        true
    }
    /// The transport refused a chain of queue `queue` (it goes back with used len 0): for the
    /// device's statistics.
    fn chain_refused(&mut self, queue: u16, error: ChainError);
    /// The driver reset the device (device_status written 0, 2.1.1 / 4.1.4.3.2): forget
    /// negotiated features and per-driver state; keep statistics.
    fn reset(&mut self);
}
