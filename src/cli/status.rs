//! `linen status`: asks the local daemon's HTTP endpoint for `GET /status` and prints its lease,
//! peers, workers and counters as a table (or the JSON with `--json`). Also the
//! `--metrics-addr` value type shared with `linen run`.
//!
//! The client is a minimal HTTP/1.1 GET over `std::net::TcpStream`: one request to a loopback
//! daemon that always closes the connection needs no client crate.

use std::fmt::{self, Write as _};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;

use crate::daemon::status::{DIRECTIONS, LeaseView, Status, WorkerTraffic};

/// Where the daemon serves metrics, health and status unless told otherwise.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9418";

/// `--metrics-addr`: an `IP:PORT`, or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricsAddr {
    /// No endpoint.
    Off,
    /// Listen (daemon) or connect (status) here.
    On(SocketAddr),
}

impl FromStr for MetricsAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<MetricsAddr, String> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(MetricsAddr::Off);
        }
        s.parse().map(MetricsAddr::On).map_err(|_| {
            format!("{s:?} is not IP:PORT (such as {DEFAULT_METRICS_ADDR} or [::1]:9418) or off")
        })
    }
}

impl fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetricsAddr::Off => f.write_str("off"),
            MetricsAddr::On(a) => a.fmt(f),
        }
    }
}

/// `linen status`.
#[derive(Clone, Debug, Args)]
pub struct StatusArgs {
    /// Where the daemon serves /status (its --metrics-addr).
    #[arg(long, env = "LINEN_METRICS_ADDR", default_value = DEFAULT_METRICS_ADDR)]
    pub metrics_addr: MetricsAddr,
    /// Print the daemon's JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// How long to wait for the daemon to accept and to answer.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Writes the report to stdout. A reader that stops early (`linen status | head`, `| grep
/// -q`) is no error: the rest is dropped, and the exit status still says the daemon's health
/// (`print!` panicked on the closed pipe: exit 101).
fn print_out(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("writing the report to stdout")
        }
        _ => Ok(()),
    }
}

/// Runs `linen status`.
pub fn run(args: &StatusArgs) -> Result<()> {
    let MetricsAddr::On(addr) = args.metrics_addr else {
        return Err(crate::cli::exit::usage(format!(
            "--metrics-addr is off, so there is no daemon to ask; pass the address `linen run` \
             serves on (default {DEFAULT_METRICS_ADDR})"
        )));
    };
    let body = get(addr, "/status")?;
    let health = if args.json {
        let v: serde_json::Value = serde_json::from_str(&body).with_context(|| {
            format!("the daemon on {addr} answered /status with something that is not JSON")
        })?;
        print_out(&format!("{}\n", body.trim_end()))?;
        let Some(ok) = v["health"]["ok"].as_bool() else {
            bail!("the daemon on {addr} answered /status without linen's health field");
        };
        (ok, v["health"]["reason"].as_str().map(str::to_owned))
    } else {
        let status: Status = serde_json::from_str(&body).with_context(|| {
            format!(
                "the daemon on {addr} answered /status with something that is not linen's status"
            )
        })?;
        print_out(&render(&status, addr))?;
        (status.health.ok, status.health.reason)
    };
    // After the report, so that scripts can test the exit status (as `systemctl is-active`).
    if let (false, reason) = health {
        bail!(
            "the daemon on {addr} is unhealthy: {}",
            reason.as_deref().unwrap_or("no reason given")
        );
    }
    Ok(())
}

/// `GET path` from the daemon at `addr`; the body of a 200 answer.
pub fn get(addr: SocketAddr, path: &str) -> Result<String> {
    get_within(addr, path, TIMEOUT)
}

/// [`get`], waiting at most `timeout` to connect and for each read.
fn get_within(addr: SocketAddr, path: &str, timeout: Duration) -> Result<String> {
    let not_running = || {
        format!(
            "no linen daemon answers on {addr}; is `linen run` running? pass --metrics-addr \
             (or LINEN_METRICS_ADDR) with the address it serves on"
        )
    };
    let mut stream = TcpStream::connect_timeout(&addr, timeout).with_context(not_running)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .with_context(not_running)?;
    let mut raw = Vec::new();
    if let Err(e) = stream.read_to_end(&mut raw) {
        if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            let what = if raw.is_empty() {
                "no"
            } else {
                "only part of an"
            };
            bail!(
                "{addr} accepted but gave {what} answer to {path} within {:?}; is it a linen \
                 daemon?",
                timeout
            );
        }
        return Err(e).with_context(|| format!("reading the answer of {addr}{path}"));
    }
    let (code, body) = parse_response(&raw).ok_or_else(|| {
        anyhow!("{addr} answered {path} with something that is not HTTP; is it a linen daemon?")
    })?;
    if code != 200 {
        // linen answers errors in one short line; another server may send a whole page.
        let first = body
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("");
        if first.len() > 200 || body.trim().lines().count() > 1 {
            bail!("{addr}{path} answered {code}; is it a linen daemon?");
        }
        bail!("{addr}{path} answered {code}: {first}");
    }
    Ok(body)
}

