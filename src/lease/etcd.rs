//! The etcd v3 registry: flannel's keys and values (`flannel-compat.md` §b) through
//! `etcd-client`. May depend on [`crate::model`] and the [`Registry`] trait; must not import
//! the lease manager or anything outside `lease`.
//!
//! Layout, as flanneld v0.18+ writes it:
//! - `<prefix>/config` — the network config JSON, no lease.
//! - `<prefix>/subnets/<a.b.c.d-len>` — [`LeaseAttrs::to_json`], attached to an etcd lease
//!   with the registry's TTL; a key without an etcd lease is a reservation and never expires.
//!
//! Where linen differs from flanneld, on purpose:
//! - A renewal keeps the key's etcd lease (one keep-alive, then a put with the same lease)
//!   instead of granting a new lease per renewal and leaving the old one to expire. The put is
//!   a compare-and-swap on the key's mod revision, so a key deleted or taken over meanwhile is
//!   reported as [`RegistryError::NotFound`] instead of being recreated (flannel #1289).
//! - A reservation stays a reservation when renewed (flannel #1329).
//! - Expiries come from a cache of lease TTLs plus concurrent `LeaseTimeToLive` lookups, one
//!   per distinct lease ID, instead of one sequential lookup per key.
//! - The watch is one long-lived stream; after compaction or any interruption it re-lists and
//!   sends a [`WatchEvent::Snapshot`](crate::lease::WatchEvent::Snapshot) (flannel #1145,
//!   #1714, #2470).

mod connect;
mod expiry;
mod watch;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, GetOptions, KeyValue, LeaseTimeToLiveOptions,
    PutOptions, Txn, TxnOp,
};

pub use connect::{DEFAULT_ENDPOINTS, EtcdOptions, EtcdSetupError, redacted};
pub use watch::EtcdWatch;

use super::{LeaseList, LeaseWatch, Registry, RegistryError, Revision};
use crate::model::{Lease, LeaseAttrs, NetworkConfig, NetworkConfigSpec, SubnetKey};
use connect::{registry_error, unavailable};
use expiry::ExpiryCache;

/// How often a renewal re-reads the key when it changed between the read and the write.
const RENEW_ATTEMPTS: usize = 3;

/// The largest list or watch response accepted (etcd's own default request limit is 1.5 MiB
/// per value; a list of 100k leases is about 10 MiB).
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// A [`Registry`] stored in etcd v3, interoperable with flanneld v0.18+.
#[derive(Clone)]
pub struct EtcdRegistry {
    shared: Arc<Shared>,
}

/// What a registry and its watches share.
pub(crate) struct Shared {
    client: Client,
    /// Endpoints, comma-separated, for logs and errors.
    location: String,
    config_key: String,
    /// `<prefix>/subnets/`, with the trailing slash.
    subnets_prefix: String,
    lease_ttl: Duration,
    /// The TTL etcd gave the last lease granted, in seconds (0: none granted yet). etcd raises
    /// a shorter one to its minimum (1.5 election timeouts: 2 s by default), and a lease whose
    /// TTL is not what a grant gives is moved to a new one at its renewal.
    granted_ttl: std::sync::atomic::AtomicI64,
    request_timeout: Duration,
    /// The user name and password given, when etcd had authentication disabled at connect
    /// and the client went without them: used as soon as etcd asks for them.
    fallback_creds: Option<(String, String)>,
    /// Held while a new token is asked for: failures at once ask once.
    authenticating: tokio::sync::Mutex<()>,
    expiry: ExpiryCache,
    /// The etcd lease of a move whose put failed, with the key it was for: the put may still
    /// commit (an answer lost, a request still queued), so the lease is kept (not revoked) and
    /// the next move of that key uses it again instead of granting one more. Without this,
    /// every retry of a failing move would leave another lease alive for a whole TTL.
    pending_move: std::sync::Mutex<Option<(String, i64)>>,
}

/// A subnet key as read from etcd, before its expiry is known.
struct Entry {
    key: SubnetKey,
    attrs: LeaseAttrs,
    /// The etcd lease ID; 0 for a reservation.
    lease: i64,
    /// The key's mod_revision.
    written: i64,
}

