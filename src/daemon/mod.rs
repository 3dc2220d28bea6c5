//! `linen run`: wires the two planes together. Reads the network config, acquires the lease,
//! sets up the host (TUN device, addresses, route, `subnet.env`), starts the data-plane workers,
//! and turns every lease change into a freshly built table snapshot published with one atomic
//! store. SIGTERM/SIGINT stop the workers and remove the device (and with it its route); the
//! lease is kept so a restart gets the same subnet.

pub mod host;
pub mod http;
pub mod masq;
pub mod metrics;
pub mod notify;
pub mod registry;
pub mod status;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use ipnetwork::IpNetwork;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::watch;

use crate::cli::{Offload, RunArgs};
use crate::dataplane::io::{
    Source, TunOptions, ensure_port_free, ensure_port_only_ours, open_tun, open_udp, open_udp_send,
    steer_by_source_port,
};
use crate::dataplane::{ForwardConfig, LocalCounters, WorkerHandle, WorkerMonitor, WorkerSetup};
use crate::lease::Registry;
use crate::lease::manager::{LeaseManager, LeaseState, ManagerOptions};
use crate::model::{Lease, LeaseAttrs, NetworkConfig, SubnetEnv, SubnetKey};
use crate::table::{LocalSubnets, Route, Snapshot, Table};
use tokio_util::sync::CancellationToken;

/// Exit code for a bad flag or config (what to fix is in the message).
pub const EXIT_USAGE: i32 = 2;

/// Routes to every peer: each lease's subnets via its public address and the network's port.
/// A subnet goes to the peer's address of the subnet's own family when this host (`ours`)
/// advertises an address of that family too, else to the peer's address of the other family
/// when both advertise one (the underlay family is independent of the overlay family). Both
/// ends of a pair choose alike, and the sender check on each end compares a datagram's source
/// with this choice: in a dual-stack overlay, a host without an IPv6 underlay address and a
/// peer with both exchange their IPv6 subnets' packets over IPv4. A peer that shares no family
/// with this host, or whose addresses no datagram could go to (loopback, multicast, …), gets
/// no route (see [`unroutable`]).
pub fn routes_for(ours: &LeaseAttrs, peers: &[Lease], port: u16) -> Vec<Route> {
    let mut routes = Vec::with_capacity(peers.len() * 2);
    let hop = |ip: IpAddr| usable(ip).then(|| SocketAddr::from((ip, port)));
    for lease in peers {
        let (v4, v6) = common_hops(ours, &lease.attrs);
        let (v4, v6) = (v4.and_then(hop), v6.and_then(hop));
        if let Some(net) = lease.key.ipv4()
            && let Some(hop) = v4.or(v6)
        {
            routes.push(Route {
                subnet: IpNetwork::V4(net),
                next_hop: hop,
            });
        }
        if let Some(net) = lease.key.ipv6()
            && let Some(hop) = v6.or(v4)
        {
            routes.push(Route {
                subnet: IpNetwork::V6(net),
                next_hop: hop,
            });
        }
    }
    routes
}

/// The peer's addresses (IPv4, IPv6) of the families this host advertises too.
fn common_hops(ours: &LeaseAttrs, peer: &LeaseAttrs) -> (Option<IpAddr>, Option<IpAddr>) {
    (
        peer.public_ip
            .filter(|_| ours.public_ip.is_some())
            .map(IpAddr::from),
        peer.public_ipv6
            .filter(|_| ours.public_ipv6.is_some())
            .map(IpAddr::from),
    )
}

/// Whether a datagram could be sent to `ip` as a peer's public address.
fn usable(ip: IpAddr) -> bool {
    crate::cli::unreachable_reason(ip).is_none()
}

/// Why a peer's lease gets no route on the host advertising `ours`, if it does not.
///
/// - A key naming this host's own address (a reservation made for it, its lease from before it
///   took one, a hand-written key): datagrams to it would only come back as spoofed.
/// - A subnet outside the network or of another length than its subnets (a hand-written or
///   stale key, or one written by a compromised host) could cover addresses that other hosts
///   or no host hold, `0.0.0.0/1` say, and the peer's datagrams would then pass the sender
///   check with any of them as source. SubnetMin/SubnetMax are not checked: a reservation may
///   lie outside them. A subnet of a family the network does not have is left alone: while
///   hosts restart into a config without IPv6, their older dual-stack keys still carry IPv4.
/// - A lease with no address a datagram could go to has no next hop.
/// - Nor has a lease whose addresses are all of a family this host does not advertise: the
///   peer could not tell this host's datagrams from forged ones, nor this host reach it.
pub fn unroutable(
    config: &NetworkConfig,
    ours: &LeaseAttrs,
    lease: &Lease,
) -> Option<&'static str> {
    if lease.attrs.shares_address(ours) {
        return Some(if lease.is_reservation() {
            "it names this host's public address, so peers route its subnet here, where the \
             packets are dropped (a reservation: linen takes it on a restart here when the \
             address is the one it acquires by, PublicIP unless IPv6-only; `linen lease \
             release` removes it)"
        } else {
            "it names this host's public address, so peers route its subnet here, where the \
             packets are dropped, until it expires or is released (left by a host that had \
             this address, or renewed by one configured with it; `linen lease release` removes \
             it)"
        });
    }
    if let (Some(net), Some(sub)) = (config.network, lease.key.ipv4())
        && (sub.prefix() != config.subnet_len || !net.contains(sub.network()))
    {
        return Some(
            "its IPv4 subnet is not a subnet of this network (`linen lease release` removes it)",
        );
    }
    if let (Some(net), Some(sub)) = (config.ipv6_network, lease.key.ipv6())
        && (sub.prefix() != config.ipv6_subnet_len || !net.contains(sub.network()))
    {
        return Some(
            "its IPv6 subnet is not a subnet of this network (`linen lease release` removes it)",
        );
    }
    let v4 = lease.attrs.public_ip.is_some_and(|ip| usable(ip.into()));
    let v6 = lease.attrs.public_ipv6.is_some_and(|ip| usable(ip.into()));
    if !v4 && !v6 {
        return Some(
            "it names no public address a datagram could go to (`linen lease release` removes \
             it)",
        );
    }
    let shared = (v4 && ours.public_ip.is_some()) || (v6 && ours.public_ipv6.is_some());
    (!shared).then_some(
        "its public addresses are all of a family this host advertises none of; give both \
         hosts an underlay address of one family (--public-ip, --public-ipv6)",
    )
}

/// `peers` split into those routed and those [`unroutable`].
fn routable(
    config: &NetworkConfig,
    ours: &LeaseAttrs,
    peers: Vec<Lease>,
) -> (Vec<Lease>, Vec<Lease>) {
    peers
        .into_iter()
        .partition(|l| unroutable(config, ours, l).is_none())
}

/// Builds the snapshot for a lease state: this host's subnets (`own`) and addresses
/// (`ours`), its routable peers, and the addresses datagrams leave from (`source`).
pub fn snapshot_for(
    own: &SubnetKey,
    ours: &LeaseAttrs,
    peers: &[Lease],
    port: u16,
    generation: u64,
    source: Source,
) -> Snapshot {
    Snapshot::build(
        LocalSubnets {
            v4: own.ipv4(),
            v6: own.ipv6(),
        },
        routes_for(ours, peers, port),
        generation,
    )
    .with_sources(source.v4, source.v6)
}

/// The addresses this host advertises: `--public-ip` and `--public-ipv6` where given, else the
/// underlay interface's. The IPv6 address is advertised when the overlay has IPv6, and also
/// when there is no IPv4 underlay address at all (an IPv6-only underlay carries the IPv4
/// overlay too).
fn advertised_addresses(
    given: (Option<Ipv4Addr>, Option<Ipv6Addr>),
    config: &NetworkConfig,
    underlay: &host::Underlay,
) -> (Option<Ipv4Addr>, Option<Ipv6Addr>) {
    let public_ip = given.0.or(underlay.ipv4);
    let public_ipv6 = given
        .1
        .or(if config.ipv6_network.is_some() || public_ip.is_none() {
            underlay.ipv6
        } else {
            None
        });
    (public_ip, public_ipv6)
}

/// Refuses to advertise an IPv6 address of the underlay interface that failed duplicate
/// address detection, whether chosen there or `given` with `--public-ipv6`: the kernel never
/// receives on it, so peers would send to it in vain. Warns of one still tentative.
fn check_ipv6_dad(
    public_ipv6: Option<Ipv6Addr>,
    given: bool,
    underlay: &host::Underlay,
) -> Result<()> {
    let Some((v6, dad)) = public_ipv6.and_then(|v6| Some((v6, underlay.dad(v6)?))) else {
        return Ok(());
    };
    if dad == host::Dad::Failed {
        let fix = if given {
            "pass --public-ipv6 an address that passed it, or give the interface another one"
        } else {
            "give the interface another one, or pass --public-ipv6"
        };
        bail!("the IPv6 address {v6} on {} {dad}: {fix}", underlay.name);
    }
    tracing::warn!(address = %v6, interface = %underlay.name, "the advertised IPv6 address {dad}: datagrams reach it once detection has passed, a second or so");
    Ok(())
}

