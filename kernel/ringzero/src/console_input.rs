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
//!    take it. With no input it costs two atomic loads and one LSR read (an IN).
//! 3. [`vm_ended`] when a VM has ended, from any CPU, holding any locks: it only records the
//!    index; the next [`poll`] moves the input on and says so.
//!
//! Bytes arriving before [`start`] stay in the UART (its FIFO, then the line's flow control
//! under QEMU) until the first [`poll`].
//!
//! Every static here starts as all zeros, so it lives in `.bss`: the memory check after each VM
//! (`guests::IntegrityCheck`) hashes the kernel image as loaded, `.data` included, and a
//! changing `.data` static (a `Vec::new()`, or an `Option` whose `None` is not zero) would read
//! as the kernel image being overwritten.

use crate::console;
use alloc::boxed::Box;
use alloc::string::String;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use ringzero_vmm::console_switch::{Action, ConsoleSwitch};
use spin::Mutex;

/// Bytes taken from the UART per [`poll`] (more wait for the next call).
const MAX_BYTES_PER_POLL: usize = 64;

/// Boxed, so that `None` is a null pointer (all zeros, `.bss`).
static SWITCH: Mutex<Option<Box<ConsoleSwitch>>> = Mutex::new(None);
/// Whether [`start`] has run: [`poll`] reads nothing before.
static STARTED: AtomicBool = AtomicBool::new(false);
/// VMs reported by [`vm_ended`] that [`poll`] has not told the switch about yet, one bit per
/// VM index (VM `i` is bit `i % 64` of word `i / 64`): room for 256 VMs, where the manifest
/// allows at most 64 (one vCPU each at least, 64 vCPUs in all). An index beyond the bitmap is
/// not recorded; [`poll`] still finds such a VM ended when `route` refuses its first byte.
static ENDED: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];
static ENDED_PENDING: AtomicBool = AtomicBool::new(false);

/// Hook 1: the VMs exist; input goes to the first. Prints
/// `ringzero: console input -> vm NAME (Ctrl-A n: next, Ctrl-A ?: help)`.
pub fn start<S: Into<String>>(names: impl IntoIterator<Item = S>) {
    let switch = ConsoleSwitch::new(names);
    console::print_line(format_args!("{}", switch.announcement()));
    *SWITCH.lock() = Some(Box::new(switch));
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
        let ended = ENDED.iter().enumerate().flat_map(|(word_index, word)| {
            let bits = word.swap(0, Ordering::AcqRel);
            (0..64)
                .filter(move |bit| bits & (1 << bit) != 0)
                .map(move |bit| word_index * 64 + bit)
        });
        if let Some(line) = switch.vms_ended(ended) {
            console::print_line(format_args!("{line}"));
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

/// Hook 3: VM `vm` has ended. Safe from any CPU and under any lock (it takes none).
pub fn vm_ended(vm: usize) {
    if let Some(word) = ENDED.get(vm / 64) {
        word.fetch_or(1 << (vm % 64), Ordering::AcqRel);
        ENDED_PENDING.store(true, Ordering::Release);
    }
}
