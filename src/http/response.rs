//! Response bodies on their way to a client, and what keeps a slow reader
//! from holding a guest.
//!
//! A guest's body is passed to the connection as it is produced. While
//! the client takes it, nothing else happens. Once the connection cannot
//! write (the client's window is full), a pump takes over: it keeps
//! reading the guest's body into a buffer of up to `response-buffer-size`
//! (taken from the memory budget), so a guest whose answer fits finishes,
//! its instance and its admission slot are freed, and the client's
//! slowness costs a buffer until the send timeout ends it.
//!
//! On HTTP/2 the connection's socket may keep moving while one stream's
//! window stays shut (a client that never sends WINDOW_UPDATE), so the
//! stream itself is watched: a response that has waited a moment for the
//! client to take its next bytes is pumped the same way, and one that has
//! waited `send-timeout` closes the connection (`Responses::check`). Data
//! goes to an HTTP/2 connection in pieces of at most [`H2_CHUNK`], so
//! "waiting" means the client took none of the last 16 KiB, however large
//! the guest's frames are.
//!
//! Invariants: the guest's body is polled by one side at a time (the
//! connection until the pump starts, the pump after); frames reach the
//! connection in order; the guest's body is dropped as soon as it ends.

use super::body::Outcome;
use super::limits::{Conn, RequestGuard};
use super::listener::Peer;
use crate::engine::ResponseBody;
use crate::engine::Served;
use crate::engine::budget::{Held, MemoryBudget};
use crate::telemetry::trace::RequestTrace;
use bytes::Bytes;
use http_body::{Body as _, Frame};
use http_body_util::Full;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// The largest piece of data handed to an HTTP/2 connection at once
/// (HTTP/2's default frame size): hyper holds one piece until the
/// client's window has room for it before it asks for the next, so a
/// stream that takes nothing is seen within a piece, not within a guest's
/// whole frame.
pub(crate) const H2_CHUNK: usize = 16 << 10;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the server answers with. Holds its request's place on the
/// connection (and in its client's count) until the body ends.
pub struct Body {
    kind: Kind,
    guard: Option<RequestGuard>,
    /// Bytes of body sent so far.
    sent: u64,
    /// The access log line to write when the body ends (when logging).
    access: Option<Box<AccessRecord>>,
    /// The request's body when it was refused unread: dropped with this
    /// body, after the response (see `front::refusal_on_head`).
    _unread: Option<hyper::body::Incoming>,
}

/// One access log line, filled in as the request goes.
pub struct AccessRecord {
    peer: Peer,
    method: http::Method,
    /// The request's target is its path and query (a clone shares the
    /// parsed bytes: nothing is copied for the line).
    uri: http::Uri,
    version: http::Version,
    start: Instant,
    received: Arc<Outcome>,
    status: u16,
    served: Option<Served>,
    /// The body's length as the response declared it (`content-length`).
    declared: Option<u64>,
    /// Write the access line (else only the trace is ended).
    log: bool,
    trace: Option<Arc<RequestTrace>>,
}

impl AccessRecord {
    pub(crate) fn new<B>(
        req: &http::Request<B>,
        peer: Peer,
        start: Instant,
        received: Arc<Outcome>,
        log: bool,
        trace: Option<Arc<RequestTrace>>,
    ) -> AccessRecord {
        AccessRecord {
            peer,
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            start,
            received,
            status: 0,
            served: None,
            declared: None,
            log,
            trace,
        }
    }

    /// Notes the response head: its status and the instance that served it.
    pub(crate) fn answered<B>(&mut self, r: &http::Response<B>) {
        self.status = r.status().as_u16();
        self.served = r.extensions().get::<Served>().copied();
        self.declared = r
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok());
    }

    fn write(&self, sent: u64, complete: bool) {
        // hyper drops a body whose declared length went out without
        // polling its end, and sends none of it for HEAD.
        let complete = complete
            || self.declared == Some(sent)
            || (self.method == http::Method::HEAD && sent == 0);
        let duration_us = (self.start.elapsed().as_nanos() as u64 + 500) / 1000;
        let (instance, reused) = match self.served {
            Some(s) => (s.instance as i64, s.reused),
            None => (-1, false),
        };
        let bytes_in = self
            .received
            .received
            .load(std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = &self.trace {
            t.finish(self.status, Some(bytes_in), Some(sent));
        }
        if !self.log {
            return;
        }
        let ctx = self.trace.as_ref().map(|t| t.context());
        let target = self
            .uri
            .path_and_query()
            .map_or_else(|| self.uri.path(), |p| p.as_str());
        let line = crate::telemetry::access::Line {
            client: match self.peer {
                Peer::Tcp(a) => Some(a.ip().to_canonical()),
                Peer::Unix => None,
            },
            method: self.method.as_str(),
            target,
            version: self.version,
            status: self.status,
            bytes_in,
            bytes_out: sent,
            duration_us,
            instance,
            reused,
            complete,
            trace: ctx,
        };
        if crate::telemetry::access::write(&line) {
            return;
        }
        let trace_id = ctx.map(|c| c.trace_id_hex());
        let span_id = ctx.map(|c| c.span_id_hex());
        tracing::info!(
            target: "access",
            client = %self.peer,
            method = %self.method,
            target = %target,
            version = ?self.version,
            status = self.status,
            bytes_in,
            bytes_out = sent,
            duration_ms = duration_us as f64 / 1e3,
            instance,
            reused,
            complete,
            trace_id = trace_id.as_deref(),
            span_id = span_id.as_deref(),
        );
    }
}

