//! Receive-side coalescing for the TUN, sans-IO: consecutive segments of one flow, as a peer's
//! GSO send produced them, become one super-packet written with `writev` — a virtio-net header
//! plus the first segment's headers, then every segment's payload in place, with no copy.
//!
//! - TCP over IPv4 and IPv6 becomes a TSO super-packet. The rule set is Linux GRO's: same flow,
//!   contiguous sequence numbers, equal-size segments but the last, identical TCP options,
//!   ACK-only flags, PSH on the last.
//! - UDP over IPv4 and IPv6 becomes a USO super-packet (`VIRTIO_NET_HDR_GSO_UDP_L4`, kernel 6.2+,
//!   only when the device accepted `TUN_F_USO4|6`): same flow, equal-size datagrams but the last.
//!   The receiving kernel splits it again before any socket sees it.
//!
//! IPv4 options, IPv6 extension headers and fragments never coalesce; such packets are written
//! one by one. Must not import tokio, `lease` or `daemon`.

use crate::wire::checksum;

/// What coalescing needs to know of one segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// IPv6 (else IPv4).
    pub v6: bool,
    /// UDP (else TCP).
    pub udp: bool,
    /// IP header bytes (20 or 40).
    pub ip_len: usize,
    /// IP + TCP/UDP header bytes.
    pub header_len: usize,
    /// Transport payload bytes.
    pub payload_len: usize,
    /// TCP sequence number (0 for UDP).
    pub seq: u32,
    /// TCP flags byte (0 for UDP).
    pub flags: u8,
}

const ACK: u8 = 0x10;
const PSH: u8 = 0x08;
const TCP: u8 = 6;
const UDP: u8 = 17;

/// virtio-net `gso_type` values.
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_UDP_L4: u8 = 5;
/// virtio-net header length (no `num_buffers`).
pub const VNET_HDR_LEN: usize = 10;

/// Largest header `write_header` produces: virtio-net + IPv6 + TCP with 40 bytes of options.
pub const MAX_HEADER: usize = VNET_HDR_LEN + 40 + 60;

/// The segment's coalescing facts, or `None` when it cannot take part: IPv4 with options or
/// without DF (Linux GRO would want its IDs to count up; a super-packet cannot say so), IPv6
/// with extension headers, a fragment, no payload, TCP with flags other than ACK (and PSH) or
/// with AE or reserved bits (AccECN feedback would be lost: the head's bits go to all), UDP
/// with a length field that disagrees with the IP header or no checksum (coalescing would give
/// it one), UDP at all when `udp` is false (the device has no USO), and any segment whose
/// checksums do not verify.
pub fn classify(pkt: &[u8], udp: bool) -> Option<Segment> {
    let (v6, ip_len, total, proto) = match pkt.first()? >> 4 {
        4 if pkt.len() >= 20 && pkt[0] == 0x45 => {
            // MF or a fragment offset (not a whole segment), no DF, or the reserved flag bit
            // (Linux GRO merges none of these: only DF may be set).
            if u16::from_be_bytes([pkt[6], pkt[7]]) != 0x4000 {
                return None;
            }
            (
                false,
                20,
                usize::from(u16::from_be_bytes([pkt[2], pkt[3]])),
                pkt[9],
            )
        }
        6 if pkt.len() >= 40 => {
            let payload = usize::from(u16::from_be_bytes([pkt[4], pkt[5]]));
            (true, 40, 40 + payload, pkt[6])
        }
        _ => return None,
    };
    if total > pkt.len() || total < ip_len {
        return None;
    }
    let l4 = &pkt[ip_len..total];
    let seg = match proto {
        TCP if l4.len() >= 20 => {
            let tcp_len = usize::from(l4[12] >> 4) * 4;
            let flags = l4[13];
            if tcp_len < 20
                || tcp_len >= l4.len()
                || l4[12] & 0x0f != 0
                || flags & !(ACK | PSH) != 0
                || flags & ACK == 0
            {
                return None;
            }
            Some(Segment {
                v6,
                udp: false,
                ip_len,
                header_len: ip_len + tcp_len,
                payload_len: l4.len() - tcp_len,
                seq: u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]),
                flags,
            })
        }
        UDP if udp && l4.len() > 8 => {
            let len = usize::from(u16::from_be_bytes([l4[4], l4[5]]));
            // IPv4 without a checksum, or IPv6 with the zero that means none (invalid there).
            if len != l4.len() || l4[6..8] == [0, 0] {
                return None;
            }
            Some(Segment {
                v6,
                udp: true,
                ip_len,
                header_len: ip_len + 8,
                payload_len: len - 8,
                seq: 0,
                flags: 0,
            })
        }
        _ => None,
    }?;
    checksums_ok(pkt, v6, proto, l4).then_some(seg)
}

