//! demo-traps: a teaching demo. A tiny guest kernel executes, one at a time, the instructions a
//! hypervisor cares about and says on its console who handled each one: the hypervisor (the
//! instruction caused a VM exit), the guest kernel (the CPU raised an exception inside the guest
//! and the guest's own handler dealt with it) or the hardware alone (no exit at all).
//!
//! 1. Ring 0: CPUID, STI;HLT, OUT/IN on the UART scratch register, RDMSR/WRMSR of the APIC base,
//!    MOV CR3, INVLPG, the hypercall instruction (VMMCALL on AMD, VMCALL on Intel) and WRMSR of
//!    the TSC, which the hypervisor refuses by injecting #GP. Around each one the guest asks the
//!    hypervisor how many exits it has seen so far (hypercall EXIT_STATISTICS) and reports the
//!    difference, so a line says "1 exit to the hypervisor" or "no exit".
//! 2. The hypercall error codes (docs/hypercalls.md), from ring 0.
//! 3. Ring 3: a task entered with IRETQ tries HLT, CLI, OUT, MOV CR3 and WRMSR (each raises #GP
//!    inside the guest; the kernel's handler prints and resumes after the instruction), then
//!    CPUID (exits at any privilege level) and the hypercall instruction (exits, and the
//!    hypervisor refuses it: NOT_PERMITTED), and returns with INT 0x80.
//! 4. A summary table; exit status 0 if everything happened as the contract says, else 1.
//!
//! Every line starts with `traps:`. The command line `paging=shadow` or `paging=nested` (the
//! configs give it) says whether MOV CR3 and INVLPG must exit; without it they are only reported.
//! With `trace = true` the hypervisor's trace lines interleave with these and show each exit.
#![no_std]
#![no_main]

mod cpu;

use core::fmt;
use cpu::{hypercall, hypercall_name, Global, TrapFrame};
use guest_lib::{exit, hw, println, BootInfo};

guest_lib::flat64_entry!(main);

// Hypercall numbers and statuses (docs/hypercalls.md).
const VERSION: u64 = 0;
const CONSOLE_WRITE: u64 = 1;
const EXIT_STATISTICS: u64 = 5;
const SUCCESS: u64 = 0;
const UNKNOWN_HYPERCALL: u64 = -1i64 as u64;
const INVALID_ARGUMENT: u64 = -2i64 as u64;
const NOT_PERMITTED: u64 = -3i64 as u64;
const BAD_ADDRESS: u64 = -4i64 as u64;

const GENERAL_PROTECTION: u64 = 13;
const PAGE_FAULT: u64 = 14;
const INVALID_OPCODE: u64 = 6;
const MSR_APIC_BASE: u32 = 0x1B;
const APIC_BASE_VALUE: u64 = 0xFEE0_0900;
const UART_SCRATCH: u16 = 0x3FF;
const SCRATCH_VALUE: u8 = 0x5A;
/// Not mapped by the demo's page tables (PML4 slot 255).
const UNMAPPED_ADDRESS: u64 = 0x7FFF_0000_0000;
/// What the ring-3 task passes to INT 0x80.
const USER_DONE: u64 = 0x600D;

// ---- bookkeeping ----------------------------------------------------------------------------

static UNEXPECTED: Global<u64> = Global::new(0);

/// Prints `traps: UNEXPECTED: ...` and remembers that the run failed.
fn unexpected(detail: fmt::Arguments) {
    UNEXPECTED.set(UNEXPECTED.get() + 1);
    println!("traps: UNEXPECTED: {}", detail);
}

/// One line of the summary table.
#[derive(Clone, Copy)]
struct Row {
    instruction: &'static str,
    ring: u8,
    handled_by: &'static str,
    why: &'static str,
}

const ROWS: usize = 20;
static SUMMARY: Global<[Row; ROWS]> = Global::new(
    [Row {
        instruction: "",
        ring: 0,
        handled_by: "",
        why: "",
    }; ROWS],
);
static SUMMARY_LENGTH: Global<usize> = Global::new(0);

