//! flannel's iptables rules (flannel HEAD, see flannel-compat.md §e), through the `iptables` and
//! `ip6tables` commands. N is the cluster network, L this host's lease.
//!
//! `--ip-masq`, the masquerade rules: chain `LINEN-POSTRTG` in table nat, jumped to from the end
//! of POSTROUTING, holds in this order:
//!
//! 1. `-m mark --mark 0x4000/0x4000 -j RETURN` (already marked by kube-proxy)
//! 2. `-s L -d N -j RETURN`, 3. `-s N -d L -j RETURN`, 4. `! -s N -d L -j RETURN`
//! 5. `-s N ! -d 224.0.0.0/4 -j MASQUERADE` (IPv6: `ff00::/8`), 6. `! -s N -d N -j MASQUERADE`
//!
//! every rule with the comment "linen masq", MASQUERADE with `--random-fully` when iptables
//! supports it (≥ 1.6.2, flannel's test) and `--ip-masq-fully-random-disable` is not given.
//!
//! `--iptables-forward-rules` (on by default, as flannel's `-iptables-forward-rules`), the
//! FORWARD accept rules: chain `LINEN-FWD` in table filter, jumped to from the end of FORWARD,
//! holds `-s N -j ACCEPT` and `-d N -j ACCEPT` with the comment "linen forward", so that a host
//! whose FORWARD policy is DROP (Docker sets it) still forwards between its containers and the
//! overlay. Without the `iptables` command these are skipped with a warning.
//!
//! As with flannel's `-iptables-resync`, the rules are checked every `--iptables-resync` seconds
//! (default 5) and, when one is missing, the chain is flushed and rebuilt in order; each chain
//! is linen's alone, so rebuilding it also drops rules of an older lease or network.
//!
//! A stop leaves the jumps and the chains in place, as flanneld does (flannel #836; #2237 and
//! #2239 moved a later flannel's clean-up from its stop to its start): the host's containers
//! keep reaching the outside while linen restarts, and the next start takes them over (or
//! removes them, for a purpose or family it has no use for). Only a start that ends before its
//! rules were in place (stopped, or failed) removes what it added.

use std::cell::Cell;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use ipnetwork::IpNetwork;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::lease::manager::LeaseState;
use crate::model::{NetworkConfig, SubnetKey};

/// The chain linen owns in table nat.
pub const CHAIN: &str = "LINEN-POSTRTG";
/// The comment on every masquerade rule linen adds.
pub const COMMENT: &str = "linen masq";
/// The chain linen owns in table filter.
pub const FORWARD_CHAIN: &str = "LINEN-FWD";
/// The comment on every FORWARD rule linen adds.
pub const FORWARD_COMMENT: &str = "linen forward";
/// kube-proxy's masquerade mark: traffic it marked is left alone.
const KUBE_PROXY_MARK: &str = "0x4000/0x4000";

/// Which rules to keep, and how.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// The masquerade rules (`--ip-masq`).
    pub masquerade: bool,
    /// The FORWARD accept rules (`--iptables-forward-rules`).
    pub forward: bool,
    /// How often the rules are checked (`--iptables-resync`).
    pub resync: Duration,
    /// MASQUERADE without `--random-fully` even where iptables has it
    /// (`--ip-masq-fully-random-disable`).
    pub no_random_fully: bool,
}

/// What a chain of rules is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// `--ip-masq`: [`CHAIN`] in table nat, jumped to from POSTROUTING.
    Masquerade,
    /// `--iptables-forward-rules`: [`FORWARD_CHAIN`] in table filter, jumped to from FORWARD.
    Forward,
}

impl Purpose {
    fn table(self) -> &'static str {
        match self {
            Purpose::Masquerade => "nat",
            Purpose::Forward => "filter",
        }
    }

    fn chain(self) -> &'static str {
        match self {
            Purpose::Masquerade => CHAIN,
            Purpose::Forward => FORWARD_CHAIN,
        }
    }

    fn hook(self) -> &'static str {
        match self {
            Purpose::Masquerade => "POSTROUTING",
            Purpose::Forward => "FORWARD",
        }
    }

    fn comment(self) -> &'static str {
        match self {
            Purpose::Masquerade => COMMENT,
            Purpose::Forward => FORWARD_COMMENT,
        }
    }
}

/// IPv4 (`iptables`) or IPv6 (`ip6tables`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `iptables`.
    V4,
    /// `ip6tables`.
    V6,
}

impl Family {
    /// The command that edits this family's rules.
    pub fn program(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn multicast(self) -> &'static str {
        match self {
            Family::V4 => "224.0.0.0/4",
            Family::V6 => "ff00::/8",
        }
    }
}

/// The rules of [`CHAIN`] for network `n` and lease `l`, in order, each as the arguments that
/// follow `-A LINEN-POSTRTG`.
pub fn chain_rules(
    family: Family,
    n: IpNetwork,
    l: IpNetwork,
    random_fully: bool,
) -> Vec<Vec<String>> {
    let (n, l) = (n.to_string(), l.to_string());
    let rule = |head: &[&str], target: &str| -> Vec<String> {
        let mut v: Vec<String> = head.iter().map(|a| (*a).to_owned()).collect();
        v.extend(["-m", "comment", "--comment", COMMENT, "-j", target].map(str::to_owned));
        if target == "MASQUERADE" && random_fully {
            v.push("--random-fully".to_owned());
        }
        v
    };
    vec![
        rule(&["-m", "mark", "--mark", KUBE_PROXY_MARK], "RETURN"),
        rule(&["-s", &l, "-d", &n], "RETURN"),
        rule(&["-s", &n, "-d", &l], "RETURN"),
        rule(&["!", "-s", &n, "-d", &l], "RETURN"),
        rule(&["-s", &n, "!", "-d", family.multicast()], "MASQUERADE"),
        rule(&["!", "-s", &n, "-d", &n], "MASQUERADE"),
    ]
}

/// The rules of [`FORWARD_CHAIN`] for network `n`, in order, each as the arguments that follow
/// `-A LINEN-FWD`.
pub fn forward_rules(n: IpNetwork) -> Vec<Vec<String>> {
    let n = n.to_string();
    ["-s", "-d"]
        .map(|dir| {
            [
                dir,
                &n,
                "-m",
                "comment",
                "--comment",
                FORWARD_COMMENT,
                "-j",
                "ACCEPT",
            ]
            .map(str::to_owned)
            .to_vec()
        })
        .to_vec()
}

/// The rule in POSTROUTING (masquerade) or FORWARD that jumps to the purpose's chain.
pub fn jump_rule(purpose: Purpose) -> Vec<String> {
    [
        "-m",
        "comment",
        "--comment",
        purpose.comment(),
        "-j",
        purpose.chain(),
    ]
    .map(str::to_owned)
    .to_vec()
}

/// The version an `iptables --version` line names (`iptables v1.8.9 (nf_tables)`).
fn iptables_version(version_line: &str) -> Option<(u32, u32, u32)> {
    let v = version_line
        .split_whitespace()
        .find_map(|w| w.strip_prefix('v'))?;
    let parts: Vec<u32> = v.split('.').map_while(|p| p.parse().ok()).collect();
    Some((
        *parts.first()?,
        parts.get(1).copied().unwrap_or(0),
        parts.get(2).copied().unwrap_or(0),
    ))
}

