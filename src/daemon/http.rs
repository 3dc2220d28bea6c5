//! The daemon's local HTTP endpoint (`--metrics-addr`, default 127.0.0.1:9418): `GET /metrics`
//! (Prometheus text), `GET /healthz` (200 "ok" or 503 with the reason) and `GET /status` (the
//! JSON `linen status` renders). With `--healthz-port` (flannel's `-healthz-ip`/`-healthz-port`,
//! for liveness probes from outside the host) a second listener serves `/healthz` alone.
//!
//! Hand-rolled HTTP/1.1 over `tokio::net::TcpListener` rather than hyper: three GET paths (by
//! default on a loopback port), one request per connection (`Connection: close`), no bodies to
//! read (one sent is dropped), no keep-alive, TLS or streaming — a few dozen lines, where
//! hyper 1.x would bring hyper, hyper-util and http-body-util for nothing this needs. Requests
//! are bounded (8 KiB head, 5 s to send it, 5 s to take the answer, 256 connections at a
//! time, 4 from one address, where a fifth closes that address's connection silent longest)
//! so a stuck client cannot pile up tasks, nor a few sources hold every slot and starve a
//! liveness probe, nor idle connections from an address refuse its later requests.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, TryAcquireError};
use tokio_util::sync::CancellationToken;

use super::metrics;
use super::status::{self, Sources, Waiting};
use crate::cli::status::MetricsAddr;

/// Largest request head read.
const MAX_HEAD: usize = 8 * 1024;
/// Time a client gets to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once. Many, since one waiting for its head costs a task and a few
/// KiB: with 16, four addresses holding their four idle connections each (on
/// `--healthz-port`, four remote hosts) kept every later client, a kubelet's probe among
/// them, waiting for 5 s; it now takes 64. When they are all taken (a local user has all of
/// 127/8), a new connection closes the one that has waited longest for its request.
const MAX_CONNECTIONS: usize = 256;
/// How long, and how much, a connection is read after its answer ([`linger`]). A client
/// that closes on `Connection: close`, as they do, holds its slot no longer than before, and
/// one that does not gives it up to any new connection that needs it. (Longer in tests, so
/// that one that waits for lingering to end waits past their guard.)
const LINGER_TIME: Duration = if cfg!(test) {
    Duration::from_secs(120)
} else {
    HEAD_TIMEOUT
};
const LINGER_BYTES: usize = 256 * 1024;
/// Connections served at once from one address: one more closes that address's connection
/// silent longest, or, when every one of them is past its request, is refused. Sixteen idle
/// connections from anywhere would otherwise hold every slot for 5 s at a time, and a
/// kubelet's probe on `--healthz-port` (1 s timeout) would fail.
const MAX_PER_ADDRESS: usize = 4;

/// The running endpoint(s); stop when dropped. With `--metrics-addr off` and no
/// `--healthz-port` it is inert.
#[derive(Debug)]
pub struct OpsServer {
    sources: Arc<OnceLock<Sources>>,
    waiting: Arc<Mutex<Option<Waiting>>>,
    cancel: CancellationToken,
    local: Option<SocketAddr>,
}

impl OpsServer {
    /// Binds `addr` (all paths) and `healthz` (`/healthz` only) and serves on the current
    /// tokio runtime. Until [`attach`](Self::attach) is called, `/healthz` answers 503
    /// "starting…".
    pub async fn start(addr: MetricsAddr, healthz: Option<SocketAddr>) -> Result<OpsServer> {
        // The metrics listener serves /healthz too: the same address needs no second one, and
        // the same port on all addresses (0.0.0.0, flannel's default) and on one of them
        // cannot both be bound.
        let healthz = match (addr, healthz) {
            (MetricsAddr::On(m), Some(h)) if m.port() == h.port() && m.port() != 0 => {
                if m.ip() == h.ip() {
                    None
                } else if !m.ip().is_unspecified() && !h.ip().is_unspecified() {
                    Some(h)
                } else {
                    return Err(crate::cli::exit::usage(format!(
                        "--healthz-port {} is the port of --metrics-addr {m}, which serves \
                         /healthz too; drop --healthz-port (or --healthz-port 0), or give \
                         another port",
                        h.port()
                    )));
                }
            }
            (_, h) => h,
        };
        let sources = Arc::new(OnceLock::new());
        let waiting: Arc<Mutex<Option<Waiting>>> = Arc::default();
        let cancel = CancellationToken::new();
        let mut local = None;
        if let MetricsAddr::On(addr) = addr {
            let listener = TcpListener::bind(addr).await.with_context(|| {
                format!(
                    "cannot listen on --metrics-addr {addr} (is another linen running?); \
                     pass another address or --metrics-addr off"
                )
            })?;
            local = Some(listener.local_addr()?);
            tracing::info!(addr = %local.unwrap_or(addr), "serving /metrics, /healthz and /status");
            let shared = (Arc::clone(&sources), Arc::clone(&waiting));
            tokio::spawn(accept_loop(listener, Scope::All, shared, cancel.clone()));
        }
        if let Some(addr) = healthz {
            let listener = TcpListener::bind(addr).await.with_context(|| {
                format!(
                    "cannot listen on --healthz-ip/--healthz-port {addr} (is another program \
                     using the port?); pass another port, or --healthz-port 0 to turn it off"
                )
            })?;
            tracing::info!(addr = %listener.local_addr().unwrap_or(addr), "serving /healthz");
            let shared = (Arc::clone(&sources), Arc::clone(&waiting));
            tokio::spawn(accept_loop(
                listener,
                Scope::HealthzOnly,
                shared,
                cancel.clone(),
            ));
        }
        Ok(OpsServer {
            sources,
            waiting,
            cancel,
            local,
        })
    }

