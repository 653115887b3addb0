//! A connection's byte stream with the timeouts that keep slow or silent
//! clients from holding the server:
//!
//! - **first request**: the first request head (and a TLS handshake before
//!   it) must arrive within `header-read-timeout` of the accept;
//! - **keep-alive**: an idle connection (no request running) is closed
//!   after `keepalive-timeout`; once the first byte of a new request head
//!   arrives, the rest must follow within `header-read-timeout` (also
//!   when it began before the previous response ended, once that request
//!   has read its whole body; a partial head that came in one read with
//!   the request before it is bounded by `keepalive-timeout`);
//! - **send**: a write the client does not take for `send-timeout` closes
//!   the connection; so does a client that takes less than `send-min-rate`
//!   bytes per second of waiting on average, once `send-timeout` of
//!   waiting has passed (a reader that opens a tiny window and takes a few
//!   bytes now and then does make progress, too little).
//!
//! HTTP/2 flow control lets a client stop taking one stream while its
//! socket keeps moving; that stream's send timeout is `response`'s and
//! `limits::Conn::stalled_stream`'s.
//!
//! Request bodies have timeouts of their own (see `body`). A timeout
//! surfaces as an I/O error (`TimedOut`), which ends the connection; for
//! HTTP/2 an idle connection is closed gracefully (GOAWAY) instead.

use super::limits::{Conn, HttpStats};
use std::io;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// The timeouts of one connection.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub header_read: Duration,
    pub keepalive: Duration,
    pub send: Duration,
    /// Bytes per second; 0 for none.
    pub send_min_rate: u64,
}

/// What the read side is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// The connection's first request (from the accept).
    First,
    /// Between requests, nothing received yet.
    Idle,
    /// The rest of a request head whose first bytes arrived.
    Head,
}

/// The HTTP/2 connection preface; a connection that starts with it has no
/// request heads of its own to time.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

pub struct TimedIo<T> {
    inner: T,
    /// The socket under `inner`, to tell what the client actually took
    /// from what the kernel still holds for it.
    fd: Option<RawFd>,
    conn: Arc<Conn>,
    stats: Arc<HttpStats>,
    t: Timeouts,
    h2: bool,
    /// Bytes of the h2c preface seen so far; `None` once decided.
    sniffed: Option<usize>,
    // Read side.
    /// `conn.finished()` when the current wait started.
    seen_finished: u64,
    wait: Wait,
    wait_start: Instant,
    /// HTTP/1: the next request's head began to arrive while a request
    /// ran (its body all in): when, and `conn.finished()` then. Once that
    /// request ends, the rest of the head is timed from then, not as idle.
    early_head: Option<(u64, Instant)>,
    read_sleep: Option<Pin<Box<Sleep>>>,
    /// An idle HTTP/2 connection was asked to close; after this, an error.
    h2_close_backstop: Option<Instant>,
    // Write side.
    /// Bytes the client took.
    written: u64,
    /// Time spent waiting for the client to take them, before the
    /// current wait.
    waited: Duration,
    /// Since when the current write waits (the client's window is full).
    blocked: Option<Instant>,
    unblocked_at: Option<Instant>,
    write_sleep: Option<Pin<Box<Sleep>>>,
}

impl<T> TimedIo<T> {
    /// `h2`: the protocol is known to be HTTP/2 (negotiated by ALPN).
    pub fn new(
        inner: T,
        fd: Option<RawFd>,
        conn: Arc<Conn>,
        stats: Arc<HttpStats>,
        t: Timeouts,
        h2: bool,
    ) -> Self {
        if h2 {
            conn.set_h2();
        }
        TimedIo {
            inner,
            fd,
            conn,
            stats,
            t,
            h2,
            // Set by `set_plain`: under TLS the bytes read here are
            // encrypted.
            sniffed: None,
            seen_finished: 0,
            wait: Wait::First,
            wait_start: Instant::now(),
            early_head: None,
            read_sleep: None,
            h2_close_backstop: None,
            written: 0,
            waited: Duration::ZERO,
            blocked: None,
            unblocked_at: None,
            write_sleep: None,
        }
    }

    /// The protocol is HTTP/2 (negotiated by ALPN).
    pub fn set_h2(&mut self) {
        self.h2 = true;
        self.sniffed = None;
        self.conn.set_h2();
    }

