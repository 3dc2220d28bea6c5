//! Opening the TUN device and the UDP sockets the workers use.
//!
//! - The TUN device comes from `tun-rs`, not `tun-tap`: tun-tap cannot open multi-queue
//!   (`IFF_MULTI_QUEUE`) or virtio-header (`IFF_VNET_HDR`) devices, and tun-rs also brings the
//!   GSO split / GRO coalescing that offloaded reads and writes need. One queue per worker.
//! - Each worker has its own UDP socket bound with `SO_REUSEPORT` to the same port, steered by
//!   the sender's port class (see [`steer`](super::steer)), and with several workers a send-only
//!   socket on a port of its class; batched I/O with UDP GSO/GRO and its run-time fallback comes
//!   from `quinn-udp`.
//!
//! Must not import tokio, `lease` or `daemon`.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd};

use socket2::{Domain, Protocol, Socket, Type};
use tun_rs::{DeviceBuilder, SyncDevice};

use super::steer::send_port_candidates;
use crate::sys;

/// How to open the TUN device.
#[derive(Clone, Debug)]
pub struct TunOptions {
    /// Interface name (e.g. `linen0`).
    pub name: String,
    /// MTU of the device (the overlay MTU).
    pub mtu: u16,
    /// Number of queues (one per worker).
    pub queues: usize,
    /// Ask for virtio-net offloads (TSO/USO + checksum); falls back when refused.
    pub offload: bool,
    /// Transmit queue length (the kernel default of 500 is short for bursts).
    pub tx_queue_len: u32,
}

/// The opened TUN queues, one per worker, and whether offloads are on.
pub struct TunQueues {
    /// One handle per queue.
    pub queues: Vec<SyncDevice>,
    /// Whether the device was opened with `IFF_VNET_HDR` offloads.
    pub offload: bool,
}

/// Opens the device with `opts.queues` queues. With `offload`, tries `IFF_VNET_HDR` first and
/// falls back to plain packets if the kernel refuses (old kernels return EINVAL). Fails with
/// `AlreadyExists` when a device of that name exists and holds a queue.
pub fn open_tun(opts: &TunOptions) -> io::Result<TunQueues> {
    // A multi-queue device lets any TUNSETIFF of its name with the same flags attach one more
    // queue, so a second linen started with the same --tun at the same moment (both past the
    // daemon's check that no such device exists, while the registry answered neither) would
    // share this one's packets. So such a device is created first with IFF_TUN_EXCL, by a
    // queue held until tun-rs's first queue is attached, which then keeps the device (and
    // takes the claim's slot: at most 256 queues, one per worker). A single-queue device
    // refuses a second queue by itself (EBUSY).
    let open = |offload: bool| -> io::Result<SyncDevice> {
        let claim = if opts.queues > 1 {
            Some(
                sys::create_tun_exclusively(&opts.name, true, offload)
                    .map_err(|e| taken(&opts.name, e, false))?,
            )
        } else {
            None
        };
        DeviceBuilder::new()
            .name(&opts.name)
            .mtu(opts.mtu)
            .tx_queue_len(opts.tx_queue_len)
            .offload(offload)
            .multi_queue(opts.queues > 1)
            // Down until the daemon has set it up (daemon::host::configure_tun brings it up):
            // settings such as having no IPv6 link-local address take effect only then.
            .enable(false)
            .build_sync()
            // Without a claim, a device by that name after a failed open is another's (a
            // multi-queue one refuses a single queue with EINVAL): one tun-rs created and
            // then closed on an error has gone with its queue.
            .map_err(|e| taken(&opts.name, e, claim.is_none()))
    };
    let (first, offload) = if opts.offload {
        match open(true) {
            Ok(device) => (device, true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, device = %opts.name, "TUN offloads refused; using plain packets");
                (open(false)?, false)
            }
        }
    } else {
        (open(false)?, false)
    };
    let mut queues = Vec::with_capacity(opts.queues);
    for _ in 1..opts.queues {
        queues.push(first.try_clone()?);
    }
    queues.insert(0, first);
    for q in &queues {
        q.set_nonblocking(true)?;
    }
    Ok(TunQueues { queues, offload })
}

