//! How a VM's guest-physical memory is provided, and the exits that keep it so.
//!
//! - Nested paging (NPT/EPT): the hardware composes the guest's own tables with ours. Guest RAM
//!   is backed lazily (overcommit): a nested page fault inside RAM on a page with no frame yet
//!   allocates one and maps it; the guest never sees it.
//! - Shadow paging: the hypervisor keeps the tables the CPU really walks
//!   (`ringzero_memory::shadow`), so it must see every change of the guest's paging state:
//!   MOV to CR0/CR3/CR4, WRMSR to EFER, INVLPG, and every page fault. The guest reads back the
//!   values it wrote (the "visible" state), while the CPU runs with the real ones.
//!
//! Each handler says what the guest did and what the hypervisor does about it.

use crate::decode;
use crate::exit::ControlRegisterAccess;
use crate::vcpu::{Register, Vcpu};
use crate::vm::{Vm, VmEnd};
use iced_x86::{Mnemonic, OpKind};
use ringzero_memory::shadow::{
    real_paging, ActivateError, FaultAccess, FaultOutcome, GuestPagingState, ShadowPaging,
};
use ringzero_memory::{BackingError, GuestPhysAddr, GuestVirtAddr, HostMemory, NestedPageTables};

/// How the VM's memory is translated.
pub enum GuestPaging {
    /// NPT/EPT tables (mapped lazily as the guest touches its RAM).
    Nested(NestedPageTables),
    /// Shadow tables kept by the hypervisor, and the paging state the guest believes in.
    Shadow {
        engine: ShadowPaging,
        visible: GuestPagingState,
    },
}

/// Pages made present on first touch (overcommit), for the statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LazyStats {
    pub pages_backed_on_touch: u64,
}

const CR0_PE: u64 = 1 << 0;
const CR0_TS: u64 = 1 << 3;
const CR0_ET: u64 = 1 << 4;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAGING_BITS: u64 =
    (1 << 4) | (1 << 5) | (1 << 7) | (1 << 17) | (1 << 20) | (1 << 21) | (1 << 12);
const CR4_PCIDE: u64 = 1 << 17;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// EFER bits a guest may write: SCE, LME, LMA (ignored), NXE. See: SDM Vol 3A 2.2.1.
const EFER_WRITABLE: u64 = (1 << 0) | EFER_LME | EFER_LMA | (1 << 11);

/// A nested page fault at `guest_physical`: inside RAM on an unbacked page, back it and map it
/// (overcommit); anything else ends the VM. Returns `None` to resume the guest.
pub fn nested_page_fault(
    vm: &mut Vm,
    host: &mut dyn HostMemory,
    guest_physical: GuestPhysAddr,
) -> Option<Result<(), VmEnd>> {
    let GuestPaging::Nested(tables) = &mut vm.paging else {
        return None;
    };
    if guest_physical.0 >= vm.ram.size() {
        // Outside RAM: the caller decides (a device's registers, or the end of the VM).
        return None;
    }
    let page = GuestPhysAddr(guest_physical.0 & !0xFFF);
    let frame = match vm.ram.frame_or_allocate(page, host) {
        Ok(frame) => frame,
        Err(BackingError::OutOfHostMemory) => {
            return Some(Err(VmEnd::OutOfHostMemory { guest_physical }))
        }
        Err(BackingError::OutOfRange { .. }) => return None,
    };
    if tables.map_page(page, frame, host).is_err() {
        return Some(Err(VmEnd::OutOfHostMemory { guest_physical }));
    }
    vm.lazy.pages_backed_on_touch += 1;
    Some(Ok(()))
}

/// Makes the shadow for the visible state current and loads the real registers.
fn reactivate(vm: &mut Vm, vcpu: &mut dyn Vcpu, host: &mut dyn HostMemory) -> Result<(), VmEnd> {
    let GuestPaging::Shadow { engine, visible } = &mut vm.paging else {
        return Ok(());
    };
    let state = *visible;
    let real = real_paging(&state).map_err(|unsupported| VmEnd::UnsupportedPaging {
        detail: alloc::format!("{unsupported:?}"),
    })?;
    let root = match engine.activate(&mut vm.ram, host, &state) {
        Ok(root) => root,
        // Host memory is short: drop every shadow structure and try once more.
        Err(ActivateError::OutOfHostMemory) => {
            engine.flush_all(host);
            engine
                .activate(&mut vm.ram, host, &state)
                .map_err(|_| VmEnd::OutOfHostMemory {
                    guest_physical: GuestPhysAddr(state.cr3),
                })?
        }
        Err(ActivateError::Unsupported(unsupported)) => {
            return Err(VmEnd::UnsupportedPaging {
                detail: alloc::format!("{unsupported:?}"),
            });
        }
    };
    vcpu.set_shadow_paging(&state, &real, root);
    vcpu.flush_guest_tlb();
    Ok(())
}

