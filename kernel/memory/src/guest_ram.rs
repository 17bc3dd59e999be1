//! The guest's RAM: guest-physical `[0, size)`, backed by host frames, one per 4 KiB page.
//!
//! RAM is either backed eagerly ([`GuestRam::new`]: every page has a frame from the start) or
//! lazily ([`GuestRam::new_lazy`]: memory overcommit, "overbooking"): a lazy RAM promises
//! `size` bytes but takes a host frame only when a page is first touched, through
//! [`GuestRam::frame_or_allocate`] (the nested-paging or shadow-paging fault path) or
//! [`GuestRam::write_allocating`] (the hypervisor loading images and building tables). So the
//! VMs on a host may be promised more memory than the host has; a VM that touches a page when
//! the host is exhausted gets [`BackingError::OutOfHostMemory`] and is stopped by its caller.
//!
//! Until a page is backed it reads as zeros, exactly what a fresh (zeroed) frame would hold, so
//! a guest cannot tell a lazy page from an eager one. [`GuestRam::write`] takes `&self` and
//! cannot allocate: it refuses unbacked pages with [`GuestMemoryError::Unbacked`].
//!
//! The frame table is two-level so that a large promise costs little until it is touched: one
//! top-level slot per 2 MiB chunk of guest-physical memory (8 bytes), each pointing to a
//! 512-entry array (4 KiB of heap) that exists only once a page of its chunk is backed. The
//! top-level vector grows on demand up to the highest chunk touched, so an untouched promise
//! costs nothing, a guest that uses 4 GiB costs 16 KiB + 8 MiB (the same as a flat table), and
//! every lookup is two indexings. All heap growth is fallible (`try_reserve`) and reported as
//! [`OutOfHostMemory`], like frame exhaustion.
//!
//! All guest-supplied addresses and lengths are range-checked (overflow-safe) before any host
//! access.

use alloc::boxed::Box;
use alloc::vec::Vec;

use crate::addr::{GuestPhysAddr, HostPhysAddr, PAGE_SHIFT, PAGE_SIZE};
use crate::host::{HostMemory, OutOfHostMemory};

/// A guest-physical access that cannot be done on the guest's RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestMemoryError {
    /// `[address, address + length)` is not inside `[0, size)`.
    OutOfRange {
        /// The first byte of the access.
        address: GuestPhysAddr,
        /// The length of the access in bytes.
        length: u64,
    },
    /// A write through [`GuestRam::write`] reached a page of lazily backed RAM that has no frame
    /// yet; nothing was written. Use [`GuestRam::write_allocating`] where that can happen.
    Unbacked {
        /// The start of the first unbacked page in the range.
        address: GuestPhysAddr,
    },
}

impl core::fmt::Display for GuestMemoryError {
    fn fmt(&self, formatter: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::OutOfRange { address, length } => write!(
                formatter,
                "guest-physical access at {address} of {length} bytes is outside guest RAM"
            ),
            Self::Unbacked { address } => write!(
                formatter,
                "guest-physical page at {address} has no host frame yet"
            ),
        }
    }
}

/// Why a guest page could not be given a host frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackingError {
    /// The address (or part of the range starting there) is not inside `[0, size)`.
    OutOfRange {
        /// The address asked for (the first byte of the range).
        address: GuestPhysAddr,
    },
    /// The host has no frame (or no heap for the frame table) left.
    OutOfHostMemory,
}

impl From<OutOfHostMemory> for BackingError {
    fn from(_: OutOfHostMemory) -> Self {
        Self::OutOfHostMemory
    }
}

impl core::fmt::Display for BackingError {
    fn fmt(&self, formatter: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::OutOfRange { address } => write!(
                formatter,
                "guest-physical address {address} is outside guest RAM"
            ),
            Self::OutOfHostMemory => OutOfHostMemory.fmt(formatter),
        }
    }
}

/// log2 of the pages described by one second-level array of the frame table (2 MiB of RAM).
const CHUNK_SHIFT: u32 = 9;

/// Pages per second-level array.
const PAGES_PER_CHUNK: usize = 1 << CHUNK_SHIFT;

/// Bit 0 of a frame-table entry: the page has a frame, whose 4 KiB-aligned address is the rest
/// of the entry. A tag bit (instead of "0 means unbacked") because host frame 0 is a frame a
/// host allocator may legitimately hand out.
const BACKED: u64 = 1;

/// One second-level array: the entries of 512 consecutive pages.
type Chunk = Box<[u64; PAGES_PER_CHUNK]>;

