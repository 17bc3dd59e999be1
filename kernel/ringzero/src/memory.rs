//! Host physical memory: a frame allocator fed by the bootloader's memory map, the kernel
//! heap, and the physical-memory window the bootloader maps at a fixed offset.
//!
//! The allocator hands out 4 KiB frames from the usable regions in order (a bump pointer per
//! region) and keeps freed frames on a list threaded through the frames themselves. The heap
//! is one contiguous block carved from the largest usable region before anything else. One
//! usable page below 1 MiB is kept out of the allocator for the application processors'
//! real-mode start-up code (a STARTUP IPI can only point below 1 MiB), see `smp.rs`.

use bootloader_api::info::{MemoryRegionKind, MemoryRegions};
use linked_list_allocator::LockedHeap;
use spin::Mutex;
use x86_64::structures::paging::mapper::{MapToError, MappedFrame, TranslateResult};
use x86_64::structures::paging::{
    FrameAllocator as MapperFrameAllocator, Mapper, OffsetPageTable, Page, PageTable,
    PageTableFlags, PhysFrame, Size4KiB, Translate,
};
use x86_64::{PhysAddr, VirtAddr};

pub use ringzero_memory::HostPhysAddr;

pub const FRAME_SIZE: u64 = 4096;
/// Size of the kernel heap.
const HEAP_SIZE: u64 = 16 * 1024 * 1024;
/// At most this many usable regions are tracked (firmware maps rarely have more than ~40).
const MAX_REGIONS: usize = 128;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

static PHYSICAL_MEMORY_OFFSET: spin::Once<u64> = spin::Once::new();
static AP_STARTUP_PAGE: spin::Once<Option<HostPhysAddr>> = spin::Once::new();

/// Real-mode memory ends at the VGA hole; a STARTUP IPI vector VV names page VV000h, and
/// vectors A0h..BFh are reserved. See: SDM Vol 3A 9.4.4.1, 11.6.1 (start-up IPI).
const REAL_MODE_END: u64 = 0xA_0000;
static FRAMES: Mutex<FrameAllocator> = Mutex::new(FrameAllocator::empty());

struct FrameAllocator {
    /// Usable regions as (first frame, end) host-physical addresses, page-aligned.
    regions: [(u64, u64); MAX_REGIONS],
    region_count: usize,
    current_region: usize,
    next_frame: u64,
    /// Head of the list of freed frames (0 = empty); each holds the address of the next.
    free_list: u64,
    total_frames: u64,
    allocated_frames: u64,
    /// One bit per frame below the end of the highest region: set while the frame is handed
    /// out. An allocation of a set frame or a free of a clear one is a bug that would let two
    /// owners share a frame (a guest page over a VMCB, say): it stops the hypervisor at once,
    /// naming the frame, instead of corrupting memory silently.
    in_use: &'static mut [u64],
}

impl FrameAllocator {
    const fn empty() -> Self {
        FrameAllocator {
            regions: [(0, 0); MAX_REGIONS],
            region_count: 0,
            current_region: 0,
            next_frame: 0,
            free_list: 0,
            total_frames: 0,
            allocated_frames: 0,
            in_use: &mut [],
        }
    }

    /// Marks `frame` handed out (`taken`) or returned; panics when it already was.
    fn claim(&mut self, frame: u64, taken: bool) {
        let index = (frame / FRAME_SIZE) as usize;
        let Some(word) = self.in_use.get_mut(index / 64) else {
            panic!("memory: frame {frame:#x} is outside every usable region");
        };
        let bit = 1u64 << (index % 64);
        if (*word & bit != 0) == taken {
            if taken {
                panic!("memory: frame {frame:#x} handed out while it is still in use");
            }
            panic!("memory: frame {frame:#x} freed while it is not in use (a double free)");
        }
        *word ^= bit;
    }

