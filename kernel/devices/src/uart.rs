//! The guest's serial port: a 16550A UART model (the PC's COM1 at 0x3F8..=0x3FF), enough for
//! Linux's 8250 driver (autoconfig, polled console) and for simple guests.
//!
//! Spec: National Semiconductor / Texas Instruments "PC16550D Universal Asynchronous
//! Receiver/Transmitter with FIFOs" datasheet (SNLS378), section 8 "Registers" and its register
//! summary table. Section numbers below refer to that datasheet.
//!
//! Model decisions (the datasheet describes a chip with a serial line; here there is none):
//! - Transmission is instant: a byte written to THR is handed to the hypervisor at once as
//!   [`DeviceEvent::ConsoleByte`], so LSR THRE and TEMT are always set.
//! - The receiver is fed by [`Uart16550::push_input`] through one bounded queue of
//!   [`Uart16550::INPUT_CAPACITY`] bytes that stands in for RBR and the receive FIFO in both FIFO
//!   and non-FIFO mode. Bytes beyond the bound are dropped, counted, and reported to the guest
//!   as an overrun (LSR OE), as a real receiver would.
//! - Received data is reported to the interrupt logic as soon as one byte is queued, whatever
//!   the FIFO trigger level (no character-timeout interrupt); the modem status lines never
//!   change on their own, so MSR delta bits stay 0 and no modem status interrupt is raised.
//! - The chip's registers are 8 bits wide. A 2- or 4-byte access is split into byte accesses
//!   at consecutive offsets (as QEMU does for its serial port): a 16-bit IN at DLL with DLAB=1
//!   reads the whole divisor. Bytes falling past offset 7 read as 0xFF and ignore writes.
//! - In loopback mode bytes written to THR go to the receive queue only (not the console), and
//!   [`Uart16550::push_input`] still queues input (the real chip would disconnect SIN; losing
//!   host keystrokes during a driver's loopback probe would help no one).
//! - Reading RBR with nothing queued returns the last byte received (the chip keeps RBR).

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::any::Any;
use core::ops::RangeInclusive;

use crate::bus::{access_width, DeviceEvent, PortDevice};

// Register offsets from the base port. See: PC16550D datasheet, register summary table.
/// RBR (read) / THR (write) with DLAB=0; DLL (divisor latch low) with DLAB=1.
const OFFSET_DATA: u16 = 0;
/// IER with DLAB=0; DLM (divisor latch high) with DLAB=1.
const OFFSET_INTERRUPT_ENABLE: u16 = 1;
/// IIR (read) / FCR (write).
const OFFSET_INTERRUPT_ID_FIFO_CONTROL: u16 = 2;
const OFFSET_LINE_CONTROL: u16 = 3;
const OFFSET_MODEM_CONTROL: u16 = 4;
const OFFSET_LINE_STATUS: u16 = 5;
const OFFSET_MODEM_STATUS: u16 = 6;
const OFFSET_SCRATCH: u16 = 7;
/// Number of ports the UART decodes.
const PORT_COUNT: u16 = 8;

// Interrupt Enable Register bits. See: PC16550D datasheet 8.7.
const IER_RECEIVED_DATA: u8 = 1 << 0;
const IER_TRANSMITTER_EMPTY: u8 = 1 << 1;
const IER_RECEIVER_LINE_STATUS: u8 = 1 << 2;
/// Bits 4-7 are always 0. See: PC16550D datasheet 8.7.
const IER_WRITABLE: u8 = 0x0F;

// Interrupt Identification Register values (bits 0-3). See: PC16550D datasheet 8.6, Interrupt Control Functions table.
const IIR_NO_INTERRUPT: u8 = 0x01;
const IIR_RECEIVER_LINE_STATUS: u8 = 0x06;
const IIR_RECEIVED_DATA: u8 = 0x04;
const IIR_TRANSMITTER_EMPTY: u8 = 0x02;
/// Bits 6-7 are set when FCR bit 0 enabled the FIFOs. See: PC16550D datasheet 8.6.
const IIR_FIFOS_ENABLED: u8 = 0xC0;

