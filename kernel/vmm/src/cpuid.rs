//! What a guest sees when it executes CPUID: the host's answer with the virtualization
//! extensions hidden, the hypervisor-present bit set, and ringzero's own leaves at
//! 0x4000_0000. Documented in docs/guest-interface.md.
//!
//! See: SDM Vol 2A 3.3 "CPUID"; APM Vol 3 Appendix E; the hypervisor CPUID range
//! 0x4000_0000-0x4000_00FF is reserved for hypervisors by convention (Intel and AMD leave it
//! unused; Linux's `arch/x86/kernel/cpu/hypervisor.c` reads it).

/// The highest hypervisor leaf ringzero answers.
pub const HYPERVISOR_MAX_LEAF: u32 = 0x4000_0000;
/// The 12-byte signature in EBX, ECX, EDX of leaf 0x4000_0000.
pub const SIGNATURE: &[u8; 12] = b"ringzero-hv\0";

/// CPUID.1:ECX bits.
const LEAF1_ECX_VMX: u32 = 1 << 5;
const LEAF1_ECX_MONITOR: u32 = 1 << 3;
const LEAF1_ECX_SMX: u32 = 1 << 6;
const LEAF1_ECX_XSAVE: u32 = 1 << 26;
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
const LEAF1_ECX_AVX: u32 = 1 << 28;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:ECX.PCID: hidden (shadow paging keeps no per-PCID shadows; CR4.PCIDE is refused).
const LEAF1_ECX_PCID: u32 = 1 << 17;
/// CPUID.(EAX=7,ECX=0):EBX.INVPCID: hidden with PCID.
const LEAF7_EBX_INVPCID: u32 = 1 << 10;
/// CPUID.80000001h:ECX.SVM.
const EXTENDED_ECX_SVM: u32 = 1 << 2;

fn signature_word(index: usize) -> u32 {
    u32::from_le_bytes([
        SIGNATURE[index * 4],
        SIGNATURE[index * 4 + 1],
        SIGNATURE[index * 4 + 2],
        SIGNATURE[index * 4 + 3],
    ])
}

/// The guest's answer to CPUID(leaf, subleaf), given the host's.
pub fn guest_cpuid(host: &dyn Fn(u32, u32) -> [u32; 4], leaf: u32, subleaf: u32) -> [u32; 4] {
    match leaf {
        0x1 => {
            let [eax, ebx, ecx, edx] = host(leaf, subleaf);
            // VMX/SMX hidden (no nested virtualization); MONITOR/MWAIT hidden (not
            // emulated); XSAVE/AVX hidden until the guest's extended state is kept apart from the
            // hypervisor's.
            let hidden = LEAF1_ECX_VMX
                | LEAF1_ECX_SMX
                | LEAF1_ECX_MONITOR
                | LEAF1_ECX_XSAVE
                | LEAF1_ECX_OSXSAVE
                | LEAF1_ECX_AVX
                | LEAF1_ECX_PCID;
            [eax, ebx, (ecx & !hidden) | LEAF1_ECX_HYPERVISOR, edx]
        }
        0x7 if subleaf == 0 => {
            let [eax, ebx, ecx, edx] = host(leaf, subleaf);
            [eax, ebx & !LEAF7_EBX_INVPCID, ecx, edx]
        }
        // XSAVE state enumeration: nothing while XSAVE is hidden.
        0xD => [0; 4],
        HYPERVISOR_MAX_LEAF => [
            HYPERVISOR_MAX_LEAF,
            signature_word(0),
            signature_word(1),
            signature_word(2),
        ],
        0x4000_0001..=0x4000_00FF => [0; 4],
        0x8000_0001 => {
            let [eax, ebx, ecx, edx] = host(leaf, subleaf);
            [eax, ebx, ecx & !EXTENDED_ECX_SVM, edx]
        }
        // SVM feature leaf: nothing, since SVM is hidden.
        0x8000_000A => [0; 4],
        _ => host(leaf, subleaf),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CPUID values of QEMU 7.2 `-cpu EPYC` under TCG (leaf 1 and 0x80000001), as seen by
    /// ringzero's boot log, plus SVM leaf 0x8000000A = {1, 16, 0, 1}.
    /// Leaf 1 ECX has the hypervisor bit (31, which QEMU sets for its own guests) cleared and VMX
    /// set, as on bare metal, so the test sees the policy change both.
    fn epyc(leaf: u32, _subleaf: u32) -> [u32; 4] {
        match leaf {
            0 => [0xD, 0x6874_7541, 0x444D_4163, 0x6974_6E65],
            1 => [
                0x0080_0F12,
                0x0000_0800,
                (0xF6D8_3203 & !LEAF1_ECX_HYPERVISOR) | LEAF1_ECX_XSAVE | LEAF1_ECX_VMX,
                0x078B_FBFF,
            ],
            0x8000_0001 => [0x0080_0F12, 0, 0x0000_0075, 0x2FD3_FBFF],
            0x8000_000A => [1, 16, 0, 1],
            _ => [leaf, 1, 2, 3],
        }
    }

    #[test]
    fn hides_virtualization_and_sets_hypervisor_bit() {
        let leaf1 = guest_cpuid(&epyc, 1, 0);
        assert_eq!(leaf1[2] & LEAF1_ECX_VMX, 0);
        assert_eq!(leaf1[2] & LEAF1_ECX_XSAVE, 0);
        assert_eq!(leaf1[2] & LEAF1_ECX_PCID, 0);
        assert_ne!(leaf1[2] & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(leaf1[3], 0x078B_FBFF, "EDX passes through");
        assert_eq!(guest_cpuid(&epyc, 0x8000_0001, 0)[2] & EXTENDED_ECX_SVM, 0);
        assert_eq!(guest_cpuid(&epyc, 0x8000_000A, 0), [0; 4]);
    }

    #[test]
    fn hypervisor_leaf_has_signature() {
        let [eax, ebx, ecx, edx] = guest_cpuid(&epyc, 0x4000_0000, 0);
        assert_eq!(eax, HYPERVISOR_MAX_LEAF);
        let mut bytes = [0u8; 12];
        bytes[..4].copy_from_slice(&ebx.to_le_bytes());
        bytes[4..8].copy_from_slice(&ecx.to_le_bytes());
        bytes[8..].copy_from_slice(&edx.to_le_bytes());
        assert_eq!(&bytes, SIGNATURE);
        assert_eq!(guest_cpuid(&epyc, 0x4000_0005, 0), [0; 4]);
    }

    #[test]
    fn other_leaves_pass_through() {
        assert_eq!(guest_cpuid(&epyc, 0, 0), epyc(0, 0));
        assert_eq!(guest_cpuid(&epyc, 7, 0), epyc(7, 0));
    }
}
