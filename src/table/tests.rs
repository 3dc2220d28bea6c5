//! Tests of the table as a whole: fixed cases written out by hand, a property test of every
//! longest-prefix-match design and of the sender index against naive linear-scan references, and
//! the publish/load handoff under concurrent readers. The references below use only std and
//! their own bit arithmetic, never the code under test.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};

use super::alt::{Flat, Rng, SortedVec, StdHashMap, V4Lpm};
use super::{Entry, LocalSubnets, Route, Snapshot, Table};

fn net(s: &str) -> IpNetwork {
    s.parse().unwrap()
}

fn sock(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn route(subnet: &str, next_hop: &str) -> Route {
    Route {
        subnet: net(subnet),
        next_hop: sock(next_hop),
    }
}

fn local(v4: Option<&str>, v6: Option<&str>) -> LocalSubnets {
    LocalSubnets {
        v4: v4.map(|s| s.parse().unwrap()),
        v6: v6.map(|s| s.parse().unwrap()),
    }
}

/// The next hop found for `dst`, as a string, or "miss".
fn hop(s: &Snapshot, dst: &str) -> String {
    s.lookup(ip(dst))
        .map_or_else(|| "miss".to_string(), |e| e.next_hop.to_string())
}

// ---------------------------------------------------------------- fixed cases

fn flannel_like() -> Snapshot {
    Snapshot::build(
        local(Some("10.244.1.0/24"), Some("fd00:1:1::/64")),
        [
            route("10.244.2.0/24", "198.18.0.2:8285"),
            route("10.244.3.0/24", "198.18.0.3:8285"),
            route("fd00:1:2::/64", "198.18.0.2:8285"),
            route("fd00:1:4::/64", "[fd00::4]:8285"),
            route("10.244.4.0/24", "[fd00::4]:8285"),
        ],
        7,
    )
}

#[test]
fn lookup_finds_each_peer_whatever_the_underlay_family() {
    let s = flannel_like();
    assert_eq!(hop(&s, "10.244.2.9"), "198.18.0.2:8285");
    assert_eq!(hop(&s, "10.244.3.255"), "198.18.0.3:8285");
    assert_eq!(hop(&s, "10.244.4.0"), "[fd00::4]:8285");
    assert_eq!(hop(&s, "fd00:1:2::77"), "198.18.0.2:8285");
    assert_eq!(hop(&s, "fd00:1:4:0:ffff:ffff:ffff:ffff"), "[fd00::4]:8285");
    assert_eq!(hop(&s, "10.244.5.1"), "miss");
    assert_eq!(hop(&s, "fd00:1:3::1"), "miss");
    assert_eq!(hop(&s, "198.18.0.2"), "miss");
    assert_eq!(
        s.lookup_v4(Ipv4Addr::new(10, 244, 2, 1)).map(|e| e.subnet),
        Some(net("10.244.2.0/24"))
    );
    assert_eq!(s.len(), 5);
    assert!(!s.is_empty());
    assert_eq!(s.generation(), 7);
}

#[test]
fn local_subnet_is_never_routed_to_a_peer() {
    let s = Snapshot::build(
        local(Some("10.244.1.0/24"), Some("fd00:1:1::/64")),
        [
            route("10.244.1.0/24", "198.18.0.9:8285"), // equal to ours
            route("10.244.1.128/25", "198.18.0.9:8285"), // inside ours
            route("fd00:1:1::/64", "198.18.0.9:8285"), // equal to ours
            route("10.0.0.0/8", "198.18.0.8:8285"),    // contains ours: kept
        ],
        1,
    );
    assert_eq!(s.excluded(), 3);
    assert_eq!(s.len(), 1);
    assert_eq!(hop(&s, "10.244.1.200"), "miss");
    assert_eq!(hop(&s, "fd00:1:1::1"), "miss");
    assert_eq!(hop(&s, "10.244.2.1"), "198.18.0.8:8285");
    assert!(!s.is_known_sender(ip("198.18.0.9")));
    assert!(s.is_local(ip("10.244.1.0")));
    assert!(s.is_local(ip("10.244.1.255")));
    assert!(!s.is_local(ip("10.244.2.0")));
    assert!(s.is_local(ip("fd00:1:1::ffff")));
    assert!(!s.is_local(ip("fd00:1:2::")));
    // A v4 address never matches the v6 subnet and vice versa.
    assert!(!s.is_local(ip("::a0f4:100")));
}

#[test]
fn no_local_subnet_means_nothing_is_local() {
    let s = Snapshot::build(
        LocalSubnets::default(),
        [route("0.0.0.0/0", "1.2.3.4:1")],
        0,
    );
    for a in ["0.0.0.0", "1.0.0.0", "255.255.255.255", "::", "::1"] {
        assert!(!s.is_local(ip(a)), "{a}");
    }
    assert_eq!(hop(&s, "0.0.0.1"), "1.2.3.4:1");
    assert_eq!(hop(&s, "::1"), "miss");
}

#[test]
fn subnets_and_local_are_normalised() {
    let s = Snapshot::build(
        local(Some("10.244.1.77/24"), None),
        [route("10.244.2.7/24", "198.18.0.2:8285")],
        0,
    );
    assert_eq!(s.entries()[0].subnet, net("10.244.2.0/24"));
    assert_eq!(s.local().v4, Some("10.244.1.0/24".parse().unwrap()));
    assert_eq!(hop(&s, "10.244.2.200"), "198.18.0.2:8285");
}

#[test]
fn duplicate_subnet_last_one_wins() {
    let s = Snapshot::build(
        LocalSubnets::default(),
        [
            route("10.1.0.0/16", "198.18.0.1:1"),
            route("10.2.0.0/16", "198.18.0.2:1"),
            route("10.1.0.0/16", "198.18.0.3:1"),
            route("10.1.9.9/16", "198.18.0.4:1"),
        ],
        0,
    );
    assert_eq!(s.len(), 2);
    assert_eq!(hop(&s, "10.1.0.1"), "198.18.0.4:1");
    // The overridden next hops own nothing any more.
    assert!(!s.is_known_sender(ip("198.18.0.1")));
    assert!(!s.is_known_sender(ip("198.18.0.3")));
    assert!(s.sender_owns(ip("198.18.0.4"), ip("10.1.255.255")));
}

#[test]
fn entries_are_ordered_v4_first_by_address_then_length() {
    let s = Snapshot::build(
        LocalSubnets::default(),
        [
            route("fd00::/8", "1.1.1.1:1"),
            route("10.2.0.0/16", "1.1.1.1:1"),
            route("10.0.0.0/8", "1.1.1.1:1"),
            route("10.0.0.0/16", "1.1.1.1:1"),
            route("::/0", "1.1.1.1:1"),
        ],
        0,
    );
    let order: Vec<String> = s.iter().map(|e| e.subnet.to_string()).collect();
    assert_eq!(
        order,
        [
            "10.0.0.0/8",
            "10.0.0.0/16",
            "10.2.0.0/16",
            "::/0",
            "fd00::/8"
        ]
    );
    assert_eq!((&s).into_iter().count(), 5);
}

#[test]
fn sender_checks_ignore_port_and_read_mapped_v6_as_v4() {
    let s = flannel_like();
    // Port differs from the route's (NAT): still the same sender.
    assert!(s.is_known_sender(ip("198.18.0.2")));
    assert!(s.is_known_sender(ip("::ffff:198.18.0.2")));
    assert!(s.sender_owns(ip("198.18.0.2"), ip("10.244.2.5")));
    assert!(s.sender_owns(ip("::ffff:198.18.0.2"), ip("10.244.2.5")));
    // One public address holding a v4 and a v6 subnet owns both.
    assert!(s.sender_owns(ip("198.18.0.2"), ip("fd00:1:2::5")));
    assert!(s.sender_owns(ip("fd00::4"), ip("10.244.4.1")));
    assert!(s.sender_owns(ip("fd00::4"), ip("fd00:1:4::1")));
    // Someone else's subnet, our subnet, nobody's subnet.
    assert!(!s.sender_owns(ip("198.18.0.2"), ip("10.244.3.5")));
    assert!(!s.sender_owns(ip("198.18.0.2"), ip("10.244.1.5")));
    assert!(!s.sender_owns(ip("198.18.0.2"), ip("192.0.2.1")));
    // Unknown senders, including a v6 address that merely ends in a known v4 one.
    assert!(!s.is_known_sender(ip("198.18.0.4")));
    assert!(!s.is_known_sender(ip("::198.18.0.2")));
    assert!(!s.sender_owns(ip("198.18.0.4"), ip("10.244.2.5")));
    assert!(!s.sender_owns(ip("::198.18.0.2"), ip("10.244.2.5")));
}

/// A peer whose key covers other subnets (a hand-written /16 beside flannel's /24s) owns only
/// what a packet to it would be routed by: neither a more specific peer's subnet nor ours.
/// Before, any covering route counted, and the /16's holder could send as both.
#[test]
fn a_covering_subnet_owns_only_what_it_is_routed() {
    let s = Snapshot::build(
        local(Some("10.244.1.0/24"), Some("fd00:1:1::/64")),
        [
            route("10.244.0.0/16", "198.18.0.9:8285"),
            route("10.244.2.0/24", "198.18.0.2:8285"),
            route("fd00:1::/32", "198.18.0.9:8285"),
        ],
        1,
    );
    assert!(s.sender_owns(ip("198.18.0.9"), ip("10.244.7.1")));
    assert!(s.sender_owns(ip("198.18.0.2"), ip("10.244.2.1")));
    assert!(!s.sender_owns(ip("198.18.0.9"), ip("10.244.2.1")));
    assert!(!s.sender_owns(ip("198.18.0.9"), ip("10.244.1.5")));
    assert!(s.sender_owns(ip("198.18.0.9"), ip("fd00:1:7::1")));
    assert!(!s.sender_owns(ip("198.18.0.9"), ip("fd00:1:1::5")));
}

#[test]
fn mapped_next_hop_is_indexed_as_v4() {
    let s = Snapshot::build(
        LocalSubnets::default(),
        [route("10.9.0.0/24", "[::ffff:198.18.0.9]:8285")],
        0,
    );
    assert!(s.sender_owns(ip("198.18.0.9"), ip("10.9.0.1")));
    assert!(s.sender_owns(ip("::ffff:198.18.0.9"), ip("10.9.0.1")));
}

#[test]
fn empty_snapshot_answers_no_to_everything() {
    let s = Snapshot::empty();
    assert_eq!(s.len(), 0);
    assert!(s.is_empty());
    assert_eq!(s.generation(), 0);
    assert_eq!(hop(&s, "10.0.0.1"), "miss");
    assert_eq!(hop(&s, "::"), "miss");
    assert!(!s.is_known_sender(ip("0.0.0.0")));
    assert!(!s.sender_owns(ip("::"), ip("::")));
    assert_eq!(s.local(), LocalSubnets::default());
}

#[test]
fn ten_thousand_leases_stay_well_under_a_megabyte() {
    let routes = (0..10_000u32).map(|i| Route {
        subnet: IpNetwork::V4(
            Ipv4Network::new(Ipv4Addr::from(0x0A00_0000 | (i << 8)), 24).unwrap(),
        ),
        next_hop: SocketAddr::from((Ipv4Addr::from(0xC612_0000 | i), 8285)),
    });
    let s = Snapshot::build(LocalSubnets::default(), routes, 1);
    assert_eq!(s.len(), 10_000);
    let bytes = std::mem::size_of::<Snapshot>() + s.heap_bytes();
    assert!(bytes < 900 * 1024, "{bytes} bytes");
    assert!(std::mem::size_of::<Entry>() <= 56);
}

// ---------------------------------------------------------------- property tests

/// `(width, bits)` of an address, the reference's own view.
fn bits(a: IpAddr) -> (u32, u128) {
    match a {
        IpAddr::V4(a) => (32, u128::from(u32::from_be_bytes(a.octets()))),
        IpAddr::V6(a) => (128, u128::from_be_bytes(a.octets())),
    }
}

/// Whether the top `len` bits of `a` and `b` (same family) agree.
fn same_top_bits(a: IpAddr, b: IpAddr, len: u8) -> bool {
    let ((wa, xa), (wb, xb)) = (bits(a), bits(b));
    if wa != wb {
        return false;
    }
    len == 0 || (xa ^ xb) >> (wa - u32::from(len)) == 0
}

fn ref_contains(net: IpNetwork, a: IpAddr) -> bool {
    same_top_bits(net.ip(), a, net.prefix())
}

/// Same subnet once host bits are ignored.
fn ref_same_subnet(x: IpNetwork, y: IpNetwork) -> bool {
    x.prefix() == y.prefix() && same_top_bits(x.ip(), y.ip(), x.prefix())
}

/// Whether `inner` is equal to or inside `outer`.
fn ref_inside(inner: IpNetwork, outer: IpNetwork) -> bool {
    inner.prefix() >= outer.prefix() && same_top_bits(inner.ip(), outer.ip(), outer.prefix())
}

fn ref_locals(l: &LocalSubnets) -> Vec<IpNetwork> {
    l.v4.map(IpNetwork::V4)
        .into_iter()
        .chain(l.v6.map(IpNetwork::V6))
        .collect()
}

/// The routes that survive build: not inside a local subnet, the last of each subnet.
/// Returns their indices in `routes`.
fn ref_surviving(l: &LocalSubnets, routes: &[Route]) -> Vec<usize> {
    let locals = ref_locals(l);
    let mut kept: Vec<usize> = Vec::new();
    for (i, r) in routes.iter().enumerate() {
        if locals.iter().any(|&o| ref_inside(r.subnet, o)) {
            continue;
        }
        kept.retain(|&k| !ref_same_subnet(routes[k].subnet, r.subnet));
        kept.push(i);
    }
    kept
}

/// Index into `routes` of the route a lookup of `dst` must return.
fn ref_lookup(l: &LocalSubnets, routes: &[Route], dst: IpAddr) -> Option<usize> {
    if ref_locals(l).iter().any(|&o| ref_contains(o, dst)) {
        return None;
    }
    ref_surviving(l, routes)
        .into_iter()
        .filter(|&i| ref_contains(routes[i].subnet, dst))
        .max_by_key(|&i| routes[i].subnet.prefix())
}

fn ref_canonical(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => {
            let o = v6.octets();
            if o[..10].iter().all(|&b| b == 0) && o[10] == 0xff && o[11] == 0xff {
                IpAddr::V4(Ipv4Addr::new(o[12], o[13], o[14], o[15]))
            } else {
                a
            }
        }
        IpAddr::V4(_) => a,
    }
}

