//! A worker: one thread, one TUN queue, one UDP socket, one mio event loop. It reads a batch,
//! asks `forward` ([`egress`](super::forward::egress)) what to do with each packet against a
//! snapshot loaded once for the batch, and carries the verdicts out in batches: runs of
//! same-peer packets leave in one UDP GSO `sendmsg`, received datagrams arrive by `recvmmsg`
//! (with UDP GRO when the kernel has it), and consecutive segments of one flow are written to
//! the TUN as one super-packet when offloads are on ([`coalesce`]).
//!
//! Buffers are allocated once when the worker starts; the loop allocates nothing, takes no lock
//! and logs nothing per packet. Must not import tokio, `lease` or `daemon`.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use tun_rs::{SyncDevice, VIRTIO_NET_HDR_LEN};

use super::batch::Run;
use super::coalesce::{self, MAX_RUN, Run as CoalesceRun};
use super::counters::{Counters, DropReason, LocalCounters};
use super::forward::{self, Asked, Egress, ForwardConfig, IcmpLimiter, Ingress, PathMtus};
use super::io::{Source, UdpEndpoint, socket_addr_for};
use crate::sys;
use crate::table::Reader;

const TUN: Token = Token(0);
const UDP: Token = Token(1);
const WAKE: Token = Token(2);

/// Packets read from the TUN per batch without offloads (one read each); with offloads, reads
/// go on while at most this many segments are in the batch.
const TUN_BATCH: usize = 64;
/// Segment buffers for one offloaded TUN read: a 64 KiB super-packet split at an MSS as small as
/// 536 bytes gives up to 123 segments (wireguard-go uses 128 too). The daemon caps the device's
/// `gso_max_segs` at this, so the kernel never hands a worker more (a flow with a smaller MSS
/// gets smaller super-packets).
pub const SEGMENTS: usize = 128;
/// Receive buffers per `recvmmsg`. With UDP GRO each holds up to 64 KiB of coalesced datagrams
/// (about 44 full-size segments); 4 of them bound a worker's receive memory at 256 KiB, for the
/// embedded memory budget, and still move ~176 segments per system call.
const RX_GRO_BUFS: usize = 4;
/// Receive buffers per `recvmmsg` without GRO (one datagram each).
const RX_BUFS: usize = 32;

/// Everything a worker needs; built by the daemon, moved into the thread.
pub struct WorkerSetup {
    /// Worker number, for thread names and logs.
    pub id: usize,
    /// This worker's TUN queue (non-blocking).
    pub tun: SyncDevice,
    /// Whether the TUN was opened with virtio-net headers.
    pub tun_offload: bool,
    /// This worker's UDP socket (bound to the overlay port; receives, and sends when `tx` is
    /// `None`).
    pub udp: UdpEndpoint,
    /// A send-only socket on an ephemeral port, one per worker. Peers' `SO_REUSEPORT` then
    /// spreads what different workers send over different receiving workers (the kernel hashes
    /// the source port), while each flow, pinned to one worker here, stays on one worker there.
    pub tx: Option<UdpEndpoint>,
    /// The worker's handle on the forwarding table.
    pub table: Reader,
    /// Forwarding settings.
    pub config: ForwardConfig,
    /// Disable UDP GSO even if the kernel has it (`--no-offload`).
    pub no_udp_offload: bool,
    /// Receive with UDP GRO where the socket has it. Off with `--no-offload`, and on kernels
    /// before 5.12, whose UDP GRO had bugs (perf-techniques.md; wireguard-go does the same).
    pub udp_gro: bool,
    /// The most polling a sleep can earn (`--busy-poll-us`; zero: never poll). See
    /// [`Worker::run`].
    pub busy_poll: std::time::Duration,
    /// The receive buffer `udp` was opened with (`--socket-buffer`), and the most it may grow
    /// to when it overflows (`--socket-buffer-max`; see [`Overflow`]).
    pub receive_buffer: (usize, usize),
}

/// A running worker thread.
pub struct WorkerHandle {
    /// Whether the worker receives with UDP GRO.
    pub udp_gro: bool,
    /// Whether the worker sends with UDP GSO (at its start: the kernel has it, and it was not
    /// turned off).
    pub udp_gso: bool,
    thread: Option<std::thread::JoinHandle<io::Result<()>>>,
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
    running: Arc<AtomicBool>,
    counters: Arc<Counters>,
}

impl WorkerHandle {
    /// Starts the worker thread.
    pub fn spawn(setup: WorkerSetup) -> io::Result<WorkerHandle> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
        let stop = Arc::new(AtomicBool::new(false));
        let running = Arc::new(AtomicBool::new(true));
        let counters = Arc::new(Counters::default());
        let mut worker = Worker::new(setup, Arc::clone(&stop), Arc::clone(&counters))?;
        let udp_gro = worker.udp_gro;
        let udp_gso = worker.max_gso_segments > 1;
        let flag = ClearOnExit(Arc::clone(&running));
        let thread = std::thread::Builder::new()
            .name(format!("linen-worker-{}", worker.id))
            .spawn(move || {
                // Cleared when the thread ends, by returning or by unwinding from a panic: the
                // daemon counts a worker whose flag is down as gone.
                let _flag = flag;
                let result = worker.run(poll);
                if let Err(e) = &result {
                    tracing::error!(worker = worker.id, error = %e, "worker stopped on an error");
                }
                result
            })?;
        Ok(WorkerHandle {
            udp_gro,
            udp_gso,
            thread: Some(thread),
            waker,
            stop,
            running,
            counters,
        })
    }

    /// Whether the thread is still running.
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    /// The worker's counters.
    pub fn counters(&self) -> LocalCounters {
        self.counters.snapshot()
    }

    /// A read-only view of the worker's liveness and counters that outlives the handle, for
    /// metrics and status (read on demand; the worker's hot path is untouched).
    pub fn monitor(&self) -> WorkerMonitor {
        WorkerMonitor {
            running: Arc::clone(&self.running),
            counters: Arc::clone(&self.counters),
        }
    }

    /// Asks the worker to stop (returns at once).
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.waker.wake();
    }

    /// Stops the worker and waits for it.
    pub fn join(mut self) -> io::Result<()> {
        self.request_stop();
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(io::Error::other("worker thread panicked")),
            None => Ok(()),
        }
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.request_stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Lowers a worker's `running` flag when dropped: at the end of its thread, however it ends.
struct ClearOnExit(Arc<AtomicBool>);

impl Drop for ClearOnExit {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// What the control plane may read of a worker: whether it runs, and its published counters.
#[derive(Clone, Debug)]
pub struct WorkerMonitor {
    running: Arc<AtomicBool>,
    counters: Arc<Counters>,
}

impl WorkerMonitor {
    /// Whether the worker thread is still running.
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    /// The worker's counters as last published (at most one batch behind).
    pub fn counters(&self) -> LocalCounters {
        self.counters.snapshot()
    }
}

struct Worker {
    id: usize,
    tun: SyncDevice,
    tun_offload: bool,
    udp: UdpEndpoint,
    udp_state: UdpSocketState,
    tx: Option<(UdpEndpoint, UdpSocketState)>,
    table: Reader,
    config: ForwardConfig,
    stop: Arc<AtomicBool>,
    shared: Arc<Counters>,
    local: LocalCounters,
    limiter: IcmpLimiter,
    /// Path MTUs learned for peers behind a smaller hop (see [`PathMtus`]).
    paths: PathMtus,
    // TUN → UDP
    /// Where an offloaded TUN read lands (virtio-net header and up to 64 KiB). Empty when the
    /// first UDP GRO receive buffer serves instead: the two are never in use at once (a TUN
    /// read is split into the arena before anything else happens, and a receive batch is
    /// written to the TUN before the next read), and sharing saves 64 KiB per worker.
    tun_raw: Vec<u8>,
    /// Packets read from the TUN, one per `stride` bytes.
    arena: Vec<u8>,
    stride: usize,
    seg_sizes: Vec<usize>,
    max_gso_segments: usize,
    /// Families whose GSO sends were refused lately (see [`FamilyGso`]).
    family_gso: FamilyGso,
    no_udp_offload: bool,
    /// Whether a refused source address was logged (once per worker).
    source_warned: bool,
    /// When to probe quinn-udp's state again after a refused source or a refused GSO send
    /// cost it GSO.
    reprobe: Reprobe,
    busy_poll: std::time::Duration,
    /// Overflows of the receiving socket (see [`Overflow`]).
    overflow: Overflow,
    icmp_buf: Vec<u8>,
    // UDP → TUN
    /// Receiving with UDP GRO (64 KiB buffers).
    udp_gro: bool,
    /// The receive buffers, `rx_len` bytes each, one after the other: without GRO a flow's
    /// datagrams in consecutive buffers are then chunks `rx_len` apart, which a coalescing run
    /// spans as it spans the chunks of one GRO'd datagram.
    rx_arena: Vec<u8>,
    rx_len: usize,
    rx_meta: Vec<RecvMeta>,
    tun_out: TunWriter,
}

impl Worker {
    fn new(setup: WorkerSetup, stop: Arc<AtomicBool>, shared: Arc<Counters>) -> io::Result<Worker> {
        let udp_state = socket_state(&setup.udp)?;
        let tx = match setup.tx {
            Some(ep) => {
                let state = socket_state(&ep)?;
                Some((ep, state))
            }
            None => None,
        };
        let send_state = tx.as_ref().map_or(&udp_state, |(_, st)| st);
        let max_gso_segments = if setup.no_udp_offload {
            1
        } else {
            send_state.max_gso_segments().max(1)
        };
        // quinn-udp turned GRO on where the kernel has it. Receiving without it needs it off on
        // the socket too (a GRO'd datagram would not fit the small buffers): if that fails,
        // GRO stays, with its buffers.
        let mut gro = udp_state.gro_segments() > 1;
        if gro && !setup.udp_gro {
            match sys::disable_udp_gro(setup.udp.socket.as_fd()) {
                Ok(()) => gro = false,
                Err(e) => {
                    tracing::warn!(worker = setup.id, error = %e, "cannot turn UDP GRO off; keeping it")
                }
            }
        }
        let seg_len = (setup.config.mtu + 64).max(1600);
        // Full-size segments of a split super-packet are exactly MTU bytes long.
        let stride = setup.config.mtu.max(576);
        // A GRO receive (up to 64 KiB) or, in the first buffer, a TUN read (see `tun_raw`).
        let tun_read_len = VIRTIO_NET_HDR_LEN + 65_535;
        let (rx_count, rx_len) = if gro {
            (RX_GRO_BUFS, tun_read_len)
        } else {
            (RX_BUFS, seg_len)
        };
        let segs = if setup.tun_offload {
            TUN_BATCH + SEGMENTS
        } else {
            TUN_BATCH
        };
        tracing::debug!(
            worker = setup.id,
            tun_offload = setup.tun_offload,
            max_gso_segments,
            udp_gro = gro,
            tun_uso = setup.tun.udp_gso(),
            "worker buffers"
        );
        Ok(Worker {
            id: setup.id,
            tun_raw: if setup.tun_offload && !gro {
                vec![0; tun_read_len]
            } else {
                Vec::new()
            },
            arena: vec![0; segs * stride],
            stride,
            seg_sizes: vec![0; segs],
            max_gso_segments,
            family_gso: FamilyGso::default(),
            no_udp_offload: setup.no_udp_offload,
            source_warned: false,
            reprobe: Reprobe::default(),
            busy_poll: setup.busy_poll,
            overflow: Overflow::new(
                sys::socket_drops(setup.udp.socket.as_fd()).is_ok(),
                setup.receive_buffer,
                Instant::now(),
            ),
            icmp_buf: vec![0; 1280],
            udp_gro: gro,
            rx_arena: vec![0; rx_len * rx_count],
            rx_len,
            rx_meta: vec![RecvMeta::default(); rx_count],
            tun_out: TunWriter::new(setup.tun_offload, setup.tun_offload && setup.tun.udp_gso()),
            tun: setup.tun,
            tun_offload: setup.tun_offload,
            udp: setup.udp,
            udp_state,
            tx,
            table: setup.table,
            config: setup.config,
            stop,
            shared,
            local: LocalCounters::default(),
            limiter: IcmpLimiter::default(),
            paths: PathMtus::default(),
        })
    }

