//! AMD-V (SVM) capability decoding: CPUID Fn8000_0001_ECX[SVM], the SVM feature leaf
//! Fn8000_000A, and the VM_CR MSR that firmware uses to lock SVM off.
//!
//! Manuals: AMD64 APM Vol 2 rev 3.41 chapter 15 "Secure Virtual Machine" (15.4 enabling SVM,
//! 15.30.1 VM_CR, 15.30.4 VM_HSAVE_PA) and APM Vol 3 Appendix E "Obtaining Processor
//! Information Via the CPUID Instruction" (Fn8000_0001_ECX, Fn8000_000A_E[A,B,D]X).
//!
//! Pure decoders: the kernel executes CPUID / RDMSR and passes the raw register values.

use core::fmt;

/// CPUID Fn8000_0001_ECX bit 2: SVM supported.
// See: APM Vol 2 15.4 (Enabling SVM) and APM Vol 3 Appendix E, CPUID Fn8000_0001_ECX
pub const CPUID_80000001_ECX_SVM: u32 = 1 << 2;
/// VM_CR MSR: SVM lock and disable bits.
// See: APM Vol 2 15.30.1 (VM_CR MSR (C001_0114h))
pub const VM_CR: u32 = 0xC001_0114;
/// VM_HSAVE_PA MSR: physical address of the host save area used by VMRUN.
// See: APM Vol 2 15.30.4 (VM_HSAVE_PA MSR (C001_0117h))
pub const VM_HSAVE_PA: u32 = 0xC001_0117;

/// VM_CR bit 3, LOCK: when set, writes to LOCK and SVMDIS are ignored until reset.
// See: APM Vol 2 15.30.1 (VM_CR MSR)
pub const VM_CR_LOCK: u64 = 1 << 3;
/// VM_CR bit 4, SVMDIS: when set, EFER.SVME must be zero (SVM cannot be enabled).
// See: APM Vol 2 15.30.1 (VM_CR MSR)
pub const VM_CR_SVMDIS: u64 = 1 << 4;

/// The raw CPUID registers SVM decoding needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvmCpuid {
    /// CPUID Fn8000_0001_ECX.
    pub extended_features_ecx: u32,
    /// CPUID Fn8000_000A_EAX (only meaningful when the SVM bit is set).
    pub leaf_a_eax: u32,
    /// CPUID Fn8000_000A_EBX (only meaningful when the SVM bit is set).
    pub leaf_a_ebx: u32,
    /// CPUID Fn8000_000A_EDX (only meaningful when the SVM bit is set).
    pub leaf_a_edx: u32,
}

/// The decoded SVM capabilities. When `svm` is false every other field is zero / false: leaf
/// Fn8000_000A is reserved without SVM, so its contents are not trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SvmCapabilities {
    pub svm: bool,
    pub revision: u8,
    pub asids: u32,
    pub nested_paging: bool,
    pub lbr_virtualization: bool,
    pub svm_lock: bool,
    pub nrip_save: bool,
    pub tsc_rate_msr: bool,
    pub vmcb_clean_bits: bool,
    pub flush_by_asid: bool,
    pub decode_assists: bool,
    pub pause_filter: bool,
    pub avic: bool,
    pub vmsave_virtualization: bool,
    pub vgif: bool,
}

