//! Intel VT-x capability decoding: the IA32_VMX_* capability MSRs and IA32_FEATURE_CONTROL,
//! turned into the facts the hypervisor decides on (EPT, VPID, unrestricted guest, control
//! settings the CPU allows).
//!
//! Manual: Intel SDM (combined volumes, 2023 numbering), Vol 3C chapter 24 "Introduction to VMX
//! Operation" (24.6 discovering support, 24.7 enabling), chapter 25 "Virtual Machine Control
//! Structures" (25.6 VM-execution controls, 25.7 VM-exit controls, 25.8 VM-entry controls),
//! and Vol 3D Appendix A "VMX Capability Reporting Facility" (A.1 to A.10).
//!
//! Pure decoders: the kernel reads the MSRs (only those that exist, see
//! [`basic_has_true_controls`], [`procbased_allows_secondary`] and
//! [`secondary_allows_ept_or_vpid`]) and passes the raw values in a [`VmxMsrs`].

use core::fmt;

/// CPUID.1:ECX bit 5: the processor supports VMX.
// See: SDM Vol 3C 24.6 (Discovering Support for VMX)
pub const CPUID_1_ECX_VMX: u32 = 1 << 5;

// See: SDM Vol 4 Table 2-2 (IA-32 Architectural MSRs) for every MSR number below.
/// IA32_FEATURE_CONTROL: firmware's lock and enable bits for VMX. See: SDM Vol 3C 24.7
pub const IA32_FEATURE_CONTROL: u32 = 0x3A;
/// IA32_VMX_BASIC. See: SDM Vol 3D A.1
pub const IA32_VMX_BASIC: u32 = 0x480;
/// IA32_VMX_PINBASED_CTLS. See: SDM Vol 3D A.3.1
pub const IA32_VMX_PINBASED_CTLS: u32 = 0x481;
/// IA32_VMX_PROCBASED_CTLS. See: SDM Vol 3D A.3.2
pub const IA32_VMX_PROCBASED_CTLS: u32 = 0x482;
/// IA32_VMX_EXIT_CTLS. See: SDM Vol 3D A.4
pub const IA32_VMX_EXIT_CTLS: u32 = 0x483;
/// IA32_VMX_ENTRY_CTLS. See: SDM Vol 3D A.5
pub const IA32_VMX_ENTRY_CTLS: u32 = 0x484;
/// IA32_VMX_MISC. See: SDM Vol 3D A.6
pub const IA32_VMX_MISC: u32 = 0x485;
/// IA32_VMX_CR0_FIXED0. See: SDM Vol 3D A.7
pub const IA32_VMX_CR0_FIXED0: u32 = 0x486;
/// IA32_VMX_CR0_FIXED1. See: SDM Vol 3D A.7
pub const IA32_VMX_CR0_FIXED1: u32 = 0x487;
/// IA32_VMX_CR4_FIXED0. See: SDM Vol 3D A.8
pub const IA32_VMX_CR4_FIXED0: u32 = 0x488;
/// IA32_VMX_CR4_FIXED1. See: SDM Vol 3D A.8
pub const IA32_VMX_CR4_FIXED1: u32 = 0x489;
/// IA32_VMX_PROCBASED_CTLS2 (exists only if [`procbased_allows_secondary`]). See: SDM Vol 3D A.3.3
pub const IA32_VMX_PROCBASED_CTLS2: u32 = 0x48B;
/// IA32_VMX_EPT_VPID_CAP (exists only if [`secondary_allows_ept_or_vpid`]). See: SDM Vol 3D A.10
pub const IA32_VMX_EPT_VPID_CAP: u32 = 0x48C;
/// IA32_VMX_TRUE_PINBASED_CTLS (exists only if [`basic_has_true_controls`]). See: SDM Vol 3D A.3.1
pub const IA32_VMX_TRUE_PINBASED_CTLS: u32 = 0x48D;
/// IA32_VMX_TRUE_PROCBASED_CTLS (exists only if [`basic_has_true_controls`]). See: SDM Vol 3D A.3.2
pub const IA32_VMX_TRUE_PROCBASED_CTLS: u32 = 0x48E;
/// IA32_VMX_TRUE_EXIT_CTLS (exists only if [`basic_has_true_controls`]). See: SDM Vol 3D A.4
pub const IA32_VMX_TRUE_EXIT_CTLS: u32 = 0x48F;
/// IA32_VMX_TRUE_ENTRY_CTLS (exists only if [`basic_has_true_controls`]). See: SDM Vol 3D A.5
pub const IA32_VMX_TRUE_ENTRY_CTLS: u32 = 0x490;

/// IA32_FEATURE_CONTROL bit 0: lock; once set, the MSR cannot be written until reset and
/// VMXON faults unless the lock is set.
// See: SDM Vol 3C 24.7 (Enabling and Entering VMX Operation)
pub const FEATURE_CONTROL_LOCK: u64 = 1 << 0;
/// IA32_FEATURE_CONTROL bit 2: enable VMX outside SMX operation.
// See: SDM Vol 3C 24.7 (Enabling and Entering VMX Operation)
pub const FEATURE_CONTROL_VMX_OUTSIDE_SMX: u64 = 1 << 2;

