//! Can this machine virtualize? Reads CPUID and the capability MSRs once, decodes them with
//! the pure functions of `ringzero_x86::caps`, prints the fixed summary line and a readable
//! table, enables VT-x / SVM where firmware left it unlocked, and smoke-tests it by turning
//! virtualization on and off again on the boot CPU. The enable step is per CPU (the MSRs are):
//! each other CPU runs [`prepare_this_cpu`] when it comes up, and [`cpu_can_virtualize`] says
//! which CPUs may run guests.
//!
//! See: SDM Vol 3C 24.6 "Discovering support for VMX", 24.7 "Enabling and entering VMX
//! operation"; APM Vol 2 15.4 "Enabling SVM", 15.30.4 "VM_HSAVE_PA MSR".

use crate::memory::{self, HostPhysAddr};
use crate::smp::MAX_CPUS;
use core::sync::atomic::{AtomicBool, Ordering};
use ringzero_x86::caps::svm::{self, SvmCapabilities, SvmCpuid, SvmEnableState};
use ringzero_x86::caps::vmx::{self, FeatureControlState, VmxCapabilities, VmxMsrs};
use ringzero_x86::caps::{Refusal, Vendor, VirtSummary};
use ringzero_x86::hw;

/// Which CPUs (by logical index) passed [`prepare_this_cpu`] (the boot CPU: [`detect`]).
static CAN_VIRTUALIZE: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];

/// The virtualization extension this machine offers, decoded.
#[derive(Clone, Copy, Debug)]
pub enum Extension {
    Vmx(VmxCapabilities),
    Svm(SvmCapabilities),
}

/// Reads the VMX capability MSRs, never touching one the CPU does not have.
fn read_vmx_msrs() -> VmxMsrs {
    // Every read below is of an MSR that exists: CPUID.1:ECX.VMX = 1, so IA32_FEATURE_CONTROL
    // and the IA32_VMX_BASIC..CR4_FIXED1 range exist (SDM Vol 3D A.1); the optional MSRs are
    // read only when the capability bit that announces them is set (SDM Vol 3D A.3.3, A.3.1,
    // A.10).
    let read = |msr| {
        // SAFETY: see above: callers pass only MSRs that exist on this VMX CPU.
        unsafe { hw::read_msr(msr) }
    };
    let basic = read(vmx::IA32_VMX_BASIC);
    let procbased_ctls = read(vmx::IA32_VMX_PROCBASED_CTLS);
    let procbased_ctls2 = vmx::procbased_allows_secondary(procbased_ctls)
        .then(|| read(vmx::IA32_VMX_PROCBASED_CTLS2));
    let ept_vpid_cap = procbased_ctls2
        .filter(|secondary| vmx::secondary_allows_ept_or_vpid(*secondary))
        .map(|_| read(vmx::IA32_VMX_EPT_VPID_CAP));
    let true_controls = vmx::basic_has_true_controls(basic);
    let optional = |msr| true_controls.then(|| read(msr));
    VmxMsrs {
        feature_control: read(vmx::IA32_FEATURE_CONTROL),
        basic,
        pinbased_ctls: read(vmx::IA32_VMX_PINBASED_CTLS),
        procbased_ctls,
        exit_ctls: read(vmx::IA32_VMX_EXIT_CTLS),
        entry_ctls: read(vmx::IA32_VMX_ENTRY_CTLS),
        misc: read(vmx::IA32_VMX_MISC),
        cr0_fixed0: read(vmx::IA32_VMX_CR0_FIXED0),
        cr0_fixed1: read(vmx::IA32_VMX_CR0_FIXED1),
        cr4_fixed0: read(vmx::IA32_VMX_CR4_FIXED0),
        cr4_fixed1: read(vmx::IA32_VMX_CR4_FIXED1),
        procbased_ctls2,
        ept_vpid_cap,
        true_pinbased_ctls: optional(vmx::IA32_VMX_TRUE_PINBASED_CTLS),
        true_procbased_ctls: optional(vmx::IA32_VMX_TRUE_PROCBASED_CTLS),
        true_exit_ctls: optional(vmx::IA32_VMX_TRUE_EXIT_CTLS),
        true_entry_ctls: optional(vmx::IA32_VMX_TRUE_ENTRY_CTLS),
    }
}

