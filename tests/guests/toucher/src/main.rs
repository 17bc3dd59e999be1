//! toucher: writes one word into every 4 KiB page of a range of its RAM and reads them all
//! back, so the hypervisor has to back that many pages. The command line says how much:
//! `touch=N` (MiB, starting at 4 MiB) or `touch=all` (every page from 4 MiB to the end of RAM).
//! Used by the overcommit tests: VMs promised more memory than the host has finish as long as
//! they touch little, and one that touches everything meets the out-of-host-memory stop.
#![no_std]
#![no_main]

use guest_lib::{exit, println, BootInfo};

guest_lib::flat64_entry!(main);

/// Where touching starts: above the image (1 MiB), stack and boot data.
const START: u64 = 0x40_0000;
const PAGE: u64 = 4096;

/// Parses `touch=N` / `touch=all` from the command line: the end address to touch up to.
fn touch_end(cmdline: &[u8], memory: u64) -> Option<u64> {
    let text = core::str::from_utf8(cmdline).ok()?;
    let value = text
        .split_whitespace()
        .find_map(|word| word.strip_prefix("touch="))?;
    if value == "all" {
        return Some(memory);
    }
    let mebibytes: u64 = value.parse().ok()?;
    Some((START + mebibytes * 1024 * 1024).min(memory))
}

/// The word written into a page: its address, mixed so a wrongly mapped page shows.
fn pattern(address: u64) -> u64 {
    address ^ 0x5A5A_0000_0000_5A5A
}

fn main(boot_info: BootInfo) -> ! {
    let memory = boot_info.memory_size;
    let Some(end) = touch_end(boot_info.cmdline(), memory) else {
        println!("toucher: no touch=N or touch=all on the command line");
        exit(1);
    };
    println!(
        "toucher: memory={} MiB, touching {} MiB from 4 MiB",
        memory >> 20,
        end.saturating_sub(START) >> 20
    );
    let mut pages = 0u64;
    for address in (START..end).step_by(PAGE as usize) {
        // SAFETY: [START, end) is inside RAM (end <= memory), identity-mapped by the boot page
        // tables (4 GiB), and holds nothing of ours (image at 1 MiB is below START).
        unsafe { (address as *mut u64).write_volatile(pattern(address)) };
        pages += 1;
        if pages.is_multiple_of(16384) {
            println!("toucher: {} MiB touched", pages >> 8);
        }
    }
    let wrong = (START..end)
        .step_by(PAGE as usize)
        // SAFETY: as above; reading back what was written.
        .filter(|&address| unsafe { (address as *const u64).read_volatile() } != pattern(address))
        .count();
    if wrong != 0 {
        println!("toucher: {wrong} pages did NOT read back");
        exit(1);
    }
    println!(
        "toucher: touched {} MiB ({pages} pages), all read back",
        pages >> 8
    );
    exit(0);
}
