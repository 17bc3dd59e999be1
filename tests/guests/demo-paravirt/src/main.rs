//! demo-paravirt: a teaching demo. The same work is done twice, and the guest counts what each
//! way costs:
//!
//! (a) trap-and-emulate: the guest behaves as on bare metal and the hypervisor intercepts it:
//!     a 40-byte line through the UART ports (poll LSR + OUT per byte: 2 exits a byte), 20
//!     address-space switches with MOV CR3 (exits under shadow paging), 5 `sti; hlt`;
//! (b) paravirtual: the guest knows it runs on ringzero and asks (docs/hypercalls.md): one
//!     CONSOLE_WRITE for the whole line, 20 SET_ADDRESS_SPACE, 5 YIELD.
//!
//! Around each piece of work it reads EXIT_STATISTICS (exits so far, hypervisor cycles so far)
//! and the TSC, then prints side-by-side tables of the exits, the cycles the hypervisor spent
//! handling them and the elapsed cycles. The EXIT_STATISTICS read before the work is an exit
//! itself, counted by the read after it: 1 exit and its (calibrated) cycles are subtracted.
//!
//! The two address spaces: the boot tables (PML4 at 0x2000) and a copy of them (0x2000-0x7FFF
//! copied into the demo's own frames, pointers rebased): both identity-map 0-4 GiB.
//! Exit status 0 when the hypercalls succeed and the exit counts are at least what the work
//! must cause, else 1. Every line starts with `paravirt:`. Run with paging = "shadow".
#![no_std]
#![no_main]

use core::arch::asm;
use core::cell::UnsafeCell;
use guest_lib::{exit, hw, println, serial, BootInfo};

guest_lib::flat64_entry!(main);

// Hypercall numbers (docs/hypercalls.md).
const CONSOLE_WRITE: u64 = 1;
const YIELD: u64 = 2;
const SET_ADDRESS_SPACE: u64 = 3;
const EXIT_STATISTICS: u64 = 5;

/// The line printed both ways: exactly 40 bytes, "\n" included.
const LINE: &[u8] = b"paravirt: this line is exactly 40 bytes\n";
const _: () = assert!(LINE.len() == 40);
const SWITCHES: u64 = 20;
const YIELDS: u64 = 5;
/// The boot tables' PML4 (docs/specs/guest-boot.md) and the range they occupy.
const BOOT_PML4: u64 = 0x2000;
const BOOT_TABLES_END: u64 = 0x8000;

// ---- hardware and hypercalls ----------------------------------------------------------------

struct Vendor {
    amd: bool,
}

/// (RAX, RBX, RCX) after one hypercall with RAX = `number`, RBX = `a1`, RCX = `a2`; VMMCALL on
/// AMD, VMCALL on Intel.
fn hypercall(vendor: &Vendor, number: u64, a1: u64, a2: u64) -> (u64, u64, u64) {
    let (rax, rbx, rcx): (u64, u64, u64);
    // SAFETY: the hypercall may read guest memory (CONSOLE_WRITE) or switch to an address space
    // that maps everything identity like the current one (SET_ADDRESS_SPACE); it changes only the
    // registers declared. RBX is reserved by LLVM: swapped with a scratch register.
    unsafe {
        if vendor.amd {
            asm!("xchg {b}, rbx", "vmmcall", "xchg {b}, rbx",
                 b = inout(reg) a1 => rbx, inout("rax") number => rax, inout("rcx") a2 => rcx,
                 options(nostack));
        } else {
            asm!("xchg {b}, rbx", "vmcall", "xchg {b}, rbx",
                 b = inout(reg) a1 => rbx, inout("rax") number => rax, inout("rcx") a2 => rcx,
                 options(nostack));
        }
    }
    (rax, rbx, rcx)
}

fn rdtsc() -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: RDTSC only reads the time-stamp counter (not intercepted by ringzero).
    unsafe {
        asm!("rdtsc", out("eax") low, out("edx") high, options(nomem, nostack, preserves_flags))
    };
    (u64::from(high) << 32) | u64::from(low)
}

