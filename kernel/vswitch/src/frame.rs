//! Frames and the view of their header: the owned byte buffer a port sends or receives, and
//! the checked parse of its Ethernet header.
//!
//! Spec: IEEE 802.3-2018 clause 3.2 (MAC frame format: destination, source, length/type) and
//! IEEE 802.1Q-2018 clause 9 (the 4-byte tag: TPID 0x8100 and the TCI). Frames here are what a
//! virtio-net device or a physical NIC driver hands over: no preamble, no FCS, and not padded
//! to the 60-byte minimum (guests leave padding to the NIC), so the only lower bound is the
//! 14-byte header.

use alloc::vec::Vec;

use crate::MacAddress;

/// Bytes of an Ethernet II / 802.3 header: destination, source, length/type.
pub const HEADER_LEN: usize = 14;
/// Bytes an 802.1Q tag adds between the source address and the length/type.
pub const VLAN_TAG_LEN: usize = 4;
/// The default MTU: the largest payload of an untagged frame. See: IEEE 802.3-2018 3.2.7.
pub const DEFAULT_MTU: u16 = 1500;
/// TPID of an 802.1Q customer VLAN tag. See: IEEE 802.1Q-2018 9.5 (table 9-1).
pub const TPID_8021Q: u16 = 0x8100;

/// The largest frame (header + payload, no FCS) a switch with this MTU accepts; `tagged`
/// allows the 4 bytes of an 802.1Q tag.
pub fn max_frame_len(mtu: u16, tagged: bool) -> usize {
    HEADER_LEN + usize::from(mtu) + if tagged { VLAN_TAG_LEN } else { 0 }
}

/// A frame owned by the switch: the bytes from the destination address to the end of the
/// payload. Cloned once per extra port when flooded.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Frame {
    bytes: Vec<u8>,
}

impl Frame {
    /// Takes ownership of `bytes`; nothing is checked until the frame is submitted.
    pub fn new(bytes: Vec<u8>) -> Frame {
        Frame { bytes }
    }
    /// A frame holding a copy of `bytes`.
    pub fn from_slice(bytes: &[u8]) -> Frame {
        Frame::new(bytes.to_vec())
    }
    /// The frame's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
    /// The frame's length in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }
    /// Is the frame empty (zero bytes)?
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
    /// Gives the buffer back.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

impl From<Vec<u8>> for Frame {
    fn from(bytes: Vec<u8>) -> Frame {
        Frame::new(bytes)
    }
}

/// The 2-byte field after the addresses (after the tag, in a tagged frame).
/// See: IEEE 802.3-2018 3.2.6.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TypeOrLength {
    /// 0..=1500: an 802.3 frame whose payload length this is (LLC follows).
    Length(u16),
    /// 0x0600 and above: an Ethernet II EtherType (0x0800 IPv4, 0x0806 ARP, 0x86dd IPv6...).
    EtherType(u16),
    /// 1501..=1535: undefined by 802.3; tolerated and forwarded like any other frame.
    Undefined(u16),
}

impl TypeOrLength {
    fn classify(value: u16) -> TypeOrLength {
        match value {
            0..=1500 => TypeOrLength::Length(value),
            0x0600.. => TypeOrLength::EtherType(value),
            _ => TypeOrLength::Undefined(value),
        }
    }
}

/// Why a frame's header was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Shorter than the header (14 bytes, 18 with an 802.1Q tag).
    Runt,
    /// Longer than the header plus the MTU.
    Oversize,
}

/// The checked header of a frame: what forwarding needs. The payload is never looked at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Where the frame goes.
    pub destination: MacAddress,
    /// Who sent it (not yet checked to be a valid source: the switch does that).
    pub source: MacAddress,
    /// The tag control information (PCP, DEI, VID) of an 802.1Q tag, when there is one. The
    /// switch tolerates tags and forwards tagged frames unchanged; it does not separate VLANs.
    pub vlan_tci: Option<u16>,
    /// The length/type field after the addresses and the tag.
    pub type_or_length: TypeOrLength,
}

