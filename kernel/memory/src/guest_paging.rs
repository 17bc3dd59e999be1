//! Read-only walks of the guest's own page tables (guest-virtual to guest-physical), used to
//! fetch the bytes at the guest's RIP for decoding and disassembly.
//!
//! The tables are guest data and therefore hostile: every entry is read through [`GuestRam`]
//! (a table outside RAM is an error, never a host access), a walk reads at most one entry per
//! level (tables that point at themselves cannot make it loop), and [`read_guest_virtual`] runs
//! once per page of the caller's buffer. Accessed and dirty bits are never written, and
//! permissions (U/S, R/W, XD, protection keys) are not checked: the question answered is "what
//! does this address map to", not "may this access happen".
//!
//! Differences from the hardware, all on the permissive side:
//! - Reserved-bit checks are the structural ones (see [`LongModeFormat`]); bits above the
//!   guest's MAXPHYADDR and XD without EFER.NXE are not checked.
//! - PAE: the CPU walks from PDPTE registers loaded when CR3 was written; this walk reads the
//!   four PDPTEs from memory now.
// Manuals: Intel SDM Vol 3A chapter 4 "Paging" (editions from 2023 on);
//          AMD64 APM Vol 2 (pub. 24593, rev. 3.42) chapter 5 "Page Translation and Protection".

use crate::addr::{GuestPhysAddr, GuestVirtAddr, PAGE_SIZE};
use crate::guest_ram::GuestRam;
use crate::host::HostMemory;
use crate::page_table::{
    walk, LongModeFormat, PageTableFormat, WalkFault, ADDRESS_MASK_64, PAGE_SIZE_BIT, PRESENT,
    USER, WRITABLE,
};

/// CR0.PG, bit 31: paging enabled.
// See: SDM Vol 3A 2.5 (Figure 2-7, CR0); APM Vol 2 3.1.1
pub const CR0_PAGING: u64 = 1 << 31;
/// CR4.PSE, bit 4: 4 MiB pages in 32-bit paging.
// See: SDM Vol 3A 2.5 (CR4); SDM Vol 3A 4.3
pub const CR4_PAGE_SIZE_EXTENSIONS: u64 = 1 << 4;
/// CR4.PAE, bit 5: physical-address extension (PAE or 4-level paging).
// See: SDM Vol 3A 2.5 (CR4)
pub const CR4_PHYSICAL_ADDRESS_EXTENSION: u64 = 1 << 5;
/// CR4.LA57, bit 12: 5-level paging.
// See: SDM Vol 3A 2.5 (CR4); SDM Vol 3A 4.1.1
pub const CR4_57_BIT_LINEAR_ADDRESSES: u64 = 1 << 12;
/// EFER.LMA, bit 10: long mode active.
// See: SDM Vol 3A 2.2.1 (IA32_EFER); APM Vol 2 3.1.7
pub const EFER_LONG_MODE_ACTIVE: u64 = 1 << 10;

/// The guest's paging mode, decided by CR0.PG, CR4.PAE, CR4.PSE, CR4.LA57 and EFER.LMA.
// See: SDM Vol 3A 4.1.1 (Table 4-1, paging modes)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestPagingMode {
    /// CR0.PG = 0: linear addresses are physical addresses.
    Disabled,
    /// 32-bit paging with CR4.PSE = 1: 2 levels of 4-byte entries, 4 MiB pages honoured.
    Legacy32,
    /// 32-bit paging with CR4.PSE = 0: the PS bit of a page-directory entry is ignored.
    Legacy32WithoutLargePages,
    /// PAE paging: a 4-entry PDPT, then 2 levels of 8-byte entries (2 MiB pages).
    Pae,
    /// 4-level paging (long mode): 2 MiB and 1 GiB pages.
    Long4,
    /// 5-level paging (CR4.LA57): not supported by this walker.
    Long5Unsupported,
}

/// The paging mode for these control-register values.
#[must_use]
pub fn paging_mode(cr0: u64, cr4: u64, efer: u64) -> GuestPagingMode {
    // See: SDM Vol 3A 4.1.1 (Table 4-1): PG selects paging, then LMA, then PAE, then PSE.
    if cr0 & CR0_PAGING == 0 {
        GuestPagingMode::Disabled
    } else if efer & EFER_LONG_MODE_ACTIVE != 0 {
        if cr4 & CR4_57_BIT_LINEAR_ADDRESSES != 0 {
            GuestPagingMode::Long5Unsupported
        } else {
            GuestPagingMode::Long4
        }
    } else if cr4 & CR4_PHYSICAL_ADDRESS_EXTENSION != 0 {
        GuestPagingMode::Pae
    } else if cr4 & CR4_PAGE_SIZE_EXTENSIONS != 0 {
        GuestPagingMode::Legacy32
    } else {
        GuestPagingMode::Legacy32WithoutLargePages
    }
}