fn read_svm_cpuid(extended_features_ecx: u32) -> SvmCpuid {
    let mut cpuid = SvmCpuid {
        extended_features_ecx,
        ..SvmCpuid::default()
    };
    if extended_features_ecx & svm::CPUID_80000001_ECX_SVM != 0
        && hw::cpuid(0x8000_0000, 0).eax >= 0x8000_000A
    {
        // See: APM Vol 3 E.4.9 "Function 8000_000Ah: SVM Revision and Feature Identification".
        let leaf = hw::cpuid(0x8000_000A, 0);
        cpuid.leaf_a_eax = leaf.eax;
        cpuid.leaf_a_ebx = leaf.ebx;
        cpuid.leaf_a_edx = leaf.edx;
    }
    cpuid
}

/// Detects the extension, prints the summary line and table, and makes it usable (firmware
/// locks permitting). `cpus` is the host CPU count from ACPI, for the summary line.
pub fn detect(cpus: u32) -> Result<Extension, Refusal> {
    let leaf0 = hw::cpuid(0, 0);
    let vendor = Vendor::from_cpuid_vendor(leaf0.ebx, leaf0.edx, leaf0.ecx);
    let has_vmx = hw::cpuid(1, 0).ecx & vmx::CPUID_1_ECX_VMX != 0;
    let extended_features_ecx = if hw::cpuid(0x8000_0000, 0).eax >= 0x8000_0001 {
        hw::cpuid(0x8000_0001, 0).ecx
    } else {
        0
    };
    let has_svm = extended_features_ecx & svm::CPUID_80000001_ECX_SVM != 0;

    let mut summary = VirtSummary {
        vendor,
        vmx: has_vmx,
        svm: has_svm,
        ept: false,
        npt: false,
        unrestricted: false,
        vpid: false,
        asids: 0,
        cpus,
    };
    let extension = if vendor == Vendor::Intel && has_vmx {
        let capabilities = VmxCapabilities::decode(&read_vmx_msrs());
        summary.ept = capabilities.ept;
        summary.unrestricted = capabilities.unrestricted_guest;
        summary.vpid = capabilities.vpid;
        Some(Extension::Vmx(capabilities))
    } else if vendor == Vendor::Amd && has_svm {
        let capabilities = SvmCapabilities::decode(&read_svm_cpuid(extended_features_ecx));
        summary.npt = capabilities.nested_paging;
        summary.asids = capabilities.asids;
        Some(Extension::Svm(capabilities))
    } else {
        None
    };
    crate::console::print_line(format_args!("{summary}"));

    let Some(extension) = extension else {
        return Err(Refusal::NoVirtualizationExtension { vendor });
    };
    if !(summary.ept || summary.npt) {
        log::warn!(
            "no nested paging on this CPU: only VMs with paging = \"shadow\" can run ({})",
            ringzero_x86::caps::nested_paging_missing(vendor)
        );
    }
    match &extension {
        Extension::Vmx(capabilities) => {
            for line in alloc::format!("{capabilities}").lines() {
                log::info!("vmx: {line}");
            }
        }
        Extension::Svm(capabilities) => {
            for line in alloc::format!("{capabilities}").lines() {
                log::info!("svm: {line}");
            }
        }
    }
    prepare_this_cpu(&extension)?;
    Ok(extension)
}

/// Makes the extension usable on the CPU running this (the feature MSRs are per CPU): checks
/// this CPU's CPUID bit, then IA32_FEATURE_CONTROL (VMX) or VM_CR (SVM), enabling where
/// firmware left them unlocked. Records the result for [`cpu_can_virtualize`].
pub fn prepare_this_cpu(extension: &Extension) -> Result<(), Refusal> {
    let leaf0 = hw::cpuid(0, 0);
    let vendor = Vendor::from_cpuid_vendor(leaf0.ebx, leaf0.edx, leaf0.ecx);
    let result = match extension {
        Extension::Vmx(_) if hw::cpuid(1, 0).ecx & vmx::CPUID_1_ECX_VMX == 0 => {
            Err(Refusal::NoVirtualizationExtension { vendor })
        }
        Extension::Svm(_)
            if hw::cpuid(0x8000_0000, 0).eax < 0x8000_0001
                || hw::cpuid(0x8000_0001, 0).ecx & svm::CPUID_80000001_ECX_SVM == 0 =>
        {
            Err(Refusal::NoVirtualizationExtension { vendor })
        }
        Extension::Vmx(_) => enable_vmx(),
        Extension::Svm(_) => enable_svm(),
    };
    if let Some(flag) = CAN_VIRTUALIZE.get(crate::console::cpu_index()) {
        flag.store(result.is_ok(), Ordering::Release);
    }
    result
}

