//! `Snapshot`: one immutable forwarding table built from plain [`Route`]s — the longest-prefix
//! match from an inner destination to a peer's UDP address, the sender index that ingress uses to
//! check who may send what, and this host's own subnets. Built whole by the control plane,
//! read by workers without allocation, locks or panics.
//!
//! Must not import tokio, `lease`, `model` or `daemon`: callers turn leases into [`Route`]s.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};

use super::flatmap::{FlatMap, Key};
use super::lpm::Lpm;

/// Routes [`Snapshot::build`] reads at most (entry indices are `u32`, one value is reserved).
pub const MAX_ROUTES: usize = u32::MAX as usize - 1;

/// A route as the control plane hands it in: packets for `subnet` go to `next_hop`.
///
/// The subnet may be IPv4 or IPv6 and the next hop either family too: the underlay family is
/// independent of the overlay family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Route {
    /// Overlay subnet leased by the peer (host bits are ignored).
    pub subnet: IpNetwork,
    /// The peer's public UDP address.
    pub next_hop: SocketAddr,
}

/// One forwarding entry of a [`Snapshot`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Entry {
    /// Overlay subnet, normalised to its network address (`10.1.2.0/24`, never `10.1.2.7/24`).
    pub subnet: IpNetwork,
    /// The peer's public UDP address.
    pub next_hop: SocketAddr,
}

/// This host's own subnets: addresses inside them are delivered locally, never to a peer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LocalSubnets {
    /// Our IPv4 lease, if any.
    pub v4: Option<Ipv4Network>,
    /// Our IPv6 lease, if any.
    pub v6: Option<Ipv6Network>,
}

/// A prefix test reduced to `addr & mask == base`; `NEVER` matches no address.
#[derive(Debug, Clone, Copy)]
struct Prefix<K> {
    base: K,
    mask: K,
}

impl<K: Key> Prefix<K> {
    /// `mask` is zero, so `addr & mask` is zero and never equals a base of one.
    fn never(one: K) -> Self {
        Prefix {
            base: one,
            mask: K::default(),
        }
    }

    fn new(addr: K, len: u8) -> Self {
        let mask = K::prefix_mask(len);
        Prefix {
            base: addr.and(mask),
            mask,
        }
    }

    #[inline]
    fn contains(&self, addr: K) -> bool {
        addr.and(self.mask) == self.base
    }
}

/// An immutable forwarding table; see the [module docs](super).
#[derive(Clone)]
pub struct Snapshot {
    generation: u64,
    local: LocalSubnets,
    local_v4: Prefix<u32>,
    local_v6: Prefix<u128>,
    /// Sorted by (family, network address, prefix length); unique subnets.
    entries: Box<[Entry]>,
    lpm_v4: Lpm<u32>,
    lpm_v6: Lpm<u128>,
    /// Canonical public IPv4 of every next hop (the values are unused).
    senders_v4: FlatMap<u32>,
    /// Public IPv6 of every next hop (the values are unused).
    senders_v6: FlatMap<u128>,
    excluded: usize,
    /// The addresses datagrams to peers leave from, by the peer's family (`None`: the kernel's
    /// choice).
    sources: (Option<Ipv4Addr>, Option<Ipv6Addr>),
}

/// The subnet with its host bits cleared.
fn normalise(net: IpNetwork) -> IpNetwork {
    match net {
        IpNetwork::V4(n) => Ipv4Network::new(n.network(), n.prefix()).map_or(net, IpNetwork::V4),
        IpNetwork::V6(n) => Ipv6Network::new(n.network(), n.prefix()).map_or(net, IpNetwork::V6),
    }
}

/// The IP a sender is known by: IPv4-mapped IPv6 (`::ffff:a.b.c.d`) becomes IPv4.
#[inline]
fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// The IPv4 entries as `(network, length, index into entries)`.
fn v4_prefixes(entries: &[Entry]) -> impl Iterator<Item = (u32, u8, u32)> + '_ {
    entries
        .iter()
        .enumerate()
        .filter_map(|(i, e)| match e.subnet {
            IpNetwork::V4(n) => Some((u32::from(n.network()), n.prefix(), i as u32)),
            IpNetwork::V6(_) => None,
        })
}

