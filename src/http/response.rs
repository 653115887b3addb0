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
//! Invariants: the guest's body is polled by one side at a time (the
//! connection until the pump starts, the pump after); frames reach the
//! connection in order; the guest's body is dropped as soon as it ends.

use super::limits::{Conn, RequestGuard};
use crate::engine::ResponseBody;
use crate::engine::budget::{Held, MemoryBudget};
use bytes::Bytes;
use http_body::{Body as _, Frame};
use http_body_util::Full;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the server answers with. Holds its request's place on the
/// connection (and in its client's count) until the body ends.
pub struct Body {
    kind: Kind,
    guard: Option<RequestGuard>,
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
    /// One of the front's own answers.
    pub(crate) fn own(inner: Full<Bytes>, guard: RequestGuard) -> Body {
        Body {
            kind: Kind::Own(inner),
            guard: Some(guard),
        }
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
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                inner: Some(inner),
                queue: VecDeque::new(),
                held: Held::new(budget),
                pumping: false,
                reader: None,
                pump: None,
            }),
            limit,
        });
        if limit > 0 {
            conn.add_response(Arc::downgrade(&shared));
        }
        Body {
            kind: Kind::Guest(shared),
            guard: Some(guard),
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
        if matches!(r, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            // The request is over: the connection is idle from now on.
            self.guard = None;
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

impl Drop for Body {
    /// The connection is done with the body (finished, or cut): a pump
    /// still reading ahead stops, and the guest's body goes now.
    fn drop(&mut self) {
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

    /// The connection cannot write: pump every response still coming.
    pub fn pump_all(&self) {
        let live: Vec<_> = {
            let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
            v.retain(|w| w.strong_count() > 0);
            v.iter().filter_map(Weak::upgrade).collect()
        };
        for r in live {
            r.start_pump();
        }
    }
}

impl std::fmt::Debug for Responses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Responses")
    }
}