/// Whether a segment's IPv4 header checksum and TCP/UDP checksum verify. The super-packet goes
/// to the kernel with `NEEDS_CSUM`, which it trusts: a segment corrupted before its outer UDP
/// checksum was computed (a sender kernel's UDP GSO bug, say) would reach the socket unseen.
/// Linux GRO checks each segment too; one that fails is written alone, as it came, and the
/// kernel drops it.
#[inline]
fn checksums_ok(pkt: &[u8], v6: bool, proto: u8, l4: &[u8]) -> bool {
    if !v6 && checksum::data(&pkt[..20]) != 0xffff {
        return false;
    }
    let Ok(len) = u16::try_from(l4.len()) else {
        return false;
    };
    checksum::combine(&[pseudo_header(pkt, v6, proto, len), checksum::data(l4)]) == 0xffff
}

/// Whether `next` may follow a run that starts with `head` and ends with `last`: the same
/// flow and header shape (addresses, ports, TOS/traffic class, DF, TTL/hop limit, flow label;
/// for TCP also ack, window and options), the run's segments so far all `head`'s size, `next`
/// no larger, the super-packet under 64 KiB, and for TCP the next sequence number and no PSH
/// before the end.
pub fn can_append(
    head_pkt: &[u8],
    head: &Segment,
    last: &Segment,
    run_payload: usize,
    next_pkt: &[u8],
    next: &Segment,
) -> bool {
    let h = head.header_len;
    let o = head.ip_len;
    let same_shape = next.v6 == head.v6
        && next.udp == head.udp
        && next.header_len == h
        && last.payload_len == head.payload_len
        && next.payload_len <= head.payload_len
        && h + run_payload + next.payload_len <= 65_535;
    if !same_shape {
        return false;
    }
    let same_ip = if head.v6 {
        // Version, traffic class, flow label; next header, hop limit; addresses.
        head_pkt[0..4] == next_pkt[0..4] && head_pkt[6..40] == next_pkt[6..40]
    } else {
        // TOS, DF, TTL, protocol, addresses.
        head_pkt[1] == next_pkt[1]
            && head_pkt[6] & 0x40 == next_pkt[6] & 0x40
            && head_pkt[8..10] == next_pkt[8..10]
            && head_pkt[12..20] == next_pkt[12..20]
    };
    if !same_ip || head_pkt[o..o + 4] != next_pkt[o..o + 4] {
        return false;
    }
    head.udp
        || (last.flags & PSH == 0
            && next.seq == last.seq.wrapping_add(last.payload_len as u32)
            // Ack, window, options.
            && head_pkt[o + 8..o + 12] == next_pkt[o + 8..o + 12]
            && head_pkt[o + 14..o + 16] == next_pkt[o + 14..o + 16]
            && head_pkt[o + 20..h] == next_pkt[o + 20..h])
}

