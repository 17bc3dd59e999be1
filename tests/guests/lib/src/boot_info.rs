//! The flat64 boot information at 0x8000 (docs/specs/guest-boot.md "flat64"): u64 magic
//! 0x52494E475A45524F ("RINGZERO"), u64 memory size in bytes, u64 command-line length, then the
//! command-line bytes (not NUL-terminated, at most 3072).

/// "RINGZERO" read as a big-endian number.
pub const BOOT_INFO_MAGIC: u64 = 0x5249_4E47_5A45_524F;
/// The longest command line the protocol allows.
pub const CMDLINE_MAX: usize = 3072;
const HEADER_SIZE: usize = 24;

/// A copy of the boot information, taken at entry.
pub struct BootInfo {
    pub address: u64,
    pub magic: u64,
    pub memory_size: u64,
    /// The length the hypervisor gave (may exceed `CMDLINE_MAX` if it is broken).
    pub cmdline_length: u64,
    cmdline: [u8; CMDLINE_MAX],
}

impl BootInfo {
    /// Reads the boot information at `address` (RDI at entry).
    pub fn at(address: u64) -> Self {
        let pointer = address as *const u8;
        // SAFETY: the flat64 protocol maps [0, 4 GiB) and puts the boot info at `address` (RDI),
        // in RAM: 24 header bytes, then the command line of at most CMDLINE_MAX bytes, all
        // within the 0x8000-0x8FFF page. Reads are unaligned-safe.
        let (magic, memory_size, cmdline_length) = unsafe {
            (
                core::ptr::read_unaligned(pointer as *const u64),
                core::ptr::read_unaligned(pointer.add(8) as *const u64),
                core::ptr::read_unaligned(pointer.add(16) as *const u64),
            )
        };
        let mut cmdline = [0u8; CMDLINE_MAX];
        let copied = (cmdline_length as usize).min(CMDLINE_MAX);
        // SAFETY: `copied` <= CMDLINE_MAX bytes after the header, inside the boot info page (see
        // above); the destination is a local array of CMDLINE_MAX bytes.
        unsafe {
            core::ptr::copy_nonoverlapping(pointer.add(HEADER_SIZE), cmdline.as_mut_ptr(), copied)
        };
        Self {
            address,
            magic,
            memory_size,
            cmdline_length,
            cmdline,
        }
    }

    pub fn magic_ok(&self) -> bool {
        self.magic == BOOT_INFO_MAGIC
    }

    /// The command line (cut at CMDLINE_MAX).
    pub fn cmdline(&self) -> &[u8] {
        &self.cmdline[..(self.cmdline_length as usize).min(CMDLINE_MAX)]
    }
}

/// The value of `key=` among the space-separated words of a command line, if any.
pub fn parameter<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline.split_whitespace().find_map(|word| {
        word.strip_prefix(key)
            .and_then(|rest| rest.strip_prefix('='))
    })
}
