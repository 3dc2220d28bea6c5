//! The only module of linen with `unsafe`: socket options that `socket2` does not offer, the
//! exclusive creation of a TUN device that `tun-rs` does not offer, one signal to a process
//! group (the daemon's iptables commands), and a look at a child's exit that does not reap it
//! (the test lab). Each block carries a `// SAFETY:` comment.

#![allow(unsafe_code)]

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

/// Sets `SO_SNDBUF`/`SO_RCVBUF` to `bytes`, first with the `…FORCE` variants (root may exceed
/// `net.core.{w,r}mem_max`), then the plain ones. Best effort: a failure only means smaller
/// buffers, so it is logged, not returned.
pub fn set_socket_buffers(fd: BorrowedFd<'_>, bytes: usize) {
    for (force, plain, name) in [
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, "send"),
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, "receive"),
    ] {
        if let Err(e) = set_buffer(fd, force, plain, bytes) {
            tracing::warn!(error = %e, bytes, "cannot set the UDP {name} buffer");
        }
    }
}

/// Sets `SO_RCVBUF` alone to `bytes`, as [`set_socket_buffers`] does (forced past
/// `net.core.rmem_max` when root).
pub fn set_receive_buffer(fd: BorrowedFd<'_>, bytes: usize) -> std::io::Result<()> {
    set_buffer(fd, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, bytes)
}

/// One buffer's size: the `force` option, else the `plain` one (capped by the kernel).
fn set_buffer(
    fd: BorrowedFd<'_>,
    force: libc::c_int,
    plain: libc::c_int,
    bytes: usize,
) -> std::io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    setsockopt_int(fd, libc::SOL_SOCKET, force, value)
        .or_else(|_| setsockopt_int(fd, libc::SOL_SOCKET, plain, value))
}

/// The drops the kernel has counted at `fd` since it was opened, a full receive buffer among
/// their causes (`SO_MEMINFO`'s `SK_MEMINFO_DROPS`; a GRO batch of datagrams may count as
/// one), and the receive buffer in bytes as the kernel counts it (`SK_MEMINFO_RCVBUF`: twice
/// what was asked). The first is a 32-bit counter that wraps. `Unsupported` from a kernel
/// whose `SO_MEMINFO` has no drop counter yet.
#[inline]
pub fn socket_drops(fd: BorrowedFd<'_>) -> std::io::Result<(u32, u32)> {
    // linux/sock_diag.h: SK_MEMINFO_RCVBUF is slot 1, SK_MEMINFO_DROPS slot 8; the kernel
    // copies no more slots than it has and says how many bytes it wrote.
    const RCVBUF: usize = 1;
    const DROPS: usize = 8;
    let mut info = [0u32; DROPS + 1];
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: `fd` is open for the borrow; SO_MEMINFO writes at most `len` bytes of `u32`s into
    // `info`, which is that long, and sets `len` to what it wrote.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if (len as usize) < std::mem::size_of_val(&info) {
        return Err(std::io::Error::from(std::io::ErrorKind::Unsupported));
    }
    Ok((info[DROPS], info[RCVBUF]))
}

/// Lets the kernel size datagrams by the path MTU it learns and fragment larger ones, as any
/// UDP socket does by default (`IP_PMTUDISC_WANT`, and for an IPv6 socket also
/// `IPV6_PMTUDISC_WANT` without `IPV6_DONTFRAG`). quinn-udp sets `…_PMTUDISC_PROBE` (and
/// `IPV6_DONTFRAG`), right for QUIC, which probes the path itself: here a hop with a smaller
/// MTU than the interface's would drop every full-size datagram for good, its "fragmentation
/// needed" ignored. flannel's udp backend leaves the default, and fragments.
pub fn allow_fragmentation(fd: BorrowedFd<'_>, ipv6: bool) -> std::io::Result<()> {
    setsockopt_int(
        fd,
        libc::IPPROTO_IP,
        libc::IP_MTU_DISCOVER,
        libc::IP_PMTUDISC_WANT,
    )?;
    if ipv6 {
        setsockopt_int(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_WANT,
        )?;
        setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, 0)?;
    }
    Ok(())
}

