//! Power-off with a status the outside world can read.
//!
//! The status is first printed as the fixed line `ringzero: poweroff status=N`, then the
//! machine is turned off by the first mechanism that works here:
//! 1. status 0 only: ACPI S5 (PM1a/PM1b control with `\_S5`'s SLP_TYP | SLP_EN); QEMU then
//!    exits with 0, Bochs ends, a real machine turns off;
//! 2. QEMU's `isa-debug-exit` device at port 0xF4: QEMU exits with `(status << 1) | 1`;
//! 3. ACPI S5 for a non-zero status (Bochs, real machines; the status is on the serial line);
//! 4. halt forever with interrupts off.
//!
//! The statuses are documented in README.md and docs/guest-interface.md.

use crate::platform::AcpiPowerOff;
use ringzero_x86::hw;

/// Why the hypervisor stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ExitStatus {
    /// Everything ran and ended as asked.
    Clean = 0,
    /// A Rust panic in the hypervisor.
    Panic = 1,
    /// A CPU exception in the hypervisor (the report is above it in the log).
    HypervisorException = 2,
    /// This machine cannot virtualize (no VT-x/SVM, or disabled by firmware).
    CannotVirtualize = 3,
    /// The boot manifest in the ramdisk was missing or malformed.
    BadManifest = 4,
    /// The platform could not be set up (e.g. no memory for the heap).
    PlatformSetupFailed = 5,
    /// At least one VM did not pass (status 0 through the exit port or the EXIT hypercall, or an
    /// ACPI power-off); its `ringzero: vm` line says how it ended.
    GuestFailed = 6,
}

static ACPI_POWER_OFF: spin::Once<AcpiPowerOff> = spin::Once::new();

/// Remembers how to enter S5 on this machine (called once ACPI is parsed).
pub fn set_acpi_power_off(power_off: AcpiPowerOff) {
    ACPI_POWER_OFF.call_once(|| power_off);
}

/// isa-debug-exit's port as the scripts configure QEMU (`iobase=0xf4,iosize=0x04`).
const QEMU_DEBUG_EXIT_PORT: u16 = 0xF4;

/// Prints the status line and turns the machine off. Never returns.
pub fn power_off(status: ExitStatus) -> ! {
    let code = status as u32;
    crate::console::print_line(format_args!(
        "ringzero: poweroff status={code} ({status:?})"
    ));
    crate::console::drain();
    if status == ExitStatus::Clean {
        enter_acpi_s5();
    }
    // SAFETY: port 0xF4 is the emulator's exit device where one is configured, and an unused
    // ISA port elsewhere; the hypervisor is about to stop, so the write cannot disturb it.
    unsafe { hw::outl(QEMU_DEBUG_EXIT_PORT, code) };
    enter_acpi_s5();
    log::error!("power-off did not take effect; halting");
    hw::halt_forever()
}

fn enter_acpi_s5() {
    let Some(power_off) = ACPI_POWER_OFF.get() else {
        return;
    };
    const SCI_EN: u16 = 1 << 0;
    // SAFETY: the ports come from the host's FADT: PM1 control blocks and the SMI command
    // port are there to be written by the OS; the hypervisor is stopping.
    unsafe {
        let control = hw::inw(power_off.pm1a_control_port);
        if control & SCI_EN == 0 && power_off.smi_command_port != 0 && power_off.acpi_enable != 0 {
            // See: ACPI 6.5 16.3.1 "Legacy/ACPI Select and the SCI Interrupt".
            hw::outb(power_off.smi_command_port, power_off.acpi_enable);
            for _ in 0..1_000_000 {
                if hw::inw(power_off.pm1a_control_port) & SCI_EN != 0 {
                    break;
                }
                core::hint::spin_loop();
            }
        }
        hw::outw(
            power_off.pm1a_control_port,
            power_off.sleep_type.pm1a_control(),
        );
        if let Some(port) = power_off.pm1b_control_port {
            hw::outw(port, power_off.sleep_type.pm1b_control());
        }
    }
    // Give the chipset a moment to act before trying the next mechanism.
    for _ in 0..10_000_000 {
        core::hint::spin_loop();
    }
}
