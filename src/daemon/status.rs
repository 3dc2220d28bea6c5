//! What a running daemon reports about itself: the [`Status`] document served as JSON on
//! `GET /status` (and rendered by `linen status`), the health decision behind `GET /healthz`,
//! and [`Sources`], the read-only handles it is built from on every request.
//!
//! Everything is read on demand — the lease state from the manager's watch channel, the table
//! with one `load_full`, the counters from each worker's published atomics — so nothing here
//! costs the data plane anything between requests.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::dataplane::{DropReason, LocalCounters, WorkerMonitor};
use crate::lease::manager::LeaseState;
use crate::model::Lease;
use crate::table::Table;

/// Read-only handles on a running daemon, handed to the metrics server once the data plane
/// runs.
#[derive(Clone, Debug)]
pub struct Sources {
    /// The host-side steps failing now.
    pub host: HostSteps,
    /// The lease manager's state.
    pub state: watch::Receiver<LeaseState>,
    /// The published forwarding table.
    pub table: Table,
    /// One monitor per worker started.
    pub workers: Vec<WorkerMonitor>,
    /// Where the registry is (directory path or etcd endpoints), for status output.
    pub registry: String,
}

/// Everything `linen status` shows; the JSON body of `GET /status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// linen's version.
    pub version: String,
    /// The `/healthz` decision.
    pub health: Health,
    /// This host's lease (`None` while starting or re-acquiring).
    pub lease: Option<LeaseView>,
    /// Every other host's lease.
    pub peers: Vec<LeaseView>,
    /// The forwarding table in use.
    pub table: TableView,
    /// The registry as the lease manager sees it.
    pub registry: RegistryView,
    /// Forwarding threads.
    pub workers: WorkersView,
    /// Packet counters summed over the workers.
    pub counters: CountersView,
    /// What each worker moved, in worker order: how flows spread over the workers.
    #[serde(default)]
    pub per_worker: Vec<WorkerTraffic>,
    /// The host-side steps failing now ([`HOST_STEPS`]), each with its error.
    #[serde(default)]
    pub host_failing: Vec<HostFailure>,
}

/// The steps on the host the daemon keeps in place after start, as [`HostSteps`] names them:
/// the TUN device (its move with the lease, and the periodic check), `subnet.env` (its rewrite
/// after a move), the iptables rules (their resync), the advertised underlay address (still
/// this host's, or followed to the interface's new one: failing while neither).
pub const HOST_STEPS: [&str; 4] = ["tun", "subnet_env", "iptables", "underlay"];

/// A host-side step failing now, and why.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFailure {
    /// One of [`HOST_STEPS`].
    pub step: String,
    /// Its last error.
    pub error: String,
}

/// Which host-side steps fail now: set by the tasks that retry them, read by `/status` and
/// `/metrics`. Cheap to clone (shared).
#[derive(Clone, Debug, Default)]
pub struct HostSteps(std::sync::Arc<std::sync::Mutex<BTreeMap<&'static str, String>>>);

impl HostSteps {
    /// Records step `step`'s state: its error while it fails, `None` once it works.
    pub fn set(&self, step: &'static str, error: Option<&String>) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match error {
            Some(e) => {
                map.insert(step, e.clone());
            }
            None => {
                map.remove(step);
            }
        }
    }

    /// The failing steps, in [`HOST_STEPS`] order.
    pub fn failing(&self) -> Vec<HostFailure> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        HOST_STEPS
            .iter()
            .filter_map(|step| {
                map.get(step).map(|e| HostFailure {
                    step: (*step).to_owned(),
                    error: e.clone(),
                })
            })
            .collect()
    }
}

/// One worker's share of the traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerTraffic {
    /// Packets read from its TUN queue (super-packets count once).
    pub tun_rx_packets: u64,
    /// Datagrams it sent to peers.
    pub udp_tx_packets: u64,
    /// Datagrams received on its UDP socket.
    pub udp_rx_packets: u64,
}

impl From<&LocalCounters> for WorkerTraffic {
    fn from(c: &LocalCounters) -> WorkerTraffic {
        WorkerTraffic {
            tun_rx_packets: c.tun_rx_packets,
            udp_tx_packets: c.udp_tx_packets,
            udp_rx_packets: c.udp_rx_packets,
        }
    }
}

/// Healthy, or why not.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Lease valid and every worker running.
    pub ok: bool,
    /// Why not, when not ok (several causes joined by "; ").
    pub reason: Option<String>,
}

