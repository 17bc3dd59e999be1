//! A VM and its run loop: enter the guest, take the exit, handle it, go again, until the
//! guest ends or misbehaves. Each handler says in a comment what the hardware did and what
//! the hypervisor does about it.

use crate::cpuid::{guest_cpuid, GuestCpuState};
use crate::decode;
use crate::exit::{ControlRegisterAccess, IoDirection, IoExit, MemoryAccess, VmExit};
use crate::msr::{self, MsrRead, MsrWrite};
use crate::paging::{self, GuestPaging, LazyStats};
use crate::smp::{self, Activity, VcpuState};
use crate::stats::{ExitStats, RecentExit};
use crate::vcpu::{Register, Vcpu};
use crate::Platform;
use alloc::boxed::Box;
use alloc::collections::BTreeSet;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::cell::{RefCell, RefMut};
use core::ops::DerefMut;
use ringzero_devices::{DeviceEvent, ExitPort, IoApic, MmioBus, PortBus, TimerClock, Uart16550};
use ringzero_memory::{GuestPhysAddr, GuestRam, HostMemory};

/// The status reported for a VM the hypervisor stopped (triple fault, bad access, ...).
pub const STATUS_STOPPED: u32 = 255;
/// Exception vectors injected into guests.
const VECTOR_INVALID_OPCODE: u8 = 6;
const VECTOR_GENERAL_PROTECTION: u8 = 13;
/// The ACPI PM blocks of the PC platform (`PlatformDescription::pc`: PM1a at 0x600, the PM timer
/// at 0x608).
const ACPI_PM_BASE: u16 = 0x600;
/// Console lines longer than this are split.
const MAX_CONSOLE_LINE: usize = 1024;

/// One virtual machine: its RAM, its devices and its statistics.
pub struct Vm {
    pub name: String,
    pub ram: GuestRam,
    pub bus: PortBus,
    /// Memory-mapped devices (empty unless the VM's platform adds some).
    pub mmio: MmioBus,
    pub stats: ExitStats,
    /// How guest-physical memory is translated (nested or shadow tables).
    pub paging: GuestPaging,
    /// Pages backed on first touch (overcommit).
    pub lazy: LazyStats,
    /// Log every exit (the trap trace).
    pub trace: bool,
    /// The kernel's number for this VM (for `Platform::wake`).
    pub id: usize,
    /// Each vCPU's state seen by the others: local APIC, activity, statistics.
    pub vcpus: Vec<VcpuState>,
    /// How the VM ended, once it has: set by the vCPU whose exit ended it (or the time limit);
    /// the other vCPUs stop at their next exit.
    pub end: Option<VmEnd>,
    /// The TSC after which the VM is stopped (its configured time limit), and that limit.
    pub deadline: Option<u64>,
    pub time_limit_seconds: u32,
    /// Something other than the vCPUs can interrupt them (devices with interrupt lines): an
    /// HLT then waits even with one vCPU and no APIC timer.
    pub interrupt_sources: bool,
    /// The I/O APIC (Linux VMs): routes device interrupt lines to the vCPUs' local APICs.
    pub io_apic: Option<IoApic>,
    /// The device interrupt lines (I/O APIC pins) last seen asserted, bit per pin.
    pub(crate) irq_lines: u32,
    /// PIT ticks that fell due and are not delivered yet (`smp::poll_devices`).
    pub(crate) pit_owed: u32,
    /// PCI functions with BARs (virtio devices), also on the PCI bus for their configuration.
    pub pci: Vec<crate::pci::PciSlot>,
    /// A PCI function ran a queue during the exit being handled (set by [`crate::pci`], taken
    /// by [`run_slice`] for [`Platform::exit_handled`]).
    pub(crate) queues_run: bool,
    console_line: Vec<u8>,
    msrs_reported: BTreeSet<u32>,
}

impl Vm {
    /// A VM with the standard devices: a 16550 UART at COM1 and the test exit port.
    pub fn new(name: &str, ram: GuestRam, paging: GuestPaging, trace: bool) -> Vm {
        Vm::with_vcpus(name, ram, paging, trace, 1, smp::DEFAULT_CLOCK)
    }

    /// A VM with `vcpus` vCPUs whose APIC timers count against `clock`.
    pub fn with_vcpus(
        name: &str,
        ram: GuestRam,
        paging: GuestPaging,
        trace: bool,
        vcpus: usize,
        clock: TimerClock,
    ) -> Vm {
        let mut bus = PortBus::new();
        bus.add(Box::new(Uart16550::new(Uart16550::COM1)))
            .expect("empty bus");
        bus.add(Box::new(ExitPort::new()))
            .expect("the exit port does not overlap COM1");
        Vm {
            name: name.to_string(),
            ram,
            bus,
            mmio: MmioBus::new(),
            stats: ExitStats::default(),
            paging,
            lazy: LazyStats::default(),
            trace,
            id: 0,
            vcpus: (0..vcpus.max(1))
                .map(|index| VcpuState::new(index, clock))
                .collect(),
            end: None,
            deadline: None,
            time_limit_seconds: 0,
            interrupt_sources: false,
            io_apic: None,
            irq_lines: 0,
            pit_owed: 0,
            pci: Vec::new(),
            queues_run: false,
            console_line: Vec::new(),
            msrs_reported: BTreeSet::new(),
        }
    }

