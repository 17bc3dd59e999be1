//! The real-mode start-up code of the application processors (APs): the bytes the boot CPU
//! copies into a 4 KiB page below 1 MiB before it sends INIT-SIPI-SIPI, and the layout of the
//! parameter block it writes into the same page.
//!
//! A STARTUP IPI with vector VV starts the AP in real mode at CS = VV00h, IP = 0, that is at
//! physical address VV000h. From there the code below:
//! 1. (16-bit) puts the page's linear base in EBX, loads the trampoline GDT of the parameter
//!    block, sets CR0.PE and far-jumps to its 32-bit part;
//! 2. (32-bit, paging off) loads flat data segments, then CR4 (PAE), CR3 (the boot CPU's page
//!    tables, which map this page at its own address), EFER (LME, NXE, SCE), and CR0 (PG):
//!    the CPU is now in IA-32e compatibility mode; it far-jumps to the 64-bit code segment;
//! 3. (64-bit) takes its stack, its logical CPU index and the entry point from the parameter
//!    block and calls `entry(cpu_index)` (System V ABI), which never returns.
//!
//! Nothing here is position-dependent: code reaches the parameter block through EBX / RBX,
//! and the boot CPU writes the two far-jump targets (page base + label offset) into it.
//!
//! See: SDM Vol 3A 9.4.4.2 "Typical AP initialization sequence", 10.8.5 "Initializing IA-32e
//! mode", 10.9 "Mode switching"; Vol 3A 3.4.5 "Segment descriptors" for the GDT entries.

use core::mem::offset_of;

/// Where the parameter block sits inside the start-up page (the code is far shorter).
pub const PARAMETERS_OFFSET: usize = 0xE00;

/// Selectors of the trampoline GDT (index * 8).
const CODE32_SELECTOR: u16 = 0x08;
const DATA_SELECTOR: u16 = 0x10;
const CODE64_SELECTOR: u16 = 0x18;

/// Flat 4 GiB descriptors: base 0, limit 0xFFFFF with G = 1, present, DPL 0.
/// 32-bit code (D = 1, type execute/read), data (type read/write), 64-bit code (L = 1, D = 0).
/// See: SDM Vol 3A 3.4.5, 5.2.1 "Code-segment descriptor in 64-bit mode".
const GDT_CODE32: u64 = 0x00CF_9A00_0000_FFFF;
const GDT_DATA: u64 = 0x00CF_9200_0000_FFFF;
const GDT_CODE64: u64 = 0x00AF_9A00_0000_FFFF;

/// The parameter block at [`PARAMETERS_OFFSET`] of the start-up page. The assembly below
/// reads it at the offsets `offset_of!` gives, so the two cannot drift apart.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StartupParameters {
    /// Null, 32-bit code, data, 64-bit code.
    pub gdt: [u64; 4],
    /// The LGDT operand: limit, then the 32-bit linear base (low word, high word), padding.
    pub gdtr: [u16; 4],
    /// `m16:32` far pointer to the 32-bit part: offset in bits 0..32, selector in 32..48.
    pub protected_mode_target: u64,
    /// `m16:32` far pointer to the 64-bit part.
    pub long_mode_target: u64,
    /// Control registers and EFER to load (CR3 must lie below 4 GiB: it is loaded in 32-bit mode).
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    /// Top of this AP's stack (16-byte aligned), its logical index, and the address of
    /// `extern "C" fn(cpu_index: u64) -> !` to call.
    pub stack_top: u64,
    pub cpu_index: u64,
    pub entry: u64,
}

impl StartupParameters {
    /// The block for a start-up page at physical `page_base` (page-aligned, below 1 MiB):
    /// GDT, GDTR and far-jump targets filled in; registers, stack, index and entry zero.
    pub fn for_page(page_base: u32) -> StartupParameters {
        let gdt_base = page_base + (PARAMETERS_OFFSET + offset_of!(StartupParameters, gdt)) as u32;
        let offsets = code_offsets();
        let far = |offset: usize, selector: u16| {
            u64::from(page_base + offset as u32) | (u64::from(selector) << 32)
        };
        StartupParameters {
            gdt: [0, GDT_CODE32, GDT_DATA, GDT_CODE64],
            gdtr: [
                (4 * 8 - 1) as u16,
                gdt_base as u16,
                (gdt_base >> 16) as u16,
                0,
            ],
            protected_mode_target: far(offsets.protected_mode, CODE32_SELECTOR),
            long_mode_target: far(offsets.long_mode, CODE64_SELECTOR),
            ..StartupParameters::default()
        }
    }
}

