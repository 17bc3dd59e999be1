//! The SMBIOS tables a VM's guest sees: who made the "machine" it runs on.
//!
//! A guest OS reads them to name its platform: Linux prints `DMI: <vendor> <product>, BIOS
//! <version> <date>` early in boot and exposes the strings in /sys/class/dmi/id. Under ringzero
//! that line reads `DMI: ringzero hypervisor VM, BIOS ringzero-0.1.0 12/01/2026`. (Linux 6.1
//! prints "Hypervisor detected: X" only for the hypervisors it has drivers for: KVM, Xen,
//! Hyper-V, VMware, ACRN and Jailhouse. The CPUID hypervisor bit and ringzero's own signature
//! leaf tell it that it is virtualized; the DMI line is where it names the platform.)
//!
//! Layout (`base` 16-byte aligned; a legacy-booted guest scans 0xF0000..0xFFFFF on 16-byte
//! boundaries for the anchor): the 24-byte SMBIOS 3.0 (64-bit) entry point at `base`, then the
//! structure table at `base + 0x20`: type 0 (BIOS), type 1 (system), type 3 (chassis), type 127
//! (end of table). Each structure is its formatted area followed by its strings, each
//! NUL-terminated, the set ended by one more NUL (two NULs when it has no strings).
//!
//! See: DMTF DSP0134 "System Management BIOS (SMBIOS) Reference Specification" 3.0.0: 5.2.2
//! (SMBIOS 3.0 entry point, Table 3), 6.1.2 (structure header), 6.1.3 (text strings), 7.1 (type
//! 0, Table 6), 7.2 (type 1, Table 10), 7.4 (type 3, Table 16), 7.45 (type 127).

use alloc::vec::Vec;

/// The entry point's anchor string. See: DSP0134 5.2.2, Table 3 offset 00h.
pub const ANCHOR: &[u8; 5] = b"_SM3_";
/// The entry point's length. See: DSP0134 5.2.2, Table 3 offset 06h.
const ENTRY_POINT_LENGTH: u8 = 0x18;
/// Where the structure table starts, relative to `base`.
const TABLE_OFFSET: usize = 0x20;

/// The vendor of the platform (type 1 manufacturer, type 0 BIOS vendor, type 3 manufacturer).
pub const VENDOR: &str = "ringzero";
/// The product (type 1 product name).
pub const PRODUCT: &str = "hypervisor VM";
/// The "BIOS" version: the hypervisor that built the tables.
pub const BIOS_VERSION: &str = concat!("ringzero-", env!("CARGO_PKG_VERSION"));
/// The "BIOS" release date, mm/dd/yyyy (DSP0134 7.1.1): the release date of this version of
/// the tables. Linux treats firmware dated before 2000 as too old for ACPI, so it must be real.
pub const BIOS_DATE: &str = "12/01/2026";

/// What differs between VMs: the VM's name (type 1 serial number and SKU) and a UUID derived
/// from it, so a VM keeps its identity across runs.
#[derive(Clone, Copy, Debug)]
pub struct SmbiosIdentity<'a> {
    pub vm_name: &'a str,
}

/// Builds the entry point and structure table for placement at guest-physical `base`.
pub fn build(identity: &SmbiosIdentity<'_>, base: u64) -> Vec<u8> {
    let mut table = Vec::new();
    bios_information(&mut table);
    system_information(&mut table, identity);
    chassis_information(&mut table);
    // Type 127, end of table. See: DSP0134 7.45.
    structure(&mut table, 127, 0xFFFE, &[], &[]);

    let mut bytes = alloc::vec![0u8; TABLE_OFFSET];
    // See: DSP0134 5.2.2, Table 3.
    bytes[0..5].copy_from_slice(ANCHOR);
    bytes[6] = ENTRY_POINT_LENGTH;
    bytes[7] = 3; // major version
    bytes[8] = 0; // minor version
    bytes[9] = 0; // docrev
    bytes[0x0A] = 1; // entry point revision: 3.0 entry point
    bytes[0x0C..0x10].copy_from_slice(&(table.len() as u32).to_le_bytes());
    bytes[0x10..0x18].copy_from_slice(&(base + TABLE_OFFSET as u64).to_le_bytes());
    bytes[5] = checksum(&bytes[..usize::from(ENTRY_POINT_LENGTH)]);
    bytes.extend_from_slice(&table);
    bytes
}

