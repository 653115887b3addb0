//! The admin listener (`--metrics-listen`): Prometheus metrics at
//! `/metrics`, and health for load balancers: `/healthz` (the process is
//! alive and its request path answers) and `/readyz` (a component is
//! loaded, the listeners serve, and no drain has begun). `/readyz` turns
//! to 503 as soon as a drain starts, so a load balancer stops sending
//! while running requests finish; the listener keeps answering until the
//! drain is over.

use crate::http::Listener;
use crate::telemetry::metrics::Metrics;
use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::Full;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

/// Whether the service takes traffic (set once it serves, cleared at
/// SIGTERM) and whether it is shutting down (from SIGTERM on: the shutdown
/// delay, then the drain). Metrics export both.
#[derive(Debug, Default)]
pub struct Readiness {
    ready: AtomicBool,
    draining: AtomicBool,
}

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.ready.store(ready, Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Relaxed)
    }

    /// Not ready from now on, and shutting down.
    pub fn set_draining(&self) {
        self.ready.store(false, Relaxed);
        self.draining.store(true, Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Relaxed)
    }
}

/// Serves the admin endpoints until `stop` turns true.
pub async fn serve(
    listener: Listener,
    metrics: Arc<Metrics>,
    ready: Arc<Readiness>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        if *stop.borrow() {
            break;
        }
        let io = tokio::select! {
            changed = stop.changed() => match changed {
                Ok(()) => continue,
                Err(_) => break, // the service is gone
            },
            a = listener.accept() => match a {
                Ok(a) => a.io,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (m, r) = (metrics.clone(), ready.clone());
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let answer = route(req.uri().path(), &m, &r);
                    async move { Ok::<_, std::convert::Infallible>(answer) }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
                .await;
        });
    }
}

fn route(path: &str, metrics: &Metrics, ready: &Readiness) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: &'static str| {
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .expect("valid response")
    };
    match path {
        "/metrics" => Response::builder()
            .header(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .body(Full::new(Bytes::from(metrics.render())))
            .expect("valid response"),
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if ready.is_ready() => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready (starting or draining)\n",
        ),
        _ => text(StatusCode::NOT_FOUND, "here: /metrics, /healthz, /readyz\n"),
    }
}
