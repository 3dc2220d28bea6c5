//! The IPv6 fixed header (RFC 8200) as a zero-copy view.
//!
//! Extension headers are not walked by the view: [`Ipv6Packet::next_header`] is the first next
//! header and [`Ipv6Packet::payload`] starts right after the fixed 40 bytes. Jumbograms
//! (payload length 0 with a Hop-by-Hop jumbo option) are not supported: a payload length of 0
//! means an empty payload.

use std::net::Ipv6Addr;

use super::{Error, read_u16, read_u32, write_u16, write_u32};

/// Byte ranges of the fixed IPv6 header.
mod field {
    use core::ops::Range;

    pub const VER_TC_FLOW: usize = 0;
    pub const PAYLOAD_LEN: usize = 4;
    pub const NXT_HDR: usize = 6;
    pub const HOP_LIMIT: usize = 7;
    pub const SRC_ADDR: Range<usize> = 8..24;
    pub const DST_ADDR: Range<usize> = 24..40;
}

/// Length of the fixed IPv6 header.
pub const HEADER_LEN: usize = 40;

view! {
    /// A view of an IPv6 packet in a byte buffer.
    ///
    /// The buffer may be longer than the packet: [`packet_len`](Self::packet_len) says where the
    /// packet ends, and [`payload`](Self::payload) stops there.
    Ipv6Packet
}

impl<T: AsRef<[u8]>> Ipv6Packet<T> {
    /// Checks buffer ≥ 40 bytes ([`Error::Truncated`]), version 6 ([`Error::BadVersion`]) and
    /// 40 + payload length ≤ buffer ([`Error::BadPayloadLen`]). Trailing bytes are allowed.
    pub fn check_len(&self) -> Result<(), Error> {
        let data = self.buffer.as_ref();
        if data.len() < HEADER_LEN {
            return Err(Error::Truncated);
        }
        if self.version() != 6 {
            return Err(Error::BadVersion);
        }
        if self.packet_len() > data.len() {
            return Err(Error::BadPayloadLen);
        }
        Ok(())
    }

