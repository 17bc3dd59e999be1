//! The second-level page tables that map guest-physical to host-physical addresses: AMD's
//! nested page tables ([`Npt`]) or Intel's extended page tables ([`Ept`]), built from a
//! [`GuestRam`] and walked with the generic walker of [`crate::page_table`].
//!
//! The two formats are the only vendor-specific thing here; both are described by the one
//! [`PageTableFormat`] trait, so the builder and the walker are shared. The tables live in host
//! frames taken from [`HostMemory`], and map guest RAM with 4 KiB leaves: anything outside RAM
//! is absent, so a guest access there exits to the hypervisor (MMIO).
//!
//! Two ways to fill them: [`NestedPageTables::build`] maps every page of a [`GuestRam`] that has
//! a frame (all of eager RAM; of lazy RAM, what the hypervisor has loaded so far), and
//! [`NestedPageTables::new_empty`] + [`NestedPageTables::map_page`] map pages one at a time, as
//! the nested-page-fault handler backs lazy RAM on first touch (memory overcommit). Intermediate
//! tables are taken on demand either way, so the table cost follows what is mapped.
// Manuals: Intel SDM Vol 3C, chapter 29 "VMX Support for Address Translation" (editions from
//          2023 on, where EPT is 29.3); AMD64 APM Vol 2 (pub. 24593, rev. 3.42) section 15.25
//          "Nested Paging".

use alloc::vec::Vec;

use crate::addr::{GuestPhysAddr, HostPhysAddr};
use crate::guest_ram::GuestRam;
use crate::host::{HostMemory, OutOfHostMemory};
use crate::page_table::{
    level_shift, table_index, walk, LongModeFormat, Mapping, ADDRESS_MASK_64, MAX_LEVELS,
};

pub use crate::page_table::PageTableFormat;

/// Guest-physical addresses a 4-level second-level table can map: bits 47:0.
// See: SDM Vol 3C 29.3.2 (EPT translates bits 47:0 with a 4-level walk); APM Vol 2 15.25.5
pub const MAX_GUEST_PHYSICAL: u64 = 1 << 48;

/// AMD nested page tables: ordinary x86-64 long-mode entries.
///
/// Every nested walk is a user access, so non-leaf and leaf entries alike carry P, RW and US
/// (0x7); NX stays clear so guest code can run.
// See: APM Vol 2 15.25.5 (nested table walk: nested page table accesses are user accesses);
//      APM Vol 2 5.4.1 (long-mode entry fields)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Npt;

impl PageTableFormat for Npt {
    const ENTRY_BYTES: u64 = LongModeFormat::ENTRY_BYTES;
    const INDEX_BITS: u32 = LongModeFormat::INDEX_BITS;

    fn is_present(&self, entry: u64) -> bool {
        LongModeFormat.is_present(entry)
    }
    fn is_leaf(&self, entry: u64, level: u8) -> bool {
        LongModeFormat.is_leaf(entry, level)
    }
    fn has_reserved_bits(&self, entry: u64, level: u8) -> bool {
        LongModeFormat.has_reserved_bits(entry, level)
    }
    fn table_address(&self, entry: u64) -> u64 {
        LongModeFormat.table_address(entry)
    }
    fn leaf_address(&self, entry: u64, level: u8) -> u64 {
        LongModeFormat.leaf_address(entry, level)
    }
    fn table_entry(&self, table: u64) -> u64 {
        // P | RW | US, NX clear. See: APM Vol 2 15.25.5
        LongModeFormat.table_entry(table)
    }
    fn page_entry(&self, frame: u64) -> u64 {
        // P | RW | US, NX clear. See: APM Vol 2 15.25.5
        LongModeFormat.page_entry(frame)
    }
}

