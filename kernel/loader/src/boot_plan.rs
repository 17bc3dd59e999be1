//! Boot plans: what guest RAM and the first vCPU must hold before a guest's first instruction,
//! for each boot protocol of docs/specs/guest-boot.md (flat64 and Multiboot version 1 here;
//! the Linux x86 boot protocol in [`crate::linux`]).
//!
//! Pure and host-tested: a plan is a list of [`Placement`]s (bytes at guest-physical
//! addresses) and a vendor-neutral [`EntryState`]; the kernel copies the placements into the
//! VM's RAM and the vendor backend turns the entry state into VMCB / VMCS fields. The host
//! tool (`boot/`) runs the same planner at build time, so an image that does not fit its VM
//! is refused before the hypervisor ever sees it.
//!
//! The images are hostile input: the ELF and Multiboot headers are parsed by hand with checked
//! reads (every offset, length and address sum is checked; loops are bounded by
//! [`MAX_PROGRAM_HEADERS`] and [`MAX_MODULES`]), every failure is a [`LoadError`], nothing
//! panics. Hand-written rather than a crate because only a few fields of each header matter and
//! the parsers must be total over arbitrary bytes.
//!
//! Low-memory layout (guest-physical):
//! | address | content |
//! |---|---|
//! | 0x1000 | GDT: null, code (0x08), data (0x10) |
//! | 0x2000-0x7FFF | flat64: PML4, PDPT, four page directories (identity map of 0-4 GiB) |
//! | 0x8000-0x8FFF | flat64 boot info, or the Multiboot info (layout below) |
//! | 0x100000 | the image |
//!
//! Linux guests use the same pages with their own GDT and boot information: see
//! [`crate::linux`].
//!
//! Multiboot info page (0x8000-0x8FFF), as this loader packs it:
//! | address | content |
//! |---|---|
//! | 0x8000 | the Multiboot info structure (116 bytes used, 128 reserved) |
//! | 0x8080 | memory map: four 24-byte entries (u32 size = 20, u64 base, u64 length, u32 type) |
//! | 0x80E0 | boot loader name `"ringzero\0"` |
//! | 0x80F0 | module list: 16 bytes per module (mod_start, mod_end, string, reserved 0) |
//! | after it | command line (NUL-terminated), then each module's name (NUL-terminated) |
//!
//! Everything must fit in the page, or the plan fails with [`LoadError::BootInfoTooLarge`].

use crate::manifest::{GuestFormat, Module, VmManifest, MAX_CMDLINE_LEN, MAX_MODULES};
use alloc::borrow::Cow;
use alloc::vec::Vec;
use core::fmt;

/// Guest-physical address of the GDT.
pub const GDT_ADDRESS: u64 = 0x1000;
/// GDTR limit: three 8-byte descriptors, minus one.
pub const GDT_LIMIT: u16 = 23;
/// Code segment selector (GDT index 1).
pub const CODE_SELECTOR: u16 = 0x08;
/// Data segment selector (GDT index 2), for DS, ES, SS, FS and GS.
pub const DATA_SELECTOR: u16 = 0x10;
/// 64-bit code descriptor: base 0, limit 4 GiB, present, DPL 0, execute/read, L = 1.
pub const GDT_CODE64: u64 = 0x00AF_9A00_0000_FFFF;
/// 32-bit code descriptor: base 0, limit 4 GiB, present, DPL 0, execute/read, D = 1.
pub const GDT_CODE32: u64 = 0x00CF_9A00_0000_FFFF;
/// Flat data descriptor: base 0, limit 4 GiB, present, DPL 0, read/write, B = 1.
pub const GDT_DATA: u64 = 0x00CF_9200_0000_FFFF;
/// flat64 PML4.
pub const PML4_ADDRESS: u64 = 0x2000;
/// flat64 PDPT.
pub const PDPT_ADDRESS: u64 = 0x3000;
/// flat64 page directories: four consecutive pages, one per GiB.
pub const PAGE_DIRECTORIES_ADDRESS: u64 = 0x4000;
/// Page-table entry flags for a table pointer: present, writable.
pub const TABLE_ENTRY_FLAGS: u64 = 0x03;
/// Page-directory entry flags for a 2 MiB page: present, writable, page size.
pub const LARGE_PAGE_FLAGS: u64 = 0x83;
/// The flat64 boot info or the Multiboot info structure.
pub const BOOT_INFO_ADDRESS: u64 = 0x8000;
/// Bytes available for the boot information (one page).
pub const BOOT_INFO_SIZE: u64 = 0x1000;
/// flat64 initial stack pointer (the stack grows down from here).
pub const FLAT64_STACK_TOP: u64 = 0x80000;
/// Where flat64 images are loaded and entered; Multiboot segments must start here or above.
pub const IMAGE_ADDRESS: u64 = 0x10_0000;
/// The smallest guest memory a plan accepts.
pub const MIN_MEMORY: u64 = 2 << 20;
/// The largest guest memory a plan accepts (the flat64 identity map and 32-bit Multiboot
/// addresses both end at 4 GiB).
pub const MAX_MEMORY: u64 = 4 << 30;
/// First field of the flat64 boot info: "RINGZERO" read as a big-endian number.
pub const FLAT64_BOOT_INFO_MAGIC: u64 = 0x5249_4E47_5A45_524F;
/// Multiboot header magic (in the image).
pub const MULTIBOOT_HEADER_MAGIC: u32 = 0x1BAD_B002;
/// Multiboot boot loader magic (in EAX at entry).
pub const MULTIBOOT_BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;
/// The Multiboot header must lie within this many bytes from the start of the image.
pub const MULTIBOOT_SEARCH_LIMIT: usize = 8192;
/// At most this many ELF program headers are examined.
pub const MAX_PROGRAM_HEADERS: usize = 64;
/// Guest page size: Multiboot modules start on page boundaries.
pub const PAGE_SIZE: u64 = 0x1000;

