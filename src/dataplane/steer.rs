//! Which worker receives a datagram: the same one, every time, for every packet of a flow, and
//! different ones for flows that a peer's different workers send.
//!
//! All workers' receive sockets share the overlay port with `SO_REUSEPORT`. Left to itself the
//! kernel picks the socket by a hash of the outer addresses and ports, so what one peer worker
//! sends always reaches one of ours, but which one is chance: with two workers on each side, two
//! peer workers land on the same receiving worker half of the time, and a flow's replies can come
//! back through a different worker than the one reading its packets from the TUN device. The
//! TUN device follows that (it sends a flow's next packets to the queue its last reply was written
//! on), so flows piled up on one worker per host, or moved between workers while packets were in
//! flight, which can reorder them.
//!
//! The fix makes the mapping explicit on both sides:
//! - worker `i` sends from a port `p` with `p % PORT_CLASSES == i % PORT_CLASSES`
//!   ([`send_port_candidates`]);
//! - a classic BPF program on the receive group ([`program`]) picks socket
//!   `(source port % PORT_CLASSES) % workers`. Datagrams from the overlay port itself (flannel
//!   hosts, or linen hosts with one worker or `--fixed-source-port`) keep the kernel's hash, so
//!   many such peers still spread.
//!
//! With the same number of workers on both hosts, a flow read by worker `i` here is received by
//! worker `i` there, its replies come back to worker `i` here, and it stays there. With different
//! counts it settles after at most one move, at connection setup.
//!
//! Sans-IO: this module builds the program and the port candidates; `sys` attaches the program
//! and `io` binds the ports. Must not import tokio, `lease` or `daemon`.

use libc::sock_filter;

/// Source ports encode the sending worker modulo this (so up to this many workers are told
/// apart).
pub const PORT_CLASSES: u16 = 256;

/// The port class worker `id` sends from.
pub fn port_class(id: usize) -> u16 {
    (id % usize::from(PORT_CLASSES)) as u16
}

/// Ports in `lo..=hi` of worker `id`'s class, starting at the first one at or after `start` and
/// wrapping around once: where to try binding worker `id`'s send socket.
pub fn send_port_candidates(id: usize, lo: u16, hi: u16, start: u16) -> impl Iterator<Item = u16> {
    let class = port_class(id);
    let (lo, hi) = (u32::from(lo.max(1)), u32::from(hi));
    let first = |from: u32| {
        let base = from - from % u32::from(PORT_CLASSES) + u32::from(class);
        if base < from {
            base + u32::from(PORT_CLASSES)
        } else {
            base
        }
    };
    let start = u32::from(start).clamp(lo, hi.max(lo));
    let upper = (first(start)..=hi).step_by(usize::from(PORT_CLASSES));
    let lower = (first(lo)..start.min(hi + 1)).step_by(usize::from(PORT_CLASSES));
    upper.chain(lower).map(|p| p as u16)
}

/// What the program returns for "no choice": any value ≥ the group size makes the kernel fall
/// back to its hash.
const FALLBACK: u32 = u32::MAX;

/// `SKF_NET_OFF`: loads at this offset plus `k` read from the network (outer IP) header; the
/// program otherwise starts at the UDP payload.
const NET: u32 = libc::SKF_NET_OFF as u32;

