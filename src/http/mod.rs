//! The HTTP front: everything between a listening socket and the engine.
//!
//! - [`listener`]: listen addresses, bound or inherited sockets, peers;
//! - [`limits`]: who holds connections and requests (the global
//!   connection cap with eviction of idle connections, per-client caps);
//! - [`io`]: a connection's byte stream with its timeouts (first request,
//!   keep-alive, request head, send);
//! - [`body`]: request bodies (size, slow senders, read-ahead);
//! - [`front`]: one request through the pool, failures mapped to statuses;
//! - [`response`]: response bodies, read ahead when the client is slow;
//! - [`tls`]: TLS 1.2/1.3 with a certificate that can be swapped;
//! - this module: accept loops, connections (HTTP/1.1, and HTTP/2 by ALPN
//!   or with prior knowledge), drain.
//!
//! Each defence is a knob (see `config`); `docs/reliability.md` lists the
//! attack each one stops.

pub mod body;
pub mod front;
pub mod io;
pub mod limits;
pub mod listener;
pub mod response;
pub mod tls;

pub use crate::telemetry::HttpStats;
pub use front::{Front, error_response};
pub use listener::{Io, ListenAddr, Listener, Peer};
pub use response::Body;

use crate::config::Knobs;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use io::{TimedIo, Timeouts};
use limits::{ConnHandle, OverClientShare, Registry};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio::sync::Semaphore;

