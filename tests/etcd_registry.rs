//! `EtcdRegistry` against a real etcd on loopback (skipped, visibly, when `etcd` is missing).

#![cfg(feature = "etcd")]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use common::etcd::{EtcdServer, ServerTls};
use etcd_client::{Client, CompactionOptions, GetOptions};
use ipnetwork::Ipv4Network;
use linen::lease::etcd::{EtcdOptions, EtcdRegistry, EtcdSetupError};
use linen::lease::{LeaseChange, LeaseWatch, Registry, RegistryError, WatchEvent};
use linen::model::{DEFAULT_PREFIX, Lease, LeaseAttrs, NetworkConfigSpec, SubnetKey};

fn options(server: &EtcdServer, ttl: Duration) -> EtcdOptions {
    EtcdOptions {
        endpoints: vec![server.endpoint()],
        lease_ttl: ttl,
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(5),
        ..EtcdOptions::default()
    }
}

async fn registry(server: &EtcdServer, ttl: Duration) -> EtcdRegistry {
    EtcdRegistry::connect(&options(server, ttl))
        .await
        .expect("connect to the test etcd")
}

fn subnet(third: u8) -> SubnetKey {
    SubnetKey::v4(Ipv4Network::new(Ipv4Addr::new(198, 19, third, 0), 24).unwrap())
}

fn host(n: u8) -> LeaseAttrs {
    LeaseAttrs::with_public_ip(Ipv4Addr::new(198, 18, 1, n))
}

/// etcd's own view of the etcd leases that exist.
async fn etcd_lease_count(client: &mut Client) -> usize {
    client.leases().await.unwrap().leases().len()
}

/// The key's etcd lease ID (0: none), or `None` when the key is absent.
async fn key_lease(client: &mut Client, path: &str) -> Option<i64> {
    let resp = client.get(path, None).await.unwrap();
    resp.kvs().first().map(|kv| kv.lease())
}

/// Polls `check` until it returns `Some`, failing after `deadline`.
async fn eventually<T, F: Future<Output = Option<T>>>(
    what: &str,
    deadline: Duration,
    mut check: impl FnMut() -> F,
) -> T {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < end,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a watch consumer knows: the lease set it rebuilds from events.
#[derive(Default)]
struct Follower {
    known: BTreeMap<SubnetKey, Lease>,
    /// Every key ever reported present (by a put or a snapshot).
    seen: BTreeSet<SubnetKey>,
    snapshots: usize,
    errors: usize,
}

impl Follower {
    fn apply(&mut self, event: WatchEvent) {
        match event {
            WatchEvent::Snapshot(list) => {
                self.snapshots += 1;
                self.known = list.leases.into_iter().map(|l| (l.key, l)).collect();
                self.seen.extend(self.known.keys().copied());
            }
            WatchEvent::Changes { changes, .. } => {
                for change in changes {
                    match change {
                        LeaseChange::Put(l) => {
                            self.seen.insert(l.key);
                            self.known.insert(l.key, l);
                        }
                        LeaseChange::Delete(k) => {
                            self.known.remove(&k);
                        }
                    }
                }
            }
        }
    }

    /// Applies events (backing off on errors) until `done` holds or `deadline` passes.
    async fn follow_until(
        &mut self,
        watch: &mut Box<dyn LeaseWatch>,
        deadline: Duration,
        done: impl Fn(&Follower) -> bool,
    ) {
        let end = Instant::now() + deadline;
        while !done(self) {
            let left = end.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "watch did not reach the expected state in {deadline:?}"
            );
            match tokio::time::timeout(left, watch.next()).await {
                Ok(Ok(event)) => self.apply(event),
                Ok(Err(e)) => {
                    assert!(e.is_transient(), "watch failed for good: {e}");
                    self.errors += 1;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(_) => panic!("watch did not reach the expected state in {deadline:?}"),
            }
        }
    }

    fn keys(&self) -> BTreeSet<SubnetKey> {
        self.known.keys().copied().collect()
    }
}

async fn real_keys(reg: &EtcdRegistry) -> BTreeSet<SubnetKey> {
    reg.list_leases()
        .await
        .unwrap()
        .leases
        .into_iter()
        .map(|l| l.key)
        .collect()
}

/// A TCP proxy on loopback to `upstream` (`host:port`) that counts the connections made to it.
fn counting_proxy(upstream: String) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let count = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = std::sync::Arc::clone(&count);
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            counted.fetch_add(1, Ordering::SeqCst);
            let Ok(server) = std::net::TcpStream::connect(&upstream) else {
                continue;
            };
            for (mut from, mut to) in [
                (client.try_clone().unwrap(), server.try_clone().unwrap()),
                (server, client),
            ] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    (format!("http://{addr}"), count)
}

