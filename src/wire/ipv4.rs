//! The IPv4 header (RFC 791) as a zero-copy view.

use std::net::Ipv4Addr;

use super::{Error, checksum, read_u16, write_u16};

/// Byte ranges of the fixed IPv4 header.
mod field {
    use core::ops::Range;

    pub const VER_IHL: usize = 0;
    pub const DSCP_ECN: usize = 1;
    pub const LENGTH: usize = 2;
    pub const IDENT: usize = 4;
    pub const FLG_OFF: usize = 6;
    pub const TTL: usize = 8;
    pub const PROTOCOL: usize = 9;
    pub const CHECKSUM: usize = 10;
    pub const SRC_ADDR: Range<usize> = 12..16;
    pub const DST_ADDR: Range<usize> = 16..20;
}

/// Length of the IPv4 header without options.
pub const HEADER_LEN: usize = 20;

const FLAG_DF: u16 = 0x4000;
const FLAG_MF: u16 = 0x2000;
const OFFSET_MASK: u16 = 0x1fff;

view! {
    /// A view of an IPv4 packet in a byte buffer.
    ///
    /// The buffer may be longer than the packet (a receive buffer): [`total_len`](Self::total_len)
    /// says where the packet ends, and [`payload`](Self::payload) stops there.
    Ipv4Packet
}

impl<T: AsRef<[u8]>> Ipv4Packet<T> {
    /// Checks that the buffer holds the whole header and the whole packet it declares.
    ///
    /// Buffer ≥ 20 bytes ([`Error::Truncated`]), version 4 ([`Error::BadVersion`]),
    /// 20 ≤ IHL·4 ≤ buffer ([`Error::BadHeaderLen`]), IHL·4 ≤ total length ≤ buffer
    /// ([`Error::BadTotalLen`]). Trailing bytes after the total length are allowed.
    pub fn check_len(&self) -> Result<(), Error> {
        let data = self.buffer.as_ref();
        if data.len() < HEADER_LEN {
            return Err(Error::Truncated);
        }
        if self.version() != 4 {
            return Err(Error::BadVersion);
        }
        let header_len = usize::from(self.header_len());
        if header_len < HEADER_LEN || header_len > data.len() {
            return Err(Error::BadHeaderLen);
        }
        let total_len = usize::from(self.total_len());
        if total_len < header_len || total_len > data.len() {
            return Err(Error::BadTotalLen);
        }
        Ok(())
    }

