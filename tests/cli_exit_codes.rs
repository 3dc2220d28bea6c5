//! Exit codes and logging flags of the binary: bad flags and invalid configs exit 2 with a
//! message that names what to fix. No root needed. Nothing here touches this host's network: as
//! root, the one test that starts `linen run` far enough runs it in a throwaway namespace.

mod common;
use common::Helper;

use std::process::{Command, Stdio};
use std::time::Duration;

const LINEN: &str = env!("CARGO_BIN_EXE_linen");

/// Runs linen with `args`; returns (exit code, stderr). A mistake the daemon does not catch
/// (it would wait or retry for ever) fails the test with 124 instead of hanging it.
fn linen(args: &[&str]) -> (Option<i32>, String) {
    let scratch = tempfile::tempdir().unwrap();
    let out = common::linen_meant_to_fail(scratch.path())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A directory registry with a network config (198.19.0.0/16).
fn registry_with_a_network() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let (code, stderr) = linen(&[
        "network",
        "init",
        "--registry-dir",
        dir.path().to_str().unwrap(),
        "--network",
        "198.19.0.0/16",
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    dir
}

fn assert_usage(args: &[&str], mentions: &[&str]) {
    let (code, stderr) = linen(args);
    assert_eq!(
        code,
        Some(2),
        "linen {args:?} should exit 2; stderr:\n{stderr}"
    );
    for m in mentions {
        assert!(
            stderr.contains(m),
            "linen {args:?}: stderr should mention {m:?}:\n{stderr}"
        );
    }
}

#[test]
fn bad_flags_exit_2_and_say_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let reg = dir.path().to_str().unwrap();
    let init = format!("network init --registry-dir {reg}");
    let run = format!("run --metrics-addr off --registry-dir {reg}");
    // (arguments, what stderr must mention)
    let cases: Vec<(String, &[&str])> = vec![
        ("run --no-such-flag".into(), &["--no-such-flag"]),
        // flanneld flags linen does not have are named as flanneld users wrote them.
        (
            "run -ip-blackhole-route".into(),
            &["'--ip-blackhole-route'"],
        ),
        ("run --mtu 10".into(), &["--mtu", "576"]),
        // flannel's device name template would be numbered by the kernel.
        ("run --tun flannel%d".into(), &["--tun", "flannel0"]),
        (
            "run --udp-gso maybe".into(),
            &["--udp-gso", "auto, on, off"],
        ),
        (
            format!("{run} --no-offload --udp-gso on"),
            &["--udp-gso on", "--no-offload"],
        ),
        (
            format!("{run} --no-offload --udp-gro on"),
            &["--udp-gro on", "--no-offload"],
        ),
        (
            format!("{run} --socket-buffer 8388608 --socket-buffer-max 4194304"),
            &[
                "--socket-buffer-max 4194304",
                "below --socket-buffer 8388608",
            ],
        ),
        ("run --subnet-lease-renew-margin 0".into(), &["1..=1439"]),
        ("demo --seconds 0".into(), &["--seconds"]),
        ("status --metrics-addr off".into(), &["no daemon to ask"]),
        ("--log-level [[ lease list".into(), &["--log-level", "info"]),
        // A typo is an error, not a filter that enables a target named "debg".
        (
            "--log-level debg lease list".into(),
            &["--log-level", "debg"],
        ),
        (
            format!("{init} --network nonsense"),
            &["--network", "198.19.0.0/16"],
        ),
        (
            format!("{init} --network 198.19.0.0/16 --port 0"),
            &["--port 0", "8285"],
        ),
        (init.clone(), &["--network is required"]),
        (
            format!("{init} --no-ipv4"),
            &["--no-ipv4 needs --ipv6-network"],
        ),
        // A bare address would name a /32 no lease has.
        (
            format!("lease release --registry-dir {reg} 198.19.5.0"),
            &["no prefix length", "198.19.5.0/24"],
        ),
        (
            format!("{init} --network 198.19.0.0"),
            &["no prefix length", "198.19.0.0/16"],
        ),
        (
            format!("{init} --network 198.19.1.5/16"),
            &["host bits", "198.19.0.0/16"],
        ),
        // A network of the other family: said so, not "not a CIDR".
        (
            format!("{init} --network fd00:19::/48"),
            &["IPv6 network", "--ipv6-network"],
        ),
        (
            format!("{init} --network 198.19.0.0/16 --ipv6-network 198.20.0.0/16"),
            &["IPv4 network", "give it with --network"],
        ),
        (
            format!("{init} --network 198.19.0.0/16 --ipv6-subnet-len 64"),
            &["--ipv6-subnet-len", "--ipv6-network"],
        ),
        (
            format!("{init} --no-ipv4 --ipv6-network fd00:19::/48 --subnet-len 20"),
            &["--subnet-len", "IPv4", "without --no-ipv4"],
        ),
        // IPv4 settings of an IPv6-only network would be stored and never used.
        (
            format!("{init} --no-ipv4 --ipv6-network fd00:19::/48 --network 198.19.0.0/16"),
            &["--no-ipv4", "--network"],
        ),
        // The etcd flags without endpoints would be ignored, and the directory used.
        (format!("{run} --etcd-prefix /x"), &["--etcd-endpoints"]),
        (
            format!("lease list --registry-dir {reg} --etcd-cafile /etc/ca.pem"),
            &["--etcd-endpoints"],
        ),
        (
            format!("lease reserve --registry-dir {reg} garbage --public-ip 198.18.0.9"),
            &["198.19.5.0/24"],
        ),
        // An address peers cannot send to: 0.0.0.0 would also be written as "no address".
        // (With an empty registry: a daemon that got past the check waits, and times out.)
        (
            format!("{run} --public-ip 0.0.0.0"),
            &["--public-ip", "unspecified"],
        ),
        (format!("{run} --public-ip 127.0.0.1"), &["loopback"]),
        (format!("{run} --public-ipv6 ff02::1"), &["multicast"]),
        (format!("{run} --public-ipv6 fe80::1"), &["link-local"]),
        (
            format!("{run} --public-ipv6 ::ffff:198.18.0.1"),
            &["written as IPv6", "--public-ip"],
        ),
        (format!("{run} --public-ip fd00::1"), &["--public-ipv6"]),
        (format!("{run} --iface eth0,"), &["--iface", "stray comma"]),
        (
            format!("lease reserve --registry-dir {reg} 198.19.5.0/24 --public-ip ::"),
            &["unspecified"],
        ),
        // The config itself is refused by flannel's validation.
        (
            format!("{init} --network 198.19.0.0/16 --subnet-len 8"),
            &["SubnetLen"],
        ),
        // The benchmark's flags, checked before it asks for root.
        (
            "bench --paths veth,wifi".into(),
            &["--paths", "\"wifi\"", "veth, vxlan or linen"],
        ),
        (
            "bench --paths linen,vxlan,linen".into(),
            &["\"linen\" twice"],
        ),
        ("bench --runs 0".into(), &["--runs 0", "1 or more"]),
    ];
    for (args, mentions) in cases {
        let args: Vec<&str> = args.split_whitespace().collect();
        assert_usage(&args, mentions);
    }
}

/// An invalid stored config exits 2 (after reading it again for 10 s, as it may be being
/// written), before anything is set up.
#[test]
fn an_invalid_stored_config_exits_2_before_anything_is_set_up() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config"), r#"{"Network": "not-a-cidr"}"#).unwrap();
    let reg = dir.path().to_str().unwrap();
    let env = dir.path().join("subnet.env");
    // Without the metrics endpoint, which would bind 127.0.0.1:9418 in this namespace first.
    let (code, stderr) = linen(&[
        "run",
        "--registry-dir",
        reg,
        "--subnet-file",
        env.to_str().unwrap(),
        "--metrics-addr",
        "off",
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("Network"), "{stderr}");
    assert!(stderr.contains("config"), "{stderr}");
    assert!(!env.exists(), "nothing may be written for a bad config");
    let (code, stderr) = linen(&["network", "show", "--registry-dir", reg]);
    assert_eq!(code, Some(2), "{stderr}");
}

/// A config invalid for a moment (written in place) is read again: once valid, the daemon
/// takes it instead of having exited 2, which would stop every host waiting for it. Root only:
/// the daemon then runs, in a throwaway namespace.
#[test]
fn a_config_being_written_is_read_again() {
    if common::skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config");
    std::fs::write(&config, "").unwrap();
    let env = dir.path().join("subnet.env");
    let log = dir.path().join("log");
    let mut cmd = in_a_throwaway_namespace("");
    cmd.arg("run")
        .arg("--registry-dir")
        .arg(dir.path())
        .arg("--subnet-file")
        .arg(&env)
        .args(["--metrics-addr", "off", "--tun", "lngrace0"])
        .args(["--log-level", "linen::daemon=debug"])
        .env_remove("LINEN_IP_MASQ")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut child = Helper::spawn(&mut cmd);
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let seen = linen::lab::wait_for(Duration::from_secs(10), || {
        read_log().contains("reading it again").then_some(())
    });
    assert!(seen.is_some(), "{}", read_log());
    // Invalid over several re-reads (one a second), as a slow hand would leave it.
    let reread = linen::lab::wait_for(Duration::from_secs(9), || {
        (read_log().matches("still invalid").count() >= 3).then_some(())
    });
    assert!(reread.is_some(), "{}", read_log());
    assert!(child.try_wait().unwrap().is_none(), "{}", read_log());
    std::fs::write(
        &config,
        r#"{"Network":"198.19.0.0/16","Backend":{"Type":"udp"}}"#,
    )
    .unwrap();
    let up = linen::lab::wait_for(Duration::from_secs(20), || env.exists().then_some(()));
    assert!(up.is_some(), "{}", read_log());
    // (unshare's shell exec'd linen: the child is the daemon.)
    stop_expecting_exit_0(&mut child, read_log);
}

#[test]
fn runtime_failures_exit_1() {
    // A registry path that cannot be a directory: a runtime failure, not bad input.
    let file = tempfile::NamedTempFile::new().unwrap();
    let (code, stderr) = linen(&[
        "lease",
        "list",
        "--registry-dir",
        file.path().join("sub").to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "{stderr}");
}

/// `linen status` whose reader stops early (`| head`, `| grep -q`) exits with the daemon's
/// health, not a panic (101) on the closed pipe. The "daemon" is a stand-in serving a large
/// /status once.
#[test]
fn a_status_reader_that_stops_early_is_no_error() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        // The whole request: unread bytes at the close would reset the connection.
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap() == 1 {
            head.push(byte[0]);
        }
        // Far more than a pipe holds (64 KiB).
        let body = format!(
            r#"{{"health":{{"ok":true}},"pad":"{}"}}"#,
            "x".repeat(1 << 20)
        );
        let _ = write!(
            conn,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        );
    });
    let scratch = tempfile::tempdir().unwrap();
    let mut child = common::linen_meant_to_fail(scratch.path())
        .args(["status", "--json", "--metrics-addr", &addr.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 16];
    let read = child.stdout.take().unwrap().read_exact(&mut first);
    // (The pipe is closed here, with most of the report unread.)
    let out = child.wait_with_output().unwrap();
    server.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(read.is_ok(), "nothing read: {stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}

/// A lock file this user may not open says why, not to grant access to the directory, which
/// this user has: another user's (only its owner may open it) names that user and says to run
/// as it; this user's own with a mode that shuts it out says to chmod it. As root, without the
/// capabilities that bypass file modes (and only there can the file be another user's).
#[test]
fn a_lock_file_this_user_may_not_open_says_why() {
    use std::os::unix::fs::PermissionsExt;
    let root = linen::lab::is_root();
    let list = |dir: &std::path::Path| {
        let scratch = tempfile::tempdir().unwrap();
        let wrapper: &[&str] = if root {
            &[
                "setpriv",
                "--inh-caps=-all",
                "--bounding-set=-dac_override,-dac_read_search",
                "--",
            ]
        } else {
            &[]
        };
        let out = common::linen_meant_to_fail_under(wrapper, scratch.path())
            .args(["lease", "list", "--registry-dir"])
            .arg(dir)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(!stderr.contains("access to the directory"), "{stderr}");
        stderr
    };
    let dir = registry_with_a_network();
    let lock = dir.path().join(".lock");
    std::fs::write(&lock, "").unwrap();
    std::fs::set_permissions(&lock, std::fs::Permissions::from_mode(0o000)).unwrap();
    let stderr = list(dir.path());
    assert!(
        stderr.contains("this user's, with mode 0") && stderr.contains("chmod 600"),
        "{stderr}"
    );
    if root {
        std::fs::set_permissions(&lock, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::chown(&lock, Some(65534), Some(65534)).unwrap();
        let stderr = list(dir.path());
        assert!(
            stderr.contains("belongs to uid 65534")
                && stderr.contains("only its owner may open it"),
            "{stderr}"
        );
    }
}

/// `linen run` without CAP_NET_ADMIN exits 1 and says so, before it takes a lease: nothing is
/// left in the registry for a day. As root it runs in a new network namespace (so that a broken
/// check could not touch this host's network) with the capability dropped by `setpriv`.
///
/// It says so at once, also while there is no config yet (rather than waiting for one it
/// could not use), but an invalid config is named first: that is exit 2 for any user.
#[test]
fn run_without_cap_net_admin_takes_no_lease() {
    let unprivileged = || {
        if linen::lab::is_root() {
            // An underlay with an address, so that without the check it would get to the lease.
            in_a_throwaway_namespace(
                "setpriv --inh-caps -all --ambient-caps -all --bounding-set -net_admin --",
            )
        } else {
            Command::new(LINEN)
        }
    };
    let dir = registry_with_a_network();
    let (code, stderr) = run_to_exit(unprivileged(), dir.path(), "lncap0");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("needs CAP_NET_ADMIN"), "{stderr}");

    let empty = tempfile::tempdir().unwrap();
    let (code, stderr) = run_to_exit(unprivileged(), empty.path(), "lncap0");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("needs CAP_NET_ADMIN"), "{stderr}");
    assert!(!stderr.contains("waiting"), "{stderr}");

    std::fs::write(dir.path().join("config"), r#"{"Network":"198.19.0.0/33"}"#).unwrap();
    let (code, stderr) = run_to_exit(unprivileged(), dir.path(), "lncap0");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(!stderr.contains("CAP_NET_ADMIN"), "{stderr}");
}

/// `linen` run by `unshare --net` in a new network namespace with a veth underlay at
/// 198.18.5.1/24, after the words of `wrapper` (root only).
fn in_a_throwaway_namespace(wrapper: &str) -> Command {
    let script = format!(
        "ip link add lntstu0 type veth peer name lntstu1 \
         && ip addr add 198.18.5.1/24 dev lntstu0 \
         && ip link set lntstu0 up && ip link set lntstu1 up \
         && exec {wrapper} \"$@\""
    );
    let mut c = Command::new("unshare");
    c.args(["--net", "sh", "-c", &script, "sh", LINEN]);
    c
}

/// An underlay address in a subnet the network leases would have datagrams to this host
/// routed into the overlay once a host leases it: a config mistake (exit 2), found before the
/// lease. (198.18.5.1 is in 198.18.0.0/16's default range 198.18.1.0–198.18.255.0.)
#[test]
fn an_overlay_holding_the_underlay_address_exits_2_before_the_lease() {
    if common::skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (code, stderr) = linen(&[
        "network",
        "init",
        "--network",
        "198.18.0.0/16",
        "--registry-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    let (code, stderr) = run_to_exit(in_a_throwaway_namespace(""), dir.path(), "lnovl0");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("198.18.5.1 is inside a subnet the network config leases"),
        "{stderr}"
    );
}

/// A subnet file that cannot be read is said, as flanneld says "Couldn't fetch previous
/// FLANNEL_SUBNET" (the host may get another subnet than before); a missing one, the first
/// start's case, is not. The overlay port is held by the wrapper, whose socket linen
/// inherits: it exits 1 right after reading the file, before the lease.
#[test]
fn an_unreadable_previous_subnet_file_is_said() {
    if common::skip() {
        return;
    }
    let dir = registry_with_a_network();
    let hold = "python3 -c 'import os, socket, sys; s = socket.socket(socket.AF_INET, \
        socket.SOCK_DGRAM); s.bind((\"0.0.0.0\", 8285)); os.set_inheritable(s.fileno(), True); \
        os.execvp(sys.argv[1], sys.argv[1:])'";
    let unreadable = dir.path().join("a-directory");
    std::fs::create_dir(&unreadable).unwrap();
    for (file, said) in [(&unreadable, true), (&dir.path().join("none"), false)] {
        let (code, stderr) =
            run_until_exit(in_a_throwaway_namespace(hold), dir.path(), file, "lnprev0");
        assert_eq!(code, Some(1), "{stderr}");
        assert!(stderr.contains("UDP port 8285 is in use"), "{stderr}");
        assert_eq!(
            stderr.contains("cannot read the previous run's subnet file"),
            said,
            "{file:?}: {stderr}"
        );
    }
}

/// Runs `cmd` (linen, or a wrapper of it) as `run` on the directory registry `registry` with
/// TUN device `tun`, until it exits; returns its exit code and stderr, after checking that it
/// took no lease and wrote no subnet.env.
fn run_to_exit(cmd: Command, registry: &std::path::Path, tun: &str) -> (Option<i32>, String) {
    let env = registry.join("subnet.env");
    let (code, stderr) = run_until_exit(cmd, registry, &env, tun);
    let leases = std::fs::read_dir(registry.join("subnets")).map_or(0, |d| d.count());
    assert_eq!(leases, 0, "no lease may be taken: {stderr}");
    assert!(!env.exists(), "{stderr}");
    (code, stderr)
}

/// Runs `cmd` as `run` on the directory registry `registry` with subnet file `env` and TUN
/// device `tun`, until it exits; returns its exit code and stderr.
fn run_until_exit(
    mut cmd: Command,
    registry: &std::path::Path,
    env: &std::path::Path,
    tun: &str,
) -> (Option<i32>, String) {
    cmd.arg("run")
        .arg("--registry-dir")
        .arg(registry)
        .arg("--subnet-file")
        .arg(env)
        .args(["--metrics-addr", "off", "--tun", tun])
        .env_remove("LINEN_IP_MASQ")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = Helper::spawn(&mut cmd);
    // Killed (when the helper drops) if it does not exit: a check that let it through would
    // leave a daemon running.
    let exited = linen::lab::wait_for(Duration::from_secs(20), || child.try_wait().unwrap());
    assert!(exited.is_some(), "linen run did not exit");
    let out = child.wait_with_output();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `--log-format json` writes one JSON object per event to stderr, and `--log-level` filters:
/// a malformed lease file is skipped with a warning that names it, which `error` hides.
#[test]
fn log_format_and_level_apply_to_what_is_logged() {
    let dir = registry_with_a_network();
    let reg = dir.path().to_str().unwrap();
    std::fs::create_dir_all(dir.path().join("subnets")).unwrap();
    std::fs::write(dir.path().join("subnets/198.19.5.0-24"), "garbage\n").unwrap();

    let (code, stderr) = linen(&[
        "--log-format",
        "json",
        "lease",
        "list",
        "--registry-dir",
        reg,
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    let warning = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["level"] == "WARN")
        .unwrap_or_else(|| panic!("no JSON warning in:\n{stderr}"));
    assert!(
        warning["fields"]["file"]
            .as_str()
            .is_some_and(|f| f.ends_with("198.19.5.0-24")),
        "{warning}"
    );
    assert_eq!(warning["target"], "linen::lease::directory", "{warning}");

    let (code, stderr) = linen(&[
        "--log-level",
        "error",
        "lease",
        "list",
        "--registry-dir",
        reg,
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        !stderr.contains("malformed"),
        "--log-level error:\n{stderr}"
    );
    let (code, stderr) = linen(&[
        "--log-level",
        "linen::lease=warn,error",
        "lease",
        "list",
        "--registry-dir",
        reg,
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("malformed"), "linen::lease=warn:\n{stderr}");
}

/// flanneld's spellings reach the same checks: `-flag=value`, and `FLANNELD_*` variables after
/// the command line and `LINEN_*` ones. Each case is an invalid pattern, so the error names the
/// value that was read and nothing starts.
#[test]
fn flanneld_flags_and_variables_are_read_in_flannels_order() {
    let scratch = tempfile::tempdir().unwrap();
    let run = |args: &[&str], vars: &[(&str, &str)]| {
        let mut cmd = common::linen_meant_to_fail(scratch.path());
        cmd.args(args)
            .env_remove("LINEN_IFACE_REGEX")
            .env_remove("FLANNELD_IFACE_REGEX");
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // (arguments, variables, the value the error must name)
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case<'_>; 4] = [
        (&["run", "-iface-regex=a)"], &[], "'a)'"),
        (&["run"], &[("FLANNELD_IFACE_REGEX", "b)")], "'b)'"),
        (
            &["run"],
            &[("FLANNELD_IFACE_REGEX", "b)"), ("LINEN_IFACE_REGEX", "c)")],
            "'c)'",
        ),
        (
            &["run", "-iface-regex", "a)"],
            &[("FLANNELD_IFACE_REGEX", "b)"), ("LINEN_IFACE_REGEX", "c)")],
            "'a)'",
        ),
    ];
    for (args, vars, value) in cases {
        let (code, stderr) = run(args, vars);
        assert_eq!(code, Some(2), "{args:?} {vars:?}: {stderr}");
        assert!(
            stderr.contains("--iface-regex") && stderr.contains(value),
            "{args:?} {vars:?} should report {value}: {stderr}"
        );
    }
    // Single-dash spellings of other flags reach their own checks.
    let (code, stderr) = run(&["run", "-iptables-resync=0"], &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--iptables-resync"), "{stderr}");
}

/// Flag mistakes found while setting up: a TUN name Linux cannot take, an etcd endpoint etcd
/// cannot be reached at, and etcd options that contradict each other, are bad flags (exit 2, so a service manager does not restart on
/// them), found before anything is created.
#[test]
fn setup_mistakes_in_flags_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let reg = dir.path().to_str().unwrap();
    assert_usage(
        &[
            "run",
            "--metrics-addr",
            "off",
            "--registry-dir",
            reg,
            "--tun",
            "averyveryverylongname",
        ],
        &["--tun", "15 bytes"],
    );
    // (etcd flags, what stderr must mention). A typo in an endpoint is found before
    // connecting, not retried for ever.
    #[cfg(feature = "etcd")]
    for (etcd, mentions) in [
        (
            &["http://127.0.0.1:1", "--etcd-password", "secret"][..],
            &["--etcd-username"][..],
        ),
        (
            &["http://127.0.0.1:1,foo"],
            &["\"foo\" has neither scheme nor port", "http://foo:2379"],
        ),
    ] {
        let mut args = vec!["run", "--metrics-addr", "off", "--etcd-endpoints"];
        args.extend(etcd);
        assert_usage(&args, mentions);
    }
}

/// A bad value from the environment names the variable it came from, not only the flag,
/// which is not on the command line (a flanneld environment file, a unit's `Environment=`).
#[test]
fn a_bad_value_from_the_environment_names_its_variable() {
    let scratch = tempfile::tempdir().unwrap();
    for (var, value, args, mentions) in [
        (
            "FLANNELD_PUBLIC_IP",
            "bad",
            &["run"][..],
            &["--public-ip", "environment variable FLANNELD_PUBLIC_IP"][..],
        ),
        (
            "LINEN_MTU",
            "10",
            &["run"],
            &["environment variable LINEN_MTU"],
        ),
        (
            "LINEN_LOG_LEVEL",
            "debg",
            &["lease", "list"],
            &["environment variable LINEN_LOG_LEVEL"],
        ),
    ] {
        let out = common::linen_meant_to_fail(scratch.path())
            .args(args)
            .env(var, value)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{var}: {stderr}");
        for m in mentions {
            assert!(stderr.contains(m), "{var}: {stderr}");
        }
    }
    // On the command line, the flag is what is named.
    let out = common::linen_meant_to_fail(scratch.path())
        .args(["run", "--mtu", "10"])
        .env("LINEN_MTU", "1400")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(!stderr.contains("environment variable"), "{stderr}");
}

/// An etcd variable left empty in an environment file is no etcd flag: the directory registry
/// is used, where a set one without endpoints is refused.
#[test]
fn an_empty_etcd_variable_is_not_an_etcd_flag() {
    // An empty password file beside a password conflicts with nothing (clap's conflict check
    // counted it as given): refused only for want of endpoints.
    let scratch = tempfile::tempdir().unwrap();
    let out = common::linen_meant_to_fail(scratch.path())
        .args(["lease", "list", "--etcd-password", "x"])
        .env("LINEN_ETCD_PASSWORD_FILE", "")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--etcd-password (or its variable)"),
        "{stderr}"
    );
    let scratch = tempfile::tempdir().unwrap();
    let list = |var: &str, value: &str| {
        common::linen_meant_to_fail(scratch.path())
            .args(["lease", "list"])
            .env(var, value)
            .output()
            .unwrap()
    };
    for var in [
        "LINEN_ETCD_USERNAME",
        "LINEN_ETCD_PASSWORD",
        "LINEN_ETCD_PREFIX",
        "LINEN_ETCD_CAFILE",
        "LINEN_ETCD_CERTFILE",
        "LINEN_ETCD_KEYFILE",
        "LINEN_ETCD_PASSWORD_FILE",
    ] {
        let out = list(var, "");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{var}=: {stderr}");
        let out = list(var, "x");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{var}=x: {stderr}");
        assert!(stderr.contains("--etcd-endpoints"), "{var}=x: {stderr}");
    }
    // Nor is an empty endpoint list: the directory registry is used (it was etcd at "").
    let out = list("LINEN_ETCD_ENDPOINTS", "");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "LINEN_ETCD_ENDPOINTS=: {stderr}"
    );
}

/// SIGTERM while the daemon waits for the network config is a normal stop: exit 0.
#[test]
fn a_stop_while_waiting_for_the_config_exits_0() {
    stop_while_waiting(&[], "waiting for the network config");
}

/// An etcd out of reach at start is waited for, with authentication too (where the client
/// asks for a token at once; it used to exit 1), and a stop meanwhile is a normal one.
#[cfg(feature = "etcd")]
#[test]
fn a_stop_while_waiting_for_etcd_with_authentication_exits_0() {
    let log = stop_while_waiting(
        &[
            "--etcd-endpoints",
            "http://127.0.0.1:1",
            "--etcd-username",
            "u",
            "--etcd-password",
            "p",
        ],
        "waiting for the registry",
    );
    // Root only: as another user the test is skipped and the log is empty.
    if linen::lab::is_root() {
        assert!(
            log.contains("password and token cross the network in clear text"),
            "{log}"
        );
    }
}

/// Starts `linen run` with `args` on an empty registry, waits for `waiting` in its log, then
/// stops it: it must exit 0; returns the log. Root only (without CAP_NET_ADMIN linen exits at once instead of
/// waiting), in a throwaway network namespace.
fn stop_while_waiting(args: &[&str], waiting: &str) -> String {
    if common::skip() {
        return String::new();
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let mut child = Helper::spawn(
        in_a_throwaway_namespace("")
            .args(["run", "--metrics-addr", "off", "--registry-dir"])
            .arg(dir.path().join("registry"))
            .args(["--subnet-file"])
            .arg(dir.path().join("subnet.env"))
            .args(args)
            .stderr(std::fs::File::create(&log).unwrap()),
    );
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let seen = linen::lab::wait_for(Duration::from_secs(10), || {
        read_log().contains(waiting).then_some(())
    });
    assert!(seen.is_some(), "{}", read_log());
    stop_expecting_exit_0(&mut child, read_log);
    read_log()
}

/// Sends SIGTERM to our own `child`, by its PID; it must exit 0 (`log` for the message).
fn stop_expecting_exit_0(child: &mut Helper, log: impl Fn() -> String) {
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    // A daemon that ignores the stop fails the test (and is killed as the helper drops).
    let status = linen::lab::wait_for(Duration::from_secs(20), || child.try_wait().unwrap());
    let status = status.unwrap_or_else(|| panic!("no exit within 20 s of SIGTERM:\n{}", log()));
    assert_eq!(status.code(), Some(0), "{}", log());
}
