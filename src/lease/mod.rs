//! Registries, the subnet allocator and the lease manager: the control plane's view of the
//! cluster. May depend on [`crate::model`], tokio and registry clients; must not import
//! `dataplane`, `table` or `daemon`.
//!
//! A [`Registry`] is flannel's subnet `Manager` interface as a Rust trait: one implementation
//! per backend (the embedded directory store, etcd v3). It stores flannel's keys and values
//! (`<prefix>/config`, `<prefix>/subnets/<key>`), so both backends hold the same data.
//!
//! The contract every backend keeps:
//! - Malformed subnet keys or values are skipped with a `tracing::warn!` naming the key; they
//!   never fail a list or a watch.
//! - Expired leases are invisible: a list never returns one, and a watch reports its expiry as
//!   a removal.
//! - A watch never loses a change. When it cannot deliver exact changes (compaction, a broken
//!   stream, a reconnect, polling), it delivers a [`WatchEvent::Snapshot`] of the whole current
//!   set and consumers diff it against what they know.

pub mod allocator;
pub mod directory;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod manager;
pub mod tracker;

use std::time::Duration;

use async_trait::async_trait;

use crate::model::{ConfigError, Lease, LeaseAttrs, NetworkConfig, NetworkConfigSpec, SubnetKey};

/// A registry revision: etcd's store revision, or the directory store's write counter. Every
/// change to `subnets/` raises it.
pub type Revision = i64;

/// What can go wrong talking to a registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// There is no network config yet.
    #[error(
        "network config not found at {location}; create it with `linen network init --network CIDR`{hint}"
    )]
    ConfigNotFound {
        /// Where it was looked for (a key or a path).
        location: String,
        /// Backend-specific advice, starting with "; " or empty.
        hint: String,
    },
    /// The stored network config is invalid.
    #[error("network config at {location} is invalid: {source}")]
    BadConfig {
        /// Where it was read.
        location: String,
        /// What is wrong with it.
        #[source]
        source: ConfigError,
    },
    /// An atomic create lost: someone holds this subnet.
    #[error("subnet {0} is already leased")]
    AlreadyExists(SubnetKey),
    /// A create refused because another key already holds one of the subnets (a dual-stack
    /// key with the same IPv4 subnet and another IPv6 one, say).
    #[error(
        "subnet {key} overlaps {other}, which is already leased or reserved; release that \
         first with `linen lease release {other}`"
    )]
    Overlaps {
        /// The key that was to be created.
        key: SubnetKey,
        /// The key holding a subnet it shares.
        other: SubnetKey,
    },
    /// The lease to renew or revoke does not exist (deleted or expired).
    #[error("no lease for subnet {0}: it was deleted or has expired")]
    NotFound(SubnetKey),
    /// The registry cannot be reached right now; retrying later may work.
    #[error("registry {location} is unavailable: {reason}")]
    Unavailable {
        /// Endpoint or path.
        location: String,
        /// What failed.
        reason: String,
    },
    /// A request was refused for a reason retrying will not fix (auth, TLS, permissions).
    #[error("registry {location} refused the request: {reason}")]
    Refused {
        /// Endpoint or path.
        location: String,
        /// What failed and how to fix it.
        reason: String,
    },
}

impl RegistryError {
    /// Whether retrying the same call later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, RegistryError::Unavailable { .. })
    }
}

/// All live leases at one revision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseList {
    /// Live leases (expired ones and malformed entries left out), sorted by key.
    pub leases: Vec<Lease>,
    /// The revision the list was read at; watch from `revision + 1` to miss nothing.
    pub revision: Revision,
}

/// One change to a subnet key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseChange {
    /// The key was created or its value or TTL was rewritten (create, renew, update).
    Put(Lease),
    /// The key was deleted, or its lease expired.
    Delete(SubnetKey),
}

/// What a [`LeaseWatch`] delivers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    /// Exact changes, in order, up to and including `revision`.
    Changes {
        /// Revision of the last change in the batch.
        revision: Revision,
        /// The changes, oldest first.
        changes: Vec<LeaseChange>,
    },
    /// The complete set of live leases at `revision`, replacing everything known before:
    /// sent when exact changes are not available (compaction, reconnect, polling backends).
    Snapshot(LeaseList),
}

