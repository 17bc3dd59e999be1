//! Host tests of the run loop and its exit handlers (`ringzero_vmm::vm::run`), driven through
//! the public API with a scripted fake vCPU, a fake platform and fake host memory
//! (DESIGN.md point 4: decisions take hardware through traits, so exit handlers are
//! unit-tested with fakes).

use std::cell::Cell;
use std::collections::{BTreeMap, VecDeque};

use ringzero_memory::fake::FakeHostMemory;
use ringzero_memory::shadow::{GuestPagingState, RealPaging};
use ringzero_memory::{GuestPhysAddr, GuestRam, HostPhysAddr, NestedFormat, NestedPageTables};
use ringzero_vmm::exit::{IoDirection, IoExit, MemoryAccess, Reason, VmExit};
use ringzero_vmm::paging::GuestPaging;
use ringzero_vmm::vcpu::{FaultContext, GuestSnapshot, Register, Vcpu};
use ringzero_vmm::vm::{run, Vm, VmEnd, STATUS_STOPPED};
use ringzero_vmm::Platform;

// ---------------------------------------------------------------------------------------------
// Fakes
// ---------------------------------------------------------------------------------------------

const IA32_EFER: u32 = 0xC000_0080;
const COM1: u16 = 0x3F8;
const EXIT_PORT: u16 = 0xF4;
const RFLAGS_IF: u64 = 1 << 9;
/// RFLAGS bit 1 is always set.
const RFLAGS_FIXED: u64 = 1 << 1;
const VECTOR_UD: u8 = 6;
const VECTOR_GP: u8 = 13;

/// Where the guest is when a test starts.
const START_RIP: u64 = 0x10_0000;

const ALL_REGISTERS: [Register; 18] = [
    Register::Rax,
    Register::Rbx,
    Register::Rcx,
    Register::Rdx,
    Register::Rsi,
    Register::Rdi,
    Register::Rbp,
    Register::Rsp,
    Register::R8,
    Register::R9,
    Register::R10,
    Register::R11,
    Register::R12,
    Register::R13,
    Register::R14,
    Register::R15,
    Register::Rip,
    Register::Rflags,
];

fn register_index(register: Register) -> usize {
    ALL_REGISTERS
        .iter()
        .position(|candidate| *candidate == register)
        .expect("every register is in ALL_REGISTERS")
}

/// A register file: one value per [`Register`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Registers([u64; 18]);

impl Registers {
    fn get(&self, register: Register) -> u64 {
        self.0[register_index(register)]
    }

    fn set(&mut self, register: Register, value: u64) {
        self.0[register_index(register)] = value;
    }
}

/// One scripted guest exit: the registers the guest set up before the trapping instruction,
/// then the exit the "hardware" reports.
#[derive(Clone, Debug)]
struct Step {
    setup: Vec<(Register, u64)>,
    exit: VmExit,
}

/// An exception the core asked to inject, and before which entry (index into `entries`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Injected {
    vector: u8,
    error_code: Option<u32>,
    /// `entries.len()` when the exception was injected: it is delivered at that entry.
    at_entry: usize,
}

/// A vCPU that replays a script of exits.
///
/// `run()` records the register file (the state the guest resumes with), applies the next
/// step's register setup and returns its exit. When the script is empty it sets RAX = 0 and
/// returns an OUT AL to the exit port, so the VM ends with status 0.
///
/// RIP and RFLAGS live in the register file; `snapshot()` returns `state` with those two
/// overwritten from it. `next_rip()` is `RIP + instruction_length` when `instruction_length`
/// is set (hardware that reports it), `None` otherwise (the core must decode).
struct FakeVcpu {
    script: VecDeque<Step>,
    registers: Registers,
    state: GuestSnapshot,
    instruction_length: Option<u64>,
    injected: Vec<Injected>,
    /// The register file at each entry into the guest (entry 0 is the first `run()`).
    entries: Vec<Registers>,
    efer: u64,
    efer_writes: Vec<u64>,
    /// The scheduler's interface: external interrupts injected, in order (`inject_interrupt`).
    interrupts_injected: Vec<u8>,
    /// Whether the interrupt window is asked for (`request_interrupt_window`); like the
    /// hardware, a scripted [`VmExit::InterruptWindow`] closes it again.
    window_requested: bool,
    /// Every `request_interrupt_window` call, in order.
    window_requests: Vec<bool>,
    /// The vector of the last `start_at_startup_vector`.
    startup_vector: Option<u8>,
    activations: u32,
    deactivations: u32,
    /// Whether this vCPU is the active one (between `activate` and `deactivate`).
    active: bool,
    /// What `can_inject_interrupt` answers when no injection is queued (tests set it; the
    /// guest's IF and interrupt shadow in one flag).
    interruptible: bool,
    /// `write_guest_control_register` calls, and whether the fake accepts them.
    control_register_writes: Vec<(u8, u64)>,
    control_register_writes_supported: bool,
    /// An injected interrupt not yet delivered: taken at the next `run`.
    interrupt_queued: bool,
    /// The last `set_preemption_timer` argument, and what it answers (VMX: true, SVM: false).
    preemption_timer: Option<u64>,
    preemption_timer_supported: bool,
    xcr0: u64,
}

impl FakeVcpu {
    /// A 64-bit guest at [`START_RIP`] with interrupts enabled, whose hardware reports a
    /// 2-byte instruction length.
    fn new(script: Vec<Step>) -> FakeVcpu {
        let mut registers = Registers::default();
        registers.set(Register::Rip, START_RIP);
        registers.set(Register::Rflags, RFLAGS_FIXED | RFLAGS_IF);
        FakeVcpu {
            script: script.into(),
            registers,
            state: GuestSnapshot {
                rip: START_RIP,
                rsp: 0x8000,
                rflags: RFLAGS_FIXED | RFLAGS_IF,
                cr0: 0x8000_0011,
                cr3: 0x1000,
                cr4: 0x20,
                efer: 0x500,
                cs_base: 0,
                cs_long_mode: true,
                cs_default_32: false,
                cpl: 0,
            },
            instruction_length: Some(2),
            injected: Vec::new(),
            entries: Vec::new(),
            efer: 0x500,
            efer_writes: Vec::new(),
            interrupts_injected: Vec::new(),
            window_requested: false,
            window_requests: Vec::new(),
            startup_vector: None,
            activations: 0,
            deactivations: 0,
            active: false,
            interruptible: true,
            control_register_writes: Vec::new(),
            control_register_writes_supported: false,
            interrupt_queued: false,
            preemption_timer: None,
            preemption_timer_supported: true,
            xcr0: 1,
        }
    }

    fn reg(&self, register: Register) -> u64 {
        self.registers.get(register)
    }

    /// The register file the guest resumed with after the exit of step `step` (0-based).
    fn after_step(&self, step: usize) -> Registers {
        self.entries[step + 1]
    }

    /// The RIP of entry `entry`.
    fn rip_at_entry(&self, entry: usize) -> u64 {
        self.entries[entry].get(Register::Rip)
    }
}

impl Vcpu for FakeVcpu {
    fn activate(&mut self) {
        self.activations += 1;
        self.active = true;
    }

    fn deactivate(&mut self) {
        self.deactivations += 1;
        self.active = false;
    }

    fn can_inject_interrupt(&self) -> bool {
        self.interruptible && !self.interrupt_queued
    }

    fn inject_interrupt(&mut self, vector: u8) {
        self.interrupts_injected.push(vector);
        self.interrupt_queued = true;
    }

    fn request_interrupt_window(&mut self, enabled: bool) {
        self.window_requests.push(enabled);
        self.window_requested = enabled;
    }

