//! Per-byte offload work on the data path: splitting a TUN super-packet (TSO, 64 KiB) into
//! MTU-sized segments with their headers and checksums fixed, as every offloaded TUN read does
//! (tun-rs `gso_split`, which linen's workers call through `recv_multiple`).
//!
//! GRO coalescing on the write side runs inside tun-rs's `send_multiple` and needs a device; the
//! namespace benchmark (`linen bench`) measures it end to end.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
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

criterion_group!(benches, bench_gso_split);
criterion_main!(benches);
