//! VMCS field encodings. See: SDM Vol 3D Appendix B "Field Encoding in VMCS" (B.1 16-bit,
//! B.2 64-bit, B.3 32-bit, B.4 natural-width fields). The encoding itself tells the width:
//! bits 14:13 (0 = 16-bit, 1 = 64-bit, 2 = 32-bit, 3 = natural width).

/// One VMCS field, by its architectural encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field(pub u32);

impl Field {
    /// The field's name, for diagnostics (entry failures name the offending field).
    pub fn name(self) -> &'static str {
        NAMES
            .iter()
            .find(|(field, _)| *field == self)
            .map(|(_, name)| *name)
            .unwrap_or("(unnamed field)")
    }
}

macro_rules! fields {
    ($($(#[$doc:meta])* $name:ident = $encoding:expr;)*) => {
        $($(#[$doc])* pub const $name: Field = Field($encoding);)*
        const NAMES: &[(Field, &str)] = &[$(($name, stringify!($name))),*];
    };
}

fields! {
    // B.1.1 16-bit control field.
    VIRTUAL_PROCESSOR_ID = 0x0000;
    // B.1.2 16-bit guest-state fields.
    GUEST_ES_SELECTOR = 0x0800;
    GUEST_CS_SELECTOR = 0x0802;
    GUEST_SS_SELECTOR = 0x0804;
    GUEST_DS_SELECTOR = 0x0806;
    GUEST_FS_SELECTOR = 0x0808;
    GUEST_GS_SELECTOR = 0x080A;
    GUEST_LDTR_SELECTOR = 0x080C;
    GUEST_TR_SELECTOR = 0x080E;
    // B.1.3 16-bit host-state fields.
    HOST_ES_SELECTOR = 0x0C00;
    HOST_CS_SELECTOR = 0x0C02;
    HOST_SS_SELECTOR = 0x0C04;
    HOST_DS_SELECTOR = 0x0C06;
    HOST_FS_SELECTOR = 0x0C08;
    HOST_GS_SELECTOR = 0x0C0A;
    HOST_TR_SELECTOR = 0x0C0C;
    // B.2.1 64-bit control fields.
    IO_BITMAP_A = 0x2000;
    IO_BITMAP_B = 0x2002;
    MSR_BITMAP = 0x2004;
    VM_EXIT_MSR_STORE_ADDRESS = 0x2006;
    VM_EXIT_MSR_LOAD_ADDRESS = 0x2008;
    VM_ENTRY_MSR_LOAD_ADDRESS = 0x200A;
    TSC_OFFSET = 0x2010;
    EPT_POINTER = 0x201A;
    // B.2.2 64-bit read-only data field.
    GUEST_PHYSICAL_ADDRESS = 0x2400;
    // B.2.3 64-bit guest-state fields.
    VMCS_LINK_POINTER = 0x2800;
    GUEST_IA32_DEBUGCTL = 0x2802;
    GUEST_IA32_PAT = 0x2804;
    GUEST_IA32_EFER = 0x2806;
    // B.2.4 64-bit host-state fields.
    HOST_IA32_PAT = 0x2C00;
    HOST_IA32_EFER = 0x2C02;
    // B.3.1 32-bit control fields.
    PIN_BASED_CONTROLS = 0x4000;
    PRIMARY_PROCESSOR_BASED_CONTROLS = 0x4002;
    EXCEPTION_BITMAP = 0x4004;
    PAGE_FAULT_ERROR_CODE_MASK = 0x4006;
    PAGE_FAULT_ERROR_CODE_MATCH = 0x4008;
    CR3_TARGET_COUNT = 0x400A;
    VM_EXIT_CONTROLS = 0x400C;
    VM_EXIT_MSR_STORE_COUNT = 0x400E;
    VM_EXIT_MSR_LOAD_COUNT = 0x4010;
    VM_ENTRY_CONTROLS = 0x4012;
    VM_ENTRY_MSR_LOAD_COUNT = 0x4014;
    VM_ENTRY_INTERRUPTION_INFO = 0x4016;
    VM_ENTRY_EXCEPTION_ERROR_CODE = 0x4018;
    VM_ENTRY_INSTRUCTION_LENGTH = 0x401A;
    SECONDARY_PROCESSOR_BASED_CONTROLS = 0x401E;
    // B.3.2 32-bit read-only data fields.
    VM_INSTRUCTION_ERROR = 0x4400;
    EXIT_REASON = 0x4402;
    VM_EXIT_INTERRUPTION_INFO = 0x4404;
    VM_EXIT_INTERRUPTION_ERROR_CODE = 0x4406;
    IDT_VECTORING_INFO = 0x4408;
    IDT_VECTORING_ERROR_CODE = 0x440A;
    VM_EXIT_INSTRUCTION_LENGTH = 0x440C;
    VM_EXIT_INSTRUCTION_INFO = 0x440E;
    // B.3.3 32-bit guest-state fields.
    GUEST_ES_LIMIT = 0x4800;
    GUEST_CS_LIMIT = 0x4802;
    GUEST_SS_LIMIT = 0x4804;
    GUEST_DS_LIMIT = 0x4806;
    GUEST_FS_LIMIT = 0x4808;
    GUEST_GS_LIMIT = 0x480A;
    GUEST_LDTR_LIMIT = 0x480C;
    GUEST_TR_LIMIT = 0x480E;
    GUEST_GDTR_LIMIT = 0x4810;
    GUEST_IDTR_LIMIT = 0x4812;
    GUEST_ES_ACCESS_RIGHTS = 0x4814;
    GUEST_CS_ACCESS_RIGHTS = 0x4816;
    GUEST_SS_ACCESS_RIGHTS = 0x4818;
    GUEST_DS_ACCESS_RIGHTS = 0x481A;
    GUEST_FS_ACCESS_RIGHTS = 0x481C;
    GUEST_GS_ACCESS_RIGHTS = 0x481E;
    GUEST_LDTR_ACCESS_RIGHTS = 0x4820;
    GUEST_TR_ACCESS_RIGHTS = 0x4822;
    GUEST_INTERRUPTIBILITY_STATE = 0x4824;
    GUEST_ACTIVITY_STATE = 0x4826;
    GUEST_IA32_SYSENTER_CS = 0x482A;
    VMX_PREEMPTION_TIMER_VALUE = 0x482E;
    // B.3.4 32-bit host-state field.
    HOST_IA32_SYSENTER_CS = 0x4C00;
    // B.4.1 natural-width control fields.
    CR0_GUEST_HOST_MASK = 0x6000;
    CR4_GUEST_HOST_MASK = 0x6002;
    CR0_READ_SHADOW = 0x6004;
    CR4_READ_SHADOW = 0x6006;
    // B.4.2 natural-width read-only data fields.
    EXIT_QUALIFICATION = 0x6400;
    GUEST_LINEAR_ADDRESS = 0x640A;
    // B.4.3 natural-width guest-state fields.
    GUEST_CR0 = 0x6800;
    GUEST_CR3 = 0x6802;
    GUEST_CR4 = 0x6804;
    GUEST_ES_BASE = 0x6806;
    GUEST_CS_BASE = 0x6808;
    GUEST_SS_BASE = 0x680A;
    GUEST_DS_BASE = 0x680C;
    GUEST_FS_BASE = 0x680E;
    GUEST_GS_BASE = 0x6810;
    GUEST_LDTR_BASE = 0x6812;
    GUEST_TR_BASE = 0x6814;
    GUEST_GDTR_BASE = 0x6816;
    GUEST_IDTR_BASE = 0x6818;
    GUEST_DR7 = 0x681A;
    GUEST_RSP = 0x681C;
    GUEST_RIP = 0x681E;
    GUEST_RFLAGS = 0x6820;
    GUEST_PENDING_DEBUG_EXCEPTIONS = 0x6822;
    GUEST_IA32_SYSENTER_ESP = 0x6824;
    GUEST_IA32_SYSENTER_EIP = 0x6826;
    // B.4.4 natural-width host-state fields.
    HOST_CR0 = 0x6C00;
    HOST_CR3 = 0x6C02;
    HOST_CR4 = 0x6C04;
    HOST_FS_BASE = 0x6C06;
    HOST_GS_BASE = 0x6C08;
    HOST_TR_BASE = 0x6C0A;
    HOST_GDTR_BASE = 0x6C0C;
    HOST_IDTR_BASE = 0x6C0E;
    HOST_IA32_SYSENTER_ESP = 0x6C10;
    HOST_IA32_SYSENTER_EIP = 0x6C12;
    HOST_RSP = 0x6C14;
    HOST_RIP = 0x6C16;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bits 14:13 of an encoding give its width (SDM Vol 3D B, Table B-1 note).
    fn width(field: Field) -> u32 {
        (field.0 >> 13) & 3
    }

    #[test]
    fn widths_follow_the_encoding_rule() {
        assert_eq!(width(GUEST_CS_SELECTOR), 0);
        assert_eq!(width(EPT_POINTER), 1);
        assert_eq!(width(EXIT_REASON), 2);
        assert_eq!(width(GUEST_RIP), 3);
        assert_eq!(width(HOST_RIP), 3);
    }

    #[test]
    fn names_for_diagnostics() {
        assert_eq!(GUEST_TR_ACCESS_RIGHTS.name(), "GUEST_TR_ACCESS_RIGHTS");
        assert_eq!(Field(0x7FFF).name(), "(unnamed field)");
        let mut encodings: alloc::vec::Vec<u32> = NAMES.iter().map(|(field, _)| field.0).collect();
        encodings.sort_unstable();
        encodings.dedup();
        assert_eq!(encodings.len(), NAMES.len(), "no encoding appears twice");
    }
}