pub(crate) const CR0_PE: u64 = 1 << 0;
pub(crate) const CR0_MP: u64 = 1 << 1;
pub(crate) const CR0_ET: u64 = 1 << 4;
pub(crate) const CR0_NE: u64 = 1 << 5;
pub(crate) const CR0_WP: u64 = 1 << 16;
pub(crate) const CR0_AM: u64 = 1 << 18;
pub(crate) const CR0_PG: u64 = 1 << 31;
pub(crate) const CR4_PAE: u64 = 1 << 5;
pub(crate) const EFER_LME: u64 = 1 << 8;
pub(crate) const EFER_LMA: u64 = 1 << 10;
pub(crate) const EFER_NXE: u64 = 1 << 11;
pub(crate) const RFLAGS_RESERVED_ONE: u64 = 1 << 1;

// Multiboot header flags (Multiboot 0.6.96, 3.1.2).
const MULTIBOOT_PAGE_ALIGN: u32 = 1 << 0;
const MULTIBOOT_MEMORY_INFO: u32 = 1 << 1;
const MULTIBOOT_VIDEO_MODE: u32 = 1 << 2;
const MULTIBOOT_AOUT_KLUDGE: u32 = 1 << 16;
const MULTIBOOT_KNOWN_REQUIREMENTS: u32 =
    MULTIBOOT_PAGE_ALIGN | MULTIBOOT_MEMORY_INFO | MULTIBOOT_VIDEO_MODE;

// Multiboot info flags and field offsets (Multiboot 0.6.96, 3.3).
const INFO_MEMORY: u32 = 1 << 0;
const INFO_CMDLINE: u32 = 1 << 2;
const INFO_MODULES: u32 = 1 << 3;
const INFO_MEMORY_MAP: u32 = 1 << 6;
const INFO_LOADER_NAME: u32 = 1 << 9;
/// The info structure's `flags` as this loader sets them.
pub const MULTIBOOT_INFO_FLAGS: u32 =
    INFO_MEMORY | INFO_CMDLINE | INFO_MODULES | INFO_MEMORY_MAP | INFO_LOADER_NAME;
const INFO_FLAGS: usize = 0;
const INFO_MEM_LOWER: usize = 4;
const INFO_MEM_UPPER: usize = 8;
const INFO_CMDLINE_ADDR: usize = 16;
const INFO_MODS_COUNT: usize = 20;
const INFO_MODS_ADDR: usize = 24;
const INFO_MMAP_LENGTH: usize = 44;
const INFO_MMAP_ADDR: usize = 48;
const INFO_LOADER_NAME_ADDR: usize = 64;
/// Offsets inside the info page (see the module doc).
const MEMORY_MAP_OFFSET: usize = 0x80;
const MEMORY_MAP_ENTRY_LEN: usize = 24;
const LOADER_NAME_OFFSET: usize = 0xE0;
const MODULE_LIST_OFFSET: usize = 0xF0;
const MODULE_ENTRY_LEN: usize = 16;
/// The `boot_loader_name` given to Multiboot guests.
pub const LOADER_NAME: &str = "ringzero";
/// `mem_lower` in KiB: conventional memory below the EBDA at 0x9FC00.
pub const MULTIBOOT_MEM_LOWER_KIB: u32 = 639;

/// Bytes to put in guest RAM at a guest-physical address (zero-fill beyond data up to `size`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement<'a> {
    pub guest_physical: u64,
    pub data: Cow<'a, [u8]>,
    pub size: u64,
}

/// The processor mode of the first guest instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuMode {
    /// 64-bit long mode, paging on (flat64).
    Long64,
    /// 32-bit protected mode, paging off (Multiboot).
    Protected32,
}

/// The vendor-neutral first-instruction state (the backends turn it into VMCB/VMCS fields).
/// Segment registers: CS = `code_selector`, DS = ES = SS = FS = GS = `data_selector`, all
/// flat (base 0, limit 4 GiB) as the GDT at `gdt_base` describes; IDTR = {0, 0}; every
/// general-purpose register not named here is 0. `rsi` is 0 except for Linux (the address of
/// `boot_params`, the zero page).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryState {
    pub mode: CpuMode,
    pub rip: u64,
    pub rsp: u64,
    pub rflags: u64,
    pub rax: u64,
    pub rbx: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub gdt_base: u64,
    pub gdt_limit: u16,
    pub code_selector: u16,
    pub data_selector: u16,
}

/// Everything the kernel applies to a new VM before running it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootPlan<'a> {
    pub placements: Vec<Placement<'a>>,
    pub entry: EntryState,
}

