//! The boot manifest: a compact, versioned record that `boot/` writes at the start of the
//! bootloader's ramdisk and the hypervisor checks before using anything in it.
//!
//! Layout, version 1 (all integers little-endian):
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `RZMANIF1` |
//! | 8 | 4 | format version (1) |
//! | 12 | 4 | total length in bytes, header included |
//! | 16 | 4 | test hook ([`TestHook`]), 0 in normal builds |
//! | 20 | 4 | reserved, 0 |
//!
//! A ramdisk that does not start with the magic, names a version this hypervisor does not
//! know, or is shorter than it claims is refused with a [`ManifestError`].

use alloc::vec::Vec;
use core::fmt;

/// The first eight bytes of every manifest.
pub const MAGIC: [u8; 8] = *b"RZMANIF1";
/// The format version this code reads and writes.
pub const VERSION: u32 = 1;
/// The size of the version-1 header.
pub const HEADER_LEN: usize = 24;

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
}

impl TestHook {
    fn code(self) -> u32 {
        match self {
            TestHook::None => 0,
            TestHook::PageFault => 1,
        }
    }

    fn from_code(code: u32) -> Result<Self, ManifestError> {
        match code {
            0 => Ok(TestHook::None),
            1 => Ok(TestHook::PageFault),
            other => Err(ManifestError::UnknownTestHook(other)),
        }
    }

    /// The name used on the command line of `boot/` and `scripts/run-qemu.sh --test-hook`.
    pub fn name(self) -> &'static str {
        match self {
            TestHook::None => "none",
            TestHook::PageFault => "page-fault",
        }
    }

    /// Parses a name given on the command line.
    pub fn from_name(name: &str) -> Option<Self> {
        [TestHook::None, TestHook::PageFault]
            .into_iter()
            .find(|hook| hook.name() == name)
    }
}

/// Everything the hypervisor learns from the host at boot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Manifest {
    pub test_hook: TestHook,
}

/// Why a ramdisk was not accepted as a manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ManifestError {
    /// Fewer bytes than the header needs.
    TooShort { length: usize },
    /// The first eight bytes are not [`MAGIC`].
    BadMagic,
    /// A version this hypervisor does not read.
    UnsupportedVersion(u32),
    /// The header claims more bytes than the ramdisk holds.
    LengthMismatch { claimed: u32, available: usize },
    /// A test hook number this hypervisor does not know.
    UnknownTestHook(u32),
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
                write!(formatter, "manifest claims {claimed} bytes but the ramdisk holds {available}")
            }
            ManifestError::UnknownTestHook(code) => write!(formatter, "unknown test hook {code}"),
        }
    }
}

fn read_u32(bytes: &[u8], offset: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[offset..offset + 4]);
    u32::from_le_bytes(word)
}

impl Manifest {
    /// Serializes the manifest (done on the host by `boot/`).
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(HEADER_LEN);
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&VERSION.to_le_bytes());
        bytes.extend_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        bytes.extend_from_slice(&self.test_hook.code().to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes
    }

    /// Checks and parses a manifest (done by the hypervisor on the ramdisk's bytes).
    pub fn decode(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if bytes.len() < HEADER_LEN {
            return Err(ManifestError::TooShort {
                length: bytes.len(),
            });
        }
        if bytes[..8] != MAGIC {
            return Err(ManifestError::BadMagic);
        }
        let version = read_u32(bytes, 8);
        if version != VERSION {
            return Err(ManifestError::UnsupportedVersion(version));
        }
        let claimed = read_u32(bytes, 12);
        if (claimed as usize) < HEADER_LEN || claimed as usize > bytes.len() {
            return Err(ManifestError::LengthMismatch {
                claimed,
                available: bytes.len(),
            });
        }
        let test_hook = TestHook::from_code(read_u32(bytes, 16))?;
        Ok(Manifest { test_hook })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for hook in [TestHook::None, TestHook::PageFault] {
            let manifest = Manifest { test_hook: hook };
            assert_eq!(Manifest::decode(&manifest.encode()), Ok(manifest));
        }
    }

    #[test]
    fn refuses_bad_input() {
        let good = Manifest {
            test_hook: TestHook::PageFault,
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
        let mut bad_length = good.clone();
        bad_length[12] = 200;
        assert_eq!(
            Manifest::decode(&bad_length),
            Err(ManifestError::LengthMismatch {
                claimed: 200,
                available: HEADER_LEN
            })
        );
        let mut bad_hook = good;
        bad_hook[16] = 7;
        assert_eq!(
            Manifest::decode(&bad_hook),
            Err(ManifestError::UnknownTestHook(7))
        );
    }

    #[test]
    fn hook_names() {
        assert_eq!(TestHook::from_name("page-fault"), Some(TestHook::PageFault));
        assert_eq!(TestHook::from_name("none"), Some(TestHook::None));
        assert_eq!(TestHook::from_name("nope"), None);
    }
}
