//! The HTTP front: listeners, connection limits, request-head limits and
//! timeouts, the body size limit, and the mapping of pool failures to
//! status codes. The pool behind it can be swapped while serving.

use crate::config::Knobs;
use crate::metrics::Metrics;
use crate::engine::pool::{Pool, RequestError, ResponseBody};
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;

/// What the server answers with.
pub type Body = Either<ResponseBody, Full<Bytes>>;

/// A listen address: `HOST:PORT`, `[V6]:PORT` or `unix:/path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::str::FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("`unix:` needs a path, e.g. unix:/run/wasmpool.sock".into());
            }
            return Ok(ListenAddr::Unix(PathBuf::from(p)));
        }
        s.parse::<SocketAddr>().map(ListenAddr::Tcp).map_err(|_| {
            format!("invalid listen address `{s}`: expected HOST:PORT (e.g. 127.0.0.1:8080, [::1]:8080) or unix:/path")
        })
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "http://{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A bound listening socket.
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

impl Listener {
    /// Binds `addr`. A stale unix socket file at the path is replaced.
    pub async fn bind(addr: &ListenAddr) -> std::io::Result<Listener> {
        match addr {
            ListenAddr::Tcp(a) => {
                let sock = if a.is_ipv4() {
                    tokio::net::TcpSocket::new_v4()?
                } else {
                    tokio::net::TcpSocket::new_v6()?
                };
                sock.set_reuseaddr(true)?;
                sock.bind(*a)?;
                Ok(Listener::Tcp(sock.listen(1024)?))
            }
            ListenAddr::Unix(p) => {
                use std::os::unix::fs::FileTypeExt;
                if let Ok(m) = std::fs::symlink_metadata(p)
                    && m.file_type().is_socket()
                {
                    std::fs::remove_file(p)?;
                }
                Ok(Listener::Unix(tokio::net::UnixListener::bind(p)?))
            }
        }
    }

    /// The address actually bound (with the real port when 0 was asked).
    pub fn local_addr(&self) -> std::io::Result<ListenAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().map(ListenAddr::Tcp),
            Listener::Unix(l) => {
                let a = l.local_addr()?;
                Ok(ListenAddr::Unix(
                    a.as_pathname().map(PathBuf::from).unwrap_or_default(),
                ))
            }
        }
    }
}

/// Serves requests with whatever pool is current.
pub struct Front {
    pool: ArcSwap<Pool>,
    metrics: Option<Arc<Metrics>>,
    activity: Activity,
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

/// Counts a connection while it is open.
struct ConnectionGuard(Arc<Front>);

impl ConnectionGuard {
    fn new(front: Arc<Front>) -> ConnectionGuard {
        front.activity.connections.fetch_add(1, Relaxed);
        front.activity.touch();
        ConnectionGuard(front)
    }
}

impl Drop for ConnectionGuard {
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
        Arc::new(Front {
            pool: ArcSwap::new(pool),
            metrics,
            activity: Activity::new(),
        })
    }

    pub fn activity(&self) -> &Activity {
        &self.activity
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

    /// Handles one request (everything but the connection handling).
    ///
    /// Requests do not touch [`Activity`]: they run on open connections,
    /// and idleness is only ever judged with none open (the last one to
    /// close records the time).
    pub async fn handle(&self, req: http::Request<Incoming>) -> Response<Body> {
        let start = self.metrics.as_ref().map(|_| Instant::now());
        let response = guarded(self.respond(req)).await;
        if let (Some(m), Some(start)) = (&self.metrics, start) {
            m.observe(response.status(), start.elapsed());
        }
        response
    }

    async fn respond(&self, req: http::Request<Incoming>) -> Response<Body> {
        let pool = self.pool();
        let knobs = pool.knobs();
        let limit = knobs.max_request_body_size;
        if let Some(len) = declared_length(&req)
            && len > limit
        {
            tracing::debug!(len, limit, "request body too large (content-length)");
            return body_too_large();
        }
        let exceeded = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicBool::new(false));
        let req = req.map(|b| {
            LimitedBody {
                inner: b,
                remaining: limit,
                limit,
                exceeded: exceeded.clone(),
                failed: failed.clone(),
            }
            .boxed_unsync()
        });
        let method = req.method().clone();
        let uri = req.uri().clone();
        let result = pool.handle(req).await;
        if exceeded.load(Relaxed) {
            return body_too_large();
        }
        if failed.load(Relaxed) {
            return closing(error_response(
                StatusCode::BAD_REQUEST,
                "malformed request body",
            ));
        }
        match result {
            // The head went out before the body failed (crossed the limit,
            // or turned out malformed): if it fails later, the response is
            // cut off instead of ending as if complete.
            Ok(resp) => resp.map(|b| Either::Left(b.abort_when(failed))),
            Err(e) => {
                match &e {
                    RequestError::Rejected(_) => tracing::debug!(%method, %uri, "{e}"),
                    _ => tracing::warn!(%method, %uri, "{e}"),
                }
                let mut r = error_response(e.status(), &e.to_string());
                if e.status() == StatusCode::SERVICE_UNAVAILABLE {
                    r.headers_mut()
                        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
                }
                r
            }
        }
    }
}

fn declared_length(req: &http::Request<Incoming>) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// 413; the rest of the body is not read, so the connection is closed.
fn body_too_large() -> Response<Body> {
    closing(error_response(
        StatusCode::PAYLOAD_TOO_LARGE,
        "request body too large",
    ))
}

/// The response ends the connection (what follows on it cannot be trusted
/// or is not read).
fn closing(mut r: Response<Body>) -> Response<Body> {
    r.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    r
}