/// Why an image cannot be booted in the VM it was given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadError {
    /// The guest memory is below [`MIN_MEMORY`].
    MemoryTooSmall { memory: u64, minimum: u64 },
    /// The guest memory is above [`MAX_MEMORY`].
    MemoryTooLarge { memory: u64, maximum: u64 },
    /// The image has no bytes.
    EmptyImage,
    /// The image (with its modules) ends at `needed_end`, past the VM's memory.
    ImageTooLarge { needed_end: u64, memory: u64 },
    /// The command line is longer than [`MAX_CMDLINE_LEN`] bytes.
    CommandLineTooLong { length: usize, maximum: usize },
    /// The command line has a NUL byte (Multiboot command lines are NUL-terminated).
    CommandLineHasNul,
    /// No Multiboot header magic in the first [`MULTIBOOT_SEARCH_LIMIT`] bytes.
    NoMultibootHeader,
    /// A Multiboot header magic was found but its checksum does not add up.
    BadMultibootChecksum { offset: usize },
    /// The Multiboot header asks for features (flag bits 3-15) this loader does not have.
    UnsupportedMultibootFlags { flags: u32 },
    /// The Multiboot header's address fields (flag bit 16) are inconsistent.
    BadAoutKludge(&'static str),
    /// The image is neither an ELF file nor uses the a.out kludge.
    NotElf,
    /// An ELF file this loader does not boot (class, byte order, machine, type...).
    UnsupportedElf(&'static str),
    /// An ELF file whose headers are cut off or point outside the file.
    MalformedElf(&'static str),
    /// The image has nothing to load.
    NoLoadableSegments,
    /// A segment reaches past the VM's memory.
    SegmentOutsideRam { start: u64, size: u64, memory: u64 },
    /// A segment starts below 1 MiB, where the GDT, page tables and boot info live.
    SegmentOverlapsLowMemory { start: u64, end: u64 },
    /// Two segments overlap.
    SegmentsOverlap { first: u64, second: u64 },
    /// The entry point is not inside any loaded segment.
    EntryNotLoaded { entry: u64 },
    /// More modules than [`MAX_MODULES`].
    TooManyModules { count: usize, maximum: usize },
    /// Modules were given to a format that has no way to pass them.
    ModulesNotSupported { format: GuestFormat },
    /// The Multiboot info (command line, module list and names) does not fit its page.
    BootInfoTooLarge { needed: u64, available: u64 },
    /// An initial RAM disk was given to a format that has no way to pass it (only linux).
    InitrdNotSupported { format: GuestFormat },
    /// The image ends before a part the Linux boot protocol needs: `needed` bytes, `have`.
    Truncated { needed: u64, have: u64 },
    /// Not a bzImage: a signature of the Linux boot protocol is missing (which one is said).
    NotBzImage(&'static str),
    /// A bzImage whose boot protocol is older than 2.12 (the 64-bit entry needs `xloadflags`).
    BootProtocolTooOld { version: u16 },
    /// A bzImage without the 64-bit entry point (`xloadflags` bit 0, XLF_KERNEL_64).
    No64BitEntry,
    /// A bzImage whose setup header is inconsistent (which field is said).
    MalformedBzImage(&'static str),
    /// The initial RAM disk does not fit between the kernel's memory (`lowest`) and `limit`
    /// (the end of RAM or the image's `initrd_addr_max`).
    InitrdDoesNotFit { size: u64, lowest: u64, limit: u64 },
}

impl fmt::Display for LoadError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MIB: u64 = 1 << 20;
        match self {
            LoadError::MemoryTooSmall { memory, minimum } => write!(
                formatter,
                "guest memory of {memory} bytes is too small: at least {} MiB is needed",
                minimum / MIB
            ),
            LoadError::MemoryTooLarge { memory, maximum } => write!(
                formatter,
                "guest memory of {memory} bytes is too large: at most {} MiB is supported",
                maximum / MIB
            ),
            LoadError::EmptyImage => write!(formatter, "the image is empty"),
            LoadError::ImageTooLarge { needed_end, memory } => write!(
                formatter,
                "the image does not fit the VM's memory: it needs RAM up to {needed_end:#x} ({} KiB) but the VM has {memory:#x} ({} KiB)",
                needed_end.div_ceil(1024),
                memory / 1024
            ),
            LoadError::CommandLineTooLong { length, maximum } => write!(
                formatter,
                "the command line is {length} bytes long, at most {maximum} are allowed"
            ),
            LoadError::CommandLineHasNul => {
                write!(formatter, "the command line contains a NUL byte")
            }
            LoadError::NoMultibootHeader => write!(
                formatter,
                "no Multiboot header (magic {MULTIBOOT_HEADER_MAGIC:#010x}, 4-byte aligned) in the first {MULTIBOOT_SEARCH_LIMIT} bytes of the image"
            ),
            LoadError::BadMultibootChecksum { offset } => write!(
                formatter,
                "the Multiboot header at offset {offset:#x} has a bad checksum (magic + flags + checksum must be 0)"
            ),
            LoadError::UnsupportedMultibootFlags { flags } => write!(
                formatter,
                "the Multiboot header flags {flags:#x} ask for features this loader does not have (bits 3-15)"
            ),
            LoadError::BadAoutKludge(reason) => {
                write!(formatter, "bad Multiboot address fields (a.out kludge): {reason}")
            }
            LoadError::NotElf => write!(
                formatter,
                "the image is not an ELF file and its Multiboot header does not set the address fields (flag bit 16)"
            ),
            LoadError::UnsupportedElf(reason) => write!(formatter, "unsupported ELF: {reason}"),
            LoadError::MalformedElf(reason) => write!(formatter, "malformed ELF: {reason}"),
            LoadError::NoLoadableSegments => {
                write!(formatter, "the image has no loadable segment")
            }
            LoadError::SegmentOutsideRam { start, size, memory } => write!(
                formatter,
                "a segment at {start:#x} of {size:#x} bytes reaches past the VM's memory ({memory:#x} bytes)"
            ),
            LoadError::SegmentOverlapsLowMemory { start, end } => write!(
                formatter,
                "a segment at [{start:#x}, {end:#x}) lies below 1 MiB, where the GDT, page tables and boot info live"
            ),
            LoadError::SegmentsOverlap { first, second } => write!(
                formatter,
                "the segments at {first:#x} and {second:#x} overlap"
            ),
            LoadError::EntryNotLoaded { entry } => write!(
                formatter,
                "the entry point {entry:#x} is not inside any loaded segment"
            ),
            LoadError::TooManyModules { count, maximum } => write!(
                formatter,
                "{count} modules given, at most {maximum} are allowed"
            ),
            LoadError::ModulesNotSupported { format } => write!(
                formatter,
                "modules are given but the {} format cannot pass them (use multiboot)",
                format.name()
            ),
            LoadError::BootInfoTooLarge { needed, available } => write!(
                formatter,
                "the Multiboot info (command line, module list and module names) needs {needed} bytes but only {available} fit at {BOOT_INFO_ADDRESS:#x}"
            ),
            LoadError::InitrdNotSupported { format } => write!(
                formatter,
                "an initrd is given but the {} format cannot pass it (use linux)",
                format.name()
            ),
            LoadError::Truncated { needed, have } => write!(
                formatter,
                "the bzImage is truncated: the Linux boot protocol needs {needed:#x} bytes but the file has {have:#x}"
            ),
            LoadError::NotBzImage(reason) => write!(
                formatter,
                "not a Linux bzImage: {reason}"
            ),
            LoadError::BootProtocolTooOld { version } => write!(
                formatter,
                "the bzImage speaks Linux boot protocol {}.{:02}, at least 2.12 is needed (a 64-bit kernel from Linux 3.8 or later)",
                version >> 8,
                version & 0xFF
            ),
            LoadError::No64BitEntry => write!(
                formatter,
                "the bzImage has no 64-bit entry point (xloadflags bit 0, XLF_KERNEL_64, is clear): a 32-bit kernel"
            ),
            LoadError::MalformedBzImage(reason) => {
                write!(formatter, "malformed bzImage: {reason}")
            }
            LoadError::InitrdDoesNotFit { size, lowest, limit } => write!(
                formatter,
                "the initrd of {size:#x} bytes does not fit between the kernel's memory (up to {lowest:#x}) and {limit:#x} (the end of RAM or the kernel's initrd_addr_max)"
            ),
        }
    }
}

/// Plans the boot of `vm` by its format, with no ACPI tables announced to a Linux guest (the
/// same as [`plan_with_acpi`] with `None`; the host tool checks images with this).
pub fn plan<'a>(vm: &VmManifest<'a>) -> Result<BootPlan<'a>, LoadError> {
    plan_with_acpi(vm, None)
}

