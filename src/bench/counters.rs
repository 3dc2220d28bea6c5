//! The kernel's loss and reordering counters of the bench's two hosts, read before and after
//! each TCP measurement: when a round has retransmits, the counters that moved say where
//! segments were dropped (a socket buffer, a device queue) or whether TCP saw them reordered.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::lab::Host;

/// The counters of `/proc/net/snmp` and `/proc/net/netstat` that are read, as `(group,
/// name)`. Loss: a UDP socket's full receive buffer (`RcvbufErrors`, linen's and iperf3's),
/// TCP drops at the receiver. Reordering as the sender saw it (`*Reorder`), duplicates the
/// receiver reported (`TCPDSACKRecv`: a spurious retransmit), and out-of-order arrivals.
const SNMP: &[(&str, &str)] = &[
    ("Udp", "InErrors"),
    ("Udp", "RcvbufErrors"),
    ("Udp", "SndbufErrors"),
    ("TcpExt", "TCPSACKReorder"),
    ("TcpExt", "TCPTSReorder"),
    ("TcpExt", "TCPRenoReorder"),
    ("TcpExt", "TCPDSACKRecv"),
    ("TcpExt", "TCPOFOQueue"),
    ("TcpExt", "TCPOFODrop"),
    ("TcpExt", "TCPRcvQDrop"),
    ("TcpExt", "TCPBacklogDrop"),
    ("TcpExt", "TCPTimeouts"),
    ("TcpExt", "TCPLossProbes"),
];

/// One reading: counter name (`h1 Udp RcvbufErrors`, `h2 linen0 tx_dropped`) to value.
pub type Reading = BTreeMap<String, u64>;

/// Reads the counters of `hosts` (the host's number prefixes each name).
pub fn read(hosts: &[&Host]) -> Result<Reading> {
    let mut all = Reading::new();
    for h in hosts {
        let snmp = h.run_ok("cat", &["/proc/net/snmp", "/proc/net/netstat"])?;
        let links = h.ip(&["-s", "-j", "link", "show"])?;
        let links: Value = serde_json::from_str(&links)
            .with_context(|| format!("`ip -s -j link show` in {} printed no JSON", h.ns))?;
        for (name, v) in parse_snmp(&snmp).into_iter().chain(link_drops(&links)) {
            all.insert(format!("h{} {name}", h.index), v);
        }
    }
    Ok(all)
}

/// What moved from `before` to `after`, by how much; counters that did not move are left
/// out.
pub fn moved(before: &Reading, after: &Reading) -> Reading {
    after
        .iter()
        .filter_map(|(k, &v)| {
            let d = v.saturating_sub(before.get(k).copied().unwrap_or(0));
            (d > 0).then(|| (k.clone(), d))
        })
        .collect()
}

/// `h2 Udp RcvbufErrors +230, h1 TcpExt TCPDSACKRecv +4`.
pub fn describe(moved: &Reading) -> String {
    moved
        .iter()
        .map(|(k, d)| format!("{k} +{d}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The [`SNMP`] counters in the text of `/proc/net/snmp` and `/proc/net/netstat`: each group
/// is a line of names followed by a line of values, both starting with `Group:`.
fn parse_snmp(text: &str) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut lines = text.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        let (Some((group, names)), Some((group2, values))) =
            (names.split_once(':'), values.split_once(':'))
        else {
            continue;
        };
        if group != group2 {
            continue;
        }
        for (name, value) in names.split_whitespace().zip(values.split_whitespace()) {
            if SNMP.contains(&(group, name))
                && let Ok(v) = value.parse()
            {
                out.push((format!("{group} {name}"), v));
            }
        }
    }
    out
}

/// Each link's dropped packets, received and sent, from `ip -s -j link show`.
fn link_drops(links: &Value) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for link in links.as_array().into_iter().flatten() {
        let Some(name) = link["ifname"].as_str() else {
            continue;
        };
        for dir in ["rx", "tx"] {
            if let Some(v) = link["stats64"][dir]["dropped"].as_u64() {
                out.push((format!("{name} {dir}_dropped"), v));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chosen_counters_are_read_from_both_files() {
        let text = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                    Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
                    Udp: 100 2 7 50 5 0\n\
                    UdpLite: InDatagrams RcvbufErrors\nUdpLite: 9 9\n\
                    TcpExt: DelayedACKs TCPSACKReorder TCPDSACKRecv\nTcpExt: 12 3 4\n";
        assert_eq!(
            parse_snmp(text),
            [
                ("Udp InErrors".to_owned(), 7),
                ("Udp RcvbufErrors".to_owned(), 5),
                ("Udp SndbufErrors".to_owned(), 0),
                ("TcpExt TCPSACKReorder".to_owned(), 3),
                ("TcpExt TCPDSACKRecv".to_owned(), 4),
            ]
        );
    }

    #[test]
    fn each_links_drops_are_read_from_ip_json() {
        let links = serde_json::json!([
            {"ifname": "lo", "stats64": {"rx": {"dropped": 0}, "tx": {"dropped": 0}}},
            {"ifname": "linen0", "stats64": {"rx": {"dropped": 1}, "tx": {"dropped": 42}}},
            {"ifname": "odd"}
        ]);
        assert_eq!(
            link_drops(&links),
            [
                ("lo rx_dropped".to_owned(), 0),
                ("lo tx_dropped".to_owned(), 0),
                ("linen0 rx_dropped".to_owned(), 1),
                ("linen0 tx_dropped".to_owned(), 42),
            ]
        );
    }

    #[test]
    fn only_what_moved_is_described() {
        let before = Reading::from([("h1 a".to_owned(), 5), ("h2 b".to_owned(), 1)]);
        let after = Reading::from([
            ("h1 a".to_owned(), 5),
            ("h2 b".to_owned(), 4),
            ("h2 c".to_owned(), 2),
        ]);
        let m = moved(&before, &after);
        assert_eq!(describe(&m), "h2 b +3, h2 c +2");
        assert_eq!(describe(&moved(&after, &after)), "");
    }
}
