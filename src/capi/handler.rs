//! `wasmpool_handler`: a loaded component with its own engine threads.

use super::wasmpool_result::{self, *};
use super::{Failure, boundary, bytes_arg, handle_ref, str_arg};
use super::{wasmpool_completion_mode, wasmpool_config, wasmpool_request, wasmpool_response};
use crate::engine::admission::Rejection;
use crate::engine::component::Source;
use crate::engine::pool::{Pool, RequestError};
use crate::error::LoadError;
use crate::telemetry::trace::{self, RequestTrace, Tracer};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::cell::Cell;
use std::collections::VecDeque;
use std::ffi::{c_char, c_int, c_void};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Called once per pushed request with its outcome. `response` is NULL
/// unless `result` is `WASMPOOL_OK`; the callee owns it and frees it with
/// `wasmpool_response_free`. `wasmpool_last_error()` on the calling thread
/// describes a failure while the callback runs.
pub type wasmpool_response_callback = Option<
    unsafe extern "C" fn(
        userdata: *mut c_void,
        result: wasmpool_result,
        response: *mut wasmpool_response,
    ),
>;

type Callback = unsafe extern "C" fn(*mut c_void, wasmpool_result, *mut wasmpool_response);

/// Live figures of a handler, filled by `wasmpool_handler_stats`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct wasmpool_stats {
    /// Requests completed with a response (callback result `WASMPOOL_OK`).
    pub requests_handled: u64,
    /// Requests completed with an error result.
    pub requests_failed: u64,
    /// Instances alive now.
    pub instances_live: u64,
    /// Instances created so far.
    pub instances_created: u64,
    /// Requests served by an instance that had served one before.
    pub instances_reused: u64,
    /// Requests waiting for a free slot now.
    pub queued: u64,
    /// Requests pushed whose callback has not run yet.
    pub in_flight: u64,
}

thread_local! {
    /// Set on the handler's own threads.
    static ENGINE_THREAD: Cell<bool> = const { Cell::new(false) };
    /// Set while a completion callback runs on this thread.
    static IN_CALLBACK: Cell<bool> = const { Cell::new(false) };
}

/// A loaded component and the engine threads that serve it. Create with
/// `wasmpool_handler_new`; thread-safe (any thread may push, call, poll or
/// read stats); free with `wasmpool_handler_free`.
pub struct wasmpool_handler {
    rt: Option<tokio::runtime::Runtime>,
    /// The component new requests go to (`wasmpool_handler_reload` swaps
    /// it; running requests finish on the one they started on).
    pool: arc_swap::ArcSwap<Pool>,
    /// Counters and the memory budget, kept across reloads.
    engine: crate::engine::stats::Shared,
    /// The config the handler was made with (reloads without one reuse it).
    cfg: Mutex<(crate::config::Knobs, u64)>,
    /// Trace context and export for pushed requests (`None`: both off).
    tracer: arc_swap::ArcSwapOption<Tracer>,
    shared: Arc<Shared>,
}

pub(crate) struct Shared {
    mode: wasmpool_completion_mode,
    /// Pushes start their request on the pushing thread (see `inline`).
    inline: bool,
    /// Where engine-mode ready callbacks run when not already on an
    /// engine thread.
    rt: tokio::runtime::Handle,
    closing: AtomicBool,
    /// Requests whose callback has not run yet; `idle` is signalled when it
    /// drops.
    in_flight: Mutex<u64>,
    idle: Condvar,
    /// Completions and ready callbacks waiting for
    /// `wasmpool_handler_poll` (poll mode).
    queue: Mutex<VecDeque<Item>>,
    /// Readable (non-zero) while `queue` is not empty.
    efd: OwnedFd,
    handled: AtomicU64,
    failed: AtomicU64,
}

pub(crate) struct SendPtr<T>(pub(crate) *mut T);
// SAFETY: the pointers are handed back to C exactly once; the C side
// promises they may be used from the thread the callback runs on.
unsafe impl<T> Send for SendPtr<T> {}
// SAFETY: as above; the pointer is only copied, never dereferenced here.
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}

/// Something for the host to run in `wasmpool_handler_poll`.
enum Item {
    Completion(Ready),
    /// A stream the host waits on can go on (its callback runs only if
    /// the host still has the writer or response).
    Ready(std::sync::Weak<super::stream::Pipe>),
}

/// Runs a stream's ready callback where the completion mode says.
/// Weak: streams outliving their handler must not keep it (and its
/// runtime) alive.
#[derive(Clone)]
pub(crate) struct Notifier(std::sync::Weak<Shared>);

impl Notifier {
    fn new(shared: &Arc<Shared>) -> Notifier {
        Notifier(Arc::downgrade(shared))
    }

