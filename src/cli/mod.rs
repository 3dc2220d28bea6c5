//! The command line: clap definitions (every flag with a `LINEN_*` environment fallback),
//! validation into typed options, and the admin commands. `main.rs` only parses and dispatches.

pub mod admin;
pub mod compat;
pub mod exit;
pub mod status;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use tracing_subscriber::filter::{LevelFilter, Targets};

/// linen: a flannel-compatible userspace UDP overlay (flannel's udp backend, port 8285).
#[derive(Debug, Parser)]
#[command(name = "linen", version, about, long_about = None)]
pub struct Cli {
    /// Log level: error, warn, info, debug or trace, or target=level pairs with an optional
    /// default level for the rest (info if none is given), such as `linen=debug,warn`.
    #[arg(
        long,
        global = true,
        env = "LINEN_LOG_LEVEL",
        default_value = "info",
        display_order = 900
    )]
    pub log_level: String,
    /// Log format.
    #[arg(long, global = true, env = "LINEN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, display_order = 901)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Parses the process's arguments, taking flanneld's spellings too ([`compat`]); exits with
    /// clap's message and status 2 on bad flags.
    pub fn parse_with_flannel_compat() -> Cli {
        let cmd = compat::flanneld_env(Cli::command(), |k| std::env::var_os(k));
        let args = compat::double_dash(std::env::args_os().collect(), &cmd);
        let matches = match cmd.clone().try_get_matches_from(&args) {
            Ok(m) => m,
            Err(e) => {
                let source = compat::value_from_env(&e, &cmd, &args, |k| std::env::var_os(k));
                let _ = e.print();
                if let Some(var) = source {
                    eprintln!(
                        "\nThe value comes from the environment variable {var} (the flag is not \
                         on the command line): fix or unset {var}."
                    );
                }
                std::process::exit(e.exit_code());
            }
        };
        let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        if let Some(registry) = cli.command.registry_mut() {
            registry.normalize();
        }
        cli
    }
}

impl Command {
    /// The registry flags of a command that has them.
    pub fn registry_mut(&mut self) -> Option<&mut RegistryArgs> {
        match self {
            Command::Run(args) => Some(&mut args.registry),
            Command::Network(NetworkCommand::Init(args)) => Some(&mut args.registry),
            Command::Network(NetworkCommand::Show { registry, .. })
            | Command::Lease(
                LeaseCommand::List { registry, .. }
                | LeaseCommand::Reserve { registry, .. }
                | LeaseCommand::Release { registry, .. },
            ) => Some(registry),
            Command::Status(_) | Command::Bench(_) | Command::Demo(_) => None,
        }
    }
}

/// Log output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A UDP offload switch (`--udp-gso`, `--udp-gro`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Offload {
    /// Where the kernel has it, except on kernels whose implementation is known to be broken
    /// (see the flag).
    Auto,
    /// Where the kernel has it, on every version.
    On,
    /// Never.
    Off,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the overlay on this host (needs root): lease a subnet, create the TUN device, forward.
    // A flag given twice keeps its last value, as in flanneld (Go's flag package): unit files
    // write `-ip-masq $FLANNEL_OPTS` with the options' own -ip-masq=false after it.
    #[command(after_help = compat::run_after_help(), args_override_self = true)]
    Run(Box<RunArgs>),
    /// Create or show the network config in the registry.
    #[command(subcommand)]
    Network(NetworkCommand),
    /// List, reserve or release subnet leases in the registry.
    #[command(subcommand)]
    Lease(LeaseCommand),
    /// Show the local daemon's lease, peers and counters (asks its --metrics-addr); exits 1
    /// when it is unhealthy or does not answer.
    Status(status::StatusArgs),
    /// Benchmark linen against the raw veth and kernel VXLAN between two namespace hosts, each
    /// measurement on every path in turn; prints each round on stderr and the medians as a
    /// table; removes everything afterwards, also on Ctrl-C (root).
    Bench(crate::bench::BenchArgs),
    /// Show linen working: three namespace hosts, pings between all, throughput against kernel
    /// VXLAN; removes everything afterwards, also on Ctrl-C (root).
    Demo(crate::demo::DemoArgs),
}

