//! VM exits and VM-entry failures decoded into vendor-neutral words.
//! See: SDM Vol 3D Appendix C "VMX Basic Exit Reasons", Vol 3C 28.2.1 (exit qualifications,
//! Tables 28-5 I/O and 28-7 EPT violation), 31.4 "VM Instruction Error Numbers", 27.8
//! "VM-entry failures during or after loading guest state".

use ringzero_memory::GuestPhysAddr;
use ringzero_vmm::exit::{ControlRegisterAccess, IoDirection, IoExit, MemoryAccess, VmExit};
use ringzero_vmm::vcpu::Register;

/// Basic exit reasons ringzero handles. See: SDM Vol 3D Table C-1.
pub mod reason {
    pub const EXCEPTION_OR_NMI: u32 = 0;
    pub const EXTERNAL_INTERRUPT: u32 = 1;
    pub const TRIPLE_FAULT: u32 = 2;
    pub const INTERRUPT_WINDOW: u32 = 7;
    pub const CPUID: u32 = 10;
    pub const HLT: u32 = 12;
    pub const INVLPG: u32 = 14;
    pub const CR_ACCESS: u32 = 28;
    pub const VMCALL: u32 = 18;
    pub const VMCLEAR: u32 = 19;
    pub const VMLAUNCH: u32 = 20;
    pub const VMPTRLD: u32 = 21;
    pub const VMPTRST: u32 = 22;
    pub const VMREAD: u32 = 23;
    pub const VMRESUME: u32 = 24;
    pub const VMWRITE: u32 = 25;
    pub const VMXOFF: u32 = 26;
    pub const VMXON: u32 = 27;
    pub const IO_INSTRUCTION: u32 = 30;
    pub const RDMSR: u32 = 31;
    pub const WRMSR: u32 = 32;
    pub const INVALID_GUEST_STATE: u32 = 33;
    pub const MSR_LOADING: u32 = 34;
    pub const MACHINE_CHECK_DURING_ENTRY: u32 = 41;
    pub const EPT_VIOLATION: u32 = 48;
    pub const EPT_MISCONFIGURATION: u32 = 49;
    pub const INVEPT: u32 = 50;
    pub const PREEMPTION_TIMER: u32 = 52;
    pub const INVVPID: u32 = 53;
    /// XSETBV exits unconditionally in VMX non-root operation. See: SDM Vol 3C 26.1.2.
    pub const XSETBV: u32 = 55;
}

/// Bit 31 of the exit reason: the VM entry failed. See: SDM Vol 3C 28.2.1, Table 28-1... (25.9.1).
pub const ENTRY_FAILURE: u32 = 1 << 31;

