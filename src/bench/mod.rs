//! `linen bench`: the namespace benchmark. Builds two test hosts joined by veth and measures,
//! in one run and between the same namespaces, the raw veth, kernel VXLAN and linen: TCP with 1
//! and 4 streams (iperf3), the 64-byte UDP packet rate and loss, ping average and p99, and
//! CPU-seconds per GB. Prints medians and ratios; on a shared machine the ratios are what count.

mod counters;
pub mod interrupt;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use serde_json::Value;

use crate::bench::interrupt::{esayln, sayln};
use crate::cli::exit::usage;
use crate::lab::{Host, Lab, is_root, wait_for};
use crate::model::{SubnetEnv, SubnetKey};

/// Flags of `linen bench`.
#[derive(Clone, Debug, Args)]
pub struct BenchArgs {
    /// Rounds: in each, every measurement is taken on every path in turn (the median of the
    /// rounds is reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Seconds per iperf3 measurement.
    #[arg(long, default_value_t = 4)]
    pub seconds: u32,
    /// Paths to measure, comma-separated: veth, vxlan, linen.
    #[arg(long, value_delimiter = ',', default_value = "veth,vxlan,linen")]
    pub paths: Vec<String>,
    /// Extra flags for `linen run` (e.g. `--no-offload`, `--workers=1`), space-separated.
    #[arg(long, default_value = "")]
    pub linen_flags: String,
    /// Write the results as JSON to this file too: per path the medians and, under
    /// `rounds`, each round's figures (`null` where one was not measured).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Socket buffer for the 64-byte UDP runs on every path (iperf3 `-w`, e.g. `2M`); the
    /// default is the kernel's (about 210 KiB, some 240 small datagrams). A diagnostic: on a
    /// shared 2-core machine, loss at the receiving program's socket then depends less on when
    /// the scheduler runs it. iperf3 refuses sizes above `net.core.rmem_max`/`wmem_max`.
    #[arg(long, value_name = "SIZE")]
    pub udp_window: Option<String>,
}

/// One path's medians.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Results {
    /// Path name.
    pub path: String,
    /// TCP, one stream, Gbit/s.
    pub tcp1_gbps: f64,
    /// TCP retransmits during the single-stream run.
    pub tcp1_retransmits: f64,
    /// TCP, four streams, Gbit/s.
    pub tcp4_gbps: f64,
    /// TCP retransmits during the four-stream run (flows spread over workers must not be
    /// reordered).
    pub tcp4_retransmits: f64,
    /// 64-byte UDP datagrams received per second.
    pub udp64_pps: f64,
    /// 64-byte UDP loss, percent.
    pub udp64_loss_pct: f64,
    /// Ping average, microseconds.
    pub ping_avg_us: f64,
    /// Ping 99th percentile, microseconds.
    pub ping_p99_us: f64,
    /// Machine CPU-seconds per GB received during the single-stream TCP run.
    pub cpu_s_per_gb: f64,
    /// Peak resident memory of one linen daemon over the whole run, MiB (linen only).
    pub peak_rss_mib: f64,
    /// Each round's figures, whose medians the fields above are (`--json` only).
    pub rounds: Samples,
}

/// What the benchmark calls itself in [`Interrupted`](interrupt::Interrupted).
const WHAT: &str = "linen bench";

/// Runs the benchmark on a blocking thread; SIGINT/SIGTERM stop it between measurements and
/// remove the namespaces, daemons and files it created.
pub async fn run(args: BenchArgs) -> Result<()> {
    interrupt::run_interruptible(WHAT, move |stop| run_blocking(&args, stop)).await
}

