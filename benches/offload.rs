//! Per-byte offload work on the data path: splitting a TUN super-packet (TSO, 64 KiB) into
//! MTU-sized segments with their headers and checksums fixed, as every offloaded TUN read does
//! (tun-rs `gso_split`, which linen's workers call through `recv_multiple`).
//!
//! Then the send-side batching that follows it: runs of packets for one peer gathered for one
//! UDP GSO send (`dataplane::batch`). And the write side: walking a UDP GRO receive buffer of
//! segments and deciding which coalesce into one TSO/USO super-packet (`dataplane::coalesce`),
//! plus building its header — everything but the `writev` itself, which the namespace
//! benchmark (`linen bench`) measures end to end.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use linen::dataplane::batch::Run;
use linen::dataplane::coalesce::{self, MAX_HEADER};
use tun_rs::{VIRTIO_NET_HDR_GSO_TCPV4, VirtioNetHdr, gso_split};

/// Overlay MTU over a 1500-byte IPv4 underlay.
const MTU: usize = 1472;
/// TCP payload per segment: MTU − 20 (IPv4) − 32 (TCP with timestamps).
const MSS: usize = MTU - 52;

/// A TSO super-packet as the kernel hands it to the TUN: one IPv4/TCP header (with the
/// timestamp option) and `segments` MSS-sized payloads, the TCP checksum field holding the
/// pseudo-header sum (`NEEDS_CSUM`).
fn super_packet(segments: usize) -> (Vec<u8>, VirtioNetHdr) {
    let payload = segments * MSS;
    let len = 52 + payload;
    let mut p: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
    p[..20].copy_from_slice(&[
        0x45,
        0,
        (len >> 8) as u8,
        len as u8,
        0x12,
        0x34,
        0x40,
        0,
        64,
        6,
        0,
        0,
        198,
        19,
        1,
        2,
        198,
        19,
        2,
        2,
    ]);
    // TCP: ports, seq, ack, data offset 8 (32 bytes), ACK|PSH, window, checksum, urgent, options.
    p[20..52].copy_from_slice(&[
        0x9c, 0x40, 0x01, 0xbb, 0, 0, 0x10, 0, 0, 0, 0x20, 0, 0x80, 0x18, 0x01, 0xf5, 0, 0, 0, 0,
        1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2,
    ]);
    let hdr = VirtioNetHdr {
        flags: 1, // VIRTIO_NET_HDR_F_NEEDS_CSUM
        gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
        hdr_len: 52,
        gso_size: MSS as u16,
        csum_start: 20,
        csum_offset: 16,
    };
    (p, hdr)
}

fn bench_gso_split(c: &mut Criterion) {
    let mut group = c.benchmark_group("offload/gso_split");
    for segments in [8usize, 44] {
        let (packet, hdr) = super_packet(segments);
        let mut out = vec![vec![0u8; MTU]; 128];
        let mut sizes = vec![0usize; 128];
        let n = gso_split(&mut packet.clone(), hdr, &mut out, &mut sizes, 0, false)
            .expect("the benchmark's super-packet splits");
        assert_eq!(n, segments);
        assert!(sizes[..n].iter().all(|&s| s == MTU));
        group.throughput(Throughput::Bytes(packet.len() as u64));
        group.bench_function(format!("tcpv4_{segments}_segments"), |b| {
            let mut input = packet.clone();
            b.iter(|| {
                input.copy_from_slice(&packet);
                black_box(gso_split(&mut input, hdr, &mut out, &mut sizes, 0, false).unwrap())
            })
        });
    }
    group.finish();
}

/// A receive buffer as UDP GRO fills it: `n` segments at a stride of their size, each a full
/// copy of `first` with the TCP sequence number advanced (TCP) or as is (UDP).
fn gro_buffer(first: &[u8], n: usize, tcp: bool) -> Vec<u8> {
    let mut buf = Vec::with_capacity(first.len() * n);
    for i in 0..n {
        let mut seg = first.to_vec();
        if tcp {
            let seq = (i * (first.len() - 52)) as u32;
            seg[24..28].copy_from_slice(&seq.to_be_bytes());
        }
        fill_checksums(&mut seg);
        buf.extend_from_slice(&seg);
    }
    buf
}

