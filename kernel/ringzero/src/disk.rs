//! The physical disk: the hypervisor's own driver for the virtio-blk device on the host's PCI
//! bus, through the `virtio-drivers` crate, offered to the VMs' disk backends as
//! [`ringzero_vdisk::SectorIo`]. The partitions VMs get are windows onto it (`ringzero-vdisk`).
//!
//! - Found once at boot ([`init`]), kernel-global ([`physical_disk`]); one spin lock
//!   serializes the requests of every CPU.
//! - Requests complete by polling (no interrupt is set up), one at a time, in chunks of at most
//!   [`CHUNK_BYTES`] so another CPU waits for the lock at most one chunk.
//! - Reads and writes use the crate's non-blocking calls (`read_blocks_nb`/`write_blocks_nb`,
//!   `peek_used`, `complete_*_blocks`) on the driver's own heap buffers (request, response and
//!   one chunk of data, copied from and to the caller's buffer), and wait at most
//!   [`REQUEST_TIMEOUT_MILLIS`]. A request that misses it leaves the buffers to the device,
//!   which may still write them at any time: they are leaked (never freed or reused), the disk
//!   is marked failed with one `disk: read of N sectors at LBA L not completed within ...`
//!   line, and from then on every request fails at once with [`DiskError::Io`], which the VMs'
//!   virtio-blk devices answer with VIRTIO_BLK_S_IOERR. The device is not reset: a reset may
//!   itself wait for the stuck request (QEMU drains its in-flight requests on reset).
//! - Flush still waits without a limit: `virtio-drivers` 0.13 has no non-blocking flush and
//!   keeps its virtqueue private, so a flush the device never completes hangs this CPU. On a
//!   disk already marked failed it fails at once like the rest.
//! - DMA needs host-physical addresses: [`DmaHal`] hands out frames from the kernel's frame
//!   allocator (mapped by the physical window) and translates buffers through the page tables
//!   (the request buffers are on the heap, which is physically contiguous, so they never need
//!   a bounce buffer). The driver, with its virtqueue, lives for good in a static, so the
//!   queue's DMA memory is never freed either.
//! - The boot never writes the disk: it reads LBA 1 to say whether a GPT header is there.
//!
//! Spec: Virtual I/O Device (VIRTIO) Version 1.2, 5.2 (block device: VIRTIO_BLK_F_RO is feature
//! bit 5, VIRTIO_BLK_F_FLUSH bit 9, VIRTIO_BLK_T_FLUSH), 4.1 (virtio over PCI: vendor 0x1AF4,
//! device 0x1001 transitional or 0x1042 modern block device).

use alloc::boxed::Box;
use core::sync::atomic::{AtomicBool, Ordering};
use ringzero_vdisk::{check_range, DiskError, SectorIo, SECTOR_SIZE};
use virtio_drivers::device::blk::{BlkReq, BlkResp, VirtIOBlk};
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::{DeviceStatus, Transport};

use crate::pci;
use crate::time;
use crate::virtio_hal::DmaHal;

/// The block device's two PCI device IDs. See: VIRTIO 1.2 4.1.2.
const BLOCK_TRANSITIONAL: u16 = 0x1001;
const BLOCK_MODERN: u16 = 0x1042;
/// VIRTIO_BLK_F_FLUSH: the device takes VIRTIO_BLK_T_FLUSH. See: VIRTIO 1.2 5.2.3.
const FEATURE_FLUSH: u64 = 1 << 9;
/// Largest piece of one request sent to the device at once.
pub const CHUNK_BYTES: usize = 64 * 1024;
/// The GPT header's signature, at the start of LBA 1. See: UEFI 2.10 5.3.2.
const GPT_SIGNATURE: &[u8; 8] = b"EFI PART";

/// How long one request (a chunk of at most [`CHUNK_BYTES`], or a flush) may take before the
/// disk is taken as failed. A healthy disk answers in milliseconds; a slow or busy one (a
/// spinning disk behind a deep queue, a drive retrying a weak sector: desktop drives retry for up
/// to about 7 s before they report an error) in a few seconds. Waiting longer helps no one: the
/// waiting CPU runs no vCPU meanwhile, and every other CPU that wants the disk waits for the lock.
/// (Linux waits 30 s before it times out a block request, but it does not stop a CPU meanwhile.)
pub const REQUEST_TIMEOUT_MILLIS: u64 = 10_000;

/// The hypervisor's physical disk (see the module documentation).
pub struct PhysicalDisk {
    sectors: u64,
    flush_supported: bool,
    read_only: bool,
    /// Set once a request timed out: every later request fails at once, without the lock.
    failed: AtomicBool,
    driver: spin::Mutex<Driver>,
}