/// Whether an `iptables --version` line names a version with `--random-fully` (≥ 1.6.2).
pub fn supports_random_fully(version_line: &str) -> bool {
    iptables_version(version_line).is_some_and(|v| v >= (1, 6, 2))
}

/// How long an iptables command waits for the xtables lock another program holds, as its
/// version allows: `-w 5` from 1.6.0, a bare `-w` (wait as long as it takes; what flanneld's
/// go-iptables passes from 1.4.20 on) from 1.4.20, no flag before, where either is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// `-w 5`.
    Seconds,
    /// `-w`.
    Bare,
    /// Neither.
    Unsupported,
}

impl Wait {
    /// For an `iptables --version` line; `-w 5` when it names no version.
    pub fn for_version(version_line: &str) -> Wait {
        match iptables_version(version_line) {
            None => Wait::Seconds,
            Some(v) if v >= (1, 6, 0) => Wait::Seconds,
            Some(v) if v >= (1, 4, 20) => Wait::Bare,
            Some(_) => Wait::Unsupported,
        }
    }

    fn args(self) -> &'static [&'static str] {
        match self {
            Wait::Seconds => &["-w", "5"],
            Wait::Bare => &["-w"],
            Wait::Unsupported => &[],
        }
    }
}

/// Longest an iptables command may run. `-w 5` bounds its wait for the xtables lock from 1.6.0
/// on, but the bare `-w` of 1.4.20 to 1.5.x waits as long as another program holds the lock:
/// for ever, a lock held for good would hang linen's start, and its stop until systemd kills it
/// and leaves the rules behind.
const IPTABLES_DEADLINE: Duration = Duration::from_secs(30);

/// Longest the removal of the rules on the way out may take, all its commands together: it
/// must end well within the unit's `TimeoutStopSec=30`, after which systemd kills linen.
const REMOVAL_BUDGET: Duration = Duration::from_secs(15);

/// What else ends a step's iptables commands early, besides [`IPTABLES_DEADLINE`] for each: a
/// time by which all of them must be done, and a cancellation (the daemon stopping while a
/// resync check waits for the xtables lock: the rules must still be removed in time).
#[derive(Clone, Default)]
pub struct Limit {
    until: Option<Instant>,
    cancel: Option<CancellationToken>,
}

impl Limit {
    /// All commands done within `budget` from now.
    fn within(budget: Duration) -> Limit {
        Limit {
            until: Some(Instant::now() + budget),
            cancel: None,
        }
    }

    /// Each command ended at its deadline or when `cancel` is cancelled.
    pub fn until_cancelled(cancel: &CancellationToken) -> Limit {
        Limit {
            until: None,
            cancel: Some(cancel.clone()),
        }
    }

    /// Why no further command may start: the budget is spent, or the daemon is stopping.
    fn spent(&self) -> Option<&'static str> {
        if self
            .cancel
            .as_ref()
            .is_some_and(CancellationToken::is_cancelled)
        {
            Some("not run: linen is stopping")
        } else if self.until.is_some_and(|u| Instant::now() >= u) {
            Some("not run: the time for removing the rules ran out")
        } else {
            None
        }
    }

    /// How long the next command may run: `cap`, or less when the time left is shorter.
    fn deadline(&self, cap: Duration) -> Duration {
        self.until.map_or(cap, |u| {
            u.saturating_duration_since(Instant::now()).min(cap)
        })
    }
}

/// How many iptables commands (`iptables-save` and `--version` too) run now, each counted by
/// an [`InFlight`] from before it is spawned until it is reaped.
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Set by [`stop_commands`]: no command starts any more, and a running one is killed.
static EXITING: AtomicBool = AtomicBool::new(false);

/// One running command, for [`stop_commands`] to wait for.
struct InFlight;

impl InFlight {
    /// `None` once linen is exiting: the command must not start.
    fn start() -> Option<InFlight> {
        // Counted first, then checked: a command that starts while `stop_commands` sets the
        // flag is either not spawned or counted, so waited for, and killed.
        IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
        if EXITING.load(Ordering::SeqCst) {
            IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(InFlight)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
    }
}

/// For a process about to exit without finishing its stop (a second stop signal): kills the
/// iptables commands still running and waits up to `within` for them to be reaped; how many
/// are left. Without it an `iptables -w` waiting for the xtables lock would outlive linen and
/// change the rules after it had gone (a masquerade rule the next start does not expect, or
/// one removed under it). No command starts after this.
pub fn stop_commands(within: Duration) -> usize {
    EXITING.store(true, Ordering::SeqCst);
    let until = Instant::now() + within;
    loop {
        let left = IN_FLIGHT.load(Ordering::SeqCst);
        if left == 0 || Instant::now() >= until {
            return left;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Longest `<program> --version` may take. It only prints a line, and [`Masq::new`] asks it
/// before the rules are installed: a wrapper that hangs must not hold up linen's start for the
/// whole [`IPTABLES_DEADLINE`].
const VERSION_DEADLINE: Duration = Duration::from_secs(10);

/// How long the output of a command that has exited is still read when its pipes stay open:
/// something it started and left running holds them (a wrapper script's background process).
/// After that its process group is killed and the output is what was read by then.
const READ_GRACE: Duration = Duration::from_millis(150);

/// Runs `command` with no input, in a process group of its own (so that a stop kills what it
/// started too), counted by [`InFlight`], for at most `cap` and within `limit`, through
/// [`finish_within`]: its output is read while it runs, so it may be of any size. `what` names
/// the command in errors, and `late` says, in the error for a command that timed out, what may
/// have held it up. An error when the command could not start or did not end; its exit status
/// is the caller's to judge.
fn run_bounded(
    command: &mut Command,
    what: &str,
    limit: &Limit,
    cap: Duration,
    late: Option<&str>,
) -> Result<Output> {
    if let Some(why) = limit.spent() {
        bail!("`{what}`: {why}");
    }
    let Some(_running) = InFlight::start() else {
        bail!("`{what}`: not run: linen is exiting");
    };
    command
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|child| finish_within(child, limit.deadline(cap), limit.cancel.as_ref(), late))
        .with_context(|| format!("running `{what}`"))
}

/// Waits for `child` to exit, at most `deadline` and not past `cancel`, reading its stdout and
/// stderr (those piped) meanwhile, so that it never waits on a full pipe. Kills it after that
/// (a `TimedOut` error, which quotes `late`), or as soon as linen exits at once
/// ([`stop_commands`]; an `Interrupted` error), with its process group when it leads one. The
/// child is reaped in every case. Once it has exited, its pipes are read to their end, or for
/// [`READ_GRACE`] while something it left running still holds them: that is then killed with
/// the child's process group, and the output is what was read.
fn finish_within(
    mut child: Child,
    deadline: Duration,
    cancel: Option<&CancellationToken>,
    late: Option<&str>,
) -> std::io::Result<Output> {
    let waited = Pipes::of(&mut child).and_then(|mut pipes| {
        let status = wait_reading(&mut child, &mut pipes, deadline, cancel, late)?;
        Ok((pipes, status))
    });
    let (mut pipes, status) = match waited {
        Ok(waited) => waited,
        Err(e) => {
            // Not reaped yet: its pid, and the group it leads, are still its own.
            kill_with_group(&mut child);
            let _ = child.wait();
            return Err(e);
        }
    };
    let grace = Instant::now() + READ_GRACE;
    while !pipes.closed() {
        let left = grace.saturating_duration_since(Instant::now());
        if left.is_zero() {
            // The child is reaped, but a process still holds its pipes: one it started, so
            // (unless it left with setsid) a member of the group the child led, and the kernel
            // gives no process a group's id while any member of that group lives. The group
            // killed here is then the child's own: the kill closes the pipes. A holder that
            // left the group lives on, and the pipes are not waited for (dropping them closes
            // our end); the group is then empty, and this signals no one unless its id was
            // taken again by a new group leader within the grace, which needs the pids to wrap
            // around meanwhile.
            let _ = crate::sys::kill_process_group(child.id());
            // What they have written is in the pipes still.
            pipes.read_for(Duration::ZERO)?;
            break;
        }
        if let Err(e) = pipes.read_for(left.min(Duration::from_millis(20))) {
            // Whatever holds the pipes must not outlive the error (see above).
            let _ = crate::sys::kill_process_group(child.id());
            return Err(e);
        }
    }
    Ok(pipes.output(status))
}

/// Reads `pipes` until `child` exits, and reaps it; an error (the child not reaped) when it
/// does not exit within `deadline` or before `cancel` (see [`finish_within`]).
fn wait_reading(
    child: &mut Child,
    pipes: &mut Pipes,
    deadline: Duration,
    cancel: Option<&CancellationToken>,
    late: Option<&str>,
) -> std::io::Result<std::process::ExitStatus> {
    let until = Instant::now() + deadline;
    let mut nap = Duration::from_millis(1);
    loop {
        pipes.read_for(nap)?;
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if cancel.is_some_and(CancellationToken::is_cancelled) || EXITING.load(Ordering::SeqCst) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Interrupted,
                "linen is stopping; stopped it",
            ));
        }
        if Instant::now() >= until {
            let within = if deadline >= Duration::from_secs(1) {
                format!("{} s", deadline.as_secs())
            } else {
                format!("{} ms", deadline.as_millis())
            };
            let late = late.map(|l| format!(" ({l})")).unwrap_or_default();
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("it did not finish within {within}{late}; stopped it"),
            ));
        }
        nap = (nap * 2).min(Duration::from_millis(20));
    }
}

