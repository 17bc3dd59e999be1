//! The switch: ports (the VMs' NICs and the physical uplink), anti-spoofing at ingress,
//! bounded per-port input and egress queues, round-robin service of the input queues, and
//! forwarding by destination address (pinned VM addresses, then learned ones, else flood).
//!
//! The frame's path, in steps:
//! 1. [`Switch::submit`]: the hypervisor hands over a frame a port sent (a VM's virtio-net TX
//!    queue, or the physical NIC's receive ring for the uplink). It is counted, its header
//!    checked (runt, oversize, group or zero source, spoofed source) and queued on that
//!    port's bounded input queue, or dropped and counted by cause.
//! 2. [`Switch::run`]: takes up to `budget` frames from the input queues, one per ready port
//!    in turn (round-robin, the turn carried over between calls), learns their source
//!    address and forwards each to the egress queue of its destination port, or floods it to
//!    every port but the one it came in on.
//! 3. [`Switch::pop`]: the hypervisor takes the frames waiting for a port (to a VM's RX queue,
//!    or to the physical NIC's transmit ring).

use alloc::collections::{BTreeMap, VecDeque};
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use crate::frame::{max_frame_len, Frame, FrameError, FrameHeader, DEFAULT_MTU};
use crate::table::{MacTable, TableStats};
use crate::MacAddress;

/// The default ageing time of learned addresses, in seconds. See: IEEE 802.1Q-2018 table 8-6.
pub const DEFAULT_AGEING_SECONDS: u64 = 300;

/// Names one port of a switch. A removed port's id stays invalid even when its slot is reused
/// by a later port (the id carries the slot's generation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortId {
    index: u16,
    generation: u32,
}

impl PortId {
    /// The slot number: small, dense, reused after a port is removed.
    pub fn index(self) -> usize {
        usize::from(self.index)
    }

    #[cfg(test)]
    pub(crate) fn for_tests(index: u16) -> PortId {
        PortId {
            index,
            generation: 0,
        }
    }
}

/// What is behind a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortKind {
    /// A VM's NIC, whose MAC address is configured: the port sends only from it, and frames
    /// to it go to this port only (it is pinned, never learned elsewhere).
    Vm {
        /// The VM NIC's address.
        mac: MacAddress,
    },
    /// The physical NIC: everything that is not a VM. Any valid source address except a VM
    /// port's is learned on it. A switch has at most one uplink (two would make a loop
    /// through the physical network, and there is no spanning tree here).
    Uplink,
}

/// The switch's parameters. Times are in the caller's unit (see [`SwitchConfig::default`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SwitchConfig {
    /// Largest payload of an untagged frame (bytes after the 14-byte header); a frame with an
    /// 802.1Q tag may be 4 bytes longer. Default 1500.
    pub mtu: u16,
    /// A learned address is forgotten when it was not seen as a source for this long, in the
    /// unit of the `now` arguments. Default 300 s.
    pub ageing_time: u64,
    /// Most learned addresses; the least recently refreshed is evicted to make room. 0
    /// disables learning (unknown unicast floods). Default 1024.
    pub table_capacity: usize,
    /// Most ports at once. Default 64.
    pub max_ports: usize,
    /// Bound of each port's input queue (frames submitted, not yet run), in frames. Default 64.
    pub input_frames: usize,
    /// Bound of each port's input queue in bytes (frame lengths). Default 96 KiB.
    pub input_bytes: usize,
    /// Bound of each port's egress queue (frames forwarded, not yet popped), in frames.
    /// Default 256.
    pub egress_frames: usize,
    /// Bound of each port's egress queue in bytes. Default 384 KiB.
    pub egress_bytes: usize,
}

impl SwitchConfig {
    /// The defaults, with the ageing time expressed for a clock of `ticks_per_second`.
    pub fn with_ticks_per_second(ticks_per_second: u64) -> SwitchConfig {
        SwitchConfig {
            mtu: DEFAULT_MTU,
            ageing_time: DEFAULT_AGEING_SECONDS.saturating_mul(ticks_per_second),
            table_capacity: 1024,
            max_ports: 64,
            input_frames: 64,
            input_bytes: 96 * 1024,
            egress_frames: 256,
            egress_bytes: 384 * 1024,
        }
    }