    pub(crate) fn ready(
        &self,
        pipe: std::sync::Weak<super::stream::Pipe>,
        cb: unsafe extern "C" fn(*mut c_void),
        ud: SendPtr<c_void>,
    ) {
        let Some(shared) = self.0.upgrade() else {
            return;
        };
        match shared.mode {
            wasmpool_completion_mode::WASMPOOL_COMPLETION_ENGINE => {
                if ENGINE_THREAD.with(Cell::get) {
                    run_ready(cb, ud);
                } else {
                    shared.rt.spawn(async move { run_ready(cb, ud) });
                }
            }
            wasmpool_completion_mode::WASMPOOL_COMPLETION_POLL => {
                shared.enqueue(Item::Ready(pipe));
            }
        }
    }
}

fn run_ready(cb: unsafe extern "C" fn(*mut c_void), ud: SendPtr<c_void>) {
    IN_CALLBACK.with(|c| c.set(true));
    // SAFETY: the host gave us this callback and userdata for such calls.
    unsafe { cb(ud.0) };
    IN_CALLBACK.with(|c| c.set(false));
}

/// A completion waiting in the poll queue.
struct Ready {
    cb: Callback,
    userdata: SendPtr<c_void>,
    result: wasmpool_result,
    message: String,
    response: SendPtr<wasmpool_response>,
}

impl Shared {
    fn finish_one(&self) {
        let mut n = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        *n -= 1;
        if *n == 0 {
            self.idle.notify_all();
        }
    }

    /// Counts a completed request for `wasmpool_handler_stats`.
    fn count(&self, outcome: &Result<wasmpool_response, Failure>) {
        let counter = if outcome.is_ok() {
            &self.handled
        } else {
            &self.failed
        };
        counter.fetch_add(1, Relaxed);
    }

