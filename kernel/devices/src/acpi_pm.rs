//! The VM's ACPI fixed power-management hardware: the PM1a event block (status and enable), the
//! PM1a control block (where the guest enters S5 to power off) and the PM timer, in one I/O
//! range at a base the hypervisor picks and the FADT announces.
//!
//! Spec: ACPI Specification 6.4, "ACPI Hardware Specification" chapter: PM1 Event Grouping with
//! Table 4.11 (PM1 Status bits) and Table 4.12 (PM1 Enable bits), PM1 Control Grouping with
//! Table 4.13 (PM1 Control bits), and the Power Management Timer (PM_TMR); "Waking and
//! Sleeping" chapter for the SLP_TYPx / SLP_EN sequence; FADT (Table 5.9) for the block
//! addresses and lengths and the TMR_VAL_EXT flag.
//!
//! Layout from the base (what the ACPI builder must put in the FADT):
//! | offset | FADT field | length | content |
//! |---|---|---|---|
//! | 0 | PM1a_EVT_BLK | 4 | PM1_STS (2 bytes), PM1_EN (2 bytes) |
//! | 4 | PM1a_CNT_BLK | 2 | PM1_CNT |
//! | 8 | PM_TMR_BLK | 4 | PM_TMR |
//! Bytes 6 and 7 belong to no register: they read 0xFF and ignore writes.
//!
//! Model decisions:
//! - ACPI mode is always on: SCI_EN reads 1 and cannot be cleared, so the FADT has no SMI_CMD
//!   port (0) and the guest never tries the ACPI enable handshake.
//! - Power off: a write that sets SLP_EN with SLP_TYPx = [`AcpiPm::S5_SLEEP_TYPE`] (5) produces
//!   [`DeviceEvent::PowerOff`]. The DSDT's `\_S5` package must carry the value 5. Other sleep
//!   types are ignored (the DSDT declares no S1-S4, so an OS does not ask for them).
//! - No status source exists: nothing sets a PM1_STS bit and no SCI is ever raised (no power
//!   button, no timer overflow event). PM1_STS reads 0; PM1_EN is stored and read back.
//! - The PM timer counts at 3.579545 MHz, computed from the TSC value and frequency the
//!   hypervisor passes with [`AcpiPm::set_tsc`] before routing an access here. It is 24 bits
//!   wide unless [`AcpiPm::with_extended_timer`] made it 32 (then the FADT must set
//!   TMR_VAL_EXT).
//! - Accesses of any size at any offset are split into the registers' bytes: a byte write to
//!   the high byte of PM1_CNT (SLP_TYPx and SLP_EN live there) works like a 16-bit one.

use alloc::vec::Vec;
use core::any::Any;
use core::ops::RangeInclusive;

use crate::bus::{access_width, DeviceEvent, PortDevice};

// Register offsets from the base (see the layout table in the module documentation).
const OFFSET_STATUS: u32 = 0;
const OFFSET_ENABLE: u32 = 2;
const OFFSET_CONTROL: u32 = 4;
const OFFSET_TIMER: u32 = 8;
/// Number of ports the device owns.
const PORT_COUNT: u16 = 12;

/// PM1_EN bits: TMR_EN (0), GBL_EN (5), PWRBTN_EN (8), SLPBTN_EN (9), RTC_EN (10),
/// PCIEXP_WAKE_DIS (14). See: ACPI 6.4 Table 4.12.
const ENABLE_WRITABLE: u16 = 0x4721;

// PM1_CNT bits. See: ACPI 6.4 Table 4.13.
/// SCI_EN: events raise SCIs (ACPI mode). Always 1 here.
const CONTROL_SCI_ENABLE: u16 = 1 << 0;
/// BM_RLD: read/write, no effect here.
const CONTROL_BUS_MASTER_RELOAD: u16 = 1 << 1;
/// Bit 9: "ignore", software preserves it; stored and read back.
const CONTROL_IGNORED_BIT: u16 = 1 << 9;
const CONTROL_SLEEP_TYPE_SHIFT: u32 = 10;
const CONTROL_SLEEP_TYPE_MASK: u16 = 0x7 << CONTROL_SLEEP_TYPE_SHIFT;
/// SLP_EN: write-only, reads 0; writing 1 enters the sleep state in SLP_TYPx.
const CONTROL_SLEEP_ENABLE: u16 = 1 << 13;
/// The bits that are stored (GBL_RLS, bit 2, and SLP_EN are write-only and read 0).
const CONTROL_STORED: u16 =
    CONTROL_BUS_MASTER_RELOAD | CONTROL_IGNORED_BIT | CONTROL_SLEEP_TYPE_MASK;

