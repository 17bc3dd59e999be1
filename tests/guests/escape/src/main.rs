//! escape: tries to write outside its RAM. First it fills guest-physical 16-24 MiB (where a
//! host's kernel and heap usually sit in HOST memory; in the VM it is only the guest's own RAM)
//! with a marker and checks it reads back; then it writes the marker at the first byte past its
//! RAM. The boot page tables map that address, but the hypervisor maps nothing there, so the
//! write is a nested page fault and the VM must be stopped. If the write returns, the guest
//! says so and exits with status 1.
#![no_std]
#![no_main]

use guest_lib::{exit, println, BootInfo};

guest_lib::flat64_entry!(main);

/// The marker, "RZ-ESCAPE-MARKER", kept in the image with every byte XORed with
/// [`MARKER_MASK`] and unmasked at run time: the hypervisor copies the image through its own
/// heap while loading it, and its check for the marker must only ever find what the guest
/// wrote, not the image's bytes.
const MARKER_MASKED: [u8; 16] = mask(*b"RZ-ESCAPE-MARKER");
const MARKER_MASK: u8 = 0xA5;
const MARKER_LENGTH: usize = 16;

const fn mask(mut bytes: [u8; 16]) -> [u8; 16] {
    let mut index = 0;
    while index < bytes.len() {
        bytes[index] ^= MARKER_MASK;
        index += 1;
    }
    bytes
}
const FILL_START: u64 = 0x100_0000;
const FILL_END: u64 = 0x180_0000;
/// The boot page tables identity-map [0, 4 GiB).
const MAPPED_END: u64 = 0x1_0000_0000;

/// The marker as two little-endian words, written with 8-byte volatile stores.
fn marker_words() -> [u64; 2] {
    let mut low = [0u8; 8];
    let mut high = [0u8; 8];
    for index in 0..8 {
        // Volatile: the compiler must not fold the unmasking back into a constant.
        // SAFETY: both indices are inside the 16-byte array.
        let masked = |at: usize| unsafe { core::ptr::read_volatile(&MARKER_MASKED[at]) };
        low[index] = masked(index) ^ MARKER_MASK;
        high[index] = masked(index + 8) ^ MARKER_MASK;
    }
    [u64::from_le_bytes(low), u64::from_le_bytes(high)]
}

/// Writes the marker at `address`.
///
/// # Safety
/// [address, address + 16) must be 8-byte aligned, identity-mapped, and not hold anything this
/// program uses (its image, stack, boot information), or be outside RAM on purpose.
unsafe fn write_marker(address: u64) {
    let [low, high] = marker_words();
    let pointer = address as *mut u64;
    // SAFETY: the caller's contract.
    unsafe {
        pointer.write_volatile(low);
        pointer.add(1).write_volatile(high);
    }
}

/// Reads 16 bytes at `address` and says whether they are the marker.
///
/// # Safety
/// [address, address + 16) must be 8-byte aligned, identity-mapped RAM.
unsafe fn marker_at(address: u64) -> bool {
    let pointer = address as *const u64;
    // SAFETY: the caller's contract.
    unsafe { [pointer.read_volatile(), pointer.add(1).read_volatile()] == marker_words() }
}

fn main(boot_info: BootInfo) -> ! {
    let memory = boot_info.memory_size;
    println!("escape: memory={:#x}", memory);
    if !boot_info.magic_ok() || memory >= MAPPED_END || !memory.is_multiple_of(16) {
        println!(
            "escape: unusable boot info (magic={:#x} memory={:#x})",
            boot_info.magic, memory
        );
        exit(1);
    }

    if memory >= FILL_END {
        for address in (FILL_START..FILL_END).step_by(MARKER_LENGTH) {
            // SAFETY: 16-24 MiB is RAM (memory >= FILL_END), identity-mapped, and holds nothing
            // of ours (image at 1 MiB, stack below 512 KiB, boot info at 0x8000).
            unsafe { write_marker(address) };
        }
        println!("escape: wrote the marker over 16-24 MiB (own RAM)");
        // SAFETY: as above; reading back what was written.
        let intact = (FILL_START..FILL_END)
            .step_by(MARKER_LENGTH)
            .all(|address| unsafe { marker_at(address) });
        if !intact {
            println!("escape: the marker did NOT read back from 16-24 MiB");
            exit(1);
        }
        println!("escape: the marker reads back from 16-24 MiB");
    } else {
        println!("escape: memory below 24 MiB, not writing 16-24 MiB");
    }

    println!("escape: now writing beyond RAM at {:#x}", memory);
    // SAFETY: deliberately outside RAM (the point of this guest); the address is identity-mapped
    // by the boot page tables (memory < 4 GiB) and 16-byte aligned. Under ringzero the VM stops
    // here; nothing of this program lives there.
    unsafe { write_marker(memory) };
    println!("escape: write beyond RAM was NOT stopped");
    exit(1)
}
