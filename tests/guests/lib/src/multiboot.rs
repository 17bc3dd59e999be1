//! Multiboot v1 (specification 0.6.96) for guests entered by a Multiboot loader: the header and
//! 32-bit entry stub (`multiboot_entry!`) that takes the CPU from the loader's 32-bit protected
//! mode to 64-bit long mode, and a bounds-checked reader of the Multiboot information structure.

/// Multiboot header magic (spec 3.1.1).
pub const HEADER_MAGIC: u32 = 0x1BAD_B002;
/// The value a Multiboot loader leaves in EAX (spec 3.2).
pub const BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;
/// The end of the identity mapping the entry stub builds: 1 GiB in 2 MiB pages.
pub const MAPPED_END: u64 = 0x4000_0000;

/// Information structure flags (spec 3.3).
pub mod info_flags {
    pub const MEMORY: u32 = 1 << 0;
    pub const CMDLINE: u32 = 1 << 2;
    pub const MODULES: u32 = 1 << 3;
    pub const MEMORY_MAP: u32 = 1 << 6;
    pub const BOOT_LOADER_NAME: u32 = 1 << 9;
}

/// Defines a Multiboot v1 header and the 32-bit entry `multiboot_entry32`, and calls
/// `$main(magic: u32, info_address: u32) -> !` in 64-bit mode.
///
/// The header asks for page-aligned modules (flag 0) and memory information (flag 1), and gives
/// the a.out-kludge address fields (flag 16) from the linker script's `__load_start`,
/// `__load_end` and `__bss_end`, so that loaders that cannot load an ELF64 (QEMU's `-kernel`)
/// load it too. The binary's linker script must put `.multiboot_header` first and
/// `.text.entry32` in the image, and define those symbols and `__bss_start`.
///
/// Entered per Multiboot 3.2 (docs/specs/guest-boot.md "multiboot"): 32-bit protected mode,
/// paging off, EAX = 0x2BADB002, EBX = the information structure. The stub
/// 1. keeps EAX and EBX in ESI and EBP, and, if EAX is not the loader magic, prints a line and
///    exits with status 1 (port 0xF4);
/// 2. zeroes `.bss` (page tables and stack are there);
/// 3. builds an identity map of [0, 1 GiB): PML4[0] -> PDPT[0] -> 512 2 MiB pages (P, RW, PS);
/// 4. enables CR4.PAE, loads CR3, sets EFER.LME, sets CR0.PG (+PE): long mode, compatibility
///    submode (SDM Vol 3A 10.8.5, "Initializing IA-32e Mode");
/// 5. loads a GDT with a 64-bit code segment (0x08) and a data segment (0x10) and far-jumps to
///    0x08:64-bit code, which loads the data segments and a 64 KiB stack and calls `$main`.
#[macro_export]
macro_rules! multiboot_entry {
    ($main:path) => {
        extern "C" fn __guest_multiboot_main(magic: u32, info_address: u32) -> ! {
            let main: fn(u32, u32) -> ! = $main;
            main(magic, info_address)
        }

        ::core::arch::global_asm!(
            ".pushsection .multiboot_header, \"a\"",
            ".balign 4",
            "multiboot_header:",
            "    .long 0x1BADB002",
            "    .long 0x00010003",
            "    .long -(0x1BADB002 + 0x00010003)",
            "    .long multiboot_header",
            "    .long __load_start",
            "    .long __load_end",
            "    .long __bss_end",
            "    .long multiboot_entry32",
            ".popsection",

            ".pushsection .text.entry32, \"ax\"",
            ".code32",
            ".global multiboot_entry32",
            "multiboot_entry32:",
            // 1. Keep the loader's registers; check the magic.
            "    cli",
            "    cld",
            "    movl %eax, %esi",
            "    movl %ebx, %ebp",
            "    cmpl $0x2BADB002, %esi",
            "    jne 90f",
            // 2. Zero .bss.
            "    movl $__bss_start, %edi",
            "    movl $__bss_end, %ecx",
            "    subl %edi, %ecx",
            "    xorl %eax, %eax",
            "    rep stosb",
            // 3. Identity map [0, 1 GiB) with 2 MiB pages. See: SDM Vol 3A 5.5.4.
            "    movl $mb_pdpt, %eax",
            "    orl $0x3, %eax",
            "    movl %eax, mb_pml4",
            "    movl $mb_pd, %eax",
            "    orl $0x3, %eax",
            "    movl %eax, mb_pdpt",
            "    xorl %ecx, %ecx",
            "1:  movl %ecx, %eax",
            "    shll $21, %eax",
            "    orl $0x83, %eax",
            "    movl %eax, mb_pd(,%ecx,8)",
            "    incl %ecx",
            "    cmpl $512, %ecx",
            "    jne 1b",
            // 4. PAE, CR3, EFER.LME, paging. See: SDM Vol 3A 10.8.5.
            "    movl %cr4, %eax",
            "    orl $0x20, %eax",
            "    movl %eax, %cr4",
            "    movl $mb_pml4, %eax",
            "    movl %eax, %cr3",
            "    movl $0xC0000080, %ecx",
            "    rdmsr",
            "    orl $0x100, %eax",
            "    wrmsr",
            "    movl %cr0, %eax",
            "    orl $0x80000001, %eax",
            "    movl %eax, %cr0",
            // 5. 64-bit GDT, far jump to 64-bit code.
            "    lgdt mb_gdt64_pointer",
            "    ljmpl $0x08, $mb_entry64",
            // Bad magic: say so on COM1, exit with status 1, stop.
            "90: movl $mb_bad_magic_message, %ebx",
            "91: movzbl (%ebx), %ecx",
            "    testl %ecx, %ecx",
            "    jz 93f",
            "92: movw $0x3FD, %dx",
            "    inb %dx, %al",
            "    testb $0x20, %al",
            "    jz 92b",
            "    movw $0x3F8, %dx",
            "    movb %cl, %al",
            "    outb %al, %dx",
            "    incl %ebx",
            "    jmp 91b",
            "93: movw $0xF4, %dx",
            "    movl $1, %eax",
            "    outl %eax, %dx",
            "94: cli",
            "    hlt",
            "    jmp 94b",

            ".code64",
            "mb_entry64:",
            "    movw $0x10, %ax",
            "    movw %ax, %ds",
            "    movw %ax, %es",
            "    movw %ax, %ss",
            "    movw %ax, %fs",
            "    movw %ax, %gs",
            "    movq $mb_stack_top, %rsp",
            "    movl %esi, %edi",
            "    movl %ebp, %esi",
            "    call {main}",
            "95: cli",
            "    hlt",
            "    jmp 95b",
            ".popsection",

            ".pushsection .rodata.mb_gdt64, \"a\"",
            ".balign 16",
            "mb_gdt64:",
            "    .quad 0",
            "    .quad 0x00AF9A000000FFFF",
            "    .quad 0x00CF92000000FFFF",
            "mb_gdt64_pointer:",
            "    .word 23",
            "    .long mb_gdt64",
            "mb_bad_magic_message:",
            "    .asciz \"multiboot: bad magic in EAX: not entered by a Multiboot loader\\n\"",
            ".popsection",

            ".pushsection .bss.mb_tables, \"aw\", @nobits",
            ".balign 4096",
            "mb_pml4: .skip 4096",
            "mb_pdpt: .skip 4096",
            "mb_pd: .skip 4096",
            "mb_stack: .skip 65536",
            "mb_stack_top:",
            ".popsection",
            main = sym __guest_multiboot_main,
            options(att_syntax),
        );
    };
}

