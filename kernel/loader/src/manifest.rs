//! The boot manifest: a compact, versioned record that `boot/` writes as the bootloader's
//! ramdisk and the hypervisor checks before using anything in it. It carries every guest (its
//! settings, kernel image, modules and initial RAM disk); the decoded [`Manifest`] borrows the
//! images from the ramdisk bytes, nothing is copied.
//!
//! Layout, version 6 (all integers little-endian; every offset counts from the manifest's
//! first byte). Version 3 added the Linux format (code 3) and the initrd: the VM record grew
//! from 96 to 112 bytes (the initrd span at 96) and flag bit 1 says whether there is one.
//! Version 4 added guest SMP: the vCPU count is 1..=[`MAX_CPUS`] (16; it was 1..=256 and
//! only 1 was ever written), the pin count and the time limit took reserved bytes 84 and 88,
//! and the record grew from 112 to 128 bytes (the pin list at 112). Version 5 added virtual
//! disks: the record grew from 128 to 144 bytes (the disk table's offset and count at 128)
//! and each VM has a disk table. Version 6 added the virtual NIC: the record grew from 144 to
//! 160 bytes (the NIC's flags and MAC address at 144). The header is unchanged.
//!
//! Header (32 bytes):
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `RZMANIF1` (unchanged since version 1) |
//! | 8 | 4 | format version (6); at the same place as in versions 1 to 5 |
//! | 12 | 4 | test hook ([`TestHook`]), 0 in normal builds |
//! | 16 | 8 | total length in bytes, header included |
//! | 24 | 4 | number of VMs (at most [`MAX_VMS`]) |
//! | 28 | 4 | reserved, 0 |
//!
//! VM table: at offset 32, one 160-byte record per VM, in run order. A *span* is a u64 offset
//! and a u64 length of bytes in the blob area.
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | format: 1 = flat64, 2 = multiboot, 3 = linux ([`GuestFormat`]) |
//! | 4 | 4 | paging: 0 = nested, 1 = shadow ([`Paging`]) |
//! | 8 | 4 | vCPU count (1..=[`MAX_CPUS`]; above 1 only with nested paging); at most [`MAX_TOTAL_CPUS`] over all VMs |
//! | 12 | 4 | flags: bit 0 = trace every exit; bit 1 = has an initrd; other bits 0 |
//! | 16 | 8 | guest memory in bytes (non-zero) |
//! | 24 | 16 | span: name (UTF-8, 1..=[`MAX_NAME_LEN`] bytes of `[A-Za-z0-9_-]`) |
//! | 40 | 16 | span: command line (UTF-8, at most [`MAX_CMDLINE_LEN`] bytes, no NUL) |
//! | 56 | 16 | span: kernel image |
//! | 72 | 8 | offset of this VM's module table |
//! | 80 | 4 | number of modules (at most [`MAX_MODULES`]) |
//! | 84 | 4 | pin count: 0 (not pinned: the hypervisor places the vCPUs), 1 (every vCPU on the one CPU) or the vCPU count (vCPU i on entry i) |
//! | 88 | 4 | time limit in seconds of wall time: 0 = none, else 1..=[`MAX_TIME_LIMIT_SECONDS`] |
//! | 92 | 4 | reserved, 0 |
//! | 96 | 16 | span: initrd (the initial RAM disk); offset and length both 0 when flag bit 1 is clear |
//! | 112 | 16 | pin list: one byte per entry, a host CPU index 0..=[`MAX_HOST_CPU`]; the bytes past the pin count are 0 |
//! | 128 | 8 | offset of this VM's disk table |
//! | 136 | 4 | number of disks (at most [`MAX_DISKS`]) |
//! | 140 | 4 | reserved, 0 |
//! | 144 | 4 | NIC flags: bit 0 = the VM has a NIC ([`NicManifest`]); other bits 0 |
//! | 148 | 6 | the NIC's MAC address, in wire order: unicast and not all zero; all 0 when flag bit 0 is clear |
//! | 154 | 6 | reserved, 0 |
//!
//! Module tables: one 32-byte record per module: span of the name (UTF-8, at most
//! [`MAX_MODULE_NAME_LEN`] bytes, no NUL), span of the module's bytes.
//!
//! Disk tables: one 64-byte record per disk, in the order the VM's virtio-blk devices get:
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | kind: 1 = partition by GPT label, 2 = partition by unique GUID, 3 = image ([`DiskSource`]) |
//! | 4 | 4 | flags: bit 0 = writable; other bits 0 |
//! | 8 | 16 | kind 2: the partition's unique GUID in GPT byte order (non-zero); else 0 |
//! | 24 | 16 | span: kind 1: the label (UTF-8, 1..=36 UTF-16 units, no NUL); kind 3: the image's name (at most [`MAX_MODULE_NAME_LEN`] bytes, no NUL); kind 2: 0 |
//! | 40 | 16 | span: kind 3: the image's bytes (a whole number of [`DISK_SECTOR_SIZE`] sectors); else 0 |
//! | 56 | 8 | reserved, 0 |
//!
//! A partition that is writable for one disk may not be named (by the same label or GUID) by
//! any other disk of any VM; the host checks that, and so does [`Manifest::decode`]. No two
//! NICs of any VMs may have the same MAC address (checked by both too). Whether
//! a label and a GUID name the same partition only the physical disk can tell: the hypervisor
//! checks that when it opens the partitions.
//!
//! Blob area: names, command lines, images, modules and initrds, each starting 8-byte aligned (the
//! encoder's choice; the decoder only needs every span to lie inside the total length).
//!
//! A ramdisk that does not start with the magic, names a version this hypervisor does not
//! know, is shorter than it claims, or has any out-of-range offset, count, enum value or
//! string is refused with a [`ManifestError`]. Decoding never panics, whatever the bytes.

use alloc::vec::Vec;
use core::fmt;

/// The first eight bytes of every manifest.
pub const MAGIC: [u8; 8] = *b"RZMANIF1";
/// The format version this code reads and writes.
pub const VERSION: u32 = 6;
/// The size of the header (the same since version 1).
pub const HEADER_LEN: usize = 32;
/// The size of one VM record in the VM table (96 in version 2, 112 in version 3, 128 in
/// version 4, 144 in version 5).
pub const VM_RECORD_LEN: usize = 160;
/// The size of one disk record in a disk table.
pub const DISK_RECORD_LEN: usize = 64;
/// At most this many disks per VM.
pub const MAX_DISKS: usize = 4;
/// At most this many NICs per VM: the VM record has room for one.
pub const MAX_NICS: usize = 1;
/// The sector size of virtual disks: an image's length is a multiple of it.
pub const DISK_SECTOR_SIZE: usize = 512;
/// The longest GPT partition label, in UTF-16 code units (UEFI 2.10 Table 5.6: 72 bytes).
pub const MAX_PARTITION_LABEL_UNITS: usize = 36;
/// The size of one module record in a module table.
pub const MODULE_RECORD_LEN: usize = 32;
/// At most this many VMs in one manifest.
pub const MAX_VMS: usize = 64;
/// At most this many modules per VM.
pub const MAX_MODULES: usize = 64;
/// At most this many vCPUs per VM (`cpus` in the configuration).
pub const MAX_CPUS: u32 = 16;
/// At most this many vCPUs over all the VMs of one manifest.
pub const MAX_TOTAL_CPUS: u32 = 64;
/// The largest host CPU index a pin entry may name (0-based logical CPU numbers). Whether
/// that CPU exists is only known at boot: the hypervisor refuses a pin to a missing CPU then.
pub const MAX_HOST_CPU: u8 = 63;
/// The longest time limit, in seconds of wall time (one day).
pub const MAX_TIME_LIMIT_SECONDS: u32 = 86_400;
/// Longest VM name, in bytes.
pub const MAX_NAME_LEN: usize = 32;
/// Longest command line, in bytes (the boot protocols' limit, see docs/specs/guest-boot.md).
pub const MAX_CMDLINE_LEN: usize = 3072;
/// Longest module name, in bytes.
pub const MAX_MODULE_NAME_LEN: usize = 255;

/// The pin list's room in the VM record: one byte per vCPU.
const MAX_PIN_ENTRIES: usize = MAX_CPUS as usize;

const FLAG_TRACE: u32 = 1 << 0;
const FLAG_INITRD: u32 = 1 << 1;
const DISK_FLAG_WRITABLE: u32 = 1 << 0;
const NIC_FLAG_PRESENT: u32 = 1 << 0;

/// A test-only behaviour the hypervisor performs at boot, so the harness can prove a path
/// (e.g. the exception report) without a special kernel build.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TestHook {
    /// Normal boot.
    #[default]
    None,
    /// Read an unmapped address after the platform is up: the page-fault report must print
    /// and the machine must power off with the exception status.
    PageFault,
    /// Break the first VM's guest state before its first entry: the decoded entry-failure
    /// report must print, that VM must stop, and the hypervisor must go on.
    InvalidGuestState,
    /// Write a pattern near the end of the physical disk, flush, read it back and time a read
    /// of the whole disk: the one boot that writes the disk (a test's scratch file).
    DiskWrite,
    /// Send an ARP request from the physical NIC and wait (bounded) for the reply of QEMU's
    /// user-mode network: the one boot that transmits on the NIC.
    NetProbe,
    /// Free one frame twice after the platform is up: the frame allocator's ownership check
    /// must stop the hypervisor, naming the frame.
    DoubleFree,
    /// Make the hypervisor triple-fault (an empty IDT, then #UD): no handler of its own can
    /// run, so the emulator's side must tell the reset apart from a power-off and show the
    /// CPUs' state at the fault (`scripts/run-qemu.sh`).
    TripleFault,
}

impl TestHook {
    fn code(self) -> u32 {
        match self {
            TestHook::None => 0,
            TestHook::PageFault => 1,
            TestHook::InvalidGuestState => 2,
            TestHook::DiskWrite => 3,
            TestHook::NetProbe => 4,
            TestHook::DoubleFree => 5,
            TestHook::TripleFault => 6,
        }
    }

    fn from_code(code: u32) -> Result<Self, ManifestError> {
        match code {
            0 => Ok(TestHook::None),
            1 => Ok(TestHook::PageFault),
            2 => Ok(TestHook::InvalidGuestState),
            3 => Ok(TestHook::DiskWrite),
            4 => Ok(TestHook::NetProbe),
            5 => Ok(TestHook::DoubleFree),
            6 => Ok(TestHook::TripleFault),
            other => Err(ManifestError::UnknownTestHook(other)),
        }
    }

    /// The name used on the command line of `boot/` and `scripts/run-qemu.sh --test-hook`.
    pub fn name(self) -> &'static str {
        match self {
            TestHook::None => "none",
            TestHook::PageFault => "page-fault",
            TestHook::InvalidGuestState => "invalid-guest-state",
            TestHook::DiskWrite => "disk-write",
            TestHook::NetProbe => "net-probe",
            TestHook::DoubleFree => "double-free",
            TestHook::TripleFault => "triple-fault",
        }
    }

    /// Parses a name given on the command line.
    pub fn from_name(name: &str) -> Option<Self> {
        [
            TestHook::None,
            TestHook::PageFault,
            TestHook::InvalidGuestState,
            TestHook::DiskWrite,
            TestHook::NetProbe,
            TestHook::DoubleFree,
            TestHook::TripleFault,
        ]
        .into_iter()
        .find(|hook| hook.name() == name)
    }
}

