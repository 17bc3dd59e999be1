//! smp: the guest-SMP test. vCPU 0 (the BSP) starts vCPU 1 (the AP, APIC ID 1) the way an
//! operating system does on real hardware, both count at the same time, and the BSP sends the AP
//! a fixed IPI:
//! 1. the BSP copies a real-mode trampoline to 0x10000 (`cpu::TRAMPOLINE_ADDRESS`) and sends
//!    INIT, waits, then STARTUP with vector 0x10 twice (MP protocol; the second SIPI must be
//!    ignored by a running AP: the trampoline counts its entries and the BSP checks there was one);
//! 2. the AP goes real mode -> protected mode -> long mode in the trampoline, on its own stack,
//!    into `ap_main`, and reports its APIC ID;
//! 3. both count to the same number (`count=`), each step a little arithmetic (the same on both, so their checksums
//!    must agree); the BSP prints progress with the AP's count beside its own and checks that
//!    the AP's count advanced while the BSP counted (both ran);
//! 4. the AP enables its local APIC, loads the IDT, and waits in `sti; hlt`; the BSP sends a
//!    fixed IPI with vector 0x40; the AP's handler EOIs and records it.
//!
//! Only the BSP prints (no console lock needed); the AP reports through shared memory. Every
//! wait is bounded by the TSC, so a missing feature fails (`smp: FAILED ...`, status 1) instead
//! of hanging. The command line may say `cpus=N` (default 2; only APIC ID 1 is started) and
//! `count=N` (steps per CPU, default 1,000,000).
#![no_std]
#![no_main]

mod cpu;

use core::sync::atomic::{AtomicU64, Ordering};
use guest_lib::{exit, println, BootInfo};

guest_lib::flat64_entry!(main);

/// Steps each CPU counts unless the command line says `count=N` (rounded down to a multiple of
/// PROGRESS_LINES, at least PROGRESS_LINES): about 65 ms of QEMU TCG time per CPU.
const DEFAULT_COUNT: u64 = 1_000_000;
/// Progress lines: one every count / PROGRESS_LINES steps.
const PROGRESS_LINES: u64 = 10;

/// TSC bounds. The TSC rate is not known (about 2.6 GHz under QEMU TCG on these hosts, one
/// tick per instruction under Bochs): the failure timeouts are generous, the protocol delays
/// are at least what real hardware needs at a few GHz.
const INIT_DELAY: u64 = 30_000_000; // >= 10 ms (SDM Vol 3A 9.4.4.1)
const SIPI_DELAY: u64 = 1_000_000; // >= 200 us
const ICR_IDLE_TIMEOUT: u64 = 1_000_000_000;
const ARRIVAL_TIMEOUT: u64 = 20_000_000_000;
const COUNT_TIMEOUT: u64 = 60_000_000_000;
const IPI_TIMEOUT: u64 = 20_000_000_000;

/// The AP's stack.
#[repr(C, align(16))]
struct Stack([u8; 16384]);
static mut AP_STACK: Stack = Stack([0; 16384]);

/// State shared between the CPUs (the AP writes the `ap_*` values, the BSP the phase), in a page
/// of its own: away from code (an emulator that watches code pages for self-modifying code would
/// slow every store down) and from the stacks.
#[repr(C, align(4096))]
struct Shared {
    ap_apic_id: AtomicU64,
    ap_arrived: AtomicU64,
    ap_checksum: AtomicU64,
    ap_ready_for_ipi: AtomicU64,
    /// An exception on the AP: vector + 1 (0: none), and its RIP.
    ap_fault: AtomicU64,
    ap_fault_rip: AtomicU64,
    /// What the BSP lets the AP do: 0 wait, 1 count, 2 get ready for the IPI.
    phase: AtomicU64,
    /// The AP's progress, on a cache line of its own (the BSP only reads it).
    ap_count: CacheLine,
}

#[repr(C, align(64))]
struct CacheLine(AtomicU64);