impl EtcdRegistry {
    /// Checks `options`, reads the TLS files and builds the client. No request is made unless
    /// a username is given (then it authenticates), so a registry can be built while etcd is
    /// still down; the first failing call says what is wrong.
    pub async fn connect(options: &EtcdOptions) -> Result<EtcdRegistry, EtcdSetupError> {
        let conn = connect::prepare(options)?;
        let location = conn.endpoints.join(",");
        let prefix = options.prefix.trim_end_matches('/');
        let mut fallback_creds = None;
        let client = match Self::build_client(conn, options).await {
            // Credentials for an etcd without authentication: used without them, as flanneld's
            // client does (clientv3 takes "authentication is not enabled" as no token needed).
            // They are kept, and used once etcd asks for them (`etcdctl auth enable` later).
            Ok(Err(e)) if connect::auth_not_enabled(&e) => {
                tracing::warn!(endpoints = %location, "etcd has authentication disabled; \
                    connecting without --etcd-username and its password until it asks for them");
                fallback_creds = connect::credentials(options)?;
                let anonymous = EtcdOptions {
                    username: None,
                    password: None,
                    password_file: None,
                    ..options.clone()
                };
                let mut conn = connect::prepare(&anonymous)?;
                conn.options = conn.options.with_auto_token_refresh(true);
                Self::build_client(conn, options).await
            }
            other => other,
        };
        let client = match client {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => return Err(registry_error(&location, "connect", &e).into()),
            Err(_) => {
                return Err(unavailable(
                    &location,
                    "connect",
                    "no answer to authentication; is etcd running and reachable?",
                )
                .into());
            }
        };
        tracing::debug!(endpoints = %location, prefix, "using the etcd v3 registry");
        Ok(EtcdRegistry {
            shared: Arc::new(Shared {
                client,
                location,
                config_key: format!("{prefix}/config"),
                subnets_prefix: format!("{prefix}/subnets/"),
                lease_ttl: Duration::from_secs(options.lease_ttl.as_secs()),
                granted_ttl: std::sync::atomic::AtomicI64::new(0),
                fallback_creds,
                authenticating: tokio::sync::Mutex::new(()),
                request_timeout: options.request_timeout,
                expiry: ExpiryCache::default(),
                pending_move: std::sync::Mutex::new(None),
            }),
        })
    }

    /// Builds the client (authenticating when a user is given), within the connect and
    /// request timeouts together.
    async fn build_client(
        conn: connect::Connection,
        options: &EtcdOptions,
    ) -> Result<Result<Client, etcd_client::Error>, tokio::time::error::Elapsed> {
        let connecting = Client::connect(&conn.endpoints, Some(conn.options));
        tokio::time::timeout(
            options.connect_timeout + options.request_timeout,
            connecting,
        )
        .await
    }

    /// The underlying client, for tools and tests (e.g. to inspect etcd leases).
    pub fn client(&self) -> Client {
        self.shared.client.clone()
    }

    /// The etcd key that holds `key`'s lease.
    pub fn subnet_path(&self, key: &SubnetKey) -> String {
        self.shared.subnet_path(key)
    }

    /// The etcd key that holds the network config.
    pub fn config_path(&self) -> &str {
        &self.shared.config_key
    }
}

impl Shared {
    /// Runs one etcd call with the request timeout, naming `what` in errors.
    async fn request<T>(
        &self,
        what: &str,
        call: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, RegistryError> {
        match tokio::time::timeout(self.request_timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if connect::token_outdated(&e) {
                    self.renew_token().await;
                } else if connect::auth_required(&e)
                    && let Some(creds) = &self.fallback_creds
                    && self.authenticate(creds).await
                {
                    return Err(unavailable(
                        &self.location,
                        what,
                        "etcd enabled authentication since linen connected; authenticated with \
                         --etcd-username for the next request",
                    ));
                }
                Err(registry_error(&self.location, what, &e))
            }
            Err(_) => Err(self.timed_out(what)),
        }
    }

    /// Authenticates with `creds` (given, and not used while etcd had authentication
    /// disabled); whether that worked. One at a time: the others find it done.
    #[cold]
    async fn authenticate(&self, (user, password): &(String, String)) -> bool {
        let Ok(_alone) = self.authenticating.try_lock() else {
            return true;
        };
        let mut client = self.client.clone();
        let login = client.update_user(Some((user.clone(), password.clone())));
        match tokio::time::timeout(self.request_timeout, login).await {
            Ok(Ok(())) => {
                tracing::info!(endpoints = %self.location, user = %user,
                    "etcd has authentication enabled now; authenticated");
                true
            }
            Ok(Err(e)) => {
                tracing::warn!(endpoints = %self.location, error = %e,
                    "etcd has authentication enabled now, and refuses --etcd-username's login");
                false
            }
            Err(_) => false,
        }
    }

    /// Authenticates again for a new token (the request that found the old one fails, as
    /// transient, and its retry passes). A failure is logged: the next request says more.
    /// One at a time: requests failing together ask once.
    #[cold]
    async fn renew_token(&self) {
        let Ok(_alone) = self.authenticating.try_lock() else {
            return;
        };
        let renewing = self.client.refresh_token();
        match tokio::time::timeout(self.request_timeout, renewing).await {
            Ok(Ok(())) => tracing::info!(endpoints = %self.location,
                "etcd's users or roles changed; renewed the authentication token"),
            Ok(Err(e)) => tracing::warn!(endpoints = %self.location, error = %e,
                "cannot renew the etcd authentication token"),
            Err(_) => tracing::warn!(endpoints = %self.location,
                "cannot renew the etcd authentication token: no answer"),
        }
    }

    fn timed_out(&self, what: &str) -> RegistryError {
        unavailable(
            &self.location,
            what,
            &format!(
                "no answer within {:?}; is etcd running, reachable and does it have a leader?",
                self.request_timeout
            ),
        )
    }

    fn ttl_secs(&self) -> i64 {
        i64::try_from(self.lease_ttl.as_secs()).unwrap_or(i64::MAX)
    }

