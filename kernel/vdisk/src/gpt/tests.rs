use super::*;
use crate::testing::MemoryIo;
use alloc::string::ToString;
use gpt_disk_types::guid;

const SECTORS: u64 = 4096; // 2 MiB
const VM1: Guid = guid!("11111111-2222-3333-4444-555555555555");
const VM2: Guid = guid!("8da63339-0007-60c0-c436-083ac8230908");
const DISK: Guid = guid!("01234567-89ab-cdef-0123-456789abcdef");

fn partition(label: &str, guid: Guid, first_lba: u64, last_lba: u64) -> NewPartition {
    NewPartition {
        label: label.to_string(),
        type_guid: LINUX_FILESYSTEM_DATA,
        unique_guid: guid,
        first_lba,
        last_lba,
    }
}

/// A 2 MiB disk with "vm1" (1024 sectors at 34) and "données-é" (1024 at 2048).
fn sample() -> MemoryIo {
    let io = MemoryIo::new(SECTORS);
    write_gpt(
        &io,
        DISK,
        &[
            partition("vm1", VM1, 34, 1057),
            partition("données-é", VM2, 2048, 3071),
        ],
    )
    .unwrap();
    io
}

/// Rewrites the header at `lba` through `edit` and fixes its CRC.
fn edit_header(io: &MemoryIo, lba: u64, edit: impl FnOnce(&mut GptHeader)) {
    let sector = io.sector(lba);
    let mut header: GptHeader = bytemuck::pod_read_unaligned(&sector[..HEADER_LEN]);
    edit(&mut header);
    header.update_header_crc32();
    io.patch(lba as usize * SECTOR_SIZE, bytemuck::bytes_of(&header));
}

/// Rewrites the entries of both arrays through `edit` and fixes both headers' CRCs.
fn edit_entries(io: &MemoryIo, edit: impl Fn(&mut [GptPartitionEntry])) {
    for lba in [1, SECTORS - 1] {
        let sector = io.sector(lba);
        let header: GptHeader = bytemuck::pod_read_unaligned(&sector[..HEADER_LEN]);
        let at = header.partition_entry_lba.to_u64() as usize * SECTOR_SIZE;
        let mut entries: Vec<GptPartitionEntry> = (0..WRITTEN_ENTRY_COUNT as usize)
            .map(|index| {
                let bytes =
                    io.bytes.lock().unwrap()[at + index * ENTRY_LEN..][..ENTRY_LEN].to_vec();
                bytemuck::pod_read_unaligned(&bytes)
            })
            .collect();
        edit(&mut entries);
        let array: Vec<u8> = entries
            .iter()
            .flat_map(|entry| bytemuck::bytes_of(entry).to_vec())
            .collect();
        io.patch(at, &array);
        let crc = crc32(&[&array]);
        edit_header(io, lba, |header| {
            header.partition_entry_array_crc32 = gpt_disk_types::Crc32(U32Le::from_u32(crc))
        });
    }
}

#[test]
fn writes_and_reads_back() {
    let io = sample();
    let table = read_gpt(&io).unwrap();
    assert_eq!(table.source, HeaderSource::Primary);
    assert_eq!(table.disk_guid, DISK);
    assert_eq!(table.disk_sectors, SECTORS);
    assert_eq!(
        (table.first_usable_lba, table.last_usable_lba),
        (34, SECTORS - 34)
    );
    assert_eq!(table.alternate_lba, SECTORS - 1);
    assert_eq!(
        table.partitions,
        [
            Partition {
                index: 0,
                type_guid: LINUX_FILESYSTEM_DATA,
                unique_guid: VM1,
                first_lba: 34,
                last_lba: 1057,
                attributes: 0,
                label: "vm1".into(),
            },
            Partition {
                index: 1,
                type_guid: LINUX_FILESYSTEM_DATA,
                unique_guid: VM2,
                first_lba: 2048,
                last_lba: 3071,
                attributes: 0,
                label: "données-é".into(),
            },
        ]
    );
    assert_eq!(table.partitions[0].sectors(), 1024);
    // The protective MBR covers the disk from LBA 1 (See: UEFI 2.10 5.2.3).
    let mbr = io.sector(0);
    assert_eq!(&mbr[510..], [0x55, 0xAA]);
    assert_eq!(mbr[446 + 4], 0xEE);
    assert_eq!(&mbr[446 + 8..446 + 16], [1, 0, 0, 0, 0xFF, 0x0F, 0, 0]);
    // The backup header points back at the primary and at its own array.
    let backup: GptHeader = bytemuck::pod_read_unaligned(&io.sector(SECTORS - 1)[..HEADER_LEN]);
    assert_eq!(backup.alternate_lba.to_u64(), 1);
    assert_eq!(backup.partition_entry_lba.to_u64(), SECTORS - 33);
}