/// Decodes one exit from the exit reason, exit qualification and guest-physical address.
pub fn decode(exit_reason: u32, qualification: u64, guest_physical: u64) -> VmExit {
    let basic = exit_reason & 0xFFFF;
    if exit_reason & ENTRY_FAILURE != 0 {
        return VmExit::EntryFailed {
            reason: entry_failure_meaning(basic),
            detail: qualification,
        };
    }
    let virtualization = |mnemonic| VmExit::VirtualizationInstruction { mnemonic };
    match basic {
        reason::CPUID => VmExit::Cpuid,
        // Qualification: bits 3:0 CR number, 5:4 access type (0 MOV to CR, 1 MOV from CR,
        // 2 CLTS, 3 LMSW), 11:8 the GPR, 31:16 LMSW's source. See: SDM Vol 3C Table 28-3.
        reason::CR_ACCESS => {
            let register = (qualification & 0xF) as u8;
            let gpr = Register::from_number(((qualification >> 8) & 0xF) as u8);
            VmExit::ControlRegister(match (qualification >> 4) & 3 {
                0 => ControlRegisterAccess::Write {
                    register,
                    source: gpr,
                },
                1 => ControlRegisterAccess::Read {
                    register,
                    destination: gpr,
                },
                2 => ControlRegisterAccess::Clts,
                _ => ControlRegisterAccess::Lmsw {
                    value: Some((qualification >> 16) as u16),
                },
            })
        }
        // Qualification: the linear address. See: SDM Vol 3C Table 28-1... 28.2.1.
        reason::INVLPG => VmExit::Invlpg {
            address: Some(qualification),
        },
        reason::HLT => VmExit::Halt,
        reason::VMCALL => VmExit::Hypercall,
        reason::XSETBV => VmExit::Xsetbv,
        reason::TRIPLE_FAULT => VmExit::TripleFault,
        reason::EXTERNAL_INTERRUPT => VmExit::ExternalInterrupt,
        // Interrupt-window exiting: the guest can take an interrupt now. See: SDM Vol 3C 26.7.5.
        reason::INTERRUPT_WINDOW => VmExit::InterruptWindow,
        // The VMX-preemption timer counted down to 0. See: SDM Vol 3C 26.5.1.
        reason::PREEMPTION_TIMER => VmExit::PreemptionTimer,
        reason::RDMSR => VmExit::MsrRead,
        reason::WRMSR => VmExit::MsrWrite,
        reason::IO_INSTRUCTION => {
            // Qualification: bits 2:0 size - 1, bit 3 direction (1 = IN), bit 4 string, bit 5
            // REP, bits 31:16 port. See: SDM Vol 3C Table 28-5.
            let size = match qualification & 0x7 {
                0 => 1,
                1 => 2,
                _ => 4,
            };
            VmExit::Io(IoExit {
                port: (qualification >> 16) as u16,
                size,
                direction: if qualification & (1 << 3) != 0 {
                    IoDirection::In
                } else {
                    IoDirection::Out
                },
                string: qualification & (1 << 4) != 0,
                repeat: qualification & (1 << 5) != 0,
            })
        }
        reason::EPT_VIOLATION => {
            // Qualification: bit 0 read, 1 write, 2 instruction fetch; bits 5:3 whether the
            // translation allowed read/write/execute. See: SDM Vol 3C Table 28-7.
            let access = MemoryAccess {
                write: qualification & (1 << 1) != 0,
                execute: qualification & (1 << 2) != 0,
                present: qualification & (0x7 << 3) != 0,
            };
            VmExit::NestedPageFault {
                guest_physical: GuestPhysAddr(guest_physical),
                access,
            }
        }
        reason::EPT_MISCONFIGURATION => VmExit::NestedPagingMisconfiguration {
            guest_physical: GuestPhysAddr(guest_physical),
        },
        reason::VMCLEAR => virtualization("vmclear"),
        reason::VMLAUNCH => virtualization("vmlaunch"),
        reason::VMPTRLD => virtualization("vmptrld"),
        reason::VMPTRST => virtualization("vmptrst"),
        reason::VMREAD => virtualization("vmread"),
        reason::VMRESUME => virtualization("vmresume"),
        reason::VMWRITE => virtualization("vmwrite"),
        reason::VMXOFF => virtualization("vmxoff"),
        reason::VMXON => virtualization("vmxon"),
        reason::INVEPT => virtualization("invept"),
        reason::INVVPID => virtualization("invvpid"),
        other => VmExit::Unhandled {
            code: u64::from(other),
            info1: qualification,
            info2: guest_physical,
        },
    }
}

/// What an entry-failure exit reason means. See: SDM Vol 3C 27.8.
pub fn entry_failure_meaning(basic_reason: u32) -> &'static str {
    match basic_reason {
        reason::INVALID_GUEST_STATE => {
            "VM entry failed: invalid guest state (exit reason 33, SDM Vol 3C 27.3.1)"
        }
        reason::MSR_LOADING => "VM entry failed: MSR loading (exit reason 34, SDM Vol 3C 27.4)",
        reason::MACHINE_CHECK_DURING_ENTRY => {
            "VM entry failed: machine-check event (exit reason 41)"
        }
        _ => "VM entry failed with an unexpected exit reason",
    }
}

