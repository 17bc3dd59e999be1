//! The guest's RAM: guest-physical `[0, size)`, backed by host frames, one per 4 KiB page.
//!
//! Frames are allocated eagerly today; a later change makes them lazy, so every lookup of the
//! frame behind a guest page goes through [`GuestRam::host_frame`]. All guest-supplied
//! addresses and lengths are range-checked (overflow-safe) before any host access.

use alloc::vec::Vec;

use crate::addr::{GuestPhysAddr, HostPhysAddr, PAGE_SHIFT, PAGE_SIZE};
use crate::host::{HostMemory, OutOfHostMemory};

/// A guest-physical access that falls (partly) outside the guest's RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestMemoryError {
    /// `[address, address + length)` is not inside `[0, size)`.
    OutOfRange {
        /// The first byte of the access.
        address: GuestPhysAddr,
        /// The length of the access in bytes.
        length: u64,
    },
}

impl core::fmt::Display for GuestMemoryError {
    fn fmt(&self, formatter: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::OutOfRange { address, length } => write!(
                formatter,
                "guest-physical access at {address} of {length} bytes is outside guest RAM"
            ),
        }
    }
}

/// The guest's RAM, `[0, size)`, one host frame per 4 KiB guest page.
///
/// Owns its frames but cannot free them on drop (that needs the host): call
/// [`GuestRam::release`] when the VM ends, or the frames leak.
#[derive(Debug)]
pub struct GuestRam {
    /// `frames[n]` backs guest-physical page `n`.
    frames: Vec<HostPhysAddr>,
}

impl GuestRam {
    /// Allocates RAM of `size_bytes`, rounded up to a multiple of 4 KiB (0 gives an empty RAM).
    ///
    /// On exhaustion (including a size no host could hold) it frees every frame it took and
    /// returns [`OutOfHostMemory`].
    pub fn new(size_bytes: u64, host: &mut dyn HostMemory) -> Result<GuestRam, OutOfHostMemory> {
        let page_count = size_bytes
            .checked_add(PAGE_SIZE - 1)
            .map(|rounded| rounded >> PAGE_SHIFT)
            .and_then(|pages| usize::try_from(pages).ok())
            .ok_or(OutOfHostMemory)?;
        let mut frames = Vec::new();
        frames
            .try_reserve_exact(page_count)
            .map_err(|_| OutOfHostMemory)?;
        for _ in 0..page_count {
            match host.allocate_frame() {
                Some(frame) => frames.push(frame),
                None => {
                    for frame in frames {
                        host.free_frame(frame);
                    }
                    return Err(OutOfHostMemory);
                }
            }
        }
        Ok(GuestRam { frames })
    }

    /// The size of the RAM in bytes (a multiple of 4 KiB).
    #[must_use]
    pub fn size(&self) -> u64 {
        (self.frames.len() as u64) << PAGE_SHIFT
    }

    /// The number of 4 KiB pages.
    #[must_use]
    pub fn page_count(&self) -> usize {
        self.frames.len()
    }

    /// Whether `[address, address + length)` lies inside the RAM (overflow-safe). A zero-length
    /// range is inside when `address <= size`.
    #[must_use]
    pub fn contains(&self, address: GuestPhysAddr, length: u64) -> bool {
        address
            .0
            .checked_add(length)
            .is_some_and(|end| end <= self.size())
    }

    /// The host frame backing the guest page that holds `address`, or `None` outside the RAM.
    #[must_use]
    pub fn host_frame(&self, address: GuestPhysAddr) -> Option<HostPhysAddr> {
        let page = usize::try_from(address.page_number()).ok()?;
        self.frames.get(page).copied()
    }

    /// Checks the range, then calls `visit(host_address, start, end)` for each piece of
    /// `[address, address + length)` that lies in one page, where `start..end` is the piece's
    /// place in the caller's buffer. The loop runs once per page touched.
    fn for_each_piece(
        &self,
        address: GuestPhysAddr,
        length: usize,
        mut visit: impl FnMut(HostPhysAddr, usize, usize),
    ) -> Result<(), GuestMemoryError> {
        let out_of_range = GuestMemoryError::OutOfRange {
            address,
            length: length as u64,
        };
        if !self.contains(address, length as u64) {
            return Err(out_of_range);
        }
        let mut done = 0usize;
        while done < length {
            // In range: contains() proved address + length <= size.
            let current = GuestPhysAddr(address.0 + done as u64);
            let frame = self.host_frame(current).ok_or(out_of_range)?;
            let room_in_page = (PAGE_SIZE - current.page_offset()) as usize;
            let piece = room_in_page.min(length - done);
            visit(
                HostPhysAddr(frame.0 + current.page_offset()),
                done,
                done + piece,
            );
            done += piece;
        }
        Ok(())
    }