// FIFO Control Register bits. See: PC16550D datasheet 8.5.
const FCR_FIFO_ENABLE: u8 = 1 << 0;
const FCR_CLEAR_RECEIVE_FIFO: u8 = 1 << 1;
/// The bits that stay programmed: FIFO enable, DMA mode select (3), trigger level (6-7).
/// Bits 1-2 are self-clearing. See: PC16550D datasheet 8.5.
const FCR_STORED: u8 = 0xC9;

// Line Control Register bits. See: PC16550D datasheet 8.1.
/// Divisor Latch Access Bit: offsets 0 and 1 reach DLL/DLM instead of RBR/THR/IER.
const LCR_DIVISOR_LATCH_ACCESS: u8 = 1 << 7;

// Modem Control Register bits. See: PC16550D datasheet 8.8.
const MCR_DATA_TERMINAL_READY: u8 = 1 << 0;
const MCR_REQUEST_TO_SEND: u8 = 1 << 1;
const MCR_OUT1: u8 = 1 << 2;
const MCR_OUT2: u8 = 1 << 3;
const MCR_LOOPBACK: u8 = 1 << 4;
/// Bits 5-7 are always 0. See: PC16550D datasheet 8.8.
const MCR_WRITABLE: u8 = 0x1F;

// Line Status Register bits. See: PC16550D datasheet 8.4.
const LSR_DATA_READY: u8 = 1 << 0;
const LSR_OVERRUN_ERROR: u8 = 1 << 1;
const LSR_TRANSMITTER_HOLDING_EMPTY: u8 = 1 << 5;
const LSR_TRANSMITTER_EMPTY: u8 = 1 << 6;

// Modem Status Register bits. See: PC16550D datasheet 8.9.
const MSR_CLEAR_TO_SEND: u8 = 1 << 4;
const MSR_DATA_SET_READY: u8 = 1 << 5;
const MSR_RING_INDICATOR: u8 = 1 << 6;
const MSR_DATA_CARRIER_DETECT: u8 = 1 << 7;

/// A 16550A UART. See the module documentation for what is modelled and how.
#[derive(Clone, Debug)]
pub struct Uart16550 {
    base: u16,
    /// Received bytes not yet read by the guest (RBR + receive FIFO).
    receive_queue: VecDeque<u8>,
    /// The byte RBR shows when the queue is empty.
    last_received: u8,
    input_bytes_dropped: u64,
    /// DLL (low byte) and DLM (high byte). See: PC16550D datasheet 8.3.
    divisor: u16,
    interrupt_enable: u8,
    fifo_control: u8,
    line_control: u8,
    modem_control: u8,
    scratch: u8,
    /// THRE interrupt condition: set when THR becomes empty (after each write, and when the
    /// interrupt is enabled while THR is empty), cleared by reading IIR while it is the
    /// reported source. See: PC16550D datasheet 8.6, Interrupt Control Functions table ("Interrupt Reset Control").
    transmitter_interrupt_pending: bool,
    /// LSR OE: a byte was dropped because the receive queue was full; cleared by reading LSR.
    overrun: bool,
}

impl Uart16550 {
    /// The base port of the PC's first serial port.
    pub const COM1: u16 = 0x3F8;
    /// Bytes [`Uart16550::push_input`] queues before it drops input.
    pub const INPUT_CAPACITY: usize = 4096;

    /// A UART at `base..=base + 7`, in its reset state (datasheet: UART Reset Configuration table):
    /// interrupts disabled, FIFOs off, loopback off, nothing received. `base` must leave room
    /// for the 8 ports; a larger base is clamped to 0xFFF8 so the range stays valid.
    pub fn new(base: u16) -> Self {
        Self {
            base: base.min(u16::MAX - (PORT_COUNT - 1)),
            receive_queue: VecDeque::new(),
            last_received: 0,
            input_bytes_dropped: 0,
            divisor: 0,
            interrupt_enable: 0,
            fifo_control: 0,
            line_control: 0,
            modem_control: 0,
            scratch: 0,
            transmitter_interrupt_pending: false,
            overrun: false,
        }
    }

    /// Queues input for the guest to read (keyboard from the hypervisor's console, later).
    /// Beyond [`Self::INPUT_CAPACITY`] queued bytes the byte is dropped, counted in
    /// [`Self::input_bytes_dropped`] and shown to the guest as an overrun (LSR bit 1).
    pub fn push_input(&mut self, byte: u8) {
        self.receive(byte);
    }

