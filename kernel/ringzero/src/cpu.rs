//! Per-CPU descriptor tables (GDT, TSS with its interrupt stacks) and the shared IDT: its
//! exception handlers report and power off; its interrupt handlers (local APIC tick, kick,
//! spurious, anything else) count and acknowledge.
//!
//! The hypervisor runs with RFLAGS.IF = 0 everywhere except inside [`take_pending_interrupts`]
//! and [`idle_until_interrupt`], so an interrupt handler never runs in the middle of other
//! hypervisor code (and may therefore not take any lock that code holds: none does).
//!
//! See: SDM Vol 3A 7.2 "Task management data structures" (64-bit TSS, IST), 6.14
//! "Exception and interrupt handling in 64-bit mode".

use crate::{apic, console, memory, power};
use alloc::boxed::Box;
use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
use x86_64::instructions::tables::load_tss;
use x86_64::registers::control::{Cr0, Cr0Flags, Cr2};
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::idt::{InterruptDescriptorTable, InterruptStackFrame, PageFaultErrorCode};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::VirtAddr;

/// IST slot (0-based, as the `x86_64` crate counts) of the double-fault stack.
const DOUBLE_FAULT_IST: u16 = 0;
/// IST slot of the NMI stack.
const NMI_IST: u16 = 1;
/// IST slot of the machine-check stack.
const MACHINE_CHECK_IST: u16 = 2;
/// Size of each interrupt stack.
const IST_STACK_SIZE: usize = 16 * 1024;

/// One CPU's GDT and TSS. Leaked: a CPU's tables live as long as the CPU runs.
struct CpuTables {
    gdt: GlobalDescriptorTable,
    code: SegmentSelector,
    data: SegmentSelector,
    tss: SegmentSelector,
}

fn new_stack() -> VirtAddr {
    let stack: &'static mut [u8] = Box::leak(alloc::vec![0u8; IST_STACK_SIZE].into_boxed_slice());
    // Stacks grow down: the IST entry holds the end, 16-byte aligned.
    VirtAddr::from_ptr(stack.as_ptr_range().end).align_down(16u64)
}

/// Loads this CPU's own GDT and TSS, then the shared IDT. Needs the heap.
pub fn init_this_cpu() {
    let tss: &'static mut TaskStateSegment = Box::leak(Box::new(TaskStateSegment::new()));
    tss.interrupt_stack_table[usize::from(DOUBLE_FAULT_IST)] = new_stack();
    tss.interrupt_stack_table[usize::from(NMI_IST)] = new_stack();
    tss.interrupt_stack_table[usize::from(MACHINE_CHECK_IST)] = new_stack();
    let tss: &'static TaskStateSegment = tss;

    let mut gdt = GlobalDescriptorTable::new();
    let code = gdt.append(Descriptor::kernel_code_segment());
    let data = gdt.append(Descriptor::kernel_data_segment());
    let tss_selector = gdt.append(Descriptor::tss_segment(tss));
    let tables: &'static CpuTables = Box::leak(Box::new(CpuTables {
        gdt,
        code,
        data,
        tss: tss_selector,
    }));

    tables.gdt.load();
    // SAFETY: the selectors index the GDT just loaded, whose descriptors are a flat 64-bit
    // code segment, a flat data segment and an available TSS that lives forever (leaked).
    unsafe {
        CS::set_reg(tables.code);
        SS::set_reg(tables.data);
        DS::set_reg(tables.data);
        ES::set_reg(tables.data);
        load_tss(tables.tss);
    }
    IDT.load();
    normalize_cr0();
    enable_xsave();
}

/// Logs what `enable_xsave` gave this CPU and what guests may use (a fixed line:
/// `xsave: host XCR0 0x3, guests may enable XCR0 0x7, area 832 bytes` or `xsave: none, ...`).
pub fn report_xsave() {
    match (
        ringzero_x86::hw::xcr0(),
        ringzero_vmm::xsave::host_support(&ringzero_x86::hw::cpuid_words),
    ) {
        (Some(xcr0), Some(support)) => log::info!(
            "xsave: host XCR0 {xcr0:#x}, guests may enable XCR0 {:#x}, area {} bytes",
            support.allowed_xcr0,
            support.area_size
        ),
        _ => log::info!("xsave: none (guests get x87/SSE switched with FXSAVE and no XSAVE)"),
    }
}