static SHARED: Shared = Shared {
    ap_apic_id: AtomicU64::new(u64::MAX),
    ap_arrived: AtomicU64::new(0),
    ap_checksum: AtomicU64::new(0),
    ap_ready_for_ipi: AtomicU64::new(0),
    ap_fault: AtomicU64::new(0),
    ap_fault_rip: AtomicU64::new(0),
    phase: AtomicU64::new(0),
    ap_count: CacheLine(AtomicU64::new(0)),
};
static AP_APIC_ID: &AtomicU64 = &SHARED.ap_apic_id;
static AP_ARRIVED: &AtomicU64 = &SHARED.ap_arrived;
static AP_COUNT: &AtomicU64 = &SHARED.ap_count.0;
static AP_CHECKSUM: &AtomicU64 = &SHARED.ap_checksum;
static AP_READY_FOR_IPI: &AtomicU64 = &SHARED.ap_ready_for_ipi;
static AP_FAULT: &AtomicU64 = &SHARED.ap_fault;
static AP_FAULT_RIP: &AtomicU64 = &SHARED.ap_fault_rip;
static PHASE: &AtomicU64 = &SHARED.phase;
/// Steps each CPU counts (set by the BSP before the AP starts).
static COUNT: AtomicU64 = AtomicU64::new(DEFAULT_COUNT);

fn fail(what: core::fmt::Arguments) -> ! {
    println!("smp: FAILED {}", what);
    exit(1)
}

/// The number after `key=` on the command line; `default` without one; None if unreadable.
fn number_from(cmdline: &[u8], key: &str, default: u64) -> Option<u64> {
    let text = core::str::from_utf8(cmdline).ok()?;
    match text.split_whitespace().find_map(|word| {
        word.strip_prefix(key)
            .and_then(|rest| rest.strip_prefix('='))
    }) {
        Some(value) => value.parse().ok(),
        None => Some(default),
    }
}

/// The arithmetic of one counting step: sixteen xorshift64 steps folded into a checksum.
fn step(state: &mut u64, checksum: &mut u64) {
    let mut x = *state;
    for _ in 0..16 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    *state = x;
    *checksum = checksum.wrapping_mul(0x100_0000_01B3).wrapping_add(x);
}

const SEED: u64 = 0x2545_F491_4F6C_DD1D;

/// Fails if the AP took an exception.
fn check_ap_fault() {
    let fault = AP_FAULT.load(Ordering::SeqCst);
    if fault != 0 {
        fail(format_args!(
            "cpu 1 took exception vector {} at rip={:#x}",
            fault - 1,
            AP_FAULT_RIP.load(Ordering::SeqCst)
        ));
    }
}

/// Spins (PAUSE) until `done()` or `timeout` TSC ticks; false on timeout.
fn wait_until(timeout: u64, done: impl Fn() -> bool) -> bool {
    let start = cpu::tsc();
    loop {
        if done() {
            return true;
        }
        check_ap_fault();
        if cpu::tsc().wrapping_sub(start) > timeout {
            return false;
        }
        cpu::pause();
    }
}

fn delay(ticks: u64) {
    let start = cpu::tsc();
    while cpu::tsc().wrapping_sub(start) < ticks {
        cpu::pause();
    }
}

/// Sends an IPI and waits (bounded) until the ICR's delivery status is idle again.
fn send_ipi(destination: u32, command: u32, what: &str) {
    cpu::send_ipi(destination, command);
    if !wait_until(ICR_IDLE_TIMEOUT, || {
        cpu::apic_read(cpu::APIC_ICR_LOW) & cpu::ICR_DELIVERY_PENDING == 0
    }) {
        fail(format_args!(
            "{what} IPI to apic id {destination} still pending in the ICR (icr={:#x})",
            cpu::apic_read(cpu::APIC_ICR_LOW)
        ));
    }
}

