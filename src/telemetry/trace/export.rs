//! The exporter: finished spans go into a bounded queue that a request
//! never waits on (a full queue drops the span and counts it); one thread
//! takes them out in batches (when one is full, or after the schedule
//! delay) and sends them as OTLP/HTTP protobuf with
//! the OpenTelemetry SDK's exporter. A slow or absent collector only
//! costs spans.

use super::settings::ExportSettings;
use opentelemetry_sdk::trace::{SpanData, SpanExporter as _};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Spans lost: the queue was full, or the collector refused or failed
/// the batch (process-wide, for the metrics).
pub static DROPPED: AtomicU64 = AtomicU64::new(0);
/// Spans the collector accepted.
pub static EXPORTED: AtomicU64 = AtomicU64::new(0);

/// What the requests and the exporter thread share. A push takes a lock
/// no one holds for long and wakes the thread only when a batch is full:
/// waking it per span (as a channel does) cost more than the spans.
struct Shared {
    spans: Mutex<Vec<SpanData>>,
    max_queue: usize,
    max_batch: usize,
    /// Callers of [`Queue::flush`] waiting for the queue to be sent.
    flushes: Mutex<Vec<std::sync::mpsc::Sender<()>>>,
    closed: AtomicBool,
}

/// One exporter: its queue and its thread. Dropping it ends the thread
/// once what is queued has been sent.
pub struct Queue {
    shared: Arc<Shared>,
    thread: std::thread::Thread,
}

impl Queue {
    /// Starts the exporter thread.
    pub fn start(settings: &ExportSettings) -> std::io::Result<Queue> {
        let shared = Arc::new(Shared {
            spans: Mutex::new(Vec::with_capacity(settings.max_batch)),
            max_queue: settings.max_queue,
            max_batch: settings.max_batch,
            flushes: Mutex::default(),
            closed: AtomicBool::new(false),
        });
        let s = settings.clone();
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("otlp-export".into())
            .spawn(move || run(s, &sh))?
            .thread()
            .clone();
        Ok(Queue { shared, thread })
    }

    /// Queues a finished span, or drops it when the queue is full.
    pub fn push(&self, span: SpanData) {
        let mut q = lock(&self.shared.spans);
        if q.len() >= self.shared.max_queue {
            drop(q);
            DROPPED.fetch_add(1, Relaxed);
            return;
        }
        q.push(span);
        let full = q.len() == self.shared.max_batch;
        drop(q);
        if full {
            self.thread.unpark();
        }
    }

    /// Sends what is queued, waiting at most `within`.
    pub fn flush(&self, within: Duration) -> bool {
        let (tx, rx) = std::sync::mpsc::channel();
        lock(&self.shared.flushes).push(tx);
        self.thread.unpark();
        rx.recv_timeout(within).is_ok()
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        self.shared.closed.store(true, Relaxed);
        self.thread.unpark();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn run(s: ExportSettings, shared: &Shared) {
    let exporter = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start its runtime: {e}"))
        .and_then(|rt| {
            let e = {
                let _in = rt.enter();
                build(&s)?
            };
            Ok((rt, e))
        });
    let (rt, mut exporter) = match exporter {
        Ok(x) => (Some(x.0), Some(x.1)),
        Err(e) => {
            tracing::error!("trace export off: {e}");
            (None, None)
        }
    };
    if let Some(e) = &mut exporter {
        let resource = opentelemetry_sdk::Resource::builder_empty()
            .with_attributes(
                s.resource
                    .iter()
                    .map(|(k, v)| opentelemetry::KeyValue::new(k.clone(), v.clone())),
            )
            .build();
        e.set_resource(&resource);
    }
    let mut warned_at: Option<Instant> = None;
    loop {
        // Woken early by a full batch, a flush or the end.
        std::thread::park_timeout(s.delay);
        let closed = shared.closed.load(Relaxed);
        let flushes = std::mem::take(&mut *lock(&shared.flushes));
        loop {
            let batch: Vec<SpanData> = {
                let mut q = lock(&shared.spans);
                let n = q.len().min(shared.max_batch);
                q.drain(..n).collect()
            };
            if batch.is_empty() {
                break;
            }
            let n = batch.len() as u64;
            let (Some(rt), Some(exporter)) = (&rt, &exporter) else {
                DROPPED.fetch_add(n, Relaxed);
                continue;
            };
            match rt
                .block_on(async { tokio::time::timeout(s.timeout, exporter.export(batch)).await })
            {
                Ok(Ok(())) => {
                    EXPORTED.fetch_add(n, Relaxed);
                }
                failed => {
                    DROPPED.fetch_add(n, Relaxed);
                    // Once a minute at most: a collector that is down
                    // must not flood the log.
                    if warned_at.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                        warned_at = Some(Instant::now());
                        let why = match failed {
                            Ok(Err(e)) => e.to_string(),
                            _ => format!("no answer within {:?}", s.timeout),
                        };
                        tracing::warn!(
                            endpoint = %s.endpoint,
                            "trace export failed, {n} spans dropped: {why}"
                        );
                    }
                }
            }
        }
        for f in flushes {
            let _ = f.send(());
        }
        if closed {
            return;
        }
    }
}

fn build(s: &ExportSettings) -> Result<opentelemetry_otlp::SpanExporter, String> {
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    let client = opentelemetry_http::hyper::HyperClient::with_default_connector(s.timeout, None);
    opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(s.endpoint.to_string())
        .with_timeout(s.timeout)
        .with_headers(s.headers.iter().cloned().collect())
        .build()
        .map_err(|e| e.to_string())
}
