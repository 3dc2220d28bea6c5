//! Receive-side TCP coalescing for the TUN, sans-IO: consecutive IPv4/TCP segments of one flow,
//! as a peer's GSO send produced them, become one TSO super-packet written with `writev` —
//! a virtio-net header plus the first segment's headers, then every segment's payload in
//! place, with no copy (the rule set is Linux GRO's: same flow, contiguous sequence numbers,
//! equal-size segments but the last, identical TCP options, ACK-only flags, PSH on the last).
//!
//! Must not import tokio, `lease` or `daemon`.

/// What coalescing needs to know of one segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// IPv4 + TCP header bytes.
    pub header_len: usize,
    /// TCP payload bytes.
    pub payload_len: usize,
    /// TCP sequence number.
    pub seq: u32,
    /// TCP flags byte.
    pub flags: u8,
}

const ACK: u8 = 0x10;
const PSH: u8 = 0x08;

/// The segment's coalescing facts, or `None` when it cannot take part: not IPv4 without
/// options, not TCP, a fragment, flags other than ACK (and PSH), or no payload.
pub fn tcp_v4(pkt: &[u8]) -> Option<Segment> {
    if pkt.len() < 40 || pkt[0] != 0x45 || pkt[9] != 6 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
    // MF or a fragment offset: not a whole segment.
    if u16::from_be_bytes([pkt[6], pkt[7]]) & 0x3fff != 0 || total > pkt.len() {
        return None;
    }
    let tcp_len = usize::from(pkt[32] >> 4) * 4;
    let header_len = 20 + tcp_len;
    let flags = pkt[33];
    if tcp_len < 20 || header_len >= total || flags & !(ACK | PSH) != 0 || flags & ACK == 0 {
        return None;
    }
    Some(Segment {
        header_len,
        payload_len: total - header_len,
        seq: u32::from_be_bytes([pkt[24], pkt[25], pkt[26], pkt[27]]),
        flags,
    })
}

/// Whether `next` may follow a run that starts with `head` and ends with `last`: same flow and
/// header shape (addresses, ports, ack, window, options, TTL, TOS, DF), the next sequence number,
/// the run's segments so far all `head`'s size, `next` no larger, no PSH before the end, and the
/// super-packet under 64 KiB.
pub fn can_append(
    head_pkt: &[u8],
    head: &Segment,
    last: &Segment,
    run_payload: usize,
    next_pkt: &[u8],
    next: &Segment,
) -> bool {
    let h = head.header_len;
    next.header_len == h
        && last.payload_len == head.payload_len
        && last.flags & PSH == 0
        && next.payload_len <= head.payload_len
        && next.seq == last.seq.wrapping_add(last.payload_len as u32)
        && h + run_payload + next.payload_len <= 65_535
        // TOS, DF, TTL, protocol and addresses (bytes 1, 6, 8..10, 12..20), ports and ack and
        // window (20..24, 28..32, 34..36), and the TCP options (40..h).
        && head_pkt[1] == next_pkt[1]
        && head_pkt[6] & 0x40 == next_pkt[6] & 0x40
        && head_pkt[8..10] == next_pkt[8..10]
        && head_pkt[12..24] == next_pkt[12..24]
        && head_pkt[28..32] == next_pkt[28..32]
        && head_pkt[34..36] == next_pkt[34..36]
        && head_pkt[40..h] == next_pkt[40..h]
}

/// Writes the virtio-net header and the super-packet's IPv4/TCP headers into `out` (at least
/// 10 + `head.header_len` bytes) and returns their length: the head's headers with the total
/// length and IPv4 checksum for `payload` bytes, PSH when the last segment had it, and the TCP
/// checksum field holding the pseudo-header sum, as `VIRTIO_NET_HDR_F_NEEDS_CSUM` asks.
pub fn write_header(
    head_pkt: &[u8],
    head: &Segment,
    payload: usize,
    last_flags: u8,
    out: &mut [u8],
) -> usize {
    let h = head.header_len;
    // virtio_net_hdr, native endian (TUN's default): NEEDS_CSUM, GSO_TCPV4, hdr_len,
    // gso_size, csum_start, csum_offset.
    out[0] = 1;
    out[1] = 1;
    out[2..4].copy_from_slice(&(h as u16).to_ne_bytes());
    out[4..6].copy_from_slice(&(head.payload_len as u16).to_ne_bytes());
    out[6..8].copy_from_slice(&20u16.to_ne_bytes());
    out[8..10].copy_from_slice(&16u16.to_ne_bytes());
    let ip = &mut out[10..10 + h];
    ip.copy_from_slice(&head_pkt[..h]);
    let total = (h + payload) as u16;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[10..12].copy_from_slice(&[0, 0]);
    let c = !fold(sum(&ip[..20]));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip[33] = (ip[33] & !PSH) | (last_flags & PSH);
    let tcp_len = (total as usize - 20) as u32;
    let pseudo = fold(sum(&ip[12..20]) + 6 + tcp_len);
    ip[36..38].copy_from_slice(&pseudo.to_be_bytes());
    10 + h
}

