//! x86-64 building blocks shared by the hypervisor: the pure decoders of CPUID and
//! capability MSRs (`caps`) and of the ACPI sleep package (`acpi_sleep`), both host-tested,
//! and, in `hw`, every inline-assembly wrapper (the only unsafe code of this crate, with the
//! volatile erasing and the XSAVE calls of `extended_state`, the guests' x87/SSE/AVX state).
#![cfg_attr(not(test), no_std)]

pub mod acpi_sleep;
pub mod caps;
pub mod extended_state;
pub mod hw;
