//! The VMs' networks: every VM NIC (a virtio-net PCI function of its VM) and the physical NIC
//! (`net.rs`) are ports of one software switch (`ringzero_vswitch`). Frames a VM sends are
//! multiplexed onto the physical NIC; frames that arrive are delivered to the VM whose MAC they
//! are for (or flooded, for broadcasts and unknown destinations); VMs reach each other directly.
//!
//! Who moves frames:
//! - [`exchange`], with the VM locked, on the CPU about to look at one of its vCPUs (the
//!   scheduler loop): the frames its NIC transmitted go into the switch; the frames waiting on
//!   its port go into its receive queue (raising its interrupt line, which wakes a halted vCPU).
//! - [`pump`], from every CPU's scheduler loop (whoever gets the lock): the frames the physical
//!   NIC received go in at the uplink, the switch forwards a bounded batch, and what it queued
//!   for the uplink goes out through the physical NIC.
//!
//! Time for the switch's MAC ageing is in milliseconds of the TSC.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
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

/// Moves VM `vm`'s frames both ways (see the module documentation). Does nothing for VMs
/// without a NIC.
pub fn exchange(vm: &mut Vm, host: &mut dyn HostMemory) {
    let Some(network) = NETWORK.get() else {
        return;
    };
    let mut network = network.lock();
    let Some(&(pci_index, port)) = network.ports.get(&vm.id) else {
        return;
    };
    let Some(slot) = vm.pci.get(pci_index) else {
        return;
    };
    let function = slot.function.clone();
    let mut function = function.lock();
    let Some(nic) = function.as_model_mut().downcast_mut::<VirtioPci<Net>>() else {
        return;
    };
    // Transmitted: into the switch. When the outbox was full the device stopped taking the
    // transmit queue; run it again now that there is room (the guest will not notify again).
    let was_full = nic.device().outbox_full();
    while let Some(frame) = nic.device_mut().take_transmitted() {
        // Refusals are counted by the switch per port and cause.
        let _ = network.switch.submit(port, Frame::new(frame));
    }
    let mut memory = VmMemory {
        ram: &mut vm.ram,
        host,
    };
    if was_full {
        nic.process(ringzero_virtio::net::TX_QUEUE, &mut memory);
        while let Some(frame) = nic.device_mut().take_transmitted() {
            let _ = network.switch.submit(port, Frame::new(frame));
        }
    }
    let now = now_millis();
    network.switch.run(now, BUDGET);
    // Received: into the guest's receive queue (dropped and counted by the device when the
    // guest has posted no buffers).
    while let Some(frame) = network.switch.pop(port) {
        let _ = nic.deliver(frame.bytes(), &mut memory);
    }
}

/// Moves frames between the physical NIC and the switch (see the module documentation). Skips
/// when another CPU is at it.
pub fn pump() {
    let Some(network) = NETWORK.get() else {
        return;
    };
    let Some(mut network) = network.try_lock() else {
        return;
    };
    let (Some(uplink), Some(nic)) = (network.uplink, physical_nic()) else {
        return;
    };
    for _ in 0..UPLINK_BATCH {
        let Some(frame) = nic.receive() else {
            break;
        };
        let _ = network.switch.submit(uplink, Frame::new(frame));
    }
    let now = now_millis();
    network.switch.run(now, BUDGET);
    while let Some(frame) = network.switch.pop(uplink) {
        if nic.transmit(frame.bytes()).is_err() {
            // The physical NIC's transmit ring stayed full for its bounded wait: the frame is
            // dropped (counted by the NIC's transmit errors), as a busy link drops.
            break;
        }
    }
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
    lines
}
