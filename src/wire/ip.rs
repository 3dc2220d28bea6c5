//! Version dispatch: one checked view for "an IP packet read from the TUN".

use std::net::IpAddr;

use super::{Error, Ipv4Packet, Ipv6Packet};

/// IP protocol numbers (IPv4 protocol / IPv6 next header) that linen looks at.
pub mod protocol {
    /// IPv6 Hop-by-Hop Options extension header.
    pub const HOP_BY_HOP: u8 = 0;
    /// ICMP for IPv4.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// IPv6 Routing extension header.
    pub const IPV6_ROUTE: u8 = 43;
    /// IPv6 Fragment extension header.
    pub const IPV6_FRAG: u8 = 44;
    /// ICMP for IPv6.
    pub const ICMPV6: u8 = 58;
    /// IPv6 Authentication Header (RFC 4302).
    pub const AH: u8 = 51;
    /// IPv6 Destination Options extension header.
    pub const IPV6_OPTS: u8 = 60;
}

/// A checked IPv4 or IPv6 packet, chosen by the version nibble.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpPacket<T: AsRef<[u8]>> {
    /// An IPv4 packet.
    V4(Ipv4Packet<T>),
    /// An IPv6 packet.
    V6(Ipv6Packet<T>),
}

impl<T: AsRef<[u8]>> IpPacket<T> {
    /// Checks the buffer as IPv4 or IPv6 according to its first nibble.
    ///
    /// An empty buffer is [`Error::Truncated`]; any version other than 4 or 6 is
    /// [`Error::BadVersion`]; otherwise the errors of the version's `new_checked`.
    #[inline]
    pub fn new_checked(buffer: T) -> Result<Self, Error> {
        match buffer.as_ref().first().map(|b| b >> 4) {
            None => Err(Error::Truncated),
            Some(4) => Ipv4Packet::new_checked(buffer).map(IpPacket::V4),
            Some(6) => Ipv6Packet::new_checked(buffer).map(IpPacket::V6),
            Some(_) => Err(Error::BadVersion),
        }
    }

    /// Unwraps the buffer.
    #[inline]
    pub fn into_inner(self) -> T {
        match self {
            IpPacket::V4(p) => p.into_inner(),
            IpPacket::V6(p) => p.into_inner(),
        }
    }

    /// The version: 4 or 6.
    #[inline]
    pub fn version(&self) -> u8 {
        match self {
            IpPacket::V4(_) => 4,
            IpPacket::V6(_) => 6,
        }
    }

    /// The source address.
    #[inline]
    pub fn src_addr(&self) -> IpAddr {
        match self {
            IpPacket::V4(p) => p.src_addr().into(),
            IpPacket::V6(p) => p.src_addr().into(),
        }
    }

    /// The destination address.
    #[inline]
    pub fn dst_addr(&self) -> IpAddr {
        match self {
            IpPacket::V4(p) => p.dst_addr().into(),
            IpPacket::V6(p) => p.dst_addr().into(),
        }
    }

    /// The length of the packet (IPv4 total length, or 40 + IPv6 payload length); the buffer
    /// may be longer.
    #[inline]
    pub fn packet_len(&self) -> usize {
        match self {
            IpPacket::V4(p) => p.packet_len(),
            IpPacket::V6(p) => p.packet_len(),
        }
    }

    /// The packet bytes without trailing buffer bytes: what to forward.
    #[inline]
    pub fn packet(&self) -> &[u8] {
        match self {
            IpPacket::V4(p) => p.packet(),
            IpPacket::V6(p) => p.packet(),
        }
    }

    /// The TTL (IPv4) or hop limit (IPv6).
    #[inline]
    pub fn hop_limit(&self) -> u8 {
        match self {
            IpPacket::V4(p) => p.ttl(),
            IpPacket::V6(p) => p.hop_limit(),
        }
    }

    /// The IPv4 protocol, or the IPv6 *first* next header (extension headers are not walked).
    #[inline]
    pub fn protocol(&self) -> u8 {
        match self {
            IpPacket::V4(p) => p.protocol(),
            IpPacket::V6(p) => p.next_header(),
        }
    }

