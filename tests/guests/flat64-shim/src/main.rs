//! flat64-shim: a test helper, not a test guest. It lets plain QEMU (`-kernel`, Multiboot v1)
//! boot a flat64 image before the hypervisor can: QEMU loads the shim and the flat64 image as
//! its first module (`-initrd "basic.bin CMDLINE"`); the shim rebuilds the flat64 entry state of
//! docs/specs/guest-boot.md and jumps to the image:
//! 1. copies the module to 0x100000;
//! 2. writes the flat64 boot info at 0x8000 (magic, memory size from mem_upper, the module
//!    string after its first space as the command line), the GDT at 0x1000 (0x08 64-bit code,
//!    0x10 data) and the 4 GiB identity page tables at 0x2000-0x7FFF;
//! 3. routes the PIT timer (PIC IRQ 0, vector 0x20) to a handler that only acknowledges it, so
//!    that `sti; hlt` returns on real (emulated) hardware as it does under ringzero; this is the
//!    one difference from the protocol (IDTR is the shim's, not {0, 0});
//! 4. sets CR0/CR4/EFER as the protocol says, loads GDTR and CR3, RSP = 0x80000,
//!    RDI = 0x8000, RFLAGS = 0x2, and jumps to 0x100000.
#![no_std]
#![no_main]

use core::arch::{asm, global_asm};
use guest_lib::multiboot::{self, info_flags, Info};
use guest_lib::{exit, hw, println};

guest_lib::multiboot_entry!(main);

const IMAGE_ADDRESS: u64 = 0x10_0000;
/// The shim itself is at 8 MiB: the image must end below it.
const IMAGE_MAX: u64 = 0x70_0000;
const GDT_ADDRESS: u64 = 0x1000;
const PML4_ADDRESS: u64 = 0x2000;
const PDPT_ADDRESS: u64 = 0x3000;
const PD_ADDRESS: u64 = 0x4000;
const BOOT_INFO_ADDRESS: u64 = 0x8000;
const BOOT_INFO_MAGIC: u64 = 0x5249_4E47_5A45_524F;
const CMDLINE_MAX: usize = 3072;
const TIMER_VECTOR: usize = 0x20;

/// The IDT: 16-byte gates for vectors 0..=TIMER_VECTOR; only the timer's is present.
#[repr(C, align(16))]
struct Idt([u64; 2 * (TIMER_VECTOR + 1)]);
static mut IDT: Idt = Idt([0; 2 * (TIMER_VECTOR + 1)]);

// The timer handler: acknowledge at the PIC (EOI), return. See: 8259A datasheet, OCW2.
global_asm!(
    ".pushsection .text.shim_timer_handler, \"ax\"",
    ".global shim_timer_handler",
    "shim_timer_handler:",
    "    push rax",
    "    mov al, 0x20",
    "    out 0x20, al",
    "    pop rax",
    "    iretq",
    ".popsection",
);

extern "C" {
    fn shim_timer_handler();
}

fn fail(what: core::fmt::Arguments) -> ! {
    println!("flat64-shim: FAILED: {}", what);
    exit(1)
}

/// Writes `value` at identity-mapped low-memory `address`.
fn poke_u64(address: u64, value: u64) {
    assert!(address + 8 <= IMAGE_ADDRESS);
    // SAFETY: below 1 MiB, inside the entry stub's identity map; the shim does not live there
    // (it is at 8 MiB, QEMU's Multiboot data is after it).
    unsafe { core::ptr::write_volatile(address as *mut u64, value) };
}