fn ref_sender_owns(l: &LocalSubnets, routes: &[Route], sender: IpAddr, src: IpAddr) -> bool {
    ref_lookup(l, routes, src)
        .is_some_and(|i| ref_canonical(routes[i].next_hop.ip()) == ref_canonical(sender))
}

fn ref_known_sender(l: &LocalSubnets, routes: &[Route], sender: IpAddr) -> bool {
    ref_surviving(l, routes)
        .into_iter()
        .any(|i| ref_canonical(routes[i].next_hop.ip()) == ref_canonical(sender))
}

/// A base address from a small pool, so that random prefixes nest and overlap.
fn random_v4(rng: &mut Rng) -> u32 {
    let base = rng
        .pick(&[
            0x0A00_0000u32,
            0x0A01_0000,
            0x0AFF_FF00,
            0,
            0xFFFF_FFFF,
            0xC0A8_0100,
        ])
        .unwrap();
    base ^ (rng.next() as u32 & rng.pick(&[0, 0xFF, 0xFFFF, 0xFF_FFFF, u32::MAX]).unwrap())
}

fn random_v6(rng: &mut Rng) -> u128 {
    let base = rng
        .pick(&[0xfd00u128 << 112, (0xfd00_0001u128) << 96, 0, u128::MAX])
        .unwrap();
    let noise = (u128::from(rng.next()) << 64) | u128::from(rng.next());
    base ^ (noise
        & rng
            .pick(&[0, 0xFFFF, u128::from(u64::MAX), u128::MAX >> 8, u128::MAX])
            .unwrap())
}