/// A zeroed (all unbacked) second-level array, or [`OutOfHostMemory`] when the heap is full.
fn new_chunk() -> Result<Chunk, OutOfHostMemory> {
    let mut entries = Vec::new();
    entries
        .try_reserve_exact(PAGES_PER_CHUNK)
        .map_err(|_| OutOfHostMemory)?;
    entries.resize(PAGES_PER_CHUNK, 0u64);
    entries
        .into_boxed_slice()
        .try_into()
        .map_err(|_| OutOfHostMemory)
}

/// The guest's RAM, `[0, size)`: up to one host frame per 4 KiB guest page.
///
/// Owns its frames but cannot free them on drop (that needs the host): call
/// [`GuestRam::release`] when the VM ends, or the frames leak.
pub struct GuestRam {
    /// Pages promised: the RAM is `[0, page_count * 4 KiB)`.
    page_count: u64,
    /// `chunks[c][i]` is the entry of page `c * 512 + i`: `frame | BACKED`, or 0. Slots past the
    /// end, and `None` slots, are pages without a frame.
    chunks: Vec<Option<Chunk>>,
    /// Pages with a frame now.
    backed_pages: u64,
    /// The most pages ever backed at once.
    peak_backed_pages: u64,
}

impl core::fmt::Debug for GuestRam {
    // A summary: the frame table can be megabytes.
    fn fmt(&self, formatter: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        formatter
            .debug_struct("GuestRam")
            .field("promised_pages", &self.page_count)
            .field("backed_pages", &self.backed_pages)
            .field("peak_backed_pages", &self.peak_backed_pages)
            .finish_non_exhaustive()
    }
}

impl GuestRam {
    /// Allocates RAM of `size_bytes`, rounded up to a multiple of 4 KiB (0 gives an empty RAM),
    /// with every page backed now.
    ///
    /// On exhaustion (including a size no host could hold) it frees every frame it took and
    /// returns [`OutOfHostMemory`].
    pub fn new(size_bytes: u64, host: &mut dyn HostMemory) -> Result<GuestRam, OutOfHostMemory> {
        let page_count = size_bytes
            .checked_add(PAGE_SIZE - 1)
            .map(|rounded| rounded >> PAGE_SHIFT)
            .ok_or(OutOfHostMemory)?;
        let mut ram = GuestRam::with_page_count(page_count);
        for page in 0..page_count {
            if ram
                .frame_or_allocate(GuestPhysAddr(page << PAGE_SHIFT), host)
                .is_err()
            {
                ram.release(host);
                return Err(OutOfHostMemory);
            }
        }
        Ok(ram)
    }

    /// RAM of `size_bytes`, rounded up to a multiple of 4 KiB, with no frame allocated yet:
    /// pages are backed on first touch ([`GuestRam::frame_or_allocate`],
    /// [`GuestRam::write_allocating`]). Takes no host frame and no heap.
    ///
    /// A size in the last 4 KiB below 2^64 (which cannot be rounded up) is rounded down to the
    /// last whole page; [`GuestRam::promised_pages`] says what was promised.
    #[must_use]
    pub fn new_lazy(size_bytes: u64) -> GuestRam {
        let page_count = size_bytes
            .checked_add(PAGE_SIZE - 1)
            .map_or(u64::MAX >> PAGE_SHIFT, |rounded| rounded >> PAGE_SHIFT);
        GuestRam::with_page_count(page_count)
    }

    fn with_page_count(page_count: u64) -> GuestRam {
        GuestRam {
            page_count,
            chunks: Vec::new(),
            backed_pages: 0,
            peak_backed_pages: 0,
        }
    }

    /// The size of the RAM in bytes (a multiple of 4 KiB): what was promised, backed or not.
    #[must_use]
    pub fn size(&self) -> u64 {
        self.page_count << PAGE_SHIFT
    }

    /// The number of 4 KiB pages promised (saturating at `usize::MAX`; see
    /// [`GuestRam::promised_pages`] for the exact `u64`).
    #[must_use]
    pub fn page_count(&self) -> usize {
        usize::try_from(self.page_count).unwrap_or(usize::MAX)
    }

    /// Pages promised: `size() / 4 KiB`.
    #[must_use]
    pub fn promised_pages(&self) -> u64 {
        self.page_count
    }

    /// Pages that have a host frame now (all of them for eager RAM).
    #[must_use]
    pub fn backed_pages(&self) -> u64 {
        self.backed_pages
    }

