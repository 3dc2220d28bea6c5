//! The subnet allocator: flannel's `tryAcquireLease` decision as a pure function of the config,
//! the current leases, this host's attributes and the previous subnet (`subnet.env`). No I/O;
//! deterministic for a given RNG. The lease manager carries the decision out against a registry.
//!
//! The order (`flannel-compat.md` §b "Acquiring a lease at start-up", §c):
//! 1. a lease holding our PublicIP (PublicIPv6 when the config is IPv6-only): reused when it is
//!    compatible with the config, otherwise marked for deletion;
//! 2. the previous subnet, when compatible and **free** (never one another host holds —
//!    flannel #1289);
//! 3. a random subnet among the first 100 free ones between SubnetMin and SubnetMax, for IPv4
//!    and IPv6 independently. A candidate overlapping any lease (of any size) is not free.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnetwork::{Ipv4Network, Ipv6Network};
use rand::{Rng, RngExt};

use crate::model::{Lease, LeaseAttrs, NetworkConfig, SubnetKey};

/// How many free candidates flannel collects before picking one at random.
pub const CANDIDATES: usize = 100;

/// What the allocator is asked.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The network config in force.
    pub config: &'a NetworkConfig,
    /// Every live lease in the registry.
    pub leases: &'a [Lease],
    /// This host's lease value; its PublicIP is its identity.
    pub ours: &'a LeaseAttrs,
    /// The subnet this host had before (`subnet.env`), if any.
    pub previous: Option<SubnetKey>,
    /// Subnets to treat as leased although they are not in `leases` (the manager puts here the
    /// keys whose create lost a race, including unreadable keys a list skips).
    pub also_taken: &'a [SubnetKey],
}

/// What to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Leases holding our PublicIP that the config no longer allows: delete them first.
    pub incompatible: Vec<Lease>,
    /// Our dynamic leases that a reservation for us supersedes: delete them once it is held
    /// (peers would otherwise route those subnets here until they expire).
    pub superseded: Vec<Lease>,
    /// Which lease to hold.
    pub choice: Choice,
}

/// The lease to hold, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Choice {
    /// Our own lease (found by PublicIP) is compatible: renew it. A reservation stays one.
    Reuse(Lease),
    /// The previous subnet is compatible and free: create it.
    Previous(SubnetKey),
    /// A free subnet picked at random: create it.
    Fresh(SubnetKey),
}

impl Choice {
    /// The subnet chosen.
    pub fn key(&self) -> SubnetKey {
        match self {
            Choice::Reuse(lease) => lease.key,
            Choice::Previous(key) | Choice::Fresh(key) => *key,
        }
    }
}

/// Why no subnet could be chosen.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// Every candidate subnet overlaps a lease.
    #[error(
        "no free subnet in {min} … {max} (/{len}): all {total} are leased; widen Network or \
         SubnetMin/SubnetMax, or release leases with `linen lease release`"
    )]
    Exhausted {
        /// First subnet start of the range.
        min: String,
        /// Last subnet start of the range (inclusive).
        max: String,
        /// Subnet prefix length.
        len: u8,
        /// How many subnets the range holds.
        total: u128,
    },
    /// Our attributes name no address for a family the config enables.
    #[error(
        "this host's lease value has no {field}, but the network config enables {family}; \
         set --public-ip{flag}"
    )]
    NoIdentity {
        /// `PublicIP` or `PublicIPv6`.
        field: &'static str,
        /// `IPv4` or `IPv6`.
        family: &'static str,
        /// Flag suffix (`""` or `"v6"`).
        flag: &'static str,
    },
}

/// Whether a lease key may be held under `config`: it has exactly the families the config
/// enables and each subnet lies in its range with the configured length.
pub fn is_compatible(config: &NetworkConfig, key: &SubnetKey) -> bool {
    let v4_ok = match (config.network, key.ipv4()) {
        (Some(_), Some(net)) => config.is_valid_v4_subnet(net),
        (None, None) => true,
        _ => false,
    };
    let v6_ok = match (config.ipv6_network, key.ipv6()) {
        (Some(_), Some(net)) => config.is_valid_v6_subnet(net),
        (None, None) => true,
        _ => false,
    };
    v4_ok && v6_ok
}