/// Where the registry is: the embedded directory store (default) or etcd v3.
#[derive(Clone, Debug, Args)]
pub struct RegistryArgs {
    /// Directory of the embedded registry (used unless --etcd-endpoints is given).
    #[arg(long, env = "LINEN_REGISTRY_DIR", default_value = DEFAULT_REGISTRY_DIR, value_parser = path_or_empty)]
    pub registry_dir: PathBuf,
    /// Comma-separated etcd v3 endpoints (e.g. http://127.0.0.1:2379); selects the etcd
    /// registry. The other --etcd-* flags need it: linen has no default endpoint (flanneld's
    /// is http://127.0.0.1:4001,http://127.0.0.1:2379), and without it uses the directory
    /// registry.
    #[arg(
        long,
        env = "LINEN_ETCD_ENDPOINTS",
        value_delimiter = ',',
        action = clap::ArgAction::Set,
        overrides_with = "etcd_endpoints"
    )]
    pub etcd_endpoints: Vec<String>,
    /// etcd key prefix, as flannel's -etcd-prefix.
    #[arg(long, env = "LINEN_ETCD_PREFIX", default_value = crate::model::DEFAULT_PREFIX)]
    pub etcd_prefix: String,
    /// CA certificate file for etcd TLS (default: the system trust store, for https:// endpoints).
    #[arg(long, env = "LINEN_ETCD_CAFILE", value_parser = path_or_empty)]
    pub etcd_cafile: Option<PathBuf>,
    /// Client certificate file for etcd TLS.
    #[arg(long, env = "LINEN_ETCD_CERTFILE", value_parser = path_or_empty)]
    pub etcd_certfile: Option<PathBuf>,
    /// Client key file for etcd TLS.
    #[arg(long, env = "LINEN_ETCD_KEYFILE", value_parser = path_or_empty)]
    pub etcd_keyfile: Option<PathBuf>,
    /// etcd user name.
    #[arg(long, env = "LINEN_ETCD_USERNAME")]
    pub etcd_username: Option<String>,
    /// etcd password. A flag shows in `ps`: prefer --etcd-password-file, or this variable
    /// in an environment file only root can read.
    #[arg(long, env = "LINEN_ETCD_PASSWORD", hide_env_values = true)]
    pub etcd_password: Option<String>,
    /// File holding the etcd password (its content but one final line end; only root should
    /// be able to read it). Instead of --etcd-password: both is an error (clap's own conflict
    /// check would also count an empty variable of either as given).
    #[arg(
        long,
        env = "LINEN_ETCD_PASSWORD_FILE",
        value_parser = path_or_empty
    )]
    pub etcd_password_file: Option<PathBuf>,
}

/// Where `linen run` writes subnet.env unless `--subnet-file` says otherwise.
pub const DEFAULT_SUBNET_FILE: &str = "/run/linen/subnet.env";

/// Where the directory registry is unless `--registry-dir` says otherwise.
pub const DEFAULT_REGISTRY_DIR: &str = "/var/lib/linen";

impl RegistryArgs {
    /// Takes empty values as not given, as the README says of every etcd variable: an
    /// environment file's `LINEN_ETCD_ENDPOINTS=` selects the directory registry (it selected
    /// etcd at the endpoint ""), `LINEN_ETCD_PREFIX=` is flannel's prefix (the config was
    /// looked for at `/config`), `LINEN_REGISTRY_DIR=` the default directory. A list with a
    /// comma (`a,,b`, `,`) stays, for the stray comma to be reported.
    pub fn normalize(&mut self) {
        if self.etcd_endpoints == [""] {
            self.etcd_endpoints.clear();
        }
        if self.etcd_prefix.is_empty() {
            self.etcd_prefix = crate::model::DEFAULT_PREFIX.to_owned();
        }
        if self.registry_dir.as_os_str().is_empty() {
            self.registry_dir = PathBuf::from(DEFAULT_REGISTRY_DIR);
        }
    }

    /// A file flag's value, where an empty one (`LINEN_ETCD_CAFILE=` in an environment file)
    /// counts as not given, as the README says of every etcd variable.
    pub fn file(value: &Option<PathBuf>) -> Option<PathBuf> {
        value.clone().filter(|p| !p.as_os_str().is_empty())
    }
}

/// A path, or nothing: clap's own path parser refuses an empty value, which
/// [`RegistryArgs::file`] then reads as not given.
fn path_or_empty(s: &str) -> Result<PathBuf, String> {
    Ok(PathBuf::from(s))
}