fn random_v4_len(rng: &mut Rng) -> u8 {
    if rng.below(4) == 0 {
        rng.below(33) as u8
    } else {
        rng.pick(&[0, 1, 8, 16, 23, 24, 25, 31, 32]).unwrap()
    }
}

fn random_v6_len(rng: &mut Rng) -> u8 {
    if rng.below(4) == 0 {
        rng.below(129) as u8
    } else {
        rng.pick(&[0, 1, 8, 48, 64, 96, 127, 128]).unwrap()
    }
}

fn random_net(rng: &mut Rng, v6: bool) -> IpNetwork {
    if v6 {
        let len = random_v6_len(rng);
        IpNetwork::V6(Ipv6Network::new(Ipv6Addr::from(random_v6(rng)), len).unwrap())
    } else {
        let len = random_v4_len(rng);
        IpNetwork::V4(Ipv4Network::new(Ipv4Addr::from(random_v4(rng)), len).unwrap())
    }
}

/// Public addresses from a small pool so senders own several subnets; some are written as
/// IPv4-mapped IPv6.
fn random_next_hop(rng: &mut Rng) -> SocketAddr {
    let ip = match rng.below(4) {
        0 => ip("198.18.0.1"),
        1 => ip("198.18.0.2"),
        2 => ip("::ffff:198.18.0.2"),
        _ => ip("fd00::2"),
    };
    SocketAddr::new(ip, rng.below(3) as u16 + 8285)
}

