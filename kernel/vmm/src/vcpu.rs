//! The vCPU as the core sees it: one trait, implemented by `arch/svm` (VMCB) and `arch/vmx`
//! (VMCS) with the same method names.

use crate::exit::VmExit;
use ringzero_memory::shadow::{GuestPagingState, RealPaging};
use ringzero_memory::HostPhysAddr;

/// General-purpose and control registers the core reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Register {
    Rax,
    Rbx,
    Rcx,
    Rdx,
    Rsi,
    Rdi,
    Rbp,
    Rsp,
    R8,
    R9,
    R10,
    R11,
    R12,
    R13,
    R14,
    R15,
    Rip,
    Rflags,
}

/// The guest state the core needs to understand an exit (decode, trace, policy).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestSnapshot {
    pub rip: u64,
    pub rsp: u64,
    pub rflags: u64,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub cs_base: u64,
    /// CS.L with EFER.LMA: 64-bit code.
    pub cs_long_mode: bool,
    /// CS.D: 32-bit default operand size (outside 64-bit mode).
    pub cs_default_32: bool,
    /// Current privilege level (0 = guest kernel, 3 = guest user).
    pub cpl: u8,
}

impl Register {
    /// The register of x86's general-purpose register number (0 = RAX, 1 = RCX, 2 = RDX,
    /// 3 = RBX, 4 = RSP, 5 = RBP, 6 = RSI, 7 = RDI, 8-15 = R8-R15), as VMX exit
    /// qualifications and SVM decode assists give it. See: SDM Vol 3C Table 28-3.
    pub fn from_number(number: u8) -> Option<Register> {
        Some(match number {
            0 => Register::Rax,
            1 => Register::Rcx,
            2 => Register::Rdx,
            3 => Register::Rbx,
            4 => Register::Rsp,
            5 => Register::Rbp,
            6 => Register::Rsi,
            7 => Register::Rdi,
            8 => Register::R8,
            9 => Register::R9,
            10 => Register::R10,
            11 => Register::R11,
            12 => Register::R12,
            13 => Register::R13,
            14 => Register::R14,
            15 => Register::R15,
            _ => return None,
        })
    }
}

impl GuestSnapshot {
    /// RFLAGS.IF.
    pub fn interrupts_enabled(&self) -> bool {
        self.rflags & (1 << 9) != 0
    }

    /// 16, 32 or 64: how the instruction at RIP is decoded.
    pub fn code_bitness(&self) -> u32 {
        if self.cs_long_mode {
            64
        } else if self.cs_default_32 {
            32
        } else {
            16
        }
    }
}

/// What a failure report shows beyond [`GuestSnapshot`]: where the guest's descriptor tables
/// are, and the events around the last entry (a triple fault at entry is an event the guest
/// could not deliver: these say which, and through which tables).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultContext {
    pub idtr_base: u64,
    pub idtr_limit: u32,
    pub gdtr_base: u64,
    pub gdtr_limit: u32,
    pub tr_base: u64,
    pub tr_limit: u32,
    /// The event the last entry delivered, in the vendor's raw encoding (SVM EVENTINJ, VMX
    /// VM-entry interruption information; bits 7:0 the vector, bit 31 valid in both).
    pub entry_event: u64,
    /// The event whose delivery the last exit interrupted (SVM EXITINTINFO, VMX IDT-vectoring
    /// information; same layout).
    pub exit_event: u64,
    /// The nested page table root the hardware uses (SVM N_CR3, VMX EPTP with its low control
    /// bits cleared); 0 under shadow paging.
    pub nested_root: u64,
    /// The guest's CR2: the linear address of its last page fault (after a triple fault, the
    /// one whose delivery failed last).
    pub cr2: u64,
}

