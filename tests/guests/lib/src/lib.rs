//! guest-lib: what every ringzero test guest shares. A COM1 console (`print!`/`println!`), the
//! test exit port (`exit`), a panic handler that reports and exits with status 101, counted
//! wrappers for the instructions a hypervisor intercepts (`hw`), the flat64 boot information
//! reader (`boot_info`) and the flat64 entry stub (`flat64_entry!`).
//!
//! The counters in `hw` let a guest predict the hypervisor's exit statistics exactly: every
//! CPUID, IN, OUT, RDMSR and HLT a guest executes goes through a wrapper that counts it.
#![no_std]

pub mod boot_info;
pub mod fmt;
pub mod hw;
pub mod multiboot;
pub mod serial;

pub use boot_info::BootInfo;

/// The test exit port: a 4-byte OUT of V ends the VM with status V (QEMU's isa-debug-exit at the
/// same port exits with (V << 1) | 1).
pub const EXIT_PORT: u16 = 0xF4;

/// The status the panic handler exits with.
pub const PANIC_STATUS: u32 = 101;

/// Ends the VM with `status`: one counted 4-byte OUT to the exit port. Should the OUT return
/// (no exit device), the CPU stops with interrupts off.
pub fn exit(status: u32) -> ! {
    hw::outl(EXIT_PORT, status);
    hw::stop()
}

#[cfg(not(test))]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("PANIC: {}", info);
    exit(PANIC_STATUS)
}

/// Defines the flat64 entry point `_start` (the linker script puts its section, `.text.entry`,
/// first, so it is the image's first byte at 0x100000) and makes it call `$main(BootInfo)`.
///
/// Entered per docs/specs/guest-boot.md "flat64": long mode, RSP = 0x80000, RDI = 0x8000,
/// interrupts off. The stub
/// 1. keeps RDI (the boot info address) in a callee-saved register,
/// 2. zeroes `.bss` (a raw binary carries none of it; the linker script gives its bounds),
/// 3. aligns the stack to 16 bytes and calls the Rust entry, which never returns.
#[macro_export]
macro_rules! flat64_entry {
    ($main:path) => {
        extern "C" fn __guest_flat64_main(boot_info_address: u64) -> ! {
            let main: fn($crate::BootInfo) -> ! = $main;
            main($crate::BootInfo::at(boot_info_address))
        }

        ::core::arch::global_asm!(
            ".pushsection .text.entry, \"ax\"",
            ".global _start",
            "_start:",
            "    mov r12, rdi",
            "    lea rdi, [rip + __bss_start]",
            "    lea rcx, [rip + __bss_end]",
            "    sub rcx, rdi",
            "    xor eax, eax",
            "    cld",
            "    rep stosb",
            "    mov rdi, r12",
            "    and rsp, -16",
            "    call {main}",
            "2:  cli",
            "    hlt",
            "    jmp 2b",
            ".popsection",
            main = sym __guest_flat64_main,
        );
    };
}
