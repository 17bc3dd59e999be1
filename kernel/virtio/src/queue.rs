//! Split virtqueues, device side (spec 2.7): the queue state the transport configures, taking
//! available descriptor chains and giving used elements back.
//!
//! The descriptor-chain walker treats the rings as hostile, after Firecracker's
//! `DescriptorChain::checked_new` and its chain-length counter: a chain is walked and checked
//! whole before any device acts on it, and every way a guest can get it wrong is a distinct
//! [`ChainError`]. The walk visits at most `size` descriptors (so a loop ends as
//! [`ChainError::TooLong`]), holds at most `size` of them, and caps the bytes a chain may
//! describe at [`MAX_CHAIN_BYTES`]. Faults of the queue itself (a bad size, misaligned or
//! out-of-RAM rings, an avail index that runs ahead by more than the queue size) are
//! [`QueueError`]s: the transport stops the queue and asks for a reset (spec 2.1.2).
//!
//! Not supported, and not offered by the transport: indirect descriptors
//! (VIRTIO_F_INDIRECT_DESC, 2.7.5.3; a descriptor with the flag is [`ChainError::Indirect`]),
//! event index suppression (VIRTIO_F_EVENT_IDX, 2.7.10), packed queues (2.8).

use alloc::vec::Vec;

use crate::memory::{read_u16, write_u16, GuestMemory};

/// The largest queue size the devices here offer (the spec allows 32768, 2.7).
pub const MAX_QUEUE_SIZE: u16 = 256;

/// The most bytes one chain may describe, readable and writable together: 1 MiB of data plus
/// a page for headers and status. Device models keep their advertised limits below it (blk:
/// SEG_MAX x SIZE_MAX).
pub const MAX_CHAIN_BYTES: u64 = (1 << 20) + 4096;

/// Descriptor flags. See: spec 2.7.5.
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;
/// Bytes of one descriptor table entry: le64 addr, le32 len, le16 flags, le16 next (2.7.5).
const DESC_SIZE: u64 = 16;

/// Available ring flag: the driver asks not to be interrupted (2.7.6, 2.7.7).
const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Offsets in the available ring: le16 flags, le16 idx, le16 ring[size] (2.7.6).
const AVAIL_IDX: u64 = 2;
const AVAIL_RING: u64 = 4;
/// Offsets in the used ring: le16 flags, le16 idx, {le32 id, le32 len}[size] (2.7.8).
const USED_IDX: u64 = 2;
const USED_RING: u64 = 4;
const USED_ELEMENT_SIZE: u64 = 8;

/// Alignments of the three areas. See: spec 2.7, the table of virtqueue part alignments.
const DESC_ALIGN: u64 = 16;
const AVAIL_ALIGN: u64 = 2;
const USED_ALIGN: u64 = 4;

/// One checked descriptor: its buffer is inside RAM and its end does not overflow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Guest-physical address of the buffer.
    pub address: u64,
    /// Length of the buffer in bytes.
    pub length: u32,
    /// Device-writable (VIRTQ_DESC_F_WRITE) rather than device-readable.
    pub writable: bool,
}

/// A walked and checked descriptor chain (2.7.5): device-readable descriptors first, then
/// device-writable ones, at most the queue size of them, at most [`MAX_CHAIN_BYTES`] in all,
/// every buffer inside RAM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DescriptorChain {
    head: u16,
    descriptors: Vec<Descriptor>,
    readable: usize,
}

impl DescriptorChain {
    /// The index of the first descriptor: the id the used element returns.
    pub fn head(&self) -> u16 {
        self.head
    }

    /// All descriptors, in chain order.
    pub fn descriptors(&self) -> &[Descriptor] {
        &self.descriptors
    }

    /// The device-readable descriptors (the leading ones).
    pub fn readable(&self) -> &[Descriptor] {
        &self.descriptors[..self.readable]
    }

    /// The device-writable descriptors (the trailing ones).
    pub fn writable(&self) -> &[Descriptor] {
        &self.descriptors[self.readable..]
    }

