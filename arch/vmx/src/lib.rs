//! The Intel VMX backend behind `ringzero_vmm::vcpu::Vcpu`, mirroring `arch/svm`.
//!
//! Manual: Intel 64 and IA-32 Architectures Software Developer's Manual (order 325462,
//! rev. 084), Volume 3C chapters 25-31 (VMX) and Volume 3D Appendices A (capability MSRs),
//! B (VMCS field encodings) and C (exit reasons).
//!
//! - `vmcs`: every VMCS field the hypervisor uses, as typed encodings (pure).
//! - `controls`: the execution/exit/entry controls, adjusted to the capability MSRs (pure).
//! - `exit`: exit reasons and VM-instruction errors decoded into vendor-neutral words (pure).
//! - `hw`: VMXON/VMCLEAR/VMPTRLD/VMREAD/VMWRITE/INVEPT/INVVPID and the world switch: the only
//!   unsafe code of this crate.
//! - `vcpu`: one vCPU = one VMCS + its registers.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod controls;
pub mod exit;
pub mod hw;
pub mod vcpu;
pub mod vmcs;

pub use vcpu::{PagingSetup, VmxFrames, VmxVcpu};
