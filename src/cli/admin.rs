//! Admin commands on a registry: `linen network init|show`, `linen lease list|reserve|release`.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use ipnetwork::IpNetwork;

use super::exit::usage;
use super::{LeaseCommand, NetworkCommand, NetworkInitArgs};
use crate::daemon::registry;
use crate::lease::RegistryError;
use crate::model::{LeaseAttrs, NetworkConfig, NetworkConfigSpec, SubnetKey};

/// Runs `linen network …`.
pub async fn network(cmd: NetworkCommand) -> Result<()> {
    match cmd {
        NetworkCommand::Init(args) => network_init(args).await,
        NetworkCommand::Show { registry, json } => {
            let reg = registry::open(&registry, crate::model::LEASE_TTL).await?;
            let config = reg.get_network_config().await?;
            if let Some(warning) = config.flanneld_refuses() {
                eprintln!("warning: {warning}");
            }
            if json {
                println!("{}", config.spec.to_json());
                return Ok(());
            }
            println!("registry      {}", reg.location());
            if let Some(n) = config.network {
                println!("network       {n}");
                println!(
                    "subnets       /{} from {} to {}",
                    config.subnet_len, config.subnet_min, config.subnet_max
                );
            }
            if let Some(n) = config.ipv6_network {
                println!("ipv6 network  {n}");
                println!(
                    "ipv6 subnets  /{} from {} to {}",
                    config.ipv6_subnet_len, config.ipv6_subnet_min, config.ipv6_subnet_max
                );
            } else if let Some(n) = config.spec.ipv6_network {
                // flannel's rule: without EnableIPv6 the IPv6 network is not used.
                println!("ipv6 network  none ({n} is set, but EnableIPv6 is not true)");
            }
            println!("backend       udp, port {}", config.backend.port);
            Ok(())
        }
    }
}