fn run_blocking(args: &BenchArgs, stop: &AtomicBool) -> Result<()> {
    if let Some(other) = args
        .paths
        .iter()
        .find(|p| !["veth", "vxlan", "linen"].contains(&p.as_str()))
    {
        return Err(usage(format!(
            "--paths: unknown path {other:?}; use veth, vxlan or linen"
        )));
    }
    if let Some(twice) = args
        .paths
        .iter()
        .enumerate()
        .find_map(|(i, p)| args.paths[..i].contains(p).then_some(p))
    {
        return Err(usage(format!(
            "--paths names {twice:?} twice; name each path once (the runs repeat them)"
        )));
    }
    if args.runs == 0 {
        return Err(usage(
            "--runs 0 measures nothing; use 1 or more (3 or more for medians)",
        ));
    }
    require_root_and_tools("linen bench")?;
    let mut lab = Lab::new("lnbench", 2, 1500)?;
    // The release build aborts on a panic, dropping nothing: a hook removes the lab then.
    lab.remove_on_panic();
    // Every path is set up first and stays up, so that each measurement is taken on all paths
    // one after the other: a machine that gets slower or faster during the run (a shared VM
    // does) then moves a path and its baselines together, not the path measured last alone.
    let mut paths = Vec::new();
    let mut linen_pids = Vec::new();
    let mut vxlan_up = false;
    let measured = (|| -> Result<Vec<Samples>> {
        for path in &args.paths {
            interrupt::check(stop, WHAT)?;
            esayln!("bench: setting up {path}…");
            let target = match path.as_str() {
                "veth" => lab.host(1).ip.to_string(),
                "vxlan" => {
                    vxlan_up = true;
                    setup_vxlan(&lab)?;
                    VXLAN_TARGET.to_owned()
                }
                _ => {
                    let flags: Vec<&str> = args.linen_flags.split_whitespace().collect();
                    let (pids, target) = start_linen(&mut lab, &flags)?;
                    linen_pids = pids;
                    target
                }
            };
            paths.push((path.as_str(), target));
        }
        measure(&mut lab, &paths, args, stop)
    })();
    // Read before the daemons stop: the peak over the whole run, the idle phases included.
    let rss = linen_pids
        .iter()
        .filter_map(|&p| peak_rss_kib(p))
        .max()
        .unwrap_or(0);
    for &pid in &linen_pids {
        lab.stop(pid, Duration::from_secs(5));
    }
    if vxlan_up {
        teardown_vxlan(&lab);
    }
    let all: Vec<Results> = paths
        .iter()
        .zip(measured?)
        .map(|((name, _), samples)| {
            let mut r = samples.medians(name);
            if *name == "linen" {
                r.peak_rss_mib = rss as f64 / 1024.0;
            }
            r
        })
        .collect();
    print_table(&all);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&all)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Fails with what to install unless this runs as root with `iperf3`, `ping` and `ip` present.
pub(crate) fn require_root_and_tools(what: &str) -> Result<()> {
    if !is_root() {
        bail!("{what} builds network namespaces and needs root; run it with sudo");
    }
    for tool in ["iperf3", "ping", "ip"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()?
            .code()
            != Some(0)
        {
            bail!(
                "{what} needs `{tool}`; install it (apt-get install iperf3 iputils-ping iproute2)"
            );
        }
    }
    Ok(())
}

/// Joins hosts 1 and 2 of the lab with kernel VXLAN (`vx0`, 198.19.200.<i>/24, VNI 42) and
/// waits until host 1 pings 198.19.200.2.
pub(crate) fn setup_vxlan(lab: &Lab) -> Result<()> {
    for i in 0..2 {
        let (h, other) = (lab.host(i), lab.host(1 - i));
        h.ip(&[
            "link",
            "add",
            "vx0",
            "type",
            "vxlan",
            "id",
            "42",
            "local",
            &h.ip.to_string(),
            "remote",
            &other.ip.to_string(),
            "dstport",
            "4789",
            "dev",
            "eth0",
        ])?;
        h.ip(&[
            "addr",
            "add",
            &format!("198.19.200.{}/24", h.index),
            "dev",
            "vx0",
        ])?;
        h.ip(&["link", "set", "vx0", "up"])?;
    }
    wait_for(Duration::from_secs(5), || {
        pings(lab.host(0), "198.19.200.2").then_some(())
    })
    .ok_or_else(|| anyhow!("VXLAN baseline does not ping"))
}

/// Host 2's VXLAN address once [`setup_vxlan`] succeeded.
pub(crate) const VXLAN_TARGET: &str = "198.19.200.2";

/// Removes what [`setup_vxlan`] added.
pub(crate) fn teardown_vxlan(lab: &Lab) {
    for h in &lab.hosts()[..2] {
        let _ = h.ip(&["link", "del", "vx0"]);
    }
}

/// One `ping -c1 -W1` from `host`; whether it got an answer.
pub(crate) fn pings(host: &Host, target: &str) -> bool {
    ping_once(host, target).is_some()
}