/// A lease, with its expiry relative to the time the status was taken.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseView {
    /// The registry key, e.g. `198.19.1.0-24` (what `linen lease release` takes).
    pub subnet: String,
    /// The IPv4 subnet as CIDR.
    pub ipv4_subnet: Option<String>,
    /// The IPv6 subnet as CIDR.
    pub ipv6_subnet: Option<String>,
    /// The host's advertised IPv4 address.
    pub public_ip: Option<Ipv4Addr>,
    /// The host's advertised IPv6 address.
    pub public_ipv6: Option<Ipv6Addr>,
    /// A reservation: no expiry, never renewed.
    pub reservation: bool,
    /// Expiry as Unix seconds (`None` for a reservation).
    pub expires_unix: Option<u64>,
    /// Seconds from the status time to the expiry; zero or less means expired.
    pub expires_in_secs: Option<i64>,
}

impl LeaseView {
    /// The view of `lease` at time `now`.
    pub fn new(lease: &Lease, now: SystemTime) -> LeaseView {
        let expires_unix = lease.expiration.map(unix_secs);
        LeaseView {
            subnet: lease.key.to_string(),
            ipv4_subnet: lease.key.ipv4().map(|n| n.to_string()),
            ipv6_subnet: lease.key.ipv6().map(|n| n.to_string()),
            public_ip: lease.attrs.public_ip,
            public_ipv6: lease.attrs.public_ipv6,
            reservation: lease.is_reservation(),
            expires_unix,
            expires_in_secs: lease.expiration.map(|t| signed_secs_between(now, t)),
        }
    }

    /// Whether the lease has run out (a reservation never does).
    pub fn is_expired(&self) -> bool {
        self.expires_in_secs.is_some_and(|s| s <= 0)
    }
}

/// The forwarding table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableView {
    /// Routes to peers in the published snapshot.
    pub routes: usize,
    /// The lease-state generation the snapshot was built from.
    pub generation: u64,
}

/// The registry's health.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryView {
    /// Directory path or etcd endpoints.
    pub location: String,
    /// Whether the last registry call succeeded.
    pub connected: bool,
    /// The last failure (kept after recovery).
    pub last_error: Option<String>,
    /// While failing, seconds since the outage began; once connected again, seconds since it
    /// ended (`None`: no failure yet, or a starting daemon's reason; also when an older daemon
    /// left the field out).
    pub last_error_secs_ago: Option<u64>,
    /// Recoveries after a failure.
    pub resyncs: u64,
}

/// Forwarding threads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkersView {
    /// Workers started.
    pub configured: usize,
    /// Workers whose thread still runs.
    pub running: usize,
}

/// The four directions a packet is counted in, in path order, with what each means.
pub const DIRECTIONS: [(&str, &str); 4] = [
    ("tun_rx", "read from the TUN device"),
    ("udp_tx", "sent to peers"),
    ("udp_rx", "received from peers"),
    ("tun_tx", "written to the TUN device"),
];

/// Packets and bytes in one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    /// Packets (datagrams on the UDP side).
    pub packets: u64,
    /// Bytes (IP packet bytes; the UDP payload on the UDP side).
    pub bytes: u64,
}

/// Packet counters, summed over the workers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountersView {
    /// Traffic by direction, keyed by the names in [`DIRECTIONS`].
    pub traffic: BTreeMap<String, Traffic>,
    /// ICMP errors written back into the TUN device.
    pub icmp_sent: u64,
    /// Coalesced super-packets written to the TUN device, by protocol (`tcp`: TSO, `udp`: USO).
    #[serde(default)]
    pub coalesced: BTreeMap<String, u64>,
    /// UDP GSO sends: system calls that each carried several datagrams to one peer.
    #[serde(default)]
    pub udp_gso_sends: u64,
    /// Drops at the receiving sockets counted by the kernel, nearly always a full buffer (a
    /// GRO batch of datagrams may count as one; a bad UDP checksum counts too).
    #[serde(default)]
    pub udp_receive_overflows: u64,
    /// Drops by [`DropReason::name`], every reason present.
    pub drops: BTreeMap<String, u64>,
}

impl CountersView {
    /// Traffic in one direction of [`DIRECTIONS`] (zero when absent).
    pub fn traffic(&self, direction: &str) -> Traffic {
        self.traffic.get(direction).copied().unwrap_or_default()
    }
}

impl From<&LocalCounters> for CountersView {
    fn from(c: &LocalCounters) -> CountersView {
        let per_direction = [
            (c.tun_rx_packets, c.tun_rx_bytes),
            (c.udp_tx_packets, c.udp_tx_bytes),
            (c.udp_rx_packets, c.udp_rx_bytes),
            (c.tun_tx_packets, c.tun_tx_bytes),
        ];
        CountersView {
            traffic: DIRECTIONS
                .iter()
                .zip(per_direction)
                .map(|((name, _), (packets, bytes))| {
                    ((*name).to_owned(), Traffic { packets, bytes })
                })
                .collect(),
            icmp_sent: c.icmp_sent,
            coalesced: [("tcp", c.tun_tx_tso), ("udp", c.tun_tx_uso)]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            udp_gso_sends: c.udp_tx_gso,
            udp_receive_overflows: c.udp_rx_overflow,
            drops: DropReason::ALL
                .iter()
                .map(|r| (r.name().to_owned(), c.drops_for(*r)))
                .collect(),
        }
    }
}

