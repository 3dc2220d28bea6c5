//! Exit codes that mean something, and the error type for bad input: 0 success, 1 runtime
//! failure, 2 bad flags or an invalid config (the message says what to fix; a service manager
//! should not restart on it), 130 interrupted (`linen demo` or `linen bench`, after cleaning up;
//! `linen run` on a second stop signal, at once).

use crate::bench::interrupt::Interrupted;
use crate::lease::RegistryError;
use crate::model::ConfigError;

/// Success.
pub const OK: i32 = 0;
/// A runtime failure (registry unreachable, no root, a device that cannot be created…).
pub const FAILURE: i32 = 1;
/// Bad flags or an invalid network config.
pub const USAGE: i32 = 2;
/// Stopped by SIGINT/SIGTERM before finishing (128 + SIGINT, as shells report it); for
/// `linen run`, a second stop signal while it stops.
pub const INTERRUPTED: i32 = 130;

/// A flag value or argument that cannot work; the message names the flag and what to give.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// A [`UsageError`] as an `anyhow::Error`.
pub fn usage(message: impl Into<String>) -> anyhow::Error {
    UsageError(message.into()).into()
}

/// An error and its causes on one line, as anyhow's `{:#}` writes them, but without a cause
/// its error already quotes (errors such as "config at X is invalid: {source}" name their
/// source in the message too, which `{:#}` then printed two or three times).
pub fn describe(e: &anyhow::Error) -> String {
    let mut text = String::new();
    let mut last = String::new();
    for cause in e.chain() {
        let cause = cause.to_string();
        if last.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
        last = cause;
    }
    text
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

    #[test]
    fn a_cause_quoted_by_its_error_is_written_once() {
        let json = crate::model::NetworkConfig::from_json("{").unwrap_err();
        let serde = json.to_string();
        let bad = RegistryError::BadConfig {
            location: "/r/config".into(),
            source: json,
        };
        let e = anyhow::Error::from(bad).context("reading the network config");
        let text = describe(&e);
        let cause = serde.rsplit(": ").next().unwrap();
        assert_eq!(text.matches(cause).count(), 1, "{text}");
        assert!(
            text.starts_with("reading the network config: network config at /r/config is invalid"),
            "{text}"
        );
        // Causes that are not quoted are all kept.
        let e = Err::<(), _>(anyhow::anyhow!("connection refused"))
            .context("connecting to etcd")
            .unwrap_err();
        assert_eq!(describe(&e), "connecting to etcd: connection refused");
    }
}
