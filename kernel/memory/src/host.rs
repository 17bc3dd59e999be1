//! How pure code reaches host physical memory: the [`HostMemory`] trait. The kernel implements
//! it with its physical-memory window and frame allocator; tests use [`fake::FakeHostMemory`].

use crate::addr::HostPhysAddr;

/// Access to host physical memory and to the host's frame allocator.
///
/// Addresses passed to `read` and `write` come from frames this crate allocated through
/// `allocate_frame` (guest RAM frames and page-table frames), never from the guest.
pub trait HostMemory {
    /// Reads bytes at a host-physical address (the range stays inside one 4 KiB frame).
    fn read(&self, address: HostPhysAddr, buffer: &mut [u8]);
    /// Writes bytes at a host-physical address (the range stays inside one 4 KiB frame).
    fn write(&mut self, address: HostPhysAddr, bytes: &[u8]);
    /// A zeroed 4 KiB frame, or `None` when host memory is exhausted.
    fn allocate_frame(&mut self) -> Option<HostPhysAddr>;
    /// Gives a frame obtained from [`HostMemory::allocate_frame`] back to the host.
    fn free_frame(&mut self, frame: HostPhysAddr);
}

/// The host has no free frame left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfHostMemory;

impl core::fmt::Display for OutOfHostMemory {
    fn fmt(&self, formatter: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        formatter.write_str("out of host memory")
    }
}

/// A fake host for tests: frames are heap buffers in a `BTreeMap`.
///
/// Always compiled (not `cfg(test)`) so other crates' tests can use it. It is strict on
/// purpose: touching a frame that is not allocated, crossing a frame boundary, or freeing a
/// frame twice panics, because each is a bug in the code under test. Frames are handed out at
/// high, non-adjacent addresses (one unallocated frame between two allocations, starting at
/// 64 GiB) so that confusing guest-physical with host-physical addresses, or assuming frames are
/// contiguous, shows up as a panic or a wrong value instead of passing by accident.
pub mod fake {
    use alloc::boxed::Box;
    use alloc::collections::BTreeMap;

    use super::HostMemory;
    use crate::addr::{HostPhysAddr, PAGE_SIZE};

    /// The first frame address the fake hands out.
    pub const FIRST_FAKE_FRAME: u64 = 0x10_0000_0000;

    /// Distance between two consecutive fake frames (leaves a hole after each one).
    const FRAME_STRIDE: u64 = 2 * PAGE_SIZE;

    /// Host memory simulated with a map of frame address to frame contents.
    #[derive(Debug, Default)]
    pub struct FakeHostMemory {
        frames: BTreeMap<u64, Box<[u8; PAGE_SIZE as usize]>>,
        next_frame: u64,
        frame_limit: Option<usize>,
        total_allocations: usize,
        total_frees: usize,
    }

    impl FakeHostMemory {
        /// A fake host with unlimited frames.
        #[must_use]
        pub fn new() -> Self {
            Self {
                frames: BTreeMap::new(),
                next_frame: FIRST_FAKE_FRAME,
                frame_limit: None,
                total_allocations: 0,
                total_frees: 0,
            }
        }

        /// A fake host that refuses to have more than `limit` frames allocated at once.
        #[must_use]
        pub fn with_frame_limit(limit: usize) -> Self {
            Self {
                frame_limit: Some(limit),
                ..Self::new()
            }
        }

        /// Frames currently allocated (allocations minus frees).
        #[must_use]
        pub fn allocated_frames(&self) -> usize {
            self.frames.len()
        }

        /// Frames that may still be allocated before the limit, or `None` without a limit.
        #[must_use]
        pub fn free_frames(&self) -> Option<usize> {
            self.frame_limit
                .map(|limit| limit.saturating_sub(self.frames.len()))
        }

        /// Successful allocations since creation.
        #[must_use]
        pub fn total_allocations(&self) -> usize {
            self.total_allocations
        }

        /// Frees since creation.
        #[must_use]
        pub fn total_frees(&self) -> usize {
            self.total_frees
        }

