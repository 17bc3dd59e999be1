//! Runs the VMs of the manifest concurrently: every vCPU is placed on one physical CPU (pinned
//! by the configuration, or spread over the least-loaded CPUs), and each CPU time-slices the
//! vCPUs placed on it.
//!
//! The flow:
//! 1. The bootstrap CPU builds every VM (`guests::build_vm`: RAM, image, nested page tables or
//!    shadow paging, devices), places its vCPUs and publishes the [`Schedule`].
//! 2. Every CPU that has vCPUs (the application processors wake from their idle loop) turns its
//!    own virtualization on (`Backend::new`: EFER.SVME and a host save area, or VMXON), creates
//!    the vCPUs placed on it (a VMCB / VMCS belongs to the CPU that runs it: no migration), and
//!    loops: pick the next runnable vCPU round-robin, run it for one slice
//!    (`ringzero_vmm::vm::run_slice`), and go on. A vCPU that halts or waits for its startup IPI
//!    gives the CPU away until an event for it arrives; a CPU with nothing runnable halts until
//!    its next timer tick or a kick from another CPU. Networked VMs' frames move at each pass
//!    and, as soon as they are sent, in the exit path (`CpuPlatform::exit_handled`); frames for
//!    a VM whose lock another CPU holds are marked on its slot and that CPU is kicked
//!    (`network.rs` explains the order of locks).
//! 3. Preemption: the host's local APIC timer ticks on every CPU and its interrupt makes the
//!    guest exit (SVM: INTR intercept; VMX: external-interrupt exiting), and on VMX the
//!    preemption timer bounds the slice too; at the first exit after the slice's end the
//!    scheduler takes the CPU back. So a guest spinning with interrupts off cannot keep the CPU.
//! 4. The vCPU whose exit ends its VM records the end; the VM's other vCPUs stop at their next
//!    exit (their CPUs are kicked). The last vCPU out reports the VM and gives its memory back.
//! 5. The bootstrap CPU waits for every VM, prints the per-CPU statistics and returns.

use crate::guests::{self, AnyVcpu, Backend, IntegrityCheck, KernelHostMemory, KernelPlatform};
use crate::network::{self, Moment};
use crate::virt::Extension;
use crate::{console, console_input, memory};
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use ringzero_loader::boot_plan::EntryState;
use ringzero_loader::manifest::{Manifest, Paging, TestHook};
use ringzero_memory::{HostMemory, HostPhysAddr};
use ringzero_vmm::smp;
use ringzero_vmm::vm::{self, SliceEnd, Vm, VmEnd};
use ringzero_vmm::Platform;
use ringzero_x86::hw;

/// How long a vCPU runs before another vCPU placed on the same CPU gets its turn.
const SLICE_MILLIS: u64 = 10;

/// One VM being run.
struct VmSlot {
    vm: spin::Mutex<Vm>,
    nested_root: Option<HostPhysAddr>,
    entry: EntryState,
    shadow: bool,
    /// The VM has a NIC on the switch: its exits and the scheduler loop move its frames.
    networked: bool,
    /// Frames wait for it on its switch port and another CPU could not take its lock to
    /// deliver them: its next exit (or scheduler pass) does (`network.rs`).
    frames_waiting: AtomicBool,
    /// vCPUs not done yet; the one that brings it to 0 finishes the VM.
    remaining: AtomicUsize,
    finished: AtomicBool,
}

/// Where one vCPU runs.
#[derive(Clone, Copy, Debug)]
struct Placement {
    slot: usize,
    vcpu: usize,
    /// A number unique over all vCPUs: its ASID / VPID.
    tag: usize,
}

/// A physical CPU's figures.
#[derive(Default)]
struct CpuStats {
    vcpus: AtomicU64,
    exits: AtomicU64,
    guest_cycles: AtomicU64,
    idle_cycles: AtomicU64,
    preemptions: AtomicU64,
    switches: AtomicU64,
}

/// Everything the CPUs share while VMs run.
struct Schedule {
    extension: Extension,
    slots: Vec<VmSlot>,
    per_cpu: Vec<Vec<Placement>>,
    /// `location[slot][vcpu]`: the CPU a vCPU runs on (for kicks).
    location: Vec<Vec<usize>>,
    cpu_stats: Vec<CpuStats>,
    /// Whether the VMs' tags (ASIDs / VPIDs) are all distinct; if not, switching vCPUs on a CPU
    /// flushes the guest TLB.
    distinct_tags: bool,
    corrupt_first_vm: bool,
    check: IntegrityCheck,
    all_passed: AtomicBool,
}

