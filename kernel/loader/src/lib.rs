//! What the host tool (`boot/`) packs and the hypervisor loads: the boot manifest (every
//! guest with its settings, kernel image and modules) and the boot plans that put a guest
//! image into its RAM per docs/specs/guest-boot.md (flat64, Multiboot, Linux bzImage).
//!
//! Host-testable and free of `unsafe`; the hypervisor sees only a checked [`manifest::Manifest`]
//! and applies a [`boot_plan::BootPlan`].
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod boot_plan;
pub mod linux;
pub mod manifest;
