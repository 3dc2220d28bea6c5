//! Transport ports and a flow hash, to pin each flow to one worker so TCP is never reordered.
//!
//! Only TCP and UDP carry ports here. IPv6 extension headers are **not** walked: the ports are
//! read only when the first next header is TCP or UDP, so a packet with a Hop-by-Hop, Routing,
//! Destination Options or Fragment header hashes on addresses and that first next header alone
//! (all such packets of a flow still land on the same worker).

use std::net::IpAddr;

use super::read_u16;
use super::{IpPacket, protocol};

/// Minimum UDP header length.
const UDP_HEADER_LEN: usize = 8;
/// Minimum TCP header length (data offset 5).
const TCP_HEADER_LEN: usize = 20;

/// The transport protocol of a packet and its ports (0 where there are none to read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Transport {
    /// IPv4 protocol or IPv6 first next header.
    pub protocol: u8,
    /// TCP/UDP source port, or 0.
    pub src_port: u16,
    /// TCP/UDP destination port, or 0.
    pub dst_port: u16,
}

/// The protocol and, for TCP and UDP, the ports of a checked packet.
///
/// Ports are read only from a packet that is not a fragment (IPv4: no more-fragments flag,
/// offset 0; an IPv6 packet whose first next header is TCP/UDP is never one) whose payload
/// holds the whole minimum L4 header (8 bytes for UDP, 20 for TCP); otherwise they are 0.
/// Not from a first fragment either, whose ports the later ones lack: every fragment of a
/// datagram then has the same [`FlowKey`], as in Linux's flow hash.
#[inline]
pub fn transport<T: AsRef<[u8]>>(packet: &IpPacket<T>) -> Transport {
    let (protocol, whole) = match packet {
        IpPacket::V4(p) => (p.protocol(), p.frag_offset() == 0 && !p.more_frags()),
        IpPacket::V6(p) => (p.next_header(), true),
    };
    let min_len = match protocol {
        protocol::UDP => UDP_HEADER_LEN,
        protocol::TCP => TCP_HEADER_LEN,
        _ => usize::MAX,
    };
    let l4 = packet.payload();
    let (src_port, dst_port) = if whole && l4.len() >= min_len {
        // Both TCP and UDP start with source port, destination port.
        (read_u16(l4, 0), read_u16(l4, 2))
    } else {
        (0, 0)
    };
    Transport {
        protocol,
        src_port,
        dst_port,
    }
}

/// The fields a flow is identified by. Direction matters: A→B and B→A are different keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Protocol and ports.
    pub transport: Transport,
}

/// Multiplier of the mix (2^64 / φ, odd).
const K: u64 = 0x9e37_79b9_7f4a_7c15;

impl FlowKey {
    /// The key of a checked packet.
    #[inline]
    pub fn new<T: AsRef<[u8]>>(packet: &IpPacket<T>) -> Self {
        FlowKey {
            src: packet.src_addr(),
            dst: packet.dst_addr(),
            transport: transport(packet),
        }
    }

    /// A cheap, allocation-free, deterministic 32-bit hash (multiply–rotate per 64-bit word,
    /// then a murmur3-style finaliser so every input bit reaches the low bits used for
    /// `hash % workers`). Not keyed: it balances load, it does not resist chosen flows.
    #[inline]
    pub fn hash(&self) -> u32 {
        #[inline]
        fn mix(h: u64, word: u64) -> u64 {
            (h.rotate_left(23) ^ word).wrapping_mul(K)
        }
        let t = &self.transport;
        let ports =
            (u64::from(t.protocol) << 32) | (u64::from(t.src_port) << 16) | u64::from(t.dst_port);
        let mut h = match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                mix(4, (u64::from(s.to_bits()) << 32) | u64::from(d.to_bits()))
            }
            (s, d) => {
                let (s, d) = (to_bits(s), to_bits(d));
                let h = mix(6, (s >> 64) as u64);
                let h = mix(h, s as u64);
                let h = mix(h, (d >> 64) as u64);
                mix(h, d as u64)
            }
        };
        h = mix(h, ports);
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        (h >> 32) as u32
    }
}

/// An address as 128 bits (IPv4 as its IPv4-mapped IPv6 form).
#[inline]
fn to_bits(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => a.to_ipv6_mapped().to_bits(),
        IpAddr::V6(a) => a.to_bits(),
    }
}