    /// Real mode at (vector << 8):0 as after INIT + SIPI: RIP 0, RFLAGS 0x2, GPRs 0, CS base
    /// vector << 12, 16-bit code.
    fn start_at_startup_vector(&mut self, vector: u8) {
        self.startup_vector = Some(vector);
        self.registers = Registers::default();
        self.registers.set(Register::Rflags, RFLAGS_FIXED);
        self.state = GuestSnapshot {
            rip: 0,
            rsp: 0,
            rflags: RFLAGS_FIXED,
            cr0: 0x6000_0010,
            cr3: 0,
            cr4: 0,
            efer: 0,
            cs_base: u64::from(vector) << 12,
            cs_long_mode: false,
            cs_default_32: false,
            cpl: 0,
        };
        self.efer = 0;
        self.interrupt_queued = false;
    }

    fn write_guest_control_register(&mut self, register: u8, value: u64) -> bool {
        self.control_register_writes.push((register, value));
        self.control_register_writes_supported
    }

    fn set_preemption_timer(&mut self, tsc_cycles: Option<u64>) -> bool {
        if self.preemption_timer_supported {
            self.preemption_timer = tsc_cycles;
        }
        self.preemption_timer_supported
    }

    fn run(&mut self) -> VmExit {
        self.entries.push(self.registers);
        // The injected interrupt is delivered at this entry.
        self.interrupt_queued = false;
        match self.script.pop_front() {
            Some(step) => {
                for (register, value) in step.setup {
                    self.registers.set(register, value);
                }
                if step.exit == VmExit::InterruptWindow {
                    self.window_requested = false;
                }
                step.exit
            }
            None => {
                self.registers.set(Register::Rax, 0);
                VmExit::Io(io(EXIT_PORT, 1, IoDirection::Out))
            }
        }
    }

    fn register(&self, register: Register) -> u64 {
        self.registers.get(register)
    }

    fn set_register(&mut self, register: Register, value: u64) {
        self.registers.set(register, value);
    }

    fn snapshot(&self) -> GuestSnapshot {
        GuestSnapshot {
            rip: self.registers.get(Register::Rip),
            rflags: self.registers.get(Register::Rflags),
            ..self.state
        }
    }

    fn fault_context(&self) -> FaultContext {
        // The scripted guest has no descriptor tables and takes no events.
        FaultContext::default()
    }

    fn next_rip(&self) -> Option<u64> {
        self.instruction_length
            .map(|length| self.registers.get(Register::Rip).wrapping_add(length))
    }

    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) {
        self.injected.push(Injected {
            vector,
            error_code,
            at_entry: self.entries.len(),
        });
    }

    fn hardware_msr(&self, msr: u32) -> Option<u64> {
        (msr == IA32_EFER).then_some(self.efer)
    }

    fn set_shadow_paging(
        &mut self,
        _visible: &GuestPagingState,
        _real: &RealPaging,
        _root: HostPhysAddr,
    ) {
        unreachable!("these tests run nested-paging VMs")
    }

    fn flush_guest_tlb(&mut self) {}

    fn inject_page_fault(&mut self, _address: u64, error_code: u32) {
        self.inject_exception(14, Some(error_code));
    }

    fn set_guest_cr3(&mut self, _value: u64) {}

    fn guest_xcr0(&self) -> u64 {
        self.xcr0
    }

    fn set_guest_xcr0(&mut self, value: u64) {
        self.xcr0 = value;
    }

    fn set_hardware_msr(&mut self, msr: u32, value: u64) -> bool {
        if msr == IA32_EFER {
            self.efer = value;
            self.efer_writes.push(value);
            true
        } else {
            false
        }
    }
}

/// A platform with a host CPUID table (unknown leaves answer zeros), a timestamp counter that
/// advances by 10 per read, and the console lines VMs printed.
#[derive(Default)]
struct FakePlatform {
    cpuid: BTreeMap<(u32, u32), [u32; 4]>,
    clock: Cell<u64>,
    console: Vec<(String, String)>,
    /// `queues_run` of each `exit_handled` call, in order.
    handled: Vec<bool>,
}

impl FakePlatform {
    /// A host with VMX and SVM, like the machine ringzero runs on.
    fn new() -> FakePlatform {
        let mut cpuid = BTreeMap::new();
        cpuid.insert((0, 0), [0xD, 0x756E_6547, 0x6C65_746E, 0x4965_6E69]);
        // Leaf 1 ECX: SSE3 (bit 0), VMX (bit 5), SSE4.2 (bit 20); hypervisor bit clear.
        cpuid.insert(
            (1, 0),
            [
                0x0006_06A6,
                0x0000_0800,
                (1 << 0) | (1 << 5) | (1 << 20),
                0x078B_FBFF,
            ],
        );
        cpuid.insert((0x8000_0001, 0), [0, 0, 1 << 2, 0x2FD3_FBFF]);
        FakePlatform {
            cpuid,
            clock: Cell::new(1000),
            console: Vec::new(),
            handled: Vec::new(),
        }
    }

    fn lines(&self) -> Vec<(&str, &str)> {
        self.console
            .iter()
            .map(|(vm, line)| (vm.as_str(), line.as_str()))
            .collect()
    }
}

impl Platform for FakePlatform {
    fn host_cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        self.cpuid.get(&(leaf, subleaf)).copied().unwrap_or([0; 4])
    }

    fn timestamp(&self) -> u64 {
        let now = self.clock.get();
        self.clock.set(now + 10);
        now
    }

    fn console_line(&mut self, vm_name: &str, line: &str) {
        self.console.push((vm_name.to_string(), line.to_string()));
    }

    fn exit_handled(
        &mut self,
        _vm: &mut Vm,
        _host: &mut dyn ringzero_memory::HostMemory,
        queues_run: bool,
    ) {
        self.handled.push(queues_run);
    }
}

/// Everything a test needs: a VM with 64 KiB of RAM, its host memory, platform and vCPU.
struct Harness {
    host: FakeHostMemory,
    vm: Vm,
    platform: FakePlatform,
    vcpu: FakeVcpu,
}

impl Harness {
    fn new(script: Vec<Step>) -> Harness {
        let mut host = FakeHostMemory::new();
        let ram = GuestRam::new(0x1_0000, &mut host).expect("the fake host has frames");
        Harness {
            vm: Vm::new(
                "guest0",
                ram,
                GuestPaging::Nested(
                    NestedPageTables::new_empty(NestedFormat::Npt, &mut host)
                        .expect("a root frame"),
                ),
                false,
            ),
            host,
            platform: FakePlatform::new(),
            vcpu: FakeVcpu::new(script),
        }
    }

    fn run(&mut self) -> VmEnd {
        run(
            &mut self.vm,
            &mut self.vcpu,
            &mut self.platform,
            &mut self.host,
        )
    }

    fn write_ram(&mut self, address: u64, bytes: &[u8]) {
        self.vm
            .ram
            .write(&mut self.host, GuestPhysAddr(address), bytes)
            .expect("inside the test RAM");
    }

    fn write_ram_u64(&mut self, address: u64, value: u64) {
        self.write_ram(address, &value.to_le_bytes());
    }

    /// A 32-bit protected-mode guest without paging (CR0 = PE | ET), code at `rip`, and
    /// hardware that does not report instruction lengths.
    fn flat_32bit_without_next_rip(&mut self, rip: u64) {
        self.vcpu.state.cr0 = 0x11;
        self.vcpu.state.cr3 = 0;
        self.vcpu.state.cr4 = 0;
        self.vcpu.state.efer = 0;
        self.vcpu.state.cs_long_mode = false;
        self.vcpu.state.cs_default_32 = true;
        self.vcpu.registers.set(Register::Rip, rip);
        self.vcpu.instruction_length = None;
    }
}

fn io(port: u16, size: u8, direction: IoDirection) -> IoExit {
    IoExit {
        port,
        size,
        direction,
        string: false,
        repeat: false,
    }
}

fn step(setup: &[(Register, u64)], exit: VmExit) -> Step {
    Step {
        setup: setup.to_vec(),
        exit,
    }
}