fn main(boot_info: BootInfo) -> ! {
    let cpus = number_from(boot_info.cmdline(), "cpus", 2).unwrap_or(0);
    let count = number_from(boot_info.cmdline(), "count", DEFAULT_COUNT).unwrap_or(0)
        / PROGRESS_LINES
        * PROGRESS_LINES;
    let count = count.max(PROGRESS_LINES);
    COUNT.store(count, Ordering::SeqCst);
    println!(
        "smp: hello from cpu 0 (cpus={cpus} memory={:#x})",
        boot_info.memory_size
    );
    if cpus < 2 {
        fail(format_args!(
            "need cpus=2 or more on the command line (got '{}')",
            guest_lib::fmt::Printable(boot_info.cmdline())
        ));
    }
    cpu::build_idt();
    cpu::load_idt();
    let bsp_id = cpu::apic_id();
    if bsp_id != 0 {
        fail(format_args!("cpu 0 has apic id {bsp_id}, expected 0"));
    }
    cpu::apic_enable();

    // 1. INIT, STARTUP, STARTUP. See: SDM Vol 3A 9.4.4.1 (the MP initialization example).
    let stack_top = core::ptr::addr_of!(AP_STACK) as u64 + 16384;
    cpu::install_trampoline(stack_top, ap_entry, cpu::read_cr3());
    println!(
        "smp: starting cpu 1: trampoline at {:#x}, INIT then STARTUP vector {:#x} twice",
        cpu::TRAMPOLINE_ADDRESS,
        cpu::SIPI_VECTOR
    );
    send_ipi(1, cpu::ICR_INIT | cpu::ICR_ASSERT, "INIT");
    delay(INIT_DELAY);
    for _ in 0..2 {
        send_ipi(
            1,
            cpu::ICR_STARTUP | cpu::ICR_ASSERT | cpu::SIPI_VECTOR,
            "STARTUP",
        );
        delay(SIPI_DELAY);
    }

    // 2. The AP arrives.
    if !wait_until(ARRIVAL_TIMEOUT, || AP_ARRIVED.load(Ordering::SeqCst) != 0) {
        fail(format_args!(
            "cpu 1 did not start after INIT/SIPI (trampoline entered {} times)",
            cpu::trampoline_entries()
        ));
    }
    let ap_id = AP_APIC_ID.load(Ordering::SeqCst);
    println!("smp: cpu1 started by INIT/SIPI (apic id {ap_id})");
    if ap_id != 1 {
        fail(format_args!("cpu 1 reports apic id {ap_id}, expected 1"));
    }

    // 3. Both count.
    PHASE.store(1, Ordering::SeqCst);
    let (mut state, mut checksum) = (SEED, 0u64);
    let mut ap_seen_advancing = false;
    let ap_at_start = AP_COUNT.load(Ordering::SeqCst);
    let count_start = cpu::tsc();
    for line in 1..=PROGRESS_LINES {
        for _ in 0..count / PROGRESS_LINES {
            step(&mut state, &mut checksum);
        }
        let ap = AP_COUNT.load(Ordering::SeqCst);
        ap_seen_advancing |= ap > ap_at_start;
        println!(
            "smp: progress bsp={} ap={ap}",
            line * (count / PROGRESS_LINES)
        );
    }
    let count_ticks = cpu::tsc().wrapping_sub(count_start);
    check_ap_fault();
    let ap_at_end = AP_COUNT.load(Ordering::SeqCst);
    if !ap_seen_advancing || ap_at_end == ap_at_start {
        fail(format_args!(
            "cpu 1 did not count while cpu 0 counted (ap={ap_at_start} before, {ap_at_end} after)"
        ));
    }
    if !wait_until(COUNT_TIMEOUT, || AP_COUNT.load(Ordering::SeqCst) == count) {
        fail(format_args!(
            "cpu 1 did not finish counting (ap={} of {count})",
            AP_COUNT.load(Ordering::SeqCst)
        ));
    }
    let ap_checksum = AP_CHECKSUM.load(Ordering::SeqCst);
    if ap_checksum != checksum {
        fail(format_args!(
            "the cpus' checksums differ (bsp={checksum:#x} ap={ap_checksum:#x})"
        ));
    }
    println!(
        "smp: both cpus counted (bsp={count} ap={})",
        AP_COUNT.load(Ordering::SeqCst)
    );
    println!("smp: cpu 0 counted for {count_ticks} tsc ticks");

    // 4. The IPI.
    PHASE.store(2, Ordering::SeqCst);
    if !wait_until(IPI_TIMEOUT, || AP_READY_FOR_IPI.load(Ordering::SeqCst) != 0) {
        fail(format_args!("cpu 1 did not get ready for the IPI"));
    }
    if cpu::ipi_count() != 0 {
        fail(format_args!("cpu 1 took the IPI vector before it was sent"));
    }
    send_ipi(
        1,
        cpu::ICR_FIXED | cpu::ICR_ASSERT | u32::from(cpu::IPI_VECTOR),
        "fixed",
    );
    if !wait_until(IPI_TIMEOUT, || cpu::ipi_count() != 0) {
        fail(format_args!(
            "the fixed IPI (vector {:#x}) never reached cpu 1",
            cpu::IPI_VECTOR
        ));
    }
    let ipi_cpu = cpu::IPI_CPU.load(Ordering::SeqCst);
    println!("smp: ipi delivered to cpu {ipi_cpu}");
    if ipi_cpu != 1 {
        fail(format_args!(
            "the IPI for apic id 1 was taken by apic id {ipi_cpu}"
        ));
    }
    // Give a duplicated delivery time to show, then count.
    delay(SIPI_DELAY);
    let ipis = cpu::ipi_count();
    if ipis != 1 {
        fail(format_args!("one IPI sent, {ipis} taken"));
    }
    let entries = cpu::trampoline_entries();
    if entries != 1 {
        fail(format_args!(
            "cpu 1 entered the trampoline {entries} times (the second SIPI must be ignored by a started cpu)"
        ));
    }
    println!("smp: all checks passed");
    exit(0)
}