#[test]
fn finds_by_label_and_guid() {
    let table = read_gpt(&sample()).unwrap();
    let by_label = |label: &str| table.find(&PartitionSelector::Label(label.into()));
    assert_eq!(by_label("vm1").unwrap().unique_guid, VM1);
    assert_eq!(by_label("données-é").unwrap().first_lba, 2048);
    for text in [
        "8DA63339-0007-60C0-C436-083AC8230908",
        "8da63339-0007-60c0-c436-083ac8230908",
    ] {
        let guid = parse_guid(text).unwrap();
        assert_eq!(
            table.find(&PartitionSelector::Guid(guid)).unwrap().label,
            "données-é"
        );
    }
    assert_eq!(guid_text(VM2), "8DA63339-0007-60C0-C436-083AC8230908");
    assert_eq!(parse_guid("8DA63339-0007-60C0-C436-083AC823090"), None);
    assert_eq!(parse_guid("not a guid"), None);

    let missing = by_label("vm3").unwrap_err();
    assert_eq!(
        missing.to_string(),
        "no partition with label \"vm3\" on the disk (its partitions: \"vm1\", \"données-é\")"
    );
    let missing = table.find(&PartitionSelector::Guid(DISK)).unwrap_err();
    assert_eq!(
        missing.to_string(),
        "no partition with GUID 01234567-89AB-CDEF-0123-456789ABCDEF on the disk (its partitions: \"vm1\", \"données-é\")"
    );
    assert_eq!(
        by_label("VM1").unwrap_err(),
        LookupError::NotFound {
            wanted: PartitionSelector::Label("VM1".into()),
            labels: table.labels(),
        }
    );
}

#[test]
fn a_repeated_label_is_ambiguous_and_an_empty_disk_says_so() {
    let io = MemoryIo::new(SECTORS);
    let other = guid!("22222222-2222-3333-4444-555555555555");
    write_gpt(
        &io,
        DISK,
        &[
            partition("data", VM1, 100, 199),
            partition("data", other, 200, 299),
        ],
    )
    .unwrap();
    let table = read_gpt(&io).unwrap();
    let error = table
        .find(&PartitionSelector::Label("data".into()))
        .unwrap_err();
    assert_eq!(
        error,
        LookupError::AmbiguousLabel {
            label: "data".into(),
            count: 2
        }
    );
    assert_eq!(
        table
            .find(&PartitionSelector::Guid(other))
            .unwrap()
            .first_lba,
        200
    );

    let empty = MemoryIo::new(SECTORS);
    write_gpt(&empty, DISK, &[]).unwrap();
    let table = read_gpt(&empty).unwrap();
    assert!(table.partitions.is_empty());
    assert_eq!(
        table
            .find(&PartitionSelector::Label("vm1".into()))
            .unwrap_err()
            .to_string(),
        "no partition with label \"vm1\" on the disk (it has no partitions)"
    );
}