fn record(instruction: &'static str, ring: u8, handled_by: &'static str, why: &'static str) {
    let length = SUMMARY_LENGTH.get();
    if length < ROWS {
        // SAFETY: one CPU; no reference into SUMMARY is live.
        unsafe {
            (*SUMMARY.pointer())[length] = Row {
                instruction,
                ring,
                handled_by,
                why,
            }
        };
        SUMMARY_LENGTH.set(length + 1);
    }
}

// ---- what the exception handler knows -------------------------------------------------------

/// A ring-0 #GP the kernel provokes on purpose: (faulting RIP, resume RIP); 0 = none.
static EXPECTED_KERNEL_GP: Global<(u64, u64)> = Global::new((0, 0));
static KERNEL_GP_TAKEN: Global<bool> = Global::new(false);
/// Which of the ring-3 task's privileged steps raised #GP.
static USER_FAULTED: Global<[bool; 5]> = Global::new([false; 5]);
/// The ring-3 task's CPUID leaf 0 (EBX, EDX, ECX: the vendor) and hypercall result (RAX, RBX).
static USER_CPUID: Global<Option<[u32; 3]>> = Global::new(None);
static USER_HYPERCALL: Global<Option<u64>> = Global::new(None);
/// RAX of the ring-3 task's INT 0x80.
static USER_RESULT: Global<u64> = Global::new(0);
/// The vendor ring 0 saw.
static VENDOR: Global<[u32; 3]> = Global::new([0; 3]);

/// The ring-3 task's steps, in order (the INT 0x81 "about to execute" events 0-6).
fn user_step_name(step: u64) -> &'static str {
    match step {
        0 => "hlt",
        1 => "cli",
        2 => "out 0x3ff",
        3 => "mov cr3",
        4 => "wrmsr 0x1b",
        5 => "cpuid",
        _ => hypercall_name(),
    }
}

fn vendor_text(vendor: &[u32; 3]) -> [u8; 12] {
    let mut text = [0u8; 12];
    for (chunk, word) in text.chunks_mut(4).zip(vendor) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    text
}

/// The common exception and INT handler, called by the entry stubs in cpu.rs.
pub extern "C" fn trap(frame: &mut TrapFrame) {
    let ring = frame.cs & 3;
    match frame.vector {
        cpu::EXIT_VECTOR if ring == 3 => {
            // The ring-3 task is done: send the CPU back to ring 0, to demo_user_return on the
            // kernel stack demo_enter_user saved.
            USER_RESULT.set(frame.rax);
            frame.rip = cpu::user_return_address();
            frame.cs = u64::from(cpu::KERNEL_CODE);
            frame.rflags = 0x2;
            frame.rsp = cpu::KERNEL_RSP.get();
            frame.ss = u64::from(cpu::KERNEL_DATA);
        }
        cpu::REPORT_VECTOR if ring == 3 => user_report(frame),
        GENERAL_PROTECTION if ring == 3 => {
            let labels = cpu::user_labels();
            let Some(step) = labels.iter().position(|&(fault, _)| fault == frame.rip) else {
                fatal(frame)
            };
            println!(
                "traps: ring 3: {} -> #GP (vector 13) at rip={:#x}, handled by the guest kernel",
                user_step_name(step as u64),
                frame.rip
            );
            if frame.error_code != 0 {
                unexpected(format_args!(
                    "#GP error code {:#x}, expected 0",
                    frame.error_code
                ));
            }
            let mut faulted = USER_FAULTED.get();
            faulted[step] = true;
            USER_FAULTED.set(faulted);
            frame.rip = labels[step].1;
        }
        GENERAL_PROTECTION if ring == 0 && frame.rip == EXPECTED_KERNEL_GP.get().0 => {
            println!(
                "traps: ring 0: #GP at rip={:#x} (vector 13, error {:#x}) handled by the guest kernel",
                frame.rip, frame.error_code
            );
            if frame.error_code != 0 {
                unexpected(format_args!(
                    "#GP error code {:#x}, expected 0",
                    frame.error_code
                ));
            }
            KERNEL_GP_TAKEN.set(true);
            frame.rip = EXPECTED_KERNEL_GP.get().1;
            EXPECTED_KERNEL_GP.set((0, 0));
        }
        _ => fatal(frame),
    }
}

