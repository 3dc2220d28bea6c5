//! Per-packet data-path work: ICMP error construction and TTL decrement over a batch.
//!
//! Names are stable (`packet/<area>/<case>`) so results compare across commits. Add new areas
//! (e.g. the egress decision) as another `fn bench_<area>` using [`batch64`] and register it
//! in `criterion_group!` below.

use std::hint::black_box;
use std::net::{Ipv4Addr, Ipv6Addr};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use linen::wire::{
    Icmpv4Error, Icmpv6Error, Ipv4Packet, Ipv6Packet, MAX_ICMPV4_ERROR_LEN, MAX_ICMPV6_ERROR_LEN,
    build_icmpv4_error, build_icmpv6_error, protocol,
};

/// Packets per batch, as a worker reads them from its TUN queue.
const BATCH: usize = 64;

/// A valid IPv4 packet of `len` bytes (≥ 40) with a TCP or UDP header and patterned payload.
fn ipv4_packet(len: usize, proto: u8, src: Ipv4Addr, dst: Ipv4Addr, sport: u16) -> Vec<u8> {
    let mut buf: Vec<u8> = (0..len).map(|i| i as u8).collect();
    let mut ip = Ipv4Packet::new_unchecked(&mut buf[..]);
    ip.set_version(4);
    ip.set_header_len(20);
    ip.set_dscp_ecn(0);
    ip.set_total_len(len as u16);
    ip.set_ident(sport);
    ip.set_frag(true, false, 0);
    ip.set_ttl(64);
    ip.set_protocol(proto);
    ip.set_src_addr(src);
    ip.set_dst_addr(dst);
    ip.fill_checksum();
    let l4 = ip.payload_mut();
    l4[0..2].copy_from_slice(&sport.to_be_bytes());
    l4[2..4].copy_from_slice(&443u16.to_be_bytes());
    if proto == protocol::TCP {
        l4[12] = 0x50; // data offset 5
    }
    buf
}

/// A valid IPv6 packet of `len` bytes (≥ 60) with a TCP header and patterned payload.
fn ipv6_tcp_packet(len: usize, src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
    let mut buf: Vec<u8> = (0..len).map(|i| i as u8).collect();
    let mut ip = Ipv6Packet::new_unchecked(&mut buf[..]);
    ip.set_version(6);
    ip.set_traffic_class(0);
    ip.set_flow_label(0x1_2345);
    ip.set_payload_len((len - 40) as u16);
    ip.set_next_header(protocol::TCP);
    ip.set_hop_limit(64);
    ip.set_src_addr(src);
    ip.set_dst_addr(dst);
    buf
}

/// 64 realistic IPv4 packets from local pods (198.19.1.0/24) to other hosts' subnets: half
/// full-size TCP data (1400 bytes, MTU 1472 minus headroom), a quarter bare TCP ACKs (52 bytes
/// with timestamps), a quarter small UDP (128 bytes, DNS/QUIC-ish), spread over 8 sources and
/// 5 destination subnets so lookups and flow hashes vary.
fn batch64() -> Vec<Vec<u8>> {
    (0..BATCH)
        .map(|i| {
            let src = Ipv4Addr::new(198, 19, 1, 2 + (i % 8) as u8);
            let dst = Ipv4Addr::new(198, 19, 2 + (i % 5) as u8, 10 + (i % 7) as u8);
            let sport = 40_000 + i as u16;
            match i % 4 {
                0 | 1 => ipv4_packet(1400, protocol::TCP, src, dst, sport),
                2 => ipv4_packet(52, protocol::TCP, src, dst, sport),
                _ => ipv4_packet(128, protocol::UDP, src, dst, sport),
            }
        })
        .collect()
}

fn bench_icmp(c: &mut Criterion) {
    let mut group = c.benchmark_group("packet/icmp");
    group.throughput(Throughput::Elements(1));

    let tun_v4 = Ipv4Addr::new(198, 19, 1, 0);
    let original_v4 = ipv4_packet(
        1400,
        protocol::TCP,
        Ipv4Addr::new(198, 19, 1, 2),
        Ipv4Addr::new(198, 19, 77, 2),
        40_000,
    );
    let mut out_v4 = [0u8; MAX_ICMPV4_ERROR_LEN];
    group.bench_function("v4_net_unreachable", |b| {
        b.iter(|| {
            build_icmpv4_error(
                black_box(&original_v4),
                Icmpv4Error::NetUnreachable,
                tun_v4,
                black_box(&mut out_v4),
            )
        })
    });

    let tun_v6 = Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, 0);
    let original_v6 = ipv6_tcp_packet(
        1500,
        Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, 2),
        Ipv6Addr::new(0xfd00, 0, 0, 2, 0, 0, 0, 2),
    );
    let mut out_v6 = [0u8; MAX_ICMPV6_ERROR_LEN];
    group.bench_function("v6_packet_too_big", |b| {
        b.iter(|| {
            build_icmpv6_error(
                black_box(&original_v6),
                Icmpv6Error::PacketTooBig { mtu: 1452 },
                tun_v6,
                black_box(&mut out_v6),
            )
        })
    });
    group.finish();
}

