//! Linux guests: parsing a bzImage and planning its boot through the 64-bit entry point of the
//! Linux x86 boot protocol (Documentation/arch/x86/boot.rst, "The Linux/x86 Boot Protocol",
//! protocol 2.12 and later; "64-bit Boot Protocol" for the entry state; "The zero page",
//! Documentation/arch/x86/zero-page.rst, for `boot_params`).
//!
//! Why the 64-bit entry and not PVH (the Xen-style ELF note entry that also starts a kernel
//! without its real-mode setup code): the 64-bit entry is simpler for us (the guest starts in
//! the same long mode, identity map and flat GDT as flat64, only RSI and two selectors
//! differ), it needs no ELF note parsing (a bzImage is not an ELF file; PVH wants the
//! uncompressed vmlinux or the note inside the compressed one), and Debian's stock cloud
//! kernel supports it (`xloadflags` has XLF_KERNEL_64). The real-mode setup code (the first
//! `setup_sects + 1` sectors) is never run: we do what it would do, filling `boot_params`.
//!
//! Guest-physical layout (docs/specs/guest-boot.md, "linux"):
//! | address | content |
//! |---|---|
//! | 0x1000 | GDT: null, null, __BOOT_CS 0x10 (64-bit code), __BOOT_DS 0x18 (data) |
//! | 0x2000-0x7FFF | identity map of 0-4 GiB (the flat64 tables) |
//! | 0x8000-0x8FFF | `boot_params` (the zero page); RSI points here |
//! | 0x9000-0x9FFF | the command line, NUL-terminated |
//! | 0x100000 | the protected-mode kernel (the file from `(setup_sects + 1) * 512`) |
//! | top of RAM | the initrd, page-aligned, ending at or below the end of RAM and `initrd_addr_max` |
//!
//! The image is hostile input: every field is read with a checked read, every sum is checked,
//! every failure is a [`LoadError`], nothing panics. Hand-written rather than a crate: a dozen
//! header fields matter, and no maintained no_std crate builds `boot_params` from bytes without
//! `unsafe` (linux-loader, rust-vmm's, is std and writes through `vm-memory`).

use crate::boot_plan::{
    align_up, check_memory, identity_page_tables, read_u16, read_u32, read_u64, BootPlan, CpuMode,
    EntryState, LoadError, Placement, CR0_AM, CR0_ET, CR0_MP, CR0_NE, CR0_PE, CR0_PG, CR0_WP,
    CR4_PAE, EFER_LMA, EFER_LME, EFER_NXE, FLAT64_STACK_TOP, GDT_ADDRESS, GDT_CODE64, GDT_DATA,
    IMAGE_ADDRESS, PAGE_SIZE, PML4_ADDRESS, RFLAGS_RESERVED_ONE,
};
use crate::manifest::MAX_CMDLINE_LEN;
use alloc::borrow::Cow;
use alloc::vec::Vec;