/// EBUSY from TUNSETIFF, or with `look` any error while a device named `name` exists, said as
/// what it means here.
fn taken(name: &str, e: io::Error, look: bool) -> io::Error {
    if e.raw_os_error() == Some(libc::EBUSY) || (look && sys::interface_exists(name)) {
        io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "a network device named {name} exists already (another linen started at the \
                 same time, or another program's device): {e}"
            ),
        )
    } else {
        e
    }
}

/// A worker's UDP socket.
pub struct UdpEndpoint {
    /// The socket (non-blocking).
    pub socket: UdpSocket,
    /// Whether it is an IPv6 dual-stack socket (IPv4 peers must be addressed as mapped).
    pub dual_stack: bool,
    /// The source address of every datagram sent, per family; `None`: the kernel's choice.
    pub source: Source,
}

/// The source addresses datagrams leave from. Peers accept a datagram only from the address
/// this host advertises in its lease; when that address is local, sending from it keeps a
/// host whose advertised address is not the kernel's choice (a secondary address, another
/// interface's) from being dropped as an unknown sender.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Source {
    /// For IPv4 peers.
    pub v4: Option<Ipv4Addr>,
    /// For IPv6 peers.
    pub v6: Option<Ipv6Addr>,
}

impl Source {
    /// The advertised addresses that are among this host's `local` addresses; others (an
    /// address behind NAT, a floating one held elsewhere) are left to the kernel.
    pub fn advertised(v4: Option<Ipv4Addr>, v6: Option<Ipv6Addr>, local: &[IpAddr]) -> Source {
        Source {
            v4: v4.filter(|ip| local.contains(&IpAddr::V4(*ip))),
            v6: v6.filter(|ip| local.contains(&IpAddr::V6(*ip))),
        }
    }

    /// The source for a datagram to `peer`.
    #[inline]
    pub fn for_peer(&self, peer: SocketAddr) -> Option<IpAddr> {
        match peer {
            SocketAddr::V4(_) => self.v4.map(IpAddr::V4),
            SocketAddr::V6(_) => self.v6.map(IpAddr::V6),
        }
    }
}

/// Opens one UDP socket bound to `port` on all addresses, with `SO_REUSEPORT` so every worker
/// can bind the same port, and socket buffers of `buffer_bytes` (forced past `rmem_max` when
/// root). Dual-stack IPv6 when the host has IPv6, otherwise IPv4 only.
pub fn open_udp(port: u16, buffer_bytes: usize) -> io::Result<UdpEndpoint> {
    let (socket, dual_stack) = bind_udp(port, true).map_err(|(e6, e)| {
        io::Error::new(
            e.kind(),
            format!("cannot bind UDP port {port} (IPv6: {e6}; IPv4: {e})"),
        )
    })?;
    finish(socket, dual_stack, buffer_bytes)
}

/// Fails with a clear error when another program holds UDP `port`. `SO_REUSEPORT` would
/// otherwise let the workers join the group of another process of the same user (a second
/// linen, an old one still stopping) and silently share its datagrams. Both families are
/// tried: a program on the IPv6 side alone (`IPV6_V6ONLY`, or one address) would leave the
/// workers IPv4-only in silence, and take what peers send over IPv6.
pub fn ensure_port_free(port: u16) -> io::Result<()> {
    let taken = [true, false].into_iter().any(|dual_stack| {
        matches!(bind_family(port, false, dual_stack), Err(e) if e.kind() == io::ErrorKind::AddrInUse)
    });
    if !taken {
        // Anything else is for the real bind to report.
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!(
            "UDP port {port} is in use by another program (another linen or flanneld?); \
             stop it, or give this network another Backend.Port"
        ),
    ))
}

