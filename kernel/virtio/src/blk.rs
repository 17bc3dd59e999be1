//! The virtio-blk device model (spec 5.2) over a [`BlockDevice`] backend.
//!
//! One request queue (no VIRTIO_BLK_F_MQ). Requests (5.2.6) are a 16-byte header (le32 type,
//! le32 reserved, le64 sector) in the device-readable part, data, and a status byte: the last
//! byte of the device-writable part. The model follows 2.6.4 (message framing): it makes no
//! assumption about how the driver split these over descriptors.
//!
//! Supported types: IN, OUT, FLUSH, GET_ID; every other type gets UNSUPP. Features offered:
//! VERSION_1, SIZE_MAX and SEG_MAX (so that Linux never builds a request larger than the
//! virtqueue walker accepts: SEG_MAX x SIZE_MAX = 254 x 4 KiB < 1 MiB, and SEG_MAX + header +
//! status fits the 256-entry queue without indirect descriptors), FLUSH (the backend may cache
//! writes), RO when the backend is read-only.
//!
//! Malformed-request policy: a chain the virtqueue walker refused goes back with used len 0 and
//! nothing written (its buffers cannot be trusted). A checked chain whose request is wrong
//! (short header, data not whole sectors, range past the end of the disk or overflowing, a
//! write to a read-only disk) gets status IOERR in its status byte; a chain with no writable
//! byte for the status goes back with used len 0. The device never needs a reset for a bad
//! request; queue-level faults are the transport's (DEVICE_NEEDS_RESET).
//!
//! Data moves through a 64 KiB bounce buffer in bounded chunks; the sector range is checked
//! against the capacity before the first byte moves, and the backend checks it again.

use alloc::vec;
use alloc::vec::Vec;

use ringzero_vdisk::{check_range, BlockDevice, DiskError, SECTOR_SIZE};

use crate::device::{feature, VirtioDevice};
use crate::memory::{GuestMemory, OutOfRam};
use crate::queue::{ChainError, Descriptor, DescriptorChain, MAX_QUEUE_SIZE};

/// The virtio device ID of a block device. See: spec 5.
pub const DEVICE_TYPE: u16 = 2;

/// Block feature bits. See: spec 5.2.3.
pub mod features {
    /// size_max in the configuration is the largest segment.
    pub const SIZE_MAX: u64 = 1 << 1;
    /// seg_max in the configuration is the most segments in a request.
    pub const SEG_MAX: u64 = 1 << 2;
    /// The device is read-only.
    pub const RO: u64 = 1 << 5;
    /// Cache flush command support.
    pub const FLUSH: u64 = 1 << 9;
}

/// Request types. See: spec 5.2.6.
pub mod request {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
}

/// Request status values. See: spec 5.2.6.
pub mod request_status {
    pub const OK: u8 = 0;
    pub const IOERR: u8 = 1;
    pub const UNSUPP: u8 = 2;
}

/// Bytes of the request header: le32 type, le32 reserved, le64 sector (5.2.6).
pub const HEADER_SIZE: u64 = 16;
/// Bytes of a GET_ID answer (5.2.6: VIRTIO_BLK_ID_BYTES).
pub const ID_BYTES: usize = 20;
/// The largest segment offered (size_max).
pub const SIZE_MAX: u32 = 4096;
/// The most data segments offered in one request (seg_max): the queue size less the header and
/// status descriptors.
pub const SEG_MAX: u32 = MAX_QUEUE_SIZE as u32 - 2;
/// The bounce buffer: the most bytes one backend call moves.
pub const BOUNCE_BYTES: usize = 64 * 1024;

/// Device configuration layout (5.2.4): le64 capacity at 0, le32 size_max at 8, le32 seg_max
/// at 12; the other fields (geometry, blk_size, topology, writeback, discard, write zeroes,
/// secure erase) belong to features not offered and read 0. 72 bytes in 1.2.
const CONFIG_SIZE: usize = 72;
const CONFIG_CAPACITY: usize = 0;
const CONFIG_SIZE_MAX: usize = 8;
const CONFIG_SEG_MAX: usize = 12;