    /// The TTL a lease granted now would have: what etcd gave the last one granted, or the TTL
    /// asked for while none has been. A lease with another TTL (flanneld's 24 h under a
    /// shorter --lease-ttl) is moved to a new lease at renewal.
    fn grant_ttl(&self) -> i64 {
        match self.granted_ttl.load(std::sync::atomic::Ordering::Relaxed) {
            0 => self.ttl_secs(),
            granted => granted,
        }
    }

    fn subnet_path(&self, key: &SubnetKey) -> String {
        format!("{}{key}", self.subnets_prefix)
    }

    /// The subnet key named by an etcd key under `subnets/`; `None` (with a warning) when it
    /// is not one.
    fn parse_key(&self, raw: &[u8]) -> Option<SubnetKey> {
        let path = String::from_utf8_lossy(raw);
        let name = path.strip_prefix(&self.subnets_prefix).unwrap_or(&path);
        // A key nested deeper (`subnets/x/198.19.2.0-24`) is nobody's lease: read by its last
        // part it would stand in for the real key, or make a host give its subnet up.
        let parsed = if name.contains('/') {
            Err(crate::model::SubnetKeyError::Malformed(name.to_owned()))
        } else {
            SubnetKey::parse(name)
        };
        match parsed {
            Ok(key) if key.to_string() == name => Some(key),
            // A hand-made twin (`198.19.5.0-024`) would alias the real key: its put or delete
            // would change that host's route.
            Ok(key) => {
                tracing::warn!(key = %path, canonical = %key, "skipping a subnet key whose name is not canonical (neither linen nor flannel wrote it; `etcdctl del KEY` removes it)");
                None
            }
            Err(error) => {
                tracing::warn!(key = %path, %error, "skipping a malformed key under subnets/ (neither linen nor flannel wrote it; `etcdctl del KEY` removes it)");
                None
            }
        }
    }

    /// A subnet key and its value; `None` (with a warning) when either is malformed.
    fn parse_kv(&self, kv: &KeyValue) -> Option<Entry> {
        let key = self.parse_key(kv.key())?;
        let text = String::from_utf8_lossy(kv.value());
        match LeaseAttrs::from_json(&text) {
            Ok(attrs) => Some(Entry {
                key,
                attrs,
                lease: kv.lease(),
                written: kv.mod_revision(),
            }),
            Err(error) => {
                // At most 200 characters of the value: one written to fill the log would
                // otherwise be repeated whole at every list and watch event.
                let shown: String = text.chars().take(200).collect();
                let cut = if shown.len() < text.len() { "…" } else { "" };
                tracing::warn!(
                    key = %String::from_utf8_lossy(kv.key()),
                    value = %format_args!("{shown}{cut}"),
                    %error,
                    "skipping a subnet key with a malformed value"
                );
                None
            }
        }
    }

    /// Completes entries with their expiry. An entry whose etcd lease no longer exists has
    /// run out or been revoked, so its key is deleted at a later revision: a list leaves it
    /// out (`None`); a watch replaying history (`keep_gone`) reports it as expiring now, and
    /// the delete follows.
    async fn to_leases(
        &self,
        entries: Vec<Entry>,
        keep_gone: bool,
    ) -> Result<Vec<Option<Lease>>, RegistryError> {
        let wanted = entries
            .iter()
            .filter(|e| e.lease != 0)
            .map(|e| (e.lease, e.written));
        let expiries = expiry::expiries(self, wanted).await?;
        let now = SystemTime::now();
        Ok(entries
            .into_iter()
            .map(|e| {
                let (expiration, lease_id) = if e.lease == 0 {
                    (None, None)
                } else {
                    let known = expiries.get(&e.lease).copied().flatten();
                    let expires = known.or_else(|| keep_gone.then_some(now))?;
                    (Some(expires), Some(e.lease))
                };
                Some(Lease {
                    key: e.key,
                    attrs: e.attrs,
                    expiration,
                    lease_id,
                })
            })
            .collect())
    }

    /// Everything under `subnets/` (as `options` say), up to [`MAX_MESSAGE_BYTES`].
    async fn read_subnets(
        &self,
        what: &str,
        options: GetOptions,
    ) -> Result<etcd_client::GetResponse, RegistryError> {
        let mut kv = self
            .client
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        self.request(
            what,
            kv.get(self.subnets_prefix.as_bytes(), Some(options.with_prefix())),
        )
        .await
    }

    /// One prefix read of `subnets/`, then the expiries.
    async fn list(&self) -> Result<LeaseList, RegistryError> {
        let resp = self
            .read_subnets("list subnet leases", GetOptions::new())
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let entries: Vec<Entry> = resp
            .kvs()
            .iter()
            .filter_map(|kv| self.parse_kv(kv))
            .collect();
        let mut leases: Vec<Lease> = self
            .to_leases(entries, false)
            .await?
            .into_iter()
            .flatten()
            .collect();
        leases.sort_by_key(|l| l.key);
        Ok(LeaseList { leases, revision })
    }

