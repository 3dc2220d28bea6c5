//! The forwarding table: an immutable [`Snapshot`] built from plain [`Route`]s (longest-prefix
//! match from an inner destination to a peer's UDP address, the ingress sender check, this host's
//! own subnets) and [`Table`], the lock-free publish/load point between the planes.
//!
//! The control plane turns leases into [`Route`]s, calls [`Snapshot::build`] and
//! [`Table::publish`]; each data-plane worker owns a [`Reader`] and calls [`Reader::load`] once per
//! batch of packets, then answers every packet of the batch from that one snapshot.
//!
//! Must not import tokio, `lease`, `model` or `daemon`: it takes plain routes, so the data plane
//! can depend on it without pulling in the control plane.

pub mod alt;
mod flatmap;
mod lpm;
mod publish;
mod snapshot;
#[cfg(test)]
mod tests;

pub use publish::{Reader, Table};
pub use snapshot::{Entry, LocalSubnets, MAX_ROUTES, Route, Snapshot};
