//! CPU virtualization capability decoding: which vendor this is, whether it can virtualize,
//! and the one greppable summary line the hypervisor prints at boot.
//!
//! Everything here is pure: the kernel executes CPUID / RDMSR (in `hw`) and hands the raw
//! register values to these decoders, so every decision is unit-tested on the host with real
//! register dumps. The vendor details live in [`vmx`] (Intel VT-x) and [`svm`] (AMD-V).
//!
//! Manuals: Intel SDM (combined volumes, 2023 numbering: Vol 3C chapter 24 "Introduction to VMX
//! Operation", Vol 3D Appendix A "VMX Capability Reporting Facility"); AMD64 APM Vol 2 rev 3.41
//! chapter 15 "Secure Virtual Machine" and Vol 3 Appendix E "Obtaining Processor Information
//! Via the CPUID Instruction".
//!
//! Written by hand rather than with `raw-cpuid`: the decisions need a handful of bits, the
//! decoders must take register values from the caller (for host tests), and no dependency may
//! be added to this crate.
#![forbid(unsafe_code)]

use core::fmt;

pub mod svm;
pub mod vmx;

/// The power-off status for "this machine cannot virtualize" (every [`Refusal`]).
pub const CANNOT_VIRTUALIZE_EXIT_STATUS: u32 = 3;

/// The CPU vendor, from the CPUID leaf 0 vendor string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vendor {
    /// "GenuineIntel": virtualization through VMX (VT-x).
    Intel,
    /// "AuthenticAMD" or "HygonGenuine" (Hygon Dhyana is a licensed Zen): virtualization
    /// through SVM (AMD-V).
    Amd,
    /// Any other vendor string: ringzero does not drive its virtualization extension, if any.
    Other,
}

impl Vendor {
    /// From CPUID leaf 0 EBX, EDX, ECX ("GenuineIntel", "AuthenticAMD"; treat "HygonGenuine"
    /// as Amd too). The vendor string is the twelve bytes of EBX, EDX, ECX in that order,
    /// each register little-endian.
    // See: SDM Vol 2A CPUID (Leaf 00H: vendor identification string in EBX, EDX, ECX)
    // See: APM Vol 3 Appendix E, CPUID Fn0000_0000_E[B,C,D]X (processor vendor)
    pub fn from_cpuid_vendor(ebx: u32, edx: u32, ecx: u32) -> Vendor {
        let vendor_string = [ebx.to_le_bytes(), edx.to_le_bytes(), ecx.to_le_bytes()];
        match vendor_string.as_flattened() {
            b"GenuineIntel" => Vendor::Intel,
            b"AuthenticAMD" | b"HygonGenuine" => Vendor::Amd,
            _ => Vendor::Other,
        }
    }

    /// The lower-case name used in the summary line: "intel", "amd" or "other".
    pub fn name(self) -> &'static str {
        match self {
            Vendor::Intel => "intel",
            Vendor::Amd => "amd",
            Vendor::Other => "other",
        }
    }
}

impl fmt::Display for Vendor {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

/// The fixed, greppable summary line. Display prints exactly:
/// "ringzero: virt vendor=amd vmx=0 svm=1 ept=0 npt=1 unrestricted=0 vpid=0 asids=16 cpus=1"
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtSummary {
    pub vendor: Vendor,
    pub vmx: bool,
    pub svm: bool,
    pub ept: bool,
    pub npt: bool,
    pub unrestricted: bool,
    pub vpid: bool,
    pub asids: u32,
    pub cpus: u32,
}

impl VirtSummary {
    /// The summary for an Intel machine. `asids` is 0: address space identifiers are an SVM
    /// notion; VMX tags TLB entries with VPIDs, reported by `vpid`.
    pub fn intel(capabilities: &vmx::VmxCapabilities, cpus: u32) -> Self {
        VirtSummary {
            vendor: Vendor::Intel,
            vmx: true,
            svm: false,
            ept: capabilities.ept,
            npt: false,
            unrestricted: capabilities.unrestricted_guest,
            vpid: capabilities.vpid,
            asids: 0,
            cpus,
        }
    }

