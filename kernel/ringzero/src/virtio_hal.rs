//! The kernel side of `virtio-drivers`: DMA memory, device registers, and the host-physical
//! addresses of the buffers the hypervisor's own virtio drivers (`disk`, `net`) hand their
//! devices. One [`DmaHal`] serves every driver.
//!
//! - DMA memory comes from the kernel's frame allocator (zeroed, physically contiguous, reached
//!   through the physical window).
//! - Device registers are the BAR mappings `pci::prepare` made (or a new uncacheable mapping).
//! - A buffer handed to a device is translated through the page tables; only when its pages are
//!   not physically contiguous (e.g. a large stack array) is it copied through a heap bounce
//!   buffer (the heap is one physically contiguous block, so heap buffers never bounce).
//! - Memory a device may still write is never freed: `unshare` (which frees a bounce buffer)
//!   runs only when a request completed. A request abandoned at its deadline (`disk`) is never
//!   unshared, so a bounce buffer it had stays allocated for good. The disk driver keeps its
//!   request buffers on the heap (never bounced) and leaks them on a timeout.

use alloc::alloc::{alloc, dealloc, Layout};
use core::ptr::NonNull;
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

use crate::memory::{self, HostPhysAddr, FRAME_SIZE};
use crate::pci;

/// What `virtio-drivers` needs of the kernel: DMA memory, device registers, and the physical
/// addresses of the buffers it hands the device.
pub struct DmaHal;

/// The host-physical address of `length` bytes at kernel virtual `start` when they are mapped
/// and physically contiguous (checked page by page), else `None`.
fn contiguous_physical(start: u64, length: usize) -> Option<PhysAddr> {
    let (first, _) = memory::translate(start)?;
    let end = start.checked_add(length.max(1) as u64)?;
    let mut page = (start & !(FRAME_SIZE - 1)) + FRAME_SIZE;
    while page < end {
        let (physical, _) = memory::translate(page)?;
        if physical.0 != first.0 + (page - start) {
            return None;
        }
        page += FRAME_SIZE;
    }
    Some(first.0)
}

fn bounce_layout(length: usize) -> Layout {
    Layout::from_size_align(length.max(1), 64).expect("a buffer's length fits a layout")
}

// SAFETY: dma_alloc returns zeroed, page-aligned, physically contiguous frames owned by the
// driver until dma_dealloc; mmio_phys_to_virt returns uncacheable mappings of the device's
// BARs; share returns a physical address the device may access for the buffer's length, valid
// until unshare, which copies back what the device wrote when a bounce buffer was used.
unsafe impl Hal for DmaHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        match memory::allocate_contiguous(pages as u64) {
            Some(first) => {
                let virtual_address = memory::physical_window(first);
                (
                    first.0,
                    NonNull::new(virtual_address).expect("the physical window is not at 0"),
                )
            }
            // `Dma::new` takes a physical address of 0 as the failure.
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, _vaddr: NonNull<u8>, pages: usize) -> i32 {
        for page in 0..pages as u64 {
            memory::free_frame(HostPhysAddr(paddr + page * PAGE_SIZE as u64));
        }
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, size: usize) -> NonNull<u8> {
        let mapped = pci::mapped_registers(paddr, size as u64).or_else(|| {
            memory::map_mmio(HostPhysAddr(paddr), size as u64)
                .map_err(|error| log::error!("virtio: {error}"))
                .ok()
        });
        NonNull::new(mapped.expect("device registers are mappable"))
            .expect("the register window is not at 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, direction: BufferDirection) -> PhysAddr {
        let start = buffer.cast::<u8>().as_ptr() as u64;
        let length = buffer.len();
        if let Some(physical) = contiguous_physical(start, length) {
            return physical;
        }
        let layout = bounce_layout(length);
        // SAFETY: the layout has a non-zero size.
        let bounce = unsafe { alloc(layout) };
        assert!(
            !bounce.is_null(),
            "no heap for a {length}-byte bounce buffer"
        );
        if direction != BufferDirection::DeviceToDriver {
            // SAFETY: the caller's buffer is valid for `length` bytes (the Hal contract) and the
            // bounce buffer was just allocated with that length; they do not overlap.
            unsafe { core::ptr::copy_nonoverlapping(buffer.cast::<u8>().as_ptr(), bounce, length) };
        }
        // The heap is one physically contiguous block inside the physical window.
        contiguous_physical(bounce as u64, length).expect("the heap is mapped contiguously")
    }

    unsafe fn unshare(paddr: PhysAddr, buffer: NonNull<[u8]>, direction: BufferDirection) {
        let start = buffer.cast::<u8>().as_ptr() as u64;
        let length = buffer.len();
        if contiguous_physical(start, length) == Some(paddr) {
            return;
        }
        let bounce = memory::physical_window(HostPhysAddr(paddr));
        if direction != BufferDirection::DriverToDevice {
            // SAFETY: `share` allocated `length` bytes at `paddr` for this buffer and the device
            // is done with them; the caller's buffer is valid for writes of `length` bytes.
            unsafe { core::ptr::copy_nonoverlapping(bounce, buffer.cast::<u8>().as_ptr(), length) };
        }
        // SAFETY: `share` allocated this bounce buffer with the same layout; it is freed once.
        unsafe { dealloc(bounce, bounce_layout(length)) };
    }
}
