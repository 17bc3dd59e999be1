//! Bringing up the host's other CPUs (the application processors, APs) and knowing which CPU
//! is running: logical indices 0..N-1, the boot CPU first, then the MADT's other enabled
//! local APICs in table order, each index given to the next CPU that actually starts.
//!
//! Start-up, one AP at a time (SDM Vol 3A 9.4.4.1 "Typical BSP initialization sequence", with
//! the delays of the MP specification 1.4 B.4 measured with the calibrated TSC):
//! 1. the start-up page (a free 4 KiB page below 1 MiB, kept out of the frame allocator by
//!    `memory`) gets the real-mode code of `ringzero_x86::hw::ap_trampoline` and its parameter
//!    block: CR0, CR3, CR4, EFER copied from the boot CPU, a fresh 64 KiB stack, the index;
//!    the page is identity-mapped in the kernel's page tables, since the AP turns paging on
//!    while it runs there;
//! 2. INIT IPI, 10 ms; STARTUP IPI (vector = page number), 200 us; STARTUP again, 200 us;
//! 3. the AP runs the trampoline (16-bit -> 32-bit -> long mode), then
//!    [`application_processor_main`]: its own GDT/TSS/IDT, its local APIC, a log line, and it
//!    checks in;
//! 4. the boot CPU waits for the check-in, at most [`CHECK_IN_MILLIS`]; a CPU that does not
//!    check in is sent INIT again (parked in wait-for-SIPI, so it can never run the start-up
//!    code later) and left out. So that the INIT never catches an AP holding a lock, the AP
//!    first claims its start ([`START`]: waiting -> running) before it touches anything shared,
//!    and the boot CPU gives up only by moving the same word waiting -> abandoned; an AP that
//!    finds its start abandoned halts at once.
//!
//! The identity mapping is removed once every AP is through.

use crate::memory::{self, HostPhysAddr, IdentityMapping};
use crate::{apic, console, cpu, platform, time};
use alloc::boxed::Box;
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use ringzero_x86::hw::{self, ap_trampoline};

/// Most CPUs the hypervisor drives (the configuration's host CPU numbers go up to 63).
pub const MAX_CPUS: usize = 64;
/// Each AP's stack.
const AP_STACK_SIZE: usize = 64 * 1024;
/// How long an AP may take from its INIT IPI to its check-in.
const CHECK_IN_MILLIS: u64 = 1000;
/// INIT to STARTUP, and after each STARTUP. See: SDM Vol 3A 9.4.4.1; MP spec 1.4 B.4.
const INIT_DELAY_MICROS: u64 = 10_000;
const STARTUP_DELAY_MICROS: u64 = 200;
/// Highest APIC ID an xAPIC IPI can name (0xFF is the broadcast address).
const MAX_XAPIC_ID: u32 = 0xFE;
/// EFER bits an AP takes from the boot CPU (not SVME: virtualization is set up per CPU later;
/// not LMA: the CPU sets it). See: SDM Vol 3A 2.2.1 "Extended feature enable register".
const EFER_COPIED: u64 = (1 << 0) | (1 << 8) | (1 << 11); // SCE, LME, NXE
/// CR4 bits an AP must not get from the boot CPU in 32-bit mode: PCIDE (#GP outside IA-32e
/// mode), CET (#GP while CR0.WP = 0, as it is when the trampoline loads CR4) and VMXE
/// (virtualization is set up per CPU later). See: SDM Vol 3A 2.5, 4.10.1.
const CR4_NOT_COPIED: u64 = (1 << 17) | (1 << 23) | (1 << 13);
const IA32_EFER: u32 = 0xC000_0080;