/// An exception nobody planned: #UD (say, the other vendor's hypercall instruction), #PF, or
/// anything else. Nothing sane follows it: report and exit with status 1.
fn fatal(frame: &TrapFrame) -> ! {
    let name = match frame.vector {
        INVALID_OPCODE => "#UD",
        GENERAL_PROTECTION => "#GP",
        PAGE_FAULT => "#PF",
        _ => "exception",
    };
    let cr2 = if frame.vector == PAGE_FAULT {
        cpu::read_cr2()
    } else {
        0
    };
    println!(
        "traps: UNEXPECTED: {} (vector {}) error={:#x} rip={:#x} ring {} cr2={:#x}: stopping",
        name,
        frame.vector,
        frame.error_code,
        frame.rip,
        frame.cs & 3,
        cr2
    );
    exit(1)
}

/// INT 0x81 from the ring-3 task: RDI says what happened.
fn user_report(frame: &TrapFrame) {
    // The return address of INT 0x81 is the instruction after it; none of the task's INT 0x81 is
    // followed by another. If it points at an INT 0x81 (CD 81), the interrupt was delivered with
    // the INT's own address as return address, and the task will execute it a second time: what
    // happens when a hypervisor re-injects an interrupted software interrupt without advancing
    // the return address (AMD: EVENTINJ type 4 needs NRIP; Intel: the instruction length).
    // SAFETY: frame.rip is in the task's code (identity-mapped image), 2 readable bytes.
    let next = unsafe { core::ptr::read_unaligned(frame.rip as *const [u8; 2]) };
    if next == [0xCD, 0x81] {
        unexpected(format_args!(
            "INT 0x81 delivered with return address {:#x}, the INT itself: it will run twice (a re-injected software interrupt whose return address was not advanced)",
            frame.rip
        ));
    }
    match frame.rdi {
        step @ 0..=6 => println!("traps: ring 3: about to execute {}", user_step_name(step)),
        cpu::event::CPUID_RESULT => {
            let vendor = [frame.rbx as u32, frame.rdx as u32, frame.rcx as u32];
            USER_CPUID.set(Some(vendor));
            println!(
                "traps: ring 3: cpuid -> executed; the hypervisor intercepted it (CPUID exits at any privilege level)"
            );
            println!(
                "traps: ring 3: cpuid leaf 0 returned vendor '{}', as in ring 0",
                guest_lib::fmt::Printable(&vendor_text(&vendor))
            );
        }
        cpu::event::HYPERCALL_RESULT => {
            USER_HYPERCALL.set(Some(frame.rax));
            if frame.rax == NOT_PERMITTED {
                println!(
                    "traps: ring 3: {} -> refused by the hypervisor with NOT_PERMITTED (-3): the caller's CPL is 3",
                    hypercall_name()
                );
            } else {
                println!(
                    "traps: ring 3: {} -> returned rax={:#x} rbx={:#x}",
                    hypercall_name(),
                    frame.rax,
                    frame.rbx
                );
            }
        }
        other => unexpected(format_args!("ring-3 report {other}")),
    }
}

// ---- measuring exits ------------------------------------------------------------------------

/// Exits the hypervisor has counted for this VM so far (EXIT_STATISTICS, RBX). The hypercall's
/// own exit is counted after it returns.
fn exits_so_far() -> u64 {
    hypercall(EXIT_STATISTICS, [0; 4]).rbx
}

/// Runs `work` between two EXIT_STATISTICS hypercalls and returns the exits it caused: the
/// difference, less 1 for the first hypercall (counted by the second).
fn exits_during(work: &mut dyn FnMut()) -> u64 {
    let before = exits_so_far();
    work();
    let after = exits_so_far();
    after.wrapping_sub(before).saturating_sub(1)
}

struct Exits(u64);

impl fmt::Display for Exits {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            0 => write!(formatter, "no exit: the CPU ran it without the hypervisor"),
            1 => write!(formatter, "1 exit to the hypervisor"),
            n => write!(formatter, "{n} exits to the hypervisor"),
        }
    }
}

/// Whether an instruction must exit: always, never (nested paging; retried a few times, as an
/// unrelated exit such as a host interrupt may land in the window) or unknown.
#[derive(Clone, Copy, PartialEq, Eq)]
enum MustExit {
    Yes,
    No,
    Unknown,
}