impl Snapshot {
    /// Builds a snapshot from `routes`.
    ///
    /// - Subnets are normalised to their network address.
    /// - Several routes for the same subnet: the last one wins.
    /// - A route equal to or inside one of `local`'s subnets is excluded (counted in
    ///   [`excluded`](Self::excluded)): our own addresses are never routed to a peer.
    /// - At most [`MAX_ROUTES`] routes are read; any beyond are ignored.
    ///
    /// `generation` is carried for status output and for readers to order snapshots.
    pub fn build(
        local: LocalSubnets,
        routes: impl IntoIterator<Item = Route>,
        generation: u64,
    ) -> Snapshot {
        let local = LocalSubnets {
            v4: local
                .v4
                .and_then(|n| Ipv4Network::new(n.network(), n.prefix()).ok()),
            v6: local
                .v6
                .and_then(|n| Ipv6Network::new(n.network(), n.prefix()).ok()),
        };
        let local_v4 = local.v4.map_or(Prefix::never(1), |n| {
            Prefix::new(u32::from(n.network()), n.prefix())
        });
        let local_v6 = local.v6.map_or(Prefix::never(1), |n| {
            Prefix::new(u128::from(n.network()), n.prefix())
        });

        let mut excluded = 0;
        let all: Vec<Entry> = routes
            .into_iter()
            // Positions and entry indices are `u32`; no registry comes near this.
            .take(MAX_ROUTES)
            .map(|r| Entry {
                subnet: normalise(r.subnet),
                next_hop: r.next_hop,
            })
            .filter(|e| {
                let ours = match e.subnet {
                    IpNetwork::V4(n) => local.v4.is_some_and(|l| n.is_subnet_of(l)),
                    IpNetwork::V6(n) => local.v6.is_some_and(|l| n.is_subnet_of(l)),
                };
                excluded += usize::from(ours);
                !ours
            })
            .collect();
        // Sort by subnet with the input position as the last key, so of equal subnets the one
        // given last ends each run. Sorting packed integer keys (one `u128` per IPv4 route)
        // rather than the entries keeps a 10k-route build well inside its budget.
        let mut v4: Vec<u128> = Vec::with_capacity(all.len());
        let mut v6: Vec<(u128, u64)> = Vec::new();
        for (seq, e) in all.iter().enumerate() {
            match e.subnet {
                IpNetwork::V4(n) => v4.push(
                    u128::from(u32::from(n.network())) << 64
                        | u128::from(n.prefix()) << 32
                        | seq as u128,
                ),
                IpNetwork::V6(n) => v6.push((
                    u128::from(n.network()),
                    u64::from(n.prefix()) << 32 | seq as u64,
                )),
            }
        }
        v4.sort_unstable();
        v6.sort_unstable();
        // Each run of one subnet (same key above the position bits) keeps its last route.
        let v4_runs = v4
            .chunk_by(|a, b| a >> 32 == b >> 32)
            .filter_map(|r| r.last().copied());
        let v6_runs = v6
            .chunk_by(|a, b| a.0 == b.0 && a.1 >> 32 == b.1 >> 32)
            .filter_map(|r| r.last().map(|&(_, rest)| u128::from(rest)));
        let entries: Vec<Entry> = v4_runs
            .chain(v6_runs)
            .filter_map(|key| all.get(key as u32 as usize).copied())
            .collect();

        let lpm_v4 = Lpm::build(v4_prefixes(&entries));
        let lpm_v6 = Lpm::build(
            entries
                .iter()
                .enumerate()
                .filter_map(|(i, e)| match e.subnet {
                    IpNetwork::V6(n) => Some((u128::from(n.network()), n.prefix(), i as u32)),
                    IpNetwork::V4(_) => None,
                }),
        );

        debug_assert_eq!(lpm_v4.len() + lpm_v6.len(), entries.len());

        // Every sender's canonical IP (the port is ignored: NAT may change it).
        let senders_v4 = FlatMap::build(
            entries
                .iter()
                .filter_map(|e| match canonical(e.next_hop.ip()) {
                    IpAddr::V4(ip) => Some((u32::from(ip), 0)),
                    IpAddr::V6(_) => None,
                })
                .collect::<Vec<_>>()
                .into_iter(),
        );
        let senders_v6 = FlatMap::build(
            entries
                .iter()
                .filter_map(|e| match canonical(e.next_hop.ip()) {
                    IpAddr::V6(ip) => Some((u128::from(ip), 0)),
                    IpAddr::V4(_) => None,
                })
                .collect::<Vec<_>>()
                .into_iter(),
        );

        Snapshot {
            generation,
            local,
            local_v4,
            local_v6,
            entries: entries.into_boxed_slice(),
            lpm_v4,
            lpm_v6,
            senders_v4,
            senders_v6,
            excluded,
            sources: (None, None),
        }
    }

    /// This table with the source addresses datagrams leave from: `v4` towards IPv4 peers, `v6`
    /// towards IPv6 peers (`None`: the kernel's choice). They ride with the table so that a
    /// change of the host's address reaches every worker as the routes do.
    pub fn with_sources(mut self, v4: Option<Ipv4Addr>, v6: Option<Ipv6Addr>) -> Snapshot {
        self.sources = (v4, v6);
        self
    }

    /// The source addresses set by [`with_sources`](Self::with_sources).
    #[inline]
    pub fn sources(&self) -> (Option<Ipv4Addr>, Option<Ipv6Addr>) {
        self.sources
    }

