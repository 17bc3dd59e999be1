//! The GUID Partition Table of the physical disk: reading and checking it (UEFI Specification
//! 2.10, chapter 5, "GUID Partition Table (GPT) Disk Layout"), finding a partition by label or
//! by GUID, and writing a fresh one (used by the host tool `boot/` and by the tests here, so
//! the reader and the writer share the on-disk structures).
//!
//! The on-disk structures (`GptHeader`, `GptPartitionEntry`, `MasterBootRecord`) come from
//! the `gpt_disk_types` crate (no_std, from google/gpt-disk-rs); the checks are ours, because
//! that crate only describes the layout. CRC32 is the `crc` crate's CRC-32/ISO-HDLC, the one
//! the spec means (See: UEFI 2.10 4.2, "EFI Table Header"), re-exported by `gpt_disk_types`.
//!
//! What [`read_gpt`] checks, in order (anything else is refused with a [`GptError`]):
//! 1. LBA 0 holds an MBR (signature 0x55 0xAA) with a protective record, OS type 0xEE
//!    (See: UEFI 2.10 5.2.3). A hybrid MBR (0xEE beside other records) is accepted.
//! 2. The primary header at LBA 1, per UEFI 2.10 5.3.2 "GPT Header": signature `EFI PART`,
//!    revision 1.x, `HeaderSize` in 92..=512, `HeaderCRC32` over `HeaderSize` bytes with the
//!    CRC field taken as zero, `MyLBA` is where the header was read, the usable range
//!    inside the disk and clear of both headers, `SizeOfPartitionEntry` = 128 x 2^n (at most
//!    [`MAX_ENTRY_SIZE`]), the array at most [`MAX_ENTRY_ARRAY_BYTES`] bytes, inside the disk
//!    and clear of LBA 0, both headers and the usable range, and `PartitionEntryArrayCRC32`
//!    over `NumberOfPartitionEntries * SizeOfPartitionEntry` bytes.
//! 3. If any of that fails, the same checks on the backup header at the disk's last LBA
//!    (See: UEFI 2.10 5.3.2: "If the primary GPT is corrupt, software must check the last
//!    LBA of the device"); the result says which one was used ([`HeaderSource`]). Nothing is
//!    repaired: this code never writes while reading.
//! 4. Every used entry (non-zero type GUID, See: UEFI 2.10 5.3.3): a non-zero unique GUID,
//!    `StartingLBA <= EndingLBA`, both inside the header's usable range, a UTF-16LE name
//!    (up to 36 code units, ended by the first NUL), no two partitions overlapping and no two
//!    sharing a unique GUID.
//!
//! The header's `Reserved` field and the bytes after `HeaderSize` are not checked (the spec's
//! validity test in 5.3.2 does not include them); `AlternateLBA` is reported, not enforced,
//! so a disk that was grown after partitioning still reads through its primary header.

use crate::{DiskError, SectorIo, SECTOR_SIZE};
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;
use gpt_disk_types::crc::{Crc, CRC_32_ISO_HDLC};
use gpt_disk_types::{
    GptHeader, GptHeaderRevision, GptHeaderSignature, GptPartitionAttributes, GptPartitionEntry,
    GptPartitionName, GptPartitionType, LbaLe, MasterBootRecord, U32Le, U64Le,
};

pub use gpt_disk_types::Guid;

/// The partition type GUID `boot/` gives the partitions it creates: "Linux filesystem data"
/// (the type `sgdisk` calls 8300).
pub const LINUX_FILESYSTEM_DATA: Guid =
    gpt_disk_types::guid!("0fc63daf-8483-4772-8e79-3d69d8477de4");