    fn allocate(&mut self) -> Option<HostPhysAddr> {
        if self.free_list != 0 {
            let frame = self.free_list;
            self.free_list = read_phys_u64(HostPhysAddr(frame));
            self.allocated_frames += 1;
            self.claim(frame, true);
            return Some(HostPhysAddr(frame));
        }
        while self.current_region < self.region_count {
            let (_, end) = self.regions[self.current_region];
            if self.next_frame + FRAME_SIZE <= end {
                let frame = self.next_frame;
                self.next_frame += FRAME_SIZE;
                self.allocated_frames += 1;
                self.claim(frame, true);
                return Some(HostPhysAddr(frame));
            }
            self.current_region += 1;
            if self.current_region < self.region_count {
                self.next_frame = self.regions[self.current_region].0;
            }
        }
        None
    }

    /// `count` physically contiguous frames from the bump regions (the free list holds single
    /// frames only). Skips to the next region when this one has too little left.
    fn allocate_contiguous(&mut self, count: u64) -> Option<HostPhysAddr> {
        while self.current_region < self.region_count {
            let (_, end) = self.regions[self.current_region];
            if self.next_frame + count * FRAME_SIZE <= end {
                let first = self.next_frame;
                self.next_frame += count * FRAME_SIZE;
                self.allocated_frames += count;
                for frame in 0..count {
                    self.claim(first + frame * FRAME_SIZE, true);
                }
                return Some(HostPhysAddr(first));
            }
            self.current_region += 1;
            if self.current_region < self.region_count {
                self.next_frame = self.regions[self.current_region].0;
            }
        }
        None
    }

    fn free(&mut self, frame: HostPhysAddr) {
        self.claim(frame.0, false);
        write_phys_u64(frame, self.free_list);
        self.free_list = frame.0;
        self.allocated_frames -= 1;
    }
}

/// What [`init`] found, for the boot log.
pub struct MemorySummary {
    pub usable_bytes: u64,
    pub heap_start: HostPhysAddr,
    pub heap_size: u64,
    pub free_frames: u64,
}

/// Sets up the physical window, the heap and the frame allocator from the bootloader's map.
/// Returns `None` when there is no usable region large enough for the heap.
pub fn init(physical_memory_offset: u64, regions: &MemoryRegions) -> Option<MemorySummary> {
    PHYSICAL_MEMORY_OFFSET.call_once(|| physical_memory_offset);
    let usable = || {
        regions
            .iter()
            .filter(|region| region.kind == MemoryRegionKind::Usable)
            .map(|region| {
                let start = region.start.next_multiple_of(FRAME_SIZE);
                let end = region.end & !(FRAME_SIZE - 1);
                (start, end.max(start))
            })
    };
    // Never hand out frame 0: a zero address doubles as "none" in the free list.
    let usable_bytes: u64 = usable().map(|(start, end)| end - start).sum();
    let (heap_region_start, _) = usable()
        .filter(|(start, end)| end - start >= HEAP_SIZE)
        .max_by_key(|(start, end)| end - start)?;

    let heap_virtual = physical_memory_offset + heap_region_start;
    // SAFETY: [heap_region_start, +HEAP_SIZE) is usable RAM that the bootloader maps at
    // physical_memory_offset; it is removed from the frame allocator below, so the heap owns it.
    unsafe {
        HEAP.lock()
            .init(heap_virtual as *mut u8, HEAP_SIZE as usize)
    };

    // The highest usable page below the VGA hole (and above page 0) becomes the start-up page
    // of the other CPUs: the bootloader never allocates below 1 MiB, so it is free, and the
    // top of conventional memory stays clear of the first 64 KiB some firmware scribbles on.
    let startup_page = usable()
        .filter_map(|(start, end)| {
            let top = end.min(REAL_MODE_END);
            (top >= start.max(FRAME_SIZE) + FRAME_SIZE).then(|| top - FRAME_SIZE)
        })
        .max();
    AP_STARTUP_PAGE.call_once(|| startup_page.map(HostPhysAddr));

    let mut frames = FRAMES.lock();
    // A region that starts where the last one ended extends it: UEFI maps split RAM into many
    // adjacent pieces (134 usable ones under OVMF with 1 GiB), more than MAX_REGIONS.
    let mut add = |start: u64, end: u64| {
        if end <= start {
            return;
        }
        let count = frames.region_count;
        if count > 0 && frames.regions[count - 1].1 == start {
            frames.regions[count - 1].1 = end;
            frames.total_frames += (end - start) / FRAME_SIZE;
        } else if count < MAX_REGIONS {
            frames.regions[count] = (start, end);
            frames.region_count += 1;
            frames.total_frames += (end - start) / FRAME_SIZE;
        } else {
            log::warn!(
                "memory: more than {MAX_REGIONS} separate usable regions; {:#x}..{end:#x} left unused",
                start
            );
        }
    };
    for (start, end) in usable() {
        let start = if start == heap_region_start {
            start + HEAP_SIZE
        } else {
            start
        };
        let start = start.max(FRAME_SIZE);
        match startup_page {
            Some(page) if (start..end).contains(&page) => {
                add(start, page);
                add(page + FRAME_SIZE, end);
            }
            _ => add(start, end),
        }
    }
    frames.next_frame = frames.regions[0].0;
    let top = frames.regions[..frames.region_count]
        .iter()
        .map(|&(_, end)| end)
        .max()
        .unwrap_or(0);
    let words = (top / FRAME_SIZE).div_ceil(64) as usize;
    frames.in_use = alloc::vec![0u64; words].leak();
    Some(MemorySummary {
        usable_bytes,
        heap_start: HostPhysAddr(heap_region_start),
        heap_size: HEAP_SIZE,
        free_frames: frames.total_frames,
    })
}

