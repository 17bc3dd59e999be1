//! x86-64 building blocks shared by the hypervisor: the pure decoders of CPUID and
//! capability MSRs (`caps`) and of the ACPI sleep package (`acpi_sleep`), both host-tested,
//! and, in `hw`, every inline-assembly wrapper (the only unsafe code of this crate).
#![cfg_attr(not(test), no_std)]

pub mod acpi_sleep;
pub mod caps;
pub mod hw;
