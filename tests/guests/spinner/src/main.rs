//! spinner: a guest that never gives its CPU back. It prints one line, disables interrupts and
//! spins in a two-instruction loop (an INC and a JMP: no PAUSE, no HLT, no I/O, nothing that
//! exits) forever. Only the hypervisor can take the CPU from it: the tests run it beside other
//! VMs on the same physical CPU (tests/configs/spinner.toml) and check that they still finish
//! and that the spinner is stopped by its time limit.
#![no_std]
#![no_main]

use core::arch::asm;
use guest_lib::{println, BootInfo};

guest_lib::flat64_entry!(main);

fn main(_boot_info: BootInfo) -> ! {
    println!("spinner: spinning with interrupts off");
    // SAFETY: CLI, then a register-only loop that never ends; no memory is touched.
    unsafe {
        asm!(
            "cli",
            "2:",
            "inc rax",
            "jmp 2b",
            options(noreturn, nomem, nostack)
        )
    }
}
