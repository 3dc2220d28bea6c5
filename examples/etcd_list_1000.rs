//! Measures `EtcdRegistry::list_leases` with N leases (default 1,000), each on its own etcd
//! lease as real hosts hold them: a new daemon's first list (nothing cached) and a repeat.
//!
//! ```text
//! cargo run --release --example etcd_list_1000 -- http://127.0.0.1:2379 [N]
//! ```
//! It writes under the prefix `/linen-list-bench` and deletes it (and its leases) afterwards.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use ipnetwork::Ipv4Network;
use linen::lease::Registry;
use linen::lease::etcd::{EtcdOptions, EtcdRegistry};
use linen::model::{LeaseAttrs, SubnetKey};

const PREFIX: &str = "/linen-list-bench";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let endpoint = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:2379".into());
    let n: u32 = args.next().map_or(Ok(1000), |a| a.parse())?;
    let options = EtcdOptions {
        endpoints: vec![endpoint],
        prefix: PREFIX.into(),
        lease_ttl: Duration::from_secs(600),
        ..EtcdOptions::default()
    };
    let writer = EtcdRegistry::connect(&options).await?;
    let t = Instant::now();
    let mut pending = Vec::new();
    for i in 0..n {
        // 10.0.0.0/8 in /24s: room for 65,536 leases.
        let net = Ipv4Addr::from(0x0a00_0000u32 + (i << 8));
        let key = SubnetKey::v4(Ipv4Network::new(net, 24)?);
        let attrs = LeaseAttrs::with_public_ip(Ipv4Addr::from(0xc612_0000u32 + i));
        let w = writer.clone();
        pending.push(tokio::spawn(
            async move { w.create_lease(&key, &attrs).await },
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
    println!("created {n} leases in {:?}", t.elapsed());

    for round in 1..=3 {
        // A new registry has an empty TTL cache, like a daemon that just started.
        let fresh = EtcdRegistry::connect(&options).await?;
        let t = Instant::now();
        let list = fresh.list_leases().await?;
        let cold = t.elapsed();
        let t = Instant::now();
        fresh.list_leases().await?;
        let warm = t.elapsed();
        println!(
            "round {round}: {} leases, first list {cold:?}, repeated list {warm:?}",
            list.leases.len()
        );
    }

    let list = writer.list_leases().await?;
    for lease in &list.leases {
        writer.revoke_lease(&lease.key).await?;
    }
    Ok(())
}