/// Pin-based control bit 6: activate VMX-preemption timer.
// See: SDM Vol 3C 25.6.1 (Pin-Based VM-Execution Controls)
pub const PIN_BASED_PREEMPTION_TIMER: u32 = 1 << 6;
/// Primary processor-based control bit 25: use I/O bitmaps.
// See: SDM Vol 3C 25.6.2 (Processor-Based VM-Execution Controls)
pub const PROCESSOR_BASED_IO_BITMAPS: u32 = 1 << 25;
/// Primary processor-based control bit 28: use MSR bitmaps.
// See: SDM Vol 3C 25.6.2 (Processor-Based VM-Execution Controls)
pub const PROCESSOR_BASED_MSR_BITMAPS: u32 = 1 << 28;
/// Primary processor-based control bit 31: activate secondary controls.
// See: SDM Vol 3C 25.6.2 (Processor-Based VM-Execution Controls)
pub const PROCESSOR_BASED_ACTIVATE_SECONDARY: u32 = 1 << 31;
/// Secondary processor-based control bit 1: enable EPT.
// See: SDM Vol 3C 25.6.2 (Table: Definitions of Secondary Processor-Based VM-Execution Controls)
pub const SECONDARY_ENABLE_EPT: u32 = 1 << 1;
/// Secondary processor-based control bit 5: enable VPID.
// See: SDM Vol 3C 25.6.2 (Table: Definitions of Secondary Processor-Based VM-Execution Controls)
pub const SECONDARY_ENABLE_VPID: u32 = 1 << 5;
/// Secondary processor-based control bit 7: unrestricted guest (requires enable EPT).
// See: SDM Vol 3C 25.6.2 (Table: Definitions of Secondary Processor-Based VM-Execution Controls)
pub const SECONDARY_UNRESTRICTED_GUEST: u32 = 1 << 7;

/// The memory type encoding for write-back (IA32_VMX_BASIC bits 53:50).
// See: SDM Vol 3D A.1 (Basic VMX Information: 6 = write-back)
const MEMORY_TYPE_WRITE_BACK: u64 = 6;

/// Whether bit `index` of `value` is set (out-of-range indexes read as clear).
fn bit(value: u64, index: u32) -> bool {
    value
        .checked_shr(index)
        .is_some_and(|shifted| shifted & 1 != 0)
}

/// IA32_VMX_BASIC bit 55: the IA32_VMX_TRUE_* control MSRs (0x48D to 0x490) exist, and
/// default-1 controls may be cleared as they report.
// See: SDM Vol 3D A.1 (Basic VMX Information) and A.2 (Reserved Controls and Default Settings)
pub fn basic_has_true_controls(basic: u64) -> bool {
    bit(basic, 55)
}

/// IA32_VMX_PROCBASED_CTLS allowed-1 (high dword) bit 31: "activate secondary controls" may be
/// 1, so IA32_VMX_PROCBASED_CTLS2 (0x48B) exists.
// See: SDM Vol 3D A.3.2 (Primary Processor-Based VM-Execution Controls) and A.3.3
pub fn procbased_allows_secondary(procbased_ctls: u64) -> bool {
    bit(procbased_ctls, 32 + 31)
}

/// IA32_VMX_PROCBASED_CTLS2 allowed-1 bit 1 (enable EPT) or bit 5 (enable VPID): then
/// IA32_VMX_EPT_VPID_CAP (0x48C) exists.
// See: SDM Vol 3D A.10 (VPID and EPT Capabilities)
pub fn secondary_allows_ept_or_vpid(procbased_ctls2: u64) -> bool {
    bit(procbased_ctls2, 32 + 1) || bit(procbased_ctls2, 32 + 5)
}

/// Raw MSR values as read by the kernel; Options are None when the MSR does not exist.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmxMsrs {
    pub feature_control: u64,
    pub basic: u64,
    pub pinbased_ctls: u64,
    pub procbased_ctls: u64,
    pub exit_ctls: u64,
    pub entry_ctls: u64,
    pub misc: u64,
    pub cr0_fixed0: u64,
    pub cr0_fixed1: u64,
    pub cr4_fixed0: u64,
    pub cr4_fixed1: u64,
    pub procbased_ctls2: Option<u64>,
    pub ept_vpid_cap: Option<u64>,
    pub true_pinbased_ctls: Option<u64>,
    pub true_procbased_ctls: Option<u64>,
    pub true_exit_ctls: Option<u64>,
    pub true_entry_ctls: Option<u64>,
}

/// A VM-execution control set: allowed-0 (bits that must be 1) in the low dword, allowed-1
/// (bits that may be 1) in the high dword. SDM A.3.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllowedControls {
    /// Allowed 0-settings: a bit set here must be 1 in the control field.
    pub must_be_one: u32,
    /// Allowed 1-settings: a bit clear here must be 0 in the control field.
    pub may_be_one: u32,
}

impl AllowedControls {
    /// Splits a capability MSR: bits 31:0 are the allowed 0-settings, bits 63:32 the allowed
    /// 1-settings.
    // See: SDM Vol 3D A.3.1 (the same layout serves A.3.2, A.3.3, A.4 and A.5)
    pub fn from_msr(value: u64) -> Self {
        AllowedControls {
            must_be_one: (value & 0xFFFF_FFFF) as u32,
            may_be_one: (value >> 32) as u32,
        }
    }

