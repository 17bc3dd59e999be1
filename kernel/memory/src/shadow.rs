//! Shadow paging: the page tables the CPU really walks when the guest runs without nested
//! paging (no NPT/EPT). The guest keeps its own tables (guest-virtual -> guest-physical) in its
//! RAM; the engine builds SHADOW tables (guest-virtual -> host-physical) in host frames, lazily,
//! one 4 KiB leaf per page fault, by composing a fresh walk of the guest's tables with
//! [`GuestRam`]'s guest-physical -> host map.
//!
//! Written here because no crate fits: the `x86_64` crate only knows tables it can reach by
//! pointer, while these are built through [`HostMemory`] from hostile guest data.
//!
//! # Policy: the shadow is a TLB
//! The guest's page tables are NOT write-protected. Instead the shadow behaves exactly like the
//! TLB the architecture allows: every shadow leaf is a cached translation, correct by the x86
//! TLB rules as long as it is dropped when the guest invalidates, and every fault re-walks the
//! guest tables fresh (a TLB never has to be consulted for a translation it does not hold).
// See: SDM Vol 3A 4.10.2 (TLBs), 4.10.4 (invalidation of TLBs), 4.10.4.1 (operations that
//      invalidate: INVLPG, MOV to CR3, MOV to CR0/CR4 changing paging bits, page faults)
//!
//! - INVLPG ([`ShadowPaging::invalidate_page`]) drops the page's leaves in every cached root
//!   (all 4 KiB pieces when the guest mapped it with a large page).
//! - A CR3 load ([`ShadowPaging::activate`]) switches to a cached root or a new empty one. A
//!   cached root is RESYNCED first: each leaf records the guest entries it was built from
//!   (guest-physical address and value at each level); resync re-reads them and drops every leaf
//!   whose entries changed, so the root then holds only what a freshly flushed TLB refilled by
//!   walks of the current tables would hold. A reload of the current CR3 resyncs too.
//! - A page fault that the guest must see drops the faulting page's leaf, as a #PF invalidates
//!   the TLB entries of its linear address on real hardware.
//! - Paging-mode changes (CR0.PG/WP, CR4.PAE/PGE/SMEP/..., EFER.NXE/LME) are the caller's to
//!   report with [`ShadowPaging::flush_all`] + `activate`; roots are also keyed by the bits
//!   that shape their leaves (CR0.WP, CR4.SMEP, EFER.NXE), so a root is never reused under
//!   different rules even if the caller forgets.
//!
//! Accessed and dirty bits: when a leaf is built, A is set in the guest's entry at every level
//! of the walk. The shadow leaf stays read-only until the guest's leaf has D = 1, so the first
//! write faults to the hypervisor, which sets D and makes the shadow leaf writable: a
//! "hypervisor-caused" fault the guest never sees ([`FaultOutcome::Fixed`]).
// See: SDM Vol 3A 4.8 (accessed and dirty flags)
//!
//! Shadow leaves are always 4 KiB (guest 2 MiB / 1 GiB pages are split); non-leaf shadow
//! entries are P | R/W | U/S so the permissions live in the leaves: P, R/W (guest allows the
//! write at every level AND guest leaf D = 1), U/S (U/S = 1 at every guest level), XD (XD = 1 at
//! some guest level, when EFER.NXE = 1; the real EFER.NXE is the guest's), the guest leaf's
//! PWT/PCD/PAT, and the host frame of the guest-physical page.
//!
//! Global pages: the real CR4.PGE is kept off, so no shadow entry is global; guest global pages
//! are still right (they are only resynced and flushed more often than the guest asked for,
//! which a TLB is always allowed to do).
//!
//! CR0.WP = 0 in the guest (supervisor writes to read-only pages allowed): the real CR0.WP is
//! always 1, or the hardware would let supervisor writes through read-only shadow leaves
//! without faulting and the guest's D bits would never be set. A supervisor write that only
//! WP = 0 allows gets a leaf that is writable but supervisor-only (U/S = 0), so a later user
//! access faults again and is re-evaluated; when the guest page is a user page and CR4.SMEP = 1
//! (and NXE = 1) that leaf is also XD so a supervisor fetch from it still faults. This is what
//! KVM does (`FNAME(page_fault)` in arch/x86/kvm/mmu/paging_tmpl.h). Known gaps of that trick,
//! which no leaf encoding can close: with CR4.SMAP = 1 such a leaf allows supervisor data
//! accesses with RFLAGS.AC = 0 that the guest's SMAP would refuse, and with SMEP = 1 but
//! NXE = 0 it allows supervisor fetches the guest's SMEP would refuse.
//!
//! Guest paging off ([`ShadowFormat::PaeIdentity`]): the CPU runs in PAE paging on an identity
//! map of RAM (everything present, writable, user), also built fault by fault. The four PDPTEs
//! are filled when the root is made and never change afterwards (the CPU loads them into its
//! PDPTE registers when CR3 is loaded, not at each walk).
// See: SDM Vol 3A 4.4.1 (PDPTE registers)
//!
//! Not supported: 32-bit and PAE guest paging with CR0.PG = 1 (see [`Unsupported`]), 5-level
//! paging, protection keys and CET shadow stacks (the real CR4.PKE/PKS/CET are cleared: the
//! CPUID the guest sees must hide them under shadow paging), PCID (the real CR4.PCIDE is
//! cleared: every CR3 load behaves as a flushing one).
//!
//! Hostile guest data: every walk reads at most one entry per level (4), guest tables are read
//! through [`GuestRam`] (a table outside RAM ends in [`FaultOutcome::OutsideRam`] naming it),
//! and nothing panics on guest input. Heap and host memory are bounded: at most `max_roots`
//! cached roots, at most `max_leaves_per_root` leaves per root (past it the root is emptied, a
//! TLB capacity eviction), and a failed frame allocation first evicts the other cached roots.
//!
//! One [`ShadowPaging`] per vCPU (TLBs are per logical processor). A/D updates are plain
//! read-modify-writes of guest memory: vCPUs of one VM running at once on different host CPUs
//! could lose a concurrent guest write to the same entry (the hardware uses locked updates);
//! [`HostMemory`] has no compare-and-exchange yet.
// Manuals: Intel SDM Vol 3A chapter 4 "Paging" (editions from 2023 on); AMD64 APM Vol 2
//          (pub. 24593, rev. 3.42) chapter 5 "Page Translation and Protection".

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;

use crate::addr::{GuestPhysAddr, GuestVirtAddr, HostPhysAddr, PAGE_SHIFT, PAGE_SIZE};
use crate::guest_paging::{paging_mode, GuestPagingMode, CR0_PAGING};
use crate::guest_ram::{BackingError, GuestRam};
use crate::host::HostMemory;
use crate::page_table::{
    level_shift, table_index, walk, LongModeFormat, Mapping, PageTableFormat, WalkFault,
    ADDRESS_MASK_64, NO_EXECUTE, PRESENT, USER, WRITABLE,
};

