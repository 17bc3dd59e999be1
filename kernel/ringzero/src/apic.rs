//! The host's local APIC (xAPIC mode, memory-mapped): per-CPU enable, inter-processor
//! interrupts (INIT, STARTUP, fixed "kick"), end of interrupt, and a periodic tick from the
//! APIC timer, whose frequency is measured once against the calibrated TSC.
//!
//! Every CPU reaches its own local APIC at the same physical address (IA32_APIC_BASE); the
//! registers are read and written through the physical window, which the bootloader maps over
//! the first 4 GiB (checked at [`init_this_cpu`]). The window maps with write-back attributes;
//! APIC register accesses are not cached whatever the memory type (SDM Vol 3A 11.4.1), and
//! firmware's MTRRs make the range uncacheable on real machines.
//!
//! The hypervisor runs with RFLAGS.IF = 0; interrupts are only taken in the two windows of
//! `cpu::take_pending_interrupts` and `cpu::idle_until_interrupt`. The handlers (`cpu.rs`)
//! count and acknowledge; they never log or take a lock.
//!
//! See: SDM Vol 3A chapter 11 "Advanced programmable interrupt controller (APIC)": 11.4.1
//! (register map, Table 11-1), 11.4.4 "Local APIC status and location" (IA32_APIC_BASE),
//! 11.4.3 / 11.9 (spurious-interrupt vector register, APIC software enable), 11.5.1 (LVT),
//! 11.5.4 "APIC timer", 11.6.1 "Interrupt command register (ICR)", 11.8.5 (EOI).

use crate::memory::{self, HostPhysAddr};
use crate::smp::MAX_CPUS;
use crate::{console, time};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use ringzero_x86::hw;

/// Vector of the periodic tick (the local APIC timer).
pub const TICK_VECTOR: u8 = 0x20;
/// Vector of the "kick" IPI one CPU sends another to make it look at its work.
pub const KICK_VECTOR: u8 = 0x21;
/// Vector of spurious interrupts (low four bits must be 1 on older CPUs: 0xFF is always valid).
pub const SPURIOUS_VECTOR: u8 = 0xFF;

/// IA32_APIC_BASE and its bits. See: SDM Vol 3A 11.4.4, Figure 11-5.
const IA32_APIC_BASE: u32 = 0x1B;
const APIC_BASE_BSP: u64 = 1 << 8;
const APIC_BASE_X2APIC: u64 = 1 << 10;
const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_ADDRESS_MASK: u64 = 0x000F_FFFF_FFFF_F000;

/// Register offsets. See: SDM Vol 3A 11.4.1, Table 11-1 "Local APIC register address map".
const ID: usize = 0x20;
const VERSION: usize = 0x30;
const TASK_PRIORITY: usize = 0x80;
const END_OF_INTERRUPT: usize = 0xB0;
const SPURIOUS_VECTOR_REGISTER: usize = 0xF0;
const ERROR_STATUS: usize = 0x280;
const ICR_LOW: usize = 0x300;
const ICR_HIGH: usize = 0x310;
const LVT_TIMER: usize = 0x320;
const LVT_LINT0: usize = 0x350;
const TIMER_INITIAL_COUNT: usize = 0x380;
const TIMER_CURRENT_COUNT: usize = 0x390;
const TIMER_DIVIDE: usize = 0x3E0;

/// SVR bit 8: APIC software enable. See: SDM Vol 3A 11.9, Figure 11-23.
const SOFTWARE_ENABLE: u32 = 1 << 8;
/// LVT bit 16: masked; timer mode bits 18:17 = 01: periodic. See: SDM Vol 3A 11.5.1.
const LVT_MASKED: u32 = 1 << 16;
const TIMER_PERIODIC: u32 = 1 << 17;
/// Divide configuration 0b0011: divide the bus clock by 16. See: SDM Vol 3A 11.5.4, Figure 11-10.
const DIVIDE_BY_16: u32 = 0b0011;
/// ICR: delivery mode (bits 10:8), level assert (bit 14), delivery status (bit 12, read-only).
/// See: SDM Vol 3A 11.6.1, Figure 11-12.
const DELIVERY_FIXED: u32 = 0b000 << 8;
const DELIVERY_INIT: u32 = 0b101 << 8;
const DELIVERY_STARTUP: u32 = 0b110 << 8;
const LEVEL_ASSERT: u32 = 1 << 14;
const DELIVERY_PENDING: u32 = 1 << 12;

/// How long the timer calibration counts.
const TIMER_CALIBRATION_MILLIS: u64 = 10;

