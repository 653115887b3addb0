//! Traces: W3C trace context in and out of the guest, and OpenTelemetry
//! spans exported over OTLP/HTTP.
//!
//! The front (or the C API) calls [`begin`] with each request; what comes
//! back travels in the request's extensions. The engine reports to it
//! ([`RequestTrace::queued`], [`RequestTrace::instantiated`],
//! [`RequestTrace::taken`], [`RequestTrace::answered`]), the outbound hook
//! asks it for the context to inject ([`RequestTrace::outbound`]), and the
//! response body ends it ([`RequestTrace::finish`]) exactly once.
//!
//! Three modes: off (`trace-context = false`, no export: nothing is read);
//! propagation only (the default: an incoming `traceparent` reaches the
//! guest unchanged and its outbound requests carry it); export (an
//! endpoint is set: every request gets a server span, continuing the
//! incoming trace or starting one, sampled as the sampler says).

pub mod context;
pub mod export;
pub mod otlp;
pub mod settings;

pub use context::SpanContext;
pub use settings::{OtelFile, Sampler, Settings, SettingsError};

use arc_swap::ArcSwapOption;
use otlp::{Head, Kind};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

static TRACER: ArcSwapOption<Tracer> = ArcSwapOption::const_empty();

// Static names: no hashing of a string per lookup.
const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
const TRACESTATE: http::HeaderName = http::HeaderName::from_static("tracestate");

/// The installed settings and, when exporting, the exporter.
pub struct Tracer {
    settings: Settings,
    export: Option<(Sampler, export::Queue)>,
}

impl Tracer {
    /// Starts the exporter the settings ask for (its thread).
    pub fn start(settings: Settings) -> std::io::Result<Tracer> {
        let export = match &settings.export {
            Some(e) => Some((e.sampler.clone(), export::Queue::start(e)?)),
            None => None,
        };
        Ok(Tracer { settings, export })
    }
}

impl Tracer {
    /// Sends the spans queued so far, waiting at most `within`.
    pub fn flush(&self, within: Duration) {
        if let Some((_, q)) = &self.export
            && !q.flush(within)
        {
            tracing::warn!("trace export: queued spans not all sent within {within:?}");
        }
    }
}

/// Starts the tracer `settings` describe, unless the installed one
/// already has them (a reload that changed nothing keeps its exporter).
pub fn prepare(settings: Settings) -> std::io::Result<Option<Tracer>> {
    if TRACER
        .load()
        .as_ref()
        .is_some_and(|t| t.settings == settings)
    {
        return Ok(None);
    }
    Tracer::start(settings).map(Some)
}

/// Makes `tracer` the one new requests use. Requests already running keep
/// the one they started with; the old exporter sends what it has and
/// stops once the last of them is done.
pub fn install(tracer: Tracer) {
    TRACER.store(Some(Arc::new(tracer)));
}

/// Whether spans are exported (for the start-up line).
pub fn exporting() -> Option<String> {
    let t = TRACER.load();
    let t = t.as_ref()?;
    let e = t.settings.export.as_ref()?;
    Some(format!("{} ({:?})", e.endpoint, e.sampler))
}

/// Sends the spans queued so far, waiting at most `within` (at drain).
pub fn flush(within: Duration) {
    if let Some(t) = TRACER.load_full() {
        t.flush(within);
    }
}

/// What a request's trace knows of it. In the request's extensions as
/// `Arc<RequestTrace>`.
pub struct RequestTrace {
    /// The server span's context (exporting), or the incoming one
    /// (propagation only).
    ctx: SpanContext,
    tracestate: Option<http::HeaderValue>,
    rec: Option<Recording>,
}

/// A sampled request's span, while it runs.
struct Recording {
    tracer: Arc<Tracer>,
    parent: Option<[u8; 8]>,
    start: SystemTime,
    started: Instant,
    method: http::Method,
    /// What the request says of itself, encoded when it began.
    attrs: otlp::Attrs,
    times: Mutex<Times>,
}

#[derive(Default)]
struct Times {
    queued: Option<(Instant, Instant)>,
    instantiated: Option<(Instant, Instant)>,
    taken: Option<Instant>,
    answered: Option<Instant>,
    instance: u64,
    reused: bool,
    error: Option<String>,
    finished: bool,
}