/// Logical index by initial APIC ID (xAPIC IDs are 8 bits). Unlisted IDs read 0: before the
/// APs start only the boot CPU runs, and it is index 0.
static INDEX_BY_APIC_ID: [AtomicU8; 256] = [const { AtomicU8::new(0) }; 256];
/// APIC ID by logical index, for the CPUs online.
static APIC_ID_BY_INDEX: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
static ONLINE: AtomicUsize = AtomicUsize::new(1);
/// Lowest address of each AP's stack (0: none).
static STACK_BOTTOM: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// (CPU index, most bytes of its stack ever in use, stack size) for each AP, for the end
/// report: the stacks start zeroed and have no guard page, so this shows how close each came to
/// overflowing into the heap (the lowest non-zero byte marks the deepest use).
pub fn stack_use() -> alloc::vec::Vec<(usize, usize, usize)> {
    let mut uses = alloc::vec::Vec::new();
    for (index, bottom) in STACK_BOTTOM.iter().enumerate() {
        let bottom = bottom.load(Ordering::Relaxed);
        if bottom == 0 {
            continue;
        }
        // The AP may be using its stack right now (idle): volatile byte reads, whose values
        // only estimate the depth.
        let untouched = (0..AP_STACK_SIZE)
            .find(|&offset| {
                // SAFETY: [bottom, +AP_STACK_SIZE) is the AP's leaked stack allocation, never
                // freed; a byte read cannot tear.
                unsafe { core::ptr::read_volatile((bottom as *const u8).add(offset)) != 0 }
            })
            .unwrap_or(AP_STACK_SIZE);
        uses.push((index, AP_STACK_SIZE - untouched, AP_STACK_SIZE));
    }
    uses
}
/// Index + 1 of the last AP that checked in (0: none yet).
static CHECKED_IN: AtomicUsize = AtomicUsize::new(0);
/// The start in progress: `index << 2 | state`, state one of the three below.
static START: AtomicUsize = AtomicUsize::new(0);
const START_WAITING: usize = 1;
const START_RUNNING: usize = 2;
const START_ABANDONED: usize = 3;
/// How long the boot CPU waits for an AP that claimed its start but has not checked in yet.
const SET_UP_MILLIS: u64 = 10_000;
/// What each AP runs once it is up.
static ENTRY: spin::Once<fn(usize) -> !> = spin::Once::new();
static STARTED: spin::Once<usize> = spin::Once::new();

/// The logical index of the CPU with initial APIC ID `apic_id` (0 for an ID not started).
pub fn index_of_apic_id(apic_id: u32) -> usize {
    INDEX_BY_APIC_ID
        .get(apic_id as usize)
        .map_or(0, |index| usize::from(index.load(Ordering::Relaxed)))
}

/// The APIC ID of online CPU `cpu_index` (for IPIs such as `apic::send_fixed`).
pub fn apic_id_of(cpu_index: usize) -> Option<u32> {
    (cpu_index < cpus_online()).then(|| APIC_ID_BY_INDEX[cpu_index].load(Ordering::Relaxed))
}

/// How many CPUs run the hypervisor (the boot CPU included).
pub fn cpus_online() -> usize {
    ONLINE.load(Ordering::Acquire)
}

/// Starts every other CPU the MADT lists as enabled (`platform::cpu_apic_ids`) and has each
/// run `entry(cpu_index)` once it is up, with its own descriptor tables, stack and enabled
/// local APIC. Returns the number of CPUs online (the boot CPU included) and prints
/// `ringzero: cpus online=N of=M`. The boot CPU returns to its own work. Runs once; a second
/// call returns the first call's result.
pub fn start_application_processors(entry: fn(cpu_index: usize) -> !) -> usize {
    *STARTED.call_once(|| start_all(entry))
}

fn start_all(entry: fn(usize) -> !) -> usize {
    let apic_ids = platform::cpu_apic_ids();
    let listed = apic_ids.len().max(1);
    let boot_apic_id = hw::cpuid(1, 0).ebx >> 24;
    APIC_ID_BY_INDEX[0].store(boot_apic_id, Ordering::Relaxed);
    INDEX_BY_APIC_ID[boot_apic_id as usize].store(0, Ordering::Relaxed);
    log::info!("smp: cpu0 is the boot CPU (APIC ID {boot_apic_id})");
    let online = if listed > 1 {
        match prepare_startup_page() {
            Ok(startup) => {
                ENTRY.call_once(|| entry);
                let online = start_each(&apic_ids[1..], &startup);
                if startup.mapping == IdentityMapping::Added {
                    memory::unmap_identity(startup.page);
                }
                online
            }
            Err(reason) => {
                log::warn!("smp: cannot start the other CPUs: {reason}; running on cpu0 only");
                1
            }
        }
    } else {
        1
    };
    console::print_line(format_args!("ringzero: cpus online={online} of={listed}"));
    online
}

