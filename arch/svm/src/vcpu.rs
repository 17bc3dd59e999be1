//! One SVM vCPU: a VMCB, the page for the host's hidden state, and the guest registers the
//! VMCB does not hold. Mirrors `arch/vmx/src/vcpu.rs` method for method.

use crate::exit;
use crate::hw::{self, GuestRegisters, EFER_SVME};
use crate::intercepts;
use crate::vmcb::{Segment, StateSaveArea, Vmcb, ATTRIBUTE_DEFAULT_32, ATTRIBUTE_LONG};
use core::ptr::NonNull;
use ringzero_loader::boot_plan::{CpuMode, EntryState};
use ringzero_memory::shadow::{GuestPagingState, RealPaging};
use ringzero_memory::HostPhysAddr;
use ringzero_vmm::exit::VmExit;
use ringzero_vmm::vcpu::{FaultContext, GuestSnapshot, Register, Vcpu};
use ringzero_x86::extended_state::GuestExtendedState;

/// A host page (or run of contiguous pages) the backend uses: where the hardware sees it and
/// where the hypervisor does.
#[derive(Clone, Copy, Debug)]
pub struct Frame {
    pub physical: HostPhysAddr,
    pub virtual_address: NonNull<u8>,
}

/// The I/O and MSR permission maps, shared by every vCPU of this CPU: all ones, so every port
/// access and every RDMSR/WRMSR exits. See: APM Vol 2 15.10.1, 15.11.
pub struct PermissionMaps {
    iopm: HostPhysAddr,
    msrpm: HostPhysAddr,
}

impl PermissionMaps {
    /// Fills the maps with ones (intercept everything).
    ///
    /// # Safety
    /// `iopm` spans 12 KiB and `msrpm` 8 KiB of physically contiguous host memory, both
    /// mapped writable at their virtual addresses and reserved for these maps.
    pub unsafe fn intercept_everything(iopm: Frame, msrpm: Frame) -> PermissionMaps {
        // SAFETY: the caller guarantees both regions are ours and large enough.
        unsafe {
            core::ptr::write_bytes(iopm.virtual_address.as_ptr(), 0xFF, intercepts::IOPM_SIZE);
            core::ptr::write_bytes(msrpm.virtual_address.as_ptr(), 0xFF, intercepts::MSRPM_SIZE);
        }
        PermissionMaps {
            iopm: iopm.physical,
            msrpm: msrpm.physical,
        }
    }
}

/// The pages one vCPU owns.
#[derive(Clone, Copy, Debug)]
pub struct SvmFrames {
    /// The guest's VMCB.
    pub vmcb: Frame,
    /// Where the world switch VMSAVEs the host's hidden state.
    pub host_state: Frame,
}

/// How the guest's memory is translated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PagingSetup {
    /// Nested paging with tables rooted here (N_CR3).
    Nested { root: HostPhysAddr },
    /// Shadow paging: the core loads the shadow root and real registers through
    /// `Vcpu::set_shadow_paging` before the first run.
    Shadow,
}

/// What this CPU's SVM offers that the backend uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SvmFeatures {
    pub nrip_save: bool,
    pub decode_assists: bool,
}

/// One vCPU on AMD SVM.
pub struct SvmVcpu {
    frames: SvmFrames,
    registers: GuestRegisters,
    features: SvmFeatures,
    next_rip: Option<u64>,
    first_run: bool,
    /// Shadow paging: the paging registers the guest believes in.
    visible: Option<GuestPagingState>,
    flush_pending: bool,
    /// The guest's x87/SSE/AVX registers and XCR0 while they are not in the CPU (the one piece
    /// of guest state outside the VMCB: VMRUN and #VMEXIT leave them alone).
    extended_state: GuestExtendedState,
    /// EVENTINJ as the last VMRUN read it (the field is rewritten after each exit), for
    /// failure reports.
    last_entry_event: u64,
    /// The nested root this vCPU was built with (`None` under shadow paging): checked against
    /// the VMCB before every VMRUN, since nothing may change it.
    nested_root: Option<u64>,
}

/// The power-on PAT value (WB, WT, UC-, UC repeated). See: SDM Vol 3A 13.12.4 / APM Vol 2 7.8.2.
const POWER_ON_PAT: u64 = 0x0007_0406_0007_0406;
/// EVENTINJ type 3 = exception; bit 11 error code valid; bit 31 valid. See: APM Vol 2 15.20.
const EVENT_TYPE_EXCEPTION: u64 = 3 << 8;
const EVENT_ERROR_CODE_VALID: u64 = 1 << 11;
const EVENT_VALID: u64 = 1 << 31;
/// EVENTINJ type 0 = external interrupt (INTR). See: APM Vol 2 15.20.
const EVENT_TYPE_INTERRUPT: u64 = 0;
const RFLAGS_IF: u64 = 1 << 9;
/// VMCB 0x068 bit 0: the guest is in an interrupt shadow (after STI or MOV SS).
/// See: APM Vol 2 15.21.5, Table B-1.
const INTERRUPT_SHADOW: u64 = 1 << 0;