/// One ring-0 step: prints `about to execute`, runs `work` (measuring its exits), checks the
/// exit expectation and returns the exits.
fn ring0_step(instruction: &str, about: &str, must_exit: MustExit, work: &mut dyn FnMut()) -> u64 {
    println!(
        "traps: ring 0: about to execute {} ({})",
        instruction, about
    );
    let mut exits = exits_during(work);
    let mut attempts = 1;
    while must_exit == MustExit::No && exits != 0 && attempts < 3 {
        exits = exits_during(work);
        attempts += 1;
    }
    match must_exit {
        MustExit::Yes if exits == 0 => unexpected(format_args!(
            "{instruction} did not exit, but the hypervisor must intercept it"
        )),
        MustExit::No if exits != 0 => unexpected(format_args!(
            "{instruction} caused {exits} exit(s) with nested paging, expected none"
        )),
        _ => {}
    }
    exits
}

// ---- the demo -------------------------------------------------------------------------------

/// A word the INVLPG step invalidates and then reads again.
static INVLPG_TARGET: Global<u64> = Global::new(0x1234_5678);
static HELLO: &[u8] = b"hello through a hypercall\n";

fn main(boot_info: BootInfo) -> ! {
    println!(
        "traps: hello: a guest kernel that runs privileged instructions and tells who handles each"
    );
    let paging = boot_info_paging(&boot_info);
    println!(
        "traps: paging mode from the command line: {}",
        match paging {
            MustExit::Yes => "shadow (MOV CR3 and INVLPG must exit to the hypervisor)",
            MustExit::No => "nested (MOV CR3 and INVLPG run on the CPU without an exit)",
            MustExit::Unknown => "not given (MOV CR3 and INVLPG are only reported)",
        }
    );

    // The hypercall instruction depends on the vendor: ask once, quietly (the demo's CPUID step
    // below asks again, measured).
    let leaf0 = hw::cpuid(0, 0);
    let vendor = [leaf0.ebx, leaf0.edx, leaf0.ecx];
    VENDOR.set(vendor);
    match &vendor_text(&vendor) {
        b"AuthenticAMD" => cpu::DEMO_IS_AMD.set(1),
        b"GenuineIntel" => cpu::DEMO_IS_AMD.set(0),
        other => {
            println!(
                "traps: UNEXPECTED: CPU vendor '{}': neither AMD nor Intel, no hypercall instruction",
                guest_lib::fmt::Printable(other)
            );
            exit(1)
        }
    }
    println!(
        "traps: kernel: CPU vendor '{}': the hypercall instruction is {}",
        guest_lib::fmt::Printable(&vendor_text(&vendor)),
        hypercall_name()
    );

    // Own page tables (user bit set), then GDT/TSS/IDT.
    let pml4 = cpu::build_page_tables();
    // SAFETY: the new tables identity-map [0, 4 GiB) like the boot tables.
    unsafe { cpu::write_cr3(pml4) };
    cpu::DEMO_KERNEL_CR3.set(pml4);
    println!("traps: kernel: own page tables at {:#x}: 0-4 GiB identity, user bit set so ring 3 can run the image", pml4);
    cpu::install_descriptor_tables();
    println!("traps: kernel: own GDT (ring-3 code/data), TSS (RSP0) and IDT (#UD, #GP, #PF; INT 0x80/0x81 open to ring 3) loaded");

    ring0_part(paging);
    hypercall_errors();
    ring3_part();
    summary()
}

fn boot_info_paging(boot_info: &BootInfo) -> MustExit {
    let cmdline = boot_info.cmdline();
    let has = |word: &[u8]| cmdline.windows(word.len()).any(|window| window == word);
    if has(b"paging=shadow") {
        MustExit::Yes
    } else if has(b"paging=nested") {
        MustExit::No
    } else {
        MustExit::Unknown
    }
}