    /// Whether the UART would raise its interrupt output now (IER bits against the pending
    /// conditions; the same answer as IIR bit 0 being clear). On a PC the line reaches the
    /// interrupt controller only while MCR OUT2 is set; see [`Self::out2`].
    pub fn interrupt_pending(&self) -> bool {
        self.interrupt_identification() != IIR_NO_INTERRUPT
    }

    /// MCR OUT2, which on PC hardware gates the UART's interrupt onto its IRQ line.
    pub fn out2(&self) -> bool {
        self.modem_control & MCR_OUT2 != 0
    }

    /// The first port of the UART.
    pub fn base(&self) -> u16 {
        self.base
    }

    /// The baud-rate divisor the guest programmed (DLM:DLL).
    pub fn divisor(&self) -> u16 {
        self.divisor
    }

    /// Input bytes dropped because the receive queue was full.
    pub fn input_bytes_dropped(&self) -> u64 {
        self.input_bytes_dropped
    }

    /// Received bytes the guest has not read yet.
    pub fn input_queued(&self) -> usize {
        self.receive_queue.len()
    }

    fn divisor_latch_access(&self) -> bool {
        self.line_control & LCR_DIVISOR_LATCH_ACCESS != 0
    }

    fn loopback(&self) -> bool {
        self.modem_control & MCR_LOOPBACK != 0
    }

    fn receive(&mut self, byte: u8) {
        if self.receive_queue.len() >= Self::INPUT_CAPACITY {
            self.input_bytes_dropped = self.input_bytes_dropped.saturating_add(1);
            self.overrun = true;
            return;
        }
        self.receive_queue.push_back(byte);
    }

    /// IIR bits 0-3: the highest-priority pending interrupt. See: PC16550D datasheet 8.6,
    /// Interrupt Control Functions table (priority: line status, received data, transmitter empty, modem status).
    fn interrupt_identification(&self) -> u8 {
        let enabled = self.interrupt_enable;
        if enabled & IER_RECEIVER_LINE_STATUS != 0 && self.overrun {
            IIR_RECEIVER_LINE_STATUS
        } else if enabled & IER_RECEIVED_DATA != 0 && !self.receive_queue.is_empty() {
            IIR_RECEIVED_DATA
        } else if enabled & IER_TRANSMITTER_EMPTY != 0 && self.transmitter_interrupt_pending {
            IIR_TRANSMITTER_EMPTY
        } else {
            IIR_NO_INTERRUPT
        }
    }

    /// LSR without side effects. See: PC16550D datasheet 8.4.
    fn line_status(&self) -> u8 {
        let mut status = LSR_TRANSMITTER_HOLDING_EMPTY | LSR_TRANSMITTER_EMPTY;
        if !self.receive_queue.is_empty() {
            status |= LSR_DATA_READY;
        }
        if self.overrun {
            status |= LSR_OVERRUN_ERROR;
        }
        status
    }

    /// MSR. In loopback the inputs are wired to the MCR outputs: CTS=RTS, DSR=DTR, RI=OUT1,
    /// DCD=OUT2; otherwise a connected, ready terminal (DCD|DSR|CTS). See: PC16550D datasheet
    /// 8.8 (loop bit) and 8.9.
    fn modem_status(&self) -> u8 {
        if !self.loopback() {
            return MSR_DATA_CARRIER_DETECT | MSR_DATA_SET_READY | MSR_CLEAR_TO_SEND;
        }
        let control = self.modem_control;
        let mut status = 0;
        if control & MCR_REQUEST_TO_SEND != 0 {
            status |= MSR_CLEAR_TO_SEND;
        }
        if control & MCR_DATA_TERMINAL_READY != 0 {
            status |= MSR_DATA_SET_READY;
        }
        if control & MCR_OUT1 != 0 {
            status |= MSR_RING_INDICATOR;
        }
        if control & MCR_OUT2 != 0 {
            status |= MSR_DATA_CARRIER_DETECT;
        }
        status
    }