/// `linen run`.
#[derive(Clone, Debug, Args)]
pub struct RunArgs {
    /// Registry location.
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Underlay interface, by name (an alternative name counts, as in `ip link`) or by one of
    /// its addresses. Repeatable (or comma-separated),
    /// as flannel's `-iface`: the first that exists on this host wins, so one unit file can
    /// serve hosts whose interfaces are named differently. Default: the interface holding
    /// --public-ip (or --public-ipv6; not lo), else the default route's (IPv4, else IPv6),
    /// else the only interface with an address peers could use (IPv6 link-local ones do not count).
    #[arg(long, env = "LINEN_IFACE", value_delimiter = ',', value_parser = parse_iface)]
    pub iface: Vec<String>,
    /// Underlay interface by pattern, as flannel's `-iface-regex`: each pattern (repeatable, not
    /// comma-separated) is matched, unanchored, against every interface's addresses and then
    /// against the names (not the alternative names, as flannel); the first that matches wins,
    /// and a matched address is advertised. Checked after --iface.
    #[arg(long, env = "LINEN_IFACE_REGEX", value_name = "REGEX", value_parser = parse_regex)]
    pub iface_regex: Vec<regex_lite::Regex>,
    /// Underlay interface: the one the route to this address leaves through, advertising the
    /// route's source address, as flannel's `-iface-can-reach` (a temporary or deprecated IPv6
    /// source gives way to the interface's lasting address). Checked after --iface and
    /// --iface-regex.
    #[arg(long, env = "LINEN_IFACE_CAN_REACH", value_name = "IP")]
    pub iface_can_reach: Option<IpAddr>,
    /// IPv4 address advertised in the lease (this host's identity; default: the interface's).
    #[arg(long, env = "LINEN_PUBLIC_IP", value_parser = parse_public_ipv4)]
    pub public_ip: Option<Ipv4Addr>,
    /// IPv6 address advertised in the lease (default: the interface's global IPv6 address, when
    /// the network config enables IPv6 or the underlay has no IPv4 address).
    #[arg(long, env = "LINEN_PUBLIC_IPV6", value_parser = parse_public_ipv6)]
    pub public_ipv6: Option<Ipv6Addr>,
    /// TUN device name.
    #[arg(long, env = "LINEN_TUN", default_value = "linen0", value_parser = parse_ifname)]
    pub tun: String,
    /// Overlay MTU (default: underlay MTU − 28, or − 48 whenever the host advertises an IPv6
    /// underlay address, since IPv6 overlay traffic then travels over IPv6).
    #[arg(long, env = "LINEN_MTU", value_parser = clap::value_parser!(u16).range(576..=65_000))]
    pub mtu: Option<u16>,
    /// Where to write flannel's subnet.env.
    #[arg(
        long,
        env = "LINEN_SUBNET_FILE",
        default_value = DEFAULT_SUBNET_FILE
    )]
    pub subnet_file: PathBuf,
    /// Renew the lease this many minutes before it expires, 1 to 1439 (flannel's default and
    /// range).
    #[arg(long, env = "LINEN_SUBNET_LEASE_RENEW_MARGIN", default_value_t = 60,
          value_parser = clap::value_parser!(u32).range(1..=1439))]
    pub subnet_lease_renew_margin: u32,
    /// Forwarding threads, each with its own TUN queue and UDP socket (default: one per core).
    #[arg(long, env = "LINEN_WORKERS", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub workers: Option<u16>,
    /// Accept datagrams from addresses that hold no lease (peers behind NAT). The inner source
    /// must still lie inside a leased subnet.
    #[arg(long, env = "LINEN_ACCEPT_UNKNOWN_SENDERS", default_value_t = false, value_name = "BOOL",
          num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub accept_unknown_senders: bool,
    /// Install flannel's masquerade rules (iptables chain LINEN-POSTRTG in table nat; ip6tables
    /// too when the network has IPv6): traffic from the overlay to outside it leaves with this
    /// host's address. Re-checked every --iptables-resync seconds, and left in place by a stop,
    /// as flanneld leaves its rules (the next start takes them over; README, "Uninstalling",
    /// says how to remove them).
    #[arg(long, env = "LINEN_IP_MASQ", value_name = "BOOL", default_value_t = false,
          num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub ip_masq: bool,
    /// Install flannel's FORWARD accept rules for the overlay network (iptables chain LINEN-FWD
    /// in table filter, jumped to from FORWARD; ip6tables too when the network has IPv6), so
    /// that a host whose FORWARD policy is DROP (Docker sets it) still forwards between its
    /// containers and the overlay. On by default, as in flannel; `--iptables-forward-rules=false`
    /// turns them off. Without the iptables command linen warns and runs without them.
    #[arg(long, env = "LINEN_IPTABLES_FORWARD_RULES", value_name = "BOOL",
          default_value_t = true, num_args = 0..=1, default_missing_value = "true",
          action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub iptables_forward_rules: bool,
    /// Seconds between checks that the iptables rules are still in place (flannel's
    /// `-iptables-resync`); a missing rule is put back at the next check.
    #[arg(long, env = "LINEN_IPTABLES_RESYNC", value_name = "SECONDS", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=86_400))]
    pub iptables_resync: u32,
    /// Masquerade without `--random-fully` even where iptables has it (flannel's
    /// `-ip-masq-fully-random-disable`).
    #[arg(long, env = "LINEN_IP_MASQ_FULLY_RANDOM_DISABLE", value_name = "BOOL",
          default_value_t = false, num_args = 0..=1, default_missing_value = "true",
          action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub ip_masq_fully_random_disable: bool,
    /// Microseconds a worker may poll instead of sleeping after sparse traffic woke it (0:
    /// always sleep at once). A reply caught while polling saves a thread wakeup, which costs
    /// tens of µs on a VM. Each sleep of 2 ms or more earns 1/16 of its length in polling, up to
    /// this, so a steady flow polls only after a quiet gap and polling takes at most 1/16 of a
    /// worker's time (README, "Latency").
    #[arg(long, env = "LINEN_BUSY_POLL_US", default_value_t = 500,
          value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub busy_poll_us: u32,
    /// Send every datagram from the overlay port (8285) as flannel does, instead of one
    /// source port per worker from ip_local_port_range (the port modulo 256 names the worker,
    /// so a peer receives each worker's flows on one of its workers and answers through the
    /// same one). Only needed where firewalls match the source port.
    #[arg(long, env = "LINEN_FIXED_SOURCE_PORT", default_value_t = false, value_name = "BOOL",
          num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub fixed_source_port: bool,
    /// Turn off TUN offloads and UDP GSO/GRO (for comparison or buggy kernels).
    #[arg(long, env = "LINEN_NO_OFFLOAD", default_value_t = false, value_name = "BOOL",
          num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub no_offload: bool,
    /// Send each peer's datagrams in one system call with UDP GSO: `auto` uses it where the
    /// kernel has it except on Linux 7.0.0 to 7.1.4, whose UDP GSO mangles datagrams with some
    /// network drivers (fixed in 7.1.5; `on` for a kernel that has the fix backported, or a
    /// driver known to be spared). Receiving with UDP GRO and the TUN offloads do not depend
    /// on it; `--no-offload` turns it off too (and refuses `--udp-gso on`).
    #[arg(long, env = "LINEN_UDP_GSO", value_enum, default_value_t = Offload::Auto)]
    pub udp_gso: Offload,
    /// Receive many datagrams in one buffer with UDP GRO: `auto` where the kernel has it from
    /// Linux 5.12 (its UDP GRO had bugs before; wireguard-go does the same), `on` on every
    /// kernel that has it, `off` never (datagrams one per buffer, 32 per system call;
    /// consecutive segments of a flow are still written to the TUN as one). `--no-offload`
    /// turns it off too (and refuses `--udp-gro on`).
    #[arg(long, env = "LINEN_UDP_GRO", value_enum, default_value_t = Offload::Auto)]
    pub udp_gro: Offload,
    /// UDP socket buffer size in bytes (SO_SNDBUF/SO_RCVBUF, forced when root).
    #[arg(long, env = "LINEN_SOCKET_BUFFER", default_value_t = 4 << 20)]
    pub socket_buffer: usize,
    /// The most a worker's UDP receive buffer grows to, in bytes: each time the kernel drops
    /// datagrams at a full one (the worker off its CPU on a busy host), it doubles, up to
    /// this. Pass --socket-buffer's value to keep the buffer fixed. Overflows are counted
    /// (`linen_udp_receive_overflows_total`). [default: 16777216 (16 MiB), or --socket-buffer
    /// when that is larger]
    #[arg(long, env = "LINEN_SOCKET_BUFFER_MAX")]
    pub socket_buffer_max: Option<usize>,
    /// Serve /metrics (Prometheus), /healthz and /status on this IP:PORT, or `off`.
    #[arg(long, env = "LINEN_METRICS_ADDR", default_value = status::DEFAULT_METRICS_ADDR)]
    pub metrics_addr: status::MetricsAddr,
    /// Address for --healthz-port (flannel's `-healthz-ip`).
    #[arg(
        long,
        env = "LINEN_HEALTHZ_IP",
        value_name = "IP",
        default_value = "0.0.0.0"
    )]
    pub healthz_ip: IpAddr,
    /// Serve `GET /healthz` alone on --healthz-ip and this port, for probes from outside the
    /// host (flannel's `-healthz-port`; 0: off). 200 "ok" while the daemon forwards, 503
    /// "unhealthy" otherwise: also while it waits for the network config or its lease, where
    /// flannel answers 200 as long as it runs. --metrics-addr serves it too, with the reason.
    #[arg(
        long,
        env = "LINEN_HEALTHZ_PORT",
        value_name = "PORT",
        default_value_t = 0
    )]
    pub healthz_port: u16,
    /// Lease TTL in seconds for new leases, on either registry (flannel: 86400, fixed; shorter
    /// values are for tests and demos).
    #[arg(long, env = "LINEN_LEASE_TTL", default_value_t = 86_400, hide = true,
          value_parser = clap::value_parser!(u64).range(1..=9_000_000_000))]
    pub lease_ttl: u64,
}