    /// Queues `item` for `wasmpool_handler_poll`. The fd is set when the
    /// queue stops being empty and reset when it runs empty, both under
    /// the queue's lock: it is readable exactly while items wait.
    fn enqueue(&self, item: Item) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.push_back(item);
        if q.len() == 1 {
            self.signal();
        }
    }

    fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a live u64 to our eventfd.
        unsafe { libc::write(self.efd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    fn drain_signal(&self) {
        let mut v: u64 = 0;
        // SAFETY: reading 8 bytes into a live u64 from our non-blocking eventfd.
        unsafe { libc::read(self.efd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }

    /// Hands an outcome to the host: now (engine mode) or via the queue.
    fn deliver(
        &self,
        cb: Callback,
        userdata: SendPtr<c_void>,
        outcome: Result<wasmpool_response, Failure>,
    ) {
        self.count(&outcome);
        let (result, message, response) = match outcome {
            Ok(r) => (WASMPOOL_OK, String::new(), Box::into_raw(Box::new(r))),
            Err(f) => (f.code, f.message, std::ptr::null_mut()),
        };
        let ready = Ready {
            cb,
            userdata,
            result,
            message,
            response: SendPtr(response),
        };
        match self.mode {
            wasmpool_completion_mode::WASMPOOL_COMPLETION_ENGINE => {
                run_callback(ready);
                self.finish_one();
            }
            wasmpool_completion_mode::WASMPOOL_COMPLETION_POLL => {
                self.enqueue(Item::Completion(ready));
            }
        }
    }

    /// Runs up to `max` queued callbacks on this thread.
    fn poll(&self, max: usize) -> usize {
        let batch: Vec<Item> = {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            let n = max.min(q.len());
            let batch = q.drain(..n).collect();
            if q.is_empty() {
                self.drain_signal();
            }
            batch
        };
        let n = batch.len();
        for item in batch {
            match item {
                Item::Completion(r) => {
                    run_callback(r);
                    self.finish_one();
                }
                Item::Ready(pipe) => {
                    if let Some((cb, ud)) = pipe.upgrade().and_then(|p| p.host_callback()) {
                        run_ready(cb, ud)
                    }
                }
            }
        }
        n
    }
}

fn run_callback(r: Ready) {
    if r.result != WASMPOOL_OK {
        super::set_last_error(&r.message);
    }
    IN_CALLBACK.with(|c| c.set(true));
    // SAFETY: the host gave us this callback and userdata for exactly one call.
    unsafe { (r.cb)(r.userdata.0, r.result, r.response.0) };
    IN_CALLBACK.with(|c| c.set(false));
}

/// Guarantees that a pushed request's callback runs exactly once: if the
/// task is dropped before it completes (a panic, a runtime shutdown), the
/// drop delivers an error instead.
struct Completion {
    shared: Arc<Shared>,
    cb: Callback,
    userdata: Option<SendPtr<c_void>>,
}

impl Completion {
    fn complete(mut self, outcome: Result<wasmpool_response, Failure>) {
        if let Some(u) = self.userdata.take() {
            self.shared.deliver(self.cb, u, outcome);
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if let Some(u) = self.userdata.take() {
            let f = if std::thread::panicking() {
                Failure::new(WASMPOOL_PANIC, "the request's task panicked")
            } else {
                Failure::new(
                    WASMPOOL_SHUTTING_DOWN,
                    "the request was dropped at shutdown",
                )
            };
            self.shared.deliver(self.cb, u, Err(f));
        }
    }
}

/// The body the guest gets: what the host set, or the stream it writes
/// (at most `limit` bytes).
fn request_body(req: &mut wasmpool_request, limit: u64) -> wasmtime_wasi_http::WasiBody {
    match req.stream.take() {
        Some(pipe) => super::stream::PipeBody::new(pipe, limit).boxed_unsync(),
        None => Full::new(std::mem::take(&mut req.body))
            .map_err(|e: std::convert::Infallible| match e {})
            .boxed_unsync(),
    }
}

fn head_of(parts: &http::response::Parts) -> Vec<(Bytes, Bytes)> {
    parts
        .headers
        .iter()
        .map(|(n, v)| {
            (
                Bytes::copy_from_slice(n.as_str().as_bytes()),
                Bytes::copy_from_slice(v.as_bytes()),
            )
        })
        .collect()
}

fn request_failure(e: RequestError) -> Failure {
    let code = match &e {
        RequestError::Rejected(Rejection::Closed) => WASMPOOL_SHUTTING_DOWN,
        RequestError::Rejected(_) | RequestError::Instantiate(_) => WASMPOOL_OVERLOADED,
        RequestError::Timeout => WASMPOOL_TIMEOUT,
        RequestError::Trap(_) => WASMPOOL_TRAP,
        RequestError::Guest(_) => WASMPOOL_GUEST_ERROR,
    };
    Failure::new(code, e.to_string())
}

/// Runs one request to a complete response, all within `request-timeout`;
/// a body over `max_response` bytes fails with `WASMPOOL_TOO_LARGE`.
async fn run(
    pool: Arc<Pool>,
    mut req: wasmpool_request,
    max_response: u64,
    tracer: Option<Arc<Tracer>>,
) -> Result<wasmpool_response, Failure> {
    let deadline = Instant::now() + pool.knobs().request_timeout;
    let mut r = build(&pool, &mut req)?;
    let span = SpanGuard::begin(tracer, &mut r);
    let r = run_full(&pool, r, max_response, deadline).await;
    match &r {
        Ok(resp) => span.finish(
            resp.status,
            match &resp.body {
                super::message::ResponseBody::Full { bytes, .. } => Some(bytes.len() as u64),
                super::message::ResponseBody::Stream(_) => None,
            },
        ),
        Err(f) => {
            span.failed(f);
            span.finish(failure_status(f), None);
        }
    }
    r
}

async fn run_full(
    pool: &Pool,
    r: http::Request<wasmtime_wasi_http::WasiBody>,
    max_response: u64,
    deadline: Instant,
) -> Result<wasmpool_response, Failure> {
    let resp = pool.handle(r).await.map_err(request_failure)?;
    let (parts, mut body) = resp.into_parts();
    let left = deadline.saturating_duration_since(Instant::now());
    let collect = async {
        let mut data = bytes::BytesMut::new();
        let mut trailers = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                Failure::new(
                    WASMPOOL_GUEST_ERROR,
                    format!("the response body failed: {e}"),
                )
            })?;
            match frame.into_data() {
                Ok(d) => {
                    if (data.len() + d.len()) as u64 > max_response {
                        return Err(Failure::new(
                            WASMPOOL_TOO_LARGE,
                            format!(
                                "the response body is larger than max_response_size ({max_response} bytes)"
                            ),
                        ));
                    }
                    data.extend_from_slice(&d);
                }
                Err(f) => {
                    if let Ok(t) = f.into_trailers() {
                        trailers.extend(t.iter().map(|(n, v)| {
                            (
                                Bytes::copy_from_slice(n.as_str().as_bytes()),
                                Bytes::copy_from_slice(v.as_bytes()),
                            )
                        }));
                    }
                }
            }
        }
        Ok((data.freeze(), trailers))
    };
    let (data, trailers) = match tokio::time::timeout(left, collect).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(Failure::new(
                WASMPOOL_TIMEOUT,
                "the response body did not finish within the request timeout",
            ));
        }
    };
    let mut resp = wasmpool_response::full(parts.status.as_u16(), head_of(&parts), data, trailers);
    resp.served = parts.extensions.get().copied();
    Ok(resp)
}

