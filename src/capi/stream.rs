//! Streaming bodies and cancellation for the C API.
//!
//! A [`Pipe`] carries body bytes between the host and the engine with a
//! bounded buffer: the side that writes is told `WASMPOOL_WOULD_BLOCK`
//! when the buffer is full, and the side that reads `WASMPOOL_WOULD_BLOCK`
//! when it is empty; a callback tells the host when to try again. So a
//! slow guest makes the host wait (request bodies), and a slow host makes
//! the guest wait (response bodies), and neither makes the engine buffer
//! more than [`STREAM_BUFFER`].
//!
//! - `wasmpool_body_writer`: the host writes a request body after pushing.
//! - A streamed `wasmpool_response`: the host reads the body after the
//!   head arrived (`wasmpool_handler_push_streaming`).
//! - `wasmpool_cancel`: cancels a pushed request (`wasmpool_cancel_request`).

use super::handler::Notifier;
use super::wasmpool_result::{self, *};
use super::{Failure, boundary, boundary_void, bytes_arg, handle_ref, str_arg};
use bytes::Bytes;
use http_body::Frame;
use std::collections::VecDeque;
use std::ffi::{c_char, c_void};
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

/// Bytes a pipe holds before the writing side must wait.
pub const STREAM_BUFFER: usize = 256 << 10;

/// Called when a stream the host waits on can go on: a body writer can
/// take more, or a streamed response has more to read (or ended). Runs on
/// an engine thread (`WASMPOOL_COMPLETION_ENGINE`; keep it short, do not
/// block) or inside `wasmpool_handler_poll` (`WASMPOOL_COMPLETION_POLL`).
/// It may run when nothing changed after all: the call it answers may
/// still say `WASMPOOL_WOULD_BLOCK`, and then it runs again later. It
/// runs at most once per `WASMPOOL_WOULD_BLOCK`. In poll mode it never
/// runs after its writer or response was freed; in engine mode it may be
/// running on an engine thread while another thread frees them, so free
/// them where no callback can be running (from the callback itself, or
/// once the stream ended).
pub type wasmpool_ready_callback = Option<unsafe extern "C" fn(userdata: *mut c_void)>;

type ReadyCb = unsafe extern "C" fn(*mut c_void);

/// How a stream ended.
#[derive(Debug, Clone)]
enum End {
    /// Complete, with these trailers.
    Done(Vec<(Bytes, Bytes)>),
    /// Failed (the code says how; the message is for `wasmpool_last_error`).
    Failed(wasmpool_result, String),
}

struct PipeState {
    chunks: VecDeque<Bytes>,
    buffered: usize,
    end: Option<End>,
    /// The reading side is gone: writes are refused.
    reader_gone: Option<(wasmpool_result, String)>,
    /// The engine side waiting for the host.
    engine_waker: Option<Waker>,
    /// The host's callback, and whether the host waits for it.
    host_cb: Option<(ReadyCb, super::handler::SendPtr<c_void>)>,
    host_waiting: bool,
    /// Where host callbacks go (set once the request is pushed).
    notifier: Option<Notifier>,
    /// Trailers the host added (request bodies).
    trailers: Vec<(Bytes, Bytes)>,
    /// The host finished or aborted the body (further calls are misuse).
    host_ended: bool,
}

/// A bounded byte stream between the host and the engine.
pub(crate) struct Pipe {
    state: Mutex<PipeState>,
    limit: usize,
}

