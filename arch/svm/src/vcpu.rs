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
use ringzero_vmm::vcpu::{GuestSnapshot, Register, Vcpu};

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
}

/// The power-on PAT value (WB, WT, UC-, UC repeated). See: SDM Vol 3A 13.12.4 / APM Vol 2 7.8.2.
const POWER_ON_PAT: u64 = 0x0007_0406_0007_0406;
/// EVENTINJ type 3 = exception; bit 11 error code valid; bit 31 valid. See: APM Vol 2 15.20.
const EVENT_TYPE_EXCEPTION: u64 = 3 << 8;
const EVENT_ERROR_CODE_VALID: u64 = 1 << 11;
const EVENT_VALID: u64 = 1 << 31;

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
    pub fn into_frames(self) -> SvmFrames {
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
    // Stubs for the scheduler's interface; the real implementations follow (issue 6).
    fn activate(&mut self) {}
    fn deactivate(&mut self) {}
    fn can_inject_interrupt(&self) -> bool {
        false
    }
    fn inject_interrupt(&mut self, _vector: u8) {}
    fn request_interrupt_window(&mut self, _enabled: bool) {}
    fn start_at_startup_vector(&mut self, _vector: u8) {}
    fn set_preemption_timer(&mut self, _tsc_cycles: Option<u64>) -> bool {
        false
    }

    fn run(&mut self) -> VmExit {
        let first_run = core::mem::replace(&mut self.first_run, false);
        // Flush the whole TLB before this vCPU's first run (its ASID may have belonged to a
        // VM that ran here before) and whenever the shadow tables dropped translations.
        // See: APM Vol 2 15.16.1 "TLB flush".
        let flush = first_run || core::mem::replace(&mut self.flush_pending, false);
        let vmcb = self.vmcb_mut();
        vmcb.control.tlb_control = u8::from(flush);
        let guest_vmcb = self.frames.vmcb.physical.0;
        let host_state = self.frames.host_state.physical.0;
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
        // An event the exit interrupted (e.g. an exception being delivered when the nested page
        // fault hit) must be delivered again. See: APM Vol 2 15.7.2 "Intercepts during IDT
        // interrupt delivery".
        let interrupted = vmcb.control.exit_interrupt_info;
        vmcb.control.event_injection =
            if interrupted & EVENT_VALID != 0 && !is_software_event(interrupted) {
                interrupted
            } else {
                // Software interrupts (INT n) and software exceptions (INT3, INTO) are not
                // re-injected: RIP still points at the instruction, so the guest executes it again
                // and the event happens anew. Re-injecting would need the return address (NRIP)
                // set past the instruction; without it the instruction would run twice.
                // (KVM does the same without NRIP save.)
                0
            };
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
            Register::Rip => &mut self.vmcb_mut().save.rip,
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
    use super::is_software_event;

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
}