/// Fails with a clear error when UDP `port` has a socket other than `ours` in this network
/// namespace (`/proc/thread-self/net/udp` and `udp6`): one bound since [`ensure_port_free`]
/// looked, which with `SO_REUSEPORT` has joined the workers' group (or, bound to one address,
/// takes that address's datagrams). Not looked at, with a warning, where the tables or the
/// sockets' inodes cannot be read.
pub fn ensure_port_only_ours(port: u16, ours: &[BorrowedFd<'_>]) -> io::Result<()> {
    let mine: Vec<u64> = ours.iter().filter_map(|fd| socket_inode(*fd)).collect();
    // (/proc/self/net where /proc/thread-self is missing, before Linux 3.17: the same
    // namespace, since no thread of the daemon changes it.)
    let tables: Vec<String> = ["udp", "udp6"]
        .iter()
        .filter_map(|t| {
            std::fs::read_to_string(format!("/proc/thread-self/net/{t}"))
                .or_else(|_| std::fs::read_to_string(format!("/proc/self/net/{t}")))
                .ok()
        })
        .collect();
    if mine.len() != ours.len() || tables.is_empty() {
        tracing::warn!(
            port,
            "cannot list the sockets on the overlay port (/proc/thread-self/net/udp); not \
             checking that no other program joined it during start-up"
        );
        return Ok(());
    }
    // A set: a table read in pieces while sockets come and go may list one twice.
    let others: std::collections::BTreeSet<u64> = tables
        .iter()
        .flat_map(|table| sockets_on(table, port))
        .filter(|inode| !mine.contains(inode))
        .collect();
    if others.is_empty() {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!(
            "UDP port {port} was bound by another program while this one started ({} \
             socket(s); another linen started at the same moment?); stop it, or give this \
             network another Backend.Port",
            others.len()
        ),
    ))
}

/// The inode of socket `fd`, as the `/proc/net/udp` tables name it (`fstat`'s `st_ino`).
fn socket_inode(fd: BorrowedFd<'_>) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let file = std::fs::File::from(fd.try_clone_to_owned().ok()?);
    Some(file.metadata().ok()?.ino())
}

/// The inodes of the sockets bound to local `port` in a `/proc/net/udp{,6}` table: per line
/// after the header, the local address `ADDR:PORT` (hex) second, the inode tenth.
fn sockets_on(table: &str, port: u16) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields.get(1)?.rsplit_once(':')?.1;
            (u16::from_str_radix(local_port, 16).ok()? == port)
                .then(|| fields.get(9)?.parse().ok())
                .flatten()
        })
        .collect()
}

/// Opens worker `id`'s send-only socket, of the same family as the receive sockets
/// (`dual_stack`), on a free port of its class in the local port range that is not reserved
/// (see [`steer`](super::steer)), without `SO_REUSEPORT` so it never joins another program's
/// group. Returns whether a port of the class was found; if none is free an ephemeral port is
/// used, which peers steer by that port's class: correct, but the flow may share a worker.
pub fn open_udp_send(
    id: usize,
    buffer_bytes: usize,
    dual_stack: bool,
) -> io::Result<(UdpEndpoint, bool)> {
    let (lo, hi) = local_port_range();
    let reserved = reserved_ports();
    let start = lo.saturating_add(rand::random::<u16>() % hi.saturating_sub(lo).max(1));
    let socket = send_port_candidates(id, lo, hi, start)
        .filter(|p| !reserved.iter().any(|(a, b)| (a..=b).contains(&p)))
        .find_map(|port| bind_family(port, false, dual_stack).ok());
    let classed = socket.is_some();
    let socket = match socket {
        Some(s) => s,
        None => bind_family(0, false, dual_stack)?,
    };
    let ep = finish(socket, dual_stack, buffer_bytes)?;
    // Nothing reads it: whatever strays to this port may hold only the kernel's minimum.
    socket2::SockRef::from(&ep.socket).set_recv_buffer_size(0)?;
    Ok((ep, classed))
}

/// Makes the receive sockets bound to `listen_port` pick the worker by the sender's port class
/// (the BPF program of [`steer::program`](super::steer::program)); `ep` is any socket of the
/// group. Fails on kernels before 4.5, where the kernel's hash stays in charge.
pub fn steer_by_source_port(ep: &UdpEndpoint, listen_port: u16, workers: usize) -> io::Result<()> {
    sys::attach_reuseport_cbpf(
        ep.socket.as_fd(),
        &super::steer::program(listen_port, workers),
    )
}

/// `net.ipv4.ip_local_port_range` of this network namespace (the kernel default if unreadable).
fn local_port_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut it = text.split_whitespace().map(|v| v.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .filter(|(lo, hi)| lo <= hi)
        .unwrap_or((32768, 60999))
}

/// `net.ipv4.ip_local_reserved_ports` (`8285,9000-9100`): ports an administrator keeps out of
/// automatic assignment, which linen's own choice of send ports respects too.
fn reserved_ports() -> Vec<(u16, u16)> {
    let text =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_reserved_ports").unwrap_or_default();
    parse_port_ranges(&text)
}

fn parse_port_ranges(text: &str) -> Vec<(u16, u16)> {
    text.trim()
        .split(',')
        .filter_map(|r| {
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
        })
        .collect()
}