/// Whether CPU `cpu_index` passed [`prepare_this_cpu`].
pub fn cpu_can_virtualize(cpu_index: usize) -> bool {
    CAN_VIRTUALIZE
        .get(cpu_index)
        .is_some_and(|flag| flag.load(Ordering::Acquire))
}

/// Makes VMXON legal: IA32_FEATURE_CONTROL must be locked with VMX-outside-SMX set.
/// See: SDM Vol 3C 24.7.
fn enable_vmx() -> Result<(), Refusal> {
    // SAFETY: CPUID.1:ECX.VMX = 1, so IA32_FEATURE_CONTROL exists.
    let feature_control = unsafe { hw::read_msr(vmx::IA32_FEATURE_CONTROL) };
    match vmx::feature_control_state(feature_control) {
        FeatureControlState::Enabled => {
            log::info!("vmx: IA32_FEATURE_CONTROL={feature_control:#x}: locked with VMX outside SMX enabled");
            Ok(())
        }
        FeatureControlState::LockedOff => Err(Refusal::VmxLockedOffByFirmware { feature_control }),
        FeatureControlState::UnlockedNeedsEnable { new_value } => {
            // SAFETY: the MSR exists and is unlocked; setting lock + VMX-outside-SMX is the
            // documented way to allow VMXON until the next reset.
            unsafe { hw::write_msr(vmx::IA32_FEATURE_CONTROL, new_value) };
            log::info!("vmx: IA32_FEATURE_CONTROL was unlocked ({feature_control:#x}); set and locked it to {new_value:#x}");
            Ok(())
        }
    }
}

/// Makes EFER.SVME settable: VM_CR.SVMDIS must be clear. See: APM Vol 2 15.4, 15.30.1.
fn enable_svm() -> Result<(), Refusal> {
    // SAFETY: CPUID 8000_0001h:ECX.SVM = 1, so VM_CR exists.
    let vm_cr = unsafe { hw::read_msr(svm::VM_CR) };
    match svm::svm_enable_state(vm_cr) {
        SvmEnableState::Available => Ok(()),
        SvmEnableState::LockedOff => Err(Refusal::SvmLockedOffByFirmware { vm_cr }),
        SvmEnableState::DisabledUnlocked { new_value } => {
            // SAFETY: VM_CR is unlocked, so SVMDIS may be cleared by software.
            unsafe { hw::write_msr(svm::VM_CR, new_value) };
            log::info!("svm: VM_CR.SVMDIS was set but unlocked; cleared it");
            Ok(())
        }
    }
}

/// Why the smoke test failed.
#[derive(Debug)]
pub enum SmokeError {
    NoMemory,
    Cr0NotVmxCompatible { cr0: u64, fixed0: u64, fixed1: u64 },
    Vmxon(hw::VmxInstructionError),
    Vmxoff(hw::VmxInstructionError),
    SvmeDidNotStick { efer: u64 },
}

impl core::fmt::Display for SmokeError {
    fn fmt(&self, formatter: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            SmokeError::NoMemory => write!(formatter, "no free frame for the VMXON region / host save area"),
            SmokeError::Cr0NotVmxCompatible { cr0, fixed0, fixed1 } => write!(
                formatter,
                "CR0={cr0:#x} violates IA32_VMX_CR0_FIXED0={fixed0:#x} / FIXED1={fixed1:#x} (SDM Vol 3D A.7)"
            ),
            SmokeError::Vmxon(error) => write!(formatter, "VMXON failed ({error:?})"),
            SmokeError::Vmxoff(error) => write!(formatter, "VMXOFF failed ({error:?})"),
            SmokeError::SvmeDidNotStick { efer } => {
                write!(formatter, "EFER.SVME did not stay set (EFER read back {efer:#x})")
            }
        }
    }
}

/// IA32_EFER and its SVME bit. See: APM Vol 2 3.1.7 "Extended Feature Enable Register".
const IA32_EFER: u32 = 0xC000_0080;
const EFER_SVME: u64 = 1 << 12;

/// Turns virtualization on and off again on this CPU, proving the enable path works.
pub fn smoke_test(extension: &Extension) -> Result<(), SmokeError> {
    match extension {
        Extension::Vmx(capabilities) => vmx_on_off(capabilities),
        Extension::Svm(_) => svm_on_off(),
    }
}