/// The smallest `HeaderSize` (the fields defined by revision 1.0).
pub const MIN_HEADER_SIZE: u32 = 92;
/// The largest `SizeOfPartitionEntry` accepted (128 x 2^n up to this).
pub const MAX_ENTRY_SIZE: u32 = 4096;
/// The largest partition entry array accepted, in bytes (the usual array is 16 KiB: 128
/// entries of 128 bytes).
pub const MAX_ENTRY_ARRAY_BYTES: u64 = 1 << 20;
/// The longest partition name, in UTF-16 code units (72 bytes, See: UEFI 2.10 Table 5.6).
pub const MAX_LABEL_UNITS: usize = 36;
/// Entries in the arrays [`write_gpt`] writes (16 KiB, the spec's minimum reserve).
pub const WRITTEN_ENTRY_COUNT: u32 = 128;
/// Sectors of each entry array [`write_gpt`] writes.
const WRITTEN_ARRAY_SECTORS: u64 = WRITTEN_ENTRY_COUNT as u64 * 128 / SECTOR_SIZE as u64;

const ENTRY_LEN: usize = core::mem::size_of::<GptPartitionEntry>();
const HEADER_LEN: usize = core::mem::size_of::<GptHeader>();
const _: () = assert!(ENTRY_LEN == 128);
const _: () = assert!(HEADER_LEN == MIN_HEADER_SIZE as usize);
const _: () = assert!(core::mem::size_of::<MasterBootRecord>() == SECTOR_SIZE);

/// The CRC of UEFI 2.10 4.2 (CRC-32/ISO-HDLC, polynomial 0x04C11DB7).
fn crc32(parts: &[&[u8]]) -> u32 {
    let crc = Crc::<u32>::new(&CRC_32_ISO_HDLC);
    let mut digest = crc.digest();
    for part in parts {
        digest.update(part);
    }
    digest.finalize()
}

/// Which GPT header a disk's table was read through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderSource {
    /// The primary header at LBA 1 (the normal case).
    Primary,
    /// The backup header at the last LBA, because the primary was refused for this reason.
    /// The disk should be repaired (e.g. `sgdisk -e` / gdisk's recovery menu); ringzero does
    /// not write a GPT at boot.
    Backup { primary_error: HeaderError },
}

/// Why one GPT header (with its entry array) was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderError {
    /// Reading the header or its array failed.
    Io(DiskError),
    /// The first 8 bytes are not `EFI PART`.
    BadSignature,
    /// A revision other than 1.x.
    UnsupportedRevision { revision: u32 },
    /// `HeaderSize` outside 92..=512.
    BadHeaderSize { size: u32 },
    /// The header's CRC32 does not match.
    BadHeaderCrc { stored: u32, computed: u32 },
    /// `MyLBA` is not the LBA the header was read from.
    WrongMyLba { stored: u64 },
    /// The usable range is empty, runs past the disk or covers a header.
    BadUsableRange { first: u64, last: u64 },
    /// `SizeOfPartitionEntry` is not 128 x 2^n up to [`MAX_ENTRY_SIZE`].
    BadEntrySize { size: u32 },
    /// The entry array is larger than [`MAX_ENTRY_ARRAY_BYTES`].
    TooManyEntries { count: u32, size: u32 },
    /// The entry array runs past the disk or overlaps LBA 0, a header or the usable range.
    BadEntryArrayPlace { first_lba: u64, sectors: u64 },
    /// The entry array's CRC32 does not match.
    BadEntryArrayCrc { stored: u32, computed: u32 },
}

