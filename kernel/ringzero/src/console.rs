//! The hypervisor's one serial sink (COM1, 16550 UART) and the `log` facade on top of it.
//!
//! Every log line reads `[tsc=<cycles since boot> cpu<N> <LEVEL>] message`; the fixed
//! summary lines that scripts grep (`ringzero: ...`) are written bare with [`print_line`].
//! One lock serialises whole lines, so lines from different CPUs never interleave. A fatal
//! path (exception, panic) takes the console over for good: see
//! [`break_lock_for_fatal_path`].

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicUsize, Ordering};
use ringzero_x86::hw;
use spin::Mutex;
use uart_16550::{backend::PioBackend, Config, Uart16550, Uart16550Tty};

/// COM1's I/O base.
const COM1: u16 = 0x3F8;

static SERIAL: Mutex<Option<Uart16550Tty<PioBackend>>> = Mutex::new(None);
static BOOT_TSC: spin::Once<u64> = spin::Once::new();
static LOGGER: SerialLogger = SerialLogger;
/// No CPU (for the two atomics below).
const NOBODY: usize = usize::MAX;
/// The CPU holding [`SERIAL`] (set just after taking it, cleared just before releasing it).
static SERIAL_OWNER: AtomicUsize = AtomicUsize::new(NOBODY);
/// The CPU on its way to power-off after an exception or panic; the others stop printing.
static FATAL_CPU: AtomicUsize = AtomicUsize::new(NOBODY);

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

/// Runs `write` on the UART with the console lock held (one whole line per call). A CPU that
/// finds another CPU on a fatal path parks itself instead: that CPU owns the console now and
/// is about to power the machine off.
fn with_serial(write: impl FnOnce(&mut Uart16550Tty<PioBackend>)) {
    let me = cpu_index();
    let park_if_another_is_fatal = || {
        let fatal = FATAL_CPU.load(Ordering::Acquire);
        fatal != NOBODY && fatal != me
    };
    if park_if_another_is_fatal() {
        hw::halt_forever();
    }
    let mut serial = SERIAL.lock();
    if park_if_another_is_fatal() {
        drop(serial);
        hw::halt_forever();
    }
    SERIAL_OWNER.store(me, Ordering::Relaxed);
    if let Some(uart) = serial.as_mut() {
        write(uart);
    }
    SERIAL_OWNER.store(NOBODY, Ordering::Relaxed);
}

/// The TSC when the hypervisor started (the time base of the log lines).
pub fn boot_tsc() -> u64 {
    *BOOT_TSC.get().unwrap_or(&0)
}

/// Writes one unprefixed line (for the fixed, greppable summary lines).
pub fn print_line(args: fmt::Arguments<'_>) {
    with_serial(|uart| {
        let _ = uart.write_fmt(args);
        let _ = uart.write_str("\n");
    });
}

/// Reads the bytes COM1 has received (up to `buffer.len()`) without waiting: one LSR read when
/// nothing came. Used by `console_input`, on the bootstrap CPU only. It reads the two registers
/// directly, without the console lock: the lock's byte sits in the kernel image's `.data`, which
/// the memory check after each VM hashes, so taking it at every scheduler loop would make that
/// check race with this poll.
pub fn receive_bytes(buffer: &mut [u8]) -> usize {
    const LINE_STATUS: u16 = COM1 + 5;
    const DATA_READY: u8 = 1 << 0;
    let mut count = 0;
    for slot in buffer.iter_mut() {
        // SAFETY: reading LSR and RBR does not disturb transmission (THR, and the LSR bits the
        // writers poll, THRE/TEMT, are not changed by reads); DLAB is set only during `init`,
        // before any CPU polls; only the bootstrap CPU reads RBR. See: PC16550D datasheet 8.4.
        if unsafe { hw::inb(LINE_STATUS) } & DATA_READY == 0 {
            break;
        }
        // SAFETY: as above; LSR.DR said a byte waits in RBR.
        *slot = unsafe { hw::inb(COM1) };
        count += 1;
    }
    count
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

/// Makes the console usable from a fatal path (exception or panic), which may have
/// interrupted this CPU's own print, and gives it to this CPU for good:
/// - the first CPU to get here becomes the fatal CPU; a second one parks (one report);
/// - if this CPU holds the lock, the print it interrupted never resumes: the lock is broken;
/// - if another CPU holds it, that CPU is printing a line: it may finish (up to 100 ms, then
///   the lock is broken anyway, the holder being stuck); it parks at its next line.
pub fn break_lock_for_fatal_path() {
    let me = cpu_index();
    match FATAL_CPU.compare_exchange(NOBODY, me, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => {}
        // A fault on this CPU's own fatal path: carry on reporting.
        Err(fatal) if fatal == me => {}
        Err(_) => hw::halt_forever(),
    }
    if !SERIAL.is_locked() {
        return;
    }
    if SERIAL_OWNER.load(Ordering::Relaxed) != me {
        let deadline = crate::time::deadline_after_millis(100);
        while SERIAL.is_locked() && !crate::time::passed(deadline) {
            core::hint::spin_loop();
        }
    }
    if SERIAL.is_locked() {
        // SAFETY: the holder is either this CPU's interrupted print, which never resumes, or a
        // CPU that did not finish one line in 100 ms and parks before its next; from here on
        // only this CPU writes to the UART.
        unsafe { SERIAL.force_unlock() };
    }
}

/// The logical index of the CPU running this code (0 = the boot CPU), found from its initial
/// APIC ID (CPUID leaf 1, EBX bits 31:24) in the table `smp` fills before it starts a CPU.
/// See: SDM Vol 2A 3.3 "CPUID", Table 3-8 (initial APIC ID).
pub fn cpu_index() -> usize {
    crate::smp::index_of_apic_id(hw::cpuid(1, 0).ebx >> 24)
}

struct SerialLogger;

impl log::Log for SerialLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        // The virtio-drivers crate narrates its set-up at info; the `disk:` lines say it plainer.
        if metadata.target().starts_with("virtio_drivers") {
            return metadata.level() <= log::Level::Warn;
        }
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let since_boot = hw::rdtsc().wrapping_sub(*BOOT_TSC.get().unwrap_or(&0));
        let cpu = cpu_index();
        with_serial(|uart| {
            let _ = writeln!(
                uart,
                "[tsc={since_boot:>13} cpu{cpu} {:<5}] {}",
                record.level(),
                record.args()
            );
        });
    }

    fn flush(&self) {}
}