    fn run(&mut self, mut poll: Poll) -> io::Result<()> {
        let tun_fd = self.tun.as_raw_fd();
        let udp_fd = self.udp.socket.as_raw_fd();
        poll.registry()
            .register(&mut SourceFd(&tun_fd), TUN, Interest::READABLE)?;
        poll.registry()
            .register(&mut SourceFd(&udp_fd), UDP, Interest::READABLE)?;
        let mut events = Events::with_capacity(8);
        // Edge-triggered: after a readiness event, drain until the kernel says WouldBlock.
        let (mut tun_ready, mut udp_ready) = (true, true);
        // Polling time left before the worker sleeps again (see below).
        let mut spin_left = Duration::ZERO;
        while !self.stop.load(Ordering::Acquire) {
            while tun_ready || udp_ready {
                // A fatal error (the device deleted) ends the worker: what this batch counted
                // is published first, for the final counters line and /metrics.
                let batch = (|| {
                    if tun_ready {
                        tun_ready = self.tun_batch()?;
                    }
                    if udp_ready {
                        udp_ready = self.udp_batch()?;
                    }
                    Ok::<_, io::Error>(())
                })();
                self.shared.publish(&self.local);
                batch?;
                self.local = LocalCounters::default();
                if self.stop.load(Ordering::Acquire) {
                    return Ok(());
                }
                // A worker that never drains (the overload that overflows its socket) still
                // reads the drop counter in time.
                if self.overflow.pending {
                    let now = Instant::now();
                    if self.overflow.due(now) {
                        self.check_overflow(now);
                    }
                }
            }
            // Poll for a while before sleeping when traffic is sparse: the reply to what was
            // just sent usually comes within a round trip, and catching it here saves a thread
            // wakeup, which costs tens of µs from an idle vCPU; a polling worker also keeps its
            // vCPU awake for the program the reply wakes (ping over linen: README, "Latency").
            // A sleep of at least QUIET earns a polling allowance of 1/16 of its length, at most
            // `busy_poll`, spent over the polls until the next sleep. So a steady flow, where
            // the worker sleeps for microseconds, polls only with what the quiet gap before it
            // earned, and polling takes at most 1/16 of the worker's time. Each round yields
            // the CPU, so that the threads which produce the reply are not held up (a spin that
            // did not yield made pings slower on 2 shared cores).
            // With `busy_poll` zero no sleep earns anything, and this is a plain blocking poll.
            let spin_from = Instant::now();
            if self.overflow.due(spin_from) {
                self.check_overflow(spin_from);
            }
            let spin_until = spin_from + spin_left;
            let mut now = spin_from;
            loop {
                let spinning = now < spin_until;
                // A sleep ends in time for the next overflow reading that is owed.
                let timeout = if spinning {
                    Some(Duration::ZERO)
                } else {
                    self.overflow.wait(now)
                };
                match poll.poll(&mut events, timeout) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                        now = Instant::now();
                        continue;
                    }
                    Err(e) => return Err(e),
                }
                if !spinning {
                    // A sleep that ended for an overflow reading, not for traffic, earns no
                    // polling.
                    spin_left = if events.is_empty() {
                        Duration::ZERO
                    } else {
                        spin_budget(self.busy_poll, now.elapsed())
                    };
                    break;
                }
                if !events.is_empty() {
                    spin_left = spin_left.saturating_sub(spin_from.elapsed());
                    break;
                }
                std::thread::yield_now();
                now = Instant::now();
            }
            for ev in events.iter() {
                match ev.token() {
                    TUN => tun_ready = true,
                    UDP => udp_ready = true,
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Reads one batch from the TUN and sends it. Returns false once the TUN is drained.
    ///
    /// Packets land in one arena at a fixed stride of the MTU, so the full-size segments of a
    /// split TCP super-packet already lie back to back, as a UDP GSO send wants them: a run of
    /// consecutive same-peer packets of one size (the last may be shorter) leaves in one
    /// `sendmsg`, straight from the arena when that size is the stride, else moved together in
    /// the arena first (small packets: a copy of a few dozen bytes each saves a system call
    /// each, and lets the peer receive them as one GRO buffer).
    fn tun_batch(&mut self) -> io::Result<bool> {
        let stride = self.stride;
        let mut count = 0;
        let mut more = true;
        if self.tun_offload {
            // Each read may be a super-packet of up to SEGMENTS segments, or one small packet:
            // keep reading while a whole super-packet still fits, so small packets are batched
            // too (up to TUN_BATCH reads) and bulk TCP moves two super-packets per batch.
            let mut reads = 0;
            while more && count <= TUN_BATCH && reads < TUN_BATCH {
                reads += 1;
                let mut chunks = self.arena[count * stride..].chunks_exact_mut(stride);
                let mut bufs: [&mut [u8]; SEGMENTS] =
                    std::array::from_fn(|_| chunks.next().unwrap_or(&mut []));
                let raw = if self.tun_raw.is_empty() {
                    &mut self.rx_arena[..self.rx_len]
                } else {
                    &mut self.tun_raw
                };
                match self.tun.recv_multiple(
                    raw,
                    &mut bufs,
                    &mut self.seg_sizes[count..count + SEGMENTS],
                    0,
                ) {
                    Ok(n) => {
                        if n == 1 {
                            let at = count * stride;
                            let len = self.seg_sizes[count];
                            udp_checksum_zero_is_ones(raw, &mut self.arena[at..at + len]);
                        }
                        count += n;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => more = false,
                    Err(e) if is_fatal(&e) => return Err(tun_lost(e)),
                    // A signal, not a packet: read again.
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    // The read itself failed: no packet to count as read.
                    Err(e) if e.raw_os_error().is_some() => self.local.drop(DropReason::Malformed),
                    // A packet read that tun-rs could not hand over: longer than a buffer (the
                    // device's MTU raised by hand), or a super-packet it could not split.
                    Err(_) => {
                        let (reason, len) = lost_read(raw, stride);
                        self.local.tun_rx_packets += 1;
                        self.local.tun_rx_bytes += len as u64;
                        self.local.drop(reason);
                    }
                }
            }
        } else {
            // Bounded as above: an error that kept coming back would hold the worker here.
            let mut reads = 0;
            while count < TUN_BATCH && reads < TUN_BATCH {
                reads += 1;
                let buf = &mut self.arena[count * stride..(count + 1) * stride];
                match self.tun.recv(buf) {
                    // Longer than a buffer (the device's MTU raised by hand): the kernel cut it
                    // and says how long it was.
                    Ok(n) if n > stride => {
                        self.local.tun_rx_packets += 1;
                        self.local.tun_rx_bytes += n as u64;
                        self.local.drop(DropReason::TooBig);
                    }
                    Ok(n) => {
                        self.seg_sizes[count] = n;
                        count += 1;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        more = false;
                        break;
                    }
                    Err(e) if is_fatal(&e) => return Err(tun_lost(e)),
                    // A signal, not a packet: read again.
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => self.local.drop(DropReason::Malformed),
                }
            }
        }
        if count == 0 {
            return Ok(more);
        }
        if !self.no_udp_offload {
            // quinn-udp lowers this to 1 after the kernel refuses GSO (EIO/EINVAL) at run time.
            let state = self.tx.as_ref().map_or(&self.udp_state, |(_, st)| st);
            self.max_gso_segments = state.max_gso_segments().max(1);
        }
        let now = Instant::now();
        self.paths.expire(now);
        let snap = self.table.load();
        let (v4, v6) = snap.sources();
        let source = Source { v4, v6 };
        if self.udp.source != source {
            set_source(
                self.id,
                source,
                &mut self.udp,
                &mut self.tx,
                &mut self.source_warned,
            );
        }
        let mut news = SourceNews::Nothing;
        // The peers whose path MTU is asked for after the batch ([`Questions`]).
        let mut questions = Questions::default();
        // What is left of this batch's time to wait for room in a full send buffer.
        let mut wait = BATCH_SEND_WAIT;
        // The most segments a run may have, by the peer's family.
        self.family_gso.update(self.max_gso_segments, now);
        let mut gso_refused = false;
        // Anything not sent breaks a run: send the open run first.
        macro_rules! flush {
            ($run:expr) => {
                if let Some(r) = $run.take() {
                    let peer = r.peer;
                    if r.n == 1 && r.bytes > every_path_carries(peer) {
                        questions.alone(peer);
                    }
                    let sent = send_run(
                        sender(&self.tx, &self.udp, &self.udp_state),
                        &mut self.arena,
                        stride,
                        r,
                        &mut self.local,
                        &mut wait,
                    );
                    news = news.max(sent.news);
                    if sent.too_big {
                        questions.refused(peer);
                    }
                    if sent.gso_refused {
                        gso_refused = true;
                        self.family_gso.refuse(self.id, peer, now);
                    } else if sent.gso_sent {
                        self.family_gso.worked(peer, now);
                    }
                }
            };
        }
        let mut run: Option<Run> = None;
        for i in 0..count {
            let size = self.seg_sizes[i].min(stride);
            self.local.tun_rx_packets += 1;
            self.local.tun_rx_bytes += size as u64;
            let at = i * stride;
            let verdict = forward::egress(
                &mut self.arena[at..at + size],
                snap,
                &self.config,
                &self.paths,
                &mut self.limiter,
                now,
                &mut self.icmp_buf,
            );
            let Egress::Send { peer, len } = verdict else {
                flush!(run);
                match verdict {
                    Egress::SendAlone { peer, len, icmp } => {
                        let sock = sender(&self.tx, &self.udp, &self.udp_state);
                        let pkt = &self.arena[at..at + len];
                        let sent = send_gso(sock, pkt, peer, (len, 1), &mut self.local, &mut wait);
                        news = news.max(sent.news);
                        if icmp > 0 {
                            self.tun_out.write_icmp(
                                &self.tun,
                                &self.icmp_buf[..icmp],
                                &mut self.local,
                            )?;
                        }
                    }
                    Egress::Icmp { len, reason } => {
                        self.local.drop(reason);
                        self.tun_out.write_icmp(
                            &self.tun,
                            &self.icmp_buf[..len],
                            &mut self.local,
                        )?;
                    }
                    Egress::Drop(reason) => self.local.drop(reason),
                    Egress::Send { .. } => {}
                }
                continue;
            };
            if !run.as_mut().is_some_and(|r| r.try_extend(peer, len)) {
                flush!(run);
                // Looked up once per run: a refusal changes the limit only in a flush.
                run = Some(Run::new(peer, i, len, self.family_gso.limit(peer)));
            }
        }
        flush!(run);
        if news != SourceNews::Nothing {
            self.source_refused(news);
        }
        for (peer, asked) in questions.iter() {
            if self.paths.ask(peer, now, asked) {
                let (udp, _) = sender(&self.tx, &self.udp, &self.udp_state);
                learn_path_mtu(
                    self.id,
                    udp,
                    peer,
                    self.config.mtu,
                    &mut self.paths,
                    now,
                    asked,
                );
            }
        }
        if gso_refused && !self.family_gso.all_refused() {
            // The refused family waits (`family_gso`); the other keeps GSO. When both wait, the
            // rate-limited probe below gives GSO back instead.
            self.reprobe();
        }
        if self.max_gso_segments > 1 {
            let state = self.tx.as_ref().map_or(&self.udp_state, |(_, st)| st);
            if state.max_gso_segments() == 1 {
                // Lost in this batch: for the socket's whole life, to quinn-udp, though the
                // refusal may concern one peer only (its path MTU). Probe again later.
                self.reprobe.gso_lost();
            }
        }
        // Also in batches after the address came back: a state that lost GSO stays without it.
        if self.reprobe.due(now) {
            self.reprobe();
        }
        Ok(more)
    }

    /// The kernel refused the source address of a send (EINVAL, EADDRNOTAVAIL, ENETUNREACH:
    /// the advertised address is gone, or still tentative at boot), which then went out from
    /// the kernel's choice. Each send still tries the address first, so traffic uses it again
    /// as soon as it is back. quinn-udp takes an EINVAL for a refusal of GSO and stops
    /// segmenting for good: when a GSO send went through without the source, the socket
    /// segments after all, and its state is probed again ([`reprobe`](Worker::reprobe)).
    #[cold]
    fn source_refused(&mut self, news: SourceNews) {
        if !self.source_warned {
            self.source_warned = true;
            let ep = self.tx.as_ref().map_or(&self.udp, |(ep, _)| ep);
            tracing::warn!(
                worker = self.id,
                source = ?ep.source,
                "the kernel refuses the advertised source address; sending from its choice meanwhile"
            );
        }
        self.reprobe.note(news);
    }

    /// Gives GSO back to a quinn-udp state that lost it to a refused source address or a
    /// refused GSO send (at most every [`REPROBE_EVERY`]). A fresh state turns UDP GRO on:
    /// on the receive socket (one worker, or `--fixed-source-port`) of a worker that receives
    /// without GRO (a kernel before 5.12), it is turned off again at once, since its small
    /// buffers cannot take GRO'd datagrams. (It used to be left without GSO for good there.)
    #[cold]
    fn reprobe(&mut self) {
        let (ep, state, keep_gro_off) = match &mut self.tx {
            Some((ep, st)) => (&*ep, st, false),
            None => (&self.udp, &mut self.udp_state, !self.udp_gro),
        };
        if let Some(fresh) = reprobe_if_gso_lost(ep, state, keep_gro_off) {
            *state = fresh;
        }
    }

    /// Reads the receiving socket's drop counter ([`Overflow`]): new drops are counted and
    /// grow the receive buffer while it may grow. (Inline, with what runs only on a drop out
    /// of line: code run every second is then not spread over more pages of the binary, each
    /// of which costs resident memory.)
    #[inline]
    fn check_overflow(&mut self, now: Instant) {
        match sys::socket_drops(self.udp.socket.as_fd()) {
            Ok((drops, _)) => {
                let (dropped, grow) = self.overflow.read(drops, now);
                if dropped != 0 {
                    self.overflowed(dropped, grow);
                }
            }
            Err(e) => self.overflow_unreadable(&e),
        }
    }

    #[cold]
    fn overflow_unreadable(&mut self, e: &io::Error) {
        tracing::debug!(worker = self.id, error = %e, "cannot read the UDP socket's drop counter; its overflows are not counted");
        self.overflow.unreadable();
    }

    /// Counts `dropped` and grows the receive buffer as `grow` says.
    #[cold]
    fn overflowed(&mut self, dropped: u64, grow: Grow) {
        let fd = self.udp.socket.as_fd();
        self.shared.publish(&LocalCounters {
            udp_rx_overflow: dropped,
            ..LocalCounters::default()
        });
        match grow {
            // The kernel reports twice what it granted; without CAP_NET_ADMIN it grants at
            // most net.core.rmem_max.
            Grow::To(bytes) => {
                match sys::set_receive_buffer(fd, bytes).and_then(|()| sys::socket_drops(fd)) {
                    Ok((_, kernel)) if kernel as usize / 2 >= bytes.min(i32::MAX as usize / 2) => {
                        tracing::info!(
                            worker = self.id,
                            dropped,
                            bytes,
                            "the UDP receive buffer overflowed; doubled it (at most --socket-buffer-max)"
                        )
                    }
                    got => {
                        self.overflow.capped();
                        let granted = got.as_ref().map_or(0, |(_, k)| *k as usize / 2);
                        let error = got.err().map(|e| e.to_string());
                        let error = error.as_deref();
                        tracing::warn!(
                            worker = self.id,
                            dropped,
                            asked = bytes,
                            granted,
                            error,
                            "the UDP receive buffer overflowed and cannot grow (net.core.rmem_max caps it without CAP_NET_ADMIN); further drops are only counted (udp_rx_overflow)"
                        )
                    }
                }
            }
            Grow::AtMax(bytes) => tracing::warn!(
                worker = self.id,
                dropped,
                bytes,
                "the UDP receive buffer overflowed at its largest size (--socket-buffer-max); further drops are only counted (udp_rx_overflow)"
            ),
            Grow::No => {}
        }
    }

    /// Receives one `recvmmsg` batch and delivers it. Returns false once the socket is drained.
    fn udp_batch(&mut self) -> io::Result<bool> {
        let n = {
            let count = self.rx_arena.len() / self.rx_len;
            let mut bufs = self.rx_arena.chunks_exact_mut(self.rx_len);
            let mut iovs: [IoSliceMut<'_>; RX_BUFS] = std::array::from_fn(|_| {
                IoSliceMut::new(bufs.next().map_or(&mut [][..], |b| &mut b[..]))
            });
            match self.udp_state.recv(
                UdpSockRef::from(&self.udp.socket),
                &mut iovs[..count],
                &mut self.rx_meta,
            ) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(true),
                Err(e) => {
                    // ICMP errors queued on the socket (port unreachable from a peer that is
                    // down) surface here as ECONNREFUSED and the like: not fatal.
                    tracing::debug!(worker = self.id, error = %e, "UDP receive error");
                    return Ok(true);
                }
            }
        };
        self.overflow.received();
        let snap = self.table.load();
        let all = &self.rx_arena[..];
        // An open run of segments to coalesce (offloads only).
        let mut run: Option<CoalesceRun> = None;
        for m in 0..n {
            let meta = self.rx_meta[m];
            let stride = meta.stride.max(1);
            let base = m * self.rx_len;
            let buf = &self.rx_arena[base..base + meta.len.min(self.rx_len)];
            let across = spans_buffers(self.udp_gro, stride, buf.len());
            if !across && let Some(r) = run.take() {
                // A run from earlier buffers ends before a GRO'd datagram.
                self.tun_out
                    .write_run(&self.tun, all, self.rx_len, r, &mut self.local)?;
            }
            // Where the run's chunks are: the arena (chunk m) or this datagram (chunk k).
            let (run_buf, run_stride) = if across {
                (all, self.rx_len)
            } else {
                (buf, stride)
            };
            if buf.is_empty() {
                // An empty datagram has no chunks to walk below.
                self.local.udp_rx_packets += 1;
                self.local.drop(DropReason::Malformed);
                continue;
            }
            for (k, seg) in buf.chunks(stride).enumerate() {
                // One chunk in this buffer when `across`.
                let chunk = if across { m } else { k };
                self.local.udp_rx_packets += 1;
                self.local.udp_rx_bytes += seg.len() as u64;
                let len = match forward::ingress(seg, meta.addr, snap, &self.config) {
                    Ingress::Deliver { len } => len,
                    Ingress::Drop(reason) => {
                        self.local.drop(reason);
                        continue;
                    }
                };
                let info = if self.tun_offload {
                    coalesce::classify(&seg[..len], self.tun_out.uso)
                        .filter(|s| s.udp || self.tun_out.tso)
                } else {
                    None
                };
                if let (Some(next), Some(r)) = (info, &mut run)
                    && r.try_append(run_buf, run_stride, chunk, seg, next)
                {
                    continue;
                }
                if let Some(r) = run.take() {
                    self.tun_out
                        .write_run(&self.tun, run_buf, run_stride, r, &mut self.local)?;
                }
                if let Some(info) = info {
                    run = Some(CoalesceRun::new(chunk, info));
                    continue;
                }
                self.tun_out
                    .deliver(&self.tun, &seg[..len], &mut self.local)?;
            }
            if !across && let Some(r) = run.take() {
                self.tun_out
                    .write_run(&self.tun, buf, stride, r, &mut self.local)?;
            }
        }
        if let Some(r) = run.take() {
            // A run spanning buffers that reached the last one.
            self.tun_out
                .write_run(&self.tun, all, self.rx_len, r, &mut self.local)?;
        }
        Ok(true)
    }
}

/// Whether a receive buffer's run of one flow's segments may go on into the next buffer: without
/// GRO each buffer holds one datagram (a flannel peer, or a linen one without UDP GSO, sends
/// each segment alone), whose chunk is then the buffer's index in the arena. A buffer whose
/// datagram is GRO'd after all (`stride` below its length: GRO came back on with a fresh
/// quinn-udp state and could not be turned off again) holds several chunks, and its runs stay
/// within it, as with GRO: numbered by buffer, its second chunk would be read from its first's
/// place.
#[inline]
fn spans_buffers(udp_gro: bool, stride: usize, len: usize) -> bool {
    !udp_gro && stride >= len
}

/// The polling allowance a sleep of `slept` earns (see [`Worker::run`]): 1/16 of it, at most
/// `busy_poll`, and only for a sleep of at least [`QUIET`].
fn spin_budget(busy_poll: Duration, slept: Duration) -> Duration {
    if slept < QUIET {
        Duration::ZERO
    } else {
        busy_poll.min(slept / 16)
    }
}

/// The largest inner packet that fits every underlay path to `peer`: 576 bytes less the outer
/// 28 over IPv4 (the datagram every host must accept), 1280 less 48 over IPv6 (the smallest
/// IPv6 link MTU). Larger ones sent alone prompt a question for the peer's path MTU.
#[inline]
fn every_path_carries(peer: SocketAddr) -> usize {
    if peer.ip().to_canonical().is_ipv4() {
        576 - 28
    } else {
        1280 - 48
    }
}

/// The shortest sleep that earns polling. Traffic paced in bursts a millisecond or less apart
/// (iperf3's default pacing, a flow throttled by a busy core) does not: polling between its
/// bursts took CPU time from the programs sharing the cores and lost small datagrams in their
/// sockets (the 64-byte rate of `linen bench` fell by about 7 % with a threshold of 320 µs).
const QUIET: Duration = Duration::from_millis(2);

/// Worker `id` sends from `source` from now on, on its receive socket `udp` and its send socket
/// `tx`: the table's source addresses changed (the daemon followed the host's underlay address
/// to a new one). Fields, not the worker, so that the batch's snapshot stays borrowed.
#[cold]
fn set_source(
    id: usize,
    source: Source,
    udp: &mut UdpEndpoint,
    tx: &mut Option<(UdpEndpoint, UdpSocketState)>,
    warned: &mut bool,
) {
    tracing::debug!(worker = id, ?source, "datagram source addresses");
    udp.source = source;
    if let Some((ep, _)) = tx {
        ep.source = source;
    }
    // A new address deserves its own warning if the kernel refuses it too.
    *warned = false;
}

/// A UDP checksum that a TUN read completed (`NEEDS_CSUM` without GSO) and that came out as
/// 0 is written as all ones, as RFC 768 and the kernel do: 0 means "no checksum" for IPv4 and
/// is invalid for IPv6, whose receivers drop the datagram (one in 65,536 of a local program's
/// IPv6 UDP datagrams: DNS, QUIC). tun-rs's completion (`gso_none_checksum`, from
/// wireguard-go) writes it as computed; its segmentation of UDP super-packets already maps
/// it. `hdr` starts with the read's virtio-net header, `pkt` is the packet it completed.
/// A field of 0 without `NEEDS_CSUM` is the sender's (IPv6 tunnels may send none, RFC 6935)
/// and stays.
#[inline]
fn udp_checksum_zero_is_ones(hdr: &[u8], pkt: &mut [u8]) {
    const NEEDS_CSUM: u8 = 1;
    const GSO_NONE: u8 = 0;
    const UDP_CHECKSUM_OFFSET: u16 = 6;
    let [flags, gso_type, _, _, _, _, s0, s1, o0, o1, ..] = *hdr else {
        return;
    };
    if flags & NEEDS_CSUM == 0
        || gso_type != GSO_NONE
        || u16::from_ne_bytes([o0, o1]) != UDP_CHECKSUM_OFFSET
    {
        return;
    }
    let at = usize::from(u16::from_ne_bytes([s0, s1])) + usize::from(UDP_CHECKSUM_OFFSET);
    if let Some(field) = pkt.get_mut(at..at + 2)
        && field == [0, 0]
    {
        field.copy_from_slice(&[0xff, 0xff]);
    }
}

/// Sends `t`; when the kernel refuses its source address (the advertised address is no longer
/// ours: a floating address moved), sends it again from the kernel's choice, as without one,
/// rather than not at all. A refusal for another reason (GSO refused with EINVAL) fails both
/// and is left to the caller, with the source kept.
#[inline]
fn try_send(
    udp: &UdpEndpoint,
    state: &UdpSocketState,
    t: &Transmit<'_>,
    wait: &mut Duration,
) -> io::Result<Sent> {
    match send_waiting(udp, state, t, wait) {
        Err(e) if t.src_ip.is_some() && source_refused(&e) => {
            let without = Transmit { src_ip: None, ..*t };
            send_waiting(udp, state, &without, wait).map(|()| Sent::WithoutSource)
        }
        sent => sent.map(|()| Sent::AsAsked),
    }
}

/// How long the sends of one TUN batch may wait, in all, for room in a full socket send buffer
/// (the underlay slower than the TUN reads: a 1 GbE link, a shaping qdisc), before what is left
/// is dropped as `send_failed`. Meanwhile the worker reads nothing more from the TUN, whose
/// queue then fills: the backpressure of flanneld's blocking send. A batch holds at most about
/// 270 KB, which a 10 Mbit/s link takes some 220 ms to carry; a link that carries nothing (a
/// stalled NIC) holds up the worker's receiving for this long per batch, and no longer.
const BATCH_SEND_WAIT: Duration = Duration::from_millis(250);

/// How often a full send buffer is tried again. Not `poll`: a UDP socket reports room only
/// once its buffer is half empty (`sock_writeable`), megabytes later, where the next send
/// needs only its own size.
const SEND_RETRY_STEP: Duration = Duration::from_micros(500);

/// One send; when the socket's send buffer is full (`EAGAIN`: the socket is non-blocking),
/// tries again every [`SEND_RETRY_STEP`] while `wait` (the batch's budget) lasts, and takes
/// the time from it. Before, a full buffer dropped the whole GSO batch, up to 64 segments of
/// one flow in a row, which TCP recovers from slowly.
fn send_waiting(
    udp: &UdpEndpoint,
    state: &UdpSocketState,
    t: &Transmit<'_>,
    wait: &mut Duration,
) -> io::Result<()> {
    loop {
        match state.try_send(UdpSockRef::from(&udp.socket), t) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && !wait.is_zero() => {
                let from = Instant::now();
                std::thread::sleep(SEND_RETRY_STEP.min(*wait));
                *wait = wait.saturating_sub(from.elapsed());
            }
            sent => return sent,
        }
    }
}

/// How a datagram (or GSO batch) left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sent {
    AsAsked,
    /// The kernel refused the source address; it left from the kernel's choice.
    WithoutSource,
}