/// A child's stdout and stderr, each read without blocking until it reaches its end.
struct Pipes {
    /// Wakes [`Pipes::read_for`] when output comes or a pipe ends.
    poll: mio::Poll,
    events: mio::Events,
    /// stdout and stderr, each until its end (or `None`: not piped).
    open: [Option<mio::unix::pipe::Receiver>; 2],
    /// What was read from each.
    read: [Vec<u8>; 2],
}

impl Pipes {
    /// Takes `child`'s piped stdout and stderr.
    fn of(child: &mut Child) -> std::io::Result<Pipes> {
        let poll = mio::Poll::new()?;
        let mut open = [
            child.stdout.take().map(mio::unix::pipe::Receiver::from),
            child.stderr.take().map(mio::unix::pipe::Receiver::from),
        ];
        for (i, pipe) in open.iter_mut().enumerate() {
            if let Some(pipe) = pipe {
                pipe.set_nonblocking(true)?;
                poll.registry()
                    .register(pipe, mio::Token(i), mio::Interest::READABLE)?;
            }
        }
        Ok(Pipes {
            poll,
            events: mio::Events::with_capacity(2),
            open,
            read: [Vec::new(), Vec::new()],
        })
    }

    /// Waits up to `nap` for output or the end of a pipe (all of `nap` once both have ended),
    /// then takes all there is; a pipe at its end is closed.
    fn read_for(&mut self, nap: Duration) -> std::io::Result<()> {
        match self.poll.poll(&mut self.events, Some(nap)) {
            Err(e) if e.kind() != std::io::ErrorKind::Interrupted => return Err(e),
            _ => {}
        }
        let mut chunk = [0u8; 16 * 1024];
        for (pipe, read) in self.open.iter_mut().zip(&mut self.read) {
            while let Some(p) = pipe {
                match std::io::Read::read(p, &mut chunk) {
                    Ok(0) => *pipe = None,
                    Ok(n) => read.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// Whether both pipes have ended (or were not piped).
    fn closed(&self) -> bool {
        self.open.iter().all(Option::is_none)
    }

    fn output(self, status: std::process::ExitStatus) -> Output {
        let [stdout, stderr] = self.read;
        Output {
            status,
            stdout,
            stderr,
        }
    }
}

/// Kills `child` and, when it leads a process group of its own (as [`run_bounded`] starts
/// commands), everything else in that group: an `iptables` that a wrapper script runs without
/// `exec` would otherwise wait on for the xtables lock, and change the rules later.
fn kill_with_group(child: &mut Child) {
    if crate::sys::kill_process_group(child.id()).is_err() {
        let _ = child.kill();
    }
}

/// Whether `e` says the program is not there (no such file).
fn not_found(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
    })
}

/// What `program --version` prints (whatever its exit status), or why it could not run: within
/// `limit`, and [`VERSION_DEADLINE`] at most.
fn version_of(program: &str, limit: &Limit) -> Result<String> {
    let out = run_bounded(
        Command::new(program).arg("--version"),
        &format!("{program} --version"),
        limit,
        VERSION_DEADLINE,
        None,
    )?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `save` (`iptables-save`, `ip6tables-save`), within `limit` and [`IPTABLES_DEADLINE`]:
/// its output lists every table there is, megabytes on a Kubernetes host.
fn saved_rules(save: &str, limit: &Limit) -> Result<Output> {
    run_bounded(
        &mut Command::new(save),
        save,
        limit,
        IPTABLES_DEADLINE,
        None,
    )
}

/// One family's rules for one purpose: the contents of one chain.
#[derive(Clone, Debug)]
struct RuleSet {
    family: Family,
    /// The lock-wait flag this family's command takes.
    wait: Wait,
    purpose: Purpose,
    network: IpNetwork,
    random_fully: bool,
    rules: Vec<Vec<String>>,
    /// This daemon created the chain or added the jump to it: a start that ends before its
    /// rules are in place removes only what it made, not what an earlier run left in force.
    made: Cell<bool>,
}

impl RuleSet {
    fn ipt<'a>(&self, limit: &'a Limit) -> Ipt<'a> {
        Ipt {
            program: self.family.program(),
            wait: self.wait,
            purpose: self.purpose,
            limit,
        }
    }

    fn masquerade(
        family: Family,
        wait: Wait,
        network: IpNetwork,
        own: IpNetwork,
        random_fully: bool,
    ) -> Self {
        RuleSet {
            family,
            wait,
            purpose: Purpose::Masquerade,
            network,
            random_fully,
            rules: chain_rules(family, network, own, random_fully),
            made: Cell::new(false),
        }
    }

    fn forward(family: Family, wait: Wait, network: IpNetwork) -> Self {
        RuleSet {
            family,
            wait,
            purpose: Purpose::Forward,
            network,
            random_fully: false,
            rules: forward_rules(network),
            made: Cell::new(false),
        }
    }
}

/// This host's iptables rules, for every family the network and the lease have.
#[derive(Clone, Debug)]
pub struct Masq {
    sets: Vec<RuleSet>,
    lease: SubnetKey,
    resync: Duration,
}

impl Masq {
    /// Probes `iptables` (and `ip6tables` when the lease has an IPv6 subnet) and computes the
    /// masquerade rules when `masquerade`, the FORWARD rules when `forward`; installs nothing
    /// yet. A missing command is an error for the masquerade rules, which were asked for, and a
    /// warning for the FORWARD rules, which are on by default. The commands are asked for their
    /// version within `limit`.
    pub fn new(
        config: &NetworkConfig,
        lease: &SubnetKey,
        opts: Options,
        limit: &Limit,
    ) -> Result<Masq> {
        let Options {
            masquerade,
            forward,
            resync,
            no_random_fully,
        } = opts;
        if !masquerade && !forward {
            return Ok(Masq {
                sets: Vec::new(),
                lease: *lease,
                resync,
            });
        }
        if config.enable_nftables {
            tracing::warn!(
                "the network config sets EnableNFTables, but linen writes its rules with the \
                 iptables commands (which, as iptables-nft, keep them in nftables too)"
            );
        }
        let mut sets = Vec::new();
        let pairs = [
            (
                Family::V4,
                config.network.map(IpNetwork::V4),
                lease.ipv4().map(IpNetwork::V4),
            ),
            (
                Family::V6,
                config.ipv6_network.map(IpNetwork::V6),
                lease.ipv6().map(IpNetwork::V6),
            ),
        ];
        for (family, network, own) in pairs {
            let (Some(network), Some(own)) = (network, own) else {
                continue;
            };
            let version = match version_of(family.program(), limit) {
                Ok(version) => version,
                // Stopping: not a missing iptables (the start ends anyway).
                Err(e) if limit.spent().is_some() => return Err(e),
                Err(e) if masquerade && not_found(&e) => {
                    return Err(e.context(format!(
                        "--ip-masq needs the `{}` command; install it (Debian: apt-get install \
                         iptables) or drop --ip-masq",
                        family.program()
                    )));
                }
                Err(e) if masquerade => {
                    return Err(e.context(format!(
                        "--ip-masq needs the `{}` command, which could not be asked for its \
                         version",
                        family.program()
                    )));
                }
                Err(e) => {
                    tracing::warn!(program = family.program(), error = %format!("{e:#}"),
                        "cannot run the command for the FORWARD accept rules; running without \
                         them (a FORWARD policy of DROP will block containers from the overlay). \
                         Install iptables, or pass --iptables-forward-rules=false to silence this");
                    continue;
                }
            };
            let random_fully = supports_random_fully(&version) && !no_random_fully;
            let wait = Wait::for_version(&version);
            tracing::debug!(program = family.program(), version = %version.trim(), random_fully,
                ?wait, "iptables rules through");
            if forward {
                sets.push(RuleSet::forward(family, wait, network));
            }
            if masquerade {
                sets.push(RuleSet::masquerade(
                    family,
                    wait,
                    network,
                    own,
                    random_fully,
                ));
            }
        }
        if masquerade && sets.iter().all(|s| s.purpose != Purpose::Masquerade) {
            bail!("--ip-masq: the lease {lease} has no subnet of the configured network");
        }
        Ok(Masq {
            sets,
            lease: *lease,
            resync,
        })
    }