/// The AP's Rust entry, called by the trampoline on the AP's stack in long mode.
extern "C" fn ap_entry() -> ! {
    AP_APIC_ID.store(u64::from(cpu::apic_id()), Ordering::SeqCst);
    AP_ARRIVED.store(1, Ordering::SeqCst);
    while PHASE.load(Ordering::SeqCst) < 1 {
        cpu::pause();
    }
    let total = COUNT.load(Ordering::SeqCst);
    let (mut state, mut checksum) = (SEED, 0u64);
    for count in 1..=total {
        step(&mut state, &mut checksum);
        if count == total {
            AP_CHECKSUM.store(checksum, Ordering::SeqCst);
        }
        AP_COUNT.store(count, Ordering::Release);
    }
    while PHASE.load(Ordering::SeqCst) < 2 {
        cpu::pause();
    }
    cpu::load_idt();
    cpu::apic_enable();
    AP_READY_FOR_IPI.store(1, Ordering::SeqCst);
    while cpu::ipi_count() == 0 {
        cpu::wait_for_interrupt();
    }
    cpu::park()
}

/// Called by the exception stubs (never returns). On the AP: recorded for the BSP to report,
/// then the AP parks. On the BSP: printed, status 1.
extern "C" fn exception(frame: &cpu::ExceptionFrame) -> ! {
    let ap_stack = core::ptr::addr_of!(AP_STACK) as u64;
    let here = frame as *const cpu::ExceptionFrame as u64;
    if (ap_stack..ap_stack + 16384).contains(&here) {
        AP_FAULT_RIP.store(frame.rip, Ordering::SeqCst);
        AP_FAULT.store(frame.vector + 1, Ordering::SeqCst);
        cpu::park()
    }
    fail(format_args!(
        "cpu 0 took exception vector {} error={:#x} at rip={:#x}",
        frame.vector, frame.error_code, frame.rip
    ))
}
