//! The hypercall ABI (docs/hypercalls.md): a guest kernel asks for a service with VMMCALL
//! (AMD) or VMCALL (Intel). RAX holds the number, RBX/RCX/RDX/RSI the arguments; RAX returns
//! the status. The hypervisor cannot otherwise tell the guest kernel from the guest's user
//! programs, so it checks the caller's privilege level: only ring 0 may call.

use crate::paging::{self, GuestPaging};
use crate::vcpu::{Register, Vcpu};
use crate::vm::{Vm, VmEnd};
use crate::Platform;
use ringzero_memory::{paging_mode, read_guest_virtual, GuestVirtAddr, HostMemory};

/// The ABI version `VERSION` reports.
pub const ABI_VERSION: u64 = 1;
/// The longest `CONSOLE_WRITE`.
pub const MAX_CONSOLE_WRITE: u64 = 4096;

/// Hypercall numbers.
pub mod number {
    pub const VERSION: u64 = 0;
    pub const CONSOLE_WRITE: u64 = 1;
    pub const YIELD: u64 = 2;
    pub const SET_ADDRESS_SPACE: u64 = 3;
    pub const EXIT: u64 = 4;
    pub const EXIT_STATISTICS: u64 = 5;
}

/// Status codes returned in RAX (negative numbers as 64-bit two's complement).
pub mod status {
    pub const SUCCESS: u64 = 0;
    pub const UNKNOWN_HYPERCALL: u64 = -1i64 as u64;
    pub const INVALID_ARGUMENT: u64 = -2i64 as u64;
    pub const NOT_PERMITTED: u64 = -3i64 as u64;
    pub const BAD_ADDRESS: u64 = -4i64 as u64;
}

/// Handles one hypercall; the caller advances RIP afterwards. `Err` ends the VM.
pub fn handle(
    vm: &mut Vm,
    vcpu: &mut dyn Vcpu,
    platform: &mut dyn Platform,
    host: &mut dyn HostMemory,
) -> Result<(), VmEnd> {
    let state = vcpu.snapshot();
    let call = vcpu.register(Register::Rax);
    let argument = vcpu.register(Register::Rbx);
    if state.cpl != 0 {
        // Step 1: the privilege check. A user program of the guest must not reach the
        // hypervisor's services directly: only the guest kernel (CPL 0) may.
        log::warn!(
            "vm {}: hypercall {call} from ring {} at rip={:#x} refused (NOT_PERMITTED): only the guest kernel may call",
            vm.name,
            state.cpl,
            state.rip
        );
        vcpu.set_register(Register::Rax, status::NOT_PERMITTED);
        return Ok(());
    }
    let result = match call {
        number::VERSION => {
            vcpu.set_register(Register::Rbx, ABI_VERSION);
            status::SUCCESS
        }
        number::CONSOLE_WRITE => {
            let length = vcpu.register(Register::Rcx);
            if length > MAX_CONSOLE_WRITE {
                status::INVALID_ARGUMENT
            } else {
                let mut buffer = alloc::vec![0u8; length as usize];
                let mode = paging_mode(state.cr0, state.cr4, state.efer);
                match read_guest_virtual(
                    &vm.ram,
                    host,
                    mode,
                    state.cr3,
                    GuestVirtAddr(argument),
                    &mut buffer,
                ) {
                    Ok(()) => {
                        for byte in buffer {
                            vm.console_byte(byte, platform);
                        }
                        vcpu.set_register(Register::Rbx, length);
                        status::SUCCESS
                    }
                    Err(_) => status::BAD_ADDRESS,
                }
            }
        }
        // No scheduler yet: yielding returns at once.
        number::YIELD => status::SUCCESS,
        number::SET_ADDRESS_SPACE => {
            match &vm.paging {
                GuestPaging::Shadow { .. } => paging::set_cr3(vm, vcpu, host, argument)?,
                GuestPaging::Nested(_) => vcpu.set_guest_cr3(argument),
            }
            status::SUCCESS
        }
        number::EXIT => {
            return Err(VmEnd::HypercallExit {
                status: argument as u32,
            })
        }
        number::EXIT_STATISTICS => {
            let caused = vm.stats.guest_caused();
            vcpu.set_register(Register::Rbx, caused.count);
            vcpu.set_register(Register::Rcx, caused.cycles);
            status::SUCCESS
        }
        _ => status::UNKNOWN_HYPERCALL,
    };
    vcpu.set_register(Register::Rax, result);
    Ok(())
}