    /// Total bytes of the device-readable descriptors.
    pub fn readable_len(&self) -> u64 {
        self.readable().iter().map(|d| u64::from(d.length)).sum()
    }

    /// Total bytes of the device-writable descriptors.
    pub fn writable_len(&self) -> u64 {
        self.writable().iter().map(|d| u64::from(d.length)).sum()
    }
}

/// Why one available chain was refused. The chain is still consumed (the available index moves
/// past it); see the transport for what the driver gets back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainError {
    /// The available ring names a head descriptor index not below the queue size.
    HeadOutOfRange { head: u16 },
    /// A descriptor's `next` is not below the queue size (2.7.5).
    NextOutOfRange { index: u16, next: u16 },
    /// The chain has more descriptors than the queue size: it loops (2.7.5.2 bounds a chain
    /// by the queue size).
    TooLong,
    /// VIRTQ_DESC_F_INDIRECT is set, but VIRTIO_F_INDIRECT_DESC is not offered (2.7.5.3.1).
    Indirect { index: u16 },
    /// A device-readable descriptor follows a device-writable one (2.7.4.2: the driver MUST
    /// place device-writable descriptors after device-readable ones).
    ReadableAfterWritable { index: u16 },
    /// The buffer's address plus length overflows 64 bits.
    AddressOverflow { index: u16 },
    /// The buffer is not entirely inside the VM's RAM.
    BufferOutOfRam { index: u16 },
    /// The chain describes more than [`MAX_CHAIN_BYTES`].
    TooManyBytes,
    /// The descriptor table entry itself could not be read (RAM map changed under a queue
    /// whose table was checked).
    DescriptorUnreadable { index: u16 },
}

/// A fault of the queue as a whole: the transport stops processing it and sets
/// DEVICE_NEEDS_RESET (2.1.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueError {
    /// The queue size is 0, not a power of two or above the maximum (2.7: split queue sizes
    /// are powers of two).
    BadSize { size: u16 },
    /// A ring address breaks the alignment table of 2.7.
    Misaligned,
    /// A ring (descriptor table, available or used ring) is not inside RAM.
    RingOutOfRam,
    /// The driver's available index is more than the queue size ahead of the chains the device
    /// took: the driver made more buffers available than the queue holds (2.7.6).
    AvailIndexJump { avail_idx: u16, next_avail: u16 },
    /// The available ring names a head descriptor past the queue: there is no id to give back
    /// in the used ring, so the driver would wait for it forever; the device asks for a reset.
    HeadOutOfRange { head: u16 },
}

/// What [`Queue::pop`] took from the available ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Available {
    /// A chain that passed every check.
    Chain(DescriptorChain),
    /// A chain that did not; `head` is what the ring named (maybe out of range itself).
    Refused { head: u16, error: ChainError },
}

/// One split virtqueue's device-side state (the registers of 4.1.4.3 plus the device's own
/// indices).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Queue {
    max_size: u16,
    /// queue_size: what the driver chose, at most `max_size`.
    pub size: u16,
    /// queue_enable.
    pub enabled: bool,
    /// queue_desc: guest-physical address of the descriptor table.
    pub desc_table: u64,
    /// queue_driver: guest-physical address of the available ring.
    pub avail_ring: u64,
    /// queue_device: guest-physical address of the used ring.
    pub used_ring: u64,
    /// The available ring index of the next chain to take (last_avail_idx).
    next_avail: u16,
    /// The used ring index of the next element to give (the used idx the device wrote last).
    next_used: u16,
}

impl Queue {
    /// A queue in its reset state; `max_size` is clamped to 1..=[`MAX_QUEUE_SIZE`] and rounded
    /// down to a power of two.
    pub fn new(max_size: u16) -> Self {
        let clamped = max_size.clamp(1, MAX_QUEUE_SIZE);
        let max_size = 1u16 << (15 - clamped.leading_zeros());
        Self {
            max_size,
            size: max_size,
            enabled: false,
            desc_table: 0,
            avail_ring: 0,
            used_ring: 0,
            next_avail: 0,
            next_used: 0,
        }
    }

    /// Back to the reset state (4.1.4.3.1: queue_size reads the maximum after a reset).
    pub fn reset(&mut self) {
        *self = Self::new(self.max_size);
    }