/// What sends found out about the source address, in increasing order of news.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum SourceNews {
    Nothing,
    /// The kernel refused it.
    Refused,
    /// The kernel refused it, and a GSO send went through without it: the socket segments.
    RefusedButGsoWorked,
}

/// How often quinn-udp's state may be probed again while the source address is refused.
const REPROBE_EVERY: Duration = Duration::from_secs(1);

/// When to probe quinn-udp's state again: after a GSO send went through without the refused
/// source (the state may have lost GSO to that refusal) or after the state lost GSO to a
/// refused GSO send (which may concern one peer only: a batch larger than the path MTU to it),
/// at most every [`REPROBE_EVERY`], and until it has happened, also in batches with nothing
/// refused (the address came back).
#[derive(Clone, Copy, Debug, Default)]
struct Reprobe {
    pending: bool,
    next: Option<Instant>,
}

impl Reprobe {
    /// quinn-udp stopped using GSO after the kernel refused a GSO send.
    fn gso_lost(&mut self) {
        self.pending = true;
    }

    /// Takes what a batch's sends found out.
    fn note(&mut self, news: SourceNews) {
        if news == SourceNews::RefusedButGsoWorked {
            self.pending = true;
        }
    }

    /// Whether to probe now; if so, the next one waits [`REPROBE_EVERY`].
    #[inline]
    fn due(&mut self, now: Instant) -> bool {
        if !self.pending || self.next.is_some_and(|at| now < at) {
            return false;
        }
        self.pending = false;
        self.next = Some(now + REPROBE_EVERY);
        true
    }
}

