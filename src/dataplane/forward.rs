//! The sans-IO forwarding decisions: what happens to one packet, as a pure function of its
//! bytes, the table snapshot and the time. Threads, sockets and the TUN device only carry the
//! verdicts out (see `worker.rs`), so every rule here is unit-tested and fuzzed without root.
//!
//! Must not import tokio, `lease` or `daemon`.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use crate::table::Snapshot;
use crate::wire::{self, Icmpv4Error, Icmpv6Error, IpPacket};

use super::counters::DropReason;

/// Settings the decisions need; fixed for a worker's life. The TUN device's addresses (the
/// source of ICMP errors) are not among them: they are the network addresses of the
/// snapshot's local subnets, so they follow the lease when it moves.
#[derive(Clone, Copy, Debug)]
pub struct ForwardConfig {
    /// The overlay MTU: the largest inner packet that fits one UDP datagram on the underlay.
    pub mtu: usize,
    /// Accept datagrams from addresses that hold no lease (NAT). The inner source must still
    /// lie inside some leased subnet.
    pub accept_unknown_senders: bool,
}

/// What to do with a packet read from the TUN device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Egress {
    /// Send the (TTL-decremented) packet, `len` bytes, to this peer.
    Send {
        /// The peer's UDP address.
        peer: SocketAddr,
        /// Bytes of the packet (the buffer may be longer).
        len: usize,
    },
    /// Larger than the path to `peer` carries in one datagram (a hop on the underlay with a
    /// smaller MTU, see [`PathMtus`]): send the (TTL-decremented) packet in a datagram of its
    /// own, which the kernel fragments. When `icmp` is not 0, also write that many bytes of
    /// ICMP error from the ICMP buffer into the TUN: "fragmentation needed" (or "packet too
    /// big") with the path's MTU, so that the sender sends smaller packets from then on. The
    /// packet is sent all the same, so traffic whose sender never hears the error (a firewall
    /// dropping ICMP) still flows, fragmented.
    SendAlone {
        /// The peer's UDP address.
        peer: SocketAddr,
        /// Bytes of the packet.
        len: usize,
        /// Bytes of the ICMP error for the sender; 0 for none (not needed, or rate-limited).
        icmp: usize,
    },
    /// Write the ICMP error of `len` bytes, built into the ICMP buffer, back into the TUN.
    Icmp {
        /// Bytes of the ICMP error packet.
        len: usize,
        /// Why the packet was not forwarded.
        reason: DropReason,
    },
    /// Drop the packet and count it.
    Drop(DropReason),
}

/// What to do with a datagram received from a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ingress {
    /// Write the first `len` bytes to the TUN device.
    Deliver {
        /// Bytes of the inner packet.
        len: usize,
    },
    /// Drop it and count it.
    Drop(DropReason),
}

/// A token bucket for ICMP errors (per worker): `rate` per second, bursts of `burst`.
#[derive(Clone, Debug)]
pub struct IcmpLimiter {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Option<Instant>,
}

impl IcmpLimiter {
    /// A limiter allowing `rate` errors per second with bursts of up to `burst`.
    pub fn new(rate: u32, burst: u32) -> IcmpLimiter {
        IcmpLimiter {
            tokens: f64::from(burst),
            rate: f64::from(rate),
            burst: f64::from(burst),
            last: None,
        }
    }

    /// Refills the bucket up to time `now`; whether it holds a token (none is taken).
    pub fn ready(&mut self, now: Instant) -> bool {
        if let Some(last) = self.last {
            let dt = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        }
        self.last = Some(now);
        self.tokens >= 1.0
    }

    /// Takes the token [`ready`](Self::ready) found.
    pub fn take(&mut self) {
        self.tokens -= 1.0;
    }
}

impl Default for IcmpLimiter {
    /// 1000 errors per second, bursts of 100 (Linux's global limit, `icmp_msgs_per_sec`, is
    /// 1000 a second with bursts of 50; its per-destination `icmp_ratelimit` would not help
    /// here, where every error goes to this host).
    fn default() -> Self {
        IcmpLimiter::new(1000, 100)
    }
}

/// How long a learned path MTU is used: the kernel's own default for the MTUs it learns
/// (`net.ipv4.route.mtu_expires`, 10 minutes). A path that shrank further is learned again
/// from the next refused send; one that grew back is used in full after this.
pub const PATH_MTU_EXPIRY: Duration = Duration::from_secs(600);

/// How often a worker asks the kernel for one peer's path MTU at most; also how long an
/// answer that the path carries full-size datagrams is kept (only to not ask again sooner).
pub const PATH_MTU_ASK_INTERVAL: Duration = Duration::from_secs(1);

/// How many questions in passing ([`Asked::Alone`]) a worker asks per second at most, over
/// all peers: each costs a few system calls, and a host with hundreds of peers sends large
/// datagrams alone to many of them.
pub const PATH_MTU_PASSING_PER_SECOND: u32 = 16;

/// How many peers' path MTUs a worker remembers; a new one replaces the oldest. Enough for
/// two sites joined by a VPN with dozens of hosts behind it.
pub const PATH_MTU_SLOTS: usize = 64;

/// How many answers of "full size" (or of nothing: the peer unreachable) a worker keeps, each
/// for a second, so that the peer is not asked again sooner; apart from the MTUs, which they
/// never push out. Twice the questions in passing a second; a new one replaces the oldest.
pub const PATH_MTU_FULL_SIZE_SLOTS: usize = 2 * PATH_MTU_PASSING_PER_SECOND as usize;

/// The path MTUs a worker learned for peers whose underlay path carries less than the
/// overlay MTU plus the UDP encapsulation (a tunnel, a VPN or a smaller link between two
/// hosts), as inner packet sizes: the largest inner packet that crosses in one datagram.
/// The worker learns one when the kernel refuses a batch (the segments larger than the path
/// MTU it learned from the underlay's ICMP), and asks after sending a large datagram alone
/// (which the kernel fragments without a word); [`egress`] then sends larger packets alone
/// (fragmented, as before) and tells their senders the smaller MTU, as kernel tunnels do.
/// Fixed capacity: the packet path never allocates here.
#[derive(Clone, Debug)]
pub struct PathMtus {
    entries: Vec<PathMtu>,
    /// The smallest inner MTU among the entries; `usize::MAX` without any. A packet no longer
    /// than this needs no lookup.
    smallest: usize,
    /// When the oldest entry expires ([`expire`](Self::expire) is due).
    first_expiry: Option<Instant>,
    /// Questions in passing asked in the second that began at the instant.
    passing: (Option<Instant>, u32),
}

