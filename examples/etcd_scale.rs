//! Scale figures for the etcd v3 registry with N leases (default 1,000), each on its own etcd
//! lease as real hosts hold them:
//!
//! - **initial sync**: what a daemon that just started does before it can forward — a fresh
//!   `EtcdRegistry` (empty TTL cache) lists every lease and the forwarding `Snapshot` is built
//!   from them (`daemon::snapshot_for`). Several rounds, each with a new registry.
//! - **propagation**: a `LeaseManager` (acquire + `run`: list, watch, tracker) feeds a publisher
//!   task that does what `linen run`'s does — clone the state, build the snapshot, publish it
//!   into a `Table`. Another registry handle writes W new leases (default 200) one at a time;
//!   each is timed from the start of its `create_lease` to the publish of the first snapshot
//!   that routes it.
//!
//! ```text
//! cargo run --release --example etcd_scale [-- [--endpoint URL] [--leases N] [--writes W]]
//! ```
//! Without `--endpoint` it starts its own etcd on loopback (data on tmpfs; the `etcd` binary
//! must be installed) and removes it afterwards. With one, it writes under the prefix
//! `/linen-scale-bench` and deletes what it wrote.

#[allow(dead_code)]
#[path = "../tests/common/etcd.rs"]
mod etcd;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ipnetwork::Ipv4Network;
use linen::daemon::snapshot_for;
use linen::dataplane::io::Source;
use linen::lease::Registry;
use linen::lease::etcd::{EtcdOptions, EtcdRegistry};
use linen::lease::manager::{LeaseManager, LeaseState, ManagerOptions};
use linen::model::{LeaseAttrs, NetworkConfig, SubnetKey};
use linen::table::{Snapshot, Table};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const PREFIX: &str = "/linen-scale-bench";
const PORT: u16 = 8285;
/// /28s of 198.19.0.0/16: room for 4,095 leases.
const CONFIG: &str = r#"{"Network":"198.19.0.0/16","SubnetLen":28}"#;
/// The written leases start at this subnet index, above the ones the manager may pick.
const WRITES_FROM: u32 = 2000;
const SYNC_ROUNDS: usize = 20;

/// The i-th /28 of the overlay (i ≥ 1) and a public IP of its own.
fn lease(i: u32) -> (SubnetKey, LeaseAttrs) {
    let net = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + (i << 4));
    let key = SubnetKey::v4(Ipv4Network::new(net, 28).expect("a /28"));
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + i);
    (key, LeaseAttrs::with_public_ip(ip))
}

struct Args {
    endpoint: Option<String>,
    leases: u32,
    writes: u32,
}

fn args() -> anyhow::Result<Args> {
    let mut out = Args {
        endpoint: None,
        leases: 1000,
        writes: 200,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--endpoint" => out.endpoint = Some(value),
            "--leases" => out.leases = value.parse()?,
            "--writes" => out.writes = value.parse()?,
            _ => bail!("unknown argument {flag}; see the comment at the top of etcd_scale.rs"),
        }
    }
    if out.leases >= WRITES_FROM || out.writes == 0 || WRITES_FROM + out.writes > 4095 {
        bail!(
            "--leases must be below {WRITES_FROM} and --writes 1..={}",
            4095 - WRITES_FROM
        );
    }
    Ok(out)
}

/// Creates leases `range` concurrently (64 in flight), as many hosts starting at once would.
async fn fill(registry: &EtcdRegistry, range: std::ops::Range<u32>) -> anyhow::Result<()> {
    let mut pending = Vec::new();
    for i in range {
        let (key, attrs) = lease(i);
        let r = registry.clone();
        pending.push(tokio::spawn(
            async move { r.create_lease(&key, &attrs).await },
        ));
        if pending.len() == 64 {
            for p in pending.drain(..) {
                p.await??;
            }
        }
    }
    for p in pending {
        p.await??;
    }
    Ok(())
}