    /// The other keys holding one of `key`'s subnets, created before revision `before` if
    /// given. A create is a transaction on its own key only, so two hosts picking the same IPv4
    /// subnet at once, each with an IPv6 subnet of its own, both succeed (flannel has this
    /// race); the creation revision orders the two keys the same way for every host.
    async fn overlapping(
        &self,
        key: &SubnetKey,
        before: Option<Revision>,
    ) -> Result<Vec<Overlapping>, RegistryError> {
        // With values: a key whose value is malformed is skipped, as by list and watch, so
        // that no host routes it and none gives way to it (as in a directory registry).
        let mut options = GetOptions::new();
        if let Some(before) = before {
            // 0 would mean no limit; no key is created at revision 1 or before anyway.
            options = options.with_max_create_revision(before.saturating_sub(1).max(1));
        }
        let path = self.subnet_path(key);
        let resp = self
            .read_subnets("check the key against the others", options)
            .await?;
        Ok(resp
            .kvs()
            .iter()
            // By path: a hand-made non-canonical name for the same subnets is another key.
            .filter(|kv| kv.key() != path.as_bytes())
            .filter(|kv| before.is_none_or(|b| kv.create_revision() < b))
            .filter_map(|kv| {
                let other = self.parse_key(kv.key())?;
                // The value only of an overlapping key: each malformed one is logged, and
                // list and watch already log the others.
                (other.overlaps(key) && self.parse_kv(kv).is_some()).then_some(Overlapping {
                    key: other,
                    lease: kv.lease(),
                    created: kv.create_revision(),
                })
            })
            .collect())
    }

    /// Checks a key just created at `revision` (with etcd lease `lease`, 0 for a reservation)
    /// against the overlapping keys created before it (all of them when
    /// [`put_if`](Shared::put_if) reported no revision, 0): `None` when it may stay; otherwise
    /// why not, after withdrawing it. It is withdrawn also when the check fails, as an
    /// unchecked key would stay unchecked: a reservation for good, a lease while it is renewed.
    /// When the withdraw fails too, the error names the key to release.
    async fn check_new_key(
        &self,
        key: &SubnetKey,
        path: &str,
        revision: Revision,
        lease: i64,
    ) -> Option<RegistryError> {
        let before = (revision > 0).then_some(revision);
        let refusal = match self.overlapping(key, before).await {
            Ok(found) => match found.first() {
                None => return None,
                Some(o) => RegistryError::Overlaps {
                    key: *key,
                    other: o.key,
                },
            },
            Err(e) => e,
        };
        match self.withdraw(path, revision, lease).await {
            Ok(()) => Some(refusal),
            Err(e) => Some(unavailable(
                &self.location,
                "withdraw a subnet key that may overlap another",
                &format!(
                    "{refusal}; then withdrawing {key} failed ({e}): check `linen lease list` \
                     and `linen lease release {key}` if it is still there"
                ),
            )),
        }
    }

    /// Withdraws a key that gave way right after its create at `revision` (its etcd lease
    /// `lease`, 0 for a reservation): deleted if still as written, then the lease revoked.
    /// An error means it may still be there.
    async fn withdraw(
        &self,
        path: &str,
        revision: Revision,
        lease: i64,
    ) -> Result<(), RegistryError> {
        let deleted = self
            .delete_if_unchanged("withdraw the subnet key", path, revision)
            .await;
        if lease != 0 {
            // Deletes the key too if the delete above failed.
            self.revoke_unused(lease).await;
        }
        deleted.map(|_| ())
    }

    /// Deletes `path` if it is still as written at `mod_revision`: whether it was.
    async fn delete_if_unchanged(
        &self,
        what: &str,
        path: &str,
        mod_revision: Revision,
    ) -> Result<bool, RegistryError> {
        let unchanged = Compare::mod_revision(path, CompareOp::Equal, mod_revision);
        let txn = Txn::new()
            .when([unchanged])
            .and_then([TxnOp::delete(path, None)]);
        let mut client = self.client.clone();
        Ok(self.request(what, client.txn(txn)).await?.succeeded())
    }

    /// Deletes `key` only while it is still `kv` as read (a host that took it since wrote a new
    /// revision), and then its etcd lease, unless other keys still hold it: whether it did.
    async fn delete_as_read(&self, key: &SubnetKey, kv: &KeyValue) -> Result<bool, RegistryError> {
        let path = self.subnet_path(key);
        let deleted = self
            .delete_if_unchanged("delete the subnet key", &path, kv.mod_revision())
            .await?;
        if deleted {
            tracing::info!(subnet = %key, "deleted the subnet key");
            if kv.lease() != 0 {
                self.release(kv.lease()).await;
            }
        }
        Ok(deleted)
    }

    /// Grants an etcd lease with the registry's TTL: (ID, expiry).
    async fn grant(&self) -> Result<(i64, SystemTime), RegistryError> {
        let mut client = self.client.clone();
        let grant = self
            .request(
                "grant an etcd lease",
                client.lease_grant(self.ttl_secs(), None),
            )
            .await?;
        self.granted_ttl
            .store(grant.ttl(), std::sync::atomic::Ordering::Relaxed);
        let granted = Duration::from_secs(grant.ttl().unsigned_abs());
        Ok((grant.id(), SystemTime::now() + granted))
    }

