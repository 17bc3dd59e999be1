//! What the host tool (`boot/`) packs and the hypervisor unpacks: the boot manifest.
//!
//! Host-testable and free of `unsafe`; the hypervisor sees only a checked [`Manifest`].
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod manifest;