    /// The same rules for another lease (ours changed).
    pub fn for_lease(&self, lease: &SubnetKey) -> Masq {
        let sets = self
            .sets
            .iter()
            .filter_map(|s| {
                let own = match s.family {
                    Family::V4 => lease.ipv4().map(IpNetwork::V4),
                    Family::V6 => lease.ipv6().map(IpNetwork::V6),
                }?;
                Some(match s.purpose {
                    Purpose::Masquerade => {
                        RuleSet::masquerade(s.family, s.wait, s.network, own, s.random_fully)
                    }
                    Purpose::Forward => s.clone(),
                })
            })
            .collect();
        Masq {
            sets,
            lease: *lease,
            resync: self.resync,
        }
    }

    /// Makes sure every rule is in place; returns whether anything had to be (re)added. Every
    /// chain is tried even when one fails; the error names each that failed.
    pub fn ensure(&self, limit: &Limit) -> Result<bool> {
        let mut changed = false;
        let mut failed = Vec::new();
        for set in &self.sets {
            match ensure_set(set, limit) {
                Ok(c) => changed |= c,
                Err(e) => failed.push(format!("{e:#}")),
            }
        }
        if failed.is_empty() {
            Ok(changed)
        } else {
            Err(anyhow!(failed.join("; ")))
        }
    }

    /// Removes the jumps and the chains this daemon made (errors are logged: this runs on the
    /// way out of a start that did not complete), within [`REMOVAL_BUDGET`], and says whether
    /// all went; those an earlier run left in force stay, as a stop leaves them. A chain that
    /// stays is named in a warning.
    pub fn remove(&self) -> bool {
        let limit = Limit::within(REMOVAL_BUDGET);
        let mut all = true;
        for set in self.sets.iter().filter(|s| s.made.get()) {
            all &= set.ipt(&limit).remove_chain();
        }
        if all {
            tracing::info!("iptables rules removed");
        } else {
            tracing::warn!(
                "some iptables rules are left behind (see above); a later start takes them over \
                 or removes them; by hand, `iptables -t nat -S POSTROUTING` and `iptables -S \
                 FORWARD` show the jumps to delete with -D (comment included), then -F and -X \
                 the chains LINEN-POSTRTG and LINEN-FWD (ip6tables alike)"
            );
        }
        all
    }
}

/// One family's iptables command in one purpose's table, with the lock-wait flag its version
/// takes.
#[derive(Clone, Copy)]
struct Ipt<'a> {
    program: &'a str,
    wait: Wait,
    purpose: Purpose,
    limit: &'a Limit,
}

