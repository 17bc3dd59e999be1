//! One VMX vCPU: a VMCS and the guest registers it does not hold. Mirrors
//! `arch/svm/src/vcpu.rs` method for method.
//!
//! Several vCPUs (of several VMs) may share one CPU, switched by the scheduler; a vCPU always
//! runs on the CPU that created it. Its VMCS is made current when it is created and again by
//! `activate` (VMPTRLD when VMPTRST names another VMCS); every VMREAD/VMWRITE here refers to
//! the current VMCS, so the scheduler activates a vCPU before touching it. The launch state
//! lives in the VMCS itself and survives VMPTRLD on the same CPU without VMCLEAR, so VMRESUME
//! stays right after a switch (SDM Vol 3C 25.1, 25.11.3). What of the guest lives in the CPU
//! rather than in the VMCS (the pass-through MSRs, CR2, the x87/SSE registers) is saved by
//! `deactivate` and given back by `activate`.

use crate::controls::{self, entry, Controls};
use crate::exit::{self, GuestStateFields};
use crate::hw::{self, EntryOutcome, GuestRegisters, VmxInstructionError};
use crate::vmcs::{self, Field};
use core::ptr::NonNull;
use ringzero_loader::boot_plan::{CpuMode, EntryState};
use ringzero_memory::shadow::{GuestPagingState, RealPaging};
use ringzero_memory::HostPhysAddr;
use ringzero_vmm::exit::VmExit;
use ringzero_vmm::vcpu::{FaultContext, GuestSnapshot, Register, Vcpu};
use ringzero_x86::caps::vmx::VmxCapabilities;
use ringzero_x86::extended_state::GuestExtendedState;

/// A host page (or run of contiguous pages): where the hardware sees it and where the
/// hypervisor does.
#[derive(Clone, Copy, Debug)]
pub struct Frame {
    pub physical: HostPhysAddr,
    pub virtual_address: NonNull<u8>,
}

/// The I/O bitmaps (A: ports 0-0x7FFF, B: 0x8000-0xFFFF) and the MSR bitmap, shared by every
/// vCPU of this CPU: all ones, so every port access and every RDMSR/WRMSR exits, except the
/// MSRs of [`PASS_THROUGH_MSRS`]. See: SDM Vol 3C 25.6.4, 25.6.9.
pub struct Bitmaps {
    io_a: HostPhysAddr,
    io_b: HostPhysAddr,
    msr: HostPhysAddr,
}

impl Bitmaps {
    /// Fills the three pages with ones (intercept everything), then lets the guest reach the
    /// [`PASS_THROUGH_MSRS`] directly.
    ///
    /// # Safety
    /// Each frame is a 4 KiB page reserved for its bitmap, mapped writable.
    pub unsafe fn intercept_everything(io_a: Frame, io_b: Frame, msr: Frame) -> Bitmaps {
        for frame in [io_a, io_b, msr] {
            // SAFETY: the caller guarantees each page is ours.
            unsafe { core::ptr::write_bytes(frame.virtual_address.as_ptr(), 0xFF, 4096) };
        }
        let mut bitmaps = Bitmaps {
            io_a: io_a.physical,
            io_b: io_b.physical,
            msr: msr.physical,
        };
        // SAFETY: the MSR bitmap page is ours (the caller's guarantee above).
        unsafe { bitmaps.pass_through(msr, &PASS_THROUGH_MSRS) };
        bitmaps
    }

    /// Clears the read and write intercepts of `msrs` (all in 0xC000_0000..=0xC000_1FFF). The
    /// bitmap is four 1 KiB quarters: reads of low MSRs, reads of high MSRs, writes of low,
    /// writes of high. See: SDM Vol 3C 25.6.9.
    ///
    /// # Safety
    /// `page` is the MSR bitmap's page, mapped writable.
    unsafe fn pass_through(&mut self, page: Frame, msrs: &[u32]) {
        for &msr in msrs {
            let bit = (msr - 0xC000_0000) as usize;
            for quarter in [1024usize, 3072] {
                let byte = quarter + bit / 8;
                // SAFETY: `byte` < 4096 for MSRs in the high range; the page is ours.
                unsafe {
                    let pointer = page.virtual_address.as_ptr().add(byte);
                    pointer.write(pointer.read() & !(1u8 << (bit % 8)));
                }
            }
        }
    }
}

/// The SYSCALL MSRs (STAR, LSTAR, CSTAR, SFMASK) and KERNEL_GS_BASE: the guest reads and writes
/// them directly (no exit). ringzero itself uses neither SYSCALL nor SWAPGS, so the guest's
/// values live in the real MSRs while it runs; each new vCPU starts them at 0, `deactivate`
/// saves them and `activate` loads them back. (SVM keeps the same MSRs in the VMCB through
/// VMLOAD/VMSAVE.)
const PASS_THROUGH_MSRS: [u32; 5] = [
    0xC000_0081,
    0xC000_0082,
    0xC000_0083,
    0xC000_0084,
    0xC000_0102,
];

/// The page one vCPU owns.
#[derive(Clone, Copy, Debug)]
pub struct VmxFrames {
    /// The VMCS region.
    pub vmcs: Frame,
}

/// What the VMCS needs to know about the host (the running hypervisor).
#[derive(Clone, Copy, Debug)]
pub struct HostState {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub pat: u64,
    pub fs_base: u64,
    pub gs_base: u64,
}

/// Why a vCPU could not be created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CreateError {
    Controls(controls::UnsupportedControl),
    Instruction {
        what: &'static str,
        error: VmxInstructionError,
        number: u64,
    },
}

impl core::fmt::Display for CreateError {
    fn fmt(&self, formatter: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            CreateError::Controls(error) => write!(formatter, "{error}"),
            CreateError::Instruction {
                what,
                error,
                number,
            } => write!(
                formatter,
                "{what} failed ({error:?}, VM-instruction error {number}: {})",
                exit::instruction_error_meaning(*number)
            ),
        }
    }
}

/// How the guest's memory is translated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PagingSetup {
    /// EPT with tables rooted here.
    Nested { root: HostPhysAddr },
    /// Shadow paging: the core loads the shadow root and real registers through
    /// `Vcpu::set_shadow_paging` before the first run.
    Shadow,
}

/// One vCPU on Intel VMX.
pub struct VmxVcpu {
    /// Shadow paging: the paging registers the guest believes in.
    visible: Option<GuestPagingState>,
    flush_pending: bool,
    frames: VmxFrames,
    registers: GuestRegisters,
    launched: bool,
    next_rip: Option<u64>,
    controls: Controls,
    capabilities: VmxCapabilities,
    ept_pointer: u64,
    vpid: u16,
    first_run: bool,
    /// The guest's [`PASS_THROUGH_MSRS`] (same order) and CR2 while they are not in the CPU.
    saved_msrs: [u64; PASS_THROUGH_MSRS.len()],
    saved_cr2: u64,
    /// The guest's x87/SSE/AVX registers and XCR0 while they are not in the CPU (VM entries
    /// and exits switch neither).
    extended_state: GuestExtendedState,
    /// Whether the real pass-through MSRs, CR2 and extended state hold this guest's values
    /// (from `activate` to `deactivate`).
    cpu_state_loaded: bool,
    /// The VMX-preemption timer value written before every entry while the timer is on.
    preemption_timer: Option<u32>,
    /// The VM-entry interruption information of the last entry (cleared at every exit), for
    /// failure reports.
    last_entry_event: u64,
}

/// The power-on PAT value. See: SDM Vol 3A 13.12.4.
const POWER_ON_PAT: u64 = 0x0007_0406_0007_0406;
/// VM-entry interruption information: type 3 = hardware exception, bit 11 deliver error code,
/// bit 31 valid. See: SDM Vol 3C 25.8.3.
const EVENT_TYPE_HARDWARE_EXCEPTION: u64 = 3 << 8;
/// Type 0 = external interrupt (no error code, no instruction length). See: SDM Vol 3C 25.8.3.
const EVENT_TYPE_EXTERNAL_INTERRUPT: u64 = 0;
const EVENT_DELIVER_ERROR_CODE: u64 = 1 << 11;
const EVENT_VALID: u64 = 1 << 31;
/// Access-rights bits. See: SDM Vol 3C 25.4.1, Table 25-2.
const ACCESS_LONG: u32 = 1 << 13;
const ACCESS_DEFAULT_32: u32 = 1 << 14;
const ACCESS_GRANULARITY: u32 = 1 << 15;
const ACCESS_UNUSABLE: u32 = 1 << 16;
const CR0_PE: u64 = 1 << 0;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const EFER_LME: u64 = 1 << 8;
const CR4_VMXE: u64 = 1 << 13;
const EFER_LMA: u64 = 1 << 10;
const RFLAGS_IF: u64 = 1 << 9;
/// Guest interruptibility state: blocking by STI (bit 0) and by MOV SS (bit 1).
/// See: SDM Vol 3C 25.4.2, Table 25-3.
const BLOCKING_BY_STI: u64 = 1 << 0;
const BLOCKING_BY_MOV_SS: u64 = 1 << 1;