    /// The version nibble (4 for a checked packet).
    #[inline]
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VER_IHL] >> 4
    }

    /// The header length in bytes (IHL · 4), options included.
    #[inline]
    pub fn header_len(&self) -> u8 {
        (self.buffer.as_ref()[field::VER_IHL] & 0x0f) * 4
    }

    /// The DSCP/ECN byte (the former type of service).
    #[inline]
    pub fn dscp_ecn(&self) -> u8 {
        self.buffer.as_ref()[field::DSCP_ECN]
    }

    /// The total length field: header plus payload, in bytes.
    #[inline]
    pub fn total_len(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::LENGTH)
    }

    /// The length of the packet in the buffer, i.e. [`total_len`](Self::total_len) as `usize`.
    #[inline]
    pub fn packet_len(&self) -> usize {
        usize::from(self.total_len())
    }

    /// The identification field.
    #[inline]
    pub fn ident(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::IDENT)
    }

    /// The don't-fragment flag.
    #[inline]
    pub fn dont_frag(&self) -> bool {
        read_u16(self.buffer.as_ref(), field::FLG_OFF) & FLAG_DF != 0
    }

    /// The more-fragments flag.
    #[inline]
    pub fn more_frags(&self) -> bool {
        read_u16(self.buffer.as_ref(), field::FLG_OFF) & FLAG_MF != 0
    }

    /// The fragment offset in bytes (the field is in units of 8 bytes).
    #[inline]
    pub fn frag_offset(&self) -> u16 {
        (read_u16(self.buffer.as_ref(), field::FLG_OFF) & OFFSET_MASK) << 3
    }

    /// The time to live.
    #[inline]
    pub fn ttl(&self) -> u8 {
        self.buffer.as_ref()[field::TTL]
    }

    /// The protocol of the payload (see [`protocol`](super::protocol)).
    #[inline]
    pub fn protocol(&self) -> u8 {
        self.buffer.as_ref()[field::PROTOCOL]
    }

    /// The header checksum field.
    #[inline]
    pub fn checksum(&self) -> u16 {
        read_u16(self.buffer.as_ref(), field::CHECKSUM)
    }

    /// The source address.
    #[inline]
    pub fn src_addr(&self) -> Ipv4Addr {
        self.addr(field::SRC_ADDR.start)
    }

    /// The destination address.
    #[inline]
    pub fn dst_addr(&self) -> Ipv4Addr {
        self.addr(field::DST_ADDR.start)
    }

    #[inline]
    fn addr(&self, at: usize) -> Ipv4Addr {
        Ipv4Addr::from_bits(super::read_u32(self.buffer.as_ref(), at))
    }

    /// The header bytes, options included (clamped to the buffer).
    #[inline]
    pub fn header(&self) -> &[u8] {
        let data = self.buffer.as_ref();
        let end = usize::from(self.header_len()).min(data.len());
        &data[..end]
    }

    /// Whether the header checksum verifies.
    #[inline]
    pub fn verify_checksum(&self) -> bool {
        checksum::data(self.header()) == 0xffff
    }

    /// The packet bytes: header and payload up to the total length, without trailing bytes.
    #[inline]
    pub fn packet(&self) -> &[u8] {
        let data = self.buffer.as_ref();
        &data[..self.packet_len().min(data.len())]
    }

    /// The payload: from the end of the header to the total length (empty if the header fields
    /// were changed so that they contradict each other).
    #[inline]
    pub fn payload(&self) -> &[u8] {
        let range = usize::from(self.header_len())..self.packet_len();
        self.buffer.as_ref().get(range).unwrap_or(&[])
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv4Packet<T> {
    /// Sets the version nibble.
    #[inline]
    pub fn set_version(&mut self, version: u8) {
        let d = self.buffer.as_mut();
        d[field::VER_IHL] = (d[field::VER_IHL] & 0x0f) | (version << 4);
    }

    /// Sets the header length in bytes (rounded down to a multiple of 4).
    #[inline]
    pub fn set_header_len(&mut self, len: u8) {
        let d = self.buffer.as_mut();
        d[field::VER_IHL] = (d[field::VER_IHL] & 0xf0) | ((len / 4) & 0x0f);
    }

    /// Sets the DSCP/ECN byte.
    #[inline]
    pub fn set_dscp_ecn(&mut self, value: u8) {
        self.buffer.as_mut()[field::DSCP_ECN] = value;
    }

    /// Sets the total length field.
    #[inline]
    pub fn set_total_len(&mut self, len: u16) {
        write_u16(self.buffer.as_mut(), field::LENGTH, len);
    }

    /// Sets the identification field.
    #[inline]
    pub fn set_ident(&mut self, ident: u16) {
        write_u16(self.buffer.as_mut(), field::IDENT, ident);
    }

    /// Sets the flags and the fragment offset (in bytes; must be a multiple of 8) at once.
    #[inline]
    pub fn set_frag(&mut self, dont_frag: bool, more_frags: bool, offset: u16) {
        let mut raw = (offset >> 3) & OFFSET_MASK;
        if dont_frag {
            raw |= FLAG_DF;
        }
        if more_frags {
            raw |= FLAG_MF;
        }
        write_u16(self.buffer.as_mut(), field::FLG_OFF, raw);
    }

    /// Sets the time to live (the checksum is not updated).
    #[inline]
    pub fn set_ttl(&mut self, ttl: u8) {
        self.buffer.as_mut()[field::TTL] = ttl;
    }

    /// Sets the protocol.
    #[inline]
    pub fn set_protocol(&mut self, protocol: u8) {
        self.buffer.as_mut()[field::PROTOCOL] = protocol;
    }

    /// Sets the header checksum field.
    #[inline]
    pub fn set_checksum(&mut self, checksum: u16) {
        write_u16(self.buffer.as_mut(), field::CHECKSUM, checksum);
    }

    /// Sets the source address.
    #[inline]
    pub fn set_src_addr(&mut self, addr: Ipv4Addr) {
        self.buffer.as_mut()[field::SRC_ADDR].copy_from_slice(&addr.octets());
    }

    /// Sets the destination address.
    #[inline]
    pub fn set_dst_addr(&mut self, addr: Ipv4Addr) {
        self.buffer.as_mut()[field::DST_ADDR].copy_from_slice(&addr.octets());
    }

    /// Recomputes the header checksum over the whole header.
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let sum = checksum::data(self.header());
        self.set_checksum(!sum);
    }

    /// The payload, mutable (see [`payload`](Self::payload)).
    #[inline]
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let range = usize::from(self.header_len())..self.packet_len();
        self.buffer.as_mut().get_mut(range).unwrap_or(&mut [])
    }

    /// Decrements the TTL by one and updates the header checksum incrementally (RFC 1624).
    ///
    /// The caller checks `ttl() <= 1` first and answers with ICMP Time Exceeded instead of
    /// forwarding. A TTL of 0 is left at 0 (saturating, checksum untouched): it never wraps
    /// to 255. A header whose checksum verified before still verifies after.
    #[inline]
    pub fn decrement_ttl(&mut self) {
        let ttl = self.ttl();
        if ttl == 0 {
            return;
        }
        let proto = u16::from(self.protocol());
        let old_word = (u16::from(ttl) << 8) | proto;
        let new_word = (u16::from(ttl - 1) << 8) | proto;
        let sum = checksum::update(self.checksum(), old_word, new_word);
        self.set_ttl(ttl - 1);
        self.set_checksum(sum);
    }
}

