//! The VMs' networks: every VM NIC (a virtio-net PCI function of its VM) and the physical NIC
//! (`net.rs`) are ports of one software switch (`ringzero_vswitch`). Frames a VM sends are
//! multiplexed onto the physical NIC; frames that arrive are delivered to the VM whose MAC they
//! are for (or flooded, for broadcasts and unknown destinations); VMs reach each other directly.
//!
//! Who moves frames, as soon as they are sent:
//! - [`exchange`] with [`Moment::Exit`], in a networked VM's exit path
//!   (`Platform::exit_handled`, called by `ringzero_vmm::vm::run_slice` with the VM locked and
//!   no device locked; `scheduler.rs`), after an exit that ran one of its queues (the guest
//!   notified its NIC's transmit or receive queue), or when the VM was marked as having frames
//!   waiting: its NIC's outbox goes into the switch, the switch forwards a bounded batch, the
//!   frames on its own port go into its receive queue (raising its interrupt line), and what
//!   waits for the uplink goes out through the physical NIC while that has room (never
//!   waiting there: the rest goes at the next [`pump`]). It returns the other VMs that now
//!   have frames waiting on their ports.
//! - The scheduler (`move_to_other_vms`) gets those frames to those VMs: it *tries* each one's
//!   lock; when free, it runs [`exchange`] for it there and then; when another CPU holds it,
//!   the VM is marked (`frames_waiting`) and its next exit delivers. Either way the CPUs
//!   running the VM's vCPUs are kicked (an IPI): a running vCPU exits and takes its NIC's
//!   interrupt or its marked frames, a halted one's CPU leaves its idle wait. One level only:
//!   what those deliveries send on is marked and kicked, not chased further.
//! - Exits of networked VMs also call [`pump`] at most every [`UPLINK_POLL_MICROS`] (over all
//!   CPUs; [`uplink_poll_due`]), so frames from the physical NIC do not wait for a slice end.
//! - And, as before, on every pass of the scheduler loop: [`exchange`] with [`Moment::Pass`]
//!   for each networked VM before its vCPUs are looked at, and [`pump`] (whoever gets the
//!   lock; it may wait a bounded time for room in the physical NIC's transmit queue).
//!
//! Locks: a VM's, then the network's (this module's switch), then a NIC function's; the
//! network lock is never held while waiting for a VM, and a second VM's lock is only tried,
//! so a CPU holding VM A never waits for VM B while B's holder waits for A. Every step is
//! bounded: the switch's budget per run ([`BUDGET`], fair across ports), [`UPLINK_BATCH`]
//! frames from the physical NIC, the switch's bounded queues, one level of deliveries.
//! The `network:` line of the end report counts frames moved at exits and at passes.
//!
//! Time for the switch's MAC ageing is in milliseconds of the TSC.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};
use ringzero_memory::HostMemory;
use ringzero_virtio::{Net, VirtioPci};
use ringzero_vmm::pci::VmMemory;
use ringzero_vmm::vm::Vm;
use ringzero_vswitch::{Frame, MacAddress, PortId, PortKind, Switch, SwitchConfig};

use crate::net::physical_nic;

/// Frames the switch forwards per [`pump`].
const BUDGET: usize = 256;
/// Frames taken from the physical NIC per [`pump`] (its 64 receive buffers, and some).
const UPLINK_BATCH: usize = 96;

struct Network {
    switch: Switch,
    uplink: Option<PortId>,
    /// VM id -> (index of its NIC in `vm.pci`, its port).
    ports: BTreeMap<usize, (usize, PortId)>,
    /// VMs whose frames wait on their ports for the guest to post receive buffers: not worth
    /// a delivery attempt from another VM (their own notification of the receive queue, or
    /// their next pass, delivers).
    starved: BTreeSet<usize>,
}

static NETWORK: spin::Once<spin::Mutex<Network>> = spin::Once::new();