/// Runs a request's handling; a panic in it (a host bug) becomes a 500
/// for that request instead of a dropped connection.
async fn guarded(f: impl Future<Output = Response<Body>>) -> Response<Body> {
    use futures::FutureExt as _;
    match std::panic::AssertUnwindSafe(f).catch_unwind().await {
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
    }
}

/// A plain-text error response.
pub fn error_response(status: StatusCode, message: &str) -> Response<Body> {
    let text = format!(
        "{} {}: {message}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Either::Right(Full::new(Bytes::from(text))))
        .expect("static response parts are valid")
}

/// A request body that fails once more than `limit` bytes arrive.
struct LimitedBody {
    inner: Incoming,
    remaining: u64,
    limit: u64,
    /// Set when the body went over the limit.
    exceeded: Arc<AtomicBool>,
    /// Set when the body failed (over the limit, or malformed framing such
    /// as a bad chunk): the response must not look complete.
    failed: Arc<AtomicBool>,
}

impl http_body::Body for LimitedBody {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > self.remaining {
                        self.exceeded.store(true, Relaxed);
                        self.failed.store(true, Relaxed);
                        self.remaining = 0;
                        return Poll::Ready(Some(Err(
                            wasmtime_wasi_http::Error::HttpRequestBodySize(Some(self.limit)),
                        )));
                    }
                    self.remaining -= n;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                self.failed.store(true, Relaxed);
                Poll::Ready(Some(Err(e.into())))
            }
            other => other.map(|o| o.map(|r| r.map_err(Into::into))),
        }
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Accepts connections on every listener until `shutdown` resolves, then
/// stops accepting, lets running requests finish (at most `drain_timeout`;
/// idle keep-alive connections are closed at once) and returns.
pub async fn serve(
    front: Arc<Front>,
    listeners: Vec<Listener>,
    shutdown: impl Future<Output = ()>,
    drain_timeout: Duration,
) {
    // The connection limit is fixed for the life of the listeners; the
    // HTTP limits are read from the current pool for every connection, so
    // a reload changes them.
    let conns = Arc::new(Semaphore::new(
        front.pool().knobs().max_concurrent_connections as usize,
    ));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Every connection task holds a clone; `recv` returns None once all
    // of them have ended.
    let (alive_tx, mut alive_rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut tasks = tokio::task::JoinSet::new();
    for l in listeners {
        let front = front.clone();
        let conns = conns.clone();
        let mut stop = stop_rx.clone();
        let alive = alive_tx.clone();
        tasks.spawn(async move {
            loop {
                let permit = tokio::select! {
                    _ = stop.changed() => break,
                    p = conns.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                };
                let accepted = tokio::select! {
                    _ = stop.changed() => break,
                    a = accept(&l) => a,
                };
                let io = match accepted {
                    Ok(io) => io,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let guard = ConnectionGuard::new(front.clone());
                let stop = stop.clone();
                let alive = alive.clone();
                let front = front.clone();
                tokio::spawn(async move {
                    serve_connection(front, io, stop).await;
                    drop(guard);
                    drop(permit);
                    drop(alive);
                });
            }
        });
    }
    drop(alive_tx);
    shutdown.await;
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    tracing::info!("stopped accepting; draining running requests");
    if tokio::time::timeout(drain_timeout, alive_rx.recv())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout reached; closing remaining connections");
    }
}

/// How long, once draining, a connection that has not sent its first
/// request yet may take to send it. Such a connection was accepted before
/// the drain began (its client connected in time), so it is served rather
/// than closed unanswered.
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(1);

/// Serves one connection until it ends. When `stop` turns true, keep-alive
/// ends: an idle connection closes at once, a running request finishes
/// (its response says `Connection: close`), and a connection still waiting
/// for its first request gets [`FIRST_REQUEST_GRACE`] to send it.
async fn serve_connection(
    front: Arc<Front>,
    io: Box<dyn Io>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let builder = http1_builder(front.pool().knobs());
    let started = Arc::new(tokio::sync::Notify::new());
    let seen = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let service = {
        let (started, seen) = (started.clone(), seen.clone());
        hyper::service::service_fn(move |req| {
            seen.store(true, std::sync::atomic::Ordering::Release);
            started.notify_one();
            let front = front.clone();
            async move { Ok::<_, Infallible>(front.handle(req).await) }
        })
    };
    let conn = builder.serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = stopped(&mut stop) => {
            if !seen.load(std::sync::atomic::Ordering::Acquire) {
                // Keep serving until the first request arrives or the
                // grace ends.
                tokio::select! {
                    r = conn.as_mut() => return log_connection_end(r),
                    _ = started.notified() => {}
                    _ = tokio::time::sleep(FIRST_REQUEST_GRACE) => {}
                }
            }
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    log_connection_end(result);
}

/// Resolves once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn log_connection_end(r: Result<(), hyper::Error>) {
    if let Err(e) = r {
        tracing::debug!("connection ended with an error: {e}");
    }
}

pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

pub(crate) async fn accept(l: &Listener) -> std::io::Result<Box<dyn Io>> {
    Ok(match l {
        Listener::Tcp(l) => {
            let (s, _) = l.accept().await?;
            // Small guest writes should not wait for Nagle.
            let _ = s.set_nodelay(true);
            Box::new(s)
        }
        Listener::Unix(l) => Box::new(l.accept().await?.0),
    })
}

fn http1_builder(knobs: &Knobs) -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(knobs.header_read_timeout)
        .max_headers(knobs.max_request_headers as usize)
        .max_buf_size(
            knobs
                .max_request_header_size
                .max(crate::config::MIN_REQUEST_HEADER_SIZE) as usize,
        );
    b
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
