//! The embedded default registry: flannel's keys as files under one directory, no server.
//!
//! Layout (`<dir>` is the registry location):
//! - `<dir>/config`: the network config JSON, exactly as stored in etcd.
//! - `<dir>/subnets/<key>`, e.g. `subnets/198.19.1.0-24`: line 1 is the lease value exactly as
//!   flannel stores it (`{"PublicIP":"198.18.1.1","PublicIPv6":null}`); an optional line 2
//!   `expires=<unix seconds>`. Without line 2 the key is a reservation, so configuration
//!   management can drop static reservations in.
//! - `<dir>/revision`: a decimal write counter, raised under the lock by every change linen
//!   makes to `subnets/` (creates, renewals, deletions, takeovers of expired keys).
//! - `<dir>/.lock`: the lock file. Writers hold an exclusive `flock`, readers a shared one, so
//!   daemons in separate processes (or with separate handles) never interleave.
//!
//! Every write goes to a dot-file with an unpredictable name in the target's directory, is
//! fsynced, then renamed over the target (the directory is fsynced too). Expired leases are
//! invisible to readers; a create may take an expired key over. Malformed names or values are
//! skipped with one warning per (file, content), and so is anything under `subnets/` that is not
//! a regular file: a symbolic link is not followed, and a FIFO does not stall the reader.
//!
//! Change notification is polling (every 200 ms by default): a watch compares the revision, a
//! fingerprint of `subnets/` (names, sizes, mtimes, inodes, ctimes: hand-made edits do not
//! raise the revision)
//! and the earliest expiry, and delivers a [`WatchEvent::Snapshot`] when any of them moved.
//!
//! Blocking I/O: every operation runs on tokio's blocking pool (`spawn_blocking`), because
//! waiting for the flock of another daemon must not stall the runtime.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

use super::{LeaseList, LeaseWatch, Registry, RegistryError, Revision, WatchEvent};
use crate::model::{LEASE_TTL, Lease, LeaseAttrs, NetworkConfig, NetworkConfigSpec, SubnetKey};

/// How often a watch looks at the directory. A new lease reaches every watcher within this
/// plus one list.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(200);

/// How long an operation waits for the directory's lock before it reports the registry as
/// unavailable. Every operation holds it for milliseconds.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// How long an operation may take in all (the lock wait included) before it is reported as the
/// registry being unavailable. A network file system whose server is gone blocks reads and
/// writes for as long as it is gone (a "hard" NFS mount): without a deadline the lease manager
/// waited inside a renewal, and the status said connected, until the lease ran out. Within the
/// unit's `TimeoutStopSec=30`, since a stop waits for an operation under way.
const OP_DEADLINE: Duration = Duration::from_secs(15);

/// How many operations may be under way at once, abandoned ones included (a thread blocked in
/// the file system cannot be stopped): past that, an operation fails at once, so a hung file
/// system does not take a thread per retry.
const MAX_IN_FLIGHT: usize = 64;

/// How far the time a file server stamps on a lease file written may be from this host's clock
/// before linen warns: every host judges a lease's expiry by its own clock, so hosts sharing a
/// directory must keep their clocks in step (NTP), and a file server's clock stands for theirs.
const CLOCK_SKEW_WARN: Duration = Duration::from_secs(60);

/// How far `stamped` (a file's mtime, set by the file system as it was written) lies outside
/// [`before`, `after`] (this host's clock around the write); `None` within [`CLOCK_SKEW_WARN`].
/// A local file system stamps with this host's clock, a network one (NFS) with the server's.
fn clock_skew(before: SystemTime, after: SystemTime, stamped: SystemTime) -> Option<Duration> {
    let off = match stamped.duration_since(after) {
        Ok(ahead) => ahead,
        Err(_) => before.duration_since(stamped).unwrap_or_default(),
    };
    (off > CLOCK_SKEW_WARN).then_some(off)
}

/// flannel's key layout as files under one directory. See the module docs for the format.
#[derive(Clone, Debug)]
pub struct DirectoryRegistry {
    store: Arc<Store>,
    poll_interval: Duration,
    op_deadline: Duration,
}

impl DirectoryRegistry {
    /// A registry in `dir` giving new leases flannel's 24 h TTL. The directory is created on
    /// the first write.
    pub fn new(dir: impl Into<PathBuf>) -> DirectoryRegistry {
        DirectoryRegistry::with_ttl(dir, LEASE_TTL)
    }

    /// A registry giving new leases `ttl` (whole seconds are stored; at least 1 s).
    pub fn with_ttl(dir: impl Into<PathBuf>, ttl: Duration) -> DirectoryRegistry {
        DirectoryRegistry::build(dir.into(), ttl, false)
    }

    fn build(dir: PathBuf, ttl: Duration, require_config: bool) -> DirectoryRegistry {
        DirectoryRegistry {
            store: Arc::new(Store {
                dir,
                ttl: ttl.max(Duration::from_secs(1)),
                warned: Mutex::new(HashMap::new()),
                require_config,
                in_flight: AtomicUsize::new(0),
            }),
            poll_interval: DEFAULT_POLL_INTERVAL,
            op_deadline: OP_DEADLINE,
        }
    }

