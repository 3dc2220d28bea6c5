//! ICMPv4 (RFC 792) and ICMPv6 (RFC 4443) views, and the error messages a router sends.
//!
//! [`build_icmpv4_error`] and [`build_icmpv6_error`] write a complete IP packet (header and
//! ICMP message quoting the offending packet) into a caller-provided buffer, and refuse with a
//! [`Suppress`] reason where RFC 1812 §4.3.2.7 / RFC 4443 §2.4(e) forbid an answer, so the
//! caller can count why. Rate limiting is the caller's job.

use core::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use super::ip::protocol;
use super::{Error, Ipv4Packet, Ipv6Packet, checksum, read_u16, read_u32, write_u16, write_u32};
use super::{ipv4, ipv6};

/// ICMPv4 message types used by linen.
pub mod icmpv4_type {
    /// Echo reply.
    pub const ECHO_REPLY: u8 = 0;
    /// Destination unreachable (an error).
    pub const DEST_UNREACHABLE: u8 = 3;
    /// Source quench (an error, deprecated).
    pub const SOURCE_QUENCH: u8 = 4;
    /// Redirect (an error).
    pub const REDIRECT: u8 = 5;
    /// Echo request.
    pub const ECHO_REQUEST: u8 = 8;
    /// Time exceeded (an error).
    pub const TIME_EXCEEDED: u8 = 11;
    /// Parameter problem (an error).
    pub const PARAMETER_PROBLEM: u8 = 12;
}

/// ICMPv6 message types used by linen. Types below 128 are errors, 128 and above informational.
pub mod icmpv6_type {
    /// Destination unreachable.
    pub const DEST_UNREACHABLE: u8 = 1;
    /// Packet too big.
    pub const PACKET_TOO_BIG: u8 = 2;
    /// Time exceeded.
    pub const TIME_EXCEEDED: u8 = 3;
    /// Parameter problem.
    pub const PARAMETER_PROBLEM: u8 = 4;
    /// Echo request.
    pub const ECHO_REQUEST: u8 = 128;
    /// Echo reply.
    pub const ECHO_REPLY: u8 = 129;
}

/// Byte ranges of the ICMP header, the same for ICMPv4 and ICMPv6.
mod field {
    pub const TYPE: usize = 0;
    pub const CODE: usize = 1;
    pub const CHECKSUM: usize = 2;
    /// The second 32-bit word: unused, echo id/seq, or the MTU.
    pub const REST: usize = 4;
    /// ICMPv4 fragmentation needed: next-hop MTU in the low 16 bits of the second word.
    pub const MTU_V4: usize = 6;
    pub const DATA: usize = 8;
}

/// Length of the ICMP header (type, code, checksum, one 32-bit word).
pub const HEADER_LEN: usize = 8;

/// RFC 1812 §4.3.2.3: an ICMPv4 error, IP header included, is at most 576 bytes.
pub const MAX_ICMPV4_ERROR_LEN: usize = 576;
/// RFC 4443 §2.4(c): an ICMPv6 error, IPv6 header included, is at most the minimum MTU.
pub const MAX_ICMPV6_ERROR_LEN: usize = 1280;

/// TTL / hop limit of the errors linen originates.
const ERROR_HOP_LIMIT: u8 = 64;
/// DSCP/ECN of ICMPv4 errors: precedence 6, internetwork control (RFC 1812 §4.3.2.5).
const ERROR_TOS: u8 = 0xc0;

/// The accessors and setters ICMPv4 and ICMPv6 views share: the layout is the same, only the
/// checksum coverage and the meaning of the second word differ.
macro_rules! icmp_view_common {
    ($view:ident) => {
        impl<T: AsRef<[u8]>> $view<T> {
            /// Checks that the buffer (the whole message: the IP payload) holds the 8-byte
            /// header ([`Error::Truncated`]).
            #[inline]
            pub fn check_len(&self) -> Result<(), Error> {
                if self.buffer.as_ref().len() < HEADER_LEN {
                    return Err(Error::Truncated);
                }
                Ok(())
            }

            /// The message type.
            #[inline]
            pub fn msg_type(&self) -> u8 {
                self.buffer.as_ref()[field::TYPE]
            }

            /// The message code.
            #[inline]
            pub fn code(&self) -> u8 {
                self.buffer.as_ref()[field::CODE]
            }

            /// The checksum field.
            #[inline]
            pub fn checksum(&self) -> u16 {
                read_u16(self.buffer.as_ref(), field::CHECKSUM)
            }

            /// The second 32-bit word (unused, echo identifier and sequence, or an MTU).
            #[inline]
            pub fn rest_of_header(&self) -> u32 {
                read_u32(self.buffer.as_ref(), field::REST)
            }

            /// The data after the header: for an error, the quoted original packet.
            #[inline]
            pub fn data(&self) -> &[u8] {
                self.buffer.as_ref().get(field::DATA..).unwrap_or(&[])
            }
        }

        impl<T: AsRef<[u8]> + AsMut<[u8]>> $view<T> {
            /// Sets the message type.
            #[inline]
            pub fn set_msg_type(&mut self, msg_type: u8) {
                self.buffer.as_mut()[field::TYPE] = msg_type;
            }

            /// Sets the message code.
            #[inline]
            pub fn set_code(&mut self, code: u8) {
                self.buffer.as_mut()[field::CODE] = code;
            }

            /// Sets the checksum field.
            #[inline]
            pub fn set_checksum(&mut self, checksum: u16) {
                write_u16(self.buffer.as_mut(), field::CHECKSUM, checksum);
            }

            /// Sets the second 32-bit word.
            #[inline]
            pub fn set_rest_of_header(&mut self, rest: u32) {
                write_u32(self.buffer.as_mut(), field::REST, rest);
            }

            /// The data after the header, mutable.
            #[inline]
            pub fn data_mut(&mut self) -> &mut [u8] {
                self.buffer
                    .as_mut()
                    .get_mut(field::DATA..)
                    .unwrap_or(&mut [])
            }
        }
    };
}

