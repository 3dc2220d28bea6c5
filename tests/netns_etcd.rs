//! linen end to end with a real etcd v3: hosts in network namespaces run `linen run
//! --etcd-endpoints`, against one etcd that runs in the lab's switch namespace on the underlay
//! (198.18.0.254), since the daemons cannot reach the root namespace's loopback. Three hosts
//! mesh; etcd is then down for 30 s while a ping runs (the data plane keeps forwarding with the
//! table it has: no ping may be lost); after etcd is back, a fourth host joins and every host
//! must learn its lease through the resumed watches. Root only; skipped with a message when not
//! root or when `etcd` is not installed.

#![cfg(feature = "etcd")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::etcd::EtcdServer;
use linen::lab::{Lab, is_root, wait_for};
use linen::model::SubnetEnv;

const LINEN: &str = env!("CARGO_BIN_EXE_linen");

/// How long etcd stays down while the ping runs.
const OUTAGE: Duration = Duration::from_secs(30);

/// The ping across the outage: 175 echoes 0.2 s apart (35 s), so it starts before etcd stops
/// and ends after etcd is back.
const PING_COUNT: &str = "175";

/// `linen run` hosts in a lab, all pointed at one etcd.
struct Cluster {
    lab: Lab,
    etcd: EtcdServer,
    /// Logs and subnet.env files of the daemons.
    dir: tempfile::TempDir,
    pids: Vec<Option<u32>>,
}

impl Cluster {
    /// A lab of `hosts` hosts with etcd on its switch and the network config written by
    /// `linen network init` from host 1. `None` (skipped) when etcd is not installed.
    fn new(name: &str, hosts: u8) -> Option<Cluster> {
        let lab = Lab::new(name, hosts, 1500).unwrap();
        let switch = lab.switch_host().unwrap().expect("3+ hosts have a switch");
        let etcd = EtcdServer::start_in_netns(&switch.ns, switch.ip)?;
        let cluster = Cluster {
            lab,
            etcd,
            dir: tempfile::tempdir().unwrap(),
            pids: vec![None; usize::from(hosts)],
        };
        let mut init = cluster.lab.host(0).command(LINEN);
        init.args(["network", "init", "--etcd-endpoints"])
            .arg(cluster.etcd.endpoint())
            .args(["--network", "198.19.0.0/16"]);
        let out = run(init);
        assert!(out.status.success(), "network init: {}", text(&out));
        let stored =
            cluster
                .etcd
                .etcdctl(&["get", "/coreos.com/network/config", "--print-value-only"]);
        assert!(stored.contains("198.19.0.0/16"), "config in etcd: {stored}");
        Some(cluster)
    }