/// Runs one request to its response head; the body streams through a
/// pipe the host reads (a task copies it as the host makes room).
async fn run_streaming(
    pool: Arc<Pool>,
    mut req: wasmpool_request,
    cancel: Option<Arc<super::stream::CancelState>>,
    notifier: Notifier,
    tracer: Option<Arc<Tracer>>,
) -> Result<wasmpool_response, Failure> {
    let mut r = build(&pool, &mut req)?;
    let span = SpanGuard::begin(tracer, &mut r);
    let resp = match pool.handle(r).await.map_err(request_failure) {
        Ok(resp) => resp,
        Err(f) => {
            span.failed(&f);
            span.finish(failure_status(&f), None);
            return Err(f);
        }
    };
    let (parts, body) = resp.into_parts();
    let pipe = super::stream::Pipe::new(super::stream::STREAM_BUFFER);
    pipe.set_notifier(notifier);
    if let Some(c) = &cancel {
        c.finish(Some(&pipe));
    }
    let status = parts.status.as_u16();
    let pump = super::stream::pump(pipe.clone(), body);
    // The span ends with the body (or when the host frees the response).
    // The pump starts here: a body the guest already wrote is in the pipe
    // before the host sees the head, and goes out with it.
    super::inline::run(
        &tokio::runtime::Handle::current(),
        Box::pin(async move {
            pump.await;
            span.finish(status, None);
        }),
    );
    Ok(wasmpool_response {
        status: parts.status.as_u16(),
        headers: head_of(&parts),
        body: super::message::ResponseBody::Stream(super::stream::StreamBody { pipe }),
        trailers: std::sync::OnceLock::new(),
        served: parts.extensions.get().copied(),
    })
}

/// The engine's request from the host's; a body set whole must be within
/// `max-request-body-size`.
fn build(
    pool: &Pool,
    req: &mut wasmpool_request,
) -> Result<http::Request<wasmtime_wasi_http::WasiBody>, Failure> {
    let limit = pool.knobs().max_request_body_size;
    if req.body.len() as u64 > limit {
        return Err(Failure::new(
            WASMPOOL_TOO_LARGE,
            format!(
                "the request body ({} bytes) is larger than max_request_body_size ({limit} bytes)",
                req.body.len()
            ),
        ));
    }
    let mut r = http::Request::new(request_body(req, limit));
    *r.method_mut() = std::mem::take(&mut req.method);
    *r.uri_mut() = std::mem::take(&mut req.uri);
    *r.headers_mut() = std::mem::take(&mut req.headers);
    Ok(r)
}

/// The longest `wasmpool_handler_free` waits for queued spans to go out.
const TRACE_FLUSH: Duration = Duration::from_secs(5);

/// The tracer `cfg` asks for; `None` when it asks for nothing.
fn new_tracer(cfg: &wasmpool_config) -> Result<Option<Arc<Tracer>>, Failure> {
    let settings = cfg.trace_settings()?;
    if !settings.propagate && settings.export.is_none() {
        return Ok(None);
    }
    Tracer::start(settings)
        .map(|t| Some(Arc::new(t)))
        .map_err(|e| Failure::new(WASMPOOL_IO, format!("cannot start the trace exporter: {e}")))
}

/// The HTTP status the server would have answered a failure with (0:
/// none, as for a cancelled request).
fn failure_status(f: &Failure) -> u16 {
    match f.code {
        WASMPOOL_OVERLOADED | WASMPOOL_SHUTTING_DOWN => 503,
        WASMPOOL_TIMEOUT => 504,
        WASMPOOL_TRAP | WASMPOOL_GUEST_ERROR => 500,
        WASMPOOL_TOO_LARGE => 413,
        _ => 0,
    }
}

/// Ends a pushed request's server span exactly once: by the request's
/// outcome, or, when the request is dropped first (cancelled, handler
/// freed), as cancelled.
struct SpanGuard(Option<Arc<RequestTrace>>);

impl SpanGuard {
    fn begin(
        tracer: Option<Arc<Tracer>>,
        r: &mut http::Request<wasmtime_wasi_http::WasiBody>,
    ) -> SpanGuard {
        SpanGuard(tracer.and_then(|t| trace::begin_with(&t, r, None)))
    }

    fn failed(&self, f: &Failure) {
        if let Some(t) = &self.0 {
            t.failed(f.message.clone());
        }
    }

    fn finish(&self, status: u16, bytes_out: Option<u64>) {
        if let Some(t) = &self.0 {
            t.finish(status, None, bytes_out);
        }
    }
}

impl Drop for SpanGuard {
    fn drop(&mut self) {
        if let Some(t) = &self.0
            && !t.finished()
        {
            t.failed("the request was cancelled".into());
            t.finish(0, None, None);
        }
    }
}

fn load_failure(e: LoadError) -> Failure {
    let code = match &e {
        LoadError::Read { .. } => WASMPOOL_IO,
        LoadError::Config(_) => WASMPOOL_INVALID_ARGUMENT,
        _ => WASMPOOL_COMPONENT_ERROR,
    };
    Failure::new(code, e.to_string())
}

