//! ringzero: a type-1 hypervisor. This is the kernel's entry point and composition root.
//!
//! The boot flow (each step logs what it found):
//! 1. serial console and logging;
//! 2. host memory: physical window, heap, frame allocator (from the bootloader's map);
//! 3. this CPU's GDT/TSS and the IDT (exceptions report and power off), the TSC calibrated
//!    against the PIT, this CPU's local APIC (its timer measured against the TSC);
//! 4. host ACPI tables: the CPUs (local APIC IDs), power-off registers; the physical disk
//!    (virtio-blk on the host PCI bus, `disk`), read but never written at boot; the physical
//!    NIC (virtio-net, `net`), set up to receive but never transmitting at boot;
//! 5. the boot manifest from the ramdisk (packed by `boot/`);
//! 6. virtualization: detect VT-x or SVM, print the summary, smoke-test on/off; then start
//!    the other CPUs (`smp`), each preparing virtualization for itself and idling, and check
//!    the boot CPU's tick and a kick to each;
//! 7. run the manifest's VMs, concurrently on every CPU that can virtualize (`scheduler`,
//!    `guests`);
//! 8. power off with a status (see `power`).
#![no_std]
#![no_main]
#![feature(abi_x86_interrupt)]

extern crate alloc;

mod apic;
mod console;
mod console_input;
mod cpu;
mod disk;
mod guests;
mod memory;
mod net;
mod network;
mod pci;
mod platform;
mod power;
mod scheduler;
mod smp;
mod time;
mod vdisks;
mod virt;
mod virtio_hal;

use bootloader_api::config::Mapping;
use bootloader_api::{entry_point, BootInfo, BootloaderConfig};
use power::ExitStatus;
use ringzero_loader::manifest::{Manifest, TestHook};
use virt::Extension;

/// The extension found on the boot CPU, for the other CPUs to prepare themselves with.
static EXTENSION: spin::Once<Extension> = spin::Once::new();

/// What the hypervisor asks of the bootloader: all of physical memory mapped (the "physical
/// window") and a generous boot stack.
pub static BOOTLOADER_CONFIG: BootloaderConfig = {
    let mut config = BootloaderConfig::new_default();
    config.mappings.physical_memory = Some(Mapping::Dynamic);
    config.kernel_stack_size = 256 * 1024;
    config
};

entry_point!(kernel_main, config = &BOOTLOADER_CONFIG);