/// The flow hash of a checked packet: `FlowKey::new(packet).hash()`.
#[inline]
pub fn flow_hash<T: AsRef<[u8]>>(packet: &IpPacket<T>) -> u32 {
    FlowKey::new(packet).hash()
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::wire::Ipv4Packet;
    use crate::wire::ipv4::test::{ECHO_V4, TCP_SYN_V4, UDP_V4, XorShift};
    use crate::wire::ipv6::test::{ECHO_V6, UDP_V6};

    fn transport_of(pkt: &[u8]) -> Transport {
        transport(&IpPacket::new_checked(pkt).unwrap())
    }

    #[test]
    fn golden_ports() {
        let t = |protocol, src_port, dst_port| Transport {
            protocol,
            src_port,
            dst_port,
        };
        assert_eq!(transport_of(&UDP_V4), t(17, 54321, 5001));
        assert_eq!(transport_of(&TCP_SYN_V4), t(6, 43210, 80));
        assert_eq!(transport_of(&ECHO_V4), t(1, 0, 0));
        assert_eq!(transport_of(&UDP_V6), t(17, 5353, 8285));
        assert_eq!(transport_of(&ECHO_V6), t(58, 0, 0));
    }

    #[test]
    fn no_ports_without_a_whole_l4_header_or_in_later_fragments() {
        // UDP with a 7-byte payload: header incomplete.
        let mut short_udp = UDP_V4;
        short_udp[3] = 27;
        assert_eq!(transport_of(&short_udp).src_port, 0);
        short_udp[3] = 28;
        assert_eq!(transport_of(&short_udp).src_port, 54321);
        // TCP with 19 bytes: incomplete.
        let mut short_tcp = TCP_SYN_V4;
        short_tcp[3] = 39;
        assert_eq!(transport_of(&short_tcp).dst_port, 0);
        // A non-first fragment: its first payload bytes are data, not ports.
        let mut frag = UDP_V4;
        Ipv4Packet::new_unchecked(&mut frag[..]).set_frag(false, false, 8);
        assert_eq!(
            transport_of(&frag),
            Transport {
                protocol: 17,
                src_port: 0,
                dst_port: 0
            }
        );
        // The first fragment has ports, but its datagram's other fragments do not: not read,
        // so that all of them hash alike.
        let mut first = UDP_V4;
        Ipv4Packet::new_unchecked(&mut first[..]).set_frag(false, true, 0);
        assert_eq!(transport_of(&first), transport_of(&frag));
        // IPv6 with a Fragment header first: not walked.
        let mut v6 = UDP_V6;
        v6[6] = protocol::IPV6_FRAG;
        assert_eq!(
            transport_of(&v6),
            Transport {
                protocol: 44,
                src_port: 0,
                dst_port: 0
            }
        );
    }

    #[test]
    fn hash_depends_on_every_field_and_direction() {
        let base = FlowKey::new(&IpPacket::new_checked(&UDP_V4[..]).unwrap());
        let h = base.hash();
        assert_eq!(h, flow_hash(&IpPacket::new_checked(&UDP_V4[..]).unwrap()));
        let reversed = FlowKey {
            src: base.dst,
            dst: base.src,
            ..base
        };
        assert_ne!(reversed.hash(), h);
        let mut other = base;
        other.transport.src_port += 1;
        assert_ne!(other.hash(), h);
        let mut other = base;
        other.transport.dst_port += 1;
        assert_ne!(other.hash(), h);
        let mut other = base;
        other.transport.protocol = 6;
        assert_ne!(other.hash(), h);
        let v6 = FlowKey::new(&IpPacket::new_checked(&UDP_V6[..]).unwrap());
        assert_ne!(
            v6.hash(),
            FlowKey {
                dst: "fd00::3".parse().unwrap(),
                ..v6
            }
            .hash()
        );
        // IPv4 and its mapped IPv6 form are different flows.
        let mapped = FlowKey {
            src: IpAddr::from(to_bits(base.src).to_be_bytes()),
            dst: IpAddr::from(to_bits(base.dst).to_be_bytes()),
            ..base
        };
        assert!(mapped.src.is_ipv6());
        assert_ne!(mapped.hash(), h);
    }

    #[test]
    fn hash_spreads_flows_over_workers() {
        // 40 000 random IPv4 UDP flows into 4 and 7 workers: every bucket within 5 % of fair.
        let mut rng = XorShift(0x0bad_cafe);
        for workers in [4u32, 7] {
            let mut buckets = vec![0u32; workers as usize];
            let n = 40_000;
            for _ in 0..n {
                let key = FlowKey {
                    src: IpAddr::from((0xc613_0000 | (rng.next_u32() & 0xffff)).to_be_bytes()),
                    dst: IpAddr::from((0xc613_0000 | (rng.next_u32() & 0xffff)).to_be_bytes()),
                    transport: Transport {
                        protocol: 17,
                        src_port: rng.next_u32() as u16,
                        dst_port: 8285,
                    },
                };
                buckets[(key.hash() % workers) as usize] += 1;
            }
            let fair = n / workers;
            for &b in &buckets {
                assert!(
                    b.abs_diff(fair) < fair / 20,
                    "{workers} workers: {buckets:?}"
                );
            }
        }
        // Flows differing only in the source port (one client, many connections) spread too.
        let mut buckets = [0u32; 4];
        for port in 0..4000u16 {
            let key = FlowKey {
                src: "198.19.1.2".parse().unwrap(),
                dst: "198.19.2.2".parse().unwrap(),
                transport: Transport {
                    protocol: 6,
                    src_port: 32768 + port,
                    dst_port: 443,
                },
            };
            buckets[(key.hash() % 4) as usize] += 1;
        }
        assert!(
            buckets.iter().all(|&b| b.abs_diff(1000) < 100),
            "{buckets:?}"
        );
    }
}