/// The EVENTINJ value that delivers external interrupt `vector` as an INTR would: type 0,
/// valid, no error code. The hardware delivers an injected event whatever the guest's IF or
/// interrupt shadow, so the caller checks [`can_take_interrupt`] first. See: APM Vol 2 15.20.
pub fn interrupt_event(vector: u8) -> u64 {
    u64::from(vector) | EVENT_TYPE_INTERRUPT | EVENT_VALID
}

/// Whether the guest can take an external interrupt at the next VMRUN: RFLAGS.IF = 1, no
/// interrupt shadow, and no event already in EVENTINJ (an injection the core queued, or one
/// whose delivery an exit interrupted). See: APM Vol 2 15.20, 15.21.5.
pub fn can_take_interrupt(rflags: u64, interrupt_shadow: u64, event_injection: u64) -> bool {
    rflags & RFLAGS_IF != 0
        && interrupt_shadow & INTERRUPT_SHADOW == 0
        && event_injection & EVENT_VALID == 0
}

/// The EVENTINJ value after an exit: the event whose delivery the exit interrupted
/// (EXITINTINFO, same format), external interrupts, NMIs and exceptions alike, or 0.
/// Software interrupts (INT n) and software exceptions (INT3, INTO) are not re-injected: RIP
/// still points at the instruction, so the guest executes it again and the event happens anew.
/// Re-injecting would need the return address (NRIP) set past the instruction; without it the
/// instruction would run twice. (KVM does the same without NRIP save.)
/// See: APM Vol 2 15.7.2 "Intercepts during IDT interrupt delivery", 15.20.
pub fn reinjected_event(exit_interrupt_info: u64) -> u64 {
    if exit_interrupt_info & EVENT_VALID != 0 && !is_software_event(exit_interrupt_info) {
        exit_interrupt_info
    } else {
        0
    }
}

/// Puts the state after INIT + startup IPI with `vector` into the state save area: real mode at
/// CS:IP = (vector << 8):0 with CS base vector << 12, every other segment selector 0 base 0
/// limit 0xFFFF, GDTR/IDTR base 0 limit 0xFFFF, CR0 0x60000010 (CD, NW, ET), CR2/CR3/CR4 0,
/// EFER 0 (SVME stays set: VMRUN requires it, the guest never sees it), DR6 0xFFFF0FF0, DR7
/// 0x400, RFLAGS 0x2, RIP/RSP/RAX 0. Nested paging only (the guest's CR0 is the real one).
/// See: SDM Vol 3A 9.1.1 Table 9-1, 11.6.1; APM Vol 2 14.1.3 (processor state after INIT),
/// 15.5.1 (VMRUN's checks).
pub fn load_startup_state(save: &mut StateSaveArea, vector: u8) {
    // Attributes: present, DPL 0; code execute/read accessed (0x9B), data read/write accessed
    // (0x93), a busy TSS (0x8B), an LDT (0x82); 16-bit, byte granular.
    let real_mode = |selector: u16, attributes: u16| Segment {
        selector,
        attributes,
        limit: 0xFFFF,
        base: u64::from(selector) << 4,
    };
    save.cs = real_mode(u16::from(vector) << 8, 0x9B);
    for segment in [
        &mut save.ds,
        &mut save.es,
        &mut save.ss,
        &mut save.fs,
        &mut save.gs,
    ] {
        *segment = real_mode(0, 0x93);
    }
    save.tr = real_mode(0, 0x8B);
    save.ldtr = real_mode(0, 0x82);
    save.gdtr = real_mode(0, 0);
    save.idtr = real_mode(0, 0);
    save.cpl = 0;
    save.efer = EFER_SVME;
    save.cr0 = 0x6000_0010;
    save.cr2 = 0;
    save.cr3 = 0;
    save.cr4 = 0;
    save.dr6 = 0xFFFF_0FF0;
    save.dr7 = 0x400;
    save.rflags = 0x2;
    save.rip = 0;
    save.rsp = 0;
    save.rax = 0;
}

fn flat(selector: u16, attributes: u16) -> Segment {
    Segment {
        selector,
        attributes,
        limit: 0xFFFF_FFFF,
        base: 0,
    }
}

