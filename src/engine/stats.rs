//! Live counters of a pool, read by the service (STATUS=, metrics) and the
//! C API. All relaxed atomics: each figure is exact, their combination is a
//! snapshot taken without a lock.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Debug, Default)]
pub struct Stats {
    /// Requests that reached the pool (admitted or not).
    pub requests: AtomicU64,
    /// Requests answered by the guest with a response head.
    pub responses: AtomicU64,
    /// Requests that ended in an error (503, 504, 500 ...).
    pub failed: AtomicU64,
    /// Refused by backpressure (queue full or queue wait exceeded).
    pub rejected: AtomicU64,
    /// Requests that hit `request-timeout`.
    pub timeouts: AtomicU64,
    /// Instances that ended with a trap or a host panic.
    pub traps: AtomicU64,
    /// Instantiations that failed.
    pub instantiation_failures: AtomicU64,
    /// Instances alive now.
    pub instances_live: AtomicU64,
    /// Instances created so far.
    pub instances_created: AtomicU64,
    /// Requests served by an instance that had served one before.
    pub instances_reused: AtomicU64,
    /// Highest number of instances alive at once.
    pub instances_peak: AtomicU64,
    /// Requests waiting in the admission queue now.
    pub queued: AtomicU64,
    /// Requests admitted and not finished now.
    pub in_flight: AtomicU64,
    /// Successful reloads.
    pub reloads: AtomicU64,
    /// Reloads that failed (the previous component kept serving).
    pub reload_failures: AtomicU64,
    /// Requests sent again to a fresh instance after failing on a reused
    /// one (`reuse = auto`).
    pub retries: AtomicU64,
    /// Times `reuse = auto` turned reuse off for a component.
    pub reuse_fallbacks: AtomicU64,
}

/// A plain copy of [`Stats`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub requests: u64,
    pub responses: u64,
    pub failed: u64,
    pub rejected: u64,
    pub timeouts: u64,
    pub traps: u64,
    pub instantiation_failures: u64,
    pub instances_live: u64,
    pub instances_created: u64,
    pub instances_reused: u64,
    pub instances_peak: u64,
    pub queued: u64,
    pub in_flight: u64,
    pub reloads: u64,
    pub reload_failures: u64,
    pub retries: u64,
    pub reuse_fallbacks: u64,
}

impl Stats {
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            requests: self.requests.load(Relaxed),
            responses: self.responses.load(Relaxed),
            failed: self.failed.load(Relaxed),
            rejected: self.rejected.load(Relaxed),
            timeouts: self.timeouts.load(Relaxed),
            traps: self.traps.load(Relaxed),
            instantiation_failures: self.instantiation_failures.load(Relaxed),
            instances_live: self.instances_live.load(Relaxed),
            instances_created: self.instances_created.load(Relaxed),
            instances_reused: self.instances_reused.load(Relaxed),
            instances_peak: self.instances_peak.load(Relaxed),
            queued: self.queued.load(Relaxed),
            in_flight: self.in_flight.load(Relaxed),
            reloads: self.reloads.load(Relaxed),
            reload_failures: self.reload_failures.load(Relaxed),
            retries: self.retries.load(Relaxed),
            reuse_fallbacks: self.reuse_fallbacks.load(Relaxed),
        }
    }

    pub(crate) fn instance_started(&self) {
        self.instances_created.fetch_add(1, Relaxed);
        let live = self.instances_live.fetch_add(1, Relaxed) + 1;
        self.instances_peak.fetch_max(live, Relaxed);
    }
}
