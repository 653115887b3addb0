//! Backpressure in front of the pool: at most `max-concurrent-requests`
//! requests run; up to `max-queued-requests` more wait (in arrival order) for
//! at most `max-queue-wait`; the rest are refused at once. Nothing piles up
//! without bound.

use crate::engine::stats::Stats;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("server overloaded: the request queue is full")]
    QueueFull,
    #[error("server overloaded: no slot became free within the queue wait")]
    QueueTimeout,
    #[error("server is shutting down")]
    Closed,
    /// Raised where an instance would be made (see `budget`).
    #[error("server overloaded: the memory budget stayed spent for the queue wait")]
    MemoryBudget,
}

pub struct Admission {
    slots: Arc<Semaphore>,
    queued: AtomicU32,
    max_queued: u32,
    max_wait: Duration,
    stats: Arc<Stats>,
}

/// Held while a request runs (including while its response body streams).
pub struct Permit {
    _slot: OwnedSemaphorePermit,
    stats: Arc<Stats>,
    /// The request waited in the queue for its slot.
    pub waited: bool,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.stats.in_flight.fetch_sub(1, Relaxed);
    }
}

/// Keeps the queue length right even when the waiting future is dropped
/// (client gone, timeout).
struct QueuedGuard<'a>(&'a Admission);

impl Drop for QueuedGuard<'_> {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Relaxed);
        self.0.stats.queued.fetch_sub(1, Relaxed);
    }
}

impl Admission {
    pub fn new(
        max_concurrent: u32,
        max_queued: u32,
        max_wait: Duration,
        stats: Arc<Stats>,
    ) -> Admission {
        Admission {
            slots: Arc::new(Semaphore::new(max_concurrent as usize)),
            queued: AtomicU32::new(0),
            max_queued,
            max_wait,
            stats,
        }
    }

    fn permit(&self, slot: OwnedSemaphorePermit, waited: bool) -> Permit {
        self.stats.in_flight.fetch_add(1, Relaxed);
        Permit {
            _slot: slot,
            stats: self.stats.clone(),
            waited,
        }
    }

    /// Waits for a slot, within the bounds above.
    pub async fn admit(&self) -> Result<Permit, Rejection> {
        match self.slots.clone().try_acquire_owned() {
            Ok(slot) => return Ok(self.permit(slot, false)),
            Err(TryAcquireError::Closed) => return Err(Rejection::Closed),
            Err(TryAcquireError::NoPermits) => {}
        }
        // Reserve a place in the queue, or refuse at once when it is full.
        let reserved = self
            .queued
            .fetch_update(Relaxed, Relaxed, |q| (q < self.max_queued).then_some(q + 1))
            .is_ok();
        if !reserved {
            return Err(Rejection::QueueFull);
        }
        self.stats.queued.fetch_add(1, Relaxed);
        let _guard = QueuedGuard(self);
        match tokio::time::timeout(self.max_wait, self.slots.clone().acquire_owned()).await {
            Ok(Ok(slot)) => Ok(self.permit(slot, true)),
            Ok(Err(_)) => Err(Rejection::Closed),
            Err(_) => Err(Rejection::QueueTimeout),
        }
    }

    /// Refuses every later request; running ones finish.
    pub fn close(&self) {
        self.slots.close();
    }
}
