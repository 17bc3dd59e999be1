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
use ringzero_devices::ioapic::{Delivery, DeliveryMode, DestinationMode};
use ringzero_devices::{
    ApicEvent, IpiDelivery, IpiDestination, LocalApic, Pit, TimerClock, Uart16550,
};

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
    /// Executed HLT with interrupts disabled while other vCPUs run (an operating system parking
    /// a CPU, as Linux does before it powers off): only INIT can start it again.
    Parked,
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
    /// IA32_TSC_AUX as the guest last wrote it.
    pub tsc_aux: u64,
    /// Whether the interrupt window was requested from the backend and not taken yet.
    window_open: bool,
    /// The last exits, for the report when the guest ends badly.
    pub recent: crate::stats::RecentExits,
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
            tsc_aux: 0,
            window_open: false,
            recent: crate::stats::RecentExits::default(),
        }
    }
}

impl VcpuState {
    /// A halted vCPU whose local APIC now has an interrupt to deliver runs again (the time it
    /// was halted is counted). Returns whether the vCPU may run: true unless it is still halted.
    pub fn wake_if_interrupted(&mut self, now: u64) -> bool {
        let Activity::Halted { since } = self.activity else {
            return true;
        };
        if self.apic.pending_vector().is_none() {
            return false;
        }
        self.stats.halted_cycles += now.saturating_sub(since);
        self.activity = Activity::Running;
        true
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
        Activity::WaitingForStartup | Activity::Parked => false,
        Activity::Halted { .. } => {
            let _ = vcpu;
            poll_devices(vm, now);
            let vcpu = &mut vm.vcpus[index];
            vcpu.apic.advance_timer(now);
            vcpu.apic.pending_vector().is_some()
        }
    }
}

/// The I/O APIC pin of ISA IRQ `irq` (IRQ 0, the PIT, arrives at pin 2, as the MADT's interrupt
/// source override says; the others at their own number). See: ACPI 6.5 5.2.12.5.
fn gsi_of_isa_irq(irq: u8) -> u8 {
    if irq == 0 {
        2
    } else {
        irq
    }
}

/// The PIT's IRQ 0 (edges).
const PIT_IRQ: u8 = 0;
/// The most PIT ticks owed to a guest (see `poll_devices`): a guest that did not run for a
/// long time gets this many late ticks, not one per period missed.
const PIT_MAX_OWED: u32 = 16;
/// COM1's IRQ 4 (a line: asserted while the UART has an interrupt pending and MCR.OUT2 gates
/// it onto the bus, as on PCs). See: PC16550D datasheet 8.6 (MCR OUT2).
const COM1_IRQ: u8 = 4;