    /// One byte of console output (from the UART or the `CONSOLE_WRITE` hypercall).
    pub(crate) fn console_byte(&mut self, byte: u8, platform: &mut dyn Platform) {
        match byte {
            b'\n' => self.flush_console(platform),
            b'\r' => {}
            _ => {
                self.console_line.push(byte);
                if self.console_line.len() >= MAX_CONSOLE_LINE {
                    self.flush_console(platform);
                }
            }
        }
    }

    /// Prints what is left of the console line (at a newline, and when the VM ends).
    pub fn flush_console(&mut self, platform: &mut dyn Platform) {
        if !self.console_line.is_empty() {
            let line = String::from_utf8_lossy(&self.console_line).into_owned();
            platform.console_line(&self.name, &line);
            self.console_line.clear();
        }
    }
}

/// How a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEnd {
    /// The guest wrote its status to the exit port.
    ExitPort { status: u32 },
    /// The guest triple-faulted.
    TripleFault { rip: u64 },
    /// The guest touched guest-physical memory it does not have.
    NestedPageFault {
        guest_physical: GuestPhysAddr,
        access: MemoryAccess,
        rip: u64,
    },
    /// The guest powered itself off (ACPI S5 through the PM1 control register).
    PowerOff,
    /// The guest asked to end with the `EXIT` hypercall.
    HypercallExit { status: u32 },
    /// The hypervisor's own nested page tables were malformed (a hypervisor bug).
    NestedPagingMisconfiguration {
        guest_physical: GuestPhysAddr,
        rip: u64,
    },
    /// HLT with interrupts off and no interrupt source: the guest could never resume.
    HaltedForever { rip: u64 },
    /// The hardware refused to enter the guest.
    EntryFailed { reason: &'static str, detail: u64 },
    /// An instruction had to be decoded and could not be.
    Undecodable { rip: u64 },
    /// An exit the hypervisor does not handle.
    Unhandled {
        code: u64,
        info1: u64,
        info2: u64,
        rip: u64,
    },
    /// The host ran out of memory for a page the guest touched (overcommit exhausted) or for
    /// the VM's shadow tables.
    OutOfHostMemory { guest_physical: GuestPhysAddr },
    /// A guest paging mode shadow paging does not support (32-bit paging).
    UnsupportedPaging { detail: String },
    /// An access to a memory-mapped device by an instruction the hypervisor does not emulate.
    UnsupportedMmio { address: u64, rip: u64 },
    /// String or REP port I/O, which is not emulated yet.
    UnsupportedIo { io: IoExit, rip: u64 },
    /// The VM ran longer than its configured time limit.
    TimeLimit { seconds: u32 },
    /// The guest asked for a reset (a reboot, or its kernel after a panic).
    Reset,
}

