//! What a guest sees when it executes CPUID: the host's answer with the virtualization
//! extensions hidden, the hypervisor-present bit set, and ringzero's own leaves at
//! 0x4000_0000, and XSAVE/AVX as far as the hypervisor switches their state (`xsave.rs`).
//! Documented in docs/guest-interface.md.
//!
//! See: SDM Vol 2A 3.3 "CPUID"; APM Vol 3 Appendix E; the hypervisor CPUID range
//! 0x4000_0000-0x4000_00FF is reserved for hypervisors by convention (Intel and AMD leave it
//! unused; Linux's `arch/x86/kernel/cpu/hypervisor.c` reads it).

use crate::xsave;

/// The highest hypervisor leaf ringzero answers.
pub const HYPERVISOR_MAX_LEAF: u32 = 0x4000_0000;
/// The 12-byte signature in EBX, ECX, EDX of leaf 0x4000_0000.
pub const SIGNATURE: &[u8; 12] = b"ringzero-hv\0";

/// CPUID.1:ECX bits.
const LEAF1_ECX_VMX: u32 = 1 << 5;
const LEAF1_ECX_MONITOR: u32 = 1 << 3;
const LEAF1_ECX_SMX: u32 = 1 << 6;
const LEAF1_ECX_FMA: u32 = 1 << 12;
const LEAF1_ECX_XSAVE: u32 = 1 << 26;
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
const LEAF1_ECX_AVX: u32 = 1 << 28;
const LEAF1_ECX_F16C: u32 = 1 << 29;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:ECX.PCID: hidden (shadow paging keeps no per-PCID shadows; CR4.PCIDE is refused).
const LEAF1_ECX_PCID: u32 = 1 << 17;
/// CPUID.(EAX=7,ECX=0):EBX.INVPCID: hidden with PCID.
const LEAF7_EBX_INVPCID: u32 = 1 << 10;
/// CPUID.(EAX=7,ECX=0) features whose state lives in XSAVE components. See: SDM Vol 2A CPUID
/// Table 3-8. AVX2 (EBX 5), VAES and VPCLMULQDQ (ECX 9, 10) need AVX's state.
const LEAF7_EBX_AVX: u32 = 1 << 5;
const LEAF7_ECX_AVX: u32 = (1 << 9) | (1 << 10);
/// AVX-512: EBX F, DQ, IFMA, PF, ER, CD, BW, VL; ECX VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ;
/// EDX 4VNNIW, 4FMAPS, VP2INTERSECT, FP16.
const LEAF7_EBX_AVX512: u32 =
    (1 << 16) | (1 << 17) | (1 << 21) | (1 << 26) | (1 << 27) | (1 << 28) | (1 << 30) | (1 << 31);
const LEAF7_ECX_AVX512: u32 = (1 << 1) | (1 << 6) | (1 << 11) | (1 << 12) | (1 << 14);
const LEAF7_EDX_AVX512: u32 = (1 << 2) | (1 << 3) | (1 << 8) | (1 << 23);
/// Never offered (their XCR0 components are not switched): MPX (EBX 14), PKU and OSPKE
/// (ECX 3, 4: the PKRU register), AMX (EDX 22, 24, 25).
const LEAF7_EBX_NEVER: u32 = 1 << 14;
const LEAF7_ECX_NEVER: u32 = (1 << 3) | (1 << 4);
const LEAF7_EDX_NEVER: u32 = (1 << 22) | (1 << 24) | (1 << 25);
/// CPUID.(EAX=7,ECX=1):EAX: AVX-VNNI (4) needs AVX, AVX512_BF16 (5) AVX-512.
const LEAF7_1_EAX_AVX: u32 = 1 << 4;
const LEAF7_1_EAX_AVX512: u32 = 1 << 5;
/// CPUID.80000001h:ECX.SVM.
const EXTENDED_ECX_SVM: u32 = 1 << 2;
/// CPUID.80000001h:ECX XOP (11) and FMA4 (16): VEX-like encodings on AVX's state (AMD).
const EXTENDED_ECX_AVX: u32 = (1 << 11) | (1 << 16);

fn signature_word(index: usize) -> u32 {
    u32::from_le_bytes([
        SIGNATURE[index * 4],
        SIGNATURE[index * 4 + 1],
        SIGNATURE[index * 4 + 2],
        SIGNATURE[index * 4 + 3],
    ])
}

