//! [`PartitionDisk`]: a VM's disk that is one partition of the physical disk, a window
//! `[first_lba, last_lba]` onto the shared [`SectorIo`]. Every access is checked against the
//! window before it reaches the physical disk, so a guest can never touch a sector outside
//! its partition (not the GPT, not another VM's partition).

use crate::gpt::{guid_text, Partition};
use crate::{check_range, serial_from_text, BlockDevice, DiskError, SectorIo};
use alloc::sync::Arc;

/// One partition of the physical disk as a VM's disk.
///
/// The physical disk is held as an `Arc<dyn SectorIo>`: the hypervisor creates its physical
/// virtio-blk driver once, wraps it in an `Arc`, and hands a clone to each `PartitionDisk`
/// (the driver serializes the requests of all of them; see [`SectorIo`]).
pub struct PartitionDisk {
    io: Arc<dyn SectorIo>,
    first_lba: u64,
    sectors: u64,
    writable: bool,
    serial: [u8; 20],
}

impl PartitionDisk {
    /// The window `[partition.first_lba, partition.last_lba]` of `io`. Refused with
    /// [`DiskError::OutOfRange`] if the partition is empty or does not lie inside `io` (a
    /// [`crate::gpt::GptTable`] read from `io` never gives such a partition; this re-checks
    /// because the window is the only thing between a guest and the rest of the disk).
    ///
    /// The serial (virtio-blk GET_ID) is the label when it is 1..=20 printable ASCII
    /// characters, else the first 20 hex digits of the partition's unique GUID (upper case,
    /// no dashes), so `/dev/disk/by-id/virtio-SERIAL` names the partition in a Linux guest.
    pub fn new(
        io: Arc<dyn SectorIo>,
        partition: &Partition,
        writable: bool,
    ) -> Result<Self, DiskError> {
        if partition.first_lba > partition.last_lba || partition.last_lba >= io.sectors() {
            return Err(DiskError::OutOfRange);
        }
        let label = partition.label.as_str();
        let serial =
            if (1..=20).contains(&label.len()) && label.bytes().all(|b| b.is_ascii_graphic()) {
                serial_from_text(label)
            } else {
                let hex: alloc::string::String = guid_text(partition.unique_guid)
                    .chars()
                    .filter(|c| *c != '-')
                    .collect();
                serial_from_text(&hex)
            };
        Ok(PartitionDisk {
            io,
            first_lba: partition.first_lba,
            sectors: partition.last_lba - partition.first_lba + 1,
            writable,
            serial,
        })
    }

    /// The physical LBA of `first_sector` after checking that `len` bytes from there lie
    /// inside the partition.
    fn physical(&self, first_sector: u64, len: usize) -> Result<u64, DiskError> {
        check_range(self.sectors, first_sector, len)?;
        // first_sector < sectors, and first_lba + sectors - 1 = last_lba < io.sectors().
        self.first_lba
            .checked_add(first_sector)
            .ok_or(DiskError::OutOfRange)
    }

    /// The partition's first sector on the physical disk.
    pub fn first_lba(&self) -> u64 {
        self.first_lba
    }
}

impl BlockDevice for PartitionDisk {
    fn sectors(&self) -> u64 {
        self.sectors
    }

    fn writable(&self) -> bool {
        self.writable
    }