/// The page below 1 MiB kept for the application processors' start-up code (`None` when the
/// memory map has no usable page there). Never handed out by the frame allocator.
pub fn ap_startup_page() -> Option<HostPhysAddr> {
    AP_STARTUP_PAGE.get().copied().flatten()
}

/// Allocates one zeroed 4 KiB frame.
pub fn allocate_frame() -> Option<HostPhysAddr> {
    let frame = FRAMES.lock().allocate()?;
    let window = physical_window(frame);
    // SAFETY: the frame was just taken from the allocator, so nothing else refers to it, and
    // the physical window maps all of RAM writable.
    unsafe { core::ptr::write_bytes(window, 0, FRAME_SIZE as usize) };
    Some(frame)
}

/// Allocates `count` zeroed, physically contiguous frames (for the SVM permission maps).
pub fn allocate_contiguous(count: u64) -> Option<HostPhysAddr> {
    let first = FRAMES.lock().allocate_contiguous(count)?;
    // SAFETY: the frames were just taken from the allocator and the window maps them.
    unsafe { core::ptr::write_bytes(physical_window(first), 0, (count * FRAME_SIZE) as usize) };
    Some(first)
}

/// Frames currently handed out (for the memory statistics).
pub fn allocated_frames() -> u64 {
    FRAMES.lock().allocated_frames
}

/// Test hook: takes a frame and returns it twice; the second free must stop the hypervisor.
pub fn free_twice_for_test() {
    let Some(frame) = allocate_frame() else {
        log::error!("test hook: no frame to free twice");
        return;
    };
    log::warn!("test hook: freeing frame {:#x} twice", frame.0);
    free_frame(frame);
    free_frame(frame);
    log::error!(
        "test hook: the second free of {:#x} was NOT refused",
        frame.0
    );
}

/// Returns a frame to the allocator.
pub fn free_frame(frame: HostPhysAddr) {
    FRAMES.lock().free(frame);
}

/// The hypervisor's virtual address of a host-physical address (through the physical window).
pub fn physical_window(address: HostPhysAddr) -> *mut u8 {
    let offset = *PHYSICAL_MEMORY_OFFSET
        .get()
        .expect("memory::init runs first");
    (offset + address.0) as *mut u8
}

fn read_phys_u64(address: HostPhysAddr) -> u64 {
    // SAFETY: callers pass frames owned by the allocator, mapped by the physical window.
    unsafe { physical_window(address).cast::<u64>().read() }
}

fn write_phys_u64(address: HostPhysAddr, value: u64) {
    // SAFETY: callers pass frames owned by the allocator, mapped by the physical window.
    unsafe { physical_window(address).cast::<u64>().write(value) }
}

