//! `--ip-masq`: flannel's masquerade rules (flannel HEAD, see flannel-compat.md §e), through the
//! `iptables` and `ip6tables` commands. N is the cluster network, L this host's lease. Chain
//! `LINEN-POSTRTG` in table nat, jumped to from the end of POSTROUTING, holds in this order:
//!
//! 1. `-m mark --mark 0x4000/0x4000 -j RETURN` (already marked by kube-proxy)
//! 2. `-s L -d N -j RETURN`, 3. `-s N -d L -j RETURN`, 4. `! -s N -d L -j RETURN`
//! 5. `-s N ! -d 224.0.0.0/4 -j MASQUERADE` (IPv6: `ff00::/8`), 6. `! -s N -d N -j MASQUERADE`
//!
//! every rule with the comment "linen masq", MASQUERADE with `--random-fully` when iptables
//! supports it (≥ 1.6.2, flannel's test). Like flannel's `-iptables-resync`, the rules are checked
//! every 5 s and, when one is missing, the chain is flushed and rebuilt in order; the chain is
//! linen's alone, so rebuilding it also drops rules of an older lease or network. The jump and
//! the chain are removed on shutdown.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use ipnetwork::IpNetwork;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::lease::manager::LeaseState;
use crate::model::{NetworkConfig, SubnetKey};

/// The chain linen owns in table nat.
pub const CHAIN: &str = "LINEN-POSTRTG";
/// The comment on every rule linen adds.
pub const COMMENT: &str = "linen masq";
/// How often the rules are checked (flannel's `-iptables-resync` default).
pub const RESYNC: Duration = Duration::from_secs(5);
/// kube-proxy's masquerade mark: traffic it marked is left alone.
const KUBE_PROXY_MARK: &str = "0x4000/0x4000";

/// IPv4 (`iptables`) or IPv6 (`ip6tables`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `iptables`.
    V4,
    /// `ip6tables`.
    V6,
}

impl Family {
    /// The command that edits this family's rules.
    pub fn program(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn multicast(self) -> &'static str {
        match self {
            Family::V4 => "224.0.0.0/4",
            Family::V6 => "ff00::/8",
        }
    }
}

/// The rules of [`CHAIN`] for network `n` and lease `l`, in order, each as the arguments that
/// follow `-A LINEN-POSTRTG`.
pub fn chain_rules(
    family: Family,
    n: IpNetwork,
    l: IpNetwork,
    random_fully: bool,
) -> Vec<Vec<String>> {
    let (n, l) = (n.to_string(), l.to_string());
    let rule = |head: &[&str], target: &str| -> Vec<String> {
        let mut v: Vec<String> = head.iter().map(|a| (*a).to_owned()).collect();
        v.extend(["-m", "comment", "--comment", COMMENT, "-j", target].map(str::to_owned));
        if target == "MASQUERADE" && random_fully {
            v.push("--random-fully".to_owned());
        }
        v
    };
    vec![
        rule(&["-m", "mark", "--mark", KUBE_PROXY_MARK], "RETURN"),
        rule(&["-s", &l, "-d", &n], "RETURN"),
        rule(&["-s", &n, "-d", &l], "RETURN"),
        rule(&["!", "-s", &n, "-d", &l], "RETURN"),
        rule(&["-s", &n, "!", "-d", family.multicast()], "MASQUERADE"),
        rule(&["!", "-s", &n, "-d", &n], "MASQUERADE"),
    ]
}

/// The POSTROUTING rule that jumps to [`CHAIN`].
pub fn jump_rule() -> Vec<String> {
    ["-m", "comment", "--comment", COMMENT, "-j", CHAIN]
        .map(str::to_owned)
        .to_vec()
}

/// Whether an `iptables --version` line names a version with `--random-fully` (≥ 1.6.2).
pub fn supports_random_fully(version_line: &str) -> bool {
    let Some(v) = version_line
        .split_whitespace()
        .find_map(|w| w.strip_prefix('v'))
    else {
        return false;
    };
    let parts: Vec<u32> = v.split('.').map_while(|p| p.parse().ok()).collect();
    let (major, minor, patch) = (
        parts.first().copied().unwrap_or(0),
        parts.get(1).copied().unwrap_or(0),
        parts.get(2).copied().unwrap_or(0),
    );
    (major, minor, patch) >= (1, 6, 2)
}

/// One family's rule set.
#[derive(Clone, Debug)]
struct RuleSet {
    family: Family,
    network: IpNetwork,
    random_fully: bool,
    rules: Vec<Vec<String>>,
}

/// The masquerade rules of this host, for every family the network and the lease have.
#[derive(Clone, Debug)]
pub struct Masq {
    sets: Vec<RuleSet>,
    lease: SubnetKey,
}