fn ring0_part(paging: MustExit) {
    const HYPERVISOR: &str = "hypervisor";

    // CPUID.
    let mut leaf0 = hw::cpuid(0, 0);
    let exits = ring0_step(
        "cpuid",
        "leaf 0: who made this CPU?",
        MustExit::Yes,
        &mut || leaf0 = hw::cpuid(0, 0),
    );
    let vendor = [leaf0.ebx, leaf0.edx, leaf0.ecx];
    println!(
        "traps: ring 0: cpuid done (vendor '{}', max leaf {:#x}; {})",
        guest_lib::fmt::Printable(&vendor_text(&vendor)),
        leaf0.eax,
        Exits(exits)
    );
    if vendor != VENDOR.get() {
        unexpected(format_args!("the vendor changed between two CPUIDs"));
    }
    record(
        "cpuid",
        0,
        HYPERVISOR,
        "CPUID always exits: the hypervisor answers from its CPUID policy",
    );

    // STI; HLT.
    let exits = ring0_step(
        "sti; hlt",
        "wait for an interrupt",
        MustExit::Yes,
        &mut || hw::sti_hlt(),
    );
    println!("traps: ring 0: sti; hlt done ({})", Exits(exits));
    record(
        "sti; hlt",
        0,
        HYPERVISOR,
        "HLT always exits: with IF=1 the hypervisor resumes the guest at once",
    );

    // OUT and IN on the UART scratch register.
    let exits = ring0_step(
        "out 0x3ff",
        "out dx, al: 0x5a to the UART scratch register",
        MustExit::Yes,
        &mut || hw::outb(UART_SCRATCH, SCRATCH_VALUE),
    );
    println!("traps: ring 0: out 0x3ff done ({})", Exits(exits));
    record(
        "out 0x3ff",
        0,
        HYPERVISOR,
        "port I/O always exits: the virtual UART keeps the byte",
    );

    let mut value = 0;
    let exits = ring0_step(
        "in 0x3ff",
        "in al, dx: read the UART scratch register back",
        MustExit::Yes,
        &mut || value = hw::inb(UART_SCRATCH),
    );
    println!(
        "traps: ring 0: in 0x3ff done (read {:#x}; {})",
        value,
        Exits(exits)
    );
    if value != SCRATCH_VALUE {
        unexpected(format_args!(
            "scratch register read {value:#x}, wrote {SCRATCH_VALUE:#x}"
        ));
    }
    record(
        "in 0x3ff",
        0,
        HYPERVISOR,
        "port I/O always exits: the virtual UART returns the byte",
    );

    // RDMSR and WRMSR of the APIC base.
    let mut apic_base = 0;
    let exits = ring0_step(
        "rdmsr 0x1b",
        "read IA32_APIC_BASE",
        MustExit::Yes,
        &mut || apic_base = hw::rdmsr(MSR_APIC_BASE),
    );
    println!(
        "traps: ring 0: rdmsr 0x1b done (value {:#x}; {})",
        apic_base,
        Exits(exits)
    );
    if apic_base != APIC_BASE_VALUE {
        unexpected(format_args!(
            "APIC base {apic_base:#x}, expected {APIC_BASE_VALUE:#x}"
        ));
    }
    record(
        "rdmsr 0x1b",
        0,
        HYPERVISOR,
        "MSR reads always exit: the APIC base is emulated",
    );

    let exits = ring0_step(
        "wrmsr 0x1b",
        "write IA32_APIC_BASE with the same value",
        MustExit::Yes,
        // SAFETY: writes back the value just read; the hypervisor accepts and ignores it.
        &mut || unsafe { cpu::wrmsr(MSR_APIC_BASE, apic_base) },
    );
    println!("traps: ring 0: wrmsr 0x1b done ({})", Exits(exits));
    record(
        "wrmsr 0x1b",
        0,
        HYPERVISOR,
        "MSR writes always exit: the same APIC base is accepted",
    );

    // MOV CR3 and INVLPG: exits under shadow paging only.
    let cr3 = cpu::read_cr3();
    let exits = ring0_step(
        "mov cr3",
        "reload the same CR3: flushes the TLB",
        paging,
        // SAFETY: the same, valid, page tables.
        &mut || unsafe { cpu::write_cr3(cr3) },
    );
    println!(
        "traps: ring 0: mov cr3 done (cr3={:#x}; {})",
        cr3,
        Exits(exits)
    );
    shadow_refill_note(exits);
    if exits > 0 {
        record(
            "mov cr3",
            0,
            HYPERVISOR,
            "shadow paging: the hypervisor switches its shadow tables",
        );
    } else {
        record(
            "mov cr3",
            0,
            "hardware",
            "nested paging: the CPU walks the guest's tables, no exit",
        );
    }

    let target = INVLPG_TARGET.pointer() as u64;
    let exits = ring0_step(
        "invlpg",
        "drop the TLB entry of a mapped page",
        paging,
        &mut || cpu::invlpg(target),
    );
    let reread = INVLPG_TARGET.get();
    println!(
        "traps: ring 0: invlpg done (address {:#x}, still reads {:#x}; {})",
        target,
        reread,
        Exits(exits)
    );
    shadow_refill_note(exits);
    if reread != 0x1234_5678 {
        unexpected(format_args!(
            "the word at {target:#x} reads {reread:#x} after INVLPG"
        ));
    }
    if exits > 0 {
        record(
            "invlpg",
            0,
            HYPERVISOR,
            "shadow paging: the hypervisor drops its shadow entry",
        );
    } else {
        record(
            "invlpg",
            0,
            "hardware",
            "nested paging: the CPU flushes its own TLB, no exit",
        );
    }

    // The hypercall instruction: VERSION.
    let name = hypercall_name();
    let mut result = hypercall(VERSION, [0; 4]);
    let exits = ring0_step(name, "hypercall VERSION: rax=0", MustExit::Yes, &mut || {
        result = hypercall(VERSION, [0; 4])
    });
    println!(
        "traps: ring 0: {} done (VERSION: rax={:#x} rbx={:#x}; {})",
        name,
        result.rax,
        result.rbx,
        Exits(exits)
    );
    if result.rax != SUCCESS || result.rbx != 1 {
        unexpected(format_args!(
            "VERSION returned rax={:#x} rbx={:#x}, expected 0 and 1",
            result.rax, result.rbx
        ));
    }
    record(
        name,
        0,
        HYPERVISOR,
        "a hypercall: the guest kernel asks the hypervisor (VERSION -> 1)",
    );

    // WRMSR of the TSC: the hypervisor refuses it and injects #GP, the guest's handler skips it.
    println!("traps: ring 0: about to execute wrmsr 0x10 (write IA32_TIME_STAMP_COUNTER, which the hypervisor keeps for itself)");
    EXPECTED_KERNEL_GP.set(cpu::wrmsr_tsc_labels());
    KERNEL_GP_TAKEN.set(false);
    cpu::wrmsr_tsc();
    EXPECTED_KERNEL_GP.set((0, 0));
    if KERNEL_GP_TAKEN.get() {
        println!("traps: ring 0: wrmsr 0x10 done (the hypervisor refused it with #GP)");
        record("wrmsr 0x10", 0, HYPERVISOR, "MSR writes exit; the TSC is not the guest's: #GP injected, the guest kernel's handler skips it");
    } else {
        println!("traps: ring 0: wrmsr 0x10 done (no #GP)");
        unexpected(format_args!("WRMSR to the TSC was not refused with #GP"));
        record(
            "wrmsr 0x10",
            0,
            HYPERVISOR,
            "UNEXPECTED: the write was accepted",
        );
    }
}

