//! The directory registry and the lease manager together, as an ordinary user (no root, no
//! network): concurrent acquisition, expiry, corrupt files, exhaustion, reservations, renewal,
//! lost leases and a registry that goes away and comes back.

mod common;
use common::Helper;
use common::manager::{Running, host, key};

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use linen::lease::directory::DirectoryRegistry;
use linen::lease::manager::{self, AcquireError, LeaseState, ManagerOptions};
use linen::lease::{Registry, RegistryError, WatchEvent};
use linen::model::{Lease, LeaseAttrs, NetworkConfigSpec, SubnetKey};
use rand::SeedableRng;
use rand::rngs::StdRng;

/// Seconds to wait for what the registry's 200 ms polling brings without a deadline of its
/// own (unlike a lease's TTL): generous, so that a loaded machine is slow, not failing.
const PATIENCE: u64 = 30;

const NET: &str = r#"{"Network":"198.19.0.0/16","SubnetLen":24,"Backend":{"Type":"udp"}}"#;
/// A dual-stack network: /24s and /64s.
const DUAL: &str = r#"{"Network":"198.19.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:19::/48"}"#;

fn setup(config: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("config"), config).unwrap();
    dir
}

fn registry(dir: &Path, ttl_secs: u64) -> Arc<DirectoryRegistry> {
    Arc::new(
        DirectoryRegistry::with_ttl(dir, Duration::from_secs(ttl_secs))
            .with_poll_interval(Duration::from_millis(50)),
    )
}

/// Unix seconds `secs` from now (a lease file's `expires=`).
fn unix_secs_in(secs: u64) -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + secs
}

fn options(n: u8) -> ManagerOptions {
    let mut o = ManagerOptions::new(host(n));
    o.backoff_min = Duration::from_millis(50);
    o.backoff_max = Duration::from_millis(200);
    o
}

async fn live(reg: &DirectoryRegistry) -> Vec<Lease> {
    reg.list_leases().await.unwrap().leases
}

/// The public addresses of the live leases, in key order.
async fn holders(reg: &DirectoryRegistry) -> Vec<LeaseAttrs> {
    live(reg).await.into_iter().map(|l| l.attrs).collect()
}

fn own_key(s: &LeaseState) -> Option<SubnetKey> {
    s.own.as_ref().map(|l| l.key)
}

/// Child side of the 20-process test: acquire once and print the subnet. Ignored, so that it
/// is not reported as a passing test on its own; the parent runs it with `--ignored`.
#[test]
#[ignore = "the child process of twenty_processes_get_distinct_subnets, which runs it"]
fn acquire_child() {
    let Ok(dir) = std::env::var("LINEN_TEST_ACQUIRE_DIR") else {
        return; // Only meaningful when re-executed by `twenty_processes_get_distinct_subnets`.
    };
    let n: u8 = std::env::var("LINEN_TEST_HOST").unwrap().parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let key = rt.block_on(async {
        let reg = registry(Path::new(&dir), 60);
        let config = reg.get_network_config().await.unwrap();
        let mut rng = StdRng::from_rng(&mut rand::rng());
        manager::acquire(reg.as_ref(), &config, &host(n), None, &mut rng)
            .await
            .unwrap()
            .key
    });
    println!("SUBNET={key}");
}

#[test]
fn twenty_processes_get_distinct_subnets() {
    // A small range (/26 → 16 /30s... no: a /24 of /28s gives 15 candidates) would exhaust;
    // use /27s inside a /21: 63 candidates, so collisions among 20 are likely and the lock and
    // the race retries are exercised.
    let dir = setup(r#"{"Network":"198.19.0.0/21","SubnetLen":27}"#);
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (1..=20u8)
        .map(|n| {
            Helper::spawn(
                std::process::Command::new(&exe)
                    .args([
                        "--exact",
                        "acquire_child",
                        "--ignored",
                        "--nocapture",
                        "--test-threads=1",
                    ])
                    .env("LINEN_TEST_ACQUIRE_DIR", dir.path())
                    .env("LINEN_TEST_HOST", n.to_string())
                    .stdout(std::process::Stdio::piped()),
            )
        })
        .collect();
    let mut subnets = BTreeSet::new();
    for child in children {
        let out = child.wait_with_output();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "child failed: {text}");
        // libtest prints "test acquire_child ... " on the same line, before ours.
        let line = text
            .split("SUBNET=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no SUBNET= in {text}"));
        subnets.insert(line.to_owned());
    }
    assert_eq!(subnets.len(), 20, "{subnets:?}");
    // And the registry agrees: 20 files, 20 distinct hosts.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let list = rt.block_on(registry(dir.path(), 60).list_leases()).unwrap();
    assert_eq!(list.leases.len(), 20);
    assert_eq!(list.revision, 20);
}

