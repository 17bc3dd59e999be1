//! Test helpers: the driver side of a split virtqueue laid out in [`FakeMemory`] the way Linux
//! lays it out, a Vec-backed [`BlockDevice`], and a Linux-like bring-up of a [`VirtioPci`]
//! with one queue or several.

use alloc::vec;
use alloc::vec::Vec;

use ringzero_devices::pci::{COMMAND_BUS_MASTER, COMMAND_MEMORY_SPACE};
use ringzero_devices::PciDevice;
use ringzero_vdisk::{check_range, BlockDevice, DiskError, SECTOR_SIZE};

use crate::device::{feature, status, VirtioDevice};
use crate::memory::{FakeMemory, GuestMemory};
use crate::pci::{VirtioPci, BAR_INDEX};

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;

/// Where tests put the BAR.
pub const BAR_BASE: u64 = 0xFEBF_0000;

/// The driver's view of a split queue: Linux's `vring_init` layout (descriptor table, the
/// available ring right after it, the used ring at the next 4 KiB boundary).
pub struct DriverQueue {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    pub avail_idx: u16,
    used_seen: u16,
}

impl DriverQueue {
    pub fn new(base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 4095) & !4095;
        Self {
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// Writes descriptor `index` as given.
    pub fn write_desc(
        &self,
        memory: &mut FakeMemory,
        index: u16,
        address: u64,
        length: u32,
        flags: u16,
        next: u16,
    ) {
        let mut entry = [0u8; 16];
        entry[..8].copy_from_slice(&address.to_le_bytes());
        entry[8..12].copy_from_slice(&length.to_le_bytes());
        entry[12..14].copy_from_slice(&flags.to_le_bytes());
        entry[14..].copy_from_slice(&next.to_le_bytes());
        memory
            .write(self.desc + 16 * u64::from(index), &entry)
            .unwrap();
    }

    /// Makes `head` available and publishes the new avail index.
    pub fn publish(&mut self, memory: &mut FakeMemory, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        memory
            .write(self.avail + 4 + 2 * slot, &head.to_le_bytes())
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(memory, self.avail_idx);
    }

    pub fn set_avail_idx(&self, memory: &mut FakeMemory, idx: u16) {
        memory.write(self.avail + 2, &idx.to_le_bytes()).unwrap();
    }

    pub fn set_avail_flags(&self, memory: &mut FakeMemory, flags: u16) {
        memory.write(self.avail, &flags.to_le_bytes()).unwrap();
    }

    /// Lays out a chain of `(address, length, writable)` buffers in free descriptors (taken in
    /// order, wrapping) and makes it available; returns the head.
    pub fn add_chain(&mut self, memory: &mut FakeMemory, buffers: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(address, length, writable)) in buffers.iter().enumerate() {
            let index = self.next_desc;
            let next = (index + 1) % self.size;
            let mut flags = if writable { DESC_F_WRITE } else { 0 };
            if i + 1 < buffers.len() {
                flags |= DESC_F_NEXT;
            }
            self.write_desc(memory, index, address, length, flags, next);
            self.next_desc = next;
        }
        self.publish(memory, head);
        head
    }

