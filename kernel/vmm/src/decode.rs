//! Fetching and decoding the instruction at the guest's RIP: to skip it when the hardware did
//! not say how long it was (SVM without NRIP save, as under QEMU's TCG), and to disassemble it
//! for the trap trace. Decoding is iced-x86's; the fetch walks the guest's own page tables.

use crate::vcpu::GuestSnapshot;
use alloc::string::String;
use iced_x86::{Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter};
use ringzero_memory::{
    paging_mode, read_guest_virtual, GuestRam, GuestVirtAddr, HostMemory, PAGE_SIZE,
};

/// The longest x86 instruction.
pub const MAX_INSTRUCTION_LENGTH: usize = 15;

/// Why the instruction at RIP could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// RIP's page is not mapped by the guest or lies outside its RAM.
    NotMapped,
    /// The bytes are not a valid instruction.
    Invalid,
}

/// Reads up to 15 bytes at CS:RIP (fewer when the next page is not mapped).
pub fn fetch(
    ram: &GuestRam,
    host: &dyn HostMemory,
    state: &GuestSnapshot,
) -> Result<([u8; MAX_INSTRUCTION_LENGTH], usize), DecodeError> {
    let mode = paging_mode(state.cr0, state.cr4, state.efer);
    // In 64-bit mode the CS base is treated as 0 (SDM Vol 3A 3.4.4); elsewhere linear
    // addresses wrap at 4 GiB.
    let linear = if state.cs_long_mode {
        state.rip
    } else {
        state.cs_base.wrapping_add(state.rip) & 0xFFFF_FFFF
    };
    let mut bytes = [0u8; MAX_INSTRUCTION_LENGTH];
    let in_first_page = (PAGE_SIZE - (linear % PAGE_SIZE)) as usize;
    let first = in_first_page.min(MAX_INSTRUCTION_LENGTH);
    read_guest_virtual(
        ram,
        host,
        mode,
        state.cr3,
        GuestVirtAddr(linear),
        &mut bytes[..first],
    )
    .map_err(|_| DecodeError::NotMapped)?;
    let mut length = first;
    if first < MAX_INSTRUCTION_LENGTH
        && read_guest_virtual(
            ram,
            host,
            mode,
            state.cr3,
            GuestVirtAddr(linear + first as u64),
            &mut bytes[first..],
        )
        .is_ok()
    {
        length = MAX_INSTRUCTION_LENGTH;
    }
    Ok((bytes, length))
}

/// Decodes one instruction from `bytes` at `rip` for the given code size.
pub fn decode(bytes: &[u8], bitness: u32, rip: u64) -> Result<Instruction, DecodeError> {
    let mut decoder = Decoder::with_ip(bitness, bytes, rip, DecoderOptions::NONE);
    let instruction = decoder.decode();
    if instruction.is_invalid() {
        Err(DecodeError::Invalid)
    } else {
        Ok(instruction)
    }
}

/// The length of the instruction at the guest's RIP.
pub fn instruction_length(
    ram: &GuestRam,
    host: &dyn HostMemory,
    state: &GuestSnapshot,
) -> Result<u64, DecodeError> {
    let (bytes, length) = fetch(ram, host, state)?;
    Ok(decode(&bytes[..length], state.code_bitness(), state.rip)?.len() as u64)
}

/// Intel-syntax disassembly of the instruction at the guest's RIP, or a note saying why not.
pub fn disassemble(ram: &GuestRam, host: &dyn HostMemory, state: &GuestSnapshot) -> String {
    let decoded = fetch(ram, host, state)
        .and_then(|(bytes, length)| decode(&bytes[..length], state.code_bitness(), state.rip));
    match decoded {
        Ok(instruction) => format_instruction(&instruction),
        Err(DecodeError::NotMapped) => String::from("(not mapped)"),
        Err(DecodeError::Invalid) => String::from("(invalid instruction)"),
    }
}

/// Intel syntax, lower case, as `objdump -M intel` prints it.
pub fn format_instruction(instruction: &Instruction) -> String {
    let mut formatter = IntelFormatter::new();
    formatter
        .options_mut()
        .set_space_after_operand_separator(true);
    let mut text = String::new();
    formatter.format(instruction, &mut text);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_lengths_of_trapping_instructions() {
        // cpuid; hlt; out dx, al; in al, dx; rdmsr; vmmcall; 66 0f a2 (prefixed cpuid)
        let cases: [(&[u8], u64, &str); 7] = [
            (&[0x0F, 0xA2], 2, "cpuid"),
            (&[0xF4], 1, "hlt"),
            (&[0xEE], 1, "out dx, al"),
            (&[0xEC], 1, "in al, dx"),
            (&[0x0F, 0x32], 2, "rdmsr"),
            (&[0x0F, 0x01, 0xD9], 3, "vmmcall"),
            (&[0x66, 0x0F, 0xA2], 3, "cpuid"),
        ];
        for (bytes, length, text) in cases {
            let instruction = decode(bytes, 64, 0x10_0000).unwrap();
            assert_eq!(instruction.len() as u64, length, "{text}");
            assert_eq!(format_instruction(&instruction), text);
        }
    }

    #[test]
    fn invalid_bytes_are_an_error() {
        assert_eq!(
            decode(&[0x0F, 0xFF], 64, 0).err(),
            Some(DecodeError::Invalid)
        );
        assert_eq!(decode(&[], 64, 0).err(), Some(DecodeError::Invalid));
    }
}
