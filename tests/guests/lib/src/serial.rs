//! The guest console: COM1 at 0x3F8, polled. Each byte costs exactly one IN (the line status
//! poll, when the transmitter is empty at once, as ringzero's UART always is) and one OUT.
//! `println!` ends a line with "\n" alone (one byte): the hypervisor, not the guest, decides how
//! lines end on its own console.

use crate::hw;
use core::fmt;

/// COM1 data register.
pub const COM1: u16 = 0x3F8;
/// COM1 line status register; bit 5 = transmitter holding register empty (THRE).
pub const COM1_LSR: u16 = 0x3FD;
/// COM1 scratch register: reads back what was written.
pub const COM1_SCRATCH: u16 = 0x3FF;
const LSR_THRE: u8 = 0x20;

/// The I/O instructions `write_bytes` executes for `length` bytes when the UART is always ready.
pub const fn io_cost(length: usize) -> u64 {
    2 * length as u64
}

/// Sends one byte: poll LSR until THRE, then write the data register.
pub fn write_byte(byte: u8) {
    loop {
        if hw::inb(COM1_LSR) & LSR_THRE != 0 {
            break;
        }
    }
    hw::outb(COM1, byte);
}

/// Sends `bytes` as they are.
pub fn write_bytes(bytes: &[u8]) {
    for &byte in bytes {
        write_byte(byte);
    }
}

/// `core::fmt` sink for the console.
pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        write_bytes(text.as_bytes());
        Ok(())
    }
}

#[doc(hidden)]
pub fn _print(arguments: fmt::Arguments) {
    // Serial never fails.
    let _ = fmt::Write::write_fmt(&mut Serial, arguments);
}

/// Prints to COM1.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::serial::_print(format_args!($($arg)*)) };
}

/// Prints to COM1 and ends the line with "\n".
#[macro_export]
macro_rules! println {
    () => { $crate::serial::write_byte(b'\n') };
    ($($arg:tt)*) => {{
        $crate::serial::_print(format_args!($($arg)*));
        $crate::serial::write_byte(b'\n');
    }};
}