/// Decides which lease this host should hold.
pub fn plan(req: &Request<'_>, rng: &mut impl Rng) -> Result<Plan, AllocError> {
    let config = req.config;
    if config.network.is_some() && req.ours.public_ip.is_none() && req.ours.public_ipv6.is_none() {
        return Err(AllocError::NoIdentity {
            field: "PublicIP",
            family: "IPv4",
            flag: "",
        });
    }
    if config.network.is_none() && req.ours.public_ipv6.is_none() {
        return Err(AllocError::NoIdentity {
            field: "PublicIPv6",
            family: "IPv6 only",
            flag: "v6",
        });
    }

    // 1. Our own lease, by identity. A reservation wins over a dynamic lease if both exist
    //    (an operator placed it on purpose), and the dynamic ones are then given up. Of two
    //    dynamic ones, the previous subnet's, else the first listed (flannel takes the first);
    //    the other is left to expire, as in flannel. (Two come about when a host that followed
    //    a new address, keeping its subnet, took one that another host's unexpired lease
    //    still names. Its writer may be alive: still advertising the address for a moment, or
    //    configured with it. So it is not deleted here.)
    let mut incompatible = Vec::new();
    let mut reuse: Option<&Lease> = None;
    for lease in req.leases.iter().filter(|l| is_ours(config, req.ours, l)) {
        if !is_compatible(config, &lease.key) {
            incompatible.push(lease.clone());
        } else if reuse.is_none_or(|r| {
            !r.is_reservation()
                && (lease.is_reservation()
                    || (Some(lease.key) == req.previous && Some(r.key) != req.previous))
        }) {
            reuse = Some(lease);
        }
    }
    if let Some(lease) = reuse {
        let superseded = if lease.is_reservation() {
            req.leases
                .iter()
                .filter(|l| {
                    is_ours(config, req.ours, l)
                        && !l.is_reservation()
                        && !incompatible.iter().any(|i| i.key == l.key)
                })
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        return Ok(Plan {
            incompatible,
            superseded,
            choice: Choice::Reuse(lease.clone()),
        });
    }

    // Leases we are about to delete no longer block anything.
    let blocking: Vec<SubnetKey> = req
        .leases
        .iter()
        .map(|l| l.key)
        .filter(|k| !incompatible.iter().any(|l| l.key == *k))
        .chain(req.also_taken.iter().copied())
        .collect();

    // 2. The previous subnet, only if compatible and nobody holds it (flannel #1289).
    if let Some(prev) = req.previous
        && is_compatible(config, &prev)
        && !blocking.iter().any(|k| k.overlaps(&prev))
    {
        return Ok(Plan {
            incompatible,
            superseded: Vec::new(),
            choice: Choice::Previous(prev),
        });
    }

    // 3. A random free subnet per family.
    let v4 = match config.network {
        Some(_) => {
            let taken = blocking.iter().filter_map(|k| k.ipv4()).map(v4_span);
            let range = Range::v4(config);
            let start = range.pick(taken, rng)?;
            Some(Ipv4Network::new(Ipv4Addr::from(start as u32), config.subnet_len).expect("len"))
        }
        None => None,
    };
    let v6 = match config.ipv6_network {
        Some(_) => {
            let taken = blocking.iter().filter_map(|k| k.ipv6()).map(v6_span);
            let range = Range::v6(config);
            let start = range.pick(taken, rng)?;
            Some(Ipv6Network::new(Ipv6Addr::from(start), config.ipv6_subnet_len).expect("len"))
        }
        None => None,
    };
    let key = SubnetKey::new(v4, v6).expect("the config enables at least one family");
    Ok(Plan {
        incompatible,
        superseded: Vec::new(),
        choice: Choice::Fresh(key),
    })
}

/// Whether `lease` carries our identity: PublicIP, or PublicIPv6 when the config is IPv6-only.
/// Whether a lease is ours. flannel's identity is PublicIP for an IPv4 network and PublicIPv6
/// for an IPv6-only one; a host without the address of that family (an IPv4 overlay over an
/// IPv6-only underlay) is known by the address it has.
pub(crate) fn is_ours(config: &NetworkConfig, ours: &LeaseAttrs, lease: &Lease) -> bool {
    let by_v4 = ours.public_ip.is_some() && lease.attrs.public_ip == ours.public_ip;
    let by_v6 = ours.public_ipv6.is_some() && lease.attrs.public_ipv6 == ours.public_ipv6;
    match (
        config.network.is_some(),
        ours.public_ip.is_some(),
        ours.public_ipv6.is_some(),
    ) {
        (true, true, _) => by_v4,
        (false, _, true) => by_v6,
        (_, true, false) => by_v4,
        (_, false, true) => by_v6,
        (_, false, false) => false,
    }
}

/// Inclusive address span of a subnet, widened to u128.
type Span = (u128, u128);

fn v4_span(net: Ipv4Network) -> Span {
    let start = u128::from(u32::from(net.network()));
    (
        start,
        start + ((1u128 << (32 - u32::from(net.prefix()))) - 1),
    )
}

fn v6_span(net: Ipv6Network) -> Span {
    let start = u128::from(net.network());
    let host_bits = 128 - u32::from(net.prefix());
    let last = if host_bits == 128 {
        u128::MAX
    } else {
        start | ((1u128 << host_bits) - 1)
    };
    (start, last)
}

/// The candidate subnets of one family: starts `min, min+size, …, max`.
struct Range {
    min: u128,
    max: u128,
    size: u128,
    len: u8,
    fmt: fn(u128) -> String,
}

impl Range {
    fn v4(c: &NetworkConfig) -> Range {
        Range {
            min: u128::from(u32::from(c.subnet_min)),
            max: u128::from(u32::from(c.subnet_max)),
            size: 1u128 << (32 - u32::from(c.subnet_len)),
            len: c.subnet_len,
            fmt: |a| Ipv4Addr::from(a as u32).to_string(),
        }
    }

    fn v6(c: &NetworkConfig) -> Range {
        Range {
            min: u128::from(c.ipv6_subnet_min),
            max: u128::from(c.ipv6_subnet_max),
            // The config caps IPv6SubnetLen at 126, so the shift never reaches 128.
            size: 1u128 << (128 - u32::from(c.ipv6_subnet_len)),
            len: c.ipv6_subnet_len,
            fmt: |a| Ipv6Addr::from(a).to_string(),
        }
    }

    /// The first [`CANDIDATES`] free starts, walking up from `min`. Runs of leased space are
    /// skipped in one step, so a large leftover lease costs nothing.
    fn free(&self, taken: impl Iterator<Item = Span>) -> Vec<u128> {
        let mut spans: Vec<Span> = taken.collect();
        spans.sort_unstable();
        let mut free = Vec::with_capacity(CANDIDATES);
        let mut spans = spans.into_iter().peekable();
        let mut at = self.min;
        while at <= self.max && free.len() < CANDIDATES {
            let end = at + (self.size - 1);
            // Spans entirely below the candidate can never matter again.
            while spans.next_if(|s| s.1 < at).is_some() {}
            match spans.peek() {
                Some(&(start, last)) if start <= end => {
                    // Overlap: jump to the first aligned start after this span.
                    let Some(next) = last.checked_add(1) else {
                        break;
                    };
                    let Some(aligned) = next.checked_next_multiple_of(self.size) else {
                        break;
                    };
                    at = aligned.max(at.saturating_add(self.size));
                }
                _ => {
                    free.push(at);
                    let Some(next) = at.checked_add(self.size) else {
                        break;
                    };
                    at = next;
                }
            }
        }
        free
    }

    fn pick(
        &self,
        taken: impl Iterator<Item = Span>,
        rng: &mut impl Rng,
    ) -> Result<u128, AllocError> {
        let free = self.free(taken);
        if free.is_empty() {
            return Err(AllocError::Exhausted {
                min: (self.fmt)(self.min),
                max: (self.fmt)(self.max),
                len: self.len,
                total: (self.max - self.min) / self.size + 1,
            });
        }
        Ok(free[rng.random_range(0..free.len())])
    }
}

#[cfg(test)]
mod test {
    use std::time::{Duration, SystemTime};

    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    fn config(json: &str) -> NetworkConfig {
        NetworkConfig::from_json(json).unwrap()
    }

    fn key(s: &str) -> SubnetKey {
        SubnetKey::parse(s).unwrap()
    }

    fn attrs(ip: &str) -> LeaseAttrs {
        LeaseAttrs::with_public_ip(ip.parse().unwrap())
    }

    fn lease(k: &str, ip: &str) -> Lease {
        Lease {
            key: key(k),
            attrs: attrs(ip),
            expiration: Some(SystemTime::now() + Duration::from_secs(3600)),
            lease_id: None,
        }
    }

    fn run(
        cfg: &NetworkConfig,
        leases: &[Lease],
        ours: &LeaseAttrs,
        previous: Option<SubnetKey>,
    ) -> Result<Plan, AllocError> {
        let mut rng = StdRng::seed_from_u64(7);
        plan(
            &Request {
                config: cfg,
                leases,
                ours,
                previous,
                also_taken: &[],
            },
            &mut rng,
        )
    }

    const NET: &str = r#"{"Network":"198.19.0.0/16"}"#;

    #[test]
    fn fresh_lease_falls_in_range() {
        // flannel's AcquireLease: "the lease falls in range".
        let cfg = config(NET);
        for seed in 0..50 {
            let mut rng = StdRng::seed_from_u64(seed);
            let ours = attrs("198.18.1.1");
            let req = Request {
                config: &cfg,
                leases: &[],
                ours: &ours,
                previous: None,
                also_taken: &[],
            };
            let p = plan(&req, &mut rng).unwrap();
            let Choice::Fresh(k) = p.choice else {
                panic!("{p:?}")
            };
            assert!(is_compatible(&cfg, &k), "{k}");
            // Among the first 100 free: 198.19.1.0 … 198.19.100.0.
            assert!(
                k.ipv4().unwrap().network() <= Ipv4Addr::new(198, 19, 100, 0),
                "{k}"
            );
        }
    }

    #[test]
    fn same_rng_same_choice() {
        let cfg = config(NET);
        let a = run(&cfg, &[], &attrs("198.18.1.1"), None).unwrap();
        let b = run(&cfg, &[], &attrs("198.18.1.1"), None).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn own_lease_by_public_ip_is_reused() {
        // flannel: "acquiring again with the same PublicIP reuses the subnet".
        let cfg = config(NET);
        let leases = [
            lease("198.19.7.0-24", "198.18.1.2"),
            lease("198.19.9.0-24", "198.18.1.1"),
        ];
        let p = run(
            &cfg,
            &leases,
            &attrs("198.18.1.1"),
            Some(key("198.19.3.0-24")),
        )
        .unwrap();
        assert_eq!(p.choice, Choice::Reuse(leases[1].clone()));
        assert!(p.incompatible.is_empty());
    }

    #[test]
    fn reservation_is_reused_as_is() {
        let cfg = config(NET);
        let mut reserved = lease("198.19.42.0-24", "198.18.1.1");
        reserved.expiration = None;
        let dynamic = lease("198.19.9.0-24", "198.18.1.1");
        let p = run(
            &cfg,
            &[dynamic.clone(), reserved.clone()],
            &attrs("198.18.1.1"),
            None,
        )
        .unwrap();
        assert_eq!(p.choice, Choice::Reuse(reserved));
        // The dynamic lease it supersedes is given up; another host's is not.
        assert_eq!(p.superseded, vec![dynamic.clone()]);
        let theirs = lease("198.19.10.0-24", "198.18.1.2");
        let p = run(&cfg, &[dynamic.clone(), theirs], &attrs("198.18.1.1"), None).unwrap();
        assert_eq!(p.choice, Choice::Reuse(dynamic));
        assert!(p.superseded.is_empty(), "{p:?}");
    }

    /// Of two dynamic leases naming this host's address (its own, rewritten when it followed
    /// a new address, and one another host had for that address), the previous subnet's is
    /// kept wherever it lies in the list; without a previous subnet among them, the first.
    /// The other is left alone: its writer may be alive.
    #[test]
    fn of_two_dynamic_leases_naming_us_the_previous_subnet_is_kept() {
        let cfg = config(NET);
        let (first, second) = (
            lease("198.19.3.0-24", "198.18.1.1"),
            lease("198.19.9.0-24", "198.18.1.1"),
        );
        let both = [first.clone(), second.clone()];
        for (previous, kept) in [
            (Some(second.key), &second),
            (Some(first.key), &first),
            (Some(key("198.19.200.0-24")), &first),
            (None, &first),
        ] {
            let p = run(&cfg, &both, &attrs("198.18.1.1"), previous).unwrap();
            assert_eq!(p.choice, Choice::Reuse(kept.clone()), "{previous:?}");
            assert!(p.superseded.is_empty(), "{p:?}");
        }
        // A reservation still wins over the previous subnet's lease, in either order.
        let mut reserved = lease("198.19.42.0-24", "198.18.1.1");
        reserved.expiration = None;
        for leases in [
            [second.clone(), reserved.clone()],
            [reserved.clone(), second.clone()],
        ] {
            let p = run(&cfg, &leases, &attrs("198.18.1.1"), Some(second.key)).unwrap();
            assert_eq!(p.choice, Choice::Reuse(reserved.clone()));
            assert_eq!(p.superseded, vec![second.clone()]);
        }
    }

    #[test]
    fn incompatible_own_lease_is_deleted_after_config_change() {
        // flannel's ConfigChanged: the old lease is dropped and the new one is valid.
        let cfg = config(r#"{"Network":"198.19.0.0/16","SubnetLen":25}"#);
        let old = lease("198.19.9.0-24", "198.18.1.1");
        let p = run(
            &cfg,
            std::slice::from_ref(&old),
            &attrs("198.18.1.1"),
            Some(key("198.19.9.0-24")),
        )
        .unwrap();
        assert_eq!(p.incompatible, vec![old]);
        let Choice::Fresh(k) = p.choice else {
            panic!("{p:?}")
        };
        assert!(is_compatible(&cfg, &k) && k.ipv4().unwrap().prefix() == 25);
    }

    #[test]
    fn incompatible_own_lease_does_not_block_its_space() {
        // A /24 left over from an older config overlaps /25 candidates; once we delete it,
        // its space is free again, so the previous /25 inside it may be taken.
        let cfg = config(r#"{"Network":"198.19.0.0/16","SubnetLen":25}"#);
        let old = lease("198.19.9.0-24", "198.18.1.1");
        let p = run(
            &cfg,
            &[old],
            &attrs("198.18.1.1"),
            Some(key("198.19.9.128-25")),
        )
        .unwrap();
        assert_eq!(p.choice, Choice::Previous(key("198.19.9.128-25")));
    }

    #[test]
    fn free_previous_subnet_is_used() {
        // flannel: "a previous subnet from the file is used when it is free and valid".
        let cfg = config(NET);
        let p = run(
            &cfg,
            &[],
            &attrs("198.18.1.1"),
            Some(key("198.19.200.0-24")),
        )
        .unwrap();
        assert_eq!(p.choice, Choice::Previous(key("198.19.200.0-24")));
    }

    #[test]
    fn previous_subnet_outside_the_network_is_ignored() {
        // flannel: "a previous subnet outside the network is ignored".
        let cfg = config(NET);
        for prev in ["10.3.4.0-24", "198.19.0.0-24", "198.19.4.0-25"] {
            let p = run(&cfg, &[], &attrs("198.18.1.1"), Some(key(prev))).unwrap();
            assert!(matches!(p.choice, Choice::Fresh(_)), "{prev}: {p:?}");
        }
    }

    #[test]
    fn previous_subnet_held_by_another_host_is_not_taken() {
        // flannel #1289: never overwrite another host's lease.
        let cfg = config(NET);
        let other = lease("198.19.5.0-24", "198.18.1.9");
        let p = run(
            &cfg,
            &[other],
            &attrs("198.18.1.1"),
            Some(key("198.19.5.0-24")),
        )
        .unwrap();
        let Choice::Fresh(k) = p.choice else {
            panic!("{p:?}")
        };
        assert_ne!(k, key("198.19.5.0-24"));
        // Also blocked by an overlapping lease of another size.
        let wide = lease("198.19.4.0-23", "198.18.1.9");
        let p = run(
            &cfg,
            &[wide],
            &attrs("198.18.1.1"),
            Some(key("198.19.5.0-24")),
        )
        .unwrap();
        assert!(matches!(p.choice, Choice::Fresh(_)), "{p:?}");
    }

    #[test]
    fn previous_subnet_lost_in_a_race_is_skipped() {
        let cfg = config(NET);
        let prev = key("198.19.5.0-24");
        let mut rng = StdRng::seed_from_u64(1);
        let ours = attrs("198.18.1.1");
        let p = plan(
            &Request {
                config: &cfg,
                leases: &[],
                ours: &ours,
                previous: Some(prev),
                also_taken: &[prev],
            },
            &mut rng,
        )
        .unwrap();
        assert!(matches!(p.choice, Choice::Fresh(k) if k != prev), "{p:?}");
    }

    #[test]
    fn leased_and_overlapping_subnets_are_never_picked() {
        // SubnetMin..SubnetMax holds 4 /28s; three are taken (one by a wider /27).
        let cfg = config(
            r#"{"Network":"10.3.0.0/16","SubnetMin":"10.3.5.0","SubnetMax":"10.3.5.48","SubnetLen":28}"#,
        );
        let leases = [
            lease("10.3.5.0-27", "198.18.1.2"),
            lease("10.3.5.48-28", "198.18.1.3"),
        ];
        for seed in 0..20 {
            let mut rng = StdRng::seed_from_u64(seed);
            let ours = attrs("198.18.1.1");
            let p = plan(
                &Request {
                    config: &cfg,
                    leases: &leases,
                    ours: &ours,
                    previous: None,
                    also_taken: &[],
                },
                &mut rng,
            )
            .unwrap();
            assert_eq!(p.choice, Choice::Fresh(key("10.3.5.32-28")));
        }
    }

    #[test]
    fn picks_among_the_first_100_free() {
        let cfg = config(NET);
        // The first 50 are taken: candidates are .51 … .150.
        let leases: Vec<Lease> = (1..=50)
            .map(|i| lease(&format!("198.19.{i}.0-24"), "198.18.2.1"))
            .collect();
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..400 {
            let mut rng = StdRng::seed_from_u64(seed);
            let ours = attrs("198.18.1.1");
            let req = Request {
                config: &cfg,
                leases: &leases,
                ours: &ours,
                previous: None,
                also_taken: &[],
            };
            let k = plan(&req, &mut rng).unwrap().choice.key();
            seen.insert(k.ipv4().unwrap().network().octets()[2]);
        }
        assert!(seen.iter().all(|o| (51..=150).contains(o)), "{seen:?}");
        assert!(seen.len() > 80, "not spread out: {}", seen.len());
    }

    #[test]
    fn full_range_is_a_clear_error() {
        let cfg = config(NET);
        let leases: Vec<Lease> = (1..=255)
            .map(|i| lease(&format!("198.19.{i}.0-24"), "198.18.2.1"))
            .collect();
        let err = run(&cfg, &leases, &attrs("198.18.1.1"), None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no free subnet in 198.19.1.0 … 198.19.255.0 (/24): all 255 are leased; widen \
             Network or SubnetMin/SubnetMax, or release leases with `linen lease release`"
        );
        // One stale /8 covering everything is as full.
        let err = run(
            &cfg,
            &[lease("198.0.0.0-8", "198.18.2.1")],
            &attrs("198.18.1.1"),
            None,
        )
        .unwrap_err();
        assert!(matches!(err, AllocError::Exhausted { total: 255, .. }));
    }

    #[test]
    fn dual_stack_picks_both_families_independently() {
        let cfg = config(
            r#"{"Network":"198.19.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:198:19::/48"}"#,
        );
        let leases = [lease("198.19.1.0-24&fd00:198:19:2::-64", "198.18.1.2")];
        let mut ours = attrs("198.18.1.1");
        ours.public_ipv6 = Some("fd00::1".parse().unwrap());
        let p = run(&cfg, &leases, &ours, None).unwrap();
        let k = p.choice.key();
        assert!(is_compatible(&cfg, &k), "{k}");
        assert!(!k.overlaps(&leases[0].key), "{k}");
        // A v4-only previous key does not fit a dual-stack config.
        assert!(!is_compatible(&cfg, &key("198.19.9.0-24")));
        assert!(k.to_string().contains('&'));
    }

    #[test]
    fn ipv6_only_matches_by_public_ipv6() {
        let cfg =
            config(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:198:19::/48"}"#);
        let mut mine = lease("0.0.0.0-0&fd00:198:19:7::-64", "198.18.1.1");
        mine.attrs = LeaseAttrs {
            public_ipv6: Some("fd00::1".parse().unwrap()),
            ..LeaseAttrs::default()
        };
        let ours = mine.attrs.clone();
        let p = run(&cfg, std::slice::from_ref(&mine), &ours, None).unwrap();
        assert_eq!(p.choice, Choice::Reuse(mine));
        let err = run(&cfg, &[], &attrs("198.18.1.1"), None).unwrap_err();
        assert!(err.to_string().contains("PublicIPv6"), "{err}");
    }

    #[test]
    fn ipv6_exhaustion_names_the_range() {
        let cfg = config(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/120","IPv6SubnetLen":122}"#,
        );
        let mut l = lease("0.0.0.0-0&fd00::-120", "198.18.1.9");
        l.attrs.public_ipv6 = Some("fd00::9".parse().unwrap());
        let ours = LeaseAttrs {
            public_ipv6: Some("fd00::1".parse().unwrap()),
            ..LeaseAttrs::default()
        };
        let err = run(&cfg, &[l], &ours, None).unwrap_err();
        assert_eq!(
            err,
            AllocError::Exhausted {
                min: "fd00::40".into(),
                max: "fd00::c0".into(),
                len: 122,
                total: 3
            }
        );
    }
}