/// Runs [`manager::acquire`] in 20 threads at once, each with its own registry handle on
/// `dir` and the attributes `attrs(n)` for n in 1..=20: the keys they got.
fn acquire_in_twenty_threads(dir: &Path, attrs: fn(u8) -> LeaseAttrs) -> Vec<SubnetKey> {
    let start = Arc::new(std::sync::Barrier::new(20));
    let threads: Vec<_> = (1..=20u8)
        .map(|n| {
            let (path, start) = (dir.to_owned(), Arc::clone(&start));
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let reg = registry(&path, 60);
                    let config = reg.get_network_config().await.unwrap();
                    let mut rng = StdRng::seed_from_u64(u64::from(n));
                    start.wait();
                    manager::acquire(reg.as_ref(), &config, &attrs(n), None, &mut rng)
                        .await
                        .unwrap()
                        .key
                })
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

#[test]
fn twenty_threads_with_own_handles_get_distinct_subnets() {
    let dir = setup(r#"{"Network":"198.19.0.0/21","SubnetLen":27}"#);
    let keys: BTreeSet<SubnetKey> = acquire_in_twenty_threads(dir.path(), host)
        .into_iter()
        .collect();
    assert_eq!(keys.len(), 20, "{keys:?}");
}

/// Dual-stack hosts racing: each picks an IPv4 and an IPv6 subnet at random, so two may pick
/// the same IPv4 subnet with different IPv6 ones. Their keys differ, so both creates would
/// succeed unless a create checks the other keys; no subnet of either family may go to two
/// hosts. 31 IPv4 candidates for 20 hosts make such picks likely.
#[test]
fn dual_stack_hosts_racing_never_share_a_subnet() {
    let dir = setup(
        r#"{"Network":"198.19.0.0/19","SubnetLen":24,"EnableIPv6":true,
            "IPv6Network":"fd00:19::/48","IPv6SubnetLen":64}"#,
    );
    let keys = acquire_in_twenty_threads(dir.path(), |n| {
        let mut attrs = host(n);
        attrs.public_ipv6 = Some(format!("fd00:18::{n}").parse().unwrap());
        attrs
    });
    let v4: BTreeSet<_> = keys.iter().map(|k| k.ipv4().unwrap()).collect();
    let v6: BTreeSet<_> = keys.iter().map(|k| k.ipv6().unwrap()).collect();
    assert_eq!((v4.len(), v6.len()), (20, 20), "{keys:?}");
}

/// A create is refused while another live key holds one of its subnets, and allowed once that
/// key has expired; reservations likewise.
#[tokio::test]
async fn a_key_sharing_a_subnet_with_a_live_one_is_refused() {
    let dir = setup(DUAL);
    let long = registry(dir.path(), 3600);
    let held = key("198.19.62.0-24&fd00:19:0:2::-64");
    long.create_lease(&held, &host(1)).await.unwrap();
    for other in [
        "198.19.62.0-24&fd00:19:0:32::-64",
        "198.19.13.0-24&fd00:19:0:2::-64",
        "198.19.62.128-25&fd00:19:0:3::-64",
    ] {
        let err = long.create_lease(&key(other), &host(2)).await.unwrap_err();
        assert!(
            matches!(err, RegistryError::Overlaps { key: k, other: o } if k == key(other) && o == held),
            "{other}: {err:?}"
        );
        let err = long
            .create_reservation(&key(other), &host(2))
            .await
            .unwrap_err();
        assert!(
            matches!(err, RegistryError::Overlaps { .. }),
            "{other}: {err:?}"
        );
    }
    assert_eq!(
        live(&long).await.iter().map(|l| l.key).collect::<Vec<_>>(),
        [held]
    );
    // Unrelated subnets are not held back.
    let free = key("198.19.63.0-24&fd00:19:0:3::-64");
    long.create_lease(&free, &host(3)).await.unwrap();
    // Once the holder's lease has expired (its file says so, as a minute without renewals
    // would), its subnets are free again.
    let path = dir.path().join("subnets").join(held.to_string());
    let value = fs::read_to_string(&path).unwrap();
    let first = value.lines().next().unwrap();
    fs::write(&path, format!("{first}\nexpires=1\n")).unwrap();
    let taker = key("198.19.62.0-24&fd00:19:0:32::-64");
    long.create_lease(&taker, &host(2)).await.unwrap();
    let keys: BTreeSet<_> = live(&long).await.iter().map(|l| l.key).collect();
    assert_eq!(keys, BTreeSet::from([free, taker]));
}

/// Overlapping keys written before creates checked for them (an older linen, a flanneld, a
/// hand-made file) are sorted out at renewal, the same way on every host: a lease gives way to
/// a reservation, and of two leases the greater key gives way; the other keeps renewing.
#[tokio::test]
async fn overlapping_leases_are_sorted_out_at_renewal() {
    let dir = setup(DUAL);
    let reg = registry(dir.path(), 3600);
    let subnets = dir.path().join("subnets");
    fs::create_dir_all(&subnets).unwrap();
    let expires = unix_secs_in(600);
    let write = |k: &str, ip: &str, lease: bool| {
        let mut text = format!("{{\"PublicIP\":\"{ip}\",\"PublicIPv6\":null}}\n");
        if lease {
            text += &format!("expires={expires}\n");
        }
        fs::write(subnets.join(k), text).unwrap();
        Lease {
            key: key(k),
            attrs: LeaseAttrs::with_public_ip(ip.parse().unwrap()),
            expiration: lease.then_some(SystemTime::now()),
            lease_id: None,
        }
    };
    let lower = write("198.19.62.0-24&fd00:19:0:2::-64", "198.18.1.1", true);
    let greater = write("198.19.62.0-24&fd00:19:0:32::-64", "198.18.1.2", true);
    // The winner renews while the loser is still there, then the loser gives way.
    reg.renew_lease(&lower, &lower.attrs).await.unwrap();
    let err = reg.renew_lease(&greater, &greater.attrs).await.unwrap_err();
    assert!(
        matches!(err, RegistryError::NotFound(k) if k == greater.key),
        "{err:?}"
    );
    reg.renew_lease(&lower, &lower.attrs).await.unwrap();
    assert_eq!(
        live(&reg).await.iter().map(|l| l.key).collect::<Vec<_>>(),
        [lower.key]
    );
    // A reservation keeps its subnets against a lease whose key sorts lower.
    let reserved = write("198.19.70.0-24&fd00:19:0:33::-64", "198.18.1.3", false);
    let leased = write("198.19.9.0-24&fd00:19:0:33::-64", "198.18.1.4", true);
    reg.renew_lease(&reserved, &reserved.attrs).await.unwrap();
    let err = reg.renew_lease(&leased, &leased.attrs).await.unwrap_err();
    assert!(matches!(err, RegistryError::NotFound(_)), "{err:?}");
    let keys: BTreeSet<_> = live(&reg).await.iter().map(|l| l.key).collect();
    assert_eq!(keys, BTreeSet::from([lower.key, reserved.key]));
    // A reservation of another length (by hand, or by a compromised host) covers the lease
    // but holds none of its subnets: the lease keeps renewing.
    let wide = write("128.0.0.0-1", "198.18.1.5", false);
    reg.renew_lease(&lower, &lower.attrs).await.unwrap();
    let keys: BTreeSet<_> = live(&reg).await.iter().map(|l| l.key).collect();
    assert_eq!(keys, BTreeSet::from([lower.key, reserved.key, wide.key]));
}

#[tokio::test]
async fn stored_value_is_flannels_and_config_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry(dir.path(), 3600);
    let err = reg.get_network_config().await.unwrap_err();
    assert!(
        matches!(&err, RegistryError::ConfigNotFound { location, .. } if location.ends_with("config")),
        "{err}"
    );
    // A flanneld user who forgot --etcd-endpoints learns where linen looked, and why.
    assert!(err.to_string().contains("--etcd-endpoints"), "{err}");
    let spec = NetworkConfigSpec::from_json(NET).unwrap();
    // Created only where there is none (two `network init` at once: one wins).
    assert!(reg.create_network_config(&spec).await.unwrap());
    let other = NetworkConfigSpec::from_json(r#"{"Network":"198.19.0.0/20"}"#).unwrap();
    assert!(!reg.create_network_config(&other).await.unwrap());
    assert_eq!(
        reg.get_network_config().await.unwrap().network,
        spec.network
    );
    reg.put_network_config(&spec).await.unwrap();
    assert_eq!(
        reg.get_network_config().await.unwrap().network,
        spec.network
    );
    reg.create_lease(
        &key("198.19.1.0-24"),
        &LeaseAttrs::with_public_ip("1.2.3.4".parse().unwrap()),
    )
    .await
    .unwrap();
    let text = fs::read_to_string(dir.path().join("subnets/198.19.1.0-24")).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some(r#"{"PublicIP":"1.2.3.4","PublicIPv6":null}"#)
    );
    assert!(lines.next().unwrap().starts_with("expires="), "{text}");
    let again = reg
        .create_lease(&key("198.19.1.0-24"), &host(9))
        .await
        .unwrap_err();
    assert!(matches!(again, RegistryError::AlreadyExists(_)), "{again}");
    assert!(reg.revoke_lease(&key("198.19.1.0-24")).await.unwrap());
    assert!(!reg.revoke_lease(&key("198.19.1.0-24")).await.unwrap());
    assert!(reg.list_leases().await.unwrap().leases.is_empty());
    assert_eq!(reg.list_leases().await.unwrap().revision, 2);
}

#[tokio::test]
async fn expired_lease_is_removed_for_watchers_and_can_be_taken() {
    let dir = setup(NET);
    let short = registry(dir.path(), 15);
    let long = registry(dir.path(), 3600);
    // Host 1 runs first; host 2 then takes a 15 s lease and stops renewing (its daemon died).
    // Host 1 must see it before it expires: 15 s leaves room on a loaded machine. Beyond the
    // first 100 candidates, among which host 1 picks its own.
    let mut a = Running::start(Arc::clone(&long), options(1)).await;
    short
        .create_lease(&key("198.19.150.0-24"), &host(2))
        .await
        .unwrap();
    a.wait(12, "host 2 as a peer", |s| {
        s.peers.iter().any(|l| l.key == key("198.19.150.0-24"))
    })
    .await;
    let gen_before = a.state.borrow().generation;
    let s = a
        .wait(PATIENCE, "host 2's expiry", |s| s.peers.is_empty())
        .await;
    assert!(s.generation > gen_before);
    // Another host asking for that subnet (its subnet.env) now gets it.
    let mut opts = options(3);
    opts.previous = Some(key("198.19.150.0-24"));
    let b = Running::start(Arc::clone(&long), opts).await;
    assert_eq!(own_key(&b.state.borrow()), Some(key("198.19.150.0-24")));
    a.wait(PATIENCE, "host 3 as a peer", |s| {
        s.peers
            .iter()
            .any(|l| l.key == key("198.19.150.0-24") && l.attrs == host(3))
    })
    .await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn new_host_is_seen_by_others() {
    let dir = setup(NET);
    // The default poll interval (200 ms), unlike the other tests. How fast a new host is seen
    // is a measurement, not a pass/fail matter: the deadline is only for a hang.
    let reg = Arc::new(DirectoryRegistry::with_ttl(
        dir.path(),
        Duration::from_secs(3600),
    ));
    let mut a = Running::start(Arc::clone(&reg), options(1)).await;
    let b = Running::start(Arc::clone(&reg), options(2)).await;
    let b_key = own_key(&b.state.borrow()).unwrap();
    a.wait(10, "host 2 as a peer", |s| {
        s.peers.iter().any(|l| l.key == b_key)
    })
    .await;
    let s = a.state.borrow().clone();
    assert_eq!(s.peers.len(), 1, "own lease never among peers: {s:?}");
    assert!(s.registry.connected);
    a.stop().await;
    b.stop().await;
}

/// A corrupt key wider than a subnet blocks every subnet inside it: each create there is
/// refused as overlapping it. Its whole range must be left alone then, not one candidate at a
/// time: with most of the range under it, ten tries all landed inside and the acquisition
/// failed as "lost races" (and a daemon retried it for ever).
#[tokio::test]
async fn a_corrupt_wide_key_is_skipped_as_a_whole() {
    let net = r#"{"Network":"198.19.0.0/16","SubnetMax":"198.19.128.0","Backend":{"Type":"udp"}}"#;
    let dir = setup(net);
    let subnets = dir.path().join("subnets");
    fs::create_dir_all(&subnets).unwrap();
    // Every /24 of the range (SubnetMin is .1.0) but .128 lies under it.
    fs::write(subnets.join("198.19.0.0-17"), "{not json\n").unwrap();
    let reg = registry(dir.path(), 3600);
    let config = linen::model::NetworkConfig::from_json(net).unwrap();
    for seed in 0..4 {
        let mut rng = StdRng::seed_from_u64(seed);
        let lease = manager::acquire(reg.as_ref(), &config, &host(1), None, &mut rng)
            .await
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert_eq!(lease.key, key("198.19.128.0-24"), "seed {seed}");
        assert!(reg.revoke_lease(&lease.key).await.unwrap());
    }
}

/// The lock file is never opened through a link, nor when it is not a plain file: each host
/// would lock what the link names on its own side (no lock between hosts), and the file it
/// names was narrowed to 0600, or created when missing.
#[tokio::test]
async fn a_lock_file_that_is_no_plain_file_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = setup(NET);
    let reg = registry(dir.path(), 3600);
    let target = dir.path().join("target");
    fs::write(&target, "x").unwrap();
    fs::set_permissions(&target, fs::Permissions::from_mode(0o644)).unwrap();
    let lock = dir.path().join(".lock");
    let missing = dir.path().join("missing");
    for (name, points_to) in [("link", &target), ("dangling link", &missing)] {
        let _ = fs::remove_file(&lock);
        std::os::unix::fs::symlink(points_to, &lock).unwrap();
        let err = reg
            .create_lease(&key("198.19.3.0-24"), &host(1))
            .await
            .unwrap_err();
        assert!(
            matches!(err, RegistryError::Refused { .. })
                && err.to_string().contains("symbolic link"),
            "{name}: {err}"
        );
        let err = reg.list_leases().await.unwrap_err();
        assert!(
            matches!(err, RegistryError::Refused { .. }),
            "{name}: {err}"
        );
    }
    assert_eq!(
        fs::metadata(&target).unwrap().permissions().mode() & 0o777,
        0o644
    );
    assert!(!missing.exists());
    // A directory where the lock file belongs.
    fs::remove_file(&lock).unwrap();
    fs::create_dir(&lock).unwrap();
    let err = reg.list_leases().await.unwrap_err();
    assert!(
        matches!(err, RegistryError::Refused { .. }) && err.to_string().contains("a directory"),
        "{err}"
    );
    // A FIFO: opened without waiting for a writer, then refused.
    fs::remove_dir(&lock).unwrap();
    assert!(
        Command::new("mkfifo")
            .arg(&lock)
            .status()
            .unwrap()
            .success()
    );
    let err = reg.list_leases().await.unwrap_err();
    assert!(err.to_string().contains("not a regular file"), "{err}");
    fs::remove_file(&lock).unwrap();
    // Once it is gone, all works.
    reg.create_lease(&key("198.19.3.0-24"), &host(1))
        .await
        .unwrap();
}

#[tokio::test]
async fn corrupt_lease_files_are_skipped_and_the_rest_works() {
    let dir = setup(NET);
    let subnets = dir.path().join("subnets");
    fs::create_dir_all(&subnets).unwrap();
    fs::write(subnets.join("198.19.3.0-24"), "{not json\n").unwrap();
    fs::write(
        subnets.join("198.19.4.0-24hi"),
        r#"{"PublicIP":"198.18.1.4"}"#,
    )
    .unwrap();
    fs::write(
        subnets.join("198.19.5.0-24"),
        "{\"PublicIP\":\"198.18.1.5\"}\nexpires=later\n",
    )
    .unwrap();
    fs::write(
        subnets.join("198.19.6.0-24"),
        r#"{"PublicIP":"198.18.1.6","PublicIPv6":null}"#,
    )
    .unwrap();
    // An expiry past what a time can hold (it used to panic the registry's task, and so
    // every list) and a directory where a lease file belongs (it failed every list).
    fs::write(
        subnets.join("198.19.7.0-24"),
        "{\"PublicIP\":\"198.18.1.7\"}\nexpires=18446744073709551615\n",
    )
    .unwrap();
    fs::create_dir(subnets.join("198.19.8.0-24")).unwrap();
    // A link to a well-formed lease elsewhere (it was followed, so any file on the host could
    // be read as a lease) and a FIFO (reading it waited for a writer, with the lock held).
    let elsewhere = dir.path().join("elsewhere");
    fs::write(&elsewhere, r#"{"PublicIP":"198.18.1.9"}"#).unwrap();
    std::os::unix::fs::symlink(&elsewhere, subnets.join("198.19.9.0-24")).unwrap();
    let fifo = subnets.join("198.19.10.0-24");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    // A socket left by a dead process (opening it failed as an I/O error: every list).
    let _socket = std::os::unix::net::UnixListener::bind(subnets.join("198.19.11.0-24")).unwrap();
    let reg = registry(dir.path(), 3600);
    let Ok(list) = tokio::time::timeout(Duration::from_secs(30), reg.list_leases()).await else {
        // Opening the FIFO for writing frees the blocked reader, so the runtime can end.
        use std::os::unix::fs::OpenOptionsExt;
        let _ = fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo);
        panic!("listing hung on the FIFO");
    };
    let list = list.unwrap();
    assert_eq!(
        list.leases.iter().map(|l| l.key).collect::<Vec<_>>(),
        vec![key("198.19.6.0-24")]
    );
    // A corrupt file still blocks its key: nobody overwrites someone's broken file.
    let err = reg
        .create_lease(&key("198.19.3.0-24"), &host(1))
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::AlreadyExists(_)), "{err}");
    // A manager whose subnet.env names the corrupt key gets another one, and sees host 6.
    let mut opts = options(1);
    opts.previous = Some(key("198.19.3.0-24"));
    let mut a = Running::start(Arc::clone(&reg), opts).await;
    let s = a.wait(10, "host 6 as a peer", |s| s.peers.len() == 1).await;
    let own = own_key(&s).unwrap();
    // Not .4: a file whose name is no key ("198.19.4.0-24hi") holds no subnet, so .4 is free
    // (this asserted it was not, and failed whenever the random pick was .4, 1 run in 100).
    assert!(
        ![3, 5, 6, 7, 8, 9, 10].contains(&own.ipv4().unwrap().network().octets()[2]),
        "{own}"
    );
    a.stop().await;
    if own != key("198.19.4.0-24") {
        reg.create_lease(&key("198.19.4.0-24"), &host(4))
            .await
            .unwrap();
    }
}

