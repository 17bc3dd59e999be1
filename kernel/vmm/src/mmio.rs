//! Emulating a guest instruction that touched memory-mapped I/O.
//!
//! A device's registers are not RAM: nothing is mapped there, so the guest's access faults to
//! the hypervisor (a nested page fault, or a shadow fault on an address outside RAM). The
//! hypervisor then does what the CPU could not: it fetches the instruction at the guest's RIP
//! (through the guest's own page tables), decodes it with iced-x86, performs the access on the
//! device model (`ringzero_devices::MmioBus`), writes a load's result into the destination
//! register, and moves RIP past the instruction. The MOV forms are emulated (register and
//! immediate sources, every operand size, MOVZX/MOVSX loads); anything else stops the VM with
//! a report naming the instruction.

use crate::decode;
use crate::vcpu::{Register, Vcpu};
use crate::vm::{Vm, VmEnd};
use crate::Platform;
use alloc::vec::Vec;
use iced_x86::{Instruction, Mnemonic, OpKind};
use ringzero_devices::DeviceEvent;
use ringzero_memory::HostMemory;

/// Whose registers the access touched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// A device on the VM's MMIO bus.
    Bus,
    /// The local APIC of this vCPU (every vCPU sees its own at the same address).
    LocalApic(usize),
    /// The VM's I/O APIC.
    IoApic,
    /// A BAR of the PCI function `vm.pci[N]`.
    Pci(usize),
}

/// Where a loaded value goes: a register, and which of its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Destination {
    register: Register,
    /// Bytes written (1, 2, 4, 8); 4 zero-extends to 64 bits, as x86-64 does.
    size: u8,
    /// AH, BH, CH, DH: bits 15:8.
    high_byte: bool,
}

fn register_of(register: iced_x86::Register) -> Option<Destination> {
    use iced_x86::Register as R;
    let high = matches!(register, R::AH | R::BH | R::CH | R::DH);
    let full = match register {
        R::AH => R::RAX,
        R::BH => R::RBX,
        R::CH => R::RCX,
        R::DH => R::RDX,
        other => other.full_register(),
    };
    if !full.is_gpr64() {
        return None;
    }
    Some(Destination {
        register: Register::from_number(full.number() as u8)?,
        size: register.size() as u8,
        high_byte: high,
    })
}

/// The value of a source register, cut to its size.
fn read_source(vcpu: &dyn Vcpu, register: iced_x86::Register) -> Option<u64> {
    let destination = register_of(register)?;
    let value = vcpu.register(destination.register);
    Some(if destination.high_byte {
        (value >> 8) & 0xFF
    } else {
        value & ringzero_devices::mmio::size_mask(destination.size)
    })
}

/// Writes a loaded value into its destination as the CPU would (merge for 8/16-bit, zero-extend
/// for 32-bit, whole register for 64-bit).
fn write_destination(vcpu: &mut dyn Vcpu, destination: Destination, value: u64) {
    let old = vcpu.register(destination.register);
    let new = match (destination.size, destination.high_byte) {
        (1, true) => (old & !0xFF00) | ((value & 0xFF) << 8),
        (1, false) => (old & !0xFF) | (value & 0xFF),
        (2, _) => (old & !0xFFFF) | (value & 0xFFFF),
        (4, _) => value & 0xFFFF_FFFF,
        _ => value,
    };
    vcpu.set_register(destination.register, new);
}

fn sign_extend(value: u64, from_bytes: u8) -> u64 {
    let shift = 64 - u32::from(from_bytes) * 8;
    (((value << shift) as i64) >> shift) as u64
}

/// What the decoded instruction asks of the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    Load {
        size: u8,
        destination: Destination,
        sign_extend: bool,
    },
    Store {
        size: u8,
        value: u64,
    },
    /// BT with an immediate bit offset: CF = that bit of the loaded value (the offset is taken
    /// modulo the operand size). See: SDM Vol 2A "BT—Bit Test".
    TestBit {
        size: u8,
        bit: u32,
    },
}

fn access_of(instruction: &Instruction, vcpu: &dyn Vcpu) -> Result<Access, &'static str> {
    let memory_size = instruction.memory_size().size() as u8;
    match instruction.mnemonic() {
        Mnemonic::Mov if instruction.op0_kind() == OpKind::Memory => {
            let value = match instruction.op1_kind() {
                OpKind::Register => read_source(vcpu, instruction.op1_register())
                    .ok_or("mov from a non-general register")?,
                OpKind::Immediate8
                | OpKind::Immediate16
                | OpKind::Immediate32
                | OpKind::Immediate8to32
                | OpKind::Immediate32to64 => instruction.immediate(1),
                _ => return Err("mov with an unsupported source"),
            };
            Ok(Access::Store {
                size: memory_size,
                value,
            })
        }
        Mnemonic::Mov if instruction.op1_kind() == OpKind::Memory => {
            let destination =
                register_of(instruction.op0_register()).ok_or("mov to a non-general register")?;
            Ok(Access::Load {
                size: memory_size,
                destination,
                sign_extend: false,
            })
        }
        Mnemonic::Movzx | Mnemonic::Movsx if instruction.op1_kind() == OpKind::Memory => {
            let destination = register_of(instruction.op0_register())
                .ok_or("movzx/movsx to a non-general register")?;
            Ok(Access::Load {
                size: memory_size,
                destination,
                sign_extend: instruction.mnemonic() == Mnemonic::Movsx,
            })
        }
        Mnemonic::Bt
            if instruction.op0_kind() == OpKind::Memory
                && instruction.op1_kind() == OpKind::Immediate8 =>
        {
            Ok(Access::TestBit {
                size: memory_size,
                bit: (instruction.immediate(1) as u32) % (u32::from(memory_size) * 8),
            })
        }
        _ => Err("not a MOV form or BT with an immediate"),
    }
}