    /// Says what the starting daemon waits for (until [`attach`](Self::attach)).
    pub fn waiting(&self, location: String, reason: String) {
        if let Ok(mut w) = self.waiting.lock() {
            *w = Some(Waiting { location, reason });
        }
    }

    /// What [`waiting`](Self::waiting) reported is over (the registry answered, the config
    /// came): the answers go back to the plain "starting", not a past error.
    pub fn resolved(&self) {
        if let Ok(mut w) = self.waiting.lock() {
            *w = None;
        }
    }

    /// Hands over the running daemon's handles; from now on answers come from them.
    pub fn attach(&self, sources: Sources) {
        let _ = self.sources.set(sources);
    }

    /// The bound address (`None` when off).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local
    }
}

impl Drop for OpsServer {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// What a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// `/metrics`, `/healthz` and `/status` (`--metrics-addr`).
    All,
    /// `/healthz` alone (`--healthz-port`, which listens on every address by default).
    HealthzOnly,
}

/// The daemon's handles once running, and what it waits for until then.
type Shared = (Arc<OnceLock<Sources>>, Arc<Mutex<Option<Waiting>>>);

async fn accept_loop(
    listener: TcpListener,
    scope: Scope,
    shared: Shared,
    cancel: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_address: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    let silent: Silent = Arc::default();
    let mut next_id = 0u64;
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let client = client_of(peer.ip());
        let from = match AddressSlot::take(&per_address, client) {
            Some(from) => Some(from),
            // This address already has its share: its connection silent longest goes, if it
            // has one. Four idle connections from one address (any local user's, on
            // 127.0.0.1) would otherwise refuse every later request from there, `linen
            // status` and a probe among them, for as long as they are kept open.
            // (Its slot is taken over at once: the evicted task gives it back when it ends,
            // at its next poll. Waiting for that here would hold up every other client.)
            None if evict_oldest(&silent, Some(client)) => {
                Some(AddressSlot::take_over(&per_address, client))
            }
            None => None,
        };
        let Some(from) = from else {
            // This address has its share, each past its request: say so and close, rather
            // than queue. What the client already sent is read first: closing with unread data
            // would reset the connection and lose the answer.
            let mut sink = [0u8; 1024];
            let mut drained = 0;
            while drained < MAX_HEAD {
                match stream.try_read(&mut sink) {
                    Ok(n) if n > 0 => drained += n,
                    _ => break,
                }
            }
            let _ = stream.try_write(TOO_MANY);
            continue;
        };
        let permit = match Arc::clone(&slots).try_acquire_owned() {
            Ok(p) => p,
            Err(TryAcquireError::Closed) => return,
            Err(TryAcquireError::NoPermits) => {
                // Every slot taken (many addresses, each within its share: all of 127/8 is
                // a local user's): the connection silent longest goes, rather than this one
                // waiting up to HEAD_TIMEOUT. A probe sends its request at once, so it is
                // hardly ever the one.
                evict_oldest(&silent, None);
                // (Every connection past its head, none to close: wait for one to end.)
                let acquired = tokio::select! {
                    _ = cancel.cancelled() => return,
                    p = Arc::clone(&slots).acquire_owned() => p,
                };
                let Ok(p) = acquired else {
                    return;
                };
                p
            }
        };
        next_id += 1;
        let evict = CancellationToken::new();
        lock(&silent).insert(next_id, (client, evict.clone()));
        let place = SilentEntry {
            silent: Arc::clone(&silent),
            id: next_id,
            client,
        };
        let (sources, waiting) = (Arc::clone(&shared.0), Arc::clone(&shared.1));
        tokio::spawn(async move {
            let waiting = waiting.lock().ok().and_then(|w| w.clone());
            serve(stream, scope, sources.get(), waiting.as_ref(), place, evict).await;
            drop((permit, from));
        });
    }
}