#[cfg(test)]
pub(crate) mod test {
    use super::*;

    /// ICMP echo request 198.19.1.2 → 198.19.2.2, id 0x0d3f seq 1, DF, TTL 64.
    pub(crate) static ECHO_V4: [u8; 76] = [
        0x45, 0x00, 0x00, 0x4c, 0xab, 0xcd, 0x40, 0x00, 0x40, 0x01, 0xff, 0xb8, 0xc6, 0x13, 0x01,
        0x02, 0xc6, 0x13, 0x02, 0x02, 0x08, 0x00, 0x78, 0xbe, 0x0d, 0x3f, 0x00, 0x01, 0x65, 0x49,
        0xf1, 0xa2, 0x00, 0x0b, 0x5c, 0x37, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18,
        0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f, 0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27,
        0x28, 0x29, 0x2a, 0x2b, 0x2c, 0x2d, 0x2e, 0x2f, 0x30, 0x31, 0x32, 0x33, 0x34, 0x35, 0x36,
        0x37,
    ];

    /// UDP 198.19.1.2:54321 → 198.19.2.2:5001, payload "hello linen\n", DF, TTL 64.
    pub(crate) static UDP_V4: [u8; 40] = [
        0x45, 0x00, 0x00, 0x28, 0x1c, 0x46, 0x40, 0x00, 0x40, 0x11, 0x8f, 0x54, 0xc6, 0x13, 0x01,
        0x02, 0xc6, 0x13, 0x02, 0x02, 0xd4, 0x31, 0x13, 0x89, 0x00, 0x14, 0xfc, 0x14, 0x68, 0x65,
        0x6c, 0x6c, 0x6f, 0x20, 0x6c, 0x69, 0x6e, 0x65, 0x6e, 0x0a,
    ];