/// The GDT at [`GDT_ADDRESS`] for Linux: four descriptors (null, null, code, data), minus one.
pub const LINUX_GDT_LIMIT: u16 = 31;
/// `__BOOT_CS`: the code selector the 64-bit boot protocol requires (GDT index 2).
pub const BOOT_CS: u16 = 0x10;
/// `__BOOT_DS`: the data selector for DS, ES and SS the 64-bit boot protocol requires (index 3).
pub const BOOT_DS: u16 = 0x18;
/// Where `boot_params` (the zero page) is placed; RSI at entry.
pub const ZERO_PAGE_ADDRESS: u64 = 0x8000;
/// Size of `boot_params`.
pub const ZERO_PAGE_SIZE: u64 = 0x1000;
/// Where the NUL-terminated command line is placed (`cmd_line_ptr`).
pub const CMDLINE_ADDRESS: u64 = 0x9000;
/// Where the protected-mode kernel is loaded (the bzImage's traditional address; a
/// relocatable kernel moves itself to `pref_address` before decompressing).
pub const KERNEL_LOAD_ADDRESS: u64 = IMAGE_ADDRESS;
/// The 64-bit entry point, from the start of the protected-mode kernel (boot.rst, "64-bit
/// Boot Protocol": `startup_64` is at the load address + 0x200).
pub const ENTRY_64_OFFSET: u64 = 0x200;
/// The oldest boot protocol accepted: 2.12 brought `xloadflags` (and with it XLF_KERNEL_64).
pub const MIN_BOOT_PROTOCOL: u16 = 0x020C;
/// `type_of_loader` = 0xFF: "undefined", a boot loader without an assigned ID.
pub const TYPE_OF_LOADER: u8 = 0xFF;
/// `heap_end_ptr`: the end of a 64 KiB real-mode segment minus 0x200, as boot.rst asks (the
/// setup code that would use the heap never runs on the 64-bit entry).
pub const HEAP_END_PTR: u16 = 0xFE00;
/// The e820 memory map as this loader builds it: (base, length-or-end, type). The last entry
/// runs from 1 MiB to the end of RAM. [0xE0000, 0x100000) is reserved for the ACPI tables the
/// hypervisor places there.
pub const E820_LOW_MAP: [(u64, u64, u32); 3] = [
    (0, 0x9_FC00, E820_RAM),
    (0x9_FC00, 0xA_0000, E820_RESERVED),
    (0xE_0000, 0x10_0000, E820_RESERVED),
];
/// e820 type: usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type: reserved.
pub const E820_RESERVED: u32 = 2;

// Setup header fields (offsets in the file and in `boot_params`; boot.rst, "The real-mode
// kernel header").
const SETUP_SECTS: usize = 0x1F1;
const SYSSIZE: usize = 0x1F4;
const BOOT_FLAG: usize = 0x1FE;
const JUMP: usize = 0x200;
const HEADER_MAGIC: usize = 0x202;
const VERSION: usize = 0x206;
const TYPE_OF_LOADER_FIELD: usize = 0x210;
const LOADFLAGS: usize = 0x211;
const RAMDISK_IMAGE: usize = 0x218;
const RAMDISK_SIZE: usize = 0x21C;
const HEAP_END_PTR_FIELD: usize = 0x224;
const CMD_LINE_PTR: usize = 0x228;
const INITRD_ADDR_MAX: usize = 0x22C;
const KERNEL_ALIGNMENT: usize = 0x230;
const RELOCATABLE_KERNEL: usize = 0x234;
const XLOADFLAGS: usize = 0x236;
const CMDLINE_SIZE: usize = 0x238;
const SETUP_DATA: usize = 0x250;
const PREF_ADDRESS: usize = 0x258;
const INIT_SIZE: usize = 0x260;
/// The setup header must reach at least this far: the end of `init_size`, the last field read.
pub const MIN_HEADER_END: usize = INIT_SIZE + 4;
/// `boot_params` ends its setup header area here (`edd_mbr_sig_buffer` follows); a longer
/// header in the image is copied only up to this offset.
const HEADER_AREA_END: usize = 0x290;

// Other `boot_params` fields (zero-page.rst).
const ACPI_RSDP_ADDR: usize = 0x070;
const EXT_RAMDISK_IMAGE: usize = 0x0C0;
const EXT_RAMDISK_SIZE: usize = 0x0C4;
const EXT_CMD_LINE_PTR: usize = 0x0C8;
const E820_ENTRIES: usize = 0x1E8;
const E820_TABLE: usize = 0x2D0;
const E820_ENTRY_LEN: usize = 20;

const BOOT_FLAG_VALUE: u16 = 0xAA55;
const HEADER_MAGIC_VALUE: &[u8; 4] = b"HdrS";
/// loadflags bit 0: the protected-mode code is loaded at 0x100000 (a bzImage).
pub const LOADED_HIGH: u8 = 1 << 0;
/// loadflags bit 7: `heap_end_ptr` is valid.
pub const CAN_USE_HEAP: u8 = 1 << 7;
/// xloadflags bit 0: the kernel has the 64-bit entry point at 0x200.
pub const XLF_KERNEL_64: u16 = 1 << 0;

