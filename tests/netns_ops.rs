//! The daemon's metrics, health and status endpoint seen from outside: `linen run` in network
//! namespaces, scraped with a real HTTP client (curl, or python3's urllib where curl is
//! missing) from inside each namespace, and `linen status` run there too. Root only for the
//! namespace test; skipped with a message otherwise.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use linen::lab::{Host, Lab, is_root, wait_for};
use linen::model::SubnetEnv;

const LINEN: &str = env!("CARGO_BIN_EXE_linen");

fn skip() -> bool {
    if !is_root() {
        if std::env::var_os("LINEN_TEST_REQUIRE_ALL").is_some_and(|v| v == "1") {
            panic!(
                "network-namespace tests need root, and LINEN_TEST_REQUIRE_ALL=1 forbids skipping"
            );
        }
        use std::io::Write;
        // Written to the stderr handle, not with eprintln!, so libtest does not capture it.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: network-namespace tests need root"
        );
        return true;
    }
    false
}

/// `GET url` from inside `host`'s namespace: (status code, body), or `None` when nothing answers.
fn http_get(host: &Host, url: &str) -> Option<(u16, String)> {
    let curl = Command::new("sh")
        .args(["-c", "command -v curl"])
        .output()
        .is_ok_and(|o| o.status.success());
    let out = if curl {
        host.run(
            "curl",
            &["-sS", "--max-time", "5", "-w", "\n%{http_code}", url],
        )
    } else {
        let script = "import sys, urllib.request, urllib.error\n\
            try:\n    r = urllib.request.urlopen(sys.argv[1], timeout=5); code, body = r.status, r.read()\n\
            except urllib.error.HTTPError as e:\n    code, body = e.code, e.read()\n\
            sys.stdout.write(body.decode() + '\\n' + str(code))";
        host.run("python3", &["-c", script, url])
    }
    .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let (body, code) = text.rsplit_once('\n')?;
    Some((code.trim().parse().ok()?, body.to_owned()))
}

/// Parses Prometheus text format 0.0.4 strictly enough to catch a broken exposition: every
/// sample's metric has a `# TYPE` line before it, names and labels are well-formed, values are
/// numbers, and no series appears twice. Returns `series → value`, the series written as in the
/// text (`name{label="value"}`).
fn parse_prometheus(text: &str) -> Result<HashMap<String, f64>, String> {
    fn valid_name(n: &str) -> bool {
        let mut chars = n.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }
    let mut typed: HashMap<String, String> = HashMap::new();
    let mut samples = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let at = |what: &str| format!("line {}: {what}: {line:?}", i + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("TYPE"), Some(name), Some(kind)) => {
                    if !valid_name(name)
                        || !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind)
                    {
                        return Err(at("bad TYPE"));
                    }
                    if typed.insert(name.to_owned(), kind.to_owned()).is_some() {
                        return Err(at("TYPE given twice"));
                    }
                }
                (Some("HELP"), Some(name), _) if valid_name(name) => {}
                _ => return Err(at("bad comment")),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').ok_or_else(|| at("no value"))?;
        let value: f64 = value.parse().map_err(|_| at("value is not a number"))?;
        let name = match series.split_once('{') {
            Some((name, labels)) => {
                let labels = labels
                    .strip_suffix('}')
                    .ok_or_else(|| at("unclosed labels"))?;
                for pair in labels.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once("=\"").ok_or_else(|| at("bad label"))?;
                    if !valid_name(k) || v.trim_end_matches('"').contains('\n') {
                        return Err(at("bad label"));
                    }
                }
                name
            }
            None => series,
        };
        if !valid_name(name) || !typed.contains_key(name) {
            return Err(at("sample without a TYPE line"));
        }
        if samples.insert(series.to_owned(), value).is_some() {
            return Err(at("series given twice"));
        }
    }
    Ok(samples)
}

struct Daemons {
    lab: Lab,
    dir: tempfile::TempDir,
}