/// Sets up the shadow for the guest's first instruction (called once before the first run).
pub fn start(vm: &mut Vm, vcpu: &mut dyn Vcpu, host: &mut dyn HostMemory) -> Result<(), VmEnd> {
    reactivate(vm, vcpu, host)
}

/// The general-purpose register a MOV to/from CR names, decoding the instruction if needed.
fn decode_cr_operand(
    vm: &Vm,
    vcpu: &dyn Vcpu,
    host: &dyn HostMemory,
) -> Option<(bool, u8, Register)> {
    let state = vcpu.snapshot();
    let (bytes, length) = decode::fetch(&vm.ram, host, &state).ok()?;
    let instruction = decode::decode(&bytes[..length], state.code_bitness(), state.rip).ok()?;
    if instruction.mnemonic() != Mnemonic::Mov || instruction.op_count() != 2 {
        return None;
    }
    let (op0, op1) = (instruction.op0_register(), instruction.op1_register());
    if op0.is_cr() {
        Some((true, op0.number() as u8, iced_gpr(op1)?))
    } else if op1.is_cr() {
        Some((false, op1.number() as u8, iced_gpr(op0)?))
    } else {
        None
    }
}

/// Says (once per boot) that an exit named another control register than the instruction.
fn note_cr_exit_mismatch(from_exit: u8, decoded: u8) {
    static NOTED: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);
    if from_exit != decoded && !NOTED.swap(true, core::sync::atomic::Ordering::Relaxed) {
        log::info!(
            "paging: a CR access exit named CR{from_exit} for an access to CR{decoded}; the decoded instruction is used (QEMU 10 TCG does this; said once)"
        );
    }
}

fn iced_gpr(register: iced_x86::Register) -> Option<Register> {
    if !register.is_gpr64() && !register.is_gpr32() {
        return None;
    }
    Register::from_number(register.full_register().number() as u8)
}