/// Virtual address of the local APIC's registers (through the physical window); 0 = not set up.
static REGISTERS: AtomicU64 = AtomicU64::new(0);
/// Timer input clock after the divider, in Hz (0 = not measured yet).
static TIMER_HZ: AtomicU64 = AtomicU64::new(0);
static TIMER_CALIBRATED: spin::Once<()> = spin::Once::new();

static TICKS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static KICKS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static UNEXPECTED: AtomicU64 = AtomicU64::new(0);
static WARNED_BASE: AtomicBool = AtomicBool::new(false);

/// Why the local APIC cannot be driven.
#[derive(Debug)]
pub enum ApicError {
    /// IA32_APIC_BASE's global enable bit is clear (firmware turned the APIC off).
    Disabled { apic_base: u64 },
    /// Firmware left the APIC in x2APIC mode; this driver speaks xAPIC (MMIO) only.
    X2Apic { apic_base: u64 },
    /// The physical window does not map the APIC's registers.
    NotMapped { physical: u64 },
}

impl core::fmt::Display for ApicError {
    fn fmt(&self, formatter: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ApicError::Disabled { apic_base } => write!(
                formatter,
                "the local APIC is globally disabled (IA32_APIC_BASE={apic_base:#x}, bit 11 clear)"
            ),
            ApicError::X2Apic { apic_base } => write!(
                formatter,
                "the local APIC is in x2APIC mode (IA32_APIC_BASE={apic_base:#x}); ringzero drives xAPIC only"
            ),
            ApicError::NotMapped { physical } => write!(
                formatter,
                "the physical window does not map the local APIC at {physical:#x}"
            ),
        }
    }
}

/// Whether the local APIC could be set up (on the boot CPU: every other CPU needs it).
pub fn available() -> bool {
    REGISTERS.load(Ordering::Relaxed) != 0
}

/// Reads a register (0 while the APIC is not set up).
fn read(offset: usize) -> u32 {
    let base = REGISTERS.load(Ordering::Relaxed);
    if base == 0 {
        return 0;
    }
    // SAFETY: `base` maps this CPU's local APIC registers (checked in init_this_cpu); `offset`
    // is one of the 16-byte-aligned register offsets above, read as the 32 bits they are.
    unsafe { ((base as usize + offset) as *const u32).read_volatile() }
}

/// Writes a register (ignored while the APIC is not set up).
fn write(offset: usize, value: u32) {
    let base = REGISTERS.load(Ordering::Relaxed);
    if base == 0 {
        return;
    }
    // SAFETY: as in `read`; each register written here is writable and takes the value given
    // (checked against the SDM's register descriptions at each call).
    unsafe { ((base as usize + offset) as *mut u32).write_volatile(value) }
}

/// Enables this CPU's local APIC: finds its registers (IA32_APIC_BASE, checked against the
/// physical window), sets the spurious vector with the software-enable bit, accepts every
/// priority (TPR = 0), masks LINT0 (the legacy PIC's path, which the hypervisor does not use)
/// and the timer, and clears the error status. On the boot CPU it also measures the timer.
pub fn init_this_cpu() -> Result<(), ApicError> {
    // SAFETY: IA32_APIC_BASE exists on every CPU with an on-chip APIC, which every x86-64 CPU
    // has (CPUID.1:EDX.APIC). See: SDM Vol 3A 11.4.4.
    let apic_base = unsafe { hw::read_msr(IA32_APIC_BASE) };
    if apic_base & APIC_BASE_ENABLE == 0 {
        return Err(ApicError::Disabled { apic_base });
    }
    if apic_base & APIC_BASE_X2APIC != 0 {
        return Err(ApicError::X2Apic { apic_base });
    }
    let physical = apic_base & APIC_BASE_ADDRESS_MASK;
    let virtual_address = memory::physical_window(HostPhysAddr(physical)) as u64;
    match memory::translate(virtual_address) {
        Some((mapped, _)) if mapped.0 == physical => {}
        _ => return Err(ApicError::NotMapped { physical }),
    }
    let previous = REGISTERS.swap(virtual_address, Ordering::Relaxed);
    if previous != 0 && previous != virtual_address && !WARNED_BASE.swap(true, Ordering::Relaxed) {
        log::warn!(
            "apic: CPUs disagree on the local APIC base ({previous:#x} vs {virtual_address:#x})"
        );
    }

    // See: SDM Vol 3A 11.8.3.1 (TPR), 11.5.1 (LVT mask bit), 11.9 (SVR), 11.5.3 (ESR: write
    // before read).
    write(TASK_PRIORITY, 0);
    write(LVT_LINT0, read(LVT_LINT0) | LVT_MASKED);
    write(LVT_TIMER, LVT_MASKED | u32::from(TICK_VECTOR));
    write(TIMER_INITIAL_COUNT, 0);
    write(
        SPURIOUS_VECTOR_REGISTER,
        SOFTWARE_ENABLE | u32::from(SPURIOUS_VECTOR),
    );
    write(ERROR_STATUS, 0);
    let _ = read(ERROR_STATUS);

    if apic_base & APIC_BASE_BSP != 0 {
        TIMER_CALIBRATED.call_once(calibrate_timer);
        log::info!(
            "apic: local APIC at {physical:#x} (version {:#x}), ID {}, enabled; timer {} kHz after divide-by-16",
            read(VERSION) & 0xFF,
            apic_id(),
            TIMER_HZ.load(Ordering::Relaxed) / 1000
        );
    }
    Ok(())
}

