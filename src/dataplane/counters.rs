//! Per-worker packet counters. A worker counts into plain integers ([`LocalCounters`]) and
//! publishes them once per batch into its shared [`Counters`] (relaxed atomics, one writer), so
//! the hot path never touches a shared cache line per packet. The daemon sums all workers.

use std::sync::atomic::{AtomicU64, Ordering};

/// Why a packet was not forwarded. Every drop is counted under exactly one reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(usize)]
pub enum DropReason {
    /// Not a well-formed IPv4/IPv6 packet (version, header length, total length).
    Malformed = 0,
    /// TTL or hop limit ran out (Time Exceeded sent when allowed).
    TtlExceeded,
    /// No lease covers the destination (Net Unreachable sent when allowed).
    NoRoute,
    /// Larger than the overlay MTU (Fragmentation Needed / Packet Too Big sent when allowed).
    TooBig,
    /// A datagram from an address that holds no lease.
    UnknownSender,
    /// The inner source is outside the sending host's subnet.
    SpoofedSource,
    /// The inner destination is not in this host's subnet.
    NotForUs,
    /// The UDP socket refused the datagram (buffer full or an error).
    SendFailed,
    /// The TUN device refused a packet from a peer (an ICMP error linen built that it refuses
    /// is no drop: the packet it answers is counted already).
    TunWriteFailed,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 9] = [
        DropReason::Malformed,
        DropReason::TtlExceeded,
        DropReason::NoRoute,
        DropReason::TooBig,
        DropReason::UnknownSender,
        DropReason::SpoofedSource,
        DropReason::NotForUs,
        DropReason::SendFailed,
        DropReason::TunWriteFailed,
    ];
    /// Number of reasons.
    pub const COUNT: usize = Self::ALL.len();

    /// Stable snake_case name for metrics and status output.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::TtlExceeded => "ttl_exceeded",
            DropReason::NoRoute => "no_route",
            DropReason::TooBig => "too_big",
            DropReason::UnknownSender => "unknown_sender",
            DropReason::SpoofedSource => "spoofed_source",
            DropReason::NotForUs => "not_for_us",
            DropReason::SendFailed => "send_failed",
            DropReason::TunWriteFailed => "tun_write_failed",
        }
    }
}

/// Counter values (a plain copy; also what a worker accumulates during a batch).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalCounters {
    /// Packets read from the TUN device (after segmentation of offloaded super-packets).
    pub tun_rx_packets: u64,
    /// Bytes read from the TUN device.
    pub tun_rx_bytes: u64,
    /// Datagrams sent to peers.
    pub udp_tx_packets: u64,
    /// Bytes sent to peers (UDP payload).
    pub udp_tx_bytes: u64,
    /// Datagrams received from peers.
    pub udp_rx_packets: u64,
    /// Bytes received from peers (UDP payload).
    pub udp_rx_bytes: u64,
    /// Packets written to the TUN device (delivered to this host).
    pub tun_tx_packets: u64,
    /// Bytes written to the TUN device.
    pub tun_tx_bytes: u64,
    /// ICMP errors written back into the TUN device.
    pub icmp_sent: u64,
    /// Coalesced TCP super-packets (TSO) written to the TUN device.
    pub tun_tx_tso: u64,
    /// Coalesced UDP super-packets (USO) written to the TUN device.
    pub tun_tx_uso: u64,
    /// UDP GSO sends: system calls that each carried several datagrams to one peer.
    pub udp_tx_gso: u64,
    /// Drops the kernel counted at the receiving socket before linen read anything: nearly
    /// always a full receive buffer (a GRO batch of datagrams may count as one; a datagram
    /// with a bad UDP checksum counts too).
    pub udp_rx_overflow: u64,
    /// Drops by reason, indexed by `DropReason as usize`.
    pub drops: [u64; DropReason::COUNT],
}

impl LocalCounters {
    /// Counts one drop.
    #[inline]
    pub fn drop(&mut self, reason: DropReason) {
        self.drops[reason as usize] += 1;
    }

    /// Drops for one reason.
    pub fn drops_for(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize]
    }

    /// Adds another set of counters into this one.
    pub fn add(&mut self, other: &LocalCounters) {
        self.tun_rx_packets += other.tun_rx_packets;
        self.tun_rx_bytes += other.tun_rx_bytes;
        self.udp_tx_packets += other.udp_tx_packets;
        self.udp_tx_bytes += other.udp_tx_bytes;
        self.udp_rx_packets += other.udp_rx_packets;
        self.udp_rx_bytes += other.udp_rx_bytes;
        self.tun_tx_packets += other.tun_tx_packets;
        self.tun_tx_bytes += other.tun_tx_bytes;
        self.icmp_sent += other.icmp_sent;
        self.tun_tx_tso += other.tun_tx_tso;
        self.tun_tx_uso += other.tun_tx_uso;
        self.udp_tx_gso += other.udp_tx_gso;
        self.udp_rx_overflow += other.udp_rx_overflow;
        for (a, b) in self.drops.iter_mut().zip(other.drops.iter()) {
            *a += b;
        }
    }
}

