//! What wasmpool says about itself: the log, the access log and the
//! metrics, in one place that the engine, the HTTP front and the service
//! report to and that reads none of them back.
//!
//! - [`logging`]: the process's log output (human, journal or JSON);
//! - [`access`]: the access log, formatted per thread and written in
//!   batches to stderr or a file;
//! - [`metrics`]: the Prometheus registry, reading [`HttpStats`] and the
//!   engine's counters when scraped.

pub mod access;
pub mod logging;
pub mod metrics;
pub mod trace;

use std::sync::atomic::AtomicU64;

/// Counters of the defences, for metrics and tests.
#[derive(Debug, Default)]
pub struct HttpStats {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Connections open now.
    pub connections_open: AtomicU64,
    /// Idle connections closed to make room for new ones.
    pub evicted: AtomicU64,
    /// Connections refused because their client had too many open.
    pub refused_per_client: AtomicU64,
    /// Requests refused (429) because their client had too many in flight.
    pub requests_refused_per_client: AtomicU64,
    /// Connections closed because a request head did not arrive in time.
    pub header_timeouts: AtomicU64,
    /// Requests ended (408) because their body arrived too slowly.
    pub body_timeouts: AtomicU64,
    /// Connections closed because the client read a response too slowly.
    pub send_timeouts: AtomicU64,
    /// Idle keep-alive connections closed after `keepalive-timeout`.
    pub keepalive_closes: AtomicU64,
    /// TLS handshakes that failed (or timed out).
    pub tls_failures: AtomicU64,
}
