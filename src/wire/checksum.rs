//! The Internet checksum (RFC 1071) and its incremental update (RFC 1624).
//!
//! Sums are ones'-complement sums of big-endian 16-bit words, folded to 16 bits but **not**
//! complemented; the checksum field holds the complement (`!sum`). A buffer whose sum,
//! including its checksum field, folds to `0xffff` verifies.

use std::net::Ipv6Addr;

/// Folds a wide sum of 16-bit words into a 16-bit ones'-complement sum (end-around carry).
#[inline]
fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The ones'-complement sum of `data` as big-endian 16-bit words; an odd last byte is padded
/// with a zero byte. Not complemented.
#[inline]
pub fn data(data: &[u8]) -> u16 {
    // Native-endian 32-bit words into 64-bit accumulators. 2^16 ≡ 1 (mod 0xffff), so folding
    // the sum of 32-bit words gives the sum of 16-bit words, in half the steps; and the sum of
    // byte-swapped words is the byte-swapped sum (RFC 1071 §2(B)), so the words need no swap,
    // only the result (which lets the compiler vectorize the loop: no per-word `bswap`). Four
    // accumulators break the dependency chain; a u64 cannot overflow for any buffer that fits
    // in memory.
    let mut acc = [0u64; 4];
    let mut blocks = data.chunks_exact(16);
    for b in &mut blocks {
        for (a, w) in acc.iter_mut().zip(b.chunks_exact(4)) {
            *a += u64::from(u32::from_ne_bytes([w[0], w[1], w[2], w[3]]));
        }
    }
    let mut sum: u64 = acc.iter().sum();
    let mut words = blocks.remainder().chunks_exact(4);
    for w in &mut words {
        sum += u64::from(u32::from_ne_bytes([w[0], w[1], w[2], w[3]]));
    }
    let rest = words.remainder();
    let mut tail = [0u8; 4];
    tail[..rest.len()].copy_from_slice(rest);
    sum += u64::from(u32::from_ne_bytes(tail));
    // The folded sum of native words is the big-endian sum in native byte order.
    u16::from_be(fold(sum))
}

/// Combines partial sums (from [`data`] or [`pseudo_header_v6`]) into one sum.
#[inline]
pub fn combine(sums: &[u16]) -> u16 {
    fold(sums.iter().map(|&s| u64::from(s)).sum())
}

/// The sum of the IPv6 pseudo-header (RFC 8200 §8.1): source, destination, upper-layer length
/// and next header.
pub fn pseudo_header_v6(src: &Ipv6Addr, dst: &Ipv6Addr, next_header: u8, length: u32) -> u16 {
    let len = length.to_be_bytes();
    combine(&[
        data(&src.octets()),
        data(&dst.octets()),
        data(&len),
        u16::from(next_header),
    ])
}

/// RFC 1624 eqn. 3: the new checksum field after one 16-bit word of the covered data changed
/// from `old_word` to `new_word`: `HC' = ~(~HC + ~m + m')`.
///
/// Unlike eqn. 2 (`HC - ~m - m'`) this never turns a checksum that should be `0x0000` into
/// `0xffff`: a ones'-complement sum of operands that are not all zero is never `+0`, so the
/// result agrees with a full recomputation whenever `checksum` was the canonical value.
#[inline]
pub fn update(checksum: u16, old_word: u16, new_word: u16) -> u16 {
    !combine(&[!checksum, !old_word, new_word])
}

#[cfg(test)]
mod test {
    use super::*;

    /// The textbook RFC 1071 loop, independent of [`data`]'s 32-bit trick.
    fn naive(bytes: &[u8]) -> u16 {
        let mut sum: u32 = 0;
        for pair in bytes.chunks(2) {
            let hi = u32::from(pair[0]) << 8;
            let lo = pair.get(1).map_or(0, |&b| u32::from(b));
            sum += hi | lo;
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum as u16
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3: the sum of 00 01 f2 03 f4 f5 f6 f7 is ddf2.
        assert_eq!(
            data(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            0xddf2
        );
    }

    #[test]
    fn matches_naive_on_every_length() {
        let mut bytes = [0u8; 300];
        let mut x: u32 = 0x1234_5678;
        for b in bytes.iter_mut() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        for len in 0..=bytes.len() {
            assert_eq!(data(&bytes[..len]), naive(&bytes[..len]), "length {len}");
        }
        assert_eq!(data(&[0xff; 1500]), 0xffff);
        // A whole super-packet's worth, also starting at an odd address.
        let big: Vec<u8> = (0..65_535u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        assert_eq!(data(&big), naive(&big));
        assert_eq!(data(&big[1..]), naive(&big[1..]));
        assert_eq!(data(&[]), 0);
        assert_eq!(data(&[0xab]), 0xab00);
    }

    #[test]
    fn combine_carries_around() {
        assert_eq!(combine(&[0xffff, 0x0001]), 0x0001);
        assert_eq!(combine(&[0x8000, 0x8000]), 0x0001);
        assert_eq!(combine(&[]), 0);
    }

    #[test]
    fn pseudo_header_matches_laid_out_bytes() {
        let src: Ipv6Addr = "fd00::1".parse().unwrap();
        let dst: Ipv6Addr = "fd00::2".parse().unwrap();
        let mut laid_out = Vec::new();
        laid_out.extend_from_slice(&src.octets());
        laid_out.extend_from_slice(&dst.octets());
        laid_out.extend_from_slice(&70_000u32.to_be_bytes());
        laid_out.extend_from_slice(&[0, 0, 0, 58]);
        assert_eq!(pseudo_header_v6(&src, &dst, 58, 70_000), naive(&laid_out));
    }

    #[test]
    fn update_matches_recompute_including_zero_edges() {
        // Word 0 of a 4-word buffer changes; word 3 is the checksum field.
        let mut x: u32 = 0x9e37_79b9;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u16
        };
        for _ in 0..20_000 {
            let (old, new, other) = (next(), next(), next());
            // Pick the last covered word so that the old sum hits the edge cases regularly.
            let last = match other % 4 {
                0 => !naive(&[(old >> 8) as u8, old as u8, (other >> 8) as u8, other as u8]),
                1 => !naive(&[(new >> 8) as u8, new as u8, (other >> 8) as u8, other as u8]),
                _ => next(),
            };
            let words = |first: u16| {
                let mut b = [0u8; 6];
                b[0..2].copy_from_slice(&first.to_be_bytes());
                b[2..4].copy_from_slice(&other.to_be_bytes());
                b[4..6].copy_from_slice(&last.to_be_bytes());
                b
            };
            let before = !naive(&words(old));
            let after = !naive(&words(new));
            if words(new) == [0; 6] {
                continue; // all-zero data has no canonical checksum; impossible in an IP header
            }
            assert_eq!(
                update(before, old, new),
                after,
                "{old:04x}->{new:04x} {other:04x} {last:04x}"
            );
        }
    }
}
