//! Who holds the server's connections and requests, and the limits on
//! them: `max-concurrent-connections` in all, `max-connections-per-client`
//! and `max-requests-per-client` for each client address on TCP
//! listeners. When the server is full, idle keep-alive connections (and
//! connections that have not finished sending a request) are closed first,
//! the one idle longest first, so new clients get in instead of waiting in
//! the listen backlog behind clients that send nothing.

use super::listener::Peer;
use super::response::{Responses, Shared};
pub use crate::telemetry::HttpStats;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// One client address and what it holds.
#[derive(Debug)]
pub struct Client {
    key: IpAddr,
    /// Open connections (changed under the registry's lock).
    connections: AtomicU32,
    /// Requests in flight.
    requests: AtomicU32,
    /// Requests waiting for one of this client's to end.
    waiting: AtomicU32,
    freed: Notify,
}

impl Client {
    /// Takes one of the client's request places, if one is free.
    fn try_take(&self, limit: u32) -> bool {
        self.requests
            .fetch_update(Relaxed, Relaxed, |n| (n < limit).then_some(n + 1))
            .is_ok()
    }
}

impl Client {
    pub fn key(&self) -> IpAddr {
        self.key
    }
}

/// One open connection, shared by its task, its I/O and its requests.
#[derive(Debug)]
pub struct Conn {
    id: u64,
    pub peer: Peer,
    pub client: Option<Arc<Client>>,
    /// Requests started on it and not finished.
    active: AtomicU32,
    /// Requests finished on it (a new value starts a new idle period).
    finished: AtomicU64,
    /// When it last became idle, in ms since the registry's epoch.
    idle_since_ms: AtomicU64,
    /// A response is waiting for the client to take it.
    sending: AtomicBool,
    /// The running request's body may still be arriving: on HTTP/1,
    /// bytes read now may be that body rather than the next request.
    body_open: AtomicBool,
    /// Asked to close as soon as it is idle.
    closing: AtomicBool,
    close: Notify,
    /// Notified when the first request starts.
    started: Notify,
    /// Responses a pump may take over when the client stops reading.
    responses: Responses,
    /// The connection speaks HTTP/2 (by ALPN or its preface).
    h2: AtomicBool,
    /// Notified when an HTTP/2 response starts: the stream watch runs
    /// while any is live (see `stalled_stream`).
    streams: Notify,
    epoch: Instant,
}

impl Conn {
    /// Whether a request is running on the connection.
    pub fn is_busy(&self) -> bool {
        self.active.load(Relaxed) > 0
    }

    /// Whether output waits for the client to take it.
    pub fn is_sending(&self) -> bool {
        self.sending.load(Relaxed)
    }

    /// Output now waits for the client (`true`) or has been taken. When
    /// it starts waiting, responses still coming are read ahead so their
    /// guests can finish.
    pub(crate) fn set_sending(&self, sending: bool) {
        self.sending.store(sending, Relaxed);
        if sending {
            self.responses.pump_all();
        }
    }

    pub(crate) fn add_response(&self, r: std::sync::Weak<Shared>) {
        self.responses.add(r);
        if self.is_h2() {
            self.streams.notify_one();
        }
    }

    /// The connection speaks HTTP/2.
    pub fn is_h2(&self) -> bool {
        self.h2.load(Relaxed)
    }

    pub(crate) fn set_h2(&self) {
        self.h2.store(true, Relaxed);
    }

    /// Watches this HTTP/2 connection's responses while any is live, and
    /// resolves once one has waited `send_timeout` for the client to take
    /// its next bytes: the connection must close (see
    /// [`Responses::check`]). HTTP/2 flow control lets a client stop one
    /// stream without its socket ever filling, so the socket's own send
    /// timeout (in `io`) does not see it.
    pub(crate) async fn stalled_stream(&self, send_timeout: Duration) {
        let tick = (send_timeout / 8).clamp(Duration::from_millis(25), Duration::from_secs(1));
        loop {
            if !self.is_h2() || !self.responses.any_live() {
                self.streams.notified().await;
                continue;
            }
            tokio::time::sleep(tick).await;
            if self.responses.check(Instant::now(), tick, send_timeout) {
                return;
            }
        }
    }

