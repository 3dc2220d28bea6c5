//! The known set of leases, kept from [`WatchEvent`]s: pure, no I/O.
//!
//! [`LeaseTracker`] turns a watch's exact changes and whole-set snapshots into typed peer events
//! (added, attributes updated, removed), never including this host's own subnet, and reports
//! separately what happened to the own lease (rewritten, or gone). A snapshot is diffed against
//! the known set, and changed attributes of a subnet still present ARE reported (flannel lost
//! them before PR #1247). A renewal that changes only the expiry updates the stored lease
//! silently: routes do not depend on it.

use std::collections::BTreeMap;

use super::{LeaseChange, Revision, WatchEvent};
use crate::model::{Lease, SubnetKey};

/// What changed about another host's lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerEvent {
    /// A subnet not known before.
    Added(Lease),
    /// A known subnet whose value (PublicIP, backend data) changed.
    Updated {
        /// The lease as it was.
        old: Lease,
        /// The lease as it is now.
        new: Lease,
    },
    /// A known subnet was deleted or expired.
    Removed(Lease),
}

/// What happened to this host's own key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnChange {
    /// The own key was written with a value or expiry other than the one known: a renewal seen
    /// through the watch, or someone else's write (compare the attributes).
    Put(Lease),
    /// The own key was deleted or expired, or is missing from a snapshot.
    Removed,
}

/// The result of applying one watch event.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Changes to other hosts' leases, in order.
    pub peers: Vec<PeerEvent>,
    /// The last change to the own key in this event, if any.
    pub own: Option<OwnChange>,
    /// Whether the event carried the own key with a value, changed or not (a renewal's echo,
    /// a snapshot listing it).
    pub own_seen: bool,
}

impl Applied {
    /// Whether nothing visible changed.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty() && self.own.is_none()
    }
}

/// The known leases: the own lease and every other host's.
#[derive(Clone, Debug, Default)]
pub struct LeaseTracker {
    own_key: Option<SubnetKey>,
    own: Option<Lease>,
    peers: BTreeMap<SubnetKey, Lease>,
    revision: Revision,
}

impl LeaseTracker {
    /// An empty tracker; `own` is this host's lease, if it has one yet.
    pub fn new(own: Option<Lease>) -> LeaseTracker {
        let mut t = LeaseTracker::default();
        t.set_own(own);
        t
    }

    /// Records this host's lease (after acquiring or renewing it). If the subnet was known as a
    /// peer's, it stops being one; if the previous own subnet is now held by another host (other
    /// attributes), it becomes a peer. The returned events say so.
    pub fn set_own(&mut self, own: Option<Lease>) -> Vec<PeerEvent> {
        let mut events = Vec::new();
        if let Some(lease) = &own
            && let Some(old) = self.peers.remove(&lease.key)
        {
            events.push(PeerEvent::Removed(old));
        }
        let new_key = own.as_ref().map(|l| l.key);
        if new_key != self.own_key
            && let Some(old) = self.own.take()
            && own.as_ref().is_some_and(|l| l.attrs != old.attrs)
        {
            self.peers.insert(old.key, old.clone());
            events.push(PeerEvent::Added(old));
        }
        self.own_key = own.as_ref().map(|l| l.key);
        self.own = own;
        events
    }

    /// Gives the own key up to the host that wrote it last (an [`OwnChange::Put`] with other
    /// attributes): that lease becomes a peer at once, and this host holds no lease (nor any
    /// key to reclaim). (The daemon routes to its subnet once this host has another: until
    /// then the device keeps the subnet, whose local workloads still use it.)
    pub fn yield_own(&mut self) -> Vec<PeerEvent> {
        self.own_key = None;
        match self.own.take() {
            Some(taker) => {
                self.peers.insert(taker.key, taker.clone());
                vec![PeerEvent::Added(taker)]
            }
            None => Vec::new(),
        }
    }

    /// This host's lease as last known.
    pub fn own(&self) -> Option<&Lease> {
        self.own.as_ref()
    }

    /// Other hosts' leases, sorted by key.
    pub fn peers(&self) -> impl ExactSizeIterator<Item = &Lease> {
        self.peers.values()
    }

    /// The revision of the last event applied (0 before any).
    pub fn revision(&self) -> Revision {
        self.revision
    }