/// One `ping -c1 -W1` from `host` (IPv6 targets get `-6`); the round trip in milliseconds when
/// it was answered.
pub(crate) fn ping_once(host: &Host, target: &str) -> Option<f64> {
    let family = if target.contains(':') { "-6" } else { "-4" };
    let out = host.run("ping", &[family, "-c1", "-W1", target]).ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let ms = text
        .split("time=")
        .nth(1)
        .and_then(|t| t.split_whitespace().next()?.parse().ok());
    Some(ms.unwrap_or(0.0))
}

/// Writes the demo/bench network config (198.19.0.0/16, plus `extra` flags such as
/// `--ipv6-network`) into a directory registry with `linen network init`. Leases end at
/// 198.19.199.0/24: the kernel VXLAN baseline's 198.19.200.0/24 ([`setup_vxlan`]) runs beside
/// the daemons and must not be a host's subnet too.
pub(crate) fn init_network(dir: &Path, extra: &[&str]) -> Result<()> {
    let out = Command::new(std::env::current_exe()?)
        .args(["network", "init", "--registry-dir"])
        .arg(dir)
        .args(["--network", "198.19.0.0/16", "--subnet-max", "198.19.199.0"])
        .args(extra)
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!(
            "linen network init failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Where host `index` (1-based) writes its subnet.env inside the registry directory.
pub(crate) fn subnet_file(dir: &Path, index: u8) -> PathBuf {
    dir.join(format!("h{index}.env"))
}

/// Starts `linen run` on host `i` (0-based) with the directory registry `dir`; its subnet.env
/// goes to [`subnet_file`] and its log (stderr) to `log` when given. Returns the PID.
pub(crate) fn spawn_linen(
    lab: &mut Lab,
    i: usize,
    dir: &Path,
    flags: &[&str],
    log: Option<std::fs::File>,
) -> Result<u32> {
    let exe = std::env::current_exe()?;
    let h = lab.host(i).clone();
    let mut cmd = h.command(&exe.to_string_lossy());
    cmd.args(["run", "--registry-dir"])
        .arg(dir)
        .args(["--iface", "eth0", "--subnet-file"])
        .arg(subnet_file(dir, h.index))
        .args(
            (!flags.iter().any(|f| f.starts_with("--log-level")))
                .then_some(["--log-level", "warn"])
                .into_iter()
                .flatten(),
        )
        .args(flags)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    if let Some(f) = log {
        cmd.stderr(f);
    }
    Ok(lab.spawn(cmd, &format!("linen-{}", h.index))?)
}

/// The lease a host's daemon wrote into its subnet.env, once it is there.
pub(crate) fn read_lease(env_path: &Path) -> Option<SubnetKey> {
    let text = std::fs::read_to_string(env_path).ok()?;
    SubnetEnv::parse(&text).ok()?.previous_key()
}

/// Starts `linen run` on both hosts with a shared directory registry; returns the PIDs and the
/// second host's overlay address.
fn start_linen(lab: &mut Lab, flags: &[&str]) -> Result<(Vec<u32>, String)> {
    let dir = lab.scratch_dir()?.join("registry");
    init_network(&dir, &[])?;
    let mut pids = Vec::new();
    for i in 0..2 {
        pids.push(spawn_linen(lab, i, &dir, flags, None)?);
    }
    // Host 2's overlay address: the network address of its lease, from its subnet.env.
    let env_path = subnet_file(&dir, 2);
    let target = wait_for(Duration::from_secs(10), || {
        Some(read_lease(&env_path)?.ipv4()?.network().to_string())
    })
    .ok_or_else(|| anyhow!("linen on host 2 did not write its subnet.env within 10 s"))?;
    wait_for(Duration::from_secs(10), || {
        pings(lab.host(0), &target).then_some(())
    })
    .ok_or_else(|| anyhow!("linen overlay does not ping {target} within 10 s"))?;
    Ok((pids, target))
}

/// The median of the figures that were measured (NaN marks one that was not); NaN when none
/// was.
fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| !x.is_nan());
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// One path's measurements, one entry per round, in the units and under the names of
/// [`Results`]; in the JSON a figure that was not measured is `null`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Samples {
    #[serde(rename = "tcp1_gbps")]
    tcp1: Vec<f64>,
    #[serde(rename = "tcp1_retransmits")]
    retr: Vec<f64>,
    #[serde(rename = "tcp4_gbps")]
    tcp4: Vec<f64>,
    #[serde(rename = "tcp4_retransmits")]
    retr4: Vec<f64>,
    #[serde(rename = "udp64_pps")]
    pps: Vec<f64>,
    #[serde(rename = "udp64_loss_pct")]
    loss: Vec<f64>,
    #[serde(rename = "ping_avg_us")]
    avg: Vec<f64>,
    #[serde(rename = "ping_p99_us")]
    p99: Vec<f64>,
    #[serde(rename = "cpu_s_per_gb")]
    cpu: Vec<f64>,
    /// The loss and reordering counters that moved during the single-stream run (see
    /// [`counters`]).
    tcp1_counters_moved: Vec<counters::Reading>,
    /// The same for the four-stream run.
    tcp4_counters_moved: Vec<counters::Reading>,
}