/// EPT read access, bit 0.
// See: SDM Vol 3C 29.3.2 (formats of EPT paging-structure entries, bits 2:0)
pub const EPT_READ: u64 = 1 << 0;
/// EPT write access, bit 1.
pub const EPT_WRITE: u64 = 1 << 1;
/// EPT execute access (supervisor-mode execute with mode-based control), bit 2.
pub const EPT_EXECUTE: u64 = 1 << 2;
/// The three access bits together.
pub const EPT_READ_WRITE_EXECUTE: u64 = EPT_READ | EPT_WRITE | EPT_EXECUTE;
/// EPT memory type field of a leaf, bits 5:3.
// See: SDM Vol 3C 29.3.7.2 (memory type used for translated guest-physical addresses)
pub const EPT_MEMORY_TYPE_SHIFT: u32 = 3;
/// Mask of the EPT memory type field.
pub const EPT_MEMORY_TYPE_MASK: u64 = 0b111 << EPT_MEMORY_TYPE_SHIFT;
/// Memory type write-back (6).
// See: SDM Vol 3C 29.3.7.2 (EPT memory type encodings: 0 UC, 1 WC, 4 WT, 5 WP, 6 WB)
pub const EPT_MEMORY_TYPE_WRITE_BACK: u64 = 6;
/// "Ignore PAT memory type", bit 6 of a leaf (left clear: the guest's PAT still applies).
// See: SDM Vol 3C 29.3.7.2
pub const EPT_IGNORE_PAT: u64 = 1 << 6;
/// Large page, bit 7 of an EPT PDPTE (1 GiB) or PDE (2 MiB).
pub const EPT_LARGE_PAGE: u64 = 1 << 7;

/// Intel extended page tables.
///
/// Bits 2:0 grant read, write and execute on every level; an entry is present when any of them
/// is set. Leaves also carry memory type write-back (6) in bits 5:3, with "ignore PAT" clear.
// See: SDM Vol 3C 29.3.2 (EPT translation mechanism, formats of EPT entries);
//      SDM Vol 3C 29.3.7 (EPT and memory typing)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ept;

impl PageTableFormat for Ept {
    const ENTRY_BYTES: u64 = 8;
    const INDEX_BITS: u32 = 9;

    fn is_present(&self, entry: u64) -> bool {
        // Not present when bits 2:0 are all 0. See: SDM Vol 3C 29.3.2
        entry & EPT_READ_WRITE_EXECUTE != 0
    }

    fn is_leaf(&self, entry: u64, level: u8) -> bool {
        // Bit 7 of a PDPTE / PDE maps a 1 GiB / 2 MiB page. See: SDM Vol 3C 29.3.2
        level == 1 || ((level == 2 || level == 3) && entry & EPT_LARGE_PAGE != 0)
    }

    fn has_reserved_bits(&self, entry: u64, level: u8) -> bool {
        // The EPT-misconfiguration conditions a walk can see without knowing the CPU's
        // capabilities. See: SDM Vol 3C 29.3.3.2 (EPT misconfigurations)
        let write_without_read = entry & EPT_WRITE != 0 && entry & EPT_READ == 0;
        if write_without_read {
            return true;
        }
        if self.is_leaf(entry, level) {
            let memory_type = (entry & EPT_MEMORY_TYPE_MASK) >> EPT_MEMORY_TYPE_SHIFT;
            // Types 2, 3 and 7 are reserved. See: SDM Vol 3C 29.3.3.2
            let reserved_type = matches!(memory_type, 2 | 3 | 7);
            // Address bits below a large page's base are reserved.
            // (1 GiB: bits 29:12; 2 MiB: bits 20:12). See: SDM Vol 3C 29.3.2
            let low_address_bits = if level > 1 {
                entry & ADDRESS_MASK_64 & ((1u64 << level_shift::<Self>(level)) - 1)
            } else {
                0
            };
            reserved_type || low_address_bits != 0
        } else {
            // Bits 7:3 of a non-leaf entry are reserved.
            // (bit 7 there is the large-page bit, 0 for a table). See: SDM Vol 3C 29.3.2
            entry & 0xf8 != 0
        }
    }

    fn table_address(&self, entry: u64) -> u64 {
        entry & ADDRESS_MASK_64
    }

    fn leaf_address(&self, entry: u64, level: u8) -> u64 {
        entry & ADDRESS_MASK_64 & !((1u64 << level_shift::<Self>(level)) - 1)
    }

    fn table_entry(&self, table: u64) -> u64 {
        // Bits 2:0 read/write/execute for everything below. See: SDM Vol 3C 29.3.2
        (table & ADDRESS_MASK_64) | EPT_READ_WRITE_EXECUTE
    }

