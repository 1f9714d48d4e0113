//! Pending device waits of the agent: an attach that names its device by identity (or asks to
//! wait for its path) registers here *before* the present devices are enumerated, and is woken
//! by the first matching udev add/change event; a wait that ends (timeout, dropped request)
//! unregisters itself.

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::oneshot;

use crate::request::Selector;
use crate::udev::BlockDevice;

/// What a pending attach waits for.
#[derive(Debug, Clone)]
pub(crate) enum Want {
    Selector(Selector),
    /// A `device_path` request with `wait_for_device`: the path (node or udev link).
    Path(PathBuf),
}

impl Want {
    pub(crate) fn matches(&self, d: &BlockDevice) -> bool {
        match self {
            Want::Selector(s) => d.matches(s),
            Want::Path(p) => d.is_path(p),
        }
    }
}

struct Waiter {
    id: u64,
    want: Want,
    tx: oneshot::Sender<BlockDevice>,
}

/// The agent's udev state: pending waits and whether the monitor runs.
#[derive(Default)]
pub struct Waiters {
    monitor_running: AtomicBool,
    waiters: Mutex<Vec<Waiter>>,
    next_id: AtomicU64,
}

/// A pending wait; unregistered when dropped.
pub(crate) struct Registration<'a> {
    devices: &'a Waiters,
    id: u64,
    pub(crate) rx: oneshot::Receiver<BlockDevice>,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.devices.unregister(self.id);
    }
}

impl Waiters {
    pub(crate) fn register(&self, want: Want) -> Registration<'_> {
        let (tx, rx) = oneshot::channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().push(Waiter { id, want, tx });
        Registration {
            devices: self,
            id,
            rx,
        }
    }

    fn unregister(&self, id: u64) {
        self.lock().retain(|w| w.id != id);
    }

    /// Wake every waiter the device satisfies (add/change events).
    pub(crate) fn notify(&self, d: &BlockDevice) {
        let mut waiters = self.lock();
        let (hit, keep): (Vec<Waiter>, Vec<Waiter>) =
            waiters.drain(..).partition(|w| w.want.matches(d));
        *waiters = keep;
        for w in hit {
            let _ = w.tx.send(d.clone());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Waiter>> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn monitor_running(&self) -> bool {
        self.monitor_running.load(Ordering::SeqCst)
    }

    /// The udev monitor is (not) listening: waits are refused when it is not.
    pub fn set_monitor_running(&self, running: bool) {
        self.monitor_running.store(running, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::udev::device::luks_test_device as luks_dev;

    #[tokio::test]
    async fn waiters_are_woken_only_by_matching_devices() {
        let d = Waiters::default();
        let u = "3f0c2a52-1d7e-4f49-9a3c-0b6c8e2d1f55";
        let mut w = d.register(Want::Selector(Selector::LuksUuid(u.into())));
        let mut w_path = d.register(Want::Path("/dev/sdz".into()));
        d.notify(&luks_dev("00000000-0000-0000-0000-000000000000"));
        assert!(w.rx.try_recv().is_err(), "woken by another UUID");
        assert!(
            w_path.rx.try_recv().is_ok(),
            "path waiter woken by its node"
        );
        assert_eq!(d.lock().len(), 1, "only the woken waiter is removed");
        d.notify(&luks_dev(u));
        assert_eq!(
            (&mut w.rx).await.unwrap().devnode.as_deref(),
            Some("/dev/sdz".as_ref())
        );
        assert!(d.lock().is_empty(), "woken waiters are removed");
        drop((w, w_path));
        // A wait that ends without a device (timeout, dropped request) leaves nothing behind.
        let w = d.register(Want::Path("/dev/x".into()));
        assert_eq!(d.lock().len(), 1);
        drop(w);
        assert!(d.lock().is_empty());
    }
}
