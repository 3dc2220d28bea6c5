//! `linen run --ip-masq` in namespaces: two overlay hosts, and an "outside" host linked to host 1
//! only that has no route to the overlay. Traffic from host 1's overlay (a bridge address, as a
//! container would use) reaches the outside host only because host 1 masquerades it; traffic
//! between overlay addresses keeps its source. The rules come back when deleted and are gone
//! after SIGTERM. Host 2 also reports to a systemd-style `NOTIFY_SOCKET` (READY=1 after
//! subnet.env, STOPPING=1 on SIGTERM). Root only; skipped otherwise.
//!
//! Every daemon here runs with only what `dist/linen.service`'s sandboxing lines allow
//! ([`service_sandbox`]): its capability bounding set and no new privileges (through `setpriv`),
//! its read-only paths (through bind mounts). So these tests, which touch everything linen needs
//! from the host (TUN, routes, sysctls, iptables and ip6tables, the notify socket), show that
//! the unit leaves enough.

mod common;
use common::{Helper, LINEN, skip};

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use linen::lab::{Host, Lab, wait_for};
use linen::model::SubnetEnv;

/// Receives one UDP datagram on port 9000, answers it, prints the sender's address.
const SERVER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 9000)); s.settimeout(15); print("ready", flush=True)
d, a = s.recvfrom(100); s.sendto(d, a); print(a[0], flush=True)
"#;

/// Sends from source address argv[1] to argv[2]:9000 until answered (3 tries); prints
/// "reply" or "no reply".
const CLIENT: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0)); s.settimeout(1)
for _ in range(3):
    s.sendto(b"x", (sys.argv[2], 9000))
    try:
        s.recvfrom(100); print("reply"); break
    except socket.timeout:
        pass
else:
    print("no reply")
"#;

/// Sends a datagram from `src` on `from` to `dst` on `to`; returns whether it was answered and
/// the source address the receiver saw (when it got the datagram).
fn udp_exchange(from: &Host, src: &str, to: &Host, dst: &str) -> (bool, Option<String>) {
    let bind = if dst.contains(':') { "::" } else { "0.0.0.0" };
    let mut server = Helper::spawn(
        to.command("python3")
            .args(["-c", SERVER, bind])
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    );
    // Listening before the client sends: otherwise a datagram that no reply was ever possible
    // for would make the unmasqueraded checks pass for nothing.
    common::wait_ready(&mut server);
    let reply = from.run_ok("python3", &["-c", CLIENT, src, dst]).unwrap();
    let seen = if reply.trim() == "reply" {
        let out = server.wait_with_output();
        Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        // The server may still wait; stop it by PID (we started it).
        let _ = Command::new("kill")
            .args(["-TERM", &server.id().to_string()])
            .status();
        let out = server.wait_with_output();
        let s = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (!s.is_empty()).then_some(s)
    };
    (reply.trim() == "reply", seen)
}

fn nat_rules(h: &Host, program: &str) -> String {
    h.run_ok(program, &["-w", "5", "-t", "nat", "-S"]).unwrap()
}

