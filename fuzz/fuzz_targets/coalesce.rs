//! Receive-side coalescing on arbitrary bytes: a GRO receive buffer cut at an arbitrary stride is
//! walked as a worker walks it (classify each segment, extend the run while `can_append` allows,
//! build the super-packet header). Never panic; every header fits `MAX_HEADER`; its IP length
//! fields and virtio-net header describe exactly the run's headers plus payloads, under 64 KiB.
#![no_main]

use libfuzzer_sys::fuzz_target;
use linen::dataplane::coalesce::{self, MAX_HEADER, Segment, VNET_HDR_LEN};

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, buf)) = data.split_first() else {
        return;
    };
    let uso = ctl & 1 == 1;
    let stride = usize::from(ctl >> 1).max(1) * 12;
    let mut header = [0u8; MAX_HEADER];
    // (first chunk, head, last, payload)
    let mut run: Option<(usize, Segment, Segment, usize)> = None;
    let mut check = |buf: &[u8], (first, head, last, payload): (usize, Segment, Segment, usize)| {
        let head_pkt = &buf[first * stride..];
        let n = coalesce::write_header(head_pkt, &head, payload, last.flags, &mut header);
        assert_eq!(n, VNET_HDR_LEN + head.header_len);
        let ip = &header[VNET_HDR_LEN..n];
        let total = head.header_len + payload;
        assert!(total <= 65_535);
        let declared = if head.v6 {
            40 + usize::from(u16::from_be_bytes([ip[4], ip[5]]))
        } else {
            usize::from(u16::from_be_bytes([ip[2], ip[3]]))
        };
        assert_eq!(declared, total);
        assert_eq!(
            usize::from(u16::from_ne_bytes([header[4], header[5]])),
            head.payload_len
        );
    };
    for (k, seg) in buf.chunks(stride).enumerate() {
        let Some(next) = coalesce::classify(seg, uso) else {
            if let Some(r) = run.take() {
                check(buf, r);
            }
            continue;
        };
        assert!(next.header_len + next.payload_len <= seg.len());
        if let Some((first, head, last, payload)) = &mut run
            && coalesce::can_append(&buf[*first * stride..], head, last, *payload, seg, &next)
        {
            *last = next;
            *payload += next.payload_len;
            continue;
        }
        if let Some(r) = run.take() {
            check(buf, r);
        }
        run = Some((k, next, next, next.payload_len));
    }
    if let Some(r) = run.take() {
        check(buf, r);
    }
});