/// `IP_MTU_DISCOVER` of `fd` (and `IPV6_MTU_DISCOVER` when `ipv6`), for tests.
#[cfg(test)]
pub fn mtu_discover(fd: BorrowedFd<'_>, ipv6: bool) -> std::io::Result<libc::c_int> {
    if ipv6 {
        getsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER)
    } else {
        getsockopt_int(fd, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER)
    }
}

/// The path MTU the kernel knows for `peer`: the outgoing interface's MTU, or a smaller one
/// it learned from the underlay's ICMP ("fragmentation needed", "packet too big"). Read as
/// `IP_MTU` (`IPV6_MTU`) of a throwaway socket connected to `peer`, from `source` when given
/// (as the worker's datagrams leave), so that the route lookup is the one they get. Five
/// system calls: for the rare refusal of a batch, never per packet.
pub fn path_mtu(peer: SocketAddr, source: Option<IpAddr>) -> std::io::Result<usize> {
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(peer),
        socket2::Type::DGRAM,
        None,
    )?;
    if let Some(ip) = source.filter(|ip| ip.is_ipv4() == peer.is_ipv4()) {
        // Best effort: the address may be gone, and the kernel's choice is the same route
        // but in policy routing.
        let _ = socket.bind(&SocketAddr::new(ip, 0).into());
    }
    socket.connect(&peer.into())?;
    let mtu = if peer.is_ipv4() {
        getsockopt_int(socket.as_fd(), libc::IPPROTO_IP, libc::IP_MTU)?
    } else {
        getsockopt_int(socket.as_fd(), libc::IPPROTO_IPV6, libc::IPV6_MTU)?
    };
    usize::try_from(mtu).map_err(|_| std::io::Error::other(format!("path MTU {mtu}")))
}