/// A host gives up a lease it listed earlier (superseded by its reservation, or unfit for a
/// new config) only while the key still holds it: meanwhile it may have expired and another
/// host taken the key.
#[tokio::test]
async fn a_lease_is_released_only_while_it_is_still_the_one_listed() {
    let dir = setup(NET);
    let reg = registry(dir.path(), 3600);
    let old = reg
        .create_lease(&key("198.19.7.0-24"), &host(7))
        .await
        .unwrap();
    reg.revoke_lease(&key("198.19.7.0-24")).await.unwrap();
    let taken = reg
        .create_lease(&key("198.19.7.0-24"), &host(8))
        .await
        .unwrap();
    assert!(!reg.release_lease(&old).await.unwrap());
    let reserved = reg
        .create_reservation(&key("198.19.9.0-24"), &host(9))
        .await
        .unwrap();
    reg.revoke_lease(&key("198.19.9.0-24")).await.unwrap();
    reg.create_reservation(&key("198.19.9.0-24"), &host(10))
        .await
        .unwrap();
    assert!(!reg.release_lease(&reserved).await.unwrap());
    assert_eq!(holders(&reg).await, [host(8), host(10)]);
    // What is still the one listed is released.
    assert!(reg.release_lease(&taken).await.unwrap());
    assert_eq!(holders(&reg).await, [host(10)]);
}