/// What made a worker ask for a peer's path MTU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Asked {
    /// The kernel refused a batch to the peer: its path MTU is likely smaller now.
    Refused,
    /// A large datagram went to the peer alone (maybe fragmented): asked in passing.
    Alone,
}

#[derive(Clone, Copy, Debug)]
struct PathMtu {
    peer: SocketAddr,
    asked: Asked,
    /// `None`: the kernel said the path carries full-size datagrams (kept so that the
    /// question is not asked again within a second).
    inner: Option<usize>,
    learned: Instant,
    /// When the kernel was last asked about this peer (a question that found nothing out
    /// leaves `inner` and `learned` as they were).
    asked_at: Instant,
}

impl PathMtu {
    /// Until when the entry counts: an MTU for [`PATH_MTU_EXPIRY`], "full size" until the
    /// question may be asked again.
    fn expiry(&self) -> Instant {
        self.learned
            + if self.inner.is_some() {
                PATH_MTU_EXPIRY
            } else {
                PATH_MTU_ASK_INTERVAL
            }
    }
}

impl Default for PathMtus {
    fn default() -> Self {
        PathMtus {
            entries: Vec::with_capacity(PATH_MTU_SLOTS + PATH_MTU_FULL_SIZE_SLOTS),
            smallest: usize::MAX,
            first_expiry: None,
            passing: (None, 0),
        }
    }
}

impl PathMtus {
    /// The largest inner packet the path to `peer` carries in one datagram, if learned and
    /// not expired.
    #[inline]
    pub fn get(&self, peer: SocketAddr, now: Instant) -> Option<usize> {
        self.entries
            .iter()
            .find(|e| e.peer == peer && now < e.expiry())
            .and_then(|e| e.inner)
    }

    /// Whether to ask the kernel for `peer`'s path MTU: not again within a second of the last
    /// answer (a burst of refused batches costs one question), except after a refusal when
    /// that answer was "full size" to a question asked in passing: the kernel may have
    /// learned a smaller MTU from the underlay's ICMP just after it (the first datagram too
    /// large for the path is the one that makes the kernel learn). Questions in passing also
    /// wait while this second's [`PATH_MTU_PASSING_PER_SECOND`] are used up.
    fn due(&self, peer: SocketAddr, now: Instant, asked: Asked) -> bool {
        if asked == Asked::Alone
            && let (Some(since), n) = self.passing
            && now.saturating_duration_since(since) < Duration::from_secs(1)
            && n >= PATH_MTU_PASSING_PER_SECOND
        {
            return false;
        }
        !self.entries.iter().any(|e| {
            e.peer == peer
                && now.saturating_duration_since(e.asked_at) < PATH_MTU_ASK_INTERVAL
                && !(asked == Asked::Refused && e.asked == Asked::Alone && e.inner.is_none())
        })
    }

    /// Whether to ask the kernel for `peer`'s path MTU now ([`due`](Self::due)); a yes is
    /// counted as asked (one in passing against this second's budget).
    pub fn ask(&mut self, peer: SocketAddr, now: Instant, asked: Asked) -> bool {
        if !self.due(peer, now, asked) {
            return false;
        }
        if asked == Asked::Alone {
            self.passing = match self.passing {
                (Some(since), n)
                    if now.saturating_duration_since(since) < Duration::from_secs(1) =>
                {
                    (Some(since), n + 1)
                }
                _ => (Some(now), 1),
            };
        }
        true
    }

    /// Records that a question about `peer` found nothing out (the peer unreachable for now):
    /// what was learned stays in use, and the question waits a second like any other (without
    /// an entry, as a "full size" answer).
    pub fn unanswered(&mut self, peer: SocketAddr, now: Instant, asked: Asked) {
        match self
            .entries
            .iter_mut()
            .find(|e| e.peer == peer && e.inner.is_some() && now < e.expiry())
        {
            Some(e) => e.asked_at = now,
            None => {
                self.learn(peer, None, now, asked);
            }
        }
    }

    /// Records that the path to `peer` carries inner packets of at most `inner` bytes, or with
    /// `None` that it carries full-size ones (or that the question found nothing out: asked
    /// again after a second, like any answer). Expired entries go first; when all slots of
    /// its kind are taken ([`PATH_MTU_SLOTS`], [`PATH_MTU_FULL_SIZE_SLOTS`]) the oldest of
    /// that kind makes room, so peers asked about in passing never push out what was learned.
    /// Returns whether this changes what was known of `peer` (a first learning, another
    /// value), for a log line.
    pub fn learn(
        &mut self,
        peer: SocketAddr,
        inner: Option<usize>,
        now: Instant,
        asked: Asked,
    ) -> bool {
        let before = self.get(peer, now);
        self.entries.retain(|e| e.peer != peer);
        self.expire(now);
        // MTUs and "full size" answers each have their own number of slots.
        let same_kind = |e: &PathMtu| e.inner.is_some() == inner.is_some();
        let slots = if inner.is_some() {
            PATH_MTU_SLOTS
        } else {
            PATH_MTU_FULL_SIZE_SLOTS
        };
        if self.entries.iter().filter(|e| same_kind(e)).count() >= slots
            && let Some(oldest) = (0..self.entries.len())
                .filter(|&i| same_kind(&self.entries[i]))
                .min_by_key(|&i| self.entries[i].learned)
        {
            self.entries.swap_remove(oldest);
        }
        self.entries.push(PathMtu {
            peer,
            asked,
            inner,
            learned: now,
            asked_at: now,
        });
        self.summarise();
        before != inner
    }

    /// Drops the entries that expired by `now`, so that packets are no longer compared with
    /// their MTUs. Cheap when nothing is due: the worker calls it once per batch.
    #[inline]
    pub fn expire(&mut self, now: Instant) {
        if self.first_expiry.is_some_and(|t| now >= t) {
            self.entries.retain(|e| now < e.expiry());
            self.summarise();
        }
    }