    /// The payload after the IPv4 header (options included) or the fixed IPv6 header.
    #[inline]
    pub fn payload(&self) -> &[u8] {
        match self {
            IpPacket::V4(p) => p.payload(),
            IpPacket::V6(p) => p.payload(),
        }
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> IpPacket<T> {
    /// Decrements the TTL (with the RFC 1624 checksum update) or the hop limit; saturates at 0.
    /// The caller checks `hop_limit() <= 1` first and answers with Time Exceeded instead.
    #[inline]
    pub fn decrement_hop_limit(&mut self) {
        match self {
            IpPacket::V4(p) => p.decrement_ttl(),
            IpPacket::V6(p) => p.decrement_hop_limit(),
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::wire::ipv4::test::{ECHO_V4, UDP_V4};
    use crate::wire::ipv6::test::{ECHO_V6, UDP_V6};

    #[test]
    fn dispatches_by_version() {
        let v4 = IpPacket::new_checked(&UDP_V4[..]).unwrap();
        assert_eq!(v4.version(), 4);
        assert_eq!(v4.src_addr(), "198.19.1.2".parse::<IpAddr>().unwrap());
        assert_eq!(v4.dst_addr(), "198.19.2.2".parse::<IpAddr>().unwrap());
        assert_eq!(v4.packet_len(), 40);
        assert_eq!(v4.protocol(), protocol::UDP);
        assert_eq!(v4.hop_limit(), 64);
        assert_eq!(v4.payload(), &UDP_V4[20..]);
        assert_eq!(v4.packet(), &UDP_V4[..]);
        assert!(matches!(v4, IpPacket::V4(_)));

        let v6 = IpPacket::new_checked(&ECHO_V6[..]).unwrap();
        assert_eq!(v6.version(), 6);
        assert_eq!(v6.src_addr(), "fd00::1".parse::<IpAddr>().unwrap());
        assert_eq!(v6.dst_addr(), "fd00::2".parse::<IpAddr>().unwrap());
        assert_eq!(v6.packet_len(), 64);
        assert_eq!(v6.protocol(), protocol::ICMPV6);
        assert_eq!(v6.payload(), &ECHO_V6[40..]);
        assert_eq!(v6.into_inner(), &ECHO_V6[..]);
    }

    #[test]
    fn rejects_what_the_views_reject() {
        assert_eq!(
            IpPacket::new_checked(&[][..]).unwrap_err(),
            Error::Truncated
        );
        assert_eq!(
            IpPacket::new_checked(&[0x45][..]).unwrap_err(),
            Error::Truncated
        );
        assert_eq!(
            IpPacket::new_checked(&[0x60; 39][..]).unwrap_err(),
            Error::Truncated
        );
        for version in [0u8, 1, 2, 3, 5, 7, 15] {
            let mut b = UDP_V4;
            b[0] = (version << 4) | 5;
            assert_eq!(
                IpPacket::new_checked(&b[..]).unwrap_err(),
                Error::BadVersion
            );
        }
        for pkt in [&ECHO_V4[..], &UDP_V4[..], &ECHO_V6[..], &UDP_V6[..]] {
            for len in 0..pkt.len() {
                assert!(IpPacket::new_checked(&pkt[..len]).is_err(), "prefix {len}");
            }
        }
    }

    #[test]
    fn decrements_either_version() {
        let mut v4 = ECHO_V4;
        let mut p = IpPacket::new_checked(&mut v4[..]).unwrap();
        p.decrement_hop_limit();
        assert_eq!(p.hop_limit(), 63);
        assert!(matches!(&p, IpPacket::V4(p) if p.verify_checksum()));
        let mut v6 = UDP_V6;
        let mut p = IpPacket::new_checked(&mut v6[..]).unwrap();
        p.decrement_hop_limit();
        assert_eq!(p.hop_limit(), 63);
        assert_eq!(&v6[8..], &UDP_V6[8..]);
    }
}
