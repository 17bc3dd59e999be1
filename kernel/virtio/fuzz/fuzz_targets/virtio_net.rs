//! Fuzz target: a guest that controls all of its RAM (both rings, descriptors, packets) and
//! the queue registers drives a virtio-net device through the PCI transport, while the
//! hypervisor side delivers frames, drains the outbox, flips the link and resets.
//!
//! Input: bytes 0 and 1 pick the receive and transmit queue sizes (1 << (b % 9)), bytes 2..8
//! and 8..14 the descriptor table, available ring and used ring addresses of each (scaled to
//! their alignment, possibly misaligned or outside RAM), byte 14 the outbox size (1 + b % 4)
//! and the initial link state (bit 7), bytes 15..31 sixteen operations (low 3 bits: notify
//! transmit, notify receive, deliver a frame (two codes), drain the outbox, flip the link, read
//! the ISR, reset and bring up again; high 5 bits: the frame length and pattern); the rest is
//! the first bytes of the VM's 64 KiB of RAM.
//!
//! Checked: no panic; the outbox never holds more than its size nor a frame of an illegal
//! length; a notify of the receive queue takes nothing; every delivery is counted exactly once
//! (delivered or dropped by one cause); an ISR read lowers the line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringzero_devices::PciDevice;
use ringzero_virtio::net::{self, RX_QUEUE, TX_QUEUE};
use ringzero_virtio::pci::{BAR_INDEX, ISR_OFFSET, NOTIFY_OFFSET, NOTIFY_OFF_MULTIPLIER};
use ringzero_virtio::{FakeMemory, GuestMemory, Net, NetConfig, VirtioPci};

const RAM_BYTES: usize = 64 * 1024;
const HEADER_BYTES: usize = 31;
/// Frame lengths a delivery picks from: around every bound.
const LENGTHS: [usize; 16] = [
    0, 1, 13, 14, 15, 42, 60, 64, 500, 1024, 1500, 1514, 1517, 1518, 1519, 4000,
];

#[derive(Clone, Copy)]
struct Rings {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
}

fn common_write(pci: &mut VirtioPci<Net>, offset: u64, size: u8, value: u64) {
    let _ = pci.bar_write(BAR_INDEX, offset, size, value);
}

/// Linux's bring-up: BAR, memory + bus master, ACKNOWLEDGE | DRIVER, all features,
/// FEATURES_OK, both queues, DRIVER_OK.
fn bring_up(pci: &mut VirtioPci<Net>, queues: &[Rings; 2]) {
    pci.write_config(0x10, 0xFEBF_0000, u32::MAX);
    pci.write_config(0x04, 0x6, u32::MAX);
    common_write(pci, 0x14, 1, 3);
    for select in 0..2 {
        common_write(pci, 0x00, 4, select);
        let offered = pci.bar_read(BAR_INDEX, 0x04, 4);
        common_write(pci, 0x08, 4, select);
        common_write(pci, 0x0C, 4, offered);
    }
    common_write(pci, 0x14, 1, 0xB);
    for (index, rings) in queues.iter().enumerate() {
        common_write(pci, 0x16, 2, index as u64);
        common_write(pci, 0x18, 2, u64::from(rings.size));
        common_write(pci, 0x20, 8, rings.desc);
        common_write(pci, 0x28, 8, rings.avail);
        common_write(pci, 0x30, 8, rings.used);
        common_write(pci, 0x1C, 2, 1);
    }
    common_write(pci, 0x14, 1, 0xF);
}

fn notify(pci: &mut VirtioPci<Net>, memory: &mut dyn GuestMemory, queue: u16) -> usize {
    let offset = NOTIFY_OFFSET + u64::from(queue) * u64::from(NOTIFY_OFF_MULTIPLIER);
    match pci.bar_write(BAR_INDEX, offset, 2, u64::from(queue)) {
        Some(notify) => pci.process(notify.queue, memory),
        None => 0,
    }
}

