//! The reference for the shadow-paging tests: a deliberately plain walk of 4-level guest
//! tables that decides, for one access, "allowed (to this guest-physical address)" or "denied
//! (with this error code)", written straight from the manual and sharing no code with the
//! engine (not the generic walker, not the engine's rules).
// See: SDM Vol 3A 4.5.4 (4-level translation), 4.6.1 (access rights), 4.7 (error code)

use alloc::vec::Vec;

use crate::addr::GuestPhysAddr;
use crate::guest_ram::GuestRam;
use crate::host::HostMemory;
use crate::shadow::FaultAccess;

/// The control-register bits the rules depend on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// CR0.WP.
    pub write_protect: bool,
    /// EFER.NXE.
    pub no_execute_enabled: bool,
    /// CR4.SMEP.
    pub smep: bool,
    /// CR4.SMAP.
    pub smap: bool,
}

/// What the reference says about one access.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The access is allowed and reaches `guest_physical`.
    Allowed {
        /// The translated address.
        guest_physical: u64,
        /// The guest-physical address of each entry of the walk, top level first.
        entry_addresses: Vec<u64>,
        /// U/S = 1 at every level.
        user_page: bool,
    },
    /// The guest must get #PF with this error code.
    Denied {
        /// The expected error code.
        error_code: u32,
    },
    /// A table of the walk is not in RAM.
    TableOutsideRam {
        /// Its guest-physical address.
        table: u64,
    },
}

const ADDRESS_BITS: u64 = 0x000f_ffff_ffff_f000;

/// The rights rule, for the reference walk and for judging the shadow the hardware walks.
pub fn rule_allows(
    user_page: bool,
    writable_page: bool,
    no_execute_page: bool,
    access: FaultAccess,
    settings: Settings,
) -> bool {
    if access.user {
        if !user_page {
            return false;
        }
        if access.write && !writable_page {
            return false;
        }
        if access.fetch && no_execute_page {
            return false;
        }
        true
    } else if access.fetch {
        if no_execute_page {
            return false;
        }
        if settings.smep && user_page {
            return false;
        }
        true
    } else {
        if settings.smap && user_page && !access.alignment_check {
            return false;
        }
        if access.write && settings.write_protect && !writable_page {
            return false;
        }
        true
    }
}

/// Walks the tables at `cr3` for `linear` and judges `access`.
pub fn reference_walk(
    ram: &GuestRam,
    host: &dyn HostMemory,
    cr3: u64,
    linear: u64,
    access: FaultAccess,
    settings: Settings,
) -> Verdict {
    let mut code = 0u32;
    if access.write {
        code |= 2;
    }
    if access.user {
        code |= 4;
    }
    if access.fetch && (settings.no_execute_enabled || settings.smep) {
        code |= 16;
    }
    let top = linear >> 47;
    if top != 0 && top != 0x1_ffff {
        return Verdict::Denied { error_code: code };
    }
    let mut table = cr3 & ADDRESS_BITS;
    let mut user_page = true;
    let mut writable_page = true;
    let mut no_execute_page = false;
    let mut entry_addresses = Vec::new();
    let mut level = 4u32;
    while level >= 1 {
        let shift = 12 + 9 * (level - 1);
        let index = (linear >> shift) & 511;
        let entry_address = table + index * 8;
        let Ok(entry) = ram.read_u64(host, GuestPhysAddr(entry_address)) else {
            return Verdict::TableOutsideRam { table };
        };
        if entry & 1 == 0 {
            return Verdict::Denied { error_code: code };
        }
        let page_size_bit = entry & 0x80 != 0;
        let reserved = (!settings.no_execute_enabled && entry >> 63 == 1)
            || (level == 4 && page_size_bit)
            || (level == 3 && page_size_bit && entry & 0x3fff_e000 != 0)
            || (level == 2 && page_size_bit && entry & 0x001f_e000 != 0);
        if reserved {
            return Verdict::Denied {
                error_code: code | 1 | 8,
            };
        }
        entry_addresses.push(entry_address);
        if entry & 4 == 0 {
            user_page = false;
        }
        if entry & 2 == 0 {
            writable_page = false;
        }
        if settings.no_execute_enabled && entry >> 63 == 1 {
            no_execute_page = true;
        }
        let is_leaf = level == 1 || ((level == 2 || level == 3) && page_size_bit);
        if is_leaf {
            let offset_mask = (1u64 << shift) - 1;
            let base = entry & ADDRESS_BITS & !offset_mask;
            if !rule_allows(user_page, writable_page, no_execute_page, access, settings) {
                return Verdict::Denied {
                    error_code: code | 1,
                };
            }
            return Verdict::Allowed {
                guest_physical: base | (linear & offset_mask),
                entry_addresses,
                user_page,
            };
        }
        table = entry & ADDRESS_BITS;
        level -= 1;
    }
    Verdict::Denied { error_code: code }
}