    /// The version nibble (6 for a checked packet).
    #[inline]
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VER_TC_FLOW] >> 4
    }

    /// The traffic class.
    #[inline]
    pub fn traffic_class(&self) -> u8 {
        (read_u16(self.buffer.as_ref(), field::VER_TC_FLOW) >> 4) as u8
    }

    /// The 20-bit flow label.
    #[inline]
    pub fn flow_label(&self) -> u32 {
        read_u32(self.buffer.as_ref(), field::VER_TC_FLOW) & 0x000f_ffff
    }

    /// The payload length field (everything after the fixed header, extension headers
    /// included).
    #[inline]
    pub fn payload_len(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::PAYLOAD_LEN)
    }

    /// The length of the packet in the buffer: 40 + payload length.
    #[inline]
    pub fn packet_len(&self) -> usize {
        HEADER_LEN + usize::from(self.payload_len())
    }

    /// The header length: always 40 (extension headers count as payload).
    #[inline]
    pub const fn header_len(&self) -> usize {
        HEADER_LEN
    }

    /// The first next header: the upper-layer protocol or the first extension header.
    #[inline]
    pub fn next_header(&self) -> u8 {
        self.buffer.as_ref()[field::NXT_HDR]
    }

    /// The hop limit.
    #[inline]
    pub fn hop_limit(&self) -> u8 {
        self.buffer.as_ref()[field::HOP_LIMIT]
    }

    /// The source address.
    #[inline]
    pub fn src_addr(&self) -> Ipv6Addr {
        Ipv6Addr::from(self.addr(field::SRC_ADDR.start))
    }

    /// The destination address.
    #[inline]
    pub fn dst_addr(&self) -> Ipv6Addr {
        Ipv6Addr::from(self.addr(field::DST_ADDR.start))
    }

    #[inline]
    fn addr(&self, at: usize) -> [u8; 16] {
        let mut octets = [0u8; 16];
        octets.copy_from_slice(&self.buffer.as_ref()[at..at + 16]);
        octets
    }

    /// The packet bytes up to 40 + payload length, without trailing bytes.
    #[inline]
    pub fn packet(&self) -> &[u8] {
        let data = self.buffer.as_ref();
        &data[..self.packet_len().min(data.len())]
    }

    /// The payload after the fixed header, up to the payload length (clamped to the buffer).
    #[inline]
    pub fn payload(&self) -> &[u8] {
        self.packet().get(HEADER_LEN..).unwrap_or(&[])
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv6Packet<T> {
    /// Sets the version nibble.
    #[inline]
    pub fn set_version(&mut self, version: u8) {
        let d = self.buffer.as_mut();
        d[0] = (d[0] & 0x0f) | (version << 4);
    }

    /// Sets the traffic class.
    #[inline]
    pub fn set_traffic_class(&mut self, tc: u8) {
        let d = self.buffer.as_mut();
        let word = (read_u16(d, field::VER_TC_FLOW) & 0xf00f) | (u16::from(tc) << 4);
        write_u16(d, field::VER_TC_FLOW, word);
    }

    /// Sets the 20-bit flow label (higher bits are ignored).
    #[inline]
    pub fn set_flow_label(&mut self, label: u32) {
        let d = self.buffer.as_mut();
        let word = (read_u32(d, field::VER_TC_FLOW) & 0xfff0_0000) | (label & 0x000f_ffff);
        write_u32(d, field::VER_TC_FLOW, word);
    }

    /// Sets the payload length.
    #[inline]
    pub fn set_payload_len(&mut self, len: u16) {
        write_u16(self.buffer.as_mut(), field::PAYLOAD_LEN, len);
    }

    /// Sets the next header.
    #[inline]
    pub fn set_next_header(&mut self, next_header: u8) {
        self.buffer.as_mut()[field::NXT_HDR] = next_header;
    }

    /// Sets the hop limit.
    #[inline]
    pub fn set_hop_limit(&mut self, hop_limit: u8) {
        self.buffer.as_mut()[field::HOP_LIMIT] = hop_limit;
    }

    /// Sets the source address.
    #[inline]
    pub fn set_src_addr(&mut self, addr: Ipv6Addr) {
        self.buffer.as_mut()[field::SRC_ADDR].copy_from_slice(&addr.octets());
    }

    /// Sets the destination address.
    #[inline]
    pub fn set_dst_addr(&mut self, addr: Ipv6Addr) {
        self.buffer.as_mut()[field::DST_ADDR].copy_from_slice(&addr.octets());
    }

    /// The payload, mutable (see [`payload`](Self::payload)).
    #[inline]
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let end = self.packet_len();
        let data = self.buffer.as_mut();
        let end = end.min(data.len());
        data.get_mut(HEADER_LEN..end).unwrap_or(&mut [])
    }

    /// Decrements the hop limit by one (IPv6 has no header checksum).
    ///
    /// The caller checks `hop_limit() <= 1` first and answers with ICMPv6 Time Exceeded. A hop
    /// limit of 0 is left at 0 (saturating), never wrapped to 255.
    #[inline]
    pub fn decrement_hop_limit(&mut self) {
        let hop_limit = self.hop_limit();
        self.set_hop_limit(hop_limit.saturating_sub(1));
    }
}

#[cfg(test)]
pub(crate) mod test {
    use super::*;
    use crate::wire::checksum;
    use crate::wire::ipv4::test::naive_checksum;

    /// ICMPv6 echo request fd00::1 → fd00::2, id 0x2a1b seq 3, flow label 0x8f3a2, hop limit 64.
    pub(crate) static ECHO_V6: [u8; 64] = [
        0x60, 0x08, 0xf3, 0xa2, 0x00, 0x18, 0x3a, 0x40, 0xfd, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0xfd, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x80, 0x00, 0x22, 0x49, 0x2a,
        0x1b, 0x00, 0x03, 0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28, 0x29, 0x2a, 0x2b,
        0x2c, 0x2d, 0x2e, 0x2f,
    ];

    /// UDP [fd00::1]:5353 → [fd00::2]:8285, payload "linen6", hop limit 64.
    pub(crate) static UDP_V6: [u8; 54] = [
        0x60, 0x08, 0xf3, 0xa2, 0x00, 0x0e, 0x11, 0x40, 0xfd, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0xfd, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x14, 0xe9, 0x20, 0x5d, 0x00,
        0x0e, 0x87, 0x82, 0x6c, 0x69, 0x6e, 0x65, 0x6e, 0x36,
    ];

    /// The upper-layer checksum of a golden packet laid out by hand: pseudo-header bytes
    /// (addresses, 32-bit length, three zero bytes, next header) followed by the payload.
    pub(crate) fn naive_v6_upper_checksum(pkt: &[u8]) -> u16 {
        let mut covered = pkt[8..40].to_vec();
        covered.extend_from_slice(&((pkt.len() - 40) as u32).to_be_bytes());
        covered.extend_from_slice(&[0, 0, 0, pkt[6]]);
        covered.extend_from_slice(&pkt[40..]);
        naive_checksum(&covered)
    }