impl RunArgs {
    /// Where `/healthz` alone is served (`None`: --healthz-port 0).
    pub fn healthz_addr(&self) -> Option<std::net::SocketAddr> {
        (self.healthz_port != 0).then(|| (self.healthz_ip, self.healthz_port).into())
    }

    /// The interface flags, for [`crate::daemon::host::discover_underlay`].
    pub fn interface_choice(&self) -> crate::daemon::host::InterfaceChoice {
        crate::daemon::host::InterfaceChoice {
            iface: self.iface.clone(),
            regex: self.iface_regex.clone(),
            can_reach: self.iface_can_reach,
        }
    }
}

/// A Linux interface name: 1 to 15 bytes, no `/`, `:` or whitespace, not `.` or `..`.
fn parse_ifname(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 15
        && s != "."
        && s != ".."
        && !s.chars().any(|c| c == '/' || c == ':' || c.is_whitespace());
    if s.contains('%') {
        // The kernel would number a template such as flannel's `flannel%d` (`flannel0`), and
        // linen would then look for a device by the template's name.
        Err(
            "'%' makes a name template (flannel's flannel%d); give the name itself, such as \
             flannel0"
                .to_owned(),
        )
    } else if ok {
        Ok(s.to_owned())
    } else {
        Err("an interface name is 1 to 15 bytes without '/', ':' or spaces".to_owned())
    }
}

