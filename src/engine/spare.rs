//! Keeps WASIp3 instances few: a new instance only when the live ones
//! cannot take the requests in flight.
//!
//! The dispatcher ([`super::p3`]) gives a request to a running instance
//! only while that instance's event loop waits on I/O and has room (it
//! advertises room once per such moment). Under a burst (say 64 requests
//! that sleep 40 ms, all answered at once) every loop is busy for a
//! moment, so without more a request would often find none advertising
//! and make an instance although the live ones could take 16 each.
//!
//! The gate decides whether a request that found no loop with room and no
//! idle instance may make one: it refuses while the instances that still
//! accept requests could hold every request in flight
//! (`ceil(in_flight / concurrent)`, with half as much room again, and never
//! fewer than one per CPU so CPU-bound guests still use them all). A
//! refused request waits for the next loop to advertise room, or
//! [`RETRY_AFTER`] at the latest, and is routed again.
//!
//! The gate applies to slow requests only: from start-up until answers
//! show otherwise (several fast ones, see [`START_ANSWER`]: a readiness
//! check answered at once must not open it for the burst behind it), and
//! while the typical time to answer is [`SLOW`] or more (mostly waiting
//! on I/O). For those an instance's busy moments are
//! short beside a request's life, so waiting for one costs little. Fast
//! requests would wait on instances as long as they run.
//!
//! Live instances may have room yet take nothing for a while (a guest
//! busy-looping until its request times out keeps its whole instance
//! busy). So a request refused for half a typical answer time (within
//! [`STARVED_MIN`]..=[`STARVED_MAX`]) makes an instance regardless: one
//! for all the requests starved in that time, so that it can take them
//! before those still starved get the next.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Longest wait before a refused request is routed again, should no loop
/// advertise room (a lost wake-up costs at most this).
pub(crate) const RETRY_AFTER: Duration = Duration::from_millis(1);

/// Shortest and longest a refused request waits before it may have a new
/// instance whatever the live ones could hold (see [`Gate::starved_after`]).
/// Measured with 64 clients of a 40 ms handler: 10 ms gave 18 to 38 peak
/// instances, 20 ms 10 to 13 at the same requests/s (on a quieter host;
/// see [`Gate::starved`] for stalls of the host).
pub(crate) const STARVED_MIN: Duration = Duration::from_millis(10);
pub(crate) const STARVED_MAX: Duration = Duration::from_millis(50);

/// Typical time to answer from which the gate applies.
pub(crate) const SLOW: Duration = Duration::from_millis(10);

/// The typical time to answer before any answer: twice [`SLOW`], so that
/// it takes six fast answers in a row to turn the gate off. It was
/// [`SLOW`] itself, and one `GET /` of a readiness check (answered in
/// microseconds) turned the gate off for the burst of slow requests that
/// followed: 64 clients of a 40 ms handler then made an instance each
/// until slow answers came back, 16 to 33 at the peak instead of 8.
pub(crate) const START_ANSWER: Duration = Duration::from_millis(20);

/// The instance was not made: live instances have room (see the module
/// documentation). Never reaches a client.
#[derive(Debug, thiserror::Error)]
#[error("live instances have spare capacity")]
pub(crate) struct Spare;

/// Shared by a pool's instantiation gate, its instances and refused requests.
#[derive(Debug)]
pub(crate) struct Gate {
    /// Requests one instance takes at once; the gate is off at 1.
    concurrent: usize,
    /// Fewest instances the gate allows before refusing.
    floor: usize,
    /// Moving average of the time to answer, in microseconds.
    answer_us: AtomicU64,
    /// Instances alive that still accept requests (or are being made).
    accepting: AtomicUsize,
    /// Refused requests waiting for capacity.
    waiting: AtomicUsize,
    /// Instances owed to starved requests, made whatever the load.
    owed: AtomicUsize,
    /// When an instance was last owed, in microseconds from `epoch`
    /// (0: never).
    last_owed_us: AtomicU64,
    epoch: Instant,
    capacity: Notify,
}

