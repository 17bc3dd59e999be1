//! The VM's legacy interrupt controllers: the PC's two Intel 8259A PICs, master at 0x20/0x21 and
//! slave at 0xA0/0xA1, present so that a guest can find, initialize and mask them, and never
//! raising an interrupt: the VM's interrupts go through the I/O APIC ("present and masked").
//!
//! Spec: Intel "8259A Programmable Interrupt Controller (8259A/8259A-2)" datasheet, order number
//! 231468-003: "Programming the 8259A" with "Initialization Command Words (ICWs)" (ICW1..ICW4
//! formats in Figure 7), "Operation Command Words (OCWs)" (Figure 8) and "Reading the 8259A
//! Status". Section titles below refer to it.
//!
//! Why a model that does nothing: Linux probes the master by writing a value to its mask
//! register and reading it back (`probe_8259A`); without a chip that answers it falls back to a
//! "NULL legacy PIC", which works, but an initialized and fully masked 8259A pair is what it
//! expects on a PC and what keeps its boot quiet. The guest routes its interrupts through the
//! I/O APIC (the MADT says so), so no input line of these PICs is ever asserted.
//!
//! Model decisions:
//! - Each chip is its own [`PortDevice`] over its two ports (`Pic::master()` at 0x20..=0x21,
//!   `Pic::slave()` at 0xA0..=0xA1); they share nothing, since no interrupt ever cascades.
//! - The reset state is what a PC BIOS leaves: initialized, 8086 mode, vector bases 0x08 and
//!   0x70, cascade on IR2 / slave ID 2, and every input masked (mask register 0xFF).
//! - IRR and ISR stay 0: EOI and rotation commands (OCW2) are accepted and update the priority
//!   order, but nothing is ever in service; a poll (OCW3 P) reads "no interrupt" (0).
//! - The ELCR (0x4D0/0x4D1) is not modelled.
//! - Wider accesses are split into byte accesses at consecutive ports; bytes outside the chip's
//!   two ports read 0xFF and ignore writes.

use alloc::vec::Vec;
use core::any::Any;
use core::ops::RangeInclusive;

use crate::bus::{access_width, DeviceEvent, PortDevice};

// ICW1 bits (written with A0 = 0 and D4 = 1). See: 8259A datasheet, Figure 7 (ICW1).
const ICW1_SELECT: u8 = 1 << 4;
/// IC4: an ICW4 follows.
const ICW1_NEEDS_ICW4: u8 = 1 << 0;
/// SNGL: single chip, no ICW3.
const ICW1_SINGLE: u8 = 1 << 1;
/// LTIM: level-triggered inputs.
const ICW1_LEVEL_TRIGGERED: u8 = 1 << 3;

/// ICW2 bits 7:3 are the vector base in 8086 mode. See: 8259A datasheet, Figure 7 (ICW2).
const ICW2_VECTOR_BASE: u8 = 0xF8;

// ICW4 bits. See: 8259A datasheet, Figure 7 (ICW4).
/// µPM: 8086/8088 mode.
const ICW4_8086: u8 = 1 << 0;
/// AEOI: automatic end of interrupt.
const ICW4_AUTO_EOI: u8 = 1 << 1;
/// Bits 7:5 are 0.
const ICW4_DEFINED: u8 = 0x1F;

// OCW2 and OCW3 (A0 = 0, D4 = 0; D3 selects OCW3). See: 8259A datasheet, Figure 8.
const OCW_SELECT_OCW3: u8 = 1 << 3;
/// OCW2 bits 7:5: R, SL, EOI.
const OCW2_COMMAND_SHIFT: u32 = 5;
/// OCW2 bits 2:0: the level for specific commands.
const OCW2_LEVEL: u8 = 0x7;
const OCW3_READ_IS_REGISTER: u8 = 1 << 0;
/// RR: bit 0 selects the register read at A0 = 0.
const OCW3_READ_REGISTER: u8 = 1 << 1;
const OCW3_POLL: u8 = 1 << 2;
const OCW3_SPECIAL_MASK: u8 = 1 << 5;
/// ESMM: bit 5 sets or resets special mask mode.
const OCW3_ENABLE_SPECIAL_MASK: u8 = 1 << 6;