view! {
    /// A view of an ICMPv4 message (the payload of an IPv4 packet with protocol 1).
    Icmpv4Packet
}

icmp_view_common!(Icmpv4Packet);

impl<T: AsRef<[u8]>> Icmpv4Packet<T> {
    /// The next-hop MTU of a Fragmentation Needed message (type 3 code 4, RFC 1191), else
    /// `None`.
    #[inline]
    pub fn mtu(&self) -> Option<u16> {
        (self.msg_type() == icmpv4_type::DEST_UNREACHABLE && self.code() == 4)
            .then(|| read_u16(self.buffer.as_ref(), field::MTU_V4))
    }

    /// Whether the checksum over the whole message verifies.
    #[inline]
    pub fn verify_checksum(&self) -> bool {
        checksum::data(self.buffer.as_ref()) == 0xffff
    }

    /// Whether this is an error message (types 3, 4, 5, 11, 12), which is never answered.
    #[inline]
    pub fn is_error(&self) -> bool {
        is_icmpv4_error(self.msg_type())
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Icmpv4Packet<T> {
    /// Computes the checksum over the whole message.
    #[inline]
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let sum = checksum::data(self.buffer.as_ref());
        self.set_checksum(!sum);
    }
}

view! {
    /// A view of an ICMPv6 message (the upper-layer payload with next header 58).
    Icmpv6Packet
}

icmp_view_common!(Icmpv6Packet);

impl<T: AsRef<[u8]>> Icmpv6Packet<T> {
    /// The MTU of a Packet Too Big message (type 2), else `None`.
    #[inline]
    pub fn mtu(&self) -> Option<u32> {
        (self.msg_type() == icmpv6_type::PACKET_TOO_BIG).then(|| self.rest_of_header())
    }

    /// Whether the checksum over the pseudo-header (`src`, `dst`, the message length, next
    /// header 58) and the whole message verifies.
    #[inline]
    pub fn verify_checksum(&self, src: &Ipv6Addr, dst: &Ipv6Addr) -> bool {
        self.sum(src, dst) == 0xffff
    }

    /// Whether this is an error message (type below 128), which is never answered.
    #[inline]
    pub fn is_error(&self) -> bool {
        self.msg_type() < 128
    }

    fn sum(&self, src: &Ipv6Addr, dst: &Ipv6Addr) -> u16 {
        let data = self.buffer.as_ref();
        // An ICMPv6 message inside an IPv6 packet is below 2^16 bytes; saturate regardless.
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        checksum::combine(&[
            checksum::pseudo_header_v6(src, dst, protocol::ICMPV6, len),
            checksum::data(data),
        ])
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Icmpv6Packet<T> {
    /// Computes the checksum over the pseudo-header and the whole message.
    #[inline]
    pub fn fill_checksum(&mut self, src: &Ipv6Addr, dst: &Ipv6Addr) {
        self.set_checksum(0);
        let sum = self.sum(src, dst);
        self.set_checksum(!sum);
    }
}

/// The ICMPv4 errors linen originates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Icmpv4Error {
    /// Destination unreachable, net unreachable (type 3 code 0): no route.
    NetUnreachable,
    /// Destination unreachable, fragmentation needed and DF set (type 3 code 4), carrying the
    /// next-hop MTU (RFC 1191).
    FragNeeded {
        /// The next-hop MTU in bytes.
        mtu: u16,
    },
    /// Time exceeded in transit (type 11 code 0): TTL ≤ 1.
    TimeExceeded,
}

/// The ICMPv6 errors linen originates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Icmpv6Error {
    /// Destination unreachable, no route to destination (type 1 code 0).
    NoRoute,
    /// Packet too big (type 2 code 0), carrying the MTU of the next hop.
    PacketTooBig {
        /// The next-hop MTU in bytes.
        mtu: u32,
    },
    /// Time exceeded, hop limit exceeded in transit (type 3 code 0).
    TimeExceeded,
}

/// Why no ICMP error was built. All but [`OutputTooSmall`](Self::OutputTooSmall) are the
/// normal outcome for such an original and should be counted, not logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Suppress {
    /// The original failed the IP header checks (or its IPv6 extension header chain runs past
    /// its end); it is dropped unanswered.
    Malformed(Error),
    /// The original is itself an ICMP error message (or an ICMP message too short to tell).
    IcmpError,
    /// The original is a fragment other than the first.
    NonFirstFragment,
    /// The original's source is unspecified, loopback, multicast, broadcast or (IPv4) class E:
    /// it does not name one host to answer.
    BadSource,
    /// The original's destination is multicast or broadcast (except for ICMPv6 Packet Too Big).
    BadDestination,
    /// The output buffer cannot hold even the headers (28 bytes for IPv4, 48 for IPv6).
    OutputTooSmall,
}

impl fmt::Display for Suppress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Suppress::Malformed(e) => write!(f, "no ICMP error for a malformed packet: {e}"),
            Suppress::IcmpError => f.write_str("no ICMP error in answer to an ICMP error"),
            Suppress::NonFirstFragment => f.write_str("no ICMP error for a non-first fragment"),
            Suppress::BadSource => f.write_str(
                "no ICMP error to an unspecified (0/8), loopback, multicast, broadcast or class E \
                 source",
            ),
            Suppress::BadDestination => {
                f.write_str("no ICMP error for a packet sent to multicast or broadcast")
            }
            Suppress::OutputTooSmall => {
                f.write_str("output buffer too small for an ICMP error; give it 576/1280 bytes")
            }
        }
    }
}

impl std::error::Error for Suppress {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Suppress::Malformed(e) => Some(e),
            _ => None,
        }
    }
}