/// The VM-entry interruption information that delivers external interrupt `vector`, as the
/// local APIC would: type 0, valid. See: SDM Vol 3C 25.8.3, 27.6.1.
pub fn external_interrupt_information(vector: u8) -> u64 {
    u64::from(vector) | EVENT_TYPE_EXTERNAL_INTERRUPT | EVENT_VALID
}

/// The VM-entry interruption information that delivers again the event whose delivery an exit
/// interrupted, from the IDT-vectoring information: vector, type (external interrupt, NMI,
/// exceptions, software interrupts alike) and the error-code bit, valid; `None` when no
/// delivery was interrupted. Bits 30:12 are undefined there and reserved at entry.
/// See: SDM Vol 3C 28.2.4, 25.8.3.
pub fn reinjection(vectoring_information: u64) -> Option<u64> {
    (vectoring_information & EVENT_VALID != 0)
        .then_some(vectoring_information & (EVENT_VALID | EVENT_DELIVER_ERROR_CODE | 0x7FF))
}

/// Whether an external interrupt may be injected at the next entry: RFLAGS.IF = 1, no blocking
/// by STI or MOV SS, and no event already in the VM-entry interruption-information field (an
/// injection the core queued, or one whose delivery an exit interrupted). Injecting otherwise
/// fails the entry. See: SDM Vol 3C 27.3.1.4, 27.3.1.5, 26.3 (blocking).
pub fn can_take_interrupt(rflags: u64, interruptibility: u64, entry_information: u64) -> bool {
    rflags & RFLAGS_IF != 0
        && interruptibility & (BLOCKING_BY_STI | BLOCKING_BY_MOV_SS) == 0
        && entry_information & EVENT_VALID == 0
}

/// The VMCS writes that put a vCPU in the state after INIT + startup IPI with `vector`: real
/// mode at CS:IP = (vector << 8):0 with CS base vector << 12, everything else as INIT leaves
/// it. Needs unrestricted guest (PE = PG = 0); CR0.NE and CR4.VMXE (and any other bit the CPU
/// requires) stay set in the real registers, hidden behind the read shadows. Includes the
/// VM-entry controls (`entry_controls` without "IA-32e mode guest") and drops any queued event.
/// See: SDM Vol 3A 9.1.1 Table 9-1, 11.6.1 (startup IPI); Vol 3C 25.4.1, 27.3.1 (guest-state
/// checks), 25.6.6 (read shadows).
pub fn startup_state(
    vector: u8,
    capabilities: &VmxCapabilities,
    entry_controls: u32,
) -> alloc::vec::Vec<(Field, u64)> {
    // After INIT: CD, NW and ET set. See: SDM Vol 3A Table 9-1.
    const CR0_AT_INIT: u64 = 0x6000_0010;
    // Access rights for real mode under unrestricted guest: present, DPL 0; code execute/read
    // accessed (0x9B), data read/write accessed (0x93), a busy TSS (0x8B), an LDT (0x82).
    // See: SDM Vol 3C 25.4.1, 27.3.1.2.
    const CODE: u64 = 0x9B;
    const DATA: u64 = 0x93;
    let cr0_required = capabilities.cr0_fixed0 & !((1 << 0) | (1 << 31));
    let cr0_host_owned = (cr0_required & !CR0_AT_INIT) | CR0_NE;
    let cr4_host_owned = capabilities.cr4_fixed0 | CR4_VMXE;
    let code_segment = u64::from(vector) << 8;
    let mut writes = alloc::vec![
        (vmcs::GUEST_CS_SELECTOR, code_segment),
        (vmcs::GUEST_CS_BASE, code_segment << 4),
        (vmcs::GUEST_CS_LIMIT, 0xFFFF),
        (vmcs::GUEST_CS_ACCESS_RIGHTS, CODE),
    ];
    for (selector, base, limit, access) in [
        (
            vmcs::GUEST_DS_SELECTOR,
            vmcs::GUEST_DS_BASE,
            vmcs::GUEST_DS_LIMIT,
            vmcs::GUEST_DS_ACCESS_RIGHTS,
        ),
        (
            vmcs::GUEST_ES_SELECTOR,
            vmcs::GUEST_ES_BASE,
            vmcs::GUEST_ES_LIMIT,
            vmcs::GUEST_ES_ACCESS_RIGHTS,
        ),
        (
            vmcs::GUEST_SS_SELECTOR,
            vmcs::GUEST_SS_BASE,
            vmcs::GUEST_SS_LIMIT,
            vmcs::GUEST_SS_ACCESS_RIGHTS,
        ),
        (
            vmcs::GUEST_FS_SELECTOR,
            vmcs::GUEST_FS_BASE,
            vmcs::GUEST_FS_LIMIT,
            vmcs::GUEST_FS_ACCESS_RIGHTS,
        ),
        (
            vmcs::GUEST_GS_SELECTOR,
            vmcs::GUEST_GS_BASE,
            vmcs::GUEST_GS_LIMIT,
            vmcs::GUEST_GS_ACCESS_RIGHTS,
        ),
    ] {
        writes.extend([(selector, 0), (base, 0), (limit, 0xFFFF), (access, DATA)]);
    }
    writes.extend([
        (vmcs::GUEST_TR_SELECTOR, 0),
        (vmcs::GUEST_TR_BASE, 0),
        (vmcs::GUEST_TR_LIMIT, 0xFFFF),
        (vmcs::GUEST_TR_ACCESS_RIGHTS, 0x8B),
        (vmcs::GUEST_LDTR_SELECTOR, 0),
        (vmcs::GUEST_LDTR_BASE, 0),
        (vmcs::GUEST_LDTR_LIMIT, 0xFFFF),
        (vmcs::GUEST_LDTR_ACCESS_RIGHTS, 0x82),
        (vmcs::GUEST_GDTR_BASE, 0),
        (vmcs::GUEST_GDTR_LIMIT, 0xFFFF),
        (vmcs::GUEST_IDTR_BASE, 0),
        (vmcs::GUEST_IDTR_LIMIT, 0xFFFF),
        (vmcs::CR0_GUEST_HOST_MASK, cr0_host_owned),
        (vmcs::CR0_READ_SHADOW, CR0_AT_INIT),
        (vmcs::GUEST_CR0, CR0_AT_INIT | cr0_host_owned),
        (vmcs::GUEST_CR3, 0),
        (vmcs::CR4_GUEST_HOST_MASK, cr4_host_owned),
        (vmcs::CR4_READ_SHADOW, 0),
        (vmcs::GUEST_CR4, cr4_host_owned),
        (vmcs::GUEST_IA32_EFER, 0),
        (
            vmcs::VM_ENTRY_CONTROLS,
            u64::from(entry_controls & !entry::IA32E_MODE_GUEST),
        ),
        (vmcs::GUEST_IA32_DEBUGCTL, 0),
        (vmcs::GUEST_DR7, 0x400),
        (vmcs::GUEST_RSP, 0),
        (vmcs::GUEST_RIP, 0),
        (vmcs::GUEST_RFLAGS, 0x2),
        (vmcs::GUEST_PENDING_DEBUG_EXCEPTIONS, 0),
        (vmcs::GUEST_INTERRUPTIBILITY_STATE, 0),
        (vmcs::GUEST_ACTIVITY_STATE, 0),
        (vmcs::VM_ENTRY_INTERRUPTION_INFO, 0),
    ]);
    writes
}

/// VMWRITE that turns a failure into a [`CreateError`].
fn write(field: Field, value: u64) -> Result<(), CreateError> {
    // SAFETY: called only while this vCPU's VMCS is current (between VMPTRLD in `new` and
    // teardown), on fields the SDM defines.
    unsafe { hw::vmwrite(field, value) }.map_err(|error| CreateError::Instruction {
        what: field.name(),
        error,
        number: hw::vmread(vmcs::VM_INSTRUCTION_ERROR),
    })
}

