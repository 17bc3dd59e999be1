//! Fuzz target: hostile frames from every port (the guests and the physical network) against
//! the frame parser and the switch, interleaved with runs, pops, time passing and VMs stopping
//! and starting.
//!
//! Input: a sequence of operations, each an opcode byte and its operands (missing bytes read
//! as 0):
//! - 0 raw submit: port byte, 2-byte length (mod 1600), then that many frame bytes;
//! - 1 built submit: port, destination and source (each a byte picking a VM address, a
//!   physical-network address, broadcast, multicast or zero), a tag flag, a length byte;
//! - 2 run: budget byte (mod 16);
//! - 3 pop: port byte;
//! - 4 time: byte * 64 more (the ageing time is 1000);
//! - 5 restart: a port byte; the port is removed and added again (same kind and address).
//!
//! Port bytes pick the uplink, one of three VMs, or a stale id. After each operation the
//! bounds of every queue and of the table are checked, and every frame popped is checked: it
//! was valid at ingress, it does not come back to the VM that sent it, and a unicast frame to a
//! VM's address reaches that VM only.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringzero_vswitch::{Frame, FrameHeader, MacAddress, PortId, PortKind, Switch, SwitchConfig};

const VM_MACS: [MacAddress; 3] = [
    MacAddress([0x02, 0, 0, 0, 0, 1]),
    MacAddress([0x02, 0, 0, 0, 0, 2]),
    MacAddress([0x02, 0, 0, 0, 0, 3]),
];
const CONFIG: SwitchConfig = SwitchConfig {
    mtu: 1500,
    ageing_time: 1000,
    table_capacity: 4,
    max_ports: 5,
    input_frames: 4,
    input_bytes: 4000,
    egress_frames: 6,
    egress_bytes: 5000,
};

struct Input<'a> {
    bytes: &'a [u8],
}

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.bytes.split_first() {
            Some((&first, rest)) => {
                self.bytes = rest;
                first
            }
            None => 0,
        }
    }
    fn take(&mut self, len: usize) -> &[u8] {
        let len = len.min(self.bytes.len());
        let (taken, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        taken
    }
}

fn address(selector: u8) -> MacAddress {
    match selector % 8 {
        0..=2 => VM_MACS[usize::from(selector % 8)],
        3 => MacAddress([0x52, 0x54, 0, 0, 0, selector >> 3]),
        4 => MacAddress([0x52, 0x54, 0, 0, 1, selector >> 5]),
        5 => MacAddress::BROADCAST,
        6 => MacAddress([0x01, 0, 0x5e, 0, 0, selector >> 3]),
        _ => MacAddress::ZERO,
    }
}

fn kind(slot: usize) -> PortKind {
    match slot {
        0 => PortKind::Uplink,
        n => PortKind::Vm {
            mac: VM_MACS[n - 1],
        },
    }
}

struct Harness {
    switch: Switch,
    /// Uplink, vm1, vm2, vm3.
    ports: [PortId; 4],
    stale: PortId,
}

impl Harness {
    fn port(&self, selector: u8) -> PortId {
        match selector % 5 {
            4 => self.stale,
            n => self.ports[usize::from(n)],
        }
    }

    /// Which harness slot a (live) port id is.
    fn slot(&self, id: PortId) -> Option<usize> {
        self.ports.iter().position(|&port| port == id)
    }

    fn check_popped(&self, at: PortId, frame: &Frame) {
        let header = FrameHeader::parse(frame.bytes(), CONFIG.mtu)
            .expect("a frame the switch handed out does not parse");
        assert!(header.source.is_valid_source(), "bad source forwarded");
        let slot = self.slot(at).expect("popped from a dead port");
        if let PortKind::Vm { mac } = kind(slot) {
            assert_ne!(header.source, mac, "a VM's own frame came back to it");
        }
        if !header.destination.is_multicast() {
            if let Some(owner) = VM_MACS.iter().position(|&mac| mac == header.destination) {
                assert_eq!(slot, owner + 1, "unicast to a VM reached another port");
            }
        }
    }

    fn check_bounds(&self) {
        for &port in &self.ports {
            let input = self.switch.input_level(port).unwrap();
            assert!(input.frames <= CONFIG.input_frames && input.bytes <= CONFIG.input_bytes);
            let egress = self.switch.egress_level(port).unwrap();
            assert!(egress.frames <= CONFIG.egress_frames && egress.bytes <= CONFIG.egress_bytes);
        }
        let stats = self.switch.stats();
        assert!(stats.table_entries <= CONFIG.table_capacity);
        assert!(self.switch.input_level(self.stale).is_none());
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input { bytes: data };
    let mut switch = Switch::new(CONFIG).unwrap();
    let ports = [0, 1, 2, 3].map(|slot| switch.add_port("p", kind(slot)).unwrap());
    let stale = switch
        .add_port(
            "gone",
            PortKind::Vm {
                mac: MacAddress([0x02, 0, 0, 0, 0, 9]),
            },
        )
        .unwrap();
    switch.remove_port(stale).unwrap();
    let mut harness = Harness {
        switch,
        ports,
        stale,
    };
    let mut now = 0u64;
    let mut operations = 0;
    while !input.bytes.is_empty() && operations < 4096 {
        operations += 1;
        match input.byte() % 6 {
            0 => {
                let port = harness.port(input.byte());
                let len = usize::from(u16::from_le_bytes([input.byte(), input.byte()])) % 1600;
                let frame = Frame::from_slice(input.take(len));
                let _ = harness.switch.submit(port, frame);
            }
            1 => {
                let port = harness.port(input.byte());
                let destination = address(input.byte());
                let source = address(input.byte());
                let tagged = input.byte() & 1 != 0;
                let len = usize::from(input.byte()) * 8;
                let mut bytes = Vec::with_capacity(len.max(18));
                bytes.extend_from_slice(&destination.0);
                bytes.extend_from_slice(&source.0);
                if tagged {
                    bytes.extend_from_slice(&[0x81, 0x00, 0x00, 0x05]);
                }
                bytes.extend_from_slice(&[0x08, 0x00]);
                bytes.resize(len.max(bytes.len()), 0xa5);
                bytes.truncate(len.max(13));
                let _ = harness.switch.submit(port, Frame::new(bytes));
            }
            2 => {
                let budget = usize::from(input.byte() % 16);
                let done = harness.switch.run(now, budget);
                assert!(done <= budget);
            }
            3 => {
                let port = harness.port(input.byte());
                if let Some(frame) = harness.switch.pop(port) {
                    harness.check_popped(port, &frame);
                }
            }
            4 => now += u64::from(input.byte()) * 64,
            _ => {
                // Removed and added again with no run in between: no frame is forwarded while
                // the VM's address is unknown, so the unicast check stays exact.
                let slot = usize::from(input.byte() % 4);
                harness.switch.remove_port(harness.ports[slot]).unwrap();
                harness.ports[slot] = harness.switch.add_port("p", kind(slot)).unwrap();
            }
        }
        harness.check_bounds();
    }
    for port in harness.ports {
        let line = harness.switch.port_line(port).unwrap().to_string();
        assert!(line.starts_with("vswitch: port "));
    }
    assert!(harness
        .switch
        .stats()
        .to_string()
        .starts_with("vswitch: forwarded="));
});