/// How often a worker that has received something reads its socket's drop counter.
const OVERFLOW_EVERY: Duration = Duration::from_secs(1);

/// A worker's watch over its receiving socket: the kernel drops what arrives while the
/// socket's receive buffer is full (the worker off its vCPU for a few milliseconds on a busy
/// host), which linen would not otherwise see. At most every [`OVERFLOW_EVERY`], and only after
/// something was received (a sleep ends for the reading that is owed), the socket's drop
/// counter is read ([`sys::socket_drops`]): new drops are counted (`udp_rx_overflow`) and
/// double the receive buffer, up to `--socket-buffer-max`. So the memory of a larger buffer
/// is spent only on a host where the smaller one overflowed.
#[derive(Debug)]
struct Overflow {
    /// The counter at the last reading; `None`: the kernel has none, nothing is read.
    seen: Option<u32>,
    /// The receive buffer asked for, and the most it may grow to.
    buffer: usize,
    max: usize,
    /// Something was received since the last reading.
    pending: bool,
    /// When the next reading may be taken.
    next: Instant,
    /// Whether an overflow at the largest buffer was logged (once).
    warned: bool,
}

/// What a reading of the drop counter calls for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Grow {
    No,
    /// Ask for a receive buffer of this many bytes.
    To(usize),
    /// Overflowed at the largest buffer (of this many bytes), said once.
    AtMax(usize),
}

impl Overflow {
    /// For a socket whose counter is `readable`, opened with `(buffer, max)` bytes. A fresh
    /// socket's counter starts at zero: drops before the worker ran are counted too.
    fn new(readable: bool, (buffer, max): (usize, usize), now: Instant) -> Overflow {
        Overflow {
            seen: readable.then_some(0),
            buffer,
            max: max.max(buffer),
            pending: false,
            next: now,
            warned: false,
        }
    }

    /// A receive batch ran.
    #[inline]
    fn received(&mut self) {
        self.pending = true;
    }

    /// How long a sleep from `now` may last: until the reading owed, if one is.
    #[inline]
    fn wait(&self, now: Instant) -> Option<Duration> {
        (self.pending && self.seen.is_some()).then(|| self.next.saturating_duration_since(now))
    }

    /// Whether a reading is owed at `now`.
    #[inline]
    fn due(&self, now: Instant) -> bool {
        self.pending && self.seen.is_some() && now >= self.next
    }

    /// The counter cannot be read: it is not read again.
    fn unreadable(&mut self) {
        self.seen = None;
    }

    /// The buffer cannot grow (said once by the caller): later drops are only counted.
    fn capped(&mut self) {
        self.max = self.buffer;
        self.warned = true;
    }

    /// Takes a reading of the counter at `now`: the drops since the last one, and what they
    /// call for.
    #[inline]
    fn read(&mut self, drops: u32, now: Instant) -> (u64, Grow) {
        let dropped = u64::from(drops.wrapping_sub(self.seen.unwrap_or(drops)));
        self.seen = Some(drops);
        self.pending = false;
        self.next = now + OVERFLOW_EVERY;
        if dropped == 0 {
            return (0, Grow::No);
        }
        if self.buffer < self.max {
            self.buffer = self.buffer.saturating_mul(2).min(self.max);
            return (dropped, Grow::To(self.buffer));
        }
        if self.warned {
            return (dropped, Grow::No);
        }
        self.warned = true;
        (dropped, Grow::AtMax(self.buffer))
    }
}

/// quinn-udp's state for `ep`'s socket. Its setup forbids fragmentation (right for QUIC); the
/// socket then gets the default back ([`sys::allow_fragmentation`]), after every setup.
fn socket_state(ep: &UdpEndpoint) -> io::Result<UdpSocketState> {
    let state = UdpSocketState::new(UdpSockRef::from(&ep.socket))?;
    sys::allow_fragmentation(ep.socket.as_fd(), ep.dual_stack)?;
    Ok(state)
}

/// A fresh quinn-udp state for `ep` when `state` stopped using GSO but a probe finds the
/// socket can: quinn-udp stops for good at any EINVAL, including one about the source address
/// and, on kernels without upstream commit 235174b2bed8 (6.13, backported to the stable
/// branches in early 2025; with it they say EMSGSIZE), one about a single peer (a GSO batch
/// larger than the path MTU to it).
#[cold]
fn reprobe_if_gso_lost(
    ep: &UdpEndpoint,
    state: &UdpSocketState,
    keep_gro_off: bool,
) -> Option<UdpSocketState> {
    if state.max_gso_segments() > 1 {
        return None;
    }
    let fresh = socket_state(ep).ok();
    // Only where the fresh state turned it on: a kernel before 5.0 has no UDP GRO to turn off.
    if keep_gro_off
        && fresh.as_ref().is_some_and(|f| f.gro_segments() > 1)
        && let Err(e) = sys::disable_udp_gro(ep.socket.as_fd())
    {
        // Not expected: it worked at start.
        tracing::warn!(error = %e, "cannot turn UDP GRO off again after probing GSO; \
            datagrams that arrive coalesced are cut short");
    }
    fresh.filter(|fresh| fresh.max_gso_segments() > 1)
}

/// Whether a send failed because of its source address.
#[cold]
fn source_refused(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EADDRNOTAVAIL) | Some(libc::ENETUNREACH) | Some(libc::EINVAL)
    )
}

/// Whether a TUN error means the queue is gone for good (the device was deleted, say).
fn is_fatal(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADF) | Some(libc::EBADFD) | Some(libc::ENODEV)
    )
}

/// A fatal TUN error, said in a way an operator can act on ("File descriptor in bad state" is
/// what deleting the device looks like from a queue).
#[cold]
fn tun_lost(e: io::Error) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("the TUN queue failed ({e}); was the device deleted?"),
    )
}

/// Everything written to the TUN goes through here, in arrival order and without copying: a
/// single packet is written at once (behind a zeroed virtio-net header when offloads are on),
/// and a run of segments of one flow as one TSO/USO super-packet with `writev`, straight from
/// the receive buffer. No per-worker queue or GRO table: the coalescing decisions are made as
/// the receive buffer is walked ([`coalesce`]), which keeps a worker's memory to its buffers.
struct TunWriter {
    /// The device takes virtio-net headers.
    offload: bool,
    /// The device accepted USO (`TUN_F_USO4|6`): UDP runs may coalesce. Turned off after
    /// [`REFUSALS`] refused UDP super-packets in a row.
    uso: bool,
    /// TCP runs may coalesce (TSO): on with the offloads, turned off like `uso`.
    tso: bool,
    /// Consecutive super-packets the kernel refused: TCP, UDP.
    refused: [u32; 2],
    /// Virtio-net + IP + TCP/UDP header of a coalesced write.
    header: [u8; coalesce::MAX_HEADER],
}