    /// The summary for an AMD machine (`svm` follows the decoded CPUID bit).
    pub fn amd(capabilities: &svm::SvmCapabilities, cpus: u32) -> Self {
        VirtSummary {
            vendor: Vendor::Amd,
            vmx: false,
            svm: capabilities.svm,
            ept: false,
            npt: capabilities.nested_paging,
            unrestricted: false,
            vpid: false,
            asids: capabilities.asids,
            cpus,
        }
    }
}

impl fmt::Display for VirtSummary {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "ringzero: virt vendor={} vmx={} svm={} ept={} npt={} unrestricted={} vpid={} asids={} cpus={}",
            self.vendor.name(),
            u8::from(self.vmx),
            u8::from(self.svm),
            u8::from(self.ept),
            u8::from(self.npt),
            u8::from(self.unrestricted),
            u8::from(self.vpid),
            self.asids,
            self.cpus,
        )
    }
}

/// Why this machine cannot virtualize. Display gives one clear message (no "ringzero:"
/// prefix) that names the missing or blocking bit and what to change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Intel without CPUID.1:ECX.VMX[5]; AMD without CPUID.80000001h:ECX.SVM[2]; a vendor
    /// that is neither.
    NoVirtualizationExtension { vendor: Vendor },
    /// IA32_FEATURE_CONTROL (0x3A) locked (bit 0) with VMX-outside-SMX (bit 2) clear.
    VmxLockedOffByFirmware { feature_control: u64 },
    /// VM_CR (0xC001_0114) SVMDIS (bit 4) set and LOCK (bit 3) set.
    SvmLockedOffByFirmware { vm_cr: u64 },
}

impl Refusal {
    /// The documented power-off status for each refusal kind. All three use status 3
    /// ([`CANNOT_VIRTUALIZE_EXIT_STATUS`]): 3 = "this machine cannot virtualize". It is distinct
    /// from 0 (clean power-off) and from the statuses of a panic or a failed guest.
    pub fn exit_status(self) -> u32 {
        match self {
            Refusal::NoVirtualizationExtension { .. }
            | Refusal::VmxLockedOffByFirmware { .. }
            | Refusal::SvmLockedOffByFirmware { .. } => CANNOT_VIRTUALIZE_EXIT_STATUS,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            // See: SDM Vol 3C 24.6 (Discovering Support for VMX: CPUID.1:ECX.VMX[bit 5])
            Refusal::NoVirtualizationExtension {
                vendor: Vendor::Intel,
            } => formatter.write_str(
                "this Intel CPU cannot virtualize: CPUID.1:ECX.VMX[bit 5] is 0, so VT-x is absent. \
                 Under Bochs pick a VMX-capable cpu model (cpu: model=corei7_skylake_x, Bochs built \
                 with --enable-vmx=2); under another hypervisor expose VMX to this VM; on real \
                 hardware enable VT-x in the firmware setup.",
            ),
            // See: APM Vol 2 15.4 (Enabling SVM: CPUID Fn8000_0001_ECX[SVM] bit 2)
            Refusal::NoVirtualizationExtension {
                vendor: Vendor::Amd,
            } => formatter.write_str(
                "this AMD CPU cannot virtualize: CPUID.80000001h:ECX.SVM[bit 2] is 0, so AMD-V (SVM) \
                 is absent. Under QEMU use -cpu EPYC or -cpu max; on real hardware enable AMD-V (SVM) \
                 in the firmware setup.",
            ),
            Refusal::NoVirtualizationExtension {
                vendor: Vendor::Other,
            } => formatter.write_str(
                "this CPU cannot virtualize: its CPUID leaf 0 vendor is neither GenuineIntel nor \
                 AuthenticAMD, and ringzero drives only Intel VT-x (CPUID.1:ECX.VMX[bit 5]) and AMD-V \
                 (CPUID.80000001h:ECX.SVM[bit 2]). Run it on an Intel or AMD CPU: under QEMU use \
                 -cpu EPYC or -cpu max, under Bochs a VMX-capable cpu model such as corei7_skylake_x.",
            ),
            // See: SDM Vol 3C 24.7 (Enabling and Entering VMX Operation: IA32_FEATURE_CONTROL)
            Refusal::VmxLockedOffByFirmware { feature_control } => write!(
                formatter,
                "VT-x is switched off by the firmware: IA32_FEATURE_CONTROL (MSR 0x3A) = {feature_control:#x} \
                 has the lock bit (bit 0) set and 'enable VMX outside SMX' (bit 2) clear, so VMXON \
                 faults until the next reset. Enable VT-x (Intel Virtualization Technology) in the \
                 firmware setup and reboot.",
            ),
            // See: APM Vol 2 15.30.1 (VM_CR MSR: SVMDIS bit 4, LOCK bit 3)
            Refusal::SvmLockedOffByFirmware { vm_cr } => write!(
                formatter,
                "AMD-V is switched off by the firmware: VM_CR (MSR 0xC001_0114) = {vm_cr:#x} has \
                 SVMDIS (bit 4) and LOCK (bit 3) set, so EFER.SVME cannot be set until the next \
                 reset. Enable AMD-V (SVM) in the firmware setup and reboot.",
            ),
        }
    }
}