    /// Applies one watch event and says what changed.
    pub fn apply(&mut self, event: WatchEvent) -> Applied {
        match event {
            WatchEvent::Changes { revision, changes } => {
                let mut out = Applied::default();
                for change in changes {
                    match change {
                        LeaseChange::Put(lease) => self.put(lease, &mut out),
                        LeaseChange::Delete(key) => self.delete(&key, &mut out),
                    }
                }
                self.revision = self.revision.max(revision);
                out
            }
            WatchEvent::Snapshot(list) => {
                let mut out = Applied::default();
                let mut present: BTreeMap<SubnetKey, Lease> =
                    list.leases.into_iter().map(|l| (l.key, l)).collect();
                if let Some(key) = self.own_key {
                    match present.remove(&key) {
                        Some(lease) => self.put(lease, &mut out),
                        None => self.delete(&key, &mut out),
                    }
                }
                let gone: Vec<SubnetKey> = self
                    .peers
                    .keys()
                    .filter(|k| !present.contains_key(k))
                    .copied()
                    .collect();
                for key in gone {
                    self.delete(&key, &mut out);
                }
                for lease in present.into_values() {
                    self.put(lease, &mut out);
                }
                // A snapshot may go back in revision (a polled expiry, a restored store).
                self.revision = list.revision;
                out
            }
        }
    }

    fn put(&mut self, lease: Lease, out: &mut Applied) {
        if Some(lease.key) == self.own_key {
            out.own_seen = true;
            if self.own.as_ref() != Some(&lease) {
                self.own = Some(lease.clone());
                out.own = Some(OwnChange::Put(lease));
            }
            return;
        }
        match self.peers.insert(lease.key, lease.clone()) {
            None => out.peers.push(PeerEvent::Added(lease)),
            Some(old) if old.attrs != lease.attrs => {
                out.peers.push(PeerEvent::Updated { old, new: lease })
            }
            Some(_) => {}
        }
    }

    fn delete(&mut self, key: &SubnetKey, out: &mut Applied) {
        if Some(*key) == self.own_key {
            if self.own.take().is_some() {
                out.own = Some(OwnChange::Removed);
            }
            return;
        }
        if let Some(old) = self.peers.remove(key) {
            out.peers.push(PeerEvent::Removed(old));
        }
    }
}

#[cfg(test)]
mod test {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use super::*;
    use crate::lease::LeaseList;
    use crate::model::LeaseAttrs;

    fn lease(key: &str, ip: &str, exp: u64) -> Lease {
        Lease {
            key: SubnetKey::parse(key).unwrap(),
            attrs: LeaseAttrs::with_public_ip(ip.parse().unwrap()),
            expiration: Some(UNIX_EPOCH + Duration::from_secs(exp)),
            lease_id: None,
        }
    }

    fn snapshot(revision: Revision, leases: &[Lease]) -> WatchEvent {
        WatchEvent::Snapshot(LeaseList {
            leases: leases.to_vec(),
            revision,
        })
    }

    fn changes(revision: Revision, changes: Vec<LeaseChange>) -> WatchEvent {
        WatchEvent::Changes { revision, changes }
    }

    fn own() -> Lease {
        lease("198.19.1.0-24", "198.18.1.1", 1000)
    }

    fn a() -> Lease {
        lease("198.19.2.0-24", "198.18.1.2", 1000)
    }

    fn b() -> Lease {
        lease("198.19.3.0-24", "198.18.1.3", 1000)
    }

    #[test]
    fn first_snapshot_adds_peers_but_never_the_own_lease() {
        // flannel's WatchLeaseAdded: the first batch never contains the node's own lease.
        let mut t = LeaseTracker::new(Some(own()));
        let out = t.apply(snapshot(5, &[own(), a(), b()]));
        assert_eq!(
            out.peers,
            vec![PeerEvent::Added(a()), PeerEvent::Added(b())]
        );
        assert_eq!(out.own, None, "the own lease is unchanged");
        assert_eq!(t.peers().cloned().collect::<Vec<_>>(), vec![a(), b()]);
        assert_eq!(t.revision(), 5);
    }