/// Counters for the hypervisor's statistics lines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockStats {
    /// IN requests, FLUSH, OUT, GET_ID and other types, whatever their outcome.
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub get_ids: u64,
    pub unsupported: u64,
    /// Bytes moved to and from the backend by successful parts of IN and OUT requests.
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub errors: BlockErrors,
}

/// Failed requests by cause. Each failed request counts once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockErrors {
    /// Chains the virtqueue walker refused (no status written, used len 0).
    pub refused_chains: u64,
    /// Checked chains without a device-writable byte for the status (used len 0).
    pub no_status: u64,
    /// Header shorter than 16 bytes, or IN/OUT data that is not whole sectors: IOERR.
    pub malformed: u64,
    /// Sector range past the end of the disk (or overflowing): IOERR.
    pub out_of_range: u64,
    /// OUT to a read-only disk: IOERR.
    pub read_only: u64,
    /// The backend failed: IOERR.
    pub backend: u64,
    /// A guest-memory copy failed after the chain was checked: IOERR.
    pub guest_memory: u64,
}

impl BlockErrors {
    /// All failed requests.
    pub fn total(&self) -> u64 {
        self.refused_chains
            + self.no_status
            + self.malformed
            + self.out_of_range
            + self.read_only
            + self.backend
            + self.guest_memory
    }
}

/// Why a request failed, for [`BlockErrors`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    Malformed,
    OutOfRange,
    ReadOnly,
    Backend,
    GuestMemory,
}

impl From<OutOfRam> for Failure {
    fn from(_: OutOfRam) -> Self {
        Failure::GuestMemory
    }
}

impl From<DiskError> for Failure {
    fn from(error: DiskError) -> Self {
        match error {
            DiskError::OutOfRange => Failure::OutOfRange,
            DiskError::ReadOnly => Failure::ReadOnly,
            DiskError::Unaligned => Failure::Malformed,
            DiskError::Io => Failure::Backend,
        }
    }
}

/// A virtio-blk device over the backend `D`. See the module documentation.
pub struct Block<D: BlockDevice> {
    backend: D,
    bounce: Vec<u8>,
    config: [u8; CONFIG_SIZE],
    driver_features: u64,
    stats: BlockStats,
}

impl<D: BlockDevice> Block<D> {
    /// A device presenting `backend` (its capacity and writability are read once, here).
    pub fn new(backend: D) -> Self {
        let mut config = [0; CONFIG_SIZE];
        config[CONFIG_CAPACITY..CONFIG_CAPACITY + 8]
            .copy_from_slice(&backend.sectors().to_le_bytes());
        config[CONFIG_SIZE_MAX..CONFIG_SIZE_MAX + 4].copy_from_slice(&SIZE_MAX.to_le_bytes());
        config[CONFIG_SEG_MAX..CONFIG_SEG_MAX + 4].copy_from_slice(&SEG_MAX.to_le_bytes());
        Self {
            backend,
            bounce: vec![0; BOUNCE_BYTES],
            config,
            driver_features: 0,
            stats: BlockStats::default(),
        }
    }

    /// The backend.
    pub fn backend(&self) -> &D {
        &self.backend
    }

    /// The backend, mutably.
    pub fn backend_mut(&mut self) -> &mut D {
        &mut self.backend
    }

    /// The counters so far.
    pub fn stats(&self) -> &BlockStats {
        &self.stats
    }

    /// The features the driver accepted at the last FEATURES_OK.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// Runs the request in `chain` and writes its status; returns the used len.
    fn handle(&mut self, chain: &DescriptorChain, memory: &mut dyn GuestMemory) -> u32 {
        let writable_len = chain.writable_len();
        let Some(status_offset) = writable_len.checked_sub(1) else {
            self.stats.errors.no_status += 1;
            return 0;
        };
        let (status, data_written) = match self.execute(chain, memory, status_offset) {
            Ok((status, written)) => (status, written),
            Err((failure, written)) => {
                let errors = &mut self.stats.errors;
                match failure {
                    Failure::Malformed => errors.malformed += 1,
                    Failure::OutOfRange => errors.out_of_range += 1,
                    Failure::ReadOnly => errors.read_only += 1,
                    Failure::Backend => errors.backend += 1,
                    Failure::GuestMemory => errors.guest_memory += 1,
                }
                (request_status::IOERR, written)
            }
        };
        if write_stream(memory, chain.writable(), status_offset, &[status]).is_err() {
            self.stats.errors.guest_memory += 1;
            return 0;
        }
        // Both are below MAX_CHAIN_BYTES, which fits u32.
        (data_written + 1).try_into().unwrap_or(u32::MAX)
    }

