//! The lab itself: namespaces, veth, a bridge, cleanup. Root only.

mod common;
use common::skip;

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
                assert!(lab.switch_host().is_ok(), "a second call changes nothing");
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