    /// Revokes a lease that ended up unused. Failure only costs etcd memory until the TTL
    /// runs out, so it is logged, not returned.
    async fn revoke_unused(&self, lease: i64) {
        let mut client = self.client.clone();
        self.expiry.forget(lease);
        if let Err(error) = self
            .request("revoke an unused etcd lease", client.lease_revoke(lease))
            .await
        {
            tracing::debug!(lease = format_args!("{lease:x}"), %error, "could not revoke an unused etcd lease; it will expire");
        }
    }

    /// Runs a transaction that puts `path` = `value` (with `lease`, or none when 0) if
    /// `condition` holds: the revision it committed at, or `None` when the condition failed.
    async fn put_if(
        &self,
        what: &str,
        condition: Compare,
        path: &str,
        value: String,
        lease: i64,
    ) -> Result<Option<Revision>, RegistryError> {
        let options = (lease != 0).then(|| PutOptions::new().with_lease(lease));
        let txn = Txn::new()
            .when([condition])
            .and_then([TxnOp::put(path, value, options)]);
        let mut client = self.client.clone();
        let resp = self.request(what, client.txn(txn)).await?;
        Ok(resp
            .succeeded()
            .then(|| resp.header().map_or(0, |h| h.revision())))
    }

    /// Resets `lease` to its granted TTL with one keep-alive: the TTL in seconds, or `None`
    /// when etcd no longer has the lease (it answers TTL 0, or not found). A stream that ends
    /// without an answer, or a keep-alive that cannot be sent, says nothing about the lease:
    /// that is an error to retry, not a lease to replace.
    async fn keep_alive_once(&self, lease: i64) -> Result<Option<i64>, RegistryError> {
        const WHAT: &str = "renew the etcd lease";
        let mut client = self.client.lease_client();
        let call = async {
            let (mut keeper, mut replies) = client.keep_alive(lease).await?;
            // `keep_alive` has consumed the first reply; a second one tells the TTL.
            keeper.keep_alive().await?;
            Ok::<_, etcd_client::Error>(replies.message().await?.map(|r| r.ttl()))
        };
        match tokio::time::timeout(self.request_timeout, call).await {
            Ok(Ok(Some(ttl))) if ttl > 0 => Ok(Some(ttl)),
            Ok(Ok(Some(_))) => Ok(None),
            // etcd-client's word for a first answer with TTL 0; its other keep-alive errors are
            // a request that could not be sent.
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(m))) if m.contains("not found") => {
                Ok(None)
            }
            Ok(Ok(None)) => Err(RegistryError::Unavailable {
                location: self.location.clone(),
                reason: format!("cannot {WHAT}: the keep-alive stream ended without an answer"),
            }),
            Ok(Err(etcd_client::Error::GRpcStatus(s))) if s.code() == tonic::Code::NotFound => {
                Ok(None)
            }
            Ok(Err(e)) => Err(registry_error(&self.location, WHAT, &e)),
            Err(_) => Err(self.timed_out(WHAT)),
        }
    }

    /// A config to write must validate, as a read one must.
    fn check_config(&self, spec: &NetworkConfigSpec) -> Result<(), RegistryError> {
        spec.clone()
            .validate()
            .map(drop)
            .map_err(|source| RegistryError::BadConfig {
                location: self.config_key.clone(),
                source,
            })
    }

    /// Reads `lease`'s key to `what` it (renew, reserve): [`RegistryError::NotFound`] when it
    /// is gone or holds another host's lease now.
    async fn read_ours(&self, lease: &Lease, what: &str) -> Result<KeyValue, RegistryError> {
        let path = self.subnet_path(&lease.key);
        let mut client = self.client.clone();
        let resp = self
            .request(
                &format!("read the subnet key to {what}"),
                client.get(path.as_str(), None),
            )
            .await?;
        let Some(kv) = resp.kvs().first() else {
            return Err(RegistryError::NotFound(lease.key));
        };
        if !still_ours(lease, kv) {
            tracing::warn!(
                subnet = %lease.key,
                value = %String::from_utf8_lossy(kv.value()),
                "the subnet key now holds another lease; not going to {what} it"
            );
            return Err(RegistryError::NotFound(lease.key));
        }
        Ok(kv.clone())
    }

    /// One renewal attempt against the key as read (`kv`): the renewed lease, or `None` when
    /// the key changed before the write and must be read again.
    async fn renew_once(
        &self,
        lease: &Lease,
        attrs: &LeaseAttrs,
        kv: &KeyValue,
    ) -> Result<Option<Lease>, RegistryError> {
        let path = self.subnet_path(&lease.key);
        let unchanged =
            || Compare::mod_revision(path.as_str(), CompareOp::Equal, kv.mod_revision());
        let renewed = |expiration, lease_id| Lease {
            key: lease.key,
            attrs: attrs.clone(),
            expiration,
            lease_id,
        };
        let current = kv.lease();
        if current == 0 {
            // A reservation: rewrite the value, attach nothing.
            let done = self
                .put_if(
                    "rewrite the reservation",
                    unchanged(),
                    &path,
                    attrs.to_json(),
                    0,
                )
                .await?;
            if done.is_some() {
                self.settle_pending_move(&path, 0).await;
            }
            return Ok(done.map(|_| renewed(None, None)));
        }
        let alive = self.keep_alive_once(current).await?;
        if alive == Some(self.grant_ttl()) {
            // The put (even with an unchanged value) tells watchers the lease was renewed.
            let done = self
                .put_if(
                    "rewrite the lease",
                    unchanged(),
                    &path,
                    attrs.to_json(),
                    current,
                )
                .await?;
            if done.is_some() {
                self.settle_pending_move(&path, current).await;
            }
            return Ok(done.map(|revision| {
                let expires = SystemTime::now() + self.lease_ttl;
                self.expiry.record(current, expires, revision);
                renewed(Some(expires), Some(current))
            }));
        }
        // The etcd lease is gone (the key is about to be deleted: the write below then fails)
        // or was granted with another TTL: move the key to a new lease, the one an unclear
        // earlier move left if it is still alive with our TTL.
        let (new, expires) = match self.reuse_pending_move(&path).await? {
            Some(reused) => reused,
            None => self.grant().await?,
        };
        match self
            .put_if(
                "move the key to a new lease",
                unchanged(),
                &path,
                attrs.to_json(),
                new,
            )
            .await
        {
            Ok(Some(revision)) => {
                self.expiry.record(new, expires, revision);
                self.settle_pending_move(&path, new).await;
                if alive.is_some() {
                    self.release(current).await;
                }
                tracing::info!(
                    subnet = %lease.key,
                    old = format_args!("{current:x}"),
                    new = format_args!("{new:x}"),
                    "moved the subnet key to a new etcd lease"
                );
                Ok(Some(renewed(Some(expires), Some(new))))
            }
            Ok(None) => {
                // Not applied; but a reused lease may carry the key after all (the earlier
                // put committed meanwhile, which is why the key changed): only revoked when
                // no key is on it.
                self.release(new).await;
                Ok(None)
            }
            Err(e) => {
                // The move may have gone through with its answer lost, or may still be queued
                // and commit later (even a "refused" can be a connection dropped mid-request):
                // the key is then on `new`, and revoking `new` would delete it. So `new` is
                // kept for the next attempt, which reuses it instead of granting another (at
                // most one such lease per key), and released once a later write settles where
                // the key is.
                tracing::debug!(lease = format_args!("{new:x}"), error = %e, "keeping the new etcd lease for the next attempt");
                self.keep_pending_move(path, new);
                Err(e)
            }
        }
    }

    /// The lease an unclear move of `path` left, with its new expiry, when it is still alive
    /// with our TTL (one keep-alive); otherwise forgotten (gone, or released when its TTL
    /// differs), and `None`.
    async fn reuse_pending_move(
        &self,
        path: &str,
    ) -> Result<Option<(i64, SystemTime)>, RegistryError> {
        let pending = self.take_pending_move(path);
        let Some(lease) = pending else {
            return Ok(None);
        };
        match self.keep_alive_once(lease).await {
            Ok(Some(ttl)) if ttl == self.grant_ttl() => {
                Ok(Some((lease, SystemTime::now() + self.lease_ttl)))
            }
            Ok(Some(_)) => {
                self.release(lease).await;
                Ok(None)
            }
            Ok(None) => Ok(None),
            Err(e) => {
                // Still unclear: kept for the next attempt.
                self.keep_pending_move(path.to_owned(), lease);
                Err(e)
            }
        }
    }

    /// Keeps `lease` as the pending move lease of `path` (replacing any other key's: linen
    /// holds one lease).
    fn keep_pending_move(&self, path: String, lease: i64) {
        *self.pending_move.lock().unwrap_or_else(|p| p.into_inner()) = Some((path, lease));
    }

    /// The pending move lease for `path`, taken out (another key's stays).
    fn take_pending_move(&self, path: &str) -> Option<i64> {
        let mut pending = self.pending_move.lock().unwrap_or_else(|p| p.into_inner());
        match pending.as_ref() {
            Some((p, lease)) if p == path => {
                let lease = *lease;
                *pending = None;
                Some(lease)
            }
            _ => None,
        }
    }

    /// After a write to `path` that went through on etcd lease `used` (0 for a reservation):
    /// the key's lease is settled, so an unclear move's lease is released unless it is the
    /// one in use (only revoked when no key is on it).
    async fn settle_pending_move(&self, path: &str, used: i64) {
        if let Some(lease) = self.take_pending_move(path)
            && lease != used
        {
            self.release(lease).await;
        }
    }

    /// Revokes `lease` if no key is attached to it any more (in linen and flanneld each key
    /// has its own lease, but a hand-made key might share one: revoking would delete it).
    async fn release(&self, lease: i64) {
        let mut client = self.client.clone();
        let reply = self
            .request(
                "look up an etcd lease's keys",
                client.lease_time_to_live(lease, Some(LeaseTimeToLiveOptions::new().with_keys())),
            )
            .await;
        match reply {
            Ok(r) if r.ttl() > 0 && r.keys().is_empty() => self.revoke_unused(lease).await,
            Ok(_) => self.expiry.forget(lease),
            Err(error) => {
                tracing::debug!(lease = format_args!("{lease:x}"), %error, "could not check an etcd lease's keys; leaving it to expire");
            }
        }
    }
}

