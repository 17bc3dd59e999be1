//! Fuzz target: a guest that controls all of its RAM (rings, descriptors, request headers)
//! and the queue registers drives a virtio-blk device through the PCI transport.
//!
//! Input: byte 0 picks the queue size (1 << (b % 9)), bytes 1..7 the descriptor table,
//! available ring and used ring addresses (scaled to their alignment, possibly misaligned or
//! outside RAM), byte 7 the backend's writability and the number of notifications; the rest
//! is the first bytes of the VM's 64 KiB of RAM. The backend panics on any access outside
//! the disk, so a model that let one through is a crash.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringzero_devices::PciDevice;
use ringzero_vdisk::{check_range, BlockDevice, DiskError, SECTOR_SIZE};
use ringzero_virtio::pci::{BAR_INDEX, ISR_OFFSET, NOTIFY_OFFSET};
use ringzero_virtio::{Block, FakeMemory, VirtioPci};

const RAM_BYTES: usize = 64 * 1024;
const DISK_SECTORS: usize = 64;

struct StrictDisk {
    data: Vec<u8>,
    writable: bool,
}

impl BlockDevice for StrictDisk {
    fn sectors(&self) -> u64 {
        DISK_SECTORS as u64
    }
    fn writable(&self) -> bool {
        self.writable
    }
    fn read(&mut self, first_sector: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        check_range(self.sectors(), first_sector, buf.len()).expect("read outside the disk");
        assert!(buf.len() <= 64 * 1024, "unbounded backend call");
        let start = first_sector as usize * SECTOR_SIZE;
        buf.copy_from_slice(&self.data[start..start + buf.len()]);
        Ok(())
    }
    fn write(&mut self, first_sector: u64, buf: &[u8]) -> Result<(), DiskError> {
        assert!(self.writable, "write to a read-only disk");
        check_range(self.sectors(), first_sector, buf.len()).expect("write outside the disk");
        assert!(buf.len() <= 64 * 1024, "unbounded backend call");
        let start = first_sector as usize * SECTOR_SIZE;
        self.data[start..start + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), DiskError> {
        Ok(())
    }
    fn serial(&self) -> [u8; 20] {
        *b"fuzz-disk\0\0\0\0\0\0\0\0\0\0\0"
    }
}

fn common_write(pci: &mut VirtioPci<Block<StrictDisk>>, offset: u64, size: u8, value: u64) {
    let _ = pci.bar_write(BAR_INDEX, offset, size, value);
}

fuzz_target!(|input: &[u8]| {
    if input.len() < 8 {
        return;
    }
    let size = 1u16 << (input[0] % 9);
    let word = |i: usize| u64::from(u16::from_le_bytes([input[i], input[i + 1]]));
    let desc = word(1) * 8;
    let avail = word(3) * 2;
    let used = word(5) * 2;
    let writable = input[7] & 1 != 0;
    let rounds = 1 + (input[7] >> 1) % 4;
    let mut ram = input[8..].to_vec();
    ram.resize(RAM_BYTES, 0);
    let mut memory = FakeMemory::from_bytes(ram);

    let disk = StrictDisk {
        data: vec![0x5A; DISK_SECTORS * SECTOR_SIZE],
        writable,
    };
    let mut pci = VirtioPci::new(Block::new(disk));
    // Linux's bring-up: BAR, memory + bus master, ACKNOWLEDGE | DRIVER, all features,
    // FEATURES_OK, queue 0, DRIVER_OK.
    pci.write_config(0x10, 0xFEBF_0000, u32::MAX);
    pci.write_config(0x04, 0x6, u32::MAX);
    common_write(&mut pci, 0x14, 1, 3);
    for select in 0..2 {
        common_write(&mut pci, 0x00, 4, select);
        let offered = pci.bar_read(BAR_INDEX, 0x04, 4);
        common_write(&mut pci, 0x08, 4, select);
        common_write(&mut pci, 0x0C, 4, offered);
    }
    common_write(&mut pci, 0x14, 1, 0xB);
    common_write(&mut pci, 0x18, 2, u64::from(size));
    common_write(&mut pci, 0x20, 8, desc);
    common_write(&mut pci, 0x28, 8, avail);
    common_write(&mut pci, 0x30, 8, used);
    common_write(&mut pci, 0x1C, 2, 1);
    common_write(&mut pci, 0x14, 1, 0xF);

    for _ in 0..rounds {
        if let Some(notify) = pci.bar_write(BAR_INDEX, NOTIFY_OFFSET, 2, 0) {
            let used = pci.process(notify.queue, &mut memory);
            assert!(used <= usize::from(size), "more chains than the queue holds");
        }
        let _ = pci.bar_read(BAR_INDEX, ISR_OFFSET, 1);
        assert!(!pci.interrupt_line(), "ISR read must clear the line");
    }
    let stats = pci.device().stats();
    assert!(stats.bytes_read + stats.bytes_written <= u64::from(rounds) * (2 << 20));
});
