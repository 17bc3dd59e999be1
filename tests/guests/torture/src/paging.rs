//! torture's own 4-level page tables: a bump allocator of zeroed table frames (4-8 MiB) and of
//! data frames (8-16 MiB), entry access through the identity map, address spaces that share one
//! identity map of RAM (2 MiB pages, supervisor) and have their own test region, a software
//! walker (what the hardware should do), and the memory model behind the read-back check.
//!
//! See: Intel SDM Vol 3A 4.5 (4-level paging, entry formats in tables 4-15 to 4-20).

use crate::cpu::Global;
use crate::trap::fatal;

pub const PRESENT: u64 = 1 << 0;
pub const WRITABLE: u64 = 1 << 1;
pub const USER: u64 = 1 << 2;
pub const ACCESSED: u64 = 1 << 5;
pub const DIRTY: u64 = 1 << 6;
pub const HUGE: u64 = 1 << 7;
pub const NO_EXECUTE: u64 = 1 << 63;
pub const ADDRESS: u64 = 0x000F_FFFF_FFFF_F000;
/// Upper levels: everything allowed; the leaf (or a test-modified upper entry) decides.
pub const TABLE: u64 = PRESENT | WRITABLE | USER;

pub const PAGE: u64 = 4096;
pub const LARGE: u64 = 0x20_0000;
pub const HUGE_PAGE: u64 = 0x4000_0000;

const TABLES_START: u64 = 0x40_0000;
const TABLES_END: u64 = 0x80_0000;
const FRAMES_START: u64 = 0x80_0000;
const FRAMES_END: u64 = 0x100_0000;

static NEXT_TABLE: Global<u64> = Global::new(TABLES_START);
static NEXT_FRAME: Global<u64> = Global::new(FRAMES_START);

/// Reads a u64 at a physical address through the identity map.
pub fn physical_read(address: u64) -> u64 {
    // SAFETY: the callers pass 8-byte-aligned addresses inside RAM, which every address space of
    // torture (and the boot tables) maps identity.
    unsafe { core::ptr::read_volatile(address as *const u64) }
}

/// Writes a u64 at a physical address through the identity map (and keeps the model current).
pub fn physical_write(address: u64, value: u64) {
    // SAFETY: as for `physical_read`; the callers only write frames torture allocated.
    unsafe { core::ptr::write_volatile(address as *mut u64, value) };
    model_update(address, value);
}

/// Writes a u64 at a physical address of a fresh frame (never in the model).
fn raw_write(address: u64, value: u64) {
    // SAFETY: as for `physical_write`.
    unsafe { core::ptr::write_volatile(address as *mut u64, value) };
}

/// A zeroed 4 KiB frame for a paging structure.
pub fn allocate_table() -> u64 {
    let frame = NEXT_TABLE.get();
    if frame >= TABLES_END {
        fatal(format_args!("out of page-table frames"));
    }
    NEXT_TABLE.set(frame + PAGE);
    for offset in (0..PAGE).step_by(8) {
        raw_write(frame + offset, 0);
    }
    frame
}

/// The pattern a data frame is filled with: word i of frame F holds pattern(F, i).
pub fn pattern(frame: u64, index: u64) -> u64 {
    (frame << 16) ^ (index.wrapping_mul(0x9E37_79B9_7F4A_7C15)) ^ 0x5151_0000_0000_0000
}

/// A 4 KiB data frame filled with `pattern(frame, i)`.
pub fn allocate_frame() -> u64 {
    let frame = NEXT_FRAME.get();
    if frame >= FRAMES_END {
        fatal(format_args!("out of data frames"));
    }
    NEXT_FRAME.set(frame + PAGE);
    for index in 0..PAGE / 8 {
        raw_write(frame + 8 * index, pattern(frame, index));
    }
    frame
}

/// Index of `address` in the table of `level` (4 = PML4 ... 1 = page table).
pub fn index(address: u64, level: u32) -> u64 {
    (address >> (12 + 9 * (level - 1))) & 0x1FF
}

/// Physical address of entry `index` of `table`.
pub fn entry_address(table: u64, index: u64) -> u64 {
    table + 8 * index
}

pub fn entry(table: u64, index: u64) -> u64 {
    physical_read(entry_address(table, index))
}

pub fn set_entry(table: u64, index: u64, value: u64) {
    // SAFETY: a paging-structure entry of ours, identity-mapped. Not in the model (the CPU
    // itself writes A/D bits into these).
    unsafe { core::ptr::write_volatile(entry_address(table, index) as *mut u64, value) };
}

/// An address space: its PML4 (the CR3 value).
#[derive(Clone, Copy)]
pub struct Space {
    pub pml4: u64,
}

/// The shared identity map of [0, memory) rounded down to 2 MiB: a PDPT whose page directories
/// hold supervisor, writable 2 MiB pages. Returns the PDPT.
pub fn identity_map(memory: u64) -> u64 {
    let pdpt = allocate_table();
    let mut directory = 0;
    for large in 0..memory / LARGE {
        let address = large * LARGE;
        if address.is_multiple_of(HUGE_PAGE) {
            directory = allocate_table();
            set_entry(pdpt, index(address, 3), directory | TABLE);
        }
        set_entry(
            directory,
            index(address, 2),
            address | PRESENT | WRITABLE | HUGE,
        );
    }
    pdpt
}

