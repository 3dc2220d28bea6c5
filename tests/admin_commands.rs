//! `linen network init` and `linen lease reserve/release` against a directory registry: what
//! they refuse to overwrite, what they accept again, and that they say when nothing happened.
//! No root needed.

mod common;
use common::LINEN;

use std::path::Path;
use std::process::Command;

/// Runs linen with `args` on the registry in `dir`; returns (exit code, stdout + stderr).
fn linen(dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(LINEN)
        .args(args)
        .arg("--registry-dir")
        .arg(dir)
        .output()
        .unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Writes a live lease of the host at `ip` for `key` as its daemon would: the value, then an
/// expiry an hour away. Returns the file.
fn write_live_lease(dir: &Path, key: &str, ip: &str) -> std::path::PathBuf {
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let file = dir.join("subnets").join(key);
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(
        &file,
        format!("{{\"PublicIP\":\"{ip}\"}}\nexpires={expires}\n"),
    )
    .unwrap();
    file
}

/// The subnets `lease list --json` shows.
fn subnets(dir: &Path) -> Vec<String> {
    let (code, out) = linen(dir, &["lease", "list", "--json"]);
    assert_eq!(code, Some(0), "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    v["leases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["subnet"].as_str().unwrap().to_owned())
        .collect()
}

/// A config linen cannot use (a flannel cluster's vxlan backend under the same prefix) is not
/// overwritten without --force.
#[test]
fn init_keeps_a_foreign_config_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config");
    let vxlan = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#;
    std::fs::write(&config, vxlan).unwrap();
    let init = ["network", "init", "--network", "198.19.0.0/16"];
    let (code, out) = linen(dir.path(), &init);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("cannot use") && out.contains("--force"),
        "{out}"
    );
    assert_eq!(std::fs::read_to_string(&config).unwrap(), vxlan);
    let (code, out) = linen(dir.path(), &[&init[..], &["--force"]].concat());
    assert_eq!(code, Some(0), "{out}");
    assert!(
        std::fs::read_to_string(&config)
            .unwrap()
            .contains("198.19.0.0/16")
    );
}

/// Running init again with the same flags is a no-op that succeeds (provisioning scripts run it
/// on every boot); other flags are refused without --force.
#[test]
fn init_again_with_the_same_flags_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let init = ["network", "init", "--network", "198.19.0.0/16"];
    let (code, out) = linen(dir.path(), &init);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = linen(dir.path(), &init);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("already set"), "{out}");
    // The defaults spelled out are the same network too.
    let (code, out) = linen(dir.path(), &[&init[..], &["--subnet-len", "24"]].concat());
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = linen(dir.path(), &[&init[..], &["--subnet-len", "26"]].concat());
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("different network config"), "{out}");
}

