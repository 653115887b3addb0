//! The exporter: finished spans go into a bounded queue that a request
//! never waits on (a full queue drops the span and counts it); one thread
//! takes them out in batches and sends them as OTLP/HTTP protobuf with
//! the OpenTelemetry SDK's exporter. A slow or absent collector only
//! costs spans.

use super::settings::ExportSettings;
use opentelemetry_sdk::trace::{SpanData, SpanExporter as _};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

/// Spans lost: the queue was full, or the collector refused or failed
/// the batch (process-wide, for the metrics).
pub static DROPPED: AtomicU64 = AtomicU64::new(0);
/// Spans the collector accepted.
pub static EXPORTED: AtomicU64 = AtomicU64::new(0);

enum Msg {
    Span(Box<SpanData>),
    /// Send what is queued now, then answer.
    Flush(std::sync::mpsc::Sender<()>),
}

/// One exporter: its queue's sending side. Dropping it ends the thread
/// once the queue is empty.
pub struct Queue {
    tx: SyncSender<Msg>,
}

impl Queue {
    /// Starts the exporter thread.
    pub fn start(settings: &ExportSettings) -> std::io::Result<Queue> {
        let (tx, rx) = std::sync::mpsc::sync_channel(settings.max_queue);
        let s = settings.clone();
        std::thread::Builder::new()
            .name("otlp-export".into())
            .spawn(move || run(s, rx))?;
        Ok(Queue { tx })
    }

    /// Queues a finished span, or drops it when the queue is full.
    pub fn push(&self, span: SpanData) {
        match self.tx.try_send(Msg::Span(Box::new(span))) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                DROPPED.fetch_add(1, Relaxed);
            }
        }
    }

    /// Sends what is queued, waiting at most `within`.
    pub fn flush(&self, within: Duration) -> bool {
        let (tx, rx) = std::sync::mpsc::channel();
        let deadline = Instant::now() + within;
        // The queue may be full: try until the thread makes room.
        let mut msg = Msg::Flush(tx);
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                    msg = m;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return false,
            }
        }
        rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .is_ok()
    }
}

fn run(s: ExportSettings, rx: Receiver<Msg>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("trace export off: cannot start its runtime: {e}");
            drain_dropping(rx);
            return;
        }
    };
    let exporter = {
        let _in = rt.enter();
        build(&s)
    };
    let mut exporter = match exporter {
        Ok(e) => e,
        Err(e) => {
            tracing::error!("trace export off: {e}");
            drain_dropping(rx);
            return;
        }
    };
    let resource = opentelemetry_sdk::Resource::builder_empty()
        .with_attributes(
            s.resource
                .iter()
                .map(|(k, v)| opentelemetry::KeyValue::new(k.clone(), v.clone())),
        )
        .build();
    exporter.set_resource(&resource);
    let mut batch: Vec<SpanData> = Vec::with_capacity(s.max_batch);
    let mut waiting_since: Option<Instant> = None;
    let mut warned_at: Option<Instant> = None;
    loop {
        let wait = match waiting_since {
            Some(t) => s.delay.saturating_sub(t.elapsed()),
            None => Duration::from_secs(3600),
        };
        let mut flushed = None;
        let mut done = false;
        match rx.recv_timeout(wait) {
            Ok(Msg::Span(span)) => {
                batch.push(*span);
                waiting_since.get_or_insert_with(Instant::now);
            }
            Ok(Msg::Flush(reply)) => flushed = Some(reply),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => done = true,
        }
        let due = waiting_since.is_some_and(|t| t.elapsed() >= s.delay);
        if !batch.is_empty() && (batch.len() >= s.max_batch || due || flushed.is_some() || done) {
            let n = batch.len() as u64;
            let spans = std::mem::replace(&mut batch, Vec::with_capacity(s.max_batch));
            waiting_since = None;
            match rt
                .block_on(async { tokio::time::timeout(s.timeout, exporter.export(spans)).await })
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
        if let Some(reply) = flushed {
            let _ = reply.send(());
        }
        if done {
            return;
        }
    }
}

fn drain_dropping(rx: Receiver<Msg>) {
    for m in rx {
        match m {
            Msg::Span(_) => {
                DROPPED.fetch_add(1, Relaxed);
            }
            Msg::Flush(reply) => {
                let _ = reply.send(());
            }
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