/// One virtual CPU on one vendor's hardware.
pub trait Vcpu {
    /// Enters the guest and returns at the next exit.
    fn run(&mut self) -> VmExit;
    fn register(&self, register: Register) -> u64;
    fn set_register(&mut self, register: Register, value: u64);
    fn snapshot(&self) -> GuestSnapshot;
    /// The descriptor tables and events of the last entry and exit, and the guest's CR2: for
    /// failure reports, and for a MOV from CR2 that an emulator made exit.
    fn fault_context(&self) -> FaultContext;
    /// The address of the instruction after the one that exited, when the hardware told
    /// (SVM NRIP save or an I/O exit's own field; VMX's exit instruction length). `None`
    /// means the core must decode the instruction to skip it.
    fn next_rip(&self) -> Option<u64>;
    /// Injects an exception into the guest at the next entry.
    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>);
    /// Guest MSRs the hardware keeps in its own state area (EFER, PAT, STAR, ...): their value,
    /// or `None` when this MSR is not one of them.
    fn hardware_msr(&self, msr: u32) -> Option<u64>;
    /// Writes such an MSR; false when it is not one of them.
    fn set_hardware_msr(&mut self, msr: u32, value: u64) -> bool;
    /// Shadow paging only: run the guest with the `real` paging registers on the shadow tables
    /// at `root`, while it reads `visible` (MOV from CR, `snapshot`).
    fn set_shadow_paging(
        &mut self,
        visible: &GuestPagingState,
        real: &RealPaging,
        root: HostPhysAddr,
    );
    /// Shadow paging only: flush the guest's TLB before the next entry (the shadow tables lost
    /// or changed translations the TLB may still hold).
    fn flush_guest_tlb(&mut self);
    /// Injects a page fault with `error_code`, setting the guest's CR2 to `address`.
    fn inject_page_fault(&mut self, address: u64, error_code: u32);
    /// Nested paging only: loads the guest's CR3 as a MOV to CR3 would (the `SET_ADDRESS_SPACE`
    /// hypercall), flushing the guest's non-global translations.
    fn set_guest_cr3(&mut self, value: u64);

    /// The guest's XCR0 (what its XGETBV reads; [`crate::xsave::XCR0_RESET`] at first).
    fn guest_xcr0(&self) -> u64;
    /// Completes a guest XSETBV the core checked (`xsave::check_xsetbv`): the guest's XCR0
    /// becomes `value` and, while the vCPU is active, so does the real one. State components
    /// the guest enables anew start in their initial configuration.
    fn set_guest_xcr0(&mut self, value: u64);

    /// Makes this vCPU the one the hardware uses on this CPU. The scheduler calls it before
    /// `run` (and before any other method) whenever another vCPU may have run on this CPU since
    /// this one last did. VMX: VMPTRLD of its VMCS and the guest's pass-through MSRs loaded;
    /// SVM: the VMCB's clean bits cleared (another VMCB ran here).
    fn activate(&mut self);
    /// The scheduler is about to run another vCPU on this CPU: save what of this guest lives in
    /// the CPU itself (its x87/SSE/AVX registers and XCR0; VMX: the pass-through SYSCALL MSRs
    /// and KERNEL_GS_BASE).
    fn deactivate(&mut self);
    /// Whether the guest can take an external interrupt at the next entry: RFLAGS.IF set, no
    /// STI / MOV SS interrupt shadow, and no event already queued for injection.
    fn can_inject_interrupt(&self) -> bool;
    /// Delivers external interrupt `vector` at the next entry, as the local APIC would (the
    /// caller checked `can_inject_interrupt`). See: SDM Vol 3C 27.6, APM Vol 2 15.20.
    fn inject_interrupt(&mut self, vector: u8);
    /// Asks for an exit ([`VmExit::InterruptWindow`]) as soon as the guest can take an
    /// interrupt (`true`), or stops asking (`false`).
    fn request_interrupt_window(&mut self, enabled: bool);
    /// INIT followed by a startup IPI with `vector`: the vCPU starts in real mode at
    /// CS:IP = (vector << 8):0000 (CS base vector << 12), with the rest of its state as after
    /// INIT. See: SDM Vol 3A 9.1.1 Table 9-1, 10.4.4.1 (MP initialization), 11.6.1 (SIPI).
    fn start_at_startup_vector(&mut self, vector: u8);
    /// Bounds the next guest runs to about `tsc_cycles` of guest time with the hardware's own
    /// preemption timer (VMX preemption timer), or removes the bound (`None`). Returns false when
    /// there is no such timer (SVM: the scheduler relies on the host timer interrupt instead).
    fn set_preemption_timer(&mut self, tsc_cycles: Option<u64>) -> bool;
    /// Nested paging: the guest wrote `value` to CR0 (`register` 0) or CR4 (4) and the hardware
    /// exited because the write changed a bit the host owns (VMX: a bit of the guest/host mask,
    /// such as CR0.NE, which VMX requires set). Performs the write as the CPU would: the guest
    /// reads back `value`, the real register keeps the bits VMX requires, and turning paging on
    /// or off with EFER.LME set enters or leaves IA-32e mode. Returns false when the backend never
    /// asks for this (SVM does not intercept these writes under nested paging).
    fn write_guest_control_register(&mut self, register: u8, value: u64) -> bool;
}
