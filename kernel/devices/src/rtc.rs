//! The VM's real-time clock and CMOS RAM: a Motorola MC146818A at ports 0x70 (index) and 0x71
//! (data), as on the PC/AT. Linux reads the wall-clock time from it at boot (and `hwclock` may
//! set it).
//!
//! Spec: Motorola "MC146818A Real-Time Clock Plus RAM (RTC)" datasheet: "Address Map" figure,
//! "Time, Calendar and Alarm Locations" with the "Time, Calendar, and Alarm Data Modes" table,
//! and the "Register A" to "Register D" sections. The century byte at 0x32 is the IBM PC/AT
//! CMOS convention (the ACPI FADT `CENTURY` field names it).
//!
//! Model decisions:
//! - Time comes from the hypervisor: [`Rtc::new`] takes the Unix time at creation and
//!   [`Rtc::set_clock`] the current Unix time, which the hypervisor calls before it routes an
//!   access here. Time fields are computed from the last time set at each read, so the clock
//!   is never mid-update: UIP (register A bit 7) always reads 0 and no update cycle exists.
//! - The guest may set the clock: while register B SET (bit 7) is 1, writes go to a held copy
//!   of the fields (reads show it, it does not advance); clearing SET commits the held copy as an
//!   offset from the hypervisor's time. A time field written with SET clear is committed at
//!   once. The day of week is derived from the date when committing (a written value shows only
//!   while SET is 1). A held copy that is no valid date (day 31 in a 30-day month is allowed and
//!   rolls over, as the conversion normalizes it; hour 24 is not) is dropped at commit and the
//!   clock keeps its old time.
//! - Field writes that are out of range for their field (minute 60, month 0, a BCD byte with a
//!   nibble above 9) are ignored, so every held value is encodable.
//! - Data mode (register B DM, bit 2: binary or BCD) and hour mode (bit 1: 24 or 12 hour with
//!   the PM flag in bit 7) apply at each read and write: switching them re-presents the current
//!   time at once (on the chip the stored bytes keep the old format until rewritten).
//! - No interrupts: the periodic, alarm and update-ended interrupts are never raised, so
//!   register C always reads 0. The enable bits in register B are stored and read back.
//! - The NMI mask (index port bit 7) is ignored. The index port is write-only; it reads 0xFF.
//! - Alarm bytes (0x01, 0x03, 0x05) and 0x0E..=0x7F (except the century byte) are plain RAM.
//! - Wider accesses are split into byte accesses at consecutive ports (a 16-bit OUT at 0x70
//!   writes the index, then the data); bytes past 0x71 read 0xFF and ignore writes.

use alloc::vec::Vec;
use core::any::Any;
use core::ops::RangeInclusive;

use crate::bus::{access_width, DeviceEvent, PortDevice};

// CMOS addresses. See: MC146818A datasheet, "Address Map" figure.
const SECONDS: u8 = 0x00;
const MINUTES: u8 = 0x02;
const HOURS: u8 = 0x04;
const DAY_OF_WEEK: u8 = 0x06;
const DAY_OF_MONTH: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const REGISTER_A: u8 = 0x0A;
const REGISTER_B: u8 = 0x0B;
const REGISTER_C: u8 = 0x0C;
const REGISTER_D: u8 = 0x0D;
/// Century (BCD or binary per DM), the PC/AT convention.
const CENTURY: u8 = 0x32;

/// Register A: divider 010 (32.768 kHz time base), rate 0110 (1.024 kHz periodic rate), UIP 0.
/// See: MC146818A datasheet, "Register A".
const REGISTER_A_DEFAULT: u8 = 0x26;
/// Bits 6:0 are read/write; UIP (bit 7) is read-only. See: MC146818A datasheet, "Register A".
const REGISTER_A_WRITABLE: u8 = 0x7F;

// Register B bits. See: MC146818A datasheet, "Register B".
const B_SET: u8 = 1 << 7;
const B_UPDATE_ENDED_INTERRUPT_ENABLE: u8 = 1 << 4;
/// DM: 1 = binary, 0 = BCD.
const B_DATA_MODE_BINARY: u8 = 1 << 2;
/// 24/12: 1 = 24-hour mode.
const B_HOUR_MODE_24: u8 = 1 << 1;
/// The PC BIOS default: BCD, 24-hour, no interrupts.
const REGISTER_B_DEFAULT: u8 = B_HOUR_MODE_24;

