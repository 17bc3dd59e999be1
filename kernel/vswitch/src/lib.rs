//! The virtual switch: the VMs' virtual NICs multiplexed onto the one physical NIC. Frames a
//! VM sends go out through the physical NIC (or straight to another VM); frames arriving from
//! the physical NIC go to the VM whose address they carry. It is a learning layer-2 switch
//! whose ports are the VMs' NICs and the physical uplink.
//!
//! Spec: IEEE 802.3-2018 clause 3 (frame format), IEEE 802.1Q-2018 clauses 8.7 and 8.8
//! (learning, filtering database, ageing) and 9 (the VLAN tag, tolerated and not
//! interpreted). Section numbers in this crate refer to them.
//!
//! Host-testable and free of `unsafe`. Every frame is hostile input: the header is parsed
//! with checked lengths, nothing a guest sends panics, and every queue and table is bounded
//! (see [`SwitchConfig`]), so the memory the switch holds is at most
//! `max_ports * (input_bytes + egress_bytes)` of frame data plus `table_capacity` entries.
//!
//! Policy, beyond a plain learning bridge:
//! - A VM port's address is pinned at [`Switch::add_port`]: a VM sends only from its own
//!   address, its address is never learned on another port, and the uplink may not send
//!   from it (both are dropped and counted as spoofed). So all learning happens on the uplink.
//! - Group (multicast, broadcast) and all-zero source addresses are dropped as bad sources.
//! - Bounded per-port input queues served round-robin ([`Switch::run`]) keep a flooding guest
//!   to its share; bounded per-port egress queues keep a slow receiver from taking memory.
//!
//! How the hypervisor uses it: build a [`Switch`] from a [`SwitchConfig`] (its ageing time
//! is in the unit of the caller's clock: [`SwitchConfig::with_ticks_per_second`]); add the
//! uplink and one [`PortKind::Vm`] port per virtual NIC with [`Switch::add_port`]; hand each
//! frame a port sends to [`Switch::submit`]; call [`Switch::run`] with the current time and
//! a budget of frames (from the network poll loop); then [`Switch::pop`] the frames of each
//! port into that VM's receive queue or the physical NIC's transmit ring. When a VM stops,
//! [`Switch::remove_port`]. Statistics: [`Switch::port_line`] and [`Switch::stats`], one
//! line each.
//!
//! Written here rather than taken from a crate: the forwarding is small, and the policy
//! (pinned addresses, spoofing checks, bounds, fairness) is the hypervisor's own; the
//! Ethernet crates there are (smoltcp's `wire`, etherparse) parse for a host stack and would
//! add a dependency for 14 bytes of header.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod frame;
pub mod mac;
pub mod switch;
pub mod table;

pub use frame::{Frame, FrameError, FrameHeader, TypeOrLength};
pub use mac::MacAddress;
pub use switch::{
    ConfigError, DropCause, PortDrops, PortError, PortId, PortKind, PortLine, PortStats,
    QueueLevel, SubmitError, Switch, SwitchConfig, SwitchStats,
};
pub use table::{MacTable, TableStats};

#[cfg(test)]
mod tests;