impl VmxVcpu {
    /// Builds and loads the VMCS for a guest on the EPT tables at `ept_root`.
    ///
    /// # Safety
    /// VMX is on for this CPU; the VMCS frame is a zeroed 4 KiB page owned by this vCPU alone
    /// for its whole life; the host state describes the running hypervisor.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn new(
        frames: VmxFrames,
        bitmaps: &Bitmaps,
        capabilities: &VmxCapabilities,
        host: &HostState,
        paging: PagingSetup,
        vpid: u16,
        entry_state: &EntryState,
    ) -> Result<VmxVcpu, CreateError> {
        let shadow_paging = paging == PagingSetup::Shadow;
        let mut controls =
            controls::compute(capabilities, shadow_paging).map_err(CreateError::Controls)?;
        if entry_state.mode == CpuMode::Long64 {
            controls.entry = capabilities
                .entry
                .adjust(controls.entry | entry::IA32E_MODE_GUEST)
                .map_err(|missing_bits| {
                    CreateError::Controls(controls::UnsupportedControl {
                        set: "VM-entry",
                        missing_bits,
                    })
                })?;
        }
        // Step 1: the VMCS region starts with the revision identifier; VMCLEAR, then VMPTRLD
        // makes it current. See: SDM Vol 3C 25.2, 25.11.3.
        // SAFETY: the frame is ours (caller's guarantee).
        unsafe {
            frames
                .vmcs
                .virtual_address
                .cast::<u32>()
                .write(capabilities.revision_id)
        };
        let region = frames.vmcs.physical.0;
        let instruction_error = |what, error| CreateError::Instruction {
            what,
            error,
            number: hw::vmread(vmcs::VM_INSTRUCTION_ERROR),
        };
        // SAFETY: VMX is on and the region is a revision-tagged page we own.
        unsafe { hw::vmclear(region) }.map_err(|error| instruction_error("VMCLEAR", error))?;
        // SAFETY: as above.
        unsafe { hw::vmptrld(region) }.map_err(|error| instruction_error("VMPTRLD", error))?;

        let ept_pointer = match paging {
            PagingSetup::Nested { root } => controls::ept_pointer(root.0, capabilities),
            PagingSetup::Shadow => 0,
        };
        let vcpu = VmxVcpu {
            frames,
            registers: GuestRegisters {
                rax: entry_state.rax,
                rbx: entry_state.rbx,
                rdi: entry_state.rdi,
                rsi: entry_state.rsi,
                ..GuestRegisters::default()
            },
            launched: false,
            next_rip: None,
            controls,
            capabilities: *capabilities,
            ept_pointer,
            vpid,
            first_run: true,
            visible: None,
            flush_pending: false,
            // A fresh vCPU must not see the MSRs, CR2 or FPU registers of a VM that ran here
            // before: they start at 0 (FPU: as after FNINIT) and are loaded by `activate` (at
            // the latest by the first `run`).
            saved_msrs: [0; PASS_THROUGH_MSRS.len()],
            saved_cr2: 0,
            extended_state: GuestExtendedState::new(ringzero_vmm::xsave::guest_area(
                &ringzero_x86::hw::cpuid_words,
            )),
            cpu_state_loaded: false,
            last_entry_event: 0,
            preemption_timer: None,
        };
        // Step 2: execution, exit and entry controls. See: SDM Vol 3C 25.6-25.8.
        write(vmcs::PIN_BASED_CONTROLS, u64::from(controls.pin))?;
        write(
            vmcs::PRIMARY_PROCESSOR_BASED_CONTROLS,
            u64::from(controls.primary),
        )?;
        write(
            vmcs::SECONDARY_PROCESSOR_BASED_CONTROLS,
            u64::from(controls.secondary),
        )?;
        write(vmcs::VM_EXIT_CONTROLS, u64::from(controls.exit))?;
        write(vmcs::VM_ENTRY_CONTROLS, u64::from(controls.entry))?;
        // Shadow paging: every #PF exits (mask 0, match 0). See: SDM Vol 3C 25.6.3.
        write(
            vmcs::EXCEPTION_BITMAP,
            if shadow_paging { 1 << 14 } else { 0 },
        )?;
        write(vmcs::PAGE_FAULT_ERROR_CODE_MASK, 0)?;
        write(vmcs::PAGE_FAULT_ERROR_CODE_MATCH, 0)?;
        write(vmcs::CR3_TARGET_COUNT, 0)?;
        write(vmcs::IO_BITMAP_A, bitmaps.io_a.0)?;
        write(vmcs::IO_BITMAP_B, bitmaps.io_b.0)?;
        write(vmcs::MSR_BITMAP, bitmaps.msr.0)?;
        if !shadow_paging {
            write(vmcs::EPT_POINTER, ept_pointer)?;
        }
        if controls.secondary & controls::secondary::ENABLE_VPID != 0 {
            write(vmcs::VIRTUAL_PROCESSOR_ID, u64::from(vpid.max(1)))?;
        }
        write(vmcs::VMCS_LINK_POINTER, u64::MAX)?;

        // Step 3: CR0/CR4 bits VMX requires but the guest did not ask for (CR0.NE, CR4.VMXE)
        // are owned by the host: set in the real register, hidden behind the read shadow.
        // See: SDM Vol 3C 25.6.6 "Guest/Host Masks and Read Shadows for CR0 and CR4".
        let mut cr0_required = capabilities.cr0_fixed0 & !((1 << 0) | (1 << 31));
        if controls.secondary & controls::secondary::UNRESTRICTED_GUEST == 0 {
            cr0_required = capabilities.cr0_fixed0;
        }
        let cr0_host_owned = cr0_required & !entry_state.cr0;
        let cr4_host_owned = capabilities.cr4_fixed0 & !entry_state.cr4;
        // Under shadow paging the host owns every bit: all writes exit, reads see the shadow.
        let (cr0_mask, cr4_mask) = if shadow_paging {
            (u64::MAX, u64::MAX)
        } else {
            (cr0_host_owned | CR0_NE, cr4_host_owned | CR4_VMXE)
        };
        write(vmcs::CR0_GUEST_HOST_MASK, cr0_mask)?;
        write(vmcs::CR0_READ_SHADOW, entry_state.cr0)?;
        write(vmcs::CR4_GUEST_HOST_MASK, cr4_mask)?;
        write(vmcs::CR4_READ_SHADOW, entry_state.cr4)?;

        // Step 4: host state: where an exit lands. See: SDM Vol 3C 25.5, 28.5.
        let segments = hw::host_segments();
        write(vmcs::HOST_CR0, host.cr0)?;
        write(vmcs::HOST_CR3, host.cr3)?;
        write(vmcs::HOST_CR4, host.cr4)?;
        write(vmcs::HOST_IA32_EFER, host.efer)?;
        write(vmcs::HOST_IA32_PAT, host.pat)?;
        write(vmcs::HOST_CS_SELECTOR, u64::from(segments.cs & !7))?;
        write(vmcs::HOST_SS_SELECTOR, u64::from(segments.ss & !7))?;
        write(vmcs::HOST_DS_SELECTOR, u64::from(segments.ds & !7))?;
        write(vmcs::HOST_ES_SELECTOR, u64::from(segments.es & !7))?;
        write(vmcs::HOST_FS_SELECTOR, u64::from(segments.fs & !7))?;
        write(vmcs::HOST_GS_SELECTOR, u64::from(segments.gs & !7))?;
        write(vmcs::HOST_TR_SELECTOR, u64::from(segments.tr & !7))?;
        write(vmcs::HOST_FS_BASE, host.fs_base)?;
        write(vmcs::HOST_GS_BASE, host.gs_base)?;
        write(vmcs::HOST_TR_BASE, segments.tr_base)?;
        write(vmcs::HOST_GDTR_BASE, segments.gdtr_base)?;
        write(vmcs::HOST_IDTR_BASE, segments.idtr_base)?;
        write(vmcs::HOST_IA32_SYSENTER_CS, 0)?;
        write(vmcs::HOST_IA32_SYSENTER_ESP, 0)?;
        write(vmcs::HOST_IA32_SYSENTER_EIP, 0)?;

        // Step 5: guest state from the loader's entry state. See: SDM Vol 3C 25.4, 27.3.1.
        let code_access = 0x9B
            | ACCESS_GRANULARITY
            | match entry_state.mode {
                CpuMode::Long64 => ACCESS_LONG,
                CpuMode::Protected32 => ACCESS_DEFAULT_32,
            };
        let data_access = 0x93 | ACCESS_DEFAULT_32 | ACCESS_GRANULARITY;
        let segments = [
            (
                vmcs::GUEST_CS_SELECTOR,
                vmcs::GUEST_CS_BASE,
                vmcs::GUEST_CS_LIMIT,
                vmcs::GUEST_CS_ACCESS_RIGHTS,
                entry_state.code_selector,
                code_access,
            ),
            (
                vmcs::GUEST_DS_SELECTOR,
                vmcs::GUEST_DS_BASE,
                vmcs::GUEST_DS_LIMIT,
                vmcs::GUEST_DS_ACCESS_RIGHTS,
                entry_state.data_selector,
                data_access,
            ),
            (
                vmcs::GUEST_ES_SELECTOR,
                vmcs::GUEST_ES_BASE,
                vmcs::GUEST_ES_LIMIT,
                vmcs::GUEST_ES_ACCESS_RIGHTS,
                entry_state.data_selector,
                data_access,
            ),
            (
                vmcs::GUEST_SS_SELECTOR,
                vmcs::GUEST_SS_BASE,
                vmcs::GUEST_SS_LIMIT,
                vmcs::GUEST_SS_ACCESS_RIGHTS,
                entry_state.data_selector,
                data_access,
            ),
            (
                vmcs::GUEST_FS_SELECTOR,
                vmcs::GUEST_FS_BASE,
                vmcs::GUEST_FS_LIMIT,
                vmcs::GUEST_FS_ACCESS_RIGHTS,
                entry_state.data_selector,
                data_access,
            ),
            (
                vmcs::GUEST_GS_SELECTOR,
                vmcs::GUEST_GS_BASE,
                vmcs::GUEST_GS_LIMIT,
                vmcs::GUEST_GS_ACCESS_RIGHTS,
                entry_state.data_selector,
                data_access,
            ),
        ];
        for (selector, base, limit, access, value, rights) in segments {
            write(selector, u64::from(value))?;
            write(base, 0)?;
            write(limit, 0xFFFF_FFFF)?;
            write(access, u64::from(rights))?;
        }
        // An empty busy TSS (type 11) and an unusable LDTR: enough for entry; the guest loads
        // its own before it needs them.
        write(vmcs::GUEST_TR_SELECTOR, 0)?;
        write(vmcs::GUEST_TR_BASE, 0)?;
        write(vmcs::GUEST_TR_LIMIT, 0xFFFF)?;
        write(vmcs::GUEST_TR_ACCESS_RIGHTS, 0x8B)?;
        write(vmcs::GUEST_LDTR_SELECTOR, 0)?;
        write(vmcs::GUEST_LDTR_BASE, 0)?;
        write(vmcs::GUEST_LDTR_LIMIT, 0)?;
        write(vmcs::GUEST_LDTR_ACCESS_RIGHTS, u64::from(ACCESS_UNUSABLE))?;
        write(vmcs::GUEST_GDTR_BASE, entry_state.gdt_base)?;
        write(vmcs::GUEST_GDTR_LIMIT, u64::from(entry_state.gdt_limit))?;
        write(vmcs::GUEST_IDTR_BASE, 0)?;
        write(vmcs::GUEST_IDTR_LIMIT, 0)?;
        write(vmcs::GUEST_CR0, entry_state.cr0 | cr0_host_owned | CR0_NE)?;
        write(vmcs::GUEST_CR3, entry_state.cr3)?;
        write(vmcs::GUEST_CR4, entry_state.cr4 | cr4_host_owned | CR4_VMXE)?;
        write(vmcs::GUEST_IA32_EFER, entry_state.efer)?;
        write(vmcs::GUEST_IA32_PAT, POWER_ON_PAT)?;
        write(vmcs::GUEST_IA32_DEBUGCTL, 0)?;
        write(vmcs::GUEST_DR7, 0x400)?;
        write(vmcs::GUEST_RSP, entry_state.rsp)?;
        write(vmcs::GUEST_RIP, entry_state.rip)?;
        write(vmcs::GUEST_RFLAGS, entry_state.rflags)?;
        write(vmcs::GUEST_PENDING_DEBUG_EXCEPTIONS, 0)?;
        write(vmcs::GUEST_INTERRUPTIBILITY_STATE, 0)?;
        write(vmcs::GUEST_ACTIVITY_STATE, 0)?;
        write(vmcs::GUEST_IA32_SYSENTER_CS, 0)?;
        write(vmcs::GUEST_IA32_SYSENTER_ESP, 0)?;
        write(vmcs::GUEST_IA32_SYSENTER_EIP, 0)?;
        Ok(vcpu)
    }

    /// Test hook: breaks the guest state (TR unusable) so the next entry fails; the entry
    /// failure report must name the field.
    pub fn corrupt_guest_state_for_test(&mut self) {
        let _ = write(vmcs::GUEST_TR_ACCESS_RIGHTS, u64::from(ACCESS_UNUSABLE));
    }

    /// Clears the VMCS and gives the page back (for the caller to free).
    /// Erases the guest's registers kept in hypervisor memory (the general-purpose registers
    /// saved at each exit, the x87/SSE/AVX registers saved by `deactivate`), where the vCPU lies:
    /// call it before moving the vCPU out of its place (a move leaves the old bytes behind), so
    /// no guest data lingers in the heap once the vCPU is gone.
    pub fn erase_saved_registers(&mut self) {
        self.extended_state.erase();
        // SAFETY: `self.registers` is a valid, exclusive, aligned place of that type.
        unsafe { core::ptr::write_volatile(&mut self.registers, GuestRegisters::default()) };
    }

    pub fn into_frames(mut self) -> VmxFrames {
        // The guest's x87/SSE/AVX registers saved by `deactivate` are erased with the vCPU.
        self.extended_state.erase();
        // SAFETY: VMX is still on and this is our VMCS; clearing it makes the region safe to
        // reuse as ordinary memory.
        let _ = unsafe { hw::vmclear(self.frames.vmcs.physical.0) };
        self.frames
    }

    /// The guest-state fields the software checks look at.
    fn guest_state_fields(&self) -> GuestStateFields {
        GuestStateFields {
            cr0: hw::vmread(vmcs::GUEST_CR0),
            cr4: hw::vmread(vmcs::GUEST_CR4),
            efer: hw::vmread(vmcs::GUEST_IA32_EFER),
            rflags: hw::vmread(vmcs::GUEST_RFLAGS),
            cs_access_rights: hw::vmread(vmcs::GUEST_CS_ACCESS_RIGHTS) as u32,
            tr_access_rights: hw::vmread(vmcs::GUEST_TR_ACCESS_RIGHTS) as u32,
            ss_access_rights: hw::vmread(vmcs::GUEST_SS_ACCESS_RIGHTS) as u32,
            ia32e_mode_guest: hw::vmread(vmcs::VM_ENTRY_CONTROLS) as u32 & entry::IA32E_MODE_GUEST
                != 0,
            unrestricted_guest: self.controls.secondary & controls::secondary::UNRESTRICTED_GUEST
                != 0,
            cr0_fixed0: self.capabilities.cr0_fixed0,
            cr0_fixed1: self.capabilities.cr0_fixed1,
            cr4_fixed0: self.capabilities.cr4_fixed0,
            cr4_fixed1: self.capabilities.cr4_fixed1,
            activity_state: hw::vmread(vmcs::GUEST_ACTIVITY_STATE) as u32,
            link_pointer: hw::vmread(vmcs::VMCS_LINK_POINTER),
            cs_limit: hw::vmread(vmcs::GUEST_CS_LIMIT) as u32,
            tr_limit: hw::vmread(vmcs::GUEST_TR_LIMIT) as u32,
            ldtr_access_rights: hw::vmread(vmcs::GUEST_LDTR_ACCESS_RIGHTS) as u32,
            interruptibility: hw::vmread(vmcs::GUEST_INTERRUPTIBILITY_STATE) as u32,
            entry_interruption_info: hw::vmread(vmcs::VM_ENTRY_INTERRUPTION_INFO) as u32,
        }
    }

    /// Flushes translations a previous VM may have left under this EPTP / VPID.
    /// See: SDM Vol 3C 29.4.3 "Maintaining TLB consistency".
    fn flush_on_first_entry(&self) {
        if self.capabilities.invept && self.capabilities.invept_all_context {
            // SAFETY: VMX is on and the CPU supports all-context INVEPT.
            let _ = unsafe { hw::invept(2, self.ept_pointer) };
        } else if self.capabilities.invept && self.capabilities.invept_single_context {
            // SAFETY: VMX is on and the CPU supports single-context INVEPT.
            let _ = unsafe { hw::invept(1, self.ept_pointer) };
        }
        if self.controls.secondary & controls::secondary::ENABLE_VPID != 0
            && self.capabilities.invvpid_single_context
        {
            // SAFETY: VMX is on and the CPU supports single-context INVVPID.
            let _ = unsafe { hw::invvpid(1, self.vpid.max(1)) };
        }
    }
}

