//! The virtio-net device model (spec 5.1): a VM's network card, whose other end is the
//! hypervisor (the vswitch port of the VM).
//!
//! One receive queue (0) and one transmit queue (1); no control queue, no multiqueue. Features
//! offered: VERSION_1, MAC (the hypervisor picks the address: [`mac_from_name`] derives a
//! stable one from the VM's name), STATUS (the link state, which the hypervisor changes with a
//! configuration change interrupt) and MTU (1500 by default). Not offered: checksum offload
//! (CSUM, GUEST_CSUM), TSO/UFO/USO in either direction, MRG_RXBUF, CTRL_VQ, MQ. So every
//! packet is one whole Ethernet frame (destination MAC first, no FCS) after the 12-byte
//! `virtio_net_hdr` (5.1.6: with VERSION_1 the header always has num_buffers), and every
//! received frame fits one receive chain.
//!
//! Frame sizes: at least 14 bytes (an Ethernet header) and at most the MTU + 14 + 4 (a VLAN
//! tag): 1518 bytes with the default MTU, Linux's GOOD_PACKET_LEN, whose receive buffers
//! (12 + 1518 bytes) it therefore fills exactly.
//!
//! Transmit (5.1.6.2): a notify of the transmit queue runs [`VirtioPci::process`]; each chain's
//! device-readable part is the header (ignored: no offload was negotiated, so flags and
//! gso_type carry nothing the device would act on) and the frame, split over descriptors in
//! any way (2.6.4). Its device-writable part, if any, is ignored; the used len is 0. The frame
//! goes to a bounded outbox that the hypervisor drains with [`Net::take_transmitted`].
//! Back-pressure, not drops: while the outbox is full the device takes no transmit chain
//! ([`VirtioDevice::accepts_chains`]), the guest's ring fills and its driver stops its queue,
//! as with a physical NIC. After draining a full outbox ([`Net::outbox_full`] before draining)
//! the hypervisor runs `process(TX_QUEUE)` again: the guest will not notify the chains it
//! already made available. A chain without a whole header, a frame shorter than 14 bytes or
//! longer than the maximum, and any frame while the link is down are dropped and counted (the
//! chain still goes back used).
//!
//! Receive (5.1.6.3, 5.1.6.4): [`VirtioPci::deliver`] takes one available receive chain (the
//! guest posts them ahead; a notify of the receive queue does nothing), writes the header
//! (all zero but num_buffers = 1) and the frame into its device-writable part, gives it back
//! with used len 12 + frame length and raises the queue interrupt unless the driver suppressed
//! it. No backlog is kept: when the guest has posted no buffer, the frame is dropped and
//! counted, like a physical NIC whose ring is empty (the hypervisor may keep its own, bounded,
//! and retry after the guest notifies the receive queue). A buffer too small for the frame is
//! given back used with len 0 (Linux counts it as a length error and reposts it) and the frame
//! dropped: keeping the buffer would stall every later frame behind it.

use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;

use crate::device::{feature, VirtioDevice};
use crate::memory::GuestMemory;
use crate::pci::{UseChainError, VirtioPci};
use crate::queue::{ChainError, DescriptorChain, QueueError, MAX_QUEUE_SIZE};
use crate::stream::{read_stream, write_stream};

/// The virtio device ID of a network card. See: spec 5.
pub const DEVICE_TYPE: u16 = 1;
/// receiveq1 and transmitq1 (5.1.2).
pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;

/// Network feature bits. See: spec 5.1.3.
pub mod features {
    /// The device handles packets with partial checksum (checksum offload): not offered.
    pub const CSUM: u64 = 1 << 0;
    /// The driver handles packets with partial checksum: not offered.
    pub const GUEST_CSUM: u64 = 1 << 1;
    /// The configuration's mtu is the maximum MTU the driver should use.
    pub const MTU: u64 = 1 << 3;
    /// The configuration's mac is the device's address.
    pub const MAC: u64 = 1 << 5;
    /// Merged receive buffers: not offered.
    pub const MRG_RXBUF: u64 = 1 << 15;
    /// The configuration's status is the link state.
    pub const STATUS: u64 = 1 << 16;
    /// A control virtqueue: not offered.
    pub const CTRL_VQ: u64 = 1 << 17;
    /// Multiqueue: not offered.
    pub const MQ: u64 = 1 << 22;
}

/// VIRTIO_NET_S_LINK_UP in the configuration's status (5.1.4).
pub const STATUS_LINK_UP: u16 = 1;

/// Bytes of `virtio_net_hdr` with VERSION_1: flags, gso_type, le16 hdr_len, le16 gso_size,
/// le16 csum_start, le16 csum_offset, le16 num_buffers (5.1.6).
pub const HEADER_SIZE: usize = 12;
/// Offset of num_buffers in the header.
const HEADER_NUM_BUFFERS: usize = 10;
/// An Ethernet header (destination, source, EtherType): the shortest frame accepted.
pub const MIN_FRAME: usize = 14;
/// An 802.1Q tag, allowed on top of MTU + Ethernet header.
pub const VLAN_TAG: usize = 4;
/// The MTU by default, and the bounds of a configured one (5.1.4.1: at least 68).
pub const DEFAULT_MTU: u16 = 1500;
pub const MIN_MTU: u16 = 68;
pub const MAX_MTU: u16 = 9000;
/// Transmitted frames the outbox holds by default, and at most.
pub const DEFAULT_OUTBOX_FRAMES: usize = 64;
pub const MAX_OUTBOX_FRAMES: usize = 1024;

/// Device configuration layout (5.1.4): mac[6] at 0, le16 status at 6, le16
/// max_virtqueue_pairs at 8 (1: no MQ), le16 mtu at 10. Speed, duplex and the RSS fields
/// belong to features not offered and read 0.
const CONFIG_SIZE: usize = 12;
const CONFIG_MAC: usize = 0;
const CONFIG_STATUS: usize = 6;
const CONFIG_MAX_PAIRS: usize = 8;
const CONFIG_MTU: usize = 10;