fn drain(pci: &mut VirtioPci<Net>, outbox: usize) -> usize {
    let mut taken = 0;
    while let Some(frame) = pci.device_mut().take_transmitted() {
        assert!(
            (net::MIN_FRAME..=1518).contains(&frame.len()),
            "frame of {} bytes transmitted",
            frame.len()
        );
        taken += 1;
        assert!(taken <= outbox, "outbox held more than its size");
    }
    taken
}

fuzz_target!(|input: &[u8]| {
    if input.len() < HEADER_BYTES {
        return;
    }
    let word = |i: usize| u64::from(u16::from_le_bytes([input[i], input[i + 1]]));
    let rings = |size: u8, at: usize| Rings {
        size: 1u16 << (size % 9),
        desc: word(at) * 8,
        avail: word(at + 2) * 2,
        used: word(at + 4) * 2,
    };
    let queues = [rings(input[0], 2), rings(input[1], 8)];
    let outbox = 1 + usize::from(input[14] % 4);
    let link_up = input[14] & 0x80 != 0;
    let operations = &input[15..HEADER_BYTES];
    let mut ram = input[HEADER_BYTES..].to_vec();
    ram.resize(RAM_BYTES, 0);
    let mut memory = FakeMemory::from_bytes(ram);

    let mut config = NetConfig::new(net::mac_from_name("fuzz"));
    config.outbox_frames = outbox;
    config.link_up = link_up;
    let mut pci = VirtioPci::new(Net::new(config).expect("a valid configuration"));
    bring_up(&mut pci, &queues);

    let mut deliveries = 0u64;
    for &operation in operations {
        let argument = operation >> 3;
        match operation % 8 {
            0 => {
                let used = notify(&mut pci, &mut memory, TX_QUEUE);
                assert!(
                    used <= usize::from(queues[1].size),
                    "more chains than the queue holds"
                );
            }
            1 => assert_eq!(
                notify(&mut pci, &mut memory, RX_QUEUE),
                0,
                "rx notify took a chain"
            ),
            2 | 3 => {
                let len = LENGTHS[usize::from(argument) % LENGTHS.len()];
                let frame: Vec<u8> = (0..len).map(|i| i as u8 ^ argument).collect();
                let before = pci.device().stats().rx_frames;
                let delivered = pci.deliver(&frame, &mut memory).is_ok();
                assert_eq!(
                    pci.device().stats().rx_frames,
                    before + u64::from(delivered)
                );
                deliveries += 1;
            }
            4 => {
                let was_full = pci.device().outbox_full();
                drain(&mut pci, outbox);
                if was_full {
                    notify(&mut pci, &mut memory, TX_QUEUE);
                }
            }
            5 => {
                let up = pci.device().link_up();
                pci.set_link_up(!up);
            }
            6 => {
                let _ = pci.bar_read(BAR_INDEX, ISR_OFFSET, 1);
                assert!(!pci.interrupt_line(), "ISR read must clear the line");
            }
            _ => {
                common_write(&mut pci, 0x14, 1, 0);
                assert_eq!(pci.device().transmitted_len(), 0, "reset kept frames");
                assert!(!pci.interrupt_line());
                bring_up(&mut pci, &queues);
            }
        }
        assert!(pci.device().transmitted_len() <= outbox);
    }
    drain(&mut pci, outbox);
    let stats = *pci.device().stats();
    let d = stats.drops;
    assert_eq!(
        stats.rx_frames
            + d.rx_bad_frame
            + d.rx_link_down
            + d.rx_not_ready
            + d.rx_no_buffer
            + d.rx_too_small
            + d.rx_refused,
        deliveries,
        "every delivery counted once: {stats}"
    );
    assert_eq!(d.guest_memory, 0, "a checked chain failed a copy");
    assert_eq!(d.tx_outbox_full, 0, "the transport overfilled the outbox");
});
