//! Test hosts on one machine: network namespaces joined by veth, for the namespace tests,
//! `linen bench` and `linen demo`. Needs root. Imports nothing else of linen but [`crate::sys`]
//! (one system call).
//!
//! Every namespace and process a [`Lab`] creates is removed when it is dropped (also when a test
//! panics), and only those: processes are stopped by the PIDs it started. A program built to
//! abort on a panic drops nothing; the processes and namespaces of a lab that
//! [`Lab::remove_on_panic`] are then removed by a panic hook instead (`linen bench`, `linen
//! demo`), which keeps its scratch directory for a look. Addresses come from the benchmarking
//! ranges only: underlay `198.18.0.0/16` and `fd00:18::/64`, overlays use
//! `198.19.0.0/16` and `fd00:19::/48`. Namespaces get no default route.
//!
//! Host setup here runs `ip`; that is fine for a lab. The daemon itself uses netlink.

use std::fmt;
use std::io::{self, Write as _};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use crate::sys;

/// Whether this process runs as root (namespaces and TUN devices need it).
pub fn is_root() -> bool {
    // /proc/self/status has "Uid:\t<real>\t<effective>…"; no libc call needed.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// An error from a lab command, with the command line and its stderr.
#[derive(Debug)]
pub struct LabError {
    /// What was run.
    pub command: String,
    /// What went wrong.
    pub detail: String,
}

impl fmt::Display for LabError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` failed: {}", self.command, self.detail)
    }
}

impl std::error::Error for LabError {}

/// Result of lab operations.
pub type Result<T> = std::result::Result<T, LabError>;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// The switch namespace's underlay IPv4 address (see [`Lab::switch_host`]).
pub const SWITCH_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);

/// The switch namespace's underlay IPv6 address.
pub const SWITCH_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 0xfe);

/// One test host: a network namespace whose `eth0` is joined to the lab's underlay.
#[derive(Clone, Debug)]
pub struct Host {
    /// Namespace name.
    pub ns: String,
    /// Underlay IPv4 address on `eth0` (198.18.0.x/24).
    pub ip: Ipv4Addr,
    /// Underlay IPv6 address on `eth0` (fd00:18::x/64).
    pub ip6: Ipv6Addr,
    /// 1-based host number.
    pub index: u8,
}

impl Host {
    /// A command that runs inside this host's namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, program]);
        c
    }

    /// Runs a program in the namespace and returns its output (any exit status).
    pub fn run(&self, program: &str, args: &[&str]) -> Result<Output> {
        let mut c = self.command(program);
        c.args(args);
        output(c)
    }

    /// Runs a program in the namespace; fails unless it exits 0.
    pub fn run_ok(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = self.run(program, args)?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(LabError {
                command: format!("ip netns exec {} {program} {}", self.ns, args.join(" ")),
                detail: format!(
                    "{}: {}{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim(),
                    String::from_utf8_lossy(&out.stdout).trim()
                ),
            })
        }
    }

    /// Runs `ip ARGS` in the namespace; fails unless it exits 0.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        self.run_ok("ip", args)
    }
}

/// A set of test hosts and the processes started in them; all removed on drop.
pub struct Lab {
    prefix: String,
    hosts: Vec<Host>,
    switch: Option<String>,
    /// Namespaces added after construction ([`Lab::add_outside`]).
    extra: Vec<String>,
    scratch: Option<PathBuf>,
    children: Vec<(String, Child)>,
    /// The lab's entry in [`ON_PANIC`], when it asked to be removed on a panic.
    on_panic: Option<u64>,
}

impl Lab {
    /// Builds `n` hosts (1..=200) named `<prefix>-<pid>-<seq>-h<i>`. Two hosts are joined by one
    /// veth pair; three or more by veth to a bridge in a switch namespace. Each host's `eth0`
    /// gets 198.18.0.`<i>`/24 and fd00:18::`<i>`/64, MTU `mtu`, and loopback is up.
    pub fn new(prefix: &str, n: u8, mtu: u32) -> Result<Lab> {
        assert!((1..=200).contains(&n), "a lab has 1..=200 hosts");
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{prefix}-{}-{seq}", std::process::id());
        let mut lab = Lab {
            prefix: prefix.clone(),
            hosts: Vec::new(),
            switch: None,
            extra: Vec::new(),
            scratch: None,
            children: Vec::new(),
            on_panic: None,
        };
        for i in 1..=n {
            let ns = format!("{prefix}-h{i}");
            run_ok(Command::new("ip").args(["netns", "add", &ns]))?;
            lab.hosts.push(Host {
                ns,
                ip: Ipv4Addr::new(198, 18, 0, i),
                ip6: Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, u16::from(i)),
                index: i,
            });
        }
        let mtu_s = mtu.to_string();
        if n == 2 {
            veth(("eth0", &lab.hosts[0].ns), ("eth0", &lab.hosts[1].ns))?;
        } else if n > 2 {
            let sw = format!("{prefix}-sw");
            run_ok(Command::new("ip").args(["netns", "add", &sw]))?;
            lab.switch = Some(sw.clone());
            ns_ok(&sw, &["ip", "link", "add", "br0", "type", "bridge"])?;
            ns_ok(&sw, &["ip", "link", "set", "br0", "mtu", &mtu_s, "up"])?;
            for host in lab.hosts.clone() {
                let port = format!("p{}", host.index);
                veth(("eth0", &host.ns), (&port, &sw))?;
                ns_ok(
                    &sw,
                    &[
                        "ip", "link", "set", &port, "mtu", &mtu_s, "master", "br0", "up",
                    ],
                )?;
            }
        }
        for host in &lab.hosts {
            host.ip(&["link", "set", "lo", "up"])?;
            if n >= 2 {
                host.ip(&["link", "set", "eth0", "mtu", &mtu_s, "up"])?;
                host.ip(&["addr", "add", &format!("{}/24", host.ip), "dev", "eth0"])?;
                host.ip(&[
                    "-6",
                    "addr",
                    "add",
                    &format!("{}/64", host.ip6),
                    "dev",
                    "eth0",
                    "nodad",
                ])?;
            }
        }
        Ok(lab)
    }

    /// The lab's name prefix (unique per lab).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The hosts, in order.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Host `i` (0-based).
    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    /// The switch namespace of a lab with three or more hosts, as one more host on the
    /// underlay, for services every host must reach (a registry such as etcd): its bridge `br0`
    /// gets [`SWITCH_IP`]/24 and [`SWITCH_IP6`]/64 (again on every call; nothing changes) and
    /// its loopback is up. It is none of [`Lab::hosts`]; its `index` is 254. Processes started
    /// in it with [`Lab::spawn`] are stopped on drop like any other. `None` for smaller labs,
    /// which have no switch.
    pub fn switch_host(&self) -> Result<Option<Host>> {
        let Some(sw) = &self.switch else {
            return Ok(None);
        };
        let host = Host {
            ns: sw.clone(),
            ip: SWITCH_IP,
            ip6: SWITCH_IP6,
            index: 254,
        };
        host.ip(&["link", "set", "lo", "up"])?;
        host.ip(&["addr", "replace", &format!("{SWITCH_IP}/24"), "dev", "br0"])?;
        host.ip(&[
            "-6",
            "addr",
            "replace",
            &format!("{SWITCH_IP6}/64"),
            "dev",
            "br0",
            "nodad",
        ])?;
        Ok(Some(host))
    }

    /// A directory for this lab's files (registry, logs), created on first use and removed with
    /// the lab.
    pub fn scratch_dir(&mut self) -> Result<PathBuf> {
        if let Some(dir) = &self.scratch {
            return Ok(dir.clone());
        }
        let dir = std::env::temp_dir().join(&self.prefix);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| LabError {
            command: format!("mkdir {}", dir.display()),
            detail: e.to_string(),
        })?;
        self.scratch = Some(dir.clone());
        self.with_panic_entry(|e| e.scratch = Some(dir.clone()));
        Ok(dir)
    }

    /// Has a panic hook remove this lab (stop its processes, delete its namespaces; its scratch
    /// directory is kept, with `linen demo`'s daemon logs, and named on stderr) should the
    /// program panic while the lab lives: a build that aborts on a panic never drops it. For
    /// `linen bench` and `linen demo`; tests unwind and need no hook. Only labs that asked are
    /// removed, whichever thread panics; afterwards such a lab starts no more processes.
    pub fn remove_on_panic(&mut self) {
        static HOOK: Once = Once::new();
        HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                previous(info);
                remove_labs_on_panic();
            }));
        });
        if self.on_panic.is_some() {
            return;
        }
        static IDS: AtomicU64 = AtomicU64::new(0);
        let id = IDS.fetch_add(1, Ordering::Relaxed);
        self.on_panic = Some(id);
        let entry = Leftovers {
            id,
            pids: self.children.iter().map(|(_, c)| c.id()).collect(),
            namespaces: self.namespaces().cloned().collect(),
            scratch: self.scratch.clone(),
            removed: false,
        };
        panic_list().push(entry);
    }

    /// Changes this lab's entry in [`ON_PANIC`], if it has one.
    fn with_panic_entry(&self, f: impl FnOnce(&mut Leftovers)) {
        if let Some(id) = self.on_panic
            && let Some(entry) = panic_list().iter_mut().find(|l| l.id == id)
        {
            f(entry);
        }
    }

    /// Every namespace of the lab: hosts, switch, outside.
    fn namespaces(&self) -> impl Iterator<Item = &String> {
        self.hosts
            .iter()
            .map(|h| &h.ns)
            .chain(&self.switch)
            .chain(&self.extra)
    }

    /// Adds an "outside" host (a namespace outside the underlay, like a machine on the
    /// internet) linked to host `gateway` (0-based) only: the gateway's `out0` gets
    /// 198.18.1.1/24 and fd00:18:1::1/64, the outside host's `eth0` 198.18.1.2/24 and
    /// fd00:18:1::2/64. The outside host has no other route, so it can answer only packets
    /// whose source lies in 198.18.1.0/24 (e.g. masqueraded by the gateway). Removed on drop.
    pub fn add_outside(&mut self, gateway: usize) -> Result<Host> {
        let ns = format!("{}-out", self.prefix);
        // Recorded first: a panic right after the namespace is made still finds it (deleting
        // one that was never made fails harmlessly).
        self.with_panic_entry(|e| e.namespaces.push(ns.clone()));
        run_ok(Command::new("ip").args(["netns", "add", &ns]))?;
        self.extra.push(ns.clone());
        let gw = self.hosts[gateway].clone();
        veth(("out0", &gw.ns), ("eth0", &ns))?;
        let outside = Host {
            ns,
            ip: Ipv4Addr::new(198, 18, 1, 2),
            ip6: Ipv6Addr::new(0xfd00, 0x18, 1, 0, 0, 0, 0, 2),
            index: 0,
        };
        for (h, dev, v4, v6) in [
            (&gw, "out0", "198.18.1.1/24", "fd00:18:1::1/64"),
            (&outside, "eth0", "198.18.1.2/24", "fd00:18:1::2/64"),
        ] {
            h.ip(&["link", "set", "lo", "up"])?;
            h.ip(&["link", "set", dev, "up"])?;
            h.ip(&["addr", "add", v4, "dev", dev])?;
            h.ip(&["-6", "addr", "add", v6, "dev", dev, "nodad"])?;
        }
        Ok(outside)
    }

    /// Starts a long-running program in a host's namespace; it is killed when the lab drops
    /// (or by [`Lab::stop`]). Returns a handle number.
    pub fn spawn(&mut self, mut cmd: Command, label: &str) -> Result<u32> {
        let mut removed = false;
        self.with_panic_entry(|e| removed = e.removed);
        if removed {
            return Err(LabError {
                command: format!("{cmd:?}"),
                detail: "not started: the lab was removed after a panic".to_owned(),
            });
        }
        let child = cmd.spawn().map_err(|e| LabError {
            command: format!("{cmd:?}"),
            detail: e.to_string(),
        })?;
        let pid = child.id();
        // Recorded right after the start: only a panic on another thread in between misses it.
        self.with_panic_entry(|e| e.pids.push(pid));
        self.children.push((label.to_owned(), child));
        Ok(pid)
    }

    /// Sends SIGTERM to a process started by [`Lab::spawn`] and waits up to `timeout` for it to
    /// exit (then SIGKILL). Returns its exit status.
    pub fn stop(&mut self, pid: u32, timeout: Duration) -> Option<std::process::ExitStatus> {
        let idx = self.children.iter().position(|(_, c)| c.id() == pid)?;
        let (_, mut child) = self.children.remove(idx);
        let id = self.on_panic;
        terminate(&mut child, timeout, || forget_pid(id, pid))
    }

    /// Whether a process started by [`Lab::spawn`] is still running. Does not reap it: a child
    /// is reaped only when the lab stops it (see [`terminate`]).
    pub fn is_running(&self, pid: u32) -> bool {
        self.children.iter().any(|(_, c)| c.id() == pid) && running(pid)
    }
}

/// A veth pair whose ends are created straight in their namespaces, named `(name, namespace)`:
/// nothing is left in the root namespace should a later step fail, since deleting the
/// namespaces removes both ends. Run inside `a`'s namespace: kernels before 6.15 look the
/// first name up in the caller's namespace, so `ip link add eth0 netns NS …` from a root
/// namespace that has an `eth0` fails with "File exists".
fn veth(a: (&str, &str), b: (&str, &str)) -> Result<()> {
    run_ok(Command::new("ip").args([
        "-n", a.1, "link", "add", a.0, "type", "veth", "peer", "name", b.0, "netns", b.1,
    ]))
    .map(drop)
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Each child leaves the panic entry only as it is reaped, and the namespaces only once
        // deleted: a panic on another thread meanwhile still removes what is left.
        let id = self.on_panic;
        for (_, mut child) in self.children.drain(..) {
            let pid = child.id();
            terminate(&mut child, Duration::from_secs(3), || forget_pid(id, pid));
        }
        for ns in self.namespaces() {
            let _ = output_quiet(Command::new("ip").args(["netns", "del", ns]));
        }
        if let Some(id) = id {
            panic_list().retain(|l| l.id != id);
        }
        if let Some(dir) = &self.scratch {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// What the panic hook removes of one lab that asked for it ([`Lab::remove_on_panic`]).
struct Leftovers {
    id: u64,
    /// Its children, none reaped yet (a child leaves before it is reaped): their PIDs cannot
    /// have been reused.
    pids: Vec<u32>,
    namespaces: Vec<String>,
    /// Kept on a panic, and named.
    scratch: Option<PathBuf>,
    /// The hook has removed the lab: it starts nothing more.
    removed: bool,
}

/// The labs to remove on a panic.
static ON_PANIC: Mutex<Vec<Leftovers>> = Mutex::new(Vec::new());

/// [`ON_PANIC`], locked; a poisoned lock is taken over. Nothing that holds the lock can panic
/// (entries are built before, then changed by pushes, clears and retains), so the panic hook's
/// thread never holds it already.
fn panic_list() -> std::sync::MutexGuard<'static, Vec<Leftovers>> {
    ON_PANIC.lock().unwrap_or_else(|e| e.into_inner())
}

/// Takes a child out of its lab's panic entry (before it is reaped).
fn forget_pid(lab: Option<u64>, pid: u32) {
    if let Some(id) = lab
        && let Some(entry) = panic_list().iter_mut().find(|l| l.id == id)
    {
        entry.pids.retain(|p| *p != pid);
    }
}

/// The panic hook's work: stops the processes of every lab that asked (SIGTERM, SIGKILL after
/// 3 s, as on drop; a daemon that stops in order removes what it set up in its namespace),
/// then deletes their namespaces. Their scratch directories stay (`linen demo` keeps its
/// daemons' logs there, the evidence of what went wrong); stderr names them. Each lab is removed once, and starts nothing
/// afterwards. A lab dropped meanwhile on another thread waits for this to finish.
fn remove_labs_on_panic() {
    let mut labs = panic_list();
    let pending: Vec<&mut Leftovers> = labs.iter_mut().filter(|l| !l.removed).collect();
    if pending.is_empty() {
        return;
    }
    let _ = writeln!(
        io::stderr(),
        "removing the namespaces and processes of this run after the panic…"
    );
    let pids: Vec<u32> = pending
        .iter()
        .flat_map(|l| l.pids.iter().copied())
        .collect();
    let signal = |sig: &str, pids: &[u32]| {
        if !pids.is_empty() {
            let pids = pids.iter().map(u32::to_string);
            let _ = output_quiet(Command::new("kill").arg(sig).args(pids));
        }
    };
    signal("-TERM", &pids);
    let deadline = Instant::now() + Duration::from_secs(3);
    while pids.iter().any(|&p| running(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let left: Vec<u32> = pids.iter().copied().filter(|&p| running(p)).collect();
    signal("-KILL", &left);
    for lab in pending {
        for ns in lab.namespaces.drain(..) {
            let _ = output_quiet(Command::new("ip").args(["netns", "del", &ns]));
        }
        if let Some(dir) = &lab.scratch {
            let _ = writeln!(
                io::stderr(),
                "kept this run's files in {}; remove it when done",
                dir.display()
            );
        }
        // Not reaped: still this process's children, so their PIDs stay theirs.
        lab.pids.clear();
        lab.removed = true;
    }
}

/// Whether the child `pid` (not reaped yet) still runs. Asks the kernel without reaping it
/// ([`sys::child_has_exited`]); a PID that is no unreaped child of ours counts as not running,
/// so it is never signalled.
fn running(pid: u32) -> bool {
    matches!(sys::child_has_exited(pid), Ok(false))
}

/// Stops a child of the lab: SIGTERM, then SIGKILL after `timeout`; then `forget` (which takes
/// it out of the panic entry) and only then reaps it, since a reaped PID may be reused. Watches
/// it with [`running`], which does not reap. Children are reaped only here.
fn terminate(
    child: &mut Child,
    timeout: Duration,
    forget: impl FnOnce(),
) -> Option<std::process::ExitStatus> {
    let pid = child.id();
    if running(pid) {
        // SIGTERM by PID through kill(1): we only ever signal processes we started.
        let _ = output_quiet(Command::new("kill").args(["-TERM", &pid.to_string()]));
        let deadline = Instant::now() + timeout;
        while running(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if running(pid) {
            let _ = child.kill();
        }
    }
    forget();
    child.wait().ok()
}

fn ns_ok(ns: &str, argv: &[&str]) -> Result<String> {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).args(argv);
    run_ok(&mut c)
}

fn output(mut c: Command) -> Result<Output> {
    c.stdin(Stdio::null());
    c.output().map_err(|e| LabError {
        command: format!("{c:?}"),
        detail: e.to_string(),
    })
}

fn output_quiet(c: &mut Command) -> io::Result<Output> {
    c.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .output()
}

fn run_ok(c: &mut Command) -> Result<String> {
    c.stdin(Stdio::null());
    let cmdline = format!("{c:?}");
    let out = c.output().map_err(|e| LabError {
        command: cmdline.clone(),
        detail: e.to_string(),
    })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(LabError {
            command: cmdline,
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }
}

/// Polls `f` every 20 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