        /// Whether `frame` is currently allocated.
        #[must_use]
        pub fn is_allocated(&self, frame: HostPhysAddr) -> bool {
            self.frames.contains_key(&frame.0)
        }

        /// The frame holding `address` and the offset of `address` in it; panics (test fake)
        /// when the range `[address, address + length)` is not inside one allocated frame.
        fn locate(&self, address: HostPhysAddr, length: usize) -> (u64, usize) {
            let frame = address.align_down().0;
            let offset = address.page_offset() as usize;
            assert!(
                offset + length <= PAGE_SIZE as usize,
                "fake host: access at {address} of {length} bytes crosses a frame boundary"
            );
            assert!(
                self.frames.contains_key(&frame),
                "fake host: access at {address} to a frame that is not allocated"
            );
            (frame, offset)
        }
    }

    impl HostMemory for FakeHostMemory {
        fn read(&self, address: HostPhysAddr, buffer: &mut [u8]) {
            let (frame, offset) = self.locate(address, buffer.len());
            let contents = &self.frames[&frame];
            buffer.copy_from_slice(&contents[offset..offset + buffer.len()]);
        }

        fn write(&mut self, address: HostPhysAddr, bytes: &[u8]) {
            let (frame, offset) = self.locate(address, bytes.len());
            if let Some(contents) = self.frames.get_mut(&frame) {
                contents[offset..offset + bytes.len()].copy_from_slice(bytes);
            }
        }

        fn allocate_frame(&mut self) -> Option<HostPhysAddr> {
            if self
                .frame_limit
                .is_some_and(|limit| self.frames.len() >= limit)
            {
                return None;
            }
            let frame = self.next_frame;
            self.next_frame = self.next_frame.checked_add(FRAME_STRIDE)?;
            self.frames.insert(frame, Box::new([0; PAGE_SIZE as usize]));
            self.total_allocations += 1;
            Some(HostPhysAddr(frame))
        }

        fn free_frame(&mut self, frame: HostPhysAddr) {
            assert!(
                self.frames.remove(&frame.0).is_some(),
                "fake host: freeing {frame}, which is not an allocated frame"
            );
            self.total_frees += 1;
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn frames_are_zeroed_distinct_and_counted() {
            let mut host = FakeHostMemory::new();
            let first = host.allocate_frame().unwrap();
            let second = host.allocate_frame().unwrap();
            assert_ne!(first, second);
            assert!(first.is_page_aligned() && second.is_page_aligned());
            assert_eq!(host.allocated_frames(), 2);

            let mut buffer = [0xffu8; 16];
            host.read(HostPhysAddr(first.0 + 100), &mut buffer);
            assert_eq!(buffer, [0; 16]);

            host.write(HostPhysAddr(second.0 + 4090), &[1, 2, 3, 4, 5, 6]);
            let mut back = [0u8; 6];
            host.read(HostPhysAddr(second.0 + 4090), &mut back);
            assert_eq!(back, [1, 2, 3, 4, 5, 6]);

            host.free_frame(first);
            host.free_frame(second);
            assert_eq!(host.allocated_frames(), 0);
            assert_eq!(host.total_allocations(), 2);
            assert_eq!(host.total_frees(), 2);
        }

        #[test]
        fn frame_limit_simulates_exhaustion() {
            let mut host = FakeHostMemory::with_frame_limit(2);
            let first = host.allocate_frame().unwrap();
            assert!(host.allocate_frame().is_some());
            assert_eq!(host.allocate_frame(), None);
            assert_eq!(host.free_frames(), Some(0));
            host.free_frame(first);
            assert!(host.allocate_frame().is_some());
        }

        #[test]
        #[should_panic(expected = "crosses a frame boundary")]
        fn crossing_a_frame_panics() {
            let mut host = FakeHostMemory::new();
            let frame = host.allocate_frame().unwrap();
            host.write(HostPhysAddr(frame.0 + 4095), &[1, 2]);
        }

        #[test]
        #[should_panic(expected = "not an allocated frame")]
        fn double_free_panics() {
            let mut host = FakeHostMemory::new();
            let frame = host.allocate_frame().unwrap();
            host.free_frame(frame);
            host.free_frame(frame);
        }
    }
}