/// MOV to/from CR0/CR3/CR4, CLTS, LMSW under shadow paging. Returns whether the instruction
/// completed (skip it) or faulted (an exception was injected).
pub fn control_register(
    vm: &mut Vm,
    vcpu: &mut dyn Vcpu,
    host: &mut dyn HostMemory,
    access: ControlRegisterAccess,
) -> Result<bool, VmEnd> {
    let rip = vcpu.register(Register::Rip);
    // Work out what happened, decoding the instruction when the hardware did not say.
    let access = match access {
        ControlRegisterAccess::Write {
            register,
            source: None,
        }
        | ControlRegisterAccess::Read {
            register,
            destination: None,
        } => {
            // The instruction at RIP says which register and which way, not the exit code:
            // QEMU 10's TCG checks and reports the CR0 intercept for a MOV from any CRn (a
            // MOV from CR3 or CR2 exits as a read of CR0, 0x00). On hardware, and on QEMU 7.2,
            // the exit names the register. Shadow paging intercepts reads of CR0, CR3 and CR4
            // together, so all of them still exit; the read below also answers CR2.
            let (write, decoded, gpr) =
                decode_cr_operand(vm, vcpu, host).ok_or(VmEnd::Undecodable { rip })?;
            note_cr_exit_mismatch(register, decoded);
            if write {
                ControlRegisterAccess::Write {
                    register: decoded,
                    source: Some(gpr),
                }
            } else {
                ControlRegisterAccess::Read {
                    register: decoded,
                    destination: Some(gpr),
                }
            }
        }
        ControlRegisterAccess::Lmsw { value: None } => {
            let state = vcpu.snapshot();
            let decoded = decode::fetch(&vm.ram, host, &state)
                .ok()
                .and_then(|(bytes, length)| {
                    decode::decode(&bytes[..length], state.code_bitness(), state.rip).ok()
                });
            match decoded {
                Some(instruction)
                    if instruction.mnemonic() == Mnemonic::Lmsw
                        && instruction.op0_kind() == OpKind::Register =>
                {
                    let source = iced_gpr(instruction.op0_register().full_register())
                        .ok_or(VmEnd::Undecodable { rip })?;
                    ControlRegisterAccess::Lmsw {
                        value: Some(vcpu.register(source) as u16),
                    }
                }
                _ => return Err(VmEnd::Undecodable { rip }),
            }
        }
        other => other,
    };
    let GuestPaging::Shadow { visible, engine } = &mut vm.paging else {
        // Nested paging: only a write that changed a bit the host owns exits (VMX: CR0.NE and
        // the other bits VMX requires, through the guest/host masks); the backend performs it.
        if let ControlRegisterAccess::Write {
            register: register @ (0 | 4),
            source: Some(source),
        } = access
        {
            if vcpu.write_guest_control_register(register, vcpu.register(source)) {
                return Ok(true);
            }
        }
        return Err(VmEnd::Unhandled {
            code: 0xC0,
            info1: 0,
            info2: 0,
            rip,
        });
    };
    let before = *visible;
    match access {
        ControlRegisterAccess::Read {
            register,
            destination: Some(destination),
        } => {
            let value = match register {
                0 => visible.cr0,
                // Not intercepted, but QEMU 10's TCG exits on a MOV from any CR when CR0 reads
                // are intercepted (it checks and reports CR0's bit): the guest's own CR2.
                2 => vcpu.fault_context().cr2,
                3 => visible.cr3,
                4 => visible.cr4,
                _ => {
                    return Err(VmEnd::Unhandled {
                        code: 0xC1,
                        info1: u64::from(register),
                        info2: 0,
                        rip,
                    })
                }
            };
            vcpu.set_register(destination, value);
            return Ok(true);
        }
        ControlRegisterAccess::Write {
            register: 0,
            source: Some(source),
        } => {
            visible.cr0 = vcpu.register(source) | CR0_ET;
        }
        ControlRegisterAccess::Write {
            register: 3,
            source: Some(source),
        } => {
            visible.cr3 = vcpu.register(source);
        }
        ControlRegisterAccess::Write {
            register: 4,
            source: Some(source),
        } => {
            let value = vcpu.register(source);
            if value & CR4_PCIDE != 0 {
                // PCID is hidden in CPUID; setting CR4.PCIDE without it is a #GP.
                vcpu.inject_exception(13, Some(0));
                return Ok(false);
            }
            visible.cr4 = value;
        }
        ControlRegisterAccess::Clts => visible.cr0 &= !CR0_TS,
        ControlRegisterAccess::Lmsw { value: Some(value) } => {
            // LMSW sets PE, MP, EM, TS from bits 3:0 but cannot clear PE. See: SDM Vol 2A LMSW.
            let low = u64::from(value) & 0xF;
            visible.cr0 =
                (visible.cr0 & !0xE) | (low & 0xE) | (visible.cr0 & CR0_PE) | (low & CR0_PE);
        }
        _ => {
            return Err(VmEnd::Unhandled {
                code: 0xC2,
                info1: 0,
                info2: 0,
                rip,
            })
        }
    }
    // EFER.LMA follows LME and PG. See: SDM Vol 3A 10.8.5 "Initializing IA-32e mode".
    if visible.cr0 & CR0_PG != 0 && visible.efer & EFER_LME != 0 {
        visible.efer |= EFER_LMA;
    } else {
        visible.efer &= !EFER_LMA;
    }
    let paging_changed = (before.cr0 ^ visible.cr0) & (CR0_PG | CR0_WP | CR0_PE) != 0
        || (before.cr4 ^ visible.cr4) & CR4_PAGING_BITS != 0
        || (before.efer ^ visible.efer) & EFER_LMA != 0;
    if paging_changed {
        // A paging-mode change invalidates every translation. See: SDM Vol 3A 4.10.4.1.
        engine.flush_all(host);
    }
    reactivate(vm, vcpu, host)?;
    Ok(true)
}

/// Loads the guest's CR3 under shadow paging (MOV to CR3, or the `SET_ADDRESS_SPACE` hypercall).
pub fn set_cr3(
    vm: &mut Vm,
    vcpu: &mut dyn Vcpu,
    host: &mut dyn HostMemory,
    value: u64,
) -> Result<(), VmEnd> {
    if let GuestPaging::Shadow { visible, .. } = &mut vm.paging {
        visible.cr3 = value;
    }
    reactivate(vm, vcpu, host)
}

/// WRMSR to EFER under shadow paging: the visible EFER changes; LMA stays derived.
pub fn write_efer(
    vm: &mut Vm,
    vcpu: &mut dyn Vcpu,
    host: &mut dyn HostMemory,
    value: u64,
) -> Result<bool, VmEnd> {
    let GuestPaging::Shadow { visible, engine } = &mut vm.paging else {
        return Ok(false);
    };
    if value & !EFER_WRITABLE != 0 {
        return Ok(false);
    }
    let lma = visible.efer & EFER_LMA;
    let before = visible.efer;
    visible.efer = (value & !EFER_LMA) | lma;
    if (before ^ visible.efer) & ((1 << 11) | EFER_LME) != 0 {
        engine.flush_all(host);
    }
    reactivate(vm, vcpu, host)?;
    Ok(true)
}

