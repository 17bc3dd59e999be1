//! The one page-table format trait and the one generic walker (DESIGN.md point 5).
//!
//! x86 paging structures all share a shape: a table of entries indexed by a slice of the
//! address, each entry either absent, a pointer to the next table, or a leaf mapping a page
//! (4 KiB at the last level, a large page higher up). A [`PageTableFormat`] says how one family
//! encodes that (NPT and EPT in [`crate::nested`]; the guest's 32-bit, PAE and 4-level formats in
//! [`crate::guest_paging`]); [`walk`] follows any of them, and the nested-table builder uses
//! the same format to write entries.
//!
//! Written here rather than taken from the `x86_64` crate: that crate covers only the 4-level
//! long-mode format through raw pointers, while this walker must read tables through
//! [`crate::HostMemory`] or guest RAM and also cover EPT, PAE and 32-bit paging.
//!
//! Levels are numbered like the manuals' tables: 1 is the page table (PT), 2 the page directory
//! (PD), 3 the page-directory-pointer table (PDPT), 4 the PML4.
// See: SDM Vol 3A 4.2 (Hierarchical paging structures: an overview)

/// How one family of x86 paging structures encodes its entries.
///
/// Addresses here are raw `u64` physical addresses in whatever space the tables live in
/// (host-physical for nested tables, guest-physical for the guest's tables); the callers wrap
/// them in the right typed address.
pub trait PageTableFormat {
    /// Bytes in one entry: 8 for the 64-bit formats, 4 for 32-bit paging.
    const ENTRY_BYTES: u64;
    /// Address bits consumed per level: 9 for the 64-bit formats, 10 for 32-bit paging.
    const INDEX_BITS: u32;

    /// Whether the entry maps something (is not "not present").
    fn is_present(&self, entry: u64) -> bool;

    /// Whether a present entry at `level` maps a page (a 4 KiB page at level 1, a large page
    /// above) instead of pointing at the next table.
    fn is_leaf(&self, entry: u64, level: u8) -> bool;

    /// Whether a present entry at `level` has bits set that the hardware treats as reserved
    /// (a walk through it faults instead of translating).
    fn has_reserved_bits(&self, entry: u64, level: u8) -> bool;

    /// The physical address of the next table named by a non-leaf entry.
    fn table_address(&self, entry: u64) -> u64;

    /// The physical base of the page mapped by a leaf entry at `level`.
    fn leaf_address(&self, entry: u64, level: u8) -> u64;

    /// A non-leaf entry pointing at `table` with the widest permissions (the leaves decide).
    fn table_entry(&self, table: u64) -> u64;

    /// A 4 KiB leaf entry mapping `frame` readable, writable and executable.
    fn page_entry(&self, frame: u64) -> u64;
}

/// The deepest walk any supported format needs (4-level paging).
pub const MAX_LEVELS: u8 = 4;

/// Address bit where the index for `level` starts.
#[must_use]
pub const fn level_shift<F: PageTableFormat + ?Sized>(level: u8) -> u32 {
    crate::addr::PAGE_SHIFT + F::INDEX_BITS * (level as u32).saturating_sub(1)
}

/// The index of `address` in a table at `level`.
#[must_use]
pub const fn table_index<F: PageTableFormat + ?Sized>(address: u64, level: u8) -> u64 {
    (address >> level_shift::<F>(level)) & ((1 << F::INDEX_BITS) - 1)
}

/// A successful walk: the page that maps the address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// Physical base of the mapped page.
    pub page_base: u64,
    /// Size of the mapped page in bytes (4 KiB, 2 MiB, 4 MiB or 1 GiB).
    pub page_size: u64,
    /// Level of the leaf entry (1 for a 4 KiB page).
    pub level: u8,
    /// The raw leaf entry.
    pub entry: u64,
}

impl Mapping {
    /// The physical address that `address` translates to through this mapping.
    #[must_use]
    pub const fn physical_address(&self, address: u64) -> u64 {
        self.page_base | (address & (self.page_size - 1))
    }
}

/// Why a walk stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkFault<E> {
    /// The entry at `level` is not present.
    NotPresent {
        /// Level of the offending entry.
        level: u8,
    },
    /// The entry at `level` has reserved bits set.
    ReservedBits {
        /// Level of the offending entry.
        level: u8,
    },
    /// The entry could not be read (its table lies outside readable memory).
    Unreadable {
        /// Physical address of the table that could not be read.
        table: u64,
        /// What the reader reported.
        error: E,
    },
}