/// A public IP: the address peers send to, so one this host can be reached at. The
/// unspecified, loopback, multicast and broadcast addresses (and IPv6 link-local ones, which
/// need a zone) are refused: flannel's lease format reads 0.0.0.0 as no address, so the
/// daemon would write a lease it cannot read back, and the others reach no peer.
fn parse_public_ip(s: &str) -> Result<IpAddr, String> {
    let ip: IpAddr = s
        .parse()
        .map_err(|_| format!("{s:?} is not an IP address"))?;
    match unreachable_reason(ip) {
        None => Ok(ip),
        Some(why) => Err(format!(
            "{ip} is {why}; give an address of this host that the other hosts can reach"
        )),
    }
}

/// Why no peer could send to `ip` as a host's public address, if so.
pub(crate) fn unreachable_reason(ip: IpAddr) -> Option<&'static str> {
    Some(match ip {
        a if a.is_unspecified() => "unspecified",
        a if a.is_loopback() => "a loopback address",
        a if a.is_multicast() => "a multicast address",
        IpAddr::V4(a) if a.is_broadcast() => "the broadcast address",
        IpAddr::V6(a) if a.is_unicast_link_local() => "link-local (it would need a zone)",
        // Datagrams to it travel over IPv4: the two ends would not agree on the family.
        IpAddr::V6(a) if a.to_ipv4_mapped().is_some() => {
            "an IPv4 address written as IPv6 (give it as IPv4, --public-ip)"
        }
        _ => return None,
    })
}

fn parse_public_ipv4(s: &str) -> Result<Ipv4Addr, String> {
    match parse_public_ip(s)? {
        IpAddr::V4(a) => Ok(a),
        IpAddr::V6(_) => Err(format!("{s} is IPv6; use --public-ipv6")),
    }
}

fn parse_public_ipv6(s: &str) -> Result<Ipv6Addr, String> {
    match parse_public_ip(s)? {
        IpAddr::V6(a) => Ok(a),
        IpAddr::V4(_) => Err(format!("{s} is IPv4; use --public-ip")),
    }
}

fn parse_iface(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        return Err(
            "an interface name or address is needed (an empty one, or a stray comma?)".into(),
        );
    }
    Ok(s.to_owned())
}

fn parse_regex(s: &str) -> Result<regex_lite::Regex, String> {
    regex_lite::Regex::new(s).map_err(|e| format!("not a regular expression: {e}"))
}