/// A locally administered unicast MAC address derived from a VM's name, stable across boots
/// and builds: 02 followed by the first five bytes (little-endian) of the 64-bit FNV-1a hash
/// of the name's bytes. Two names may collide (1 in 2^40): the configuration checker should
/// refuse duplicates.
pub fn mac_from_name(name: &str) -> [u8; 6] {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = name.bytes().fold(FNV_OFFSET, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME)
    });
    let [h0, h1, h2, h3, h4, ..] = hash.to_le_bytes();
    [0x02, h0, h1, h2, h3, h4]
}

/// What the hypervisor chooses for a network card.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The card's address: unicast and not zero.
    pub mac: [u8; 6],
    /// The MTU offered (VIRTIO_NET_F_MTU), [`MIN_MTU`]..=[`MAX_MTU`]; frames longer than
    /// MTU + 18 are dropped both ways.
    pub mtu: u16,
    /// Transmitted frames kept until the hypervisor takes them, 1..=[`MAX_OUTBOX_FRAMES`].
    pub outbox_frames: usize,
    /// The link state at creation.
    pub link_up: bool,
}

impl NetConfig {
    /// `mac` with the defaults: MTU 1500, 64 outbox frames, link up.
    pub fn new(mac: [u8; 6]) -> Self {
        Self {
            mac,
            mtu: DEFAULT_MTU,
            outbox_frames: DEFAULT_OUTBOX_FRAMES,
            link_up: true,
        }
    }
}

/// Why a [`NetConfig`] was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetConfigError {
    /// A group (multicast) address, or all zero.
    MacNotUnicast { mac: [u8; 6] },
    /// Outside [`MIN_MTU`]..=[`MAX_MTU`].
    Mtu { mtu: u16 },
    /// Outside 1..=[`MAX_OUTBOX_FRAMES`].
    OutboxFrames { frames: usize },
}

/// Why [`VirtioPci::deliver`] dropped a frame. Each is counted in [`NetDrops`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxDropped {
    /// The frame is shorter than 14 bytes or longer than the maximum (the hypervisor's bug).
    BadFrame { len: usize },
    /// The link is down.
    LinkDown,
    /// The driver is not up (no DRIVER_OK, bus mastering off, receive queue not enabled, or
    /// the device needs a reset).
    NotReady,
    /// The guest has posted no receive buffer.
    NoBuffer,
    /// The next receive buffer is smaller than header + frame: given back with len 0.
    BufferTooSmall { available: u64, needed: u64 },
    /// The next receive chain is malformed: given back with len 0.
    Refused(ChainError),
    /// The receive queue itself is broken: the device now needs a reset.
    QueueFault(QueueError),
    /// A copy to the guest failed after the chain was checked: given back with len 0.
    GuestMemory,
}

/// Counters for the hypervisor's statistics lines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames the guest sent (into the outbox) and their bytes (headers excluded).
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames delivered to the guest and their bytes (headers excluded).
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub drops: NetDrops,
}

/// Dropped frames by cause; each dropped frame counts once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetDrops {
    /// Transmit: frame shorter than 14 bytes.
    pub tx_runt: u64,
    /// Transmit: frame longer than MTU + 18.
    pub tx_oversize: u64,
    /// Transmit: readable part shorter than the 12-byte header.
    pub tx_malformed: u64,
    /// Transmit: the link was down.
    pub tx_link_down: u64,
    /// Transmit chains the virtqueue walker refused.
    pub tx_refused: u64,
    /// Transmit: the outbox was full (only when a caller bypasses
    /// [`VirtioDevice::accepts_chains`]; the transport never does).
    pub tx_outbox_full: u64,
    /// Transmitted frames still in the outbox when the driver reset the device.
    pub tx_reset: u64,
    /// Receive: the frame given was too short or too long.
    pub rx_bad_frame: u64,
    /// Receive: the link was down.
    pub rx_link_down: u64,
    /// Receive: the driver was not up or the queue needed a reset.
    pub rx_not_ready: u64,
    /// Receive: no buffer posted.
    pub rx_no_buffer: u64,
    /// Receive: the buffer was too small.
    pub rx_too_small: u64,
    /// Receive chains the virtqueue walker refused.
    pub rx_refused: u64,
    /// A guest-memory copy failed after its chain was checked (either way).
    pub guest_memory: u64,
}

impl NetDrops {
    /// All dropped frames.
    pub fn total(&self) -> u64 {
        self.tx_runt
            + self.tx_oversize
            + self.tx_malformed
            + self.tx_link_down
            + self.tx_refused
            + self.tx_outbox_full
            + self.tx_reset
            + self.rx_bad_frame
            + self.rx_link_down
            + self.rx_not_ready
            + self.rx_no_buffer
            + self.rx_too_small
            + self.rx_refused
            + self.guest_memory
    }
}

/// One statistics line: `tx_frames=N tx_bytes=N rx_frames=N rx_bytes=N drops=N (tx_runt=N
/// tx_oversize=N tx_malformed=N tx_link_down=N tx_refused=N tx_outbox_full=N tx_reset=N
/// rx_bad_frame=N rx_link_down=N rx_not_ready=N rx_no_buffer=N rx_too_small=N rx_refused=N
/// memory=N)`.
impl core::fmt::Display for NetStats {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let d = &self.drops;
        write!(
            f,
            "tx_frames={} tx_bytes={} rx_frames={} rx_bytes={} drops={} (tx_runt={} \
             tx_oversize={} tx_malformed={} tx_link_down={} tx_refused={} tx_outbox_full={} \
             tx_reset={} rx_bad_frame={} rx_link_down={} rx_not_ready={} rx_no_buffer={} \
             rx_too_small={} rx_refused={} memory={})",
            self.tx_frames,
            self.tx_bytes,
            self.rx_frames,
            self.rx_bytes,
            d.total(),
            d.tx_runt,
            d.tx_oversize,
            d.tx_malformed,
            d.tx_link_down,
            d.tx_refused,
            d.tx_outbox_full,
            d.tx_reset,
            d.rx_bad_frame,
            d.rx_link_down,
            d.rx_not_ready,
            d.rx_no_buffer,
            d.rx_too_small,
            d.rx_refused,
            d.guest_memory
        )
    }
}

/// A virtio-net device. See the module documentation.
pub struct Net {
    mac: [u8; 6],
    mtu: u16,
    link_up: bool,
    outbox: VecDeque<Vec<u8>>,
    outbox_frames: usize,
    driver_features: u64,
    stats: NetStats,
}