#[test]
fn the_longest_label_fits_and_a_longer_one_is_refused() {
    let io = MemoryIo::new(SECTORS);
    let longest = "é".repeat(MAX_LABEL_UNITS);
    write_gpt(&io, DISK, &[partition(&longest, VM1, 34, 40)]).unwrap();
    assert_eq!(read_gpt(&io).unwrap().partitions[0].label, longest);
    for label in [
        "",
        "a\0b",
        &"x".repeat(MAX_LABEL_UNITS + 1),
        "😀".repeat(19).as_str(),
    ] {
        assert_eq!(
            write_gpt(&io, DISK, &[partition(label, VM1, 34, 40)]),
            Err(GptWriteError::BadLabel {
                label: label.to_string()
            })
        );
    }
}

#[test]
fn the_writer_refuses_what_the_reader_would() {
    let io = MemoryIo::new(SECTORS);
    let other = guid!("22222222-2222-3333-4444-555555555555");
    let write = |partitions: &[NewPartition]| write_gpt(&io, DISK, partitions);
    assert_eq!(
        write(&[partition("a", VM1, 33, 40)]),
        Err(GptWriteError::OutOfRange { label: "a".into() })
    );
    assert_eq!(
        write(&[partition("a", VM1, 100, SECTORS - 33)]),
        Err(GptWriteError::OutOfRange { label: "a".into() })
    );
    assert_eq!(
        write(&[partition("a", VM1, 50, 40)]),
        Err(GptWriteError::OutOfRange { label: "a".into() })
    );
    assert_eq!(
        write(&[partition("a", VM1, 40, 50), partition("b", other, 50, 60)]),
        Err(GptWriteError::Overlap {
            first: "a".into(),
            second: "b".into()
        })
    );
    assert_eq!(
        write(&[partition("a", VM1, 40, 50), partition("b", VM1, 60, 70)]),
        Err(GptWriteError::BadGuid { label: "b".into() })
    );
    assert_eq!(
        write(&[partition("a", Guid::ZERO, 40, 50)]),
        Err(GptWriteError::BadGuid { label: "a".into() })
    );
    let many: Vec<NewPartition> = (0..129u64)
        .map(|n| {
            partition(
                "p",
                Guid::from_random_bytes([n as u8 + 1; 16]),
                40 + n,
                40 + n,
            )
        })
        .collect();
    assert_eq!(
        write(&many),
        Err(GptWriteError::TooManyPartitions { count: 129 })
    );
    // Nothing was written by any refusal.
    assert!(io.bytes.lock().unwrap().iter().all(|&byte| byte == 0));
    assert_eq!(usable_lbas(67), None);
    assert_eq!(usable_lbas(68), Some((34, 34)));
    assert_eq!(usable_lbas(0), None);
    assert_eq!(
        write_gpt(&MemoryIo::new(67), DISK, &[]),
        Err(GptWriteError::DiskTooSmall { sectors: 67 })
    );
    assert!(write_gpt(&MemoryIo::new(68), DISK, &[partition("a", VM1, 34, 34)]).is_ok());
}

#[test]
fn not_a_gpt_disk() {
    assert_eq!(
        read_gpt(&MemoryIo::new(3)),
        Err(GptError::DiskTooSmall { sectors: 3 })
    );
    assert_eq!(
        read_gpt(&MemoryIo::new(SECTORS)),
        Err(GptError::NoProtectiveMbr)
    );
    let io = sample();
    io.patch(446 + 4, &[0x83]); // An MBR partition of Linux, not protective.
    assert_eq!(read_gpt(&io), Err(GptError::NoProtectiveMbr));
    let io = sample();
    io.patch(510, &[0, 0]);
    assert_eq!(read_gpt(&io), Err(GptError::NoProtectiveMbr));
    let mut io = sample();
    io.fail_at = Some(0);
    assert_eq!(read_gpt(&io), Err(GptError::Io(DiskError::Io)));
    // A hybrid MBR (the 0xEE record second) is accepted.
    let io = sample();
    let record: Vec<u8> = io.sector(0)[446..462].to_vec();
    io.patch(446 + 16, &record);
    io.patch(446 + 4, &[0x0C]);
    assert!(read_gpt(&io).is_ok());
}