impl Vcpu for VmxVcpu {
    fn activate(&mut self) {
        // Step 1: make this VMCS the current one unless it already is. Its launch state is
        // kept in the VMCS across VMPTRLD (no VMCLEAR: the vCPU never leaves this CPU).
        // See: SDM Vol 3C 25.1, 25.11.3, 31.3 "VMPTRLD", "VMPTRST".
        let region = self.frames.vmcs.physical.0;
        if hw::vmptrst() != region {
            // SAFETY: VMX is on (this vCPU was created in VMX operation on this CPU) and the
            // region is this vCPU's revision-tagged VMCS, never cleared while it lives.
            if let Err(error) = unsafe { hw::vmptrld(region) } {
                log::error!(
                    "vmx: VMPTRLD of VMCS {region:#x} failed ({error:?}, VM-instruction error {})",
                    hw::vmread(vmcs::VM_INSTRUCTION_ERROR)
                );
            }
        }
        // Step 2: the guest's pass-through MSRs, CR2, XCR0 and x87/SSE/AVX registers back into
        // the CPU; they stay there across VM entries and exits until `deactivate`.
        if !self.cpu_state_loaded {
            for (msr, value) in PASS_THROUGH_MSRS.into_iter().zip(self.saved_msrs) {
                // SAFETY: these MSRs exist on every 64-bit CPU and the hypervisor uses neither
                // SYSCALL nor SWAPGS; a non-canonical address was refused when the guest wrote it
                // (the guest's own WRMSR faults), so the saved values are valid.
                unsafe { ringzero_x86::hw::write_msr(msr, value) };
            }
            // SAFETY: CR2 holds no state the hypervisor depends on (it takes no page faults).
            unsafe { ringzero_x86::hw::write_cr2(self.saved_cr2) };
            self.extended_state.activate();
            self.cpu_state_loaded = true;
        }
    }

