//! The guest's extended processor state (XSAVE): which state components (XCR0 bits) a guest may
//! enable, how large its save area is, and what its XSETBV does. Pure functions over the host's
//! CPUID; the backends keep the state itself (`ringzero_x86::extended_state`).
//!
//! Policy: a guest may enable x87, SSE and AVX, and the three AVX-512 components together, when
//! the host has them (the hypervisor switches exactly those). Nothing else: no MPX, PKRU, AMX or
//! supervisor components (XSS), and no compacted or optimized forms (XSAVEOPT, XSAVEC, XSAVES,
//! XGETBV with ECX = 1 are reported absent in CPUID 0DH subleaf 1, `cpuid.rs`).
//!
//! See: SDM Vol 1 13 "Managing State Using the XSAVE Feature Set" (13.2 enumeration, 13.3
//! enabling, 13.4 the area), Vol 2C "XSETBV".

/// XCR0 bits (state components). See: SDM Vol 1 13.1.
pub const XCR0_X87: u64 = 1 << 0;
pub const XCR0_SSE: u64 = 1 << 1;
pub const XCR0_AVX: u64 = 1 << 2;
/// AVX-512: opmask registers, upper halves of ZMM0-15, ZMM16-31.
pub const XCR0_OPMASK: u64 = 1 << 5;
pub const XCR0_ZMM_HI256: u64 = 1 << 6;
pub const XCR0_HI16_ZMM: u64 = 1 << 7;
pub const XCR0_AVX512: u64 = XCR0_OPMASK | XCR0_ZMM_HI256 | XCR0_HI16_ZMM;
/// Every component the hypervisor lets a guest enable (when the host has it).
pub const XCR0_POLICY: u64 = XCR0_X87 | XCR0_SSE | XCR0_AVX | XCR0_AVX512;
/// XCR0 after reset and INIT: x87 only. See: SDM Vol 3A 9.1.1 Table 9-1.
pub const XCR0_RESET: u64 = XCR0_X87;
/// The legacy region (512 bytes) and the XSAVE header (64): the area for x87 and SSE.
pub const LEGACY_AREA_SIZE: u32 = 512 + 64;

/// CPUID.1:ECX.XSAVE and OSXSAVE (OSXSAVE mirrors the running CR4.OSXSAVE).
const LEAF1_ECX_XSAVE: u32 = 1 << 26;
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;

/// What the host offers guests: the XCR0 bits they may set and the save area that holds them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XsaveSupport {
    /// The XCR0 bits a guest may set: [`XCR0_POLICY`] & what the host supports, made
    /// consistent (AVX-512 only whole and with AVX). Always has x87 and SSE.
    pub allowed_xcr0: u64,
    /// Bytes of the standard-form area for every allowed component.
    pub area_size: u32,
}

/// What a new vCPU's extended state is built with (`GuestExtendedState::new`): the XCR0 bits
/// guests may enable and the XSAVE area's size for them, or `None` (FXSAVE) without XSAVE.
pub fn guest_area(host: &dyn Fn(u32, u32) -> [u32; 4]) -> Option<(u64, u32)> {
    host_support(host).map(|support| (support.allowed_xcr0, support.area_size))
}

/// The host's XSAVE support for guests, from its CPUID (`host(leaf, subleaf)`), or `None` when
/// the host cannot XSAVE: no XSAVE, or the hypervisor did not turn CR4.OSXSAVE on, or CPUID
/// has no leaf 0DH. Then guests see no XSAVE and the backends switch x87/SSE with FXSAVE.
pub fn host_support(host: &dyn Fn(u32, u32) -> [u32; 4]) -> Option<XsaveSupport> {
    if host(0, 0)[0] < 0xD {
        return None;
    }
    let leaf1_ecx = host(1, 0)[2];
    if leaf1_ecx & LEAF1_ECX_XSAVE == 0 || leaf1_ecx & LEAF1_ECX_OSXSAVE == 0 {
        return None;
    }
    let [eax, _, _, edx] = host(0xD, 0);
    let supported = (u64::from(edx) << 32) | u64::from(eax);
    let mut allowed = supported & XCR0_POLICY;
    if allowed & (XCR0_X87 | XCR0_SSE) != XCR0_X87 | XCR0_SSE {
        return None;
    }
    if allowed & XCR0_AVX == 0 || allowed & XCR0_AVX512 != XCR0_AVX512 {
        allowed &= !XCR0_AVX512;
    }
    Some(XsaveSupport {
        allowed_xcr0: allowed,
        area_size: area_size(host, allowed),
    })
}