    fn page_entry(&self, frame: u64) -> u64 {
        // See: SDM Vol 3C 29.3.2 (EPT PTE format); SDM Vol 3C 29.3.7.2 (memory type WB, IPAT 0)
        (frame & ADDRESS_MASK_64)
            | EPT_READ_WRITE_EXECUTE
            | (EPT_MEMORY_TYPE_WRITE_BACK << EPT_MEMORY_TYPE_SHIFT)
    }
}

/// Which second-level table format to build (chosen once, from the detected vendor).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NestedFormat {
    /// AMD-V nested page tables: the root goes into the VMCB's N_CR3.
    Npt,
    /// Intel VT-x extended page tables: the root goes into EPTP bits 51:12.
    Ept,
}

/// A set of second-level tables mapping (part of) a guest's RAM.
///
/// Owns its table frames but cannot free them on drop (that needs the host): call
/// [`NestedPageTables::release`] when the VM ends. The frames it maps belong to the
/// [`GuestRam`], not to the tables.
#[derive(Debug)]
pub struct NestedPageTables {
    root: HostPhysAddr,
    format: NestedFormat,
    /// Every table frame, the root first.
    frames: Vec<HostPhysAddr>,
}

impl NestedPageTables {
    /// Maps every page of `ram` that has a frame (4 KiB leaves, read/write/execute): all of
    /// `[0, ram.size())` for eager RAM; for lazy RAM only the pages backed so far (what the
    /// hypervisor loaded with [`GuestRam::write_allocating`]), the rest being mapped later with
    /// [`NestedPageTables::map_page`] as the guest touches them. Nothing outside the RAM is
    /// mapped. Table frames come from `host`; on exhaustion, or for a RAM larger than 4-level
    /// tables can address (2^48 bytes), every frame taken so far is freed and
    /// [`OutOfHostMemory`] returned.
    pub fn build(
        ram: &GuestRam,
        format: NestedFormat,
        host: &mut dyn HostMemory,
    ) -> Result<NestedPageTables, OutOfHostMemory> {
        // A RAM beyond what 4 levels can address cannot be mapped (and no host holds it).
        if ram.size() > MAX_GUEST_PHYSICAL {
            return Err(OutOfHostMemory);
        }
        let mut tables = Self::new_empty(format, host)?;
        for (page, frame) in ram.backed_frames() {
            if let Err(error) = tables.map_page(page, frame, host) {
                tables.release(host);
                return Err(error);
            }
        }
        Ok(tables)
    }

    /// Tables with nothing mapped yet: only the root (PML4) is allocated, so every guest access
    /// exits until [`NestedPageTables::map_page`] maps its page.
    pub fn new_empty(
        format: NestedFormat,
        host: &mut dyn HostMemory,
    ) -> Result<NestedPageTables, OutOfHostMemory> {
        let mut frames = Vec::new();
        let root = allocate_table(host, &mut frames)?;
        Ok(NestedPageTables {
            root,
            format,
            frames,
        })
    }

    /// Maps the 4 KiB guest page holding `address` to `frame` (its 4 KiB-aligned base; low bits
    /// are ignored), read/write/execute, taking any missing intermediate table from `host`.
    ///
    /// A page that is already mapped is remapped to `frame`; the caller must then flush the
    /// vCPUs' cached guest-physical translations (INVEPT, or the VMCB's TLB control) before the
    /// old frame is reused. Filling a not-present entry needs no flush.
    ///
    /// Errors with [`OutOfHostMemory`] when a table frame (or heap for the frame list) is
    /// missing: the page stays unmapped, and intermediate tables already taken stay in place,
    /// empty, freed by [`NestedPageTables::release`]. An `address` of 2^48 or more, which 4-level
    /// tables cannot map, gets the same error (no host backs it either), never an alias.
    // See: SDM Vol 3C 29.4.2 (no guest-physical mappings are cached from EPT entries that are
    //      not present); APM Vol 2 15.16 (TLB control for nested paging)
    pub fn map_page(
        &mut self,
        address: GuestPhysAddr,
        frame: HostPhysAddr,
        host: &mut dyn HostMemory,
    ) -> Result<(), OutOfHostMemory> {
        if address.0 >= MAX_GUEST_PHYSICAL {
            return Err(OutOfHostMemory);
        }
        let page = address.align_down();
        match self.format {
            NestedFormat::Npt => map_page(&Npt, host, &mut self.frames, self.root, page, frame),
            NestedFormat::Ept => map_page(&Ept, host, &mut self.frames, self.root, page, frame),
        }
    }

