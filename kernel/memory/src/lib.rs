//! Guest memory for the hypervisor: typed addresses, guest RAM backed by host frames, the
//! second-level (nested) page tables that map guest-physical to host-physical memory, and
//! read-only walks of the guest's own page tables.
//!
//! Host-testable and free of `unsafe`: host physical memory is reached only through the
//! [`HostMemory`] trait, so tests pass [`fake::FakeHostMemory`]. Everything a guest controls
//! (its page tables, its addresses) is treated as hostile: walks are bounded by the number of
//! paging levels, errors are typed, and nothing panics on guest input.
//!
//! Module map:
//! - [`addr`]: `GuestPhysAddr`, `GuestVirtAddr`, `HostPhysAddr`, `PAGE_SIZE`.
//! - [`host`]: the [`HostMemory`] trait and its test fake.
//! - [`guest_ram`]: [`GuestRam`], the guest's RAM `[0, size)`.
//! - [`page_table`]: the one [`PageTableFormat`] trait and the one generic walker.
//! - [`nested`]: [`NestedPageTables`] in the [`Npt`] or [`Ept`] format.
//! - [`guest_paging`]: guest-virtual to guest-physical translation.
//! - [`shadow`]: [`ShadowPaging`], the shadow page tables for guests without nested paging.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod addr;
pub mod guest_paging;
pub mod guest_ram;
pub mod host;
pub mod nested;
pub mod page_table;
pub mod shadow;

pub use addr::{GuestPhysAddr, GuestVirtAddr, HostPhysAddr, PAGE_SIZE};
pub use guest_paging::{
    paging_mode, read_guest_virtual, translate_guest_virtual, GuestPagingMode, WalkError,
};
pub use guest_ram::BackingError;
pub use guest_ram::{GuestMemoryError, GuestRam};
pub use host::{fake, HostMemory, OutOfHostMemory};
pub use nested::{Ept, NestedFormat, NestedPageTables, Npt};
pub use page_table::PageTableFormat;
pub use shadow::{
    real_paging, ActivateError, FaultAccess, FaultOutcome, GuestPagingState, RealPaging,
    ShadowFormat, ShadowPaging, ShadowStats, Unsupported,
};