/// A connection with no stream open is not pinged: etcd counts each such ping as a strike and
/// closes the connection at the third (GOAWAY "too_many_pings"), so idle member connections
/// were torn down and made again every few pings. Pings every second here, so the third
/// comes within the 8 s idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_not_pinged_away() {
    let Some(server) = EtcdServer::start() else {
        return;
    };
    let upstream = server.endpoint().trim_start_matches("http://").to_owned();
    let (endpoint, connections) = counting_proxy(upstream);
    let reg = EtcdRegistry::connect(&EtcdOptions {
        endpoints: vec![endpoint],
        keep_alive: Duration::from_secs(1),
        ..options(&server, Duration::from_secs(60))
    })
    .await
    .unwrap();
    reg.list_leases().await.unwrap();
    tokio::time::sleep(Duration::from_secs(8)).await;
    reg.list_leases().await.unwrap();
    assert_eq!(
        connections.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the idle connection was closed and made again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_flannels_keys_and_values() {
    let Some(server) = EtcdServer::start() else {
        return;
    };
    let reg = registry(&server, Duration::from_secs(60)).await;
    let mut client = reg.client();

    let err = reg.get_network_config().await.unwrap_err();
    assert!(matches!(err, RegistryError::ConfigNotFound { .. }), "{err}");
    assert!(err.to_string().contains("etcd v3 API"), "{err}");
    assert!(
        err.to_string().contains("/coreos.com/network/config"),
        "{err}"
    );

    let spec =
        NetworkConfigSpec::from_json(r#"{"Network":"198.19.0.0/16","SubnetLen":24}"#).unwrap();
    // Created only where there is none (two `network init` at once: one wins).
    assert!(reg.create_network_config(&spec).await.unwrap());
    let other = NetworkConfigSpec::from_json(r#"{"Network":"198.19.0.0/20"}"#).unwrap();
    assert!(!reg.create_network_config(&other).await.unwrap());
    reg.put_network_config(&spec).await.unwrap();
    let config = reg.get_network_config().await.unwrap();
    assert_eq!(config.subnet_len, 24);
    assert_eq!(config.network, spec.network);
    let bad = NetworkConfigSpec::from_json(r#"{"Network":"198.19.0.0/30"}"#).unwrap();
    assert!(matches!(
        reg.put_network_config(&bad).await,
        Err(RegistryError::BadConfig { .. })
    ));
    client
        .put(format!("{DEFAULT_PREFIX}/config"), "{\"Network\":12}", None)
        .await
        .unwrap();
    assert!(matches!(
        reg.get_network_config().await,
        Err(RegistryError::BadConfig { .. })
    ));

    let lease = reg.create_lease(&subnet(1), &host(1)).await.unwrap();
    let path = "/coreos.com/network/subnets/198.19.1.0-24";
    assert_eq!(reg.subnet_path(&subnet(1)), path);
    let resp = client.get(path, None).await.unwrap();
    let kv = &resp.kvs()[0];
    assert_eq!(
        kv.value(),
        br#"{"PublicIP":"198.18.1.1","PublicIPv6":null}"#
    );
    assert_eq!(Some(kv.lease()), lease.lease_id);
    let ttl = client.lease_time_to_live(kv.lease(), None).await.unwrap();
    assert_eq!(ttl.granted_ttl(), 60);
    let expires_in = lease
        .expiration
        .unwrap()
        .duration_since(SystemTime::now())
        .unwrap();
    assert!(expires_in > Duration::from_secs(55) && expires_in <= Duration::from_secs(60));

    assert!(matches!(
        reg.create_lease(&subnet(1), &host(2)).await,
        Err(RegistryError::AlreadyExists(k)) if k == subnet(1)
    ));
    assert!(matches!(
        reg.create_reservation(&subnet(1), &host(2)).await,
        Err(RegistryError::AlreadyExists(_))
    ));
    // The losing create revoked its grant: only the winner's etcd lease exists.
    assert_eq!(etcd_lease_count(&mut client).await, 1);

    let reservation = reg.create_reservation(&subnet(2), &host(2)).await.unwrap();
    assert_eq!((reservation.expiration, reservation.lease_id), (None, None));
    assert_eq!(
        key_lease(&mut client, &reg.subnet_path(&subnet(2))).await,
        Some(0)
    );

    let list = reg.list_leases().await.unwrap();
    assert_eq!(list.leases.len(), 2);
    assert_eq!(list.leases[0].key, subnet(1));
    assert_eq!(list.leases[0].lease_id, lease.lease_id);
    assert!(list.leases[0].expiration.is_some());
    assert!(list.leases[1].is_reservation());
    assert!(list.revision > 0);

    // Revoking deletes the key and frees its etcd lease; a missing key is fine.
    assert!(reg.revoke_lease(&subnet(1)).await.unwrap());
    assert!(!reg.revoke_lease(&subnet(1)).await.unwrap());
    assert_eq!(key_lease(&mut client, path).await, None);
    assert_eq!(etcd_lease_count(&mut client).await, 0);
    assert!(matches!(
        reg.renew_lease(&lease, &host(1)).await,
        Err(RegistryError::NotFound(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_acquirers_get_distinct_subnets() {
    let Some(server) = EtcdServer::start() else {
        return;
    };
    let options = options(&server, Duration::from_secs(300));
    let mut tasks = Vec::new();
    for n in 0..50u8 {
        let options = options.clone();
        tasks.push(tokio::spawn(async move {
            let reg = EtcdRegistry::connect(&options).await.unwrap();
            let me = host(n + 1);
            for _ in 0..200 {
                let taken: BTreeSet<u8> = reg
                    .list_leases()
                    .await
                    .unwrap()
                    .leases
                    .iter()
                    .map(|l| l.key.ipv4().unwrap().network().octets()[2])
                    .collect();
                // Like flannel: a random one of the first free candidates (here 10, to race).
                let free: Vec<u8> = (1..=255u8)
                    .filter(|t| !taken.contains(t))
                    .take(10)
                    .collect();
                let pick = free[rand::random_range(0..free.len())];
                match reg.create_lease(&subnet(pick), &me).await {
                    Ok(lease) => return (lease.key, me),
                    Err(RegistryError::AlreadyExists(_)) => continue,
                    Err(e) => panic!("acquirer {n}: {e}"),
                }
            }
            panic!("acquirer {n} lost 200 races");
        }));
    }
    let mut won = BTreeMap::new();
    for t in tasks {
        let (key, attrs) = t.await.unwrap();
        assert!(
            won.insert(key, attrs).is_none(),
            "{key} was handed out twice"
        );
    }
    assert_eq!(won.len(), 50);
    let reg = registry(&server, Duration::from_secs(300)).await;
    let stored: BTreeMap<SubnetKey, LeaseAttrs> = reg
        .list_leases()
        .await
        .unwrap()
        .leases
        .into_iter()
        .map(|l| (l.key, l.attrs))
        .collect();
    assert_eq!(stored, won);
    // Every lost race revoked its grant.
    assert_eq!(etcd_lease_count(&mut reg.client()).await, 50);
}

/// Dual-stack hosts racing through the lease manager's acquisition: two may pick the same
/// IPv4 subnet with different IPv6 ones, whose keys differ, so etcd's create transaction lets
/// both in; the later one must give way. 31 IPv4 candidates for 20 hosts make such picks likely.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_acquirers_never_share_a_subnet() {
    let Some(server) = EtcdServer::start() else {
        return;
    };
    let config = linen::model::NetworkConfig::from_json(
        r#"{"Network":"198.19.0.0/19","SubnetLen":24,"EnableIPv6":true,
            "IPv6Network":"fd00:19::/48","IPv6SubnetLen":64}"#,
    )
    .unwrap();
    let options = options(&server, Duration::from_secs(300));
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(20));
    let mut tasks = Vec::new();
    for n in 1..=20u8 {
        let (options, config, start) = (options.clone(), config.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            let reg = EtcdRegistry::connect(&options).await.unwrap();
            let mut attrs = host(n);
            attrs.public_ipv6 = Some(format!("fd00:18::{n}").parse().unwrap());
            let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(n.into());
            start.wait().await;
            linen::lease::manager::acquire(&reg, &config, &attrs, None, &mut rng)
                .await
                .unwrap()
                .key
        }));
    }
    let mut keys = Vec::new();
    for t in tasks {
        keys.push(t.await.unwrap());
    }
    let v4: BTreeSet<_> = keys.iter().map(|k| k.ipv4().unwrap()).collect();
    let v6: BTreeSet<_> = keys.iter().map(|k| k.ipv6().unwrap()).collect();
    assert_eq!((v4.len(), v6.len()), (20, 20), "{keys:?}");
    // What is stored agrees, and every key that gave way revoked its etcd lease.
    let reg = registry(&server, Duration::from_secs(300)).await;
    assert_eq!(real_keys(&reg).await, keys.iter().copied().collect());
    assert_eq!(etcd_lease_count(&mut reg.client()).await, 20);
}

/// A key sharing a subnet with an existing one gives way, whether it is a lease or a
/// reservation, and the existing key stays as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_sharing_a_subnet_with_an_earlier_one_gives_way() {
    let Some(server) = EtcdServer::start() else {
        return;
    };
    let reg = registry(&server, Duration::from_secs(300)).await;
    let held: SubnetKey = "198.19.62.0-24&fd00:19:0:2::-64".parse().unwrap();
    reg.create_lease(&held, &host(1)).await.unwrap();
    for other in [
        "198.19.62.0-24&fd00:19:0:32::-64",
        "198.19.13.0-24&fd00:19:0:2::-64",
        "198.19.62.128-25&fd00:19:0:3::-64",
    ] {
        let other: SubnetKey = other.parse().unwrap();
        let err = reg.create_lease(&other, &host(2)).await.unwrap_err();
        assert!(
            matches!(err, RegistryError::Overlaps { key: k, other: o } if k == other && o == held),
            "{other}: {err:?}"
        );
        let err = reg.create_reservation(&other, &host(2)).await.unwrap_err();
        assert!(
            matches!(err, RegistryError::Overlaps { .. }),
            "{other}: {err:?}"
        );
    }
    assert_eq!(real_keys(&reg).await, BTreeSet::from([held]));
    // The grants of the keys that gave way were revoked.
    assert_eq!(etcd_lease_count(&mut reg.client()).await, 1);
    // Unrelated subnets are not held back.
    let free: SubnetKey = "198.19.63.0-24&fd00:19:0:3::-64".parse().unwrap();
    reg.create_lease(&free, &host(3)).await.unwrap();
}

/// A later key overlapping an earlier one that never went through linen's check (written by a
/// flanneld, an older linen, or left by a check an etcd outage cut short) gives way when it is
/// renewed; the earlier one keeps renewing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_overlapping_lease_gives_way_at_renewal() {
    let Some(server) = EtcdServer::start() else {
        return;
    };
    let reg = registry(&server, Duration::from_secs(300)).await;
    let earlier: SubnetKey = "198.19.62.0-24&fd00:19:0:2::-64".parse().unwrap();
    let first = reg.create_lease(&earlier, &host(1)).await.unwrap();
    // As flanneld creates it: a granted etcd lease and a put, no look at other keys.
    let later: SubnetKey = "198.19.62.0-24&fd00:19:0:32::-64".parse().unwrap();
    let mut client = reg.client();
    let grant = client.lease_grant(300, None).await.unwrap().id();
    client
        .put(
            reg.subnet_path(&later),
            host(2).to_json(),
            Some(etcd_client::PutOptions::new().with_lease(grant)),
        )
        .await
        .unwrap();
    let second = Lease {
        key: later,
        attrs: host(2),
        expiration: Some(SystemTime::now()),
        lease_id: Some(grant),
    };
    // The earlier one renews while the later one is still there; then the later gives way.
    let first = reg.renew_lease(&first, &host(1)).await.unwrap();
    let err = reg.renew_lease(&second, &host(2)).await.unwrap_err();
    assert!(
        matches!(err, RegistryError::NotFound(k) if k == later),
        "{err:?}"
    );
    reg.renew_lease(&first, &host(1)).await.unwrap();
    assert_eq!(real_keys(&reg).await, BTreeSet::from([earlier]));
    // The given-up key's etcd lease went with it.
    assert_eq!(etcd_lease_count(&mut client).await, 1);

    // A reservation written later by hand (`etcdctl put`, as flannel documents) keeps its
    // subnets against an earlier lease, as in a directory registry.
    let reserved: SubnetKey = "198.19.70.0-24&fd00:19:0:2::-64".parse().unwrap();
    client
        .put(reg.subnet_path(&reserved), host(3).to_json(), None)
        .await
        .unwrap();
    let err = reg.renew_lease(&first, &host(1)).await.unwrap_err();
    assert!(matches!(err, RegistryError::NotFound(_)), "{err:?}");
    let kept = Lease {
        key: reserved,
        attrs: host(3),
        expiration: None,
        lease_id: None,
    };
    reg.renew_lease(&kept, &host(3)).await.unwrap();
    assert_eq!(real_keys(&reg).await, BTreeSet::from([reserved]));

    // A reservation of another length (by hand, or by a compromised host) covers a lease but
    // holds none of its subnets: the lease keeps renewing.
    let leased: SubnetKey = "198.19.71.0-24&fd00:19:0:4::-64".parse().unwrap();
    let lease = reg.create_lease(&leased, &host(4)).await.unwrap();
    let wide: SubnetKey = "128.0.0.0-1".parse().unwrap();
    client
        .put(reg.subnet_path(&wide), host(5).to_json(), None)
        .await
        .unwrap();
    reg.renew_lease(&lease, &host(4)).await.unwrap();
    assert_eq!(
        real_keys(&reg).await,
        BTreeSet::from([reserved, leased, wide])
    );

    // A reservation with a malformed value (a typo in a hand-written address) is skipped
    // by list and watch, so no host routes it, and no lease gives way to it either.
    let typo: SubnetKey = "198.19.71.0-24&fd00:19:0:5::-64".parse().unwrap();
    client
        .put(
            reg.subnet_path(&typo),
            r#"{"PublicIP":"198.18.1.300"}"#,
            None,
        )
        .await
        .unwrap();
    reg.renew_lease(&lease, &host(4)).await.unwrap();
    assert!(real_keys(&reg).await.contains(&leased));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_extends_the_ttl_and_reuses_the_etcd_lease() {
    let Some(server) = EtcdServer::start() else {
        return;
    };
    let reg = registry(&server, Duration::from_secs(10)).await;
    let mut client = reg.client();
    let path = reg.subnet_path(&subnet(3));

    let first = reg.create_lease(&subnet(3), &host(3)).await.unwrap();
    let id = first.lease_id.unwrap();
    // etcd reports whole seconds, rounded down: at most 5 left of 10 after 5 s, and at least 6
    // within 4 s of a renewal, slack enough for a loaded machine (each wait below leaves the
    // lease 6 s too).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = client.lease_time_to_live(id, None).await.unwrap().ttl();
    assert!(before <= 5, "ttl before renewal: {before}");

    let mut lease = first.clone();
    for round in 0..3u8 {
        // The last round changes the value: still the same etcd lease.
        let attrs = if round == 2 { host(33) } else { host(3) };
        lease = reg.renew_lease(&lease, &attrs).await.unwrap();
        assert_eq!(lease.lease_id, Some(id));
        assert_eq!(lease.attrs, attrs);
        let ttl = client.lease_time_to_live(id, None).await.unwrap().ttl();
        assert!(ttl >= 6, "ttl after renewal {round}: {ttl}");
        assert_eq!(
            etcd_lease_count(&mut client).await,
            1,
            "a renewal leaked an etcd lease"
        );
    }
    assert!(lease.expiration.unwrap() > first.expiration.unwrap());
    let resp = client.get(path.as_str(), None).await.unwrap();
    assert_eq!(resp.kvs()[0].value(), host(33).to_json().as_bytes());
    assert_eq!(resp.kvs()[0].lease(), id);

    // Renewing keeps the key alive past its first TTL.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(4)).await;
        lease = reg.renew_lease(&lease, &host(33)).await.unwrap();
    }
    assert!(first.expiration.unwrap() < SystemTime::now());
    assert_eq!(key_lease(&mut client, &path).await, Some(id));

    // A key taken over by another host is not renewed.
    reg.revoke_lease(&subnet(3)).await.unwrap();
    let other = reg.create_lease(&subnet(3), &host(4)).await.unwrap();
    assert!(matches!(
        reg.renew_lease(&lease, &host(33)).await,
        Err(RegistryError::NotFound(_))
    ));
    assert_eq!(key_lease(&mut client, &path).await, other.lease_id);
}

/// A TTL below etcd's minimum (1.5 election timeouts: 2 s here) is raised by etcd; the
/// renewal compares the lease's TTL with what the grant gave, not with what was asked, or
/// every renewal moved the key to a new etcd lease (and every peer looked the new one up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ttl_raised_by_etcd_keeps_its_lease_at_renewal() {
    let Some(server) = EtcdServer::start() else {
        return;
    };
    let reg = registry(&server, Duration::from_secs(1)).await;
    let mut client = reg.client();
    let path = reg.subnet_path(&subnet(6));
    let mut lease = reg.create_lease(&subnet(6), &host(6)).await.unwrap();
    let id = lease.lease_id.unwrap();
    let granted = client
        .lease_time_to_live(id, None)
        .await
        .unwrap()
        .granted_ttl();
    assert!(
        granted > 1,
        "etcd kept the 1 s TTL ({granted} s): nothing to test"
    );
    for round in 0..2 {
        lease = reg.renew_lease(&lease, &host(6)).await.unwrap();
        assert_eq!(lease.lease_id, Some(id), "round {round}");
        assert_eq!(
            key_lease(&mut client, &path).await,
            Some(id),
            "round {round}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_stays_leaseless_when_renewed() {
    let Some(server) = EtcdServer::start() else {
        return;
    };
    let reg = registry(&server, Duration::from_secs(5)).await;
    let mut client = reg.client();
    let reserved = reg.create_reservation(&subnet(4), &host(4)).await.unwrap();
    let renewed_4 = reg.renew_lease(&reserved, &host(4)).await.unwrap();
    assert_eq!((renewed_4.expiration, renewed_4.lease_id), (None, None));
    assert_eq!(
        key_lease(&mut client, &reg.subnet_path(&subnet(4))).await,
        Some(0)
    );
    assert_eq!(etcd_lease_count(&mut client).await, 0);

    // A reservation an operator made from a lease (put without a lease) is honoured too.
    let leased = reg.create_lease(&subnet(5), &host(5)).await.unwrap();
    client
        .put(reg.subnet_path(&subnet(5)), host(5).to_json(), None)
        .await
        .unwrap();
    let renewed = reg.renew_lease(&leased, &host(5)).await.unwrap();
    assert!(renewed.is_reservation());
    assert_eq!(
        key_lease(&mut client, &reg.subnet_path(&subnet(5))).await,
        Some(0)
    );
    let list = reg.list_leases().await.unwrap();
    assert!(list.leases.iter().all(Lease::is_reservation));

    // A reservation held by host 4 and, meanwhile, released and made for host 6: host 4's
    // renewal must not write itself over host 6's (both carry no etcd lease, so only the
    // value tells them apart).
    reg.revoke_lease(&subnet(4)).await.unwrap();
    reg.create_reservation(&subnet(4), &host(6)).await.unwrap();
    let err = reg.renew_lease(&renewed_4, &host(4)).await.unwrap_err();
    assert!(matches!(err, RegistryError::NotFound(_)), "{err}");
    let stored = client.get(reg.subnet_path(&subnet(4)), None).await.unwrap();
    let value = String::from_utf8_lossy(stored.kvs()[0].value()).into_owned();
    assert_eq!(LeaseAttrs::from_json(&value).unwrap(), host(6), "{value}");
}

/// A host gives up a lease it listed earlier (superseded by its reservation, or unfit for a
/// new config) only while the key still holds it: meanwhile it may have expired and another
/// host taken the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_is_released_only_while_it_is_still_the_one_listed() {
    let Some(server) = EtcdServer::start() else {
        return;
    };
    let reg = registry(&server, Duration::from_secs(60)).await;
    let mut client = reg.client();
    let path = reg.subnet_path(&subnet(7));
    let old = reg.create_lease(&subnet(7), &host(7)).await.unwrap();
    reg.revoke_lease(&subnet(7)).await.unwrap();
    let taken = reg.create_lease(&subnet(7), &host(8)).await.unwrap();
    assert!(!reg.release_lease(&old).await.unwrap());
    assert_eq!(key_lease(&mut client, &path).await, taken.lease_id);
    // Reservations carry no etcd lease: the value tells whose it is.
    let reserved = reg.create_reservation(&subnet(9), &host(9)).await.unwrap();
    reg.revoke_lease(&subnet(9)).await.unwrap();
    reg.create_reservation(&subnet(9), &host(10)).await.unwrap();
    assert!(!reg.release_lease(&reserved).await.unwrap());
    assert_eq!(
        key_lease(&mut client, &reg.subnet_path(&subnet(9))).await,
        Some(0)
    );
    // What is still the one listed is released, its etcd lease with it.
    assert!(reg.release_lease(&taken).await.unwrap());
    assert_eq!(key_lease(&mut client, &path).await, None);
    assert_eq!(etcd_lease_count(&mut client).await, 0);
}

/// `lease release` of a key it did not list deletes only what holds no lease (a value linen
/// cannot read), never a live lease or a reservation: a host may have taken the key since.
#[tokio::test]
async fn only_a_dead_entry_is_revoked_as_dead() {
    let Some(server) = EtcdServer::start() else {
        return;
    };
    let reg = registry(&server, Duration::from_secs(60)).await;
    let mut client = reg.client();
    let lease = reg.create_lease(&subnet(1), &host(1)).await.unwrap();
    reg.create_reservation(&subnet(2), &host(2)).await.unwrap();
    let junk = reg.subnet_path(&subnet(3));
    client.put(junk.as_str(), "not json", None).await.unwrap();
    for live in [subnet(1), subnet(2), subnet(4)] {
        assert!(!reg.revoke_dead(&live).await.unwrap(), "{live}");
    }
    assert!(reg.revoke_dead(&subnet(3)).await.unwrap());
    assert_eq!(key_lease(&mut client, &junk).await, None);
    let path = reg.subnet_path(&subnet(1));
    assert_eq!(key_lease(&mut client, &path).await, lease.lease_id);
    assert_eq!(real_keys(&reg).await, [subnet(1), subnet(2)].into());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_sees_create_renew_delete_and_expiry_in_order() {
    let Some(server) = EtcdServer::start() else {
        return;
    };
    let reg = registry(&server, Duration::from_secs(60)).await;
    let short = registry(&server, Duration::from_secs(2)).await;
    let start = reg.list_leases().await.unwrap();
    let mut watch = reg.watch_leases(start.revision).await.unwrap();

    let a = reg.create_lease(&subnet(6), &host(6)).await.unwrap();
    let a2 = reg.renew_lease(&a, &host(6)).await.unwrap();
    reg.revoke_lease(&subnet(6)).await.unwrap();
    short.create_lease(&subnet(7), &host(7)).await.unwrap();

    let mut log = Vec::new();
    let end = Instant::now() + Duration::from_secs(20);
    while log.len() < 5 {
        let left = end.saturating_duration_since(Instant::now());
        let event = tokio::time::timeout(left, watch.next())
            .await
            .unwrap_or_else(|_| panic!("only saw {log:?}"))
            .unwrap();
        match event {
            WatchEvent::Changes { changes, .. } => log.extend(changes),
            WatchEvent::Snapshot(s) => panic!("unexpected snapshot {s:?}"),
        }
    }
    let LeaseChange::Put(created) = &log[0] else {
        panic!("{log:?}")
    };
    assert_eq!((created.key, created.lease_id), (subnet(6), a.lease_id));
    assert!(created.expiration.is_some());
    let LeaseChange::Put(renewed) = &log[1] else {
        panic!("{log:?}")
    };
    assert_eq!((renewed.key, renewed.lease_id), (subnet(6), a2.lease_id));
    assert!(renewed.expiration.is_some());
    assert_eq!(log[2], LeaseChange::Delete(subnet(6)));
    assert!(matches!(&log[3], LeaseChange::Put(l) if l.key == subnet(7)));
    // The expiry of subnet 7's 2 s lease arrives as a delete.
    assert_eq!(log[4], LeaseChange::Delete(subnet(7)));
    assert_eq!(log.len(), 5, "{log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_while_events_flow_loses_nothing() {
    let Some(server) = EtcdServer::start() else {
        return;
    };
    let reg = registry(&server, Duration::from_secs(300)).await;
    let start = reg.list_leases().await.unwrap();
    // Watches a live stream through the compaction.
    let mut live = reg.watch_leases(start.revision).await.unwrap();

    let writer = {
        let reg = reg.clone();
        tokio::spawn(async move {
            let mut client = reg.client();
            for t in 1..=60u8 {
                reg.create_lease(&subnet(t), &host(t)).await.unwrap();
                if t % 6 == 0 {
                    reg.revoke_lease(&subnet(t - 1)).await.unwrap();
                }
                if t == 30 {
                    let rev = client
                        .get("x", None)
                        .await
                        .unwrap()
                        .header()
                        .unwrap()
                        .revision();
                    client
                        .compact(rev, Some(CompactionOptions::new().with_physical()))
                        .await
                        .unwrap();
                }
            }
        })
    };
    let mut follower = Follower::default();
    let expected: BTreeSet<SubnetKey> = (1..=60u8)
        .filter(|t| (t + 1) % 6 != 0)
        .map(subnet)
        .collect();
    follower
        .follow_until(&mut live, Duration::from_secs(60), |f| f.keys() == expected)
        .await;
    writer.await.unwrap();
    assert_eq!(real_keys(&reg).await, expected);
    assert_eq!(
        follower.seen,
        (1..=60u8).map(subnet).collect(),
        "a created key was never seen"
    );

    // A watch that starts behind the compaction gets a snapshot instead of a hot loop.
    let mut late = reg.watch_leases(start.revision).await.unwrap();
    let mut behind = Follower::default();
    behind
        .follow_until(&mut late, Duration::from_secs(10), |f| f.snapshots == 1)
        .await;
    assert_eq!(behind.keys(), expected);
    assert_eq!(behind.errors, 0);
    // …and then follows live changes from the snapshot on.
    reg.create_lease(&subnet(200), &host(200)).await.unwrap();
    behind
        .follow_until(&mut late, Duration::from_secs(10), |f| {
            f.known.contains_key(&subnet(200))
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_outage_yields_unavailable_then_a_snapshot_and_loses_nothing() {
    let Some(mut server) = EtcdServer::start() else {
        return;
    };
    let reg = registry(&server, Duration::from_secs(600)).await;
    for t in 1..=3 {
        reg.create_lease(&subnet(t), &host(t)).await.unwrap();
    }
    let start = reg.list_leases().await.unwrap();
    let mut watch = reg.watch_leases(start.revision).await.unwrap();
    let mut follower = Follower::default();
    follower.apply(WatchEvent::Snapshot(start));
    follower.snapshots = 0;

    server.stop();
    let down = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(20), watch.next())
        .await
        .expect("the watch noticed the outage")
        .expect_err("etcd is down");
    assert!(err.is_transient(), "{err}");
    // While etcd is down, calls fail promptly instead of hanging or spinning.
    let t = Instant::now();
    let again = watch.next().await.expect_err("etcd is still down");
    assert!(again.is_transient(), "{again}");
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "a call took {:?}",
        t.elapsed()
    );
    assert!(reg.list_leases().await.is_err());
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(down.elapsed())).await;

    server.start_again();
    // Changes made while the watcher is not looking: it must still learn them.
    let writer = registry(&server, Duration::from_secs(600)).await;
    eventually(
        "a write after the restart",
        Duration::from_secs(20),
        || async { writer.create_lease(&subnet(9), &host(9)).await.ok() },
    )
    .await;
    writer.revoke_lease(&subnet(2)).await.unwrap();

    let expected: BTreeSet<SubnetKey> = [1, 3, 9].into_iter().map(subnet).collect();
    follower
        .follow_until(&mut watch, Duration::from_secs(30), |f| {
            f.keys() == expected
        })
        .await;
    assert!(follower.snapshots >= 1, "no snapshot after the reconnect");
    // Back to exact changes after the snapshot.
    writer.create_lease(&subnet(10), &host(10)).await.unwrap();
    follower
        .follow_until(&mut watch, Duration::from_secs(10), |f| {
            f.known.contains_key(&subnet(10))
        })
        .await;
    assert_eq!(follower.keys(), real_keys(&reg).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_entries_under_subnets_are_skipped() {
    let Some(server) = EtcdServer::start() else {
        return;
    };
    let reg = registry(&server, Duration::from_secs(60)).await;
    let mut client = reg.client();
    let base = format!("{DEFAULT_PREFIX}/subnets/");
    let junk = [
        ("garbage", host(1).to_json()),
        ("198.19.8.0-24hi", host(1).to_json()),
        ("198.19.9.0-24", "not json".to_owned()),
        ("198.19.10.0-24", r#"{"PublicIPv6":null}"#.to_owned()),
        // Nested deeper: not a key of its own, nor a stand-in for 198.19.14.0-24.
        ("x/198.19.14.0-24", host(1).to_json()),
        // A non-canonical twin of host 11's key: not a second lease for its subnet (with
        // another address), and deleting it does not take host 11's route away.
        ("198.19.11.0-024", host(5).to_json()),
    ];
    for (k, v) in &junk {
        client
            .put(format!("{base}{k}"), v.as_str(), None)
            .await
            .unwrap();
    }
    reg.create_lease(&subnet(11), &host(11)).await.unwrap();
    let list = reg.list_leases().await.unwrap();
    assert_eq!(
        list.leases.iter().map(|l| l.key).collect::<Vec<_>>(),
        [subnet(11)]
    );

    let mut watch = reg.watch_leases(list.revision).await.unwrap();
    for (k, v) in &junk {
        client
            .put(format!("{base}{k}"), v.as_str(), None)
            .await
            .unwrap();
    }
    client.delete(format!("{base}garbage"), None).await.unwrap();
    client
        .delete(format!("{base}198.19.11.0-024"), None)
        .await
        .unwrap();
    // A live lease overwritten with garbage: its old address must not stay routed.
    reg.create_lease(&subnet(13), &host(13)).await.unwrap();
    client
        .put(format!("{base}{}", subnet(13)), "not json", None)
        .await
        .unwrap();
    reg.create_lease(&subnet(12), &host(12)).await.unwrap();
    let mut changes = Vec::new();
    while !changes
        .iter()
        .any(|c| matches!(c, LeaseChange::Put(l) if l.key == subnet(12)))
    {
        let event = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .unwrap()
            .unwrap();
        let WatchEvent::Changes { changes: more, .. } = event else {
            panic!("{event:?}")
        };
        changes.extend(more);
    }
    // Malformed keys are skipped; a malformed value on a valid key is a delete of that key.
    let seen: Vec<(&str, SubnetKey)> = changes
        .iter()
        .map(|c| match c {
            LeaseChange::Put(l) => ("put", l.key),
            LeaseChange::Delete(k) => ("delete", *k),
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("delete", subnet(9)),
            ("delete", subnet(10)),
            ("put", subnet(13)),
            ("delete", subnet(13)),
            ("put", subnet(12)),
        ]
    );
    // The raw keys are still there: linen skips them, it does not delete them.
    let all = client
        .get(
            base.as_str(),
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .unwrap();
    assert_eq!(all.count(), 7);
}

struct Pki {
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
    ca_params: rcgen::CertificateParams,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = params.self_signed(&ca_key).unwrap();
        Pki {
            ca,
            ca_key,
            ca_params: params,
        }
    }

    /// Writes `<name>.pem` and `<name>-key.pem` for a leaf signed by this CA.
    fn issue(&self, dir: &Path, name: &str, sans: &[&str], usage: rcgen::ExtendedKeyUsagePurpose) {
        let mut params =
            rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let key = rcgen::KeyPair::generate().unwrap();
        let issuer = rcgen::Issuer::new(self.ca_params.clone(), &self.ca_key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}-key.pem")), key.serialize_pem()).unwrap();
    }

    fn write_ca(&self, path: &Path) {
        std::fs::write(path, self.ca.pem()).unwrap();
    }
}

/// `linen lease reserve` of the subnet a host holds keeps it as a reservation in place
/// (flannel's documented way): the key loses its etcd lease and keeps its value, and the
/// holder's next renewal leaves it a reservation. Another host's lease is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_lease_is_kept_as_a_reservation() {
    let Some(server) = EtcdServer::start() else {
        return;
    };
    let reg = registry(&server, Duration::from_secs(60)).await;
    let spec = NetworkConfigSpec::from_json(r#"{"Network":"198.19.0.0/16"}"#).unwrap();
    reg.put_network_config(&spec).await.unwrap();
    let lease = reg.create_lease(&subnet(13), &host(13)).await.unwrap();
    let reserve = |ip: &str| {
        std::process::Command::new(common::LINEN)
            .args(["lease", "reserve", "198.19.13.0/24", "--public-ip", ip])
            .args(["--etcd-endpoints", &server.endpoint()])
            .output()
            .unwrap()
    };
    let other = reserve("198.18.1.99");
    let text = String::from_utf8_lossy(&other.stderr);
    assert_eq!(other.status.code(), Some(1), "{text}");
    assert!(text.contains("another host (198.18.1.13)"), "{text}");

    let ours = reserve("198.18.1.13");
    let text = String::from_utf8_lossy(&ours.stdout);
    let stderr = String::from_utf8_lossy(&ours.stderr);
    assert!(ours.status.success(), "{text}{stderr}");
    // An admin command does not warn of plain http each time it runs (`linen run` does).
    assert!(!stderr.contains("plain http"), "{stderr}");
    assert!(text.contains("now a reservation"), "{text}");
    let mut client = Client::connect([server.endpoint()], None).await.unwrap();
    let path = format!("{DEFAULT_PREFIX}/subnets/198.19.13.0-24");
    assert_eq!(
        key_lease(&mut client, &path).await,
        Some(0),
        "no etcd lease"
    );
    let listed = reg.list_leases().await.unwrap().leases;
    assert_eq!(listed.len(), 1);
    assert!(listed[0].is_reservation() && listed[0].attrs == host(13));
    // The holder renews as before: it stays a reservation.
    let renewed = reg.renew_lease(&lease, &host(13)).await.unwrap();
    assert_eq!(renewed.expiration, None);
    assert_eq!(key_lease(&mut client, &path).await, Some(0));
    // The etcd lease the key had is gone, not left to expire in a day.
    assert_eq!(etcd_lease_count(&mut client).await, 0);
}

/// Writes a test CA (`ca.pem`), a server and a client certificate signed by it, and another
/// CA (`other-ca.pem`) into `d`, and starts etcd with TLS and client certificates.
fn tls_etcd(d: &Path) -> Option<EtcdServer> {
    let pki = Pki::new("linen test CA");
    pki.write_ca(&d.join("ca.pem"));
    pki.issue(
        d,
        "server",
        &["127.0.0.1", "localhost"],
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    );
    pki.issue(d, "client", &[], rcgen::ExtendedKeyUsagePurpose::ClientAuth);
    Pki::new("some other CA").write_ca(&d.join("other-ca.pem"));
    EtcdServer::start_with(Some(ServerTls {
        ca: d.join("ca.pem"),
        cert: d.join("server.pem"),
        key: d.join("server-key.pem"),
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates_and_a_clear_error_for_a_wrong_ca() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let Some(server) = tls_etcd(d) else {
        return;
    };
    let tls = |ca: &str| EtcdOptions {
        cafile: Some(d.join(ca)),
        certfile: Some(d.join("client.pem")),
        keyfile: Some(d.join("client-key.pem")),
        ..options(&server, Duration::from_secs(60))
    };
    let reg = EtcdRegistry::connect(&tls("ca.pem")).await.unwrap();
    reg.create_lease(&subnet(13), &host(13)).await.unwrap();
    assert_eq!(reg.list_leases().await.unwrap().leases.len(), 1);

    let wrong = EtcdRegistry::connect(&tls("other-ca.pem")).await.unwrap();
    let t = Instant::now();
    let err = wrong.list_leases().await.unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, RegistryError::Refused { .. })
            && msg.contains(&format!(
                "TLS verification failed for {}",
                server.endpoint()
            )),
        "{msg}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "took {:?}",
        t.elapsed()
    );

    // Plain http against a TLS-only etcd fails too, well within the test's patience (the
    // request timeout is 5 s)...
    let plain = EtcdOptions {
        endpoints: vec![server.endpoint().replace("https://", "http://")],
        ..options(&server, Duration::from_secs(60))
    };
    let answer = tokio::time::timeout(Duration::from_secs(30), async {
        EtcdRegistry::connect(&plain).await?.list_leases().await?;
        Ok::<_, anyhow::Error>(())
    })
    .await;
    assert!(answer.as_ref().is_ok_and(|r| r.is_err()), "{answer:?}");
    // ...and a missing file is named.
    let missing = EtcdOptions {
        keyfile: Some(d.join("nope-key.pem")),
        ..tls("ca.pem")
    };
    let Err(err) = EtcdRegistry::connect(&missing).await else {
        panic!("connected")
    };
    assert!(matches!(err, EtcdSetupError::ReadFile { .. }), "{err}");
    assert!(err.to_string().contains("nope-key.pem"), "{err}");
}

/// Without --etcd-cafile an https:// endpoint is verified against the system trust store, as
/// flannel's etcd client does. The binary runs with `SSL_CERT_FILE` naming the trust store:
/// the test CA passes, a store without it fails with the TLS message (and changes nothing).
#[test]
fn https_without_a_ca_file_uses_the_system_trust_store() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let Some(server) = tls_etcd(d) else {
        return;
    };
    let list = |store: &str| {
        std::process::Command::new(common::LINEN)
            .args(["lease", "list", "--etcd-endpoints", &server.endpoint()])
            .arg("--etcd-certfile")
            .arg(d.join("client.pem"))
            .arg("--etcd-keyfile")
            .arg(d.join("client-key.pem"))
            .env("SSL_CERT_FILE", d.join(store))
            .env("SSL_CERT_DIR", d.join("no-such-dir"))
            .env_remove("LINEN_ETCD_CAFILE")
            .output()
            .unwrap()
    };
    let ok = list("ca.pem");
    let stderr = String::from_utf8_lossy(&ok.stderr);
    assert!(ok.status.success(), "{stderr}");
    assert!(stderr.contains("system trust store"), "{stderr}");
    let wrong = list("other-ca.pem");
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert_eq!(wrong.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("TLS verification failed"), "{stderr}");
}

/// Credentials for an etcd that has authentication disabled are not used, as flanneld's
/// client does not use them: a start failed there with "authentication is not enabled",
/// taken for an unreachable etcd and retried for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_for_an_etcd_without_authentication_are_not_used() {
    let Some(server) = EtcdServer::start() else {
        return;
    };
    let reg = EtcdRegistry::connect(&EtcdOptions {
        username: Some("root".into()),
        password: Some("s3cret".into()),
        ..options(&server, Duration::from_secs(60))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    reg.create_lease(&subnet(16), &host(16)).await.unwrap();
    assert_eq!(reg.list_leases().await.unwrap().leases.len(), 1);
    // Authentication turned on later, as it usually is: the credentials are used then (the
    // request that finds it out fails as transient; the next one passes).
    server.etcdctl(&["user", "add", "root", "--new-user-password=s3cret"]);
    server.etcdctl(&["auth", "enable"]);
    if let Err(e) = reg.list_leases().await {
        assert!(matches!(e, RegistryError::Unavailable { .. }), "{e}");
    }
    let list = reg.list_leases().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(list.leases.len(), 1);
}

/// With JWT tokens, which carry the revision of etcd's auth store, a change to users or roles
/// (any `etcdctl user add`) makes every token refused ("revision of auth store is old") until
/// it is renewed; etcd-client renews only on "invalid auth token". The token is renewed and
/// the call counts as failing for now: the next one works. (Before, every call failed for the
/// token's life, minutes, with advice to upgrade etcd.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_made_old_by_an_auth_change_is_renewed() {
    let keys = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let (private, public) = (keys.path().join("jwt.key"), keys.path().join("jwt.pub"));
    std::fs::write(&private, key.serialize_pem()).unwrap();
    std::fs::write(&public, key.public_key_pem()).unwrap();
    let jwt = format!(
        "--auth-token=jwt,pub-key={},priv-key={},sign-method=ES256,ttl=10m",
        public.display(),
        private.display()
    );
    let Some(server) = EtcdServer::start_with_args(None, &[jwt]) else {
        return;
    };
    server.etcdctl(&["user", "add", "root", "--new-user-password=s3cret"]);
    server.etcdctl(&["auth", "enable"]);
    let reg = EtcdRegistry::connect(&EtcdOptions {
        username: Some("root".into()),
        password: Some("s3cret".into()),
        ..options(&server, Duration::from_secs(60))
    })
    .await
    .unwrap();
    reg.create_lease(&subnet(17), &host(17)).await.unwrap();
    server.etcdctl(&[
        "--user=root:s3cret",
        "user",
        "add",
        "other",
        "--new-user-password=x",
    ]);
    match reg.list_leases().await {
        Ok(_) => {}
        Err(e) => assert!(matches!(e, RegistryError::Unavailable { .. }), "{e}"),
    }
    let list = reg.list_leases().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(list.leases.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_password_authentication() {
    let Some(server) = EtcdServer::start() else {
        return;
    };
    server.etcdctl(&["user", "add", "root", "--new-user-password=s3cret"]);
    server.etcdctl(&["auth", "enable"]);

    let with = |user: Option<&str>, password: Option<&str>| EtcdOptions {
        username: user.map(str::to_owned),
        password: password.map(str::to_owned),
        ..options(&server, Duration::from_secs(60))
    };
    let reg = EtcdRegistry::connect(&with(Some("root"), Some("s3cret")))
        .await
        .unwrap();
    let spec = NetworkConfigSpec::from_json(r#"{"Network":"198.19.0.0/16"}"#).unwrap();
    reg.put_network_config(&spec).await.unwrap();
    reg.create_lease(&subnet(14), &host(14)).await.unwrap();
    let list = reg.list_leases().await.unwrap();
    assert_eq!(list.leases.len(), 1);
    let mut watch = reg.watch_leases(list.revision).await.unwrap();
    reg.revoke_lease(&subnet(14)).await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(event, WatchEvent::Changes { .. }), "{event:?}");

    let Err(err) = EtcdRegistry::connect(&with(Some("root"), Some("wrong"))).await else {
        panic!("a wrong password connected");
    };
    assert!(
        matches!(
            &err,
            EtcdSetupError::Registry(RegistryError::Refused { .. })
        ),
        "{err}"
    );
    assert!(err.to_string().contains("--etcd-password"), "{err}");

    let anonymous = EtcdRegistry::connect(&with(None, None)).await.unwrap();
    let err = anonymous.get_network_config().await.unwrap_err();
    assert!(matches!(err, RegistryError::Refused { .. }), "{err}");

    // The password from a file, as an admin command (and the daemon) read it: the line end
    // an editor adds is not part of it.
    reg.create_lease(&subnet(15), &host(15)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let list = |file: &str, extra: &[&str]| {
        let out = std::process::Command::new(common::LINEN)
            .args(["lease", "list", "--etcd-endpoints", &server.endpoint()])
            .args(["--etcd-username", "root", "--etcd-password-file"])
            .arg(dir.path().join(file))
            .args(extra)
            .env_remove("LINEN_ETCD_PASSWORD")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code(), stdout, stderr)
    };
    std::fs::write(dir.path().join("right"), "s3cret\n").unwrap();
    std::fs::write(dir.path().join("wrong"), "s3cret2\n").unwrap();
    let (code, stdout, stderr) = list("right", &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("198.19.15.0-24"), "{stdout}");
    let (code, _, stderr) = list("wrong", &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("--etcd-password"), "{stderr}");
    let (code, _, stderr) = list("missing", &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot read the etcd password file") && stderr.contains("missing"),
        "{stderr}"
    );
    let (code, _, stderr) = list("right", &["--etcd-password", "s3cret"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("both --etcd-password and --etcd-password-file are given"),
        "{stderr}"
    );
}

/// A watch that catches up from an old revision gets the history in one response: five
/// 1.2 MB values make it larger than tonic's default 4 MiB decode limit, which failed the
/// watch at the same revision again and again until etcd compacted it away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_larger_than_four_mib_is_read() {
    let Some(server) = EtcdServer::start() else {
        return;
    };
    let reg = registry(&server, Duration::from_secs(60)).await;
    let mut client = reg.client();
    let base = format!("{DEFAULT_PREFIX}/subnets/");
    let before = reg.list_leases().await.unwrap().revision;
    let filler = "x".repeat(1_200_000);
    for i in 20..25u8 {
        let value =
            format!(r#"{{"PublicIP":"198.18.1.{i}","PublicIPv6":null,"BackendData":"{filler}"}}"#);
        client
            .put(format!("{base}{}", subnet(i)), value, None)
            .await
            .unwrap();
    }
    let mut watch = reg.watch_leases(before).await.unwrap();
    let mut keys = Vec::new();
    while keys.len() < 5 {
        let event = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("after {keys:?}: {e}"));
        match event {
            WatchEvent::Changes { changes, .. } => keys.extend(changes.iter().map(|c| match c {
                LeaseChange::Put(l) => l.key,
                LeaseChange::Delete(k) => *k,
            })),
            WatchEvent::Snapshot(list) => panic!("a snapshot instead of the history: {list:?}"),
        }
    }
    assert_eq!(keys, (20..25u8).map(subnet).collect::<Vec<_>>());
}

/// A renewal that must move the key to a new etcd lease (the key's lease has another TTL, as
/// after `--subnet-lease-ttl` changed) but whose write etcd refuses (the user may read the
/// prefix, not write it) does not pile up leases: the manager retries every few seconds, and
/// each attempt granting a lease of its own would leave it alive for a whole TTL. The first
/// attempt's lease is kept (a refusal may hide a write that still lands) and reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_moves_share_one_etcd_lease() {
    let Some(server) = EtcdServer::start() else {
        return;
    };
    let prefix = format!("{DEFAULT_PREFIX}/");
    for args in [
        &["user", "add", "root", "--new-user-password=s3cret"][..],
        &["role", "add", "reader"],
        &[
            "role",
            "grant-permission",
            "reader",
            "--prefix=true",
            "read",
            &prefix,
        ],
        &["user", "add", "ro", "--new-user-password=pw"],
        &["user", "grant-role", "ro", "reader"],
        &["auth", "enable"],
    ] {
        server.etcdctl(args);
    }
    let as_user = |user: &str, password: &str, ttl: u64| EtcdOptions {
        username: Some(user.to_owned()),
        password: Some(password.to_owned()),
        ..options(&server, Duration::from_secs(ttl))
    };
    let root = EtcdRegistry::connect(&as_user("root", "s3cret", 60))
        .await
        .unwrap();
    let lease = root.create_lease(&subnet(16), &host(16)).await.unwrap();
    let mut client = root.client();
    let before = etcd_lease_count(&mut client).await;
    assert_eq!(before, 1);

    let reader = EtcdRegistry::connect(&as_user("ro", "pw", 120))
        .await
        .unwrap();
    for attempt in 0..3 {
        let err = reader.renew_lease(&lease, &host(16)).await.unwrap_err();
        assert!(
            matches!(err, RegistryError::Refused { .. }),
            "{attempt}: {err}"
        );
        assert!(
            err.to_string().contains("move the key to a new lease"),
            "{attempt}: {err}"
        );
    }
    // The key kept its lease, and the three refused moves share one lease.
    assert_eq!(
        key_lease(&mut client, &root.subnet_path(&subnet(16))).await,
        lease.lease_id
    );
    assert_eq!(etcd_lease_count(&mut client).await, before + 1);
}