/// A hand-made file under a non-canonical name ("198.19.5.0-024") holds nothing, as on etcd:
/// it is never read as a lease, so it neither blocks the key it spells (before, creating that
/// key failed as overlapping itself, naming a release that could not find the file) nor
/// stands in for it.
#[tokio::test]
async fn a_non_canonical_twin_holds_nothing() {
    let dir = setup(NET);
    let reg = registry(dir.path(), 3600);
    let subnets = dir.path().join("subnets");
    fs::create_dir_all(&subnets).unwrap();
    fs::write(
        subnets.join("198.19.5.0-024"),
        "{\"PublicIP\":\"198.18.0.5\"}\n",
    )
    .unwrap();
    assert!(live(&reg).await.is_empty());
    reg.create_lease(&key("198.19.5.0-24"), &host(1))
        .await
        .unwrap();
    assert_eq!(holders(&reg).await, [host(1)]);
    // Nor does it take part in a release: the twin stays for its maker to delete.
    assert!(!reg.revoke_dead(&key("198.19.5.0-24")).await.unwrap());
    assert!(subnets.join("198.19.5.0-024").exists());
}

/// A writer that died between creating its temporary file and renaming it leaves the file
/// behind; a key never written again would keep it for good. Any change removes such files
/// from `subnets/` once they are a minute old, and leaves a fresh one and other dot-files.
#[tokio::test]
async fn a_change_removes_what_a_dead_writer_left_in_subnets() {
    let dir = setup(NET);
    let reg = registry(dir.path(), 3600);
    let subnets = dir.path().join("subnets");
    reg.create_lease(&key("198.19.1.0-24"), &host(1))
        .await
        .unwrap();
    let plant = |name: &str, age: u64| {
        let path = subnets.join(name);
        fs::write(&path, "{\"PublicIP\":\"198.18.0.9\"}\n").unwrap();
        let f = fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(std::time::SystemTime::now() - Duration::from_secs(age))
            .unwrap();
    };
    plant(".198.19.9.0-24.0123456789abcdef.tmp", 120);
    plant(".198.19.8.0-24.fedcba9876543210.tmp", 0);
    plant(".notes.tmp", 120);
    assert_eq!(live(&reg).await.len(), 1, "a temporary file is no lease");
    reg.revoke_lease(&key("198.19.1.0-24")).await.unwrap();
    let mut left: Vec<String> = fs::read_dir(&subnets)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, [".198.19.8.0-24.fedcba9876543210.tmp", ".notes.tmp"]);
}

