//! The lease manager and the admin commands on a real etcd (skipped, visibly, when `etcd` is
//! missing): the behaviours flannel gets wrong, checked against the registry it gets them wrong
//! on.

#![cfg(feature = "etcd")]

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::LINEN;
use common::etcd::EtcdServer;
use common::manager::{Running, host, key};
use linen::lease::Registry;
use linen::lease::etcd::{EtcdOptions, EtcdRegistry};
use linen::lease::manager::ManagerOptions;
use linen::model::{DEFAULT_PREFIX, NetworkConfigSpec};

async fn registry(server: &EtcdServer) -> Arc<EtcdRegistry> {
    let reg = EtcdRegistry::connect(&EtcdOptions {
        endpoints: vec![server.endpoint()],
        lease_ttl: Duration::from_secs(3600),
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(3),
        ..EtcdOptions::default()
    })
    .await
    .expect("connect to the test etcd");
    Arc::new(reg)
}

async fn with_config(server: &EtcdServer) -> Arc<EtcdRegistry> {
    let reg = registry(server).await;
    let spec = NetworkConfigSpec::from_json(r#"{"Network":"198.19.0.0/16"}"#).unwrap();
    reg.put_network_config(&spec).await.unwrap();
    reg
}

fn options(n: u8) -> ManagerOptions {
    let mut o = ManagerOptions::new(host(n));
    o.backoff_min = Duration::from_millis(100);
    o.backoff_max = Duration::from_millis(500);
    o
}

#[tokio::test]
async fn a_previous_subnet_held_by_another_host_is_not_taken() {
    let Some(server) = EtcdServer::start() else {
        return;
    };
    let reg = with_config(&server).await;
    reg.create_lease(&key("198.19.9.0-24"), &host(2))
        .await
        .unwrap();
    let mut opts = options(1);
    opts.previous = Some(key("198.19.9.0-24"));
    let a = Running::start(Arc::clone(&reg), opts).await;
    let mine = a.own().unwrap();
    assert_ne!(mine, key("198.19.9.0-24"));
    let held = reg
        .list_leases()
        .await
        .unwrap()
        .leases
        .into_iter()
        .find(|l| l.key == key("198.19.9.0-24"))
        .unwrap();
    assert_eq!(
        held.attrs,
        host(2),
        "host 2's lease untouched (flannel #1289)"
    );
    a.stop().await;
}

/// A host's new address (its underlay's DHCP lease changed) rewrites its key in place: the
/// same subnet, now naming the new address, which a peer sees as that subnet's new holder
/// address; no second key is created.
#[tokio::test]
async fn a_new_address_rewrites_the_key_in_place() {
    let Some(server) = EtcdServer::start() else {
        return;
    };
    let reg = with_config(&server).await;
    let a = Running::start(Arc::clone(&reg), options(1)).await;
    let mut b = Running::start(Arc::clone(&reg), options(2)).await;
    let mine = a.own().unwrap();
    b.wait(10, "host 1 as a peer", |s| {
        s.peers.iter().any(|l| l.key == mine)
    })
    .await;
    a.addresses.send(host(9)).unwrap();
    b.wait(10, "host 1's new address", |s| {
        s.peers
            .iter()
            .any(|l| l.key == mine && l.attrs.public_ip == host(9).public_ip)
    })
    .await;
    let listed = reg.list_leases().await.unwrap().leases;
    assert_eq!(listed.len(), 2, "{listed:?}");
    let own = a.state.borrow().own.clone().expect("still held");
    assert_eq!((own.key, own.attrs.public_ip), (mine, host(9).public_ip));
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_lease_key_deleted_by_hand_is_reacquired() {
    let Some(server) = EtcdServer::start() else {
        return;
    };
    let reg = with_config(&server).await;
    let mut a = Running::start(Arc::clone(&reg), options(1)).await;
    let mine = a.own().unwrap();
    let path = format!("{DEFAULT_PREFIX}/subnets/{mine}");
    let created = create_revision(&server, &path).expect("our key exists");
    server.etcdctl(&["del", &path]);
    // The key comes back, written anew (a later create revision), by the running manager.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while create_revision(&server, &path).is_none_or(|r| r <= created) {
        assert!(
            std::time::Instant::now() < deadline,
            "the lease was not re-acquired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.wait(30, "the same subnet again", |s| {
        s.own.as_ref().is_some_and(|l| l.key == mine) && s.registry.connected
    })
    .await;
    let list = reg.list_leases().await.unwrap().leases;
    assert!(list.iter().any(|l| l.key == mine && l.attrs == host(1)));
    assert!(
        !a.task.is_finished(),
        "keeps running (flannel #904 exits 0)"
    );
    a.stop().await;
}

#[tokio::test]
async fn our_key_taken_by_another_host_is_routed_to_at_once() {
    let Some(server) = EtcdServer::start() else {
        return;
    };
    let reg = with_config(&server).await;
    let mut a = Running::start(Arc::clone(&reg), options(1)).await;
    let mine = a.own().unwrap();
    a.wait(30, "the watch to run", |s| s.registry.connected)
        .await;
    // Host 2 writes its lease over ours (a stale subnet.env and a hand-made put, say).
    let path = format!("{DEFAULT_PREFIX}/subnets/{mine}");
    let value = server.etcdctl(&["get", "--print-value-only", &path]);
    let theirs = value.trim().replace("198.18.1.1", "198.18.1.2");
    assert_ne!(value.trim(), theirs, "{value}");
    let grant = server.etcdctl(&["lease", "grant", "3600"]);
    let id = grant.split_whitespace().nth(1).expect("lease id");
    server.etcdctl(&["put", "--lease", id, &path, &theirs]);
    // We move to another subnet, and host 2 is a peer from the event that showed it: nothing
    // else is written to its key until its renewal, hours later.
    let s = a
        .wait(30, "a new subnet and host 2 as a peer", |s| {
            s.own.as_ref().is_some_and(|l| l.key != mine)
                && s.peers.iter().any(|l| l.key == mine && l.attrs == host(2))
        })
        .await;
    assert_eq!(s.peers.len(), 1, "{s:?}");
    a.stop().await;
}

#[tokio::test]
async fn etcd_down_for_10_s_keeps_the_lease_and_catches_up() {
    let Some(mut server) = EtcdServer::start() else {
        return;
    };
    let reg = with_config(&server).await;
    let mut a = Running::start(Arc::clone(&reg), options(1)).await;
    let mine = a.own().unwrap();
    // A peer joins before the outage; the manager sees it. Its subnets lie beyond the first
    // 100 free ones, among which ours was picked at random: never the same as ours.
    let other = registry(&server).await;
    other
        .create_lease(&key("198.19.150.0-24"), &host(2))
        .await
        .unwrap();
    a.wait(30, "host 2", |s| s.peers.len() == 1).await;
    server.stop();
    a.wait(10, "the outage to be noticed", |s| !s.registry.connected)
        .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    server.start_again();
    // After the restart: host 2 leaves and host 3 joins; both changes arrive, the lease stays.
    let other = registry(&server).await;
    other.revoke_lease(&key("198.19.150.0-24")).await.unwrap();
    other
        .create_lease(&key("198.19.151.0-24"), &host(3))
        .await
        .unwrap();
    a.wait(15, "recovery with host 3 only", |s| {
        s.registry.connected && s.peers.len() == 1 && s.peers[0].key == key("198.19.151.0-24")
    })
    .await;
    assert_eq!(a.own(), Some(mine), "still our lease");
    let list = reg.list_leases().await.unwrap().leases;
    assert!(list.iter().any(|l| l.key == mine && l.attrs == host(1)));
    a.stop().await;
}

/// The key's create revision, or `None` when it is absent.
fn create_revision(server: &EtcdServer, path: &str) -> Option<u64> {
    let json = server.etcdctl(&["get", "-w", "json", path]);
    let v: serde_json::Value = serde_json::from_str(&json).ok()?;
    v["kvs"][0]["create_revision"].as_u64()
}

fn linen(server: &EtcdServer, args: &[&str]) -> (bool, String) {
    let out = Command::new(LINEN)
        .args(args)
        .args(["--etcd-endpoints", &server.endpoint()])
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test]
async fn admin_commands_work_against_etcd() {
    let Some(server) = EtcdServer::start() else {
        return;
    };
    let (ok, out) = linen(&server, &["network", "init", "--network", "198.19.0.0/16"]);
    assert!(ok, "{out}");
    let stored = server.etcdctl(&[
        "get",
        "--print-value-only",
        &format!("{DEFAULT_PREFIX}/config"),
    ]);
    assert!(stored.contains("\"Network\":\"198.19.0.0/16\""), "{stored}");
    let (ok, out) = linen(&server, &["network", "show"]);
    assert!(
        ok && out.contains("198.19.1.0") && out.contains("198.19.255.0"),
        "{out}"
    );
    let (ok, out) = linen(
        &server,
        &[
            "lease",
            "reserve",
            "198.19.7.0/24",
            "--public-ip",
            "198.18.1.7",
        ],
    );
    assert!(ok, "{out}");
    // A reservation has no etcd lease attached.
    let kv = server.etcdctl(&[
        "get",
        "-w",
        "json",
        &format!("{DEFAULT_PREFIX}/subnets/198.19.7.0-24"),
    ]);
    assert!(kv.contains("\"kvs\""), "{kv}");
    assert!(
        !kv.contains("\"lease\""),
        "reservation must be lease-less: {kv}"
    );
    let (ok, out) = linen(&server, &["lease", "list", "--json"]);
    assert!(
        ok && out.contains("198.19.7.0-24") && out.contains("\"reservation\":true"),
        "{out}"
    );
    let (ok, out) = linen(&server, &["lease", "release", "198.19.7.0/24"]);
    assert!(ok, "{out}");
    let (ok, out) = linen(&server, &["lease", "list", "--json"]);
    assert!(ok && !out.contains("198.19.7.0-24"), "{out}");
}
