//! Helpers shared by integration tests.

#![allow(dead_code)]

pub mod etcd;
pub mod manager;

use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::process::{Child, Command, Output};

/// The linen binary under test.
pub const LINEN: &str = env!("CARGO_BIN_EXE_linen");

/// linen under coreutils' `timeout` (60 s), for a command meant to fail at start: with its
/// registry, subnet file and TUN name pointed into `scratch` and at test names, and metrics off
/// (through `LINEN_*` variables, which the command line overrides). Should a check regress and
/// `linen run` start, as root, it then waits on an empty registry under `scratch` and is killed,
/// instead of using this host's `/var/lib/linen`, port 9418 or `linen0`, or hanging the suite.
pub fn linen_meant_to_fail(scratch: &Path) -> Command {
    linen_meant_to_fail_under(&[], scratch)
}

/// [`linen_meant_to_fail`], run by the command `wrapper` (`setpriv` with its options, say).
pub fn linen_meant_to_fail_under(wrapper: &[&str], scratch: &Path) -> Command {
    let mut c = Command::new("timeout");
    // None of the environment's settings (an etcd endpoint, masquerading, a healthz port…).
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("LINEN_") || name.starts_with("FLANNELD_") {
            c.env_remove(name.as_ref());
        }
    }
    c.args(["--kill-after=5", "60"])
        .args(wrapper)
        .arg(LINEN)
        .env("LINEN_REGISTRY_DIR", scratch.join("registry"))
        .env("LINEN_SUBNET_FILE", scratch.join("subnet.env"))
        .env("LINEN_TUN", "lnfail0")
        .env("LINEN_METRICS_ADDR", "off");
    c
}

/// Says that a test was skipped and why, on the real stderr: libtest captures `eprintln!`
/// output of passing tests, but not writes to the stderr handle, so the message stays visible.
/// With `LINEN_TEST_REQUIRE_ALL=1` (set by CI, which runs as root with etcd installed) a skip
/// is a failure instead: a test that did not run must not look green.
pub fn skipped(why: &str) {
    if std::env::var_os("LINEN_TEST_REQUIRE_ALL").is_some_and(|v| v == "1") {
        panic!("{why}, and LINEN_TEST_REQUIRE_ALL=1 forbids skipping");
    }
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {why}");
}

/// Whether to skip a namespace test (not root); says so on stderr.
pub fn skip() -> bool {
    if !linen::lab::is_root() {
        skipped("network-namespace tests need root");
        return true;
    }
    false
}

/// Waits for a helper script's first line on its (piped) stdout, which must be `ready`.
pub fn wait_ready(child: &mut Child) {
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().expect("piped stdout")),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "ready");
}

/// A process a test started outside a `Lab` (a receiving script, a second daemon). If the test
/// fails before waiting for it, dropping it kills it (by its PID: we started it) and reaps it, so
/// it does not outlive the test and pin a deleted namespace. Derefs to the [`Child`].
pub struct Helper(Option<Child>);

impl Helper {
    /// Spawns `cmd`; panics with the command line if that fails.
    pub fn spawn(cmd: &mut Command) -> Helper {
        match cmd.spawn() {
            Ok(child) => Helper(Some(child)),
            Err(e) => panic!("cannot start {cmd:?}: {e}"),
        }
    }

    /// Waits for it to exit and collects its piped output, as [`Child::wait_with_output`].
    pub fn wait_with_output(mut self) -> Output {
        let child = self.0.take().expect("taken only here");
        child.wait_with_output().expect("wait for a helper")
    }
}

impl From<Child> for Helper {
    fn from(child: Child) -> Helper {
        Helper(Some(child))
    }
}

impl Deref for Helper {
    type Target = Child;
    fn deref(&self) -> &Child {
        self.0.as_ref().expect("taken only by wait_with_output")
    }
}

impl DerefMut for Helper {
    fn deref_mut(&mut self) -> &mut Child {
        self.0.as_mut().expect("taken only by wait_with_output")
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

/// `linen network init --registry-dir DIR --network 198.19.0.0/16 --ipv6-network fd00:19::/48`.
pub fn network_init(dir: &Path) {
    admin(
        dir,
        &[
            "network",
            "init",
            "--network",
            "198.19.0.0/16",
            "--ipv6-network",
            "fd00:19::/48",
        ],
    );
}

/// Runs the admin command `linen ARGS --registry-dir DIR`, which must succeed; its stdout.
pub fn admin(dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new(LINEN)
        .args(args)
        .arg("--registry-dir")
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "linen {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Whether the running kernel is at least `major.minor` (the daemon's own reading of
/// /proc/sys/kernel/osrelease; an unreadable one counts as older).
pub fn kernel_at_least(major: u32, minor: u32) -> bool {
    linen::daemon::host::kernel_version().is_some_and(|(a, b, _)| (a, b) >= (major, minor))
}

/// Whether this kernel's UDP GSO is one `--udp-gso auto` does without (Linux 7.0.0–7.1.4).
pub fn udp_gso_distrusted() -> bool {
    linen::daemon::host::kernel_version().is_some_and(linen::daemon::host::udp_gso_may_corrupt)
}