/// The ACPI PM1a blocks and PM timer. See the module documentation.
#[derive(Clone, Debug)]
pub struct AcpiPm {
    base: u16,
    /// PM1_EN.
    enable: u16,
    /// PM1_CNT without SCI_EN (always read as 1).
    control: u16,
    /// The last TSC value and TSC frequency the hypervisor passed.
    tsc: u64,
    tsc_hz: u64,
    /// Mask of the PM timer's width (24 or 32 bits).
    timer_mask: u32,
}

impl AcpiPm {
    /// Offset and length of PM1a_EVT_BLK (FADT PM1a_EVT_BLK, PM1_EVT_LEN).
    pub const PM1_EVENT_OFFSET: u16 = 0;
    pub const PM1_EVENT_LENGTH: u8 = 4;
    /// Offset and length of PM1a_CNT_BLK (FADT PM1a_CNT_BLK, PM1_CNT_LEN).
    pub const PM1_CONTROL_OFFSET: u16 = 4;
    pub const PM1_CONTROL_LENGTH: u8 = 2;
    /// Offset and length of PM_TMR_BLK (FADT PM_TMR_BLK, PM_TMR_LEN).
    pub const TIMER_OFFSET: u16 = 8;
    pub const TIMER_LENGTH: u8 = 4;
    /// The PM timer's frequency. See: ACPI 6.4, Power Management Timer.
    pub const TIMER_FREQUENCY_HZ: u64 = 3_579_545;
    /// The SLP_TYPx value that powers the VM off: the DSDT's `\_S5` must return it.
    pub const S5_SLEEP_TYPE: u8 = 5;

    /// The blocks at `base..=base + 11` (a larger base is clamped to 0xFFF4 so the range stays
    /// valid), with a 24-bit PM timer at TSC 0, everything disabled, SCI_EN set.
    pub fn new(base: u16) -> Self {
        Self {
            base: base.min(u16::MAX - (PORT_COUNT - 1)),
            enable: 0,
            control: 0,
            tsc: 0,
            tsc_hz: 0,
            timer_mask: 0x00FF_FFFF,
        }
    }

    /// Makes the PM timer 32 bits wide (the FADT must then set TMR_VAL_EXT).
    pub fn with_extended_timer(mut self) -> Self {
        self.timer_mask = u32::MAX;
        self
    }

    /// The first port of the blocks.
    pub fn base(&self) -> u16 {
        self.base
    }

    /// The current TSC value and the TSC frequency in Hz; the PM timer reads
    /// `tsc * 3579545 / tsc_hz` (truncated to its width). A frequency of 0 stops it at 0.
    pub fn set_tsc(&mut self, tsc: u64, tsc_hz: u64) {
        self.tsc = tsc;
        self.tsc_hz = tsc_hz;
    }

    /// PM_TMR. See: ACPI 6.4, Power Management Timer.
    pub fn timer(&self) -> u32 {
        if self.tsc_hz == 0 {
            return 0;
        }
        let ticks =
            u128::from(self.tsc) * u128::from(Self::TIMER_FREQUENCY_HZ) / u128::from(self.tsc_hz);
        (ticks as u32) & self.timer_mask
    }

    /// The value of the register starting at `offset` and its length in bytes.
    fn register(&self, offset: u32) -> Option<(u32, u32)> {
        match offset {
            // No status source: PM1_STS reads 0. See: ACPI 6.4 Table 4.11.
            OFFSET_STATUS => Some((0, 2)),
            OFFSET_ENABLE => Some((u32::from(self.enable), 2)),
            OFFSET_CONTROL => Some((u32::from(self.control | CONTROL_SCI_ENABLE), 2)),
            OFFSET_TIMER => Some((self.timer(), 4)),
            _ => None,
        }
    }

    /// The register containing byte `offset` (its start offset), if any.
    fn register_start(offset: u32) -> Option<u32> {
        match offset {
            0..=1 => Some(OFFSET_STATUS),
            2..=3 => Some(OFFSET_ENABLE),
            4..=5 => Some(OFFSET_CONTROL),
            8..=11 => Some(OFFSET_TIMER),
            _ => None,
        }
    }