    /// Runs the request; `data_writable` is the writable length before the status byte.
    /// Returns the status and the data bytes written to the guest, or the failure and the data
    /// bytes written before it.
    fn execute(
        &mut self,
        chain: &DescriptorChain,
        memory: &mut dyn GuestMemory,
        data_writable: u64,
    ) -> Result<(u8, u64), (Failure, u64)> {
        if chain.readable_len() < HEADER_SIZE {
            return Err((Failure::Malformed, 0));
        }
        let mut header = [0u8; HEADER_SIZE as usize];
        read_stream(memory, chain.readable(), 0, &mut header).map_err(|e| (e.into(), 0))?;
        let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = header;
        let request_type = u32::from_le_bytes([t0, t1, t2, t3]);
        let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
        match request_type {
            request::IN => {
                self.stats.reads += 1;
                self.read_sectors(chain, memory, sector, data_writable)
                    .map(|written| (request_status::OK, written))
            }
            request::OUT => {
                self.stats.writes += 1;
                let data = chain.readable_len() - HEADER_SIZE;
                self.write_sectors(chain, memory, sector, data)
                    .map(|()| (request_status::OK, 0))
                    .map_err(|failure| (failure, 0))
            }
            request::FLUSH => {
                self.stats.flushes += 1;
                self.backend
                    .flush()
                    .map(|()| (request_status::OK, 0))
                    .map_err(|_| (Failure::Backend, 0))
            }
            request::GET_ID => {
                self.stats.get_ids += 1;
                let serial = self.backend.serial();
                let len = data_writable.min(ID_BYTES as u64) as usize;
                write_stream(memory, chain.writable(), 0, &serial[..len])
                    .map(|()| (request_status::OK, len as u64))
                    .map_err(|e| (e.into(), 0))
            }
            _ => {
                self.stats.unsupported += 1;
                Ok((request_status::UNSUPP, 0))
            }
        }
    }

    /// IN: `len` bytes from `sector` to the writable part, a bounce buffer at a time.
    fn read_sectors(
        &mut self,
        chain: &DescriptorChain,
        memory: &mut dyn GuestMemory,
        sector: u64,
        len: u64,
    ) -> Result<u64, (Failure, u64)> {
        let len_usize = usize::try_from(len).map_err(|_| (Failure::Malformed, 0))?;
        check_range(self.backend.sectors(), sector, len_usize).map_err(|e| (e.into(), 0))?;
        let mut done: u64 = 0;
        while done < len {
            let chunk = (len - done).min(BOUNCE_BYTES as u64) as usize;
            let buf = &mut self.bounce[..chunk];
            let first = sector + done / SECTOR_SIZE as u64;
            self.backend
                .read(first, buf)
                .map_err(|e| (e.into(), done))?;
            write_stream(memory, chain.writable(), done, buf).map_err(|e| (e.into(), done))?;
            done += chunk as u64;
            self.stats.bytes_read += chunk as u64;
        }
        Ok(done)
    }

    /// OUT: `len` bytes after the header to the disk from `sector`, a bounce buffer at a time.
    fn write_sectors(
        &mut self,
        chain: &DescriptorChain,
        memory: &mut dyn GuestMemory,
        sector: u64,
        len: u64,
    ) -> Result<(), Failure> {
        let len_usize = usize::try_from(len).map_err(|_| Failure::Malformed)?;
        check_range(self.backend.sectors(), sector, len_usize)?;
        // See: spec 5.2.6.2, a device offering RO MUST NOT write any data.
        if !self.backend.writable() {
            return Err(Failure::ReadOnly);
        }
        let mut done: u64 = 0;
        while done < len {
            let chunk = (len - done).min(BOUNCE_BYTES as u64) as usize;
            let buf = &mut self.bounce[..chunk];
            read_stream(memory, chain.readable(), HEADER_SIZE + done, buf)?;
            let first = sector + done / SECTOR_SIZE as u64;
            self.backend.write(first, buf)?;
            done += chunk as u64;
            self.stats.bytes_written += chunk as u64;
        }
        Ok(())
    }
}