    /// For a daemon that has read the network config here: from now on a directory without
    /// it is a registry out of reach (moved, deleted, a shared mount gone), never an empty one
    /// to recreate. Without this (admin commands), a missing directory lists as empty, so a
    /// mistyped `--registry-dir` is warned about rather than failed on.
    pub fn requiring_config(self) -> DirectoryRegistry {
        DirectoryRegistry {
            op_deadline: self.op_deadline,
            ..DirectoryRegistry::build(self.store.dir.clone(), self.store.ttl, true)
                .with_poll_interval(self.poll_interval)
        }
    }

    /// Sets how long an operation may take before it is reported as the registry being
    /// unavailable (15 s by default).
    pub fn with_op_deadline(mut self, deadline: Duration) -> DirectoryRegistry {
        self.op_deadline = deadline;
        self
    }

    /// Sets how often watches poll the directory.
    pub fn with_poll_interval(mut self, interval: Duration) -> DirectoryRegistry {
        self.poll_interval = interval;
        self
    }

    /// The registry directory.
    pub fn dir(&self) -> &Path {
        &self.store.dir
    }

    async fn blocking<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Store) -> Result<T, RegistryError> + Send + 'static,
    ) -> Result<T, RegistryError> {
        let unavailable = |reason: String| RegistryError::Unavailable {
            location: self.location(),
            reason,
        };
        let store = Arc::clone(&self.store);
        let running = store.in_flight.fetch_add(1, Ordering::AcqRel);
        if running >= MAX_IN_FLIGHT {
            store.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(unavailable(format!(
                "{running} operations on the directory have not returned (is it on a network \
                 file system whose server is gone?)"
            )));
        }
        let task = tokio::task::spawn_blocking(move || {
            // Given back however the operation ends (a panic included).
            struct Done<'a>(&'a AtomicUsize);
            impl Drop for Done<'_> {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, Ordering::AcqRel);
                }
            }
            let _done = Done(&store.in_flight);
            op(&store)
        });
        match tokio::time::timeout(self.op_deadline, task).await {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => Err(unavailable(format!("registry task failed: {e}"))),
            // The thread goes on (a blocked file system call cannot be cut short); its result,
            // when it comes, is dropped.
            Err(_) => Err(unavailable(format!(
                "no answer from the directory within {} s (is it on a network file system whose \
                 server is gone?)",
                self.op_deadline.as_secs_f64()
            ))),
        }
    }
}

#[async_trait]
impl Registry for DirectoryRegistry {
    fn location(&self) -> String {
        self.store.dir.display().to_string()
    }

    async fn get_network_config(&self) -> Result<NetworkConfig, RegistryError> {
        self.blocking(Store::read_config).await
    }

    async fn put_network_config(&self, spec: &NetworkConfigSpec) -> Result<(), RegistryError> {
        let spec = spec.clone();
        self.blocking(move |s| s.write_config_if(&spec, true).map(drop))
            .await
    }

    async fn create_network_config(&self, spec: &NetworkConfigSpec) -> Result<bool, RegistryError> {
        let spec = spec.clone();
        self.blocking(move |s| s.write_config_if(&spec, false))
            .await
    }

    async fn list_leases(&self) -> Result<LeaseList, RegistryError> {
        self.blocking(|s| s.list()).await
    }

    async fn create_lease(
        &self,
        key: &SubnetKey,
        attrs: &LeaseAttrs,
    ) -> Result<Lease, RegistryError> {
        let (key, attrs) = (*key, attrs.clone());
        self.blocking(move |s| s.create(key, attrs, true)).await
    }

    async fn create_reservation(
        &self,
        key: &SubnetKey,
        attrs: &LeaseAttrs,
    ) -> Result<Lease, RegistryError> {
        let (key, attrs) = (*key, attrs.clone());
        self.blocking(move |s| s.create(key, attrs, false)).await
    }

    async fn renew_lease(&self, lease: &Lease, attrs: &LeaseAttrs) -> Result<Lease, RegistryError> {
        let (lease, attrs) = (lease.clone(), attrs.clone());
        self.blocking(move |s| s.renew(&lease, attrs)).await
    }

    async fn keep_as_reservation(&self, lease: &Lease) -> Result<Lease, RegistryError> {
        let lease = lease.clone();
        self.blocking(move |s| s.keep_as_reservation(&lease)).await
    }

    async fn revoke_lease(&self, key: &SubnetKey) -> Result<bool, RegistryError> {
        let key = *key;
        self.blocking(move |s| s.revoke(&key)).await
    }

    async fn release_lease(&self, lease: &Lease) -> Result<bool, RegistryError> {
        let lease = lease.clone();
        self.blocking(move |s| s.release(&lease)).await
    }

    async fn revoke_dead(&self, key: &SubnetKey) -> Result<bool, RegistryError> {
        let key = *key;
        self.blocking(move |s| s.revoke_dead(&key)).await
    }

