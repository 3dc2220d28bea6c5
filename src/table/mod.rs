//! The forwarding table. Must not import tokio, `lease` or `daemon`.