impl Net {
    /// A network card as `config` says, or why not.
    pub fn new(config: NetConfig) -> Result<Self, NetConfigError> {
        let NetConfig {
            mac,
            mtu,
            outbox_frames,
            link_up,
        } = config;
        if mac[0] & 1 != 0 || mac == [0; 6] {
            return Err(NetConfigError::MacNotUnicast { mac });
        }
        if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
            return Err(NetConfigError::Mtu { mtu });
        }
        if !(1..=MAX_OUTBOX_FRAMES).contains(&outbox_frames) {
            return Err(NetConfigError::OutboxFrames {
                frames: outbox_frames,
            });
        }
        Ok(Self {
            mac,
            mtu,
            link_up,
            outbox: VecDeque::with_capacity(outbox_frames),
            outbox_frames,
            driver_features: 0,
            stats: NetStats::default(),
        })
    }

    /// The card's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The MTU offered.
    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// The longest frame accepted either way: MTU + Ethernet header + VLAN tag.
    pub fn max_frame(&self) -> usize {
        usize::from(self.mtu) + MIN_FRAME + VLAN_TAG
    }

    /// The link state ([`VirtioPci::set_link_up`] changes it).
    pub fn link_up(&self) -> bool {
        self.link_up
    }

    /// The counters so far.
    pub fn stats(&self) -> &NetStats {
        &self.stats
    }

    /// The features the driver accepted at the last FEATURES_OK.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// The oldest frame the guest transmitted that the hypervisor has not taken yet.
    pub fn take_transmitted(&mut self) -> Option<Vec<u8>> {
        self.outbox.pop_front()
    }

    /// Frames waiting in the outbox.
    pub fn transmitted_len(&self) -> usize {
        self.outbox.len()
    }

    /// Whether the outbox is full: the transmit queue is stalled, and the hypervisor runs
    /// `process(TX_QUEUE)` after taking frames out.
    pub fn outbox_full(&self) -> bool {
        self.outbox.len() >= self.outbox_frames
    }

    /// One transmit chain: the frame after the header goes to the outbox. Returns the used
    /// len (always 0: nothing is written).
    fn transmit(&mut self, chain: &DescriptorChain, memory: &mut dyn GuestMemory) -> u32 {
        let max_frame = self.max_frame() as u64;
        let drops = &mut self.stats.drops;
        if !self.link_up {
            drops.tx_link_down += 1;
            return 0;
        }
        let Some(frame_len) = chain.readable_len().checked_sub(HEADER_SIZE as u64) else {
            drops.tx_malformed += 1;
            return 0;
        };
        if frame_len < MIN_FRAME as u64 {
            drops.tx_runt += 1;
            return 0;
        }
        if frame_len > max_frame {
            drops.tx_oversize += 1;
            return 0;
        }
        if self.outbox.len() >= self.outbox_frames {
            drops.tx_outbox_full += 1;
            return 0;
        }
        // Bounded by max_frame above.
        let mut frame = vec![0; frame_len as usize];
        if read_stream(memory, chain.readable(), HEADER_SIZE as u64, &mut frame).is_err() {
            drops.guest_memory += 1;
            return 0;
        }
        self.stats.tx_frames += 1;
        self.stats.tx_bytes += frame_len;
        self.outbox.push_back(frame);
        0
    }

    /// Writes header + `frame` into the writable part of a receive chain. Returns the used len
    /// and the outcome.
    fn receive(
        &mut self,
        chain: &DescriptorChain,
        memory: &mut dyn GuestMemory,
        frame: &[u8],
    ) -> (u32, Result<(), RxDropped>) {
        let needed = (HEADER_SIZE + frame.len()) as u64;
        let available = chain.writable_len();
        if available < needed {
            return (0, Err(RxDropped::BufferTooSmall { available, needed }));
        }
        // See: spec 5.1.6.4.1, flags 0 and gso_type NONE without GUEST_CSUM / GUEST_TSO*, and
        // num_buffers 1 without MRG_RXBUF.
        let mut header = [0u8; HEADER_SIZE];
        header[HEADER_NUM_BUFFERS..].copy_from_slice(&1u16.to_le_bytes());
        let copied = write_stream(memory, chain.writable(), 0, &header)
            .and_then(|()| write_stream(memory, chain.writable(), HEADER_SIZE as u64, frame));
        match copied {
            // needed <= max_frame + 12, far below u32::MAX.
            Ok(()) => (needed as u32, Ok(())),
            Err(_) => (0, Err(RxDropped::GuestMemory)),
        }
    }

    /// Counts the outcome of one delivery (a refused chain was counted by `chain_refused`).
    fn count_delivery(&mut self, len: usize, outcome: &Result<(), RxDropped>) {
        let drops = &mut self.stats.drops;
        match outcome {
            Ok(()) => {
                self.stats.rx_frames += 1;
                self.stats.rx_bytes += len as u64;
            }
            Err(RxDropped::BadFrame { .. }) => drops.rx_bad_frame += 1,
            Err(RxDropped::LinkDown) => drops.rx_link_down += 1,
            Err(RxDropped::NotReady | RxDropped::QueueFault(_)) => drops.rx_not_ready += 1,
            Err(RxDropped::NoBuffer) => drops.rx_no_buffer += 1,
            Err(RxDropped::BufferTooSmall { .. }) => drops.rx_too_small += 1,
            Err(RxDropped::Refused(_)) => {}
            Err(RxDropped::GuestMemory) => drops.guest_memory += 1,
        }
    }

    fn config_bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut config = [0; CONFIG_SIZE];
        config[CONFIG_MAC..CONFIG_MAC + 6].copy_from_slice(&self.mac);
        let status = if self.link_up { STATUS_LINK_UP } else { 0 };
        config[CONFIG_STATUS..CONFIG_STATUS + 2].copy_from_slice(&status.to_le_bytes());
        config[CONFIG_MAX_PAIRS..CONFIG_MAX_PAIRS + 2].copy_from_slice(&1u16.to_le_bytes());
        config[CONFIG_MTU..CONFIG_MTU + 2].copy_from_slice(&self.mtu.to_le_bytes());
        config
    }
}