    /// Reads `buffer.len()` bytes at `address`; the range may cross pages.
    pub fn read(
        &self,
        host: &dyn HostMemory,
        address: GuestPhysAddr,
        buffer: &mut [u8],
    ) -> Result<(), GuestMemoryError> {
        self.for_each_piece(address, buffer.len(), |host_address, start, end| {
            host.read(host_address, &mut buffer[start..end]);
        })
    }

    /// Writes `bytes` at `address`; the range may cross pages. Nothing is written when the
    /// range is not entirely inside the RAM.
    pub fn write(
        &self,
        host: &mut dyn HostMemory,
        address: GuestPhysAddr,
        bytes: &[u8],
    ) -> Result<(), GuestMemoryError> {
        self.for_each_piece(address, bytes.len(), |host_address, start, end| {
            host.write(host_address, &bytes[start..end]);
        })
    }

    /// Reads a little-endian `u64` at `address` (any alignment).
    pub fn read_u64(
        &self,
        host: &dyn HostMemory,
        address: GuestPhysAddr,
    ) -> Result<u64, GuestMemoryError> {
        let mut bytes = [0u8; 8];
        self.read(host, address, &mut bytes)?;
        Ok(u64::from_le_bytes(bytes))
    }

    /// Reads a little-endian `u32` at `address` (any alignment).
    pub fn read_u32(
        &self,
        host: &dyn HostMemory,
        address: GuestPhysAddr,
    ) -> Result<u32, GuestMemoryError> {
        let mut bytes = [0u8; 4];
        self.read(host, address, &mut bytes)?;
        Ok(u32::from_le_bytes(bytes))
    }

    /// Writes a little-endian `u64` at `address` (any alignment).
    pub fn write_u64(
        &self,
        host: &mut dyn HostMemory,
        address: GuestPhysAddr,
        value: u64,
    ) -> Result<(), GuestMemoryError> {
        self.write(host, address, &value.to_le_bytes())
    }

    /// Writes a little-endian `u32` at `address` (any alignment).
    pub fn write_u32(
        &self,
        host: &mut dyn HostMemory,
        address: GuestPhysAddr,
        value: u32,
    ) -> Result<(), GuestMemoryError> {
        self.write(host, address, &value.to_le_bytes())
    }

