//! Typed addresses: guest-physical, guest-virtual and host-physical addresses are different
//! types so that one can never be passed where another is meant. Also the page-size constants.

use core::fmt;

/// The size of the smallest page (and of a host frame) in bytes.
// See: SDM Vol 3A 4.1.1 (4-KByte pages); APM Vol 2 5.1 (4-Kbyte pages)
pub const PAGE_SIZE: u64 = 4096;

/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;

/// A 2 MiB large page (a leaf in a 64-bit page directory).
pub const LARGE_PAGE_SIZE_2M: u64 = 2 << 20;

/// A 4 MiB large page (a leaf in a 32-bit paging page directory with CR4.PSE).
pub const LARGE_PAGE_SIZE_4M: u64 = 4 << 20;

/// A 1 GiB huge page (a leaf in a page-directory-pointer table).
pub const HUGE_PAGE_SIZE_1G: u64 = 1 << 30;

macro_rules! typed_address {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub u64);

        impl $name {
            /// The raw address.
            #[must_use]
            pub const fn as_u64(self) -> u64 {
                self.0
            }

            /// The offset inside the 4 KiB page holding this address.
            #[must_use]
            pub const fn page_offset(self) -> u64 {
                self.0 & (PAGE_SIZE - 1)
            }

            /// The start of the 4 KiB page holding this address.
            #[must_use]
            pub const fn align_down(self) -> Self {
                Self(self.0 & !(PAGE_SIZE - 1))
            }

            /// The next 4 KiB boundary at or above this address, or `None` on overflow.
            #[must_use]
            pub const fn align_up(self) -> Option<Self> {
                match self.0.checked_add(PAGE_SIZE - 1) {
                    Some(sum) => Some(Self(sum & !(PAGE_SIZE - 1))),
                    None => None,
                }
            }

            /// Whether the address is the start of a 4 KiB page.
            #[must_use]
            pub const fn is_page_aligned(self) -> bool {
                self.page_offset() == 0
            }

            /// The page number (address / 4 KiB).
            #[must_use]
            pub const fn page_number(self) -> u64 {
                self.0 >> PAGE_SHIFT
            }

            /// `self + offset`, or `None` on overflow.
            #[must_use]
            pub const fn checked_add(self, offset: u64) -> Option<Self> {
                match self.0.checked_add(offset) {
                    Some(sum) => Some(Self(sum)),
                    None => None,
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(formatter, "{:#x}", self.0)
            }
        }

        impl fmt::LowerHex for $name {
            fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, formatter)
            }
        }
    };
}

typed_address!(
    /// An address in the guest's physical address space (what the guest puts in its page
    /// tables; what the nested page tables translate).
    GuestPhysAddr
);
typed_address!(
    /// A linear (virtual) address as the guest sees it, before its own paging.
    GuestVirtAddr
);
typed_address!(
    /// An address in the host's physical address space (real RAM frames).
    HostPhysAddr
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_helpers() {
        let address = GuestPhysAddr(0x1234_5678);
        assert_eq!(address.page_offset(), 0x678);
        assert_eq!(address.align_down(), GuestPhysAddr(0x1234_5000));
        assert_eq!(address.align_up(), Some(GuestPhysAddr(0x1234_6000)));
        assert_eq!(address.page_number(), 0x12345);
        assert!(!address.is_page_aligned());
        assert!(HostPhysAddr(0x2000).is_page_aligned());
        assert_eq!(HostPhysAddr(0x2000).align_up(), Some(HostPhysAddr(0x2000)));
        assert_eq!(GuestVirtAddr(u64::MAX).align_up(), None);
    }

    #[test]
    fn checked_add_overflows_to_none() {
        assert_eq!(GuestPhysAddr(1).checked_add(2), Some(GuestPhysAddr(3)));
        assert_eq!(GuestPhysAddr(u64::MAX).checked_add(1), None);
    }

    #[test]
    fn display_is_hex() {
        assert_eq!(format!("{}", GuestPhysAddr(0x1000)), "0x1000");
        assert_eq!(format!("{}", HostPhysAddr(0)), "0x0");
        assert_eq!(format!("{:x}", GuestVirtAddr(0xabc)), "abc");
    }
}