/// An option that is one `c_int`.
fn getsockopt_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
) -> std::io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` is open for the borrow; the options read through here (IP_MTU_DISCOVER,
    // IPV6_MTU_DISCOVER, IP_MTU, IPV6_MTU) write one `c_int` into `value`, whose size `len`
    // gives, and `len` is a live `socklen_t` the kernel may update.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether UDP GRO is on for `fd` (tests).
#[cfg(test)]
pub fn udp_gro_enabled(fd: BorrowedFd<'_>) -> std::io::Result<bool> {
    getsockopt_int(fd, libc::SOL_UDP, libc::UDP_GRO).map(|v| v != 0)
}

/// Sends IPv6 datagrams from `fd` with a zero UDP checksum (`UDP_NO_CHECK6_TX`), so the kernel
/// refuses GSO sends to IPv6 peers (EINVAL) while it takes IPv4 ones: a host whose IPv6 GSO
/// fails, for tests. linux/udp.h's value; the libc crate has it for Android only.
#[cfg(test)]
pub fn refuse_ipv6_gso(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    const UDP_NO_CHECK6_TX: libc::c_int = 101;
    setsockopt_int(fd, libc::SOL_UDP, UDP_NO_CHECK6_TX, 1)
}

/// Takes IPv6 datagrams with a zero UDP checksum on `fd` (`UDP_NO_CHECK6_RX`), which
/// [`refuse_ipv6_gso`]'s socket sends; the kernel drops them otherwise.
#[cfg(test)]
pub fn accept_zero_ipv6_checksum(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    const UDP_NO_CHECK6_RX: libc::c_int = 102;
    setsockopt_int(fd, libc::SOL_UDP, UDP_NO_CHECK6_RX, 1)
}

/// Turns UDP GRO off on `fd` (quinn-udp turns it on wherever the kernel has it).
pub fn disable_udp_gro(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    setsockopt_int(fd, libc::SOL_UDP, libc::UDP_GRO, 0)
}

fn setsockopt_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: the options we set through here (SO_*BUF*, UDP_GRO, IP_MTU_DISCOVER,
    // IPV6_MTU_DISCOVER, IPV6_DONTFRAG) read exactly one `c_int`, which is what we pass.
    unsafe { setsockopt(fd, level, name, &value) }
}

/// Attaches a classic BPF program to the `SO_REUSEPORT` group of `fd`
/// (`SO_ATTACH_REUSEPORT_CBPF`): it then picks which socket of the group receives each
/// datagram. The kernel copies the program.
pub fn attach_reuseport_cbpf(
    fd: BorrowedFd<'_>,
    program: &[libc::sock_filter],
) -> std::io::Result<()> {
    let prog = libc::sock_fprog {
        len: u16::try_from(program.len())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: the option reads one `sock_fprog`, whose `filter` points at `len` initialised
    // instructions borrowed for the whole call; the kernel copies them before returning and
    // never writes through the `*mut` they are typed with.
    unsafe { setsockopt(fd, libc::SOL_SOCKET, libc::SO_ATTACH_REUSEPORT_CBPF, &prog) }
}

/// `setsockopt(fd, level, name, value, size_of::<T>())`.
///
/// # Safety
///
/// `T` must be the type the option `name` reads, and any pointer inside `value` must be valid
/// for what the kernel reads through it during the call.
unsafe fn setsockopt<T>(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> std::io::Result<()> {
    // SAFETY: `fd` is open for the lifetime of the borrow; `value` is a live `T` and we pass its
    // exact size, so the kernel reads only memory we own; the caller vouches for the option's
    // type and for pointers inside `value`.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Sends SIGKILL to every process in the process group `pgid`: a command started as the
/// leader of a group of its own, with whatever it started (a wrapper script's `iptables`).
/// Refuses the groups that are no command's (0: our own; 1: init's; anything past `pid_t`).
pub fn kill_process_group(pgid: u32) -> std::io::Result<()> {
    let pgid = libc::pid_t::try_from(pgid)
        .ok()
        .filter(|&g| g > 1)
        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: kill(2) takes plain integers and touches none of our memory. A negative pid
    // names a process group; `pgid > 1` keeps the argument from being -1 (every process we
    // may signal) or 0 (our own group).
    if unsafe { libc::kill(-pgid, libc::SIGKILL) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Creates the TUN device `name` and attaches one queue to it, the returned file; fails with
/// `EBUSY` when a network device of that name exists (`IFF_TUN_EXCL`), where a plain
/// `TUNSETIFF` would attach to it. `multi_queue` and `vnet_hdr` must be what the device's other
/// queues will be opened with: the kernel takes a multi-queue device's flags from its first
/// queue only.
pub fn create_tun_exclusively(
    name: &str,
    multi_queue: bool,
    vnet_hdr: bool,
) -> std::io::Result<std::fs::File> {
    let bytes = name.as_bytes();
    // (`%` would make the name a template the kernel numbers: `x%d` becomes `x0`.)
    if bytes.is_empty()
        || bytes.len() >= libc::IFNAMSIZ
        || bytes.contains(&0)
        || bytes.contains(&b'%')
    {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{name:?} is not a valid network device name"),
        ));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // SAFETY: `ifreq` is plain C data (a name array and a union of integers and addresses),
    // for which all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    // The name fits with its terminating NUL, which the zeroed array already has.
    for (slot, byte) in req.ifr_name.iter_mut().zip(bytes) {
        *slot = *byte as libc::c_char;
    }
    let flags = libc::IFF_TUN
        | libc::IFF_NO_PI
        | libc::IFF_TUN_EXCL
        | if multi_queue {
            libc::IFF_MULTI_QUEUE
        } else {
            0
        }
        | if vnet_hdr { libc::IFF_VNET_HDR } else { 0 };
    // The flags all fit in the 16 bits of `ifr_flags` (IFF_TUN_EXCL is 0x8000, the sign bit).
    req.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: the file is open for the call; TUNSETIFF reads a `struct ifreq`, which `req` is,
    // and writes the device's name back into it; nothing else is touched.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if rc == 0 {
        Ok(file)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether a network device named `name` exists in this thread's network namespace.
pub fn interface_exists(name: &str) -> bool {
    let Ok(name) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: `name` is a NUL-terminated string that lives across the call, which only reads
    // it.
    unsafe { libc::if_nametoindex(name.as_ptr()) != 0 }
}

/// Moves the calling thread (only it) into a new, empty network namespace, which goes away
/// with the thread's last device and socket: for tests that create devices. Needs root.
#[cfg(test)]
pub fn enter_new_network_namespace() -> std::io::Result<()> {
    // SAFETY: unshare takes flags only; CLONE_NEWNET changes this thread's network namespace
    // and touches no memory of ours.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// This process's effective user ID.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid takes no arguments, touches no memory of ours and cannot fail.
    unsafe { libc::geteuid() }
}

/// Whether this process's child `pid` has exited, without reaping it (`waitid` with
/// `WNOWAIT`): an unreaped child keeps its PID, so the caller may still signal it. Exact where
/// /proc's state is not: a process whose main thread ended while other threads run shows as a
/// zombie there. Fails with ECHILD for a PID that is not an unreaped child of this process.
pub fn child_has_exited(pid: u32) -> std::io::Result<bool> {
    let id = libc::id_t::try_from(pid)
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut info = std::mem::MaybeUninit::<libc::siginfo_t>::zeroed();
    let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
    // SAFETY: `info` is valid, writable memory of the size waitid(2) writes; P_PID with a
    // positive id names one process, and WNOWAIT leaves it unreaped.
    if unsafe { libc::waitid(libc::P_PID, id, info.as_mut_ptr(), flags) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: zeroed, then filled by a successful waitid; with WNOHANG and no exited child the
    // kernel leaves si_pid 0, which `si_pid` reads from the union's child fields.
    Ok(unsafe { info.assume_init().si_pid() } != 0)
}

#[cfg(test)]
mod test {
    use super::*;

    /// A socket that is sent more than its buffer holds, and not read, counts what the kernel
    /// dropped; a larger buffer asked for is what the kernel then reports.
    #[test]
    fn a_full_receive_buffer_s_drops_are_read() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // The smallest buffer the kernel gives (without root: at most rmem_max; either way
        // far below what is sent).
        set_receive_buffer(rx.as_fd(), 4096).unwrap();
        let (before, small) = socket_drops(rx.as_fd()).unwrap();
        assert_eq!(before, 0);
        let datagram = [0u8; 1000];
        for _ in 0..200 {
            tx.send_to(&datagram, rx.local_addr().unwrap()).unwrap();
        }
        let (after, _) = socket_drops(rx.as_fd()).unwrap();
        assert!(
            after > 100,
            "{after} drops of 200 datagrams into {small} bytes"
        );
        set_receive_buffer(rx.as_fd(), 65_536).unwrap();
        let (_, larger) = socket_drops(rx.as_fd()).unwrap();
        assert!(larger > small, "{larger} after {small}");
    }

    #[test]
    fn a_child_s_exit_is_seen_without_reaping_it() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        assert!(!child_has_exited(pid).unwrap());
        child.kill().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !child_has_exited(pid).unwrap() {
            assert!(
                std::time::Instant::now() < deadline,
                "the killed child never exited"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // Still there to reap, and then no child of ours any more.
        assert!(child_has_exited(pid).unwrap());
        assert!(!child.wait().unwrap().success());
        let gone = child_has_exited(pid).unwrap_err();
        assert_eq!(gone.raw_os_error(), Some(libc::ECHILD), "{gone}");
    }

    /// Loopback's MTU is the path MTU to any loopback address (IPv4 caps it at 65535), an
    /// IPv4-mapped one included (asked over IPv4), with or without a source. No root.
    #[test]
    fn the_path_mtu_is_the_route_s() {
        let lo: usize = std::fs::read_to_string("/sys/class/net/lo/mtu")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let v4 = lo.min(65535);
        let lo4: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:9".parse().unwrap();
        assert_eq!(path_mtu(lo4, None).unwrap(), v4);
        assert_eq!(path_mtu(mapped, None).unwrap(), v4);
        assert_eq!(path_mtu(lo4, Some(lo4.ip())).unwrap(), v4);
        // A source of the other family is left out, not an error.
        assert_eq!(path_mtu(lo4, Some("::1".parse().unwrap())).unwrap(), v4);
        assert_eq!(path_mtu("[::1]:9".parse().unwrap(), None).unwrap(), lo);
    }
}