/// Why a guest-virtual address could not be translated or read.
///
/// Levels are numbered like the manuals' tables: 4 = PML4, 3 = PDPT (the PDPTE in PAE),
/// 2 = page directory, 1 = page table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkError {
    /// The entry at `level` is not present (the guest would take a #PF).
    NotPresent {
        /// Level of the offending entry.
        level: u8,
    },
    /// The entry at `level` has reserved bits set (a #PF with the RSVD flag).
    ReservedBits {
        /// Level of the offending entry.
        level: u8,
    },
    /// A page table the walk needed lies outside guest RAM.
    TableOutsideRam {
        /// Guest-physical address of that table.
        address: GuestPhysAddr,
    },
    /// The address is outside the mode's linear address space: non-canonical in long mode,
    /// above 4 GiB in the 32-bit modes (or the range wraps around the address space).
    NonCanonical,
    /// The walk succeeded but the page it reaches is not guest RAM (for example MMIO).
    PageOutsideRam {
        /// Guest-physical address the walk produced.
        address: GuestPhysAddr,
    },
    /// The paging mode is not supported (5-level paging).
    UnsupportedMode,
}

impl core::fmt::Display for WalkError {
    fn fmt(&self, formatter: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NotPresent { level } => write!(formatter, "not present at level {level}"),
            Self::ReservedBits { level } => write!(formatter, "reserved bits at level {level}"),
            Self::TableOutsideRam { address } => {
                write!(formatter, "page table at {address} is outside guest RAM")
            }
            Self::NonCanonical => formatter.write_str("address outside the linear address space"),
            Self::PageOutsideRam { address } => {
                write!(formatter, "page at {address} is outside guest RAM")
            }
            Self::UnsupportedMode => formatter.write_str("unsupported paging mode"),
        }
    }
}

/// The 32-bit paging entry format: 4-byte entries, 10 index bits per level.
// See: SDM Vol 3A 4.3 (32-bit paging, Tables 4-4 to 4-6)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Legacy32Format {
    /// CR4.PSE: whether a PDE with PS = 1 maps a 4 MiB page.
    pub large_pages: bool,
}

/// Address bits 31:12 of a 32-bit entry.
const ADDRESS_MASK_32: u64 = 0xffff_f000;
/// Address bits 31:22 of a 4 MiB page.
const LARGE_PAGE_MASK_32: u64 = 0xffc0_0000;

impl PageTableFormat for Legacy32Format {
    const ENTRY_BYTES: u64 = 4;
    const INDEX_BITS: u32 = 10;

    fn is_present(&self, entry: u64) -> bool {
        entry & PRESENT != 0
    }

    fn is_leaf(&self, entry: u64, level: u8) -> bool {
        // A PDE maps a 4 MiB page when CR4.PSE = 1 and its PS flag is 1; with CR4.PSE = 0
        // the PS flag is ignored. See: SDM Vol 3A 4.3
        level == 1 || (level == 2 && self.large_pages && entry & PAGE_SIZE_BIT != 0)
    }

    fn has_reserved_bits(&self, entry: u64, level: u8) -> bool {
        // See: SDM Vol 3A 4.3 Table 4-4 (4 MiB PDE: bit 21 reserved, must be 0)
        level == 2 && self.is_leaf(entry, level) && entry & (1 << 21) != 0
    }

    fn table_address(&self, entry: u64) -> u64 {
        entry & ADDRESS_MASK_32
    }

    fn leaf_address(&self, entry: u64, level: u8) -> u64 {
        if level == 2 {
            // Bits 31:22 from the PDE's bits 31:22, bits 39:32 from its bits 20:13 (PSE-36).
            // See: SDM Vol 3A 4.3 Table 4-4
            (entry & LARGE_PAGE_MASK_32) | (((entry >> 13) & 0xff) << 32)
        } else {
            entry & ADDRESS_MASK_32
        }
    }

    fn table_entry(&self, table: u64) -> u64 {
        (table & ADDRESS_MASK_32) | PRESENT | WRITABLE | USER
    }

    fn page_entry(&self, frame: u64) -> u64 {
        (frame & ADDRESS_MASK_32) | PRESENT | WRITABLE | USER
    }
}

/// PAE page-directory-pointer-table entries: bits 2:1, 8:5 and 63:52 are reserved (63:M on the
/// hardware; MAXPHYADDR is not known here).
// See: SDM Vol 3A 4.4.1 (Table 4-8, format of a PAE PDPTE)
const PAE_PDPTE_RESERVED: u64 = 0xfff0_0000_0000_01e6;

/// CR3 bits 31:5: the 32-byte-aligned PDPT in PAE paging.
// See: SDM Vol 3A 4.4.1 (Table 4-7)
const PAE_CR3_MASK: u64 = 0xffff_ffe0;

