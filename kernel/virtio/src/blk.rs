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

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;

use ringzero_vdisk::{check_range, BlockDevice, DiskError, SECTOR_SIZE};

use crate::device::{feature, VirtioDevice};
use crate::memory::{GuestMemory, OutOfRam};
use crate::queue::{ChainError, DescriptorChain, MAX_QUEUE_SIZE};
use crate::stream::{read_stream, write_stream};

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

/// A request header (a driver's side: the hypervisor's own physical-disk driver builds its
/// requests with it): `request_type`, reserved 0, `sector`, little-endian. See: spec 5.2.6.
pub fn encode_header(request_type: u32, sector: u64) -> [u8; HEADER_SIZE as usize] {
    let mut header = [0u8; HEADER_SIZE as usize];
    header[..4].copy_from_slice(&request_type.to_le_bytes());
    header[8..].copy_from_slice(&sector.to_le_bytes());
    header
}

/// A request header's type and sector (the reserved field is ignored). See: spec 5.2.6.
pub fn decode_header(header: &[u8; HEADER_SIZE as usize]) -> (u32, u64) {
    let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = *header;
    (
        u32::from_le_bytes([t0, t1, t2, t3]),
        u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
    )
}
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

/// One statistics line: `reads=N writes=N flushes=N get_ids=N unsupported=N bytes_read=N
/// bytes_written=N errors=N (refused=N no_status=N malformed=N out_of_range=N read_only=N
/// backend=N memory=N)`.
impl core::fmt::Display for BlockStats {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let e = &self.errors;
        write!(
            f,
            "reads={} writes={} flushes={} get_ids={} unsupported={} bytes_read={} \
             bytes_written={} errors={} (refused={} no_status={} malformed={} out_of_range={} \
             read_only={} backend={} memory={})",
            self.reads,
            self.writes,
            self.flushes,
            self.get_ids,
            self.unsupported,
            self.bytes_read,
            self.bytes_written,
            e.total(),
            e.refused_chains,
            e.no_status,
            e.malformed,
            e.out_of_range,
            e.read_only,
            e.backend,
            e.guest_memory
        )
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
        let (request_type, sector) = decode_header(&header);
        match request_type {
            // Data in the wrong direction (see: virtio 1.2 5.2.6.1, the driver MUST NOT put
            // device-readable data in an IN request or device-writable data, beyond the status
            // byte, in an OUT request) is malformed.
            request::IN if chain.readable_len() != HEADER_SIZE => {
                self.stats.reads += 1;
                Err((Failure::Malformed, 0))
            }
            request::OUT if data_writable != 0 => {
                self.stats.writes += 1;
                Err((Failure::Malformed, 0))
            }
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

/// A backend chosen at run time (a partition window or a RAM image): the hypervisor builds
/// `Block<BoxedBackend>`.
pub struct BoxedBackend(pub Box<dyn BlockDevice>);

impl BlockDevice for BoxedBackend {
    fn sectors(&self) -> u64 {
        self.0.sectors()
    }

    fn writable(&self) -> bool {
        self.0.writable()
    }

    fn read(&mut self, first_sector: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.0.read(first_sector, buf)
    }

    fn write(&mut self, first_sector: u64, buf: &[u8]) -> Result<(), DiskError> {
        self.0.write(first_sector, buf)
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        self.0.flush()
    }

    fn serial(&self) -> [u8; 20] {
        self.0.serial()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::FakeMemory;
    use crate::pci::VirtioPci;
    use crate::testing::{bring_up, ram, DriverQueue, RamDisk};

    #[test]
    fn request_headers_encode_the_spec_layout_and_decode_back() {
        // le32 type, le32 reserved (0), le64 sector. See: spec 5.2.6.
        let header = encode_header(request::OUT, 0x0102_0304_0506_0708);
        assert_eq!(
            header,
            [1, 0, 0, 0, 0, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1],
            "{header:?}"
        );
        for (request_type, sector) in [
            (request::IN, 0),
            (request::FLUSH, 0),
            (request::OUT, u64::MAX),
            (request::GET_ID, 12345),
        ] {
            assert_eq!(
                decode_header(&encode_header(request_type, sector)),
                (request_type, sector)
            );
        }
    }

    const HEADER: u64 = 0x20000;
    const DATA: u64 = 0x40000;
    const STATUS: u64 = 0x30000;
    const SECTORS: usize = 4096;

    struct Rig {
        pci: VirtioPci<Block<RamDisk>>,
        memory: FakeMemory,
        driver: DriverQueue,
    }

    impl Rig {
        fn new(writable: bool) -> Self {
            let mut pci = VirtioPci::new(Block::new(RamDisk::new(SECTORS, writable)));
            let memory = ram(4 << 20);
            let driver = DriverQueue::new(0x10000, 256);
            bring_up(&mut pci, &driver);
            Self {
                pci,
                memory,
                driver,
            }
        }

        fn header(&mut self, request_type: u32, sector: u64) {
            let mut header = [0u8; 16];
            header[..4].copy_from_slice(&request_type.to_le_bytes());
            header[8..].copy_from_slice(&sector.to_le_bytes());
            self.memory.write(HEADER, &header).unwrap();
            self.memory.write(STATUS, &[0xAA]).unwrap();
        }

        /// Submits the chain and returns (used len, status byte).
        fn run(&mut self, buffers: &[(u64, u32, bool)]) -> (u32, u8) {
            let head = self.driver.add_chain(&mut self.memory, buffers);
            assert_eq!(self.pci.process(0, &mut self.memory), 1);
            let used = self.driver.take_used(&mut self.memory);
            assert_eq!(used.len(), 1);
            assert_eq!(used[0].0, u32::from(head));
            let mut status = [0];
            self.memory.read(STATUS, &mut status).unwrap();
            (used[0].1, status[0])
        }

        /// A Linux-shaped request: header, one data descriptor, status.
        fn request(
            &mut self,
            request_type: u32,
            sector: u64,
            len: u32,
            data_in: bool,
        ) -> (u32, u8) {
            self.header(request_type, sector);
            let mut buffers = vec![(HEADER, 16, false)];
            if len > 0 {
                buffers.push((DATA, len, data_in));
            }
            buffers.push((STATUS, 1, true));
            self.run(&buffers)
        }

        fn disk(&self) -> &[u8] {
            &self.pci.device().backend().data
        }

        fn stats(&self) -> BlockStats {
            *self.pci.device().stats()
        }
    }

    fn sector_bytes(disk: &[u8], sector: usize, count: usize) -> Vec<u8> {
        disk[sector * SECTOR_SIZE..(sector + count) * SECTOR_SIZE].to_vec()
    }

    #[test]
    fn read_write_flush_get_id() {
        let mut rig = Rig::new(true);
        // IN: sectors 3..5.
        assert_eq!(
            rig.request(request::IN, 3, 1024, true),
            (1025, request_status::OK)
        );
        let expected = sector_bytes(rig.disk(), 3, 2);
        assert_eq!(
            &rig.memory.bytes()[DATA as usize..DATA as usize + 1024],
            &expected[..]
        );
        // OUT: sector 10 from a pattern.
        let pattern: Vec<u8> = (0..512u32).map(|i| (i * 7) as u8).collect();
        rig.memory.write(DATA, &pattern).unwrap();
        assert_eq!(
            rig.request(request::OUT, 10, 512, false),
            (1, request_status::OK)
        );
        assert_eq!(sector_bytes(rig.disk(), 10, 1), pattern);
        // FLUSH.
        assert_eq!(
            rig.request(request::FLUSH, 0, 0, false),
            (1, request_status::OK)
        );
        assert_eq!(rig.pci.device().backend().flushes, 1);
        // GET_ID.
        assert_eq!(
            rig.request(request::GET_ID, 0, 20, true),
            (21, request_status::OK)
        );
        assert_eq!(
            &rig.memory.bytes()[DATA as usize..DATA as usize + 10],
            b"rz-disk-0\0"
        );
        // Unknown types: UNSUPP.
        for unknown in [2, 11, 13, u32::MAX] {
            assert_eq!(
                rig.request(unknown, 0, 0, false),
                (1, request_status::UNSUPP)
            );
        }
        let stats = rig.stats();
        assert_eq!(
            (
                stats.reads,
                stats.writes,
                stats.flushes,
                stats.get_ids,
                stats.unsupported
            ),
            (1, 1, 1, 1, 4)
        );
        assert_eq!((stats.bytes_read, stats.bytes_written), (1024, 512));
        assert_eq!(stats.errors.total(), 0);
        assert!(rig.pci.interrupt_line());
    }

    #[test]
    fn any_layout_of_header_data_and_status() {
        let mut rig = Rig::new(true);
        // Header split 5 + 11 bytes; data and status in one writable descriptor, data in two.
        rig.header(request::IN, 7);
        let buffers = [
            (HEADER, 5, false),
            (HEADER + 5, 11, false),
            (DATA, 300, true),
            (DATA + 300, 212 + 1, true),
        ];
        let head = rig.driver.add_chain(&mut rig.memory, &buffers);
        assert_eq!(rig.pci.process(0, &mut rig.memory), 1);
        assert_eq!(
            rig.driver.take_used(&mut rig.memory),
            [(u32::from(head), 513)]
        );
        let expected = sector_bytes(rig.disk(), 7, 1);
        let start = DATA as usize;
        assert_eq!(&rig.memory.bytes()[start..start + 512], &expected[..]);
        assert_eq!(rig.memory.bytes()[start + 512], request_status::OK);
    }

    #[test]
    fn large_request_moves_in_bounded_chunks() {
        let mut rig = Rig::new(true);
        rig.header(request::IN, 100);
        // Linux's largest request: SEG_MAX segments of SIZE_MAX.
        let mut buffers = vec![(HEADER, 16, false)];
        for segment in 0..u64::from(SEG_MAX) {
            buffers.push((DATA + segment * 4096, SIZE_MAX, true));
        }
        buffers.push((STATUS, 1, true));
        let total = SEG_MAX as usize * SIZE_MAX as usize;
        assert_eq!(rig.run(&buffers), (total as u32 + 1, request_status::OK));
        let expected = sector_bytes(rig.disk(), 100, total / SECTOR_SIZE);
        assert_eq!(
            &rig.memory.bytes()[DATA as usize..DATA as usize + total],
            &expected[..]
        );
        assert_eq!(rig.pci.device().backend().largest_call, BOUNCE_BYTES);
        // And back out, to a different place.
        buffers[0] = (HEADER, 16, false);
        rig.header(request::OUT, 2000);
        for (_, _, writable) in &mut buffers[1..=SEG_MAX as usize] {
            *writable = false;
        }
        assert_eq!(rig.run(&buffers), (1, request_status::OK));
        assert_eq!(
            sector_bytes(rig.disk(), 2000, total / SECTOR_SIZE),
            expected
        );
        assert_eq!(rig.stats().bytes_written, total as u64);
    }

    #[test]
    fn out_of_range_requests() {
        let mut rig = Rig::new(true);
        let before = rig.disk().to_vec();
        let capacity = SECTORS as u64;
        for (request_type, sector, data_in) in [
            (request::IN, capacity, true),
            (request::IN, capacity - 1, true),
            (request::OUT, capacity - 1, false),
            (request::IN, u64::MAX, true),
            (request::OUT, u64::MAX, false),
            (request::OUT, u64::MAX - 1, false),
        ] {
            let (len, status) = rig.request(request_type, sector, 1024, data_in);
            assert_eq!(status, request_status::IOERR, "sector {sector:#x}");
            assert_eq!(len, 1);
        }
        assert_eq!(rig.disk(), &before[..]);
        assert_eq!(rig.stats().errors.out_of_range, 6);
        // The last sector itself is fine.
        assert_eq!(
            rig.request(request::IN, capacity - 1, 512, true).1,
            request_status::OK
        );
    }

    #[test]
    fn malformed_requests_get_ioerr() {
        let mut rig = Rig::new(true);
        // Data not whole sectors.
        assert_eq!(
            rig.request(request::IN, 0, 100, true),
            (1, request_status::IOERR)
        );
        assert_eq!(
            rig.request(request::OUT, 0, 513, false),
            (1, request_status::IOERR)
        );
        // Header too short.
        rig.header(request::IN, 0);
        assert_eq!(
            rig.run(&[(HEADER, 8, false), (DATA, 512, true), (STATUS, 1, true)]),
            (1, request_status::IOERR)
        );
        // No header at all.
        rig.header(request::IN, 0);
        assert_eq!(rig.run(&[(STATUS, 1, true)]), (1, request_status::IOERR));
        // Data in the wrong direction: a read into a device-readable buffer, a write from a
        // device-writable one.
        rig.header(request::IN, 0);
        assert_eq!(
            rig.run(&[(HEADER, 16, false), (DATA, 512, false), (STATUS, 1, true)]),
            (1, request_status::IOERR)
        );
        rig.header(request::OUT, 0);
        assert_eq!(
            rig.run(&[(HEADER, 16, false), (DATA, 512, true), (STATUS, 1, true)]),
            (1, request_status::IOERR)
        );
        assert_eq!(rig.stats().errors.malformed, 6);
        // No writable byte for the status: used len 0, nothing written.
        rig.header(request::FLUSH, 0);
        assert_eq!(rig.run(&[(HEADER, 16, false)]), (0, 0xAA));
        assert_eq!(rig.stats().errors.no_status, 1);
        assert_eq!(rig.pci.device().backend().flushes, 0);
    }

    #[test]
    fn refused_chain_is_returned_with_len_zero() {
        let mut rig = Rig::new(true);
        rig.header(request::IN, 0);
        // A readable descriptor after the writable one.
        let (len, status) = rig.run(&[(HEADER, 16, false), (STATUS, 1, true), (DATA, 512, false)]);
        assert_eq!((len, status), (0, 0xAA), "status untouched");
        // A buffer outside RAM.
        let (len, status) = rig.run(&[
            (HEADER, 16, false),
            (0x1_0000_0000, 512, true),
            (STATUS, 1, true),
        ]);
        assert_eq!((len, status), (0, 0xAA));
        assert_eq!(rig.stats().errors.refused_chains, 2);
        assert_eq!(rig.stats().reads, 0, "never reached the device");
        // The queue still works.
        assert_eq!(
            rig.request(request::IN, 0, 512, true),
            (513, request_status::OK)
        );
    }

    #[test]
    fn read_only_backend() {
        let mut rig = Rig::new(false);
        assert_ne!(
            rig.pci.driver_features() & features::RO,
            0,
            "RO offered and taken"
        );
        let before = rig.disk().to_vec();
        rig.memory.write(DATA, &[0x55; 512]).unwrap();
        assert_eq!(
            rig.request(request::OUT, 0, 512, false),
            (1, request_status::IOERR)
        );
        assert_eq!(rig.disk(), &before[..]);
        assert_eq!(rig.stats().errors.read_only, 1);
        assert_eq!(
            rig.request(request::IN, 0, 512, true),
            (513, request_status::OK)
        );
        assert_eq!(
            rig.request(request::FLUSH, 0, 0, false),
            (1, request_status::OK)
        );
    }

    #[test]
    fn backend_failure() {
        let mut rig = Rig::new(true);
        rig.pci.device_mut().backend_mut().fail = true;
        assert_eq!(
            rig.request(request::IN, 0, 512, true),
            (1, request_status::IOERR)
        );
        assert_eq!(
            rig.request(request::OUT, 0, 512, false),
            (1, request_status::IOERR)
        );
        assert_eq!(
            rig.request(request::FLUSH, 0, 0, false),
            (1, request_status::IOERR)
        );
        assert_eq!(rig.stats().errors.backend, 3);
        assert_eq!(
            alloc::format!("{}", rig.stats()),
            "reads=1 writes=1 flushes=1 get_ids=0 unsupported=0 bytes_read=0 bytes_written=0 \
             errors=3 (refused=0 no_status=0 malformed=0 out_of_range=0 read_only=0 backend=3 \
             memory=0)"
        );
    }

    #[test]
    fn boxed_backend() {
        let mut block = Block::new(BoxedBackend(Box::new(RamDisk::new(8, false))));
        assert_eq!(block.backend().sectors(), 8);
        assert_ne!(block.features() & features::RO, 0);
        let mut buf = [0u8; 512];
        assert_eq!(block.backend_mut().read(1, &mut buf), Ok(()));
        assert_eq!(buf[0], 1);
        assert_eq!(block.backend_mut().write(0, &buf), Err(DiskError::ReadOnly));
        assert_eq!(block.backend_mut().flush(), Ok(()));
        assert_eq!(&block.backend().serial()[..9], b"rz-disk-0");
    }

    #[test]
    fn configuration_space() {
        let block = Block::new(RamDisk::new(SECTORS, true));
        let mut config = [0u8; 16];
        block.read_config(0, &mut config);
        assert_eq!(
            u64::from_le_bytes(config[..8].try_into().unwrap()),
            SECTORS as u64
        );
        assert_eq!(
            u32::from_le_bytes(config[8..12].try_into().unwrap()),
            SIZE_MAX
        );
        assert_eq!(
            u32::from_le_bytes(config[12..].try_into().unwrap()),
            SEG_MAX
        );
        let mut past = [0xFFu8; 8];
        block.read_config(70, &mut past);
        assert_eq!(past, [0; 8]);
        block.read_config(u64::MAX, &mut past);
        assert_eq!(past, [0; 8]);
        assert_eq!(block.features() & features::RO, 0);
        assert_ne!(block.features() & features::FLUSH, 0);
        assert_eq!(
            block.features() & (feature::INDIRECT_DESC | feature::EVENT_IDX),
            0
        );
    }
}