/// Another key holding one of a key's subnets, as a keys-only read tells.
struct Overlapping {
    key: SubnetKey,
    /// Its etcd lease; 0 for a reservation.
    lease: i64,
    /// The revision it was created at.
    created: Revision,
}

/// Whether the key as stored still belongs to the holder of `lease`: it carries the same etcd
/// lease, or the same value (a reservation made from it, or a flanneld renewal). Reservations
/// carry no etcd lease, so for one held as such only the value tells: another host's
/// reservation written meanwhile must not be taken over.
fn still_ours(lease: &Lease, kv: &KeyValue) -> bool {
    if lease.lease_id.is_some_and(|id| id == kv.lease()) {
        return true;
    }
    let text = String::from_utf8_lossy(kv.value());
    LeaseAttrs::from_json(&text).is_ok_and(|stored| stored == lease.attrs)
}

#[async_trait]
impl Registry for EtcdRegistry {
    fn location(&self) -> String {
        self.shared.location.clone()
    }

    async fn get_network_config(&self) -> Result<NetworkConfig, RegistryError> {
        let s = &self.shared;
        let mut client = s.client.clone();
        let resp = s
            .request(
                "read the network config",
                client.get(s.config_key.as_str(), None),
            )
            .await?;
        let Some(kv) = resp.kvs().first() else {
            return Err(RegistryError::ConfigNotFound {
                location: s.config_key.clone(),
                hint: format!(
                    " or `etcdctl put {} '{{\"Network\":\"198.19.0.0/16\",\"Backend\":{{\"Type\":\"udp\"}}}}'`; \
                     did you create your config using the etcd v3 API? A config written through \
                     the v2 API (ETCDCTL_API=2) is invisible to v3 clients",
                    s.config_key
                ),
            });
        };
        NetworkConfig::from_json(&String::from_utf8_lossy(kv.value())).map_err(|source| {
            RegistryError::BadConfig {
                location: s.config_key.clone(),
                source,
            }
        })
    }