impl SvmCapabilities {
    /// Decodes Fn8000_0001_ECX[SVM] and Fn8000_000A: EAX[7:0] revision, EBX number of ASIDs,
    /// EDX feature bits 0 NP, 1 LbrVirt, 2 SVML, 3 NRIPS, 4 TscRateMsr, 5 VmcbClean,
    /// 6 FlushByAsid, 7 DecodeAssists, 10 PauseFilter, 13 AVIC, 15 VMSAVEvirt, 16 VGIF.
    // See: APM Vol 3 Appendix E, CPUID Fn8000_000A_EAX (SvmRev), _EBX (NASID), _EDX (features)
    pub fn decode(cpuid: &SvmCpuid) -> Self {
        // See: APM Vol 2 15.4 (Enabling SVM)
        let svm = cpuid.extended_features_ecx & CPUID_80000001_ECX_SVM != 0;
        let features = if svm { cpuid.leaf_a_edx } else { 0 };
        let feature = |index: u32| features & (1 << index) != 0;
        SvmCapabilities {
            svm,
            revision: if svm {
                (cpuid.leaf_a_eax & 0xFF) as u8
            } else {
                0
            },
            // See: APM Vol 2 15.16 (TLB Control: ASIDs; ASID 0 is the host's)
            asids: if svm { cpuid.leaf_a_ebx } else { 0 },
            // See: APM Vol 2 15.25 (Nested Paging)
            nested_paging: feature(0),
            // See: APM Vol 2 15.23 (Last Branch Record Virtualization)
            lbr_virtualization: feature(1),
            // See: APM Vol 2 15.31 (SVM-Lock)
            svm_lock: feature(2),
            // See: APM Vol 2 15.7.1 (State Saved on Exit: next sequential instruction pointer)
            nrip_save: feature(3),
            // See: APM Vol 2 15.30.5 (TSC Ratio MSR (C000_0104h))
            tsc_rate_msr: feature(4),
            // See: APM Vol 2 15.15 (VMCB State Caching: clean bits)
            vmcb_clean_bits: feature(5),
            // See: APM Vol 2 15.16.1 (TLB Flush: TLB_CONTROL flush by ASID)
            flush_by_asid: feature(6),
            // See: APM Vol 2 15.33 (Decode Assists)
            decode_assists: feature(7),
            // See: APM Vol 2 15.14.4 (Pause Intercept Filtering)
            pause_filter: feature(10),
            // See: APM Vol 2 15.29 (Advanced Virtual Interrupt Controller)
            avic: feature(13),
            // See: APM Vol 2 15.33.1 (VMSAVE and VMLOAD Virtualization)
            vmsave_virtualization: feature(15),
            // See: APM Vol 2 15.33.2 (Virtual GIF)
            vgif: feature(16),
        }
    }
}

fn yes_no(value: bool) -> &'static str {
    if value {
        "yes"
    } else {
        "no"
    }
}

/// A human-readable multi-line table (one "name: yes/no/value" row per feature), for the boot
/// log. No trailing newline.
impl fmt::Display for SvmCapabilities {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "SVM capabilities (CPUID Fn8000_000A, APM Vol 2 chapter 15):"
        )?;
        write!(formatter, "\n  SVM: {}", yes_no(self.svm))?;
        write!(formatter, "\n  SVM revision: {}", self.revision)?;
        write!(formatter, "\n  ASIDs: {}", self.asids)?;
        let rows: [(&str, bool); 12] = [
            ("nested paging", self.nested_paging),
            ("LBR virtualization", self.lbr_virtualization),
            ("SVM lock", self.svm_lock),
            ("next RIP save", self.nrip_save),
            ("TSC rate MSR", self.tsc_rate_msr),
            ("VMCB clean bits", self.vmcb_clean_bits),
            ("flush by ASID", self.flush_by_asid),
            ("decode assists", self.decode_assists),
            ("pause filter", self.pause_filter),
            ("AVIC", self.avic),
            ("VMSAVE/VMLOAD virtualization", self.vmsave_virtualization),
            ("virtual GIF", self.vgif),
        ];
        for (name, value) in rows {
            write!(formatter, "\n  {name}: {}", yes_no(value))?;
        }
        Ok(())
    }
}

/// What firmware left in VM_CR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SvmEnableState {
    /// SVMDIS clear: EFER.SVME may be set.
    Available,
    /// SVMDIS set but not locked: clear it
    DisabledUnlocked { new_value: u64 },
    /// SVMDIS and LOCK set: SVM is off until reset (refuse).
    LockedOff,
}