/// Addresses to query: inside or at the edges of the routes' subnets, and anywhere.
fn probe_addrs(rng: &mut Rng, routes: &[Route], locals: &LocalSubnets) -> Vec<IpAddr> {
    let mut out = Vec::new();
    let nets: Vec<IpNetwork> = routes
        .iter()
        .map(|r| r.subnet)
        .chain(ref_locals(locals))
        .collect();
    for n in nets {
        let (width, x) = bits(n.ip());
        let host = if n.prefix() == 0 {
            u128::MAX
        } else {
            (1u128 << (width - u32::from(n.prefix())).min(127)) - 1
        };
        let host = if width == 32 {
            host & 0xFFFF_FFFF
        } else {
            host
        };
        let first = x & !host;
        let last = first | host;
        for v in [
            first,
            last,
            first.wrapping_sub(1),
            last.wrapping_add(1),
            first | (u128::from(rng.next()) & host),
        ] {
            out.push(if width == 32 {
                IpAddr::V4(Ipv4Addr::from(v as u32))
            } else {
                IpAddr::V6(Ipv6Addr::from(v))
            });
        }
    }
    for _ in 0..20 {
        out.push(IpAddr::V4(Ipv4Addr::from(random_v4(rng))));
        out.push(IpAddr::V6(Ipv6Addr::from(random_v6(rng))));
    }
    out
}

