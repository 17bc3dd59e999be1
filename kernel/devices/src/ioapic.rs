//! The VM's I/O APIC: an Intel 82093AA-style interrupt router with 24 input pins at guest
//! physical 0xFEC0_0000, which turns device interrupt lines into messages for local APICs.
//!
//! Spec: Intel "82093AA I/O Advanced Programmable Interrupt Controller (IOAPIC)" datasheet,
//! order number 290566-001, May 1996. Section numbers below refer to it: 3.1 (IOREGSEL and
//! IOWIN), 3.2.1 (IOAPICID), 3.2.2 (IOAPICVER), 3.2.3 (IOAPICARB), 3.2.4 (IOREDTBL).
//!
//! This is an MMIO device, not a [`crate::PortDevice`]: the hypervisor core decodes a guest
//! access to the 4 KiB window and calls [`IoApic::read_mmio`] / [`IoApic::write_mmio`] with the
//! offset inside it. Device models call [`IoApic::raise`] / [`IoApic::lower`] for their lines,
//! and the local APIC model forwards EOIs of level-triggered vectors to
//! [`IoApic::end_of_interrupt`]. Every method that can cause an interrupt returns the
//! [`Delivery`] messages to hand to the local APIC(s); the I/O APIC never reaches a CPU itself.
//!
//! Model decisions:
//! - Delivery is instant: the Delivery Status bit (12) always reads 0 (idle).
//! - `raise` / `lower` take the logical state of the line (asserted / deasserted). The
//!   polarity bit (13) is stored and read back but not applied: the models that drive the lines
//!   report assertion directly, there is no electrical level to invert.
//! - An edge is a deasserted-to-asserted transition of the line; [`IoApic::pulse`] is the
//!   raise-then-lower pair for sources that only signal events.
//! - A level-triggered entry that is unmasked (or switched to level) while its line is asserted
//!   and Remote IRR is clear delivers at once, so [`IoApic::write_mmio`] can return a delivery.
//! - Writing an entry as edge-triggered clears its Remote IRR. The 82093AA has no EOI register
//!   (that came with version 0x20); Linux clears a stuck Remote IRR on these chips by switching
//!   the entry to edge and back to level, and this makes that work.
//! - Delivery modes: fixed and lowest priority are both delivered to the destination as given
//!   (the local APIC side treats lowest priority as fixed); SMI, NMI, INIT and ExtINT are passed
//!   on as such; the reserved encodings (011, 110) deliver nothing.
//! - Only 32-bit accesses at IOWIN write a register (3.1: IOWIN is a 32-bit register); narrower
//!   or misaligned IOWIN writes are ignored. Narrow reads return the addressed bytes. IOREGSEL
//!   takes any size; only its low byte matters. Other offsets of the window read 0 and ignore
//!   writes.
//! - Reading a register index that does not exist returns 0; writing one is ignored.

use alloc::vec::Vec;

use crate::bus::access_width;

// The two directly addressed registers. See: 82093AA 3.1, Table 1.
/// I/O Register Select: bits 7:0 select the register IOWIN reaches.
const OFFSET_REGISTER_SELECT: u64 = 0x00;
/// I/O Window: the 32-bit data of the selected register.
const OFFSET_WINDOW: u64 = 0x10;

// Indirect register indexes. See: 82093AA 3.2, Table 2.
const REGISTER_ID: u8 = 0x00;
const REGISTER_VERSION: u8 = 0x01;
const REGISTER_ARBITRATION: u8 = 0x02;
/// First index of the redirection table: entry `n` is at `0x10 + 2n` (low) and `0x11 + 2n`
/// (high). See: 82093AA 3.2.4.
const REGISTER_REDIRECTION_FIRST: u8 = 0x10;

/// IOAPICID bits 27:24 hold the ID; the rest are reserved. See: 82093AA 3.2.1.
const ID_SHIFT: u32 = 24;
const ID_MASK: u32 = 0x0F;