#[test]
fn a_bad_primary_falls_back_to_the_backup() {
    let expected = read_gpt(&sample()).unwrap().partitions;
    let crc_of = |io: &MemoryIo| {
        let header: GptHeader = bytemuck::pod_read_unaligned(&io.sector(1)[..HEADER_LEN]);
        header.header_crc32.0.to_u32()
    };
    type Corrupt<'a> = Box<dyn Fn(&MemoryIo) + 'a>;
    type Expected<'a> = Box<dyn Fn(&MemoryIo) -> HeaderError + 'a>;
    let cases: Vec<(Corrupt, Expected)> = vec![
        (
            Box::new(|io| io.patch(SECTOR_SIZE, b"EFI PARX")),
            Box::new(|_| HeaderError::BadSignature),
        ),
        (
            // A flipped bit in the disk GUID.
            Box::new(|io| io.patch(SECTOR_SIZE + 56, &[0xFF])),
            Box::new(|io| {
                let mut sector = io.sector(1);
                sector[16..20].fill(0);
                HeaderError::BadHeaderCrc {
                    stored: crc_of(io),
                    computed: crc32(&[&sector[..92]]),
                }
            }),
        ),
        (
            // A flipped byte in the first entry's name.
            Box::new(|io| io.patch(2 * SECTOR_SIZE + 56, b"X")),
            Box::new(|io| {
                let header: GptHeader = bytemuck::pod_read_unaligned(&io.sector(1)[..HEADER_LEN]);
                let bytes = io.bytes.lock().unwrap()[2 * SECTOR_SIZE..34 * SECTOR_SIZE].to_vec();
                HeaderError::BadEntryArrayCrc {
                    stored: header.partition_entry_array_crc32.0.to_u32(),
                    computed: crc32(&[&bytes]),
                }
            }),
        ),
        (
            Box::new(|io| edit_header(io, 1, |h| h.my_lba = LbaLe::from_u64(2))),
            Box::new(|_| HeaderError::WrongMyLba { stored: 2 }),
        ),
        (
            Box::new(|io| {
                edit_header(io, 1, |h| {
                    h.revision = GptHeaderRevision(U32Le::from_u32(0x0002_0000))
                })
            }),
            Box::new(|_| HeaderError::UnsupportedRevision {
                revision: 0x0002_0000,
            }),
        ),
        (
            Box::new(|io| edit_header(io, 1, |h| h.header_size = U32Le::from_u32(91))),
            Box::new(|_| HeaderError::BadHeaderSize { size: 91 }),
        ),
        (
            Box::new(|io| edit_header(io, 1, |h| h.header_size = U32Le::from_u32(513))),
            Box::new(|_| HeaderError::BadHeaderSize { size: 513 }),
        ),
        (
            Box::new(|io| edit_header(io, 1, |h| h.last_usable_lba = LbaLe::from_u64(SECTORS - 1))),
            Box::new(|_| HeaderError::BadUsableRange {
                first: 34,
                last: SECTORS - 1,
            }),
        ),
        (
            Box::new(|io| edit_header(io, 1, |h| h.first_usable_lba = LbaLe::from_u64(1))),
            Box::new(|_| HeaderError::BadUsableRange {
                first: 1,
                last: SECTORS - 34,
            }),
        ),
        (
            Box::new(|io| edit_header(io, 1, |h| h.first_usable_lba = LbaLe::from_u64(SECTORS))),
            Box::new(|_| HeaderError::BadUsableRange {
                first: SECTORS,
                last: SECTORS - 34,
            }),
        ),
        (
            Box::new(|io| edit_header(io, 1, |h| h.size_of_partition_entry = U32Le::from_u32(100))),
            Box::new(|_| HeaderError::BadEntrySize { size: 100 }),
        ),
        (
            Box::new(|io| edit_header(io, 1, |h| h.size_of_partition_entry = U32Le::from_u32(384))),
            Box::new(|_| HeaderError::BadEntrySize { size: 384 }),
        ),
        (
            Box::new(|io| {
                edit_header(io, 1, |h| h.size_of_partition_entry = U32Le::from_u32(8192))
            }),
            Box::new(|_| HeaderError::BadEntrySize { size: 8192 }),
        ),
        (
            Box::new(|io| {
                edit_header(io, 1, |h| {
                    h.number_of_partition_entries = U32Le::from_u32(u32::MAX)
                })
            }),
            Box::new(|_| HeaderError::TooManyEntries {
                count: u32::MAX,
                size: 128,
            }),
        ),
        (
            // The array inside the usable range (it would alias a partition).
            Box::new(|io| edit_header(io, 1, |h| h.partition_entry_lba = LbaLe::from_u64(34))),
            Box::new(|_| HeaderError::BadEntryArrayPlace {
                first_lba: 34,
                sectors: 32,
            }),
        ),
        (
            // The array over the primary header.
            Box::new(|io| edit_header(io, 1, |h| h.partition_entry_lba = LbaLe::from_u64(1))),
            Box::new(|_| HeaderError::BadEntryArrayPlace {
                first_lba: 1,
                sectors: 32,
            }),
        ),
        (
            // The array over the backup header.
            Box::new(|io| {
                edit_header(io, 1, |h| {
                    h.partition_entry_lba = LbaLe::from_u64(SECTORS - 32)
                })
            }),
            Box::new(|_| HeaderError::BadEntryArrayPlace {
                first_lba: SECTORS - 32,
                sectors: 32,
            }),
        ),
        (
            // An array LBA whose end overflows u64.
            Box::new(|io| {
                edit_header(io, 1, |h| {
                    h.partition_entry_lba = LbaLe::from_u64(u64::MAX - 3)
                })
            }),
            Box::new(|_| HeaderError::BadEntryArrayPlace {
                first_lba: u64::MAX - 3,
                sectors: 32,
            }),
        ),
    ];
    for (number, (corrupt, error)) in cases.iter().enumerate() {
        let io = sample();
        corrupt(&io);
        let table = read_gpt(&io).unwrap_or_else(|e| panic!("case {number}: {e}"));
        assert_eq!(
            table.source,
            HeaderSource::Backup {
                primary_error: error(&io)
            },
            "case {number}"
        );
        assert_eq!(table.partitions, expected, "case {number}");
        assert_eq!(table.alternate_lba, 1);
    }
    // An unreadable LBA 1.
    let mut io = sample();
    io.fail_at = Some(1);
    assert_eq!(
        read_gpt(&io).unwrap().source,
        HeaderSource::Backup {
            primary_error: HeaderError::Io(DiskError::Io)
        }
    );
}

