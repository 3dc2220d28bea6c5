//! Arbitrary bytes as an IPv4 packet: parse, read every field, decrement the TTL, build every
//! ICMPv4 error, and check the invariants the data path relies on.

#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use linen::wire::{
    ICMP_HEADER_LEN, IPV4_HEADER_LEN, Icmpv4Error, Icmpv4Packet, IpPacket, Ipv4Packet,
    MAX_ICMPV4_ERROR_LEN, Suppress, build_icmpv4_error, flow_hash, protocol,
};

const TUN: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 0);

fuzz_target!(|data: &[u8]| {
    let Ok(packet) = Ipv4Packet::new_checked(data) else {
        // Whatever the check refuses, the builder refuses as malformed.
        let mut out = [0u8; MAX_ICMPV4_ERROR_LEN];
        let built = build_icmpv4_error(data, Icmpv4Error::TimeExceeded, TUN, &mut out);
        assert!(matches!(built, Err(Suppress::Malformed(_))));
        return;
    };
    read_every_field(&packet, data.len());
    decrement_keeps_checksum(data);
    let ip = IpPacket::new_checked(data).expect("a checked IPv4 packet is an IpPacket");
    assert_eq!(ip.packet_len(), packet.packet_len());
    let _ = flow_hash(&ip);

    // A full-size output buffer, and one whose size comes from the input (quotes less).
    let short = IPV4_HEADER_LEN + ICMP_HEADER_LEN + data.len() % 600;
    for out_len in [MAX_ICMPV4_ERROR_LEN, short] {
        for kind in [
            Icmpv4Error::NetUnreachable,
            Icmpv4Error::FragNeeded {
                mtu: u16::from_le_bytes([data[0], data[1]]),
            },
            Icmpv4Error::TimeExceeded,
        ] {
            check_error(&packet, kind, out_len);
        }
    }
});

fn read_every_field(p: &Ipv4Packet<&[u8]>, buffer_len: usize) {
    let _ = (
        p.version(),
        p.dscp_ecn(),
        p.ident(),
        p.dont_frag(),
        p.more_frags(),
    );
    let _ = (
        p.frag_offset(),
        p.ttl(),
        p.protocol(),
        p.checksum(),
        p.verify_checksum(),
    );
    let _ = (p.src_addr(), p.dst_addr());
    let header_len = usize::from(p.header_len());
    assert!(header_len >= IPV4_HEADER_LEN);
    assert!(p.packet_len() <= buffer_len);
    assert_eq!(p.packet().len(), p.packet_len());
    assert_eq!(p.header().len(), header_len);
    assert_eq!(p.payload().len(), p.packet_len() - header_len);
}

/// A header whose checksum verified still verifies after the decrement; only the TTL and the
/// checksum change, and the length is conserved.
fn decrement_keeps_checksum(data: &[u8]) {
    let mut buf = data.to_vec();
    let mut p = Ipv4Packet::new_checked(&mut buf[..]).expect("checked above");
    let verified = p.verify_checksum();
    let ttl = p.ttl();
    p.decrement_ttl();
    assert_eq!(p.ttl(), ttl.saturating_sub(1));
    if verified {
        assert!(p.verify_checksum(), "decrement_ttl broke a valid checksum");
    }
    assert_eq!(buf.len(), data.len());
    for (i, (a, b)) in buf.iter().zip(data).enumerate() {
        assert!(a == b || matches!(i, 8 | 10 | 11), "byte {i} changed");
    }
}

fn check_error(original: &Ipv4Packet<&[u8]>, kind: Icmpv4Error, out_len: usize) {
    let mut out = [0u8; 2 * MAX_ICMPV4_ERROR_LEN];
    let len = match build_icmpv4_error(original.into_inner(), kind, TUN, &mut out[..out_len]) {
        Ok(len) => len,
        Err(Suppress::Malformed(e)) => panic!("checked packet refused as malformed: {e}"),
        Err(_) => return,
    };
    assert!(len <= MAX_ICMPV4_ERROR_LEN && len <= out_len);
    let ip = Ipv4Packet::new_checked(&out[..len]).expect("the error parses as IPv4");
    assert_eq!(ip.packet_len(), len);
    assert!(ip.verify_checksum());
    assert_eq!((ip.protocol(), ip.src_addr()), (protocol::ICMP, TUN));
    assert_eq!(ip.dst_addr(), original.src_addr());
    let icmp = Icmpv4Packet::new_checked(ip.payload()).expect("the error parses as ICMP");
    assert!(icmp.verify_checksum());
    assert!(icmp.is_error());
    match kind {
        Icmpv4Error::FragNeeded { mtu } => assert_eq!(icmp.mtu(), Some(mtu)),
        _ => assert_eq!(icmp.mtu(), None),
    }
    let quote = icmp.data();
    let room = out_len.min(MAX_ICMPV4_ERROR_LEN) - IPV4_HEADER_LEN - ICMP_HEADER_LEN;
    assert_eq!(
        quote.len(),
        original.packet_len().min(room),
        "quotes as much as fits"
    );
    assert_eq!(quote, &original.packet()[..quote.len()]);
    // Never answered: ICMP errors and non-first fragments.
    assert_eq!(original.frag_offset(), 0);
    if original.protocol() == protocol::ICMP {
        let original_icmp = Icmpv4Packet::new_unchecked(original.payload());
        assert!(!original.payload().is_empty() && !original_icmp.is_error());
    }
}