impl<D: BlockDevice> VirtioDevice for Block<D> {
    fn name(&self) -> &'static str {
        "virtio-blk"
    }

    fn device_type(&self) -> u16 {
        DEVICE_TYPE
    }

    fn pci_class(&self) -> (u8, u8) {
        // Mass storage, other.
        (0x01, 0x80)
    }

    fn features(&self) -> u64 {
        let mut offered =
            feature::VERSION_1 | features::SIZE_MAX | features::SEG_MAX | features::FLUSH;
        if !self.backend.writable() {
            offered |= features::RO;
        }
        offered
    }

    fn set_driver_features(&mut self, features: u64) {
        self.driver_features = features;
    }

    fn queue_count(&self) -> u16 {
        1
    }

    fn queue_max_size(&self, _queue: u16) -> u16 {
        MAX_QUEUE_SIZE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .and_then(|at| usize::try_from(at).ok())
                .and_then(|at| self.config.get(at).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Every field offered is read-only (writeback needs CONFIG_WCE, 5.2.4).
    }

    fn process_chain(
        &mut self,
        _queue: u16,
        chain: &DescriptorChain,
        memory: &mut dyn GuestMemory,
    ) -> u32 {
        self.handle(chain, memory)
    }

    fn chain_refused(&mut self, _queue: u16, _error: ChainError) {
        self.stats.errors.refused_chains += 1;
    }

    fn reset(&mut self) {
        self.driver_features = 0;
    }
}

/// Copies bytes from the concatenation of `descriptors`, starting `offset` bytes in, to `buf`.
/// Bounded by the number of descriptors.
fn read_stream(
    memory: &mut dyn GuestMemory,
    descriptors: &[Descriptor],
    offset: u64,
    buf: &mut [u8],
) -> Result<(), OutOfRam> {
    let mut done = 0;
    for_each_piece(descriptors, offset, buf.len(), |gpa, at, len| {
        memory.read(gpa, &mut buf[at..at + len])?;
        done += len;
        Ok(())
    })?;
    short(done, buf.len(), offset)
}

/// Copies `data` to the concatenation of `descriptors`, starting `offset` bytes in.
fn write_stream(
    memory: &mut dyn GuestMemory,
    descriptors: &[Descriptor],
    offset: u64,
    data: &[u8],
) -> Result<(), OutOfRam> {
    let mut done = 0;
    for_each_piece(descriptors, offset, data.len(), |gpa, at, len| {
        memory.write(gpa, &data[at..at + len])?;
        done += len;
        Ok(())
    })?;
    short(done, data.len(), offset)
}

/// The streams are sized by the caller from the chain's own lengths, so a short copy is a bug
/// of this file, reported as a guest-memory failure rather than a panic.
fn short(done: usize, wanted: usize, offset: u64) -> Result<(), OutOfRam> {
    if done == wanted {
        Ok(())
    } else {
        Err(OutOfRam {
            gpa: offset,
            len: wanted as u64,
        })
    }
}

/// Calls `copy(gpa, position in the caller's buffer, length)` for each piece of the
/// `len`-byte window starting `offset` bytes into the concatenation of `descriptors`.
fn for_each_piece(
    descriptors: &[Descriptor],
    mut offset: u64,
    len: usize,
    mut copy: impl FnMut(u64, usize, usize) -> Result<(), OutOfRam>,
) -> Result<(), OutOfRam> {
    let mut at = 0;
    for descriptor in descriptors {
        if at == len {
            break;
        }
        let length = u64::from(descriptor.length);
        if offset >= length {
            offset -= length;
            continue;
        }
        let piece = (length - offset).min((len - at) as u64) as usize;
        // The walker checked address + length for overflow.
        copy(descriptor.address + offset, at, piece)?;
        at += piece;
        offset = 0;
    }
    Ok(())
}