    #[test]
    fn a_later_lease_is_added_exactly_once() {
        let mut t = LeaseTracker::new(Some(own()));
        t.apply(snapshot(1, &[own()]));
        let out = t.apply(changes(2, vec![LeaseChange::Put(a())]));
        assert_eq!(out.peers, vec![PeerEvent::Added(a())]);
        // The same lease again (a polling backend's next snapshot) is no event.
        assert!(t.apply(snapshot(2, &[own(), a()])).is_empty());
        assert!(t.apply(changes(3, vec![LeaseChange::Put(a())])).is_empty());
    }

    #[test]
    fn deleted_or_expired_lease_is_removed_exactly_once() {
        // flannel's WatchLeaseRemoved.
        let mut t = LeaseTracker::new(Some(own()));
        t.apply(snapshot(1, &[own(), a(), b()]));
        let out = t.apply(changes(2, vec![LeaseChange::Delete(a().key)]));
        assert_eq!(out.peers, vec![PeerEvent::Removed(a())]);
        assert!(
            t.apply(changes(3, vec![LeaseChange::Delete(a().key)]))
                .is_empty()
        );
        // Expiry seen by a snapshot.
        let out = t.apply(snapshot(3, &[own()]));
        assert_eq!(out.peers, vec![PeerEvent::Removed(b())]);
        assert!(t.apply(snapshot(3, &[own()])).is_empty());
        assert_eq!(t.peers().len(), 0);
    }

    #[test]
    fn snapshot_reports_changed_attributes() {
        // flannel PR #1247: a resync must not hide a host that changed its PublicIP.
        let mut t = LeaseTracker::new(Some(own()));
        t.apply(snapshot(1, &[own(), a()]));
        let moved = lease("198.19.2.0-24", "198.18.9.9", 1000);
        let out = t.apply(snapshot(7, &[own(), moved.clone()]));
        assert_eq!(
            out.peers,
            vec![PeerEvent::Updated {
                old: a(),
                new: moved.clone()
            }]
        );
        assert_eq!(t.peers().next(), Some(&moved));
    }

    #[test]
    fn renewal_of_a_peer_updates_expiry_silently() {
        let mut t = LeaseTracker::new(Some(own()));
        t.apply(snapshot(1, &[own(), a()]));
        let renewed = lease("198.19.2.0-24", "198.18.1.2", 2000);
        assert!(
            t.apply(changes(2, vec![LeaseChange::Put(renewed.clone())]))
                .is_empty()
        );
        assert_eq!(t.peers().next(), Some(&renewed));
    }

    #[test]
    fn incremental_put_with_new_attributes_is_an_update() {
        let mut t = LeaseTracker::new(Some(own()));
        t.apply(snapshot(1, &[own(), a()]));
        let moved = lease("198.19.2.0-24", "198.18.9.9", 1000);
        let out = t.apply(changes(2, vec![LeaseChange::Put(moved.clone())]));
        assert_eq!(
            out.peers,
            vec![PeerEvent::Updated {
                old: a(),
                new: moved
            }]
        );
    }

    #[test]
    fn own_lease_missing_from_snapshot_is_reported_removed() {
        let mut t = LeaseTracker::new(Some(own()));
        t.apply(snapshot(1, &[own(), a()]));
        let out = t.apply(snapshot(2, &[a()]));
        assert_eq!(out.own, Some(OwnChange::Removed));
        assert!(out.peers.is_empty());
        assert_eq!(t.own(), None);
        // Reported once.
        assert!(t.apply(snapshot(2, &[a()])).is_empty());
    }

    #[test]
    fn own_lease_delete_and_put_are_reported_not_as_peers() {
        let mut t = LeaseTracker::new(Some(own()));
        let out = t.apply(changes(2, vec![LeaseChange::Delete(own().key)]));
        assert_eq!(out.own, Some(OwnChange::Removed));
        // Someone else takes the key: still not a peer while it is ours to reclaim.
        let thief = lease("198.19.1.0-24", "198.18.7.7", 5000);
        let out = t.apply(changes(3, vec![LeaseChange::Put(thief.clone())]));
        assert_eq!(out.own, Some(OwnChange::Put(thief.clone())));
        assert!(out.peers.is_empty());
        // Once we hold another subnet, the thief's lease is a peer like any other.
        let mine = lease("198.19.5.0-24", "198.18.1.1", 5000);
        assert_eq!(t.set_own(Some(mine)), vec![PeerEvent::Added(thief.clone())]);
        assert_eq!(t.peers().cloned().collect::<Vec<_>>(), vec![thief]);
    }

