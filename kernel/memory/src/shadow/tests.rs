//! Tests of the shadow-paging engine: unit tests of each mechanism, then property tests that
//! compare the engine, fault by fault, with the plain [`super::reference`] walker.
//!
//! How a broken engine is caught: `property_catches_an_engine_that_ignores_user_supervisor`
//! breaks the engine on purpose (U/S ignored) and shows the property fails, with the message
//! of the assertion "the shadow allows ... but the reference denies it" in `check_access`
//! (a user access to a supervisor page is Fixed while the reference wants an Inject).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

use super::reference::{reference_walk, rule_allows, Settings, Verdict};
use super::*;
use crate::host::fake::FakeHostMemory;
use crate::page_table::{walk, LongModeFormat};

const KIB4: u64 = 4096;
const MIB2: u64 = 2 << 20;
const GIB: u64 = 1 << 30;
/// Guest RAM of the tests: 4 MiB.
const RAM_SIZE: u64 = 4 << 20;
const PRESENT_BIT: u64 = 1;
const RW: u64 = 2;
const US: u64 = 4;
const PS: u64 = 0x80;
const A: u64 = 0x20;
const D: u64 = 0x40;
const NX: u64 = 1 << 63;

fn state_for(cr3: u64, settings: Settings) -> GuestPagingState {
    GuestPagingState {
        cr0: CR0_PROTECTION_ENABLE
            | CR0_PAGING
            | if settings.write_protect {
                CR0_WRITE_PROTECT
            } else {
                0
            },
        cr3,
        cr4: CR4_PHYSICAL_ADDRESS_EXTENSION
            | if settings.smep { CR4_SMEP } else { 0 }
            | if settings.smap { CR4_SMAP } else { 0 },
        efer: EFER_LONG_MODE_ENABLE
            | EFER_LONG_MODE_ACTIVE
            | if settings.no_execute_enabled {
                EFER_NO_EXECUTE_ENABLE
            } else {
                0
            },
    }
}

const ALL_ON: Settings = Settings {
    write_protect: true,
    no_execute_enabled: true,
    smep: false,
    smap: false,
};

fn read() -> FaultAccess {
    FaultAccess {
        write: false,
        user: false,
        fetch: false,
        alignment_check: false,
    }
}
fn write() -> FaultAccess {
    FaultAccess {
        write: true,
        ..read()
    }
}
fn user(access: FaultAccess) -> FaultAccess {
    FaultAccess {
        user: true,
        ..access
    }
}
fn fetch() -> FaultAccess {
    FaultAccess {
        fetch: true,
        ..read()
    }
}

/// Every access kind: read/write/fetch x user/supervisor x RFLAGS.AC.
fn every_access() -> Vec<FaultAccess> {
    let mut accesses = Vec::new();
    for kind in 0..3 {
        for is_user in [false, true] {
            for alignment_check in [false, true] {
                accesses.push(FaultAccess {
                    write: kind == 1,
                    fetch: kind == 2,
                    user: is_user,
                    alignment_check,
                });
            }
        }
    }
    accesses
}

/// A guest: host, lazy RAM, engine and the current state and root.
struct Guest {
    host: FakeHostMemory,
    ram: GuestRam,
    engine: ShadowPaging,
    state: GuestPagingState,
    settings: Settings,
    root: HostPhysAddr,
}

impl Guest {
    fn new(settings: Settings) -> Guest {
        Guest::with_host(settings, FakeHostMemory::new(), 4)
    }

    fn with_host(settings: Settings, host: FakeHostMemory, max_roots: usize) -> Guest {
        Guest {
            host,
            ram: GuestRam::new_lazy(RAM_SIZE),
            engine: ShadowPaging::new(max_roots),
            state: state_for(0x1000, settings),
            settings,
            root: HostPhysAddr(0),
        }
    }

    fn put(&mut self, table: u64, index: u64, entry: u64) {
        self.ram
            .write_allocating(
                &mut self.host,
                GuestPhysAddr(table + index * 8),
                &entry.to_le_bytes(),
            )
            .unwrap();
    }

    fn get(&self, address: u64) -> u64 {
        self.ram
            .read_u64(&self.host, GuestPhysAddr(address))
            .unwrap()
    }

    fn activate(&mut self) -> Result<HostPhysAddr, ActivateError> {
        let root = self
            .engine
            .activate(&mut self.ram, &mut self.host, &self.state)?;
        self.root = root;
        Ok(root)
    }

    fn fault(&mut self, linear: u64, access: FaultAccess) -> FaultOutcome {
        self.engine.handle_fault(
            &mut self.ram,
            &mut self.host,
            &self.state,
            GuestVirtAddr(linear),
            access,
        )
    }

    /// The shadow translation of `linear`: the mapping and the (user, writable, no-execute)
    /// rights of the whole shadow walk, as the real CPU would see them.
    fn shadow(&self, linear: u64) -> Option<(Mapping, bool, bool, bool)> {
        // PAE PDPTEs carry no rights (See: SDM Vol 3A 4.4.2), so they are skipped.
        let (top, skipped) = match self.engine.roots.first()?.key.format {
            ShadowFormat::Long4 => (4, 0),
            ShadowFormat::PaeIdentity => (3, 1),
        };
        let mut entries = Vec::new();
        let host = &self.host;
        let mapping = walk(
            &LongModeFormat,
            self.root.0,
            top,
            linear,
            |_table, entry_address| -> Result<u64, ()> {
                let mut bytes = [0u8; 8];
                host.read(HostPhysAddr(entry_address), &mut bytes);
                let entry = u64::from_le_bytes(bytes);
                entries.push(entry);
                Ok(entry)
            },
        )
        .ok()?;
        let counted = &entries[skipped..];
        Some((
            mapping,
            counted.iter().all(|entry| entry & US != 0),
            counted.iter().all(|entry| entry & RW != 0),
            counted.iter().any(|entry| entry & NX != 0),
        ))
    }

    /// Whether the real CPU (CR0.WP = 1, the guest's SMEP/SMAP/NXE) would let `access` through
    /// the shadow.
    fn hardware_allows(&self, linear: u64, access: FaultAccess) -> bool {
        let Some((_, is_user, writable, no_execute)) = self.shadow(linear) else {
            return false;
        };
        let real = Settings {
            write_protect: true,
            ..self.settings
        };
        rule_allows(
            is_user,
            writable,
            no_execute && self.settings.no_execute_enabled,
            access,
            real,
        )
    }

