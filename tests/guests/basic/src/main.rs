//! basic: the first guest. It checks what ringzero promises a guest (CPUID leaves, the UART
//! scratch register, all-ones for unowned ports, the readable MSRs, HLT with interrupts on)
//! and ends with a report of its own CPUID/IO/MSR/HLT counts that must equal the hypervisor's
//! exit statistics for this VM. Exit status 0 when every check passed, 1 when one failed, 2 when
//! the report's prediction of its own I/O turned out wrong (the UART was not ready at once).
#![no_std]
#![no_main]

use core::fmt::Write;
use guest_lib::fmt::{Printable, StackBuffer};
use guest_lib::{exit, hw, println, serial, BootInfo};

guest_lib::flat64_entry!(main);

/// CPUID.1:ECX bit 31: a hypervisor is present.
const CPUID1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:ECX bit 5: VMX.
const CPUID1_ECX_VMX: u32 = 1 << 5;
/// CPUID.80000001h:ECX bit 2: SVM.
const CPUID80000001_ECX_SVM: u32 = 1 << 2;
const MSR_TSC: u32 = 0x10;
const MSR_APIC_BASE: u32 = 0x1B;
const MSR_EFER: u32 = 0xC000_0080;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EXPECTED_APIC_BASE: u64 = 0xFEE0_0900;
const UNOWNED_PORT: u16 = 0x510;
const SCRATCH_VALUES: [u8; 3] = [0x5A, 0xA5, 0x3C];
const HLT_ROUNDS: u32 = 3;

/// Checks that failed, by name, for the summary.
struct Failures {
    names: [&'static str; 16],
    count: usize,
}

impl Failures {
    /// Prints `basic: check NAME ok (DETAIL)` or `... FAILED (DETAIL)` and records a failure.
    fn check(&mut self, name: &'static str, passed: bool, detail: core::fmt::Arguments) {
        if passed {
            println!("basic: check {} ok ({})", name, detail);
        } else {
            println!("basic: check {} FAILED ({})", name, detail);
            if self.count < self.names.len() {
                self.names[self.count] = name;
            }
            self.count += 1;
        }
    }
}

fn main(boot_info: BootInfo) -> ! {
    let mut failures = Failures {
        names: [""; 16],
        count: 0,
    };
    println!("basic: hello from a flat64 guest");

    // Boot information.
    println!(
        "basic: boot info memory={:#x} cmdline='{}'",
        boot_info.memory_size,
        Printable(boot_info.cmdline())
    );
    failures.check(
        "boot-info-magic",
        boot_info.magic_ok(),
        format_args!("magic={:#x}", boot_info.magic),
    );

    // CPUID.
    let leaf = hw::cpuid(0x4000_0000, 0);
    let mut signature = [0u8; 12];
    signature[0..4].copy_from_slice(&leaf.ebx.to_le_bytes());
    signature[4..8].copy_from_slice(&leaf.ecx.to_le_bytes());
    signature[8..12].copy_from_slice(&leaf.edx.to_le_bytes());
    failures.check(
        "cpuid-signature",
        &signature == b"ringzero-hv\0",
        format_args!("leaf 0x40000000 signature '{}'", Printable(&signature)),
    );
    failures.check(
        "cpuid-max-leaf",
        leaf.eax == 0x4000_0000,
        format_args!("leaf 0x40000000 eax={:#x}", leaf.eax),
    );
    let leaf1 = hw::cpuid(1, 0);
    failures.check(
        "cpuid-hypervisor-bit",
        leaf1.ecx & CPUID1_ECX_HYPERVISOR != 0,
        format_args!("leaf 1 ecx={:#x} bit 31 set", leaf1.ecx),
    );
    failures.check(
        "cpuid-vmx-hidden",
        leaf1.ecx & CPUID1_ECX_VMX == 0,
        format_args!("leaf 1 ecx={:#x} bit 5 clear", leaf1.ecx),
    );
    let extended = hw::cpuid(0x8000_0001, 0);
    failures.check(
        "cpuid-svm-hidden",
        extended.ecx & CPUID80000001_ECX_SVM == 0,
        format_args!("leaf 0x80000001 ecx={:#x} bit 2 clear", extended.ecx),
    );

    // Port I/O: the UART scratch register reads back, an unowned port reads all-ones.
    for value in SCRATCH_VALUES {
        hw::outb(serial::COM1_SCRATCH, value);
        let read = hw::inb(serial::COM1_SCRATCH);
        failures.check(
            "uart-scratch",
            read == value,
            format_args!("wrote {:#04x} read {:#04x}", value, read),
        );
    }
    let unowned = hw::inb(UNOWNED_PORT);
    failures.check(
        "unowned-port",
        unowned == 0xFF,
        format_args!("port {:#x} read {:#04x}", UNOWNED_PORT, unowned),
    );

    // MSRs.
    let tsc_first = hw::rdmsr(MSR_TSC);
    let tsc_second = hw::rdmsr(MSR_TSC);
    failures.check(
        "msr-tsc",
        tsc_second >= tsc_first,
        format_args!("{:#x} then {:#x}", tsc_first, tsc_second),
    );
    let apic_base = hw::rdmsr(MSR_APIC_BASE);
    failures.check(
        "msr-apic-base",
        apic_base == EXPECTED_APIC_BASE,
        format_args!("{:#x}", apic_base),
    );
    let efer = hw::rdmsr(MSR_EFER);
    failures.check(
        "msr-efer",
        efer & (EFER_LME | EFER_LMA) == EFER_LME | EFER_LMA,
        format_args!("{:#x} LME and LMA set", efer),
    );

    // HLT with interrupts on returns.
    for _ in 0..HLT_ROUNDS {
        hw::sti_hlt();
    }
    println!("basic: sti; hlt returned {} times", HLT_ROUNDS);

    if failures.count == 0 {
        println!("basic: all checks passed");
    } else {
        guest_lib::print!("basic: {} checks FAILED:", failures.count);
        for name in &failures.names[..failures.count.min(failures.names.len())] {
            guest_lib::print!(" {}", name);
        }
        println!();
    }

    // The report: the last thing printed; its own I/O is in it.
    let mut storage = [0u8; 128];
    let mut line = StackBuffer::new(&mut storage);
    let predicted_io = format_report(&mut line);
    serial::write_bytes(line.as_bytes());
    serial::write_byte(b'\n');
    let io_before_exit = hw::counts().io;
    let status = if io_before_exit + 1 != predicted_io {
        2
    } else if failures.count != 0 {
        1
    } else {
        0
    };
    exit(status)
}

/// Formats `basic: report cpuid=C io=I msr=M hlt=H` into `line`, where I counts the I/O done so
/// far, the I/O of printing this line and its "\n" (1 IN + 1 OUT per byte), and the exit-port
/// OUT that follows. The length of the line depends on I, so this iterates to the fixed point.
/// Returns I.
fn format_report(line: &mut StackBuffer) -> u64 {
    let now = hw::counts();
    let mut io = now.io;
    for _ in 0..8 {
        line.clear();
        // The buffer is large enough for four u64 numbers and the words.
        let _ = write!(
            line,
            "basic: report cpuid={} io={} msr={} hlt={}",
            now.cpuid, io, now.msr_read, now.hlt
        );
        let total = now.io + serial::io_cost(line.as_bytes().len() + 1) + 1;
        if total == io {
            break;
        }
        io = total;
    }
    io
}