    async fn put_network_config(&self, spec: &NetworkConfigSpec) -> Result<(), RegistryError> {
        let s = &self.shared;
        s.check_config(spec)?;
        let mut client = s.client.clone();
        s.request(
            "write the network config",
            client.put(s.config_key.as_str(), spec.to_json(), None),
        )
        .await?;
        tracing::info!(key = %s.config_key, "wrote the network config");
        Ok(())
    }

    async fn create_network_config(&self, spec: &NetworkConfigSpec) -> Result<bool, RegistryError> {
        let s = &self.shared;
        s.check_config(spec)?;
        let absent = Compare::version(s.config_key.as_str(), CompareOp::Equal, 0);
        let written = s
            .put_if(
                "create the network config",
                absent,
                &s.config_key,
                spec.to_json(),
                0,
            )
            .await?
            .is_some();
        if written {
            tracing::info!(key = %s.config_key, "wrote the network config");
        }
        Ok(written)
    }

    async fn list_leases(&self) -> Result<LeaseList, RegistryError> {
        self.shared.list().await
    }

    async fn create_lease(
        &self,
        key: &SubnetKey,
        attrs: &LeaseAttrs,
    ) -> Result<Lease, RegistryError> {
        let s = &self.shared;
        let path = s.subnet_path(key);
        let (id, expires) = s.grant().await?;
        let absent = Compare::version(path.as_str(), CompareOp::Equal, 0);
        match s
            .put_if("create the subnet key", absent, &path, attrs.to_json(), id)
            .await
        {
            Ok(Some(revision)) => {
                if let Some(refusal) = s.check_new_key(key, &path, revision, id).await {
                    return Err(refusal);
                }
                s.expiry.record(id, expires, revision);
                tracing::info!(subnet = %key, lease = format_args!("{id:x}"), ttl = ?s.lease_ttl, "created a subnet lease");
                Ok(Lease {
                    key: *key,
                    attrs: attrs.clone(),
                    expiration: Some(expires),
                    lease_id: Some(id),
                })
            }
            Ok(None) => {
                s.revoke_unused(id).await;
                Err(RegistryError::AlreadyExists(*key))
            }
            Err(e) => {
                // The outcome is unknown; revoking also deletes the key if it was written.
                s.revoke_unused(id).await;
                Err(e)
            }
        }
    }

    async fn create_reservation(
        &self,
        key: &SubnetKey,
        attrs: &LeaseAttrs,
    ) -> Result<Lease, RegistryError> {
        let s = &self.shared;
        let path = s.subnet_path(key);
        let absent = Compare::version(path.as_str(), CompareOp::Equal, 0);
        match s
            .put_if("create the reservation", absent, &path, attrs.to_json(), 0)
            .await?
        {
            Some(revision) => {
                if let Some(refusal) = s.check_new_key(key, &path, revision, 0).await {
                    return Err(refusal);
                }
                tracing::info!(subnet = %key, "created a subnet reservation");
                Ok(Lease {
                    key: *key,
                    attrs: attrs.clone(),
                    expiration: None,
                    lease_id: None,
                })
            }
            None => Err(RegistryError::AlreadyExists(*key)),
        }
    }