#[test]
fn both_headers_bad_is_refused_naming_both() {
    let io = sample();
    io.patch(SECTOR_SIZE, b"EFI PARX");
    edit_header(&io, SECTORS - 1, |h| h.my_lba = LbaLe::from_u64(1));
    let error = read_gpt(&io).unwrap_err();
    assert_eq!(
        error,
        GptError::NoValidHeader {
            primary: HeaderError::BadSignature,
            backup: HeaderError::WrongMyLba { stored: 1 },
        }
    );
    assert_eq!(
        error.to_string(),
        "no valid GPT header: primary (LBA 1): no \"EFI PART\" signature; backup (last LBA): the header says it is at LBA 1"
    );
}

#[test]
fn a_longer_header_is_checked_over_its_size() {
    // HeaderSize 100: the CRC covers 8 more (zero) bytes, so a CRC over the first 92 is
    // refused, and one over all 100 is accepted.
    let io = sample();
    edit_header(&io, 1, |h| h.header_size = U32Le::from_u32(100));
    assert!(matches!(
        read_gpt(&io).unwrap().source,
        HeaderSource::Backup {
            primary_error: HeaderError::BadHeaderCrc { .. }
        }
    ));
    let mut sector = io.sector(1);
    sector[16..20].fill(0);
    let crc = crc32(&[&sector[..100]]);
    io.patch(SECTOR_SIZE + 16, &crc.to_le_bytes());
    assert_eq!(read_gpt(&io).unwrap().source, HeaderSource::Primary);
    // A non-zero byte inside HeaderSize now changes the CRC.
    io.patch(SECTOR_SIZE + 96, &[1]);
    assert!(matches!(
        read_gpt(&io).unwrap().source,
        HeaderSource::Backup {
            primary_error: HeaderError::BadHeaderCrc { .. }
        }
    ));
}

