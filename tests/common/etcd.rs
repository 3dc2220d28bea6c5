//! A throwaway single-member etcd for integration tests and examples: on loopback with free
//! ports ([`EtcdServer::start`]), or inside a network namespace on one of its addresses
//! ([`EtcdServer::start_in_netns`], for daemons that run in namespaces and cannot reach the
//! root namespace's loopback). A temporary data directory (on tmpfs when there is one, so fsync
//! is cheap); killed by PID on drop — also when the test panics. [`EtcdServer::stop`] and
//! [`EtcdServer::start_again`] restart the same member on the same address, ports and data
//! directory, to test outages.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Server certificate files for a TLS etcd (PEM paths).
#[derive(Clone, Debug)]
pub struct ServerTls {
    /// CA that client certificates must be signed by.
    pub ca: PathBuf,
    /// The server certificate (must name 127.0.0.1).
    pub cert: PathBuf,
    /// The server key.
    pub key: PathBuf,
}

/// A running (or stopped) etcd started by this test.
pub struct EtcdServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// The network namespace etcd runs in (`None`: this process's).
    netns: Option<String>,
    /// The address every listener binds.
    ip: IpAddr,
    client_port: u16,
    peer_port: u16,
    metrics_port: u16,
    tls: Option<ServerTls>,
    /// More command-line arguments for etcd.
    extra: Vec<String>,
}

/// How long etcd may take to become healthy on a busy machine.
const START_DEADLINE: Duration = Duration::from_secs(30);

impl EtcdServer {
    /// Starts a plain-HTTP etcd, or returns `None` (after saying so on stderr) when the `etcd`
    /// binary is not installed.
    pub fn start() -> Option<EtcdServer> {
        EtcdServer::start_with(None)
    }

    /// Starts etcd, serving clients over TLS with client-certificate auth when `tls` is set.
    ///
    /// The ports are picked free, then released for etcd to bind; another test running in
    /// parallel may take one in between, so a start that fails with "address already in use"
    /// is retried on new ports.
    pub fn start_with(tls: Option<ServerTls>) -> Option<EtcdServer> {
        EtcdServer::start_with_args(tls, &[])
    }

    /// [`EtcdServer::start_with`], with more command-line arguments for etcd.
    pub fn start_with_args(tls: Option<ServerTls>, extra: &[String]) -> Option<EtcdServer> {
        for attempt in 1.. {
            let ports = [free_port(), free_port(), free_port()];
            let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
            match EtcdServer::launch(None, ip, ports, tls.clone(), extra.to_vec()) {
                Ok(server) => return server,
                Err(log) if attempt < 5 && log.contains("address already in use") => continue,
                Err(log) => panic!("etcd did not start; log:\n{log}"),
            }
        }
        unreachable!()
    }

    /// Starts a plain-HTTP etcd inside the network namespace `netns` (which must exist and
    /// have `ip` on an up interface), listening on `ip` only: clients on port 2379, peers on
    /// 2380, metrics on 2381 (a namespace made for the test has them all free).
    pub fn start_in_netns(netns: &str, ip: Ipv4Addr) -> Option<EtcdServer> {
        EtcdServer::launch(
            Some(netns.to_owned()),
            IpAddr::V4(ip),
            [2379, 2380, 2381],
            None,
            Vec::new(),
        )
        .unwrap_or_else(|log| panic!("etcd did not start; log:\n{log}"))
    }

    fn launch(
        netns: Option<String>,
        ip: IpAddr,
        [client_port, peer_port, metrics_port]: [u16; 3],
        tls: Option<ServerTls>,
        extra: Vec<String>,
    ) -> Result<Option<EtcdServer>, String> {
        if !binary_available() {
            let why = "the `etcd` binary is not installed (Debian: apt-get install etcd-server)";
            // As common::skipped (this file is also built into an example, without it).
            if std::env::var_os("LINEN_TEST_REQUIRE_ALL").is_some_and(|v| v == "1") {
                panic!("{why}, and LINEN_TEST_REQUIRE_ALL=1 forbids skipping");
            }
            use std::io::Write;
            // The stderr handle, not eprintln!: libtest would capture it in a passing test.
            let _ = writeln!(std::io::stderr(), "SKIPPED: {why}");
            return Ok(None);
        }
        let base = if Path::new("/dev/shm").is_dir() {
            tempfile::Builder::new()
                .prefix("linen-etcd-")
                .tempdir_in("/dev/shm")
        } else {
            tempfile::Builder::new().prefix("linen-etcd-").tempdir()
        };
        let mut server = EtcdServer {
            child: None,
            dir: base.expect("create a temporary directory for etcd"),
            netns,
            ip,
            client_port,
            peer_port,
            metrics_port,
            tls,
            extra,
        };
        server.try_start()?;
        Ok(Some(server))
    }