fn network() -> &'static spin::Mutex<Network> {
    NETWORK.call_once(|| {
        let mut switch = Switch::new(SwitchConfig::default())
            .expect("the default switch configuration is valid");
        let uplink = physical_nic().and_then(|_| switch.add_port("uplink", PortKind::Uplink).ok());
        spin::Mutex::new(Network {
            switch,
            uplink,
            ports: BTreeMap::new(),
            starved: BTreeSet::new(),
        })
    })
}

fn now_millis() -> u64 {
    crate::time::tsc_to_micros(ringzero_x86::hw::rdtsc()) / 1000
}

/// Connects the NIC of VM `vm_id` (at `vm.pci[pci_index]`, with `mac`) to the switch. `Err`
/// says why not (the VM then runs with its NIC unplugged from everything).
pub fn connect(vm_id: usize, name: &str, pci_index: usize, mac: [u8; 6]) -> Result<(), String> {
    let mut network = network().lock();
    let port = network
        .switch
        .add_port(
            name,
            PortKind::Vm {
                mac: MacAddress(mac),
            },
        )
        .map_err(|error| alloc::format!("{error:?}"))?;
    network.ports.insert(vm_id, (pci_index, port));
    Ok(())
}

/// Whether VM `vm_id` has a NIC on the switch.
pub fn has_port(vm_id: usize) -> bool {
    NETWORK
        .get()
        .is_some_and(|network| network.lock().ports.contains_key(&vm_id))
}

/// Where frames are being moved from (for the counters and for how long a call may wait).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Moment {
    /// In a VM's exit path, right after the exit that sent them (or right after a kick), with
    /// that VM locked: never waits for the physical NIC.
    Exit,
    /// The scheduler loop's pass.
    Pass,
}

/// How often (at most) the exits of networked VMs look at the physical NIC's receive queue
/// (besides every scheduler loop pass).
const UPLINK_POLL_MICROS: u64 = 200;
/// The TSC before which no exit polls the physical NIC.
static NEXT_UPLINK_POLL: AtomicU64 = AtomicU64::new(0);

/// Where frames moved (the `network:` line of the end report).
struct Counters {
    /// Frames taken from VM NICs' outboxes in the exit path / at a scheduler pass.
    sent_at_exit: AtomicU64,
    sent_at_pass: AtomicU64,
    /// Frames put into VMs' receive queues in an exit path / at a scheduler pass.
    delivered_at_exit: AtomicU64,
    delivered_at_pass: AtomicU64,
    /// Frames taken from the physical NIC in an exit path / at a scheduler pass.
    uplink_in_at_exit: AtomicU64,
    uplink_in_at_pass: AtomicU64,
    /// Frames waited for another VM: it was free (delivered there and then), or busy (marked
    /// and its CPU kicked).
    direct_deliveries: AtomicU64,
    deferred_deliveries: AtomicU64,
}

static COUNTERS: Counters = Counters {
    sent_at_exit: AtomicU64::new(0),
    sent_at_pass: AtomicU64::new(0),
    delivered_at_exit: AtomicU64::new(0),
    delivered_at_pass: AtomicU64::new(0),
    uplink_in_at_exit: AtomicU64::new(0),
    uplink_in_at_pass: AtomicU64::new(0),
    direct_deliveries: AtomicU64::new(0),
    deferred_deliveries: AtomicU64::new(0),
};

fn count(counter: &AtomicU64, frames: u64) {
    if frames > 0 {
        counter.fetch_add(frames, Ordering::Relaxed);
    }
}

/// Counts frames waiting for another VM that were delivered there and then (`direct`), or left
/// on its port with the VM marked and kicked.
pub fn count_delivery(direct: bool) {
    let counter = if direct {
        &COUNTERS.direct_deliveries
    } else {
        &COUNTERS.deferred_deliveries
    };
    count(counter, 1);
}