impl FrameHeader {
    /// Parses the header of `bytes`, checking the length against `mtu` (payload bytes; a
    /// tagged frame may be 4 bytes longer). Never panics, whatever `bytes` holds.
    pub fn parse(bytes: &[u8], mtu: u16) -> Result<FrameHeader, FrameError> {
        if bytes.len() < HEADER_LEN {
            return Err(FrameError::Runt);
        }
        let field = |at: usize| u16::from_be_bytes([bytes[at], bytes[at + 1]]);
        let destination = MacAddress::from_slice(&bytes[0..6]).ok_or(FrameError::Runt)?;
        let source = MacAddress::from_slice(&bytes[6..12]).ok_or(FrameError::Runt)?;
        let first = field(12);
        let (vlan_tci, type_or_length) = if first == TPID_8021Q {
            if bytes.len() < HEADER_LEN + VLAN_TAG_LEN {
                return Err(FrameError::Runt);
            }
            (Some(field(14)), TypeOrLength::classify(field(16)))
        } else {
            (None, TypeOrLength::classify(first))
        };
        if bytes.len() > max_frame_len(mtu, vlan_tci.is_some()) {
            return Err(FrameError::Oversize);
        }
        Ok(FrameHeader {
            destination,
            source,
            vlan_tci,
            type_or_length,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn frame(len: usize, tag: bool) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        bytes[..6].copy_from_slice(&[0xff; 6]);
        bytes[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        if tag {
            bytes[12..14].copy_from_slice(&TPID_8021Q.to_be_bytes());
            if len >= 18 {
                bytes[14..16].copy_from_slice(&0x2064u16.to_be_bytes());
                bytes[16..18].copy_from_slice(&0x0800u16.to_be_bytes());
            }
        } else {
            bytes[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        }
        bytes
    }

    #[test]
    fn untagged() {
        let header = FrameHeader::parse(&frame(60, false), DEFAULT_MTU).unwrap();
        assert_eq!(header.destination, MacAddress::BROADCAST);
        assert_eq!(header.source, MacAddress([2, 0, 0, 0, 0, 1]));
        assert_eq!(header.vlan_tci, None);
        assert_eq!(header.type_or_length, TypeOrLength::EtherType(0x0806));
    }

    #[test]
    fn tagged() {
        let header = FrameHeader::parse(&frame(64, true), DEFAULT_MTU).unwrap();
        assert_eq!(header.vlan_tci, Some(0x2064));
        assert_eq!(header.type_or_length, TypeOrLength::EtherType(0x0800));
    }

    #[test]
    fn length_and_undefined() {
        let mut bytes = frame(20, false);
        bytes[12..14].copy_from_slice(&6u16.to_be_bytes());
        let header = FrameHeader::parse(&bytes, DEFAULT_MTU).unwrap();
        assert_eq!(header.type_or_length, TypeOrLength::Length(6));
        bytes[12..14].copy_from_slice(&1530u16.to_be_bytes());
        let header = FrameHeader::parse(&bytes, DEFAULT_MTU).unwrap();
        assert_eq!(header.type_or_length, TypeOrLength::Undefined(1530));
    }

    #[test]
    fn runts() {
        for len in 0..HEADER_LEN {
            assert_eq!(
                FrameHeader::parse(&frame(HEADER_LEN, false)[..len], DEFAULT_MTU),
                Err(FrameError::Runt)
            );
        }
        assert!(FrameHeader::parse(&frame(14, false), DEFAULT_MTU).is_ok());
        for len in 14..18 {
            assert_eq!(
                FrameHeader::parse(&frame(len, true), DEFAULT_MTU),
                Err(FrameError::Runt)
            );
        }
        assert!(FrameHeader::parse(&frame(18, true), DEFAULT_MTU).is_ok());
    }

    #[test]
    fn oversize() {
        assert!(FrameHeader::parse(&frame(1514, false), DEFAULT_MTU).is_ok());
        assert_eq!(
            FrameHeader::parse(&frame(1515, false), DEFAULT_MTU),
            Err(FrameError::Oversize)
        );
        assert!(FrameHeader::parse(&frame(1518, true), DEFAULT_MTU).is_ok());
        assert_eq!(
            FrameHeader::parse(&frame(1519, true), DEFAULT_MTU),
            Err(FrameError::Oversize)
        );
        // A jumbo MTU is a parameter.
        assert!(FrameHeader::parse(&frame(9014, false), 9000).is_ok());
        assert_eq!(
            FrameHeader::parse(&frame(9015, false), 9000),
            Err(FrameError::Oversize)
        );
    }
}