/// Reads the request's trace context and, when exporting, opens its server
/// span and gives the guest the server span's `traceparent`. `None` when
/// there is nothing to carry.
pub fn begin<B>(
    req: &mut http::Request<B>,
    client: Option<std::net::SocketAddr>,
) -> Option<Arc<RequestTrace>> {
    let guard = TRACER.load();
    begin_with(guard.as_ref()?, req, client)
}

/// [`begin`] with a tracer of the caller's (a C API handler's own).
pub fn begin_with<B>(
    tracer: &Arc<Tracer>,
    req: &mut http::Request<B>,
    client: Option<std::net::SocketAddr>,
) -> Option<Arc<RequestTrace>> {
    let incoming = if tracer.settings.propagate {
        incoming(req.headers())
    } else {
        None
    };
    let Some((sampler, _)) = &tracer.export else {
        // Propagation only: the guest sees the headers as they came.
        let ctx = incoming?;
        let tracestate = req.headers().get(TRACESTATE).cloned();
        let t = Arc::new(RequestTrace {
            ctx,
            tracestate,
            rec: None,
        });
        req.extensions_mut().insert(t.clone());
        return Some(t);
    };
    let ctx = match &incoming {
        Some(parent) => parent.child(sampler.sample(Some(parent.sampled()), &parent.trace_id)),
        None => {
            let trace_id = context::new_trace_id();
            let sampled = sampler.sample(None, &trace_id);
            SpanContext {
                trace_id,
                span_id: context::new_span_id(),
                flags: if sampled { context::SAMPLED } else { 0 },
            }
        }
    };
    let headers = req.headers_mut();
    headers.insert(TRACEPARENT, ctx.header());
    if incoming.is_none() {
        // A tracestate without a valid traceparent is discarded.
        headers.remove(TRACESTATE);
    }
    let tracestate = headers.get(TRACESTATE).cloned();
    let rec = ctx.sampled().then(|| Recording {
        tracer: tracer.clone(),
        parent: incoming.map(|p| p.span_id),
        start: SystemTime::now(),
        started: Instant::now(),
        method: req.method().clone(),
        attrs: request_attrs(req, client),
        times: Mutex::default(),
    });
    let t = Arc::new(RequestTrace {
        ctx,
        tracestate,
        rec,
    });
    req.extensions_mut().insert(t.clone());
    Some(t)
}

/// The server span's attributes that come from the request (semantic
/// conventions for HTTP servers).
fn request_attrs<B>(req: &http::Request<B>, client: Option<std::net::SocketAddr>) -> otlp::Attrs {
    let mut a = otlp::Attrs::for_span(512);
    let uri = req.uri();
    a.str("http.request.method", req.method().as_str());
    a.str("url.path", uri.path());
    a.str(
        "url.scheme",
        match uri.scheme_str() {
            Some("https") => "https",
            _ => "http",
        },
    );
    // `network.protocol.name` is left out: semantic conventions want it
    // only when it is not `http`.
    a.str("network.protocol.version", protocol_version(req.version()));
    if let Some(c) = client {
        // Written on the stack: no allocation for the text.
        use std::io::Write as _;
        let mut text = [0u8; 64];
        let mut w = &mut text[..];
        let _ = write!(w, "{}", c.ip());
        let n = 64 - w.len();
        a.str(
            "client.address",
            std::str::from_utf8(&text[..n]).unwrap_or(""),
        );
        a.int("client.port", i64::from(c.port()));
    }
    if let Some(q) = uri.query() {
        a.str("url.query", q);
    }
    let h = req.headers();
    let text = |n: http::header::HeaderName| h.get(n).and_then(|v| v.to_str().ok());
    if let Some(host) = text(http::header::HOST).or_else(|| uri.authority().map(|a| a.as_str())) {
        let (host, port) = split_host(host);
        a.str("server.address", host);
        if let Some(p) = port {
            a.int("server.port", i64::from(p));
        }
    }
    if let Some(ua) = text(http::header::USER_AGENT) {
        a.str("user_agent.original", ua);
    }
    a
}

