//! Why a guest stopped running, in vendor-free words. The backends decode their exit codes
//! (VMCB EXITCODE, VMCS exit reason) into [`VmExit`].

use ringzero_memory::GuestPhysAddr;

/// Direction of a port access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoDirection {
    In,
    Out,
}

/// An intercepted IN/OUT (or INS/OUTS) instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoExit {
    pub port: u16,
    /// 1, 2 or 4 bytes.
    pub size: u8,
    pub direction: IoDirection,
    /// INS/OUTS.
    pub string: bool,
    /// REP prefix.
    pub repeat: bool,
}

/// How the guest touched memory when a nested page fault happened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryAccess {
    pub write: bool,
    pub execute: bool,
    /// The translation existed but did not allow the access.
    pub present: bool,
}

impl MemoryAccess {
    /// "read", "write" or "execute".
    pub fn kind(&self) -> &'static str {
        if self.execute {
            "execute"
        } else if self.write {
            "write"
        } else {
            "read"
        }
    }
}

/// An intercepted control-register access (shadow paging intercepts CR0, CR3, CR4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlRegisterAccess {
    /// MOV to CRn from a general-purpose register (`None`: the core decodes the instruction).
    Write {
        register: u8,
        source: Option<crate::vcpu::Register>,
    },
    /// MOV from CRn to a general-purpose register (`None`: the core decodes the instruction).
    Read {
        register: u8,
        destination: Option<crate::vcpu::Register>,
    },
    /// CLTS (clears CR0.TS).
    Clts,
    /// LMSW (loads CR0 bits 3:0; `None`: the core decodes the instruction).
    Lmsw { value: Option<u16> },
}

/// One exit from the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// CPUID; leaf in EAX, subleaf in ECX.
    Cpuid,
    /// Port I/O.
    Io(IoExit),
    /// RDMSR; MSR number in ECX.
    MsrRead,
    /// WRMSR; MSR number in ECX, value in EDX:EAX.
    MsrWrite,
    /// HLT.
    Halt,
    /// VMMCALL / VMCALL.
    Hypercall,
    /// XSETBV; XCR number in ECX, value in EDX:EAX.
    Xsetbv,
    /// A guest-physical access the nested page tables do not allow.
    NestedPageFault {
        guest_physical: GuestPhysAddr,
        access: MemoryAccess,
    },
    /// The nested page tables themselves are malformed (VMX: EPT misconfiguration). A
    /// hypervisor bug, never the guest's doing.
    NestedPagingMisconfiguration { guest_physical: GuestPhysAddr },
    /// A control-register access (intercepted under shadow paging).
    ControlRegister(ControlRegisterAccess),
    /// INVLPG of a guest-virtual address (`None`: the core decodes the instruction).
    Invlpg { address: Option<u64> },
    /// A page fault raised while the guest ran on shadow page tables: CR2 and the error code.
    PageFault { address: u64, error_code: u32 },
    /// The guest triple-faulted (SVM: SHUTDOWN intercept; VMX: triple-fault exit).
    TripleFault,
    /// The guest executed a virtualization instruction (VMRUN, VMLAUNCH, ...): it gets #UD.
    VirtualizationInstruction { mnemonic: &'static str },
    /// A physical interrupt or NMI arrived while the guest ran (nothing to do for the guest;
    /// the host takes the interrupt after the exit).
    ExternalInterrupt,
    /// The guest can now take an interrupt (requested with `Vcpu::request_interrupt_window`).
    InterruptWindow,
    /// The hardware preemption timer expired (`Vcpu::set_preemption_timer`): the slice is over.
    PreemptionTimer,
    /// The hardware refused to enter the guest; `reason` says why in the vendor's words.
    EntryFailed { reason: &'static str, detail: u64 },
    /// An exit this hypervisor does not handle.
    Unhandled { code: u64, info1: u64, info2: u64 },
}

impl VmExit {
    /// The statistics/trace name of this exit's reason.
    pub fn reason(&self) -> Reason {
        match self {
            VmExit::Cpuid => Reason::Cpuid,
            VmExit::Io(_) => Reason::Io,
            VmExit::MsrRead => Reason::MsrRead,
            VmExit::MsrWrite => Reason::MsrWrite,
            VmExit::Halt => Reason::Halt,
            VmExit::Hypercall => Reason::Hypercall,
            VmExit::Xsetbv => Reason::Xsetbv,
            VmExit::NestedPageFault { .. } | VmExit::NestedPagingMisconfiguration { .. } => {
                Reason::NestedPageFault
            }
            VmExit::ControlRegister(_) => Reason::ControlRegister,
            VmExit::Invlpg { .. } => Reason::Invlpg,
            VmExit::PageFault { .. } => Reason::PageFault,
            VmExit::TripleFault => Reason::TripleFault,
            VmExit::VirtualizationInstruction { .. } => Reason::VirtualizationInstruction,
            VmExit::ExternalInterrupt => Reason::ExternalInterrupt,
            VmExit::InterruptWindow => Reason::InterruptWindow,
            VmExit::PreemptionTimer => Reason::PreemptionTimer,
            VmExit::EntryFailed { .. } => Reason::EntryFailed,
            VmExit::Unhandled { .. } => Reason::Unhandled,
        }
    }
}

/// Exit reasons as counted in the statistics, in table order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    Cpuid,
    Io,
    MsrRead,
    MsrWrite,
    Halt,
    Hypercall,
    Xsetbv,
    NestedPageFault,
    ControlRegister,
    Invlpg,
    PageFault,
    TripleFault,
    VirtualizationInstruction,
    ExternalInterrupt,
    InterruptWindow,
    PreemptionTimer,
    EntryFailed,
    Unhandled,
}

impl Reason {
    pub const ALL: [Reason; 18] = [
        Reason::Cpuid,
        Reason::Io,
        Reason::MsrRead,
        Reason::MsrWrite,
        Reason::Halt,
        Reason::Hypercall,
        Reason::Xsetbv,
        Reason::NestedPageFault,
        Reason::ControlRegister,
        Reason::Invlpg,
        Reason::PageFault,
        Reason::TripleFault,
        Reason::VirtualizationInstruction,
        Reason::ExternalInterrupt,
        Reason::InterruptWindow,
        Reason::PreemptionTimer,
        Reason::EntryFailed,
        Reason::Unhandled,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Reason::Cpuid => "cpuid",
            Reason::Io => "io",
            Reason::MsrRead => "msr-read",
            Reason::MsrWrite => "msr-write",
            Reason::Halt => "hlt",
            Reason::Hypercall => "hypercall",
            Reason::Xsetbv => "xsetbv",
            Reason::NestedPageFault => "nested-page-fault",
            Reason::ControlRegister => "cr-access",
            Reason::Invlpg => "invlpg",
            Reason::PageFault => "page-fault",
            Reason::TripleFault => "triple-fault",
            Reason::VirtualizationInstruction => "virt-instruction",
            Reason::ExternalInterrupt => "interrupt",
            Reason::InterruptWindow => "interrupt-window",
            Reason::PreemptionTimer => "preemption-timer",
            Reason::EntryFailed => "entry-failed",
            Reason::Unhandled => "unhandled",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// Exits the host causes, not the guest's instructions: host interrupts (the scheduler's
    /// tick, kicks), the interrupt window it asked for, the end of a time slice.
    pub fn made_by_the_host(self) -> bool {
        matches!(
            self,
            Reason::ExternalInterrupt | Reason::InterruptWindow | Reason::PreemptionTimer
        )
    }
}