/// The guest state some answers depend on: CPUID.1:ECX.OSXSAVE mirrors the guest's
/// CR4.OSXSAVE, CPUID.(EAX=0DH,ECX=0):EBX the size for the guest's XCR0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestCpuState {
    pub cr4: u64,
    pub xcr0: u64,
}

impl Default for GuestCpuState {
    fn default() -> GuestCpuState {
        GuestCpuState {
            cr4: 0,
            xcr0: xsave::XCR0_RESET,
        }
    }
}

/// The guest's answer to CPUID(leaf, subleaf), given the host's and the guest's CR4 and XCR0.
pub fn guest_cpuid(
    host: &dyn Fn(u32, u32) -> [u32; 4],
    leaf: u32,
    subleaf: u32,
    guest: &GuestCpuState,
) -> [u32; 4] {
    // Which XSAVE components guests may use (only looked at for the leaves that depend on it).
    let allowed = || xsave::host_support(host).map_or(0, |support| support.allowed_xcr0);
    match leaf {
        0x1 => {
            let [eax, ebx, ecx, edx] = host(leaf, subleaf);
            let allowed = allowed();
            // VMX/SMX hidden (no nested virtualization); MONITOR/MWAIT hidden (not
            // emulated); XSAVE shown when the host's extended state can be switched, with
            // OSXSAVE the guest's own CR4.OSXSAVE; AVX (and FMA, F16C, which use its state)
            // when the guest may enable AVX's state.
            let mut hidden = LEAF1_ECX_VMX
                | LEAF1_ECX_SMX
                | LEAF1_ECX_MONITOR
                | LEAF1_ECX_PCID
                | LEAF1_ECX_OSXSAVE;
            if allowed == 0 {
                hidden |= LEAF1_ECX_XSAVE;
            }
            if allowed & xsave::XCR0_AVX == 0 {
                hidden |= LEAF1_ECX_AVX | LEAF1_ECX_FMA | LEAF1_ECX_F16C;
            }
            let osxsave = if allowed != 0 && guest.cr4 & xsave::CR4_OSXSAVE != 0 {
                LEAF1_ECX_OSXSAVE
            } else {
                0
            };
            [
                eax,
                ebx,
                (ecx & !hidden) | osxsave | LEAF1_ECX_HYPERVISOR,
                edx,
            ]
        }
        0x7 if subleaf == 0 => {
            let [eax, ebx, ecx, edx] = host(leaf, subleaf);
            let allowed = allowed();
            let (mut hide_ebx, mut hide_ecx, mut hide_edx) = (
                LEAF7_EBX_INVPCID | LEAF7_EBX_NEVER,
                LEAF7_ECX_NEVER,
                LEAF7_EDX_NEVER,
            );
            if allowed & xsave::XCR0_AVX == 0 {
                hide_ebx |= LEAF7_EBX_AVX;
                hide_ecx |= LEAF7_ECX_AVX;
            }
            if allowed & xsave::XCR0_AVX512 == 0 {
                hide_ebx |= LEAF7_EBX_AVX512;
                hide_ecx |= LEAF7_ECX_AVX512;
                hide_edx |= LEAF7_EDX_AVX512;
            }
            [eax, ebx & !hide_ebx, ecx & !hide_ecx, edx & !hide_edx]
        }
        0x7 if subleaf == 1 => {
            let [eax, ebx, ecx, edx] = host(leaf, subleaf);
            let allowed = allowed();
            let mut hide_eax = 0;
            if allowed & xsave::XCR0_AVX == 0 {
                hide_eax |= LEAF7_1_EAX_AVX;
            }
            if allowed & xsave::XCR0_AVX512 == 0 {
                hide_eax |= LEAF7_1_EAX_AVX512;
            }
            [eax & !hide_eax, ebx, ecx, edx]
        }
        // XSAVE state enumeration, for the components guests may enable.
        // See: SDM Vol 1 13.2, Vol 2A CPUID leaf 0DH.
        0xD => {
            let Some(support) = xsave::host_support(host) else {
                return [0; 4];
            };
            let allowed = support.allowed_xcr0;
            match subleaf {
                // EDX:EAX the XCR0 bits the guest may set; EBX the area size for its XCR0 now;
                // ECX the size for all of them.
                0 => [
                    allowed as u32,
                    xsave::area_size(host, guest.xcr0 & allowed),
                    support.area_size,
                    (allowed >> 32) as u32,
                ],
                // XSAVEOPT, XSAVEC, XGETBV(1), XSAVES and every XSS bit: none (guests use plain
                // XSAVE in the standard form, which is all the hypervisor switches).
                1 => [0; 4],
                // Size and offset of each component the guest may enable; nothing for others.
                2..=63 if allowed & (1 << subleaf) != 0 => host(leaf, subleaf),
                _ => [0; 4],
            }
        }
        HYPERVISOR_MAX_LEAF => [
            HYPERVISOR_MAX_LEAF,
            signature_word(0),
            signature_word(1),
            signature_word(2),
        ],
        0x4000_0001..=0x4000_00FF => [0; 4],
        0x8000_0001 => {
            let [eax, ebx, ecx, edx] = host(leaf, subleaf);
            let mut hidden = EXTENDED_ECX_SVM;
            if allowed() & xsave::XCR0_AVX == 0 {
                hidden |= EXTENDED_ECX_AVX;
            }
            [eax, ebx, ecx & !hidden, edx]
        }
        // SVM feature leaf: nothing, since SVM is hidden.
        0x8000_000A => [0; 4],
        _ => host(leaf, subleaf),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: GuestCpuState = GuestCpuState {
        cr4: 0,
        xcr0: xsave::XCR0_RESET,
    };

    /// CPUID values of QEMU 7.2 `-cpu EPYC` under TCG (leaf 1 and 0x80000001), as seen by
    /// ringzero's boot log, plus SVM leaf 0x8000000A = {1, 16, 0, 1}.
    /// Leaf 1 ECX has the hypervisor bit (31, which QEMU sets for its own guests) cleared and VMX
    /// set, as on bare metal, so the test sees the policy change both. OSXSAVE is set: the
    /// hypervisor turned CR4.OSXSAVE on. Leaf 7 has AVX2 (EBX 5) and, to see it hidden,
    /// AVX512F (EBX 16) and PKU (ECX 3); leaf 0xD: x87, SSE and AVX, the AVX state at 576.
    fn epyc(leaf: u32, subleaf: u32) -> [u32; 4] {
        match (leaf, subleaf) {
            (0, _) => [0xD, 0x6874_7541, 0x444D_4163, 0x6974_6E65],
            (1, _) => [
                0x0080_0F12,
                0x0000_0800,
                (0xF6D8_3203 & !LEAF1_ECX_HYPERVISOR)
                    | LEAF1_ECX_XSAVE
                    | LEAF1_ECX_OSXSAVE
                    | LEAF1_ECX_VMX,
                0x078B_FBFF,
            ],
            (7, 0) => [0, (1 << 5) | (1 << 16) | (1 << 3), 1 << 3, 0],
            (0xD, 0) => [0x7, 832, 832, 0],
            (0xD, 1) => [0xF, 0, 0, 0],
            (0xD, 2) => [256, 576, 0, 0],
            (0x8000_0001, _) => [0x0080_0F12, 0, 0x0000_0075, 0x2FD3_FBFF],
            (0x8000_000A, _) => [1, 16, 0, 1],
            _ => [leaf, 1, 2, 3],
        }
    }

    /// The same CPU where the hypervisor could not turn XSAVE on (CR4.OSXSAVE clear).
    fn epyc_without_osxsave(leaf: u32, subleaf: u32) -> [u32; 4] {
        let mut answer = epyc(leaf, subleaf);
        if leaf == 1 {
            answer[2] &= !LEAF1_ECX_OSXSAVE;
        }
        answer
    }

    #[test]
    fn hides_virtualization_and_sets_hypervisor_bit() {
        let leaf1 = guest_cpuid(&epyc, 1, 0, &GUEST);
        assert_eq!(leaf1[2] & LEAF1_ECX_VMX, 0);
        assert_eq!(leaf1[2] & LEAF1_ECX_PCID, 0);
        assert_ne!(leaf1[2] & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(leaf1[3], 0x078B_FBFF, "EDX passes through");
        assert_eq!(
            guest_cpuid(&epyc, 0x8000_0001, 0, &GUEST)[2] & EXTENDED_ECX_SVM,
            0
        );
        assert_eq!(guest_cpuid(&epyc, 0x8000_000A, 0, &GUEST), [0; 4]);
    }

    #[test]
    fn xsave_and_avx_shown_with_osxsave_from_the_guest() {
        let leaf1 = guest_cpuid(&epyc, 1, 0, &GUEST);
        assert_ne!(leaf1[2] & LEAF1_ECX_XSAVE, 0);
        assert_ne!(leaf1[2] & LEAF1_ECX_AVX, 0);
        assert_ne!(leaf1[2] & LEAF1_ECX_F16C, 0);
        assert_eq!(
            leaf1[2] & LEAF1_ECX_OSXSAVE,
            0,
            "the guest's CR4.OSXSAVE is clear"
        );
        let enabled = GuestCpuState {
            cr4: xsave::CR4_OSXSAVE,
            xcr0: 0x7,
        };
        assert_ne!(guest_cpuid(&epyc, 1, 0, &enabled)[2] & LEAF1_ECX_OSXSAVE, 0);
    }

    #[test]
    fn xsave_hidden_when_the_host_cannot_switch_it() {
        let enabled = GuestCpuState {
            cr4: xsave::CR4_OSXSAVE,
            xcr0: 0x7,
        };
        let leaf1 = guest_cpuid(&epyc_without_osxsave, 1, 0, &enabled);
        assert_eq!(
            leaf1[2] & (LEAF1_ECX_XSAVE | LEAF1_ECX_OSXSAVE | LEAF1_ECX_AVX | LEAF1_ECX_F16C),
            0
        );
        assert_eq!(guest_cpuid(&epyc_without_osxsave, 0xD, 0, &enabled), [0; 4]);
        assert_eq!(guest_cpuid(&epyc_without_osxsave, 0xD, 2, &enabled), [0; 4]);
        assert_eq!(
            guest_cpuid(&epyc_without_osxsave, 7, 0, &enabled)[1] & (1 << 5),
            0
        );
    }

    #[test]
    fn leaf_0d_enumerates_the_allowed_components() {
        // Sizes: EBX for the guest's XCR0 (x87 only: the legacy area), ECX for all allowed.
        assert_eq!(guest_cpuid(&epyc, 0xD, 0, &GUEST), [0x7, 576, 832, 0]);
        let avx = GuestCpuState {
            cr4: xsave::CR4_OSXSAVE,
            xcr0: 0x7,
        };
        assert_eq!(guest_cpuid(&epyc, 0xD, 0, &avx), [0x7, 832, 832, 0]);
        // No XSAVEOPT/XSAVEC/XGETBV1/XSAVES, no supervisor components.
        assert_eq!(guest_cpuid(&epyc, 0xD, 1, &avx), [0; 4]);
        assert_eq!(guest_cpuid(&epyc, 0xD, 2, &avx), [256, 576, 0, 0]);
        // Components the guest may not enable: nothing.
        assert_eq!(guest_cpuid(&epyc, 0xD, 3, &avx), [0; 4]);
        assert_eq!(guest_cpuid(&epyc, 0xD, 9, &avx), [0; 4]);
        assert_eq!(guest_cpuid(&epyc, 0xD, 64, &avx), [0; 4]);
    }

    #[test]
    fn leaf_7_hides_features_whose_state_is_not_switched() {
        let [_, ebx, ecx, _] = guest_cpuid(&epyc, 7, 0, &GUEST);
        assert_ne!(ebx & (1 << 5), 0, "AVX2 stays with AVX");
        assert_eq!(
            ebx & (1 << 16),
            0,
            "AVX512F hidden: its XCR0 bits are not allowed"
        );
        assert_eq!(ecx & (1 << 3), 0, "PKU hidden");
        assert_eq!(ebx & LEAF7_EBX_INVPCID, 0);
    }

    #[test]
    fn hypervisor_leaf_has_signature() {
        let [eax, ebx, ecx, edx] = guest_cpuid(&epyc, 0x4000_0000, 0, &GUEST);
        assert_eq!(eax, HYPERVISOR_MAX_LEAF);
        let mut bytes = [0u8; 12];
        bytes[..4].copy_from_slice(&ebx.to_le_bytes());
        bytes[4..8].copy_from_slice(&ecx.to_le_bytes());
        bytes[8..].copy_from_slice(&edx.to_le_bytes());
        assert_eq!(&bytes, SIGNATURE);
        assert_eq!(guest_cpuid(&epyc, 0x4000_0005, 0, &GUEST), [0; 4]);
    }

    #[test]
    fn other_leaves_pass_through() {
        assert_eq!(guest_cpuid(&epyc, 0, 0, &GUEST), epyc(0, 0));
        assert_eq!(
            guest_cpuid(&epyc, 0x8000_0008, 0, &GUEST),
            epyc(0x8000_0008, 0)
        );
    }
}