fn out_byte(port: u16, byte: u8) -> Step {
    step(
        &[
            (Register::Rax, 0xDEAD_BEEF_0000_0000 | u64::from(byte)),
            (Register::Rdx, u64::from(port)),
        ],
        VmExit::Io(io(port, 1, IoDirection::Out)),
    )
}

fn cpuid(leaf: u32, subleaf: u32) -> Step {
    step(
        &[
            (Register::Rax, u64::from(leaf)),
            (Register::Rcx, u64::from(subleaf)),
        ],
        VmExit::Cpuid,
    )
}

fn rdmsr(msr: u32) -> Step {
    step(&[(Register::Rcx, u64::from(msr))], VmExit::MsrRead)
}

fn wrmsr(msr: u32, value: u64) -> Step {
    ecx_edx_eax(msr, value, VmExit::MsrWrite)
}

/// An exit of an instruction that takes ECX and a 64-bit value in EDX:EAX (WRMSR, XSETBV).
fn ecx_edx_eax(ecx: u32, value: u64, exit: VmExit) -> Step {
    step(
        &[
            (Register::Rcx, u64::from(ecx)),
            (Register::Rax, value & 0xFFFF_FFFF),
            (Register::Rdx, value >> 32),
        ],
        exit,
    )
}

fn success() -> VmEnd {
    VmEnd::ExitPort { status: 0 }
}

// ---------------------------------------------------------------------------------------------
// 1. CPUID
// ---------------------------------------------------------------------------------------------

#[test]
fn cpuid_leaf1_hides_vmx_and_sets_hypervisor_bit() {
    let mut h = Harness::new(vec![step(
        &[
            (Register::Rax, 0xFFFF_FFFF_0000_0001),
            (Register::Rbx, 0x1111_2222_3333_4444),
            (Register::Rcx, 0xFFFF_FFFF_0000_0000),
            (Register::Rdx, 0x5555_6666_7777_8888),
        ],
        VmExit::Cpuid,
    )]);
    assert_eq!(h.run(), success());

    let after = h.vcpu.after_step(0);
    let ecx = after.get(Register::Rcx);
    assert_ne!(ecx & (1 << 31), 0, "hypervisor bit set: {ecx:#x}");
    assert_eq!(ecx & (1 << 5), 0, "VMX hidden: {ecx:#x}");
    assert_eq!(ecx & 1, 1, "SSE3 passes through: {ecx:#x}");
    assert_ne!(ecx & (1 << 20), 0, "SSE4.2 passes through: {ecx:#x}");
    // 32-bit results zero-extend into the 64-bit registers.
    assert_eq!(after.get(Register::Rax), 0x0006_06A6);
    assert_eq!(after.get(Register::Rbx), 0x0000_0800);
    assert_eq!(ecx >> 32, 0);
    assert_eq!(after.get(Register::Rdx), 0x078B_FBFF);
    assert_eq!(after.get(Register::Rip), START_RIP + 2, "RIP = next_rip");
    assert!(h.vcpu.injected.is_empty());
}

#[test]
fn cpuid_hypervisor_leaf_has_signature() {
    let mut h = Harness::new(vec![cpuid(0x4000_0000, 0)]);
    h.vcpu.instruction_length = Some(3); // e.g. a prefixed CPUID
    assert_eq!(h.run(), success());

    let after = h.vcpu.after_step(0);
    assert_eq!(after.get(Register::Rax), 0x4000_0000, "max hypervisor leaf");
    let mut signature = Vec::new();
    for register in [Register::Rbx, Register::Rcx, Register::Rdx] {
        let value = after.get(register);
        assert_eq!(value >> 32, 0);
        signature.extend_from_slice(&(value as u32).to_le_bytes());
    }
    assert_eq!(signature, b"ringzero-hv\0");
    assert_eq!(after.get(Register::Rip), START_RIP + 3);
}

#[test]
fn cpuid_other_leaves_come_from_the_host_and_svm_is_hidden() {
    let mut h = Harness::new(vec![cpuid(0, 0), cpuid(0x8000_0001, 0)]);
    assert_eq!(h.run(), success());

    let leaf0 = h.vcpu.after_step(0);
    assert_eq!(leaf0.get(Register::Rax), 0xD);
    assert_eq!(leaf0.get(Register::Rbx), 0x756E_6547);
    assert_eq!(leaf0.get(Register::Rcx), 0x6C65_746E);
    assert_eq!(leaf0.get(Register::Rdx), 0x4965_6E69);
    let extended = h.vcpu.after_step(1);
    assert_eq!(extended.get(Register::Rcx) & (1 << 2), 0, "SVM hidden");
    assert_eq!(extended.get(Register::Rdx), 0x2FD3_FBFF);
    assert_eq!(extended.get(Register::Rip), START_RIP + 4);
}

// ---------------------------------------------------------------------------------------------
// 2. Console output through the UART
// ---------------------------------------------------------------------------------------------

#[test]
fn uart_output_becomes_one_console_line_with_the_vm_name() {
    let mut h = Harness::new(vec![
        out_byte(COM1, b'h'),
        out_byte(COM1, b'i'),
        out_byte(COM1, b'\n'),
    ]);
    h.vcpu.instruction_length = Some(1); // out dx, al
    assert_eq!(h.run(), success());

    assert_eq!(h.platform.lines(), [("guest0", "hi")]);
    assert_eq!(h.vcpu.rip_at_entry(3), START_RIP + 3, "each OUT skipped");
    assert_eq!(h.vm.stats.unowned_port_accesses, 0);
}

#[test]
fn partial_console_line_is_flushed_when_the_vm_ends() {
    let mut h = Harness::new(vec![
        out_byte(COM1, b'o'),
        out_byte(COM1, b'k'),
        out_byte(COM1, b'\r'),
        out_byte(COM1, b'\n'),
        out_byte(COM1, b'b'),
        out_byte(COM1, b'y'),
        out_byte(COM1, b'e'),
    ]);
    assert_eq!(h.run(), success());

    // CR is dropped; "bye" has no newline and is printed when the VM ends.
    assert_eq!(h.platform.lines(), [("guest0", "ok"), ("guest0", "bye")]);
}

#[test]
fn partial_console_line_is_flushed_on_an_abnormal_end_too() {
    let mut h = Harness::new(vec![out_byte(COM1, b'x'), step(&[], VmExit::TripleFault)]);
    h.vm.name = "crasher".to_string();
    assert_eq!(h.run(), VmEnd::TripleFault { rip: START_RIP + 2 });
    assert_eq!(h.platform.lines(), [("crasher", "x")]);
}

#[test]
fn overlong_console_lines_are_split_at_1024_bytes() {
    let mut script: Vec<Step> = (0..1030).map(|_| out_byte(COM1, b'a')).collect();
    script.push(out_byte(COM1, b'\n'));
    let mut h = Harness::new(script);
    assert_eq!(h.run(), success());

    let lines = h.platform.lines();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0].1.len(), 1024);
    assert_eq!(lines[1].1, "a".repeat(6));
}

// ---------------------------------------------------------------------------------------------
// 3. IN from the UART
// ---------------------------------------------------------------------------------------------

#[test]
fn in_al_from_lsr_sets_thre_and_keeps_upper_rax() {
    let mut h = Harness::new(vec![step(
        &[
            (Register::Rax, 0x1234_5678_9ABC_DE00),
            (Register::Rdx, u64::from(COM1 + 5)),
        ],
        VmExit::Io(io(COM1 + 5, 1, IoDirection::In)),
    )]);
    h.vcpu.instruction_length = Some(1);
    assert_eq!(h.run(), success());

    let after = h.vcpu.after_step(0);
    let rax = after.get(Register::Rax);
    assert_eq!(rax & 0x20, 0x20, "LSR.THRE set: {rax:#x}");
    assert_eq!(rax & 0xFF, 0x60, "THRE | TEMT, nothing received: {rax:#x}");
    assert_eq!(rax & !0xFF, 0x1234_5678_9ABC_DE00, "upper RAX kept");
    assert_eq!(after.get(Register::Rip), START_RIP + 1);
}