/// The byte that makes `bytes` sum to 0 (mod 256).
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |sum, byte| sum.wrapping_add(*byte)))
}

/// Appends one structure: header (type, length, handle), the formatted area after the header,
/// then the strings. String numbers in `formatted` are 1-based indices into `strings`.
/// See: DSP0134 6.1.2 and 6.1.3.
fn structure(out: &mut Vec<u8>, kind: u8, handle: u16, formatted: &[u8], strings: &[&str]) {
    out.push(kind);
    out.push((4 + formatted.len()) as u8);
    out.extend_from_slice(&handle.to_le_bytes());
    out.extend_from_slice(formatted);
    for string in strings {
        // A NUL would end the string early and shift every later one: drop any.
        out.extend(string.bytes().filter(|byte| *byte != 0));
        out.push(0);
    }
    if strings.is_empty() {
        out.push(0);
    }
    out.push(0);
}

/// Type 0. See: DSP0134 7.1, Table 6.
fn bios_information(out: &mut Vec<u8>) {
    let mut formatted = [0u8; 0x18 - 4];
    formatted[0] = 1; // 04h vendor: string 1
    formatted[1] = 2; // 05h BIOS version: string 2
                      // 06h starting address segment: 0 (no real-mode BIOS image)
    formatted[4] = 3; // 08h release date: string 3
                      // 09h ROM size: 0 (64 KiB units - 1; there is no ROM)
                      // 0Ah characteristics: bit 3, "BIOS characteristics are not supported".
    formatted[6..14].copy_from_slice(&(1u64 << 3).to_le_bytes());
    // 12h extension byte 1: 0. 13h extension byte 2: bit 4, "SMBIOS table describes a
    // virtual machine" (7.1.2.2, Table 8).
    formatted[0x13 - 4] = 1 << 4;
    formatted[0x14 - 4] = 0; // system BIOS major release
    formatted[0x15 - 4] = 1; // system BIOS minor release
    formatted[0x16 - 4] = 0xFF; // embedded controller major: none
    formatted[0x17 - 4] = 0xFF; // embedded controller minor: none
    structure(out, 0, 0, &formatted, &[VENDOR, BIOS_VERSION, BIOS_DATE]);
}

/// Type 1. See: DSP0134 7.2, Table 10.
fn system_information(out: &mut Vec<u8>, identity: &SmbiosIdentity<'_>) {
    let mut formatted = [0u8; 0x1B - 4];
    formatted[0] = 1; // 04h manufacturer
    formatted[1] = 2; // 05h product name
    formatted[2] = 3; // 06h version
    formatted[3] = 4; // 07h serial number: the VM's name
    formatted[4..20].copy_from_slice(&uuid(identity.vm_name)); // 08h UUID
    formatted[20] = 0x06; // 18h wake-up type: power switch
    formatted[21] = 4; // 19h SKU number: the VM's name
    formatted[22] = 1; // 1Ah family
    let version = env!("CARGO_PKG_VERSION");
    structure(
        out,
        1,
        1,
        &formatted,
        &[VENDOR, PRODUCT, version, identity.vm_name],
    );
}

/// Type 3: "Other" chassis, no lock, states safe. See: DSP0134 7.4, Table 16.
fn chassis_information(out: &mut Vec<u8>) {
    let mut formatted = [0u8; 0x0D - 4];
    formatted[0] = 1; // 04h manufacturer
    formatted[1] = 0x01; // 05h type: other
                         // 06h version, 07h serial, 08h asset tag: none (string 0)
    formatted[5] = 0x03; // 09h boot-up state: safe
    formatted[6] = 0x03; // 0Ah power supply state: safe
    formatted[7] = 0x03; // 0Bh thermal state: safe
    formatted[8] = 0x03; // 0Ch security status: none
    structure(out, 3, 3, &formatted, &[VENDOR]);
}