/// What `/healthz` says before the data plane runs.
pub const STARTING: &str = "starting: waiting for the network config and a lease";

/// What a starting daemon is waiting for: the registry it asked and what that said.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Waiting {
    /// The registry (a directory, or etcd endpoints).
    pub location: String,
    /// Why it waits: the registry's error, or the missing or invalid config.
    pub reason: String,
}

/// The status of a starting daemon that is `waiting`: as [`collect`] without sources, with the
/// registry and the reason filled in, so `/status` and the 503 body say why.
pub fn collect_starting(waiting: &Waiting, now: SystemTime) -> Status {
    let mut s = collect(None, now);
    s.registry.location = waiting.location.clone();
    s.registry.last_error = Some(waiting.reason.clone());
    s.health.reason = Some(format!("{STARTING} ({})", waiting.reason));
    s
}

/// The status at `now`; `None` sources mean the daemon is still starting.
pub fn collect(sources: Option<&Sources>, now: SystemTime) -> Status {
    let Some(src) = sources else {
        return Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            health: decide(
                false,
                None,
                &RegistryView::default(),
                WorkersView::default(),
            ),
            counters: CountersView::from(&LocalCounters::default()),
            ..Status::default()
        };
    };
    let state = src.state.borrow().clone();
    let snapshot = src.table.load_full();
    let mut total = LocalCounters::default();
    let mut running = 0;
    let mut per_worker = Vec::with_capacity(src.workers.len());
    for w in &src.workers {
        let c = w.counters();
        total.add(&c);
        per_worker.push(WorkerTraffic::from(&c));
        running += usize::from(w.is_running());
    }
    let lease = state.own.as_ref().map(|l| LeaseView::new(l, now));
    let registry = RegistryView {
        location: src.registry.clone(),
        connected: state.registry.connected,
        last_error: state.registry.last_error.clone(),
        last_error_secs_ago: if state.registry.connected {
            state.registry.recovered_at
        } else {
            state.registry.failing_since
        }
        .map(|t| t.elapsed().as_secs()),
        resyncs: state.registry.resyncs,
    };
    let workers = WorkersView {
        configured: src.workers.len(),
        running,
    };
    Status {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        health: decide(true, lease.as_ref(), &registry, workers),
        peers: state.peers.iter().map(|l| LeaseView::new(l, now)).collect(),
        lease,
        table: TableView {
            routes: snapshot.len(),
            generation: snapshot.generation(),
        },
        registry,
        workers,
        counters: CountersView::from(&total),
        per_worker,
        host_failing: src.host.failing(),
    }
}

