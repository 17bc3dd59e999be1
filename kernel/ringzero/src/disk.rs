//! The physical disk: the hypervisor's own driver for the virtio-blk device on the host's PCI
//! bus, on the `virtio-drivers` crate's PCI transport and split virtqueue, offered to the VMs'
//! disk backends as [`ringzero_vdisk::SectorIo`]. The partitions VMs get are windows onto it
//! (`ringzero-vdisk`).
//!
//! Why not the crate's `VirtIOBlk`: its blocking calls spin on the used ring without a time
//! limit, and its flush has no non-blocking form (its queue is private), so a disk that never
//! completes a flush would hang the CPU for good. The block protocol on top of the queue is
//! small (a 16-byte header, the data, a status byte), so this module speaks it itself and bounds
//! every request, flush included.
//!
//! - Found once at boot ([`init`]), kernel-global ([`physical_disk`]); one spin lock
//!   serializes the requests of every CPU.
//! - Requests complete by polling (no interrupt is set up), one at a time, in chunks of at most
//!   [`CHUNK_BYTES`] so another CPU waits for the lock at most one chunk.
//! - Every request (read, write, flush) is added to the queue without waiting
//!   (`VirtQueue::add`, `peek_used`, `pop_used`) on the driver's own heap buffers (header,
//!   status byte and one chunk of data, copied from and to the caller's buffer), and waited for
//!   at most [`REQUEST_TIMEOUT_MILLIS`]. A request that misses it leaves the buffers to the
//!   device, which may still write them at any time: they are leaked (never freed or reused),
//!   the disk is marked failed with one `disk: read of N sectors at LBA L not completed within
//!   ...` line (`disk: flush not completed within ...` for a flush), and from then on every request fails at once with [`DiskError::Io`], which the
//!   VMs' virtio-blk devices answer with VIRTIO_BLK_S_IOERR. The device is not reset: a reset
//!   may itself wait for the stuck request (QEMU drains its in-flight requests on reset).
//! - DMA needs host-physical addresses: [`DmaHal`] hands out frames from the kernel's frame
//!   allocator (mapped by the physical window) and translates buffers through the page tables
//!   (the request buffers are on the heap, which is physically contiguous, so they never need
//!   a bounce buffer). The driver, with its virtqueue, lives for good in a static, so the
//!   queue's DMA memory is never freed either.
//! - The boot never writes the disk: it reads LBA 1 to say whether a GPT header is there.
//!
//! Spec: Virtual I/O Device (VIRTIO) Version 1.2, 3.1.1 (driver initialization), 5.2 (block
//! device: VIRTIO_BLK_F_RO is feature bit 5, VIRTIO_BLK_F_FLUSH bit 9, the request layout and
//! types IN 0, OUT 1, FLUSH 4), 4.1 (virtio over PCI: vendor 0x1AF4,
//! device 0x1001 transitional or 0x1042 modern block device).

use alloc::boxed::Box;
use core::sync::atomic::{AtomicBool, Ordering};
use ringzero_vdisk::{check_range, DiskError, SectorIo, SECTOR_SIZE};
use ringzero_virtio::blk;
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::{DeviceStatus, Transport};

use crate::pci;
use crate::time;
use crate::virtio_hal::DmaHal;

/// The block device's two PCI device IDs. See: VIRTIO 1.2 4.1.2.
const BLOCK_TRANSITIONAL: u16 = 0x1001;
const BLOCK_MODERN: u16 = 0x1042;
/// VIRTIO_BLK_F_RO: the device refuses writes. See: VIRTIO 1.2 5.2.3.
const FEATURE_RO: u64 = blk::features::RO;
/// VIRTIO_BLK_F_FLUSH: the device takes VIRTIO_BLK_T_FLUSH. See: VIRTIO 1.2 5.2.3.
const FEATURE_FLUSH: u64 = blk::features::FLUSH;
/// VIRTIO_F_VERSION_1: a driver must accept it when offered. See: VIRTIO 1.2 6.1.
const FEATURE_VERSION_1: u64 = 1 << 32;
/// Entries of the request queue (queue 0): one request at a time needs at most 3.
const QUEUE_SIZE: usize = 16;
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
    /// `struct virtio_blk_req`'s header ([`blk::encode_header`]). See: VIRTIO 1.2 5.2.6.
    header: [u8; blk::HEADER_SIZE as usize],
    /// The status byte the device writes last.
    status: [u8; 1],
    /// [`CHUNK_BYTES`] long.
    data: Box<[u8]>,
}