    /// Polling cannot replay changes, so `after` is not needed: the first event is always a
    /// snapshot of the current set, which the caller diffs against its list.
    async fn watch_leases(&self, _after: Revision) -> Result<Box<dyn LeaseWatch>, RegistryError> {
        Ok(Box::new(DirectoryWatch {
            registry: self.clone(),
            seen: None,
            next_expiry: None,
            listed_at: None,
        }))
    }

    fn lease_ttl(&self) -> Duration {
        self.store.ttl
    }
}

/// What a poll compares: the revision and the shape of `subnets/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fingerprint {
    revision: Revision,
    files: u64,
}

/// A polling watch. Its first event is always a snapshot (which also covers any expiry
/// between the caller's list and the watch); later ones come when the fingerprint changes or
/// a lease passes its expiry.
struct DirectoryWatch {
    registry: DirectoryRegistry,
    /// The fingerprint of the last snapshot delivered; `None` before the first or after an
    /// error (so the next success is a snapshot, as the trait promises).
    seen: Option<Fingerprint>,
    next_expiry: Option<SystemTime>,
    /// This host's clock when the last snapshot was listed.
    listed_at: Option<SystemTime>,
}

impl DirectoryWatch {
    /// Whether a poll at `now` that found the fingerprint `unchanged` must list again: the
    /// files changed, a lease has reached its expiry, or the clock went back. Leases hidden
    /// as expired by a clock that ran ahead (a bad RTC, a wrong `date`) are live again once
    /// it is set right, and nothing on disk changes to say so: without the last, their
    /// routes stayed away until a file changed, which may be a renewal hours later.
    fn must_list(&self, unchanged: bool, now: SystemTime) -> bool {
        !unchanged
            || self.next_expiry.is_some_and(|t| t <= now)
            || self.listed_at.is_some_and(|t| now < t)
    }
}

#[async_trait]
impl LeaseWatch for DirectoryWatch {
    async fn next(&mut self) -> Result<WatchEvent, RegistryError> {
        loop {
            if let Some(seen) = self.seen {
                tokio::time::sleep(self.registry.poll_interval).await;
                let current = self.registry.blocking(|s| s.fingerprint()).await;
                match current {
                    Ok(fp) if !self.must_list(fp == seen, SystemTime::now()) => continue,
                    Ok(_) => {}
                    Err(e) => {
                        self.seen = None;
                        return Err(e);
                    }
                }
            }
            let listed_at = SystemTime::now();
            let (list, fp) = match self.registry.blocking(|s| s.list_with_fingerprint()).await {
                Ok(v) => v,
                Err(e) => {
                    self.seen = None;
                    return Err(e);
                }
            };
            self.seen = Some(fp);
            self.listed_at = Some(listed_at);
            self.next_expiry = list.leases.iter().filter_map(|l| l.expiration).min();
            return Ok(WatchEvent::Snapshot(list));
        }
    }
}

/// The synchronous store behind [`DirectoryRegistry`].
#[derive(Debug)]
struct Store {
    dir: PathBuf,
    ttl: Duration,
    /// Malformed files already warned about: file name → hash of its content.
    warned: Mutex<HashMap<String, u64>>,
    /// See [`DirectoryRegistry::requiring_config`].
    require_config: bool,
    /// Operations under way, abandoned ones included (see [`MAX_IN_FLIGHT`]).
    in_flight: AtomicUsize,
}

/// One parsed `subnets/` file.
enum Entry {
    Live(Lease),
    Expired,
    Malformed,
}

impl Store {
    fn subnets(&self) -> PathBuf {
        self.dir.join("subnets")
    }

    fn key_path(&self, key: &SubnetKey) -> PathBuf {
        self.subnets().join(key.to_string())
    }

    fn io_err(&self, what: &str, path: &Path, e: io::Error) -> RegistryError {
        let location = self.dir.display().to_string();
        if e.kind() == io::ErrorKind::PermissionDenied {
            RegistryError::Refused {
                location,
                reason: format!(
                    "{what} {}: {e}; give this user read and write access to the directory",
                    path.display()
                ),
            }
        } else {
            RegistryError::Unavailable {
                location,
                reason: format!("{what} {}: {e}", path.display()),
            }
        }
    }

    /// The lock file is something else than the plain file linen makes.
    fn not_a_lock_file(&self, path: &Path, what: &str) -> RegistryError {
        RegistryError::Refused {
            location: self.dir.display().to_string(),
            reason: format!(
                "the lock file {} is {what}; remove it (linen creates it as a plain file, \
                 readable and writable by its owner only)",
                path.display()
            ),
        }
    }

    /// With [`require_config`](Store::require_config), an error when the config is gone.
    fn present(&self) -> Result<(), RegistryError> {
        let config = self.dir.join("config");
        if self.require_config && !config.exists() {
            return Err(RegistryError::Unavailable {
                location: self.dir.display().to_string(),
                reason: format!(
                    "{} is gone (the registry directory moved, deleted, or a shared mount \
                     unmounted?); not recreating it",
                    config.display()
                ),
            });
        }
        Ok(())
    }