impl fmt::Display for HeaderError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::Io(error) => write!(formatter, "read failed ({error:?})"),
            HeaderError::BadSignature => write!(formatter, "no \"EFI PART\" signature"),
            HeaderError::UnsupportedRevision { revision } => {
                write!(formatter, "revision {revision:#010x} is not 1.x")
            }
            HeaderError::BadHeaderSize { size } => {
                write!(formatter, "header size {size} is not in {MIN_HEADER_SIZE}..={SECTOR_SIZE}")
            }
            HeaderError::BadHeaderCrc { stored, computed } => write!(
                formatter,
                "header CRC32 is {stored:#010x}, the header's bytes give {computed:#010x}"
            ),
            HeaderError::WrongMyLba { stored } => {
                write!(formatter, "the header says it is at LBA {stored}")
            }
            HeaderError::BadUsableRange { first, last } => write!(
                formatter,
                "usable LBAs {first}..={last} are empty, past the disk or cover a header"
            ),
            HeaderError::BadEntrySize { size } => write!(
                formatter,
                "partition entry size {size} is not 128 x 2^n up to {MAX_ENTRY_SIZE}"
            ),
            HeaderError::TooManyEntries { count, size } => write!(
                formatter,
                "{count} partition entries of {size} bytes exceed {MAX_ENTRY_ARRAY_BYTES} bytes"
            ),
            HeaderError::BadEntryArrayPlace { first_lba, sectors } => write!(
                formatter,
                "the partition entry array ({sectors} sectors at LBA {first_lba}) is past the disk or overlaps a header or the usable LBAs"
            ),
            HeaderError::BadEntryArrayCrc { stored, computed } => write!(
                formatter,
                "partition entry array CRC32 is {stored:#010x}, its bytes give {computed:#010x}"
            ),
        }
    }
}

/// Why a disk's GPT was not accepted. Entry `index` numbers count from 0 in array order
/// (`sgdisk` numbers partitions from 1: index 0 is its partition 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GptError {
    /// The disk has fewer sectors than a GPT needs (MBR, two headers, usable space).
    DiskTooSmall { sectors: u64 },
    /// Reading LBA 0 failed.
    Io(DiskError),
    /// LBA 0 has no MBR signature or no protective (0xEE) record: not a GPT disk.
    NoProtectiveMbr,
    /// Neither header is valid.
    NoValidHeader {
        primary: HeaderError,
        backup: HeaderError,
    },
    /// A used entry's unique GUID is zero.
    ZeroPartitionGuid { index: u32 },
    /// Two used entries share a unique GUID.
    DuplicatePartitionGuid { first: u32, second: u32 },
    /// A used entry ends before it starts or lies outside the usable LBAs.
    PartitionOutOfRange {
        index: u32,
        first_lba: u64,
        last_lba: u64,
        first_usable: u64,
        last_usable: u64,
    },
    /// Two used entries share sectors.
    PartitionsOverlap { first: u32, second: u32 },
    /// A used entry's name is not valid UTF-16.
    BadName { index: u32 },
}

impl fmt::Display for GptError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GptError::DiskTooSmall { sectors } => {
                write!(formatter, "the disk has {sectors} sectors, too few for a GPT")
            }
            GptError::Io(error) => write!(formatter, "reading LBA 0 failed ({error:?})"),
            GptError::NoProtectiveMbr => write!(
                formatter,
                "LBA 0 has no protective MBR (signature 0x55AA with an 0xEE record): not a GPT disk"
            ),
            GptError::NoValidHeader { primary, backup } => write!(
                formatter,
                "no valid GPT header: primary (LBA 1): {primary}; backup (last LBA): {backup}"
            ),
            GptError::ZeroPartitionGuid { index } => {
                write!(formatter, "partition entry {index} has a zero unique GUID")
            }
            GptError::DuplicatePartitionGuid { first, second } => write!(
                formatter,
                "partition entries {first} and {second} have the same unique GUID"
            ),
            GptError::PartitionOutOfRange {
                index,
                first_lba,
                last_lba,
                first_usable,
                last_usable,
            } => write!(
                formatter,
                "partition entry {index} covers LBAs {first_lba}..={last_lba}, outside the usable {first_usable}..={last_usable}"
            ),
            GptError::PartitionsOverlap { first, second } => {
                write!(formatter, "partition entries {first} and {second} overlap")
            }
            GptError::BadName { index } => {
                write!(formatter, "partition entry {index} has a name that is not UTF-16")
            }
        }
    }
}

