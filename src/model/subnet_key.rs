//! Subnet keys: the last path segment of `<prefix>/subnets/<key>`, flannel's
//! `a.b.c.d-len[&v6-len]` (e.g. `198.19.1.0-24`, `10.12.13.0-24&fd00:12:13::-56`).

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnetwork::{Ipv4Network, Ipv6Network};

/// The subnets one lease holds: an IPv4 subnet, an IPv6 subnet, or both.
///
/// An IPv6-only lease is written as flannel writes it, with an empty IPv4 part:
/// `0.0.0.0-0&fd00::-64`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubnetKey {
    v4: Option<Ipv4Network>,
    v6: Option<Ipv6Network>,
}

/// Why a subnet key was rejected. Each variant carries the offending key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubnetKeyError {
    /// The text does not have the `a.b.c.d-len[&v6-len]` shape.
    #[error(
        "subnet key {0:?} is malformed: expected a.b.c.d-LEN or a.b.c.d-LEN&IPV6-LEN, e.g. 198.19.1.0-24"
    )]
    Malformed(String),
    /// The prefix length is out of range (IPv4 0..=31 as flannel parses it, IPv6 0..=127).
    #[error("subnet key {0:?} has a prefix length out of range (IPv4 allows 0..=31, IPv6 0..=127)")]
    PrefixLen(String),
    /// The address has bits set below the prefix (e.g. `198.19.1.5-24`).
    #[error("subnet key {0:?} is not a network address: the host bits must be zero")]
    HostBits(String),
    /// Neither an IPv4 nor an IPv6 subnet.
    #[error("subnet key {0:?} holds no subnet")]
    Empty(String),
}

impl SubnetKey {
    /// A key for an IPv4 subnet, an IPv6 subnet or both. Host bits are masked off.
    /// Returns `None` when both are `None`.
    pub fn new(v4: Option<Ipv4Network>, v6: Option<Ipv6Network>) -> Option<SubnetKey> {
        if v4.is_none() && v6.is_none() {
            return None;
        }
        Some(SubnetKey {
            v4: v4.map(normalize_v4),
            v6: v6.map(normalize_v6),
        })
    }

    /// A key for an IPv4 subnet only.
    pub fn v4(net: Ipv4Network) -> SubnetKey {
        SubnetKey {
            v4: Some(normalize_v4(net)),
            v6: None,
        }
    }

    /// The IPv4 subnet, if the lease has one.
    pub fn ipv4(&self) -> Option<Ipv4Network> {
        self.v4
    }

    /// The IPv6 subnet, if the lease has one.
    pub fn ipv6(&self) -> Option<Ipv6Network> {
        self.v6
    }

    /// Whether the two keys share an address in either family. Distinct keys can: a
    /// dual-stack key with another key's IPv4 subnet and an IPv6 subnet of its own, or a /24
    /// left from an older config holding a /25 of a newer one.
    pub fn overlaps(&self, other: &SubnetKey) -> bool {
        let v4 = matches!((self.v4, other.v4), (Some(a), Some(b)) if a.overlaps(b));
        let v6 = matches!((self.v6, other.v6), (Some(a), Some(b)) if a.overlaps(b));
        v4 || v6
    }

    /// Whether the two keys hold the very same subnet in either family: what two hosts of one
    /// network can both hold, and what makes one of them give way at renewal. Unlike
    /// [`overlaps`](Self::overlaps), a key of another length (`128.0.0.0-1`, written by hand
    /// or by a compromised host, or a /24 left from an older config) does not.
    pub fn shares_subnet(&self, other: &SubnetKey) -> bool {
        (self.v4.is_some() && self.v4 == other.v4) || (self.v6.is_some() && self.v6 == other.v6)
    }

