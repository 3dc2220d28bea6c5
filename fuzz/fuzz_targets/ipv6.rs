//! Arbitrary bytes as an IPv6 packet: parse, read every field, decrement the hop limit, build
//! every ICMPv6 error, and check the invariants the data path relies on.

#![no_main]

use std::net::Ipv6Addr;

use libfuzzer_sys::fuzz_target;
use linen::wire::{
    ICMP_HEADER_LEN, IPV6_HEADER_LEN, Icmpv6Error, Icmpv6Packet, IpPacket, Ipv6Packet,
    MAX_ICMPV6_ERROR_LEN, Suppress, build_icmpv6_error, flow_hash, protocol,
};

const TUN: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x100);

fuzz_target!(|data: &[u8]| {
    let Ok(packet) = Ipv6Packet::new_checked(data) else {
        let mut out = [0u8; MAX_ICMPV6_ERROR_LEN];
        let built = build_icmpv6_error(data, Icmpv6Error::TimeExceeded, TUN, &mut out);
        assert!(matches!(built, Err(Suppress::Malformed(_))));
        return;
    };
    let _ = (
        packet.version(),
        packet.traffic_class(),
        packet.flow_label(),
    );
    let _ = (packet.next_header(), packet.src_addr(), packet.dst_addr());
    assert!(packet.packet_len() <= data.len());
    assert_eq!(packet.packet().len(), packet.packet_len());
    assert_eq!(packet.payload().len(), usize::from(packet.payload_len()));

    let mut buf = data.to_vec();
    let mut p = Ipv6Packet::new_checked(&mut buf[..]).expect("checked above");
    let hop_limit = p.hop_limit();
    p.decrement_hop_limit();
    assert_eq!(p.hop_limit(), hop_limit.saturating_sub(1));
    assert_eq!(buf.len(), data.len());
    assert!(
        buf.iter()
            .zip(data)
            .enumerate()
            .all(|(i, (a, b))| a == b || i == 7)
    );

    let ip = IpPacket::new_checked(data).expect("a checked IPv6 packet is an IpPacket");
    assert_eq!(ip.packet_len(), packet.packet_len());
    let _ = flow_hash(&ip);

    let short = IPV6_HEADER_LEN + ICMP_HEADER_LEN + data.len() % 1300;
    for out_len in [MAX_ICMPV6_ERROR_LEN, short] {
        let mtu = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        for kind in [
            Icmpv6Error::NoRoute,
            Icmpv6Error::PacketTooBig { mtu },
            Icmpv6Error::TimeExceeded,
        ] {
            check_error(&packet, kind, out_len);
        }
    }
});

fn check_error(original: &Ipv6Packet<&[u8]>, kind: Icmpv6Error, out_len: usize) {
    let mut out = [0u8; 2 * MAX_ICMPV6_ERROR_LEN];
    let len = match build_icmpv6_error(original.into_inner(), kind, TUN, &mut out[..out_len]) {
        Ok(len) => len,
        // The header checked out, so only the extension header chain can be truncated.
        Err(Suppress::Malformed(linen::wire::Error::Truncated)) => return,
        Err(Suppress::Malformed(e)) => panic!("checked packet refused as malformed: {e}"),
        Err(_) => return,
    };
    assert!(len <= MAX_ICMPV6_ERROR_LEN && len <= out_len);
    let ip = Ipv6Packet::new_checked(&out[..len]).expect("the error parses as IPv6");
    assert_eq!(ip.packet_len(), len);
    assert_eq!(
        (ip.next_header(), ip.hop_limit(), ip.src_addr()),
        (protocol::ICMPV6, 64, TUN)
    );
    assert_eq!(ip.dst_addr(), original.src_addr());
    let icmp = Icmpv6Packet::new_checked(ip.payload()).expect("the error parses as ICMPv6");
    assert!(icmp.verify_checksum(&ip.src_addr(), &ip.dst_addr()));
    assert!(icmp.is_error());
    match kind {
        Icmpv6Error::PacketTooBig { mtu } => assert_eq!(icmp.mtu(), Some(mtu)),
        _ => assert_eq!(icmp.mtu(), None),
    }
    let quote = icmp.data();
    let room = out_len.min(MAX_ICMPV6_ERROR_LEN) - IPV6_HEADER_LEN - ICMP_HEADER_LEN;
    assert_eq!(
        quote.len(),
        original.packet_len().min(room),
        "quotes as much as fits"
    );
    assert_eq!(quote, &original.packet()[..quote.len()]);
    // Never answered: an ICMPv6 error directly after the header, a multicast destination
    // (except Packet Too Big).
    if original.next_header() == protocol::ICMPV6 {
        assert!(original.payload().first().is_some_and(|&t| t >= 128));
    }
    if original.dst_addr().is_multicast() {
        assert!(matches!(kind, Icmpv6Error::PacketTooBig { .. }));
    }
}