impl Pipe {
    pub fn new(limit: usize) -> Arc<Pipe> {
        Arc::new(Pipe {
            state: Mutex::new(PipeState {
                chunks: VecDeque::new(),
                buffered: 0,
                end: None,
                reader_gone: None,
                engine_waker: None,
                host_cb: None,
                host_waiting: false,
                notifier: None,
                trailers: Vec::new(),
                host_ended: false,
            }),
            limit,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PipeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs the host's callback if it waits for one (outside the lock).
    fn wake_host(self: &Arc<Self>, mut st: std::sync::MutexGuard<'_, PipeState>) {
        if !st.host_waiting {
            return;
        }
        let (Some((cb, ud)), Some(n)) = (st.host_cb, st.notifier.clone()) else {
            return;
        };
        st.host_waiting = false;
        drop(st);
        n.ready(Arc::downgrade(self), cb, ud);
    }

    /// The host's callback, if it still has one (it is dropped with the
    /// writer or the response).
    pub(crate) fn host_callback(&self) -> Option<(ReadyCb, super::handler::SendPtr<c_void>)> {
        self.lock().host_cb
    }

    fn forget_host_callback(&self) {
        self.lock().host_cb = None;
    }

    fn wake_engine(st: &mut PipeState) {
        if let Some(w) = st.engine_waker.take() {
            w.wake();
        }
    }

    pub fn set_notifier(self: &Arc<Self>, n: Notifier) {
        let mut st = self.lock();
        st.notifier = Some(n);
        // A host that already waits gets its callback now.
        self.wake_host(st);
    }

    fn set_host_callback(&self, cb: ReadyCb, ud: *mut c_void) {
        self.lock().host_cb = Some((cb, super::handler::SendPtr(ud)));
    }

    // The host writes (request bodies).

    fn host_write(self: &Arc<Self>, data: &[u8]) -> Result<(), Failure> {
        let mut st = self.lock();
        if st.host_ended {
            return Err(Failure::new(
                WASMPOOL_MISUSE,
                "the body was already finished or aborted",
            ));
        }
        if let Some((code, why)) = &st.reader_gone {
            return Err(Failure::new(*code, why.clone()));
        }
        if st.buffered >= self.limit {
            st.host_waiting = true;
            return Err(Failure::new(
                WASMPOOL_WOULD_BLOCK,
                "the engine's buffer for this body is full: write again after the ready callback",
            ));
        }
        if !data.is_empty() {
            st.buffered += data.len();
            st.chunks.push_back(Bytes::copy_from_slice(data));
        }
        Self::wake_engine(&mut st);
        Ok(())
    }

    fn host_end(self: &Arc<Self>, end: End) -> Result<(), Failure> {
        let mut st = self.lock();
        if st.host_ended {
            return Err(Failure::new(
                WASMPOOL_MISUSE,
                "the body was already finished or aborted",
            ));
        }
        st.host_ended = true;
        if st.end.is_some() {
            // Cancelled meanwhile: nothing more to tell the guest.
            return Ok(());
        }
        if let End::Done(_) = &end {
            let trailers = std::mem::take(&mut st.trailers);
            st.end = Some(End::Done(trailers));
        } else {
            st.end = Some(end);
        }
        Self::wake_engine(&mut st);
        Ok(())
    }

    /// The engine reads (a request body as the guest sees it).
    fn engine_read(
        self: &Arc<Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, String>>> {
        let mut st = self.lock();
        if let Some(c) = st.chunks.pop_front() {
            st.buffered -= c.len();
            let free = st.buffered < self.limit;
            if free {
                self.wake_host(st);
            }
            return Poll::Ready(Some(Ok(Frame::data(c))));
        }
        match st.end.take() {
            Some(End::Done(trailers)) => {
                st.end = Some(End::Done(Vec::new()));
                if trailers.is_empty() {
                    return Poll::Ready(None);
                }
                let mut map = http::HeaderMap::new();
                for (n, v) in trailers {
                    if let (Ok(n), Ok(v)) = (
                        http::HeaderName::from_bytes(&n),
                        http::HeaderValue::from_bytes(&v),
                    ) {
                        map.append(n, v);
                    }
                }
                Poll::Ready(Some(Ok(Frame::trailers(map))))
            }
            Some(End::Failed(code, why)) => {
                st.end = Some(End::Failed(code, why.clone()));
                Poll::Ready(Some(Err(why)))
            }
            None => {
                st.engine_waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    /// The request was cancelled: the host's writes fail, and so do the
    /// guest's reads.
    pub fn cancel(self: &Arc<Self>, why: &str) {
        let mut st = self.lock();
        if st.reader_gone.is_none() {
            st.reader_gone = Some((WASMPOOL_CANCELLED, why.to_string()));
        }
        if st.end.is_none() {
            st.end = Some(End::Failed(WASMPOOL_CANCELLED, why.to_string()));
        }
        st.chunks.clear();
        st.buffered = 0;
        Self::wake_engine(&mut st);
        self.wake_host(st);
    }

    /// The engine stops reading (the request is over): the host's writes
    /// fail with `code`.
    fn engine_reader_gone(self: &Arc<Self>, code: wasmpool_result, why: &str) {
        let mut st = self.lock();
        if st.reader_gone.is_none() {
            st.reader_gone = Some((code, why.to_string()));
        }
        st.chunks.clear();
        st.buffered = 0;
        self.wake_host(st);
    }

    // The engine writes (response bodies), the host reads.

    /// Whether the engine may push more now; if not, it is woken later.
    fn engine_has_room(&self, cx: &mut Context<'_>) -> Poll<Result<(), ()>> {
        let mut st = self.lock();
        if st.reader_gone.is_some() {
            return Poll::Ready(Err(()));
        }
        if st.buffered < self.limit {
            return Poll::Ready(Ok(()));
        }
        st.engine_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Registers the engine side to be woken when the host goes away
    /// (while it waits for something else).
    fn watch_host(&self, cx: &mut Context<'_>) {
        self.lock().engine_waker = Some(cx.waker().clone());
    }

    fn engine_push(self: &Arc<Self>, data: Bytes) {
        let mut st = self.lock();
        st.buffered += data.len();
        st.chunks.push_back(data);
        self.wake_host(st);
    }

    fn engine_end(self: &Arc<Self>, end: End) {
        let mut st = self.lock();
        if st.end.is_none() {
            st.end = Some(end);
        }
        self.wake_host(st);
    }

    /// Copies up to `buf.len()` bytes for the host. `Ok(0)`: the end.
    fn host_read(&self, buf: &mut [u8]) -> Result<usize, Failure> {
        let mut st = self.lock();
        if let Some((code, why)) = &st.reader_gone {
            return Err(Failure::new(*code, why.clone()));
        }
        if st.chunks.is_empty() {
            return match &st.end {
                Some(End::Done(_)) => Ok(0),
                Some(End::Failed(code, why)) => Err(Failure::new(*code, why.clone())),
                None => {
                    st.host_waiting = true;
                    Err(Failure::new(
                        WASMPOOL_WOULD_BLOCK,
                        "no body bytes yet: read again after the ready callback",
                    ))
                }
            };
        }
        let mut n = 0;
        while n < buf.len() {
            let Some(front) = st.chunks.front_mut() else {
                break;
            };
            let take = front.len().min(buf.len() - n);
            buf[n..n + take].copy_from_slice(&front[..take]);
            n += take;
            let _ = front.split_to(take);
            if front.is_empty() {
                st.chunks.pop_front();
            }
        }
        st.buffered -= n;
        Self::wake_engine(&mut st);
        Ok(n)
    }

    fn host_reader_gone(&self, code: wasmpool_result, why: &str) {
        let mut st = self.lock();
        if st.reader_gone.is_none() {
            st.reader_gone = Some((code, why.to_string()));
        }
        st.chunks.clear();
        st.buffered = 0;
        Self::wake_engine(&mut st);
    }

    fn trailers(&self) -> Option<Vec<(Bytes, Bytes)>> {
        match &self.lock().end {
            Some(End::Done(t)) => Some(t.clone()),
            _ => None,
        }
    }
}

/// The engine's view of a request body the host writes.
pub(crate) struct PipeBody {
    pipe: Arc<Pipe>,
    done: bool,
    /// Bytes the body may still bring (`max-request-body-size`).
    left: u64,
}

impl PipeBody {
    pub fn new(pipe: Arc<Pipe>, limit: u64) -> PipeBody {
        PipeBody {
            pipe,
            done: false,
            left: limit,
        }
    }
}

impl http_body::Body for PipeBody {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.pipe.engine_read(cx) {
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(why))) => {
                self.done = true;
                Poll::Ready(Some(Err(wasmtime_wasi_http::Error::InternalError(Some(
                    why,
                )))))
            }
            Poll::Ready(Some(Ok(frame))) => {
                let n = frame.data_ref().map_or(0, |d| d.len() as u64);
                if n > self.left {
                    self.done = true;
                    self.pipe.engine_reader_gone(
                        WASMPOOL_TOO_LARGE,
                        "the request body is larger than max_request_body_size",
                    );
                    return Poll::Ready(Some(Err(wasmtime_wasi_http::Error::HttpRequestBodySize(
                        None,
                    ))));
                }
                self.left -= n;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for PipeBody {
    fn drop(&mut self) {
        self.pipe.engine_reader_gone(
            WASMPOOL_CANCELLED,
            "the request is over: the body is not read any more",
        );
    }
}

/// Copies a guest's response body into `pipe` as the host makes room,
/// until it ends; then the trailers. Ends the pipe with `failed` if it is
/// dropped before (cancelled, runtime shut down).
pub(crate) async fn pump(
    pipe: Arc<Pipe>,
    mut body: impl http_body::Body<Data = Bytes, Error = wasmtime_wasi_http::Error> + Unpin,
) {
    struct EndOnDrop(Arc<Pipe>, bool);
    impl Drop for EndOnDrop {
        fn drop(&mut self) {
            if self.1 {
                self.0.engine_end(End::Failed(
                    WASMPOOL_SHUTTING_DOWN,
                    "the response body was dropped by the engine (handler freed)".into(),
                ));
            }
        }
    }
    let mut guard = EndOnDrop(pipe.clone(), true);
    let mut trailers = Vec::new();
    let end = std::future::poll_fn(|cx| {
        loop {
            // The host gone (freed or cancelled the response) ends the
            // pump whatever it waits for; dropping the guest's body tells
            // the guest.
            match pipe.engine_has_room(cx) {
                Poll::Ready(Err(())) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(())) => {}
            }
            match Pin::new(&mut body).poll_frame(cx) {
                Poll::Pending => {
                    pipe.watch_host(cx);
                    return Poll::Pending;
                }
                Poll::Ready(None) => {
                    return Poll::Ready(Some(End::Done(std::mem::take(&mut trailers))));
                }
                Poll::Ready(Some(Err(e))) => {
                    return Poll::Ready(Some(End::Failed(
                        WASMPOOL_GUEST_ERROR,
                        format!("the response body failed: {e}"),
                    )));
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        if !data.is_empty() {
                            pipe.engine_push(data)
                        }
                    }
                    Err(frame) => {
                        if let Ok(t) = frame.into_trailers() {
                            trailers.extend(t.iter().map(|(n, v)| {
                                (
                                    Bytes::copy_from_slice(n.as_str().as_bytes()),
                                    Bytes::copy_from_slice(v.as_bytes()),
                                )
                            }));
                        }
                    }
                },
            }
        }
    })
    .await;
    guard.1 = false;
    if let Some(end) = end {
        pipe.engine_end(end);
    }
}

/// The host's end of a request body that it writes after pushing the
/// request. Created by `wasmpool_request_stream_body`; owned by the host,
/// freed with `wasmpool_body_writer_free`. Thread-safe: any thread may
/// write, but one at a time keeps the bytes in order.
pub struct wasmpool_body_writer {
    pipe: Arc<Pipe>,
}

impl wasmpool_body_writer {
    pub(crate) fn new(pipe: Arc<Pipe>) -> wasmpool_body_writer {
        wasmpool_body_writer { pipe }
    }
}

impl Drop for wasmpool_body_writer {
    fn drop(&mut self) {
        self.pipe.forget_host_callback();
        // A body neither finished nor aborted fails for the guest.
        let _ = self.pipe.host_end(End::Failed(
            WASMPOOL_CANCELLED,
            "the host freed the body writer before finishing".into(),
        ));
    }
}

/// Offers `len` bytes (copied) of the request body. `WASMPOOL_OK`: taken.
/// `WASMPOOL_WOULD_BLOCK`: the engine holds as much of this body as it
/// buffers; nothing was taken; the ready callback runs once it can take
/// more. `WASMPOOL_CANCELLED`: the request is over (it was cancelled,
/// failed, or the guest answered without reading on): stop writing.
/// `WASMPOOL_MISUSE`: the body was finished or aborted already.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_body_writer_write(
    w: *mut wasmpool_body_writer,
    data: *const u8,
    len: usize,
) -> wasmpool_result {
    boundary(|| {
        // SAFETY: see `handle_ref` and `bytes_arg`.
        let (w, data) = unsafe { (handle_ref(w, "writer")?, bytes_arg(data, len, "data")?) };
        w.pipe.host_write(data)
    })
}

/// Sets the callback that says the writer can take more after
/// `WASMPOOL_WOULD_BLOCK` (see `wasmpool_ready_callback`). `userdata` is
/// passed back as is.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_body_writer_set_ready_callback(
    w: *mut wasmpool_body_writer,
    cb: wasmpool_ready_callback,
    userdata: *mut c_void,
) -> wasmpool_result {
    boundary(|| {
        // SAFETY: see `handle_ref`.
        let w = unsafe { handle_ref(w, "writer") }?;
        let cb = cb.ok_or_else(|| Failure::null("cb"))?;
        w.pipe.set_host_callback(cb, userdata);
        Ok(())
    })
}

/// Adds a trailer field sent after the body (before
/// `wasmpool_body_writer_finish`). `name` must be a valid header name;
/// `value` is `value_len` bytes without CR, LF or NUL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_body_writer_add_trailer(
    w: *mut wasmpool_body_writer,
    name: *const c_char,
    value: *const u8,
    value_len: usize,
) -> wasmpool_result {
    boundary(|| {
        // SAFETY: see `handle_ref`, `str_arg` and `bytes_arg`.
        let (w, n, v) = unsafe {
            (
                handle_ref(w, "writer")?,
                str_arg(name, "name")?,
                bytes_arg(value, value_len, "value")?,
            )
        };
        http::HeaderName::from_bytes(n.as_bytes())
            .map_err(|_| Failure::invalid(format!("invalid trailer name `{n}`")))?;
        http::HeaderValue::from_bytes(v)
            .map_err(|_| Failure::invalid(format!("invalid value for trailer `{n}`")))?;
        let mut st = w.pipe.lock();
        if st.host_ended {
            return Err(Failure::new(
                WASMPOOL_MISUSE,
                "the body was already finished or aborted",
            ));
        }
        if let Some((code, why)) = &st.reader_gone {
            return Err(Failure::new(*code, why.clone()));
        }
        st.trailers.push((
            Bytes::copy_from_slice(n.as_bytes()),
            Bytes::copy_from_slice(v),
        ));
        Ok(())
    })
}

/// Ends the body (with the trailers added). A second finish, or finishing
/// after `wasmpool_body_writer_abort`, is `WASMPOOL_MISUSE`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_body_writer_finish(
    w: *mut wasmpool_body_writer,
) -> wasmpool_result {
    boundary(|| {
        // SAFETY: see `handle_ref`.
        let w = unsafe { handle_ref(w, "writer") }?;
        w.pipe.host_end(End::Done(Vec::new()))
    })
}

/// Ends the body with an error: the guest's read fails. After finish or
/// abort it is `WASMPOOL_MISUSE`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_body_writer_abort(
    w: *mut wasmpool_body_writer,
) -> wasmpool_result {
    boundary(|| {
        // SAFETY: see `handle_ref`.
        let w = unsafe { handle_ref(w, "writer") }?;
        w.pipe.host_end(End::Failed(
            WASMPOOL_CANCELLED,
            "the host aborted the request body".into(),
        ))
    })
}

/// Frees a writer; a body not finished yet is aborted. NULL is ignored.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_body_writer_free(w: *mut wasmpool_body_writer) {
    boundary_void(|| {
        if !w.is_null() {
            // SAFETY: `w` came from `wasmpool_request_stream_body` and is
            // freed once (documented).
            drop(unsafe { Box::from_raw(w) });
        }
    })
}

/// A response body that streams: the host reads it with
/// `wasmpool_response_read`.
pub(crate) struct StreamBody {
    pub(crate) pipe: Arc<Pipe>,
}

impl StreamBody {
    pub fn read(&self, buf: &mut [u8]) -> Result<usize, Failure> {
        self.pipe.host_read(buf)
    }

