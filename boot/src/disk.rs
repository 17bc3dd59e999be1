//! `ringzero-boot disk ...`: host tooling for the physical disk the hypervisor's VMs get
//! partitions of. It writes and reads GPTs through `ringzero-vdisk`, the same code the
//! hypervisor reads the disk with, so a disk this tool makes is one the hypervisor accepts.
//!
//! ```text
//! ringzero-boot disk create --out FILE --size SIZE [--partition LABEL:SIZE[:GUID]]...
//! ringzero-boot disk list   --disk FILE
//! ringzero-boot disk read   --disk FILE (--partition LABEL | --guid GUID) [--out FILE]
//! ```
//! Sizes are binary with a unit: `64K`, `128M`, `1G` (also `KiB`, `MiB`, `GiB`); a partition
//! size must be a whole number of 512-byte sectors. `create` writes a sparse file of SIZE with
//! a protective MBR, both GPT headers and both entry arrays; partitions (type "Linux
//! filesystem data", 0FC63DAF-8483-4772-8E79-3D69D8477DE4) follow each other in the given
//! order, each starting on a 1 MiB boundary as `sgdisk` places them; the last one may omit
//! its size (`LABEL` or `LABEL::GUID`) to take the rest of the disk (up to the last 1 MiB
//! boundary). Without a GUID a
//! partition gets a random (version 4) one. `read` copies the partition's bytes to FILE or to
//! standard output; `list` prints one line per partition:
//! `partition N: label "LABEL" guid GUID lba FIRST..=LAST sectors COUNT (SIZE)`.

use ringzero_vdisk::gpt::{
    guid_text, is_valid_label, parse_guid, read_gpt, usable_lbas, write_gpt, Guid, HeaderSource,
    NewPartition, PartitionSelector, LINUX_FILESYSTEM_DATA,
};
use ringzero_vdisk::{BlockDevice, DiskError, PartitionDisk, SectorIo, SECTOR_SIZE};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const USAGE: &str =
    "usage: ringzero-boot disk create --out FILE --size SIZE [--partition LABEL:SIZE[:GUID]]...
       ringzero-boot disk list --disk FILE
       ringzero-boot disk read --disk FILE (--partition LABEL | --guid GUID) [--out FILE]
sizes: 64K, 128M, 1G (binary units; KiB, MiB, GiB also accepted)";

/// Partitions start on multiples of this many sectors (1 MiB).
const ALIGNMENT_SECTORS: u64 = 2048;

/// A disk image file as the hypervisor's [`SectorIo`] (positioned reads and writes need only
/// `&File`, so no lock).
pub struct FileIo {
    file: File,
    sectors: u64,
}

impl FileIo {
    /// Opens `path` (for writing too when `writable`). Its length must be whole sectors.
    pub fn open(path: &Path, writable: bool) -> Result<Self, String> {
        let file = File::options()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|error| format!("cannot open {}: {error}", path.display()))?;
        let length = file
            .metadata()
            .map_err(|error| format!("cannot read {}: {error}", path.display()))?
            .len();
        if !length.is_multiple_of(SECTOR_SIZE as u64) {
            return Err(format!(
                "{} is {length} bytes, not a whole number of {SECTOR_SIZE}-byte sectors",
                path.display()
            ));
        }
        Ok(FileIo {
            file,
            sectors: length / SECTOR_SIZE as u64,
        })
    }

    fn offset(&self, lba: u64, len: usize) -> Result<u64, DiskError> {
        ringzero_vdisk::check_range(self.sectors, lba, len)?;
        Ok(lba * SECTOR_SIZE as u64)
    }
}

impl SectorIo for FileIo {
    fn sectors(&self) -> u64 {
        self.sectors
    }

    fn read(&self, lba: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        let offset = self.offset(lba, buf.len())?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|_| DiskError::Io)
    }

    fn write(&self, lba: u64, buf: &[u8]) -> Result<(), DiskError> {
        let offset = self.offset(lba, buf.len())?;
        self.file
            .write_all_at(buf, offset)
            .map_err(|_| DiskError::Io)
    }

    fn flush(&self) -> Result<(), DiskError> {
        self.file.sync_data().map_err(|_| DiskError::Io)
    }
}

/// Parses `64K`, `128M`, `1G`, `2GiB`... into bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let shift = match unit {
        "K" | "KiB" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        _ => {
            return Err(format!(
                "size \"{text}\" needs a unit: K, M or G (binary: KiB, MiB, GiB)"
            ))
        }
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|count| count.checked_mul(1 << shift))
        .filter(|bytes| *bytes > 0)
        .ok_or_else(|| format!("size \"{text}\" is not a positive number of {unit}"))
}

/// One `--partition LABEL:SIZE[:GUID]` of `disk create`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionSpec {
    pub label: String,
    /// Bytes; `None` = the rest of the disk.
    pub size: Option<u64>,
    pub guid: Option<Guid>,
}