    /// The largest size the driver may choose.
    pub fn max_size(&self) -> u16 {
        self.max_size
    }

    /// The available ring index of the next chain the device takes.
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// The used ring index the device last published.
    pub fn next_used(&self) -> u16 {
        self.next_used
    }

    /// Checks the size and the three areas (alignment, inside RAM).
    pub fn validate(&self, memory: &dyn GuestMemory) -> Result<(), QueueError> {
        let size = self.size;
        if size == 0 || !size.is_power_of_two() || size > self.max_size {
            return Err(QueueError::BadSize { size });
        }
        if !self.desc_table.is_multiple_of(DESC_ALIGN)
            || !self.avail_ring.is_multiple_of(AVAIL_ALIGN)
            || !self.used_ring.is_multiple_of(USED_ALIGN)
        {
            return Err(QueueError::Misaligned);
        }
        let size = u64::from(size);
        let areas = [
            (self.desc_table, DESC_SIZE * size),
            (self.avail_ring, AVAIL_RING + 2 * size),
            (self.used_ring, USED_RING + USED_ELEMENT_SIZE * size),
        ];
        if areas.iter().all(|&(gpa, len)| memory.contains(gpa, len)) {
            Ok(())
        } else {
            Err(QueueError::RingOutOfRam)
        }
    }

    /// Whether the driver made a chain available that [`Self::pop`] has not taken yet: reads the
    /// avail index only and changes nothing (a read that fails says no; [`Self::pop`] reports
    /// it).
    pub fn has_available(&self, memory: &mut dyn GuestMemory) -> bool {
        read_u16(memory, self.avail_ring.wrapping_add(AVAIL_IDX))
            .is_ok_and(|avail_idx| avail_idx != self.next_avail)
    }

    /// Takes the next available chain, walked and checked; `None` when the driver made no new
    /// one available. The queue must have passed [`Self::validate`] (a ring read that fails
    /// anyway is [`QueueError::RingOutOfRam`]).
    pub fn pop(&mut self, memory: &mut dyn GuestMemory) -> Result<Option<Available>, QueueError> {
        let avail_idx = read_u16(memory, self.avail_ring.wrapping_add(AVAIL_IDX))
            .map_err(|_| QueueError::RingOutOfRam)?;
        let pending = avail_idx.wrapping_sub(self.next_avail);
        if pending == 0 {
            return Ok(None);
        }
        if pending > self.size {
            return Err(QueueError::AvailIndexJump {
                avail_idx,
                next_avail: self.next_avail,
            });
        }
        let slot = u64::from(self.next_avail % self.size);
        let head = read_u16(memory, self.avail_ring.wrapping_add(AVAIL_RING + 2 * slot))
            .map_err(|_| QueueError::RingOutOfRam)?;
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(Some(match self.walk(memory, head) {
            Ok(chain) => Available::Chain(chain),
            Err(error) => Available::Refused { head, error },
        }))
    }