#[cfg(test)]
mod reference;
#[cfg(test)]
mod tests;

/// CR0.PE, bit 0: protection enabled.
// See: SDM Vol 3A 2.5 (Figure 2-7, CR0)
pub const CR0_PROTECTION_ENABLE: u64 = 1 << 0;
/// CR0.NE, bit 5: native x87 error reporting.
// See: SDM Vol 3A 2.5
pub const CR0_NUMERIC_ERROR: u64 = 1 << 5;
/// CR0.WP, bit 16: supervisor writes honour read-only pages.
// See: SDM Vol 3A 2.5; SDM Vol 3A 4.6.1
pub const CR0_WRITE_PROTECT: u64 = 1 << 16;
/// CR4.PAE, bit 5.
// See: SDM Vol 3A 2.5 (Figure 2-7, CR4)
pub const CR4_PHYSICAL_ADDRESS_EXTENSION: u64 = 1 << 5;
/// CR4.PGE, bit 7: global pages.
pub const CR4_PAGE_GLOBAL_ENABLE: u64 = 1 << 7;
/// CR4.LA57, bit 12: 5-level paging.
pub const CR4_57_BIT_LINEAR_ADDRESSES: u64 = 1 << 12;
/// CR4.PCIDE, bit 17: process-context identifiers.
pub const CR4_PCID_ENABLE: u64 = 1 << 17;
/// CR4.SMEP, bit 20: supervisor-mode execution prevention.
pub const CR4_SMEP: u64 = 1 << 20;
/// CR4.SMAP, bit 21: supervisor-mode access prevention.
pub const CR4_SMAP: u64 = 1 << 21;
/// CR4.PKE, bit 22: protection keys for user pages.
pub const CR4_PROTECTION_KEYS_USER: u64 = 1 << 22;
/// CR4.CET, bit 23: control-flow enforcement.
pub const CR4_CONTROL_FLOW_ENFORCEMENT: u64 = 1 << 23;
/// CR4.PKS, bit 24: protection keys for supervisor pages.
pub const CR4_PROTECTION_KEYS_SUPERVISOR: u64 = 1 << 24;
/// EFER.LME, bit 8: long mode enable.
// See: SDM Vol 3A 2.2.1 (IA32_EFER)
pub const EFER_LONG_MODE_ENABLE: u64 = 1 << 8;
/// EFER.LMA, bit 10: long mode active.
pub const EFER_LONG_MODE_ACTIVE: u64 = 1 << 10;
/// EFER.NXE, bit 11: execute-disable bit enabled.
pub const EFER_NO_EXECUTE_ENABLE: u64 = 1 << 11;

/// Page-fault error code: P, bit 0 (0: not present; 1: protection violation).
// See: SDM Vol 3A 4.7 (Figure 4-12, page-fault error code)
pub const ERROR_PRESENT: u32 = 1 << 0;
/// Page-fault error code: W/R, bit 1 (the access was a write).
pub const ERROR_WRITE: u32 = 1 << 1;
/// Page-fault error code: U/S, bit 2 (the access was a user-mode access).
pub const ERROR_USER: u32 = 1 << 2;
/// Page-fault error code: RSVD, bit 3 (a reserved bit was set in a paging-structure entry).
pub const ERROR_RESERVED: u32 = 1 << 3;
/// Page-fault error code: I/D, bit 4 (an instruction fetch, reported when NXE or SMEP is on).
pub const ERROR_FETCH: u32 = 1 << 4;

/// Accessed (A), bit 5 of every paging-structure entry.
// See: SDM Vol 3A 4.5.4 (Tables 4-15 to 4-20); SDM Vol 3A 4.8
const ACCESSED: u64 = 1 << 5;
/// Dirty (D), bit 6 of an entry that maps a page.
const DIRTY: u64 = 1 << 6;
/// Page-level write-through (PWT), bit 3, and cache disable (PCD), bit 4.
const CACHING_BITS: u64 = (1 << 3) | (1 << 4);
/// PAT bit of a 4 KiB PTE (bit 7).
// See: SDM Vol 3A 4.5.4 (Table 4-20)
const PAT_4K: u64 = 1 << 7;
/// PAT bit of a 2 MiB / 1 GiB leaf (bit 12).
// See: SDM Vol 3A 4.5.4 (Tables 4-16 and 4-18)
const PAT_LARGE: u64 = 1 << 12;
/// Linear-address bits translated by 4-level paging (47:0).
// See: SDM Vol 3A 4.5 (4-level paging translates 48-bit linear addresses)
const LINEAR_MASK_48: u64 = (1 << 48) - 1;
/// 4 GiB: the reach of 32-bit linear addresses and of a 32-bit PAE CR3.
const FOUR_GIB: u64 = 1 << 32;
/// Frames tried when looking for a PAE PDPT below 4 GiB.
const LOW_FRAME_ATTEMPTS: usize = 4;
/// Default bound on the leaves one root keeps (1 GiB of 4 KiB pages).
pub const DEFAULT_MAX_LEAVES_PER_ROOT: usize = 1 << 18;

/// The guest-visible paging registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestPagingState {
    /// CR0 as the guest wrote it.
    pub cr0: u64,
    /// CR3 as the guest wrote it.
    pub cr3: u64,
    /// CR4 as the guest wrote it.
    pub cr4: u64,
    /// IA32_EFER as the guest sees it (LMA maintained by the caller: LME and CR0.PG).
    pub efer: u64,
}

impl GuestPagingState {
    fn write_protect(&self) -> bool {
        self.cr0 & CR0_WRITE_PROTECT != 0
    }
    fn no_execute_enabled(&self) -> bool {
        self.efer & EFER_NO_EXECUTE_ENABLE != 0
    }
    fn smep(&self) -> bool {
        self.cr4 & CR4_SMEP != 0
    }
    fn smap(&self) -> bool {
        self.cr4 & CR4_SMAP != 0
    }
}

/// The hardware format the real CPU walks the shadow with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShadowFormat {
    /// Guest in long mode (4-level guest tables): a 4-level shadow.
    Long4,
    /// Guest paging off: identity map of RAM, walked by the CPU in 32-bit PAE mode (3 levels,
    /// 4-entry PDPT).
    PaeIdentity,
}

/// The real CR0/CR4/EFER to run the guest with (the backend loads these; the guest sees
/// [`GuestPagingState`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RealPaging {
    /// Real CR0.
    pub cr0: u64,
    /// Real CR4.
    pub cr4: u64,
    /// Real IA32_EFER.
    pub efer: u64,
    /// The format of the shadow the real CR3 points at.
    pub format: ShadowFormat,
}