/// Why a VM that asks for nested paging cannot run on this CPU, and what to change. A CPU
/// without NPT/EPT still virtualizes: its guests use shadow paging.
pub fn nested_paging_missing(vendor: Vendor) -> &'static str {
    match vendor {
        // See: APM Vol 2 15.25 (Nested Paging: CPUID Fn8000_000A_EDX[NP] bit 0)
        Vendor::Amd => {
            "this CPU has SVM but no nested paging (CPUID.8000000Ah:EDX.NP[bit 0] is 0): give the VM \
             paging = \"shadow\" in its configuration, or use a CPU with nested paging (under QEMU \
             -cpu EPYC or -cpu max; every AMD CPU since family 10h has it)"
        }
        // See: SDM Vol 3C 29.3 (EPT), Vol 3D A.3.3 (secondary controls bit 1 and bit 7)
        _ => {
            "this CPU has VT-x without EPT and unrestricted guest (IA32_VMX_PROCBASED_CTLS2 bits 33 \
             and 39): give the VM paging = \"shadow\" in its configuration, or use a CPU with EPT \
             (under Bochs cpu model corei7_skylake_x; Nehalem or later)"
        }
    }
}

/// Whether the vendor's virtualization extension is reported by CPUID: for Intel
/// CPUID.1:ECX bit 5 (VMX), for AMD CPUID.80000001h:ECX bit 2 (SVM); any other vendor is
/// refused. Whether the firmware left it usable is a separate, MSR-based check
/// ([`vmx::feature_control_state`], [`svm::svm_enable_state`]).
pub fn check_extension(
    vendor: Vendor,
    cpuid_1_ecx: u32,
    cpuid_80000001_ecx: u32,
) -> Result<(), Refusal> {
    let present = match vendor {
        // See: SDM Vol 3C 24.6 (Discovering Support for VMX)
        Vendor::Intel => cpuid_1_ecx & vmx::CPUID_1_ECX_VMX != 0,
        // See: APM Vol 2 15.4 (Enabling SVM)
        Vendor::Amd => cpuid_80000001_ecx & svm::CPUID_80000001_ECX_SVM != 0,
        Vendor::Other => false,
    };
    if present {
        Ok(())
    } else {
        Err(Refusal::NoVirtualizationExtension { vendor })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Real CPUID leaf 0 of an AMD Ryzen 7 2700X (family 17h model 08h), from the kcpuid dump
    // Borislav Petkov posted to linux-kernel on 2023-02-07, "Re: [PATCH 3/3] tools/x86/kcpuid:
    // Dump the CPUID function in detailed view", Message-ID <Y+J5jDfO4PMujuXD@zn.tnic>:
    // EBX 0x68747541, ECX 0x444d4163, EDX 0x69746e65.
    const RYZEN_2700X_LEAF0_EBX: u32 = 0x6874_7541;
    const RYZEN_2700X_LEAF0_EDX: u32 = 0x6974_6e65;
    const RYZEN_2700X_LEAF0_ECX: u32 = 0x444d_4163;

    // "GenuineIntel" as every Intel CPU (and Bochs corei7_skylake_x, whose get_std_cpuid_leaf_0
    // calls get_leaf_0(0x16, "GenuineIntel", leaf) in bochs-emu/Bochs
    // bochs/cpu/cpudb/intel/corei7_skylake-x.cc) returns it: "Genu" "ineI" "ntel".
    const INTEL_LEAF0_EBX: u32 = 0x756e_6547;
    const INTEL_LEAF0_EDX: u32 = 0x4965_6e69;
    const INTEL_LEAF0_ECX: u32 = 0x6c65_746e;

    #[test]
    fn vendor_from_real_amd_leaf_0() {
        assert_eq!(
            Vendor::from_cpuid_vendor(
                RYZEN_2700X_LEAF0_EBX,
                RYZEN_2700X_LEAF0_EDX,
                RYZEN_2700X_LEAF0_ECX
            ),
            Vendor::Amd
        );
    }

    #[test]
    fn vendor_from_intel_leaf_0() {
        assert_eq!(
            Vendor::from_cpuid_vendor(INTEL_LEAF0_EBX, INTEL_LEAF0_EDX, INTEL_LEAF0_ECX),
            Vendor::Intel
        );
    }

    #[test]
    fn vendor_hygon_counts_as_amd() {
        // "HygonGenuine": "Hygo" "nGen" "uine" (QEMU target/i386/cpu.h CPUID_VENDOR_HYGON).
        assert_eq!(
            Vendor::from_cpuid_vendor(0x6f67_7948, 0x6e65_476e, 0x656e_6975),
            Vendor::Amd
        );
    }

    #[test]
    fn vendor_other_strings() {
        // "CentaurHauls" (VIA): "Cent" "aurH" "auls".
        assert_eq!(
            Vendor::from_cpuid_vendor(0x746e_6543, 0x4872_7561, 0x736c_7561),
            Vendor::Other
        );
        // Registers in the wrong order ("GenuntelineI") are not Intel.
        assert_eq!(
            Vendor::from_cpuid_vendor(INTEL_LEAF0_EBX, INTEL_LEAF0_ECX, INTEL_LEAF0_EDX),
            Vendor::Other
        );
        assert_eq!(Vendor::from_cpuid_vendor(0, 0, 0), Vendor::Other);
    }

    #[test]
    fn vendor_names() {
        assert_eq!(Vendor::Intel.name(), "intel");
        assert_eq!(Vendor::Amd.name(), "amd");
        assert_eq!(Vendor::Other.name(), "other");
    }

    #[test]
    fn summary_line_for_qemu_epyc_is_exact() {
        // QEMU 7.2 -cpu EPYC under TCG: see svm::tests for where these values come from.
        let capabilities = svm::SvmCapabilities::decode(&svm::SvmCpuid {
            extended_features_ecx: 0x0000_0075,
            leaf_a_eax: 0x0000_0001,
            leaf_a_ebx: 0x0000_0010,
            leaf_a_edx: 0x0000_0001,
        });
        let summary = VirtSummary::amd(&capabilities, 1);
        assert_eq!(
            format!("{summary}"),
            "ringzero: virt vendor=amd vmx=0 svm=1 ept=0 npt=1 unrestricted=0 vpid=0 asids=16 cpus=1"
        );
    }

    #[test]
    fn summary_line_for_bochs_skylake_x_is_exact() {
        let capabilities = vmx::VmxCapabilities::decode(&vmx::tests::bochs_corei7_skylake_x());
        let summary = VirtSummary::intel(&capabilities, 2);
        assert_eq!(
            format!("{summary}"),
            "ringzero: virt vendor=intel vmx=1 svm=0 ept=1 npt=0 unrestricted=1 vpid=1 asids=0 cpus=2"
        );
    }

    #[test]
    fn summary_line_literal_fields() {
        let summary = VirtSummary {
            vendor: Vendor::Other,
            vmx: false,
            svm: false,
            ept: false,
            npt: false,
            unrestricted: false,
            vpid: false,
            asids: 0,
            cpus: 64,
        };
        assert_eq!(
            format!("{summary}"),
            "ringzero: virt vendor=other vmx=0 svm=0 ept=0 npt=0 unrestricted=0 vpid=0 asids=0 cpus=64"
        );
    }

    #[test]
    fn every_refusal_exits_with_status_3() {
        let refusals = [
            Refusal::NoVirtualizationExtension {
                vendor: Vendor::Intel,
            },
            Refusal::NoVirtualizationExtension {
                vendor: Vendor::Amd,
            },
            Refusal::NoVirtualizationExtension {
                vendor: Vendor::Other,
            },
            Refusal::VmxLockedOffByFirmware {
                feature_control: 0x1,
            },
            Refusal::SvmLockedOffByFirmware { vm_cr: 0x18 },
        ];
        for refusal in refusals {
            assert_eq!(refusal.exit_status(), 3, "{refusal}");
        }
    }

    #[test]
    fn missing_nested_paging_names_the_bit_and_the_fix() {
        let amd = nested_paging_missing(Vendor::Amd);
        assert!(amd.contains("CPUID.8000000Ah:EDX.NP[bit 0]"), "{amd}");
        assert!(amd.contains("paging = \"shadow\""), "{amd}");
        assert!(amd.contains("-cpu EPYC"), "{amd}");
        let intel = nested_paging_missing(Vendor::Intel);
        assert!(intel.contains("EPT"), "{intel}");
        assert!(intel.contains("corei7_skylake_x"), "{intel}");
    }

    #[test]
    fn intel_refusal_names_the_bit_and_the_fix() {
        let message = format!(
            "{}",
            Refusal::NoVirtualizationExtension {
                vendor: Vendor::Intel
            }
        );
        assert!(message.contains("CPUID.1:ECX.VMX[bit 5]"), "{message}");
        assert!(message.contains("Bochs"), "{message}");
        assert!(message.contains("corei7_skylake_x"), "{message}");
        assert!(
            message.contains("enable VT-x in the firmware setup"),
            "{message}"
        );
    }

    #[test]
    fn amd_refusal_names_the_bit_and_the_fix() {
        let message = format!(
            "{}",
            Refusal::NoVirtualizationExtension {
                vendor: Vendor::Amd
            }
        );
        assert!(
            message.contains("CPUID.80000001h:ECX.SVM[bit 2]"),
            "{message}"
        );
        assert!(message.contains("-cpu EPYC or -cpu max"), "{message}");
        assert!(
            message.contains("enable AMD-V (SVM) in the firmware setup"),
            "{message}"
        );
    }

    #[test]
    fn other_vendor_refusal_names_both_bits() {
        let message = format!(
            "{}",
            Refusal::NoVirtualizationExtension {
                vendor: Vendor::Other
            }
        );
        assert!(message.contains("CPUID.1:ECX.VMX[bit 5]"), "{message}");
        assert!(
            message.contains("CPUID.80000001h:ECX.SVM[bit 2]"),
            "{message}"
        );
        assert!(message.contains("-cpu EPYC or -cpu max"), "{message}");
    }

    #[test]
    fn firmware_refusals_name_the_msr_bits_and_the_fix() {
        let vmx_message = format!(
            "{}",
            Refusal::VmxLockedOffByFirmware {
                feature_control: 0x1
            }
        );
        assert!(vmx_message.contains("IA32_FEATURE_CONTROL (MSR 0x3A) = 0x1"));
        assert!(vmx_message.contains("bit 0"));
        assert!(vmx_message.contains("bit 2"));
        assert!(vmx_message.contains("Enable VT-x"));
        assert!(vmx_message.contains("firmware setup"));

        let svm_message = format!("{}", Refusal::SvmLockedOffByFirmware { vm_cr: 0x18 });
        assert!(svm_message.contains("VM_CR (MSR 0xC001_0114) = 0x18"));
        assert!(svm_message.contains("SVMDIS (bit 4)"));
        assert!(svm_message.contains("LOCK (bit 3)"));
        assert!(svm_message.contains("Enable AMD-V (SVM) in the firmware setup"));
    }

    #[test]
    fn check_extension_with_real_cpuid_bits() {
        // Bochs corei7_skylake_x CPUID.1:ECX includes BX_CPUID_EXT_VMX (bit 5) when built with
        // --enable-vmx=2 (bochs/cpu/cpudb/intel/corei7_skylake-x.cc get_std_cpuid_leaf_1).
        assert_eq!(check_extension(Vendor::Intel, 1 << 5, 0), Ok(()));
        assert_eq!(
            check_extension(Vendor::Intel, !(1 << 5), u32::MAX),
            Err(Refusal::NoVirtualizationExtension {
                vendor: Vendor::Intel
            })
        );
        // Ryzen 7 2700X CPUID.80000001h:ECX = 0x35c233ff (reassembled from the decoded flag
        // list of the kcpuid dump cited above: svm is bit 2).
        assert_eq!(check_extension(Vendor::Amd, 0, 0x35c2_33ff), Ok(()));
        assert_eq!(
            check_extension(Vendor::Amd, u32::MAX, 0x35c2_33ff & !(1 << 2)),
            Err(Refusal::NoVirtualizationExtension {
                vendor: Vendor::Amd
            })
        );
        assert_eq!(
            check_extension(Vendor::Other, u32::MAX, u32::MAX),
            Err(Refusal::NoVirtualizationExtension {
                vendor: Vendor::Other
            })
        );
    }
}
