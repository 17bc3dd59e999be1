//! multiboot: a Multiboot v1 kernel (ELF64, with the a.out-kludge fields too). Its 32-bit entry
//! stub (`guest_lib::multiboot_entry!`) switches to long mode; this part prints what the loader
//! handed over: magic, command line, memory map, memory sizes, modules (with each module's first
//! line) and the boot loader name. Exit status 0, or 1 on anything inconsistent (a flag the
//! loader must set missing, an unmapped pointer, a malformed map entry, a module that is not
//! page-aligned or ends before it starts).
#![no_std]
#![no_main]

use guest_lib::fmt::Printable;
use guest_lib::multiboot::{self, info_flags, Info};
use guest_lib::{exit, println};

guest_lib::multiboot_entry!(main);

/// The longest command line, module string or loader name printed.
const STRING_MAX: usize = 1024;
/// The longest first line of a module printed.
const FIRST_LINE_MAX: u32 = 200;
/// More modules than this is an inconsistency.
const MODULES_MAX: u32 = 64;

fn fail(what: core::fmt::Arguments) -> ! {
    println!("multiboot: FAILED: {}", what);
    exit(1)
}

fn main(magic: u32, info_address: u32) -> ! {
    if magic != multiboot::BOOTLOADER_MAGIC {
        fail(format_args!("magic {:#x}", magic));
    }
    println!("multiboot: magic ok");
    let Some(info) = Info::read(u64::from(info_address)) else {
        fail(format_args!(
            "information structure at {:#x} is not mapped",
            info_address
        ))
    };
    for (flag, name) in [
        (info_flags::MEMORY, "mem_lower/mem_upper"),
        (info_flags::CMDLINE, "cmdline"),
        (info_flags::MODULES, "mods"),
        (info_flags::MEMORY_MAP, "mmap"),
        (info_flags::BOOT_LOADER_NAME, "boot_loader_name"),
    ] {
        if !info.has(flag) {
            fail(format_args!(
                "flags {:#x} lack {} (bit {})",
                info.flags,
                name,
                flag.trailing_zeros()
            ));
        }
    }

    let mut buffer = [0u8; STRING_MAX];
    let Some(cmdline) = multiboot::read_c_string(u64::from(info.cmdline), &mut buffer) else {
        fail(format_args!("cmdline at {:#x} unreadable", info.cmdline))
    };
    println!("multiboot: cmdline '{}'", Printable(cmdline));

    let walked = multiboot::for_each_memory_map_entry(&info, |entry| {
        println!(
            "multiboot: mmap base={:#x} length={:#x} type={}",
            entry.base, entry.length, entry.kind
        );
    });
    match walked {
        Ok(0) => fail(format_args!("empty memory map")),
        Ok(_) => {}
        Err(_) => fail(format_args!(
            "malformed memory map at {:#x} length {:#x}",
            info.mmap_addr, info.mmap_length
        )),
    }
    println!(
        "multiboot: mem_lower={} KiB mem_upper={} KiB",
        info.mem_lower, info.mem_upper
    );

    if info.mods_count > MODULES_MAX {
        fail(format_args!("{} modules", info.mods_count));
    }
    for index in 0..info.mods_count {
        let Some(module) = multiboot::module(&info, index) else {
            fail(format_args!(
                "module {} entry at {:#x} unmapped",
                index, info.mods_addr
            ))
        };
        if module.end < module.start || !module.start.is_multiple_of(4096) {
            fail(format_args!(
                "module {} start={:#x} end={:#x} (not page-aligned or ends before it starts)",
                index, module.start, module.end
            ));
        }
        let Some(string) = multiboot::read_c_string(u64::from(module.string), &mut buffer) else {
            fail(format_args!(
                "module {} string at {:#x} unreadable",
                index, module.string
            ))
        };
        guest_lib::print!(
            "multiboot: module '{}' start={:#x} end={:#x} first-line '",
            Printable(string),
            module.start,
            module.end
        );
        let line_end = module.end.min(module.start.saturating_add(FIRST_LINE_MAX));
        for address in module.start..line_end {
            let Some(byte) = multiboot::read_u8(u64::from(address)) else {
                println!();
                fail(format_args!(
                    "module {} byte at {:#x} unmapped",
                    index, address
                ))
            };
            if byte == b'\n' {
                break;
            }
            guest_lib::print!("{}", Printable(&[byte]));
        }
        println!("'");
    }

    let Some(name) = multiboot::read_c_string(u64::from(info.boot_loader_name), &mut buffer) else {
        fail(format_args!(
            "boot loader name at {:#x} unreadable",
            info.boot_loader_name
        ))
    };
    println!("multiboot: boot loader '{}'", Printable(name));
    exit(0)
}