/// Guest paging modes shadow paging does not run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unsupported {
    /// 32-bit paging with CR0.PG = 1 and EFER.LMA = 0 (legacy 2-level or PAE): not supported
    /// with shadow paging.
    ThirtyTwoBitPaging,
    /// 5-level paging (CR4.LA57 in long mode).
    FiveLevelPaging,
}

impl core::fmt::Display for Unsupported {
    fn fmt(&self, formatter: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::ThirtyTwoBitPaging => {
                formatter.write_str("32-bit or PAE guest paging is not supported by shadow paging")
            }
            Self::FiveLevelPaging => formatter.write_str("5-level guest paging is not supported"),
        }
    }
}

/// Why [`ShadowPaging::activate`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActivateError {
    /// The guest's paging mode cannot be shadowed.
    Unsupported(Unsupported),
    /// No host frame for the shadow root (after evicting the other cached roots).
    OutOfHostMemory,
}

impl core::fmt::Display for ActivateError {
    fn fmt(&self, formatter: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Unsupported(unsupported) => unsupported.fmt(formatter),
            Self::OutOfHostMemory => formatter.write_str("out of host memory for a shadow root"),
        }
    }
}

/// The real registers for a guest state.
///
/// - CR0 = guest | PE | PG | WP | NE. WP is always 1 (not the guest's): see the module doc,
///   the guest's WP = 0 is emulated in the leaves. PE is forced like the brief of the backends
///   asks (VMX needs it without unrestricted guest); a real-mode guest on SVM would rather use
///   paged real mode (PE = 0, PG = 1), which is the backend's choice to make.
/// - CR4 = guest | PAE, with PGE, PCIDE, PKE, PKS and CET cleared (and, for the identity map,
///   SMEP, SMAP and LA57 too, since the guest's paging is off).
/// - EFER: guest long mode -> guest | LME | LMA; guest paging off -> guest without LME and LMA.
///
/// The mode is [`paging_mode`]'s: long mode is CR0.PG = 1 with EFER.LMA = 1, so the caller
/// keeps LMA = LME & PG in the visible EFER.
// See: SDM Vol 3A 4.1.1 (Table 4-1, paging modes); SDM Vol 3A 2.5 (CR0, CR4); SDM Vol 3A 2.2.1
pub fn real_paging(state: &GuestPagingState) -> Result<RealPaging, Unsupported> {
    let cr0 =
        state.cr0 | CR0_PROTECTION_ENABLE | CR0_PAGING | CR0_WRITE_PROTECT | CR0_NUMERIC_ERROR;
    let cleared_always = CR4_PAGE_GLOBAL_ENABLE
        | CR4_PCID_ENABLE
        | CR4_PROTECTION_KEYS_USER
        | CR4_PROTECTION_KEYS_SUPERVISOR
        | CR4_CONTROL_FLOW_ENFORCEMENT;
    match paging_mode(state.cr0, state.cr4, state.efer) {
        GuestPagingMode::Disabled => Ok(RealPaging {
            cr0,
            cr4: (state.cr4 | CR4_PHYSICAL_ADDRESS_EXTENSION)
                & !(cleared_always | CR4_SMEP | CR4_SMAP | CR4_57_BIT_LINEAR_ADDRESSES),
            efer: state.efer & !(EFER_LONG_MODE_ENABLE | EFER_LONG_MODE_ACTIVE),
            format: ShadowFormat::PaeIdentity,
        }),
        GuestPagingMode::Long4 => Ok(RealPaging {
            cr0,
            cr4: (state.cr4 | CR4_PHYSICAL_ADDRESS_EXTENSION) & !cleared_always,
            efer: state.efer | EFER_LONG_MODE_ENABLE | EFER_LONG_MODE_ACTIVE,
            format: ShadowFormat::Long4,
        }),
        GuestPagingMode::Long5Unsupported => Err(Unsupported::FiveLevelPaging),
        GuestPagingMode::Legacy32
        | GuestPagingMode::Legacy32WithoutLargePages
        | GuestPagingMode::Pae => Err(Unsupported::ThirtyTwoBitPaging),
    }
}

/// Counters of the engine (all cumulative except `table_frames`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShadowStats {
    /// Faults answered [`FaultOutcome::Fixed`] (hypervisor-caused: the guest never saw them).
    pub faults_fixed: u64,
    /// Faults answered [`FaultOutcome::Inject`].
    pub faults_injected: u64,
    /// Calls of [`ShadowPaging::activate`] (CR3 loads and mode changes).
    pub cr3_switches: u64,
    /// Activations that found their root in the cache (and resynced it).
    pub cr3_cache_hits: u64,
    /// Calls of [`ShadowPaging::invalidate_page`].
    pub invlpgs: u64,
    /// Calls of [`ShadowPaging::flush_all`], plus roots emptied for exceeding the leaf bound.
    pub rebuilds: u64,
    /// Leaves dropped by resync because their guest entries had changed.
    pub resync_dropped: u64,
    /// Host frames the shadow tables hold now (a gauge).
    pub table_frames: u64,
}

/// What happened to a page fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOutcome {
    /// The shadow now allows the access (or A/D was updated): re-run the instruction; the guest
    /// sees nothing.
    Fixed,
    /// The guest's own tables forbid the access: inject #PF with this error code (P, W/R, U/S,
    /// RSVD, I/D as SDM Vol 3A 4.7 says) and CR2 = the address.
    Inject {
        /// The #PF error code.
        error_code: u32,
    },
    /// The guest's tables map it to guest-physical memory outside its RAM, or one of the
    /// guest's tables lies outside its RAM (stop the VM, like a nested page fault).
    OutsideRam {
        /// The guest-physical address of the access, or of the table that could not be read.
        guest_physical: GuestPhysAddr,
    },
    /// No host frame for a shadow table or for the guest page (overcommit exhausted).
    OutOfHostMemory,
}

/// The access that faulted, from the hardware's error code bits: W (bit 1), U (bit 2), I
/// (bit 4); plus what the engine cannot know by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultAccess {
    /// A write (W/R = 1).
    pub write: bool,
    /// A user-mode access (CPL 3; U/S = 1).
    pub user: bool,
    /// An instruction fetch (I/D = 1).
    pub fetch: bool,
    /// RFLAGS.AC, for SMAP.
    pub alignment_check: bool,
}

/// What identifies a cached root: the guest tables it shadows and the rules its leaves obey.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RootKey {
    format: ShadowFormat,
    /// Guest-physical PML4 (CR3 bits 51:12); 0 for the identity map.
    guest_table: u64,
    write_protect: bool,
    no_execute_enabled: bool,
    smep: bool,
}

impl RootKey {
    fn new(state: &GuestPagingState, format: ShadowFormat) -> RootKey {
        match format {
            ShadowFormat::Long4 => RootKey {
                format,
                // See: SDM Vol 3A 4.5.2 (CR3 bits 51:12 locate the PML4; 11:0 PCD/PWT or PCID)
                guest_table: state.cr3 & ADDRESS_MASK_64,
                write_protect: state.write_protect(),
                no_execute_enabled: state.no_execute_enabled(),
                smep: state.smep(),
            },
            ShadowFormat::PaeIdentity => RootKey {
                format,
                guest_table: 0,
                write_protect: false,
                no_execute_enabled: false,
                smep: false,
            },
        }
    }
}