/// Turns on CR4.OSXSAVE when the CPU has XSAVE, with XCR0 = x87|SSE (the hypervisor itself,
/// built soft-float, uses no extended state): the vCPUs then switch their guests' x87/SSE/AVX
/// registers and XCR0 with XSAVE/XRSTOR/XSETBV (`ringzero_x86::extended_state`), and guests are
/// shown XSAVE (`ringzero_vmm::xsave`). Every CPU does it (boot CPU and APs) before any vCPU
/// is created on it, so the VMX host CR4 read at VMCS set-up has the bit. Without XSAVE the
/// vCPUs fall back to FXSAVE. See: SDM Vol 1 13.3 "Enabling the XSAVE Feature Set".
fn enable_xsave() {
    const LEAF1_ECX_XSAVE: u32 = 1 << 26;
    if ringzero_x86::hw::cpuid(1, 0).ecx & LEAF1_ECX_XSAVE == 0 {
        return;
    }
    let cr4 = ringzero_x86::hw::read_cr4();
    if cr4 & ringzero_x86::hw::CR4_OSXSAVE == 0 {
        // SAFETY: only OSXSAVE changes (CPUID says the CPU has XSAVE, so the bit is not
        // reserved); it enables instructions, nothing the running code depends on.
        unsafe { ringzero_x86::hw::write_cr4(cr4 | ringzero_x86::hw::CR4_OSXSAVE) };
    }
    if ringzero_x86::hw::xcr0() != Some(ringzero_x86::extended_state::HOST_XCR0) {
        // SAFETY: OSXSAVE is now set; x87|SSE is a valid XCR0 on every CPU with XSAVE (SSE is
        // part of x86-64), and no extended state of the hypervisor's is live.
        unsafe { ringzero_x86::hw::set_xcr0(ringzero_x86::extended_state::HOST_XCR0) };
    }
}

/// Lets the interrupts already pending on this CPU in, runs their handlers (which acknowledge
/// them), and closes again: for the scheduler, right after a guest exit caused by an external
/// interrupt (the hypervisor itself runs with interrupts off).
pub fn take_pending_interrupts() {
    ringzero_x86::hw::take_pending_interrupts();
}

/// Halts this CPU until an interrupt (a tick, a kick) arrives and has been handled; interrupts
/// are off again on return. For an idle CPU.
pub fn idle_until_interrupt() {
    ringzero_x86::hw::idle_until_interrupt();
}

/// Masks every line of the legacy 8259 PICs. The firmware leaves the PIT's IRQ 0 unmasked;
/// the hypervisor takes no interrupts through the PIC, and a request left pending there would
/// make every guest with interrupts enabled exit over and over (external-interrupt exiting).
/// See: Intel 8259A datasheet, OCW1 (interrupt mask register at ports 0x21 / 0xA1).
pub fn mask_legacy_pic() {
    // SAFETY: ports 0x21 and 0xA1 are the PICs' mask registers; masking all lines has no
    // other effect, and nothing in the hypervisor uses the PIC.
    unsafe {
        ringzero_x86::hw::outb(0x21, 0xFF);
        ringzero_x86::hw::outb(0xA1, 0xFF);
    }
}

/// Firmware may leave the caches off (CR0.CD/NW, seen with the Bochs BIOS) and x87 errors in
/// the legacy PC style (CR0.NE = 0). Turn the caches on and use native x87 error reporting,
/// which VMX also requires (IA32_VMX_CR0_FIXED0 has NE). See: SDM Vol 3A 2.5 "Control
/// registers", 12.5.3 "Preventing caching"; Vol 3D A.7.
fn normalize_cr0() {
    let cr0 = Cr0::read();
    let wanted =
        (cr0 | Cr0Flags::NUMERIC_ERROR) - Cr0Flags::CACHE_DISABLE - Cr0Flags::NOT_WRITE_THROUGH;
    if wanted != cr0 {
        // SAFETY: only CD, NW and NE change; paging, protection and write-protect stay as the
        // bootloader set them. Enabling caches on coherent RAM needs no flush.
        unsafe { Cr0::write(wanted) };
        log::info!(
            "cpu: CR0 {:#x} -> {:#x} (caches on, native x87 errors)",
            cr0.bits(),
            wanted.bits()
        );
    }
}

static IDT: spin::Lazy<InterruptDescriptorTable> = spin::Lazy::new(|| {
    let mut idt = InterruptDescriptorTable::new();
    idt.divide_error.set_handler_fn(divide_error);
    idt.debug.set_handler_fn(debug);
    idt.breakpoint.set_handler_fn(breakpoint);
    idt.overflow.set_handler_fn(overflow);
    idt.bound_range_exceeded.set_handler_fn(bound_range);
    idt.invalid_opcode.set_handler_fn(invalid_opcode);
    idt.device_not_available
        .set_handler_fn(device_not_available);
    idt.invalid_tss.set_handler_fn(invalid_tss);
    idt.segment_not_present.set_handler_fn(segment_not_present);
    idt.stack_segment_fault.set_handler_fn(stack_segment_fault);
    idt.general_protection_fault
        .set_handler_fn(general_protection);
    idt.page_fault.set_handler_fn(page_fault);
    idt.x87_floating_point.set_handler_fn(x87_floating_point);
    idt.alignment_check.set_handler_fn(alignment_check);
    idt.simd_floating_point.set_handler_fn(simd_floating_point);
    // Interrupts from the local APIC. See: SDM Vol 3A 6.2 (vectors 32..255 are free for
    // external interrupts), 11.9 (the spurious vector is not acknowledged).
    idt[apic::TICK_VECTOR].set_handler_fn(tick_interrupt);
    idt[apic::KICK_VECTOR].set_handler_fn(kick_interrupt);
    for vector in apic::KICK_VECTOR + 1..apic::SPURIOUS_VECTOR {
        idt[vector].set_handler_fn(unexpected_interrupt);
    }
    idt[apic::SPURIOUS_VECTOR].set_handler_fn(spurious_interrupt);
    // SAFETY: the IST indices name stacks that init_this_cpu puts in every CPU's TSS before
    // this IDT is loaded on that CPU.
    unsafe {
        idt.double_fault
            .set_handler_fn(double_fault)
            .set_stack_index(DOUBLE_FAULT_IST);
        idt.non_maskable_interrupt
            .set_handler_fn(non_maskable)
            .set_stack_index(NMI_IST);
        idt.machine_check
            .set_handler_fn(machine_check)
            .set_stack_index(MACHINE_CHECK_IST);
    }
    idt
});

