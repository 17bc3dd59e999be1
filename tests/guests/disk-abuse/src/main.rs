//! disk-abuse: a hostile virtio-blk driver. It finds its virtio-blk device (virtio 1.x over PCI,
//! vendor 0x1AF4 device 0x1042) on bus 0 through the configuration ports, brings it up as the
//! spec says (virtio 1.2, 3.1.1), then sends requests a correct driver never would: sectors past
//! the end, descriptors pointing outside RAM, loops, absurd lengths, the wrong direction, indices
//! past the queue. Each must come back refused (an error status, no status at all with the chain
//! consumed, or the device asking for a reset, spec 2.1.2), never OK and never a hang; after each
//! refusal the device must still serve a good request. Good requests around them (write then read
//! back a pattern) must work.
//!
//! Prints `disk-abuse: CASE: refused (...)` or `... FAILED (...)` per case and ends with
//! `disk-abuse: N malformed requests refused, M good requests served` and exit status 0, or
//! status 1 when any case failed. The queue is polled (no interrupts).
//!
//! Memory: the guest has the flat64 identity map of 0-4 GiB; the queue and buffers are at
//! 0x200000 and up. The device's BAR is where the hypervisor put it (the guest assigns 0xC000_0000
//! if it reads 0).
#![no_std]
#![no_main]

use core::ptr::write_volatile;
use guest_lib::{exit, hw, println, BootInfo};

guest_lib::flat64_entry!(main);

const CONFIG_ADDRESS: u16 = 0xCF8;
const CONFIG_DATA: u16 = 0xCFC;

/// Queue size the driver asks for.
const QUEUE_SIZE: u16 = 16;
const DESCRIPTORS: u64 = 0x20_0000;
const AVAIL: u64 = 0x20_1000;
const USED: u64 = 0x20_2000;
/// Request header (16 bytes), status byte and data buffers.
const HEADER: u64 = 0x20_3000;
const STATUS: u64 = 0x20_3100;
const DATA: u64 = 0x20_4000;
/// 4 KiB of data per good request.
const DATA_LENGTH: u32 = 4096;

// Descriptor flags. See: virtio 1.2 2.7.5.
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

// virtio-blk request types and statuses. See: virtio 1.2 5.2.6.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const S_OK: u8 = 0;
const STATUS_UNTOUCHED: u8 = 0xEE;

// Device status bits. See: virtio 1.2 2.1.
const ACKNOWLEDGE: u8 = 1;
const DRIVER: u8 = 2;
const DRIVER_OK: u8 = 4;
const FEATURES_OK: u8 = 8;
const NEEDS_RESET: u8 = 0x40;

/// How many polls of the used ring before a request counts as hung.
const POLLS: u32 = 2_000_000;

fn config_read(device: u8, offset: u8) -> u32 {
    let address = 0x8000_0000 | u32::from(device) << 11 | u32::from(offset & 0xFC);
    hw::outl(CONFIG_ADDRESS, address);
    hw::inl(CONFIG_DATA)
}

fn config_write(device: u8, offset: u8, value: u32) {
    let address = 0x8000_0000 | u32::from(device) << 11 | u32::from(offset & 0xFC);
    hw::outl(CONFIG_ADDRESS, address);
    hw::outl(CONFIG_DATA, value);
}