/// One used partition entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// The entry's index in the array, from 0 (`sgdisk`'s partition number minus 1).
    pub index: u32,
    pub type_guid: Guid,
    pub unique_guid: Guid,
    /// The first sector, inclusive.
    pub first_lba: u64,
    /// The last sector, inclusive.
    pub last_lba: u64,
    pub attributes: u64,
    /// The partition name (GPT label), as `sgdisk -p` prints it.
    pub label: String,
}

impl Partition {
    /// Sectors in the partition (never 0: `first_lba <= last_lba` was checked).
    pub fn sectors(&self) -> u64 {
        self.last_lba - self.first_lba + 1
    }
}

/// A checked GPT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GptTable {
    /// Which header the table came from.
    pub source: HeaderSource,
    pub disk_guid: Guid,
    /// The disk's size in sectors when it was read.
    pub disk_sectors: u64,
    pub first_usable_lba: u64,
    pub last_usable_lba: u64,
    /// Where the header says the other header is (not enforced, see the module doc).
    pub alternate_lba: u64,
    /// The used entries, in array order.
    pub partitions: Vec<Partition>,
}

/// The GUID's text the way `sgdisk`/`gdisk` print it (upper case, 8-4-4-4-12).
pub fn guid_text(guid: Guid) -> String {
    guid.to_ascii_hex_lower()
        .iter()
        .map(|byte| char::from(byte.to_ascii_uppercase()))
        .collect()
}

/// Parses a GUID's text (8-4-4-4-12 hex digits, either case, as `sgdisk -i` prints a
/// "Partition unique GUID").
pub fn parse_guid(text: &str) -> Option<Guid> {
    Guid::try_parse(text).ok()
}

/// What a VM's disk names: a partition by its GPT label or by its unique GUID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PartitionSelector {
    Label(String),
    Guid(Guid),
}

impl fmt::Display for PartitionSelector {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PartitionSelector::Label(label) => write!(formatter, "label \"{label}\""),
            PartitionSelector::Guid(guid) => write!(formatter, "GUID {}", guid_text(*guid)),
        }
    }
}

/// Why [`GptTable::find`] found no single partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LookupError {
    /// No partition matches; `labels` are the disk's partition labels, in array order.
    NotFound {
        wanted: PartitionSelector,
        labels: Vec<String>,
    },
    /// More than one partition has this label (`count` of them).
    AmbiguousLabel { label: String, count: usize },
}

impl fmt::Display for LookupError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LookupError::NotFound { wanted, labels } => {
                write!(formatter, "no partition with {wanted} on the disk")?;
                if labels.is_empty() {
                    write!(formatter, " (it has no partitions)")
                } else {
                    write!(formatter, " (its partitions: ")?;
                    for (number, label) in labels.iter().enumerate() {
                        let separator = if number == 0 { "" } else { ", " };
                        write!(formatter, "{separator}\"{label}\"")?;
                    }
                    write!(formatter, ")")
                }
            }
            LookupError::AmbiguousLabel { label, count } => write!(
                formatter,
                "{count} partitions have the label \"{label}\"; name it by GUID instead"
            ),
        }
    }
}

impl GptTable {
    /// The partition `selector` names: the only one with that label, or the one with that
    /// unique GUID (unique GUIDs were checked to be unique).
    pub fn find(&self, selector: &PartitionSelector) -> Result<&Partition, LookupError> {
        let mut matches = self.partitions.iter().filter(|partition| match selector {
            PartitionSelector::Label(label) => partition.label == *label,
            PartitionSelector::Guid(guid) => partition.unique_guid == *guid,
        });
        let Some(found) = matches.next() else {
            return Err(LookupError::NotFound {
                wanted: selector.clone(),
                labels: self.labels(),
            });
        };
        match (selector, matches.count()) {
            (PartitionSelector::Label(label), others @ 1..) => Err(LookupError::AmbiguousLabel {
                label: label.clone(),
                count: others + 1,
            }),
            _ => Ok(found),
        }
    }