/// On a dual-stack network a reservation needs both families (a host deletes a key without
/// them); a release finds the dual-stack key from either subnet, and says when there is none.
#[test]
fn reservations_fit_the_network_and_releases_say_what_they_removed() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out) = linen(
        dir.path(),
        &[
            "network",
            "init",
            "--network",
            "198.19.0.0/16",
            "--ipv6-network",
            "fd00:19::/48",
        ],
    );
    assert_eq!(code, Some(0), "{out}");
    let reserve = |key: &str| {
        linen(
            dir.path(),
            &["lease", "reserve", key, "--public-ip", "198.18.0.9"],
        )
    };
    let (code, out) = reserve("198.19.5.0/24");
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("IPv6") && out.contains("dual-stack"), "{out}");
    // Host bits are a mistake in either form, not a subnet to round down to.
    for key in [
        "198.19.5.7/24",
        "fd00:19:0:5::1/64",
        "198.19.5.7-24&fd00:19:0:5::-64",
    ] {
        let (code, out) = reserve(key);
        assert_eq!(code, Some(2), "{key}: {out}");
        assert!(out.contains("host bits"), "{key}: {out}");
    }
    let (code, out) = reserve("198.19.5.7/24");
    assert!(out.contains("198.19.5.0/24"), "{code:?} {out}");
    assert!(subnets(dir.path()).is_empty());
    let both = "198.19.5.0-24&fd00:19:0:5::-64";
    let (code, out) = reserve(both);
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("IPv6-only"), "{out}");
    assert_eq!(subnets(dir.path()), [both]);
    // By an IPv6 address, the reservation is taken only by a host without IPv4: it goes in,
    // with a warning that says so.
    let v6 = "198.19.7.0-24&fd00:19:0:7::-64";
    let (code, out) = linen(
        dir.path(),
        &["lease", "reserve", v6, "--public-ip", "fd00:18::9"],
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("IPv6-only") && out.contains("fd00:18::9"),
        "{out}"
    );
    let (code, out) = linen(dir.path(), &["lease", "release", v6]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(subnets(dir.path()), [both]);
    // A key sharing its IPv4 subnet would give that subnet to two hosts.
    let (code, out) = reserve("198.19.5.0-24&fd00:19:0:6::-64");
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("overlaps 198.19.5.0-24&fd00:19:0:5::-64"),
        "{out}"
    );
    assert_eq!(subnets(dir.path()), [both]);

    let (code, out) = linen(dir.path(), &["lease", "release", "198.19.5.1/24"]);
    assert_eq!(code, Some(2), "{out}");
    assert_eq!(subnets(dir.path()), [both], "{out}");
    let (code, out) = linen(dir.path(), &["lease", "release", "198.19.6.0/24"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("no live lease or reservation"), "{out}");
    assert!(
        !out.contains("has been removed"),
        "only part of a key: {out}"
    );
    // A full key linen does not list (an unreadable value) is removed all the same.
    let broken = dir
        .path()
        .join("subnets")
        .join("198.19.8.0-24&fd00:19:0:8::-64");
    std::fs::write(&broken, "not json\n").unwrap();
    let (code, out) = linen(
        dir.path(),
        &["lease", "release", "198.19.8.0-24&fd00:19:0:8::-64"],
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("has been removed"), "{out}");
    assert!(!broken.exists());
    // Named in full but never stored: nothing is said to be removed.
    let (code, out) = linen(
        dir.path(),
        &["lease", "release", "198.19.8.0-24&fd00:19:0:8::-64"],
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("no live lease") && !out.contains("removed"),
        "{out}"
    );
    // Two stored keys sharing the subnet asked for (written by others): name one.
    let twin = dir
        .path()
        .join("subnets")
        .join("198.19.5.0-24&fd00:19:0:7::-64");
    std::fs::write(&twin, "{\"PublicIP\":\"198.18.0.10\"}\n").unwrap();
    let (code, out) = linen(dir.path(), &["lease", "release", "198.19.5.0/24"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("several keys"), "{out}");
    // Named in full, the exact key is the one released.
    let (code, out) = linen(
        dir.path(),
        &["lease", "release", "198.19.5.0-24&fd00:19:0:7::-64"],
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(!twin.exists() && subnets(dir.path()) == [both], "{out}");
    let (code, out) = linen(dir.path(), &["lease", "release", "198.19.5.0/24"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(both), "{out}");
    // A host holding the reservation takes the subnet again, as a lease: said too.
    assert!(
        out.contains("was a reservation for") && out.contains("as an ordinary lease"),
        "{out}"
    );
    assert!(subnets(dir.path()).is_empty());
    // A live lease's holder takes it again at once: the release says so.
    write_live_lease(dir.path(), both, "198.18.0.9");
    let (code, out) = linen(dir.path(), &["lease", "release", both]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("was a lease of 198.18.0.9") && out.contains("takes it again"),
        "{out}"
    );
}

/// A reservation only a host of this network could take: subnets of the families the network
/// has, and on an IPv6-only network an IPv6 public IP (the hosts' identity there).
#[test]
fn reservations_name_a_family_the_network_has() {
    let v4 = tempfile::tempdir().unwrap();
    let (code, out) = linen(
        v4.path(),
        &["network", "init", "--network", "198.19.0.0/16"],
    );
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = linen(
        v4.path(),
        &[
            "lease",
            "reserve",
            "fd00:19:0:5::/64",
            "--public-ip",
            "198.18.0.9",
        ],
    );
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("has no IPv6 network"), "{out}");
    assert!(subnets(v4.path()).is_empty());

    let v6 = tempfile::tempdir().unwrap();
    let (code, out) = linen(
        v6.path(),
        &[
            "network",
            "init",
            "--no-ipv4",
            "--ipv6-network",
            "fd00:19::/48",
        ],
    );
    assert_eq!(code, Some(0), "{out}");
    let reserve =
        |key: &str, ip: &str| linen(v6.path(), &["lease", "reserve", key, "--public-ip", ip]);
    let (code, out) = reserve("198.19.5.0/24", "fd00::9");
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("has no IPv4 network"), "{out}");
    let (code, out) = reserve("fd00:19:0:5::/64", "198.18.0.9");
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("IPv6-only"), "{out}");
    assert!(subnets(v6.path()).is_empty());
    let (code, out) = reserve("fd00:19:0:5::/64", "fd00::9");
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(subnets(v6.path()), ["0.0.0.0-0&fd00:19:0:5::-64"]);
}