/// Walks the tables of `format` from the table at `root` (a table of level `top_level`) to the
/// page that maps `address`, reading each entry with `read_entry(table, entry_address)`.
///
/// Bounded: it reads at most one entry per level, so at most `top_level` entries (clamped to
/// [`MAX_LEVELS`]); tables that point at themselves or at each other cannot make it loop.
pub fn walk<F: PageTableFormat + ?Sized, E>(
    format: &F,
    root: u64,
    top_level: u8,
    address: u64,
    mut read_entry: impl FnMut(u64, u64) -> Result<u64, E>,
) -> Result<Mapping, WalkFault<E>> {
    let mut table = root;
    let mut level = top_level.clamp(1, MAX_LEVELS);
    loop {
        let entry_address = table.wrapping_add(table_index::<F>(address, level) * F::ENTRY_BYTES);
        let entry = read_entry(table, entry_address)
            .map_err(|error| WalkFault::Unreadable { table, error })?;
        if !format.is_present(entry) {
            return Err(WalkFault::NotPresent { level });
        }
        if format.has_reserved_bits(entry, level) {
            return Err(WalkFault::ReservedBits { level });
        }
        if level == 1 || format.is_leaf(entry, level) {
            return Ok(Mapping {
                page_base: format.leaf_address(entry, level),
                page_size: 1 << level_shift::<F>(level),
                level,
                entry,
            });
        }
        table = format.table_address(entry);
        level -= 1;
    }
}

/// Physical-address bits 51:12 of a 64-bit entry.
// See: SDM Vol 3A 4.5.4 (Tables 4-15 to 4-20); APM Vol 2 5.4 (Figures 5-18 to 5-24)
pub const ADDRESS_MASK_64: u64 = 0x000f_ffff_ffff_f000;

/// Present (P), bit 0.
// See: SDM Vol 3A 4.5.4 (Table 4-15); APM Vol 2 5.4.1
pub const PRESENT: u64 = 1 << 0;
/// Read/write (R/W), bit 1.
pub const WRITABLE: u64 = 1 << 1;
/// User/supervisor (U/S), bit 2.
pub const USER: u64 = 1 << 2;
/// Page size (PS), bit 7: set in a PDPTE or PDE that maps a 1 GiB or 2 MiB (or, in 32-bit
/// paging, 4 MiB) page.
// See: SDM Vol 3A 4.5.4 (Tables 4-16 and 4-18); APM Vol 2 5.4.1
pub const PAGE_SIZE_BIT: u64 = 1 << 7;
/// Execute-disable (XD / NX), bit 63.
pub const NO_EXECUTE: u64 = 1 << 63;

/// Address bits below the page base that a large-page leaf keeps for other uses: bit 12 is the
/// PAT bit, the rest (`bits 20:13` for 2 MiB, `29:13` for 1 GiB) are reserved.
const fn large_page_reserved_mask(level: u8) -> u64 {
    match level {
        // See: SDM Vol 3A 4.5.4 Table 4-16 (PDPTE mapping a 1-GByte page: bits 29:13 reserved)
        3 => 0x3fff_e000,
        // See: SDM Vol 3A 4.5.4 Table 4-18 (PDE mapping a 2-MByte page: bits 20:13 reserved)
        2 => 0x001f_e000,
        _ => 0,
    }
}

/// The x86-64 long-mode entry format (4-level paging; also the page directory and page table
/// of PAE paging, and AMD's nested page tables).
///
/// Reserved-bit checks are the structural ones only: PS in a PML4E, and the address bits that
/// must be zero in a large-page leaf. Bits above MAXPHYADDR and XD without EFER.NXE are not
/// checked (the walker does not know the guest's MAXPHYADDR or EFER), so this walker is at most
/// more permissive than the hardware, never stricter.
// See: SDM Vol 3A 4.5 (4-level paging); APM Vol 2 5.3.3 and 5.4
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LongModeFormat;

impl PageTableFormat for LongModeFormat {
    const ENTRY_BYTES: u64 = 8;
    const INDEX_BITS: u32 = 9;

    fn is_present(&self, entry: u64) -> bool {
        entry & PRESENT != 0
    }

    fn is_leaf(&self, entry: u64, level: u8) -> bool {
        // PS only means "large page" in a PDPTE (1 GiB) or PDE (2 MiB); in a PTE it is PAT.
        // See: SDM Vol 3A 4.5.4 (Tables 4-16 to 4-19)
        level == 1 || ((level == 2 || level == 3) && entry & PAGE_SIZE_BIT != 0)
    }

    fn has_reserved_bits(&self, entry: u64, level: u8) -> bool {
        match level {
            // See: SDM Vol 3A 4.5.4 Table 4-15 (PML4E bit 7 reserved, must be 0)
            4 => entry & PAGE_SIZE_BIT != 0,
            2 | 3 if entry & PAGE_SIZE_BIT != 0 => entry & large_page_reserved_mask(level) != 0,
            _ => false,
        }
    }

