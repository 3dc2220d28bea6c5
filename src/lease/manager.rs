//! The lease manager: acquires this host's subnet, renews it, watches every other host's lease,
//! and publishes the result as a [`LeaseState`] on a `tokio::sync::watch` channel.
//!
//! It fixes flannel's known defects (`flannel-compat.md` §h): a lost own lease (deleted,
//! expired, taken, or a renewal answering "not found") is re-acquired — the same subnet when it
//! is still free — and the manager keeps running instead of exiting (#904); reservations are
//! never renewed and never get a TTL (#1242, #1329); registry outages are retried with capped
//! backoff and logged once per change of state, not once per retry; after an outage, a
//! renewal that fell due is done at once. On cancellation the lease is kept, as flannel keeps
//! it, so a restart finds it again by PublicIP.
//!
//! The state, not a stream of events, is what a consumer sees: it can never miss a change, and
//! a forwarding table is rebuilt from `own` and `peers` whenever `generation` moves.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::allocator::{self, AllocError, Choice, Request};
use super::tracker::{LeaseTracker, OwnChange, PeerEvent};
use super::{LeaseList, LeaseWatch, Registry, RegistryError, WatchEvent};
use crate::model::{Lease, LeaseAttrs, NetworkConfig, SubnetKey};

/// flannel's `raceRetries`: how many lost creates an acquisition tolerates.
pub const RACE_RETRIES: usize = 10;

/// flannel's default `-subnet-lease-renew-margin`: renew one hour before expiry.
pub const DEFAULT_RENEW_MARGIN: Duration = Duration::from_secs(60 * 60);

/// Why a lease could not be acquired.
#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    /// The registry failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// No subnet can be chosen.
    #[error(transparent)]
    Alloc(#[from] AllocError),
    /// Every create lost a race with another host.
    #[error(
        "Max retries reached trying to acquire a subnet: {tries} creates lost a race, the last \
         for {subnet}; other hosts are acquiring at the same time, retry shortly"
    )]
    Races {
        /// The last subnet tried.
        subnet: SubnetKey,
        /// How many creates were tried.
        tries: usize,
    },
}

impl AcquireError {
    /// Whether trying again later may succeed: the registry was out of reach, or other hosts
    /// won every race.
    pub fn may_pass(&self) -> bool {
        match self {
            AcquireError::Registry(e) => e.is_transient(),
            AcquireError::Races { .. } => true,
            AcquireError::Alloc(_) => false,
        }
    }
}

/// How often the renewal timer (monotonic) is checked against the lease's expiry (wall
/// clock, as the registry judges it): see [`renewal_overdue`].
pub const CLOCK_CHECK: Duration = Duration::from_secs(60);

/// How much nearer the expiry may come than the renewal timer knows before the lease is
/// renewed early: more than a check's own delay, far less than any real clock step.
const CLOCK_SLACK: Duration = Duration::from_secs(5);

/// Whether a lease expiring at `exp` (wall clock) must be renewed now although its renewal
/// timer still waits `renew_in`: the wall clock moved ahead since the timer was set (an
/// embedded host without a battery-backed clock took a lease at boot, before NTP set the
/// time). The registry judges the expiry by the wall clock (the directory registry's hosts
/// each by their own), so other hosts may already see the lease as expired and take the
/// subnet, while the timer would wait up to a day.
fn renewal_overdue(
    exp: SystemTime,
    wall_now: SystemTime,
    renew_in: Duration,
    margin: Duration,
) -> bool {
    let remaining = exp.duration_since(wall_now).unwrap_or_default();
    renewal_delay(remaining, margin) + CLOCK_SLACK < renew_in
}

/// When a lease with `remaining` left is renewed: `margin` before expiry; when the margin is
/// longer than what is left (short test TTLs), at half the remaining time instead of at once
/// and again and again.
fn renewal_delay(remaining: Duration, margin: Duration) -> Duration {
    remaining.checked_sub(margin).unwrap_or(remaining / 2)
}

/// How long [`LeaseManager::acquire_patiently`] waits between tries.
pub const ACQUIRE_RETRY: Duration = Duration::from_secs(1);

/// The least time between two rewrites of the own key made because a write named only some
/// of this host's addresses. Two hosts configured with one PublicIP (behind one NAT) and
/// different IPv6 addresses share a key, and each one's write is partial to the other: without
/// a gap they would rewrite it back and forth as fast as the registry answers.
pub const PARTIAL_REWRITE_GAP: Duration = Duration::from_secs(60);

/// Acquires a lease once, as flannel's `tryAcquireLease` does: list, decide with the
/// [`allocator`], create atomically; on a lost race list again, at most [`RACE_RETRIES`]
/// times. Own leases the config no longer allows are deleted on the way.
pub async fn acquire(
    registry: &dyn Registry,
    config: &NetworkConfig,
    attrs: &LeaseAttrs,
    previous: Option<SubnetKey>,
    rng: &mut (impl Rng + Send),
) -> Result<Lease, AcquireError> {
    acquire_listing(registry, config, attrs, previous, rng)
        .await
        .map(|(lease, _)| lease)
}

/// [`acquire`], also returning the other hosts' leases in the list the lease was chosen from
/// (this host's own ones left out): what the peers were, as of just before the lease.
async fn acquire_listing(
    registry: &dyn Registry,
    config: &NetworkConfig,
    attrs: &LeaseAttrs,
    previous: Option<SubnetKey>,
    rng: &mut (impl Rng + Send),
) -> Result<(Lease, LeaseList), AcquireError> {
    let mut lost: Vec<SubnetKey> = Vec::new();
    let mut last_tried = None;
    for _ in 0..RACE_RETRIES {
        let list = registry.list_leases().await?;
        // After losing our own lease mid-acquisition, ask for it again as the previous subnet.
        let previous = previous.or(last_tried);
        let plan = allocator::plan(
            &Request {
                config,
                leases: &list.leases,
                ours: attrs,
                previous,
                also_taken: &lost,
            },
            rng,
        )?;
        for old in &plan.incompatible {
            tracing::warn!(subnet = %old.key, "Lease is not compatible with current config, deleting");
            // Only while it is still ours: listed earlier, it may have expired and been taken.
            registry.release_lease(old).await?;
        }
        let key = plan.choice.key();
        let result = match plan.choice {
            Choice::Reuse(lease) => {
                tracing::info!(subnet = %key, reservation = lease.is_reservation(), "found a lease for this host's PublicIP, reusing it");
                registry.renew_lease(&lease, attrs).await
            }
            Choice::Previous(_) => {
                tracing::info!(subnet = %key, "the previous subnet is free, taking it again");
                registry.create_lease(&key, attrs).await
            }
            Choice::Fresh(_) => {
                tracing::info!(subnet = %key, range = %range(config), "picked a free subnet");
                registry.create_lease(&key, attrs).await
            }
        };
        last_tried = Some(key);
        match result {
            Ok(lease) => {
                // Held now: give up the dynamic leases it supersedes (a failure only leaves
                // them to expire, as before).
                for old in &plan.superseded {
                    tracing::warn!(subnet = %old.key, reservation = %lease.key, "a reservation for this host supersedes its lease; releasing that lease");
                    if let Err(e) = registry.release_lease(old).await {
                        tracing::warn!(subnet = %old.key, error = %e, "cannot release the superseded lease; it expires on its own");
                    }
                }
                let mut peers = list;
                peers
                    .leases
                    .retain(|l| l.key != lease.key && !allocator::is_ours(config, attrs, l));
                return Ok((lease, peers));
            }
            // Taken first by another host: list again, and do not ask for it again.
            Err(RegistryError::AlreadyExists(_)) => {
                tracing::debug!(subnet = %key, "lost a race for the subnet; listing again");
                lost.push(key);
            }
            // The key in the way is taken too, with all it covers: one wider than a subnet
            // that the list skips (its value unreadable) blocks every candidate inside it.
            Err(RegistryError::Overlaps { other, .. }) => {
                tracing::debug!(subnet = %key, %other, "the subnet overlaps another key; listing again");
                lost.push(key);
                lost.push(other);
            }
            // Our own lease vanished between the list and the renewal: list again; it may be
            // created anew as the previous subnet.
            Err(RegistryError::NotFound(_)) => {
                tracing::debug!(subnet = %key, "own lease gone before renewal; listing again");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(AcquireError::Races {
        subnet: last_tried.expect("RACE_RETRIES > 0"),
        tries: RACE_RETRIES,
    })
}

fn range(config: &NetworkConfig) -> String {
    let mut parts = Vec::new();
    if config.network.is_some() {
        parts.push(format!(
            "{} ... {} (/{})",
            config.subnet_min, config.subnet_max, config.subnet_len
        ));
    }
    if config.ipv6_network.is_some() {
        parts.push(format!(
            "{} ... {} (/{})",
            config.ipv6_subnet_min, config.ipv6_subnet_max, config.ipv6_subnet_len
        ));
    }
    parts.join(" & ")
}

/// How the manager behaves.
#[derive(Clone, Debug)]
pub struct ManagerOptions {
    /// This host's lease value (its PublicIP is its identity).
    pub attrs: LeaseAttrs,
    /// The subnet from `subnet.env`, tried when no lease holds our PublicIP.
    pub previous: Option<SubnetKey>,
    /// Renew this long before expiry (flannel: `-subnet-lease-renew-margin`, default 60 min;
    /// its range is validated by the caller).
    pub renew_margin: Duration,
    /// First delay after a failure; it doubles on every further failure…
    pub backoff_min: Duration,
    /// …up to this.
    pub backoff_max: Duration,
}

impl ManagerOptions {
    /// flannel's 60 min renew margin; retries back off from 1 s to 8 s. The cap is low on
    /// purpose: after an outage the watch must resume (and a due renewal happen) within seconds
    /// of the registry's return, and flannel itself retries every second.
    pub fn new(attrs: LeaseAttrs) -> ManagerOptions {
        ManagerOptions {
            attrs,
            previous: None,
            renew_margin: DEFAULT_RENEW_MARGIN,
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(8),
        }
    }
}

/// The registry's health as the manager sees it, for logs, `/healthz` and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegistryHealth {
    /// Whether the last registry call succeeded.
    pub connected: bool,
    /// The last failure, kept after recovery for diagnosis.
    pub last_error: Option<String>,
    /// When the last outage began: the first failed call after a success (a changing error
    /// message does not move it). With `recovered_at`, lets `status` and the metrics tell an
    /// old, resolved error from a new one.
    pub failing_since: Option<Instant>,
    /// When the registry last came back after a failure; `None` while failing.
    pub recovered_at: Option<Instant>,
    /// How many times the registry came back after a failure (each time the watch resyncs).
    pub resyncs: u64,
}

/// Everything a daemon needs from the control plane, published whole on every change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseState {
    /// This host's lease; `None` before the first acquisition and while re-acquiring a lost
    /// one. Its `expiration` is the lease expiry (`None`: a reservation).
    pub own: Option<Lease>,
    /// Every other host's live lease, sorted by key; the own subnet is never here.
    pub peers: Vec<Lease>,
    /// Raised whenever `own` or `peers` change: rebuild the forwarding table when it moves.
    pub generation: u64,
    /// Registry health; changes do not raise `generation`.
    pub registry: RegistryHealth,
}

/// Doubling delays between `min` and `max`.
#[derive(Clone, Debug)]
struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            next: min,
        }
    }

    fn next(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    fn reset(&mut self) {
        self.next = self.min;
    }
}