/// ICMPv4 error types (RFC 1812 §4.3.2.7): destination unreachable, source quench, redirect,
/// time exceeded, parameter problem; and, as Linux assumes ("think about it"), any type past
/// the last one it knows (18, address mask reply; `NR_ICMP_TYPES`), which may be one. (Types
/// 42 and 43, RFC 8335's extended echo, are queries, unanswered here as Linux leaves them.)
#[inline]
fn is_icmpv4_error(msg_type: u8) -> bool {
    matches!(
        msg_type,
        icmpv4_type::DEST_UNREACHABLE
            | icmpv4_type::SOURCE_QUENCH
            | icmpv4_type::REDIRECT
            | icmpv4_type::TIME_EXCEEDED
            | icmpv4_type::PARAMETER_PROBLEM
    ) || msg_type > 18
}

/// Writes the ICMP header (checksum zero) and the quote into `message`, which is exactly
/// header + quote long; the quote is the prefix of `original` that fits.
#[inline]
fn write_icmp(message: &mut [u8], msg_type: u8, code: u8, rest: u32, original: &[u8]) {
    message[field::TYPE] = msg_type;
    message[field::CODE] = code;
    write_u16(message, field::CHECKSUM, 0);
    write_u32(message, field::REST, rest);
    let quote = &mut message[field::DATA..];
    let len = quote.len();
    quote.copy_from_slice(&original[..len]);
}

/// Builds an ICMPv4 error answering `original` into `out`: a whole IPv4 packet from `src` (the
/// TUN address) to the original's source. Returns its length.
///
/// The message quotes as much of the original packet as fits in 576 bytes (RFC 1812
/// §4.3.2.3), or in `out` if that is shorter. IPv4 header: IHL 5, DSCP/ECN 0xc0, id 0, DF
/// clear, TTL 64, protocol 1. Both checksums are filled.
///
/// Refused ([`Suppress`]) for a malformed original, an ICMP error (or an ICMP message without
/// a type byte), a non-first fragment, a source that is in 0/8 (unspecified), loopback,
/// multicast, broadcast or class E, a multicast or broadcast destination, or an `out` under 28 bytes.
pub fn build_icmpv4_error(
    original: &[u8],
    kind: Icmpv4Error,
    src: Ipv4Addr,
    out: &mut [u8],
) -> Result<usize, Suppress> {
    let orig = Ipv4Packet::new_checked(original).map_err(Suppress::Malformed)?;
    if orig.frag_offset() != 0 {
        return Err(Suppress::NonFirstFragment);
    }
    if orig.protocol() == protocol::ICMP {
        match orig.payload().first() {
            Some(&t) if !is_icmpv4_error(t) => {}
            _ => return Err(Suppress::IcmpError),
        }
    }
    let orig_src = orig.src_addr();
    // 0/8 is "this network" (RFC 1812 §4.2.2.11(b)): never a source to answer, 0.0.0.0 or not.
    if orig_src.octets()[0] == 0
        || orig_src.is_loopback()
        || orig_src.is_multicast()
        || orig_src.octets()[0] >= 240
    {
        // Class E 240/4 includes the limited broadcast 255.255.255.255.
        return Err(Suppress::BadSource);
    }
    let orig_dst = orig.dst_addr();
    if orig_dst.is_multicast() || orig_dst.is_broadcast() {
        return Err(Suppress::BadDestination);
    }

    let (msg_type, code, rest) = match kind {
        Icmpv4Error::NetUnreachable => (icmpv4_type::DEST_UNREACHABLE, 0, 0),
        Icmpv4Error::FragNeeded { mtu } => (icmpv4_type::DEST_UNREACHABLE, 4, u32::from(mtu)),
        Icmpv4Error::TimeExceeded => (icmpv4_type::TIME_EXCEEDED, 0, 0),
    };

    const HEADERS: usize = ipv4::HEADER_LEN + HEADER_LEN;
    let limit = out.len().min(MAX_ICMPV4_ERROR_LEN);
    if limit < HEADERS {
        return Err(Suppress::OutputTooSmall);
    }
    let quoted = orig.packet_len().min(limit - HEADERS);
    let total = HEADERS + quoted;
    let out = &mut out[..total];

    let (ip_header, message) = out.split_at_mut(ipv4::HEADER_LEN);
    write_icmp(message, msg_type, code, rest, orig.packet());
    let mut icmp = Icmpv4Packet::new_unchecked(message);
    icmp.fill_checksum();

    let mut ip = Ipv4Packet::new_unchecked(ip_header);
    ip.set_version(4);
    ip.set_header_len(ipv4::HEADER_LEN as u8);
    ip.set_dscp_ecn(ERROR_TOS);
    // `total` ≤ 576, so it fits.
    ip.set_total_len(total as u16);
    ip.set_ident(0);
    ip.set_frag(false, false, 0);
    ip.set_ttl(ERROR_HOP_LIMIT);
    ip.set_protocol(protocol::ICMP);
    ip.set_src_addr(src);
    ip.set_dst_addr(orig_src);
    ip.fill_checksum();
    Ok(total)
}