    fn deactivate(&mut self) {
        if self.cpu_state_loaded {
            for (slot, msr) in self.saved_msrs.iter_mut().zip(PASS_THROUGH_MSRS) {
                // SAFETY: reading these MSRs has no side effect; they exist on every 64-bit CPU.
                *slot = unsafe { ringzero_x86::hw::read_msr(msr) };
            }
            self.saved_cr2 = ringzero_x86::hw::read_cr2();
            // The guest's extended state saved, the host's XCR0 back.
            self.extended_state.deactivate();
            self.cpu_state_loaded = false;
        }
    }

    fn guest_xcr0(&self) -> u64 {
        self.extended_state.xcr0()
    }

    fn set_guest_xcr0(&mut self, value: u64) {
        self.extended_state.set_xcr0(value);
    }

    fn can_inject_interrupt(&self) -> bool {
        can_take_interrupt(
            hw::vmread(vmcs::GUEST_RFLAGS),
            hw::vmread(vmcs::GUEST_INTERRUPTIBILITY_STATE),
            hw::vmread(vmcs::VM_ENTRY_INTERRUPTION_INFO),
        )
    }

    fn inject_interrupt(&mut self, vector: u8) {
        // See: SDM Vol 3C 25.8.3, 27.6.1 (delivered through the guest's IDT as from the APIC).
        let _ = write(
            vmcs::VM_ENTRY_INTERRUPTION_INFO,
            external_interrupt_information(vector),
        );
    }

    fn request_interrupt_window(&mut self, enabled: bool) {
        // See: SDM Vol 3C 25.6.2 (primary bit 2), 26.7.5.
        match controls::with_interrupt_window(&self.capabilities, self.controls.primary, enabled) {
            Some(primary) if primary != self.controls.primary => {
                self.controls.primary = primary;
                let _ = write(vmcs::PRIMARY_PROCESSOR_BASED_CONTROLS, u64::from(primary));
            }
            Some(_) => {}
            None => log::warn!("vmx: the CPU does not allow interrupt-window exiting"),
        }
    }

    fn start_at_startup_vector(&mut self, vector: u8) {
        if self.controls.secondary & controls::secondary::UNRESTRICTED_GUEST == 0 {
            // Real mode needs unrestricted guest (EPT): under shadow paging the entry fails
            // and the report names CR0.
            log::warn!("vmx: a startup IPI needs unrestricted guest (nested paging); this vCPU's next entry will fail");
        }
        let entry_controls = hw::vmread(vmcs::VM_ENTRY_CONTROLS) as u32;
        for (field, value) in startup_state(vector, &self.capabilities, entry_controls) {
            let _ = write(field, value);
        }
        self.controls.entry = entry_controls & !entry::IA32E_MODE_GUEST;
        // GPRs 0 (RDX would hold the CPU signature after INIT; 0 is allowed here).
        self.registers = GuestRegisters::default();
        self.next_rip = None;
    }

    fn write_guest_control_register(&mut self, register: u8, value: u64) -> bool {
        // See: SDM Vol 3C 25.6.6: the guest reads the read shadow for the bits the host owns;
        // the real register must keep the bits VMX requires (Vol 3D A.7, A.8; with unrestricted
        // guest PE and PG are free).
        let capabilities = self.capabilities;
        let unrestricted = self.controls.secondary & controls::secondary::UNRESTRICTED_GUEST != 0;
        match register {
            0 => {
                let mut fixed0 = capabilities.cr0_fixed0;
                if unrestricted {
                    fixed0 &= !(CR0_PE | CR0_PG);
                }
                let real = (value | fixed0) & capabilities.cr0_fixed1;
                // IA-32e mode follows CR0.PG while EFER.LME is set: activated when paging is
                // turned on, deactivated when it is turned off; the "IA-32e mode guest" entry
                // control must equal EFER.LMA. See: SDM Vol 3A 10.8.5; Vol 3C 27.3.1.1.
                let mut efer = hw::vmread(vmcs::GUEST_IA32_EFER);
                if value & CR0_PG != 0 && efer & EFER_LME != 0 {
                    efer |= EFER_LMA;
                } else if value & CR0_PG == 0 {
                    efer &= !EFER_LMA;
                }
                let mut entry_controls =
                    hw::vmread(vmcs::VM_ENTRY_CONTROLS) & !u64::from(entry::IA32E_MODE_GUEST);
                if efer & EFER_LMA != 0 {
                    entry_controls |= u64::from(entry::IA32E_MODE_GUEST);
                }
                write(vmcs::CR0_READ_SHADOW, value).is_ok()
                    && write(vmcs::GUEST_CR0, real).is_ok()
                    && write(vmcs::GUEST_IA32_EFER, efer).is_ok()
                    && write(vmcs::VM_ENTRY_CONTROLS, entry_controls).is_ok()
            }
            4 => {
                let real = (value | capabilities.cr4_fixed0) & capabilities.cr4_fixed1;
                write(vmcs::CR4_READ_SHADOW, value).is_ok() && write(vmcs::GUEST_CR4, real).is_ok()
            }
            _ => false,
        }
    }

    fn set_preemption_timer(&mut self, tsc_cycles: Option<u64>) -> bool {
        // See: SDM Vol 3C 25.6.1 (pin-based bit 6), 26.5.1; Vol 3D A.6 (the rate).
        let Some(pin) = controls::with_preemption_timer(
            &self.capabilities,
            self.controls.pin,
            tsc_cycles.is_some(),
        ) else {
            return false;
        };
        if pin != self.controls.pin {
            self.controls.pin = pin;
            let _ = write(vmcs::PIN_BASED_CONTROLS, u64::from(pin));
        }
        self.preemption_timer = tsc_cycles.map(|cycles| {
            controls::preemption_timer_value(cycles, self.capabilities.preemption_timer_rate_shift)
        });
        true
    }