/// Puts the loader's first-instruction state into the state save area.
/// See: APM Vol 2 15.5.1 (VMRUN's consistency checks) for what must hold.
fn load_entry_state(save: &mut StateSaveArea, entry: &EntryState) {
    // Access byte 0x9B: present, DPL 0, code, execute/read, accessed; 0x93 data read/write.
    let code_attributes = match entry.mode {
        CpuMode::Long64 => 0x9B | ATTRIBUTE_LONG | (1 << 11),
        CpuMode::Protected32 => 0x9B | ATTRIBUTE_DEFAULT_32 | (1 << 11),
    };
    let data_attributes = 0x93 | ATTRIBUTE_DEFAULT_32 | (1 << 11);
    save.cs = flat(entry.code_selector, code_attributes);
    for segment in [
        &mut save.ds,
        &mut save.es,
        &mut save.ss,
        &mut save.fs,
        &mut save.gs,
    ] {
        *segment = flat(entry.data_selector, data_attributes);
    }
    save.gdtr = Segment {
        selector: 0,
        attributes: 0,
        limit: u32::from(entry.gdt_limit),
        base: entry.gdt_base,
    };
    save.idtr = Segment::default();
    // A busy 64-bit TSS and an LDT descriptor, both empty: enough for VMRUN; the guest loads
    // its own before it needs them.
    save.tr = Segment {
        selector: 0,
        attributes: 0x8B,
        limit: 0xFFFF,
        base: 0,
    };
    save.ldtr = Segment {
        selector: 0,
        attributes: 0x82,
        limit: 0xFFFF,
        base: 0,
    };
    save.cpl = 0;
    save.efer = entry.efer | EFER_SVME;
    save.cr0 = entry.cr0;
    save.cr3 = entry.cr3;
    save.cr4 = entry.cr4;
    save.dr6 = 0xFFFF_0FF0;
    save.dr7 = 0x400;
    save.rflags = entry.rflags;
    save.rip = entry.rip;
    save.rsp = entry.rsp;
    save.rax = entry.rax;
    save.guest_pat = POWER_ON_PAT;
}

/// Whether an EXITINTINFO/EVENTINJ value is a software interrupt (type 4) or a software
/// exception (type 3, vector 3 or 4: INT3, INTO). See: APM Vol 2 15.20 "Event injection".
fn is_software_event(event: u64) -> bool {
    let event_type = (event >> 8) & 7;
    let vector = event & 0xFF;
    event_type == 4 || (event_type == 3 && (vector == 3 || vector == 4))
}

impl SvmVcpu {
    /// Builds the VMCB for a guest on the nested page tables at `nested_root`.
    ///
    /// # Safety
    /// The frames are zeroed 4 KiB pages owned by this vCPU alone for its whole life and
    /// mapped writable at their virtual addresses.
    pub unsafe fn new(
        frames: SvmFrames,
        maps: &PermissionMaps,
        paging: PagingSetup,
        asid: u32,
        entry: &EntryState,
        features: SvmFeatures,
    ) -> SvmVcpu {
        let mut vcpu = SvmVcpu {
            frames,
            registers: GuestRegisters::default(),
            features,
            next_rip: None,
            first_run: true,
            visible: None,
            flush_pending: false,
            // A fresh vCPU must not see the FPU registers of a VM that ran here before: as
            // after FNINIT, loaded by `activate` (before the first `run`).
            extended_state: GuestExtendedState::new(ringzero_vmm::xsave::guest_area(
                &ringzero_x86::hw::cpuid_words,
            )),
            last_entry_event: 0,
            nested_root: match paging {
                PagingSetup::Nested { root } => Some(root.0),
                PagingSetup::Shadow => None,
            },
        };
        vcpu.registers.rbx = entry.rbx;
        vcpu.registers.rdi = entry.rdi;
        vcpu.registers.rsi = entry.rsi;
        let vmcb = vcpu.vmcb_mut();
        // See: APM Vol 2 Table B-1 for each control field.
        vmcb.control.intercept_misc1 = intercepts::MISC1;
        vmcb.control.intercept_misc2 = intercepts::MISC2;
        vmcb.control.iopm_base_physical = maps.iopm.0;
        vmcb.control.msrpm_base_physical = maps.msrpm.0;
        vmcb.control.guest_asid = asid.max(1);
        vmcb.control.virtual_interrupt_control = intercepts::V_INTR_MASKING;
        match paging {
            // See: APM Vol 2 15.25.3 "Enabling nested paging".
            PagingSetup::Nested { root } => {
                vmcb.control.nested_paging_control = 1;
                vmcb.control.nested_cr3 = root.0;
            }
            // Shadow paging: the guest's paging state changes and page faults exit.
            // See: APM Vol 2 15.9, 15.12.
            PagingSetup::Shadow => {
                vmcb.control.intercept_cr = intercepts::SHADOW_CR_INTERCEPTS;
                vmcb.control.intercept_exceptions = intercepts::SHADOW_EXCEPTION_INTERCEPTS;
                vmcb.control.intercept_misc1 |= intercepts::misc1::INVLPG;
            }
        }
        vmcb.control.clean_bits = 0;
        load_entry_state(&mut vmcb.save, entry);
        vcpu
    }

    /// Test hook: breaks the guest state (EFER.SVME clear, which VMRUN's consistency checks
    /// refuse, APM Vol 2 15.5.1) so the next entry fails with VMEXIT_INVALID.
    pub fn corrupt_guest_state_for_test(&mut self) {
        self.vmcb_mut().save.efer &= !EFER_SVME;
    }