    /// The largest frame this configuration accepts (tagged, at the MTU).
    pub fn max_frame_len(&self) -> usize {
        max_frame_len(self.mtu, true)
    }

    /// Checks that every queue can hold at least one largest frame, that the ageing time is
    /// not zero and that port ids can name `max_ports` ports.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.ageing_time == 0 {
            return Err(ConfigError::ZeroAgeingTime);
        }
        if self.max_ports == 0 || self.max_ports > usize::from(u16::MAX) {
            return Err(ConfigError::MaxPorts);
        }
        if self.input_frames == 0 || self.input_bytes < self.max_frame_len() {
            return Err(ConfigError::InputQueueTooSmall);
        }
        if self.egress_frames == 0 || self.egress_bytes < self.max_frame_len() {
            return Err(ConfigError::EgressQueueTooSmall);
        }
        Ok(())
    }
}

/// Milliseconds: `now` arguments count milliseconds and the ageing time is 300 000.
impl Default for SwitchConfig {
    fn default() -> SwitchConfig {
        SwitchConfig::with_ticks_per_second(1000)
    }
}

/// A configuration [`Switch::new`] refuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// `ageing_time` is 0: nothing could ever be learned.
    ZeroAgeingTime,
    /// `max_ports` is 0 or above 65535.
    MaxPorts,
    /// The input queue bound cannot hold one frame of the largest size.
    InputQueueTooSmall,
    /// The egress queue bound cannot hold one frame of the largest size.
    EgressQueueTooSmall,
}

/// Why a port could not be added or named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortError {
    /// The id names no port (never did, or the port was removed).
    NoSuchPort,
    /// The switch has `max_ports` ports already.
    TooManyPorts,
    /// A VM port's address is a group address or zero.
    InvalidMac,
    /// Another VM port has this address already.
    DuplicateMac,
    /// The switch has an uplink already.
    UplinkExists,
}

/// Why a frame was dropped. Each cause is counted on the port named in its doc.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropCause {
    /// Shorter than its header (ingress port).
    Runt,
    /// Longer than the header plus the MTU (ingress port).
    Oversize,
    /// The source address is a group address or zero (ingress port).
    BadSource,
    /// A VM port sent from an address not its own, or the uplink sent from a VM port's
    /// address (ingress port).
    Spoofed,
    /// The ingress port's input queue was full (ingress port).
    InputFull,
}

/// Why [`Switch::submit`] did not take a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// The id names no port; nothing was counted.
    NoSuchPort,
    /// The frame was dropped and counted on the port.
    Dropped(DropCause),
}

impl From<FrameError> for DropCause {
    fn from(error: FrameError) -> DropCause {
        match error {
            FrameError::Runt => DropCause::Runt,
            FrameError::Oversize => DropCause::Oversize,
        }
    }
}

/// Frames dropped, by cause, counted on one port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortDrops {
    /// Ingress: shorter than the header.
    pub runt: u64,
    /// Ingress: longer than header + MTU.
    pub oversize: u64,
    /// Ingress: group or zero source address.
    pub bad_source: u64,
    /// Ingress: source address not the port's own (VM), or a VM's (uplink).
    pub spoofed: u64,
    /// Ingress: the port's input queue was full.
    pub input_full: u64,
    /// Egress: a frame for this port found its egress queue full (a slow receiver).
    pub queue_full: u64,
    /// Ingress: the destination is on the port the frame came from (no hairpin).
    pub filtered: u64,
}

impl PortDrops {
    /// All drops.
    pub fn total(&self) -> u64 {
        self.runt
            + self.oversize
            + self.bad_source
            + self.spoofed
            + self.input_full
            + self.queue_full
            + self.filtered
    }
}

/// Counters of one port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Frames the port sent into the switch ([`Switch::submit`]), dropped ones included.
    pub in_frames: u64,
    /// Their bytes.
    pub in_bytes: u64,
    /// Frames the switch handed out for the port ([`Switch::pop`]).
    pub out_frames: u64,
    /// Their bytes.
    pub out_bytes: u64,
    /// Drops by cause.
    pub drops: PortDrops,
}