fn main(_magic: u32, info_address: u32) -> ! {
    let Some(info) = Info::read(u64::from(info_address)) else {
        fail(format_args!("no info"))
    };
    if !info.has(info_flags::MEMORY) || !info.has(info_flags::MODULES) || info.mods_count < 1 {
        fail(format_args!(
            "no memory size or no module (flags {:#x})",
            info.flags
        ));
    }
    let Some(module) = multiboot::module(&info, 0) else {
        fail(format_args!("module 0 unmapped"))
    };
    let size = u64::from(module.end.saturating_sub(module.start));
    if size == 0 || size > IMAGE_MAX || u64::from(module.end) > multiboot::MAPPED_END {
        fail(format_args!(
            "module {:#x}-{:#x} unusable",
            module.start, module.end
        ));
    }
    // 1. The image.
    // SAFETY: source [start, end) is the module (mapped, checked above); the destination
    // [1 MiB, 1 MiB + size) is RAM below the shim (size <= 7 MiB) and does not overlap the module,
    // which QEMU puts after the shim.
    unsafe {
        core::ptr::copy(
            module.start as usize as *const u8,
            IMAGE_ADDRESS as *mut u8,
            size as usize,
        )
    };

    // 2. Boot info: the command line is the module string after its first space.
    let memory = (u64::from(info.mem_upper) + 1024) * 1024;
    let mut string = [0u8; CMDLINE_MAX];
    let string = multiboot::read_c_string(u64::from(module.string), &mut string).unwrap_or(&[]);
    let cmdline = match string.iter().position(|&byte| byte == b' ') {
        Some(space) => &string[space + 1..],
        None => &[],
    };
    poke_u64(BOOT_INFO_ADDRESS, BOOT_INFO_MAGIC);
    poke_u64(BOOT_INFO_ADDRESS + 8, memory);
    poke_u64(BOOT_INFO_ADDRESS + 16, cmdline.len() as u64);
    // SAFETY: at most CMDLINE_MAX bytes after the 24-byte header, inside 0x8000-0x8FFF.
    unsafe {
        core::ptr::copy_nonoverlapping(
            cmdline.as_ptr(),
            (BOOT_INFO_ADDRESS + 24) as *mut u8,
            cmdline.len(),
        )
    };
    // GDT: null, 64-bit code, data. See: SDM Vol 3A 3.4.5.
    poke_u64(GDT_ADDRESS, 0);
    poke_u64(GDT_ADDRESS + 8, 0x00AF_9A00_0000_FFFF);
    poke_u64(GDT_ADDRESS + 16, 0x00CF_9200_0000_FFFF);
    // Page tables: 4 GiB identity map with 2 MiB pages (P, RW, PS). See: SDM Vol 3A 5.5.4.
    for index in 0..512 {
        poke_u64(PML4_ADDRESS + 8 * index, 0);
        poke_u64(PDPT_ADDRESS + 8 * index, 0);
    }
    poke_u64(PML4_ADDRESS, PDPT_ADDRESS | 0x3);
    for directory in 0..4 {
        poke_u64(
            PDPT_ADDRESS + 8 * directory,
            (PD_ADDRESS + 0x1000 * directory) | 0x3,
        );
        for index in 0..512 {
            let page = (directory * 512 + index) << 21;
            poke_u64(PD_ADDRESS + 0x1000 * directory + 8 * index, page | 0x83);
        }
    }
    println!(
        "flat64-shim: entering the flat64 image ({} bytes) with memory={:#x} cmdline='{}'",
        size,
        memory,
        guest_lib::fmt::Printable(cmdline)
    );

    // 3. Timer interrupts: PIC 1 to vectors 0x20-0x27 (only IRQ 0 unmasked), PIC 2 all masked.
    // See: 8259A datasheet, ICW1-ICW4.
    for (port, value) in [
        (0x20, 0x11),
        (0xA0, 0x11),
        (0x21, 0x20),
        (0xA1, 0x28),
        (0x21, 0x04),
        (0xA1, 0x02),
        (0x21, 0x01),
        (0xA1, 0x01),
        (0x21, 0xFE),
        (0xA1, 0xFF),
    ] {
        hw::outb(port, value);
    }
    let handler = shim_timer_handler as *const () as u64;
    // Interrupt gate, present, DPL 0, selector 0x08. See: SDM Vol 3A 6.14.1.
    let low = (handler & 0xFFFF) | (0x08 << 16) | (0x8E00 << 32) | ((handler >> 16) & 0xFFFF) << 48;
    let high = handler >> 32;
    // SAFETY: one CPU, interrupts off: nothing else touches the IDT.
    let idt = unsafe { &mut *core::ptr::addr_of_mut!(IDT) };
    idt.0[2 * TIMER_VECTOR] = low;
    idt.0[2 * TIMER_VECTOR + 1] = high;
    let idt_pointer = hw::DescriptorTablePointer {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: idt.0.as_ptr() as u64,
    };
    let gdt_pointer = hw::DescriptorTablePointer {
        limit: 23,
        base: GDT_ADDRESS,
    };

    // 4. The flat64 entry state, then the jump.
    // Fixed registers: RAX, RCX and RDX are overwritten on the way.
    // SAFETY: the GDT and page tables just written keep the shim's code (at 8 MiB, within 4 GiB)
    // mapped and CS/DS selectors meaning the same; the image is in place; nothing returns here.
    unsafe {
        asm!(
            "lidt [rsi]",
            "lgdt [r8]",
            "mov cr3, r9",
            "mov rax, cr0",
            "or rax, r10",
            "mov cr0, rax",
            "mov ecx, 0xC0000080",
            "rdmsr",
            "or eax, 0x800",
            "wrmsr",
            "mov ax, 0x10",
            "mov ds, ax",
            "mov es, ax",
            "mov ss, ax",
            "mov fs, ax",
            "mov gs, ax",
            "mov rsp, 0x80000",
            "mov rdi, 0x8000",
            "push 2",
            "popfq",
            "push 0x08",
            "push 0x100000",
            "retfq",
            in("rsi") &idt_pointer,
            in("r8") &gdt_pointer,
            in("r9") PML4_ADDRESS,
            in("r10") 0x0005_0022u64,
            options(noreturn),
        );
    }
}