/// One guest paging-structure entry a leaf was built from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct GuestEntry {
    address: GuestPhysAddr,
    value: u64,
}

/// What a shadow leaf was built from (long-mode roots only; the identity map has no source).
#[derive(Clone, Copy, Debug)]
struct LeafRecord {
    /// Level of the guest's leaf: 1 (4 KiB), 2 (2 MiB) or 3 (1 GiB).
    guest_level: u8,
    /// The guest entries of the walk, top level first, as they were after A/D were set.
    entries: [GuestEntry; 4],
    count: u8,
}

impl LeafRecord {
    fn entries(&self) -> &[GuestEntry] {
        &self.entries[..usize::from(self.count).min(4)]
    }
}

/// One shadow address space: a root table, the tables below it and the leaves' records.
#[derive(Debug)]
struct ShadowRoot {
    key: RootKey,
    /// The PML4 (Long4) or the PDPT (PaeIdentity).
    root: HostPhysAddr,
    /// Every table below the root, by (level, linear >> bits covered by a table of that level).
    tables: BTreeMap<(u8, u64), HostPhysAddr>,
    /// Long4 only: the record of each leaf, by linear page number (bits 47:12).
    leaves: BTreeMap<u64, LeafRecord>,
    /// Long4 only: (first linear page, guest level) of guest large pages that have leaves.
    large_pages: BTreeSet<(u64, u8)>,
}

impl ShadowRoot {
    fn top_level(&self) -> u8 {
        match self.key.format {
            ShadowFormat::Long4 => 4,
            ShadowFormat::PaeIdentity => 3,
        }
    }

    fn frame_count(&self) -> u64 {
        1 + self.tables.len() as u64
    }

    /// The key of the table at `level` that translates `linear`.
    fn table_key(level: u8, linear: u64) -> (u8, u64) {
        (level, linear >> level_shift::<LongModeFormat>(level + 1))
    }

    /// The shadow page table (level 1) holding `linear`'s leaf, if it exists.
    fn page_table(&self, linear: u64) -> Option<HostPhysAddr> {
        if self.top_level() == 1 {
            return Some(self.root);
        }
        self.tables.get(&Self::table_key(1, linear)).copied()
    }

    /// Writes the 4 KiB leaf of `linear`, creating the tables on the way.
    fn install_leaf(
        &mut self,
        host: &mut dyn HostMemory,
        linear: u64,
        leaf: u64,
        allocate: &mut dyn FnMut(&mut dyn HostMemory) -> Option<HostPhysAddr>,
    ) -> Result<(), NoFrame> {
        let mut table = self.root;
        // Bounded: one step per level, at most 3 (4-level) or 2 (PAE).
        for level in (2..=self.top_level()).rev() {
            let key = Self::table_key(level - 1, linear);
            table = match self.tables.get(&key) {
                Some(&child) => child,
                None => {
                    let child = allocate(host).ok_or(NoFrame)?;
                    // Non-leaf shadow entries grant everything; the leaves decide.
                    // See: SDM Vol 3A 4.6.1 (rights are the AND/OR over all levels)
                    let entry = if self.key.format == ShadowFormat::PaeIdentity && level == 3 {
                        // PAE PDPTEs: bits 2:1 and 8:5 are reserved, so P only.
                        // See: SDM Vol 3A 4.4.1 (Table 4-8)
                        child.0 | PRESENT
                    } else {
                        LongModeFormat.table_entry(child.0)
                    };
                    write_entry(host, table, level, linear, entry);
                    self.tables.insert(key, child);
                    child
                }
            };
        }
        write_entry(host, table, 1, linear, leaf);
        Ok(())
    }

    /// Clears the shadow leaf of `linear`'s 4 KiB page (its record too).
    fn drop_leaf(&mut self, host: &mut dyn HostMemory, linear: u64) {
        self.leaves.remove(&(linear >> PAGE_SHIFT));
        if let Some(table) = self.page_table(linear) {
            write_entry(host, table, 1, linear, 0);
        }
    }

    /// Drops every leaf a TLB entry for `linear` could stand for: its own 4 KiB leaf and, when
    /// the guest mapped it with a large page, the leaves of every 4 KiB piece of that page.
    // See: SDM Vol 3A 4.10.4.1 (INVLPG invalidates all TLB entries of a large page)
    fn drop_covering(&mut self, host: &mut dyn HostMemory, linear: u64) {
        let linear = linear & LINEAR_MASK_48;
        self.drop_leaf(host, linear);
        for level in [2u8, 3] {
            let size_pages = 1u64 << (level_shift::<LongModeFormat>(level) - PAGE_SHIFT);
            let first = (linear >> PAGE_SHIFT) & !(size_pages - 1);
            if !self.large_pages.remove(&(first, level)) {
                continue;
            }
            let pieces: Vec<u64> = self
                .leaves
                .range(first..first + size_pages)
                .filter(|(_, record)| record.guest_level == level)
                .map(|(page, _)| *page)
                .collect();
            for page in pieces {
                self.drop_leaf(host, page << PAGE_SHIFT);
            }
        }
    }

    /// Frees every table below the root and zeroes the root (the identity map keeps its PDs,
    /// which its PDPTEs name, and only loses its page tables).
    fn clear(&mut self, host: &mut dyn HostMemory) {
        self.leaves.clear();
        self.large_pages.clear();
        match self.key.format {
            ShadowFormat::Long4 => {
                for (_, frame) in core::mem::take(&mut self.tables) {
                    host.free_frame(frame);
                }
                zero_frame(host, self.root);
            }
            ShadowFormat::PaeIdentity => {
                let page_tables: Vec<(u8, u64)> = self
                    .tables
                    .keys()
                    .filter(|(level, _)| *level == 1)
                    .copied()
                    .collect();
                for key in page_tables {
                    if let Some(frame) = self.tables.remove(&key) {
                        host.free_frame(frame);
                    }
                }
                for directory in self.tables.values() {
                    zero_frame(host, *directory);
                }
            }
        }
    }

    /// Gives every frame back.
    fn free(self, host: &mut dyn HostMemory) {
        for (_, frame) in self.tables {
            host.free_frame(frame);
        }
        host.free_frame(self.root);
    }
}

/// A shadow table frame could not be allocated.
struct NoFrame;

/// Writes the 8-byte entry of `linear` in the shadow table `table` of `level`.
fn write_entry(host: &mut dyn HostMemory, table: HostPhysAddr, level: u8, linear: u64, entry: u64) {
    let index = table_index::<LongModeFormat>(linear, level);
    host.write(
        HostPhysAddr(table.0 + index * LongModeFormat::ENTRY_BYTES),
        &entry.to_le_bytes(),
    );
}