    /// The partitions' labels, in array order.
    pub fn labels(&self) -> Vec<String> {
        self.partitions
            .iter()
            .map(|partition| partition.label.clone())
            .collect()
    }
}

fn read_sectors(disk: &dyn SectorIo, lba: u64, count: u64) -> Result<Vec<u8>, DiskError> {
    let length = usize::try_from(count)
        .ok()
        .and_then(|count| count.checked_mul(SECTOR_SIZE))
        .ok_or(DiskError::OutOfRange)?;
    let mut buffer = vec![0u8; length];
    disk.read(lba, &mut buffer)?;
    Ok(buffer)
}

/// Reads and checks the GPT of `disk` (see the module doc for every check).
pub fn read_gpt(disk: &dyn SectorIo) -> Result<GptTable, GptError> {
    let sectors = disk.sectors();
    // LBA 0, two headers and at least one usable sector between them.
    if sectors < 4 {
        return Err(GptError::DiskTooSmall { sectors });
    }
    let lba0 = read_sectors(disk, 0, 1).map_err(GptError::Io)?;
    let mbr: MasterBootRecord = bytemuck::pod_read_unaligned(&lba0);
    // See: UEFI 2.10 5.2.3, Table 5.4: OSType 0xEE is the GPT protective record.
    if mbr.signature != [0x55, 0xAA] || !mbr.partitions.iter().any(|r| r.os_indicator == 0xEE) {
        return Err(GptError::NoProtectiveMbr);
    }

    let (header, array, source) = match read_header(disk, 1, sectors) {
        Ok((header, array)) => (header, array, HeaderSource::Primary),
        Err(primary) => match read_header(disk, sectors - 1, sectors) {
            Ok((header, array)) => (
                header,
                array,
                HeaderSource::Backup {
                    primary_error: primary,
                },
            ),
            Err(backup) => return Err(GptError::NoValidHeader { primary, backup }),
        },
    };
    let first_usable = header.first_usable_lba.to_u64();
    let last_usable = header.last_usable_lba.to_u64();
    let entry_size = header.size_of_partition_entry.to_u32() as usize;

    let mut partitions: Vec<Partition> = Vec::new();
    for (index, bytes) in (0u32..).zip(array.chunks_exact(entry_size)) {
        let entry: GptPartitionEntry = bytemuck::pod_read_unaligned(&bytes[..ENTRY_LEN]);
        if !entry.is_used() {
            continue;
        }
        let unique_guid = entry.unique_partition_guid;
        if unique_guid.is_zero() {
            return Err(GptError::ZeroPartitionGuid { index });
        }
        if let Some(other) = partitions.iter().find(|p| p.unique_guid == unique_guid) {
            return Err(GptError::DuplicatePartitionGuid {
                first: other.index,
                second: index,
            });
        }
        let (first_lba, last_lba) = (entry.starting_lba.to_u64(), entry.ending_lba.to_u64());
        if first_lba > last_lba || first_lba < first_usable || last_lba > last_usable {
            return Err(GptError::PartitionOutOfRange {
                index,
                first_lba,
                last_lba,
                first_usable,
                last_usable,
            });
        }
        let label = decode_name(&entry.name).ok_or(GptError::BadName { index })?;
        partitions.push(Partition {
            index,
            type_guid: entry.partition_type_guid.0,
            unique_guid,
            first_lba,
            last_lba,
            attributes: entry.attributes.0.to_u64(),
            label,
        });
    }
    let mut by_start: Vec<&Partition> = partitions.iter().collect();
    by_start.sort_by_key(|partition| partition.first_lba);
    for pair in by_start.windows(2) {
        if pair[1].first_lba <= pair[0].last_lba {
            let (first, second) = (
                pair[0].index.min(pair[1].index),
                pair[0].index.max(pair[1].index),
            );
            return Err(GptError::PartitionsOverlap { first, second });
        }
    }
    Ok(GptTable {
        source,
        disk_guid: header.disk_guid,
        disk_sectors: sectors,
        first_usable_lba: first_usable,
        last_usable_lba: last_usable,
        alternate_lba: header.alternate_lba.to_u64(),
        partitions,
    })
}