impl Space {
    /// A new space whose PML4 slot 0 is the shared identity map.
    pub fn new(identity_pdpt: u64) -> Self {
        let pml4 = allocate_table();
        set_entry(pml4, 0, identity_pdpt | TABLE);
        Space { pml4 }
    }

    /// The physical address of the entry for `address` at `level` (4 = PML4E ... 1 = PTE),
    /// creating missing tables (flags TABLE) on the way down.
    pub fn entry_for(&self, address: u64, level: u32) -> u64 {
        let mut table = self.pml4;
        for current in (level + 1..=4).rev() {
            let slot = index(address, current);
            let mut value = entry(table, slot);
            if value & PRESENT == 0 {
                let next = allocate_table();
                value = next | TABLE;
                set_entry(table, slot, value);
            }
            if value & HUGE != 0 && current < 4 {
                fatal(format_args!(
                    "entry_for {:#x}: a large page is in the way",
                    address
                ));
            }
            table = value & ADDRESS;
        }
        entry_address(table, index(address, level))
    }

    /// Maps the 4 KiB page at `address` to `frame` with `flags` (not the frame's address bits).
    pub fn map(&self, address: u64, frame: u64, flags: u64) {
        write_entry(self.entry_for(address, 1), frame | flags);
    }
}

/// Reads a paging entry by its physical address.
pub fn read_entry(entry: u64) -> u64 {
    physical_read(entry)
}

/// Writes a paging entry by its physical address.
pub fn write_entry(entry: u64, value: u64) {
    // SAFETY: `entry` is a paging-structure entry of ours, identity-mapped.
    unsafe { core::ptr::write_volatile(entry as *mut u64, value) };
}

/// The CPU's physical-address width (CPUID 0x80000008 EAX[7:0]); address bits at and above it
/// are reserved in paging entries.
pub static MAXPHYADDR: Global<u32> = Global::new(52);

/// What the hardware should make of `address` under `cr3`: the physical address, or None when
/// the walk meets a not-present entry or
/// one with a reserved address bit set. Follows 1 GiB and 2 MiB pages.
pub fn translate(cr3: u64, address: u64) -> Option<u64> {
    let mut table = cr3 & ADDRESS;
    let reserved = ADDRESS & !((1u64 << MAXPHYADDR.get()) - 1);
    for level in (1..=4).rev() {
        let value = entry(table, index(address, level));
        if value & PRESENT == 0 || value & reserved != 0 {
            return None;
        }
        let size = 1u64 << (12 + 9 * (level - 1));
        if level == 1 || (level < 4 && value & HUGE != 0) {
            return Some((value & ADDRESS & !(size - 1)) | (address & (size - 1)));
        }
        table = value & ADDRESS;
    }
    None
}

// ---- the memory model: what every test write left in physical memory ---------------------

const MODEL: usize = 1024;
static MODEL_ADDRESSES: Global<[u64; MODEL]> = Global::new([u64::MAX; MODEL]);
static MODEL_VALUES: Global<[u64; MODEL]> = Global::new([0; MODEL]);
static MODEL_LENGTH: Global<usize> = Global::new(0);
/// Wrapping sum of every value written by a test write (through a test mapping or ring 3).
pub static WRITE_SUM: Global<u64> = Global::new(0);

fn model_slot(address: u64) -> Option<usize> {
    // SAFETY: one CPU; no other reference to the model is live.
    let addresses = unsafe { &*MODEL_ADDRESSES.pointer() };
    addresses[..MODEL_LENGTH.get()]
        .iter()
        .position(|&a| a == address)
}

/// Records a test write that should have reached physical `address`.
pub fn model_record(address: u64, value: u64) {
    WRITE_SUM.set(WRITE_SUM.get().wrapping_add(value));
    let slot = match model_slot(address) {
        Some(slot) => slot,
        None => {
            let slot = MODEL_LENGTH.get();
            if slot == MODEL {
                fatal(format_args!("memory model full"));
            }
            MODEL_LENGTH.set(slot + 1);
            slot
        }
    };
    // SAFETY: as in `model_slot`.
    unsafe {
        (*MODEL_ADDRESSES.pointer())[slot] = address;
        (*MODEL_VALUES.pointer())[slot] = value;
    }
}

/// A direct (identity) write over a recorded address keeps the model current.
fn model_update(address: u64, value: u64) {
    if let Some(slot) = model_slot(address) {
        // SAFETY: as in `model_slot`.
        unsafe { (*MODEL_VALUES.pointer())[slot] = value };
    }
}

/// Every (physical address, expected value) of the model.
pub fn model() -> impl Iterator<Item = (u64, u64)> {
    // SAFETY: as in `model_slot`; the iterator is consumed before the model changes again.
    let (addresses, values) = unsafe { (&*MODEL_ADDRESSES.pointer(), &*MODEL_VALUES.pointer()) };
    let length = MODEL_LENGTH.get();
    addresses[..length]
        .iter()
        .copied()
        .zip(values[..length].iter().copied())
}