#[test]
fn in_ax_keeps_upper_rax_and_in_eax_zero_extends() {
    let mut h = Harness::new(vec![
        // Scratch register = 0x5A, then read it back 16 and 32 bits wide from SCR.
        out_byte(COM1 + 7, 0x5A),
        step(
            &[(Register::Rax, 0xAAAA_BBBB_CCCC_DDDD)],
            VmExit::Io(io(COM1 + 7, 2, IoDirection::In)),
        ),
        step(
            &[(Register::Rax, 0xAAAA_BBBB_CCCC_DDDD)],
            VmExit::Io(io(COM1 + 5, 4, IoDirection::In)),
        ),
    ]);
    assert_eq!(h.run(), success());

    // IN AX at 0x3FF: SCR, then port 0x400 (outside the UART: 0xFF).
    let ax = h.vcpu.after_step(1).get(Register::Rax);
    assert_eq!(ax, 0xAAAA_BBBB_CCCC_FF5A);
    // IN EAX at 0x3FD: LSR, MSR, SCR, 0xFF; a 32-bit write zero-extends.
    let eax = h.vcpu.after_step(2).get(Register::Rax);
    assert_eq!(eax >> 32, 0, "zero-extended: {eax:#x}");
    assert_eq!(eax & 0xFF, 0x60, "LSR: {eax:#x}");
    assert_eq!((eax >> 16) & 0xFF, 0x5A, "SCR: {eax:#x}");
    assert_eq!(eax >> 24, 0xFF);
}

// ---------------------------------------------------------------------------------------------
// 4. Unowned ports
// ---------------------------------------------------------------------------------------------

#[test]
fn unowned_ports_read_all_ones_and_are_counted() {
    let mut h = Harness::new(vec![
        step(
            &[(Register::Rax, 0x1111_2222_3333_4444)],
            VmExit::Io(io(0x80, 1, IoDirection::In)),
        ),
        step(
            &[(Register::Rax, 0x1111_2222_3333_4444)],
            VmExit::Io(io(0x80, 2, IoDirection::In)),
        ),
        step(
            &[(Register::Rax, 0x1111_2222_3333_4444)],
            VmExit::Io(io(0x1234, 4, IoDirection::In)),
        ),
        // Writes to nobody are ignored but counted too.
        out_byte(0x80, 0x42),
    ]);
    h.vcpu.instruction_length = Some(1);
    assert_eq!(h.run(), success());

    assert_eq!(
        h.vcpu.after_step(0).get(Register::Rax),
        0x1111_2222_3333_44FF
    );
    assert_eq!(
        h.vcpu.after_step(1).get(Register::Rax),
        0x1111_2222_3333_FFFF
    );
    assert_eq!(h.vcpu.after_step(2).get(Register::Rax), 0xFFFF_FFFF);
    assert_eq!(h.vm.stats.unowned_port_accesses, 4);
    assert_eq!(
        h.vcpu.rip_at_entry(4),
        START_RIP + 4,
        "every access skipped"
    );
    assert!(h.platform.console.is_empty());
    assert!(h.vcpu.injected.is_empty());
}

// ---------------------------------------------------------------------------------------------
// 5. Exit port
// ---------------------------------------------------------------------------------------------

#[test]
fn exit_port_ends_the_vm_with_the_guest_status() {
    let mut h = Harness::new(vec![out_byte(EXIT_PORT, 7), cpuid(0, 0)]);
    let end = h.run();
    assert_eq!(end, VmEnd::ExitPort { status: 7 });
    assert_eq!(end.reason(), "exit-port");
    assert_eq!(end.status(), 7);
    assert!(!end.is_success());
    // The VM stopped at the OUT: the CPUID after it never ran.
    assert_eq!(h.vcpu.entries.len(), 1);
    assert_eq!(h.vcpu.script.len(), 1);
}

#[test]
fn exit_port_status_is_masked_to_the_access_size() {
    let mut h = Harness::new(vec![step(
        &[(Register::Rax, 0xFFFF_FFFF_1234_5678)],
        VmExit::Io(io(EXIT_PORT, 2, IoDirection::Out)),
    )]);
    assert_eq!(h.run(), VmEnd::ExitPort { status: 0x5678 });
}

#[test]
fn exit_port_status_zero_is_success() {
    let mut h = Harness::new(vec![]);
    let end = h.run();
    assert_eq!(end, success());
    assert!(end.is_success());
    assert_eq!(end.status(), 0);
}

// ---------------------------------------------------------------------------------------------
// 6. MSRs
// ---------------------------------------------------------------------------------------------

#[test]
fn rdmsr_apic_base_is_emulated() {
    let mut h = Harness::new(vec![step(
        &[
            (Register::Rcx, 0x1B),
            (Register::Rax, 0xFFFF_FFFF_FFFF_FFFF),
            (Register::Rdx, 0xFFFF_FFFF_FFFF_FFFF),
        ],
        VmExit::MsrRead,
    )]);
    assert_eq!(h.run(), success());

    let after = h.vcpu.after_step(0);
    assert_eq!(after.get(Register::Rax), 0xFEE0_0900);
    assert_eq!(after.get(Register::Rdx), 0);
    assert_eq!(after.get(Register::Rip), START_RIP + 2);
    assert!(h.vcpu.injected.is_empty());
}

#[test]
fn rdmsr_of_unknown_msr_injects_gp_without_advancing_rip() {
    let mut h = Harness::new(vec![rdmsr(0xDEAD), rdmsr(0xDEAD)]);
    h.vcpu.registers.set(Register::Rax, 0x77);
    h.vcpu.registers.set(Register::Rdx, 0x88);
    assert_eq!(h.run(), success());

    assert_eq!(
        h.vcpu.injected,
        [
            Injected {
                vector: VECTOR_GP,
                error_code: Some(0),
                at_entry: 1
            },
            Injected {
                vector: VECTOR_GP,
                error_code: Some(0),
                at_entry: 2
            },
        ]
    );
    for step in 0..2 {
        let after = h.vcpu.after_step(step);
        assert_eq!(after.get(Register::Rip), START_RIP, "fault: RIP unchanged");
        assert_eq!(after.get(Register::Rax), 0x77, "RAX untouched");
        assert_eq!(after.get(Register::Rdx), 0x88, "RDX untouched");
    }
    assert_eq!(h.vm.stats.get(Reason::MsrRead).count, 2);
}

#[test]
fn rdmsr_of_efer_and_tsc() {
    let mut h = Harness::new(vec![rdmsr(IA32_EFER), rdmsr(0x10)]);
    h.vcpu.efer = 0x1_0000_0D01;
    assert_eq!(h.run(), success());

    let efer = h.vcpu.after_step(0);
    assert_eq!(efer.get(Register::Rax), 0x0000_0D01);
    assert_eq!(efer.get(Register::Rdx), 0x1);
    let tsc = h.vcpu.after_step(1);
    let value = (tsc.get(Register::Rdx) << 32) | tsc.get(Register::Rax);
    assert!(value >= 1000, "the platform's timestamp: {value}");
    assert!(value < h.platform.clock.get());
    assert_eq!(tsc.get(Register::Rip), START_RIP + 4);
    assert!(h.vcpu.injected.is_empty());
}