/// Plans the boot of `vm` by its format. `acpi_rsdp` is the guest-physical address of the ACPI
/// RSDP the hypervisor built for this VM, if any: a Linux guest finds it in `boot_params`
/// (the other formats ignore it).
pub fn plan_with_acpi<'a>(
    vm: &VmManifest<'a>,
    acpi_rsdp: Option<u64>,
) -> Result<BootPlan<'a>, LoadError> {
    if vm.format != GuestFormat::Multiboot && !vm.modules.is_empty() {
        return Err(LoadError::ModulesNotSupported { format: vm.format });
    }
    if vm.format != GuestFormat::Linux && vm.initrd.is_some() {
        return Err(LoadError::InitrdNotSupported { format: vm.format });
    }
    match vm.format {
        GuestFormat::Flat64 => plan_flat64(vm.kernel, vm.memory_bytes, vm.cmdline),
        GuestFormat::Multiboot => {
            plan_multiboot(vm.kernel, vm.memory_bytes, vm.cmdline, &vm.modules)
        }
        GuestFormat::Linux => {
            crate::linux::plan_linux(vm.kernel, vm.memory_bytes, vm.cmdline, vm.initrd, acpi_rsdp)
        }
    }
}

/// Plans a flat64 boot: `image` at 1 MiB, entered there in long mode with the identity map,
/// the boot info at 0x8000 (RDI) and the stack at 0x80000.
pub fn plan_flat64<'a>(
    image: &'a [u8],
    memory_bytes: u64,
    cmdline: &str,
) -> Result<BootPlan<'a>, LoadError> {
    check_memory(memory_bytes)?;
    check_cmdline(cmdline)?;
    if image.is_empty() {
        return Err(LoadError::EmptyImage);
    }
    let needed_end = IMAGE_ADDRESS.saturating_add(image.len() as u64);
    if needed_end > memory_bytes {
        return Err(LoadError::ImageTooLarge {
            needed_end,
            memory: memory_bytes,
        });
    }

    let mut boot_info = Vec::with_capacity(24 + cmdline.len());
    boot_info.extend_from_slice(&FLAT64_BOOT_INFO_MAGIC.to_le_bytes());
    boot_info.extend_from_slice(&memory_bytes.to_le_bytes());
    boot_info.extend_from_slice(&(cmdline.len() as u64).to_le_bytes());
    boot_info.extend_from_slice(cmdline.as_bytes());

    let placements = alloc::vec![
        gdt(GDT_CODE64),
        Placement {
            guest_physical: PML4_ADDRESS,
            data: Cow::Owned(identity_page_tables()),
            size: BOOT_INFO_ADDRESS - PML4_ADDRESS,
        },
        Placement {
            guest_physical: BOOT_INFO_ADDRESS,
            data: Cow::Owned(boot_info),
            size: BOOT_INFO_SIZE,
        },
        Placement {
            guest_physical: IMAGE_ADDRESS,
            data: Cow::Borrowed(image),
            size: image.len() as u64,
        },
    ];
    let entry = EntryState {
        mode: CpuMode::Long64,
        rip: IMAGE_ADDRESS,
        rsp: FLAT64_STACK_TOP,
        rflags: RFLAGS_RESERVED_ONE,
        rax: 0,
        rbx: 0,
        rdi: BOOT_INFO_ADDRESS,
        rsi: 0,
        // 0x80050033 as the spec gives it (its list of names omits AM, which the value has).
        cr0: CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG,
        cr3: PML4_ADDRESS,
        cr4: CR4_PAE,
        efer: EFER_LME | EFER_LMA | EFER_NXE,
        gdt_base: GDT_ADDRESS,
        gdt_limit: GDT_LIMIT,
        code_selector: CODE_SELECTOR,
        data_selector: DATA_SELECTOR,
    };
    Ok(BootPlan { placements, entry })
}