/// Packets counted by the MASQUERADE rules of LINEN-POSTRTG.
fn masquerade_packets(h: &Host, program: &str) -> u64 {
    let out = h
        .run_ok(
            program,
            &[
                "-w",
                "5",
                "-t",
                "nat",
                "-L",
                "LINEN-POSTRTG",
                "-n",
                "-v",
                "-x",
            ],
        )
        .unwrap();
    out.lines()
        .filter(|l| l.contains("MASQUERADE"))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

fn chain_rule_count(h: &Host, program: &str) -> usize {
    nat_rules(h, program)
        .lines()
        .filter(|l| l.starts_with("-A LINEN-POSTRTG") && l.contains("linen masq"))
        .count()
}

fn has_jump(h: &Host, program: &str) -> bool {
    nat_rules(h, program)
        .lines()
        .any(|l| l.starts_with("-A POSTROUTING") && l.contains("-j LINEN-POSTRTG"))
}

fn start(
    lab: &mut Lab,
    i: usize,
    dir: &Path,
    notify: Option<&Path>,
    flags: &[&str],
) -> (u32, PathBuf, PathBuf) {
    let host = lab.host(i).clone();
    let env = dir.join(format!("h{}.env", i + 1));
    let log = dir.join(format!("h{}.log", i + 1));
    let mut cmd = host.command("unshare");
    cmd.args(service_sandbox())
        .args([LINEN, "run", "--iface", "eth0", "--registry-dir"])
        .arg(dir)
        .arg("--subnet-file")
        .arg(&env)
        .args(flags)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    if let Some(socket) = notify {
        cmd.env("NOTIFY_SOCKET", socket);
    }
    let pid = lab.spawn(cmd, "linen").unwrap();
    // The sandbox took hold (the wrappers exec, so the PID is linen's once it runs).
    let status = wait_for(Duration::from_secs(15), || {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        s.lines()
            .any(|l| l.starts_with("Name:") && l.contains("linen"))
            .then_some(s)
    })
    .unwrap_or_else(|| {
        panic!(
            "linen did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(field("NoNewPrivs:"), "1", "{status}");
    let bounding = u64::from_str_radix(&field("CapBnd:"), 16).unwrap();
    assert_eq!(bounding, unit_capabilities(), "{status}");
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_else(|e| {
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        panic!("linen exited in the sandbox ({e}); log:\n{log}")
    });
    assert!(
        mounts.lines().any(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            f.get(4) == Some(&"/etc") && f.get(5).is_some_and(|o| o.split(',').any(|o| o == "ro"))
        }),
        "/etc is not read-only for linen:\n{mounts}"
    );
    (pid, env, log)
}

/// [`start`] on a host whose daemon ran before, returned once it has written subnet.env
/// anew (its rules are in place by then): its pid and log.
fn restart(lab: &mut Lab, i: usize, dir: &Path, flags: &[&str]) -> (u32, PathBuf) {
    let _ = std::fs::remove_file(dir.join(format!("h{}.env", i + 1)));
    let (pid, env, log) = start(lab, i, dir, None, flags);
    assert!(
        wait_for(Duration::from_secs(15), || env.exists().then_some(())).is_some(),
        "host {} wrote no subnet.env after its restart: {}",
        i + 1,
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    (pid, log)
}

/// The unit file as systemd reads it (`systemd-analyze verify`, which needs no running
/// systemd): unknown keys, bad values and a missing binary are errors. Not root only.
#[test]
fn the_unit_file_is_valid() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        common::skipped("systemd-analyze is not installed (apt install systemd)");
        return;
    }
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/dist/linen.service"))
        .unwrap();
    assert!(
        unit.contains("ExecStart=/usr/local/bin/linen run"),
        "{unit}"
    );
    // The installed path, here the binary under test.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("linen.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/linen", LINEN)).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");
}

/// `dist/linen.service`'s `[Service]` lines.
fn unit_service_lines() -> Vec<(String, String)> {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/dist/linen.service"))
        .unwrap();
    let mut in_service = false;
    let mut lines = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service && !line.is_empty() && !line.starts_with('#') {
            let (k, v) = line.split_once('=').unwrap();
            lines.push((k.to_owned(), v.to_owned()));
        }
    }
    lines
}

/// The unit's capability bounding set as a mask (`CapBnd:` in /proc/PID/status).
fn unit_capabilities() -> u64 {
    let (_, caps) = unit_service_lines()
        .into_iter()
        .find(|(k, _)| k == "CapabilityBoundingSet")
        .expect("dist/linen.service sets no CapabilityBoundingSet");
    caps.split_whitespace()
        .map(|c| match c {
            "CAP_NET_BIND_SERVICE" => 1 << 10,
            "CAP_NET_ADMIN" => 1 << 12,
            "CAP_NET_RAW" => 1 << 13,
            other => panic!("add {other}'s bit here"),
        })
        .fold(0, |a, b| a | b)
}

/// Arguments for `unshare` that run the command after them as `dist/linen.service` would:
/// ProtectSystem's and ProtectHome's paths bind-mounted read-only in a mount namespace of its
/// own, then `setpriv` with NoNewPrivileges and the CapabilityBoundingSet. A sandboxing line
/// this cannot emulate fails the test: the unit gets no line that was not tried here.
fn service_sandbox() -> Vec<String> {
    /// Lines that restrict nothing, so need no emulation.
    const PLAIN: &[&str] = &[
        "Type",
        "EnvironmentFile",
        "ExecStart",
        "Restart",
        "RestartSec",
        "RestartPreventExitStatus",
        "TimeoutStartSec",
        "TimeoutStopSec",
        "StateDirectory",
        "RuntimeDirectory",
        "RuntimeDirectoryPreserve",
        "LimitNOFILE",
    ];
    let mut read_only: Vec<&str> = Vec::new();
    let mut setpriv = vec!["setpriv".to_owned()];
    for (key, value) in unit_service_lines() {
        match (key.as_str(), value.as_str()) {
            (k, _) if PLAIN.contains(&k) => {}
            ("NoNewPrivileges", "yes") => setpriv.push("--no-new-privs".into()),
            ("CapabilityBoundingSet", caps) => {
                let keep: Vec<String> = caps
                    .split_whitespace()
                    .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
                    .collect();
                setpriv.push(format!("--bounding-set=-all,{}", keep.join(",")));
            }
            ("ProtectSystem", "full") => read_only.extend(["/usr", "/boot", "/efi", "/etc"]),
            ("ProtectHome", "read-only") => read_only.extend(["/home", "/root", "/run/user"]),
            (k, v) => panic!(
                "dist/linen.service sets {k}={v}, which netns_masq does not emulate: \
                 emulate it in service_sandbox, or leave it out of the unit"
            ),
        }
    }
    let mut script = String::from("set -e\n");
    for path in read_only {
        script += &format!(
            "if [ -d {path} ]; then mount --bind {path} {path}; \
             mount -o remount,bind,ro {path}; fi\n"
        );
    }
    script += &format!("exec {} \"$@\"\n", setpriv.join(" "));
    vec!["-m".into(), "sh".into(), "-c".into(), script, "sh".into()]
}

fn read_env(env: &Path, log: &Path) -> SubnetEnv {
    wait_for(Duration::from_secs(15), || {
        SubnetEnv::parse(&std::fs::read_to_string(env).ok()?).ok()
    })
    .unwrap_or_else(|| {
        panic!(
            "no subnet.env; log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        )
    })
}

/// Gives `h` a bridge `cbr0` carrying the first address of its lease(s), as docker/CNI would.
fn bridge(h: &Host, env: &SubnetEnv) -> (String, String) {
    let (v4, v6) = (env.subnet.unwrap(), env.ipv6_subnet.unwrap());
    h.ip(&["link", "add", "cbr0", "type", "bridge"]).unwrap();
    h.ip(&["addr", "add", &v4.to_string(), "dev", "cbr0"])
        .unwrap();
    h.ip(&["-6", "addr", "add", &v6.to_string(), "dev", "cbr0", "nodad"])
        .unwrap();
    h.ip(&["link", "set", "cbr0", "up"]).unwrap();
    (v4.ip().to_string(), v6.ip().to_string())
}

#[test]
fn masquerade_to_outside_but_not_inside_the_overlay() {
    if skip() {
        return;
    }
    let mut lab = Lab::new("lnmasq", 2, 1500).unwrap();
    let outside = lab.add_outside(0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    common::network_init(dir.path());
    let (pid1, env1, log1) = start(
        &mut lab,
        0,
        dir.path(),
        None,
        &["--ip-masq", "--iptables-resync", "1"],
    );
    let (h1, h2) = (lab.host(0).clone(), lab.host(1).clone());
    // The rules are there (6 in each family's chain, plus the jump)...
    let rules_there = || {
        ["iptables", "ip6tables"]
            .iter()
            .all(|p| chain_rule_count(&h1, p) == 6 && has_jump(&h1, p))
            .then_some(())
    };
    // ... as soon as subnet.env exists: CNI starts workloads then, and a first flow that
    // left unmasqueraded would stay so in conntrack.
    assert!(
        wait_for(Duration::from_secs(15), || env1.exists().then_some(())).is_some(),
        "host 1 wrote no subnet.env: {}",
        std::fs::read_to_string(&log1).unwrap_or_default()
    );
    assert!(
        rules_there().is_some(),
        "subnet.env before the rules:\n{}\n{}",
        nat_rules(&h1, "iptables"),
        nat_rules(&h1, "ip6tables")
    );
    // Host 2 reports to a systemd-style notify socket: READY=1 only once subnet.env exists.
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let (pid2, env2, log2) = start(
        &mut lab,
        1,
        dir.path(),
        Some(&notify_path),
        &["--ip-masq", "--ip-masq-fully-random-disable"],
    );
    let mut buf = [0u8; 64];
    let n = notify.recv(&mut buf).expect("no READY=1 from linen run");
    assert_eq!(&buf[..n], b"READY=1");
    assert!(env2.exists(), "READY=1 before subnet.env was written");
    let (e1, e2) = (read_env(&env1, &log1), read_env(&env2, &log2));
    assert!(e1.ipmasq && e2.ipmasq, "FLANNEL_IPMASQ=true with --ip-masq");
    let v4_rules = nat_rules(&h1, "iptables");
    let n = "198.19.0.0/16";
    let l = e1.subnet.unwrap().network().to_string();
    for want in [
        "--mark 0x4000/0x4000".to_owned(),
        format!("-s {l}/24 -d {n}"),
        format!("-s {n} -d {l}/24"),
        format!("! -s {n} -d {l}/24"),
        format!("-s {n} ! -d 224.0.0.0/4"),
        format!("! -s {n} -d {n}"),
        "--random-fully".to_owned(),
    ] {
        assert!(v4_rules.contains(&want), "missing {want:?} in\n{v4_rules}");
    }
    let host2_rules = nat_rules(&h2, "iptables");
    assert!(
        host2_rules.contains("-j MASQUERADE") && !host2_rules.contains("--random-fully"),
        "--ip-masq-fully-random-disable:\n{host2_rules}"
    );

    let (b1, b1v6) = bridge(&h1, &e1);
    let (b2, _) = bridge(&h2, &e2);
    let tun2 = e2.subnet.unwrap().network().to_string();

    // Overlay → overlay, both directions: the receiver sees the overlay source.
    let wait_overlay = wait_for(Duration::from_secs(10), || {
        h1.run("ping", &["-c1", "-W1", "-I", &b1, &tun2])
            .ok()
            .filter(|o| o.status.success())
    });
    assert!(wait_overlay.is_some(), "overlay does not work");
    // What both daemons saw, for a failure that does not reproduce at will.
    let diagnose = || {
        let mut out = String::new();
        for (h, log) in [(&h1, &log1), (&h2, &log2)] {
            let status = h
                .run(LINEN, &["status"])
                .map(|o| o.stdout)
                .unwrap_or_default();
            out += &format!(
                "--- {}: linen status\n{}--- log\n{}\n",
                h.ns,
                String::from_utf8_lossy(&status),
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        out
    };
    let (answered, seen) = udp_exchange(&h1, &b1, &h2, &tun2);
    assert!(answered, "no answer h1 → h2\n{}", diagnose());
    assert_eq!(
        seen.as_deref(),
        Some(b1.as_str()),
        "h1 → h2 keeps its source"
    );
    let (answered, seen) = udp_exchange(&h2, &b2, &h1, &b1);
    assert!(answered, "no answer h2 → h1\n{}", diagnose());
    assert_eq!(
        seen.as_deref(),
        Some(b2.as_str()),
        "h2 → h1 keeps its source"
    );
    assert_eq!(
        masquerade_packets(&h1, "iptables"),
        0,
        "overlay traffic was masqueraded"
    );
    assert_eq!(
        masquerade_packets(&h2, "iptables"),
        0,
        "overlay traffic was masqueraded"
    );

    // Overlay → outside: answered only because host 1 rewrote the source to its own address
    // (the outside host has no route to the overlay).
    let (answered, seen) = udp_exchange(&h1, &b1, &outside, "198.18.1.2");
    assert!(answered, "no answer from outside through masquerade");
    assert_eq!(seen.as_deref(), Some("198.18.1.1"));
    assert!(masquerade_packets(&h1, "iptables") > 0);
    let (answered, seen) = udp_exchange(&h1, &b1v6, &outside, "fd00:18:1::2");
    assert!(answered, "no IPv6 answer from outside through masquerade");
    assert_eq!(seen.as_deref(), Some("fd00:18:1::1"));

    // Deleted rules come back within the resync period, `--iptables-resync 1` here. Twice: the
    // second deletion follows the first restore at once, so with the default 5 s the next check
    // would come too late.
    for round in 1..=2 {
        h1.run_ok("iptables", &["-t", "nat", "-D", "LINEN-POSTRTG", "2"])
            .unwrap();
        h1.run_ok(
            "iptables",
            &[
                "-t",
                "nat",
                "-D",
                "POSTROUTING",
                "-m",
                "comment",
                "--comment",
                "linen masq",
                "-j",
                "LINEN-POSTRTG",
            ],
        )
        .unwrap();
        // Restored, and noticed by the daemon (a check between the two deletions may have put
        // the first back already; it then re-adds the second at the next one).
        let readded = || {
            let log = std::fs::read_to_string(&log1).unwrap_or_default();
            log.matches("iptables rules were missing; re-added").count()
        };
        assert!(
            wait_for(Duration::from_secs(10), || {
                (rules_there().is_some() && readded() >= round).then_some(())
            })
            .is_some(),
            "round {round}: rules not restored:\n{}",
            nat_rules(&h1, "iptables")
        );
    }

    // SIGTERM exits 0 and leaves the rules, as flanneld does: the host's containers keep
    // reaching the outside while linen is down (a restart, an upgrade).
    let status = lab.stop(pid1, Duration::from_secs(10));
    let log = std::fs::read_to_string(&log1).unwrap_or_default();
    assert!(status.is_some_and(|s| s.success()), "{log}");
    assert!(log.contains("iptables rules left in place"), "{log}");
    assert!(
        rules_there().is_some(),
        "rules gone after a stop:\n{}\n{}",
        nat_rules(&h1, "iptables"),
        nat_rules(&h1, "ip6tables")
    );
    let (answered, seen) = udp_exchange(&h1, &b1, &outside, "198.18.1.2");
    assert!(answered, "no answer from outside while linen is stopped");
    assert_eq!(seen.as_deref(), Some("198.18.1.1"));
    let status = lab.stop(pid2, Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()));
    let n = notify.recv(&mut buf).expect("no STOPPING=1 from linen run");
    assert_eq!(&buf[..n], b"STOPPING=1");

    // The next start takes them over as they are: one jump per family, the same six rules,
    // not rebuilt (a flush would have reset the MASQUERADE rules' packet counts).
    let counted = masquerade_packets(&h1, "iptables");
    assert!(counted > 0);
    let (pid1, log1) = restart(&mut lab, 0, dir.path(), &["--ip-masq"]);
    assert!(masquerade_packets(&h1, "iptables") >= counted);
    for p in ["iptables", "ip6tables"] {
        let rules = nat_rules(&h1, p);
        assert_eq!(chain_rule_count(&h1, p), 6, "{p}:\n{rules}");
        let jumps = rules
            .lines()
            .filter(|l| l.contains("-j LINEN-POSTRTG"))
            .count();
        assert_eq!(jumps, 1, "{p}:\n{rules}");
    }
    let status = lab.stop(pid1, Duration::from_secs(10));
    let log = std::fs::read_to_string(&log1).unwrap_or_default();
    assert!(status.is_some_and(|s| s.success()), "{log}");

    // A start without --ip-masq (and without the FORWARD rules) removes what the others left.
    let (pid1, _) = restart(&mut lab, 0, dir.path(), &["--iptables-forward-rules=false"]);
    for p in ["iptables", "ip6tables"] {
        let rules = nat_rules(&h1, p);
        assert!(
            !rules.contains("LINEN"),
            "{p} still has linen rules:\n{rules}"
        );
        let rules = filter_rules(&h1, p);
        assert!(
            !rules.contains("LINEN"),
            "{p} still has linen rules:\n{rules}"
        );
    }
    let status = lab.stop(pid1, Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()));

    // Without masquerade the outside host cannot answer: the test above could fail.
    let (answered, _) = udp_exchange(&h1, &b1, &outside, "198.18.1.2");
    assert!(
        !answered,
        "outside answered an unmasqueraded overlay source"
    );
}

fn filter_rules(h: &Host, program: &str) -> String {
    h.run_ok(program, &["-w", "5", "-t", "filter", "-S"])
        .unwrap()
}

/// Whether `program` holds linen's two FORWARD accept rules for the network and the jump (false
/// while iptables fails, e.g. on its lock).
fn forward_rules_there(h: &Host, program: &str) -> bool {
    let Ok(rules) = h.run_ok(program, &["-w", "5", "-t", "filter", "-S"]) else {
        return false;
    };
    let accepts = rules
        .lines()
        .filter(|l| {
            l.starts_with("-A LINEN-FWD") && l.contains("linen forward") && l.ends_with("-j ACCEPT")
        })
        .count();
    accepts == 2
        && rules
            .lines()
            .any(|l| l.starts_with("-A FORWARD") && l.contains("-j LINEN-FWD"))
}

/// A host whose FORWARD policy is DROP (as Docker leaves it) forwards between a container and
/// the overlay only thanks to linen's FORWARD accept rules, which are on by default (flannel's
/// `-iptables-forward-rules`), left in place by SIGTERM, and removed by a start with `=false`.
#[test]
fn forward_rules_let_a_container_reach_the_overlay_under_a_drop_policy() {
    if skip() {
        return;
    }
    let mut lab = Lab::new("lnfwd", 2, 1500).unwrap();
    // The "container": a namespace behind host 1's `out0`, addressed from host 1's lease below.
    let container = lab.add_outside(0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    common::network_init(dir.path());
    let (h1, h2) = (lab.host(0).clone(), lab.host(1).clone());
    h1.run_ok("sysctl", &["-qw", "net.ipv4.ip_forward=1"])
        .unwrap();
    h1.run_ok("iptables", &["-w", "5", "-P", "FORWARD", "DROP"])
        .unwrap();
    let (pid1, env1, log1) = start(&mut lab, 0, dir.path(), None, &[]);
    let (pid2, env2, log2) = start(&mut lab, 1, dir.path(), None, &[]);
    let (e1, e2) = (read_env(&env1, &log1), read_env(&env2, &log2));
    let there = || {
        ["iptables", "ip6tables"]
            .iter()
            .all(|p| forward_rules_there(&h1, p))
            .then_some(())
    };
    assert!(
        wait_for(Duration::from_secs(20), there).is_some(),
        "{}\n{}",
        filter_rules(&h1, "iptables"),
        std::fs::read_to_string(&log1).unwrap_or_default()
    );
    assert!(filter_rules(&h1, "iptables").contains("-s 198.19.0.0/16 -m comment"));

    // The container's gateway is host 1's `out0`, with the lease's first address; the peer
    // answers from its bridge address.
    let gateway = e1.subnet.unwrap();
    let net = gateway.network().octets();
    let inside = format!("{}.{}.{}.5", net[0], net[1], net[2]);
    h1.ip(&["addr", "add", &gateway.to_string(), "dev", "out0"])
        .unwrap();
    container
        .ip(&["addr", "add", &format!("{inside}/24"), "dev", "eth0"])
        .unwrap();
    container
        .ip(&[
            "route",
            "add",
            "198.19.0.0/16",
            "via",
            &gateway.ip().to_string(),
        ])
        .unwrap();
    let (b2, _) = bridge(&h2, &e2);
    let ping = || {
        container
            .run("ping", &["-c1", "-W1", &b2])
            .is_ok_and(|o| o.status.success())
    };
    assert!(
        wait_for(Duration::from_secs(10), || ping().then_some(())).is_some(),
        "the container cannot reach the overlay through host 1\n{}",
        filter_rules(&h1, "iptables")
    );

    // SIGTERM leaves the chain and the jump, in both families, for the next start.
    let status = lab.stop(pid1, Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "{}",
        std::fs::read_to_string(&log1).unwrap_or_default()
    );
    assert!(
        there().is_some(),
        "FORWARD rules gone after a stop:\n{}",
        filter_rules(&h1, "iptables")
    );

    // A start with `=false` removes what the stopped daemon left, or it would still accept:
    // the policy then drops the container's traffic, while host 1 itself (its own traffic does
    // not cross FORWARD) still reaches the peer, so the test above could fail.
    let (pid1, _, log1) = start(
        &mut lab,
        0,
        dir.path(),
        None,
        &["--iptables-forward-rules=false"],
    );
    let own = wait_for(Duration::from_secs(10), || {
        h1.run(
            "ping",
            &["-c1", "-W1", "-I", &gateway.ip().to_string(), &b2],
        )
        .ok()
        .filter(|o| o.status.success())
    });
    assert!(
        own.is_some(),
        "{}",
        std::fs::read_to_string(&log1).unwrap_or_default()
    );
    assert!(!filter_rules(&h1, "iptables").contains("LINEN"));
    assert!(
        !ping(),
        "the container got through a DROP policy without the rules"
    );
    for pid in [pid1, pid2] {
        assert!(
            lab.stop(pid, Duration::from_secs(10))
                .is_some_and(|s| s.success())
        );
    }
}
