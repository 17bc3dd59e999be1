//! Test helpers: a RAM-backed [`SectorIo`] (tests run with std, so a `Mutex` guards it).

use crate::{check_range, DiskError, SectorIo, SECTOR_SIZE};
use std::sync::Mutex;

/// A physical disk in RAM; `fail_at` makes any access touching that LBA fail with `Io`.
pub struct MemoryIo {
    pub bytes: Mutex<Vec<u8>>,
    pub fail_at: Option<u64>,
}

impl MemoryIo {
    pub fn new(sectors: u64) -> Self {
        MemoryIo {
            bytes: Mutex::new(vec![0; sectors as usize * SECTOR_SIZE]),
            fail_at: None,
        }
    }

    pub fn sector(&self, lba: u64) -> Vec<u8> {
        let start = lba as usize * SECTOR_SIZE;
        self.bytes.lock().unwrap()[start..start + SECTOR_SIZE].to_vec()
    }

    pub fn patch(&self, offset: usize, data: &[u8]) {
        self.bytes.lock().unwrap()[offset..offset + data.len()].copy_from_slice(data);
    }

    fn access(&self, lba: u64, len: usize) -> Result<std::ops::Range<usize>, DiskError> {
        let count = check_range(self.sectors(), lba, len)?;
        if let Some(bad) = self.fail_at {
            if (lba..lba + count).contains(&bad) {
                return Err(DiskError::Io);
            }
        }
        let start = lba as usize * SECTOR_SIZE;
        Ok(start..start + len)
    }
}

impl SectorIo for MemoryIo {
    fn sectors(&self) -> u64 {
        (self.bytes.lock().unwrap().len() / SECTOR_SIZE) as u64
    }

    fn read(&self, lba: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        let range = self.access(lba, buf.len())?;
        buf.copy_from_slice(&self.bytes.lock().unwrap()[range]);
        Ok(())
    }

    fn write(&self, lba: u64, buf: &[u8]) -> Result<(), DiskError> {
        let range = self.access(lba, buf.len())?;
        self.bytes.lock().unwrap()[range].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> Result<(), DiskError> {
        Ok(())
    }
}