/// Register D: VRT (bit 7), valid RAM and time. See: MC146818A datasheet, "Register D".
const REGISTER_D_VALUE: u8 = 0x80;

/// The PM flag in the hours byte in 12-hour mode. See: MC146818A datasheet, data modes table.
const HOUR_PM: u8 = 0x80;

/// Seconds in a day.
const SECONDS_PER_DAY: i64 = 86_400;

/// The broken-down time the registers show. Every field is in range for its register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fields {
    second: u8,
    minute: u8,
    /// 0..=23.
    hour: u8,
    /// 1..=7, Sunday = 1. See: MC146818A datasheet, data modes table.
    weekday: u8,
    day: u8,
    month: u8,
    /// Year of the century, 0..=99.
    year: u8,
    /// 0..=99.
    century: u8,
}

impl Fields {
    /// The civil UTC time of `unix_seconds`.
    fn from_unix(unix_seconds: i64) -> Self {
        let days = unix_seconds.div_euclid(SECONDS_PER_DAY);
        let second_of_day = unix_seconds.rem_euclid(SECONDS_PER_DAY);
        let (year, month, day) = civil_from_days(days);
        // 1970-01-01 was a Thursday (weekday 5 with Sunday = 1).
        let weekday = (days.saturating_add(4)).rem_euclid(7) as u8 + 1;
        Self {
            second: (second_of_day % 60) as u8,
            minute: (second_of_day / 60 % 60) as u8,
            hour: (second_of_day / 3600) as u8,
            weekday,
            day,
            month,
            year: year.rem_euclid(100) as u8,
            century: year.div_euclid(100).rem_euclid(100) as u8,
        }
    }

    /// Unix seconds of these fields, or `None` if they are no valid time. Days past the end of
    /// the month roll over into the next month.
    fn to_unix(self) -> Option<i64> {
        let valid = self.second < 60
            && self.minute < 60
            && self.hour < 24
            && (1..=31).contains(&self.day)
            && (1..=12).contains(&self.month)
            && self.year < 100
            && self.century < 100;
        if !valid {
            return None;
        }
        let year = i64::from(self.century) * 100 + i64::from(self.year);
        let days = days_from_civil(year, self.month, self.day);
        Some(
            days * SECONDS_PER_DAY
                + i64::from(self.hour) * 3600
                + i64::from(self.minute) * 60
                + i64::from(self.second),
        )
    }
}

/// The time registers a guest can write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Second,
    Minute,
    Hour,
    Weekday,
    Day,
    Month,
    Year,
    Century,
}

impl Field {
    /// The time field at CMOS `address`, if any.
    fn at(address: u8) -> Option<Self> {
        match address {
            SECONDS => Some(Self::Second),
            MINUTES => Some(Self::Minute),
            HOURS => Some(Self::Hour),
            DAY_OF_WEEK => Some(Self::Weekday),
            DAY_OF_MONTH => Some(Self::Day),
            MONTH => Some(Self::Month),
            YEAR => Some(Self::Year),
            CENTURY => Some(Self::Century),
            _ => None,
        }
    }
}

/// Days since 1970-01-01 of the proleptic Gregorian date `year`-`month`-`day` (`month` 1..=12,
/// `day` 1..=31; a day past the month's end counts on into the next month).
///
/// Howard Hinnant's `days_from_civil` ("chrono-Compatible Low-Level Date Algorithms"): years
/// counted from March so the leap day is last, in 400-year eras of 146097 days.
fn days_from_civil(year: i64, month: u8, day: u8) -> i64 {
    let (month, day) = (i64::from(month), i64::from(day));
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400); // [0, 399]
    let month_from_march = if month > 2 { month - 3 } else { month + 9 }; // [0, 11]
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1; // [0, 365]
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The date (year, month 1..=12, day 1..=31) `days` after 1970-01-01. Hinnant's
/// `civil_from_days`, the inverse of [`days_from_civil`]; exact for any `i64` day count a
/// `i64` second count can produce.
fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097); // [0, 146096]
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153; // [0, 11]
    let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u8;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    } as u8;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// An MC146818A RTC with its 128 bytes of CMOS RAM. See the module documentation.