    #[test]
    fn yielding_the_own_key_makes_its_taker_a_peer_at_once() {
        let mut t = LeaseTracker::new(Some(own()));
        t.apply(snapshot(1, &[own(), a()]));
        let thief = lease("198.19.1.0-24", "198.18.7.7", 5000);
        let out = t.apply(changes(2, vec![LeaseChange::Put(thief.clone())]));
        assert_eq!(out.own, Some(OwnChange::Put(thief.clone())));
        assert_eq!(t.yield_own(), vec![PeerEvent::Added(thief.clone())]);
        assert_eq!(t.own(), None);
        assert_eq!(
            t.peers().cloned().collect::<Vec<_>>(),
            vec![thief.clone(), a()]
        );
        // Its renewal is a peer's renewal now, and a new own subnet leaves it alone.
        let renewed = lease("198.19.1.0-24", "198.18.7.7", 9000);
        assert!(
            t.apply(changes(3, vec![LeaseChange::Put(renewed)]))
                .is_empty()
        );
        let mine = lease("198.19.5.0-24", "198.18.1.1", 5000);
        assert!(t.set_own(Some(mine)).is_empty());
        assert_eq!(t.peers().len(), 2);
    }

    #[test]
    fn own_renewal_echo_is_a_put_only_when_it_differs() {
        let mut t = LeaseTracker::new(Some(own()));
        let echo = t.apply(changes(2, vec![LeaseChange::Put(own())]));
        assert!(echo.is_empty());
        assert!(echo.own_seen, "the echo is seen, though nothing changed");
        assert!(!t.apply(changes(3, vec![LeaseChange::Put(a())])).own_seen);
        let renewed = lease("198.19.1.0-24", "198.18.1.1", 9000);
        let out = t.apply(changes(4, vec![LeaseChange::Put(renewed.clone())]));
        assert_eq!(out.own, Some(OwnChange::Put(renewed.clone())));
        assert_eq!(t.own(), Some(&renewed));
    }

    #[test]
    fn taking_a_new_own_subnet_drops_it_from_peers() {
        let mut t = LeaseTracker::new(None);
        t.apply(snapshot(1, &[a(), b()]));
        assert_eq!(t.peers().len(), 2);
        // E.g. a reservation for us that the tracker saw first as a peer.
        let events = t.set_own(Some(a()));
        assert_eq!(events, vec![PeerEvent::Removed(a())]);
        assert_eq!(t.peers().cloned().collect::<Vec<_>>(), vec![b()]);
        assert!(t.apply(snapshot(2, &[a(), b()])).is_empty());
    }

    #[test]
    fn changes_apply_in_order_within_a_batch() {
        let mut t = LeaseTracker::new(Some(own()));
        let out = t.apply(changes(
            4,
            vec![
                LeaseChange::Put(a()),
                LeaseChange::Delete(a().key),
                LeaseChange::Put(b()),
            ],
        ));
        assert_eq!(
            out.peers,
            vec![
                PeerEvent::Added(a()),
                PeerEvent::Removed(a()),
                PeerEvent::Added(b())
            ]
        );
        assert_eq!(t.revision(), 4);
        // An older Changes batch does not move the revision back.
        t.apply(changes(2, vec![]));
        assert_eq!(t.revision(), 4);
    }

    #[test]
    fn snapshot_adds_removes_and_updates_at_once() {
        let mut t = LeaseTracker::new(Some(own()));
        t.apply(snapshot(1, &[own(), a()]));
        let c = lease(
            "198.19.4.0-24",
            "198.18.1.4",
            SystemTime::UNIX_EPOCH.elapsed().unwrap().as_secs(),
        );
        let out = t.apply(snapshot(9, &[own(), b(), c.clone()]));
        assert_eq!(
            out.peers,
            vec![
                PeerEvent::Removed(a()),
                PeerEvent::Added(b()),
                PeerEvent::Added(c)
            ]
        );
    }
}