/// IOAPICVER: bits 23:16 maximum redirection entry (23 = 0x17), bits 7:0 version 0x11.
/// See: 82093AA 3.2.2.
const VERSION_VALUE: u32 = 0x0017_0011;

// Redirection table entry fields. See: 82093AA 3.2.4, Table 3 ("IOREDTBL").
const ENTRY_VECTOR: u64 = 0xFF;
const ENTRY_DELIVERY_MODE_SHIFT: u32 = 8;
const ENTRY_DELIVERY_MODE_MASK: u64 = 0x7;
const ENTRY_DESTINATION_MODE_LOGICAL: u64 = 1 << 11;
/// Delivery Status (read-only). Always 0 here: delivery is instant.
const ENTRY_DELIVERY_STATUS: u64 = 1 << 12;
const ENTRY_POLARITY_LOW: u64 = 1 << 13;
/// Remote IRR (read-only): set when a level-triggered interrupt is accepted, cleared by the EOI.
const ENTRY_REMOTE_IRR: u64 = 1 << 14;
const ENTRY_TRIGGER_LEVEL: u64 = 1 << 15;
const ENTRY_MASKED: u64 = 1 << 16;
const ENTRY_DESTINATION_SHIFT: u32 = 56;
/// The bits software can write: vector, delivery mode, destination mode, polarity, trigger
/// mode, mask (0-11, 13, 15, 16) and the destination (63:56). Bits 17-55 are reserved.
const ENTRY_WRITABLE: u64 = ENTRY_VECTOR
    | (ENTRY_DELIVERY_MODE_MASK << ENTRY_DELIVERY_MODE_SHIFT)
    | ENTRY_DESTINATION_MODE_LOGICAL
    | ENTRY_POLARITY_LOW
    | ENTRY_TRIGGER_LEVEL
    | ENTRY_MASKED
    | (0xFF << ENTRY_DESTINATION_SHIFT);
/// The reset value of every entry: masked, everything else 0. See: 82093AA 3.2.4 (mask bit).
const ENTRY_RESET: u64 = ENTRY_MASKED;

const _: () = assert!(ENTRY_WRITABLE == 0xFF00_0000_0001_AFFF);
const _: () = assert!(ENTRY_WRITABLE & (ENTRY_DELIVERY_STATUS | ENTRY_REMOTE_IRR) == 0);

/// How the local APIC should take an interrupt. See: 82093AA 3.2.4, delivery mode field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryMode {
    /// 000: deliver `vector` to the destination.
    Fixed,
    /// 001: lowest priority among the destinations; delivered to the destination as fixed.
    LowestPriority,
    /// 010: system management interrupt (vector ignored).
    Smi,
    /// 100: non-maskable interrupt (vector ignored).
    Nmi,
    /// 101: INIT (vector ignored).
    Init,
    /// 111: external interrupt, as from an 8259A (the vector comes from the PIC).
    ExtInt,
}

impl DeliveryMode {
    /// Decodes bits 10:8 of an entry; the reserved encodings give `None`.
    fn from_bits(bits: u64) -> Option<Self> {
        match bits & ENTRY_DELIVERY_MODE_MASK {
            0b000 => Some(Self::Fixed),
            0b001 => Some(Self::LowestPriority),
            0b010 => Some(Self::Smi),
            0b100 => Some(Self::Nmi),
            0b101 => Some(Self::Init),
            0b111 => Some(Self::ExtInt),
            _ => None,
        }
    }
}

/// How to read [`Delivery::destination`]. See: 82093AA 3.2.4, destination mode field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestinationMode {
    /// The destination is one APIC ID.
    Physical,
    /// The destination is a logical mask matched against each local APIC's LDR/DFR.
    Logical,
}

/// An interrupt message for the local APIC(s): what one redirection entry sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub vector: u8,
    /// Bits 63:56 of the entry: an APIC ID in physical mode, a mask in logical mode.
    pub destination: u8,
    pub destination_mode: DestinationMode,
    pub mode: DeliveryMode,
    /// True for a level-triggered entry: the local APIC sets the TMR bit and must forward the
    /// EOI of `vector` to [`IoApic::end_of_interrupt`].
    pub level_triggered: bool,
}