/// What a bzImage's setup header says, after every check of [`parse_bzimage`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BzImage<'a> {
    /// The boot protocol version (0x020F is 2.15).
    pub version: u16,
    /// Sectors of real-mode setup code after the boot sector (0 in the file is read as 4).
    pub setup_sects: u8,
    /// The setup header as the image has it: file bytes from 0x1F1 to the header's end
    /// (`0x202 + byte at 0x201`, at most 0x290), copied into `boot_params` at the same offset.
    pub setup_header: &'a [u8],
    /// The protected-mode kernel: the file from `(setup_sects + 1) * 512` to its end.
    pub kernel: &'a [u8],
    pub loadflags: u8,
    pub xloadflags: u16,
    pub relocatable: bool,
    /// Alignment of a relocatable kernel's run-time address (a power of two).
    pub kernel_alignment: u32,
    /// The run-time address the kernel was linked for (LOAD_PHYSICAL_ADDR, usually 16 MiB).
    pub pref_address: u64,
    /// Bytes the kernel needs from its run-time address before it reads the memory map.
    pub init_size: u32,
    /// The longest command line, without its NUL.
    pub cmdline_size: u32,
    /// The highest address the initrd may occupy (its last byte).
    pub initrd_addr_max: u32,
}

impl BzImage<'_> {
    /// The run-time start of the kernel when loaded at `load_address`, as `startup_64` computes
    /// it (arch/x86/boot/compressed/head_64.S): a relocatable kernel runs at its load address
    /// rounded up to `kernel_alignment`, but not below `pref_address`; another runs at
    /// `pref_address`. It needs `init_size` bytes from there.
    pub fn runtime_start(&self, load_address: u64) -> u64 {
        if self.relocatable {
            let alignment = u64::from(self.kernel_alignment);
            let aligned = load_address.saturating_add(alignment - 1) & !(alignment - 1);
            aligned.max(self.pref_address)
        } else {
            self.pref_address
        }
    }
}