    /// Gives the pages back (for the caller to free) when the VM is gone.
    /// Erases the guest's registers kept in hypervisor memory (the general-purpose registers
    /// saved at each exit, the x87/SSE/AVX registers saved by `deactivate`), where the vCPU lies:
    /// call it before moving the vCPU out of its place (a move leaves the old bytes behind), so
    /// no guest data lingers in the heap once the vCPU is gone.
    pub fn erase_saved_registers(&mut self) {
        self.extended_state.erase();
        // SAFETY: `self.registers` is a valid, exclusive, aligned place of that type.
        unsafe { core::ptr::write_volatile(&mut self.registers, GuestRegisters::default()) };
    }

    pub fn into_frames(mut self) -> SvmFrames {
        // The guest's x87/SSE/AVX registers saved by `deactivate` are erased with the vCPU.
        self.extended_state.erase();
        self.frames
    }

    fn vmcb(&self) -> &Vmcb {
        // SAFETY: the VMCB page is owned by this vCPU (see `new`) and only touched through
        // it; the hardware writes it only during `run`, which takes `&mut self`.
        unsafe { self.frames.vmcb.virtual_address.cast::<Vmcb>().as_ref() }
    }

    fn vmcb_mut(&mut self) -> &mut Vmcb {
        // SAFETY: as in `vmcb`, and `&mut self` makes this the only reference.
        unsafe { self.frames.vmcb.virtual_address.cast::<Vmcb>().as_mut() }
    }

    /// The raw exit fields of the last exit (for diagnostics).
    pub fn last_exit_fields(&self) -> (u64, u64, u64) {
        let control = &self.vmcb().control;
        (control.exit_code, control.exit_info1, control.exit_info2)
    }
}

impl Vcpu for SvmVcpu {
    fn activate(&mut self) {
        // Step 1: another VMCB may have run on this CPU since this one did: nothing of this
        // VMCB may be taken from the CPU's cache of it. See: APM Vol 2 15.15 "VMCB State
        // Caching".
        self.vmcb_mut().control.clean_bits = 0;
        // Step 2: the guest's XCR0 and x87/SSE/AVX registers back into the CPU; they stay
        // there across VMRUN and #VMEXIT (the hypervisor uses none of them) until `deactivate`.
        self.extended_state.activate();
    }

    fn deactivate(&mut self) {
        // The rest of the guest lives in the VMCB (VMSAVE at each exit took the hidden state:
        // FS/GS/TR/LDTR, KERNEL_GS_BASE, STAR/LSTAR/CSTAR/SFMASK, SYSENTER); only the x87/SSE
        // registers and XCR0 stay in the CPU: saved here, the host's XCR0 back.
        self.extended_state.deactivate();
    }

    fn guest_xcr0(&self) -> u64 {
        self.extended_state.xcr0()
    }

    fn set_guest_xcr0(&mut self, value: u64) {
        self.extended_state.set_xcr0(value);
    }

    fn can_inject_interrupt(&self) -> bool {
        let vmcb = self.vmcb();
        can_take_interrupt(
            vmcb.save.rflags,
            vmcb.control.interrupt_shadow,
            vmcb.control.event_injection,
        )
    }

    fn inject_interrupt(&mut self, vector: u8) {
        // See: APM Vol 2 15.20 "Event Injection".
        self.vmcb_mut().control.event_injection = interrupt_event(vector);
    }

    fn request_interrupt_window(&mut self, enabled: bool) {
        // See: APM Vol 2 15.21.4.
        let control = &mut self.vmcb_mut().control;
        let (virtual_interrupt_control, misc1) = intercepts::with_interrupt_window(
            control.virtual_interrupt_control,
            control.intercept_misc1,
            enabled,
        );
        control.virtual_interrupt_control = virtual_interrupt_control;
        control.intercept_misc1 = misc1;
    }

    fn start_at_startup_vector(&mut self, vector: u8) {
        if self.visible.is_some() {
            log::warn!("svm: a startup IPI needs nested paging; this shadow-paged vCPU will not run the real-mode code");
        }
        let vmcb = self.vmcb_mut();
        load_startup_state(&mut vmcb.save, vector);
        // INIT discards a queued event and any interrupt shadow.
        vmcb.control.event_injection = 0;
        vmcb.control.interrupt_shadow = 0;
        vmcb.control.clean_bits = 0;
        // GPRs 0 (RDX would hold the CPU signature after INIT; 0 is allowed here).
        self.registers = GuestRegisters::default();
        self.next_rip = None;
    }

    fn write_guest_control_register(&mut self, _register: u8, _value: u64) -> bool {
        // Under nested paging no CR write is intercepted (`intercepts::MISC1`, `intercept_cr`
        // is 0), so this exit never happens.
        false
    }

    fn set_preemption_timer(&mut self, _tsc_cycles: Option<u64>) -> bool {
        // SVM has no preemption timer: the scheduler bounds a run with the host's timer
        // interrupt (INTR intercept).
        false
    }

