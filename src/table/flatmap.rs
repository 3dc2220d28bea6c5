//! `FlatMap`: a read-only open-addressing hash map from an integer key (`u32` for IPv4, `u128`
//! for IPv6) to a `u32` index, built once and then only probed. It owns the hashing and probing
//! that both the longest-prefix match ([`super::lpm`]) and the sender index use.
//!
//! Why not `std::collections::HashMap`: a probe here is one multiply, one shift and, almost
//! always, one cache line (keys and values sit together in 8-byte slots for IPv4), with no SipHash
//! and no control bytes; `benches/table.rs` compares both. The keys come from the lease registry
//! (trusted input), so the hash is not keyed against flooding; Fibonacci hashing spreads the
//! structured keys a registry hands out (consecutive subnets) evenly.
//!
//! Must not import tokio, `lease`, `model` or `daemon`. No unsafe, no panics: every index is
//! reduced by the mask before use and every probe loop is bounded by the capacity.

/// An integer key that can be stored in a [`FlatMap`] and masked to a prefix.
pub(crate) trait Key: Copy + Eq + Default {
    /// Width of the address in bits (32 or 128).
    const WIDTH: u8;
    /// A mask with the `len` high bits set (`len` above `WIDTH` is treated as `WIDTH`).
    fn prefix_mask(len: u8) -> Self;
    /// `self & other`.
    fn and(self, other: Self) -> Self;
    /// A 64-bit hash whose high bits are well mixed (the map uses the high bits).
    fn hash(self) -> u64;
}

/// 2^64 / φ, the multiplier of Fibonacci hashing (Knuth, TAOCP 6.4).
const FIB: u64 = 0x9E37_79B9_7F4A_7C15;

/// The masking half of [`Key`], the same for every unsigned width.
macro_rules! prefix_ops {
    ($width:expr) => {
        const WIDTH: u8 = $width;
        #[inline]
        fn prefix_mask(len: u8) -> Self {
            Self::MAX
                .checked_shl(u32::from(Self::WIDTH.saturating_sub(len)))
                .unwrap_or(0)
        }
        #[inline]
        fn and(self, other: Self) -> Self {
            self & other
        }
    };
}

impl Key for u32 {
    prefix_ops!(32);
    #[inline]
    fn hash(self) -> u64 {
        u64::from(self).wrapping_mul(FIB)
    }
}

impl Key for u128 {
    prefix_ops!(128);
    #[inline]
    fn hash(self) -> u64 {
        // Fold the halves so that both /64 prefixes (low half zero) and host addresses mix in.
        let hi = (self >> 64) as u64;
        let lo = self as u64;
        (hi ^ lo.wrapping_mul(FIB).rotate_left(29)).wrapping_mul(FIB)
    }
}

/// Value stored in a vacant slot; real values are indices below `u32::MAX`.
const VACANT: u32 = u32::MAX;

#[derive(Clone, Copy)]
struct Slot<K> {
    key: K,
    value: u32,
}

/// Read-only open-addressing map (linear probing, load factor ≤ 2/3, capacity a power of two).
#[derive(Clone)]
pub(crate) struct FlatMap<K> {
    slots: Box<[Slot<K>]>,
    /// `64 - log2(capacity)`: the hash's high bits select the home slot.
    shift: u32,
    /// `capacity - 1`.
    mask: usize,
    len: usize,
}

