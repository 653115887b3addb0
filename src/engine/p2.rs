//! WASIp2 requests run on the task that received them.
//!
//! A WASIp2 instance serves one request at a time, so it needs no event loop
//! of its own. Here the request's task takes an idle instance (or makes
//! one), calls `incoming-handler.handle` itself and puts the instance back.
//! Compared with [`ProxyHandler`](wasmtime_wasi_http::handler::ProxyHandler)
//! (a worker task per instance, a shared queue, a channel per request) this
//! saves the hand-over to another task and back for every request.
//!
//! When the guest sets its response before `handle` returns (it streams a
//! body, or works after answering), the rest of the call moves to a task of
//! its own, bounded by the same deadline as the request.
//!
//! Invariants: an instance is either in the idle list, or owned by exactly
//! one call; each [`Live`] counts once in `instances_live` until dropped.

use crate::engine::host::Host;
use crate::engine::idle::Parked;
use crate::engine::stats::Stats;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::Poll;
use std::time::Instant;
use wasmtime::Store;
use wasmtime_wasi_http::WasiBody;
use wasmtime_wasi_http::p2::bindings::Proxy;
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode, Scheme};

/// One instance and its store; counted in `instances_live` while it exists.
pub(crate) struct Live {
    pub store: Store<Host>,
    pub proxy: Proxy,
    pub id: u64,
    /// Requests this instance has taken.
    pub served: u64,
    pub stats: Arc<Stats>,
}

impl Drop for Live {
    fn drop(&mut self) {
        self.stats.instances_live.fetch_sub(1, Relaxed);
    }
}

impl Parked for Live {
    fn id(&self) -> u64 {
        self.id
    }
    fn served(&self) -> u64 {
        self.served
    }
}

/// How one call to `handle` went, as far as the response is concerned.
pub(crate) enum Answer {
    /// The guest set a response.
    Response(http::Response<WasiBody>),
    /// The guest set an error code instead of a response.
    ErrorCode(ErrorCode),
    /// `handle` returned without setting the response.
    NoResponse,
    /// The instance trapped (or its request could not be handed to it)
    /// before setting a response; the message says why.
    Trap(String),
}

/// What becomes of the instance once `handle` has returned.
pub(crate) type Finish = Box<dyn FnOnce(Live, wasmtime::Result<()>) + Send>;

/// Calls `handle` on `live` with `request` and waits until the guest set
/// its response (or failed to). When the response comes first, the rest of
/// the call continues on its own task, for at most `rest_deadline`; in every
/// case `finish` receives the instance and the call's result exactly once,
/// unless this future is dropped first (then the instance is dropped with
/// it).
pub(crate) async fn call(
    mut live: Live,
    request: http::Request<WasiBody>,
    rest_deadline: Instant,
    finish: Finish,
) -> Answer {
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    let resources = (|| -> wasmtime::Result<_> {
        let mut http = wasmtime_wasi_http::WasiHttpView::http(live.store.data_mut());
        let req = http.new_incoming_request(Scheme::Http, request)?;
        let out = http.new_response_outparam(tx)?;
        Ok((req, out))
    })();
    let (req, out) = match resources {
        Ok(r) => r,
        Err(e) => {
            finish(live, Ok(()));
            return Answer::Trap(format!("{e:#}"));
        }
    };
    let mut running: Pin<Box<dyn Future<Output = (Live, wasmtime::Result<()>)> + Send>> =
        Box::pin(async move {
            let r = live
                .proxy
                .wasi_http_incoming_handler()
                .call_handle(&mut live.store, req, out)
                .await;
            (live, r)
        });
    let mut rx_open = true;
    let first = std::future::poll_fn(|cx| {
        // The call first: it is what makes progress.
        if let Poll::Ready(done) = running.as_mut().poll(cx) {
            return Poll::Ready(Err(done));
        }
        if rx_open {
            match Pin::new(&mut rx).poll(cx) {
                Poll::Ready(Ok(set)) => return Poll::Ready(Ok(set)),
                // The outparam was dropped unset: wait for the call.
                Poll::Ready(Err(_)) => rx_open = false,
                Poll::Pending => {}
            }
        }
        Poll::Pending
    })
    .await;
    match first {
        // `handle` returned (the usual case for short answers): the
        // response, if any, is already in the channel.
        Err((live, result)) => {
            let answer = match (rx.try_recv(), &result) {
                (Ok(Ok(response)), _) => Answer::Response(response),
                (Ok(Err(code)), _) => Answer::ErrorCode(code),
                (Err(_), Err(e)) => Answer::Trap(format!("{e:#}")),
                (Err(_), Ok(())) => Answer::NoResponse,
            };
            finish(live, result);
            answer
        }
        // The response came first: let the rest of the call run on.
        Ok(set) => {
            let left = rest_deadline.saturating_duration_since(Instant::now());
            tokio::spawn(async move {
                match tokio::time::timeout(left, running).await {
                    Ok((live, result)) => finish(live, result),
                    Err(_) => {
                        // The instance is dropped mid-call.
                        tracing::warn!(
                            "instance discarded: the guest was still running after the request timeout"
                        );
                    }
                }
            });
            match set {
                Ok(response) => Answer::Response(response),
                Err(code) => Answer::ErrorCode(code),
            }
        }
    }
}