fn stmt(code: u32, k: u32) -> sock_filter {
    sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u32, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

/// The `SO_ATTACH_REUSEPORT_CBPF` program for a group of `workers` sockets on `listen_port`:
/// returns `(source port % PORT_CLASSES) % workers`, or the kernel's hash for datagrams from
/// `listen_port`. Reads the source port behind an IPv4 header of any length (IHL) or a fixed
/// IPv6 header.
pub fn program(listen_port: u16, workers: usize) -> Vec<sock_filter> {
    use libc::{
        BPF_ABS, BPF_ALU, BPF_AND, BPF_B, BPF_H, BPF_IND, BPF_JA, BPF_JEQ, BPF_JMP, BPF_K, BPF_LD,
        BPF_LDX, BPF_MOD, BPF_MSH, BPF_RET, BPF_RSH,
    };
    let workers = u32::try_from(workers.max(1)).unwrap_or(u32::MAX);
    vec![
        // 0: A = IP version.
        stmt(BPF_LD | BPF_B | BPF_ABS, NET),
        stmt(BPF_ALU | BPF_RSH | BPF_K, 4),
        // 2: IPv6 → 6.
        jump(BPF_JMP | BPF_JEQ | BPF_K, 6, 3, 0),
        // 3: IPv4: X = header length, A = the UDP source port behind it.
        stmt(BPF_LDX | BPF_B | BPF_MSH, NET),
        stmt(BPF_LD | BPF_H | BPF_IND, NET),
        stmt(BPF_JMP | BPF_JA, 3),
        // 6: IPv6: UDP right behind the fixed header, else (extension headers) → the hash.
        stmt(BPF_LD | BPF_B | BPF_ABS, NET + 6),
        jump(BPF_JMP | BPF_JEQ | BPF_K, libc::IPPROTO_UDP as u32, 0, 5),
        stmt(BPF_LD | BPF_H | BPF_ABS, NET + 40),
        // 9: from the overlay port → the hash.
        jump(BPF_JMP | BPF_JEQ | BPF_K, u32::from(listen_port), 3, 0),
        stmt(BPF_ALU | BPF_AND | BPF_K, u32::from(PORT_CLASSES - 1)),
        stmt(BPF_ALU | BPF_MOD | BPF_K, workers),
        stmt(BPF_RET | libc::BPF_A, 0),
        // 13:
        stmt(BPF_RET | BPF_K, FALLBACK),
    ]
}

#[cfg(test)]
mod test {
    use super::*;

    /// A classic BPF interpreter for the instructions [`program`] uses, run on an outer IP
    /// packet (`net`) whose UDP payload is where plain offsets would start. Panics on anything
    /// else, so a new instruction cannot slip past the tests.
    fn run(prog: &[sock_filter], net: &[u8]) -> u32 {
        use libc::*;
        let load = |off: u32, size: usize| -> u32 {
            let rel = off.wrapping_sub(NET) as usize;
            net[rel..rel + size]
                .iter()
                .fold(0, |acc, b| (acc << 8) | u32::from(*b))
        };
        let (mut a, mut x, mut pc) = (0u32, 0u32, 0usize);
        loop {
            let i = prog[pc];
            let code = u32::from(i.code);
            pc += 1;
            match code {
                c if c == BPF_LD | BPF_B | BPF_ABS => a = load(i.k, 1),
                c if c == BPF_LD | BPF_H | BPF_ABS => a = load(i.k, 2),
                c if c == BPF_LD | BPF_H | BPF_IND => a = load(i.k.wrapping_add(x), 2),
                c if c == BPF_LDX | BPF_B | BPF_MSH => x = 4 * (load(i.k, 1) & 0xf),
                c if c == BPF_ALU | BPF_RSH | BPF_K => a >>= i.k,
                c if c == BPF_ALU | BPF_AND | BPF_K => a &= i.k,
                c if c == BPF_ALU | BPF_MOD | BPF_K => a %= i.k,
                c if c == BPF_JMP | BPF_JA => pc += i.k as usize,
                c if c == BPF_JMP | BPF_JEQ | BPF_K => {
                    pc += usize::from(if a == i.k { i.jt } else { i.jf })
                }
                c if c == BPF_RET | BPF_A => return a,
                c if c == BPF_RET | BPF_K => return i.k,
                other => panic!("instruction {other:#x} not modelled"),
            }
        }
    }

    fn v4(options: usize, sport: u16) -> Vec<u8> {
        let ihl = 5 + options;
        let mut p = vec![0u8; ihl * 4 + 8 + 20];
        p[0] = 0x40 | ihl as u8;
        p[ihl * 4..ihl * 4 + 2].copy_from_slice(&sport.to_be_bytes());
        p
    }

    fn v6(sport: u16) -> Vec<u8> {
        let mut p = vec![0u8; 40 + 8 + 40];
        p[0] = 0x60;
        p[6] = libc::IPPROTO_UDP as u8;
        p[40..42].copy_from_slice(&sport.to_be_bytes());
        p
    }

    #[test]
    fn picks_the_sending_workers_class_over_v4_and_v6() {
        for workers in [1, 2, 3, 4, 6, 16] {
            let prog = program(8285, workers);
            for id in 0..40 {
                for port in send_port_candidates(id, 32768, 60999, 40000).take(3) {
                    let want = (id % 256 % workers) as u32;
                    assert_eq!(run(&prog, &v4(0, port)), want, "{workers} {id} {port}");
                    assert_eq!(run(&prog, &v4(3, port)), want, "IPv4 options");
                    assert_eq!(run(&prog, &v6(port)), want, "IPv6");
                }
            }
        }
    }

    #[test]
    fn the_overlay_port_and_ipv6_extension_headers_keep_the_kernel_hash() {
        let prog = program(8285, 4);
        assert_eq!(run(&prog, &v4(0, 8285)), FALLBACK);
        assert_eq!(run(&prog, &v6(8285)), FALLBACK);
        assert_eq!(run(&prog, &v4(0, 8286)), 8286 % 256 % 4);
        // IPv6 with an extension header (hop-by-hop, 0) first: the port is not at +40.
        let mut ext = v6(40001);
        ext[6] = 0;
        assert_eq!(run(&prog, &ext), FALLBACK);
    }

    #[test]
    fn a_flow_comes_back_to_its_worker_or_settles_after_one_move() {
        // The round trip that keeps a flow on one worker: read by our worker i, received by
        // their worker j, whose replies reach our worker k; the TUN device then moves the flow
        // to k.
        for (here, there) in [
            (2, 2),
            (4, 4),
            (3, 3),
            (6, 6),
            (4, 2),
            (2, 4),
            (6, 4),
            (3, 5),
        ] {
            let (to_them, to_us) = (program(8285, there), program(8285, here));
            let round_trip = |i: usize| {
                let j = run(&to_them, &v4(0, port_of(i))) as usize;
                run(&to_us, &v6(port_of(j))) as usize
            };
            let mut settled = std::collections::BTreeSet::new();
            for i in 0..here {
                let k = round_trip(i);
                if here <= there {
                    assert_eq!(k, i, "{here}/{there}: worker {i} moved to {k}");
                }
                assert_eq!(round_trip(k), k, "{here}/{there}: {i} → {k} moves again");
                settled.insert(k);
            }
            assert_eq!(
                settled.len(),
                here.min(there),
                "{here}/{there}: flows spread"
            );
        }
    }

    fn port_of(id: usize) -> u16 {
        send_port_candidates(id, 32768, 60999, 40000)
            .next()
            .unwrap()
    }

    #[test]
    fn candidates_cover_the_class_once_within_the_range() {
        let all: Vec<u16> = send_port_candidates(5, 32768, 60999, 45000).collect();
        assert!(
            all.iter()
                .all(|p| (32768..=60999).contains(p) && p % 256 == 5)
        );
        let mut sorted = all.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), all.len(), "no port twice");
        assert_eq!(all.len(), (32768..=60999).filter(|p| p % 256 == 5).count());
        assert!(all[0] >= 45000, "starts at the start: {}", all[0]);
        // A start outside the range and a tiny range.
        assert_eq!(
            send_port_candidates(1, 1000, 1100, 0).collect::<Vec<_>>(),
            vec![1025]
        );
        assert_eq!(
            send_port_candidates(0, 0, 255, 7).collect::<Vec<_>>(),
            Vec::<u16>::new()
        );
        assert_eq!(
            send_port_candidates(3, 65000, 65535, 65535).collect::<Vec<_>>(),
            vec![65027, 65283]
        );
    }
}