/// `lease reserve` for a host that holds another lease says that the host moves when it next
/// acquires, not at once.
#[test]
fn reserving_for_a_host_with_a_lease_says_when_it_moves() {
    let dir = tempfile::tempdir().unwrap();
    common::admin(
        dir.path(),
        &["network", "init", "--network", "198.19.0.0/16"],
    );
    write_live_lease(dir.path(), "198.19.33.0-24", "198.18.9.2");
    let reserve = |ip: &str| {
        linen(
            dir.path(),
            &["lease", "reserve", "198.19.40.0/24", "--public-ip", ip],
        )
    };
    let (code, out) = reserve("198.18.9.2");
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("198.18.9.2 holds the lease 198.19.33.0-24 now"),
        "{out}"
    );
    // Nothing to say for a host without a lease.
    let (code, out) = linen(dir.path(), &["lease", "release", "198.19.40.0/24"]);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = reserve("198.18.9.3");
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("holds the lease"), "{out}");
}

/// `lease reserve` of the subnet a host holds turns its lease into a reservation in place (as
/// flannel documents it); another host's lease is refused and left alone.
#[test]
fn a_held_lease_is_kept_as_a_reservation() {
    let dir = tempfile::tempdir().unwrap();
    common::admin(
        dir.path(),
        &["network", "init", "--network", "198.19.0.0/16"],
    );
    write_live_lease(dir.path(), "198.19.5.0-24", "198.18.0.9");
    let reserve = |ip: &str| {
        linen(
            dir.path(),
            &["lease", "reserve", "198.19.5.0/24", "--public-ip", ip],
        )
    };
    let (code, out) = reserve("198.18.0.77");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("another host (198.18.0.9)"), "{out}");
    let (code, out) = reserve("198.18.0.9");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("now a reservation"), "{out}");
    let (code, out) = linen(dir.path(), &["lease", "list", "--json"]);
    assert_eq!(code, Some(0), "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["leases"][0]["reservation"], true, "{out}");
    assert_eq!(v["leases"][0]["value"]["PublicIP"], "198.18.0.9", "{out}");
    let (code, out) = reserve("198.18.0.9");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("already reserved"), "{out}");
}