    fn env_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("h{}.env", i + 1))
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("h{}.log", i + 1))
    }

    fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.log_path(i)).unwrap_or_default()
    }

    /// Starts `linen run` on host i against the etcd.
    fn start(&mut self, i: usize) {
        let mut cmd = self.lab.host(i).command(LINEN);
        cmd.args(["run", "--etcd-endpoints"])
            .arg(self.etcd.endpoint())
            .args(["--iface", "eth0", "--subnet-file"])
            .arg(self.env_path(i))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.log_path(i)).unwrap());
        self.pids[i] = Some(self.lab.spawn(cmd, "linen").unwrap());
    }

    fn running(&mut self, i: usize) -> bool {
        let pid = self.pids[i].expect("started");
        self.lab.is_running(pid)
    }

    /// Host i's overlay (TUN) address, once its subnet.env exists.
    fn addr(&self, i: usize) -> String {
        let path = self.env_path(i);
        let env = wait_for(Duration::from_secs(15), || {
            SubnetEnv::parse(&std::fs::read_to_string(&path).ok()?).ok()
        })
        .unwrap_or_else(|| panic!("host {} wrote no subnet.env; log:\n{}", i + 1, self.log(i)));
        let key = env.previous_key().expect("subnet.env names a subnet");
        key.ipv4().expect("an IPv4 network").network().to_string()
    }

    /// Whether host `from` gets an echo reply from `to` within `deadline`.
    fn reaches(&self, from: usize, to: &str, deadline: Duration) -> bool {
        wait_for(deadline, || {
            self.lab
                .host(from)
                .run("ping", &["-c1", "-W1", to])
                .ok()
                .filter(|o| o.status.success())
        })
        .is_some()
    }

    /// Asserts that every host in `from` reaches every host in `to` (other than itself).
    fn assert_reachable(&self, from: &[usize], to: &[usize], addrs: &[String], deadline: Duration) {
        for &a in from {
            for &b in to {
                if a != b {
                    assert!(
                        self.reaches(a, &addrs[b], deadline),
                        "host {} cannot ping host {} ({}); logs:\n{}\n---\n{}",
                        a + 1,
                        b + 1,
                        addrs[b],
                        self.log(a),
                        self.log(b)
                    );
                }
            }
        }
    }

    /// The subnet keys stored in etcd.
    fn subnet_keys(&self) -> Vec<String> {
        self.etcd
            .etcdctl(&[
                "get",
                "--prefix",
                "--keys-only",
                "/coreos.com/network/subnets/",
            ])
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

fn run(mut cmd: Command) -> std::process::Output {
    cmd.stdin(Stdio::null()).output().unwrap()
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// ping's summary line, e.g. "175 packets transmitted, 175 received, 0% packet loss, …".
fn ping_summary(path: &Path) -> String {
    let out = std::fs::read_to_string(path).unwrap_or_default();
    out.lines()
        .find(|l| l.contains("packets transmitted"))
        .map_or_else(|| format!("no summary in:\n{out}"), str::to_owned)
}

#[test]
fn mesh_survives_an_etcd_outage_and_a_later_host_joins() {
    if !is_root() {
        common::skipped("network-namespace tests need root");
        return;
    }
    let started = Instant::now();
    let Some(mut c) = Cluster::new("lnetcd", 4) else {
        return;
    };

    // Three hosts lease through etcd and reach each other.
    for i in 0..3 {
        c.start(i);
    }
    let mut addrs: Vec<String> = (0..3).map(|i| c.addr(i)).collect();
    assert_eq!(c.subnet_keys().len(), 3, "{:?}", c.subnet_keys());
    let first = [0, 1, 2];
    c.assert_reachable(&first, &first, &addrs, Duration::from_secs(10));

    // etcd goes away for 30 s while host 1 pings host 2: not one echo may be lost.
    let ping_log = c.dir.path().join("ping.log");
    let mut ping = c.lab.host(0).command("ping");
    ping.args(["-i", "0.2", "-W", "2", "-c", PING_COUNT, &addrs[1]])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&ping_log).unwrap())
        .stderr(Stdio::null());
    let ping = c.lab.spawn(ping, "ping").unwrap();
    let outage = Instant::now();
    c.etcd.stop();
    std::thread::sleep(OUTAGE);
    for i in 0..3 {
        assert!(
            c.running(i),
            "host {} died during the outage:\n{}",
            i + 1,
            c.log(i)
        );
    }
    c.etcd.start_again();
    eprintln!("etcd was down for {:?}", outage.elapsed());
    // Once etcd is back each daemon's watch resumes (its backoff is at most 8 s), lists again
    // and rebuilds its table: a second ping, 15 s from the restart on, crosses that too.
    let resync_log = c.dir.path().join("ping-resync.log");
    let mut resync = c.lab.host(0).command("ping");
    resync
        .args(["-i", "0.2", "-W", "2", "-c", "75", &addrs[1]])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&resync_log).unwrap())
        .stderr(Stdio::null());
    let resync = c.lab.spawn(resync, "ping").unwrap();
    let resumed = wait_for(Duration::from_secs(14), || {
        (0..3)
            .all(|i| c.log(i).contains("registry available again"))
            .then_some(())
    });
    assert!(
        resumed.is_some(),
        "not every daemon resumed within the second ping:\n{}\n{}\n{}",
        c.log(0),
        c.log(1),
        c.log(2)
    );
    for i in 0..3 {
        // A daemon says that its etcd connection is plain http (admin commands do not).
        assert!(c.log(i).contains("plain http"), "{}", c.log(i));
        assert!(
            c.log(i).contains("registry unavailable"),
            "host {} never noticed the outage:\n{}",
            i + 1,
            c.log(i)
        );
    }

    // A fourth host joins after the restart (while the ping finishes): it reaches everyone,
    // and everyone learns its lease through the resumed watch and reaches it.
    c.start(3);
    addrs.push(c.addr(3));
    let finished = wait_for(Duration::from_secs(20), || {
        (!c.lab.is_running(ping) && !c.lab.is_running(resync)).then_some(())
    });
    assert!(finished.is_some(), "the pings did not finish");
    let summary = ping_summary(&ping_log);
    assert!(
        summary.contains(&format!("{PING_COUNT} received")) && summary.contains(" 0% packet loss"),
        "echoes lost across the etcd outage: {summary}"
    );
    let summary = ping_summary(&resync_log);
    assert!(
        summary.contains("75 received") && summary.contains(" 0% packet loss"),
        "echoes lost while the daemons resynced: {summary}"
    );
    let all = [0, 1, 2, 3];
    c.assert_reachable(&[3], &first, &addrs, Duration::from_secs(10));
    c.assert_reachable(&first, &[3], &addrs, Duration::from_secs(10));
    assert_eq!(c.subnet_keys().len(), 4, "{:?}", c.subnet_keys());
    c.assert_reachable(&all, &all, &addrs, Duration::from_secs(5));
    eprintln!(
        "ping across the outage: {summary}; test took {:?}",
        started.elapsed()
    );
}