async fn network_init(args: NetworkInitArgs) -> Result<()> {
    let mut spec = NetworkConfigSpec::default();
    // A network of the other family given to a flag: said so, not "not a CIDR".
    let other_family =
        |flag: &str, text: &str, ipv6: bool, right: &str| match text.parse::<IpNetwork>() {
            Ok(net) if net.is_ipv6() != ipv6 => Err(usage(format!(
                "{flag} {text} is an {} network; give it with {right}",
                if net.is_ipv6() { "IPv6" } else { "IPv4" }
            ))),
            _ => Ok(()),
        };
    if let Some(n) = &args.network {
        other_family(
            "--network",
            n,
            false,
            "--ipv6-network (and --no-ipv4 for an IPv6-only network)",
        )?;
        let net: ipnetwork::Ipv4Network = parse_cidr("--network", n, "198.19.0.0/16")?;
        spec.network = Some(net);
    }
    spec.subnet_len = args.subnet_len;
    spec.subnet_min = args.subnet_min;
    spec.subnet_max = args.subnet_max;
    spec.backend_port = args.port;
    if args.port == Some(0) {
        return Err(usage(
            "--port 0 is not a port; use 1..65535 (flannel's default is 8285)",
        ));
    }
    if let Some(n) = &args.ipv6_network {
        other_family("--ipv6-network", n, true, "--network")?;
        let net: ipnetwork::Ipv6Network = parse_cidr("--ipv6-network", n, "fd00:19::/48")?;
        spec.ipv6_network = Some(net);
        spec.enable_ipv6 = Some(true);
    }
    // Settings of a family the network does not have would be stored and do nothing.
    let unused = |family: &str, network: &str, flags: [(&'static str, bool); 3]| match flags
        .into_iter()
        .find_map(|(flag, given)| given.then_some(flag))
    {
        Some(flag) => Err(usage(format!(
            "{flag} applies to the {family} network, and there is none: add {network}, or \
                 drop {flag}"
        ))),
        None => Ok(()),
    };
    if args.ipv6_network.is_none() {
        unused(
            "IPv6",
            "--ipv6-network (e.g. fd00:19::/48)",
            [
                ("--ipv6-subnet-len", args.ipv6_subnet_len.is_some()),
                ("--ipv6-subnet-min", args.ipv6_subnet_min.is_some()),
                ("--ipv6-subnet-max", args.ipv6_subnet_max.is_some()),
            ],
        )?;
    }
    if args.network.is_none() {
        unused(
            "IPv4",
            if args.no_ipv4 {
                "--network (e.g. 198.19.0.0/16) without --no-ipv4"
            } else {
                "--network (e.g. 198.19.0.0/16)"
            },
            [
                ("--subnet-len", args.subnet_len.is_some()),
                ("--subnet-min", args.subnet_min.is_some()),
                ("--subnet-max", args.subnet_max.is_some()),
            ],
        )?;
    }
    spec.ipv6_subnet_len = args.ipv6_subnet_len;
    spec.ipv6_subnet_min = args.ipv6_subnet_min;
    spec.ipv6_subnet_max = args.ipv6_subnet_max;
    if args.no_ipv4 {
        if spec.ipv6_network.is_none() {
            return Err(usage(
                "--no-ipv4 needs --ipv6-network (e.g. --ipv6-network fd00:19::/48): a network \
                 without IPv4 must have IPv6",
            ));
        }
        spec.enable_ipv4 = Some(false);
    }
    if spec.network.is_none() && !args.no_ipv4 {
        return Err(usage(
            "--network is required (e.g. --network 198.19.0.0/16), or pass --no-ipv4 with --ipv6-network",
        ));
    }
    let config = spec.clone().validate()?;
    let reg = registry::open(&args.registry, crate::model::LEASE_TTL).await?;
    // The same network with every default filled in, however it was spelled (a config written
    // by `network init` names its backend, the flags do not).
    let effective = |c: &NetworkConfig| NetworkConfig {
        spec: NetworkConfigSpec::default(),
        ..c.clone()
    };
    match reg.get_network_config().await {
        Ok(existing) if !args.force => {
            if effective(&existing) == effective(&config) {
                println!("network config already set to {}", existing.spec.to_json());
                return Ok(());
            }
            bail!(
                "a different network config exists at {}: {}; pass --force to replace it \
                 (hosts keep their leases until restarted)",
                reg.location(),
                existing.spec.to_json()
            );
        }
        // A config linen cannot use is still somebody's: a flannel cluster with another
        // backend shares the default prefix.
        Err(RegistryError::BadConfig { source, .. }) if !args.force => bail!(
            "a network config linen cannot use exists at {} ({source}); it may belong to a \
             flannel cluster with another backend: use another --etcd-prefix or \
             --registry-dir, or pass --force to replace it",
            reg.location()
        ),
        Ok(_)
        | Err(RegistryError::ConfigNotFound { .. })
        | Err(RegistryError::BadConfig { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    if args.force {
        reg.put_network_config(&spec).await?;
    } else if !reg.create_network_config(&spec).await? {
        // Another init wrote one between the read above and this write.
        let existing = reg.get_network_config().await?;
        if effective(&existing) == effective(&config) {
            println!("network config already set to {}", existing.spec.to_json());
            return Ok(());
        }
        bail!(
            "another `linen network init` wrote a different network config at {} meanwhile: \
             {}; pass --force to replace it",
            reg.location(),
            existing.spec.to_json()
        );
    }
    println!(
        "wrote network config to {}: {}",
        reg.location(),
        spec.to_json()
    );
    if let Some(n) = config.network {
        println!(
            "hosts will lease /{} subnets of {n} from {} to {}",
            config.subnet_len, config.subnet_min, config.subnet_max
        );
    }
    Ok(())
}

/// A CIDR given to `flag`: with a prefix length (a bare address would be a /32 or /128) and
/// without host bits (`198.19.1.5/16` is more likely a typo than 198.19.0.0/16).
fn parse_cidr<N>(flag: &str, text: &str, example: &str) -> Result<N>
where
    N: std::str::FromStr + Copy + Into<IpNetwork>,
{
    let not_cidr = || usage(format!("{flag} {text:?} is not a CIDR such as {example}"));
    if !text.contains('/') {
        return Err(usage(format!(
            "{flag} {text:?} has no prefix length; give a CIDR such as {example}"
        )));
    }
    let net: N = text.parse().map_err(|_| not_cidr())?;
    no_host_bits(&format!("{flag} {text}"), "network", net.into())?;
    Ok(net)
}

/// Refuses `net` with host bits set, as `ip` does; `what` names it, `kind` is what the
/// message calls the network holding it.
fn no_host_bits(what: &str, kind: &str, net: IpNetwork) -> Result<()> {
    if net.network() != net.ip() {
        return Err(usage(format!(
            "{what} has host bits set; the {kind} holding it is {}/{}",
            net.network(),
            net.prefix()
        )));
    }
    Ok(())
}

/// Parses `198.19.5.0/24` or `198.19.5.0-24` (or a dual-stack key). Host bits are refused in
/// either form, as `ip` refuses them: `198.19.5.7/24` is more likely a mistyped address than
/// a subnet, and a release must not remove a subnet other than the one named.
fn parse_subnet(text: &str) -> Result<SubnetKey> {
    // A bare address would parse as a /32 (/128), a key no lease has: "no lease for
    // 198.19.5.0" while 198.19.5.0/24 is leased.
    if text.parse::<IpAddr>().is_ok() {
        return Err(usage(format!(
            "{text:?} has no prefix length; give the subnet as a CIDR such as 198.19.5.0/24 \
             (`linen lease list` shows each lease's)"
        )));
    }
    if let Ok(net) = text.parse::<IpNetwork>() {
        no_host_bits(text, "subnet", net)?;
        let key = match net {
            IpNetwork::V4(n) => SubnetKey::new(Some(n), None),
            IpNetwork::V6(n) => SubnetKey::new(None, Some(n)),
        };
        return key.ok_or_else(|| usage(format!("{text:?} holds no subnet")));
    }
    SubnetKey::parse(text).map_err(|e| usage(format!("{e}; or give a CIDR such as 198.19.5.0/24")))
}

/// `linen lease release`: deletes the key holding `asked` (a key listed live, or an expired or
/// unreadable one named in full), never a lease another host took after the list.
async fn release(reg: &dyn crate::lease::Registry, asked: SubnetKey, subnet: &str) -> Result<()> {
    // The stored key: the one given, or the dual-stack key holding the one subnet
    // given (`release 198.19.5.0/24` on a dual-stack network).
    let list = reg.list_leases().await?;
    let part_of = |k: &SubnetKey| {
        *k == asked
            || (asked.ipv6().is_none() && asked.ipv4().is_some() && k.ipv4() == asked.ipv4())
            || (asked.ipv4().is_none() && asked.ipv6().is_some() && k.ipv6() == asked.ipv6())
    };
    let matches: Vec<&crate::model::Lease> =
        list.leases.iter().filter(|l| part_of(&l.key)).collect();
    let exact = matches.iter().find(|l| l.key == asked);
    let l = match (exact, matches.as_slice()) {
        (Some(l), _) | (None, [l]) => *l,
        (None, []) => {
            // A key linen does not list (expired, or a value it cannot read) is still
            // removed when named in full (every family the network has), so that it
            // can be cleaned up.
            let full = reg.get_network_config().await.is_ok_and(|c| {
                c.network.is_some() == asked.ipv4().is_some()
                    && c.ipv6_network.is_some() == asked.ipv6().is_some()
            });
            let removed = if full && reg.revoke_dead(&asked).await? {
                "; the expired or unreadable entry stored under that key has been removed"
            } else {
                ""
            };
            bail!(
                "no live lease or reservation for {subnet} at {}{removed} (`linen lease \
                 list` shows what is there)",
                reg.location()
            );
        }
        (None, many) => {
            let keys: Vec<String> = many.iter().map(|l| l.key.to_string()).collect();
            bail!(
                "{asked} is part of several keys ({}); name the one to release",
                keys.join(", ")
            );
        }
    };
    let key = l.key;
    // Deleted only while it holds the lease listed: meanwhile that lease may have expired
    // and another host taken the key.
    if !reg.release_lease(l).await? {
        bail!(
            "{key} changed since it was listed (expired, released, or taken by another host) \
             and was left alone; `linen lease list` shows who holds it now"
        );
    }
    println!("released {key}");
    // A running holder renews or re-acquires it at once: say so, as the release
    // otherwise looks like it moved the host.
    // A reservation's host, if it runs and holds it, takes it again too, as an
    // ordinary lease (which a new reservation for another host then cannot replace).
    let (was, again) = if l.is_reservation() {
        (
            "a reservation for",
            "takes it again at once, as an ordinary lease",
        )
    } else {
        ("a lease of", "takes it again at once")
    };
    eprintln!(
        "note: {key} was {was} {}; a linen running there {again} (stop it first to move that \
         host to another subnet)",
        l.attrs.addresses()
    );
    Ok(())
}

/// `lease reserve` of a key that exists: the host at `public_ip` holding it keeps it as a
/// reservation (flannel's documented way: its lease rewritten without a TTL); a key another
/// host holds is refused, and one already reserved for `public_ip` is left as it is.
async fn reserve_held(
    reg: &dyn crate::lease::Registry,
    key: &SubnetKey,
    public_ip: IpAddr,
) -> Result<()> {
    let list = reg.list_leases().await?;
    let Some(held) = list.leases.into_iter().find(|l| l.key == *key) else {
        // Taken but not listed: expired a moment ago, or a value linen cannot read.
        bail!(
            "{key} is taken but holds no live lease linen can read (expired, or a malformed \
             value); `linen lease release {key}` removes it"
        );
    };
    let holder = [
        held.attrs.public_ip.map(IpAddr::V4),
        held.attrs.public_ipv6.map(IpAddr::V6),
    ];
    if !holder.contains(&Some(public_ip)) {
        let shown: Vec<String> = holder.iter().flatten().map(|a| a.to_string()).collect();
        let what = if held.is_reservation() {
            "reserved for"
        } else {
            "leased by"
        };
        bail!(
            "{key} is {what} another host ({}); release it first with `linen lease release \
             {key}`",
            shown.join(", ")
        );
    }
    if held.is_reservation() {
        println!("{key} is already reserved for {public_ip}");
        return Ok(());
    }
    match reg.keep_as_reservation(&held).await {
        Ok(_) => {
            println!("reserved {key} for {public_ip}: the lease it holds is now a reservation");
            Ok(())
        }
        Err(RegistryError::NotFound(_)) => {
            bail!("{key} changed while it was being reserved; run the command again")
        }
        Err(e) => Err(e).context("turning the lease into a reservation"),
    }
}

/// Runs `linen lease …`.
pub async fn lease(cmd: LeaseCommand) -> Result<()> {
    match cmd {
        LeaseCommand::List { registry, json } => {
            let reg = registry::open(&registry, crate::model::LEASE_TTL).await?;
            let list = reg.list_leases().await?;
            // No usable network here: most likely a mistyped --registry-dir or --etcd-prefix,
            // which would otherwise look like an empty cluster. (A registry that cannot be
            // read failed the list already.)
            match reg.get_network_config().await {
                Err(e @ RegistryError::ConfigNotFound { .. }) => {
                    tracing::warn!(
                        "no network uses this registry, so linen cannot lease from it: {e}"
                    );
                }
                Err(e @ RegistryError::BadConfig { .. }) => {
                    tracing::warn!("linen cannot lease from this registry: {e}");
                }
                Ok(config) => {
                    // Listed as they are, but flagged: a key of an older config, or written
                    // by hand, that no host of this network would take.
                    for l in &list.leases {
                        if !crate::lease::allocator::is_compatible(&config, &l.key) {
                            tracing::warn!(
                                subnet = %l.key,
                                "not a subnet this network leases (its config: `linen network \
                                 show`); left from an older config, or written by hand?"
                            );
                        }
                        let addrs = [
                            l.attrs.public_ip.map(IpAddr::V4),
                            l.attrs.public_ipv6.map(IpAddr::V6),
                        ];
                        for ip in addrs.into_iter().flatten() {
                            if let Some(why) = crate::cli::unreachable_reason(ip) {
                                tracing::warn!(subnet = %l.key, "its public address {ip} is {why}, which no peer can send to");
                            }
                        }
                    }
                }
                Err(_) => {}
            }
            if json {
                let items: Vec<serde_json::Value> = list
                    .leases
                    .iter()
                    .map(|l| {
                        serde_json::json!({
                            "subnet": l.key.to_string(),
                            "value": serde_json::from_str::<serde_json::Value>(&l.attrs.to_json()).unwrap_or_default(),
                            "expires_unix": l.expiration.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok()).map(|d| d.as_secs()),
                            "reservation": l.is_reservation(),
                        })
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({"revision": list.revision, "leases": items})
                );
                return Ok(());
            }
            println!(
                "{:<40} {:<18} {:<24} EXPIRES",
                "SUBNET", "PUBLIC IP", "PUBLIC IPV6"
            );
            for l in &list.leases {
                let expires = match l.expiration {
                    None => "never (reservation)".to_owned(),
                    Some(t) => match t.duration_since(SystemTime::now()) {
                        Ok(d) => format!("in {}", human(d)),
                        Err(_) => "expired".to_owned(),
                    },
                };
                println!(
                    "{:<40} {:<18} {:<24} {expires}",
                    l.key.to_string(),
                    l.attrs
                        .public_ip
                        .map(|a| a.to_string())
                        .unwrap_or_else(|| "-".into()),
                    l.attrs
                        .public_ipv6
                        .map(|a| a.to_string())
                        .unwrap_or_else(|| "-".into()),
                );
            }
            let n = list.leases.len();
            let plural = if n == 1 { "" } else { "s" };
            println!("{n} lease{plural} at revision {}", list.revision);
            Ok(())
        }
        LeaseCommand::Reserve {
            registry,
            subnet,
            public_ip,
        } => {
            let key = parse_subnet(&subnet)?;
            let reg = registry::open(&registry, crate::model::LEASE_TTL).await?;
            let config = reg.get_network_config().await?;
            // As `linen run` refuses such a host: the reservation could never be taken.
            if config.leases(public_ip) {
                return Err(usage(format!(
                    "{public_ip} is inside a subnet this network leases, so linen would not \
                     run on that host; a host's public IP must be outside SubnetMin..SubnetMax"
                )));
            }
            // A host with an IPv4 underlay address is known by it in a network with IPv4
            // (`allocator::is_ours`): one known by IPv6 there has no IPv4 address at all.
            if config.network.is_some() && public_ip.is_ipv6() {
                tracing::warn!(
                    "this network has IPv4, where a host with an IPv4 underlay address is known \
                     by it: only a host whose only underlay address is {public_ip} (IPv6-only, \
                     carrying the IPv4 overlay over IPv6) takes this reservation; for a host \
                     with an IPv4 address too, give --public-ip as that address"
                );
            }
            // Hosts of an IPv6-only network are known by their PublicIPv6 alone.
            if config.network.is_none() && public_ip.is_ipv4() {
                return Err(usage(format!(
                    "this network is IPv6-only, so its hosts are known by their IPv6 address: \
                     give --public-ip as the host's PublicIPv6, not {public_ip}"
                )));
            }
            for (subnet, family, has) in [
                (
                    key.ipv4().map(|n| n.to_string()),
                    "IPv4",
                    config.network.is_some(),
                ),
                (
                    key.ipv6().map(|n| n.to_string()),
                    "IPv6",
                    config.ipv6_network.is_some(),
                ),
            ] {
                if let Some(n) = subnet
                    && !has
                {
                    return Err(usage(format!(
                        "{n} is an {family} subnet, but this network has no {family} network \
                         (`linen network show` shows what it has)"
                    )));
                }
            }
            if let Some(n) = key.ipv4()
                && !config.is_valid_v4_subnet(n)
            {
                return Err(usage(format!(
                    "{n} is not a leasable subnet of this network: it must be a /{} between {} and {}",
                    config.subnet_len, config.subnet_min, config.subnet_max
                )));
            }
            if let Some(n) = key.ipv6()
                && !config.is_valid_v6_subnet(n)
            {
                return Err(usage(format!(
                    "{n} is not a leasable IPv6 subnet of this network: it must be a /{} between {} and {}",
                    config.ipv6_subnet_len, config.ipv6_subnet_min, config.ipv6_subnet_max
                )));
            }
            // A key without every family the network has is deleted by the host that finds it
            // (flannel does the same): name what is missing instead of writing it.
            if !crate::lease::allocator::is_compatible(&config, &key) {
                let mut need = Vec::new();
                if let Some(n) = config.network {
                    need.push(format!("an IPv4 /{} of {n}", config.subnet_len));
                }
                if let Some(n) = config.ipv6_network {
                    need.push(format!("an IPv6 /{} of {n}", config.ipv6_subnet_len));
                }
                return Err(usage(format!(
                    "{key} does not fit this network's families: a reservation needs {}; give \
                     a dual-stack key such as 198.19.5.0-24&fd00:19:0:5::-64",
                    need.join(" and ")
                )));
            }
            // Another key holding one of its subnets (a dual-stack key with the same IPv4 /24
            // and another IPv6 /64) would give that subnet to two hosts.
            let listed = reg.list_leases().await?.leases;
            if let Some(other) = listed.iter().find(|l| l.key != key && l.key.overlaps(&key)) {
                bail!(
                    "{key} overlaps {}, which is already leased or reserved; release that first \
                     with `linen lease release {}`",
                    other.key,
                    other.key
                );
            }
            let attrs = match public_ip {
                IpAddr::V4(ip) => LeaseAttrs::with_public_ip(ip),
                IpAddr::V6(ip) => LeaseAttrs {
                    public_ipv6: Some(ip),
                    ..LeaseAttrs::default()
                },
            };
            match reg.create_reservation(&key, &attrs).await {
                Ok(_) => {
                    println!("reserved {key} for {public_ip}");
                    // The host takes it when it next acquires, not at once: say so when it
                    // holds another lease now.
                    let holds = listed
                        .iter()
                        .find(|l| !l.is_reservation() && l.attrs.shares_address(&attrs));
                    if let Some(l) = holds {
                        eprintln!(
                            "note: {public_ip} holds the lease {} now; linen there takes the \
                             reservation when it next acquires (restart it to move now), and \
                             then releases that lease",
                            l.key
                        );
                    }
                    Ok(())
                }
                Err(RegistryError::AlreadyExists(_)) => {
                    reserve_held(reg.as_ref(), &key, public_ip).await
                }
                Err(e) => Err(e).context("creating the reservation"),
            }
        }
        LeaseCommand::Release { registry, subnet } => {
            let asked = parse_subnet(&subnet)?;
            let reg = registry::open(&registry, crate::model::LEASE_TTL).await?;
            release(reg.as_ref(), asked, &subnet).await
        }
    }
}

fn human(d: Duration) -> String {
    human_secs(d.as_secs())
}

/// A duration in seconds as `1h05m`, `4m09s` or `7s`.
pub(crate) fn human_secs(s: u64) -> String {
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod test {
    use async_trait::async_trait;

    use super::*;
    use crate::lease::directory::DirectoryRegistry;
    use crate::lease::{LeaseList, LeaseWatch, Registry, Revision};
    use crate::model::{Lease, NetworkConfigSpec};

    /// A directory registry where, right after each list, another host takes `key` over: the
    /// old holder's lease expired (or was released) between the list and the release.
    struct TakenAfterList {
        inner: DirectoryRegistry,
        key: SubnetKey,
        taker: LeaseAttrs,
    }

    #[async_trait]
    impl Registry for TakenAfterList {
        fn location(&self) -> String {
            self.inner.location()
        }
        async fn get_network_config(&self) -> Result<NetworkConfig, RegistryError> {
            self.inner.get_network_config().await
        }
        async fn put_network_config(&self, s: &NetworkConfigSpec) -> Result<(), RegistryError> {
            self.inner.put_network_config(s).await
        }
        async fn create_network_config(
            &self,
            s: &NetworkConfigSpec,
        ) -> Result<bool, RegistryError> {
            self.inner.create_network_config(s).await
        }
        async fn list_leases(&self) -> Result<LeaseList, RegistryError> {
            let list = self.inner.list_leases().await?;
            self.inner.revoke_lease(&self.key).await?;
            self.inner.create_lease(&self.key, &self.taker).await?;
            Ok(list)
        }
        async fn create_lease(
            &self,
            key: &SubnetKey,
            attrs: &LeaseAttrs,
        ) -> Result<Lease, RegistryError> {
            self.inner.create_lease(key, attrs).await
        }
        async fn create_reservation(
            &self,
            key: &SubnetKey,
            attrs: &LeaseAttrs,
        ) -> Result<Lease, RegistryError> {
            self.inner.create_reservation(key, attrs).await
        }
        async fn renew_lease(&self, l: &Lease, a: &LeaseAttrs) -> Result<Lease, RegistryError> {
            self.inner.renew_lease(l, a).await
        }
        async fn keep_as_reservation(&self, l: &Lease) -> Result<Lease, RegistryError> {
            self.inner.keep_as_reservation(l).await
        }
        async fn revoke_lease(&self, key: &SubnetKey) -> Result<bool, RegistryError> {
            self.inner.revoke_lease(key).await
        }
        async fn release_lease(&self, l: &Lease) -> Result<bool, RegistryError> {
            self.inner.release_lease(l).await
        }
        async fn revoke_dead(&self, key: &SubnetKey) -> Result<bool, RegistryError> {
            self.inner.revoke_dead(key).await
        }
        async fn watch_leases(&self, r: Revision) -> Result<Box<dyn LeaseWatch>, RegistryError> {
            self.inner.watch_leases(r).await
        }
        fn lease_ttl(&self) -> Duration {
            self.inner.lease_ttl()
        }
    }

    fn host(n: u8) -> LeaseAttrs {
        LeaseAttrs::with_public_ip(std::net::Ipv4Addr::new(198, 18, 0, n))
    }

    fn registry() -> (tempfile::TempDir, DirectoryRegistry) {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("config"), r#"{"Network":"198.19.0.0/16"}"#).unwrap();
        let r = DirectoryRegistry::new(d.path());
        (d, r)
    }

    async fn holders(reg: &DirectoryRegistry) -> Vec<LeaseAttrs> {
        let list = reg.list_leases().await.unwrap();
        list.leases.into_iter().map(|l| l.attrs).collect()
    }

    /// `lease release` never deletes a lease another host took after the list: a listed lease
    /// is deleted only while it is still the one listed, and an unlisted key only while it
    /// holds no lease.
    #[tokio::test]
    async fn a_key_taken_over_after_the_list_is_left_alone() {
        let key: SubnetKey = "198.19.5.0-24".parse().unwrap();
        let taken = |reg: &DirectoryRegistry| TakenAfterList {
            inner: reg.clone(),
            key,
            taker: host(2),
        };
        // Listed live (host 1's), then taken over by host 2.
        let (_d, reg) = registry();
        reg.create_lease(&key, &host(1)).await.unwrap();
        let err = release(&taken(&reg), key, "198.19.5.0/24")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("left alone"), "{err}");
        assert_eq!(holders(&reg).await, [host(2)]);
        // Expired, so not listed, then taken over by host 2.
        let (d, reg) = registry();
        std::fs::create_dir_all(d.path().join("subnets")).unwrap();
        std::fs::write(
            d.path().join("subnets/198.19.5.0-24"),
            "{\"PublicIP\":\"198.18.0.1\"}\nexpires=1\n",
        )
        .unwrap();
        let err = release(&taken(&reg), key, "198.19.5.0/24")
            .await
            .unwrap_err();
        assert!(!err.to_string().contains("removed"), "{err}");
        assert_eq!(holders(&reg).await, [host(2)]);
    }
}