/// Translates a guest-virtual (linear) address through the guest's page tables rooted at `cr3`.
///
/// `Disabled` is the identity. Handles 4 MiB (32-bit), 2 MiB (PAE, 4-level) and 1 GiB
/// (4-level) pages. The result is not checked against RAM (see [`read_guest_virtual`]).
pub fn translate_guest_virtual(
    ram: &GuestRam,
    host: &dyn HostMemory,
    mode: GuestPagingMode,
    cr3: u64,
    address: GuestVirtAddr,
) -> Result<GuestPhysAddr, WalkError> {
    let linear = address.0;
    match mode {
        GuestPagingMode::Disabled => Ok(GuestPhysAddr(linear)),
        GuestPagingMode::Legacy32 | GuestPagingMode::Legacy32WithoutLargePages => {
            let linear = to_32_bit(linear)?;
            let format = Legacy32Format {
                large_pages: mode == GuestPagingMode::Legacy32,
            };
            // See: SDM Vol 3A 4.3 (Table 4-3: CR3 bits 31:12 locate the page directory)
            walk_guest(ram, host, &format, cr3 & ADDRESS_MASK_32, 2, linear)
        }
        GuestPagingMode::Pae => {
            let linear = to_32_bit(linear)?;
            // Step 1: the PDPTE, selected by linear bits 31:30.
            // See: SDM Vol 3A 4.4.1 (PDPTE registers, loaded from CR3 bits 31:5)
            let pdpte_address = GuestPhysAddr((cr3 & PAE_CR3_MASK) + ((linear >> 30) & 3) * 8);
            let pdpte =
                ram.read_u64(host, pdpte_address)
                    .map_err(|_| WalkError::TableOutsideRam {
                        address: GuestPhysAddr(cr3 & PAE_CR3_MASK),
                    })?;
            if pdpte & PRESENT == 0 {
                return Err(WalkError::NotPresent { level: 3 });
            }
            if pdpte & PAE_PDPTE_RESERVED != 0 {
                return Err(WalkError::ReservedBits { level: 3 });
            }
            // Step 2: the page directory and page table use 64-bit long-mode entries.
            // See: SDM Vol 3A 4.4.2 (Tables 4-9 to 4-11)
            walk_guest(
                ram,
                host,
                &LongModeFormat,
                pdpte & ADDRESS_MASK_64,
                2,
                linear,
            )
        }
        GuestPagingMode::Long4 => {
            // Bits 63:47 must all equal bit 47.
            // See: SDM Vol 3A 3.3.7.1 (canonical addressing); SDM Vol 3A 4.5
            let upper = linear >> 47;
            if upper != 0 && upper != (u64::MAX >> 47) {
                return Err(WalkError::NonCanonical);
            }
            // See: SDM Vol 3A 4.5.2 (Table 4-12/4-13: CR3 bits 51:12 locate the PML4; bits 11:0
            //      are PCD/PWT or the PCID)
            walk_guest(ram, host, &LongModeFormat, cr3 & ADDRESS_MASK_64, 4, linear)
        }
        GuestPagingMode::Long5Unsupported => Err(WalkError::UnsupportedMode),
    }
}

/// A linear address of a 32-bit mode, or `NonCanonical` when it does not fit in 32 bits.
fn to_32_bit(linear: u64) -> Result<u64, WalkError> {
    if linear > u64::from(u32::MAX) {
        Err(WalkError::NonCanonical)
    } else {
        Ok(linear)
    }
}

/// Runs the generic walker over tables in guest RAM.
fn walk_guest<F: PageTableFormat>(
    ram: &GuestRam,
    host: &dyn HostMemory,
    format: &F,
    root: u64,
    top_level: u8,
    linear: u64,
) -> Result<GuestPhysAddr, WalkError> {
    let read_entry = |_table: u64, entry_address: u64| -> Result<u64, ()> {
        let address = GuestPhysAddr(entry_address);
        if F::ENTRY_BYTES == 4 {
            ram.read_u32(host, address).map(u64::from).map_err(|_| ())
        } else {
            ram.read_u64(host, address).map_err(|_| ())
        }
    };
    match walk(format, root, top_level, linear, read_entry) {
        Ok(mapping) => Ok(GuestPhysAddr(mapping.physical_address(linear))),
        Err(WalkFault::NotPresent { level }) => Err(WalkError::NotPresent { level }),
        Err(WalkFault::ReservedBits { level }) => Err(WalkError::ReservedBits { level }),
        Err(WalkFault::Unreadable { table, error: () }) => Err(WalkError::TableOutsideRam {
            address: GuestPhysAddr(table),
        }),
    }
}

