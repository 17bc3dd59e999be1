//! The vCPUs of a VM as the VM sees them: each one's local APIC (the guest's view, modelled by
//! `ringzero_devices::LocalApic`), whether it runs, halts or waits for a startup IPI, and its
//! statistics. Also what happens between vCPUs: inter-processor interrupts sent through a
//! guest's ICR, INIT and SIPI starting an application processor, and the delivery of pending
//! interrupts into the guest at entry.
//!
//! Everything here is done under the VM's lock (see `vm::run_slice`); a vCPU that runs on
//! another physical CPU notices what happened to it at its next exit, or at once when the
//! platform kicks its CPU (`Platform::wake`).

use crate::vcpu::Vcpu;
use crate::vm::Vm;
use crate::Platform;
use alloc::vec::Vec;
use ringzero_devices::{ApicEvent, IpiDelivery, IpiDestination, LocalApic, TimerClock};

/// The guest-physical page of every vCPU's local APIC registers (xAPIC mode).
/// See: SDM Vol 3A 11.4.1.
pub const APIC_PAGE: u64 = ringzero_devices::APIC_BASE;

/// What a vCPU is doing, as far as the scheduler cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activity {
    /// Runs, or is ready to.
    Running,
    /// Executed HLT with interrupts enabled (at TSC `since`): waits for an interrupt.
    Halted { since: u64 },
    /// An application processor after power-up or INIT: waits for a startup IPI.
    /// See: SDM Vol 3A 9.4.4 (MP initialization), 11.4.7.3.
    WaitingForStartup,
    /// A startup IPI arrived: the vCPU starts in real mode at `vector << 12` at its next run.
    StartupPending { vector: u8 },
}

/// Per-vCPU figures, printed when the VM ends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuStats {
    pub exits: u64,
    /// TSC cycles spent in the guest.
    pub guest_cycles: u64,
    /// TSC cycles spent halted (HLT until an interrupt).
    pub halted_cycles: u64,
    /// Times the scheduler took the CPU away at the end of a slice.
    pub preemptions: u64,
    /// Interrupts injected (IPIs, timer).
    pub interrupts: u64,
    /// The physical CPU it ran on.
    pub cpu: Option<usize>,
    /// TSC of the first entry and of the last exit.
    pub first_entry: Option<u64>,
    pub last_exit: u64,
}

/// One vCPU's state shared with the rest of its VM.
pub struct VcpuState {
    pub apic: LocalApic,
    pub activity: Activity,
    pub stats: VcpuStats,
}

impl VcpuState {
    /// vCPU `index` of a VM: vCPU 0 is the bootstrap processor and runs from the boot plan's
    /// entry state; the others wait for INIT and a startup IPI. APIC ID = index.
    pub fn new(index: usize, clock: TimerClock) -> VcpuState {
        let bootstrap = index == 0;
        VcpuState {
            apic: LocalApic::new(index as u32, bootstrap, clock),
            activity: if bootstrap {
                Activity::Running
            } else {
                Activity::WaitingForStartup
            },
            stats: VcpuStats::default(),
        }
    }
}

/// The clock guests' APIC timers count against when the platform gave none: a 1 GHz TSC and a
/// 1 GHz APIC timer input.
pub const DEFAULT_CLOCK: TimerClock = TimerClock {
    tsc_hz: 1_000_000_000,
    apic_timer_hz: 1_000_000_000,
};

/// Whether vCPU `index` can run now (or must be scheduled so that it notices its VM ended).
/// A halted vCPU wakes for an interrupt its APIC would deliver, its APIC timer included.
pub fn is_runnable(vm: &mut Vm, index: usize, now: u64) -> bool {
    if vm.end.is_some() || vm.deadline.is_some_and(|deadline| now >= deadline) {
        return true;
    }
    let vcpu = &mut vm.vcpus[index];
    match vcpu.activity {
        Activity::Running | Activity::StartupPending { .. } => true,
        Activity::WaitingForStartup => false,
        Activity::Halted { .. } => {
            vcpu.apic.advance_timer(now);
            vcpu.apic.pending_vector().is_some()
        }
    }
}

/// The TSC at which a halted vCPU's APIC timer next fires, if armed (the scheduler may sleep
/// until then).
pub fn next_timer(vm: &mut Vm, index: usize, now: u64) -> Option<u64> {
    vm.vcpus[index].apic.advance_timer(now)
}

