//! Copying between a device model's buffers and the guest buffers of a checked descriptor
//! chain, seen as one byte stream (spec 2.6.4, message framing: a device makes no assumption
//! about how the driver split a message over descriptors). Shared by the device models.

use crate::memory::{GuestMemory, OutOfRam};
use crate::queue::Descriptor;

/// Copies bytes from the concatenation of `descriptors`, starting `offset` bytes in, to `buf`.
/// Bounded by the number of descriptors.
pub(crate) fn read_stream(
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
pub(crate) fn write_stream(
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
/// of the caller, reported as a guest-memory failure rather than a panic.
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
