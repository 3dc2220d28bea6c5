//! `linen demo` end to end: a full run reports every pair and both throughput figures, and a run
//! interrupted by SIGINT removes its namespaces and processes. Root only; skipped otherwise.

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
    let tag = format!("lndemo-{demo_pid}-");
    let mut found: Vec<String> = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .lines()
    .filter(|l| l.contains(&tag))
    .map(|l| format!("namespace {l}"))
    .collect();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
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
        .unwrap()
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
    let out = child.wait_with_output().unwrap();
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
    assert!(
        Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = wait_exit(&mut child, Duration::from_secs(30));
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
