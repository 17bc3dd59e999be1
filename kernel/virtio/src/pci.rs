//! The virtio-pci modern transport (spec 4.1): a [`VirtioDevice`] as a function on the VM's
//! emulated PCI bus, with its registers in one memory BAR and interrupts on INTA#.
//!
//! Identity (4.1.2): vendor 0x1AF4, device 0x1040 + the virtio device type, revision 1
//! (non-transitional: no legacy I/O BAR), subsystem vendor 0x1AF4 and subsystem device 0x1100
//! (at least 0x40, 4.1.2.1), the class the device model names, interrupt pin INTA#.
//!
//! BAR 0 is a 16 KiB non-prefetchable 32-bit memory BAR holding, a page each:
//!
//! | BAR offset | structure | capability (cfg_type) |
//! |---|---|---|
//! | 0x0000 | common configuration (4.1.4.3), 0x38 bytes | 1 at 0x40 |
//! | 0x1000 | ISR status (4.1.4.5), 1 byte | 3 at 0x64 |
//! | 0x2000 | device-specific configuration (4.1.4.6) | 4 at 0x74 |
//! | 0x3000 | notifications (4.1.4.4): queue *n* at 0x3000 + 4n | 2 at 0x50 |
//!
//! plus the PCI configuration access capability (cfg_type 5, 4.1.4.9) at 0x84, a window onto
//! the BAR through configuration space.
//!
//! Model decisions:
//! - No MSI-X capability: `msix_config` and `queue_msix_vector` read NO_VECTOR (0xFFFF) and
//!   ignore writes. Linux's `vp_find_vqs` then falls back to one shared INTx interrupt.
//!   The interrupt is level-triggered: [`VirtioPci::interrupt_line`] is asserted while the ISR
//!   is non-zero (and Command.INTERRUPT_DISABLE is clear); reading the ISR clears it
//!   (4.1.4.5.1). Status bit 3 (interrupt status) follows the ISR.
//! - Common configuration fields may be accessed with any width at any offset (the spec asks
//!   drivers for natural widths, 4.1.3.1; 64-bit fields also in two 32-bit halves, which is
//!   what Linux does). Each field touched sees a read-modify-write of the bytes written.
//! - Features offered are the device's: indirect descriptors, event index and packed rings
//!   are never offered. FEATURES_OK stays clear (4.1.4.3.2 / 3.1.1) when the driver accepted
//!   a feature not offered or did not accept VERSION_1.
//! - Queue registers written while the queue is enabled are ignored; the queue size and ring
//!   addresses are checked when the queue is processed. A queue fault (bad size, rings not in
//!   RAM or misaligned, an avail index running ahead) sets DEVICE_NEEDS_RESET (2.1.2), raises
//!   a configuration-change interrupt and stops all processing until the driver resets.
//! - Queues are processed only with DRIVER_OK and Command.BUS_MASTER set (no DMA without bus
//!   mastering); writing 0 to device_status resets the device (queues, features, ISR).
//! - Besides driver notifications ([`VirtioPci::process`]), a device may take one chain on
//!   its own initiative ([`VirtioPci::use_chain`]: a received frame) and may refuse chains for
//!   now ([`VirtioDevice::accepts_chains`]: a receive queue, or back-pressure); a configuration
//!   change on the hypervisor's side ([`VirtioPci::config_changed`]) bumps config_generation
//!   and raises the configuration interrupt.
//! - A notification through the configuration access window (cfg_type 5) cannot return a
//!   [`Notify`] from [`PciDevice::write_config`]; it is kept until
//!   [`VirtioPci::take_window_notifications`].

use alloc::vec::Vec;
use core::any::Any;

use ringzero_devices::pci::{COMMAND_BUS_MASTER, COMMAND_MEMORY_SPACE};
use ringzero_devices::{PciBar, PciConfigSpace, PciDevice, PciIdentity};

use crate::device::{feature, status, VirtioDevice};
use crate::memory::GuestMemory;
use crate::queue::{Available, ChainError, DescriptorChain, Queue, QueueError};

/// Red Hat's virtio vendor ID (4.1.2).
pub const VENDOR_ID: u16 = 0x1AF4;
/// Non-transitional device IDs are this plus the device type (4.1.2).
pub const DEVICE_ID_BASE: u16 = 0x1040;
/// The subsystem device ID (4.1.2.1: non-transitional devices SHOULD use 0x40 or higher).
pub const SUBSYSTEM_ID: u16 = 0x1100;
/// The BAR holding every structure.
pub const BAR_INDEX: usize = 0;
/// Its size.
pub const BAR_SIZE: u64 = 0x4000;
/// The value of an MSI-X vector register with no vector (4.1.4.3).
pub const NO_VECTOR: u16 = 0xFFFF;

/// BAR offsets of the structures (see the module documentation).
pub const COMMON_OFFSET: u64 = 0x0000;
pub const ISR_OFFSET: u64 = 0x1000;
pub const DEVICE_CONFIG_OFFSET: u64 = 0x2000;
pub const NOTIFY_OFFSET: u64 = 0x3000;
const REGION_SIZE: u64 = 0x1000;
/// Length of the common configuration structure in 1.1 (what Linux 6.1 maps), 4.1.4.3.
const COMMON_LENGTH: u32 = 0x38;
/// queue_notify_off * this is a queue's notify address offset (4.1.4.4).
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;

/// ISR status bits (4.1.4.5).
pub const ISR_QUEUE: u8 = 1;
pub const ISR_CONFIG: u8 = 2;

/// Capability cfg_type values (4.1.4).
const CAP_COMMON_CFG: u8 = 1;
const CAP_NOTIFY_CFG: u8 = 2;
const CAP_ISR_CFG: u8 = 3;
const CAP_DEVICE_CFG: u8 = 4;
const CAP_PCI_CFG: u8 = 5;
/// PCI capability ID of a vendor-specific capability (PCI 3.0 Appendix H).
const CAP_ID_VENDOR: u8 = 0x09;
/// Configuration space offsets of the capabilities.
pub const CAP_COMMON: u8 = 0x40;
pub const CAP_NOTIFY: u8 = 0x50;
pub const CAP_ISR: u8 = 0x64;
pub const CAP_DEVICE: u8 = 0x74;
pub const CAP_PCI_WINDOW: u8 = 0x84;
/// Offsets inside the cfg_type 5 capability: bar (byte 4), offset, length, pci_cfg_data.
const WINDOW_BAR: u16 = CAP_PCI_WINDOW as u16 + 4;
const WINDOW_OFFSET: u16 = CAP_PCI_WINDOW as u16 + 8;
const WINDOW_LENGTH: u16 = CAP_PCI_WINDOW as u16 + 12;
const WINDOW_DATA: u16 = CAP_PCI_WINDOW as u16 + 16;