    async fn keep_as_reservation(&self, lease: &Lease) -> Result<Lease, RegistryError> {
        let s = &self.shared;
        let path = s.subnet_path(&lease.key);
        for _ in 0..RENEW_ATTEMPTS {
            let kv = s.read_ours(lease, "reserve").await?;
            let text = String::from_utf8_lossy(kv.value()).into_owned();
            let stored = LeaseAttrs::from_json(&text).unwrap_or_else(|_| lease.attrs.clone());
            // The same value without a lease, unless the key changed since it was read.
            let unchanged =
                Compare::mod_revision(path.as_str(), CompareOp::Equal, kv.mod_revision());
            if s.put_if("keep the lease as a reservation", unchanged, &path, text, 0)
                .await?
                .is_some()
            {
                tracing::info!(subnet = %lease.key, "the lease is now a reservation");
                // Its etcd lease holds no key any more.
                if kv.lease() != 0 {
                    s.release(kv.lease()).await;
                }
                return Ok(Lease {
                    key: lease.key,
                    attrs: stored,
                    expiration: None,
                    lease_id: None,
                });
            }
        }
        Err(RegistryError::Unavailable {
            location: s.location.clone(),
            reason: format!("{} kept changing while it was being reserved", lease.key),
        })
    }

    async fn renew_lease(&self, lease: &Lease, attrs: &LeaseAttrs) -> Result<Lease, RegistryError> {
        let s = &self.shared;
        let path = s.subnet_path(&lease.key);
        for _ in 0..RENEW_ATTEMPTS {
            let kv = s.read_ours(lease, "renew").await?;
            // Creates give way to earlier overlapping keys, but a key whose check never ran
            // (an etcd outage, a crash, an older linen, a flanneld) is caught here: a lease
            // gives way to an overlapping reservation or earlier lease, as in a directory
            // registry. A reservation is never given up. Only to a key holding one of its very
            // subnets: one of another length (`128.0.0.0-1`, by hand or by a compromised host)
            // would otherwise push every lease it covers out at each renewal.
            if kv.lease() != 0
                && let Some(other) = s
                    .overlapping(&lease.key, None)
                    .await?
                    .iter()
                    .filter(|o| o.key.shares_subnet(&lease.key))
                    .find(|o| o.lease == 0 || o.created < kv.create_revision())
                    .map(|o| o.key)
            {
                tracing::warn!(subnet = %lease.key, %other, "another key holds one of this lease's subnets and keeps it; giving this one up");
                if s.delete_if_unchanged("give the subnet key up", &path, kv.mod_revision())
                    .await?
                {
                    s.release(kv.lease()).await;
                    return Err(RegistryError::NotFound(lease.key));
                }
                continue;
            }
            if let Some(renewed) = s.renew_once(lease, attrs, &kv).await? {
                return Ok(renewed);
            }
        }
        Err(unavailable(
            &s.location,
            "renew the subnet lease",
            &format!("{path} changed under every one of {RENEW_ATTEMPTS} attempts; retry later"),
        ))
    }

    async fn revoke_lease(&self, key: &SubnetKey) -> Result<bool, RegistryError> {
        let s = &self.shared;
        let path = s.subnet_path(key);
        let mut client = s.client.clone();
        let resp = s
            .request(
                "delete the subnet key",
                client.delete(path.as_str(), Some(DeleteOptions::new().with_prev_key())),
            )
            .await?;
        for kv in resp.prev_kvs() {
            tracing::info!(subnet = %key, "deleted the subnet lease");
            if kv.lease() != 0 {
                s.release(kv.lease()).await;
            }
        }
        Ok(resp.deleted() > 0)
    }

    async fn release_lease(&self, lease: &Lease) -> Result<bool, RegistryError> {
        let s = &self.shared;
        let kv = match s.read_ours(lease, "release").await {
            Ok(kv) => kv,
            Err(RegistryError::NotFound(_)) => return Ok(false),
            Err(e) => return Err(e),
        };
        s.delete_as_read(&lease.key, &kv).await
    }

    async fn revoke_dead(&self, key: &SubnetKey) -> Result<bool, RegistryError> {
        let s = &self.shared;
        let path = s.subnet_path(key);
        let mut client = s.client.clone();
        let resp = s
            .request("read the subnet key", client.get(path.as_str(), None))
            .await?;
        let Some(kv) = resp.kvs().first() else {
            return Ok(false);
        };
        // Live: a readable value whose etcd lease still exists (or that has none: a
        // reservation). Dead: a value linen cannot read, or an etcd lease gone already.
        if let Some(entry) = s.parse_kv(kv)
            && s.to_leases(vec![entry], false)
                .await?
                .into_iter()
                .flatten()
                .next()
                .is_some()
        {
            return Ok(false);
        }
        s.delete_as_read(key, kv).await
    }

    async fn watch_leases(&self, after: Revision) -> Result<Box<dyn LeaseWatch>, RegistryError> {
        Ok(Box::new(
            EtcdWatch::start(Arc::clone(&self.shared), after).await?,
        ))
    }

    fn lease_ttl(&self) -> Duration {
        self.shared.lease_ttl
    }
}