/// Bytes of the standard-form XSAVE area holding the components of `xcr0`: the legacy region
/// and header, and each extended component i >= 2 at the offset CPUID (EAX=0DH, ECX=i) EBX
/// gives, EAX bytes long. See: SDM Vol 1 13.4.3.
pub fn area_size(host: &dyn Fn(u32, u32) -> [u32; 4], xcr0: u64) -> u32 {
    (2..64u32)
        .filter(|component| xcr0 & (1 << component) != 0)
        .map(|component| {
            let [size, offset, _, _] = host(0xD, component);
            offset.saturating_add(size)
        })
        .fold(LEGACY_AREA_SIZE, u32::max)
}

/// What a guest's XSETBV earns instead of completing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XsetbvFault {
    /// #UD: CR4.OSXSAVE is clear (or the guest cannot have XSAVE at all).
    InvalidOpcode,
    /// #GP(0): CPL > 0, ECX is not 0, or the value is not a valid XCR0 the guest may set.
    GeneralProtection,
}

/// CR4.OSXSAVE.
pub const CR4_OSXSAVE: u64 = 1 << 18;

/// Checks a guest's XSETBV (ECX = `index`, EDX:EAX = `value`) as the CPU would, against the
/// bits the hypervisor allows (`allowed`, `None`: the guest has no XSAVE). Returns the new
/// XCR0. See: SDM Vol 2C "XSETBV" (Operation, Protected Mode Exceptions), Vol 1 13.3.
pub fn check_xsetbv(
    index: u32,
    value: u64,
    cpl: u8,
    cr4: u64,
    allowed: Option<u64>,
) -> Result<u64, XsetbvFault> {
    let Some(allowed) = allowed else {
        return Err(XsetbvFault::InvalidOpcode);
    };
    if cr4 & CR4_OSXSAVE == 0 {
        return Err(XsetbvFault::InvalidOpcode);
    }
    if cpl != 0 || index != 0 {
        return Err(XsetbvFault::GeneralProtection);
    }
    let valid = value & !allowed == 0
        && value & XCR0_X87 != 0
        // AVX needs SSE; AVX-512 needs AVX (and so SSE), and its three bits go together.
        && (value & XCR0_AVX == 0 || value & XCR0_SSE != 0)
        && (value & XCR0_AVX512 == 0
            || (value & XCR0_AVX512 == XCR0_AVX512 && value & XCR0_AVX != 0));
    if valid {
        Ok(value)
    } else {
        Err(XsetbvFault::GeneralProtection)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// QEMU 7.2 `-cpu EPYC`: XSAVE, OSXSAVE (the hypervisor set CR4.OSXSAVE), AVX; XCR0 bits
    /// x87, SSE, AVX; the AVX component at 576, 256 bytes.
    pub(crate) fn epyc(leaf: u32, subleaf: u32) -> [u32; 4] {
        match (leaf, subleaf) {
            (0, _) => [0xD, 0, 0, 0],
            (1, _) => [0, 0, LEAF1_ECX_XSAVE | LEAF1_ECX_OSXSAVE | (1 << 28), 0],
            (0xD, 0) => [0x7, 832, 832, 0],
            (0xD, 2) => [256, 576, 0, 0],
            _ => [0; 4],
        }
    }

    /// A Skylake-X-like host: x87, SSE, AVX, MPX (3, 4), AVX-512 (5-7), PKRU (9).
    fn skylake_x(leaf: u32, subleaf: u32) -> [u32; 4] {
        match (leaf, subleaf) {
            (0xD, 0) => [0x2FF, 2696, 2696, 0],
            (0xD, 2) => [256, 576, 0, 0],
            (0xD, 3) => [64, 960, 0, 0],
            (0xD, 4) => [64, 1024, 0, 0],
            (0xD, 5) => [64, 1088, 0, 0],
            (0xD, 6) => [512, 1152, 0, 0],
            (0xD, 7) => [1024, 1664, 0, 0],
            (0xD, 9) => [8, 2688, 0, 0],
            _ => epyc(leaf, subleaf),
        }
    }

    #[test]
    fn host_support_follows_cpuid_and_policy() {
        assert_eq!(
            host_support(&epyc),
            Some(XsaveSupport {
                allowed_xcr0: 0x7,
                area_size: 832
            })
        );
        // MPX and PKRU are left out; AVX-512's area ends at 1664 + 1024.
        assert_eq!(
            host_support(&skylake_x),
            Some(XsaveSupport {
                allowed_xcr0: 0xE7,
                area_size: 2688
            })
        );
    }

    #[test]
    fn no_host_support_without_osxsave_or_leaf_0d() {
        let no_osxsave = |leaf, subleaf| match leaf {
            1 => [0, 0, LEAF1_ECX_XSAVE, 0],
            _ => epyc(leaf, subleaf),
        };
        assert_eq!(host_support(&no_osxsave), None);
        let old_cpu = |leaf, subleaf| match leaf {
            0 => [0xB, 0, 0, 0],
            _ => epyc(leaf, subleaf),
        };
        assert_eq!(host_support(&old_cpu), None);
    }

    #[test]
    fn partial_avx512_is_not_offered() {
        let odd = |leaf, subleaf| match (leaf, subleaf) {
            (0xD, 0) => [0x67, 0, 0, 0],
            _ => skylake_x(leaf, subleaf),
        };
        assert_eq!(host_support(&odd).unwrap().allowed_xcr0, 0x7);
    }

    #[test]
    fn area_size_of_legacy_only() {
        assert_eq!(area_size(&epyc, 0x3), LEGACY_AREA_SIZE);
        assert_eq!(area_size(&epyc, 0x7), 832);
    }

    #[test]
    fn xsetbv_accepts_valid_values() {
        let os = CR4_OSXSAVE;
        assert_eq!(check_xsetbv(0, 0x7, 0, os, Some(0x7)), Ok(0x7));
        assert_eq!(check_xsetbv(0, 0x3, 0, os, Some(0x7)), Ok(0x3));
        assert_eq!(check_xsetbv(0, 0x1, 0, os, Some(0x7)), Ok(0x1));
        assert_eq!(check_xsetbv(0, 0xE7, 0, os, Some(0xE7)), Ok(0xE7));
    }

    #[test]
    fn xsetbv_faults_as_the_sdm_says() {
        use XsetbvFault::*;
        let os = CR4_OSXSAVE;
        // #UD: CR4.OSXSAVE clear, or no XSAVE for the guest at all.
        assert_eq!(check_xsetbv(0, 0x7, 0, 0, Some(0x7)), Err(InvalidOpcode));
        assert_eq!(check_xsetbv(0, 0x3, 0, os, None), Err(InvalidOpcode));
        // #GP: CPL 3, ECX != 0.
        assert_eq!(
            check_xsetbv(0, 0x7, 3, os, Some(0x7)),
            Err(GeneralProtection)
        );
        assert_eq!(
            check_xsetbv(1, 0x1, 0, os, Some(0x7)),
            Err(GeneralProtection)
        );
        // #GP: x87 cleared, AVX without SSE, bits not allowed, AVX-512 partial or without AVX.
        assert_eq!(
            check_xsetbv(0, 0x6, 0, os, Some(0x7)),
            Err(GeneralProtection)
        );
        assert_eq!(
            check_xsetbv(0, 0x5, 0, os, Some(0x7)),
            Err(GeneralProtection)
        );
        assert_eq!(
            check_xsetbv(0, 0xE7, 0, os, Some(0x7)),
            Err(GeneralProtection)
        );
        assert_eq!(
            check_xsetbv(0, 0x1 << 9 | 3, 0, os, Some(0x7)),
            Err(GeneralProtection)
        );
        assert_eq!(
            check_xsetbv(0, 0x27, 0, os, Some(0xE7)),
            Err(GeneralProtection)
        );
        assert_eq!(
            check_xsetbv(0, 0xE3, 0, os, Some(0xE7)),
            Err(GeneralProtection)
        );
        assert_eq!(
            check_xsetbv(0, 1 << 32 | 7, 0, os, Some(0x7)),
            Err(GeneralProtection)
        );
    }
}