/// Reads a word of the hypervisor's own address space if it is mapped (for exception reports,
/// which must not fault again while printing a stack).
pub fn read_kernel_word(address: u64) -> Option<u64> {
    let offset = *PHYSICAL_MEMORY_OFFSET.get()?;
    let virtual_address = VirtAddr::try_new(address).ok()?;
    if !address.is_multiple_of(8) {
        return None;
    }
    let (level_4_frame, _) = x86_64::registers::control::Cr3::read();
    let level_4 = (offset + level_4_frame.start_address().as_u64()) as *mut PageTable;
    // SAFETY: CR3 names the active level-4 table, which the physical window maps; the mapper is
    // only used to translate (read-only walk) and dropped before returning.
    let mapper = unsafe { OffsetPageTable::new(&mut *level_4, VirtAddr::new(offset)) };
    mapper.translate_addr(virtual_address)?;
    // SAFETY: the page holding this aligned word is mapped (translated just above).
    Some(unsafe { (address as *const u64).read_volatile() })
}

/// The frame allocator as the `x86_64` crate's mapper wants it (for new page-table levels).
struct MapperFrames;

// SAFETY: every frame handed out is fresh (taken from the allocator, zeroed) and unused.
unsafe impl MapperFrameAllocator<Size4KiB> for MapperFrames {
    fn allocate_frame(&mut self) -> Option<PhysFrame<Size4KiB>> {
        allocate_frame().map(|frame| PhysFrame::containing_address(PhysAddr::new(frame.0)))
    }
}

/// Runs `f` on the active page tables (CR3), reached through the physical window.
fn with_active_page_table<T>(f: impl FnOnce(&mut OffsetPageTable<'static>) -> T) -> T {
    let offset = *PHYSICAL_MEMORY_OFFSET
        .get()
        .expect("memory::init runs first");
    let (level_4_frame, _) = x86_64::registers::control::Cr3::read();
    let level_4 = (offset + level_4_frame.start_address().as_u64()) as *mut PageTable;
    // SAFETY: CR3 names the active level-4 table, which the physical window maps writable.
    // Only the boot CPU edits the page tables, and only while no other CPU walks the part it
    // changes (the application processors are started one at a time, after the edit).
    let mut mapper = unsafe { OffsetPageTable::new(&mut *level_4, VirtAddr::new(offset)) };
    f(&mut mapper)
}

/// How [`identity_map`] left the page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdentityMapping {
    /// Mapped by this call: [`unmap_identity`] removes it again.
    Added,
    /// Already mapped to itself (left as it was).
    AlreadyThere,
}

/// Maps the 4 KiB page at virtual address `frame` to physical `frame` (present, writable,
/// executable) in the active page tables, for code that runs with paging on at its physical
/// address: the application processors' start-up code.
pub fn identity_map(frame: HostPhysAddr) -> Result<IdentityMapping, alloc::string::String> {
    let page = Page::<Size4KiB>::containing_address(VirtAddr::new(frame.0));
    let physical = PhysFrame::<Size4KiB>::containing_address(PhysAddr::new(frame.0));
    with_active_page_table(|mapper| {
        // SAFETY: the virtual page is in the lower half, where the kernel keeps nothing of its
        // own (the mapping is checked first); the frame is reserved for this use.
        let result = unsafe {
            mapper.map_to(
                page,
                physical,
                PageTableFlags::PRESENT | PageTableFlags::WRITABLE,
                &mut MapperFrames,
            )
        };
        match result {
            Ok(flush) => {
                flush.flush();
                Ok(IdentityMapping::Added)
            }
            Err(MapToError::PageAlreadyMapped(existing)) if existing == physical => {
                Ok(IdentityMapping::AlreadyThere)
            }
            Err(error) => Err(alloc::format!(
                "cannot identity-map {:#x}: {error:?}",
                frame.0
            )),
        }
    })
}

/// Removes a mapping [`identity_map`] added (the page-table levels it created stay).
pub fn unmap_identity(frame: HostPhysAddr) {
    let page = Page::<Size4KiB>::containing_address(VirtAddr::new(frame.0));
    with_active_page_table(|mapper| {
        if let Ok((_, flush)) = mapper.unmap(page) {
            flush.flush();
        }
    });
}

