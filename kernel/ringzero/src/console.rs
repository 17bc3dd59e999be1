//! The hypervisor's one serial sink (COM1, 16550 UART) and the `log` facade on top of it.
//!
//! Every log line reads `[tsc=<cycles since boot> cpu<N> <LEVEL>] message`; the fixed
//! summary lines that scripts grep (`ringzero: ...`) are written bare with [`print_line`].

use core::fmt::{self, Write};
use ringzero_x86::hw;
use spin::Mutex;
use uart_16550::{backend::PioBackend, Config, Uart16550, Uart16550Tty};

/// COM1's I/O base.
const COM1: u16 = 0x3F8;

static SERIAL: Mutex<Option<Uart16550Tty<PioBackend>>> = Mutex::new(None);
static BOOT_TSC: spin::Once<u64> = spin::Once::new();
static LOGGER: SerialLogger = SerialLogger;

/// Brings up COM1 and installs the logger. Called first thing at boot.
pub fn init() {
    BOOT_TSC.call_once(hw::rdtsc);
    // SAFETY: COM1's eight ports belong to the hypervisor alone for its whole lifetime.
    let uart = unsafe { Uart16550::new_port(COM1) };
    if let Ok(mut uart) = uart {
        // No loopback self-test: it is not needed to transmit, and a missing UART must not
        // stop the boot. Writes to an absent UART are dropped by the hardware.
        if uart.init(Config::default()).is_ok() {
            *SERIAL.lock() = Some(Uart16550Tty::from_inner(uart));
        }
    }
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Info);
}

/// The TSC when the hypervisor started (the time base of the log lines).
pub fn boot_tsc() -> u64 {
    *BOOT_TSC.get().unwrap_or(&0)
}

/// Writes one unprefixed line (for the fixed, greppable summary lines).
pub fn print_line(args: fmt::Arguments<'_>) {
    let mut serial = SERIAL.lock();
    if let Some(uart) = serial.as_mut() {
        let _ = uart.write_fmt(args);
        let _ = uart.write_str("\n");
    }
}

/// Reads the bytes COM1 has received (up to `buffer.len()`) without waiting: one LSR read when
/// nothing came. Returns 0 as well when another CPU is writing to the console right now (the
/// bytes wait in the UART for the next call). Used by `console_input`.
pub fn receive_bytes(buffer: &mut [u8]) -> usize {
    match SERIAL.try_lock() {
        Some(mut serial) => serial
            .as_mut()
            .map_or(0, |uart| uart.inner_mut().receive_bytes(buffer)),
        None => 0,
    }
}

/// Waits until the UART has shifted out every byte (LSR.TEMT), so nothing written before a
/// power-off is lost (Bochs drops what is still in the shift register when it exits).
pub fn drain() {
    const LINE_STATUS: u16 = COM1 + 5;
    const TRANSMITTER_EMPTY: u8 = 1 << 6;
    for _ in 0..1_000_000 {
        // SAFETY: reading COM1's line status register has no side effect on transmission.
        if unsafe { hw::inb(LINE_STATUS) } & TRANSMITTER_EMPTY != 0 {
            return;
        }
        core::hint::spin_loop();
    }
}

/// Makes the console usable from a fatal path (exception or panic) that may have interrupted
/// a holder of the lock. The interrupted code never runs again, so breaking its lock is safe.
pub fn break_lock_for_fatal_path() {
    if SERIAL.is_locked() {
        // SAFETY: only called on the way to power-off; the interrupted lock holder will not
        // resume, so no two writers use the UART at the same time afterwards.
        unsafe { SERIAL.force_unlock() };
    }
}

/// The index of the CPU running this code (its initial APIC ID until per-CPU data exists).
pub fn cpu_index() -> u32 {
    hw::cpuid(1, 0).ebx >> 24
}

struct SerialLogger;

impl log::Log for SerialLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let since_boot = hw::rdtsc().wrapping_sub(*BOOT_TSC.get().unwrap_or(&0));
        let mut serial = SERIAL.lock();
        if let Some(uart) = serial.as_mut() {
            let _ = writeln!(
                uart,
                "[tsc={since_boot:>13} cpu{} {:<5}] {}",
                cpu_index(),
                record.level(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
}
