//! Time for the hypervisor: the time-stamp counter, calibrated once at boot against the PIT.
//!
//! The 8254 PIT's input clock is fixed by the PC platform (1.193182 MHz), so counting TSC
//! cycles while PIT channel 2 counts down a known number of its ticks gives the TSC frequency
//! (the method of Linux's `pit_calibrate_tsc` / `quick_pit_calibrate`). Channel 2 is the one
//! software can gate without interrupts, through port 0x61 (bit 0 gates it, bit 1 routes it to
//! the speaker, kept off). Each end of the interval is a sample of the channel's counter
//! (latched) bracketed by two TSC reads, so a delay in reading it (an emulator's lock, an SMI)
//! shows up as uncertainty instead of as error; a measurement whose brackets exceed 0.1 % of
//! the interval is repeated, and the tightest of a few is kept.
//!
//! Assumes an invariant TSC (constant rate, same on every CPU), as every CPU with VT-x/SVM and
//! nested paging has; under Bochs the TSC counts emulated instructions, and calibrating still
//! gives a frequency consistent with the emulated PIT and local APIC timer.
//!
//! See: Intel 8254 Programmable Interval Timer datasheet (order 231164): mode 0 "interrupt on
//! terminal count", the control word at port 0x43, the counter-latch command; SDM Vol 3B
//! 19.17 "Time-stamp counter".

use core::sync::atomic::{AtomicU64, Ordering};
use ringzero_x86::hw;

/// The PIT's input clock in Hz.
const PIT_HZ: u64 = 1_193_182;
/// How long the calibration counts.
const CALIBRATION_MILLIS: u64 = 10;
/// PIT ticks in that time.
const CALIBRATION_PIT_TICKS: u16 = (PIT_HZ * CALIBRATION_MILLIS / 1000) as u16;
/// Measurements at most, and the uncertainty (parts per million) that ends them early.
const ATTEMPTS: u32 = 5;
const GOOD_ENOUGH_PPM: u64 = 1000;

const PIT_CHANNEL_2: u16 = 0x42;
const PIT_COMMAND: u16 = 0x43;
/// PC system control port B: bit 0 channel 2 gate, bit 1 speaker data.
const SYSTEM_CONTROL_B: u16 = 0x61;
const GATE_2: u8 = 1 << 0;
const SPEAKER: u8 = 1 << 1;
/// Control word: channel 2 (bits 7-6 = 10), low then high byte (5-4 = 11), mode 0 (3-1 =
/// 000), binary (0 = 0).
const CHANNEL_2_MODE_0: u8 = 0b1011_0000;
/// Counter-latch command for channel 2 (bits 7-6 = 10, 5-4 = 00).
const LATCH_CHANNEL_2: u8 = 0b1000_0000;
/// Counter reads to wait at most for the interval to pass (each is a few port accesses).
const MAX_POLLS: u32 = 1_000_000;
/// Assumed when the PIT does not count (a platform without one): a guess, logged as such.
const FALLBACK_HZ: u64 = 1_000_000_000;

static TSC_HZ: AtomicU64 = AtomicU64::new(0);