    fn reference(&self, linear: u64, access: FaultAccess) -> Verdict {
        reference_walk(
            &self.ram,
            &self.host,
            self.state.cr3,
            linear,
            access,
            self.settings,
        )
    }

    /// Frames the shadow holds = frames allocated minus the RAM's.
    fn shadow_frames(&self) -> u64 {
        self.host.allocated_frames() as u64 - self.ram.backed_pages()
    }

    /// Runs `access` like the CPU: it faults while the shadow refuses it, at most 3 times.
    fn run(&mut self, linear: u64, access: FaultAccess) -> FaultOutcome {
        for _ in 0..3 {
            if self.hardware_allows(linear, access) {
                return FaultOutcome::Fixed;
            }
            let outcome = self.fault(linear, access);
            if outcome != FaultOutcome::Fixed {
                return outcome;
            }
        }
        if self.hardware_allows(linear, access) {
            FaultOutcome::Fixed
        } else {
            FaultOutcome::OutOfHostMemory
        }
    }
}

/// Whether the shadow may allow `access` on a leaf built by the CR0.WP = 0 trick although the
/// guest refuses it (the documented gaps: SMAP with AC = 0; SMEP without NXE).
fn documented_gap(guest: &Guest, linear: u64, access: FaultAccess, user_page: bool) -> bool {
    let Some((_, shadow_user, shadow_writable, _)) = guest.shadow(linear) else {
        return false;
    };
    let settings = guest.settings;
    let converted = !settings.write_protect && user_page && !shadow_user && shadow_writable;
    converted
        && !access.user
        && ((settings.smap && !access.alignment_check && !access.fetch)
            || (settings.smep && !settings.no_execute_enabled && access.fetch))
}

/// No access the shadow allows at `linear` may be refused by the guest's tables as they are
/// now (save the documented gaps of the CR0.WP = 0 trick).
fn check_shadow_not_wider(guest: &Guest, linear: u64) -> Result<(), String> {
    let user_page = matches!(
        guest.reference(linear, user(read())),
        Verdict::Allowed { .. }
    );
    for other in every_access() {
        if !guest.hardware_allows(linear, other) {
            continue;
        }
        let allowed = matches!(guest.reference(linear, other), Verdict::Allowed { .. });
        if !allowed && !documented_gap(guest, linear, other, user_page) {
            return Err(format!(
                "the shadow allows {other:?} at {linear:#x} but the reference denies it"
            ));
        }
    }
    Ok(())
}