/// Builds an ICMPv6 error answering `original` into `out`: a whole IPv6 packet from `src` (the
/// TUN address) to the original's source. Returns its length.
///
/// The message quotes as much of the original packet as fits in 1280 bytes (RFC 4443
/// §2.4(c)), or in `out` if that is shorter. IPv6 header: traffic class and flow label 0, next
/// header 58, hop limit 64. The checksum covers the pseudo-header.
///
/// Refused ([`Suppress`]) for a malformed original, an ICMPv6 error (type < 128; informational
/// messages such as echo are answered), a non-first fragment, a source that is unspecified,
/// loopback or multicast, a multicast destination — except for Packet Too Big, which RFC 4443
/// §2.4(e.2) allows so path MTU discovery works for multicast —, or an `out` under 48 bytes.
///
/// To find an ICMPv6 message or a Fragment header behind other extension headers, the
/// Hop-by-Hop, Routing, Fragment, Destination Options and Authentication headers are walked,
/// as many as the packet holds; a chain that runs past the packet is [`Suppress::Malformed`].
pub fn build_icmpv6_error(
    original: &[u8],
    kind: Icmpv6Error,
    src: Ipv6Addr,
    out: &mut [u8],
) -> Result<usize, Suppress> {
    let orig = Ipv6Packet::new_checked(original).map_err(Suppress::Malformed)?;
    check_upper_layer_v6(orig.next_header(), orig.payload())?;
    let orig_src = orig.src_addr();
    if orig_src.is_unspecified() || orig_src.is_loopback() || orig_src.is_multicast() {
        return Err(Suppress::BadSource);
    }
    let too_big = matches!(kind, Icmpv6Error::PacketTooBig { .. });
    if orig.dst_addr().is_multicast() && !too_big {
        return Err(Suppress::BadDestination);
    }

    let (msg_type, rest) = match kind {
        Icmpv6Error::NoRoute => (icmpv6_type::DEST_UNREACHABLE, 0),
        Icmpv6Error::PacketTooBig { mtu } => (icmpv6_type::PACKET_TOO_BIG, mtu),
        Icmpv6Error::TimeExceeded => (icmpv6_type::TIME_EXCEEDED, 0),
    };

    const HEADERS: usize = ipv6::HEADER_LEN + HEADER_LEN;
    let limit = out.len().min(MAX_ICMPV6_ERROR_LEN);
    if limit < HEADERS {
        return Err(Suppress::OutputTooSmall);
    }
    let quoted = orig.packet_len().min(limit - HEADERS);
    let total = HEADERS + quoted;
    let out = &mut out[..total];

    let (ip_header, message) = out.split_at_mut(ipv6::HEADER_LEN);
    write_icmp(message, msg_type, 0, rest, orig.packet());
    let mut icmp = Icmpv6Packet::new_unchecked(message);
    icmp.fill_checksum(&src, &orig_src);

    let mut ip = Ipv6Packet::new_unchecked(ip_header);
    ip.set_version(6);
    ip.set_traffic_class(0);
    ip.set_flow_label(0);
    // `total` ≤ 1280, so the payload length fits.
    ip.set_payload_len((total - ipv6::HEADER_LEN) as u16);
    ip.set_next_header(protocol::ICMPV6);
    ip.set_hop_limit(ERROR_HOP_LIMIT);
    ip.set_src_addr(src);
    ip.set_dst_addr(orig_src);
    Ok(total)
}