/// The memory the device reads and writes for one request, owned by the driver (never the
/// caller's buffer): after a timeout the device still owns it, so it is leaked, never freed.
struct RequestBuffers {
    request: BlkReq,
    response: BlkResp,
    /// [`CHUNK_BYTES`] long.
    data: Box<[u8]>,
}

/// The driver and its request memory, under [`PhysicalDisk::driver`]'s lock.
struct Driver {
    blk: VirtIOBlk<DmaHal, PciTransport>,
    /// `None` once a timed-out request left them to the device.
    buffers: Option<Box<RequestBuffers>>,
}

/// Which request timed out, for the log line.
#[derive(Clone, Copy)]
enum Operation {
    Read,
    Write,
}

impl Operation {
    fn name(self) -> &'static str {
        match self {
            Operation::Read => "read",
            Operation::Write => "write",
        }
    }
}

static DISK: spin::Once<Option<PhysicalDisk>> = spin::Once::new();

/// The physical disk found at boot, if any.
pub fn physical_disk() -> Option<&'static PhysicalDisk> {
    DISK.get().and_then(Option::as_ref)
}

impl PhysicalDisk {
    /// Whether the device takes flush requests (without it, [`SectorIo::flush`] does nothing:
    /// the device writes through).
    pub fn flush_supported(&self) -> bool {
        self.flush_supported
    }

    /// Whether the device refuses writes (VIRTIO_BLK_F_RO).
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Whether a request timed out, so that every request now fails at once.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Runs one chunk (`data.len()` is at most [`CHUNK_BYTES`], whole sectors) through the
    /// driver's own buffers and waits for it at most [`REQUEST_TIMEOUT_MILLIS`]. A read's data is
    /// copied out to `data` once the device finished it; a write's is copied in before.
    fn chunk(
        &self,
        driver: &mut Driver,
        operation: Operation,
        lba: u64,
        data: ChunkData<'_>,
    ) -> Result<(), DiskError> {
        if self.failed() {
            return Err(DiskError::Io);
        }
        let Driver { blk, buffers } = driver;
        let Some(owned) = buffers.as_mut() else {
            return Err(DiskError::Io);
        };
        let length = data.len();
        let RequestBuffers {
            request,
            response,
            data: bytes,
        } = &mut **owned;
        if let ChunkData::Out(source) = &data {
            bytes[..length].copy_from_slice(source);
        }
        let sector = lba as usize;
        // SAFETY: the request, data and response live in the heap allocation `buffers` owns and
        // are touched by nothing else until `complete_*` below returns for this token; if the
        // device does not finish in time, that allocation is leaked (never freed or reused) and
        // the disk is marked failed, so the device may still write it at any later time.
        let submitted = unsafe {
            match operation {
                Operation::Read => {
                    blk.read_blocks_nb(sector, request, &mut bytes[..length], response)
                }
                Operation::Write => {
                    blk.write_blocks_nb(sector, request, &bytes[..length], response)
                }
            }
        };
        let token = submitted.map_err(|error| io_error(operation.name(), lba, error))?;
        let deadline = time::deadline_after_millis(REQUEST_TIMEOUT_MILLIS);
        // One request at a time (under the lock): the next used element is this one.
        while blk.peek_used() != Some(token) {
            if time::passed(deadline) {
                // The device still owns the buffers: leak them.
                if let Some(abandoned) = buffers.take() {
                    let _ = Box::leak(abandoned);
                }
                self.failed.store(true, Ordering::Release);
                log::error!(
                    "disk: {} of {} sectors at LBA {lba} not completed within {} ms: the disk \
                     is taken as failed; every later request fails at once (I/O error)",
                    operation.name(),
                    length / SECTOR_SIZE,
                    REQUEST_TIMEOUT_MILLIS
                );
                return Err(DiskError::Io);
            }
            core::hint::spin_loop();
        }
        // SAFETY: the same request, data and response as were submitted with this token, which
        // the device has now finished (it is at the head of the used ring).
        let completed = unsafe {
            match operation {
                Operation::Read => {
                    blk.complete_read_blocks(token, request, &mut bytes[..length], response)
                }
                Operation::Write => {
                    blk.complete_write_blocks(token, request, &bytes[..length], response)
                }
            }
        };
        completed.map_err(|error| io_error(operation.name(), lba, error))?;
        if let ChunkData::In(target) = data {
            target.copy_from_slice(&bytes[..length]);
        }
        Ok(())
    }
}