    /// Parses a key, or a full registry path ending in one (`/coreos.com/network/subnets/…`):
    /// only the text after the last `/` is read. Stricter than flannel at the start: flannel's
    /// regex is anchored only at the end, so it also reads `x10.12.13.0-24` as 10.12.13.0/24,
    /// where linen refuses the key (and a registry skips it with a warning). Neither writes
    /// such keys; only a hand-made one differs.
    pub fn parse(text: &str) -> Result<SubnetKey, SubnetKeyError> {
        let name = text.rsplit('/').next().unwrap_or(text);
        let bad = || SubnetKeyError::Malformed(text.to_owned());
        let (v4_part, v6_part) = match name.split_once('&') {
            Some((a, b)) => (a, Some(b)),
            None => (name, None),
        };
        let (v4_addr, v4_len) = v4_part.split_once('-').ok_or_else(bad)?;
        if !is_dotted_quad(v4_addr) {
            return Err(bad());
        }
        let v4_addr = Ipv4Addr::from_str(v4_addr).map_err(|_| bad())?;
        let v4_len = parse_len(v4_len).ok_or_else(bad)?;
        if v4_len > 31 {
            return Err(SubnetKeyError::PrefixLen(text.to_owned()));
        }
        let v4 = Ipv4Network::new(v4_addr, v4_len).map_err(|_| bad())?;
        if v4.network() != v4_addr {
            return Err(SubnetKeyError::HostBits(text.to_owned()));
        }
        // flannel writes an empty IPv4 part as 0.0.0.0-0 on IPv6-only leases.
        let v4 = (v4_len != 0 || !v4_addr.is_unspecified()).then_some(v4);

        let v6 = match v6_part {
            None => None,
            Some(part) => {
                let (addr, len) = part.split_once('-').ok_or_else(bad)?;
                if addr.is_empty() || !addr.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') {
                    return Err(bad());
                }
                let addr = Ipv6Addr::from_str(addr).map_err(|_| bad())?;
                let len = parse_len(len).ok_or_else(bad)?;
                if len > 127 {
                    return Err(SubnetKeyError::PrefixLen(text.to_owned()));
                }
                let net = Ipv6Network::new(addr, len).map_err(|_| bad())?;
                if net.network() != addr {
                    return Err(SubnetKeyError::HostBits(text.to_owned()));
                }
                Some(net)
            }
        };
        SubnetKey::new(v4, v6).ok_or_else(|| SubnetKeyError::Empty(text.to_owned()))
    }
}

impl FromStr for SubnetKey {
    type Err = SubnetKeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SubnetKey::parse(s)
    }
}

impl fmt::Display for SubnetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.v4 {
            Some(n) => write!(f, "{}-{}", n.network(), n.prefix())?,
            None => f.write_str("0.0.0.0-0")?,
        }
        if let Some(n) = self.v6 {
            write!(f, "&{}-{}", n.network(), n.prefix())?;
        }
        Ok(())
    }
}

fn normalize_v4(n: Ipv4Network) -> Ipv4Network {
    Ipv4Network::new(n.network(), n.prefix()).unwrap_or(n)
}

fn normalize_v6(n: Ipv6Network) -> Ipv6Network {
    Ipv6Network::new(n.network(), n.prefix()).unwrap_or(n)
}

/// flannel's regex takes `\d+\.\d+\.\d+\.\d+`: exactly four dot-separated digit runs.
fn is_dotted_quad(s: &str) -> bool {
    let mut parts = 0;
    for p in s.split('.') {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
        parts += 1;
    }
    parts == 4
}