/// Loads `source` with `knobs`, drawing on `engine` (counters and memory
/// budget), and proves it links; on `rt`, off its engine threads.
fn load_pool(
    rt: &tokio::runtime::Runtime,
    knobs: crate::config::Knobs,
    source: Source,
    engine: &crate::engine::stats::Shared,
) -> Result<Pool, Failure> {
    let engine = engine.clone();
    rt.block_on(async move {
        let pool = tokio::task::spawn_blocking(move || {
            let pool = Pool::load_shared(knobs, &source, &engine)?;
            engine.apply(pool.knobs())?;
            Ok::<_, LoadError>(pool)
        })
        .await
        .map_err(|e| Failure::new(WASMPOOL_PANIC, format!("loading panicked: {e}")))?
        .map_err(load_failure)?;
        pool.probe().await.map_err(load_failure)?;
        // As the server says it (a host's logger: wasmpool_set_logger).
        tracing::info!(component = pool.name(), world = %pool.world(), cache = ?pool.cache_outcome(), "component ready");
        Ok::<_, Failure>(pool)
    })
}

/// The knobs with the handler's share (1/`share`) of the memory budget,
/// resolved now (an automatic budget from the cgroup or the machine).
fn shared_budget(
    knobs: &crate::config::Knobs,
    share: u32,
) -> Result<crate::config::Knobs, Failure> {
    use crate::config::MemoryBudgetArg;
    let mut knobs = knobs.clone();
    if share > 1 {
        let (bytes, _) = crate::engine::budget::resolve(knobs.memory_budget, 0)
            .map_err(|e| Failure::invalid(e.to_string()))?;
        knobs.memory_budget = MemoryBudgetArg::Bytes((bytes / u64::from(share)).max(64 << 10));
    }
    Ok(knobs)
}

fn new_handler(cfg: &wasmpool_config, source: Source) -> Result<*mut wasmpool_handler, Failure> {
    if cfg.inline && cfg.completion != wasmpool_completion_mode::WASMPOOL_COMPLETION_POLL {
        return Err(Failure::invalid(
            "inline pushes need WASMPOOL_COMPLETION_POLL (callbacks on the pushing thread's loop)",
        ));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.engine_threads)
        .thread_name("wasmpool-engine")
        .on_thread_start(|| ENGINE_THREAD.with(|c| c.set(true)))
        .enable_all()
        .build()
        .map_err(|e| Failure::new(WASMPOOL_IO, format!("cannot start engine threads: {e}")))?;
    cfg.knobs
        .validate()
        .map_err(|e| Failure::invalid(e.to_string()))?;
    let knobs = shared_budget(&cfg.knobs, cfg.budget_share)?;
    let engine =
        crate::engine::stats::Shared::new(&knobs).map_err(|e| Failure::invalid(e.to_string()))?;
    let tracer = new_tracer(cfg)?;
    let pool = load_pool(&rt, knobs.clone(), source, &engine)?;
    // SAFETY: plain eventfd creation; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(Failure::new(
            WASMPOOL_IO,
            format!("eventfd: {}", std::io::Error::last_os_error()),
        ));
    }
    let shared = Arc::new(Shared {
        mode: cfg.completion,
        inline: cfg.inline,
        rt: rt.handle().clone(),
        closing: AtomicBool::new(false),
        in_flight: Mutex::new(0),
        idle: Condvar::new(),
        queue: Mutex::new(VecDeque::new()),
        // SAFETY: `fd` is a fresh descriptor we own.
        efd: unsafe { OwnedFd::from_raw_fd(fd) },
        handled: AtomicU64::new(0),
        failed: AtomicU64::new(0),
    });
    Ok(Box::into_raw(Box::new(wasmpool_handler {
        rt: Some(rt),
        pool: arc_swap::ArcSwap::from_pointee(pool),
        engine,
        cfg: Mutex::new((knobs, cfg.max_response_size)),
        tracer: arc_swap::ArcSwapOption::new(tracer),
        shared,
    })))
}

/// Loads the component at `component_path` (from the compile cache when
/// possible), proves it links by creating one instance, and starts the
/// engine threads. `cfg` is only read, not consumed. On success `*out`
/// owns the new handler. Errors: `WASMPOOL_IO` (unreadable file),
/// `WASMPOOL_COMPONENT_ERROR` (not a component, wrong world, does not
/// compile or link; see `wasmpool_last_error`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_handler_new(
    cfg: *const wasmpool_config,
    component_path: *const c_char,
    out: *mut *mut wasmpool_handler,
) -> wasmpool_result {
    boundary(|| {
        if out.is_null() {
            return Err(Failure::null("out"));
        }
        // SAFETY: see `handle_ref` and `str_arg`.
        let (cfg, path) = unsafe {
            (
                handle_ref(cfg, "cfg")?,
                str_arg(component_path, "component_path")?,
            )
        };
        let h = new_handler(cfg, Source::File(path.into()))?;
        // SAFETY: checked for NULL above.
        unsafe { *out = h };
        Ok(())
    })
}

