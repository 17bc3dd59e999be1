//! The physical NIC: the hypervisor's own driver for the virtio-net device on the host's PCI
//! bus, through the `virtio-drivers` crate (`VirtIONetRaw`: the crate's buffered `VirtIONet`
//! blocks without bound on transmit). The switch (`ringzero-vswitch`) multiplexes the VMs'
//! virtual NICs onto it.
//!
//! - Found once at boot ([`init`]), kernel-global ([`physical_nic`]); one spin lock serializes
//!   every CPU's use of the two queues.
//! - Polling only: no interrupt is set up (the queues ask the device for none). The caller
//!   polls [`PhysicalNic::receive`] (non-blocking).
//! - Receiving: [`RX_BUFFERS`] buffers of [`RX_BUFFER_BYTES`] sit in the receive queue from
//!   boot; each frame is copied out (or shown to a closure) and its buffer goes straight back.
//!   When all are full, the device drops what arrives.
//! - Transmitting: [`PhysicalNic::transmit`] copies the frame behind a virtio-net header into
//!   a heap buffer, queues it and returns; completed buffers are reaped on the next call. When
//!   the queue has no room it waits at most [`TX_WAIT_MILLIS`], then fails ([`NicError::Busy`]).
//!   No wait is unbounded.
//! - Heap buffers are physically contiguous (`virtio_hal`), so the device reads and writes
//!   them in place: no bounce copies.
//! - The boot never transmits: only the `net-probe` test hook does ([`probe_for_test`]).
//!
//! Spec: Virtual I/O Device (VIRTIO) Version 1.2, 5.1 (network device: device IDs 0x1000
//! transitional / 0x1041 modern; VIRTIO_NET_F_STATUS is feature bit 16; the configuration's
//! `status` at offset 6, VIRTIO_NET_S_LINK_UP = 1; receiveq is queue 0, transmitq queue 1).

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use core::mem::ManuallyDrop;
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::pci::bus::DeviceFunction;
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::{DeviceStatus, Transport};

use crate::pci;
use crate::time;
use crate::virtio_hal::DmaHal;

/// The network device's two PCI device IDs. See: VIRTIO 1.2 4.1.2.
const NET_TRANSITIONAL: u16 = 0x1000;
const NET_MODERN: u16 = 0x1041;
/// VIRTIO_NET_F_STATUS: the configuration's `status` field is valid. See: VIRTIO 1.2 5.1.3.
const FEATURE_STATUS: u64 = 1 << 16;
/// `struct virtio_net_config`: `mac[6]`, then `le16 status`. See: VIRTIO 1.2 5.1.4.
const CONFIG_STATUS_OFFSET: usize = 6;
const STATUS_LINK_UP: u16 = 1;

/// Descriptors in each of the two queues (QEMU offers 256; fewer keeps the DMA rings to a page).
const QUEUE_SIZE: usize = 64;
/// Receive buffers posted at boot: one per receive descriptor.
pub const RX_BUFFERS: usize = QUEUE_SIZE;
/// Bytes of one receive buffer: the virtio-net header (12 bytes) and the largest frame, with
/// room to spare (`virtio-drivers` asks for at least 1526).
pub const RX_BUFFER_BYTES: usize = 2048;
/// The shortest frame accepted for transmission: an Ethernet header.
pub const MIN_FRAME_BYTES: usize = 14;
/// The longest frame accepted for transmission: 1500 bytes of payload, the Ethernet header and
/// one 802.1Q tag (no FCS: the device adds it). No offloads are negotiated, so nothing longer
/// goes through.
pub const MAX_FRAME_BYTES: usize = 1518;
/// The longest a transmit waits for room in the queue before it fails.
pub const TX_WAIT_MILLIS: u64 = 100;

