//! Zero-copy views of IP packet headers, checksums and ICMP error construction.
//!
//! This module owns the byte layout of everything linen reads or writes on the data path: IPv4
//! and IPv6 headers ([`Ipv4Packet`], [`Ipv6Packet`], dispatched by [`IpPacket`]), ICMPv4 and
//! ICMPv6 messages ([`Icmpv4Packet`], [`Icmpv6Packet`], [`build_icmpv4_error`],
//! [`build_icmpv6_error`]), the Internet checksum ([`checksum`]) and the transport ports used
//! to pin a flow to a worker ([`flow_hash`]). It depends on `core`/`std` only and must not
//! import any other linen module.
//!
//! # The panic contract
//!
//! Views follow smoltcp's pattern. A view wraps any `T: AsRef<[u8]>` (getters) or
//! `T: AsMut<[u8]>` (setters) without copying:
//!
//! * `new_unchecked(buffer)` wraps the buffer as it is. Accessors on such a view **may panic**
//!   if the buffer is shorter than the header; use it only on buffers already checked.
//! * `check_len()` validates every length the accessors rely on and returns [`Error`].
//! * `new_checked(buffer)` = `new_unchecked` + `check_len`. **After it succeeds no accessor
//!   panics, whatever the bytes are**, and setters keep that true (they cannot change the buffer
//!   length; variable-length accessors such as `payload()` clamp to the buffer).
//!
//! Builders ([`build_icmpv4_error`], [`build_icmpv6_error`]) write into a caller-provided buffer
//! and never allocate; they return the number of bytes written or why nothing was built.
//!
//! Nothing here allocates, locks or logs: it is all on the hot path.

/// Declares a view struct over `T: AsRef<[u8]>` with the constructors every view shares
/// (`new_unchecked`, `new_checked`, `into_inner`); the view itself supplies `check_len`.
macro_rules! view {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub struct $name<T: AsRef<[u8]>> {
            buffer: T,
        }

        impl<T: AsRef<[u8]>> $name<T> {
            /// Wraps a buffer without checking it; accessors may panic on a short buffer.
            #[inline]
            pub const fn new_unchecked(buffer: T) -> Self {
                $name { buffer }
            }

            /// Wraps a buffer after [`check_len`](Self::check_len); no accessor panics
            /// afterwards, whatever the bytes.
            #[inline]
            pub fn new_checked(buffer: T) -> Result<Self, $crate::wire::Error> {
                let packet = Self::new_unchecked(buffer);
                packet.check_len()?;
                Ok(packet)
            }

            /// Unwraps the buffer.
            #[inline]
            pub fn into_inner(self) -> T {
                self.buffer
            }
        }
    };
}

pub mod checksum;
mod icmp;
mod ip;
mod ipv4;
mod ipv6;
mod transport;

use core::fmt;

pub use icmp::{
    HEADER_LEN as ICMP_HEADER_LEN, Icmpv4Error, Icmpv4Packet, Icmpv6Error, Icmpv6Packet,
    MAX_ICMPV4_ERROR_LEN, MAX_ICMPV6_ERROR_LEN, Suppress, build_icmpv4_error, build_icmpv6_error,
    icmpv4_type, icmpv6_type,
};
pub use ip::{IpPacket, protocol};
pub use ipv4::{HEADER_LEN as IPV4_HEADER_LEN, Ipv4Packet};
pub use ipv6::{HEADER_LEN as IPV6_HEADER_LEN, Ipv6Packet};
pub use transport::{FlowKey, Transport, flow_hash, transport};

/// Why a buffer is not a valid packet (or header) of the kind asked for.
///
/// Tiny and `Copy` so the data path can count drops by reason without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Error {
    /// The buffer is shorter than the fixed header, or than the length the header declares.
    Truncated,
    /// The version nibble is not the one expected (4 or 6), or neither for [`IpPacket`].
    BadVersion,
    /// The IPv4 header length (IHL) is below 5 words or beyond the buffer.
    BadHeaderLen,
    /// The IPv4 total length is shorter than the header, or longer than the buffer.
    BadTotalLen,
    /// The IPv6 payload length reaches beyond the buffer.
    BadPayloadLen,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Error::Truncated => "packet truncated: buffer shorter than the header",
            Error::BadVersion => "IP version nibble is not the expected one",
            Error::BadHeaderLen => "IPv4 header length below 20 bytes or beyond the buffer",
            Error::BadTotalLen => "IPv4 total length below the header length or beyond the buffer",
            Error::BadPayloadLen => "IPv6 payload length reaches beyond the buffer",
        })
    }
}

impl std::error::Error for Error {}

/// Reads a big-endian `u16` at `at`; the caller guarantees `at + 2 <= data.len()`.
#[inline]
fn read_u16(data: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([data[at], data[at + 1]])
}

/// Writes a big-endian `u16` at `at`; the caller guarantees `at + 2 <= data.len()`.
#[inline]
fn write_u16(data: &mut [u8], at: usize, value: u16) {
    data[at..at + 2].copy_from_slice(&value.to_be_bytes());
}

/// Reads a big-endian `u32` at `at`; the caller guarantees `at + 4 <= data.len()`.
#[inline]
fn read_u32(data: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]])
}

/// Writes a big-endian `u32` at `at`; the caller guarantees `at + 4 <= data.len()`.
#[inline]
fn write_u32(data: &mut [u8], at: usize, value: u32) {
    data[at..at + 4].copy_from_slice(&value.to_be_bytes());
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn errors_display_what_failed() {
        let all = [
            Error::Truncated,
            Error::BadVersion,
            Error::BadHeaderLen,
            Error::BadTotalLen,
            Error::BadPayloadLen,
        ];
        let mut seen = std::collections::HashSet::new();
        for e in all {
            let text = e.to_string();
            assert!(!text.is_empty());
            assert!(seen.insert(text), "{e:?} shares its message");
        }
    }

    #[test]
    fn big_endian_helpers_round_trip() {
        let mut buf = [0u8; 6];
        write_u16(&mut buf, 0, 0x1234);
        write_u32(&mut buf, 2, 0xdead_beef);
        assert_eq!(buf, [0x12, 0x34, 0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(read_u16(&buf, 0), 0x1234);
        assert_eq!(read_u32(&buf, 2), 0xdead_beef);
    }
}