/// Command bit 10: INTx emulation disabled. Status bit 3 (bit 19 of the dword): an INTx
/// interrupt is pending. See: PCI 3.0 6.2.2, 6.2.3.
const COMMAND_INTERRUPT_DISABLE: u16 = 1 << 10;
const STATUS_INTERRUPT: u32 = 1 << 19;

/// A driver notification: run [`VirtioPci::process`] for `queue`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Notify {
    pub queue: u16,
}

/// Why [`VirtioPci::use_chain`] gave the device no chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UseChainError {
    /// The device is not live (no DRIVER_OK, or DEVICE_NEEDS_RESET), bus mastering is off, or
    /// the queue does not exist or is not enabled.
    NotLive,
    /// The driver has made no chain available.
    NoChain,
    /// The next available chain failed the walker's checks: it went back used with len 0 (or
    /// was skipped when its head index was out of range) and the device's
    /// [`VirtioDevice::chain_refused`] was told.
    Refused(ChainError),
    /// The queue itself is broken: DEVICE_NEEDS_RESET is now set (2.1.2).
    QueueFault(QueueError),
}

/// The fields of the common configuration structure (4.1.4.3); 64-bit fields as two halves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    DeviceFeatureSelect,
    DeviceFeature,
    DriverFeatureSelect,
    DriverFeature,
    MsixConfig,
    NumQueues,
    DeviceStatus,
    ConfigGeneration,
    QueueSelect,
    QueueSize,
    QueueMsixVector,
    QueueEnable,
    QueueNotifyOff,
    QueueDescLow,
    QueueDescHigh,
    QueueDriverLow,
    QueueDriverHigh,
    QueueDeviceLow,
    QueueDeviceHigh,
}

/// (offset, width, field). See: spec 4.1.4.3, struct virtio_pci_common_cfg.
const FIELDS: [(u64, u64, Field); 19] = [
    (0x00, 4, Field::DeviceFeatureSelect),
    (0x04, 4, Field::DeviceFeature),
    (0x08, 4, Field::DriverFeatureSelect),
    (0x0C, 4, Field::DriverFeature),
    (0x10, 2, Field::MsixConfig),
    (0x12, 2, Field::NumQueues),
    (0x14, 1, Field::DeviceStatus),
    (0x15, 1, Field::ConfigGeneration),
    (0x16, 2, Field::QueueSelect),
    (0x18, 2, Field::QueueSize),
    (0x1A, 2, Field::QueueMsixVector),
    (0x1C, 2, Field::QueueEnable),
    (0x1E, 2, Field::QueueNotifyOff),
    (0x20, 4, Field::QueueDescLow),
    (0x24, 4, Field::QueueDescHigh),
    (0x28, 4, Field::QueueDriverLow),
    (0x2C, 4, Field::QueueDriverHigh),
    (0x30, 4, Field::QueueDeviceLow),
    (0x34, 4, Field::QueueDeviceHigh),
];

/// A virtio device on the PCI bus. See the module documentation.
pub struct VirtioPci<D: VirtioDevice> {
    device: D,
    config: PciConfigSpace,
    queues: Vec<Queue>,
    device_status: u8,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    queue_select: u16,
    config_generation: u8,
    isr: u8,
    /// Queues notified through the configuration window, one bit each (queues 0..64).
    window_notifications: u64,
    queue_error: Option<QueueError>,
}

impl<D: VirtioDevice> VirtioPci<D> {
    /// `device` as a PCI function, reset, with BAR 0 unassigned and decoding off.
    pub fn new(device: D) -> Self {
        let (class, subclass) = device.pci_class();
        let identity = PciIdentity {
            vendor_id: VENDOR_ID,
            device_id: DEVICE_ID_BASE.wrapping_add(device.device_type()),
            revision: 1,
            class,
            subclass,
            programming_interface: 0,
            subsystem_vendor_id: VENDOR_ID,
            subsystem_id: SUBSYSTEM_ID,
            interrupt_pin: 1,
        };
        let mut config = PciConfigSpace::new(identity);
        // BAR_SIZE is a valid Memory32 size and slot 0 is free: cannot fail.
        let _ = config.set_bar(
            BAR_INDEX,
            PciBar::Memory32 {
                size: BAR_SIZE as u32,
                prefetchable: false,
            },
        );
        config.set_capabilities_pointer(CAP_COMMON);
        let queue_count = u64::from(device.queue_count());
        let caps = [
            (
                CAP_COMMON,
                CAP_NOTIFY,
                CAP_COMMON_CFG,
                COMMON_OFFSET,
                u64::from(COMMON_LENGTH),
            ),
            (
                CAP_NOTIFY,
                CAP_ISR,
                CAP_NOTIFY_CFG,
                NOTIFY_OFFSET,
                (queue_count * u64::from(NOTIFY_OFF_MULTIPLIER)).clamp(4, REGION_SIZE),
            ),
            (CAP_ISR, CAP_DEVICE, CAP_ISR_CFG, ISR_OFFSET, 1),
            (
                CAP_DEVICE,
                CAP_PCI_WINDOW,
                CAP_DEVICE_CFG,
                DEVICE_CONFIG_OFFSET,
                REGION_SIZE,
            ),
            (CAP_PCI_WINDOW, 0, CAP_PCI_CFG, 0, 0),
        ];
        for (at, next, cfg_type, offset, length) in caps {
            let at = u16::from(at);
            let cap_len: u32 = if cfg_type == CAP_NOTIFY_CFG || cfg_type == CAP_PCI_CFG {
                20
            } else {
                16
            };
            // struct virtio_pci_cap (4.1.4): cap_vndr, cap_next, cap_len, cfg_type; bar, id,
            // padding[2]; le32 offset; le32 length.
            config.set_register(
                at,
                u32::from(CAP_ID_VENDOR)
                    | u32::from(next) << 8
                    | cap_len << 16
                    | u32::from(cfg_type) << 24,
            );
            let bar = if cfg_type == CAP_PCI_CFG {
                0
            } else {
                BAR_INDEX as u32
            };
            config.set_register(at + 4, bar);
            config.set_register(at + 8, offset as u32);
            config.set_register(at + 12, length as u32);
        }
        // struct virtio_pci_notify_cap: le32 notify_off_multiplier (4.1.4.4).
        config.set_register(u16::from(CAP_NOTIFY) + 16, NOTIFY_OFF_MULTIPLIER);
        // struct virtio_pci_cfg_cap (4.1.4.9): the driver writes bar, offset and length.
        config.set_writable(WINDOW_BAR, 0xFF);
        config.set_writable(WINDOW_OFFSET, u32::MAX);
        config.set_writable(WINDOW_LENGTH, u32::MAX);
        let queues = (0..device.queue_count())
            .map(|queue| Queue::new(device.queue_max_size(queue)))
            .collect();
        Self {
            device,
            config,
            queues,
            device_status: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            queue_select: 0,
            config_generation: 0,
            isr: 0,
            window_notifications: 0,
            queue_error: None,
        }
    }

