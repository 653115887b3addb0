//! `wasmpool_handler`: a loaded component with its own engine threads.

use super::wasmpool_result::{self, *};
use super::{Failure, boundary, bytes_arg, handle_ref, str_arg};
use super::{wasmpool_completion_mode, wasmpool_config, wasmpool_request, wasmpool_response};
use crate::engine::admission::Rejection;
use crate::engine::component::Source;
use crate::engine::pool::{Pool, RequestError};
use crate::error::LoadError;
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
    pool: Arc<Pool>,
    shared: Arc<Shared>,
}

struct Shared {
    mode: wasmpool_completion_mode,
    closing: AtomicBool,
    /// Requests whose callback has not run yet; `idle` is signalled when it
    /// drops.
    in_flight: Mutex<u64>,
    idle: Condvar,
    /// Completions waiting for `wasmpool_handler_poll` (poll mode).
    queue: Mutex<VecDeque<Ready>>,
    /// Readable (non-zero) while `queue` is not empty.
    efd: OwnedFd,
    handled: AtomicU64,
    failed: AtomicU64,
}

struct SendPtr<T>(*mut T);
// SAFETY: the pointers are handed back to C exactly once; the C side
// promises they may be used from the thread the callback runs on.
unsafe impl<T> Send for SendPtr<T> {}

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
                let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                q.push_back(ready);
                self.signal();
            }
        }
    }

    /// Runs up to `max` queued callbacks on this thread.
    fn poll(&self, max: usize) -> usize {
        let batch: Vec<Ready> = {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            let n = max.min(q.len());
            let batch = q.drain(..n).collect();
            if q.is_empty() {
                self.drain_signal();
            }
            batch
        };
        let n = batch.len();
        for r in batch {
            run_callback(r);
            self.finish_one();
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

/// Runs one request to a complete response, all within `request-timeout`.
async fn run(pool: Arc<Pool>, req: wasmpool_request) -> Result<wasmpool_response, Failure> {
    let deadline = Instant::now() + pool.knobs().request_timeout;
    let body = Full::new(req.body)
        .map_err(|e: std::convert::Infallible| match e {})
        .boxed_unsync();
    let mut r = http::Request::new(body);
    *r.method_mut() = req.method;
    *r.uri_mut() = req.uri;
    *r.headers_mut() = req.headers;
    let resp = pool.handle(r).await.map_err(request_failure)?;
    let (parts, body) = resp.into_parts();
    let left = deadline.saturating_duration_since(Instant::now());
    let body = match tokio::time::timeout(left, body.collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) => {
            return Err(Failure::new(
                WASMPOOL_GUEST_ERROR,
                format!("the response body failed: {e}"),
            ));
        }
        Err(_) => {
            return Err(Failure::new(
                WASMPOOL_TIMEOUT,
                "the response body did not finish within the request timeout",
            ));
        }
    };
    let headers = parts
        .headers
        .iter()
        .map(|(n, v)| {
            (
                Bytes::copy_from_slice(n.as_str().as_bytes()),
                Bytes::copy_from_slice(v.as_bytes()),
            )
        })
        .collect();
    Ok(wasmpool_response {
        status: parts.status.as_u16(),
        headers,
        body,
    })
}

fn load_failure(e: LoadError) -> Failure {
    let code = match &e {
        LoadError::Read { .. } => WASMPOOL_IO,
        LoadError::Config(_) => WASMPOOL_INVALID_ARGUMENT,
        _ => WASMPOOL_COMPONENT_ERROR,
    };
    Failure::new(code, e.to_string())
}

fn new_handler(cfg: &wasmpool_config, source: Source) -> Result<*mut wasmpool_handler, Failure> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.engine_threads)
        .thread_name("wasmpool-engine")
        .on_thread_start(|| ENGINE_THREAD.with(|c| c.set(true)))
        .enable_all()
        .build()
        .map_err(|e| Failure::new(WASMPOOL_IO, format!("cannot start engine threads: {e}")))?;
    let knobs = cfg.knobs.clone();
    let pool = rt.block_on(async move {
        let pool = tokio::task::spawn_blocking(move || Pool::load(knobs, &source))
            .await
            .map_err(|e| Failure::new(WASMPOOL_PANIC, format!("loading panicked: {e}")))?
            .map_err(load_failure)?;
        pool.probe().await.map_err(load_failure)?;
        Ok::<_, Failure>(pool)
    })?;
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
        pool: Arc::new(pool),
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
/// `WASMPOOL_OK`, `cb(userdata, result, response)` runs exactly once later:
/// on an engine thread (`WASMPOOL_COMPLETION_ENGINE`, keep it short and do
/// not block in it) or inside `wasmpool_handler_poll` on the polling thread
/// (`WASMPOOL_COMPLETION_POLL`). On any other result the callback never
/// runs. Pushing after `wasmpool_handler_free` started is
/// `WASMPOOL_SHUTTING_DOWN`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_handler_push(
    h: *mut wasmpool_handler,
    req: *mut wasmpool_request,
    cb: wasmpool_response_callback,
    userdata: *mut c_void,
) -> wasmpool_result {
    // SAFETY: see `take_request`.
    let req = unsafe { take_request(req) };
    boundary(|| {
        // SAFETY: see `handle_ref`.
        let h = unsafe { handle_ref(h, "handler") }?;
        let req = req.ok_or_else(|| Failure::null("req"))?;
        let cb = cb.ok_or_else(|| Failure::null("cb"))?;
        h.admit()?;
        let completion = Completion {
            shared: h.shared.clone(),
            cb,
            userdata: Some(SendPtr(userdata)),
        };
        let pool = h.pool.clone();
        h.rt().spawn(async move {
            let outcome = run(pool, *req).await;
            completion.complete(outcome);
        });
        Ok(())
    })
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
        let pool = h.pool.clone();
        let shared = h.shared.clone();
        let outcome = h.rt().block_on(async move {
            let r = tokio::spawn(run(pool, *req)).await;
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
        let s = h.pool.stats();
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
        Ok(())
    })
}