impl TunWriter {
    fn new(offload: bool, uso: bool) -> TunWriter {
        TunWriter {
            offload,
            uso,
            tso: offload,
            refused: [0; 2],
            header: [0; coalesce::MAX_HEADER],
        }
    }

    /// Whether a run of this protocol may coalesce.
    #[inline]
    fn coalesces(&self, udp: bool) -> bool {
        if udp { self.uso } else { self.tso }
    }

    /// Notes how a UDP (`udp`) or TCP super-packet write went: written, refused by the
    /// kernel's virtio-net checks (EINVAL), or failed otherwise (EIO: the device down for a
    /// moment; not the offload's fault, and not counted). After [`REFUSALS`] refusals in a
    /// row, runs of that protocol stop coalescing (each refusal cost a failed `writev`, after
    /// the kernel copied up to 64 KiB, before the segments went one by one). Returns true when
    /// it turns the offload off.
    fn outcome(&mut self, udp: bool, written: Result<(), &io::Error>) -> bool {
        let count = &mut self.refused[usize::from(udp)];
        match written {
            Ok(()) => *count = 0,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => *count += 1,
            Err(_) => return false,
        }
        if *count >= REFUSALS && self.coalesces(udp) {
            if udp {
                self.uso = false;
            } else {
                self.tso = false;
            }
            return true;
        }
        false
    }

    /// Writes one packet; false when the kernel refused it (the caller counts that).
    #[inline]
    fn write_one(&mut self, tun: &impl TunSink, pkt: &[u8]) -> io::Result<bool> {
        let result = if self.offload {
            const NO_OFFLOAD: [u8; VIRTIO_NET_HDR_LEN] = [0; VIRTIO_NET_HDR_LEN];
            tun.send_vectored(&[IoSlice::new(&NO_OFFLOAD), IoSlice::new(pkt)])
        } else {
            tun.send(pkt)
        };
        match result {
            Ok(_) => Ok(true),
            Err(e) if is_fatal(&e) => Err(tun_lost(e)),
            Err(_) => Ok(false),
        }
    }

    /// Writes one packet received from a peer: counted as `tun_tx` once written, as dropped
    /// (`TunWriteFailed`) when the kernel refuses it.
    #[inline]
    fn deliver(
        &mut self,
        tun: &impl TunSink,
        pkt: &[u8],
        local: &mut LocalCounters,
    ) -> io::Result<()> {
        if self.write_one(tun, pkt)? {
            local.tun_tx_packets += 1;
            local.tun_tx_bytes += pkt.len() as u64;
        } else {
            local.drop(DropReason::TunWriteFailed);
        }
        Ok(())
    }

    /// Writes an ICMP error linen built about a packet it dropped: counted as `icmp_sent` once
    /// written. Refused, it is no drop of its own: the packet it answers is counted already
    /// (under the reason it was dropped for, or as sent).
    #[inline]
    fn write_icmp(
        &mut self,
        tun: &impl TunSink,
        pkt: &[u8],
        local: &mut LocalCounters,
    ) -> io::Result<()> {
        if self.write_one(tun, pkt)? {
            local.icmp_sent += 1;
        }
        Ok(())
    }

    /// Writes a run of consecutive segments of one flow from one receive buffer (chunks
    /// `first..` at `stride`): one segment as it is; several as one super-packet written with
    /// `writev` straight from the receive buffer. A super-packet the kernel refuses is written
    /// again segment by segment. Counts what was written as `tun_tx`.
    fn write_run(
        &mut self,
        tun: &impl TunSink,
        buf: &[u8],
        stride: usize,
        run: CoalesceRun,
        local: &mut LocalCounters,
    ) -> io::Result<()> {
        let segments = run.first..run.first + run.count;
        if run.count > 1 && self.offload {
            let n = run.write_header(buf, stride, &mut self.header);
            let mut iovs: [IoSlice<'_>; MAX_RUN + 1] = [IoSlice::new(&[]); MAX_RUN + 1];
            iovs[0] = IoSlice::new(&self.header[..n]);
            for (i, j) in segments.clone().enumerate() {
                iovs[i + 1] = IoSlice::new(&run.segment(buf, stride, j)[run.head.header_len..]);
            }
            match tun.send_vectored(&iovs[..run.count + 1]) {
                Ok(_) => {
                    local.tun_tx_packets += run.count as u64;
                    local.tun_tx_bytes += (run.count * run.head.header_len + run.payload) as u64;
                    if run.head.udp {
                        local.tun_tx_uso += 1;
                    } else {
                        local.tun_tx_tso += 1;
                    }
                    self.outcome(run.head.udp, Ok(()));
                    return Ok(());
                }
                Err(e) if is_fatal(&e) => return Err(tun_lost(e)),
                // Refused (a kernel's virtio-net rules) or failed: the segments one by one.
                Err(e) => {
                    if self.outcome(run.head.udp, Err(&e)) {
                        let what = if run.head.udp {
                            "UDP (USO)"
                        } else {
                            "TCP (TSO)"
                        };
                        tracing::warn!(error = %e, "the kernel refused {REFUSALS} {what} super-packets in a row although the TUN device took the offload; this worker writes those segments one by one from now on");
                    }
                }
            }
        }
        for j in segments {
            self.deliver(tun, run.segment(buf, stride, j), local)?;
        }
        Ok(())
    }
}

/// The most peers refused in one batch whose path MTU is asked for after it (each question is
/// a system call; a batch refused for more peers than this is rare, and the rest are asked
/// after their next refusal).
const REFUSED_PER_BATCH: usize = 4;

/// The peers whose path MTU a send batch asks for once it is sent (at most once a second
/// each: [`PathMtus::ask`]): every peer to which the kernel refused a batch (its path MTU is
/// likely smaller now), or else the last peer that got a datagram alone that some path may not
/// carry (the kernel fragments it without a word when it learned a smaller path MTU: without
/// UDP GSO, `--no-offload` or kernels before 4.18, no batch is ever refused, and with it a
/// packet alone is not batched).
#[derive(Default)]
struct Questions {
    refused: [Option<SocketAddr>; REFUSED_PER_BATCH],
    alone: Option<SocketAddr>,
}

impl Questions {
    fn refused(&mut self, peer: SocketAddr) {
        if !self.refused.contains(&Some(peer))
            && let Some(slot) = self.refused.iter_mut().find(|s| s.is_none())
        {
            *slot = Some(peer);
        }
    }

    fn alone(&mut self, peer: SocketAddr) {
        self.alone = Some(peer);
    }

    fn iter(&self) -> impl Iterator<Item = (SocketAddr, Asked)> + '_ {
        let alone = self.alone.filter(|_| self.refused[0].is_none());
        self.refused
            .iter()
            .flatten()
            .map(|&p| (p, Asked::Refused))
            .chain(alone.map(|p| (p, Asked::Alone)))
    }
}

/// Why a packet that tun-rs read but refused (`raw` as read, virtio-net header first) was
/// lost, and its length as its IP header gives it: one packet (no GSO) longer than a buffer
/// of `stride` is too big; anything else, a super-packet that could not be split, is
/// malformed.
fn lost_read(raw: &[u8], stride: usize) -> (DropReason, usize) {
    const GSO_NONE: u8 = 0;
    let len = raw
        .get(VIRTIO_NET_HDR_LEN..)
        .and_then(|ip| crate::wire::IpPacket::new_checked(ip).ok())
        .map_or(0, |ip| ip.packet_len());
    let reason = if raw.get(1) == Some(&GSO_NONE) && len > stride {
        DropReason::TooBig
    } else {
        DropReason::Malformed
    };
    (reason, len)
}

/// Where [`TunWriter`] writes: the TUN device (a stand-in in tests, which cannot open one
/// without root).
trait TunSink {
    fn send(&self, pkt: &[u8]) -> io::Result<usize>;
    fn send_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
}

impl TunSink for SyncDevice {
    #[inline]
    fn send(&self, pkt: &[u8]) -> io::Result<usize> {
        SyncDevice::send(self, pkt)
    }
    #[inline]
    fn send_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        SyncDevice::send_vectored(self, bufs)
    }
}

/// Consecutive refused (EINVAL) super-packet writes of one protocol after which a worker stops
/// coalescing it: a kernel whose virtio-net checks refuse TSO or USO although the device took
/// the offload (6.6.44 for TSO, tailscale#13041; some 6.6 stable releases for USO) would
/// otherwise cost a failed `writev` per run, for ever.
const REFUSALS: u32 = 8;

/// The socket egress sends on: the worker's send-only socket when it has one.
#[inline]
fn sender<'a>(
    tx: &'a Option<(UdpEndpoint, UdpSocketState)>,
    udp: &'a UdpEndpoint,
    state: &'a UdpSocketState,
) -> (&'a UdpEndpoint, &'a UdpSocketState) {
    tx.as_ref().map_or((udp, state), |(ep, st)| (ep, st))
}

/// Sends a run: one GSO `sendmsg` when it has several packets, a plain one otherwise
/// ([`Run::gather`] makes its packets contiguous first).
fn send_run(
    sock: (&UdpEndpoint, &UdpSocketState),
    arena: &mut [u8],
    stride: usize,
    run: Run,
    local: &mut LocalCounters,
    wait: &mut Duration,
) -> Outcome {
    let range = run.gather(arena, stride);
    send_gso(sock, &arena[range], run.peer, (run.seg, run.n), local, wait)
}

/// What a send found out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Outcome {
    /// About the source address.
    news: SourceNews,
    /// The kernel refused the batch as such (EMSGSIZE: larger than the peer's path MTU;
    /// EIO/EINVAL: GSO refused, which kernels without upstream 235174b2bed8 also say for the
    /// path MTU): worth asking for the path MTU.
    too_big: bool,
    /// GSO as such was refused (EIO/EINVAL), and quinn-udp has stopped using it on the socket.
    gso_refused: bool,
    /// The datagrams went out in one GSO send.
    gso_sent: bool,
}

/// The address family of a peer, as an index: 0 IPv4, 1 IPv6.
#[inline]
fn family(peer: SocketAddr) -> usize {
    usize::from(!peer.ip().to_canonical().is_ipv4())
}

/// GSO per address family. quinn-udp keeps one GSO switch per socket, and a refused GSO send
/// to any peer turns it off. Some hosts refuse GSO for IPv6 only (perf-techniques pitfall 10,
/// quic-go#3911), and one socket sends to both families here, so one family's refusal would
/// cost the other its GSO: the worker instead sends that family's datagrams one per call for
/// [`REPROBE_EVERY`], gives the socket its GSO back at once, and then tries the family again
/// (one refused call a second at most, whose datagrams go out singly: nothing is lost).
///
/// A refusal can also concern one peer only: the route to it leaves through IPsec (xfrm) or,
/// before Linux 6.11 (upstream 10154dbded6d), a device without checksum offload (some VPN
/// devices), where the kernel refuses GSO (EIO) while other peers' routes take it. When a GSO
/// send to another peer of the family went through lately, only the refused peer is sent to
/// singly (up to [`PEERS_REFUSED`] of them at once), so that one such peer does not cost all
/// the others their GSO; the peer that worked being refused, or no room for another, refuses
/// the family.
#[derive(Clone, Copy, Debug)]
struct FamilyGso {
    /// The most segments a run to a peer of each family may have in this batch.
    limits: [usize; 2],
    refused_until: [Option<Instant>; 2],
    /// Whether a refusal was logged, per family (once per worker).
    told: [bool; 2],
    /// The last peer of each family a GSO send went out to, and when.
    worked: [Option<(SocketAddr, Instant)>; 2],
    /// Peers refused alone, until when.
    peers: [Option<(SocketAddr, Instant)>; PEERS_REFUSED],
    /// Whether `peers` holds any (runs look them up only then).
    any_peer: bool,
    /// Whether a refusal of one peer alone was logged (once per worker).
    told_peer: bool,
}