impl VmEnd {
    /// The `exit=` word of the fixed end line.
    pub fn reason(&self) -> &'static str {
        match self {
            VmEnd::ExitPort { .. } => "exit-port",
            VmEnd::HypercallExit { .. } => "hypercall-exit",
            VmEnd::PowerOff => "poweroff",
            VmEnd::TripleFault { .. } => "triple-fault",
            VmEnd::NestedPageFault { .. } => "nested-page-fault",
            VmEnd::NestedPagingMisconfiguration { .. } => "nested-paging-misconfiguration",
            VmEnd::HaltedForever { .. } => "halted",
            VmEnd::EntryFailed { .. } => "entry-failed",
            VmEnd::Undecodable { .. } => "undecodable-instruction",
            VmEnd::Unhandled { .. } => "unhandled-exit",
            VmEnd::UnsupportedIo { .. } => "unsupported-io",
            VmEnd::UnsupportedMmio { .. } => "unsupported-mmio",
            VmEnd::OutOfHostMemory { .. } => "out-of-host-memory",
            VmEnd::UnsupportedPaging { .. } => "unsupported-paging-mode",
            VmEnd::TimeLimit { .. } => "time-limit",
            VmEnd::Reset => "reset",
        }
    }

    /// The `status=` number: the guest's own for the exit port, [`STATUS_STOPPED`] otherwise.
    pub fn status(&self) -> u32 {
        match self {
            VmEnd::ExitPort { status } | VmEnd::HypercallExit { status } => *status,
            VmEnd::PowerOff => 0,
            _ => STATUS_STOPPED,
        }
    }

    /// Whether the VM was stopped by something its vCPU did that the hypervisor could not go
    /// on from (a fault, an instruction or exit it cannot handle): the end report then shows
    /// that vCPU's registers and last exits.
    pub fn is_fault(&self) -> bool {
        matches!(
            self,
            VmEnd::TripleFault { .. }
                | VmEnd::NestedPageFault { .. }
                | VmEnd::NestedPagingMisconfiguration { .. }
                | VmEnd::HaltedForever { .. }
                | VmEnd::EntryFailed { .. }
                | VmEnd::Undecodable { .. }
                | VmEnd::Unhandled { .. }
                | VmEnd::UnsupportedMmio { .. }
                | VmEnd::UnsupportedIo { .. }
        )
    }

    /// Whether the guest ended the way a passing guest does (exit port, status 0).
    pub fn is_success(&self) -> bool {
        matches!(
            self,
            VmEnd::ExitPort { status: 0 } | VmEnd::HypercallExit { status: 0 } | VmEnd::PowerOff
        )
    }

    /// One sentence for the log.
    pub fn describe(&self) -> String {
        match self {
            VmEnd::ExitPort { status } => format!("the guest wrote {status} to the exit port"),
            VmEnd::HypercallExit { status } => format!("the guest ended itself with the EXIT hypercall, status {status}"),
            VmEnd::PowerOff => String::from("the guest powered itself off (ACPI S5)"),
            VmEnd::TripleFault { rip } => {
                format!("the guest triple-faulted at rip={rip:#x} (an exception it could not deliver); VM stopped")
            }
            VmEnd::NestedPageFault { guest_physical, access, rip } => format!(
                "nested page fault: {} of guest-physical {:#x} at rip={rip:#x} is outside the VM's RAM; VM stopped",
                access.kind(),
                guest_physical.0
            ),
            VmEnd::NestedPagingMisconfiguration { guest_physical, rip } => format!(
                "the nested page tables are malformed at guest-physical {:#x} (rip={rip:#x}): a hypervisor bug; VM stopped",
                guest_physical.0
            ),
            VmEnd::HaltedForever { rip } => {
                format!("HLT at rip={rip:#x} with interrupts disabled and no interrupt source: the guest can never resume; VM stopped")
            }
            VmEnd::EntryFailed { reason, detail } => {
                format!("{reason} (detail {detail:#x}); VM stopped")
            }
            VmEnd::Undecodable { rip } => format!("cannot decode the instruction at rip={rip:#x}; VM stopped"),
            VmEnd::Unhandled { code, info1, info2, rip } => {
                format!("unhandled exit code {code:#x} (info {info1:#x}, {info2:#x}) at rip={rip:#x}; VM stopped")
            }
            VmEnd::OutOfHostMemory { guest_physical } => format!(
                "out of host memory: no frame for the guest's page at {:#x} (or its shadow tables); the host cannot keep the memory it promised; VM stopped",
                guest_physical.0
            ),
            VmEnd::UnsupportedPaging { detail } => {
                format!("the guest switched to a paging mode shadow paging does not support ({detail}); VM stopped")
            }
            VmEnd::UnsupportedMmio { address, rip } => format!(
                "the instruction at rip={rip:#x} accessed the device registers at {address:#x} in a way the hypervisor does not emulate; VM stopped"
            ),
            VmEnd::UnsupportedIo { io, rip } => format!(
                "string/REP port I/O on port {:#x} at rip={rip:#x} is not emulated; VM stopped",
                io.port
            ),
            VmEnd::Reset => String::from(
                "the guest asked for a reset (reset control register, port 0xCF9): ringzero does not restart VMs; VM stopped",
            ),
            VmEnd::TimeLimit { seconds } => format!(
                "the VM was still running after its time limit of {seconds} s; VM stopped"
            ),
        }
    }
}

/// Access to a VM that several vCPUs share: the VM is locked while an exit is handled and
/// unlocked while the guest runs. `spin::Mutex<Vm>` for the kernel's concurrent vCPUs; a
/// `RefCell<&mut Vm>` for one vCPU on one thread ([`run`]).
pub trait LockVm {
    type Guard<'a>: DerefMut<Target = Vm>
    where
        Self: 'a;
    fn lock_vm(&self) -> Self::Guard<'_>;
}

impl LockVm for spin::Mutex<Vm> {
    type Guard<'a> = spin::MutexGuard<'a, Vm>;
    fn lock_vm(&self) -> Self::Guard<'_> {
        self.lock()
    }
}

impl LockVm for RefCell<&mut Vm> {
    type Guard<'a>
        = RefMut<'a, Vm>
    where
        Self: 'a;
    fn lock_vm(&self) -> Self::Guard<'_> {
        RefMut::map(self.borrow_mut(), |vm| &mut **vm)
    }
}

/// How a slice of one vCPU's time ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SliceEnd {
    /// The VM has ended (`vm.end` says how): this vCPU is done.
    VmEnded,
    /// The vCPU halted or waits for a startup IPI: run it again once
    /// [`smp::is_runnable`] says so.
    Blocked,
    /// The slice's time is up and the vCPU could go on: the scheduler may run another.
    Preempted,
}

/// Before a vCPU's first run: under shadow paging, build the shadow tables for its first
/// instruction.
pub fn prepare_first_run(
    vm: &mut Vm,
    vcpu: &mut dyn Vcpu,
    host: &mut dyn HostMemory,
) -> Result<(), VmEnd> {
    paging::start(vm, vcpu, host)
}