/// How a guest image is booted (docs/specs/guest-boot.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestFormat {
    /// A raw binary at 1 MiB, entered in 64-bit long mode.
    Flat64,
    /// A Multiboot (version 1) kernel, entered in 32-bit protected mode.
    Multiboot,
    /// A Linux bzImage, entered at its 64-bit entry point (the Linux x86 boot protocol).
    Linux,
}

impl GuestFormat {
    /// Every format, in code order.
    pub const ALL: [GuestFormat; 3] = [
        GuestFormat::Flat64,
        GuestFormat::Multiboot,
        GuestFormat::Linux,
    ];

    fn code(self) -> u32 {
        match self {
            GuestFormat::Flat64 => 1,
            GuestFormat::Multiboot => 2,
            GuestFormat::Linux => 3,
        }
    }

    fn from_code(code: u32) -> Option<Self> {
        match code {
            1 => Some(GuestFormat::Flat64),
            2 => Some(GuestFormat::Multiboot),
            3 => Some(GuestFormat::Linux),
            _ => None,
        }
    }

    /// The name used in the guest configuration (`format = "..."`).
    pub fn name(self) -> &'static str {
        match self {
            GuestFormat::Flat64 => "flat64",
            GuestFormat::Multiboot => "multiboot",
            GuestFormat::Linux => "linux",
        }
    }

    /// Parses a configuration name.
    pub fn from_name(name: &str) -> Option<Self> {
        GuestFormat::ALL
            .into_iter()
            .find(|format| format.name() == name)
    }
}

/// How guest-physical memory is virtualized.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Paging {
    /// The hardware's second-level translation (EPT / NPT).
    #[default]
    Nested,
    /// Shadow page tables maintained by the hypervisor.
    Shadow,
}

impl Paging {
    fn code(self) -> u32 {
        match self {
            Paging::Nested => 0,
            Paging::Shadow => 1,
        }
    }

    fn from_code(code: u32) -> Option<Self> {
        match code {
            0 => Some(Paging::Nested),
            1 => Some(Paging::Shadow),
            _ => None,
        }
    }

    /// The name used in the guest configuration (`paging = "..."`).
    pub fn name(self) -> &'static str {
        match self {
            Paging::Nested => "nested",
            Paging::Shadow => "shadow",
        }
    }

    /// Parses a configuration name.
    pub fn from_name(name: &str) -> Option<Self> {
        [Paging::Nested, Paging::Shadow]
            .into_iter()
            .find(|paging| paging.name() == name)
    }
}

/// One VM as the hypervisor receives it. Borrowed from the ramdisk bytes (no copies of images).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmManifest<'a> {
    pub name: &'a str,
    pub format: GuestFormat,
    pub memory_bytes: u64,
    pub cmdline: &'a str,
    /// The number of vCPUs, 1..=[`MAX_CPUS`]; above 1 only with [`Paging::Nested`].
    pub cpus: u32,
    /// Host CPU indices (each 0..=[`MAX_HOST_CPU`]) the vCPUs run on: empty = not pinned (the
    /// hypervisor places them), one entry = every vCPU on that CPU, else exactly `cpus`
    /// entries, vCPU i on `pin[i]`. [`VmManifest::pinned_cpu`] reads it per vCPU.
    pub pin: &'a [u8],
    /// Seconds of wall time (1..=[`MAX_TIME_LIMIT_SECONDS`]) after which the hypervisor stops
    /// the VM with a report; `None` = no limit.
    pub time_limit_seconds: Option<u32>,
    pub paging: Paging,
    pub trace: bool,
    pub kernel: &'a [u8],
    pub modules: Vec<Module<'a>>,
    /// The initial RAM disk (linux only; the boot plan refuses it for the other formats).
    pub initrd: Option<&'a [u8]>,
    /// The VM's virtual disks (at most [`MAX_DISKS`]), in device order: the guest sees them
    /// as virtio-blk devices in this order (the first is `/dev/vda` in a Linux guest). The
    /// boot plan does not use them; the VM builder does, through `ringzero-vdisk`:
    /// [`DiskSource::PartitionLabel`] / [`DiskSource::PartitionGuid`] ->
    /// `GptTable::find` on the physical disk's table, then `PartitionDisk::new(io, partition,
    /// writable)`; [`DiskSource::Image`] -> `ImageDisk::read_only(bytes, name)` or, when
    /// `writable`, `ImageDisk::writable_copy(bytes, name)` (changes last until power-off).
    pub disks: Vec<DiskManifest<'a>>,
    /// The VM's virtual NIC, if it has one (`[[vm.nic]]` in the configuration; at most
    /// [`MAX_NICS`]). The guest sees it as a virtio-net device with this MAC address. The
    /// boot plan does not use it; the VM builder does, through `ringzero-virtio`:
    /// `Net::new(NetConfig::new(nic.mac))` behind `VirtioPci`, its frames going to the
    /// hypervisor's switch (`ringzero-vswitch`), which connects it to the other VMs' NICs and
    /// the physical NIC. The MAC is unicast, not all zero and unique over the manifest's VMs
    /// (decode checks all three).
    pub nic: Option<NicManifest>,
}

/// One virtual NIC of a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NicManifest {
    /// The NIC's MAC address in wire order: unicast (bit 0 of byte 0 clear) and not all zero.
    /// The host writes the configured `mac`, or by default
    /// `ringzero_virtio::net::mac_from_name(vm_name)`.
    pub mac: [u8; 6],
}

/// True for a MAC address a NIC may have: unicast (the group bit, bit 0 of the first byte,
/// clear) and not all zero.
pub fn is_valid_nic_mac(mac: [u8; 6]) -> bool {
    mac[0] & 1 == 0 && mac != [0; 6]
}

/// `mac` as six colon-separated lower-case hex bytes, e.g. `02:f1:1e:72:48:19`.
pub struct MacText(pub [u8; 6]);

impl fmt::Display for MacText {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, f] = self.0;
        write!(formatter, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
    }
}

/// One virtual disk of a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskManifest<'a> {
    pub source: DiskSource<'a>,
    /// Whether the guest may write (`writable = true` in the configuration; default false).
    pub writable: bool,
}

/// What backs a virtual disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskSource<'a> {
    /// The partition of the physical disk with this GPT label (1..=36 UTF-16 units).
    PartitionLabel(&'a str),
    /// The partition with this unique GUID, in GPT (mixed-endian) byte order, the order of
    /// `uguid::Guid::from_bytes` / `ringzero_vdisk::gpt::Guid::from_bytes`.
    PartitionGuid([u8; 16]),
    /// An image file packed into the manifest: its file name (the disk's serial) and bytes
    /// (a whole number of [`DISK_SECTOR_SIZE`] sectors), borrowed from the ramdisk.
    Image { name: &'a str, bytes: &'a [u8] },
}

impl DiskSource<'_> {
    fn code(&self) -> u32 {
        match self {
            DiskSource::PartitionLabel(_) => 1,
            DiskSource::PartitionGuid(_) => 2,
            DiskSource::Image { .. } => 3,
        }
    }

    /// True if both name the same partition the same way (same label, or same GUID).
    fn same_partition(&self, other: &DiskSource<'_>) -> bool {
        match (self, other) {
            (DiskSource::PartitionLabel(a), DiskSource::PartitionLabel(b)) => a == b,
            (DiskSource::PartitionGuid(a), DiskSource::PartitionGuid(b)) => a == b,
            _ => false,
        }
    }
}

/// True for a GPT partition label the configuration and the manifest accept: 1..=36 UTF-16
/// code units, no NUL.
pub fn is_valid_partition_label(label: &str) -> bool {
    !label.is_empty()
        && !label.contains('\0')
        && label.encode_utf16().count() <= MAX_PARTITION_LABEL_UNITS
}

impl VmManifest<'_> {
    /// The host CPU vCPU `vcpu` (counting from 0) is pinned to, or `None` when the VM is not
    /// pinned (or `vcpu` is not below `cpus`).
    pub fn pinned_cpu(&self, vcpu: u32) -> Option<u8> {
        if vcpu >= self.cpus {
            return None;
        }
        match self.pin {
            [] => None,
            [cpu] => Some(*cpu),
            list => list.get(usize::try_from(vcpu).ok()?).copied(),
        }
    }
}

/// One Multiboot module: its name (given to the guest) and its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Module<'a> {
    pub name: &'a str,
    pub bytes: &'a [u8],
}

/// Everything the hypervisor learns from the host at boot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Manifest<'a> {
    pub test_hook: TestHook,
    pub vms: Vec<VmManifest<'a>>,
}

/// Which string or byte range of a VM record a [`ManifestError`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    VmTable,
    Name,
    Cmdline,
    Kernel,
    ModuleTable,
    ModuleName(u32),
    ModuleBytes(u32),
    Initrd,
    DiskTable,
    DiskLabel(u32),
    DiskImageName(u32),
    DiskImage(u32),
}

impl fmt::Display for Field {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Field::VmTable => write!(formatter, "VM table"),
            Field::Name => write!(formatter, "name"),
            Field::Cmdline => write!(formatter, "command line"),
            Field::Kernel => write!(formatter, "kernel image"),
            Field::ModuleTable => write!(formatter, "module table"),
            Field::ModuleName(index) => write!(formatter, "module #{index} name"),
            Field::ModuleBytes(index) => write!(formatter, "module #{index} bytes"),
            Field::Initrd => write!(formatter, "initrd"),
            Field::DiskTable => write!(formatter, "disk table"),
            Field::DiskLabel(index) => write!(formatter, "disk #{index} partition label"),
            Field::DiskImageName(index) => write!(formatter, "disk #{index} image name"),
            Field::DiskImage(index) => write!(formatter, "disk #{index} image"),
        }
    }
}