/// Why a frame was not transmitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NicError {
    /// Shorter than an Ethernet header (its length).
    TooShort(usize),
    /// Longer than [`MAX_FRAME_BYTES`] (its length).
    TooLong(usize),
    /// The transmit queue stayed full for [`TX_WAIT_MILLIS`]: the device is not taking frames.
    Busy,
    /// The driver refused the request.
    Device(virtio_drivers::Error),
}

impl core::fmt::Display for NicError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            NicError::TooShort(length) => write!(f, "a {length}-byte frame has no Ethernet header"),
            NicError::TooLong(length) => {
                write!(
                    f,
                    "a {length}-byte frame is longer than {MAX_FRAME_BYTES} bytes"
                )
            }
            NicError::Busy => write!(f, "the transmit queue stayed full for {TX_WAIT_MILLIS} ms"),
            NicError::Device(error) => write!(f, "the device refused the frame: {error}"),
        }
    }
}

/// What went through the NIC since boot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NicCounters {
    /// Frames received and handed out, and their bytes (without the virtio-net header).
    pub frames_in: u64,
    pub bytes_in: u64,
    /// Frames queued for transmission, and their bytes.
    pub frames_out: u64,
    pub bytes_out: u64,
    /// Receive completions the driver could not use (malformed by the device).
    pub receive_errors: u64,
    /// Frames refused or not queued ([`NicError`]) and transmit completions that failed.
    pub transmit_errors: u64,
}

impl core::fmt::Display for NicCounters {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "in {} frames {} bytes, out {} frames {} bytes, errors rx {} tx {}",
            self.frames_in,
            self.bytes_in,
            self.frames_out,
            self.bytes_out,
            self.receive_errors,
            self.transmit_errors
        )
    }
}

/// The queues and the buffers the device holds, behind the NIC's lock.
struct Queues {
    device: VirtIONetRaw<DmaHal, PciTransport, QUEUE_SIZE>,
    /// The receive buffers the device holds, by the token (head descriptor) they went in with.
    receiving: [Option<Box<[u8]>>; QUEUE_SIZE],
    /// Frames (header included) the device has not finished sending, by token.
    sending: [Option<Box<[u8]>>; QUEUE_SIZE],
    /// Bytes of the virtio-net header the device expects before each frame (10 or 12).
    header_bytes: usize,
    counters: NicCounters,
}

/// The hypervisor's physical NIC (see the module documentation).
pub struct PhysicalNic {
    location: DeviceFunction,
    mac: [u8; 6],
    /// Whether the device reports its link state (VIRTIO_NET_F_STATUS); without it the link is
    /// taken as up. See: VIRTIO 1.2 5.1.4.2.
    reports_link: bool,
    /// A second view of the device's registers, used only to read the configuration's `status`
    /// (reads without side effects) without taking the queues' lock. Never dropped: a
    /// transport's drop resets the device.
    status_view: ManuallyDrop<PciTransport>,
    queues: spin::Mutex<Queues>,
}

static NIC: spin::Once<Option<PhysicalNic>> = spin::Once::new();

/// The physical NIC found at boot, if any.
pub fn physical_nic() -> Option<&'static PhysicalNic> {
    NIC.get().and_then(Option::as_ref)
}

/// Finds the virtio-net device on the host's PCI bus, sets it up with every receive buffer
/// posted, logs the `net:` line and keeps it for [`physical_nic`]. Runs once, on the boot CPU,
/// before the other CPUs start (it maps the device's registers). Transmits nothing.
pub fn init() {
    NIC.call_once(find);
}