/// The visible EFER under shadow paging.
pub fn read_efer(vm: &Vm) -> Option<u64> {
    match &vm.paging {
        GuestPaging::Shadow { visible, .. } => Some(visible.efer),
        GuestPaging::Nested(_) => None,
    }
}

/// INVLPG: drop the shadow translation of that page.
pub fn invlpg(
    vm: &mut Vm,
    vcpu: &mut dyn Vcpu,
    host: &mut dyn HostMemory,
    address: Option<u64>,
) -> Result<(), VmEnd> {
    let rip = vcpu.register(Register::Rip);
    let address = match address {
        Some(address) => address,
        None => {
            let state = vcpu.snapshot();
            let (bytes, length) =
                decode::fetch(&vm.ram, host, &state).map_err(|_| VmEnd::Undecodable { rip })?;
            let instruction = decode::decode(&bytes[..length], state.code_bitness(), state.rip)
                .map_err(|_| VmEnd::Undecodable { rip })?;
            if instruction.mnemonic() != Mnemonic::Invlpg {
                return Err(VmEnd::Undecodable { rip });
            }
            instruction
                .virtual_address(0, 0, |register, _, _| iced_register_value(vcpu, register))
                .ok_or(VmEnd::Undecodable { rip })?
        }
    };
    if let GuestPaging::Shadow { engine, .. } = &mut vm.paging {
        engine.invalidate_page(host, GuestVirtAddr(address));
        vcpu.flush_guest_tlb();
    }
    Ok(())
}

/// Register values for iced's effective-address computation (flat segments: base 0).
fn iced_register_value(vcpu: &dyn Vcpu, register: iced_x86::Register) -> Option<u64> {
    if register.is_segment_register() {
        return Some(0);
    }
    if register == iced_x86::Register::RIP || register == iced_x86::Register::EIP {
        return Some(vcpu.register(Register::Rip));
    }
    let full = register.full_register();
    let value = vcpu.register(Register::from_number(full.number() as u8)?);
    Some(match register.size() {
        8 => value,
        4 => value & 0xFFFF_FFFF,
        2 => value & 0xFFFF,
        _ => value & 0xFF,
    })
}

/// A page fault under shadow paging: fixed silently, given to the guest, or the end of the VM.
pub fn page_fault(
    vm: &mut Vm,
    vcpu: &mut dyn Vcpu,
    host: &mut dyn HostMemory,
    address: u64,
    error_code: u32,
) -> Result<(), VmEnd> {
    let rip = vcpu.register(Register::Rip);
    let rflags = vcpu.register(Register::Rflags);
    let GuestPaging::Shadow { engine, visible } = &mut vm.paging else {
        // Not intercepted under nested paging; should the hardware report one, give it back.
        vcpu.inject_page_fault(address, error_code);
        return Ok(());
    };
    let access = FaultAccess {
        write: error_code & (1 << 1) != 0,
        user: error_code & (1 << 2) != 0,
        fetch: error_code & (1 << 4) != 0,
        alignment_check: rflags & (1 << 18) != 0,
    };
    let state = *visible;
    let mut outcome =
        engine.handle_fault(&mut vm.ram, host, &state, GuestVirtAddr(address), access);
    if outcome == FaultOutcome::OutOfHostMemory {
        // Free the shadow structures and retry once; the root must be rebuilt too.
        engine.flush_all(host);
        reactivate(vm, vcpu, host)?;
        let GuestPaging::Shadow { engine, .. } = &mut vm.paging else {
            return Ok(());
        };
        outcome = engine.handle_fault(&mut vm.ram, host, &state, GuestVirtAddr(address), access);
    }
    match outcome {
        FaultOutcome::Fixed => {
            vcpu.flush_guest_tlb();
            Ok(())
        }
        FaultOutcome::Inject { error_code } => {
            vcpu.inject_page_fault(address, error_code);
            Ok(())
        }
        FaultOutcome::OutsideRam { guest_physical } => Err(VmEnd::NestedPageFault {
            guest_physical,
            access: crate::exit::MemoryAccess {
                write: access.write,
                execute: access.fetch,
                present: false,
            },
            rip,
        }),
        FaultOutcome::OutOfHostMemory => Err(VmEnd::OutOfHostMemory {
            guest_physical: GuestPhysAddr(address),
        }),
    }
}