/// Why a ramdisk was not accepted as a manifest. `vm` numbers count from 0 in table order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ManifestError {
    /// Fewer bytes than the header needs.
    TooShort { length: usize },
    /// The first eight bytes are not [`MAGIC`].
    BadMagic,
    /// A version this hypervisor does not read.
    UnsupportedVersion(u32),
    /// The header claims more bytes than the ramdisk holds (or fewer than the header).
    LengthMismatch { claimed: u64, available: usize },
    /// A test hook number this hypervisor does not know.
    UnknownTestHook(u32),
    /// A reserved field is not zero (at this byte offset of the manifest).
    ReservedNotZero { offset: u64 },
    /// More VMs than [`MAX_VMS`].
    TooManyVms { count: u32 },
    /// A table or span reaches outside the manifest's total length.
    OutOfBounds {
        vm: u32,
        field: Field,
        offset: u64,
        length: u64,
        total: u64,
    },
    /// A format code that is not a [`GuestFormat`].
    UnknownFormat { vm: u32, code: u32 },
    /// A paging code that is not a [`Paging`].
    UnknownPaging { vm: u32, code: u32 },
    /// Flag bits this hypervisor does not know.
    UnknownFlags { vm: u32, flags: u32 },
    /// A vCPU count of 0 or above [`MAX_CPUS`].
    BadCpuCount { vm: u32, cpus: u32 },
    /// More than one vCPU with shadow paging (shadow page tables are per VM, not per vCPU).
    SmpNeedsNestedPaging { vm: u32, cpus: u32 },
    /// More vCPUs over all VMs than [`MAX_TOTAL_CPUS`].
    TooManyCpus { total: u64 },
    /// A pin count that is neither 0, 1 nor the vCPU count.
    BadPinCount { vm: u32, count: u32, cpus: u32 },
    /// A pin entry above [`MAX_HOST_CPU`].
    BadPinCpu { vm: u32, entry: u32, cpu: u8 },
    /// A time limit above [`MAX_TIME_LIMIT_SECONDS`] (0 means none).
    BadTimeLimit { vm: u32, seconds: u32 },
    /// A guest memory size of 0.
    ZeroMemory { vm: u32 },
    /// More modules than [`MAX_MODULES`].
    TooManyModules { vm: u32, count: u32 },
    /// A string that is not UTF-8.
    BadUtf8 { vm: u32, field: Field },
    /// A string that is too long, empty where it must not be, or has forbidden characters.
    BadString { vm: u32, field: Field },
    /// More disks than [`MAX_DISKS`].
    TooManyDisks { vm: u32, count: u32 },
    /// A disk kind code that is not a [`DiskSource`].
    UnknownDiskKind { vm: u32, disk: u32, code: u32 },
    /// Disk flag bits this hypervisor does not know.
    UnknownDiskFlags { vm: u32, disk: u32, flags: u32 },
    /// A partition GUID of zero.
    ZeroPartitionGuid { vm: u32, disk: u32 },
    /// An image whose length is not a whole number of [`DISK_SECTOR_SIZE`] sectors.
    ImageNotWholeSectors { vm: u32, disk: u32, length: u64 },
    /// A partition writable for one disk is named by another (`other_vm`'s disk `other_disk`).
    SharedWritablePartition {
        vm: u32,
        disk: u32,
        other_vm: u32,
        other_disk: u32,
    },
    /// NIC flag bits this hypervisor does not know.
    UnknownNicFlags { vm: u32, flags: u32 },
    /// A NIC MAC address that is a group (multicast or broadcast) address or all zero.
    BadNicMac { vm: u32, mac: [u8; 6] },
    /// Two VMs' NICs with the same MAC address (`other_vm` is the earlier one).
    DuplicateNicMac {
        vm: u32,
        other_vm: u32,
        mac: [u8; 6],
    },
}

impl fmt::Display for ManifestError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ManifestError::TooShort { length } => {
                write!(formatter, "manifest too short: {length} bytes, the header needs {HEADER_LEN}")
            }
            ManifestError::BadMagic => write!(formatter, "ramdisk does not start with the manifest magic RZMANIF1"),
            ManifestError::UnsupportedVersion(version) => write!(
                formatter,
                "manifest version {version} is not supported (this hypervisor reads version {VERSION}); rebuild the images with the same ringzero"
            ),
            ManifestError::LengthMismatch { claimed, available } => {
                write!(formatter, "manifest claims {claimed} bytes but the ramdisk holds {available} (and the header needs {HEADER_LEN})")
            }
            ManifestError::UnknownTestHook(code) => write!(formatter, "unknown test hook {code}"),
            ManifestError::ReservedNotZero { offset } => {
                write!(formatter, "manifest reserved field at offset {offset:#x} is not zero")
            }
            ManifestError::TooManyVms { count } => {
                write!(formatter, "manifest lists {count} VMs, at most {MAX_VMS} are allowed")
            }
            ManifestError::OutOfBounds { vm, field, offset, length, total } => write!(
                formatter,
                "manifest vm #{vm}: {field} at offset {offset:#x} length {length:#x} lies outside the manifest's {total:#x} bytes"
            ),
            ManifestError::UnknownFormat { vm, code } => {
                write!(formatter, "manifest vm #{vm}: unknown guest format code {code}")
            }
            ManifestError::UnknownPaging { vm, code } => {
                write!(formatter, "manifest vm #{vm}: unknown paging code {code}")
            }
            ManifestError::UnknownFlags { vm, flags } => {
                write!(formatter, "manifest vm #{vm}: unknown flag bits {flags:#x}")
            }
            ManifestError::BadCpuCount { vm, cpus } => {
                write!(formatter, "manifest vm #{vm}: {cpus} vCPUs is not in 1..={MAX_CPUS}")
            }
            ManifestError::SmpNeedsNestedPaging { vm, cpus } => write!(
                formatter,
                "manifest vm #{vm}: {cpus} vCPUs with shadow paging (guest SMP needs nested paging)"
            ),
            ManifestError::TooManyCpus { total } => {
                write!(formatter, "manifest lists {total} vCPUs over all VMs, at most {MAX_TOTAL_CPUS} are allowed")
            }
            ManifestError::BadPinCount { vm, count, cpus } => write!(
                formatter,
                "manifest vm #{vm}: {count} pin entries for {cpus} vCPUs (0, 1 or {cpus} are allowed)"
            ),
            ManifestError::BadPinCpu { vm, entry, cpu } => write!(
                formatter,
                "manifest vm #{vm}: pin entry #{entry} is host CPU {cpu}, not in 0..={MAX_HOST_CPU}"
            ),
            ManifestError::BadTimeLimit { vm, seconds } => write!(
                formatter,
                "manifest vm #{vm}: time limit of {seconds} seconds is above {MAX_TIME_LIMIT_SECONDS}"
            ),
            ManifestError::ZeroMemory { vm } => write!(formatter, "manifest vm #{vm}: guest memory size is 0"),
            ManifestError::TooManyModules { vm, count } => {
                write!(formatter, "manifest vm #{vm}: {count} modules, at most {MAX_MODULES} are allowed")
            }
            ManifestError::BadUtf8 { vm, field } => write!(formatter, "manifest vm #{vm}: {field} is not UTF-8"),
            ManifestError::BadString { vm, field } => write!(
                formatter,
                "manifest vm #{vm}: {field} is empty, too long or has forbidden characters"
            ),
            ManifestError::TooManyDisks { vm, count } => {
                write!(formatter, "manifest vm #{vm}: {count} disks, at most {MAX_DISKS} are allowed")
            }
            ManifestError::UnknownDiskKind { vm, disk, code } => {
                write!(formatter, "manifest vm #{vm}: disk #{disk} has unknown kind {code}")
            }
            ManifestError::UnknownDiskFlags { vm, disk, flags } => {
                write!(formatter, "manifest vm #{vm}: disk #{disk} has unknown flag bits {flags:#x}")
            }
            ManifestError::ZeroPartitionGuid { vm, disk } => {
                write!(formatter, "manifest vm #{vm}: disk #{disk} names the zero partition GUID")
            }
            ManifestError::ImageNotWholeSectors { vm, disk, length } => write!(
                formatter,
                "manifest vm #{vm}: disk #{disk} image of {length} bytes is not a whole number of {DISK_SECTOR_SIZE}-byte sectors"
            ),
            ManifestError::SharedWritablePartition { vm, disk, other_vm, other_disk } => write!(
                formatter,
                "manifest vm #{vm}: disk #{disk} names the same partition as vm #{other_vm} disk #{other_disk}, and one of them is writable"
            ),
            ManifestError::UnknownNicFlags { vm, flags } => {
                write!(formatter, "manifest vm #{vm}: NIC has unknown flag bits {flags:#x}")
            }
            ManifestError::BadNicMac { vm, mac } => write!(
                formatter,
                "manifest vm #{vm}: NIC MAC address {} is not unicast or is all zero",
                MacText(*mac)
            ),
            ManifestError::DuplicateNicMac { vm, other_vm, mac } => write!(
                formatter,
                "manifest vm #{vm}: NIC MAC address {} is also the MAC address of vm #{other_vm}'s NIC",
                MacText(*mac)
            ),
        }
    }
}

/// True for a VM name the configuration and the manifest accept: 1..=[`MAX_NAME_LEN`] bytes
/// of `[A-Za-z0-9_-]`.
pub fn is_valid_vm_name(name: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-')
}