/// Binds a UDP socket to `port`: dual-stack IPv6, else IPv4. The error carries both attempts'.
fn bind_udp(port: u16, reuse_port: bool) -> Result<(Socket, bool), (io::Error, io::Error)> {
    match bind_family(port, reuse_port, true) {
        Ok(s) => Ok((s, true)),
        Err(e6) => match bind_family(port, reuse_port, false) {
            Ok(s) => Ok((s, false)),
            Err(e) => Err((e6, e)),
        },
    }
}

/// Binds a UDP socket to `port` on all addresses: dual-stack IPv6, or IPv4 only.
fn bind_family(port: u16, reuse_port: bool, dual_stack: bool) -> io::Result<Socket> {
    let (domain, addr) = if dual_stack {
        let addr = SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0);
        (Domain::IPV6, SocketAddr::V6(addr))
    } else {
        (Domain::IPV4, (std::net::Ipv4Addr::UNSPECIFIED, port).into())
    };
    let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if dual_stack {
        s.set_only_v6(false)?;
    }
    s.set_reuse_port(reuse_port)?;
    s.bind(&addr.into())?;
    Ok(s)
}

fn finish(socket: Socket, dual_stack: bool, buffer_bytes: usize) -> io::Result<UdpEndpoint> {
    sys::set_socket_buffers(socket.as_fd(), buffer_bytes);
    socket.set_nonblocking(true)?;
    Ok(UdpEndpoint {
        source: Source::default(),
        socket: socket.into(),
        dual_stack,
    })
}

/// The address to pass to `sendmsg` on a socket: IPv4 peers become IPv4-mapped IPv6 on a
/// dual-stack socket.
#[inline]
pub fn socket_addr_for(peer: SocketAddr, dual_stack: bool) -> SocketAddr {
    match peer {
        SocketAddr::V4(v4) if dual_stack => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        other => other,
    }
}

#[cfg(test)]
mod test {
    use super::*;

