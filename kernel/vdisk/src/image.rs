//! [`ImageDisk`]: a VM's disk held in RAM, made from an image file the host tool packed into
//! the boot bundle. Read-only images are used in place (borrowed from the bundle, no copy);
//! a writable image is a private copy whose changes last until power-off.
//!
//! Sizes: an image must be a whole number of sectors. That is refused at build time by
//! `boot/` (naming the file) and again here, rather than padded with zeros: a padded disk
//! would be larger than the file the user gave, and writes to the padding would look like
//! they land in the file. An empty image is a disk of 0 sectors (every access but a
//! zero-length one is out of range); `boot/` refuses empty images too.

use crate::{check_range, serial_from_text, BlockDevice, DiskError, SECTOR_SIZE};
use alloc::vec::Vec;

enum Bytes {
    /// Read-only: the bundle's bytes in place.
    Borrowed(&'static [u8]),
    /// A writable copy (or any owned bytes).
    Owned(Vec<u8>),
}

/// A RAM-backed disk.
pub struct ImageDisk {
    bytes: Bytes,
    writable: bool,
    serial: [u8; 20],
}

impl ImageDisk {
    /// A read-only disk over `bytes` (the bundle's, used in place). `name` (e.g. the image's
    /// file name) becomes the serial, cut to 20 bytes. [`DiskError::Unaligned`] if the length
    /// is not a whole number of sectors.
    pub fn read_only(bytes: &'static [u8], name: &str) -> Result<Self, DiskError> {
        Self::checked(Bytes::Borrowed(bytes), false, name)
    }

    /// A writable disk over a private copy of `bytes`; the copy's changes are lost at
    /// power-off. [`DiskError::Unaligned`] as for [`ImageDisk::read_only`].
    pub fn writable_copy(bytes: &[u8], name: &str) -> Result<Self, DiskError> {
        if !bytes.len().is_multiple_of(SECTOR_SIZE) {
            return Err(DiskError::Unaligned);
        }
        Self::checked(Bytes::Owned(bytes.to_vec()), true, name)
    }

    /// A disk over owned bytes (tests; or a kernel that copies every image).
    pub fn from_vec(bytes: Vec<u8>, writable: bool, name: &str) -> Result<Self, DiskError> {
        Self::checked(Bytes::Owned(bytes), writable, name)
    }

    fn checked(bytes: Bytes, writable: bool, name: &str) -> Result<Self, DiskError> {
        let disk = ImageDisk {
            bytes,
            writable,
            serial: serial_from_text(name),
        };
        if !disk.data().len().is_multiple_of(SECTOR_SIZE) {
            return Err(DiskError::Unaligned);
        }
        Ok(disk)
    }

    fn data(&self) -> &[u8] {
        match &self.bytes {
            Bytes::Borrowed(bytes) => bytes,
            Bytes::Owned(bytes) => bytes,
        }
    }

    /// The byte range of `len` bytes from `first_sector`, checked to lie inside the image.
    fn range(&self, first_sector: u64, len: usize) -> Result<core::ops::Range<usize>, DiskError> {
        check_range(self.sectors(), first_sector, len)?;
        // first_sector * SECTOR_SIZE + len <= data().len(), which is a usize.
        let start = usize::try_from(first_sector)
            .ok()
            .and_then(|sector| sector.checked_mul(SECTOR_SIZE))
            .ok_or(DiskError::OutOfRange)?;
        let end = start.checked_add(len).ok_or(DiskError::OutOfRange)?;
        Ok(start..end)
    }

    /// The disk's bytes (e.g. for a test to see what a guest wrote).
    pub fn bytes(&self) -> &[u8] {
        self.data()
    }
}

impl BlockDevice for ImageDisk {
    fn sectors(&self) -> u64 {
        (self.data().len() / SECTOR_SIZE) as u64
    }

    fn writable(&self) -> bool {
        self.writable
    }

    fn read(&mut self, first_sector: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        let range = self.range(first_sector, buf.len())?;
        buf.copy_from_slice(&self.data()[range]);
        Ok(())
    }