/// Measures the timer's rate: one-shot, masked, from the largest count, over a TSC-timed
/// interval whose two ends (the write that starts the count, the read that ends it) are each
/// bracketed by TSC reads; a measurement with brackets over 0.1 % of the interval is
/// repeated (up to 5 times, the tightest kept). See: SDM Vol 3A 11.5.4.
fn calibrate_timer() {
    let mut best: Option<(u64, u64)> = None; // (Hz, ppm)
    for _ in 0..5 {
        write(TIMER_DIVIDE, DIVIDE_BY_16);
        write(LVT_TIMER, LVT_MASKED | u32::from(TICK_VECTOR));
        let start_before = hw::rdtsc();
        write(TIMER_INITIAL_COUNT, u32::MAX);
        let start_after = hw::rdtsc();
        time::delay_micros(TIMER_CALIBRATION_MILLIS * 1000);
        let end_before = hw::rdtsc();
        let remaining = read(TIMER_CURRENT_COUNT);
        let end_after = hw::rdtsc();
        write(TIMER_INITIAL_COUNT, 0);
        let cycles = (end_before / 2 + end_after / 2)
            .saturating_sub(start_before / 2 + start_after / 2)
            .max(1);
        let brackets = (start_after - start_before) + (end_after - end_before);
        let ppm = brackets * 500_000 / cycles;
        let counted = u64::from(u32::MAX - remaining);
        let hz =
            (u128::from(counted) * u128::from(time::tsc_hz().max(1)) / u128::from(cycles)) as u64;
        if best.is_none_or(|(_, best_ppm)| ppm < best_ppm) {
            best = Some((hz, ppm));
        }
        if ppm <= 1000 {
            break;
        }
    }
    TIMER_HZ.store(best.map_or(0, |(hz, _)| hz), Ordering::Relaxed);
}

/// This CPU's local APIC ID (bits 31:24 of the ID register). See: SDM Vol 3A 11.4.6.
pub fn apic_id() -> u32 {
    read(ID) >> 24
}

/// Signals the end of the interrupt being handled. See: SDM Vol 3A 11.8.5.
pub fn eoi() {
    write(END_OF_INTERRUPT, 0);
}

/// Waits (bounded) until the previous IPI has left the ICR. See: SDM Vol 3A 11.6.1.
fn wait_for_delivery() {
    let deadline = time::deadline_after_millis(10);
    while read(ICR_LOW) & DELIVERY_PENDING != 0 {
        if time::passed(deadline) {
            log::warn!("apic: an IPI is still pending after 10 ms; sending the next one anyway");
            return;
        }
        core::hint::spin_loop();
    }
}

/// Sends one IPI: destination in ICR high bits 31:24 (physical mode), then the command in
/// ICR low, whose write sends it. See: SDM Vol 3A 11.6.1.
fn send(destination_apic_id: u32, command: u32) {
    wait_for_delivery();
    write(ICR_HIGH, (destination_apic_id & 0xFF) << 24);
    write(ICR_LOW, command);
}

/// INIT IPI (level assert): the target goes to its wait-for-SIPI state. See: SDM Vol 3A
/// 9.4.4.1, 11.6.1 (delivery mode 101).
pub fn send_init(apic_id: u32) {
    send(apic_id, DELIVERY_INIT | LEVEL_ASSERT);
}