    fn run(&mut self) -> VmExit {
        // This vCPU's FPU registers loaded (a no-op when the scheduler activated it).
        self.activate();
        let first_run = core::mem::replace(&mut self.first_run, false);
        // Flush the whole TLB before this vCPU's first run (its ASID may have belonged to a
        // VM that ran here before) and whenever the shadow tables dropped translations.
        // See: APM Vol 2 15.16.1 "TLB flush".
        let flush = first_run || core::mem::replace(&mut self.flush_pending, false);
        let vmcb = self.vmcb_mut();
        vmcb.control.tlb_control = u8::from(flush);
        let guest_vmcb = self.frames.vmcb.physical.0;
        let host_state = self.frames.host_state.physical.0;
        self.last_entry_event = self.vmcb().control.event_injection;
        if let Some(root) = self.nested_root {
            let control = &self.vmcb().control;
            if control.nested_cr3 != root || control.nested_paging_control & 1 == 0 {
                log::error!(
                    "svm: the VMCB at {guest_vmcb:#x} lost its nested paging setup (N_CR3 {:#x}, NP_ENABLE {}; built with {root:#x}): something wrote the VMCB",
                    control.nested_cr3,
                    control.nested_paging_control & 1
                );
            }
        }
        // SAFETY: SVM is enabled on this CPU (the kernel calls `hw::enable` before creating
        // vCPUs), the VMCB was built by `new` with the VMRUN intercept set, the host-state page
        // is ours, and the hypervisor runs with interrupts off.
        unsafe { hw::world_switch(&mut self.registers, guest_vmcb, host_state) };
        let SvmFeatures {
            nrip_save,
            decode_assists,
        } = self.features;
        let vmcb = self.vmcb_mut();
        let decoded = exit::decode(
            vmcb.control.exit_code,
            vmcb.control.exit_info1,
            vmcb.control.exit_info2,
            decode_assists,
        );
        // An event the exit interrupted (e.g. an exception or an injected interrupt being
        // delivered when the nested page fault hit) must be delivered again. See: APM Vol 2
        // 15.7.2 "Intercepts during IDT interrupt delivery".
        vmcb.control.event_injection = reinjected_event(vmcb.control.exit_interrupt_info);
        // The interrupt window is asked for once: taken, it is closed again (V_IRQ and the
        // VINTR intercept cleared; the core asks anew when it still has something to deliver).
        // See: APM Vol 2 15.21.4.
        if decoded.exit == VmExit::InterruptWindow {
            let (virtual_interrupt_control, misc1) = intercepts::with_interrupt_window(
                vmcb.control.virtual_interrupt_control,
                vmcb.control.intercept_misc1,
                false,
            );
            vmcb.control.virtual_interrupt_control = virtual_interrupt_control;
            vmcb.control.intercept_misc1 = misc1;
        }
        if let VmExit::EntryFailed { reason, .. } = decoded.exit {
            let fields = exit::VmrunStateFields {
                efer: vmcb.save.efer,
                cr0: vmcb.save.cr0,
                cr4: vmcb.save.cr4,
                cs_attributes: vmcb.save.cs.attributes,
                asid: vmcb.control.guest_asid,
                intercept_misc2: vmcb.control.intercept_misc2,
            };
            let field = exit::diagnose_vmrun_state(&fields).unwrap_or(
                "no field identified by ringzero's checks (APM Vol 2 15.5.1 lists them all)",
            );
            log::warn!("svm: {reason}; offending field: {field}");
        }
        let hardware_next_rip = nrip_save
            .then_some(vmcb.control.next_rip)
            .filter(|rip| *rip != 0);
        self.next_rip = decoded.next_rip.or(hardware_next_rip);
        decoded.exit
    }