/// The switch-wide counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SwitchStats {
    /// Frames taken from the input queues by [`Switch::run`] and forwarded or flooded.
    pub forwarded: u64,
    /// Frames flooded (broadcast, multicast, unknown unicast), each counted once.
    pub flooded: u64,
    /// Of the flooded, unicast frames to an address neither pinned nor learned.
    pub unknown_unicast: u64,
    /// Learning table counters.
    pub table: TableStats,
    /// Learned addresses in the table now.
    pub table_entries: usize,
    /// The table's bound.
    pub table_capacity: usize,
}

/// `vswitch: forwarded=N flooded=N unknown_unicast=N learned=N moved=N aged=N evicted=N
/// table=N/N`.
impl fmt::Display for SwitchStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "vswitch: forwarded={} flooded={} unknown_unicast={} learned={} moved={} aged={} \
             evicted={} table={}/{}",
            self.forwarded,
            self.flooded,
            self.unknown_unicast,
            self.table.learned,
            self.table.moved,
            self.table.aged,
            self.table.evicted,
            self.table_entries,
            self.table_capacity
        )
    }
}

/// One port's statistics line, from [`Switch::port_line`]: `vswitch: port NAME in=N
/// in_bytes=N out=N out_bytes=N drops: runt=N oversize=N bad_source=N spoofed=N input_full=N
/// queue_full=N filtered=N`.
pub struct PortLine<'a> {
    name: &'a str,
    stats: &'a PortStats,
}

impl fmt::Display for PortLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.stats;
        let d = &s.drops;
        write!(
            f,
            "vswitch: port {} in={} in_bytes={} out={} out_bytes={} drops: runt={} oversize={} \
             bad_source={} spoofed={} input_full={} queue_full={} filtered={}",
            self.name,
            s.in_frames,
            s.in_bytes,
            s.out_frames,
            s.out_bytes,
            d.runt,
            d.oversize,
            d.bad_source,
            d.spoofed,
            d.input_full,
            d.queue_full,
            d.filtered
        )
    }
}

/// How full a queue is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueLevel {
    /// Frames queued.
    pub frames: usize,
    /// Their bytes.
    pub bytes: usize,
}

trait ByteLen {
    fn byte_len(&self) -> usize;
}

impl ByteLen for Frame {
    fn byte_len(&self) -> usize {
        self.len()
    }
}

/// A frame accepted at ingress, with the header that was checked.
#[derive(Debug)]
struct Pending {
    frame: Frame,
    header: FrameHeader,
}

impl ByteLen for Pending {
    fn byte_len(&self) -> usize {
        self.frame.len()
    }
}

/// A FIFO bounded both in entries and in bytes.
#[derive(Debug)]
struct BoundedQueue<T> {
    items: VecDeque<T>,
    bytes: usize,
    max_frames: usize,
    max_bytes: usize,
}

impl<T: ByteLen> BoundedQueue<T> {
    fn new(max_frames: usize, max_bytes: usize) -> Self {
        BoundedQueue {
            items: VecDeque::new(),
            bytes: 0,
            max_frames,
            max_bytes,
        }
    }

    /// Queues `item`, or gives it back when either bound would be passed.
    fn push(&mut self, item: T) -> Result<(), T> {
        let len = item.byte_len();
        if self.items.len() >= self.max_frames || self.bytes + len > self.max_bytes {
            return Err(item);
        }
        self.bytes += len;
        self.items.push_back(item);
        Ok(())
    }

    fn pop(&mut self) -> Option<T> {
        let item = self.items.pop_front()?;
        self.bytes -= item.byte_len();
        Some(item)
    }

    fn peek(&self) -> Option<&T> {
        self.items.front()
    }

    fn level(&self) -> QueueLevel {
        QueueLevel {
            frames: self.items.len(),
            bytes: self.bytes,
        }
    }
}

#[derive(Debug)]
struct Port {
    name: String,
    kind: PortKind,
    input: BoundedQueue<Pending>,
    egress: BoundedQueue<Frame>,
    stats: PortStats,
}

#[derive(Debug)]
struct Slot {
    generation: u32,
    port: Option<Port>,
}

/// Where a frame goes.
enum Destination {
    One(PortId),
    Flood,
}