/// Runs the VM's only vCPU until the VM ends (one thread, no other vCPU, no preemption).
/// Statistics accumulate in `vm.stats`.
pub fn run(
    vm: &mut Vm,
    vcpu: &mut dyn Vcpu,
    platform: &mut dyn Platform,
    host: &mut dyn HostMemory,
) -> VmEnd {
    if let Err(end) = prepare_first_run(vm, vcpu, host) {
        return end;
    }
    let cell = RefCell::new(vm);
    loop {
        match run_slice(&cell, 0, vcpu, platform, host, u64::MAX) {
            SliceEnd::VmEnded => break,
            SliceEnd::Preempted => {}
            // A halted vCPU waits for its APIC timer (nothing else can wake it here).
            SliceEnd::Blocked => {
                while !smp::is_runnable(&mut cell.borrow_mut(), 0, platform.timestamp()) {
                    if cell.borrow().vcpus[0].activity == Activity::WaitingForStartup {
                        break;
                    }
                    core::hint::spin_loop();
                }
            }
        }
    }
    let vm = cell.into_inner();
    vm.end.clone().unwrap_or(VmEnd::HaltedForever {
        rip: vcpu.register(Register::Rip),
    })
}

/// Runs vCPU `index` of the VM until its slice ends: until the VM ends, the vCPU blocks (HLT,
/// waiting for a startup IPI), or an exit comes after the TSC passed `slice_end` (the
/// scheduler's preemption: a host timer interrupt or the hardware preemption timer makes sure
/// an exit comes). The VM is locked while an exit is handled, not while the guest runs.
pub fn run_slice<L: LockVm + ?Sized>(
    shared: &L,
    index: usize,
    vcpu: &mut dyn Vcpu,
    platform: &mut dyn Platform,
    host: &mut dyn HostMemory,
    slice_end: u64,
) -> SliceEnd {
    let mut last_exit_was_window = false;
    loop {
        // Step 1: under the lock, see whether the VM still runs and what this vCPU must do:
        // start (SIPI), stay blocked, or take an interrupt at entry.
        {
            let mut vm = shared.lock_vm();
            let now = platform.timestamp();
            if vm.end.is_some() {
                return SliceEnd::VmEnded;
            }
            if vm.deadline.is_some_and(|deadline| now >= deadline) {
                let seconds = vm.time_limit_seconds;
                vm.end = Some(VmEnd::TimeLimit { seconds });
                vm.flush_console(platform);
                return SliceEnd::VmEnded;
            }
            let state = &mut vm.vcpus[index];
            match state.activity {
                Activity::WaitingForStartup | Activity::Parked => return SliceEnd::Blocked,
                Activity::Halted { .. } => {
                    state.apic.advance_timer(now);
                    if !state.wake_if_interrupted(now) {
                        return SliceEnd::Blocked;
                    }
                }
                Activity::Running | Activity::StartupPending { .. } => {}
            }
            smp::prepare_entry(&mut vm, index, vcpu, now, last_exit_was_window);
        }
        // Step 2: enter the guest; the backend's world switch returns at the next exit.
        platform.guest_entering();
        let entered = platform.timestamp();
        let exit = vcpu.run();
        let exited = platform.timestamp();
        platform.guest_left();
        last_exit_was_window = exit == VmExit::InterruptWindow;
        if exit == VmExit::ExternalInterrupt {
            // A host interrupt (timer tick, a kick from another CPU) made the guest exit: the
            // host takes it now, outside the VM's lock.
            platform.take_host_interrupts();
        }
        // Step 3: under the lock again, (optionally) show the trap, then handle it.
        let mut vm = shared.lock_vm();
        let vm = &mut *vm;
        let guest_cycles = exited.wrapping_sub(entered);
        vm.stats.guest_cycles += guest_cycles;
        let stats = &mut vm.vcpus[index].stats;
        stats.guest_cycles += guest_cycles;
        stats.exits += 1;
        stats.first_entry.get_or_insert(entered);
        stats.last_exit = exited;
        if vm.end.is_some() {
            // Another vCPU ended the VM while this one ran: this exit no longer matters.
            return SliceEnd::VmEnded;
        }
        // The trap trace shows what the guest's instructions trapped, not the host's own exits
        // (its timer tick, the interrupt window, the end of a slice).
        if vm.trace && !exit.reason().made_by_the_host() {
            trace_exit(vm, vcpu, host, &exit);
        }
        let detail = match &exit {
            VmExit::NestedPageFault { guest_physical, .. } => guest_physical.0,
            VmExit::PageFault { address, .. } => *address,
            VmExit::Io(io) => u64::from(io.port),
            VmExit::MsrRead | VmExit::MsrWrite => vcpu.register(Register::Rcx) & 0xFFFF_FFFF,
            // The register the exit names: n for a read of CRn, 0x10 + n for a write.
            VmExit::ControlRegister(ControlRegisterAccess::Read { register, .. }) => {
                u64::from(*register)
            }
            VmExit::ControlRegister(ControlRegisterAccess::Write { register, .. }) => {
                0x10 + u64::from(*register)
            }
            _ => 0,
        };
        vm.vcpus[index].recent.record(RecentExit {
            reason: exit.reason(),
            rip: vcpu.register(Register::Rip),
            detail,
        });
        let outcome = handle(vm, index, vcpu, platform, host, &exit);
        if let Some(end) = outcome.as_ref().filter(|end| end.is_fault()) {
            report_failure(vm, index, vcpu, host, end);
        }
        // What the exit set going (a NIC's frames) moves on now, before the guest runs again.
        let queues_run = core::mem::take(&mut vm.queues_run);
        if outcome.is_none() {
            platform.exit_handled(vm, host, queues_run);
        }
        // Step 4: account the time spent in the hypervisor for this exit.
        let now = platform.timestamp();
        vm.stats.record(exit.reason(), now.wrapping_sub(exited));
        if let Some(end) = outcome {
            vm.flush_console(platform);
            vm.end = Some(end);
            return SliceEnd::VmEnded;
        }
        if matches!(
            vm.vcpus[index].activity,
            Activity::Halted { .. } | Activity::Parked
        ) {
            // A guest that waits (a shell at its prompt) shows the line it has not finished.
            if smp::all_waiting(vm) {
                vm.flush_console(platform);
            }
            return SliceEnd::Blocked;
        }
        if now >= slice_end {
            return SliceEnd::Preempted;
        }
    }
}

