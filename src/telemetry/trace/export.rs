//! The exporter: finished spans, already encoded (see [`super::otlp`]),
//! go into a bounded queue that a request never waits on (a full queue
//! drops the span and counts it); one thread takes them out in batches
//! (when one is full, or after the schedule delay) and sends them as
//! OTLP/HTTP protobuf over a kept-alive HTTP/1.1 connection. A slow or
//! absent collector only costs spans.

use super::otlp::{self, Framing};
use super::settings::ExportSettings;
use bytes::Bytes;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Spans lost: the queue was full, or the collector refused or failed
/// the batch (process-wide, for the metrics).
pub static DROPPED: AtomicU64 = AtomicU64::new(0);
/// Spans the collector accepted.
pub static EXPORTED: AtomicU64 = AtomicU64::new(0);

/// Encoded spans waiting: `ScopeSpans.spans` entries back to back, and
/// where each ends.
#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

/// What the requests and the exporter thread share. A push takes a lock
/// no one holds for long (a copy of a few hundred bytes) and wakes the
/// thread only when a batch is full: waking it per span (as a channel
/// does) cost more than the spans.
struct Shared {
    queue: Mutex<Batch>,
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
            queue: Mutex::default(),
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

    /// Queues a finished span (an encoded `Span` message), or drops it
    /// when the queue is full.
    pub fn push(&self, span: &otlp::Span) {
        let mut q = lock(&self.shared.queue);
        if q.ends.len() >= self.shared.max_queue {
            drop(q);
            DROPPED.fetch_add(1, Relaxed);
            return;
        }
        otlp::queue_span(&mut q.bytes, span.bytes());
        let end = q.bytes.len();
        q.ends.push(end);
        let full = q.ends.len() == self.shared.max_batch;
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
    let framing = Framing::new(&s.resource, "wasmpool", env!("CARGO_PKG_VERSION"));
    let exporter = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start its runtime: {e}"))
        .and_then(|rt| Ok((rt, Client::new(&s)?)));
    let (rt, mut client) = match exporter {
        Ok((rt, c)) => (Some(rt), Some(c)),
        Err(e) => {
            tracing::error!("trace export off: {e}");
            (None, None)
        }
    };
    // Swapped with the queue: its buffers are reused, not reallocated.
    let mut taken = Batch::default();
    let mut warned_at: Option<Instant> = None;
    loop {
        // Woken early by a full batch, a flush or the end.
        std::thread::park_timeout(s.delay);
        let closed = shared.closed.load(Relaxed);
        let flushes = std::mem::take(&mut *lock(&shared.flushes));
        loop {
            taken.bytes.clear();
            taken.ends.clear();
            std::mem::swap(&mut *lock(&shared.queue), &mut taken);
            if taken.ends.is_empty() {
                break;
            }
            let mut from = 0;
            for chunk in taken.ends.chunks(shared.max_batch) {
                let to = *chunk.last().expect("chunks are not empty");
                let n = chunk.len() as u64;
                let spans = &taken.bytes[from..to];
                from = to;
                let (Some(rt), Some(client)) = (&rt, &mut client) else {
                    DROPPED.fetch_add(n, Relaxed);
                    continue;
                };
                let body = Bytes::from(framing.request(spans));
                let sent = rt.block_on(async {
                    tokio::time::timeout(s.timeout, client.send(body))
                        .await
                        .unwrap_or_else(|_| Err(format!("no answer within {:?}", s.timeout)))
                });
                match sent {
                    Ok(()) => {
                        EXPORTED.fetch_add(n, Relaxed);
                    }
                    Err(why) => {
                        // A connection in an unknown state is not reused.
                        client.conn = None;
                        DROPPED.fetch_add(n, Relaxed);
                        // Once a minute at most: a collector that is down
                        // must not flood the log.
                        if warned_at.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                            warned_at = Some(Instant::now());
                            tracing::warn!(
                                endpoint = %s.endpoint,
                                "trace export failed, {n} spans dropped: {why}"
                            );
                        }
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

type Body = http_body_util::Full<Bytes>;

/// An OTLP/HTTP client: POSTs to the endpoint over one HTTP/1.1
/// connection, kept alive between exports and made anew when it fails.
struct Client {
    /// `host:port` to connect to.
    addr: String,
    target: http::Uri,
    headers: http::HeaderMap,
    conn: Option<hyper::client::conn::http1::SendRequest<Body>>,
}

impl Client {
    fn new(s: &ExportSettings) -> Result<Client, String> {
        let uri = &s.endpoint;
        let host = uri
            .host()
            .ok_or_else(|| format!("{uri}: the endpoint has no host"))?;
        let port = uri.port_u16().unwrap_or(80);
        let authority = uri.authority().map_or(host, |a| a.as_str()).to_string();
        let target = uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .parse()
            .map_err(|e| format!("{uri}: {e}"))?;
        let mut headers = http::HeaderMap::new();
        let text = |v: &str| http::HeaderValue::try_from(v).map_err(|e| format!("`{v}`: {e}"));
        headers.insert(http::header::HOST, text(&authority)?);
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/x-protobuf"),
        );
        headers.insert(
            http::header::USER_AGENT,
            http::HeaderValue::from_static(concat!("wasmpool/", env!("CARGO_PKG_VERSION"))),
        );
        for (k, v) in &s.headers {
            let name = http::HeaderName::try_from(k.as_str())
                .map_err(|e| format!("header name `{k}`: {e}"))?;
            headers.append(name, text(v)?);
        }
        Ok(Client {
            addr: format!("{host}:{port}"),
            target,
            headers,
            conn: None,
        })
    }

    async fn connect(&self) -> Result<hyper::client::conn::http1::SendRequest<Body>, String> {
        let tcp = tokio::net::TcpStream::connect(&self.addr)
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", self.addr))?;
        let _ = tcp.set_nodelay(true);
        let (tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .map_err(|e| format!("HTTP handshake with {}: {e}", self.addr))?;
        // Driven while an export runs (this thread's runtime runs only
        // then); an idle connection the collector closed is noticed at the
        // next export and made anew.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(tx)
    }

    /// Sends one export; a kept connection that turns out closed is
    /// replaced once.
    async fn send(&mut self, body: Bytes) -> Result<(), String> {
        let kept = self.conn.take().filter(|c| !c.is_closed());
        let fresh = kept.is_none();
        let mut tx = match kept {
            Some(tx) => tx,
            None => self.connect().await?,
        };
        let mut answer = self.post(&mut tx, body.clone()).await;
        if answer.is_err() && !fresh {
            tx = self.connect().await?;
            answer = self.post(&mut tx, body).await;
        }
        let status = answer?;
        self.conn = Some(tx);
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("the collector answered {status}"))
        }
    }

    async fn post(
        &self,
        tx: &mut hyper::client::conn::http1::SendRequest<Body>,
        body: Bytes,
    ) -> Result<http::StatusCode, String> {
        use http_body_util::BodyExt;
        tx.ready().await.map_err(|e| e.to_string())?;
        let mut req = http::Request::new(http_body_util::Full::new(body));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = self.target.clone();
        *req.headers_mut() = self.headers.clone();
        let resp = tx.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        // Read to its end, so the connection can take the next export.
        resp.into_body()
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?;
        Ok(status)
    }
}
