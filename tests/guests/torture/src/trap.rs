//! The test harness: counted checks with failure reports, and the exception handler with its
//! queue of expected faults. A test queues what it expects (vector, CR2, error code, RIP and what
//! to do about it), runs the probe, then asks whether every expected fault was taken. A fault
//! that was not expected at that RIP ends the run (status 1): nothing sane can follow it.

use crate::cpu::{self, Global, TrapFrame};
use guest_lib::{exit, println};

pub const PAGE_FAULT: u64 = 14;
pub const GENERAL_PROTECTION: u64 = 13;
/// What a read probe returns when its faulting read was skipped.
pub const SKIPPED: u64 = 0xDEAD_FA17_DEAD_FA17;

/// What the handler does about an expected fault.
#[derive(Clone, Copy, Debug)]
pub enum Action {
    /// Resume at this RIP (after the faulting instruction); RAX = SKIPPED.
    Skip(u64),
    /// Write `value` to the paging entry at physical (= identity) address `entry`, INVLPG CR2 if
    /// `invlpg`, and return to the faulting instruction, which runs again.
    Fix {
        entry: u64,
        value: u64,
        invlpg: bool,
    },
    /// The fault is an instruction fetch right after a CALL: return to the caller (pop RIP).
    Return,
}

#[derive(Clone, Copy, Debug)]
pub struct Expected {
    pub vector: u64,
    /// Checked for #PF only.
    pub cr2: u64,
    pub error_code: u64,
    /// Error-code bits compared (all but the P bit for reserved-bit faults, which QEMU's TCG
    /// reports without P).
    pub error_mask: u64,
    pub rip: u64,
    pub action: Action,
}

/// The last exception taken: (vector, CR2, error code, RIP).
pub static LAST_FAULT: Global<(u64, u64, u64, u64)> = Global::new((0, 0, 0, 0));
/// Every exception taken (INT 0x80 excluded).
pub static FAULTS_TAKEN: Global<u64> = Global::new(0);
/// The RAX of the ring-3 task's INT 0x80 (its result).
pub static USER_RESULT: Global<u64> = Global::new(0);

const QUEUE: usize = 16;
const NONE: Expected = Expected {
    vector: 0,
    cr2: 0,
    error_code: 0,
    error_mask: !0,
    rip: 0,
    action: Action::Skip(0),
};
static EXPECTED: Global<[Expected; QUEUE]> = Global::new([NONE; QUEUE]);
static EXPECTED_LENGTH: Global<usize> = Global::new(0);
static EXPECTED_TAKEN: Global<usize> = Global::new(0);

static STEP: Global<&'static str> = Global::new("start");
static CHECKS: Global<u64> = Global::new(0);
static FAILURES: Global<u64> = Global::new(0);
static STEP_FAILURES: Global<u64> = Global::new(0);
/// Failure lines printed at most (a broken hypervisor could otherwise flood the console).
const FAILURE_LINES: u64 = 40;

pub fn begin_step(name: &'static str) {
    STEP.set(name);
    STEP_FAILURES.set(FAILURES.get());
}

/// Prints `torture: <step> ok` if the step had no failed check.
pub fn end_step() {
    if FAILURES.get() == STEP_FAILURES.get() {
        println!("torture: {} ok", STEP.get());
    }
}

pub fn checks() -> u64 {
    CHECKS.get()
}
pub fn failures() -> u64 {
    FAILURES.get()
}

/// One counted check; on failure prints `torture: FAILED <step>: <detail>` and goes on.
pub fn check(passed: bool, detail: core::fmt::Arguments) {
    CHECKS.set(CHECKS.get() + 1);
    if !passed {
        FAILURES.set(FAILURES.get() + 1);
        if FAILURES.get() <= FAILURE_LINES {
            println!("torture: FAILED {}: {}", STEP.get(), detail);
        }
    }
}

#[macro_export]
macro_rules! check {
    ($condition:expr, $($detail:tt)*) => {
        $crate::trap::check($condition, format_args!($($detail)*))
    };
}

/// Ends the run at once: `torture: FAILED <step>: <detail>`, status 1.
pub fn fatal(detail: core::fmt::Arguments) -> ! {
    println!("torture: FAILED {}: {}", STEP.get(), detail);
    println!(
        "torture: stopped after {} checks, {} failed",
        CHECKS.get(),
        FAILURES.get() + 1
    );
    exit(1)
}

/// Queues an expected fault.
pub fn expect(expected: Expected) {
    let length = EXPECTED_LENGTH.get();
    if length == QUEUE {
        fatal(format_args!("expectation queue full"));
    }
    // SAFETY: one CPU; the handler is not running (it runs only inside probes).
    unsafe { (*EXPECTED.pointer())[length] = expected };
    EXPECTED_LENGTH.set(length + 1);
}