/// Logs what a vCPU looked like when its guest ended badly: its registers and its last exits
/// (a triple fault tells nothing of the exceptions that led to it; the trail may).
fn report_failure(vm: &Vm, index: usize, vcpu: &dyn Vcpu, host: &dyn HostMemory, end: &VmEnd) {
    let state = vcpu.snapshot();
    log::warn!(
        "vm {} vcpu {index}: {} with rip={:#x} rsp={:#x} rflags={:#x} cpl={} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
        vm.name,
        end.reason(),
        state.rip,
        state.rsp,
        state.rflags,
        state.cpl,
        state.cr0,
        state.cr3,
        state.cr4,
        state.efer
    );
    for exit in vm.vcpus[index].recent.iter() {
        log::warn!(
            "vm {} vcpu {index}:   earlier exit {} at rip={:#x} ({:#x})",
            vm.name,
            exit.reason.name(),
            exit.rip,
            exit.detail
        );
    }
    for line in crate::postmortem::describe(vm, vcpu, host) {
        log::warn!("vm {} vcpu {index}:   {line}", vm.name);
    }
}

/// Logs one exit: reason, RIP, privilege ring and the instruction (the trap trace).
fn trace_exit(vm: &Vm, vcpu: &dyn Vcpu, host: &dyn HostMemory, exit: &VmExit) {
    let state = vcpu.snapshot();
    let instruction = decode::disassemble(&vm.ram, host, &state);
    let detail = match exit {
        VmExit::Cpuid => format!(
            " eax={:#x} ecx={:#x}",
            vcpu.register(Register::Rax) as u32,
            vcpu.register(Register::Rcx) as u32
        ),
        VmExit::Io(io) => format!(" port={:#x} size={}", io.port, io.size),
        VmExit::MsrRead | VmExit::MsrWrite => {
            format!(" msr={:#x}", vcpu.register(Register::Rcx) as u32)
        }
        VmExit::NestedPageFault {
            guest_physical,
            access,
        } => format!(" gpa={:#x} {}", guest_physical.0, access.kind()),
        _ => String::new(),
    };
    log::info!(
        "trace: vm={} exit={} rip={:#x} ring={} insn=\"{}\"{}",
        vm.name,
        exit.reason().name(),
        state.rip,
        state.cpl,
        instruction,
        detail
    );
}

/// Moves RIP past the instruction that exited.
fn skip_instruction(vm: &Vm, vcpu: &mut dyn Vcpu, host: &dyn HostMemory) -> Result<(), VmEnd> {
    let next = match vcpu.next_rip() {
        Some(next) => next,
        None => {
            // No hardware help (e.g. SVM without NRIP save): decode the instruction.
            let state = vcpu.snapshot();
            let length = decode::instruction_length(&vm.ram, host, &state)
                .map_err(|_| VmEnd::Undecodable { rip: state.rip })?;
            // The instruction pointer wraps at the code size: 4 GiB in 32-bit code, 64 KiB in
            // 16-bit code (SDM Vol 1 3.5).
            match state.code_bitness() {
                64 => state.rip.wrapping_add(length),
                32 => state.rip.wrapping_add(length) & 0xFFFF_FFFF,
                _ => state.rip.wrapping_add(length) & 0xFFFF,
            }
        }
    };
    vcpu.set_register(Register::Rip, next);
    Ok(())
}