/// `linen network …`.
#[derive(Debug, Subcommand)]
pub enum NetworkCommand {
    /// Write the network config (validated as flannel validates it).
    Init(NetworkInitArgs),
    /// Print the network config, with the defaults linen uses filled in (the JSON form shows the
    /// stored fields only).
    Show {
        /// Registry location.
        #[command(flatten)]
        registry: RegistryArgs,
        /// Print the config as JSON only (the fields linen reads, with the backend type spelled
        /// out; keys it does not know are left out).
        #[arg(long)]
        json: bool,
    },
}

/// `linen network init`.
#[derive(Debug, Args)]
pub struct NetworkInitArgs {
    /// Registry location.
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// The IPv4 cluster network, e.g. 198.19.0.0/16.
    #[arg(long)]
    pub network: Option<String>,
    /// Prefix length of each host's subnet (default 24, or prefix + 2 for small networks).
    #[arg(long)]
    pub subnet_len: Option<u8>,
    /// First subnet that may be leased (default: the network's second subnet, as flannel).
    #[arg(long)]
    pub subnet_min: Option<Ipv4Addr>,
    /// Last subnet that may be leased (its start address; inclusive; default: the network's
    /// last subnet).
    #[arg(long)]
    pub subnet_max: Option<Ipv4Addr>,
    /// UDP port of the overlay (default 8285, as flannel).
    #[arg(long)]
    pub port: Option<u16>,
    /// The IPv6 cluster network (enables IPv6), e.g. fd00:19::/48.
    #[arg(long)]
    pub ipv6_network: Option<String>,
    /// Prefix length of each host's IPv6 subnet (default 64, or prefix + 2 for networks of
    /// /63 to /124).
    #[arg(long)]
    pub ipv6_subnet_len: Option<u8>,
    /// First IPv6 subnet that may be leased.
    #[arg(long)]
    pub ipv6_subnet_min: Option<Ipv6Addr>,
    /// Last IPv6 subnet that may be leased.
    #[arg(long)]
    pub ipv6_subnet_max: Option<Ipv6Addr>,
    /// IPv6 only: no IPv4 network (so no --network, which would be stored and never used).
    #[arg(long, conflicts_with = "network")]
    pub no_ipv4: bool,
    /// Replace an existing config.
    #[arg(long)]
    pub force: bool,
}