/// Plans a Multiboot (version 1) boot: the ELF segments (or the a.out-kludge range) at their
/// physical addresses, the modules page-aligned after the highest loaded byte, the info
/// structure at 0x8000 (EBX), entered in 32-bit protected mode with EAX = 0x2BADB002.
pub fn plan_multiboot<'a>(
    image: &'a [u8],
    memory_bytes: u64,
    cmdline: &str,
    modules: &[Module<'a>],
) -> Result<BootPlan<'a>, LoadError> {
    check_memory(memory_bytes)?;
    check_cmdline(cmdline)?;
    if cmdline.contains('\0') {
        return Err(LoadError::CommandLineHasNul);
    }
    if modules.len() > MAX_MODULES {
        return Err(LoadError::TooManyModules {
            count: modules.len(),
            maximum: MAX_MODULES,
        });
    }
    if image.is_empty() {
        return Err(LoadError::EmptyImage);
    }
    let header = find_multiboot_header(image)?;
    if header.flags & 0xFFFF & !MULTIBOOT_KNOWN_REQUIREMENTS != 0 {
        return Err(LoadError::UnsupportedMultibootFlags {
            flags: header.flags,
        });
    }
    let (segments, entry) = if header.flags & MULTIBOOT_AOUT_KLUDGE != 0 {
        aout_kludge_segments(image, header.offset)?
    } else {
        elf_segments(image)?
    };
    let loaded_end = check_segments(&segments, entry, memory_bytes)?;

    // Modules: page-aligned after the highest loaded byte, in order; each must end below
    // 4 GiB too, since the module list holds 32-bit addresses.
    let module_limit = memory_bytes.min(u64::from(u32::MAX));
    let mut next = align_up(loaded_end);
    let mut module_ranges = Vec::with_capacity(modules.len());
    for module in modules {
        let start = next;
        let end = start.saturating_add(module.bytes.len() as u64);
        if end > module_limit {
            return Err(LoadError::ImageTooLarge {
                needed_end: end,
                memory: memory_bytes,
            });
        }
        module_ranges.push((start, end));
        next = align_up(end);
    }

    let info = multiboot_info(memory_bytes, cmdline, modules, &module_ranges)?;
    let mut placements = Vec::with_capacity(2 + segments.len() + modules.len());
    placements.push(gdt(GDT_CODE32));
    placements.push(Placement {
        guest_physical: BOOT_INFO_ADDRESS,
        data: Cow::Owned(info),
        size: BOOT_INFO_SIZE,
    });
    for segment in segments {
        placements.push(Placement {
            guest_physical: segment.start,
            data: Cow::Borrowed(segment.data),
            size: segment.size,
        });
    }
    for (module, (start, end)) in modules.iter().zip(module_ranges) {
        placements.push(Placement {
            guest_physical: start,
            data: Cow::Borrowed(module.bytes),
            size: end - start,
        });
    }
    let entry = EntryState {
        mode: CpuMode::Protected32,
        rip: entry,
        rsp: 0,
        rflags: RFLAGS_RESERVED_ONE,
        rax: u64::from(MULTIBOOT_BOOTLOADER_MAGIC),
        rbx: BOOT_INFO_ADDRESS,
        rdi: 0,
        rsi: 0,
        cr0: CR0_PE | CR0_ET,
        cr3: 0,
        cr4: 0,
        efer: 0,
        gdt_base: GDT_ADDRESS,
        gdt_limit: GDT_LIMIT,
        code_selector: CODE_SELECTOR,
        data_selector: DATA_SELECTOR,
    };
    Ok(BootPlan { placements, entry })
}

pub(crate) fn check_memory(memory: u64) -> Result<(), LoadError> {
    if memory < MIN_MEMORY {
        return Err(LoadError::MemoryTooSmall {
            memory,
            minimum: MIN_MEMORY,
        });
    }
    if memory > MAX_MEMORY {
        return Err(LoadError::MemoryTooLarge {
            memory,
            maximum: MAX_MEMORY,
        });
    }
    Ok(())
}

fn check_cmdline(cmdline: &str) -> Result<(), LoadError> {
    if cmdline.len() > MAX_CMDLINE_LEN {
        return Err(LoadError::CommandLineTooLong {
            length: cmdline.len(),
            maximum: MAX_CMDLINE_LEN,
        });
    }
    Ok(())
}

pub(crate) fn align_up(address: u64) -> u64 {
    address.saturating_add(PAGE_SIZE - 1) & !(PAGE_SIZE - 1)
}