    /// Walks the chain starting at `head`. Bounded: at most `size` descriptors are read.
    fn walk(&self, memory: &mut dyn GuestMemory, head: u16) -> Result<DescriptorChain, ChainError> {
        if head >= self.size {
            return Err(ChainError::HeadOutOfRange { head });
        }
        let mut descriptors = Vec::new();
        let mut readable = 0;
        let mut total: u64 = 0;
        let mut index = head;
        for _ in 0..self.size {
            let mut entry = [0u8; DESC_SIZE as usize];
            let gpa = self.desc_table.wrapping_add(DESC_SIZE * u64::from(index));
            memory
                .read(gpa, &mut entry)
                .map_err(|_| ChainError::DescriptorUnreadable { index })?;
            let [a0, a1, a2, a3, a4, a5, a6, a7, l0, l1, l2, l3, f0, f1, n0, n1] = entry;
            let address = u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]);
            let length = u32::from_le_bytes([l0, l1, l2, l3]);
            let flags = u16::from_le_bytes([f0, f1]);
            let next = u16::from_le_bytes([n0, n1]);
            if flags & DESC_F_INDIRECT != 0 {
                return Err(ChainError::Indirect { index });
            }
            let writable = flags & DESC_F_WRITE != 0;
            if !writable && readable != descriptors.len() {
                return Err(ChainError::ReadableAfterWritable { index });
            }
            if address.checked_add(u64::from(length)).is_none() {
                return Err(ChainError::AddressOverflow { index });
            }
            total += u64::from(length);
            if total > MAX_CHAIN_BYTES {
                return Err(ChainError::TooManyBytes);
            }
            if !memory.contains(address, u64::from(length)) {
                return Err(ChainError::BufferOutOfRam { index });
            }
            descriptors.push(Descriptor {
                address,
                length,
                writable,
            });
            if !writable {
                readable += 1;
            }
            if flags & DESC_F_NEXT == 0 {
                return Ok(DescriptorChain {
                    head,
                    descriptors,
                    readable,
                });
            }
            if next >= self.size {
                return Err(ChainError::NextOutOfRange { index, next });
            }
            index = next;
        }
        Err(ChainError::TooLong)
    }

    /// Gives the chain `head` back in the used ring with `len` bytes written to its
    /// device-writable part, then publishes the new used index (2.7.8, 2.7.14).
    pub fn push_used(
        &mut self,
        memory: &mut dyn GuestMemory,
        head: u16,
        len: u32,
    ) -> Result<(), QueueError> {
        let size = self.size.max(1);
        let slot = u64::from(self.next_used % size);
        let gpa = self
            .used_ring
            .wrapping_add(USED_RING + USED_ELEMENT_SIZE * slot);
        let mut element = [0u8; USED_ELEMENT_SIZE as usize];
        element[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        element[4..].copy_from_slice(&len.to_le_bytes());
        memory
            .write(gpa, &element)
            .map_err(|_| QueueError::RingOutOfRam)?;
        self.next_used = self.next_used.wrapping_add(1);
        write_u16(
            memory,
            self.used_ring.wrapping_add(USED_IDX),
            self.next_used,
        )
        .map_err(|_| QueueError::RingOutOfRam)
    }

    /// Whether the driver asked not to be interrupted (VIRTQ_AVAIL_F_NO_INTERRUPT, 2.7.7; only
    /// a hint without VIRTIO_F_EVENT_IDX). An unreadable ring counts as "interrupt".
    pub fn interrupt_suppressed(&self, memory: &mut dyn GuestMemory) -> bool {
        read_u16(memory, self.avail_ring)
            .map(|flags| flags & AVAIL_F_NO_INTERRUPT != 0)
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::FakeMemory;
    use crate::testing::{ram, DriverQueue, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};

    const BUFFERS: u64 = 0x20000;

    fn setup(size: u16) -> (FakeMemory, DriverQueue, Queue) {
        let memory = ram(4 << 20);
        let driver = DriverQueue::new(0x10000, size);
        let mut queue = Queue::new(MAX_QUEUE_SIZE);
        queue.size = size;
        queue.desc_table = driver.desc;
        queue.avail_ring = driver.avail;
        queue.used_ring = driver.used;
        queue.enabled = true;
        assert_eq!(queue.validate(&memory), Ok(()));
        (memory, driver, queue)
    }

    fn refused(queue: &mut Queue, memory: &mut FakeMemory) -> ChainError {
        match queue.pop(memory) {
            Ok(Some(Available::Refused { error, .. })) => error,
            other => panic!("expected a refused chain, got {other:?}"),
        }
    }

    #[test]
    fn valid_chain() {
        let (mut memory, mut driver, mut queue) = setup(8);
        assert_eq!(queue.pop(&mut memory), Ok(None));
        let head = driver.add_chain(
            &mut memory,
            &[
                (BUFFERS, 16, false),
                (BUFFERS + 16, 8, false),
                (BUFFERS + 64, 512, true),
            ],
        );
        let Ok(Some(Available::Chain(chain))) = queue.pop(&mut memory) else {
            panic!("no chain");
        };
        assert_eq!(chain.head(), head);
        assert_eq!(chain.readable().len(), 2);
        assert_eq!(chain.writable().len(), 1);
        assert_eq!(chain.readable_len(), 24);
        assert_eq!(chain.writable_len(), 512);
        assert_eq!(queue.pop(&mut memory), Ok(None));
        queue.push_used(&mut memory, head, 513).unwrap();
        assert_eq!(driver.take_used(&mut memory), [(u32::from(head), 513)]);
        assert_eq!(queue.next_avail(), 1);
        assert_eq!(queue.next_used(), 1);
    }

    #[test]
    fn chain_as_long_as_the_queue_is_accepted() {
        let (mut memory, mut driver, mut queue) = setup(4);
        driver.add_chain(&mut memory, &[(BUFFERS, 1, false); 4]);
        assert!(matches!(
            queue.pop(&mut memory),
            Ok(Some(Available::Chain(chain))) if chain.descriptors().len() == 4
        ));
    }

    #[test]
    fn every_malformed_chain_kind() {
        let (mut memory, mut driver, mut queue) = setup(8);
        // Head index out of range.
        driver.publish(&mut memory, 8);
        assert_eq!(
            refused(&mut queue, &mut memory),
            ChainError::HeadOutOfRange { head: 8 }
        );
        // next out of range.
        driver.write_desc(&mut memory, 0, BUFFERS, 16, DESC_F_NEXT, 9);
        driver.publish(&mut memory, 0);
        assert_eq!(
            refused(&mut queue, &mut memory),
            ChainError::NextOutOfRange { index: 0, next: 9 }
        );
        // A loop 0 -> 1 -> 0.
        driver.write_desc(&mut memory, 0, BUFFERS, 16, DESC_F_NEXT, 1);
        driver.write_desc(&mut memory, 1, BUFFERS, 16, DESC_F_NEXT, 0);
        driver.publish(&mut memory, 0);
        assert_eq!(refused(&mut queue, &mut memory), ChainError::TooLong);
        // A descriptor pointing at itself.
        driver.write_desc(&mut memory, 2, BUFFERS, 16, DESC_F_NEXT, 2);
        driver.publish(&mut memory, 2);
        assert_eq!(refused(&mut queue, &mut memory), ChainError::TooLong);
        // Indirect.
        driver.write_desc(&mut memory, 0, BUFFERS, 16, DESC_F_INDIRECT, 0);
        driver.publish(&mut memory, 0);
        assert_eq!(
            refused(&mut queue, &mut memory),
            ChainError::Indirect { index: 0 }
        );
        // Readable after writable.
        driver.write_desc(&mut memory, 0, BUFFERS, 16, DESC_F_NEXT | DESC_F_WRITE, 1);
        driver.write_desc(&mut memory, 1, BUFFERS, 16, 0, 0);
        driver.publish(&mut memory, 0);
        assert_eq!(
            refused(&mut queue, &mut memory),
            ChainError::ReadableAfterWritable { index: 1 }
        );
        // Address + length overflows.
        driver.write_desc(&mut memory, 0, u64::MAX - 4, 16, 0, 0);
        driver.publish(&mut memory, 0);
        assert_eq!(
            refused(&mut queue, &mut memory),
            ChainError::AddressOverflow { index: 0 }
        );
        // Outside RAM, wholly and partly.
        driver.write_desc(&mut memory, 0, BUFFERS, 16, DESC_F_NEXT, 1);
        driver.write_desc(&mut memory, 1, (4 << 20) - 8, 16, 0, 0);
        driver.publish(&mut memory, 0);
        assert_eq!(
            refused(&mut queue, &mut memory),
            ChainError::BufferOutOfRam { index: 1 }
        );
        driver.write_desc(&mut memory, 0, 0x1_0000_0000, 1, 0, 0);
        driver.publish(&mut memory, 0);
        assert_eq!(
            refused(&mut queue, &mut memory),
            ChainError::BufferOutOfRam { index: 0 }
        );
        // Absurd total length, and lengths that would overflow a 32-bit sum.
        driver.write_desc(&mut memory, 0, BUFFERS, 1 << 20, DESC_F_NEXT, 1);
        driver.write_desc(&mut memory, 1, BUFFERS, 8192, 0, 0);
        driver.publish(&mut memory, 0);
        assert_eq!(refused(&mut queue, &mut memory), ChainError::TooManyBytes);
        for index in 0..8 {
            driver.write_desc(&mut memory, index, 0, u32::MAX, DESC_F_NEXT, index + 1);
        }
        driver.publish(&mut memory, 0);
        assert_eq!(refused(&mut queue, &mut memory), ChainError::TooManyBytes);
        // Nothing else left, and the refused chains were all consumed.
        assert_eq!(queue.pop(&mut memory), Ok(None));
        assert_eq!(queue.next_avail(), driver.avail_idx);
    }

    #[test]
    fn descriptor_table_outside_ram_without_validation() {
        let (mut memory, mut driver, mut queue) = setup(8);
        queue.desc_table = 0xFFFF_0000_0000;
        driver.publish(&mut memory, 3);
        assert_eq!(
            refused(&mut queue, &mut memory),
            ChainError::DescriptorUnreadable { index: 3 }
        );
    }

    #[test]
    fn avail_index_jump() {
        let (mut memory, driver, mut queue) = setup(8);
        driver.set_avail_idx(&mut memory, 9);
        assert_eq!(
            queue.pop(&mut memory),
            Err(QueueError::AvailIndexJump {
                avail_idx: 9,
                next_avail: 0
            })
        );
        // Going backwards is a jump of almost 65536.
        driver.set_avail_idx(&mut memory, 0xFFFF);
        assert!(matches!(
            queue.pop(&mut memory),
            Err(QueueError::AvailIndexJump { .. })
        ));
        driver.set_avail_idx(&mut memory, 8);
        assert!(matches!(queue.pop(&mut memory), Ok(Some(_))));
    }

    #[test]
    fn queue_validation() {
        let (memory, driver, queue) = setup(8);
        for size in [0, 3, 512] {
            let mut bad = queue.clone();
            bad.size = size;
            assert_eq!(bad.validate(&memory), Err(QueueError::BadSize { size }));
        }
        let mut bad = queue.clone();
        bad.desc_table += 8;
        assert_eq!(bad.validate(&memory), Err(QueueError::Misaligned));
        let mut bad = queue.clone();
        bad.avail_ring += 1;
        assert_eq!(bad.validate(&memory), Err(QueueError::Misaligned));
        let mut bad = queue.clone();
        bad.used_ring += 2;
        assert_eq!(bad.validate(&memory), Err(QueueError::Misaligned));
        let mut bad = queue.clone();
        bad.used_ring = (4 << 20) - 16;
        assert_eq!(bad.validate(&memory), Err(QueueError::RingOutOfRam));
        let mut bad = queue.clone();
        bad.desc_table = !15;
        assert_eq!(bad.validate(&memory), Err(QueueError::RingOutOfRam));
        assert_eq!(driver.used % 4096, 0, "Linux layout");
        assert_eq!(Queue::new(0).max_size(), 1);
        assert_eq!(Queue::new(300).max_size(), 256);
        assert_eq!(Queue::new(100).max_size(), 64);
    }

    #[test]
    fn indices_wrap_around() {
        let (mut memory, mut driver, mut queue) = setup(4);
        for round in 0..70_000u32 {
            let head = driver.add_chain(&mut memory, &[(BUFFERS, 4, true)]);
            let Ok(Some(Available::Chain(chain))) = queue.pop(&mut memory) else {
                panic!("round {round}: no chain");
            };
            assert_eq!(chain.head(), head);
            queue.push_used(&mut memory, head, round).unwrap();
            assert_eq!(driver.take_used(&mut memory), [(u32::from(head), round)]);
        }
        assert_eq!(queue.next_avail(), (70_000u32 % 65_536) as u16);
    }

    #[test]
    fn interrupt_suppression_flag() {
        let (mut memory, driver, queue) = setup(4);
        assert!(!queue.interrupt_suppressed(&mut memory));
        driver.set_avail_flags(&mut memory, 1);
        assert!(queue.interrupt_suppressed(&mut memory));
    }
}