/// What the watch task hands the manager.
enum WatchMsg {
    Event(WatchEvent),
    Failed(RegistryError),
}

/// Acquires, renews and watches leases. Build it, take a receiver with [`subscribe`], then
/// [`acquire`](LeaseManager::acquire) (optional: [`run`] acquires too, retrying) and [`run`].
///
/// [`subscribe`]: LeaseManager::subscribe
/// [`run`]: LeaseManager::run
pub struct LeaseManager {
    registry: Arc<dyn Registry>,
    config: NetworkConfig,
    options: ManagerOptions,
    rng: StdRng,
    tracker: LeaseTracker,
    state: watch::Sender<LeaseState>,
    /// The last lease we held, kept while re-acquiring so the same subnet is asked for.
    last_key: Option<SubnetKey>,
    /// Whether the tracker has had a list of the peers (from the first acquisition's list, then
    /// from the watch).
    peers_listed: bool,
    renew_at: Option<Instant>,
    renew_backoff: Backoff,
    renew_failed: bool,
    last_acquire_error: Option<String>,
    /// The watch failed and has not answered since.
    read_error: Option<String>,
    /// A renewal failed, or an acquisition failed for a reason that may pass, and no write has
    /// succeeded since. Kept apart from `read_error` so that watch events arriving while writes fail
    /// (etcd over its space quota, say) do not report the registry healthy, then unhealthy
    /// again at the next attempt, at every backoff step.
    write_error: Option<String>,
    /// New addresses for this host ([`address_sender`](LeaseManager::address_sender)).
    addresses: watch::Receiver<LeaseAttrs>,
    addresses_tx: watch::Sender<LeaseAttrs>,
    /// This host's identities before its address changed (each of them, when it changed
    /// again before a rewrite landed), until the watch shows the own key with the current
    /// one: a write of an old value seen meanwhile is one from before the rewrite, not
    /// another host's.
    superseded: Vec<LeaseAttrs>,
    /// When the last rewrite for a partial write was due, and whether one was put off since
    /// (then said once).
    partial_rewrite: Option<(Instant, bool)>,
}

impl LeaseManager {
    /// A manager for `config` (read by the caller from the same registry).
    pub fn new(
        registry: Arc<dyn Registry>,
        config: NetworkConfig,
        options: ManagerOptions,
    ) -> LeaseManager {
        let renew_backoff = Backoff::new(options.backoff_min, options.backoff_max);
        let (addresses_tx, addresses) = watch::channel(options.attrs.clone());
        LeaseManager {
            registry,
            config,
            last_key: options.previous,
            peers_listed: false,
            options,
            rng: StdRng::from_rng(&mut rand::rng()),
            tracker: LeaseTracker::new(None),
            state: watch::Sender::new(LeaseState::default()),
            renew_at: None,
            renew_backoff,
            renew_failed: false,
            last_acquire_error: None,
            read_error: None,
            write_error: None,
            addresses,
            addresses_tx,
            superseded: Vec::new(),
            partial_rewrite: None,
        }
    }

    /// Where to send this host's addresses when they change (its underlay address moved): the
    /// manager then rewrites the own key with them at once, keeping its subnet, and acquires
    /// by them from then on.
    pub fn address_sender(&self) -> watch::Sender<LeaseAttrs> {
        self.addresses_tx.clone()
    }

    /// Takes `attrs` as this host's addresses; a lease held is rewritten with them now.
    fn readdress(&mut self, attrs: LeaseAttrs) {
        if attrs == self.options.attrs {
            return;
        }
        let old = std::mem::replace(&mut self.options.attrs, attrs);
        let Some(own) = self.tracker.own() else {
            tracing::info!(public_ip = ?self.options.attrs.public_ip, public_ipv6 = ?self.options.attrs.public_ipv6, "this host's addresses changed; the next lease is acquired with them");
            return;
        };
        tracing::info!(subnet = %own.key, public_ip = ?self.options.attrs.public_ip, public_ipv6 = ?self.options.attrs.public_ipv6, "this host's addresses changed; rewriting its lease with them, keeping the subnet");
        if !self.superseded.contains(&old) {
            self.superseded.push(old);
        }
        self.renew_at = Some(Instant::now());
    }

    /// A receiver of the current state; it stays valid after [`run`](LeaseManager::run) ends.
    pub fn subscribe(&self) -> watch::Receiver<LeaseState> {
        self.state.subscribe()
    }

    /// The config leases are acquired under.
    pub fn config(&self) -> &NetworkConfig {
        &self.config
    }

    /// Acquires a lease now (one attempt with up to [`RACE_RETRIES`] races), publishes it and
    /// schedules its renewal. The daemon calls this at start-up to fail fast.
    pub async fn acquire(&mut self) -> Result<Lease, AcquireError> {
        let result = acquire_listing(
            self.registry.as_ref(),
            &self.config,
            &self.options.attrs,
            self.last_key,
            &mut self.rng,
        )
        .await;
        match result {
            Ok((lease, peers)) => {
                self.write_answered(None);
                self.last_acquire_error = None;
                // Before the watch has listed them, the peers known while choosing the lease:
                // the first table then routes to them, instead of to nobody until the watch
                // answers (which an etcd leader election can put off for seconds).
                if !self.peers_listed {
                    self.peers_listed = true;
                    let applied = self.tracker.apply(WatchEvent::Snapshot(peers));
                    log_peers(&applied.peers);
                }
                tracing::info!(subnet = %lease.key, expires = %lease.expiry(), "lease acquired");
                self.hold(lease.clone());
                Ok(lease)
            }
            Err(e) => {
                match &e {
                    AcquireError::Registry(re) if re.is_transient() => {
                        self.write_answered(Some(re));
                    }
                    // The registry answered (a refusal, no free subnet): it is reachable.
                    _ => self.write_answered(None),
                }
                Err(e)
            }
        }
    }

    /// [`acquire`](Self::acquire), tried again every [`ACQUIRE_RETRY`] while the failure may
    /// pass: the registry out of reach (an etcd leader election, a request timeout), or other
    /// hosts winning every race. The daemon waited out the same outage for the registry and
    /// the config just before, and exited on one that came a moment later. `waiting` hears of
    /// each such failure; any other ends it.
    pub async fn acquire_patiently(
        &mut self,
        mut waiting: impl FnMut(&AcquireError),
    ) -> Result<Lease, AcquireError> {
        loop {
            match self.acquire().await {
                Err(e) if e.may_pass() => {
                    waiting(&e);
                    tokio::time::sleep(ACQUIRE_RETRY).await;
                }
                done => return done,
            }
        }
    }