fn gdt(code: u64) -> Placement<'static> {
    let mut bytes = Vec::with_capacity(24);
    for descriptor in [0, code, GDT_DATA] {
        bytes.extend_from_slice(&descriptor.to_le_bytes());
    }
    Placement {
        guest_physical: GDT_ADDRESS,
        data: Cow::Owned(bytes),
        size: PAGE_SIZE,
    }
}

/// PML4 (0x2000) -> PDPT (0x3000) -> four PDs (0x4000-0x7FFF) of 2 MiB pages: 0-4 GiB
/// identity-mapped, present and writable, supervisor only, executable.
pub(crate) fn identity_page_tables() -> Vec<u8> {
    let mut tables = alloc::vec![0u8; (BOOT_INFO_ADDRESS - PML4_ADDRESS) as usize];
    let mut put = |address: u64, value: u64| {
        let offset = (address - PML4_ADDRESS) as usize;
        tables[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
    };
    put(PML4_ADDRESS, PDPT_ADDRESS | TABLE_ENTRY_FLAGS);
    for gib in 0..4u64 {
        let directory = PAGE_DIRECTORIES_ADDRESS + gib * PAGE_SIZE;
        put(PDPT_ADDRESS + gib * 8, directory | TABLE_ENTRY_FLAGS);
        for entry in 0..512u64 {
            let page = (gib << 30) + (entry << 21);
            put(directory + entry * 8, page | LARGE_PAGE_FLAGS);
        }
    }
    tables
}

/// One range of guest RAM to fill: `data` at `start`, zeros up to `size`.
#[derive(Clone, Copy, Debug)]
struct Segment<'a> {
    start: u64,
    data: &'a [u8],
    size: u64,
}

#[derive(Clone, Copy, Debug)]
struct MultibootHeader {
    offset: usize,
    flags: u32,
}

pub(crate) fn read_u16(bytes: &[u8], offset: u64) -> Option<u16> {
    let start = usize::try_from(offset).ok()?;
    let field = bytes.get(start..start.checked_add(2)?)?;
    Some(u16::from_le_bytes([field[0], field[1]]))
}

pub(crate) fn read_u32(bytes: &[u8], offset: u64) -> Option<u32> {
    let start = usize::try_from(offset).ok()?;
    let field = bytes.get(start..start.checked_add(4)?)?;
    Some(u32::from_le_bytes([field[0], field[1], field[2], field[3]]))
}

pub(crate) fn read_u64(bytes: &[u8], offset: u64) -> Option<u64> {
    let low = read_u32(bytes, offset)?;
    let high = read_u32(bytes, offset.checked_add(4)?)?;
    Some(u64::from(low) | (u64::from(high) << 32))
}

fn slice(bytes: &[u8], offset: u64, length: u64) -> Option<&[u8]> {
    let start = usize::try_from(offset).ok()?;
    let end = start.checked_add(usize::try_from(length).ok()?)?;
    bytes.get(start..end)
}

/// Finds the first 4-byte-aligned Multiboot header with a valid checksum in the first 8 KiB
/// (Multiboot 0.6.96, 3.1.1).
fn find_multiboot_header(image: &[u8]) -> Result<MultibootHeader, LoadError> {
    let mut bad_checksum = None;
    let limit = image.len().min(MULTIBOOT_SEARCH_LIMIT);
    for offset in (0..limit).step_by(4) {
        if read_u32(image, offset as u64) != Some(MULTIBOOT_HEADER_MAGIC) {
            continue;
        }
        let (Some(flags), Some(checksum)) = (
            read_u32(image, offset as u64 + 4),
            read_u32(image, offset as u64 + 8),
        ) else {
            bad_checksum.get_or_insert(offset);
            continue;
        };
        if MULTIBOOT_HEADER_MAGIC
            .wrapping_add(flags)
            .wrapping_add(checksum)
            == 0
        {
            return Ok(MultibootHeader { offset, flags });
        }
        bad_checksum.get_or_insert(offset);
    }
    match bad_checksum {
        Some(offset) => Err(LoadError::BadMultibootChecksum { offset }),
        None => Err(LoadError::NoMultibootHeader),
    }
}

/// The image as the header's address fields describe it (Multiboot 0.6.96, 3.1.3):
/// the file from `header_offset - (header_addr - load_addr)` is loaded at `load_addr` up to
/// `load_end_addr` (0: the end of the file), zeros up to `bss_end_addr` (0: none).
fn aout_kludge_segments(
    image: &[u8],
    header_offset: usize,
) -> Result<(Vec<Segment<'_>>, u64), LoadError> {
    let field = |index: u64| {
        read_u32(image, header_offset as u64 + 12 + 4 * index)
            .map(u64::from)
            .ok_or(LoadError::BadAoutKludge(
                "the header's address fields are cut off by the end of the file",
            ))
    };
    let header_addr = field(0)?;
    let load_addr = field(1)?;
    let load_end_addr = field(2)?;
    let bss_end_addr = field(3)?;
    let entry_addr = field(4)?;
    if load_addr > header_addr {
        return Err(LoadError::BadAoutKludge("load_addr is above header_addr"));
    }
    let file_offset = (header_offset as u64)
        .checked_sub(header_addr - load_addr)
        .ok_or(LoadError::BadAoutKludge(
            "load_addr would start before the beginning of the file",
        ))?;
    let file_left = image.len() as u64 - file_offset;
    let load_size = if load_end_addr == 0 {
        file_left
    } else {
        let size = load_end_addr
            .checked_sub(load_addr)
            .ok_or(LoadError::BadAoutKludge("load_end_addr is below load_addr"))?;
        if size > file_left {
            return Err(LoadError::BadAoutKludge(
                "load_end_addr lies past the end of the file",
            ));
        }
        size
    };
    let memory_size = if bss_end_addr == 0 {
        load_size
    } else {
        bss_end_addr
            .checked_sub(load_addr)
            .filter(|size| *size >= load_size)
            .ok_or(LoadError::BadAoutKludge(
                "bss_end_addr is below the end of the loaded bytes",
            ))?
    };
    let data = slice(image, file_offset, load_size).ok_or(LoadError::BadAoutKludge(
        "the load range lies outside the file",
    ))?;
    let mut segments = Vec::new();
    if memory_size > 0 {
        segments.push(Segment {
            start: load_addr,
            data,
            size: memory_size,
        });
    }
    Ok((segments, entry_addr))
}