#[derive(Clone, Debug)]
pub struct Rtc {
    /// The last time the hypervisor set, in Unix seconds (saturated into `i64`).
    host_seconds: i64,
    /// What the guest added by setting the clock.
    guest_offset_seconds: i64,
    /// The fields being set while register B SET is 1.
    held: Option<Fields>,
    /// The selected CMOS address (index port bits 6:0).
    index: u8,
    register_a: u8,
    register_b: u8,
    /// CMOS RAM; the bytes at time and status addresses are unused.
    ram: [u8; Rtc::RAM_SIZE],
}

impl Rtc {
    /// The index port.
    pub const INDEX_PORT: u16 = 0x70;
    /// The data port.
    pub const DATA_PORT: u16 = 0x71;
    /// Bytes of CMOS address space (time, status and RAM).
    pub const RAM_SIZE: usize = 128;

    /// An RTC showing `unix_seconds_at_boot` (UTC), in the PC BIOS's default modes (BCD,
    /// 24-hour, no interrupts) with all RAM bytes 0.
    pub fn new(unix_seconds_at_boot: u64) -> Self {
        Self {
            host_seconds: saturate(unix_seconds_at_boot),
            guest_offset_seconds: 0,
            held: None,
            index: 0,
            register_a: REGISTER_A_DEFAULT,
            register_b: REGISTER_B_DEFAULT,
            ram: [0; Self::RAM_SIZE],
        }
    }

    /// The current wall-clock time in Unix seconds (UTC); the hypervisor calls it before each
    /// access is routed here.
    pub fn set_clock(&mut self, unix_seconds: u64) {
        self.host_seconds = saturate(unix_seconds);
    }

    /// The time the guest sees, in Unix seconds (the hypervisor's time plus what the guest set).
    pub fn guest_unix_seconds(&self) -> i64 {
        self.host_seconds.saturating_add(self.guest_offset_seconds)
    }

    /// CMOS byte `address` as stored (RAM; time and status bytes are not stored here).
    /// Addresses past 0x7F read 0.
    pub fn ram(&self, address: u8) -> u8 {
        self.ram.get(usize::from(address)).copied().unwrap_or(0)
    }

    /// Presets CMOS RAM byte `address` (for the hypervisor, e.g. memory size bytes). Addresses
    /// past 0x7F are ignored.
    pub fn set_ram(&mut self, address: u8, value: u8) {
        if let Some(byte) = self.ram.get_mut(usize::from(address)) {
            *byte = value;
        }
    }

    fn binary(&self) -> bool {
        self.register_b & B_DATA_MODE_BINARY != 0
    }

    fn hour_mode_24(&self) -> bool {
        self.register_b & B_HOUR_MODE_24 != 0
    }

    /// The fields the registers show now: the held copy while SET is 1, else the clock.
    fn fields(&self) -> Fields {
        self.held
            .unwrap_or_else(|| Fields::from_unix(self.guest_unix_seconds()))
    }

    /// Makes `fields` the guest's time if they are a valid time.
    fn commit(&mut self, fields: Fields) {
        if let Some(seconds) = fields.to_unix() {
            self.guest_offset_seconds = seconds.saturating_sub(self.host_seconds);
        }
    }

    /// `value` (0..=99) in the data mode. See: MC146818A datasheet, data modes table.
    fn encode(&self, value: u8) -> u8 {
        let value = value % 100;
        if self.binary() {
            value
        } else {
            ((value / 10) << 4) | (value % 10)
        }
    }

    /// A byte in the data mode as a number, or `None` for a BCD byte with a nibble above 9.
    fn decode(&self, byte: u8) -> Option<u8> {
        if self.binary() {
            return Some(byte);
        }
        let (tens, ones) = (byte >> 4, byte & 0x0F);
        (tens <= 9 && ones <= 9).then_some(tens * 10 + ones)
    }

    /// The hours byte of `hour` (0..=23): 0-23, or 1-12 with PM in bit 7. See: MC146818A
    /// datasheet, data modes table.
    fn encode_hour(&self, hour: u8) -> u8 {
        if self.hour_mode_24() {
            return self.encode(hour);
        }
        let twelve_hour = match hour % 12 {
            0 => 12,
            other => other,
        };
        let pm = if hour >= 12 { HOUR_PM } else { 0 };
        self.encode(twelve_hour) | pm
    }