    /// The device model.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device model, mutably.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The device status register (2.1).
    pub fn device_status(&self) -> u8 {
        self.device_status
    }

    /// The features the driver accepted (valid once FEATURES_OK is set).
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// Queue `index`, if it exists.
    pub fn queue(&self, index: u16) -> Option<&Queue> {
        self.queues.get(usize::from(index))
    }

    /// Whether a chain [`Self::use_chain`] would take from queue `index` now is missing: the
    /// device is live, the queue enabled, and the driver has made no new chain available.
    /// Reads the avail index only. `false` when the device or queue is not live (using a
    /// chain would fail for that reason, not for want of one).
    pub fn waiting_for_chain(&self, index: u16, memory: &mut dyn GuestMemory) -> bool {
        self.queues_may_run()
            && self
                .queues
                .get(usize::from(index))
                .is_some_and(|queue| queue.enabled && !queue.has_available(memory))
    }

    /// The queue fault that set DEVICE_NEEDS_RESET, for the log; cleared by a reset.
    pub fn queue_error(&self) -> Option<QueueError> {
        self.queue_error
    }

    /// The ISR status byte, without clearing it.
    pub fn isr(&self) -> u8 {
        self.isr
    }

    /// The level of INTA#: asserted while the ISR is non-zero, unless the guest set
    /// Command.INTERRUPT_DISABLE.
    pub fn interrupt_line(&self) -> bool {
        self.isr != 0 && self.config.command() & COMMAND_INTERRUPT_DISABLE == 0
    }

    /// Which BAR contains `gpa`, and the offset inside it: `None` when the guest has not
    /// turned memory decoding on (Command.MEMORY_SPACE) or `gpa` is outside the BAR.
    pub fn bar_containing(&self, gpa: u64) -> Option<(usize, u64)> {
        if self.config.command() & COMMAND_MEMORY_SPACE == 0 {
            return None;
        }
        let base = self.config.bar_address(BAR_INDEX)?;
        let offset = gpa.checked_sub(base)?;
        (offset < BAR_SIZE).then_some((BAR_INDEX, offset))
    }

    /// The device status with DRIVER_OK set and no reset needed: queues may run.
    fn live(&self) -> bool {
        self.device_status & status::DRIVER_OK != 0
            && self.device_status & status::DEVICE_NEEDS_RESET == 0
    }

    /// Live (see [`Self::live`]) and bus mastering on: the device may use its queues, which
    /// means touching guest memory.
    fn queues_may_run(&self) -> bool {
        self.live() && self.config.command() & COMMAND_BUS_MASTER != 0
    }

    /// A guest read of `size` (1, 2, 4 or 8) bytes at `offset` in BAR `bar`. Anything else, or
    /// a range outside the structures, reads 0. Reading the ISR clears it.
    pub fn bar_read(&mut self, bar: usize, offset: u64, size: u8) -> u64 {
        let Some(size) = Self::access(bar, offset, size) else {
            return 0;
        };
        let region_offset = offset % REGION_SIZE;
        match offset / REGION_SIZE {
            0 => (0..size).fold(0, |value, i| {
                value | u64::from(self.common_byte(region_offset + i)) << (8 * i)
            }),
            1 if region_offset == 0 => {
                // See: spec 4.1.4.5.1, the device MUST reset ISR status to 0 on driver read.
                let isr = self.isr;
                self.isr = 0;
                u64::from(isr)
            }
            2 => {
                let mut data = [0u8; 8];
                let data = &mut data[..size as usize];
                self.device.read_config(region_offset, data);
                data.iter()
                    .rev()
                    .fold(0, |value, byte| value << 8 | u64::from(*byte))
            }
            _ => 0,
        }
    }

    /// A guest write of `size` (1, 2, 4 or 8) bytes of `value` at `offset` in BAR `bar`.
    /// Returns the queue to process when it was a notification (4.1.4.4, 4.1.5.2).
    pub fn bar_write(&mut self, bar: usize, offset: u64, size: u8, value: u64) -> Option<Notify> {
        let size = Self::access(bar, offset, size)?;
        let region_offset = offset % REGION_SIZE;
        match offset / REGION_SIZE {
            0 => {
                self.common_write(region_offset, size, value);
                None
            }
            2 => {
                let bytes = value.to_le_bytes();
                self.device
                    .write_config(region_offset, &bytes[..size as usize]);
                None
            }
            3 => {
                // The queue is the one whose notify address was written (queue_notify_off is
                // the queue index); the value (also the index, without NOTIFICATION_DATA) is
                // not needed.
                let queue = region_offset / u64::from(NOTIFY_OFF_MULTIPLIER);
                let queue = u16::try_from(queue).ok()?;
                (usize::from(queue) < self.queues.len()).then_some(Notify { queue })
            }
            _ => None,
        }
    }

    /// The size of a valid access to BAR `bar`, or `None`.
    fn access(bar: usize, offset: u64, size: u8) -> Option<u64> {
        let size = u64::from(size);
        let valid = bar == BAR_INDEX
            && matches!(size, 1 | 2 | 4 | 8)
            && offset.checked_add(size).is_some_and(|end| end <= BAR_SIZE);
        valid.then_some(size)
    }

    /// The field of the common configuration at byte `offset`, and the byte's place in it.
    fn field_at(offset: u64) -> Option<(Field, u64, u64)> {
        FIELDS
            .iter()
            .find(|(start, width, _)| offset >= *start && offset < start + width)
            .map(|&(start, width, field)| (field, start, width))
    }

    fn common_byte(&self, offset: u64) -> u8 {
        match Self::field_at(offset) {
            Some((field, start, _)) => (self.field_read(field) >> (8 * (offset - start))) as u8,
            None => 0,
        }
    }

    /// Writes the bytes `offset..offset + size` of the common configuration: each field
    /// touched gets its current value with the written bytes replaced.
    fn common_write(&mut self, offset: u64, size: u64, value: u64) {
        for &(start, width, field) in FIELDS.iter() {
            let end = start + width;
            if end <= offset || start >= offset + size {
                continue;
            }
            let mut merged = self.field_read(field);
            for byte in start.max(offset)..end.min(offset + size) {
                let from = (value >> (8 * (byte - offset))) & 0xFF;
                let shift = 8 * (byte - start);
                merged = (merged & !(0xFF << shift)) | from << shift;
            }
            self.field_write(field, merged);
        }
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(usize::from(self.queue_select))
    }

