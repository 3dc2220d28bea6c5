//! `linen demo`: the whole overlay on one machine, for a person to watch. Builds three namespace
//! hosts ([`Lab`]), runs one `linen run` per host on a shared directory registry in a temporary
//! directory, pings every pair over the overlay (IPv4 and IPv6), measures one TCP stream between
//! hosts 1 and 2 over linen and over kernel VXLAN between the same namespaces (the pieces of
//! `linen bench`), prints a short report, and removes everything it created — also on failure
//! and on SIGINT/SIGTERM ([`interrupt`]).

use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use clap::Args;

use crate::bench;
use crate::bench::interrupt::{self, Interrupted, run_interruptible, say, sayln};
use crate::lab::Lab;
use crate::model::SubnetKey;

/// How many hosts the demo builds.
const HOSTS: u8 = 3;

/// Flags of `linen demo`.
#[derive(Clone, Debug, Args)]
pub struct DemoArgs {
    /// Seconds per throughput measurement (iperf3, one TCP stream).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=60))]
    pub seconds: u32,
    /// IPv4 only: no IPv6 overlay and no IPv6 pings.
    #[arg(long)]
    pub no_ipv6: bool,
}

/// What the demo calls itself in [`Interrupted`].
const WHAT: &str = "linen demo";

/// Runs the demo. SIGINT/SIGTERM stop it between steps and clean up.
pub async fn run(args: DemoArgs) -> Result<()> {
    run_interruptible(WHAT, move |stop| run_blocking(&args, stop)).await
}

fn run_blocking(args: &DemoArgs, stop: &AtomicBool) -> Result<()> {
    bench::require_root_and_tools("linen demo")?;
    sayln!(
        "linen demo: {HOSTS} hosts in network namespaces, one `linen run` each, one shared registry"
    );
    progress(&format!("building {HOSTS} hosts"));
    let mut lab = Lab::new("lndemo", HOSTS, 1500)?;
    // The release build aborts on a panic, dropping nothing: a hook removes the lab then.
    lab.remove_on_panic();
    sayln!(
        "ok ({}-h1…h{HOSTS}, underlay 198.18.0.0/24 on a bridge)",
        lab.prefix()
    );
    let result = demo(&mut lab, args, stop).map_err(|e| with_logs(e, &mut lab));
    progress("removing namespaces, linen processes and files");
    drop(lab);
    sayln!("ok");
    let report = result?;
    say!("{}", report.render());
    if !report.all_ok() {
        bail!("some pairs did not ping over linen; see the report above");
    }
    Ok(())
}

/// Prints a progress line's beginning; its end ("ok", a value) follows when the step is done.
fn progress(what: &str) {
    say!("{what}… ");
    let _ = std::io::stdout().flush();
}

fn check(stop: &AtomicBool) -> Result<()> {
    interrupt::check(stop, WHAT)
}

fn wait<T>(
    stop: &AtomicBool,
    timeout: Duration,
    f: impl FnMut() -> Option<T>,
) -> Result<Option<T>> {
    interrupt::wait(stop, WHAT, timeout, f)
}

/// One ordered pair's ping results (round trip in ms; `None` = no answer; IPv6 `None` when
/// IPv6 is off).
struct Pair {
    from: u8,
    to: u8,
    v4: Option<f64>,
    v6: Option<Option<f64>>,
}

impl Pair {
    fn ok(&self) -> bool {
        self.v4.is_some() && self.v6.is_none_or(|r| r.is_some())
    }
}

struct Report {
    hosts: Vec<(u8, std::net::Ipv4Addr, SubnetKey)>,
    pairs: Vec<Pair>,
    /// Gbit/s over linen and over kernel VXLAN (absent when the pings failed).
    throughput: Option<(f64, f64)>,
    seconds: u32,
}

