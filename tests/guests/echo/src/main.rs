//! echo: reads lines from its UART (COM1, polled: LSR bit 0 "data ready", then RBR) and echoes
//! each one back as `echo: LINE`, until the line `quit`, which it answers with `echo: bye` before
//! ending with exit status 0. It is the guest side of the console-input tests: whatever the
//! hypervisor routes from its own console to this VM comes back on the console with the VM's
//! name in front (`NAME | echo: LINE`), so a test sees which VM got which line.
//!
//! A line ends at `\r` (a terminal's Enter) or `\n`; empty lines are ignored. Bytes outside
//! printable ASCII are shown as `\xNN` (a literal Ctrl-A is `\x01`). A line longer than
//! `LINE_MAX` bytes is echoed in pieces of `LINE_MAX`. At start it prints
//! `echo: ready (CMDLINE)`.
#![no_std]
#![no_main]

use guest_lib::fmt::Printable;
use guest_lib::{exit, hw, println, serial, BootInfo};

guest_lib::flat64_entry!(main);

/// COM1 line status register bit 0: a received byte waits in RBR.
const LSR_DATA_READY: u8 = 0x01;
/// The longest line echoed in one piece.
const LINE_MAX: usize = 128;

/// The next byte received: polls LSR until data is ready, then reads RBR.
fn read_byte() -> u8 {
    while hw::inb(serial::COM1_LSR) & LSR_DATA_READY == 0 {
        core::hint::spin_loop();
    }
    hw::inb(serial::COM1)
}

fn main(boot_info: BootInfo) -> ! {
    println!("echo: ready ({})", Printable(boot_info.cmdline()));
    let mut line = [0u8; LINE_MAX];
    let mut length = 0;
    loop {
        let byte = read_byte();
        let ends_line = byte == b'\r' || byte == b'\n';
        if !ends_line {
            line[length] = byte;
            length += 1;
        }
        if (ends_line && length > 0) || length == LINE_MAX {
            let text = &line[..length];
            if text == b"quit" {
                println!("echo: bye");
                exit(0);
            }
            println!("echo: {}", Printable(text));
            length = 0;
        }
    }
}