impl Samples {
    /// Round `run`'s figures (the last taken), in one line.
    fn last_round(&self, run: usize) -> String {
        let at = |v: &[f64], decimals: usize| match v.get(run) {
            Some(x) => format!("{x:.decimals$}"),
            None => "-".to_owned(),
        };
        format!(
            "TCP 1 stream {} Gbit/s ({} retransmits), 4 streams {} Gbit/s ({}), 64 B {} kpps \
             ({} % loss), ping {} µs (p99 {}), {} CPU-s per GB",
            at(&self.tcp1, 2),
            at(&self.retr, 0),
            at(&self.tcp4, 2),
            at(&self.retr4, 0),
            self.pps
                .get(run)
                .map_or("-".to_owned(), |x| format!("{:.1}", x / 1000.0)),
            at(&self.loss, 2),
            at(&self.avg, 0),
            at(&self.p99, 0),
            at(&self.cpu, 2),
        )
    }

    fn medians(self, name: &str) -> Results {
        Results {
            path: name.to_owned(),
            tcp1_gbps: median(self.tcp1.clone()),
            tcp1_retransmits: median(self.retr.clone()),
            tcp4_gbps: median(self.tcp4.clone()),
            tcp4_retransmits: median(self.retr4.clone()),
            udp64_pps: median(self.pps.clone()),
            udp64_loss_pct: median(self.loss.clone()),
            ping_avg_us: median(self.avg.clone()),
            ping_p99_us: median(self.p99.clone()),
            cpu_s_per_gb: median(self.cpu.clone()),
            peak_rss_mib: 0.0,
            rounds: self,
        }
    }
}