    /// A one-byte guest read of register `offset` (0..=7), with the chip's read side effects.
    fn read_register(&mut self, offset: u16) -> u8 {
        match offset {
            OFFSET_DATA if self.divisor_latch_access() => self.divisor.to_le_bytes()[0],
            OFFSET_DATA => {
                // See: PC16550D datasheet 8.4 (DR is cleared by reading all data in RBR/FIFO).
                if let Some(byte) = self.receive_queue.pop_front() {
                    self.last_received = byte;
                }
                self.last_received
            }
            OFFSET_INTERRUPT_ENABLE if self.divisor_latch_access() => self.divisor.to_le_bytes()[1],
            OFFSET_INTERRUPT_ENABLE => self.interrupt_enable,
            OFFSET_INTERRUPT_ID_FIFO_CONTROL => {
                let identification = self.interrupt_identification();
                // Reading IIR while it reports THRE clears that condition. See: PC16550D
                // datasheet 8.6, Interrupt Control Functions table.
                if identification == IIR_TRANSMITTER_EMPTY {
                    self.transmitter_interrupt_pending = false;
                }
                if self.fifo_control & FCR_FIFO_ENABLE != 0 {
                    identification | IIR_FIFOS_ENABLED
                } else {
                    identification
                }
            }
            OFFSET_LINE_CONTROL => self.line_control,
            OFFSET_MODEM_CONTROL => self.modem_control,
            OFFSET_LINE_STATUS => {
                let status = self.line_status();
                // OE is cleared by reading LSR. See: PC16550D datasheet 8.4.
                self.overrun = false;
                status
            }
            OFFSET_MODEM_STATUS => self.modem_status(),
            OFFSET_SCRATCH => self.scratch,
            _ => 0xFF,
        }
    }

    /// A one-byte guest write of `byte` to register `offset` (0..=7).
    fn write_register(&mut self, offset: u16, byte: u8, events: &mut Vec<DeviceEvent>) {
        match offset {
            OFFSET_DATA if self.divisor_latch_access() => {
                self.divisor = u16::from_le_bytes([byte, self.divisor.to_le_bytes()[1]]);
            }
            OFFSET_DATA => {
                // Transmission is instant; in loopback the transmitter output feeds the
                // receiver and nothing leaves the chip. See: PC16550D datasheet 8.8 (bit 4).
                if self.loopback() {
                    self.receive(byte);
                } else {
                    events.push(DeviceEvent::ConsoleByte(byte));
                }
                self.transmitter_interrupt_pending = true;
            }
            OFFSET_INTERRUPT_ENABLE if self.divisor_latch_access() => {
                self.divisor = u16::from_le_bytes([self.divisor.to_le_bytes()[0], byte]);
            }
            OFFSET_INTERRUPT_ENABLE => {
                let newly_enabled = byte & !self.interrupt_enable;
                self.interrupt_enable = byte & IER_WRITABLE;
                // Enabling the THRE interrupt while THR is empty (always, here) raises it, as
                // Linux's 8250 driver expects when it probes for the THRE bug.
                if newly_enabled & IER_TRANSMITTER_EMPTY != 0 {
                    self.transmitter_interrupt_pending = true;
                }
            }
            OFFSET_INTERRUPT_ID_FIFO_CONTROL => {
                // See: PC16550D datasheet 8.5. Changing FCR0 resets the FIFOs; the other bits
                // are programmed only while FCR0 is written as 1.
                let enable = byte & FCR_FIFO_ENABLE;
                if enable != self.fifo_control & FCR_FIFO_ENABLE {
                    self.receive_queue.clear();
                }
                if enable != 0 {
                    if byte & FCR_CLEAR_RECEIVE_FIFO != 0 {
                        self.receive_queue.clear();
                    }
                    self.fifo_control = byte & FCR_STORED;
                } else {
                    self.fifo_control = 0;
                }
            }
            OFFSET_LINE_CONTROL => self.line_control = byte,
            OFFSET_MODEM_CONTROL => self.modem_control = byte & MCR_WRITABLE,
            // LSR and MSR writes are for factory test only and are ignored here.
            // See: PC16550D datasheet 8.4 and 8.9.
            OFFSET_LINE_STATUS | OFFSET_MODEM_STATUS => {}
            OFFSET_SCRATCH => self.scratch = byte,
            _ => {}
        }
    }

    /// The register offset of byte `index` of an access starting at `port`, or `None` if that
    /// byte falls outside the UART's ports.
    fn offset_of(&self, port: u16, index: u8) -> Option<u16> {
        let offset = (u32::from(port) + u32::from(index)).checked_sub(u32::from(self.base))?;
        u16::try_from(offset)
            .ok()
            .filter(|offset| *offset < PORT_COUNT)
    }
}

