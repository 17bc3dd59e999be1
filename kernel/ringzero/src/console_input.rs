//! Keyboard input from the hypervisor's serial console (COM1) to one selected VM at a time.
//! The policy (the Ctrl-A keys, who has the input, what is announced) is the pure
//! `ringzero_vmm::console_switch`; this module reads the host's UART and keeps the one switch
//! the CPUs share.
//!
//! The scheduler's three hooks:
//! 1. [`start`] once, on the bootstrap CPU, when the VMs exist: VM index `i` is the `i`-th name.
//!    Prints where input goes and how to switch (the boot line).
//! 2. [`poll`] regularly on the bootstrap CPU (every loop of its scheduler, every few ms at
//!    most), outside any VM's lock. It reads what arrived on COM1 and calls `route(vm, byte)`
//!    for each byte meant for VM `vm`; `route` queues it on that VM's UART (with
//!    `ringzero_vmm::console_switch::push_to_console`) and returns false when the VM cannot
//!    take it. With no input it costs an atomic load, a lock attempt and one LSR read.
//! 3. [`vm_ended`] when a VM has ended, from any CPU, holding any locks: it only records the
//!    index; the next [`poll`] moves the input on and says so.
//!
//! Bytes arriving before [`start`] stay in the UART (its FIFO, then the line's flow control
//! under QEMU) until the first [`poll`].

use crate::console;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, Ordering};
use ringzero_vmm::console_switch::{Action, ConsoleSwitch};
use spin::Mutex;

/// Bytes taken from the UART per [`poll`] (more wait for the next call).
const MAX_BYTES_PER_POLL: usize = 64;

static SWITCH: Mutex<Option<ConsoleSwitch>> = Mutex::new(None);
/// Whether [`start`] has run: [`poll`] reads nothing before.
static STARTED: AtomicBool = AtomicBool::new(false);
/// VMs reported by [`vm_ended`] that [`poll`] has not told the switch about yet.
static ENDED: Mutex<Vec<usize>> = Mutex::new(Vec::new());
static ENDED_PENDING: AtomicBool = AtomicBool::new(false);

/// Hook 1: the VMs exist; input goes to the first. Prints
/// `ringzero: console input -> vm NAME (Ctrl-A n: next, Ctrl-A ?: help)`.
pub fn start<S: Into<String>>(names: impl IntoIterator<Item = S>) {
    let switch = ConsoleSwitch::new(names);
    console::print_line(format_args!("{}", switch.announcement()));
    *SWITCH.lock() = Some(switch);
    STARTED.store(true, Ordering::Release);
}

/// Hook 2: routes what was typed since the last call. See the module documentation.
pub fn poll(route: &mut dyn FnMut(usize, u8) -> bool) {
    if !STARTED.load(Ordering::Acquire) {
        return;
    }
    let mut buffer = [0u8; MAX_BYTES_PER_POLL];
    let count = console::receive_bytes(&mut buffer);
    if count == 0 && !ENDED_PENDING.load(Ordering::Acquire) {
        return;
    }
    let mut guard = SWITCH.lock();
    let Some(switch) = guard.as_mut() else {
        return;
    };
    if ENDED_PENDING.swap(false, Ordering::AcqRel) {
        let ended = core::mem::take(&mut *ENDED.lock());
        for vm in ended {
            if let Some(line) = switch.vm_ended(vm) {
                console::print_line(format_args!("{line}"));
            }
        }
    }
    for &byte in &buffer[..count] {
        match switch.input(byte) {
            Action::None => {}
            Action::Deliver { vm, byte } => {
                if !route(vm, byte) {
                    // The VM ended before the scheduler said so (or has no UART): the byte is
                    // lost, the input moves on.
                    if let Some(line) = switch.vm_ended(vm) {
                        console::print_line(format_args!("{line}"));
                    }
                }
            }
            Action::Say(text) => console::print_line(format_args!("{text}")),
        }
    }
}

/// Hook 3: VM `vm` has ended. Safe from any CPU and under any lock.
pub fn vm_ended(vm: usize) {
    ENDED.lock().push(vm);
    ENDED_PENDING.store(true, Ordering::Release);
}