/// Traffic counters before the drop counters in [`Counters`].
const TRAFFIC: usize = 13;

/// One worker's published counters: written only by that worker, read by anyone.
#[derive(Debug, Default)]
pub struct Counters {
    values: [AtomicU64; TRAFFIC + DropReason::COUNT],
}

impl Counters {
    /// Adds a batch's counts (the worker's only write, once per batch).
    pub fn publish(&self, delta: &LocalCounters) {
        for (slot, v) in self.values.iter().zip(flatten(delta)) {
            if v != 0 {
                // One writer per `Counters`, so load + store is enough; no read-modify-write.
                slot.store(slot.load(Ordering::Relaxed) + v, Ordering::Relaxed);
            }
        }
    }

    /// A copy of the current values.
    pub fn snapshot(&self) -> LocalCounters {
        let v: Vec<u64> = self
            .values
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect();
        let mut c = LocalCounters {
            tun_rx_packets: v[0],
            tun_rx_bytes: v[1],
            udp_tx_packets: v[2],
            udp_tx_bytes: v[3],
            udp_rx_packets: v[4],
            udp_rx_bytes: v[5],
            tun_tx_packets: v[6],
            tun_tx_bytes: v[7],
            icmp_sent: v[8],
            tun_tx_tso: v[9],
            tun_tx_uso: v[10],
            udp_tx_gso: v[11],
            udp_rx_overflow: v[12],
            ..LocalCounters::default()
        };
        c.drops.copy_from_slice(&v[TRAFFIC..]);
        c
    }
}

fn flatten(c: &LocalCounters) -> impl Iterator<Item = u64> + '_ {
    c.named().map(|(_, v)| v)
}

impl LocalCounters {
    /// Every counter with a stable name (traffic first, then one per drop reason), in the
    /// order [`Counters`] stores them: for log lines and status output.
    pub fn named(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        [
            ("tun_rx", self.tun_rx_packets),
            ("tun_rx_bytes", self.tun_rx_bytes),
            ("udp_tx", self.udp_tx_packets),
            ("udp_tx_bytes", self.udp_tx_bytes),
            ("udp_rx", self.udp_rx_packets),
            ("udp_rx_bytes", self.udp_rx_bytes),
            ("tun_tx", self.tun_tx_packets),
            ("tun_tx_bytes", self.tun_tx_bytes),
            ("icmp_sent", self.icmp_sent),
            ("tun_tx_tso", self.tun_tx_tso),
            ("tun_tx_uso", self.tun_tx_uso),
            ("udp_tx_gso", self.udp_tx_gso),
            ("udp_rx_overflow", self.udp_rx_overflow),
        ]
        .into_iter()
        .chain(
            DropReason::ALL
                .iter()
                .map(|r| (r.name(), self.drops_for(*r))),
        )
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn publish_accumulates_and_snapshot_reads_back() {
        let shared = Counters::default();
        let mut a = LocalCounters {
            tun_rx_packets: 3,
            udp_tx_bytes: 4200,
            icmp_sent: 1,
            udp_tx_gso: 5,
            udp_rx_overflow: 7,
            ..LocalCounters::default()
        };
        a.drop(DropReason::SpoofedSource);
        a.drop(DropReason::SpoofedSource);
        shared.publish(&a);
        shared.publish(&a);
        let s = shared.snapshot();
        assert_eq!(s.tun_rx_packets, 6);
        assert_eq!(s.udp_tx_bytes, 8400);
        assert_eq!(s.icmp_sent, 2);
        assert_eq!(s.udp_tx_gso, 10);
        assert_eq!(s.udp_rx_overflow, 14);
        assert_eq!(s.named().count(), TRAFFIC + DropReason::COUNT);
        assert_eq!(s.drops_for(DropReason::SpoofedSource), 4);
        assert_eq!(s.drops_for(DropReason::Malformed), 0);
        let mut sum = LocalCounters::default();
        sum.add(&s);
        sum.add(&s);
        assert_eq!(sum.drops_for(DropReason::SpoofedSource), 8);
    }

    #[test]
    fn names_are_unique() {
        let mut names: Vec<_> = DropReason::ALL.iter().map(|r| r.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), DropReason::COUNT);
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }
}