fn find() -> Option<PhysicalNic> {
    let Some(function) = pci::find_virtio(&[NET_TRANSITIONAL, NET_MODERN]) else {
        log::info!("net: none (no virtio-net on the host PCI bus)");
        return None;
    };
    let location = function.location;
    let fail = |why: &dyn core::fmt::Display| {
        log::warn!("net: virtio-net at {location} cannot be used: {why}; no NIC");
    };
    let mut transport = match pci::virtio_transport(location) {
        Ok(transport) => transport,
        Err(error) => {
            fail(&error);
            return None;
        }
    };
    // The offered features, read as `begin_init` will, to know whether `status` is valid
    // (the driver asks for VIRTIO_NET_F_STATUS whenever it is offered).
    // See: VIRTIO 1.2 3.1.1 (driver initialization).
    transport.set_status(DeviceStatus::empty());
    transport.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
    let reports_link = transport.read_device_features() & FEATURE_STATUS != 0;
    let mut device = match VirtIONetRaw::<DmaHal, _, QUEUE_SIZE>::new(transport) {
        Ok(device) => device,
        Err(error) => {
            fail(&error);
            return None;
        }
    };
    device.disable_interrupts();
    let status_view = match pci::virtio_transport_view(location) {
        Ok(view) => view,
        Err(error) => {
            fail(&error);
            return None;
        }
    };
    let mut header = [0u8; 16];
    let header_bytes = match device.fill_buffer_header(&mut header) {
        Ok(bytes) => bytes,
        Err(error) => {
            fail(&error);
            return None;
        }
    };
    let mut queues = Queues {
        device,
        receiving: [const { None }; QUEUE_SIZE],
        sending: [const { None }; QUEUE_SIZE],
        header_bytes,
        counters: NicCounters::default(),
    };
    for _ in 0..RX_BUFFERS {
        if let Err(error) = queues.post_receive_buffer(vec![0u8; RX_BUFFER_BYTES].into()) {
            fail(&error);
            return None;
        }
    }
    let nic = PhysicalNic {
        location,
        mac: queues.device.mac_address(),
        reports_link,
        status_view,
        queues: spin::Mutex::new(queues),
    };
    log::info!(
        "net: virtio-net at {}, MAC {}, link {}",
        nic.location(),
        MacDisplay(nic.mac),
        if nic.link_up() { "up" } else { "down" }
    );
    Some(nic)
}

impl Queues {
    /// Hands `buffer` to the device for a frame to arrive in.
    fn post_receive_buffer(&mut self, mut buffer: Box<[u8]>) -> Result<(), NicError> {
        // SAFETY: the buffer is kept in `receiving[token]`, untouched, until `receive_complete`
        // with that token gives it back; its heap block does not move with the box.
        let token = unsafe { self.device.receive_begin(&mut buffer) }.map_err(NicError::Device)?;
        match self.receiving.get_mut(usize::from(token)) {
            Some(slot @ None) => *slot = Some(buffer),
            // The crate hands out tokens below QUEUE_SIZE, each once until completed.
            _ => panic!("net: receive token {token} out of range or in use"),
        }
        Ok(())
    }

    /// Takes back the buffers of every completed transmission.
    fn reap_sent(&mut self) {
        // Bounded: each pass completes one descriptor chain or stops.
        for _ in 0..QUEUE_SIZE {
            let Some(token) = self.device.poll_transmit() else {
                return;
            };
            let Some(buffer) = self
                .sending
                .get_mut(usize::from(token))
                .and_then(Option::take)
            else {
                log::warn!(
                    "net: the device completed transmit token {token}, which is not in flight"
                );
                self.counters.transmit_errors += 1;
                return;
            };
            // SAFETY: `buffer` is the one `transmit_begin` took with this token.
            if let Err(error) = unsafe { self.device.transmit_complete(token, &buffer) } {
                log::warn!("net: completing transmit token {token}: {error}");
                self.counters.transmit_errors += 1;
                return;
            }
        }
    }