impl PortDevice for Uart16550 {
    fn name(&self) -> &'static str {
        "uart16550"
    }

    fn ports(&self) -> RangeInclusive<u16> {
        self.base..=self.base + (PORT_COUNT - 1)
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

    fn write(&mut self, port: u16, size: u8, value: u32, events: &mut Vec<DeviceEvent>) {
        let bytes = value.to_le_bytes();
        for (index, byte) in (0..access_width(size)).zip(bytes) {
            if let Some(offset) = self.offset_of(port, index) {
                self.write_register(offset, byte, events);
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

    const BASE: u16 = Uart16550::COM1;
    const DATA: u16 = BASE;
    const IER: u16 = BASE + 1;
    const IIR_FCR: u16 = BASE + 2;
    const LCR: u16 = BASE + 3;
    const MCR: u16 = BASE + 4;
    const LSR: u16 = BASE + 5;
    const MSR: u16 = BASE + 6;
    const SCR: u16 = BASE + 7;

    fn uart_on_bus() -> PortBus {
        let mut bus = PortBus::new();
        bus.add(Box::new(Uart16550::new(BASE))).unwrap();
        bus
    }

    fn out(bus: &mut PortBus, port: u16, value: u8) -> Vec<DeviceEvent> {
        let mut events = Vec::new();
        bus.write(port, 1, u32::from(value), &mut events);
        events
    }

    fn inb(bus: &mut PortBus, port: u16) -> u8 {
        bus.read(port, 1).value as u8
    }

    #[test]
    fn reset_state() {
        let mut bus = uart_on_bus();
        assert_eq!(bus.owner_name(0x3F8), Some("uart16550"));
        assert_eq!(bus.owner_name(0x3FF), Some("uart16550"));
        assert_eq!(bus.owner_name(0x400), None);
        assert_eq!(inb(&mut bus, IER), 0);
        assert_eq!(inb(&mut bus, IIR_FCR), IIR_NO_INTERRUPT);
        assert_eq!(inb(&mut bus, LCR), 0);
        assert_eq!(inb(&mut bus, MCR), 0);
        assert_eq!(inb(&mut bus, LSR), 0x60);
        assert_eq!(inb(&mut bus, MSR), 0xB0);
    }

    #[test]
    fn divisor_latch_read_back_and_data_registers_kept_apart() {
        let mut bus = uart_on_bus();
        out(&mut bus, IER, 0x05);
        out(&mut bus, LCR, 0x80 | 0x03);
        // DLL/DLM writes do not transmit and do not touch IER.
        assert!(out(&mut bus, DATA, 0x01).is_empty());
        out(&mut bus, IER, 0x00);
        assert_eq!(inb(&mut bus, DATA), 0x01);
        assert_eq!(inb(&mut bus, IER), 0x00);
        out(&mut bus, IER, 0x12);
        assert_eq!(bus.read(DATA, 2).value, 0x1201, "16-bit read of DLL:DLM");
        assert_eq!(bus.device_mut::<Uart16550>(BASE).unwrap().divisor(), 0x1201);
        out(&mut bus, LCR, 0x03);
        assert_eq!(inb(&mut bus, LCR), 0x03);
        assert_eq!(inb(&mut bus, IER), 0x05, "IER unchanged by DLM writes");
        // 16-bit write of the divisor.
        out(&mut bus, LCR, 0x83);
        let mut events = Vec::new();
        bus.write(DATA, 2, 0x0C00, &mut events);
        assert!(events.is_empty());
        assert_eq!(bus.read(DATA, 2).value, 0x0C00);
    }

    #[test]
    fn transmitter_emits_console_bytes() {
        let mut bus = uart_on_bus();
        let mut events = Vec::new();
        for byte in b"hi\n" {
            bus.write(DATA, 1, u32::from(*byte), &mut events);
        }
        assert_eq!(
            events,
            [
                DeviceEvent::ConsoleByte(b'h'),
                DeviceEvent::ConsoleByte(b'i'),
                DeviceEvent::ConsoleByte(b'\n')
            ]
        );
        assert_eq!(inb(&mut bus, LSR) & 0x60, 0x60);
        // The bus masks the value to the size before the UART sees it.
        assert_eq!(out(&mut bus, DATA, 0x41), [DeviceEvent::ConsoleByte(b'A')]);
        let mut events = Vec::new();
        bus.write(DATA, 1, 0xFFFF_FF42, &mut events);
        assert_eq!(events, [DeviceEvent::ConsoleByte(b'B')]);
    }

    #[test]
    fn loopback_feeds_receiver_not_console() {
        let mut bus = uart_on_bus();
        out(&mut bus, MCR, MCR_LOOPBACK | MCR_REQUEST_TO_SEND | MCR_OUT2);
        // What Linux's 8250 autoconfig checks: MSR & 0xF0 == DCD | CTS.
        assert_eq!(inb(&mut bus, MSR) & 0xF0, 0x90);
        out(
            &mut bus,
            MCR,
            MCR_LOOPBACK | MCR_DATA_TERMINAL_READY | MCR_OUT1,
        );
        assert_eq!(inb(&mut bus, MSR), 0x60);
        out(&mut bus, MCR, 0xFF);
        assert_eq!(inb(&mut bus, MCR), 0x1F);
        assert_eq!(inb(&mut bus, MSR), 0xF0);

        assert!(out(&mut bus, DATA, b'x').is_empty(), "no console output");
        assert!(out(&mut bus, DATA, b'y').is_empty());
        assert_eq!(inb(&mut bus, LSR) & LSR_DATA_READY, LSR_DATA_READY);
        assert_eq!(inb(&mut bus, DATA), b'x');
        assert_eq!(inb(&mut bus, DATA), b'y');
        assert_eq!(inb(&mut bus, LSR) & LSR_DATA_READY, 0);

        out(&mut bus, MCR, 0x0B);
        assert_eq!(inb(&mut bus, MSR), 0xB0);
        assert_eq!(out(&mut bus, DATA, b'z'), [DeviceEvent::ConsoleByte(b'z')]);
        assert_eq!(inb(&mut bus, LSR) & LSR_DATA_READY, 0);
    }

    #[test]
    fn fifo_control_and_interrupt_identification() {
        let mut bus = uart_on_bus();
        out(&mut bus, IIR_FCR, 0x01);
        assert_eq!(inb(&mut bus, IIR_FCR), 0xC1);
        // Linux's 16750 probe writes FCR with bit 5 and expects IIR bit 5 clear (16550A).
        out(&mut bus, IIR_FCR, 0x21 | 0xC0);
        assert_eq!(inb(&mut bus, IIR_FCR) >> 5, 0b110);
        out(&mut bus, IIR_FCR, 0x00);
        assert_eq!(inb(&mut bus, IIR_FCR), 0x01);
        // Other bits are not programmed while FIFO enable is written as 0.
        out(&mut bus, IIR_FCR, 0xC0);
        assert_eq!(inb(&mut bus, IIR_FCR), 0x01);
    }

    #[test]
    fn transmitter_empty_interrupt() {
        let mut bus = uart_on_bus();
        out(&mut bus, IIR_FCR, 0x01);
        out(&mut bus, IER, IER_TRANSMITTER_EMPTY);
        assert!(bus
            .device_mut::<Uart16550>(BASE)
            .unwrap()
            .interrupt_pending());
        assert_eq!(inb(&mut bus, IIR_FCR), 0xC2);
        // Reading IIR cleared it.
        assert_eq!(inb(&mut bus, IIR_FCR), 0xC1);
        assert!(!bus
            .device_mut::<Uart16550>(BASE)
            .unwrap()
            .interrupt_pending());
        // A transmitted byte raises it again.
        out(&mut bus, DATA, b'a');
        assert_eq!(inb(&mut bus, IIR_FCR), 0xC2);
        assert_eq!(inb(&mut bus, IIR_FCR), 0xC1);
    }

    #[test]
    fn input_queue_data_ready_and_received_data_interrupt() {
        let mut bus = uart_on_bus();
        out(&mut bus, IER, IER_RECEIVED_DATA);
        assert_eq!(inb(&mut bus, LSR), 0x60);
        assert_eq!(inb(&mut bus, IIR_FCR), IIR_NO_INTERRUPT);
        {
            let uart = bus.device_mut::<Uart16550>(BASE).unwrap();
            uart.push_input(b'o');
            uart.push_input(b'k');
            assert_eq!(uart.input_queued(), 2);
            assert!(uart.interrupt_pending());
        }
        assert_eq!(inb(&mut bus, LSR), 0x61);
        assert_eq!(inb(&mut bus, IIR_FCR), IIR_RECEIVED_DATA);
        assert_eq!(inb(&mut bus, DATA), b'o');
        assert_eq!(inb(&mut bus, DATA), b'k');
        assert_eq!(inb(&mut bus, LSR), 0x60);
        assert_eq!(inb(&mut bus, IIR_FCR), IIR_NO_INTERRUPT);
        // Empty RBR keeps the last byte.
        assert_eq!(inb(&mut bus, DATA), b'k');
    }

    #[test]
    fn input_queue_is_bounded_and_reports_overrun() {
        let mut uart = Uart16550::new(BASE);
        for index in 0..Uart16550::INPUT_CAPACITY + 10 {
            uart.push_input(index as u8);
        }
        assert_eq!(uart.input_queued(), Uart16550::INPUT_CAPACITY);
        assert_eq!(uart.input_bytes_dropped(), 10);
        let mut events = Vec::new();
        uart.write(IER, 1, u32::from(IER_RECEIVER_LINE_STATUS), &mut events);
        assert_eq!(uart.read(IIR_FCR, 1), u32::from(IIR_RECEIVER_LINE_STATUS));
        assert_eq!(uart.read(LSR, 1), 0x63);
        assert_eq!(uart.read(LSR, 1), 0x61, "OE cleared by reading LSR");
        assert_eq!(uart.read(IIR_FCR, 1), u32::from(IIR_NO_INTERRUPT));
        // Clearing the receive FIFO empties the queue.
        uart.write(IIR_FCR, 1, 0x03, &mut events);
        assert_eq!(uart.input_queued(), 0);
        assert_eq!(uart.read(LSR, 1), 0x60);
        assert!(events.is_empty());
    }

    #[test]
    fn scratch_register_reads_back() {
        let mut bus = uart_on_bus();
        for value in [0x00, 0x55, 0xAA, 0xFF] {
            out(&mut bus, SCR, value);
            assert_eq!(inb(&mut bus, SCR), value);
        }
    }

    #[test]
    fn wide_accesses_split_into_bytes_and_straddle_safely() {
        let mut bus = uart_on_bus();
        out(&mut bus, SCR, 0x5A);
        // 4-byte read at offset 6: MSR, SCR, then two bytes past the UART.
        assert_eq!(bus.read(MSR, 4).value, 0xFFFF_5AB0);
        // 2-byte write at offset 7 changes SCR only.
        let mut events = Vec::new();
        bus.write(SCR, 2, 0x1234, &mut events);
        assert_eq!(inb(&mut bus, SCR), 0x34);
        assert!(events.is_empty());
        // A 4-byte OUT at THR sends THR byte, sets IER, FCR, LCR.
        bus.write(DATA, 4, 0x0301_0241, &mut events);
        assert_eq!(events, [DeviceEvent::ConsoleByte(b'A')]);
        assert_eq!(inb(&mut bus, IER), 0x02);
        assert_eq!(inb(&mut bus, LCR), 0x03);
    }

    #[test]
    fn garbage_never_panics() {
        let values = [
            0,
            1,
            0x7F,
            0x80,
            0xFF,
            0x1234_5678,
            0xFFFF_FFFF,
            0x8000_0080,
        ];
        let mut uart = Uart16550::new(BASE);
        let mut events = Vec::new();
        for offset in 0..8u16 {
            for size in [0, 1, 2, 3, 4, 5, 255] {
                for value in values {
                    uart.write(BASE + offset, size, value, &mut events);
                    uart.read(BASE + offset, size);
                    uart.push_input(value as u8);
                    let _ = uart.interrupt_pending();
                }
            }
        }
        // Direct calls outside the range, and a base at the very top of the port space.
        assert_eq!(uart.read(0, 1), 0xFF);
        uart.write(0xFFFF, 4, u32::MAX, &mut events);
        let mut top = Uart16550::new(0xFFFF);
        assert_eq!(top.ports(), 0xFFF8..=0xFFFF);
        for port in [0xFFF8, 0xFFFE, 0xFFFF] {
            for size in [1, 2, 4] {
                top.read(port, size);
                top.write(port, size, u32::MAX, &mut events);
            }
        }
    }
}
