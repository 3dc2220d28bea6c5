//! `linen demo` end to end: a full run reports every pair and both throughput figures, and a run
//! interrupted by SIGINT removes its namespaces and processes; so does an interrupted `linen
//! bench`. Root only; skipped otherwise.

mod common;
use common::{LINEN, skip};

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Namespaces and processes (other than the demo itself) that still carry the demo's lab
/// prefix `lndemo-<pid>-`: every namespace and every `linen run` it starts has it in its name
/// or command line (the registry directory).
fn leftovers(demo_pid: u32) -> Vec<String> {
    leftovers_of("lndemo", demo_pid)
}

/// [`leftovers`] of a lab named `lab` (`lndemo`, `lnbench`) built by process `demo_pid`.
fn leftovers_of(lab: &str, demo_pid: u32) -> Vec<String> {
    let tag = format!("{lab}-{demo_pid}-");
    // No panics in here: `Sweep` calls this while a failed test unwinds.
    let netns = Command::new("ip").args(["netns", "list"]).output();
    let mut found: Vec<String> =
        String::from_utf8_lossy(&netns.map(|o| o.stdout).unwrap_or_default())
            .lines()
            .filter(|l| l.contains(&tag))
            .map(|l| format!("namespace {l}"))
            .collect();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if pid != demo_pid && cmdline.contains(&tag) {
            found.push(format!("process {pid}: {cmdline}"));
        }
    }
    if std::path::Path::new(&std::env::temp_dir())
        .read_dir()
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with(&tag))
    {
        found.push(format!(
            "directory {}/{tag}*",
            std::env::temp_dir().display()
        ));
    }
    found
}