    fn transmit(&mut self, frame: &[u8]) -> Result<(), NicError> {
        if frame.len() < MIN_FRAME_BYTES {
            return Err(NicError::TooShort(frame.len()));
        }
        if frame.len() > MAX_FRAME_BYTES {
            return Err(NicError::TooLong(frame.len()));
        }
        let deadline = time::deadline_after_millis(TX_WAIT_MILLIS);
        loop {
            self.reap_sent();
            if self.device.can_send() {
                break;
            }
            if time::passed(deadline) {
                return Err(NicError::Busy);
            }
            core::hint::spin_loop();
        }
        let mut buffer: Box<[u8]> = vec![0u8; self.header_bytes + frame.len()].into();
        self.device
            .fill_buffer_header(&mut buffer)
            .map_err(NicError::Device)?;
        buffer[self.header_bytes..].copy_from_slice(frame);
        // SAFETY: the buffer is kept in `sending[token]`, untouched, until `transmit_complete`
        // with that token (in `reap_sent`); its heap block does not move with the box.
        let token = unsafe { self.device.transmit_begin(&buffer) }.map_err(NicError::Device)?;
        match self.sending.get_mut(usize::from(token)) {
            Some(slot @ None) => *slot = Some(buffer),
            _ => panic!("net: transmit token {token} out of range or in use"),
        }
        self.counters.frames_out += 1;
        self.counters.bytes_out += frame.len() as u64;
        Ok(())
    }

    /// The next received frame shown to `handle`, its buffer then posted again.
    fn receive_with<R>(&mut self, handle: impl FnOnce(&[u8]) -> R) -> Option<R> {
        let (buffer, frame) = self.next_received()?;
        let result = handle(&buffer[frame]);
        if let Err(error) = self.post_receive_buffer(buffer) {
            log::warn!("net: re-posting a receive buffer: {error}");
            self.counters.receive_errors += 1;
        }
        Some(result)
    }

    /// The buffer of the next completed reception and where its frame is in it. Completions
    /// without a frame are counted as errors and their buffers posted again.
    fn next_received(&mut self) -> Option<(Box<[u8]>, core::ops::Range<usize>)> {
        // Bounded: each pass consumes one completion.
        for _ in 0..QUEUE_SIZE {
            let token = self.device.poll_receive()?;
            let Some(mut buffer) = self
                .receiving
                .get_mut(usize::from(token))
                .and_then(Option::take)
            else {
                log::warn!(
                    "net: the device completed receive token {token}, which it does not hold"
                );
                self.counters.receive_errors += 1;
                return None;
            };
            // SAFETY: `buffer` is the one `receive_begin` took with this token.
            match unsafe { self.device.receive_complete(token, &mut buffer) } {
                Ok((header, length)) if header + length <= buffer.len() => {
                    self.counters.frames_in += 1;
                    self.counters.bytes_in += length as u64;
                    return Some((buffer, header..header + length));
                }
                // Shorter than the header (IoError) or longer than the buffer: the descriptor
                // came back, the buffer is free again.
                Ok(_) | Err(virtio_drivers::Error::IoError) => {
                    self.counters.receive_errors += 1;
                    if let Err(error) = self.post_receive_buffer(buffer) {
                        log::warn!("net: re-posting a receive buffer: {error}");
                    }
                }
                Err(error) => {
                    // The completion was not taken: the device keeps the buffer.
                    log::warn!("net: completing receive token {token}: {error}");
                    self.receiving[usize::from(token)] = Some(buffer);
                    self.counters.receive_errors += 1;
                    return None;
                }
            }
        }
        None
    }
}

impl PhysicalNic {
    /// Where it sits on the host's PCI bus.
    pub fn location(&self) -> DeviceFunction {
        self.location
    }

    /// Its MAC address (from the device's configuration).
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Whether the link is up now (always, when the device does not report it).
    pub fn link_up(&self) -> bool {
        if !self.reports_link {
            return true;
        }
        match self
            .status_view
            .read_config_space::<u16>(CONFIG_STATUS_OFFSET)
        {
            Ok(status) => u16::from_le(status) & STATUS_LINK_UP != 0,
            Err(_) => true,
        }
    }