    fn summarise(&mut self) {
        self.smallest = self
            .entries
            .iter()
            .filter_map(|e| e.inner)
            .min()
            .unwrap_or(usize::MAX);
        self.first_expiry = self.entries.iter().map(PathMtu::expiry).min();
    }
}

/// Decides the fate of a packet read from the TUN device (design.md "Egress"):
/// header check, Time Exceeded for TTL ≤ 1, Net Unreachable on a table miss, Fragmentation
/// Needed / Packet Too Big when larger than the overlay MTU, otherwise TTL − 1 and send
/// (alone, and its sender told, when larger than the peer's learned path MTU: [`PathMtus`]).
///
/// `icmp_out` receives an ICMP error when the verdict is [`Egress::Icmp`]; it should hold at
/// least 1280 bytes.
// HOT PATH: no allocation, no lock, no logging.
pub fn egress(
    pkt: &mut [u8],
    snap: &Snapshot,
    cfg: &ForwardConfig,
    paths: &PathMtus,
    limiter: &mut IcmpLimiter,
    now: Instant,
    icmp_out: &mut [u8],
) -> Egress {
    let Ok(mut ip) = IpPacket::new_checked(&mut *pkt) else {
        return Egress::Drop(DropReason::Malformed);
    };
    let len = ip.packet_len();
    if ip.hop_limit() <= 1 {
        return icmp(
            ip.packet(),
            IcmpKind::TimeExceeded,
            snap,
            limiter,
            now,
            icmp_out,
            DropReason::TtlExceeded,
        );
    }
    let Some(entry) = snap.lookup(ip.dst_addr()) else {
        return icmp(
            ip.packet(),
            IcmpKind::Unreachable,
            snap,
            limiter,
            now,
            icmp_out,
            DropReason::NoRoute,
        );
    };
    let peer = entry.next_hop;
    if len > cfg.mtu {
        let may_fragment = match &ip {
            IpPacket::V4(v4) => !v4.dont_frag(),
            IpPacket::V6(_) => false,
        };
        if may_fragment {
            // We do not fragment inner packets; the kernel fragments before the TUN when the
            // TUN MTU is right, so this only happens with a misconfigured MTU.
            return Egress::Drop(DropReason::TooBig);
        }
        return icmp(
            ip.packet(),
            IcmpKind::TooBig(cfg.mtu),
            snap,
            limiter,
            now,
            icmp_out,
            DropReason::TooBig,
        );
    }
    // One comparison per packet while no path is smaller than this packet (always, when no
    // peer sits behind a smaller hop); the lookup and the rest are out of line.
    if len > paths.smallest
        && let Some(verdict) = too_big_for_path(&mut ip, peer, paths, snap, limiter, now, icmp_out)
    {
        return verdict;
    }
    ip.decrement_hop_limit();
    Egress::Send { peer, len }
}

/// A packet to `peer` larger than the path MTU learned for it ([`PathMtus`]): the
/// [`Egress::SendAlone`] verdict, or `None` when it fits after all (no entry for this peer, or
/// an expired one).
#[cold]
#[inline(never)]
fn too_big_for_path(
    ip: &mut IpPacket<&mut [u8]>,
    peer: SocketAddr,
    paths: &PathMtus,
    snap: &Snapshot,
    limiter: &mut IcmpLimiter,
    now: Instant,
    icmp_out: &mut [u8],
) -> Option<Egress> {
    let len = ip.packet_len();
    let path = paths.get(peer, now).filter(|&path| len > path)?;
    // The MTU to tell the sender: IPv4 senders that forbid fragmentation learn the path's;
    // IPv6 links carry at least 1280 bytes (RFC 8200), so below that the datagram is
    // fragmented without a word.
    let advice = match &*ip {
        IpPacket::V4(v4) => v4.dont_frag().then_some(path),
        IpPacket::V6(_) => Some(path.max(1280)).filter(|&m| len > m),
    };
    let icmp = advice.map_or(0, |mtu| {
        build_icmp(
            ip.packet(),
            IcmpKind::TooBig(mtu),
            snap,
            limiter,
            now,
            icmp_out,
        )
        .unwrap_or(0)
    });
    ip.decrement_hop_limit();
    Some(Egress::SendAlone { peer, len, icmp })
}

/// Decides the fate of a datagram from `sender` (design.md "Ingress"): the sender must hold a
/// lease (unless `accept_unknown_senders`), the inner source must lie in that sender's subnet,
/// the inner destination in ours, and the header must be sound.
// HOT PATH: no allocation, no lock, no logging.
pub fn ingress(pkt: &[u8], sender: SocketAddr, snap: &Snapshot, cfg: &ForwardConfig) -> Ingress {
    let Ok(ip) = IpPacket::new_checked(pkt) else {
        return Ingress::Drop(DropReason::Malformed);
    };
    let src = ip.src_addr();
    let sender_ip = sender.ip().to_canonical();
    if snap.is_known_sender(sender_ip) {
        if !snap.sender_owns(sender_ip, src) {
            return Ingress::Drop(DropReason::SpoofedSource);
        }
    } else if !cfg.accept_unknown_senders {
        return Ingress::Drop(DropReason::UnknownSender);
    } else if snap.lookup(src).is_none() {
        return Ingress::Drop(DropReason::SpoofedSource);
    }
    let dst = ip.dst_addr();
    // The TUN device's own address is the local subnet's network address: local too.
    if !snap.is_local(dst) {
        return Ingress::Drop(DropReason::NotForUs);
    }
    if ip.hop_limit() == 0 {
        return Ingress::Drop(DropReason::TtlExceeded);
    }
    Ingress::Deliver {
        len: ip.packet_len(),
    }
}

/// The TUN device's IPv4 address: the local subnet's network address (flannel's choice).
fn tun_v4(snap: &Snapshot) -> Option<Ipv4Addr> {
    snap.local().v4.map(|n| n.network())
}

/// The TUN device's IPv6 address: the local subnet's network address.
fn tun_v6(snap: &Snapshot) -> Option<Ipv6Addr> {
    snap.local().v6.map(|n| n.network())
}

enum IcmpKind {
    TimeExceeded,
    Unreachable,
    TooBig(usize),
}