/// Like `wasmpool_handler_new` with the component's bytes (copied).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_handler_new_from_bytes(
    cfg: *const wasmpool_config,
    bytes: *const u8,
    len: usize,
    out: *mut *mut wasmpool_handler,
) -> wasmpool_result {
    boundary(|| {
        if out.is_null() {
            return Err(Failure::null("out"));
        }
        // SAFETY: see `handle_ref` and `bytes_arg`.
        let (cfg, b) = unsafe { (handle_ref(cfg, "cfg")?, bytes_arg(bytes, len, "bytes")?) };
        if b.is_empty() {
            return Err(Failure::invalid("the component is empty"));
        }
        let h = new_handler(
            cfg,
            Source::Bytes {
                name: "component".into(),
                bytes: b.to_vec(),
            },
        )?;
        // SAFETY: checked for NULL above.
        unsafe { *out = h };
        Ok(())
    })
}

/// Takes ownership of a request pointer (so every path frees it).
unsafe fn take_request(req: *mut wasmpool_request) -> Option<Box<wasmpool_request>> {
    // SAFETY: a non-NULL request came from `wasmpool_request_new` (documented).
    (!req.is_null()).then(|| unsafe { Box::from_raw(req) })
}

impl wasmpool_handler {
    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("runtime lives until free")
    }

    fn admit(&self) -> Result<(), Failure> {
        if self.shared.closing.load(Relaxed) {
            return Err(Failure::new(
                WASMPOOL_SHUTTING_DOWN,
                "the handler is being freed",
            ));
        }
        *self
            .shared
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner()) += 1;
        Ok(())
    }
}

/// Sends `req` to the component. Always takes ownership of `req`. On
/// `WASMPOOL_OK`, `cb(userdata, result, response)` runs exactly once later,
/// with the whole response (its body at most `max_response_size` bytes,
/// else `WASMPOOL_TOO_LARGE`): on an engine thread
/// (`WASMPOOL_COMPLETION_ENGINE`, keep it short and do not block in it) or
/// inside `wasmpool_handler_poll` on the polling thread
/// (`WASMPOOL_COMPLETION_POLL`). A cancelled request
/// (`wasmpool_request_cancel_handle`) completes with `WASMPOOL_CANCELLED`.
/// On any other result the callback never runs. Pushing after
/// `wasmpool_handler_free` started is `WASMPOOL_SHUTTING_DOWN`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_handler_push(
    h: *mut wasmpool_handler,
    req: *mut wasmpool_request,
    cb: wasmpool_response_callback,
    userdata: *mut c_void,
) -> wasmpool_result {
    // SAFETY: see `take_request`.
    let req = unsafe { take_request(req) };
    push(h, req, cb, userdata, false)
}

/// Like `wasmpool_handler_push`, but `cb` runs as soon as the response
/// head (status and headers) is there, and the body streams: read it with
/// `wasmpool_response_read`, as fast as the host wants (the guest waits for
/// the host, the engine buffers at most 256 KiB). A streamed body has no
/// overall deadline (the head must come within the request timeout), and
/// it outlives neither the response (`wasmpool_response_free` stops it)
/// nor the handler (reads then say `WASMPOOL_SHUTTING_DOWN`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_handler_push_streaming(
    h: *mut wasmpool_handler,
    req: *mut wasmpool_request,
    cb: wasmpool_response_callback,
    userdata: *mut c_void,
) -> wasmpool_result {
    // SAFETY: see `take_request`.
    let req = unsafe { take_request(req) };
    push(h, req, cb, userdata, true)
}

fn push(
    h: *mut wasmpool_handler,
    req: Option<Box<wasmpool_request>>,
    cb: wasmpool_response_callback,
    userdata: *mut c_void,
    streaming: bool,
) -> wasmpool_result {
    boundary(|| {
        // SAFETY: see `handle_ref`.
        let h = unsafe { handle_ref(h, "handler") }?;
        let mut req = req.ok_or_else(|| Failure::null("req"))?;
        let cb = cb.ok_or_else(|| Failure::null("cb"))?;
        h.admit()?;
        if let Some(pipe) = &req.stream {
            pipe.set_notifier(Notifier::new(&h.shared));
        }
        let completion = Completion {
            shared: h.shared.clone(),
            cb,
            userdata: Some(SendPtr(userdata)),
        };
        let pool = h.pool.load_full();
        let tracer = h.tracer.load_full();
        let max_response = h.cfg.lock().unwrap_or_else(|e| e.into_inner()).1;
        let cancel = req.cancel.take();
        let upload = req.stream.clone();
        let notifier = Notifier::new(&h.shared);
        let task = async move {
            let work = async {
                if streaming {
                    run_streaming(pool, *req, cancel.clone(), notifier, tracer).await
                } else {
                    run(pool, *req, max_response, tracer).await
                }
            };
            let outcome = match &cancel {
                None => work.await,
                Some(c) => {
                    // Dropping the work stops the guest's part of it.
                    let outcome = tokio::select! {
                        r = work => r,
                        _ = c.cancelled() => {
                            // A guest that answered first may still read
                            // the body on its own: that read fails now.
                            if let Some(p) = &upload {
                                p.cancel("the request was cancelled");
                            }
                            Err(Failure::new(WASMPOOL_CANCELLED, "the request was cancelled"))
                        }
                    };
                    if !streaming || outcome.is_err() {
                        c.finish(None);
                    }
                    outcome
                }
            };
            completion.complete(outcome);
        };
        if h.shared.inline {
            // Boxed and, when it completes here, freed on this thread.
            super::inline::run(h.rt().handle(), Box::pin(task));
        } else {
            // The request's state machine is large (the guest call's
            // future): box it on the engine thread that first polls it, so
            // it is allocated and freed by engine threads. Built on the
            // pushing thread instead, every request's memory went back to
            // that thread's malloc arena from another thread, which trimmed
            // and refaulted its heap (0.6 page faults a request).
            h.rt().spawn(async move { Box::pin(task).await });
        }
        Ok(())
    })
}