    /// Queues the Ethernet frame `frame` (destination MAC first, no FCS; the driver adds the
    /// virtio-net header) and returns without waiting for the device to send it. Waits at most
    /// [`TX_WAIT_MILLIS`] for room in the queue.
    pub fn transmit(&self, frame: &[u8]) -> Result<(), NicError> {
        let mut queues = self.queues.lock();
        let outcome = queues.transmit(frame);
        if outcome.is_err() {
            queues.counters.transmit_errors += 1;
        }
        outcome
    }

    /// Whether [`PhysicalNic::transmit`] would find room in the transmit queue now (after
    /// reaping what the device sent), so would not wait. Never waits.
    pub fn can_transmit(&self) -> bool {
        let mut queues = self.queues.lock();
        queues.reap_sent();
        queues.device.can_send()
    }

    /// The next received Ethernet frame, if one is waiting (never waits).
    pub fn receive(&self) -> Option<Vec<u8>> {
        self.receive_with(<[u8]>::to_vec)
    }

    /// Shows the next received frame, if one is waiting, to `handle` (without copying it; the
    /// NIC's lock is held meanwhile, so `handle` must not use the NIC) and returns what it
    /// returns. Never waits.
    pub fn receive_with<R>(&self, handle: impl FnOnce(&[u8]) -> R) -> Option<R> {
        self.queues.lock().receive_with(handle)
    }

    /// What went through the NIC since boot.
    pub fn counters(&self) -> NicCounters {
        self.queues.lock().counters
    }
}

/// A MAC address as `xx:xx:xx:xx:xx:xx`.
pub struct MacDisplay(pub [u8; 6]);