impl VirtioDevice for Net {
    fn name(&self) -> &'static str {
        "virtio-net"
    }

    fn device_type(&self) -> u16 {
        DEVICE_TYPE
    }

    fn pci_class(&self) -> (u8, u8) {
        // Network controller, Ethernet.
        (0x02, 0x00)
    }

    fn features(&self) -> u64 {
        feature::VERSION_1 | features::MAC | features::STATUS | features::MTU
    }

    fn set_driver_features(&mut self, features: u64) {
        self.driver_features = features;
    }

    fn queue_count(&self) -> u16 {
        2
    }

    fn queue_max_size(&self, _queue: u16) -> u16 {
        MAX_QUEUE_SIZE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .and_then(|at| usize::try_from(at).ok())
                .and_then(|at| config.get(at).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Every field is read-only: only the legacy interface (not offered: the transport is
        // non-transitional) lets a driver write mac. See: spec 5.1.4.
    }

    fn accepts_chains(&self, queue: u16) -> bool {
        match queue {
            // Receive buffers wait for a frame (VirtioPci::deliver).
            RX_QUEUE => false,
            TX_QUEUE => !self.outbox_full(),
            _ => true,
        }
    }

    fn process_chain(
        &mut self,
        queue: u16,
        chain: &DescriptorChain,
        memory: &mut dyn GuestMemory,
    ) -> u32 {
        match queue {
            TX_QUEUE => self.transmit(chain, memory),
            // The transport takes no receive chain on a notify; nothing written.
            _ => 0,
        }
    }

    fn chain_refused(&mut self, queue: u16, _error: ChainError) {
        match queue {
            RX_QUEUE => self.stats.drops.rx_refused += 1,
            _ => self.stats.drops.tx_refused += 1,
        }
    }

    fn reset(&mut self) {
        self.driver_features = 0;
        self.stats.drops.tx_reset += self.outbox.len() as u64;
        self.outbox.clear();
    }
}

impl VirtioPci<Net> {
    /// Whether a frame delivered now would find no receive buffer on a live device with its
    /// link up (the driver has posted none that is not used yet). The caller may then keep
    /// the frame and deliver it once the driver posts buffers (it notifies the receive queue),
    /// instead of having [`Self::deliver`] drop it.
    pub fn receive_would_wait(&self, memory: &mut dyn GuestMemory) -> bool {
        self.device().link_up && self.waiting_for_chain(RX_QUEUE, memory)
    }

    /// Delivers `frame` (an Ethernet frame without FCS) to the guest: into the next receive
    /// buffer it posted, with the queue interrupt unless suppressed. A frame that cannot be
    /// delivered now is dropped and counted; nothing is kept for later.
    pub fn deliver(&mut self, frame: &[u8], memory: &mut dyn GuestMemory) -> Result<(), RxDropped> {
        let net = self.device();
        let outcome = if frame.len() < MIN_FRAME || frame.len() > net.max_frame() {
            Err(RxDropped::BadFrame { len: frame.len() })
        } else if !net.link_up {
            Err(RxDropped::LinkDown)
        } else {
            self.use_chain(RX_QUEUE, memory, |net, chain, memory| {
                net.receive(chain, memory, frame)
            })
            .unwrap_or_else(|error| {
                Err(match error {
                    UseChainError::NotLive => RxDropped::NotReady,
                    UseChainError::NoChain => RxDropped::NoBuffer,
                    UseChainError::Refused(error) => RxDropped::Refused(error),
                    UseChainError::QueueFault(error) => RxDropped::QueueFault(error),
                })
            })
        };
        self.device_mut().count_delivery(frame.len(), &outcome);
        outcome
    }

    /// Sets the link state: on a change, the configuration's status follows and the driver
    /// gets a configuration change interrupt (5.1.4.2: the driver re-reads status).
    pub fn set_link_up(&mut self, up: bool) {
        if self.device().link_up != up {
            self.device_mut().link_up = up;
            self.config_changed();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::status;
    use crate::memory::FakeMemory;
    use crate::pci::{DEVICE_CONFIG_OFFSET, ISR_CONFIG, ISR_OFFSET, ISR_QUEUE, NOTIFY_OFFSET};
    use crate::testing::{
        bring_up_queues, common_read, common_write, config_write, ram, DriverQueue, DESC_F_NEXT,
        DESC_F_WRITE,
    };
    use alloc::format;
    use ringzero_devices::PciDevice;

    const MAC: [u8; 6] = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
    /// Where frames to send and receive buffers live.
    const TX_BUFFER: u64 = 0x40000;
    const RX_BUFFER: u64 = 0x60000;
    /// Linux's small receive buffer: header + GOOD_PACKET_LEN.
    const RX_BUFFER_LEN: u32 = 12 + 1518;

    struct Rig {
        pci: VirtioPci<Net>,
        memory: FakeMemory,
        rx: DriverQueue,
        tx: DriverQueue,
    }

    impl Rig {
        fn new() -> Self {
            Self::with(NetConfig::new(MAC))
        }

        fn with(config: NetConfig) -> Self {
            let mut pci = VirtioPci::new(Net::new(config).unwrap());
            let memory = ram(1 << 20);
            let rx = DriverQueue::new(0x10000, 256);
            let tx = DriverQueue::new(0x20000, 256);
            bring_up_queues(&mut pci, &[&rx, &tx]);
            Self {
                pci,
                memory,
                rx,
                tx,
            }
        }

        /// Makes a transmit chain of header + `frame` available, split into descriptors of
        /// the lengths in `split` (the rest in a last one), and notifies.
        fn send_split(&mut self, frame: &[u8], split: &[u32]) -> u16 {
            let mut packet = vec![0xEEu8; HEADER_SIZE];
            packet.extend_from_slice(frame);
            // Eight packet buffers of up to 10 KiB, used in turn.
            let buffer = TX_BUFFER + 0x2800 * u64::from(self.tx.avail_idx % 8);
            self.memory.write(buffer, &packet).unwrap();
            let mut buffers = vec![];
            let mut at = 0u32;
            for &len in split {
                buffers.push((buffer + u64::from(at), len, false));
                at += len;
            }
            buffers.push((buffer + u64::from(at), packet.len() as u32 - at, false));
            self.tx.add_chain(&mut self.memory, &buffers)
        }

        /// Sends header + `frame` in one descriptor (Linux's `can_push` layout) and runs the
        /// notify; returns the used elements.
        fn send(&mut self, frame: &[u8]) -> Vec<(u32, u32)> {
            self.send_split(frame, &[]);
            self.notify_tx();
            self.tx.take_used(&mut self.memory)
        }

        fn notify_tx(&mut self) -> usize {
            let notify = self.pci.bar_write(0, NOTIFY_OFFSET + 4, 2, 1).unwrap();
            assert_eq!(notify.queue, TX_QUEUE);
            self.pci.process(notify.queue, &mut self.memory)
        }

        /// Posts `count` Linux-sized receive buffers, 2 KiB apart.
        fn post_rx(&mut self, count: u64) {
            for i in 0..count {
                let address = RX_BUFFER + 2048 * (u64::from(self.rx.avail_idx) % 64 + i) % 0x20000;
                self.rx
                    .add_chain(&mut self.memory, &[(address, RX_BUFFER_LEN, true)]);
            }
        }

        fn stats(&self) -> NetStats {
            *self.pci.device().stats()
        }

        fn config(&mut self, offset: u64, size: u8) -> u64 {
            self.pci.bar_read(0, DEVICE_CONFIG_OFFSET + offset, size)
        }
    }

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    #[test]
    fn identity_features_and_configuration() {
        let mut rig = Rig::new();
        assert_eq!(rig.pci.read_config(0x00), 0x1041_1AF4, "device 0x1040 + 1");
        assert_eq!(
            rig.pci.read_config(0x08) >> 8,
            0x02_00_00,
            "Ethernet controller"
        );
        assert_eq!(
            common_read(&mut rig.pci, 0x12, 2),
            2,
            "receiveq1 + transmitq1"
        );
        let offered = rig.pci.device().features();
        assert_eq!(
            offered,
            feature::VERSION_1 | features::MAC | features::STATUS | features::MTU
        );
        for absent in [
            features::CSUM,
            features::GUEST_CSUM,
            features::MRG_RXBUF,
            features::CTRL_VQ,
            features::MQ,
            feature::INDIRECT_DESC,
            feature::EVENT_IDX,
            0xFF << 7, // GUEST_TSO4 ... HOST_UFO
        ] {
            assert_eq!(offered & absent, 0, "{absent:#x} not offered");
        }
        assert_eq!(rig.pci.driver_features(), offered, "all taken");
        assert_eq!(rig.pci.device().driver_features(), offered);
        // mac, status, max_virtqueue_pairs, mtu.
        let mac: Vec<u8> = (0..6).map(|i| rig.config(i, 1) as u8).collect();
        assert_eq!(mac, MAC);
        assert_eq!(rig.config(6, 2), u64::from(STATUS_LINK_UP));
        assert_eq!(rig.config(8, 2), 1);
        assert_eq!(rig.config(10, 2), 1500);
        assert_eq!(rig.config(0, 4), 0x3322_1102, "wider reads");
        assert_eq!(rig.config(12, 8), 0, "speed, duplex: not offered");
        assert_eq!(rig.config(0xFF8, 8), 0);
        // Read-only.
        rig.pci.bar_write(0, DEVICE_CONFIG_OFFSET, 4, 0);
        rig.pci.bar_write(0, DEVICE_CONFIG_OFFSET + 6, 2, 0);
        assert_eq!(rig.config(0, 1), 0x02);
        assert_eq!(rig.config(6, 2), 1);
        let mut past = [0xFF; 4];
        rig.pci.device().read_config(u64::MAX - 1, &mut past);
        assert_eq!(past, [0; 4]);
    }

    #[test]
    fn transmit_frames() {
        let mut rig = Rig::new();
        let first = frame(60, 1);
        assert_eq!(rig.send(&first), [(0, 0)], "used len 0");
        assert!(rig.pci.interrupt_line());
        assert_eq!(rig.pci.device_mut().take_transmitted(), Some(first));
        assert_eq!(rig.pci.device_mut().take_transmitted(), None);
        // Header in a descriptor of its own, the frame split over three more.
        let second = frame(1514, 2);
        let head = rig.send_split(&second, &[12, 100, 1000]);
        assert_eq!(rig.notify_tx(), 1);
        assert_eq!(rig.tx.take_used(&mut rig.memory), [(u32::from(head), 0)]);
        // Header split in the middle, a VLAN-tagged full frame.
        let third = frame(1518, 3);
        rig.send_split(&third, &[5, 20]);
        // And a trailing writable descriptor, ignored.
        let fourth = frame(14, 4);
        let mut packet = vec![0; HEADER_SIZE];
        packet.extend_from_slice(&fourth);
        rig.memory.write(TX_BUFFER + 0x1000, &packet).unwrap();
        rig.tx.add_chain(
            &mut rig.memory,
            &[(TX_BUFFER + 0x1000, 26, false), (RX_BUFFER, 64, true)],
        );
        assert_eq!(rig.notify_tx(), 2);
        assert_eq!(rig.pci.device().transmitted_len(), 3);
        let net = rig.pci.device_mut();
        assert_eq!(net.take_transmitted(), Some(second));
        assert_eq!(net.take_transmitted(), Some(third));
        assert_eq!(net.take_transmitted(), Some(fourth));
        assert_eq!(rig.memory.bytes()[RX_BUFFER as usize], 0, "nothing written");
        let stats = rig.stats();
        assert_eq!(
            (stats.tx_frames, stats.tx_bytes),
            (4, 60 + 1514 + 1518 + 14)
        );
        assert_eq!(stats.drops.total(), 0);
    }

    #[test]
    fn transmit_bounds() {
        let mut rig = Rig::new();
        // A runt, an empty frame, a chain shorter than the header.
        assert_eq!(rig.send(&frame(13, 0)), [(0, 0)]);
        assert_eq!(rig.send(&[]), [(1, 0)]);
        rig.tx.add_chain(&mut rig.memory, &[(TX_BUFFER, 11, false)]);
        // Oversize, for the default MTU (1518 is fine, see transmit_frames).
        assert_eq!(rig.send(&frame(1519, 0)).len(), 2);
        // Writable descriptors only.
        rig.tx
            .add_chain(&mut rig.memory, &[(TX_BUFFER, 1530, true)]);
        assert_eq!(rig.notify_tx(), 1);
        assert_eq!(rig.tx.take_used(&mut rig.memory).len(), 1);
        assert_eq!(rig.pci.device().transmitted_len(), 0);
        let drops = rig.stats().drops;
        assert_eq!(
            (drops.tx_runt, drops.tx_oversize, drops.tx_malformed),
            (2, 1, 2)
        );
        assert_eq!(rig.stats().tx_frames, 0);
        // A larger MTU moves the bound.
        let mut config = NetConfig::new(MAC);
        config.mtu = 9000;
        let mut rig = Rig::with(config);
        assert_eq!(rig.config(10, 2), 9000);
        rig.send(&frame(9018, 0));
        rig.send(&frame(9019, 0));
        assert_eq!(rig.pci.device().transmitted_len(), 1);
        assert_eq!(rig.stats().drops.tx_oversize, 1);
    }

    #[test]
    fn transmit_back_pressure() {
        let mut config = NetConfig::new(MAC);
        config.outbox_frames = 2;
        let mut rig = Rig::with(config);
        for i in 0..5 {
            rig.send_split(&frame(64, i), &[]);
        }
        assert_eq!(rig.notify_tx(), 2, "the outbox holds two");
        assert!(rig.pci.device().outbox_full());
        assert_eq!(rig.tx.take_used(&mut rig.memory).len(), 2);
        assert_eq!(rig.pci.process(TX_QUEUE, &mut rig.memory), 0, "stalled");
        // The hypervisor drains one and resumes.
        assert_eq!(rig.pci.device_mut().take_transmitted(), Some(frame(64, 0)));
        assert_eq!(rig.pci.process(TX_QUEUE, &mut rig.memory), 1);
        let net = rig.pci.device_mut();
        assert_eq!(net.take_transmitted(), Some(frame(64, 1)));
        assert_eq!(net.take_transmitted(), Some(frame(64, 2)));
        assert_eq!(rig.pci.process(TX_QUEUE, &mut rig.memory), 2);
        assert_eq!(rig.pci.process(TX_QUEUE, &mut rig.memory), 0, "all taken");
        let net = rig.pci.device_mut();
        assert_eq!(net.take_transmitted(), Some(frame(64, 3)));
        assert_eq!(net.take_transmitted(), Some(frame(64, 4)));
        assert_eq!(rig.stats().tx_frames, 5);
        assert_eq!(rig.stats().drops.total(), 0, "nothing dropped");
        // Bypassing the transport cannot overfill it either.
        let mut net = Net::new(config).unwrap();
        let mut memory = ram(1 << 20);
        memory.write(TX_BUFFER, &[0; 12 + 64]).unwrap();
        let mut tx = DriverQueue::new(0x20000, 8);
        let mut queue = crate::queue::Queue::new(8);
        (queue.desc_table, queue.avail_ring, queue.used_ring) = (tx.desc, tx.avail, tx.used);
        for _ in 0..3 {
            tx.add_chain(&mut memory, &[(TX_BUFFER, 12 + 64, false)]);
            let Ok(Some(crate::queue::Available::Chain(chain))) = queue.pop(&mut memory) else {
                panic!("no chain");
            };
            net.process_chain(TX_QUEUE, &chain, &mut memory);
        }
        assert_eq!(net.transmitted_len(), 2);
        assert_eq!(net.stats().drops.tx_outbox_full, 1);
    }

    #[test]
    fn receive_into_posted_buffers() {
        let mut rig = Rig::new();
        // Garbage where the header goes: every byte must be written.
        rig.memory.write(RX_BUFFER, &[0xAA; 64]).unwrap();
        rig.rx
            .add_chain(&mut rig.memory, &[(RX_BUFFER, RX_BUFFER_LEN, true)]);
        // A notify of the receive queue takes nothing.
        let notify = rig.pci.bar_write(0, NOTIFY_OFFSET, 2, 0).unwrap();
        assert_eq!(rig.pci.process(notify.queue, &mut rig.memory), 0);
        assert!(rig.rx.take_used(&mut rig.memory).is_empty());
        let first = frame(60, 9);
        assert_eq!(rig.pci.deliver(&first, &mut rig.memory), Ok(()));
        assert_eq!(rig.rx.take_used(&mut rig.memory), [(0, 12 + 60)]);
        let bytes = &rig.memory.bytes()[RX_BUFFER as usize..];
        assert_eq!(
            &bytes[..12],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
            "num_buffers 1"
        );
        assert_eq!(&bytes[12..72], &first[..]);
        assert_eq!(rig.pci.bar_read(0, ISR_OFFSET, 1), u64::from(ISR_QUEUE));
        // Header and frame in separate descriptors (the Windows driver's layout), a full
        // VLAN-tagged frame, with the driver suppressing interrupts (NAPI polling).
        rig.rx.set_avail_flags(&mut rig.memory, 1);
        let head = rig.rx.add_chain(
            &mut rig.memory,
            &[
                (RX_BUFFER + 0x1000, 12, true),
                (RX_BUFFER + 0x2000, 1518, true),
            ],
        );
        let second = frame(1518, 7);
        assert_eq!(rig.pci.deliver(&second, &mut rig.memory), Ok(()));
        assert_eq!(rig.rx.take_used(&mut rig.memory), [(u32::from(head), 1530)]);
        assert_eq!(rig.memory.bytes()[RX_BUFFER as usize + 0x1000 + 10], 1);
        let start = RX_BUFFER as usize + 0x2000;
        assert_eq!(&rig.memory.bytes()[start..start + 1518], &second[..]);
        assert!(!rig.pci.interrupt_line(), "suppressed");
        let stats = rig.stats();
        assert_eq!((stats.rx_frames, stats.rx_bytes), (2, 60 + 1518));
        assert_eq!(stats.drops.total(), 0);
    }

    #[test]
    fn receive_would_wait_only_for_a_live_queue_without_buffers() {
        let mut rig = Rig::new();
        assert!(
            rig.pci.receive_would_wait(&mut rig.memory),
            "live, no buffer posted"
        );
        rig.post_rx(1);
        assert!(!rig.pci.receive_would_wait(&mut rig.memory));
        assert_eq!(rig.pci.deliver(&frame(60, 0), &mut rig.memory), Ok(()));
        assert!(rig.pci.receive_would_wait(&mut rig.memory), "used up");
        assert_eq!(rig.stats().drops.total(), 0, "asking drops nothing");
        // A device the driver has not brought up does not wait: delivering fails otherwise.
        let idle = VirtioPci::new(Net::new(NetConfig::new(MAC)).unwrap());
        assert!(!idle.receive_would_wait(&mut rig.memory));
    }

    #[test]
    fn receive_drops() {
        let mut rig = Rig::new();
        // No buffer posted.
        assert_eq!(
            rig.pci.deliver(&frame(60, 0), &mut rig.memory),
            Err(RxDropped::NoBuffer)
        );
        assert!(!rig.pci.interrupt_line());
        // Frames the device never passes to the guest.
        for len in [0, 13, 1519, 70_000] {
            assert_eq!(
                rig.pci.deliver(&frame(len, 0), &mut rig.memory),
                Err(RxDropped::BadFrame { len })
            );
        }
        // A buffer too small: given back empty; the next frame takes the next buffer.
        rig.rx
            .add_chain(&mut rig.memory, &[(RX_BUFFER, 12 + 59, true)]);
        rig.post_rx(1);
        assert_eq!(
            rig.pci.deliver(&frame(60, 0), &mut rig.memory),
            Err(RxDropped::BufferTooSmall {
                available: 71,
                needed: 72
            })
        );
        assert_eq!(rig.rx.take_used(&mut rig.memory), [(0, 0)]);
        assert!(rig.pci.interrupt_line(), "the buffer went back");
        assert_eq!(rig.pci.deliver(&frame(60, 0), &mut rig.memory), Ok(()));
        // A readable-only chain is too small as well.
        rig.rx
            .add_chain(&mut rig.memory, &[(RX_BUFFER, 2000, false)]);
        assert!(matches!(
            rig.pci.deliver(&frame(60, 0), &mut rig.memory),
            Err(RxDropped::BufferTooSmall { available: 0, .. })
        ));
        // A refused chain.
        rig.rx
            .add_chain(&mut rig.memory, &[(0xFFFF_FF00, 2000, true)]);
        assert!(matches!(
            rig.pci.deliver(&frame(60, 0), &mut rig.memory),
            Err(RxDropped::Refused(ChainError::BufferOutOfRam { .. }))
        ));
        let drops = rig.stats().drops;
        assert_eq!(
            (
                drops.rx_no_buffer,
                drops.rx_bad_frame,
                drops.rx_too_small,
                drops.rx_refused
            ),
            (1, 4, 2, 1)
        );
        assert_eq!(drops.total(), 8);
        assert_eq!(rig.stats().rx_frames, 1);
        // Not ready: before DRIVER_OK, and without bus mastering.
        let mut pci = VirtioPci::new(Net::new(NetConfig::new(MAC)).unwrap());
        assert_eq!(
            pci.deliver(&frame(60, 0), &mut rig.memory),
            Err(RxDropped::NotReady)
        );
        config_write(&mut rig.pci, 0x04, 0x02);
        rig.post_rx(1);
        assert_eq!(
            rig.pci.deliver(&frame(60, 0), &mut rig.memory),
            Err(RxDropped::NotReady)
        );
        assert_eq!(rig.stats().drops.rx_not_ready, 1);
        // A queue fault: the device needs a reset.
        config_write(&mut rig.pci, 0x04, 0x06);
        rig.rx
            .set_avail_idx(&mut rig.memory, rig.rx.avail_idx.wrapping_add(300));
        assert!(matches!(
            rig.pci.deliver(&frame(60, 0), &mut rig.memory),
            Err(RxDropped::QueueFault(QueueError::AvailIndexJump { .. }))
        ));
        assert_ne!(rig.pci.device_status() & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(
            rig.pci.deliver(&frame(60, 0), &mut rig.memory),
            Err(RxDropped::NotReady)
        );
    }

    #[test]
    fn link_status_changes() {
        let mut rig = Rig::new();
        let generation = common_read(&mut rig.pci, 0x15, 1);
        rig.pci.set_link_up(false);
        assert_eq!(rig.config(6, 2), 0);
        assert_ne!(common_read(&mut rig.pci, 0x15, 1), generation);
        assert_eq!(rig.pci.bar_read(0, ISR_OFFSET, 1), u64::from(ISR_CONFIG));
        rig.pci.set_link_up(false);
        assert_eq!(
            rig.pci.bar_read(0, ISR_OFFSET, 1),
            0,
            "no change, no interrupt"
        );
        // Link down: nothing in, nothing out.
        rig.post_rx(1);
        assert_eq!(
            rig.pci.deliver(&frame(60, 0), &mut rig.memory),
            Err(RxDropped::LinkDown)
        );
        assert_eq!(rig.send(&frame(60, 0)), [(0, 0)], "consumed");
        assert_eq!(rig.pci.device().transmitted_len(), 0);
        assert_eq!(
            (
                rig.stats().drops.rx_link_down,
                rig.stats().drops.tx_link_down
            ),
            (1, 1)
        );
        assert_eq!(rig.pci.bar_read(0, ISR_OFFSET, 1), u64::from(ISR_QUEUE));
        rig.pci.set_link_up(true);
        assert_eq!(rig.config(6, 2), 1);
        assert_eq!(rig.pci.bar_read(0, ISR_OFFSET, 1), u64::from(ISR_CONFIG));
        assert_eq!(rig.pci.deliver(&frame(60, 0), &mut rig.memory), Ok(()));
        // Created with the link down.
        let mut config = NetConfig::new(MAC);
        config.link_up = false;
        let mut rig = Rig::with(config);
        assert_eq!(rig.config(6, 2), 0);
        assert!(!rig.pci.device().link_up());
    }

    #[test]
    fn reset_clears_everything_but_statistics() {
        let mut rig = Rig::new();
        rig.send(&frame(60, 0));
        rig.send(&frame(60, 1));
        rig.post_rx(4);
        assert_eq!(rig.pci.deliver(&frame(60, 0), &mut rig.memory), Ok(()));
        common_write(&mut rig.pci, 0x14, 1, 0);
        assert!(!rig.pci.interrupt_line());
        let net = rig.pci.device();
        assert_eq!(net.transmitted_len(), 0, "outbox dropped");
        assert_eq!(net.driver_features(), 0);
        assert_eq!(net.stats().drops.tx_reset, 2);
        assert_eq!((net.stats().tx_frames, net.stats().rx_frames), (2, 1));
        assert!(net.link_up(), "the link is the hypervisor's");
        assert_eq!(
            rig.pci.deliver(&frame(60, 0), &mut rig.memory),
            Err(RxDropped::NotReady),
            "buffers of the old driver are gone"
        );
        // A new driver brings it up again from scratch.
        let mut memory = ram(1 << 20);
        let mut rx = DriverQueue::new(0x10000, 256);
        let tx = DriverQueue::new(0x20000, 256);
        bring_up_queues(&mut rig.pci, &[&rx, &tx]);
        rx.add_chain(&mut memory, &[(RX_BUFFER, RX_BUFFER_LEN, true)]);
        assert_eq!(rig.pci.deliver(&frame(60, 0), &mut memory), Ok(()));
        assert_eq!(rx.take_used(&mut memory), [(0, 72)]);
    }

    #[test]
    fn hostile_rings_never_panic() {
        // Descriptor tables, available rings and used rings full of pseudo-random bytes,
        // driven through every path; the outbox only ever holds frames of legal sizes.
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..300 {
            let mut rig = Rig::new();
            // Descriptors pointing anywhere in (or just out of) the first 128 KiB.
            for (queue, base) in [(&rig.rx, 0x10000u64), (&rig.tx, 0x20000)] {
                for index in 0..16 {
                    let value = next();
                    let address =
                        (value & 0x1_FFFF) | if value >> 63 != 0 { 0xFFF0_0000 } else { 0 };
                    let length = (value >> 20) as u32 % 3000;
                    let flags = (value >> 40) as u16 & (DESC_F_NEXT | DESC_F_WRITE | 4);
                    let next_index = (value >> 48) as u16 % 20;
                    queue.write_desc(&mut rig.memory, index, address, length, flags, next_index);
                }
                for slot in 0..16u64 {
                    let head = (next() % 20) as u16;
                    rig.memory
                        .write(base + 16 * 256 + 4 + 2 * slot, &head.to_le_bytes())
                        .unwrap();
                }
            }
            let avail = (round % 18) as u16;
            rig.rx.set_avail_idx(&mut rig.memory, avail);
            rig.tx.set_avail_idx(&mut rig.memory, avail);
            rig.notify_tx();
            for len in [14, 60, 1518, (next() % 2000) as usize] {
                let _ = rig.pci.deliver(&frame(len, round as u8), &mut rig.memory);
            }
            while let Some(sent) = rig.pci.device_mut().take_transmitted() {
                assert!((14..=1518).contains(&sent.len()));
            }
            rig.pci.process(TX_QUEUE, &mut rig.memory);
            let stats = rig.stats();
            assert!(stats.tx_frames + stats.drops.total() <= 64);
        }
    }

    #[test]
    fn mac_from_names() {
        // FNV-1a 64 of the name, computed independently.
        assert_eq!(mac_from_name("web"), [0x02, 0xf1, 0x1e, 0x72, 0x48, 0x19]);
        assert_eq!(mac_from_name("db"), [0x02, 0xe3, 0xa1, 0x3b, 0xb5, 0x07]);
        assert_eq!(mac_from_name(""), [0x02, 0x25, 0x23, 0x22, 0x84, 0xe4]);
        assert_eq!(mac_from_name("web"), mac_from_name("web"));
        for name in ["a", "b", "vm-0", "vm-1", "a-very-long-virtual-machine-name"] {
            let mac = mac_from_name(name);
            assert_eq!(mac[0] & 0b11, 0b10, "locally administered unicast");
            assert!(Net::new(NetConfig::new(mac)).is_ok());
        }
    }

    #[test]
    fn configuration_checks() {
        let bad = |change: fn(&mut NetConfig)| {
            let mut config = NetConfig::new(MAC);
            change(&mut config);
            Net::new(config).err()
        };
        assert_eq!(
            bad(|c| c.mac = [0x01, 0, 0x5E, 0, 0, 1]),
            Some(NetConfigError::MacNotUnicast {
                mac: [0x01, 0, 0x5E, 0, 0, 1]
            })
        );
        assert!(bad(|c| c.mac = [0; 6]).is_some());
        assert_eq!(bad(|c| c.mtu = 67), Some(NetConfigError::Mtu { mtu: 67 }));
        assert_eq!(
            bad(|c| c.mtu = 9001),
            Some(NetConfigError::Mtu { mtu: 9001 })
        );
        assert_eq!(
            bad(|c| c.outbox_frames = 0),
            Some(NetConfigError::OutboxFrames { frames: 0 })
        );
        assert!(bad(|c| c.outbox_frames = MAX_OUTBOX_FRAMES + 1).is_some());
        assert_eq!(bad(|c| c.mtu = 68), None);
        let net = Net::new(NetConfig::new(MAC)).unwrap();
        assert_eq!((net.mac(), net.mtu(), net.max_frame()), (MAC, 1500, 1518));
    }

    #[test]
    fn statistics_line() {
        let mut rig = Rig::new();
        rig.send(&frame(100, 0));
        rig.send(&frame(5, 0));
        let _ = rig.pci.deliver(&frame(60, 0), &mut rig.memory);
        rig.post_rx(1);
        let _ = rig.pci.deliver(&frame(60, 0), &mut rig.memory);
        assert_eq!(
            format!("{}", rig.stats()),
            "tx_frames=1 tx_bytes=100 rx_frames=1 rx_bytes=60 drops=2 (tx_runt=1 \
             tx_oversize=0 tx_malformed=0 tx_link_down=0 tx_refused=0 tx_outbox_full=0 \
             tx_reset=0 rx_bad_frame=0 rx_link_down=0 rx_not_ready=0 rx_no_buffer=1 \
             rx_too_small=0 rx_refused=0 memory=0)"
        );
    }
}