/// A UUID for the VM derived from its name (two FNV-1a 64-bit hashes with different seeds),
/// marked as an RFC 4122 name-based variant. Stable across runs, different between names.
fn uuid(name: &str) -> [u8; 16] {
    let hash = |seed: u64| {
        name.bytes().fold(seed, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01B3)
        })
    };
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&hash(0xCBF2_9CE4_8422_2325).to_le_bytes());
    bytes[8..].copy_from_slice(&hash(0x6C62_272E_07BB_0142).to_le_bytes());
    bytes[6] = (bytes[6] & 0x0F) | 0x50; // version 5 (name-based)
    bytes[8] = (bytes[8] & 0x3F) | 0x80; // RFC 4122 variant
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks the structure table as a reader (Linux's dmi_decode) does: header, formatted
    /// area, strings up to the double NUL. Returns (type, formatted, strings) per structure.
    fn walk(table: &[u8]) -> Vec<(u8, Vec<u8>, Vec<String>)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < table.len() {
            let kind = table[at];
            let length = usize::from(table[at + 1]);
            let formatted = table[at + 4..at + length].to_vec();
            let mut strings = Vec::new();
            let mut cursor = at + length;
            loop {
                let end = cursor + table[cursor..].iter().position(|b| *b == 0).unwrap();
                if end == cursor {
                    cursor += 1;
                    break;
                }
                strings.push(String::from_utf8(table[cursor..end].to_vec()).unwrap());
                cursor = end + 1;
                if table[cursor] == 0 {
                    cursor += 1;
                    break;
                }
            }
            if strings.is_empty() {
                // Two NULs: the first ended the (empty) formatted strings, this is the second.
                assert_eq!(table[cursor], 0);
                cursor += 1;
            }
            out.push((kind, formatted, strings));
            at = cursor;
            if kind == 127 {
                break;
            }
        }
        assert_eq!(at, table.len(), "bytes after the end-of-table structure");
        out
    }

    #[test]
    fn entry_point_is_checksummed_and_points_at_the_table() {
        let bytes = build(&SmbiosIdentity { vm_name: "vm1" }, 0xF0000);
        assert_eq!(&bytes[..5], ANCHOR);
        assert_eq!(bytes[6], 24);
        let sum = bytes[..24].iter().fold(0u8, |s, b| s.wrapping_add(*b));
        assert_eq!(sum, 0);
        let length = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
        let address = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
        assert_eq!(address, 0xF0020);
        assert_eq!(bytes.len(), 0x20 + length);
    }

    #[test]
    fn structures_name_the_platform_and_the_vm() {
        let bytes = build(&SmbiosIdentity { vm_name: "vm1" }, 0xF0000);
        let structures = walk(&bytes[0x20..]);
        let kinds: Vec<u8> = structures.iter().map(|s| s.0).collect();
        assert_eq!(kinds, [0, 1, 3, 127]);
        let (_, bios, strings) = &structures[0];
        assert_eq!(bios.len(), 0x18 - 4);
        assert_eq!(strings, &["ringzero", "ringzero-0.1.0", "12/01/2026"]);
        let (_, system, strings) = &structures[1];
        assert_eq!(system.len(), 0x1B - 4);
        assert_eq!(strings, &["ringzero", "hypervisor VM", "0.1.0", "vm1"]);
        // Product name is string 2, serial number string 4.
        assert_eq!((system[1], system[3]), (2, 4));
    }

    #[test]
    fn uuids_are_stable_and_differ_between_vms() {
        assert_eq!(uuid("a"), uuid("a"));
        assert_ne!(uuid("a"), uuid("b"));
        assert_eq!(uuid("a")[6] >> 4, 5);
    }

    #[test]
    fn nul_in_a_vm_name_cannot_shift_the_strings() {
        let bytes = build(&SmbiosIdentity { vm_name: "a\0b" }, 0xF0000);
        let structures = walk(&bytes[0x20..]);
        assert_eq!(structures[1].2[3], "ab");
    }
}