    fn register(&self, register: Register) -> u64 {
        let save = &self.vmcb().save;
        let registers = &self.registers;
        match register {
            Register::Rax => save.rax,
            Register::Rsp => save.rsp,
            Register::Rip => save.rip,
            Register::Rflags => save.rflags,
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
        let slot = match register {
            Register::Rax => &mut self.vmcb_mut().save.rax,
            Register::Rsp => &mut self.vmcb_mut().save.rsp,
            Register::Rip => {
                // The core moves RIP only past an instruction it completed for the guest (or to
                // a new start): an STI / MOV SS interrupt shadow ends with that instruction, as
                // on hardware, so `sti; hlt` can take an interrupt right after the HLT.
                // See: APM Vol 2 15.21.5; SDM Vol 2B "STI".
                let control = &mut self.vmcb_mut().control;
                control.interrupt_shadow &= !INTERRUPT_SHADOW;
                &mut self.vmcb_mut().save.rip
            }
            Register::Rflags => &mut self.vmcb_mut().save.rflags,
            Register::Rbx => &mut self.registers.rbx,
            Register::Rcx => &mut self.registers.rcx,
            Register::Rdx => &mut self.registers.rdx,
            Register::Rsi => &mut self.registers.rsi,
            Register::Rdi => &mut self.registers.rdi,
            Register::Rbp => &mut self.registers.rbp,
            Register::R8 => &mut self.registers.r8,
            Register::R9 => &mut self.registers.r9,
            Register::R10 => &mut self.registers.r10,
            Register::R11 => &mut self.registers.r11,
            Register::R12 => &mut self.registers.r12,
            Register::R13 => &mut self.registers.r13,
            Register::R14 => &mut self.registers.r14,
            Register::R15 => &mut self.registers.r15,
        };
        *slot = value;
    }

    fn snapshot(&self) -> GuestSnapshot {
        let save = &self.vmcb().save;
        const EFER_LMA: u64 = 1 << 10;
        let paging = self.visible.unwrap_or(GuestPagingState {
            cr0: save.cr0,
            cr3: save.cr3,
            cr4: save.cr4,
            efer: save.efer & !EFER_SVME,
        });
        GuestSnapshot {
            rip: save.rip,
            rsp: save.rsp,
            rflags: save.rflags,
            cr0: paging.cr0,
            cr3: paging.cr3,
            cr4: paging.cr4,
            efer: paging.efer,
            cs_base: save.cs.base,
            cs_long_mode: save.efer & EFER_LMA != 0 && save.cs.attributes & ATTRIBUTE_LONG != 0,
            cs_default_32: save.cs.attributes & ATTRIBUTE_DEFAULT_32 != 0,
            cpl: save.cpl,
        }
    }

    fn fault_context(&self) -> FaultContext {
        let vmcb = self.vmcb();
        FaultContext {
            idtr_base: vmcb.save.idtr.base,
            idtr_limit: vmcb.save.idtr.limit,
            gdtr_base: vmcb.save.gdtr.base,
            gdtr_limit: vmcb.save.gdtr.limit,
            tr_base: vmcb.save.tr.base,
            tr_limit: vmcb.save.tr.limit,
            entry_event: self.last_entry_event,
            exit_event: vmcb.control.exit_interrupt_info,
            // 0 when the VMCB has nested paging off (NP_ENABLE, bit 0).
            nested_root: if self.visible.is_none() && vmcb.control.nested_paging_control & 1 != 0 {
                vmcb.control.nested_cr3
            } else {
                0
            },
            cr2: vmcb.save.cr2,
        }
    }

    fn next_rip(&self) -> Option<u64> {
        self.next_rip
    }

    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) {
        let mut event = u64::from(vector) | EVENT_TYPE_EXCEPTION | EVENT_VALID;
        if let Some(code) = error_code {
            event |= EVENT_ERROR_CODE_VALID | (u64::from(code) << 32);
        }
        self.vmcb_mut().control.event_injection = event;
    }

    fn hardware_msr(&self, msr: u32) -> Option<u64> {
        let save = &self.vmcb().save;
        // See: APM Vol 2 Table B-2 for where each lives; EFER.SVME is hidden from the guest.
        Some(match msr {
            0xC000_0080 => save.efer & !EFER_SVME,
            0x277 => save.guest_pat,
            0xC000_0081 => save.star,
            0xC000_0082 => save.lstar,
            0xC000_0083 => save.cstar,
            0xC000_0084 => save.sfmask,
            0xC000_0100 => save.fs.base,
            0xC000_0101 => save.gs.base,
            0xC000_0102 => save.kernel_gs_base,
            0x174 => save.sysenter_cs,
            0x175 => save.sysenter_esp,
            0x176 => save.sysenter_eip,
            _ => return None,
        })
    }

    fn set_hardware_msr(&mut self, msr: u32, value: u64) -> bool {
        // EFER bits a guest may set: SCE, LME, LMA, NXE (APM Vol 2 3.1.7); others #GP.
        const EFER_ALLOWED: u64 = (1 << 0) | (1 << 8) | (1 << 10) | (1 << 11);
        let save = &mut self.vmcb_mut().save;
        match msr {
            0xC000_0080 if value & !EFER_ALLOWED == 0 => save.efer = value | EFER_SVME,
            0x277 => save.guest_pat = value,
            0xC000_0081 => save.star = value,
            0xC000_0082 => save.lstar = value,
            0xC000_0083 => save.cstar = value,
            0xC000_0084 => save.sfmask = value,
            0xC000_0100 => save.fs.base = value,
            0xC000_0101 => save.gs.base = value,
            0xC000_0102 => save.kernel_gs_base = value,
            0x174 => save.sysenter_cs = value,
            0x175 => save.sysenter_esp = value,
            0x176 => save.sysenter_eip = value,
            _ => return false,
        }
        true
    }

    fn set_shadow_paging(
        &mut self,
        visible: &GuestPagingState,
        real: &RealPaging,
        root: HostPhysAddr,
    ) {
        self.visible = Some(*visible);
        let save = &mut self.vmcb_mut().save;
        save.cr0 = real.cr0;
        save.cr3 = root.0;
        save.cr4 = real.cr4;
        save.efer = real.efer | EFER_SVME;
    }

    fn flush_guest_tlb(&mut self) {
        self.flush_pending = true;
    }

    fn inject_page_fault(&mut self, address: u64, error_code: u32) {
        self.vmcb_mut().save.cr2 = address;
        self.inject_exception(14, Some(error_code));
    }