/// (p50, p99, max) of `samples`.
fn percentiles(samples: &mut [Duration]) -> (Duration, Duration, Duration) {
    samples.sort();
    let at =
        |q: f64| samples[((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1];
    (at(0.5), at(0.99), samples[samples.len() - 1])
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = args()?;
    let server = match &args.endpoint {
        Some(_) => None,
        None => Some(etcd::EtcdServer::start().context("the etcd binary is needed")?),
    };
    let endpoint = args
        .endpoint
        .clone()
        .or_else(|| server.as_ref().map(etcd::EtcdServer::endpoint))
        .expect("an endpoint");
    let options = EtcdOptions {
        endpoints: vec![endpoint.clone()],
        prefix: PREFIX.into(),
        lease_ttl: Duration::from_secs(600),
        ..EtcdOptions::default()
    };
    let config = NetworkConfig::from_json(CONFIG)?;
    let writer = EtcdRegistry::connect(&options).await?;
    let t = Instant::now();
    fill(&writer, 1..args.leases + 1).await?;
    println!("created {} leases in {:?}", args.leases, t.elapsed());

    // Initial sync: a new registry lists everything, then the table is built.
    let (own, _) = lease(4095);
    let attrs = LeaseAttrs::with_public_ip(Ipv4Addr::new(198, 18, 255, 254));
    let mut sync = Vec::new();
    for round in 1..=SYNC_ROUNDS {
        let fresh = EtcdRegistry::connect(&options).await?;
        let t = Instant::now();
        let list = fresh.list_leases().await?;
        let listed = t.elapsed();
        let snap = snapshot_for(&own, &attrs, &list.leases, PORT, 1, Source::default());
        let total = t.elapsed();
        assert_eq!(snap.len(), list.leases.len());
        println!(
            "sync round {round}: {} leases, list {}, build {}, total {}",
            list.leases.len(),
            ms(listed),
            ms(total - listed),
            ms(total)
        );
        sync.push(total);
    }

    // Propagation: a daemon's control plane and publisher; another handle writes.
    let registry: Arc<dyn Registry> = Arc::new(EtcdRegistry::connect(&options).await?);
    let mut manager = LeaseManager::new(registry, config, ManagerOptions::new(attrs.clone()));
    let own = manager.acquire().await?;
    let mut state = manager.subscribe();
    let cancel = CancellationToken::new();
    let control = tokio::spawn(manager.run(cancel.clone()));
    let table = Table::new(Snapshot::empty());
    let (published_tx, mut published) = mpsc::unbounded_channel::<(Instant, Arc<Snapshot>)>();
    let publisher = {
        let table = table.clone();
        tokio::spawn(async move {
            loop {
                let current: LeaseState = state.borrow_and_update().clone();
                if let Some(own) = &current.own {
                    table.publish(snapshot_for(
                        &own.key,
                        &attrs,
                        &current.peers,
                        PORT,
                        current.generation,
                        Source::default(),
                    ));
                    if published_tx
                        .send((Instant::now(), table.load_full()))
                        .is_err()
                    {
                        break;
                    }
                }
                if state.changed().await.is_err() {
                    break;
                }
            }
        })
    };
    // Wait until the manager's watch has delivered the existing leases.
    while table.load_full().len() < args.leases as usize {
        published.recv().await.context("the publisher stopped")?;
    }
    while published.try_recv().is_ok() {}

    let mut latencies = Vec::new();
    let mut creates = Vec::new();
    for i in WRITES_FROM..WRITES_FROM + args.writes {
        let (key, attrs) = lease(i);
        let addr = key.ipv4().expect("IPv4").network();
        let start = Instant::now();
        writer.create_lease(&key, &attrs).await?;
        creates.push(start.elapsed());
        let at = loop {
            let (at, snap) = tokio::time::timeout(Duration::from_secs(10), published.recv())
                .await
                .with_context(|| format!("lease {key} was not published within 10 s"))?
                .context("the publisher stopped")?;
            if snap.lookup_v4(addr).is_some() {
                break at;
            }
        };
        latencies.push(at - start);
    }
    cancel.cancel();
    let _ = control.await;
    publisher.abort();

    let (s50, s99, smax) = percentiles(&mut sync);
    let (p50, p99, pmax) = percentiles(&mut latencies);
    let (c50, c99, cmax) = percentiles(&mut creates);
    println!();
    println!(
        "etcd scale: {} leases in etcd at {endpoint}, own lease {}, {} writes",
        args.leases, own.key, args.writes
    );
    println!("| measure | p50 | p99 | max | target |");
    println!("|---|---|---|---|---|");
    println!(
        "| initial sync: list + build ({SYNC_ROUNDS} new registries) | {} | {} | {} | ≤ 500 ms |",
        ms(s50),
        ms(s99),
        ms(smax)
    );
    println!(
        "| propagation: write → table published ({} writes) | {} | {} | {} | ≤ 100 ms p99 |",
        args.writes,
        ms(p50),
        ms(p99),
        ms(pmax)
    );
    println!(
        "| create_lease, its overlap check included ({} writes) | {} | {} | {} | |",
        args.writes,
        ms(c50),
        ms(c99),
        ms(cmax)
    );
    println!("command: cargo run --release --example etcd_scale");

    if server.is_none() {
        // Someone else's etcd: remove what was written.
        for lease in writer.list_leases().await?.leases {
            writer.revoke_lease(&lease.key).await?;
        }
    }
    Ok(())
}