/// A learning layer-2 switch between the VMs' NICs and the physical uplink.
#[derive(Debug)]
pub struct Switch {
    config: SwitchConfig,
    slots: Vec<Slot>,
    /// VM port addresses: always forwarded to their port, never learned elsewhere.
    pinned: BTreeMap<MacAddress, PortId>,
    uplink: Option<PortId>,
    table: MacTable,
    /// The slot whose input queue [`Switch::run`] looks at first.
    next_turn: usize,
    stats: SwitchStats,
}

impl Switch {
    /// A switch without ports.
    pub fn new(config: SwitchConfig) -> Result<Switch, ConfigError> {
        config.validate()?;
        Ok(Switch {
            config,
            slots: Vec::new(),
            pinned: BTreeMap::new(),
            uplink: None,
            table: MacTable::new(config.table_capacity, config.ageing_time),
            next_turn: 0,
            stats: SwitchStats::default(),
        })
    }

    /// The parameters.
    pub fn config(&self) -> &SwitchConfig {
        &self.config
    }

    fn port(&self, id: PortId) -> Option<&Port> {
        let slot = self.slots.get(id.index())?;
        if slot.generation != id.generation {
            return None;
        }
        slot.port.as_ref()
    }

    fn port_mut(&mut self, id: PortId) -> Option<&mut Port> {
        let slot = self.slots.get_mut(id.index())?;
        if slot.generation != id.generation {
            return None;
        }
        slot.port.as_mut()
    }

    /// Adds a port; `name` labels its statistics line. A VM port's address is pinned to it
    /// (and forgotten from the learning table, should the uplink have taught it).
    pub fn add_port(&mut self, name: &str, kind: PortKind) -> Result<PortId, PortError> {
        match kind {
            PortKind::Vm { mac } => {
                if !mac.is_valid_source() {
                    return Err(PortError::InvalidMac);
                }
                if self.pinned.contains_key(&mac) {
                    return Err(PortError::DuplicateMac);
                }
            }
            PortKind::Uplink => {
                if self.uplink.is_some() {
                    return Err(PortError::UplinkExists);
                }
            }
        }
        if self.ports().count() >= self.config.max_ports {
            return Err(PortError::TooManyPorts);
        }
        let port = Port {
            name: String::from(name),
            kind,
            input: BoundedQueue::new(self.config.input_frames, self.config.input_bytes),
            egress: BoundedQueue::new(self.config.egress_frames, self.config.egress_bytes),
            stats: PortStats::default(),
        };
        let id = match self.slots.iter().position(|slot| slot.port.is_none()) {
            Some(index) => {
                let slot = &mut self.slots[index];
                slot.generation = slot.generation.wrapping_add(1);
                slot.port = Some(port);
                PortId {
                    index: index as u16,
                    generation: slot.generation,
                }
            }
            None => {
                // max_ports <= u16::MAX (validated), so the index fits.
                let index = u16::try_from(self.slots.len()).map_err(|_| PortError::TooManyPorts)?;
                self.slots.push(Slot {
                    generation: 0,
                    port: Some(port),
                });
                PortId {
                    index,
                    generation: 0,
                }
            }
        };
        match kind {
            PortKind::Vm { mac } => {
                self.table.forget(mac);
                self.pinned.insert(mac, id);
            }
            PortKind::Uplink => self.uplink = Some(id),
        }
        Ok(id)
    }

    /// Removes a port (its VM stopped): its queued frames are discarded, its address unpinned
    /// and what was learned on it forgotten. Its id names nothing from now on.
    pub fn remove_port(&mut self, id: PortId) -> Result<(), PortError> {
        let kind = self.port(id).ok_or(PortError::NoSuchPort)?.kind;
        self.slots[id.index()].port = None;
        match kind {
            PortKind::Vm { mac } => {
                self.pinned.remove(&mac);
            }
            PortKind::Uplink => self.uplink = None,
        }
        self.table.forget_port(id);
        Ok(())
    }