/// The incoming context: one valid `traceparent` (two are invalid).
fn incoming(h: &http::HeaderMap) -> Option<SpanContext> {
    let mut values = h.get_all(TRACEPARENT).iter();
    let first = values.next()?;
    if values.next().is_some() {
        return None;
    }
    SpanContext::parse(first.as_bytes())
}

/// The trace of a request, if it has one.
pub fn of<B>(req: &http::Request<B>) -> Option<Arc<RequestTrace>> {
    req.extensions().get::<Arc<RequestTrace>>().cloned()
}

impl RequestTrace {
    pub fn context(&self) -> &SpanContext {
        &self.ctx
    }

    /// Spans are recorded for this request.
    pub fn recording(&self) -> bool {
        self.rec.is_some()
    }

    fn times(&self) -> Option<std::sync::MutexGuard<'_, Times>> {
        self.rec
            .as_ref()
            .map(|r| r.times.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The request waited for admission from `from` to `to`.
    pub fn queued(&self, from: Instant, to: Instant) {
        if let Some(mut t) = self.times() {
            t.queued = Some((from, to));
        }
    }

    /// A new instance was made for the request, from `from` to `to`.
    pub fn instantiated(&self, from: Instant, to: Instant) {
        if let Some(mut t) = self.times() {
            t.instantiated = Some((from, to));
        }
    }

    /// Instance `instance` took the request; the guest's time starts.
    pub fn taken(&self, instance: u64, reused: bool) {
        if let Some(mut t) = self.times() {
            t.taken = Some(Instant::now());
            t.instance = instance;
            t.reused = reused;
        }
    }

    /// The guest answered (a response head, or a failure).
    pub fn answered(&self) {
        if let Some(mut t) = self.times() {
            t.answered.get_or_insert_with(Instant::now);
        }
    }

    /// Why the request failed (503, 504, trap): the span's error status.
    pub fn failed(&self, reason: String) {
        if let Some(mut t) = self.times() {
            t.error = Some(reason);
        }
    }

    /// Prepares an outbound request of the guest: injects the context
    /// (the client span's when recording) unless the guest set its own
    /// `traceparent`. The returned span, if any, is ended by the caller.
    pub fn outbound<B>(&self, req: &mut http::Request<B>) -> Option<ClientSpan> {
        let (ctx, span) = match &self.rec {
            Some(rec) => {
                let ctx = self.ctx.child(true);
                let url = req.uri().to_string();
                let span = ClientSpan {
                    tracer: rec.tracer.clone(),
                    ctx,
                    parent: self.ctx.span_id,
                    start: SystemTime::now(),
                    started: Instant::now(),
                    method: req.method().clone(),
                    host: req.uri().host().map(str::to_string),
                    port: req.uri().port_u16().unwrap_or(
                        if req.uri().scheme() == Some(&http::uri::Scheme::HTTPS) {
                            443
                        } else {
                            80
                        },
                    ),
                    url,
                };
                (ctx, Some(span))
            }
            None => (self.ctx, None),
        };
        let h = req.headers_mut();
        if !h.contains_key(TRACEPARENT) {
            h.insert(TRACEPARENT, ctx.header());
            if let Some(ts) = &self.tracestate {
                h.insert(TRACESTATE, ts.clone());
            }
        }
        span
    }

    /// Whether the server span has ended.
    pub fn finished(&self) -> bool {
        self.times().is_some_and(|t| t.finished)
    }

    /// Ends the server span (once; later calls do nothing). Status 0: no
    /// response went out.
    pub fn finish(&self, status: u16, bytes_in: Option<u64>, bytes_out: Option<u64>) {
        let Some(rec) = &self.rec else { return };
        let mut t = rec.times.lock().unwrap_or_else(|e| e.into_inner());
        if std::mem::replace(&mut t.finished, true) {
            return;
        }
        let Some((_, queue)) = &rec.tracer.export else {
            return;
        };
        let end = Instant::now();
        let at = |i: Instant| rec.start + i.saturating_duration_since(rec.started);
        let ms = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64() * 1e3;
        let child = |name: &'static str, (a, b): (Instant, Instant)| {
            let ctx = self.ctx.child(true);
            otlp::Span::new(&Head {
                ctx: &ctx,
                parent: Some(self.ctx.span_id),
                parent_remote: false,
                name,
                kind: Kind::Internal,
                start: at(a),
                end: at(b),
            })
        };
        if let Some(q) = t.queued {
            queue.push(&child("wasmpool.queue", q));
        }
        if let Some(i) = t.instantiated {
            let mut span = child("wasmpool.instantiate", i);
            span.attrs().int("wasmpool.instance.id", t.instance as i64);
            queue.push(&span);
        }
        let mut span = otlp::Span::new(&Head {
            ctx: &self.ctx,
            parent: rec.parent,
            parent_remote: rec.parent.is_some(),
            name: rec.method.as_str(),
            kind: Kind::Server,
            start: rec.start,
            end: at(end),
        });
        let a = span.attrs();
        a.extend(&rec.attrs);
        if status != 0 {
            a.int("http.response.status_code", i64::from(status));
        }
        if let Some(n) = bytes_in {
            a.int("http.request.body.size", n as i64);
        }
        if let Some(n) = bytes_out {
            a.int("http.response.body.size", n as i64);
        }
        if let Some(taken) = t.taken {
            a.int("wasmpool.instance.id", t.instance as i64);
            a.bool("wasmpool.instance.reused", t.reused);
            if let Some(answered) = t.answered {
                a.f64("wasmpool.guest.duration_ms", ms(taken, answered));
            }
        }
        if let Some((from, to)) = t.queued {
            a.f64("wasmpool.queue.wait_ms", ms(from, to));
        }
        if let Some((from, to)) = t.instantiated {
            a.f64("wasmpool.instantiation.duration_ms", ms(from, to));
        }
        match (&t.error, status) {
            (Some(e), _) => span.error(e),
            (None, 500..) => span.error(&format!("HTTP {status}")),
            _ => {}
        }
        queue.push(&span);
    }
}

