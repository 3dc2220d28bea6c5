//! `Table` and `Reader`: lock-free handoff of whole [`Snapshot`]s from the control plane to the
//! data-plane workers through one `arc_swap::ArcSwap`.
//!
//! The writer replaces the snapshot with one atomic pointer store; readers never block and never
//! allocate. Each worker keeps its own [`Reader`] (an `arc_swap::Cache`): [`Reader::load`] costs
//! one atomic load when nothing changed and an `Arc` clone when something did. A worker loads
//! **once per batch** of packets and answers the whole batch from that snapshot, so a batch never
//! sees two tables. An old snapshot is freed when the last holder lets go of it: the writer, every
//! reader that has loaded a newer one, and any `Arc` from [`Table::load_full`]. A worker that sits
//! idle keeps the snapshot it loaded last alive until its next load (at most one extra snapshot per
//! worker).
//!
//! Must not import tokio, `lease`, `model` or `daemon`.

use std::sync::Arc;

use arc_swap::{ArcSwap, Cache};

use super::Snapshot;

/// The published forwarding table. Cheap to clone: clones share the same slot.
#[derive(Clone)]
pub struct Table {
    current: Arc<ArcSwap<Snapshot>>,
}

impl Table {
    /// A table whose first snapshot is `initial`.
    pub fn new(initial: Snapshot) -> Table {
        Table {
            current: Arc::new(ArcSwap::from_pointee(initial)),
        }
    }

    /// Replaces the current snapshot with `next` (one atomic store). Readers pick it up at their
    /// next [`Reader::load`]; the previous snapshot is freed once no one holds it.
    pub fn publish(&self, next: Snapshot) {
        self.current.store(Arc::new(next));
    }

    /// The current snapshot as an owned `Arc`, for the control plane and status output. Workers
    /// use a [`Reader`] instead.
    pub fn load_full(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// A reader handle for one worker thread.
    pub fn reader(&self) -> Reader {
        Reader {
            cache: Cache::new(Arc::clone(&self.current)),
        }
    }
}

impl Default for Table {
    fn default() -> Self {
        Table::new(Snapshot::empty())
    }
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("current", &self.current.load())
            .finish()
    }
}

/// One worker's view of a [`Table`]. Not shared between threads (it is `Send`, so it can be moved
/// into the worker): each worker makes its own with [`Table::reader`].
pub struct Reader {
    cache: Cache<Arc<ArcSwap<Snapshot>>, Arc<Snapshot>>,
}

impl Reader {
    /// The current snapshot. Never blocks and never allocates: one atomic load when nothing was
    /// published since the last call. Call it once per batch and use the returned snapshot for
    /// every packet of the batch.
    #[inline]
    pub fn load(&mut self) -> &Snapshot {
        self.cache.load()
    }
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader").finish_non_exhaustive()
    }
}