/// Writes the virtio-net header and the super-packet's headers into `out` (at least
/// [`MAX_HEADER`] bytes) and returns their length: the head's headers with the lengths (and
/// the IPv4 checksum) for `payload` bytes, PSH when the last TCP segment had it, and the
/// TCP/UDP checksum field holding the pseudo-header sum, as `VIRTIO_NET_HDR_F_NEEDS_CSUM` asks.
pub fn write_header(
    head_pkt: &[u8],
    head: &Segment,
    payload: usize,
    last_flags: u8,
    out: &mut [u8],
) -> usize {
    let h = head.header_len;
    let o = head.ip_len;
    let (gso_type, csum_offset) = match (head.udp, head.v6) {
        (true, _) => (GSO_UDP_L4, 6u16),
        (false, false) => (GSO_TCPV4, 16),
        (false, true) => (GSO_TCPV6, 16),
    };
    // virtio_net_hdr, native endian (TUN's default): NEEDS_CSUM, gso_type, hdr_len, gso_size,
    // csum_start, csum_offset.
    out[0] = 1;
    out[1] = gso_type;
    out[2..4].copy_from_slice(&(h as u16).to_ne_bytes());
    out[4..6].copy_from_slice(&(head.payload_len as u16).to_ne_bytes());
    out[6..8].copy_from_slice(&(o as u16).to_ne_bytes());
    out[8..10].copy_from_slice(&csum_offset.to_ne_bytes());
    let ip = &mut out[VNET_HDR_LEN..VNET_HDR_LEN + h];
    ip.copy_from_slice(&head_pkt[..h]);
    // Under 64 KiB: `can_append` keeps the run there.
    let l4_len = (h - o + payload) as u16;
    let proto = if head.v6 {
        ip[4..6].copy_from_slice(&l4_len.to_be_bytes());
        ip[6]
    } else {
        ip[2..4].copy_from_slice(&(o as u16 + l4_len).to_be_bytes());
        ip[10..12].copy_from_slice(&[0, 0]);
        let c = !checksum::data(&ip[..20]);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        ip[9]
    };
    let pseudo = pseudo_header(ip, head.v6, proto, l4_len);
    let check = if head.udp {
        ip[o + 4..o + 6].copy_from_slice(&l4_len.to_be_bytes());
        o + 6
    } else {
        ip[o + 13] = (ip[o + 13] & !PSH) | (last_flags & PSH);
        o + 16
    };
    ip[check..check + 2].copy_from_slice(&pseudo.to_be_bytes());
    VNET_HDR_LEN + h
}

/// Most segments in one super-packet (a 64 KiB GRO buffer holds about 44 full-size ones).
pub const MAX_RUN: usize = 64;

/// An open run: segments `first..first + count` of one receive buffer (chunks at the buffer's
/// stride) that are to become one super-packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// Chunk index of the first segment.
    pub first: usize,
    /// Segments in the run.
    pub count: usize,
    /// The first segment.
    pub head: Segment,
    /// The last segment.
    pub last: Segment,
    /// Payload bytes in all.
    pub payload: usize,
}

impl Run {
    /// A run of the one segment `seg`, chunk `first`.
    pub fn new(first: usize, seg: Segment) -> Run {
        Run {
            first,
            count: 1,
            head: seg,
            last: seg,
            payload: seg.payload_len,
        }
    }

    /// Takes `next` (the bytes `next_pkt`, chunk `chunk` of `buf`) when it is the chunk right
    /// after the run's last, may follow ([`can_append`]) and the run has room ([`MAX_RUN`]).
    /// A run is written as its chunks `first..first + count`, so a chunk that is not adjacent
    /// (one in between was dropped) must start a new run, or the dropped chunk's bytes would be
    /// written in its place.
    #[inline]
    pub fn try_append(
        &mut self,
        buf: &[u8],
        stride: usize,
        chunk: usize,
        next_pkt: &[u8],
        next: Segment,
    ) -> bool {
        let joins = self.count < MAX_RUN
            && chunk == self.first + self.count
            && can_append(
                &buf[self.first * stride..],
                &self.head,
                &self.last,
                self.payload,
                next_pkt,
                &next,
            );
        if joins {
            self.count += 1;
            self.last = next;
            self.payload += next.payload_len;
        }
        joins
    }

    /// Chunk `j`'s headers and payload (trailing bytes of the chunk excluded).
    pub fn segment<'a>(&self, buf: &'a [u8], stride: usize, j: usize) -> &'a [u8] {
        let seg = if j + 1 == self.first + self.count {
            self.last
        } else {
            self.head
        };
        let at = j * stride;
        &buf[at..at + seg.header_len + seg.payload_len]
    }

    /// Writes the super-packet's virtio-net and IP/TCP/UDP headers into `out` ([`write_header`]).
    pub fn write_header(&self, buf: &[u8], stride: usize, out: &mut [u8]) -> usize {
        write_header(
            self.segment(buf, stride, self.first),
            &self.head,
            self.payload,
            self.last.flags,
            out,
        )
    }
}

/// The pseudo-header sum (addresses, protocol, `l4_len`) of the IPv4 or IPv6 packet whose
/// header starts `pkt`. Not complemented.
#[inline]
fn pseudo_header(pkt: &[u8], v6: bool, proto: u8, l4_len: u16) -> u16 {
    let addrs = if v6 { &pkt[8..40] } else { &pkt[12..20] };
    checksum::combine(&[checksum::data(addrs), u16::from(proto), l4_len])
}