#[test]
fn wrmsr_of_efer_goes_to_the_backend() {
    let mut h = Harness::new(vec![step(
        &[
            (Register::Rcx, u64::from(IA32_EFER)),
            // Upper halves of RAX and RDX are ignored by WRMSR.
            (Register::Rax, 0xFFFF_FFFF_0000_0D01),
            (Register::Rdx, 0xFFFF_FFFF_0000_0000),
        ],
        VmExit::MsrWrite,
    )]);
    assert_eq!(h.run(), success());

    assert_eq!(h.vcpu.efer_writes, [0xD01]);
    assert_eq!(h.vcpu.efer, 0xD01);
    assert_eq!(h.vcpu.after_step(0).get(Register::Rip), START_RIP + 2);
    assert!(h.vcpu.injected.is_empty());
}

#[test]
fn wrmsr_policy_ignore_and_fault() {
    let mut h = Harness::new(vec![
        wrmsr(0x1B, 0xFEE0_0900), // unchanged APIC base: accepted, ignored
        wrmsr(0x1B, 0xFEC0_0900), // moving the APIC: #GP
        wrmsr(0x10, 0),           // writing the TSC: #GP
        wrmsr(0xDEAD, 1),         // unknown to the core and the backend: #GP
    ]);
    assert_eq!(h.run(), success());

    assert_eq!(h.vcpu.rip_at_entry(1), START_RIP + 2);
    for entry in 2..=4 {
        assert_eq!(h.vcpu.rip_at_entry(entry), START_RIP + 2, "entry {entry}");
    }
    let vectors: Vec<_> = h
        .vcpu
        .injected
        .iter()
        .map(|injected| (injected.vector, injected.error_code, injected.at_entry))
        .collect();
    assert_eq!(
        vectors,
        [
            (VECTOR_GP, Some(0), 2),
            (VECTOR_GP, Some(0), 3),
            (VECTOR_GP, Some(0), 4)
        ]
    );
    assert!(h.vcpu.efer_writes.is_empty());
}

// ---------------------------------------------------------------------------------------------
// 7. HLT
// ---------------------------------------------------------------------------------------------

#[test]
fn hlt_with_interrupts_enabled_continues() {
    let mut h = Harness::new(vec![step(&[], VmExit::Halt), cpuid(0, 0)]);
    h.vcpu.instruction_length = Some(1);
    assert_eq!(h.run(), success());
    assert_eq!(h.vcpu.rip_at_entry(1), START_RIP + 1);
    assert_eq!(h.vcpu.rip_at_entry(2), START_RIP + 2);
    assert_eq!(h.vm.stats.get(Reason::Halt).count, 1);
}

#[test]
fn hlt_with_interrupts_disabled_halts_forever() {
    let mut h = Harness::new(vec![
        step(&[(Register::Rflags, RFLAGS_FIXED)], VmExit::Halt),
        cpuid(0, 0),
    ]);
    let end = h.run();
    assert_eq!(end, VmEnd::HaltedForever { rip: START_RIP });
    assert_eq!(end.reason(), "halted");
    assert_eq!(end.status(), STATUS_STOPPED);
    assert_eq!(h.vcpu.reg(Register::Rip), START_RIP, "RIP not advanced");
    assert_eq!(h.vcpu.script.len(), 1, "nothing ran after the HLT");
}

// ---------------------------------------------------------------------------------------------
// 8. Decoding the instruction when the hardware gives no next RIP
// ---------------------------------------------------------------------------------------------

#[test]
fn without_next_rip_the_instruction_is_decoded_from_guest_ram() {
    let mut h = Harness::new(vec![cpuid(1, 0)]);
    h.flat_32bit_without_next_rip(0x1000);
    h.write_ram(0x1000, &[0x0F, 0xA2]); // cpuid
    assert_eq!(h.run(), success());

    let after = h.vcpu.after_step(0);
    assert_eq!(after.get(Register::Rip), 0x1002);
    assert_ne!(
        after.get(Register::Rcx) & (1 << 31),
        0,
        "CPUID was answered"
    );
}

#[test]
fn without_next_rip_each_length_is_decoded() {
    // in al, dx (1) ; out dx, al (1) ; rdmsr (2) ; hlt (1) ; vmmcall (3) ; 66 cpuid (3)
    let code = [
        0xEC, 0xEE, 0x0F, 0x32, 0xF4, 0x0F, 0x01, 0xD9, 0x66, 0x0F, 0xA2,
    ];
    let mut h = Harness::new(vec![
        step(&[], VmExit::Io(io(COM1 + 5, 1, IoDirection::In))),
        out_byte(COM1 + 7, 1),
        rdmsr(0x1B),
        step(&[], VmExit::Halt),
        step(&[], VmExit::Hypercall),
        cpuid(0, 0),
    ]);
    h.flat_32bit_without_next_rip(0x2FF8); // crosses into the next page
    h.write_ram(0x2FF8, &code);
    assert_eq!(h.run(), success());

    let rips: Vec<u64> = (1..=6).map(|entry| h.vcpu.rip_at_entry(entry)).collect();
    assert_eq!(
        rips,
        [0x2FF9, 0x2FFA, 0x2FFC, 0x2FFD, 0x3000, 0x3003],
        "RIP after each instruction"
    );
    assert_eq!(
        h.vcpu.after_step(4).get(Register::Rax),
        u64::MAX,
        "unknown hypercall"
    );
}

#[test]
fn without_next_rip_decoding_walks_the_guest_page_tables() {
    let mut h = Harness::new(vec![step(&[], VmExit::Halt)]);
    long_mode_at_0x200000(&mut h);
    h.write_ram(0x5000, &[0x0F, 0x32]); // rdmsr
    assert_eq!(h.run(), success());

    // The 2-byte instruction at the translated address (virtual 0x20_0000 itself is beyond
    // the 64 KiB of RAM, so an untranslated fetch would have failed).
    assert_eq!(h.vcpu.rip_at_entry(1), 0x20_0002);
}

#[test]
fn without_next_rip_garbage_is_undecodable() {
    let mut h = Harness::new(vec![cpuid(0, 0), cpuid(0, 0)]);
    h.flat_32bit_without_next_rip(0x1000);
    // 0F 04 is an undefined opcode on every x86 CPU (IA-32 and AMD64).
    h.write_ram(0x1000, &[0x0F, 0x04]);
    let end = h.run();
    assert_eq!(end, VmEnd::Undecodable { rip: 0x1000 });
    assert_eq!(end.reason(), "undecodable-instruction");
    assert_eq!(h.vcpu.reg(Register::Rip), 0x1000);
    assert_eq!(h.vcpu.script.len(), 1, "the VM stopped at the first exit");
}

/// The brief's example of garbage, `0F FF`, is UD0, which takes a ModRM byte: with RAM zeroed
/// after it the bytes read `0F FF 00` = `ud0 eax, [eax]` (3 bytes), a valid instruction. The
/// core decodes it (correctly) instead of ending the VM; UD0 cannot exit with CPUID anyway.
#[test]
fn ud0_is_a_valid_three_byte_instruction_not_garbage() {
    let mut h = Harness::new(vec![cpuid(0, 0)]);
    h.flat_32bit_without_next_rip(0x1000);
    h.write_ram(0x1000, &[0x0F, 0xFF]);
    assert_eq!(h.run(), success());
    assert_eq!(h.vcpu.rip_at_entry(1), 0x1003);
}

/// Maps virtual 0x20_0000 to physical 0x5000 with 4-level paging (PML4 at 0x1000) and puts
/// the guest in 64-bit mode at that address, without hardware instruction lengths.
fn long_mode_at_0x200000(h: &mut Harness) {
    h.write_ram_u64(0x1000, 0x2000 | 0x3);
    h.write_ram_u64(0x2000, 0x3000 | 0x3);
    h.write_ram_u64(0x3000 + 8, 0x4000 | 0x3);
    h.write_ram_u64(0x4000, 0x5000 | 0x3);
    h.vcpu.state.cr0 = 0x8000_0011;
    h.vcpu.state.cr3 = 0x1000;
    h.vcpu.state.cr4 = 0x20;
    h.vcpu.state.efer = 0x500;
    h.vcpu.state.cs_long_mode = true;
    h.vcpu.registers.set(Register::Rip, 0x20_0000);
    h.vcpu.instruction_length = None;
}