impl core::fmt::Display for MacDisplay {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// The address the probe asks for: QEMU user networking's gateway (its "host").
const PROBE_TARGET: [u8; 4] = [10, 0, 2, 2];
/// How long the probe waits for the reply.
const PROBE_WAIT_MILLIS: u64 = 2000;
/// EtherType of ARP; ARP's hardware type (Ethernet), protocol (IPv4), operations.
/// See: RFC 826; IANA ARP parameters.
const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ARP_HARDWARE_ETHERNET: u16 = 1;
const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;
/// A minimum-size Ethernet frame (60 bytes without FCS): the ARP packet padded with zeros.
const MIN_ETHERNET_FRAME: usize = 60;
/// The probe's transmit burst: this many full-size frames to a locally administered address
/// with the IEEE local experimental EtherType (QEMU user networking drops them unread).
pub const PROBE_BURST_FRAMES: u64 = 1000;
const PROBE_BURST_DESTINATION: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const ETHERTYPE_LOCAL_EXPERIMENTAL: u16 = 0x88B5;

/// An ARP request for `target` from `mac` as an ARP probe (sender address 0.0.0.0, RFC 5227
/// 2.1.1): the hypervisor has no IP address of its own, and the responder learns none.
fn arp_request(mac: [u8; 6], target: [u8; 4]) -> [u8; MIN_ETHERNET_FRAME] {
    let mut frame = [0u8; MIN_ETHERNET_FRAME];
    frame[0..6].copy_from_slice(&[0xFF; 6]);
    frame[6..12].copy_from_slice(&mac);
    frame[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
    frame[14..16].copy_from_slice(&ARP_HARDWARE_ETHERNET.to_be_bytes());
    frame[16..18].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    frame[18] = 6;
    frame[19] = 4;
    frame[20..22].copy_from_slice(&ARP_REQUEST.to_be_bytes());
    frame[22..28].copy_from_slice(&mac);
    // Sender protocol address 0.0.0.0 (bytes 28..32), target hardware address unknown (32..38).
    frame[38..42].copy_from_slice(&target);
    frame
}

/// The sender's hardware address when `frame` is an ARP reply from `target` to `mac`.
fn arp_reply_from(frame: &[u8], mac: [u8; 6], target: [u8; 4]) -> Option<[u8; 6]> {
    let field = |range: core::ops::Range<usize>| frame.get(range);
    let is_reply = field(12..14)? == ETHERTYPE_ARP.to_be_bytes()
        && field(14..16)? == ARP_HARDWARE_ETHERNET.to_be_bytes()
        && field(16..18)? == ETHERTYPE_IPV4.to_be_bytes()
        && field(20..22)? == ARP_REPLY.to_be_bytes()
        && field(28..32)? == target
        && field(32..38)? == mac;
    is_reply.then(|| field(22..28)?.try_into().ok()).flatten()
}

/// Test hook `net-probe` (the only boot that transmits; tests give QEMU user networking):
/// sends an ARP request for 10.0.2.2 and waits at most [`PROBE_WAIT_MILLIS`] for the reply,
/// logging `net: ARP reply from 10.0.2.2 at MAC after N ms (M us)`; checks that malformed
/// frames are refused; times a burst of [`PROBE_BURST_FRAMES`] full-size frames; logs the
/// counters.
pub fn probe_for_test() {
    let Some(nic) = physical_nic() else {
        log::warn!("net: test hook: no NIC to probe with");
        return;
    };
    let mac = nic.mac();
    let [a, b, c, d] = PROBE_TARGET;
    let started = ringzero_x86::hw::rdtsc();
    if let Err(error) = nic.transmit(&arp_request(mac, PROBE_TARGET)) {
        log::warn!("net: test hook: sending the ARP request failed: {error}");
        return;
    }
    let deadline = time::deadline_after_millis(PROBE_WAIT_MILLIS);
    let mut other_frames = 0u64;
    let reply = loop {
        match nic.receive_with(|frame| arp_reply_from(frame, mac, PROBE_TARGET)) {
            Some(Some(sender)) => break Some(sender),
            Some(None) => other_frames += 1,
            None if time::passed(deadline) => break None,
            None => core::hint::spin_loop(),
        }
    };
    let micros = time::tsc_to_micros(ringzero_x86::hw::rdtsc() - started);
    match reply {
        Some(sender) => log::info!(
            "net: ARP reply from {a}.{b}.{c}.{d} at {} after {} ms ({micros} us; {other_frames} other frame(s))",
            MacDisplay(sender),
            micros / 1000
        ),
        None => log::warn!(
            "net: test hook: no ARP reply from {a}.{b}.{c}.{d} within {PROBE_WAIT_MILLIS} ms ({other_frames} other frame(s))"
        ),
    }
    let too_long = [0u8; MAX_FRAME_BYTES + 1];
    if nic.transmit(&too_long) == Err(NicError::TooLong(too_long.len()))
        && nic.transmit(&[0u8; MIN_FRAME_BYTES - 1]) == Err(NicError::TooShort(MIN_FRAME_BYTES - 1))
    {
        log::info!("net: test hook: frames too long or too short are refused");
    } else {
        log::warn!("net: test hook: a malformed frame was not refused");
    }
    let mut frame = [0u8; 1514];
    frame[0..6].copy_from_slice(&PROBE_BURST_DESTINATION);
    frame[6..12].copy_from_slice(&mac);
    frame[12..14].copy_from_slice(&ETHERTYPE_LOCAL_EXPERIMENTAL.to_be_bytes());
    let started = ringzero_x86::hw::rdtsc();
    for index in 0..PROBE_BURST_FRAMES {
        frame[14..22].copy_from_slice(&index.to_be_bytes());
        if let Err(error) = nic.transmit(&frame) {
            log::warn!("net: test hook: burst frame {index}: {error}");
            return;
        }
    }
    let micros = time::tsc_to_micros(ringzero_x86::hw::rdtsc() - started).max(1);
    log::info!(
        "net: test hook: queued {PROBE_BURST_FRAMES} frames of {} bytes in {micros} us ({} frames/s, {} Mbit/s)",
        frame.len(),
        u128::from(PROBE_BURST_FRAMES) * 1_000_000 / u128::from(micros),
        u128::from(PROBE_BURST_FRAMES) * frame.len() as u128 * 8 / u128::from(micros)
    );
    log::info!("net: test hook: counters: {}", nic.counters());
}