    /// The client URL, e.g. `http://127.0.0.1:23790`.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:{}", self.ip, self.client_port)
    }

    /// The PID of the running etcd, if it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A command that runs `program` where etcd runs (inside its namespace, if any).
    fn command(&self, program: &str) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
            None => Command::new(program),
        }
    }

    /// A directory for the test's own files; removed with the server.
    pub fn scratch(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Kills etcd (SIGKILL, by PID) and waits for it to exit. The data directory is kept.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the member again on the same ports and data directory and waits until healthy.
    pub fn start_again(&mut self) {
        if let Err(log) = self.try_start() {
            panic!("etcd did not start again; log:\n{log}");
        }
    }

    /// Starts the member and waits until healthy; the log's tail if it exits or stays unhealthy.
    fn try_start(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "etcd is already running");
        let data = self.dir.path().join("data");
        let log_path = self.dir.path().join("etcd.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("open etcd log");
        let client_url = self.endpoint();
        let peer_url = format!("http://{}:{}", self.ip, self.peer_port);
        // `ip netns exec` execs etcd in place, so the child's PID is etcd's.
        let mut cmd = self.command("etcd");
        cmd.arg("--name=linen-test")
            .arg(format!("--data-dir={}", data.display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=linen-test={peer_url}"))
            .arg(format!(
                "--listen-metrics-urls=http://{}:{}",
                self.ip, self.metrics_port
            ))
            .arg("--initial-cluster-state=new")
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log);
        if let Some(tls) = &self.tls {
            cmd.arg(format!("--cert-file={}", tls.cert.display()))
                .arg(format!("--key-file={}", tls.key.display()))
                .arg(format!("--trusted-ca-file={}", tls.ca.display()))
                .arg("--client-cert-auth");
        }
        self.child = Some(cmd.spawn().expect("spawn etcd"));
        let deadline = Instant::now() + START_DEADLINE;
        while Instant::now() < deadline {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!(
                    "etcd exited with {status} during start-up:\n{}",
                    tail(&log_path)
                ));
            }
            if self.healthy() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.stop();
        Err(format!(
            "etcd did not become healthy within {START_DEADLINE:?}:\n{}",
            tail(&log_path)
        ))
    }

    /// Whether etcd answers `GET /health` with true (on the plain-HTTP metrics listener,
    /// available even when clients need TLS).
    fn healthy(&self) -> bool {
        match &self.netns {
            None => healthy(self.ip, self.metrics_port),
            // Not reachable from this namespace: ask from inside.
            Some(_) => self
                .command("python3")
                .args(["-c", HEALTH_PY, &self.ip.to_string()])
                .arg(self.metrics_port.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
        }
    }

    /// Runs `etcdctl` against this server with `args`, panicking with its output on failure.
    pub fn etcdctl(&self, args: &[&str]) -> String {
        let out = self
            .command("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint()))
            .args(args)
            .output()
            .expect("run etcdctl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "etcdctl {args:?} failed: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
        text
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn binary_available() -> bool {
    Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A free loopback port below the kernel's ephemeral range (32768 and up by default), each
/// handed out once per process: a port the kernel picks could go, while an outage test has its
/// etcd stopped, to another test's new etcd, and the restart on the same ports would fail.
/// Ports something else holds are skipped.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Processes running at once (a developer's two test runs) start at different places.
    let start = std::process::id().wrapping_mul(97);
    for _ in 0..12_000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + (start.wrapping_add(n) % 12_000) as u16;
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in 20000..32000")
}

/// `GET /health` on `ip:port`, for [`EtcdServer::healthy`] inside a namespace; exits 0 when
/// healthy.
const HEALTH_PY: &str = "import sys, urllib.request\n\
    r = urllib.request.urlopen(f'http://{sys.argv[1]}:{sys.argv[2]}/health', timeout=2).read()\n\
    sys.exit(0 if b'\"health\":\"true\"' in r else 1)";

/// `GET /health` on the plain-HTTP metrics listener.
fn healthy(ip: IpAddr, port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect((ip, port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply.contains("\"health\":\"true\"")
}

fn tail(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let start = bytes.len().saturating_sub(4000);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}