    /// The most pages this RAM ever had backed at once (never more than the promise). Frames are
    /// only given back by [`GuestRam::release`], which consumes the RAM, so today this equals
    /// [`GuestRam::backed_pages`]; it stays the high-water mark once pages can be reclaimed.
    #[must_use]
    pub fn peak_backed_pages(&self) -> u64 {
        self.peak_backed_pages
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

    /// The frame-table entry of page number `page` (0 when unbacked or past the table).
    fn entry(&self, page: u64) -> u64 {
        let Ok(chunk) = usize::try_from(page >> CHUNK_SHIFT) else {
            return 0;
        };
        match self.chunks.get(chunk) {
            Some(Some(entries)) => entries[page as usize % PAGES_PER_CHUNK],
            _ => 0,
        }
    }

    /// Records `frame` as the frame of page number `page` (which must be unbacked), growing the
    /// table as needed. Heap exhaustion leaves the RAM as it was.
    fn store(&mut self, page: u64, frame: HostPhysAddr) -> Result<(), OutOfHostMemory> {
        let chunk = usize::try_from(page >> CHUNK_SHIFT).map_err(|_| OutOfHostMemory)?;
        if chunk >= self.chunks.len() {
            let needed = chunk - self.chunks.len() + 1;
            self.chunks
                .try_reserve(needed)
                .map_err(|_| OutOfHostMemory)?;
            self.chunks.resize_with(chunk + 1, || None);
        }
        let slot = &mut self.chunks[chunk];
        if slot.is_none() {
            *slot = Some(new_chunk()?);
        }
        if let Some(entries) = slot {
            entries[page as usize % PAGES_PER_CHUNK] = frame.align_down().0 | BACKED;
        }
        self.backed_pages += 1;
        self.peak_backed_pages = self.peak_backed_pages.max(self.backed_pages);
        Ok(())
    }

    /// The page number of `address`, or `None` outside the RAM.
    fn page_of(&self, address: GuestPhysAddr) -> Option<u64> {
        let page = address.page_number();
        (page < self.page_count).then_some(page)
    }

    /// The host frame backing the guest page that holds `address`, or `None` outside the RAM
    /// and for a page of lazy RAM that has no frame yet.
    #[must_use]
    pub fn host_frame(&self, address: GuestPhysAddr) -> Option<HostPhysAddr> {
        let entry = self.entry(self.page_of(address)?);
        (entry & BACKED != 0).then_some(HostPhysAddr(entry & !(PAGE_SIZE - 1)))
    }

    /// Whether the page holding `address` has a frame (false outside the RAM).
    #[must_use]
    pub fn is_backed(&self, address: GuestPhysAddr) -> bool {
        self.host_frame(address).is_some()
    }

    /// The frame backing the page of `address`; on the first touch of a page of lazy RAM a
    /// zeroed frame is taken from `host` (the [`HostMemory::allocate_frame`] contract) and kept
    /// until [`GuestRam::release`].
    ///
    /// Errors: [`BackingError::OutOfRange`] when `address` is not inside the RAM,
    /// [`BackingError::OutOfHostMemory`] when the host has no frame (or heap) left; the RAM is
    /// unchanged then, so every page backed before keeps its frame and contents.
    pub fn frame_or_allocate(
        &mut self,
        address: GuestPhysAddr,
        host: &mut dyn HostMemory,
    ) -> Result<HostPhysAddr, BackingError> {
        let page = self
            .page_of(address)
            .ok_or(BackingError::OutOfRange { address })?;
        if let Some(frame) = self.host_frame(address) {
            return Ok(frame);
        }
        let frame = host.allocate_frame().ok_or(OutOfHostMemory)?;
        if let Err(error) = self.store(page, frame) {
            host.free_frame(frame);
            return Err(error.into());
        }
        Ok(frame.align_down())
    }

    /// The page numbers of the pages `[address, address + length)` touches (`length > 0`, range
    /// already checked).
    fn pages_of_range(address: GuestPhysAddr, length: u64) -> core::ops::RangeInclusive<u64> {
        address.page_number()..=((address.0 + (length - 1)) >> PAGE_SHIFT)
    }

    /// Checks the range, then calls `visit(frame, start, end)` for each piece of
    /// `[address, address + length)` that lies in one page, where `frame` is the host address of
    /// the piece (`None` on an unbacked page) and `start..end` is the piece's place in the
    /// caller's buffer. The loop runs once per page touched.
    fn for_each_piece(
        &self,
        address: GuestPhysAddr,
        length: usize,
        mut visit: impl FnMut(Option<HostPhysAddr>, usize, usize),
    ) -> Result<(), GuestMemoryError> {
        if !self.contains(address, length as u64) {
            return Err(GuestMemoryError::OutOfRange {
                address,
                length: length as u64,
            });
        }
        let mut done = 0usize;
        while done < length {
            // In range: contains() proved address + length <= size.
            let current = GuestPhysAddr(address.0 + done as u64);
            let frame = self.host_frame(current);
            let room_in_page = (PAGE_SIZE - current.page_offset()) as usize;
            let piece = room_in_page.min(length - done);
            visit(
                frame.map(|frame| HostPhysAddr(frame.0 + current.page_offset())),
                done,
                done + piece,
            );
            done += piece;
        }
        Ok(())
    }

    /// Reads `buffer.len()` bytes at `address`; the range may cross pages. Unbacked pages read
    /// as zeros and stay unbacked.
    pub fn read(
        &self,
        host: &dyn HostMemory,
        address: GuestPhysAddr,
        buffer: &mut [u8],
    ) -> Result<(), GuestMemoryError> {
        self.for_each_piece(
            address,
            buffer.len(),
            |host_address, start, end| match host_address {
                Some(host_address) => host.read(host_address, &mut buffer[start..end]),
                None => buffer[start..end].fill(0),
            },
        )
    }

    /// Writes `bytes` at `address`; the range may cross pages. Nothing is written when the
    /// range is not entirely inside the RAM ([`GuestMemoryError::OutOfRange`]) or touches a page
    /// that has no frame yet ([`GuestMemoryError::Unbacked`]: this method cannot allocate).
    /// Callers that may write to unbacked pages of lazy RAM use [`GuestRam::write_allocating`].
    pub fn write(
        &self,
        host: &mut dyn HostMemory,
        address: GuestPhysAddr,
        bytes: &[u8],
    ) -> Result<(), GuestMemoryError> {
        if !bytes.is_empty() && self.contains(address, bytes.len() as u64) {
            for page in Self::pages_of_range(address, bytes.len() as u64) {
                if self.entry(page) & BACKED == 0 {
                    return Err(GuestMemoryError::Unbacked {
                        address: GuestPhysAddr(page << PAGE_SHIFT),
                    });
                }
            }
        }
        self.for_each_piece(address, bytes.len(), |host_address, start, end| {
            // Every page was checked to be backed above.
            if let Some(host_address) = host_address {
                host.write(host_address, &bytes[start..end]);
            }
        })
    }

    /// Writes `bytes` at `address`, first giving a frame to every page of the range that has
    /// none (the hypervisor loading images and building tables in lazy RAM); the range may
    /// cross pages.
    ///
    /// Nothing is written on error. [`BackingError::OutOfRange`] (with `address`) when the range
    /// is not entirely inside the RAM: nothing is allocated either.
    /// [`BackingError::OutOfHostMemory`] when a frame is missing: pages of the range backed
    /// before the failure keep their (zeroed) frames, which reads cannot tell from unbacked
    /// pages; [`GuestRam::release`] frees them with the rest.
    pub fn write_allocating(
        &mut self,
        host: &mut dyn HostMemory,
        address: GuestPhysAddr,
        bytes: &[u8],
    ) -> Result<(), BackingError> {
        if !self.contains(address, bytes.len() as u64) {
            return Err(BackingError::OutOfRange { address });
        }
        if bytes.is_empty() {
            return Ok(());
        }
        for page in Self::pages_of_range(address, bytes.len() as u64) {
            self.frame_or_allocate(GuestPhysAddr(page << PAGE_SHIFT), host)?;
        }
        // Every page is backed now, so this cannot fail.
        self.write(host, address, bytes)
            .map_err(|_| BackingError::OutOfRange { address })
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

    /// Writes a little-endian `u64` at `address` (any alignment); backed pages only, like
    /// [`GuestRam::write`].
    pub fn write_u64(
        &self,
        host: &mut dyn HostMemory,
        address: GuestPhysAddr,
        value: u64,
    ) -> Result<(), GuestMemoryError> {
        self.write(host, address, &value.to_le_bytes())
    }

    /// Writes a little-endian `u32` at `address` (any alignment); backed pages only, like
    /// [`GuestRam::write`].
    pub fn write_u32(
        &self,
        host: &mut dyn HostMemory,
        address: GuestPhysAddr,
        value: u32,
    ) -> Result<(), GuestMemoryError> {
        self.write(host, address, &value.to_le_bytes())
    }

    /// Every backed page in ascending order, as (start of the guest page, its host frame). Skips
    /// untouched 2 MiB chunks whole, so the cost follows what is backed, not the promise.
    pub fn backed_frames(&self) -> impl Iterator<Item = (GuestPhysAddr, HostPhysAddr)> + '_ {
        self.chunks
            .iter()
            .enumerate()
            .filter_map(|(chunk, entries)| entries.as_ref().map(|entries| (chunk, entries)))
            .flat_map(|(chunk, entries)| {
                entries
                    .iter()
                    .enumerate()
                    .filter(|(_, entry)| **entry & BACKED != 0)
                    .map(move |(index, entry)| {
                        let page = ((chunk as u64) << CHUNK_SHIFT) | index as u64;
                        (
                            GuestPhysAddr(page << PAGE_SHIFT),
                            HostPhysAddr(entry & !(PAGE_SIZE - 1)),
                        )
                    })
            })
    }

    /// Gives every backed frame back to the host (unbacked pages have none to give).
    pub fn release(self, host: &mut dyn HostMemory) {
        for (_, frame) in self.backed_frames() {
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

    const GIB: u64 = 1 << 30;

    #[test]
    fn lazy_ram_promises_more_than_the_host_has() {
        let mut host = FakeHostMemory::with_frame_limit(16);
        let mut ram = GuestRam::new_lazy(GIB);
        assert_eq!(ram.size(), GIB);
        assert_eq!(ram.promised_pages(), GIB / PAGE_SIZE);
        assert_eq!(ram.backed_pages(), 0);
        assert_eq!(host.allocated_frames(), 0);

        // Sixteen pages spread over the whole gibibyte (different 2 MiB chunks) each get a
        // frame, holding what was written.
        let pages: Vec<GuestPhysAddr> = (0..17)
            .map(|n| GuestPhysAddr((n * (GIB / 17)) & !(PAGE_SIZE - 1)))
            .collect();
        for (n, page) in pages[..16].iter().enumerate() {
            assert!(!ram.is_backed(*page));
            let frame = ram.frame_or_allocate(*page, &mut host).unwrap();
            assert!(ram.is_backed(*page));
            assert_eq!(ram.host_frame(*page), Some(frame));
            // A second touch returns the same frame and allocates nothing.
            assert_eq!(
                ram.frame_or_allocate(GuestPhysAddr(page.0 + 0x123), &mut host),
                Ok(frame)
            );
            ram.write_u64(&mut host, GuestPhysAddr(page.0 + 8), n as u64 + 1)
                .unwrap();
        }
        assert_eq!(host.allocated_frames(), 16);
        assert_eq!(ram.backed_pages(), 16);

        // The seventeenth frame does not exist; the RAM is unchanged.
        assert_eq!(
            ram.frame_or_allocate(pages[16], &mut host),
            Err(BackingError::OutOfHostMemory)
        );
        assert!(!ram.is_backed(pages[16]));
        assert_eq!(ram.backed_pages(), 16);
        assert_eq!(ram.peak_backed_pages(), 16);
        for (n, page) in pages[..16].iter().enumerate() {
            assert_eq!(
                ram.read_u64(&host, GuestPhysAddr(page.0 + 8)),
                Ok(n as u64 + 1)
            );
        }
        ram.release(&mut host);
        assert_eq!(host.allocated_frames(), 0);
        assert_eq!(host.total_frees(), 16);
    }

    #[test]
    fn untouched_pages_read_as_zeros_and_stay_unbacked() {
        let mut host = FakeHostMemory::new();
        let mut ram = GuestRam::new_lazy(8 * PAGE_SIZE);
        ram.write_allocating(&mut host, GuestPhysAddr(2 * PAGE_SIZE + 10), &[7; 4])
            .unwrap();
        assert_eq!(host.allocated_frames(), 1);

        // A read spanning unbacked page 1, backed page 2 and unbacked page 3.
        let mut buffer = vec![0xffu8; 2 * PAGE_SIZE as usize + 2];
        ram.read(&host, GuestPhysAddr(PAGE_SIZE * 3 / 2), &mut buffer)
            .unwrap();
        let mut expected = vec![0u8; buffer.len()];
        let seven_at = (PAGE_SIZE / 2 + 10) as usize;
        expected[seven_at..seven_at + 4].fill(7);
        assert_eq!(buffer, expected);
        assert_eq!(ram.read_u64(&host, GuestPhysAddr(7 * PAGE_SIZE)), Ok(0));
        assert_eq!(ram.host_frame(GuestPhysAddr(PAGE_SIZE)), None);
        assert_eq!(host.allocated_frames(), 1);
        assert_eq!(ram.backed_pages(), 1);

        // Reads outside the RAM are still errors.
        assert!(ram
            .read_u32(&host, GuestPhysAddr(8 * PAGE_SIZE - 2))
            .is_err());
        ram.release(&mut host);
        assert_eq!(host.allocated_frames(), 0);
    }

    #[test]
    fn plain_write_refuses_unbacked_pages_and_writes_nothing() {
        let mut host = FakeHostMemory::new();
        let mut ram = GuestRam::new_lazy(4 * PAGE_SIZE);
        let frame = ram
            .frame_or_allocate(GuestPhysAddr(PAGE_SIZE), &mut host)
            .unwrap();
        ram.write(&mut host, GuestPhysAddr(PAGE_SIZE + 4), &[1, 2])
            .unwrap();
        // Crosses from backed page 1 into unbacked page 2: refused as a whole.
        assert_eq!(
            ram.write_u64(&mut host, GuestPhysAddr(2 * PAGE_SIZE - 4), u64::MAX),
            Err(GuestMemoryError::Unbacked {
                address: GuestPhysAddr(2 * PAGE_SIZE)
            })
        );
        let mut tail = [0u8; 4];
        host.read(HostPhysAddr(frame.0 + PAGE_SIZE - 4), &mut tail);
        assert_eq!(tail, [0; 4]);
        assert!(!ram.is_backed(GuestPhysAddr(2 * PAGE_SIZE)));
        // Out of range wins over unbacked, and zero-length writes need no frame.
        assert!(matches!(
            ram.write(&mut host, GuestPhysAddr(4 * PAGE_SIZE - 1), &[0; 2]),
            Err(GuestMemoryError::OutOfRange { .. })
        ));
        ram.write(&mut host, GuestPhysAddr(3 * PAGE_SIZE), &[])
            .unwrap();
        assert_eq!(
            ram.read_u32(&host, GuestPhysAddr(PAGE_SIZE + 4)),
            Ok(0x0201)
        );
        ram.release(&mut host);
        assert_eq!(host.allocated_frames(), 0);
    }

    #[test]
    fn write_allocating_backs_exactly_the_pages_it_touches() {
        let mut host = FakeHostMemory::new();
        let mut ram = GuestRam::new_lazy(64 * PAGE_SIZE);
        // From the end of page 9 across pages 10 and 11 into page 12.
        let bytes: Vec<u8> = (0..(2 * PAGE_SIZE + 300))
            .map(|i| (i % 253) as u8)
            .collect();
        let start = GuestPhysAddr(10 * PAGE_SIZE - 100);
        ram.write_allocating(&mut host, start, &bytes).unwrap();
        assert_eq!(ram.backed_pages(), 4);
        assert_eq!(host.allocated_frames(), 4);
        for page in 0..64 {
            assert_eq!(
                ram.is_backed(GuestPhysAddr(page * PAGE_SIZE)),
                (9..=12).contains(&page),
                "page {page}"
            );
        }
        let mut back = vec![0u8; bytes.len()];
        ram.read(&host, start, &mut back).unwrap();
        assert_eq!(back, bytes);

        // Writing again over backed pages, plus one more, allocates only the new one.
        ram.write_allocating(&mut host, GuestPhysAddr(12 * PAGE_SIZE), &[0xee; 4097])
            .unwrap();
        assert_eq!(ram.backed_pages(), 5);
        assert_eq!(
            ram.read_u32(&host, start),
            Ok(u32::from_le_bytes([0, 1, 2, 3]))
        );
        // Now the plain write works there too.
        ram.write_u32(&mut host, GuestPhysAddr(13 * PAGE_SIZE), 5)
            .unwrap();

        // Out of range: nothing allocated, nothing written.
        assert_eq!(
            ram.write_allocating(&mut host, GuestPhysAddr(63 * PAGE_SIZE), &[1; 4097]),
            Err(BackingError::OutOfRange {
                address: GuestPhysAddr(63 * PAGE_SIZE)
            })
        );
        assert_eq!(
            ram.write_allocating(&mut host, GuestPhysAddr(u64::MAX), &[1]),
            Err(BackingError::OutOfRange {
                address: GuestPhysAddr(u64::MAX)
            })
        );
        assert!(!ram.is_backed(GuestPhysAddr(63 * PAGE_SIZE)));
        ram.write_allocating(&mut host, GuestPhysAddr(64 * PAGE_SIZE), &[])
            .unwrap();
        assert_eq!(ram.backed_pages(), 5);
        ram.release(&mut host);
        assert_eq!(host.allocated_frames(), 0);
    }

    #[test]
    fn write_allocating_on_exhaustion_writes_nothing() {
        let mut host = FakeHostMemory::with_frame_limit(2);
        let mut ram = GuestRam::new_lazy(16 * PAGE_SIZE);
        ram.write_allocating(&mut host, GuestPhysAddr(0), &[9; 8])
            .unwrap();
        // Needs pages 0 (backed), 1 and 2: page 2 cannot be backed.
        assert_eq!(
            ram.write_allocating(&mut host, GuestPhysAddr(4), &[1; 2 * PAGE_SIZE as usize]),
            Err(BackingError::OutOfHostMemory)
        );
        assert_eq!(
            ram.read_u64(&host, GuestPhysAddr(0)),
            Ok(0x0909_0909_0909_0909)
        );
        assert_eq!(ram.read_u64(&host, GuestPhysAddr(PAGE_SIZE)), Ok(0));
        assert!(!ram.is_backed(GuestPhysAddr(2 * PAGE_SIZE)));
        assert_eq!(ram.backed_pages(), host.allocated_frames() as u64);
        ram.release(&mut host);
        assert_eq!(host.allocated_frames(), 0);
    }

    #[test]
    fn counters_follow_what_is_backed() {
        let mut host = FakeHostMemory::new();
        let mut ram = GuestRam::new_lazy(3 * PAGE_SIZE + 1);
        assert_eq!(ram.promised_pages(), 4);
        assert_eq!(ram.page_count(), 4);
        assert_eq!((ram.backed_pages(), ram.peak_backed_pages()), (0, 0));
        ram.frame_or_allocate(GuestPhysAddr(3 * PAGE_SIZE), &mut host)
            .unwrap();
        ram.frame_or_allocate(GuestPhysAddr(3 * PAGE_SIZE + 5), &mut host)
            .unwrap();
        ram.frame_or_allocate(GuestPhysAddr(0), &mut host).unwrap();
        assert_eq!((ram.backed_pages(), ram.peak_backed_pages()), (2, 2));
        assert_eq!(
            ram.frame_or_allocate(GuestPhysAddr(4 * PAGE_SIZE), &mut host),
            Err(BackingError::OutOfRange {
                address: GuestPhysAddr(4 * PAGE_SIZE)
            })
        );
        assert_eq!(ram.backed_pages(), 2);
        let backed: Vec<GuestPhysAddr> = ram.backed_frames().map(|(page, _)| page).collect();
        assert_eq!(backed, [GuestPhysAddr(0), GuestPhysAddr(3 * PAGE_SIZE)]);
        ram.release(&mut host);
        assert_eq!(host.allocated_frames(), 0);

        // Eager RAM: everything backed from the start.
        let eager = GuestRam::new(5 * PAGE_SIZE, &mut host).unwrap();
        assert_eq!(
            (
                eager.promised_pages(),
                eager.backed_pages(),
                eager.peak_backed_pages()
            ),
            (5, 5, 5)
        );
        assert_eq!(eager.backed_frames().count(), 5);
        eager.release(&mut host);
        assert_eq!(host.allocated_frames(), 0);
    }

    #[test]
    fn release_frees_exactly_the_backed_frames() {
        let mut host = FakeHostMemory::new();
        let mut ram = GuestRam::new_lazy(4 * GIB);
        let touched = [0, 5 * PAGE_SIZE, 2 << 20, GIB + 0x1234, 4 * GIB - 1];
        let mut frames = Vec::new();
        for address in touched {
            frames.push(
                ram.frame_or_allocate(GuestPhysAddr(address), &mut host)
                    .unwrap(),
            );
        }
        assert_eq!(ram.backed_pages(), 5);
        assert_eq!(host.allocated_frames(), 5);
        // The frame table holds one array per touched 2 MiB chunk (4 here), not per page.
        assert_eq!(ram.chunks.iter().flatten().count(), 4);
        ram.release(&mut host);
        assert_eq!(host.allocated_frames(), 0);
        assert_eq!(host.total_frees(), 5);
        assert!(frames.iter().all(|frame| !host.is_allocated(*frame)));
    }

    #[test]
    fn frame_zero_is_a_valid_backing_frame() {
        // A host whose allocator hands out physical frame 0 first.
        #[derive(Default)]
        struct ZeroFirst {
            next: u64,
        }
        impl HostMemory for ZeroFirst {
            fn read(&self, _: HostPhysAddr, buffer: &mut [u8]) {
                buffer.fill(0);
            }
            fn write(&mut self, _: HostPhysAddr, _: &[u8]) {}
            fn allocate_frame(&mut self) -> Option<HostPhysAddr> {
                let frame = HostPhysAddr(self.next);
                self.next += PAGE_SIZE;
                Some(frame)
            }
            fn free_frame(&mut self, _: HostPhysAddr) {}
        }
        let mut host = ZeroFirst::default();
        let mut ram = GuestRam::new_lazy(2 * PAGE_SIZE);
        assert_eq!(
            ram.frame_or_allocate(GuestPhysAddr(PAGE_SIZE), &mut host),
            Ok(HostPhysAddr(0))
        );
        assert!(ram.is_backed(GuestPhysAddr(PAGE_SIZE)));
        assert_eq!(
            ram.host_frame(GuestPhysAddr(PAGE_SIZE)),
            Some(HostPhysAddr(0))
        );
        assert!(!ram.is_backed(GuestPhysAddr(0)));
    }

    #[test]
    fn absurd_lazy_promises_cost_nothing_until_touched() {
        let ram = GuestRam::new_lazy(u64::MAX);
        assert_eq!(ram.promised_pages(), u64::MAX >> PAGE_SHIFT);
        assert_eq!(ram.size(), !(PAGE_SIZE - 1));
        assert!(!ram.is_backed(GuestPhysAddr(u64::MAX - PAGE_SIZE)));
        assert_eq!(
            ram.read_u64(&FakeHostMemory::new(), GuestPhysAddr(1 << 50)),
            Ok(0)
        );
        let empty = GuestRam::new_lazy(0);
        assert_eq!(empty.size(), 0);
        assert!(!empty.is_backed(GuestPhysAddr(0)));
        let mut host = FakeHostMemory::new();
        let mut empty = empty;
        assert_eq!(
            empty.frame_or_allocate(GuestPhysAddr(0), &mut host),
            Err(BackingError::OutOfRange {
                address: GuestPhysAddr(0)
            })
        );
    }

    proptest::proptest! {
        /// Lazy RAM behaves like a plain byte array that starts zeroed, whatever the order of
        /// allocating writes, plain writes and reads, and backs only the pages written.
        #[test]
        fn lazy_ram_matches_a_zeroed_byte_array(
            operations in proptest::collection::vec(
                (0u8..3, 0u64..(6 * PAGE_SIZE), 0usize..9000, proptest::num::u8::ANY),
                1..24,
            )
        ) {
            let mut host = FakeHostMemory::new();
            let mut ram = GuestRam::new_lazy(5 * PAGE_SIZE);
            let mut model = vec![0u8; 5 * PAGE_SIZE as usize];
            let mut written = [false; 5];
            for (kind, offset, length, seed) in operations {
                let bytes: Vec<u8> = (0..length).map(|i| seed.wrapping_add(i as u8)).collect();
                let address = GuestPhysAddr(offset);
                let end = offset + bytes.len() as u64;
                let fits = end <= ram.size();
                match kind {
                    0 => {
                        let result = ram.write_allocating(&mut host, address, &bytes);
                        proptest::prop_assert_eq!(result.is_ok(), fits);
                        if fits {
                            model[offset as usize..end as usize].copy_from_slice(&bytes);
                            if !bytes.is_empty() {
                                for page in offset / PAGE_SIZE..=(end - 1) / PAGE_SIZE {
                                    written[page as usize] = true;
                                }
                            }
                        }
                    }
                    1 => {
                        let all_backed = bytes.is_empty()
                            || (offset / PAGE_SIZE..=(end - 1) / PAGE_SIZE)
                                .all(|page| page < 5 && written[page as usize]);
                        let result = ram.write(&mut host, address, &bytes);
                        proptest::prop_assert_eq!(result.is_ok(), fits && all_backed);
                        if fits && all_backed {
                            model[offset as usize..end as usize].copy_from_slice(&bytes);
                        }
                    }
                    _ => {
                        let mut buffer = vec![0xa5u8; bytes.len()];
                        let result = ram.read(&host, address, &mut buffer);
                        proptest::prop_assert_eq!(result.is_ok(), fits);
                        if fits {
                            proptest::prop_assert_eq!(&buffer[..], &model[offset as usize..end as usize]);
                        }
                    }
                }
                for (page, written) in written.iter().enumerate() {
                    proptest::prop_assert_eq!(
                        ram.is_backed(GuestPhysAddr(page as u64 * PAGE_SIZE)),
                        *written
                    );
                }
                let backed = written.iter().filter(|written| **written).count();
                proptest::prop_assert_eq!(ram.backed_pages(), backed as u64);
                proptest::prop_assert_eq!(host.allocated_frames(), backed);
            }
            ram.release(&mut host);
            proptest::prop_assert_eq!(host.allocated_frames(), 0);
        }
    }
}