/// Moves VM `vm`'s frames both ways (see the module documentation): its NIC's outbox into the
/// switch, a bounded run of the switch, the frames on its port into its receive queue, and what
/// waits for the uplink out through the physical NIC (while it has room: never waits). Returns
/// the other VMs with frames waiting on their ports, for the caller to deliver
/// (`scheduler.rs`: this function holds only `vm`'s lock and must not take another VM's).
/// Does nothing for VMs without a NIC.
pub fn exchange(vm: &mut Vm, host: &mut dyn HostMemory, moment: Moment) -> Vec<usize> {
    let Some(network) = NETWORK.get() else {
        return Vec::new();
    };
    // Lock order: the VM (held by the caller), then the network, then the NIC's function.
    let mut network = network.lock();
    let Some(&(pci_index, port)) = network.ports.get(&vm.id) else {
        return Vec::new();
    };
    let Some(slot) = vm.pci.get(pci_index) else {
        return Vec::new();
    };
    let function = slot.function.clone();
    let mut function = function.lock();
    let Some(nic) = function.as_model_mut().downcast_mut::<VirtioPci<Net>>() else {
        return Vec::new();
    };
    // Transmitted: into the switch. When the outbox was full the device stopped taking the
    // transmit queue; run it again now that there is room (the guest will not notify again).
    let was_full = nic.device().outbox_full();
    let mut sent = 0;
    while let Some(frame) = nic.device_mut().take_transmitted() {
        // Refusals are counted by the switch per port and cause.
        let _ = network.switch.submit(port, Frame::new(frame));
        sent += 1;
    }
    let mut memory = VmMemory {
        ram: &mut vm.ram,
        host,
    };
    if was_full {
        nic.process(ringzero_virtio::net::TX_QUEUE, &mut memory);
        while let Some(frame) = nic.device_mut().take_transmitted() {
            let _ = network.switch.submit(port, Frame::new(frame));
            sent += 1;
        }
    }
    let now = now_millis();
    network.switch.run(now, BUDGET);
    // Received: into the guest's receive queue. While the guest has posted no buffer, the
    // frames stay on its port (bounded: the switch drops what does not fit there); the
    // guest's notification of its receive queue, when it posts buffers, brings them.
    let mut delivered = 0;
    let mut starved = false;
    while network.switch.peek(port).is_some() {
        if nic.receive_would_wait(&mut memory) {
            starved = true;
            break;
        }
        let Some(frame) = network.switch.pop(port) else {
            break;
        };
        // Other refusals (a malformed queue, link down) drop the frame, counted by the device.
        let _ = nic.deliver(frame.bytes(), &mut memory);
        delivered += 1;
    }
    if starved {
        network.starved.insert(vm.id);
    } else {
        network.starved.remove(&vm.id);
    }
    drop(function);
    flush_uplink(&mut network, false);
    let (sent_counter, delivered_counter) = match moment {
        Moment::Exit => (&COUNTERS.sent_at_exit, &COUNTERS.delivered_at_exit),
        Moment::Pass => (&COUNTERS.sent_at_pass, &COUNTERS.delivered_at_pass),
    };
    count(sent_counter, sent);
    count(delivered_counter, delivered);
    waiting_vms(&network, Some(vm.id))
}

/// Sends what the switch queued for the uplink through the physical NIC. `wait`: as long as
/// there are frames (each send waits a bounded time for room); otherwise only while the NIC
/// has room now.
fn flush_uplink(network: &mut Network, wait: bool) {
    let (Some(uplink), Some(nic)) = (network.uplink, physical_nic()) else {
        return;
    };
    while network
        .switch
        .egress_level(uplink)
        .is_some_and(|level| level.frames > 0)
    {
        if !wait && !nic.can_transmit() {
            // Left for the next pump (the scheduler loop's, which may wait).
            break;
        }
        let Some(frame) = network.switch.pop(uplink) else {
            break;
        };
        if nic.transmit(frame.bytes()).is_err() {
            // The physical NIC's transmit ring stayed full for its bounded wait: the frame is
            // dropped (counted by the NIC's transmit errors), as a busy link drops.
            break;
        }
    }
}