/// The ICMP error `kind` about `original`, as the packet is dropped for `reason`: a verdict
/// to write it, or to drop the packet without one.
fn icmp(
    original: &[u8],
    kind: IcmpKind,
    snap: &Snapshot,
    limiter: &mut IcmpLimiter,
    now: Instant,
    out: &mut [u8],
    reason: DropReason,
) -> Egress {
    match build_icmp(original, kind, snap, limiter, now, out) {
        Some(len) => Egress::Icmp { len, reason },
        None => Egress::Drop(reason),
    }
}

/// Builds the ICMP error `kind` about `original` into `out`, from the TUN device's address;
/// its length, or `None` when rate-limited, not possible (no local subnet of that family) or
/// not allowed (an error about an error).
fn build_icmp(
    original: &[u8],
    kind: IcmpKind,
    snap: &Snapshot,
    limiter: &mut IcmpLimiter,
    now: Instant,
    out: &mut [u8],
) -> Option<usize> {
    // Path MTU discovery is not limited (nor is it by Linux: `icmpv4_mask_allow`, and type 2
    // is outside the default `icmpv6_ratemask`): with the budget spent by errors about a scan
    // of unleased addresses, say, a sender would keep sending too large packets, and lose
    // them. Each goes to a program on this host, which sent the packet that caused it.
    let limited = !matches!(kind, IcmpKind::TooBig(_));
    // Asked before building: under a flood, building an error only to drop it would cost a
    // copy and a checksum per packet. The token is taken only for an error that was built (an
    // ICMP error is never answered with one, and must not use up the budget).
    if limited && !limiter.ready(now) {
        return None;
    }
    let built = match original.first().map(|b| b >> 4) {
        Some(4) => {
            let src = tun_v4(snap)?;
            let kind = match kind {
                IcmpKind::TimeExceeded => Icmpv4Error::TimeExceeded,
                IcmpKind::Unreachable => Icmpv4Error::NetUnreachable,
                IcmpKind::TooBig(mtu) => Icmpv4Error::FragNeeded {
                    mtu: u16::try_from(mtu).unwrap_or(u16::MAX),
                },
            };
            wire::build_icmpv4_error(original, kind, src, out)
        }
        _ => {
            let src = tun_v6(snap)?;
            let kind = match kind {
                IcmpKind::TimeExceeded => Icmpv6Error::TimeExceeded,
                IcmpKind::Unreachable => Icmpv6Error::NoRoute,
                IcmpKind::TooBig(mtu) => Icmpv6Error::PacketTooBig {
                    mtu: u32::try_from(mtu).unwrap_or(u32::MAX),
                },
            };
            wire::build_icmpv6_error(original, kind, src, out)
        }
    };
    let len = built.ok()?;
    if limited {
        limiter.take();
    }
    Some(len)
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::table::{LocalSubnets, Route};
    use crate::wire::{Icmpv4Packet, Icmpv6Packet, Ipv4Packet, Ipv6Packet};

    const TUN4: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 0);

    fn tun6() -> Ipv6Addr {
        "fd00:19:0:1::".parse().unwrap()
    }

    fn cfg() -> ForwardConfig {
        ForwardConfig {
            mtu: 1400,
            accept_unknown_senders: false,
        }
    }

    fn peer2() -> SocketAddr {
        SocketAddr::from((Ipv4Addr::new(198, 18, 0, 2), 8285))
    }

    /// We are 198.19.1.0/24 + fd00:19:0:1::/64; host 2 (198.18.0.2) holds 198.19.2.0/24 and
    /// fd00:19:0:2::/64.
    fn snap() -> Snapshot {
        Snapshot::build(
            LocalSubnets {
                v4: Some("198.19.1.0/24".parse().unwrap()),
                v6: Some("fd00:19:0:1::/64".parse().unwrap()),
            },
            [
                Route {
                    subnet: "198.19.2.0/24".parse().unwrap(),
                    next_hop: peer2(),
                },
                Route {
                    subnet: "fd00:19:0:2::/64".parse().unwrap(),
                    next_hop: peer2(),
                },
            ],
            1,
        )
    }

    /// An IPv4 UDP packet of `len` bytes; checksum filled.
    fn v4(src: [u8; 4], dst: [u8; 4], ttl: u8, len: usize, df: bool) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        let mut ip = Ipv4Packet::new_unchecked(&mut buf[..]);
        ip.set_version(4);
        ip.set_header_len(20);
        ip.set_total_len(len as u16);
        ip.set_frag(df, false, 0);
        ip.set_ttl(ttl);
        ip.set_protocol(17);
        ip.set_src_addr(src.into());
        ip.set_dst_addr(dst.into());
        ip.fill_checksum();
        buf
    }

    fn v6(src: &str, dst: &str, hops: u8, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        let mut ip = Ipv6Packet::new_unchecked(&mut buf[..]);
        ip.set_version(6);
        ip.set_payload_len((len - 40) as u16);
        ip.set_next_header(17);
        ip.set_hop_limit(hops);
        ip.set_src_addr(src.parse().unwrap());
        ip.set_dst_addr(dst.parse().unwrap());
        buf
    }

    fn run_egress(pkt: &mut [u8], limiter: &mut IcmpLimiter, out: &mut [u8]) -> Egress {
        egress_at(pkt, limiter, Instant::now(), out)
    }

    fn egress_at(pkt: &mut [u8], limiter: &mut IcmpLimiter, at: Instant, out: &mut [u8]) -> Egress {
        egress(pkt, &snap(), &cfg(), &PathMtus::default(), limiter, at, out)
    }

    #[test]
    fn forwards_with_one_ttl_less_and_a_valid_checksum() {
        let mut pkt = v4([198, 19, 1, 5], [198, 19, 2, 7], 64, 200, true);
        let mut out = [0u8; 1280];
        let verdict = run_egress(&mut pkt, &mut IcmpLimiter::default(), &mut out);
        assert_eq!(
            verdict,
            Egress::Send {
                peer: peer2(),
                len: 200
            }
        );
        let ip = Ipv4Packet::new_checked(&pkt[..]).unwrap();
        assert_eq!(ip.ttl(), 63);
        assert!(ip.verify_checksum());
        let mut pkt = v6("fd00:19:0:1::5", "fd00:19:0:2::7", 9, 120);
        let verdict = run_egress(&mut pkt, &mut IcmpLimiter::default(), &mut out);
        assert_eq!(
            verdict,
            Egress::Send {
                peer: peer2(),
                len: 120
            }
        );
        assert_eq!(Ipv6Packet::new_checked(&pkt[..]).unwrap().hop_limit(), 8);
    }

    #[test]
    fn malformed_packets_are_dropped() {
        let mut out = [0u8; 1280];
        for mut bad in [vec![], vec![0x45; 10], vec![0x60; 39], {
            let mut p = v4([198, 19, 1, 5], [198, 19, 2, 7], 64, 100, true);
            p.truncate(60); // total length says 100
            p
        }] {
            assert_eq!(
                run_egress(&mut bad, &mut IcmpLimiter::default(), &mut out),
                Egress::Drop(DropReason::Malformed)
            );
            assert_eq!(
                ingress(&bad, peer2(), &snap(), &cfg()),
                Ingress::Drop(DropReason::Malformed)
            );
        }
    }

    #[test]
    fn ttl_one_gets_time_exceeded_from_the_tun_address() {
        let mut out = [0u8; 1280];
        let mut pkt = v4([198, 19, 1, 5], [198, 19, 2, 7], 1, 100, true);
        let Egress::Icmp { len, reason } =
            run_egress(&mut pkt, &mut IcmpLimiter::default(), &mut out)
        else {
            panic!("expected ICMP");
        };
        assert_eq!(reason, DropReason::TtlExceeded);
        let ip = Ipv4Packet::new_checked(&out[..len]).unwrap();
        assert_eq!(ip.src_addr(), TUN4);
        assert_eq!(ip.dst_addr(), Ipv4Addr::new(198, 19, 1, 5));
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert_eq!((icmp.msg_type(), icmp.code()), (11, 0));
        let mut pkt = v6("fd00:19:0:1::5", "fd00:19:0:2::7", 1, 100);
        let Egress::Icmp { len, .. } = run_egress(&mut pkt, &mut IcmpLimiter::default(), &mut out)
        else {
            panic!("expected ICMPv6");
        };
        let ip = Ipv6Packet::new_checked(&out[..len]).unwrap();
        assert_eq!(ip.src_addr(), tun6());
        let icmp = Icmpv6Packet::new_checked(ip.payload()).unwrap();
        assert_eq!(icmp.msg_type(), 3);
        assert!(icmp.verify_checksum(&ip.src_addr(), &ip.dst_addr()));
    }

    #[test]
    fn icmp_errors_come_from_the_current_lease_after_it_moves() {
        // The lease moved to 198.19.5.0/24: the device's address, and so the errors' source,
        // moved with it (the worker's settings did not change).
        let moved = Snapshot::build(
            LocalSubnets {
                v4: Some("198.19.5.0/24".parse().unwrap()),
                v6: None,
            },
            [],
            2,
        );
        let mut out = [0u8; 1280];
        let mut pkt = v4([198, 19, 5, 9], [198, 19, 9, 7], 64, 100, true);
        let verdict = egress(
            &mut pkt,
            &moved,
            &cfg(),
            &PathMtus::default(),
            &mut IcmpLimiter::default(),
            Instant::now(),
            &mut out,
        );
        let Egress::Icmp { len, .. } = verdict else {
            panic!("expected ICMP, got {verdict:?}");
        };
        let ip = Ipv4Packet::new_checked(&out[..len]).unwrap();
        assert_eq!(ip.src_addr(), Ipv4Addr::new(198, 19, 5, 0));
    }

    #[test]
    fn table_miss_gets_net_unreachable_but_never_for_an_icmp_error() {
        let mut out = [0u8; 1280];
        let mut pkt = v4([198, 19, 1, 5], [198, 19, 9, 7], 64, 100, true);
        let Egress::Icmp { len, reason } =
            run_egress(&mut pkt, &mut IcmpLimiter::default(), &mut out)
        else {
            panic!("expected ICMP");
        };
        assert_eq!(reason, DropReason::NoRoute);
        let ip = Ipv4Packet::new_checked(&out[..len]).unwrap();
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert_eq!((icmp.msg_type(), icmp.code()), (3, 0));
        // The ICMP error itself, sent again to an unleased subnet: dropped, not answered.
        let mut err = out[..len].to_vec();
        let mut e = Ipv4Packet::new_unchecked(&mut err[..]);
        e.set_dst_addr(Ipv4Addr::new(198, 19, 9, 1));
        e.fill_checksum();
        assert_eq!(
            run_egress(&mut err, &mut IcmpLimiter::default(), &mut out),
            Egress::Drop(DropReason::NoRoute)
        );
    }

    #[test]
    fn oversize_packets_get_frag_needed_or_packet_too_big_with_the_mtu() {
        let mut out = [0u8; 1280];
        let mut pkt = v4([198, 19, 1, 5], [198, 19, 2, 7], 64, 1401, true);
        let Egress::Icmp { len, reason } =
            run_egress(&mut pkt, &mut IcmpLimiter::default(), &mut out)
        else {
            panic!("expected ICMP");
        };
        assert_eq!(reason, DropReason::TooBig);
        let ip = Ipv4Packet::new_checked(&out[..len]).unwrap();
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert_eq!(
            (icmp.msg_type(), icmp.code(), icmp.mtu()),
            (3, 4, Some(1400))
        );
        // Exactly the MTU passes.
        let mut pkt = v4([198, 19, 1, 5], [198, 19, 2, 7], 64, 1400, true);
        assert!(matches!(
            run_egress(&mut pkt, &mut IcmpLimiter::default(), &mut out),
            Egress::Send { .. }
        ));
        // Without DF we cannot fragment: dropped and counted.
        let mut pkt = v4([198, 19, 1, 5], [198, 19, 2, 7], 64, 1401, false);
        assert_eq!(
            run_egress(&mut pkt, &mut IcmpLimiter::default(), &mut out),
            Egress::Drop(DropReason::TooBig)
        );
        let mut pkt = v6("fd00:19:0:1::5", "fd00:19:0:2::7", 64, 1401);
        let Egress::Icmp { len, .. } = run_egress(&mut pkt, &mut IcmpLimiter::default(), &mut out)
        else {
            panic!("expected ICMPv6");
        };
        let ip = Ipv6Packet::new_checked(&out[..len]).unwrap();
        let icmp = Icmpv6Packet::new_checked(ip.payload()).unwrap();
        assert_eq!((icmp.msg_type(), icmp.mtu()), (2, Some(1400)));
    }

    fn via(paths: &PathMtus, pkt: &mut [u8], at: Instant, out: &mut [u8]) -> Egress {
        egress(
            pkt,
            &snap(),
            &cfg(),
            paths,
            &mut IcmpLimiter::default(),
            at,
            out,
        )
    }

    /// A peer behind a smaller hop (its learned path carries 1300-byte inner packets): larger
    /// packets go alone, fragmented, and their senders hear the path's MTU (IPv4 with DF, and
    /// IPv6 above 1280 bytes with at least 1280); smaller ones, other peers and everything
    /// after the entry expires go as before.
    #[test]
    fn packets_larger_than_a_learned_path_go_alone_and_their_sender_is_told() {
        let mut out = [0u8; 1280];
        let now = Instant::now();
        let mut paths = PathMtus::default();
        paths.learn(peer2(), Some(1300), now, Asked::Refused);
        let mut pkt = v4([198, 19, 1, 5], [198, 19, 2, 7], 64, 1301, true);
        let Egress::SendAlone { peer, len, icmp } = via(&paths, &mut pkt, now, &mut out) else {
            panic!("expected a lone datagram");
        };
        assert_eq!((peer, len), (peer2(), 1301));
        assert!(icmp > 0);
        // Forwarded all the same, one TTL less.
        assert_eq!(Ipv4Packet::new_checked(&pkt[..]).unwrap().ttl(), 63);
        let ip = Ipv4Packet::new_checked(&out[..icmp]).unwrap();
        assert_eq!(ip.dst_addr(), Ipv4Addr::new(198, 19, 1, 5));
        let m = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert_eq!((m.msg_type(), m.code(), m.mtu()), (3, 4, Some(1300)));
        // It quotes the packet as the sender sent it: TTL 64, a valid header checksum.
        let quoted = Ipv4Packet::new_unchecked(&ip.payload()[8..]);
        assert_eq!(quoted.ttl(), 64);
        assert!(quoted.verify_checksum());
        // The sender allows fragmentation: nothing to tell.
        let mut pkt = v4([198, 19, 1, 5], [198, 19, 2, 7], 64, 1301, false);
        assert_eq!(
            via(&paths, &mut pkt, now, &mut out),
            Egress::SendAlone {
                peer: peer2(),
                len: 1301,
                icmp: 0
            }
        );
        // Exactly the path's MTU is a normal send.
        let mut pkt = v4([198, 19, 1, 5], [198, 19, 2, 7], 64, 1300, true);
        assert!(matches!(
            via(&paths, &mut pkt, now, &mut out),
            Egress::Send { .. }
        ));
        let mut pkt = v6("fd00:19:0:1::5", "fd00:19:0:2::7", 64, 1301);
        let Egress::SendAlone { icmp, .. } = via(&paths, &mut pkt, now, &mut out) else {
            panic!("expected a lone datagram");
        };
        let ip = Ipv6Packet::new_checked(&out[..icmp]).unwrap();
        let m = Icmpv6Packet::new_checked(ip.payload()).unwrap();
        assert_eq!((m.msg_type(), m.mtu()), (2, Some(1300)));
        // Another peer's smaller path is no concern of this one's packets (the lookup runs,
        // as the packet is larger than the smallest path known, and finds nothing).
        let mut others = PathMtus::default();
        others.learn(
            "198.18.0.9:8285".parse().unwrap(),
            Some(1300),
            now,
            Asked::Refused,
        );
        let mut pkt = v4([198, 19, 1, 5], [198, 19, 2, 7], 64, 1301, true);
        assert!(matches!(
            via(&others, &mut pkt, now, &mut out),
            Egress::Send { len: 1301, .. }
        ));
        // After the entry expires: the overlay MTU again.
        let mut pkt = v4([198, 19, 1, 5], [198, 19, 2, 7], 64, 1301, true);
        assert!(matches!(
            via(&paths, &mut pkt, now + PATH_MTU_EXPIRY, &mut out),
            Egress::Send { .. }
        ));
        // An IPv6 path below 1280: IPv6 senders are told 1280 and no less, and packets up to
        // that go alone without a word.
        let mut paths = PathMtus::default();
        paths.learn(peer2(), Some(1200), now, Asked::Refused);
        let mut pkt = v6("fd00:19:0:1::5", "fd00:19:0:2::7", 64, 1280);
        assert!(matches!(
            via(&paths, &mut pkt, now, &mut out),
            Egress::SendAlone { icmp: 0, .. }
        ));
        let mut pkt = v6("fd00:19:0:1::5", "fd00:19:0:2::7", 64, 1281);
        let Egress::SendAlone { icmp, .. } = via(&paths, &mut pkt, now, &mut out) else {
            panic!("expected a lone datagram");
        };
        let ip = Ipv6Packet::new_checked(&out[..icmp]).unwrap();
        let m = Icmpv6Packet::new_checked(ip.payload()).unwrap();
        assert_eq!(m.mtu(), Some(1280));
    }

    #[test]
    fn path_mtus_expire_are_asked_for_once_a_second_and_keep_the_newest() {
        let now = Instant::now();
        let secs = |n: u64| now + Duration::from_secs(n);
        let peer = |i: u8| SocketAddr::from((Ipv4Addr::new(198, 18, 0, i), 8285));
        let mut paths = PathMtus::default();
        assert!(paths.due(peer(1), now, Asked::Refused));
        assert!(
            paths.learn(peer(1), Some(1300), now, Asked::Refused),
            "a first learning"
        );
        assert_eq!(paths.get(peer(1), now), Some(1300));
        assert_eq!(paths.get(peer(2), now), None);
        assert!(!paths.due(peer(1), now + Duration::from_millis(999), Asked::Refused));
        assert!(paths.due(peer(1), secs(1), Asked::Refused));
        assert!(paths.due(peer(2), now, Asked::Refused));
        assert!(
            !paths.learn(peer(1), Some(1300), secs(1), Asked::Refused),
            "the same again"
        );
        // A later answer replaces the entry.
        assert!(paths.learn(peer(1), Some(1200), secs(2), Asked::Refused));
        assert_eq!(paths.get(peer(1), secs(2)), Some(1200));
        assert_eq!(paths.smallest, 1200);
        // "Full size" is kept too: not used, but not asked again within the second.
        assert!(paths.learn(peer(1), None, secs(3), Asked::Refused));
        assert_eq!(paths.get(peer(1), secs(3)), None);
        assert!(!paths.due(peer(1), secs(3), Asked::Refused));
        assert_eq!(paths.smallest, usize::MAX, "no lookup without an MTU");
        // Full: the oldest entry makes room, the capacity stays.
        let capacity = paths.entries.capacity();
        for i in 0..=PATH_MTU_SLOTS as u8 {
            paths.learn(
                peer(10 + i),
                Some(1300),
                secs(4 + u64::from(i)),
                Asked::Refused,
            );
        }
        let later = secs(4 + PATH_MTU_SLOTS as u64);
        assert_eq!(paths.get(peer(10), later), None);
        assert_eq!(paths.get(peer(11), later), Some(1300));
        assert_eq!(paths.entries.len(), PATH_MTU_SLOTS);
        assert_eq!(paths.entries.capacity(), capacity);
        // Expired entries are not used, and go once the worker expires them.
        let expired = later + PATH_MTU_EXPIRY;
        assert_eq!(paths.get(peer(10 + PATH_MTU_SLOTS as u8), expired), None);
        paths.expire(later);
        assert_eq!(paths.entries.len(), PATH_MTU_SLOTS, "nothing expired yet");
        paths.expire(expired);
        assert!(paths.entries.is_empty());
        assert_eq!(paths.smallest, usize::MAX);
        assert_eq!(paths.first_expiry, None);
    }

    /// Answers of "full size" are kept only until the question may come again, in slots of
    /// their own: peers asked about in passing (every peer that gets a large packet alone, on
    /// a host with hundreds) never push out a learned MTU, and are not asked again within
    /// their second however many there are.
    #[test]
    fn full_size_answers_last_a_second_in_slots_of_their_own() {
        let now = Instant::now();
        let peer =
            |i: u16| SocketAddr::from((Ipv4Addr::new(198, 18, (i >> 8) as u8, i as u8), 8285));
        let kept = |paths: &PathMtus, p: SocketAddr| paths.entries.iter().any(|e| e.peer == p);
        let mut paths = PathMtus::default();
        paths.learn(peer(1), Some(1300), now, Asked::Refused);
        paths.learn(peer(2), None, now, Asked::Alone);
        assert_eq!(paths.first_expiry, Some(now + PATH_MTU_ASK_INTERVAL));
        paths.expire(now + PATH_MTU_ASK_INTERVAL);
        assert_eq!(paths.entries.len(), 1, "the full-size answer went");
        assert!(paths.due(peer(2), now + PATH_MTU_ASK_INTERVAL, Asked::Alone));
        assert_eq!(paths.first_expiry, Some(now + PATH_MTU_EXPIRY));
        // Every MTU slot taken, then more "full size" answers within one second than their
        // slots hold: the MTUs all stay, the newest answers are kept.
        for i in 0..PATH_MTU_SLOTS as u16 - 1 {
            paths.learn(peer(10 + i), Some(1200), now, Asked::Refused);
        }
        let n = 3 * PATH_MTU_FULL_SIZE_SLOTS as u16;
        for i in 0..n {
            let t = now + Duration::from_millis(u64::from(i));
            paths.learn(peer(100 + i), None, t, Asked::Refused);
        }
        let later = now + Duration::from_millis(u64::from(n));
        assert_eq!(
            paths.entries.len(),
            PATH_MTU_SLOTS + PATH_MTU_FULL_SIZE_SLOTS
        );
        assert_eq!(paths.get(peer(1), later), Some(1300));
        assert_eq!(paths.get(peer(10), later), Some(1200));
        assert_eq!(paths.smallest, 1200);
        let newest = peer(100 + n - 1);
        assert!(kept(&paths, newest));
        assert!(kept(
            &paths,
            peer(100 + n - PATH_MTU_FULL_SIZE_SLOTS as u16)
        ));
        assert!(!kept(
            &paths,
            peer(100 + n - PATH_MTU_FULL_SIZE_SLOTS as u16 - 1)
        ));
        assert!(!paths.due(newest, later, Asked::Refused));
        // A new MTU replaces the oldest MTU, not an answer.
        assert!(paths.learn(peer(9), Some(1000), later, Asked::Refused));
        assert!(!kept(&paths, peer(1)));
        assert!(kept(&paths, newest));
        assert_eq!(paths.smallest, 1000);
        // A refusal within the second is asked about even after a passing "full size"
        // answer: the passing question may have come just before the kernel learned the
        // smaller MTU. Not after an answer to a refusal, nor after an MTU.
        paths.learn(newest, None, later, Asked::Alone);
        assert!(!paths.due(newest, later, Asked::Alone));
        assert!(paths.due(newest, later, Asked::Refused));
        paths.learn(newest, None, later, Asked::Refused);
        assert!(!paths.due(newest, later, Asked::Refused));
        paths.learn(newest, Some(1300), later, Asked::Alone);
        assert!(!paths.due(newest, later, Asked::Refused));
    }

    /// A worker asks at most [`PATH_MTU_PASSING_PER_SECOND`] questions in passing a second
    /// (refusals are not counted), and may ask again the next second.
    #[test]
    fn questions_in_passing_are_budgeted() {
        let now = Instant::now();
        let peer =
            |i: u16| SocketAddr::from((Ipv4Addr::new(198, 18, (i >> 8) as u8, i as u8), 8285));
        let mut paths = PathMtus::default();
        let mut asked = 0;
        for i in 0..100 {
            let t = now + Duration::from_millis(i);
            if paths.ask(peer(i as u16), t, Asked::Alone) {
                paths.learn(peer(i as u16), None, t, Asked::Alone);
                asked += 1;
            }
        }
        assert_eq!(asked, PATH_MTU_PASSING_PER_SECOND);
        let t = now + Duration::from_millis(100);
        assert!(!paths.due(peer(200), t, Asked::Alone), "over the budget");
        assert!(paths.due(peer(200), t, Asked::Refused));
        assert!(paths.due(peer(200), now + Duration::from_secs(1), Asked::Alone));
    }

    /// A question that finds nothing out keeps what was learned and waits a second.
    #[test]
    fn an_unanswered_question_keeps_the_mtu_and_waits() {
        let now = Instant::now();
        let peer = |i: u8| SocketAddr::from((Ipv4Addr::new(198, 18, 0, i), 8285));
        let mut paths = PathMtus::default();
        paths.learn(peer(1), Some(1300), now, Asked::Refused);
        let t = now + Duration::from_secs(5);
        assert!(paths.due(peer(1), t, Asked::Refused));
        paths.unanswered(peer(1), t, Asked::Refused);
        assert!(!paths.due(peer(1), t, Asked::Refused));
        assert_eq!(paths.get(peer(1), t), Some(1300));
        // Expiry still counts from the learning.
        assert_eq!(paths.get(peer(1), now + PATH_MTU_EXPIRY), None);
        // Without an entry: "full size" for a second.
        paths.unanswered(peer(2), t, Asked::Alone);
        assert!(!paths.due(peer(2), t, Asked::Alone));
        assert_eq!(paths.get(peer(2), t), None);
        assert!(paths.due(peer(2), t + PATH_MTU_ASK_INTERVAL, Asked::Alone));
    }

    #[test]
    fn icmp_errors_are_rate_limited() {
        let mut out = [0u8; 1280];
        let mut limiter = IcmpLimiter::new(1, 3);
        let now = Instant::now();
        let mut icmp = 0;
        for _ in 0..10 {
            let mut pkt = v4([198, 19, 1, 5], [198, 19, 9, 7], 64, 100, true);
            if let Egress::Icmp { .. } = egress_at(&mut pkt, &mut limiter, now, &mut out) {
                icmp += 1;
            }
        }
        assert_eq!(
            icmp, 3,
            "a burst of 3, then nothing within the same instant"
        );
        // With the bucket empty no error is even built.
        out.fill(0xa5);
        let mut pkt = v4([198, 19, 1, 5], [198, 19, 9, 7], 64, 100, true);
        egress_at(&mut pkt, &mut limiter, now, &mut out);
        assert!(out.iter().all(|b| *b == 0xa5), "an error was built");
        // Path MTU discovery is not limited: a too large packet is still answered.
        let mut pkt = v4([198, 19, 1, 5], [198, 19, 2, 7], 64, 1401, true);
        assert!(matches!(
            egress_at(&mut pkt, &mut limiter, now, &mut out),
            Egress::Icmp {
                reason: DropReason::TooBig,
                ..
            }
        ));
        let mut pkt = v6("fd00:19:0:1::5", "fd00:19:0:2::7", 64, 1401);
        assert!(matches!(
            egress_at(&mut pkt, &mut limiter, now, &mut out),
            Egress::Icmp {
                reason: DropReason::TooBig,
                ..
            }
        ));
        let later = now + std::time::Duration::from_secs(2);
        let mut pkt = v4([198, 19, 1, 5], [198, 19, 9, 7], 64, 100, true);
        assert!(matches!(
            egress_at(&mut pkt, &mut limiter, later, &mut out),
            Egress::Icmp { .. }
        ));
        // And it did not take the token that came back meanwhile: the next error is sent too.
        let mut pkt = v4([198, 19, 1, 5], [198, 19, 2, 7], 64, 1401, true);
        egress_at(&mut pkt, &mut limiter, later, &mut out);
        let mut pkt = v4([198, 19, 1, 5], [198, 19, 9, 7], 64, 100, true);
        assert!(matches!(
            egress_at(&mut pkt, &mut limiter, later, &mut out),
            Egress::Icmp { .. }
        ));
    }

    #[test]
    fn ingress_checks_sender_inner_source_and_destination() {
        let s = snap();
        let c = cfg();
        let ok = v4([198, 19, 2, 7], [198, 19, 1, 5], 63, 100, true);
        assert_eq!(ingress(&ok, peer2(), &s, &c), Ingress::Deliver { len: 100 });
        // A dual-stack socket reports IPv4 senders as mapped IPv6.
        let mapped = SocketAddr::from((Ipv4Addr::new(198, 18, 0, 2).to_ipv6_mapped(), 8285));
        assert_eq!(ingress(&ok, mapped, &s, &c), Ingress::Deliver { len: 100 });
        // To the TUN address itself.
        let to_tun = v4([198, 19, 2, 7], [198, 19, 1, 0], 63, 100, true);
        assert_eq!(
            ingress(&to_tun, peer2(), &s, &c),
            Ingress::Deliver { len: 100 }
        );
        let stranger = SocketAddr::from((Ipv4Addr::new(198, 18, 0, 9), 8285));
        assert_eq!(
            ingress(&ok, stranger, &s, &c),
            Ingress::Drop(DropReason::UnknownSender)
        );
        let spoofed = v4([198, 19, 3, 7], [198, 19, 1, 5], 63, 100, true);
        assert_eq!(
            ingress(&spoofed, peer2(), &s, &c),
            Ingress::Drop(DropReason::SpoofedSource)
        );
        let elsewhere = v4([198, 19, 2, 7], [198, 19, 5, 5], 63, 100, true);
        assert_eq!(
            ingress(&elsewhere, peer2(), &s, &c),
            Ingress::Drop(DropReason::NotForUs)
        );
        let v6ok = v6("fd00:19:0:2::7", "fd00:19:0:1::5", 9, 80);
        assert_eq!(
            ingress(&v6ok, peer2(), &s, &c),
            Ingress::Deliver { len: 80 }
        );
        // NAT: unknown senders accepted, but only with a leased inner source.
        let nat = ForwardConfig {
            accept_unknown_senders: true,
            ..c
        };
        assert_eq!(
            ingress(&ok, stranger, &s, &nat),
            Ingress::Deliver { len: 100 }
        );
        let unleased = v4([198, 19, 9, 7], [198, 19, 1, 5], 63, 100, true);
        assert_eq!(
            ingress(&unleased, stranger, &s, &nat),
            Ingress::Drop(DropReason::SpoofedSource)
        );
    }
}