/// The connections still waiting for their request head, or lingering after their answer
/// ([`linger`]), oldest first, each with its client ([`client_of`]) and what ends it when a
/// new connection needs its slot.
type Silent = Arc<Mutex<BTreeMap<u64, (IpAddr, CancellationToken)>>>;

/// Ends the connection silent longest, of `client`'s or of all; whether there was one.
fn evict_oldest(silent: &Silent, client: Option<IpAddr>) -> bool {
    let mut silent = lock(silent);
    let oldest = silent
        .iter()
        .find(|(_, (ip, _))| client.is_none_or(|c| c == *ip))
        .map(|(id, _)| *id);
    match oldest.and_then(|id| silent.remove(&id)) {
        Some((_, evict)) => {
            evict.cancel();
            true
        }
        None => false,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A connection's place in [`Silent`]: left while its request is answered, taken again (with
/// its age) while it lingers, given up when it ends.
struct SilentEntry {
    silent: Silent,
    id: u64,
    client: IpAddr,
}

impl SilentEntry {
    fn leave(&self) {
        lock(&self.silent).remove(&self.id);
    }

    fn rejoin(&self, evict: &CancellationToken) {
        lock(&self.silent).insert(self.id, (self.client, evict.clone()));
    }
}

impl Drop for SilentEntry {
    fn drop(&mut self) {
        lock(&self.silent).remove(&self.id);
    }
}

/// Whom a connection's share counts against: its address, an IPv4 one also when it arrives
/// mapped into IPv6. (Not an IPv6 /64: hosts sharing one, as cloud nodes may, would then
/// refuse each other's probes.)
fn client_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The answer to a connection over its address's share.
const TOO_MANY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n\
Content-Length: 38\r\nConnection: close\r\n\r\ntoo many connections from this address";

/// One of a client's [`MAX_PER_ADDRESS`] connections ([`client_of`]); given back when dropped.
struct AddressSlot {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl AddressSlot {
    /// One of `ip`'s slots whatever its count: the one of a connection just evicted, which
    /// gives it back when its task ends.
    fn take_over(counts: &Arc<Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr) -> AddressSlot {
        *lock(counts).entry(ip).or_insert(0) += 1;
        AddressSlot {
            counts: Arc::clone(counts),
            ip,
        }
    }

    fn take(counts: &Arc<Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr) -> Option<AddressSlot> {
        let mut map = lock(counts);
        let n = map.entry(ip).or_insert(0);
        if *n >= MAX_PER_ADDRESS {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            counts: Arc::clone(counts),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut map = lock(&self.counts);
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

async fn serve(
    mut stream: TcpStream,
    scope: Scope,
    sources: Option<&Sources>,
    waiting: Option<&Waiting>,
    place: SilentEntry,
    evict: CancellationToken,
) {
    let head = tokio::select! {
        biased;
        head = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)) => head,
        () = evict.cancelled() => return,
    };
    // The request is in: no longer the first to go when the slots run out.
    place.leave();
    // Whether the client may still be sending: a body announced, or a head too large.
    let mut more = true;
    let response = match head {
        Ok(Ok(Some(head))) => {
            more = announces_body(&head);
            respond(&head, scope, sources, waiting, SystemTime::now())
        }
        Ok(Ok(None)) => Response::text(431, "request head too large\n"),
        // Timed out, reset or closed early: nobody to answer.
        _ => return,
    };
    // Bounded like the request: a client that never reads (a /status of many peers fills the
    // socket buffer) must not hold one of the few slots for good.
    let _ = tokio::time::timeout(HEAD_TIMEOUT, stream.write_all(&response.to_bytes())).await;
    let _ = stream.shutdown().await;
    if !more {
        return;
    }
    // Answered: lingering matters less than any new connection, which may close it.
    place.rejoin(&evict);
    tokio::select! {
        biased;
        () = linger(&mut stream) => {}
        () = evict.cancelled() => {}
    }
}

/// Whether a request head announces a body (`Content-Length` other than 0, or
/// `Transfer-Encoding`), which no path reads: the connection then lingers ([`linger`]).
fn announces_body(head: &[u8]) -> bool {
    String::from_utf8_lossy(head).lines().skip(1).any(|line| {
        let Some((name, value)) = line.split_once(':') else {
            return false;
        };
        let name = name.trim();
        name.eq_ignore_ascii_case("transfer-encoding")
            || (name.eq_ignore_ascii_case("content-length") && value.trim() != "0")
    })
}

/// Reads and drops what the client still sends after the answer (a request body, which no
/// path reads, or the rest of a head too large) until it closes, at most [`LINGER_BYTES`]
/// for [`LINGER_TIME`]. Closing a socket with unread bytes resets the connection instead of
/// ending it: a client still sending gets "connection reset" for its write, and the reset can
/// overtake the answer, which the client then never reads (Apache's "lingering close").
async fn linger(stream: &mut TcpStream) {
    let mut sink = [0u8; 4096];
    let mut read = 0;
    let _ = tokio::time::timeout(LINGER_TIME, async {
        while read < LINGER_BYTES {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(n) => read += n,
            }
        }
    })
    .await;
}

/// Reads up to the blank line ending the request head: `Ok(None)` when it exceeds
/// [`MAX_HEAD`].
async fn read_head(stream: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    // Bytes read in all, the dropped empty lines included.
    let mut total = 0;
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        total += n;
        // Empty lines before the request line are not the end of the head.
        let blank = buf
            .iter()
            .take_while(|&&b| b == b'\r' || b == b'\n')
            .count();
        buf.drain(..blank);
        // An empty line: CRLF or a bare LF (RFC 9112 §2.2) after the last header's line end,
        // CRLF or LF too ("\r\n\r\n", "\n\n", and the mixed "\n\r\n").
        if buf.windows(2).any(|w| w == b"\n\n") || buf.windows(3).any(|w| w == b"\n\r\n") {
            return Ok(Some(buf));
        }
        if total > MAX_HEAD {
            return Ok(None);
        }
    }
}

/// An HTTP response about to be written.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// The body (left out for HEAD requests).
    pub body: String,
    /// Whether only the head is sent (HEAD).
    pub head_only: bool,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
            head_only: false,
        }
    }

    /// The bytes on the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            431 => "Request Header Fields Too Large",
            503 => "Service Unavailable",
            505 => "HTTP Version Not Supported",
            _ => "Internal Server Error",
        };
        let mut out = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n",
            self.status,
            self.content_type,
            self.body.len()
        );
        if self.status == 405 {
            out.push_str("Allow: GET, HEAD\r\n");
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        if !self.head_only {
            bytes.extend_from_slice(self.body.as_bytes());
        }
        bytes
    }
}