    fn field_read(&self, field: Field) -> u64 {
        let queue = self.selected_queue();
        let queue_value = |get: fn(&Queue) -> u64| queue.map(get).unwrap_or(0);
        match field {
            Field::DeviceFeatureSelect => u64::from(self.device_feature_select),
            Field::DeviceFeature => match self.device_feature_select {
                0 => self.device.features() & 0xFFFF_FFFF,
                1 => self.device.features() >> 32,
                _ => 0,
            },
            Field::DriverFeatureSelect => u64::from(self.driver_feature_select),
            Field::DriverFeature => match self.driver_feature_select {
                0 => self.driver_features & 0xFFFF_FFFF,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            Field::MsixConfig | Field::QueueMsixVector => u64::from(NO_VECTOR),
            Field::NumQueues => self.queues.len() as u64,
            Field::DeviceStatus => u64::from(self.device_status),
            Field::ConfigGeneration => u64::from(self.config_generation),
            Field::QueueSelect => u64::from(self.queue_select),
            // 4.1.4.3: queue_size reads 0 for a queue that does not exist.
            Field::QueueSize => queue_value(|q| u64::from(q.size)),
            Field::QueueEnable => queue_value(|q| u64::from(q.enabled)),
            Field::QueueNotifyOff => match queue {
                Some(_) => u64::from(self.queue_select),
                None => 0,
            },
            Field::QueueDescLow => queue_value(|q| q.desc_table & 0xFFFF_FFFF),
            Field::QueueDescHigh => queue_value(|q| q.desc_table >> 32),
            Field::QueueDriverLow => queue_value(|q| q.avail_ring & 0xFFFF_FFFF),
            Field::QueueDriverHigh => queue_value(|q| q.avail_ring >> 32),
            Field::QueueDeviceLow => queue_value(|q| q.used_ring & 0xFFFF_FFFF),
            Field::QueueDeviceHigh => queue_value(|q| q.used_ring >> 32),
        }
    }

    fn field_write(&mut self, field: Field, value: u64) {
        let negotiated = self.device_status & status::FEATURES_OK != 0;
        match field {
            Field::DeviceFeatureSelect => self.device_feature_select = value as u32,
            Field::DriverFeatureSelect => self.driver_feature_select = value as u32,
            // 3.1.1: features are fixed once FEATURES_OK is set.
            Field::DriverFeature if !negotiated => match self.driver_feature_select {
                0 => self.driver_features = (self.driver_features & !0xFFFF_FFFF) | value,
                1 => self.driver_features = (self.driver_features & 0xFFFF_FFFF) | value << 32,
                _ => {}
            },
            Field::DeviceStatus => self.write_status(value as u8),
            Field::QueueSelect => self.queue_select = value as u16,
            Field::QueueEnable if value == 1 => {
                if let Some(queue) = self.queues.get_mut(usize::from(self.queue_select)) {
                    queue.enabled = true;
                }
            }
            Field::QueueSize
            | Field::QueueDescLow
            | Field::QueueDescHigh
            | Field::QueueDriverLow
            | Field::QueueDriverHigh
            | Field::QueueDeviceLow
            | Field::QueueDeviceHigh => {
                let Some(queue) = self.queues.get_mut(usize::from(self.queue_select)) else {
                    return;
                };
                if queue.enabled {
                    return;
                }
                let low = |old: u64| (old & !0xFFFF_FFFF) | value;
                let high = |old: u64| (old & 0xFFFF_FFFF) | value << 32;
                match field {
                    Field::QueueSize => queue.size = value as u16,
                    Field::QueueDescLow => queue.desc_table = low(queue.desc_table),
                    Field::QueueDescHigh => queue.desc_table = high(queue.desc_table),
                    Field::QueueDriverLow => queue.avail_ring = low(queue.avail_ring),
                    Field::QueueDriverHigh => queue.avail_ring = high(queue.avail_ring),
                    Field::QueueDeviceLow => queue.used_ring = low(queue.used_ring),
                    _ => queue.used_ring = high(queue.used_ring),
                }
            }
            // Read-only fields, MSI-X vectors without MSI-X, queue_enable 0 (only meaningful
            // with VIRTIO_F_RING_RESET, not offered), features after FEATURES_OK.
            _ => {}
        }
    }

    /// A driver write to device_status (2.1, 3.1.1, 4.1.4.3.2).
    fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        // DEVICE_NEEDS_RESET is the device's to set; the driver cannot clear it but by reset.
        let mut new = (value & !status::DEVICE_NEEDS_RESET)
            | (self.device_status & status::DEVICE_NEEDS_RESET);
        if new & status::FEATURES_OK != 0 && self.device_status & status::FEATURES_OK == 0 {
            let offered = self.device.features();
            let acceptable = self.driver_features & !offered == 0
                && self.driver_features & feature::VERSION_1 != 0;
            if acceptable {
                self.device.set_driver_features(self.driver_features);
            } else {
                new &= !status::FEATURES_OK;
            }
        }
        self.device_status = new;
    }

    /// Device reset (2.1.1, 4.1.4.3.2): every register back to its initial value.
    pub fn reset(&mut self) {
        self.device_status = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.isr = 0;
        self.window_notifications = 0;
        self.queue_error = None;
        for queue in &mut self.queues {
            queue.reset();
        }
        self.device.reset();
    }

    /// Runs the available chains of `queue` (at most the queue size of them per call; a chain
    /// made available meanwhile comes with its own notification) when the device is live
    /// (DRIVER_OK, no reset needed), bus mastering is on and the queue is enabled. Raises the
    /// queue interrupt when any chain was used, unless the driver suppressed it. Returns the
    /// number of chains used.
    pub fn process(&mut self, queue: u16, memory: &mut dyn GuestMemory) -> usize {
        if !self.queues_may_run() {
            return 0;
        }
        let Self { device, queues, .. } = self;
        let Some(state) = queues.get_mut(usize::from(queue)) else {
            return 0;
        };
        if !state.enabled {
            return 0;
        }
        let mut used = 0;
        let mut fault = state.validate(memory).err();
        if fault.is_none() {
            for _ in 0..state.size {
                if !device.accepts_chains(queue) {
                    break;
                }
                // Ok(true): a used element was given back.
                let result = match state.pop(memory) {
                    Ok(None) => break,
                    Ok(Some(Available::Chain(chain))) => {
                        let len = device.process_chain(queue, &chain, memory);
                        state.push_used(memory, chain.head(), len).map(|()| true)
                    }
                    Ok(Some(Available::Refused { head, error })) => {
                        device.chain_refused(queue, error);
                        if head < state.size {
                            state.push_used(memory, head, 0).map(|()| true)
                        } else {
                            // No valid id to give back: a driver waiting for it would wait
                            // forever, so the device asks for a reset instead.
                            Err(QueueError::HeadOutOfRange { head })
                        }
                    }
                    Err(error) => Err(error),
                };
                match result {
                    Ok(given) => used += usize::from(given),
                    Err(error) => {
                        fault = Some(error);
                        break;
                    }
                }
            }
        }
        let suppressed = used == 0 || state.interrupt_suppressed(memory);
        if !suppressed {
            self.isr |= ISR_QUEUE;
        }
        if let Some(error) = fault {
            self.queue_fault(error);
        }
        used
    }

