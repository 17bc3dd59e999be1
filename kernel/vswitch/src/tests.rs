//! Behaviour of the whole switch: learning, forwarding, flooding, ageing, spoofing, bounds,
//! fairness and counters.

use alloc::format;
use alloc::vec;
use alloc::vec::Vec;

use crate::*;

const VM1: MacAddress = MacAddress([0x02, 0, 0, 0, 0, 1]);
const VM2: MacAddress = MacAddress([0x02, 0, 0, 0, 0, 2]);
const VM3: MacAddress = MacAddress([0x02, 0, 0, 0, 0, 3]);
/// Stations on the physical network.
const HOST_A: MacAddress = MacAddress([0x52, 0x54, 0, 0, 0, 0xa]);
const HOST_B: MacAddress = MacAddress([0x52, 0x54, 0, 0, 0, 0xb]);
const MULTICAST: MacAddress = MacAddress([0x01, 0x00, 0x5e, 0, 0, 1]);

/// A 64-byte IPv4 frame from `source` to `destination`, its last byte `tag`.
fn frame(destination: MacAddress, source: MacAddress, tag: u8) -> Frame {
    sized_frame(destination, source, tag, 64)
}

fn sized_frame(destination: MacAddress, source: MacAddress, tag: u8, len: usize) -> Frame {
    let mut bytes = vec![0u8; len];
    bytes[..6].copy_from_slice(&destination.0);
    bytes[6..12].copy_from_slice(&source.0);
    bytes[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    bytes[len - 1] = tag;
    Frame::new(bytes)
}

struct Net {
    switch: Switch,
    uplink: PortId,
    vm1: PortId,
    vm2: PortId,
    vm3: PortId,
}

impl Net {
    fn new(config: SwitchConfig) -> Net {
        let mut switch = Switch::new(config).unwrap();
        let uplink = switch.add_port("uplink", PortKind::Uplink).unwrap();
        let vm1 = switch.add_port("vm1", PortKind::Vm { mac: VM1 }).unwrap();
        let vm2 = switch.add_port("vm2", PortKind::Vm { mac: VM2 }).unwrap();
        let vm3 = switch.add_port("vm3", PortKind::Vm { mac: VM3 }).unwrap();
        Net {
            switch,
            uplink,
            vm1,
            vm2,
            vm3,
        }
    }

    fn all(&self) -> [PortId; 4] {
        [self.uplink, self.vm1, self.vm2, self.vm3]
    }

    /// Submits and runs one frame at `now`.
    fn send(&mut self, port: PortId, frame: Frame, now: u64) -> Result<(), SubmitError> {
        self.switch.submit(port, frame)?;
        assert_eq!(self.switch.run(now, usize::MAX), 1);
        Ok(())
    }

    /// Everything waiting at `port`.
    fn drain(&mut self, port: PortId) -> Vec<Frame> {
        core::iter::from_fn(|| self.switch.pop(port)).collect()
    }

    /// The ports (of `all`) with frames waiting, after draining them all.
    fn receivers(&mut self) -> Vec<PortId> {
        self.all()
            .into_iter()
            .filter(|&port| !self.drain(port).is_empty())
            .collect()
    }
}

fn small_config() -> SwitchConfig {
    SwitchConfig {
        ageing_time: 1000,
        ..SwitchConfig::default()
    }
}

#[test]
fn vm_to_vm_by_pinned_address() {
    let mut net = Net::new(small_config());
    let sent = frame(VM2, VM1, 7);
    net.send(net.vm1, sent.clone(), 0).unwrap();
    assert_eq!(net.drain(net.vm2), vec![sent]);
    assert_eq!(net.receivers(), vec![]);
    // Nothing to learn: a VM's address is pinned, not learned.
    assert_eq!(net.switch.stats().table.learned, 0);
}

#[test]
fn peek_shows_the_next_frame_and_leaves_it_queued() {
    let mut net = Net::new(small_config());
    assert_eq!(net.switch.peek(net.vm2), None);
    let first = frame(VM2, VM1, 1);
    let second = frame(VM2, VM1, 2);
    net.send(net.vm1, first.clone(), 0).unwrap();
    net.send(net.vm1, second.clone(), 0).unwrap();
    assert_eq!(net.switch.peek(net.vm2), Some(&first));
    assert_eq!(
        net.switch.peek(net.vm2),
        Some(&first),
        "peeking takes nothing"
    );
    assert_eq!(net.switch.egress_level(net.vm2).unwrap().frames, 2);
    assert_eq!(net.switch.port_stats(net.vm2).unwrap().out_frames, 0);
    assert_eq!(net.drain(net.vm2), vec![first, second]);
}

#[test]
fn learning_and_forwarding_to_the_learned_port() {
    let mut net = Net::new(small_config());
    // Unknown: flooded to the uplink and the other VMs.
    net.send(net.vm1, frame(HOST_A, VM1, 0), 0).unwrap();
    assert_eq!(net.receivers(), vec![net.uplink, net.vm2, net.vm3]);
    assert_eq!(net.switch.stats().unknown_unicast, 1);
    // HOST_A answers through the uplink: learned there, delivered to vm1 only.
    net.send(net.uplink, frame(VM1, HOST_A, 1), 1).unwrap();
    assert_eq!(net.receivers(), vec![net.vm1]);
    assert_eq!(net.switch.lookup(HOST_A, 1), Some(net.uplink));
    // Now vm2's frame to HOST_A goes to the uplink only.
    net.send(net.vm2, frame(HOST_A, VM2, 2), 2).unwrap();
    assert_eq!(net.receivers(), vec![net.uplink]);
    let stats = net.switch.stats();
    assert_eq!(stats.table.learned, 1);
    assert_eq!(stats.flooded, 1);
    assert_eq!(stats.forwarded, 3);
}

#[test]
fn broadcast_and_multicast_flood_to_every_other_port() {
    let mut net = Net::new(small_config());
    for destination in [MacAddress::BROADCAST, MULTICAST] {
        let sent = frame(destination, VM2, 3);
        net.send(net.vm2, sent.clone(), 0).unwrap();
        for port in [net.uplink, net.vm1, net.vm3] {
            assert_eq!(net.drain(port), vec![sent.clone()]);
        }
        assert!(net.drain(net.vm2).is_empty());
        // From the uplink: to every VM, not back to the uplink.
        net.send(net.uplink, frame(destination, HOST_A, 4), 0)
            .unwrap();
        assert_eq!(net.receivers(), vec![net.vm1, net.vm2, net.vm3]);
    }
    assert_eq!(net.switch.stats().flooded, 4);
    assert_eq!(net.switch.stats().unknown_unicast, 0);
}

#[test]
fn no_hairpin() {
    let mut net = Net::new(small_config());
    // HOST_A and HOST_B both behind the uplink: a frame between them is not sent back.
    net.send(net.uplink, frame(MacAddress::BROADCAST, HOST_A, 0), 0)
        .unwrap();
    net.receivers();
    net.send(net.uplink, frame(HOST_A, HOST_B, 0), 1).unwrap();
    assert_eq!(net.receivers(), vec![]);
    assert_eq!(net.switch.port_stats(net.uplink).unwrap().drops.filtered, 1);
    // A VM sending to itself: not reflected either.
    net.send(net.vm1, frame(VM1, VM1, 0), 1).unwrap();
    assert_eq!(net.receivers(), vec![]);
    assert_eq!(net.switch.port_stats(net.vm1).unwrap().drops.filtered, 1);
}

#[test]
fn ageing_expires_an_entry_and_then_floods() {
    let mut net = Net::new(small_config());
    net.send(net.uplink, frame(VM1, HOST_A, 0), 0).unwrap();
    net.receivers();
    net.send(net.vm1, frame(HOST_A, VM1, 0), 999).unwrap();
    assert_eq!(net.receivers(), vec![net.uplink]);
    // 1000 after it was last seen: gone, the next frame floods.
    net.send(net.vm1, frame(HOST_A, VM1, 0), 1000).unwrap();
    assert_eq!(net.receivers(), vec![net.uplink, net.vm2, net.vm3]);
    let stats = net.switch.stats();
    assert_eq!(stats.table.aged, 1);
    assert_eq!(stats.table_entries, 0);
    assert_eq!(net.switch.age(5000), 0);
}

#[test]
fn default_ageing_is_300_seconds_in_the_callers_unit() {
    assert_eq!(SwitchConfig::default().ageing_time, 300_000);
    assert_eq!(
        SwitchConfig::with_ticks_per_second(2_000_000_000).ageing_time,
        600_000_000_000
    );
    assert_eq!(
        SwitchConfig::with_ticks_per_second(u64::MAX).ageing_time,
        u64::MAX
    );
}

#[test]
fn table_size_bound_evicts_the_oldest() {
    let mut net = Net::new(SwitchConfig {
        table_capacity: 4,
        ..small_config()
    });
    for n in 0..10u8 {
        let host = MacAddress([0x52, 0x54, 0, 0, 1, n]);
        net.send(
            net.uplink,
            frame(MacAddress::BROADCAST, host, n),
            u64::from(n),
        )
        .unwrap();
        assert!(net.switch.stats().table_entries <= 4);
    }
    let stats = net.switch.stats();
    assert_eq!(stats.table.learned, 10);
    assert_eq!(stats.table.evicted, 6);
    assert_eq!(
        net.switch.lookup(MacAddress([0x52, 0x54, 0, 0, 1, 5]), 10),
        None
    );
    assert_eq!(
        net.switch.lookup(MacAddress([0x52, 0x54, 0, 0, 1, 6]), 10),
        Some(net.uplink)
    );
}

#[test]
fn spoofed_source_is_dropped_counted_and_not_learned() {
    let mut net = Net::new(small_config());
    // vm1 pretends to be vm2, then a host on the LAN.
    for source in [VM2, HOST_A] {
        assert_eq!(
            net.switch
                .submit(net.vm1, frame(MacAddress::BROADCAST, source, 0)),
            Err(SubmitError::Dropped(DropCause::Spoofed))
        );
    }
    assert_eq!(net.switch.run(0, 100), 0);
    assert_eq!(net.receivers(), vec![]);
    assert_eq!(net.switch.port_stats(net.vm1).unwrap().drops.spoofed, 2);
    // The victim's address still goes to the victim.
    assert_eq!(net.switch.lookup(VM2, 0), Some(net.vm2));
    assert_eq!(net.switch.lookup(HOST_A, 0), None);
    net.send(net.uplink, frame(VM2, HOST_B, 0), 0).unwrap();
    assert_eq!(net.receivers(), vec![net.vm2]);
    // The physical network may not claim a VM's address either.
    assert_eq!(
        net.switch
            .submit(net.uplink, frame(MacAddress::BROADCAST, VM3, 0)),
        Err(SubmitError::Dropped(DropCause::Spoofed))
    );
    assert_eq!(net.switch.port_stats(net.uplink).unwrap().drops.spoofed, 1);
    assert_eq!(net.switch.lookup(VM3, 0), Some(net.vm3));
    assert_eq!(net.switch.stats().table.learned, 1);
}

#[test]
fn a_vm_port_added_later_takes_its_address_from_the_table() {
    let mut config = small_config();
    config.max_ports = 5;
    let mut net = Net::new(config);
    let vm4_mac = MacAddress([0x02, 0, 0, 0, 0, 4]);
    net.send(net.uplink, frame(VM1, vm4_mac, 0), 0).unwrap();
    assert_eq!(net.switch.lookup(vm4_mac, 0), Some(net.uplink));
    // Submitted from the uplink, not yet run, when vm4 appears: dropped at run time.
    net.switch
        .submit(net.uplink, frame(VM1, vm4_mac, 1))
        .unwrap();
    let vm4 = net
        .switch
        .add_port("vm4", PortKind::Vm { mac: vm4_mac })
        .unwrap();
    assert_eq!(net.switch.lookup(vm4_mac, 0), Some(vm4));
    assert_eq!(net.switch.run(1, 10), 1);
    assert_eq!(net.switch.port_stats(net.uplink).unwrap().drops.spoofed, 1);
    assert_eq!(
        net.switch.add_port(
            "vm5",
            PortKind::Vm {
                mac: MacAddress([0x02, 0, 0, 0, 0, 5])
            }
        ),
        Err(PortError::TooManyPorts)
    );
}

#[test]
fn bad_sources_are_dropped() {
    let mut net = Net::new(small_config());
    for source in [MacAddress::BROADCAST, MULTICAST, MacAddress::ZERO] {
        for port in [net.uplink, net.vm1] {
            assert_eq!(
                net.switch.submit(port, frame(VM2, source, 0)),
                Err(SubmitError::Dropped(DropCause::BadSource))
            );
        }
    }
    assert_eq!(
        net.switch.port_stats(net.uplink).unwrap().drops.bad_source,
        3
    );
    assert_eq!(net.switch.port_stats(net.vm1).unwrap().drops.bad_source, 3);
    assert_eq!(net.switch.stats().table.learned, 0);
}

#[test]
fn runts_and_oversize_frames() {
    let mut net = Net::new(small_config());
    let full = sized_frame(VM2, VM1, 0, 1514);
    for len in [0, 1, 13] {
        assert_eq!(
            net.switch
                .submit(net.vm1, Frame::from_slice(&full.bytes()[..len])),
            Err(SubmitError::Dropped(DropCause::Runt))
        );
    }
    net.send(net.vm1, full.clone(), 0).unwrap();
    assert_eq!(net.drain(net.vm2), vec![full]);
    assert_eq!(
        net.switch.submit(net.vm1, sized_frame(VM2, VM1, 0, 1515)),
        Err(SubmitError::Dropped(DropCause::Oversize))
    );
    // Tagged: 4 more bytes allowed.
    let mut tagged = sized_frame(VM2, VM1, 0, 1518).into_bytes();
    tagged[12..14].copy_from_slice(&0x8100u16.to_be_bytes());
    net.send(net.vm1, Frame::new(tagged.clone()), 0).unwrap();
    assert_eq!(net.drain(net.vm2).len(), 1);
    tagged.push(0);
    assert_eq!(
        net.switch.submit(net.vm1, Frame::new(tagged)),
        Err(SubmitError::Dropped(DropCause::Oversize))
    );
    let drops = net.switch.port_stats(net.vm1).unwrap().drops;
    assert_eq!((drops.runt, drops.oversize), (3, 2));
    // A smaller MTU is a parameter.
    let mut small = Net::new(SwitchConfig {
        mtu: 100,
        ..small_config()
    });
    assert_eq!(
        small
            .switch
            .submit(small.vm1, sized_frame(VM2, VM1, 0, 115)),
        Err(SubmitError::Dropped(DropCause::Oversize))
    );
    small
        .send(small.vm1, sized_frame(VM2, VM1, 0, 114), 0)
        .unwrap();
}

#[test]
fn input_queue_bounds() {
    let config = SwitchConfig {
        input_frames: 4,
        input_bytes: 3000,
        ..small_config()
    };
    // Frame bound.
    let mut net = Net::new(config);
    for n in 0..6 {
        let result = net.switch.submit(net.vm1, frame(VM2, VM1, n));
        assert_eq!(result.is_ok(), n < 4);
    }
    assert_eq!(
        net.switch.input_level(net.vm1),
        Some(QueueLevel {
            frames: 4,
            bytes: 256
        })
    );
    // Byte bound: two 1514-byte frames do not fit in 3000.
    net.switch
        .submit(net.vm2, sized_frame(VM1, VM2, 0, 1514))
        .unwrap();
    assert_eq!(
        net.switch.submit(net.vm2, sized_frame(VM1, VM2, 1, 1514)),
        Err(SubmitError::Dropped(DropCause::InputFull))
    );
    net.switch
        .submit(net.vm2, sized_frame(VM1, VM2, 2, 1486))
        .unwrap();
    assert_eq!(net.switch.port_stats(net.vm1).unwrap().drops.input_full, 2);
    assert_eq!(net.switch.port_stats(net.vm2).unwrap().drops.input_full, 1);
    assert!(net.switch.has_input());
    assert_eq!(net.switch.run(0, 100), 6);
    assert!(!net.switch.has_input());
    assert_eq!(net.switch.input_level(net.vm1), Some(QueueLevel::default()));
}

#[test]
fn egress_queue_bounds_keep_a_slow_receiver_from_taking_memory() {
    let config = SwitchConfig {
        egress_frames: 8,
        egress_bytes: 4000,
        ..small_config()
    };
    let mut net = Net::new(config);
    // vm3 never takes its frames.
    for n in 0..20 {
        net.send(net.vm1, frame(VM3, VM1, n), 0).unwrap();
    }
    let level = net.switch.egress_level(net.vm3).unwrap();
    assert_eq!(level.frames, 8);
    assert_eq!(net.switch.port_stats(net.vm3).unwrap().drops.queue_full, 12);
    // Bytes: 4000 hold two 1514-byte frames, not three.
    for n in 0..3 {
        net.send(net.vm1, sized_frame(VM2, VM1, n, 1514), 0)
            .unwrap();
    }
    assert_eq!(net.switch.egress_level(net.vm2).unwrap().frames, 2);
    assert_eq!(net.switch.egress_level(net.vm2).unwrap().bytes, 3028);
    assert_eq!(net.switch.port_stats(net.vm2).unwrap().drops.queue_full, 1);
    // The first frames are the ones kept, in order; popping makes room.
    let first = net.switch.pop(net.vm3).unwrap();
    assert_eq!(first, frame(VM3, VM1, 0));
    net.send(net.vm1, frame(VM3, VM1, 99), 0).unwrap();
    assert_eq!(net.switch.egress_level(net.vm3).unwrap().frames, 8);
    // Other receivers are not affected.
    net.send(net.vm1, frame(HOST_A, VM1, 0), 0).unwrap();
    assert_eq!(net.switch.egress_level(net.uplink).unwrap().frames, 1);
}

#[test]
fn config_is_validated() {
    let base = SwitchConfig::default();
    assert!(base.validate().is_ok());
    let bad = [
        (
            SwitchConfig {
                ageing_time: 0,
                ..base
            },
            ConfigError::ZeroAgeingTime,
        ),
        (
            SwitchConfig {
                max_ports: 0,
                ..base
            },
            ConfigError::MaxPorts,
        ),
        (
            SwitchConfig {
                max_ports: 70_000,
                ..base
            },
            ConfigError::MaxPorts,
        ),
        (
            SwitchConfig {
                input_frames: 0,
                ..base
            },
            ConfigError::InputQueueTooSmall,
        ),
        (
            SwitchConfig {
                input_bytes: 1517,
                ..base
            },
            ConfigError::InputQueueTooSmall,
        ),
        (
            SwitchConfig {
                egress_bytes: 100,
                ..base
            },
            ConfigError::EgressQueueTooSmall,
        ),
    ];
    for (config, error) in bad {
        assert_eq!(Switch::new(config).err(), Some(error));
    }
}

#[test]
fn ports_are_added_and_removed() {
    let mut net = Net::new(small_config());
    assert_eq!(
        net.switch.add_port("again", PortKind::Uplink),
        Err(PortError::UplinkExists)
    );
    assert_eq!(
        net.switch.add_port("dup", PortKind::Vm { mac: VM1 }),
        Err(PortError::DuplicateMac)
    );
    assert_eq!(
        net.switch.add_port("bad", PortKind::Vm { mac: MULTICAST }),
        Err(PortError::InvalidMac)
    );
    assert_eq!(net.switch.port_name(net.vm2), Some("vm2"));
    assert_eq!(
        net.switch.port_kind(net.vm2),
        Some(PortKind::Vm { mac: VM2 })
    );
    assert_eq!(net.switch.uplink(), Some(net.uplink));
    // Frames queued for and from vm2, and an address learned on the uplink.
    net.send(net.uplink, frame(VM2, HOST_A, 0), 0).unwrap();
    net.switch.submit(net.vm2, frame(HOST_A, VM2, 0)).unwrap();
    net.switch.remove_port(net.vm2).unwrap();
    assert_eq!(net.switch.remove_port(net.vm2), Err(PortError::NoSuchPort));
    assert_eq!(net.switch.run(0, 10), 0);
    assert_eq!(net.switch.lookup(VM2, 0), None);
    assert_eq!(net.switch.pop(net.vm2), None);
    assert_eq!(
        net.switch.submit(net.vm2, frame(HOST_A, VM2, 0)),
        Err(SubmitError::NoSuchPort)
    );
    // The slot is reused; the old id stays dead.
    let vm4 = net
        .switch
        .add_port("vm4", PortKind::Vm { mac: VM2 })
        .unwrap();
    assert_eq!(vm4.index(), net.vm2.index());
    assert_ne!(vm4, net.vm2);
    assert_eq!(net.switch.port_stats(net.vm2), None);
    assert_eq!(net.switch.port_stats(vm4), Some(&PortStats::default()));
    assert_eq!(net.switch.ports().count(), 4);
    // Removing the uplink forgets what was learned on it.
    net.switch.remove_port(net.uplink).unwrap();
    assert_eq!(net.switch.lookup(HOST_A, 0), None);
    assert_eq!(net.switch.stats().table_entries, 0);
    net.switch.add_port("uplink2", PortKind::Uplink).unwrap();
}

/// One guest floods (as fast as it can, to every port and to a peer) while vm2 sends a steady
/// flow to vm3. With a run budget per round of the poll loop, the steady flow loses < 5 % and
/// the flood gets at most its share.
#[test]
fn fairness_under_a_flood() {
    const ROUNDS: u64 = 1000;
    const STEADY_PER_ROUND: u64 = 8;
    const BUDGET: usize = 32;
    const FLOOD_PER_ROUND: u64 = 500;
    let mut net = Net::new(small_config());
    let mut flood_forwarded = 0u64;
    let mut steady_received = 0u64;
    for round in 0..ROUNDS {
        for n in 0..FLOOD_PER_ROUND {
            // Half broadcast (lands in every queue, vm3's included), half to vm3 itself.
            let destination = if n % 2 == 0 {
                MacAddress::BROADCAST
            } else {
                VM3
            };
            let _ = net.switch.submit(net.vm1, frame(destination, VM1, 1));
        }
        for _ in 0..STEADY_PER_ROUND {
            net.switch.submit(net.vm2, frame(VM3, VM2, 2)).unwrap();
        }
        let before = net.switch.stats().forwarded;
        let done = net.switch.run(round, BUDGET);
        assert_eq!(done, BUDGET);
        assert_eq!(net.switch.stats().forwarded - before, BUDGET as u64);
        // The hypervisor delivers what each port has (vm3 a bounded amount per round).
        for _ in 0..64 {
            match net.switch.pop(net.vm3) {
                Some(frame) if frame.bytes()[63] == 2 => steady_received += 1,
                Some(_) => flood_forwarded += 1,
                None => break,
            }
        }
        for port in [net.uplink, net.vm2] {
            net.drain(port);
        }
        // Memory stays bounded whatever the flood does.
        let input = net.switch.input_level(net.vm1).unwrap();
        assert!(input.frames <= 64 && input.bytes <= 96 * 1024);
        for port in net.all() {
            assert!(net.switch.egress_level(port).unwrap().frames <= 256);
        }
    }
    let sent = ROUNDS * STEADY_PER_ROUND;
    assert!(
        steady_received * 100 >= sent * 95,
        "steady flow lost too much: {steady_received}/{sent}"
    );
    // The flood got the rest of the budget, no more.
    let budget_total = ROUNDS * BUDGET as u64;
    assert!(flood_forwarded <= budget_total - steady_received);
    let vm1 = net.switch.port_stats(net.vm1).unwrap();
    assert_eq!(vm1.in_frames, ROUNDS * FLOOD_PER_ROUND);
    assert!(vm1.drops.input_full >= ROUNDS * (FLOOD_PER_ROUND - 64));
    assert_eq!(net.switch.port_stats(net.vm2).unwrap().drops.total(), 0);
}

/// Two floods and one light sender: each flooder gets half of what the light sender leaves,
/// and round-robin carries the turn across `run` calls of budget 1.
#[test]
fn round_robin_shares_the_budget() {
    let mut net = Net::new(small_config());
    for n in 0..40 {
        net.switch
            .submit(net.vm1, frame(HOST_A, VM1, n))
            .unwrap_or(());
        net.switch
            .submit(net.vm2, frame(HOST_A, VM2, n))
            .unwrap_or(());
    }
    net.switch.submit(net.vm3, frame(HOST_A, VM3, 0)).unwrap();
    // Budget 1 per call: still served in turn.
    for _ in 0..9 {
        assert_eq!(net.switch.run(0, 1), 1);
    }
    let uplink: Vec<u8> = net
        .drain(net.uplink)
        .iter()
        .map(|f| f.bytes()[11])
        .collect();
    assert_eq!(uplink, vec![1, 2, 3, 1, 2, 1, 2, 1, 2]);
}

#[test]
fn counters_and_statistics_lines() {
    let mut net = Net::new(small_config());
    net.send(net.vm1, frame(VM2, VM1, 0), 0).unwrap();
    net.send(net.vm1, sized_frame(MacAddress::BROADCAST, VM1, 0, 100), 0)
        .unwrap();
    let _ = net.switch.submit(net.vm1, frame(VM2, VM3, 0));
    let _ = net.switch.submit(net.vm1, Frame::from_slice(&[1, 2, 3]));
    net.drain(net.vm2);
    let vm1 = *net.switch.port_stats(net.vm1).unwrap();
    assert_eq!((vm1.in_frames, vm1.in_bytes), (4, 64 + 100 + 64 + 3));
    assert_eq!((vm1.drops.spoofed, vm1.drops.runt), (1, 1));
    let vm2 = *net.switch.port_stats(net.vm2).unwrap();
    assert_eq!((vm2.out_frames, vm2.out_bytes), (2, 164));
    assert_eq!(
        format!("{}", net.switch.port_line(net.vm1).unwrap()),
        "vswitch: port vm1 in=4 in_bytes=231 out=0 out_bytes=0 drops: runt=1 oversize=0 \
         bad_source=0 spoofed=1 input_full=0 queue_full=0 filtered=0"
    );
    assert_eq!(
        format!("{}", net.switch.stats()),
        "vswitch: forwarded=2 flooded=1 unknown_unicast=0 learned=0 moved=0 aged=0 evicted=0 \
         table=0/1024"
    );
}