/// Where the chip is in the initialization sequence. See: 8259A datasheet, "Initialization
/// Command Words", Figure 6 (initialization sequence).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Initialization {
    /// Initialized: writes at A0 = 1 are OCW1.
    Ready,
    ExpectIcw2,
    ExpectIcw3,
    ExpectIcw4,
}

/// One 8259A. See the module documentation.
#[derive(Clone, Debug)]
pub struct Pic {
    base: u16,
    name: &'static str,
    initialization: Initialization,
    icw1: u8,
    vector_base: u8,
    /// ICW3: IR lines with a slave (master) or the slave ID (slave).
    cascade: u8,
    icw4: u8,
    /// IMR (OCW1).
    mask: u8,
    /// ISR: always 0 here, kept so EOIs have their datasheet meaning.
    in_service: u8,
    /// The IR level with the lowest priority (7 after ICW1; rotation moves it).
    lowest_priority: u8,
    /// OCW3 RIS: reads at A0 = 0 show ISR (true) or IRR (false).
    read_in_service: bool,
    /// OCW3 P: the next read at A0 = 0 is the poll word.
    poll: bool,
    special_mask: bool,
}

impl Pic {
    /// The master's command port.
    pub const MASTER_BASE: u16 = 0x20;
    /// The slave's command port.
    pub const SLAVE_BASE: u16 = 0xA0;

    /// The master PIC at 0x20..=0x21 as the BIOS left it: vectors 0x08..=0x0F, slave on IR2,
    /// everything masked.
    pub fn master() -> Self {
        Self::initialized(Self::MASTER_BASE, "i8259-master", 0x08, 1 << 2)
    }

    /// The slave PIC at 0xA0..=0xA1 as the BIOS left it: vectors 0x70..=0x77, slave ID 2,
    /// everything masked.
    pub fn slave() -> Self {
        Self::initialized(Self::SLAVE_BASE, "i8259-slave", 0x70, 2)
    }

    fn initialized(base: u16, name: &'static str, vector_base: u8, cascade: u8) -> Self {
        Self {
            base,
            name,
            initialization: Initialization::Ready,
            icw1: ICW1_SELECT | ICW1_NEEDS_ICW4,
            vector_base,
            cascade,
            icw4: ICW4_8086,
            mask: 0xFF,
            in_service: 0,
            lowest_priority: 7,
            read_in_service: false,
            poll: false,
            special_mask: false,
        }
    }

    /// The mask register (OCW1): bit n set masks IRn.
    pub fn mask(&self) -> u8 {
        self.mask
    }

    /// The vector of IR0 (ICW2 bits 7:3).
    pub fn vector_base(&self) -> u8 {
        self.vector_base
    }

    /// ICW3 as written: the IR lines with slaves (master) or the slave ID (slave).
    pub fn cascade(&self) -> u8 {
        self.cascade
    }

    /// Whether the last initialization sequence is complete (the chip accepts OCWs).
    pub fn is_initialized(&self) -> bool {
        self.initialization == Initialization::Ready
    }

    /// ICW4 AEOI.
    pub fn auto_eoi(&self) -> bool {
        self.icw4 & ICW4_AUTO_EOI != 0
    }

    /// ICW1 LTIM.
    pub fn level_triggered(&self) -> bool {
        self.icw1 & ICW1_LEVEL_TRIGGERED != 0
    }

    /// OCW3 special mask mode.
    pub fn special_mask_mode(&self) -> bool {
        self.special_mask
    }

    /// ICW1: starts the initialization sequence. See: 8259A datasheet, "Initialization Command
    /// Words" (effects a-f of writing ICW1).
    fn write_icw1(&mut self, byte: u8) {
        self.icw1 = byte;
        self.mask = 0;
        self.in_service = 0;
        self.lowest_priority = 7;
        self.read_in_service = false;
        self.poll = false;
        self.special_mask = false;
        if byte & ICW1_NEEDS_ICW4 == 0 {
            self.icw4 = 0;
        }
        self.initialization = Initialization::ExpectIcw2;
    }