static SCHEDULE: spin::Once<Schedule> = spin::Once::new();
/// CPUs in guest mode right now, and the most there ever were at once.
static IN_GUEST: AtomicUsize = AtomicUsize::new(0);
static MAX_IN_GUEST: AtomicUsize = AtomicUsize::new(0);

/// The kernel's platform for one CPU: the shared `KernelPlatform` plus kicks and the count of
/// CPUs in guest mode.
struct CpuPlatform {
    cpu: usize,
    inner: KernelPlatform,
}

impl Platform for CpuPlatform {
    fn host_cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        self.inner.host_cpuid(leaf, subleaf)
    }

    fn timestamp(&self) -> u64 {
        hw::rdtsc()
    }

    fn console_line(&mut self, vm_name: &str, line: &str) {
        self.inner.console_line(vm_name, line);
    }

    fn unix_seconds(&self) -> u64 {
        crate::time::unix_seconds()
    }

    fn take_host_interrupts(&mut self) {
        host::take_pending_interrupts();
    }

    fn wake(&mut self, vm_id: usize, vcpu: usize) {
        if let Some(cpu) = SCHEDULE
            .get()
            .and_then(|schedule| schedule.location.get(vm_id)?.get(vcpu).copied())
        {
            if cpu != self.cpu {
                host::kick(cpu);
            }
        }
    }

    fn guest_entering(&mut self) {
        let now = IN_GUEST.fetch_add(1, Ordering::SeqCst) + 1;
        MAX_IN_GUEST.fetch_max(now, Ordering::SeqCst);
    }

    fn guest_left(&mut self) {
        IN_GUEST.fetch_sub(1, Ordering::SeqCst);
    }

    /// A networked VM's frames move here, right after the exit that sent them (a notification
    /// of its NIC's transmit queue), or that a kick caused because frames wait for it; and, at
    /// most every few hundred microseconds, what the physical NIC received. See `network.rs`.
    fn exit_handled(&mut self, vm: &mut Vm, host: &mut dyn HostMemory, queues_run: bool) {
        let Some(schedule) = SCHEDULE.get() else {
            return;
        };
        let Some(slot) = schedule.slots.get(vm.id) else {
            return;
        };
        if !slot.networked {
            return;
        }
        let waiting = slot.frames_waiting.swap(false, Ordering::SeqCst);
        let mut others = Vec::new();
        if queues_run || waiting {
            others = network::exchange(vm, host, Moment::Exit);
        }
        if network::uplink_poll_due() {
            others.extend(network::pump(Moment::Exit));
            others.sort_unstable();
            others.dedup();
        }
        move_to_other_vms(schedule, self.cpu, host, vm, &others, Moment::Exit);
    }
}

/// The frames the switch left on the ports of VMs `waiting` go into those VMs' receive queues:
/// at once when the VM's lock is free (`try_lock`: the caller holds `holding`'s lock, and no
/// CPU may wait for a second VM's lock while holding one), otherwise the VM is marked
/// (`frames_waiting`) and delivers at its next exit or scheduler pass. Either way the CPUs
/// running its vCPUs are kicked, so that a halted or running vCPU takes its NIC's interrupt (or
/// the marked frames) now rather than at its next timer tick. Frames for `holding` itself are
/// delivered with the lock the caller holds. Bounded: frames these deliveries send on are
/// only marked and kicked, one level.
fn move_to_other_vms(
    schedule: &Schedule,
    cpu: usize,
    host: &mut dyn HostMemory,
    holding: &mut Vm,
    waiting: &[usize],
    moment: Moment,
) {
    if waiting.is_empty() {
        return;
    }
    let mut own = false;
    let mut further = Vec::new();
    for &id in waiting {
        if id == holding.id {
            own = true;
            continue;
        }
        further.extend(deliver_or_mark(schedule, cpu, host, id));
    }
    // Frames for the VM the caller holds (from the physical NIC, or sent back by the VMs just
    // delivered to): delivered with the lock the caller holds. `exchange` never names the VM
    // it ran for, so this happens once.
    if own || further.contains(&holding.id) {
        further.retain(|&id| id != holding.id);
        further.extend(network::exchange(holding, host, moment));
    }
    further.sort_unstable();
    further.dedup();
    for id in further {
        mark_and_kick(schedule, cpu, id);
    }
}