impl Masq {
    /// Probes `iptables` (and `ip6tables` when the lease has an IPv6 subnet) and computes the
    /// rules; installs nothing yet.
    pub fn new(config: &NetworkConfig, lease: &SubnetKey) -> Result<Masq> {
        let mut sets = Vec::new();
        let pairs = [
            (
                Family::V4,
                config.network.map(IpNetwork::V4),
                lease.ipv4().map(IpNetwork::V4),
            ),
            (
                Family::V6,
                config.ipv6_network.map(IpNetwork::V6),
                lease.ipv6().map(IpNetwork::V6),
            ),
        ];
        for (family, network, own) in pairs {
            let (Some(network), Some(own)) = (network, own) else {
                continue;
            };
            let out = Command::new(family.program())
                .arg("--version")
                .stdin(Stdio::null())
                .output()
                .with_context(|| {
                    format!(
                        "--ip-masq needs the `{}` command; install it (Debian: apt-get install \
                         iptables) or drop --ip-masq",
                        family.program()
                    )
                })?;
            let version = String::from_utf8_lossy(&out.stdout);
            let random_fully = supports_random_fully(&version);
            tracing::debug!(program = family.program(), version = %version.trim(), random_fully,
                "masquerade rules through");
            sets.push(RuleSet {
                family,
                network,
                random_fully,
                rules: chain_rules(family, network, own, random_fully),
            });
        }
        if sets.is_empty() {
            bail!("--ip-masq: the lease {lease} has no subnet of the configured network");
        }
        Ok(Masq {
            sets,
            lease: *lease,
        })
    }

    /// The same rules for another lease (ours changed).
    pub fn for_lease(&self, lease: &SubnetKey) -> Masq {
        let sets = self
            .sets
            .iter()
            .filter_map(|s| {
                let own = match s.family {
                    Family::V4 => lease.ipv4().map(IpNetwork::V4),
                    Family::V6 => lease.ipv6().map(IpNetwork::V6),
                }?;
                Some(RuleSet {
                    rules: chain_rules(s.family, s.network, own, s.random_fully),
                    ..s.clone()
                })
            })
            .collect();
        Masq {
            sets,
            lease: *lease,
        }
    }

    /// Makes sure every rule is in place; returns whether anything had to be (re)added.
    pub fn ensure(&self) -> Result<bool> {
        let mut changed = false;
        for set in &self.sets {
            changed |= ensure_set(set)?;
        }
        Ok(changed)
    }

    /// Removes the jump and the chain (errors are logged: this runs on the way out).
    pub fn remove(&self) {
        for set in &self.sets {
            let p = set.family.program();
            // The jump may have been added more than once by hand; remove every copy.
            for _ in 0..8 {
                if !nat(p, "-D", "POSTROUTING", &jump_rule()).is_ok_and(|o| o.status.success()) {
                    break;
                }
            }
            for op in ["-F", "-X"] {
                match nat(p, op, CHAIN, &[]) {
                    Ok(o) if o.status.success() => {}
                    Ok(o) => tracing::warn!(program = p, op, chain = CHAIN,
                        error = %String::from_utf8_lossy(&o.stderr).trim(), "cannot remove masquerade chain"),
                    Err(e) => {
                        tracing::warn!(program = p, error = %e, "cannot remove masquerade chain")
                    }
                }
            }
        }
    }
}

/// Runs `<program> -w 5 -t nat <op> <chain> <args…>`.
fn nat(program: &str, op: &str, chain: &str, args: &[String]) -> Result<Output> {
    Command::new(program)
        .args(["-w", "5", "-t", "nat", op, chain])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))
}