/// The status code and body of an HTTP/1.x response read to EOF.
fn parse_response(raw: &[u8]) -> Option<(u16, String)> {
    let text = std::str::from_utf8(raw).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let mut status_line = head.lines().next()?.split_whitespace();
    if !status_line.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let code = status_line.next()?.parse().ok()?;
    Some((code, body.to_owned()))
}

/// The tables `linen status` prints.
pub fn render(s: &Status, addr: SocketAddr) -> String {
    let mut out = String::new();
    let health = match &s.health.reason {
        None if s.health.ok => "healthy".to_owned(),
        reason => format!("UNHEALTHY: {}", reason.as_deref().unwrap_or("unknown")),
    };
    let _ = writeln!(out, "linen {} on {addr}: {health}", s.version);
    let _ = writeln!(out);
    match &s.lease {
        Some(l) => {
            let _ = writeln!(out, "lease     {}", subnets(l));
            let _ = writeln!(out, "public    {}", publics(l));
            let _ = writeln!(out, "expires   {}", expiry(l));
        }
        None => {
            let _ = writeln!(out, "lease     none (starting or re-acquiring)");
        }
    }
    let r = &s.registry;
    if r.location.is_empty() && !r.connected && r.last_error.is_none() {
        // Starting: the daemon has not handed its registry over yet.
        let _ = writeln!(out, "registry  not open yet (starting)");
    } else {
        let _ = writeln!(
            out,
            "registry  {} ({}, {} resyncs{})",
            if r.location.is_empty() {
                "-"
            } else {
                &r.location
            },
            if r.connected {
                "connected"
            } else {
                "NOT connected"
            },
            r.resyncs,
            match (&r.last_error, r.last_error_secs_ago) {
                (Some(e), Some(ago)) if r.connected => {
                    format!(
                        ", last error ended {} ago: {e}",
                        super::admin::human_secs(ago)
                    )
                }
                (Some(e), Some(ago)) => {
                    format!(", failing for {}: {e}", super::admin::human_secs(ago))
                }
                (Some(e), None) => format!(", last error: {e}"),
                (None, _) => String::new(),
            }
        );
    }
    let _ = write!(
        out,
        "workers   {} of {} running",
        s.workers.running, s.workers.configured
    );
    if s.per_worker.len() > 1 {
        let list = |f: fn(&WorkerTraffic) -> u64| {
            s.per_worker
                .iter()
                .map(|w| f(w).to_string())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let _ = write!(
            out,
            "; packets read per worker: {}; datagrams received: {}",
            list(|w| w.tun_rx_packets),
            list(|w| w.udp_rx_packets)
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "table     {} routes, generation {}",
        s.table.routes, s.table.generation
    );
    for f in &s.host_failing {
        // The underlay address is checked, and followed once a new one can be.
        let how = if f.step == "underlay" {
            "checked every 5 s"
        } else {
            "retried"
        };
        let _ = writeln!(out, "FAILING   {} ({how}): {}", f.step, f.error);
    }

    let _ = writeln!(out);
    let mut rows = vec![[
        "PEER SUBNET".to_owned(),
        "PUBLIC IP".to_owned(),
        "EXPIRES".to_owned(),
    ]];
    for p in &s.peers {
        rows.push([subnets(p), publics(p), expiry(p)]);
    }
    table(&mut out, &rows);
    if s.peers.is_empty() {
        let _ = writeln!(out, "(no peers)");
    }

    let c = &s.counters;
    let _ = writeln!(out);
    let mut rows = vec![[
        "DIRECTION".to_owned(),
        "PACKETS".to_owned(),
        "BYTES".to_owned(),
    ]];
    for (name, meaning) in DIRECTIONS {
        let t = c.traffic(name);
        rows.push([
            format!("{name} ({meaning})"),
            t.packets.to_string(),
            t.bytes.to_string(),
        ]);
    }
    table(&mut out, &rows);
    let _ = writeln!(out, "icmp errors sent: {}", c.icmp_sent);
    let coalesced = |proto: &str| c.coalesced.get(proto).copied().unwrap_or(0);
    let _ = writeln!(
        out,
        "coalesced TUN writes: {} TCP (TSO), {} UDP (USO)",
        coalesced("tcp"),
        coalesced("udp")
    );
    let _ = writeln!(out, "UDP GSO sends: {}", c.udp_gso_sends);
    let _ = writeln!(
        out,
        "UDP receive buffer overflows: {}",
        c.udp_receive_overflows
    );

    let _ = writeln!(out);
    let mut rows = vec![[
        "DROP REASON".to_owned(),
        "PACKETS".to_owned(),
        String::new(),
    ]];
    for (reason, n) in &c.drops {
        rows.push([reason.clone(), n.to_string(), String::new()]);
    }
    table(&mut out, &rows);
    out
}

fn subnets(l: &LeaseView) -> String {
    let parts: Vec<&str> = [l.ipv4_subnet.as_deref(), l.ipv6_subnet.as_deref()]
        .into_iter()
        .flatten()
        .collect();
    if parts.is_empty() {
        l.subnet.clone()
    } else {
        parts.join(" ")
    }
}

fn publics(l: &LeaseView) -> String {
    crate::model::addresses_text(l.public_ip, l.public_ipv6)
}

fn expiry(l: &LeaseView) -> String {
    match l.expires_in_secs {
        None => "never (reservation)".to_owned(),
        Some(s) if s <= 0 => format!("EXPIRED {} ago", super::admin::human_secs(s.unsigned_abs())),
        Some(s) => format!("in {}", super::admin::human_secs(s.unsigned_abs())),
    }
}

/// Left-aligned columns, the last one unpadded.
fn table<const N: usize>(out: &mut String, rows: &[[String; N]]) {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == N {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ", w = widths[i]);
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::daemon::status::{Health, RegistryView, WorkersView};

    fn sample() -> Status {
        let mut s = crate::daemon::status::collect(None, std::time::SystemTime::now());
        s.version = "0.1.0".into();
        s.health = Health {
            ok: true,
            reason: None,
        };
        s.lease = Some(LeaseView {
            subnet: "198.19.1.0-24&fd00:19:0:1::-64".into(),
            ipv4_subnet: Some("198.19.1.0/24".into()),
            ipv6_subnet: Some("fd00:19:0:1::/64".into()),
            public_ip: Some("198.18.0.1".parse().unwrap()),
            expires_in_secs: Some(86_399),
            ..LeaseView::default()
        });
        s.peers = vec![LeaseView {
            subnet: "198.19.2.0-24".into(),
            ipv4_subnet: Some("198.19.2.0/24".into()),
            public_ip: Some("198.18.0.2".parse().unwrap()),
            reservation: true,
            ..LeaseView::default()
        }];
        s.registry = RegistryView {
            location: "/var/lib/linen".into(),
            connected: true,
            last_error: None,
            last_error_secs_ago: None,
            resyncs: 0,
        };
        s.workers = WorkersView {
            configured: 2,
            running: 2,
        };
        s.per_worker = vec![
            WorkerTraffic {
                tun_rx_packets: 5,
                udp_tx_packets: 5,
                udp_rx_packets: 7,
            },
            WorkerTraffic {
                tun_rx_packets: 6,
                udp_tx_packets: 6,
                udp_rx_packets: 0,
            },
        ];
        s.counters.traffic.insert(
            "udp_tx".into(),
            crate::daemon::status::Traffic {
                packets: 12,
                bytes: 1008,
            },
        );
        *s.counters.drops.get_mut("no_route").unwrap() = 3;
        s
    }

    #[test]
    fn renders_lease_peers_and_counters() {
        let text = render(&sample(), "127.0.0.1:9418".parse().unwrap());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "linen 0.1.0 on 127.0.0.1:9418: healthy");
        for want in [
            "lease     198.19.1.0/24 fd00:19:0:1::/64",
            "public    198.18.0.1",
            "expires   in 23h59m",
            "registry  /var/lib/linen (connected, 0 resyncs)",
            "workers   2 of 2 running; packets read per worker: 5 6; datagrams received: 7 0",
            "PEER SUBNET    PUBLIC IP   EXPIRES",
            "198.19.2.0/24  198.18.0.2  never (reservation)",
            "udp_tx (sent to peers)              12       1008",
            "no_route          3",
            "icmp errors sent: 0",
        ] {
            assert!(lines.contains(&want), "missing {want:?} in\n{text}");
        }
    }

    #[test]
    fn renders_an_unhealthy_daemon_without_lease() {
        let mut s = sample();
        s.lease = None;
        s.peers.clear();
        s.health = Health {
            ok: false,
            reason: Some("no lease held, re-acquiring (registry connected)".into()),
        };
        s.registry.connected = false;
        s.registry.last_error = Some("timeout".into());
        // With its age: how long it has been failing, or how long ago the last outage ended.
        s.registry.last_error_secs_ago = Some(200);
        let text = render(&s, "127.0.0.1:9418".parse().unwrap());
        assert!(
            text.contains("(NOT connected, 0 resyncs, failing for 3m20s: timeout)"),
            "{text}"
        );
        s.registry.connected = true;
        s.registry.resyncs = 1;
        let text = render(&s, "127.0.0.1:9418".parse().unwrap());
        assert!(
            text.contains("(connected, 1 resyncs, last error ended 3m20s ago: timeout)"),
            "{text}"
        );
        s.registry.connected = false;
        s.registry.resyncs = 0;
        s.registry.last_error_secs_ago = None;
        let text = render(&s, "127.0.0.1:9418".parse().unwrap());
        assert!(
            text.starts_with(
                "linen 0.1.0 on 127.0.0.1:9418: UNHEALTHY: no lease held, re-acquiring"
            )
        );
        assert!(
            text.contains("lease     none (starting or re-acquiring)\n"),
            "{text}"
        );
        assert!(
            text.contains("(NOT connected, 0 resyncs, last error: timeout)"),
            "{text}"
        );
        assert!(text.contains("(no peers)"), "{text}");
        assert!(!text.contains("FAILING"), "{text}");
        s.host_failing = vec![crate::daemon::status::HostFailure {
            step: "iptables".into(),
            error: "iptables: exit status 4".into(),
        }];
        let text = render(&s, "127.0.0.1:9418".parse().unwrap());
        assert!(
            text.contains("FAILING   iptables (retried): iptables: exit status 4\n"),
            "{text}"
        );
    }

    #[test]
    fn renders_a_starting_daemon() {
        let s = crate::daemon::status::collect(None, std::time::SystemTime::now());
        let text = render(&s, "127.0.0.1:9418".parse().unwrap());
        assert!(text.contains("UNHEALTHY: starting"), "{text}");
        assert!(
            text.contains("registry  not open yet (starting)\n"),
            "{text}"
        );
    }

    #[test]
    fn metrics_addr_parses_off_and_addresses_and_explains_errors() {
        assert_eq!("off".parse::<MetricsAddr>(), Ok(MetricsAddr::Off));
        assert_eq!(
            "127.0.0.1:9418".parse::<MetricsAddr>().unwrap().to_string(),
            DEFAULT_METRICS_ADDR
        );
        assert!(matches!(
            "[::1]:9".parse::<MetricsAddr>(),
            Ok(MetricsAddr::On(_))
        ));
        let err = "localhost".parse::<MetricsAddr>().unwrap_err();
        assert!(err.contains("is not IP:PORT"), "{err}");
    }

    #[test]
    fn parses_http_answers() {
        let raw = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 3\r\n\r\nno\n";
        assert_eq!(parse_response(raw), Some((503, "no\n".to_owned())));
        assert_eq!(parse_response(b"SSH-2.0-OpenSSH\r\n"), None);
    }

    /// A server on `127.0.0.1` that reads a request and writes `answer`, then closes the
    /// connection, or with `hold` keeps it open until the client closes it (however long the
    /// client takes to give up, up to 30 s: a client that never does then sees the close, and
    /// its test fails instead of hanging); its address.
    fn serve_once(answer: &'static [u8], hold: bool) -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            // The whole request: unread bytes at close would reset the connection.
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.ends_with(b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let _ = s.write_all(answer);
            let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
            while hold && s.read(&mut buf).is_ok_and(|n| n > 0) {}
        });
        addr
    }

    #[test]
    fn another_server_is_named_as_such() {
        let page = b"HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\n\r\n<html>\n<body>\n\
                     <h1>Not Found</h1>\n</body>\n</html>\n";
        let addr = serve_once(page, false);
        let msg = format!("{:#}", get(addr, "/status").unwrap_err());
        assert_eq!(
            msg,
            format!("{addr}/status answered 404; is it a linen daemon?")
        );
        // linen's own one-line errors are quoted.
        let addr = serve_once(b"HTTP/1.1 404 Not Found\r\n\r\nno such path\n", false);
        let msg = format!("{:#}", get(addr, "/status").unwrap_err());
        assert_eq!(msg, format!("{addr}/status answered 404: no such path"));
    }

    #[test]
    fn a_server_that_does_not_answer_is_named_as_such() {
        let wait = Duration::from_millis(200);
        let addr = serve_once(b"", true);
        let msg = format!("{:#}", get_within(addr, "/status", wait).unwrap_err());
        assert!(
            msg.contains("accepted but gave no answer to /status"),
            "{msg}"
        );
        let addr = serve_once(b"HTTP/1.1 200 OK\r\n", true);
        let msg = format!("{:#}", get_within(addr, "/status", wait).unwrap_err());
        assert!(msg.contains("gave only part of an answer"), "{msg}");
    }

    #[test]
    fn a_port_nobody_serves_is_a_clear_error() {
        // Bind and drop to find a port that is very likely free.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let err = get(addr, "/status").unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.starts_with(&format!(
                "no linen daemon answers on {addr}; is `linen run` running?"
            )),
            "{msg}"
        );
    }
}