enum Kind {
    /// One of the front's own answers.
    Own(Full<Bytes>),
    Guest(Arc<Shared>),
}

/// A guest body, shared by the connection and (once started) the pump.
pub(crate) struct Shared {
    state: Mutex<State>,
    limit: u64,
    /// On an HTTP/2 connection: watched for a shut window, sent in pieces.
    h2: bool,
}

struct State {
    /// `None` once it ended or failed (the admission slot goes with it).
    inner: Option<ResponseBody>,
    queue: VecDeque<Result<Frame<Bytes>, BoxError>>,
    held: Held,
    pumping: bool,
    /// The connection, waiting for frames from the pump.
    reader: Option<Waker>,
    /// The pump, waiting for room in the buffer.
    pump: Option<Waker>,
    /// HTTP/2: since when the connection has not asked for the next
    /// frame after taking one (hyper sends a piece, and asks for the
    /// next, once the client's window has room for it); `None` while it
    /// waits for the guest instead.
    waiting: Option<Instant>,
}

impl State {
    fn end(&mut self) {
        self.inner = None;
        if let Some(w) = self.reader.take() {
            w.wake();
        }
    }
}

impl Body {
    /// One of the front's own answers. On HTTP/2 it is watched like a
    /// guest's (a client that keeps its stream shut must not keep the
    /// connection and its request's place), with nothing read ahead.
    pub(crate) fn own(inner: Full<Bytes>, guard: RequestGuard, budget: &Arc<MemoryBudget>) -> Body {
        if guard.conn().is_h2() && !inner.is_end_stream() {
            use http_body_util::BodyExt as _;
            let conn = guard.conn().clone();
            let inner = ResponseBody::new(inner.map_err(|never| match never {}).boxed_unsync());
            return Body::guest(inner, guard, &conn, 0, budget.clone());
        }
        Body {
            kind: Kind::Own(inner),
            guard: Some(guard),
            sent: 0,
            access: None,
            _unread: None,
        }
    }

    /// Keeps the request's unread body until this body is dropped.
    pub(crate) fn keep_unread(&mut self, body: hyper::body::Incoming) {
        self._unread = Some(body);
    }

    /// Writes `record` to the access log once the body has been sent (or
    /// the connection ended first).
    pub(crate) fn log_when_done(&mut self, record: AccessRecord) {
        self.access = Some(Box::new(record));
    }

    /// A guest's answer on `conn`, which starts a pump for it once it
    /// cannot write.
    pub(crate) fn guest(
        inner: ResponseBody,
        guard: RequestGuard,
        conn: &Conn,
        limit: u64,
        budget: Arc<MemoryBudget>,
    ) -> Body {
        let h2 = conn.is_h2();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                inner: Some(inner),
                queue: VecDeque::new(),
                held: Held::new(budget),
                pumping: false,
                reader: None,
                pump: None,
                waiting: h2.then(Instant::now),
            }),
            limit,
            h2,
        });
        if limit > 0 || h2 {
            conn.add_response(Arc::downgrade(&shared));
        }
        Body {
            kind: Kind::Guest(shared),
            guard: Some(guard),
            sent: 0,
            access: None,
            _unread: None,
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = match &mut self.kind {
            Kind::Own(full) => Pin::new(full)
                .poll_frame(cx)
                .map_err(|never| match never {}),
            Kind::Guest(shared) => shared.poll_reader(cx),
        };
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.sent += d.len() as u64;
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                // The request is over: the connection is idle from now on.
                self.guard = None;
                if let Some(a) = self.access.take() {
                    a.write(self.sent, matches!(r, Poll::Ready(None)));
                }
            }
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Own(full) => full.is_end_stream(),
            Kind::Guest(shared) => {
                let st = lock(&shared.state);
                st.queue.is_empty() && st.inner.as_ref().is_none_or(|b| b.is_end_stream())
            }
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match &self.kind {
            Kind::Own(full) => full.size_hint(),
            Kind::Guest(shared) => {
                let st = lock(&shared.state);
                if st.queue.is_empty()
                    && let Some(b) = &st.inner
                {
                    b.size_hint()
                } else {
                    http_body::SizeHint::default()
                }
            }
        }
    }
}