#[cfg(test)]
pub(crate) mod test {
    use super::*;

    /// The RFC 1071 sum of 16-bit words, unfolded: the tests' own reference, apart from
    /// `wire::checksum`.
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

    fn classify_tcp(p: &[u8]) -> Option<Segment> {
        classify(p, false)
    }

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
        fill(&mut p);
        p
    }

    /// Sets a test packet's IPv4 header checksum and its TCP/UDP checksum, so that it verifies.
    fn fill(p: &mut [u8]) {
        let v6 = p[0] >> 4 == 6;
        let (ip, proto) = if v6 { (40, p[6]) } else { (20, p[9]) };
        if !v6 {
            p[10..12].copy_from_slice(&[0, 0]);
            let c = !fold(sum(&p[..20]));
            p[10..12].copy_from_slice(&c.to_be_bytes());
        }
        let at = ip + if proto == UDP { 6 } else { 16 };
        p[at..at + 2].copy_from_slice(&[0, 0]);
        let addrs = if v6 { sum(&p[8..40]) } else { sum(&p[12..20]) };
        let c = !fold(addrs + u32::from(proto) + (p.len() - ip) as u32 + sum(&p[ip..]));
        // UDP sends a computed 0 as 0xffff (0 means "no checksum").
        let c = if c == 0 && proto == UDP { 0xffff } else { c };
        p[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }

    #[test]
    fn consecutive_segments_coalesce_and_the_header_is_right() {
        let a = seg(1000, 1420, ACK);
        let b = seg(2420, 1420, ACK);
        let c = seg(3840, 500, ACK | PSH);
        let (sa, sb, sc) = (
            classify_tcp(&a).unwrap(),
            classify_tcp(&b).unwrap(),
            classify_tcp(&c).unwrap(),
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
        let sa = classify_tcp(&a).unwrap();
        let gap = seg(9999, 1420, ACK);
        assert!(!can_append(
            &a,
            &sa,
            &sa,
            1420,
            &gap,
            &classify_tcp(&gap).unwrap()
        ));
        let bigger = seg(2420, 1421, ACK);
        assert!(!can_append(
            &a,
            &sa,
            &sa,
            1420,
            &bigger,
            &classify_tcp(&bigger).unwrap()
        ));
        let mut other_port = seg(2420, 1420, ACK);
        other_port[21] = 0xbc;
        fill(&mut other_port);
        assert!(!can_append(
            &a,
            &sa,
            &sa,
            1420,
            &other_port,
            &classify_tcp(&other_port).unwrap()
        ));
        let mut other_ts = seg(2420, 1420, ACK);
        other_ts[47] = 10;
        fill(&mut other_ts);
        assert!(!can_append(
            &a,
            &sa,
            &sa,
            1420,
            &other_ts,
            &classify_tcp(&other_ts).unwrap()
        ));
        // After a short segment nothing more may follow.
        let short = seg(2420, 100, ACK);
        let ss = classify_tcp(&short).unwrap();
        let after = seg(2520, 100, ACK);
        assert!(!can_append(
            &a,
            &sa,
            &ss,
            1520,
            &after,
            &classify_tcp(&after).unwrap()
        ));
        // SYN, FIN, pure ACKs without payload and fragments do not take part.
        assert!(classify_tcp(&seg(1, 10, 0x02 | ACK)).is_none());
        assert!(classify_tcp(&seg(1, 10, 0x01 | ACK)).is_none());
        assert!(classify_tcp(&seg(1, 0, ACK)).is_none());
        let mut frag = seg(1, 10, ACK);
        frag[6] = 0x20;
        assert!(classify_tcp(&frag).is_none());
        // Nor IPv4 without DF, or TCP with the AccECN AE bit or a reserved bit set.
        let mut no_df = seg(1, 10, ACK);
        no_df[6] = 0;
        assert!(classify_tcp(&no_df).is_none());
        // Nor the reserved IPv4 flag bit beside DF (checksums valid: the bit alone refuses it).
        let mut evil = seg(1, 10, ACK);
        evil[6] |= 0x80;
        fill(&mut evil);
        assert!(classify_tcp(&evil).is_none());
        for bit in [0x01, 0x02, 0x08] {
            let mut ae = seg(1, 10, ACK);
            ae[32] |= bit;
            assert!(classify_tcp(&ae).is_none(), "{bit:#x}");
        }
        let mut ae6 = seg6(1, 10, ACK);
        ae6[52] |= 0x01;
        assert!(classify_tcp(&ae6).is_none());
    }

    /// An IPv6/TCP segment with the timestamp option.
    fn seg6(seq: u32, payload: usize, flags: u8) -> Vec<u8> {
        let v4 = seg(seq, payload, flags);
        let mut p = vec![0u8; 40 + v4.len() - 20];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&((v4.len() - 20) as u16).to_be_bytes());
        p[6] = TCP;
        p[7] = 64;
        p[8..24].copy_from_slice(&[0xfd, 0, 0, 0x19, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        p[24..40].copy_from_slice(&[0xfd, 0, 0, 0x19, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        p[40..].copy_from_slice(&v4[20..]);
        fill(&mut p);
        p
    }

    /// A UDP datagram of `payload` bytes over IPv4 or IPv6, checksum field non-zero.
    pub(crate) fn udp(v6: bool, payload: usize) -> Vec<u8> {
        let ip = if v6 { 40 } else { 20 };
        let mut p = if v6 { seg6(0, 0, ACK) } else { seg(0, 0, ACK) };
        p.truncate(ip);
        p.resize(ip + 8 + payload, 0xab);
        if v6 {
            p[4..6].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
            p[6] = UDP;
        } else {
            p[2..4].copy_from_slice(&((ip + 8 + payload) as u16).to_be_bytes());
            p[9] = UDP;
        }
        p[ip..ip + 4].copy_from_slice(&[0x1f, 0x90, 0x14, 0x51]);
        p[ip + 4..ip + 6].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
        fill(&mut p);
        p
    }

    #[test]
    fn ipv6_tcp_coalesces_with_a_tcpv6_header() {
        let a = seg6(1000, 1400, ACK);
        let b = seg6(2400, 1400, ACK);
        let c = seg6(3800, 10, ACK | PSH);
        let (sa, sb, sc) = (
            classify_tcp(&a).unwrap(),
            classify_tcp(&b).unwrap(),
            classify_tcp(&c).unwrap(),
        );
        assert_eq!((sa.ip_len, sa.header_len, sa.payload_len), (40, 72, 1400));
        assert!(can_append(&a, &sa, &sa, 1400, &b, &sb));
        assert!(can_append(&a, &sa, &sb, 2800, &c, &sc));
        let mut flow = seg6(2400, 1400, ACK);
        flow[9] = 0x99; // another source address
        fill(&mut flow);
        assert!(!can_append(
            &a,
            &sa,
            &sa,
            1400,
            &flow,
            &classify_tcp(&flow).unwrap()
        ));
        let mut label = seg6(2400, 1400, ACK);
        label[3] = 1; // another flow label
        fill(&mut label);
        assert!(!can_append(
            &a,
            &sa,
            &sa,
            1400,
            &label,
            &classify_tcp(&label).unwrap()
        ));
        let mut out = [0u8; MAX_HEADER];
        let n = write_header(&a, &sa, 2810, sc.flags, &mut out);
        assert_eq!(n, 82);
        assert_eq!(&out[..2], &[1, GSO_TCPV6]);
        assert_eq!(u16::from_ne_bytes([out[2], out[3]]), 72, "hdr_len");
        assert_eq!(u16::from_ne_bytes([out[4], out[5]]), 1400, "gso_size");
        assert_eq!(u16::from_ne_bytes([out[6], out[7]]), 40, "csum_start");
        assert_eq!(u16::from_ne_bytes([out[8], out[9]]), 16, "csum_offset");
        let ip = &out[10..82];
        assert_eq!(
            u16::from_be_bytes([ip[4], ip[5]]),
            32 + 2810,
            "payload length"
        );
        assert_eq!(ip[53], ACK | PSH);
        let expected = fold(sum(&ip[8..40]) + 6 + 32 + 2810);
        assert_eq!(u16::from_be_bytes([ip[56], ip[57]]), expected);
        // An extension header (here: hop-by-hop) keeps a packet out.
        let mut ext = seg6(1, 10, ACK);
        ext[6] = 0;
        assert!(classify_tcp(&ext).is_none());
    }

    #[test]
    fn udp_coalesces_into_uso_only_when_the_device_has_it() {
        for v6 in [false, true] {
            let ip = if v6 { 40 } else { 20 };
            let (a, b, short) = (udp(v6, 1000), udp(v6, 1000), udp(v6, 300));
            assert!(classify(&a, false).is_none(), "no USO, no UDP runs");
            let (sa, sb, ss) = (
                classify(&a, true).unwrap(),
                classify(&b, true).unwrap(),
                classify(&short, true).unwrap(),
            );
            assert_eq!((sa.header_len, sa.payload_len), (ip + 8, 1000));
            assert!(can_append(&a, &sa, &sa, 1000, &b, &sb));
            assert!(can_append(&a, &sa, &sb, 2000, &short, &ss));
            // Nothing after a short datagram, nothing larger than the first.
            assert!(!can_append(&a, &sa, &ss, 2300, &b, &sb));
            let big = udp(v6, 1001);
            assert!(!can_append(
                &a,
                &sa,
                &sa,
                1000,
                &big,
                &classify(&big, true).unwrap()
            ));
            let mut port = udp(v6, 1000);
            port[ip + 1] ^= 1;
            fill(&mut port);
            assert!(!can_append(
                &a,
                &sa,
                &sa,
                1000,
                &port,
                &classify(&port, true).unwrap()
            ));
            let mut out = [0u8; MAX_HEADER];
            let n = write_header(&a, &sa, 2300, 0, &mut out);
            assert_eq!(n, 10 + ip + 8);
            assert_eq!(&out[..2], &[1, GSO_UDP_L4]);
            assert_eq!(u16::from_ne_bytes([out[4], out[5]]), 1000, "gso_size");
            assert_eq!(
                u16::from_ne_bytes([out[6], out[7]]),
                ip as u16,
                "csum_start"
            );
            assert_eq!(u16::from_ne_bytes([out[8], out[9]]), 6, "csum_offset");
            let h = &out[10..n];
            assert_eq!(
                u16::from_be_bytes([h[ip + 4], h[ip + 5]]),
                2308,
                "UDP length"
            );
            let (pseudo, ip_total) = if v6 {
                (sum(&h[8..40]) + 17 + 2308, u16::from_be_bytes([h[4], h[5]]))
            } else {
                assert_eq!(fold(sum(&h[..20])), 0xffff, "valid IPv4 checksum");
                (
                    sum(&h[12..20]) + 17 + 2308,
                    u16::from_be_bytes([h[2], h[3]]),
                )
            };
            assert_eq!(usize::from(ip_total), if v6 { 2308 } else { 2328 });
            assert_eq!(u16::from_be_bytes([h[ip + 6], h[ip + 7]]), fold(pseudo));
        }
        // IPv4 UDP without a checksum, or with a length that disagrees, stays out.
        let mut zero = udp(false, 100);
        zero[26..28].copy_from_slice(&[0, 0]);
        assert!(classify(&zero, true).is_none());
        let mut bad_len = udp(false, 100);
        bad_len[25] ^= 1;
        fill(&mut bad_len);
        assert!(classify(&bad_len, true).is_none());
        // An IPv4 total length shorter than the header (found by fuzzing) is refused.
        let mut short_total = udp(false, 100);
        short_total[2..4].copy_from_slice(&5u16.to_be_bytes());
        fill(&mut short_total);
        assert!(classify(&short_total, true).is_none());
        // Truncated and odd inputs are refused, never a panic.
        for n in 0..60 {
            assert!(classify(&udp(false, 100)[..n], true).is_none(), "{n} bytes");
            assert!(
                classify(&seg6(1, 10, ACK)[..n], true).is_none(),
                "{n} bytes"
            );
        }
    }

    /// A segment whose checksum does not verify never joins a run (the kernel trusts a
    /// super-packet's NEEDS_CSUM): a flipped payload byte, a flipped IPv4 header byte, a
    /// zero IPv6 UDP checksum. Written alone, the kernel checks and drops it.
    #[test]
    fn segments_whose_checksums_fail_do_not_coalesce() {
        let a = seg(1000, 1420, ACK);
        let sa = classify_tcp(&a).unwrap();
        let b = seg(2420, 1420, ACK);
        assert!(can_append(
            &a,
            &sa,
            &sa,
            1420,
            &b,
            &classify_tcp(&b).unwrap()
        ));
        let mut corrupt = b.clone();
        corrupt[700] ^= 0x04;
        assert!(classify_tcp(&corrupt).is_none(), "payload");
        let mut header = b.clone();
        header[8] ^= 0x01; // TTL, under the IPv4 header checksum
        assert!(classify_tcp(&header).is_none(), "IPv4 header");
        let mut v6 = seg6(2420, 1400, ACK);
        v6[500] ^= 0x80;
        assert!(classify_tcp(&v6).is_none(), "IPv6 payload");
        for v6 in [false, true] {
            let mut d = udp(v6, 300);
            assert!(classify(&d, true).is_some());
            let at = d.len() - 1;
            d[at] ^= 0x10;
            assert!(classify(&d, true).is_none(), "UDP payload, v6 {v6}");
        }
        let mut none6 = udp(true, 300);
        none6[46..48].copy_from_slice(&[0, 0]);
        assert!(
            classify(&none6, true).is_none(),
            "IPv6 UDP without a checksum"
        );
    }

    #[test]
    fn a_run_walks_a_receive_buffer_and_stops_at_max_run() {
        // A GRO buffer: full-size segments at a stride of their size, the last one shorter.
        let stride = 52 + 100;
        let mut buf = Vec::new();
        for i in 0..MAX_RUN as u32 + 2 {
            buf.extend_from_slice(&seg(1000 + i * 100, 100, ACK));
        }
        buf.extend_from_slice(&seg(1000 + (MAX_RUN as u32 + 2) * 100, 30, ACK | PSH));
        let chunks: Vec<&[u8]> = buf.chunks(stride).collect();
        let mut run = Run::new(0, classify_tcp(chunks[0]).unwrap());
        for (k, c) in chunks.iter().enumerate().skip(1) {
            if !run.try_append(&buf, stride, k, c, classify_tcp(c).unwrap()) {
                assert_eq!(k, MAX_RUN, "a run stops at MAX_RUN");
                break;
            }
        }
        assert_eq!((run.count, run.payload), (MAX_RUN, MAX_RUN * 100));
        assert_eq!(run.segment(&buf, stride, 3), chunks[3]);
        // The next run takes the rest, ending with the short segment.
        let mut rest = Run::new(MAX_RUN, classify_tcp(chunks[MAX_RUN]).unwrap());
        for (k, c) in chunks.iter().enumerate().skip(MAX_RUN + 1) {
            assert!(rest.try_append(&buf, stride, k, c, classify_tcp(c).unwrap()));
        }
        assert_eq!((rest.count, rest.payload), (3, 230));
        assert_eq!(rest.segment(&buf, stride, MAX_RUN + 2).len(), 52 + 30);
        let mut out = [0u8; MAX_HEADER];
        assert_eq!(rest.write_header(&buf, stride, &mut out), 62);
        assert_eq!(out[10 + 33], ACK | PSH, "PSH of the last segment");
    }

    #[test]
    fn a_run_takes_only_the_adjacent_chunk() {
        // Chunks 0 and 2 of a receive buffer follow each other in sequence, but chunk 1 was
        // dropped (a forged sender, say). The run is written as chunks first..first + count, so
        // taking chunk 2 would write chunk 1's bytes into the flow.
        let stride = 52 + 100;
        let mut buf = seg(1000, 100, ACK);
        buf.extend_from_slice(&seg(5000, 100, ACK));
        buf.extend_from_slice(&seg(1100, 100, ACK));
        let chunks: Vec<&[u8]> = buf.chunks(stride).collect();
        let mut run = Run::new(0, classify_tcp(chunks[0]).unwrap());
        let third = classify_tcp(chunks[2]).unwrap();
        assert!(!run.try_append(&buf, stride, 2, chunks[2], third));
        assert_eq!(run.count, 1);
        // The same segment right after the head joins.
        let mut adjacent = seg(1000, 100, ACK);
        adjacent.extend_from_slice(chunks[2]);
        let mut run = Run::new(0, classify_tcp(&adjacent[..stride]).unwrap());
        assert!(run.try_append(&adjacent, stride, 1, &adjacent[stride..], third));
    }
}