impl Ipt<'_> {
    /// Runs `<program> [-w [5]] -t <table> <op> <chain> <args…>`, for at most
    /// [`IPTABLES_DEADLINE`] and within its [`Limit`] (see [`run_bounded`]).
    fn run(self, op: &str, chain: &str, args: &[String]) -> Result<Output> {
        run_bounded(
            Command::new(self.program)
                .args(self.wait.args())
                .args(["-t", self.purpose.table(), op, chain])
                .args(args),
            &format!("{} -t {} {op} {chain}", self.program, self.purpose.table()),
            self.limit,
            IPTABLES_DEADLINE,
            Some("does another program hold the xtables lock?"),
        )
    }

    /// Like [`Ipt::run`] but fails with iptables' message unless it exits 0.
    fn ok(self, op: &str, chain: &str, args: &[String]) -> Result<()> {
        let out = self.run(op, chain, args)?;
        if out.status.success() {
            return Ok(());
        }
        Err(self.failed(op, chain, args, &out))
    }

    /// Whether the rule is there: `-C` exits 1 when it is not. Any other failure (the xtables
    /// lock not free within the wait, a parameter the command refuses) is an error, not
    /// "missing": taken for missing, it would flush and rebuild the chain, and add the jump
    /// again.
    fn exists(self, chain: &str, rule: &[String]) -> Result<bool> {
        let out = self.run("-C", chain, rule)?;
        match out.status.code() {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => Err(self.failed("-C", chain, rule, &out)),
        }
    }

    fn failed(self, op: &str, chain: &str, args: &[String], out: &Output) -> anyhow::Error {
        let command = [self.program, "-t", self.purpose.table(), op, chain]
            .into_iter()
            .chain(args.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" ");
        anyhow::Error::new(Refused {
            message: format!(
                "`{command}` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            code: out.status.code(),
        })
    }

    /// Removes the purpose's jump and chain (errors are logged); whether the chain is gone.
    fn remove_chain(self) -> bool {
        let (p, purpose) = (self.program, self.purpose);
        let chain = purpose.chain();
        // The jump may have been added more than once by hand; remove every copy.
        for _ in 0..8 {
            if !self
                .run("-D", purpose.hook(), &jump_rule(purpose))
                .is_ok_and(|o| o.status.success())
            {
                break;
            }
        }
        for op in ["-F", "-X"] {
            match self.run(op, chain, &[]) {
                Ok(o) if o.status.success() => {}
                // Never there (an install that failed, a chain removed by hand): nothing left.
                Ok(o) if no_such_chain(&o.stderr) => return true,
                Ok(o) => {
                    tracing::warn!(program = p, op, chain,
                        error = %String::from_utf8_lossy(&o.stderr).trim(), "cannot remove chain");
                    return false;
                }
                // No such program: it cannot have made rules.
                Err(e) if not_found(&e) => return true,
                Err(e) => {
                    tracing::warn!(program = p, chain, error = %format!("{e:#}"), "cannot remove chain");
                    return false;
                }
            }
        }
        true
    }
}

/// An iptables command that ran and exited non-zero: its message and exit code.
#[derive(Debug)]
struct Refused {
    message: String,
    code: Option<i32>,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Refused {}

/// Whether `e` will stay as it is on retry: the command ran and refused, other than for the
/// xtables lock (exit 4, `RESOURCE_PROBLEM`: another program holds it) — a missing table
/// (a kernel without `ip6table_nat`), a match or target the kernel lacks. Not a command that
/// could not be run, was cut short, or waited too long.
fn lasting(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Refused>()
        .is_some_and(|r| r.code.is_some_and(|c| c != 4))
}

/// Whether iptables' message says the chain does not exist (legacy: "No chain/target/match
/// by that name."; nft: "... does not exist" / "No such file or directory").
fn no_such_chain(stderr: &[u8]) -> bool {
    let text = String::from_utf8_lossy(stderr);
    [
        "No chain/target/match",
        "does not exist",
        "No such file or directory",
    ]
    .iter()
    .any(|m| text.contains(m))
}

fn ensure_set(set: &RuleSet, limit: &Limit) -> Result<bool> {
    let ipt = set.ipt(limit);
    let chain = set.purpose.chain();
    let mut changed = false;
    // As with `-C`, only exit 1 means "no such chain": a lock not free within the wait (exit
    // 4) taken for it would try `-N` and report "Chain already exists" instead.
    let listed = ipt.run("-S", chain, &[])?;
    match listed.status.code() {
        Some(0) => {}
        Some(1) => {
            ipt.ok("-N", chain, &[])?;
            set.made.set(true);
            changed = true;
        }
        _ => return Err(ipt.failed("-S", chain, &[], &listed)),
    }
    let mut complete = true;
    for rule in &set.rules {
        if !ipt.exists(chain, rule)? {
            complete = false;
            break;
        }
    }
    if !complete {
        // Rebuild in order (flannel deletes and re-adds all when one is missing).
        ipt.ok("-F", chain, &[])?;
        for rule in &set.rules {
            ipt.ok("-A", chain, rule)?;
        }
        changed = true;
    }
    let jump = jump_rule(set.purpose);
    if !ipt.exists(set.purpose.hook(), &jump)? {
        ipt.ok("-A", set.purpose.hook(), &jump)?;
        set.made.set(true);
        changed = true;
    }
    Ok(changed)
}

/// Installs the rules for `lease` (on a blocking thread): the masquerade rules when
/// `opts.masquerade` (a failure is an error, and removes what was added), the FORWARD rules
/// when `opts.forward` (a failure is a warning, and the resync tries again). First removes the chains an
/// earlier run left for purposes not asked for now. `None` when nothing is left to keep in
/// place.
pub async fn install(
    config: &NetworkConfig,
    lease: &SubnetKey,
    opts: Options,
    limit: Limit,
) -> Result<Option<Masq>> {
    let (config, lease) = (config.clone(), *lease);
    tokio::task::spawn_blocking(move || {
        let families = [
            config.network.is_some() && lease.ipv4().is_some(),
            config.ipv6_network.is_some() && lease.ipv6().is_some(),
        ];
        remove_leftovers(opts.masquerade, opts.forward, families, &limit);
        let masq = Masq::new(&config, &lease, opts, &limit)?;
        // One family's masquerade rules that the kernel cannot take (no ip6table_nat) while
        // the other's went in are retried at each check, as flanneld does, rather than
        // stopping the whole overlay. Any other failure (the xtables lock busy at boot) ends
        // the start, as does one in every family: subnet.env must not say FLANNEL_IPMASQ=true
        // while a family's containers would leave unmasqueraded, and conntrack keep them so.
        let mut masquerading = false;
        let mut failed = Vec::new();
        for set in &masq.sets {
            match ensure_set(set, &limit) {
                Ok(_) => masquerading |= set.purpose == Purpose::Masquerade,
                Err(e) if limit.spent().is_some() => {
                    masq.remove();
                    return Err(e.context("installing the iptables rules"));
                }
                // Kept: the resync tries again (the iptables lock may be held by kube-proxy or
                // Docker at boot, say).
                Err(e) if set.purpose == Purpose::Forward => {
                    tracing::warn!(error = %format!("{e:#}"), program = set.family.program(),
                        retry_s = masq.resync.as_secs(),
                        "cannot install the FORWARD accept rules yet; retrying");
                }
                Err(e) => failed.push((set.family, e)),
            }
        }
        if !failed.is_empty() {
            if !masquerading || failed.iter().any(|(_, e)| !lasting(e)) {
                masq.remove();
                let all: Vec<String> = failed.iter().map(|(_, e)| format!("{e:#}")).collect();
                bail!("installing the --ip-masq rules: {}", all.join("; "));
            }
            for (family, e) in failed {
                tracing::warn!(error = %format!("{e:#}"), program = family.program(),
                    retry_s = masq.resync.as_secs(),
                    "cannot install this family's --ip-masq rules; the other family's are in \
                     place; retrying");
            }
        }
        Ok((!masq.sets.is_empty()).then_some(masq))
    })
    .await?
}

/// Removes the chains of an earlier run for the purposes not asked for this time, and for the
/// families this run has no network for (a daemon that was killed leaves its rules behind;
/// `--iptables-forward-rules=false` must not keep accepting, nor a dual-stack run's ip6tables
/// rules outlive the IPv6 network). `families` is which of IPv4 and IPv6 this run's network
/// and lease have. Quiet when there is no such chain or no iptables.
fn remove_leftovers(masquerade: bool, forward: bool, families: [bool; 2], limit: &Limit) {
    if masquerade && forward && families == [true, true] {
        return;
    }
    for (family, used) in [(Family::V4, families[0]), (Family::V6, families[1])] {
        // `iptables-save` lists only the tables that exist: asking for a chain in table nat
        // with `-t nat` would create that table (and with iptables-legacy load NAT, and with it
        // connection tracking), which a run without --ip-masq must not do.
        let save = format!("{}-save", family.program());
        let out = match saved_rules(&save, limit) {
            Ok(out) if out.status.success() => out,
            // Stopping: the command was cut short or not run, which says nothing about what is
            // left behind (and a warning would blame iptables).
            _ if limit.spent().is_some() => return,
            Ok(out) => {
                tracing::warn!(program = %save, error = %String::from_utf8_lossy(&out.stderr).trim(),
                    "cannot look for rules an earlier run left behind");
                continue;
            }
            // No iptables here: nothing can have been left behind.
            Err(e) if not_found(&e) => continue,
            Err(e) => {
                tracing::warn!(program = %save, error = %format!("{e:#}"),
                    "cannot look for rules an earlier run left behind");
                continue;
            }
        };
        let text = String::from_utf8_lossy(&out.stdout);
        for (purpose, wanted) in [
            (Purpose::Masquerade, masquerade && used),
            (Purpose::Forward, forward && used),
        ] {
            let declared = format!(":{} ", purpose.chain());
            if !wanted && text.lines().any(|l| l.starts_with(&declared)) {
                tracing::info!(
                    program = family.program(),
                    chain = purpose.chain(),
                    "removing the rules an earlier run left behind"
                );
                let wait = version_of(family.program(), limit)
                    .map_or(Wait::Seconds, |v| Wait::for_version(&v));
                Ipt {
                    program: family.program(),
                    wait,
                    purpose,
                    limit,
                }
                .remove_chain();
            }
        }
    }
}

/// Keeps the rules in place until `cancel`: every `--iptables-resync` and whenever our lease
/// changes; then leaves them, for the next start to take over. `written_for` is set to the
/// lease the rules were last written for, once a rebuild for it has run (done or failed, then
/// retried): subnet.env, which hands the subnet to workloads, waits for it after a move, as it
/// waits for the install at start.
pub fn spawn_resync(
    mut masq: Masq,
    mut state: watch::Receiver<LeaseState>,
    host: super::status::HostSteps,
    cancel: CancellationToken,
    written_for: watch::Sender<SubnetKey>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(masq.resync);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut watching = true;
        // The last failure logged: a lasting one (a kernel without ip6_tables, say) is logged
        // when it starts and when it changes, not at every check.
        let mut failing: Option<String> = None;
        loop {
            // Whether this check follows a lease change (the rules change with it, as expected).
            let mut moved = false;
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
                r = state.changed(), if watching => {
                    if r.is_err() {
                        watching = false;
                        continue;
                    }
                    let own = state.borrow_and_update().own.as_ref().map(|l| l.key);
                    match own {
                        Some(key) if key != masq.lease => {
                            tracing::info!(subnet = %key, "lease changed; rebuilding iptables rules");
                            masq = masq.for_lease(&key);
                            moved = true;
                        }
                        _ => continue,
                    }
                }
            }
            let (m, limit) = (masq.clone(), Limit::until_cancelled(&cancel));
            let checked = tokio::task::spawn_blocking(move || m.ensure(&limit)).await;
            if cancel.is_cancelled() {
                // Cut short, not failed: the next start checks them again.
                break;
            }
            written_for.send_if_modified(|k| std::mem::replace(k, masq.lease) != masq.lease);
            match checked {
                Ok(Ok(changed)) => {
                    if failing.take().is_some() {
                        tracing::info!("iptables rules in place again");
                    } else if moved && changed {
                        tracing::info!("iptables rules rebuilt for the new lease");
                    } else if changed {
                        tracing::warn!("iptables rules were missing; re-added");
                    }
                }
                Ok(Err(e)) => {
                    let error = format!("{e:#}");
                    if failing.as_ref() != Some(&error) {
                        tracing::error!(error = %error, retry_s = masq.resync.as_secs(),
                            "cannot restore iptables rules (retrying, logged again when the \
                             error changes)");
                        failing = Some(error);
                    }
                }
                Err(e) => tracing::error!(error = %e, "iptables check panicked"),
            }
            host.set("iptables", failing.as_ref());
        }
        tracing::info!(
            "iptables rules left in place (as flanneld leaves its): containers keep reaching \
             the outside until the next start takes them over; to remove them for good, see \
             \"Uninstalling\" in the README"
        );
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipnetwork::{Ipv4Network, Ipv6Network};