    fn set_guest_cr3(&mut self, value: u64) {
        // A MOV to CR3 flushes the guest's non-global translations; the VMCB path does not,
        // so flush the ASID at the next VMRUN. See: APM Vol 2 15.16.
        self.vmcb_mut().save.cr3 = value;
        self.flush_pending = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::{diagnose_vmrun_state, VmrunStateFields};

    #[test]
    fn software_events_are_not_reinjected() {
        // INT 0x81: type 4 (software interrupt), valid.
        assert!(is_software_event((1 << 31) | (4 << 8) | 0x81));
        // INT3 and INTO: type 3 with vectors 3 and 4.
        assert!(is_software_event((1 << 31) | (3 << 8) | 3));
        assert!(is_software_event((1 << 31) | (3 << 8) | 4));
        // A #PF being delivered (type 3, vector 14) and an external interrupt (type 0) are.
        assert!(!is_software_event((1 << 31) | (3 << 8) | 14));
        assert!(!is_software_event((1 << 31) | 0x20));
    }

    #[test]
    fn interrupted_deliveries_are_delivered_again() {
        // An injected external interrupt (type 0) whose delivery hit a nested page fault.
        assert_eq!(reinjected_event(0x8000_0020), 0x8000_0020);
        // A #PF with its error code (bits 63:32) and the error-code-valid bit.
        let page_fault = (0x6 << 32) | (1 << 31) | (1 << 11) | (3 << 8) | 14;
        assert_eq!(reinjected_event(page_fault), page_fault);
        // An NMI (type 2).
        assert_eq!(reinjected_event(0x8000_0202), 0x8000_0202);
        // INT 0x80 and INT3 happen again by themselves; nothing interrupted: nothing.
        assert_eq!(reinjected_event(0x8000_0480), 0);
        assert_eq!(reinjected_event(0x8000_0303), 0);
        assert_eq!(reinjected_event(0x20), 0);
    }

    /// A flat64 guest's first-instruction state (docs/specs/guest-boot.md).
    fn flat64_entry() -> EntryState {
        EntryState {
            mode: CpuMode::Long64,
            code_selector: 0x8,
            data_selector: 0x10,
            gdt_base: 0x1000,
            gdt_limit: 0x17,
            cr0: 0x8000_0033,
            cr3: 0x2000,
            cr4: 0x20,
            efer: 0x500,
            rflags: 0x2,
            rip: 0x10_0000,
            rsp: 0x8000,
            rax: 0,
            rbx: 0,
            rdi: 0x8000,
            rsi: 0,
        }
    }

    /// A vCPU over heap pages (nothing here touches the hardware: only methods that read and
    /// write the VMCB are called).
    fn vcpu_on_the_heap(vmcb: &mut Vmcb, host_state: &mut Vmcb) -> SvmVcpu {
        let frame = |page: &mut Vmcb| Frame {
            physical: HostPhysAddr(0x10_0000),
            virtual_address: NonNull::from(page).cast(),
        };
        let maps = PermissionMaps {
            iopm: HostPhysAddr(0x20_0000),
            msrpm: HostPhysAddr(0x30_0000),
        };
        let entry = flat64_entry();
        let features = SvmFeatures {
            nrip_save: false,
            decode_assists: false,
        };
        // SAFETY: both pages are zeroed, exclusively borrowed for the vCPU's whole life in
        // the test, and only accessed through it.
        unsafe {
            SvmVcpu::new(
                SvmFrames {
                    vmcb: frame(vmcb),
                    host_state: frame(host_state),
                },
                &maps,
                PagingSetup::Nested {
                    root: HostPhysAddr(0x40_0000),
                },
                1,
                &entry,
                features,
            )
        }
    }

    #[test]
    fn interrupt_interface_on_the_vmcb() {
        let (mut vmcb, mut host_state) = (Vmcb::zeroed(), Vmcb::zeroed());
        let mut vcpu = vcpu_on_the_heap(&mut vmcb, &mut host_state);
        assert!(!vcpu.can_inject_interrupt(), "the guest starts with IF = 0");
        vcpu.set_register(Register::Rflags, 0x202);
        assert!(vcpu.can_inject_interrupt());
        vcpu.inject_interrupt(0x41);
        assert_eq!(vcpu.vmcb().control.event_injection, 0x8000_0041);
        assert!(!vcpu.can_inject_interrupt(), "one event at a time");

        vcpu.request_interrupt_window(true);
        let control = &vcpu.vmcb().control;
        assert_eq!(
            control.virtual_interrupt_control,
            intercepts::V_INTR_MASKING | intercepts::V_IRQ | (0xF << 16) | intercepts::V_IGN_TPR
        );
        assert_ne!(control.intercept_misc1 & intercepts::misc1::VINTR, 0);
        vcpu.request_interrupt_window(false);
        let control = &vcpu.vmcb().control;
        assert_eq!(
            control.virtual_interrupt_control,
            intercepts::V_INTR_MASKING
        );
        assert_eq!(control.intercept_misc1, intercepts::MISC1);
        assert!(!vcpu.set_preemption_timer(Some(1000)));
        assert!(!vcpu.set_preemption_timer(None));
    }

    #[test]
    fn moving_rip_past_an_instruction_ends_the_interrupt_shadow() {
        let (mut vmcb, mut host_state) = (Vmcb::zeroed(), Vmcb::zeroed());
        let mut vcpu = vcpu_on_the_heap(&mut vmcb, &mut host_state);
        vcpu.set_register(Register::Rflags, 0x202);
        // `sti; hlt`: the HLT exit comes with the STI shadow still set.
        vcpu.vmcb_mut().control.interrupt_shadow = 1;
        assert!(!vcpu.can_inject_interrupt());
        vcpu.set_register(Register::Rax, 5);
        assert!(!vcpu.can_inject_interrupt(), "other registers leave it");
        vcpu.set_register(Register::Rip, 0x10_0001);
        assert!(vcpu.can_inject_interrupt(), "the HLT completed");
    }

    #[test]
    fn startup_ipi_through_the_trait() {
        let (mut vmcb, mut host_state) = (Vmcb::zeroed(), Vmcb::zeroed());
        let mut vcpu = vcpu_on_the_heap(&mut vmcb, &mut host_state);
        vcpu.set_register(Register::Rbx, 7);
        vcpu.inject_interrupt(0x30);
        vcpu.start_at_startup_vector(0x08);
        assert_eq!(vcpu.register(Register::Rbx), 0);
        assert_eq!(
            vcpu.vmcb().control.event_injection,
            0,
            "INIT drops a queued event"
        );
        let snapshot = vcpu.snapshot();
        assert_eq!((snapshot.rip, snapshot.cs_base), (0, 0x8000));
        assert_eq!((snapshot.cr0, snapshot.efer), (0x6000_0010, 0));
        assert_eq!(snapshot.code_bitness(), 16);
        assert!(!snapshot.interrupts_enabled());
    }

    #[test]
    fn interrupt_encoding_and_readiness() {
        // Vector 0x30, type 0 (INTR), valid, no error code.
        assert_eq!(interrupt_event(0x30), 0x8000_0030);
        assert!(can_take_interrupt(0x202, 0, 0));
        assert!(!can_take_interrupt(0x002, 0, 0), "RFLAGS.IF clear");
        assert!(!can_take_interrupt(0x202, 1, 0), "interrupt shadow");
        // Bit 1 of 0x068 (the guest's IF as saved with vGIF) is not a shadow.
        assert!(can_take_interrupt(0x202, 2, 0));
        assert!(!can_take_interrupt(0x202, 0, interrupt_event(0x31)));
    }

    #[test]
    fn startup_state_is_real_mode_at_the_vector_and_passes_vmrun_checks() {
        let mut vmcb = Vmcb::zeroed();
        // A 64-bit guest's state first, so every field the INIT state resets is seen to change.
        let long_mode = EntryState {
            rflags: 0x202,
            rax: 1,
            rbx: 2,
            rdi: 3,
            rsi: 4,
            ..flat64_entry()
        };
        load_entry_state(&mut vmcb.save, &long_mode);
        load_startup_state(&mut vmcb.save, 0x9A);
        let save = &vmcb.save;
        assert_eq!(
            save.cs,
            Segment {
                selector: 0x9A00,
                attributes: 0x9B,
                limit: 0xFFFF,
                base: 0x9_A000
            }
        );
        for segment in [save.ds, save.es, save.ss, save.fs, save.gs] {
            assert_eq!(
                segment,
                Segment {
                    selector: 0,
                    attributes: 0x93,
                    limit: 0xFFFF,
                    base: 0
                }
            );
        }
        assert_eq!((save.gdtr.base, save.gdtr.limit), (0, 0xFFFF));
        assert_eq!((save.idtr.base, save.idtr.limit), (0, 0xFFFF));
        assert_eq!((save.tr.attributes, save.ldtr.attributes), (0x8B, 0x82));
        assert_eq!((save.cr0, save.cr3, save.cr4), (0x6000_0010, 0, 0));
        assert_eq!(save.efer, EFER_SVME);
        assert_eq!((save.rflags, save.rip, save.rsp, save.rax), (0x2, 0, 0, 0));
        assert_eq!((save.dr6, save.dr7), (0xFFFF_0FF0, 0x400));
        // 16-bit code: the core decodes instructions there as 16-bit.
        assert_eq!(
            save.cs.attributes & (ATTRIBUTE_LONG | ATTRIBUTE_DEFAULT_32),
            0
        );
        let fields = VmrunStateFields {
            efer: save.efer,
            cr0: save.cr0,
            cr4: save.cr4,
            cs_attributes: save.cs.attributes,
            asid: 1,
            intercept_misc2: intercepts::MISC2,
        };
        assert_eq!(diagnose_vmrun_state(&fields), None);
    }
}