/// Checks `image` as a bzImage the 64-bit boot protocol can start and returns its header.
///
/// Refused: an image shorter than the setup header ([`LoadError::Truncated`]); one without the
/// boot sector's 0xAA55 or the "HdrS" magic, or that is a zImage (LOADED_HIGH clear)
/// ([`LoadError::NotBzImage`]); a protocol before 2.12 ([`LoadError::BootProtocolTooOld`]);
/// no XLF_KERNEL_64 ([`LoadError::No64BitEntry`]); a header too short for its fields or a
/// relocatable kernel whose alignment is not a power of two ([`LoadError::MalformedBzImage`]);
/// a file that ends before its protected-mode kernel, its 64-bit entry or `syssize` says
/// ([`LoadError::Truncated`]).
pub fn parse_bzimage(image: &[u8]) -> Result<BzImage<'_>, LoadError> {
    let have = image.len() as u64;
    let truncated = |needed: usize| LoadError::Truncated {
        needed: needed as u64,
        have,
    };
    if image.len() < MIN_HEADER_END {
        // Say what is wrong with the bytes that are there before saying they are too few.
        if image.len() >= BOOT_FLAG + 2
            && read_u16(image, BOOT_FLAG as u64) != Some(BOOT_FLAG_VALUE)
        {
            return Err(LoadError::NotBzImage(
                "no boot sector signature 0xAA55 at offset 0x1FE",
            ));
        }
        if image.len() >= HEADER_MAGIC + 4
            && &image[HEADER_MAGIC..HEADER_MAGIC + 4] != HEADER_MAGIC_VALUE
        {
            return Err(LoadError::NotBzImage(
                "no setup header magic \"HdrS\" at offset 0x202",
            ));
        }
        return Err(truncated(MIN_HEADER_END));
    }
    // From here every header field up to MIN_HEADER_END can be read.
    let byte = |offset: usize| image[offset];
    let word = |offset: usize| read_u16(image, offset as u64).unwrap_or(0);
    let dword = |offset: usize| read_u32(image, offset as u64).unwrap_or(0);

    if word(BOOT_FLAG) != BOOT_FLAG_VALUE {
        return Err(LoadError::NotBzImage(
            "no boot sector signature 0xAA55 at offset 0x1FE",
        ));
    }
    if &image[HEADER_MAGIC..HEADER_MAGIC + 4] != HEADER_MAGIC_VALUE {
        return Err(LoadError::NotBzImage(
            "no setup header magic \"HdrS\" at offset 0x202",
        ));
    }
    let version = word(VERSION);
    if version < MIN_BOOT_PROTOCOL {
        return Err(LoadError::BootProtocolTooOld { version });
    }
    let loadflags = byte(LOADFLAGS);
    if loadflags & LOADED_HIGH == 0 {
        return Err(LoadError::NotBzImage(
            "loadflags bit 0 (LOADED_HIGH) is clear: a zImage, loaded at 0x10000",
        ));
    }
    let xloadflags = word(XLOADFLAGS);
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err(LoadError::No64BitEntry);
    }
    // The header's length is given by the jump at 0x200 (boot.rst: "the end of setup header
    // can be calculated as 0x0202 + byte value at offset 0x0201").
    let header_end = HEADER_MAGIC + usize::from(byte(JUMP + 1));
    if header_end < MIN_HEADER_END {
        return Err(LoadError::MalformedBzImage(
            "the setup header (0x202 + the byte at 0x201) ends before init_size at 0x260",
        ));
    }
    let header_end = header_end.min(HEADER_AREA_END);
    if image.len() < header_end {
        return Err(truncated(header_end));
    }
    let relocatable = byte(RELOCATABLE_KERNEL) != 0;
    let kernel_alignment = dword(KERNEL_ALIGNMENT);
    if relocatable && !kernel_alignment.is_power_of_two() {
        return Err(LoadError::MalformedBzImage(
            "kernel_alignment of a relocatable kernel is not a power of two",
        ));
    }
    let pref_address = read_u64(image, PREF_ADDRESS as u64).unwrap_or(0);
    let init_size = dword(INIT_SIZE);
    if init_size == 0 {
        return Err(LoadError::MalformedBzImage("init_size is 0"));
    }
    let setup_sects = match byte(SETUP_SECTS) {
        0 => 4,
        sectors => sectors,
    };
    let kernel_offset = (usize::from(setup_sects) + 1) * 512;
    // The protected-mode kernel must hold at least the 64-bit entry and what syssize says.
    let syssize = u64::from(dword(SYSSIZE)) * 16;
    let needed = (kernel_offset as u64).saturating_add(syssize.max(ENTRY_64_OFFSET + 1));
    if have < needed {
        return Err(LoadError::Truncated { needed, have });
    }
    Ok(BzImage {
        version,
        setup_sects,
        setup_header: &image[SETUP_SECTS..header_end],
        kernel: &image[kernel_offset..],
        loadflags,
        xloadflags,
        relocatable,
        kernel_alignment,
        pref_address,
        init_size,
        cmdline_size: dword(CMDLINE_SIZE),
        initrd_addr_max: dword(INITRD_ADDR_MAX),
    })
}