/// The PT_LOAD segments of an ELF32 (EM_386) or ELF64 (EM_X86_64) little-endian executable,
/// by physical address, and the entry point (System V ABI, "ELF header" and "Program header").
fn elf_segments(image: &[u8]) -> Result<(Vec<Segment<'_>>, u64), LoadError> {
    const PT_LOAD: u32 = 1;
    const ET_EXEC: u16 = 2;
    const EM_386: u16 = 3;
    const EM_X86_64: u16 = 62;
    if image.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err(LoadError::NotElf);
    }
    let identification = image.get(..16).ok_or(LoadError::MalformedElf(
        "the identification bytes are cut off",
    ))?;
    let is_64 = match identification[4] {
        1 => false,
        2 => true,
        _ => {
            return Err(LoadError::UnsupportedElf(
                "unknown class (neither ELF32 nor ELF64)",
            ))
        }
    };
    if identification[5] != 1 {
        return Err(LoadError::UnsupportedElf("not little-endian"));
    }
    if identification[6] != 1 {
        return Err(LoadError::UnsupportedElf("unknown ELF version"));
    }
    let header_len: usize = if is_64 { 64 } else { 52 };
    if image.len() < header_len {
        return Err(LoadError::MalformedElf("the ELF header is cut off"));
    }
    let cut = LoadError::MalformedElf("the ELF header is cut off");
    let e_type = read_u16(image, 16).ok_or(cut.clone())?;
    if e_type != ET_EXEC {
        return Err(LoadError::UnsupportedElf(
            "not an executable (e_type is not ET_EXEC)",
        ));
    }
    let machine = read_u16(image, 18).ok_or(cut.clone())?;
    match (is_64, machine) {
        (false, EM_386) | (true, EM_X86_64) => {}
        (false, _) => {
            return Err(LoadError::UnsupportedElf(
                "an ELF32 file must be for x86 (EM_386)",
            ))
        }
        (true, _) => {
            return Err(LoadError::UnsupportedElf(
                "an ELF64 file must be for x86-64 (EM_X86_64)",
            ))
        }
    }
    let (entry, phoff, phentsize, phnum, min_phentsize) = if is_64 {
        (
            read_u64(image, 24).ok_or(cut.clone())?,
            read_u64(image, 32).ok_or(cut.clone())?,
            read_u16(image, 54).ok_or(cut.clone())?,
            read_u16(image, 56).ok_or(cut)?,
            56u16,
        )
    } else {
        (
            u64::from(read_u32(image, 24).ok_or(cut.clone())?),
            u64::from(read_u32(image, 28).ok_or(cut.clone())?),
            read_u16(image, 42).ok_or(cut.clone())?,
            read_u16(image, 44).ok_or(cut)?,
            32u16,
        )
    };
    if usize::from(phnum) > MAX_PROGRAM_HEADERS {
        return Err(LoadError::UnsupportedElf("more than 64 program headers"));
    }
    if phnum > 0 && phentsize < min_phentsize {
        return Err(LoadError::MalformedElf(
            "program header entries are too small",
        ));
    }
    let mut segments = Vec::new();
    for index in 0..u64::from(phnum) {
        let outside = LoadError::MalformedElf("the program header table lies outside the file");
        let header_offset = phoff
            .checked_add(index * u64::from(phentsize))
            .ok_or(outside.clone())?;
        let header =
            slice(image, header_offset, u64::from(min_phentsize)).ok_or(outside.clone())?;
        let p_type = read_u32(header, 0).ok_or(outside.clone())?;
        let (offset, paddr, filesz, memsz) = if is_64 {
            (
                read_u64(header, 8),
                read_u64(header, 24),
                read_u64(header, 32),
                read_u64(header, 40),
            )
        } else {
            (
                read_u32(header, 4).map(u64::from),
                read_u32(header, 12).map(u64::from),
                read_u32(header, 16).map(u64::from),
                read_u32(header, 20).map(u64::from),
            )
        };
        let (Some(offset), Some(paddr), Some(filesz), Some(memsz)) = (offset, paddr, filesz, memsz)
        else {
            return Err(outside);
        };
        if p_type != PT_LOAD {
            continue;
        }
        if filesz > memsz {
            return Err(LoadError::MalformedElf(
                "a segment's file size is larger than its memory size",
            ));
        }
        let data = slice(image, offset, filesz).ok_or(LoadError::MalformedElf(
            "a segment's bytes lie outside the file",
        ))?;
        if memsz > 0 {
            segments.push(Segment {
                start: paddr,
                data,
                size: memsz,
            });
        }
    }
    Ok((segments, entry))
}

