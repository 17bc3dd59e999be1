//! Block backends for the VMs' virtual disks: the [`BlockDevice`] contract the guest-facing
//! virtio-blk model (`ringzero-virtio`) reads and writes through, and the backends behind it:
//! a window onto one partition of the physical disk ([`SectorIo`] + GPT), and RAM images packed
//! into the boot bundle.
//!
//! Host-testable and free of `unsafe`. Sector numbers and lengths come from guests: every
//! method checks bounds and returns a [`DiskError`] instead of panicking.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

/// Bytes in a sector, the unit of every address here (virtio-blk's unit too).
pub const SECTOR_SIZE: usize = 512;

/// Why a disk operation was refused or failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskError {
    /// The range (first sector + length) is not inside the disk.
    OutOfRange,
    /// A write to a read-only disk.
    ReadOnly,
    /// The buffer length is not a whole number of sectors.
    Unaligned,
    /// The device underneath failed.
    Io,
}

/// A VM's disk as the device model sees it. Buffers are whole sectors; `first_sector` counts
/// from the start of this disk (not of the physical disk).
pub trait BlockDevice: Send {
    /// The capacity in sectors.
    fn sectors(&self) -> u64;
    /// Whether writes are allowed.
    fn writable(&self) -> bool;
    /// Reads `buf.len() / SECTOR_SIZE` sectors starting at `first_sector`.
    fn read(&mut self, first_sector: u64, buf: &mut [u8]) -> Result<(), DiskError>;
    /// Writes `buf.len() / SECTOR_SIZE` sectors starting at `first_sector`.
    fn write(&mut self, first_sector: u64, buf: &[u8]) -> Result<(), DiskError>;
    /// Makes every completed write durable on the medium underneath.
    fn flush(&mut self) -> Result<(), DiskError>;
    /// A device serial number for virtio-blk's GET_ID (up to 20 bytes, NUL padded).
    fn serial(&self) -> [u8; 20];
}

/// The physical disk underneath partitions: shared by all VMs, so its methods take `&self` and
/// the implementation (the hypervisor's virtio-blk driver) serializes access itself.
/// `lba` is an absolute sector number on the physical disk.
pub trait SectorIo: Send + Sync {
    /// The capacity in sectors.
    fn sectors(&self) -> u64;
    fn read(&self, lba: u64, buf: &mut [u8]) -> Result<(), DiskError>;
    fn write(&self, lba: u64, buf: &[u8]) -> Result<(), DiskError>;
    fn flush(&self) -> Result<(), DiskError>;
}

/// Checks that `len` bytes starting at `first_sector` are whole sectors inside a disk of
/// `sectors` sectors, and returns the number of sectors.
pub fn check_range(sectors: u64, first_sector: u64, len: usize) -> Result<u64, DiskError> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(DiskError::Unaligned);
    }
    let count = (len / SECTOR_SIZE) as u64;
    match first_sector.checked_add(count) {
        Some(end) if end <= sectors => Ok(count),
        _ => Err(DiskError::OutOfRange),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(check_range(8, 0, 4096), Ok(8));
        assert_eq!(check_range(8, 1, 4096), Err(DiskError::OutOfRange));
        assert_eq!(check_range(8, u64::MAX, 512), Err(DiskError::OutOfRange));
        assert_eq!(check_range(8, 0, 100), Err(DiskError::Unaligned));
        assert_eq!(check_range(8, 8, 0), Ok(0));
    }
}