    /// The hour (0..=23) of an hours byte, or `None` if it is out of range.
    fn decode_hour(&self, byte: u8) -> Option<u8> {
        if self.hour_mode_24() {
            return self.decode(byte).filter(|hour| *hour < 24);
        }
        let twelve_hour = self
            .decode(byte & !HOUR_PM)
            .filter(|hour| (1..=12).contains(hour))?;
        let pm = if byte & HOUR_PM != 0 { 12 } else { 0 };
        Some(twelve_hour % 12 + pm)
    }

    /// A guest read of CMOS `address` (0..=0x7F).
    fn read_cmos(&self, address: u8) -> u8 {
        let fields = self.fields();
        match address {
            SECONDS => self.encode(fields.second),
            MINUTES => self.encode(fields.minute),
            HOURS => self.encode_hour(fields.hour),
            DAY_OF_WEEK => self.encode(fields.weekday),
            DAY_OF_MONTH => self.encode(fields.day),
            MONTH => self.encode(fields.month),
            YEAR => self.encode(fields.year),
            CENTURY => self.encode(fields.century),
            // UIP (bit 7) is always 0: the clock is never mid-update.
            REGISTER_A => self.register_a & REGISTER_A_WRITABLE,
            REGISTER_B => self.register_b,
            // No interrupt flags are ever set. See: MC146818A datasheet, "Register C".
            REGISTER_C => 0,
            REGISTER_D => REGISTER_D_VALUE,
            _ => self.ram(address),
        }
    }

    /// A guest write of `byte` to CMOS `address` (0..=0x7F).
    fn write_cmos(&mut self, address: u8, byte: u8) {
        if let Some(field) = Field::at(address) {
            self.write_field(field, byte);
            return;
        }
        match address {
            REGISTER_A => self.register_a = byte & REGISTER_A_WRITABLE,
            REGISTER_B => {
                let mut value = byte;
                // SET = 1 clears UIE. See: MC146818A datasheet, "Register B" (SET, UIE).
                if value & B_SET != 0 {
                    value &= !B_UPDATE_ENDED_INTERRUPT_ENABLE;
                }
                let was_set = self.register_b & B_SET != 0;
                match (was_set, value & B_SET != 0) {
                    (false, true) => self.held = Some(self.fields()),
                    (true, false) => {
                        if let Some(fields) = self.held.take() {
                            self.commit(fields);
                        }
                    }
                    _ => {}
                }
                self.register_b = value;
            }
            // Registers C and D are read-only. See: MC146818A datasheet, "Register C", "D".
            REGISTER_C | REGISTER_D => {}
            _ => self.set_ram(address, byte),
        }
    }

    /// A guest write of `byte` to a time field: checked against the field's range (ignored if
    /// out of range), then held (SET is 1) or committed.
    fn write_field(&mut self, field: Field, byte: u8) {
        let value = match field {
            Field::Hour => self.decode_hour(byte),
            Field::Second | Field::Minute => self.decode(byte).filter(|value| *value < 60),
            Field::Weekday => self.decode(byte).filter(|value| (1..=7).contains(value)),
            Field::Day => self.decode(byte).filter(|value| (1..=31).contains(value)),
            Field::Month => self.decode(byte).filter(|value| (1..=12).contains(value)),
            Field::Year | Field::Century => self.decode(byte).filter(|value| *value < 100),
        };
        let Some(value) = value else {
            return;
        };
        let mut fields = self.fields();
        let slot = match field {
            Field::Second => &mut fields.second,
            Field::Minute => &mut fields.minute,
            Field::Hour => &mut fields.hour,
            Field::Weekday => &mut fields.weekday,
            Field::Day => &mut fields.day,
            Field::Month => &mut fields.month,
            Field::Year => &mut fields.year,
            Field::Century => &mut fields.century,
        };
        *slot = value;
        if self.held.is_some() {
            self.held = Some(fields);
        } else {
            self.commit(fields);
        }
    }

    /// One byte at `port`: the data port reads the selected CMOS byte, anything else 0xFF.
    fn read_port(&mut self, port: u16) -> u8 {
        match port {
            Self::DATA_PORT => self.read_cmos(self.index),
            // The index register is write-only; reads see nothing driving the bus.
            _ => 0xFF,
        }
    }