/// Plans a Linux boot through the 64-bit entry (layout in the module doc): the protected-mode
/// kernel at 0x100000, `boot_params` at 0x8000 (RSI), the command line at 0x9000, the initrd
/// (if any, and not empty) page-aligned at the top of RAM below `initrd_addr_max`, entered at
/// 0x100200 in long mode with the 0-4 GiB identity map, CS = 0x10, DS = ES = SS = 0x18 and
/// interrupts off. `acpi_rsdp` goes to `boot_params.acpi_rsdp_addr` (0: the kernel searches the
/// BIOS area for it).
///
/// Refused, besides what [`parse_bzimage`] refuses: memory outside 2 MiB..=4 GiB; a command
/// line longer than the kernel's `cmdline_size` (or 3072) or with a NUL; a kernel whose load or
/// run-time range (`init_size` from its run-time start) passes the end of RAM
/// ([`LoadError::ImageTooLarge`]); an initrd that does not fit above that range
/// ([`LoadError::InitrdDoesNotFit`]).
pub fn plan_linux<'a>(
    image: &'a [u8],
    memory_bytes: u64,
    cmdline: &str,
    initrd: Option<&'a [u8]>,
    acpi_rsdp: Option<u64>,
) -> Result<BootPlan<'a>, LoadError> {
    check_memory(memory_bytes)?;
    if image.is_empty() {
        return Err(LoadError::EmptyImage);
    }
    let bzimage = parse_bzimage(image)?;
    let maximum = (bzimage.cmdline_size as usize).min(MAX_CMDLINE_LEN);
    if cmdline.len() > maximum {
        return Err(LoadError::CommandLineTooLong {
            length: cmdline.len(),
            maximum,
        });
    }
    if cmdline.contains('\0') {
        return Err(LoadError::CommandLineHasNul);
    }

    // The kernel's memory: its file bytes at the load address, and init_size bytes from its
    // run-time start (where it decompresses itself).
    let loaded_end = KERNEL_LOAD_ADDRESS.saturating_add(bzimage.kernel.len() as u64);
    let runtime_end = bzimage
        .runtime_start(KERNEL_LOAD_ADDRESS)
        .saturating_add(u64::from(bzimage.init_size));
    let kernel_end = loaded_end.max(runtime_end);
    if kernel_end > memory_bytes {
        return Err(LoadError::ImageTooLarge {
            needed_end: kernel_end,
            memory: memory_bytes,
        });
    }

    // The initrd: as high as it may go, page-aligned, above the kernel's memory.
    let initrd = initrd.filter(|bytes| !bytes.is_empty());
    let initrd_range = match initrd {
        None => None,
        Some(bytes) => {
            let size = bytes.len() as u64;
            let limit = memory_bytes.min(u64::from(bzimage.initrd_addr_max) + 1);
            let lowest = align_up(kernel_end);
            let start = limit
                .checked_sub(size)
                .map(|start| start & !(PAGE_SIZE - 1))
                .filter(|start| *start >= lowest)
                .ok_or(LoadError::InitrdDoesNotFit {
                    size,
                    lowest,
                    limit,
                })?;
            Some((start, size))
        }
    };

    let zero_page = zero_page(&bzimage, memory_bytes, initrd_range, acpi_rsdp);
    let mut command_line = Vec::with_capacity(cmdline.len() + 1);
    command_line.extend_from_slice(cmdline.as_bytes());
    command_line.push(0);

    let mut placements = alloc::vec![
        linux_gdt(),
        Placement {
            guest_physical: PML4_ADDRESS,
            data: Cow::Owned(identity_page_tables()),
            size: ZERO_PAGE_ADDRESS - PML4_ADDRESS,
        },
        Placement {
            guest_physical: ZERO_PAGE_ADDRESS,
            data: Cow::Owned(zero_page),
            size: ZERO_PAGE_SIZE,
        },
        Placement {
            guest_physical: CMDLINE_ADDRESS,
            data: Cow::Owned(command_line),
            size: PAGE_SIZE,
        },
        Placement {
            guest_physical: KERNEL_LOAD_ADDRESS,
            data: Cow::Borrowed(bzimage.kernel),
            size: bzimage.kernel.len() as u64,
        },
    ];
    if let (Some(bytes), Some((start, size))) = (initrd, initrd_range) {
        placements.push(Placement {
            guest_physical: start,
            data: Cow::Borrowed(bytes),
            size,
        });
    }
    let entry = EntryState {
        mode: CpuMode::Long64,
        rip: KERNEL_LOAD_ADDRESS + ENTRY_64_OFFSET,
        // startup_64 sets up its own stack; this one is only a safe place until then.
        rsp: FLAT64_STACK_TOP,
        // IF clear: interrupts off, as the protocol requires.
        rflags: RFLAGS_RESERVED_ONE,
        rax: 0,
        rbx: 0,
        rdi: 0,
        rsi: ZERO_PAGE_ADDRESS,
        cr0: CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG,
        cr3: PML4_ADDRESS,
        cr4: CR4_PAE,
        efer: EFER_LME | EFER_LMA | EFER_NXE,
        gdt_base: GDT_ADDRESS,
        gdt_limit: LINUX_GDT_LIMIT,
        code_selector: BOOT_CS,
        data_selector: BOOT_DS,
    };
    Ok(BootPlan { placements, entry })
}