fn kernel_main(boot_info: &'static mut BootInfo) -> ! {
    // Step 1.
    console::init();
    // The load offset turns a code address into one of the kernel ELF (addr2line, and
    // scripts/run-qemu.sh after a triple fault): ELF address = address - offset.
    log::info!(
        "ringzero {} starting (kernel image offset {:#x})",
        env!("CARGO_PKG_VERSION"),
        boot_info.kernel_image_offset
    );

    // Step 2.
    let Some(physical_memory_offset) = boot_info.physical_memory_offset.into_option() else {
        log::error!("the bootloader did not map physical memory");
        power::power_off(ExitStatus::PlatformSetupFailed);
    };
    let Some(summary) = memory::init(physical_memory_offset, &boot_info.memory_regions) else {
        log::error!("no usable memory region is large enough for the kernel heap");
        power::power_off(ExitStatus::PlatformSetupFailed);
    };
    log::info!(
        "memory: {} MiB usable, heap {} MiB at {:#x}, {} free frames",
        summary.usable_bytes >> 20,
        summary.heap_size >> 20,
        summary.heap_start.0,
        summary.free_frames
    );

    // Step 3.
    cpu::init_this_cpu();
    cpu::mask_legacy_pic();
    log::info!("cpu: GDT, TSS (IST stacks for #DF, NMI, #MC) and IDT loaded");
    cpu::report_xsave();
    time::calibrate();
    time::read_wall_clock();
    if let Err(error) = apic::init_this_cpu() {
        log::warn!("apic: {error}; no timer, no other CPUs");
    }

    // Step 4.
    let host = platform::discover(boot_info.rsdp_addr.into_option());
    match host.power_off {
        Some(power_off) => {
            log::info!(
                "acpi: {} CPU(s), local APIC IDs {:?}; S5 via PM1a_CNT port {:#x} SLP_TYP {}",
                host.cpu_count,
                host.cpu_apic_ids,
                power_off.pm1a_control_port,
                power_off.sleep_type.a
            );
            power::set_acpi_power_off(power_off);
        }
        None => log::info!(
            "acpi: {} CPU(s), local APIC IDs {:?}; no ACPI power-off",
            host.cpu_count,
            host.cpu_apic_ids
        ),
    }

    // Before the other CPUs start: the disk's and the NIC's set-up map their registers.
    disk::init();
    net::init();

    // Step 5.
    let manifest = match load_manifest(boot_info) {
        Ok(manifest) => manifest,
        Err(message) => {
            log::error!("boot manifest: {message}");
            power::power_off(ExitStatus::BadManifest);
        }
    };
    if manifest.test_hook == TestHook::PageFault {
        trigger_page_fault();
    }
    if manifest.test_hook == TestHook::DoubleFree {
        memory::free_twice_for_test();
    }
    if manifest.test_hook == TestHook::TripleFault {
        triple_fault_for_test();
    }
    if manifest.test_hook == TestHook::DiskWrite {
        disk::exercise_for_test();
    }
    if manifest.test_hook == TestHook::NetProbe {
        net::probe_for_test();
    }

    // Step 6.
    let extension = match virt::detect(host.cpu_count) {
        Ok(extension) => extension,
        Err(refusal) => {
            log::error!("{refusal}");
            crate::console::print_line(format_args!("ringzero: cannot virtualize: {refusal}"));
            power::power_off(ExitStatus::CannotVirtualize);
        }
    };
    if let Err(error) = virt::smoke_test(&extension) {
        log::error!("virtualization smoke test failed: {error}");
        power::power_off(ExitStatus::CannotVirtualize);
    }
    let extension = *EXTENSION.call_once(|| extension);
    let online = smp::start_application_processors(application_processor_idle);
    check_interrupts(online);

    // Step 7.
    let own = guests::HypervisorMemory {
        kernel_start: boot_info.kernel_addr,
        kernel_length: boot_info.kernel_len,
        heap_start: summary.heap_start,
        heap_size: summary.heap_size,
    };
    let all_passed = scheduler::run_all(&manifest, extension, &own);
    for line in network::statistics() {
        log::info!("{line}");
    }
    for (cpu, used, size) in smp::stack_use() {
        log::info!("smp: cpu{cpu} stack: at most {used} of {size} bytes in use");
    }

    // Step 8.
    if all_passed {
        log::info!("all guests finished; powering off");
        power::power_off(ExitStatus::Clean)
    } else {
        log::warn!("at least one guest failed (see the ringzero: vm lines); powering off");
        power::power_off(ExitStatus::GuestFailed)
    }
}

/// What each other CPU runs: prepare virtualization for itself (reporting a CPU that cannot),
/// then run the vCPUs the scheduler places on it, sleeping between ticks and kicks.
fn application_processor_idle(cpu_index: usize) -> ! {
    match EXTENSION.get().map(virt::prepare_this_cpu) {
        Some(Ok(())) => {
            log::info!("virt: cpu{cpu_index} can virtualize; waiting for vCPUs");
            scheduler::application_processor(cpu_index)
        }
        Some(Err(refusal)) => log::warn!("virt: cpu{cpu_index} cannot virtualize: {refusal}"),
        None => log::warn!("virt: cpu{cpu_index} started before detection; idle"),
    }
    loop {
        cpu::idle_until_interrupt();
    }
}