fn zero_frame(host: &mut dyn HostMemory, frame: HostPhysAddr) {
    host.write(frame, &[0u8; PAGE_SIZE as usize]);
}

/// The guest's long-mode entries with the reserved bits the engine checks: the structural
/// ones of [`LongModeFormat`] (PS in a PML4E, address bits below a large page's base) plus
/// XD when EFER.NXE = 0, plus the address bits at and above the guest's MAXPHYADDR (what
/// CPUID 0x80000008 tells it; 52 unless [`ShadowPaging::with_physical_address_bits`] says).
// See: SDM Vol 3A 4.5.4 (Tables 4-15 to 4-20, "Reserved (must be 0)"); SDM Vol 3A 4.6.2
#[derive(Clone, Copy, Debug)]
struct GuestLongModeFormat {
    no_execute_enabled: bool,
    /// Bits 51:MAXPHYADDR of an entry's address field: reserved. See: SDM Vol 3A 4.5.4.
    reserved_address_bits: u64,
}

impl PageTableFormat for GuestLongModeFormat {
    const ENTRY_BYTES: u64 = LongModeFormat::ENTRY_BYTES;
    const INDEX_BITS: u32 = LongModeFormat::INDEX_BITS;

    fn is_present(&self, entry: u64) -> bool {
        LongModeFormat.is_present(entry)
    }
    fn is_leaf(&self, entry: u64, level: u8) -> bool {
        LongModeFormat.is_leaf(entry, level)
    }
    fn has_reserved_bits(&self, entry: u64, level: u8) -> bool {
        // XD (bit 63) is reserved when IA32_EFER.NXE = 0. See: SDM Vol 3A 4.5.4 (Table 4-15)
        LongModeFormat.has_reserved_bits(entry, level)
            || (!self.no_execute_enabled && entry & NO_EXECUTE != 0)
            || entry & self.reserved_address_bits != 0
    }
    fn table_address(&self, entry: u64) -> u64 {
        LongModeFormat.table_address(entry)
    }
    fn leaf_address(&self, entry: u64, level: u8) -> u64 {
        LongModeFormat.leaf_address(entry, level)
    }
    fn table_entry(&self, table: u64) -> u64 {
        LongModeFormat.table_entry(table)
    }
    fn page_entry(&self, frame: u64) -> u64 {
        LongModeFormat.page_entry(frame)
    }
}

/// The access rights a complete guest walk grants.
// See: SDM Vol 3A 4.6.1 (determination of access rights)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Rights {
    /// U/S = 1 at every level: a user-mode address.
    user: bool,
    /// R/W = 1 at every level.
    writable: bool,
    /// XD = 1 at some level (with NXE = 1).
    no_execute: bool,
}

/// Whether `rights` allow `access` under the guest's CR0.WP, CR4.SMEP/SMAP and EFER.NXE.
// See: SDM Vol 3A 4.6.1 (user and supervisor accesses, CR0.WP, SMEP, SMAP, XD)
fn access_allowed(rights: Rights, access: FaultAccess, state: &GuestPagingState) -> bool {
    let execute_refused = state.no_execute_enabled() && rights.no_execute;
    if access.user {
        // User-mode accesses need a user-mode address; writes need R/W = 1 everywhere; fetches
        // need XD = 0 everywhere.
        rights.user && (!access.write || rights.writable) && (!access.fetch || !execute_refused)
    } else if access.fetch {
        // Supervisor fetches: XD, and SMEP refuses any user-mode address.
        !execute_refused && !(state.smep() && rights.user)
    } else {
        // Supervisor data accesses: SMAP refuses user-mode addresses unless RFLAGS.AC = 1
        // (explicit accesses; implicit ones are not modelled). Writes need R/W = 1 everywhere
        // only when CR0.WP = 1.
        let smap_refuses = state.smap() && rights.user && !access.alignment_check;
        !smap_refuses && (!access.write || rights.writable || !state.write_protect())
    }
}

/// The bits of the error code that describe the access.
// See: SDM Vol 3A 4.7 (W/R, U/S; I/D only when NXE = 1 (with PAE) or SMEP = 1)
fn access_error_bits(access: FaultAccess, state: &GuestPagingState) -> u32 {
    let mut code = 0;
    if access.write {
        code |= ERROR_WRITE;
    }
    if access.user {
        code |= ERROR_USER;
    }
    if access.fetch && (state.no_execute_enabled() || state.smep()) {
        code |= ERROR_FETCH;
    }
    code
}

/// Why a test wants the engine broken (to prove the property tests catch it).
#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Breakage {
    /// Treat every guest page as a user page (ignore U/S).
    IgnoreUserSupervisor,
}

/// The shadow-paging engine of one vCPU: a cache of up to `max_roots` shadow roots, the first
/// of which is the current one.
///
/// Owns host frames but cannot free them on drop (that needs the host): call
/// [`ShadowPaging::release`] when the vCPU ends.
#[derive(Debug)]
pub struct ShadowPaging {
    /// Most recently used first; `roots[0]` is the current root when there is one.
    roots: Vec<ShadowRoot>,
    max_roots: usize,
    max_leaves_per_root: usize,
    stats: ShadowStats,
    /// The guest's MAXPHYADDR (address bits above it are reserved in its entries).
    physical_address_bits: u8,
    #[cfg(test)]
    breakage: Option<Breakage>,
}

impl ShadowPaging {
    /// An engine caching up to `max_roots` shadow roots (at least 1), each with at most
    /// [`DEFAULT_MAX_LEAVES_PER_ROOT`] leaves.
    #[must_use]
    pub fn new(max_roots: usize) -> ShadowPaging {
        ShadowPaging::with_leaf_limit(max_roots, DEFAULT_MAX_LEAVES_PER_ROOT)
    }

    /// Tells the engine the guest's MAXPHYADDR (CPUID 0x80000008:EAX[7:0] as the guest sees
    /// it, 32..=52): entries with address bits at or above it fault with RSVD, as on hardware.
    /// See: SDM Vol 3A 4.1.4, 4.5.4.
    #[must_use]
    pub fn with_physical_address_bits(mut self, bits: u8) -> ShadowPaging {
        self.physical_address_bits = bits.clamp(32, 52);
        self
    }

    /// Like [`ShadowPaging::new`], with at most `max_leaves_per_root` (at least 1) leaves per
    /// long-mode root; a root reaching it is emptied before its next leaf is built.
    #[must_use]
    pub fn with_leaf_limit(max_roots: usize, max_leaves_per_root: usize) -> ShadowPaging {
        ShadowPaging {
            roots: Vec::new(),
            max_roots: max_roots.max(1),
            max_leaves_per_root: max_leaves_per_root.max(1),
            stats: ShadowStats::default(),
            physical_address_bits: 52,
            #[cfg(test)]
            breakage: None,
        }
    }

