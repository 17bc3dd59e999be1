//! The vendor-neutral heart of ringzero: what a vCPU is ([`vcpu::Vcpu`]), what an exit means
//! ([`exit::VmExit`]), and what the hypervisor does about each one ([`vm::run`]). The VMX and
//! SVM backends translate their hardware into these words; everything here is host-tested with
//! fake vCPUs and fake memory.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod console_switch;
pub mod cpuid;
pub mod decode;
pub mod exit;
pub mod hypercall;
pub mod mmio;
pub mod msr;
pub mod paging;
pub mod pci;
pub mod postmortem;
pub mod smp;
pub mod stats;
pub mod vcpu;
pub mod vm;
pub mod xsave;

/// What the core needs from the machine it runs on, as a trait so tests can fake it.
pub trait Platform {
    /// The host CPU's CPUID answer (EAX, EBX, ECX, EDX).
    fn host_cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4];
    /// A monotonic cycle counter (the TSC on hardware).
    fn timestamp(&self) -> u64;
    /// One complete line a VM wrote to its console, to be shown with the VM's name.
    fn console_line(&mut self, vm_name: &str, line: &str);
    /// A host interrupt made the guest exit: let the host take it now (the kernel opens the
    /// interrupt flag for one instruction).
    fn take_host_interrupts(&mut self) {}
    /// Something happened to vCPU `vcpu` of VM `vm_id` (an IPI, a startup IPI): if it waits or
    /// runs on another physical CPU, that CPU should look at it soon.
    fn wake(&mut self, _vm_id: usize, _vcpu: usize) {}
    /// The wall-clock time now, in Unix seconds (UTC), for the guests' RTCs (0: unknown).
    fn unix_seconds(&self) -> u64 {
        0
    }
    /// Just before a guest entry and just after the exit (the kernel counts CPUs in guests).
    fn guest_entering(&mut self) {}
    fn guest_left(&mut self) {}
    /// After each exit of `vm` that was handled and left the VM running, with the VM still
    /// locked and no device locked: `queues_run` says the exit ran a device queue (a virtio
    /// notification, through a BAR or the configuration window). The kernel moves the VM's
    /// network frames here, so they leave when they are sent rather than at its next
    /// scheduler pass. It must not block on another VM's lock (only try it).
    fn exit_handled(
        &mut self,
        _vm: &mut vm::Vm,
        _host: &mut dyn ringzero_memory::HostMemory,
        _queues_run: bool,
    ) {
    }
}