/// `lease list` on a registry without a network config (a mistyped `--registry-dir`), or with
/// one linen cannot use, still lists but warns; with a usable config it warns only of keys the
/// network would not lease.
#[test]
fn listing_a_registry_without_a_network_warns() {
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("no-such-registry");
    let (code, out) = linen(&typo, &["lease", "list"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("0 leases"), "{out}");
    assert!(
        out.contains("no network uses this registry") && out.contains("network config not found"),
        "{out}"
    );
    common::admin(
        dir.path(),
        &["network", "init", "--network", "198.19.0.0/16"],
    );
    let (code, out) = linen(dir.path(), &["lease", "list"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("WARN"), "{out}");
    // Keys this network would not lease (outside it, another length) are listed and flagged;
    // a leasable one is not.
    let subnets = dir.path().join("subnets");
    std::fs::create_dir_all(&subnets).unwrap();
    for key in ["10.0.0.0-24", "198.19.24.0-25", "198.19.25.0-24"] {
        std::fs::write(subnets.join(key), "{\"PublicIP\":\"198.18.0.9\"}\n").unwrap();
    }
    // And one whose public address no peer can reach (written by hand: reserve refuses it).
    std::fs::write(
        subnets.join("198.19.26.0-24"),
        "{\"PublicIP\":\"127.0.0.1\"}\n",
    )
    .unwrap();
    let (code, out) = linen(dir.path(), &["lease", "list"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("4 leases"), "{out}");
    assert!(
        out.contains("its public address 127.0.0.1 is a loopback address"),
        "{out}"
    );
    let flagged: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("not a subnet this network leases"))
        .collect();
    assert_eq!(flagged.len(), 2, "{out}");
    assert!(flagged.iter().any(|l| l.contains("10.0.0.0-24")), "{out}");
    assert!(
        flagged.iter().any(|l| l.contains("198.19.24.0-25")),
        "{out}"
    );
    // A config linen cannot use (a flannel vxlan network) is named too.
    std::fs::write(
        dir.path().join("config"),
        r#"{"Network":"198.19.0.0/16","Backend":{"Type":"vxlan"}}"#,
    )
    .unwrap();
    let (code, out) = linen(dir.path(), &["lease", "list"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("linen cannot lease from this registry") && out.contains("vxlan"),
        "{out}"
    );
}

/// `network show` says when an IPv6 network is written but not enabled (flannel then leaves
/// IPv6 off, and so does linen).
#[test]
fn show_names_an_ipv6_network_that_is_not_enabled() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config");
    std::fs::write(
        &config,
        r#"{"Network":"198.19.0.0/16","IPv6Network":"fd00:19::/48"}"#,
    )
    .unwrap();
    let (code, out) = linen(dir.path(), &["network", "show"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("ipv6 network  none (fd00:19::/48 is set, but EnableIPv6 is not true)"),
        "{out}"
    );
    std::fs::write(
        &config,
        r#"{"Network":"198.19.0.0/16","IPv6Network":"fd00:19::/48","EnableIPv6":true}"#,
    )
    .unwrap();
    let (code, out) = linen(dir.path(), &["network", "show"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("ipv6 network  fd00:19::/48\n"), "{out}");
}

/// Eight `network init` at once with different configs: exactly one writes, the others see
/// its config and refuse, and the stored config is the winner's.
#[test]
fn concurrent_inits_leave_one_winner() {
    let dir = tempfile::tempdir().unwrap();
    let children: Vec<_> = (20..28)
        .map(|len| {
            let child = Command::new(LINEN)
                .args([
                    "network",
                    "init",
                    "--network",
                    "198.19.0.0/16",
                    "--subnet-len",
                ])
                .arg(len.to_string())
                .arg("--registry-dir")
                .arg(dir.path())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            (len, common::Helper::from(child))
        })
        .collect();
    let mut winners = Vec::new();
    for (len, child) in children {
        let out = child.wait_with_output();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        match out.status.code() {
            Some(0) => winners.push(len),
            Some(1) => assert!(text.contains("different network config"), "{text}"),
            other => panic!("exit {other:?}: {text}"),
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    let stored = std::fs::read_to_string(dir.path().join("config")).unwrap();
    assert!(
        stored.contains(&format!("\"SubnetLen\":{}", winners[0])),
        "{stored}"
    );
}

/// One lease file this user cannot read (another user's, mode 0600; the service runs as root
/// without `CAP_DAC_OVERRIDE`) is skipped with a warning naming it, like a corrupt one: it used
/// to fail every list, on every host. As root, the listing runs as `nobody` (through
/// `setpriv`), which owns the directory but not that file.
#[test]
fn an_unreadable_lease_file_is_skipped_not_fatal() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (code, out) = linen(
        dir.path(),
        &["network", "init", "--network", "198.19.0.0/16"],
    );
    assert_eq!(code, Some(0), "{out}");
    write_live_lease(dir.path(), "198.19.1.0-24", "198.18.0.1");
    let hidden = write_live_lease(dir.path(), "198.19.2.0-24", "198.18.0.2");
    std::fs::set_permissions(&hidden, std::fs::Permissions::from_mode(0o000)).unwrap();
    let root = linen::lab::is_root();
    // The binary, where nobody reaches it (a checkout under /root, mode 0700, is out of its
    // reach): linked, or copied across file systems, into a directory of its own, left root's.
    let bin_dir = tempfile::tempdir().unwrap();
    let bin = bin_dir.path().join("linen");
    if root {
        std::fs::set_permissions(bin_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::hard_link(LINEN, &bin)
            .or_else(|_| std::fs::copy(LINEN, &bin).map(drop))
            .unwrap();
        // Everything nobody's but the hidden file, which stays root's.
        let chown = Command::new("chown")
            .args(["-R", "65534"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(chown.success());
        std::os::unix::fs::chown(&hidden, Some(0), None).unwrap();
    }
    let mut cmd = if root {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&bin);
        c
    } else {
        Command::new(LINEN)
    };
    let out = cmd
        .args(["lease", "list", "--json", "--registry-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let listed: Vec<&str> = v["leases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["subnet"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["198.19.1.0-24"], "{stderr}");
    assert!(
        stderr.contains("198.19.2.0-24") && stderr.contains("chmod a+r"),
        "{stderr}"
    );
}
