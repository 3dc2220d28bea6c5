//! Exit codes that mean something, and the error type for bad input: 0 success, 1 runtime
//! failure, 2 bad flags or an invalid config (the message says what to fix; a service manager
//! should not restart on it), 130 interrupted (`linen demo` or `linen bench`, after cleaning up).

use crate::bench::interrupt::Interrupted;
use crate::lease::RegistryError;
use crate::model::ConfigError;

/// Success.
pub const OK: i32 = 0;
/// A runtime failure (registry unreachable, no root, a device that cannot be created…).
pub const FAILURE: i32 = 1;
/// Bad flags or an invalid network config.
pub const USAGE: i32 = 2;
/// Stopped by SIGINT/SIGTERM before finishing (128 + SIGINT, as shells report it).
pub const INTERRUPTED: i32 = 130;

/// A flag value or argument that cannot work; the message names the flag and what to give.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// A [`UsageError`] as an `anyhow::Error`.
pub fn usage(message: impl Into<String>) -> anyhow::Error {
    UsageError(message.into()).into()
}

/// The exit code for an error: [`USAGE`] when anything in its chain is bad input,
/// [`INTERRUPTED`] for an interruption, [`FAILURE`] otherwise.
pub fn code_for(e: &anyhow::Error) -> i32 {
    let usage = e.chain().any(|c| {
        c.is::<UsageError>()
            || c.is::<ConfigError>()
            || matches!(
                c.downcast_ref::<RegistryError>(),
                Some(RegistryError::BadConfig { .. })
            )
            || etcd_flags_wrong(c)
    });
    if usage {
        USAGE
    } else if e.chain().any(|c| c.is::<Interrupted>()) {
        INTERRUPTED
    } else {
        FAILURE
    }
}

/// Whether `c` is an etcd setup error that only other flags fix (options that contradict each
/// other, a TLS file that is not PEM); an unreadable file may be a mount that comes later.
#[cfg(feature = "etcd")]
fn etcd_flags_wrong(c: &(dyn std::error::Error + 'static)) -> bool {
    use crate::lease::etcd::EtcdSetupError;
    matches!(
        c.downcast_ref::<EtcdSetupError>(),
        Some(EtcdSetupError::Options(_) | EtcdSetupError::NotPem { .. })
    )
}

#[cfg(not(feature = "etcd"))]
fn etcd_flags_wrong(_: &(dyn std::error::Error + 'static)) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context as _;

    #[test]
    fn codes_follow_the_error_chain() {
        assert_eq!(code_for(&anyhow::anyhow!("netlink failed")), FAILURE);
        assert_eq!(code_for(&usage("--network x is not a CIDR")), USAGE);
        let wrapped = Err::<(), _>(usage("bad"))
            .context("while starting")
            .unwrap_err();
        assert_eq!(code_for(&wrapped), USAGE);
        let config = crate::model::NetworkConfig::from_json("{\"Network\": 5}").unwrap_err();
        assert_eq!(code_for(&anyhow::Error::from(config)), USAGE);
        assert_eq!(code_for(&Interrupted("linen demo").into()), INTERRUPTED);
    }
}