impl Gate {
    pub fn new(concurrent: usize) -> Gate {
        Gate {
            concurrent,
            floor: std::thread::available_parallelism().map_or(1, |n| n.get()),
            // On until the first answers say requests are fast: the first
            // burst of slow requests would otherwise meet an open gate.
            answer_us: AtomicU64::new(START_ANSWER.as_micros() as u64),
            accepting: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            owed: AtomicUsize::new(0),
            last_owed_us: AtomicU64::new(0),
            epoch: Instant::now(),
            capacity: Notify::new(),
        }
    }

    /// Reserves a place for a new instance, or refuses with [`Spare`].
    /// `in_flight` counts the requests admitted and not finished. A
    /// reservation is released with [`Gate::stopped_accepting`].
    pub fn reserve(&self, in_flight: usize) -> Result<(), Spare> {
        if self.concurrent <= 1 || self.answer_us.load(Relaxed) < SLOW.as_micros() as u64 {
            self.accepting.fetch_add(1, Relaxed);
            return Ok(());
        }
        // Half as much room again as the requests need: an instance that is
        // full, or busy for a moment, does not make the others wait.
        let needed = (in_flight + in_flight / 2)
            .div_ceil(self.concurrent)
            .max(self.floor);
        let granted = self
            .accepting
            .fetch_update(Relaxed, Relaxed, |n| (n < needed).then_some(n + 1))
            .is_ok()
            || (self
                .owed
                .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
                .is_ok()
                && {
                    self.accepting.fetch_add(1, Relaxed);
                    true
                });
        if granted { Ok(()) } else { Err(Spare) }
    }

    /// Like [`Gate::reserve`], as a slot that releases the reservation
    /// when stopped or dropped.
    pub fn slot(self: &std::sync::Arc<Self>, in_flight: usize) -> Result<GateSlot, Spare> {
        self.reserve(in_flight)?;
        Ok(GateSlot {
            gate: self.clone(),
            on: true,
        })
    }

    /// A request got its answer (or failed) `took` after it was sent.
    pub fn observe(&self, took: Duration) {
        let sample = took.as_micros().min(u64::MAX as u128) as u64;
        // An average over about the last 8 requests; racing updates lose
        // a sample, which does not matter.
        let old = self.answer_us.load(Relaxed);
        self.answer_us.store(old - old / 8 + sample / 8, Relaxed);
    }

    /// How long a refused request waits before [`Gate::starved`]: half
    /// the typical time to answer, within the bounds.
    pub fn starved_after(&self) -> Duration {
        (Duration::from_micros(self.answer_us.load(Relaxed)) / 2).clamp(STARVED_MIN, STARVED_MAX)
    }

    /// A request has been refused for [`Gate::starved_after`]: the next
    /// instantiation goes ahead whatever the load. One instance is owed
    /// per [`Gate::starved_after`]: requests starved together (a stall of
    /// the host, or a burst on a busy one, delays every waiting one at
    /// once, and their clocks run out one after another) get one new
    /// instance, which takes `concurrent` of them, not one each; those
    /// still starved once it had that long to take them get the next.
    /// (Owed as soon as the last one was taken, a burst of 48 slow
    /// requests on a host kept busy by two other processes made 16
    /// instances where 5 hold them.)
    pub fn starved(&self) {
        let now = self.epoch.elapsed().as_micros().min(u64::MAX as u128) as u64;
        self.starved_at(now);
    }

    fn starved_at(&self, now_us: u64) {
        let now_us = now_us.max(1);
        let window = self.starved_after().as_micros() as u64;
        let last = self.last_owed_us.load(Relaxed);
        if last != 0 && now_us.saturating_sub(last) < window {
            return;
        }
        if self
            .last_owed_us
            .compare_exchange(last, now_us, Relaxed, Relaxed)
            .is_ok()
        {
            let _ = self
                .owed
                .fetch_update(Relaxed, Relaxed, |n| (n == 0).then_some(1));
        }
    }

    /// An instance (or a reservation) stopped accepting requests; called
    /// once per reservation.
    pub fn stopped_accepting(&self) {
        self.accepting.fetch_sub(1, Relaxed);
        self.wake();
    }

    /// A running instance may take another request.
    pub fn has_room(&self) {
        self.wake();
    }

    fn wake(&self) {
        if self.waiting.load(Relaxed) > 0 {
            self.capacity.notify_waiters();
        }
    }