/// An 82093AA-style I/O APIC with 24 pins. See the module documentation.
#[derive(Clone, Debug)]
pub struct IoApic {
    /// IOAPICID bits 27:24. See: 82093AA 3.2.1.
    id: u8,
    /// IOAPICARB bits 27:24, loaded from the ID when the ID is written. See: 82093AA 3.2.3.
    arbitration_id: u8,
    /// IOREGSEL bits 7:0. See: 82093AA 3.1.
    register_select: u8,
    redirection: [u64; IoApic::PINS],
    /// Bit `pin` set while the line is asserted.
    line_asserted: u32,
}

impl IoApic {
    /// The guest physical base of the register window (the PC default).
    pub const BASE: u64 = 0xFEC0_0000;
    /// Size of the window the hypervisor routes to this device.
    pub const WINDOW_SIZE: u64 = 0x1000;
    /// Number of input pins and redirection entries.
    pub const PINS: usize = 24;

    /// An I/O APIC with APIC ID `id` (the low 4 bits are kept, as in IOAPICID) in its reset
    /// state: every redirection entry masked, every line deasserted.
    pub fn new(id: u8) -> Self {
        let id = id & ID_MASK as u8;
        Self {
            id,
            arbitration_id: id,
            register_select: 0,
            redirection: [ENTRY_RESET; Self::PINS],
            line_asserted: 0,
        }
    }

    /// The APIC ID the guest sees in IOAPICID (for the MADT, which must agree).
    pub fn id(&self) -> u8 {
        self.id
    }

    /// The whole redirection entry of `pin` (for logs and tests), or `None` past pin 23.
    pub fn redirection_entry(&self, pin: u8) -> Option<u64> {
        self.redirection.get(usize::from(pin)).copied()
    }

    /// A guest read of `size` bytes at `offset` inside the window. Never fails; see the module
    /// documentation for offsets and sizes that are not plain 32-bit register accesses.
    pub fn read_mmio(&mut self, offset: u64, size: u8) -> u32 {
        let register = match offset & !0x3 {
            OFFSET_REGISTER_SELECT => u32::from(self.register_select),
            OFFSET_WINDOW => self.read_register(self.register_select),
            _ => 0,
        };
        let shift = 8 * (offset & 0x3) as u32;
        let value = register >> shift;
        match access_width(size) {
            1 => value & 0xFF,
            2 => value & 0xFFFF,
            _ => value,
        }
    }

    /// A guest write of `size` bytes of `value` at `offset` inside the window. Returns the
    /// interrupt to deliver if the write unmasked (or made level-triggered) an entry whose line
    /// is asserted.
    pub fn write_mmio(&mut self, offset: u64, size: u8, value: u32) -> Option<Delivery> {
        match offset {
            // Only bits 7:0 are implemented. See: 82093AA 3.1 (IOREGSEL).
            OFFSET_REGISTER_SELECT => {
                self.register_select = value.to_le_bytes()[0];
                None
            }
            OFFSET_WINDOW if access_width(size) == 4 => {
                self.write_register(self.register_select, value)
            }
            _ => None,
        }
    }

    /// The line of `pin` is asserted. Returns the interrupt to deliver: for an edge-triggered
    /// entry on the deasserted-to-asserted transition, for a level-triggered one whenever
    /// Remote IRR is clear. Masked entries deliver nothing and, for edges, remember nothing
    /// (82093AA 3.2.4, mask bit). Pins past 23 are ignored.
    pub fn raise(&mut self, pin: u8) -> Option<Delivery> {
        let bit = Self::pin_bit(pin)?;
        let was_asserted = self.line_asserted & bit != 0;
        self.line_asserted |= bit;
        let entry = self.redirection[usize::from(pin)];
        if entry & ENTRY_TRIGGER_LEVEL != 0 {
            self.deliver_level(pin)
        } else if !was_asserted && entry & ENTRY_MASKED == 0 {
            Self::delivery(entry)
        } else {
            None
        }
    }