/// Loads another component into a live handler: new requests go to it,
/// requests already running finish on the old one (as SIGHUP does for the
/// server). `cfg` NULL keeps the handler's knobs, else its knobs are taken
/// (its completion mode and engine threads are not: they stay). Blocks
/// while the component compiles (or loads from the cache) and one instance
/// starts. On failure the old component keeps serving and the result says
/// why (`WASMPOOL_IO`, `WASMPOOL_COMPONENT_ERROR`,
/// `WASMPOOL_INVALID_ARGUMENT`). Counters carry on. Not on an engine
/// thread or in a callback (`WASMPOOL_MISUSE`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_handler_reload(
    h: *mut wasmpool_handler,
    cfg: *const wasmpool_config,
    component_path: *const c_char,
) -> wasmpool_result {
    boundary(|| {
        // SAFETY: see `handle_ref` and `str_arg`.
        let h = unsafe { handle_ref(h, "handler") }?;
        // SAFETY: as above.
        let path = unsafe { str_arg(component_path, "component_path") }?;
        // SAFETY: `cfg` is NULL or a live config (documented).
        let cfg = unsafe { cfg.as_ref() };
        h.reload(cfg, Source::File(path.into()))
    })
}

/// Like `wasmpool_handler_reload` with the component's bytes (copied).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_handler_reload_from_bytes(
    h: *mut wasmpool_handler,
    cfg: *const wasmpool_config,
    bytes: *const u8,
    len: usize,
) -> wasmpool_result {
    boundary(|| {
        // SAFETY: see `handle_ref` and `bytes_arg`.
        let (h, b) = unsafe { (handle_ref(h, "handler")?, bytes_arg(bytes, len, "bytes")?) };
        if b.is_empty() {
            return Err(Failure::invalid("the component is empty"));
        }
        // SAFETY: `cfg` is NULL or a live config (documented).
        let cfg = unsafe { cfg.as_ref() };
        h.reload(
            cfg,
            Source::Bytes {
                name: "component".into(),
                bytes: b.to_vec(),
            },
        )
    })
}

impl wasmpool_handler {
    fn reload(&self, cfg: Option<&wasmpool_config>, source: Source) -> Result<(), Failure> {
        if ENGINE_THREAD.with(Cell::get) || IN_CALLBACK.with(Cell::get) {
            return Err(Failure::new(
                WASMPOOL_MISUSE,
                "wasmpool_handler_reload cannot run on an engine thread or in a callback",
            ));
        }
        let (knobs, max_response) = match cfg {
            Some(c) => (
                shared_budget(&c.knobs, c.budget_share)?,
                c.max_response_size,
            ),
            None => self.cfg.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        };
        knobs
            .validate()
            .map_err(|e| Failure::invalid(e.to_string()))?;
        let tracer = cfg.map(new_tracer).transpose()?;
        let pool = load_pool(self.rt(), knobs.clone(), source, &self.engine)?;
        self.pool.store(Arc::new(pool));
        if let Some(t) = tracer {
            self.tracer.store(t);
        }
        *self.cfg.lock().unwrap_or_else(|e| e.into_inner()) = (knobs, max_response);
        self.engine.stats.reloads.fetch_add(1, Relaxed);
        Ok(())
    }
}

