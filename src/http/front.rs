//! One request through the front: per-client request limit, body limits
//! and read-ahead, the pool, and the mapping of failures to statuses. The
//! pool behind it can be swapped while serving (reload).

use super::body::{self, BodyLimits, ClientBody, Outcome, ReadAheadError};
use super::limits::{Conn, HttpStats, RequestGuard};
use super::listener::Peer;
use super::response::{AccessRecord, Body};
use super::tls::Tls;
use crate::engine::{Pool, RequestError, ResponseBody};
use crate::telemetry::metrics::Metrics;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// A response body before it is tied to its connection: the guest's, or
/// one of the front's own answers.
type Inner = Either<ResponseBody, Full<Bytes>>;

/// Serves requests with whatever pool is current.
pub struct Front {
    pool: ArcSwap<Pool>,
    metrics: Option<Arc<Metrics>>,
    stats: Arc<HttpStats>,
    activity: Activity,
    /// The TLS of the listeners that serve it.
    tls: OnceLock<Arc<Tls>>,
    /// Whether every request gets an access log line.
    access_log: AtomicBool,
    /// Set when shutdown begins: HTTP/1 responses say `Connection: close`,
    /// so clients holding keep-alive connections (through an L4 balancer
    /// or kube-proxy) open their next one elsewhere.
    shutting_down: AtomicBool,
}

/// Open connections and the time a connection last opened or closed,
/// for exiting when idle.
pub struct Activity {
    connections: AtomicUsize,
    epoch: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            connections: AtomicUsize::new(0),
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        self.last_ms
            .store(self.epoch.elapsed().as_millis() as u64, Relaxed);
    }

    /// Open connections now.
    pub fn connections(&self) -> usize {
        self.connections.load(Relaxed)
    }

    /// Time since a connection opened or closed.
    pub fn idle_for(&self) -> Duration {
        self.epoch
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last_ms.load(Relaxed)))
    }
}

/// Counts a connection in [`Activity`] while it is open.
pub(crate) struct ActivityGuard(Arc<Front>);

impl ActivityGuard {
    pub(crate) fn new(front: Arc<Front>) -> ActivityGuard {
        front.activity.connections.fetch_add(1, Relaxed);
        front.activity.touch();
        ActivityGuard(front)
    }
}

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        self.0.activity.connections.fetch_sub(1, Relaxed);
        self.0.activity.touch();
    }
}

impl Front {
    pub fn new(pool: Arc<Pool>) -> Arc<Front> {
        Front::with_metrics(pool, None)
    }

    /// A front that records every answer in `metrics`.
    pub fn with_metrics(pool: Arc<Pool>, metrics: Option<Arc<Metrics>>) -> Arc<Front> {
        let stats = metrics
            .as_ref()
            .map(|m| m.http_stats().clone())
            .unwrap_or_default();
        Arc::new(Front {
            pool: ArcSwap::new(pool),
            metrics,
            stats,
            activity: Activity::new(),
            tls: OnceLock::new(),
            access_log: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
        })
    }

    /// Sets the TLS that listeners marked TLS serve (once).
    pub fn set_tls(&self, tls: Arc<Tls>) {
        let _ = self.tls.set(tls);
    }

    pub fn tls(&self) -> Option<&Arc<Tls>> {
        self.tls.get()
    }

    /// Turns the access log (one line per request, target `access`) on or
    /// off.
    pub fn set_access_log(&self, on: bool) {
        self.access_log.store(on, Relaxed);
    }