/// Reads `buffer.len()` bytes at a guest-virtual address, page by page through the walk above
/// (one walk per 4 KiB page touched). On error, the part of `buffer` already read is filled
/// and the rest is unspecified.
pub fn read_guest_virtual(
    ram: &GuestRam,
    host: &dyn HostMemory,
    mode: GuestPagingMode,
    cr3: u64,
    address: GuestVirtAddr,
    buffer: &mut [u8],
) -> Result<(), WalkError> {
    let mut done = 0usize;
    while done < buffer.len() {
        let current = address
            .checked_add(done as u64)
            .ok_or(WalkError::NonCanonical)?;
        let room_in_page = (PAGE_SIZE - current.page_offset()) as usize;
        let piece = room_in_page.min(buffer.len() - done);
        let physical = translate_guest_virtual(ram, host, mode, cr3, current)?;
        ram.read(host, physical, &mut buffer[done..done + piece])
            .map_err(|_| WalkError::PageOutsideRam { address: physical })?;
        done += piece;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fake::FakeHostMemory;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    /// 8 MiB of guest RAM.
    fn setup() -> (FakeHostMemory, GuestRam) {
        let mut host = FakeHostMemory::new();
        let ram = GuestRam::new(8 * MIB, &mut host).unwrap();
        (host, ram)
    }

    fn put64(ram: &GuestRam, host: &mut FakeHostMemory, table: u64, index: u64, entry: u64) {
        ram.write_u64(host, GuestPhysAddr(table + index * 8), entry)
            .unwrap();
    }

    fn put32(ram: &GuestRam, host: &mut FakeHostMemory, table: u64, index: u64, entry: u32) {
        ram.write_u32(host, GuestPhysAddr(table + index * 4), entry)
            .unwrap();
    }

    #[test]
    fn paging_mode_from_control_registers() {
        let pg = CR0_PAGING | 1;
        let pae = CR4_PHYSICAL_ADDRESS_EXTENSION;
        let pse = CR4_PAGE_SIZE_EXTENSIONS;
        let lma = EFER_LONG_MODE_ACTIVE | (1 << 8);
        assert_eq!(paging_mode(1, pae | pse, lma), GuestPagingMode::Disabled);
        assert_eq!(
            paging_mode(pg, 0, 0),
            GuestPagingMode::Legacy32WithoutLargePages
        );
        assert_eq!(paging_mode(pg, pse, 0), GuestPagingMode::Legacy32);
        assert_eq!(paging_mode(pg, pae | pse, 0), GuestPagingMode::Pae);
        // EFER.LME alone (bit 8) is not long mode; LMA is.
        assert_eq!(paging_mode(pg, pae, 1 << 8), GuestPagingMode::Pae);
        assert_eq!(paging_mode(pg, pae, lma), GuestPagingMode::Long4);
        assert_eq!(
            paging_mode(pg, pae | CR4_57_BIT_LINEAR_ADDRESSES, lma),
            GuestPagingMode::Long5Unsupported
        );
    }

    #[test]
    fn disabled_paging_is_identity() {
        let (mut host, ram) = setup();
        for address in [0, 0x1234, 0xffff_ffff, 1 << 40] {
            assert_eq!(
                translate_guest_virtual(
                    &ram,
                    &host,
                    GuestPagingMode::Disabled,
                    0,
                    GuestVirtAddr(address)
                ),
                Ok(GuestPhysAddr(address))
            );
        }
        ram.write(&mut host, GuestPhysAddr(0x7c00), b"boot")
            .unwrap();
        let mut bytes = [0u8; 4];
        read_guest_virtual(
            &ram,
            &host,
            GuestPagingMode::Disabled,
            0,
            GuestVirtAddr(0x7c00),
            &mut bytes,
        )
        .unwrap();
        assert_eq!(&bytes, b"boot");
        assert_eq!(
            read_guest_virtual(
                &ram,
                &host,
                GuestPagingMode::Disabled,
                0,
                GuestVirtAddr(8 * MIB - 2),
                &mut bytes
            ),
            Err(WalkError::PageOutsideRam {
                address: GuestPhysAddr(8 * MIB)
            })
        );
    }

    // 4-level layout: PML4 0x1000, PDPT 0x2000, PD 0x3000, PT 0x4000.
    const PML4: u64 = 0x1000;
    const PDPT: u64 = 0x2000;
    const PD: u64 = 0x3000;
    const PT: u64 = 0x4000;
    /// Mapped by 4 KiB pages: PML4[254] -> PDPT[1] -> PD[2] -> PT[3] and PT[4].
    const SMALL: u64 = (254 << 39) | (1 << 30) | (2 << 21) | (3 << 12);
    /// Mapped by a 2 MiB page: PML4[254] -> PDPT[1] -> PD[5] (PS).
    const LARGE: u64 = (254 << 39) | (1 << 30) | (5 << 21);
    /// Mapped by a 1 GiB page: PML4[511] -> PDPT[7] (PS), sign-extended.
    const HUGE: u64 = 0xffff_0000_0000_0000 | (511 << 39) | (7 << 30);

    fn build_long_mode(ram: &GuestRam, host: &mut FakeHostMemory) {
        put64(ram, host, PML4, 254, PDPT | 0x7);
        put64(ram, host, PDPT, 1, PD | 0x3);
        put64(ram, host, PD, 2, PT | 0x1);
        put64(ram, host, PT, 3, 0x6000 | 0x1);
        // The next virtual page is not physically adjacent.
        put64(ram, host, PT, 4, 0x9000 | 0x1 | (1 << 63));
        // 2 MiB page at guest-physical 4 MiB.
        put64(ram, host, PD, 5, (4 * MIB) | 0x80 | 0x1);
        // 2 MiB page right after it at guest-physical 2 MiB.
        put64(ram, host, PD, 6, (2 * MIB) | 0x80 | 0x1);
        // 1 GiB page at guest-physical 3 GiB (outside RAM).
        put64(ram, host, PML4, 511, 0x5000 | 0x1);
        put64(ram, host, 0x5000, 7, (3 * GIB) | 0x80 | 0x1);
    }

    fn long4(
        ram: &GuestRam,
        host: &FakeHostMemory,
        cr3: u64,
        address: u64,
    ) -> Result<u64, WalkError> {
        translate_guest_virtual(
            ram,
            host,
            GuestPagingMode::Long4,
            cr3,
            GuestVirtAddr(address),
        )
        .map(|physical| physical.0)
    }

    #[test]
    fn four_level_translations_with_all_page_sizes() {
        let (mut host, ram) = setup();
        build_long_mode(&ram, &mut host);
        assert_eq!(long4(&ram, &host, PML4, SMALL + 0x123), Ok(0x6123));
        assert_eq!(
            long4(&ram, &host, PML4, SMALL + PAGE_SIZE + 0xfff),
            Ok(0x9fff)
        );
        assert_eq!(
            long4(&ram, &host, PML4, LARGE + 0x1_2345),
            Ok(4 * MIB + 0x1_2345)
        );
        assert_eq!(
            long4(&ram, &host, PML4, HUGE + 0x1234_5678),
            Ok(3 * GIB + 0x1234_5678)
        );
        // CR3's low bits (PCID or PWT/PCD) are not part of the PML4 address.
        assert_eq!(long4(&ram, &host, PML4 | 0x18, SMALL), Ok(0x6000));
        assert_eq!(long4(&ram, &host, PML4 | 0xabc, SMALL), Ok(0x6000));
    }

    #[test]
    fn four_level_not_present_at_each_level() {
        let (mut host, ram) = setup();
        build_long_mode(&ram, &mut host);
        let base = (254 << 39) | (1 << 30);
        assert_eq!(
            long4(&ram, &host, PML4, 253 << 39),
            Err(WalkError::NotPresent { level: 4 })
        );
        assert_eq!(
            long4(&ram, &host, PML4, 254 << 39),
            Err(WalkError::NotPresent { level: 3 })
        );
        assert_eq!(
            long4(&ram, &host, PML4, base),
            Err(WalkError::NotPresent { level: 2 })
        );
        assert_eq!(
            long4(&ram, &host, PML4, base | (2 << 21)),
            Err(WalkError::NotPresent { level: 1 })
        );
        // Zero RAM under an empty CR3: nothing is present.
        assert_eq!(
            long4(&ram, &host, 0x7000, 0),
            Err(WalkError::NotPresent { level: 4 })
        );
    }

    #[test]
    fn four_level_reserved_bits() {
        let (mut host, ram) = setup();
        build_long_mode(&ram, &mut host);
        // PS in a PML4E is reserved.
        put64(&ram, &mut host, PML4, 10, 0x1_0000_0000 | 0x81);
        assert_eq!(
            long4(&ram, &host, PML4, 10 << 39),
            Err(WalkError::ReservedBits { level: 4 })
        );
        // A 2 MiB page with address bit 13 set.
        put64(&ram, &mut host, PD, 7, (4 * MIB) | (1 << 13) | 0x81);
        assert_eq!(
            long4(&ram, &host, PML4, (254 << 39) | (1 << 30) | (7 << 21)),
            Err(WalkError::ReservedBits { level: 2 })
        );
        // A 1 GiB page with address bit 21 set.
        put64(&ram, &mut host, 0x5000, 8, GIB | (1 << 21) | 0x81);
        assert_eq!(
            long4(&ram, &host, PML4, HUGE + GIB),
            Err(WalkError::ReservedBits { level: 3 })
        );
        // Bit 12 of a large page is PAT, not an address bit.
        put64(&ram, &mut host, PD, 8, (4 * MIB) | (1 << 12) | 0x81);
        assert_eq!(
            long4(
                &ram,
                &host,
                PML4,
                (254 << 39) | (1 << 30) | (8 << 21) | 0x42
            ),
            Ok(4 * MIB + 0x42)
        );
    }

    #[test]
    fn four_level_non_canonical_addresses() {
        let (mut host, ram) = setup();
        build_long_mode(&ram, &mut host);
        for address in [1 << 47, 0x8000_0000_0000_0000, 0x1234_0000_0000_0000] {
            assert_eq!(
                long4(&ram, &host, PML4, address),
                Err(WalkError::NonCanonical)
            );
        }
        // The highest canonical address is walked (and not mapped).
        assert_eq!(
            long4(&ram, &host, PML4, 0xffff_8000_0000_0000),
            Err(WalkError::NotPresent { level: 4 })
        );
    }

    #[test]
    fn tables_outside_ram_are_errors() {
        let (mut host, ram) = setup();
        build_long_mode(&ram, &mut host);
        // CR3 itself outside RAM.
        assert_eq!(
            long4(&ram, &host, 64 * MIB, SMALL),
            Err(WalkError::TableOutsideRam {
                address: GuestPhysAddr(64 * MIB)
            })
        );
        // A PDPT far outside RAM, and one at the very top of the address space.
        put64(&ram, &mut host, PML4, 20, (1 << 40) | 0x1);
        assert_eq!(
            long4(&ram, &host, PML4, 20 << 39),
            Err(WalkError::TableOutsideRam {
                address: GuestPhysAddr(1 << 40)
            })
        );
        put64(&ram, &mut host, PML4, 21, ADDRESS_MASK_64 | 0x1);
        assert_eq!(
            long4(&ram, &host, PML4, (21 << 39) | (511 << 30)),
            Err(WalkError::TableOutsideRam {
                address: GuestPhysAddr(ADDRESS_MASK_64)
            })
        );
    }

    #[test]
    fn self_referencing_tables_do_not_loop() {
        let (mut host, ram) = setup();
        // PML4[0] and PML4[511] point back at the PML4 itself.
        put64(&ram, &mut host, PML4, 0, PML4 | 0x3);
        put64(&ram, &mut host, PML4, 511, PML4 | 0x3);
        // Address 0 goes through PML4[0] four times and lands on the PML4 page.
        assert_eq!(long4(&ram, &host, PML4, 0x18), Ok(PML4 + 0x18));
        assert_eq!(
            long4(&ram, &host, PML4, 0xffff_ffff_ffff_f008),
            Ok(PML4 + 8)
        );
        // Reading through it is bounded too.
        let mut bytes = [0u8; 16];
        read_guest_virtual(
            &ram,
            &host,
            GuestPagingMode::Long4,
            PML4,
            GuestVirtAddr(0),
            &mut bytes,
        )
        .unwrap();
        assert_eq!(
            u64::from_le_bytes(bytes[..8].try_into().unwrap()),
            PML4 | 0x3
        );
        // Two tables pointing at each other: PML4 0x7000 -> PDPT 0x8000 -> PD 0x7000 ->
        // PT 0x8000, whose entry 0 maps the page 0x7000.
        put64(&ram, &mut host, 0x7000, 0, 0x8000 | 0x1);
        put64(&ram, &mut host, 0x8000, 0, 0x7000 | 0x1);
        assert_eq!(long4(&ram, &host, 0x7000, 0x5), Ok(0x7005));
    }

    #[test]
    fn reads_cross_pages_that_are_not_physically_adjacent() {
        let (mut host, ram) = setup();
        build_long_mode(&ram, &mut host);
        ram.write(&mut host, GuestPhysAddr(0x6ffc), &[1, 2, 3, 4])
            .unwrap();
        ram.write(&mut host, GuestPhysAddr(0x9000), &[5, 6, 7, 8])
            .unwrap();
        let mut bytes = [0u8; 8];
        read_guest_virtual(
            &ram,
            &host,
            GuestPagingMode::Long4,
            PML4,
            GuestVirtAddr(SMALL + PAGE_SIZE - 4),
            &mut bytes,
        )
        .unwrap();
        assert_eq!(bytes, [1, 2, 3, 4, 5, 6, 7, 8]);

        // Across the boundary of two 2 MiB pages (4 MiB then 2 MiB physical).
        ram.write(&mut host, GuestPhysAddr(6 * MIB - 2), &[9, 10])
            .unwrap();
        ram.write(&mut host, GuestPhysAddr(2 * MIB), &[11, 12])
            .unwrap();
        let mut bytes = [0u8; 4];
        read_guest_virtual(
            &ram,
            &host,
            GuestPagingMode::Long4,
            PML4,
            GuestVirtAddr(LARGE + 2 * MIB - 2),
            &mut bytes,
        )
        .unwrap();
        assert_eq!(bytes, [9, 10, 11, 12]);

        // Into a page that is not present.
        assert_eq!(
            read_guest_virtual(
                &ram,
                &host,
                GuestPagingMode::Long4,
                PML4,
                GuestVirtAddr(SMALL + 2 * PAGE_SIZE - 1),
                &mut bytes,
            ),
            Err(WalkError::NotPresent { level: 1 })
        );
        // Mapped, but to guest-physical memory that is not RAM.
        assert_eq!(
            read_guest_virtual(
                &ram,
                &host,
                GuestPagingMode::Long4,
                PML4,
                GuestVirtAddr(HUGE),
                &mut bytes,
            ),
            Err(WalkError::PageOutsideRam {
                address: GuestPhysAddr(3 * GIB)
            })
        );
        // Running off the top of the address space.
        assert_eq!(
            read_guest_virtual(
                &ram,
                &host,
                GuestPagingMode::Disabled,
                0,
                GuestVirtAddr(u64::MAX),
                &mut bytes,
            ),
            Err(WalkError::PageOutsideRam {
                address: GuestPhysAddr(u64::MAX)
            })
        );
        // An empty read touches nothing.
        read_guest_virtual(
            &ram,
            &host,
            GuestPagingMode::Long5Unsupported,
            0,
            GuestVirtAddr(0),
            &mut [],
        )
        .unwrap();
    }

    #[test]
    fn five_level_paging_is_reported_unsupported() {
        let (_host, ram) = setup();
        let host = FakeHostMemory::new();
        assert_eq!(
            translate_guest_virtual(
                &ram,
                &host,
                GuestPagingMode::Long5Unsupported,
                0x1000,
                GuestVirtAddr(0)
            ),
            Err(WalkError::UnsupportedMode)
        );
    }

    // PAE layout: PDPT at 0x6020 (32-byte aligned, not page aligned), PD 0x7000, PT 0x8000.
    const PAE_CR3: u64 = 0x6020;

    fn pae(ram: &GuestRam, host: &FakeHostMemory, address: u64) -> Result<u64, WalkError> {
        translate_guest_virtual(
            ram,
            host,
            GuestPagingMode::Pae,
            PAE_CR3,
            GuestVirtAddr(address),
        )
        .map(|physical| physical.0)
    }

    #[test]
    fn pae_translations_and_faults() {
        let (mut host, ram) = setup();
        // PDPTE[2] -> PD; PD[1] -> PT; PT[3] -> 0x5000; PD[4] 2 MiB page at 2 MiB.
        put64(&ram, &mut host, PAE_CR3, 2, 0x7000 | 0x1);
        put64(&ram, &mut host, 0x7000, 1, 0x8000 | 0x7);
        put64(&ram, &mut host, 0x8000, 3, 0x5000 | 0x3 | (1 << 63));
        put64(&ram, &mut host, 0x7000, 4, (2 * MIB) | 0x83);
        let base = 2 << 30;
        assert_eq!(
            pae(&ram, &host, base | (1 << 21) | (3 << 12) | 0x7ff),
            Ok(0x57ff)
        );
        assert_eq!(
            pae(&ram, &host, base | (4 << 21) | 0x1_2345),
            Ok(2 * MIB + 0x1_2345)
        );
        // Not present at the PDPTE, the PDE and the PTE.
        assert_eq!(
            pae(&ram, &host, 1 << 30),
            Err(WalkError::NotPresent { level: 3 })
        );
        assert_eq!(
            pae(&ram, &host, base),
            Err(WalkError::NotPresent { level: 2 })
        );
        assert_eq!(
            pae(&ram, &host, base | (1 << 21)),
            Err(WalkError::NotPresent { level: 1 })
        );
        // A PDPTE with R/W (bit 1) set: reserved in PAE.
        put64(&ram, &mut host, PAE_CR3, 3, 0x7000 | 0x3);
        assert_eq!(
            pae(&ram, &host, 3 << 30),
            Err(WalkError::ReservedBits { level: 3 })
        );
        // 2 MiB page with bit 13 set.
        put64(&ram, &mut host, 0x7000, 5, (2 * MIB) | (1 << 13) | 0x81);
        assert_eq!(
            pae(&ram, &host, base | (5 << 21)),
            Err(WalkError::ReservedBits { level: 2 })
        );
        // Beyond 32 bits.
        assert_eq!(pae(&ram, &host, 1 << 32), Err(WalkError::NonCanonical));
        // PD outside RAM; PDPT outside RAM.
        put64(&ram, &mut host, PAE_CR3, 0, (1 << 35) | 0x1);
        assert_eq!(
            pae(&ram, &host, 0),
            Err(WalkError::TableOutsideRam {
                address: GuestPhysAddr(1 << 35)
            })
        );
        assert_eq!(
            translate_guest_virtual(
                &ram,
                &host,
                GuestPagingMode::Pae,
                0xffff_ffe0,
                GuestVirtAddr(0)
            ),
            Err(WalkError::TableOutsideRam {
                address: GuestPhysAddr(0xffff_ffe0)
            })
        );
    }

    // 32-bit layout: page directory 0x9000, page table 0xa000.
    const LEGACY_CR3: u64 = 0x9000;

    fn legacy(
        ram: &GuestRam,
        host: &FakeHostMemory,
        mode: GuestPagingMode,
        address: u64,
    ) -> Result<u64, WalkError> {
        translate_guest_virtual(ram, host, mode, LEGACY_CR3, GuestVirtAddr(address))
            .map(|physical| physical.0)
    }

    #[test]
    fn legacy_32_bit_translations_and_faults() {
        use GuestPagingMode::{Legacy32, Legacy32WithoutLargePages};
        let (mut host, ram) = setup();
        // PDE[0x300] -> PT; PT[0x12] -> 0xb000.
        put32(&ram, &mut host, LEGACY_CR3, 0x300, 0xa000 | 0x7);
        put32(&ram, &mut host, 0xa000, 0x12, 0xb000 | 0x1);
        // PDE[0x301]: 4 MiB page at 4 MiB.
        put32(&ram, &mut host, LEGACY_CR3, 0x301, 0x40_0000 | 0x83);
        // PDE[0x302]: 4 MiB page at 4 MiB + PSE-36 bits 39:32 = 0x5 (bits 20:13 of the PDE).
        put32(
            &ram,
            &mut host,
            LEGACY_CR3,
            0x302,
            0x40_0000 | (0x5 << 13) | 0x81,
        );
        // PDE[0x303]: 4 MiB page with reserved bit 21.
        put32(
            &ram,
            &mut host,
            LEGACY_CR3,
            0x303,
            0x40_0000 | (1 << 21) | 0x81,
        );

        let small = (0x300 << 22) | (0x12 << 12);
        let large = 0x301 << 22;
        for mode in [Legacy32, Legacy32WithoutLargePages] {
            assert_eq!(legacy(&ram, &host, mode, small | 0xabc), Ok(0xbabc));
            assert_eq!(
                legacy(&ram, &host, mode, 0),
                Err(WalkError::NotPresent { level: 2 })
            );
            assert_eq!(
                legacy(&ram, &host, mode, small + PAGE_SIZE),
                Err(WalkError::NotPresent { level: 1 })
            );
            assert_eq!(
                legacy(&ram, &host, mode, 1 << 32),
                Err(WalkError::NonCanonical)
            );
        }
        assert_eq!(
            legacy(&ram, &host, Legacy32, large | 0x3f_ffff),
            Ok(0x7f_ffff)
        );
        assert_eq!(
            legacy(&ram, &host, Legacy32, (0x302 << 22) | 0x10),
            Ok(0x5_0040_0010)
        );
        assert_eq!(
            legacy(&ram, &host, Legacy32, 0x303 << 22),
            Err(WalkError::ReservedBits { level: 2 })
        );
        // Without CR4.PSE the PS bit is ignored: the PDE names a page table at 4 MiB, which is
        // zeroed RAM, so nothing is present at level 1.
        assert_eq!(
            legacy(&ram, &host, Legacy32WithoutLargePages, large),
            Err(WalkError::NotPresent { level: 1 })
        );
        // CR3 bits above 31 are not part of the 32-bit page-directory address.
        assert_eq!(
            translate_guest_virtual(
                &ram,
                &host,
                Legacy32,
                (1 << 40) | LEGACY_CR3,
                GuestVirtAddr(small)
            ),
            Ok(GuestPhysAddr(0xb000))
        );
        // A page table outside RAM.
        put32(&ram, &mut host, LEGACY_CR3, 0x3ff, 0xffff_f000 | 0x1);
        assert_eq!(
            legacy(&ram, &host, Legacy32, 0xffc0_0000),
            Err(WalkError::TableOutsideRam {
                address: GuestPhysAddr(0xffff_f000)
            })
        );
        // A page directory that maps itself as its own page table does not loop.
        put32(
            &ram,
            &mut host,
            LEGACY_CR3,
            0x3fe,
            (LEGACY_CR3 as u32) | 0x1,
        );
        assert_eq!(
            legacy(&ram, &host, Legacy32, (0x3fe << 22) | (0x3fe << 12) | 4),
            Ok(LEGACY_CR3 + 4)
        );

        // Reading an instruction through 32-bit paging.
        ram.write(&mut host, GuestPhysAddr(0xbffe), &[0x0f, 0x01])
            .unwrap();
        ram.write(&mut host, GuestPhysAddr(0x40_0000), &[0xd9])
            .unwrap();
        let mut bytes = [0u8; 2];
        read_guest_virtual(
            &ram,
            &host,
            Legacy32,
            LEGACY_CR3,
            GuestVirtAddr(small | 0xffe),
            &mut bytes,
        )
        .unwrap();
        assert_eq!(bytes, [0x0f, 0x01]);
    }
}
