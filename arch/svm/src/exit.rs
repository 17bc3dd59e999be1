//! #VMEXIT decoding: EXITCODE and EXITINFO1/2 into vendor-neutral [`VmExit`]s.
//! See: APM Vol 2 Appendix C "SVM Intercept Exit Codes", 15.10.2 (IOIO EXITINFO1),
//! 15.25.6 (nested page fault EXITINFO1/2).

use ringzero_memory::GuestPhysAddr;
use ringzero_vmm::exit::{ControlRegisterAccess, IoDirection, IoExit, MemoryAccess, VmExit};
use ringzero_vmm::vcpu::Register;

/// Exit codes ringzero handles. See: APM Vol 2 Table C-1.
pub mod code {
    pub const INTR: u64 = 0x60;
    pub const NMI: u64 = 0x61;
    /// The guest can take the virtual interrupt V_IRQ asks for: the interrupt window.
    pub const VINTR: u64 = 0x64;
    pub const CPUID: u64 = 0x72;
    pub const HLT: u64 = 0x78;
    /// 0x00-0x0F: read of CR0-CR15; 0x10-0x1F: write.
    pub const CR_READ_FIRST: u64 = 0x00;
    pub const CR_WRITE_FIRST: u64 = 0x10;
    /// 0x40 + vector: an intercepted exception; 0x4E = #PF.
    pub const PAGE_FAULT: u64 = 0x4E;
    pub const INVLPG: u64 = 0x79;
    pub const INVLPGA: u64 = 0x7A;
    pub const IOIO: u64 = 0x7B;
    pub const MSR: u64 = 0x7C;
    pub const SHUTDOWN: u64 = 0x7F;
    pub const VMRUN: u64 = 0x80;
    pub const VMMCALL: u64 = 0x81;
    pub const VMLOAD: u64 = 0x82;
    pub const VMSAVE: u64 = 0x83;
    pub const STGI: u64 = 0x84;
    pub const CLGI: u64 = 0x85;
    pub const SKINIT: u64 = 0x86;
    /// XSETBV (the misc-2 intercept). See: APM Vol 2 Table C-1.
    pub const XSETBV: u64 = 0x8D;
    pub const NPF: u64 = 0x400;
    /// VMEXIT_INVALID: VMRUN's consistency checks failed (-1; QEMU's TCG stores it as a
    /// 32-bit -1, so both forms are accepted).
    pub const INVALID: u64 = u64::MAX;
    pub const INVALID_32: u64 = 0xFFFF_FFFF;
}

/// A decoded exit and, when the exit itself says, the next instruction's RIP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedExit {
    pub exit: VmExit,
    pub next_rip: Option<u64>,
}