/// How many words of the interrupted stack the report shows.
const STACK_WORDS: usize = 8;

/// Prints everything known about a fatal exception and powers off with the exception status.
fn report_and_power_off(
    vector: u8,
    name: &str,
    error_code: Option<u64>,
    frame: &InterruptStackFrame,
) -> ! {
    console::break_lock_for_fatal_path();
    let rip = frame.instruction_pointer.as_u64();
    let rsp = frame.stack_pointer.as_u64();
    let cr2 = Cr2::read_raw();
    match error_code {
        Some(code) => log::error!(
            "CPU exception {vector} ({name}) error_code={code:#x} rip={rip:#018x} cr2={cr2:#018x} rsp={rsp:#018x}"
        ),
        None => log::error!("CPU exception {vector} ({name}) rip={rip:#018x} cr2={cr2:#018x} rsp={rsp:#018x}"),
    }
    log::error!(
        "  cs={:#x} ss={:#x} rflags={:#x}",
        frame.code_segment.0,
        frame.stack_segment.0,
        frame.cpu_flags.bits()
    );
    for index in 0..STACK_WORDS {
        let address = rsp.wrapping_add((index * 8) as u64);
        match memory::read_kernel_word(address) {
            Some(word) => log::error!("  stack[rsp+{:#04x}] = {word:#018x}", index * 8),
            None => {
                log::error!("  stack[rsp+{:#04x}] not mapped", index * 8);
                break;
            }
        }
    }
    power::power_off(power::ExitStatus::HypervisorException)
}

macro_rules! fatal_handler {
    ($name:ident, $vector:expr, $text:expr) => {
        extern "x86-interrupt" fn $name(frame: InterruptStackFrame) {
            report_and_power_off($vector, $text, None, &frame)
        }
    };
    ($name:ident, $vector:expr, $text:expr, error_code) => {
        extern "x86-interrupt" fn $name(frame: InterruptStackFrame, error_code: u64) {
            report_and_power_off($vector, $text, Some(error_code), &frame)
        }
    };
}

fatal_handler!(divide_error, 0, "#DE divide error");
fatal_handler!(debug, 1, "#DB debug");
fatal_handler!(breakpoint, 3, "#BP breakpoint");
fatal_handler!(overflow, 4, "#OF overflow");
fatal_handler!(bound_range, 5, "#BR bound range exceeded");
fatal_handler!(invalid_opcode, 6, "#UD invalid opcode");
fatal_handler!(device_not_available, 7, "#NM device not available");
fatal_handler!(invalid_tss, 10, "#TS invalid TSS", error_code);
fatal_handler!(
    segment_not_present,
    11,
    "#NP segment not present",
    error_code
);
fatal_handler!(
    stack_segment_fault,
    12,
    "#SS stack-segment fault",
    error_code
);
fatal_handler!(general_protection, 13, "#GP general protection", error_code);
fatal_handler!(x87_floating_point, 16, "#MF x87 floating point");
fatal_handler!(alignment_check, 17, "#AC alignment check", error_code);
fatal_handler!(simd_floating_point, 19, "#XM SIMD floating point");
fatal_handler!(non_maskable, 2, "NMI");

extern "x86-interrupt" fn tick_interrupt(_frame: InterruptStackFrame) {
    apic::handle_tick();
}

extern "x86-interrupt" fn kick_interrupt(_frame: InterruptStackFrame) {
    apic::handle_kick();
}

extern "x86-interrupt" fn unexpected_interrupt(_frame: InterruptStackFrame) {
    apic::handle_unexpected();
}

/// A spurious interrupt sets no in-service bit: no EOI. See: SDM Vol 3A 11.9.
extern "x86-interrupt" fn spurious_interrupt(_frame: InterruptStackFrame) {}

extern "x86-interrupt" fn page_fault(frame: InterruptStackFrame, error_code: PageFaultErrorCode) {
    report_and_power_off(14, "#PF page fault", Some(error_code.bits()), &frame)
}

extern "x86-interrupt" fn double_fault(frame: InterruptStackFrame, error_code: u64) -> ! {
    report_and_power_off(8, "#DF double fault", Some(error_code), &frame)
}

extern "x86-interrupt" fn machine_check(frame: InterruptStackFrame) -> ! {
    report_and_power_off(18, "#MC machine check", None, &frame)
}