    /// Two daemons with one `--tun` can both pass the daemon's check that no such device
    /// exists (while the registry answers neither): the second to open it must fail, whatever
    /// the two queue counts, and never join the first's device. Root, in a namespace of its
    /// own thread.
    #[test]
    fn a_device_of_the_same_name_is_never_joined() {
        if sys::effective_uid() != 0 || !std::path::Path::new("/dev/net/tun").exists() {
            eprintln!("SKIPPED: needs root and /dev/net/tun");
            return;
        }
        std::thread::spawn(|| {
            if let Err(e) = sys::enter_new_network_namespace() {
                // Root without CAP_SYS_ADMIN (a container).
                eprintln!("SKIPPED: cannot make a network namespace: {e}");
                return;
            }
            let options = |name: &str, queues| TunOptions {
                name: name.to_owned(),
                mtu: 1400,
                queues,
                offload: true,
                tx_queue_len: 1000,
            };
            // Another test's child, between its fork and exec, can hold a copy of a closed
            // queue for a moment, and with it the device.
            let gone = |name: &str| {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
                while sys::interface_exists(name) {
                    if std::time::Instant::now() >= deadline {
                        return false;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                true
            };
            for (held, second) in [(2, 2), (2, 1), (1, 2), (1, 1)] {
                let name = format!("lt{held}{second}");
                let first = open_tun(&options(&name, held)).unwrap();
                assert_eq!(first.queues.len(), held);
                assert!(first.offload, "offloads on a kernel of this century");
                match open_tun(&options(&name, second)) {
                    Ok(joined) => panic!(
                        "{} queues joined {name}, which {held} held",
                        joined.queues.len()
                    ),
                    Err(e) => {
                        assert_eq!(
                            e.kind(),
                            io::ErrorKind::AlreadyExists,
                            "{held}, {second}: {e}"
                        );
                        assert!(e.to_string().contains(&name), "{e}");
                    }
                }
                // The first still has its device, and the failed open left it as it was.
                assert!(sys::interface_exists(&name));
                drop(first);
                assert!(gone(&name), "{name} outlived its queues");
            }
            // Another program's multi-queue device, opened as tun-rs does (without the
            // exclusive flag).
            let other = DeviceBuilder::new()
                .name("lt-other")
                .multi_queue(true)
                .offload(true)
                .enable(false)
                .build_sync()
                .unwrap();
            let e = open_tun(&options("lt-other", 2))
                .err()
                .expect("joined lt-other");
            assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
            drop(other);
            assert!(gone("lt-other"), "lt-other outlived its queue");
            // With the name free again, the most queues a device takes (256, one per worker
            // at most) open as before: the claim's queue is gone by then.
            let most = open_tun(&options("lt-other", 256)).unwrap();
            assert_eq!(most.queues.len(), 256);
        })
        .join()
        .unwrap();
    }

    /// A socket that joined the workers' `SO_REUSEPORT` group after the port was found free
    /// is named; the workers' own are not. No root.
    #[test]
    fn a_socket_that_joined_the_port_is_found() {
        let a = open_udp(0, 65_536).unwrap();
        let port = a.socket.local_addr().unwrap().port();
        ensure_port_only_ours(port, &[a.socket.as_fd()]).unwrap();
        // Another of the same user, as a second linen's worker would be.
        let b = open_udp(port, 65_536).unwrap();
        let e = ensure_port_only_ours(port, &[a.socket.as_fd()]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        assert!(e.to_string().contains(&format!("port {port} ")), "{e}");
        assert!(e.to_string().contains("1 socket(s)"), "{e}");
        ensure_port_only_ours(port, &[a.socket.as_fd(), b.socket.as_fd()]).unwrap();
        drop(b);
        ensure_port_only_ours(port, &[a.socket.as_fd()]).unwrap();
    }

    /// A program on the IPv6 side of the port alone leaves the IPv4 side free, and the
    /// port is still in use: the workers would otherwise be IPv4-only in silence. No root.
    #[test]
    fn a_port_held_on_its_ipv6_side_alone_is_in_use() {
        let v6 = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        v6.set_only_v6(true).unwrap();
        let any6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0));
        if let Err(e) = v6.bind(&any6.into()) {
            eprintln!("SKIPPED: no IPv6 here: {e}");
            return;
        }
        let port = v6.local_addr().unwrap().as_socket().unwrap().port();
        let e = ensure_port_free(port).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        drop(v6);
        ensure_port_free(port).unwrap();
    }

    #[test]
    fn a_udp_table_s_sockets_are_found_by_port() {
        // /proc/net/udp6's layout (8285 is 0x205D), cut after the inode.
        let table = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  12: 00000000000000000000000000000000:205D 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 41213 2
  13: 00000000000000000000000000000000:205E 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 41214 2
  14: 0100007F:205D 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 41215 2
  15: garbage
";
        assert_eq!(sockets_on(table, 8285), [41213, 41215]);
        assert_eq!(sockets_on(table, 8286), [41214]);
        assert!(sockets_on(table, 53).is_empty());
        assert!(sockets_on("", 8285).is_empty());
    }

    #[test]
    fn only_local_advertised_addresses_become_sources() {
        let here = Ipv4Addr::new(198, 18, 0, 1);
        let here6: Ipv6Addr = "fd00:18::1".parse().unwrap();
        // Behind NAT, say: on no local interface.
        let remote = Ipv4Addr::new(198, 51, 100, 7);
        let local = [IpAddr::V4(here), IpAddr::V6(here6)];
        let s = Source::advertised(Some(here), None, &local);
        assert_eq!(
            s,
            Source {
                v4: Some(here),
                v6: None
            }
        );
        let v4_peer = SocketAddr::from((remote, 8285));
        let v6_peer = SocketAddr::from((here6, 8285));
        assert_eq!(s.for_peer(v4_peer), Some(IpAddr::V4(here)));
        assert_eq!(s.for_peer(v6_peer), None);
        assert_eq!(
            Source::advertised(Some(remote), None, &local),
            Source::default()
        );
        let s = Source::advertised(Some(remote), Some(here6), &local);
        assert_eq!(s.for_peer(v6_peer), Some(IpAddr::V6(here6)));
    }

    #[test]
    fn reserved_port_ranges_parse_and_skip_junk() {
        assert_eq!(parse_port_ranges(""), vec![]);
        assert_eq!(parse_port_ranges("\n"), vec![]);
        assert_eq!(
            parse_port_ranges("8285,9000-9100\n"),
            vec![(8285, 8285), (9000, 9100)]
        );
        assert_eq!(parse_port_ranges("x,40000-y,5"), vec![(5, 5)]);
    }
}