/// Decodes one #VMEXIT from the VMCB's EXITCODE, EXITINFO1 and EXITINFO2. `decode_assists`:
/// whether the CPU fills EXITINFO1 for CR accesses and INVLPG (APM Vol 2 15.33).
pub fn decode(exit_code: u64, info1: u64, info2: u64, decode_assists: bool) -> DecodedExit {
    let plain = |exit| DecodedExit {
        exit,
        next_rip: None,
    };
    match exit_code {
        code::CPUID => plain(VmExit::Cpuid),
        // CR accesses: with decode assists EXITINFO1 bit 63 says bits 3:0 name the GPR.
        // See: APM Vol 2 15.33.1.
        0x00..=0x1F => {
            let register = (exit_code & 0xF) as u8;
            let gpr = (decode_assists && info1 & (1 << 63) != 0).then(|| Register::from_number((info1 & 0xF) as u8)).flatten();
            plain(VmExit::ControlRegister(if exit_code >= code::CR_WRITE_FIRST {
                ControlRegisterAccess::Write { register, source: gpr }
            } else {
                ControlRegisterAccess::Read { register, destination: gpr }
            }))
        }
        // #PF: EXITINFO1 = error code, EXITINFO2 = the faulting address. See: APM Vol 2 15.12.15.
        code::PAGE_FAULT => plain(VmExit::PageFault { address: info2, error_code: info1 as u32 }),
        code::INVLPG => plain(VmExit::Invlpg { address: decode_assists.then_some(info1) }),
        code::HLT => plain(VmExit::Halt),
        code::VMMCALL => plain(VmExit::Hypercall),
        code::XSETBV => plain(VmExit::Xsetbv),
        code::SHUTDOWN => plain(VmExit::TripleFault),
        code::INTR | code::NMI => plain(VmExit::ExternalInterrupt),
        // See: APM Vol 2 15.21.4.
        code::VINTR => plain(VmExit::InterruptWindow),
        code::MSR => plain(if info1 & 1 == 0 { VmExit::MsrRead } else { VmExit::MsrWrite }),
        code::IOIO => {
            // EXITINFO1: bit 0 TYPE (1 = IN), 2 STR, 3 REP, 4/5/6 SZ8/SZ16/SZ32, 31:16 port.
            // EXITINFO2: the RIP of the next instruction. See: APM Vol 2 15.10.2, Figure 15-2.
            let size = if info1 & (1 << 4) != 0 {
                1
            } else if info1 & (1 << 5) != 0 {
                2
            } else {
                4
            };
            let io = IoExit {
                port: (info1 >> 16) as u16,
                size,
                direction: if info1 & 1 != 0 { IoDirection::In } else { IoDirection::Out },
                string: info1 & (1 << 2) != 0,
                repeat: info1 & (1 << 3) != 0,
            };
            DecodedExit { exit: VmExit::Io(io), next_rip: Some(info2) }
        }
        code::NPF => {
            // EXITINFO1: #PF-style error code (bit 0 P, 1 RW, 4 ID); EXITINFO2: the guest-physical
            // address. See: APM Vol 2 15.25.6.
            let access = MemoryAccess { present: info1 & 1 != 0, write: info1 & (1 << 1) != 0, execute: info1 & (1 << 4) != 0 };
            plain(VmExit::NestedPageFault { guest_physical: GuestPhysAddr(info2), access })
        }
        code::VMRUN => plain(VmExit::VirtualizationInstruction { mnemonic: "vmrun" }),
        code::VMLOAD => plain(VmExit::VirtualizationInstruction { mnemonic: "vmload" }),
        code::VMSAVE => plain(VmExit::VirtualizationInstruction { mnemonic: "vmsave" }),
        code::STGI => plain(VmExit::VirtualizationInstruction { mnemonic: "stgi" }),
        code::CLGI => plain(VmExit::VirtualizationInstruction { mnemonic: "clgi" }),
        code::SKINIT => plain(VmExit::VirtualizationInstruction { mnemonic: "skinit" }),
        code::INVLPGA => plain(VmExit::VirtualizationInstruction { mnemonic: "invlpga" }),
        code::INVALID | code::INVALID_32 => plain(VmExit::EntryFailed {
            reason: "VMRUN refused the guest state (VMEXIT_INVALID: a consistency check of APM Vol 2 15.5.1 failed)",
            detail: exit_code,
        }),
        other => plain(VmExit::Unhandled { code: other, info1, info2 }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_plain(exit_code: u64, info1: u64, info2: u64) -> DecodedExit {
        decode(exit_code, info1, info2, false)
    }

    #[test]
    fn shadow_paging_exits() {
        assert_eq!(
            decode_plain(0x13, 0, 0).exit,
            VmExit::ControlRegister(ControlRegisterAccess::Write {
                register: 3,
                source: None
            })
        );
        assert_eq!(
            decode(0x13, (1 << 63) | 1, 0, true).exit,
            VmExit::ControlRegister(ControlRegisterAccess::Write {
                register: 3,
                source: Some(Register::Rcx)
            })
        );
        assert_eq!(
            decode_plain(0x04, 0, 0).exit,
            VmExit::ControlRegister(ControlRegisterAccess::Read {
                register: 4,
                destination: None
            })
        );
        assert_eq!(
            decode_plain(code::PAGE_FAULT, 0x6, 0xdead_0000).exit,
            VmExit::PageFault {
                address: 0xdead_0000,
                error_code: 6
            }
        );
        assert_eq!(
            decode_plain(code::INVLPG, 0x1000, 0).exit,
            VmExit::Invlpg { address: None }
        );
        assert_eq!(
            decode(code::INVLPG, 0x1000, 0, true).exit,
            VmExit::Invlpg {
                address: Some(0x1000)
            }
        );
    }

    #[test]
    fn xsetbv_exit() {
        let decoded = decode_plain(code::XSETBV, 0, 0);
        assert_eq!(decoded.exit, VmExit::Xsetbv);
        assert_eq!(
            decoded.next_rip, None,
            "NRIP save (when present) gives the length"
        );
    }

    #[test]
    fn io_exits() {
        // OUT DX, AL to 0x3F8: TYPE=0, SZ8, port 0x3F8; next RIP in EXITINFO2.
        let decoded = decode_plain(code::IOIO, (0x3F8 << 16) | (1 << 4), 0x10_0042);
        assert_eq!(
            decoded.exit,
            VmExit::Io(IoExit {
                port: 0x3F8,
                size: 1,
                direction: IoDirection::Out,
                string: false,
                repeat: false
            })
        );
        assert_eq!(decoded.next_rip, Some(0x10_0042));
        // IN EAX, DX from 0xCFC.
        let decoded = decode_plain(code::IOIO, (0xCFC << 16) | (1 << 6) | 1, 0);
        assert_eq!(
            decoded.exit,
            VmExit::Io(IoExit {
                port: 0xCFC,
                size: 4,
                direction: IoDirection::In,
                string: false,
                repeat: false
            })
        );
        // REP OUTSW.
        let decoded = decode_plain(
            code::IOIO,
            (0x1F0 << 16) | (1 << 5) | (1 << 3) | (1 << 2),
            0,
        );
        assert!(matches!(
            decoded.exit,
            VmExit::Io(IoExit {
                size: 2,
                string: true,
                repeat: true,
                ..
            })
        ));
    }

    #[test]
    fn msr_npf_and_the_rest() {
        assert_eq!(decode_plain(code::MSR, 0, 0).exit, VmExit::MsrRead);
        assert_eq!(decode_plain(code::MSR, 1, 0).exit, VmExit::MsrWrite);
        let npf = decode_plain(code::NPF, 0b110, 0x200_0000).exit;
        assert_eq!(
            npf,
            VmExit::NestedPageFault {
                guest_physical: GuestPhysAddr(0x200_0000),
                access: MemoryAccess {
                    present: false,
                    write: true,
                    execute: false
                }
            }
        );
        assert_eq!(decode_plain(code::SHUTDOWN, 0, 0).exit, VmExit::TripleFault);
        assert_eq!(
            decode_plain(code::INTR, 0, 0).exit,
            VmExit::ExternalInterrupt
        );
        assert_eq!(
            decode_plain(code::NMI, 0, 0).exit,
            VmExit::ExternalInterrupt
        );
        assert_eq!(
            decode_plain(code::VINTR, 0, 0).exit,
            VmExit::InterruptWindow
        );
        assert_eq!(
            decode_plain(code::VMRUN, 0, 0).exit,
            VmExit::VirtualizationInstruction { mnemonic: "vmrun" }
        );
        assert!(matches!(
            decode_plain(code::INVALID, 0, 0).exit,
            VmExit::EntryFailed { .. }
        ));
        assert_eq!(
            decode_plain(0x7E, 1, 2).exit,
            VmExit::Unhandled {
                code: 0x7E,
                info1: 1,
                info2: 2
            }
        );
    }
}

/// The state VMRUN's consistency checks look at (APM Vol 2 15.5.1), for naming the offending
/// field after VMEXIT_INVALID.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmrunStateFields {
    pub efer: u64,
    pub cr0: u64,
    pub cr4: u64,
    pub cs_attributes: u16,
    pub asid: u32,
    pub intercept_misc2: u32,
}

/// Finds the first VMRUN consistency check the fields fail, naming the VMCB field. `None`
/// when these checks find nothing (APM Vol 2 15.5.1 lists more).
pub fn diagnose_vmrun_state(fields: &VmrunStateFields) -> Option<&'static str> {
    const EFER_SVME: u64 = 1 << 12;
    const EFER_LME: u64 = 1 << 8;
    const CR0_PG: u64 = 1 << 31;
    const CR0_CD: u64 = 1 << 30;
    const CR0_NW: u64 = 1 << 29;
    const CR4_PAE: u64 = 1 << 5;
    if fields.efer & EFER_SVME == 0 {
        return Some("save.efer: EFER.SVME must be 1 (APM Vol 2 15.5.1)");
    }
    if fields.cr0 & CR0_NW != 0 && fields.cr0 & CR0_CD == 0 {
        return Some("save.cr0: CR0.CD = 0 with CR0.NW = 1 is illegal (APM Vol 2 15.5.1)");
    }
    if fields.cr0 >> 32 != 0 {
        return Some("save.cr0: bits 63:32 must be 0 (APM Vol 2 15.5.1)");
    }
    if fields.efer & EFER_LME != 0 && fields.cr0 & CR0_PG != 0 && fields.cr4 & CR4_PAE == 0 {
        return Some("save.cr4: EFER.LME and CR0.PG need CR4.PAE (APM Vol 2 15.5.1)");
    }
    if fields.efer & EFER_LME != 0
        && fields.cr0 & CR0_PG != 0
        && fields.cs_attributes & crate::vmcb::ATTRIBUTE_LONG != 0
        && fields.cs_attributes & crate::vmcb::ATTRIBUTE_DEFAULT_32 != 0
    {
        return Some("save.cs: CS.L and CS.D both set in long mode (APM Vol 2 15.5.1)");
    }
    if fields.asid == 0 {
        return Some("control.guest_asid: ASID 0 is the host's (APM Vol 2 15.5.1)");
    }
    if fields.intercept_misc2 & 1 == 0 {
        return Some("control.intercept_misc2: the VMRUN intercept must be set (APM Vol 2 15.5.1)");
    }
    None
}

#[cfg(test)]
mod diagnose_tests {
    use super::*;

    #[test]
    fn names_the_field() {
        let good = VmrunStateFields {
            efer: 0x1D00,
            cr0: 0x8005_0033,
            cr4: 0x20,
            cs_attributes: 0xA9B,
            asid: 1,
            intercept_misc2: 0x7F,
        };
        assert_eq!(diagnose_vmrun_state(&good), None);
        let no_svme = VmrunStateFields {
            efer: 0xD00,
            ..good
        };
        assert!(diagnose_vmrun_state(&no_svme)
            .unwrap()
            .starts_with("save.efer"));
        let no_pae = VmrunStateFields { cr4: 0, ..good };
        assert!(diagnose_vmrun_state(&no_pae)
            .unwrap()
            .starts_with("save.cr4"));
        let asid_zero = VmrunStateFields { asid: 0, ..good };
        assert!(diagnose_vmrun_state(&asid_zero)
            .unwrap()
            .starts_with("control.guest_asid"));
    }
}