// See: SDM Vol 3A 9.4.4.2, 10.8.5 (steps numbered in the module doc). AT&T syntax, because
// the operand-size suffixes (lgdtl, ljmpl) say exactly which encoding each mode gets.
core::arch::global_asm!(
    ".pushsection .rodata.ringzero_ap_trampoline, \"a\"",
    ".balign 16",
    ".global ringzero_ap_trampoline_start",
    "ringzero_ap_trampoline_start:",
    ".code16",
    // Step 1: real mode at CS:0 = VV00h:0.
    "cli",
    "cld",
    "xorl %ebx, %ebx",
    "movw %cs, %bx",
    "movw %bx, %ds",
    "shll $4, %ebx",
    "lgdtl {gdtr}",
    "movl %cr0, %eax",
    "orl $1, %eax",
    "movl %eax, %cr0",
    "ljmpl *{protected_mode_target}",
    ".code32",
    ".global ringzero_ap_trampoline_protected_mode",
    "ringzero_ap_trampoline_protected_mode:",
    // Step 2: protected mode, paging off; EBX = the page's linear base.
    "movw ${data_selector}, %ax",
    "movw %ax, %ds",
    "movw %ax, %es",
    "movw %ax, %ss",
    "movl {cr4}(%ebx), %eax",
    "movl %eax, %cr4",
    "movl {cr3}(%ebx), %eax",
    "movl %eax, %cr3",
    "movl $0xC0000080, %ecx",
    "movl {efer}(%ebx), %eax",
    "movl {efer_high}(%ebx), %edx",
    "wrmsr",
    "movl {cr0}(%ebx), %eax",
    "movl %eax, %cr0",
    "ljmp *{long_mode_target}(%ebx)",
    ".code64",
    ".global ringzero_ap_trampoline_long_mode",
    "ringzero_ap_trampoline_long_mode:",
    // Step 3: 64-bit mode. The upper halves of the registers are undefined after the switch
    // (SDM Vol 1 3.4.1.1): writing EBX zero-extends it into RBX.
    "movl %ebx, %ebx",
    "xorl %eax, %eax",
    "movw %ax, %fs",
    "movw %ax, %gs",
    "movq {stack_top}(%rbx), %rsp",
    "movq {cpu_index}(%rbx), %rdi",
    "movq {entry}(%rbx), %rax",
    "xorl %ebp, %ebp",
    "callq *%rax",
    "2:",
    "cli",
    "hlt",
    "jmp 2b",
    ".global ringzero_ap_trampoline_end",
    "ringzero_ap_trampoline_end:",
    ".popsection",
    gdtr = const PARAMETERS_OFFSET + offset_of!(StartupParameters, gdtr),
    protected_mode_target = const PARAMETERS_OFFSET + offset_of!(StartupParameters, protected_mode_target),
    long_mode_target = const PARAMETERS_OFFSET + offset_of!(StartupParameters, long_mode_target),
    data_selector = const DATA_SELECTOR,
    cr0 = const PARAMETERS_OFFSET + offset_of!(StartupParameters, cr0),
    cr3 = const PARAMETERS_OFFSET + offset_of!(StartupParameters, cr3),
    cr4 = const PARAMETERS_OFFSET + offset_of!(StartupParameters, cr4),
    efer = const PARAMETERS_OFFSET + offset_of!(StartupParameters, efer),
    efer_high = const PARAMETERS_OFFSET + offset_of!(StartupParameters, efer) + 4,
    stack_top = const PARAMETERS_OFFSET + offset_of!(StartupParameters, stack_top),
    cpu_index = const PARAMETERS_OFFSET + offset_of!(StartupParameters, cpu_index),
    entry = const PARAMETERS_OFFSET + offset_of!(StartupParameters, entry),
    options(att_syntax)
);

unsafe extern "C" {
    static ringzero_ap_trampoline_start: u8;
    static ringzero_ap_trampoline_protected_mode: u8;
    static ringzero_ap_trampoline_long_mode: u8;
    static ringzero_ap_trampoline_end: u8;
}

/// Offsets of the code's parts from its start.
struct CodeOffsets {
    protected_mode: usize,
    long_mode: usize,
    length: usize,
}

fn code_offsets() -> CodeOffsets {
    let start = &raw const ringzero_ap_trampoline_start as usize;
    CodeOffsets {
        protected_mode: &raw const ringzero_ap_trampoline_protected_mode as usize - start,
        long_mode: &raw const ringzero_ap_trampoline_long_mode as usize - start,
        length: &raw const ringzero_ap_trampoline_end as usize - start,
    }
}

/// The start-up code, to be copied to offset 0 of the start-up page.
pub fn code() -> &'static [u8] {
    let length = code_offsets().length;
    assert!(
        length <= PARAMETERS_OFFSET,
        "the AP start-up code overlaps its parameters"
    );
    // SAFETY: the two symbols delimit bytes of the read-only section emitted above, which live
    // for the whole program.
    unsafe { core::slice::from_raw_parts(&raw const ringzero_ap_trampoline_start, length) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_block_fits_the_page_and_is_laid_out_as_the_assembly_reads_it() {
        assert!(PARAMETERS_OFFSET + core::mem::size_of::<StartupParameters>() <= 4096);
        assert_eq!(offset_of!(StartupParameters, gdtr), 0x20);
        assert_eq!(offset_of!(StartupParameters, protected_mode_target), 0x28);
        assert_eq!(offset_of!(StartupParameters, entry), 0x68);
    }

    #[test]
    fn far_pointers_and_gdtr_point_into_the_page() {
        let parameters = StartupParameters::for_page(0x9F000);
        assert_eq!(parameters.gdtr[0], 31);
        let gdt_base = u32::from(parameters.gdtr[1]) | (u32::from(parameters.gdtr[2]) << 16);
        assert_eq!(gdt_base, 0x9F000 + PARAMETERS_OFFSET as u32);
        assert_eq!(
            parameters.protected_mode_target >> 32,
            u64::from(CODE32_SELECTOR)
        );
        assert_eq!(
            parameters.long_mode_target >> 32,
            u64::from(CODE64_SELECTOR)
        );
        let protected = parameters.protected_mode_target & 0xFFFF_FFFF;
        let long = parameters.long_mode_target & 0xFFFF_FFFF;
        assert!(protected > 0x9F000 && protected < long);
        assert!(long < 0x9F000 + code().len() as u64);
    }

    #[test]
    fn code_starts_with_cli_cld() {
        assert_eq!(&code()[..2], &[0xFA, 0xFC]);
    }
}