pub fn expect_page_fault(cr2: u64, error_code: u64, rip: u64, action: Action) {
    expect(Expected {
        vector: PAGE_FAULT,
        cr2,
        error_code,
        error_mask: !0,
        rip,
        action,
    });
}

/// Checks that every queued fault was taken, names the first that was not, and empties the queue.
pub fn expect_done(what: &str) {
    let (length, taken) = (EXPECTED_LENGTH.get(), EXPECTED_TAKEN.get());
    let missing = if taken < length {
        // SAFETY: as in `expect`.
        Some(unsafe { (*EXPECTED.pointer())[taken] })
    } else {
        None
    };
    check!(
        taken == length,
        "{}: expected fault not raised: vector {} cr2={:#x} error={:#x} rip={:#x} ({} of {} taken)",
        what,
        missing.map_or(0, |e| e.vector),
        missing.map_or(0, |e| e.cr2),
        missing.map_or(0, |e| e.error_code),
        missing.map_or(0, |e| e.rip),
        taken,
        length
    );
    EXPECTED_LENGTH.set(0);
    EXPECTED_TAKEN.set(0);
}

/// The common exception handler, called by the entry stubs in cpu.rs.
pub extern "C" fn trap(frame: &mut TrapFrame) {
    if frame.vector == cpu::SYSCALL_VECTOR as u64 {
        return user_exit(frame);
    }
    let cr2 = if frame.vector == PAGE_FAULT {
        cpu::read_cr2()
    } else {
        0
    };
    LAST_FAULT.set((frame.vector, cr2, frame.error_code, frame.rip));
    FAULTS_TAKEN.set(FAULTS_TAKEN.get() + 1);
    let (length, taken) = (EXPECTED_LENGTH.get(), EXPECTED_TAKEN.get());
    // SAFETY: the handler runs synchronously inside a probe; nothing else holds the queue.
    let expected = (taken < length).then(|| unsafe { (*EXPECTED.pointer())[taken] });
    let Some(expected) = expected.filter(|e| e.vector == frame.vector && e.rip == frame.rip) else {
        fatal(format_args!(
            "unexpected exception vector {} error={:#x} cr2={:#x} rip={:#x} cs={:#x} rsp={:#x}{}",
            frame.vector,
            frame.error_code,
            cr2,
            frame.rip,
            frame.cs,
            frame.rsp,
            match expected {
                Some(_) => " (a different fault was expected next)",
                None => "",
            }
        ))
    };
    EXPECTED_TAKEN.set(taken + 1);
    let name = if frame.vector == PAGE_FAULT {
        "#PF"
    } else {
        "#GP"
    };
    check!(
        frame.error_code & expected.error_mask == expected.error_code & expected.error_mask,
        "{} at rip={:#x} cr2={:#x}: error code {:#x}, expected {:#x}",
        name,
        frame.rip,
        cr2,
        frame.error_code,
        expected.error_code
    );
    if frame.vector == PAGE_FAULT {
        check!(
            cr2 == expected.cr2,
            "#PF at rip={:#x}: CR2 {:#x}, expected {:#x}",
            frame.rip,
            cr2,
            expected.cr2
        );
    }
    match expected.action {
        Action::Skip(resume) => {
            frame.rip = resume;
            frame.rax = SKIPPED;
        }
        Action::Fix {
            entry,
            value,
            invlpg,
        } => {
            // SAFETY: `entry` is a paging entry in a table of ours, identity-mapped.
            unsafe { core::ptr::write_volatile(entry as *mut u64, value) };
            if invlpg {
                cpu::invlpg(cr2);
            }
        }
        Action::Return => {
            // SAFETY: the fault followed a CALL: [RSP] is its return address, on a stack that
            // is mapped in the current address space (the kernel's or the task's own).
            frame.rip = unsafe { core::ptr::read_volatile(frame.rsp as *const u64) };
            frame.rsp += 8;
        }
    }
}

/// INT 0x80 from ring 3: record RAX and send the CPU back to ring 0, to `torture_user_return`
/// on the kernel stack `torture_enter_user` saved.
fn user_exit(frame: &mut TrapFrame) {
    if frame.cs & 3 != 3 {
        fatal(format_args!(
            "INT 0x80 from CPL {} at rip={:#x}",
            frame.cs & 3,
            frame.rip
        ));
    }
    USER_RESULT.set(frame.rax);
    frame.rip = cpu::user_return_address();
    frame.cs = u64::from(cpu::KERNEL_CODE);
    frame.rflags = 0x2;
    frame.rsp = cpu::KERNEL_RSP.get();
    frame.ss = u64::from(cpu::KERNEL_DATA);
}