    /// The ports, in slot order.
    pub fn ports(&self) -> impl Iterator<Item = PortId> + '_ {
        self.slots.iter().enumerate().filter_map(|(index, slot)| {
            slot.port.as_ref().map(|_| PortId {
                index: index as u16,
                generation: slot.generation,
            })
        })
    }

    /// The uplink, when there is one.
    pub fn uplink(&self) -> Option<PortId> {
        self.uplink
    }

    /// A port's name.
    pub fn port_name(&self, id: PortId) -> Option<&str> {
        self.port(id).map(|port| port.name.as_str())
    }

    /// A port's kind.
    pub fn port_kind(&self, id: PortId) -> Option<PortKind> {
        self.port(id).map(|port| port.kind)
    }

    /// Step 1: takes a frame `id` sent. Counts it, checks it and queues it for [`Switch::run`],
    /// or drops it and counts the cause on the port. Nothing a guest puts in `frame` panics.
    /// The input queue bounds (`input_frames`, `input_bytes`) cap what one port can have
    /// waiting.
    pub fn submit(&mut self, id: PortId, frame: Frame) -> Result<(), SubmitError> {
        let parsed = FrameHeader::parse(frame.bytes(), self.config.mtu);
        // Is the source no VM port's address (what the uplink may send from)?
        let source_free = parsed
            .as_ref()
            .is_ok_and(|header| !self.pinned.contains_key(&header.source));
        let port = self.port_mut(id).ok_or(SubmitError::NoSuchPort)?;
        port.stats.in_frames += 1;
        port.stats.in_bytes += frame.len() as u64;
        let result = parsed
            .map_err(DropCause::from)
            .and_then(|header| check_source(port.kind, header, source_free))
            .and_then(|header| {
                port.input
                    .push(Pending { frame, header })
                    .map_err(|_| DropCause::InputFull)
            });
        result.map_err(|cause| {
            count_drop(&mut port.stats.drops, cause);
            SubmitError::Dropped(cause)
        })
    }

    /// Step 2: forwards up to `budget` submitted frames, one from each port with a non-empty
    /// input queue in turn, the turn carried over to the next call; returns how many. `now` is
    /// the caller's monotonic clock (the unit of `ageing_time`): sources are learned at `now`
    /// and entries older than the ageing time are aged out first.
    ///
    /// Fairness: of `budget`, a port gets at most `ceil(budget / ready ports)` frames while
    /// the other ready ports have frames, so a guest that floods gets its share and no more;
    /// the rest of its flood waits in, or is dropped at, its bounded input queue.
    pub fn run(&mut self, now: u64, budget: usize) -> usize {
        self.age(now);
        let mut done = 0;
        while done < budget {
            let Some(index) = self.next_ready() else {
                break;
            };
            self.next_turn = (index + 1) % self.slots.len();
            let generation = self.slots[index].generation;
            let Some(pending) = self.slots[index]
                .port
                .as_mut()
                .and_then(|port| port.input.pop())
            else {
                break;
            };
            let ingress = PortId {
                index: index as u16,
                generation,
            };
            self.forward(ingress, pending, now);
            done += 1;
        }
        done
    }

    /// The first slot from `next_turn` on (wrapping) whose port has input waiting.
    fn next_ready(&self) -> Option<usize> {
        let count = self.slots.len();
        (0..count)
            .map(|offset| (self.next_turn + offset) % count)
            .find(|&index| {
                self.slots[index]
                    .port
                    .as_ref()
                    .is_some_and(|port| !port.input.items.is_empty())
            })
    }

    fn forward(&mut self, ingress: PortId, pending: Pending, now: u64) {
        let Pending { frame, header } = pending;
        // A VM port added since the frame was submitted may own its source now.
        match self.pinned.get(&header.source) {
            Some(&owner) if owner != ingress => {
                if let Some(port) = self.port_mut(ingress) {
                    count_drop(&mut port.stats.drops, DropCause::Spoofed);
                }
                return;
            }
            Some(_) => {}
            None => self.table.learn(header.source, ingress, now),
        }
        self.stats.forwarded += 1;
        let destination = if header.destination.is_multicast() {
            Destination::Flood
        } else if let Some(&port) = self.pinned.get(&header.destination) {
            Destination::One(port)
        } else if let Some(port) = self.table.lookup(header.destination, now) {
            Destination::One(port)
        } else {
            self.stats.unknown_unicast += 1;
            Destination::Flood
        };
        match destination {
            Destination::One(port) if port == ingress => {
                if let Some(port) = self.port_mut(ingress) {
                    port.stats.drops.filtered += 1;
                }
            }
            Destination::One(port) => self.enqueue(port, frame),
            Destination::Flood => {
                self.stats.flooded += 1;
                let targets: Vec<PortId> = self.ports().filter(|&id| id != ingress).collect();
                if let Some((&last, others)) = targets.split_last() {
                    for &target in others {
                        self.enqueue(target, frame.clone());
                    }
                    self.enqueue(last, frame);
                }
            }
        }
    }

    fn enqueue(&mut self, id: PortId, frame: Frame) {
        if let Some(port) = self.port_mut(id) {
            if port.egress.push(frame).is_err() {
                port.stats.drops.queue_full += 1;
            }
        }
    }

    /// Forgets learned addresses not seen within the ageing time before `now`; returns how
    /// many. [`Switch::run`] does this itself; call it when the switch is idle.
    pub fn age(&mut self, now: u64) -> usize {
        self.table.age(now)
    }

    /// Step 3: the next frame waiting to leave through port `id` (to the VM, or to the
    /// physical NIC), counted as out.
    pub fn pop(&mut self, id: PortId) -> Option<Frame> {
        let port = self.port_mut(id)?;
        let frame = port.egress.pop()?;
        port.stats.out_frames += 1;
        port.stats.out_bytes += frame.len() as u64;
        Some(frame)
    }

    /// The frame [`Switch::pop`] would return next for port `id`, left in place (a receiver
    /// with no room yet keeps it queued; the port's bounded queue drops what comes meanwhile).
    pub fn peek(&self, id: PortId) -> Option<&Frame> {
        self.port(id)?.egress.peek()
    }

    /// Has any port frames waiting for [`Switch::run`]?
    pub fn has_input(&self) -> bool {
        self.next_ready().is_some()
    }

    /// How full port `id`'s input queue is.
    pub fn input_level(&self, id: PortId) -> Option<QueueLevel> {
        self.port(id).map(|port| port.input.level())
    }

    /// How full port `id`'s egress queue is (frames [`Switch::pop`] would return).
    pub fn egress_level(&self, id: PortId) -> Option<QueueLevel> {
        self.port(id).map(|port| port.egress.level())
    }

    /// Where a frame to `mac` would go at `now`: its VM port, the port it was learned on, or
    /// `None` (flooded).
    pub fn lookup(&self, mac: MacAddress, now: u64) -> Option<PortId> {
        match self.pinned.get(&mac) {
            Some(&port) => Some(port),
            None => self.table.lookup(mac, now),
        }
    }

    /// Port `id`'s counters.
    pub fn port_stats(&self, id: PortId) -> Option<&PortStats> {
        self.port(id).map(|port| &port.stats)
    }

    /// Port `id`'s one-line statistics, for the hypervisor's log.
    pub fn port_line(&self, id: PortId) -> Option<PortLine<'_>> {
        self.port(id).map(|port| PortLine {
            name: &port.name,
            stats: &port.stats,
        })
    }

    /// The switch-wide counters (a snapshot; `Display` is one line).
    pub fn stats(&self) -> SwitchStats {
        SwitchStats {
            table: *self.table.stats(),
            table_entries: self.table.len(),
            table_capacity: self.table.capacity(),
            ..self.stats
        }
    }
}

/// The source checks at ingress of a parsed frame from a port of `kind`: the address class,
/// then its ownership (`source_free`: the source is no VM port's address).
fn check_source(
    kind: PortKind,
    header: FrameHeader,
    source_free: bool,
) -> Result<FrameHeader, DropCause> {
    if !header.source.is_valid_source() {
        return Err(DropCause::BadSource);
    }
    let spoofed = match kind {
        PortKind::Vm { mac } => header.source != mac,
        PortKind::Uplink => !source_free,
    };
    if spoofed {
        return Err(DropCause::Spoofed);
    }
    Ok(header)
}

fn count_drop(drops: &mut PortDrops, cause: DropCause) {
    let counter = match cause {
        DropCause::Runt => &mut drops.runt,
        DropCause::Oversize => &mut drops.oversize,
        DropCause::BadSource => &mut drops.bad_source,
        DropCause::Spoofed => &mut drops.spoofed,
        DropCause::InputFull => &mut drops.input_full,
    };
    *counter += 1;
}