    /// Gives every frame back to the host.
    pub fn release(self, host: &mut dyn HostMemory) {
        for frame in self.frames {
            host.free_frame(frame);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fake::FakeHostMemory;

    #[test]
    fn new_allocates_one_frame_per_page_and_rounds_up() {
        let mut host = FakeHostMemory::new();
        let ram = GuestRam::new(3 * PAGE_SIZE + 1, &mut host).unwrap();
        assert_eq!(ram.size(), 4 * PAGE_SIZE);
        assert_eq!(ram.page_count(), 4);
        assert_eq!(host.allocated_frames(), 4);
        ram.release(&mut host);
        assert_eq!(host.allocated_frames(), 0);
    }

    #[test]
    fn empty_ram_contains_nothing() {
        let mut host = FakeHostMemory::new();
        let ram = GuestRam::new(0, &mut host).unwrap();
        assert_eq!(ram.size(), 0);
        assert!(!ram.contains(GuestPhysAddr(0), 1));
        assert_eq!(ram.host_frame(GuestPhysAddr(0)), None);
        assert_eq!(ram.read_u32(&host, GuestPhysAddr(0)).ok(), None);
    }

    #[test]
    fn frames_are_distinct_and_looked_up_by_page() {
        let mut host = FakeHostMemory::new();
        let ram = GuestRam::new(8 * PAGE_SIZE, &mut host).unwrap();
        let mut seen = Vec::new();
        for page in 0..8 {
            let frame = ram.host_frame(GuestPhysAddr(page * PAGE_SIZE)).unwrap();
            assert_eq!(
                ram.host_frame(GuestPhysAddr(page * PAGE_SIZE + 0xfff)),
                Some(frame)
            );
            assert!(!seen.contains(&frame));
            seen.push(frame);
        }
        assert_eq!(ram.host_frame(GuestPhysAddr(8 * PAGE_SIZE)), None);
        assert_eq!(ram.host_frame(GuestPhysAddr(u64::MAX)), None);
        ram.release(&mut host);
    }

    #[test]
    fn read_and_write_across_page_boundaries() {
        let mut host = FakeHostMemory::new();
        let ram = GuestRam::new(4 * PAGE_SIZE, &mut host).unwrap();
        // Spans the end of page 0, all of pages 1 and 2, and the start of page 3.
        let bytes: Vec<u8> = (0..(2 * PAGE_SIZE + 200))
            .map(|i| (i % 251) as u8)
            .collect();
        let start = GuestPhysAddr(PAGE_SIZE - 100);
        ram.write(&mut host, start, &bytes).unwrap();
        let mut back = vec![0u8; bytes.len()];
        ram.read(&host, start, &mut back).unwrap();
        assert_eq!(back, bytes);

        // Each piece landed in the frame of its own page.
        let mut byte = [0u8; 1];
        host.read(
            HostPhysAddr(ram.host_frame(GuestPhysAddr(0)).unwrap().0 + PAGE_SIZE - 100),
            &mut byte,
        );
        assert_eq!(byte[0], bytes[0]);
        host.read(ram.host_frame(GuestPhysAddr(PAGE_SIZE)).unwrap(), &mut byte);
        assert_eq!(byte[0], bytes[100]);
        host.read(
            ram.host_frame(GuestPhysAddr(3 * PAGE_SIZE)).unwrap(),
            &mut byte,
        );
        assert_eq!(byte[0], bytes[(2 * PAGE_SIZE + 100) as usize]);
        ram.release(&mut host);
    }

    #[test]
    fn integers_are_little_endian_and_may_straddle_pages() {
        let mut host = FakeHostMemory::new();
        let ram = GuestRam::new(2 * PAGE_SIZE, &mut host).unwrap();
        let straddling = GuestPhysAddr(PAGE_SIZE - 3);
        ram.write_u64(&mut host, straddling, 0x0807_0605_0403_0201)
            .unwrap();
        let mut bytes = [0u8; 8];
        ram.read(&host, straddling, &mut bytes).unwrap();
        assert_eq!(bytes, [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(
            ram.read_u64(&host, straddling).unwrap(),
            0x0807_0605_0403_0201
        );
        ram.write_u32(&mut host, GuestPhysAddr(0x10), 0xdead_beef)
            .unwrap();
        assert_eq!(
            ram.read_u32(&host, GuestPhysAddr(0x10)).unwrap(),
            0xdead_beef
        );
        assert_eq!(
            ram.read_u64(&host, GuestPhysAddr(0x10)).unwrap(),
            0xdead_beef
        );
        ram.release(&mut host);
    }

    #[test]
    fn out_of_range_accesses_are_errors_and_touch_nothing() {
        let mut host = FakeHostMemory::new();
        let ram = GuestRam::new(2 * PAGE_SIZE, &mut host).unwrap();
        let size = ram.size();
        assert!(ram.contains(GuestPhysAddr(0), size));
        assert!(ram.contains(GuestPhysAddr(size), 0));
        assert!(!ram.contains(GuestPhysAddr(size - 1), 2));
        assert!(!ram.contains(GuestPhysAddr(u64::MAX), 2));
        assert!(!ram.contains(GuestPhysAddr(1), u64::MAX));

        let mut buffer = [0u8; 8];
        assert_eq!(
            ram.read(&host, GuestPhysAddr(size - 4), &mut buffer),
            Err(GuestMemoryError::OutOfRange {
                address: GuestPhysAddr(size - 4),
                length: 8
            })
        );
        assert_eq!(
            ram.read_u64(&host, GuestPhysAddr(u64::MAX - 3)),
            Err(GuestMemoryError::OutOfRange {
                address: GuestPhysAddr(u64::MAX - 3),
                length: 8
            })
        );
        // A failed write leaves the in-range part untouched.
        assert!(ram
            .write(&mut host, GuestPhysAddr(size - 4), &[0xaa; 8])
            .is_err());
        assert_eq!(ram.read_u32(&host, GuestPhysAddr(size - 4)).unwrap(), 0);
        // Zero-length accesses at the end are fine.
        ram.read(&host, GuestPhysAddr(size), &mut []).unwrap();
        ram.release(&mut host);
    }

    #[test]
    fn exhaustion_frees_everything_it_took() {
        let mut host = FakeHostMemory::with_frame_limit(5);
        assert_eq!(
            GuestRam::new(6 * PAGE_SIZE, &mut host).unwrap_err(),
            OutOfHostMemory
        );
        assert_eq!(host.allocated_frames(), 0);
        assert_eq!(host.total_allocations(), 5);
        assert_eq!(host.total_frees(), 5);
        // Exactly at the limit works.
        let ram = GuestRam::new(5 * PAGE_SIZE, &mut host).unwrap();
        assert_eq!(host.allocated_frames(), 5);
        ram.release(&mut host);
        assert_eq!(host.allocated_frames(), 0);
    }

    #[test]
    fn absurd_sizes_fail_without_panicking() {
        let mut host = FakeHostMemory::with_frame_limit(4);
        assert_eq!(
            GuestRam::new(u64::MAX, &mut host).unwrap_err(),
            OutOfHostMemory
        );
        assert_eq!(
            GuestRam::new(u64::MAX - PAGE_SIZE * 4, &mut host).unwrap_err(),
            OutOfHostMemory
        );
        assert_eq!(host.allocated_frames(), 0);
    }
}