    /// From now on every HTTP/1 response closes its connection (the
    /// shutdown delay: still serving, but moving clients elsewhere).
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Relaxed);
    }

    pub fn activity(&self) -> &Activity {
        &self.activity
    }

    /// Counters of the HTTP defences.
    pub fn http_stats(&self) -> &Arc<HttpStats> {
        &self.stats
    }

    /// The pool new requests go to.
    pub fn pool(&self) -> Arc<Pool> {
        self.pool.load_full()
    }

    /// Makes `pool` serve new requests; requests already running finish on
    /// the pool they started on. Returns the previous pool.
    pub fn swap(&self, pool: Arc<Pool>) -> Arc<Pool> {
        self.pool.swap(pool)
    }

    /// Handles one request that `guard` let in.
    ///
    /// Requests do not touch [`Activity`]: they run on open connections,
    /// and idleness is only ever judged with none open (the last one to
    /// close records the time).
    pub async fn handle(
        &self,
        mut req: http::Request<Incoming>,
        guard: RequestGuard,
    ) -> Response<Body> {
        let peer = guard.conn().peer;
        let trace = crate::telemetry::trace::begin(
            &mut req,
            match peer {
                Peer::Tcp(a) => Some(a),
                Peer::Unix => None,
            },
        );
        let logging = self.access_logging();
        let recording = trace.as_ref().is_some_and(|t| t.recording());
        let start = (logging || recording || self.metrics.is_some()).then(Instant::now);
        let http1 = req.version() <= http::Version::HTTP_11;
        let pool = self.pool();
        let outcome = Arc::new(Outcome::default());
        let access = match start {
            Some(start) if logging || recording => Some(AccessRecord::new(
                &req,
                peer,
                start,
                outcome.clone(),
                logging,
                trace,
            )),
            _ => None,
        };
        let (response, unread) = match refusal_on_head(pool.knobs(), &req) {
            Some((r, keep_body)) => (r, keep_body.then(|| req.into_body())),
            None => {
                let conn = guard.conn().clone();
                (guarded(self.respond(&pool, req, outcome, conn)).await, None)
            }
        };
        if let (Some(m), Some(start)) = (&self.metrics, start) {
            m.observe(response.status(), start.elapsed());
        }
        let mut response = response.map(|b| match b {
            Either::Left(guest) => {
                let conn = guard.conn().clone();
                Body::guest(
                    guest,
                    guard,
                    &conn,
                    pool.knobs().response_buffer_size,
                    pool.budget().clone(),
                )
            }
            Either::Right(own) => Body::own(own, guard, pool.budget()),
        });
        if let Some(unread) = unread {
            response.body_mut().keep_unread(unread);
        }
        if http1 && self.shutting_down.load(Relaxed) {
            response = closing(response);
        }
        if let Some(mut record) = access {
            record.answered(&response);
            response.body_mut().log_when_done(record);
        }
        response
    }

    /// Whether this request gets an access log line: the knob is on and
    /// the log filter lets the line through (`WASMPOOL_LOG=warn` drops
    /// it, so the record is not worth building).
    fn access_logging(&self) -> bool {
        self.access_log.load(Relaxed)
            && (crate::telemetry::access::to_file()
                || tracing::enabled!(target: "access", tracing::Level::INFO))
    }

    /// The answer to a request its client may not send now (it has
    /// `max-requests-per-client` in flight).
    pub fn too_many_requests(
        &self,
        req: &http::Request<Incoming>,
        guard: RequestGuard,
    ) -> Response<Body> {
        let r = retry_later(plain(
            StatusCode::TOO_MANY_REQUESTS,
            "too many requests in flight from this client",
        ));
        if let Some(m) = &self.metrics {
            m.observe(r.status(), Duration::ZERO);
        }
        let peer = guard.conn().peer;
        let budget = self.pool().budget().clone();
        let mut r = r.map(|b| Body::own(b, guard, &budget));
        if self.access_logging() {
            let mut record =
                AccessRecord::new(req, peer, Instant::now(), Arc::default(), true, None);
            record.answered(&r);
            r.body_mut().log_when_done(record);
        }
        r
    }

    async fn respond(
        &self,
        pool: &Arc<Pool>,
        req: http::Request<Incoming>,
        outcome: Arc<Outcome>,
        conn: Arc<Conn>,
    ) -> Response<Inner> {
        let knobs = pool.knobs();
        let limit = knobs.max_request_body_size;
        let limits = BodyLimits {
            max_size: limit,
            timeout: knobs.client_body_timeout,
            min_rate: knobs.client_body_min_rate,
        };
        let (parts, body) = req.into_parts();
        let body = ClientBody::new(body, limits, outcome.clone(), self.stats.clone(), conn);
        let body = if http_body::Body::is_end_stream(&body) || knobs.client_body_buffer_size == 0 {
            body.boxed_unsync()
        } else {
            let budget = pool.budget().clone();
            // Boxed (only requests with a body pay for it): it would add
            // its size to every request's future.
            let read = Box::pin(body::read_ahead(
                body,
                knobs.client_body_buffer_size,
                budget,
            ));
            match read.await {
                Ok(buffered) => buffered.boxed_unsync(),
                Err(ReadAheadError::Body(_)) => return body_failure(&outcome),
                Err(ReadAheadError::Budget) => {
                    return closing(retry_later(error_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "server overloaded: the memory budget is spent",
                    )));
                }
            }
        };
        let (method, uri) = (parts.method.clone(), parts.uri.clone());
        let request = http::Request::from_parts(parts, body);
        let trace = crate::telemetry::trace::of(&request);
        let result = pool.handle(request).await;
        if outcome.failed.load(Relaxed) {
            return body_failure(&outcome);
        }
        match result {
            // The head went out before the body failed (crossed the limit,
            // arrived too slowly or turned out malformed): if it fails
            // later, the response is cut off instead of ending as if
            // complete.
            Ok(resp) => resp.map(|b| Either::Left(b.abort_when(outcome.failed.clone()))),
            Err(e) => {
                if let Some(t) = &trace {
                    t.failed(e.to_string());
                }
                // The log line joins the request's trace, when it has one.
                let trace_id = trace.as_ref().map(|t| t.context().trace_id_hex());
                let trace_id = trace_id.as_deref();
                match &e {
                    RequestError::Rejected(_) => tracing::debug!(%method, %uri, trace_id, "{e}"),
                    _ => tracing::warn!(%method, %uri, trace_id, "{e}"),
                }
                let r = error_response(e.status(), &e.to_string());
                if e.status() == StatusCode::SERVICE_UNAVAILABLE {
                    retry_later(r)
                } else {
                    r
                }
            }
        }
    }
}