/// Under shadow paging a flush empties (part of) the hypervisor's shadow tables: the pages the
/// guest touches next fault into the hypervisor once each, and those exits land in the window.
fn shadow_refill_note(exits: u64) {
    if exits > 1 {
        println!(
            "traps: ring 0: (exits after the first: shadow page faults, the hypervisor refilling its shadow tables as the guest touches its pages again; the trace shows them as exit=page-fault)"
        );
    }
}

fn status_name(status: u64) -> &'static str {
    match status {
        SUCCESS => "SUCCESS (0)",
        UNKNOWN_HYPERCALL => "UNKNOWN_HYPERCALL (-1)",
        INVALID_ARGUMENT => "INVALID_ARGUMENT (-2)",
        NOT_PERMITTED => "NOT_PERMITTED (-3)",
        BAD_ADDRESS => "BAD_ADDRESS (-4)",
        _ => "an undocumented status",
    }
}

/// The hypercall error codes, from ring 0.
fn hypercall_errors() {
    let check = |what: &str, result: cpu::HypercallResult, expected: u64| {
        println!("traps: hypercall {} -> {}", what, status_name(result.rax));
        if result.rax != expected {
            unexpected(format_args!(
                "hypercall {} returned {:#x}, expected {}",
                what,
                result.rax,
                status_name(expected)
            ));
        }
    };
    check(
        "99 (no such call)",
        hypercall(99, [0; 4]),
        UNKNOWN_HYPERCALL,
    );
    let buffer = HELLO.as_ptr() as u64;
    check(
        "CONSOLE_WRITE (length 5000, over the 4096 limit)",
        hypercall(CONSOLE_WRITE, [buffer, 5000, 0, 0]),
        INVALID_ARGUMENT,
    );
    check(
        "CONSOLE_WRITE (address 0x7fff00000000, not mapped)",
        hypercall(CONSOLE_WRITE, [UNMAPPED_ADDRESS, 16, 0, 0]),
        BAD_ADDRESS,
    );
    let result = hypercall(CONSOLE_WRITE, [buffer, HELLO.len() as u64, 0, 0]);
    println!(
        "traps: hypercall CONSOLE_WRITE (\"hello through a hypercall\\n\") -> {}, rbx={}",
        status_name(result.rax),
        result.rbx
    );
    if result.rax != SUCCESS || result.rbx != HELLO.len() as u64 {
        unexpected(format_args!(
            "CONSOLE_WRITE returned rax={:#x} rbx={}, expected 0 and {}",
            result.rax,
            result.rbx,
            HELLO.len()
        ));
    }
}