/// Samples the devices' interrupt lines and sends what the I/O APIC routes to the local APICs:
/// the PIT's edges since the last look, and the UART's line when it changed. Only for VMs with
/// an I/O APIC (the PC platform of Linux VMs). Called before each entry and for halted vCPUs.
pub fn poll_devices(vm: &mut Vm, now: u64) {
    if vm.io_apic.is_none() {
        return;
    }
    let mut deliveries = Vec::new();
    let pit_edges = vm
        .bus
        .device_mut::<Pit>(Pit::BASE)
        .map_or(0, |pit| pit.irq0_edges(now));
    // Ticks that fell due while the vCPU did not run are owed, not lost, and delivered one at
    // a time: the next once the guest has taken the last (its vector left the local APIC's
    // IRR), as KVM's PIT does in its default "reinject" mode. Linux counts ticks at boot
    // (`timer_irq_works`: more than 4 in about 10 periods) and panics with "IO-APIC + timer
    // doesn't work!" when a busy host coalesced them. Bounded: at most PIT_MAX_OWED.
    vm.pit_owed = vm.pit_owed.saturating_add(pit_edges).min(PIT_MAX_OWED);
    if vm.pit_owed > 0 {
        let pin = gsi_of_isa_irq(PIT_IRQ);
        let io_apic = vm.io_apic.as_ref().expect("checked above");
        let vector = io_apic.redirection_entry(pin).map(|entry| entry as u8);
        let last_not_taken =
            vector.is_some_and(|vector| vm.vcpus.iter().any(|vcpu| vcpu.apic.is_requested(vector)));
        if !last_not_taken {
            vm.pit_owed -= 1;
            let io_apic = vm.io_apic.as_mut().expect("checked above");
            deliveries.extend(io_apic.pulse(pin));
        }
    }
    let uart_line = vm
        .bus
        .device_mut::<Uart16550>(Uart16550::COM1)
        .is_some_and(|uart| uart.interrupt_pending() && uart.out2());
    let pin = gsi_of_isa_irq(COM1_IRQ);
    let bit = 1u32 << pin;
    if uart_line != (vm.irq_lines & bit != 0) {
        let io_apic = vm.io_apic.as_mut().expect("checked above");
        if uart_line {
            vm.irq_lines |= bit;
            deliveries.extend(io_apic.raise(pin));
        } else {
            vm.irq_lines &= !bit;
            io_apic.lower(pin);
        }
    }
    // PCI INTx lines (virtio devices): level-triggered pins from 16 up, as the `_PRT` says.
    if !vm.pci.is_empty() {
        let lines = crate::pci::interrupt_lines(vm);
        let pci_pins = vm
            .pci
            .iter()
            .fold(0u32, |pins, slot| pins | 1 << (slot.gsi & 31));
        let changed = (lines ^ vm.irq_lines) & pci_pins;
        let io_apic = vm.io_apic.as_mut().expect("checked above");
        for pin in 0..32u32 {
            let bit = 1 << pin;
            if changed & bit == 0 {
                continue;
            }
            if lines & bit != 0 {
                vm.irq_lines |= bit;
                deliveries.extend(io_apic.raise(pin as u8));
            } else {
                vm.irq_lines &= !bit;
                io_apic.lower(pin as u8);
            }
        }
    }
    for delivery in deliveries {
        deliver_quietly(vm, delivery, now);
    }
}

/// Delivers an interrupt message from the I/O APIC to the local APICs it names, waking them.
pub fn deliver(vm: &mut Vm, delivery: Delivery, platform: &mut dyn Platform, now: u64) {
    for target in deliver_quietly(vm, delivery, now) {
        platform.wake(vm.id, target);
    }
}

/// [`deliver`] without waking other CPUs (the caller is about to look at the targets itself).
/// Returns the targets.
fn deliver_quietly(vm: &mut Vm, delivery: Delivery, now: u64) -> Vec<usize> {
    let destination = match delivery.destination_mode {
        DestinationMode::Physical if delivery.destination == 0xFF => {
            IpiDestination::AllIncludingSelf
        }
        DestinationMode::Physical => IpiDestination::Apic(u32::from(delivery.destination)),
        DestinationMode::Logical => IpiDestination::Logical(u32::from(delivery.destination)),
    };
    let mut targets = targets(vm, 0, destination);
    match delivery.mode {
        DeliveryMode::Fixed => {}
        // See: SDM Vol 3A 11.6.2.4: one of the targets (the first here).
        DeliveryMode::LowestPriority => targets.truncate(1),
        other => {
            log::warn!(
                "vm {}: I/O APIC delivery mode {other:?} (vector {:#x}) not supported; dropped",
                vm.name,
                delivery.vector
            );
            return Vec::new();
        }
    }
    for &target in &targets {
        let state = &mut vm.vcpus[target];
        if delivery.level_triggered {
            state.apic.accept_level_triggered(delivery.vector);
        } else {
            state.apic.accept(delivery.vector);
        }
        state.wake_if_interrupted(now);
    }
    targets
}

/// The TSC at which a halted vCPU's APIC timer next fires, if armed (the scheduler may sleep
/// until then).
pub fn next_timer(vm: &mut Vm, index: usize, now: u64) -> Option<u64> {
    vm.vcpus[index].apic.advance_timer(now)
}