    /// Nothing else wraps this stream (no TLS): watch the first bytes for
    /// the HTTP/2 preface.
    pub fn set_plain(&mut self) {
        if !self.h2 {
            self.sniffed = Some(0);
        }
    }

    /// Recognises HTTP/2 with prior knowledge (h2c) by its preface.
    fn sniff(&mut self, got: &[u8]) {
        let Some(seen) = self.sniffed else { return };
        let n = got.len().min(H2_PREFACE.len() - seen);
        if got[..n] != H2_PREFACE[seen..seen + n] {
            self.sniffed = None;
        } else if seen + n == H2_PREFACE.len() {
            self.sniffed = None;
            self.h2 = true;
            self.conn.set_h2();
        } else {
            self.sniffed = Some(seen + n);
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// When the current read wait expires; `None` while none applies.
    fn read_deadline(&self) -> Option<Instant> {
        match self.wait {
            Wait::First | Wait::Head => Some(self.wait_start + self.t.header_read),
            // A response still draining to a slow reader is the send
            // timeout's business; idleness counts from when it drained.
            Wait::Idle if self.blocked.is_some() => None,
            Wait::Idle => {
                let from = match self.unblocked_at {
                    Some(u) if u > self.wait_start => u,
                    _ => self.wait_start,
                };
                Some(from + self.t.keepalive)
            }
        }
    }

    fn read_expired(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(backstop) = self.h2_close_backstop {
            if poll_deadline(&mut self.read_sleep, backstop, cx).is_ready() {
                return Poll::Ready(Err(timed_out("idle HTTP/2 connection did not close")));
            }
            return Poll::Pending;
        }
        let Some(deadline) = self.read_deadline() else {
            return Poll::Pending;
        };
        ready!(poll_deadline(&mut self.read_sleep, deadline, cx));
        if self.wait == Wait::Idle {
            self.stats.keepalive_closes.fetch_add(1, Relaxed);
            if self.h2 {
                // GOAWAY rather than a cut: the client learns which streams
                // were taken.
                self.conn.close_when_idle();
                self.h2_close_backstop = Some(Instant::now() + Duration::from_secs(1));
                let _ = self.read_expired(cx);
                return Poll::Pending;
            }
            return Poll::Ready(Err(timed_out("keep-alive timeout")));
        }
        self.stats.header_timeouts.fetch_add(1, Relaxed);
        Poll::Ready(Err(timed_out("request head not received in time")))
    }

    /// Enforces the send timeouts around one write.
    fn on_write(
        &mut self,
        cx: &mut Context<'_>,
        res: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match res {
            Poll::Ready(Ok(n)) => {
                self.written += n as u64;
                if let Some(since) = self.blocked.take() {
                    self.conn.set_sending(false);
                    let now = Instant::now();
                    self.waited += now - since;
                    self.unblocked_at = Some(now);
                }
                Poll::Ready(Ok(n))
            }
            Poll::Pending => {
                let since = *self.blocked.get_or_insert_with(|| {
                    self.conn.set_sending(true);
                    Instant::now()
                });
                let mut deadline = since + self.t.send;
                if self.t.send_min_rate > 0 {
                    // What the client took: not what still waits in the
                    // socket's buffer (which can hold megabytes).
                    let taken = self
                        .written
                        .saturating_sub(self.fd.map_or(0, super::listener::unsent));
                    let earned =
                        Duration::from_secs_f64(taken as f64 / self.t.send_min_rate as f64);
                    let allowed = (self.t.send + earned).saturating_sub(self.waited);
                    deadline = deadline.min(since + allowed);
                }
                if poll_deadline(&mut self.write_sleep, deadline, cx).is_ready() {
                    self.stats.send_timeouts.fetch_add(1, Relaxed);
                    return Poll::Ready(Err(timed_out("client not reading the response")));
                }
                Poll::Pending
            }
            err => err,
        }
    }
}

/// Vectored writes up to this size go out as one plain write.
const COALESCE_UP_TO: usize = 4096;

/// `bufs` copied into a buffer made in `into`, if they fit in
/// [`COALESCE_UP_TO`] (the buffer is only made, and zeroed, when they do).
///
/// hyper hands a response's head and its body chunks over as separate
/// buffers (it keeps the body's bytes as they are rather than copy them
/// behind the head, and frees them once written). For a small response
/// one `send` of a copy is cheaper than a `writev` of the pieces (the
/// kernel's vectored path was about 0.3 µs a request); large ones keep
/// `writev`, which copies nothing.
fn coalesce<'a>(
    bufs: &[io::IoSlice<'_>],
    into: &'a mut Option<[u8; COALESCE_UP_TO]>,
) -> Option<&'a [u8]> {
    let total = bufs.iter().try_fold(0usize, |n, b| {
        let n = n + b.len();
        (n <= COALESCE_UP_TO).then_some(n)
    })?;
    let into = into.insert([0; COALESCE_UP_TO]);
    let mut at = 0;
    for b in bufs {
        into[at..at + b.len()].copy_from_slice(b);
        at += b.len();
    }
    Some(&into[..total])
}

fn timed_out(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, what)
}