/// `lease release` of a key it did not list deletes only what holds no lease: an expired or
/// unreadable entry, never a live lease or a reservation (a host may have taken the key since).
#[tokio::test]
async fn only_a_dead_entry_is_revoked_as_dead() {
    let dir = setup(NET);
    let reg = registry(dir.path(), 3600);
    let subnets = dir.path().join("subnets");
    reg.create_lease(&key("198.19.1.0-24"), &host(1))
        .await
        .unwrap();
    reg.create_reservation(&key("198.19.2.0-24"), &host(2))
        .await
        .unwrap();
    fs::write(
        subnets.join("198.19.3.0-24"),
        "{\"PublicIP\":\"198.18.0.3\"}\nexpires=1\n",
    )
    .unwrap();
    fs::write(subnets.join("198.19.4.0-24"), "not json\n").unwrap();
    for live in ["198.19.1.0-24", "198.19.2.0-24", "198.19.5.0-24"] {
        assert!(!reg.revoke_dead(&key(live)).await.unwrap(), "{live}");
    }
    for dead in ["198.19.3.0-24", "198.19.4.0-24"] {
        assert!(reg.revoke_dead(&key(dead)).await.unwrap(), "{dead}");
        assert!(!subnets.join(dead).exists(), "{dead}");
    }
    assert_eq!(holders(&reg).await, [host(1), host(2)]);
}

