//! MAC addresses (IEEE 802-2014 clause 8.2): the 48-bit station addresses the switch learns
//! and forwards by.

use core::fmt;

/// A 48-bit IEEE 802 MAC address, in transmission (network) byte order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddress(pub [u8; 6]);

impl MacAddress {
    /// ff:ff:ff:ff:ff:ff.
    pub const BROADCAST: MacAddress = MacAddress([0xff; 6]);
    /// 00:00:00:00:00:00, which no station may use as its address.
    pub const ZERO: MacAddress = MacAddress([0; 6]);

    /// The first six bytes of `bytes`, or `None` when there are fewer.
    pub fn from_slice(bytes: &[u8]) -> Option<MacAddress> {
        let array: [u8; 6] = bytes.get(..6)?.try_into().ok()?;
        Some(MacAddress(array))
    }

    /// The I/G bit (bit 0 of the first byte) is set: a group address, which includes
    /// broadcast. See: IEEE 802-2014 8.2.2.
    pub fn is_multicast(self) -> bool {
        self.0[0] & 1 != 0
    }

    /// ff:ff:ff:ff:ff:ff.
    pub fn is_broadcast(self) -> bool {
        self == Self::BROADCAST
    }

    /// May this address be the source of a frame (and so be learned or given to a port)?
    /// Group addresses are never sources (IEEE 802.3-2018 3.2.3 b), and the all-zero address
    /// names no station.
    pub fn is_valid_source(self) -> bool {
        !self.is_multicast() && self != Self::ZERO
    }
}

/// `02:00:00:00:00:01`.
impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert!(MacAddress::BROADCAST.is_multicast());
        assert!(MacAddress::BROADCAST.is_broadcast());
        assert!(MacAddress([0x01, 0, 0x5e, 0, 0, 1]).is_multicast());
        assert!(!MacAddress([0x02, 0, 0, 0, 0, 1]).is_multicast());
        assert!(MacAddress([0x02, 0, 0, 0, 0, 1]).is_valid_source());
        assert!(!MacAddress::ZERO.is_valid_source());
        assert!(!MacAddress([0x33, 0x33, 0, 0, 0, 1]).is_valid_source());
    }

    #[test]
    fn display_and_slice() {
        let mac = MacAddress::from_slice(&[0x02, 0xab, 0, 0, 0, 0x0f, 9]).unwrap();
        assert_eq!(alloc::format!("{mac}"), "02:ab:00:00:00:0f");
        assert_eq!(MacAddress::from_slice(&[1, 2, 3]), None);
    }
}
