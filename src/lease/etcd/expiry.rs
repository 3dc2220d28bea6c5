//! When does a subnet key's etcd lease run out? A key value carries only the lease ID; the
//! remaining TTL needs a `LeaseTimeToLive` call. flannel makes one per key on every list (N+1
//! round trips); linen remembers what it learned (from grants, keep-alives and earlier
//! lookups) and asks only for lease IDs it has no fresh answer for, once per ID, many at a time.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use futures_util::{StreamExt, stream};

use super::Shared;
use crate::lease::RegistryError;

/// `LeaseTimeToLive` calls in flight at once. They share one HTTP/2 connection; etcd answers
/// them from the leader's memory, so the limit only keeps the request queue short.
const LOOKUP_CONCURRENCY: usize = 64;

/// What is known about one etcd lease.
#[derive(Clone, Copy, Debug)]
struct Known {
    /// When it runs out.
    expires: SystemTime,
    /// The store revision this was learned at. A key written after it (a renewal puts the key
    /// again after its keep-alive) makes the entry stale for that key.
    revision: i64,
}

/// Lease ID → expiry, shared by a registry and its watches.
#[derive(Debug, Default)]
pub(super) struct ExpiryCache {
    known: Mutex<HashMap<i64, Known>>,
}

impl ExpiryCache {
    /// Records that `lease` runs out at `expires`, as learned at store `revision`.
    pub(super) fn record(&self, lease: i64, expires: SystemTime, revision: i64) {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        let entry = known.entry(lease).or_insert(Known { expires, revision });
        if revision >= entry.revision {
            *entry = Known { expires, revision };
        }
    }

    /// Forgets a revoked lease.
    pub(super) fn forget(&self, lease: i64) {
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&lease);
    }

    /// The expiry of `lease` if it was learned no earlier than `written` (the key's
    /// mod_revision).
    fn fresh(&self, lease: i64, written: i64) -> Option<SystemTime> {
        let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        known
            .get(&lease)
            .filter(|k| k.revision >= written)
            .map(|k| k.expires)
    }

    /// Drops leases that ran out before `now`: their keys are gone, so nobody asks again.
    fn prune(&self, now: SystemTime) {
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, k| k.expires >= now);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.known.lock().unwrap().len()
    }
}

/// Expiry of each wanted lease: `wanted` holds `(lease ID, mod_revision of a key using it)`.
/// The answer maps each lease ID to its expiry, or `None` when etcd no longer has the lease
/// (it ran out or was revoked: its keys are about to be, or were, deleted).
pub(super) async fn expiries(
    shared: &Shared,
    wanted: impl IntoIterator<Item = (i64, i64)>,
) -> Result<HashMap<i64, Option<SystemTime>>, RegistryError> {
    let now = SystemTime::now();
    shared.expiry.prune(now);
    // The newest write per lease decides whether a cached entry is fresh.
    let mut newest: HashMap<i64, i64> = HashMap::new();
    for (lease, written) in wanted {
        let w = newest.entry(lease).or_insert(written);
        *w = (*w).max(written);
    }
    let mut answer = HashMap::with_capacity(newest.len());
    let mut missing = Vec::new();
    for (lease, written) in newest {
        match shared.expiry.fresh(lease, written) {
            Some(t) => {
                answer.insert(lease, Some(t));
            }
            None => missing.push(lease),
        }
    }
    if missing.is_empty() {
        return Ok(answer);
    }
    let lookups = stream::iter(missing)
        .map(|lease| {
            let mut client = shared.client.lease_client();
            async move {
                let reply = shared
                    .request("look up a lease's TTL", client.time_to_live(lease, None))
                    .await?;
                Ok::<_, RegistryError>((lease, reply))
            }
        })
        .buffer_unordered(LOOKUP_CONCURRENCY);
    futures_util::pin_mut!(lookups);
    while let Some(result) = lookups.next().await {
        let (lease, reply) = result?;
        // etcd rounds the remaining TTL down; the key lives at most a second longer. etcd caps
        // TTLs at 9e9 s; a larger answer is capped there too, so the time cannot overflow.
        let expires = (reply.ttl() > 0).then(|| {
            SystemTime::now() + Duration::from_secs(reply.ttl().unsigned_abs().min(9_000_000_000))
        });
        if let Some(t) = expires {
            let revision = reply.header().map_or(0, |h| h.revision());
            shared.expiry.record(lease, t, revision);
        }
        answer.insert(lease, expires);
    }
    Ok(answer)
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn an_entry_is_fresh_only_for_writes_it_has_seen() {
        let cache = ExpiryCache::default();
        let t = SystemTime::now() + Duration::from_secs(60);
        cache.record(7, t, 100);
        assert_eq!(cache.fresh(7, 100), Some(t));
        assert_eq!(cache.fresh(7, 99), Some(t));
        // The key was put again after the lookup (a renewal): ask etcd again.
        assert_eq!(cache.fresh(7, 101), None);
        assert_eq!(cache.fresh(8, 1), None);
    }

    #[test]
    fn older_knowledge_does_not_overwrite_newer() {
        let cache = ExpiryCache::default();
        let late = SystemTime::now() + Duration::from_secs(90);
        let early = SystemTime::now() + Duration::from_secs(30);
        cache.record(7, late, 200);
        cache.record(7, early, 150);
        assert_eq!(cache.fresh(7, 200), Some(late));
    }

    #[test]
    fn prunes_expired_and_forgotten_leases() {
        let cache = ExpiryCache::default();
        let now = SystemTime::now();
        cache.record(1, now - Duration::from_secs(1), 1);
        cache.record(2, now + Duration::from_secs(60), 1);
        cache.record(3, now + Duration::from_secs(60), 1);
        cache.prune(now);
        cache.forget(3);
        assert_eq!(cache.len(), 1);
        assert!(cache.fresh(2, 1).is_some());
    }
}