fn handle(
    vm: &mut Vm,
    index: usize,
    vcpu: &mut dyn Vcpu,
    platform: &mut dyn Platform,
    host: &mut dyn HostMemory,
    exit: &VmExit,
) -> Option<VmEnd> {
    let rip = vcpu.register(Register::Rip);
    match exit {
        // CPUID: answer from the host's CPUID through the guest policy.
        VmExit::Cpuid => {
            let leaf = vcpu.register(Register::Rax) as u32;
            let subleaf = vcpu.register(Register::Rcx) as u32;
            let host_cpuid = |leaf, subleaf| platform.host_cpuid(leaf, subleaf);
            // CPUID.1:ECX.OSXSAVE and CPUID.0DH:EBX follow the guest's CR4 and XCR0.
            let guest = GuestCpuState {
                cr4: vcpu.snapshot().cr4,
                xcr0: vcpu.guest_xcr0(),
            };
            let [eax, mut ebx, ecx, mut edx] = guest_cpuid(&host_cpuid, leaf, subleaf, &guest);
            // The APIC ID the guest sees is its vCPU number, not the host CPU's.
            // See: SDM Vol 2A CPUID leaf 01H EBX[31:24], leaves 0BH/1FH EDX (x2APIC ID).
            let apic_id = vm.vcpus[index].apic.id();
            match leaf {
                0x1 => ebx = (ebx & 0x00FF_FFFF) | (apic_id << 24),
                0xB | 0x1F => edx = apic_id,
                _ => {}
            }
            vcpu.set_register(Register::Rax, u64::from(eax));
            vcpu.set_register(Register::Rbx, u64::from(ebx));
            vcpu.set_register(Register::Rcx, u64::from(ecx));
            vcpu.set_register(Register::Rdx, u64::from(edx));
            skip_instruction(vm, vcpu, host).err()
        }
        // IN/OUT: route to the VM's port bus.
        VmExit::Io(io) => handle_io(vm, vcpu, platform, host, io, rip),
        // RDMSR/WRMSR: the few emulated MSRs, the backend's state-area MSRs, else #GP.
        VmExit::MsrRead => {
            let msr_number = vcpu.register(Register::Rcx) as u32;
            let now = platform.timestamp();
            let value = match msr::read(msr_number, now) {
                // The local APIC's MSRs (base, TSC deadline, x2APIC registers) are this vCPU's.
                _ if is_apic_msr(msr_number) => vm.vcpus[index].apic.read_msr(msr_number, now),
                // TSC_AUX: a plain per-vCPU value (Linux stores its CPU number there).
                _ if msr_number == msr::IA32_TSC_AUX => Some(vm.vcpus[index].tsc_aux),
                MsrRead::Value(value) => Some(value),
                MsrRead::Hardware if msr_number == msr::IA32_EFER => {
                    paging::read_efer(vm).or_else(|| vcpu.hardware_msr(msr_number))
                }
                MsrRead::Hardware => vcpu.hardware_msr(msr_number),
            };
            match value {
                Some(value) => {
                    vcpu.set_register(Register::Rax, value & 0xFFFF_FFFF);
                    vcpu.set_register(Register::Rdx, value >> 32);
                    skip_instruction(vm, vcpu, host).err()
                }
                None => {
                    refuse_msr(vm, vcpu, msr_number, "read", rip);
                    None
                }
            }
        }
        VmExit::MsrWrite => {
            let msr_number = vcpu.register(Register::Rcx) as u32;
            let value =
                (vcpu.register(Register::Rdx) << 32) | (vcpu.register(Register::Rax) & 0xFFFF_FFFF);
            let accepted = match msr::write(msr_number) {
                // The APIC may be switched between xAPIC and x2APIC mode or disabled, not moved:
                // its registers are emulated at the architectural base only.
                _ if msr_number == ringzero_devices::lapic::MSR_APIC_BASE
                    && value & 0x000F_FFFF_FFFF_F000 != smp::APIC_PAGE =>
                {
                    false
                }
                _ if msr_number == msr::IA32_TSC_AUX => {
                    vm.vcpus[index].tsc_aux = value & 0xFFFF_FFFF;
                    value >> 32 == 0
                }
                _ if is_apic_msr(msr_number) => {
                    let now = platform.timestamp();
                    let mut events = Vec::new();
                    let accepted =
                        vm.vcpus[index]
                            .apic
                            .write_msr(msr_number, value, now, &mut events);
                    smp::apic_events(vm, index, events, platform, now);
                    accepted
                }
                MsrWrite::Ignore => true,
                MsrWrite::Hardware
                    if msr_number == msr::IA32_EFER
                        && matches!(vm.paging, GuestPaging::Shadow { .. }) =>
                {
                    match paging::write_efer(vm, vcpu, host, value) {
                        Ok(accepted) => accepted,
                        Err(end) => return Some(end),
                    }
                }
                MsrWrite::Hardware => vcpu.set_hardware_msr(msr_number, value),
                MsrWrite::Fault => false,
            };
            if accepted {
                skip_instruction(vm, vcpu, host).err()
            } else {
                refuse_msr(vm, vcpu, msr_number, "write", rip);
                None
            }
        }
        // HLT with interrupts enabled: the vCPU waits for an interrupt (its APIC timer, an IPI)
        // and the scheduler gives the CPU to others; it goes on at once when an interrupt is
        // already pending, or when nothing could ever wake it (`smp::halt`). With interrupts
        // disabled it could never resume.
        VmExit::Halt => {
            if vcpu.snapshot().interrupts_enabled() {
                let end = skip_instruction(vm, vcpu, host).err();
                if end.is_none() {
                    smp::halt(vm, index, platform.timestamp());
                }
                end
            } else if smp::park(vm, index) {
                // Another vCPU may still INIT this one: parked, RIP after the HLT.
                skip_instruction(vm, vcpu, host).err()
            } else {
                Some(VmEnd::HaltedForever { rip })
            }
        }
        // Hypercalls: the ABI of docs/hypercalls.md (ring 0 only).
        VmExit::Hypercall => match crate::hypercall::handle(vm, vcpu, platform, host) {
            Ok(()) => skip_instruction(vm, vcpu, host).err(),
            Err(end) => Some(end),
        },
        // XSETBV (SVM intercepts it, VMX always exits): checked as the CPU would against the
        // components the hypervisor switches, then performed by the backend on the guest's
        // XCR0; a bad one gets the CPU's #UD or #GP(0) instead.
        VmExit::Xsetbv => {
            let state = vcpu.snapshot();
            let index = vcpu.register(Register::Rcx) as u32;
            let value =
                (vcpu.register(Register::Rdx) << 32) | (vcpu.register(Register::Rax) & 0xFFFF_FFFF);
            let host_cpuid = |leaf, subleaf| platform.host_cpuid(leaf, subleaf);
            let allowed = crate::xsave::host_support(&host_cpuid).map(|s| s.allowed_xcr0);
            match crate::xsave::check_xsetbv(index, value, state.cpl, state.cr4, allowed) {
                Ok(xcr0) => {
                    vcpu.set_guest_xcr0(xcr0);
                    skip_instruction(vm, vcpu, host).err()
                }
                Err(crate::xsave::XsetbvFault::InvalidOpcode) => {
                    vcpu.inject_exception(VECTOR_INVALID_OPCODE, None);
                    None
                }
                Err(crate::xsave::XsetbvFault::GeneralProtection) => {
                    vcpu.inject_exception(VECTOR_GENERAL_PROTECTION, Some(0));
                    None
                }
            }
        }
        // Nested page fault: a page of RAM not backed yet is backed and mapped (overcommit);
        // anything else is an access outside the VM's RAM.
        VmExit::NestedPageFault {
            guest_physical,
            access,
        } => match paging::nested_page_fault(vm, host, *guest_physical) {
            Some(Ok(())) => None,
            Some(Err(end)) => Some(end),
            // Device registers (this vCPU's local APIC, the I/O APIC, the MMIO bus): emulate
            // the instruction that touched them; anything else is outside the VM.
            None => match device_at(vm, index, guest_physical.0) {
                Some(target) => {
                    crate::mmio::emulate(vm, target, vcpu, platform, host, guest_physical.0).err()
                }
                None => Some(VmEnd::NestedPageFault {
                    guest_physical: *guest_physical,
                    access: *access,
                    rip,
                }),
            },
        },
        // Shadow paging: the guest changes its paging state or invalidates a translation.
        VmExit::ControlRegister(access) => {
            match paging::control_register(vm, vcpu, host, *access) {
                Ok(true) => skip_instruction(vm, vcpu, host).err(),
                Ok(false) => None,
                Err(end) => Some(end),
            }
        }
        VmExit::Invlpg { address } => match paging::invlpg(vm, vcpu, host, *address) {
            Ok(()) => skip_instruction(vm, vcpu, host).err(),
            Err(end) => Some(end),
        },
        // Shadow paging: a fault on the shadow tables, fixed silently or given to the guest.
        VmExit::PageFault {
            address,
            error_code,
        } => match paging::page_fault(vm, vcpu, host, *address, *error_code) {
            // The guest's own page tables map device registers: emulate the access, as under
            // nested paging.
            Err(end @ VmEnd::NestedPageFault { guest_physical, .. }) => {
                match device_at(vm, index, guest_physical.0) {
                    Some(target) => {
                        crate::mmio::emulate(vm, target, vcpu, platform, host, guest_physical.0)
                            .err()
                    }
                    None => Some(end),
                }
            }
            result => result.err(),
        },
        VmExit::NestedPagingMisconfiguration { guest_physical } => {
            Some(VmEnd::NestedPagingMisconfiguration {
                guest_physical: *guest_physical,
                rip,
            })
        }
        VmExit::TripleFault => Some(VmEnd::TripleFault { rip }),
        // VMRUN, VMLAUNCH, ...: no nested virtualization; the guest gets #UD like on a CPU
        // without the extension.
        VmExit::VirtualizationInstruction { mnemonic } => {
            log::warn!(
                "vm {}: {mnemonic} at rip={rip:#x}: injecting #UD (no nested virtualization)",
                vm.name
            );
            vcpu.inject_exception(VECTOR_INVALID_OPCODE, None);
            None
        }
        VmExit::ExternalInterrupt | VmExit::InterruptWindow | VmExit::PreemptionTimer => None,
        VmExit::EntryFailed { reason, detail } => Some(VmEnd::EntryFailed {
            reason,
            detail: *detail,
        }),
        VmExit::Unhandled { code, info1, info2 } => Some(VmEnd::Unhandled {
            code: *code,
            info1: *info1,
            info2: *info2,
            rip,
        }),
    }
}