/// Classifies VM_CR (bit 3 LOCK, bit 4 SVMDIS). A set LOCK with SVMDIS clear is Available:
/// the firmware locked SVM on.
// See: APM Vol 2 15.30.1 (VM_CR MSR) and 15.31 (SVM-Lock)
pub fn svm_enable_state(vm_cr: u64) -> SvmEnableState {
    let disabled = vm_cr & VM_CR_SVMDIS != 0;
    let locked = vm_cr & VM_CR_LOCK != 0;
    match (disabled, locked) {
        (false, _) => SvmEnableState::Available,
        (true, false) => SvmEnableState::DisabledUnlocked {
            new_value: vm_cr & !VM_CR_SVMDIS,
        },
        (true, true) => SvmEnableState::LockedOff,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// QEMU 7.2 `-cpu EPYC` under TCG (the emulator table's SVM machine), from qemu/qemu
    /// target/i386/cpu.c:
    /// - `cpu_x86_cpuid` case 0x8000000A: EAX = 1 (SVM revision), EBX = 0x10 (ASIDs),
    ///   EDX = env->features[FEAT_SVM];
    /// - the EPYC model sets FEAT_SVM = CPUID_SVM_NPT | CPUID_SVM_NRIPSAVE and
    ///   FEAT_8000_0001_ECX = OSVW | 3DNOWPREFETCH | MISALIGNSSE | SSE4A | ABM | CR8LEG | SVM |
    ///   LAHF_LM | TOPOEXT;
    /// - TCG filters them with TCG_SVM_FEATURES (NPT | VGIF | SVME_ADDR_CHK in 7.2) and
    ///   TCG_EXT3_FEATURES (LAHF_LM | SVM | CR8LEG | ABM | SSE4A in 7.2), so NRIP save is dropped
    ///   (QEMU warns "TCG doesn't support requested feature: CPUID.8000000AH:EDX.nrip-save").
    ///
    /// Fn8000_0001_ECX = bits 0, 2, 4, 5, 6 = 0x75; Fn8000_000A EDX = NPT = 0x1.
    fn qemu_7_2_epyc_tcg() -> SvmCpuid {
        SvmCpuid {
            extended_features_ecx: 0x0000_0075,
            leaf_a_eax: 0x0000_0001,
            leaf_a_ebx: 0x0000_0010,
            leaf_a_edx: 0x0000_0001,
        }
    }

    /// The same EPYC model unfiltered (QEMU 7.2 with KVM on a Zen host): Fn8000_0001_ECX bits
    /// 0, 2, 4-9, 22 = 0x4003F5 and EDX = NPT | NRIPSAVE = 0x9; QEMU 7.2 still reports 16 ASIDs.
    fn qemu_7_2_epyc_model() -> SvmCpuid {
        SvmCpuid {
            extended_features_ecx: 0x0040_03F5,
            leaf_a_eax: 0x0000_0001,
            leaf_a_ebx: 0x0000_0010,
            leaf_a_edx: 0x0000_0009,
        }
    }

    /// A real AMD Ryzen 7 2700X (family 17h model 08h, Zen+), from the kcpuid dump Borislav
    /// Petkov posted to linux-kernel on 2023-02-07 ("Re: [PATCH 3/3] tools/x86/kcpuid: Dump
    /// the CPUID function in detailed view", Message-ID <Y+J5jDfO4PMujuXD@zn.tnic>):
    /// CPUID_0x8000000a: EAX 0x00000001, EBX 0x00008000, ECX 0, EDX 0x0001bcff.
    /// Fn8000_0001_ECX 0x35c233ff is reassembled from that dump's decoded flag list
    /// (lahf_lm .. osvw = bits 0-9, skinit 12, wdt 13, tce 17, topoext 22, perfctrextcore 23,
    /// perfctrextdf 24, databreakpoint 26, perfctrextllc 28, mwaitx 29).
    fn real_ryzen_7_2700x() -> SvmCpuid {
        SvmCpuid {
            extended_features_ecx: 0x35C2_33FF,
            leaf_a_eax: 0x0000_0001,
            leaf_a_ebx: 0x0000_8000,
            leaf_a_edx: 0x0001_BCFF,
        }
    }

    #[test]
    fn decode_qemu_epyc_under_tcg() {
        let capabilities = SvmCapabilities::decode(&qemu_7_2_epyc_tcg());
        assert_eq!(
            capabilities,
            SvmCapabilities {
                svm: true,
                revision: 1,
                asids: 16,
                nested_paging: true,
                lbr_virtualization: false,
                svm_lock: false,
                nrip_save: false,
                tsc_rate_msr: false,
                vmcb_clean_bits: false,
                flush_by_asid: false,
                decode_assists: false,
                pause_filter: false,
                avic: false,
                vmsave_virtualization: false,
                vgif: false,
            }
        );
    }

    #[test]
    fn decode_qemu_epyc_model_bits() {
        let capabilities = SvmCapabilities::decode(&qemu_7_2_epyc_model());
        assert!(capabilities.svm && capabilities.nested_paging && capabilities.nrip_save);
        assert_eq!(capabilities.asids, 16);
        assert!(!capabilities.decode_assists && !capabilities.vgif);
    }

    #[test]
    fn decode_real_ryzen_7_2700x() {
        let capabilities = SvmCapabilities::decode(&real_ryzen_7_2700x());
        assert!(capabilities.svm);
        assert_eq!(capabilities.revision, 1);
        assert_eq!(capabilities.asids, 32768);
        assert!(capabilities.nested_paging);
        assert!(capabilities.lbr_virtualization);
        assert!(capabilities.svm_lock);
        assert!(capabilities.nrip_save);
        assert!(capabilities.tsc_rate_msr);
        assert!(capabilities.vmcb_clean_bits);
        assert!(capabilities.flush_by_asid);
        assert!(capabilities.decode_assists);
        assert!(capabilities.pause_filter);
        assert!(capabilities.avic);
        assert!(capabilities.vmsave_virtualization);
        assert!(capabilities.vgif);
    }

    #[test]
    fn leaf_a_is_ignored_without_the_svm_bit() {
        let cpuid = SvmCpuid {
            extended_features_ecx: 0x35C2_33FF & !CPUID_80000001_ECX_SVM,
            ..real_ryzen_7_2700x()
        };
        let capabilities = SvmCapabilities::decode(&cpuid);
        assert!(!capabilities.svm);
        assert_eq!(capabilities.revision, 0);
        assert_eq!(capabilities.asids, 0);
        assert!(!capabilities.nested_paging && !capabilities.vgif && !capabilities.avic);
    }

    #[test]
    fn svm_available_when_svmdis_clear() {
        // Power-on value: VM_CR = 0 (APM Vol 2 15.30.1 lists every defined bit as reset to 0).
        assert_eq!(svm_enable_state(0x0), SvmEnableState::Available);
        // Firmware locked SVM on (LOCK set, SVMDIS clear).
        assert_eq!(svm_enable_state(VM_CR_LOCK), SvmEnableState::Available);
    }

    #[test]
    fn svm_disabled_but_unlocked_can_be_cleared() {
        assert_eq!(
            svm_enable_state(0x10),
            SvmEnableState::DisabledUnlocked { new_value: 0x0 }
        );
        // Other bits (DPD bit 0, R_INIT bit 1, DIS_A20M bit 2) are kept.
        assert_eq!(
            svm_enable_state(0x17),
            SvmEnableState::DisabledUnlocked { new_value: 0x7 }
        );
    }

    #[test]
    fn svm_locked_off_by_firmware() {
        // "SVM Mode: Disabled" in the firmware setup: SVMDIS | LOCK.
        assert_eq!(svm_enable_state(0x18), SvmEnableState::LockedOff);
        assert_eq!(svm_enable_state(u64::MAX), SvmEnableState::LockedOff);
    }

    #[test]
    fn display_is_a_table_with_one_row_per_feature() {
        let table = format!("{}", SvmCapabilities::decode(&qemu_7_2_epyc_tcg()));
        assert!(table.starts_with("SVM capabilities"));
        for row in [
            "\n  SVM: yes",
            "\n  SVM revision: 1",
            "\n  ASIDs: 16",
            "\n  nested paging: yes",
            "\n  next RIP save: no",
            "\n  virtual GIF: no",
        ] {
            assert!(table.contains(row), "missing {row:?} in\n{table}");
        }
        assert!(!table.ends_with('\n'));
    }

    #[test]
    fn msr_numbers() {
        assert_eq!(VM_CR, 0xC001_0114);
        assert_eq!(VM_HSAVE_PA, 0xC001_0117);
        assert_eq!(CPUID_80000001_ECX_SVM, 4);
    }
}