/// Measures the TSC frequency against the PIT (about 10 ms, repeated if a measurement was
/// disturbed) and logs it. Called once at boot on the boot CPU, before anything waits on time.
pub fn calibrate() {
    let mut best: Option<Measurement> = None;
    let mut attempts = 0;
    for _ in 0..ATTEMPTS {
        attempts += 1;
        let Some(measurement) = measure() else {
            continue;
        };
        if best.is_none_or(|best| measurement.ppm() < best.ppm()) {
            best = Some(measurement);
        }
        if measurement.ppm() <= GOOD_ENOUGH_PPM {
            break;
        }
    }
    let hz = match best {
        Some(measurement) => {
            let hz = measurement.hz();
            log::info!(
                "time: TSC {} MHz (calibrated against the PIT over {CALIBRATION_MILLIS} ms): {hz} Hz, +-{} ppm, {attempts} attempt(s)",
                (hz + 500_000) / 1_000_000,
                measurement.ppm()
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

/// One reading of PIT channel 2's counter, between two TSC reads.
#[derive(Clone, Copy)]
struct Sample {
    tsc_before: u64,
    tsc_after: u64,
    count: u16,
}

fn sample() -> Sample {
    let tsc_before = hw::rdtsc();
    // SAFETY: latching and reading channel 2's counter has no effect beyond this measurement
    // (the hypervisor uses channel 2 only here). See: 8254 datasheet, "Counter latch command".
    let count = unsafe {
        hw::outb(PIT_COMMAND, LATCH_CHANNEL_2);
        let low = hw::inb(PIT_CHANNEL_2);
        let high = hw::inb(PIT_CHANNEL_2);
        u16::from_le_bytes([low, high])
    };
    Sample {
        tsc_before,
        tsc_after: hw::rdtsc(),
        count,
    }
}

/// Two samples at least [`CALIBRATION_PIT_TICKS`] apart.
#[derive(Clone, Copy)]
struct Measurement {
    first: Sample,
    last: Sample,
}

impl Measurement {
    fn cycles(&self) -> u64 {
        let middle = |sample: &Sample| sample.tsc_before / 2 + sample.tsc_after / 2;
        middle(&self.last)
            .saturating_sub(middle(&self.first))
            .max(1)
    }

    fn hz(&self) -> u64 {
        let ticks = u64::from(self.first.count - self.last.count).max(1);
        self.cycles() * PIT_HZ / ticks
    }

    /// Half the two brackets, relative to the interval, in parts per million.
    fn ppm(&self) -> u64 {
        let bracket = |sample: &Sample| sample.tsc_after.saturating_sub(sample.tsc_before);
        (bracket(&self.first) + bracket(&self.last)) * 500_000 / self.cycles()
    }
}

/// Counts down from 0xFFFF in mode 0 and samples the counter at both ends of the interval.
fn measure() -> Option<Measurement> {
    // SAFETY: ports 0x42, 0x43 and 0x61 are the PIT's channel 2 and the PC control port; the
    // hypervisor uses channel 2 only here, the speaker stays off, and the previous state of
    // port 0x61 is put back at the end.
    let saved = unsafe {
        let saved = hw::inb(SYSTEM_CONTROL_B);
        hw::outb(SYSTEM_CONTROL_B, (saved & !SPEAKER) | GATE_2);
        hw::outb(PIT_COMMAND, CHANNEL_2_MODE_0);
        hw::outb(PIT_CHANNEL_2, 0xFF);
        hw::outb(PIT_CHANNEL_2, 0xFF);
        saved
    };
    // The count is loaded at the PIT's next clock: start once it is visibly counting down.
    let mut first = None;
    let mut last = None;
    for _ in 0..MAX_POLLS {
        let now = sample();
        match first {
            None if now.count <= 0xFFF0 => first = Some(now),
            Some(Sample { count, .. })
                if now.count <= count.saturating_sub(CALIBRATION_PIT_TICKS) =>
            {
                last = Some(now);
                break;
            }
            _ => {}
        }
    }
    // SAFETY: as above: the gate and speaker bits as they were.
    unsafe { hw::outb(SYSTEM_CONTROL_B, saved) };
    Some(Measurement {
        first: first?,
        last: last?,
    })
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

/// The wall-clock time at boot (Unix seconds, UTC) read from the host's CMOS RTC, and the TSC
/// then: `unix_seconds()` counts on from them with the calibrated TSC.
static BOOT_UNIX_SECONDS: AtomicU64 = AtomicU64::new(0);
static BOOT_UNIX_TSC: AtomicU64 = AtomicU64::new(0);

/// Reads the host's real-time clock once (after `calibrate`), for the guests' RTCs. Logs the
/// date it found. See: MC146818A datasheet (registers 0x00-0x09, A.UIP, B.DM and B.24/12), the
/// IBM PC/AT CMOS map (century at 0x32).
pub fn read_wall_clock() {
    const INDEX: u16 = 0x70;
    const DATA: u16 = 0x71;
    // Bit 7 of the index port disables NMIs on PCs: keep it set while reading.
    let read = |register: u8| -> u8 {
        // SAFETY: ports 0x70/0x71 are the CMOS RTC's index and data ports; selecting a register
        // and reading it has no other effect.
        unsafe {
            hw::outb(INDEX, 0x80 | register);
            hw::inb(DATA)
        }
    };
    let snapshot = || {
        // Wait (bounded) while an update is in progress (register A bit 7).
        for _ in 0..100_000 {
            if read(0x0A) & 0x80 == 0 {
                break;
            }
            core::hint::spin_loop();
        }
        [
            read(0x00),
            read(0x02),
            read(0x04),
            read(0x07),
            read(0x08),
            read(0x09),
            read(0x32),
        ]
    };
    // Read until two snapshots agree (an update may fall between the registers).
    let mut values = snapshot();
    for _ in 0..5 {
        let again = snapshot();
        if again == values {
            break;
        }
        values = again;
    }
    let status_b = read(0x0B);
    let binary = status_b & 0x04 != 0;
    let decode = |value: u8| -> u64 {
        if binary {
            u64::from(value)
        } else {
            u64::from((value >> 4) * 10 + (value & 0x0F))
        }
    };
    let [second, minute, hour_raw, day, month, year, century] = values;
    let mut hour = decode(hour_raw & 0x7F);
    if status_b & 0x02 == 0 && hour_raw & 0x80 != 0 {
        // 12-hour mode, PM.
        hour = (hour % 12) + 12;
    }
    let century = match decode(century) {
        19..=21 => decode(century),
        _ => 20,
    };
    let year = century * 100 + decode(year);
    let (month, day) = (decode(month).clamp(1, 12), decode(day).clamp(1, 31));
    let seconds = days_from_civil(year, month, day) * 86_400
        + hour * 3600
        + decode(minute) * 60
        + decode(second);
    BOOT_UNIX_TSC.store(hw::rdtsc(), Ordering::Relaxed);
    BOOT_UNIX_SECONDS.store(seconds, Ordering::Relaxed);
    log::info!(
        "time: wall clock {year:04}-{month:02}-{day:02} {hour:02}:{:02}:{:02} UTC from the CMOS RTC ({seconds} Unix seconds)",
        decode(minute),
        decode(second)
    );
}

/// Days from 1970-01-01 to the given date (proleptic Gregorian), for years from 1970.
/// (H. Hinnant's `days_from_civil`.)
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year / 400;
    let year_of_era = year - era * 400;
    let month_index = (month + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    (era * 146_097 + day_of_era).saturating_sub(719_468)
}

/// The wall-clock time now, in Unix seconds (UTC).
pub fn unix_seconds() -> u64 {
    let hz = tsc_hz().max(1);
    let elapsed = hw::rdtsc().saturating_sub(BOOT_UNIX_TSC.load(Ordering::Relaxed)) / hz;
    BOOT_UNIX_SECONDS.load(Ordering::Relaxed) + elapsed
}