/// Whose device registers are at `guest_physical`, if anyone's: vCPU `index`'s own local APIC
/// page, the I/O APIC's (PC platform), a device on the MMIO bus, or a PCI function's BAR.
fn device_at(vm: &Vm, index: usize, guest_physical: u64) -> Option<crate::mmio::Target> {
    if guest_physical & !0xFFF == smp::APIC_PAGE {
        Some(crate::mmio::Target::LocalApic(index))
    } else if vm.io_apic.is_some() && guest_physical & !0xFFF == IoApic::BASE {
        Some(crate::mmio::Target::IoApic)
    } else if vm.mmio.owns(guest_physical) {
        Some(crate::mmio::Target::Bus)
    } else {
        crate::pci::function_at(vm, guest_physical).map(crate::mmio::Target::Pci)
    }
}

/// IA32_APIC_BASE, IA32_TSC_DEADLINE and the x2APIC registers: the vCPU's local APIC.
/// See: SDM Vol 3A 11.4.4, 11.5.4.1, 11.12.1.2.
fn is_apic_msr(msr_number: u32) -> bool {
    msr_number == ringzero_devices::lapic::MSR_APIC_BASE
        || msr_number == ringzero_devices::lapic::MSR_TSC_DEADLINE
        || (ringzero_devices::lapic::MSR_X2APIC_FIRST..=ringzero_devices::lapic::MSR_X2APIC_LAST)
            .contains(&msr_number)
}

