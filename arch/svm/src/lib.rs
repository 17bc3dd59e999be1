//! The AMD SVM backend behind `ringzero_vmm::vcpu::Vcpu`.
//!
//! Manual: AMD64 Architecture Programmer's Manual Volume 2: System Programming (pub. 24593,
//! rev. 3.42), chapter 15 "Secure Virtual Machine" and Appendix B "Layout of VMCB", Appendix C
//! "SVM Intercept Exit Codes".
//!
//! - `vmcb`: the VMCB layout, declared once, offsets checked at compile time (pure).
//! - `exit`: EXITCODE/EXITINFO decoding into vendor-neutral exits (pure, host-tested).
//! - `intercepts`: which events the guest may not do by itself (pure).
//! - `hw`: the world switch (VMLOAD/VMRUN/VMSAVE) and EFER.SVME/VM_HSAVE_PA set-up: the only
//!   unsafe code of this crate.
//! - `vcpu`: one vCPU = one VMCB + its registers.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod exit;
pub mod hw;
pub mod intercepts;
pub mod vcpu;
pub mod vmcb;

pub use vcpu::{PagingSetup, SvmFeatures, SvmFrames, SvmVcpu};