/// The name up to its first NUL, from UTF-16LE; `None` if it is not valid UTF-16.
fn decode_name(name: &GptPartitionName) -> Option<String> {
    let units = name
        .0
        .as_chunks::<2>()
        .0
        .iter()
        .map(|pair| u16::from_le_bytes(*pair))
        .take_while(|&unit| unit != 0);
    char::decode_utf16(units)
        .collect::<Result<String, _>>()
        .ok()
}

/// Reads the header at `lba` of a disk of `sectors` sectors, checks it and reads and checks
/// its entry array (returned as exactly `count * size` bytes).
fn read_header(
    disk: &dyn SectorIo,
    lba: u64,
    sectors: u64,
) -> Result<(GptHeader, Vec<u8>), HeaderError> {
    let sector = read_sectors(disk, lba, 1).map_err(HeaderError::Io)?;
    let header: GptHeader = bytemuck::pod_read_unaligned(&sector[..HEADER_LEN]);
    // See: UEFI 2.10 5.3.2, Table 5.5 (GPT Header) for each field below.
    if !header.is_signature_valid() {
        return Err(HeaderError::BadSignature);
    }
    if header.revision.major() != 1 {
        return Err(HeaderError::UnsupportedRevision {
            revision: header.revision.0.to_u32(),
        });
    }
    let header_size = header.header_size.to_u32();
    if !(MIN_HEADER_SIZE..=SECTOR_SIZE as u32).contains(&header_size) {
        return Err(HeaderError::BadHeaderSize { size: header_size });
    }
    // The CRC covers HeaderSize bytes with the HeaderCRC32 field (offset 16) as zero.
    let covered = &sector[..header_size as usize];
    let computed = crc32(&[&covered[..16], &[0; 4], &covered[20..]]);
    let stored = header.header_crc32.0.to_u32();
    if computed != stored {
        return Err(HeaderError::BadHeaderCrc { stored, computed });
    }
    let my_lba = header.my_lba.to_u64();
    if my_lba != lba {
        return Err(HeaderError::WrongMyLba { stored: my_lba });
    }
    let (first_usable, last_usable) = (
        header.first_usable_lba.to_u64(),
        header.last_usable_lba.to_u64(),
    );
    // Usable LBAs lie strictly between the primary header (LBA 1) and the backup (last LBA).
    if first_usable < 2 || first_usable > last_usable || last_usable > sectors - 2 {
        return Err(HeaderError::BadUsableRange {
            first: first_usable,
            last: last_usable,
        });
    }
    let entry_size = header.size_of_partition_entry.to_u32();
    if !(128..=MAX_ENTRY_SIZE).contains(&entry_size) || !entry_size.is_power_of_two() {
        return Err(HeaderError::BadEntrySize { size: entry_size });
    }
    let count = header.number_of_partition_entries.to_u32();
    let array_bytes = u64::from(count) * u64::from(entry_size);
    if array_bytes > MAX_ENTRY_ARRAY_BYTES {
        return Err(HeaderError::TooManyEntries {
            count,
            size: entry_size,
        });
    }
    let array_lba = header.partition_entry_lba.to_u64();
    let array_sectors = array_bytes.div_ceil(SECTOR_SIZE as u64);
    if array_sectors > 0 {
        // `end` is exclusive; an array whose end overflows u64 is past any disk.
        let fits = match array_lba.checked_add(array_sectors) {
            Some(end) => {
                (array_lba >= 2 && end <= first_usable)
                    || (array_lba > last_usable && end < sectors)
            }
            None => false,
        };
        if !fits {
            return Err(HeaderError::BadEntryArrayPlace {
                first_lba: array_lba,
                sectors: array_sectors,
            });
        }
    }
    let mut array = read_sectors(disk, array_lba, array_sectors).map_err(HeaderError::Io)?;
    array.truncate(array_bytes as usize);
    let computed = crc32(&[&array]);
    let stored = header.partition_entry_array_crc32.0.to_u32();
    if computed != stored {
        return Err(HeaderError::BadEntryArrayCrc { stored, computed });
    }
    Ok((header, array))
}