/// Removes what a lab named `lab` built by process `pid` left behind, when the test ends (it
/// found nothing, or it failed because of what it found): `linen run` processes by their PID
/// (started, through the program under test, by this test), then namespaces and directories.
struct Sweep(&'static str, u32);

impl Drop for Sweep {
    fn drop(&mut self) {
        let tag = format!("{}-{}-", self.0, self.1);
        for line in leftovers_of(self.0, self.1) {
            if let Some(pid) = line
                .strip_prefix("process ")
                .and_then(|l| l.split(':').next())
            {
                let _ = Command::new("kill").arg(pid).status();
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        for line in leftovers_of(self.0, self.1) {
            if let Some(ns) = line.strip_prefix("namespace ") {
                let ns = ns.split_whitespace().next().unwrap_or_default();
                let _ = Command::new("ip").args(["netns", "del", ns]).status();
            }
        }
        for e in std::env::temp_dir()
            .read_dir()
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.file_name().to_string_lossy().starts_with(&tag) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Sends SIGINT to `child` (by its PID: we started it) and waits up to 30 s for it to exit.
fn interrupt(child: &mut Child) -> Option<std::process::ExitStatus> {
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    wait_exit(child, Duration::from_secs(30))
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    None
}

/// "linen 1.23 Gbit/s, kernel VXLAN 4.56 Gbit/s" → (1.23, 4.56).
fn throughput(report: &str) -> Option<(f64, f64)> {
    // The first occurrence of `marker` followed by a number.
    let number_before = |marker: &str| -> Option<f64> {
        report.match_indices(marker).find_map(|(i, _)| {
            report[i + marker.len()..]
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
    };
    Some((number_before("linen ")?, number_before("kernel VXLAN ")?))
}

#[test]
fn full_demo_pings_every_pair_and_reports_both_throughputs() {
    if skip() {
        return;
    }
    let child = Command::new(LINEN)
        .args(["demo", "--seconds", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let _sweep = Sweep("lndemo", pid);
    // A demo that hangs is interrupted after 4 minutes (it then cleans up and exits 130; one
    // that does not is killed 30 s later, leaving its namespaces to the sweep), rather than
    // holding the suite until its overall timeout kills everything. `done` follows the
    // reaping at once, so the pid is the demo's whenever a signal can go, but for that
    // instant.
    let (done, finished) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        for (wait, signal) in [(240, "-INT"), (30, "-KILL")] {
            let timed_out = matches!(
                finished.recv_timeout(Duration::from_secs(wait)),
                Err(mpsc::RecvTimeoutError::Timeout)
            );
            if !timed_out {
                return;
            }
            let _ = Command::new("kill")
                .args([signal, &pid.to_string()])
                .status();
        }
    });
    let out = child.wait_with_output().unwrap();
    let _ = done.send(());
    let _ = watchdog.join();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for a in 1..=3 {
        for b in 1..=3 {
            if a == b {
                continue;
            }
            let line = stdout
                .lines()
                .find(|l| l.contains(&format!("h{a} → h{b} ")))
                .unwrap_or_else(|| panic!("no line for h{a} → h{b}:\n{stdout}"));
            assert!(
                line.contains("IPv4 OK") && line.contains("IPv6 OK"),
                "{line}"
            );
        }
    }
    assert!(
        stdout.contains("IPv4 6/6 pairs OK, IPv6 6/6 pairs OK"),
        "{stdout}"
    );
    let (linen, vxlan) = throughput(&stdout).unwrap_or_else(|| panic!("{stdout}"));
    assert!(linen > 0.0 && vxlan > 0.0, "{stdout}");
    assert!(stdout.contains("result      OK"), "{stdout}");
    assert_eq!(leftovers(pid), Vec::<String>::new());
}

#[test]
fn sigint_mid_demo_removes_namespaces_and_processes() {
    if skip() {
        return;
    }
    let mut child = Command::new(LINEN)
        .args(["demo", "--seconds", "3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let _sweep = Sweep("lndemo", pid);
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            all.push_str(&line);
            all.push('\n');
            let _ = tx.send(line);
        }
        all
    });
    // Interrupt once all three daemons run and the pings have begun.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut reached = false;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("h1 → h2") => {
                reached = true;
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let running_before = leftovers(pid);
    let status = interrupt(&mut child);
    let stdout = reader.join().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(
        reached,
        "the demo never reached the pings:\n{stdout}\n{stderr}"
    );
    assert!(
        running_before
            .iter()
            .filter(|l| l.contains("run --registry-dir"))
            .count()
            >= 3,
        "three linen daemons should have been running: {running_before:#?}"
    );
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(130),
        "{stdout}\n{stderr}"
    );
    assert!(stdout.contains("interrupted"), "{stdout}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert_eq!(leftovers(pid), Vec::<String>::new(), "{stdout}");
}

#[test]
fn sigint_mid_bench_removes_namespaces_and_processes() {
    if skip() {
        return;
    }
    // Output to files, not pipes: daemons left running would hold a pipe open forever.
    let dir = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = Command::new(LINEN)
        .args(["bench", "--paths", "linen", "--runs", "3", "--seconds", "2"])
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id();
    let _sweep = Sweep("lnbench", pid);
    // Interrupt once both daemons run (the measurements have begun). Counted by command line:
    // a daemon's child between fork and exec (it runs iptables) shows the daemon's for a moment.
    let daemons = |list: &[String]| {
        list.iter()
            .filter(|l| l.contains("run --registry-dir"))
            .filter_map(|l| l.split_once(": ").map(|(_, cmd)| cmd.to_owned()))
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut running_before = leftovers_of("lnbench", pid);
    while daemons(&running_before) < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        running_before = leftovers_of("lnbench", pid);
    }
    let status = interrupt(&mut child);
    let stdout = std::fs::read_to_string(&out_path).unwrap();
    let stderr = std::fs::read_to_string(&err_path).unwrap();
    assert_eq!(
        daemons(&running_before),
        2,
        "two linen daemons should have been running: {running_before:#?}\n{stderr}"
    );
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(130),
        "{stdout}\n{stderr}"
    );
    assert!(
        stderr.contains("everything linen bench created has been removed"),
        "{stderr}"
    );
    assert_eq!(
        leftovers_of("lnbench", pid),
        Vec::<String>::new(),
        "{stderr}"
    );
}

/// Output to pipes nobody reads any more (`linen bench | head`, once `head` has exited) does
/// not end the bench half-way: its lines are dropped, it runs to the end and removes what it
/// built. The std print macros panic on a closed pipe, and the release build aborts on a panic,
/// which left the namespaces behind.
#[test]
fn a_closed_output_does_not_stop_the_bench_half_way() {
    if skip() {
        return;
    }
    let mut child = Command::new(LINEN)
        .args(["bench", "--paths", "linen", "--runs", "1", "--seconds", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let _sweep = Sweep("lnbench", pid);
    // Closed before it has written anything.
    drop(child.stdout.take());
    drop(child.stderr.take());
    let status = wait_exit(&mut child, Duration::from_secs(180));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "the bench did not run to its end"
    );
    assert_eq!(leftovers_of("lnbench", pid), Vec::<String>::new());
}