/// The VMs (other than `except`) whose ports have frames waiting.
fn waiting_vms(network: &Network, except: Option<usize>) -> Vec<usize> {
    network
        .ports
        .iter()
        .filter(|&(&vm_id, &(_, port))| {
            Some(vm_id) != except
                && !network.starved.contains(&vm_id)
                && network
                    .switch
                    .egress_level(port)
                    .is_some_and(|level| level.frames > 0)
        })
        .map(|(&vm_id, _)| vm_id)
        .collect()
}

/// Whether an exit of a networked VM should poll the physical NIC now (at most once per
/// [`UPLINK_POLL_MICROS`] over all CPUs).
pub fn uplink_poll_due() -> bool {
    if NETWORK.get().is_none() || physical_nic().is_none() {
        return false;
    }
    let now = ringzero_x86::hw::rdtsc();
    let next = NEXT_UPLINK_POLL.load(Ordering::Relaxed);
    if now < next {
        return false;
    }
    let interval = crate::time::tsc_hz() / 1_000_000 * UPLINK_POLL_MICROS;
    NEXT_UPLINK_POLL
        .compare_exchange(next, now + interval, Ordering::Relaxed, Ordering::Relaxed)
        .is_ok()
}

/// Moves frames between the physical NIC and the switch (see the module documentation): a
/// bounded batch in from the physical NIC, a bounded run of the switch, and out through the
/// physical NIC what waits for it (at a [`Moment::Pass`], waiting a bounded time for room).
/// Returns the VMs with frames waiting on their ports, for the caller to deliver. Skips when
/// another CPU is at it. Takes no VM's lock.
pub fn pump(moment: Moment) -> Vec<usize> {
    let Some(network) = NETWORK.get() else {
        return Vec::new();
    };
    let Some(mut network) = network.try_lock() else {
        return Vec::new();
    };
    let (Some(uplink), Some(nic)) = (network.uplink, physical_nic()) else {
        return Vec::new();
    };
    let mut received = 0;
    for _ in 0..UPLINK_BATCH {
        let Some(frame) = nic.receive() else {
            break;
        };
        let _ = network.switch.submit(uplink, Frame::new(frame));
        received += 1;
    }
    let now = now_millis();
    network.switch.run(now, BUDGET);
    flush_uplink(&mut network, moment == Moment::Pass);
    count(
        match moment {
            Moment::Exit => &COUNTERS.uplink_in_at_exit,
            Moment::Pass => &COUNTERS.uplink_in_at_pass,
        },
        received,
    );
    waiting_vms(&network, None)
}

/// The switch's statistics lines: one per port and one for the switch (for the end report).
pub fn statistics() -> Vec<String> {
    let Some(network) = NETWORK.get() else {
        return Vec::new();
    };
    let network = network.lock();
    let mut lines: Vec<String> = network
        .switch
        .ports()
        .filter_map(|port| network.switch.port_line(port))
        .map(|line| alloc::format!("{line}"))
        .collect();
    lines.push(alloc::format!("{}", network.switch.stats()));
    let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
    lines.push(alloc::format!(
        "network: sent_at_exit={} sent_at_pass={} delivered_at_exit={} delivered_at_pass={} uplink_in_at_exit={} uplink_in_at_pass={} direct_deliveries={} deferred_deliveries={}",
        read(&COUNTERS.sent_at_exit),
        read(&COUNTERS.sent_at_pass),
        read(&COUNTERS.delivered_at_exit),
        read(&COUNTERS.delivered_at_pass),
        read(&COUNTERS.uplink_in_at_exit),
        read(&COUNTERS.uplink_in_at_pass),
        read(&COUNTERS.direct_deliveries),
        read(&COUNTERS.deferred_deliveries),
    ));
    lines
}