    /// `requested | must_be_one`, or Err(bits requested that the CPU does not allow).
    ///
    /// The error mask is every bit of the adjusted value outside `may_be_one`; on a consistent
    /// MSR that is exactly the requested bits the CPU forbids (a contradictory MSR whose
    /// must-be-one bits are not allowed either shows those bits too, since no setting works).
    // See: SDM Vol 3D A.2 (Reserved Controls and Default Settings: the software algorithm)
    pub fn adjust(self, requested: u32) -> Result<u32, u32> {
        let adjusted = requested | self.must_be_one;
        let not_allowed = adjusted & !self.may_be_one;
        if not_allowed == 0 {
            Ok(adjusted)
        } else {
            Err(not_allowed)
        }
    }

    /// Whether every bit of `controls` may be set to 1.
    pub fn allows(self, controls: u32) -> bool {
        self.may_be_one & controls == controls
    }
}

/// What firmware left in IA32_FEATURE_CONTROL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeatureControlState {
    /// Locked with VMX outside SMX enabled: VMXON may be executed.
    Enabled,
    /// Locked with VMX outside SMX disabled: VMX is off until reset (refuse).
    LockedOff,
    /// firmware left it unlocked: write this value (lock + VMX outside SMX)
    UnlockedNeedsEnable { new_value: u64 },
}

/// Classifies IA32_FEATURE_CONTROL. An unlocked MSR keeps its other bits (for example SGX
/// enables) and gains the lock and VMX-outside-SMX bits: VMXON faults while the lock is clear.
// See: SDM Vol 3C 24.7 (Enabling and Entering VMX Operation)
pub fn feature_control_state(value: u64) -> FeatureControlState {
    let locked = value & FEATURE_CONTROL_LOCK != 0;
    let vmx_outside_smx = value & FEATURE_CONTROL_VMX_OUTSIDE_SMX != 0;
    match (locked, vmx_outside_smx) {
        (true, true) => FeatureControlState::Enabled,
        (true, false) => FeatureControlState::LockedOff,
        (false, _) => FeatureControlState::UnlockedNeedsEnable {
            new_value: value | FEATURE_CONTROL_LOCK | FEATURE_CONTROL_VMX_OUTSIDE_SMX,
        },
    }
}

/// The decoded VMX capabilities.
///
/// `ept`, `vpid` and `unrestricted_guest` are true only when the feature is usable: the
/// primary controls allow "activate secondary controls" and the secondary allowed-1 bit is set
/// (unrestricted guest additionally needs EPT, which VM entry requires with it). The `ept_*`
/// and `invept*` flags are false unless `ept`, the `invvpid*` flags false unless `vpid`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmxCapabilities {
    pub revision_id: u32,
    pub vmcs_size: u32,
    pub vmcs_memory_type_write_back: bool,
    pub true_controls: bool,
    pub pinbased: AllowedControls,
    pub procbased: AllowedControls,
    pub procbased2: AllowedControls, /* zeros if absent */
    pub exit: AllowedControls,
    pub entry: AllowedControls,
    pub ept: bool,
    pub vpid: bool,
    pub unrestricted_guest: bool,
    pub preemption_timer: bool,
    pub preemption_timer_rate_shift: u8,
    pub msr_bitmaps: bool,
    pub io_bitmaps: bool,
    pub ept_page_walk_4: bool,
    pub ept_write_back: bool,
    pub ept_uncacheable: bool,
    pub ept_2mib_pages: bool,
    pub ept_1gib_pages: bool,
    pub ept_accessed_dirty: bool,
    pub invept: bool,
    pub invept_single_context: bool,
    pub invept_all_context: bool,
    pub invvpid: bool,
    pub invvpid_individual_address: bool,
    pub invvpid_single_context: bool,
    pub invvpid_all_context: bool,
    pub invvpid_single_context_retaining_globals: bool,
    pub cr0_fixed0: u64,
    pub cr0_fixed1: u64,
    pub cr4_fixed0: u64,
    pub cr4_fixed1: u64,
}