/// Reads a `T` at guest-physical `address` if it lies wholly in the stub's identity map.
fn read<T: Copy>(address: u64) -> Option<T> {
    let end = address.checked_add(core::mem::size_of::<T>() as u64)?;
    if end > MAPPED_END {
        return None;
    }
    // SAFETY: [address, end) is inside the identity map of [0, 1 GiB) that the entry stub
    // built; T is plain data (u8/u32/u64), any bit pattern is valid; the read is unaligned-safe.
    // What the loader wrote there is only data to us.
    Some(unsafe { core::ptr::read_unaligned(address as *const T) })
}

/// A u32 at `address`, or None outside the map.
pub fn read_u32(address: u64) -> Option<u32> {
    read::<u32>(address)
}

/// A u64 at `address`, or None outside the map.
pub fn read_u64(address: u64) -> Option<u64> {
    read::<u64>(address)
}

/// A byte at `address`, or None outside the map.
pub fn read_u8(address: u64) -> Option<u8> {
    read::<u8>(address)
}

/// Copies the NUL-terminated string at `address` into `buffer` (at most its length); returns
/// the bytes, or None if it leaves the map or has no NUL within `buffer.len()` bytes.
pub fn read_c_string(address: u64, buffer: &mut [u8]) -> Option<&[u8]> {
    for index in 0..buffer.len() {
        let byte = read_u8(address.checked_add(index as u64)?)?;
        if byte == 0 {
            return Some(&buffer[..index]);
        }
        buffer[index] = byte;
    }
    None
}