    fn run(&mut self) -> VmExit {
        // This vCPU's VMCS current and its MSRs loaded (a no-op when the scheduler did it).
        self.activate();
        if let Some(value) = self.preemption_timer {
            // Without "save VMX-preemption timer value" the entry loads the timer from this
            // field every time: the bound applies to each run. See: SDM Vol 3C 26.5.1, 27.7.4.
            let _ = write(vmcs::VMX_PREEMPTION_TIMER_VALUE, u64::from(value));
        }
        if core::mem::replace(&mut self.first_run, false) {
            self.flush_on_first_entry();
        }
        if core::mem::replace(&mut self.flush_pending, false)
            && self.controls.secondary & controls::secondary::ENABLE_VPID != 0
        {
            // Shadow paging dropped translations: flush this VPID's. Without VPID every entry
            // and exit flushes anyway. See: SDM Vol 3C 29.4.3.
            let kind = if self.capabilities.invvpid_single_context {
                1
            } else {
                2
            };
            // SAFETY: VMX is on and the CPU supports this INVVPID type.
            let _ = unsafe { hw::invvpid(kind, self.vpid.max(1)) };
        }
        self.last_entry_event = hw::vmread(vmcs::VM_ENTRY_INTERRUPTION_INFO);
        // SAFETY: VMX is on, this vCPU's VMCS is current with complete host state (`new`), and
        // the hypervisor runs with interrupts off.
        let outcome = unsafe { hw::world_switch(&mut self.registers, self.launched) };
        self.next_rip = None;
        // Nothing is left to inject unless a handler asks again.
        let _ = write(vmcs::VM_ENTRY_INTERRUPTION_INFO, 0);
        match outcome {
            EntryOutcome::Failed(error) => {
                let number = hw::vmread(vmcs::VM_INSTRUCTION_ERROR);
                let meaning = match error {
                    VmxInstructionError::FailInvalid => {
                        "VMLAUNCH/VMRESUME failed: no current VMCS (VMfailInvalid)"
                    }
                    VmxInstructionError::FailValid => exit::instruction_error_meaning(number),
                };
                log::warn!("vmx: VM entry failed: {meaning} (VM-instruction error {number}, SDM Vol 3C 31.4)");
                VmExit::EntryFailed {
                    reason: meaning,
                    detail: number,
                }
            }
            EntryOutcome::Exited => {
                self.launched = true;
                let exit_reason = hw::vmread(vmcs::EXIT_REASON) as u32;
                let qualification = hw::vmread(vmcs::EXIT_QUALIFICATION);
                let decoded = if exit_reason & 0xFFFF == exit::reason::EXCEPTION_OR_NMI {
                    // Interruption information: vector 7:0, type 10:8 (2 = NMI, 3 = hardware
                    // exception). Under shadow paging the only exception exiting is #PF, whose
                    // qualification is the faulting address. See: SDM Vol 3C 28.2.2.
                    let information = hw::vmread(vmcs::VM_EXIT_INTERRUPTION_INFO);
                    if information & 0xFF == 14 && (information >> 8) & 7 == 3 {
                        VmExit::PageFault {
                            address: qualification,
                            error_code: hw::vmread(vmcs::VM_EXIT_INTERRUPTION_ERROR_CODE) as u32,
                        }
                    } else if (information >> 8) & 7 == 2 {
                        VmExit::ExternalInterrupt
                    } else {
                        VmExit::Unhandled {
                            code: 0,
                            info1: information,
                            info2: qualification,
                        }
                    }
                } else {
                    exit::decode(
                        exit_reason,
                        qualification,
                        hw::vmread(vmcs::GUEST_PHYSICAL_ADDRESS),
                    )
                };
                if let VmExit::EntryFailed { reason, .. } = decoded {
                    // The hardware only says "invalid guest state": name the field if we can.
                    let field = exit::diagnose_guest_state(&self.guest_state_fields())
                        .unwrap_or("no field identified by ringzero's checks (SDM Vol 3C 27.3.1 lists them all)");
                    log::warn!("vmx: {reason}; exit qualification {qualification:#x}; offending field: {field}");
                    self.launched = false;
                    return decoded;
                }
                // An event whose delivery the exit interrupted (an injected external interrupt
                // too, e.g. when its IDT entry or stack needed an EPT fix) is delivered again.
                // See: SDM Vol 3C 28.2.4 "Information for VM Exits During Event Delivery".
                if let Some(information) = reinjection(hw::vmread(vmcs::IDT_VECTORING_INFO)) {
                    let _ = write(vmcs::VM_ENTRY_INTERRUPTION_INFO, information);
                    let _ = write(
                        vmcs::VM_ENTRY_EXCEPTION_ERROR_CODE,
                        hw::vmread(vmcs::IDT_VECTORING_ERROR_CODE),
                    );
                    let _ = write(
                        vmcs::VM_ENTRY_INSTRUCTION_LENGTH,
                        hw::vmread(vmcs::VM_EXIT_INSTRUCTION_LENGTH),
                    );
                }
                // The interrupt window is asked for once: taken, it is closed again (the core
                // asks anew when it still has something to deliver).
                if decoded == VmExit::InterruptWindow {
                    self.request_interrupt_window(false);
                }
                // The exit instruction length is valid for instruction exits. See: SDM Vol 3C 28.2.5.
                if matches!(
                    decoded,
                    VmExit::Cpuid
                        | VmExit::Halt
                        | VmExit::Io(_)
                        | VmExit::MsrRead
                        | VmExit::MsrWrite
                        | VmExit::Hypercall
                        | VmExit::ControlRegister(_)
                        | VmExit::Invlpg { .. }
                        | VmExit::Xsetbv
                ) {
                    let length = hw::vmread(vmcs::VM_EXIT_INSTRUCTION_LENGTH);
                    self.next_rip = Some(hw::vmread(vmcs::GUEST_RIP).wrapping_add(length));
                }
                decoded
            }
        }
    }

    fn register(&self, register: Register) -> u64 {
        let registers = &self.registers;
        match register {
            Register::Rsp => hw::vmread(vmcs::GUEST_RSP),
            Register::Rip => hw::vmread(vmcs::GUEST_RIP),
            Register::Rflags => hw::vmread(vmcs::GUEST_RFLAGS),
            Register::Rax => registers.rax,
            Register::Rbx => registers.rbx,
            Register::Rcx => registers.rcx,
            Register::Rdx => registers.rdx,
            Register::Rsi => registers.rsi,
            Register::Rdi => registers.rdi,
            Register::Rbp => registers.rbp,
            Register::R8 => registers.r8,
            Register::R9 => registers.r9,
            Register::R10 => registers.r10,
            Register::R11 => registers.r11,
            Register::R12 => registers.r12,
            Register::R13 => registers.r13,
            Register::R14 => registers.r14,
            Register::R15 => registers.r15,
        }
    }

    fn set_register(&mut self, register: Register, value: u64) {
        let registers = &mut self.registers;
        let slot = match register {
            Register::Rsp | Register::Rip | Register::Rflags => {
                let field = match register {
                    Register::Rsp => vmcs::GUEST_RSP,
                    Register::Rip => vmcs::GUEST_RIP,
                    _ => vmcs::GUEST_RFLAGS,
                };
                let _ = write(field, value);
                if register == Register::Rip {
                    // The core moves RIP only past an instruction it completed for the guest (or
                    // to a new start): an STI / MOV SS shadow ends with that instruction, as on
                    // hardware, so `sti; hlt` can take an interrupt right after the HLT.
                    // See: SDM Vol 3C 25.4.2 (Table 25-3), Vol 2B "STI".
                    let blocking = hw::vmread(vmcs::GUEST_INTERRUPTIBILITY_STATE);
                    if blocking & (BLOCKING_BY_STI | BLOCKING_BY_MOV_SS) != 0 {
                        let _ = write(
                            vmcs::GUEST_INTERRUPTIBILITY_STATE,
                            blocking & !(BLOCKING_BY_STI | BLOCKING_BY_MOV_SS),
                        );
                    }
                }
                return;
            }
            Register::Rax => &mut registers.rax,
            Register::Rbx => &mut registers.rbx,
            Register::Rcx => &mut registers.rcx,
            Register::Rdx => &mut registers.rdx,
            Register::Rsi => &mut registers.rsi,
            Register::Rdi => &mut registers.rdi,
            Register::Rbp => &mut registers.rbp,
            Register::R8 => &mut registers.r8,
            Register::R9 => &mut registers.r9,
            Register::R10 => &mut registers.r10,
            Register::R11 => &mut registers.r11,
            Register::R12 => &mut registers.r12,
            Register::R13 => &mut registers.r13,
            Register::R14 => &mut registers.r14,
            Register::R15 => &mut registers.r15,
        };
        *slot = value;
    }