/// Checks one access against the reference (see the module doc for what fails when).
fn check_access(guest: &mut Guest, linear: u64, access: FaultAccess) -> Result<(), String> {
    let verdict = guest.reference(linear, access);
    let leaf_before = match &verdict {
        Verdict::Allowed {
            entry_addresses, ..
        } => entry_addresses.last().map(|address| guest.get(*address)),
        _ => None,
    };
    // Whether the page is a user page, before the access: the CR0.WP = 0 trick may leave a
    // leaf the guest would refuse (`documented_gap`); the hardware then takes the access
    // without a fault, exactly as it would on a real shadow.
    let user_page = matches!(
        guest.reference(linear, user(read())),
        Verdict::Allowed { .. }
    );
    let outcome = guest.run(linear, access);
    let context = || format!("access {access:?} at {linear:#x} with {:?}", guest.settings);
    match verdict {
        Verdict::Denied { .. }
            if outcome == FaultOutcome::Fixed
                && guest.hardware_allows(linear, access)
                && documented_gap(guest, linear, access, user_page) => {}
        Verdict::Denied { error_code } => {
            if outcome != (FaultOutcome::Inject { error_code }) {
                return Err(format!(
                    "the reference denies {} with error code {error_code:#x}, the engine said \
                     {outcome:?} (the shadow allows it: {})",
                    context(),
                    guest.hardware_allows(linear, access)
                ));
            }
        }
        Verdict::TableOutsideRam { table } => {
            let expected = FaultOutcome::OutsideRam {
                guest_physical: GuestPhysAddr(table),
            };
            if outcome != expected {
                return Err(format!(
                    "table {table:#x} outside RAM for {}: engine said {outcome:?}",
                    context()
                ));
            }
        }
        Verdict::Allowed {
            guest_physical,
            entry_addresses,
            ..
        } => {
            if guest_physical >= RAM_SIZE {
                let expected = FaultOutcome::OutsideRam {
                    guest_physical: GuestPhysAddr(guest_physical),
                };
                if outcome != expected {
                    return Err(format!(
                        "{} reaches {guest_physical:#x} outside RAM: engine said {outcome:?}",
                        context()
                    ));
                }
                return Ok(());
            }
            if outcome != FaultOutcome::Fixed {
                return Err(format!(
                    "the reference allows {}, the engine said {outcome:?}",
                    context()
                ));
            }
            let (mapping, ..) = guest.shadow(linear).ok_or("no shadow translation")?;
            let frame = guest.ram.host_frame(GuestPhysAddr(guest_physical));
            if Some(HostPhysAddr(mapping.page_base)) != frame {
                return Err(format!(
                    "shadow frame {:#x} is not the RAM frame {frame:?} of {guest_physical:#x}",
                    mapping.page_base
                ));
            }
            for address in &entry_addresses {
                if guest.get(*address) & A == 0 {
                    return Err(format!("A not set at {address:#x} after {}", context()));
                }
            }
            let leaf_address = *entry_addresses.last().ok_or("empty walk")?;
            let leaf_now = guest.get(leaf_address);
            if access.write && leaf_now & D == 0 {
                return Err(format!("D not set on the leaf after {}", context()));
            }
            if !access.write && leaf_before.map(|before| before & D) != Some(leaf_now & D) {
                return Err(format!("D changed by {}", context()));
            }
            check_shadow_not_wider(guest, linear)?;
            if guest.hardware_allows(linear, write()) && guest.get(leaf_address) & D == 0 {
                return Err(format!(
                    "the shadow allows a write before D = 1 (after {})",
                    context()
                ));
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// A fixed layout for the unit tests: PML4 0x1000, PDPT 0x2000, PD 0x3000, PT 0x4000.
// ---------------------------------------------------------------------------------------------

const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
const PT: u64 = 0x4000;

/// PML4[0] -> PDPT[0] -> PD[0] -> PT; PT[n] maps 0x10_0000 + n pages with `leaf_flags`.
fn small_guest(settings: Settings, leaf_flags: u64) -> Guest {
    let mut guest = Guest::new(settings);
    guest.put(PML4, 0, PDPT | PRESENT_BIT | RW | US);
    guest.put(PDPT, 0, PD | PRESENT_BIT | RW | US);
    guest.put(PD, 0, PT | PRESENT_BIT | RW | US);
    for page in 0..8 {
        guest.put(PT, page, (0x10_0000 + page * KIB4) | leaf_flags);
    }
    guest.activate().unwrap();
    guest
}

#[test]
fn real_paging_registers() {
    let long = state_for(0x1000, ALL_ON);
    let real = real_paging(&GuestPagingState {
        cr4: long.cr4 | CR4_PAGE_GLOBAL_ENABLE | CR4_PROTECTION_KEYS_USER | CR4_SMEP,
        cr0: long.cr0 & !CR0_WRITE_PROTECT,
        ..long
    })
    .unwrap();
    assert_eq!(real.format, ShadowFormat::Long4);
    assert_eq!(
        real.cr0,
        CR0_PROTECTION_ENABLE | CR0_PAGING | CR0_WRITE_PROTECT | CR0_NUMERIC_ERROR
    );
    assert_eq!(real.cr4, CR4_PHYSICAL_ADDRESS_EXTENSION | CR4_SMEP);
    assert_eq!(real.efer, long.efer);

    let off = GuestPagingState {
        cr0: 0x10,
        cr3: 0,
        cr4: CR4_SMEP | CR4_SMAP | CR4_PAGE_GLOBAL_ENABLE,
        efer: EFER_LONG_MODE_ENABLE | EFER_NO_EXECUTE_ENABLE,
    };
    let real = real_paging(&off).unwrap();
    assert_eq!(real.format, ShadowFormat::PaeIdentity);
    assert_eq!(
        real.cr0,
        0x10 | CR0_PROTECTION_ENABLE | CR0_PAGING | CR0_WRITE_PROTECT | CR0_NUMERIC_ERROR
    );
    assert_eq!(real.cr4, CR4_PHYSICAL_ADDRESS_EXTENSION);
    assert_eq!(real.efer, EFER_NO_EXECUTE_ENABLE);

    let legacy = GuestPagingState {
        cr0: CR0_PROTECTION_ENABLE | CR0_PAGING,
        ..Default::default()
    };
    assert_eq!(real_paging(&legacy), Err(Unsupported::ThirtyTwoBitPaging));
    let pae = GuestPagingState {
        cr4: CR4_PHYSICAL_ADDRESS_EXTENSION,
        ..legacy
    };
    assert_eq!(real_paging(&pae), Err(Unsupported::ThirtyTwoBitPaging));
    let five = GuestPagingState {
        cr4: long.cr4 | CR4_57_BIT_LINEAR_ADDRESSES,
        ..long
    };
    assert_eq!(real_paging(&five), Err(Unsupported::FiveLevelPaging));
    let mut engine = ShadowPaging::new(2);
    let mut host = FakeHostMemory::new();
    let mut ram = GuestRam::new_lazy(RAM_SIZE);
    assert_eq!(
        engine.activate(&mut ram, &mut host, &five),
        Err(ActivateError::Unsupported(Unsupported::FiveLevelPaging))
    );
    assert_eq!(host.allocated_frames(), 0);
}

#[test]
fn a_fault_builds_a_leaf_sets_accessed_and_counts() {
    let mut guest = small_guest(ALL_ON, PRESENT_BIT | RW | US);
    let linear = 3 * KIB4 + 0x10;
    assert!(!guest.hardware_allows(linear, read()));
    assert_eq!(guest.fault(linear, read()), FaultOutcome::Fixed);
    let (mapping, is_user, writable, no_execute) = guest.shadow(linear).unwrap();
    assert_eq!(
        Some(HostPhysAddr(mapping.page_base)),
        guest.ram.host_frame(GuestPhysAddr(0x10_3000))
    );
    // Read-only until the guest's D is set; user; executable.
    assert!(is_user && !writable && !no_execute);
    for address in [PML4, PDPT, PD, PT + 3 * 8] {
        assert_ne!(guest.get(address) & A, 0, "A at {address:#x}");
    }
    assert_eq!(guest.get(PT + 3 * 8) & D, 0);
    // The first write is a hypervisor-caused fault: D set, shadow writable.
    assert!(!guest.hardware_allows(linear, write()));
    assert_eq!(guest.fault(linear, write()), FaultOutcome::Fixed);
    assert_ne!(guest.get(PT + 3 * 8) & D, 0);
    assert!(guest.hardware_allows(linear, write()));
    let stats = guest.engine.stats();
    assert_eq!(stats.faults_fixed, 2);
    assert_eq!(stats.faults_injected, 0);
    assert_eq!(stats.table_frames, 4);
    assert_eq!(stats.table_frames, guest.shadow_frames());
}

#[test]
fn error_codes_follow_the_manual() {
    // Not present at the PT: P = 0.
    let mut guest = small_guest(ALL_ON, PRESENT_BIT | RW);
    assert_eq!(
        guest.fault(0x8000, user(write())),
        FaultOutcome::Inject { error_code: 0b110 }
    );
    // Supervisor page, user read: P = 1, U = 1.
    assert_eq!(
        guest.fault(0x1000, user(read())),
        FaultOutcome::Inject { error_code: 0b101 }
    );
    // Reserved: XD with NXE = 0, on a fetch: P | RSVD, and I/D stays 0 without NXE and SMEP.
    let settings = Settings {
        no_execute_enabled: false,
        ..ALL_ON
    };
    let mut guest = small_guest(settings, PRESENT_BIT | RW | US | NX);
    assert_eq!(
        guest.fault(0x1000, fetch()),
        FaultOutcome::Inject { error_code: 0b1001 }
    );
    // NX page, user fetch with NXE: P | U | I.
    let mut guest = small_guest(ALL_ON, PRESENT_BIT | RW | US | NX);
    assert_eq!(
        guest.fault(0x1000, user(fetch())),
        FaultOutcome::Inject {
            error_code: 0b10101
        }
    );
    // PS in a PML4E is reserved.
    guest.put(PML4, 1, PDPT | PRESENT_BIT | PS);
    assert_eq!(
        guest.fault(1 << 39, read()),
        FaultOutcome::Inject { error_code: 0b1001 }
    );
    assert_eq!(guest.engine.stats().faults_injected, 2);
}

#[test]
fn smep_smap_and_write_protect() {
    let settings = Settings {
        write_protect: true,
        no_execute_enabled: true,
        smep: true,
        smap: true,
    };
    let mut guest = small_guest(settings, PRESENT_BIT | US);
    // SMEP: supervisor fetch from a user page.
    assert_eq!(
        guest.fault(0, fetch()),
        FaultOutcome::Inject {
            error_code: 0b10001
        }
    );
    // SMAP: supervisor read of a user page with AC = 0, allowed with AC = 1.
    assert_eq!(
        guest.fault(0, read()),
        FaultOutcome::Inject { error_code: 0b1 }
    );
    let with_ac = FaultAccess {
        alignment_check: true,
        ..read()
    };
    assert_eq!(guest.fault(0, with_ac), FaultOutcome::Fixed);
    // WP = 1: supervisor write to a read-only page.
    assert_eq!(
        guest.fault(
            0,
            FaultAccess {
                alignment_check: true,
                ..write()
            }
        ),
        FaultOutcome::Inject { error_code: 0b11 }
    );
}

#[test]
fn write_protect_off_gives_a_supervisor_only_writable_leaf() {
    let settings = Settings {
        write_protect: false,
        no_execute_enabled: true,
        smep: true,
        smap: false,
    };
    // A read-only user page.
    let mut guest = small_guest(settings, PRESENT_BIT | US);
    assert_eq!(guest.run(0x2000, write()), FaultOutcome::Fixed);
    let (_, is_user, writable, no_execute) = guest.shadow(0x2000).unwrap();
    assert!(!is_user && writable && no_execute);
    assert_ne!(guest.get(PT + 2 * 8) & D, 0);
    // A user read faults on that leaf and is re-evaluated: allowed, the leaf becomes user again.
    assert!(!guest.hardware_allows(0x2000, user(read())));
    assert_eq!(guest.run(0x2000, user(read())), FaultOutcome::Fixed);
    let (_, is_user, writable, _) = guest.shadow(0x2000).unwrap();
    assert!(is_user && !writable);
    // The user write the guest forbids.
    assert_eq!(
        guest.run(0x2000, user(write())),
        FaultOutcome::Inject { error_code: 0b111 }
    );
}

#[test]
fn large_pages_are_split_into_4k_leaves() {
    let mut guest = Guest::new(ALL_ON);
    guest.put(PML4, 0, PDPT | PRESENT_BIT | RW | US);
    guest.put(PDPT, 0, PD | PRESENT_BIT | RW | US);
    // PD[1]: a 2 MiB page at guest-physical 2 MiB; PDPT[1]: a 1 GiB page at 0.
    guest.put(PD, 1, MIB2 | PRESENT_BIT | RW | PS);
    guest.put(PDPT, 1, PRESENT_BIT | RW | US | PS);
    guest.activate().unwrap();
    for offset in [0, 5 * KIB4 + 7, MIB2 - 1] {
        let linear = MIB2 + offset;
        assert_eq!(check_access(&mut guest, linear, write()), Ok(()));
        let (mapping, ..) = guest.shadow(linear).unwrap();
        assert_eq!(mapping.page_size, KIB4);
        assert_eq!(
            Some(HostPhysAddr(mapping.page_base)),
            guest.ram.host_frame(GuestPhysAddr(MIB2 + offset))
        );
    }
    assert_ne!(guest.get(PD + 8) & D, 0);
    for offset in [0x1234, MIB2 + 0x10] {
        assert_eq!(check_access(&mut guest, GIB + offset, user(read())), Ok(()));
    }
    // Inside the 1 GiB page but outside RAM.
    assert_eq!(
        guest.fault(GIB + 100 * MIB2, read()),
        FaultOutcome::OutsideRam {
            guest_physical: GuestPhysAddr(100 * MIB2)
        }
    );
    // INVLPG of any address in the 2 MiB page drops every 4 KiB piece of it.
    assert_eq!(guest.engine.current_leaves(), 5);
    guest
        .engine
        .invalidate_page(&mut guest.host, GuestVirtAddr(MIB2 + 0x1f_0000));
    assert_eq!(guest.engine.current_leaves(), 2);
    assert!(guest.shadow(MIB2).is_none() && guest.shadow(MIB2 + MIB2 - 1).is_none());
    guest
        .engine
        .invalidate_page(&mut guest.host, GuestVirtAddr(GIB + 0x3000_0000));
    assert_eq!(guest.engine.current_leaves(), 0);
    assert_eq!(guest.engine.stats().invlpgs, 2);
}

#[test]
fn resync_drops_changed_leaves_and_keeps_the_others() {
    let mut guest = Guest::with_host(ALL_ON, FakeHostMemory::new(), 2);
    guest.put(PML4, 0, PDPT | PRESENT_BIT | RW | US);
    guest.put(PDPT, 0, PD | PRESENT_BIT | RW | US);
    guest.put(PD, 0, PT | PRESENT_BIT | RW | US);
    guest.put(PT, 1, 0x10_1000 | PRESENT_BIT | RW | US);
    guest.put(PT, 2, 0x10_2000 | PRESENT_BIT | RW | US);
    // A second address space at 0x5000 sharing the PDPT.
    guest.put(0x5000, 0, PDPT | PRESENT_BIT | RW | US);
    let first = guest.activate().unwrap();
    assert_eq!(guest.run(0x1000, read()), FaultOutcome::Fixed);
    assert_eq!(guest.run(0x2000, read()), FaultOutcome::Fixed);

    guest.state.cr3 = 0x5000;
    let second = guest.activate().unwrap();
    assert_ne!(first, second);
    // While away, the guest remaps page 1 (no INVLPG needed: CR3 will be reloaded).
    guest.put(PT, 1, 0x10_7000 | PRESENT_BIT | RW | US);
    guest.state.cr3 = 0x1000;
    assert_eq!(guest.activate().unwrap(), first);
    let stats = guest.engine.stats();
    assert_eq!(stats.cr3_switches, 3);
    assert_eq!(stats.cr3_cache_hits, 1);
    assert_eq!(stats.resync_dropped, 1);
    assert!(guest.shadow(0x1000).is_none(), "the stale leaf is gone");
    assert!(
        guest.shadow(0x2000).is_some(),
        "the unchanged leaf survives"
    );
    assert_eq!(check_access(&mut guest, 0x1000, read()), Ok(()));
    assert_eq!(
        guest.shadow(0x1000).unwrap().0.page_base,
        guest.ram.host_frame(GuestPhysAddr(0x10_7000)).unwrap().0
    );
    // Clearing A in an upper level (page aging) also counts as a change.
    let pd_entry = guest.get(PD);
    guest.put(PD, 0, pd_entry & !A);
    guest.activate().unwrap();
    assert_eq!(guest.engine.current_leaves(), 0);
    assert_eq!(guest.engine.stats().resync_dropped, 3);
}

#[test]
fn the_cache_holds_at_most_max_roots() {
    let mut guest = Guest::with_host(ALL_ON, FakeHostMemory::new(), 2);
    for cr3 in [0x1000, 0x2000, 0x3000, 0x1000] {
        guest.state.cr3 = cr3;
        guest.activate().unwrap();
        assert!(guest.engine.cached_roots() <= 2);
    }
    assert_eq!(guest.engine.stats().cr3_cache_hits, 0);
    assert_eq!(guest.shadow_frames(), 2);
    // The root key includes the bits that shape the leaves: WP off is another root.
    guest.state.cr0 &= !CR0_WRITE_PROTECT;
    let other = guest.activate().unwrap();
    guest.state.cr0 |= CR0_WRITE_PROTECT;
    assert_ne!(guest.activate().unwrap(), other);
}

#[test]
fn invalidate_page_drops_the_leaf_in_every_root() {
    let mut guest = small_guest(ALL_ON, PRESENT_BIT | RW | US);
    guest.put(0x5000, 0, PDPT | PRESENT_BIT | RW | US);
    assert_eq!(guest.run(0x1000, read()), FaultOutcome::Fixed);
    assert_eq!(guest.run(0x2000, read()), FaultOutcome::Fixed);
    guest.state.cr3 = 0x5000;
    guest.activate().unwrap();
    assert_eq!(guest.run(0x1000, read()), FaultOutcome::Fixed);
    // The guest changes a global page's PTE and invalidates it: both roots lose it.
    guest.put(PT, 1, 0x10_6000 | PRESENT_BIT | RW | US);
    guest
        .engine
        .invalidate_page(&mut guest.host, GuestVirtAddr(0x1abc));
    assert!(guest.shadow(0x1000).is_none());
    guest.state.cr3 = 0x1000;
    guest.activate().unwrap();
    assert!(guest.shadow(0x1000).is_none());
    assert!(guest.shadow(0x2000).is_some());
    // Non-canonical and unmapped addresses are harmless.
    guest
        .engine
        .invalidate_page(&mut guest.host, GuestVirtAddr(0x8000_0000_0000_0000));
    assert_eq!(guest.engine.stats().invlpgs, 2);
}

#[test]
fn an_injected_fault_drops_the_stale_leaf() {
    let mut guest = small_guest(ALL_ON, PRESENT_BIT | RW | US);
    assert_eq!(guest.run(0x1000, read()), FaultOutcome::Fixed);
    // The guest makes the page supervisor-only without INVLPG; a user write faults (the
    // shadow is read-only), the fresh walk refuses it, and the stale user leaf goes too.
    guest.put(PT, 1, 0x10_1000 | PRESENT_BIT | RW);
    assert_eq!(
        guest.run(0x1000, user(write())),
        FaultOutcome::Inject { error_code: 0b111 }
    );
    assert!(guest.shadow(0x1000).is_none());
}

#[test]
fn flush_all_and_release_free_every_shadow_frame() {
    let mut guest = small_guest(ALL_ON, PRESENT_BIT | RW | US);
    guest.put(0x5000, 0, PDPT | PRESENT_BIT | RW | US);
    for page in 0..8 {
        assert_eq!(guest.run(page * KIB4, write()), FaultOutcome::Fixed);
    }
    guest.state.cr3 = 0x5000;
    guest.activate().unwrap();
    assert_eq!(guest.run(0x1000, read()), FaultOutcome::Fixed);
    assert_eq!(guest.engine.stats().table_frames, 8);
    assert_eq!(guest.shadow_frames(), 8);
    guest.engine.flush_all(&mut guest.host);
    assert_eq!(guest.shadow_frames(), 0);
    assert_eq!(
        guest.host.allocated_frames() as u64,
        guest.ram.backed_pages()
    );
    let stats = guest.engine.stats();
    assert_eq!((stats.rebuilds, stats.table_frames), (1, 0));
    assert_eq!(guest.engine.current_root(), None);
    // The next activate starts fresh.
    guest.activate().unwrap();
    assert_eq!(guest.run(0x1000, read()), FaultOutcome::Fixed);
    let Guest {
        mut host,
        ram,
        engine,
        ..
    } = guest;
    engine.release(&mut host);
    assert_eq!(host.allocated_frames() as u64, ram.backed_pages());
    ram.release(&mut host);
    assert_eq!(host.allocated_frames(), 0);
}

#[test]
fn out_of_host_memory_is_reported_not_panicked() {
    // The guest's tables take 4 frames; the root, 1; the fault needs 3 tables + 1 page.
    for limit in 4..=9 {
        let mut host = FakeHostMemory::with_frame_limit(limit);
        let mut guest = Guest::new(ALL_ON);
        core::mem::swap(&mut guest.host, &mut host);
        guest.put(PML4, 0, PDPT | PRESENT_BIT | RW | US);
        guest.put(PDPT, 0, PD | PRESENT_BIT | RW | US);
        guest.put(PD, 0, PT | PRESENT_BIT | RW | US);
        guest.put(PT, 0, 0x10_0000 | PRESENT_BIT | RW | US);
        let activated = guest.activate();
        let outcome = guest.fault(0, read());
        match limit {
            4 => {
                assert_eq!(activated, Err(ActivateError::OutOfHostMemory));
                // handle_fault activates by itself and fails the same way.
                assert_eq!(outcome, FaultOutcome::OutOfHostMemory);
            }
            _ => {
                assert!(activated.is_ok());
                let expected = if limit == 9 {
                    FaultOutcome::Fixed
                } else {
                    FaultOutcome::OutOfHostMemory
                };
                assert_eq!(outcome, expected, "limit {limit}");
            }
        }
        guest.engine.flush_all(&mut guest.host);
        assert_eq!(
            guest.host.allocated_frames() as u64,
            guest.ram.backed_pages()
        );
    }
    let mut host = FakeHostMemory::with_frame_limit(9);
    let mut guest = Guest::new(ALL_ON);
    core::mem::swap(&mut guest.host, &mut host);
    guest.put(PML4, 0, PDPT | PRESENT_BIT | RW | US);
    guest.put(PDPT, 0, PD | PRESENT_BIT | RW | US);
    guest.put(PD, 0, PT | PRESENT_BIT | RW | US);
    guest.put(PT, 0, 0x10_0000 | PRESENT_BIT | RW | US);
    guest.put(PT, 1, 0x10_1000 | PRESENT_BIT | RW | US);
    guest.activate().unwrap();
    assert_eq!(guest.fault(0, read()), FaultOutcome::Fixed);
    // The second page has no frame left.
    assert_eq!(guest.fault(0x1000, read()), FaultOutcome::OutOfHostMemory);
}

#[test]
fn a_missing_frame_evicts_the_other_cached_roots_first() {
    let mut host = FakeHostMemory::with_frame_limit(10);
    let mut guest = Guest::with_host(ALL_ON, FakeHostMemory::new(), 4);
    core::mem::swap(&mut guest.host, &mut host);
    guest.put(PML4, 0, PDPT | PRESENT_BIT | RW | US);
    guest.put(PDPT, 0, PD | PRESENT_BIT | RW | US);
    guest.put(PD, 0, PT | PRESENT_BIT | RW | US);
    guest.put(PT, 0, 0x10_0000 | PRESENT_BIT | RW | US);
    // Two other roots (2 frames) besides the current one.
    for cr3 in [0x6000, 0x7000, PML4] {
        guest.state.cr3 = cr3;
        guest.activate().unwrap();
    }
    assert_eq!(guest.engine.cached_roots(), 3);
    // 4 guest frames + 3 roots = 7 of 10: the fault needs 3 tables + 1 page.
    assert_eq!(guest.fault(0, read()), FaultOutcome::Fixed);
    assert_eq!(guest.engine.cached_roots(), 2);
}

#[test]
fn the_leaf_bound_empties_a_root() {
    let mut guest = small_guest(ALL_ON, PRESENT_BIT | RW | US);
    let old = core::mem::replace(&mut guest.engine, ShadowPaging::with_leaf_limit(2, 3));
    old.release(&mut guest.host);
    guest.activate().unwrap();
    for page in 0..3 {
        assert_eq!(guest.run(page * KIB4, read()), FaultOutcome::Fixed);
    }
    assert_eq!(guest.engine.current_leaves(), 3);
    assert_eq!(guest.run(3 * KIB4, read()), FaultOutcome::Fixed);
    assert_eq!(guest.engine.current_leaves(), 1);
    assert!(guest.shadow(0).is_none());
    assert_eq!(guest.engine.stats().rebuilds, 1);
    assert_eq!(guest.shadow_frames(), 4);
}

#[test]
fn self_referencing_tables_terminate() {
    let mut guest = Guest::new(ALL_ON);
    // PML4[0] and PML4[511] point at the PML4 itself.
    guest.put(PML4, 0, PML4 | PRESENT_BIT | RW | US);
    guest.put(PML4, 511, PML4 | PRESENT_BIT | RW);
    guest.activate().unwrap();
    // Address 0x18 walks PML4[0] four times and lands on the PML4 page.
    assert_eq!(check_access(&mut guest, 0x18, write()), Ok(()));
    assert_eq!(
        guest.shadow(0).unwrap().0.page_base,
        guest.ram.host_frame(GuestPhysAddr(PML4)).unwrap().0
    );
    // A and D landed on the one entry the walk used at every level.
    assert_eq!(guest.get(PML4) & (A | D), A | D);
    assert_eq!(
        check_access(&mut guest, 0xffff_ffff_ffff_f000, read()),
        Ok(())
    );
    assert_eq!(
        check_access(&mut guest, 0xffff_ffff_ffff_f000, user(read())),
        Ok(())
    );
    // Non-canonical: never a #PF on hardware; answered without a walk.
    assert_eq!(
        guest.fault(0x8000_0000_0000, read()),
        FaultOutcome::Inject { error_code: 0 }
    );
}

#[test]
fn tables_outside_ram_stop_the_vm() {
    let mut guest = Guest::new(ALL_ON);
    guest.put(PML4, 0, (1 << 40) | PRESENT_BIT | RW | US);
    guest.activate().unwrap();
    assert_eq!(
        guest.fault(0, read()),
        FaultOutcome::OutsideRam {
            guest_physical: GuestPhysAddr(1 << 40)
        }
    );
    guest.state.cr3 = 64 << 20;
    assert_eq!(
        guest.fault(0, read()),
        FaultOutcome::OutsideRam {
            guest_physical: GuestPhysAddr(64 << 20)
        }
    );
}

#[test]
fn paging_off_runs_on_an_identity_map() {
    let mut guest = Guest::new(ALL_ON);
    guest.state = GuestPagingState {
        cr0: CR0_PROTECTION_ENABLE,
        ..Default::default()
    };
    let root = guest.activate().unwrap();
    assert_eq!(root.0 % 32, 0);
    // One PDPT + one PD (RAM is below 1 GiB).
    assert_eq!(guest.shadow_frames(), 2);
    for (linear, access) in [(0x1234, read()), (0x3f_f000, user(write())), (0, fetch())] {
        assert_eq!(guest.run(linear, access), FaultOutcome::Fixed);
        let (mapping, is_user, writable, no_execute) = guest.shadow(linear).unwrap();
        assert!(is_user && writable && !no_execute);
        assert_eq!(
            Some(HostPhysAddr(mapping.page_base)),
            guest.ram.host_frame(GuestPhysAddr(linear))
        );
    }
    assert_eq!(
        guest.fault(RAM_SIZE, read()),
        FaultOutcome::OutsideRam {
            guest_physical: GuestPhysAddr(RAM_SIZE)
        }
    );
    assert_eq!(
        guest.fault(1 << 32, read()),
        FaultOutcome::OutsideRam {
            guest_physical: GuestPhysAddr(1 << 32)
        }
    );
    // Switching to paging and back: one identity root, cached.
    guest.state = state_for(PML4, ALL_ON);
    guest.activate().unwrap();
    guest.state = GuestPagingState {
        cr0: CR0_PROTECTION_ENABLE,
        ..Default::default()
    };
    assert_eq!(guest.activate().unwrap(), root);
    assert!(guest.shadow(0x1234).is_some());
    assert_eq!(guest.engine.stats().cr3_cache_hits, 1);
}

// ---------------------------------------------------------------------------------------------
// Exhaustive: every combination of R/W, U/S, XD at the PDE and the PTE, D on the PTE, every
// setting of CR0.WP, EFER.NXE, CR4.SMEP, CR4.SMAP and every access.
// ---------------------------------------------------------------------------------------------

#[test]
fn every_permission_combination_matches_the_reference() {
    let mut checked = 0;
    for directory_flags in 0..8u64 {
        for leaf_flags in 0..16u64 {
            for setting_bits in 0..16u8 {
                let settings = Settings {
                    write_protect: setting_bits & 1 != 0,
                    no_execute_enabled: setting_bits & 2 != 0,
                    smep: setting_bits & 4 != 0,
                    smap: setting_bits & 8 != 0,
                };
                let flags = |bits: u64| {
                    PRESENT_BIT
                        | if bits & 1 != 0 { RW } else { 0 }
                        | if bits & 2 != 0 { US } else { 0 }
                        | if bits & 4 != 0 { NX } else { 0 }
                        | if bits & 8 != 0 { D } else { 0 }
                };
                for access in every_access() {
                    let mut guest = Guest::new(settings);
                    guest.state = state_for(PML4, settings);
                    guest.put(PML4, 0, PDPT | PRESENT_BIT | RW | US);
                    guest.put(PDPT, 0, PD | PRESENT_BIT | RW | US);
                    guest.put(PD, 0, PT | flags(directory_flags));
                    guest.put(PT, 5, 0x20_0000 | flags(leaf_flags));
                    guest.activate().unwrap();
                    if let Err(message) = check_access(&mut guest, 0x5000, access) {
                        panic!("PDE {directory_flags:#b} PTE {leaf_flags:#b}: {message}");
                    }
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 8 * 16 * 16 * 12);
}

// ---------------------------------------------------------------------------------------------
// Property tests: random guest tables, random operations.
// ---------------------------------------------------------------------------------------------

/// Guest-physical pages of the table pool: pages 1 to 6.
const POOL: usize = 6;
/// The table indices the random tables fill (and the random addresses use).
const INDICES: [u64; 3] = [0, 1, 511];

#[derive(Clone, Copy, Debug)]
enum Target {
    /// One of the pool's tables.
    Table(usize),
    /// A 4 KiB page in RAM.
    RamPage(u64),
    /// A page outside RAM.
    Outside(u64),
    /// A 2 MiB-aligned address (0, 2 MiB in RAM; 4 MiB outside).
    Large(u64),
    /// A 1 GiB-aligned address (0 or 1 GiB).
    Huge(u64),
}

#[derive(Clone, Copy, Debug)]
struct EntrySpec {
    present: bool,
    writable: bool,
    user: bool,
    no_execute: bool,
    page_size: bool,
    accessed: bool,
    dirty: bool,
    noise: bool,
    target: Target,
}

impl EntrySpec {
    fn value(&self) -> u64 {
        let address = match self.target {
            Target::Table(table) => (1 + table as u64) * KIB4,
            Target::RamPage(page) => page * KIB4,
            Target::Outside(page) => RAM_SIZE + page * KIB4,
            Target::Large(index) => index * MIB2,
            Target::Huge(index) => index * GIB,
        };
        let bit = |set: bool, value: u64| if set { value } else { 0 };
        address
            | bit(self.present, PRESENT_BIT)
            | bit(self.writable, RW)
            | bit(self.user, US)
            | bit(self.no_execute, NX)
            | bit(self.page_size, PS)
            | bit(self.accessed, A)
            | bit(self.dirty, D)
            // Bit 13: reserved in a large page, an address bit in a 4 KiB one.
            | bit(self.noise, 1 << 13)
    }
}

fn entry_strategy() -> impl Strategy<Value = EntrySpec> {
    let target = prop_oneof![
        24 => (0..POOL).prop_map(Target::Table),
        2 => (0..(RAM_SIZE / KIB4)).prop_map(Target::RamPage),
        1 => (0..4u64).prop_map(Target::Outside),
        1 => (0..3u64).prop_map(Target::Large),
        1 => (0..2u64).prop_map(Target::Huge),
    ];
    (
        prop::bool::weighted(0.93),
        prop::bool::weighted(0.7),
        prop::bool::weighted(0.7),
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.12),
        any::<bool>(),
        any::<bool>(),
        prop::bool::weighted(0.03),
        target,
    )
        .prop_map(
            |(present, writable, user, no_execute, page_size, accessed, dirty, noise, target)| {
                EntrySpec {
                    present,
                    writable,
                    user,
                    no_execute,
                    page_size,
                    accessed,
                    dirty,
                    noise,
                    target,
                }
            },
        )
}

fn settings_strategy() -> impl Strategy<Value = Settings> {
    (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()).prop_map(
        |(write_protect, no_execute_enabled, smep, smap)| Settings {
            write_protect,
            no_execute_enabled,
            smep,
            smap,
        },
    )
}

fn access_strategy() -> impl Strategy<Value = FaultAccess> {
    (0..3u8, any::<bool>(), any::<bool>()).prop_map(|(kind, is_user, alignment_check)| {
        FaultAccess {
            write: kind == 1,
            fetch: kind == 2,
            user: is_user,
            alignment_check,
        }
    })
}

/// A linear address built from one index of [`INDICES`] per level (so walks share tables).
fn linear_strategy() -> impl Strategy<Value = u64> {
    (prop::array::uniform4(0..INDICES.len()), 0..KIB4 / 8).prop_map(|(indices, offset)| {
        let raw = (INDICES[indices[0]] << 39)
            | (INDICES[indices[1]] << 30)
            | (INDICES[indices[2]] << 21)
            | (INDICES[indices[3]] << 12)
            | (offset * 8);
        // Sign-extend bit 47 (canonical).
        if raw & (1 << 47) != 0 {
            raw | 0xffff_0000_0000_0000
        } else {
            raw
        }
    })
}

#[derive(Clone, Debug)]
enum Operation {
    Access(u64, FaultAccess),
    /// INVLPG of an address.
    Invalidate(u64),
    /// The guest rewrites an entry, then reloads CR3 (a resync must make the shadow right).
    RewriteAndReload(usize, usize, EntrySpec),
    /// Switch to the other address space (pool table 1) and back.
    SwitchAwayAndBack,
    /// Everything dropped, then re-activated.
    FlushAll,
}

fn operation_strategy() -> impl Strategy<Value = Operation> {
    prop_oneof![
        8 => (linear_strategy(), access_strategy()).prop_map(|(linear, access)| Operation::Access(linear, access)),
        1 => linear_strategy().prop_map(Operation::Invalidate),
        2 => (0..POOL, 0..INDICES.len(), entry_strategy())
            .prop_map(|(table, slot, spec)| Operation::RewriteAndReload(table, slot, spec)),
        1 => Just(Operation::SwitchAwayAndBack),
        1 => Just(Operation::FlushAll),
    ]
}

#[derive(Clone, Debug)]
struct Case {
    tables: Vec<EntrySpec>,
    settings: Settings,
    operations: Vec<Operation>,
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(entry_strategy(), POOL * INDICES.len()),
        settings_strategy(),
        prop::collection::vec(operation_strategy(), 1..12),
    )
        .prop_map(|(tables, settings, operations)| Case {
            tables,
            settings,
            operations,
        })
}

/// Runs a case; `Err` names the first broken assertion.
fn run_case(case: &Case, breakage: Option<Breakage>) -> Result<(), String> {
    let mut guest = Guest::with_host(case.settings, FakeHostMemory::new(), 2);
    if let Some(breakage) = breakage {
        guest.engine.break_for_test(breakage);
    }
    guest.state = state_for(KIB4, case.settings);
    for table in 0..POOL {
        for (slot, index) in INDICES.iter().enumerate() {
            let spec = case.tables[table * INDICES.len() + slot];
            guest.put((1 + table as u64) * KIB4, *index, spec.value());
        }
    }
    guest.activate().map_err(|error| format!("{error}"))?;
    let mut touched = Vec::new();
    for operation in &case.operations {
        match operation {
            Operation::Access(linear, access) => {
                touched.push(*linear);
                check_access(&mut guest, *linear, *access)?;
            }
            Operation::Invalidate(linear) => {
                guest
                    .engine
                    .invalidate_page(&mut guest.host, GuestVirtAddr(*linear));
                if guest.shadow(*linear).is_some() {
                    return Err(format!("INVLPG left {linear:#x} mapped"));
                }
            }
            Operation::RewriteAndReload(table, slot, spec) => {
                guest.put((1 + *table as u64) * KIB4, INDICES[*slot], spec.value());
                guest.activate().map_err(|error| format!("{error}"))?;
                // Resync must leave what a fresh TLB would hold.
                for linear in &touched {
                    check_shadow_not_wider(&guest, *linear)
                        .map_err(|message| format!("after resync: {message}"))?;
                }
            }
            Operation::SwitchAwayAndBack => {
                let home = guest.state.cr3;
                guest.state.cr3 = 2 * KIB4;
                guest.activate().map_err(|error| format!("{error}"))?;
                guest.state.cr3 = home;
                guest.activate().map_err(|error| format!("{error}"))?;
            }
            Operation::FlushAll => {
                guest.engine.flush_all(&mut guest.host);
                if guest.shadow_frames() != 0 {
                    return Err("flush_all kept frames".into());
                }
                guest.activate().map_err(|error| format!("{error}"))?;
            }
        }
        let frames = guest.engine.stats().table_frames;
        if frames != guest.shadow_frames() {
            return Err(format!(
                "table_frames {frames} but {} frames held",
                guest.shadow_frames()
            ));
        }
    }
    // After a resync, every access the shadow allows must still be allowed by the guest's
    // tables as they are now: resync equals a fresh TLB.
    guest.activate().map_err(|error| format!("{error}"))?;
    let Guest {
        mut host,
        ram,
        engine,
        ..
    } = guest;
    engine.release(&mut host);
    if host.allocated_frames() as u64 != ram.backed_pages() {
        return Err("release kept frames".into());
    }
    ram.release(&mut host);
    Ok(())
}

proptest! {
    #![proptest_config(Config { cases: 256, failure_persistence: None, ..Config::default() })]

    #[test]
    fn random_tables_match_the_reference(case in case_strategy()) {
        if let Err(message) = run_case(&case, None) {
            return Err(TestCaseError::fail(message));
        }
    }
}

/// The property is not vacuous: an engine that ignores U/S fails it, on the assertion "the
/// reference denies ... the engine said Fixed" (a user access to a supervisor page is let
/// through) or "the shadow allows ... but the reference denies it" (the leaf is built U/S = 1).
#[test]
fn property_catches_an_engine_that_ignores_user_supervisor() {
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases: 256,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    );
    let result = runner.run(&case_strategy(), |case| {
        run_case(&case, Some(Breakage::IgnoreUserSupervisor)).map_err(TestCaseError::fail)
    });
    let message = format!("{result:?}");
    assert!(result.is_err(), "the broken engine passed");
    assert!(
        message.contains("the reference denies") || message.contains("but the reference denies"),
        "{message}"
    );
}