#[test]
fn lookup_and_sender_checks_match_linear_scan_reference() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for case in 0..400 {
        let n = rng.below(40) as usize;
        let routes: Vec<Route> = (0..n)
            .map(|_| {
                let v6 = rng.below(3) == 0;
                Route {
                    subnet: random_net(&mut rng, v6),
                    next_hop: random_next_hop(&mut rng),
                }
            })
            .collect();
        let locals = LocalSubnets {
            v4: (rng.below(2) == 0).then(|| {
                let len = random_v4_len(&mut rng);
                Ipv4Network::new(Ipv4Addr::from(random_v4(&mut rng)), len).unwrap()
            }),
            v6: (rng.below(2) == 0).then(|| {
                let len = random_v6_len(&mut rng);
                Ipv6Network::new(Ipv6Addr::from(random_v6(&mut rng)), len).unwrap()
            }),
        };
        let snap = Snapshot::build(locals, routes.clone(), case);
        assert_eq!(
            snap.len(),
            ref_surviving(&locals, &routes).len(),
            "case {case}"
        );

        let addrs = probe_addrs(&mut rng, &routes, &locals);
        for &dst in &addrs {
            let want = ref_lookup(&locals, &routes, dst).map(|i| routes[i]);
            let got = snap.lookup(dst);
            assert_eq!(
                got.map(|e| e.next_hop),
                want.map(|r| r.next_hop),
                "case {case}: lookup {dst} in {routes:?} local {locals:?}"
            );
            if let (Some(got), Some(want)) = (got, want) {
                assert!(ref_same_subnet(got.subnet, want.subnet), "case {case}");
                assert_eq!(got.subnet.ip(), {
                    let (w, x) = bits(want.subnet.ip());
                    let keep = if want.subnet.prefix() == 0 {
                        0
                    } else {
                        x >> (w - u32::from(want.subnet.prefix()))
                            << (w - u32::from(want.subnet.prefix()))
                    };
                    if w == 32 {
                        IpAddr::V4(Ipv4Addr::from(keep as u32))
                    } else {
                        IpAddr::V6(Ipv6Addr::from(keep))
                    }
                });
            }
            let local_want = ref_locals(&locals).iter().any(|&o| ref_contains(o, dst));
            assert_eq!(
                snap.is_local(dst),
                local_want,
                "case {case}: is_local {dst}"
            );
        }

        let senders = [
            ip("198.18.0.1"),
            ip("198.18.0.2"),
            ip("::ffff:198.18.0.1"),
            ip("::ffff:198.18.0.2"),
            ip("fd00::2"),
            ip("198.18.0.3"),
            ip("::198.18.0.2"),
        ];
        for &sender in &senders {
            assert_eq!(
                snap.is_known_sender(sender),
                ref_known_sender(&locals, &routes, sender),
                "case {case}: known {sender}"
            );
            for &src in addrs.iter().step_by(3) {
                assert_eq!(
                    snap.sender_owns(sender, src),
                    ref_sender_owns(&locals, &routes, sender, src),
                    "case {case}: {sender} owns {src}"
                );
            }
        }
    }
}

