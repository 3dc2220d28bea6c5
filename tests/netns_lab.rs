//! The lab itself: namespaces, veth, a bridge, cleanup. Root only.

mod common;
use common::skip;

use std::time::Duration;

use linen::lab::Lab;

fn namespaces() -> String {
    String::from_utf8(
        std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
}

#[test]
fn two_and_three_hosts_reach_each_other_and_vanish_on_drop() {
    if skip() {
        return;
    }
    for n in [2u8, 3] {
        let prefix;
        {
            let lab = Lab::new("lnlab", n, 1500).unwrap();
            prefix = lab.prefix().to_owned();
            assert_eq!(
                namespaces().matches(&prefix).count(),
                n as usize + usize::from(n > 2)
            );
            for a in lab.hosts() {
                for b in lab.hosts() {
                    if a.index != b.index {
                        a.run_ok("ping", &["-c1", "-W2", &b.ip.to_string()])
                            .unwrap();
                        a.run_ok("ping", &["-6", "-c1", "-W2", &b.ip6.to_string()])
                            .unwrap();
                    }
                }
            }
            // The switch namespace joins the underlay as one more host, when there is one.
            let switch = lab.switch_host().unwrap();
            assert_eq!(switch.is_some(), n > 2);
            if let Some(sw) = switch {
                for a in lab.hosts() {
                    a.run_ok("ping", &["-c1", "-W2", &sw.ip.to_string()])
                        .unwrap();
                }
                sw.run_ok("ping", &["-6", "-c1", "-W2", &lab.host(0).ip6.to_string()])
                    .unwrap();
                // A second call changes nothing: the same host, br0 with the same addresses
                // (one of each family; the link-local one, which comes when it comes, left
                // out), still reachable.
                let addresses = |h: &linen::lab::Host| {
                    let mut v: Vec<String> = h
                        .ip(&["-o", "addr", "show", "dev", "br0"])
                        .unwrap()
                        .lines()
                        .map(|l| l.split_whitespace().nth(3).unwrap_or("").to_owned())
                        .filter(|a| !a.starts_with("fe80:"))
                        .collect();
                    v.sort();
                    v
                };
                let before = addresses(&sw);
                assert_eq!(before.len(), 2, "{before:?}");
                let again = lab.switch_host().unwrap().expect("still a switch");
                assert_eq!(
                    (&again.ns, again.ip, again.ip6, again.index),
                    (&sw.ns, sw.ip, sw.ip6, sw.index)
                );
                assert_eq!(addresses(&again), before);
                lab.host(0)
                    .run_ok("ping", &["-c1", "-W2", &again.ip.to_string()])
                    .unwrap();
            }
            // No default route: an address outside the lab is unreachable.
            let out = lab
                .host(0)
                .run("ping", &["-c1", "-W1", "198.18.1.1"])
                .unwrap();
            assert!(!out.status.success());
        }
        assert_eq!(
            namespaces().matches(&prefix).count(),
            0,
            "namespaces left behind"
        );
    }
}

/// The state letter of process `pid` from /proc ("Z" for a zombie), or None when it is gone.
fn state(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .next()?
            .to_owned(),
    )
}

/// `linen bench` and `linen demo` are built to abort on a panic, which drops nothing: their lab
/// asks a panic hook to remove it. Here a thread panics while two labs live; the hook runs
/// before the unwinding, so what it removed is gone while both labs still exist, and only the
/// lab that asked lost anything. (The hook stays installed for this binary's other tests, whose
/// labs do not ask: a failing one removes this test's lab, and fails this test too.)
#[test]
fn a_panic_removes_the_labs_that_asked_and_no_other() {
    if skip() {
        return;
    }
    let mut asked = Lab::new("lnpanic", 2, 1500).unwrap();
    let other = Lab::new("lnkeep", 2, 1500).unwrap();
    asked.remove_on_panic();
    // What the lab gains after asking is removed too.
    asked.add_outside(0).unwrap();
    let sleep = |lab: &Lab| {
        let mut c = lab.host(1).command("sleep");
        c.arg("60");
        c
    };
    let pid = asked.spawn(sleep(&asked), "sleep").unwrap();
    let stopped = asked.spawn(sleep(&asked), "stopped").unwrap();
    let dir = asked.scratch_dir().unwrap();
    assert!(asked.is_running(pid) && asked.is_running(stopped));
    assert!(asked.stop(stopped, Duration::from_secs(5)).is_some());
    assert!(!asked.is_running(stopped));
    assert_eq!(namespaces().matches(asked.prefix()).count(), 3);

    let panicked = std::thread::spawn(|| panic!("a panic on purpose")).join();
    assert!(panicked.is_err());

    assert_eq!(
        namespaces().matches(asked.prefix()).count(),
        0,
        "the lab that asked keeps namespaces"
    );
    // Stopped but not reaped (the lab reaps it when dropped): a zombie.
    assert_eq!(state(pid).as_deref(), Some("Z"), "its process still runs");
    assert!(!asked.is_running(pid));
    assert!(
        dir.exists(),
        "its files (the daemons' logs) are kept for a look"
    );
    // A lab removed after a panic starts nothing more.
    assert!(asked.spawn(sleep(&asked), "late").is_err());
    assert_eq!(
        namespaces().matches(other.prefix()).count(),
        2,
        "the other lab lost namespaces"
    );
    other
        .host(0)
        .run_ok("ping", &["-c1", "-W2", &other.host(1).ip.to_string()])
        .unwrap();
    // Dropping a lab the hook removed reaps its children and removes its files, and fails on
    // nothing.
    drop(asked);
    // Reaped: gone (or, rarely, the PID already another process's, which is no zombie).
    assert_ne!(
        state(pid).as_deref(),
        Some("Z"),
        "the drop did not reap its child"
    );
    assert!(!dir.exists());
    let prefix = other.prefix().to_owned();
    drop(other);
    assert_eq!(namespaces().matches(&prefix).count(), 0);
}