/// RFLAGS.CF.
const RFLAGS_CF: u64 = 1;

/// Reads `size` bytes of the device registers at `address`.
fn load(vm: &mut Vm, target: Target, platform: &mut dyn Platform, address: u64, size: u8) -> u64 {
    match target {
        Target::Bus => vm
            .mmio
            .read(address, size)
            .unwrap_or(ringzero_devices::mmio::size_mask(size)),
        Target::LocalApic(index) => {
            let now = platform.timestamp();
            u64::from(
                vm.vcpus[index]
                    .apic
                    .read_mmio((address - crate::smp::APIC_PAGE) as u32, now),
            ) & ringzero_devices::mmio::size_mask(size)
        }
        Target::Pci(index) => crate::pci::load(vm, index, address, size),
        Target::IoApic => vm
            .io_apic
            .as_mut()
            .map_or(ringzero_devices::mmio::size_mask(size), |io_apic| {
                u64::from(io_apic.read_mmio(address - ringzero_devices::IoApic::BASE, size))
            }),
    }
}

/// Emulates the instruction at RIP, which accessed the MMIO address `address` (owned by a
/// device on `vm.mmio`), and moves RIP past it.
pub fn emulate(
    vm: &mut Vm,
    target: Target,
    vcpu: &mut dyn Vcpu,
    platform: &mut dyn Platform,
    host: &mut dyn HostMemory,
    address: u64,
) -> Result<(), VmEnd> {
    let state = vcpu.snapshot();
    let rip = state.rip;
    let (bytes, length) =
        decode::fetch(&vm.ram, host, &state).map_err(|_| VmEnd::Undecodable { rip })?;
    let instruction = decode::decode(&bytes[..length], state.code_bitness(), rip)
        .map_err(|_| VmEnd::Undecodable { rip })?;
    let access = access_of(&instruction, vcpu).map_err(|why| {
        log::warn!(
            "vm {}: MMIO access to {address:#x} by \"{}\" at rip={rip:#x}: {why}; not emulated",
            vm.name,
            decode::format_instruction(&instruction)
        );
        VmEnd::UnsupportedMmio { address, rip }
    })?;
    match access {
        Access::Store { size, value } if target == Target::IoApic => {
            let now = platform.timestamp();
            let offset = address - ringzero_devices::IoApic::BASE;
            let delivery = vm
                .io_apic
                .as_mut()
                .and_then(|io_apic| io_apic.write_mmio(offset, size, value as u32));
            if let Some(delivery) = delivery {
                crate::smp::deliver(vm, delivery, platform, now);
            }
        }
        Access::Store { size, value } if matches!(target, Target::Pci(_)) => {
            let Target::Pci(index) = target else {
                unreachable!()
            };
            crate::pci::store(vm, host, index, address, size, value);
        }
        Access::Store { size, value } if target != Target::Bus => {
            let Target::LocalApic(index) = target else {
                unreachable!()
            };
            let now = platform.timestamp();
            let mut events = Vec::new();
            vm.vcpus[index].apic.write_mmio(
                (address - crate::smp::APIC_PAGE) as u32,
                value as u32,
                now,
                &mut events,
            );
            let _ = size;
            crate::smp::apic_events(vm, index, events, platform, now);
        }
        Access::Store { size, value } => {
            let mut events = Vec::new();
            vm.mmio.write(address, size, value, &mut events);
            for event in events {
                match event {
                    DeviceEvent::ConsoleByte(byte) => vm.console_byte(byte, platform),
                    DeviceEvent::StopVm { status } => return Err(VmEnd::ExitPort { status }),
                    DeviceEvent::PowerOff => return Err(VmEnd::PowerOff),
                    DeviceEvent::Reset => return Err(VmEnd::Reset),
                }
            }
        }
        Access::TestBit { size, bit } => {
            let value = load(vm, target, platform, address, size);
            let flags = vcpu.register(Register::Rflags);
            let carry = (value >> bit) & 1;
            vcpu.set_register(Register::Rflags, (flags & !RFLAGS_CF) | carry);
        }
        Access::Load {
            size,
            destination,
            sign_extend: extend,
        } => {
            let raw = load(vm, target, platform, address, size);
            let value = if extend { sign_extend(raw, size) } else { raw };
            write_destination(vcpu, destination, value);
        }
    }
    let next = match state.code_bitness() {
        64 => rip.wrapping_add(instruction.len() as u64),
        32 => rip.wrapping_add(instruction.len() as u64) & 0xFFFF_FFFF,
        _ => rip.wrapping_add(instruction.len() as u64) & 0xFFFF,
    };
    vcpu.set_register(Register::Rip, next);
    Ok(())
}