    /// Waits until an instance reports room (or [`RETRY_AFTER`]).
    pub async fn wait(&self) {
        self.waiting.fetch_add(1, Relaxed);
        let _ = tokio::time::timeout(RETRY_AFTER, self.capacity.notified()).await;
        self.waiting.fetch_sub(1, Relaxed);
    }
}

/// An instance's place among the accepting ones: released once, when the
/// instance stops taking requests or is dropped.
#[derive(Debug)]
pub(crate) struct GateSlot {
    gate: std::sync::Arc<Gate>,
    on: bool,
}

impl GateSlot {
    pub fn stop(&mut self) {
        if std::mem::take(&mut self.on) {
            self.gate.stopped_accepting();
        }
    }
}

impl Drop for GateSlot {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_only_while_live_instances_hold_the_requests() {
        let g = Gate {
            floor: 2,
            ..Gate::new(16)
        };
        for _ in 0..64 {
            g.observe(Duration::from_millis(40));
        }
        // The floor: two instances whatever the load.
        assert!(g.reserve(1).is_ok());
        assert!(g.reserve(1).is_ok());
        assert!(g.reserve(1).is_err());
        assert!(g.reserve(21).is_err());
        // 32 requests (and half as much room again) need three of 16.
        assert!(g.reserve(32).is_ok());
        assert!(g.reserve(32).is_err());
        // One stops accepting (reuse count reached): room for another.
        g.stopped_accepting();
        assert!(g.reserve(32).is_ok());
        // A starved request gets one instance whatever the load.
        let window = g.starved_after().as_micros() as u64;
        g.starved_at(1_000);
        assert!(g.reserve(1).is_ok());
        assert!(g.reserve(1).is_err());
        // Requests starved while that instance gets going get nothing more.
        g.starved_at(1_000 + window / 2);
        g.starved_at(1_000 + window - 1);
        assert!(g.reserve(1).is_err());
        // Requests starved together after that get one between them.
        g.starved_at(1_000 + window);
        g.starved_at(1_000 + window);
        g.starved_at(1_000 + window + 1);
        assert!(g.reserve(1).is_ok());
        assert!(g.reserve(1).is_err());
    }

    #[test]
    fn on_before_any_answer() {
        let g = Gate {
            floor: 2,
            ..Gate::new(16)
        };
        assert!(g.reserve(64).is_ok());
        for _ in 0..6 {
            let _ = g.reserve(64);
        }
        assert!(g.reserve(64).is_err(), "64 requests need 6 instances of 16");
        // A readiness check answered at once leaves it on.
        g.observe(Duration::from_micros(300));
        assert!(g.reserve(64).is_err());
        // A run of fast answers turns it off.
        for _ in 0..5 {
            g.observe(Duration::from_micros(300));
        }
        assert!(g.reserve(64).is_ok());
        // One slow answer keeps it on, then fast ones turn it off.
        let g = Gate {
            floor: 2,
            ..Gate::new(16)
        };
        g.observe(Duration::from_millis(40));
        for _ in 0..6 {
            assert!(g.reserve(64).is_ok());
        }
        assert!(g.reserve(64).is_err());
        for _ in 0..8 {
            g.observe(Duration::from_micros(300));
        }
        assert!(g.reserve(64).is_ok());
    }

    #[test]
    fn starvation_waits_half_an_answer_within_bounds() {
        let g = Gate::new(16);
        for _ in 0..64 {
            g.observe(Duration::from_millis(40));
        }
        let d = g.starved_after();
        assert!(
            d > Duration::from_millis(18) && d <= Duration::from_millis(20),
            "{d:?}"
        );
        for _ in 0..64 {
            g.observe(Duration::from_secs(5));
        }
        assert_eq!(g.starved_after(), STARVED_MAX);
        for _ in 0..64 {
            g.observe(Duration::from_micros(100));
        }
        assert_eq!(g.starved_after(), STARVED_MIN);
    }

    #[test]
    fn off_for_fast_requests() {
        let g = Gate::new(16);
        for _ in 0..64 {
            g.observe(Duration::from_micros(300));
        }
        for _ in 0..100 {
            assert!(g.reserve(16).is_ok());
        }
    }

    #[test]
    fn off_for_one_request_per_instance() {
        let g = Gate::new(1);
        for _ in 0..100 {
            assert!(g.reserve(0).is_ok());
        }
    }
}
