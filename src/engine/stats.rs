//! Live counters of a pool, read by the service (STATUS=, metrics) and the
//! C API. All relaxed atomics: each figure is exact, their combination is a
//! snapshot taken without a lock.

use crate::config::Knobs;
use crate::engine::budget::{self, MemoryBudget};
use crate::error::ConfigError;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// What outlives one pool: the counters and the memory budget. A service
/// keeps one across reloads (its counters never go backwards, and guests
/// of the old and the new pool draw on one budget).
#[derive(Debug, Clone)]
pub struct Shared {
    pub stats: Arc<Stats>,
    pub budget: Arc<MemoryBudget>,
    /// Whether [`Shared::apply`] ran (it logs the budget the first time).
    applied: Arc<std::sync::atomic::AtomicBool>,
}

/// What the process needs besides its guests under `knobs`.
fn base(knobs: &Knobs) -> u64 {
    budget::process_base(crate::engine::component::warm_slots(knobs).bytes())
}

impl Shared {
    /// Counters from zero and the budget the knobs ask for, as far as it
    /// can be known before a component is loaded (see [`Shared::apply`]).
    pub fn new(knobs: &Knobs) -> Result<Shared, ConfigError> {
        let (limit, _) = budget::resolve(knobs.memory_budget, base(knobs))?;
        Ok(Shared {
            stats: Arc::default(),
            budget: Arc::new(MemoryBudget::new(limit)),
            applied: Arc::default(),
        })
    }

    /// Sets the budget the knobs ask for, now that the process holds its
    /// component (an automatic budget leaves the process what it uses).
    /// Called once a component is loaded, and again on every reload.
    pub fn apply(&self, knobs: &Knobs) -> Result<(), ConfigError> {
        let (limit, how) = budget::resolve(knobs.memory_budget, base(knobs))?;
        if limit != self.budget.limit() || !self.applied.swap(true, Relaxed) {
            tracing::info!("memory budget {how}");
            self.budget.set_limit(limit);
        }
        Ok(())
    }
}

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