/// A long-lived watch of `<prefix>/subnets/`.
///
/// After `next` returns an error, the watch stays usable: the following successful `next`
/// reconnects and its first event is a [`WatchEvent::Snapshot`], so nothing is lost.
#[async_trait]
pub trait LeaseWatch: Send {
    /// Waits for the next event.
    async fn next(&mut self) -> Result<WatchEvent, RegistryError>;
}

/// flannel's subnet manager interface. Implementations are cheap to share (`Arc<dyn Registry>`).
#[async_trait]
pub trait Registry: Send + Sync + 'static {
    /// Where this registry lives, for logs and errors (an endpoint list or a directory).
    fn location(&self) -> String;

    /// Reads and validates `<prefix>/config`.
    async fn get_network_config(&self) -> Result<NetworkConfig, RegistryError>;

    /// Writes `<prefix>/config` (used by `linen network init`). The spec must validate.
    async fn put_network_config(&self, spec: &NetworkConfigSpec) -> Result<(), RegistryError>;

    /// Writes `<prefix>/config` only if there is none, atomically: false when one exists (two
    /// `linen network init` at once: one writes, the other sees the winner's). The spec must
    /// validate.
    async fn create_network_config(&self, spec: &NetworkConfigSpec) -> Result<bool, RegistryError>;

    /// Lists every live lease and the revision it was read at.
    async fn list_leases(&self) -> Result<LeaseList, RegistryError>;

    /// Atomically creates `subnets/<key>` with the registry's lease TTL (24 h unless the
    /// registry was built with another). Fails with [`RegistryError::AlreadyExists`] when the
    /// key exists and has not expired, and with [`RegistryError::Overlaps`] when another key
    /// holds one of its subnets (a dual-stack key with the same IPv4 subnet, say).
    async fn create_lease(
        &self,
        key: &SubnetKey,
        attrs: &LeaseAttrs,
    ) -> Result<Lease, RegistryError>;

    /// Atomically creates a reservation: `subnets/<key>` without a TTL. Fails as
    /// [`create_lease`](Registry::create_lease) does.
    async fn create_reservation(
        &self,
        key: &SubnetKey,
        attrs: &LeaseAttrs,
    ) -> Result<Lease, RegistryError>;

    /// Rewrites an existing lease with `attrs` and restarts its TTL; a reservation stays a
    /// reservation (no TTL is attached). Fails with [`RegistryError::NotFound`] when the key is
    /// gone, and also after deleting it when an overlapping key keeps its subnets (a lease gives
    /// way to a reservation and to an earlier lease; a reservation never gives way). Backends
    /// must not leak a TTL holder per renewal (etcd: reuse the etcd lease).
    async fn renew_lease(&self, lease: &Lease, attrs: &LeaseAttrs) -> Result<Lease, RegistryError>;

    /// Turns the live lease `lease` into a reservation in place: `subnets/<key>` keeps its
    /// value and loses its TTL, but only while it still holds `lease`'s public addresses
    /// (flannel's documented way to reserve the subnet a host holds; the host keeps it and
    /// stops renewing). [`RegistryError::NotFound`] when the key is gone or another host's.
    async fn keep_as_reservation(&self, lease: &Lease) -> Result<Lease, RegistryError>;

    /// Deletes `subnets/<key>`: whether it was there. Deleting a missing key is not an error.
    async fn revoke_lease(&self, key: &SubnetKey) -> Result<bool, RegistryError>;

    /// Deletes `lease`'s key only while it still holds `lease` (its etcd lease, or its public
    /// addresses): whether it did. For a host giving up a lease of its own that it listed
    /// earlier: meanwhile the lease may have expired and another host taken the key.
    async fn release_lease(&self, lease: &Lease) -> Result<bool, RegistryError>;

    /// Deletes `subnets/<key>` only while it holds no live lease or reservation (an expired
    /// entry, or a value linen cannot read): whether it did. For a key that a list did not
    /// show: meanwhile a host may have taken it, and its fresh lease stays.
    async fn revoke_dead(&self, key: &SubnetKey) -> Result<bool, RegistryError>;

    /// Watches `subnets/` for changes after `after` (exclusive), normally a
    /// [`LeaseList::revision`].
    async fn watch_leases(&self, after: Revision) -> Result<Box<dyn LeaseWatch>, RegistryError>;

    /// The TTL given to new leases.
    fn lease_ttl(&self) -> Duration;
}