    fn v4(s: &str) -> IpNetwork {
        IpNetwork::V4(s.parse::<Ipv4Network>().unwrap())
    }

    #[test]
    fn ipv4_rules_are_flannels_head_rules_in_order() {
        let rules = chain_rules(Family::V4, v4("198.19.0.0/16"), v4("198.19.7.0/24"), true);
        let text: Vec<String> = rules.iter().map(|r| r.join(" ")).collect();
        let c = "-m comment --comment linen masq";
        assert_eq!(
            text,
            [
                format!("-m mark --mark 0x4000/0x4000 {c} -j RETURN"),
                format!("-s 198.19.7.0/24 -d 198.19.0.0/16 {c} -j RETURN"),
                format!("-s 198.19.0.0/16 -d 198.19.7.0/24 {c} -j RETURN"),
                format!("! -s 198.19.0.0/16 -d 198.19.7.0/24 {c} -j RETURN"),
                format!("-s 198.19.0.0/16 ! -d 224.0.0.0/4 {c} -j MASQUERADE --random-fully"),
                format!("! -s 198.19.0.0/16 -d 198.19.0.0/16 {c} -j MASQUERADE --random-fully"),
            ]
        );
        // The comment is one argument, not three.
        assert!(rules[0].contains(&COMMENT.to_owned()));
    }

    #[test]
    fn ipv6_rules_use_ipv6_multicast_and_random_fully_is_optional() {
        let n = IpNetwork::V6("fd00:19::/48".parse::<Ipv6Network>().unwrap());
        let l = IpNetwork::V6("fd00:19:0:7::/64".parse::<Ipv6Network>().unwrap());
        let rules = chain_rules(Family::V6, n, l, false);
        assert_eq!(
            rules[4].join(" "),
            "-s fd00:19::/48 ! -d ff00::/8 -m comment --comment linen masq -j MASQUERADE"
        );
        assert!(rules.iter().all(|r| !r.contains(&"--random-fully".into())));
        assert_eq!(Family::V6.program(), "ip6tables");
    }

    #[test]
    fn random_fully_needs_iptables_1_6_2() {
        assert!(supports_random_fully("iptables v1.8.9 (nf_tables)"));
        assert!(supports_random_fully("iptables v1.6.2"));
        assert!(!supports_random_fully("iptables v1.6.1"));
        assert!(!supports_random_fully("iptables v1.4.21"));
        assert!(!supports_random_fully("garbage"));
    }