/// The start-up page, filled in except for the per-AP fields.
struct StartupPage {
    page: HostPhysAddr,
    mapping: IdentityMapping,
}

impl StartupPage {
    fn parameters(&self) -> *mut ap_trampoline::StartupParameters {
        memory::physical_window(HostPhysAddr(
            self.page.0 + ap_trampoline::PARAMETERS_OFFSET as u64,
        ))
        .cast()
    }
}

/// Step 1 (the part shared by all APs): code, parameters, identity mapping.
fn prepare_startup_page() -> Result<StartupPage, alloc::string::String> {
    if !apic::available() {
        return Err("the boot CPU's local APIC is not usable".into());
    }
    let page = memory::ap_startup_page().ok_or("the memory map has no usable page below 1 MiB")?;
    let (cr3_frame, cr3_flags) = x86_64::registers::control::Cr3::read_raw();
    let cr3 = cr3_frame.start_address().as_u64() | u64::from(cr3_flags);
    if cr3 > u64::from(u32::MAX) {
        // The trampoline loads CR3 in 32-bit mode.
        return Err(alloc::format!(
            "the page tables (CR3 {cr3:#x}) lie above 4 GiB"
        ));
    }
    let mapping = memory::identity_map(page)?;

    let code = ap_trampoline::code();
    let mut parameters = ap_trampoline::StartupParameters::for_page(page.0 as u32);
    parameters.cr0 = hw::read_cr0();
    parameters.cr3 = cr3;
    parameters.cr4 = hw::read_cr4() & !CR4_NOT_COPIED;
    // SAFETY: EFER exists on every x86-64 CPU.
    parameters.efer = unsafe { hw::read_msr(IA32_EFER) } & EFER_COPIED;
    parameters.entry = application_processor_main as *const () as u64;
    let startup = StartupPage { page, mapping };
    // SAFETY: the page is reserved for this code (memory::ap_startup_page) and mapped by the
    // physical window; no AP runs from it yet. The code is shorter than PARAMETERS_OFFSET
    // (checked by `code()`), and the parameter block fits the page (host-tested).
    unsafe {
        core::ptr::copy_nonoverlapping(code.as_ptr(), memory::physical_window(page), code.len());
        startup.parameters().write(parameters);
    }
    log::info!(
        "smp: start-up code at {:#x} (STARTUP vector {:#x}), {} bytes",
        page.0,
        page.0 >> 12,
        code.len()
    );
    Ok(startup)
}