/// Polls a lazily made timer set to `deadline`.
fn poll_deadline(
    slot: &mut Option<Pin<Box<Sleep>>>,
    deadline: Instant,
    cx: &mut Context<'_>,
) -> Poll<()> {
    let d = tokio::time::Instant::from_std(deadline);
    let sleep = match slot {
        Some(s) => {
            if s.deadline() != d {
                s.as_mut().reset(d);
            }
            s
        }
        None => slot.insert(Box::pin(tokio::time::sleep_until(d))),
    };
    sleep.as_mut().poll(cx)
}

impl<T: AsyncRead + Unpin> AsyncRead for TimedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let finished = this.conn.finished();
        // A request is running: its body has timeouts of its own.
        if this.conn.is_busy() {
            let before = buf.filled().len();
            let r = Pin::new(&mut this.inner).poll_read(cx, buf);
            // Bytes after the body are the next head (a client that sends
            // it before the response's last bytes, or a pipelining one).
            if !this.h2
                && buf.filled().len() > before
                && !this.conn.body_open()
                && this.early_head.is_none_or(|(f, _)| f != finished)
            {
                this.early_head = Some((finished, Instant::now()));
            }
            return r;
        }
        if finished != this.seen_finished {
            // A request ended since: a new wait between requests, or the
            // rest of a head that began while it ran.
            this.seen_finished = finished;
            match this.early_head.take() {
                Some((f, since)) if f + 1 == finished => {
                    this.wait = Wait::Head;
                    this.wait_start = since;
                }
                _ => {
                    this.wait = Wait::Idle;
                    this.wait_start = Instant::now();
                }
            }
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let got = &buf.filled()[before..];
                if !got.is_empty() {
                    this.sniff(got);
                    // On HTTP/2, bytes between requests are frames of the
                    // connection, not a request head.
                    if this.wait == Wait::Idle && !this.h2 {
                        this.wait = Wait::Head;
                        this.wait_start = Instant::now();
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.read_expired(cx) {
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                _ => Poll::Pending,
            },
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TimedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.on_write(cx, res)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = match bufs {
            [one] => Pin::new(&mut this.inner).poll_write(cx, one),
            _ => match coalesce(bufs, &mut None) {
                Some(one) => Pin::new(&mut this.inner).poll_write(cx, one),
                None => Pin::new(&mut this.inner).poll_write_vectored(cx, bufs),
            },
        };
        this.on_write(cx, res)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Pending => match this.on_write(cx, Poll::Pending) {
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                _ => Poll::Pending,
            },
            done => done,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_shutdown(cx) {
            Poll::Pending => match this.on_write(cx, Poll::Pending) {
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                _ => Poll::Pending,
            },
            done => done,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_vectored_writes_become_one_buffer_in_order() {
        let (head, empty, body) = (b"HTTP/1.1 200 OK\r\n\r\n", b"", b"hello");
        let bufs = [
            io::IoSlice::new(head),
            io::IoSlice::new(empty),
            io::IoSlice::new(body),
        ];
        let mut into = None;
        let one = coalesce(&bufs, &mut into).expect("fits");
        assert_eq!(one, b"HTTP/1.1 200 OK\r\n\r\nhello");
        let big = vec![b'x'; COALESCE_UP_TO];
        let bufs = [io::IoSlice::new(head), io::IoSlice::new(&big)];
        assert!(
            coalesce(&bufs, &mut into).is_none(),
            "past the limit: writev as given"
        );
        let bufs = [
            io::IoSlice::new(&big[..COALESCE_UP_TO - 5]),
            io::IoSlice::new(body),
        ];
        assert_eq!(
            coalesce(&bufs, &mut into).expect("exactly fits").len(),
            COALESCE_UP_TO
        );
    }
}