fn bench_ttl(c: &mut Criterion) {
    let mut group = c.benchmark_group("packet/ttl");
    group.throughput(Throughput::Elements(BATCH as u64));
    let batch = batch64();
    group.bench_function("v4_decrement_batch64", |b| {
        // A fresh copy per batch (untimed): decrementing the same packets again would soon
        // reach TTL 0 and measure the saturating no-op instead. One copy per timed call keeps
        // the batch in cache, as it is right after the worker read it from the TUN.
        b.iter_batched_ref(
            || batch.clone(),
            |packets| {
                for buf in packets.iter_mut() {
                    if let Ok(mut ip) = Ipv4Packet::new_checked(&mut buf[..]) {
                        if ip.ttl() > 1 {
                            ip.decrement_ttl();
                        }
                        black_box(ip.checksum());
                    }
                }
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

/// A table of 1,000 peers (198.19.2.0/24 … in 198.19.0.0/16 and beyond) as the daemon builds it.
fn table_1000() -> linen::table::Snapshot {
    use linen::table::{LocalSubnets, Route, Snapshot};
    use std::net::SocketAddr;
    let routes = (0..1000u32).map(|i| {
        let n = 2 + i; // subnets 198.19.2.0/24 upwards, spilling into 198.20.x.0
        let a = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + (n << 8));
        Route {
            subnet: ipnetwork::IpNetwork::V4(ipnetwork::Ipv4Network::new(a, 24).unwrap()),
            next_hop: SocketAddr::from((Ipv4Addr::from(0xc612_0000 + n), 8285)),
        }
    });
    Snapshot::build(
        LocalSubnets {
            v4: Some("198.19.1.0/24".parse().unwrap()),
            v6: None,
        },
        routes,
        1,
    )
}

/// The whole egress decision (parse, TTL check, lookup, MTU check, TTL decrement, verdict) over
/// a batch of 64, against a 1,000-lease table; and the ingress decision (sender check, inner
/// source check, local destination) over the same packets as they arrive at their peer.
fn bench_decisions(c: &mut Criterion) {
    use linen::dataplane::forward::{self, Egress, ForwardConfig, IcmpLimiter, Ingress, PathMtus};
    use std::net::SocketAddr;
    use std::time::Instant;
    let snap = table_1000();
    let cfg = ForwardConfig {
        mtu: 1472,
        accept_unknown_senders: false,
    };
    let batch = batch64();
    let bytes: usize = batch.iter().map(Vec::len).sum();
    let mut group = c.benchmark_group("packet/egress");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("decide_batch64", |b| {
        let mut limiter = IcmpLimiter::default();
        let mut icmp = [0u8; 1280];
        // No peer behind a smaller hop: the common case, one emptiness check per packet.
        let paths = PathMtus::default();
        b.iter_batched_ref(
            || batch.clone(),
            |packets| {
                let now = Instant::now();
                let mut sent = 0usize;
                for buf in packets.iter_mut() {
                    if let Egress::Send { len, .. } =
                        forward::egress(buf, &snap, &cfg, &paths, &mut limiter, now, &mut icmp)
                    {
                        sent += len;
                    }
                }
                black_box(sent)
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();

    // The receiving host owns 198.19.2.0/24 and knows 198.19.1.0/24 as the sender's subnet.
    let peer_snap = linen::table::Snapshot::build(
        linen::table::LocalSubnets {
            v4: Some("198.19.2.0/24".parse().unwrap()),
            v6: None,
        },
        [linen::table::Route {
            subnet: "198.19.1.0/24".parse().unwrap(),
            next_hop: SocketAddr::from((Ipv4Addr::new(198, 18, 0, 1), 8285)),
        }],
        1,
    );
    let sender = SocketAddr::from((Ipv4Addr::new(198, 18, 0, 1), 8285));
    let mut group = c.benchmark_group("packet/ingress");
    group.throughput(Throughput::Bytes(bytes as u64));
    group.bench_function("decide_batch64", |b| {
        b.iter(|| {
            let mut delivered = 0usize;
            for buf in &batch {
                if let Ingress::Deliver { len } = forward::ingress(buf, sender, &peer_snap, &cfg) {
                    delivered += len;
                }
            }
            black_box(delivered)
        })
    });
    group.finish();
}

/// The Internet checksum of a full-size TCP segment (1448 bytes after the headers), as
/// coalescing verifies each received segment's before merging it.
fn bench_checksum(c: &mut Criterion) {
    let mut group = c.benchmark_group("packet/checksum");
    let data: Vec<u8> = (0..1448u32).map(|i| (i * 7 + 3) as u8).collect();
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.bench_function("data_1448_bytes", |b| {
        b.iter(|| black_box(linen::wire::checksum::data(black_box(&data))))
    });
    group.finish();
}

criterion_group!(
    benches,
    bench_icmp,
    bench_ttl,
    bench_decisions,
    bench_checksum
);
criterion_main!(benches);