    #[test]
    fn golden_checksums_are_right() {
        assert_eq!(naive_v6_upper_checksum(&ECHO_V6), 0);
        assert_eq!(naive_v6_upper_checksum(&UDP_V6), 0);
        // And the library's pseudo-header agrees with the hand layout.
        let p = Ipv6Packet::new_checked(&ECHO_V6[..]).unwrap();
        let sum = checksum::combine(&[
            checksum::pseudo_header_v6(&p.src_addr(), &p.dst_addr(), 58, 24),
            checksum::data(p.payload()),
        ]);
        assert_eq!(sum, 0xffff);
    }

    #[test]
    fn parses_echo_request() {
        let p = Ipv6Packet::new_checked(&ECHO_V6[..]).unwrap();
        assert_eq!(p.version(), 6);
        assert_eq!(p.traffic_class(), 0);
        assert_eq!(p.flow_label(), 0x8f3a2);
        assert_eq!(p.payload_len(), 24);
        assert_eq!(p.packet_len(), 64);
        assert_eq!(p.header_len(), 40);
        assert_eq!(p.next_header(), 58);
        assert_eq!(p.hop_limit(), 64);
        assert_eq!(p.src_addr(), "fd00::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(p.dst_addr(), "fd00::2".parse::<Ipv6Addr>().unwrap());
        assert_eq!(p.payload(), &ECHO_V6[40..]);
        assert_eq!(p.packet(), &ECHO_V6[..]);
        assert_eq!(p.into_inner(), &ECHO_V6[..]);
    }

    #[test]
    fn every_truncation_is_rejected() {
        for pkt in [&ECHO_V6[..], &UDP_V6[..]] {
            for len in 0..pkt.len() {
                let err = Ipv6Packet::new_checked(&pkt[..len]).unwrap_err();
                let expected = if len < 40 {
                    Error::Truncated
                } else {
                    Error::BadPayloadLen
                };
                assert_eq!(err, expected, "prefix of {len} bytes");
            }
            assert!(Ipv6Packet::new_checked(pkt).is_ok());
        }
    }

    #[test]
    fn trailing_bytes_and_bad_version() {
        let mut buf = UDP_V6.to_vec();
        buf.extend_from_slice(&[0xee; 9]);
        let p = Ipv6Packet::new_checked(&buf[..]).unwrap();
        assert_eq!(p.packet(), &UDP_V6[..]);
        assert_eq!(p.payload(), &UDP_V6[40..]);
        buf[0] = 0x40;
        assert_eq!(
            Ipv6Packet::new_checked(&buf[..]).unwrap_err(),
            Error::BadVersion
        );
    }

    #[test]
    fn setters_round_trip() {
        let mut buf = [0u8; 44];
        let mut p = Ipv6Packet::new_unchecked(&mut buf[..]);
        p.set_version(6);
        p.set_traffic_class(0xb8);
        p.set_flow_label(0xf_ffff);
        p.set_flow_label(0x1_2345);
        p.set_payload_len(4);
        p.set_next_header(17);
        p.set_hop_limit(2);
        p.set_src_addr("fd00::a".parse().unwrap());
        p.set_dst_addr("fd00::b".parse().unwrap());
        p.payload_mut().copy_from_slice(&[9, 8, 7, 6]);
        assert_eq!(&buf[..4], &[0x6b, 0x81, 0x23, 0x45]);
        let mut p = Ipv6Packet::new_checked(&mut buf[..]).unwrap();
        assert_eq!(
            (p.version(), p.traffic_class(), p.flow_label()),
            (6, 0xb8, 0x1_2345)
        );
        assert_eq!(
            (p.payload_len(), p.next_header(), p.hop_limit()),
            (4, 17, 2)
        );
        assert_eq!(p.src_addr(), "fd00::a".parse::<Ipv6Addr>().unwrap());
        assert_eq!(p.dst_addr(), "fd00::b".parse::<Ipv6Addr>().unwrap());
        assert_eq!(p.payload(), &[9, 8, 7, 6]);
        p.decrement_hop_limit();
        assert_eq!(p.hop_limit(), 1);
        p.decrement_hop_limit();
        assert_eq!(p.hop_limit(), 0);
        p.decrement_hop_limit();
        assert_eq!(p.hop_limit(), 0, "saturates at zero");
        // A payload length changed beyond the buffer after the check clamps, never panics.
        p.set_payload_len(u16::MAX);
        assert_eq!(p.payload().len(), 4);
        assert_eq!(p.payload_mut().len(), 4);
    }
}
