//! The shared vocabulary of linen: flannel's network config ([`NetworkConfig`]), subnet keys
//! ([`SubnetKey`]), lease values ([`LeaseAttrs`], [`Lease`]) and the `subnet.env` file
//! ([`SubnetEnv`]). Everything here is pure data plus parsing and formatting: no I/O, no
//! tokio, no registry. Formats are flannel's, byte for byte (see `flannel-compat.md` §a, §b, §e).

mod config;
mod json;
mod lease;
mod subnet_env;
mod subnet_key;

pub use config::{BackendConfig, ConfigError, DEFAULT_PORT, NetworkConfig, NetworkConfigSpec};
pub use lease::{Lease, LeaseAttrs, LeaseValueError, addresses_text};
pub use subnet_env::{SubnetEnv, SubnetEnvError};
pub use subnet_key::{SubnetKey, SubnetKeyError};

/// flannel's key prefix, the default for `--etcd-prefix`.
pub const DEFAULT_PREFIX: &str = "/coreos.com/network";
/// flannel's lease lifetime (`subnetTTL`): 24 hours.
pub const LEASE_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 60 * 60);