fn vmx_on_off(capabilities: &VmxCapabilities) -> Result<(), SmokeError> {
    // Step 1: enter VMX root operation the way the backend will (CR0/CR4 fixed bits, a
    // revision-tagged VMXON region, VMXON).
    let region = memory::allocate_frame().ok_or(SmokeError::NoMemory)?;
    let saved_cr4 = hw::read_cr4();
    let result = enter_vmx_operation(capabilities, region).and_then(|()| {
        log::info!(
            "vmx: VMXON succeeded (region at {:#x}); the CPU is in VMX root operation",
            region.0
        );
        // Step 2: and leave it straight away.
        // SAFETY: VMXON just succeeded and no VMCS was loaded.
        unsafe { hw::vmxoff() }.map_err(SmokeError::Vmxoff)
    });
    // Step 3: back to the state before.
    // SAFETY: restores the CR4 value the hypervisor was running with (VMX is off again, or
    // VMXON failed and never turned it on).
    unsafe { hw::write_cr4(saved_cr4) };
    memory::free_frame(region);
    result.map(|()| log::info!("vmx: VMXOFF succeeded; VT-x works on this CPU"))
}

fn svm_on_off() -> Result<(), SmokeError> {
    // Step 1: the host save area, where VMRUN will keep host state. See: APM Vol 2 15.30.4.
    let save_area = memory::allocate_frame().ok_or(SmokeError::NoMemory)?;
    // SAFETY: VM_HSAVE_PA exists on SVM CPUs and takes a 4 KiB-aligned physical address; the
    // frame is ours until it is freed below, after SVME is off again.
    unsafe { hw::write_msr(svm::VM_HSAVE_PA, save_area.0) };
    // Step 2: EFER.SVME on, read back. See: APM Vol 2 15.4 "Enabling SVM".
    // SAFETY: EFER exists in long mode; setting SVME only enables the SVM instructions.
    let efer = unsafe { hw::read_msr(IA32_EFER) };
    // SAFETY: as above.
    unsafe { hw::write_msr(IA32_EFER, efer | EFER_SVME) };
    // SAFETY: as above.
    let enabled = unsafe { hw::read_msr(IA32_EFER) };
    // Step 3: EFER.SVME off again, host save area released.
    // SAFETY: restores the EFER value the hypervisor was running with.
    unsafe {
        hw::write_msr(IA32_EFER, efer);
        hw::write_msr(svm::VM_HSAVE_PA, 0);
    }
    memory::free_frame(save_area);
    if enabled & EFER_SVME == 0 {
        return Err(SmokeError::SvmeDidNotStick { efer: enabled });
    }
    log::info!("svm: EFER.SVME set (EFER={enabled:#x}, host save area at {:#x}) and cleared again; SVM works on this CPU", save_area.0);
    Ok(())
}

/// Puts this CPU in VMX root operation: checks CR0 against the fixed bits (SDM Vol 3D A.7),
/// turns on CR4.VMXE and the other fixed CR4 bits (A.8), and executes VMXON with `region`
/// (tagged here with the VMCS revision identifier). See: SDM Vol 3C 24.7, 25.11.5. The smoke
/// test leaves again at once; the backend stays until power-off.
pub fn enter_vmx_operation(
    capabilities: &VmxCapabilities,
    region: HostPhysAddr,
) -> Result<(), SmokeError> {
    let cr0 = hw::read_cr0();
    let (fixed0, fixed1) = (capabilities.cr0_fixed0, capabilities.cr0_fixed1);
    if cr0 & fixed0 != fixed0 || cr0 & !fixed1 != 0 {
        return Err(SmokeError::Cr0NotVmxCompatible {
            cr0,
            fixed0,
            fixed1,
        });
    }
    // SAFETY: the caller gives a fresh frame that stays reserved for VMX operation.
    unsafe {
        memory::physical_window(region)
            .cast::<u32>()
            .write(capabilities.revision_id)
    };
    let cr4 = (hw::read_cr4() | hw::CR4_VMXE | capabilities.cr4_fixed0) & capabilities.cr4_fixed1;
    // SAFETY: only VMXE and bits the CPU requires in VMX operation are added.
    unsafe { hw::write_cr4(cr4) };
    // SAFETY: feature control is locked on (virt::detect), CR0/CR4 satisfy the fixed bits, and
    // the region is a dedicated, revision-tagged frame.
    unsafe { hw::vmxon(region.0) }.map_err(SmokeError::Vmxon)
}