    fn table_address(&self, entry: u64) -> u64 {
        entry & ADDRESS_MASK_64
    }

    fn leaf_address(&self, entry: u64, level: u8) -> u64 {
        entry & ADDRESS_MASK_64 & !((1u64 << level_shift::<Self>(level)) - 1)
    }

    fn table_entry(&self, table: u64) -> u64 {
        (table & ADDRESS_MASK_64) | PRESENT | WRITABLE | USER
    }

    fn page_entry(&self, frame: u64) -> u64 {
        (frame & ADDRESS_MASK_64) | PRESENT | WRITABLE | USER
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::BTreeMap;

    /// A minimal 64-bit format for exercising the walker alone: bit 0 present, bit 7 leaf
    /// above level 1, bit 1 "reserved" for the test, address bits 51:12.
    struct TestFormat;

    impl PageTableFormat for TestFormat {
        const ENTRY_BYTES: u64 = 8;
        const INDEX_BITS: u32 = 9;
        fn is_present(&self, entry: u64) -> bool {
            entry & 1 != 0
        }
        fn is_leaf(&self, entry: u64, level: u8) -> bool {
            level > 1 && entry & 0x80 != 0
        }
        fn has_reserved_bits(&self, entry: u64, _level: u8) -> bool {
            entry & 2 != 0
        }
        fn table_address(&self, entry: u64) -> u64 {
            entry & 0x000f_ffff_ffff_f000
        }
        fn leaf_address(&self, entry: u64, level: u8) -> u64 {
            entry & 0x000f_ffff_ffff_f000 & !((1 << level_shift::<Self>(level)) - 1)
        }
        fn table_entry(&self, table: u64) -> u64 {
            table | 1
        }
        fn page_entry(&self, frame: u64) -> u64 {
            frame | 1
        }
    }

    #[test]
    fn indices_and_shifts() {
        assert_eq!(level_shift::<TestFormat>(1), 12);
        assert_eq!(level_shift::<TestFormat>(4), 39);
        let address = (3 << 39) | (5 << 30) | (7 << 21) | (9 << 12) | 0x123;
        assert_eq!(table_index::<TestFormat>(address, 4), 3);
        assert_eq!(table_index::<TestFormat>(address, 3), 5);
        assert_eq!(table_index::<TestFormat>(address, 2), 7);
        assert_eq!(table_index::<TestFormat>(address, 1), 9);
    }

    #[test]
    fn walks_to_a_large_page_and_reports_faults() {
        let mut memory: BTreeMap<u64, u64> = BTreeMap::new();
        memory.insert(0x1000, 0x2000 | 1); // level 3 -> level 2 table
        memory.insert(0x2000 + 8, 0x40_0000 | 0x81); // level 2 entry 1: 2 MiB page
        memory.insert(0x2000 + 16, 0x3000 | 3); // reserved bit
        let reader = |_table: u64, entry_address: u64| -> Result<u64, ()> {
            Ok(memory.get(&entry_address).copied().unwrap_or(0))
        };
        let mapping = walk(&TestFormat, 0x1000, 3, 0x20_1234, reader).unwrap();
        assert_eq!(mapping.page_size, 2 << 20);
        assert_eq!(mapping.level, 2);
        assert_eq!(mapping.physical_address(0x20_1234), 0x40_1234);
        assert_eq!(
            walk(&TestFormat, 0x1000, 3, 0x40_0000, reader),
            Err(WalkFault::ReservedBits { level: 2 })
        );
        assert_eq!(
            walk(&TestFormat, 0x1000, 3, 0x60_0000, reader),
            Err(WalkFault::NotPresent { level: 2 })
        );
        assert_eq!(
            walk(&TestFormat, 0x1000, 3, 1 << 30, reader),
            Err(WalkFault::NotPresent { level: 3 })
        );
        let failing = |table: u64, entry_address: u64| {
            if table == 0x2000 {
                Err(7)
            } else {
                Ok(memory.get(&entry_address).copied().unwrap_or(0))
            }
        };
        assert_eq!(
            walk(&TestFormat, 0x1000, 3, 0, failing),
            Err(WalkFault::Unreadable {
                table: 0x2000,
                error: 7
            })
        );
    }

    #[test]
    fn reads_at_most_one_entry_per_level() {
        // Every entry points back at the same table: the walk must still end.
        let mut reads = 0;
        let result = walk(
            &TestFormat,
            0x5000,
            200,
            0,
            |_table, _entry| -> Result<u64, ()> {
                reads += 1;
                Ok(0x5000 | 1)
            },
        );
        assert_eq!(reads, usize::from(MAX_LEVELS));
        assert_eq!(result.unwrap().page_base, 0x5000);
    }
}
