//! Alternative IPv4 longest-prefix-match designs, kept only so that `benches/table.rs` can
//! reproduce the comparison that chose the production one ([`Flat`], the structure behind
//! [`super::Snapshot`]). Not part of the supported API; the data plane must not use them.
//!
//! Also [`Rng`], the deterministic generator of the bench and the tests.
//!
//! Every design maps `(network, prefix length, value)` triples to the value of the longest prefix
//! containing an address, and is checked against a linear-scan reference in `table/tests.rs`.
//!
//! Must not import tokio, `lease`, `model` or `daemon`.
#![doc(hidden)]

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use super::flatmap::Key;
use super::lpm::Lpm;

/// An IPv4 longest-prefix-match structure under comparison.
pub trait V4Lpm: Sized {
    /// Name used in the bench (`table/compare/<name>/<n>`).
    const NAME: &'static str;
    /// Builds from `(network, prefix length, value)`; a later duplicate prefix wins.
    fn build(prefixes: impl IntoIterator<Item = (u32, u8, u32)>) -> Self;
    /// Value of the longest prefix containing `addr`.
    fn get(&self, addr: u32) -> Option<u32>;
    /// Heap bytes held.
    fn heap_bytes(&self) -> usize;
}

/// The production design: one open-addressing table per distinct prefix length, longest first.
pub struct Flat(Lpm<u32>);

impl V4Lpm for Flat {
    const NAME: &'static str = "flat";
    fn build(prefixes: impl IntoIterator<Item = (u32, u8, u32)>) -> Self {
        Flat(Lpm::build(prefixes))
    }
    #[inline]
    fn get(&self, addr: u32) -> Option<u32> {
        self.0.get(addr)
    }
    fn heap_bytes(&self) -> usize {
        self.0.heap_bytes()
    }
}

/// Prefixes flattened into sorted, non-overlapping address ranges; a lookup is a binary search
/// for the last range starting at or below the address.
pub struct SortedVec {
    starts: Vec<u32>,
    /// Inclusive end and value of the range at the same index.
    ends: Vec<(u32, u32)>,
}

impl V4Lpm for SortedVec {
    const NAME: &'static str = "sorted_vec";
    fn build(prefixes: impl IntoIterator<Item = (u32, u8, u32)>) -> Self {
        // Dedupe (last wins), then order so that a containing prefix precedes what it contains.
        let mut unique: HashMap<(u32, u8), u32> = HashMap::new();
        for (addr, len, value) in prefixes {
            let len = len.min(32);
            unique.insert((addr & u32::prefix_mask(len), len), value);
        }
        let mut sorted: Vec<(u32, u8, u32)> =
            unique.into_iter().map(|((a, l), v)| (a, l, v)).collect();
        sorted.sort_unstable_by_key(|&(a, l, _)| (a, l));

        let mut out = SortedVec {
            starts: Vec::new(),
            ends: Vec::new(),
        };
        let mut emit = |lo: u64, hi: u64, value: u32| {
            if lo <= hi {
                out.starts.push(lo as u32);
                out.ends.push((hi as u32, value));
            }
        };
        // Sweep: `open` holds the prefixes containing `cursor`, innermost last.
        let mut open: Vec<(u64, u32)> = Vec::new(); // (inclusive end, value)
        let mut cursor: u64 = 0;
        for (addr, len, value) in sorted {
            let start = u64::from(addr);
            let end = start + (u64::from(!u32::prefix_mask(len)));
            while let Some(&(top_end, top_value)) = open.last() {
                if top_end >= start {
                    break;
                }
                emit(cursor, top_end, top_value);
                cursor = top_end + 1;
                open.pop();
            }
            if let Some(&(_, top_value)) = open.last() {
                emit(cursor, start.saturating_sub(1), top_value);
            }
            cursor = start;
            open.push((end, value));
        }
        while let Some((top_end, top_value)) = open.pop() {
            emit(cursor, top_end, top_value);
            cursor = top_end + 1;
        }
        out
    }
    #[inline]
    fn get(&self, addr: u32) -> Option<u32> {
        let i = self.starts.partition_point(|&s| s <= addr).checked_sub(1)?;
        let &(end, value) = self.ends.get(i)?;
        (addr <= end).then_some(value)
    }
    fn heap_bytes(&self) -> usize {
        self.starts.capacity() * 4 + self.ends.capacity() * 8
    }
}

/// rustc-hash 2's FxHasher: add, multiply per word, and a rotate in `finish` so hashbrown's
/// bucket index (the low bits) sees the high bits of the product. (The old FxHash, without the
/// rotate, leaves the low bits of a /24 prefix's hash zero and collides every key into a few
/// buckets: 5-10x slower here.)
#[derive(Default, Clone, Copy)]
pub struct FxHasher(u64);

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.write_u64(u64::from(i));
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.0 = self.0.wrapping_add(i).wrapping_mul(0xf135_7aea_2e62_a9c5);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.0.rotate_left(26)
    }
}

type FxMap = HashMap<u32, u32, BuildHasherDefault<FxHasher>>;

/// A std `HashMap` (FxHash) of masked prefixes per distinct prefix length, longest first.
pub struct StdHashMap {
    levels: Vec<(u32, FxMap)>,
}

impl V4Lpm for StdHashMap {
    const NAME: &'static str = "hashmap";
    fn build(prefixes: impl IntoIterator<Item = (u32, u8, u32)>) -> Self {
        let mut by_len: Vec<FxMap> = vec![FxMap::default(); 33];
        for (addr, len, value) in prefixes {
            let len = len.min(32);
            if let Some(map) = by_len.get_mut(usize::from(len)) {
                map.insert(addr & u32::prefix_mask(len), value);
            }
        }
        let levels = by_len
            .into_iter()
            .enumerate()
            .rev()
            .filter(|(_, m)| !m.is_empty())
            .map(|(len, m)| (u32::prefix_mask(len as u8), m))
            .collect();
        StdHashMap { levels }
    }
    #[inline]
    fn get(&self, addr: u32) -> Option<u32> {
        self.levels
            .iter()
            .find_map(|(mask, map)| map.get(&(addr & mask)).copied())
    }
    fn heap_bytes(&self) -> usize {
        // hashbrown: one (key, value) and one control byte per bucket.
        self.levels.iter().map(|(_, m)| m.capacity() * 9).sum()
    }
}

/// xorshift64*: a tiny deterministic generator shared by the property tests and the bench, so
/// generated route sets are the same on every run without a dependency.
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 pseudo-random bits. The seed must not be zero.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number below `n` (`0` when `n` is `0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next().checked_rem(n).unwrap_or(0)
    }

    /// One of `items`, or `None` if it is empty.
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> Option<T> {
        items.get(self.below(items.len() as u64) as usize).copied()
    }
}