/// Like [`move_to_other_vms`], from the scheduler loop before any VM is locked (after
/// `network::pump`).
fn move_to_vms(schedule: &Schedule, cpu: usize, host: &mut dyn HostMemory, waiting: &[usize]) {
    let mut further = Vec::new();
    for &id in waiting {
        further.extend(deliver_or_mark(schedule, cpu, host, id));
    }
    further.sort_unstable();
    further.dedup();
    for id in further {
        mark_and_kick(schedule, cpu, id);
    }
}

/// Delivers the frames waiting for VM `id` if its lock is free (and kicks its CPUs, so that its
/// vCPUs take the NIC's interrupt now); otherwise marks it and kicks (see [`mark_and_kick`]).
/// Returns the VMs that delivery (the VM's own sends, moved with it) left
/// frames for.
fn deliver_or_mark(
    schedule: &Schedule,
    cpu: usize,
    host: &mut dyn HostMemory,
    id: usize,
) -> Vec<usize> {
    let Some(slot) = schedule.slots.get(id) else {
        return Vec::new();
    };
    if !slot.networked {
        return Vec::new();
    }
    // Only tried: the caller may hold another VM's lock (see `network.rs`).
    let Some(mut vm) = slot.vm.try_lock() else {
        network::count_delivery(false);
        mark_and_kick(schedule, cpu, id);
        return Vec::new();
    };
    if vm.end.is_some() {
        return Vec::new();
    }
    slot.frames_waiting.store(false, Ordering::SeqCst);
    network::count_delivery(true);
    let further = network::exchange(&mut vm, host, Moment::Exit);
    drop(vm);
    kick_vm(schedule, cpu, id);
    further
}

/// Marks VM `id` as having frames waiting; the CPUs running its vCPUs are kicked when the mark
/// is new (an older mark's kick is still on its way: a flood of frames does not become a
/// flood of interrupts for the receiving VM's CPU).
fn mark_and_kick(schedule: &Schedule, cpu: usize, id: usize) {
    if let Some(slot) = schedule.slots.get(id) {
        if slot.networked && !slot.frames_waiting.swap(true, Ordering::SeqCst) {
            kick_vm(schedule, cpu, id);
        }
    }
}

/// Kicks each CPU (other than `cpu`) that runs a vCPU of VM `id`, once.
fn kick_vm(schedule: &Schedule, cpu: usize, id: usize) {
    let Some(cpus) = schedule.location.get(id) else {
        return;
    };
    for (index, &other) in cpus.iter().enumerate() {
        if other != cpu && !cpus[..index].contains(&other) {
            host::kick(other);
        }
    }
}

/// What the scheduler needs of the host CPUs: bring-up (`smp`), time (`time`), the local APIC
/// timer and kicks (`apic`), and the interrupt windows (`cpu`).
mod host {
    use crate::{apic, cpu, smp, time};

    /// The scheduler's tick: at least one exit every 1/TICK_HZ s on every CPU with vCPUs (and
    /// the wake-up of an idle CPU). 250 Hz: 4 ms, under the 10 ms slice; under Bochs, whose TSC
    /// counts instructions at 4 MHz, that is one tick per 16,000 guest instructions.
    const TICK_HZ: u32 = 250;

    /// For each online CPU, whether it can take vCPUs: it prepared virtualization for itself
    /// (the boot CPU always did, or nothing would run).
    pub fn usable_cpus() -> alloc::vec::Vec<bool> {
        (0..smp::cpus_online().max(1))
            .map(|cpu| cpu == 0 || crate::virt::cpu_can_virtualize(cpu))
            .collect()
    }
    pub fn tsc_hz() -> u64 {
        time::tsc_hz()
    }
    pub fn start_tick() {
        if apic::available() {
            apic::start_tick(TICK_HZ);
        }
    }
    pub fn take_pending_interrupts() {
        cpu::take_pending_interrupts();
    }
    pub fn idle_until_interrupt() {
        cpu::idle_until_interrupt();
    }
    /// Wakes CPU `cpu` (out of its idle HLT, or out of its guest through an exit).
    pub fn kick(cpu: usize) {
        if let Some(apic_id) = smp::apic_id_of(cpu) {
            apic::send_fixed(apic_id, apic::KICK_VECTOR);
        }
    }
}