fn check_design<D: V4Lpm>() {
    let mut rng = Rng(0xDEAD_BEEF_CAFE_F00D);
    for case in 0..400 {
        let n = rng.below(60) as usize;
        let routes: Vec<Route> = (0..n)
            .map(|_| Route {
                subnet: random_net(&mut rng, false),
                next_hop: random_next_hop(&mut rng),
            })
            .collect();
        let design = D::build(routes.iter().enumerate().map(|(i, r)| match r.subnet {
            IpNetwork::V4(n) => (u32::from(n.ip()), n.prefix(), i as u32),
            IpNetwork::V6(_) => unreachable!("v4 only"),
        }));
        for dst in probe_addrs(&mut rng, &routes, &LocalSubnets::default()) {
            let IpAddr::V4(v4) = dst else { continue };
            let want = ref_lookup(&LocalSubnets::default(), &routes, dst);
            assert_eq!(
                design.get(u32::from(v4)).map(|i| i as usize),
                want,
                "{} case {case}: lookup {dst} in {routes:?}",
                D::NAME
            );
        }
    }
}

#[test]
fn flat_design_matches_reference() {
    check_design::<Flat>();
}

#[test]
fn sorted_vec_design_matches_reference() {
    check_design::<SortedVec>();
}

#[test]
fn hashmap_design_matches_reference() {
    check_design::<StdHashMap>();
}