#[test]
fn bad_entries_are_refused() {
    let check = |edit: &dyn Fn(&mut [GptPartitionEntry]), expected: GptError| {
        let io = sample();
        edit_entries(&io, edit);
        assert_eq!(read_gpt(&io), Err(expected));
    };
    let set = |entry: &mut GptPartitionEntry, first: u64, last: u64| {
        entry.starting_lba = LbaLe::from_u64(first);
        entry.ending_lba = LbaLe::from_u64(last);
    };
    // Overlapping partitions: vm1 grown into the second, and a third inside the first.
    check(
        &|entries| set(&mut entries[0], 34, 2048),
        GptError::PartitionsOverlap {
            first: 0,
            second: 1,
        },
    );
    check(
        &|entries| {
            entries[5] = entries[0];
            entries[5].unique_partition_guid = guid!("99999999-2222-3333-4444-555555555555");
            set(&mut entries[5], 100, 100);
        },
        GptError::PartitionsOverlap {
            first: 0,
            second: 5,
        },
    );
    let out_of_range = |index, first_lba, last_lba| GptError::PartitionOutOfRange {
        index,
        first_lba,
        last_lba,
        first_usable: 34,
        last_usable: SECTORS - 34,
    };
    check(
        &|entries| set(&mut entries[1], 2048, SECTORS - 33),
        out_of_range(1, 2048, SECTORS - 33),
    );
    check(
        &|entries| set(&mut entries[0], 33, 100),
        out_of_range(0, 33, 100),
    );
    check(
        &|entries| set(&mut entries[1], 3000, 2999),
        out_of_range(1, 3000, 2999),
    );
    check(
        &|entries| set(&mut entries[1], u64::MAX, u64::MAX),
        out_of_range(1, u64::MAX, u64::MAX),
    );
    check(
        &|entries| entries[1].unique_partition_guid = Guid::ZERO,
        GptError::ZeroPartitionGuid { index: 1 },
    );
    check(
        &|entries| entries[1].unique_partition_guid = VM1,
        GptError::DuplicatePartitionGuid {
            first: 0,
            second: 1,
        },
    );
    // An unpaired UTF-16 surrogate in a name.
    check(
        &|entries| entries[1].name.0[0..2].copy_from_slice(&0xD800u16.to_le_bytes()),
        GptError::BadName { index: 1 },
    );
    // An unused entry (zero type) is ignored whatever else it holds.
    let io = sample();
    edit_entries(&io, |entries| {
        entries[7] = entries[0];
        entries[7].partition_type_guid = GptPartitionType::UNUSED;
    });
    assert_eq!(read_gpt(&io).unwrap().partitions.len(), 2);
}

#[test]
fn larger_entries_and_fewer_of_them_are_read() {
    // 4 entries of 256 bytes (2 sectors); the second array entry holds vm2.
    let io = sample();
    for lba in [1, SECTORS - 1] {
        let header: GptHeader = bytemuck::pod_read_unaligned(&io.sector(lba)[..HEADER_LEN]);
        let at = header.partition_entry_lba.to_u64() as usize * SECTOR_SIZE;
        let old = io.bytes.lock().unwrap()[at..at + 2 * ENTRY_LEN].to_vec();
        let mut array = vec![0u8; 4 * 256];
        array[..ENTRY_LEN].copy_from_slice(&old[..ENTRY_LEN]);
        array[256..256 + ENTRY_LEN].copy_from_slice(&old[ENTRY_LEN..]);
        array[200] = 0xAA; // Bytes past the 128 known ones are not interpreted.
        io.patch(at, &array);
        let crc = crc32(&[&array]);
        edit_header(&io, lba, |header| {
            header.number_of_partition_entries = U32Le::from_u32(4);
            header.size_of_partition_entry = U32Le::from_u32(256);
            header.partition_entry_array_crc32 = gpt_disk_types::Crc32(U32Le::from_u32(crc));
        });
    }
    let table = read_gpt(&io).unwrap();
    assert_eq!(table.source, HeaderSource::Primary);
    assert_eq!(table.labels(), ["vm1", "données-é"]);
    assert_eq!(table.partitions[1].index, 1);
}

