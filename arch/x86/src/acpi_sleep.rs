//! The ACPI S5 ("soft off") sleep type, found in the DSDT's AML without an interpreter.
//!
//! Powering off through ACPI means writing SLP_TYPa | SLP_EN to the PM1a control register
//! (and SLP_TYPb to PM1b if present). The SLP_TYP values live in the DSDT as the package
//! `Name (\_S5, Package () { SLP_TYPa, SLP_TYPb, ... })`. Firmware almost always encodes it
//! literally, so a byte scan finds it; evaluating the whole AML namespace (the `acpi` crate's
//! interpreter) just for these two numbers would cost far more at boot and bring its own
//! failure modes. When the package is not literal (built by a method), this returns `None`
//! and the caller falls back to the other power-off paths.
//!
//! See: ACPI 6.5 spec, 7.4.2 "\_Sx (System States)", 4.8.3.2.1 "PM1 Control Registers",
//! 20.2.5.4 "Type 2 Opcodes Encoding" (PackageOp) and 20.2.4 "Package Length Encoding".

/// The two sleep-type values for one sleep state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SleepType {
    /// Written to PM1a_CNT.SLP_TYP.
    pub a: u8,
    /// Written to PM1b_CNT.SLP_TYP when the platform has a PM1b block.
    pub b: u8,
}

/// PM1_CNT.SLP_EN: start the transition. See: ACPI 6.5 Table 4.13.
pub const SLP_EN: u16 = 1 << 13;
/// PM1_CNT.SLP_TYP is bits 12:10. See: ACPI 6.5 Table 4.13.
const SLP_TYP_SHIFT: u16 = 10;

impl SleepType {
    /// The PM1a control value that enters this state.
    pub fn pm1a_control(self) -> u16 {
        (u16::from(self.a & 0x7) << SLP_TYP_SHIFT) | SLP_EN
    }

    /// The PM1b control value that enters this state.
    pub fn pm1b_control(self) -> u16 {
        (u16::from(self.b & 0x7) << SLP_TYP_SHIFT) | SLP_EN
    }
}

const NAME_OP: u8 = 0x08;
const PACKAGE_OP: u8 = 0x12;
const ROOT_CHAR: u8 = b'\\';
const ZERO_OP: u8 = 0x00;
const ONE_OP: u8 = 0x01;
const BYTE_PREFIX: u8 = 0x0A;
const WORD_PREFIX: u8 = 0x0B;
const DWORD_PREFIX: u8 = 0x0C;

/// Finds the literal `\_S5` package in an AML byte stream (the DSDT body, header included or
/// not) and returns its first two elements.
pub fn find_s5(aml: &[u8]) -> Option<SleepType> {
    let mut search_from = 0;
    while let Some(found) = find_bytes(&aml[search_from..], b"_S5_") {
        let name_at = search_from + found;
        search_from = name_at + 4;
        // NameOp directly before the name, or before a root prefix '\'.
        let is_name = match name_at {
            0 => false,
            1 => aml[0] == NAME_OP,
            _ => {
                aml[name_at - 1] == NAME_OP
                    || (aml[name_at - 1] == ROOT_CHAR && aml[name_at - 2] == NAME_OP)
            }
        };
        if !is_name {
            continue;
        }
        if let Some(sleep_type) = parse_package(&aml[search_from..]) {
            return Some(sleep_type);
        }
    }
    None
}

/// Parses `PackageOp PkgLength NumElements Element Element ...` and returns the first two
/// elements as integers.
fn parse_package(bytes: &[u8]) -> Option<SleepType> {
    let (&op, rest) = bytes.split_first()?;
    if op != PACKAGE_OP {
        return None;
    }
    let (&lead, _) = rest.split_first()?;
    // Bits 7:6 of the lead byte count the PkgLength bytes that follow it.
    let length_bytes = 1 + usize::from(lead >> 6);
    let rest = rest.get(length_bytes..)?;
    let (&element_count, rest) = rest.split_first()?;
    if element_count < 2 {
        return None;
    }
    let (a, used) = parse_integer(rest)?;
    let (b, _) = parse_integer(rest.get(used..)?)?;
    Some(SleepType {
        a: u8::try_from(a & 0x7).ok()?,
        b: u8::try_from(b & 0x7).ok()?,
    })
}