    fn fault_context(&self) -> FaultContext {
        FaultContext {
            idtr_base: hw::vmread(vmcs::GUEST_IDTR_BASE),
            idtr_limit: hw::vmread(vmcs::GUEST_IDTR_LIMIT) as u32,
            gdtr_base: hw::vmread(vmcs::GUEST_GDTR_BASE),
            gdtr_limit: hw::vmread(vmcs::GUEST_GDTR_LIMIT) as u32,
            tr_base: hw::vmread(vmcs::GUEST_TR_BASE),
            tr_limit: hw::vmread(vmcs::GUEST_TR_LIMIT) as u32,
            entry_event: self.last_entry_event,
            exit_event: hw::vmread(vmcs::IDT_VECTORING_INFO),
            nested_root: if self.visible.is_none() {
                hw::vmread(vmcs::EPT_POINTER) & !0xFFF
            } else {
                0
            },
            // Not in the VMCS: the CPU's own CR2 while this vCPU's state is loaded.
            cr2: if self.cpu_state_loaded {
                ringzero_x86::hw::read_cr2()
            } else {
                self.saved_cr2
            },
        }
    }

    fn snapshot(&self) -> GuestSnapshot {
        // The guest's view of CR0/CR4: host-owned bits come from the read shadows.
        let cr0_mask = hw::vmread(vmcs::CR0_GUEST_HOST_MASK);
        let cr4_mask = hw::vmread(vmcs::CR4_GUEST_HOST_MASK);
        let cr0 = (hw::vmread(vmcs::GUEST_CR0) & !cr0_mask)
            | (hw::vmread(vmcs::CR0_READ_SHADOW) & cr0_mask);
        let cr4 = (hw::vmread(vmcs::GUEST_CR4) & !cr4_mask)
            | (hw::vmread(vmcs::CR4_READ_SHADOW) & cr4_mask);
        let real_efer = hw::vmread(vmcs::GUEST_IA32_EFER);
        let (cr0, cr3, cr4, efer) = match self.visible {
            Some(visible) => (visible.cr0, visible.cr3, visible.cr4, visible.efer),
            None => (cr0, hw::vmread(vmcs::GUEST_CR3), cr4, real_efer),
        };
        let cs_access = hw::vmread(vmcs::GUEST_CS_ACCESS_RIGHTS) as u32;
        GuestSnapshot {
            rip: hw::vmread(vmcs::GUEST_RIP),
            rsp: hw::vmread(vmcs::GUEST_RSP),
            rflags: hw::vmread(vmcs::GUEST_RFLAGS),
            cr0,
            cr3,
            cr4,
            efer,
            cs_base: hw::vmread(vmcs::GUEST_CS_BASE),
            cs_long_mode: real_efer & EFER_LMA != 0 && cs_access & ACCESS_LONG != 0,
            cs_default_32: cs_access & ACCESS_DEFAULT_32 != 0,
            // CPL = SS.DPL. See: SDM Vol 3C 25.4.1.
            cpl: ((hw::vmread(vmcs::GUEST_SS_ACCESS_RIGHTS) >> 5) & 3) as u8,
        }
    }