/// The fixed part of the Multiboot information structure (spec 3.3) this project uses.
#[derive(Clone, Copy, Debug)]
pub struct Info {
    pub flags: u32,
    pub mem_lower: u32,
    pub mem_upper: u32,
    pub cmdline: u32,
    pub mods_count: u32,
    pub mods_addr: u32,
    pub mmap_length: u32,
    pub mmap_addr: u32,
    pub boot_loader_name: u32,
}

impl Info {
    /// Reads the structure at `address`; None if it is not wholly mapped.
    pub fn read(address: u64) -> Option<Self> {
        let field = |offset: u64| read_u32(address.checked_add(offset)?);
        Some(Self {
            flags: field(0)?,
            mem_lower: field(4)?,
            mem_upper: field(8)?,
            cmdline: field(16)?,
            mods_count: field(20)?,
            mods_addr: field(24)?,
            mmap_length: field(44)?,
            mmap_addr: field(48)?,
            boot_loader_name: field(64)?,
        })
    }

    pub fn has(&self, flag: u32) -> bool {
        self.flags & flag == flag
    }
}

/// One memory map entry (spec 3.3: u32 size, u64 base_addr, u64 length, u32 type).
#[derive(Clone, Copy, Debug)]
pub struct MemoryMapEntry {
    pub base: u64,
    pub length: u64,
    pub kind: u32,
}

/// A memory map entry that leaves the map's bounds, has a size below 20 or is unmapped, or a map
/// of more than 128 entries.
#[derive(Clone, Copy, Debug)]
pub struct MalformedMemoryMap;

/// Walks the memory map: calls `visit` per entry and returns how many there were. At most 128
/// entries are visited.
pub fn for_each_memory_map_entry(
    info: &Info,
    mut visit: impl FnMut(MemoryMapEntry),
) -> Result<usize, MalformedMemoryMap> {
    let start = u64::from(info.mmap_addr);
    let end = start + u64::from(info.mmap_length);
    let mut cursor = start;
    let mut count = 0;
    while cursor < end {
        if count == 128 {
            return Err(MalformedMemoryMap);
        }
        let size = read_u32(cursor).ok_or(MalformedMemoryMap)?;
        let next = cursor + 4 + u64::from(size);
        if size < 20 || next > end {
            return Err(MalformedMemoryMap);
        }
        visit(MemoryMapEntry {
            base: read_u64(cursor + 4).ok_or(MalformedMemoryMap)?,
            length: read_u64(cursor + 12).ok_or(MalformedMemoryMap)?,
            kind: read_u32(cursor + 20).ok_or(MalformedMemoryMap)?,
        });
        count += 1;
        cursor = next;
    }
    Ok(count)
}

/// One module (spec 3.3: mod_start, mod_end, string, reserved).
#[derive(Clone, Copy, Debug)]
pub struct Module {
    pub start: u32,
    pub end: u32,
    pub string: u32,
}

/// The module at `index` of the list at `info.mods_addr`; None if unmapped.
pub fn module(info: &Info, index: u32) -> Option<Module> {
    let address = u64::from(info.mods_addr) + 16 * u64::from(index);
    Some(Module {
        start: read_u32(address)?,
        end: read_u32(address + 4)?,
        string: read_u32(address + 8)?,
    })
}