    /// Whether the running request's body may still be arriving.
    pub fn body_open(&self) -> bool {
        self.body_open.load(Relaxed)
    }

    /// The running request's body has all arrived (or will not be read):
    /// what the client sends from now on is its next request.
    pub(crate) fn body_ended(&self) {
        self.body_open.store(false, Relaxed);
    }

    /// Requests finished so far.
    pub fn finished(&self) -> u64 {
        self.finished.load(Relaxed)
    }

    /// Asks the connection to close once idle (now, if it is).
    pub fn close_when_idle(&self) {
        if !self.closing.swap(true, Relaxed) {
            self.close.notify_one();
        }
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Relaxed)
    }

    /// Resolves once [`Conn::close_when_idle`] was called.
    pub async fn closing(&self) {
        let n = self.close.notified();
        tokio::pin!(n);
        n.as_mut().enable();
        if self.is_closing() {
            return;
        }
        n.await
    }

    /// Resolves once a request has started on the connection.
    pub async fn first_request(&self) {
        let n = self.started.notified();
        tokio::pin!(n);
        n.as_mut().enable();
        if self.is_busy() || self.finished() > 0 {
            return;
        }
        n.await
    }

    fn idle_for(&self, now_ms: u64) -> Option<u64> {
        (!self.is_busy()).then(|| now_ms.saturating_sub(self.idle_since_ms.load(Relaxed)))
    }
}

/// A request in flight on a connection; dropped when its response ends
/// (or it is abandoned), which makes the connection idle again.
#[derive(Debug)]
pub struct RequestGuard {
    conn: Arc<Conn>,
    counted_for_client: bool,
}

impl RequestGuard {
    pub fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let c = &self.conn;
        if self.counted_for_client
            && let Some(client) = &c.client
        {
            client.requests.fetch_sub(1, Relaxed);
            if client.waiting.load(Relaxed) > 0 {
                client.freed.notify_one();
            }
        }
        c.idle_since_ms
            .store(c.epoch.elapsed().as_millis() as u64, Relaxed);
        c.finished.fetch_add(1, Relaxed);
        c.active.fetch_sub(1, Relaxed);
    }
}

/// Why a request was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManyRequests;

/// The registry of open connections and clients.
#[derive(Debug)]
pub struct Registry {
    inner: Mutex<Inner>,
    per_client_connections: u32,
    per_client_requests: u32,
    epoch: Instant,
    pub stats: Arc<HttpStats>,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    conns: HashMap<u64, Arc<Conn>>,
    clients: HashMap<IpAddr, Arc<Client>>,
}

/// Why [`Registry::open`] refused a connection: its client already holds
/// `max-connections-per-client`, none of them idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverClientShare;