    fn write_port(&mut self, port: u16, byte: u8) {
        match port {
            // Bit 7 is the PC's NMI mask, ignored here.
            Self::INDEX_PORT => self.index = byte & 0x7F,
            Self::DATA_PORT => self.write_cmos(self.index, byte),
            _ => {}
        }
    }
}

/// `value` as `i64`, saturated.
fn saturate(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl PortDevice for Rtc {
    fn name(&self) -> &'static str {
        "mc146818-rtc"
    }

    fn ports(&self) -> RangeInclusive<u16> {
        Self::INDEX_PORT..=Self::DATA_PORT
    }

    fn read(&mut self, port: u16, size: u8) -> u32 {
        let mut value = 0;
        for index in 0..access_width(size) {
            let byte = match port.checked_add(u16::from(index)) {
                Some(port) => self.read_port(port),
                None => 0xFF,
            };
            value |= u32::from(byte) << (8 * u32::from(index));
        }
        value
    }

    fn write(&mut self, port: u16, size: u8, value: u32, _events: &mut Vec<DeviceEvent>) {
        for (index, byte) in (0..access_width(size)).zip(value.to_le_bytes()) {
            if let Some(port) = port.checked_add(u16::from(index)) {
                self.write_port(port, byte);
            }
        }
    }

    fn as_any_mut(&mut self) -> Option<&mut dyn Any> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::PortBus;
    use alloc::boxed::Box;

    fn read(rtc: &mut Rtc, address: u8) -> u8 {
        let mut events = Vec::new();
        rtc.write(Rtc::INDEX_PORT, 1, u32::from(address), &mut events);
        rtc.read(Rtc::DATA_PORT, 1) as u8
    }

    fn write(rtc: &mut Rtc, address: u8, value: u8) {
        let mut events = Vec::new();
        rtc.write(Rtc::INDEX_PORT, 1, u32::from(address), &mut events);
        rtc.write(Rtc::DATA_PORT, 1, u32::from(value), &mut events);
        assert!(events.is_empty());
    }

    /// (sec, min, hour, weekday, day, month, year, century) as the registers show them.
    fn time(rtc: &mut Rtc) -> [u8; 8] {
        [
            SECONDS,
            MINUTES,
            HOURS,
            DAY_OF_WEEK,
            DAY_OF_MONTH,
            MONTH,
            YEAR,
            CENTURY,
        ]
        .map(|address| read(rtc, address))
    }

    #[test]
    fn known_dates_in_bcd_24_hour() {
        // Expected values from an independent source (Python's calendar.timegm and
        // isoweekday), weekday with Sunday = 1.
        for (unix, expected) in [
            (0, [0x00, 0x00, 0x00, 0x05, 0x01, 0x01, 0x70, 0x19]),
            (
                946_684_800,
                [0x00, 0x00, 0x00, 0x07, 0x01, 0x01, 0x00, 0x20],
            ),
            (
                946_684_799,
                [0x59, 0x59, 0x23, 0x06, 0x31, 0x12, 0x99, 0x19],
            ),
            (
                1_709_251_199,
                [0x59, 0x59, 0x23, 0x05, 0x29, 0x02, 0x24, 0x20],
            ),
            (
                1_795_523_696,
                [0x56, 0x34, 0x12, 0x03, 0x24, 0x11, 0x26, 0x20],
            ),
            (
                2_147_483_648,
                [0x08, 0x14, 0x03, 0x03, 0x19, 0x01, 0x38, 0x20],
            ),
            (
                4_107_542_400,
                [0x00, 0x00, 0x00, 0x02, 0x01, 0x03, 0x00, 0x21],
            ),
        ] {
            let mut rtc = Rtc::new(unix);
            assert_eq!(time(&mut rtc), expected, "unix {unix}");
        }
    }

    #[test]
    fn civil_conversions_round_trip() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 1, 1) * SECONDS_PER_DAY, 946_684_800);
        assert_eq!(
            days_from_civil(2024, 2, 29) * SECONDS_PER_DAY + 86_399,
            1_709_251_199
        );
        for days in (-800_000..800_000).step_by(97) {
            let (year, month, day) = civil_from_days(days);
            assert_eq!(days_from_civil(year, month, day), days);
        }
        // Extremes must not panic.
        Fields::from_unix(i64::MAX);
        Fields::from_unix(i64::MIN);
        let mut rtc = Rtc::new(u64::MAX);
        time(&mut rtc);
    }

    #[test]
    fn status_registers() {
        let mut rtc = Rtc::new(0);
        assert_eq!(read(&mut rtc, REGISTER_A), 0x26);
        assert_eq!(read(&mut rtc, REGISTER_B), 0x02);
        assert_eq!(read(&mut rtc, REGISTER_C), 0x00);
        assert_eq!(read(&mut rtc, REGISTER_D), 0x80);
        write(&mut rtc, REGISTER_A, 0xFF);
        assert_eq!(read(&mut rtc, REGISTER_A), 0x7F, "UIP never set");
        write(&mut rtc, REGISTER_C, 0xFF);
        write(&mut rtc, REGISTER_D, 0x00);
        assert_eq!(read(&mut rtc, REGISTER_C), 0x00);
        assert_eq!(read(&mut rtc, REGISTER_D), 0x80);
        // NMI mask bit in the index is ignored.
        assert_eq!(read(&mut rtc, 0x80 | REGISTER_D), 0x80);
        assert_eq!(rtc.read(Rtc::INDEX_PORT, 1), 0xFF);
    }

    #[test]
    fn binary_and_12_hour_modes() {
        // 2026-11-24 12:34:56 UTC, then 00:05:00 and 23:00:00 the same day.
        let noon = 1_795_523_696;
        let mut rtc = Rtc::new(noon);
        write(&mut rtc, REGISTER_B, B_DATA_MODE_BINARY | B_HOUR_MODE_24);
        assert_eq!(time(&mut rtc), [56, 34, 12, 3, 24, 11, 26, 20]);
        write(&mut rtc, REGISTER_B, B_DATA_MODE_BINARY);
        assert_eq!(read(&mut rtc, HOURS), 0x80 | 12, "12:34 is 12 PM");
        let midnight = noon - (12 * 3600 + 34 * 60 + 56);
        rtc.set_clock(midnight + 300);
        assert_eq!(read(&mut rtc, HOURS), 12, "00:05 is 12 AM");
        rtc.set_clock(midnight + 23 * 3600);
        assert_eq!(read(&mut rtc, HOURS), 0x80 | 11);
        write(&mut rtc, REGISTER_B, 0);
        assert_eq!(read(&mut rtc, HOURS), 0x91, "BCD 11 PM");
        rtc.set_clock(midnight + 9 * 3600);
        assert_eq!(read(&mut rtc, HOURS), 0x09);
    }

    #[test]
    fn clock_follows_set_clock() {
        let mut rtc = Rtc::new(946_684_799);
        assert_eq!(read(&mut rtc, SECONDS), 0x59);
        rtc.set_clock(946_684_800 + 61);
        assert_eq!(
            time(&mut rtc),
            [0x01, 0x01, 0x00, 0x07, 0x01, 0x01, 0x00, 0x20]
        );
    }

    #[test]
    fn guest_sets_the_clock_with_set_bit() {
        let mut rtc = Rtc::new(946_684_800); // 2000-01-31 is reached below through writes
        write(&mut rtc, DAY_OF_MONTH, 0x31);
        assert_eq!(rtc.guest_unix_seconds(), 946_684_800 + 30 * 86_400);
        // Linux's order: SET, then year, month, day, hours, minutes, seconds, then clear SET.
        // Month 02 with day 31 held must not roll over before the day is written.
        write(
            &mut rtc,
            REGISTER_B,
            B_SET | B_HOUR_MODE_24 | B_UPDATE_ENDED_INTERRUPT_ENABLE,
        );
        assert_eq!(
            read(&mut rtc, REGISTER_B),
            B_SET | B_HOUR_MODE_24,
            "SET clears UIE"
        );
        write(&mut rtc, CENTURY, 0x20);
        write(&mut rtc, YEAR, 0x24);
        write(&mut rtc, MONTH, 0x02);
        write(&mut rtc, DAY_OF_MONTH, 0x29);
        write(&mut rtc, HOURS, 0x23);
        write(&mut rtc, MINUTES, 0x59);
        write(&mut rtc, SECONDS, 0x58);
        // Held: time does not advance while SET is 1.
        rtc.set_clock(946_684_800 + 1000);
        assert_eq!(read(&mut rtc, SECONDS), 0x58);
        assert_eq!(read(&mut rtc, MONTH), 0x02);
        write(&mut rtc, REGISTER_B, B_HOUR_MODE_24);
        assert_eq!(rtc.guest_unix_seconds(), 1_709_251_198);
        assert_eq!(read(&mut rtc, DAY_OF_WEEK), 0x05);
        // The offset holds as the host clock moves.
        rtc.set_clock(946_684_800 + 1001);
        assert_eq!(read(&mut rtc, SECONDS), 0x59);
        rtc.set_clock(946_684_800 + 1002);
        assert_eq!(
            time(&mut rtc),
            [0x00, 0x00, 0x00, 0x06, 0x01, 0x03, 0x24, 0x20]
        );
    }

    #[test]
    fn invalid_time_writes_are_ignored() {
        let mut rtc = Rtc::new(946_684_800);
        write(&mut rtc, MINUTES, 0x60);
        write(&mut rtc, MINUTES, 0x1A);
        write(&mut rtc, MONTH, 0x00);
        write(&mut rtc, MONTH, 0x13);
        write(&mut rtc, HOURS, 0x24);
        write(&mut rtc, DAY_OF_WEEK, 0x08);
        assert_eq!(rtc.guest_unix_seconds(), 946_684_800);
        // 12-hour mode: hour 0 and 13 do not exist.
        write(&mut rtc, REGISTER_B, 0);
        write(&mut rtc, HOURS, 0x00);
        write(&mut rtc, HOURS, 0x13);
        assert_eq!(rtc.guest_unix_seconds(), 946_684_800);
        write(&mut rtc, HOURS, 0x81); // 1 PM
        assert_eq!(rtc.guest_unix_seconds(), 946_684_800 + 13 * 3600);
        write(&mut rtc, HOURS, 0x12); // 12 AM = 0
        assert_eq!(rtc.guest_unix_seconds(), 946_684_800);
    }

    #[test]
    fn cmos_ram_and_wide_accesses() {
        let mut bus = PortBus::new();
        bus.add(Box::new(Rtc::new(0))).unwrap();
        let mut events = Vec::new();
        // A 16-bit OUT writes index then data.
        bus.write(0x70, 2, 0xA5_40, &mut events);
        bus.write(0x70, 1, 0x40, &mut events);
        assert_eq!(bus.read(0x71, 1).value, 0xA5);
        // A 16-bit IN at 0x70 reads the index port (0xFF) then data.
        assert_eq!(bus.read(0x70, 2).value, 0xA5_FF);
        // 32-bit IN at 0x71: data, then ports past the device.
        assert_eq!(bus.read(0x71, 4).value, 0xFFFF_FFA5);
        let rtc = bus.device_mut::<Rtc>(0x70).unwrap();
        assert_eq!(rtc.ram(0x40), 0xA5);
        rtc.set_ram(0x7F, 1);
        rtc.set_ram(0x80, 1);
        assert_eq!(rtc.ram(0x80), 0);
        let mut rtc = Rtc::new(0);
        write(&mut rtc, 0x7F, 0x11);
        write(&mut rtc, 0x01, 0x22); // alarm seconds: plain RAM
        assert_eq!(read(&mut rtc, 0x7F), 0x11);
        assert_eq!(read(&mut rtc, 0x01), 0x22);
        assert_eq!(events, []);
    }

    #[test]
    fn every_access_is_safe() {
        let mut rtc = Rtc::new(1_795_523_696);
        let mut events = Vec::new();
        for register_b in [0x00, 0x02, 0x04, 0x06, 0x80, 0x86] {
            for address in 0..=255u8 {
                for value in [0x00, 0x09, 0x59, 0x99, 0xFF, 0x8C, 0x12] {
                    write(&mut rtc, REGISTER_B, register_b);
                    write(&mut rtc, address, value);
                    read(&mut rtc, address);
                }
            }
        }
        for port in [0x6F, 0x70, 0x71, 0x72, u16::MAX] {
            for size in [0, 1, 2, 3, 4, 255] {
                rtc.read(port, size);
                rtc.write(port, size, u32::MAX, &mut events);
            }
        }
        assert!(events.is_empty());
    }
}