/// Just before entry: apply a pending startup IPI, fire the APIC timer if due, and inject the
/// highest pending interrupt if the guest can take it now, else ask for an exit as soon as it
/// can (the interrupt window).
pub fn prepare_entry(
    vm: &mut Vm,
    index: usize,
    vcpu: &mut dyn Vcpu,
    now: u64,
    exit_was_window: bool,
) {
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
    poll_devices(vm, now);
    let state = &mut vm.vcpus[index];
    state.apic.advance_timer(now);
    let wanted_window = match state.apic.pending_vector() {
        Some(vector) if vcpu.can_inject_interrupt() => {
            vcpu.inject_interrupt(vector);
            state.apic.acknowledge(vector);
            state.stats.interrupts += 1;
            false
        }
        Some(_) => true,
        None => false,
    };
    // The backend closes the window itself when its exit is taken; otherwise open or close it
    // only when that changes.
    if exit_was_window {
        state.window_open = false;
    }
    if wanted_window != state.window_open {
        vcpu.request_interrupt_window(wanted_window);
        state.window_open = wanted_window;
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

/// HLT with interrupts disabled. With one vCPU nothing can ever wake it: the caller stops the
/// VM (returns false). With several, the vCPU is parked (only INIT restarts it), unless every
/// other vCPU is parked or waits for a startup IPI too: then the VM can never go on (false).
pub fn park(vm: &mut Vm, index: usize) -> bool {
    let others_can_run = vm.vcpus.iter().enumerate().any(|(other, state)| {
        other != index
            && !matches!(
                state.activity,
                Activity::Parked | Activity::WaitingForStartup
            )
    });
    if others_can_run {
        vm.vcpus[index].activity = Activity::Parked;
    }
    others_can_run
}

/// Whether every vCPU of the VM waits for something (halted, parked, or waiting for a startup
/// IPI): the guest is idle, so a console line it left unfinished (a prompt) may be shown.
pub fn all_waiting(vm: &Vm) -> bool {
    vm.vcpus.iter().all(|state| {
        !matches!(
            state.activity,
            Activity::Running | Activity::StartupPending { .. }
        )
    })
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
            // The EOI of a level-triggered interrupt: the I/O APIC may deliver it again if its
            // line is still asserted. See: SDM Vol 3A 11.8.5; 82093AA 3.2.4 (Remote IRR).
            ApicEvent::EndOfInterrupt { vector } => {
                let again = vm
                    .io_apic
                    .as_mut()
                    .map(|io_apic| io_apic.end_of_interrupt(vector))
                    .unwrap_or_default();
                for delivery in again {
                    deliver(vm, delivery, platform, now);
                }
            }
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
                state.wake_if_interrupted(now);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paging::GuestPaging;
    use ringzero_devices::PortDevice;
    use ringzero_memory::shadow::{GuestPagingState, ShadowPaging};
    use ringzero_memory::GuestRam;

    /// Records the wakes the core asks for.
    #[derive(Default)]
    struct Wakes(Vec<(usize, usize)>);

    impl Platform for Wakes {
        fn host_cpuid(&self, _leaf: u32, _subleaf: u32) -> [u32; 4] {
            [0; 4]
        }
        fn timestamp(&self) -> u64 {
            0
        }
        fn console_line(&mut self, _vm_name: &str, _line: &str) {}
        fn wake(&mut self, vm_id: usize, vcpu: usize) {
            self.0.push((vm_id, vcpu));
        }
    }

    fn vm(vcpus: usize) -> Vm {
        let paging = GuestPaging::Shadow {
            engine: ShadowPaging::new(1),
            visible: GuestPagingState::default(),
        };
        let mut vm = Vm::with_vcpus(
            "smp",
            GuestRam::new_lazy(1 << 20),
            paging,
            false,
            vcpus,
            DEFAULT_CLOCK,
        );
        vm.id = 7;
        vm
    }

    /// The ICR write of vCPU `source` (xAPIC: high word first, the low word sends).
    fn send(vm: &mut Vm, source: usize, low: u32, destination: u8) -> Wakes {
        let mut platform = Wakes::default();
        let mut events = Vec::new();
        vm.vcpus[source]
            .apic
            .write_mmio(0x310, u32::from(destination) << 24, 0, &mut events);
        vm.vcpus[source].apic.write_mmio(0x300, low, 0, &mut events);
        apic_events(vm, source, events, &mut platform, 0);
        platform
    }

    fn enable_apic(vm: &mut Vm, index: usize) {
        let mut events = Vec::new();
        vm.vcpus[index].apic.write_mmio(0xF0, 0x1FF, 0, &mut events);
    }

    /// A VM with one vCPU whose APIC is on, an I/O APIC sending pin 2 (the PIT) as vector
    /// 0x30, and a PIT whose channel 0 ticks every 1193 clocks (1 ms) from TSC 0.
    fn vm_with_a_ticking_pit() -> Vm {
        let mut vm = vm(1);
        enable_apic(&mut vm, 0);
        let mut io_apic = ringzero_devices::IoApic::new(1);
        for (register, value) in [(0x14, 0x30), (0x15, 0)] {
            io_apic.write_mmio(0x00, 4, register);
            io_apic.write_mmio(0x10, 4, value);
        }
        vm.io_apic = Some(io_apic);
        let mut pit = Pit::new(DEFAULT_CLOCK.tsc_hz);
        let mut events = Vec::new();
        // Channel 0, LSB then MSB, mode 2 (rate generator), count 1193.
        pit.write(0x43, 1, 0x34, &mut events);
        pit.write(0x40, 1, 1193 & 0xFF, &mut events);
        pit.write(0x40, 1, 1193 >> 8, &mut events);
        vm.bus
            .add(alloc::boxed::Box::new(pit))
            .expect("the PIT's ports are free");
        vm
    }

    /// The guest takes the pending PIT interrupt and ends it (injection, then EOI).
    fn take_tick(vm: &mut Vm) -> bool {
        if vm.vcpus[0].apic.pending_vector() != Some(0x30) {
            return false;
        }
        vm.vcpus[0].apic.acknowledge(0x30);
        let mut events = Vec::new();
        vm.vcpus[0].apic.write_mmio(0xB0, 0, 0, &mut events);
        true
    }

    #[test]
    fn late_pit_ticks_are_owed_and_delivered_one_at_a_time() {
        let mut vm = vm_with_a_ticking_pit();
        // 10 ms pass while the vCPU does not run: ten ticks fall due.
        poll_devices(&mut vm, 10_000_000);
        assert!(take_tick(&mut vm), "the first late tick");
        let mut ticks = 1;
        // Each poll (before an entry) sends the next owed tick once the last was taken, and
        // nothing while it still waits in the IRR.
        for _ in 0..40 {
            poll_devices(&mut vm, 10_000_000);
            poll_devices(&mut vm, 10_000_000);
            if !take_tick(&mut vm) {
                break;
            }
            ticks += 1;
        }
        assert!((9..=10).contains(&ticks), "{ticks} ticks for 10 ms");
        assert_eq!(vm.pit_owed, 0);
        // A long absence owes at most PIT_MAX_OWED ticks.
        poll_devices(&mut vm, 2_000_000_000);
        let mut late = 0;
        while take_tick(&mut vm) {
            late += 1;
            poll_devices(&mut vm, 2_000_000_000);
        }
        assert_eq!(late, PIT_MAX_OWED);
    }

    #[test]
    fn the_bootstrap_vcpu_runs_and_the_others_wait_for_a_startup_ipi() {
        let mut vm = vm(3);
        assert_eq!(vm.vcpus[0].activity, Activity::Running);
        assert_eq!(vm.vcpus[1].activity, Activity::WaitingForStartup);
        assert!(is_runnable(&mut vm, 0, 0));
        assert!(!is_runnable(&mut vm, 1, 0));
        assert_eq!(vm.vcpus[2].apic.id(), 2);
    }

    #[test]
    fn init_then_startup_starts_exactly_the_addressed_vcpu() {
        let mut vm = vm(3);
        // INIT (delivery mode 101, level assert), then SIPI vector 0x10 (mode 110) to APIC 1.
        let wakes = send(&mut vm, 0, 0x0000_4500, 1);
        assert_eq!(wakes.0, [(7, 1)]);
        assert_eq!(vm.vcpus[1].activity, Activity::WaitingForStartup);
        send(&mut vm, 0, 0x0000_4610, 1);
        assert_eq!(
            vm.vcpus[1].activity,
            Activity::StartupPending { vector: 0x10 }
        );
        assert!(is_runnable(&mut vm, 1, 0));
        assert_eq!(vm.vcpus[2].activity, Activity::WaitingForStartup);
        // A second SIPI (the MP protocol sends two) changes nothing once the vCPU left the
        // wait-for-SIPI state.
        vm.vcpus[1].activity = Activity::Running;
        send(&mut vm, 0, 0x0000_4611, 1);
        assert_eq!(vm.vcpus[1].activity, Activity::Running);
    }

    #[test]
    fn a_fixed_ipi_wakes_a_halted_vcpu_and_becomes_its_pending_interrupt() {
        let mut vm = vm(2);
        vm.vcpus[1].activity = Activity::Running;
        enable_apic(&mut vm, 1);
        assert!(halt(&mut vm, 1, 100), "two vCPUs: the other can wake it");
        assert!(!is_runnable(&mut vm, 1, 200));
        let wakes = send(&mut vm, 0, 0x0000_0040, 1);
        assert_eq!(wakes.0, [(7, 1)]);
        assert!(is_runnable(&mut vm, 1, 300));
        assert_eq!(vm.vcpus[1].apic.pending_vector(), Some(0x40));
        assert_eq!(vm.vcpus[0].apic.pending_vector(), None);
    }

    #[test]
    fn a_fixed_ipi_to_a_disabled_apic_is_dropped() {
        let mut vm = vm(2);
        vm.vcpus[1].activity = Activity::Running;
        send(&mut vm, 0, 0x0000_0040, 1);
        assert_eq!(vm.vcpus[1].apic.pending_vector(), None);
    }

    #[test]
    fn shorthands_reach_self_all_and_all_but_self() {
        let mut vm = vm(3);
        for index in 0..3 {
            vm.vcpus[index].activity = Activity::Running;
            enable_apic(&mut vm, index);
        }
        // Shorthand 11: all excluding self.
        send(&mut vm, 1, 0x000C_0041, 0);
        let pending: Vec<_> = vm.vcpus.iter().map(|v| v.apic.pending_vector()).collect();
        assert_eq!(pending, [Some(0x41), None, Some(0x41)]);
        // Shorthand 01: self.
        send(&mut vm, 1, 0x0004_0042, 0);
        assert_eq!(vm.vcpus[1].apic.pending_vector(), Some(0x42));
    }

    #[test]
    fn hlt_with_nothing_to_wake_it_goes_on_at_once() {
        let mut vm = vm(1);
        assert!(!halt(&mut vm, 0, 0), "one vCPU, no timer, no device");
        assert_eq!(vm.vcpus[0].activity, Activity::Running);
        vm.interrupt_sources = true;
        assert!(halt(&mut vm, 0, 0), "a device may interrupt it");
    }

    #[test]
    fn a_vm_past_its_deadline_or_ended_is_runnable_so_that_it_can_stop() {
        let mut vm = vm(2);
        assert!(!is_runnable(&mut vm, 1, 10));
        vm.deadline = Some(5);
        assert!(is_runnable(&mut vm, 1, 10));
        vm.deadline = None;
        vm.end = Some(crate::vm::VmEnd::PowerOff);
        assert!(is_runnable(&mut vm, 1, 10));
    }
}