    #[test]
    fn the_lock_wait_flag_follows_the_version() {
        let wait = |line: &str| Wait::for_version(line).args().join(" ");
        assert_eq!(wait("iptables v1.8.9 (nf_tables)"), "-w 5");
        assert_eq!(wait("iptables v1.6.0"), "-w 5");
        // Debian 8's 1.4.21: -w takes no seconds (RHEL 7 backported them; a bare -w works
        // there too).
        assert_eq!(wait("iptables v1.4.21"), "-w");
        assert_eq!(wait("iptables v1.4.20"), "-w");
        // Debian 7: no -w at all.
        assert_eq!(wait("iptables v1.4.14"), "");
        assert_eq!(wait("garbage"), "-w 5");
    }

    /// A stand-in for iptables that exits with `code` and says so on stderr.
    fn fake_iptables(dir: &std::path::Path, code: i32) -> String {
        fake_iptables_script(
            dir,
            &format!("iptables-{code}"),
            &format!("echo \"exit {code}\" >&2\nexit {code}\n"),
        )
    }

    /// An executable `name` in `dir` running `body` with /bin/sh; its path.
    fn fake_iptables_script(dir: &std::path::Path, name: &str, body: &str) -> String {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        // A process another test thread forks while the file is open for writing holds it
        // until it execs: running it fails with ETXTBSY ("Text file busy") meanwhile.
        for _ in 0..100 {
            match std::process::Command::new(&path).arg("--version").output() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                _ => break,
            }
        }
        path.to_string_lossy().into_owned()
    }

    /// A command that does not end (a bare `-w` waiting for a lock held for good) is stopped
    /// at the deadline; one that ends is read as usual.
    #[test]
    fn a_command_that_does_not_end_is_stopped_at_the_deadline() {
        // A group of its own, as `run_bounded` starts commands: the kill at the deadline
        // takes the shell's `sleep` too, which would otherwise outlive the test.
        let spawn = |script: &str| {
            Command::new("sh")
                .args(["-c", script])
                .process_group(0)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let started = Instant::now();
        let e = finish_within(
            spawn("sleep 60"),
            Duration::from_millis(300),
            None,
            Some("does another program hold the xtables lock?"),
        )
        .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("xtables lock"), "{e}");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "waited for the command"
        );
        let out = finish_within(
            spawn("echo out; echo err >&2; exit 3"),
            Duration::from_secs(30),
            None,
            None,
        )
        .unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(
            (&out.stdout[..], &out.stderr[..]),
            (&b"out\n"[..], &b"err\n"[..])
        );
    }

    /// The daemon stopping ends a command that waits (a resync check waiting for the xtables
    /// lock), and all commands of a removal share one budget: the way out fits the unit's stop
    /// timeout.
    #[test]
    fn a_stop_cuts_commands_short() {
        let cancel = CancellationToken::new();
        let child = Command::new("sleep").arg("60").spawn().unwrap();
        let started = Instant::now();
        let stopper = {
            let cancel = cancel.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                cancel.cancel();
            })
        };
        let e = finish_within(child, IPTABLES_DEADLINE, Some(&cancel), None).unwrap_err();
        stopper.join().unwrap();
        assert_eq!(e.kind(), std::io::ErrorKind::Interrupted, "{e}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "waited for the command"
        );

        // A removal whose every command hangs: the first takes the whole budget, the others
        // do not start, and the chain is reported as left behind.
        let dir = tempfile::tempdir().unwrap();
        let program = fake_iptables_script(
            dir.path(),
            "hangs",
            "case \"$1\" in --version) exit 0;; esac\nexec sleep 60\n",
        );
        let limit = Limit::within(Duration::from_millis(300));
        let started = Instant::now();
        let removed = ipt(&program, &limit).remove_chain();
        assert!(!removed);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the removal took {:?}",
            started.elapsed()
        );
        let e = ipt(&program, &limit)
            .run("-F", "LINEN-POSTRTG", &[])
            .unwrap_err();
        assert!(format!("{e:#}").contains("ran out"), "{e:#}");
        cancel.cancel();
        let stopping = Limit::until_cancelled(&cancel);
        assert!(stopping.spent().is_some());
        assert!(Limit::default().spent().is_none());
    }

    /// The kind of the I/O error behind `e`, if any.
    fn io_kind(e: &anyhow::Error) -> Option<std::io::ErrorKind> {
        e.chain()
            .find_map(|c| c.downcast_ref::<std::io::Error>())
            .map(std::io::Error::kind)
    }

    /// What `f` returns, having checked that it took less than `secs` seconds.
    fn quickly<T>(secs: u64, f: impl FnOnce() -> T) -> T {
        let started = Instant::now();
        let t = f();
        assert!(
            started.elapsed() < Duration::from_secs(secs),
            "took {:?}",
            started.elapsed()
        );
        t
    }

    /// An iptables command with `program` in table nat, with a bare `-w`, within `limit`.
    fn ipt<'a>(program: &'a str, limit: &'a Limit) -> Ipt<'a> {
        Ipt {
            program,
            wait: Wait::Bare,
            purpose: Purpose::Masquerade,
            limit,
        }
    }

    /// Output larger than the pipes hold (an `iptables-save` on a Kubernetes host prints
    /// megabytes) is read while the command runs: all of it comes back, well before the
    /// deadline, instead of the command waiting on a full pipe until it is killed.
    #[test]
    fn output_larger_than_a_pipe_is_read_in_full() {
        let dir = tempfile::tempdir().unwrap();
        let program = fake_iptables_script(
            dir.path(),
            "talkative",
            "head -c 300000 /dev/zero | tr '\\0' x\nhead -c 100000 /dev/zero | tr '\\0' y >&2\n",
        );
        let limit = Limit::within(Duration::from_secs(5));
        let out = quickly(3, || {
            ipt(&program, &limit)
                .run("-S", "LINEN-POSTRTG", &[])
                .unwrap()
        });
        assert!(out.status.success());
        assert_eq!(out.stdout, vec![b'x'; 300_000]);
        assert_eq!(out.stderr, vec![b'y'; 100_000]);
        let out = quickly(3, || saved_rules(&program, &limit).unwrap());
        assert_eq!(out.stdout.len(), 300_000);
    }

    /// Whether process `pid` has ended (gone, or a zombie nobody reaped yet).
    fn ended(pid: &str) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z'))
        })
    }

    /// A wrapper that exits leaving a process behind that holds its stdout does not hold the
    /// command up: after a short grace the leftover is killed with the wrapper's process
    /// group, and the wrapper's exit status and output come back. One that left the group
    /// (setsid) is not waited for either.
    #[test]
    fn a_process_left_holding_the_output_does_not_hold_the_command() {
        let dir = tempfile::tempdir().unwrap();
        // Runs a wrapper that starts `leftover` in the background, prints its pid and exits.
        let run = |name: &str, leftover: &str| {
            let program = fake_iptables_script(
                dir.path(),
                name,
                &format!("case \"$1\" in --version) exit 0;; esac\n{leftover} &\necho \"$!\"\n"),
            );
            let out = quickly(5, || {
                ipt(&program, &Limit::default())
                    .run("-S", "LINEN-POSTRTG", &[])
                    .unwrap()
            });
            assert!(out.status.success(), "{:?}", out.status);
            let stdout = String::from_utf8(out.stdout).unwrap();
            assert!(!stdout.trim().is_empty(), "no pid in {stdout:?}");
            stdout.trim().to_owned()
        };
        let pid = run("leaves-one-behind", "sleep 30");
        let until = Instant::now() + Duration::from_secs(5);
        while !ended(&pid) {
            assert!(Instant::now() < until, "process {pid} was not killed");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Not in the group: it lives on, and is not waited for. Ended here, by its pid.
        let pid = run("leaves-one-outside", "setsid sleep 30");
        let _ = Command::new("kill").arg(&pid).status();
    }

    /// `--version` and `iptables-save` are bounded like every iptables command: one that
    /// hangs is stopped at its deadline, or when linen stops, and the error says what ran and
    /// why it was stopped.
    #[test]
    fn a_hanging_version_or_save_is_stopped() {
        let dir = tempfile::tempdir().unwrap();
        // Hangs only once armed: making it runs it once.
        let armed = dir.path().join("armed");
        let program = fake_iptables_script(
            dir.path(),
            "hangs-when-armed",
            &format!("[ -e '{}' ] && exec sleep 30\nexit 0\n", armed.display()),
        );
        std::fs::write(&armed, "").unwrap();
        let soon = || Limit::within(Duration::from_millis(300));
        // Stopped at the bound, or (a machine stalled past it) not started at all.
        let stopped = |e: &anyhow::Error, kind: std::io::ErrorKind, not_run: &str| {
            let text = format!("{e:#}");
            assert!(io_kind(e) == Some(kind) || text.contains(not_run), "{text}");
            text
        };
        let ran_out = "the time for removing the rules ran out";
        let e = quickly(5, || version_of(&program, &soon()).unwrap_err());
        let text = stopped(&e, std::io::ErrorKind::TimedOut, ran_out);
        assert!(text.contains(&format!("`{program} --version`")), "{text}");
        let e = quickly(5, || saved_rules(&program, &soon()).unwrap_err());
        stopped(&e, std::io::ErrorKind::TimedOut, ran_out);

        // Linen stopping meanwhile.
        let cancel = CancellationToken::new();
        let e = std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(200));
                cancel.cancel();
            });
            quickly(5, || {
                saved_rules(&program, &Limit::until_cancelled(&cancel)).unwrap_err()
            })
        });
        stopped(
            &e,
            std::io::ErrorKind::Interrupted,
            "not run: linen is stopping",
        );
        // `--version` is bounded more tightly than the commands that wait for the lock.
        assert_eq!(
            Limit::default().deadline(VERSION_DEADLINE),
            VERSION_DEADLINE
        );
        assert!(VERSION_DEADLINE < IPTABLES_DEADLINE);
    }

    /// A chain that was never there (or a missing iptables) counts as removed, so the
    /// "left behind" warning is not given for nothing; a real failure does not.
    #[test]
    fn a_chain_that_was_never_there_counts_as_removed() {
        let dir = tempfile::tempdir().unwrap();
        let remove = |program: &str| {
            Ipt {
                program,
                wait: Wait::Bare,
                purpose: Purpose::Forward,
                limit: &Limit::default(),
            }
            .remove_chain()
        };
        let absent = fake_iptables_script(
            dir.path(),
            "absent",
            "echo 'iptables: No chain/target/match by that name.' >&2\nexit 1\n",
        );
        assert!(remove(&absent));
        assert!(remove(&dir.path().join("not-installed").to_string_lossy()));
        let broken = fake_iptables_script(dir.path(), "broken", "echo 'locked' >&2\nexit 4\n");
        assert!(!remove(&broken));
    }

    #[test]
    fn only_exit_status_1_means_a_rule_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let rule = jump_rule(Purpose::Forward);
        let check = |code| {
            let program = fake_iptables(dir.path(), code);
            Ipt {
                program: &program,
                wait: Wait::Bare,
                purpose: Purpose::Forward,
                limit: &Limit::default(),
            }
            .exists("FORWARD", &rule)
        };
        assert!(check(0).unwrap());
        assert!(!check(1).unwrap());
        // A parameter problem (2) or the lock not free within the wait (4) is an error, which
        // names the command and what it said.
        for code in [2, 4] {
            let e = format!("{:#}", check(code).unwrap_err());
            assert!(
                e.contains("-C FORWARD") && e.contains(&format!("exit {code}")),
                "{e}"
            );
        }
    }

    #[test]
    fn a_new_lease_gets_new_rules_for_the_same_network() {
        let set = RuleSet::masquerade(
            Family::V4,
            Wait::Seconds,
            v4("198.19.0.0/16"),
            v4("198.19.7.0/24"),
            false,
        );
        let old = SubnetKey::parse("198.19.7.0-24").unwrap();
        let masq = Masq {
            sets: vec![
                RuleSet::forward(Family::V4, Wait::Seconds, v4("198.19.0.0/16")),
                set,
            ],
            lease: old,
            resync: Duration::from_secs(7),
        };
        let new = SubnetKey::parse("198.19.9.0-24").unwrap();
        let moved = masq.for_lease(&new);
        assert_eq!(moved.lease, new);
        assert_eq!(moved.resync, Duration::from_secs(7));
        assert!(moved.sets[1].rules[1].contains(&"198.19.9.0/24".to_owned()));
        // The FORWARD rules name only the network: unchanged.
        assert_eq!(moved.sets[0].rules, masq.sets[0].rules);
    }

    /// A start stopped before it could ask iptables for its version is told so, not taken
    /// for a host without iptables (before: "running without them … Install iptables" for
    /// the FORWARD rules, and the start went on without them).
    #[test]
    fn a_stop_is_not_taken_for_a_missing_iptables() {
        let config = NetworkConfig::from_json(r#"{"Network":"198.19.0.0/16"}"#).unwrap();
        let lease = SubnetKey::parse("198.19.7.0-24").unwrap();
        let cancel = CancellationToken::new();
        cancel.cancel();
        let opts = Options {
            masquerade: false,
            forward: true,
            resync: Duration::from_secs(5),
            no_random_fully: false,
        };
        let Err(e) = Masq::new(&config, &lease, opts, &Limit::until_cancelled(&cancel)) else {
            panic!("a stopped start went on");
        };
        assert!(format!("{e:#}").contains("linen is stopping"), "{e:#}");
    }

    #[test]
    fn forward_rules_are_flannels_accepts_for_the_network() {
        let text: Vec<String> = forward_rules(v4("198.19.0.0/16"))
            .iter()
            .map(|r| r.join(" "))
            .collect();
        let c = "-m comment --comment linen forward";
        assert_eq!(
            text,
            [
                format!("-s 198.19.0.0/16 {c} -j ACCEPT"),
                format!("-d 198.19.0.0/16 {c} -j ACCEPT"),
            ]
        );
        assert_eq!(
            jump_rule(Purpose::Forward).join(" "),
            format!("{c} -j LINEN-FWD")
        );
        assert_eq!(
            (Purpose::Forward.table(), Purpose::Forward.hook()),
            ("filter", "FORWARD")
        );
    }
}