/// A partition for [`write_gpt`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewPartition {
    pub label: String,
    pub type_guid: Guid,
    pub unique_guid: Guid,
    /// The first sector, inclusive.
    pub first_lba: u64,
    /// The last sector, inclusive.
    pub last_lba: u64,
}

/// Why [`write_gpt`] refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GptWriteError {
    /// The disk cannot hold the MBR, both headers and arrays and one usable sector.
    DiskTooSmall { sectors: u64 },
    /// More partitions than the written array has entries.
    TooManyPartitions { count: usize },
    /// A label that is empty, longer than [`MAX_LABEL_UNITS`] UTF-16 code units or has a NUL.
    BadLabel { label: String },
    /// A partition outside the usable LBAs (or ending before it starts).
    OutOfRange { label: String },
    /// Two partitions share sectors.
    Overlap { first: String, second: String },
    /// A zero or repeated unique GUID.
    BadGuid { label: String },
    /// Writing failed.
    Io(DiskError),
}

impl fmt::Display for GptWriteError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GptWriteError::DiskTooSmall { sectors } => {
                write!(formatter, "{sectors} sectors are too few for a GPT and a partition")
            }
            GptWriteError::TooManyPartitions { count } => write!(
                formatter,
                "{count} partitions, at most {WRITTEN_ENTRY_COUNT} fit the entry array"
            ),
            GptWriteError::BadLabel { label } => write!(
                formatter,
                "label \"{label}\" is empty, has a NUL or is longer than {MAX_LABEL_UNITS} UTF-16 units"
            ),
            GptWriteError::OutOfRange { label } => {
                write!(formatter, "partition \"{label}\" lies outside the usable sectors")
            }
            GptWriteError::Overlap { first, second } => {
                write!(formatter, "partitions \"{first}\" and \"{second}\" overlap")
            }
            GptWriteError::BadGuid { label } => {
                write!(formatter, "partition \"{label}\" has a zero or repeated GUID")
            }
            GptWriteError::Io(error) => write!(formatter, "write failed ({error:?})"),
        }
    }
}

/// The usable LBAs (inclusive) of a disk of `sectors` sectors as [`write_gpt`] lays it out:
/// LBA 0 protective MBR, LBA 1 primary header, LBA 2..=33 primary array, then the usable
/// sectors, then the backup array (32 sectors) and the backup header at the last LBA (the
/// layout `sgdisk` uses). `None` if there is no usable sector.
pub fn usable_lbas(sectors: u64) -> Option<(u64, u64)> {
    let first = 2 + WRITTEN_ARRAY_SECTORS;
    let last = sectors.checked_sub(2 + WRITTEN_ARRAY_SECTORS)?;
    (first <= last).then_some((first, last))
}

/// True for a label [`write_gpt`] accepts: 1..=[`MAX_LABEL_UNITS`] UTF-16 code units, no NUL.
pub fn is_valid_label(label: &str) -> bool {
    !label.is_empty() && !label.contains('\0') && label.encode_utf16().count() <= MAX_LABEL_UNITS
}

