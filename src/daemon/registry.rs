//! Opening the registry the flags name: etcd v3 when `--etcd-endpoints` is given, otherwise the
//! embedded directory store.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;

use crate::cli::RegistryArgs;
use crate::cli::exit::usage;
use crate::lease::Registry;
use crate::lease::directory::DirectoryRegistry;
#[cfg(feature = "etcd")]
use crate::lease::etcd::{EtcdOptions, EtcdRegistry};

/// Refuses etcd flags given without `--etcd-endpoints` (a usage error): ignored, they would
/// leave linen on the directory registry, waiting for a config that is in etcd. Empty values
/// (`LINEN_ETCD_USERNAME=` in an environment file) and flannel's default prefix count as not
/// given.
fn refuse_etcd_flags_without_endpoints(args: &RegistryArgs) -> Result<()> {
    if !args.etcd_endpoints.is_empty() {
        return Ok(());
    }
    let text = |v: &Option<String>| v.as_deref().is_some_and(|v| !v.is_empty());
    let given = [
        (
            "--etcd-prefix",
            !args.etcd_prefix.is_empty() && args.etcd_prefix != crate::model::DEFAULT_PREFIX,
        ),
        (
            "--etcd-cafile",
            RegistryArgs::file(&args.etcd_cafile).is_some(),
        ),
        (
            "--etcd-certfile",
            RegistryArgs::file(&args.etcd_certfile).is_some(),
        ),
        (
            "--etcd-keyfile",
            RegistryArgs::file(&args.etcd_keyfile).is_some(),
        ),
        ("--etcd-username", text(&args.etcd_username)),
        ("--etcd-password", text(&args.etcd_password)),
        (
            "--etcd-password-file",
            RegistryArgs::file(&args.etcd_password_file).is_some(),
        ),
    ];
    match given.iter().find(|(_, given)| *given) {
        Some((flag, _)) => Err(usage(format!(
            "{flag} (or its variable) is for the etcd registry, and no --etcd-endpoints is \
             given: add --etcd-endpoints URL (linen has no default endpoint; flanneld's is \
             http://127.0.0.1:4001,http://127.0.0.1:2379), or drop {flag} to use the directory \
             registry at {}",
            args.registry_dir.display()
        ))),
        None => Ok(()),
    }
}

/// Opens the registry. `lease_ttl` applies to new leases (flannel: 24 h).
pub async fn open(args: &RegistryArgs, lease_ttl: Duration) -> Result<Arc<dyn Registry>> {
    refuse_etcd_flags_without_endpoints(args)?;
    if args.etcd_endpoints.is_empty() {
        return Ok(Arc::new(DirectoryRegistry::with_ttl(
            args.registry_dir.clone(),
            lease_ttl,
        )));
    }
    open_etcd(args, lease_ttl, false).await
}

/// [`open`] for `linen run`: a directory registry whose config goes away is out of reach
/// ([`DirectoryRegistry::requiring_config`]), never a new empty one.
pub async fn open_for_run(args: &RegistryArgs, lease_ttl: Duration) -> Result<Arc<dyn Registry>> {
    refuse_etcd_flags_without_endpoints(args)?;
    if args.etcd_endpoints.is_empty() {
        return Ok(Arc::new(
            DirectoryRegistry::with_ttl(args.registry_dir.clone(), lease_ttl).requiring_config(),
        ));
    }
    open_etcd(args, lease_ttl, true).await
}

/// Where `args` point, for messages: the directory, or the etcd endpoints (without any
/// credentials) and prefix.
pub fn describe(args: &RegistryArgs) -> String {
    if args.etcd_endpoints.is_empty() {
        return args.registry_dir.display().to_string();
    }
    #[cfg(feature = "etcd")]
    let shown: Vec<String> = args
        .etcd_endpoints
        .iter()
        .map(|e| crate::lease::etcd::redacted(e))
        .collect();
    #[cfg(not(feature = "etcd"))]
    let shown = args.etcd_endpoints.clone();
    format!("{} (prefix {})", shown.join(","), args.etcd_prefix)
}

/// Whether [`open`] failed only because the registry is out of reach for now (etcd down or
/// not yet up), so that trying again later may succeed.
pub fn out_of_reach(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<crate::lease::RegistryError>()
            .is_some_and(|r| r.is_transient())
            || etcd_out_of_reach(c)
    })
}

#[cfg(feature = "etcd")]
fn etcd_out_of_reach(c: &(dyn std::error::Error + 'static)) -> bool {
    use crate::lease::etcd::EtcdSetupError;
    matches!(c.downcast_ref::<EtcdSetupError>(), Some(EtcdSetupError::Registry(r)) if r.is_transient())
}

#[cfg(not(feature = "etcd"))]
fn etcd_out_of_reach(_: &(dyn std::error::Error + 'static)) -> bool {
    false
}

#[cfg(not(feature = "etcd"))]
async fn open_etcd(_: &RegistryArgs, _: Duration, _: bool) -> Result<Arc<dyn Registry>> {
    Err(crate::cli::exit::usage(
        "--etcd-endpoints given, but this linen was built without etcd support \
         (cargo build --no-default-features); rebuild with the default features or use \
         --registry-dir",
    ))
}

/// Connects to the etcd `args` name; `for_run`: warn when it is plain http (a daemon's log should
/// say so, an admin command's output need not every time).
#[cfg(feature = "etcd")]
async fn open_etcd(
    args: &RegistryArgs,
    lease_ttl: Duration,
    for_run: bool,
) -> Result<Arc<dyn Registry>> {
    use anyhow::Context;
    let options = EtcdOptions {
        endpoints: args.etcd_endpoints.clone(),
        prefix: args.etcd_prefix.clone(),
        cafile: RegistryArgs::file(&args.etcd_cafile),
        certfile: RegistryArgs::file(&args.etcd_certfile),
        keyfile: RegistryArgs::file(&args.etcd_keyfile),
        // Empty counts as not given, as for every etcd variable (README).
        username: args.etcd_username.clone().filter(|u| !u.is_empty()),
        password: args.etcd_password.clone().filter(|p| !p.is_empty()),
        password_file: RegistryArgs::file(&args.etcd_password_file),
        lease_ttl,
        plain_http_warning: for_run,
        ..EtcdOptions::default()
    };
    let registry = EtcdRegistry::connect(&options)
        .await
        .with_context(|| format!("connecting to etcd at {}", describe(args)))?;
    Ok(Arc::new(registry))
}