// ---------------------------------------------------------------- publish / load

/// A snapshot whose every entry carries its generation in the next hop's port, with
/// `generation % 50 + 1` routes: a reader can tell whether what it sees belongs together.
fn stamped(generation: u64) -> Snapshot {
    let count = generation % 50 + 1;
    Snapshot::build(
        local(Some("10.0.0.0/24"), None),
        (1..=count).map(|i| Route {
            subnet: IpNetwork::V4(Ipv4Network::new(Ipv4Addr::new(10, 0, i as u8, 0), 24).unwrap()),
            next_hop: SocketAddr::from(([198, 18, 0, i as u8], generation as u16)),
        }),
        generation,
    )
}

#[test]
fn readers_see_consistent_snapshots_and_generations_never_go_back() {
    const LAST: u64 = 3000;
    let table = Table::new(stamped(0));
    let done = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(4));
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let mut reader = table.reader();
            let done = Arc::clone(&done);
            let start = Arc::clone(&start);
            std::thread::spawn(move || {
                start.wait();
                let mut last = 0;
                let mut seen = 0u64;
                loop {
                    let finished = done.load(Ordering::Acquire);
                    let s = reader.load();
                    let g = s.generation();
                    assert!(g >= last, "generation went back from {last} to {g}");
                    seen += u64::from(g != last);
                    last = g;
                    assert_eq!(s.len() as u64, g % 50 + 1);
                    for e in s.iter() {
                        assert_eq!(u64::from(e.next_hop.port()), g);
                    }
                    let e = s
                        .lookup_v4(Ipv4Addr::new(10, 0, 1, 1))
                        .expect("10.0.1.0/24");
                    assert_eq!(u64::from(e.next_hop.port()), g);
                    if finished {
                        assert_eq!(g, LAST, "a reader loading after the last publish sees it");
                        return seen;
                    }
                }
            })
        })
        .collect();
    start.wait();
    for g in 1..=LAST {
        table.publish(stamped(g));
    }
    done.store(true, Ordering::Release);
    for r in readers {
        let seen = r.join().unwrap();
        assert!(seen >= 1, "reader saw no new generation");
    }
}

#[test]
fn old_snapshots_are_freed_once_readers_move_on() {
    let table = Table::new(stamped(1));
    let mut reader = table.reader();
    assert_eq!(reader.load().generation(), 1);
    let first = Arc::downgrade(&table.load_full());

    table.publish(stamped(2));
    // The reader still caches generation 1 until its next load.
    assert!(first.upgrade().is_some());
    assert_eq!(reader.load().generation(), 2);
    assert!(first.upgrade().is_none(), "generation 1 still alive");

    let second = Arc::downgrade(&table.load_full());
    let held = table.load_full();
    table.publish(stamped(3));
    assert_eq!(reader.load().generation(), 3);
    // Someone holding an Arc keeps it alive, and only that.
    assert!(second.upgrade().is_some());
    drop(held);
    assert!(second.upgrade().is_none(), "generation 2 still alive");
}

#[test]
fn clones_of_a_table_share_one_slot() {
    let table = Table::default();
    let other = table.clone();
    let mut reader = other.reader();
    assert_eq!(reader.load().generation(), 0);
    table.publish(stamped(5));
    assert_eq!(reader.load().generation(), 5);
    assert_eq!(other.load_full().generation(), 5);
}