#[tokio::test]
async fn full_range_gives_the_exhaustion_error() {
    let dir = setup(r#"{"Network":"198.19.0.0/24","SubnetLen":26}"#);
    let reg = registry(dir.path(), 3600);
    // /24 of /26s: candidates .64, .128, .192.
    for (i, k) in ["198.19.0.64-26", "198.19.0.128-26", "198.19.0.192-26"]
        .iter()
        .enumerate()
    {
        reg.create_lease(&key(k), &host(10 + i as u8))
            .await
            .unwrap();
    }
    let config = reg.get_network_config().await.unwrap();
    let mut rng = StdRng::seed_from_u64(1);
    let err = manager::acquire(reg.as_ref(), &config, &host(1), None, &mut rng)
        .await
        .unwrap_err();
    assert!(matches!(err, AcquireError::Alloc(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "no free subnet in 198.19.0.64 … 198.19.0.192 (/26): all 3 are leased; widen Network \
         or SubnetMin/SubnetMax, or release leases with `linen lease release`"
    );
}

/// A reservation made for a host that holds a dynamic lease supersedes it: the host takes the
/// reservation and releases the lease, which peers would otherwise route to it for a day.
#[tokio::test]
async fn a_reservation_supersedes_the_hosts_dynamic_lease() {
    let dir = setup(NET);
    let subnets = dir.path().join("subnets");
    fs::create_dir_all(&subnets).unwrap();
    let expires = unix_secs_in(3600);
    fs::write(
        subnets.join("198.19.9.0-24"),
        format!("{{\"PublicIP\":\"198.18.1.1\"}}\nexpires={expires}\n"),
    )
    .unwrap();
    fs::write(
        subnets.join("198.19.42.0-24"),
        "{\"PublicIP\":\"198.18.1.1\"}\n",
    )
    .unwrap();
    let reg = registry(dir.path(), 3600);
    let a = Running::start(Arc::clone(&reg), options(1)).await;
    let own = a.state.borrow().clone().own.unwrap();
    assert_eq!(own.key, key("198.19.42.0-24"));
    assert!(own.is_reservation());
    assert!(!subnets.join("198.19.9.0-24").exists());
    let keys: Vec<SubnetKey> = live(&reg).await.iter().map(|l| l.key).collect();
    assert_eq!(keys, [key("198.19.42.0-24")]);
    a.stop().await;
}

/// Two dynamic leases naming a host's address (its own, rewritten when it followed a new
/// address, and the one another host had for that address, not yet expired): the host keeps
/// the subnet of its `subnet.env`, which the list gives second, and leaves the other alone.
#[tokio::test]
async fn of_two_leases_naming_the_host_the_previous_subnet_is_kept() {
    let dir = setup(NET);
    let subnets = dir.path().join("subnets");
    fs::create_dir_all(&subnets).unwrap();
    let expires = unix_secs_in(3600);
    for k in ["198.19.3.0-24", "198.19.9.0-24"] {
        fs::write(
            subnets.join(k),
            format!("{{\"PublicIP\":\"198.18.1.1\"}}\nexpires={expires}\n"),
        )
        .unwrap();
    }
    let reg = registry(dir.path(), 3600);
    let mut opts = options(1);
    opts.previous = Some(key("198.19.9.0-24"));
    let a = Running::start(Arc::clone(&reg), opts).await;
    let own = a.state.borrow().clone().own.unwrap();
    assert_eq!(own.key, key("198.19.9.0-24"));
    assert!(!own.is_reservation());
    let keys: Vec<SubnetKey> = live(&reg).await.iter().map(|l| l.key).collect();
    assert_eq!(keys, [key("198.19.3.0-24"), key("198.19.9.0-24")]);
    a.stop().await;
}

/// Two dual-stack hosts configured with one PublicIP (behind one NAT) and their own IPv6
/// addresses share a key (the second reuses the lease naming its PublicIP, as flannel does),
/// and each one's write names only some of the other's addresses. Each rewrites the key for
/// that once at once, and then the two together about twice a minute, not back and forth as
/// fast as the registry answers.
#[tokio::test]
async fn two_hosts_sharing_a_key_do_not_rewrite_it_back_and_forth() {
    let dir = setup(DUAL);
    // A day's lease: no renewal falls due during the test.
    let reg = registry(dir.path(), 86_400);
    let dual = |n: u8| {
        let mut attrs = host(1);
        attrs.public_ipv6 = Some(format!("fd00:18::{n}").parse().unwrap());
        let mut o = options(1);
        o.attrs = attrs;
        o
    };
    let a = Running::start(Arc::clone(&reg), dual(1)).await;
    let shared = a.own().unwrap();
    let before = reg.list_leases().await.unwrap().revision;
    let b = Running::start(Arc::clone(&reg), dual(2)).await;
    assert_eq!(b.own(), Some(shared));
    // b's acquisition, a's rewrite, b's rewrite; then the next rewrite is a minute away.
    let writes = || async { reg.list_leases().await.unwrap().revision - before };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while writes().await < 3 {
        assert!(std::time::Instant::now() < deadline, "no rewrites");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let n = writes().await;
    assert_eq!(n, 3, "the key was written {n} times");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn reservation_is_taken_by_its_public_ip_and_never_gets_an_expiry() {
    let dir = setup(NET);
    let subnets = dir.path().join("subnets");
    fs::create_dir_all(&subnets).unwrap();
    // Dropped in by configuration management: no expires line, no revision bump.
    fs::write(
        subnets.join("198.19.42.0-24"),
        "{\"PublicIP\":\"198.18.1.1\",\"PublicIPv6\":null}\n",
    )
    .unwrap();
    let reg = registry(dir.path(), 2);
    let mut opts = options(1);
    opts.renew_margin = Duration::from_secs(1);
    let mut a = Running::start(Arc::clone(&reg), opts).await;
    let s = a.state.borrow().clone();
    let own = s.own.unwrap();
    assert_eq!(own.key, key("198.19.42.0-24"));
    assert!(own.is_reservation());
    // Renewing (as the acquisition did) keeps it a reservation.
    let text = fs::read_to_string(subnets.join("198.19.42.0-24")).unwrap();
    assert_eq!(
        text.trim(),
        r#"{"PublicIP":"198.18.1.1","PublicIPv6":null}"#
    );
    let renewed = reg.renew_lease(&own, &host(1)).await.unwrap();
    assert!(renewed.is_reservation());
    // Another host dropping a reservation in by hand is seen as a peer (fingerprint polling).
    fs::write(
        subnets.join("198.19.43.0-24"),
        "{\"PublicIP\":\"198.18.1.2\"}\n",
    )
    .unwrap();
    a.wait(PATIENCE, "the hand-made reservation", |s| {
        s.peers.len() == 1
    })
    .await;
    // Past the TTL the reservation is still there and still ours.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let s = a.state.borrow().clone();
    assert_eq!(own_key(&s), Some(key("198.19.42.0-24")));
    assert!(s.own.unwrap().is_reservation());
    assert_eq!(reg.list_leases().await.unwrap().leases.len(), 2);
    a.stop().await;
}

#[tokio::test]
async fn previous_subnet_held_by_another_host_is_not_taken() {
    let dir = setup(NET);
    let reg = registry(dir.path(), 3600);
    reg.create_lease(&key("198.19.9.0-24"), &host(2))
        .await
        .unwrap();
    let mut opts = options(1);
    opts.previous = Some(key("198.19.9.0-24"));
    let a = Running::start(Arc::clone(&reg), opts).await;
    assert_ne!(own_key(&a.state.borrow()), Some(key("198.19.9.0-24")));
    let list = reg.list_leases().await.unwrap();
    let held = list
        .leases
        .iter()
        .find(|l| l.key == key("198.19.9.0-24"))
        .unwrap();
    assert_eq!(held.attrs, host(2), "host 2's lease untouched");
    a.stop().await;
}

#[tokio::test]
async fn renewal_extends_expiry() {
    let dir = setup(NET);
    let reg = registry(dir.path(), 3);
    let mut opts = options(1);
    opts.renew_margin = Duration::from_secs(2);
    let mut a = Running::start(Arc::clone(&reg), opts).await;
    let first = a.state.borrow().own.clone().unwrap();
    let exp0 = first.expiration.unwrap();
    let s = a
        .wait(4, "a renewal", |s| {
            s.own
                .as_ref()
                .and_then(|l| l.expiration)
                .is_some_and(|e| e > exp0)
        })
        .await;
    let own = s.own.unwrap();
    assert_eq!(own.key, first.key);
    assert!(own.expiration.unwrap() > SystemTime::now());
    // Still there after the first TTL would have run out.
    tokio::time::sleep_until(
        tokio::time::Instant::now()
            + exp0.duration_since(SystemTime::now()).unwrap_or_default()
            + Duration::from_millis(300),
    )
    .await;
    assert!(live(&reg).await.iter().any(|l| l.key == first.key));
    a.stop().await;
}

#[tokio::test]
async fn own_lease_deleted_by_hand_is_reacquired() {
    let dir = setup(NET);
    let reg = registry(dir.path(), 3600);
    let mut a = Running::start(Arc::clone(&reg), options(1)).await;
    let mine = own_key(&a.state.borrow()).unwrap();
    fs::remove_file(dir.path().join("subnets").join(mine.to_string())).unwrap();
    a.wait(PATIENCE, "the lease to be lost", |s| s.own.is_none())
        .await;
    a.wait(PATIENCE, "the same subnet again", |s| {
        own_key(s) == Some(mine)
    })
    .await;
    assert!(
        live(&reg)
            .await
            .iter()
            .any(|l| l.key == mine && l.attrs == host(1))
    );
    assert!(
        !a.task.is_finished(),
        "the manager keeps running (flannel #904)"
    );
    a.stop().await;
    // Stopping keeps the lease.
    assert_eq!(reg.list_leases().await.unwrap().leases.len(), 1);
}

/// The directory registry: the manager leaves the subnet to its taker and moves. (That the
/// taker is a peer *at once*, not only after a later write to its key, cannot show here: the
/// new lease file changes the directory and the next snapshot lists the taker anyway. The etcd
/// test `our_key_taken_by_another_host_is_routed_to_at_once` checks it.)
#[tokio::test]
async fn own_subnet_taken_by_another_host_is_left_to_it() {
    let dir = setup(NET);
    let reg = registry(dir.path(), 3600);
    let mut a = Running::start(Arc::clone(&reg), options(1)).await;
    let mine = own_key(&a.state.borrow()).unwrap();
    // Host 2 overwrites our lease file (an operator's mistake, or a host with a stale
    // subnet.env and no lock): same key, its PublicIP.
    let path = dir.path().join("subnets").join(mine.to_string());
    let text = fs::read_to_string(&path).unwrap();
    let theirs = text.replace("198.18.1.1", "198.18.1.2");
    assert_ne!(text, theirs, "{text}");
    let tmp = dir.path().join("taken.tmp");
    fs::write(&tmp, theirs).unwrap();
    fs::rename(&tmp, &path).unwrap();
    // We move to a new subnet, and host 2 holds ours.
    let s = a
        .wait(PATIENCE, "a new subnet and host 2 as a peer", |s| {
            own_key(s).is_some_and(|k| k != mine)
                && s.peers.iter().any(|l| l.key == mine && l.attrs == host(2))
        })
        .await;
    assert_eq!(s.peers.len(), 1, "{s:?}");
    a.stop().await;
}

/// A peer's key overlapping ours (written past the create check, e.g. by an older linen) makes
/// the manager renew at once, not at the next renewal an hour away; our key sorts greater, so
/// we give way and move to a subnet of our own.
#[tokio::test]
async fn an_overlapping_peer_key_is_settled_at_once() {
    let dir = setup(DUAL);
    // Two hours: the first renewal (an hour before expiry) is an hour away.
    let reg = registry(dir.path(), 7200);
    let mine = key("198.19.62.0-24&fd00:19:0:32::-64");
    let mut opts = options(1);
    opts.attrs.public_ipv6 = Some("fd00:18::1".parse().unwrap());
    opts.previous = Some(mine);
    let mut a = Running::start(Arc::clone(&reg), opts).await;
    assert_eq!(own_key(&a.state.borrow()), Some(mine));
    let theirs = key("198.19.62.0-24&fd00:19:0:2::-64");
    let expires = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let tmp = dir.path().join("theirs.tmp");
    fs::write(
        &tmp,
        format!(
            "{{\"PublicIP\":\"198.18.1.2\",\"PublicIPv6\":\"fd00:18::2\"}}\nexpires={expires}\n"
        ),
    )
    .unwrap();
    fs::rename(&tmp, dir.path().join("subnets").join(theirs.to_string())).unwrap();
    // Our old key, deleted, leaves the peers when the watch sees it gone.
    a.wait(10, "a subnet of our own, and theirs the only peer", |s| {
        own_key(s).is_some_and(|k| !k.overlaps(&theirs))
            && s.peers.iter().map(|l| l.key).eq([theirs])
    })
    .await;
    a.stop().await;
}

#[tokio::test]
async fn manager_recovers_when_the_registry_comes_back() {
    let dir = setup(NET);
    let reg = registry(dir.path(), 3600);
    let mut a = Running::start(Arc::clone(&reg), options(1)).await;
    let mine = own_key(&a.state.borrow()).unwrap();
    a.wait(PATIENCE, "a healthy registry", |s| s.registry.connected)
        .await;
    // Make subnets/ unusable in a way that also stops root: a file in its place.
    let subnets = dir.path().join("subnets");
    let away = dir.path().join("subnets.away");
    fs::rename(&subnets, &away).unwrap();
    fs::write(&subnets, "not a directory").unwrap();
    let s = a
        .wait(PATIENCE, "the outage to be noticed", |s| {
            !s.registry.connected
        })
        .await;
    assert!(
        s.registry
            .last_error
            .as_deref()
            .unwrap()
            .contains("subnets"),
        "{s:?}"
    );
    // Meanwhile another host joins (written into the real directory).
    fs::remove_file(&subnets).unwrap();
    fs::rename(&away, &subnets).unwrap();
    registry(dir.path(), 3600)
        .create_lease(&key("198.19.200.0-24"), &host(2))
        .await
        .unwrap();
    let s = a
        .wait(PATIENCE, "recovery and host 2", |s| {
            s.registry.connected && s.peers.iter().any(|l| l.key == key("198.19.200.0-24"))
        })
        .await;
    assert_eq!(own_key(&s), Some(mine));
    assert!(s.registry.resyncs >= 1, "{s:?}");
    a.stop().await;
}

/// A daemon's registry (`requiring_config`) whose directory goes away (moved, a shared mount
/// gone) is out of reach: lists, watches and writes fail, and nothing is recreated there, so
/// hosts do not each start an empty registry of their own while reporting healthy. An admin
/// command's registry still lists a missing directory as empty.
#[tokio::test]
async fn a_registry_directory_that_goes_away_is_out_of_reach_not_recreated() {
    let dir = setup(NET);
    let path = dir.path().join("registry");
    fs::create_dir(&path).unwrap();
    fs::rename(dir.path().join("config"), path.join("config")).unwrap();
    let reg = DirectoryRegistry::with_ttl(&path, Duration::from_secs(3600))
        .with_poll_interval(Duration::from_millis(50))
        .requiring_config();
    reg.create_lease(&key("198.19.8.0-24"), &host(8))
        .await
        .unwrap();
    let list = reg.list_leases().await.unwrap();
    assert_eq!(list.leases.len(), 1);
    let mut w = reg.watch_leases(list.revision).await.unwrap();
    assert!(matches!(w.next().await.unwrap(), WatchEvent::Snapshot(_)));

    fs::rename(&path, dir.path().join("moved")).unwrap();
    let gone = |e: RegistryError| {
        assert!(e.is_transient(), "{e}");
        assert!(e.to_string().contains("not recreating it"), "{e}");
    };
    gone(reg.list_leases().await.unwrap_err());
    gone(
        tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .expect("the watch noticed nothing")
            .unwrap_err(),
    );
    gone(
        reg.create_lease(&key("198.19.9.0-24"), &host(9))
            .await
            .unwrap_err(),
    );
    let lease = list.leases[0].clone();
    gone(reg.renew_lease(&lease, &lease.attrs).await.unwrap_err());
    assert!(!path.exists(), "the registry directory was recreated");

    // Without the requirement (admin commands), a missing directory is an empty store.
    let admin = DirectoryRegistry::with_ttl(&path, Duration::from_secs(3600));
    assert!(admin.list_leases().await.unwrap().leases.is_empty());
}

#[tokio::test]
async fn watch_delivers_a_snapshot_first_and_on_change() {
    let dir = setup(NET);
    let reg = registry(dir.path(), 3600);
    let list = reg.list_leases().await.unwrap();
    let mut w = reg.watch_leases(list.revision).await.unwrap();
    let WatchEvent::Snapshot(first) = w.next().await.unwrap() else {
        panic!("first event must be a snapshot")
    };
    assert!(first.leases.is_empty());
    reg.create_lease(&key("198.19.8.0-24"), &host(8))
        .await
        .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(PATIENCE), w.next())
        .await
        .unwrap()
        .unwrap();
    let WatchEvent::Snapshot(next) = ev else {
        panic!("{ev:?}")
    };
    assert_eq!(next.revision, 1);
    assert_eq!(next.leases.len(), 1);
}

#[tokio::test]
async fn watch_sees_a_same_size_file_renamed_in_with_the_old_mtime() {
    // `mv`, `cp -p` or `rsync -t` of a hand-edited reservation: same name, same size, same
    // mtime, and no linen write to raise the revision. Only the inode and ctime change.
    let dir = setup(NET);
    let subnets = dir.path().join("subnets");
    fs::create_dir_all(&subnets).unwrap();
    let path = subnets.join("198.19.43.0-24");
    fs::write(&path, "{\"PublicIP\":\"198.18.1.5\"}\n").unwrap();
    let mtime = fs::metadata(&path).unwrap().modified().unwrap();
    let reg = registry(dir.path(), 3600);
    let mut w = reg.watch_leases(0).await.unwrap();
    let WatchEvent::Snapshot(first) = w.next().await.unwrap() else {
        panic!("first event must be a snapshot")
    };
    assert_eq!(
        first.leases[0].attrs.public_ip,
        Some("198.18.1.5".parse().unwrap())
    );
    let edited = subnets.join(".edited");
    fs::write(&edited, "{\"PublicIP\":\"198.18.1.6\"}\n").unwrap();
    fs::File::options()
        .write(true)
        .open(&edited)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    fs::rename(&edited, &path).unwrap();
    assert_eq!(fs::metadata(&path).unwrap().modified().unwrap(), mtime);
    let ev = tokio::time::timeout(Duration::from_secs(PATIENCE), w.next())
        .await
        .expect("the replaced file was not noticed")
        .unwrap();
    let WatchEvent::Snapshot(next) = ev else {
        panic!("{ev:?}")
    };
    assert_eq!(
        next.leases[0].attrs.public_ip,
        Some("198.18.1.6".parse().unwrap())
    );
}

#[tokio::test]
async fn a_revision_at_the_top_of_its_range_does_not_stop_writes() {
    let dir = setup(NET);
    fs::write(dir.path().join("revision"), format!("{}\n", i64::MAX)).unwrap();
    let reg = registry(dir.path(), 3600);
    reg.create_lease(&key("198.19.8.0-24"), &host(8))
        .await
        .unwrap();
    let list = reg.list_leases().await.unwrap();
    assert_eq!(list.revision, i64::MAX);
    assert_eq!(list.leases.len(), 1);
}

/// An operation that does not return (a hard NFS mount whose server is gone; here, the
/// directory's lock held by another process, which the operation waits 10 s for) is reported as
/// the registry being unavailable at its deadline, not waited for; and abandoned operations
/// do not pile up threads without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operation_that_does_not_return_is_unavailable_at_its_deadline() {
    let dir = setup(NET);
    let reg = DirectoryRegistry::with_ttl(dir.path(), Duration::from_secs(3600))
        .with_op_deadline(Duration::from_millis(300));
    reg.list_leases().await.unwrap();
    let lock = fs::File::open(dir.path().join(".lock")).unwrap();
    lock.lock().unwrap();
    // Not the lock wait's own error, 10 s later: the deadline's.
    let err = reg
        .create_lease(&key("198.19.8.0-24"), &host(8))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RegistryError::Unavailable { reason, .. } if reason.contains("no answer")),
        "{err:?}"
    );
    // 64 operations under way (63 more, each abandoned after 300 ms and waiting for the lock
    // for up to 10 s): the next one fails at once.
    let waits: Vec<_> = (0..63)
        .map(|_| {
            let reg = reg.clone();
            tokio::spawn(async move { reg.list_leases().await })
        })
        .collect();
    for w in waits {
        assert!(w.await.unwrap().is_err());
    }
    let err = reg.list_leases().await.unwrap_err();
    assert!(
        matches!(&err, RegistryError::Unavailable { reason, .. } if reason.contains("have not returned")),
        "{err:?}"
    );
    drop(lock);
}