/// The meaning of a VM-instruction error number (VMfailValid). See: SDM Vol 3C 31.4, Table 31-1.
pub fn instruction_error_meaning(number: u64) -> &'static str {
    match number {
        1 => "VMCALL executed in VMX root operation",
        2 => "VMCLEAR with invalid physical address",
        3 => "VMCLEAR with VMXON pointer",
        4 => "VMLAUNCH with non-clear VMCS",
        5 => "VMRESUME with non-launched VMCS",
        6 => "VMRESUME after VMXOFF",
        7 => "VM entry with invalid control field(s)",
        8 => "VM entry with invalid host-state field(s)",
        9 => "VMPTRLD with invalid physical address",
        10 => "VMPTRLD with VMXON pointer",
        11 => "VMPTRLD with incorrect VMCS revision identifier",
        12 => "VMREAD/VMWRITE from/to unsupported VMCS component",
        13 => "VMWRITE to read-only VMCS component",
        15 => "VMXON executed in VMX root operation",
        16 => "VM entry with invalid executive-VMCS pointer",
        17 => "VM entry with non-launched executive VMCS",
        18 => "VM entry with executive-VMCS pointer not VMXON pointer",
        19 => "VMCALL with non-clear VMCS",
        20 => "VMCALL with invalid VM-exit control fields",
        22 => "VMCALL with incorrect MSEG revision identifier",
        23 => "VMXOFF under dual-monitor treatment of SMIs and SMM",
        24 => "VMCALL with invalid SMM-monitor features",
        25 => "VM entry with invalid VM-execution control fields in executive VMCS",
        26 => "VM entry with events blocked by MOV SS",
        28 => "invalid operand to INVEPT/INVVPID",
        _ => "unknown VM-instruction error number",
    }
}

/// The guest state as the VMCS holds it, for the software checks below.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestStateFields {
    pub cr0: u64,
    pub cr4: u64,
    pub efer: u64,
    pub rflags: u64,
    pub cs_access_rights: u32,
    pub tr_access_rights: u32,
    pub ss_access_rights: u32,
    pub ia32e_mode_guest: bool,
    pub unrestricted_guest: bool,
    pub cr0_fixed0: u64,
    pub cr0_fixed1: u64,
    pub cr4_fixed0: u64,
    pub cr4_fixed1: u64,
    pub activity_state: u32,
    pub link_pointer: u64,
    pub cs_limit: u32,
    pub tr_limit: u32,
    pub ldtr_access_rights: u32,
    pub interruptibility: u32,
    /// The VM-entry interruption-information field (the event to inject, bit 31 valid).
    pub entry_interruption_info: u32,
}

/// Whether a segment's limit and G bit (access rights bit 15) agree: limit bits 11:0 all ones
/// when G = 1, limit bits 31:20 all zeros when G = 0. See: SDM Vol 3C 27.3.1.2.
fn granularity_agrees(limit: u32, access_rights: u32) -> bool {
    let granular = access_rights & (1 << 15) != 0;
    if granular {
        limit & 0xFFF == 0xFFF
    } else {
        limit >> 20 == 0
    }
}

