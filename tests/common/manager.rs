//! A lease manager running in the background, shared by the manager tests of each registry
//! (`lease_directory`, `etcd_manager`).

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use linen::lease::Registry;
use linen::lease::manager::{LeaseManager, LeaseState, ManagerOptions};
use linen::model::{LeaseAttrs, SubnetKey};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Host `n`'s lease attributes (public IP 198.18.1.n).
pub fn host(n: u8) -> LeaseAttrs {
    LeaseAttrs::with_public_ip(Ipv4Addr::new(198, 18, 1, n))
}

/// A subnet key from its flannel form (`198.19.9.0-24`).
pub fn key(s: &str) -> SubnetKey {
    SubnetKey::parse(s).unwrap()
}

/// A lease manager that has acquired its lease and runs until [`Running::stop`].
pub struct Running {
    pub state: watch::Receiver<LeaseState>,
    /// New addresses for the host ([`LeaseManager::address_sender`]).
    pub addresses: watch::Sender<LeaseAttrs>,
    cancel: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Acquires a lease from `reg` and runs the manager in the background.
    pub async fn start<R: Registry + 'static>(reg: Arc<R>, opts: ManagerOptions) -> Running {
        let config = reg.get_network_config().await.unwrap();
        let mut m = LeaseManager::new(reg, config, opts);
        m.acquire().await.unwrap();
        let state = m.subscribe();
        let addresses = m.address_sender();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(m.run(cancel.clone()));
        Running {
            state,
            addresses,
            cancel,
            task,
        }
    }

    /// The subnet this manager holds now.
    pub fn own(&self) -> Option<SubnetKey> {
        self.state.borrow().own.as_ref().map(|l| l.key)
    }

    /// Waits until the published state satisfies `ok`, failing after `secs`.
    pub async fn wait(
        &mut self,
        secs: u64,
        what: &str,
        ok: impl Fn(&LeaseState) -> bool,
    ) -> LeaseState {
        let deadline = tokio::time::sleep(Duration::from_secs(secs));
        tokio::pin!(deadline);
        loop {
            if ok(&self.state.borrow_and_update()) {
                return self.state.borrow().clone();
            }
            tokio::select! {
                _ = &mut deadline => panic!("timed out waiting for {what}; state: {:?}", *self.state.borrow()),
                r = self.state.changed() => r.unwrap(),
            }
        }
    }

    /// Stops the manager and waits for it.
    pub async fn stop(self) {
        self.cancel.cancel();
        self.task.await.unwrap();
    }
}