/// Sends `req` and blocks until the whole response is there; `*out` then
/// owns it. Always takes ownership of `req`. Calling it on an engine
/// thread or inside a completion callback would deadlock and returns
/// `WASMPOOL_MISUSE` instead.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_handler_call(
    h: *mut wasmpool_handler,
    req: *mut wasmpool_request,
    out: *mut *mut wasmpool_response,
) -> wasmpool_result {
    // SAFETY: see `take_request`.
    let req = unsafe { take_request(req) };
    boundary(|| {
        // SAFETY: see `handle_ref`.
        let h = unsafe { handle_ref(h, "handler") }?;
        let req = req.ok_or_else(|| Failure::null("req"))?;
        if out.is_null() {
            return Err(Failure::null("out"));
        }
        if ENGINE_THREAD.with(Cell::get) || IN_CALLBACK.with(Cell::get) {
            return Err(Failure::new(
                WASMPOOL_MISUSE,
                "wasmpool_handler_call cannot run on an engine thread or in a callback",
            ));
        }
        h.admit()?;
        if let Some(pipe) = &req.stream {
            pipe.set_notifier(Notifier::new(&h.shared));
        }
        let pool = h.pool.load_full();
        let max_response = h.cfg.lock().unwrap_or_else(|e| e.into_inner()).1;
        let shared = h.shared.clone();
        let outcome = h.rt().block_on(async move {
            let r = tokio::spawn(run(pool, *req, max_response, h.tracer.load_full())).await;
            r.unwrap_or_else(|e| {
                Err(Failure::new(
                    WASMPOOL_PANIC,
                    format!("the request's task failed: {e}"),
                ))
            })
        });
        shared.count(&outcome);
        shared.finish_one();
        let resp = outcome?;
        // SAFETY: checked for NULL above.
        unsafe { *out = Box::into_raw(Box::new(resp)) };
        Ok(())
    })
}

/// A descriptor that is readable while completions wait to be run by
/// `wasmpool_handler_poll` (poll mode; in engine mode it never becomes
/// readable). Owned by the handler: do not close it. -1 if `h` is NULL.
/// It is reset only when the queue runs empty: an edge-triggered watcher
/// (epoll with EPOLLET, as nginx uses) must call `wasmpool_handler_poll`
/// until it returns 0.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_handler_completion_fd(h: *mut wasmpool_handler) -> c_int {
    // SAFETY: see `handle_ref`.
    match unsafe { handle_ref(h, "handler") } {
        Ok(h) => h.shared.efd.as_raw_fd(),
        Err(f) => {
            super::set_last_error(&f.message);
            -1
        }
    }
}

/// Runs up to `max` waiting completion callbacks on the calling thread and
/// returns how many ran (0 in engine mode, or if `h` is NULL).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_handler_poll(h: *mut wasmpool_handler, max: usize) -> usize {
    let mut n = 0;
    boundary(|| {
        // SAFETY: see `handle_ref`.
        let h = unsafe { handle_ref(h, "handler") }?;
        n = h.shared.poll(max);
        Ok(())
    });
    n
}

/// Fills `*out` with the handler's live figures.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_handler_stats(
    h: *const wasmpool_handler,
    out: *mut wasmpool_stats,
) -> wasmpool_result {
    boundary(|| {
        // SAFETY: see `handle_ref`.
        let h = unsafe { handle_ref(h, "handler") }?;
        if out.is_null() {
            return Err(Failure::null("out"));
        }
        let s = h.engine.stats.snapshot();
        let stats = wasmpool_stats {
            requests_handled: h.shared.handled.load(Relaxed),
            requests_failed: h.shared.failed.load(Relaxed),
            instances_live: s.instances_live,
            instances_created: s.instances_created,
            instances_reused: s.instances_reused,
            queued: s.queued,
            in_flight: *h.shared.in_flight.lock().unwrap_or_else(|e| e.into_inner()),
        };
        // SAFETY: checked for NULL above.
        unsafe { *out = stats };
        Ok(())
    })
}

/// Stops taking requests, waits for every pushed request to complete
/// (their callbacks still run: on engine threads, or on this thread in poll
/// mode), then stops the engine threads and frees the handler. NULL is
/// ignored. Calling it from inside a completion callback or on an engine
/// thread is `WASMPOOL_MISUSE`, and the handler is then left alone.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_handler_free(h: *mut wasmpool_handler) -> wasmpool_result {
    boundary(|| {
        if h.is_null() {
            return Ok(());
        }
        if ENGINE_THREAD.with(Cell::get) || IN_CALLBACK.with(Cell::get) {
            return Err(Failure::new(
                WASMPOOL_MISUSE,
                "wasmpool_handler_free cannot run inside a completion callback or on an engine thread",
            ));
        }
        // SAFETY: `h` came from `wasmpool_handler_new*` and is freed once (documented).
        let mut h = unsafe { Box::from_raw(h) };
        h.shared.closing.store(true, Relaxed);
        let shared = h.shared.clone();
        loop {
            shared.poll(usize::MAX);
            let n = shared.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            if *n == 0 {
                break;
            }
            let _ = shared.idle.wait_timeout(n, Duration::from_millis(20));
        }
        if let Some(rt) = h.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
        // The last spans reach the collector before the host goes on (it
        // may exit next).
        if let Some(t) = h.tracer.load_full() {
            t.flush(TRACE_FLUSH);
        }
        Ok(())
    })
}