impl<K: Key> FlatMap<K> {
    /// Builds a map from `(key, value)` pairs. A later pair with an equal key replaces the
    /// earlier one. Values must be below `u32::MAX` (indices into a `Vec`); a pair whose value is
    /// `u32::MAX` is skipped.
    pub(crate) fn build(pairs: impl ExactSizeIterator<Item = (K, u32)>) -> Self {
        // Capacity ≥ 1.5 × len, at least 2, so a probe always meets a vacant slot soon.
        let wanted = pairs.len().saturating_add(pairs.len() / 2).max(2);
        let capacity = wanted.checked_next_power_of_two().unwrap_or(1 << 31);
        let mut map = FlatMap {
            slots: vec![
                Slot {
                    key: K::default(),
                    value: VACANT,
                };
                capacity
            ]
            .into_boxed_slice(),
            shift: 64 - capacity.trailing_zeros(),
            mask: capacity - 1,
            len: 0,
        };
        for (key, value) in pairs {
            if value != VACANT {
                map.insert(key, value);
            }
        }
        map
    }

    fn insert(&mut self, key: K, value: u32) {
        let mut i = self.home(key);
        for _ in 0..self.slots.len() {
            let Some(slot) = self.slots.get_mut(i) else {
                return;
            };
            if slot.value == VACANT {
                *slot = Slot { key, value };
                self.len += 1;
                return;
            }
            if slot.key == key {
                slot.value = value;
                return;
            }
            i = (i + 1) & self.mask;
        }
    }

    #[inline]
    fn home(&self, key: K) -> usize {
        // `shift` is in 1..=63 (capacity is a power of two of at least 2), so it cannot overflow.
        (key.hash() >> self.shift) as usize
    }

    /// The value stored for `key`.
    #[inline]
    pub(crate) fn get(&self, key: K) -> Option<u32> {
        let mut i = self.home(key);
        for _ in 0..self.slots.len() {
            let slot = self.slots.get(i)?;
            if slot.value == VACANT {
                return None;
            }
            if slot.key == key {
                return Some(slot.value);
            }
            i = (i + 1) & self.mask;
        }
        None
    }

    /// Number of distinct keys.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Bytes of heap memory held.
    pub(crate) fn heap_bytes(&self) -> usize {
        std::mem::size_of_val::<[Slot<K>]>(&self.slots)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_cover_every_length() {
        assert_eq!(u32::prefix_mask(0), 0);
        assert_eq!(u32::prefix_mask(1), 0x8000_0000);
        assert_eq!(u32::prefix_mask(24), 0xFFFF_FF00);
        assert_eq!(u32::prefix_mask(32), 0xFFFF_FFFF);
        assert_eq!(u32::prefix_mask(200), 0xFFFF_FFFF);
        assert_eq!(u128::prefix_mask(0), 0);
        assert_eq!(
            u128::prefix_mask(64),
            0xFFFF_FFFF_FFFF_FFFF_0000_0000_0000_0000
        );
        assert_eq!(u128::prefix_mask(128), u128::MAX);
    }

    #[test]
    fn finds_every_key_and_nothing_else() {
        // Consecutive /24 network addresses: the shape a registry hands out.
        let keys: Vec<u32> = (0..5000u32).map(|i| 0x0A00_0000 + (i << 8)).collect();
        let map = FlatMap::build(keys.iter().enumerate().map(|(i, &k)| (k, i as u32)));
        assert_eq!(map.len(), 5000);
        for (i, &k) in keys.iter().enumerate() {
            assert_eq!(map.get(k), Some(i as u32));
        }
        assert_eq!(map.get(0x0A00_0001), None);
        assert_eq!(map.get(0x0A00_0000 + (5000 << 8)), None);
        assert_eq!(map.get(0), None);
    }

    #[test]
    fn later_duplicate_wins_and_vacant_value_is_skipped() {
        let map = FlatMap::build([(7u128, 1), (9, 2), (7, 3), (11, VACANT)].into_iter());
        assert_eq!(map.get(7), Some(3));
        assert_eq!(map.get(9), Some(2));
        assert_eq!(map.get(11), None);
        assert_eq!(map.len(), 2);
    }

    #[test]
    fn empty_map_answers_none() {
        let map = FlatMap::<u32>::build(std::iter::empty());
        assert_eq!(map.get(0), None);
        assert_eq!(map.get(u32::MAX), None);
    }
}