    /// An empty table (no local subnet, no routes), generation 0: what workers see before the
    /// first lease arrives.
    pub fn empty() -> Snapshot {
        Snapshot::build(LocalSubnets::default(), [], 0)
    }

    /// The entry whose subnet is the longest prefix containing `dst`; `None` for a miss and for
    /// any address inside our own IPv4 subnet.
    #[inline]
    pub fn lookup_v4(&self, dst: Ipv4Addr) -> Option<&Entry> {
        let addr = u32::from(dst);
        if self.local_v4.contains(addr) {
            return None;
        }
        self.entries.get(self.lpm_v4.get(addr)? as usize)
    }

    /// The entry whose subnet is the longest prefix containing `dst`; `None` for a miss and for
    /// any address inside our own IPv6 subnet.
    #[inline]
    pub fn lookup_v6(&self, dst: Ipv6Addr) -> Option<&Entry> {
        let addr = u128::from(dst);
        if self.local_v6.contains(addr) {
            return None;
        }
        self.entries.get(self.lpm_v6.get(addr)? as usize)
    }

    /// [`lookup_v4`](Self::lookup_v4) or [`lookup_v6`](Self::lookup_v6) by family.
    #[inline]
    pub fn lookup(&self, dst: IpAddr) -> Option<&Entry> {
        match dst {
            IpAddr::V4(a) => self.lookup_v4(a),
            IpAddr::V6(a) => self.lookup_v6(a),
        }
    }

    /// Whether `addr` lies inside this host's own subnet of its family.
    #[inline]
    pub fn is_local(&self, addr: IpAddr) -> bool {
        match addr {
            IpAddr::V4(a) => self.local_v4.contains(u32::from(a)),
            IpAddr::V6(a) => self.local_v6.contains(u128::from(a)),
        }
    }

    /// Whether `sender` (a UDP source IP; the port is not looked at because NAT may rewrite it,
    /// and IPv4-mapped IPv6 is read as IPv4) is the public address of at least one route.
    #[inline]
    pub fn is_known_sender(&self, sender: IpAddr) -> bool {
        match canonical(sender) {
            IpAddr::V4(ip) => self.senders_v4.get(u32::from(ip)).is_some(),
            IpAddr::V6(ip) => self.senders_v6.get(u128::from(ip)).is_some(),
        }
    }

    /// Whether `sender` (as for [`is_known_sender`](Self::is_known_sender)) is where a packet
    /// to `inner_src` would go ([`lookup`](Self::lookup)): the ingress anti-spoofing check.
    /// The longest prefix decides, as on egress, so a peer whose subnet contains a more
    /// specific one of another peer (overlapping keys) cannot send as that peer, nor as this
    /// host's own subnet. Costs a lookup.
    #[inline]
    pub fn sender_owns(&self, sender: IpAddr, inner_src: IpAddr) -> bool {
        self.lookup(inner_src)
            .is_some_and(|e| canonical(e.next_hop.ip()) == canonical(sender))
    }

    /// Number of entries (distinct subnets routed to peers).
    #[inline]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no subnet is routed to a peer.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The generation given to [`build`](Self::build).
    #[inline]
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// This host's own subnets (normalised).
    #[inline]
    pub fn local(&self) -> LocalSubnets {
        self.local
    }

    /// Number of routes dropped at build because they were equal to or inside a local subnet.
    #[inline]
    pub fn excluded(&self) -> usize {
        self.excluded
    }

    /// All entries, IPv4 first, each family by network address then prefix length (for status
    /// output).
    #[inline]
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Iterator over [`entries`](Self::entries).
    #[inline]
    pub fn iter(&self) -> std::slice::Iter<'_, Entry> {
        self.entries.iter()
    }

    /// Approximate heap bytes held (entries, prefix maps, sender index).
    pub fn heap_bytes(&self) -> usize {
        std::mem::size_of_val::<[Entry]>(&self.entries)
            + self.lpm_v4.heap_bytes()
            + self.lpm_v6.heap_bytes()
            + self.senders_v4.heap_bytes()
            + self.senders_v6.heap_bytes()
    }

    /// IPv4 prefixes as `(network, length, entry index)`, for the designs compared in
    /// `benches/table.rs`.
    #[doc(hidden)]
    pub fn v4_prefixes(&self) -> impl Iterator<Item = (u32, u8, u32)> + '_ {
        v4_prefixes(&self.entries)
    }
}

impl Default for Snapshot {
    fn default() -> Self {
        Snapshot::empty()
    }
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("generation", &self.generation)
            .field("local", &self.local)
            .field("len", &self.entries.len())
            .field("excluded", &self.excluded)
            .finish_non_exhaustive()
    }
}

impl<'a> IntoIterator for &'a Snapshot {
    type Item = &'a Entry;
    type IntoIter = std::slice::Iter<'a, Entry>;
    fn into_iter(self) -> Self::IntoIter {
        self.entries.iter()
    }
}