/// In 64-bit mode the CS base is treated as zero (SDM Vol 3A 3.4.4; APM Vol 2 4.5.3), but the
/// hidden CS base the backend reports (SVM: VMCB `save.cs.base`) may hold whatever the code
/// descriptor said. `decode::fetch` adds it anyway.
#[test]

fn long_mode_decoding_ignores_the_cs_base() {
    let mut h = Harness::new(vec![step(&[], VmExit::Halt)]);
    long_mode_at_0x200000(&mut h);
    h.write_ram(0x5000, &[0x0F, 0x32]); // rdmsr at the real RIP
    h.write_ram(0x5010, &[0xF4]); // hlt at RIP + cs_base
    h.vcpu.state.cs_base = 0x10;
    assert_eq!(h.run(), success());
    assert_eq!(h.vcpu.rip_at_entry(1), 0x20_0002);
}

/// Outside 64-bit mode EIP is 32 bits: after a 2-byte instruction ending at 0xFFFF_FFFF the
/// next EIP is 0 (and VM entry requires RIP[63:32] = 0 outside 64-bit mode: SDM Vol 3C
/// 27.3.1.4; a backend would fail to enter the guest with the value the core writes).
#[test]

fn decoded_next_eip_wraps_at_4_gib_in_32_bit_mode() {
    let mut h = Harness::new(vec![cpuid(0, 0)]);
    h.flat_32bit_without_next_rip(0xFFFF_FFFE);
    // Linear addresses wrap at 4 GiB too: CS base 0x2000 puts the instruction at 0x1FFE.
    h.vcpu.state.cs_base = 0x2000;
    h.write_ram(0x1FFE, &[0x0F, 0xA2]); // cpuid
    assert_eq!(h.run(), success());
    assert_eq!(h.vcpu.rip_at_entry(1), 0);
}

#[test]
fn without_next_rip_an_unmapped_rip_is_undecodable() {
    let mut h = Harness::new(vec![step(&[], VmExit::Halt)]);
    h.flat_32bit_without_next_rip(0x10_0000); // beyond the 64 KiB of RAM
    assert_eq!(h.run(), VmEnd::Undecodable { rip: 0x10_0000 });
}

// ---------------------------------------------------------------------------------------------
// 9. Fatal and injected exits
// ---------------------------------------------------------------------------------------------

#[test]
fn nested_page_fault_ends_the_vm_with_the_address() {
    let access = MemoryAccess {
        write: true,
        execute: false,
        present: false,
    };
    let mut h = Harness::new(vec![step(
        &[],
        VmExit::NestedPageFault {
            guest_physical: GuestPhysAddr(0xFEB0_0030),
            access,
        },
    )]);
    let end = h.run();
    assert_eq!(
        end,
        VmEnd::NestedPageFault {
            guest_physical: GuestPhysAddr(0xFEB0_0030),
            access,
            rip: START_RIP
        }
    );
    assert_eq!(end.reason(), "nested-page-fault");
    assert_eq!(end.status(), STATUS_STOPPED);
    assert!(end.describe().contains("0xfeb00030"), "{}", end.describe());
    assert!(end.describe().contains("write"), "{}", end.describe());
}

#[test]
fn triple_fault_ends_the_vm_with_rip() {
    let mut h = Harness::new(vec![step(&[(Register::Rip, 0xABCD)], VmExit::TripleFault)]);
    let end = h.run();
    assert_eq!(end, VmEnd::TripleFault { rip: 0xABCD });
    assert_eq!(end.reason(), "triple-fault");
    assert_eq!(end.status(), STATUS_STOPPED);
}

/// The fake host with XSAVE turned on (CR4.OSXSAVE) and x87, SSE, AVX in XCR0's range.
fn with_xsave_host(h: &mut Harness) {
    let leaf1 = h.platform.cpuid.get_mut(&(1, 0)).expect("leaf 1");
    leaf1[2] |= (1 << 26) | (1 << 27) | (1 << 28);
    h.platform.cpuid.insert((0xD, 0), [0x7, 832, 832, 0]);
    h.platform.cpuid.insert((0xD, 2), [256, 576, 0, 0]);
}

fn xsetbv(index: u32, value: u64) -> Step {
    ecx_edx_eax(index, value, VmExit::Xsetbv)
}

#[test]
fn xsetbv_sets_the_guest_xcr0_and_cpuid_follows() {
    let mut h = Harness::new(vec![xsetbv(0, 7), cpuid(1, 0), cpuid(0xD, 0)]);
    with_xsave_host(&mut h);
    h.vcpu.state.cr4 |= 1 << 18;
    assert_eq!(h.run(), success());
    assert_eq!(h.vcpu.xcr0, 7);
    assert!(h.vcpu.injected.is_empty());
    assert_eq!(h.vcpu.rip_at_entry(1), START_RIP + 2, "XSETBV skipped");
    let leaf1 = h.vcpu.after_step(1);
    assert_ne!(
        leaf1.get(Register::Rcx) & (1 << 27),
        0,
        "OSXSAVE = guest CR4.OSXSAVE"
    );
    let leaf_d = h.vcpu.after_step(2);
    assert_eq!(leaf_d.get(Register::Rax), 7);
    assert_eq!(leaf_d.get(Register::Rbx), 832, "size for XCR0 = 7");
    assert_eq!(h.vm.stats.get(Reason::Xsetbv).count, 1);
}

#[test]
fn bad_xsetbv_injects_gp_or_ud() {
    // AVX without SSE: #GP(0), XCR0 unchanged, RIP unchanged.
    let mut h = Harness::new(vec![xsetbv(0, 5), xsetbv(1, 1), cpuid(0, 0)]);
    with_xsave_host(&mut h);
    h.vcpu.state.cr4 |= 1 << 18;
    assert_eq!(h.run(), success());
    assert_eq!(h.vcpu.xcr0, 1);
    let gp = |at_entry| Injected {
        vector: VECTOR_GP,
        error_code: Some(0),
        at_entry,
    };
    assert_eq!(h.vcpu.injected, [gp(1), gp(2)]);
    assert_eq!(h.vcpu.rip_at_entry(2), START_RIP, "a fault: RIP unchanged");

    // CR4.OSXSAVE clear: #UD.
    let mut h = Harness::new(vec![xsetbv(0, 3), cpuid(0, 0)]);
    with_xsave_host(&mut h);
    assert_eq!(h.run(), success());
    assert_eq!(h.vcpu.xcr0, 1);
    assert_eq!(
        h.vcpu.injected,
        [Injected {
            vector: VECTOR_UD,
            error_code: None,
            at_entry: 1
        }]
    );
}

#[test]
fn virtualization_instruction_injects_ud_and_continues() {
    let mut h = Harness::new(vec![
        step(&[], VmExit::VirtualizationInstruction { mnemonic: "vmrun" }),
        cpuid(0, 0),
    ]);
    assert_eq!(h.run(), success());
    assert_eq!(
        h.vcpu.injected,
        [Injected {
            vector: VECTOR_UD,
            error_code: None,
            at_entry: 1
        }]
    );
    assert_eq!(h.vcpu.rip_at_entry(1), START_RIP, "a fault: RIP unchanged");
    assert_eq!(h.vcpu.rip_at_entry(2), START_RIP + 2, "the loop went on");
    assert_eq!(h.vm.stats.get(Reason::VirtualizationInstruction).count, 1);
}

#[test]
fn entry_failed_ends_the_vm() {
    let mut h = Harness::new(vec![
        step(
            &[],
            VmExit::EntryFailed {
                reason: "invalid guest state",
                detail: 0x21,
            },
        ),
        cpuid(0, 0),
    ]);
    let end = h.run();
    assert_eq!(
        end,
        VmEnd::EntryFailed {
            reason: "invalid guest state",
            detail: 0x21
        }
    );
    assert_eq!(end.reason(), "entry-failed");
    assert_eq!(end.status(), STATUS_STOPPED);
    assert_eq!(h.vm.stats.get(Reason::EntryFailed).count, 1);
}