/// What a client may still send of a body refused unread, and for how
/// long, before it is cut off.
const DISCARD_BYTES: u64 = 1 << 20;
const DISCARD_TIME: std::time::Duration = std::time::Duration::from_secs(1);

/// Reads and throws away the rest of a refused body, a little and briefly
/// (as nginx discards the body of a request it answered early). On HTTP/2
/// this lets the client finish sending, so its stream ends cleanly rather
/// than with a reset that some clients report as an error instead of the
/// answer they already have; on HTTP/1 the connection is closed anyway.
fn discard(mut body: hyper::body::Incoming) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    rt.spawn(async move {
        let _ = tokio::time::timeout(DISCARD_TIME, async {
            let mut seen = 0u64;
            while let Some(Ok(frame)) = http_body_util::BodyExt::frame(&mut body).await {
                seen += frame.data_ref().map_or(0, |d| d.len() as u64);
                if seen > DISCARD_BYTES {
                    break;
                }
            }
        })
        .await;
    });
}

impl Drop for Body {
    /// The connection is done with the body (finished, or cut): a pump
    /// still reading ahead stops, and the guest's body goes now.
    fn drop(&mut self) {
        if let Some(unread) = self._unread.take() {
            discard(unread);
        }
        if let Some(a) = self.access.take() {
            // hyper drops a body it knows is complete (Content-Length
            // reached, or end of stream reported) without polling its end.
            let complete = http_body::Body::is_end_stream(self);
            a.write(self.sent, complete);
        }
        if let Kind::Guest(shared) = &self.kind {
            let mut st = lock(&shared.state);
            st.inner = None;
            st.queue.clear();
            let held = st.held.bytes();
            st.held.shrink(held);
            if let Some(w) = st.pump.take() {
                w.wake();
            }
        }
    }
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The first [`H2_CHUNK`] of a data frame; the rest goes back to the
/// front of the queue (counted as buffered, like what the pump reads).
fn first_piece(st: &mut State, f: Frame<Bytes>) -> Frame<Bytes> {
    match f.into_data() {
        Ok(mut data) => {
            if data.len() > H2_CHUNK {
                let rest = data.split_off(H2_CHUNK);
                st.held.force_grow(rest.len() as u64);
                st.queue.push_front(Ok(Frame::data(rest)));
            }
            Frame::data(data)
        }
        Err(f) => f,
    }
}

fn data_len(item: &Result<Frame<Bytes>, BoxError>) -> u64 {
    match item {
        Ok(f) => f.data_ref().map_or(0, |d| d.len() as u64),
        Err(_) => 0,
    }
}

impl Shared {
    /// The connection's side.
    fn poll_reader(&self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut st = lock(&self.state);
        let r = self.poll_reader_locked(&mut st, cx);
        if !self.h2 {
            return r;
        }
        match r {
            Poll::Ready(Some(Ok(f))) => {
                st.waiting = Some(Instant::now());
                Poll::Ready(Some(Ok(first_piece(&mut st, f))))
            }
            r => {
                st.waiting = None;
                r
            }
        }
    }