/// Like [`nat`] but fails with iptables' message unless it exits 0.
fn nat_ok(program: &str, op: &str, chain: &str, args: &[String]) -> Result<()> {
    let out = nat(program, op, chain, args)?;
    if out.status.success() {
        return Ok(());
    }
    Err(anyhow!(
        "`{program} -t nat {op} {chain} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

fn exists(program: &str, chain: &str, rule: &[String]) -> Result<bool> {
    Ok(nat(program, "-C", chain, rule)?.status.success())
}

fn ensure_set(set: &RuleSet) -> Result<bool> {
    let p = set.family.program();
    let mut changed = false;
    if !nat(p, "-S", CHAIN, &[])?.status.success() {
        nat_ok(p, "-N", CHAIN, &[])?;
        changed = true;
    }
    let mut complete = true;
    for rule in &set.rules {
        if !exists(p, CHAIN, rule)? {
            complete = false;
            break;
        }
    }
    if !complete {
        // Rebuild in order (flannel deletes and re-adds all when one is missing).
        nat_ok(p, "-F", CHAIN, &[])?;
        for rule in &set.rules {
            nat_ok(p, "-A", CHAIN, rule)?;
        }
        changed = true;
    }
    if !exists(p, "POSTROUTING", &jump_rule())? {
        nat_ok(p, "-A", "POSTROUTING", &jump_rule())?;
        changed = true;
    }
    Ok(changed)
}

/// Installs the rules for `lease` (on a blocking thread); on failure removes what was added.
pub async fn install(config: &NetworkConfig, lease: &SubnetKey) -> Result<Masq> {
    let (config, lease) = (config.clone(), *lease);
    tokio::task::spawn_blocking(move || {
        let masq = Masq::new(&config, &lease)?;
        if let Err(e) = masq.ensure() {
            masq.remove();
            return Err(e.context("installing the --ip-masq rules"));
        }
        Ok(masq)
    })
    .await?
}

/// Keeps the rules in place until `cancel`: every [`RESYNC`] and whenever our lease changes;
/// then removes them.
pub fn spawn_resync(
    mut masq: Masq,
    mut state: watch::Receiver<LeaseState>,
    cancel: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(RESYNC);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut watching = true;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
                r = state.changed(), if watching => {
                    if r.is_err() {
                        watching = false;
                        continue;
                    }
                    let own = state.borrow_and_update().own.as_ref().map(|l| l.key);
                    match own {
                        Some(key) if key != masq.lease => {
                            tracing::info!(subnet = %key, "lease changed; rebuilding masquerade rules");
                            masq = masq.for_lease(&key);
                        }
                        _ => continue,
                    }
                }
            }
            let m = masq.clone();
            match tokio::task::spawn_blocking(move || m.ensure()).await {
                Ok(Ok(true)) => {
                    tracing::warn!(chain = CHAIN, "masquerade rules were missing; re-added")
                }
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %format!("{e:#}"), "cannot restore masquerade rules")
                }
                Err(e) => tracing::error!(error = %e, "masquerade check panicked"),
            }
        }
        let m = masq.clone();
        let _ = tokio::task::spawn_blocking(move || m.remove()).await;
        tracing::info!(chain = CHAIN, "masquerade rules removed");
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipnetwork::{Ipv4Network, Ipv6Network};

    fn v4(s: &str) -> IpNetwork {
        IpNetwork::V4(s.parse::<Ipv4Network>().unwrap())
    }

    #[test]
    fn ipv4_rules_are_flannels_head_rules_in_order() {
        let rules = chain_rules(Family::V4, v4("198.19.0.0/16"), v4("198.19.7.0/24"), true);
        let text: Vec<String> = rules.iter().map(|r| r.join(" ")).collect();
        let c = "-m comment --comment linen masq";
        assert_eq!(
            text,
            [
                format!("-m mark --mark 0x4000/0x4000 {c} -j RETURN"),
                format!("-s 198.19.7.0/24 -d 198.19.0.0/16 {c} -j RETURN"),
                format!("-s 198.19.0.0/16 -d 198.19.7.0/24 {c} -j RETURN"),
                format!("! -s 198.19.0.0/16 -d 198.19.7.0/24 {c} -j RETURN"),
                format!("-s 198.19.0.0/16 ! -d 224.0.0.0/4 {c} -j MASQUERADE --random-fully"),
                format!("! -s 198.19.0.0/16 -d 198.19.0.0/16 {c} -j MASQUERADE --random-fully"),
            ]
        );
        // The comment is one argument, not three.
        assert!(rules[0].contains(&COMMENT.to_owned()));
    }

    #[test]
    fn ipv6_rules_use_ipv6_multicast_and_random_fully_is_optional() {
        let n = IpNetwork::V6("fd00:19::/48".parse::<Ipv6Network>().unwrap());
        let l = IpNetwork::V6("fd00:19:0:7::/64".parse::<Ipv6Network>().unwrap());
        let rules = chain_rules(Family::V6, n, l, false);
        assert_eq!(
            rules[4].join(" "),
            "-s fd00:19::/48 ! -d ff00::/8 -m comment --comment linen masq -j MASQUERADE"
        );
        assert!(rules.iter().all(|r| !r.contains(&"--random-fully".into())));
        assert_eq!(Family::V6.program(), "ip6tables");
    }

    #[test]
    fn random_fully_needs_iptables_1_6_2() {
        assert!(supports_random_fully("iptables v1.8.9 (nf_tables)"));
        assert!(supports_random_fully("iptables v1.6.2"));
        assert!(!supports_random_fully("iptables v1.6.1"));
        assert!(!supports_random_fully("iptables v1.4.21"));
        assert!(!supports_random_fully("garbage"));
    }

    #[test]
    fn a_new_lease_gets_new_rules_for_the_same_network() {
        let set = RuleSet {
            family: Family::V4,
            network: v4("198.19.0.0/16"),
            random_fully: false,
            rules: chain_rules(Family::V4, v4("198.19.0.0/16"), v4("198.19.7.0/24"), false),
        };
        let old = SubnetKey::parse("198.19.7.0-24").unwrap();
        let masq = Masq {
            sets: vec![set],
            lease: old,
        };
        let new = SubnetKey::parse("198.19.9.0-24").unwrap();
        let moved = masq.for_lease(&new);
        assert_eq!(moved.lease, new);
        assert!(moved.sets[0].rules[1].contains(&"198.19.9.0/24".to_owned()));
    }
}