#[test]
fn external_interrupt_resumes_at_the_same_rip() {
    let mut h = Harness::new(vec![step(&[], VmExit::ExternalInterrupt)]);
    assert_eq!(h.run(), success());
    assert_eq!(h.vcpu.rip_at_entry(1), START_RIP);
    assert!(h.vcpu.injected.is_empty());
}

#[test]
fn window_and_timer_exits_resume_at_the_same_rip() {
    let mut h = Harness::new(vec![
        step(&[], VmExit::InterruptWindow),
        step(&[], VmExit::PreemptionTimer),
    ]);
    h.vcpu.request_interrupt_window(true);
    assert_eq!(h.run(), success());
    assert_eq!(h.vcpu.rip_at_entry(1), START_RIP);
    assert_eq!(h.vcpu.rip_at_entry(2), START_RIP);
    assert!(h.vcpu.injected.is_empty());
    assert!(h.vcpu.interrupts_injected.is_empty());
    // Like the hardware, the fake closes the window once the exit is taken.
    assert!(!h.vcpu.window_requested);
    assert_eq!(h.vcpu.window_requests, [true]);
    let stats = &h.vm.stats;
    assert_eq!(stats.get(Reason::InterruptWindow).count, 1);
    assert_eq!(stats.get(Reason::PreemptionTimer).count, 1);
}

/// The fake vCPU's side of the scheduler interface, as the core's tests will rely on it.
#[test]
fn fake_vcpu_records_the_scheduler_interface() {
    let mut vcpu = FakeVcpu::new(Vec::new());
    assert!(vcpu.can_inject_interrupt(), "interruptible by default");
    vcpu.activate();
    assert!(vcpu.active);
    vcpu.inject_interrupt(0x30);
    assert!(!vcpu.can_inject_interrupt(), "one event queued at a time");
    let _ = vcpu.run();
    assert!(vcpu.can_inject_interrupt(), "delivered at the entry");
    vcpu.interruptible = false;
    assert!(!vcpu.can_inject_interrupt());
    vcpu.deactivate();
    assert_eq!(
        (vcpu.activations, vcpu.deactivations, vcpu.active),
        (1, 1, false)
    );
    assert_eq!(vcpu.interrupts_injected, [0x30]);

    assert!(vcpu.set_preemption_timer(Some(10_000)));
    assert_eq!(vcpu.preemption_timer, Some(10_000));
    assert!(vcpu.set_preemption_timer(None));
    assert_eq!(vcpu.preemption_timer, None);
    vcpu.preemption_timer_supported = false;
    assert!(!vcpu.set_preemption_timer(Some(1)), "SVM has no such timer");

    vcpu.start_at_startup_vector(0x9A);
    assert_eq!(vcpu.startup_vector, Some(0x9A));
    let snapshot = vcpu.snapshot();
    assert_eq!((snapshot.rip, snapshot.cs_base), (0, 0x9_A000));
    assert_eq!(snapshot.code_bitness(), 16);
    assert!(!snapshot.interrupts_enabled());
    assert_eq!(vcpu.register(Register::Rdx), 0);
}

#[test]
fn unhandled_exit_ends_the_vm() {
    let mut h = Harness::new(vec![step(
        &[],
        VmExit::Unhandled {
            code: 0x7B,
            info1: 1,
            info2: 2,
        },
    )]);
    let end = h.run();
    assert_eq!(
        end,
        VmEnd::Unhandled {
            code: 0x7B,
            info1: 1,
            info2: 2,
            rip: START_RIP
        }
    );
    assert_eq!(end.reason(), "unhandled-exit");
}

// ---------------------------------------------------------------------------------------------
// 10. Statistics and the trap trace
// ---------------------------------------------------------------------------------------------

fn statistics_script() -> Vec<Step> {
    vec![
        cpuid(0, 0),
        out_byte(COM1, b'!'),
        cpuid(1, 0),
        step(&[], VmExit::Io(io(0x80, 1, IoDirection::In))),
        cpuid(0x4000_0000, 0),
    ]
}

#[test]
fn statistics_count_every_exit_by_reason() {
    let mut h = Harness::new(statistics_script());
    assert_eq!(h.run(), success());

    let stats = &h.vm.stats;
    assert_eq!(stats.get(Reason::Cpuid).count, 3);
    assert_eq!(stats.get(Reason::Io).count, 3, "2 + the final OUT");
    assert_eq!(stats.total_exits(), 6);
    assert_eq!(stats.get(Reason::MsrRead).count, 0);
    assert_eq!(stats.unowned_port_accesses, 1);
    // The fake clock advances by 10 per read and none of these handlers reads it: each exit
    // accounts 10 cycles in the guest (entry to exit) and 10 in the hypervisor.
    assert_eq!(stats.guest_cycles, 60);
    assert_eq!(stats.get(Reason::Cpuid).cycles, 30);
    let table = stats.table();
    assert!(table.contains("cpuid"), "{table}");
    assert!(!table.contains("msr-read"), "{table}");
    assert_eq!(h.platform.lines(), [("guest0", "!")]);
}

#[test]
fn trace_does_not_change_behaviour() {
    let mut plain = Harness::new(statistics_script());
    let plain_end = plain.run();

    let mut traced = Harness::new(statistics_script());
    traced.vm.trace = true;
    let traced_end = traced.run();

    assert_eq!(traced_end, plain_end);
    assert_eq!(traced.vm.stats, plain.vm.stats);
    assert_eq!(traced.vcpu.entries, plain.vcpu.entries);
    assert_eq!(traced.vcpu.injected, plain.vcpu.injected);
    assert_eq!(traced.platform.console, plain.platform.console);
    assert_eq!(traced.vm.stats.total_exits(), 6);
}

#[test]
fn trace_with_decoding_and_unmapped_rip_does_not_change_behaviour() {
    // Trace disassembles at RIP; with paging on and empty page tables nothing is mapped.
    let script = || {
        vec![
            cpuid(0, 0),
            rdmsr(0x1B),
            step(&[], VmExit::Halt),
            rdmsr(0xDEAD),
            step(
                &[],
                VmExit::NestedPageFault {
                    guest_physical: GuestPhysAddr(0x1_0000_0000),
                    access: MemoryAccess::default(),
                },
            ),
        ]
    };
    let mut plain = Harness::new(script());
    let plain_end = plain.run();
    let mut traced = Harness::new(script());
    traced.vm.trace = true;
    let traced_end = traced.run();

    assert!(matches!(plain_end, VmEnd::NestedPageFault { .. }));
    assert_eq!(traced_end, plain_end);
    assert_eq!(traced.vm.stats, plain.vm.stats);
    assert_eq!(traced.vcpu.entries, plain.vcpu.entries);
    assert_eq!(traced.vcpu.injected, plain.vcpu.injected);
}

// ---------------------------------------------------------------------------------------------
// 11. String and REP I/O
// ---------------------------------------------------------------------------------------------

#[test]
fn string_io_is_unsupported() {
    let outs = IoExit {
        port: COM1,
        size: 1,
        direction: IoDirection::Out,
        string: true,
        repeat: false,
    };
    let mut h = Harness::new(vec![step(&[], VmExit::Io(outs)), cpuid(0, 0)]);
    let end = h.run();
    assert_eq!(
        end,
        VmEnd::UnsupportedIo {
            io: outs,
            rip: START_RIP
        }
    );
    assert_eq!(end.reason(), "unsupported-io");
    assert_eq!(end.status(), STATUS_STOPPED);
    assert!(h.platform.console.is_empty(), "nothing was written");
    assert_eq!(h.vcpu.reg(Register::Rip), START_RIP);
}