/// Answers one request head (sans-IO, so routing is unit-tested without sockets).
pub fn respond(
    head: &[u8],
    scope: Scope,
    sources: Option<&Sources>,
    waiting: Option<&Waiting>,
    now: SystemTime,
) -> Response {
    let collect = || match (sources, waiting) {
        (None, Some(w)) => status::collect_starting(w, now),
        _ => status::collect(sources, now),
    };
    let text = String::from_utf8_lossy(head);
    // (Empty lines before the request line, RFC 9112 §2.2, were dropped by `read_head`.)
    let mut parts = text.lines().next().unwrap_or("").split_whitespace();
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Response::text(400, "bad request line\n");
    };
    if !version.starts_with("HTTP/1.") {
        return Response::text(505, "only HTTP/1.x is served\n");
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Response::text(405, "only GET and HEAD are served\n"),
    };
    // The absolute form (`http://host:port/metrics`, as sent to a proxy) names the same path.
    let absolute = ["http://", "https://"].iter().find_map(|scheme| {
        let (head, rest) = target.split_at_checked(scheme.len())?;
        head.eq_ignore_ascii_case(scheme).then_some(rest)
    });
    let target = match absolute {
        // The path starts at the first '/' of what follows the authority, if that comes
        // before any query or fragment.
        Some(rest) => match rest.find(['/', '?', '#']) {
            Some(i) if rest[i..].starts_with('/') => &rest[i..],
            _ => "/",
        },
        None => target,
    };
    let path = target.split('?').next().unwrap_or(target);
    if scope == Scope::HealthzOnly && path != "/healthz" {
        let mut r = Response::text(404, "not found; this address serves only /healthz\n");
        r.head_only = head_only;
        return r;
    }
    let mut response = match path {
        "/metrics" => Response {
            status: 200,
            content_type: metrics::CONTENT_TYPE,
            body: metrics::render(collect()),
            head_only: false,
        },
        "/healthz" => {
            let health = collect().health;
            match health.reason {
                None if health.ok => Response::text(200, "ok\n"),
                // The reason may name etcd endpoints and registry errors: the --healthz-port
                // listener, open to other hosts, says only that (as flannel's says only "ok").
                _ if scope == Scope::HealthzOnly => Response::text(
                    503,
                    "unhealthy; the reason is on the --metrics-addr endpoint's /healthz\n",
                ),
                reason => Response::text(503, format!("{}\n", reason.unwrap_or_default())),
            }
        }
        "/status" => Response {
            status: 200,
            content_type: "application/json",
            body: serde_json::to_string(&collect())
                .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")),
            head_only: false,
        },
        _ => Response::text(
            404,
            "not found; linen serves /metrics, /healthz and /status\n",
        ),
    };
    response.head_only = head_only;
    response
}