    /// ICW2..ICW4 and OCW1: writes with A0 = 1.
    fn write_data(&mut self, byte: u8) {
        self.initialization = match self.initialization {
            Initialization::Ready => {
                // OCW1. See: 8259A datasheet, Figure 8 (OCW1).
                self.mask = byte;
                Initialization::Ready
            }
            Initialization::ExpectIcw2 => {
                self.vector_base = byte & ICW2_VECTOR_BASE;
                if self.icw1 & ICW1_SINGLE == 0 {
                    Initialization::ExpectIcw3
                } else {
                    self.after_icw3()
                }
            }
            Initialization::ExpectIcw3 => {
                self.cascade = byte;
                self.after_icw3()
            }
            Initialization::ExpectIcw4 => {
                self.icw4 = byte & ICW4_DEFINED;
                Initialization::Ready
            }
        };
    }

    fn after_icw3(&self) -> Initialization {
        if self.icw1 & ICW1_NEEDS_ICW4 != 0 {
            Initialization::ExpectIcw4
        } else {
            Initialization::Ready
        }
    }

    /// OCW2: EOI and priority commands. See: 8259A datasheet, Figure 8 (OCW2).
    fn write_ocw2(&mut self, byte: u8) {
        let level = byte & OCW2_LEVEL;
        match byte >> OCW2_COMMAND_SHIFT {
            // Non-specific EOI; rotate on non-specific EOI.
            0b001 | 0b101 => {
                if let Some(highest) = self.highest_in_service() {
                    self.in_service &= !(1 << highest);
                    if byte >> OCW2_COMMAND_SHIFT == 0b101 {
                        self.lowest_priority = highest;
                    }
                }
            }
            // Specific EOI; rotate on specific EOI.
            0b011 | 0b111 => {
                self.in_service &= !(1 << level);
                if byte >> OCW2_COMMAND_SHIFT == 0b111 {
                    self.lowest_priority = level;
                }
            }
            // Set priority: IR `level` becomes the lowest.
            0b110 => self.lowest_priority = level,
            // No operation; (set / clear) rotate in automatic EOI mode, which only matters
            // when interrupts are acknowledged.
            _ => {}
        }
    }

    /// OCW3: read register select, poll, special mask mode. See: 8259A datasheet, Figure 8
    /// (OCW3).
    fn write_ocw3(&mut self, byte: u8) {
        if byte & OCW3_READ_REGISTER != 0 {
            self.read_in_service = byte & OCW3_READ_IS_REGISTER != 0;
        }
        self.poll = byte & OCW3_POLL != 0;
        if byte & OCW3_ENABLE_SPECIAL_MASK != 0 {
            self.special_mask = byte & OCW3_SPECIAL_MASK != 0;
        }
    }

    /// The in-service level with the highest priority (the one after `lowest_priority`).
    fn highest_in_service(&self) -> Option<u8> {
        (1..=8u8)
            .map(|step| (self.lowest_priority + step) % 8)
            .find(|level| self.in_service & (1 << level) != 0)
    }

    /// One byte read at A0 = `offset`. See: 8259A datasheet, "Reading the 8259A Status".
    fn read_register(&mut self, offset: u16) -> u8 {
        match offset {
            0 if self.poll => {
                // Poll word: bit 7 = interrupt pending; never here.
                self.poll = false;
                0
            }
            0 if self.read_in_service => self.in_service,
            // IRR: no line is ever asserted.
            0 => 0,
            _ => self.mask,
        }
    }

    /// One byte written at A0 = `offset`.
    fn write_register(&mut self, offset: u16, byte: u8) {
        match offset {
            0 if byte & ICW1_SELECT != 0 => self.write_icw1(byte),
            0 if byte & OCW_SELECT_OCW3 != 0 => self.write_ocw3(byte),
            0 => self.write_ocw2(byte),
            _ => self.write_data(byte),
        }
    }

    /// A0 of byte `index` of an access at `port`, or `None` outside the chip's two ports.
    fn offset_of(&self, port: u16, index: u8) -> Option<u16> {
        let offset = (u32::from(port) + u32::from(index)).checked_sub(u32::from(self.base))?;
        u16::try_from(offset).ok().filter(|offset| *offset < 2)
    }
}