#[test]
fn rep_io_is_unsupported() {
    let rep_in = IoExit {
        port: COM1,
        size: 1,
        direction: IoDirection::In,
        string: false,
        repeat: true,
    };
    let mut h = Harness::new(vec![step(&[], VmExit::Io(rep_in))]);
    assert_eq!(
        h.run(),
        VmEnd::UnsupportedIo {
            io: rep_in,
            rip: START_RIP
        }
    );
}

/// An MMIO device for the tests: one 32-bit register file, recording every access.
struct RecordingDevice {
    value: u64,
    writes: std::sync::Arc<std::sync::Mutex<Vec<(u64, u8, u64)>>>,
}

impl ringzero_devices::MmioDevice for RecordingDevice {
    fn name(&self) -> &'static str {
        "recording"
    }
    fn range(&self) -> (u64, u64) {
        (0xFEB0_0000, 0x1000)
    }
    fn read(&mut self, _offset: u64, _size: u8) -> u64 {
        self.value
    }
    fn write(
        &mut self,
        offset: u64,
        size: u8,
        value: u64,
        _events: &mut Vec<ringzero_devices::DeviceEvent>,
    ) {
        self.writes.lock().unwrap().push((offset, size, value));
        self.value = value;
    }
}

fn mmio_fault(address: u64, write: bool) -> VmExit {
    VmExit::NestedPageFault {
        guest_physical: GuestPhysAddr(address),
        access: MemoryAccess {
            write,
            execute: false,
            present: false,
        },
    }
}

#[test]
fn mmio_mov_forms_are_emulated_on_the_device() {
    // mov [eax], ebx; mov ecx, [eax]; movzx edx, byte [eax]; movsx esi, byte [eax];
    // mov dword [eax], 0x80 (C7 00 imm32); mov ah, [eax]
    let code = [
        0x89, 0x18, 0x8B, 0x08, 0x0F, 0xB6, 0x10, 0x0F, 0xBE, 0x30, 0xC7, 0x00, 0x80, 0x00, 0x00,
        0x00, 0x8A, 0x20,
    ];
    let address = 0xFEB0_0080;
    let mut h = Harness::new(vec![
        step(
            &[(Register::Rax, address), (Register::Rbx, 0xFFFF_FFF5)],
            mmio_fault(address, true),
        ),
        step(&[(Register::Rcx, u64::MAX)], mmio_fault(address, false)),
        step(&[(Register::Rdx, u64::MAX)], mmio_fault(address, false)),
        step(&[], mmio_fault(address, false)),
        step(&[], mmio_fault(address, true)),
        step(&[], mmio_fault(address, false)),
    ]);
    let writes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    h.vm.mmio
        .add(Box::new(RecordingDevice {
            value: 0,
            writes: writes.clone(),
        }))
        .expect("an empty bus");
    h.flat_32bit_without_next_rip(0x2000);
    h.write_ram(0x2000, &code);
    assert_eq!(h.run(), success());
    assert_eq!(
        writes.lock().unwrap()[0],
        (0x80, 4, 0xFFFF_FFF5),
        "mov [eax], ebx stores 4 bytes"
    );
    assert_eq!(
        h.vcpu.after_step(1).get(Register::Rcx),
        0xFFFF_FFF5,
        "a 32-bit load zero-extends"
    );
    assert_eq!(h.vcpu.after_step(2).get(Register::Rdx), 0xF5, "movzx");
    assert_eq!(
        h.vcpu.after_step(3).get(Register::Rsi) & 0xFFFF_FFFF,
        0xFFFF_FFF5,
        "movsx sign-extends"
    );
    assert_eq!(
        writes.lock().unwrap()[1],
        (0x80, 4, 0x80),
        "mov with an immediate"
    );
    assert_eq!(
        h.vcpu.after_step(5).get(Register::Rax) & 0xFFFF,
        (address & 0xFF) | 0x8000,
        "mov ah keeps al"
    );
    let rips: Vec<u64> = (1..=6).map(|entry| h.vcpu.rip_at_entry(entry)).collect();
    assert_eq!(
        rips,
        [0x2002, 0x2004, 0x2007, 0x200A, 0x2010, 0x2012],
        "RIP after each instruction"
    );
}

#[test]
fn mmio_access_by_other_instructions_stops_the_vm_with_a_report() {
    // add [eax], ebx
    let mut h = Harness::new(vec![step(
        &[(Register::Rax, 0xFEB0_0080)],
        mmio_fault(0xFEB0_0080, true),
    )]);
    let writes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    h.vm.mmio
        .add(Box::new(RecordingDevice { value: 0, writes }))
        .expect("an empty bus");
    h.flat_32bit_without_next_rip(0x2000);
    h.write_ram(0x2000, &[0x01, 0x18]);
    assert_eq!(
        h.run(),
        VmEnd::UnsupportedMmio {
            address: 0xFEB0_0080,
            rip: 0x2000
        }
    );
}

/// A PCI function with one BAR at 0xFEB1_0000 (4 KiB) whose offset 0x10 is a queue notify
/// register; it counts the queues it ran.
struct NotifyFunction {
    processed: std::sync::Arc<std::sync::Mutex<Vec<u16>>>,
}

impl ringzero_devices::PciDevice for NotifyFunction {
    fn name(&self) -> &'static str {
        "notify"
    }
    fn read_config(&mut self, _offset: u16) -> u32 {
        u32::MAX
    }
    fn write_config(&mut self, _offset: u16, _value: u32, _byte_mask: u32) {}
}

impl ringzero_vmm::pci::BarFunction for NotifyFunction {
    fn bar_containing(&self, gpa: u64) -> Option<(usize, u64)> {
        (0xFEB1_0000..0xFEB1_1000)
            .contains(&gpa)
            .then(|| (0, gpa - 0xFEB1_0000))
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, _size: u8) -> u64 {
        0
    }
    fn bar_write(&mut self, _bar: usize, offset: u64, _size: u8, value: u64) -> Option<u16> {
        (offset == 0x10).then_some(value as u16)
    }
    fn process(&mut self, queue: u16, _memory: &mut dyn ringzero_virtio::GuestMemory) -> usize {
        self.processed.lock().unwrap().push(queue);
        1
    }
    fn take_window_notifications(&mut self) -> u64 {
        0
    }
    fn interrupt_line(&self) -> bool {
        false
    }
    fn statistics(&self) -> String {
        String::new()
    }
    fn as_model_mut(&mut self) -> &mut dyn core::any::Any {
        self
    }
}

#[test]
fn a_queue_notification_is_reported_to_the_platform_after_its_exit() {
    // mov [eax], ebx: a store to the notify register (queue 1), then a store elsewhere in the
    // BAR (not a notification).
    let code = [0x89, 0x18, 0x89, 0x18];
    let notify = 0xFEB1_0010;
    let mut h = Harness::new(vec![
        step(
            &[(Register::Rax, notify), (Register::Rbx, 1)],
            mmio_fault(notify, true),
        ),
        step(&[(Register::Rax, notify + 8)], mmio_fault(notify + 8, true)),
    ]);
    let processed = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let function: Box<dyn ringzero_vmm::pci::BarFunction> = Box::new(NotifyFunction {
        processed: processed.clone(),
    });
    h.vm.pci.push(ringzero_vmm::pci::PciSlot {
        device: 3,
        gsi: 16,
        function: std::sync::Arc::new(spin::Mutex::new(function)),
    });
    h.flat_32bit_without_next_rip(0x2000);
    h.write_ram(0x2000, &code);
    assert_eq!(h.run(), success());
    assert_eq!(*processed.lock().unwrap(), [1], "the notified queue ran");
    assert_eq!(
        h.platform.handled[..2],
        [true, false],
        "the platform hears of the notification right after its exit, and only then"
    );
}