/// The `gpt` crate (an independent writer, the one the `bootloader` crate uses) writes a
/// disk this reader accepts, and reads what `write_gpt` writes.
#[test]
fn agrees_with_the_gpt_crate() {
    use std::io::Cursor;
    let bytes = SECTORS as usize * SECTOR_SIZE;
    let mut device = Box::new(Cursor::new(vec![0u8; bytes]));
    gpt::mbr::ProtectiveMBR::with_lb_size(SECTORS as u32 - 1)
        .overwrite_lba0(&mut device)
        .unwrap();
    let mut disk = gpt::GptConfig::default()
        .initialized(false)
        .writable(true)
        .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
        .create_from_device(device, None)
        .unwrap();
    disk.update_partitions(Default::default()).unwrap();
    disk.add_partition("alpha", 100 * 512, gpt::partition_types::LINUX_FS, 0, None)
        .unwrap();
    disk.add_partition("beta", 300 * 512, gpt::partition_types::LINUX_FS, 0, None)
        .unwrap();
    let guids: Vec<String> = disk
        .partitions()
        .values()
        .map(|partition| partition.part_guid.to_string().to_uppercase())
        .collect();
    let mut device = disk.write().unwrap();
    let mut written = vec![0u8; bytes];
    use std::io::{Read, Seek, SeekFrom};
    device.seek(SeekFrom::Start(0)).unwrap();
    device.read_exact(&mut written).unwrap();
    let io = MemoryIo::new(SECTORS);
    io.patch(0, &written);
    let table = read_gpt(&io).unwrap();
    assert_eq!(table.source, HeaderSource::Primary);
    assert_eq!(table.labels(), ["alpha", "beta"]);
    assert_eq!(table.partitions[0].sectors(), 100);
    assert_eq!(table.partitions[1].sectors(), 300);
    assert_eq!(table.partitions[0].type_guid, LINUX_FILESYSTEM_DATA);
    let ours: Vec<String> = table
        .partitions
        .iter()
        .map(|p| guid_text(p.unique_guid))
        .collect();
    assert_eq!(ours, guids);

    let ours = sample();
    let image = ours.bytes.lock().unwrap().clone();
    let read = gpt::GptConfig::default()
        .writable(false)
        .open_from_device(Box::new(Cursor::new(image)))
        .unwrap();
    let partitions: Vec<(String, u64, u64, String)> = read
        .partitions()
        .values()
        .map(|p| {
            (
                p.name.clone(),
                p.first_lba,
                p.last_lba,
                p.part_guid.to_string(),
            )
        })
        .collect();
    assert_eq!(
        partitions,
        [
            (
                "vm1".into(),
                34,
                1057,
                "11111111-2222-3333-4444-555555555555".into()
            ),
            (
                "données-é".into(),
                2048,
                3071,
                "8da63339-0007-60c0-c436-083ac8230908".into()
            ),
        ]
    );
}

#[test]
fn flipped_bytes_never_panic() {
    let good = sample().bytes.lock().unwrap().clone();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    // Flips in the MBR, both headers and the first sectors of both arrays.
    let hot: Vec<usize> = (0..3 * SECTOR_SIZE)
        .chain((SECTORS as usize - 33) * SECTOR_SIZE..(SECTORS as usize - 31) * SECTOR_SIZE)
        .chain((SECTORS as usize - 1) * SECTOR_SIZE..SECTORS as usize * SECTOR_SIZE)
        .collect();
    for _ in 0..3000 {
        let io = MemoryIo::new(SECTORS);
        io.patch(0, &good);
        for _ in 0..(next() % 3 + 1) {
            let at = hot[(next() % hot.len() as u64) as usize];
            io.patch(at, &[next() as u8]);
        }
        let _ = read_gpt(&io);
    }
}
