//! `Lpm`: the longest-prefix-match structure behind [`super::Snapshot`]'s lookups, one
//! [`FlatMap`] of masked prefixes per distinct prefix length, probed longest length first.
//!
//! A flannel network gives every lease the same prefix length (`SubnetLen`, usually /24), so a
//! lookup is one mask, one hash and one probe — one or two cache lines — whatever the number of
//! leases. Mixed lengths cost one probe per distinct length present, never per route.
//! `benches/table.rs` compares this against a sorted-range binary search and a std `HashMap`.
//!
//! Must not import tokio, `lease`, `model` or `daemon`. No unsafe, no panics.

use super::flatmap::{FlatMap, Key};

/// One prefix length present in the table.
#[derive(Clone)]
struct Level<K> {
    mask: K,
    map: FlatMap<K>,
}

/// Longest-prefix match from an address (`u32`/`u128`) to a `u32` value (an entry index).
#[derive(Clone)]
pub(crate) struct Lpm<K> {
    /// Longest prefix length first.
    levels: Box<[Level<K>]>,
}

impl<K: Key> Lpm<K> {
    /// Builds from `(address, prefix length, value)` triples. Host bits of the address are
    /// ignored; lengths above the key width are clamped to it. A later triple for the same prefix
    /// replaces an earlier one.
    pub(crate) fn build(prefixes: impl IntoIterator<Item = (K, u8, u32)>) -> Self {
        let width = usize::from(K::WIDTH);
        // Bucket by length; index `len` in 0..=width.
        let mut by_len: Vec<Vec<(K, u32)>> = vec![Vec::new(); width + 1];
        for (addr, len, value) in prefixes {
            let len = len.min(K::WIDTH);
            if let Some(bucket) = by_len.get_mut(usize::from(len)) {
                bucket.push((addr.and(K::prefix_mask(len)), value));
            }
        }
        let levels = by_len
            .into_iter()
            .enumerate()
            .rev()
            .filter(|(_, bucket)| !bucket.is_empty())
            .map(|(len, bucket)| Level {
                mask: K::prefix_mask(len as u8),
                map: FlatMap::build(bucket.into_iter()),
            })
            .collect();
        Lpm { levels }
    }

    /// The value of the longest prefix containing `addr`.
    #[inline]
    pub(crate) fn get(&self, addr: K) -> Option<u32> {
        // HOT PATH: one iteration for a single-length (flannel) table.
        for level in self.levels.iter() {
            if let Some(value) = level.map.get(addr.and(level.mask)) {
                return Some(value);
            }
        }
        None
    }

    /// Number of distinct prefixes.
    pub(crate) fn len(&self) -> usize {
        self.levels.iter().map(|l| l.map.len()).sum()
    }

    /// Bytes of heap memory held.
    pub(crate) fn heap_bytes(&self) -> usize {
        std::mem::size_of_val::<[Level<K>]>(&self.levels)
            + self
                .levels
                .iter()
                .map(|l| l.map.heap_bytes())
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_wins_over_shorter_ones() {
        let lpm = Lpm::<u32>::build([
            (0x0000_0000, 0, 1),  // 0.0.0.0/0
            (0x0A00_0000, 8, 2),  // 10.0.0.0/8
            (0x0A01_0000, 16, 3), // 10.1.0.0/16
            (0x0A01_0200, 24, 4), // 10.1.2.0/24
            (0x0A01_0203, 32, 5), // 10.1.2.3/32
        ]);
        assert_eq!(lpm.get(0x0A01_0203), Some(5));
        assert_eq!(lpm.get(0x0A01_0204), Some(4));
        assert_eq!(lpm.get(0x0A01_0300), Some(3));
        assert_eq!(lpm.get(0x0A02_0000), Some(2));
        assert_eq!(lpm.get(0x0B00_0000), Some(1));
        assert_eq!(lpm.len(), 5);
    }

    #[test]
    fn host_bits_are_ignored_and_later_duplicate_wins() {
        let lpm = Lpm::<u32>::build([(0x0A01_02FF, 24, 1), (0x0A01_0200, 24, 2)]);
        assert_eq!(lpm.get(0x0A01_0201), Some(2));
        assert_eq!(lpm.len(), 1);
    }

    #[test]
    fn v6_extremes() {
        let lpm = Lpm::<u128>::build([(0, 0, 1), (u128::MAX, 128, 2), (0xfd00 << 112, 8, 3)]);
        assert_eq!(lpm.get(u128::MAX), Some(2));
        assert_eq!(lpm.get(u128::MAX - 1), Some(1));
        assert_eq!(lpm.get((0xfd00 << 112) | 1), Some(3));
        let empty = Lpm::<u128>::build([]);
        assert_eq!(empty.get(0), None);
    }
}