/// Checks that every segment lies in [1 MiB, memory), that none overlap and that the entry
/// point is loaded; returns the end of the highest segment.
fn check_segments(segments: &[Segment<'_>], entry: u64, memory: u64) -> Result<u64, LoadError> {
    if segments.is_empty() {
        return Err(LoadError::NoLoadableSegments);
    }
    let mut highest = 0;
    for segment in segments {
        let end = segment
            .start
            .checked_add(segment.size)
            .ok_or(LoadError::SegmentOutsideRam {
                start: segment.start,
                size: segment.size,
                memory,
            })?;
        if segment.start < IMAGE_ADDRESS {
            return Err(LoadError::SegmentOverlapsLowMemory {
                start: segment.start,
                end,
            });
        }
        if end > memory {
            return Err(LoadError::SegmentOutsideRam {
                start: segment.start,
                size: segment.size,
                memory,
            });
        }
        highest = highest.max(end);
    }
    // At most MAX_PROGRAM_HEADERS segments: the quadratic check is bounded.
    for (index, first) in segments.iter().enumerate() {
        for second in &segments[index + 1..] {
            if first.start < second.start + second.size && second.start < first.start + first.size {
                return Err(LoadError::SegmentsOverlap {
                    first: first.start,
                    second: second.start,
                });
            }
        }
    }
    if !segments
        .iter()
        .any(|segment| entry >= segment.start && entry - segment.start < segment.size)
    {
        return Err(LoadError::EntryNotLoaded { entry });
    }
    Ok(highest)
}

/// Builds the Multiboot info page (layout in the module doc). `module_ranges` are the
/// modules' [start, end) guest-physical addresses, all below 4 GiB.
fn multiboot_info(
    memory: u64,
    cmdline: &str,
    modules: &[Module<'_>],
    module_ranges: &[(u64, u64)],
) -> Result<Vec<u8>, LoadError> {
    let module_list_end = MODULE_LIST_OFFSET + modules.len() * MODULE_ENTRY_LEN;
    let strings_len: usize = cmdline.len()
        + 1
        + modules
            .iter()
            .map(|module| module.name.len() + 1)
            .sum::<usize>();
    let needed = module_list_end + strings_len;
    if needed as u64 > BOOT_INFO_SIZE {
        return Err(LoadError::BootInfoTooLarge {
            needed: needed as u64,
            available: BOOT_INFO_SIZE,
        });
    }
    // Every address below fits in 32 bits: the page is at 0x8000 and `needed` <= 0x1000.
    let address = |offset: usize| (BOOT_INFO_ADDRESS as usize + offset) as u32;
    let mut info = alloc::vec![0u8; module_list_end];
    let put = |info: &mut Vec<u8>, offset: usize, value: u32| {
        info[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
    };

    put(&mut info, INFO_FLAGS, MULTIBOOT_INFO_FLAGS);
    put(&mut info, INFO_MEM_LOWER, MULTIBOOT_MEM_LOWER_KIB);
    put(
        &mut info,
        INFO_MEM_UPPER,
        ((memory - IMAGE_ADDRESS) / 1024) as u32,
    );
    put(&mut info, INFO_MODS_COUNT, modules.len() as u32);
    put(&mut info, INFO_MODS_ADDR, address(MODULE_LIST_OFFSET));
    put(
        &mut info,
        INFO_MMAP_LENGTH,
        (4 * MEMORY_MAP_ENTRY_LEN) as u32,
    );
    put(&mut info, INFO_MMAP_ADDR, address(MEMORY_MAP_OFFSET));
    put(
        &mut info,
        INFO_LOADER_NAME_ADDR,
        address(LOADER_NAME_OFFSET),
    );

    let memory_map: [(u64, u64, u32); 4] = [
        (0, 0x9_FC00, 1),
        (0x9_FC00, 0xA_0000 - 0x9_FC00, 2),
        (0xF_0000, 0x10_0000 - 0xF_0000, 2),
        (IMAGE_ADDRESS, memory - IMAGE_ADDRESS, 1),
    ];
    for (index, (base, length, kind)) in memory_map.into_iter().enumerate() {
        let entry = MEMORY_MAP_OFFSET + index * MEMORY_MAP_ENTRY_LEN;
        // `size` counts the bytes after itself (Multiboot 0.6.96, 3.3).
        put(&mut info, entry, (MEMORY_MAP_ENTRY_LEN - 4) as u32);
        info[entry + 4..entry + 12].copy_from_slice(&base.to_le_bytes());
        info[entry + 12..entry + 20].copy_from_slice(&length.to_le_bytes());
        put(&mut info, entry + 20, kind);
    }
    info[LOADER_NAME_OFFSET..LOADER_NAME_OFFSET + LOADER_NAME.len()]
        .copy_from_slice(LOADER_NAME.as_bytes());

    let cmdline_address = address(info.len());
    put(&mut info, INFO_CMDLINE_ADDR, cmdline_address);
    info.extend_from_slice(cmdline.as_bytes());
    info.push(0);
    for (index, (module, (start, end))) in modules.iter().zip(module_ranges).enumerate() {
        let entry = MODULE_LIST_OFFSET + index * MODULE_ENTRY_LEN;
        let name_address = address(info.len());
        put(&mut info, entry, *start as u32);
        put(&mut info, entry + 4, *end as u32);
        put(&mut info, entry + 8, name_address);
        info.extend_from_slice(module.name.as_bytes());
        info.push(0);
    }
    Ok(info)
}

#[cfg(test)]
mod tests;