/// Parses `LABEL:SIZE[:GUID]`, `LABEL` or `LABEL::GUID` (the last two: the rest of the disk).
pub fn parse_partition_spec(text: &str) -> Result<PartitionSpec, String> {
    let mut fields = text.split(':');
    let label = fields.next().unwrap_or_default().to_string();
    if !is_valid_label(&label) {
        return Err(format!(
            "partition \"{text}\": the label must be 1 to 36 UTF-16 characters without NUL"
        ));
    }
    let size = match fields.next() {
        None | Some("") => None,
        Some(size) => {
            let bytes = parse_size(size)?;
            if !bytes.is_multiple_of(SECTOR_SIZE as u64) {
                return Err(format!(
                    "partition \"{label}\": {size} is not a whole number of sectors"
                ));
            }
            Some(bytes)
        }
    };
    let guid = match fields.next() {
        None => None,
        Some(text) => Some(parse_guid(text).ok_or_else(|| {
            format!("partition \"{label}\": \"{text}\" is not a GUID (8-4-4-4-12 hex digits)")
        })?),
    };
    if fields.next().is_some() {
        return Err(format!("partition \"{text}\": expected LABEL:SIZE[:GUID]"));
    }
    Ok(PartitionSpec { label, size, guid })
}

fn random_guid() -> Guid {
    Guid::from_random_bytes(*uuid::Uuid::new_v4().as_bytes())
}

/// Places `specs` on a disk of `sectors` sectors (1 MiB aligned, in order).
pub fn layout(sectors: u64, specs: &[PartitionSpec]) -> Result<Vec<NewPartition>, String> {
    let (_, last_usable) =
        usable_lbas(sectors).ok_or_else(|| format!("{sectors} sectors are too few for a GPT"))?;
    let mut next = ALIGNMENT_SECTORS;
    let mut partitions = Vec::new();
    for (number, spec) in specs.iter().enumerate() {
        if partitions
            .iter()
            .any(|partition: &NewPartition| partition.label == spec.label)
        {
            return Err(format!("partition label \"{}\" is given twice", spec.label));
        }
        let first_lba = next;
        let last_lba = match spec.size {
            Some(bytes) => first_lba.saturating_add(bytes / SECTOR_SIZE as u64 - 1),
            // The rest, ending on a 1 MiB boundary too when that leaves it a sector.
            None if number + 1 == specs.len() => {
                let aligned_end = (last_usable + 1) / ALIGNMENT_SECTORS * ALIGNMENT_SECTORS;
                if aligned_end > first_lba {
                    aligned_end - 1
                } else {
                    last_usable
                }
            }
            None => {
                return Err(format!(
                    "partition \"{}\" has no size: only the last partition may take the rest of the disk",
                    spec.label
                ))
            }
        };
        if first_lba > last_usable || last_lba > last_usable {
            let room = (last_usable + 1).saturating_sub(first_lba) * SECTOR_SIZE as u64;
            return Err(format!(
                "partition \"{}\" does not fit: {} bytes are left at its 1 MiB-aligned start (the backup GPT takes the last 33 sectors)",
                spec.label, room
            ));
        }
        partitions.push(NewPartition {
            label: spec.label.clone(),
            type_guid: LINUX_FILESYSTEM_DATA,
            unique_guid: spec.guid.unwrap_or_else(random_guid),
            first_lba,
            last_lba,
        });
        next = (last_lba + 1).div_ceil(ALIGNMENT_SECTORS) * ALIGNMENT_SECTORS;
    }
    Ok(partitions)
}

/// `disk create`: a sparse `size`-byte file at `out` with a GPT of `specs`.
pub fn create(out: &Path, size: u64, specs: &[PartitionSpec]) -> Result<Vec<NewPartition>, String> {
    if !size.is_multiple_of(SECTOR_SIZE as u64) {
        return Err(format!("disk size {size} is not a whole number of sectors"));
    }
    let partitions = layout(size / SECTOR_SIZE as u64, specs)?;
    let file =
        File::create(out).map_err(|error| format!("cannot create {}: {error}", out.display()))?;
    file.set_len(size)
        .map_err(|error| format!("cannot size {}: {error}", out.display()))?;
    drop(file);
    let io = FileIo::open(out, true)?;
    write_gpt(&io, random_guid(), &partitions)
        .map_err(|error| format!("cannot write the GPT of {}: {error}", out.display()))?;
    Ok(partitions)
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} bytes"),
    }
}

