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
pub mod settings;

pub use context::SpanContext;
pub use settings::{OtelFile, Sampler, Settings, SettingsError};

use arc_swap::ArcSwapOption;
use opentelemetry::KeyValue;
use opentelemetry::trace::{SpanKind, Status};
use std::borrow::Cow;
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
    rec: Option<Box<Recording>>,
}

/// A sampled request's span, while it runs.
struct Recording {
    tracer: Arc<Tracer>,
    parent: Option<[u8; 8]>,
    start: SystemTime,
    started: Instant,
    method: http::Method,
    path: String,
    query: Option<String>,
    scheme: &'static str,
    version: http::Version,
    client: Option<std::net::SocketAddr>,
    host: Option<String>,
    user_agent: Option<String>,
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
    let rec = ctx.sampled().then(|| {
        let h = req.headers();
        let text = |n: http::header::HeaderName| {
            h.get(n).and_then(|v| v.to_str().ok()).map(str::to_string)
        };
        Box::new(Recording {
            tracer: tracer.clone(),
            parent: incoming.map(|p| p.span_id),
            start: SystemTime::now(),
            started: Instant::now(),
            method: req.method().clone(),
            path: req.uri().path().to_string(),
            query: req.uri().query().map(str::to_string),
            scheme: match req.uri().scheme_str() {
                Some("https") => "https",
                _ => "http",
            },
            version: req.version(),
            client,
            host: text(http::header::HOST).or_else(|| req.uri().authority().map(|a| a.to_string())),
            user_agent: text(http::header::USER_AGENT),
            times: Mutex::default(),
        })
    });
    let t = Arc::new(RequestTrace {
        ctx,
        tracestate,
        rec,
    });
    req.extensions_mut().insert(t.clone());
    Some(t)
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
        let mut attrs = vec![
            KeyValue::new("http.request.method", rec.method.as_str().to_string()),
            KeyValue::new("url.path", rec.path.clone()),
            KeyValue::new("url.scheme", rec.scheme),
            KeyValue::new("network.protocol.name", "http"),
            KeyValue::new("network.protocol.version", protocol_version(rec.version)),
        ];
        if status != 0 {
            attrs.push(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
        }
        if let Some(n) = bytes_in {
            attrs.push(KeyValue::new("http.request.body.size", n as i64));
        }
        if let Some(n) = bytes_out {
            attrs.push(KeyValue::new("http.response.body.size", n as i64));
        }
        if let Some(c) = rec.client {
            attrs.push(KeyValue::new("client.address", c.ip().to_string()));
            attrs.push(KeyValue::new("client.port", i64::from(c.port())));
        }
        if let Some(q) = &rec.query {
            attrs.push(KeyValue::new("url.query", q.clone()));
        }
        if let Some(h) = &rec.host {
            let (host, port) = split_host(h);
            attrs.push(KeyValue::new("server.address", host.to_string()));
            if let Some(p) = port {
                attrs.push(KeyValue::new("server.port", i64::from(p)));
            }
        }
        if let Some(ua) = &rec.user_agent {
            attrs.push(KeyValue::new("user_agent.original", ua.clone()));
        }
        if let Some(taken) = t.taken {
            attrs.push(KeyValue::new("wasmpool.instance.id", t.instance as i64));
            attrs.push(KeyValue::new("wasmpool.instance.reused", t.reused));
            if let Some(answered) = t.answered {
                attrs.push(KeyValue::new(
                    "wasmpool.guest.duration_ms",
                    ms(taken, answered),
                ));
            }
        }
        if let Some((a, b)) = t.queued {
            attrs.push(KeyValue::new("wasmpool.queue.wait_ms", ms(a, b)));
        }
        if let Some((a, b)) = t.instantiated {
            attrs.push(KeyValue::new(
                "wasmpool.instantiation.duration_ms",
                ms(a, b),
            ));
        }
        let status = match (&t.error, status) {
            (Some(e), _) => Status::Error {
                description: Cow::Owned(e.clone()),
            },
            (None, 500..) => Status::Error {
                description: Cow::Owned(format!("HTTP {status}")),
            },
            _ => Status::Unset,
        };
        if let Some((a, b)) = t.queued {
            let ctx = self.ctx.child(true);
            queue.push(span_data(
                "wasmpool.queue",
                SpanKind::Internal,
                &ctx,
                Some(self.ctx.span_id),
                false,
                (at(a), at(b)),
                Vec::new(),
                Status::Unset,
            ));
        }
        if let Some((a, b)) = t.instantiated {
            let ctx = self.ctx.child(true);
            queue.push(span_data(
                "wasmpool.instantiate",
                SpanKind::Internal,
                &ctx,
                Some(self.ctx.span_id),
                false,
                (at(a), at(b)),
                vec![KeyValue::new("wasmpool.instance.id", t.instance as i64)],
                Status::Unset,
            ));
        }
        queue.push(span_data(
            rec.method.as_str().to_string(),
            SpanKind::Server,
            &self.ctx,
            rec.parent,
            rec.parent.is_some(),
            (rec.start, at(end)),
            attrs,
            status,
        ));
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
        let mut attrs = vec![
            KeyValue::new("http.request.method", self.method.as_str().to_string()),
            KeyValue::new("url.full", self.url),
            KeyValue::new("server.port", i64::from(self.port)),
        ];
        if let Some(h) = self.host {
            attrs.push(KeyValue::new("server.address", h));
        }
        let status = match outcome {
            Ok(code) => {
                attrs.push(KeyValue::new("http.response.status_code", i64::from(code)));
                if code >= 400 {
                    Status::Error {
                        description: Cow::Owned(format!("HTTP {code}")),
                    }
                } else {
                    Status::Unset
                }
            }
            Err(e) => {
                attrs.push(KeyValue::new("error.type", "request_failed"));
                Status::Error {
                    description: Cow::Owned(e),
                }
            }
        };
        let end = self.start + self.started.elapsed();
        queue.push(span_data(
            self.method.as_str().to_string(),
            SpanKind::Client,
            &self.ctx,
            Some(self.parent),
            false,
            (self.start, end),
            attrs,
            status,
        ));
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

#[allow(clippy::too_many_arguments)]
fn span_data(
    name: impl Into<Cow<'static, str>>,
    kind: SpanKind,
    ctx: &SpanContext,
    parent: Option<[u8; 8]>,
    parent_remote: bool,
    (start, end): (SystemTime, SystemTime),
    attributes: Vec<KeyValue>,
    status: Status,
) -> opentelemetry_sdk::trace::SpanData {
    use opentelemetry::trace::{SpanId, TraceFlags, TraceId, TraceState};
    opentelemetry_sdk::trace::SpanData {
        span_context: opentelemetry::trace::SpanContext::new(
            TraceId::from_bytes(ctx.trace_id),
            SpanId::from_bytes(ctx.span_id),
            TraceFlags::new(ctx.flags),
            false,
            TraceState::NONE,
        ),
        parent_span_id: parent.map_or(SpanId::INVALID, SpanId::from_bytes),
        parent_span_is_remote: parent_remote,
        span_kind: kind,
        name: name.into(),
        start_time: start,
        end_time: end,
        attributes,
        dropped_attributes_count: 0,
        events: Default::default(),
        links: Default::default(),
        status,
        instrumentation_scope: scope(),
    }
}

fn scope() -> opentelemetry::InstrumentationScope {
    static SCOPE: std::sync::OnceLock<opentelemetry::InstrumentationScope> =
        std::sync::OnceLock::new();
    SCOPE
        .get_or_init(|| {
            opentelemetry::InstrumentationScope::builder("wasmpool")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build()
        })
        .clone()
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