/// The device and its request memory, under [`PhysicalDisk::driver`]'s lock.
struct Driver {
    transport: PciTransport,
    /// The request queue (queue 0), `virtio-drivers`' split virtqueue.
    queue: VirtQueue<DmaHal, QUEUE_SIZE>,
    /// `None` once a timed-out request left them to the device.
    buffers: Option<Box<RequestBuffers>>,
}

/// The kinds of request the hypervisor sends.
#[derive(Clone, Copy)]
enum Operation {
    Read,
    Write,
    Flush,
}

impl Operation {
    fn name(self) -> &'static str {
        match self {
            Operation::Read => "read",
            Operation::Write => "write",
            Operation::Flush => "flush",
        }
    }

    fn request_type(self) -> u32 {
        match self {
            Operation::Read => blk::request::IN,
            Operation::Write => blk::request::OUT,
            Operation::Flush => blk::request::FLUSH,
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

    /// Runs one request (`data.len()` is at most [`CHUNK_BYTES`], whole sectors; empty for a
    /// flush) through the driver's own buffers and waits for it at most
    /// [`REQUEST_TIMEOUT_MILLIS`]. A read's data is copied out to `data` once the device
    /// finished it; a write's is copied in before.
    fn request(
        &self,
        driver: &mut Driver,
        operation: Operation,
        lba: u64,
        data: ChunkData<'_>,
    ) -> Result<(), DiskError> {
        if self.failed() {
            return Err(DiskError::Io);
        }
        let Driver {
            transport,
            queue,
            buffers,
        } = driver;
        let Some(owned) = buffers.as_mut() else {
            return Err(DiskError::Io);
        };
        let length = data.len();
        let RequestBuffers {
            header,
            status,
            data: bytes,
        } = &mut **owned;
        *header = blk::encode_header(operation.request_type(), lba);
        status[0] = u8::MAX;
        if let ChunkData::Out(source) = &data {
            bytes[..length].copy_from_slice(source);
        }
        let bytes = &mut bytes[..length];
        // The chain: header (device-readable), then the data (device-writable for a read,
        // readable for a write; none for a flush), then the status byte (device-writable).
        // See: VIRTIO 1.2 5.2.6.
        let (inputs, outputs): (&[&[u8]], &mut [&mut [u8]]) = match operation {
            Operation::Read => (&[&header[..]], &mut [bytes, &mut status[..]]),
            Operation::Write => (&[&header[..], &bytes[..]], &mut [&mut status[..]]),
            Operation::Flush => (&[&header[..]], &mut [&mut status[..]]),
        };
        // SAFETY: the header, data and status live in heap allocations `buffers` owns and are
        // touched by nothing else until `pop_used` below returns for this token; if the device
        // does not finish in time, they are leaked (never freed or reused) and the disk is
        // marked failed, so the device may still read and write them at any later time.
        let token = unsafe { queue.add(inputs, outputs) }
            .map_err(|error| io_error(operation.name(), lba, error))?;
        if queue.should_notify() {
            transport.notify(0);
        }
        let deadline = time::deadline_after_millis(REQUEST_TIMEOUT_MILLIS);
        // One request at a time (under the lock): the next used element is this one.
        while queue.peek_used() != Some(token) {
            if time::passed(deadline) {
                // The device still owns the buffers: leak them.
                if let Some(abandoned) = buffers.take() {
                    let _ = Box::leak(abandoned);
                }
                self.failed.store(true, Ordering::Release);
                let failed = "the disk is taken as failed; every later request fails at once \
                              (I/O error)";
                match operation {
                    Operation::Flush => log::error!(
                        "disk: flush not completed within {REQUEST_TIMEOUT_MILLIS} ms: {failed}"
                    ),
                    _ => log::error!(
                        "disk: {} of {} sectors at LBA {lba} not completed within \
                         {REQUEST_TIMEOUT_MILLIS} ms: {failed}",
                        operation.name(),
                        length / SECTOR_SIZE
                    ),
                }
                return Err(DiskError::Io);
            }
            core::hint::spin_loop();
        }
        // SAFETY: the same buffers as were added with this token, which the device has now
        // finished (it is at the head of the used ring).
        unsafe { queue.pop_used(token, inputs, outputs) }
            .map_err(|error| io_error(operation.name(), lba, error))?;
        if status[0] != blk::request_status::OK {
            log::warn!(
                "disk: {} at LBA {lba} failed: device status {}",
                operation.name(),
                status[0]
            );
            return Err(DiskError::Io);
        }
        if let ChunkData::In(target) = data {
            target.copy_from_slice(bytes);
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
            self.request(&mut driver, Operation::Read, sector, ChunkData::In(chunk))?;
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
            self.request(&mut driver, Operation::Write, sector, ChunkData::Out(chunk))?;
            sector += (chunk.len() / SECTOR_SIZE) as u64;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), DiskError> {
        if self.failed() {
            return Err(DiskError::Io);
        }
        if !self.flush_supported {
            // Without VIRTIO_BLK_F_FLUSH the device writes through. See: VIRTIO 1.2 5.2.6.2.
            return Ok(());
        }
        let mut driver = self.driver.lock();
        self.request(&mut driver, Operation::Flush, 0, ChunkData::Out(&[]))
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
    // Driver initialization: reset, ACKNOWLEDGE + DRIVER, features, FEATURES_OK, the queue,
    // DRIVER_OK. See: VIRTIO 1.2 3.1.1.
    transport.set_status(DeviceStatus::empty());
    transport.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
    let offered = transport.read_device_features();
    let accepted = offered & (FEATURE_RO | FEATURE_FLUSH | FEATURE_VERSION_1);
    transport.write_driver_features(accepted);
    transport
        .set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK);
    if !transport.get_status().contains(DeviceStatus::FEATURES_OK) {
        fail(&format_args!("it refused the features {accepted:#x}"));
        return None;
    }
    let flush_supported = accepted & FEATURE_FLUSH != 0;
    let read_only = accepted & FEATURE_RO != 0;
    // `capacity`, a little-endian u64 at offset 0 of the configuration. See: VIRTIO 1.2 5.2.4.
    let capacity = transport.read_consistent(|| {
        let low = transport.read_config_space::<u32>(0)?;
        let high = transport.read_config_space::<u32>(4)?;
        Ok(u64::from(low) | u64::from(high) << 32)
    });
    let sectors = match capacity {
        Ok(sectors) => sectors,
        Err(error) => {
            fail(&error);
            return None;
        }
    };
    let queue = match VirtQueue::<DmaHal, QUEUE_SIZE>::new(&mut transport, 0, false, false) {
        Ok(queue) => queue,
        Err(error) => {
            fail(&error);
            return None;
        }
    };
    transport.finish_init();
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
        header: [0; blk::HEADER_SIZE as usize],
        status: [0],
        data: alloc::vec![0; CHUNK_BYTES].into_boxed_slice(),
    });
    Some(PhysicalDisk {
        sectors,
        flush_supported,
        read_only,
        failed: AtomicBool::new(false),
        driver: spin::Mutex::new(Driver {
            transport,
            queue,
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
