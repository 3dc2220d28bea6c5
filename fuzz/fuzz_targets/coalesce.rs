//! Receive-side coalescing on arbitrary bytes: a GRO receive buffer cut at an arbitrary stride is
//! walked as a worker walks it (classify each segment, extend the run while `can_append` allows,
//! build the super-packet header). Segments get valid checksums first unless the second control
//! byte's low bit is set (coalescing refuses segments whose checksums fail, which random bytes
//! almost always are, so without this the run logic would hardly be reached). Never panic; every header fits `MAX_HEADER`; its IP length
//! fields and virtio-net header describe exactly the run's headers plus payloads, under 64 KiB.
#![no_main]

use libfuzzer_sys::fuzz_target;
use linen::dataplane::coalesce::{self, MAX_HEADER, MAX_RUN, Run, VNET_HDR_LEN};
use linen::wire::checksum::{combine, data as sum};

/// Sets the IPv4 header checksum and the TCP/UDP checksum of `p` when its headers say where
/// they are and the lengths fit; leaves anything else alone.
fn fill_checksums(p: &mut [u8]) {
    let (ip, total, proto) = match p.first().map(|b| b >> 4) {
        Some(4) if p.len() >= 20 && p[0] == 0x45 => {
            (20, usize::from(u16::from_be_bytes([p[2], p[3]])), p[9])
        }
        Some(6) if p.len() >= 40 => (40, 40 + usize::from(u16::from_be_bytes([p[4], p[5]])), p[6]),
        _ => return,
    };
    let at = ip
        + match proto {
            6 => 16,
            17 => 6,
            _ => return,
        };
    if total > p.len() || at + 2 > total {
        return;
    }
    if ip == 20 {
        p[10..12].copy_from_slice(&[0, 0]);
        let c = !sum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
    }
    p[at..at + 2].copy_from_slice(&[0, 0]);
    let addrs = if ip == 20 {
        sum(&p[12..20])
    } else {
        sum(&p[8..40])
    };
    let c = !combine(&[
        addrs,
        u16::from(proto),
        (total - ip) as u16,
        sum(&p[ip..total]),
    ]);
    let c = if c == 0 && proto == 17 { 0xffff } else { c };
    p[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

fuzz_target!(|data: &[u8]| {
    let [ctl, ctl2, rest @ ..] = data else {
        return;
    };
    let uso = ctl & 1 == 1;
    let stride = usize::from(ctl >> 1).max(1) * 12;
    let mut owned = rest.to_vec();
    if ctl2 & 1 == 0 {
        for seg in owned.chunks_mut(stride) {
            fill_checksums(seg);
        }
    }
    let buf = &owned[..];
    let mut header = [0u8; MAX_HEADER];
    let mut check = |buf: &[u8], run: Run| {
        let n = run.write_header(buf, stride, &mut header);
        assert_eq!(n, VNET_HDR_LEN + run.head.header_len);
        assert!(run.count <= MAX_RUN);
        let ip = &header[VNET_HDR_LEN..n];
        let total = run.head.header_len + run.payload;
        assert!(total <= 65_535);
        let declared = if run.head.v6 {
            40 + usize::from(u16::from_be_bytes([ip[4], ip[5]]))
        } else {
            usize::from(u16::from_be_bytes([ip[2], ip[3]]))
        };
        assert_eq!(declared, total);
        assert_eq!(
            usize::from(u16::from_ne_bytes([header[4], header[5]])),
            run.head.payload_len
        );
        // The segments' payloads add up to the run's.
        let sum: usize = (run.first..run.first + run.count)
            .map(|j| run.segment(buf, stride, j).len() - run.head.header_len)
            .sum();
        assert_eq!(sum, run.payload);
    };
    let mut run: Option<Run> = None;
    for (k, seg) in buf.chunks(stride).enumerate() {
        let Some(next) = coalesce::classify(seg, uso) else {
            if let Some(r) = run.take() {
                check(buf, r);
            }
            continue;
        };
        assert!(next.header_len + next.payload_len <= seg.len());
        if let Some(r) = &mut run
            && r.try_append(buf, stride, k, seg, next)
        {
            continue;
        }
        if let Some(r) = run.take() {
            check(buf, r);
        }
        run = Some(Run::new(k, next));
    }
    if let Some(r) = run.take() {
        check(buf, r);
    }
});