/// STARTUP IPI: the target (in wait-for-SIPI) starts in real mode at `vector` * 4 KiB.
/// See: SDM Vol 3A 9.4.4.1, 11.6.1 (delivery mode 110).
pub fn send_startup(apic_id: u32, vector: u8) {
    send(apic_id, DELIVERY_STARTUP | LEVEL_ASSERT | u32::from(vector));
}

/// A fixed interrupt with `vector` to another CPU (e.g. [`KICK_VECTOR`] to wake it from
/// `idle_until_interrupt`). See: SDM Vol 3A 11.6.1 (delivery mode 000).
pub fn send_fixed(apic_id: u32, vector: u8) {
    send(apic_id, DELIVERY_FIXED | LEVEL_ASSERT | u32::from(vector));
}

/// Starts this CPU's periodic tick at `hz` (vector [`TICK_VECTOR`]); it is taken only when
/// interrupts are let in. The count comes from the timer rate measured at boot.
pub fn start_tick(hz: u32) {
    let timer_hz = TIMER_HZ.load(Ordering::Relaxed).max(1);
    let initial = (timer_hz / u64::from(hz.max(1))).clamp(1, u64::from(u32::MAX)) as u32;
    // See: SDM Vol 3A 11.5.4: divide first, then the LVT entry, then the initial count, which
    // starts the timer.
    write(TIMER_DIVIDE, DIVIDE_BY_16);
    write(LVT_TIMER, TIMER_PERIODIC | u32::from(TICK_VECTOR));
    write(TIMER_INITIAL_COUNT, initial);
}

/// Stops this CPU's tick (masked, count 0). A tick that fired just before may still be
/// pending: let it in with `cpu::take_pending_interrupts` before entering a guest.
pub fn stop_tick() {
    write(LVT_TIMER, LVT_MASKED | u32::from(TICK_VECTOR));
    write(TIMER_INITIAL_COUNT, 0);
}

/// The timer's input rate after the divider (Hz), measured at boot.
pub fn timer_hz() -> u64 {
    TIMER_HZ.load(Ordering::Relaxed)
}

/// Ticks CPU `cpu_index` has taken.
pub fn tick_count(cpu_index: usize) -> u64 {
    TICKS
        .get(cpu_index)
        .map_or(0, |count| count.load(Ordering::Relaxed))
}

/// Kicks CPU `cpu_index` has taken.
pub fn kick_count(cpu_index: usize) -> u64 {
    KICKS
        .get(cpu_index)
        .map_or(0, |count| count.load(Ordering::Relaxed))
}

/// Interrupts on vectors nobody asked for (counted, acknowledged, otherwise ignored).
pub fn unexpected_count() -> u64 {
    UNEXPECTED.load(Ordering::Relaxed)
}

/// The tick handler's work: count it for this CPU, acknowledge it.
pub fn handle_tick() {
    if let Some(count) = TICKS.get(console::cpu_index()) {
        count.fetch_add(1, Ordering::Relaxed);
    }
    eoi();
}

/// The kick handler's work: count it for this CPU, acknowledge it.
pub fn handle_kick() {
    if let Some(count) = KICKS.get(console::cpu_index()) {
        count.fetch_add(1, Ordering::Relaxed);
    }
    eoi();
}

/// Any other vector: count it and acknowledge it (a stray fixed interrupt would otherwise
/// block every lower-priority one).
pub fn handle_unexpected() {
    UNEXPECTED.fetch_add(1, Ordering::Relaxed);
    eoi();
}

/// Checks this CPU's tick: runs it at `hz` until `count` ticks arrived (or 10x the time they
/// should take), stops it and lets any last pending tick in. Returns the ticks seen and the
/// microseconds they took. Leaves the tick off, so no timer interrupt is pending when a guest
/// is entered afterwards.
pub fn check_tick(hz: u32, count: u64) -> (u64, u64) {
    let cpu = console::cpu_index();
    let before = tick_count(cpu);
    let limit = (count * 10_000 / u64::from(hz.max(1))).max(10);
    let deadline = time::deadline_after_millis(limit);
    let start = hw::rdtsc();
    start_tick(hz);
    // Polls with short interrupt windows rather than HLT, so a timer that never fires cannot
    // hang the boot.
    while tick_count(cpu) - before < count && !time::passed(deadline) {
        crate::cpu::take_pending_interrupts();
        core::hint::spin_loop();
    }
    let elapsed = hw::rdtsc() - start;
    stop_tick();
    let seen = tick_count(cpu) - before;
    crate::cpu::take_pending_interrupts();
    (seen, time::tsc_to_micros(elapsed))
}