fn demo(lab: &mut Lab, args: &DemoArgs, stop: &AtomicBool) -> Result<Report> {
    let dir = lab.scratch_dir()?;
    let registry = dir.join("registry");
    let ipv6 = !args.no_ipv6;
    check(stop)?;
    let extra: &[&str] = if ipv6 {
        &["--ipv6-network", "fd00:19::/48"]
    } else {
        &[]
    };
    progress(&format!(
        "writing the network config 198.19.0.0/16{} to the registry",
        if ipv6 { " + fd00:19::/48" } else { "" }
    ));
    bench::init_network(&registry, extra)?;
    sayln!("ok ({})", registry.display());

    let mut hosts = Vec::new();
    for i in 0..lab.hosts().len() {
        check(stop)?;
        let (index, underlay) = (lab.host(i).index, lab.host(i).ip);
        progress(&format!("starting linen on h{index}"));
        let log = std::fs::File::create(dir.join(format!("h{index}.log")))?;
        bench::spawn_linen(lab, i, &registry, &[], Some(log))?;
        let env = bench::subnet_file(&registry, index);
        let key = wait(stop, Duration::from_secs(15), || bench::read_lease(&env))?
            .ok_or_else(|| anyhow!("linen on h{index} wrote no subnet.env within 15 s"))?;
        sayln!("subnet {}", describe(&key));
        hosts.push((index, underlay, key));
    }

    sayln!(
        "pinging every pair over linen (IPv4{}):",
        if ipv6 { " and IPv6" } else { "" }
    );
    let mut pairs = Vec::new();
    for (a, _, _) in &hosts {
        for (b, _, key) in &hosts {
            if a == b {
                continue;
            }
            let from = lab.host(usize::from(*a) - 1);
            // The first ping may wait for the new lease to reach the other daemons.
            let ping = |target: String| {
                wait(stop, Duration::from_secs(10), || {
                    bench::ping_once(from, &target)
                })
            };
            let v4 = match key.ipv4() {
                Some(n) => ping(n.network().to_string())?,
                None => None,
            };
            let v6 = match key.ipv6().filter(|_| ipv6) {
                Some(n) => Some(ping(n.network().to_string())?),
                None => None,
            };
            let pair = Pair {
                from: *a,
                to: *b,
                v4,
                v6,
            };
            sayln!("  {}", pair_line(&pair));
            pairs.push(pair);
        }
    }

    let mut throughput = None;
    if pairs.iter().all(Pair::ok)
        && let Some(target) = hosts[1].2.ipv4()
    {
        let secs = args.seconds.to_string();
        check(stop)?;
        progress(&format!(
            "measuring TCP h1 → h2 over linen ({} s)",
            args.seconds
        ));
        let linen = bench::received_gbps(&bench::iperf(
            lab,
            &target.network().to_string(),
            &["-t", &secs],
        )?);
        sayln!("{linen:.2} Gbit/s");
        check(stop)?;
        progress(&format!(
            "measuring TCP h1 → h2 over kernel VXLAN ({} s)",
            args.seconds
        ));
        bench::setup_vxlan(lab)?;
        let vxlan = bench::iperf(lab, bench::VXLAN_TARGET, &["-t", &secs]);
        bench::teardown_vxlan(lab);
        let vxlan = bench::received_gbps(&vxlan?);
        sayln!("{vxlan:.2} Gbit/s");
        throughput = Some((linen, vxlan));
    }
    Ok(Report {
        hosts,
        pairs,
        throughput,
        seconds: args.seconds,
    })
}

fn describe(key: &SubnetKey) -> String {
    match (key.ipv4(), key.ipv6()) {
        (Some(a), Some(b)) => format!("{a} + {b}"),
        (Some(a), None) => a.to_string(),
        (None, Some(b)) => b.to_string(),
        (None, None) => "none".into(),
    }
}

fn pair_line(p: &Pair) -> String {
    let result = |r: Option<f64>| match r {
        Some(ms) => format!("OK {ms:>5.2} ms"),
        None => "FAIL (no answer)".into(),
    };
    let mut s = format!("h{} → h{}   IPv4 {}", p.from, p.to, result(p.v4));
    if let Some(v6) = p.v6 {
        s.push_str(&format!("   IPv6 {}", result(v6)));
    }
    s
}

impl Report {
    fn all_ok(&self) -> bool {
        self.pairs.iter().all(Pair::ok)
    }

    fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::from("\nlinen demo report\n");
        for (n, (index, underlay, key)) in self.hosts.iter().enumerate() {
            let label = if n == 0 { "hosts" } else { "" };
            let _ = writeln!(
                s,
                "  {label:<11} h{index}  underlay {underlay:<12} overlay {}",
                describe(key)
            );
        }
        let count = |f: fn(&Pair) -> Option<bool>| {
            let all: Vec<bool> = self.pairs.iter().filter_map(f).collect();
            (all.iter().filter(|ok| **ok).count(), all.len())
        };
        let (ok4, n4) = count(|p| Some(p.v4.is_some()));
        let (ok6, n6) = count(|p| p.v6.map(|r| r.is_some()));
        let _ = write!(s, "  {:<11} IPv4 {ok4}/{n4} pairs OK", "pings");
        if n6 > 0 {
            let _ = write!(s, ", IPv6 {ok6}/{n6} pairs OK");
        }
        s.push_str(" (every host to every other, over linen)\n");
        match self.throughput {
            Some((linen, vxlan)) => {
                let _ = writeln!(
                    s,
                    "  {:<11} TCP h1 → h2, one stream, {} s each:\n  {:<11} linen {linen:.2} Gbit/s, kernel VXLAN {vxlan:.2} Gbit/s{}",
                    "throughput",
                    self.seconds,
                    "",
                    if vxlan > 0.0 {
                        format!(
                            " (linen/VXLAN {:.2}; the CPU is shared: compare ratios)",
                            linen / vxlan
                        )
                    } else {
                        String::new()
                    }
                );
            }
            None => {
                let _ = writeln!(s, "  {:<11} not measured (pings failed)", "throughput");
            }
        }
        let _ = writeln!(
            s,
            "  {:<11} namespaces, linen processes and registry files removed",
            "cleanup"
        );
        let _ = writeln!(
            s,
            "  {:<11} {}",
            "result",
            if self.all_ok() {
                "OK: every pair pings over linen"
            } else {
                "FAILED: some pairs did not ping (the lines above say which)"
            }
        );
        s
    }
}

/// Adds the last lines of every host's linen log to a failure (not to an interruption), so the
/// person sees why before the files are removed.
fn with_logs(e: anyhow::Error, lab: &mut Lab) -> anyhow::Error {
    if e.chain().any(|c| c.is::<Interrupted>()) {
        return e;
    }
    let Ok(dir) = lab.scratch_dir() else {
        return e;
    };
    let tails = log_tails(&dir);
    if tails.is_empty() {
        e
    } else {
        anyhow!("{e:#}{tails}")
    }
}

fn log_tails(dir: &Path) -> String {
    let mut out = String::new();
    for index in 1..=HOSTS {
        let text = std::fs::read_to_string(dir.join(format!("h{index}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        if lines.is_empty() {
            continue;
        }
        out.push_str(&format!("\n--- linen log of h{index} (last lines) ---\n"));
        for l in &lines[lines.len().saturating_sub(10)..] {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(text: &str) -> SubnetKey {
        SubnetKey::parse(text).unwrap()
    }

    #[test]
    fn report_says_ok_only_when_every_pair_answered() {
        let pair = |v4, v6| Pair {
            from: 1,
            to: 2,
            v4,
            v6,
        };
        let mut r = Report {
            hosts: vec![(1, "198.18.0.1".parse().unwrap(), key("198.19.5.0-24"))],
            pairs: vec![pair(Some(0.2), Some(Some(0.3))), pair(Some(0.1), None)],
            throughput: Some((1.5, 3.0)),
            seconds: 3,
        };
        let text = r.render();
        assert!(r.all_ok());
        assert!(
            text.contains("IPv4 2/2 pairs OK, IPv6 1/1 pairs OK"),
            "{text}"
        );
        assert!(
            text.contains("linen 1.50 Gbit/s, kernel VXLAN 3.00 Gbit/s"),
            "{text}"
        );
        assert!(text.contains("linen/VXLAN 0.50"), "{text}");
        assert!(text.contains("OK: every pair"), "{text}");
        r.pairs.push(pair(Some(0.1), Some(None)));
        assert!(!r.all_ok());
        assert!(r.render().contains("IPv6 1/2 pairs OK"));
        assert!(r.render().contains("FAILED"));
        assert!(pair_line(&r.pairs[2]).contains("IPv6 FAIL"));
    }
}
