//! Send-side batching, sans-IO: consecutive packets read from the TUN that go to one peer and
//! have one size (the last may be shorter) form a run that leaves in one UDP GSO `sendmsg`.
//! Packets sit in an arena at a fixed stride (the MTU); full-size ones are back to back
//! already, smaller ones are moved together in place before the send.
//!
//! Must not import tokio, `lease` or `daemon`.

use std::net::SocketAddr;

/// Largest UDP GSO send: under 64 KiB of payload.
pub const GSO_BYTES: usize = 65_000;

/// An open run of packets for one peer: arena slots `first..first + n`, each `seg` bytes but
/// the last, `bytes` in all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// Where the run goes.
    pub peer: SocketAddr,
    /// Arena slot of the first packet.
    pub first: usize,
    /// Packets in the run.
    pub n: usize,
    /// Size of every packet but the last (the GSO segment size).
    pub seg: usize,
    /// Bytes in all.
    pub bytes: usize,
    /// The most segments one GSO send to `peer` may have (1: none, GSO refused lately).
    pub max_segments: usize,
}

impl Run {
    /// A run of one packet of `len` bytes at slot `first`, which may grow to `max_segments`.
    pub fn new(peer: SocketAddr, first: usize, len: usize, max_segments: usize) -> Run {
        Run {
            peer,
            first,
            n: 1,
            seg: len.max(1),
            bytes: len,
            max_segments,
        }
    }

    /// Takes the next packet (`len` bytes for `peer`, in the slot after the run's last) when it
    /// may join: same peer, every packet so far the run's size, this one no larger, and room
    /// left in one GSO send of at most the run's `max_segments` segments and [`GSO_BYTES`].
    #[inline]
    pub fn try_extend(&mut self, peer: SocketAddr, len: usize) -> bool {
        let joins = self.peer == peer
            && self.bytes == self.n * self.seg
            && len <= self.seg
            && self.n < self.max_segments.min(GSO_BYTES / self.seg);
        if joins {
            self.n += 1;
            self.bytes += len;
        }
        joins
    }

    /// Makes the run's packets contiguous in `arena` (slots of `stride` bytes) and returns
    /// the range to send. Each packet moves to or before its own slot, so none is overwritten
    /// before it has moved; full-size runs (`seg == stride`) move nothing.
    pub fn gather(&self, arena: &mut [u8], stride: usize) -> std::ops::Range<usize> {
        let at = self.first * stride;
        if self.n > 1 && self.seg != stride {
            for k in 1..self.n {
                let len = self.seg.min(self.bytes - k * self.seg);
                let src = at + k * stride;
                arena.copy_within(src..src + len, at + k * self.seg);
            }
        }
        at..at + self.bytes
    }
}

#[cfg(test)]
mod test {
    use super::*;

    fn peer(i: u8) -> SocketAddr {
        SocketAddr::from(([198, 18, 0, i], 8285))
    }

    #[test]
    fn equal_sizes_to_one_peer_join_and_the_last_may_be_shorter() {
        let mut run = Run::new(peer(2), 0, 100, 64);
        assert!(run.try_extend(peer(2), 100));
        assert!(!run.try_extend(peer(3), 100), "another peer");
        assert!(!run.try_extend(peer(2), 101), "larger than the run's size");
        assert!(run.try_extend(peer(2), 40), "a shorter last packet");
        assert!(!run.try_extend(peer(2), 40), "nothing after a short one");
        assert_eq!((run.n, run.bytes), (3, 240));
        // The segment limit and the 64 KiB bound.
        let mut run = Run::new(peer(2), 0, 100, 4);
        while run.try_extend(peer(2), 100) {}
        assert_eq!(run.n, 4);
        let mut run = Run::new(peer(2), 0, 1472, 128);
        while run.try_extend(peer(2), 1472) {}
        assert_eq!(run.n, GSO_BYTES / 1472);
    }

    #[test]
    fn gather_packs_small_packets_in_order() {
        let stride = 16;
        let mut arena = vec![0u8; stride * 4];
        // Packets of 5, 5, 5 and 3 bytes, each filled with its index + 1.
        let lens = [5, 5, 5, 3];
        for (i, len) in lens.iter().enumerate() {
            arena[i * stride..i * stride + len].fill(i as u8 + 1);
        }
        let mut run = Run::new(peer(2), 0, 5, 64);
        for len in &lens[1..] {
            assert!(run.try_extend(peer(2), *len));
        }
        let range = run.gather(&mut arena, stride);
        assert_eq!(range, 0..18);
        assert_eq!(
            &arena[range],
            &[1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 4, 4, 4]
        );
        // A run of full-size packets is left where it is.
        let mut arena: Vec<u8> = (0..64).collect();
        let mut run = Run::new(peer(2), 1, stride, 64);
        assert!(run.try_extend(peer(2), stride));
        assert_eq!(run.gather(&mut arena, stride), 16..48);
        assert_eq!(arena, (0..64).collect::<Vec<u8>>());
    }
}