    /// Runs until `cancel` fires: acquires a lease if none is held (retrying with backoff),
    /// renews it, watches the other leases and re-acquires a lost lease. The lease is kept
    /// when it stops.
    pub async fn run(mut self, cancel: CancellationToken) {
        let (tx, mut rx) = mpsc::channel(16);
        let watch_cancel = cancel.child_token();
        let watcher = tokio::spawn(watch_task(
            Arc::clone(&self.registry),
            tx,
            Backoff::new(self.options.backoff_min, self.options.backoff_max),
            watch_cancel.clone(),
        ));
        let mut acquire_backoff = Backoff::new(self.options.backoff_min, self.options.backoff_max);
        let mut clock = tokio::time::interval_at(Instant::now() + CLOCK_CHECK, CLOCK_CHECK);
        clock.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A stop does not wait for a registry call under way (each may take its whole timeout
        // against a slow etcd, several in one acquisition, past the unit's stop timeout): the
        // call is dropped, and a write it made anyway is found by the next start, which takes
        // the lease by this host's identity.
        let mut addresses = self.addresses.clone();
        'run: loop {
            if addresses.has_changed().unwrap_or(false) {
                let attrs = addresses.borrow_and_update().clone();
                self.readdress(attrs);
            }
            if self.tracker.own().is_none() {
                let acquired = tokio::select! {
                    _ = cancel.cancelled() => break 'run,
                    r = self.acquire() => r,
                };
                match acquired {
                    Ok(_) => acquire_backoff.reset(),
                    Err(e) => {
                        let msg = e.to_string();
                        if self.last_acquire_error.as_ref() != Some(&msg) {
                            tracing::warn!(error = %msg, "cannot acquire a lease; retrying with backoff");
                            self.last_acquire_error = Some(msg);
                        }
                        // Peers keep coming and going while we have no lease: their changes
                        // still reach the table (the device keeps the old subnet meanwhile).
                        let retry = tokio::time::sleep(acquire_backoff.next());
                        tokio::pin!(retry);
                        loop {
                            tokio::select! {
                                _ = cancel.cancelled() => break 'run,
                                _ = &mut retry => continue 'run,
                                msg = rx.recv() => if !self.on_msg(msg) {
                                    break 'run;
                                },
                            }
                        }
                    }
                }
            }
            let renew_at = self.renew_at;
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = sleep_until(renew_at) => tokio::select! {
                    _ = cancel.cancelled() => break,
                    () = self.renew() => {}
                },
                _ = clock.tick() => self.check_clock(SystemTime::now()),
                msg = rx.recv() => if !self.on_msg(msg) {
                    break;
                },
                Ok(()) = addresses.changed() => {
                    let attrs = addresses.borrow_and_update().clone();
                    self.readdress(attrs);
                }
            }
        }
        watch_cancel.cancel();
        // The watcher may be waiting to hand over an event (the channel fills while a slow
        // renewal runs): closing the channel ends that wait.
        drop(rx);
        let _ = watcher.await;
        if let Some(own) = self.tracker.own() {
            tracing::info!(subnet = %own.key, "lease manager stopped; the lease is kept for the next start");
        }
    }

    /// Holds `lease` as ours: tracker, renewal timer, published state.
    fn hold(&mut self, lease: Lease) {
        self.last_key = Some(lease.key);
        self.renew_backoff.reset();
        self.renew_failed = false;
        self.renew_at = match lease.expiration {
            None => {
                tracing::info!(subnet = %lease.key, "the lease is a reservation; it has no expiry and is never renewed");
                None
            }
            Some(exp) => {
                let remaining = exp.duration_since(SystemTime::now()).unwrap_or_default();
                let due = renewal_delay(remaining, self.options.renew_margin);
                tracing::debug!(subnet = %lease.key, in_secs = due.as_secs(), "renewal scheduled");
                Some(Instant::now() + due)
            }
        };
        let events = self.tracker.set_own(Some(lease));
        log_peers(&events);
        self.publish(true);
    }

    /// Renews now when the wall clock moved ahead of the renewal timer ([`renewal_overdue`]).
    /// Not while renewals fail: they are retried with backoff already.
    fn check_clock(&mut self, wall_now: SystemTime) {
        let (Some(own), Some(at)) = (self.tracker.own(), self.renew_at) else {
            return;
        };
        let Some(exp) = own.expiration else {
            return;
        };
        let renew_in = at.saturating_duration_since(Instant::now());
        if !self.renew_failed && renewal_overdue(exp, wall_now, renew_in, self.options.renew_margin)
        {
            tracing::warn!(subnet = %own.key, expires = %own.expiry(), "the wall clock moved ahead of the lease's renewal timer (set at boot before NTP, say): its expiry, which other hosts judge by the wall clock, is nearer than the timer knew; renewing now");
            self.renew_at = Some(Instant::now());
        }
    }

    async fn renew(&mut self) {
        let Some(own) = self.tracker.own().cloned() else {
            self.renew_at = None;
            return;
        };
        match self.registry.renew_lease(&own, &self.options.attrs).await {
            Ok(lease) => {
                self.write_answered(None);
                tracing::info!(subnet = %lease.key, expires = %lease.expiry(), "lease renewed");
                self.hold(lease);
            }
            Err(RegistryError::NotFound(key)) => {
                self.write_answered(None);
                tracing::warn!(subnet = %key, "the lease is gone (deleted, expired or taken); re-acquiring");
                self.lose();
            }
            Err(e) => {
                // Any failed renewal, refused for good (permissions revoked) or not, puts the
                // lease at risk: report it, and keep retrying until the lease is lost.
                self.write_answered(Some(&e));
                self.renew_failed = true;
                self.renew_at = Some(Instant::now() + self.renew_backoff.next());
            }
        }
    }

    /// When to rewrite the own key `key` after a write that named only some of this host's
    /// addresses: now for the first (and anyway with `now_anyway`), when the one put off is
    /// due, or, for one within two gaps of the last rewrite (such writes keep coming: another
    /// host writes the key too), [`PARTIAL_REWRITE_GAP`] after this write.
    ///
    /// A gap after the write, not after the last rewrite: two hosts sharing the key then keep
    /// a gap apart whatever delays they see each other's writes with, and write it once a
    /// minute together, each one's addresses standing in turn. Measured from the last rewrite,
    /// the one that sees the other's write sooner after its own rewrite than the other does
    /// would answer a few seconds after it, and the key be written twice a minute.
    fn partial_rewrite_at(&mut self, key: SubnetKey, now_anyway: bool) -> Instant {
        let now = Instant::now();
        if now_anyway {
            let told = self.partial_rewrite.is_some_and(|(_, told)| told);
            self.partial_rewrite = Some((now, told));
            return now;
        }
        match self.partial_rewrite {
            // One is put off already: not further.
            Some((due, _)) if now < due => due,
            Some((last, told)) if now < last + 2 * PARTIAL_REWRITE_GAP => {
                let at = now + PARTIAL_REWRITE_GAP;
                if !told {
                    tracing::warn!(subnet = %key, "our key was written again with only some of this host's addresses, within two minutes of our rewrite: another host writes it too (two hosts configured with one PublicIP, behind one NAT?); rewriting it at most once a minute");
                }
                self.partial_rewrite = Some((at, true));
                at
            }
            _ => {
                tracing::info!(subnet = %key, "our key names only some of this host's addresses; rewriting it");
                self.partial_rewrite = Some((now, false));
                now
            }
        }
    }

    /// Handles what the watcher sent; false when it has gone (the channel closed).
    fn on_msg(&mut self, msg: Option<WatchMsg>) -> bool {
        match msg {
            Some(WatchMsg::Event(event)) => self.on_event(event),
            Some(WatchMsg::Failed(e)) => {
                self.read_error = Some(e.to_string());
                self.publish_health();
            }
            None => return false,
        }
        true
    }

    fn on_event(&mut self, event: WatchEvent) {
        self.peers_listed = true;
        if self.read_error.take().is_some() && self.renew_failed {
            // A renewal fell due while the registry was away: do it now that it answers,
            // rather than at the end of its backoff.
            self.renew_at = Some(Instant::now());
        }
        self.publish_health();
        let held = self.tracker.own().cloned();
        let applied = self.tracker.apply(event);
        log_peers(&applied.peers);
        let changed = !applied.peers.is_empty();
        // A peer's key sharing one of our subnets got past the create check (a flanneld, an
        // older linen, a check cut short): renewing settles which key keeps the subnets, so do
        // it now rather than at the next renewal, hours away.
        let settle = if self.renew_at.is_some()
            && let Some(own) = self.tracker.own()
            && let Some(other) = applied.peers.iter().find_map(|e| match e {
                PeerEvent::Added(l) | PeerEvent::Updated { new: l, .. }
                    if l.key.shares_subnet(&own.key) =>
                {
                    Some(l.key)
                }
                _ => None,
            }) {
            tracing::info!(subnet = %own.key, %other, "a peer's key overlaps this host's; renewing now, which settles which one keeps the subnets");
            self.renew_at = Some(Instant::now());
            true
        } else {
            false
        };
        // The watch shows the own key with the new addresses: older writes are behind.
        if applied.own_seen
            && self
                .tracker
                .own()
                .is_some_and(|o| o.attrs == self.options.attrs)
        {
            self.superseded.clear();
        }
        match applied.own {
            None => {}
            Some(OwnChange::Removed) => {
                tracing::warn!(subnet = ?self.last_key.map(|k| k.to_string()), "the lease was deleted or expired; re-acquiring");
                self.lose();
                return;
            }
            Some(OwnChange::Put(lease)) => {
                // By the identity acquisition uses (a reservation for this host may name only
                // its PublicIP, where the host also advertises an IPv6 address).
                let ours = &self.options.attrs;
                // Ours by the old addresses only, or exactly as written before: after a move of
                // the IPv6 address alone, an old write still names the PublicIP, by which it
                // would look like another host's write naming only some of ours.
                let from_before = |old: &LeaseAttrs| {
                    *old == lease.attrs
                        || (!allocator::is_ours(&self.config, ours, &lease)
                            && allocator::is_ours(&self.config, old, &lease))
                };
                if held.is_some() && self.superseded.iter().any(from_before) {
                    // Written before this host's address changed (the rewrite with the new one
                    // is under way, or its echo still to come): still ours, not another host's.
                    // Were another host given the old address and the key meanwhile, the
                    // rewrite would take the key back from it, and it moves on.
                    tracing::debug!(subnet = %lease.key, "a write of our key from before this host's address changed");
                    let events = self.tracker.set_own(held);
                    log_peers(&events);
                    self.publish(changed);
                    return;
                }
                if allocator::is_ours(&self.config, ours, &lease) {
                    // Written by someone else with only some of our addresses (peers would not
                    // know the others): write ours now, as the renewal does.
                    let partial = lease.attrs.public_ip != ours.public_ip
                        || lease.attrs.public_ipv6 != ours.public_ipv6;
                    // Our renewal seen through the watch, or someone renewed it for us. After
                    // a renewal that failed, this is one that committed although its answer
                    // was an error (a timeout): the write went through, so the registry is no
                    // longer reported down for it (the next write is hours away).
                    let failed = self.renew_failed;
                    if self.renew_failed {
                        self.write_answered(None);
                    }
                    let key = lease.key;
                    let pending = self.renew_at;
                    self.hold(lease);
                    // hold() scheduled the next renewal from the new expiry: the one due at
                    // once stays so. So does the retry of a failed write: another host's write
                    // is no answer to it, and no back and forth comes of failing writes.
                    if partial {
                        // A rewrite due sooner (this host's address changed) stays so.
                        let at = self.partial_rewrite_at(key, settle || failed);
                        self.renew_at = Some(pending.map_or(at, |p| p.min(at)));
                    } else if settle {
                        self.renew_at = Some(Instant::now());
                    }
                    return;
                }
                tracing::warn!(subnet = %lease.key, holder = ?lease.attrs.public_ip, "another host holds our subnet now; re-acquiring");
                // The holder is a peer from now on: nothing else may be written to its key
                // until its renewal, hours away, so waiting for another event would leave it
                // out of the peers that long (and its subnet unrouted after this host's move).
                let events = self.tracker.yield_own();
                log_peers(&events);
                self.lose();
                return;
            }
        }
        // Also without a change to route by: a renewed peer's new expiry is what `linen
        // status` shows (it said "expired" a day after a peer was first seen).
        self.publish(changed);
    }

    /// The own lease is gone: drop it and let [`run`](LeaseManager::run) re-acquire.
    fn lose(&mut self) {
        self.renew_at = None;
        self.renew_failed = false;
        self.superseded.clear();
        self.partial_rewrite = None;
        if let Some(own) = self.tracker.own() {
            self.last_key = Some(own.key);
        }
        // From now on a write to the old key is another host's: the tracker reports it as a
        // peer, and the next acquisition asks for the key again only if it is free.
        let events = self.tracker.set_own(None);
        log_peers(&events);
        self.publish(true);
    }

    /// A write (acquire, renew) was answered: `error` is the failure that may pass, if any.
    fn write_answered(&mut self, error: Option<&RegistryError>) {
        self.write_error = error.map(ToString::to_string);
        self.publish_health();
    }

    /// Publishes the registry's health from the last read and write outcomes, logging when it
    /// goes down and when it comes back.
    fn publish_health(&mut self) {
        let failure = self.write_error.as_ref().or(self.read_error.as_ref());
        let (connected, had_error) = {
            let r = &self.state.borrow().registry;
            (r.connected, r.last_error.is_some())
        };
        match failure {
            None if !connected => {
                if had_error {
                    tracing::info!(registry = %self.registry.location(), "registry available again");
                }
                self.state.send_modify(|s| {
                    s.registry.connected = true;
                    s.registry.resyncs += u64::from(had_error);
                    if had_error {
                        s.registry.recovered_at = Some(Instant::now());
                    }
                });
            }
            None => {}
            Some(msg) => {
                if connected || !had_error {
                    tracing::warn!(registry = %self.registry.location(), error = %msg, "registry unavailable; retrying with backoff");
                }
                let msg = msg.clone();
                self.state.send_if_modified(|s| {
                    let changed =
                        s.registry.connected || s.registry.last_error.as_ref() != Some(&msg);
                    if s.registry.connected || s.registry.failing_since.is_none() {
                        s.registry.failing_since = Some(Instant::now());
                    }
                    s.registry.connected = false;
                    s.registry.last_error = Some(msg);
                    s.registry.recovered_at = None;
                    changed
                });
            }
        }
    }

    fn publish(&mut self, leases_changed: bool) {
        let own = self.tracker.own().cloned();
        let peers: Vec<Lease> = self.tracker.peers().cloned().collect();
        self.state.send_if_modified(|s| {
            if s.own == own && s.peers == peers {
                return false;
            }
            s.own = own;
            s.peers = peers;
            if leases_changed {
                s.generation += 1;
            }
            true
        });
    }
}