    fn read(&mut self, first_sector: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        let lba = self.physical(first_sector, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        self.io.read(lba, buf)
    }

    fn write(&mut self, first_sector: u64, buf: &[u8]) -> Result<(), DiskError> {
        if !self.writable {
            return Err(DiskError::ReadOnly);
        }
        let lba = self.physical(first_sector, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        self.io.write(lba, buf)
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        if self.writable {
            self.io.flush()
        } else {
            Ok(())
        }
    }

    fn serial(&self) -> [u8; 20] {
        self.serial
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpt::{parse_guid, read_gpt, write_gpt, NewPartition, LINUX_FILESYSTEM_DATA};
    use crate::testing::MemoryIo;
    use crate::SECTOR_SIZE;

    fn disk() -> Arc<MemoryIo> {
        let io = Arc::new(MemoryIo::new(4096));
        let new = |label: &str, guid: &str, first_lba, last_lba| NewPartition {
            label: label.into(),
            type_guid: LINUX_FILESYSTEM_DATA,
            unique_guid: parse_guid(guid).unwrap(),
            first_lba,
            last_lba,
        };
        write_gpt(
            &*io,
            parse_guid("01234567-89ab-cdef-0123-456789abcdef").unwrap(),
            &[
                new("vm1", "11111111-2222-3333-4444-555555555555", 100, 199),
                new("vm2", "8da63339-0007-60c0-c436-083ac8230908", 200, 299),
                new(
                    "a label longer than twenty",
                    "abcdef01-2345-6789-abcd-ef0123456789",
                    300,
                    300,
                ),
            ],
        )
        .unwrap();
        io
    }

    fn open(io: &Arc<MemoryIo>, index: usize, writable: bool) -> PartitionDisk {
        let table = read_gpt(&**io).unwrap();
        PartitionDisk::new(io.clone(), &table.partitions[index], writable).unwrap()
    }

    #[test]
    fn reads_and_writes_only_inside_the_window() {
        let io = disk();
        let before = io.bytes.lock().unwrap().clone();
        let mut vm1 = open(&io, 0, true);
        assert_eq!(vm1.sectors(), 100);
        assert!(vm1.writable());
        assert_eq!(vm1.first_lba(), 100);
        vm1.write(0, &[0xA1; SECTOR_SIZE]).unwrap();
        vm1.write(98, &[0xA2; 2 * SECTOR_SIZE]).unwrap();
        assert_eq!(io.sector(100), [0xA1; SECTOR_SIZE]);
        assert_eq!(io.sector(199), [0xA2; SECTOR_SIZE]);
        let mut buf = [0u8; 2 * SECTOR_SIZE];
        vm1.read(98, &mut buf).unwrap();
        assert_eq!(buf, [0xA2; 2 * SECTOR_SIZE]);
        vm1.flush().unwrap();

        // Out of range: one past the end, a range running past it, u64 overflow, unaligned.
        let mut sector = [0u8; SECTOR_SIZE];
        assert_eq!(vm1.read(100, &mut sector), Err(DiskError::OutOfRange));
        assert_eq!(
            vm1.write(99, &[1; 2 * SECTOR_SIZE]),
            Err(DiskError::OutOfRange)
        );
        assert_eq!(
            vm1.write(u64::MAX, &[1; SECTOR_SIZE]),
            Err(DiskError::OutOfRange)
        );
        assert_eq!(vm1.read(u64::MAX - 1, &mut buf), Err(DiskError::OutOfRange));
        assert_eq!(vm1.write(0, &[1; 100]), Err(DiskError::Unaligned));
        assert_eq!(vm1.read(0, &mut []), Ok(()));
        assert_eq!(vm1.write(100, &[]), Ok(()));
        assert_eq!(vm1.write(101, &[]), Err(DiskError::OutOfRange));

        // Nothing but LBAs 100 and 198..=199 changed: not the GPT, not vm2.
        let after = io.bytes.lock().unwrap().clone();
        for lba in 0..4096usize {
            let range = lba * SECTOR_SIZE..(lba + 1) * SECTOR_SIZE;
            if ![100, 198, 199].contains(&lba) {
                assert_eq!(after[range.clone()], before[range], "LBA {lba}");
            }
        }
    }

    #[test]
    fn read_only_partitions_refuse_writes() {
        let io = disk();
        let mut vm2 = open(&io, 1, false);
        assert!(!vm2.writable());
        assert_eq!(vm2.write(0, &[1; SECTOR_SIZE]), Err(DiskError::ReadOnly));
        // Even a write that is also out of range reports ReadOnly first.
        assert_eq!(vm2.write(u64::MAX, &[1; 3]), Err(DiskError::ReadOnly));
        assert_eq!(io.sector(200), [0; SECTOR_SIZE]);
        let mut sector = [7u8; SECTOR_SIZE];
        vm2.read(0, &mut sector).unwrap();
        assert_eq!(sector, [0; SECTOR_SIZE]);
        assert_eq!(vm2.flush(), Ok(()));
    }

    #[test]
    fn serials_name_the_partition() {
        let io = disk();
        assert_eq!(
            &open(&io, 0, false).serial(),
            b"vm1\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0"
        );
        // Too long a label: the GUID's first 20 hex digits.
        assert_eq!(&open(&io, 2, false).serial(), b"ABCDEF0123456789ABCD");
    }

    #[test]
    fn a_partition_outside_the_disk_is_refused() {
        let io = disk();
        let mut partition = read_gpt(&*io).unwrap().partitions[0].clone();
        partition.last_lba = 4096;
        assert_eq!(
            PartitionDisk::new(io.clone(), &partition, true).err(),
            Some(DiskError::OutOfRange)
        );
        partition.first_lba = 300;
        partition.last_lba = 299;
        assert_eq!(
            PartitionDisk::new(io.clone(), &partition, true).err(),
            Some(DiskError::OutOfRange)
        );
    }

    #[test]
    fn device_errors_pass_through() {
        let mut io = MemoryIo::new(4096);
        io.fail_at = Some(150);
        let io = Arc::new(io);
        let partition = crate::gpt::Partition {
            index: 0,
            type_guid: LINUX_FILESYSTEM_DATA,
            unique_guid: parse_guid("11111111-2222-3333-4444-555555555555").unwrap(),
            first_lba: 100,
            last_lba: 199,
            attributes: 0,
            label: "vm1".into(),
        };
        let mut vm1 = PartitionDisk::new(io, &partition, true).unwrap();
        assert_eq!(vm1.write(50, &[1; SECTOR_SIZE]), Err(DiskError::Io));
        assert_eq!(vm1.write(49, &[1; SECTOR_SIZE]), Ok(()));
    }
}
