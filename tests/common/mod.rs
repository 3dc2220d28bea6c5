//! Helpers shared by integration tests.

#![allow(dead_code)]

pub mod etcd;

use std::path::Path;
use std::process::Command;

/// The linen binary under test.
pub const LINEN: &str = env!("CARGO_BIN_EXE_linen");

/// Whether to skip a namespace test (not root); says so on stderr.
pub fn skip() -> bool {
    if !linen::lab::is_root() {
        eprintln!("SKIPPED: network-namespace tests need root");
        return true;
    }
    false
}

/// `linen network init --registry-dir DIR --network 198.19.0.0/16 --ipv6-network fd00:19::/48`.
pub fn network_init(dir: &Path) {
    let out = Command::new(LINEN)
        .args(["network", "init", "--registry-dir"])
        .arg(dir)
        .args([
            "--network",
            "198.19.0.0/16",
            "--ipv6-network",
            "fd00:19::/48",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