/// Parses one integer data object: ZeroOp, OneOp, or a Byte/Word/DWord constant. Returns
/// the value and how many bytes it took.
fn parse_integer(bytes: &[u8]) -> Option<(u32, usize)> {
    match *bytes.first()? {
        ZERO_OP => Some((0, 1)),
        ONE_OP => Some((1, 1)),
        BYTE_PREFIX => Some((u32::from(*bytes.get(1)?), 2)),
        WORD_PREFIX => {
            let value = u16::from_le_bytes(bytes.get(1..3)?.try_into().ok()?);
            Some((u32::from(value), 3))
        }
        DWORD_PREFIX => {
            let value = u32::from_le_bytes(bytes.get(1..5)?.try_into().ok()?);
            Some((value, 5))
        }
        _ => None,
    }
}

fn find_bytes(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_style_s5_with_zero_ops() {
        // QEMU's DSDT (hw/acpi/aml-build via build_dsdt): Name (_S5, Package (0x04) {Zero, Zero, Zero, Zero})
        // encoded as 08 5F 53 35 5F 12 06 04 00 00 00 00.
        let aml = [
            0x10, 0x08, 0x5F, 0x53, 0x35, 0x5F, 0x12, 0x06, 0x04, 0, 0, 0, 0,
        ];
        assert_eq!(find_s5(&aml), Some(SleepType { a: 0, b: 0 }));
    }

    #[test]
    fn byte_prefixed_values_and_root_prefix() {
        // Name (\_S5, Package (0x04) {0x05, 0x05, Zero, Zero}) as many PC firmwares have it.
        let aml = [
            0x08, b'\\', b'_', b'S', b'5', b'_', 0x12, 0x0A, 0x04, 0x0A, 0x05, 0x0A, 0x05, 0x00,
            0x00,
        ];
        let found = find_s5(&aml).unwrap();
        assert_eq!(found, SleepType { a: 5, b: 5 });
        assert_eq!(found.pm1a_control(), (5 << 10) | (1 << 13));
    }

    #[test]
    fn skips_references_that_are_not_names() {
        // A method body mentioning _S5_ (e.g. a Notify) before the real definition.
        let aml = [
            0x86, b'_', b'S', b'5', b'_', 0x0A, 0x80, 0x08, b'_', b'S', b'5', b'_', 0x12, 0x05,
            0x02, 0x01, 0x0A, 0x07,
        ];
        assert_eq!(find_s5(&aml), Some(SleepType { a: 1, b: 7 }));
    }

    #[test]
    fn truncated_or_missing_gives_none() {
        assert_eq!(find_s5(&[]), None);
        assert_eq!(find_s5(b"_S5_"), None);
        assert_eq!(find_s5(&[0x08, b'_', b'S', b'5', b'_', 0x12]), None);
        assert_eq!(
            find_s5(&[0x08, b'_', b'S', b'5', b'_', 0x12, 0x06, 0x04, 0x0A]),
            None
        );
        // A method named _S5_ cannot be evaluated by a scan.
        assert_eq!(find_s5(&[0x14, 0x08, b'_', b'S', b'5', b'_', 0x00]), None);
    }

    #[test]
    fn multi_byte_package_length() {
        let aml = [
            0x08, b'_', b'S', b'5', b'_', 0x12, 0x40, 0x01, 0x04, 0x0B, 0x03, 0x00, 0x0C, 0x02, 0,
            0, 0,
        ];
        assert_eq!(find_s5(&aml), Some(SleepType { a: 3, b: 2 }));
    }
}