/// `args.runs` rounds; in each, every measurement is taken on every path in turn (`paths`:
/// name and target), so a path and its baselines are measured seconds apart. The order of the
/// paths rotates from round to round: none is always the first after a pause, or always
/// right after linen's.
fn measure(
    lab: &mut Lab,
    paths: &[(&str, String)],
    args: &BenchArgs,
    stop: &AtomicBool,
) -> Result<Vec<Samples>> {
    let check = || interrupt::check(stop, WHAT);
    let mut all: Vec<Samples> = paths.iter().map(|_| Samples::default()).collect();
    let secs = args.seconds.to_string();
    for run in 0..args.runs {
        let order = round_order(paths.len(), run);
        let names: Vec<&str> = order.iter().map(|&i| paths[i].0).collect();
        esayln!(
            "bench: run {} of {} ({} s per iperf3 measurement): {}…",
            run + 1,
            args.runs,
            args.seconds,
            names.join(", ")
        );
        for &i in &order {
            check()?;
            let counted = Counted::start(lab);
            let before = cpu_jiffies()?;
            let j = iperf(lab, &paths[i].1, &["-t", &secs])?;
            let after = cpu_jiffies()?;
            let s = &mut all[i];
            let bytes = j["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
            s.tcp1.push(received_gbps(&j));
            s.retr.push(retransmits(&j));
            // USER_HZ is 100 on Linux. NaN: nothing arrived to divide by.
            s.cpu.push(if bytes > 0.0 {
                (after - before) as f64 / 100.0 / (bytes / 1e9)
            } else {
                f64::NAN
            });
            let moved = counted.finish(lab, paths[i].0, "1 stream", retransmits(&j));
            all[i].tcp1_counters_moved.push(moved);
        }
        for &i in &order {
            check()?;
            let counted = Counted::start(lab);
            let j = iperf(lab, &paths[i].1, &["-t", &secs, "-P", "4"])?;
            all[i].tcp4.push(received_gbps(&j));
            all[i].retr4.push(retransmits(&j));
            let moved = counted.finish(lab, paths[i].0, "4 streams", retransmits(&j));
            all[i].tcp4_counters_moved.push(moved);
        }
        for &i in &order {
            check()?;
            let (rate, lost) =
                udp_rate(lab, &paths[i].1, &secs, args.udp_window.as_deref(), &check)?;
            all[i].pps.push(rate);
            all[i].loss.push(lost);
        }
        for &i in &order {
            check()?;
            let (a, p) = ping(lab.host(0), &paths[i].1)?;
            all[i].avg.push(a);
            all[i].p99.push(p);
        }
        // Each round's figures as they come: the table gives only medians, and the spread
        // between rounds is what says how far to trust them.
        for &i in &order {
            esayln!("bench:   {:<5} {}", paths[i].0, all[i].last_round(run));
        }
    }
    Ok(all)
}

/// The kernel's loss and reordering counters of both hosts around one TCP measurement.
struct Counted(Result<counters::Reading>);

impl Counted {
    fn start(lab: &Lab) -> Counted {
        Counted(Counted::read(lab))
    }

    fn read(lab: &Lab) -> Result<counters::Reading> {
        counters::read(&[lab.host(0), lab.host(1)])
    }

    /// The counters that moved since [`Counted::start`]; when the run had retransmits, they
    /// go to stderr too, as where the segments were lost or whether they were reordered.
    /// Counters that cannot be read cost the run nothing: the measurement stands, stderr
    /// says why they are missing.
    fn finish(self, lab: &Lab, path: &str, run: &str, retransmits: f64) -> counters::Reading {
        let moved = self
            .0
            .and_then(|before| Ok(counters::moved(&before, &Counted::read(lab)?)));
        // A failed reading is said whatever the run: in `--json` it looks like "nothing moved".
        if retransmits > 0.0 || moved.is_err() {
            let what = match &moved {
                Ok(m) if m.is_empty() => "no loss or reordering counter moved".to_owned(),
                Ok(m) => format!("counters that moved: {}", counters::describe(m)),
                Err(e) => format!("counters not read: {e:#}"),
            };
            esayln!("bench:   {path:<5} TCP {run}: {retransmits} retransmits; {what}");
        }
        moved.unwrap_or_default()
    }
}

/// The order in which round `run` (from 0) measures `paths` paths: the given order, rotated by
/// one more each round, so that over `paths` rounds each path comes first once.
fn round_order(paths: usize, run: usize) -> Vec<usize> {
    (0..paths).map(|i| (i + run) % paths).collect()
}

/// The sender's TCP retransmits of an iperf3 run; NaN (shown as such) if iperf3 did not report
/// them, rather than a 0 that would read as "nothing reordered".
fn retransmits(j: &Value) -> f64 {
    j["end"]["sum_sent"]["retransmits"]
        .as_f64()
        .unwrap_or(f64::NAN)
}

/// A process's peak resident set (`VmHWM`), KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// One 64-byte UDP run at `bps` offered (0 = unlimited): (received datagrams/s, loss %).
fn udp_run(
    lab: &mut Lab,
    target: &str,
    secs: &str,
    bps: u64,
    window: Option<&str>,
) -> Result<(f64, f64)> {
    let b = bps.to_string();
    let mut args = vec!["-t", secs, "-u", "-l", "64", "-b", &b];
    if let Some(w) = window {
        args.extend(["-w", w]);
    }
    let j = iperf(lab, target, &args)?;
    let sum = &j["end"]["sum"];
    let packets = sum["packets"].as_f64().unwrap_or(0.0);
    let lost = sum["lost_packets"].as_f64().unwrap_or(0.0);
    let seconds = sum["seconds"].as_f64().unwrap_or(1.0).max(0.001);
    Ok((
        (packets - lost).max(0.0) / seconds,
        sum["lost_percent"].as_f64().unwrap_or(100.0),
    ))
}

/// Most loss a 64-byte UDP rate may have to count (the throughput issue's bar).
const UDP_MAX_LOSS_PCT: f64 = 5.0;

/// The 64-byte UDP packet rate a path carries with less than [`UDP_MAX_LOSS_PCT`] loss (see
/// [`search_udp_rate`]). Returns (received datagrams/s, loss %) of the run it settled on.
fn udp_rate(
    lab: &mut Lab,
    target: &str,
    secs: &str,
    window: Option<&str>,
    check: &dyn Fn() -> Result<()>,
) -> Result<(f64, f64)> {
    search_udp_rate(|pps| {
        check()?;
        // iperf3's -b counts payload bits: 64 bytes per datagram.
        udp_run(lab, target, secs, (pps * 64.0 * 8.0) as u64, window)
    })
}

/// Finds the highest rate `run` (offered datagrams/s, 0 for unlimited → received datagrams/s,
/// loss %) carries with less than [`UDP_MAX_LOSS_PCT`] loss: first an unlimited run finds what
/// arrives at saturation, then offered rates step down from there (×0.85, at most 7 steps)
/// until the loss is under the bar, then two halvings between that rate and the one above it
/// that lost too much narrow the 15 % step to about 4 %. Returns the passing run that received
/// most, or the last run when none passed.
fn search_udp_rate(mut run: impl FnMut(f64) -> Result<(f64, f64)>) -> Result<(f64, f64)> {
    let (saturated, loss) = run(0.0)?;
    if loss < UDP_MAX_LOSS_PCT {
        return Ok((saturated, loss));
    }
    let mut offered = saturated;
    let mut last = (saturated, loss);
    // The lowest offered rate that lost too much (none while only the unlimited run did).
    let mut failed = None;
    let mut passed = None;
    for _ in 0..7 {
        last = run(offered)?;
        if last.1 < UDP_MAX_LOSS_PCT {
            passed = Some(offered);
            break;
        }
        failed = Some(offered);
        offered *= 0.85;
    }
    let (Some(mut ok), Some(mut bad)) = (passed, failed) else {
        return Ok(last);
    };
    let mut best = last;
    for _ in 0..2 {
        let mid = (ok + bad) / 2.0;
        let r = run(mid)?;
        if r.1 < UDP_MAX_LOSS_PCT {
            ok = mid;
            if r.0 > best.0 {
                best = r;
            }
        } else {
            bad = mid;
        }
    }
    Ok(best)
}

/// Busy jiffies of the whole machine (all CPUs), from /proc/stat.
fn cpu_jiffies() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .next()
        .ok_or_else(|| anyhow!("empty /proc/stat"))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal …: busy = all − idle − iowait.
    let total: u64 = v.iter().take(8).sum();
    Ok(total - v.get(3).copied().unwrap_or(0) - v.get(4).copied().unwrap_or(0))
}