fn read_cr3() -> u64 {
    let value: u64;
    // SAFETY: reading CR3 has no side effects (CPL 0).
    unsafe { asm!("mov {}, cr3", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

/// MOV CR3. See: SDM Vol 3A 4.10.4.1.
///
/// # Safety
/// `pml4` must identity-map this program's code, data and stack.
unsafe fn write_cr3(pml4: u64) {
    // SAFETY: the caller's contract. No `nomem`: memory accesses must not move across it.
    unsafe { asm!("mov cr3, {}", in(reg) pml4, options(nostack, preserves_flags)) };
}

// ---- the second address space ---------------------------------------------------------------

#[repr(C, align(4096))]
struct Tables([[u64; 512]; 6]);

struct TablesCell(UnsafeCell<Tables>);
// SAFETY: one CPU, no interrupts; written once before use.
unsafe impl Sync for TablesCell {}
static COPY: TablesCell = TablesCell(UnsafeCell::new(Tables([[0; 512]; 6])));

/// Copies the boot tables (0x2000-0x7FFF) into COPY and rebases every table pointer that points
/// into them, so that COPY is a second, independent identity map. Returns its PML4.
fn copy_boot_tables() -> u64 {
    let copy = COPY.0.get();
    let base = copy as u64;
    // SAFETY: the boot tables are mapped (identity) and 6 pages long; COPY is ours and not in
    // use; the two do not overlap (COPY is in the image's .bss above 1 MiB).
    unsafe {
        core::ptr::copy_nonoverlapping(BOOT_PML4 as *const Tables, copy, 1);
        // Only the PML4 and the PDPT hold table pointers; the directories map 2 MiB pages.
        for table in 0..2 {
            for entry in (*copy).0[table].iter_mut() {
                let address = *entry & 0x000F_FFFF_FFFF_F000;
                if *entry & 1 != 0 && (BOOT_PML4..BOOT_TABLES_END).contains(&address) {
                    *entry = (*entry & !0x000F_FFFF_FFFF_F000) | (address - BOOT_PML4 + base);
                }
            }
        }
    }
    base
}

// ---- measuring --------------------------------------------------------------------------------

/// What one piece of work cost.
#[derive(Clone, Copy, Default)]
struct Cost {
    exits: u64,
    hypervisor_cycles: u64,
    elapsed_cycles: u64,
}

impl core::ops::Add for Cost {
    type Output = Cost;
    fn add(self, other: Cost) -> Cost {
        Cost {
            exits: self.exits + other.exits,
            hypervisor_cycles: self.hypervisor_cycles + other.hypervisor_cycles,
            elapsed_cycles: self.elapsed_cycles + other.elapsed_cycles,
        }
    }
}

struct Meter<'a> {
    vendor: &'a Vendor,
    /// Hypervisor cycles of one EXIT_STATISTICS exit.
    statistics_cycles: u64,
}

impl Meter<'_> {
    /// (exits, hypervisor cycles) so far, as the hypervisor counted them before this call.
    fn statistics(&self) -> (u64, u64) {
        let (_, exits, cycles) = hypercall(self.vendor, EXIT_STATISTICS, 0, 0);
        (exits, cycles)
    }

    /// Calibrates the cost of one EXIT_STATISTICS exit: the smallest of a few back-to-back pairs.
    fn calibrate(&mut self) {
        let mut smallest = u64::MAX;
        for _ in 0..5 {
            let (_, before) = self.statistics();
            let (_, after) = self.statistics();
            smallest = smallest.min(after.wrapping_sub(before));
        }
        self.statistics_cycles = smallest;
    }

    fn measure(&self, work: &mut dyn FnMut()) -> Cost {
        let (exits_before, cycles_before) = self.statistics();
        let start = rdtsc();
        work();
        let end = rdtsc();
        let (exits_after, cycles_after) = self.statistics();
        Cost {
            exits: exits_after.wrapping_sub(exits_before).saturating_sub(1),
            hypervisor_cycles: cycles_after
                .wrapping_sub(cycles_before)
                .saturating_sub(self.statistics_cycles),
            elapsed_cycles: end.wrapping_sub(start),
        }
    }
}

// ---- the demo ---------------------------------------------------------------------------------

static mut FAILURES: u32 = 0;

fn expect(passed: bool, detail: core::fmt::Arguments) {
    if !passed {
        println!("paravirt: UNEXPECTED: {}", detail);
        // SAFETY: one CPU, no interrupt handlers.
        unsafe { FAILURES += 1 };
    }
}

fn main(_boot_info: BootInfo) -> ! {
    println!("paravirt: the same work two ways: trapped by the hypervisor, or asked of it with hypercalls");
    let leaf0 = hw::cpuid(0, 0);
    let mut vendor_bytes = [0u8; 12];
    for (chunk, word) in vendor_bytes
        .chunks_mut(4)
        .zip([leaf0.ebx, leaf0.edx, leaf0.ecx])
    {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    let vendor = match &vendor_bytes {
        b"AuthenticAMD" => Vendor { amd: true },
        b"GenuineIntel" => Vendor { amd: false },
        other => {
            println!(
                "paravirt: UNEXPECTED: CPU vendor '{}': no hypercall instruction",
                guest_lib::fmt::Printable(other)
            );
            exit(1)
        }
    };
    let instruction = if vendor.amd { "vmmcall" } else { "vmcall" };
    println!(
        "paravirt: vendor '{}': hypercalls use {}",
        guest_lib::fmt::Printable(&vendor_bytes),
        instruction
    );

    let space_a = read_cr3();
    let space_b = copy_boot_tables();
    println!(
        "paravirt: two address spaces: A = boot tables at {:#x}, B = their copy at {:#x}",
        space_a, space_b
    );
    // SET_ADDRESS_SPACE really switches: B, read back, then A again (not measured).
    let (status, _, _) = hypercall(&vendor, SET_ADDRESS_SPACE, space_b, 0);
    let now = read_cr3();
    expect(
        status == 0 && now == space_b,
        format_args!("SET_ADDRESS_SPACE B: status {status:#x}, cr3 {now:#x}"),
    );
    let (status, _, _) = hypercall(&vendor, SET_ADDRESS_SPACE, space_a, 0);
    let now = read_cr3();
    expect(
        status == 0 && now == space_a,
        format_args!("SET_ADDRESS_SPACE A: status {status:#x}, cr3 {now:#x}"),
    );

    let mut meter = Meter {
        vendor: &vendor,
        statistics_cycles: 0,
    };
    meter.calibrate();
    println!(
        "paravirt: one EXIT_STATISTICS hypercall costs the hypervisor {} cycles (subtracted below)",
        meter.statistics_cycles
    );

    // (a) trap-and-emulate.
    println!(
        "paravirt: (a) trap-and-emulate: the line through the UART ports, {} MOV CR3, {} sti; hlt",
        SWITCHES, YIELDS
    );
    let trap_console = meter.measure(&mut || serial::write_bytes(LINE));
    let trap_switches = meter.measure(&mut || {
        for index in 0..SWITCHES {
            let target = if index % 2 == 0 { space_b } else { space_a };
            // SAFETY: both spaces identity-map 0-4 GiB.
            unsafe { write_cr3(target) };
        }
    });
    let trap_yields = meter.measure(&mut || {
        for _ in 0..YIELDS {
            hw::sti_hlt();
        }
    });
    let now = read_cr3();
    expect(
        now == space_a,
        format_args!("after the MOV CR3 switches cr3 is {now:#x}, expected {space_a:#x}"),
    );

    // (b) paravirtual.
    println!(
        "paravirt: (b) paravirtual: the line with one CONSOLE_WRITE, {} SET_ADDRESS_SPACE, {} YIELD",
        SWITCHES, YIELDS
    );
    let mut console_result = (0, 0, 0);
    let call_console = meter.measure(&mut || {
        console_result = hypercall(
            &vendor,
            CONSOLE_WRITE,
            LINE.as_ptr() as u64,
            LINE.len() as u64,
        )
    });
    let mut switch_failures = 0;
    let call_switches = meter.measure(&mut || {
        for index in 0..SWITCHES {
            let target = if index % 2 == 0 { space_b } else { space_a };
            if hypercall(&vendor, SET_ADDRESS_SPACE, target, 0).0 != 0 {
                switch_failures += 1;
            }
        }
    });
    let mut yield_failures = 0;
    let call_yields = meter.measure(&mut || {
        for _ in 0..YIELDS {
            if hypercall(&vendor, YIELD, 0, 0).0 != 0 {
                yield_failures += 1;
            }
        }
    });
    let now = read_cr3();
    expect(
        now == space_a,
        format_args!("after the SET_ADDRESS_SPACE switches cr3 is {now:#x}, expected {space_a:#x}"),
    );
    expect(
        console_result.0 == 0 && console_result.1 == LINE.len() as u64,
        format_args!(
            "CONSOLE_WRITE returned rax={:#x} rbx={}",
            console_result.0, console_result.1
        ),
    );
    expect(
        switch_failures == 0,
        format_args!("{switch_failures} SET_ADDRESS_SPACE calls failed"),
    );
    expect(
        yield_failures == 0,
        format_args!("{yield_failures} YIELD calls failed"),
    );

    // What the work must cost at least, in exits.
    let line_io = serial::io_cost(LINE.len());
    expect(
        trap_console.exits >= line_io,
        format_args!(
            "the UART line caused {} exits, expected >= {line_io}",
            trap_console.exits
        ),
    );
    expect(
        call_console.exits >= 1,
        format_args!("CONSOLE_WRITE caused no exit"),
    );
    expect(
        trap_switches.exits >= SWITCHES,
        format_args!(
            "{} MOV CR3 caused {} exits (shadow paging: expected >= {SWITCHES})",
            SWITCHES, trap_switches.exits
        ),
    );
    expect(
        call_switches.exits >= SWITCHES,
        format_args!(
            "{} SET_ADDRESS_SPACE caused {} exits",
            SWITCHES, call_switches.exits
        ),
    );
    expect(
        trap_yields.exits >= YIELDS,
        format_args!("{} HLT caused {} exits", YIELDS, trap_yields.exits),
    );
    expect(
        call_yields.exits >= YIELDS,
        format_args!("{} YIELD caused {} exits", YIELDS, call_yields.exits),
    );

    let rows = [
        ("console line", trap_console, call_console),
        ("address-space switches", trap_switches, call_switches),
        ("yields", trap_yields, call_yields),
        (
            "total",
            trap_console + trap_switches + trap_yields,
            call_console + call_switches + call_yields,
        ),
    ];
    println!("paravirt: exits and the TSC cycles the hypervisor spent handling them (EXIT_STATISTICS deltas):");
    println!("paravirt: | work | trap-and-emulate exits | hypercall exits | trap cycles | hypercall cycles |");
    for (work, trap, call) in rows {
        println!(
            "paravirt: | {} | {} | {} | {} | {} |",
            work, trap.exits, call.exits, trap.hypervisor_cycles, call.hypervisor_cycles
        );
    }
    println!("paravirt: elapsed TSC cycles as the guest saw them (RDTSC before and after, guest time included):");
    println!("paravirt: | work | trap-and-emulate elapsed | hypercall elapsed |");
    for (work, trap, call) in rows {
        println!(
            "paravirt: | {} | {} | {} |",
            work, trap.elapsed_cycles, call.elapsed_cycles
        );
    }

    // SAFETY: one CPU, no interrupt handlers.
    let failures = unsafe { FAILURES };
    if failures == 0 {
        println!("paravirt: done");
        exit(0)
    }
    println!("paravirt: {} UNEXPECTED results", failures);
    exit(1)
}