/// The answers given on the head alone, before any of the body is read:
/// 431 for too many header fields (HTTP/1 refuses these while parsing;
/// HTTP/2 hands them over) and 413 for a declared length over the limit.
/// `true` with the 413: the body is kept unread as long as the response
/// (on HTTP/2 dropping it resets the stream, and a reset before the
/// response has gone out loses the response), then discarded.
fn refusal_on_head(
    knobs: &crate::config::Knobs,
    req: &http::Request<Incoming>,
) -> Option<(Response<Inner>, bool)> {
    if req.headers().len() > knobs.max_request_headers as usize {
        return Some((
            closing(error_response(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "too many header fields",
            )),
            false,
        ));
    }
    let limit = knobs.max_request_body_size;
    let len = declared_length(req).filter(|len| *len > limit)?;
    tracing::debug!(len, limit, "request body too large (content-length)");
    Some((body_too_large(), true))
}

fn declared_length(req: &http::Request<Incoming>) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The answer to a request whose body failed before the guest answered:
/// 413 (too large), 408 (too slow) or 400 (malformed, or the client went
/// away). The rest of the body is not read, so the connection is closed.
fn body_failure(outcome: &Outcome) -> Response<Inner> {
    if outcome.exceeded.load(Relaxed) {
        body_too_large()
    } else if outcome.timed_out.load(Relaxed) {
        closing(error_response(
            StatusCode::REQUEST_TIMEOUT,
            "request body not received in time",
        ))
    } else {
        closing(error_response(
            StatusCode::BAD_REQUEST,
            "malformed request body",
        ))
    }
}

/// 413; the rest of the body is not read, so the connection is closed.
fn body_too_large() -> Response<Inner> {
    closing(error_response(
        StatusCode::PAYLOAD_TOO_LARGE,
        "request body too large",
    ))
}

/// The response ends the connection (what follows on it cannot be trusted
/// or is not read).
fn closing<B>(mut r: Response<B>) -> Response<B> {
    r.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    r
}

/// Tells the client when to try again.
fn retry_later<B>(mut r: Response<B>) -> Response<B> {
    r.headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    r
}

/// Runs a request's handling; a panic in it (a host bug) becomes a 500
/// for that request instead of a dropped connection.
///
/// A combinator, not an `async fn`: an `async fn` would hold `f` beside
/// the future it awaits, doubling every request's future (which hyper
/// moves several times).
fn guarded(f: impl Future<Output = Response<Inner>>) -> impl Future<Output = Response<Inner>> {
    use futures::FutureExt as _;
    std::panic::AssertUnwindSafe(f)
        .catch_unwind()
        .map(|r| match r {
            Ok(r) => r,
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                tracing::error!("panic while handling a request: {msg}");
                closing(error_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error",
                ))
            }
        })
}

/// A plain-text error response.
pub fn error_response(status: StatusCode, message: &str) -> Response<Inner> {
    plain(status, message).map(Either::Right)
}

/// `STATUS REASON: message` as text.
fn plain(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let text = format!(
        "{} {}: {message}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(text)))
        .expect("static response parts are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_while_handling_becomes_a_500() {
        let r = guarded(async { panic!("host bug") }).await;
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(r.headers()[header::CONNECTION], "close");
        let r = guarded(async { error_response(StatusCode::OK, "fine") }).await;
        assert_eq!(r.status(), StatusCode::OK);
    }
}