/// Bounds-checked little-endian reads over the manifest's first `total` bytes.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn slice(&self, offset: u64, length: u64) -> Option<&'a [u8]> {
        let start = usize::try_from(offset).ok()?;
        let length = usize::try_from(length).ok()?;
        let end = start.checked_add(length)?;
        self.bytes.get(start..end)
    }

    fn u32_at(&self, offset: u64) -> Option<u32> {
        let bytes = self.slice(offset, 4)?;
        Some(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    fn u64_at(&self, offset: u64) -> Option<u64> {
        let bytes = self.slice(offset, 8)?;
        let mut word = [0u8; 8];
        word.copy_from_slice(bytes);
        Some(u64::from_le_bytes(word))
    }
}

impl<'a> Manifest<'a> {
    /// Serializes the manifest (done on the host by `boot/`). The host validates the VMs
    /// first (`boot/src/config.rs`); a manifest built from unchecked values may be refused
    /// by [`Manifest::decode`] (and `time_limit_seconds: Some(0)` reads back as `None`).
    pub fn encode(&self) -> Vec<u8> {
        fn align8(bytes: &mut Vec<u8>) {
            while !bytes.len().is_multiple_of(8) {
                bytes.push(0);
            }
        }
        fn put_u32(bytes: &mut [u8], offset: usize, value: u32) {
            bytes[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
        }
        fn put_u64(bytes: &mut [u8], offset: usize, value: u64) {
            bytes[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
        }
        /// Appends `data` to the blob area and returns its span.
        fn blob(bytes: &mut Vec<u8>, data: &[u8]) -> (u64, u64) {
            align8(bytes);
            let offset = bytes.len() as u64;
            bytes.extend_from_slice(data);
            (offset, data.len() as u64)
        }

        let vm_table = HEADER_LEN;
        let module_tables = vm_table + self.vms.len() * VM_RECORD_LEN;
        let module_count: usize = self.vms.iter().map(|vm| vm.modules.len()).sum();
        let disk_tables = module_tables + module_count * MODULE_RECORD_LEN;
        let disk_count: usize = self.vms.iter().map(|vm| vm.disks.len()).sum();
        let mut bytes = alloc::vec![0u8; disk_tables + disk_count * DISK_RECORD_LEN];

        bytes[..8].copy_from_slice(&MAGIC);
        put_u32(&mut bytes, 8, VERSION);
        put_u32(&mut bytes, 12, self.test_hook.code());
        put_u32(&mut bytes, 24, self.vms.len() as u32);

        let mut next_module_record = module_tables;
        let mut next_disk_record = disk_tables;
        for (index, vm) in self.vms.iter().enumerate() {
            let record = vm_table + index * VM_RECORD_LEN;
            put_u32(&mut bytes, record, vm.format.code());
            put_u32(&mut bytes, record + 4, vm.paging.code());
            put_u32(&mut bytes, record + 8, vm.cpus);
            let mut flags = 0;
            if vm.trace {
                flags |= FLAG_TRACE;
            }
            if vm.initrd.is_some() {
                flags |= FLAG_INITRD;
            }
            put_u32(&mut bytes, record + 12, flags);
            put_u64(&mut bytes, record + 16, vm.memory_bytes);
            for (field_offset, data) in [
                (24, vm.name.as_bytes()),
                (40, vm.cmdline.as_bytes()),
                (56, vm.kernel),
            ] {
                let (offset, length) = blob(&mut bytes, data);
                put_u64(&mut bytes, record + field_offset, offset);
                put_u64(&mut bytes, record + field_offset + 8, length);
            }
            put_u64(&mut bytes, record + 72, next_module_record as u64);
            put_u32(&mut bytes, record + 80, vm.modules.len() as u32);
            // A pin list longer than the record's room is written as its count alone (which
            // decode refuses: it exceeds any valid vCPU count), never past the record.
            let pin_bytes = if vm.pin.len() <= MAX_PIN_ENTRIES {
                vm.pin.len()
            } else {
                0
            };
            put_u32(
                &mut bytes,
                record + 84,
                u32::try_from(vm.pin.len()).unwrap_or(u32::MAX),
            );
            bytes[record + 112..record + 112 + pin_bytes].copy_from_slice(&vm.pin[..pin_bytes]);
            put_u32(&mut bytes, record + 88, vm.time_limit_seconds.unwrap_or(0));
            for module in &vm.modules {
                for (field_offset, data) in [(0, module.name.as_bytes()), (16, module.bytes)] {
                    let (offset, length) = blob(&mut bytes, data);
                    put_u64(&mut bytes, next_module_record + field_offset, offset);
                    put_u64(&mut bytes, next_module_record + field_offset + 8, length);
                }
                next_module_record += MODULE_RECORD_LEN;
            }
            if let Some(initrd) = vm.initrd {
                let (offset, length) = blob(&mut bytes, initrd);
                put_u64(&mut bytes, record + 96, offset);
                put_u64(&mut bytes, record + 104, length);
            }
            put_u64(&mut bytes, record + 128, next_disk_record as u64);
            put_u32(
                &mut bytes,
                record + 136,
                u32::try_from(vm.disks.len()).unwrap_or(u32::MAX),
            );
            for disk in &vm.disks {
                let at = next_disk_record;
                put_u32(&mut bytes, at, disk.source.code());
                put_u32(
                    &mut bytes,
                    at + 4,
                    if disk.writable { DISK_FLAG_WRITABLE } else { 0 },
                );
                let mut spans: [Option<&[u8]>; 2] = [None, None];
                match disk.source {
                    DiskSource::PartitionLabel(label) => spans[0] = Some(label.as_bytes()),
                    DiskSource::PartitionGuid(guid) => {
                        bytes[at + 8..at + 24].copy_from_slice(&guid)
                    }
                    DiskSource::Image { name, bytes: image } => {
                        spans = [Some(name.as_bytes()), Some(image)];
                    }
                }
                for (field_offset, data) in [(24, spans[0]), (40, spans[1])] {
                    if let Some(data) = data {
                        let (offset, length) = blob(&mut bytes, data);
                        put_u64(&mut bytes, at + field_offset, offset);
                        put_u64(&mut bytes, at + field_offset + 8, length);
                    }
                }
                next_disk_record += DISK_RECORD_LEN;
            }
            if let Some(nic) = vm.nic {
                put_u32(&mut bytes, record + 144, NIC_FLAG_PRESENT);
                bytes[record + 148..record + 154].copy_from_slice(&nic.mac);
            }
        }
        align8(&mut bytes);
        let total = bytes.len() as u64;
        put_u64(&mut bytes, 16, total);
        bytes
    }

    /// Checks and parses a manifest (done by the hypervisor on the ramdisk's bytes). Bytes
    /// past the claimed total length (ramdisk padding) are ignored.
    pub fn decode(bytes: &'a [u8]) -> Result<Manifest<'a>, ManifestError> {
        if bytes.len() < HEADER_LEN {
            return Err(ManifestError::TooShort {
                length: bytes.len(),
            });
        }
        if bytes[..8] != MAGIC {
            return Err(ManifestError::BadMagic);
        }
        let header = Reader { bytes };
        let version = header.u32_at(8).ok_or(ManifestError::BadMagic)?;
        if version != VERSION {
            return Err(ManifestError::UnsupportedVersion(version));
        }
        let claimed = header.u64_at(16).unwrap_or(0);
        let total = match usize::try_from(claimed) {
            Ok(total) if (HEADER_LEN..=bytes.len()).contains(&total) => total,
            _ => {
                return Err(ManifestError::LengthMismatch {
                    claimed,
                    available: bytes.len(),
                })
            }
        };
        let reader = Reader {
            bytes: &bytes[..total],
        };
        let test_hook = TestHook::from_code(reader.u32_at(12).unwrap_or(u32::MAX))?;
        let vm_count = reader.u32_at(24).unwrap_or(u32::MAX);
        if reader.u32_at(28) != Some(0) {
            return Err(ManifestError::ReservedNotZero { offset: 28 });
        }
        if vm_count as usize > MAX_VMS {
            return Err(ManifestError::TooManyVms { count: vm_count });
        }
        let table_length = u64::from(vm_count) * VM_RECORD_LEN as u64;
        if reader.slice(HEADER_LEN as u64, table_length).is_none() {
            return Err(ManifestError::OutOfBounds {
                vm: 0,
                field: Field::VmTable,
                offset: HEADER_LEN as u64,
                length: table_length,
                total: claimed,
            });
        }
        let mut vms = Vec::with_capacity(vm_count as usize);
        for vm in 0..vm_count {
            let record = HEADER_LEN as u64 + u64::from(vm) * VM_RECORD_LEN as u64;
            vms.push(decode_vm(&reader, vm, record, claimed)?);
        }
        let total_cpus: u64 = vms.iter().map(|vm| u64::from(vm.cpus)).sum();
        if total_cpus > u64::from(MAX_TOTAL_CPUS) {
            return Err(ManifestError::TooManyCpus { total: total_cpus });
        }
        check_shared_partitions(&vms)?;
        check_unique_macs(&vms)?;
        Ok(Manifest { test_hook, vms })
    }
}

/// Refuses a partition that is writable for one disk and named (the same way) by another.
/// At most [`MAX_VMS`] x [`MAX_DISKS`] disks, so the pairwise check is bounded.
fn check_shared_partitions(vms: &[VmManifest<'_>]) -> Result<(), ManifestError> {
    let disks: Vec<(u32, u32, &DiskManifest<'_>)> = (0u32..)
        .zip(vms)
        .flat_map(|(vm, manifest)| {
            (0u32..)
                .zip(&manifest.disks)
                .map(move |(disk, entry)| (vm, disk, entry))
        })
        .collect();
    for (later, &(vm, disk, entry)) in disks.iter().enumerate() {
        for &(other_vm, other_disk, other) in &disks[..later] {
            if (entry.writable || other.writable) && entry.source.same_partition(&other.source) {
                return Err(ManifestError::SharedWritablePartition {
                    vm,
                    disk,
                    other_vm,
                    other_disk,
                });
            }
        }
    }
    Ok(())
}

/// Refuses two NICs with the same MAC address (at most [`MAX_VMS`] NICs, so the pairwise
/// check is bounded); the error names the later VM.
fn check_unique_macs(vms: &[VmManifest<'_>]) -> Result<(), ManifestError> {
    for (vm, manifest) in (0u32..).zip(vms) {
        let Some(nic) = manifest.nic else { continue };
        let earlier = (0u32..)
            .zip(&vms[..vm as usize])
            .find(|(_, other)| other.nic == Some(nic));
        if let Some((other_vm, _)) = earlier {
            return Err(ManifestError::DuplicateNicMac {
                vm,
                other_vm,
                mac: nic.mac,
            });
        }
    }
    Ok(())
}

/// Decodes the VM record at `record` (already known to lie inside the manifest).
fn decode_vm<'a>(
    reader: &Reader<'a>,
    vm: u32,
    record: u64,
    total: u64,
) -> Result<VmManifest<'a>, ManifestError> {
    // The record is in bounds, so these reads succeed; a failure would still be an error.
    let word = |offset: u64| {
        reader
            .u32_at(record + offset)
            .ok_or(ManifestError::OutOfBounds {
                vm,
                field: Field::VmTable,
                offset: record + offset,
                length: 4,
                total,
            })
    };
    let quad = |offset: u64| {
        reader
            .u64_at(record + offset)
            .ok_or(ManifestError::OutOfBounds {
                vm,
                field: Field::VmTable,
                offset: record + offset,
                length: 8,
                total,
            })
    };
    let span = |field: Field, at: u64| -> Result<&'a [u8], ManifestError> {
        let offset = reader.u64_at(at).unwrap_or(u64::MAX);
        let length = reader.u64_at(at + 8).unwrap_or(u64::MAX);
        reader
            .slice(offset, length)
            .ok_or(ManifestError::OutOfBounds {
                vm,
                field,
                offset,
                length,
                total,
            })
    };
    let text = |field: Field, at: u64, max: usize| -> Result<&'a str, ManifestError> {
        let bytes = span(field, at)?;
        let text = core::str::from_utf8(bytes).map_err(|_| ManifestError::BadUtf8 { vm, field })?;
        if text.len() > max || text.contains('\0') {
            return Err(ManifestError::BadString { vm, field });
        }
        Ok(text)
    };

    let format_code = word(0)?;
    let format = GuestFormat::from_code(format_code).ok_or(ManifestError::UnknownFormat {
        vm,
        code: format_code,
    })?;
    let paging_code = word(4)?;
    let paging = Paging::from_code(paging_code).ok_or(ManifestError::UnknownPaging {
        vm,
        code: paging_code,
    })?;
    let cpus = word(8)?;
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(ManifestError::BadCpuCount { vm, cpus });
    }
    if cpus > 1 && paging == Paging::Shadow {
        return Err(ManifestError::SmpNeedsNestedPaging { vm, cpus });
    }
    let flags = word(12)?;
    if flags & !(FLAG_TRACE | FLAG_INITRD) != 0 {
        return Err(ManifestError::UnknownFlags { vm, flags });
    }
    let memory_bytes = quad(16)?;
    if memory_bytes == 0 {
        return Err(ManifestError::ZeroMemory { vm });
    }
    let name = text(Field::Name, record + 24, MAX_NAME_LEN)?;
    if !is_valid_vm_name(name) {
        return Err(ManifestError::BadString {
            vm,
            field: Field::Name,
        });
    }
    let cmdline = text(Field::Cmdline, record + 40, MAX_CMDLINE_LEN)?;
    let kernel = span(Field::Kernel, record + 56)?;
    let module_table = quad(72)?;
    let module_count = word(80)?;
    if word(92)? != 0 {
        return Err(ManifestError::ReservedNotZero {
            offset: record + 92,
        });
    }
    let pin_count = word(84)?;
    if pin_count > 1 && pin_count != cpus {
        return Err(ManifestError::BadPinCount {
            vm,
            count: pin_count,
            cpus,
        });
    }
    // cpus <= MAX_CPUS, so the list fits its 16 bytes.
    let pin_bytes =
        reader
            .slice(record + 112, MAX_PIN_ENTRIES as u64)
            .ok_or(ManifestError::OutOfBounds {
                vm,
                field: Field::VmTable,
                offset: record + 112,
                length: MAX_PIN_ENTRIES as u64,
                total,
            })?;
    let (pin, unused) = pin_bytes.split_at(pin_count as usize);
    for (entry, &cpu) in (0u32..).zip(pin) {
        if cpu > MAX_HOST_CPU {
            return Err(ManifestError::BadPinCpu { vm, entry, cpu });
        }
    }
    if let Some(at) = unused.iter().position(|&byte| byte != 0) {
        return Err(ManifestError::ReservedNotZero {
            offset: record + 112 + (pin.len() + at) as u64,
        });
    }
    let time_limit_seconds = match word(88)? {
        0 => None,
        seconds if seconds <= MAX_TIME_LIMIT_SECONDS => Some(seconds),
        seconds => return Err(ManifestError::BadTimeLimit { vm, seconds }),
    };
    if module_count as usize > MAX_MODULES {
        return Err(ManifestError::TooManyModules {
            vm,
            count: module_count,
        });
    }
    let module_table_length = u64::from(module_count) * MODULE_RECORD_LEN as u64;
    if reader.slice(module_table, module_table_length).is_none() {
        return Err(ManifestError::OutOfBounds {
            vm,
            field: Field::ModuleTable,
            offset: module_table,
            length: module_table_length,
            total,
        });
    }
    let mut modules = Vec::with_capacity(module_count as usize);
    for index in 0..module_count {
        let module_record = module_table + u64::from(index) * MODULE_RECORD_LEN as u64;
        let name = text(Field::ModuleName(index), module_record, MAX_MODULE_NAME_LEN)?;
        let bytes = span(Field::ModuleBytes(index), module_record + 16)?;
        modules.push(Module { name, bytes });
    }
    let initrd = if flags & FLAG_INITRD != 0 {
        Some(span(Field::Initrd, record + 96)?)
    } else {
        // No initrd: the span must be all zeros.
        for reserved in [96u64, 104] {
            if quad(reserved)? != 0 {
                return Err(ManifestError::ReservedNotZero {
                    offset: record + reserved,
                });
            }
        }
        None
    };
    let disks = decode_disks(reader, vm, record, total)?;
    let nic = decode_nic(reader, vm, record, total)?;
    Ok(VmManifest {
        name,
        format,
        memory_bytes,
        cmdline,
        cpus,
        pin,
        time_limit_seconds,
        paging,
        trace: flags & FLAG_TRACE != 0,
        kernel,
        modules,
        initrd,
        disks,
        nic,
    })
}

/// Decodes the NIC fields (at 144) of the VM record at `record`.
fn decode_nic(
    reader: &Reader<'_>,
    vm: u32,
    record: u64,
    total: u64,
) -> Result<Option<NicManifest>, ManifestError> {
    let at = record + 144;
    let fields = reader.slice(at, 16).ok_or(ManifestError::OutOfBounds {
        vm,
        field: Field::VmTable,
        offset: at,
        length: 16,
        total,
    })?;
    let flags = u32::from_le_bytes([fields[0], fields[1], fields[2], fields[3]]);
    if flags & !NIC_FLAG_PRESENT != 0 {
        return Err(ManifestError::UnknownNicFlags { vm, flags });
    }
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&fields[4..10]);
    // Without a NIC the MAC is reserved too.
    let reserved_from = if flags & NIC_FLAG_PRESENT != 0 { 10 } else { 4 };
    if let Some(position) = fields[reserved_from..].iter().position(|&byte| byte != 0) {
        return Err(ManifestError::ReservedNotZero {
            offset: at + (reserved_from + position) as u64,
        });
    }
    if flags & NIC_FLAG_PRESENT == 0 {
        return Ok(None);
    }
    if !is_valid_nic_mac(mac) {
        return Err(ManifestError::BadNicMac { vm, mac });
    }
    Ok(Some(NicManifest { mac }))
}

/// Decodes the disk table of the VM record at `record`.
fn decode_disks<'a>(
    reader: &Reader<'a>,
    vm: u32,
    record: u64,
    total: u64,
) -> Result<Vec<DiskManifest<'a>>, ManifestError> {
    let out_of_bounds = |field: Field, offset: u64, length: u64| ManifestError::OutOfBounds {
        vm,
        field,
        offset,
        length,
        total,
    };
    let word = |at: u64| {
        reader
            .u32_at(at)
            .ok_or(out_of_bounds(Field::DiskTable, at, 4))
    };
    let quad = |at: u64| {
        reader
            .u64_at(at)
            .ok_or(out_of_bounds(Field::DiskTable, at, 8))
    };
    let span = |field: Field, at: u64| -> Result<&'a [u8], ManifestError> {
        let (offset, length) = (quad(at)?, quad(at + 8)?);
        reader
            .slice(offset, length)
            .ok_or(out_of_bounds(field, offset, length))
    };
    let text = |field: Field, at: u64, max: usize| -> Result<&'a str, ManifestError> {
        let text = core::str::from_utf8(span(field, at)?)
            .map_err(|_| ManifestError::BadUtf8 { vm, field })?;
        if text.len() > max || text.contains('\0') {
            return Err(ManifestError::BadString { vm, field });
        }
        Ok(text)
    };
    let reserved = |at: u64, length: u64| -> Result<(), ManifestError> {
        for offset in (at..at + length).step_by(8) {
            if quad(offset)? != 0 {
                return Err(ManifestError::ReservedNotZero { offset });
            }
        }
        Ok(())
    };

    let table = quad(record + 128)?;
    let count = word(record + 136)?;
    if word(record + 140)? != 0 {
        return Err(ManifestError::ReservedNotZero {
            offset: record + 140,
        });
    }
    if count as usize > MAX_DISKS {
        return Err(ManifestError::TooManyDisks { vm, count });
    }
    let table_length = u64::from(count) * DISK_RECORD_LEN as u64;
    if reader.slice(table, table_length).is_none() {
        return Err(out_of_bounds(Field::DiskTable, table, table_length));
    }
    let mut disks = Vec::with_capacity(count as usize);
    for disk in 0..count {
        let at = table + u64::from(disk) * DISK_RECORD_LEN as u64;
        let code = word(at)?;
        let flags = word(at + 4)?;
        if flags & !DISK_FLAG_WRITABLE != 0 {
            return Err(ManifestError::UnknownDiskFlags { vm, disk, flags });
        }
        reserved(at + 56, 8)?;
        let source = match code {
            1 => {
                reserved(at + 8, 16)?;
                reserved(at + 40, 16)?;
                let label = text(
                    Field::DiskLabel(disk),
                    at + 24,
                    4 * MAX_PARTITION_LABEL_UNITS,
                )?;
                if !is_valid_partition_label(label) {
                    return Err(ManifestError::BadString {
                        vm,
                        field: Field::DiskLabel(disk),
                    });
                }
                DiskSource::PartitionLabel(label)
            }
            2 => {
                reserved(at + 24, 32)?;
                let mut guid = [0u8; 16];
                guid.copy_from_slice(reader.slice(at + 8, 16).ok_or(out_of_bounds(
                    Field::DiskTable,
                    at + 8,
                    16,
                ))?);
                if guid == [0; 16] {
                    return Err(ManifestError::ZeroPartitionGuid { vm, disk });
                }
                DiskSource::PartitionGuid(guid)
            }
            3 => {
                reserved(at + 8, 16)?;
                let name = text(Field::DiskImageName(disk), at + 24, MAX_MODULE_NAME_LEN)?;
                let bytes = span(Field::DiskImage(disk), at + 40)?;
                if !bytes.len().is_multiple_of(DISK_SECTOR_SIZE) {
                    return Err(ManifestError::ImageNotWholeSectors {
                        vm,
                        disk,
                        length: bytes.len() as u64,
                    });
                }
                DiskSource::Image { name, bytes }
            }
            code => return Err(ManifestError::UnknownDiskKind { vm, disk, code }),
        };
        disks.push(DiskManifest {
            source,
            writable: flags & DISK_FLAG_WRITABLE != 0,
        });
    }
    Ok(disks)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest<'static> {
        Manifest {
            test_hook: TestHook::PageFault,
            vms: alloc::vec![
                VmManifest {
                    name: "basic",
                    format: GuestFormat::Flat64,
                    memory_bytes: 16 << 20,
                    cmdline: "",
                    cpus: 1,
                    pin: &[],
                    time_limit_seconds: None,
                    paging: Paging::Nested,
                    trace: false,
                    kernel: b"\xf4\xeb\xfe",
                    modules: Vec::new(),
                    initrd: None,
                    disks: Vec::new(),
                    nic: None,
                },
                VmManifest {
                    name: "mb-guest_2",
                    format: GuestFormat::Multiboot,
                    memory_bytes: 64 << 20,
                    cmdline: "console=ttyS0 quiet",
                    cpus: 4,
                    pin: &[3, 0, MAX_HOST_CPU, 1],
                    time_limit_seconds: Some(MAX_TIME_LIMIT_SECONDS),
                    paging: Paging::Nested,
                    trace: true,
                    kernel: b"ELF image bytes",
                    modules: alloc::vec![
                        Module {
                            name: "initrd.img",
                            bytes: b"module one",
                        },
                        Module {
                            name: "empty",
                            bytes: b"",
                        },
                    ],
                    initrd: None,
                    disks: alloc::vec![
                        DiskManifest {
                            source: DiskSource::PartitionLabel("vm-data"),
                            writable: true,
                        },
                        DiskManifest {
                            source: DiskSource::Image {
                                name: "readonly.img",
                                bytes: &[0x5A; 1024],
                            },
                            writable: false,
                        },
                    ],
                    nic: Some(NicManifest {
                        mac: [0x02, 0xf1, 0x1e, 0x72, 0x48, 0x19],
                    }),
                },
                VmManifest {
                    name: "linux",
                    format: GuestFormat::Linux,
                    memory_bytes: 256 << 20,
                    cmdline: "console=ttyS0 earlyprintk=serial",
                    cpus: 2,
                    pin: &[5],
                    time_limit_seconds: Some(1),
                    paging: Paging::Nested,
                    trace: false,
                    kernel: b"bzImage bytes",
                    modules: Vec::new(),
                    initrd: Some(b"initramfs.cpio.gz bytes"),
                    disks: alloc::vec![
                        DiskManifest {
                            source: DiskSource::PartitionGuid([
                                0x39, 0x33, 0xA6, 0x8D, 7, 0, 0xC0, 0x60, 0xC4, 0x36, 8, 0x3A,
                                0xC8, 0x23, 9, 8
                            ]),
                            writable: false,
                        },
                        DiskManifest {
                            source: DiskSource::PartitionLabel("shared-ro"),
                            writable: false,
                        },
                    ],
                    nic: Some(NicManifest {
                        mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
                    }),
                },
                VmManifest {
                    name: "linux-empty-initrd",
                    format: GuestFormat::Linux,
                    memory_bytes: 64 << 20,
                    cmdline: "",
                    cpus: 1,
                    pin: &[],
                    time_limit_seconds: Some(600),
                    paging: Paging::Shadow,
                    trace: true,
                    kernel: b"bzImage",
                    modules: Vec::new(),
                    initrd: Some(b""),
                    disks: Vec::new(),
                    nic: None,
                },
            ],
        }
    }

    #[test]
    fn round_trip() {
        for hook in [TestHook::None, TestHook::PageFault] {
            let manifest = Manifest {
                test_hook: hook,
                vms: Vec::new(),
            };
            let bytes = manifest.encode();
            assert_eq!(bytes.len(), HEADER_LEN);
            assert_eq!(Manifest::decode(&bytes), Ok(manifest));
        }
        let manifest = sample();
        let bytes = manifest.encode();
        assert_eq!(Manifest::decode(&bytes), Ok(manifest.clone()));
        // Ramdisk padding after the claimed length is ignored.
        let mut padded = bytes.clone();
        padded.extend_from_slice(&[0xAA; 4096]);
        assert_eq!(Manifest::decode(&padded), Ok(manifest));
    }

    #[test]
    fn images_are_borrowed_from_the_ramdisk() {
        let bytes = sample().encode();
        let decoded = Manifest::decode(&bytes).unwrap();
        let range = bytes.as_ptr_range();
        assert!(range.contains(&decoded.vms[1].kernel.as_ptr()));
        assert!(range.contains(&decoded.vms[1].modules[0].bytes.as_ptr()));
        assert!(range.contains(&decoded.vms[2].initrd.unwrap().as_ptr()));
    }

    #[test]
    fn linux_vm_with_an_initrd() {
        let manifest = sample();
        let bytes = manifest.encode();
        let decoded = Manifest::decode(&bytes).unwrap();
        let linux = &decoded.vms[2];
        assert_eq!(linux.format, GuestFormat::Linux);
        assert_eq!(linux.initrd, Some(&b"initramfs.cpio.gz bytes"[..]));
        assert_eq!(linux.cmdline, "console=ttyS0 earlyprintk=serial");
        // An empty initrd stays distinct from none.
        assert_eq!(decoded.vms[3].initrd, Some(&b""[..]));
        assert_eq!(decoded.vms[0].initrd, None);
        // On the wire: format code 3, flag bit 1, the span at 96.
        let record = HEADER_LEN + 2 * VM_RECORD_LEN;
        assert_eq!(bytes[record], 3);
        assert_eq!(bytes[record + 12], 0b10);
        assert_eq!(bytes[record + VM_RECORD_LEN + 12], 0b11);
        let length = u64::from_le_bytes(bytes[record + 104..record + 112].try_into().unwrap());
        assert_eq!(length, 23);
        // Version 2 and 3 manifests are refused, not misread.
        for old in [2, 3] {
            let mut old_version = bytes.clone();
            old_version[8] = old;
            assert_eq!(
                Manifest::decode(&old_version),
                Err(ManifestError::UnsupportedVersion(u32::from(old)))
            );
        }
        // An initrd span outside the manifest.
        let mut outside = bytes.clone();
        patch_u64(&mut outside, record + 104, u64::MAX);
        assert!(matches!(
            Manifest::decode(&outside),
            Err(ManifestError::OutOfBounds {
                vm: 2,
                field: Field::Initrd,
                ..
            })
        ));
    }

    #[test]
    fn refuses_bad_header() {
        let good = Manifest {
            test_hook: TestHook::PageFault,
            vms: Vec::new(),
        }
        .encode();
        assert_eq!(
            Manifest::decode(&good[..10]),
            Err(ManifestError::TooShort { length: 10 })
        );
        let mut bad_magic = good.clone();
        bad_magic[0] = b'X';
        assert_eq!(Manifest::decode(&bad_magic), Err(ManifestError::BadMagic));
        let mut bad_version = good.clone();
        bad_version[8] = 9;
        assert_eq!(
            Manifest::decode(&bad_version),
            Err(ManifestError::UnsupportedVersion(9))
        );
        let mut old_version = good.clone();
        old_version[8] = 1;
        assert_eq!(
            Manifest::decode(&old_version),
            Err(ManifestError::UnsupportedVersion(1))
        );
        let mut bad_length = good.clone();
        bad_length[16] = 200;
        assert_eq!(
            Manifest::decode(&bad_length),
            Err(ManifestError::LengthMismatch {
                claimed: 200,
                available: HEADER_LEN
            })
        );
        let mut short_length = good.clone();
        short_length[16] = 8;
        assert!(matches!(
            Manifest::decode(&short_length),
            Err(ManifestError::LengthMismatch { claimed: 8, .. })
        ));
        let mut bad_hook = good.clone();
        bad_hook[12] = 7;
        assert_eq!(
            Manifest::decode(&bad_hook),
            Err(ManifestError::UnknownTestHook(7))
        );
        let mut reserved = good.clone();
        reserved[29] = 1;
        assert_eq!(
            Manifest::decode(&reserved),
            Err(ManifestError::ReservedNotZero { offset: 28 })
        );
        let mut too_many = good.clone();
        too_many[24] = 65;
        assert_eq!(
            Manifest::decode(&too_many),
            Err(ManifestError::TooManyVms { count: 65 })
        );
        let mut table_outside = good;
        table_outside[24] = 1;
        assert!(matches!(
            Manifest::decode(&table_outside),
            Err(ManifestError::OutOfBounds {
                field: Field::VmTable,
                ..
            })
        ));
    }

    fn patch_u32(bytes: &mut [u8], offset: usize, value: u32) {
        bytes[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
    }

    fn patch_u64(bytes: &mut [u8], offset: usize, value: u64) {
        bytes[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
    }

    #[test]
    fn refuses_bad_vm_records() {
        let good = sample().encode();
        let vm1 = HEADER_LEN + VM_RECORD_LEN;
        let check = |offset: usize, value: u32, expected: ManifestError| {
            let mut bytes = good.clone();
            patch_u32(&mut bytes, offset, value);
            assert_eq!(Manifest::decode(&bytes), Err(expected));
        };
        check(vm1, 4, ManifestError::UnknownFormat { vm: 1, code: 4 });
        check(vm1, 0, ManifestError::UnknownFormat { vm: 1, code: 0 });
        check(vm1 + 4, 2, ManifestError::UnknownPaging { vm: 1, code: 2 });
        check(vm1 + 8, 0, ManifestError::BadCpuCount { vm: 1, cpus: 0 });
        check(
            vm1 + 8,
            MAX_CPUS + 1,
            ManifestError::BadCpuCount {
                vm: 1,
                cpus: MAX_CPUS + 1,
            },
        );
        check(vm1 + 12, 5, ManifestError::UnknownFlags { vm: 1, flags: 5 });
        // No initrd flag: the initrd span must be zero.
        check(
            vm1 + 100,
            1,
            ManifestError::ReservedNotZero {
                offset: vm1 as u64 + 96,
            },
        );
        check(
            vm1 + 108,
            1,
            ManifestError::ReservedNotZero {
                offset: vm1 as u64 + 104,
            },
        );
        check(
            vm1 + 80,
            65,
            ManifestError::TooManyModules { vm: 1, count: 65 },
        );
        check(
            vm1 + 92,
            1,
            ManifestError::ReservedNotZero {
                offset: vm1 as u64 + 92,
            },
        );
        let mut zero_memory = good.clone();
        patch_u64(&mut zero_memory, vm1 + 16, 0);
        assert_eq!(
            Manifest::decode(&zero_memory),
            Err(ManifestError::ZeroMemory { vm: 1 })
        );
        let mut kernel_outside = good.clone();
        patch_u64(&mut kernel_outside, vm1 + 56, u64::MAX - 2);
        assert!(matches!(
            Manifest::decode(&kernel_outside),
            Err(ManifestError::OutOfBounds {
                vm: 1,
                field: Field::Kernel,
                ..
            })
        ));
        let mut huge_length = good.clone();
        patch_u64(&mut huge_length, vm1 + 64, u64::MAX);
        assert!(matches!(
            Manifest::decode(&huge_length),
            Err(ManifestError::OutOfBounds {
                field: Field::Kernel,
                ..
            })
        ));
    }

    #[test]
    fn smp_fields_round_trip_and_sit_where_the_layout_says() {
        let manifest = sample();
        let bytes = manifest.encode();
        let decoded = Manifest::decode(&bytes).unwrap();
        assert_eq!(decoded, manifest);
        let smp = &decoded.vms[1];
        assert_eq!(smp.cpus, 4);
        assert_eq!(smp.pin, [3, 0, 63, 1]);
        assert_eq!(smp.time_limit_seconds, Some(86_400));
        // The pin list is borrowed from the VM record.
        assert!(bytes.as_ptr_range().contains(&smp.pin.as_ptr()));
        let vm1 = HEADER_LEN + VM_RECORD_LEN;
        assert_eq!(bytes[vm1 + 8], 4);
        assert_eq!(bytes[vm1 + 84], 4);
        assert_eq!(&bytes[vm1 + 88..vm1 + 92], &86_400u32.to_le_bytes());
        assert_eq!(
            &bytes[vm1 + 112..vm1 + 128],
            &[3, 0, 63, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        // Not pinned, no limit: all zero.
        let vm0 = HEADER_LEN;
        assert_eq!(decoded.vms[0].pin, [] as [u8; 0]);
        assert_eq!(decoded.vms[0].time_limit_seconds, None);
        assert!(bytes[vm0 + 84..vm0 + 92].iter().all(|&byte| byte == 0));
        assert!(bytes[vm0 + 112..vm0 + 128].iter().all(|&byte| byte == 0));
        // One entry pins every vCPU; none pins nothing.
        let linux = &decoded.vms[2];
        assert_eq!(linux.time_limit_seconds, Some(1));
        assert_eq!(
            [0, 1, 2].map(|vcpu| linux.pinned_cpu(vcpu)),
            [Some(5), Some(5), None]
        );
        assert_eq!(
            [0, 1, 2, 3, 4].map(|vcpu| smp.pinned_cpu(vcpu)),
            [Some(3), Some(0), Some(63), Some(1), None]
        );
        assert_eq!(decoded.vms[0].pinned_cpu(0), None);
        // The most vCPUs a manifest may carry.
        let full = Manifest {
            test_hook: TestHook::None,
            vms: (0..4)
                .map(|_| VmManifest {
                    cpus: MAX_CPUS,
                    pin: &[7; MAX_CPUS as usize],
                    ..manifest.vms[0].clone()
                })
                .collect(),
        };
        assert_eq!(Manifest::decode(&full.encode()), Ok(full));
        // An unchecked pin list longer than the record's room is refused, not written over
        // the next record.
        let long = Manifest {
            test_hook: TestHook::None,
            vms: alloc::vec![VmManifest {
                cpus: MAX_CPUS,
                pin: &[1; MAX_CPUS as usize + 1],
                ..manifest.vms[0].clone()
            }],
        };
        assert_eq!(
            Manifest::decode(&long.encode()),
            Err(ManifestError::BadPinCount {
                vm: 0,
                count: MAX_CPUS + 1,
                cpus: MAX_CPUS
            })
        );
    }

    #[test]
    fn refuses_bad_smp_fields() {
        let good = sample().encode();
        let vm0 = HEADER_LEN;
        let vm1 = HEADER_LEN + VM_RECORD_LEN;
        let vm3 = HEADER_LEN + 3 * VM_RECORD_LEN;
        let check = |patches: &[(usize, u32)], expected: ManifestError| {
            let mut bytes = good.clone();
            for &(offset, value) in patches {
                patch_u32(&mut bytes, offset, value);
            }
            assert_eq!(Manifest::decode(&bytes), Err(expected));
        };
        check(
            &[(vm1 + 8, MAX_CPUS + 1)],
            ManifestError::BadCpuCount {
                vm: 1,
                cpus: MAX_CPUS + 1,
            },
        );
        // vm #3 has shadow paging.
        check(
            &[(vm3 + 8, 2)],
            ManifestError::SmpNeedsNestedPaging { vm: 3, cpus: 2 },
        );
        check(
            &[(vm1 + 84, 3)],
            ManifestError::BadPinCount {
                vm: 1,
                count: 3,
                cpus: 4,
            },
        );
        check(
            &[(vm1 + 84, 17)],
            ManifestError::BadPinCount {
                vm: 1,
                count: 17,
                cpus: 4,
            },
        );
        check(
            &[(vm1 + 84, u32::MAX)],
            ManifestError::BadPinCount {
                vm: 1,
                count: u32::MAX,
                cpus: 4,
            },
        );
        // Two entries for one vCPU.
        check(
            &[(vm0 + 84, 2)],
            ManifestError::BadPinCount {
                vm: 0,
                count: 2,
                cpus: 1,
            },
        );
        // Fewer vCPUs than pin entries.
        check(
            &[(vm1 + 8, 3)],
            ManifestError::BadPinCount {
                vm: 1,
                count: 4,
                cpus: 3,
            },
        );
        check(
            &[(vm1 + 112, 0x0040_0000)],
            ManifestError::BadPinCpu {
                vm: 1,
                entry: 2,
                cpu: 64,
            },
        );
        check(
            &[(vm1 + 112, 0xFF)],
            ManifestError::BadPinCpu {
                vm: 1,
                entry: 0,
                cpu: 255,
            },
        );
        // Bytes past the pin count are reserved.
        check(
            &[(vm1 + 124, 1 << 24)],
            ManifestError::ReservedNotZero {
                offset: vm1 as u64 + 127,
            },
        );
        check(
            &[(vm0 + 112, 1)],
            ManifestError::ReservedNotZero {
                offset: vm0 as u64 + 112,
            },
        );
        check(
            &[(vm1 + 88, MAX_TIME_LIMIT_SECONDS + 1)],
            ManifestError::BadTimeLimit {
                vm: 1,
                seconds: MAX_TIME_LIMIT_SECONDS + 1,
            },
        );
        check(
            &[(vm1 + 88, u32::MAX)],
            ManifestError::BadTimeLimit {
                vm: 1,
                seconds: u32::MAX,
            },
        );
        // At most MAX_TOTAL_CPUS over all VMs (4 VMs of 16 are fine, see above): 5 of 13 is 65.
        let basic = sample().vms.swap_remove(0);
        let too_many = Manifest {
            test_hook: TestHook::None,
            vms: alloc::vec![VmManifest { cpus: 13, ..basic }; 5],
        };
        assert_eq!(
            Manifest::decode(&too_many.encode()),
            Err(ManifestError::TooManyCpus { total: 65 })
        );
    }

    #[test]
    fn refuses_bad_strings() {
        let good = sample().encode();
        let decoded = Manifest::decode(&good).unwrap();
        let name_offset = decoded.vms[1].name.as_ptr() as usize - good.as_ptr() as usize;
        let mut bad_utf8 = good.clone();
        bad_utf8[name_offset] = 0xFF;
        assert_eq!(
            Manifest::decode(&bad_utf8),
            Err(ManifestError::BadUtf8 {
                vm: 1,
                field: Field::Name
            })
        );
        let mut bad_name = good.clone();
        bad_name[name_offset] = b' ';
        assert_eq!(
            Manifest::decode(&bad_name),
            Err(ManifestError::BadString {
                vm: 1,
                field: Field::Name
            })
        );
        let cmdline_offset = decoded.vms[1].cmdline.as_ptr() as usize - good.as_ptr() as usize;
        let mut nul = good.clone();
        nul[cmdline_offset] = 0;
        assert_eq!(
            Manifest::decode(&nul),
            Err(ManifestError::BadString {
                vm: 1,
                field: Field::Cmdline
            })
        );
        let module_name = decoded.vms[1].modules[0].name.as_ptr() as usize - good.as_ptr() as usize;
        let mut bad_module = good.clone();
        bad_module[module_name] = 0xC0;
        assert_eq!(
            Manifest::decode(&bad_module),
            Err(ManifestError::BadUtf8 {
                vm: 1,
                field: Field::ModuleName(0)
            })
        );
    }

    #[test]
    fn errors_display() {
        let error = ManifestError::OutOfBounds {
            vm: 2,
            field: Field::ModuleBytes(1),
            offset: 0x40,
            length: 0x10,
            total: 0x20,
        };
        assert_eq!(
            alloc::format!("{error}"),
            "manifest vm #2: module #1 bytes at offset 0x40 length 0x10 lies outside the manifest's 0x20 bytes"
        );
        for (error, text) in [
            (
                ManifestError::SmpNeedsNestedPaging { vm: 3, cpus: 2 },
                "manifest vm #3: 2 vCPUs with shadow paging (guest SMP needs nested paging)",
            ),
            (
                ManifestError::TooManyCpus { total: 65 },
                "manifest lists 65 vCPUs over all VMs, at most 64 are allowed",
            ),
            (
                ManifestError::BadPinCount {
                    vm: 1,
                    count: 3,
                    cpus: 4,
                },
                "manifest vm #1: 3 pin entries for 4 vCPUs (0, 1 or 4 are allowed)",
            ),
            (
                ManifestError::BadPinCpu {
                    vm: 1,
                    entry: 2,
                    cpu: 64,
                },
                "manifest vm #1: pin entry #2 is host CPU 64, not in 0..=63",
            ),
            (
                ManifestError::BadTimeLimit {
                    vm: 0,
                    seconds: 86_401,
                },
                "manifest vm #0: time limit of 86401 seconds is above 86400",
            ),
            (
                ManifestError::BadCpuCount { vm: 0, cpus: 17 },
                "manifest vm #0: 17 vCPUs is not in 1..=16",
            ),
        ] {
            assert_eq!(alloc::format!("{error}"), text);
        }
    }

    #[test]
    fn truncations_and_flips_never_panic() {
        let good = sample().encode();
        for length in 0..good.len() {
            // Every truncation is refused (the claimed length no longer fits).
            assert!(
                Manifest::decode(&good[..length]).is_err(),
                "length {length}"
            );
        }
        // A small deterministic generator (xorshift) for byte flips.
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let mut bytes = good.clone();
            for _ in 0..(next() % 4 + 1) {
                let position = (next() % bytes.len() as u64) as usize;
                bytes[position] = next() as u8;
            }
            let _ = Manifest::decode(&bytes);
        }
        // Every single-byte change in the header and tables, to a few interesting values.
        let tables_end =
            HEADER_LEN + 4 * VM_RECORD_LEN + 2 * MODULE_RECORD_LEN + 4 * DISK_RECORD_LEN;
        for position in 0..tables_end {
            for value in [0x00, 0x01, 0x7F, 0x80, 0xFF] {
                let mut bytes = good.clone();
                bytes[position] = value;
                let _ = Manifest::decode(&bytes);
            }
        }
    }

    #[test]
    fn disks_round_trip_and_sit_where_the_layout_says() {
        let manifest = sample();
        let bytes = manifest.encode();
        let decoded = Manifest::decode(&bytes).unwrap();
        assert_eq!(decoded, manifest);
        assert!(decoded.vms[0].disks.is_empty());
        let vm1 = HEADER_LEN + VM_RECORD_LEN;
        let table = u64::from_le_bytes(bytes[vm1 + 128..vm1 + 136].try_into().unwrap()) as usize;
        assert_eq!(
            table,
            HEADER_LEN + 4 * VM_RECORD_LEN + 2 * MODULE_RECORD_LEN
        );
        assert_eq!(&bytes[vm1 + 136..vm1 + 144], &[2, 0, 0, 0, 0, 0, 0, 0]);
        // Disk 0: a writable label; disk 1: a read-only image.
        assert_eq!(&bytes[table..table + 8], &[1, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(&bytes[table + 64..table + 72], &[3, 0, 0, 0, 0, 0, 0, 0]);
        let DiskSource::Image { bytes: image, .. } = decoded.vms[1].disks[1].source else {
            panic!("not an image");
        };
        // The image is borrowed from the manifest, 8-byte aligned.
        assert!(bytes.as_ptr_range().contains(&image.as_ptr()));
        assert_eq!((image.as_ptr() as usize - bytes.as_ptr() as usize) % 8, 0);
        // vm #2's GUID disk: the 16 bytes at 8.
        let vm2 = vm1 + VM_RECORD_LEN;
        let table2 = u64::from_le_bytes(bytes[vm2 + 128..vm2 + 136].try_into().unwrap()) as usize;
        assert_eq!(table2, table + 2 * DISK_RECORD_LEN);
        assert_eq!(bytes[table2], 2);
        assert_eq!(bytes[table2 + 8], 0x39);
        assert!(bytes[table2 + 24..table2 + 64].iter().all(|&b| b == 0));
        // Read-only partitions may be shared; the most disks a VM may have round-trip.
        let four = Manifest {
            test_hook: TestHook::None,
            vms: alloc::vec![
                VmManifest {
                    disks: alloc::vec![manifest.vms[2].disks[1]; MAX_DISKS],
                    ..manifest.vms[0].clone()
                },
                VmManifest {
                    name: "other",
                    disks: alloc::vec![manifest.vms[2].disks[1]],
                    ..manifest.vms[0].clone()
                },
            ],
        };
        assert_eq!(Manifest::decode(&four.encode()), Ok(four));
    }

    #[test]
    fn refuses_bad_disks() {
        let good = sample().encode();
        let vm1 = HEADER_LEN + VM_RECORD_LEN;
        let table = HEADER_LEN + 4 * VM_RECORD_LEN + 2 * MODULE_RECORD_LEN;
        let (label_disk, image_disk, guid_disk) = (table, table + 64, table + 128);
        let check = |patches: &[(usize, u32)], expected: ManifestError| {
            let mut bytes = good.clone();
            for &(offset, value) in patches {
                patch_u32(&mut bytes, offset, value);
            }
            assert_eq!(Manifest::decode(&bytes), Err(expected));
        };
        check(
            &[(vm1 + 136, 5)],
            ManifestError::TooManyDisks { vm: 1, count: 5 },
        );
        check(
            &[(vm1 + 140, 1)],
            ManifestError::ReservedNotZero {
                offset: vm1 as u64 + 140,
            },
        );
        check(
            &[(label_disk, 4)],
            ManifestError::UnknownDiskKind {
                vm: 1,
                disk: 0,
                code: 4,
            },
        );
        check(
            &[(label_disk, 0)],
            ManifestError::UnknownDiskKind {
                vm: 1,
                disk: 0,
                code: 0,
            },
        );
        check(
            &[(image_disk + 4, 2)],
            ManifestError::UnknownDiskFlags {
                vm: 1,
                disk: 1,
                flags: 2,
            },
        );
        check(
            &[(image_disk + 60, 1)],
            ManifestError::ReservedNotZero {
                offset: image_disk as u64 + 56,
            },
        );
        // A label disk with a GUID, a GUID disk with a span.
        check(
            &[(label_disk + 8, 1)],
            ManifestError::ReservedNotZero {
                offset: label_disk as u64 + 8,
            },
        );
        check(
            &[(guid_disk + 24, 1)],
            ManifestError::ReservedNotZero {
                offset: guid_disk as u64 + 24,
            },
        );
        check(
            &[
                (guid_disk + 8, 0),
                (guid_disk + 12, 0),
                (guid_disk + 16, 0),
                (guid_disk + 20, 0),
            ],
            ManifestError::ZeroPartitionGuid { vm: 2, disk: 0 },
        );
        // Turning the GUID disk into a label disk: its (zero) label span is empty.
        check(
            &[
                (guid_disk, 1),
                (guid_disk + 8, 0),
                (guid_disk + 12, 0),
                (guid_disk + 16, 0),
                (guid_disk + 20, 0),
            ],
            ManifestError::BadString {
                vm: 2,
                field: Field::DiskLabel(0),
            },
        );
        // An image of 1023 bytes.
        let mut bytes = good.clone();
        patch_u64(&mut bytes, image_disk + 48, 1023);
        assert_eq!(
            Manifest::decode(&bytes),
            Err(ManifestError::ImageNotWholeSectors {
                vm: 1,
                disk: 1,
                length: 1023
            })
        );
        let mut bytes = good.clone();
        patch_u64(&mut bytes, image_disk + 48, u64::MAX);
        assert!(matches!(
            Manifest::decode(&bytes),
            Err(ManifestError::OutOfBounds {
                vm: 1,
                field: Field::DiskImage(1),
                ..
            })
        ));
        let mut bytes = good.clone();
        patch_u64(&mut bytes, vm1 + 128, u64::MAX - 8);
        assert!(matches!(
            Manifest::decode(&bytes),
            Err(ManifestError::OutOfBounds {
                vm: 1,
                field: Field::DiskTable,
                ..
            })
        ));
        // A label of 37 UTF-16 units is refused.
        let long = "x".repeat(MAX_PARTITION_LABEL_UNITS + 1);
        let mut manifest = sample();
        manifest.vms[1].disks[0].source = DiskSource::PartitionLabel(&long);
        assert_eq!(
            Manifest::decode(&manifest.encode()),
            Err(ManifestError::BadString {
                vm: 1,
                field: Field::DiskLabel(0)
            })
        );
    }

    #[test]
    fn refuses_a_writable_partition_named_twice() {
        let writable = DiskManifest {
            source: DiskSource::PartitionLabel("vm-data"),
            writable: true,
        };
        let read_only = DiskManifest {
            writable: false,
            ..writable
        };
        let guid = DiskManifest {
            source: DiskSource::PartitionGuid([7; 16]),
            writable: true,
        };
        let base = sample().vms.swap_remove(0);
        let manifest =
            |first: Vec<DiskManifest<'static>>, second: Vec<DiskManifest<'static>>| Manifest {
                test_hook: TestHook::None,
                vms: alloc::vec![
                    VmManifest {
                        disks: first,
                        ..base.clone()
                    },
                    VmManifest {
                        name: "second",
                        disks: second,
                        ..base.clone()
                    },
                ],
            };
        let shared = |vm, disk, other_vm, other_disk| {
            Err(ManifestError::SharedWritablePartition {
                vm,
                disk,
                other_vm,
                other_disk,
            })
        };
        let decode = |m: Manifest<'_>| Manifest::decode(&m.encode()).map(|_| ());
        assert_eq!(
            decode(manifest(alloc::vec![writable], alloc::vec![read_only])),
            shared(1, 0, 0, 0)
        );
        assert_eq!(
            decode(manifest(
                alloc::vec![read_only],
                alloc::vec![guid, writable]
            )),
            shared(1, 1, 0, 0)
        );
        assert_eq!(
            decode(manifest(alloc::vec![guid, writable, guid], Vec::new())),
            shared(0, 2, 0, 0)
        );
        assert_eq!(
            decode(manifest(
                alloc::vec![read_only, guid],
                alloc::vec![read_only]
            )),
            Ok(())
        );
        // A disk count above MAX_DISKS is refused, not read past its table.
        assert_eq!(
            decode(manifest(alloc::vec![read_only; MAX_DISKS + 1], Vec::new())),
            Err(ManifestError::TooManyDisks { vm: 0, count: 5 })
        );
        assert_eq!(
            alloc::format!("{}", shared(1, 0, 0, 2).unwrap_err()),
            "manifest vm #1: disk #0 names the same partition as vm #0 disk #2, and one of them is writable"
        );
    }

    #[test]
    fn nics_round_trip_and_sit_where_the_layout_says() {
        let manifest = sample();
        let bytes = manifest.encode();
        let decoded = Manifest::decode(&bytes).unwrap();
        assert_eq!(decoded, manifest);
        assert_eq!(decoded.vms[0].nic, None);
        assert_eq!(
            decoded.vms[1].nic,
            Some(NicManifest {
                mac: [0x02, 0xf1, 0x1e, 0x72, 0x48, 0x19]
            })
        );
        // On the wire: the flags at 144, the MAC at 148, then 6 reserved bytes.
        let vm1 = HEADER_LEN + VM_RECORD_LEN;
        assert_eq!(&bytes[vm1 + 144..vm1 + 148], &[1, 0, 0, 0]);
        assert_eq!(
            &bytes[vm1 + 148..vm1 + 154],
            &[0x02, 0xf1, 0x1e, 0x72, 0x48, 0x19]
        );
        assert!(bytes[vm1 + 154..vm1 + 160].iter().all(|&byte| byte == 0));
        // No NIC: all 16 bytes zero.
        assert!(bytes[HEADER_LEN + 144..HEADER_LEN + 160]
            .iter()
            .all(|&byte| byte == 0));
        // A version 5 manifest (144-byte records, no NIC) is refused, not misread.
        let mut old = bytes.clone();
        old[8] = 5;
        assert_eq!(
            Manifest::decode(&old),
            Err(ManifestError::UnsupportedVersion(5))
        );
        // Any unicast, non-zero MAC is accepted, globally administered ones too.
        let mut global = sample();
        global.vms[0].nic = Some(NicManifest {
            mac: [0x00, 0x00, 0x00, 0x00, 0x00, 0x01],
        });
        assert_eq!(Manifest::decode(&global.encode()), Ok(global));
    }

    #[test]
    fn refuses_bad_nics() {
        let good = sample().encode();
        let (vm0, vm1) = (HEADER_LEN, HEADER_LEN + VM_RECORD_LEN);
        let check = |patches: &[(usize, u8)], expected: ManifestError| {
            let mut bytes = good.clone();
            for &(offset, value) in patches {
                bytes[offset] = value;
            }
            assert_eq!(Manifest::decode(&bytes), Err(expected));
        };
        // Flag bits other than "present", with and without it.
        check(
            &[(vm1 + 144, 3)],
            ManifestError::UnknownNicFlags { vm: 1, flags: 3 },
        );
        check(
            &[(vm0 + 147, 0x80)],
            ManifestError::UnknownNicFlags {
                vm: 0,
                flags: 0x8000_0000,
            },
        );
        // A MAC without the present flag; reserved bytes after the MAC.
        check(
            &[(vm0 + 148, 0x02)],
            ManifestError::ReservedNotZero {
                offset: vm0 as u64 + 148,
            },
        );
        check(
            &[(vm1 + 159, 1)],
            ManifestError::ReservedNotZero {
                offset: vm1 as u64 + 159,
            },
        );
        // Multicast, broadcast and all-zero MACs.
        check(
            &[(vm1 + 148, 0x03)],
            ManifestError::BadNicMac {
                vm: 1,
                mac: [0x03, 0xf1, 0x1e, 0x72, 0x48, 0x19],
            },
        );
        let broadcast: Vec<(usize, u8)> = (148..154).map(|at| (vm1 + at, 0xFF)).collect();
        check(
            &broadcast,
            ManifestError::BadNicMac {
                vm: 1,
                mac: [0xFF; 6],
            },
        );
        let zero: Vec<(usize, u8)> = (148..154).map(|at| (vm1 + at, 0)).collect();
        check(&zero, ManifestError::BadNicMac { vm: 1, mac: [0; 6] });
        // The present flag on a VM whose MAC is zero.
        check(
            &[(vm0 + 144, 1)],
            ManifestError::BadNicMac { vm: 0, mac: [0; 6] },
        );
        assert_eq!(
            alloc::format!(
                "{}",
                ManifestError::BadNicMac {
                    vm: 1,
                    mac: [0x03, 0, 0, 0, 0, 0x0a]
                }
            ),
            "manifest vm #1: NIC MAC address 03:00:00:00:00:0a is not unicast or is all zero"
        );
        assert_eq!(
            alloc::format!("{}", ManifestError::UnknownNicFlags { vm: 2, flags: 2 }),
            "manifest vm #2: NIC has unknown flag bits 0x2"
        );
    }

    #[test]
    fn refuses_the_same_mac_on_two_vms() {
        let mut manifest = sample();
        let web = manifest.vms[1].nic;
        // vm #3 takes vm #1's MAC: refused on the later VM, naming the earlier.
        manifest.vms[3].nic = web;
        assert_eq!(
            Manifest::decode(&manifest.encode()),
            Err(ManifestError::DuplicateNicMac {
                vm: 3,
                other_vm: 1,
                mac: [0x02, 0xf1, 0x1e, 0x72, 0x48, 0x19]
            })
        );
        // Also when the earlier VM is vm #0 and the later one is next to it.
        let mut manifest = sample();
        manifest.vms[0].nic = web;
        assert_eq!(
            Manifest::decode(&manifest.encode()),
            Err(ManifestError::DuplicateNicMac {
                vm: 1,
                other_vm: 0,
                mac: [0x02, 0xf1, 0x1e, 0x72, 0x48, 0x19]
            })
        );
        // MACs that differ in one bit are distinct.
        let mut manifest = sample();
        manifest.vms[3].nic = Some(NicManifest {
            mac: [0x02, 0xf1, 0x1e, 0x72, 0x48, 0x18],
        });
        assert_eq!(Manifest::decode(&manifest.encode()), Ok(manifest));
        assert_eq!(
            alloc::format!(
                "{}",
                ManifestError::DuplicateNicMac {
                    vm: 3,
                    other_vm: 1,
                    mac: [0x02, 0xf1, 0x1e, 0x72, 0x48, 0x19]
                }
            ),
            "manifest vm #3: NIC MAC address 02:f1:1e:72:48:19 is also the MAC address of vm #1's NIC"
        );
    }

    #[test]
    fn nic_macs() {
        assert!(is_valid_nic_mac([0x02, 0, 0, 0, 0, 1]));
        assert!(is_valid_nic_mac([0x00, 0x1b, 0x21, 0, 0, 0]));
        assert!(!is_valid_nic_mac([0x01, 0, 0x5e, 0, 0, 1]));
        assert!(!is_valid_nic_mac([0xFF; 6]));
        assert!(!is_valid_nic_mac([0; 6]));
        assert_eq!(
            alloc::format!("{}", MacText([0x02, 0xAB, 0, 0x10, 0xff, 9])),
            "02:ab:00:10:ff:09"
        );
    }

    #[test]
    fn names() {
        assert_eq!(TestHook::from_name("page-fault"), Some(TestHook::PageFault));
        assert_eq!(TestHook::from_name("none"), Some(TestHook::None));
        assert_eq!(TestHook::from_name("nope"), None);
        assert_eq!(TestHook::from_name("net-probe"), Some(TestHook::NetProbe));
        assert_eq!(
            TestHook::from_code(TestHook::NetProbe.code()).ok(),
            Some(TestHook::NetProbe)
        );
        assert_eq!(
            GuestFormat::from_name("multiboot"),
            Some(GuestFormat::Multiboot)
        );
        assert_eq!(GuestFormat::from_name("flat64"), Some(GuestFormat::Flat64));
        assert_eq!(GuestFormat::from_name("linux"), Some(GuestFormat::Linux));
        for format in GuestFormat::ALL {
            assert_eq!(GuestFormat::from_code(format.code()), Some(format));
            assert_eq!(GuestFormat::from_name(format.name()), Some(format));
        }
        assert_eq!(GuestFormat::from_name("elf"), None);
        assert_eq!(Paging::from_name("shadow"), Some(Paging::Shadow));
        assert_eq!(Paging::default(), Paging::Nested);
        assert!(is_valid_vm_name("a-b_C9"));
        assert!(!is_valid_vm_name(""));
        assert!(!is_valid_vm_name("has space"));
        assert!(!is_valid_vm_name(&"x".repeat(33)));
    }
}