    /// A write of the bytes of `value` selected by `byte_mask` to the register at `offset`.
    fn write_register(
        &mut self,
        offset: u32,
        value: u16,
        byte_mask: u16,
        events: &mut Vec<DeviceEvent>,
    ) {
        match offset {
            OFFSET_ENABLE => {
                let changed = byte_mask & ENABLE_WRITABLE;
                self.enable = (self.enable & !changed) | (value & changed);
            }
            OFFSET_CONTROL => {
                let written = value & byte_mask;
                let merged = (self.control & !byte_mask) | written;
                self.control = merged & CONTROL_STORED;
                // See: ACPI 6.4 Table 4.13 (SLP_EN: "causes the system to sequence into the
                // sleeping state associated with the SLP_TYPx fields").
                let sleep_type = (merged & CONTROL_SLEEP_TYPE_MASK) >> CONTROL_SLEEP_TYPE_SHIFT;
                if written & CONTROL_SLEEP_ENABLE != 0
                    && sleep_type == u16::from(Self::S5_SLEEP_TYPE)
                {
                    events.push(DeviceEvent::PowerOff);
                }
            }
            // PM1_STS bits are write-1-to-clear and none is ever set; PM_TMR is read-only.
            _ => {}
        }
    }

    /// The offset from the base of byte `index` of an access at `port`.
    fn offset_of(&self, port: u16, index: u8) -> Option<u32> {
        (u32::from(port) + u32::from(index)).checked_sub(u32::from(self.base))
    }
}