impl Registry {
    pub fn new(
        per_client_connections: u32,
        per_client_requests: u32,
        stats: Arc<HttpStats>,
    ) -> Registry {
        Registry {
            inner: Mutex::default(),
            per_client_connections,
            per_client_requests,
            epoch: Instant::now(),
            stats,
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Registers a new connection from `peer`. A client over its share has
    /// its own longest-idle connection closed to make room, or, when it has
    /// none idle, the new connection refused.
    pub fn open(self: &Arc<Self>, peer: Peer) -> Result<ConnHandle, OverClientShare> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let client = peer.client_key().map(|key| {
            inner
                .clients
                .entry(key)
                .or_insert_with(|| {
                    Arc::new(Client {
                        key,
                        connections: AtomicU32::new(0),
                        requests: AtomicU32::new(0),
                        waiting: AtomicU32::new(0),
                        freed: Notify::new(),
                    })
                })
                .clone()
        });
        if let Some(c) = &client
            && c.connections.load(Relaxed) >= self.per_client_connections
        {
            let now = self.now_ms();
            match Self::longest_idle(&inner, now, Some(c.key), |_| true) {
                Some(idle) => {
                    idle.close_when_idle();
                    self.stats.evicted.fetch_add(1, Relaxed);
                }
                None => {
                    if c.connections.load(Relaxed) == 0 {
                        inner.clients.remove(&c.key);
                    }
                    drop(inner);
                    self.stats.refused_per_client.fetch_add(1, Relaxed);
                    return Err(OverClientShare);
                }
            }
        }
        if let Some(c) = &client {
            c.connections.fetch_add(1, Relaxed);
        }
        inner.next_id += 1;
        let conn = Arc::new(Conn {
            id: inner.next_id,
            peer,
            client,
            active: AtomicU32::new(0),
            finished: AtomicU64::new(0),
            sending: AtomicBool::new(false),
            body_open: AtomicBool::new(false),
            idle_since_ms: AtomicU64::new(self.now_ms()),
            closing: AtomicBool::new(false),
            close: Notify::new(),
            started: Notify::new(),
            responses: Responses::default(),
            h2: AtomicBool::new(false),
            streams: Notify::new(),
            epoch: self.epoch,
        });
        inner.conns.insert(conn.id, conn.clone());
        drop(inner);
        self.stats.connections.fetch_add(1, Relaxed);
        self.stats.connections_open.fetch_add(1, Relaxed);
        Ok(ConnHandle {
            conn,
            registry: self.clone(),
        })
    }

    /// Closes the connection idle longest (of any client, other than
    /// `new`, the one that needs the room), to make room for a new one.
    /// False if none is idle.
    pub fn evict_one(&self, new: &ConnHandle) -> bool {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let others = |c: &Conn| c.id != new.conn.id;
        match Self::longest_idle(&inner, self.now_ms(), None, others) {
            Some(c) => {
                c.close_when_idle();
                self.stats.evicted.fetch_add(1, Relaxed);
                true
            }
            None => false,
        }
    }

    fn longest_idle(
        inner: &Inner,
        now_ms: u64,
        of: Option<IpAddr>,
        pick: impl Fn(&Conn) -> bool,
    ) -> Option<Arc<Conn>> {
        inner
            .conns
            .values()
            .filter(|c| !c.is_closing() && !c.is_sending() && pick(c))
            .filter(|c| of.is_none() || c.client.as_ref().map(|cl| cl.key) == of)
            .filter_map(|c| c.idle_for(now_ms).map(|idle| (idle, c)))
            .max_by_key(|(idle, _)| *idle)
            .map(|(_, c)| c.clone())
    }

    /// Starts a request on `conn`. `Err` when its client already has
    /// `max-requests-per-client` in flight: the request may then wait for
    /// one of them to end ([`Registry::wait_for_client`]).
    pub fn start_request(
        &self,
        conn: &Arc<Conn>,
    ) -> Result<RequestGuard, (RequestGuard, TooManyRequests)> {
        conn.body_open.store(true, Relaxed);
        if conn.active.fetch_add(1, Relaxed) == 0 && conn.finished() == 0 {
            conn.started.notify_waiters();
        }
        let mut guard = RequestGuard {
            conn: conn.clone(),
            counted_for_client: false,
        };
        if let Some(client) = &conn.client {
            if !client.try_take(self.per_client_requests) {
                return Err((guard, TooManyRequests));
            }
            guard.counted_for_client = true;
        }
        Ok(guard)
    }

    /// Waits, at most `timeout`, until the client of a request that
    /// [`Registry::start_request`] refused has a free place; false (and
    /// counted as refused) if none came.
    pub async fn wait_for_client(&self, guard: &mut RequestGuard, timeout: Duration) -> bool {
        let Some(client) = guard.conn.client.clone() else {
            return true;
        };
        let deadline = tokio::time::Instant::now() + timeout;
        client.waiting.fetch_add(1, Relaxed);
        let got = loop {
            let freed = client.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if client.try_take(self.per_client_requests) {
                break true;
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                break client.try_take(self.per_client_requests);
            }
        };
        client.waiting.fetch_sub(1, Relaxed);
        if got {
            guard.counted_for_client = true;
        } else {
            self.stats.requests_refused_per_client.fetch_add(1, Relaxed);
        }
        got
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .conns
            .len()
    }
}

/// Registration of one open connection; unregisters when dropped.
pub struct ConnHandle {
    conn: Arc<Conn>,
    registry: Arc<Registry>,
}

impl ConnHandle {
    pub fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }
}