    fn write(&mut self, first_sector: u64, buf: &[u8]) -> Result<(), DiskError> {
        if !self.writable {
            return Err(DiskError::ReadOnly);
        }
        let range = self.range(first_sector, buf.len())?;
        match &mut self.bytes {
            Bytes::Owned(bytes) => {
                bytes[range].copy_from_slice(buf);
                Ok(())
            }
            // Only read_only builds Borrowed, and it is never writable.
            Bytes::Borrowed(_) => Err(DiskError::ReadOnly),
        }
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        // RAM: every completed write is already as durable as it will be.
        Ok(())
    }

    fn serial(&self) -> [u8; 20] {
        self.serial
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static IMAGE: [u8; 4 * SECTOR_SIZE] = {
        let mut bytes = [0u8; 4 * SECTOR_SIZE];
        let mut at = 0;
        while at < bytes.len() {
            bytes[at] = (at / SECTOR_SIZE) as u8 + 1;
            at += 1;
        }
        bytes
    };

    #[test]
    fn read_only_images_are_read_in_place_and_refuse_writes() {
        let mut disk = ImageDisk::read_only(&IMAGE, "readonly.img").unwrap();
        assert_eq!(disk.sectors(), 4);
        assert!(!disk.writable());
        let mut buf = [0u8; 2 * SECTOR_SIZE];
        disk.read(2, &mut buf).unwrap();
        assert_eq!(buf[..SECTOR_SIZE], [3; SECTOR_SIZE]);
        assert_eq!(buf[SECTOR_SIZE..], [4; SECTOR_SIZE]);
        assert_eq!(disk.write(0, &[0; SECTOR_SIZE]), Err(DiskError::ReadOnly));
        assert_eq!(disk.bytes().as_ptr(), IMAGE.as_ptr());
        assert_eq!(&disk.serial()[..13], b"readonly.img\0");
        assert_eq!(disk.flush(), Ok(()));
    }

    #[test]
    fn writable_copies_change_only_the_copy() {
        let mut disk = ImageDisk::writable_copy(&IMAGE, "a-very-long-image-name.img").unwrap();
        assert!(disk.writable());
        disk.write(3, &[9; SECTOR_SIZE]).unwrap();
        let mut sector = [0u8; SECTOR_SIZE];
        disk.read(3, &mut sector).unwrap();
        assert_eq!(sector, [9; SECTOR_SIZE]);
        assert_eq!(IMAGE[3 * SECTOR_SIZE], 4);
        assert_eq!(&disk.serial(), b"a-very-long-image-na");
    }

    #[test]
    fn bounds_and_sizes() {
        let mut disk = ImageDisk::writable_copy(&IMAGE, "x").unwrap();
        let mut sector = [0u8; SECTOR_SIZE];
        assert_eq!(disk.read(4, &mut sector), Err(DiskError::OutOfRange));
        assert_eq!(
            disk.write(3, &[0; 2 * SECTOR_SIZE]),
            Err(DiskError::OutOfRange)
        );
        assert_eq!(disk.read(u64::MAX, &mut sector), Err(DiskError::OutOfRange));
        assert_eq!(
            disk.write(u64::MAX / 512, &[0; SECTOR_SIZE]),
            Err(DiskError::OutOfRange)
        );
        assert_eq!(disk.read(0, &mut [0; 511]), Err(DiskError::Unaligned));
        assert_eq!(disk.read(4, &mut []), Ok(()));
        // Images that are not whole sectors are refused, not padded.
        assert_eq!(
            ImageDisk::read_only(&IMAGE[..1000], "x").err(),
            Some(DiskError::Unaligned)
        );
        assert_eq!(
            ImageDisk::writable_copy(&IMAGE[..1], "x").err(),
            Some(DiskError::Unaligned)
        );
        assert_eq!(
            ImageDisk::from_vec(vec![0; 513], false, "x").err(),
            Some(DiskError::Unaligned)
        );
        let mut empty = ImageDisk::from_vec(Vec::new(), true, "").unwrap();
        assert_eq!(empty.sectors(), 0);
        assert_eq!(empty.read(0, &mut sector), Err(DiskError::OutOfRange));
        assert_eq!(empty.serial(), [0; 20]);
    }
}