/// The TUN addresses for a lease: the subnets' network addresses (flannel's choice; `.1` stays
/// free for a bridge).
fn tun_addrs(key: &SubnetKey) -> (Option<Ipv4Addr>, Option<Ipv6Addr>) {
    (
        key.ipv4().map(|n| n.network()),
        key.ipv6().map(|n| n.network()),
    )
}

/// Whether workers receive with UDP GRO (`--udp-gro`, `--no-offload`), on a kernel of
/// `version` (`None`: unknown): UDP GRO before Linux 5.12 had bugs (perf-techniques.md), so
/// `auto` receives without it there, and says so.
fn receive_with_udp_gro(
    choice: Offload,
    no_offload: bool,
    version: Option<(u32, u32, u32)>,
) -> bool {
    match choice {
        _ if no_offload => false,
        Offload::Off => false,
        Offload::On => true,
        Offload::Auto => match version {
            Some(v) if v >= (5, 12, 0) => true,
            v => {
                tracing::info!(kernel = ?v, "not receiving with UDP GRO: it needs Linux 5.12 or later (--udp-gro on to use it anyway)");
                false
            }
        },
    }
}

/// Whether workers send with UDP GSO (`--udp-gso`, `--no-offload`), on a kernel of `version`
/// (`None`: unknown). Says so when `auto` leaves it off.
fn send_with_udp_gso(choice: Offload, no_offload: bool, version: Option<(u32, u32, u32)>) -> bool {
    match choice {
        _ if no_offload => false,
        Offload::Off => false,
        Offload::On => true,
        Offload::Auto => match version {
            Some(v) if host::udp_gso_may_corrupt(v) => {
                tracing::warn!(
                    kernel = %format_args!("{}.{}.{}", v.0, v.1, v.2),
                    "sending without UDP GSO, one system call per datagram: Linux 7.0.0 to \
                     7.1.4 corrupt UDP GSO datagrams with some network drivers (fixed in \
                     7.1.5); with a kernel that has the fix, pass --udp-gso on"
                );
                false
            }
            _ => true,
        },
    }
}

/// The subnets the last run wrote to `path` (flanneld's `FLANNEL_SUBNET` and
/// `FLANNEL_IPV6_SUBNET`), to ask for them again. A file that cannot be read or holds no
/// subnet is said, as flanneld says "Couldn't fetch previous FLANNEL_SUBNET": this host then
/// gets its old subnet only if its lease is still in the registry.
fn previous_subnet(path: &std::path::Path) -> Option<SubnetKey> {
    let text = match crate::files::read_regular(path, true) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e,
                "cannot read the previous run's subnet file; asking for any subnet");
            return None;
        }
    };
    let key = SubnetEnv::previous_key_in(&text);
    if key.is_none() {
        tracing::warn!(path = %path.display(),
            "the previous run's subnet file names no subnet linen can read; asking for any subnet");
    }
    key
}