    pub fn set_ready_callback(&self, cb: ReadyCb, ud: *mut c_void) {
        self.pipe.set_host_callback(cb, ud)
    }

    pub fn trailers(&self) -> Option<Vec<(Bytes, Bytes)>> {
        self.pipe.trailers()
    }
}

impl Drop for StreamBody {
    fn drop(&mut self) {
        self.pipe.forget_host_callback();
        self.pipe
            .host_reader_gone(WASMPOOL_CANCELLED, "the response was freed");
    }
}

const LIVE: u8 = 0;
const CANCELLED: u8 = 1;
const FINISHED: u8 = 2;

/// What a cancel handle and its request share.
#[derive(Default)]
pub(crate) struct CancelState {
    state: AtomicU8,
    notify: tokio::sync::Notify,
    /// The streamed response body, once there is one.
    body: Mutex<Option<std::sync::Weak<Pipe>>>,
}

impl CancelState {
    /// Resolves once the request is cancelled.
    pub async fn cancelled(&self) {
        let n = self.notify.notified();
        tokio::pin!(n);
        n.as_mut().enable();
        if self.state.load(Ordering::Acquire) == CANCELLED {
            return;
        }
        n.await
    }

    /// The request completed: later cancels are misuse. A streamed body
    /// stays cancellable until it ends.
    pub fn finish(&self, body: Option<&Arc<Pipe>>) {
        match body {
            Some(p) => {
                *self.body.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::downgrade(p));
            }
            None => {
                let _ = self.state.compare_exchange(
                    LIVE,
                    FINISHED,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
            }
        }
    }
}

/// A handle that cancels one pushed request, from any thread. Created by
/// `wasmpool_request_cancel_handle` before the request is pushed; owned by
/// the host (free it with `wasmpool_cancel_free`, before or after the
/// request completes).
pub struct wasmpool_cancel {
    pub(crate) state: Arc<CancelState>,
}

/// Cancels the request: if its callback has not run, it runs (exactly
/// once, as always) with `WASMPOOL_CANCELLED`; if the response streams,
/// reading it returns `WASMPOOL_CANCELLED`; either way the guest's work
/// for it stops (a WASIp2 guest at once; a WASIp3 guest's instance takes
/// no more requests and is torn down by the request deadline). A second
/// cancel, or one after the request completed (and its body, if it
/// streams, ended), is `WASMPOOL_MISUSE`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_cancel_request(c: *const wasmpool_cancel) -> wasmpool_result {
    boundary(|| {
        // SAFETY: see `handle_ref`.
        let c = unsafe { handle_ref(c, "cancel") }?;
        let s = &c.state;
        match s
            .state
            .compare_exchange(LIVE, CANCELLED, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {
                s.notify.notify_waiters();
                let body = s.body.lock().unwrap_or_else(|e| e.into_inner()).clone();
                if let Some(p) = body.and_then(|w| w.upgrade()) {
                    if p.trailers().is_some() {
                        // The body had ended: nothing was cancelled.
                        s.state.store(FINISHED, Ordering::Release);
                        return Err(Failure::new(WASMPOOL_MISUSE, "the request is over"));
                    }
                    p.host_reader_gone(WASMPOOL_CANCELLED, "the request was cancelled");
                }
                Ok(())
            }
            Err(CANCELLED) => Err(Failure::new(
                WASMPOOL_MISUSE,
                "the request was cancelled already",
            )),
            Err(_) => Err(Failure::new(WASMPOOL_MISUSE, "the request is over")),
        }
    })
}

/// Frees a cancel handle (it does not cancel). NULL is ignored.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_cancel_free(c: *mut wasmpool_cancel) {
    boundary_void(|| {
        if !c.is_null() {
            // SAFETY: `c` came from `wasmpool_request_cancel_handle` and is
            // freed once (documented).
            drop(unsafe { Box::from_raw(c) });
        }
    })
}
