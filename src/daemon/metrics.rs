//! `GET /metrics`: a [`Status`] rendered in the Prometheus text format (0.0.4) with
//! `prometheus-client`. The values are taken on each scrape (see [`super::status`]), so the
//! metrics are a `Collector` over one status snapshot rather than registered live metrics that
//! the data plane would have to update.
//!
//! Metric names (all prefixed `linen_`):
//! - `packets_total{direction}`, `bytes_total{direction}`: `tun_rx`, `udp_tx`, `udp_rx`, `tun_tx`
//! - `tun_coalesced_writes_total{proto}`: TSO (`tcp`) and USO (`udp`) super-packets written
//! - `worker_packets_total{worker, direction}`: `tun_rx`, `udp_tx`, `udp_rx` per worker (how
//!   flows spread over the workers)
//! - `drops_total{reason}`: every [`DropReason`](crate::dataplane::DropReason) name, zeros too
//! - `icmp_errors_sent_total`
//! - `udp_gso_sends_total`: sends that each carried several datagrams (UDP GSO)
//! - `udp_receive_overflows_total`: drops at the receiving sockets, nearly always a full
//!   buffer (kernel)
//! - `table_routes`, `table_generation`, `peers`
//! - `lease_held`, `lease_reservation`, `lease_expiry_seconds` (seconds until the own lease
//!   expires; absent for a reservation or without a lease)
//! - `registry_connected`, `registry_resyncs_total`, `registry_last_error_info{error}`,
//!   `registry_last_error_age_seconds`
//! - `workers_configured`, `workers_running`, `healthy`
//! - `host_step_failing{step}`: 1 while a host-side step the daemon keeps in place fails
//!   (`tun`, `subnet_env`, `iptables`, `underlay`), else 0

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use super::status::{DIRECTIONS, Status, Traffic};

pub use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The status as Prometheus text.
pub fn render(status: Status) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(StatusCollector(status)));
    let mut out = String::with_capacity(4096);
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
    out
}

#[derive(Debug)]
struct StatusCollector(Status);

/// Encodes one metric without labels.
fn one(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: &impl EncodeMetric,
) -> Result<(), std::fmt::Error> {
    let m = enc.encode_descriptor(name, help, None, metric.metric_type())?;
    metric.encode(m)
}