    /// The top-level table (PML4). NPT: goes into the VMCB's N_CR3; EPT: EPTP bits 51:12.
    // See: APM Vol 2 15.25.3 (N_CR3); SDM Vol 3C 25.6.11 (EPTP)
    #[must_use]
    pub fn root(&self) -> HostPhysAddr {
        self.root
    }

    /// The format of the tables.
    #[must_use]
    pub fn format(&self) -> NestedFormat {
        self.format
    }

    /// Walks the tables like the hardware would, or `None` where the guest-physical address is
    /// unmapped (outside RAM, or a page not mapped yet).
    #[must_use]
    pub fn translate(&self, host: &dyn HostMemory, address: GuestPhysAddr) -> Option<HostPhysAddr> {
        let mapping = self.walk(host, address)?;
        Some(HostPhysAddr(mapping.physical_address(address.0)))
    }

    /// The raw leaf entry that maps `address` (diagnostics and tests), or `None` if unmapped.
    #[must_use]
    pub fn leaf_entry(&self, host: &dyn HostMemory, address: GuestPhysAddr) -> Option<u64> {
        Some(self.walk(host, address)?.entry)
    }

    fn walk(&self, host: &dyn HostMemory, address: GuestPhysAddr) -> Option<Mapping> {
        if address.0 >= MAX_GUEST_PHYSICAL {
            return None;
        }
        let read = |_table: u64, entry_address: u64| -> Result<u64, ()> {
            Ok(read_entry(host, HostPhysAddr(entry_address)))
        };
        match self.format {
            NestedFormat::Npt => walk(&Npt, self.root.0, MAX_LEVELS, address.0, read).ok(),
            NestedFormat::Ept => walk(&Ept, self.root.0, MAX_LEVELS, address.0, read).ok(),
        }
    }

    /// The number of table frames, the root included.
    #[must_use]
    pub fn table_frames(&self) -> usize {
        self.frames.len()
    }

    /// Gives every table frame back to the host. The guest RAM frames are not touched.
    pub fn release(self, host: &mut dyn HostMemory) {
        for frame in self.frames {
            host.free_frame(frame);
        }
    }
}

/// Takes a zeroed frame for a table and records it in `frames`.
fn allocate_table(
    host: &mut dyn HostMemory,
    frames: &mut Vec<HostPhysAddr>,
) -> Result<HostPhysAddr, OutOfHostMemory> {
    frames.try_reserve(1).map_err(|_| OutOfHostMemory)?;
    let frame = host.allocate_frame().ok_or(OutOfHostMemory)?;
    frames.push(frame);
    Ok(frame)
}

fn read_entry(host: &dyn HostMemory, address: HostPhysAddr) -> u64 {
    let mut bytes = [0u8; 8];
    host.read(address, &mut bytes);
    u64::from_le_bytes(bytes)
}

fn write_entry(host: &mut dyn HostMemory, address: HostPhysAddr, entry: u64) {
    host.write(address, &entry.to_le_bytes());
}