/// A guest's outbound request, while it waits for its response head.
pub struct ClientSpan {
    tracer: Arc<Tracer>,
    ctx: SpanContext,
    parent: [u8; 8],
    start: SystemTime,
    started: Instant,
    method: http::Method,
    url: String,
    host: Option<String>,
    port: u16,
}

impl ClientSpan {
    /// The response head came (`Ok(status)`) or the request failed.
    pub fn end(self, outcome: Result<u16, String>) {
        let Some((_, queue)) = &self.tracer.export else {
            return;
        };
        let mut span = otlp::Span::new(&Head {
            ctx: &self.ctx,
            parent: Some(self.parent),
            parent_remote: false,
            name: self.method.as_str(),
            kind: Kind::Client,
            start: self.start,
            end: self.start + self.started.elapsed(),
        });
        let a = span.attrs();
        a.str("http.request.method", self.method.as_str());
        a.str("url.full", &self.url);
        a.int("server.port", i64::from(self.port));
        if let Some(h) = &self.host {
            a.str("server.address", h);
        }
        match outcome {
            Ok(code) => {
                a.int("http.response.status_code", i64::from(code));
                if code >= 400 {
                    span.error(&format!("HTTP {code}"));
                }
            }
            Err(e) => {
                a.str("error.type", "request_failed");
                span.error(&e);
            }
        }
        queue.push(&span);
    }
}

fn protocol_version(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "0.9",
        http::Version::HTTP_10 => "1.0",
        http::Version::HTTP_11 => "1.1",
        http::Version::HTTP_2 => "2",
        http::Version::HTTP_3 => "3",
        _ => "",
    }
}

/// `host:port`, `[v6]:port` or a bare host.
fn split_host(h: &str) -> (&str, Option<u16>) {
    if let Some(rest) = h.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((host, tail)) => (host, tail.strip_prefix(':').and_then(|p| p.parse().ok())),
            None => (h, None),
        };
    }
    match h.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => (host, port.parse().ok()),
        _ => (h, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_split_into_address_and_port() {
        assert_eq!(split_host("example.com:8080"), ("example.com", Some(8080)));
        assert_eq!(split_host("example.com"), ("example.com", None));
        assert_eq!(split_host("[::1]:80"), ("::1", Some(80)));
        assert_eq!(split_host("::1"), ("::1", None));
    }
}