/// Steps 2-4 for each AP in turn. Returns the CPUs online.
fn start_each(apic_ids: &[u32], startup: &StartupPage) -> usize {
    let mut online = 1;
    for &apic_id in apic_ids {
        let index = online;
        if index >= MAX_CPUS {
            log::warn!("smp: APIC ID {apic_id} left out: ringzero drives at most {MAX_CPUS} CPUs");
            continue;
        }
        if apic_id > MAX_XAPIC_ID {
            log::warn!("smp: cpu {index} (APIC ID {apic_id}) left out: only xAPIC IDs 0..=254 are addressable");
            continue;
        }
        let stack: &'static mut [u8] =
            Box::leak(alloc::vec![0u8; AP_STACK_SIZE].into_boxed_slice());
        let stack_top = (stack.as_ptr_range().end as u64) & !0xF;
        STACK_BOTTOM[index].store(stack.as_ptr() as u64, Ordering::Relaxed);
        INDEX_BY_APIC_ID[apic_id as usize].store(index as u8, Ordering::Relaxed);
        APIC_ID_BY_INDEX[index].store(apic_id, Ordering::Relaxed);
        // SAFETY: the previous AP has checked in (or was parked by INIT), so no CPU reads the
        // parameter block while it changes.
        unsafe {
            let parameters = startup.parameters();
            (*parameters).stack_top = stack_top;
            (*parameters).cpu_index = index as u64;
        }
        START.store(index << 2 | START_WAITING, Ordering::SeqCst);

        // Step 2. See: SDM Vol 3A 9.4.4.1.
        let vector = (startup.page.0 >> 12) as u8;
        let start = hw::rdtsc();
        apic::send_init(apic_id);
        time::delay_micros(INIT_DELAY_MICROS);
        apic::send_startup(apic_id, vector);
        time::delay_micros(STARTUP_DELAY_MICROS);
        apic::send_startup(apic_id, vector);
        time::delay_micros(STARTUP_DELAY_MICROS);

        // Step 4.
        let checked_in = || CHECKED_IN.load(Ordering::Acquire) == index + 1;
        let deadline = time::deadline_after_millis(CHECK_IN_MILLIS);
        while !checked_in() && !time::passed(deadline) {
            core::hint::spin_loop();
        }
        if !checked_in() {
            let abandoned = START.compare_exchange(
                index << 2 | START_WAITING,
                index << 2 | START_ABANDONED,
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
            if abandoned.is_ok() {
                // It never reached its Rust entry (or will halt there): park it.
                apic::send_init(apic_id);
                INDEX_BY_APIC_ID[apic_id as usize].store(0, Ordering::Relaxed);
                log::warn!("smp: cpu {index} (APIC ID {apic_id}) did not start; left out");
                continue;
            }
            // It is running its set-up: let it finish.
            let deadline = time::deadline_after_millis(SET_UP_MILLIS);
            while !checked_in() && !time::passed(deadline) {
                core::hint::spin_loop();
            }
            if !checked_in() {
                log::warn!("smp: cpu {index} (APIC ID {apic_id}) started but did not finish its set-up; starting no more CPUs");
                break;
            }
        }
        online += 1;
        ONLINE.store(online, Ordering::Release);
        log::info!(
            "smp: cpu{index} (APIC ID {apic_id}) checked in {} us after its INIT",
            time::tsc_to_micros(hw::rdtsc() - start)
        );
    }
    online
}

/// Where each AP arrives from the trampoline (long mode, the boot CPU's page tables, its own
/// stack, interrupts off). Step 3 of the module doc.
extern "C" fn application_processor_main(cpu_index: u64) -> ! {
    let cpu_index = cpu_index as usize;
    // Claim this start before touching anything shared (heap, console): the boot CPU may have
    // given up on it, and may park this CPU with INIT at any moment.
    let claimed = START.compare_exchange(
        cpu_index << 2 | START_WAITING,
        cpu_index << 2 | START_RUNNING,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    if claimed.is_err() {
        hw::halt_forever();
    }
    cpu::init_this_cpu();
    let apic = apic::init_this_cpu();
    match &apic {
        Ok(()) => log::info!(
            "smp: cpu{cpu_index} online (APIC ID {}, own GDT/TSS/IDT, local APIC enabled)",
            apic::apic_id()
        ),
        Err(error) => log::warn!("smp: cpu{cpu_index} online without its local APIC: {error}"),
    }
    CHECKED_IN.store(cpu_index + 1, Ordering::Release);
    match ENTRY.get() {
        Some(entry) => entry(cpu_index),
        None => hw::halt_forever(),
    }
}

/// Sends a kick to every other CPU online and waits (at most 1 s) until each has taken it (a
/// CPU still setting itself up takes it at its first idle):
/// proves the fixed IPI, the APs' IDT and their local APICs. Returns the CPUs that did not.
pub fn check_kicks() -> usize {
    let me = console::cpu_index();
    let mut missing = 0;
    for index in (0..cpus_online()).filter(|&index| index != me) {
        let Some(apic_id) = apic_id_of(index) else {
            continue;
        };
        let before = apic::kick_count(index);
        apic::send_fixed(apic_id, apic::KICK_VECTOR);
        let deadline = time::deadline_after_millis(1000);
        while apic::kick_count(index) == before && !time::passed(deadline) {
            core::hint::spin_loop();
        }
        if apic::kick_count(index) == before {
            log::warn!(
                "smp: cpu{index} did not take its kick (vector {:#x})",
                apic::KICK_VECTOR
            );
            missing += 1;
        }
    }
    missing
}