impl VmxCapabilities {
    /// Decodes the capability MSRs. Uses the IA32_VMX_TRUE_* MSRs for the pin-based, primary
    /// processor-based, exit and entry control sets when IA32_VMX_BASIC bit 55 says they exist
    /// and they were read (Some); otherwise the legacy MSRs. The secondary set is zero when
    /// IA32_VMX_PROCBASED_CTLS2 is None or the primary controls cannot activate it (the MSR
    /// does not exist then, so a value would be meaningless).
    pub fn decode(msrs: &VmxMsrs) -> Self {
        let basic = msrs.basic;
        // See: SDM Vol 3D A.1 (bits 30:0 revision, 44:32 region size, 53:50 memory type)
        let revision_id = (basic & 0x7FFF_FFFF) as u32;
        let vmcs_size = ((basic >> 32) & 0x1FFF) as u32;
        let vmcs_memory_type_write_back = (basic >> 50) & 0xF == MEMORY_TYPE_WRITE_BACK;
        // See: SDM Vol 3D A.1 (bit 55) and A.2
        let true_controls = basic_has_true_controls(basic);

        let pick = |legacy: u64, true_value: Option<u64>| match (true_controls, true_value) {
            (true, Some(value)) => AllowedControls::from_msr(value),
            _ => AllowedControls::from_msr(legacy),
        };
        // See: SDM Vol 3D A.3.1 (Pin-Based VM-Execution Controls)
        let pinbased = pick(msrs.pinbased_ctls, msrs.true_pinbased_ctls);
        // See: SDM Vol 3D A.3.2 (Primary Processor-Based VM-Execution Controls)
        let procbased = pick(msrs.procbased_ctls, msrs.true_procbased_ctls);
        // See: SDM Vol 3D A.4 (VM-Exit Controls)
        let exit = pick(msrs.exit_ctls, msrs.true_exit_ctls);
        // See: SDM Vol 3D A.5 (VM-Entry Controls)
        let entry = pick(msrs.entry_ctls, msrs.true_entry_ctls);

        // See: SDM Vol 3D A.3.2 (bit 63: secondary controls may be activated)
        let secondary_usable = procbased.allows(PROCESSOR_BASED_ACTIVATE_SECONDARY);
        // See: SDM Vol 3D A.3.3 (Secondary Processor-Based VM-Execution Controls)
        let procbased2 = match msrs.procbased_ctls2 {
            Some(value) if secondary_usable => AllowedControls::from_msr(value),
            _ => AllowedControls::default(),
        };
        let ept = procbased2.allows(SECONDARY_ENABLE_EPT);
        let vpid = procbased2.allows(SECONDARY_ENABLE_VPID);
        // See: SDM Vol 3C 27.2.1.1 (VM-entry checks: unrestricted guest requires enable EPT)
        let unrestricted_guest = ept && procbased2.allows(SECONDARY_UNRESTRICTED_GUEST);

        // See: SDM Vol 3D A.10 (VPID and EPT Capabilities)
        let capability = msrs.ept_vpid_cap.unwrap_or(0);
        let ept_bit = |index: u32| ept && bit(capability, index);
        let vpid_bit = |index: u32| vpid && bit(capability, index);

        VmxCapabilities {
            revision_id,
            vmcs_size,
            vmcs_memory_type_write_back,
            true_controls,
            pinbased,
            procbased,
            procbased2,
            exit,
            entry,
            ept,
            vpid,
            unrestricted_guest,
            // See: SDM Vol 3C 25.6.1 (pin-based bit 6)
            preemption_timer: pinbased.allows(PIN_BASED_PREEMPTION_TIMER),
            // See: SDM Vol 3D A.6 (IA32_VMX_MISC bits 4:0: timer ticks every 2^X TSC ticks)
            preemption_timer_rate_shift: (msrs.misc & 0x1F) as u8,
            // See: SDM Vol 3C 25.6.2 (primary bits 28 and 25)
            msr_bitmaps: procbased.allows(PROCESSOR_BASED_MSR_BITMAPS),
            io_bitmaps: procbased.allows(PROCESSOR_BASED_IO_BITMAPS),
            ept_page_walk_4: ept_bit(6),
            ept_uncacheable: ept_bit(8),
            ept_write_back: ept_bit(14),
            ept_2mib_pages: ept_bit(16),
            ept_1gib_pages: ept_bit(17),
            invept: ept_bit(20),
            ept_accessed_dirty: ept_bit(21),
            invept_single_context: ept_bit(25),
            invept_all_context: ept_bit(26),
            invvpid: vpid_bit(32),
            invvpid_individual_address: vpid_bit(40),
            invvpid_single_context: vpid_bit(41),
            invvpid_all_context: vpid_bit(42),
            invvpid_single_context_retaining_globals: vpid_bit(43),
            // See: SDM Vol 3D A.7 and A.8 (VMX-fixed bits in CR0 and CR4)
            cr0_fixed0: msrs.cr0_fixed0,
            cr0_fixed1: msrs.cr0_fixed1,
            cr4_fixed0: msrs.cr4_fixed0,
            cr4_fixed1: msrs.cr4_fixed1,
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

/// A human-readable multi-line table of the capabilities (one "name: yes/no/value" row per
/// feature), for the boot log. No trailing newline.
impl fmt::Display for VmxCapabilities {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let controls = |name: &str, set: AllowedControls, formatter: &mut fmt::Formatter<'_>| {
            write!(
                formatter,
                "\n  {name}: must-be-one {:#010x} may-be-one {:#010x}",
                set.must_be_one, set.may_be_one
            )
        };
        write!(formatter, "VMX capabilities (SDM Vol 3D Appendix A):")?;
        write!(formatter, "\n  VMCS revision id: {:#x}", self.revision_id)?;
        write!(formatter, "\n  VMCS region size: {} bytes", self.vmcs_size)?;
        write!(
            formatter,
            "\n  VMCS memory type write-back: {}",
            yes_no(self.vmcs_memory_type_write_back)
        )?;
        write!(
            formatter,
            "\n  true controls: {}",
            yes_no(self.true_controls)
        )?;
        controls("pin-based controls", self.pinbased, formatter)?;
        controls("processor-based controls", self.procbased, formatter)?;
        controls("secondary controls", self.procbased2, formatter)?;
        controls("VM-exit controls", self.exit, formatter)?;
        controls("VM-entry controls", self.entry, formatter)?;
        let rows: [(&str, bool); 21] = [
            ("EPT", self.ept),
            ("VPID", self.vpid),
            ("unrestricted guest", self.unrestricted_guest),
            ("preemption timer", self.preemption_timer),
            ("MSR bitmaps", self.msr_bitmaps),
            ("I/O bitmaps", self.io_bitmaps),
            ("EPT page-walk length 4", self.ept_page_walk_4),
            ("EPT write-back", self.ept_write_back),
            ("EPT uncacheable", self.ept_uncacheable),
            ("EPT 2 MiB pages", self.ept_2mib_pages),
            ("EPT 1 GiB pages", self.ept_1gib_pages),
            ("EPT accessed/dirty flags", self.ept_accessed_dirty),
            ("INVEPT", self.invept),
            ("INVEPT single-context", self.invept_single_context),
            ("INVEPT all-context", self.invept_all_context),
            ("INVVPID", self.invvpid),
            (
                "INVVPID individual-address",
                self.invvpid_individual_address,
            ),
            ("INVVPID single-context", self.invvpid_single_context),
            ("INVVPID all-context", self.invvpid_all_context),
            (
                "INVVPID single-context-retaining-globals",
                self.invvpid_single_context_retaining_globals,
            ),
            (
                "secondary controls present",
                self.procbased2.may_be_one != 0,
            ),
        ];
        for (name, value) in rows {
            write!(formatter, "\n  {name}: {}", yes_no(value))?;
        }
        write!(
            formatter,
            "\n  preemption timer rate: 1 tick per 2^{} TSC ticks",
            self.preemption_timer_rate_shift
        )?;
        write!(
            formatter,
            "\n  CR0 fixed0/fixed1: {:#x} / {:#x}",
            self.cr0_fixed0, self.cr0_fixed1
        )?;
        write!(
            formatter,
            "\n  CR4 fixed0/fixed1: {:#x} / {:#x}",
            self.cr4_fixed0, self.cr4_fixed1
        )
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// What Bochs 2.7 reports for `cpu: model=corei7_skylake_x`, computed from the Bochs
    /// source (bochs-emu/Bochs):
    /// - bochs/cpu/cpudb/intel/corei7_skylake-x.cc `get_vmx_extensions_bitmask` (TPR shadow,
    ///   virtual NMI, APIC virtualization, WBINVD exiting, VPID, EPT, unrestricted guest, PAT,
    ///   EFER, descriptor-table exiting, x2APIC virtualization, preemption timer, PAUSE-loop
    ///   exiting, EPTP switching, EPT A/D, virtual interrupt delivery, VMCS shadowing, #VE,
    ///   ILEN-0 injection, PML, TSC scaling; no monitor trap flag, no posted interrupts),
    /// - bochs/cpu/vmcs.cc `init_vmx_capabilities` and the `init_*_ctrls` it calls
    ///   (commit 8afd14972eb386335ecf677f2f601acb11065c5d),
    /// - bochs/cpu/vmx.h `VMX_MSR_*` macros (commit b946570838cece53da7b5ccf7af63b5bfa5383af):
    ///   BASIC_HI = 4096 | WB << 18 | 1 << 22 | 1 << 23, revision BX_VMX_VMCS_REVISION_ID 0x2B;
    ///   fixed allowed-0 words 0x16 / 0x0401E172 (true 0x04006172) / 0x36DFF (true 0x36DFB) /
    ///   0x11FF (true 0x11FB); MISC = bit 5 | bits 8:6 | 4 CR3 targets << 16 | bit 29 | bit 30.
    ///
    /// Assumes the usual configure line (--enable-vmx=2 --enable-x86-64 --enable-avx
    /// --enable-evex) without --enable-monitor-mwait, so MWAIT/MONITOR exiting (primary bits
    /// 10 and 29) are not offered. CR4_FIXED1 is Bochs's cr4_suppmask for this model's features
    /// (VME..OSXMMEXCPT, VMXE, FSGSBASE, PCIDE, OSXSAVE, SMEP, SMAP), 0x3727FF.
    pub(crate) fn bochs_corei7_skylake_x() -> VmxMsrs {
        VmxMsrs {
            // Bochs cpu/init.cc: msr.ia32_feature_ctrl = 0 on hardware reset.
            feature_control: 0x0,
            basic: 0x00D8_1000_0000_002B,
            pinbased_ctls: 0x0000_007F_0000_0016,
            procbased_ctls: 0xD7F9_FBFE_0401_E172,
            exit_ctls: 0x007F_FFFF_0003_6DFF,
            entry_ctls: 0x0000_FFFF_0000_11FF,
            misc: 0x0000_0000_6004_01E0,
            cr0_fixed0: 0x8000_0021,
            cr0_fixed1: 0xFFFF_FFFF,
            cr4_fixed0: 0x0000_2000,
            cr4_fixed1: 0x0037_27FF,
            procbased_ctls2: Some(0x0217_7FFF_0000_0000),
            ept_vpid_cap: Some(0x0000_0F01_0633_4141),
            true_pinbased_ctls: Some(0x0000_007F_0000_0016),
            true_procbased_ctls: Some(0xD7F9_FBFE_0400_6172),
            true_exit_ctls: Some(0x007F_FFFF_0003_6DFB),
            true_entry_ctls: Some(0x0000_FFFF_0000_11FB),
        }
    }

    /// A real Intel Core i7-7800X (Skylake-X): the MSR dump the Bochs author recorded in the
    /// comment block above `get_vmx_extensions_bitmask` in bochs-emu/Bochs
    /// bochs/cpu/cpudb/intel/corei7_skylake-x.cc ("MSR 00000480: 00DA-0400-0000-0004" ...).
    /// The feature-control value is the usual firmware setting (locked, VMX outside SMX).
    fn real_core_i7_7800x() -> VmxMsrs {
        VmxMsrs {
            feature_control: 0x5,
            basic: 0x00DA_0400_0000_0004,
            pinbased_ctls: 0x0000_00FF_0000_0016,
            procbased_ctls: 0xFFF9_FFFE_0401_E172,
            exit_ctls: 0x01FF_FFFF_0003_6DFF,
            entry_ctls: 0x0003_FFFF_0000_11FF,
            misc: 0x0000_0000_7004_C1E7,
            cr0_fixed0: 0x8000_0021,
            cr0_fixed1: 0xFFFF_FFFF,
            cr4_fixed0: 0x0000_2000,
            cr4_fixed1: 0x0037_27FF,
            procbased_ctls2: Some(0x025D_3FFF_0000_0000),
            ept_vpid_cap: Some(0x0000_0F01_0673_4141),
            true_pinbased_ctls: Some(0x0000_00FF_0000_0016),
            true_procbased_ctls: Some(0xFFF9_FFFE_0400_6172),
            true_exit_ctls: Some(0x01FF_FFFF_0003_6DFB),
            true_entry_ctls: Some(0x0003_FFFF_0000_11FB),
        }
    }

    #[test]
    fn optional_msrs_exist_on_bochs_skylake_x() {
        let msrs = bochs_corei7_skylake_x();
        assert!(basic_has_true_controls(msrs.basic));
        assert!(procbased_allows_secondary(msrs.procbased_ctls));
        assert!(secondary_allows_ept_or_vpid(
            msrs.procbased_ctls2.unwrap_or(0)
        ));
    }

    #[test]
    fn optional_msrs_exist_on_real_core_i7_7800x() {
        let msrs = real_core_i7_7800x();
        assert!(basic_has_true_controls(msrs.basic));
        assert!(procbased_allows_secondary(msrs.procbased_ctls));
        assert!(secondary_allows_ept_or_vpid(
            msrs.procbased_ctls2.unwrap_or(0)
        ));
    }

    #[test]
    fn optional_msr_helpers_reject_clear_bits() {
        // Bit 55 clear (a pre-Nehalem style IA32_VMX_BASIC): no TRUE_* MSRs.
        assert!(!basic_has_true_controls(0x005A_0400_0000_0004));
        // Primary allowed-1 without bit 31: no IA32_VMX_PROCBASED_CTLS2.
        assert!(!procbased_allows_secondary(0x7FF9_FFFE_0401_E172));
        // Only the allowed-0 (low) half has bits 1 and 5: they mean nothing for existence.
        assert!(!secondary_allows_ept_or_vpid(0x0000_0000_0000_0022));
        assert!(secondary_allows_ept_or_vpid(1 << 33));
        assert!(secondary_allows_ept_or_vpid(1 << 37));
    }

    #[test]
    fn decode_bochs_corei7_skylake_x() {
        let capabilities = VmxCapabilities::decode(&bochs_corei7_skylake_x());
        assert_eq!(capabilities.revision_id, 0x2B);
        assert_eq!(capabilities.vmcs_size, 4096);
        assert!(capabilities.vmcs_memory_type_write_back);
        assert!(capabilities.true_controls);
        // TRUE MSRs used: CR3-load/store exiting (bits 15, 16) may be cleared.
        assert_eq!(
            capabilities.procbased,
            AllowedControls {
                must_be_one: 0x0400_6172,
                may_be_one: 0xD7F9_FBFE
            }
        );
        assert_eq!(capabilities.pinbased.may_be_one, 0x7F);
        assert_eq!(capabilities.exit.must_be_one, 0x0003_6DFB);
        assert_eq!(capabilities.entry.must_be_one, 0x0000_11FB);
        assert_eq!(capabilities.procbased2.may_be_one, 0x0217_7FFF);
        assert!(capabilities.ept);
        assert!(capabilities.vpid);
        assert!(capabilities.unrestricted_guest);
        assert!(capabilities.preemption_timer);
        assert_eq!(capabilities.preemption_timer_rate_shift, 0);
        assert!(capabilities.msr_bitmaps);
        assert!(capabilities.io_bitmaps);
        assert!(capabilities.ept_page_walk_4);
        assert!(capabilities.ept_write_back);
        assert!(capabilities.ept_uncacheable);
        assert!(capabilities.ept_2mib_pages);
        assert!(capabilities.ept_1gib_pages);
        assert!(capabilities.ept_accessed_dirty);
        assert!(capabilities.invept);
        assert!(capabilities.invept_single_context);
        assert!(capabilities.invept_all_context);
        assert!(capabilities.invvpid);
        assert!(capabilities.invvpid_individual_address);
        assert!(capabilities.invvpid_single_context);
        assert!(capabilities.invvpid_all_context);
        assert!(capabilities.invvpid_single_context_retaining_globals);
        assert_eq!(capabilities.cr0_fixed0, 0x8000_0021);
        assert_eq!(capabilities.cr4_fixed0, 0x2000);
        assert_eq!(capabilities.cr4_fixed1, 0x0037_27FF);
    }

    #[test]
    fn decode_real_core_i7_7800x() {
        let capabilities = VmxCapabilities::decode(&real_core_i7_7800x());
        assert_eq!(capabilities.revision_id, 4);
        assert_eq!(capabilities.vmcs_size, 1024);
        assert!(capabilities.vmcs_memory_type_write_back);
        assert!(capabilities.true_controls);
        assert!(capabilities.ept && capabilities.vpid && capabilities.unrestricted_guest);
        assert!(capabilities.preemption_timer);
        // IA32_VMX_MISC 0x7004C1E7: the timer counts down once every 2^7 TSC ticks.
        assert_eq!(capabilities.preemption_timer_rate_shift, 7);
        assert!(capabilities.msr_bitmaps && capabilities.io_bitmaps);
        assert!(capabilities.ept_page_walk_4);
        assert!(capabilities.ept_write_back && capabilities.ept_uncacheable);
        assert!(capabilities.ept_2mib_pages && capabilities.ept_1gib_pages);
        assert!(capabilities.ept_accessed_dirty);
        assert!(capabilities.invept && capabilities.invept_single_context);
        assert!(capabilities.invept_all_context);
        assert!(capabilities.invvpid && capabilities.invvpid_all_context);
        assert!(capabilities.invvpid_single_context_retaining_globals);
        // Real silicon also offers posted interrupts (pin-based bit 7) and the monitor trap
        // flag (primary bit 27), which Bochs does not.
        assert!(capabilities.pinbased.allows(1 << 7));
        assert!(capabilities.procbased.allows(1 << 27));
    }

    #[test]
    fn adjust_accepts_allowed_requests() {
        let capabilities = VmxCapabilities::decode(&bochs_corei7_skylake_x());
        // External-interrupt exiting (bit 0) | NMI exiting (bit 3) | virtual NMIs (bit 5):
        // the reserved must-be-one bits 1, 2, 4 are added.
        assert_eq!(capabilities.pinbased.adjust(0b10_1001), Ok(0x3F));
        // HLT exiting (7) | use I/O bitmaps (25) | use MSR bitmaps (28) | secondary (31).
        let requested = (1 << 7) | (1 << 25) | (1 << 28) | (1 << 31);
        assert_eq!(
            capabilities.procbased.adjust(requested),
            Ok(requested | 0x0400_6172)
        );
        // Secondary: enable EPT (1) | enable VPID (5) | unrestricted guest (7).
        assert_eq!(capabilities.procbased2.adjust(0xA2), Ok(0xA2));
    }

    #[test]
    fn adjust_reports_disallowed_bits() {
        let bochs = VmxCapabilities::decode(&bochs_corei7_skylake_x());
        // Posted interrupts (pin-based bit 7): real Skylake-X allows it, Bochs does not.
        assert_eq!(bochs.pinbased.adjust(1 << 7), Err(1 << 7));
        // Monitor trap flag (27) and MWAIT exiting (10) together with an allowed bit.
        assert_eq!(
            bochs.procbased.adjust((1 << 27) | (1 << 10) | (1 << 7)),
            Err((1 << 27) | (1 << 10))
        );
        // Primary bit 0 is reserved and must stay 0.
        assert_eq!(bochs.procbased.adjust(1), Err(1));

        let real = VmxCapabilities::decode(&real_core_i7_7800x());
        assert_eq!(real.pinbased.adjust(1 << 7), Ok(0x96));
        // Secondary bit 15 (ENCLS exiting) is not offered by this part (0x025D3FFF).
        assert_eq!(real.procbased2.adjust(1 << 15), Err(1 << 15));
    }

    #[test]
    fn adjust_with_contradictory_msr_reports_forced_bits() {
        let contradictory = AllowedControls {
            must_be_one: 0b11,
            may_be_one: 0b01,
        };
        assert_eq!(contradictory.adjust(0), Err(0b10));
    }

    #[test]
    fn legacy_controls_force_cr3_exiting() {
        // Same Bochs MSRs read without the TRUE_* ones: CR3-load/store exiting (bits 15, 16)
        // become must-be-one.
        let msrs = VmxMsrs {
            true_pinbased_ctls: None,
            true_procbased_ctls: None,
            true_exit_ctls: None,
            true_entry_ctls: None,
            ..bochs_corei7_skylake_x()
        };
        let capabilities = VmxCapabilities::decode(&msrs);
        assert_eq!(capabilities.procbased.must_be_one, 0x0401_E172);
        assert_eq!(capabilities.procbased.adjust(0), Ok(0x0401_E172));
        assert_eq!(capabilities.exit.must_be_one, 0x0003_6DFF);
    }

    #[test]
    fn true_msrs_ignored_when_basic_bit_55_is_clear() {
        let msrs = VmxMsrs {
            basic: 0x0058_1000_0000_002B,
            ..bochs_corei7_skylake_x()
        };
        let capabilities = VmxCapabilities::decode(&msrs);
        assert!(!capabilities.true_controls);
        assert_eq!(capabilities.procbased.must_be_one, 0x0401_E172);
        assert_eq!(capabilities.entry.must_be_one, 0x0000_11FF);
    }

    #[test]
    fn absent_secondary_controls_mean_no_ept_vpid_or_unrestricted() {
        let msrs = VmxMsrs {
            procbased_ctls2: None,
            ..bochs_corei7_skylake_x()
        };
        let capabilities = VmxCapabilities::decode(&msrs);
        assert_eq!(capabilities.procbased2, AllowedControls::default());
        assert!(!capabilities.ept && !capabilities.vpid && !capabilities.unrestricted_guest);
        // The EPT/VPID capability bits are not trusted without the controls.
        assert!(!capabilities.invept && !capabilities.invvpid);
        assert!(!capabilities.ept_1gib_pages);
    }

    #[test]
    fn secondary_controls_need_the_primary_activate_bit() {
        // Primary allowed-1 bit 31 cleared: a secondary value passed anyway is ignored.
        let msrs = VmxMsrs {
            procbased_ctls: 0x57F9_FBFE_0401_E172,
            true_procbased_ctls: Some(0x57F9_FBFE_0400_6172),
            ..bochs_corei7_skylake_x()
        };
        let capabilities = VmxCapabilities::decode(&msrs);
        assert!(!capabilities.ept && !capabilities.vpid && !capabilities.unrestricted_guest);
    }

    #[test]
    fn unrestricted_guest_needs_ept() {
        // Secondary allows unrestricted guest (bit 7) and VPID (bit 5) but not EPT (bit 1).
        let msrs = VmxMsrs {
            procbased_ctls2: Some(0x0000_00A0_0000_0000),
            ..bochs_corei7_skylake_x()
        };
        let capabilities = VmxCapabilities::decode(&msrs);
        assert!(!capabilities.ept);
        assert!(capabilities.vpid);
        assert!(!capabilities.unrestricted_guest);
        assert!(!capabilities.ept_page_walk_4 && !capabilities.invept);
        assert!(capabilities.invvpid && capabilities.invvpid_single_context);
    }

    #[test]
    fn feature_control_left_unlocked_by_bochs_reset() {
        // Bochs cpu/init.cc clears IA32_FEATURE_CONTROL on hardware reset and its BIOS does
        // not lock it: the hypervisor must write lock + VMX outside SMX.
        assert_eq!(
            feature_control_state(bochs_corei7_skylake_x().feature_control),
            FeatureControlState::UnlockedNeedsEnable { new_value: 0x5 }
        );
        // Unlocked with VMX already enabled still needs the lock; other bits (SGX enable,
        // bit 18) are kept.
        assert_eq!(
            feature_control_state(0x4_0004),
            FeatureControlState::UnlockedNeedsEnable {
                new_value: 0x4_0005
            }
        );
    }

    #[test]
    fn feature_control_enabled_and_locked_off() {
        assert_eq!(
            feature_control_state(real_core_i7_7800x().feature_control),
            FeatureControlState::Enabled
        );
        // Locked with VMX inside SMX only (bit 1) and outside SMX clear: firmware said no.
        assert_eq!(feature_control_state(0x3), FeatureControlState::LockedOff);
        assert_eq!(feature_control_state(0x1), FeatureControlState::LockedOff);
        // Locked with SENTER bits and VMX outside SMX: enabled.
        assert_eq!(feature_control_state(0xFF07), FeatureControlState::Enabled);
    }

    #[test]
    fn display_is_a_table_with_one_row_per_feature() {
        let table = format!("{}", VmxCapabilities::decode(&bochs_corei7_skylake_x()));
        assert!(table.starts_with("VMX capabilities"));
        for row in [
            "\n  VMCS revision id: 0x2b",
            "\n  VMCS region size: 4096 bytes",
            "\n  EPT: yes",
            "\n  VPID: yes",
            "\n  unrestricted guest: yes",
            "\n  pin-based controls: must-be-one 0x00000016 may-be-one 0x0000007f",
            "\n  preemption timer rate: 1 tick per 2^0 TSC ticks",
        ] {
            assert!(table.contains(row), "missing {row:?} in\n{table}");
        }
        assert!(!table.ends_with('\n'));
        let without_secondary = format!(
            "{}",
            VmxCapabilities::decode(&VmxMsrs {
                procbased_ctls2: None,
                ..bochs_corei7_skylake_x()
            })
        );
        assert!(without_secondary.contains("\n  EPT: no"));
    }

    #[test]
    fn decode_of_all_zero_and_all_one_values_does_not_panic() {
        let zero = VmxCapabilities::decode(&VmxMsrs::default());
        assert!(!zero.ept && !zero.true_controls && !zero.vmcs_memory_type_write_back);
        let ones = VmxMsrs {
            feature_control: u64::MAX,
            basic: u64::MAX,
            pinbased_ctls: u64::MAX,
            procbased_ctls: u64::MAX,
            exit_ctls: u64::MAX,
            entry_ctls: u64::MAX,
            misc: u64::MAX,
            cr0_fixed0: u64::MAX,
            cr0_fixed1: u64::MAX,
            cr4_fixed0: u64::MAX,
            cr4_fixed1: u64::MAX,
            procbased_ctls2: Some(u64::MAX),
            ept_vpid_cap: Some(u64::MAX),
            true_pinbased_ctls: Some(u64::MAX),
            true_procbased_ctls: Some(u64::MAX),
            true_exit_ctls: Some(u64::MAX),
            true_entry_ctls: Some(u64::MAX),
        };
        let capabilities = VmxCapabilities::decode(&ones);
        assert_eq!(capabilities.revision_id, 0x7FFF_FFFF);
        assert_eq!(capabilities.vmcs_size, 0x1FFF);
        assert_eq!(capabilities.preemption_timer_rate_shift, 31);
        assert!(!capabilities.vmcs_memory_type_write_back);
        let _ = format!("{capabilities}");
    }
}