/// Writes a protective MBR, both GPT headers and both entry arrays (128 entries) describing
/// `partitions` onto `disk`, laid out as [`usable_lbas`] says. Only those sectors are written;
/// the partitions' contents are left alone.
pub fn write_gpt(
    disk: &dyn SectorIo,
    disk_guid: Guid,
    partitions: &[NewPartition],
) -> Result<(), GptWriteError> {
    let sectors = disk.sectors();
    let (first_usable, last_usable) =
        usable_lbas(sectors).ok_or(GptWriteError::DiskTooSmall { sectors })?;
    if partitions.len() > WRITTEN_ENTRY_COUNT as usize {
        return Err(GptWriteError::TooManyPartitions {
            count: partitions.len(),
        });
    }
    let mut array = vec![0u8; WRITTEN_ENTRY_COUNT as usize * ENTRY_LEN];
    for (number, partition) in partitions.iter().enumerate() {
        let label = || partition.label.clone();
        if !is_valid_label(&partition.label) {
            return Err(GptWriteError::BadLabel { label: label() });
        }
        if partition.first_lba > partition.last_lba
            || partition.first_lba < first_usable
            || partition.last_lba > last_usable
        {
            return Err(GptWriteError::OutOfRange { label: label() });
        }
        if partition.unique_guid.is_zero()
            || partitions[..number]
                .iter()
                .any(|other| other.unique_guid == partition.unique_guid)
        {
            return Err(GptWriteError::BadGuid { label: label() });
        }
        if let Some(other) = partitions[..number].iter().find(|other| {
            other.first_lba <= partition.last_lba && partition.first_lba <= other.last_lba
        }) {
            return Err(GptWriteError::Overlap {
                first: other.label.clone(),
                second: label(),
            });
        }
        let mut name = GptPartitionName::default();
        for (slot, unit) in name
            .0
            .as_chunks_mut::<2>()
            .0
            .iter_mut()
            .zip(partition.label.encode_utf16())
        {
            *slot = unit.to_le_bytes();
        }
        let entry = GptPartitionEntry {
            partition_type_guid: GptPartitionType(partition.type_guid),
            unique_partition_guid: partition.unique_guid,
            starting_lba: LbaLe::from_u64(partition.first_lba),
            ending_lba: LbaLe::from_u64(partition.last_lba),
            attributes: GptPartitionAttributes(U64Le::from_u64(0)),
            name,
        };
        array[number * ENTRY_LEN..][..ENTRY_LEN].copy_from_slice(bytemuck::bytes_of(&entry));
    }
    let array_crc = crc32(&[&array]);
    let last = sectors - 1;
    let header = |my_lba: u64, alternate_lba: u64, array_lba: u64| {
        let mut header = GptHeader {
            signature: GptHeaderSignature::EFI_COMPATIBLE_PARTITION_TABLE_HEADER,
            revision: GptHeaderRevision::VERSION_1_0,
            header_size: U32Le::from_u32(MIN_HEADER_SIZE),
            my_lba: LbaLe::from_u64(my_lba),
            alternate_lba: LbaLe::from_u64(alternate_lba),
            first_usable_lba: LbaLe::from_u64(first_usable),
            last_usable_lba: LbaLe::from_u64(last_usable),
            disk_guid,
            partition_entry_lba: LbaLe::from_u64(array_lba),
            number_of_partition_entries: U32Le::from_u32(WRITTEN_ENTRY_COUNT),
            size_of_partition_entry: U32Le::from_u32(ENTRY_LEN as u32),
            partition_entry_array_crc32: gpt_disk_types::Crc32(U32Le::from_u32(array_crc)),
            ..GptHeader::default()
        };
        header.update_header_crc32();
        let mut sector = vec![0u8; SECTOR_SIZE];
        sector[..HEADER_LEN].copy_from_slice(bytemuck::bytes_of(&header));
        sector
    };
    let mbr = MasterBootRecord::protective_mbr(sectors);
    let backup_array_lba = last_usable + 1;
    let io = GptWriteError::Io;
    disk.write(0, bytemuck::bytes_of(&mbr)).map_err(io)?;
    disk.write(1, &header(1, last, 2)).map_err(io)?;
    disk.write(2, &array).map_err(io)?;
    disk.write(backup_array_lba, &array).map_err(io)?;
    disk.write(last, &header(last, 1, backup_array_lba))
        .map_err(io)?;
    disk.flush().map_err(io)
}

#[cfg(test)]
mod tests;