/// The caller's side of one chunk.
enum ChunkData<'a> {
    /// A read: filled once the device finished.
    In(&'a mut [u8]),
    /// A write: copied to the driver's buffer before the request is sent.
    Out(&'a [u8]),
}

impl ChunkData<'_> {
    fn len(&self) -> usize {
        match self {
            ChunkData::In(buf) => buf.len(),
            ChunkData::Out(buf) => buf.len(),
        }
    }
}

fn io_error(what: &str, lba: u64, error: virtio_drivers::Error) -> DiskError {
    log::warn!("disk: {what} at LBA {lba} failed: {error}");
    DiskError::Io
}

impl SectorIo for PhysicalDisk {
    fn sectors(&self) -> u64 {
        self.sectors
    }

    fn read(&self, lba: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        check_range(self.sectors, lba, buf.len())?;
        if self.failed() {
            return Err(DiskError::Io);
        }
        let mut driver = self.driver.lock();
        let mut sector = lba;
        for chunk in buf.chunks_mut(CHUNK_BYTES) {
            let sectors = (chunk.len() / SECTOR_SIZE) as u64;
            self.chunk(&mut driver, Operation::Read, sector, ChunkData::In(chunk))?;
            sector += sectors;
        }
        Ok(())
    }

    fn write(&self, lba: u64, buf: &[u8]) -> Result<(), DiskError> {
        check_range(self.sectors, lba, buf.len())?;
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        if self.failed() {
            return Err(DiskError::Io);
        }
        let mut driver = self.driver.lock();
        let mut sector = lba;
        for chunk in buf.chunks(CHUNK_BYTES) {
            self.chunk(&mut driver, Operation::Write, sector, ChunkData::Out(chunk))?;
            sector += (chunk.len() / SECTOR_SIZE) as u64;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), DiskError> {
        if self.failed() {
            return Err(DiskError::Io);
        }
        let mut driver = self.driver.lock();
        if self.failed() {
            return Err(DiskError::Io);
        }
        // `virtio-drivers` 0.13 has no non-blocking flush and keeps its queue private, so this
        // one request still waits without a time limit (see the module documentation). The
        // driver sends VIRTIO_BLK_T_FLUSH when the feature was negotiated, else nothing.
        driver
            .blk
            .flush()
            .map_err(|error| io_error("flush", 0, error))
    }
}

/// Finds the virtio-blk device on the host's PCI bus, sets it up, logs the `disk:` lines and
/// keeps it for [`physical_disk`]. Runs once, on the boot CPU, before the other CPUs start
/// (it maps the device's registers). Never writes the disk.
pub fn init() {
    DISK.call_once(|| {
        let disk = find();
        if let Some(disk) = &disk {
            report_partition_table(disk);
        }
        disk
    });
}

fn find() -> Option<PhysicalDisk> {
    let Some(function) = pci::find_virtio(&[BLOCK_TRANSITIONAL, BLOCK_MODERN]) else {
        log::info!(
            "disk: none (no virtio-blk on the host PCI bus; {} PCI functions seen)",
            pci::functions().len()
        );
        return None;
    };
    let location = function.location;
    let fail = |why: &dyn core::fmt::Display| {
        log::warn!("disk: virtio-blk at {location} cannot be used: {why}; no disk");
    };
    let mut transport = match pci::virtio_transport(location) {
        Ok(transport) => transport,
        Err(error) => {
            fail(&error);
            return None;
        }
    };
    // The features the device offers, read as `begin_init` will (reset, ACKNOWLEDGE + DRIVER,
    // then the feature bits), to say whether flushes reach the medium.
    // See: VIRTIO 1.2 3.1.1 (driver initialization).
    transport.set_status(DeviceStatus::empty());
    transport.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
    let flush_supported = transport.read_device_features() & FEATURE_FLUSH != 0;
    let driver = match VirtIOBlk::<DmaHal, _>::new(transport) {
        Ok(driver) => driver,
        Err(error) => {
            fail(&error);
            return None;
        }
    };
    let sectors = driver.capacity();
    let read_only = driver.readonly();
    log::info!(
        "disk: virtio-blk at {location}, {sectors} sectors ({} MiB), flush={}{}",
        (sectors * SECTOR_SIZE as u64) >> 20,
        if flush_supported { "yes" } else { "no" },
        if read_only { ", read-only" } else { "" }
    );
    if !flush_supported {
        log::warn!(
            "disk: the device offers no flush: writes are as durable as its cache makes them"
        );
    }
    let buffers = Box::new(RequestBuffers {
        request: BlkReq::default(),
        response: BlkResp::default(),
        data: alloc::vec![0; CHUNK_BYTES].into_boxed_slice(),
    });
    Some(PhysicalDisk {
        sectors,
        flush_supported,
        read_only,
        failed: AtomicBool::new(false),
        driver: spin::Mutex::new(Driver {
            blk: driver,
            buffers: Some(buffers),
        }),
    })
}

/// Reads LBA 1 and says whether it holds a GPT header (the partitions themselves are read by
/// `ringzero-vdisk`).
fn report_partition_table(disk: &PhysicalDisk) {
    if disk.sectors < 2 {
        log::info!("disk: too small for a GPT (no LBA 1)");
        return;
    }
    let mut sector = [0u8; SECTOR_SIZE];
    let started = ringzero_x86::hw::rdtsc();
    match disk.read(1, &mut sector) {
        Ok(()) => {
            let micros = crate::time::tsc_to_micros(ringzero_x86::hw::rdtsc() - started);
            if sector.starts_with(GPT_SIGNATURE) {
                log::info!("disk: LBA 1 holds a GPT header (\"EFI PART\"); read in {micros} us");
            } else {
                log::info!("disk: LBA 1 holds no GPT header; read in {micros} us");
            }
        }
        Err(error) => log::warn!("disk: reading LBA 1 failed: {error:?}"),
    }
}

/// Sectors the test hook writes: more than one chunk, so the request is split.
const TEST_SECTORS: usize = CHUNK_BYTES / SECTOR_SIZE + 2;
/// What the test hook writes at each sector's start: this, then the sector number.
pub const TEST_PATTERN: &[u8; 16] = b"ringzero-disk-w:";

/// Test hook `disk-write` (the only boot that writes the disk; tests give it a scratch file):
/// writes [`TEST_SECTORS`] sectors ending one sector before the disk's end (each starting with
/// [`TEST_PATTERN`] and its LBA, little-endian), flushes, reads them back and compares, then
/// times a read of the whole disk. Logs `disk: test hook: ...` lines.
pub fn exercise_for_test() {
    let Some(disk) = physical_disk() else {
        log::warn!("disk: test hook: no disk to write");
        return;
    };
    let count = TEST_SECTORS as u64;
    if disk.sectors < count + 1 {
        log::warn!(
            "disk: test hook: the disk is smaller than {} sectors",
            count + 1
        );
        return;
    }
    let first = disk.sectors - 1 - count;
    let mut written = alloc::vec![0u8; TEST_SECTORS * SECTOR_SIZE];
    for (index, sector) in written.chunks_mut(SECTOR_SIZE).enumerate() {
        sector[..16].copy_from_slice(TEST_PATTERN);
        sector[16..24].copy_from_slice(&(first + index as u64).to_le_bytes());
    }
    let mut read_back = alloc::vec![0u8; written.len()];
    let outcome = disk
        .write(first, &written)
        .and_then(|()| disk.flush())
        .and_then(|()| disk.read(first, &mut read_back));
    match outcome {
        Ok(()) if read_back == written => log::info!(
            "disk: test hook: wrote, flushed and read back {count} sectors at LBA {first}: equal"
        ),
        Ok(()) => log::warn!("disk: test hook: {count} sectors at LBA {first} read back different"),
        Err(error) => {
            log::warn!("disk: test hook: writing {count} sectors at LBA {first}: {error:?}")
        }
    }
    // Requests past the end are refused before they reach the device.
    let mut one = [0u8; SECTOR_SIZE];
    if disk.read(disk.sectors, &mut one) == Err(DiskError::OutOfRange)
        && disk.write(disk.sectors - 1, &written[..2 * SECTOR_SIZE]) == Err(DiskError::OutOfRange)
    {
        log::info!("disk: test hook: requests past the end are refused");
    } else {
        log::warn!("disk: test hook: a request past the end was not refused");
    }
    // The whole disk, in buffers of one chunk.
    let mut buffer = alloc::vec![0u8; CHUNK_BYTES];
    let started = ringzero_x86::hw::rdtsc();
    let mut lba = 0;
    while lba < disk.sectors {
        let sectors = (disk.sectors - lba).min((CHUNK_BYTES / SECTOR_SIZE) as u64);
        if let Err(error) = disk.read(lba, &mut buffer[..sectors as usize * SECTOR_SIZE]) {
            log::warn!("disk: test hook: reading LBA {lba}: {error:?}");
            return;
        }
        lba += sectors;
    }
    let micros = crate::time::tsc_to_micros(ringzero_x86::hw::rdtsc() - started).max(1);
    log::info!(
        "disk: test hook: read all {} sectors in {micros} us ({} sectors/s)",
        disk.sectors,
        u128::from(disk.sectors) * 1_000_000 / u128::from(micros)
    );
}