    /// Takes the store lock, creating the directory when `exclusive` (a write) is set. `None`
    /// when the directory does not exist and `exclusive` is not set (an empty store).
    fn lock(&self, exclusive: bool) -> Result<Option<File>, RegistryError> {
        self.present()?;
        let path = self.dir.join(".lock");
        if exclusive {
            fs::create_dir_all(self.subnets())
                .map_err(|e| self.io_err("cannot create", &self.subnets(), e))?;
        }
        // Only the owner may open the lock file: flock needs no write access, so anyone who
        // could open it could hold it for ever and stall every host's registry. Never through
        // a link, nor anything but a plain file: each host would lock what the link names on
        // its own side (no lock between hosts), a device would be opened for writing (opening
        // some does something: a watchdog arms), and whatever it names would be narrowed to
        // 0600 below. So its type is looked at first; the open's O_NOFOLLOW and the check
        // after it catch one swapped in meanwhile.
        if let Ok(meta) = fs::symlink_metadata(&path) {
            let kind = meta.file_type();
            if kind.is_symlink() {
                return Err(self.not_a_lock_file(&path, "a symbolic link"));
            } else if kind.is_dir() {
                return Err(self.not_a_lock_file(&path, "a directory"));
            } else if !kind.is_file() {
                return Err(self.not_a_lock_file(&path, "not a regular file"));
            }
        }
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound && !exclusive => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(self.not_a_lock_file(&path, "a symbolic link"));
            }
            Err(e) if e.raw_os_error() == Some(libc::EISDIR) => {
                return Err(self.not_a_lock_file(&path, "a directory"));
            }
            // There: access to the directory would not help.
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
                let Ok(meta) = fs::symlink_metadata(&path) else {
                    return Err(self.io_err("cannot open lock file", &path, e));
                };
                let (owner, mode) = (meta.uid(), meta.mode() & 0o7777);
                let advice = if owner == crate::sys::effective_uid() {
                    format!(
                        "it is this user's, with mode {mode:o}, which does not let its owner \
                         open it: chmod 600 it"
                    )
                } else {
                    format!(
                        "it belongs to uid {owner} (mode {mode:o}) and only its owner may open \
                         it: run linen as that user, as every linen sharing this directory \
                         must be"
                    )
                };
                return Err(RegistryError::Refused {
                    location: self.dir.display().to_string(),
                    reason: format!("cannot open lock file {}: {e}; {advice}", path.display()),
                });
            }
            Err(e) => return Err(self.io_err("cannot open lock file", &path, e)),
        };
        if !file.metadata().is_ok_and(|m| m.file_type().is_file()) {
            return Err(self.not_a_lock_file(&path, "not a regular file"));
        }
        // One made by an older linen is tightened (we could open it for writing: ours).
        if let Ok(meta) = file.metadata()
            && meta.permissions().mode() & 0o077 != 0
        {
            let _ = file.set_permissions(fs::Permissions::from_mode(0o600));
        }
        // Waited for up to LOCK_WAIT, not for ever: a process that holds the lock and never
        // lets go (hung on a dead NFS server, stopped, or holding it on purpose) then shows as
        // the registry being unavailable, with backoff, instead of a renewal that never ends
        // while the status says connected.
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            let tried = if exclusive {
                file.try_lock()
            } else {
                file.try_lock_shared()
            };
            match tried {
                Ok(()) => return Ok(Some(file)),
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(RegistryError::Unavailable {
                        location: self.dir.display().to_string(),
                        reason: format!(
                            "another process has held the lock {} for over {} s",
                            path.display(),
                            LOCK_WAIT.as_secs()
                        ),
                    });
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(self.io_err("cannot lock", &path, e));
                }
            }
        }
    }

    fn read_config(&self) -> Result<NetworkConfig, RegistryError> {
        let path = self.dir.join("config");
        // Links are followed: a config mounted from elsewhere (a Kubernetes ConfigMap) is one.
        let text = match crate::files::read_regular(&path, true) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(RegistryError::ConfigNotFound {
                    location: path.display().to_string(),
                    hint: "; or write flannel's config JSON to that file, e.g. \
                           {\"Network\":\"198.19.0.0/16\",\"Backend\":{\"Type\":\"udp\"}}. \
                           This is linen's directory registry: to use etcd (flanneld's default \
                           is http://127.0.0.1:4001,http://127.0.0.1:2379), pass \
                           --etcd-endpoints"
                        .to_owned(),
                });
            }
            Err(e) => return Err(self.io_err("cannot read", &path, e)),
        };
        NetworkConfig::from_json(text.trim()).map_err(|source| RegistryError::BadConfig {
            location: path.display().to_string(),
            source,
        })
    }

    /// Writes the config; unless `replace`, only when there is none (false then).
    fn write_config_if(
        &self,
        spec: &NetworkConfigSpec,
        replace: bool,
    ) -> Result<bool, RegistryError> {
        let path = self.dir.join("config");
        spec.clone()
            .validate()
            .map_err(|source| RegistryError::BadConfig {
                location: path.display().to_string(),
                source,
            })?;
        let _lock = self.lock(true)?;
        if !replace && path.exists() {
            return Ok(false);
        }
        self.write_atomic(&path, format!("{}\n", spec.to_json()).as_bytes())?;
        Ok(true)
    }

    fn revision(&self) -> Result<Revision, RegistryError> {
        let path = self.dir.join("revision");
        match crate::files::read_regular(&path, false) {
            Ok(t) => Ok(t.trim().parse().unwrap_or_else(|_| {
                tracing::warn!(path = %path.display(), content = %t.trim(), "registry revision file is not a number; counting from 0");
                0
            })),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(self.io_err("cannot read", &path, e)),
        }
    }

    /// Raises the revision; the caller holds the exclusive lock.
    fn bump(&self) -> Result<Revision, RegistryError> {
        // Saturating: a hand-written huge revision must not overflow; the fingerprint's file
        // stamps still show changes while it stays at the top.
        let next = self.revision()?.saturating_add(1);
        self.write_atomic(&self.dir.join("revision"), format!("{next}\n").as_bytes())?;
        // What a writer that died halfway left: its write of a key that is not written again
        // would otherwise stay for good (every change holds the lock, so none is in progress;
        // only files older than a minute go).
        crate::files::remove_all_stale_temporaries(&self.subnets());
        Ok(next)
    }

    /// [`crate::files::write_atomic`], its errors the registry's.
    fn write_atomic(&self, path: &Path, content: &[u8]) -> Result<(), RegistryError> {
        crate::files::write_atomic(path, content).map_err(|e| self.io_err("cannot write", path, e))
    }

    /// Reads one `subnets/` file. `Ok(None)` when it does not exist.
    fn read_entry(&self, name: &str, now: SystemTime) -> Result<Option<Entry>, RegistryError> {
        let path = self.subnets().join(name);
        let key = match SubnetKey::parse(name) {
            Ok(k) if k.to_string() == name => k,
            Ok(k) => {
                self.warn_once(
                    name,
                    "",
                    &format!(
                        "the file name is not canonical, so it is skipped and holds no subnet; \
                         rename it to {k} if that is free, or delete it"
                    ),
                );
                return Ok(Some(Entry::Malformed));
            }
            Err(e) => {
                self.warn_once(name, "", &e.to_string());
                return Ok(Some(Entry::Malformed));
            }
        };
        // linen writes lease files itself, by rename: a link here is not one of them, and is
        // not followed (it could name any file on the host).
        let text = match crate::files::read_regular(&path, false) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                self.warn_once(name, "<not UTF-8>", "the file is not UTF-8 text");
                return Ok(Some(Entry::Malformed));
            }
            // A directory, link, FIFO, huge file…: skipped like a corrupt file (and, like one,
            // it still blocks its key); other errors (I/O) concern the whole directory and are
            // reported.
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                self.warn_once(name, &format!("<{e}>"), &format!("{e}; not a lease file"));
                return Ok(Some(Entry::Malformed));
            }
            // One file this user may not read (made by hand by another user, mode 0600; the
            // unit leaves root without CAP_DAC_OVERRIDE) must not stop every list, on every
            // host: skipped like a corrupt one, and still blocking its key.
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                self.warn_once(
                    name,
                    "<permission denied>",
                    &format!("{e}; let this user read it (chmod a+r), or delete it"),
                );
                return Ok(Some(Entry::Malformed));
            }
            Err(e) => return Err(self.io_err("cannot read", &path, e)),
        };
        match parse_value(&text) {
            Ok((attrs, expiration)) => {
                self.forget_warning(name);
                if expiration.is_some_and(|t| t <= now) {
                    return Ok(Some(Entry::Expired));
                }
                Ok(Some(Entry::Live(Lease {
                    key,
                    attrs,
                    expiration,
                    lease_id: None,
                })))
            }
            Err(why) => {
                self.warn_once(name, &text, &why);
                Ok(Some(Entry::Malformed))
            }
        }
    }

    fn warn_once(&self, name: &str, content: &str, why: &str) {
        let mut h = DefaultHasher::new();
        content.hash(&mut h);
        let hash = h.finish();
        let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
        if warned.insert(name.to_owned(), hash) != Some(hash) {
            tracing::warn!(
                file = %self.subnets().join(name).display(),
                reason = why,
                "skipping malformed lease file; fix or delete it"
            );
        }
    }

    fn forget_warning(&self, name: &str) {
        let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
        warned.remove(name);
    }

    /// Names in `subnets/`, dot-files (temporaries) left out. Empty when it does not exist.
    fn names(&self) -> Result<Vec<(String, u64)>, RegistryError> {
        let dir = self.subnets();
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io_err("cannot list", &dir, e)),
        };
        let mut names = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|e| self.io_err("cannot list", &dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            // Size, mtime, inode and ctime stand for the content in the fingerprint: a file
            // renamed in (`mv`, `cp -p`, `rsync -t`) may keep size and mtime, but not its
            // inode, and no tool can set ctime.
            let stamp = entry.metadata().ok().map_or(0, |m| {
                let mut h = DefaultHasher::new();
                (
                    m.len(),
                    m.mtime(),
                    m.mtime_nsec(),
                    m.ino(),
                    m.ctime(),
                    m.ctime_nsec(),
                )
                    .hash(&mut h);
                h.finish()
            });
            names.push((name, stamp));
        }
        names.sort_unstable();
        Ok(names)
    }

    fn fingerprint_of(&self, revision: Revision, names: &[(String, u64)]) -> Fingerprint {
        let mut h = DefaultHasher::new();
        names.hash(&mut h);
        Fingerprint {
            revision,
            files: h.finish(),
        }
    }

    /// The cheap part of a poll: no file is opened but `revision`.
    fn fingerprint(&self) -> Result<Fingerprint, RegistryError> {
        self.present()?;
        let revision = self.revision()?;
        Ok(self.fingerprint_of(revision, &self.names()?))
    }

    fn list(&self) -> Result<LeaseList, RegistryError> {
        Ok(self.list_with_fingerprint()?.0)
    }

    fn list_with_fingerprint(&self) -> Result<(LeaseList, Fingerprint), RegistryError> {
        let _lock = self.lock(false)?;
        let revision = self.revision()?;
        let names = self.names()?;
        let now = SystemTime::now();
        let mut leases = Vec::with_capacity(names.len());
        for (name, _) in &names {
            if let Some(Entry::Live(lease)) = self.read_entry(name, now)? {
                leases.push(lease);
            }
        }
        leases.sort_by_key(|l| l.key);
        let fp = self.fingerprint_of(revision, &names);
        Ok((LeaseList { leases, revision }, fp))
    }

    fn expiry(&self) -> SystemTime {
        let at = SystemTime::now() + self.ttl;
        // Stored in whole seconds: round up so a lease never ends before its TTL.
        let secs = at.duration_since(UNIX_EPOCH).unwrap_or_default();
        let whole = secs.as_secs() + u64::from(secs.subsec_nanos() > 0);
        UNIX_EPOCH + Duration::from_secs(whole)
    }

    fn write_lease(&self, lease: &Lease) -> Result<(), RegistryError> {
        let mut text = lease.attrs.to_json();
        text.push('\n');
        if let Some(t) = lease.expiration {
            let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
            text.push_str(&format!("expires={secs}\n"));
        }
        let path = self.key_path(&lease.key);
        let before = SystemTime::now();
        self.write_atomic(&path, text.as_bytes())?;
        let after = SystemTime::now();
        if let Some(off) = fs::metadata(&path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|stamped| clock_skew(before, after, stamped))
        {
            tracing::warn!(file = %path.display(), skew_s = off.as_secs(),
                "the file system stamped this lease file with a time far from this host's \
                 clock: every host judges a lease's expiry by its own clock, so a host whose \
                 clock is off sees live leases expire, or expired ones live; keep the clocks of \
                 the hosts (and of the file server) in step, with NTP");
        }
        Ok(())
    }

    fn create(&self, key: SubnetKey, attrs: LeaseAttrs, ttl: bool) -> Result<Lease, RegistryError> {
        let _lock = self.lock(true)?;
        let name = key.to_string();
        match self.read_entry(&name, SystemTime::now())? {
            None => {}
            Some(Entry::Expired) => {
                tracing::info!(subnet = %key, "taking over an expired lease");
            }
            // A malformed value under this key is someone's broken file: leave it alone.
            Some(Entry::Live(_) | Entry::Malformed) => {
                return Err(RegistryError::AlreadyExists(key));
            }
        }
        // Malformed values block overlapping keys too, as they block their own.
        if let Some((other, _)) = self
            .overlapping(&key)?
            .into_iter()
            .find(|(_, e)| matches!(e, Entry::Live(_) | Entry::Malformed))
        {
            return Err(RegistryError::Overlaps { key, other });
        }
        let lease = Lease {
            key,
            attrs,
            expiration: ttl.then(|| self.expiry()),
            lease_id: None,
        };
        self.write_lease(&lease)?;
        self.bump()?;
        Ok(lease)
    }

    /// The other keys holding one of `key`'s subnets, expired ones left out: a dual-stack
    /// key with the same IPv4 subnet and another IPv6 one, say, which two hosts picking at
    /// once would both create. Call with the lock held.
    fn overlapping(&self, key: &SubnetKey) -> Result<Vec<(SubnetKey, Entry)>, RegistryError> {
        let (now, ours) = (SystemTime::now(), key.to_string());
        let mut found = Vec::new();
        for (name, _) in self.names()? {
            // A hand-made non-canonical name (`198.19.5.0-024`) holds nothing, as on etcd: it
            // is never read as a lease (a warning asks to rename it), so it must not block or
            // stand in for the key it spells.
            let Ok(other) = SubnetKey::parse(&name) else {
                continue;
            };
            if other.to_string() != name {
                continue;
            }
            if name == ours || !other.overlaps(key) {
                continue;
            }
            match self.read_entry(&name, now)? {
                None | Some(Entry::Expired) => {}
                Some(entry) => found.push((other, entry)),
            }
        }
        Ok(found)
    }

    /// `lease`'s key as stored, while it is live and still holds `lease`'s addresses: if
    /// another host holds it now (ours expired and was taken over), it is not ours to rewrite
    /// (flannel #1289). Call with the lock held.
    fn read_ours(&self, lease: &Lease) -> Result<Lease, RegistryError> {
        match self.read_entry(&lease.key.to_string(), SystemTime::now())? {
            Some(Entry::Live(current))
                if current.attrs.public_ip == lease.attrs.public_ip
                    && current.attrs.public_ipv6 == lease.attrs.public_ipv6 =>
            {
                Ok(current)
            }
            _ => Err(RegistryError::NotFound(lease.key)),
        }
    }

    fn renew(&self, lease: &Lease, attrs: LeaseAttrs) -> Result<Lease, RegistryError> {
        let _lock = self.lock(true)?;
        let current = self.read_ours(lease)?;
        // Creates refuse overlaps, but one left from an older linen, a flanneld or a hand-made
        // file gives two hosts one subnet. Which key came first is not recorded here, so the
        // rule only has to be the same on every host: a reservation is never given up, a lease
        // gives way to a reservation, and of two leases the greater key gives way.
        if current.expiration.is_some() {
            let overlapping = self.overlapping(&lease.key)?;
            // Only a key holding one of this lease's very subnets: one of another length
            // (`128.0.0.0-1`, by hand or by a compromised host) would otherwise push every
            // lease it covers out at each renewal.
            let wins = overlapping.iter().find_map(|(other, e)| match e {
                Entry::Live(l)
                    if other.shares_subnet(&lease.key)
                        && (l.expiration.is_none() || *other < lease.key) =>
                {
                    Some(*other)
                }
                _ => None,
            });
            if let Some(other) = wins {
                tracing::warn!(subnet = %lease.key, %other, "another key holds one of this lease's subnets and keeps it; giving this one up");
                self.remove_locked(&lease.key)?;
                return Err(RegistryError::NotFound(lease.key));
            }
        }
        let renewed = Lease {
            key: lease.key,
            attrs,
            // A reservation stays a reservation.
            expiration: current.expiration.map(|_| self.expiry()),
            lease_id: None,
        };
        self.write_lease(&renewed)?;
        self.bump()?;
        Ok(renewed)
    }

    fn keep_as_reservation(&self, lease: &Lease) -> Result<Lease, RegistryError> {
        let _lock = self.lock(true)?;
        let current = self.read_ours(lease)?;
        let reserved = Lease {
            expiration: None,
            lease_id: None,
            ..current
        };
        self.write_lease(&reserved)?;
        self.bump()?;
        Ok(reserved)
    }

    fn revoke(&self, key: &SubnetKey) -> Result<bool, RegistryError> {
        let _lock = self.lock(true)?;
        self.remove_locked(key)
    }

    fn release(&self, lease: &Lease) -> Result<bool, RegistryError> {
        let _lock = self.lock(true)?;
        match self.read_ours(lease) {
            Ok(_) => self.remove_locked(&lease.key),
            Err(RegistryError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The entry is judged under the same lock as every writer's, so a host that takes the
    /// key over after it was read cannot lose its lease to this delete.
    fn revoke_dead(&self, key: &SubnetKey) -> Result<bool, RegistryError> {
        let _lock = self.lock(true)?;
        match self.read_entry(&key.to_string(), SystemTime::now())? {
            Some(Entry::Expired | Entry::Malformed) => self.remove_locked(key),
            None | Some(Entry::Live(_)) => Ok(false),
        }
    }

    /// Deletes `key`'s file (gone already is fine): whether it was there. Call with the lock
    /// held.
    fn remove_locked(&self, key: &SubnetKey) -> Result<bool, RegistryError> {
        let path = self.key_path(key);
        match fs::remove_file(&path) {
            Ok(()) => {
                if let Ok(d) = File::open(self.subnets()) {
                    let _ = d.sync_all();
                }
                self.bump()?;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(self.io_err("cannot delete", &path, e)),
        }
    }
}

/// Parses a lease file: the value on line 1, an optional `expires=<unix seconds>` on line 2.
fn parse_value(text: &str) -> Result<(LeaseAttrs, Option<SystemTime>), String> {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let value = lines.next().ok_or("the file is empty")?;
    let attrs = LeaseAttrs::from_json(value).map_err(|e| e.to_string())?;
    let expiration = match lines.next() {
        None => None,
        Some(line) => {
            let secs = line
                .strip_prefix("expires=")
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| format!("line 2 is {line:?}, expected expires=<unix seconds>"))?;
            // A time past what SystemTime holds is as malformed as a word.
            Some(
                UNIX_EPOCH
                    .checked_add(Duration::from_secs(secs))
                    .ok_or_else(|| format!("the expiry {secs} is out of range"))?,
            )
        }
    };
    if let Some(extra) = lines.next() {
        return Err(format!("unexpected line {extra:?} after the expiry"));
    }
    Ok((attrs, expiration))
}

#[cfg(test)]
mod test {
    use super::*;

    /// A poll lists again when the files changed, a lease reached its expiry, or the clock
    /// went back since the last list (peers hidden as expired by a clock that ran ahead are
    /// live again, with nothing on disk changed).
    #[test]
    fn a_poll_lists_again_after_the_clock_went_back() {
        let dir = tempfile::tempdir().unwrap();
        let t = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let s = Duration::from_secs;
        let mut watch = DirectoryWatch {
            registry: DirectoryRegistry::with_ttl(dir.path(), s(3600)),
            seen: None,
            next_expiry: None,
            listed_at: Some(t),
        };
        assert!(!watch.must_list(true, t + s(1)));
        assert!(watch.must_list(false, t + s(1)));
        // Listed two days ahead; the clock is set right.
        assert!(watch.must_list(true, t - s(2 * 86400)));
        watch.next_expiry = Some(t + s(60));
        assert!(!watch.must_list(true, t + s(59)));
        assert!(watch.must_list(true, t + s(60)));
    }

    #[test]
    fn a_file_stamped_far_from_this_hosts_clock_is_skew() {
        let t = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let after = t + Duration::from_millis(20);
        let s = Duration::from_secs;
        // Within the write, or off by less than the margin: no skew.
        assert_eq!(clock_skew(t, after, t + Duration::from_millis(10)), None);
        assert_eq!(clock_skew(t, after, after + s(60)), None);
        assert_eq!(clock_skew(t, after, t - s(60)), None);
        // A server 2 h ahead, or a host that booted at 1970 writing to a correct server.
        assert_eq!(clock_skew(t, after, after + s(7200)), Some(s(7200)));
        assert_eq!(clock_skew(t, after, t - s(61)), Some(s(61)));
        assert_eq!(
            clock_skew(UNIX_EPOCH + s(60), UNIX_EPOCH + s(61), t),
            Some(t.duration_since(UNIX_EPOCH + s(61)).unwrap())
        );
    }

    #[test]
    fn parses_lease_files() {
        let (attrs, exp) =
            parse_value("{\"PublicIP\":\"198.18.1.1\",\"PublicIPv6\":null}\nexpires=1700000000\n")
                .unwrap();
        assert_eq!(
            attrs,
            LeaseAttrs::with_public_ip("198.18.1.1".parse().unwrap())
        );
        assert_eq!(exp, Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000)));
        let (_, exp) = parse_value("{\"PublicIP\":\"198.18.1.1\"}").unwrap();
        assert_eq!(exp, None, "no line 2 is a reservation");
        for bad in [
            "",
            "{",
            "{\"PublicIP\":\"198.18.1.1\"}\nexpires=soon",
            "{\"PublicIP\":\"198.18.1.1\"}\nttl=5",
            "{\"PublicIP\":\"198.18.1.1\"}\nexpires=1\nmore",
            "{\"PublicIP\":\"198.18.1.1\"}\nexpires=18446744073709551615",
        ] {
            assert!(parse_value(bad).is_err(), "{bad:?}");
        }
    }

    /// The lock file is the owner's alone, and an older one open to others is tightened: any
    /// user who can open it can flock it and stall every host's registry.
    #[test]
    fn the_lock_file_is_for_its_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let reg = DirectoryRegistry::new(dir.path());
        let mode = || {
            fs::metadata(dir.path().join(".lock"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        reg.store.lock(true).unwrap();
        assert_eq!(mode(), 0o600);
        fs::set_permissions(dir.path().join(".lock"), fs::Permissions::from_mode(0o644)).unwrap();
        reg.store.lock(false).unwrap();
        assert_eq!(mode(), 0o600);
    }

    /// A lock another process holds for ever makes operations fail as unavailable after
    /// LOCK_WAIT (so the manager backs off and the status says so), not wait for ever.
    #[test]
    fn a_lock_held_for_ever_is_unavailable_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let reg = DirectoryRegistry::new(dir.path());
        reg.store.lock(true).unwrap();
        // Another open file description: flock conflicts with it as with another process.
        let holder = File::open(dir.path().join(".lock")).unwrap();
        holder.lock().unwrap();
        let started = std::time::Instant::now();
        // In a thread, so that a lock that waits for ever fails the test instead of hanging it.
        let store = Arc::clone(&reg.store);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(store.lock(false).map(drop)));
        let outcome = rx
            .recv_timeout(LOCK_WAIT * 3)
            .expect("still waiting for the lock");
        let err = outcome.unwrap_err();
        assert!(err.is_transient(), "{err}");
        assert!(err.to_string().contains("held the lock"), "{err}");
        assert!(started.elapsed() >= LOCK_WAIT, "{:?}", started.elapsed());
        holder.unlock().unwrap();
        reg.store.lock(true).unwrap();
    }
}