// Reads are plain MOV loads in inline assembly: the hypervisor emulates MOV forms on device
// registers, and a volatile read may otherwise be folded into another instruction (CMP).
fn read8(address: u64) -> u8 {
    let value: u8;
    // SAFETY: identity-mapped guest memory or device registers; the guest owns the machine.
    unsafe {
        core::arch::asm!("mov {0}, byte ptr [{1}]", out(reg_byte) value, in(reg) address, options(nostack, readonly, preserves_flags))
    };
    value
}
fn read16(address: u64) -> u16 {
    let value: u16;
    // SAFETY: as for read8.
    unsafe {
        core::arch::asm!("mov {0:x}, word ptr [{1}]", out(reg) value, in(reg) address, options(nostack, readonly, preserves_flags))
    };
    value
}
fn read32(address: u64) -> u32 {
    let value: u32;
    // SAFETY: as for read8.
    unsafe {
        core::arch::asm!("mov {0:e}, dword ptr [{1}]", out(reg) value, in(reg) address, options(nostack, readonly, preserves_flags))
    };
    value
}
fn write8(address: u64, value: u8) {
    // SAFETY: as for read8.
    unsafe { write_volatile(address as *mut u8, value) }
}
fn write16(address: u64, value: u16) {
    // SAFETY: as for read8.
    unsafe { write_volatile(address as *mut u16, value) }
}
fn write32(address: u64, value: u32) {
    // SAFETY: as for read8.
    unsafe { write_volatile(address as *mut u32, value) }
}
fn write64(address: u64, value: u64) {
    // SAFETY: as for read8.
    unsafe { write_volatile(address as *mut u64, value) }
}

/// Where the device's structures are, from its capabilities. See: virtio 1.2 4.1.4.
struct Device {
    common: u64,
    notify: u64,
    notify_multiplier: u32,
    device_config: u64,
    /// Queue 0's notify address.
    queue_notify: u64,
    capacity: u64,
    /// The next avail ring index and the used index last seen.
    avail_index: u16,
    used_seen: u16,
}

/// The first function on bus 0 that is a virtio-blk device.
fn find() -> Option<u8> {
    (0u8..32).find(|device| config_read(*device, 0) == 0x1042_1AF4)
}

fn bar_address(slot: u8, bar: u8) -> u64 {
    let offset = 0x10 + 4 * bar;
    let low = config_read(slot, offset);
    let mut address = u64::from(low & !0xF);
    if low & 0x6 == 0x4 {
        address |= u64::from(config_read(slot, offset + 4)) << 32;
    }
    if address == 0 {
        config_write(slot, offset, 0xC000_0000);
        if low & 0x6 == 0x4 {
            config_write(slot, offset + 4, 0);
        }
        address = 0xC000_0000;
    }
    address
}

fn locate(slot: u8) -> Device {
    // Memory space and bus mastering on.
    let command = config_read(slot, 0x04);
    config_write(slot, 0x04, (command & 0xFFFF) | 0x6);
    let mut device = Device {
        common: 0,
        notify: 0,
        notify_multiplier: 0,
        device_config: 0,
        queue_notify: 0,
        capacity: 0,
        avail_index: 0,
        used_seen: 0,
    };
    let mut pointer = (config_read(slot, 0x34) & 0xFC) as u8;
    let mut seen = 0;
    while pointer != 0 && seen < 48 {
        seen += 1;
        let header = config_read(slot, pointer);
        let (id, next, kind) = (header as u8, (header >> 8) as u8, (header >> 24) as u8);
        if id == 0x09 {
            let bar = config_read(slot, pointer + 4) as u8;
            let offset = u64::from(config_read(slot, pointer + 8));
            let base = bar_address(slot, bar) + offset;
            match kind {
                1 => device.common = base,
                2 => {
                    device.notify = base;
                    device.notify_multiplier = config_read(slot, pointer + 16);
                }
                4 => device.device_config = base,
                _ => {}
            }
        }
        pointer = next & 0xFC;
    }
    device
}

