//! The VMs' virtual disks, built from the manifest's disk lists (`[[vm.disk]]` in the config):
//! a partition of the physical disk (found by GPT label or unique GUID on the disk `disk.rs`
//! drives) or an image packed into the boot bundle. The guest-facing virtio-blk device on top
//! of each is `ringzero_virtio`'s; this module only chooses and checks the backends.
//!
//! Checked at boot, each refusal naming the VM and the disk (the VM is not started, the others
//! are): a partition that is not on the disk (or no disk at all), and a partition that one VM
//! may write while another disk (of any VM) names it too. The host tool already refused the
//! cases it could see; only here is it known that a label and a GUID name the same partition.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::sync::Arc;
use alloc::vec::Vec;
use ringzero_loader::manifest::{DiskSource, VmManifest};
use ringzero_vdisk::gpt::{self, GptTable, Guid, HeaderSource, PartitionSelector};
use ringzero_vdisk::{BlockDevice, DiskError, ImageDisk, PartitionDisk, SectorIo};

use crate::disk::{physical_disk, PhysicalDisk};

/// The physical disk as the shared `SectorIo` the partition windows hold.
struct Physical(&'static PhysicalDisk);

impl SectorIo for Physical {
    fn sectors(&self) -> u64 {
        self.0.sectors()
    }
    fn read(&self, lba: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.0.read(lba, buf)
    }
    fn write(&self, lba: u64, buf: &[u8]) -> Result<(), DiskError> {
        self.0.write(lba, buf)
    }
    fn flush(&self) -> Result<(), DiskError> {
        self.0.flush()
    }
}

/// The physical disk and its partition table, read once.
struct Table {
    io: Arc<dyn SectorIo>,
    table: GptTable,
}

/// `Err` says why there is no table (no disk, or no valid GPT on it).
static TABLE: spin::Once<Result<Table, String>> = spin::Once::new();

/// Partitions claimed by the VMs built so far: partition index -> (VM name, writable).
static CLAIMS: spin::Mutex<BTreeMap<u32, (String, bool)>> = spin::Mutex::new(BTreeMap::new());

fn table() -> &'static Result<Table, String> {
    TABLE.call_once(|| {
        let Some(disk) = physical_disk() else {
            return Err("the hypervisor has no physical disk (run with --disk FILE)".into());
        };
        let io: Arc<dyn SectorIo> = Arc::new(Physical(disk));
        match gpt::read_gpt(io.as_ref()) {
            Ok(table) => {
                if let HeaderSource::Backup { primary_error } = &table.source {
                    log::warn!("disk: the primary GPT header is bad ({primary_error}); using the backup at the end of the disk");
                }
                for partition in &table.partitions {
                    log::info!(
                        "disk: partition {} \"{}\" {} LBA {}..={} ({} MiB)",
                        partition.index,
                        partition.label,
                        gpt::guid_text(partition.unique_guid),
                        partition.first_lba,
                        partition.last_lba,
                        partition.sectors() >> 11
                    );
                }
                Ok(Table { io, table })
            }
            Err(error) => Err(format!("the physical disk has no valid GPT ({error})")),
        }
    })
}

/// The backends of `vm`'s disks, in device order; `Err` names the disk and the problem (the
/// VM is then not started). Partitions are claimed for this VM only when every disk is good.
pub fn build(vm: &VmManifest<'static>) -> Result<Vec<Box<dyn BlockDevice>>, String> {
    let mut disks: Vec<Box<dyn BlockDevice>> = Vec::new();
    let mut claims: Vec<(u32, bool, String)> = Vec::new();
    for (number, disk) in vm.disks.iter().enumerate() {
        let what = |problem: &dyn core::fmt::Display| format!("disk #{}: {problem}", number + 1);
        let device: Box<dyn BlockDevice> = match disk.source {
            DiskSource::Image { name, bytes } => {
                let image = if disk.writable {
                    ImageDisk::writable_copy(bytes, name)
                } else {
                    ImageDisk::read_only(bytes, name)
                };
                Box::new(image.map_err(|error| what(&format!("image {name}: {error}")))?)
            }
            DiskSource::PartitionLabel(_) | DiskSource::PartitionGuid(_) => {
                let selector = match disk.source {
                    DiskSource::PartitionLabel(label) => {
                        PartitionSelector::Label(label.to_string())
                    }
                    DiskSource::PartitionGuid(bytes) => {
                        PartitionSelector::Guid(Guid::from_bytes(bytes))
                    }
                    DiskSource::Image { .. } => unreachable!("matched above"),
                };
                let table = table()
                    .as_ref()
                    .map_err(|why| what(&format!("partition {selector}: {why}")))?;
                let partition = table.table.find(&selector).map_err(|error| what(&error))?;
                if claims.iter().any(|(index, ..)| *index == partition.index) {
                    return Err(what(&format!(
                        "partition {selector} is already another disk of this VM"
                    )));
                }
                if disk.writable && physical_disk().is_some_and(PhysicalDisk::read_only) {
                    return Err(what(&format!(
                        "partition {selector} is writable but the physical disk is read-only"
                    )));
                }
                if disk.writable && physical_disk().is_some_and(|d| !d.flush_supported()) {
                    log::info!("vm {}: disk #{}: the physical disk offers no flush (it writes through): a guest's flush completes at once", vm.name, number + 1);
                }
                claims.push((partition.index, disk.writable, partition.label.clone()));
                Box::new(
                    PartitionDisk::new(table.io.clone(), partition, disk.writable)
                        .map_err(|error| what(&format!("partition {selector}: {error}")))?,
                )
            }
        };
        disks.push(device);
    }
    let mut claimed = CLAIMS.lock();
    for (index, writable, label) in &claims {
        if let Some((owner, owner_writable)) = claimed.get(index) {
            if *writable || *owner_writable {
                return Err(format!(
                    "partition {index} (\"{label}\") is already a disk of VM {owner}{}: a writable partition belongs to one disk of one VM",
                    if *owner_writable { ", which may write it" } else { "" }
                ));
            }
        }
    }
    for (index, writable, _) in claims {
        claimed.insert(index, (vm.name.to_string(), writable));
    }
    Ok(disks)
}