/// Walks the extension header chain of an original IPv6 packet far enough to refuse a
/// non-first fragment or an ICMPv6 error message (RFC 4443 §2.4 e), through an
/// Authentication Header too, and as far as the packet goes, as Linux's `ipv6_skip_exthdr`
/// does: every header is at least 8 bytes, so the walk ends.
fn check_upper_layer_v6(mut next_header: u8, mut rest: &[u8]) -> Result<(), Suppress> {
    const TRUNCATED: Suppress = Suppress::Malformed(Error::Truncated);
    loop {
        let header_len = match next_header {
            protocol::AH => {
                // Next header, payload length in 4-octet units minus 2 (RFC 4302 §2.2).
                let units = *rest.get(1).ok_or(TRUNCATED)?;
                (usize::from(units) + 2) * 4
            }
            protocol::HOP_BY_HOP | protocol::IPV6_ROUTE | protocol::IPV6_OPTS => {
                // Next header, length in 8-octet units not counting the first 8.
                let units = *rest.get(1).ok_or(TRUNCATED)?;
                (usize::from(units) + 1) * 8
            }
            protocol::IPV6_FRAG => {
                // Next header, reserved, offset (13 bits) | res | M, identification.
                let offset = rest.get(2..4).ok_or(TRUNCATED)?;
                if u16::from_be_bytes([offset[0], offset[1]]) & 0xfff8 != 0 {
                    return Err(Suppress::NonFirstFragment);
                }
                8
            }
            protocol::ICMPV6 => {
                return match rest.first() {
                    Some(&t) if t >= 128 => Ok(()),
                    _ => Err(Suppress::IcmpError),
                };
            }
            _ => return Ok(()),
        };
        next_header = *rest.first().ok_or(TRUNCATED)?;
        rest = rest.get(header_len..).ok_or(TRUNCATED)?;
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::wire::ipv4::test::{ECHO_V4, TCP_SYN_V4, UDP_V4, naive_checksum};
    use crate::wire::ipv6::test::{ECHO_V6, UDP_V6, naive_v6_upper_checksum};

    const TUN_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 0);
    const TUN_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x100);

    /// Checks an ICMPv4 error byte by byte against the RFCs, independently of the views.
    fn assert_icmpv4_error(out: &[u8], original: &[u8], msg_type: u8, code: u8, word: [u8; 4]) {
        let len = out.len();
        assert_eq!(out[0], 0x45, "version 4, IHL 5");
        assert_eq!(out[1], 0xc0);
        assert_eq!(usize::from(u16::from_be_bytes([out[2], out[3]])), len);
        assert_eq!(&out[4..8], &[0, 0, 0, 0], "id 0, DF clear, offset 0");
        assert_eq!((out[8], out[9]), (64, 1), "TTL 64, protocol ICMP");
        assert_eq!(naive_checksum(&out[..20]), 0, "IPv4 header checksum");
        assert_eq!(&out[12..16], &TUN_V4.octets());
        assert_eq!(
            &out[16..20],
            &original[12..16],
            "back to the original source"
        );
        assert_eq!((out[20], out[21]), (msg_type, code));
        assert_eq!(naive_checksum(&out[20..]), 0, "ICMP checksum");
        assert_eq!(&out[24..28], &word);
        assert_eq!(&out[28..], &original[..len - 28], "quote");
    }

    /// Checks an ICMPv6 error byte by byte against the RFCs, independently of the views.
    fn assert_icmpv6_error(out: &[u8], original: &[u8], msg_type: u8, word: [u8; 4]) {
        let len = out.len();
        assert_eq!(&out[..4], &[0x60, 0, 0, 0]);
        assert_eq!(usize::from(u16::from_be_bytes([out[4], out[5]])), len - 40);
        assert_eq!(
            (out[6], out[7]),
            (58, 64),
            "next header ICMPv6, hop limit 64"
        );
        assert_eq!(&out[8..24], &TUN_V6.octets());
        assert_eq!(
            &out[24..40],
            &original[8..24],
            "back to the original source"
        );
        assert_eq!((out[40], out[41]), (msg_type, 0));
        assert_eq!(naive_v6_upper_checksum(out), 0, "ICMPv6 checksum");
        assert_eq!(&out[44..48], &word);
        assert_eq!(&out[48..], &original[..len - 48], "quote");
    }

    fn v4_error(original: &[u8], kind: Icmpv4Error) -> Result<Vec<u8>, Suppress> {
        let mut out = [0u8; MAX_ICMPV4_ERROR_LEN];
        let len = build_icmpv4_error(original, kind, TUN_V4, &mut out)?;
        Ok(out[..len].to_vec())
    }

    fn v6_error(original: &[u8], kind: Icmpv6Error) -> Result<Vec<u8>, Suppress> {
        let mut out = [0u8; MAX_ICMPV6_ERROR_LEN];
        let len = build_icmpv6_error(original, kind, TUN_V6, &mut out)?;
        Ok(out[..len].to_vec())
    }

    #[test]
    fn builds_each_icmpv4_error() {
        for original in [&ECHO_V4[..], &UDP_V4[..], &TCP_SYN_V4[..]] {
            let out = v4_error(original, Icmpv4Error::NetUnreachable).unwrap();
            assert_eq!(out.len(), 28 + original.len());
            assert_icmpv4_error(&out, original, 3, 0, [0; 4]);
            let out = v4_error(original, Icmpv4Error::FragNeeded { mtu: 1472 }).unwrap();
            assert_icmpv4_error(&out, original, 3, 4, [0, 0, 0x05, 0xc0]);
            let out = v4_error(original, Icmpv4Error::TimeExceeded).unwrap();
            assert_icmpv4_error(&out, original, 11, 0, [0; 4]);
        }
    }

    #[test]
    fn icmpv4_errors_parse_back() {
        let kinds = [
            (Icmpv4Error::NetUnreachable, 3, 0, None),
            (Icmpv4Error::FragNeeded { mtu: 1422 }, 3, 4, Some(1422)),
            (Icmpv4Error::TimeExceeded, 11, 0, None),
        ];
        for (kind, msg_type, code, mtu) in kinds {
            let out = v4_error(&UDP_V4, kind).unwrap();
            let ip = Ipv4Packet::new_checked(&out[..]).unwrap();
            assert!(ip.verify_checksum());
            assert_eq!(ip.protocol(), protocol::ICMP);
            assert_eq!(ip.dst_addr(), Ipv4Addr::new(198, 19, 1, 2));
            let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
            assert!(icmp.verify_checksum());
            assert!(icmp.is_error());
            assert_eq!(
                (icmp.msg_type(), icmp.code(), icmp.mtu()),
                (msg_type, code, mtu)
            );
            assert_eq!(icmp.data(), &UDP_V4[..]);
            let quoted = Ipv4Packet::new_checked(icmp.data()).unwrap();
            assert_eq!(quoted.dst_addr(), Ipv4Addr::new(198, 19, 2, 2));
        }
    }

    #[test]
    fn builds_each_icmpv6_error() {
        for original in [&ECHO_V6[..], &UDP_V6[..]] {
            let out = v6_error(original, Icmpv6Error::NoRoute).unwrap();
            assert_eq!(out.len(), 48 + original.len());
            assert_icmpv6_error(&out, original, 1, [0; 4]);
            let out = v6_error(original, Icmpv6Error::PacketTooBig { mtu: 1452 }).unwrap();
            assert_icmpv6_error(&out, original, 2, [0, 0, 0x05, 0xac]);
            let out = v6_error(original, Icmpv6Error::TimeExceeded).unwrap();
            assert_icmpv6_error(&out, original, 3, [0; 4]);
        }
    }

    #[test]
    fn icmpv6_errors_parse_back() {
        let kinds = [
            (Icmpv6Error::NoRoute, 1, None),
            (Icmpv6Error::PacketTooBig { mtu: 1280 }, 2, Some(1280)),
            (Icmpv6Error::TimeExceeded, 3, None),
        ];
        for (kind, msg_type, mtu) in kinds {
            let out = v6_error(&ECHO_V6, kind).unwrap();
            let ip = Ipv6Packet::new_checked(&out[..]).unwrap();
            assert_eq!(ip.next_header(), protocol::ICMPV6);
            let icmp = Icmpv6Packet::new_checked(ip.payload()).unwrap();
            assert!(icmp.verify_checksum(&ip.src_addr(), &ip.dst_addr()));
            let elsewhere: Ipv6Addr = "fd00::99".parse().unwrap();
            assert!(
                !icmp.verify_checksum(&ip.src_addr(), &elsewhere),
                "pseudo-header counts"
            );
            assert!(icmp.is_error());
            assert_eq!(
                (icmp.msg_type(), icmp.code(), icmp.mtu()),
                (msg_type, 0, mtu)
            );
            assert_eq!(icmp.data(), &ECHO_V6[..]);
        }
    }

    #[test]
    fn views_parse_golden_echoes() {
        let ip = Ipv4Packet::new_checked(&ECHO_V4[..]).unwrap();
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert_eq!(
            (icmp.msg_type(), icmp.code(), icmp.checksum()),
            (8, 0, 0x78be)
        );
        assert_eq!(icmp.rest_of_header(), 0x0d3f_0001);
        assert!(icmp.verify_checksum() && !icmp.is_error());
        assert_eq!(icmp.mtu(), None);
        assert_eq!(icmp.data(), &ECHO_V4[28..]);

        let ip = Ipv6Packet::new_checked(&ECHO_V6[..]).unwrap();
        let icmp = Icmpv6Packet::new_checked(ip.payload()).unwrap();
        assert_eq!(
            (icmp.msg_type(), icmp.code(), icmp.checksum()),
            (128, 0, 0x2249)
        );
        assert_eq!(icmp.rest_of_header(), 0x2a1b_0003);
        assert!(icmp.verify_checksum(&ip.src_addr(), &ip.dst_addr()) && !icmp.is_error());
        assert_eq!(icmp.mtu(), None);
        assert_eq!(icmp.into_inner(), &ECHO_V6[40..]);

        for len in 0..8 {
            assert_eq!(
                Icmpv4Packet::new_checked(&ECHO_V4[20..20 + len]),
                Err(Error::Truncated)
            );
            assert_eq!(
                Icmpv6Packet::new_checked(&ECHO_V6[40..40 + len]),
                Err(Error::Truncated)
            );
        }
        assert!(
            Icmpv4Packet::new_checked(&ECHO_V4[20..28])
                .unwrap()
                .data()
                .is_empty()
        );
    }

    #[test]
    fn view_setters_round_trip() {
        let mut buf = [0u8; 12];
        let mut icmp = Icmpv4Packet::new_unchecked(&mut buf[..]);
        icmp.set_msg_type(3);
        icmp.set_code(4);
        icmp.set_rest_of_header(9000);
        icmp.data_mut().copy_from_slice(&[1, 2, 3, 4]);
        icmp.fill_checksum();
        assert_eq!(naive_checksum(&buf), 0);
        let icmp = Icmpv4Packet::new_checked(&buf[..]).unwrap();
        assert_eq!(icmp.mtu(), Some(9000));
        let (src, dst) = (TUN_V6, "fd00::9".parse().unwrap());
        let mut icmp = Icmpv6Packet::new_unchecked(buf);
        icmp.set_msg_type(2);
        icmp.set_code(0);
        icmp.set_checksum(0xffff);
        icmp.fill_checksum(&src, &dst);
        assert!(icmp.verify_checksum(&src, &dst));
        assert_eq!(icmp.mtu(), Some(9000));
    }

    /// A valid IPv4 packet of `len` bytes, UDP from `src` to `dst`.
    fn v4_packet(len: usize, src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        buf[..UDP_V4.len().min(len)].copy_from_slice(&UDP_V4[..UDP_V4.len().min(len)]);
        for (i, b) in buf.iter_mut().enumerate().skip(UDP_V4.len()) {
            *b = i as u8;
        }
        let mut ip = Ipv4Packet::new_unchecked(&mut buf[..]);
        ip.set_total_len(len as u16);
        ip.set_src_addr(src);
        ip.set_dst_addr(dst);
        ip.fill_checksum();
        buf
    }

    /// A valid IPv6 packet: `payload` after the fixed header with first next header `nh`.
    fn v6_packet(nh: u8, payload: &[u8], src: &str, dst: &str) -> Vec<u8> {
        let mut buf = vec![0u8; 40 + payload.len()];
        buf[..40].copy_from_slice(&UDP_V6[..40]);
        buf[40..].copy_from_slice(payload);
        let mut ip = Ipv6Packet::new_unchecked(&mut buf[..]);
        ip.set_payload_len(payload.len() as u16);
        ip.set_next_header(nh);
        ip.set_src_addr(src.parse().unwrap());
        ip.set_dst_addr(dst.parse().unwrap());
        buf
    }

    #[test]
    fn quote_is_limited_to_576_and_1280_bytes() {
        let big = v4_packet(
            1500,
            Ipv4Addr::new(198, 19, 1, 2),
            Ipv4Addr::new(198, 19, 2, 2),
        );
        let mut out = [0u8; 2048];
        let len = build_icmpv4_error(&big, Icmpv4Error::TimeExceeded, TUN_V4, &mut out).unwrap();
        assert_eq!(len, 576);
        assert_icmpv4_error(&out[..len], &big, 11, 0, [0; 4]);

        let big = v6_packet(17, &[0x5a; 1460], "fd00::1", "fd00::2");
        assert_eq!(big.len(), 1500);
        let len = build_icmpv6_error(
            &big,
            Icmpv6Error::PacketTooBig { mtu: 1280 },
            TUN_V6,
            &mut out,
        )
        .unwrap();
        assert_eq!(len, 1280);
        assert_icmpv6_error(&out[..len], &big, 2, [0, 0, 5, 0]);
    }

    #[test]
    fn small_output_quotes_less() {
        let mut out = [0u8; 100];
        let len =
            build_icmpv4_error(&ECHO_V4, Icmpv4Error::NetUnreachable, TUN_V4, &mut out).unwrap();
        assert_eq!(len, 100);
        assert_icmpv4_error(&out, &ECHO_V4, 3, 0, [0; 4]);
        let len = build_icmpv6_error(&ECHO_V6, Icmpv6Error::NoRoute, TUN_V6, &mut out).unwrap();
        assert_eq!(len, 100);
        assert_icmpv6_error(&out, &ECHO_V6, 1, [0; 4]);
        // Exactly the headers: an empty quote.
        let len = build_icmpv4_error(&ECHO_V4, Icmpv4Error::TimeExceeded, TUN_V4, &mut out[..28])
            .unwrap();
        assert_eq!(len, 28);
        let len = build_icmpv6_error(&ECHO_V6, Icmpv6Error::TimeExceeded, TUN_V6, &mut out[..48])
            .unwrap();
        assert_eq!(len, 48);
        assert_eq!(
            build_icmpv4_error(&ECHO_V4, Icmpv4Error::TimeExceeded, TUN_V4, &mut out[..27]),
            Err(Suppress::OutputTooSmall)
        );
        assert_eq!(
            build_icmpv6_error(&ECHO_V6, Icmpv6Error::TimeExceeded, TUN_V6, &mut out[..47]),
            Err(Suppress::OutputTooSmall)
        );
    }

    #[test]
    fn trailing_buffer_bytes_are_not_quoted() {
        let mut buf = UDP_V4.to_vec();
        buf.extend_from_slice(&[0xee; 64]);
        let out = v4_error(&buf, Icmpv4Error::NetUnreachable).unwrap();
        assert_eq!(out.len(), 28 + UDP_V4.len());
        assert_icmpv4_error(&out, &UDP_V4, 3, 0, [0; 4]);
    }

    #[test]
    fn icmpv4_suppression() {
        use Suppress::*;
        let kind = Icmpv4Error::NetUnreachable;
        // Malformed originals.
        assert_eq!(
            v4_error(&UDP_V4[..19], kind),
            Err(Malformed(Error::Truncated))
        );
        assert_eq!(
            v4_error(&UDP_V4[..39], kind),
            Err(Malformed(Error::BadTotalLen))
        );
        assert_eq!(v4_error(&ECHO_V6, kind), Err(Malformed(Error::BadVersion)));
        // ICMP errors are never answered; informational messages are.
        for (msg_type, answered) in [
            (0, true),
            (3, false),
            (4, false),
            (5, false),
            (8, true),
            (11, false),
            (12, false),
            (13, true),
            (18, true),
            // Past the last defined type: maybe an error, as Linux assumes.
            (19, false),
            (42, false),
            (255, false),
        ] {
            let mut pkt = ECHO_V4;
            pkt[20] = msg_type;
            assert_eq!(
                v4_error(&pkt, kind).is_ok(),
                answered,
                "ICMP type {msg_type}"
            );
        }
        // An ICMP message without even a type byte cannot be told apart: not answered.
        let mut empty_icmp = v4_packet(20, Ipv4Addr::new(198, 19, 1, 2), Ipv4Addr::new(1, 1, 1, 1));
        empty_icmp[9] = protocol::ICMP;
        let mut ip = Ipv4Packet::new_unchecked(&mut empty_icmp[..]);
        ip.fill_checksum();
        assert_eq!(v4_error(&empty_icmp, kind), Err(IcmpError));
        // Fragments: only the first is answered.
        let mut frag = UDP_V4;
        Ipv4Packet::new_unchecked(&mut frag[..]).set_frag(false, true, 0);
        assert!(v4_error(&frag, kind).is_ok());
        for offset in [8, 1480, 0xfff8] {
            Ipv4Packet::new_unchecked(&mut frag[..]).set_frag(false, false, offset);
            assert_eq!(
                v4_error(&frag, kind),
                Err(NonFirstFragment),
                "offset {offset}"
            );
        }
        // Sources that name no single host.
        let good = Ipv4Addr::new(198, 19, 2, 2);
        let sources = [
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
        ];
        for src in sources.into_iter().chain(["255.255.255.255"]) {
            let pkt = v4_packet(40, src.parse().unwrap(), good);
            assert_eq!(v4_error(&pkt, kind), Err(BadSource), "source {src}");
        }
        // Destinations that are not one host; FragNeeded included.
        for dst in ["224.0.0.5", "239.1.2.3", "255.255.255.255"] {
            let pkt = v4_packet(40, Ipv4Addr::new(198, 19, 1, 2), dst.parse().unwrap());
            for kind in [
                Icmpv4Error::NetUnreachable,
                Icmpv4Error::FragNeeded { mtu: 1400 },
            ] {
                assert_eq!(
                    v4_error(&pkt, kind),
                    Err(BadDestination),
                    "destination {dst}"
                );
            }
        }
        // Neighbours of the refused ranges are answered.
        for (src, dst) in [
            ("1.0.0.1", "223.255.255.255"),
            ("126.255.255.255", "240.0.0.1"),
            ("128.0.0.1", "198.19.255.255"),
            ("223.255.255.255", "198.19.2.2"),
        ] {
            let pkt = v4_packet(40, src.parse().unwrap(), dst.parse().unwrap());
            assert!(v4_error(&pkt, kind).is_ok(), "{src} -> {dst}");
        }
    }

    /// An 8-byte IPv6 Fragment header followed by `next`.
    fn fragment_header(next: u8, offset: u16, more: bool) -> [u8; 8] {
        let word = offset | u16::from(more);
        let [hi, lo] = word.to_be_bytes();
        [next, 0, hi, lo, 0xde, 0xad, 0xbe, 0xef]
    }

    #[test]
    fn icmpv6_suppression() {
        use Suppress::*;
        let kind = Icmpv6Error::NoRoute;
        let (a, b) = ("fd00::1", "fd00::2");
        // Malformed originals.
        assert_eq!(
            v6_error(&ECHO_V6[..39], kind),
            Err(Malformed(Error::Truncated))
        );
        assert_eq!(
            v6_error(&ECHO_V6[..63], kind),
            Err(Malformed(Error::BadPayloadLen))
        );
        assert_eq!(v6_error(&ECHO_V4, kind), Err(Malformed(Error::BadVersion)));
        // ICMPv6 errors (< 128) are never answered; informational messages are.
        for (msg_type, answered) in [
            (1, false),
            (2, false),
            (3, false),
            (4, false),
            (127, false),
            (128, true),
            (129, true),
        ] {
            let mut pkt = ECHO_V6;
            pkt[40] = msg_type;
            assert_eq!(
                v6_error(&pkt, kind).is_ok(),
                answered,
                "ICMPv6 type {msg_type}"
            );
        }
        assert_eq!(v6_error(&v6_packet(58, &[], a, b), kind), Err(IcmpError));
        // Fragments: the first is answered, later ones not, also behind a Hop-by-Hop header.
        let mut first = fragment_header(17, 0, true).to_vec();
        first.extend_from_slice(&UDP_V6[40..]);
        assert!(v6_error(&v6_packet(44, &first, a, b), kind).is_ok());
        let later = fragment_header(17, 1232, false);
        assert_eq!(
            v6_error(&v6_packet(44, &later, a, b), kind),
            Err(NonFirstFragment)
        );
        let mut hop_by_hop_then_later = vec![44, 0, 1, 4, 0, 0, 0, 0];
        hop_by_hop_then_later.extend_from_slice(&later);
        let pkt = v6_packet(0, &hop_by_hop_then_later, a, b);
        assert_eq!(v6_error(&pkt, kind), Err(NonFirstFragment));
        // An ICMPv6 error behind Destination Options (2 units = 24 bytes) is found.
        let mut opts_then_error = vec![58, 2];
        opts_then_error.extend_from_slice(&[0; 22]);
        opts_then_error.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
        let pkt = v6_packet(60, &opts_then_error, a, b);
        assert_eq!(v6_error(&pkt, kind), Err(IcmpError));
        // A chain that runs past the packet.
        for chain in [&[58u8][..], &[58, 2, 0, 0, 0, 0, 0, 0], &[]] {
            let pkt = v6_packet(43, chain, a, b);
            assert_eq!(
                v6_error(&pkt, kind),
                Err(Malformed(Error::Truncated)),
                "{chain:?}"
            );
        }
        assert_eq!(
            v6_error(&v6_packet(44, &[17, 0, 0], a, b), kind),
            Err(Malformed(Error::Truncated))
        );
        // A long chain is walked to its end; one ending in a protocol we don't know is
        // answered.
        let mut long: Vec<u8> = (0..9).flat_map(|_| [60u8, 0, 1, 4, 0, 0, 0, 0]).collect();
        long[8 * 8] = 59;
        assert!(v6_error(&v6_packet(60, &long, a, b), kind).is_ok());
        let mut long_to_fragment = long.clone();
        long_to_fragment[8 * 8] = 44;
        long_to_fragment.extend_from_slice(&[17, 0, 0x04, 0xd0, 0, 0, 0, 1]);
        assert_eq!(
            v6_error(&v6_packet(60, &long_to_fragment, a, b), kind),
            Err(NonFirstFragment)
        );
        assert!(v6_error(&v6_packet(59, &[], a, b), kind).is_ok());
        // Through an Authentication Header (12 bytes: length 1) to an ICMPv6 error, and to
        // a non-first fragment.
        let ah = |next: u8| [next, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1];
        let behind_ah =
            |next: u8, upper: &[u8]| -> Vec<u8> { ah(next).iter().chain(upper).copied().collect() };
        assert_eq!(
            v6_error(
                &v6_packet(51, &behind_ah(58, &[1, 0, 0, 0, 0, 0, 0, 0]), a, b),
                kind
            ),
            Err(IcmpError)
        );
        assert_eq!(
            v6_error(
                &v6_packet(51, &behind_ah(44, &[17, 0, 0x04, 0xd0, 0, 0, 0, 1]), a, b),
                kind
            ),
            Err(NonFirstFragment)
        );
        assert!(
            v6_error(
                &v6_packet(51, &behind_ah(58, &[128, 0, 0, 0, 0, 0, 0, 0]), a, b),
                kind
            )
            .is_ok()
        );
        // Sources that name no single host.
        for src in ["::", "::1", "ff02::1", "ff05::1:3"] {
            let pkt = v6_packet(17, &UDP_V6[40..], src, b);
            assert_eq!(v6_error(&pkt, kind), Err(BadSource), "source {src}");
        }
        // Multicast destinations: only Packet Too Big is sent.
        let pkt = v6_packet(17, &UDP_V6[40..], a, "ff02::1");
        assert_eq!(v6_error(&pkt, Icmpv6Error::NoRoute), Err(BadDestination));
        assert_eq!(
            v6_error(&pkt, Icmpv6Error::TimeExceeded),
            Err(BadDestination)
        );
        let out = v6_error(&pkt, Icmpv6Error::PacketTooBig { mtu: 1400 }).unwrap();
        assert_icmpv6_error(&out, &pkt, 2, 1400u32.to_be_bytes());
    }

    /// A cheap in-tree fuzz: random headers with plausible lengths, every builder, every
    /// output size. Whatever is built parses back; nothing panics.
    #[test]
    fn random_originals_build_or_are_refused() {
        use crate::wire::ipv4::test::XorShift;
        let mut rng = XorShift(0x1234_5678);
        let mut original = [0u8; 1600];
        let mut out = [0u8; 1400];
        let (mut built, mut refused) = (0, 0);
        for i in 0..30_000 {
            let len = (rng.next_u32() % 1600) as usize;
            rng.fill(&mut original[..len]);
            let buf = &mut original[..len];
            // Half the time make the lengths consistent so the checks pass.
            if i % 2 == 0 && len >= 40 {
                if i % 4 == 0 {
                    buf[0] = 0x45;
                    buf[2..4].copy_from_slice(&(len as u16).to_be_bytes());
                } else {
                    buf[0] = 0x60;
                    buf[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
                }
            }
            let out_len = (rng.next_u32() % 1400) as usize;
            let out = &mut out[..out_len];
            let v4 = build_icmpv4_error(buf, Icmpv4Error::TimeExceeded, TUN_V4, out);
            if let Ok(n) = v4 {
                let ip = Ipv4Packet::new_checked(&out[..n]).unwrap();
                assert!(ip.verify_checksum());
                assert!(
                    Icmpv4Packet::new_checked(ip.payload())
                        .unwrap()
                        .verify_checksum()
                );
            }
            let v6 = build_icmpv6_error(buf, Icmpv6Error::NoRoute, TUN_V6, out);
            if let Ok(n) = v6 {
                let ip = Ipv6Packet::new_checked(&out[..n]).unwrap();
                let icmp = Icmpv6Packet::new_checked(ip.payload()).unwrap();
                assert!(icmp.verify_checksum(&ip.src_addr(), &ip.dst_addr()));
            }
            for result in [v4, v6] {
                match result {
                    Ok(_) => built += 1,
                    Err(_) => refused += 1,
                }
            }
        }
        assert!(
            built > 5_000 && refused > 5_000,
            "{built} built, {refused} refused"
        );
    }

    #[test]
    fn suppress_displays_and_chains_its_source() {
        use std::error::Error as _;
        let e = Suppress::Malformed(Error::BadTotalLen);
        assert!(e.to_string().contains(&Error::BadTotalLen.to_string()));
        assert!(e.source().is_some());
        assert!(Suppress::IcmpError.source().is_none());
        for s in [
            Suppress::IcmpError,
            Suppress::NonFirstFragment,
            Suppress::BadSource,
            Suppress::BadDestination,
            Suppress::OutputTooSmall,
        ] {
            assert!(s.to_string().starts_with("no ICMP") || s.to_string().starts_with("output"));
        }
    }
}