    /// TCP SYN 198.19.1.2:43210 → 198.19.2.2:80, no options, DF, TTL 64.
    pub(crate) static TCP_SYN_V4: [u8; 40] = [
        0x45, 0x00, 0x00, 0x28, 0x7a, 0x10, 0x40, 0x00, 0x40, 0x06, 0x31, 0x95, 0xc6, 0x13, 0x01,
        0x02, 0xc6, 0x13, 0x02, 0x02, 0xa8, 0xca, 0x00, 0x50, 0x11, 0x22, 0x33, 0x44, 0x00, 0x00,
        0x00, 0x00, 0x50, 0x02, 0xfa, 0xf0, 0x38, 0x46, 0x00, 0x00,
    ];

    /// The RFC 1071 loop, written independently of `checksum::data`; returns the
    /// complemented sum, i.e. the value a checksum field must hold (0 if it verifies).
    pub(crate) fn naive_checksum(bytes: &[u8]) -> u16 {
        let mut sum: u32 = 0;
        for pair in bytes.chunks(2) {
            sum += (u32::from(pair[0]) << 8) | pair.get(1).map_or(0, |&b| u32::from(b));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// The header checksum computed from scratch, with the checksum field taken as zero.
    fn recomputed(header: &[u8]) -> u16 {
        let mut copy = header.to_vec();
        copy[10] = 0;
        copy[11] = 0;
        naive_checksum(&copy)
    }

    /// Tiny xorshift32 so the property tests need no `rand`.
    pub(crate) struct XorShift(pub(crate) u32);

    impl XorShift {
        pub(crate) fn next_u32(&mut self) -> u32 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            self.0 = x;
            x
        }

        pub(crate) fn fill(&mut self, buf: &mut [u8]) {
            for b in buf {
                *b = self.next_u32() as u8;
            }
        }
    }

    #[test]
    fn golden_checksums_are_right() {
        for pkt in [&ECHO_V4[..], &UDP_V4[..], &TCP_SYN_V4[..]] {
            assert_eq!(naive_checksum(&pkt[..20]), 0, "IP header checksum");
        }
        assert_eq!(naive_checksum(&ECHO_V4[20..]), 0, "ICMP checksum");
        // UDP and TCP checksums over the IPv4 pseudo-header.
        for (pkt, proto) in [(&UDP_V4[..], 17u8), (&TCP_SYN_V4[..], 6u8)] {
            let mut covered = pkt[12..20].to_vec();
            covered.extend_from_slice(&[0, proto, 0, (pkt.len() - 20) as u8]);
            covered.extend_from_slice(&pkt[20..]);
            assert_eq!(naive_checksum(&covered), 0, "L4 checksum, protocol {proto}");
        }
    }

    #[test]
    fn parses_echo_request() {
        let p = Ipv4Packet::new_checked(&ECHO_V4[..]).unwrap();
        assert_eq!(p.version(), 4);
        assert_eq!(p.header_len(), 20);
        assert_eq!(p.dscp_ecn(), 0);
        assert_eq!(p.total_len(), 76);
        assert_eq!(p.packet_len(), 76);
        assert_eq!(p.ident(), 0xabcd);
        assert!(p.dont_frag());
        assert!(!p.more_frags());
        assert_eq!(p.frag_offset(), 0);
        assert_eq!(p.ttl(), 64);
        assert_eq!(p.protocol(), 1);
        assert_eq!(p.checksum(), 0xffb8);
        assert_eq!(p.src_addr(), Ipv4Addr::new(198, 19, 1, 2));
        assert_eq!(p.dst_addr(), Ipv4Addr::new(198, 19, 2, 2));
        assert!(p.verify_checksum());
        assert_eq!(p.payload(), &ECHO_V4[20..]);
        assert_eq!(p.packet(), &ECHO_V4[..]);
        assert_eq!(p.header(), &ECHO_V4[..20]);
        assert_eq!(p.into_inner(), &ECHO_V4[..]);
    }

    #[test]
    fn every_truncation_is_rejected() {
        for pkt in [&ECHO_V4[..], &UDP_V4[..], &TCP_SYN_V4[..]] {
            for len in 0..pkt.len() {
                let err = Ipv4Packet::new_checked(&pkt[..len]).unwrap_err();
                let expected = if len < 20 {
                    Error::Truncated
                } else {
                    Error::BadTotalLen
                };
                assert_eq!(err, expected, "prefix of {len} bytes");
            }
            assert!(Ipv4Packet::new_checked(pkt).is_ok());
        }
    }

    #[test]
    fn trailing_bytes_are_not_payload() {
        let mut buf = ECHO_V4.to_vec();
        buf.extend_from_slice(&[0xee; 30]);
        let p = Ipv4Packet::new_checked(&buf[..]).unwrap();
        assert_eq!(p.packet_len(), 76);
        assert_eq!(p.payload(), &ECHO_V4[20..]);
        assert_eq!(p.packet(), &ECHO_V4[..]);
    }

    #[test]
    fn rejects_bad_headers() {
        let with = |at: usize, value: u8| {
            let mut b = UDP_V4;
            b[at] = value;
            Ipv4Packet::new_checked(b).err()
        };
        assert_eq!(with(0, 0x65), Some(Error::BadVersion));
        assert_eq!(with(0, 0x44), Some(Error::BadHeaderLen));
        assert_eq!(with(0, 0x40), Some(Error::BadHeaderLen));
        // IHL 10 = 40 bytes fits the 40-byte buffer; IHL 11 does not.
        assert_eq!(with(0, 0x4a), None);
        assert_eq!(with(0, 0x4b), Some(Error::BadHeaderLen));
        // Total length 19 < header 20; 41 > buffer.
        assert_eq!(with(3, 19), Some(Error::BadTotalLen));
        assert_eq!(with(3, 41), Some(Error::BadTotalLen));
        assert_eq!(with(3, 20), None);
    }

    #[test]
    fn setters_round_trip() {
        let mut buf = [0u8; 28];
        let mut p = Ipv4Packet::new_unchecked(&mut buf[..]);
        p.set_version(4);
        p.set_header_len(20);
        p.set_dscp_ecn(0xc0);
        p.set_total_len(28);
        p.set_ident(0x1234);
        p.set_frag(false, true, 1480);
        p.set_ttl(7);
        p.set_protocol(17);
        p.set_src_addr(Ipv4Addr::new(198, 19, 1, 0));
        p.set_dst_addr(Ipv4Addr::new(198, 19, 9, 9));
        p.payload_mut().copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        p.fill_checksum();
        assert_eq!(naive_checksum(&buf[..20]), 0);
        let p = Ipv4Packet::new_checked(&buf[..]).unwrap();
        assert_eq!(
            (
                p.version(),
                p.header_len(),
                p.dscp_ecn(),
                p.total_len(),
                p.ident()
            ),
            (4, 20, 0xc0, 28, 0x1234)
        );
        assert_eq!(
            (p.dont_frag(), p.more_frags(), p.frag_offset()),
            (false, true, 1480)
        );
        assert_eq!((p.ttl(), p.protocol()), (7, 17));
        assert_eq!(p.src_addr(), Ipv4Addr::new(198, 19, 1, 0));
        assert_eq!(p.dst_addr(), Ipv4Addr::new(198, 19, 9, 9));
        assert_eq!(p.payload(), &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&buf[6..8], &[0x20, 0xb9], "MF | 1480/8 = 185");
    }

    #[test]
    fn contradicting_setters_do_not_panic() {
        let mut buf = UDP_V4;
        let mut p = Ipv4Packet::new_checked(&mut buf[..]).unwrap();
        p.set_total_len(4);
        assert!(p.payload().is_empty());
        assert!(p.payload_mut().is_empty());
        assert_eq!(p.packet().len(), 4);
        p.set_total_len(u16::MAX);
        p.set_header_len(60);
        assert!(p.payload().is_empty());
        assert_eq!(p.packet().len(), 40);
        assert_eq!(p.header().len(), 40);
        let _ = p.verify_checksum();
    }

    #[test]
    fn decrement_ttl_on_golden() {
        let mut buf = ECHO_V4;
        let mut p = Ipv4Packet::new_checked(&mut buf[..]).unwrap();
        p.decrement_ttl();
        assert_eq!(p.ttl(), 63);
        assert!(p.verify_checksum());
        // 0xffb8 + 0x0100 (one TTL unit less in the sum → one more in the complement).
        assert_eq!(p.checksum(), 0x00b9);
        assert_eq!(&buf[20..], &ECHO_V4[20..], "payload untouched");
    }

    #[test]
    fn decrement_ttl_zero_saturates() {
        let mut buf = UDP_V4;
        let mut p = Ipv4Packet::new_unchecked(&mut buf[..]);
        p.set_ttl(0);
        p.fill_checksum();
        let before = p.checksum();
        p.decrement_ttl();
        assert_eq!(p.ttl(), 0);
        assert_eq!(p.checksum(), before);
        p.set_ttl(1);
        p.fill_checksum();
        p.decrement_ttl();
        assert_eq!(p.ttl(), 0);
        assert!(p.verify_checksum());
    }

    /// A random header with a valid checksum, options included.
    fn random_header(rng: &mut XorShift, buf: &mut [u8; 60]) -> usize {
        rng.fill(buf);
        let ihl = 5 + (rng.next_u32() % 11) as u8;
        buf[0] = 0x40 | ihl;
        buf[8] = buf[8].max(1);
        let len = usize::from(ihl) * 4;
        buf[10] = 0;
        buf[11] = 0;
        let sum = naive_checksum(&buf[..len]);
        buf[10..12].copy_from_slice(&sum.to_be_bytes());
        len
    }

    #[test]
    fn decrement_ttl_matches_full_recompute() {
        let mut rng = XorShift(0x2545_f491);
        let mut buf = [0u8; 60];
        for _ in 0..100_000 {
            let len = random_header(&mut rng, &mut buf);
            let mut p = Ipv4Packet::new_unchecked(&mut buf[..len]);
            p.decrement_ttl();
            assert!(p.verify_checksum());
            assert_eq!(
                p.checksum(),
                recomputed(&buf[..len]),
                "{:02x?}",
                &buf[..len]
            );
        }
    }

    #[test]
    fn decrement_ttl_checksum_zero_edges() {
        // Steer the ident field so that the checksum before, or after, is exactly 0x0000 — the
        // case where RFC 1141's eqn. 2 produced 0xffff instead.
        let mut rng = XorShift(0xdead_beef);
        let mut buf = [0u8; 60];
        let (mut zero_before, mut zero_after) = (0, 0);
        for i in 0..2_000 {
            let len = random_header(&mut rng, &mut buf);
            buf[4] = 0;
            buf[5] = 0;
            buf[10] = 0;
            buf[11] = 0;
            // Sum without ident and checksum, and the ident that makes the sum 0xffff before
            // (checksum 0) or 0xffff + 0x0100 before (so 0xffff after the TTL decrement).
            let rest = !naive_checksum(&buf[..len]);
            let target: u16 = if i % 2 == 0 { 0xffff } else { 0x0100 };
            // ident = target - rest in ones'-complement arithmetic.
            let ident = !checksum::combine(&[rest, !target]);
            buf[4..6].copy_from_slice(&ident.to_be_bytes());
            let sum = naive_checksum(&buf[..len]);
            buf[10..12].copy_from_slice(&sum.to_be_bytes());
            if sum == 0 {
                zero_before += 1;
            }
            let mut p = Ipv4Packet::new_unchecked(&mut buf[..len]);
            p.decrement_ttl();
            assert!(p.verify_checksum());
            let after = recomputed(&buf[..len]);
            assert_eq!(read_u16(&buf, 10), after);
            if after == 0 {
                zero_after += 1;
            }
        }
        assert!(
            zero_before > 500 && zero_after > 500,
            "{zero_before} {zero_after}"
        );
    }
}