impl Drop for ConnHandle {
    fn drop(&mut self) {
        let mut inner = self
            .registry
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        inner.conns.remove(&self.conn.id);
        if let Some(c) = &self.conn.client
            && c.connections.fetch_sub(1, Relaxed) == 1
        {
            inner.clients.remove(&c.key);
        }
        drop(inner);
        self.registry.stats.connections_open.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(ip: &str) -> Peer {
        Peer::Tcp(format!("{ip}:1000").parse().unwrap())
    }

    fn serve(a: Result<ConnHandle, OverClientShare>) -> ConnHandle {
        a.expect("served")
    }

    #[test]
    fn a_client_over_its_share_loses_its_idle_connection_or_is_refused() {
        let r = Arc::new(Registry::new(2, 10, Arc::default()));
        let a1 = serve(r.open(peer("10.0.0.1")));
        let a2 = serve(r.open(peer("10.0.0.1")));
        let _busy = r.start_request(a1.conn()).unwrap();
        // a2 is idle: it is asked to close and the new one is served.
        let a3 = serve(r.open(peer("10.0.0.1")));
        assert!(a2.conn().is_closing() && !a1.conn().is_closing());
        let _busy3 = r.start_request(a3.conn()).unwrap();
        drop(a2);
        // Both are busy now: the next is refused.
        assert!(r.open(peer("10.0.0.1")).is_err());
        // Another client is not affected.
        let _b = serve(r.open(peer("10.0.0.2")));
        // Unix clients are exempt.
        for _ in 0..5 {
            std::mem::forget(serve(r.open(Peer::Unix)));
        }
        assert_eq!(r.stats.refused_per_client.load(Relaxed), 1);
    }

    #[test]
    fn requests_per_client() {
        let r = Arc::new(Registry::new(10, 2, Arc::default()));
        let a = serve(r.open(peer("10.0.0.1")));
        let b = serve(r.open(peer("10.0.0.1")));
        let g1 = r.start_request(a.conn()).unwrap();
        let _g2 = r.start_request(b.conn()).unwrap();
        assert!(r.start_request(a.conn()).is_err());
        drop(g1);
        assert!(r.start_request(a.conn()).is_ok());
    }

    #[test]
    fn eviction_takes_the_longest_idle() {
        let r = Arc::new(Registry::new(100, 100, Arc::default()));
        let old = serve(r.open(peer("10.0.0.1")));
        std::thread::sleep(Duration::from_millis(5));
        let new = serve(r.open(peer("10.0.0.2")));
        let busy = serve(r.open(peer("10.0.0.3")));
        let _g = r.start_request(busy.conn()).unwrap();
        let coming = serve(r.open(peer("10.0.0.4")));
        assert!(r.evict_one(&coming));
        assert!(old.conn().is_closing() && !new.conn().is_closing());
        assert!(r.evict_one(&coming));
        assert!(new.conn().is_closing());
        assert!(
            !r.evict_one(&coming),
            "the busy one stays, and the one let in"
        );
        assert!(!busy.conn().is_closing() && !coming.conn().is_closing());
    }
}