/// Maps the 4 KiB guest page at `page` to `frame`, creating missing tables on the way down.
/// Only 4 KiB leaves are ever written, so every present entry above level 1 is a table.
fn map_page<F: PageTableFormat>(
    format: &F,
    host: &mut dyn HostMemory,
    frames: &mut Vec<HostPhysAddr>,
    root: HostPhysAddr,
    page: GuestPhysAddr,
    frame: HostPhysAddr,
) -> Result<(), OutOfHostMemory> {
    let mut table = root;
    for level in (2..=MAX_LEVELS).rev() {
        let entry_address =
            HostPhysAddr(table.0 + table_index::<F>(page.0, level) * F::ENTRY_BYTES);
        let entry = read_entry(host, entry_address);
        table = if format.is_present(entry) {
            HostPhysAddr(format.table_address(entry))
        } else {
            let next = allocate_table(host, frames)?;
            write_entry(host, entry_address, format.table_entry(next.0));
            next
        };
    }
    let leaf_address = HostPhysAddr(table.0 + table_index::<F>(page.0, 1) * F::ENTRY_BYTES);
    write_entry(host, leaf_address, format.page_entry(frame.0));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::PAGE_SIZE;
    use crate::host::fake::FakeHostMemory;

    const FORMATS: [NestedFormat; 2] = [NestedFormat::Npt, NestedFormat::Ept];

    /// Builds tables for `size` bytes of RAM and checks every page and the first addresses past
    /// the end; returns the number of table frames.
    fn build_and_check(size: u64, format: NestedFormat) -> usize {
        let mut host = FakeHostMemory::new();
        let ram = GuestRam::new(size, &mut host).unwrap();
        let ram_frames = host.allocated_frames();
        let tables = NestedPageTables::build(&ram, format, &mut host).unwrap();
        assert_eq!(tables.format(), format);
        assert_eq!(host.allocated_frames(), ram_frames + tables.table_frames());
        assert!(host.is_allocated(tables.root()));

        let mut page = 0;
        while page < ram.size() {
            let expected = ram.host_frame(GuestPhysAddr(page)).unwrap();
            assert_eq!(
                tables.translate(&host, GuestPhysAddr(page)),
                Some(expected),
                "page {page:#x}"
            );
            assert_eq!(
                tables.translate(&host, GuestPhysAddr(page + 0x9ab)),
                Some(HostPhysAddr(expected.0 + 0x9ab))
            );
            page += PAGE_SIZE;
        }
        for outside in [
            ram.size(),
            ram.size() + 0x123,
            ram.size() + PAGE_SIZE,
            ram.size() + (2 << 20),
            1 << 30,
            1 << 39,
            (1 << 48) - PAGE_SIZE,
            1 << 48,
            u64::MAX,
        ] {
            if outside >= ram.size() {
                assert_eq!(
                    tables.translate(&host, GuestPhysAddr(outside)),
                    None,
                    "{outside:#x}"
                );
            }
        }

        let table_frames = tables.table_frames();
        tables.release(&mut host);
        assert_eq!(host.allocated_frames(), ram_frames);
        ram.release(&mut host);
        assert_eq!(host.allocated_frames(), 0);
        table_frames
    }

    #[test]
    fn small_ram_maps_every_page() {
        for format in FORMATS {
            // PML4 + PDPT + PD + one PT.
            assert_eq!(build_and_check(64 << 10, format), 4);
        }
    }

    #[test]
    fn ram_one_page_past_two_mebibytes_needs_a_second_page_table() {
        for format in FORMATS {
            assert_eq!(build_and_check((2 << 20) + PAGE_SIZE, format), 5);
        }
    }

    #[test]
    fn thirty_three_mebibytes() {
        for format in FORMATS {
            // PML4 + PDPT + PD + 17 PTs (16 full, one with 256 entries).
            assert_eq!(build_and_check(33 << 20, format), 20);
        }
    }

    #[test]
    fn empty_ram_maps_nothing() {
        for format in FORMATS {
            assert_eq!(build_and_check(0, format), 1);
        }
    }

    #[test]
    fn npt_entries_are_present_writable_user() {
        let mut host = FakeHostMemory::new();
        let ram = GuestRam::new(64 << 10, &mut host).unwrap();
        let tables = NestedPageTables::build(&ram, NestedFormat::Npt, &mut host).unwrap();
        let address = GuestPhysAddr(3 * PAGE_SIZE);
        let frame = ram.host_frame(address).unwrap();
        assert_eq!(tables.leaf_entry(&host, address), Some(frame.0 | 0x7));

        // The non-leaf entries too, and NX (bit 63) is clear everywhere.
        let pml4_entry = read_entry(&host, tables.root());
        assert_eq!(pml4_entry & 0xfff, 0x7);
        assert_eq!(pml4_entry >> 63, 0);
        let pdpt_entry = read_entry(&host, HostPhysAddr(pml4_entry & !0xfff));
        assert_eq!(pdpt_entry & 0xfff, 0x7);
        let pd_entry = read_entry(&host, HostPhysAddr(pdpt_entry & !0xfff));
        assert_eq!(pd_entry & 0xfff, 0x7);
        let pt_entry = read_entry(&host, HostPhysAddr((pd_entry & !0xfff) + 3 * 8));
        assert_eq!(pt_entry, frame.0 | 0x7);

        tables.release(&mut host);
        ram.release(&mut host);
    }

    #[test]
    fn ept_leaves_are_read_write_execute_write_back() {
        let mut host = FakeHostMemory::new();
        let ram = GuestRam::new(64 << 10, &mut host).unwrap();
        let tables = NestedPageTables::build(&ram, NestedFormat::Ept, &mut host).unwrap();
        let address = GuestPhysAddr(5 * PAGE_SIZE);
        let frame = ram.host_frame(address).unwrap();
        assert_eq!(
            tables.leaf_entry(&host, address),
            Some(frame.0 | 0x7 | (6 << 3))
        );
        // Ignore-PAT (bit 6) clear; non-leaf entries are plain R/W/X.
        assert_eq!(tables.leaf_entry(&host, address).unwrap() & (1 << 6), 0);
        let pml4_entry = read_entry(&host, tables.root());
        assert_eq!(pml4_entry & 0xfff, 0x7);

        tables.release(&mut host);
        ram.release(&mut host);
    }

    #[test]
    fn exhaustion_frees_every_table_frame() {
        for format in FORMATS {
            // 33 MiB needs 8448 RAM frames and 20 table frames; allow only 10 tables.
            let mut host = FakeHostMemory::with_frame_limit(8448 + 10);
            let ram = GuestRam::new(33 << 20, &mut host).unwrap();
            assert_eq!(
                NestedPageTables::build(&ram, format, &mut host).unwrap_err(),
                OutOfHostMemory
            );
            assert_eq!(host.allocated_frames(), 8448);
            // Not even the root.
            let mut starved = FakeHostMemory::with_frame_limit(16);
            let small = GuestRam::new(16 * PAGE_SIZE, &mut starved).unwrap();
            assert!(NestedPageTables::build(&small, format, &mut starved).is_err());
            assert_eq!(starved.allocated_frames(), 16);
            small.release(&mut starved);
            ram.release(&mut host);
            assert_eq!(host.allocated_frames(), 0);
        }
    }

    #[test]
    fn formats_decode_what_they_encode() {
        assert!(Npt.is_present(Npt.table_entry(0x5000)));
        assert_eq!(Npt.table_address(Npt.table_entry(0x5000)), 0x5000);
        assert!(!Ept.is_present(0x5000));
        assert!(Ept.is_present(0x5000 | EPT_EXECUTE));
        assert!(!Ept.has_reserved_bits(Ept.page_entry(0x5000), 1));
        assert!(!Ept.has_reserved_bits(Ept.table_entry(0x5000), 3));
        // Write without read, and the reserved memory types, are misconfigurations.
        assert!(Ept.has_reserved_bits(0x5000 | EPT_WRITE, 1));
        assert!(Ept.has_reserved_bits(0x5000 | 0x7 | (2 << 3), 1));
        // A 2 MiB EPT leaf with low address bits set.
        assert!(Ept.has_reserved_bits(0x20_1000 | 0x7 | (6 << 3) | EPT_LARGE_PAGE, 2));
        assert!(!Ept.has_reserved_bits(0x20_0000 | 0x7 | (6 << 3) | EPT_LARGE_PAGE, 2));
        // Memory-type bits in a non-leaf entry are reserved.
        assert!(Ept.has_reserved_bits(0x5000 | 0x7 | (6 << 3), 4));
    }

    #[test]
    fn empty_tables_map_pages_on_demand() {
        for format in FORMATS {
            let mut host = FakeHostMemory::new();
            let mut ram = GuestRam::new_lazy(1 << 30);
            let mut tables = NestedPageTables::new_empty(format, &mut host).unwrap();
            assert_eq!(tables.format(), format);
            assert_eq!(tables.table_frames(), 1);
            assert_eq!(tables.translate(&host, GuestPhysAddr(0)), None);

            // Touch two pages in one 2 MiB region and one far away, as a fault handler would.
            let touched = [0x5000, 0x7000, (512 << 20) + 0x3000];
            for address in touched {
                let frame = ram
                    .frame_or_allocate(GuestPhysAddr(address), &mut host)
                    .unwrap();
                tables
                    .map_page(GuestPhysAddr(address + 0x10), frame, &mut host)
                    .unwrap();
            }
            // Both regions lie in the first gibibyte: PML4 + PDPT + one PD + two PTs.
            assert_eq!(tables.table_frames(), 5);
            for address in touched {
                let frame = ram.host_frame(GuestPhysAddr(address)).unwrap();
                assert_eq!(
                    tables.translate(&host, GuestPhysAddr(address + 0xabc)),
                    Some(HostPhysAddr(frame.0 + 0xabc))
                );
            }
            for unmapped in [
                0x4000,
                0x6000,
                0x8000,
                2 << 20,
                (512 << 20) + 0x4000,
                1 << 30,
            ] {
                assert_eq!(
                    tables.translate(&host, GuestPhysAddr(unmapped)),
                    None,
                    "{unmapped:#x}"
                );
            }
            // The leaves carry the format's usual bits.
            let frame = ram.host_frame(GuestPhysAddr(0x5000)).unwrap();
            let expected = match format {
                NestedFormat::Npt => frame.0 | 0x7,
                NestedFormat::Ept => frame.0 | 0x7 | (6 << 3),
            };
            assert_eq!(
                tables.leaf_entry(&host, GuestPhysAddr(0x5000)),
                Some(expected)
            );

            // Remapping a page points it at the new frame, with no new table.
            let other = ram
                .frame_or_allocate(GuestPhysAddr(0x9000), &mut host)
                .unwrap();
            tables
                .map_page(GuestPhysAddr(0x5000), other, &mut host)
                .unwrap();
            assert_eq!(tables.translate(&host, GuestPhysAddr(0x5000)), Some(other));
            assert_eq!(tables.table_frames(), 5);

            // Beyond what 4 levels map: refused, not aliased onto a low page.
            assert_eq!(
                tables.map_page(GuestPhysAddr(MAX_GUEST_PHYSICAL + 0x5000), other, &mut host),
                Err(OutOfHostMemory)
            );
            assert_eq!(tables.translate(&host, GuestPhysAddr(0x5000)), Some(other));

            tables.release(&mut host);
            assert_eq!(host.allocated_frames(), 4);
            ram.release(&mut host);
            assert_eq!(host.allocated_frames(), 0);
        }
    }

    #[test]
    fn map_page_on_exhaustion_leaves_the_page_unmapped() {
        for format in FORMATS {
            // Room for the root and two more tables, not the three a first page needs.
            let mut host = FakeHostMemory::with_frame_limit(3);
            let mut tables = NestedPageTables::new_empty(format, &mut host).unwrap();
            let frame = HostPhysAddr(0x1234_5000);
            assert_eq!(
                tables.map_page(GuestPhysAddr(0x5000), frame, &mut host),
                Err(OutOfHostMemory)
            );
            assert_eq!(tables.translate(&host, GuestPhysAddr(0x5000)), None);
            assert_eq!(tables.table_frames(), 3);
            tables.release(&mut host);
            assert_eq!(host.allocated_frames(), 0);

            // No frame at all: not even the root.
            let mut starved = FakeHostMemory::with_frame_limit(0);
            assert_eq!(
                NestedPageTables::new_empty(format, &mut starved).unwrap_err(),
                OutOfHostMemory
            );
        }
    }

    #[test]
    fn build_maps_only_the_backed_pages_of_lazy_ram() {
        for format in FORMATS {
            let mut host = FakeHostMemory::new();
            let mut ram = GuestRam::new_lazy(4 << 30);
            // The hypervisor loads an image at 1 MiB and a table at 3 GiB.
            ram.write_allocating(&mut host, GuestPhysAddr(1 << 20), &[0x90; 5000])
                .unwrap();
            ram.write_allocating(&mut host, GuestPhysAddr(3 << 30), &[1; 8])
                .unwrap();
            let tables = NestedPageTables::build(&ram, format, &mut host).unwrap();
            // PML4 + PDPT + two PDs + two PTs: nothing for the untouched 4 GiB.
            assert_eq!(tables.table_frames(), 6);
            for (page, frame) in ram.backed_frames() {
                assert_eq!(tables.translate(&host, page), Some(frame));
            }
            assert_eq!(ram.backed_frames().count(), 3);
            assert_eq!(tables.translate(&host, GuestPhysAddr(0)), None);
            assert_eq!(tables.translate(&host, GuestPhysAddr(3 << 20)), None);
            tables.release(&mut host);
            ram.release(&mut host);
            assert_eq!(host.allocated_frames(), 0);
        }
    }
}