/// Finds the first guest-state rule the fields break, naming the VMCS field and the SDM
/// section, for the entry-failure report. The hardware only says "invalid guest state";
/// these checks name the offending field for the common mistakes. `None` when they find
/// nothing (the failure is one this list does not cover).
pub fn diagnose_guest_state(fields: &GuestStateFields) -> Option<&'static str> {
    let unusable = 1 << 16;
    let mut cr0_must_be_one = fields.cr0_fixed0;
    if fields.unrestricted_guest {
        // PE and PG may be 0 with unrestricted guest. See: SDM Vol 3C 27.3.1.1.
        cr0_must_be_one &= !((1 << 0) | (1 << 31));
    }
    if fields.cr0 & cr0_must_be_one != cr0_must_be_one || fields.cr0 & !fields.cr0_fixed1 != 0 {
        return Some("GUEST_CR0: violates IA32_VMX_CR0_FIXED0/FIXED1 (SDM Vol 3C 27.3.1.1)");
    }
    if fields.cr4 & fields.cr4_fixed0 != fields.cr4_fixed0 || fields.cr4 & !fields.cr4_fixed1 != 0 {
        return Some("GUEST_CR4: violates IA32_VMX_CR4_FIXED0/FIXED1 (SDM Vol 3C 27.3.1.1)");
    }
    let efer_lma = fields.efer & (1 << 10) != 0;
    if efer_lma != fields.ia32e_mode_guest {
        return Some("GUEST_IA32_EFER: LMA must equal the 'IA-32e mode guest' entry control (SDM Vol 3C 27.3.1.1)");
    }
    if fields.rflags & (1 << 1) == 0 || fields.rflags >> 22 != 0 {
        return Some(
            "GUEST_RFLAGS: bit 1 must be 1 and bits 63:22 must be 0 (SDM Vol 3C 27.3.1.4)",
        );
    }
    if fields.tr_access_rights & unusable != 0 {
        return Some("GUEST_TR_ACCESS_RIGHTS: TR must be usable (SDM Vol 3C 27.3.1.2)");
    }
    let tr_type = fields.tr_access_rights & 0xF;
    if tr_type != 11 && !(tr_type == 3 && !fields.ia32e_mode_guest) {
        return Some("GUEST_TR_ACCESS_RIGHTS: TR must be a busy TSS (type 11, or 3 outside IA-32e mode) (SDM Vol 3C 27.3.1.2)");
    }
    if fields.cs_access_rights & unusable != 0 || fields.cs_access_rights & (1 << 7) == 0 {
        return Some("GUEST_CS_ACCESS_RIGHTS: CS must be usable and present (SDM Vol 3C 27.3.1.2)");
    }
    if fields.ia32e_mode_guest
        && fields.cs_access_rights & (1 << 13) != 0
        && fields.cs_access_rights & (1 << 14) != 0
    {
        return Some("GUEST_CS_ACCESS_RIGHTS: L and D/B must not both be set in IA-32e mode (SDM Vol 3C 27.3.1.2)");
    }
    if !granularity_agrees(fields.cs_limit, fields.cs_access_rights) {
        return Some("GUEST_CS_LIMIT: the limit and the G bit disagree (SDM Vol 3C 27.3.1.2)");
    }
    let cs_type = fields.cs_access_rights & 0xF;
    let cs_type_allowed =
        matches!(cs_type, 9 | 11 | 13 | 15) || (cs_type == 3 && fields.unrestricted_guest);
    if !cs_type_allowed {
        return Some("GUEST_CS_ACCESS_RIGHTS: CS must be an accessed code segment (type 9, 11, 13, 15; 3 with unrestricted guest) (SDM Vol 3C 27.3.1.2)");
    }
    if !granularity_agrees(fields.tr_limit, fields.tr_access_rights) {
        return Some("GUEST_TR_LIMIT: the limit and the G bit disagree (SDM Vol 3C 27.3.1.2)");
    }
    let ldtr = fields.ldtr_access_rights;
    if ldtr & unusable == 0 && (ldtr & 0xF != 2 || ldtr & (1 << 4) != 0 || ldtr & (1 << 7) == 0) {
        return Some("GUEST_LDTR_ACCESS_RIGHTS: a usable LDTR must be a present LDT descriptor (type 2, S = 0) (SDM Vol 3C 27.3.1.2)");
    }
    let interrupts_enabled = fields.rflags & (1 << 9) != 0;
    if fields.interruptibility & 1 != 0 && !interrupts_enabled {
        return Some("GUEST_INTERRUPTIBILITY_STATE: blocking by STI needs RFLAGS.IF = 1 (SDM Vol 3C 27.3.1.5)");
    }
    let injecting = fields.entry_interruption_info & (1 << 31) != 0;
    let external_interrupt = (fields.entry_interruption_info >> 8) & 7 == 0;
    if injecting && external_interrupt && !interrupts_enabled {
        return Some("GUEST_RFLAGS: injecting an external interrupt needs RFLAGS.IF = 1 (SDM Vol 3C 27.3.1.4)");
    }
    if injecting && external_interrupt && fields.interruptibility & 3 != 0 {
        return Some("GUEST_INTERRUPTIBILITY_STATE: no STI / MOV SS blocking while injecting an external interrupt (SDM Vol 3C 27.3.1.5)");
    }
    if fields.activity_state > 3 {
        return Some("GUEST_ACTIVITY_STATE: not a valid activity state (SDM Vol 3C 27.3.1.5)");
    }
    if fields.link_pointer != u64::MAX {
        return Some(
            "VMCS_LINK_POINTER: must be all-ones without VMCS shadowing (SDM Vol 3C 27.3.1.5)",
        );
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_and_ept_exits() {
        // OUT DX, AL to 0x3F8: size 1, direction out.
        assert_eq!(
            decode(reason::IO_INSTRUCTION, 0x3F8 << 16, 0),
            VmExit::Io(IoExit {
                port: 0x3F8,
                size: 1,
                direction: IoDirection::Out,
                string: false,
                repeat: false
            })
        );
        // IN EAX, DX from 0xCFC.
        assert_eq!(
            decode(reason::IO_INSTRUCTION, (0xCFC << 16) | (1 << 3) | 3, 0),
            VmExit::Io(IoExit {
                port: 0xCFC,
                size: 4,
                direction: IoDirection::In,
                string: false,
                repeat: false
            })
        );
        assert_eq!(
            decode(reason::EPT_VIOLATION, 0b010, 0x200_0000),
            VmExit::NestedPageFault {
                guest_physical: GuestPhysAddr(0x200_0000),
                access: MemoryAccess {
                    write: true,
                    execute: false,
                    present: false
                }
            }
        );
        assert_eq!(
            decode(reason::EPT_MISCONFIGURATION, 0, 0x1000),
            VmExit::NestedPagingMisconfiguration {
                guest_physical: GuestPhysAddr(0x1000)
            }
        );
    }

    #[test]
    fn shadow_paging_exits() {
        // MOV CR3, RCX: CR 3, type 0, GPR 1.
        assert_eq!(
            decode(reason::CR_ACCESS, 3 | (1 << 8), 0),
            VmExit::ControlRegister(ControlRegisterAccess::Write {
                register: 3,
                source: Some(Register::Rcx)
            })
        );
        // MOV RAX, CR0.
        assert_eq!(
            decode(reason::CR_ACCESS, 1 << 4, 0),
            VmExit::ControlRegister(ControlRegisterAccess::Read {
                register: 0,
                destination: Some(Register::Rax)
            })
        );
        assert_eq!(
            decode(reason::CR_ACCESS, 2 << 4, 0),
            VmExit::ControlRegister(ControlRegisterAccess::Clts)
        );
        assert_eq!(
            decode(reason::INVLPG, 0x7000, 0),
            VmExit::Invlpg {
                address: Some(0x7000)
            }
        );
    }

    #[test]
    fn simple_exits_and_failures() {
        assert_eq!(decode(reason::CPUID, 0, 0), VmExit::Cpuid);
        assert_eq!(decode(reason::XSETBV, 0, 0), VmExit::Xsetbv);
        assert_eq!(decode(reason::TRIPLE_FAULT, 0, 0), VmExit::TripleFault);
        assert_eq!(
            decode(reason::EXTERNAL_INTERRUPT, 0, 0),
            VmExit::ExternalInterrupt
        );
        assert_eq!(
            decode(reason::INTERRUPT_WINDOW, 0, 0),
            VmExit::InterruptWindow
        );
        assert_eq!(
            decode(reason::PREEMPTION_TIMER, 0, 0),
            VmExit::PreemptionTimer
        );
        assert_eq!(
            decode(reason::VMLAUNCH, 0, 0),
            VmExit::VirtualizationInstruction {
                mnemonic: "vmlaunch"
            }
        );
        assert!(matches!(
            decode(ENTRY_FAILURE | reason::INVALID_GUEST_STATE, 0, 0),
            VmExit::EntryFailed { reason, .. } if reason.contains("invalid guest state")
        ));
        assert_eq!(
            instruction_error_meaning(7),
            "VM entry with invalid control field(s)"
        );
        assert_eq!(
            instruction_error_meaning(99),
            "unknown VM-instruction error number"
        );
    }

    fn valid_64_bit() -> GuestStateFields {
        GuestStateFields {
            cr0: 0x8005_0033,
            cr4: 0x2020,
            efer: 0xD00,
            rflags: 0x2,
            cs_access_rights: 0xA09B,
            tr_access_rights: 0x8B,
            ss_access_rights: 0xC093,
            ia32e_mode_guest: true,
            unrestricted_guest: true,
            cr0_fixed0: 0x8000_0021,
            cr0_fixed1: 0xFFFF_FFFF,
            cr4_fixed0: 0x2000,
            cr4_fixed1: 0x37_27FF,
            activity_state: 0,
            link_pointer: u64::MAX,
            cs_limit: 0xFFFF_FFFF,
            tr_limit: 0xFFFF,
            ldtr_access_rights: 1 << 16,
            interruptibility: 0,
            entry_interruption_info: 0,
        }
    }

    #[test]
    fn diagnoses_name_the_field() {
        assert_eq!(diagnose_guest_state(&valid_64_bit()), None);
        type Breaks = fn(&mut GuestStateFields);
        let cases: [(Breaks, &str); 12] = [
            (|fields| fields.cs_limit = 0xFFFF_0000, "GUEST_CS_LIMIT"),
            (
                |fields| fields.cs_access_rights = 0xA091,
                "GUEST_CS_ACCESS_RIGHTS",
            ),
            (|fields| fields.tr_limit = 0x10_0000, "GUEST_TR_LIMIT"),
            (
                |fields| fields.ldtr_access_rights = 0x83,
                "GUEST_LDTR_ACCESS_RIGHTS",
            ),
            (
                |fields| fields.interruptibility = 1,
                "GUEST_INTERRUPTIBILITY_STATE",
            ),
            (
                |fields| fields.entry_interruption_info = (1 << 31) | 0x20,
                "GUEST_RFLAGS",
            ),
            (
                |fields| fields.tr_access_rights |= 1 << 16,
                "GUEST_TR_ACCESS_RIGHTS",
            ),
            (|fields| fields.cr4 &= !0x2000, "GUEST_CR4"),
            (|fields| fields.cr0 &= !0x20, "GUEST_CR0"),
            (|fields| fields.rflags = 0, "GUEST_RFLAGS"),
            (|fields| fields.ia32e_mode_guest = false, "GUEST_IA32_EFER"),
            (|fields| fields.link_pointer = 0, "VMCS_LINK_POINTER"),
        ];
        for (breaks, field) in cases {
            let mut fields = valid_64_bit();
            breaks(&mut fields);
            assert!(
                diagnose_guest_state(&fields).unwrap().starts_with(field),
                "{field}"
            );
        }
        // Paging off is fine with unrestricted guest (Multiboot entry).
        let mut protected = valid_64_bit();
        protected.cr0 = 0x31;
        protected.efer = 0;
        protected.ia32e_mode_guest = false;
        protected.cs_access_rights = 0xC09B;
        assert_eq!(diagnose_guest_state(&protected), None);
        // An external interrupt injected into a guest that can take it; and one that cannot
        // because of a MOV SS shadow.
        let mut injecting = valid_64_bit();
        injecting.rflags = 0x202;
        injecting.entry_interruption_info = (1 << 31) | 0x20;
        assert_eq!(diagnose_guest_state(&injecting), None);
        injecting.interruptibility = 2;
        assert!(diagnose_guest_state(&injecting)
            .unwrap()
            .starts_with("GUEST_INTERRUPTIBILITY_STATE"));
    }
}