/// `disk list`: the lines it prints.
pub fn list(disk: &Path) -> Result<Vec<String>, String> {
    let io = FileIo::open(disk, false)?;
    let table = read_gpt(&io).map_err(|error| format!("{}: {error}", disk.display()))?;
    let mut lines = vec![format!(
        "disk {}: guid {} sectors {} ({}), {} partition(s)",
        disk.display(),
        guid_text(table.disk_guid),
        table.disk_sectors,
        human(table.disk_sectors * SECTOR_SIZE as u64),
        table.partitions.len()
    )];
    if let HeaderSource::Backup { primary_error } = table.source {
        lines.push(format!(
            "warning: the primary GPT header is bad ({primary_error}); read through the backup"
        ));
    }
    for partition in &table.partitions {
        lines.push(format!(
            "partition {}: label \"{}\" guid {} lba {}..={} sectors {} ({})",
            partition.index + 1,
            partition.label,
            guid_text(partition.unique_guid),
            partition.first_lba,
            partition.last_lba,
            partition.sectors(),
            human(partition.sectors() * SECTOR_SIZE as u64)
        ));
    }
    Ok(lines)
}

/// `disk read`: copies the partition `selector` names to `out`, through the hypervisor's own
/// bounds-checked [`PartitionDisk`]. Returns the bytes copied.
pub fn read(disk: &Path, selector: &PartitionSelector, out: &mut dyn Write) -> Result<u64, String> {
    let io = Arc::new(FileIo::open(disk, false)?);
    let table = read_gpt(&*io).map_err(|error| format!("{}: {error}", disk.display()))?;
    let partition = table
        .find(selector)
        .map_err(|error| format!("{}: {error}", disk.display()))?;
    let mut window = PartitionDisk::new(io.clone(), partition, false)
        .map_err(|error| format!("{}: {error}", disk.display()))?;
    const CHUNK_SECTORS: u64 = 2048;
    let mut buffer = vec![0u8; CHUNK_SECTORS as usize * SECTOR_SIZE];
    let mut sector = 0;
    while sector < window.sectors() {
        let count = CHUNK_SECTORS.min(window.sectors() - sector);
        let chunk = &mut buffer[..count as usize * SECTOR_SIZE];
        window.read(sector, chunk).map_err(|error| {
            format!(
                "{}: reading sector {sector} of the partition: {error}",
                disk.display()
            )
        })?;
        out.write_all(chunk)
            .map_err(|error| format!("cannot write the partition's bytes: {error}"))?;
        sector += count;
    }
    out.flush()
        .map_err(|error| format!("cannot write the partition's bytes: {error}"))?;
    Ok(window.sectors() * SECTOR_SIZE as u64)
}

/// Runs `disk ARGS...`; the error is the message to print (exit status 1).
pub fn main(mut args: impl Iterator<Item = String>) -> Result<(), String> {
    let command = args.next().ok_or_else(|| USAGE.to_string())?;
    let (mut out, mut size, mut disk, mut label, mut guid) = (None, None, None, None, None);
    let mut specs = Vec::new();
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| format!("{arg} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--out" => out = Some(PathBuf::from(value()?)),
            "--size" => size = Some(parse_size(&value()?)?),
            "--disk" => disk = Some(PathBuf::from(value()?)),
            "--partition" if command == "create" => specs.push(parse_partition_spec(&value()?)?),
            "--partition" => label = Some(value()?),
            "--guid" => {
                let text = value()?;
                guid =
                    Some(parse_guid(&text).ok_or_else(|| {
                        format!("\"{text}\" is not a GUID (8-4-4-4-12 hex digits)")
                    })?);
            }
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument '{other}'\n{USAGE}")),
        }
    }
    let required = |what: Option<PathBuf>, name: &str| {
        what.ok_or_else(|| format!("disk {command}: {name} is required\n{USAGE}"))
    };
    match command.as_str() {
        "create" => {
            let out = required(out, "--out")?;
            let size = size.ok_or_else(|| format!("disk create: --size is required\n{USAGE}"))?;
            let partitions = create(&out, size, &specs)?;
            println!(
                "ringzero-boot: wrote {} ({}, {} partition(s))",
                out.display(),
                human(size),
                partitions.len()
            );
            Ok(())
        }
        "list" => {
            for line in list(&required(disk, "--disk")?)? {
                println!("{line}");
            }
            Ok(())
        }
        "read" => {
            let disk = required(disk, "--disk")?;
            let selector = match (label, guid) {
                (Some(label), None) => PartitionSelector::Label(label),
                (None, Some(guid)) => PartitionSelector::Guid(guid),
                _ => {
                    return Err(format!(
                        "disk read: give one of --partition LABEL or --guid GUID\n{USAGE}"
                    ))
                }
            };
            match out {
                Some(path) => {
                    let mut file = File::create(&path)
                        .map_err(|error| format!("cannot create {}: {error}", path.display()))?;
                    read(&disk, &selector, &mut file).map(drop)
                }
                None => read(&disk, &selector, &mut std::io::stdout().lock()).map(drop),
            }
        }
        other => Err(format!("unknown disk command '{other}'\n{USAGE}")),
    }
}

#[cfg(test)]
mod tests;