/// `linen lease …`.
#[derive(Debug, Subcommand)]
pub enum LeaseCommand {
    /// List the live leases.
    List {
        /// Registry location.
        #[command(flatten)]
        registry: RegistryArgs,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Reserve a subnet for a host: a lease without expiry, taken by the host whose public IP
    /// matches when linen next acquires there (a running host keeps its lease until it
    /// restarts or loses it).
    Reserve {
        /// Registry location.
        #[command(flatten)]
        registry: RegistryArgs,
        /// The subnet, as 198.19.5.0/24 or in key form 198.19.5.0-24.
        subnet: String,
        /// The host's public IP (its PublicIP, or PublicIPv6 on an IPv6-only network).
        #[arg(long, value_parser = parse_public_ip)]
        public_ip: IpAddr,
    },
    /// Delete a lease or reservation (a linen running on the lease's host takes it again at
    /// once; stop it first to move that host). Exits 1 when there is nothing to release.
    Release {
        /// Registry location.
        #[command(flatten)]
        registry: RegistryArgs,
        /// The subnet, as 198.19.5.0/24 or in key form 198.19.5.0-24.
        subnet: String,
    },
}

/// `--log-level`: a level, or comma-separated `target=level` pairs and an optional bare default
/// level. Parsed by tracing-subscriber's `Targets`, which needs no regex engine (dropping
/// `EnvFilter` took 0.6 MB off the binary; README "Memory" for what it did to RSS). As
/// `EnvFilter` did, spaces around directives and empty ones are ignored (`linen=debug, warn,`).
/// `Targets` takes any word that is not a level for a target to log at trace; here a bare word
/// must be a level, so a typo (`debg`) is an error rather than a daemon that logs nothing.
/// Without a bare level everything else logs at info, as by default: `Targets` would turn it
/// off, warnings and errors included.
pub fn log_filter(spec: &str) -> Result<Targets, String> {
    let mut directives: Vec<&str> = spec
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    if directives.is_empty() {
        return Err("it is empty".into());
    }
    let level_ok = |l: &str| !l.is_empty() && l.parse::<LevelFilter>().is_ok();
    for directive in &directives {
        match directive.split_once('=') {
            None if level_ok(directive) => {}
            None => return Err(format!("{directive:?} is not a level")),
            Some((target, level)) => {
                let path_like = !target.is_empty()
                    && target.split("::").all(|part| {
                        !part.is_empty()
                            && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    });
                if path_like && target.chars().any(|c| c.is_ascii_uppercase()) {
                    // Targets match case-sensitively, and every module path is lower-case:
                    // `LINEN=debug` would change nothing.
                    return Err(format!(
                        "{target:?} matches no target: targets are lower-case module paths; \
                         use {:?}",
                        target.to_ascii_lowercase()
                    ));
                }
                if !path_like {
                    return Err(format!(
                        "{target:?} is not a target: targets are module paths such as \
                         linen::lease (crate names with _, not -)"
                    ));
                }
                if !level_ok(level) {
                    return Err(format!("{level:?} in {directive:?} is not a level"));
                }
            }
        }
    }
    if directives.iter().all(|d| d.contains('=')) {
        directives.push("info");
    }
    directives
        .join(",")
        .parse::<Targets>()
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod log_filter_test {
    use super::log_filter;
    use tracing::Level;

    #[test]
    fn levels_and_targets_filter_as_written() {
        let f = log_filter("info").unwrap();
        assert!(f.would_enable("linen::daemon", &Level::INFO));
        assert!(!f.would_enable("linen::daemon", &Level::DEBUG));
        let f = log_filter("linen::lease=debug,warn").unwrap();
        assert!(f.would_enable("linen::lease::manager", &Level::DEBUG));
        assert!(!f.would_enable("linen::daemon", &Level::INFO));
        assert!(f.would_enable("h2", &Level::WARN));
        assert!(!f.would_enable("h2", &Level::INFO));
        assert!(log_filter("DEBUG").is_ok());
        // What EnvFilter accepted: spaces around directives, empty ones.
        let f = log_filter(" linen=debug, warn ,").unwrap();
        assert!(f.would_enable("linen::daemon", &Level::DEBUG));
        assert!(f.would_enable("h2", &Level::WARN));
        assert!(!f.would_enable("h2", &Level::INFO));
        // Targets alone leave the rest at info, not off.
        let f = log_filter("linen::cli=debug").unwrap();
        assert!(f.would_enable("linen::cli::admin", &Level::DEBUG));
        assert!(f.would_enable("linen::lease::directory", &Level::WARN));
        assert!(f.would_enable("linen::daemon", &Level::INFO));
        assert!(!f.would_enable("linen::daemon", &Level::DEBUG));
    }

    #[test]
    fn typos_and_garbage_are_errors() {
        for bad in [
            "",
            " , ",
            "debg",
            "[[",
            "linen=loud",
            "linen=",
            "=debug",
            "linen::=info",
            "my-crate=debug",
            "linen",
            "LINEN=debug",
            "linen::Lease=debug,info",
        ] {
            let err = log_filter(bad).expect_err(bad);
            assert!(!err.is_empty(), "{bad:?}");
        }
    }
}

#[cfg(test)]
mod flag_test {
    use super::{Cli, Command};
    use clap::Parser;

    /// `linen run <args>`'s options.
    fn run(args: &[&str]) -> Result<super::RunArgs, clap::Error> {
        let cli = Cli::try_parse_from(["linen", "run"].iter().chain(args))?;
        match cli.command {
            Command::Run(run) => Ok(*run),
            _ => unreachable!("parsed `run`"),
        }
    }

    /// `(ip_masq, iptables_forward_rules)` of `linen run <args>`.
    fn rules(args: &[&str]) -> Result<(bool, bool), clap::Error> {
        let cli = Cli::try_parse_from(["linen", "run"].iter().chain(args))?;
        match cli.command {
            Command::Run(run) => Ok((run.ip_masq, run.iptables_forward_rules)),
            _ => unreachable!("parsed `run`"),
        }
    }

    /// Empty registry values (from an environment file's `LINEN_ETCD_PREFIX=`) are the
    /// defaults; a list with a stray comma stays, for the registry to report it.
    #[test]
    fn empty_registry_values_are_the_defaults() {
        let mut cli = Cli::try_parse_from([
            "linen",
            "lease",
            "list",
            "--etcd-endpoints=",
            "--etcd-prefix=",
            "--registry-dir=",
        ])
        .unwrap();
        let r = cli.command.registry_mut().unwrap();
        r.normalize();
        assert!(r.etcd_endpoints.is_empty(), "{:?}", r.etcd_endpoints);
        assert_eq!(r.etcd_prefix, crate::model::DEFAULT_PREFIX);
        assert_eq!(
            r.registry_dir,
            std::path::Path::new(super::DEFAULT_REGISTRY_DIR)
        );
        for (given, kept) in [("a,,b", &["a", "", "b"][..]), (",", &["", ""])] {
            let mut cli = Cli::try_parse_from([
                "linen",
                "network",
                "show",
                &format!("--etcd-endpoints={given}"),
            ])
            .unwrap();
            let r = cli.command.registry_mut().unwrap();
            r.normalize();
            assert_eq!(r.etcd_endpoints, kept, "{given}");
        }
    }

    /// A flag given twice to `run` keeps its last value, as flanneld's do; a list flag
    /// (`--iface`) collects every one, as flanneld's `-iface` does.
    #[test]
    fn a_repeated_run_flag_keeps_its_last_value() {
        assert_eq!(
            rules(&["--ip-masq", "--ip-masq=false"]).unwrap(),
            (false, true)
        );
        let r = run(&[
            "--subnet-file=a",
            "--subnet-file=b",
            "--etcd-endpoints=http://a:2379,http://b:2379",
            "--etcd-endpoints=http://c:2379",
            "--iface=eth0",
            "--iface=eth1",
        ])
        .unwrap();
        assert_eq!(r.subnet_file, std::path::Path::new("b"));
        assert_eq!(r.registry.etcd_endpoints, ["http://c:2379"]);
        assert_eq!(r.iface, ["eth0", "eth1"]);
        let r = run(&["--etcd-endpoints=http://a:2379,http://b:2379"]).unwrap();
        assert_eq!(
            r.registry.etcd_endpoints,
            ["http://a:2379", "http://b:2379"]
        );
        // In the admin commands too, which are no flanneld's: the last list (before, both).
        let cli = Cli::try_parse_from([
            "linen",
            "lease",
            "list",
            "--etcd-endpoints=http://a:2379",
            "--etcd-endpoints=http://c:2379",
        ])
        .unwrap();
        let Command::Lease(super::LeaseCommand::List { registry, .. }) = cli.command else {
            unreachable!("parsed `lease list`")
        };
        assert_eq!(registry.etcd_endpoints, ["http://c:2379"]);
    }

    #[test]
    fn rule_flags_take_flannels_boolean_spellings() {
        assert_eq!(rules(&[]).unwrap(), (false, true), "flannel's defaults");
        assert_eq!(rules(&["--ip-masq"]).unwrap(), (true, true));
        for (arg, want) in [
            ("--ip-masq=true", (true, true)),
            ("--ip-masq=1", (true, true)),
            ("--ip-masq=false", (false, true)),
            ("--iptables-forward-rules=false", (false, false)),
            ("--iptables-forward-rules=0", (false, false)),
            ("--iptables-forward-rules=no", (false, false)),
            ("--iptables-forward-rules", (false, true)),
        ] {
            assert_eq!(rules(&[arg]).unwrap(), want, "{arg}");
        }
        // The value may follow as the next word; another flag is not taken for it.
        assert_eq!(
            rules(&["--iptables-forward-rules", "false"]).unwrap(),
            (false, false)
        );
        assert_eq!(
            rules(&["--ip-masq", "--iptables-forward-rules", "off"]).unwrap(),
            (true, false)
        );
        assert!(rules(&["--iptables-forward-rules=maybe"]).is_err());
    }

    /// linen's own switches take the same spellings as flannel's booleans, so a unit file
    /// written in flannel's `-flag=false` style does not stop at the first of them.
    #[test]
    fn linens_own_switches_take_boolean_values_too() {
        let switches =
            |r: super::RunArgs| (r.no_offload, r.accept_unknown_senders, r.fixed_source_port);
        assert_eq!(switches(run(&[]).unwrap()), (false, false, false));
        let all = [
            "--no-offload",
            "--accept-unknown-senders",
            "--fixed-source-port",
        ];
        assert_eq!(switches(run(&all).unwrap()), (true, true, true));
        for value in ["false", "0", "no", "off"] {
            let given: Vec<String> = all.iter().map(|f| format!("{f}={value}")).collect();
            let given: Vec<&str> = given.iter().map(String::as_str).collect();
            assert_eq!(
                switches(run(&given).unwrap()),
                (false, false, false),
                "{value}"
            );
        }
        assert_eq!(
            switches(run(&["--no-offload=true", "--fixed-source-port", "yes"]).unwrap()),
            (true, false, true)
        );
        assert!(run(&["--no-offload=maybe"]).is_err());
    }
}