    /// The line of `pin` is deasserted. A level-triggered entry keeps Remote IRR until the EOI
    /// (82093AA 3.2.4, Remote IRR bit). Pins past 23 are ignored.
    pub fn lower(&mut self, pin: u8) {
        if let Some(bit) = Self::pin_bit(pin) {
            self.line_asserted &= !bit;
        }
    }

    /// An edge on `pin`: [`Self::raise`] then [`Self::lower`], for event-like sources.
    pub fn pulse(&mut self, pin: u8) -> Option<Delivery> {
        let delivery = self.raise(pin);
        self.lower(pin);
        delivery
    }

    /// A local APIC accepted the EOI of a level-triggered `vector`: clears Remote IRR of every
    /// level-triggered entry with that vector and re-delivers those whose line is still
    /// asserted. See: 82093AA 3.2.4 (Remote IRR: "reset when an EOI message is received").
    pub fn end_of_interrupt(&mut self, vector: u8) -> Vec<Delivery> {
        let mut deliveries = Vec::new();
        for pin in 0..Self::PINS as u8 {
            let entry = &mut self.redirection[usize::from(pin)];
            if *entry & ENTRY_TRIGGER_LEVEL == 0
                || *entry & ENTRY_REMOTE_IRR == 0
                || (*entry & ENTRY_VECTOR) as u8 != vector
            {
                continue;
            }
            *entry &= !ENTRY_REMOTE_IRR;
            if let Some(delivery) = self.deliver_level(pin) {
                deliveries.push(delivery);
            }
        }
        deliveries
    }

    /// Bit of `pin` in `line_asserted`, or `None` past the last pin.
    fn pin_bit(pin: u8) -> Option<u32> {
        (usize::from(pin) < Self::PINS).then(|| 1u32 << pin)
    }

    /// The message of `entry`, or `None` for a reserved delivery mode.
    fn delivery(entry: u64) -> Option<Delivery> {
        let mode = DeliveryMode::from_bits(entry >> ENTRY_DELIVERY_MODE_SHIFT)?;
        Some(Delivery {
            vector: (entry & ENTRY_VECTOR) as u8,
            destination: (entry >> ENTRY_DESTINATION_SHIFT) as u8,
            destination_mode: if entry & ENTRY_DESTINATION_MODE_LOGICAL != 0 {
                DestinationMode::Logical
            } else {
                DestinationMode::Physical
            },
            mode,
            level_triggered: entry & ENTRY_TRIGGER_LEVEL != 0,
        })
    }

    /// Delivers level-triggered `pin` if its line is asserted, it is unmasked and Remote IRR
    /// is clear; sets Remote IRR when it does. See: 82093AA 3.2.4 (Remote IRR).
    fn deliver_level(&mut self, pin: u8) -> Option<Delivery> {
        let bit = Self::pin_bit(pin)?;
        let entry = self.redirection.get_mut(usize::from(pin))?;
        if self.line_asserted & bit == 0
            || *entry & (ENTRY_TRIGGER_LEVEL | ENTRY_MASKED | ENTRY_REMOTE_IRR)
                != ENTRY_TRIGGER_LEVEL
        {
            return None;
        }
        let delivery = Self::delivery(*entry)?;
        *entry |= ENTRY_REMOTE_IRR;
        Some(delivery)
    }

    /// IOWIN read of register `index`. See: 82093AA 3.2, Table 2.
    fn read_register(&self, index: u8) -> u32 {
        match index {
            REGISTER_ID => u32::from(self.id) << ID_SHIFT,
            REGISTER_VERSION => VERSION_VALUE,
            REGISTER_ARBITRATION => u32::from(self.arbitration_id) << ID_SHIFT,
            _ => match Self::redirection_slot(index) {
                Some((pin, high)) => {
                    let entry = self.redirection[pin];
                    if high {
                        (entry >> 32) as u32
                    } else {
                        entry as u32
                    }
                }
                None => 0,
            },
        }
    }