    /// Breaks the engine on purpose, so a test can show the property tests catch it.
    #[cfg(test)]
    pub(crate) fn break_for_test(&mut self, breakage: Breakage) {
        self.breakage = Some(breakage);
    }

    #[cfg(test)]
    fn ignores_user_supervisor(&self) -> bool {
        self.breakage == Some(Breakage::IgnoreUserSupervisor)
    }

    #[cfg(not(test))]
    fn ignores_user_supervisor(&self) -> bool {
        false
    }

    /// The host-physical root of the current shadow, if one is current.
    #[must_use]
    pub fn current_root(&self) -> Option<HostPhysAddr> {
        self.roots.first().map(|root| root.root)
    }

    /// The number of cached roots (the current one included).
    #[must_use]
    pub fn cached_roots(&self) -> usize {
        self.roots.len()
    }

    /// The number of leaves the current root holds (long mode; 0 for the identity map).
    #[must_use]
    pub fn current_leaves(&self) -> usize {
        self.roots.first().map_or(0, |root| root.leaves.len())
    }

    /// Makes the shadow for `state` current (CR3 load or paging-mode change): a cached root,
    /// resynced against the guest's tables as they are now, or a new empty one; the identity
    /// map for guest paging off is one cache entry like the others. Returns the host-physical
    /// root for the real CR3.
    ///
    /// For [`ShadowFormat::PaeIdentity`] the root is the PDPT at offset 0 of a zeroed frame
    /// (so 32-byte aligned). A 32-bit PAE CR3 can only name a PDPT below 4 GiB: a few frames are
    /// tried to find one there, and when the host hands out none (the test fake's frames start
    /// at 64 GiB) the first frame is used anyway. The kernel's frames are below 4 GiB in
    /// practice; a backend on a host where they are not must check the returned address.
    ///
    /// The caller flushes the real TLB (VPID/ASID) after it, since leaves may have been dropped.
    pub fn activate(
        &mut self,
        ram: &mut GuestRam,
        host: &mut dyn HostMemory,
        state: &GuestPagingState,
    ) -> Result<HostPhysAddr, ActivateError> {
        let real = real_paging(state).map_err(ActivateError::Unsupported)?;
        let key = RootKey::new(state, real.format);
        self.stats.cr3_switches += 1;
        if let Some(position) = self.roots.iter().position(|root| root.key == key) {
            let root = self.roots.remove(position);
            self.roots.insert(0, root);
            self.stats.cr3_cache_hits += 1;
            self.resync_current(ram, host);
            return Ok(self.roots[0].root);
        }
        // A new root: make room in the cache first.
        while self.roots.len() >= self.max_roots {
            if let Some(victim) = self.roots.pop() {
                victim.free(host);
            }
        }
        let root = match key.format {
            ShadowFormat::Long4 => self.allocate_frame(host),
            ShadowFormat::PaeIdentity => self.allocate_low_frame(host),
        }
        .ok_or(ActivateError::OutOfHostMemory)?;
        let mut shadow = ShadowRoot {
            key,
            root,
            tables: BTreeMap::new(),
            leaves: BTreeMap::new(),
            large_pages: BTreeSet::new(),
        };
        if key.format == ShadowFormat::PaeIdentity {
            // The four PDPTEs are filled now and never change: a PD for each GiB of RAM.
            // See: SDM Vol 3A 4.4.1 (PDPTEs are loaded with CR3, not re-read at each walk)
            for gib in 0..4u64 {
                if ram.size() <= gib << 30 {
                    break;
                }
                let Some(directory) = self.allocate_frame(host) else {
                    shadow.free(host);
                    return Err(ActivateError::OutOfHostMemory);
                };
                write_entry(host, root, 3, gib << 30, directory.0 | PRESENT);
                shadow
                    .tables
                    .insert(ShadowRoot::table_key(2, gib << 30), directory);
            }
        }
        self.roots.insert(0, shadow);
        Ok(root)
    }

    /// A zeroed frame for a new root (or its fixed tables); on exhaustion the cached roots are
    /// freed, least recently used first, and it tries again (the caller is about to make
    /// another root current, so the current one may go too).
    fn allocate_frame(&mut self, host: &mut dyn HostMemory) -> Option<HostPhysAddr> {
        allocate_evicting(&mut self.roots, host)
    }

    /// A frame below 4 GiB if the host gives one within a few tries, else the first frame.
    fn allocate_low_frame(&mut self, host: &mut dyn HostMemory) -> Option<HostPhysAddr> {
        let first = self.allocate_frame(host)?;
        if first.0 + PAGE_SIZE <= FOUR_GIB {
            return Some(first);
        }
        let mut rejected = Vec::new();
        let mut found = None;
        for _ in 1..LOW_FRAME_ATTEMPTS {
            match host.allocate_frame() {
                Some(frame) if frame.0 + PAGE_SIZE <= FOUR_GIB => {
                    found = Some(frame);
                    break;
                }
                Some(frame) => rejected.push(frame),
                None => break,
            }
        }
        for frame in rejected {
            host.free_frame(frame);
        }
        match found {
            Some(frame) => {
                host.free_frame(first);
                Some(frame)
            }
            None => Some(first),
        }
    }

    /// Re-reads the guest entries every leaf of the current root was built from and drops the
    /// leaves whose entries changed.
    fn resync_current(&mut self, ram: &GuestRam, host: &mut dyn HostMemory) {
        let Some(root) = self.roots.first_mut() else {
            return;
        };
        // Leaves share their upper entries: read each guest entry once.
        let mut seen: BTreeMap<u64, Option<u64>> = BTreeMap::new();
        let mut stale = Vec::new();
        for (page, record) in &root.leaves {
            let changed = record.entries().iter().any(|entry| {
                let now = *seen
                    .entry(entry.address.0)
                    .or_insert_with(|| ram.read_u64(host, entry.address).ok());
                now != Some(entry.value)
            });
            if changed {
                stale.push(*page);
            }
        }
        self.stats.resync_dropped += stale.len() as u64;
        for page in stale {
            root.drop_leaf(host, page << PAGE_SHIFT);
        }
    }