/// Sets an IPv4 segment's header and TCP/UDP checksums, as a peer's kernel sent them
/// (coalescing verifies both).
fn fill_checksums(p: &mut [u8]) {
    use linen::wire::checksum::{combine, data};
    p[10..12].copy_from_slice(&[0, 0]);
    let c = !data(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    let at = 20 + if p[9] == 17 { 6 } else { 16 };
    p[at..at + 2].copy_from_slice(&[0, 0]);
    let len = (p.len() - 20) as u16;
    let c = !combine(&[data(&p[12..20]), u16::from(p[9]), len, data(&p[20..])]);
    p[at..at + 2].copy_from_slice(&(if c == 0 { 0xffff } else { c }).to_be_bytes());
}

/// The decisions the worker makes per received segment, then the super-packet header: returns
/// the segments coalesced and the header length.
fn coalesce_run(buf: &[u8], stride: usize, uso: bool, header: &mut [u8]) -> (usize, usize) {
    let mut run: Option<coalesce::Run> = None;
    for (k, seg) in buf.chunks(stride).enumerate() {
        let next = coalesce::classify(seg, uso).expect("a coalescable segment");
        match &mut run {
            Some(r) => {
                if !r.try_append(buf, stride, k, seg, next) {
                    break;
                }
            }
            None => run = Some(coalesce::Run::new(k, next)),
        }
    }
    let run = run.expect("at least one segment");
    (run.count, run.write_header(buf, stride, header))
}

fn bench_coalesce(c: &mut Criterion) {
    let mut group = c.benchmark_group("offload/coalesce");
    let mut header = [0u8; MAX_HEADER];
    // 44 full-size TCP segments (one 64 KiB GRO buffer), as a bulk transfer receives them.
    let (sp, _) = super_packet(1);
    let mut first = sp[..MTU].to_vec();
    first[33] = 0x10; // ACK only: PSH would end the run
    let tcp = gro_buffer(&first, 44, true);
    // 64 UDP datagrams of 64 bytes (iperf3 -l 64), as the 64-byte rate test receives them.
    let mut udp = vec![0u8; 20 + 8 + 64];
    udp[..20].copy_from_slice(&first[..20]);
    udp[2..4].copy_from_slice(&(92u16).to_be_bytes());
    udp[9] = 17;
    udp[20..28].copy_from_slice(&[0x1f, 0x90, 0x14, 0x51, 0, 72, 0x12, 0x34]);
    let udp = gro_buffer(&udp, 64, false);
    for (name, buf, stride, segments) in [
        ("tcpv4_44_segments", &tcp, MTU, 44),
        ("udpv4_64_datagrams_of_64_bytes", &udp, 92, 64),
    ] {
        assert_eq!(coalesce_run(buf, stride, true, &mut header).0, segments);
        group.throughput(Throughput::Bytes(buf.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| black_box(coalesce_run(black_box(buf), stride, true, &mut header)))
        });
    }
    group.finish();
}

/// The send side of a TUN batch: packets for one peer in MTU-stride arena slots join a run
/// (`Run::try_extend`) and are made contiguous for one UDP GSO send (`Run::gather`).
fn bench_gso_batch(c: &mut Criterion) {
    let mut group = c.benchmark_group("offload/gso_batch");
    let peer = std::net::SocketAddr::from(([198, 18, 0, 2], 8285));
    for (name, len, count) in [
        ("64_packets_of_92_bytes", 92usize, 64usize),
        ("44_packets_of_mtu", MTU, 44),
    ] {
        let mut arena = vec![0x5au8; MTU * count];
        let run_of = || {
            let mut run = Run::new(peer, 0, len, 64);
            for _ in 1..count {
                assert!(run.try_extend(peer, len));
            }
            run
        };
        assert_eq!(run_of().n, count);
        group.throughput(Throughput::Bytes((len * count) as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                let run = run_of();
                black_box(run.gather(black_box(&mut arena), MTU))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_gso_split, bench_coalesce, bench_gso_batch);
criterion_main!(benches);