/// Just before entry: apply a pending startup IPI, fire the APIC timer if due, and inject the
/// highest pending interrupt if the guest can take it now, else ask for an exit as soon as it
/// can (the interrupt window).
pub fn prepare_entry(vm: &mut Vm, index: usize, vcpu: &mut dyn Vcpu, now: u64) {
    let state = &mut vm.vcpus[index];
    if let Activity::StartupPending { vector } = state.activity {
        vcpu.start_at_startup_vector(vector);
        state.activity = Activity::Running;
        log::info!(
            "vm {}: vcpu {index} started by INIT/SIPI at {:#x} (real mode)",
            vm.name,
            u64::from(vector) << 12
        );
    }
    let state = &mut vm.vcpus[index];
    state.apic.advance_timer(now);
    match state.apic.pending_vector() {
        Some(vector) if vcpu.can_inject_interrupt() => {
            vcpu.inject_interrupt(vector);
            state.apic.acknowledge(vector);
            state.stats.interrupts += 1;
            vcpu.request_interrupt_window(false);
        }
        Some(_) => vcpu.request_interrupt_window(true),
        None => vcpu.request_interrupt_window(false),
    }
}

/// HLT with interrupts enabled: whether the vCPU waits (true) or goes on at once (false).
/// It goes on at once when an interrupt is already pending (it is injected at entry), and when
/// nothing could ever wake it (one vCPU, no armed APIC timer, no interrupting device): such a
/// guest resumes as if an event had arrived, as it did before ringzero had interrupts.
pub fn halt(vm: &mut Vm, index: usize, now: u64) -> bool {
    let can_be_woken = vm.vcpus.len() > 1 || vm.interrupt_sources;
    let state = &mut vm.vcpus[index];
    let timer_armed = state.apic.advance_timer(now).is_some();
    if state.apic.pending_vector().is_some() || !(can_be_woken || timer_armed) {
        return false;
    }
    state.activity = Activity::Halted { since: now };
    true
}

/// The vCPUs an IPI from `source` is for. See: SDM Vol 3A 11.6.2 (destination modes), 11.6.1
/// (shorthands).
fn targets(vm: &Vm, source: usize, destination: IpiDestination) -> Vec<usize> {
    (0..vm.vcpus.len())
        .filter(|&target| match destination {
            IpiDestination::Apic(id) => vm.vcpus[target].apic.id() == id,
            IpiDestination::Logical(logical) => vm.vcpus[target].apic.matches_logical(logical),
            IpiDestination::SelfOnly => target == source,
            IpiDestination::AllIncludingSelf => true,
            IpiDestination::AllExcludingSelf => target != source,
        })
        .collect()
}

/// Carries out what a write to vCPU `source`'s APIC asked for: IPIs to the VM's vCPUs.
pub fn apic_events(
    vm: &mut Vm,
    source: usize,
    events: Vec<ApicEvent>,
    platform: &mut dyn Platform,
    now: u64,
) {
    for event in events {
        match event {
            ApicEvent::Ipi {
                destination,
                delivery,
            } => deliver_ipi(vm, source, destination, delivery, platform, now),
            // Level-triggered interrupts come from the I/O APIC, which is not wired yet.
            ApicEvent::EndOfInterrupt { .. } => {}
        }
    }
}

fn deliver_ipi(
    vm: &mut Vm,
    source: usize,
    destination: IpiDestination,
    delivery: IpiDelivery,
    platform: &mut dyn Platform,
    now: u64,
) {
    let mut targets = targets(vm, source, destination);
    if matches!(delivery, IpiDelivery::LowestPriority { .. }) {
        // Lowest priority: the hypervisor picks one target (the first). See: SDM Vol 3A 11.6.2.4.
        targets.truncate(1);
    }
    for target in targets {
        let name = &vm.name;
        let state = &mut vm.vcpus[target];
        match delivery {
            IpiDelivery::Fixed { vector } | IpiDelivery::LowestPriority { vector } => {
                state.apic.accept(vector);
                if let Activity::Halted { since } = state.activity {
                    if state.apic.pending_vector().is_some() {
                        state.stats.halted_cycles += now.saturating_sub(since);
                        state.activity = Activity::Running;
                    }
                }
            }
            IpiDelivery::Init => {
                state.apic.receive_init();
                if state.apic.is_waiting_for_sipi() {
                    state.activity = Activity::WaitingForStartup;
                } else {
                    log::warn!("vm {name}: INIT to the bootstrap vCPU {target} ignored (no reset)");
                }
            }
            IpiDelivery::Startup { vector } => {
                if state.apic.receive_startup(vector).is_some() {
                    state.activity = Activity::StartupPending { vector };
                }
            }
            IpiDelivery::Nmi => {
                log::warn!("vm {name}: NMI IPI from vcpu {source} to vcpu {target} not delivered (NMIs are not virtualized)");
            }
        }
        platform.wake(vm.id, target);
    }
}