    /// A #PF the hardware raised while the guest ran on the current shadow, at guest-virtual
    /// `address`.
    ///
    /// The guest's tables are walked fresh. A walk that fails, or rights that refuse `access`,
    /// give [`FaultOutcome::Inject`] (and the page's stale leaves are dropped, as a #PF drops
    /// the TLB entries of its address); a walk that succeeds sets the A bits (and D for a
    /// write), builds the 4 KiB leaf and gives [`FaultOutcome::Fixed`].
    ///
    /// `state` must be the state of the last [`ShadowPaging::activate`]; if it is not (a caller
    /// bug), the shadow for `state` is activated here, and the caller must still load its root.
    pub fn handle_fault(
        &mut self,
        ram: &mut GuestRam,
        host: &mut dyn HostMemory,
        state: &GuestPagingState,
        address: GuestVirtAddr,
        access: FaultAccess,
    ) -> FaultOutcome {
        let format = match real_paging(state) {
            Ok(real) => real.format,
            // Not reachable through a successful activate: stop the VM.
            Err(_) => {
                return FaultOutcome::OutsideRam {
                    guest_physical: GuestPhysAddr(state.cr3 & ADDRESS_MASK_64),
                }
            }
        };
        let key = RootKey::new(state, format);
        if self.roots.first().map(|root| root.key) != Some(key) {
            match self.activate(ram, host, state) {
                Ok(_) => {}
                Err(ActivateError::OutOfHostMemory) => return FaultOutcome::OutOfHostMemory,
                Err(ActivateError::Unsupported(_)) => {
                    return FaultOutcome::OutsideRam {
                        guest_physical: GuestPhysAddr(state.cr3 & ADDRESS_MASK_64),
                    }
                }
            }
        }
        let outcome = match format {
            ShadowFormat::PaeIdentity => self.fault_identity(ram, host, address),
            ShadowFormat::Long4 => self.fault_long_mode(ram, host, state, address, access),
        };
        match outcome {
            FaultOutcome::Fixed => self.stats.faults_fixed += 1,
            FaultOutcome::Inject { .. } => self.stats.faults_injected += 1,
            FaultOutcome::OutsideRam { .. } | FaultOutcome::OutOfHostMemory => {}
        }
        outcome
    }

    /// Paging off: the linear address is the guest-physical address; map its page RW, user.
    fn fault_identity(
        &mut self,
        ram: &mut GuestRam,
        host: &mut dyn HostMemory,
        address: GuestVirtAddr,
    ) -> FaultOutcome {
        let guest_physical = GuestPhysAddr(address.0);
        if address.0 >= FOUR_GIB {
            // Linear addresses are 32 bits wide with paging off outside long mode.
            return FaultOutcome::OutsideRam { guest_physical };
        }
        let frame = match self.guest_frame(ram, host, guest_physical) {
            Ok(frame) => frame,
            Err(outcome) => return outcome,
        };
        // See: SDM Vol 3A 4.4.2 (Table 4-11, PAE PTE: P, R/W, U/S, address)
        let leaf = LongModeFormat.page_entry(frame.0);
        self.install_in_current(host, address.0, leaf)
    }

    /// Long mode: walk the guest's 4-level tables, decide, set A/D, build the leaf.
    fn fault_long_mode(
        &mut self,
        ram: &mut GuestRam,
        host: &mut dyn HostMemory,
        state: &GuestPagingState,
        address: GuestVirtAddr,
        access: FaultAccess,
    ) -> FaultOutcome {
        let linear = address.0;
        let access_bits = access_error_bits(access, state);
        let not_present = FaultOutcome::Inject {
            error_code: access_bits,
        };
        // Bits 63:47 must all equal bit 47 (the hardware raises #GP, not #PF, otherwise).
        // See: SDM Vol 3A 3.3.7.1 (canonical addressing)
        let upper = linear >> 47;
        if upper != 0 && upper != (u64::MAX >> 47) {
            return not_present;
        }

        // Step 1: walk, recording each entry read (one per level, at most 4).
        // See: SDM Vol 3A 4.5.4 (linear-address translation with 4-level paging)
        let format = GuestLongModeFormat {
            no_execute_enabled: state.no_execute_enabled(),
            reserved_address_bits: ((1u64 << 52) - 1) & !((1u64 << self.physical_address_bits) - 1),
        };
        let mut walked = [GuestEntry::default(); 4];
        let mut count = 0usize;
        let ram_view: &GuestRam = ram;
        let walk_result = walk(
            &format,
            state.cr3 & ADDRESS_MASK_64,
            4,
            linear,
            |_table, entry_address| -> Result<u64, ()> {
                let address = GuestPhysAddr(entry_address);
                let value = ram_view.read_u64(host, address).map_err(|_| ())?;
                if let Some(slot) = walked.get_mut(count) {
                    *slot = GuestEntry { address, value };
                    count += 1;
                }
                Ok(value)
            },
        );
        let mapping: Mapping = match walk_result {
            Ok(mapping) => mapping,
            Err(WalkFault::NotPresent { .. }) => {
                // See: SDM Vol 3A 4.7 (P = 0: no translation because an entry was not present)
                self.drop_in_current(host, linear);
                return not_present;
            }
            Err(WalkFault::ReservedBits { .. }) => {
                // See: SDM Vol 3A 4.7 (RSVD = 1 implies P = 1)
                self.drop_in_current(host, linear);
                return FaultOutcome::Inject {
                    error_code: ERROR_PRESENT | ERROR_RESERVED | access_bits,
                };
            }
            Err(WalkFault::Unreadable { table, .. }) => {
                return FaultOutcome::OutsideRam {
                    guest_physical: GuestPhysAddr(table),
                }
            }
        };
        let walked = &walked[..count];

        // Step 2: the rights of the whole walk, and the decision.
        // See: SDM Vol 3A 4.6.1
        let rights = Rights {
            user: self.ignores_user_supervisor()
                || walked.iter().all(|entry| entry.value & USER != 0),
            writable: walked.iter().all(|entry| entry.value & WRITABLE != 0),
            no_execute: state.no_execute_enabled()
                && walked.iter().any(|entry| entry.value & NO_EXECUTE != 0),
        };
        if !access_allowed(rights, access, state) {
            // See: SDM Vol 3A 4.7 (P = 1: a protection violation)
            self.drop_in_current(host, linear);
            return FaultOutcome::Inject {
                error_code: ERROR_PRESENT | access_bits,
            };
        }

        // Step 3: the host frame of the guest page (backed now if lazy).
        let guest_physical = GuestPhysAddr(mapping.physical_address(linear));
        let frame = match self.guest_frame(ram, host, guest_physical.align_down()) {
            Ok(frame) => frame,
            Err(FaultOutcome::OutsideRam { .. }) => {
                return FaultOutcome::OutsideRam { guest_physical };
            }
            Err(outcome) => return outcome,
        };

        // Step 4: A at every level, D on the leaf for a write; then re-read what the leaf is
        // built from (an entry may appear at two levels of a self-referencing walk).
        // See: SDM Vol 3A 4.8
        let mut record = LeafRecord {
            guest_level: mapping.level,
            entries: [GuestEntry::default(); 4],
            count: 0,
        };
        for (position, entry) in walked.iter().enumerate() {
            let is_leaf = position + 1 == walked.len();
            let wanted = ACCESSED | if is_leaf && access.write { DIRTY } else { 0 };
            let current = ram.read_u64(host, entry.address).unwrap_or(entry.value);
            if current & wanted != wanted {
                let updated = (current | wanted).to_le_bytes();
                if let Err(error) = ram.write_allocating(host, entry.address, &updated) {
                    return backing_outcome(error, entry.address);
                }
            }
        }
        for (slot, entry) in record.entries.iter_mut().zip(walked) {
            let value = ram.read_u64(host, entry.address).unwrap_or(entry.value);
            *slot = GuestEntry {
                address: entry.address,
                value,
            };
        }
        record.count = count as u8;
        let guest_leaf = record.entries().last().map_or(0, |entry| entry.value);

        // Step 5: the shadow leaf.
        let converted = !state.write_protect() && access.write && !access.user && !rights.writable;
        let mut leaf = frame.0 | PRESENT | (guest_leaf & CACHING_BITS);
        let pat = if mapping.level == 1 {
            PAT_4K
        } else {
            PAT_LARGE
        };
        if guest_leaf & pat != 0 {
            leaf |= PAT_4K;
        }
        if converted {
            // CR0.WP = 0: writable for the supervisor only; XD under SMEP for a user page.
            // See: SDM Vol 3A 4.6.1 (CR0.WP = 0); module doc
            leaf |= WRITABLE;
            if rights.user && state.smep() && state.no_execute_enabled() {
                leaf |= NO_EXECUTE;
            }
        } else {
            if rights.writable && guest_leaf & DIRTY != 0 {
                leaf |= WRITABLE;
            }
            if rights.user {
                leaf |= USER;
            }
        }
        if rights.no_execute {
            leaf |= NO_EXECUTE;
        }

        // Step 6: install it, within the bound on leaves per root.
        let page = (linear & LINEAR_MASK_48) >> PAGE_SHIFT;
        let Some(root) = self.roots.first_mut() else {
            return FaultOutcome::OutOfHostMemory;
        };
        if root.leaves.len() >= self.max_leaves_per_root && !root.leaves.contains_key(&page) {
            root.clear(host);
            self.stats.rebuilds += 1;
        }
        let outcome = self.install_in_current(host, linear & LINEAR_MASK_48, leaf);
        if outcome == FaultOutcome::Fixed {
            if let Some(root) = self.roots.first_mut() {
                root.leaves.insert(page, record);
                if mapping.level > 1 {
                    let size_pages = mapping.page_size >> PAGE_SHIFT;
                    root.large_pages
                        .insert((page & !(size_pages - 1), mapping.level));
                }
            }
        }
        outcome
    }

