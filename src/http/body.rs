//! Request bodies on their way to a guest:
//!
//! - **size**: more than `max-request-body-size` fails the body (413 when
//!   the guest has not answered yet);
//! - **slow senders**: no data for `client-body-timeout` while waiting for
//!   it, or, past that time, less than `client-body-min-rate` bytes per
//!   second of waiting on average, fails the body (408, connection
//!   closed). Only time spent waiting on the client counts, not time the
//!   guest takes to read;
//! - **buffering**: [`read_ahead`] receives up to `client-body-buffer-size`
//!   before the request is dispatched, so a slow sender holds a buffer
//!   (taken from the memory budget) rather than an admission slot and a
//!   guest instance.

use super::limits::{Conn, HttpStats};
use crate::engine::budget::{Held, MemoryBudget};
use bytes::Bytes;
use http_body::{Body as _, Frame};
use hyper::body::Incoming;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::time::Sleep;
use wasmtime_wasi_http::Error;

/// How a request body went, read by the front once the guest answered.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Went over `max-request-body-size`.
    pub exceeded: AtomicBool,
    /// Arrived too slowly.
    pub timed_out: AtomicBool,
    /// Failed in any way (also malformed framing, a client gone): a
    /// response already started must not look complete.
    pub failed: Arc<AtomicBool>,
    /// Body bytes received (for the access log).
    pub received: AtomicU64,
}

/// The limits a [`ClientBody`] enforces.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    pub max_size: u64,
    pub timeout: Duration,
    /// Bytes per second; 0 for none.
    pub min_rate: u64,
}

/// A request body from a client, with its size and time limits.
pub struct ClientBody {
    inner: Incoming,
    remaining: u64,
    limits: BodyLimits,
    outcome: Arc<Outcome>,
    stats: Arc<HttpStats>,
    /// Told when the body has all arrived.
    conn: Arc<Conn>,
    received: u64,
    /// Time spent waiting for the client, before the current wait.
    waited: Duration,
    waiting_since: Option<Instant>,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl ClientBody {
    pub fn new(
        inner: Incoming,
        limits: BodyLimits,
        outcome: Arc<Outcome>,
        stats: Arc<HttpStats>,
        conn: Arc<Conn>,
    ) -> ClientBody {
        if inner.is_end_stream() {
            conn.body_ended();
        }
        ClientBody {
            inner,
            remaining: limits.max_size,
            limits,
            outcome,
            stats,
            conn,
            received: 0,
            waited: Duration::ZERO,
            waiting_since: None,
            sleep: None,
        }
    }

    fn fail(&self, e: Error) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        self.outcome.failed.store(true, Relaxed);
        Poll::Ready(Some(Err(e)))
    }

    /// When the current wait for the client runs out.
    fn deadline(&self, since: Instant) -> Instant {
        let mut deadline = since + self.limits.timeout;
        if self.limits.min_rate > 0 {
            let earned =
                Duration::from_secs_f64(self.received as f64 / self.limits.min_rate as f64);
            let allowed = (self.limits.timeout + earned).saturating_sub(self.waited);
            deadline = deadline.min(since + allowed);
        }
        deadline
    }
}

impl http_body::Body for ClientBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(since) = this.waiting_since.take() {
                    this.waited += since.elapsed();
                }
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > this.remaining {
                        this.remaining = 0;
                        this.outcome.exceeded.store(true, Relaxed);
                        return this.fail(Error::HttpRequestBodySize(Some(this.limits.max_size)));
                    }
                    this.remaining -= n;
                    this.received += n;
                    this.outcome.received.fetch_add(n, Relaxed);
                }
                if this.inner.is_end_stream() {
                    this.conn.body_ended();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => this.fail(e.into()),
            Poll::Ready(None) => {
                this.conn.body_ended();
                Poll::Ready(None)
            }
            Poll::Pending => {
                let since = *this.waiting_since.get_or_insert_with(Instant::now);
                let deadline = tokio::time::Instant::from_std(this.deadline(since));
                let sleep = match &mut this.sleep {
                    Some(s) => {
                        if s.deadline() != deadline {
                            s.as_mut().reset(deadline);
                        }
                        s
                    }
                    None => this
                        .sleep
                        .insert(Box::pin(tokio::time::sleep_until(deadline))),
                };
                if sleep.as_mut().poll(cx).is_ready() {
                    this.outcome.timed_out.store(true, Relaxed);
                    this.stats.body_timeouts.fetch_add(1, Relaxed);
                    return this.fail(Error::ConnectionReadTimeout);
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A body whose first frames were received ahead of dispatch; the bytes
/// they hold are taken from the memory budget until the guest reads them.
pub struct Buffered {
    frames: VecDeque<Frame<Bytes>>,
    /// The rest, if the body had not ended.
    rest: Option<ClientBody>,
    held: Held,
}

impl http_body::Body for Buffered {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        if let Some(frame) = this.frames.pop_front() {
            if let Some(d) = frame.data_ref() {
                this.held.shrink(d.len() as u64);
            }
            return Poll::Ready(Some(Ok(frame)));
        }
        match &mut this.rest {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty() && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let buffered: u64 = self
            .frames
            .iter()
            .filter_map(|f| f.data_ref().map(|d| d.len() as u64))
            .sum();
        match &self.rest {
            None => http_body::SizeHint::with_exact(buffered),
            Some(r) => {
                let h = r.size_hint();
                let mut out = http_body::SizeHint::new();
                out.set_lower(h.lower() + buffered);
                if let Some(u) = h.upper() {
                    out.set_upper(u + buffered);
                }
                out
            }
        }
    }
}

/// Why [`read_ahead`] gave up.
#[derive(Debug)]
pub enum ReadAheadError {
    /// The body failed (see the [`Outcome`] for how).
    Body(Error),
    /// The memory budget cannot hold the buffer.
    Budget,
}

/// Receives frames of `body` until it ends or `limit` bytes arrived.
pub async fn read_ahead(
    mut body: ClientBody,
    limit: u64,
    budget: Arc<MemoryBudget>,
) -> Result<Buffered, ReadAheadError> {
    let mut held = Held::new(budget);
    let mut frames = VecDeque::new();
    let mut got = 0u64;
    while got < limit && !body.is_end_stream() {
        match std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            None => {
                return Ok(Buffered {
                    frames,
                    rest: None,
                    held,
                });
            }
            Some(Err(e)) => return Err(ReadAheadError::Body(e)),
            Some(Ok(frame)) => {
                if let Some(d) = frame.data_ref() {
                    let n = d.len() as u64;
                    if !held.grow(n) {
                        return Err(ReadAheadError::Budget);
                    }
                    got += n;
                }
                frames.push_back(frame);
            }
        }
    }
    let rest = (!body.is_end_stream()).then_some(body);
    Ok(Buffered { frames, rest, held })
}