impl Daemons {
    fn env_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("h{}.env", i + 1))
    }

    fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("h{}.log", i + 1))).unwrap_or_default()
    }

    fn start(&mut self, i: usize, extra: &[&str]) -> u32 {
        let host = self.lab.host(i).clone();
        let mut cmd = host.command(LINEN);
        cmd.args(["run", "--registry-dir"])
            .arg(self.dir.path())
            .args(["--iface", "eth0", "--workers", "2", "--subnet-file"])
            .arg(self.env_path(i))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(self.dir.path().join(format!("h{}.log", i + 1))).unwrap(),
            );
        self.lab.spawn(cmd, "linen").unwrap()
    }

    fn env(&self, i: usize) -> SubnetEnv {
        let path = self.env_path(i);
        wait_for(Duration::from_secs(15), || {
            SubnetEnv::parse(&std::fs::read_to_string(&path).ok()?).ok()
        })
        .unwrap_or_else(|| panic!("host {} wrote no subnet.env:\n{}", i + 1, self.log(i)))
    }

    /// Waits until `url` on host i answers `code`; returns the body.
    fn wait_code(&self, i: usize, url: &str, code: u16, secs: u64) -> String {
        let mut last = None;
        wait_for(Duration::from_secs(secs), || {
            let got = http_get(self.lab.host(i), url);
            let hit = got
                .as_ref()
                .filter(|(c, _)| *c == code)
                .map(|(_, b)| b.clone());
            last = got;
            hit
        })
        .unwrap_or_else(|| {
            panic!(
                "{url} on host {} never answered {code}; last answer {last:?}; log:\n{}",
                i + 1,
                self.log(i)
            )
        })
    }

    fn metrics(&self, i: usize, port: u16) -> HashMap<String, f64> {
        let (code, body) = http_get(
            self.lab.host(i),
            &format!("http://127.0.0.1:{port}/metrics"),
        )
        .expect("/metrics answers");
        assert_eq!(code, 200, "{body}");
        parse_prometheus(&body).unwrap_or_else(|e| panic!("{e}\n{body}"))
    }

    /// Runs `linen COMMAND --registry-dir DIR ARGS` on the registry; must succeed.
    fn admin(&self, command: &[&str], args: &[&str]) {
        let out = Command::new(LINEN)
            .args(command)
            .arg("--registry-dir")
            .arg(self.dir.path())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "linen {command:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn linen(&self, i: usize, args: &[&str]) -> std::process::Output {
        self.lab.host(i).run(LINEN, args).unwrap()
    }
}

fn val(m: &HashMap<String, f64>, series: &str) -> f64 {
    *m.get(series)
        .unwrap_or_else(|| panic!("no series {series} in {m:?}"))
}

