//! Idle instances of one pool, kept for later requests and retired after
//! `idle-instance-timeout` (or sooner, when the memory budget needs room).
//! Both dispatch paths ([`super::p2`], [`super::p3`]) park their instances
//! here between requests.

use std::sync::Arc;
use std::sync::{Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// What an idle list holds: an instance with its store.
pub(crate) trait Parked: Send + 'static {
    fn id(&self) -> u64;
    /// Requests it has taken.
    fn served(&self) -> u64;
}

/// Idle instances of one pool, most recently used last.
pub(crate) struct Idle<L> {
    list: Mutex<Vec<(L, Instant)>>,
    reaper: OnceLock<()>,
}

impl<L: Parked> Idle<L> {
    /// The most recently used idle instance, if any.
    pub fn take(&self) -> Option<L> {
        self.list.lock().unwrap().pop().map(|(live, _)| live)
    }

    /// Keeps `live` for another request. Needs a tokio runtime (the first
    /// call starts the task that retires instances idle for `idle_timeout`).
    pub fn put(self: &Arc<Self>, live: L, idle_timeout: Duration) {
        self.list.lock().unwrap().push((live, Instant::now()));
        self.reaper
            .get_or_init(|| spawn_reaper(Arc::downgrade(self), idle_timeout));
    }

    /// Keeps `live` as [`Idle::put`] does, unless an instance is idle
    /// already: then gives it back.
    pub fn put_if_none(self: &Arc<Self>, live: L, idle_timeout: Duration) -> Option<L> {
        if !self.list.lock().unwrap().is_empty() {
            return Some(live);
        }
        self.put(live, idle_timeout);
        None
    }

    /// Drops the instance idle longest; false if there is none.
    pub fn drop_oldest(&self) -> bool {
        let mut list = self.list.lock().unwrap();
        if list.is_empty() {
            return false;
        }
        let (live, _) = list.remove(0);
        drop(list);
        tracing::debug!(instance = live.id(), "idle instance dropped to free memory");
        drop(live);
        true
    }

    /// Drops every idle instance (their component stops being reused).
    pub fn clear(&self) {
        let gone = std::mem::take(&mut *self.list.lock().unwrap());
        drop(gone);
    }

    /// Drops the instances idle for at least `timeout`; they are the oldest,
    /// at the front.
    fn expire(&self, timeout: Duration) {
        let gone: Vec<_> = {
            let mut list = self.list.lock().unwrap();
            let keep_from = list
                .iter()
                .position(|(_, since)| since.elapsed() < timeout)
                .unwrap_or(list.len());
            list.drain(..keep_from).collect()
        };
        for (live, _) in gone {
            tracing::debug!(
                instance = live.id(),
                served = live.served(),
                "idle instance retired"
            );
        }
    }
}

impl<L: Parked> crate::engine::budget::Reclaim for Idle<L> {
    fn reclaim_one(&self) -> bool {
        self.drop_oldest()
    }
}

fn spawn_reaper<L: Parked>(idle: Weak<Idle<L>>, timeout: Duration) {
    let period = (timeout / 4).clamp(Duration::from_millis(5), Duration::from_secs(1));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(period).await;
            let Some(idle) = idle.upgrade() else { return };
            idle.expire(timeout);
        }
    });
}

impl<L> Default for Idle<L> {
    fn default() -> Self {
        Idle {
            list: Mutex::default(),
            reaper: OnceLock::new(),
        }
    }
}
