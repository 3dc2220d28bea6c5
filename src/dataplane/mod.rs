//! The data plane: TUN ⇄ UDP forwarding in flannel's udp wire format (the inner IP packet,
//! unchanged, is the whole UDP payload). std threads and mio, no async.
//!
//! - [`forward`]: the sans-IO per-packet decisions (egress and ingress rules of design.md).
//! - [`worker`]: one thread per TUN queue + UDP socket, batching the I/O.
//! - [`batch`] and [`coalesce`]: sans-IO send-side runs for UDP GSO, and receive-side
//!   TSO/USO super-packets for the TUN.
//! - [`io`]: opening the TUN device (tun-rs) and the `SO_REUSEPORT` UDP sockets.
//! - [`counters`]: per-worker packet and drop counters.
//!
//! Must not import tokio, `lease` or `daemon`.

pub mod batch;
pub mod coalesce;
pub mod counters;
pub mod forward;
pub mod io;
pub mod steer;
pub mod worker;

pub use counters::{Counters, DropReason, LocalCounters};
pub use forward::{Egress, ForwardConfig, IcmpLimiter, Ingress};
pub use worker::{WorkerHandle, WorkerMonitor, WorkerSetup};
