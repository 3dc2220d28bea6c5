//! The lease watch: one long-lived etcd watch stream on `<prefix>/subnets/`, resumed after any
//! interruption by a re-list ([`WatchEvent::Snapshot`]) and a new stream from the list's
//! revision + 1, so no change is lost between the two.

use std::sync::Arc;

use async_trait::async_trait;
use etcd_client::{Event, EventType, WatchOptions, WatchStream};

use super::connect::{registry_error, unavailable};
use super::{Entry, Shared};
use crate::lease::{LeaseChange, LeaseWatch, RegistryError, Revision, WatchEvent};

/// A [`LeaseWatch`] on etcd.
pub struct EtcdWatch {
    shared: Arc<Shared>,
    state: State,
}

enum State {
    /// Streaming changes; `revision` is the last one delivered.
    Streaming {
        stream: Box<WatchStream>,
        revision: Revision,
    },
    /// Nothing is open and changes may have been missed: re-list first.
    Resync,
}

impl EtcdWatch {
    /// Opens the stream for changes after `after`.
    pub(super) async fn start(
        shared: Arc<Shared>,
        after: Revision,
    ) -> Result<EtcdWatch, RegistryError> {
        let stream = open(&shared, after + 1).await?;
        Ok(EtcdWatch {
            shared,
            state: State::Streaming {
                stream,
                revision: after,
            },
        })
    }

    /// Forgets the stream; the next call re-lists. Returns `err` for the caller.
    fn interrupted(&mut self, err: RegistryError) -> RegistryError {
        tracing::warn!(error = %err, "the subnet watch was interrupted; it re-lists on the next call");
        self.state = State::Resync;
        err
    }
}

/// Opens a watch stream on `subnets/` from revision `from` (inclusive).
async fn open(shared: &Shared, from: Revision) -> Result<Box<WatchStream>, RegistryError> {
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(from)
        // Empty progress responses keep the revision moving on a quiet prefix.
        .with_progress_notify();
    // One response carries up to 1000 revisions of history (after a reconnect, a replay):
    // with values of up to 1.5 MiB that is over tonic's 4 MiB default, as for a list.
    let mut client = shared
        .client
        .watch_client()
        .max_decoding_message_size(super::MAX_MESSAGE_BYTES);
    shared
        .request(
            "watch subnet leases",
            client.watch(shared.subnets_prefix.as_bytes(), Some(options)),
        )
        .await
        .map(Box::new)
}

#[async_trait]
impl LeaseWatch for EtcdWatch {
    async fn next(&mut self) -> Result<WatchEvent, RegistryError> {
        loop {
            match &mut self.state {
                State::Resync => {
                    // On failure the state stays Resync: the caller backs off and calls again.
                    // The stream is opened before the snapshot is handed out, so an open that
                    // keeps failing is an error the caller backs off on, not a snapshot that
                    // looks like recovery.
                    let list = self.shared.list().await?;
                    let stream = open(&self.shared, list.revision + 1).await?;
                    tracing::info!(
                        leases = list.leases.len(),
                        revision = list.revision,
                        "re-listed subnet leases; resuming the watch after them"
                    );
                    self.state = State::Streaming {
                        stream,
                        revision: list.revision,
                    };
                    return Ok(WatchEvent::Snapshot(list));
                }
                State::Streaming { stream, revision } => {
                    let resp = match stream.message().await {
                        Ok(Some(resp)) => resp,
                        Ok(None) => {
                            let e = unavailable(
                                &self.shared.location,
                                "watch subnet leases",
                                "etcd closed the watch stream",
                            );
                            return Err(self.interrupted(e));
                        }
                        Err(e) => {
                            let e =
                                registry_error(&self.shared.location, "watch subnet leases", &e);
                            return Err(self.interrupted(e));
                        }
                    };
                    if resp.compact_revision() != 0 {
                        // Changes after `revision` were compacted away: only a list is exact.
                        tracing::warn!(
                            revision = *revision,
                            compact_revision = resp.compact_revision(),
                            "the subnet watch fell behind a compaction; re-listing"
                        );
                        self.state = State::Resync;
                        continue;
                    }
                    if resp.canceled() {
                        let reason = resp.cancel_reason().to_owned();
                        let e = cancel_error(&self.shared.location, &reason);
                        return Err(self.interrupted(e));
                    }
                    if resp.events().is_empty() {
                        // "created", or a progress notification: nothing changed up to the
                        // header's revision.
                        if !resp.created() {
                            let at = resp.header().map_or(0, |h| h.revision());
                            *revision = (*revision).max(at);
                        }
                        continue;
                    }
                    let batch = translate(&self.shared, resp.events()).await;
                    match batch {
                        Ok((last, changes)) => {
                            *revision = last;
                            if changes.is_empty() {
                                continue;
                            }
                            return Ok(WatchEvent::Changes {
                                revision: last,
                                changes,
                            });
                        }
                        Err(e) => return Err(self.interrupted(e)),
                    }
                }
            }
        }
    }
}

/// Why etcd canceled a watch without a compaction (e.g. "permission denied").
fn cancel_error(location: &str, reason: &str) -> RegistryError {
    let reason = if reason.is_empty() {
        "no reason given"
    } else {
        reason
    };
    if reason.contains("permission") || reason.contains("auth") {
        RegistryError::Refused {
            location: location.to_owned(),
            reason: format!(
                "etcd canceled the subnet watch: {reason}; check that the etcd user may read \
                 the key prefix"
            ),
        }
    } else {
        unavailable(
            location,
            "watch subnet leases",
            &format!("etcd canceled the watch: {reason}"),
        )
    }
}

/// One watch response's events as changes, oldest first, with the revision of the last one.
/// Malformed keys are skipped. A malformed value put on a valid key is a delete of that key:
/// whatever lease it held is gone, as a list would show it (skipping it would keep routing to
/// the old address). A put whose etcd lease is already gone is still
/// reported (expiring now): it happened, and its delete follows.
async fn translate(
    shared: &Shared,
    events: &[Event],
) -> Result<(Revision, Vec<LeaseChange>), RegistryError> {
    enum Step {
        Put(usize),
        Delete(crate::model::SubnetKey),
    }
    let mut last = 0;
    let mut puts: Vec<Entry> = Vec::new();
    let mut steps = Vec::with_capacity(events.len());
    for event in events {
        let Some(kv) = event.kv() else { continue };
        last = last.max(kv.mod_revision());
        match event.event_type() {
            EventType::Put => {
                if let Some(key) = shared.parse_key(kv.key()) {
                    match shared.parse_kv(kv) {
                        Some(entry) => {
                            steps.push(Step::Put(puts.len()));
                            puts.push(entry);
                        }
                        None => steps.push(Step::Delete(key)),
                    }
                }
            }
            EventType::Delete => {
                if let Some(key) = shared.parse_key(kv.key()) {
                    steps.push(Step::Delete(key));
                }
            }
        }
    }
    let mut leases = shared.to_leases(puts, true).await?;
    let changes = steps
        .into_iter()
        .filter_map(|step| match step {
            Step::Put(i) => leases[i].take().map(LeaseChange::Put),
            Step::Delete(key) => Some(LeaseChange::Delete(key)),
        })
        .collect();
    Ok((last, changes))
}