/// Logs peer changes, each address a field of its own (absent when the lease has none), so
/// that JSON logs need no splitting.
fn log_peers(events: &[PeerEvent]) {
    for e in events {
        match e {
            PeerEvent::Added(l) => {
                tracing::info!(
                    subnet = %l.key,
                    public_ip = l.attrs.public_ip.map(tracing::field::display),
                    public_ipv6 = l.attrs.public_ipv6.map(tracing::field::display),
                    "subnet added"
                )
            }
            PeerEvent::Updated { old, new } => {
                tracing::info!(
                    subnet = %new.key,
                    public_ip = new.attrs.public_ip.map(tracing::field::display),
                    public_ipv6 = new.attrs.public_ipv6.map(tracing::field::display),
                    old_public_ip = old.attrs.public_ip.map(tracing::field::display),
                    old_public_ipv6 = old.attrs.public_ipv6.map(tracing::field::display),
                    "subnet updated"
                )
            }
            PeerEvent::Removed(l) => tracing::info!(subnet = %l.key, "subnet removed"),
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Owns the registry watch: list, watch from the list's revision, and after any failure back
/// off and call the same watch again, which then re-lists ([`LeaseWatch`]'s contract; opening
/// a new one from the last revision would replay the history that failed, say a response too
/// large to decode, until it is compacted away). Until a watch is open, each try lists again:
/// a watch from the list's revision streams only later changes, so a list whose watch failed
/// to open must not be taken as seen. Runs in its own task so the manager never drops a
/// `next()` in flight (backends need not be cancel-safe).
async fn watch_task(
    registry: Arc<dyn Registry>,
    tx: mpsc::Sender<WatchMsg>,
    mut backoff: Backoff,
    cancel: CancellationToken,
) {
    let mut watch: Option<Box<dyn LeaseWatch>> = None;
    let mut last_ok = false;
    loop {
        let result = {
            let step = async {
                let Some(w) = watch.as_mut() else {
                    let list = registry.list_leases().await?;
                    watch = Some(registry.watch_leases(list.revision).await?);
                    return Ok(WatchEvent::Snapshot(list));
                };
                w.next().await
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = step => r,
            }
        };
        let failed = result.is_err();
        let msg = match result {
            Ok(event) => {
                // A snapshot after an error shows the list works, not the stream (one that
                // opens and breaks at once would otherwise re-list every backoff_min): the
                // backoff resets at changes, or at the answer after the snapshot.
                if last_ok || matches!(event, WatchEvent::Changes { .. }) {
                    backoff.reset();
                }
                last_ok = true;
                WatchMsg::Event(event)
            }
            Err(e) => {
                last_ok = false;
                WatchMsg::Failed(e)
            }
        };
        if tx.send(msg).await.is_err() {
            return;
        }
        if failed {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff.next()) => {}
            }
        }
    }
}

#[cfg(test)]
mod test {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;

    use super::*;
    use crate::lease::{LeaseList, Revision};
    use crate::model::NetworkConfigSpec;

    /// A registry where every create loses a race and nothing is ever listed.
    struct AlwaysTaken {
        creates: AtomicUsize,
    }

    #[async_trait]
    impl Registry for AlwaysTaken {
        fn location(&self) -> String {
            "fake".into()
        }
        async fn get_network_config(&self) -> Result<NetworkConfig, RegistryError> {
            unimplemented!()
        }
        async fn put_network_config(&self, _: &NetworkConfigSpec) -> Result<(), RegistryError> {
            unimplemented!()
        }
        async fn create_network_config(
            &self,
            _: &NetworkConfigSpec,
        ) -> Result<bool, RegistryError> {
            unimplemented!()
        }
        async fn keep_as_reservation(&self, _: &Lease) -> Result<Lease, RegistryError> {
            unimplemented!()
        }
        async fn revoke_dead(&self, _: &SubnetKey) -> Result<bool, RegistryError> {
            unimplemented!()
        }
        async fn list_leases(&self) -> Result<LeaseList, RegistryError> {
            Ok(LeaseList::default())
        }
        async fn create_lease(
            &self,
            key: &SubnetKey,
            _: &LeaseAttrs,
        ) -> Result<Lease, RegistryError> {
            self.creates.fetch_add(1, Ordering::SeqCst);
            Err(RegistryError::AlreadyExists(*key))
        }
        async fn create_reservation(
            &self,
            key: &SubnetKey,
            _: &LeaseAttrs,
        ) -> Result<Lease, RegistryError> {
            Err(RegistryError::AlreadyExists(*key))
        }
        async fn renew_lease(&self, l: &Lease, _: &LeaseAttrs) -> Result<Lease, RegistryError> {
            Err(RegistryError::NotFound(l.key))
        }
        async fn revoke_lease(&self, _: &SubnetKey) -> Result<bool, RegistryError> {
            Ok(false)
        }
        async fn release_lease(&self, _: &Lease) -> Result<bool, RegistryError> {
            Ok(false)
        }
        async fn watch_leases(&self, _: Revision) -> Result<Box<dyn LeaseWatch>, RegistryError> {
            unimplemented!()
        }
        fn lease_ttl(&self) -> Duration {
            Duration::from_secs(60)
        }
    }

    #[tokio::test]
    async fn gives_up_after_ten_lost_races_naming_the_subnet() {
        let reg = AlwaysTaken {
            creates: AtomicUsize::new(0),
        };
        let config = NetworkConfig::from_json(r#"{"Network":"198.19.0.0/16"}"#).unwrap();
        let attrs = LeaseAttrs::with_public_ip("198.18.1.1".parse().unwrap());
        let mut rng = StdRng::seed_from_u64(3);
        let err = acquire(&reg, &config, &attrs, None, &mut rng)
            .await
            .unwrap_err();
        assert_eq!(reg.creates.load(Ordering::SeqCst), RACE_RETRIES);
        let AcquireError::Races { subnet, tries } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(*tries, 10);
        let msg = err.to_string();
        assert!(
            msg.starts_with("Max retries reached trying to acquire a subnet"),
            "{msg}"
        );
        assert!(msg.contains(&subnet.to_string()), "{msg}");
    }

    /// An in-memory registry that a test can take down: while down, every call fails as an
    /// unreachable etcd does (transiently). It keeps the leases created in it and records when
    /// each renewal succeeded.
    #[derive(Default)]
    struct Outage {
        shared: Arc<OutageShared>,
        renewals: std::sync::Mutex<Vec<Instant>>,
        /// How long each renewal takes (a slow registry).
        renew_delay: Duration,
        /// Renewals tried, whatever their outcome.
        renew_attempts: AtomicUsize,
        /// Told when a renewal begins (before its `renew_delay`).
        renewal_begins: tokio::sync::Notify,
        /// Lists asked for (acquisitions; the watch's snapshots are not counted).
        lists: AtomicUsize,
    }

    #[derive(Default)]
    struct OutageShared {
        down: std::sync::atomic::AtomicBool,
        leases: std::sync::Mutex<Vec<Lease>>,
        /// The watch sends a snapshot at every call instead of pausing after the first (a
        /// registry full of changes).
        firehose: bool,
        /// The watch starts with no snapshot, as an etcd watch from a revision streams only
        /// what changed after it.
        changes_only: bool,
        /// Raised by a test after changing `leases`: the watch then sends a snapshot.
        generation: std::sync::atomic::AtomicU64,
        /// Opening a watch fails this many more times.
        failing_watch_opens: std::sync::atomic::AtomicUsize,
        /// Creating a lease fails (no free subnet, say).
        refuse_creates: std::sync::atomic::AtomicBool,
        /// Creates and renewals fail as unavailable while reads work (etcd over its quota).
        unavailable_writes: std::sync::atomic::AtomicBool,
        /// Creates and renewals are refused for good (permissions revoked).
        refused_writes: std::sync::atomic::AtomicBool,
        /// Renewals are written, and the watch told, but answered with an error (a reply lost
        /// to a timeout).
        lost_answers: std::sync::atomic::AtomicBool,
        /// The watch's stream breaks right after each snapshot (it re-lists, as the trait asks).
        breaking_stream: bool,
        /// Snapshots the watch has handed out.
        snapshots: AtomicUsize,
        /// Leases are written for a day, not for sixty seconds: no renewal falls due in a test.
        day_long: std::sync::atomic::AtomicBool,
        /// Every renewal is shown to the watches (managers sharing the registry see each
        /// other's writes).
        echo_renewals: std::sync::atomic::AtomicBool,
    }

    impl OutageShared {
        fn up(&self) -> Result<(), RegistryError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(RegistryError::Unavailable {
                    location: "fake".into(),
                    reason: "down for the test".into(),
                });
            }
            Ok(())
        }

        fn writable(&self) -> Result<(), RegistryError> {
            self.up()?;
            if self.unavailable_writes.load(Ordering::SeqCst) {
                return Err(RegistryError::Unavailable {
                    location: "fake".into(),
                    reason: "database space exceeded".into(),
                });
            }
            if self.refused_writes.load(Ordering::SeqCst) {
                return Err(RegistryError::Refused {
                    location: "fake".into(),
                    reason: "permission denied".into(),
                });
            }
            Ok(())
        }

        /// A lease as this registry writes it.
        fn written(&self, key: SubnetKey, attrs: &LeaseAttrs) -> Lease {
            let mut lease = sixty_seconds(key, attrs);
            if self.day_long.load(Ordering::SeqCst) {
                lease.expiration = Some(SystemTime::now() + Duration::from_secs(86_400));
            }
            lease
        }

        fn list(&self) -> LeaseList {
            LeaseList {
                leases: self.leases.lock().unwrap().clone(),
                revision: 1,
            }
        }
    }

    fn sixty_seconds(key: SubnetKey, attrs: &LeaseAttrs) -> Lease {
        Lease {
            key,
            attrs: attrs.clone(),
            expiration: Some(SystemTime::now() + Duration::from_secs(60)),
            lease_id: None,
        }
    }

    /// The watch of [`Outage`]: a snapshot first (unless `changes_only`), as after any
    /// reconnect, then one whenever the test raises `generation`, and nothing else until the
    /// registry goes down (or, with `firehose`, a snapshot at every call).
    struct OutageWatch {
        shared: Arc<OutageShared>,
        listed: bool,
        generation: u64,
    }

    #[async_trait]
    impl LeaseWatch for OutageWatch {
        async fn next(&mut self) -> Result<WatchEvent, RegistryError> {
            loop {
                if let Err(e) = self.shared.up() {
                    // As the trait asks: the first answer after an error is a snapshot.
                    self.listed = false;
                    return Err(e);
                }
                if self.shared.breaking_stream && self.listed {
                    self.listed = false;
                    return Err(RegistryError::Unavailable {
                        location: "fake".into(),
                        reason: "the stream broke".into(),
                    });
                }
                let generation = self.shared.generation.load(Ordering::SeqCst);
                if !self.listed || self.shared.firehose || generation != self.generation {
                    self.listed = true;
                    self.generation = generation;
                    self.shared.snapshots.fetch_add(1, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    return Ok(WatchEvent::Snapshot(self.shared.list()));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    #[async_trait]
    impl Registry for Outage {
        fn location(&self) -> String {
            "fake".into()
        }
        async fn get_network_config(&self) -> Result<NetworkConfig, RegistryError> {
            unimplemented!()
        }
        async fn put_network_config(&self, _: &NetworkConfigSpec) -> Result<(), RegistryError> {
            unimplemented!()
        }
        async fn create_network_config(
            &self,
            _: &NetworkConfigSpec,
        ) -> Result<bool, RegistryError> {
            unimplemented!()
        }
        async fn keep_as_reservation(&self, _: &Lease) -> Result<Lease, RegistryError> {
            unimplemented!()
        }
        async fn revoke_dead(&self, _: &SubnetKey) -> Result<bool, RegistryError> {
            unimplemented!()
        }
        async fn list_leases(&self) -> Result<LeaseList, RegistryError> {
            self.shared.up()?;
            self.lists.fetch_add(1, Ordering::SeqCst);
            Ok(self.shared.list())
        }
        async fn create_lease(
            &self,
            key: &SubnetKey,
            attrs: &LeaseAttrs,
        ) -> Result<Lease, RegistryError> {
            self.shared.writable()?;
            if self.shared.refuse_creates.load(Ordering::SeqCst) {
                return Err(RegistryError::Refused {
                    location: "fake".into(),
                    reason: "refused for the test".into(),
                });
            }
            let lease = self.shared.written(*key, attrs);
            self.shared.leases.lock().unwrap().push(lease.clone());
            Ok(lease)
        }
        async fn create_reservation(
            &self,
            _: &SubnetKey,
            _: &LeaseAttrs,
        ) -> Result<Lease, RegistryError> {
            unimplemented!()
        }
        async fn renew_lease(&self, l: &Lease, attrs: &LeaseAttrs) -> Result<Lease, RegistryError> {
            self.renewal_begins.notify_one();
            tokio::time::sleep(self.renew_delay).await;
            self.renew_attempts.fetch_add(1, Ordering::SeqCst);
            self.shared.writable()?;
            self.renewals.lock().unwrap().push(Instant::now());
            let lease = self.shared.written(l.key, attrs);
            *self.shared.leases.lock().unwrap() = vec![lease.clone()];
            if self.shared.echo_renewals.load(Ordering::SeqCst) {
                self.shared.generation.fetch_add(1, Ordering::SeqCst);
            }
            if self.shared.lost_answers.load(Ordering::SeqCst) {
                self.shared.generation.fetch_add(1, Ordering::SeqCst);
                return Err(RegistryError::Unavailable {
                    location: "fake".into(),
                    reason: "request timed out".into(),
                });
            }
            Ok(lease)
        }
        async fn revoke_lease(&self, _: &SubnetKey) -> Result<bool, RegistryError> {
            unimplemented!()
        }
        async fn release_lease(&self, _: &Lease) -> Result<bool, RegistryError> {
            unimplemented!()
        }
        async fn watch_leases(&self, _: Revision) -> Result<Box<dyn LeaseWatch>, RegistryError> {
            self.shared.up()?;
            let failing = &self.shared.failing_watch_opens;
            if failing
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(RegistryError::Unavailable {
                    location: "fake".into(),
                    reason: "no leader".into(),
                });
            }
            Ok(Box::new(OutageWatch {
                shared: Arc::clone(&self.shared),
                listed: self.shared.changes_only,
                generation: self.shared.generation.load(Ordering::SeqCst),
            }))
        }
        fn lease_ttl(&self) -> Duration {
            Duration::from_secs(60)
        }
    }

    /// The wall clock stepping ahead (NTP after a boot without a clock) brings the lease's
    /// expiry nearer than the monotonic renewal timer knows: renewal is moved to now. A step
    /// within the slack, or back, leaves the timer alone.
    #[tokio::test(start_paused = true)]
    async fn a_wall_clock_step_ahead_brings_the_renewal_forward() {
        let reg = Arc::new(Outage::default());
        let config = NetworkConfig::from_json(r#"{"Network":"198.19.0.0/16"}"#).unwrap();
        let mut opts =
            ManagerOptions::new(LeaseAttrs::with_public_ip("198.18.1.1".parse().unwrap()));
        opts.renew_margin = Duration::from_secs(50);
        let mut m = LeaseManager::new(Arc::clone(&reg) as Arc<dyn Registry>, config, opts);
        m.acquire().await.unwrap();
        // A 60 s lease: renewal due in 10 s.
        let due = m.renew_at.unwrap();
        let wall = SystemTime::now();
        for step in [Duration::ZERO, Duration::from_secs(1)] {
            m.check_clock(wall + step);
            assert_eq!(m.renew_at, Some(due), "{step:?}");
        }
        m.check_clock(wall - Duration::from_secs(3600));
        assert_eq!(m.renew_at, Some(due));
        m.check_clock(wall + Duration::from_secs(58));
        assert_eq!(m.renew_at, Some(Instant::now()));
    }

    #[test]
    fn renewal_is_overdue_only_when_the_expiry_came_nearer_than_the_timer_knows() {
        let (t, s) = (
            SystemTime::UNIX_EPOCH + Duration::from_secs(1 << 30),
            Duration::from_secs,
        );
        let margin = s(3600);
        // A day's lease, renewed an hour before expiry: the timer waits 23 h.
        assert!(!renewal_overdue(t + s(86_400), t, s(82_800), margin));
        // Two hours later by both clocks.
        assert!(!renewal_overdue(
            t + s(86_400),
            t + s(7200),
            s(75_600),
            margin
        ));
        // The wall clock jumped 10 h ahead: the expiry is 14 h away, renewal due in 13 h.
        assert!(renewal_overdue(
            t + s(86_400),
            t + s(36_000),
            s(82_800),
            margin
        ));
        // Expired by the wall clock.
        assert!(renewal_overdue(
            t + s(86_400),
            t + s(90_000),
            s(82_800),
            margin
        ));
        // Short leases renew at half the time left.
        assert!(!renewal_overdue(t + s(60), t, s(30), margin));
    }

    /// In tokio's paused time. A 60 s lease is due for renewal at 10 s; the registry is down
    /// from 5 s to 18 s. Renewal retries back off to 11, 13, 17 and 25 s; the watch, failed at
    /// 5.1 s, retries at 6.1, 8.1, 12.1 and 20.1 s, finds the registry back and re-lists. The
    /// renewal must follow that first answer, not wait for its own retry at 25 s.
    #[tokio::test(start_paused = true)]
    async fn a_renewal_missed_in_an_outage_is_made_when_the_registry_answers_again() {
        let reg = Arc::new(Outage::default());
        let config = NetworkConfig::from_json(r#"{"Network":"198.19.0.0/16"}"#).unwrap();
        let mut opts =
            ManagerOptions::new(LeaseAttrs::with_public_ip("198.18.1.1".parse().unwrap()));
        opts.renew_margin = Duration::from_secs(50);
        opts.backoff_min = Duration::from_secs(1);
        opts.backoff_max = Duration::from_secs(8);
        let mut m = LeaseManager::new(Arc::clone(&reg) as Arc<dyn Registry>, config, opts);
        let own = m.acquire().await.unwrap();
        let state = m.subscribe();
        let start = Instant::now();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(m.run(cancel.clone()));
        tokio::time::sleep(Duration::from_secs(5)).await;
        reg.shared.down.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(13)).await;
        assert!(
            reg.renewals.lock().unwrap().is_empty(),
            "renewed while down"
        );
        assert!(
            !state.borrow().registry.connected,
            "the outage went unnoticed"
        );
        reg.shared.down.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(10)).await;
        cancel.cancel();
        task.await.unwrap();
        let first = reg.renewals.lock().unwrap()[0] - start;
        assert!(
            first >= Duration::from_secs(20) && first < Duration::from_secs(21),
            "first renewal after {first:?}"
        );
        assert_eq!(state.borrow().own.as_ref().map(|l| l.key), Some(own.key));
        assert!(state.borrow().registry.connected);
    }

    fn peer_lease(subnet: &str, ip: &str) -> Lease {
        sixty_seconds(
            SubnetKey::parse(subnet).unwrap(),
            &LeaseAttrs::with_public_ip(ip.parse().unwrap()),
        )
    }

    fn peer_keys(state: &watch::Receiver<LeaseState>) -> Vec<String> {
        state
            .borrow()
            .peers
            .iter()
            .map(|l| l.key.to_string())
            .collect()
    }

    /// A running manager on `reg` for host 198.18.1.1 in 198.19.0.0/16, its lease acquired;
    /// `tune` adjusts the options. Returns its state, and what stops it.
    async fn run_manager(
        reg: &Arc<Outage>,
        tune: impl FnOnce(&mut ManagerOptions),
    ) -> (
        watch::Receiver<LeaseState>,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        run_manager_in(reg, r#"{"Network":"198.19.0.0/16"}"#, tune).await
    }

    /// [`run_manager`] in the network of config `json`.
    async fn run_manager_in(
        reg: &Arc<Outage>,
        json: &str,
        tune: impl FnOnce(&mut ManagerOptions),
    ) -> (
        watch::Receiver<LeaseState>,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let config = NetworkConfig::from_json(json).unwrap();
        let mut opts =
            ManagerOptions::new(LeaseAttrs::with_public_ip("198.18.1.1".parse().unwrap()));
        tune(&mut opts);
        let mut m = LeaseManager::new(Arc::clone(reg) as Arc<dyn Registry>, config, opts);
        m.acquire().await.unwrap();
        let state = m.subscribe();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(m.run(cancel.clone()));
        (state, cancel, task)
    }

    /// The leases listed before a watch could be opened (an etcd leader election, say) are
    /// not lost: the retry lists again instead of watching from the list's revision, which
    /// would stream only later changes and leave those peers out for a day.
    #[tokio::test(start_paused = true)]
    async fn peers_listed_before_a_failed_watch_open_are_not_lost() {
        let reg = Arc::new(Outage {
            shared: Arc::new(OutageShared {
                changes_only: true,
                failing_watch_opens: 1.into(),
                ..OutageShared::default()
            }),
            ..Outage::default()
        });
        reg.shared
            .leases
            .lock()
            .unwrap()
            .push(peer_lease("198.19.5.0-24", "198.18.1.5"));
        let (state, cancel, task) =
            run_manager(&reg, |o| o.backoff_min = Duration::from_secs(1)).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        cancel.cancel();
        task.await.unwrap();
        assert_eq!(reg.shared.failing_watch_opens.load(Ordering::SeqCst), 0);
        assert_eq!(peer_keys(&state), ["198.19.5.0-24"]);
    }

    /// A peer's key sharing our IPv4 subnet (past the create check: a flanneld, a check cut
    /// short) arrives in the same snapshot as a rewrite of our own key (an expiry that moved
    /// after a re-list): the renewal that settles which key keeps the subnet is still made at
    /// once, not put back to the normal schedule by taking in our key's new expiry.
    #[tokio::test(start_paused = true)]
    async fn an_overlapping_key_seen_with_our_own_rewritten_still_renews_at_once() {
        let reg = Arc::new(Outage::default());
        let (state, cancel, task) = run_manager_in(
            &reg,
            r#"{"Network":"198.19.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:19::/48"}"#,
            |_| {},
        )
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let own = state.borrow().own.clone().unwrap();
        let other = SubnetKey::parse(&format!(
            "{}&fd00:19:0:ffff::-64",
            own.key.to_string().split('&').next().unwrap()
        ))
        .unwrap();
        assert!(other != own.key && other.shares_subnet(&own.key));
        {
            let mut leases = reg.shared.leases.lock().unwrap();
            let mine = leases.iter_mut().find(|l| l.key == own.key).unwrap();
            mine.expiration = Some(SystemTime::now() + Duration::from_secs(120));
            leases.push(peer_lease(&other.to_string(), "198.18.1.9"));
        }
        reg.shared.generation.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let renewals = reg.renew_attempts.load(Ordering::SeqCst);
        cancel.cancel();
        task.await.unwrap();
        assert_eq!(renewals, 1, "the overlap was not settled at once");
    }

    /// While a lost lease cannot be re-acquired (no free subnet, a refusing registry), peers
    /// that join still reach the state, and with it the forwarding table.
    #[tokio::test(start_paused = true)]
    async fn peers_still_change_while_a_lost_lease_cannot_be_re_acquired() {
        let reg = Arc::new(Outage::default());
        let (state, cancel, task) = run_manager(&reg, |o| {
            o.backoff_min = Duration::from_secs(1);
            o.backoff_max = Duration::from_secs(60);
        })
        .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        // Our lease is deleted and no new one may be created.
        reg.shared.refuse_creates.store(true, Ordering::SeqCst);
        reg.shared.leases.lock().unwrap().clear();
        reg.shared.generation.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(state.borrow().own.is_none(), "the lease was not lost");
        // A host joins.
        reg.shared
            .leases
            .lock()
            .unwrap()
            .push(peer_lease("198.19.7.0-24", "198.18.1.7"));
        reg.shared.generation.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(5)).await;
        let peers = peer_keys(&state);
        cancel.cancel();
        task.await.unwrap();
        assert_eq!(peers, ["198.19.7.0-24"]);
    }

    /// A registry that goes out of reach between the config read and the lease is waited for,
    /// as it was before the config; a refusal is not.
    #[tokio::test(start_paused = true)]
    async fn the_first_lease_is_waited_for_while_the_registry_is_out_of_reach() {
        let reg = Arc::new(Outage::default());
        reg.shared.down.store(true, Ordering::SeqCst);
        let config = NetworkConfig::from_json(r#"{"Network":"198.19.0.0/16"}"#).unwrap();
        let opts = ManagerOptions::new(LeaseAttrs::with_public_ip("198.18.1.1".parse().unwrap()));
        let mut m = LeaseManager::new(Arc::clone(&reg) as Arc<dyn Registry>, config, opts);
        let back = Arc::clone(&reg);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(3500)).await;
            back.shared.down.store(false, Ordering::SeqCst);
        });
        let mut heard = 0;
        let lease = m.acquire_patiently(|e| {
            assert!(e.may_pass(), "{e}");
            heard += 1;
        });
        let lease = lease.await.unwrap();
        assert_eq!(heard, 4, "tries at 0, 1, 2 and 3 s failed");
        assert!(reg.shared.leases.lock().unwrap().contains(&lease));
        // No free subnet (creates refused) is an answer, not an outage: no waiting.
        let reg = Arc::new(Outage::default());
        reg.shared.refuse_creates.store(true, Ordering::SeqCst);
        let config = NetworkConfig::from_json(r#"{"Network":"198.19.0.0/16"}"#).unwrap();
        let opts = ManagerOptions::new(LeaseAttrs::with_public_ip("198.18.1.1".parse().unwrap()));
        let mut m = LeaseManager::new(Arc::clone(&reg) as Arc<dyn Registry>, config, opts);
        let err = m.acquire_patiently(|e| panic!("waited on {e}")).await;
        assert!(err.is_err());
    }

    /// While renewals fail for a reason that may pass and the watch still answers (etcd over
    /// its space quota), the registry stays reported down, and renewals keep their backoff: a
    /// peer's renewal used to report it "available again", and to trigger a renewal at once,
    /// at every watch event.
    #[tokio::test(start_paused = true)]
    async fn failing_writes_keep_the_registry_down_while_the_watch_answers() {
        let reg = Arc::new(Outage::default());
        let peer = peer_lease("198.19.5.0-24", "198.18.1.5");
        reg.shared.leases.lock().unwrap().push(peer.clone());
        // Renewal due at 10 s, retried at 11, 13, 17 and 25 s.
        let (state, cancel, task) = run_manager(&reg, |o| {
            o.renew_margin = Duration::from_secs(50);
            o.backoff_min = Duration::from_secs(1);
            o.backoff_max = Duration::from_secs(8);
        })
        .await;
        reg.shared.unavailable_writes.store(true, Ordering::SeqCst);
        // The peer renews every 2 s for 30 s.
        let mut first = None;
        for _ in 0..15 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            reg.shared.generation.fetch_add(1, Ordering::SeqCst);
            let since = state.borrow().registry.failing_since;
            first = first.or(since);
        }
        let during = state.borrow().registry.clone();
        let attempts = reg.renew_attempts.load(Ordering::SeqCst);
        reg.shared.unavailable_writes.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(10)).await;
        let after = state.borrow().registry.clone();
        cancel.cancel();
        task.await.unwrap();
        assert!(!during.connected, "{during:?}");
        assert_eq!(during.resyncs, 0, "reported back while writes failed");
        assert_eq!(attempts, 5, "renewals tried in the first 30 s");
        assert!(after.connected, "{after:?}");
        assert_eq!(after.resyncs, 1);
        // The outage began once: failing again does not move its start, nor does recovery,
        // which is recorded apart.
        assert!(first.is_some(), "{during:?}");
        assert_eq!(during.failing_since, first);
        assert_eq!(during.recovered_at, None);
        assert_eq!(after.failing_since, first);
        assert!(after.recovered_at > first, "{after:?}");
    }

    /// The peers listed while choosing the lease are published with it, before the watch runs:
    /// the daemon's first table (and subnet.env, READY=1) then come with routes to them.
    #[tokio::test(start_paused = true)]
    async fn the_first_lease_comes_with_the_peers_listed_for_it() {
        let reg = Arc::new(Outage::default());
        let peer = peer_lease("198.19.5.0-24", "198.18.1.5");
        reg.shared.leases.lock().unwrap().push(peer.clone());
        let config = NetworkConfig::from_json(r#"{"Network":"198.19.0.0/16"}"#).unwrap();
        let opts = ManagerOptions::new(LeaseAttrs::with_public_ip("198.18.1.1".parse().unwrap()));
        let mut m = LeaseManager::new(Arc::clone(&reg) as Arc<dyn Registry>, config, opts);
        let own = m.acquire().await.unwrap();
        let state = m.subscribe().borrow().clone();
        assert_eq!(state.own.map(|l| l.key), Some(own.key));
        assert_eq!(state.peers, [peer]);
    }

    /// Our key rewritten as a reservation naming only our PublicIP (an operator's `lease
    /// reserve` while we hold it, on a host that also advertises IPv6) is still ours: held, and
    /// rewritten with all our addresses, not given up and acquired again.
    #[tokio::test(start_paused = true)]
    async fn a_reservation_naming_only_our_public_ip_is_still_ours() {
        let reg = Arc::new(Outage::default());
        let (state, cancel, task) = run_manager(&reg, |o| {
            o.attrs.public_ipv6 = Some("fd00:18::1".parse().unwrap());
        })
        .await;
        // Running: its watch (whose first answer is a snapshot) is open.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let own = state.borrow().own.clone().unwrap();
        let lists = reg.lists.load(Ordering::SeqCst);
        let reserved = Lease {
            attrs: LeaseAttrs::with_public_ip("198.18.1.1".parse().unwrap()),
            expiration: None,
            ..own.clone()
        };
        *reg.shared.leases.lock().unwrap() = vec![reserved.clone()];
        reg.shared.generation.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = state.borrow().own.clone().unwrap();
        cancel.cancel();
        task.await.unwrap();
        assert_eq!(reg.lists.load(Ordering::SeqCst), lists, "acquired again");
        assert_eq!(
            reg.renew_attempts.load(Ordering::SeqCst),
            1,
            "not rewritten"
        );
        assert_eq!(
            (after.key, after.attrs.public_ipv6),
            (own.key, own.attrs.public_ipv6)
        );
    }

    /// Another host writing our key with only some of our addresses (two hosts configured
    /// with one PublicIP share it) gets a rewrite at once; a second such write soon after, one
    /// a minute after it, which a third meanwhile does not put off further; one soon after
    /// that minute, one a minute after it; one after two quiet minutes, one at once again.
    #[tokio::test(start_paused = true)]
    async fn partial_writes_are_answered_at_once_then_once_a_minute() {
        let reg = Arc::new(Outage::default());
        reg.shared.day_long.store(true, Ordering::SeqCst);
        let (state, cancel, task) = run_manager_in(
            &reg,
            r#"{"Network":"198.19.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:19::/48"}"#,
            |o| o.attrs.public_ipv6 = Some("fd00:18::1".parse().unwrap()),
        )
        .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let own = state.borrow().own.clone().unwrap();
        let partial = |v6: &str| {
            let mut attrs = own.attrs.clone();
            attrs.public_ipv6 = Some(v6.parse().unwrap());
            *reg.shared.leases.lock().unwrap() = vec![reg.shared.written(own.key, &attrs)];
            reg.shared.generation.fetch_add(1, Ordering::SeqCst);
        };
        let rewrites = || reg.renew_attempts.load(Ordering::SeqCst);
        assert_eq!(rewrites(), 0);
        partial("fd00:18::2");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(rewrites(), 1, "not rewritten at once");
        let first = reg.renewals.lock().unwrap()[0];
        partial("fd00:18::2");
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(rewrites(), 1, "rewritten again within the minute");
        partial("fd00:18::3");
        tokio::time::sleep_until(first + PARTIAL_REWRITE_GAP + Duration::from_secs(2)).await;
        assert_eq!(
            rewrites(),
            2,
            "not rewritten a minute after the second write"
        );
        // As the other host writes it again a minute after each of our rewrites: answered a
        // minute after it comes, not at once.
        let second = reg.renewals.lock().unwrap()[1];
        tokio::time::sleep_until(second + PARTIAL_REWRITE_GAP + Duration::from_secs(10)).await;
        partial("fd00:18::2");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            rewrites(),
            2,
            "rewritten at once while such writes keep coming"
        );
        tokio::time::sleep(PARTIAL_REWRITE_GAP).await;
        assert_eq!(rewrites(), 3, "not rewritten a minute after the write");
        // After a quiet spell, at once again.
        let third = reg.renewals.lock().unwrap()[2];
        tokio::time::sleep_until(third + 2 * PARTIAL_REWRITE_GAP + Duration::from_secs(1)).await;
        assert_eq!(rewrites(), 3);
        partial("fd00:18::3");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(rewrites(), 4, "not rewritten at once after a quiet spell");
        let written = reg.shared.leases.lock().unwrap()[0].attrs.clone();
        cancel.cancel();
        task.await.unwrap();
        assert_eq!(written, own.attrs);
    }

    /// Two hosts configured with one PublicIP and their own IPv6 addresses share a key: each
    /// one's write names only some of the other's addresses. Over ten minutes the two write
    /// it about once a minute together, each answering the other's write a minute later, also
    /// when the second sees the first's first rewrite late (its watch opens 5 s late) but
    /// later ones at once: measured from its own last rewrite, it would answer each a few
    /// seconds after it comes, and the key be written twice a minute.
    #[tokio::test(start_paused = true)]
    async fn two_hosts_sharing_a_key_write_it_once_a_minute_together() {
        for late in [false, true] {
            two_hosts_share_a_key(late).await;
        }
    }

    async fn two_hosts_share_a_key(late: bool) {
        let shared = Arc::new(OutageShared::default());
        shared.day_long.store(true, Ordering::SeqCst);
        shared.echo_renewals.store(true, Ordering::SeqCst);
        let json = r#"{"Network":"198.19.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:19::/48"}"#;
        let mut hosts = Vec::new();
        for (i, v6) in ["fd00:18::1", "fd00:18::2"].into_iter().enumerate() {
            let reg = Arc::new(Outage {
                shared: Arc::clone(&shared),
                ..Outage::default()
            });
            if late && i == 1 {
                shared.failing_watch_opens.store(1, Ordering::SeqCst);
            }
            let (state, cancel, task) = run_manager_in(&reg, json, |o| {
                o.attrs.public_ipv6 = Some(v6.parse().unwrap());
                o.backoff_min = Duration::from_secs(5);
            })
            .await;
            hosts.push((reg, state, cancel, task));
        }
        let keys: Vec<_> = hosts
            .iter()
            .map(|h| h.1.borrow().own.as_ref().map(|l| l.key))
            .collect();
        assert!(keys[0].is_some() && keys[0] == keys[1], "{keys:?}");
        let writes = || {
            hosts
                .iter()
                .map(|h| h.0.renew_attempts.load(Ordering::SeqCst))
                .collect::<Vec<_>>()
        };
        tokio::time::sleep(Duration::from_secs(600)).await;
        let each = writes();
        let total: usize = each.iter().sum();
        // About one a minute, each host answering the other: not two a minute, nor one host
        // alone.
        assert!((9..=13).contains(&total), "late {late}: {each:?}");
        assert!(each.iter().all(|n| *n >= 4), "late {late}: {each:?}");
        for (_, _, cancel, task) in hosts {
            cancel.cancel();
            task.await.unwrap();
        }
    }

    /// A manager on `reg` in `config` that has acquired a lease with `attrs` and runs for a
    /// second: its lease, a sender of new addresses, its state, and what stops it.
    async fn run_readdressable(
        reg: &Arc<Outage>,
        config: NetworkConfig,
        attrs: &LeaseAttrs,
    ) -> (
        Lease,
        watch::Sender<LeaseAttrs>,
        watch::Receiver<LeaseState>,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let mut m = LeaseManager::new(
            Arc::clone(reg) as Arc<dyn Registry>,
            config,
            ManagerOptions::new(attrs.clone()),
        );
        let first = m.acquire().await.unwrap();
        let addresses = m.address_sender();
        let state = m.subscribe();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(m.run(cancel.clone()));
        tokio::time::sleep(Duration::from_secs(1)).await;
        (first, addresses, state, cancel, task)
    }

    /// A fake registry writing day-long leases, and a dual-stack network.
    fn day_long_dual_stack() -> (Arc<Outage>, NetworkConfig) {
        let reg = Arc::new(Outage::default());
        reg.shared.day_long.store(true, Ordering::SeqCst);
        let config = NetworkConfig::from_json(
            r#"{"Network":"198.19.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:19::/48"}"#,
        )
        .unwrap();
        (reg, config)
    }

    /// Another host's partial write seen while the rewrite for a new address of this host is
    /// due does not put that rewrite off by the minute partial writes wait.
    #[tokio::test(start_paused = true)]
    async fn a_partial_write_does_not_put_off_the_rewrite_for_a_new_address() {
        let (reg, config) = day_long_dual_stack();
        let mut attrs = LeaseAttrs::with_public_ip("198.18.1.1".parse().unwrap());
        let with_v6 = |v6: &str, attrs: &mut LeaseAttrs| {
            attrs.public_ipv6 = Some(v6.parse().unwrap());
            attrs.clone()
        };
        let old = with_v6("fd00:18::1", &mut attrs);
        let mut m = LeaseManager::new(
            Arc::clone(&reg) as Arc<dyn Registry>,
            config,
            ManagerOptions::new(old),
        );
        let first = m.acquire().await.unwrap();
        // Partial writes came lately: the next would wait a minute.
        m.partial_rewrite = Some((Instant::now(), true));
        m.readdress(with_v6("fd00:18::9", &mut attrs));
        let due = m.renew_at.expect("a rewrite due");
        let other = with_v6("fd00:18::2", &mut attrs);
        m.on_event(WatchEvent::Snapshot(LeaseList {
            leases: vec![reg.shared.written(first.key, &other)],
            revision: 2,
        }));
        assert_eq!(m.renew_at, Some(due));
    }

    /// A new address for this host (its underlay address moved) rewrites its lease in place,
    /// keeping the subnet. A write of the old value that the watch shows meanwhile (here while
    /// the rewrites fail, as against an etcd over its quota, and after the address changed
    /// once more) is this host's from before, not another host's taking the subnet: the lease
    /// is neither given up nor acquired again, and ends with the last address.
    #[tokio::test(start_paused = true)]
    async fn a_new_address_rewrites_the_lease_and_keeps_the_subnet() {
        let reg = Arc::new(Outage::default());
        let config = NetworkConfig::from_json(r#"{"Network":"198.19.0.0/16"}"#).unwrap();
        let old = LeaseAttrs::with_public_ip("198.18.1.1".parse().unwrap());
        let new = LeaseAttrs::with_public_ip("198.18.1.9".parse().unwrap());
        let last = LeaseAttrs::with_public_ip("198.18.1.10".parse().unwrap());
        let (first, addresses, state, cancel, task) = run_readdressable(&reg, config, &old).await;
        reg.shared.unavailable_writes.store(true, Ordering::SeqCst);
        addresses.send(new.clone()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while reg.renew_attempts.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            reg.renew_attempts.load(Ordering::SeqCst),
            1,
            "no rewrite was tried"
        );
        addresses.send(last.clone()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while reg.renew_attempts.load(Ordering::SeqCst) < 2 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            reg.renew_attempts.load(Ordering::SeqCst),
            2,
            "no second rewrite"
        );
        // The key with the old address and a later expiry: a renewal's echo from before.
        *reg.shared.leases.lock().unwrap() = vec![sixty_seconds(first.key, &old)];
        reg.shared.generation.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let during = state.borrow().own.clone();
        reg.shared.unavailable_writes.store(false, Ordering::SeqCst);
        // The rewrite is retried with backoff (1 s, then 2 s).
        tokio::time::sleep(Duration::from_secs(10)).await;
        let registry = reg.shared.leases.lock().unwrap().clone();
        let own = state.borrow().own.clone();
        cancel.cancel();
        task.await.unwrap();
        assert_eq!(
            during.map(|l| l.key),
            Some(first.key),
            "the lease was given up"
        );
        assert_eq!(registry.len(), 1, "{registry:?}");
        assert_eq!((registry[0].key, &registry[0].attrs), (first.key, &last));
        let own = own.expect("a lease");
        assert_eq!((own.key, own.attrs), (first.key, last));
    }

    /// After a move of the IPv6 address alone, a write of the key from before (an etcd watch
    /// delivers it before the rewrite's echo) still names the PublicIP: it is this host's own,
    /// not another host's write naming only some of its addresses, and brings no rewrite.
    #[tokio::test(start_paused = true)]
    async fn an_old_write_after_an_ipv6_move_brings_no_rewrite() {
        let (reg, config) = day_long_dual_stack();
        let mut old = LeaseAttrs::with_public_ip("198.18.1.1".parse().unwrap());
        old.public_ipv6 = Some("fd00:18::1".parse().unwrap());
        let mut new = old.clone();
        new.public_ipv6 = Some("fd00:18::9".parse().unwrap());
        let (first, addresses, state, cancel, task) = run_readdressable(&reg, config, &old).await;
        addresses.send(new.clone()).unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rewrites = || reg.renew_attempts.load(Ordering::SeqCst);
        assert_eq!(
            rewrites(),
            1,
            "the rewrite with the new address was not made"
        );
        // The old write, then the rewrite's echo.
        for attrs in [&old, &new] {
            *reg.shared.leases.lock().unwrap() = vec![reg.shared.written(first.key, attrs)];
            reg.shared.generation.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(1)).await;
            let own = state.borrow().own.clone().expect("a lease");
            assert_eq!((own.key, &own.attrs), (first.key, &new));
        }
        tokio::time::sleep(Duration::from_secs(120)).await;
        cancel.cancel();
        task.await.unwrap();
        assert_eq!(rewrites(), 1, "rewritten again");
    }

    /// A renewal that committed although it was answered with an error shows up in the watch
    /// as our own lease, renewed: the registry is up again then, not for the day until the
    /// next renewal (the renewal is not repeated either).
    #[tokio::test(start_paused = true)]
    async fn a_renewal_that_went_through_despite_its_error_clears_it() {
        let reg = Arc::new(Outage::default());
        // Renewal due at 10 s.
        let (state, cancel, task) = run_manager(&reg, |o| {
            o.renew_margin = Duration::from_secs(50);
            o.backoff_min = Duration::from_secs(1);
        })
        .await;
        reg.shared.lost_answers.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(10)).await;
        let attempts = || reg.renew_attempts.load(Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(5);
        while attempts() == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        reg.shared.lost_answers.store(false, Ordering::SeqCst);
        // The watch reports the renewal within its 100 ms poll; the retry would come at 1 s.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = state.borrow().registry.clone();
        let tried = attempts();
        cancel.cancel();
        task.await.unwrap();
        assert_eq!(tried, 1);
        assert!(after.connected, "{after:?}");
        assert!(
            after.failing_since.is_some(),
            "the error was never reported: {after:?}"
        );
    }

    /// A stop during a renewal that hangs (a slow etcd) ends the manager at once, not when
    /// the call returns.
    #[tokio::test(start_paused = true)]
    async fn a_stop_does_not_wait_for_a_renewal_under_way() {
        let reg = Arc::new(Outage {
            renew_delay: Duration::from_secs(3600),
            ..Outage::default()
        });
        // Renewal due at 10 s.
        let (_state, cancel, task) = run_manager(&reg, |o| {
            o.renew_margin = Duration::from_secs(50);
        })
        .await;
        tokio::time::timeout(Duration::from_secs(30), reg.renewal_begins.notified())
            .await
            .expect("no renewal began");
        let stopped_at = Instant::now();
        cancel.cancel();
        task.await.unwrap();
        assert!(
            stopped_at.elapsed() < Duration::from_secs(60),
            "the stop waited {:?} for the renewal",
            stopped_at.elapsed()
        );
        assert_eq!(reg.renew_attempts.load(Ordering::SeqCst), 0);
    }

    /// A renewal refused for good (the registry's permissions revoked) reports the registry
    /// down, with the reason, while the watch still answers: the lease is at risk.
    #[tokio::test(start_paused = true)]
    async fn a_refused_renewal_reports_the_registry_down() {
        let reg = Arc::new(Outage::default());
        let (state, cancel, task) = run_manager(&reg, |o| {
            o.renew_margin = Duration::from_secs(50);
            o.backoff_min = Duration::from_secs(1);
            o.backoff_max = Duration::from_secs(8);
        })
        .await;
        reg.shared.refused_writes.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(12)).await;
        reg.shared.generation.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let during = state.borrow().registry.clone();
        cancel.cancel();
        task.await.unwrap();
        assert!(!during.connected, "{during:?}");
        assert!(
            during
                .last_error
                .as_ref()
                .is_some_and(|e| e.contains("permission denied")),
            "{during:?}"
        );
    }

    /// A watch whose stream breaks right after each re-list backs off like one that cannot
    /// connect (1, 2, 4, 8, 8 s) instead of re-listing every second: a snapshot alone does
    /// not show the stream works.
    #[tokio::test(start_paused = true)]
    async fn a_stream_that_breaks_after_each_list_backs_off() {
        let reg = Arc::new(Outage {
            shared: Arc::new(OutageShared {
                breaking_stream: true,
                ..OutageShared::default()
            }),
            ..Outage::default()
        });
        let (_state, cancel, task) = run_manager(&reg, |o| {
            o.backoff_min = Duration::from_secs(1);
            o.backoff_max = Duration::from_secs(8);
        })
        .await;
        tokio::time::sleep(Duration::from_secs(30)).await;
        cancel.cancel();
        task.await.unwrap();
        // Snapshots at about 0, 1, 3, 7, 15 and 23 s; every second would be about 15.
        let lists = reg.shared.snapshots.load(Ordering::SeqCst);
        assert!((5..=7).contains(&lists), "{lists} snapshots in 30 s");
    }

    /// A peer's renewal changes only its expiry: the state shows the new one (for `linen
    /// status`), without a new generation (the table need not be rebuilt).
    #[tokio::test(start_paused = true)]
    async fn a_renewed_peer_shows_its_new_expiry_without_a_rebuild() {
        let reg = Arc::new(Outage::default());
        let peer = peer_lease("198.19.5.0-24", "198.18.1.5");
        reg.shared.leases.lock().unwrap().push(peer.clone());
        let (state, cancel, task) = run_manager(&reg, |_| {}).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let generation = state.borrow().generation;
        let renewed = Lease {
            expiration: peer.expiration.map(|t| t + Duration::from_secs(3600)),
            ..peer.clone()
        };
        for l in reg.shared.leases.lock().unwrap().iter_mut() {
            if l.key == peer.key {
                *l = renewed.clone();
            }
        }
        reg.shared.generation.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (peers, after) = {
            let s = state.borrow();
            (s.peers.clone(), s.generation)
        };
        cancel.cancel();
        task.await.unwrap();
        assert_eq!(peers, [renewed]);
        assert_eq!(after, generation, "an expiry alone rebuilt the table");
    }

    /// Stopping must not wait on a watcher that is blocked handing over an event nobody will
    /// read any more.
    #[tokio::test]
    async fn stops_while_the_watch_keeps_the_channel_full() {
        // A watch that never pauses, so the watcher fills the manager's channel while a
        // renewal takes 50 ms.
        let reg = Arc::new(Outage {
            shared: Arc::new(OutageShared {
                firehose: true,
                ..OutageShared::default()
            }),
            renew_delay: Duration::from_millis(50),
            ..Outage::default()
        });
        let config = NetworkConfig::from_json(r#"{"Network":"198.19.0.0/16"}"#).unwrap();
        let attrs = LeaseAttrs::with_public_ip("198.18.1.1".parse().unwrap());
        for _ in 0..10 {
            let mut opts = ManagerOptions::new(attrs.clone());
            // The 60 s lease is renewed after 10 ms, and the stop comes during that renewal,
            // while the watcher fills the channel.
            opts.renew_margin = Duration::from_millis(59_990);
            let mut m = LeaseManager::new(reg.clone(), config.clone(), opts);
            m.acquire().await.unwrap();
            let cancel = CancellationToken::new();
            let task = tokio::spawn(m.run(cancel.clone()));
            tokio::time::timeout(Duration::from_secs(30), reg.renewal_begins.notified())
                .await
                .expect("no renewal began");
            cancel.cancel();
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("the manager did not stop")
                .unwrap();
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
        let got: Vec<u64> = (0..5).map(|_| b.next().as_secs()).collect();
        assert_eq!(got, vec![1, 2, 4, 5, 5]);
        b.reset();
        assert_eq!(b.next(), Duration::from_secs(1));
    }
}
