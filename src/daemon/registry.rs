//! Opening the registry the flags name: etcd v3 when `--etcd-endpoints` is given, otherwise the
//! embedded directory store.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::cli::RegistryArgs;
use crate::lease::Registry;
use crate::lease::directory::DirectoryRegistry;
use crate::lease::etcd::{EtcdOptions, EtcdRegistry};

/// Opens the registry. `lease_ttl` applies to new leases (flannel: 24 h).
pub async fn open(args: &RegistryArgs, lease_ttl: Duration) -> Result<Arc<dyn Registry>> {
    if args.etcd_endpoints.is_empty() {
        return Ok(Arc::new(DirectoryRegistry::with_ttl(
            args.registry_dir.clone(),
            lease_ttl,
        )));
    }
    let options = EtcdOptions {
        endpoints: args.etcd_endpoints.clone(),
        prefix: args.etcd_prefix.clone(),
        cafile: args.etcd_cafile.clone(),
        certfile: args.etcd_certfile.clone(),
        keyfile: args.etcd_keyfile.clone(),
        username: args.etcd_username.clone(),
        password: args.etcd_password.clone(),
        lease_ttl,
        ..EtcdOptions::default()
    };
    let registry = EtcdRegistry::connect(&options)
        .await
        .with_context(|| format!("connecting to etcd at {}", args.etcd_endpoints.join(",")))?;
    Ok(Arc::new(registry))
}
