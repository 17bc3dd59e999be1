//! Formatting into a fixed stack buffer, for lines whose exact length must be known before they
//! are sent (the basic guest's report counts the I/O of printing itself).

use core::fmt;

/// A `fmt::Write` into a borrowed byte buffer. Writing past the end fails with `fmt::Error`.
pub struct StackBuffer<'a> {
    bytes: &'a mut [u8],
    length: usize,
}

impl<'a> StackBuffer<'a> {
    pub fn new(bytes: &'a mut [u8]) -> Self {
        Self { bytes, length: 0 }
    }

    /// What was written so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.length]
    }

    pub fn clear(&mut self) {
        self.length = 0;
    }
}

impl fmt::Write for StackBuffer<'_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let end = self.length.checked_add(text.len()).ok_or(fmt::Error)?;
        let destination = self.bytes.get_mut(self.length..end).ok_or(fmt::Error)?;
        destination.copy_from_slice(text.as_bytes());
        self.length = end;
        Ok(())
    }
}

/// Displays bytes as text: printable ASCII as is, anything else as `\xNN`.
pub struct Printable<'a>(pub &'a [u8]);

impl fmt::Display for Printable<'_> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &byte in self.0 {
            if (0x20..0x7F).contains(&byte) {
                fmt::Write::write_char(formatter, char::from(byte))?;
            } else {
                write!(formatter, "\\x{:02x}", byte)?;
            }
        }
        Ok(())
    }
}