/// The physical address a kernel virtual address maps to, with its leaf flags (`None` when
/// unmapped). For checks such as "does the physical window cover the local APIC".
pub fn translate(address: u64) -> Option<(HostPhysAddr, PageTableFlags)> {
    let virtual_address = VirtAddr::try_new(address).ok()?;
    with_active_page_table(|mapper| match mapper.translate(virtual_address) {
        TranslateResult::Mapped {
            frame,
            offset,
            flags,
        } => {
            let start = match frame {
                MappedFrame::Size4KiB(frame) => frame.start_address(),
                MappedFrame::Size2MiB(frame) => frame.start_address(),
                MappedFrame::Size1GiB(frame) => frame.start_address(),
            };
            Some((HostPhysAddr(start.as_u64() + offset), flags))
        }
        _ => None,
    })
}

/// Where device registers (PCI BARs) are mapped: one level-4 slot (512 GiB) of the upper half
/// that nothing used at the first request, filled upwards page by page. The physical window
/// cannot serve: it maps memory write-back, and only up to the end of the bootloader's memory
/// map (at least 4 GiB), while firmware may place 64-bit BARs anywhere above that.
static MMIO_WINDOW: Mutex<Option<MmioWindow>> = Mutex::new(None);

struct MmioWindow {
    /// The next free virtual address of the slot.
    next: u64,
    end: u64,
}

/// Bytes covered by one level-4 entry. See: SDM Vol 3A 4.5.4 (PML4E maps 512 GiB).
const LEVEL_4_SLOT_BYTES: u64 = 1 << 39;

/// Maps `size` bytes of device registers at host-physical `address` uncacheable (PCD + PWT,
/// strong UC with the power-on PAT) and writable, and returns the kernel virtual address of
/// `address`. Each call maps fresh virtual pages (aliases of the same registers are harmless:
/// all are UC). Meant for boot-time driver set-up on the boot CPU, like [`identity_map`].
/// See: SDM Vol 3A 4.9.2 (PCD/PWT select the memory type), 12.3 (UC for memory-mapped I/O).
pub fn map_mmio(address: HostPhysAddr, size: u64) -> Result<*mut u8, alloc::string::String> {
    let first = address.0 & !(FRAME_SIZE - 1);
    let end = address
        .0
        .checked_add(size.max(1))
        .ok_or_else(|| alloc::format!("MMIO range at {:#x} wraps around", address.0))?
        .next_multiple_of(FRAME_SIZE);
    let length = end - first;
    with_active_page_table(|mapper| {
        let mut window = MMIO_WINDOW.lock();
        if window.is_none() {
            // The upper half is level-4 entries 256..512; the last is left to the kernel's
            // neighbourhood, so the search stops before it.
            let free = (256..511).find(|&index| mapper.level_4_table()[index].is_unused());
            let Some(index) = free else {
                return Err("no free level-4 slot for device registers".into());
            };
            let base = 0xFFFF_0000_0000_0000 | ((index as u64) << 39);
            *window = Some(MmioWindow {
                next: base,
                end: base + LEVEL_4_SLOT_BYTES,
            });
        }
        let window = window.as_mut().expect("set just above");
        if window.end - window.next < length {
            return Err("the device-register window is full".into());
        }
        // Reserved before mapping, so a failure halfway leaves a hole, never a half-used range.
        let virtual_start = window.next;
        window.next += length;
        let flags = PageTableFlags::PRESENT
            | PageTableFlags::WRITABLE
            | PageTableFlags::NO_CACHE
            | PageTableFlags::WRITE_THROUGH;
        for offset in (0..length).step_by(FRAME_SIZE as usize) {
            let page = Page::<Size4KiB>::containing_address(VirtAddr::new(virtual_start + offset));
            let frame = PhysFrame::<Size4KiB>::containing_address(PhysAddr::new(first + offset));
            // SAFETY: the page lies in a level-4 slot that was empty and that only this function
            // fills (moving `next` past what it mapped), so no existing mapping changes; the
            // frame is a device's register range, not RAM the kernel uses, and is mapped
            // uncacheable as device registers must be.
            let result = unsafe { mapper.map_to(page, frame, flags, &mut MapperFrames) };
            match result {
                Ok(flush) => flush.flush(),
                Err(error) => {
                    return Err(alloc::format!(
                        "cannot map device registers at {:#x}: {error:?}",
                        first + offset
                    ))
                }
            }
        }
        Ok((virtual_start + (address.0 - first)) as *mut u8)
    })
}