fn ring3_part() {
    println!(
        "traps: ring 3: entering ring 3 with iretq (cs={:#x} ss={:#x} rflags=0x2: IOPL 0, interrupts off)",
        cpu::USER_CODE,
        cpu::USER_DATA
    );
    cpu::run_user_task();
    let result = USER_RESULT.get();
    println!(
        "traps: ring 3: back in ring 0 through int 0x80 (a DPL-3 gate), rax={:#x}",
        result
    );
    if result != USER_DONE {
        unexpected(format_args!("the ring-3 task ended with rax={result:#x}"));
    }
    let faulted = USER_FAULTED.get();
    for (step, &taken) in faulted.iter().enumerate() {
        let name = user_step_name(step as u64);
        if taken {
            record(
                name,
                3,
                "guest kernel",
                "privileged at CPL 3: the CPU raises #GP inside the guest, no exit",
            );
        } else {
            unexpected(format_args!("ring-3 {name} did not raise #GP"));
            record(name, 3, "UNEXPECTED", "no #GP was raised");
        }
    }
    match USER_CPUID.get() {
        Some(vendor) if vendor == VENDOR.get() => {
            record(
                "cpuid",
                3,
                "hypervisor",
                "CPUID exits at any privilege level",
            );
        }
        Some(_) => {
            unexpected(format_args!(
                "ring-3 CPUID returned another vendor than ring 0"
            ));
            record(
                "cpuid",
                3,
                "hypervisor",
                "UNEXPECTED: another vendor than in ring 0",
            );
        }
        None => {
            unexpected(format_args!("ring-3 CPUID result missing"));
            record("cpuid", 3, "UNEXPECTED", "no result");
        }
    }
    let name = hypercall_name();
    match USER_HYPERCALL.get() {
        Some(NOT_PERMITTED) => record(
            name,
            3,
            "hypervisor",
            "exits at any CPL; refused with NOT_PERMITTED (-3): only the guest kernel may call",
        ),
        Some(other) => {
            unexpected(format_args!(
                "ring-3 hypercall returned {other:#x}, expected NOT_PERMITTED (-3)"
            ));
            record(name, 3, "hypervisor", "UNEXPECTED: not refused");
        }
        None => {
            unexpected(format_args!("ring-3 hypercall result missing"));
            record(name, 3, "UNEXPECTED", "no result");
        }
    }
}

fn summary() -> ! {
    println!("traps: summary");
    // SAFETY: one CPU; the handler no longer runs.
    let rows = unsafe { *SUMMARY.pointer() };
    for row in &rows[..SUMMARY_LENGTH.get()] {
        println!(
            "traps: | {} | ring {} | handled by {} | {} |",
            row.instruction, row.ring, row.handled_by, row.why
        );
    }
    let count = UNEXPECTED.get();
    if count == 0 {
        println!("traps: everything happened as documented");
        exit(0)
    }
    println!("traps: {} UNEXPECTED results", count);
    exit(1)
}