impl PortDevice for AcpiPm {
    fn name(&self) -> &'static str {
        "acpi-pm"
    }

    fn ports(&self) -> RangeInclusive<u16> {
        self.base..=self.base + (PORT_COUNT - 1)
    }

    fn read(&mut self, port: u16, size: u8) -> u32 {
        let mut value = 0;
        for index in 0..access_width(size) {
            let byte = self
                .offset_of(port, index)
                .and_then(|offset| {
                    let start = Self::register_start(offset)?;
                    let (register, _) = self.register(start)?;
                    Some((register >> (8 * (offset - start))) & 0xFF)
                })
                .unwrap_or(0xFF);
            value |= byte << (8 * u32::from(index));
        }
        value
    }

    fn write(&mut self, port: u16, size: u8, value: u32, events: &mut Vec<DeviceEvent>) {
        // Gather the bytes per register, then write each register once.
        let mut pending: [(u16, u16); 3] = [(0, 0); 3];
        for (index, byte) in (0..access_width(size)).zip(value.to_le_bytes()) {
            let Some(offset) = self.offset_of(port, index) else {
                continue;
            };
            let slot = match Self::register_start(offset) {
                Some(OFFSET_STATUS) => 0,
                Some(OFFSET_ENABLE) => 1,
                Some(OFFSET_CONTROL) => 2,
                _ => continue,
            };
            let shift = 8 * (offset % 2);
            pending[slot].0 |= u16::from(byte) << shift;
            pending[slot].1 |= 0xFF << shift;
        }
        for (offset, (register_value, byte_mask)) in [OFFSET_STATUS, OFFSET_ENABLE, OFFSET_CONTROL]
            .into_iter()
            .zip(pending)
        {
            if byte_mask != 0 {
                self.write_register(offset, register_value, byte_mask, events);
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

    const BASE: u16 = 0x600;
    const STATUS: u16 = BASE;
    const ENABLE: u16 = BASE + 2;
    const CONTROL: u16 = BASE + 4;
    const TIMER: u16 = BASE + 8;

    fn pm_on_bus() -> PortBus {
        let mut bus = PortBus::new();
        bus.add(Box::new(AcpiPm::new(BASE))).unwrap();
        bus
    }

    fn out(bus: &mut PortBus, port: u16, size: u8, value: u32) -> Vec<DeviceEvent> {
        let mut events = Vec::new();
        bus.write(port, size, value, &mut events);
        events
    }

    #[test]
    fn sci_enabled_and_registers_read_back() {
        let mut bus = pm_on_bus();
        assert_eq!(bus.read(CONTROL, 2).value, 0x0001, "SCI_EN always set");
        assert!(out(&mut bus, CONTROL, 2, 0x0000).is_empty());
        assert_eq!(
            bus.read(CONTROL, 2).value,
            0x0001,
            "SCI_EN cannot be cleared"
        );
        assert_eq!(bus.read(STATUS, 2).value, 0);
        out(&mut bus, ENABLE, 2, 0xFFFF);
        assert_eq!(bus.read(ENABLE, 2).value, 0x4721);
        out(&mut bus, ENABLE, 1, 0x00);
        assert_eq!(
            bus.read(ENABLE, 2).value,
            0x4700,
            "byte write keeps the high byte"
        );
        // The event block as one dword: status low, enable high.
        assert_eq!(bus.read(STATUS, 4).value, 0x4700_0000);
        out(&mut bus, STATUS, 4, 0xFFFF_FFFF);
        assert_eq!(bus.read(STATUS, 2).value, 0, "W1C with nothing set");
        assert_eq!(bus.read(ENABLE, 2).value, 0x4721);
        // SLP_TYP and BM_RLD read back; GBL_RLS and SLP_EN do not.
        assert!(out(&mut bus, CONTROL, 2, 0x0C06).is_empty());
        assert_eq!(bus.read(CONTROL, 2).value, 0x0C03);
        // Ports 6 and 7 are no register.
        assert_eq!(bus.read(BASE + 6, 2).value, 0xFFFF);
        assert!(out(&mut bus, BASE + 6, 2, 0xFFFF).is_empty());
    }

    #[test]
    fn linux_power_off_sequence() {
        let mut bus = pm_on_bus();
        // acpi_hw_legacy_sleep: write SLP_TYP first, then SLP_TYP | SLP_EN.
        let sleep_type = u32::from(AcpiPm::S5_SLEEP_TYPE) << 10;
        let control = bus.read(CONTROL, 2).value;
        assert!(out(&mut bus, CONTROL, 2, control | sleep_type).is_empty());
        let events = out(&mut bus, CONTROL, 2, control | sleep_type | 1 << 13);
        assert_eq!(events, [DeviceEvent::PowerOff]);
        // A byte write to the high byte alone works too.
        let mut bus = pm_on_bus();
        let events = out(&mut bus, CONTROL + 1, 1, (sleep_type | 1 << 13) >> 8);
        assert_eq!(events, [DeviceEvent::PowerOff]);
    }

    #[test]
    fn other_sleep_types_do_nothing() {
        let mut bus = pm_on_bus();
        for sleep_type in [0u32, 1, 2, 3, 4, 6, 7] {
            let events = out(&mut bus, CONTROL, 2, sleep_type << 10 | 1 << 13);
            assert!(events.is_empty(), "SLP_TYP {sleep_type}");
        }
        // SLP_TYP 5 without SLP_EN: nothing.
        assert!(out(&mut bus, CONTROL, 2, 5 << 10).is_empty());
        assert_eq!(bus.read(CONTROL, 2).value, 5 << 10 | 1);
    }

    #[test]
    fn pm_timer_follows_the_tsc() {
        let mut pm = AcpiPm::new(BASE);
        assert_eq!(pm.read(TIMER, 4), 0);
        // A 2 GHz TSC: one second is 3579545 ticks.
        pm.set_tsc(2_000_000_000, 2_000_000_000);
        assert_eq!(pm.read(TIMER, 4), 3_579_545);
        pm.set_tsc(1_000_000_000, 2_000_000_000);
        assert_eq!(pm.read(TIMER, 4), 1_789_772);
        // 24-bit wrap: 10 seconds = 35795450 ticks.
        pm.set_tsc(20_000_000_000, 2_000_000_000);
        assert_eq!(pm.read(TIMER, 4), 35_795_450 & 0xFF_FFFF);
        assert_eq!(pm.read(TIMER + 2, 2), (35_795_450 >> 16) & 0xFF);
        let mut extended = AcpiPm::new(BASE).with_extended_timer();
        extended.set_tsc(20_000_000_000, 2_000_000_000);
        assert_eq!(extended.read(TIMER, 4), 35_795_450);
        // Huge TSC values do not overflow; frequency 0 reads 0.
        extended.set_tsc(u64::MAX, 1);
        extended.read(TIMER, 4);
        extended.set_tsc(u64::MAX, 0);
        assert_eq!(extended.read(TIMER, 4), 0);
        // Writes to the timer are ignored.
        let mut events = Vec::new();
        pm.write(TIMER, 4, 0, &mut events);
        assert_eq!(pm.read(TIMER, 4), 35_795_450 & 0xFF_FFFF);
        assert!(events.is_empty());
    }

    #[test]
    fn range_and_clamped_base() {
        let pm = AcpiPm::new(BASE);
        assert_eq!(pm.ports(), 0x600..=0x60B);
        let pm = AcpiPm::new(0xFFFF);
        assert_eq!(pm.base(), 0xFFF4);
        assert_eq!(pm.ports(), 0xFFF4..=0xFFFF);
    }

    #[test]
    fn every_access_is_safe() {
        let mut pm = AcpiPm::new(0xFFF4);
        pm.set_tsc(u64::MAX, 3);
        let mut events = Vec::new();
        for port in (0xFFF0..=0xFFFF).chain([0, 0x600]) {
            for size in [0, 1, 2, 3, 4, 255] {
                pm.read(port, size);
                pm.write(port, size, 0xFFFF_FBFF, &mut events);
            }
        }
        // 0xFBFF has SLP_TYP = 6 and SLP_EN; with the 0xFF bytes around it no write ever puts
        // SLP_TYP = 5 next to SLP_EN: never a power-off.
        assert!(events.is_empty());
    }
}