    /// The used elements (id, len) published since the last call.
    pub fn take_used(&mut self, memory: &mut FakeMemory) -> Vec<(u32, u32)> {
        let mut idx = [0u8; 2];
        memory.read(self.used + 2, &mut idx).unwrap();
        let idx = u16::from_le_bytes(idx);
        let mut out = Vec::new();
        while self.used_seen != idx {
            let slot = u64::from(self.used_seen % self.size);
            let mut element = [0u8; 8];
            memory.read(self.used + 4 + 8 * slot, &mut element).unwrap();
            out.push((
                u32::from_le_bytes(element[..4].try_into().unwrap()),
                u32::from_le_bytes(element[4..].try_into().unwrap()),
            ));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

/// A RAM disk with counters and an injectable failure.
pub struct RamDisk {
    pub data: Vec<u8>,
    pub writable: bool,
    pub flushes: u32,
    pub fail: bool,
    /// Largest buffer the device model handed over, in bytes.
    pub largest_call: usize,
}

impl RamDisk {
    pub fn new(sectors: usize, writable: bool) -> Self {
        let data = (0..sectors * SECTOR_SIZE)
            .map(|i| (i / SECTOR_SIZE) as u8 ^ (i as u8))
            .collect();
        Self {
            data,
            writable,
            flushes: 0,
            fail: false,
            largest_call: 0,
        }
    }
}

impl BlockDevice for RamDisk {
    fn sectors(&self) -> u64 {
        (self.data.len() / SECTOR_SIZE) as u64
    }

    fn writable(&self) -> bool {
        self.writable
    }

    fn read(&mut self, first_sector: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.largest_call = self.largest_call.max(buf.len());
        if self.fail {
            return Err(DiskError::Io);
        }
        check_range(self.sectors(), first_sector, buf.len())?;
        let start = first_sector as usize * SECTOR_SIZE;
        buf.copy_from_slice(&self.data[start..start + buf.len()]);
        Ok(())
    }

    fn write(&mut self, first_sector: u64, buf: &[u8]) -> Result<(), DiskError> {
        self.largest_call = self.largest_call.max(buf.len());
        if !self.writable {
            return Err(DiskError::ReadOnly);
        }
        if self.fail {
            return Err(DiskError::Io);
        }
        check_range(self.sectors(), first_sector, buf.len())?;
        let start = first_sector as usize * SECTOR_SIZE;
        self.data[start..start + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        self.flushes += 1;
        if self.fail {
            Err(DiskError::Io)
        } else {
            Ok(())
        }
    }

    fn serial(&self) -> [u8; 20] {
        let mut serial = [0; 20];
        serial[..9].copy_from_slice(b"rz-disk-0");
        serial
    }
}

/// Writes a configuration register through the PCI function as the bus would.
pub fn config_write<P: PciDevice>(pci: &mut P, offset: u16, value: u32) {
    pci.write_config(offset, value, u32::MAX);
}

/// Common configuration access helpers (BAR 0 offsets of 4.1.4.3).
pub fn common_write<D: VirtioDevice>(pci: &mut VirtioPci<D>, offset: u64, size: u8, value: u64) {
    assert_eq!(pci.bar_write(BAR_INDEX, offset, size, value), None);
}

pub fn common_read<D: VirtioDevice>(pci: &mut VirtioPci<D>, offset: u64, size: u8) -> u64 {
    pci.bar_read(BAR_INDEX, offset, size)
}

/// What Linux's virtio_pci_modern + virtio core do up to DRIVER_OK for a one-queue device:
/// BAR assignment, memory and bus-master enable, status ACKNOWLEDGE | DRIVER, features
/// (everything offered), FEATURES_OK, queue 0 at `queue`, DRIVER_OK.
pub fn bring_up<D: VirtioDevice + 'static>(pci: &mut VirtioPci<D>, queue: &DriverQueue) {
    bring_up_queues(pci, &[queue]);
}

/// [`bring_up`] with queue `i` at `queues[i]`.
pub fn bring_up_queues<D: VirtioDevice + 'static>(pci: &mut VirtioPci<D>, queues: &[&DriverQueue]) {
    config_write(pci, 0x10, BAR_BASE as u32);
    config_write(
        pci,
        0x04,
        u32::from(COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER),
    );
    common_write(pci, 0x14, 1, 0);
    common_write(pci, 0x14, 1, u64::from(status::ACKNOWLEDGE));
    common_write(
        pci,
        0x14,
        1,
        u64::from(status::ACKNOWLEDGE | status::DRIVER),
    );
    let mut offered = 0u64;
    for select in 0..2 {
        common_write(pci, 0x00, 4, select);
        offered |= common_read(pci, 0x04, 4) << (32 * select);
    }
    assert_ne!(offered & feature::VERSION_1, 0);
    for select in 0..2 {
        common_write(pci, 0x08, 4, select);
        common_write(pci, 0x0C, 4, (offered >> (32 * select)) & 0xFFFF_FFFF);
    }
    let features_ok = u64::from(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    common_write(pci, 0x14, 1, features_ok);
    assert_eq!(common_read(pci, 0x14, 1), features_ok, "FEATURES_OK kept");
    for (index, queue) in queues.iter().enumerate() {
        common_write(pci, 0x16, 2, index as u64);
        assert_eq!(common_read(pci, 0x1A, 2), 0xFFFF, "no MSI-X vector");
        common_write(pci, 0x18, 2, u64::from(queue.size));
        // vp_iowrite64_twopart: low then high halves.
        for (offset, address) in [(0x20, queue.desc), (0x28, queue.avail), (0x30, queue.used)] {
            common_write(pci, offset, 4, address & 0xFFFF_FFFF);
            common_write(pci, offset + 4, 4, address >> 32);
        }
        common_write(pci, 0x1C, 2, 1);
    }
    common_write(pci, 0x14, 1, features_ok | u64::from(status::DRIVER_OK));
}

/// Fake RAM of `size` bytes.
pub fn ram(size: usize) -> FakeMemory {
    FakeMemory::from_bytes(vec![0; size])
}