/// Checks the interrupt paths once: the boot CPU's APIC timer tick (then stopped again, so no
/// timer interrupt is pending when a guest runs) and a kick IPI to every other CPU.
fn check_interrupts(online: usize) {
    if !apic::available() {
        return;
    }
    const TICK_HZ: u32 = 1000;
    const TICKS: u64 = 10;
    let (ticks, micros) = apic::check_tick(TICK_HZ, TICKS);
    let count = apic::timer_hz() / u64::from(TICK_HZ);
    if ticks >= TICKS {
        log::info!("apic: tick at {TICK_HZ} Hz (timer count {count}) works: {ticks} ticks in {micros} us; stopped until the scheduler needs it");
    } else {
        log::warn!("apic: tick at {TICK_HZ} Hz (timer count {count}): only {ticks} of {TICKS} ticks in {micros} us");
    }
    if online > 1 {
        let missing = smp::check_kicks();
        if missing == 0 {
            log::info!(
                "smp: every other CPU woke for a kick (vector {:#x})",
                apic::KICK_VECTOR
            );
        }
        // A CPU that took its kick is in its idle loop, so it has prepared virtualization.
        let ready = (0..online)
            .filter(|&cpu| virt::cpu_can_virtualize(cpu))
            .count();
        log::info!("virt: {ready} of {online} CPUs can virtualize");
    }
    let unexpected = apic::unexpected_count();
    if unexpected != 0 {
        log::warn!("apic: {unexpected} interrupt(s) on unexpected vectors (acknowledged, ignored)");
    }
}

fn load_manifest(boot_info: &BootInfo) -> Result<Manifest<'static>, alloc::string::String> {
    let Some(address) = boot_info.ramdisk_addr.into_option() else {
        return Err(
            "no ramdisk: boot/ always packs one; was the image built by scripts/run-qemu.sh?"
                .into(),
        );
    };
    // SAFETY: the bootloader loaded the ramdisk at this address, mapped it, and reports its
    // length; nothing else writes it.
    let bytes = unsafe {
        core::slice::from_raw_parts(address as *const u8, boot_info.ramdisk_len as usize)
    };
    Manifest::decode(bytes).map_err(|error| alloc::format!("{error}"))
}

/// Test hook: read an address that is never mapped (non-canonical addresses give #GP, so
/// use a canonical one in the unused lower half).
fn trigger_page_fault() {
    const UNMAPPED: u64 = 0x0000_7ead_beef_0000;
    log::warn!(
        "test hook: reading unmapped address {UNMAPPED:#x} to exercise the page-fault report"
    );
    // SAFETY: deliberately invalid: the read faults and the #PF handler powers off; it never
    // returns a value. This runs only when the manifest asks for the page-fault test.
    let value = unsafe { core::ptr::read_volatile(UNMAPPED as *const u64) };
    log::error!("test hook: the read returned {value:#x} instead of faulting");
}

/// Test hook: load an IDT with no entries and raise #UD. The #UD cannot be delivered (#GP),
/// nor can that (#DF), nor that: the CPU shuts down and the machine resets, with no handler of
/// the hypervisor run (the emulator's side reports it, `scripts/run-qemu.sh`).
fn triple_fault_for_test() -> ! {
    use x86_64::instructions::tables::lidt;
    use x86_64::structures::DescriptorTablePointer;
    log::warn!(
        "test hook: loading an empty IDT and raising #UD: the machine must reset (a triple fault)"
    );
    let empty = DescriptorTablePointer {
        limit: 0,
        base: x86_64::VirtAddr::zero(),
    };
    // SAFETY: deliberately fatal: with a zero-limit IDT no exception can be delivered, so the
    // UD2 below triple-faults the CPU. This runs only when the manifest asks for the test.
    unsafe {
        lidt(&empty);
        core::arch::asm!("ud2", options(noreturn));
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    console::break_lock_for_fatal_path();
    log::error!("PANIC: {info}");
    power::power_off(ExitStatus::Panic)
}