/// The `/healthz` decision: healthy when the daemon has started, holds a lease that has not
/// expired, and every worker runs. The reason names each failing condition and what the
/// registry last said, so the 503 body is enough to start diagnosing.
pub fn decide(
    started: bool,
    lease: Option<&LeaseView>,
    registry: &RegistryView,
    workers: WorkersView,
) -> Health {
    if !started {
        return Health {
            ok: false,
            reason: Some(STARTING.to_owned()),
        };
    }
    let registry_note = || match (&registry.connected, &registry.last_error) {
        (false, Some(e)) => format!("registry unavailable: {e}"),
        (false, None) => "registry not reached yet".to_owned(),
        (true, _) => "registry connected".to_owned(),
    };
    let mut problems = Vec::new();
    match lease {
        None => problems.push(format!("no lease held, re-acquiring ({})", registry_note())),
        Some(l) if l.is_expired() => problems.push(format!(
            "lease {} expired {}s ago, renewal failing ({})",
            l.subnet,
            -l.expires_in_secs.unwrap_or_default(),
            registry_note()
        )),
        Some(_) => {}
    }
    if workers.running < workers.configured {
        problems.push(format!(
            "{} of {} forwarding workers stopped (see the log)",
            workers.configured - workers.running,
            workers.configured
        ));
    }
    if problems.is_empty() {
        Health {
            ok: true,
            reason: None,
        }
    } else {
        Health {
            ok: false,
            reason: Some(problems.join("; ")),
        }
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `to - from` in whole seconds, negative when `to` lies before `from`.
fn signed_secs_between(from: SystemTime, to: SystemTime) -> i64 {
    match to.duration_since(from) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

#[cfg(test)]
mod test {
    use std::time::Duration;

    use super::*;
    use crate::model::{LeaseAttrs, SubnetKey};

    #[test]
    fn host_steps_are_listed_while_they_fail_in_a_fixed_order() {
        let steps = HostSteps::default();
        assert!(steps.failing().is_empty());
        steps.set("iptables", Some(&"lock".to_owned()));
        steps.set("tun", Some(&"gone".to_owned()));
        let names: Vec<String> = steps.failing().into_iter().map(|f| f.step).collect();
        assert_eq!(names, ["tun", "iptables"]);
        steps.clone().set("tun", None);
        assert_eq!(
            steps.failing(),
            [HostFailure {
                step: "iptables".into(),
                error: "lock".into()
            }]
        );
    }

    fn lease(expires_in: Option<i64>, now: SystemTime) -> Lease {
        Lease {
            key: SubnetKey::parse("198.19.1.0-24").unwrap(),
            attrs: LeaseAttrs::with_public_ip(Ipv4Addr::new(198, 18, 0, 1)),
            expiration: expires_in.map(|s| {
                if s >= 0 {
                    now + Duration::from_secs(s.unsigned_abs())
                } else {
                    now - Duration::from_secs(s.unsigned_abs())
                }
            }),
            lease_id: None,
        }
    }

    fn connected() -> RegistryView {
        RegistryView {
            connected: true,
            ..RegistryView::default()
        }
    }

    const ALL_RUN: WorkersView = WorkersView {
        configured: 2,
        running: 2,
    };

    #[test]
    fn healthy_with_a_valid_lease_and_all_workers() {
        let now = SystemTime::now();
        let l = LeaseView::new(&lease(Some(3600), now), now);
        assert_eq!(l.expires_in_secs, Some(3600));
        let h = decide(true, Some(&l), &connected(), ALL_RUN);
        assert!(h.ok, "{h:?}");
        assert_eq!(h.reason, None);
        // A reservation never expires.
        let r = LeaseView::new(&lease(None, now), now);
        assert!(r.reservation && !r.is_expired());
        assert!(decide(true, Some(&r), &connected(), ALL_RUN).ok);
    }

    #[test]
    fn unhealthy_while_starting_without_lease_or_expired() {
        let now = SystemTime::now();
        let h = decide(
            false,
            None,
            &RegistryView::default(),
            WorkersView::default(),
        );
        assert_eq!(h.reason.as_deref(), Some(STARTING));

        let down = RegistryView {
            connected: false,
            last_error: Some("etcd 127.0.0.1:2379 unreachable".into()),
            ..RegistryView::default()
        };
        let h = decide(true, None, &down, ALL_RUN);
        assert!(!h.ok);
        let reason = h.reason.unwrap();
        assert!(reason.starts_with("no lease held"), "{reason}");
        assert!(
            reason.contains("etcd 127.0.0.1:2379 unreachable"),
            "{reason}"
        );

        let expired = LeaseView::new(&lease(Some(-12), now), now);
        let h = decide(true, Some(&expired), &down, ALL_RUN);
        let reason = h.reason.unwrap();
        assert!(
            reason.starts_with("lease 198.19.1.0-24 expired 12s ago"),
            "{reason}"
        );
        // Expiring exactly now counts as expired.
        let edge = LeaseView::new(&lease(Some(0), now), now);
        assert!(!decide(true, Some(&edge), &connected(), ALL_RUN).ok);
    }

    #[test]
    fn a_stopped_worker_is_unhealthy_and_causes_add_up() {
        let workers = WorkersView {
            configured: 3,
            running: 2,
        };
        let now = SystemTime::now();
        let l = LeaseView::new(&lease(Some(60), now), now);
        let h = decide(true, Some(&l), &connected(), workers);
        assert_eq!(
            h.reason.as_deref(),
            Some("1 of 3 forwarding workers stopped (see the log)")
        );
        let h = decide(true, None, &connected(), workers);
        let reason = h.reason.unwrap();
        assert!(
            reason.contains("no lease held") && reason.contains("; 1 of 3"),
            "{reason}"
        );
    }

    #[test]
    fn a_waiting_daemon_says_what_it_waits_for() {
        let w = Waiting {
            location: "/var/lib/linen".into(),
            reason: "network config not found at /var/lib/linen/config".into(),
        };
        let s = collect_starting(&w, SystemTime::now());
        assert!(!s.health.ok);
        assert_eq!(
            s.health.reason.as_deref(),
            Some(
                "starting: waiting for the network config and a lease (network config not found \
                 at /var/lib/linen/config)"
            )
        );
        assert_eq!(s.registry.location, "/var/lib/linen");
        assert!(!s.registry.connected);
    }

    #[test]
    fn starting_status_has_every_drop_reason_and_round_trips() {
        let s = collect(None, SystemTime::now());
        assert!(!s.health.ok);
        assert_eq!(s.counters.drops.len(), DropReason::COUNT);
        let json = serde_json::to_string(&s).unwrap();
        let back: Status = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
    }
}