fn sum(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum()
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

#[cfg(test)]
mod test {
    use super::*;

    /// An IPv4/TCP segment with the timestamp option, `payload` bytes, sequence `seq`.
    fn seg(seq: u32, payload: usize, flags: u8) -> Vec<u8> {
        let total = 52 + payload;
        let mut p = vec![0u8; total];
        p[..20].copy_from_slice(&[
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0,
            1,
            0x40,
            0,
            63,
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
        p[20..24].copy_from_slice(&[0x9c, 0x40, 0x01, 0xbb]);
        p[24..28].copy_from_slice(&seq.to_be_bytes());
        p[28..32].copy_from_slice(&7u32.to_be_bytes());
        p[32] = 0x80;
        p[33] = flags;
        p[34..36].copy_from_slice(&[1, 0]);
        p[40..52].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 3]);
        let c = !fold(sum(&p[..20]));
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p
    }

    #[test]
    fn consecutive_segments_coalesce_and_the_header_is_right() {
        let a = seg(1000, 1420, ACK);
        let b = seg(2420, 1420, ACK);
        let c = seg(3840, 500, ACK | PSH);
        let (sa, sb, sc) = (
            tcp_v4(&a).unwrap(),
            tcp_v4(&b).unwrap(),
            tcp_v4(&c).unwrap(),
        );
        assert_eq!(sa.header_len, 52);
        assert!(can_append(&a, &sa, &sa, 1420, &b, &sb));
        assert!(can_append(&a, &sa, &sb, 2840, &c, &sc));
        let mut out = [0u8; 128];
        let n = write_header(&a, &sa, 3340, sc.flags, &mut out);
        assert_eq!(n, 62);
        assert_eq!(u16::from_ne_bytes([out[4], out[5]]), 1420, "gso_size");
        let ip = &out[10..62];
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 52 + 3340);
        assert_eq!(fold(sum(&ip[..20])), 0xffff, "valid IPv4 checksum");
        assert_eq!(ip[33], ACK | PSH);
        // Pseudo-header: 198.19.1.2 + 198.19.2.2 + 6 + (32 + 3340), folded.
        let expected = fold(0xc613 + 0x0102 + 0xc613 + 0x0202 + 6 + 32 + 3340);
        assert_eq!(u16::from_be_bytes([ip[36], ip[37]]), expected);
    }

    #[test]
    fn gaps_flow_changes_and_odd_segments_break_a_run() {
        let a = seg(1000, 1420, ACK);
        let sa = tcp_v4(&a).unwrap();
        let gap = seg(9999, 1420, ACK);
        assert!(!can_append(
            &a,
            &sa,
            &sa,
            1420,
            &gap,
            &tcp_v4(&gap).unwrap()
        ));
        let bigger = seg(2420, 1421, ACK);
        assert!(!can_append(
            &a,
            &sa,
            &sa,
            1420,
            &bigger,
            &tcp_v4(&bigger).unwrap()
        ));
        let mut other_port = seg(2420, 1420, ACK);
        other_port[21] = 0xbc;
        assert!(!can_append(
            &a,
            &sa,
            &sa,
            1420,
            &other_port,
            &tcp_v4(&other_port).unwrap()
        ));
        let mut other_ts = seg(2420, 1420, ACK);
        other_ts[47] = 10;
        assert!(!can_append(
            &a,
            &sa,
            &sa,
            1420,
            &other_ts,
            &tcp_v4(&other_ts).unwrap()
        ));
        // After a short segment nothing more may follow.
        let short = seg(2420, 100, ACK);
        let ss = tcp_v4(&short).unwrap();
        let after = seg(2520, 100, ACK);
        assert!(!can_append(
            &a,
            &sa,
            &ss,
            1520,
            &after,
            &tcp_v4(&after).unwrap()
        ));
        // SYN, FIN, pure ACKs without payload and fragments do not take part.
        assert!(tcp_v4(&seg(1, 10, 0x02 | ACK)).is_none());
        assert!(tcp_v4(&seg(1, 10, 0x01 | ACK)).is_none());
        assert!(tcp_v4(&seg(1, 0, ACK)).is_none());
        let mut frag = seg(1, 10, ACK);
        frag[6] = 0x20;
        assert!(tcp_v4(&frag).is_none());
    }
}