#[test]
fn metrics_health_and_status_of_running_daemons() {
    if skip() {
        return;
    }
    let mut d = Daemons {
        lab: Lab::new("lnops", 2, 1500).unwrap(),
        dir: tempfile::tempdir().unwrap(),
    };
    // Host 1 starts before any network config exists: the endpoint is up and says why it is
    // not healthy yet.
    d.start(0, &[]);
    let body = d.wait_code(0, "http://127.0.0.1:9418/healthz", 503, 10);
    assert!(body.starts_with("starting"), "{body}");

    // A network with exactly two subnets, one per host.
    d.admin(
        &["network", "init"],
        &[
            "--network",
            "198.19.0.0/16",
            "--subnet-min",
            "198.19.1.0",
            "--subnet-max",
            "198.19.2.0",
        ],
    );
    // Host 2 serves on another address, which `linen status` must be told, and /healthz alone
    // on every address at flannel's -healthz-port (spelled as in a flanneld unit).
    d.start(
        1,
        &["--metrics-addr", "127.0.0.1:9500", "-healthz-port=8471"],
    );
    let body = d.wait_code(0, "http://127.0.0.1:9418/healthz", 200, 15);
    assert_eq!(body, "ok\n");
    d.wait_code(1, "http://127.0.0.1:9500/healthz", 200, 15);
    let probe = format!("http://{}:8471", d.lab.host(1).ip);
    let body = d.wait_code(0, &format!("{probe}/healthz"), 200, 15);
    assert_eq!(body, "ok\n", "the healthz port, from another host");
    d.wait_code(0, &format!("{probe}/metrics"), 404, 5);
    d.wait_code(0, &format!("{probe}/status"), 404, 5);
    let key1 = d.env(0).previous_key().unwrap();
    let net1 = key1.ipv4().unwrap();
    let net2 = d.env(1).previous_key().unwrap().ipv4().unwrap();
    let tun2 = net2.network().to_string();

    let before = d.metrics(0, 9418);
    for series in [
        "linen_lease_held",
        "linen_healthy",
        "linen_registry_connected",
    ] {
        assert_eq!(val(&before, series), 1.0, "{series}");
    }
    assert_eq!(val(&before, "linen_workers_configured"), 2.0);
    assert_eq!(val(&before, "linen_workers_running"), 2.0);
    let expiry = val(&before, "linen_lease_expiry_seconds");
    assert!(expiry > 86_000.0 && expiry <= 86_400.0, "{expiry}");
    // Each host has the other in its table (it may arrive a moment after health turns green).
    for (i, port) in [(0, 9418), (1, 9500)] {
        assert!(
            wait_for(Duration::from_secs(5), || {
                (val(&d.metrics(i, port), "linen_table_routes") == 1.0).then_some(())
            })
            .is_some(),
            "host {} never routed to its peer",
            i + 1
        );
    }

    // Ten pings host 1 → host 2: ten more packets out, and as many in as ping saw answered.
    let ping = d
        .lab
        .host(0)
        .run("ping", &["-c10", "-i0.05", "-W1", &tun2])
        .unwrap();
    let ping = String::from_utf8_lossy(&ping.stdout).into_owned();
    let received: f64 = ping
        .split(", ")
        .find_map(|p| p.strip_suffix(" received")?.parse().ok())
        .unwrap_or_else(|| panic!("no reply count in {ping}"));
    // Over a quiet veth between two namespaces none should be lost; one is allowed for a
    // machine that stalls past ping's 1 s wait.
    assert!(received >= 9.0, "{ping}");
    // Unroutable (198.19.250.0/24 is in nobody's lease): a no_route drop and an ICMP error.
    let _ = d.lab.host(0).run("ping", &["-c1", "-W1", "198.19.250.9"]);
    let after = d.metrics(0, 9418);
    for (dir, n) in [
        ("tun_rx", 10.0),
        ("udp_tx", 10.0),
        ("udp_rx", received),
        ("tun_tx", received),
    ] {
        let p = format!("linen_packets_total{{direction=\"{dir}\"}}");
        let b = format!("linen_bytes_total{{direction=\"{dir}\"}}");
        // An echo of ping's default 56 bytes is an 84-byte IPv4 packet.
        assert!(val(&after, &p) >= val(&before, &p) + n, "{p}: {after:?}");
        assert!(
            val(&after, &b) >= val(&before, &b) + 84.0 * n,
            "{b}: {after:?}"
        );
    }
    let no_route = "linen_drops_total{reason=\"no_route\"}";
    assert!(val(&after, no_route) >= val(&before, no_route) + 1.0);
    assert!(val(&after, "linen_icmp_errors_sent_total") >= 1.0);
    // Every drop reason is exported, zero or not.
    assert_eq!(
        after
            .keys()
            .filter(|k| k.starts_with("linen_drops_total{"))
            .count(),
        linen::dataplane::DropReason::COUNT
    );

    // `linen status` shows the lease and the peer; host 2 needs its address.
    let out = d.linen(0, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(": healthy\n"), "{text}");
    assert!(text.contains(&format!("lease     {net1}\n")), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with(&net2.to_string()) && l.contains("198.18.0.2")),
        "{text}"
    );
    assert!(text.lines().any(|l| l.starts_with("no_route ")), "{text}");
    let out = d.linen(1, &["status", "--json", "--metrics-addr", "127.0.0.1:9500"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["lease"]["ipv4_subnet"], net2.to_string(), "{json}");
    assert_eq!(json["lease"]["public_ip"], "198.18.0.2", "{json}");
    assert_eq!(json["peers"][0]["ipv4_subnet"], net1.to_string(), "{json}");
    assert_eq!(json["peers"][0]["public_ip"], "198.18.0.1", "{json}");
    assert!(
        json["counters"]["traffic"]["udp_rx"]["packets"].as_u64() >= Some(10),
        "{json}"
    );
    assert_eq!(json["health"]["ok"], true, "{json}");

    // Host 2's underlay address goes (DHCP gave the host another): peers would drop what it
    // sends from a new one, so it is reported, and no longer once the address is back.
    let underlay = "linen_host_step_failing{step=\"underlay\"}";
    let h2 = d.lab.host(1).clone();
    assert_eq!(val(&d.metrics(1, 9500), underlay), 0.0);
    h2.ip(&["addr", "del", "198.18.0.2/24", "dev", "eth0"])
        .unwrap();
    let seen = wait_for(Duration::from_secs(12), || {
        (val(&d.metrics(1, 9500), underlay) == 1.0).then_some(())
    });
    let out = d.linen(1, &["status", "--metrics-addr", "127.0.0.1:9500"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    h2.ip(&["addr", "add", "198.18.0.2/24", "dev", "eth0"])
        .unwrap();
    assert!(
        seen.is_some(),
        "the address's loss not reported:\n{}",
        d.log(1)
    );
    assert!(
        text.contains("FAILING   underlay (checked every 5 s): 198.18.0.2 is on no interface"),
        "{text}"
    );
    let cleared = wait_for(Duration::from_secs(12), || {
        (val(&d.metrics(1, 9500), underlay) == 0.0).then_some(())
    });
    assert!(cleared.is_some(), "still reported:\n{}", d.log(1));

    // Host 1's subnet is given to another machine (a reservation dropped into the registry, as
    // configuration management would): host 1 loses its lease, and with both subnets taken it
    // cannot get another. Health must say so.
    take_over(d.dir.path(), &key1.to_string(), "198.18.0.99");
    let body = d.wait_code(0, "http://127.0.0.1:9418/healthz", 503, 10);
    assert!(body.starts_with("no lease held"), "{body}");
    let m = d.metrics(0, 9418);
    assert_eq!(val(&m, "linen_lease_held"), 0.0);
    assert_eq!(val(&m, "linen_healthy"), 0.0);
    assert!(!m.contains_key("linen_lease_expiry_seconds"), "{m:?}");
    let out = d.linen(0, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("UNHEALTHY: no lease held"), "{text}");
    // Scripts can test it: exit 1, the reason on stderr.
    assert_eq!(out.status.code(), Some(1), "{text}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unhealthy: no lease held"), "{err}");

    // Released again, the subnet is re-acquired and health comes back.
    d.admin(&["lease", "release"], &[&key1.to_string()]);
    d.wait_code(0, "http://127.0.0.1:9418/healthz", 200, 30);
    assert_eq!(d.env(0).previous_key(), Some(key1));
}

/// A host whose underlay address changes (DHCP gave it another) keeps its subnet: it rewrites
/// its lease with the new address, sends from it, and its peer routes to it and accepts what
/// it sends, so traffic flows both ways again without a restart.
#[test]
fn a_new_underlay_address_is_followed_and_the_subnet_kept() {
    if skip() {
        return;
    }
    follow_a_new_address(
        &["--iface", "eth0"],
        &[],
        ("198.18.0.2", "198.18.0.12"),
        Meanwhile::Nothing,
    );
}

/// With no interface named, only the start's interface is followed: another one that is left
/// with an address meanwhile (here a veth, as a container bridge would be, the same on
/// every host) is not advertised, and the interface's new address is, once it comes.
#[test]
fn without_iface_only_the_start_interface_is_followed() {
    if skip() {
        return;
    }
    follow_a_new_address(&[], &[], ("198.18.0.2", "198.18.0.12"), Meanwhile::Detour);
}

/// The same where the advertised address is not the one the kernel sends from (a secondary
/// address, picked by `--iface-regex`): the workers must send from the new one, or the peer
/// drops what they send as from an unknown host.
#[test]
fn a_new_secondary_underlay_address_is_sent_from() {
    if skip() {
        return;
    }
    follow_a_new_address(
        &["--iface-regex", r"^198\.18\.0\.2\d$"],
        &["198.18.0.21/24"],
        ("198.18.0.21", "198.18.0.22"),
        Meanwhile::Nothing,
    );
}

/// On a dual-stack host (an IPv6 overlay network too, each family over its own underlay
/// family), a new IPv6 address is followed and the IPv4 one is left as it was: the lease
/// changes only its PublicIPv6, and both overlay families reach the peer both ways.
#[test]
fn a_new_ipv6_underlay_address_is_followed_on_a_dual_stack_host() {
    if skip() {
        return;
    }
    follow_a_new_address(
        &["--iface", "eth0"],
        &[],
        ("fd00:18::2", "fd00:18::12"),
        Meanwhile::Nothing,
    );
}

/// A new IPv6 address is advertised only once the kernel sends from it. One that another host
/// on the link holds fails duplicate address detection, and is never advertised; one still
/// tentative (twenty probes here, about 20 s) is advertised once detection has passed.
/// Meanwhile the lease keeps naming the old address.
#[test]
fn a_new_ipv6_address_is_followed_only_past_duplicate_address_detection() {
    if skip() {
        return;
    }
    follow_a_new_address(
        &["--iface", "eth0"],
        &[],
        ("fd00:18::2", "fd00:18::12"),
        Meanwhile::Dad,
    );
}

/// What happens between the old address's going and the new one's coming.
#[derive(PartialEq)]
enum Meanwhile {
    Nothing,
    /// Another interface with an address comes first, and the old address goes a while before
    /// the new one comes: that interface must not be followed meanwhile.
    Detour,
    /// (IPv6 only.) An address that fails duplicate address detection comes first, and the new
    /// one stays tentative for about 20 s: neither may be advertised meanwhile.
    Dad,
}

/// Starts two daemons, host 2's with `iface` and the extra addresses `more` on its eth0, then
/// moves host 2's advertised address from `change.0` to `change.1` and checks that the lease,
/// the routes and the traffic follow, with what `meanwhile` says in between. IPv6 addresses
/// in `change` make the network dual-stack; the IPv4 overlay and lease address must then stay
/// as they were.
fn follow_a_new_address(iface: &[&str], more: &[&str], change: (&str, &str), meanwhile: Meanwhile) {
    let detour = meanwhile == Meanwhile::Detour;
    let v6 = change.0.contains(':');
    let (prefix, field) = if v6 {
        ("/64", "PublicIPv6")
    } else {
        ("/24", "PublicIP")
    };
    let mut d = Daemons {
        lab: Lab::new("lnmove", 2, 1500).unwrap(),
        dir: tempfile::tempdir().unwrap(),
    };
    let h2 = d.lab.host(1).clone();
    for a in more {
        h2.ip(&["addr", "add", a, "dev", "eth0"]).unwrap();
    }
    let mut network = vec!["--network", "198.19.0.0/16"];
    if v6 {
        network.extend(["--ipv6-network", "fd00:19::/48"]);
    }
    d.admin(&["network", "init"], &network);
    d.start(0, &[]);
    let mut cmd = h2.command(LINEN);
    cmd.args(["run", "--registry-dir"])
        .arg(d.dir.path())
        .args(iface)
        .args(["--workers", "2", "--metrics-addr", "127.0.0.1:9500"])
        .arg("--subnet-file")
        .arg(d.env_path(1))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(d.dir.path().join("h2.log")).unwrap());
    d.lab.spawn(cmd, "linen").unwrap();
    let (key1, key2) = (
        d.env(0).previous_key().unwrap(),
        d.env(1).previous_key().unwrap(),
    );
    let tun = |k: linen::model::SubnetKey| k.ipv4().unwrap().network().to_string();
    let tun6 = |k: linen::model::SubnetKey| k.ipv6().map(|n| n.network().to_string());
    let pings = |from: usize, to: &str| {
        wait_for(Duration::from_secs(20), || {
            let out = d
                .lab
                .host(from)
                .run("ping", &["-c2", "-i0.2", "-W1", to])
                .ok()?;
            out.status.success().then_some(())
        })
        .is_some()
    };
    assert!(
        pings(1, &tun(key1)),
        "no overlay before the change:\n{}",
        d.log(1)
    );
    if v6 {
        let to1 = tun6(key1).expect("a dual-stack lease");
        assert!(
            pings(1, &to1),
            "no IPv6 overlay before the change:\n{}",
            d.log(1)
        );
    }

    if detour {
        // (A veth pair: the dummy module may be missing.)
        h2.ip(&[
            "link", "add", "vethx0", "type", "veth", "peer", "name", "vethx1",
        ])
        .unwrap();
        h2.ip(&["addr", "add", "198.18.5.1/24", "dev", "vethx0"])
            .unwrap();
        h2.ip(&["link", "set", "vethx0", "up"]).unwrap();
    }
    h2.ip(&[
        "addr",
        "del",
        &format!("{}{prefix}", change.0),
        "dev",
        "eth0",
    ])
    .unwrap();
    if detour {
        // eth0 left without an address a peer could use, the veth is the only interface with
        // one: what the start's choice, made again, would take.
        h2.ip(&["addr", "del", "fd00:18::2/64", "dev", "eth0"])
            .unwrap();
        let waited = wait_for(Duration::from_secs(20), || {
            d.log(1)
                .contains("waiting for a new address on eth0")
                .then_some(())
        });
        assert!(waited.is_some(), "{}", d.log(1));
        // A check more, which could have taken the veth's address.
        std::thread::sleep(Duration::from_secs(6));
    }
    let leases_now = || {
        let out = Command::new(LINEN)
            .args(["lease", "list", "--json", "--registry-dir"])
            .arg(d.dir.path())
            .output()
            .ok()?;
        Some(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    if meanwhile == Meanwhile::Dad {
        // Whatever a new namespace inherits: detection on, one probe.
        for (key, value) in [("accept_dad", "1"), ("dad_transmits", "1")] {
            h2.run_ok(
                "sysctl",
                &["-qw", &format!("net.ipv6.conf.eth0.{key}={value}")],
            )
            .unwrap();
        }
        // Host 1 holds fd00:18::13 already: on host 2 it fails detection at once. It is then
        // the only global IPv6 address on eth0.
        d.lab
            .host(0)
            .ip(&[
                "-6",
                "addr",
                "add",
                "fd00:18::13/64",
                "dev",
                "eth0",
                "nodad",
            ])
            .unwrap();
        h2.ip(&["-6", "addr", "add", "fd00:18::13/64", "dev", "eth0"])
            .unwrap();
        let failed = wait_for(Duration::from_secs(10), || {
            let out = h2.ip(&["-6", "-o", "addr", "show", "dev", "eth0"]).ok()?;
            out.contains("dadfailed").then_some(())
        });
        assert!(failed.is_some(), "fd00:18::13 passed detection on host 2");
        let waited = wait_for(Duration::from_secs(20), || {
            d.log(1)
                .contains("fd00:18::13 failed duplicate address detection")
                .then_some(())
        });
        assert!(waited.is_some(), "{}", d.log(1));
        // Twenty probes a second apart: the new address stays tentative for about 20 s, over
        // several checks.
        h2.run_ok("sysctl", &["-qw", "net.ipv6.conf.eth0.dad_transmits=20"])
            .unwrap();
    }
    h2.ip(&[
        "addr",
        "add",
        &format!("{}{prefix}", change.1),
        "dev",
        "eth0",
    ])
    .unwrap();
    if meanwhile == Meanwhile::Dad {
        let tentative = || {
            h2.ip(&["-6", "-o", "addr", "show", "dev", "eth0"])
                .unwrap()
                .lines()
                .any(|l| l.contains(change.1) && l.contains("tentative"))
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            // The lease first: detection may pass, and the lease follow, between the two.
            let text = leases_now().unwrap_or_default();
            if !tentative() {
                break;
            }
            assert!(
                !text.contains(change.1) && !text.contains("fd00:18::13"),
                "advertised before detection passed: {text}\n{}",
                d.log(1)
            );
            assert!(
                std::time::Instant::now() < deadline,
                "{} tentative for a minute",
                change.1
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        // Checks saw it tentative (the test shows nothing otherwise): after 10 s of quiet looks
        // a second apart, the wait is reported.
        let seen = format!(
            "{} is still tentative (duplicate address detection",
            change.1
        );
        assert!(d.log(1).contains(&seen), "{}", d.log(1));
    }
    let listed = wait_for(Duration::from_secs(20), || {
        leases_now().filter(|text| text.contains(change.1))
    });
    let listed =
        listed.unwrap_or_else(|| panic!("the lease never named {}:\n{}", change.1, d.log(1)));
    let leases: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let all = leases["leases"].as_array().cloned().unwrap_or_default();
    let holder = |key: &linen::model::SubnetKey, field: &str| {
        all.iter()
            .find(|l| l["subnet"] == key.to_string())
            .and_then(|l| l["value"][field].as_str().map(str::to_owned))
    };
    assert_eq!(holder(&key2, field).as_deref(), Some(change.1), "{listed}");
    assert_eq!(
        holder(&key1, "PublicIP").as_deref(),
        Some("198.18.0.1"),
        "{listed}"
    );
    if v6 {
        assert_eq!(
            holder(&key2, "PublicIP").as_deref(),
            Some("198.18.0.2"),
            "{listed}"
        );
        assert_eq!(
            holder(&key1, field).as_deref(),
            Some("fd00:18::1"),
            "{listed}"
        );
    }
    assert_eq!(all.len(), 2, "no new lease: {listed}");
    // Both ways: host 2 sends from the new address, which host 1 takes as host 2's, and host 1
    // sends to it.
    assert!(
        pings(1, &tun(key1)),
        "host 2 cannot reach host 1:\n{}",
        d.log(0)
    );
    assert!(
        pings(0, &tun(key2)),
        "host 1 cannot reach host 2:\n{}",
        d.log(1)
    );
    if v6 {
        let (to1, to2) = (tun6(key1).unwrap(), tun6(key2).unwrap());
        assert!(
            pings(1, &to1),
            "host 2 cannot reach host 1 over IPv6:\n{}",
            d.log(0)
        );
        assert!(
            pings(0, &to2),
            "host 1 cannot reach host 2 over IPv6:\n{}",
            d.log(1)
        );
    }
    assert_eq!(d.env(1).previous_key(), Some(key2), "subnet.env moved");
    let log = d.log(1);
    assert!(log.contains("advertising the interface's new one"), "{log}");
    assert!(!listed.contains("198.18.5.1"), "{listed}");
    assert!(!log.contains("re-acquiring"), "{log}");
    let underlay = "linen_host_step_failing{step=\"underlay\"}";
    assert_eq!(val(&d.metrics(1, 9500), underlay), 0.0, "{log}");
}

/// Replaces the lease file of `key` with a reservation for `ip`, atomically.
fn take_over(dir: &Path, key: &str, ip: &str) {
    let path = dir.join("subnets").join(key);
    assert!(path.exists(), "no lease file {}", path.display());
    let tmp = dir.join("subnets").join(format!(".{key}.test"));
    std::fs::write(
        &tmp,
        format!("{{\"PublicIP\":\"{ip}\",\"PublicIPv6\":null}}\n"),
    )
    .unwrap();
    std::fs::rename(&tmp, &path).unwrap();
}

#[test]
fn status_without_a_daemon_fails_clearly() {
    // Needs no root: a loopback port that nothing serves.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let out = Command::new(LINEN)
        .args(["status", "--metrics-addr", &addr])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "no linen daemon answers on {addr}; is `linen run` running? pass --metrics-addr"
        )),
        "{err}"
    );
    let out = Command::new(LINEN)
        .args(["status", "--metrics-addr", "localhost"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not IP:PORT"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_parser_rejects_broken_expositions() {
    // The parser above must be able to fail, or the namespace test proves nothing.
    assert!(parse_prometheus("# TYPE a counter\na_total 1\n").is_err());
    assert!(parse_prometheus("a 1\n").is_err());
    assert!(parse_prometheus("# TYPE a gauge\na x\n").is_err());
    assert!(parse_prometheus("# TYPE a gauge\na 1\na 2\n").is_err());
    let ok = parse_prometheus("# HELP a h\n# TYPE a gauge\na{r=\"x\",s=\"y\"} 2\n").unwrap();
    assert_eq!(ok["a{r=\"x\",s=\"y\"}"], 2.0);
}