/// A decimal prefix length: digits only (no sign, no trailing junk), at most 3 digits.
fn parse_len(s: &str) -> Option<u8> {
    if s.is_empty() || s.len() > 3 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn round_trips_flannel_examples() {
        for text in [
            "10.12.13.0-24",
            "10.12.13.0-24&fd00:12:13::-56",
            "198.19.1.0-24",
            "0.0.0.0-0&fd00::-64",
        ] {
            let key = SubnetKey::parse(text).unwrap();
            assert_eq!(key.to_string(), text);
        }
    }

    #[test]
    fn overlaps_in_either_family() {
        let k = |t: &str| SubnetKey::parse(t).unwrap();
        let dual = k("198.19.62.0-24&fd00:19:0:2::-64");
        for (other, expected) in [
            ("198.19.62.0-24&fd00:19:0:32::-64", true), // same IPv4, other IPv6
            ("198.19.13.0-24&fd00:19:0:2::-64", true),  // other IPv4, same IPv6
            ("198.19.62.128-25", true),                 // inside, IPv4 only
            ("198.19.0.0-16", true),                    // around
            ("0.0.0.0-0&fd00:19::-48", true),           // around, IPv6 only
            ("198.19.63.0-24&fd00:19:0:3::-64", false),
            ("198.19.63.0-24", false),
            ("0.0.0.0-0&fd00:19:0:3::-64", false),
        ] {
            assert_eq!(dual.overlaps(&k(other)), expected, "{other}");
            assert_eq!(k(other).overlaps(&dual), expected, "{other} (reversed)");
        }
        assert!(dual.overlaps(&dual));
    }

    #[test]
    fn sharing_a_subnet_means_the_very_same_one() {
        let k = |t: &str| SubnetKey::parse(t).unwrap();
        let dual = k("198.19.62.0-24&fd00:19:0:2::-64");
        for (other, expected) in [
            ("198.19.62.0-24&fd00:19:0:32::-64", true),
            ("198.19.13.0-24&fd00:19:0:2::-64", true),
            ("198.19.62.0-24", true),
            ("198.19.62.128-25", false),
            ("128.0.0.0-1", false),
            ("198.19.63.0-24&fd00:19::-48", false),
        ] {
            assert_eq!(dual.shares_subnet(&k(other)), expected, "{other}");
            assert_eq!(
                k(other).shares_subnet(&dual),
                expected,
                "{other} (reversed)"
            );
        }
    }

    #[test]
    fn reads_fields() {
        let key = SubnetKey::parse("10.12.13.0-24&fd00:12:13::-56").unwrap();
        assert_eq!(
            key.ipv4(),
            Some(Ipv4Network::new(Ipv4Addr::new(10, 12, 13, 0), 24).unwrap())
        );
        assert_eq!(
            key.ipv6(),
            Some(Ipv6Network::new("fd00:12:13::".parse().unwrap(), 56).unwrap())
        );
        let v6only = SubnetKey::parse("0.0.0.0-0&fd00::-64").unwrap();
        assert_eq!(v6only.ipv4(), None);
        assert!(v6only.ipv6().is_some());
    }

    #[test]
    fn accepts_full_paths() {
        let key = SubnetKey::parse("/coreos.com/network/subnets/198.19.1.0-24").unwrap();
        assert_eq!(key.to_string(), "198.19.1.0-24");
    }

    #[test]
    fn rejects_flannel_bad_keys() {
        // The rejected keys of flannel's subnet_test.go, plus a few of our own.
        for text in [
            "10",
            "10.12.13.0",
            "10.12.13-24",
            "10.12.13.300-24",
            "10.12.13.0-24hi",
            "&2001::-56",
            "10.12.13.0-24&2001:db8::",
            "10.12.13.0-24&2001:zz::-56",
            "10.12.13.0-24&2001::-56x",
            "10.12.13.0-24&-56",
            "10.12.13.0-",
            "10.12.13.0--24",
            "10.12.13.0-+24",
            "",
            "0.0.0.0-0",
            // flannel reads these as 10.12.13.0/24 (its regex is not anchored at the start).
            "x10.12.13.0-24",
            "1.10.12.13.0-24",
        ] {
            assert!(SubnetKey::parse(text).is_err(), "{text:?} must be rejected");
        }
    }

    #[test]
    fn rejects_out_of_range_lengths_and_host_bits() {
        assert!(matches!(
            SubnetKey::parse("10.12.13.0-32"),
            Err(SubnetKeyError::PrefixLen(_))
        ));
        assert!(matches!(
            SubnetKey::parse("10.12.13.0-24&fd00::-128"),
            Err(SubnetKeyError::PrefixLen(_))
        ));
        assert!(matches!(
            SubnetKey::parse("10.12.13.5-24"),
            Err(SubnetKeyError::HostBits(_))
        ));
        let err = SubnetKey::parse("10.12.13.5-24").unwrap_err().to_string();
        assert!(err.contains("10.12.13.5-24"), "{err}");
    }

    #[test]
    fn new_masks_host_bits() {
        let key = SubnetKey::v4(Ipv4Network::new(Ipv4Addr::new(10, 1, 2, 3), 24).unwrap());
        assert_eq!(key.to_string(), "10.1.2.0-24");
        assert_eq!(SubnetKey::new(None, None), None);
    }
}