impl Device {
    /// Reset and bring-up with VERSION_1 only; queue 0 of QUEUE_SIZE. See: virtio 1.2 3.1.1.
    fn initialize(&mut self) -> bool {
        let common = self.common;
        write8(common + 0x14, 0);
        let mut polls = 0;
        while read8(common + 0x14) != 0 {
            polls += 1;
            if polls > POLLS {
                return false;
            }
        }
        write8(common + 0x14, ACKNOWLEDGE | DRIVER);
        write32(common, 1);
        let high = read32(common + 0x04);
        if high & 1 == 0 {
            println!("disk-abuse: the device does not offer VIRTIO_F_VERSION_1");
            return false;
        }
        write32(common + 0x08, 0);
        write32(common + 0x0C, 0);
        write32(common + 0x08, 1);
        write32(common + 0x0C, 1);
        write8(common + 0x14, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        if read8(common + 0x14) & FEATURES_OK == 0 {
            println!("disk-abuse: FEATURES_OK not kept");
            return false;
        }
        write16(common + 0x16, 0);
        let maximum = read16(common + 0x18);
        if maximum < QUEUE_SIZE {
            println!("disk-abuse: queue 0 has {maximum} entries");
            return false;
        }
        write16(common + 0x18, QUEUE_SIZE);
        // 64-bit fields written as two 32-bit halves, low first, as Linux does.
        for (offset, address) in [(0x20, DESCRIPTORS), (0x28, AVAIL), (0x30, USED)] {
            write32(common + offset, address as u32);
            write32(common + offset + 4, (address >> 32) as u32);
        }
        let notify_offset = read16(common + 0x1E);
        self.queue_notify =
            self.notify + u64::from(notify_offset) * u64::from(self.notify_multiplier);
        for page in [DESCRIPTORS, AVAIL, USED] {
            for word in 0..512 {
                write64(page + word * 8, 0);
            }
        }
        write16(common + 0x1C, 1);
        write8(
            common + 0x14,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        self.avail_index = 0;
        self.used_seen = 0;
        let low = read32(self.device_config);
        let high = read32(self.device_config + 4);
        self.capacity = u64::from(high) << 32 | u64::from(low);
        true
    }

    fn status(&self) -> u8 {
        read8(self.common + 0x14)
    }
}

fn descriptor(index: u16, address: u64, length: u32, flags: u16, next: u16) {
    let at = DESCRIPTORS + u64::from(index) * 16;
    write64(at, address);
    write32(at + 8, length);
    write16(at + 12, flags);
    write16(at + 14, next);
}

fn header(kind: u32, sector: u64) {
    write32(HEADER, kind);
    write32(HEADER + 4, 0);
    write64(HEADER + 8, sector);
}

/// What became of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// The chain came back in the used ring with this status byte (STATUS_UNTOUCHED if the
    /// device wrote none) and used length.
    Done { status: u8, used: u32 },
    /// The device set DEVICE_NEEDS_RESET.
    NeedsReset,
    /// Nothing came back.
    Hung,
}

/// Puts descriptor `head` in the avail ring, notifies queue 0 and polls for the result.
fn submit(device: &mut Device, head: u16) -> Outcome {
    write8(STATUS, STATUS_UNTOUCHED);
    let slot = device.avail_index % QUEUE_SIZE;
    write16(AVAIL + 4 + u64::from(slot) * 2, head);
    device.avail_index = device.avail_index.wrapping_add(1);
    write16(AVAIL + 2, device.avail_index);
    write16(device.queue_notify, 0);
    for poll in 0..POLLS {
        let used = read16(USED + 2);
        if used != device.used_seen {
            let element = USED + 4 + u64::from(device.used_seen % QUEUE_SIZE) * 8;
            let length = read32(element + 4);
            device.used_seen = device.used_seen.wrapping_add(1);
            return Outcome::Done {
                status: read8(STATUS),
                used: length,
            };
        }
        // The status register is device MMIO (an exit each read): look at it now and then.
        if poll % 1024 == 1023 && device.status() & NEEDS_RESET != 0 {
            return Outcome::NeedsReset;
        }
    }
    Outcome::Hung
}

/// A good request: header, data (4 KiB at DATA), status. `write` = OUT.
fn good(device: &mut Device, write: bool, sector: u64) -> Outcome {
    header(if write { T_OUT } else { T_IN }, sector);
    descriptor(0, HEADER, 16, F_NEXT, 1);
    let data_flags = if write { F_NEXT } else { F_NEXT | F_WRITE };
    descriptor(1, DATA, DATA_LENGTH, data_flags, 2);
    descriptor(2, STATUS, 1, F_WRITE, 0);
    submit(device, 0)
}

fn fill_pattern(seed: u8) {
    for index in 0..u64::from(DATA_LENGTH) {
        write8(DATA + index, seed.wrapping_add((index % 251) as u8));
    }
}

fn pattern_matches(seed: u8) -> bool {
    (0..u64::from(DATA_LENGTH))
        .all(|index| read8(DATA + index) == seed.wrapping_add((index % 251) as u8))
}

fn main(_boot_info: BootInfo) -> ! {
    let Some(slot) = find() else {
        println!("disk-abuse: no virtio-blk device (1af4:1042) on PCI bus 0");
        exit(1);
    };
    let mut device = locate(slot);
    if device.common == 0 || device.notify == 0 || device.device_config == 0 {
        println!("disk-abuse: device 00:{slot:02x}.0 lacks the virtio capabilities");
        exit(1);
    }
    if !device.initialize() {
        println!("disk-abuse: the device did not come up");
        exit(1);
    }
    let capacity = device.capacity;
    println!("disk-abuse: virtio-blk at 00:{slot:02x}.0, {capacity} sectors");

    let mut failures = 0u32;
    let mut served = 0u32;
    let mut check_good = |device: &mut Device, label: &str, failures: &mut u32| {
        fill_pattern(0x5A);
        let written = good(device, true, 8);
        for byte in 0..u64::from(DATA_LENGTH) {
            write8(DATA + byte, 0);
        }
        let read = good(device, false, 8);
        let ok = matches!(written, Outcome::Done { status: S_OK, .. })
            && matches!(read, Outcome::Done { status: S_OK, .. })
            && pattern_matches(0x5A);
        if ok {
            served += 2;
        } else {
            *failures += 1;
            println!(
                "disk-abuse: good requests {label}: FAILED (write {written:?}, read {read:?})"
            );
        }
    };
    check_good(&mut device, "at the start", &mut failures);

    // The malformed requests. Each sets up descriptors from index 0 and returns the head.
    type Setup = fn(u64) -> u16;
    let cases: [(&str, Setup); 12] = [
        ("read at the first sector past the end", |capacity| {
            header(T_IN, capacity);
            descriptor(0, HEADER, 16, F_NEXT, 1);
            descriptor(1, DATA, 512, F_NEXT | F_WRITE, 2);
            descriptor(2, STATUS, 1, F_WRITE, 0);
            0
        }),
        ("read straddling the end", |capacity| {
            header(T_IN, capacity - 1);
            descriptor(0, HEADER, 16, F_NEXT, 1);
            descriptor(1, DATA, 1024, F_NEXT | F_WRITE, 2);
            descriptor(2, STATUS, 1, F_WRITE, 0);
            0
        }),
        ("write past the end", |capacity| {
            header(T_OUT, capacity + 100);
            descriptor(0, HEADER, 16, F_NEXT, 1);
            descriptor(1, DATA, 4096, F_NEXT, 2);
            descriptor(2, STATUS, 1, F_WRITE, 0);
            0
        }),
        ("write whose sector + length overflows", |_| {
            header(T_OUT, u64::MAX - 3);
            descriptor(0, HEADER, 16, F_NEXT, 1);
            descriptor(1, DATA, 4096, F_NEXT, 2);
            descriptor(2, STATUS, 1, F_WRITE, 0);
            0
        }),
        ("data buffer outside RAM", |_| {
            header(T_IN, 0);
            descriptor(0, HEADER, 16, F_NEXT, 1);
            descriptor(1, 0x7_0000_0000, 4096, F_NEXT | F_WRITE, 2);
            descriptor(2, STATUS, 1, F_WRITE, 0);
            0
        }),
        ("data buffer wrapping the address space", |_| {
            header(T_IN, 0);
            descriptor(0, HEADER, 16, F_NEXT, 1);
            descriptor(1, u64::MAX - 1023, 4096, F_NEXT | F_WRITE, 2);
            descriptor(2, STATUS, 1, F_WRITE, 0);
            0
        }),
        ("descriptor loop", |_| {
            header(T_IN, 0);
            descriptor(0, HEADER, 16, F_NEXT, 1);
            descriptor(1, DATA, 512, F_NEXT | F_WRITE, 2);
            descriptor(2, DATA + 512, 512, F_NEXT | F_WRITE, 1);
            0
        }),
        ("absurd length", |_| {
            header(T_IN, 0);
            descriptor(0, HEADER, 16, F_NEXT, 1);
            descriptor(1, DATA, 0xFFFF_F000, F_NEXT | F_WRITE, 2);
            descriptor(2, STATUS, 1, F_WRITE, 0);
            0
        }),
        (
            "read into a device-readable buffer (wrong direction)",
            |_| {
                header(T_IN, 0);
                descriptor(0, HEADER, 16, F_NEXT, 1);
                descriptor(1, DATA, 4096, F_NEXT, 2);
                descriptor(2, STATUS, 1, F_WRITE, 0);
                0
            },
        ),
        (
            "device-readable header after a writable buffer (wrong order)",
            |_| {
                header(T_OUT, 0);
                descriptor(0, DATA, 4096, F_NEXT | F_WRITE, 1);
                descriptor(1, HEADER, 16, F_NEXT, 2);
                descriptor(2, STATUS, 1, F_WRITE, 0);
                0
            },
        ),
        ("next index past the queue", |_| {
            header(T_IN, 0);
            descriptor(0, HEADER, 16, F_NEXT, 1);
            descriptor(1, DATA, 512, F_NEXT | F_WRITE, 999);
            0
        }),
        ("indirect descriptor (not negotiated)", |_| {
            header(T_IN, 0);
            descriptor(0, HEADER, 16, F_NEXT, 1);
            descriptor(1, DATA, 64, F_INDIRECT, 0);
            0
        }),
    ];
    let mut refused = 0u32;
    for (name, setup) in cases {
        let head = setup(capacity);
        let outcome = submit(&mut device, head);
        let verdict = match outcome {
            Outcome::Done { status: S_OK, .. } => None,
            Outcome::Done { status, used } => Some(alloc_free_format(status, used)),
            Outcome::NeedsReset => Some("the device asked for a reset"),
            Outcome::Hung => None,
        };
        match verdict {
            Some(how) => {
                refused += 1;
                println!("disk-abuse: {name}: refused ({how}; {outcome:?})");
            }
            None => {
                failures += 1;
                println!("disk-abuse: {name}: FAILED ({outcome:?})");
            }
        }
        if (outcome == Outcome::NeedsReset || outcome == Outcome::Hung) && !device.initialize() {
            println!("disk-abuse: the device did not come back after a reset");
            exit(1);
        }
        check_good(&mut device, name, &mut failures);
    }
    // A head index past the queue, straight in the avail ring.
    let outcome = submit(&mut device, QUEUE_SIZE + 7);
    match outcome {
        Outcome::Done { status: S_OK, .. } | Outcome::Hung => {
            failures += 1;
            println!("disk-abuse: head index past the queue: FAILED ({outcome:?})");
        }
        _ => {
            refused += 1;
            println!("disk-abuse: head index past the queue: refused ({outcome:?})");
        }
    }
    if outcome == Outcome::NeedsReset && !device.initialize() {
        println!("disk-abuse: the device did not come back after a reset");
        exit(1);
    }
    check_good(&mut device, "at the end", &mut failures);
    println!("disk-abuse: {refused} malformed requests refused, {served} good requests served, {failures} failures");
    exit(if failures == 0 { 0 } else { 1 });
}

/// How a refusal looked, without formatting into a buffer.
fn alloc_free_format(status: u8, used: u32) -> &'static str {
    match (status, used) {
        (STATUS_UNTOUCHED, 0) => "chain returned unused, no status written",
        (STATUS_UNTOUCHED, _) => "no status written",
        (1, _) => "VIRTIO_BLK_S_IOERR",
        (2, _) => "VIRTIO_BLK_S_UNSUPP",
        _ => "an error status",
    }
}