/// Runs the daemon until SIGTERM/SIGINT.
pub async fn run(args: RunArgs) -> Result<()> {
    // Before anything else: once tokio handles SIGTERM, one that arrives while nothing listens
    // is lost, and a daemon stopped during start-up would run on until killed.
    let mut stop = StopSignals::new()?;
    for var in crate::cli::compat::ignored_flanneld_variables(|k| std::env::var_os(k)) {
        tracing::warn!(
            "{var} is set, but linen has no such flag (flanneld's -{}); it is ignored",
            var.trim_start_matches("FLANNELD_")
                .to_ascii_lowercase()
                .replace('_', "-")
        );
    }
    let from_flanneld = crate::cli::compat::flanneld_env_in_use(std::env::vars_os());
    for warning in crate::cli::compat::flanneld_default_warnings(from_flanneld, &args) {
        tracing::warn!("{warning}");
    }
    for (flag, choice) in [("--udp-gso", args.udp_gso), ("--udp-gro", args.udp_gro)] {
        if args.no_offload && choice == Offload::On {
            return Err(crate::cli::exit::usage(format!(
                "{flag} on contradicts --no-offload, which turns it off with the other \
                 offloads; pass one of them"
            )));
        }
    }
    let receive_buffer = receive_buffer(args.socket_buffer, args.socket_buffer_max)?;
    // First, so /healthz says "starting" while the config and lease are awaited.
    let ops = http::OpsServer::start(args.metrics_addr, args.healthz_addr()).await?;
    if host::has_net_admin() == Some(false) {
        return Err(unprivileged(&args).await);
    }
    let Some(registry) = open_registry(&args, &ops, &mut stop).await? else {
        tracing::info!("stopped while waiting for the registry");
        return Ok(());
    };
    let Some(config) = wait_for_config(registry.as_ref(), &ops, &mut stop).await? else {
        tracing::info!("stopped while waiting for the network config");
        return Ok(());
    };
    let nl = host::connect()?;
    let underlay = host::discover_underlay(
        &nl,
        &args.interface_choice(),
        args.public_ip,
        args.public_ipv6,
        &|ip| config.leases(ip),
    )
    .await?;
    let (public_ip, public_ipv6) =
        advertised_addresses((args.public_ip, args.public_ipv6), &config, &underlay);
    check_ipv6_dad(public_ipv6, args.public_ipv6.is_some(), &underlay)?;
    if public_ip.is_none() && public_ipv6.is_none() {
        bail!(
            "interface {} has no usable address to advertise; pass --public-ip or --public-ipv6",
            underlay.name
        );
    }
    // An underlay address in a subnet the network leases: once a host leases that subnet,
    // datagrams to this host are routed into that host's overlay (flannel's docs place the
    // hosts inside Network, outside [SubnetMin, SubnetMax], which works while the underlay's
    // own routes are more specific: only a warning).
    for ip in [public_ip.map(IpAddr::V4), public_ipv6.map(IpAddr::V6)]
        .into_iter()
        .flatten()
    {
        if config.leases(ip) {
            return Err(crate::cli::exit::usage(format!(
                "this host's underlay address {ip} is inside a subnet the network config leases, \
                 so once a host leases it, datagrams to this host are routed into the overlay; \
                 keep SubnetMin..SubnetMax clear of every host's underlay address (or choose \
                 another underlay with --iface or --public-ip)"
            )));
        }
        if config.contains(ip) {
            tracing::warn!(
                address = %ip,
                "this host's underlay address is inside the overlay network (outside the leased \
                 range): peers are reached only while the underlay's own routes are more specific \
                 than the overlay's"
            );
        }
    }
    let attrs = LeaseAttrs {
        public_ip,
        public_ipv6,
        ..LeaseAttrs::default()
    };
    // Outer IPv4 + UDP is 28 bytes, outer IPv6 + UDP 48. One MTU covers the device, so when
    // this host advertises an IPv6 underlay address (peers then send IPv6 overlay traffic to it
    // over IPv6) the larger overhead applies to all traffic; an IPv4-only cluster keeps flannel's
    // interface MTU − 28.
    let overhead = if public_ipv6.is_some() { 48 } else { 28 };
    // IPv6 may have a smaller MTU than the link (a router advertisement's MTU option, 1480 on
    // a 6in4 or PPPoE uplink): datagrams over IPv6 must fit that one.
    let underlay_mtu = match public_ipv6 {
        Some(_) => host::ipv6_mtu(&underlay.name).map_or(underlay.mtu, |m| m.min(underlay.mtu)),
        None => underlay.mtu,
    };
    let mtu = match args.mtu {
        Some(m) => m,
        None => u16::try_from(underlay_mtu.saturating_sub(overhead))
            .unwrap_or(u16::MAX)
            .max(576),
    };
    if args.mtu.is_none() && u32::from(mtu) + overhead > underlay_mtu {
        // Linux's floor for IPv4 hosts; below it nothing sensible runs over the overlay.
        tracing::warn!(
            mtu,
            underlay = %underlay.name,
            underlay_mtu = underlay_mtu,
            "the underlay MTU leaves less than 576 bytes for overlay packets after the \
             {overhead}-byte outer header; using 576, so full-size overlay packets make \
             datagrams larger than the underlay MTU, which are fragmented or dropped on the way"
        );
    }
    if args.mtu.is_some() && u32::from(mtu) + overhead > underlay_mtu {
        tracing::warn!(
            mtu,
            underlay = %underlay.name,
            underlay_mtu = underlay_mtu,
            "--mtu leaves no room for the {overhead}-byte outer header: full-size overlay packets \
             make datagrams larger than the underlay MTU, which are fragmented or dropped on \
             the way; use at most {}",
            underlay_mtu.saturating_sub(overhead)
        );
    }
    if config.ipv6_network.is_some() && mtu < 1280 {
        return Err(crate::cli::exit::usage(format!(
            "the network config has an IPv6 network, and IPv6 needs an MTU of at least 1280, \
             but the overlay MTU would be {mtu} ({}); pass --mtu 1280 or more, or use an \
             underlay interface with an MTU of at least {}",
            if args.mtu.is_some() {
                "--mtu".to_owned()
            } else {
                format!("{} − {overhead}", underlay_mtu)
            },
            1280 + overhead
        )));
    }
    // Opening a TUN device by the name of an existing one attaches to it (another multi-queue
    // TUN: its packets would be shared with that program) or fails with a misleading error.
    // Before the lease, so nothing is taken for a daemon that cannot run.
    if host::link_exists(&nl, &args.tun).await? {
        bail!(
            "a network device named {} already exists (another linen, or another program's \
             device); pass --tun with another name, or remove it",
            args.tun
        );
    }
    let previous = previous_subnet(&args.subnet_file);

    // Before anything is acquired or created: a port held by another program is an error.
    ensure_port_free(config.backend.port)?;
    let mut options = ManagerOptions::new(attrs.clone());
    options.previous = previous;
    options.renew_margin = Duration::from_secs(u64::from(args.subnet_lease_renew_margin) * 60);
    let mut manager = LeaseManager::new(Arc::clone(&registry), config.clone(), options);
    // Raced against a stop: one registry request can take seconds (etcd's request timeout, a
    // directory lock another process holds), and a stop must not wait for them all. A lease
    // the registry grants after all is this host's again at the next start (by its address).
    let location = registry::describe(&args.registry);
    let mut told = false;
    let acquiring = manager.acquire_patiently(|e| {
        ops.waiting(
            location.clone(),
            format!("cannot acquire a subnet lease yet: {e}"),
        );
        if !told {
            told = true;
            tracing::warn!(error = %e, "cannot acquire a subnet lease yet; retrying every second");
        }
    });
    let Some(own) = stop.unless_stopped(acquiring).await else {
        tracing::info!("stopped while acquiring the lease");
        return Ok(());
    };
    let own = own.context("acquiring a subnet lease")?;
    ops.resolved();
    tracing::info!(
        subnet = %own.key,
        public_ip = attrs.public_ip.map(tracing::field::display),
        public_ipv6 = attrs.public_ipv6.map(tracing::field::display),
        "this host's subnet"
    );

    // One per core, at most 256: TUN devices take at most 256 queues, and the steering's port
    // classes (steer.rs) name 256 workers.
    let workers = usize::from(args.workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| u16::try_from(n.get().min(256)).unwrap_or(1))
            .unwrap_or(1)
    }));
    let tun = open_tun(&TunOptions {
        name: args.tun.clone(),
        mtu,
        queues: workers,
        offload: !args.no_offload,
        tx_queue_len: 1000,
    })
    .with_context(|| {
        format!(
            "creating TUN device {} (needs root and /dev/net/tun)",
            args.tun
        )
    })?;
    let (tun_v4, tun_v6) = tun_addrs(&own.key);
    host::configure_tun(
        &nl,
        &args.tun,
        u32::from(mtu),
        tun_v4.zip(config.network),
        tun_v6.zip(config.ipv6_network),
    )
    .await?;

    let kernel = host::kernel_version();
    let udp_gro = receive_with_udp_gro(args.udp_gro, args.no_offload, kernel);
    let udp_gso = send_with_udp_gso(args.udp_gso, args.no_offload, kernel);

    // Datagrams leave from the advertised addresses when they are local: peers accept only
    // those (an address behind NAT is left to the kernel, and to --accept-unknown-senders).
    // Workers take them from the table, which carries them to every worker when they change.
    let source = Source::advertised(public_ip, public_ipv6, &host::local_addresses(&nl).await?);
    tracing::debug!(?source, "datagram source addresses");
    let table = Table::new(snapshot_for(
        &own.key,
        &attrs,
        &[],
        config.backend.port,
        0,
        source,
    ));
    let mut setups = Vec::with_capacity(workers);
    for (id, queue) in tun.queues.into_iter().enumerate() {
        let mut udp = open_udp(config.backend.port, args.socket_buffer)
            .with_context(|| format!("opening UDP port {} for worker {id}", config.backend.port))?;
        udp.source = source;
        if id == 0
            && workers > 1
            && let Err(e) = steer_by_source_port(&udp, config.backend.port, workers)
        {
            tracing::warn!(error = %e, "cannot steer received datagrams by the sender's port; \
                the kernel's hash picks the worker, so flows may share or change workers");
        }
        // With several workers each sends from its own port, whose class names the worker, so a
        // peer receives each of our workers' flows on one of its workers and answers from the
        // matching one (dataplane::steer); one worker sends from the overlay port, as flannel.
        let tx = if workers > 1 && !args.fixed_source_port {
            let (mut ep, classed) = open_udp_send(id, args.socket_buffer, udp.dual_stack)
                .with_context(|| format!("opening a send socket for worker {id}"))?;
            ep.source = source;
            if !classed {
                tracing::warn!(
                    worker = id,
                    "no free send port of this worker's class in \
                    ip_local_port_range; sending from an ephemeral port"
                );
            }
            Some(ep)
        } else {
            None
        };
        setups.push(WorkerSetup {
            id,
            tun: queue,
            tun_offload: tun.offload,
            udp,
            tx,
            table: table.reader(),
            config: ForwardConfig {
                mtu: usize::from(mtu),
                accept_unknown_senders: args.accept_unknown_senders,
            },
            no_udp_offload: !udp_gso,
            udp_gro,
            busy_poll: Duration::from_micros(u64::from(args.busy_poll_us)),
            receive_buffer,
        });
    }
    // The port was free before the lease; a program that bound it since with SO_REUSEPORT
    // (a second linen started at the same moment, on another --tun) has joined the workers'
    // group and would share their datagrams. Before a worker reads any.
    ensure_port_only_ours(
        config.backend.port,
        &setups
            .iter()
            .map(|s| s.udp.socket.as_fd())
            .collect::<Vec<_>>(),
    )?;
    let mut handles = Vec::with_capacity(workers);
    for setup in setups {
        handles.push(WorkerHandle::spawn(setup)?);
    }
    tracing::info!(device = %args.tun, mtu, workers, offload = tun.offload,
        udp_gro = handles.iter().all(|h| h.udp_gro),
        udp_gso = handles.iter().all(|h| h.udp_gso),
        port = config.backend.port, underlay = %underlay.name, "data plane running");

    // The rules before subnet.env (flanneld starts installing them at this point too, but in
    // the background): CNI starts workloads once the file exists, and their first flows must
    // already be masqueraded (conntrack would keep an unmasqueraded one so for its life); a
    // failed install leaves no file claiming FLANNEL_IPMASQ=true behind.
    let cancel = CancellationToken::new();
    let rule_opts = masq::Options {
        masquerade: args.ip_masq,
        forward: args.iptables_forward_rules,
        resync: Duration::from_secs(args.iptables_resync.into()),
        no_random_fully: args.ip_masq_fully_random_disable,
    };
    // A stop while the commands wait for the xtables lock (a bare `-w` waits for ever, each
    // command at most 30 s) cuts them short: the unit's stop timeout is 30 s.
    let installing = CancellationToken::new();
    let install = masq::install(
        &config,
        &own.key,
        rule_opts,
        masq::Limit::until_cancelled(&installing),
    );
    tokio::pin!(install);
    let rules = tokio::select! {
        rules = &mut install => rules?,
        () = stop.recv() => {
            stop.exit_on_next();
            installing.cancel();
            // What this start made is removed (a failed install removes its own); rules an
            // earlier run left in force stay, as a stop leaves them.
            if let Ok(Some(r)) = install.await {
                let _ = tokio::task::spawn_blocking(move || r.remove()).await;
            }
            tracing::info!("stopping while the iptables rules were being installed; the lease is kept");
            return Ok(());
        }
    };
    // Routes to the peers listed while acquiring, once the rules are in place and before
    // subnet.env and READY=1: workloads started then reach the other hosts at once, not only
    // when the watch answers (which an etcd leader election can put off).
    let first = manager.subscribe().borrow().clone();
    let (peers, _) = routable(&config, &attrs, first.peers);
    table.publish(snapshot_for(
        &own.key,
        &attrs,
        &peers,
        config.backend.port,
        first.generation,
        source,
    ));

    let env = SubnetEnv::for_lease(
        config.network,
        config.ipv6_network,
        &own.key,
        u32::from(mtu),
        args.ip_masq,
    );
    if let Err(e) = host::write_atomic_off_thread(&args.subnet_file, env.render()).await {
        // Exiting: the rules go too, as on any other way out (a stop signal meanwhile ends it).
        stop.exit_on_next();
        if let Some(r) = rules {
            let _ = tokio::task::spawn_blocking(move || r.remove()).await;
        }
        return Err(e).with_context(|| format!("writing {}", args.subnet_file.display()));
    }
    let host_steps = status::HostSteps::default();
    // The lease the masquerade rules were last written for: after a move, subnet.env waits
    // for them, as it waited for the install above (the forward rules name no lease).
    let (rules_written, rules_for) = watch::channel(own.key);
    let mut rules_for = (args.ip_masq && rules.is_some()).then_some(rules_for);
    let masq = rules.map(|r| {
        masq::spawn_resync(
            r,
            manager.subscribe(),
            host_steps.clone(),
            cancel.clone(),
            rules_written,
        )
    });
    notify::notify_logged("READY=1");
    let mut state = manager.subscribe();
    ops.attach(status::Sources {
        host: host_steps.clone(),
        state: manager.subscribe(),
        table: table.clone(),
        workers: handles.iter().map(WorkerHandle::monitor).collect(),
        registry: registry.location(),
    });
    let new_addresses = manager.address_sender();
    let control = tokio::spawn(manager.run(cancel.clone()));
    let port = config.backend.port;
    let publisher = {
        let table = table.clone();
        let subnet_file = args.subnet_file.clone();
        let config = config.clone();
        let ip_masq = args.ip_masq;
        let nl = nl.clone();
        let strict = host::connect_strict();
        let tun_name = args.tun.clone();
        let tun_mtu = u32::from(mtu);
        let mut attrs = attrs.clone();
        let mut source = source;
        // The advertised addresses checked for being this host's: those it sends from (the
        // local ones), and a local one given with --public-ip even after a follow took the
        // other family's elsewhere.
        let mut watched = addresses_of(source);
        let follow = Follow {
            choice: args.interface_choice(),
            given: (args.public_ip, args.public_ipv6),
            interface: underlay.name.clone(),
            mtu: underlay_mtu,
        };
        let mut device_key = own.key;
        let host_steps = host_steps.clone();
        tokio::spawn(async move {
            // The lease the table is built for, and the ones the TUN device and subnet.env
            // carry: they differ after a move until each has followed. A step that fails is
            // retried alone, every 5 s (not at each peer change). While a lost lease is
            // re-acquired all stay on the old subnet: it stays local, and peer changes (a new
            // host, one that left) still apply.
            let mut table_key = device_key;
            let mut env_key = device_key;
            let mut retry_at: Option<tokio::time::Instant> = None;
            // The last error of the device step, of the subnet.env step, of the device check and
            // of the underlay check, logged once.
            let mut failing: [Option<String>; 4] = [None, None, None, None];
            let mut check_at = tokio::time::Instant::now() + TUN_CHECK;
            // Looks made a second apart while a new IPv6 address is still tentative.
            let mut quick_looks = 0;
            // Peer keys not routed, last warned about.
            let mut skipped: Vec<SubnetKey> = Vec::new();
            'publish: loop {
                let mut current: LeaseState = state.borrow_and_update().clone();
                let moved_now = current.own.as_ref().is_some_and(|o| o.key != table_key);
                if let Some(own) = &current.own {
                    table_key = own.key;
                }
                let due = retry_at.is_some_and(|t| t <= tokio::time::Instant::now());
                if moved_now || due {
                    retry_at = None;
                    if moved_now {
                        tracing::warn!(subnet = %table_key, "our lease changed; moving the TUN device to it and rewriting subnet.env");
                    }
                    if device_key != table_key {
                        let (v4, v6) = tun_addrs(&table_key);
                        match host::readdress_tun(
                            &nl,
                            &tun_name,
                            tun_mtu,
                            v4.zip(config.network),
                            v6.zip(config.ipv6_network),
                        )
                        .await
                        {
                            Ok(()) => {
                                device_key = table_key;
                                retry_done(&mut failing[0], "the TUN device moved");
                            }
                            Err(e) => retry_failed(
                                &mut failing[0],
                                "cannot move the TUN device to the new subnet",
                                format!("{e:#}"),
                            ),
                        }
                    }
                    // The new subnet's masquerade rules first: a workload CNI starts on it
                    // would otherwise have its first flows to other hosts' pods masqueraded,
                    // and conntrack keep them so (one rebuild: a failed one is retried by the
                    // rules' own check, reported as the iptables step, and does not hold
                    // subnet.env back for longer).
                    // (A rules task that is gone holds nothing back.)
                    let rules_ready = rules_for.as_mut().is_none_or(|r| {
                        *r.borrow_and_update() == table_key || r.has_changed().is_err()
                    });
                    if env_key != table_key && !rules_ready {
                        tracing::debug!(subnet = %table_key, "subnet.env waits for the masquerade rules of the new subnet");
                    }
                    if env_key != table_key && rules_ready {
                        let env = SubnetEnv::for_lease(
                            config.network,
                            config.ipv6_network,
                            &table_key,
                            u32::from(mtu),
                            ip_masq,
                        );
                        match host::write_atomic_off_thread(&subnet_file, env.render()).await {
                            Ok(()) => {
                                env_key = table_key;
                                retry_done(&mut failing[1], "subnet.env rewritten");
                            }
                            Err(e) => retry_failed(
                                &mut failing[1],
                                "cannot rewrite subnet.env",
                                format!("{e:#}"),
                            ),
                        }
                    }
                    if device_key != table_key || (env_key != table_key && rules_ready) {
                        retry_at = Some(tokio::time::Instant::now() + Duration::from_secs(5));
                    }
                }
                let (peers, bad) = routable(&config, &attrs, std::mem::take(&mut current.peers));
                let bad_keys: Vec<SubnetKey> = bad.iter().map(|l| l.key).collect();
                if bad_keys != skipped {
                    for l in bad.iter().filter(|l| !skipped.contains(&l.key)) {
                        tracing::warn!(key = %l.key, public_ip = l.attrs.public_ip.map(tracing::field::display), public_ipv6 = l.attrs.public_ipv6.map(tracing::field::display), why = unroutable(&config, &attrs, l).unwrap_or_default(), "not routing a peer's lease");
                    }
                    skipped = bad_keys;
                }
                let snap =
                    snapshot_for(&table_key, &attrs, &peers, port, current.generation, source);
                tracing::debug!(
                    generation = current.generation,
                    peers = snap.len(),
                    "table published"
                );
                table.publish(snap);
                host_steps.set("tun", failing[0].as_ref().or(failing[2].as_ref()));
                host_steps.set("subnet_env", failing[1].as_ref());
                loop {
                    tokio::select! {
                        r = state.changed() => if r.is_err() {
                            break 'publish;
                        } else {
                            break;
                        },
                        () = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)), if retry_at.is_some() => break,
                        // The rules subnet.env waits for are written (or their task is
                        // gone, and holds nothing back from now on).
                        Some(changed) = async {
                            match rules_for.as_mut() {
                                Some(r) => Some(r.changed().await),
                                None => None,
                            }
                        }, if env_key != table_key => {
                            if changed.is_err() {
                                rules_for = None;
                            }
                            retry_at = Some(tokio::time::Instant::now());
                            break;
                        }
                        () = tokio::time::sleep_until(check_at) => {
                            check_at = tokio::time::Instant::now() + TUN_CHECK;
                            // Not while a move is under way: the move sets the device up anew.
                            if device_key == table_key {
                                check_tun((&nl, strict.as_ref()), (&tun_name, tun_mtu), &config, &device_key, &mut failing[2]).await;
                                host_steps.set("tun", failing[0].as_ref().or(failing[2].as_ref()));
                            }
                            // (Unknown when the addresses cannot be listed: then as it was.)
                            let gone = gone_addresses(&nl, &watched).await;
                            if gone.as_ref().is_some_and(Vec::is_empty) {
                                quick_looks = 0;
                                retry_done(&mut failing[3], "the advertised underlay address is back");
                            } else if let Some(gone) = gone {
                                match follow_underlay(&nl, &follow, &config, &attrs, &gone).await {
                                    Ok((new, new_source)) => {
                                        tracing::warn!(gone = %list(&gone), public_ip = new.public_ip.map(tracing::field::display), public_ipv6 = new.public_ipv6.map(tracing::field::display), "the advertised underlay address is gone; advertising the interface's new one instead, and keeping the subnet");
                                        attrs = new;
                                        source = new_source;
                                        watched = follow.watched_after(&watched, source);
                                        // The manager rewrites the lease with them; peers
                                        // route to the new address once they see it.
                                        let _ = new_addresses.send(attrs.clone());
                                        failing[3] = None;
                                        quick_looks = 0;
                                        host_steps.set("underlay", None);
                                        // The table again, with the new source addresses.
                                        break;
                                    }
                                    // Detection under way on the new address (a routine
                                    // change, over in a second or so): looked at again in a
                                    // second, quietly, for up to DAD_QUICK_LOOKS seconds;
                                    // then reported, and checked every 5 s.
                                    Err(waiting) if waiting.soon && quick_looks < DAD_QUICK_LOOKS => {
                                        quick_looks += 1;
                                        tracing::debug!(why = %waiting.why, "the advertised underlay address is gone; looking again in a second");
                                        check_at = tokio::time::Instant::now() + DAD_RECHECK;
                                    }
                                    Err(waiting) => {
                                        retry_failed(
                                            &mut failing[3],
                                            "the advertised underlay address is gone",
                                            format!(
                                                "{} is on no interface of this host any more (an \
                                                 IPv6 address also when it failed duplicate \
                                                 address detection): peers send to it, and drop \
                                                 what this host sends from another address; {}",
                                                list(&gone),
                                                waiting.why
                                            ),
                                        );
                                    }
                                }
                            }
                            host_steps.set("underlay", failing[3].as_ref());
                        }
                    }
                }
            }
        })
    };

    let monitors: Vec<WorkerMonitor> = handles.iter().map(WorkerHandle::monitor).collect();
    // The control-plane tasks end only when cancelled: one that ends (or panics) before would
    // leave the lease unrenewed and the table frozen while /healthz still says ok.
    let mut control = control;
    let mut publisher = publisher;
    let mut control_done = false;
    let outcome = tokio::select! {
        () = stop.recv() => Ok(()),
        () = all_stopped(&monitors) => {
            // The reason is the daemon's exit message (printed once, on the way out).
            tracing::error!("no forwarding worker is left; stopping");
            Err(anyhow!(
                "every forwarding worker has stopped (see the errors above; was the TUN device \
                 {} deleted?); exiting so that a supervisor can restart linen, which finds its \
                 lease again",
                args.tun
            ))
        }
        r = &mut control => {
            control_done = true;
            tracing::error!("the lease manager stopped; stopping");
            Err(anyhow!(
                "the lease manager stopped unexpectedly ({}); exiting so that a supervisor can \
                 restart linen, which finds its lease again",
                r.err().map_or_else(|| "it returned".to_owned(), |e| e.to_string())
            ))
        }
        r = &mut publisher => {
            tracing::error!("the table publisher stopped; stopping");
            Err(anyhow!(
                "the forwarding-table publisher stopped unexpectedly ({}); exiting so that a \
                 supervisor can restart linen",
                r.err().map_or_else(|| "it returned".to_owned(), |e| e.to_string())
            ))
        }
    };
    // Whatever ended the run, a stop signal during the rest ends it at once: a second one
    // after a stop, a first one after a failure.
    stop.exit_on_next();
    notify::notify_logged("STOPPING=1");
    tracing::info!(
        "stopping: workers first (the device goes with them), then the lease manager and the \
         iptables checks; the lease and the iptables rules are kept"
    );
    // Workers first: their final counters are logged before anything else can hold up the
    // stop. Joined off the runtime's one thread, which meanwhile still answers a second stop
    // signal.
    let joined = tokio::task::spawn_blocking(move || {
        handles
            .into_iter()
            .map(WorkerHandle::join)
            .collect::<Vec<_>>()
    })
    .await;
    for r in joined.unwrap_or_else(|e| vec![Err(std::io::Error::other(e))]) {
        if let Err(e) = r {
            tracing::warn!(error = %e, "worker ended with an error");
        }
    }
    let mut total = LocalCounters::default();
    let per_worker: Vec<status::WorkerTraffic> = monitors
        .iter()
        .map(|m| {
            let c = m.counters();
            total.add(&c);
            status::WorkerTraffic::from(&c)
        })
        .collect();
    // Per worker, comma-separated in worker order: how flows spread.
    let list = |f: fn(&status::WorkerTraffic) -> u64| {
        per_worker
            .iter()
            .map(|w| f(w).to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    tracing::info!(
        "stopped; counters: {} worker_tun_rx={} worker_udp_tx={} worker_udp_rx={}",
        counters_summary(&total),
        list(|w| w.tun_rx_packets),
        list(|w| w.udp_tx_packets),
        list(|w| w.udp_rx_packets)
    );
    cancel.cancel();
    if !control_done {
        let _ = control.await;
    }
    if let Some(masq) = masq {
        let _ = masq.await;
    }
    publisher.abort();
    outcome
}

/// The addresses of `source`, the advertised ones datagrams leave from.
fn addresses_of(source: Source) -> Vec<IpAddr> {
    [source.v4.map(IpAddr::V4), source.v6.map(IpAddr::V6)]
        .into_iter()
        .flatten()
        .collect()
}

/// Those of the `watched` addresses that are on no interface of this host any more; `None`
/// when the addresses cannot be listed (nothing is known then, and nothing changes).
async fn gone_addresses(nl: &rtnetlink::Handle, watched: &[IpAddr]) -> Option<Vec<IpAddr>> {
    if watched.is_empty() {
        return Some(Vec::new());
    }
    match host::present_addresses(nl, watched).await {
        Ok(local) => Some(
            watched
                .iter()
                .copied()
                .filter(|ip| !local.contains(ip))
                .collect(),
        ),
        Err(e) => {
            tracing::debug!(error = %format!("{e:#}"), "cannot list this host's addresses");
            None
        }
    }
}

/// Addresses, for messages: `a and b`.
fn list(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(" and ")
}

/// How the start chose the underlay, to choose again when its address goes.
struct Follow {
    choice: host::InterfaceChoice,
    /// `--public-ip` and `--public-ipv6`: never followed.
    given: (Option<Ipv4Addr>, Option<Ipv6Addr>),
    /// The underlay interface at start.
    interface: String,
    /// The underlay MTU the overlay MTU was set for.
    mtu: u32,
}

impl Follow {
    /// The addresses given with `--public-ip` and `--public-ipv6`.
    fn given_addresses(&self) -> [Option<IpAddr>; 2] {
        [self.given.0.map(IpAddr::V4), self.given.1.map(IpAddr::V6)]
    }

    /// The addresses to watch once the host sends from `source`: those, and the given ones
    /// among `before` (a local `--public-ip` address stays watched, and reported while gone,
    /// after the other family's was followed).
    fn watched_after(&self, before: &[IpAddr], source: Source) -> Vec<IpAddr> {
        let given = self.given_addresses();
        let mut watched = addresses_of(source);
        for ip in before {
            if given.contains(&Some(*ip)) && !watched.contains(ip) {
                watched.push(*ip);
            }
        }
        watched
    }
}

/// The addresses to advertise, and to send from, now that an advertised address left the host
/// (DHCP gave the interface another): the start's choice of interface and address made again.
/// Without `--iface`, `--iface-regex` or `--iface-can-reach`, only the start's interface is
/// looked at: a lapsed DHCP lease takes the default route along, and the one interface left
/// with an address may be a container bridge, the same on every host. Refused, with the
/// reason for the message, when every address `gone` was given with `--public-ip` or
/// `--public-ipv6`, when the choice finds nothing new (none on the interface yet, or only an
/// IPv4 link-local address where the host advertised none), addresses of other families than
/// advertised (the overlay MTU was set for these), or an address the network leases. A new
/// IPv6 address still tentative, or one that failed duplicate address detection, is not
/// taken: the old one stays advertised meanwhile.
async fn follow_underlay(
    nl: &rtnetlink::Handle,
    follow: &Follow,
    config: &NetworkConfig,
    current: &LeaseAttrs,
    gone: &[IpAddr],
) -> Result<(LeaseAttrs, Source), Waiting> {
    let given = follow.given_addresses();
    // One given with --public-ip is never followed (the other family's, when gone too, is).
    if gone.iter().all(|ip| given.contains(&Some(*ip))) {
        return Err(
            "it was given with --public-ip or --public-ipv6: restart linen with the new one"
                .to_owned()
                .into(),
        );
    }
    let waiting = if follow.choice.is_empty() {
        format!(
            "waiting for a new address on {} (checked every 5 s)",
            follow.interface
        )
    } else {
        format!(
            "waiting for a new address ({}; checked every 5 s)",
            follow.choice.describe()
        )
    };
    // Named: the choice made again. Not named: the start's interface, whatever else has an
    // address meanwhile.
    let underlay = if follow.choice.is_empty() {
        host::underlay_named(nl, &follow.interface)
            .await
            .ok()
            .flatten()
    } else {
        host::discover_underlay(nl, &follow.choice, follow.given.0, follow.given.1, &|ip| {
            config.leases(ip)
        })
        .await
        .ok()
    };
    let underlay = underlay.ok_or_else(|| Waiting::from(waiting.clone()))?;
    let (v4, mut v6) = advertised_addresses(follow.given, config, &underlay);
    // A new IPv6 address the kernel neither sends from nor receives on yet (duplicate address
    // detection runs for a second or so) or ever (it failed) is not advertised: peers would
    // send to it in vain, and a failed one would stay advertised for good. The old one stays
    // while it is still here (the IPv4 address alone changed); when it is gone too, nothing
    // changes until a new one is ready (so a new IPv4 address waits too: one that failed
    // detection holds it until another IPv6 address comes).
    let mut waiting = Waiting::from(waiting);
    if let (Some(new), Some(dad)) = (v6, underlay.ipv6_dad())
        && v6 == underlay.ipv6
        && current.public_ipv6.is_some()
        && v6 != current.public_ipv6
    {
        waiting = Waiting {
            why: format!("{}; its new address {new} {dad}", waiting.why),
            // Detection is over within a second or so, usually.
            soon: dad == host::Dad::Tentative,
        };
        if current
            .public_ipv6
            .is_some_and(|old| gone.contains(&IpAddr::V6(old)))
        {
            return Err(waiting);
        }
        v6 = current.public_ipv6;
    }
    // Nothing new yet, or a DHCP client between leases (an IPv4 link-local address meanwhile,
    // where the host did not advertise one).
    let link_local = |ip: Option<Ipv4Addr>| ip.is_some_and(|ip| ip.is_link_local());
    if (v4, v6) == (current.public_ip, current.public_ipv6)
        || (link_local(v4) && !link_local(current.public_ip))
    {
        return Err(waiting);
    }
    // Also between leases, or for good (a family gone, or one come that was not advertised):
    // the overlay MTU was set for the families advertised at start.
    if v4.is_some() != current.public_ip.is_some() || v6.is_some() != current.public_ipv6.is_some()
    {
        let found: Vec<IpAddr> = [v4.map(IpAddr::V4), v6.map(IpAddr::V6)]
            .into_iter()
            .flatten()
            .collect();
        return Err(format!(
            "{}; {} has addresses of other families than those advertised ({}): restart linen \
             to advertise them",
            waiting.why,
            underlay.name,
            list(&found)
        )
        .into());
    }
    if let Some(ip) = [v4.map(IpAddr::V4), v6.map(IpAddr::V6)]
        .into_iter()
        .flatten()
        .find(|ip| config.leases(*ip))
    {
        return Err(format!(
            "its new address {ip} is inside a subnet the network config leases, so it is not \
             advertised; choose another underlay with --iface or --public-ip and restart linen"
        )
        .into());
    }
    if underlay.mtu < follow.mtu {
        tracing::warn!(interface = %underlay.name, mtu = underlay.mtu, was = follow.mtu, "the new underlay address is on an interface with a smaller MTU than the overlay's was set for; restart linen to set the overlay MTU for it");
    }
    let local = host::local_addresses(nl)
        .await
        .map_err(|e| format!("cannot list this host's addresses: {e:#}"))?;
    let attrs = LeaseAttrs {
        public_ip: v4,
        public_ipv6: v6,
        ..current.clone()
    };
    Ok((attrs, Source::advertised(v4, v6, &local)))
}

/// Why an advertised address that went is not followed yet, and whether to look again
/// sooner than the next check ([`DAD_RECHECK`]: the new address is still tentative).
#[derive(Debug)]
struct Waiting {
    why: String,
    soon: bool,
}

impl From<String> for Waiting {
    fn from(why: String) -> Waiting {
        Waiting { why, soon: false }
    }
}

/// How soon the follow looks again while a new IPv6 address is still tentative: duplicate
/// address detection takes about a second (one probe, a second's wait), not the 5 s between
/// checks.
const DAD_RECHECK: Duration = Duration::from_secs(1);

/// How many such looks are made before the wait is reported (an address can stay tentative
/// for long: `dad_transmits` set high, or a link without carrier), and checks go back to
/// every 5 s. Each look runs the TUN check too.
const DAD_QUICK_LOOKS: u32 = 10;

/// The most a worker's receive buffer grows to without `--socket-buffer-max` (or
/// `--socket-buffer`, when that is larger).
const SOCKET_BUFFER_MAX: usize = 16 << 20;

/// A worker's receive buffer at start and at most, from `--socket-buffer` and
/// `--socket-buffer-max`: a maximum given below the start is refused; none given is
/// [`SOCKET_BUFFER_MAX`] or the start, whichever is larger (a host that set a larger
/// `--socket-buffer` before the maximum existed still starts).
fn receive_buffer(start: usize, max: Option<usize>) -> Result<(usize, usize)> {
    match max {
        Some(max) if max < start => Err(crate::cli::exit::usage(format!(
            "--socket-buffer-max {max} is below --socket-buffer {start}: the receive buffer \
             starts at --socket-buffer and grows up to --socket-buffer-max; pass a maximum at \
             least as large (the same value keeps the buffer fixed)"
        ))),
        Some(max) => Ok((start, max)),
        None => Ok((start, SOCKET_BUFFER_MAX.max(start))),
    }
}

/// How often the TUN device is checked for what linen set up on it.
const TUN_CHECK: Duration = Duration::from_secs(5);

/// Puts back what [`host::configure_tun`] set up on the TUN device for `key` and is gone (the
/// device taken down, which also drops its routes; routes or addresses flushed; a network
/// manager that claimed it; its MTU changed by hand): the workers would keep running while the
/// host routed the overlay elsewhere, or drop the packets too long for their buffers. A
/// vanished device is left to the workers, which stop the daemon.
async fn check_tun(
    (nl, strict): (&rtnetlink::Handle, Option<&rtnetlink::Handle>),
    (tun_name, mtu): (&str, u32),
    config: &NetworkConfig,
    key: &SubnetKey,
    failing: &mut Option<String>,
) {
    let (v4, v6) = tun_addrs(key);
    let (v4, v6) = (v4.zip(config.network), v6.zip(config.ipv6_network));
    let missing = match host::tun_missing(nl, strict, tun_name, mtu, v4, v6).await {
        Ok(m) if m.is_empty() => {
            // Whole again, maybe put back by hand or by another tool: a failed restore is over.
            retry_done(failing, "the TUN device is complete");
            return;
        }
        Ok(m) => m,
        Err(e) => {
            tracing::debug!(error = %format!("{e:#}"), "cannot check the TUN device");
            return;
        }
    };
    if failing.is_none() {
        // While a restore keeps failing, retry_failed logs it (once per distinct error).
        tracing::warn!(device = tun_name, missing = %missing.join(", "), "the TUN device lost what linen set up; restoring it");
    }
    match host::configure_tun(nl, tun_name, mtu, v4, v6).await {
        Ok(()) => retry_done(failing, "the TUN device restored"),
        Err(e) => retry_failed(failing, "cannot restore the TUN device", format!("{e:#}")),
    }
}

/// Logs a failed step that is retried every 5 s: at error level when it starts failing or its
/// error changes, not at every retry.
fn retry_failed(last: &mut Option<String>, what: &str, error: String) {
    if last.as_deref() != Some(error.as_str()) {
        tracing::error!(error = %error, "{what}; retrying every 5 s (logged again if the error changes)");
        *last = Some(error);
    } else {
        tracing::debug!(error = %error, "{what}, again");
    }
}

/// Logs that a step which had failed has now worked.
fn retry_done(last: &mut Option<String>, what: &str) {
    if last.take().is_some() {
        tracing::info!("{what} after all");
    }
}

/// Returns once no worker runs any more: the data plane is gone (its TUN device was deleted,
/// say) and the daemon forwards nothing until it is restarted. Polled: a control-plane check,
/// twice a second, that costs the workers nothing.
async fn all_stopped(workers: &[WorkerMonitor]) {
    while workers.iter().any(WorkerMonitor::is_running) {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `name=value` pairs of every counter, for the shutdown log line.
pub fn counters_summary(c: &LocalCounters) -> String {
    c.named()
        .map(|(name, value)| format!("{name}={value}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The error for a start without `CAP_NET_ADMIN`, which the TUN device, its routes and the
/// rules need. Given at once, before the lease (an unprivileged start would otherwise hold a
/// subnet in the registry for a day) and without waiting for the registry or the config; but
/// registry options that do not fit together and a config that is there and invalid are named
/// first (exit 2 for any user). The look at the registry takes at most 5 s (an etcd out of
/// reach is not waited for).
async fn unprivileged(args: &RunArgs) -> anyhow::Error {
    let look = async {
        // As an admin command opens it: no plain-http warning before the real message.
        let r = registry::open(&args.registry, Duration::from_secs(args.lease_ttl)).await?;
        r.get_network_config().await?;
        Ok::<_, anyhow::Error>(())
    };
    if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(5), look).await
        && crate::cli::exit::code_for(&e) == crate::cli::exit::USAGE
    {
        return e;
    }
    anyhow::anyhow!(
        "linen run needs CAP_NET_ADMIN to create the TUN device {} and its routes; run it as \
         root, and where capabilities are limited (a unit's CapabilityBoundingSet=, a \
         container) keep CAP_NET_ADMIN",
        args.tun
    )
}

/// Opens the registry, waiting while it is out of reach: etcd with authentication is
/// contacted at once (to get a token), and an etcd that is not up yet at boot is waited for, as
/// without authentication (where the first contact is [`wait_for_config`]'s). `None` when
/// stopped meanwhile.
async fn open_registry(
    args: &RunArgs,
    ops: &http::OpsServer,
    stop: &mut StopSignals,
) -> Result<Option<Arc<dyn Registry>>> {
    let mut logged = false;
    loop {
        let opened = stop
            .unless_stopped(registry::open_for_run(
                &args.registry,
                Duration::from_secs(args.lease_ttl),
            ))
            .await;
        let Some(opened) = opened else {
            return Ok(None);
        };
        match opened {
            Ok(r) => {
                ops.resolved();
                if args.registry.etcd_endpoints.is_empty() {
                    tracing::info!(registry = %r.location(), "using the directory registry");
                } else {
                    tracing::info!(endpoints = %r.location(), prefix = %args.registry.etcd_prefix, "using the etcd v3 registry");
                }
                return Ok(Some(r));
            }
            Err(e) if registry::out_of_reach(&e) => {
                ops.waiting(
                    registry::describe(&args.registry),
                    crate::cli::exit::describe(&e),
                );
                if !logged {
                    tracing::warn!(error = %crate::cli::exit::describe(&e), "waiting for the registry (retrying every second)");
                    logged = true;
                }
            }
            Err(e) => return Err(e),
        }
        if stop.pause(Duration::from_secs(1)).await {
            return Ok(None);
        }
    }
}

/// An invalid network config is read again for this long before the daemon exits 2 on it:
/// a config being written in place (`echo … > config`, an editor, `etcdctl put` of a first
/// draft) is invalid for a moment, and hosts waiting for it must not all stop then.
const INVALID_CONFIG_GRACE: Duration = Duration::from_secs(10);

/// The network config once the registry has one; `None` when stopped first.
async fn wait_for_config(
    registry: &dyn Registry,
    ops: &http::OpsServer,
    stop: &mut StopSignals,
) -> Result<Option<NetworkConfig>> {
    use crate::lease::RegistryError;
    let mut logged = false;
    let mut invalid_since: Option<std::time::Instant> = None;
    loop {
        let Some(read) = stop.unless_stopped(registry.get_network_config()).await else {
            return Ok(None);
        };
        if let Err(e) = &read {
            ops.waiting(registry.location(), e.to_string());
        }
        match read {
            Ok(c) => {
                if let Some(warning) = c.flanneld_refuses() {
                    tracing::warn!("{warning}");
                }
                // The lease and the iptables rules may still take a while: no past error
                // stands for them meanwhile in /healthz and /status.
                ops.resolved();
                return Ok(Some(c));
            }
            Err(e) if e.is_transient() || matches!(e, RegistryError::ConfigNotFound { .. }) => {
                invalid_since = None;
                if !logged {
                    tracing::warn!(error = %e, "waiting for the network config (retrying every second)");
                    logged = true;
                }
            }
            Err(e @ RegistryError::BadConfig { .. }) => match invalid_since {
                None => {
                    tracing::warn!(error = %e, "the network config is invalid; reading it again for {} s in case it is being written", INVALID_CONFIG_GRACE.as_secs());
                    invalid_since = Some(std::time::Instant::now());
                }
                Some(t) if t.elapsed() >= INVALID_CONFIG_GRACE => return Err(e.into()),
                Some(_) => tracing::debug!("the network config is still invalid"),
            },
            Err(e) => return Err(e.into()),
        }
        if stop.pause(Duration::from_secs(1)).await {
            return Ok(None);
        }
    }
}

/// SIGTERM and SIGINT, listened for from the daemon's start: a signal that arrives during
/// start-up ends it at once while it waits for the registry, the config or the lease, and is
/// otherwise kept and acted on at the next step that looks (at the latest once the daemon is
/// up).
struct StopSignals {
    term: Signal,
    int: Signal,
}

impl StopSignals {
    fn new() -> Result<StopSignals> {
        Ok(StopSignals {
            term: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
        })
    }

    /// Waits `d`, or less if a stop signal comes first: whether one came.
    async fn pause(&mut self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => false,
            () = self.recv() => true,
        }
    }

    /// `fut`'s output, or `None` when a stop signal comes first (`fut` is then dropped: a
    /// registry request is abandoned, and a blocking one runs on to its end unwaited for).
    async fn unless_stopped<T>(&mut self, fut: impl Future<Output = T>) -> Option<T> {
        tokio::select! {
            v = fut => Some(v),
            () = self.recv() => None,
        }
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }

    /// Once the daemon is on its way out: a (further) stop signal ends the process at once
    /// (exit code 130), for an operator who does not want to wait for the rest of the stop
    /// (a start stopped before its iptables rules were in place removes what it added, which
    /// waits up to 15 s for the xtables lock). What that skips
    /// is what a crash skips: the lease is kept anyway, the TUN device goes with the process,
    /// and the next start takes over the rules. A command still running (an `iptables -w`
    /// waiting for the lock) is killed first, so that it cannot change the rules later.
    fn exit_on_next(mut self) {
        tokio::spawn(async move {
            self.recv().await;
            tracing::warn!(
                "a stop signal while stopping: exiting now, without finishing the stop (the \
                 next start takes over any iptables rules left behind)"
            );
            // Blocks the runtime for a moment: it has nothing left to do.
            let left = masq::stop_commands(Duration::from_millis(500));
            if left > 0 {
                tracing::warn!(commands = left, "iptables commands still running at exit");
            }
            std::process::exit(crate::cli::exit::INTERRUPTED);
        });
    }
}

#[cfg(test)]
mod test {
    use super::*;

    /// An advertised IPv6 address of the underlay that failed duplicate address detection is
    /// refused at start, also when `--public-ipv6` named it; a tentative one, another
    /// interface's and one DAD never ran on pass.
    #[test]
    fn an_advertised_ipv6_address_that_failed_detection_is_refused() {
        let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap();
        let underlay = host::Underlay {
            name: "eth0".into(),
            index: 2,
            mtu: 1500,
            ipv4: None,
            ipv6: Some(v6("fd00:18::2")),
            dad_v6: vec![
                (v6("fd00:18::7"), host::Dad::Failed),
                (v6("fd00:18::9"), host::Dad::Tentative),
            ],
        };
        for given in [false, true] {
            let err = check_ipv6_dad(Some(v6("fd00:18::7")), given, &underlay).unwrap_err();
            let fix = if given {
                "pass --public-ipv6 an address that passed it"
            } else {
                "give the interface another one"
            };
            assert!(
                err.to_string().starts_with(&format!(
                    "the IPv6 address fd00:18::7 on eth0 failed duplicate address detection \
                     (another node on the link claims it): {fix}"
                )),
                "{err}"
            );
            for fine in [
                None,
                Some("fd00:18::9"),
                Some("fd00:18::2"),
                Some("fd00:99::7"),
            ] {
                check_ipv6_dad(fine.map(v6), given, &underlay).unwrap();
            }
        }
    }

    /// After a follow, the addresses sent from are watched, and a local `--public-ip` one
    /// stays watched (reported while gone) though the source no longer holds it.
    #[test]
    fn a_given_address_stays_watched_after_the_other_family_is_followed() {
        let given: Ipv4Addr = "198.18.0.2".parse().unwrap();
        let follow = Follow {
            choice: host::InterfaceChoice::default(),
            given: (Some(given), None),
            interface: "eth0".into(),
            mtu: 1500,
        };
        let (old6, new6): (Ipv6Addr, Ipv6Addr) = (
            "fd00:18::2".parse().unwrap(),
            "fd00:18::12".parse().unwrap(),
        );
        let before = [IpAddr::V4(given), IpAddr::V6(old6)];
        let source = Source {
            v4: None,
            v6: Some(new6),
        };
        assert_eq!(
            follow.watched_after(&before, source),
            [IpAddr::V6(new6), IpAddr::V4(given)]
        );
        let sent_from_both = Source {
            v4: Some(given),
            v6: Some(new6),
        };
        assert_eq!(
            follow.watched_after(&before, sent_from_both),
            [IpAddr::V4(given), IpAddr::V6(new6)]
        );
    }

    #[test]
    fn the_receive_buffer_grows_to_the_maximum_given_or_a_default_at_least_the_start() {
        let mib = |n: usize| n << 20;
        assert_eq!(receive_buffer(mib(4), None).unwrap(), (mib(4), mib(16)));
        // A start set above the default maximum (before the maximum existed) still starts.
        assert_eq!(receive_buffer(mib(32), None).unwrap(), (mib(32), mib(32)));
        assert_eq!(
            receive_buffer(mib(4), Some(mib(4))).unwrap(),
            (mib(4), mib(4))
        );
        assert_eq!(
            receive_buffer(mib(4), Some(mib(64))).unwrap(),
            (mib(4), mib(64))
        );
        assert!(receive_buffer(mib(8), Some(mib(4))).is_err());
    }

    #[test]
    fn udp_gso_is_left_off_where_asked_and_on_kernels_that_corrupt_it() {
        let (good, bad) = (Some((6, 18, 0)), Some((7, 0, 9)));
        assert!(send_with_udp_gso(Offload::Auto, false, good));
        assert!(send_with_udp_gso(Offload::Auto, false, None));
        assert!(!send_with_udp_gso(Offload::Auto, false, bad));
        assert!(send_with_udp_gso(Offload::On, false, bad));
        assert!(!send_with_udp_gso(Offload::Off, false, good));
        for choice in [Offload::Auto, Offload::On, Offload::Off] {
            assert!(!send_with_udp_gso(choice, true, good));
        }
    }

    #[test]
    fn udp_gro_is_left_off_where_asked_and_before_5_12() {
        let (new, old) = (Some((5, 12, 0)), Some((5, 11, 22)));
        assert!(receive_with_udp_gro(Offload::Auto, false, new));
        assert!(!receive_with_udp_gro(Offload::Auto, false, old));
        assert!(!receive_with_udp_gro(Offload::Auto, false, None));
        assert!(receive_with_udp_gro(Offload::On, false, old));
        assert!(!receive_with_udp_gro(Offload::Off, false, new));
        assert!(!receive_with_udp_gro(Offload::Auto, true, new));
    }

    /// Once the config comes, what was waited for no longer shows: /healthz said "starting
    /// (network config not found …)" until the daemon was up, through the lease and the
    /// iptables rules (up to 30 s per command under a held xtables lock), and /status showed
    /// the registry as not connected.
    #[tokio::test]
    async fn a_config_that_came_is_not_still_reported_missing() {
        let dir = tempfile::tempdir().unwrap();
        let registry = crate::lease::directory::DirectoryRegistry::new(dir.path());
        let ops = http::OpsServer::start(
            crate::cli::status::MetricsAddr::On("127.0.0.1:0".parse().unwrap()),
            None,
        )
        .await
        .unwrap();
        let get = || http::get_healthz(ops.local_addr().unwrap(), None);
        let mut stop = StopSignals::new().unwrap();
        let config = dir.path().join("config");
        let waited = wait_for_config(&registry, &ops, &mut stop);
        tokio::pin!(waited);
        // Reported while it is missing (looked at until it is, for up to 30 s: the daemon
        // reports it after its first look at the registry)…
        let during = tokio::select! {
            _ = &mut waited => panic!("a config before it was written"),
            body = async {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
                loop {
                    let body = get().await;
                    if body.contains("not found") || tokio::time::Instant::now() >= deadline {
                        break body;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            } => body,
        };
        assert!(during.contains("not found"), "{during}");
        std::fs::write(config, r#"{"Network":"198.19.0.0/16"}"#).unwrap();
        let got = waited.await.unwrap();
        assert!(got.is_some());
        // … and not after.
        let after = get().await;
        assert!(after.starts_with("HTTP/1.1 503"), "{after}");
        assert!(!after.contains("not found"), "{after}");
    }

    /// On a dual-stack host whose IPv4 address changed, a new IPv6 address still tentative is
    /// not advertised: the old one (deprecated, so that the new one is the one chosen) is
    /// kept while it is still there, and nothing is followed while it is gone too. Root, in a
    /// network namespace of its own thread.
    #[test]
    fn a_tentative_ipv6_address_is_not_followed_along_with_a_new_ipv4_one() {
        host::test::in_own_namespace(|ip, runtime| {
            ip("addr add 198.18.0.12/24 dev lt0");
            // Deprecated: the tentative one is then the interface's first lasting address.
            ip("-6 addr add fd00:18::2/64 dev lt0 nodad preferred_lft 0");
            for (key, value) in [("accept_dad", "1"), ("dad_transmits", "50")] {
                std::fs::write(format!("/proc/sys/net/ipv6/conf/lt0/{key}"), value).unwrap();
            }
            // Fifty probes a second apart: tentative through the test.
            ip("-6 addr add fd00:18::12/64 dev lt0");
            let config = NetworkConfig::from_json(
                r#"{"Network":"198.19.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:19::/48"}"#,
            )
            .unwrap();
            let follow = Follow {
                choice: host::InterfaceChoice {
                    iface: vec!["lt0".into()],
                    ..host::InterfaceChoice::default()
                },
                given: (None, None),
                interface: "lt0".into(),
                mtu: 1500,
            };
            let current = attrs("198.18.0.2", "fd00:18::2");
            let v4: IpAddr = "198.18.0.2".parse().unwrap();
            let v6: IpAddr = "fd00:18::2".parse().unwrap();
            runtime.block_on(async {
                let nl = host::connect().unwrap();
                let (new, _) = follow_underlay(&nl, &follow, &config, &current, &[v4])
                    .await
                    .unwrap();
                assert_eq!(new.public_ip, Some("198.18.0.12".parse().unwrap()));
                assert_eq!(new.public_ipv6, current.public_ipv6);
                ip("-6 addr del fd00:18::2/64 dev lt0");
                let waiting = follow_underlay(&nl, &follow, &config, &current, &[v4, v6])
                    .await
                    .unwrap_err();
                assert!(
                    waiting.why.contains("fd00:18::12 is still tentative"),
                    "{waiting:?}"
                );
                // Looked at again within the second detection takes, not in 5 s.
                assert!(waiting.soon);
            });
        });
    }

    fn lease(key: &str, public_ip: &str) -> Lease {
        Lease {
            key: key.parse().unwrap(),
            attrs: LeaseAttrs::with_public_ip(public_ip.parse().unwrap()),
            expiration: None,
            lease_id: None,
        }
    }

    /// A peer's key is routed only when it is a subnet of the network, of the network's subnet
    /// length, with an address a datagram can go to: a hand-written `0.0.0.0-1` would
    /// otherwise take half of all addresses, and let its holder's datagrams carry any of them.
    #[test]
    fn only_subnets_of_the_network_with_a_usable_address_are_routed() {
        let config = NetworkConfig::from_json(
            r#"{"Network":"198.19.0.0/16","SubnetMin":"198.19.10.0","EnableIPv6":true,
                "IPv6Network":"fd00:19::/48"}"#,
        )
        .unwrap();
        let me = LeaseAttrs::with_public_ip("198.18.0.1".parse().unwrap());
        let ok = |key: &str, ip: &str| unroutable(&config, &me, &lease(key, ip));
        assert_eq!(ok("198.19.20.0-24&fd00:19:0:20::-64", "198.18.0.2"), None);
        // Below SubnetMin, as a reservation may be; and an IPv4-only key on a dual network.
        assert_eq!(ok("198.19.1.0-24", "198.18.0.2"), None);
        for (key, ip) in [
            ("0.0.0.0-1", "198.18.0.2"),
            ("198.19.0.0-16", "198.18.0.2"),
            ("198.19.20.0-25", "198.18.0.2"),
            ("10.0.0.0-24", "198.18.0.2"),
            ("198.19.20.0-24&::-1", "198.18.0.2"),
            ("198.19.20.0-24", "127.0.0.1"),
            ("198.19.20.0-24", "224.0.0.1"),
            ("198.19.20.0-24", "255.255.255.255"),
            // This host's own address.
            ("198.19.20.0-24", "198.18.0.1"),
        ] {
            assert!(ok(key, ip).is_some(), "{key} via {ip} routed");
        }
        // A family the network lacks is left alone (hosts restarting into an IPv4-only
        // config still hold dual-stack keys).
        let v4_only = NetworkConfig::from_json(r#"{"Network":"198.19.0.0/16"}"#).unwrap();
        assert_eq!(
            unroutable(
                &v4_only,
                &me,
                &lease("198.19.20.0-24&fd00:19:0:20::-64", "198.18.0.2")
            ),
            None
        );
    }

    /// Attributes with either address or both ("" for none).
    fn attrs(v4: &str, v6: &str) -> LeaseAttrs {
        LeaseAttrs {
            public_ip: (!v4.is_empty()).then(|| v4.parse().unwrap()),
            public_ipv6: (!v6.is_empty()).then(|| v6.parse().unwrap()),
            ..LeaseAttrs::default()
        }
    }

    #[test]
    fn an_unusable_public_address_is_no_next_hop() {
        let mut l = lease("198.19.20.0-24&fd00:19:0:20::-64", "127.0.0.1");
        l.attrs.public_ipv6 = Some("fd00:18::2".parse().unwrap());
        let routes = routes_for(&attrs("198.18.0.1", "fd00:18::1"), &[l], 8285);
        let hop: SocketAddr = "[fd00:18::2]:8285".parse().unwrap();
        assert_eq!(routes.len(), 2, "{routes:?}");
        assert!(routes.iter().all(|r| r.next_hop == hop), "{routes:?}");
    }

    /// In a dual-stack overlay, a host that advertises only an IPv4 underlay address (its
    /// IPv6 address came up after the daemon started) and a peer with both send each other's
    /// IPv6 subnets over IPv4, both ways: each end's sender check then accepts the other's
    /// datagrams. Before, the dual-stack peer sent from its IPv4 address and was refused as
    /// spoofed, and the IPv4-only host tried to send to the peer's IPv6 address.
    #[test]
    fn two_hosts_carry_each_overlay_family_over_an_underlay_family_both_have() {
        let a = Lease {
            attrs: attrs("198.18.0.1", ""),
            ..lease("198.19.1.0-24&fd00:19:0:1::-64", "198.18.0.1")
        };
        let b = Lease {
            attrs: attrs("198.18.0.2", "fd00:18::2"),
            ..lease("198.19.2.0-24&fd00:19:0:2::-64", "198.18.0.2")
        };
        let snap = |own: &Lease, peer: &Lease| {
            let peers = std::slice::from_ref(peer);
            snapshot_for(&own.key, &own.attrs, peers, 8285, 1, Source::default())
        };
        let (at_a, at_b) = (snap(&a, &b), snap(&b, &a));
        let (a6, b6): (IpAddr, IpAddr) = (
            "fd00:19:0:1::5".parse().unwrap(),
            "fd00:19:0:2::5".parse().unwrap(),
        );
        // Each end sends the other's IPv6 subnet to its IPv4 address…
        let hop = |snap: &Snapshot, dst| snap.lookup(dst).map(|e| e.next_hop);
        assert_eq!(hop(&at_a, b6), Some("198.18.0.2:8285".parse().unwrap()));
        assert_eq!(hop(&at_b, a6), Some("198.18.0.1:8285".parse().unwrap()));
        // …and takes the other's datagrams from there as the owner's.
        assert!(at_b.sender_owns("198.18.0.1".parse().unwrap(), a6));
        assert!(at_a.sender_owns("198.18.0.2".parse().unwrap(), b6));
        // But not from the IPv6 address, which the pair does not use.
        assert!(!at_a.sender_owns("fd00:18::2".parse().unwrap(), b6));
        // Two dual-stack hosts keep each family on its own underlay family.
        let c = Lease {
            attrs: attrs("198.18.0.3", "fd00:18::3"),
            ..lease("198.19.3.0-24&fd00:19:0:3::-64", "198.18.0.3")
        };
        let at_c = snap(&c, &b);
        assert_eq!(hop(&at_c, b6), Some("[fd00:18::2]:8285".parse().unwrap()));
        assert_eq!(
            hop(&at_c, "198.19.2.5".parse().unwrap()),
            Some("198.18.0.2:8285".parse().unwrap())
        );
    }

    /// A peer whose addresses are all of a family this host does not advertise gets no route,
    /// with a reason that says what to do.
    #[test]
    fn a_peer_without_an_underlay_family_in_common_is_not_routed() {
        let config = NetworkConfig::from_json(r#"{"Network":"198.19.0.0/16"}"#).unwrap();
        let v6_only = Lease {
            attrs: attrs("", "fd00:18::2"),
            ..lease("198.19.2.0-24", "198.18.0.2")
        };
        let why = unroutable(&config, &attrs("198.18.0.1", ""), &v6_only).unwrap();
        assert!(why.contains("--public-ipv6"), "{why}");
        assert_eq!(
            unroutable(&config, &attrs("198.18.0.1", "fd00:18::1"), &v6_only),
            None
        );
        assert!(routes_for(&attrs("198.18.0.1", ""), &[v6_only], 8285).is_empty());
    }
}