    /// The frame of a guest page; on host exhaustion the other cached roots are freed and it
    /// tries once more.
    fn guest_frame(
        &mut self,
        ram: &mut GuestRam,
        host: &mut dyn HostMemory,
        page: GuestPhysAddr,
    ) -> Result<HostPhysAddr, FaultOutcome> {
        match ram.frame_or_allocate(page, host) {
            Ok(frame) => Ok(frame),
            Err(BackingError::OutOfHostMemory) if self.roots.len() > 1 => {
                while self.roots.len() > 1 {
                    if let Some(victim) = self.roots.pop() {
                        victim.free(host);
                    }
                }
                ram.frame_or_allocate(page, host)
                    .map_err(|error| backing_outcome(error, page))
            }
            Err(error) => Err(backing_outcome(error, page)),
        }
    }

    /// Installs `leaf` for `linear` in the current root; a missing table frame may evict the
    /// other cached roots, never the current one.
    fn install_in_current(
        &mut self,
        host: &mut dyn HostMemory,
        linear: u64,
        leaf: u64,
    ) -> FaultOutcome {
        if self.roots.is_empty() {
            return FaultOutcome::OutOfHostMemory;
        }
        let mut current = self.roots.remove(0);
        let others = &mut self.roots;
        let mut allocate = |host: &mut dyn HostMemory| allocate_evicting(others, host);
        let result = current.install_leaf(host, linear, leaf, &mut allocate);
        self.roots.insert(0, current);
        match result {
            Ok(()) => FaultOutcome::Fixed,
            Err(NoFrame) => FaultOutcome::OutOfHostMemory,
        }
    }

    /// Drops the leaves a TLB entry for `linear` could stand for, in the current root.
    fn drop_in_current(&mut self, host: &mut dyn HostMemory, linear: u64) {
        if let Some(root) = self.roots.first_mut() {
            if root.key.format == ShadowFormat::Long4 {
                root.drop_covering(host, linear);
            }
        }
    }

    /// INVLPG of `address`: drops that page's leaf in the current root and in every cached
    /// root (cheap, and right for guest-global pages, which survive CR3 loads); when the guest
    /// mapped the page with a large page, every 4 KiB piece of it goes.
    // See: SDM Vol 3A 4.10.4.1 (INVLPG)
    pub fn invalidate_page(&mut self, host: &mut dyn HostMemory, address: GuestVirtAddr) {
        self.stats.invlpgs += 1;
        for root in &mut self.roots {
            match root.key.format {
                ShadowFormat::Long4 => root.drop_covering(host, address.0),
                // Nothing to invalidate when paging is off; the identity never goes stale.
                ShadowFormat::PaeIdentity => {}
            }
        }
    }

    /// Drops every shadow structure (mode change, host memory pressure, CR4.PGE toggle) and
    /// counts a rebuild; the next activate starts fresh. The real CR3 must be reloaded (by
    /// `activate`) before the guest runs again: the old root's frame is freed.
    pub fn flush_all(&mut self, host: &mut dyn HostMemory) {
        for root in self.roots.drain(..) {
            root.free(host);
        }
        self.stats.rebuilds += 1;
    }

    /// The counters, with `table_frames` the frames held now.
    #[must_use]
    pub fn stats(&self) -> ShadowStats {
        ShadowStats {
            table_frames: self.roots.iter().map(ShadowRoot::frame_count).sum(),
            ..self.stats
        }
    }

    /// Gives every frame back to the host.
    pub fn release(self, host: &mut dyn HostMemory) {
        for root in self.roots {
            root.free(host);
        }
    }
}

/// A zeroed frame from `host`; on exhaustion frees the roots of `roots` from the end (least
/// recently used first) and tries again. Bounded by the number of roots.
fn allocate_evicting(
    roots: &mut Vec<ShadowRoot>,
    host: &mut dyn HostMemory,
) -> Option<HostPhysAddr> {
    loop {
        if let Some(frame) = host.allocate_frame() {
            return Some(frame);
        }
        let victim = roots.pop()?;
        victim.free(host);
    }
}

/// The fault outcome for a failed backing of `address`.
fn backing_outcome(error: BackingError, address: GuestPhysAddr) -> FaultOutcome {
    match error {
        BackingError::OutOfRange { .. } => FaultOutcome::OutsideRam {
            guest_physical: address,
        },
        BackingError::OutOfHostMemory => FaultOutcome::OutOfHostMemory,
    }
}