/// Gbit/s the receiver counted in an iperf3 TCP result.
pub(crate) fn received_gbps(j: &Value) -> f64 {
    j["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9
}

/// Runs one iperf3 client on host 1 against a one-off server on host 2 (reached at `target`);
/// returns iperf3's JSON result.
pub(crate) fn iperf(lab: &mut Lab, target: &str, client_args: &[&str]) -> Result<Value> {
    let server_host = lab.host(1).clone();
    let mut server = server_host.command("iperf3");
    server
        .args(["-s", "-1", "-p", "5201"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let pid = lab.spawn(server, "iperf3-server")?;
    // Wait until the server listens.
    wait_for(Duration::from_secs(5), || {
        let out = server_host.run("ss", &["-Hltn", "sport = :5201"]).ok()?;
        (!out.stdout.is_empty()).then_some(())
    });
    let mut args = vec!["-c", target, "-p", "5201", "-J"];
    args.extend_from_slice(client_args);
    let out = lab.host(0).run("iperf3", &args)?;
    lab.stop(pid, Duration::from_secs(2));
    let j: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 {args:?} printed no JSON"))?;
    if let Some(e) = j.get("error").and_then(Value::as_str) {
        bail!("iperf3 {args:?}: {e}");
    }
    Ok(j)
}

/// 200 pings 10 ms apart; returns (average, p99) in microseconds.
fn ping(host: &Host, target: &str) -> Result<(f64, f64)> {
    let out = host.run("ping", &["-c", "200", "-i", "0.01", "-W", "1", target])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut times: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse::<f64>().ok())
        .map(|ms| ms * 1000.0)
        .collect();
    if times.is_empty() {
        bail!("ping {target} got no replies");
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let avg = times.iter().sum::<f64>() / times.len() as f64;
    let p99 = times[(times.len() * 99 / 100).min(times.len() - 1)];
    Ok((avg, p99))
}

/// The median over the rounds of `a[i] / b[i]`: each round's linen figure against the
/// baseline measured seconds apart in the same round, so drift between rounds cancels out.
/// Rounds where either figure is missing or the baseline is 0 are left out; NaN when none is
/// left.
fn paired_ratio(a: &[f64], b: &[f64]) -> f64 {
    median(
        a.iter()
            .zip(b)
            .map(|(&a, &b)| if b == 0.0 { f64::NAN } else { a / b })
            .collect(),
    )
}

fn print_table(all: &[Results]) {
    let get = |name: &str| all.iter().find(|r| r.path == name);
    let (veth, vxlan, linen) = (get("veth"), get("vxlan"), get("linen"));
    /// A row: its label, the decimals it is printed with, how it is read from a path's
    /// results, and its rounds (peak RSS has none: it is the daemon's, over the whole run).
    type Metric = (
        &'static str,
        usize,
        fn(&Results) -> f64,
        Option<fn(&Samples) -> &[f64]>,
    );
    #[rustfmt::skip]
    let metrics: [Metric; 10] = [
        ("TCP 1 stream (Gbit/s)", 2, |r| r.tcp1_gbps, Some(|s| &s.tcp1)),
        ("TCP 1 stream retransmits", 0, |r| r.tcp1_retransmits, Some(|s| &s.retr)),
        ("TCP 4 streams (Gbit/s)", 2, |r| r.tcp4_gbps, Some(|s| &s.tcp4)),
        ("TCP 4 streams retransmits", 0, |r| r.tcp4_retransmits, Some(|s| &s.retr4)),
        ("UDP 64 B, <5 % loss (kpps received)", 2, |r| r.udp64_pps / 1000.0, Some(|s| &s.pps)),
        ("UDP 64 B loss at that rate (%)", 2, |r| r.udp64_loss_pct, Some(|s| &s.loss)),
        ("ping avg (µs)", 2, |r| r.ping_avg_us, Some(|s| &s.avg)),
        ("ping p99 (µs)", 0, |r| r.ping_p99_us, Some(|s| &s.p99)),
        ("CPU-s per GB (TCP 1)", 2, |r| r.cpu_s_per_gb, Some(|s| &s.cpu)),
        ("peak RSS of one daemon (MiB)", 2, |r| r.peak_rss_mib, None),
    ];
    sayln!(
        "| metric | veth | vxlan | linen | linen/veth | linen/vxlan | linen/vxlan per round |\n\
         |---|---:|---:|---:|---:|---:|---:|"
    );
    for (label, decimals, f, rounds) in metrics {
        let shown = |r: &&Results| rounds.is_some() || r.path == "linen";
        let (veth, vxlan, linen) = (veth.filter(shown), vxlan.filter(shown), linen.filter(shown));
        let cell = |r: Option<&Results>| {
            r.map(|r| format!("{:.*}", decimals, f(r)))
                .unwrap_or_default()
        };
        let ratio = |a: Option<&Results>, b: Option<&Results>| match (a, b) {
            (Some(a), Some(b)) if f(b) != 0.0 => format!("{:.2}", f(a) / f(b)),
            _ => String::new(),
        };
        let paired = match (linen, vxlan, rounds) {
            (Some(a), Some(b), Some(rounds)) => {
                let r = paired_ratio(rounds(&a.rounds), rounds(&b.rounds));
                if r.is_nan() {
                    String::new()
                } else {
                    format!("{r:.2}")
                }
            }
            _ => String::new(),
        };
        sayln!(
            "| {label} | {} | {} | {} | {} | {} | {paired} |",
            cell(veth),
            cell(vxlan),
            cell(linen),
            ratio(linen, veth),
            ratio(linen, vxlan)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_round_measures_every_path_once_and_each_path_leads_one_round() {
        for paths in 1..=3 {
            let rounds: Vec<Vec<usize>> = (0..paths).map(|r| round_order(paths, r)).collect();
            for order in &rounds {
                let mut sorted = order.clone();
                sorted.sort_unstable();
                assert_eq!(sorted, (0..paths).collect::<Vec<_>>(), "{rounds:?}");
            }
            let mut firsts: Vec<usize> = rounds.iter().map(|o| o[0]).collect();
            firsts.sort_unstable();
            assert_eq!(firsts, (0..paths).collect::<Vec<_>>(), "{rounds:?}");
        }
        assert_eq!(round_order(3, 0), [0, 1, 2]);
        assert_eq!(round_order(3, 4), [1, 2, 0]);
    }

    /// The search on a path that loses `loss(offered)` percent, and is offered `unlimited`
    /// datagrams/s when no rate is set. Returns the rates offered, in order, beside the result.
    fn search_on(unlimited: f64, loss: impl Fn(f64) -> f64) -> (Vec<f64>, (f64, f64)) {
        let mut offered = Vec::new();
        let found = search_udp_rate(|pps| {
            offered.push(pps);
            let pps = if pps == 0.0 { unlimited } else { pps };
            let loss = loss(pps);
            Ok((pps * (1.0 - loss / 100.0), loss))
        })
        .unwrap();
        (offered, found)
    }

    #[test]
    fn the_udp_rate_search_narrows_the_last_step() {
        // Loses 1 % up to 100 k offered, 10 % above.
        let knee = 100_000.0;
        let (offered, (received, loss)) =
            search_on(2.0 * knee, |pps| if pps <= knee { 1.0 } else { 10.0 });
        // Unlimited (180 k arrive); 180 k, 153 k, 130 k and 110.5 k lose 10 %; 93.9 k passes;
        // then 102.2 k loses too much and 98.1 k passes.
        assert_eq!(offered.len(), 1 + 5 + 2, "{offered:?}");
        assert!(loss < UDP_MAX_LOSS_PCT);
        // The steps alone would stop at 93.9 k offered.
        assert!(
            received > 0.95 * knee && received <= knee,
            "{received} from {offered:?}"
        );
    }

    #[test]
    fn the_udp_rate_search_ends_when_nothing_passes_or_saturation_does() {
        // Loses 10 % at every rate: the unlimited run and 7 steps, the last one returned.
        let (offered, (_, loss)) = search_on(1e5, |_| 10.0);
        assert_eq!(offered.len(), 8, "{offered:?}");
        assert_eq!(loss, 10.0);
        // Carries what it is offered: the unlimited run is the answer.
        let (offered, found) = search_on(1e5, |_| 1.0);
        assert_eq!(offered, [0.0]);
        assert_eq!(found, (99_000.0, 1.0));
    }

    #[test]
    fn the_json_holds_each_round_beside_the_medians() {
        let samples = Samples {
            tcp1: vec![9.0, 7.0, 8.0],
            cpu: vec![1.5, f64::NAN, 1.25],
            ..Samples::default()
        };
        let json = serde_json::to_value(samples.medians("linen")).unwrap();
        assert_eq!(json["tcp1_gbps"], 8.0);
        assert_eq!(json["cpu_s_per_gb"], 1.5);
        assert_eq!(
            json["rounds"]["tcp1_gbps"],
            serde_json::json!([9.0, 7.0, 8.0])
        );
        // Not measured in the second round.
        assert_eq!(
            json["rounds"]["cpu_s_per_gb"],
            serde_json::json!([1.5, null, 1.25])
        );
    }

    #[test]
    fn a_paired_ratio_is_the_median_of_each_rounds_ratio() {
        // Ratios 0.5, 4.0 and 1.0 per round: their median, not 3/2 of the medians.
        assert_eq!(paired_ratio(&[1.0, 8.0, 3.0], &[2.0, 2.0, 3.0]), 1.0);
        // A round missing on either side, or with a zero baseline, is left out.
        assert_eq!(
            paired_ratio(&[f64::NAN, 6.0, 1.0, 9.0], &[1.0, 2.0, 0.0, f64::NAN]),
            3.0
        );
        assert!(paired_ratio(&[1.0], &[0.0]).is_nan());
        assert!(paired_ratio(&[], &[]).is_nan());
    }

    #[test]
    fn a_median_leaves_out_what_was_not_measured() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![f64::NAN, 5.0, 1.0, f64::NAN]), 5.0);
        assert_eq!(median(vec![4.0, f64::NAN]), 4.0);
        assert!(median(vec![f64::NAN]).is_nan());
        assert!(median(Vec::new()).is_nan());
    }
}