/// Accepts connections on every listener until `shutdown` resolves, then
/// stops accepting, lets running requests finish (at most `drain_timeout`;
/// idle keep-alive connections are closed at once) and returns.
pub async fn serve(
    front: Arc<Front>,
    listeners: Vec<Listener>,
    shutdown: impl Future<Output = ()>,
    drain_timeout: Duration,
) {
    // The connection limits are fixed for the life of the listeners; the
    // HTTP limits are read from the current pool for every connection, so
    // a reload changes them.
    let knobs = front.pool().knobs().clone();
    let conns = Arc::new(Semaphore::new(knobs.max_concurrent_connections as usize));
    let registry = Arc::new(Registry::new(
        knobs.connections_per_client(),
        knobs.requests_per_client(),
        front.http_stats().clone(),
    ));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Every connection task holds a clone; `recv` returns None once all
    // of them have ended.
    let (alive_tx, mut alive_rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut tasks = tokio::task::JoinSet::new();
    for l in listeners {
        let front = front.clone();
        let conns = conns.clone();
        let registry = registry.clone();
        let mut stop = stop_rx.clone();
        let alive = alive_tx.clone();
        tasks.spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop.changed() => break,
                    a = l.accept() => a,
                };
                let accepted = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // A client at its share is refused before it takes a place.
                let handle = match registry.open(accepted.peer) {
                    Ok(h) => h,
                    Err(OverClientShare) => {
                        tokio::spawn(refuse(accepted));
                        continue;
                    }
                };
                // At the connection limit, the connection idle longest is
                // closed to make room; with none idle, this one waits
                // (and the listen backlog behind it).
                let permit = match conns.clone().try_acquire_owned() {
                    Ok(p) => p,
                    Err(_) => loop {
                        registry.evict_one(&handle);
                        tokio::select! {
                            _ = stop.changed() => return,
                            p = conns.clone().acquire_owned() => match p {
                                Ok(p) => break p,
                                Err(_) => return,
                            },
                            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        }
                    },
                };
                let activity = front::ActivityGuard::new(front.clone());
                let stop = stop.clone();
                let alive = alive.clone();
                let front = front.clone();
                let registry = registry.clone();
                tokio::spawn(async move {
                    serve_connection(front, registry, accepted, handle, stop).await;
                    drop(activity);
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

/// What a connection refused for its client's share gets, without waiting
/// for its request: holding it open to read one would let the refused
/// client keep a place after all.
const REFUSAL: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: text/plain\r\n\
retry-after: 1\r\nconnection: close\r\ncontent-length: 53\r\n\r\n\
429 Too Many Requests: too many connections from you\n";

/// Answers a connection over its client's share and closes it; gives up
/// at once if the client's window is full.
async fn refuse(accepted: listener::Accepted) {
    use tokio::io::AsyncWriteExt;
    let mut io = accepted.io;
    let _ = tokio::time::timeout(Duration::from_millis(100), async {
        io.write_all(REFUSAL).await?;
        io.shutdown().await
    })
    .await;
}

/// Serves one connection until it ends. When `stop` turns true, keep-alive
/// ends: an idle connection closes at once, a running request finishes
/// (its response says `Connection: close`), and a connection still waiting
/// for its first request gets [`FIRST_REQUEST_GRACE`] to send it. A
/// connection asked to close (evicted while idle) closes the same way.
async fn serve_connection(
    front: Arc<Front>,
    registry: Arc<Registry>,
    accepted: listener::Accepted,
    handle: ConnHandle,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let knobs = front.pool().knobs().clone();
    let conn = handle.conn().clone();
    let timeouts = Timeouts {
        header_read: knobs.header_read_timeout,
        keepalive: knobs.keepalive_timeout,
        send: knobs.send_timeout,
        send_min_rate: knobs.send_min_rate,
    };
    let mut io = TimedIo::new(
        accepted.io,
        Some(accepted.fd),
        conn.clone(),
        front.http_stats().clone(),
        timeouts,
        false,
    );
    let io: Box<dyn Io> = if accepted.tls {
        let Some(tls) = front.tls() else {
            tracing::error!("a TLS listener without a certificate");
            return;
        };
        // The handshake counts towards the first request's head timeout
        // (TimedIo), so a client that stalls it is cut off like slowloris.
        let stream = tokio::select! {
            s = tls.acceptor().accept(io) => s,
            _ = stopped(&mut stop) => return,
        };
        match stream {
            Ok(mut stream) => {
                if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                    stream.get_mut().0.set_h2();
                }
                Box::new(stream)
            }
            Err(e) => {
                front.http_stats().tls_failures.fetch_add(1, Relaxed);
                tracing::debug!(peer = %conn.peer, "TLS handshake failed: {e}");
                return;
            }
        }
    } else {
        io.set_plain();
        Box::new(io)
    };
    let service = {
        let conn = conn.clone();
        let front = front.clone();
        let wait = knobs.max_queue_wait;
        hyper::service::service_fn(move |req| {
            let front = front.clone();
            let started = registry.start_request(&conn);
            let registry = registry.clone();
            // Boxed: hyper moves a request's future several times before
            // polling it, and the engine's part of it is kilobytes.
            Box::pin(async move {
                // Over its client's share, a request waits (as long as
                // for an admission slot) for one of the client's to end.
                let guard = match started {
                    Ok(guard) => guard,
                    Err((mut guard, _)) => {
                        if !Box::pin(registry.wait_for_client(&mut guard, wait)).await {
                            return Ok(front.too_many_requests(&req, guard));
                        }
                        guard
                    }
                };
                Ok::<_, Infallible>(front.handle(req, guard).await)
            })
        })
    };
    let builder = builder(&knobs);
    let c = builder.serve_connection(TokioIo::new(io), service);
    let mut c = std::pin::pin!(c);
    let result = tokio::select! {
        r = c.as_mut() => r,
        _ = conn.stalled_stream(knobs.send_timeout) => stream_send_timeout(&front),
        _ = conn.closing() => {
            c.as_mut().graceful_shutdown();
            finish_idle(c, &conn, &front, knobs.send_timeout).await
        }
        _ = stopped(&mut stop) => {
            if conn.finished() == 0 && !conn.is_busy() {
                // Keep serving until the first request arrives or the
                // grace ends.
                tokio::select! {
                    r = c.as_mut() => return log_connection_end(r),
                    _ = conn.first_request() => {}
                    _ = tokio::time::sleep(FIRST_REQUEST_GRACE) => {}
                }
            }
            c.as_mut().graceful_shutdown();
            finish_idle(c, &conn, &front, knobs.send_timeout).await
        }
    };
    drop(handle);
    log_connection_end(result);
}

/// After a graceful shutdown: lets the running requests finish and their
/// responses reach the client, and drops the connection as soon as neither
/// is left (hyper would otherwise wait for a request head that is being
/// received, however slowly).
async fn finish_idle<F>(
    mut c: Pin<&mut F>,
    conn: &limits::Conn,
    front: &Front,
    send_timeout: Duration,
) -> ConnResult
where
    F: Future<Output = ConnResult>,
{
    let stalled = conn.stalled_stream(send_timeout);
    let mut stalled = std::pin::pin!(stalled);
    loop {
        tokio::select! {
            r = c.as_mut() => return r,
            _ = stalled.as_mut() => return stream_send_timeout(front),
            _ = tokio::time::sleep(IDLE_CLOSE_CHECK) => {
                if !conn.is_busy() && !conn.is_sending() {
                    return Ok(());
                }
            }
        }
    }
}

type ConnResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// An HTTP/2 stream waited `send-timeout` for its client's window: the
/// connection closes, as it does when its socket stops taking bytes.
fn stream_send_timeout(front: &Front) -> ConnResult {
    front.http_stats().send_timeouts.fetch_add(1, Relaxed);
    Err("an HTTP/2 stream's client took none of its response for send-timeout".into())
}

/// How often a connection asked to close checks whether it may be dropped.
const IDLE_CLOSE_CHECK: Duration = Duration::from_millis(20);

/// Resolves once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn log_connection_end(r: ConnResult) {
    if let Err(e) = r {
        tracing::debug!("connection ended with an error: {e}");
    }
}

/// The connection builder: HTTP/1.1, or HTTP/2 when the client starts with
/// its preface (after ALPN `h2`, or with prior knowledge). Request-head
/// timeouts are [`TimedIo`]'s, so hyper's own is off.
fn builder(knobs: &Knobs) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(None)
        .max_headers(knobs.max_request_headers as usize)
        .max_buf_size(
            knobs
                .max_request_header_size
                .max(crate::config::MIN_REQUEST_HEADER_SIZE) as usize,
        );
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(knobs.max_request_header_size.min(u32::MAX as u64) as u32)
        .max_concurrent_streams(knobs.max_concurrent_streams)
        // Rapid reset (CVE-2023-44487): a client that opens and cancels
        // streams faster than they can be served loses the connection;
        // so does one whose streams keep failing. (hyper's defaults, set
        // here so they stay on.)
        .max_pending_accept_reset_streams(20)
        .max_local_error_reset_streams(1024);
    b
}