    fn next_rip(&self) -> Option<u64> {
        self.next_rip
    }

    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) {
        let mut information = u64::from(vector) | EVENT_TYPE_HARDWARE_EXCEPTION | EVENT_VALID;
        if let Some(code) = error_code {
            information |= EVENT_DELIVER_ERROR_CODE;
            let _ = write(vmcs::VM_ENTRY_EXCEPTION_ERROR_CODE, u64::from(code));
        }
        let _ = write(vmcs::VM_ENTRY_INTERRUPTION_INFO, information);
    }

    fn hardware_msr(&self, msr: u32) -> Option<u64> {
        Some(match msr {
            0xC000_0080 => hw::vmread(vmcs::GUEST_IA32_EFER),
            0x277 => hw::vmread(vmcs::GUEST_IA32_PAT),
            0xC000_0100 => hw::vmread(vmcs::GUEST_FS_BASE),
            0xC000_0101 => hw::vmread(vmcs::GUEST_GS_BASE),
            0x174 => hw::vmread(vmcs::GUEST_IA32_SYSENTER_CS),
            0x175 => hw::vmread(vmcs::GUEST_IA32_SYSENTER_ESP),
            0x176 => hw::vmread(vmcs::GUEST_IA32_SYSENTER_EIP),
            _ => return None,
        })
    }

    fn set_hardware_msr(&mut self, msr: u32, value: u64) -> bool {
        // EFER bits a guest may set: SCE, LME, LMA, NXE (SDM Vol 3A 2.2.1); LMA must follow the
        // IA-32e mode entry control, so a guest switching modes is not supported yet.
        const EFER_ALLOWED: u64 = (1 << 0) | (1 << 8) | (1 << 10) | (1 << 11);
        let field = match msr {
            0xC000_0080 if value & !EFER_ALLOWED == 0 => vmcs::GUEST_IA32_EFER,
            0x277 => vmcs::GUEST_IA32_PAT,
            0xC000_0100 => vmcs::GUEST_FS_BASE,
            0xC000_0101 => vmcs::GUEST_GS_BASE,
            0x174 => vmcs::GUEST_IA32_SYSENTER_CS,
            0x175 => vmcs::GUEST_IA32_SYSENTER_ESP,
            0x176 => vmcs::GUEST_IA32_SYSENTER_EIP,
            _ => return false,
        };
        write(field, value).is_ok()
    }

    fn set_shadow_paging(
        &mut self,
        visible: &GuestPagingState,
        real: &RealPaging,
        root: HostPhysAddr,
    ) {
        self.visible = Some(*visible);
        let capabilities = &self.capabilities;
        // The real registers must satisfy VMX's fixed bits (NE, VMXE; PE and PG as there is no
        // unrestricted guest under shadow paging). See: SDM Vol 3D A.7, A.8.
        let cr0 = (real.cr0 | capabilities.cr0_fixed0) & capabilities.cr0_fixed1;
        let cr4 = (real.cr4 | capabilities.cr4_fixed0) & capabilities.cr4_fixed1;
        let _ = write(vmcs::GUEST_CR0, cr0);
        let _ = write(vmcs::GUEST_CR4, cr4);
        let _ = write(vmcs::GUEST_CR3, root.0);
        let _ = write(vmcs::GUEST_IA32_EFER, real.efer);
        let _ = write(vmcs::CR0_READ_SHADOW, visible.cr0);
        let _ = write(vmcs::CR4_READ_SHADOW, visible.cr4);
        // The "IA-32e mode guest" entry control must equal the real EFER.LMA. See: SDM Vol 3C 27.3.1.1.
        let mut entry_controls =
            hw::vmread(vmcs::VM_ENTRY_CONTROLS) & !u64::from(entry::IA32E_MODE_GUEST);
        if real.efer & EFER_LMA != 0 {
            entry_controls |= u64::from(entry::IA32E_MODE_GUEST);
        }
        let _ = write(vmcs::VM_ENTRY_CONTROLS, entry_controls);
    }

    fn flush_guest_tlb(&mut self) {
        self.flush_pending = true;
    }

    fn inject_page_fault(&mut self, address: u64, error_code: u32) {
        // VMX keeps the guest's CR2 in the real register: set it now (or in the saved copy
        // while another vCPU's is loaded); nothing in the hypervisor touches CR2 before the
        // next entry.
        if self.cpu_state_loaded {
            // SAFETY: CR2 only reports page-fault addresses; the hypervisor takes none.
            unsafe { ringzero_x86::hw::write_cr2(address) };
        } else {
            self.saved_cr2 = address;
        }
        self.inject_exception(14, Some(error_code));
    }

    fn set_guest_cr3(&mut self, value: u64) {
        // A MOV to CR3 flushes the guest's non-global translations; writing the field does
        // not, so flush the VPID before the next entry. See: SDM Vol 3C 29.4.3.
        let _ = write(vmcs::GUEST_CR3, value);
        self.flush_pending = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controls::bochs_capabilities;
    use crate::exit::{diagnose_guest_state, GuestStateFields};

    /// The value `startup_state` writes to `field` (the test fails if it writes none).
    fn written(writes: &[(Field, u64)], field: Field) -> u64 {
        writes
            .iter()
            .find(|(written, _)| *written == field)
            .map(|(_, value)| *value)
            .unwrap_or_else(|| panic!("{} is not written", field.name()))
    }

    #[test]
    fn external_interrupt_encoding() {
        // Vector 0x20, type 0 (external interrupt), no error code, valid.
        assert_eq!(external_interrupt_information(0x20), 0x8000_0020);
        assert_eq!(external_interrupt_information(0xFF), 0x8000_00FF);
    }

    #[test]
    fn interrupt_injection_needs_if_no_shadow_and_nothing_queued() {
        assert!(can_take_interrupt(0x202, 0, 0));
        assert!(!can_take_interrupt(0x002, 0, 0), "RFLAGS.IF clear");
        assert!(!can_take_interrupt(0x202, BLOCKING_BY_STI, 0), "STI shadow");
        assert!(
            !can_take_interrupt(0x202, BLOCKING_BY_MOV_SS, 0),
            "MOV SS shadow"
        );
        // Blocking by SMI (bit 2) and by NMI (bit 3) do not block external interrupts.
        assert!(can_take_interrupt(0x202, 0b1100, 0));
        assert!(!can_take_interrupt(
            0x202,
            0,
            external_interrupt_information(0x30)
        ));
        // An invalid (bit 31 clear) leftover does not count.
        assert!(can_take_interrupt(0x202, 0, 0x30));
    }

    #[test]
    fn interrupted_deliveries_are_delivered_again() {
        // An external interrupt whose delivery hit an EPT violation: same event again.
        assert_eq!(reinjection(0x8000_0020), Some(0x8000_0020));
        // Undefined bit 12 (and 30:13) dropped; a #PF with its error code kept.
        assert_eq!(reinjection(0x8000_1B0E | (1 << 20)), Some(0x8000_0B0E));
        // An NMI (type 2).
        assert_eq!(reinjection(0x8000_0202), Some(0x8000_0202));
        assert_eq!(reinjection(0x0000_0020), None);
    }

    /// The fields the guest-state checks look at, as `startup_state` writes them into a VMCS
    /// that held a 64-bit guest (link pointer all ones, as `new` leaves it).
    fn fields_after_startup(
        writes: &[(Field, u64)],
        capabilities: &VmxCapabilities,
        unrestricted_guest: bool,
    ) -> GuestStateFields {
        let value = |field: Field| {
            writes
                .iter()
                .rev()
                .find(|(written, _)| *written == field)
                .map(|(_, value)| *value)
                .unwrap_or_else(|| panic!("{} is written", field.name()))
        };
        GuestStateFields {
            cr0: value(vmcs::GUEST_CR0),
            cr4: value(vmcs::GUEST_CR4),
            efer: value(vmcs::GUEST_IA32_EFER),
            rflags: value(vmcs::GUEST_RFLAGS),
            cs_access_rights: value(vmcs::GUEST_CS_ACCESS_RIGHTS) as u32,
            tr_access_rights: value(vmcs::GUEST_TR_ACCESS_RIGHTS) as u32,
            ss_access_rights: value(vmcs::GUEST_SS_ACCESS_RIGHTS) as u32,
            ia32e_mode_guest: value(vmcs::VM_ENTRY_CONTROLS) as u32 & entry::IA32E_MODE_GUEST != 0,
            unrestricted_guest,
            cr0_fixed0: capabilities.cr0_fixed0,
            cr0_fixed1: capabilities.cr0_fixed1,
            cr4_fixed0: capabilities.cr4_fixed0,
            cr4_fixed1: capabilities.cr4_fixed1,
            activity_state: value(vmcs::GUEST_ACTIVITY_STATE) as u32,
            link_pointer: u64::MAX,
            cs_limit: value(vmcs::GUEST_CS_LIMIT) as u32,
            tr_limit: value(vmcs::GUEST_TR_LIMIT) as u32,
            ldtr_access_rights: value(vmcs::GUEST_LDTR_ACCESS_RIGHTS) as u32,
            interruptibility: value(vmcs::GUEST_INTERRUPTIBILITY_STATE) as u32,
            entry_interruption_info: value(vmcs::VM_ENTRY_INTERRUPTION_INFO) as u32,
        }
    }

    #[test]
    fn startup_state_is_real_mode_at_the_vector() {
        let capabilities = bochs_capabilities();
        let controls = controls::compute(&capabilities, false).unwrap();
        let long_mode_entry = controls.entry | entry::IA32E_MODE_GUEST;
        let writes = startup_state(0x9A, &capabilities, long_mode_entry);
        let value = |field: Field| written(&writes, field);
        assert_eq!(value(vmcs::GUEST_CS_SELECTOR), 0x9A00);
        assert_eq!(value(vmcs::GUEST_CS_BASE), 0x9_A000);
        assert_eq!(value(vmcs::GUEST_CS_LIMIT), 0xFFFF);
        assert_eq!(value(vmcs::GUEST_RIP), 0);
        assert_eq!(value(vmcs::GUEST_RFLAGS), 0x2);
        for field in [
            vmcs::GUEST_DS_SELECTOR,
            vmcs::GUEST_SS_BASE,
            vmcs::GUEST_GS_BASE,
            vmcs::GUEST_GDTR_BASE,
            vmcs::GUEST_IDTR_BASE,
            vmcs::GUEST_CR3,
            vmcs::GUEST_IA32_EFER,
            vmcs::CR4_READ_SHADOW,
        ] {
            assert_eq!(value(field), 0, "{}", field.name());
        }
        assert_eq!(value(vmcs::GUEST_IDTR_LIMIT), 0xFFFF);
        assert_eq!(value(vmcs::GUEST_DR7), 0x400);
        // The guest reads CR0 = 0x60000010 (CD, NW, ET) and CR4 = 0; NE and VMXE are set in
        // the real registers and owned by the host (masked). PE = PG = 0 (unrestricted guest).
        assert_eq!(value(vmcs::CR0_READ_SHADOW), 0x6000_0010);
        assert_eq!(value(vmcs::GUEST_CR0), 0x6000_0030);
        assert_eq!(value(vmcs::CR0_GUEST_HOST_MASK) & CR0_NE, CR0_NE);
        assert_eq!(value(vmcs::GUEST_CR4), CR4_VMXE);
        assert_eq!(value(vmcs::CR4_GUEST_HOST_MASK) & CR4_VMXE, CR4_VMXE);
        // No long mode, nothing left to inject; the other entry controls kept.
        assert_eq!(
            value(vmcs::VM_ENTRY_CONTROLS),
            u64::from(controls.entry & !entry::IA32E_MODE_GUEST)
        );
        assert_eq!(value(vmcs::VM_ENTRY_INTERRUPTION_INFO), 0);
        // The entry checks ringzero knows pass with unrestricted guest...
        let fields = fields_after_startup(&writes, &capabilities, true);
        assert_eq!(diagnose_guest_state(&fields), None, "{fields:?}");
        // ...and name CR0 without it (real mode needs unrestricted guest).
        let fields = fields_after_startup(&writes, &capabilities, false);
        assert!(diagnose_guest_state(&fields)
            .unwrap()
            .starts_with("GUEST_CR0"));
    }

    #[test]
    fn startup_state_keeps_every_bit_a_real_skylake_requires() {
        // A CPU that also requires CR0.ET... and more: whatever CR0/CR4_FIXED0 say (minus PE and
        // PG) is set in the real registers and masked.
        let mut capabilities = bochs_capabilities();
        capabilities.cr0_fixed0 = 0x8000_0031;
        capabilities.cr4_fixed0 = 0x2000 | (1 << 5);
        let writes = startup_state(0x10, &capabilities, 0);
        let value = |field: Field| written(&writes, field);
        assert_eq!(value(vmcs::GUEST_CR0), 0x6000_0030);
        assert_eq!(value(vmcs::GUEST_CR4), 0x2020);
        assert_eq!(value(vmcs::CR4_GUEST_HOST_MASK), 0x2020);
        assert_eq!(value(vmcs::CR4_READ_SHADOW), 0);
        assert_eq!(value(vmcs::GUEST_CS_BASE), 0x1_0000);
        let fields = fields_after_startup(&writes, &capabilities, true);
        assert_eq!(diagnose_guest_state(&fields), None);
    }
}
