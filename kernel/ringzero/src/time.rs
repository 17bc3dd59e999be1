//! Time for the hypervisor: the time-stamp counter, calibrated once at boot against the PIT.
//!
//! The 8254 PIT's input clock is fixed by the PC platform (1.193182 MHz), so counting TSC
//! cycles while PIT channel 2 counts down a known number of its ticks gives the TSC frequency
//! (the method Linux's `pit_calibrate_tsc` uses). Channel 2 is the one whose gate and output
//! software can reach without interrupts, through port 0x61: bit 0 gates it, bit 1 routes it
//! to the speaker (kept off), bit 5 reads its OUT line.
//!
//! Assumes an invariant TSC (constant rate, same on every CPU), as every CPU with VT-x/SVM and
//! nested paging has; under Bochs the TSC counts emulated instructions, and calibrating still
//! gives a frequency consistent with the emulated PIT and local APIC timer.
//!
//! See: Intel 8254 Programmable Interval Timer datasheet (order 231164: mode 0 "interrupt on
//! terminal count", control word at port 0x43); SDM Vol 3B 19.17 "Time-stamp counter".

use core::sync::atomic::{AtomicU64, Ordering};
use ringzero_x86::hw;

/// The PIT's input clock in Hz.
const PIT_HZ: u64 = 1_193_182;
/// How long the calibration counts.
const CALIBRATION_MILLIS: u64 = 10;
/// PIT ticks in that time.
const CALIBRATION_PIT_TICKS: u64 = PIT_HZ * CALIBRATION_MILLIS / 1000;

const PIT_CHANNEL_2: u16 = 0x42;
const PIT_COMMAND: u16 = 0x43;
/// PC system control port B: bit 0 channel 2 gate, bit 1 speaker data, bit 5 channel 2 OUT.
const SYSTEM_CONTROL_B: u16 = 0x61;
const GATE_2: u8 = 1 << 0;
const SPEAKER: u8 = 1 << 1;
const OUT_2: u8 = 1 << 5;
/// Control word: channel 2 (bits 7-6 = 10), low then high byte (5-4 = 11), mode 0 (3-1 =
/// 000), binary (0 = 0).
const CHANNEL_2_MODE_0: u8 = 0b1011_0000;
/// Port reads to wait at most for the count to end (each takes about 1 us on hardware).
const MAX_POLLS: u32 = 10_000_000;
/// Assumed when the PIT does not count (a platform without one): a guess, logged as such.
const FALLBACK_HZ: u64 = 1_000_000_000;

static TSC_HZ: AtomicU64 = AtomicU64::new(0);

/// Measures the TSC frequency against the PIT (about 10 ms) and logs it. Called once at boot
/// on the boot CPU, before anything waits on time.
pub fn calibrate() {
    let hz = match measure() {
        Some(hz) => {
            log::info!(
                "time: TSC {} MHz (calibrated against the PIT over {CALIBRATION_MILLIS} ms)",
                hz / 1_000_000
            );
            hz
        }
        None => {
            log::warn!(
                "time: the PIT's channel 2 did not count; assuming a {} MHz TSC",
                FALLBACK_HZ / 1_000_000
            );
            FALLBACK_HZ
        }
    };
    TSC_HZ.store(hz, Ordering::Relaxed);
}

/// Counts TSC cycles over [`CALIBRATION_PIT_TICKS`] of PIT channel 2 in mode 0.
fn measure() -> Option<u64> {
    // SAFETY: ports 0x42, 0x43 and 0x61 are the PIT's channel 2 and the PC control port; the
    // hypervisor uses channel 2 only here, the speaker stays off, and the previous state of
    // port 0x61 is put back at the end.
    unsafe {
        let saved = hw::inb(SYSTEM_CONTROL_B);
        // Gate high (counting enabled), speaker off.
        hw::outb(SYSTEM_CONTROL_B, (saved & !SPEAKER) | GATE_2);
        // Mode 0: OUT goes low now and high when the count reaches zero. See: 8254 datasheet,
        // "Mode 0 - interrupt on terminal count".
        hw::outb(PIT_COMMAND, CHANNEL_2_MODE_0);
        hw::outb(PIT_CHANNEL_2, CALIBRATION_PIT_TICKS as u8);
        hw::outb(PIT_CHANNEL_2, (CALIBRATION_PIT_TICKS >> 8) as u8);
        let start = hw::rdtsc();
        let mut finished = false;
        for _ in 0..MAX_POLLS {
            if hw::inb(SYSTEM_CONTROL_B) & OUT_2 != 0 {
                finished = true;
                break;
            }
        }
        let end = hw::rdtsc();
        hw::outb(SYSTEM_CONTROL_B, saved);
        let cycles = end.wrapping_sub(start);
        (finished && cycles > 0).then(|| cycles * PIT_HZ / CALIBRATION_PIT_TICKS)
    }
}

/// TSC cycles per second (0 before [`calibrate`]).
pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// TSC cycles in `millis` milliseconds.
pub fn millis_to_tsc(millis: u64) -> u64 {
    micros_to_tsc(millis.saturating_mul(1000))
}

/// TSC cycles in `micros` microseconds.
pub fn micros_to_tsc(micros: u64) -> u64 {
    let hz = match tsc_hz() {
        0 => FALLBACK_HZ,
        hz => hz,
    };
    (u128::from(micros) * u128::from(hz) / 1_000_000) as u64
}

/// Microseconds in `cycles` TSC cycles (for logs).
pub fn tsc_to_micros(cycles: u64) -> u64 {
    match tsc_hz() {
        0 => 0,
        hz => (u128::from(cycles) * 1_000_000 / u128::from(hz)) as u64,
    }
}

/// Busy-waits `micros` microseconds.
pub fn delay_micros(micros: u64) {
    let end = hw::rdtsc().wrapping_add(micros_to_tsc(micros));
    while (end.wrapping_sub(hw::rdtsc()) as i64) > 0 {
        core::hint::spin_loop();
    }
}

/// A point in TSC time `millis` milliseconds from now, for bounded waits ([`passed`]).
pub fn deadline_after_millis(millis: u64) -> u64 {
    hw::rdtsc().wrapping_add(millis_to_tsc(millis))
}

/// Whether the TSC has reached `deadline`.
pub fn passed(deadline: u64) -> bool {
    (deadline.wrapping_sub(hw::rdtsc()) as i64) <= 0
}