/// Runs every VM of the manifest, concurrently on every online CPU. Called on the bootstrap
/// CPU; returns when every VM has ended, with whether every one passed.
pub fn run_all(
    manifest: &Manifest<'static>,
    extension: Extension,
    own: &guests::HypervisorMemory,
) -> bool {
    if manifest.vms.is_empty() {
        log::info!("no guests configured");
        return true;
    }
    let Some(check) = IntegrityCheck::new(
        own.kernel_start,
        own.kernel_length,
        own.heap_start,
        own.heap_size,
    ) else {
        log::error!("no memory for the integrity canary");
        return false;
    };
    let usable = host::usable_cpus();
    let online = usable.len();
    let kind = guests::BackendKind::of(&extension);
    let clock = ringzero_devices::TimerClock {
        tsc_hz: host::tsc_hz(),
        apic_timer_hz: GUEST_APIC_TIMER_HZ,
    };
    let mut all_passed = true;
    // Step 1: build the VMs and place their vCPUs.
    let mut slots = Vec::new();
    let mut location = Vec::new();
    let mut per_cpu: Vec<Vec<Placement>> = (0..online).map(|_| Vec::new()).collect();
    let mut tags = 0;
    for (index, vm_manifest) in manifest.vms.iter().enumerate() {
        let vcpus = (vm_manifest.cpus as usize).max(1);
        let pin: Vec<usize> = vm_manifest
            .pin
            .iter()
            .map(|&cpu| usize::from(cpu))
            .collect();
        if let Some(&missing) = pin
            .iter()
            .find(|&&cpu| !usable.get(cpu).copied().unwrap_or(false))
        {
            log::error!(
                "vm {}: pinned to cpu{missing}, which is not online or cannot virtualize ({online} CPU(s) online: cpu0..cpu{}); VM not started",
                vm_manifest.name,
                online - 1
            );
            guests::end_line(vm_manifest.name, "bad-pin", vm::STATUS_STOPPED, 0);
            all_passed = false;
            continue;
        }
        let Some(built) = guests::build_vm(vm_manifest, index, &kind, clock) else {
            all_passed = false;
            continue;
        };
        let slot = slots.len();
        let mut vm = built.vm;
        vm.id = slot;
        if let Some(seconds) = vm_manifest.time_limit_seconds {
            vm.time_limit_seconds = seconds;
        }
        let mut cpus_of_vm = Vec::new();
        for vcpu in 0..vcpus {
            let cpu = match pin.len() {
                0 => least_loaded(&per_cpu, &usable),
                1 => pin[0],
                _ => pin[vcpu],
            };
            per_cpu[cpu].push(Placement {
                slot,
                vcpu,
                tag: tags,
            });
            tags += 1;
            cpus_of_vm.push(cpu);
        }
        log::info!(
            "scheduler: vm {} vCPUs on {}",
            vm.name,
            cpus_of_vm
                .iter()
                .enumerate()
                .map(|(vcpu, cpu)| alloc::format!("{vcpu}->cpu{cpu}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        location.push(cpus_of_vm);
        let networked = crate::network::has_port(vm.id);
        slots.push(VmSlot {
            networked,
            frames_waiting: AtomicBool::new(false),
            vm: spin::Mutex::new(vm),
            nested_root: built.nested_root,
            entry: built.entry,
            shadow: vm_manifest.paging == Paging::Shadow,
            remaining: AtomicUsize::new(vcpus),
            finished: AtomicBool::new(false),
        });
    }
    if slots.is_empty() {
        return all_passed;
    }
    // Time limits count from now.
    let start = hw::rdtsc();
    for slot in &slots {
        let mut vm = slot.vm.lock();
        if vm.time_limit_seconds > 0 {
            vm.deadline =
                Some(start.saturating_add(u64::from(vm.time_limit_seconds) * host::tsc_hz()));
        }
    }
    let distinct_tags = match &extension {
        Extension::Svm(capabilities) => tags < capabilities.asids.saturating_sub(1) as usize,
        Extension::Vmx(_) => tags < 0xFFFE,
    };
    let cpu_stats = (0..online).map(|_| CpuStats::default()).collect();
    let schedule = SCHEDULE.call_once(|| Schedule {
        extension,
        slots,
        per_cpu,
        location,
        cpu_stats,
        distinct_tags,
        corrupt_first_vm: manifest.test_hook == TestHook::InvalidGuestState,
        check,
        all_passed: AtomicBool::new(all_passed),
    });
    // Console input (console_input.rs): say where keyboard input goes and how to switch.
    console_input::start(
        schedule
            .slots
            .iter()
            .map(|slot| slot.vm.lock().name.clone()),
    );
    // Step 2: wake the application processors, and take part.
    for cpu in 1..online {
        host::kick(cpu);
    }
    run_cpu(schedule, 0);
    // Step 5: wait for every VM, then the per-CPU statistics.
    while schedule
        .slots
        .iter()
        .any(|slot| !slot.finished.load(Ordering::SeqCst))
    {
        poll_console_input(schedule);
        host::idle_until_interrupt();
    }
    report_cpus(schedule);
    schedule.all_passed.load(Ordering::SeqCst)
}

/// The APIC timer input clock guests see (1 GHz: one count per nanosecond before division).
const GUEST_APIC_TIMER_HZ: u64 = 1_000_000_000;

/// The usable CPU with the fewest vCPUs placed on it (the lowest-numbered among equals).
fn least_loaded(per_cpu: &[Vec<Placement>], usable: &[bool]) -> usize {
    (0..per_cpu.len())
        .filter(|&cpu| usable[cpu])
        .min_by_key(|&cpu| per_cpu[cpu].len())
        .unwrap_or(0)
}

/// An application processor's work: wait for the schedule, run the vCPUs placed on this CPU,
/// then idle for good (the bootstrap CPU powers the machine off).
pub fn application_processor(cpu: usize) -> ! {
    loop {
        if let Some(schedule) = SCHEDULE.get() {
            run_cpu(schedule, cpu);
            break;
        }
        host::idle_until_interrupt();
    }
    loop {
        host::idle_until_interrupt();
    }
}

/// Stops a VM that could not get a vCPU going (`why`), as if its vCPU had ended it.
fn stop_vm(slot: &VmSlot, why: &'static str) {
    let mut vm = slot.vm.lock();
    if vm.end.is_none() {
        vm.end = Some(VmEnd::EntryFailed {
            reason: why,
            detail: 0,
        });
    }
}

/// This CPU's scheduler loop (step 2 of the module documentation).
fn run_cpu(schedule: &Schedule, cpu: usize) {
    let mine = &schedule.per_cpu[cpu];
    if mine.is_empty() {
        return;
    }
    host::start_tick();
    let stats = &schedule.cpu_stats[cpu];
    stats.vcpus.store(mine.len() as u64, Ordering::Relaxed);
    let mut host = KernelHostMemory;
    let backend = match Backend::new(&schedule.extension) {
        Ok(backend) => Some(backend),
        Err(error) => {
            log::error!("cpu{cpu}: {error}; the vCPUs placed here cannot run");
            None
        }
    };
    // Create this CPU's vCPUs (a VMCB / VMCS is used by the CPU that built it).
    let mut vcpus: Vec<Option<AnyVcpu>> = Vec::new();
    for placement in mine {
        let slot = &schedule.slots[placement.slot];
        let created = backend
            .as_ref()
            .map(|backend| backend.create_vcpu(placement.tag, slot.nested_root, &slot.entry));
        let mut vcpu = match created {
            Some(Ok(vcpu)) => vcpu,
            Some(Err(error)) => {
                log::error!(
                    "vm {}: vcpu {}: {error}",
                    slot.vm.lock().name,
                    placement.vcpu
                );
                stop_vm(slot, "the vCPU could not be created (see the log)");
                vcpus.push(None);
                vcpu_done(schedule, placement.slot, cpu);
                continue;
            }
            None => {
                stop_vm(slot, "virtualization could not be turned on on this CPU");
                vcpus.push(None);
                vcpu_done(schedule, placement.slot, cpu);
                continue;
            }
        };
        if placement.vcpu == 0 {
            if schedule.corrupt_first_vm && placement.slot == 0 {
                log::warn!(
                    "test hook: breaking vm {}'s guest state before its first entry",
                    slot.vm.lock().name
                );
                vcpu.corrupt_guest_state_for_test();
            }
            if slot.shadow {
                let mut vm = slot.vm.lock();
                if let Err(end) = vm::prepare_first_run(&mut vm, vcpu.as_vcpu(), &mut host) {
                    vm.end = Some(end);
                }
            }
        }
        vcpus.push(Some(vcpu));
    }
    // Step 2: the loop.
    let mut platform = CpuPlatform {
        cpu,
        inner: KernelPlatform,
    };
    let slice = SLICE_MILLIS * host::tsc_hz() / 1000;
    let mut current: Option<usize> = None;
    let mut last_preempted = false;
    let mut next = 0;
    loop {
        if cpu == 0 {
            poll_console_input(schedule);
        }
        // Frames between the physical NIC and the switch (whichever CPU gets there), and to
        // the VMs they are for.
        let waiting = network::pump(Moment::Pass);
        move_to_vms(schedule, cpu, &mut host, &waiting);
        let now = hw::rdtsc();
        let mut picked = None;
        let mut live = 0;
        for step in 0..mine.len() {
            let index = (next + step) % mine.len();
            if vcpus[index].is_none() {
                continue;
            }
            live += 1;
            let placement = mine[index];
            let slot = &schedule.slots[placement.slot];
            let mut vm = slot.vm.lock();
            // A networked VM's frames, both ways, before its vCPU is looked at: a frame
            // delivered now raises its NIC's line, which wakes a halted vCPU below.
            if slot.networked && placement.vcpu == 0 && vm.end.is_none() {
                slot.frames_waiting.store(false, Ordering::SeqCst);
                let others = network::exchange(&mut vm, &mut host, Moment::Pass);
                move_to_other_vms(schedule, cpu, &mut host, &mut vm, &others, Moment::Pass);
            }
            if picked.is_none() && smp::is_runnable(&mut vm, placement.vcpu, now) {
                picked = Some(index);
            }
        }
        if live == 0 {
            break;
        }
        let Some(index) = picked else {
            host::idle_until_interrupt();
            stats
                .idle_cycles
                .fetch_add(hw::rdtsc().wrapping_sub(now), Ordering::Relaxed);
            continue;
        };
        next = index + 1;
        let placement = mine[index];
        let slot = &schedule.slots[placement.slot];
        if current != Some(index) {
            if let Some(previous) = current {
                if let Some(vcpu) = vcpus[previous].as_mut() {
                    vcpu.as_vcpu().deactivate();
                }
                if last_preempted {
                    stats.preemptions.fetch_add(1, Ordering::Relaxed);
                    let previous = mine[previous];
                    schedule.slots[previous.slot].vm.lock().vcpus[previous.vcpu]
                        .stats
                        .preemptions += 1;
                }
            }
            let vcpu = vcpus[index].as_mut().expect("picked vCPUs exist");
            vcpu.as_vcpu().activate();
            if !schedule.distinct_tags {
                vcpu.as_vcpu().flush_guest_tlb();
            }
            stats.switches.fetch_add(1, Ordering::Relaxed);
            slot.vm.lock().vcpus[placement.vcpu].stats.cpu = Some(cpu);
            current = Some(index);
        }
        let vcpu = vcpus[index].as_mut().expect("picked vCPUs exist");
        vcpu.as_vcpu().set_preemption_timer(Some(slice));
        let (exits_before, guest_cycles_before) = {
            let vm = slot.vm.lock();
            let vcpu_stats = &vm.vcpus[placement.vcpu].stats;
            (vcpu_stats.exits, vcpu_stats.guest_cycles)
        };
        let outcome = vm::run_slice(
            &slot.vm,
            placement.vcpu,
            vcpu.as_vcpu(),
            &mut platform,
            &mut host,
            now.saturating_add(slice),
        );
        {
            let vm = slot.vm.lock();
            let vcpu_stats = &vm.vcpus[placement.vcpu].stats;
            stats
                .exits
                .fetch_add(vcpu_stats.exits - exits_before, Ordering::Relaxed);
            stats.guest_cycles.fetch_add(
                vcpu_stats.guest_cycles - guest_cycles_before,
                Ordering::Relaxed,
            );
        }
        last_preempted = outcome == SliceEnd::Preempted;
        if outcome == SliceEnd::VmEnded {
            // Take the guest's registers and XCR0 out of the CPU (the host's XCR0 back), erase
            // them where they lie in the heap, then tear down.
            if let Some(vcpu) = vcpus[index].as_mut() {
                vcpu.as_vcpu().deactivate();
                vcpu.erase_saved_registers();
            }
            if let Some(vcpu) = vcpus[index].take() {
                vcpu.tear_down();
            }
            if current == Some(index) {
                current = None;
            }
            // Make the VM's other vCPUs notice at once.
            for (vcpu, &other) in schedule.location[placement.slot].iter().enumerate() {
                if vcpu != placement.vcpu && other != cpu {
                    host::kick(other);
                }
            }
            vcpu_done(schedule, placement.slot, cpu);
        }
    }
}

/// One vCPU of the VM in `slot` is done; the last one finishes the VM (step 4).
fn vcpu_done(schedule: &Schedule, slot_index: usize, cpu: usize) {
    let slot = &schedule.slots[slot_index];
    if slot.remaining.fetch_sub(1, Ordering::SeqCst) != 1 {
        return;
    }
    let mut vm = slot.vm.lock();
    report_vcpus(&vm);
    let passed = guests::finish_vm(&mut vm);
    // The last VM to end also has the heap scanned (no vCPU's saved registers are left in it).
    let last = schedule
        .slots
        .iter()
        .enumerate()
        .all(|(index, other)| index == slot_index || other.finished.load(Ordering::SeqCst));
    match schedule.check.verify(last) {
        None if last => log::info!(
            "memory check after vm {}: hypervisor memory intact (kernel image hash, canary page, no guest marker in the heap); {} frames in use",
            vm.name,
            memory::allocated_frames()
        ),
        None => log::info!(
            "memory check after vm {}: kernel image hash and canary page intact (the heap is scanned once no VM runs); {} frames in use",
            vm.name,
            memory::allocated_frames()
        ),
        Some(problem) => {
            log::error!("memory check after vm {}: {problem}!", vm.name);
            schedule.all_passed.store(false, Ordering::SeqCst);
        }
    }
    if !passed {
        schedule.all_passed.store(false, Ordering::SeqCst);
    }
    drop(vm);
    slot.finished.store(true, Ordering::SeqCst);
    console_input::vm_ended(slot_index);
    if cpu != 0 {
        host::kick(0);
    }
}

/// Console input (console_input.rs): hands what was typed on the hypervisor's console to the
/// VM that has the input. Bootstrap CPU only, outside any VM's lock.
fn poll_console_input(schedule: &Schedule) {
    console_input::poll(&mut |vm, byte| {
        schedule.slots.get(vm).is_some_and(|slot| {
            ringzero_vmm::console_switch::push_to_console(&mut slot.vm.lock(), byte)
        })
    });
}

/// TSC cycles since boot (the time base of the log lines).
fn since_boot(tsc: u64) -> u64 {
    tsc.saturating_sub(console::boot_tsc())
}

/// One line per vCPU: where and when it ran, and what it did.
fn report_vcpus(vm: &Vm) {
    for (index, state) in vm.vcpus.iter().enumerate() {
        let stats = &state.stats;
        let cpu = stats.cpu.map_or_else(
            || alloc::string::String::from("none"),
            |cpu| alloc::format!("{cpu}"),
        );
        console::print_line(format_args!(
            "ringzero: vcpu {}/{index} cpu={cpu} start={} end={} exits={} guest_cycles={} halted_cycles={} preemptions={} interrupts={}",
            vm.name,
            stats.first_entry.map_or(0, since_boot),
            if stats.first_entry.is_some() { since_boot(stats.last_exit) } else { 0 },
            stats.exits,
            stats.guest_cycles,
            stats.halted_cycles,
            stats.preemptions,
            stats.interrupts,
        ));
    }
}

/// The per-CPU statistics and how many CPUs ran guests at the same time.
fn report_cpus(schedule: &Schedule) {
    log::info!("per-CPU statistics (TSC cycles):");
    for (cpu, stats) in schedule.cpu_stats.iter().enumerate() {
        console::print_line(format_args!(
            "ringzero: cpu {cpu} vcpus={} exits={} guest_cycles={} idle_cycles={} preemptions={} switches={}",
            stats.vcpus.load(Ordering::Relaxed),
            stats.exits.load(Ordering::Relaxed),
            stats.guest_cycles.load(Ordering::Relaxed),
            stats.idle_cycles.load(Ordering::Relaxed),
            stats.preemptions.load(Ordering::Relaxed),
            stats.switches.load(Ordering::Relaxed),
        ));
    }
    console::print_line(format_args!(
        "ringzero: concurrency max_cpus_in_guest={}",
        MAX_IN_GUEST.load(Ordering::SeqCst)
    ));
}
