//! A minimal user-space UDP echo and its client: the round trip of one datagram through one
//! process on each side, with nothing else in the way. `scripts/udp-echo-floor` runs it between
//! two namespaces as a floor for any overlay that moves each packet through a process on each
//! host (README, "Latency").
//!
//! ```text
//! udp_echo serve ADDR:PORT
//! udp_echo ping ADDR:PORT [COUNT [INTERVAL_MS]]   (default 200 round trips, 10 ms apart)
//! ```

use std::net::{SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = || {
        eprintln!(
            "usage: udp_echo serve ADDR:PORT | udp_echo ping ADDR:PORT [COUNT [INTERVAL_MS]]"
        );
        ExitCode::from(2)
    };
    let Some(addr) = args.get(1).and_then(|a| a.parse::<SocketAddr>().ok()) else {
        return usage();
    };
    let number = |i: usize, default: u64| args.get(i).map_or(Some(default), |a| a.parse().ok());
    let result = match (args[0].as_str(), number(2, 200), number(3, 10)) {
        ("serve", _, _) => serve(addr),
        ("ping", Some(count), Some(ms)) if count > 0 => ping(addr, count, ms),
        _ => return usage(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("udp_echo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(addr: SocketAddr) -> std::io::Result<()> {
    let socket = UdpSocket::bind(addr)?;
    let mut buf = [0u8; 2048];
    loop {
        let (n, from) = socket.recv_from(&mut buf)?;
        socket.send_to(&buf[..n], from)?;
    }
}

fn ping(addr: SocketAddr, count: u64, interval_ms: u64) -> std::io::Result<()> {
    let any: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let socket = UdpSocket::bind(any)?;
    socket.connect(addr)?;
    socket.set_read_timeout(Some(Duration::from_secs(1)))?;
    let payload = [0x78u8; 56];
    let mut buf = [0u8; 2048];
    let mut rtts = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let start = Instant::now();
        socket.send(&payload)?;
        socket.recv(&mut buf)?;
        rtts.push(start.elapsed());
        std::thread::sleep(Duration::from_millis(interval_ms));
    }
    rtts.sort();
    let avg = rtts.iter().sum::<Duration>() / rtts.len() as u32;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "user-space UDP echo, {count} round trips {interval_ms} ms apart: avg {:.0} us, p50 {:.0} \
         us, min {:.0} us",
        us(avg),
        us(rtts[rtts.len() / 2]),
        us(rtts[0])
    );
    Ok(())
}