    /// Takes one available chain of `queue` on the device's own initiative, outside a driver
    /// notification (a received frame for a network receive queue), under the conditions of
    /// [`Self::process`] (live, bus mastering, queue enabled) but whatever
    /// [`VirtioDevice::accepts_chains`] says. `handle` gets the device and the checked chain
    /// and returns the used len (2.7.8) and its own result; the chain then goes back used and
    /// the queue interrupt is raised unless the driver suppressed it (2.7.7).
    pub fn use_chain<R>(
        &mut self,
        queue: u16,
        memory: &mut dyn GuestMemory,
        handle: impl FnOnce(&mut D, &DescriptorChain, &mut dyn GuestMemory) -> (u32, R),
    ) -> Result<R, UseChainError> {
        if !self.queues_may_run() {
            return Err(UseChainError::NotLive);
        }
        let Self {
            device,
            queues,
            isr,
            ..
        } = self;
        let Some(state) = queues
            .get_mut(usize::from(queue))
            .filter(|state| state.enabled)
        else {
            return Err(UseChainError::NotLive);
        };
        // Ok(Ok(value)): used with the device's result; Ok(Err(_)): refused, used with len 0.
        let outcome = match state.validate(memory).and_then(|()| state.pop(memory)) {
            Ok(None) => return Err(UseChainError::NoChain),
            Ok(Some(Available::Chain(chain))) => {
                let (len, value) = handle(device, &chain, memory);
                state
                    .push_used(memory, chain.head(), len)
                    .map(|()| Ok(value))
            }
            Ok(Some(Available::Refused { head, error })) => {
                device.chain_refused(queue, error);
                if head >= state.size {
                    // No valid id to give back: the entry is only skipped, nothing raised.
                    return Err(UseChainError::Refused(error));
                }
                state
                    .push_used(memory, head, 0)
                    .map(|()| Err(UseChainError::Refused(error)))
            }
            Err(error) => Err(error),
        };
        match outcome {
            Ok(result) => {
                if !state.interrupt_suppressed(memory) {
                    *isr |= ISR_QUEUE;
                }
                result
            }
            Err(error) => {
                self.queue_fault(error);
                Err(UseChainError::QueueFault(error))
            }
        }
    }

    /// The device's configuration changed on the hypervisor's side (a network link status):
    /// presents a new config_generation (4.1.4.3.1) and, once the driver is up (DRIVER_OK),
    /// raises a configuration change interrupt (4.1.5.3). Before DRIVER_OK the driver reads
    /// the configuration anyway.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.device_status & status::DRIVER_OK != 0 {
            self.isr |= ISR_CONFIG;
        }
    }

    /// A fault of a whole queue: stop the device until the driver resets it.
    fn queue_fault(&mut self, error: QueueError) {
        // See: spec 2.1.2, set DEVICE_NEEDS_RESET and SHOULD notify a configuration change.
        self.device_status |= status::DEVICE_NEEDS_RESET;
        self.queue_error = Some(error);
        self.isr |= ISR_CONFIG;
    }

    /// The queues notified through the configuration access window since the last call (one
    /// bit per queue index): the hypervisor runs [`Self::process`] for each after a
    /// configuration write.
    pub fn take_window_notifications(&mut self) -> u64 {
        core::mem::take(&mut self.window_notifications)
    }

    /// The BAR access the window capability selects: (offset, size), if valid (4.1.4.9).
    fn window_access(&self) -> Option<(u64, u8)> {
        let bar = self.config.register(WINDOW_BAR) & 0xFF;
        let offset = u64::from(self.config.register(WINDOW_OFFSET));
        let length = self.config.register(WINDOW_LENGTH);
        let size = u8::try_from(length)
            .ok()
            .filter(|l| matches!(l, 1 | 2 | 4))?;
        (bar == BAR_INDEX as u32).then_some((offset, size))
    }
}