/// GDT: null (0x00), null (0x08), __BOOT_CS (0x10) 64-bit flat code, __BOOT_DS (0x18) flat
/// data. Both 4 GiB flat, code execute/read, data read/write, as the 64-bit protocol asks.
fn linux_gdt() -> Placement<'static> {
    let mut bytes = Vec::with_capacity(32);
    for descriptor in [0, 0, GDT_CODE64, GDT_DATA] {
        bytes.extend_from_slice(&descriptor.to_le_bytes());
    }
    Placement {
        guest_physical: GDT_ADDRESS,
        data: Cow::Owned(bytes),
        size: PAGE_SIZE,
    }
}

/// Builds `boot_params` (4096 bytes, zero-page.rst): the image's setup header at 0x1F1 with the
/// boot loader's fields filled in, the e820 map, the ACPI RSDP address.
fn zero_page(
    bzimage: &BzImage<'_>,
    memory: u64,
    initrd: Option<(u64, u64)>,
    acpi_rsdp: Option<u64>,
) -> Vec<u8> {
    let mut page = alloc::vec![0u8; ZERO_PAGE_SIZE as usize];
    page[SETUP_SECTS..SETUP_SECTS + bzimage.setup_header.len()]
        .copy_from_slice(bzimage.setup_header);
    let mut put = |offset: usize, bytes: &[u8]| {
        page[offset..offset + bytes.len()].copy_from_slice(bytes);
    };

    // Setup header: what "the boot loader" writes (boot.rst, "Details of header fields").
    put(TYPE_OF_LOADER_FIELD, &[TYPE_OF_LOADER]);
    put(LOADFLAGS, &[bzimage.loadflags | LOADED_HIGH | CAN_USE_HEAP]);
    put(HEAP_END_PTR_FIELD, &HEAP_END_PTR.to_le_bytes());
    put(CMD_LINE_PTR, &(CMDLINE_ADDRESS as u32).to_le_bytes());
    put(
        EXT_CMD_LINE_PTR,
        &((CMDLINE_ADDRESS >> 32) as u32).to_le_bytes(),
    );
    let (initrd_start, initrd_size) = initrd.unwrap_or((0, 0));
    put(RAMDISK_IMAGE, &(initrd_start as u32).to_le_bytes());
    put(RAMDISK_SIZE, &(initrd_size as u32).to_le_bytes());
    put(
        EXT_RAMDISK_IMAGE,
        &((initrd_start >> 32) as u32).to_le_bytes(),
    );
    put(
        EXT_RAMDISK_SIZE,
        &((initrd_size >> 32) as u32).to_le_bytes(),
    );
    // No setup_data list (the field must be a valid pointer or 0, whatever the file holds).
    if SETUP_DATA + 8 <= SETUP_SECTS + bzimage.setup_header.len() {
        put(SETUP_DATA, &0u64.to_le_bytes());
    }

    put(ACPI_RSDP_ADDR, &acpi_rsdp.unwrap_or(0).to_le_bytes());

    let mut entries: Vec<(u64, u64, u32)> = E820_LOW_MAP
        .iter()
        .map(|(start, end, kind)| (*start, end - start, *kind))
        .collect();
    entries.push((IMAGE_ADDRESS, memory - IMAGE_ADDRESS, E820_RAM));
    put(E820_ENTRIES, &[entries.len() as u8]);
    for (index, (base, length, kind)) in entries.into_iter().enumerate() {
        let entry = E820_TABLE + index * E820_ENTRY_LEN;
        put(entry, &base.to_le_bytes());
        put(entry + 8, &length.to_le_bytes());
        put(entry + 16, &kind.to_le_bytes());
    }
    page
}

#[cfg(test)]
mod tests;