impl PortDevice for Pic {
    fn name(&self) -> &'static str {
        self.name
    }

    fn ports(&self) -> RangeInclusive<u16> {
        self.base..=self.base + 1
    }

    fn read(&mut self, port: u16, size: u8) -> u32 {
        let mut value = 0;
        for index in 0..access_width(size) {
            let byte = match self.offset_of(port, index) {
                Some(offset) => self.read_register(offset),
                None => 0xFF,
            };
            value |= u32::from(byte) << (8 * u32::from(index));
        }
        value
    }

    fn write(&mut self, port: u16, size: u8, value: u32, _events: &mut Vec<DeviceEvent>) {
        for (index, byte) in (0..access_width(size)).zip(value.to_le_bytes()) {
            if let Some(offset) = self.offset_of(port, index) {
                self.write_register(offset, byte);
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

    fn pics() -> PortBus {
        let mut bus = PortBus::new();
        bus.add(Box::new(Pic::master())).unwrap();
        bus.add(Box::new(Pic::slave())).unwrap();
        bus
    }

    fn out(bus: &mut PortBus, port: u16, value: u8) {
        let mut events = Vec::new();
        bus.write(port, 1, u32::from(value), &mut events);
        assert!(events.is_empty());
    }

    fn inb(bus: &mut PortBus, port: u16) -> u8 {
        bus.read(port, 1).value as u8
    }

    #[test]
    fn reset_state_is_present_and_masked() {
        let mut bus = pics();
        assert_eq!(inb(&mut bus, 0x21), 0xFF);
        assert_eq!(inb(&mut bus, 0xA1), 0xFF);
        assert_eq!(inb(&mut bus, 0x20), 0x00, "IRR");
        assert_eq!(bus.owner_name(0x20), Some("i8259-master"));
        assert_eq!(bus.owner_name(0xA1), Some("i8259-slave"));
        let master = bus.device_mut::<Pic>(0x20).unwrap();
        assert!(master.is_initialized());
        assert_eq!(master.vector_base(), 0x08);
        assert_eq!(bus.device_mut::<Pic>(0xA0).unwrap().vector_base(), 0x70);
    }

    #[test]
    fn linux_probe_and_init_sequence() {
        let mut bus = pics();
        // probe_8259A: mask the slave, write a probe value to the master's mask, read it back.
        out(&mut bus, 0xA1, 0xFF);
        out(&mut bus, 0x21, 0xFB);
        assert_eq!(inb(&mut bus, 0x21), 0xFB);

        // init_8259A: mask all, ICW1..ICW4 on both, then restore the masks.
        out(&mut bus, 0x21, 0xFF);
        out(&mut bus, 0xA1, 0xFF);
        out(&mut bus, 0x20, 0x11); // ICW1: edge, cascade, ICW4 needed
        assert!(!bus.device_mut::<Pic>(0x20).unwrap().is_initialized());
        assert_eq!(inb(&mut bus, 0x21), 0x00, "ICW1 clears the mask");
        out(&mut bus, 0x21, 0x30); // ICW2: vector base 0x30
        out(&mut bus, 0x21, 0x04); // ICW3: slave on IR2
        out(&mut bus, 0x21, 0x01); // ICW4: 8086 mode
        out(&mut bus, 0xA0, 0x11);
        out(&mut bus, 0xA1, 0x38);
        out(&mut bus, 0xA1, 0x02);
        out(&mut bus, 0xA1, 0x01);
        out(&mut bus, 0x21, 0xFF);
        out(&mut bus, 0xA1, 0xFF);
        assert_eq!(inb(&mut bus, 0x21), 0xFF);
        assert_eq!(inb(&mut bus, 0xA1), 0xFF);

        let master = bus.device_mut::<Pic>(0x20).unwrap();
        assert!(master.is_initialized());
        assert_eq!(master.vector_base(), 0x30);
        assert_eq!(master.cascade(), 0x04);
        assert!(!master.auto_eoi());
        assert!(!master.level_triggered());
        let slave = bus.device_mut::<Pic>(0xA0).unwrap();
        assert_eq!(slave.vector_base(), 0x38);
        assert_eq!(slave.cascade(), 0x02);
    }

    #[test]
    fn short_sequences_and_auto_eoi() {
        let mut bus = pics();
        // Single chip, no ICW4: ICW2 completes it; ICW4 functions are cleared.
        out(&mut bus, 0x20, 0x12 | 0x08);
        out(&mut bus, 0x21, 0x47);
        let master = bus.device_mut::<Pic>(0x20).unwrap();
        assert!(master.is_initialized());
        assert_eq!(master.vector_base(), 0x40, "low three bits ignored");
        assert!(master.level_triggered());
        out(&mut bus, 0x21, 0x5A);
        assert_eq!(inb(&mut bus, 0x21), 0x5A, "next data write is OCW1");
        // Single chip with ICW4 and automatic EOI.
        out(&mut bus, 0x20, 0x13);
        out(&mut bus, 0x21, 0x20);
        out(&mut bus, 0x21, 0x03);
        let master = bus.device_mut::<Pic>(0x20).unwrap();
        assert!(master.is_initialized());
        assert!(master.auto_eoi());
    }

    #[test]
    fn ocw2_and_ocw3() {
        let mut bus = pics();
        out(&mut bus, 0x20, 0x0B); // OCW3: read ISR
        assert_eq!(inb(&mut bus, 0x20), 0x00);
        out(&mut bus, 0x20, 0x0A); // OCW3: read IRR
        assert_eq!(inb(&mut bus, 0x20), 0x00);
        out(&mut bus, 0x20, 0x0C); // OCW3: poll
        assert_eq!(inb(&mut bus, 0x20), 0x00, "poll: no interrupt");
        out(&mut bus, 0x20, 0x68); // OCW3: set special mask mode
        assert!(bus.device_mut::<Pic>(0x20).unwrap().special_mask_mode());
        out(&mut bus, 0x20, 0x48); // OCW3: reset special mask mode
        assert!(!bus.device_mut::<Pic>(0x20).unwrap().special_mask_mode());
        // OCW2: EOIs and priority commands leave the registers alone.
        for command in [0x20, 0x60, 0x62, 0xA0, 0xE7, 0xC3, 0x80, 0x00, 0x40] {
            out(&mut bus, 0x20, command);
        }
        assert_eq!(inb(&mut bus, 0x21), 0xFF);
        let master = bus.device_mut::<Pic>(0x20).unwrap();
        assert!(master.is_initialized());
        assert_eq!(master.lowest_priority, 3, "set priority 0xC3");
        // EOI logic on a chip that has something in service.
        master.in_service = 0b1000_0101;
        master.lowest_priority = 1;
        master.write_ocw2(0x20); // non-specific: highest after IR1 is IR2
        assert_eq!(master.in_service, 0b1000_0001);
        master.write_ocw2(0xA0); // rotate on non-specific: IR7, becomes lowest
        assert_eq!(master.in_service, 0b0000_0001);
        assert_eq!(master.lowest_priority, 7);
        master.write_ocw2(0x60); // specific EOI IR0
        assert_eq!(master.in_service, 0);
    }

    #[test]
    fn wide_accesses_split_into_bytes() {
        let mut bus = pics();
        let mut events = Vec::new();
        // 16-bit OUT at 0x20: 0x0B to the command port, 0x12 to the mask.
        bus.write(0x20, 2, 0x120B, &mut events);
        assert_eq!(bus.read(0x20, 2).value, 0x1200);
        assert_eq!(bus.read(0x21, 4).value, 0xFFFF_FF12);
    }

    #[test]
    fn every_access_is_safe() {
        let mut pic = Pic::slave();
        let mut events = Vec::new();
        for byte in 0..=255u8 {
            for port in [0x9F, 0xA0, 0xA1, 0xA2, 0, u16::MAX] {
                for size in [0, 1, 2, 4, 255] {
                    pic.write(port, size, u32::from(byte) * 0x0101_0101, &mut events);
                    pic.read(port, size);
                }
            }
        }
        assert!(events.is_empty());
    }
}