fn refuse_msr(vm: &mut Vm, vcpu: &mut dyn Vcpu, msr_number: u32, access: &str, rip: u64) {
    if vm.msrs_reported.insert(msr_number) {
        log::warn!("vm {}: {access} of MSR {msr_number:#x} at rip={rip:#x} refused (not emulated, or a value the hypervisor does not allow): injecting #GP (reported once per MSR)", vm.name);
    }
    vcpu.inject_exception(VECTOR_GENERAL_PROTECTION, Some(0));
}

fn handle_io(
    vm: &mut Vm,
    vcpu: &mut dyn Vcpu,
    platform: &mut dyn Platform,
    host: &mut dyn HostMemory,
    io: &IoExit,
    rip: u64,
) -> Option<VmEnd> {
    if io.string || io.repeat {
        return Some(VmEnd::UnsupportedIo { io: *io, rip });
    }
    let mask = match io.size {
        1 => 0xFF,
        2 => 0xFFFF,
        _ => 0xFFFF_FFFF,
    };
    // The PIT and the ACPI PM timer count in time: bring them to now before the guest looks.
    if matches!(io.port, 0x40..=0x43 | 0x61) {
        if let Some(pit) = vm
            .bus
            .device_mut::<ringzero_devices::Pit>(ringzero_devices::Pit::BASE)
        {
            pit.advance(platform.timestamp());
        }
    } else if matches!(io.port, 0x70 | 0x71) {
        let now = platform.unix_seconds();
        if let Some(rtc) = vm.bus.device_mut::<ringzero_devices::Rtc>(0x70) {
            rtc.set_clock(now);
        }
    } else if (ACPI_PM_BASE..ACPI_PM_BASE + 0x10).contains(&io.port) {
        let tsc_hz = vm.vcpus[0].apic.clock().tsc_hz;
        if let Some(pm) = vm.bus.device_mut::<ringzero_devices::AcpiPm>(ACPI_PM_BASE) {
            pm.set_tsc(platform.timestamp(), tsc_hz);
        }
    }
    let access = match io.direction {
        IoDirection::In => {
            let access = vm.bus.read(io.port, io.size);
            let rax = vcpu.register(Register::Rax);
            // IN AL/AX keep the rest of RAX; IN EAX zero-extends (a 32-bit register write).
            let merged = if io.size == 4 {
                u64::from(access.value)
            } else {
                (rax & !mask) | (u64::from(access.value) & mask)
            };
            vcpu.set_register(Register::Rax, merged);
            access
        }
        IoDirection::Out => {
            let value = (vcpu.register(Register::Rax) & mask) as u32;
            let mut events = Vec::new();
            let access = vm.bus.write(io.port, io.size, value, &mut events);
            for event in events {
                match event {
                    DeviceEvent::ConsoleByte(byte) => vm.console_byte(byte, platform),
                    DeviceEvent::StopVm { status } => return Some(VmEnd::ExitPort { status }),
                    DeviceEvent::PowerOff => return Some(VmEnd::PowerOff),
                    DeviceEvent::Reset => return Some(VmEnd::Reset),
                }
            }
            // A write to the PCI configuration window may have notified a virtio queue.
            if (ringzero_devices::PciBus::DATA_PORT..=ringzero_devices::PciBus::LAST_PORT)
                .contains(&io.port)
                && !vm.pci.is_empty()
            {
                crate::pci::service_windows(vm, host);
            }
            access
        }
    };
    if !access.owned {
        vm.stats.unowned_port_accesses += 1;
        if access.unowned_first_time {
            let direction = if io.direction == IoDirection::In {
                "read"
            } else {
                "write"
            };
            log::warn!(
                "vm {}: {direction} of port {:#x} (size {}) that no device owns at rip={rip:#x}: reads as all-ones, writes ignored (reported once per port)",
                vm.name,
                io.port,
                io.size
            );
        }
    }
    skip_instruction(vm, vcpu, host).err()
}
