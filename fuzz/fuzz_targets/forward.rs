//! The per-packet forwarding decisions on arbitrary bytes against a small fixed table: never
//! panic; a forwarded packet keeps its length, loses exactly one TTL and (IPv4) keeps a valid
//! header checksum if it had one; an ICMP reply parses back with a valid checksum; a packet
//! larger than its peer's learned path MTU goes alone, and any advice to its sender parses;
//! ingress only delivers packets from a known sender whose inner source it owns.
#![no_main]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use linen::dataplane::forward::{
    self, Asked, Egress, ForwardConfig, IcmpLimiter, Ingress, PathMtus,
};
use linen::table::{LocalSubnets, Route, Snapshot};
use linen::wire::{Icmpv4Packet, IpPacket, Ipv4Packet};

fn table() -> Snapshot {
    let routes = (2..6u8).map(|i| Route {
        subnet: format!("198.19.{i}.0/24").parse().unwrap(),
        next_hop: SocketAddr::from((Ipv4Addr::new(198, 18, 0, i), 8285)),
    });
    Snapshot::build(
        LocalSubnets {
            v4: Some("198.19.1.0/24".parse().unwrap()),
            v6: Some("fd00:19:0:1::/64".parse().unwrap()),
        },
        routes,
        1,
    )
}

fuzz_target!(|data: &[u8]| {
    let snap = table();
    let cfg = ForwardConfig {
        mtu: 1400,
        accept_unknown_senders: data.first().is_some_and(|b| b & 1 == 1),
    };
    let mut pkt = data.to_vec();
    let before = IpPacket::new_checked(data)
        .ok()
        .map(|p| (p.packet_len(), p.hop_limit()));
    let v4_ok_before = Ipv4Packet::new_checked(data).is_ok_and(|p| p.verify_checksum());
    let mut icmp = [0u8; 1280];
    let mut limiter = IcmpLimiter::default();
    // Host 3 sits behind a smaller hop: its path carries 1000 to 1255 bytes (the second byte).
    let now = Instant::now();
    let mut paths = PathMtus::default();
    let path = 1000 + usize::from(data.get(1).copied().unwrap_or(0));
    let host3 = SocketAddr::from((Ipv4Addr::new(198, 18, 0, 3), 8285));
    paths.learn(host3, Some(path), now, Asked::Refused);
    let check_icmp = |reply: &[u8]| {
        let len = reply.len();
        assert!(len <= 1280);
        let reply = IpPacket::new_checked(reply).expect("ICMP reply parses");
        assert_eq!(reply.packet_len(), len);
        if let IpPacket::V4(v4) = &reply {
            assert!(v4.verify_checksum());
            assert!(
                Icmpv4Packet::new_checked(v4.payload())
                    .unwrap()
                    .verify_checksum()
            );
        }
    };
    match forward::egress(&mut pkt, &snap, &cfg, &paths, &mut limiter, now, &mut icmp) {
        Egress::Send { len, .. } => {
            let (plen, ttl) = before.expect("only parsed packets are sent");
            assert_eq!(len, plen);
            let after = IpPacket::new_checked(&pkt[..]).unwrap();
            assert_eq!(after.hop_limit(), ttl - 1);
            assert!(len <= cfg.mtu);
            if v4_ok_before {
                assert!(Ipv4Packet::new_checked(&pkt[..]).unwrap().verify_checksum());
            }
        }
        Egress::SendAlone { peer, len, icmp: n } => {
            let (plen, ttl) = before.expect("only parsed packets are sent");
            assert_eq!(peer, host3);
            assert_eq!(len, plen);
            assert!(len > path && len <= cfg.mtu);
            let after = IpPacket::new_checked(&pkt[..]).unwrap();
            assert_eq!(after.hop_limit(), ttl - 1);
            if n > 0 {
                check_icmp(&icmp[..n]);
            }
        }
        Egress::Icmp { len, .. } => check_icmp(&icmp[..len]),
        Egress::Drop(_) => {}
    }
    let sender = SocketAddr::from((Ipv4Addr::new(198, 18, 0, 2), 8285));
    if let Ingress::Deliver { len } = forward::ingress(data, sender, &snap, &cfg) {
        let p = IpPacket::new_checked(data).expect("only parsed packets are delivered");
        assert_eq!(len, p.packet_len());
        // The TUN device's address is the local subnet's network address, so local too.
        assert!(snap.is_local(p.dst_addr()));
        assert!(snap.sender_owns(sender.ip(), p.src_addr()));
    }
});