/// How many peers [`FamilyGso`] sends to singly at once, each refused alone.
const PEERS_REFUSED: usize = 4;

/// How recent a GSO send to another peer of the family must be for a refusal to concern the
/// refused peer alone: a few reprobes, so that the family's GSO that a first refusal took for
/// a second does not make the next refusal look like the family's too.
const WORKED_LATELY: Duration = Duration::from_secs(3);

impl Default for FamilyGso {
    fn default() -> FamilyGso {
        FamilyGso {
            limits: [1; 2],
            refused_until: [None; 2],
            told: [false; 2],
            worked: [None; 2],
            peers: [None; PEERS_REFUSED],
            any_peer: false,
            told_peer: false,
        }
    }
}

impl FamilyGso {
    /// Sets the limits for a batch at `now`: `max`, the socket's, for a family not refused
    /// lately, else 1.
    #[inline]
    fn update(&mut self, max: usize, now: Instant) {
        for (limit, until) in self.limits.iter_mut().zip(&mut self.refused_until) {
            if until.is_some_and(|t| now < t) {
                *limit = 1;
            } else {
                *until = None;
                *limit = max;
            }
        }
        if self.any_peer {
            for slot in &mut self.peers {
                if slot.is_some_and(|(_, until)| now >= until) {
                    *slot = None;
                }
            }
            self.any_peer = self.peers.iter().any(Option::is_some);
        }
    }

    /// The most segments a run to `peer` may have.
    #[inline]
    fn limit(&self, peer: SocketAddr) -> usize {
        let limit = self.limits[family(peer)];
        if self.any_peer && self.peers.iter().flatten().any(|(p, _)| *p == peer) {
            return 1;
        }
        limit
    }

    /// A GSO send to `peer` went out at `now`.
    #[inline]
    fn worked(&mut self, peer: SocketAddr, now: Instant) {
        self.worked[family(peer)] = Some((peer, now));
    }

    /// Whether both families are waiting after a refusal (GSO may be refused for the socket
    /// as such: no checksum offload, say).
    fn all_refused(&self) -> bool {
        self.refused_until.iter().all(Option::is_some)
    }

    /// The kernel refused a GSO send to `peer` (worker `worker`): its family's runs are single
    /// datagrams for [`REPROBE_EVERY`].
    #[cold]
    fn refuse(&mut self, worker: usize, peer: SocketAddr, now: Instant) {
        let f = family(peer);
        let others_work =
            self.worked[f].is_some_and(|(other, at)| other != peer && now < at + WORKED_LATELY);
        if others_work
            && let Some(slot) = self
                .peers
                .iter_mut()
                .find(|s| s.is_none_or(|(p, _)| p == peer))
        {
            *slot = Some((peer, now + REPROBE_EVERY));
            self.any_peer = true;
            if !std::mem::replace(&mut self.told_peer, true) {
                tracing::info!(
                    worker,
                    %peer,
                    "the kernel refused a UDP GSO send to this peer while sends to others \
                     take it (IPsec, or a device without checksum offload, on the way?); this \
                     worker sends to it one datagram per call for a second at a time, then \
                     tries again"
                );
            }
            return;
        }
        self.limits[f] = 1;
        self.refused_until[f] = Some(now + REPROBE_EVERY);
        if !std::mem::replace(&mut self.told[f], true) {
            tracing::info!(
                worker,
                %peer,
                "the kernel refused a UDP GSO send to an {} peer; this worker sends to {0} \
                 peers one datagram per call for a second at a time, then tries again \
                 (peers of the other family keep GSO)",
                if f == 0 { "IPv4" } else { "IPv6" }
            );
        }
    }
}

/// A GSO batch to `peer` was refused, maybe as larger than the path MTU the kernel learned
/// for it (a smaller hop on the underlay), or a large datagram went to it alone (which the
/// kernel fragments when that MTU is smaller): asks the kernel for that MTU and remembers the
/// inner packet size it leaves, so that [`forward::egress`] sends larger packets alone and
/// tells their senders. An answer of full size is remembered too (not asked again within a
/// second). Logged when what is known of the peer changes, per worker.
#[cold]
fn learn_path_mtu(
    worker: usize,
    udp: &UdpEndpoint,
    peer: SocketAddr,
    mtu: usize,
    paths: &mut PathMtus,
    now: Instant,
    asked: Asked,
) {
    // An IPv4 peer written as IPv4-mapped IPv6 is reached over IPv4.
    let overhead = if peer.ip().to_canonical().is_ipv4() {
        28
    } else {
        48
    };
    match sys::path_mtu(peer, udp.source.for_peer(peer)) {
        Ok(path) => {
            let inner = Some(path.saturating_sub(overhead)).filter(|&inner| inner < mtu);
            let changed = paths.learn(peer, inner, now, asked);
            if let Some(inner) = inner
                && changed
            {
                tracing::info!(
                    worker,
                    %peer,
                    path_mtu = path,
                    inner_mtu = inner,
                    "the path to this peer carries smaller datagrams than the overlay MTU \
                     needs: larger packets go fragmented, and their senders are told the \
                     smaller MTU"
                );
            }
        }
        Err(e) => {
            // Not asked again at every batch (the peer may be unreachable for now); what was
            // learned before stays in use.
            paths.unanswered(peer, now, asked);
            tracing::debug!(worker, %peer, error = %e, "cannot read the path MTU to this peer")
        }
    }
}

