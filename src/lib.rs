//! linen: a userspace UDP encapsulation router, compatible with flannel's udp backend.
//!
//! **Packet path** (data plane, std threads, no async): a worker reads a batch of IP packets from
//! its TUN queue, checks each with a zero-copy [`wire`] view, looks the destination up in the
//! current [`table::Snapshot`] (loaded once per batch), and sends the unchanged packet as the
//! whole payload of a UDP datagram to the peer's `PublicIP:port` (flannel's wire format, port
//! 8285). Datagrams arriving on the UDP socket are validated against the same snapshot (known
//! sender, inner source inside the sender's subnet, inner destination inside ours) and written to
//! the TUN. See [`dataplane`].
//!
//! **Control path** (tokio): the [`lease`] manager reads the flannel network config
//! ([`model::NetworkConfig`]) from a registry (etcd v3 or a directory), acquires and renews this
//! host's subnet lease, and watches every other lease. Each change rebuilds a whole
//! [`table::Snapshot`] and publishes it with one atomic pointer store; the data plane never waits
//! on the control plane. [`daemon`] wires the two together.
//!
//! Start reading at [`model`] (the shared vocabulary), then [`table`], then [`wire`].

#![deny(unsafe_code)]

pub mod bench;
pub mod cli;
pub mod daemon;
pub mod dataplane;
pub mod demo;
pub mod files;
pub mod lab;
pub mod lease;
pub mod model;
/// The crate's only `unsafe`: socket options and a process-group kill.
mod sys;
pub mod table;
pub mod wire;