    fn poll_reader_locked(
        &self,
        st: &mut State,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(item) = st.queue.pop_front() {
            st.held.shrink(data_len(&item));
            if let Some(w) = st.pump.take() {
                w.wake();
            }
            return Poll::Ready(Some(item));
        }
        if st.pumping {
            if st.inner.is_none() {
                return Poll::Ready(None);
            }
            st.reader = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let Some(inner) = st.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(None) => {
                st.end();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                st.end();
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(Some(Ok(f))) => Poll::Ready(Some(Ok(f))),
            Poll::Pending => Poll::Pending,
        }
    }

    /// The pump's side: reads ahead until the body ends, waiting while the
    /// buffer is full.
    fn poll_pump(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut st = lock(&self.state);
        loop {
            if st.inner.is_none() {
                return Poll::Ready(());
            }
            if st.held.bytes() >= self.limit {
                st.pump = Some(cx.waker().clone());
                return Poll::Pending;
            }
            let Some(inner) = st.inner.as_mut() else {
                return Poll::Ready(());
            };
            match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(None) => {
                    st.end();
                    return Poll::Ready(());
                }
                Poll::Ready(Some(Err(e))) => {
                    st.queue.push_back(Err(e.into()));
                    st.end();
                    return Poll::Ready(());
                }
                Poll::Ready(Some(Ok(f))) => {
                    let item = Ok(f);
                    let n = data_len(&item);
                    // One frame may go past the limit (or the budget):
                    // the guest wrote it already.
                    st.held.force_grow(n);
                    st.queue.push_back(item);
                    if let Some(w) = st.reader.take() {
                        w.wake();
                    }
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Starts the pump, unless it runs or the body is over.
    fn start_pump(self: &Arc<Self>) {
        {
            let mut st = lock(&self.state);
            if st.pumping || st.inner.is_none() {
                return;
            }
            st.pumping = true;
        }
        let me = self.clone();
        tokio::spawn(async move { std::future::poll_fn(|cx| me.poll_pump(cx)).await });
    }
}

/// The responses of one connection that a pump may take over.
#[derive(Default)]
pub(crate) struct Responses(Mutex<Vec<Weak<Shared>>>);

impl Responses {
    pub fn add(&self, r: Weak<Shared>) {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        v.retain(|w| w.strong_count() > 0);
        v.push(r);
    }

    /// Whether any response registered here is still held by its
    /// connection.
    pub fn any_live(&self) -> bool {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        v.retain(|w| w.strong_count() > 0);
        !v.is_empty()
    }

    /// HTTP/2: pumps every response that has waited `pump_after` or more
    /// for its client's window, and says whether one has waited
    /// `timeout` (the connection must close).
    pub fn check(&self, now: Instant, pump_after: Duration, timeout: Duration) -> bool {
        let mut stalled = false;
        for r in self.live() {
            // A body still held whose last piece was taken waits too:
            // hyper holds that piece until the window has room for it.
            let waited = match lock(&r.state).waiting {
                Some(since) => now.saturating_duration_since(since),
                None => continue,
            };
            stalled |= waited >= timeout;
            if waited >= pump_after && r.limit > 0 {
                r.start_pump();
            }
        }
        stalled
    }

    /// The connection cannot write: pump every response still coming.
    pub fn pump_all(&self) {
        for r in self.live() {
            r.start_pump();
        }
    }

    /// The responses still held by their connection (the others are
    /// forgotten).
    fn live(&self) -> Vec<Arc<Shared>> {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        v.retain(|w| w.strong_count() > 0);
        v.iter().filter_map(Weak::upgrade).collect()
    }
}

impl std::fmt::Debug for Responses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Responses")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::budget::MemoryBudget;
    use http_body_util::BodyExt as _;

    fn h2_body(len: usize) -> Shared {
        let inner = Full::new(Bytes::from(vec![7u8; len]))
            .map_err(|never| match never {})
            .boxed_unsync();
        Shared {
            state: Mutex::new(State {
                inner: Some(ResponseBody::new(inner)),
                queue: VecDeque::new(),
                held: Held::new(Arc::new(MemoryBudget::new(1 << 20))),
                pumping: false,
                reader: None,
                pump: None,
                waiting: Some(Instant::now()),
            }),
            limit: 0,
            h2: true,
        }
    }

    #[test]
    fn http2_data_goes_out_in_pieces_and_each_piece_starts_a_wait() {
        let shared = h2_body(2 * H2_CHUNK + 5);
        let mut cx = Context::from_waker(Waker::noop());
        let mut pieces = Vec::new();
        loop {
            match shared.poll_reader(&mut cx) {
                Poll::Ready(Some(Ok(f))) => {
                    pieces.push(f.into_data().unwrap().len());
                    // The connection took a piece: until it asks for the
                    // next one, the stream waits for its client.
                    assert!(lock(&shared.state).waiting.is_some());
                }
                Poll::Ready(None) => break,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(pieces, [H2_CHUNK, H2_CHUNK, 5]);
        let st = lock(&shared.state);
        // The end was asked for: nothing waits for the client any more,
        // and what the pieces held in the meantime is given back.
        assert_eq!(st.waiting, None);
        assert_eq!(st.held.bytes(), 0);
    }

    #[test]
    fn only_a_stream_that_waits_for_its_client_counts_as_stalled() {
        let shared = Arc::new(h2_body(100));
        let responses = Responses::default();
        responses.add(Arc::downgrade(&shared));
        let long = Duration::from_secs(10);
        let later = Instant::now() + long;
        // Waiting since it was made (the connection never asked for it).
        assert!(responses.check(later, long, long));
        assert!(!responses.check(Instant::now(), long, long));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(matches!(
            shared.poll_reader(&mut cx),
            Poll::Ready(Some(Ok(_)))
        ));
        // Its last bytes were taken, but the connection still holds the
        // body: it holds them until the client has room for them.
        assert!(responses.check(Instant::now() + long, long, long));
        // Asked for the end: the window had room.
        assert!(matches!(shared.poll_reader(&mut cx), Poll::Ready(None)));
        assert!(!responses.check(Instant::now() + long, long, long));
        drop(shared);
        assert!(!responses.any_live());
    }
}
