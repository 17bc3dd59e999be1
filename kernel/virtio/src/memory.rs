//! How device models reach a VM's RAM: the [`GuestMemory`] trait the hypervisor implements over
//! the guest RAM map, and `FakeMemory` (feature `fake`) for tests and the fuzz target.
//!
//! Every address here is a guest-physical address chosen by the guest (descriptor addresses,
//! ring addresses); implementations must refuse, never panic on, any of them.

/// A guest-physical range that is not entirely inside the VM's RAM (or whose end overflows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfRam {
    /// The first guest-physical address of the refused range.
    pub gpa: u64,
    /// Its length in bytes.
    pub len: u64,
}

/// A VM's RAM as device models see it: guest-physical bytes, copied in and out.
pub trait GuestMemory {
    /// Copies guest-physical bytes into `buf`; `Err` if any byte is outside the VM's RAM (then
    /// `buf` may be partly written).
    fn read(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), OutOfRam>;
    /// Copies `data` to guest-physical memory; `Err` if any byte is outside the VM's RAM (then
    /// nothing is written).
    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), OutOfRam>;
    /// Whether all `len` bytes from `gpa` are RAM (false when `gpa + len` overflows). The
    /// virtqueue walker checks every descriptor with it before a device acts on a chain, so a
    /// request with a bad buffer is refused whole instead of failing half done.
    fn contains(&self, gpa: u64, len: u64) -> bool;
}

/// Little-endian helpers: virtio 1.x structures are little-endian (spec 1.4).
pub(crate) fn read_u16(memory: &mut dyn GuestMemory, gpa: u64) -> Result<u16, OutOfRam> {
    let mut bytes = [0; 2];
    memory.read(gpa, &mut bytes)?;
    Ok(u16::from_le_bytes(bytes))
}

pub(crate) fn write_u16(
    memory: &mut dyn GuestMemory,
    gpa: u64,
    value: u16,
) -> Result<(), OutOfRam> {
    memory.write(gpa, &value.to_le_bytes())
}

/// A VM's RAM for tests: `size` bytes from guest-physical address 0, all zero.
#[cfg(any(test, feature = "fake"))]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeMemory {
    bytes: alloc::vec::Vec<u8>,
}

#[cfg(any(test, feature = "fake"))]
impl FakeMemory {
    /// `size` zero bytes of RAM at GPA 0.
    pub fn new(size: usize) -> Self {
        Self {
            bytes: alloc::vec![0; size],
        }
    }

    /// RAM holding `bytes` at GPA 0.
    pub fn from_bytes(bytes: alloc::vec::Vec<u8>) -> Self {
        Self { bytes }
    }

    /// All of RAM.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// All of RAM, to lay out structures directly.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.bytes
    }

    fn range(&self, gpa: u64, len: usize) -> Result<core::ops::Range<usize>, OutOfRam> {
        let refused = OutOfRam {
            gpa,
            len: len as u64,
        };
        let start = usize::try_from(gpa).map_err(|_| refused)?;
        let end = start.checked_add(len).ok_or(refused)?;
        if end > self.bytes.len() {
            return Err(refused);
        }
        Ok(start..end)
    }
}

#[cfg(any(test, feature = "fake"))]
impl GuestMemory for FakeMemory {
    fn read(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), OutOfRam> {
        let range = self.range(gpa, buf.len())?;
        buf.copy_from_slice(&self.bytes[range]);
        Ok(())
    }

    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), OutOfRam> {
        let range = self.range(gpa, data.len())?;
        self.bytes[range].copy_from_slice(data);
        Ok(())
    }

    fn contains(&self, gpa: u64, len: u64) -> bool {
        usize::try_from(len)
            .ok()
            .and_then(|len| self.range(gpa, len).ok())
            .is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_memory_bounds() {
        let mut memory = FakeMemory::new(16);
        assert!(memory.write(12, &[1, 2, 3, 4]).is_ok());
        assert_eq!(
            memory.write(13, &[1, 2, 3, 4]),
            Err(OutOfRam { gpa: 13, len: 4 })
        );
        let mut buf = [0; 4];
        assert!(memory.read(12, &mut buf).is_ok());
        assert_eq!(buf, [1, 2, 3, 4]);
        assert!(memory.read(u64::MAX, &mut buf).is_err());
        assert!(memory.read(16, &mut []).is_ok(), "empty range at the end");
        assert!(memory.contains(0, 16));
        assert!(!memory.contains(1, 16));
        assert!(!memory.contains(u64::MAX, 2));
        assert!(!memory.contains(0, u64::MAX));
    }
}