/// Sends the staged run of `n` segments of `seg` bytes to `peer` in one `sendmsg`; says
/// whether the kernel refused the source address, or the batch as such.
fn send_gso(
    (udp, state): (&UdpEndpoint, &UdpSocketState),
    buf: &[u8],
    peer: SocketAddr,
    (seg, n): (usize, usize),
    local: &mut LocalCounters,
    wait: &mut Duration,
) -> Outcome {
    let transmit = Transmit {
        destination: socket_addr_for(peer, udp.dual_stack),
        ecn: None,
        contents: buf,
        segment_size: (n > 1).then_some(seg),
        src_ip: udp.source.for_peer(peer),
    };
    match try_send(udp, state, &transmit, wait) {
        Ok(sent) => {
            local.udp_tx_packets += n as u64;
            local.udp_tx_bytes += buf.len() as u64;
            local.udp_tx_gso += u64::from(n > 1);
            let news = match sent {
                Sent::AsAsked => SourceNews::Nothing,
                Sent::WithoutSource if n > 1 => SourceNews::RefusedButGsoWorked,
                Sent::WithoutSource => SourceNews::Refused,
            };
            Outcome {
                news,
                too_big: false,
                gso_refused: false,
                gso_sent: n > 1,
            }
        }
        // The kernel refused the batch, and its datagrams may go one by one: send this run's
        // segments singly, so no traffic is lost. EMSGSIZE: the segments are larger than the
        // path MTU learned for this peer (a smaller hop on the way); a single datagram is
        // fragmented instead, and GSO stays on for every other peer (each batch to this peer
        // costs one refused call more, after the kernel copied the batch). EIO/EINVAL: GSO
        // itself refused (no checksum offload, a buggy driver; kernels without upstream commit
        // 235174b2bed8 so refuse the path MTU case too), and quinn-udp has stopped using it for
        // later sends. Other errors (the peer unreachable, a firewall's EPERM) would only fail
        // each of them. After an EMSGSIZE the worker learns the peer's path MTU
        // ([`learn_path_mtu`]), and larger packets stop coming in batches.
        Err(e)
            if n > 1
                && match e.raw_os_error() {
                    Some(libc::EMSGSIZE) => true,
                    Some(libc::EIO | libc::EINVAL) => state.max_gso_segments() == 1,
                    _ => false,
                } =>
        {
            let gso_refused = e.raw_os_error() != Some(libc::EMSGSIZE);
            let mut news = SourceNews::Nothing;
            for chunk in buf.chunks(seg) {
                let single = Transmit {
                    destination: transmit.destination,
                    ecn: None,
                    contents: chunk,
                    segment_size: None,
                    src_ip: transmit.src_ip,
                };
                match try_send(udp, state, &single, wait) {
                    Ok(sent) => {
                        local.udp_tx_packets += 1;
                        local.udp_tx_bytes += chunk.len() as u64;
                        if sent == Sent::WithoutSource {
                            news = SourceNews::Refused;
                        }
                    }
                    Err(_) => local.drop(DropReason::SendFailed),
                }
            }
            Outcome {
                news,
                too_big: true,
                gso_refused,
                gso_sent: false,
            }
        }
        Err(_) => {
            for _ in 0..n {
                local.drop(DropReason::SendFailed);
            }
            Outcome {
                news: SourceNews::Nothing,
                too_big: false,
                gso_refused: false,
                gso_sent: false,
            }
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;

    /// Only a UDP checksum the read completed (`NEEDS_CSUM`, no GSO, the UDP offset) that came
    /// out 0 becomes all ones; a sender's own 0, a TCP checksum and a short packet stay.
    #[test]
    fn only_a_completed_udp_checksum_of_zero_becomes_all_ones() {
        let hdr = |flags: u8, gso: u8, start: u16, offset: u16| {
            let mut h = [0u8; VIRTIO_NET_HDR_LEN];
            h[0] = flags;
            h[1] = gso;
            h[6..8].copy_from_slice(&start.to_ne_bytes());
            h[8..10].copy_from_slice(&offset.to_ne_bytes());
            h
        };
        // An IPv6 UDP packet: the checksum at 40 + 6.
        let fixed = |h: [u8; VIRTIO_NET_HDR_LEN], field: [u8; 2], len: usize| {
            let mut pkt = vec![0u8; len];
            if len >= 48 {
                pkt[46..48].copy_from_slice(&field);
            }
            udp_checksum_zero_is_ones(&h, &mut pkt);
            pkt.get(46..48).map(|f| [f[0], f[1]])
        };
        let cases = [
            (
                "completed as 0",
                hdr(1, 0, 40, 6),
                [0, 0],
                60,
                Some([0xff, 0xff]),
            ),
            (
                "completed as another",
                hdr(1, 0, 40, 6),
                [0, 7],
                60,
                Some([0, 7]),
            ),
            ("the sender's 0", hdr(0, 0, 40, 6), [0, 0], 60, Some([0, 0])),
            ("a GSO read", hdr(1, 5, 40, 6), [0, 0], 60, Some([0, 0])),
            ("TCP's offset", hdr(1, 0, 34, 16), [0, 0], 60, Some([0, 0])),
            ("too short: untouched", hdr(1, 0, 40, 6), [0, 0], 47, None),
        ];
        for (what, h, field, len, want) in cases {
            assert_eq!(fixed(h, field, len), want, "{what}");
        }
        // A header cut short: the packet is left as it is.
        let mut pkt = [0u8; 60];
        udp_checksum_zero_is_ones(&[1, 0], &mut pkt);
        assert_eq!(pkt, [0u8; 60]);
    }

    /// A GSO send whose source address the kernel refuses (not local: IPv4 says ENETUNREACH
    /// or EINVAL, IPv6 EINVAL) still leaves, from the kernel's choice, every segment intact.
    /// quinn-udp takes an EINVAL for a GSO refusal and stops segmenting for good; the probe
    /// gives GSO back. Loopback only, no root.
    #[test]
    fn a_refused_source_does_not_cost_gso() {
        let mut ep = super::super::io::open_udp(0, 1 << 20).unwrap();
        for (to, v4, v6) in [
            ("127.0.0.1:0", Some("198.18.255.254"), None),
            ("[::1]:0", None, Some("fd00:18::fe")),
        ] {
            let rx = std::net::UdpSocket::bind(to).unwrap();
            rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            ep.source = super::super::io::Source {
                v4: v4.map(|a| a.parse().unwrap()),
                v6: v6.map(|a| a.parse().unwrap()),
            };
            let state = UdpSocketState::new(UdpSockRef::from(&ep.socket)).unwrap();
            assert!(state.max_gso_segments() > 1, "this kernel has UDP GSO");
            let buf: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
            let mut local = LocalCounters::default();
            let peer = rx.local_addr().unwrap();
            let sent = send_gso(
                (&ep, &state),
                &buf,
                peer,
                (100, 3),
                &mut local,
                &mut Duration::from_secs(0),
            );
            assert_eq!(sent.news, SourceNews::RefusedButGsoWorked, "{to}");
            assert_eq!(local.udp_tx_packets, 3);
            let mut got = [0u8; 512];
            for i in 0..3 {
                let n = rx.recv(&mut got).unwrap();
                assert_eq!(&got[..n], &buf[i * 100..(i + 1) * 100], "{to} segment {i}");
            }
            // Whatever quinn-udp made of the refusal, GSO is there after the probe.
            let after = reprobe_if_gso_lost(&ep, &state, false);
            let gso = after.as_ref().unwrap_or(&state).max_gso_segments();
            assert!(gso > 1, "{to}: GSO lost");
            // IPv6 says EINVAL, which quinn-udp took for a GSO refusal.
            assert_eq!(after.is_some(), v6.is_some(), "{to}");
        }
    }

    /// A GSO send the kernel refuses (here: more segments than it takes, EINVAL, as older
    /// kernels also say for a batch larger than a peer's path MTU) still delivers every datagram, one by one; quinn-udp
    /// drops GSO for the socket, and the probe gives it back. Every quinn-udp setup forbids
    /// fragmentation; the socket keeps allowing it. Loopback only, no root.
    #[test]
    fn a_refused_gso_send_goes_out_datagram_by_datagram_and_gso_comes_back() {
        let ep = super::super::io::open_udp(0, 1 << 20).unwrap();
        let state = socket_state(&ep).unwrap();
        assert!(state.max_gso_segments() > 1, "this kernel has UDP GSO");
        // The IPv6 option only where the socket is IPv6 (a host without IPv6 gets an IPv4 one).
        let want = |ep: &UdpEndpoint| {
            (
                sys::mtu_discover(ep.socket.as_fd(), false).unwrap(),
                ep.dual_stack
                    .then(|| sys::mtu_discover(ep.socket.as_fd(), true).unwrap()),
            )
        };
        let wanted = (
            libc::IP_PMTUDISC_WANT,
            ep.dual_stack.then_some(libc::IPV6_PMTUDISC_WANT),
        );
        assert_eq!(want(&ep), wanted);
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        rx.set_nonblocking(false).unwrap();
        socket2::SockRef::from(&rx)
            .set_recv_buffer_size(1 << 20)
            .unwrap();
        let buf: Vec<u8> = (0..2000u32).map(|i| (i / 10) as u8).collect();
        let mut local = LocalCounters::default();
        let peer = rx.local_addr().unwrap();
        let sent = send_gso(
            (&ep, &state),
            &buf,
            peer,
            (10, 200),
            &mut local,
            &mut Duration::from_secs(0),
        );
        // Refused as a batch: worth asking for the path MTU (older kernels say EINVAL for it).
        assert_eq!(
            sent,
            Outcome {
                news: SourceNews::Nothing,
                too_big: true,
                gso_refused: true,
                gso_sent: false,
            }
        );
        assert_eq!(state.max_gso_segments(), 1, "the kernel took 200 segments");
        assert_eq!(local.udp_tx_packets, 200);
        let mut got = [0u8; 64];
        for i in 0..200 {
            let n = rx.recv(&mut got).unwrap();
            assert_eq!(&got[..n], &buf[i * 10..(i + 1) * 10], "datagram {i}");
        }
        // A socket that receives without GRO (a worker on a kernel before 5.12) gets GSO
        // back and keeps GRO off; without that, GSO was never probed again there.
        sys::disable_udp_gro(ep.socket.as_fd()).unwrap();
        let fresh = reprobe_if_gso_lost(&ep, &state, true).expect("GSO not given back");
        assert!(fresh.max_gso_segments() > 1);
        assert!(!sys::udp_gro_enabled(ep.socket.as_fd()).unwrap());
        assert_eq!(want(&ep), wanted);
        // Otherwise the fresh state's GRO stays on.
        let fresh = reprobe_if_gso_lost(&ep, &state, false).expect("GSO not given back");
        assert!(fresh.max_gso_segments() > 1);
        assert!(sys::udp_gro_enabled(ep.socket.as_fd()).unwrap());
    }

    /// A host that refuses GSO for IPv6 only (a zero IPv6 UDP checksum, here; some hosts'
    /// drivers in the wild): the refused batch goes out datagram by datagram and says GSO was
    /// refused, and once the state is probed again the same socket sends IPv4 batches with
    /// GSO. Loopback only, no root.
    #[test]
    fn a_gso_refusal_for_ipv6_peers_leaves_ipv4_peers_their_gso() {
        let ep = super::super::io::open_udp(0, 1 << 20).unwrap();
        // As in the test above: IPv6 loopback is there (a skip here would pass unseen).
        assert!(ep.dual_stack, "no IPv6 on this host");
        sys::refuse_ipv6_gso(ep.socket.as_fd()).unwrap();
        let mut state = socket_state(&ep).unwrap();
        assert!(state.max_gso_segments() > 1, "this kernel has UDP GSO");
        let buf: Vec<u8> = (0..40u8).collect();
        let mut got = [0u8; 64];
        for (to, refused) in [("[::1]:0", true), ("127.0.0.1:0", false)] {
            let rx = std::net::UdpSocket::bind(to).unwrap();
            rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            sys::accept_zero_ipv6_checksum(rx.as_fd()).unwrap();
            if let Some(fresh) = reprobe_if_gso_lost(&ep, &state, false) {
                state = fresh;
            }
            assert!(state.max_gso_segments() > 1, "{to}: GSO not given back");
            let mut local = LocalCounters::default();
            let sent = send_gso(
                (&ep, &state),
                &buf,
                rx.local_addr().unwrap(),
                (10, 4),
                &mut local,
                &mut Duration::from_secs(0),
            );
            assert_eq!(sent.gso_refused, refused, "{to}: {sent:?}");
            assert_eq!(state.max_gso_segments() == 1, refused, "{to}");
            assert_eq!(local.udp_tx_packets, 4, "{to}");
            assert_eq!(local.udp_tx_gso, u64::from(!refused), "{to}");
            for i in 0..4 {
                let n = rx.recv(&mut got).unwrap();
                assert_eq!(&got[..n], &buf[i * 10..(i + 1) * 10], "{to}: datagram {i}");
            }
        }
    }

    /// Without GRO a buffer's one datagram may continue a run from the buffer before; a GRO'd
    /// datagram never does (its chunks would be numbered by buffer).
    #[test]
    fn only_single_datagrams_join_runs_across_buffers() {
        assert!(spans_buffers(false, 1400, 1400));
        assert!(spans_buffers(false, 1400, 900), "a short last datagram");
        assert!(!spans_buffers(false, 1400, 2800), "GRO'd after all");
        assert!(
            !spans_buffers(true, 1400, 1400),
            "with GRO, runs stay per datagram"
        );
    }

    /// After a refusal, the refused family's runs are single datagrams for a second, and the
    /// other family's are not limited.
    #[test]
    fn a_refused_family_sends_singly_for_a_while() {
        let t0 = Instant::now();
        let v4: SocketAddr = "198.18.0.2:8285".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:198.18.0.2]:8285".parse().unwrap();
        let v6: SocketAddr = "[fd00:18::2]:8285".parse().unwrap();
        let mut f = FamilyGso::default();
        f.update(64, t0);
        assert_eq!([f.limit(v4), f.limit(mapped), f.limit(v6)], [64, 64, 64]);
        f.refuse(0, v6, t0);
        assert_eq!(
            [f.limit(v4), f.limit(v6)],
            [64, 1],
            "at once, in the same batch"
        );
        assert!(!f.all_refused());
        f.update(64, t0 + Duration::from_millis(999));
        assert_eq!([f.limit(v4), f.limit(mapped), f.limit(v6)], [64, 64, 1]);
        f.update(64, t0 + REPROBE_EVERY);
        assert_eq!([f.limit(v4), f.limit(v6)], [64, 64], "tried again");
        // The socket's own limit applies to both (1 after quinn-udp lost GSO).
        f.refuse(0, mapped, t0 + REPROBE_EVERY);
        assert!(!f.all_refused());
        f.refuse(0, v6, t0 + REPROBE_EVERY);
        assert!(f.all_refused());
        f.update(1, t0 + REPROBE_EVERY);
        assert_eq!([f.limit(v4), f.limit(v6)], [1, 1]);
        f.update(64, t0 + REPROBE_EVERY * 2);
        assert_eq!([f.limit(v4), f.limit(v6)], [64, 64]);
    }

    /// A peer refused while GSO sends to another peer of its family work is sent to singly
    /// alone, for a second; the peer that worked being refused, or a refusal with no such
    /// send lately, refuses the family.
    #[test]
    fn a_peer_refused_alone_costs_the_others_no_gso() {
        let t0 = Instant::now();
        let peer = |s: &str| s.parse::<SocketAddr>().unwrap();
        let (good, bad, other) = (
            peer("198.18.0.2:8285"),
            peer("198.18.0.3:8285"),
            peer("198.18.0.4:8285"),
        );
        let limits = |f: &FamilyGso| [good, bad, other].map(|p| f.limit(p));
        let mut f = FamilyGso::default();
        f.update(64, t0);
        f.worked(good, t0);
        f.refuse(0, bad, t0);
        assert_eq!(limits(&f), [64, 1, 64], "at once, in the same batch");
        f.update(64, t0 + Duration::from_millis(999));
        assert_eq!(limits(&f), [64, 1, 64]);
        f.update(64, t0 + REPROBE_EVERY);
        assert_eq!(limits(&f), [64, 64, 64], "tried again");
        // Refused again two seconds after the last send to `good` that worked: alone still.
        f.refuse(0, bad, t0 + REPROBE_EVERY * 2);
        assert_eq!(limits(&f), [64, 1, 64]);
        // The peer that worked refused too: the family.
        f.refuse(0, good, t0 + REPROBE_EVERY * 2);
        assert_eq!(limits(&f), [1, 1, 1]);
        // With no send that worked lately: the family.
        let mut f = FamilyGso::default();
        f.update(64, t0);
        f.worked(good, t0);
        f.update(64, t0 + WORKED_LATELY);
        f.refuse(0, bad, t0 + WORKED_LATELY);
        assert_eq!(limits(&f), [1, 1, 1]);
        // Only the refused peer's own sends worked: the family.
        let mut f = FamilyGso::default();
        f.update(64, t0);
        f.worked(bad, t0);
        f.refuse(0, bad, t0);
        assert_eq!(limits(&f), [1, 1, 1]);
        // No room for another peer alone: the family.
        let mut f = FamilyGso::default();
        f.update(64, t0);
        f.worked(good, t0);
        for i in 0..PEERS_REFUSED {
            f.refuse(0, peer(&format!("198.18.1.{i}:8285")), t0);
        }
        assert_eq!(limits(&f), [64, 64, 64]);
        f.refuse(0, bad, t0);
        assert_eq!(limits(&f), [1, 1, 1]);
    }

    /// A refusal that comes again within the rate limit is not forgotten: the probe happens
    /// once the limit allows, even when that batch had nothing refused (the address is back),
    /// so a state that lost GSO gets it back.
    #[test]
    fn a_refusal_inside_the_rate_limit_is_probed_later() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut r = Reprobe::default();
        assert!(!r.due(t0), "nothing refused yet");
        r.note(SourceNews::Refused);
        assert!(!r.due(t0), "single sends: GSO not shown to work");
        r.note(SourceNews::RefusedButGsoWorked);
        assert!(r.due(ms(0)));
        assert!(!r.due(ms(1)), "done");
        // Refused again 1 ms later: quinn-udp drops GSO again, the probe must follow.
        r.note(SourceNews::RefusedButGsoWorked);
        assert!(!r.due(ms(500)), "rate-limited");
        assert!(
            r.due(ms(1_000)),
            "probed once the limit allows, with nothing refused now"
        );
        assert!(!r.due(ms(5_000)), "and only once");
        // GSO lost to a refused GSO send: probed too, once the limit allows.
        r.gso_lost();
        assert!(r.due(ms(6_000)));
        r.gso_lost();
        assert!(!r.due(ms(6_500)), "rate-limited");
        assert!(r.due(ms(7_000)));
    }

    /// Before, one slot was overwritten by each refusal: only the batch's last refused peer
    /// learned its path MTU, the others kept having batches refused.
    #[test]
    fn every_refused_peer_of_a_batch_is_asked_about() {
        let peer = |n: u8| SocketAddr::from(([198, 18, 0, n], 8285));
        let mut q = Questions::default();
        q.alone(peer(9));
        assert_eq!(q.iter().collect::<Vec<_>>(), [(peer(9), Asked::Alone)]);
        q.refused(peer(1));
        q.refused(peer(2));
        q.refused(peer(1));
        assert_eq!(
            q.iter().collect::<Vec<_>>(),
            [(peer(1), Asked::Refused), (peer(2), Asked::Refused)]
        );
        for n in 3..=9 {
            q.refused(peer(n));
        }
        assert_eq!(q.iter().count(), REFUSED_PER_BATCH);
    }

    #[test]
    fn a_refused_read_longer_than_a_buffer_is_too_big() {
        let mut raw = vec![0u8; VIRTIO_NET_HDR_LEN + 2000];
        let ip = &mut raw[VIRTIO_NET_HDR_LEN..];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&1500u16.to_be_bytes());
        ip[8] = 64;
        assert_eq!(lost_read(&raw, 1400), (DropReason::TooBig, 1500));
        assert_eq!(lost_read(&raw, 1500).0, DropReason::Malformed);
        // A TCPv4 super-packet tun-rs could not split.
        raw[1] = 1;
        assert_eq!(lost_read(&raw, 1400).0, DropReason::Malformed);
        // No IP packet at all.
        assert_eq!(lost_read(&[0; 4], 1400), (DropReason::Malformed, 0));
    }

    /// A TUN device that refuses every write (ENOBUFS: its queue is full).
    struct Refusing;

    impl TunSink for Refusing {
        fn send(&self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from_raw_os_error(libc::ENOBUFS))
        }
        fn send_vectored(&self, _: &[IoSlice<'_>]) -> io::Result<usize> {
            Err(io::Error::from_raw_os_error(libc::ENOBUFS))
        }
    }

    /// Every drop is counted under exactly one reason: an ICMP error the device refuses is no
    /// second drop of the packet it answers; a peer's packet it refuses is one.
    #[test]
    fn a_refused_icmp_error_is_not_a_second_drop() {
        for offload in [false, true] {
            let (mut w, mut local) = (TunWriter::new(offload, false), LocalCounters::default());
            local.drop(DropReason::NoRoute);
            w.write_icmp(&Refusing, &[0x45; 56], &mut local).unwrap();
            assert_eq!(local.icmp_sent, 0);
            assert_eq!(local.drops.iter().sum::<u64>(), 1, "offload {offload}");
            w.deliver(&Refusing, &[0x45; 56], &mut local).unwrap();
            assert_eq!(local.drops_for(DropReason::TunWriteFailed), 1);
            assert_eq!(local.tun_tx_packets, 0);
        }
    }

    #[test]
    fn a_sleep_earns_a_sixteenth_of_its_length_in_polling() {
        let us = Duration::from_micros;
        let ms = Duration::from_millis;
        // Bulk or paced traffic: the worker slept less than 2 ms, so it does not poll.
        assert_eq!(spin_budget(us(500), us(50)), Duration::ZERO);
        assert_eq!(spin_budget(us(500), us(1999)), Duration::ZERO);
        // Sparse traffic: 1/16 of the sleep, up to the configured time.
        assert_eq!(spin_budget(us(500), ms(2)), us(125));
        assert_eq!(spin_budget(us(500), ms(4)), us(250));
        assert_eq!(spin_budget(us(500), ms(10)), us(500));
        assert_eq!(spin_budget(us(500), Duration::from_secs(60)), us(500));
        // Off.
        assert_eq!(spin_budget(Duration::ZERO, ms(10)), Duration::ZERO);
    }

    /// USO and TSO each go off after 8 refused (EINVAL) super-packets of their protocol in a
    /// row, not after fewer, nor when a write went through in between, nor for failures that
    /// are not refusals (EIO: the device down for a moment); they never come back on their own.
    #[test]
    fn refused_super_packets_turn_their_offload_off_after_a_run_of_them() {
        let einval = io::Error::from_raw_os_error(libc::EINVAL);
        let eio = io::Error::from_raw_os_error(libc::EIO);
        for udp in [true, false] {
            let mut w = TunWriter::new(true, true);
            for _ in 0..REFUSALS - 1 {
                assert!(!w.outcome(udp, Err(&einval)));
            }
            assert!(!w.outcome(udp, Ok(())), "a success resets the count");
            for _ in 0..REFUSALS - 1 {
                assert!(!w.outcome(udp, Err(&einval)));
            }
            // Failures that are no refusal neither count nor reset.
            for _ in 0..3 * REFUSALS {
                assert!(!w.outcome(udp, Err(&eio)));
            }
            // The other protocol's refusals are its own.
            assert!(!w.outcome(!udp, Err(&einval)));
            assert!(w.coalesces(udp) && w.coalesces(!udp));
            assert!(w.outcome(udp, Err(&einval)), "the eighth in a row");
            assert!(!w.coalesces(udp) && w.coalesces(!udp));
            assert!(!w.outcome(udp, Err(&einval)), "reported once");
            assert!(!w.outcome(udp, Ok(())));
            assert!(!w.coalesces(udp));
        }
    }

    /// A super-packet the kernel refuses (EINVAL, a kernel's virtio-net rules) is written
    /// again segment by segment, each whole and in order, each with a header asking for no
    /// offload, and counted as written packets, not as a super-packet.
    #[test]
    fn a_refused_super_packet_is_written_segment_by_segment() {
        struct Refusing(std::cell::RefCell<Vec<Vec<u8>>>);
        impl TunSink for Refusing {
            fn send(&self, _: &[u8]) -> io::Result<usize> {
                unreachable!("offloads on: every write carries a virtio-net header")
            }
            fn send_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
                if bufs[0].iter().any(|&b| b != 0) {
                    return Err(io::Error::from_raw_os_error(libc::EINVAL));
                }
                let pkt: Vec<u8> = bufs[1..].iter().flat_map(|b| b.iter().copied()).collect();
                self.0.borrow_mut().push(pkt);
                Ok(bufs.iter().map(|b| b.len()).sum())
            }
        }
        use super::super::coalesce::test::udp;
        let pkts = [udp(false, 100), udp(false, 100), udp(false, 40)];
        let stride = 256;
        let mut buf = vec![0u8; stride * pkts.len()];
        for (i, p) in pkts.iter().enumerate() {
            buf[i * stride..i * stride + p.len()].copy_from_slice(p);
        }
        let seg = |p: &[u8]| coalesce::classify(p, true).unwrap();
        let mut run = CoalesceRun::new(0, seg(&pkts[0]));
        for (i, p) in pkts.iter().enumerate().skip(1) {
            assert!(
                run.try_append(&buf, stride, i, p, seg(p)),
                "segment {i} joins"
            );
        }
        let tun = Refusing(Default::default());
        let mut w = TunWriter::new(true, true);
        let mut local = LocalCounters::default();
        w.write_run(&tun, &buf, stride, run, &mut local).unwrap();
        assert_eq!(*tun.0.borrow(), pkts.to_vec());
        assert_eq!((local.tun_tx_packets, local.tun_tx_uso), (3, 0));
        let bytes: usize = pkts.iter().map(Vec::len).sum();
        assert_eq!(local.tun_tx_bytes, bytes as u64);
    }

    /// A worker thread that panics must count as stopped (the daemon exits when none runs):
    /// the flag comes down while unwinding, not only on a normal return.
    #[test]
    fn the_running_flag_comes_down_on_a_panic_too() {
        for panics in [false, true] {
            let running = Arc::new(AtomicBool::new(true));
            let flag = ClearOnExit(Arc::clone(&running));
            let thread = std::thread::spawn(move || {
                let _flag = flag;
                assert!(!panics, "a worker bug");
            });
            assert_eq!(thread.join().is_err(), panics);
            assert!(!running.load(Ordering::Acquire), "panics: {panics}");
        }
    }

    /// The drop counter is read at most once a second and only after something was received;
    /// new drops double the buffer up to the maximum, then are said once at the maximum.
    #[test]
    fn overflows_grow_the_receive_buffer_up_to_the_maximum() {
        let t0 = Instant::now();
        let mut o = Overflow::new(true, (4 << 20, 16 << 20), t0);
        // Nothing received: no reading owed, a sleep is not cut short.
        assert!(!o.due(t0));
        assert_eq!(o.wait(t0), None);
        o.received();
        assert!(o.due(t0));
        assert_eq!(o.read(0, t0), (0, Grow::No));
        // Received again within the second: owed, not yet due; a sleep ends in time for it.
        o.received();
        let half = t0 + Duration::from_millis(500);
        assert!(!o.due(half));
        assert_eq!(o.wait(half), Some(Duration::from_millis(500)));
        let t1 = t0 + OVERFLOW_EVERY;
        assert!(o.due(t1));
        assert_eq!(o.read(30, t1), (30, Grow::To(8 << 20)));
        o.received();
        let t2 = t1 + OVERFLOW_EVERY;
        assert_eq!(o.read(31, t2), (1, Grow::To(16 << 20)));
        o.received();
        let t3 = t2 + OVERFLOW_EVERY;
        assert_eq!(o.read(40, t3), (9, Grow::AtMax(16 << 20)));
        // Said once; still counted.
        assert_eq!(o.read(41, t3 + OVERFLOW_EVERY), (1, Grow::No));
        // The kernel's 32-bit counter wraps.
        assert_eq!(
            o.read(2, t3 + 2 * OVERFLOW_EVERY),
            (u64::from(u32::MAX) - 38, Grow::No)
        );
        // A maximum equal to the start keeps the buffer fixed; one below it is the start.
        let mut fixed = Overflow::new(true, (4 << 20, 1 << 20), t0);
        assert_eq!(fixed.read(5, t0), (5, Grow::AtMax(4 << 20)));
        // A kernel without the counter: nothing is ever owed.
        let mut none = Overflow::new(false, (4 << 20, 16 << 20), t0);
        none.received();
        assert!(!none.due(t1));
        assert_eq!(none.wait(t0), None);
    }
}