impl<D: VirtioDevice + 'static> PciDevice for VirtioPci<D> {
    fn name(&self) -> &'static str {
        self.device.name()
    }

    fn read_config(&mut self, offset: u16) -> u32 {
        match offset & !3 {
            0x04 if self.isr != 0 => self.config.read(0x04) | STATUS_INTERRUPT,
            WINDOW_DATA => match self.window_access() {
                Some((offset, size)) => self.bar_read(BAR_INDEX, offset, size) as u32,
                None => 0,
            },
            _ => self.config.read(offset),
        }
    }

    fn write_config(&mut self, offset: u16, value: u32, byte_mask: u32) {
        if offset & !3 != WINDOW_DATA {
            self.config.write(offset, value, byte_mask);
            return;
        }
        let Some((offset, size)) = self.window_access() else {
            return;
        };
        if let Some(Notify { queue }) = self.bar_write(BAR_INDEX, offset, size, u64::from(value)) {
            if queue < 64 {
                self.window_notifications |= 1 << queue;
            }
        }
    }

    fn as_any_mut(&mut self) -> Option<&mut dyn Any> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blk::Block;
    use crate::memory::FakeMemory;
    use crate::testing::{
        bring_up, common_read, common_write, config_write, ram, DriverQueue, RamDisk, BAR_BASE,
    };
    use alloc::vec;
    use ringzero_devices::PciBus;

    fn device() -> VirtioPci<Block<RamDisk>> {
        VirtioPci::new(Block::new(RamDisk::new(64, true)))
    }

    fn live() -> (VirtioPci<Block<RamDisk>>, FakeMemory, DriverQueue) {
        let mut pci = device();
        let memory = ram(1 << 20);
        let driver = DriverQueue::new(0x10000, 16);
        bring_up(&mut pci, &driver);
        (pci, memory, driver)
    }

    /// Makes one FLUSH request available (header at 0x20000, status at 0x20010).
    fn flush_request(memory: &mut FakeMemory, driver: &mut DriverQueue) {
        let mut header = [0u8; 16];
        header[0] = 4;
        memory.write(0x20000, &header).unwrap();
        driver.add_chain(memory, &[(0x20000, 16, false), (0x20010, 1, true)]);
    }

    #[test]
    fn identity_and_bar_sizing() {
        let mut pci = device();
        assert_eq!(pci.read_config(0x00), 0x1042_1AF4);
        assert_eq!(
            pci.read_config(0x08),
            0x0180_0001,
            "class 01/80, revision 1"
        );
        assert_eq!(pci.read_config(0x2C), 0x1100_1AF4);
        assert_eq!(pci.read_config(0x3C) >> 8 & 0xFF, 1, "INTA#");
        assert_eq!(
            pci.read_config(0x04) >> 16 & 0x10,
            0x10,
            "capabilities list"
        );
        assert_eq!(pci.read_config(0x10), 0, "32-bit memory BAR");
        config_write(&mut pci, 0x10, u32::MAX);
        assert_eq!(pci.read_config(0x10), 0xFFFF_C000, "16 KiB");
        for bar in 1..6 {
            config_write(&mut pci, 0x10 + 4 * bar, u32::MAX);
            assert_eq!(pci.read_config(0x10 + 4 * bar), 0, "BAR {bar} unused");
        }
        config_write(&mut pci, 0x10, BAR_BASE as u32);
        assert_eq!(pci.bar_containing(BAR_BASE), None, "memory decoding off");
        config_write(&mut pci, 0x04, u32::from(COMMAND_MEMORY_SPACE));
        assert_eq!(pci.bar_containing(BAR_BASE), Some((0, 0)));
        assert_eq!(pci.bar_containing(BAR_BASE + 0x3FFF), Some((0, 0x3FFF)));
        assert_eq!(pci.bar_containing(BAR_BASE + 0x4000), None);
        assert_eq!(pci.bar_containing(BAR_BASE - 1), None);
        // Plugged into the bus, reachable again as itself.
        let mut bus = PciBus::new();
        bus.add(3, 0, alloc::boxed::Box::new(pci)).unwrap();
        assert!(bus.device_mut::<VirtioPci<Block<RamDisk>>>(3, 0).is_some());
    }

    #[test]
    fn capability_list_walk() {
        let mut pci = device();
        let mut found = vec![];
        let mut at = (pci.read_config(0x34) & 0xFF) as u16;
        let mut hops = 0;
        while at != 0 {
            hops += 1;
            assert!(hops <= 48, "the list ends");
            let header = pci.read_config(at);
            assert_eq!(header & 0xFF, 0x09, "vendor-specific");
            let cap_len = header >> 16 & 0xFF;
            let cfg_type = header >> 24;
            let bar = pci.read_config(at + 4) & 0xFF;
            let offset = pci.read_config(at + 8);
            let length = pci.read_config(at + 12);
            found.push((cfg_type, cap_len, bar, offset, length));
            if cfg_type == 2 {
                assert_eq!(pci.read_config(at + 16), 4, "notify_off_multiplier");
            }
            at = (header >> 8 & 0xFC) as u16;
        }
        assert_eq!(
            found,
            [
                (1, 16, 0, 0x0000, 0x38),
                (2, 20, 0, 0x3000, 4),
                (3, 16, 0, 0x1000, 1),
                (4, 16, 0, 0x2000, 0x1000),
                (5, 20, 0, 0, 0),
            ]
        );
        // Every structure fits the BAR.
        for (_, _, _, offset, length) in &found {
            assert!(u64::from(offset + length) <= BAR_SIZE);
        }
    }

    #[test]
    fn feature_negotiation() {
        let mut pci = device();
        common_write(&mut pci, 0x00, 4, 1);
        assert_eq!(
            common_read(&mut pci, 0x04, 4),
            1,
            "VERSION_1 in the high word"
        );
        common_write(&mut pci, 0x00, 4, 0);
        let low = common_read(&mut pci, 0x04, 4);
        assert_eq!(
            low,
            (1 << 1) | (1 << 2) | (1 << 9),
            "SIZE_MAX, SEG_MAX, FLUSH"
        );
        common_write(&mut pci, 0x00, 4, 2);
        assert_eq!(common_read(&mut pci, 0x04, 4), 0);
        let negotiate = |pci: &mut VirtioPci<Block<RamDisk>>, features: u64| {
            common_write(pci, 0x14, 1, 0);
            common_write(pci, 0x14, 1, 3);
            common_write(pci, 0x08, 4, 0);
            common_write(pci, 0x0C, 4, features & 0xFFFF_FFFF);
            common_write(pci, 0x08, 4, 1);
            common_write(pci, 0x0C, 4, features >> 32);
            common_write(pci, 0x14, 1, 3 | 8);
            common_read(pci, 0x14, 1) & 8 != 0
        };
        assert!(!negotiate(&mut pci, 1 << 9), "VERSION_1 not accepted");
        assert!(!negotiate(
            &mut pci,
            feature::VERSION_1 | feature::INDIRECT_DESC
        ));
        assert!(!negotiate(
            &mut pci,
            feature::VERSION_1 | feature::EVENT_IDX
        ));
        assert!(negotiate(&mut pci, feature::VERSION_1 | 1 << 9));
        assert_eq!(pci.device().driver_features(), feature::VERSION_1 | 1 << 9);
        // Fixed after FEATURES_OK.
        common_write(&mut pci, 0x08, 4, 0);
        common_write(&mut pci, 0x0C, 4, 0);
        assert_eq!(pci.driver_features(), feature::VERSION_1 | 1 << 9);
        assert_eq!(common_read(&mut pci, 0x0C, 4), 1 << 9);
    }

    #[test]
    fn common_configuration_registers() {
        let (mut pci, _, driver) = live();
        assert_eq!(common_read(&mut pci, 0x12, 2), 1, "num_queues");
        assert_eq!(common_read(&mut pci, 0x10, 2), 0xFFFF, "msix_config");
        common_write(&mut pci, 0x10, 2, 0);
        assert_eq!(common_read(&mut pci, 0x10, 2), 0xFFFF, "no MSI-X");
        assert_eq!(common_read(&mut pci, 0x15, 1), 0, "config_generation");
        assert_eq!(common_read(&mut pci, 0x18, 2), 16);
        assert_eq!(common_read(&mut pci, 0x1C, 2), 1);
        assert_eq!(common_read(&mut pci, 0x1E, 2), 0);
        assert_eq!(common_read(&mut pci, 0x20, 8), driver.desc, "64-bit read");
        assert_eq!(common_read(&mut pci, 0x28, 4), driver.avail);
        assert_eq!(common_read(&mut pci, 0x30, 4), driver.used);
        // Enabled queue: configuration writes ignored.
        common_write(&mut pci, 0x18, 2, 8);
        common_write(&mut pci, 0x20, 8, 0x5000);
        assert_eq!(common_read(&mut pci, 0x18, 2), 16);
        assert_eq!(common_read(&mut pci, 0x20, 4), driver.desc);
        // A queue that does not exist.
        common_write(&mut pci, 0x16, 2, 1);
        assert_eq!(common_read(&mut pci, 0x18, 2), 0, "queue_size 0");
        common_write(&mut pci, 0x18, 2, 8);
        common_write(&mut pci, 0x1C, 2, 1);
        assert_eq!(common_read(&mut pci, 0x1C, 2), 0);
        assert_eq!(
            pci.bar_write(0, NOTIFY_OFFSET + 4, 2, 1),
            None,
            "no queue 1"
        );
        assert_eq!(
            pci.bar_write(0, NOTIFY_OFFSET, 2, 0),
            Some(Notify { queue: 0 })
        );
        assert_eq!(
            pci.bar_write(0, NOTIFY_OFFSET + 2, 2, 0),
            Some(Notify { queue: 0 })
        );
        assert_eq!(pci.bar_write(1, NOTIFY_OFFSET, 2, 0), None, "other BAR");
        // A 64-bit write sets both halves of a 64-bit field, a byte write one byte.
        let (mut pci, _, _) = live();
        common_write(&mut pci, 0x14, 1, 0);
        common_write(&mut pci, 0x20, 8, 0x1234_5678_9ABC_DEF0);
        assert_eq!(common_read(&mut pci, 0x24, 4), 0x1234_5678);
        common_write(&mut pci, 0x21, 1, 0x11);
        assert_eq!(common_read(&mut pci, 0x20, 4), 0x9ABC_11F0);
    }

    #[test]
    fn reset_clears_queues_and_interrupts() {
        let (mut pci, mut memory, mut driver) = live();
        flush_request(&mut memory, &mut driver);
        assert_eq!(pci.process(0, &mut memory), 1);
        assert!(pci.interrupt_line());
        common_write(&mut pci, 0x14, 1, 0);
        assert_eq!(common_read(&mut pci, 0x14, 1), 0);
        assert!(!pci.interrupt_line());
        let queue = pci.queue(0).unwrap();
        assert_eq!(queue, &Queue::new(256));
        assert_eq!(common_read(&mut pci, 0x18, 2), 256, "max size again");
        assert_eq!(common_read(&mut pci, 0x1C, 2), 0);
        assert_eq!(common_read(&mut pci, 0x20, 8), 0);
        assert_eq!(pci.driver_features(), 0);
        assert_eq!(pci.device().driver_features(), 0);
        // Statistics survive a reset.
        assert_eq!(pci.device().stats().flushes, 1);
        // And the device comes back.
        let mut driver = DriverQueue::new(0x10000, 16);
        memory = ram(1 << 20);
        bring_up(&mut pci, &driver);
        flush_request(&mut memory, &mut driver);
        assert_eq!(pci.process(0, &mut memory), 1);
    }

    #[test]
    fn isr_read_clears_and_drives_the_line() {
        let (mut pci, mut memory, mut driver) = live();
        assert!(!pci.interrupt_line());
        flush_request(&mut memory, &mut driver);
        assert_eq!(
            pci.bar_write(0, NOTIFY_OFFSET, 2, 0),
            Some(Notify { queue: 0 })
        );
        assert_eq!(pci.process(0, &mut memory), 1);
        assert!(pci.interrupt_line());
        assert_eq!(pci.read_config(0x04) & STATUS_INTERRUPT, STATUS_INTERRUPT);
        // Interrupt disable masks the line, not the ISR.
        config_write(
            &mut pci,
            0x04,
            0x0406 | u32::from(COMMAND_INTERRUPT_DISABLE),
        );
        assert!(!pci.interrupt_line());
        config_write(&mut pci, 0x04, 0x0006);
        assert!(pci.interrupt_line());
        assert_eq!(pci.bar_read(0, ISR_OFFSET, 1), u64::from(ISR_QUEUE));
        assert!(!pci.interrupt_line());
        assert_eq!(pci.bar_read(0, ISR_OFFSET, 1), 0);
        assert_eq!(pci.read_config(0x04) & STATUS_INTERRUPT, 0);
        // The driver asks for no interrupt: the chain is used but the line stays low.
        driver.set_avail_flags(&mut memory, 1);
        flush_request(&mut memory, &mut driver);
        assert_eq!(pci.process(0, &mut memory), 1);
        assert!(!pci.interrupt_line());
        // Nothing available: nothing raised.
        driver.set_avail_flags(&mut memory, 0);
        assert_eq!(pci.process(0, &mut memory), 0);
        assert!(!pci.interrupt_line());
        // A head index out of range: nothing used, the device asks for a reset (a config
        // change interrupt) instead of leaving the driver waiting.
        driver.publish(&mut memory, 99);
        assert_eq!(pci.process(0, &mut memory), 0);
        assert_eq!(pci.isr(), ISR_CONFIG);
        assert!(pci.interrupt_line());
        assert_eq!(
            pci.queue_error(),
            Some(QueueError::HeadOutOfRange { head: 99 })
        );
        assert_ne!(pci.device_status() & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(pci.device().stats().errors.refused_chains, 1);
        assert!(
            driver.take_used(&mut memory).len() == 2,
            "only the two flushes"
        );
    }

    #[test]
    fn device_initiated_use_of_a_chain() {
        let mut pci = device();
        let mut memory = ram(1 << 20);
        let mut driver = DriverQueue::new(0x10000, 16);
        let write_len = |len| {
            move |_: &mut Block<RamDisk>, chain: &DescriptorChain, _: &mut dyn GuestMemory| {
                (len, chain.writable_len())
            }
        };
        assert_eq!(
            pci.use_chain(0, &mut memory, write_len(1)),
            Err(UseChainError::NotLive)
        );
        bring_up(&mut pci, &driver);
        assert_eq!(
            pci.use_chain(1, &mut memory, write_len(1)),
            Err(UseChainError::NotLive),
            "no such queue"
        );
        assert_eq!(
            pci.use_chain(0, &mut memory, write_len(1)),
            Err(UseChainError::NoChain)
        );
        assert!(!pci.interrupt_line());
        let head = driver.add_chain(&mut memory, &[(0x20000, 100, true)]);
        assert_eq!(pci.use_chain(0, &mut memory, write_len(7)), Ok(100));
        assert_eq!(driver.take_used(&mut memory), [(u32::from(head), 7)]);
        assert!(pci.interrupt_line());
        assert_eq!(pci.bar_read(0, ISR_OFFSET, 1), u64::from(ISR_QUEUE));
        // NO_INTERRUPT honoured.
        driver.set_avail_flags(&mut memory, 1);
        driver.add_chain(&mut memory, &[(0x20000, 100, true)]);
        assert_eq!(pci.use_chain(0, &mut memory, write_len(7)), Ok(100));
        assert!(!pci.interrupt_line());
        driver.set_avail_flags(&mut memory, 0);
        // A refused chain goes back with len 0 and the device hears of it.
        let head = driver.add_chain(&mut memory, &[(0xFFFF_0000, 100, true)]);
        assert_eq!(
            pci.use_chain(0, &mut memory, write_len(7)),
            Err(UseChainError::Refused(ChainError::BufferOutOfRam {
                index: head
            }))
        );
        assert_eq!(
            driver.take_used(&mut memory).last(),
            Some(&(u32::from(head), 0))
        );
        assert_eq!(pci.device().stats().errors.refused_chains, 1);
        // A queue fault needs a reset.
        driver.set_avail_idx(&mut memory, 40);
        assert!(matches!(
            pci.use_chain(0, &mut memory, write_len(7)),
            Err(UseChainError::QueueFault(QueueError::AvailIndexJump { .. }))
        ));
        assert_ne!(pci.device_status() & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(
            pci.use_chain(0, &mut memory, write_len(7)),
            Err(UseChainError::NotLive)
        );
    }

    #[test]
    fn configuration_change_from_the_hypervisor() {
        let mut pci = device();
        pci.config_changed();
        assert_eq!(common_read(&mut pci, 0x15, 1), 1, "config_generation");
        assert!(!pci.interrupt_line(), "no interrupt before DRIVER_OK");
        let (mut pci, _, _) = live();
        pci.config_changed();
        assert_eq!(pci.bar_read(0, ISR_OFFSET, 1), u64::from(ISR_CONFIG));
        assert!(!pci.interrupt_line());
    }

    #[test]
    fn no_processing_until_live() {
        let mut pci = device();
        let mut memory = ram(1 << 20);
        let mut driver = DriverQueue::new(0x10000, 16);
        bring_up(&mut pci, &driver);
        flush_request(&mut memory, &mut driver);
        // Without bus mastering: the chain waits.
        config_write(&mut pci, 0x04, u32::from(COMMAND_MEMORY_SPACE));
        assert_eq!(pci.process(0, &mut memory), 0);
        config_write(
            &mut pci,
            0x04,
            u32::from(COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER),
        );
        assert_eq!(pci.process(7, &mut memory), 0, "no such queue");
        assert_eq!(pci.process(0, &mut memory), 1, "the chain waited");
        // Before DRIVER_OK: queue set up and enabled, a chain available, nothing runs.
        let mut pci = device();
        bring_up(&mut pci, &driver);
        common_write(&mut pci, 0x14, 1, 0);
        config_write(&mut pci, 0x04, 0x06);
        common_write(&mut pci, 0x14, 1, 0x0B);
        common_write(&mut pci, 0x18, 2, 16);
        common_write(&mut pci, 0x20, 8, driver.desc);
        common_write(&mut pci, 0x28, 8, driver.avail);
        common_write(&mut pci, 0x30, 8, driver.used);
        common_write(&mut pci, 0x1C, 2, 1);
        assert_eq!(pci.process(0, &mut memory), 0);
        common_write(&mut pci, 0x14, 1, 0x0F);
        assert_eq!(pci.process(0, &mut memory), 1, "runs once DRIVER_OK is set");
    }

    #[test]
    fn queue_fault_needs_reset() {
        let (mut pci, mut memory, driver) = live();
        driver.set_avail_idx(&mut memory, 17);
        assert_eq!(pci.process(0, &mut memory), 0);
        assert_eq!(
            pci.queue_error(),
            Some(QueueError::AvailIndexJump {
                avail_idx: 17,
                next_avail: 0
            })
        );
        assert_ne!(
            common_read(&mut pci, 0x14, 1) as u8 & status::DEVICE_NEEDS_RESET,
            0
        );
        assert_eq!(pci.bar_read(0, ISR_OFFSET, 1), u64::from(ISR_CONFIG));
        // The driver cannot clear the bit by writing the status.
        common_write(&mut pci, 0x14, 1, 0x0F);
        assert_ne!(pci.device_status() & status::DEVICE_NEEDS_RESET, 0);
        driver.set_avail_idx(&mut memory, 1);
        assert_eq!(pci.process(0, &mut memory), 0, "stopped until reset");
        common_write(&mut pci, 0x14, 1, 0);
        assert_eq!(pci.queue_error(), None);
        // Rings outside RAM are a queue fault too.
        let mut pci = device();
        bring_up(&mut pci, &DriverQueue::new(0xFFF0_0000, 16));
        assert_eq!(pci.process(0, &mut memory), 0);
        assert_eq!(pci.queue_error(), Some(QueueError::RingOutOfRam));
    }

    #[test]
    fn configuration_window() {
        let (mut pci, mut memory, mut driver) = live();
        let window = u16::from(CAP_PCI_WINDOW);
        // Read num_queues through the window.
        config_write(&mut pci, window + 4, 0);
        config_write(&mut pci, window + 8, 0x12);
        config_write(&mut pci, window + 12, 2);
        assert_eq!(pci.read_config(window + 16), 1);
        // Read the device configuration (capacity low dword).
        config_write(&mut pci, window + 8, DEVICE_CONFIG_OFFSET as u32);
        config_write(&mut pci, window + 12, 4);
        assert_eq!(pci.read_config(window + 16), 64);
        // Notify through the window.
        flush_request(&mut memory, &mut driver);
        config_write(&mut pci, window + 8, NOTIFY_OFFSET as u32);
        config_write(&mut pci, window + 12, 2);
        config_write(&mut pci, window + 16, 0);
        assert_eq!(pci.take_window_notifications(), 1);
        assert_eq!(pci.take_window_notifications(), 0);
        // A bad length or BAR: nothing.
        config_write(&mut pci, window + 12, 3);
        assert_eq!(pci.read_config(window + 16), 0);
        config_write(&mut pci, window + 4, 2);
        config_write(&mut pci, window + 12, 4);
        assert_eq!(pci.read_config(window + 16), 0);
        // The cap header itself stays read-only.
        config_write(&mut pci, window, 0);
        assert_eq!(pci.read_config(window) & 0xFF, 0x09);
    }

    #[test]
    fn every_bar_access_is_safe() {
        let (mut pci, mut memory, _) = live();
        for offset in (0..BAR_SIZE + 16).chain([u64::MAX - 3, u64::MAX]) {
            for size in [0, 1, 2, 3, 4, 8, 16, 255] {
                pci.bar_read(0, offset, size);
                pci.bar_read(5, offset, size);
                if let Some(Notify { queue }) = pci.bar_write(0, offset, size, u64::MAX) {
                    pci.process(queue, &mut memory);
                }
            }
        }
        for offset in (0..0x100).step_by(4) {
            pci.read_config(offset);
            pci.write_config(offset, u32::MAX, u32::MAX);
        }
    }
}
