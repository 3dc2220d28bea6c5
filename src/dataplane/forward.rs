//! The sans-IO forwarding decisions: what happens to one packet, as a pure function of its
//! bytes, the table snapshot and the time. Threads, sockets and the TUN device only carry the
//! verdicts out (see `worker.rs`), so every rule here is unit-tested and fuzzed without root.
//!
//! Must not import tokio, `lease` or `daemon`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Instant;

use crate::table::Snapshot;
use crate::wire::{self, Icmpv4Error, Icmpv6Error, IpPacket};

use super::counters::DropReason;

/// Settings the decisions need; fixed for a worker's life.
#[derive(Clone, Copy, Debug)]
pub struct ForwardConfig {
    /// The overlay MTU: the largest inner packet that fits one UDP datagram on the underlay.
    pub mtu: usize,
    /// The TUN device's IPv4 address (source of ICMPv4 errors); none without an IPv4 lease.
    pub tun_v4: Option<Ipv4Addr>,
    /// The TUN device's IPv6 address (source of ICMPv6 errors).
    pub tun_v6: Option<Ipv6Addr>,
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

    /// Takes a token at time `now`; false when the bucket is empty.
    pub fn allow(&mut self, now: Instant) -> bool {
        if let Some(last) = self.last {
            let dt = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Default for IcmpLimiter {
    /// 1000 errors per second, bursts of 100 (Linux's `icmp_ratelimit` is 1 per ms).
    fn default() -> Self {
        IcmpLimiter::new(1000, 100)
    }
}

/// Decides the fate of a packet read from the TUN device (design.md "Egress"):
/// header check, Time Exceeded for TTL ≤ 1, Net Unreachable on a table miss, Fragmentation
/// Needed / Packet Too Big when larger than the overlay MTU, otherwise TTL − 1 and send.
///
/// `icmp_out` receives an ICMP error when the verdict is [`Egress::Icmp`]; it should hold at
/// least 1280 bytes.
// HOT PATH: no allocation, no lock, no logging.
pub fn egress(
    pkt: &mut [u8],
    snap: &Snapshot,
    cfg: &ForwardConfig,
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
            cfg,
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
            cfg,
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
            cfg,
            limiter,
            now,
            icmp_out,
            DropReason::TooBig,
        );
    }
    ip.decrement_hop_limit();
    Egress::Send { peer, len }
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
    if !snap.is_local(dst) && !is_tun_addr(dst, cfg) {
        return Ingress::Drop(DropReason::NotForUs);
    }
    if ip.hop_limit() == 0 {
        return Ingress::Drop(DropReason::TtlExceeded);
    }
    Ingress::Deliver {
        len: ip.packet_len(),
    }
}

fn is_tun_addr(addr: IpAddr, cfg: &ForwardConfig) -> bool {
    match addr {
        IpAddr::V4(a) => cfg.tun_v4 == Some(a),
        IpAddr::V6(a) => cfg.tun_v6 == Some(a),
    }
}

enum IcmpKind {
    TimeExceeded,
    Unreachable,
    TooBig(usize),
}

fn icmp(
    original: &[u8],
    kind: IcmpKind,
    cfg: &ForwardConfig,
    limiter: &mut IcmpLimiter,
    now: Instant,
    out: &mut [u8],
    reason: DropReason,
) -> Egress {
    let built = match original.first().map(|b| b >> 4) {
        Some(4) => {
            let Some(src) = cfg.tun_v4 else {
                return Egress::Drop(reason);
            };
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
            let Some(src) = cfg.tun_v6 else {
                return Egress::Drop(reason);
            };
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
    match built {
        Ok(len) if limiter.allow(now) => Egress::Icmp { len, reason },
        Ok(_) => Egress::Drop(reason),
        Err(_) => Egress::Drop(reason),
    }
}