    /// IOWIN write of register `index`; returns a delivery the write made due.
    fn write_register(&mut self, index: u8, value: u32) -> Option<Delivery> {
        match index {
            // See: 82093AA 3.2.1; 3.2.3 (the arbitration ID is loaded when the ID is written).
            REGISTER_ID => {
                self.id = ((value >> ID_SHIFT) & ID_MASK) as u8;
                self.arbitration_id = self.id;
                None
            }
            // Version and arbitration are read-only. See: 82093AA 3.2.2, 3.2.3.
            REGISTER_VERSION | REGISTER_ARBITRATION => None,
            _ => {
                let (pin, high) = Self::redirection_slot(index)?;
                let old = self.redirection[pin];
                let written = if high {
                    (old & 0x0000_0000_FFFF_FFFF) | (u64::from(value) << 32)
                } else {
                    (old & 0xFFFF_FFFF_0000_0000) | u64::from(value)
                };
                let mut entry = (written & ENTRY_WRITABLE) | (old & ENTRY_REMOTE_IRR);
                if entry & ENTRY_TRIGGER_LEVEL == 0 {
                    // Edge-triggered entries have no Remote IRR (see the module documentation).
                    entry &= !ENTRY_REMOTE_IRR;
                }
                self.redirection[pin] = entry;
                // `pin` < 24, so the cast is exact.
                self.deliver_level(pin as u8)
            }
        }
    }