/// Encodes a counter family with one label.
fn family(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &'static str,
    values: &[(&str, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    for (value, n) in values {
        let labels = [(label, *value)];
        ConstCounter::new(*n).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn flag(b: bool) -> ConstGauge<i64> {
    ConstGauge::new(i64::from(b))
}

fn count(n: usize) -> ConstGauge<i64> {
    ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX))
}

impl Collector for StatusCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        let c = &s.counters;
        for (name, help, pick) in [
            (
                "linen_packets",
                "Packets by direction: tun_rx (read from the TUN), udp_tx (sent to peers), udp_rx (received from peers), tun_tx (written to the TUN)",
                (|t: Traffic| t.packets) as fn(Traffic) -> u64,
            ),
            (
                "linen_bytes",
                "Bytes by direction (IP packet bytes; UDP payload bytes on the udp side)",
                |t: Traffic| t.bytes,
            ),
        ] {
            let values: Vec<(&str, u64)> = DIRECTIONS
                .iter()
                .map(|(d, _)| (*d, pick(c.traffic(d))))
                .collect();
            family(&mut enc, name, help, "direction", &values)?;
        }
        let drops: Vec<(&str, u64)> = c.drops.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        family(
            &mut enc,
            "linen_drops",
            "Packets not forwarded, by reason",
            "reason",
            &drops,
        )?;
        let coalesced: Vec<(&str, u64)> =
            c.coalesced.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        family(
            &mut enc,
            "linen_tun_coalesced_writes",
            "Super-packets written to the TUN, each coalesced from several received segments: tcp (TSO), udp (USO)",
            "proto",
            &coalesced,
        )?;
        let ids: Vec<String> = (0..s.per_worker.len()).map(|i| i.to_string()).collect();
        let mut m = enc.encode_descriptor(
            "linen_worker_packets",
            "Packets per worker and direction: tun_rx (read from its TUN queue), udp_tx, udp_rx",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (id, w) in ids.iter().zip(&s.per_worker) {
            for (direction, v) in [
                ("tun_rx", w.tun_rx_packets),
                ("udp_tx", w.udp_tx_packets),
                ("udp_rx", w.udp_rx_packets),
            ] {
                let labels = [("worker", id.as_str()), ("direction", direction)];
                ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
            }
        }
        one(
            &mut enc,
            "linen_icmp_errors_sent",
            "ICMP errors (time exceeded, unreachable, too big) written back into the TUN",
            &ConstCounter::new(c.icmp_sent),
        )?;
        one(
            &mut enc,
            "linen_udp_gso_sends",
            "UDP sends that each carried several datagrams to one peer (UDP GSO)",
            &ConstCounter::new(c.udp_gso_sends),
        )?;
        one(
            &mut enc,
            "linen_udp_receive_overflows",
            "Drops the kernel counted at the workers' UDP sockets, nearly always a full receive buffer (a GRO batch of datagrams may count as one; a bad UDP checksum counts too); each grows the buffer, up to --socket-buffer-max",
            &ConstCounter::new(c.udp_receive_overflows),
        )?;
        one(
            &mut enc,
            "linen_table_routes",
            "Routes to peers in the forwarding table",
            &count(s.table.routes),
        )?;
        one(
            &mut enc,
            "linen_table_generation",
            "Lease-state generation the forwarding table was built from",
            &ConstGauge::new(i64::try_from(s.table.generation).unwrap_or(i64::MAX)),
        )?;
        one(
            &mut enc,
            "linen_peers",
            "Other hosts' live leases",
            &count(s.peers.len()),
        )?;
        one(
            &mut enc,
            "linen_lease_held",
            "1 while this host holds a lease",
            &flag(s.lease.is_some()),
        )?;
        one(
            &mut enc,
            "linen_lease_reservation",
            "1 when this host's lease is a reservation (no expiry)",
            &flag(s.lease.as_ref().is_some_and(|l| l.reservation)),
        )?;
        if let Some(secs) = s.lease.as_ref().and_then(|l| l.expires_in_secs) {
            one(
                &mut enc,
                "linen_lease_expiry_seconds",
                "Seconds until this host's lease expires (negative: expired)",
                &ConstGauge::new(secs),
            )?;
        }
        one(
            &mut enc,
            "linen_registry_connected",
            "1 when the last registry call succeeded",
            &flag(s.registry.connected),
        )?;
        one(
            &mut enc,
            "linen_registry_resyncs",
            "Times the registry came back after a failure",
            &ConstCounter::new(s.registry.resyncs),
        )?;
        if let Some(e) = &s.registry.last_error {
            one(
                &mut enc,
                "linen_registry_last_error",
                "The last registry failure (kept after recovery: alert on \
                 linen_registry_connected, or on linen_registry_last_error_age_seconds)",
                &Info::new([("error", e.as_str())]),
            )?;
        }
        if let Some(secs) = s.registry.last_error_secs_ago {
            // While failing, the view counts the outage's length; the metric is 0 then.
            let ended = if s.registry.connected { secs } else { 0 };
            one(
                &mut enc,
                "linen_registry_last_error_age_seconds",
                "Seconds since the last registry failure ended (0 while failing)",
                &ConstGauge::new(i64::try_from(ended).unwrap_or(i64::MAX)),
            )?;
        }
        one(
            &mut enc,
            "linen_workers_configured",
            "Forwarding workers started",
            &count(s.workers.configured),
        )?;
        one(
            &mut enc,
            "linen_workers_running",
            "Forwarding workers whose thread runs",
            &count(s.workers.running),
        )?;
        {
            let mut m = enc.encode_descriptor(
                "linen_host_step_failing",
                "1 while a host-side step kept in place after start fails (the TUN device's \
                 addresses and routes, subnet.env after a lease move, the iptables rules, the \
                 advertised underlay address still on the host); linen retries it",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for step in super::status::HOST_STEPS {
                let failing = s.host_failing.iter().any(|f| f.step == step);
                flag(failing).encode(m.encode_family(&[("step", step)])?)?;
            }
        }
        one(
            &mut enc,
            "linen_healthy",
            "1 when /healthz answers 200",
            &flag(s.health.ok),
        )
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::daemon::status::{Health, LeaseView, RegistryView, WorkerTraffic, WorkersView};

    fn sample() -> Status {
        let mut s = crate::daemon::status::collect(None, std::time::SystemTime::now());
        s.counters.traffic.get_mut("tun_rx").unwrap().packets = 7;
        s.counters.traffic.get_mut("udp_rx").unwrap().bytes = 840;
        *s.counters.drops.get_mut("spoofed_source").unwrap() = 2;
        *s.counters.coalesced.get_mut("udp").unwrap() = 5;
        s.counters.udp_gso_sends = 11;
        s.counters.udp_receive_overflows = 12;
        s.lease = Some(LeaseView {
            subnet: "198.19.1.0-24".into(),
            expires_in_secs: Some(86_000),
            ..LeaseView::default()
        });
        s.registry = RegistryView {
            location: "/var/lib/linen".into(),
            connected: true,
            last_error: Some("a \"quoted\" failure".into()),
            last_error_secs_ago: Some(90),
            resyncs: 1,
        };
        s.workers = WorkersView {
            configured: 2,
            running: 2,
        };
        s.per_worker = vec![
            WorkerTraffic {
                tun_rx_packets: 3,
                udp_tx_packets: 4,
                udp_rx_packets: 0,
            },
            WorkerTraffic {
                tun_rx_packets: 4,
                udp_tx_packets: 4,
                udp_rx_packets: 9,
            },
        ];
        s.health = Health {
            ok: true,
            reason: None,
        };
        s.host_failing = vec![crate::daemon::status::HostFailure {
            step: "subnet_env".into(),
            error: "writing /run/linen/subnet.env: Is a directory".into(),
        }];
        s
    }

    #[test]
    fn renders_prometheus_text_with_every_family() {
        let text = render(sample());
        for line in [
            "# TYPE linen_packets_total counter",
            "linen_packets_total{direction=\"tun_rx\"} 7",
            "linen_bytes_total{direction=\"udp_rx\"} 840",
            "linen_drops_total{reason=\"spoofed_source\"} 2",
            "linen_drops_total{reason=\"malformed\"} 0",
            "linen_icmp_errors_sent_total 0",
            "linen_tun_coalesced_writes_total{proto=\"tcp\"} 0",
            "linen_tun_coalesced_writes_total{proto=\"udp\"} 5",
            "linen_udp_gso_sends_total 11",
            "linen_udp_receive_overflows_total 12",
            "linen_lease_held 1",
            "linen_lease_reservation 0",
            "linen_lease_expiry_seconds 86000",
            "linen_registry_connected 1",
            "linen_registry_resyncs_total 1",
            "linen_registry_last_error_info{error=\"a \\\"quoted\\\" failure\"} 1",
            "linen_registry_last_error_age_seconds 90",
            "linen_workers_configured 2",
            "linen_workers_running 2",
            "linen_healthy 1",
            "# TYPE linen_host_step_failing gauge",
            "linen_host_step_failing{step=\"tun\"} 0",
            "linen_host_step_failing{step=\"subnet_env\"} 1",
            "linen_host_step_failing{step=\"iptables\"} 0",
            "# TYPE linen_worker_packets_total counter",
            "linen_worker_packets_total{worker=\"0\",direction=\"tun_rx\"} 3",
            "linen_worker_packets_total{worker=\"0\",direction=\"udp_rx\"} 0",
            "linen_worker_packets_total{worker=\"1\",direction=\"udp_rx\"} 9",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("linen_drops_total{"))
                .count(),
            crate::dataplane::DropReason::COUNT
        );
    }

    /// While the registry fails, the last error's age is 0 (the view counts the outage's
    /// length then, which is not what the metric means).
    #[test]
    fn the_last_error_age_is_zero_while_failing() {
        let mut s = sample();
        s.registry.connected = false;
        let text = render(s);
        assert!(
            text.lines()
                .any(|l| l == "linen_registry_last_error_age_seconds 0"),
            "{text}"
        );
    }

    #[test]
    fn no_expiry_gauge_for_a_reservation_or_without_lease() {
        let mut s = sample();
        s.lease.as_mut().unwrap().reservation = true;
        s.lease.as_mut().unwrap().expires_in_secs = None;
        let text = render(s.clone());
        assert!(text.contains("linen_lease_reservation 1"), "{text}");
        assert!(!text.contains("linen_lease_expiry_seconds"), "{text}");
        s.lease = None;
        let text = render(s);
        assert!(text.contains("linen_lease_held 0"), "{text}");
    }
}