/// `GET /healthz` from `from` (a socket bound to the source address wanted) or any address;
/// the whole answer. For tests, here and in the daemon's.
#[cfg(test)]
pub(crate) async fn get_healthz(addr: SocketAddr, from: Option<tokio::net::TcpSocket>) -> String {
    let mut s = match from {
        Some(socket) => socket.connect(addr).await.unwrap(),
        None => TcpStream::connect(addr).await.unwrap(),
    };
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[cfg(test)]
mod test {
    use super::*;

    fn get_from(scope: Scope, path: &str) -> Response {
        respond(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
            scope,
            None,
            None,
            SystemTime::now(),
        )
    }

    fn get(path: &str) -> Response {
        get_from(Scope::All, path)
    }

    /// A `/healthz`-only listener on an ephemeral loopback port, before the daemon is ready.
    async fn serve_healthz() -> (SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        tokio::spawn(accept_loop(
            listener,
            Scope::HealthzOnly,
            (Arc::new(OnceLock::new()), Arc::default()),
            cancel.clone(),
        ));
        (addr, cancel)
    }

    /// Sixteen idle connections from one address (each held up to 5 s) hold no more than
    /// that address's share of 4 slots: each over it closes that address's connection silent
    /// longest. A probe from another address is answered.
    #[tokio::test]
    async fn idle_connections_from_one_address_do_not_starve_a_probe() {
        let (addr, cancel) = serve_healthz().await;
        let since = tokio::time::Instant::now();
        let mut idle = Vec::new();
        for _ in 0..16 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        // The probe comes from another loopback address.
        let probe = tokio::net::TcpSocket::new_v4().unwrap();
        probe.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        // (A guard against hanging, not a timing: what shows the share is the count below.)
        let answer = tokio::time::timeout(Duration::from_secs(30), get_healthz(addr, Some(probe)))
            .await
            .expect("the probe waited behind idle connections");
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.contains("unhealthy;"), "{answer}");
        // The 12 oldest were closed without an answer; the 4 newest still wait for their
        // request (the test is over long before their head timeout).
        let newest: Vec<usize> = (16 - MAX_PER_ADDRESS..16).collect();
        assert_eq!(still_open(&idle, &newest, since).await, newest);
        cancel.cancel();
    }

    /// An address holding its share of idle connections (a local user's four, on 127.0.0.1)
    /// is still served: a new request from there closes its connection silent longest. Before,
    /// it was answered "too many connections from this address", `linen status` and a
    /// kubelet's probe from the node's address too, for as long as the four were kept.
    #[tokio::test]
    async fn an_address_at_its_share_is_still_served() {
        let (addr, cancel) = serve_healthz().await;
        let since = tokio::time::Instant::now();
        let mut idle = Vec::new();
        for _ in 0..MAX_PER_ADDRESS {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        let answer = tokio::time::timeout(Duration::from_secs(30), get_healthz(addr, None))
            .await
            .expect("the request was never answered");
        assert!(answer.contains("unhealthy;"), "{answer}");
        let newer: Vec<usize> = (1..MAX_PER_ADDRESS).collect();
        assert_eq!(still_open(&idle, &newer, since).await, newer);
        cancel.cancel();
    }

    /// Which of `conns` are open with nothing to read, looked at without waiting after a
    /// moment for the server's closes to arrive; a closed one must not have had an answer.
    /// Until they are the `expected` ones, looked at again for up to 2 s: a loaded machine's
    /// close may come later than the moment (a close that should not come at all is caught
    /// only when it comes within the moment). Never past a second before the server's head
    /// timeout, counted from `since` (before the first of `conns` connected): it closes idle
    /// connections in the order they came, and a look between two of those closes could find
    /// the expected ones for the wrong reason.
    async fn still_open(
        conns: &[TcpStream],
        expected: &[usize],
        since: tokio::time::Instant,
    ) -> Vec<usize> {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let deadline = (tokio::time::Instant::now() + Duration::from_secs(2))
            .min(since + HEAD_TIMEOUT - Duration::from_secs(1));
        loop {
            let open: Vec<usize> = conns
                .iter()
                .enumerate()
                .filter_map(|(i, s)| {
                    let mut byte = [0u8; 1];
                    match s.try_read(&mut byte) {
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Some(i),
                        Ok(n) => {
                            assert_eq!(n, 0, "connection {i} got an answer");
                            None
                        }
                        Err(_) => None,
                    }
                })
                .collect();
            if open == expected || tokio::time::Instant::now() >= deadline {
                return open;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every slot held by idle connections (four from each of 64 addresses, each within its
    /// share) does not keep a probe waiting: the connection silent longest is closed for it,
    /// and only that one (before, the probe waited until the head timeout closed them all).
    #[tokio::test]
    async fn a_probe_takes_the_slot_of_the_connection_silent_longest() {
        let _alone = EVERY_SLOT.lock().await;
        let (addr, cancel) = serve_healthz().await;
        let since = tokio::time::Instant::now();
        let mut idle = Vec::new();
        for i in 0..MAX_CONNECTIONS {
            idle.push(connect_within_share(addr, 1, i).await);
        }
        // Once the server has taken them all: the first of them has a slot.
        let mut probe_first = idle.remove(0);
        let probe = tokio::net::TcpSocket::new_v4().unwrap();
        probe.bind("127.0.2.1:0".parse().unwrap()).unwrap();
        // (A guard against hanging, not a timing: what shows the eviction is the count below.)
        let answer = tokio::time::timeout(Duration::from_secs(30), get_healthz(addr, Some(probe)))
            .await
            .expect("the probe waited behind idle connections");
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        // The oldest was closed without an answer; the others still wait for their request.
        let mut out = Vec::new();
        assert_eq!(probe_first.read_to_end(&mut out).await.unwrap(), 0);
        // (The test is over long before their head timeout, 5 s after the first was
        // accepted, unless the machine stalls that long.)
        let all: Vec<usize> = (0..idle.len()).collect();
        assert_eq!(still_open(&idle, &all, since).await, all);
        cancel.cancel();
    }

    /// The `i`th of many connections to `addr`, from 127.0.`net`.x, four from each address
    /// (each within its share).
    async fn connect_within_share(addr: SocketAddr, net: u8, i: usize) -> TcpStream {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        let from = std::net::Ipv4Addr::new(127, 0, net, (10 + i / MAX_PER_ADDRESS) as u8);
        s.bind((from, 0).into()).unwrap();
        s.connect(addr).await.unwrap()
    }

    /// The tests that fill every slot (some 515 file descriptors each) run one at a time: two
    /// at once would pass the usual limit of 1024.
    static EVERY_SLOT: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    /// Only a request that announces a body (or a head too large) lingers: a GET's connection
    /// is closed at once, and holds no slot of its address's share while its client is slow to
    /// close.
    #[test]
    fn a_body_is_announced_by_its_length_or_encoding() {
        let announces = |h: &str| announces_body(h.as_bytes());
        assert!(!announces("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(!announces("POST / HTTP/1.1\r\ncontent-length: 0\r\n\r\n"));
        assert!(announces("POST / HTTP/1.1\r\nContent-Length: 12\r\n\r\n"));
        assert!(announces(
            "POST / HTTP/1.1\r\nTRANSFER-ENCODING: chunked\r\n\r\n"
        ));
        // A request line is no header.
        assert!(!announces("GET /content-length:5 HTTP/1.1\r\n\r\n"));
    }

    /// Connections answered but not closed by their clients, lingering in every slot, do not
    /// keep a probe waiting: the one answered first is closed for it, and only that one.
    /// (Before, the probe waited for a lingering connection to end.)
    #[tokio::test]
    async fn a_probe_takes_the_slot_of_the_connection_lingering_longest() {
        let _alone = EVERY_SLOT.lock().await;
        let (addr, cancel) = serve_healthz().await;
        let mut lingering = Vec::new();
        for i in 0..MAX_CONNECTIONS {
            let mut s = connect_within_share(addr, 3, i).await;
            s.write_all(b"POST /healthz HTTP/1.1\r\nContent-Length: 9\r\n\r\n")
                .await
                .unwrap();
            let mut out = Vec::new();
            s.read_to_end(&mut out).await.unwrap();
            assert!(out.starts_with(b"HTTP/1.1 405"));
            lingering.push(s);
        }
        let probe = tokio::net::TcpSocket::new_v4().unwrap();
        probe.bind("127.0.4.1:0".parse().unwrap()).unwrap();
        // (A guard against hanging: without eviction the probe waits for LINGER_TIME.)
        let answer = tokio::time::timeout(Duration::from_secs(30), get_healthz(addr, Some(probe)))
            .await
            .expect("the probe waited behind lingering connections");
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        // A byte sent to a connection the server closed is answered with a reset, and the
        // next write fails; one still lingering is read and dropped.
        // (Looked at again for up to 10 s, well within the lingering of the others, until
        // only the first is closed: a loaded machine's reset may take longer than 200 ms.)
        for s in &mut lingering {
            s.write_all(b"x").await.unwrap();
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let closed = loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let closed: Vec<usize> = (0..lingering.len())
                .filter(|&i| lingering[i].try_write(b"y").is_err())
                .collect();
            if closed == [0] || tokio::time::Instant::now() >= deadline {
                break closed;
            }
        };
        assert_eq!(closed, [0]);
        cancel.cancel();
    }

    /// Four idle connections from each of four addresses, every one within its share, do not
    /// keep a probe from a fifth waiting: it is answered while all sixteen are still held
    /// (with 16 slots in all it waited until the server's head timeout closed one of them).
    #[tokio::test]
    async fn idle_connections_from_a_few_addresses_do_not_starve_a_probe() {
        let (addr, cancel) = serve_healthz().await;
        let since = tokio::time::Instant::now();
        let mut idle = Vec::new();
        for from in 2..6 {
            for _ in 0..MAX_PER_ADDRESS {
                let s = tokio::net::TcpSocket::new_v4().unwrap();
                s.bind(format!("127.0.0.{from}:0").parse().unwrap())
                    .unwrap();
                idle.push(s.connect(addr).await.unwrap());
            }
        }
        let probe = tokio::net::TcpSocket::new_v4().unwrap();
        probe.bind("127.0.0.6:0".parse().unwrap()).unwrap();
        // (A guard against hanging, not a timing: what counts is the order checked below.)
        let answer = tokio::time::timeout(Duration::from_secs(30), get_healthz(addr, Some(probe)))
            .await
            .expect("the probe was never answered");
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        // Answered before the server let go of any idle one: each is open, with nothing to read.
        let all: Vec<usize> = (0..idle.len()).collect();
        assert_eq!(still_open(&idle, &all, since).await, all);
        cancel.cancel();
    }

    /// A loopback port very likely free (bound and let go).
    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// `--healthz-port` equal to the metrics port: on the same address the metrics listener
    /// serves /healthz alone; on another one it is a flag mistake, not a port in use.
    #[tokio::test]
    async fn a_healthz_port_equal_to_the_metrics_port_is_resolved() {
        let port = free_port();
        let metrics: SocketAddr = ([127, 0, 0, 1], port).into();
        let server = OpsServer::start(MetricsAddr::On(metrics), Some(metrics))
            .await
            .unwrap();
        assert_eq!(server.local_addr(), Some(metrics));
        drop(server);
        let Err(err) =
            OpsServer::start(MetricsAddr::On(metrics), Some(([0, 0, 0, 0], port).into())).await
        else {
            panic!("a second listener on the metrics port was accepted");
        };
        assert_eq!(
            crate::cli::exit::code_for(&err),
            crate::cli::exit::USAGE,
            "{err:#}"
        );
        assert!(
            format!("{err:#}").contains("serves /healthz too"),
            "{err:#}"
        );
        // Two distinct addresses can share the port: both listen.
        let port = free_port();
        let metrics: SocketAddr = ([127, 0, 0, 1], port).into();
        let other: SocketAddr = ([127, 0, 0, 2], port).into();
        let _both = OpsServer::start(MetricsAddr::On(metrics), Some(other))
            .await
            .unwrap();
        TcpStream::connect(other)
            .await
            .expect("the healthz listener");
    }

    /// The absolute form names the same path (RFC 9112 §3.2.2).
    #[test]
    fn the_absolute_form_is_read() {
        let r = get("http://127.0.0.1:9418/healthz?x=1");
        assert_eq!(r.status, 503, "{}", r.body);
        assert_eq!(get("http://127.0.0.1:9418").status, 404);
        // A path with a URL in its query is still that path.
        assert_eq!(get("/healthz?next=http://x/").status, 503);
        assert_eq!(get("http://h?x=/healthz").status, 404);
        assert_eq!(get("HTTP://h/healthz").status, 503);
    }

    /// A head whose lines end in bare LFs is complete at its empty line, whichever line end
    /// that has (a last header ending in LF, then CRLF, was never taken for the end).
    #[tokio::test]
    async fn a_head_ends_at_any_empty_line() {
        for request in [
            &b"GET /healthz HTTP/1.1\nHost: x\n\r\n"[..],
            b"GET /healthz HTTP/1.1\nHost: x\n\n",
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\n",
        ] {
            let head = read_head(&mut &request[..]).await;
            assert!(
                matches!(&head, Ok(Some(h)) if h == request),
                "{:?}: {head:?}",
                String::from_utf8_lossy(request)
            );
        }
    }

    /// Empty lines that arrive on their own before the request are not taken for the end of
    /// the head. (A chain hands out its first part alone: one read gets just the empty lines.)
    #[tokio::test]
    async fn empty_lines_before_the_request_do_not_end_the_head() {
        let request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut arriving = (&b"\r\n\r\n"[..]).chain(&request[..]);
        let head = read_head(&mut arriving).await.unwrap().unwrap();
        assert_eq!(head, request);
        // Over a socket, answered as any other request.
        let (addr, cancel) = serve_healthz().await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"\r\n\r\n").await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 503"), "{out}");
        cancel.cancel();
    }

    /// A body sent after the answer came (a client that writes its head, then its body, as
    /// `curl -d @file` does) is read and dropped, not answered with a reset: before, the
    /// closed socket reset the connection and the client's next write failed.
    #[tokio::test]
    async fn a_body_after_the_answer_is_read_not_reset() {
        let (addr, cancel) = serve_healthz().await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 20000\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 405"), "{out}");
        let body = [b'x'; 10_000];
        s.write_all(&body).await.unwrap();
        // (Time for a reset to come back, if one does: without the lingering read it does,
        // and the write below fails.)
        tokio::time::sleep(Duration::from_millis(200)).await;
        s.write_all(&body)
            .await
            .expect("the rest of the body was refused");
        cancel.cancel();
    }

    #[test]
    fn a_share_counts_per_address_mapped_or_not() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(client_of(ip("198.18.0.5")), ip("198.18.0.5"));
        assert_eq!(client_of(ip("::ffff:198.18.0.5")), ip("198.18.0.5"));
        assert_eq!(client_of(ip("fd00:18::1:2:3:4")), ip("fd00:18::1:2:3:4"));
        assert_eq!(client_of(ip("::1")), ip("::1"));
    }

    #[test]
    fn the_healthz_port_serves_nothing_else() {
        let r = get_from(Scope::HealthzOnly, "/healthz");
        assert_eq!(r.status, 503);
        assert!(r.body.starts_with("unhealthy;"), "{}", r.body);
        assert!(!r.body.contains(status::STARTING), "{}", r.body);
        for path in ["/metrics", "/status", "/", "/healthz/x"] {
            let r = get_from(Scope::HealthzOnly, path);
            assert_eq!(r.status, 404, "{path}");
            assert!(!r.body.contains("linen_"), "{path}: {}", r.body);
        }
    }

    #[test]
    fn routes_and_errors() {
        let r = get("/healthz");
        assert_eq!(r.status, 503);
        assert_eq!(r.body, format!("{}\n", status::STARTING));
        let r = get("/metrics?x=1");
        assert_eq!(r.status, 200);
        assert!(r.body.contains("linen_healthy 0"), "{}", r.body);
        let r = get("/status");
        let s: status::Status = serde_json::from_str(&r.body).unwrap();
        assert!(!s.health.ok);
        assert_eq!(get("/nope").status, 404);
        let now = SystemTime::now();
        assert_eq!(
            respond(
                b"POST /metrics HTTP/1.1\r\n\r\n",
                Scope::All,
                None,
                None,
                now
            )
            .status,
            405
        );
        assert_eq!(
            respond(b"GET /metrics SPDY/3\r\n\r\n", Scope::All, None, None, now).status,
            505
        );
        assert_eq!(
            respond(b"garbage\r\n\r\n", Scope::All, None, None, now).status,
            400
        );
    }

    /// While starting, what the daemon waits for is in the 503 body and in /status.
    #[test]
    fn a_waiting_daemon_says_why_on_healthz_and_status() {
        let w = Waiting {
            location: "/var/lib/linen".into(),
            reason: "network config not found at /var/lib/linen/config".into(),
        };
        let ask = |path: &str, scope| {
            respond(
                format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes(),
                scope,
                None,
                Some(&w),
                SystemTime::now(),
            )
        };
        let r = ask("/healthz", Scope::All);
        assert_eq!(r.status, 503);
        assert!(
            r.body.contains("(network config not found at"),
            "{}",
            r.body
        );
        // Not on the listener open to other hosts.
        let r = ask("/healthz", Scope::HealthzOnly);
        assert!(!r.body.contains("/var/lib/linen"), "{}", r.body);
        let s: status::Status = serde_json::from_str(&ask("/status", Scope::All).body).unwrap();
        assert_eq!(s.registry.location, "/var/lib/linen");
    }

    #[test]
    fn head_sends_no_body_but_its_length() {
        let r = respond(
            b"HEAD /healthz HTTP/1.1\r\n\r\n",
            Scope::All,
            None,
            None,
            SystemTime::now(),
        );
        let wire = String::from_utf8(r.to_bytes()).unwrap();
        assert!(
            wire.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{wire}"
        );
        assert!(
            wire.contains(&format!("Content-Length: {}\r\n", r.body.len())),
            "{wire}"
        );
        assert!(wire.ends_with("\r\n\r\n"), "{wire}");
    }
}