    /// The pin and half (true = high dword) of redirection register `index`, if it is one.
    fn redirection_slot(index: u8) -> Option<(usize, bool)> {
        let relative = usize::from(index.checked_sub(REGISTER_REDIRECTION_FIRST)?);
        let pin = relative / 2;
        (pin < Self::PINS).then_some((pin, relative % 2 == 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_register(ioapic: &mut IoApic, index: u8, value: u32) -> Option<Delivery> {
        ioapic.write_mmio(OFFSET_REGISTER_SELECT, 4, u32::from(index));
        ioapic.write_mmio(OFFSET_WINDOW, 4, value)
    }

    fn read_register(ioapic: &mut IoApic, index: u8) -> u32 {
        ioapic.write_mmio(OFFSET_REGISTER_SELECT, 4, u32::from(index));
        ioapic.read_mmio(OFFSET_WINDOW, 4)
    }

    /// Programs `pin`: low dword `low` (vector, flags), destination `destination`.
    fn program(ioapic: &mut IoApic, pin: u8, low: u32, destination: u8) -> Option<Delivery> {
        let index = REGISTER_REDIRECTION_FIRST + 2 * pin;
        write_register(ioapic, index + 1, u32::from(destination) << 24);
        write_register(ioapic, index, low)
    }

    const LEVEL: u32 = 1 << 15;
    const MASK: u32 = 1 << 16;

    #[test]
    fn id_version_arbitration_registers() {
        let mut ioapic = IoApic::new(2);
        assert_eq!(read_register(&mut ioapic, REGISTER_ID), 2 << 24);
        assert_eq!(read_register(&mut ioapic, REGISTER_VERSION), 0x0017_0011);
        assert_eq!(read_register(&mut ioapic, REGISTER_ARBITRATION), 2 << 24);
        write_register(&mut ioapic, REGISTER_ID, 0xFFFF_FFFF);
        assert_eq!(read_register(&mut ioapic, REGISTER_ID), 0x0F << 24);
        assert_eq!(read_register(&mut ioapic, REGISTER_ARBITRATION), 0x0F << 24);
        assert_eq!(ioapic.id(), 0x0F);
        write_register(&mut ioapic, REGISTER_VERSION, 0);
        assert_eq!(read_register(&mut ioapic, REGISTER_VERSION), 0x0017_0011);
        // IOREGSEL reads back; only the low byte is kept.
        ioapic.write_mmio(OFFSET_REGISTER_SELECT, 4, 0x1234_5601);
        assert_eq!(ioapic.read_mmio(OFFSET_REGISTER_SELECT, 4), 0x01);
        // Narrow read of the version's high half.
        assert_eq!(ioapic.read_mmio(OFFSET_WINDOW + 2, 2), 0x0017);
        assert_eq!(ioapic.read_mmio(OFFSET_WINDOW, 1), 0x11);
    }

    #[test]
    fn reset_masks_everything_and_table_reads_back() {
        let mut ioapic = IoApic::new(0);
        for pin in 0..24u8 {
            let index = REGISTER_REDIRECTION_FIRST + 2 * pin;
            assert_eq!(read_register(&mut ioapic, index), 1 << 16, "pin {pin}");
            assert_eq!(read_register(&mut ioapic, index + 1), 0);
            assert_eq!(ioapic.raise(pin), None);
        }
        // Read-only and reserved bits are not stored.
        write_register(&mut ioapic, 0x10, 0xFFFF_FFFF);
        assert_eq!(read_register(&mut ioapic, 0x10), 0x0001_AFFF);
        write_register(&mut ioapic, 0x11, 0xFFFF_FFFF);
        assert_eq!(read_register(&mut ioapic, 0x11), 0xFF00_0000);
        // Last entry at 0x3E/0x3F; 0x40 is not a register.
        write_register(&mut ioapic, 0x3F, 0x0300_0000);
        assert_eq!(ioapic.redirection_entry(23), Some(0x0300_0000_0001_0000));
        write_register(&mut ioapic, 0x40, 0xFFFF_FFFF);
        assert_eq!(read_register(&mut ioapic, 0x40), 0);
        assert_eq!(ioapic.redirection_entry(24), None);
    }

    #[test]
    fn edge_triggered_delivers_on_rising_edge_only() {
        let mut ioapic = IoApic::new(0);
        assert_eq!(program(&mut ioapic, 4, 0x31, 1), None);
        let expected = Delivery {
            vector: 0x31,
            destination: 1,
            destination_mode: DestinationMode::Physical,
            mode: DeliveryMode::Fixed,
            level_triggered: false,
        };
        assert_eq!(ioapic.raise(4), Some(expected));
        assert_eq!(ioapic.raise(4), None, "no edge while asserted");
        ioapic.lower(4);
        assert_eq!(ioapic.raise(4), Some(expected));
        ioapic.lower(4);
        assert_eq!(ioapic.pulse(4), Some(expected));
        assert_eq!(ioapic.pulse(4), Some(expected));
        // Masked edges are lost, not held.
        program(&mut ioapic, 4, 0x31 | MASK, 1);
        assert_eq!(ioapic.pulse(4), None);
        assert_eq!(program(&mut ioapic, 4, 0x31, 1), None);
        // Remote IRR never set for edge.
        assert_eq!(ioapic.redirection_entry(4).unwrap() & ENTRY_REMOTE_IRR, 0);
    }

    #[test]
    fn level_triggered_remote_irr_and_eoi() {
        let mut ioapic = IoApic::new(0);
        program(&mut ioapic, 10, 0x41 | LEVEL | (1 << 13), 0);
        let delivery = ioapic.raise(10).unwrap();
        assert!(delivery.level_triggered);
        assert_eq!(delivery.vector, 0x41);
        let remote_irr = |ioapic: &IoApic| ioapic.redirection_entry(10).unwrap() & ENTRY_REMOTE_IRR;
        assert_ne!(remote_irr(&ioapic), 0);
        assert_eq!(read_register(&mut ioapic, 0x10 + 20) & (1 << 14), 1 << 14);
        // While Remote IRR is set nothing more is sent.
        assert_eq!(ioapic.raise(10), None);
        // EOI with the line still high: delivered again.
        assert_eq!(ioapic.end_of_interrupt(0x41), [delivery]);
        // EOI of another vector changes nothing.
        assert!(ioapic.end_of_interrupt(0x42).is_empty());
        assert_ne!(remote_irr(&ioapic), 0);
        // Line lowered, then EOI: Remote IRR clears, nothing re-sent.
        ioapic.lower(10);
        assert!(ioapic.end_of_interrupt(0x41).is_empty());
        assert_eq!(remote_irr(&ioapic), 0);
        assert_eq!(ioapic.raise(10), Some(delivery));
    }

    #[test]
    fn level_unmask_with_line_high_delivers() {
        let mut ioapic = IoApic::new(0);
        program(&mut ioapic, 9, 0x29 | LEVEL | MASK, 3);
        assert_eq!(ioapic.raise(9), None, "masked");
        assert_eq!(ioapic.redirection_entry(9).unwrap() & ENTRY_REMOTE_IRR, 0);
        let delivery = program(&mut ioapic, 9, 0x29 | LEVEL, 3).unwrap();
        assert_eq!(delivery.destination, 3);
        // Linux's Remote IRR clearing trick: switch to edge and back.
        program(&mut ioapic, 9, 0x29 | MASK, 3);
        assert_eq!(ioapic.redirection_entry(9).unwrap() & ENTRY_REMOTE_IRR, 0);
        ioapic.lower(9);
        assert_eq!(program(&mut ioapic, 9, 0x29 | LEVEL, 3), None);
    }

    #[test]
    fn delivery_modes_and_logical_destination() {
        let mut ioapic = IoApic::new(0);
        program(&mut ioapic, 1, 0x30 | (1 << 8) | (1 << 11), 0x0F);
        let delivery = ioapic.pulse(1).unwrap();
        assert_eq!(delivery.mode, DeliveryMode::LowestPriority);
        assert_eq!(delivery.destination_mode, DestinationMode::Logical);
        assert_eq!(delivery.destination, 0x0F);
        program(&mut ioapic, 2, 0x30 | (0b100 << 8), 0);
        assert_eq!(ioapic.pulse(2).unwrap().mode, DeliveryMode::Nmi);
        program(&mut ioapic, 3, 0x30 | (0b111 << 8), 0);
        assert_eq!(ioapic.pulse(3).unwrap().mode, DeliveryMode::ExtInt);
        // Reserved encodings deliver nothing.
        program(&mut ioapic, 5, 0x30 | (0b011 << 8), 0);
        assert_eq!(ioapic.pulse(5), None);
        program(&mut ioapic, 6, 0x30 | (0b110 << 8) | LEVEL, 0);
        assert_eq!(ioapic.raise(6), None);
    }

    #[test]
    fn hostile_accesses_do_not_panic() {
        let mut ioapic = IoApic::new(0xFF);
        assert_eq!(ioapic.id(), 0x0F);
        for offset in (0..0x1010u64).chain([u64::MAX, u64::MAX - 3]) {
            for size in [0, 1, 2, 3, 4, 8, 255] {
                ioapic.read_mmio(offset, size);
                ioapic.write_mmio(offset, size, 0xFFFF_FFFF);
            }
        }
        for index in 0..=255u8 {
            write_register(&mut ioapic, index, 0);
            read_register(&mut ioapic, index);
        }
        for pin in 0..=255u8 {
            ioapic.raise(pin);
            ioapic.lower(pin);
            ioapic.pulse(pin);
        }
        for vector in 0..=255u8 {
            ioapic.end_of_interrupt(vector);
        }
        // Narrow IOWIN writes are ignored.
        let mut ioapic = IoApic::new(0);
        ioapic.write_mmio(OFFSET_REGISTER_SELECT, 1, 0x10);
        ioapic.write_mmio(OFFSET_WINDOW, 2, 0x0020);
        assert_eq!(ioapic.redirection_entry(0), Some(ENTRY_RESET));
    }
}
