//! The pool: a loaded component and the instances serving it. WASIp2
//! components run on the request's own task ([`crate::engine::p2`]); WASIp3
//! ones through wasmpool's dispatcher ([`crate::engine::p3`]), which runs
//! an instance's event loop on the request's task too when it can. Both
//! get from here: how instances are made (bounded by the memory budget and
//! the request timeout), admission control, the hard request timeout, the
//! `reuse = auto` retry, and classification of failures.

use crate::config::{Knobs, OutboundRule, ReuseMode, defaults};
use crate::engine::admission::{Admission, Permit, Rejection};
use crate::engine::budget::MemoryBudget;
use crate::engine::component::{self, EPOCH_TICK, Loaded, PoolEngine, Source, World};
use crate::engine::host::Host;
use crate::engine::idle::Idle;
use crate::engine::p2::{self, Answer, Live};
use crate::engine::p3;
use crate::engine::retained::{self, Retained};
use crate::engine::reuse::{Replay, ReplayableBody, ReuseSwitch};
use crate::engine::spare::{Gate, GateSlot};
use crate::engine::stats::{Shared, Snapshot, Stats};
use crate::error::LoadError;
use crate::telemetry::trace::RequestTrace;
use bytes::Bytes;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use wasmtime::{Engine, Store};
use wasmtime_wasi_http::WasiBody;
use wasmtime_wasi_http::handler::{ExpirationError, Proxy, ProxyPre, TrapOrPanicError};

/// After the client got its 504, the instance's loop gives the guest this
/// much longer before the instance is torn down. Keeping the loop's own
/// deadline behind the client-facing one makes the client's answer
/// deterministic (always 504, never a 500 from the teardown racing it).
pub(crate) const TEARDOWN_GRACE: Duration = Duration::from_millis(100);

/// Why a request got no response from the guest.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error(transparent)]
    Rejected(#[from] Rejection),
    #[error("the guest did not respond within the request timeout")]
    Timeout,
    #[error("no instance could be created: {0}")]
    Instantiate(String),
    #[error("the guest trapped: {0}")]
    Trap(String),
    #[error("the guest failed to respond: {0}")]
    Guest(String),
}

impl RequestError {
    /// The HTTP status a client should see.
    pub fn status(&self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            RequestError::Rejected(_) | RequestError::Instantiate(_) => S::SERVICE_UNAVAILABLE,
            RequestError::Timeout => S::GATEWAY_TIMEOUT,
            RequestError::Trap(_) | RequestError::Guest(_) => S::INTERNAL_SERVER_ERROR,
        }
    }
}

/// Per-request state shared between the caller and the instance that takes
/// the request. When the caller gives up (timeout), it marks the ticket: the
/// call's expiration future fires and the instance is retired.
#[derive(Default)]
pub struct Ticket {
    pub(crate) expired: AtomicBool,
    pub(crate) notify: Notify,
    pub(crate) worker: OnceLock<Arc<WorkerShared>>,
    /// The instance that took the request had served one before.
    pub(crate) reused: AtomicBool,
    /// The id of the instance that took the request (0: none yet).
    pub(crate) instance: AtomicU64,
    /// The request's trace, which hears where the request's time goes.
    pub(crate) trace: Option<Arc<RequestTrace>>,
}

/// Which instance answered a request: in the response's extensions (for
/// the access log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    pub instance: u64,
    /// It had served a request before.
    pub reused: bool,
}

/// What an instance shares with the tickets of its requests.
#[derive(Default)]
pub(crate) struct WorkerShared {
    /// Set when a request on this instance timed out: it takes no more.
    pub(crate) poisoned: AtomicBool,
    /// Set (before `ended`) when the instance ended in a trap or panic.
    trapped: AtomicBool,
    ended: AtomicBool,
    ended_notify: Notify,
}

impl WorkerShared {
    pub(crate) fn end(&self, trapped: bool) {
        self.trapped.store(trapped, Relaxed);
        self.ended.store(true, Relaxed);
        self.ended_notify.notify_waiters();
    }

    /// Whether the instance trapped, if it ends within `within`.
    async fn trapped_within(&self, within: Duration) -> bool {
        let ended = self.ended_notify.notified();
        tokio::pin!(ended);
        ended.as_mut().enable();
        if !self.ended.load(Relaxed) {
            let _ = tokio::time::timeout(within, ended).await;
        }
        self.trapped.load(Relaxed)
    }
}

impl Ticket {
    /// Instance `instance`, which had taken `served_before` requests, took
    /// this one.
    pub(crate) fn taken_by(&self, instance: u64, served_before: u64, stats: &Stats) {
        if served_before > 0 {
            stats.instances_reused.fetch_add(1, Relaxed);
            self.reused.store(true, Relaxed);
        }
        self.instance.store(instance, Relaxed);
        if let Some(t) = &self.trace {
            t.taken(instance, served_before > 0);
        }
    }

    fn with_trace(trace: Option<Arc<RequestTrace>>) -> Arc<Ticket> {
        Arc::new(Ticket {
            trace,
            ..Ticket::default()
        })
    }

    fn expire(&self) {
        self.expired.store(true, Relaxed);
        if let Some(w) = self.worker.get() {
            w.poisoned.store(true, Relaxed);
        }
        self.notify.notify_waiters();
    }
}

/// Response body; holds the admission slot until the body is finished or
/// dropped, so a streaming response counts as in flight.
pub struct ResponseBody {
    inner: WasiBody,
    _permit: Option<Permit>,
    abort: Option<Arc<AtomicBool>>,
}

impl ResponseBody {
    pub fn new(inner: WasiBody) -> ResponseBody {
        ResponseBody {
            inner,
            _permit: None,
            abort: None,
        }
    }

    /// Makes the body fail (so the connection is cut rather than a
    /// truncated response looking complete) once `flag` is set.
    pub fn abort_when(mut self, flag: Arc<AtomicBool>) -> ResponseBody {
        self.abort = Some(flag);
        self
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if self.abort.as_ref().is_some_and(|f| f.load(Relaxed)) {
            return Poll::Ready(Some(Err(wasmtime_wasi_http::Error::InternalError(Some(
                "response aborted".into(),
            )))));
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A component being served.
pub struct Pool {
    state: Arc<PoolState>,
    /// Idle WASIp2 instances (see [`p2`]); `None` for WASIp3.
    direct: Option<Arc<Idle<Live>>>,
    admission: Admission,
    knobs: Arc<Knobs>,
    world: World,
    stats: Arc<Stats>,
    name: String,
    cache: crate::engine::cache::CacheOutcome,
    /// The component's largest initial memory (see `component::engine`).
    largest_memory: Option<u64>,
}

/// A component compiled (or loaded from the cache) and linked in an engine
/// of its own, not yet counting into a [`Shared`]: see [`Pool::stage`].
pub struct Staged {
    engine: PoolEngine,
    knobs: Knobs,
    loaded: Loaded,
    largest_memory: Option<u64>,
}

impl Staged {
    /// The pool, counting into `shared` and drawing on its memory budget.
    pub fn into_pool(self, shared: &Shared) -> Pool {
        let Staged {
            engine,
            knobs,
            loaded,
            largest_memory,
        } = self;
        Pool::from_loaded(engine, knobs, loaded, shared.clone(), largest_memory)
    }
}

impl Pool {
    /// Compiles (or loads from the cache) and links `source`. Does not
    /// create an instance; see [`Pool::probe`].
    ///
    /// This does CPU-heavy work; from async code call it in
    /// `spawn_blocking`.
    pub fn load(knobs: Knobs, source: &Source) -> Result<Pool, LoadError> {
        knobs.validate()?;
        let shared = Shared::new(&knobs)?;
        let pool = Pool::load_shared(knobs, source, &shared)?;
        shared.apply(pool.knobs())?;
        Ok(pool)
    }

    /// Like [`Pool::load`], counting into `shared` and drawing on its
    /// memory budget (a service keeps one across reloads).
    pub fn load_shared(knobs: Knobs, source: &Source, shared: &Shared) -> Result<Pool, LoadError> {
        Ok(Pool::stage(knobs, source)?.into_pool(shared))
    }

    /// The part of [`Pool::load_shared`] that needs no `Shared`: the engine
    /// (its pools set up), the component compiled or loaded from the cache,
    /// and linked. CPU-heavy, like [`Pool::load`]; a service starts it on a
    /// thread of its own before its runtime exists.
    pub fn stage(knobs: Knobs, source: &Source) -> Result<Staged, LoadError> {
        knobs.validate()?;
        let prepared = component::prepare(&knobs, source)?;
        let largest_memory = prepared.largest_memory;
        let engine = component::engine(&knobs, largest_memory)?;
        let linker = component::linker(&engine)?;
        let loaded = component::load(&engine, &linker, prepared)?;
        Ok(Staged {
            engine,
            knobs,
            loaded,
            largest_memory,
        })
    }

    /// `largest_memory`: the component's largest initial memory, as its
    /// engine was made for.
    fn from_loaded(
        engine: PoolEngine,
        knobs: Knobs,
        loaded: Loaded,
        shared: Shared,
        largest_memory: Option<u64>,
    ) -> Pool {
        let PoolEngine { engine, wide } = engine;
        let Shared { stats, budget, .. } = shared;
        let p3 = loaded.world.is_p3();
        let mut reuse = knobs.max_instance_reuse_count.unwrap_or(if p3 {
            defaults::P3_MAX_INSTANCE_REUSE_COUNT
        } else {
            defaults::P2_MAX_INSTANCE_REUSE_COUNT
        });
        let concurrent = match (p3, knobs.max_instance_concurrent_reuse_count) {
            (true, n) => n.unwrap_or(defaults::P3_MAX_INSTANCE_CONCURRENT_REUSE_COUNT),
            (false, Some(n)) if n > 1 => {
                tracing::warn!(
                    "max-instance-concurrent-reuse-count {n} ignored: WASIp2 instances serve one request at a time"
                );
                1
            }
            (false, _) => defaults::P2_MAX_INSTANCE_CONCURRENT_REUSE_COUNT,
        };
        let concurrent = if knobs.reuse == ReuseMode::Never {
            reuse = 1;
            1
        } else {
            concurrent
        };
        let knobs = Arc::new(knobs);
        let idle: Option<Arc<Idle<Live>>> = (!p3).then(Arc::default);
        if let Some(idle) = &idle {
            let weak = Arc::downgrade(idle);
            budget.add_reclaimer(weak);
        }
        let dispatch = p3::Dispatch::default();
        if p3 {
            let weak = Arc::downgrade(&dispatch.idle);
            budget.add_reclaimer(weak);
        }
        let retained = Arc::new(Retained::new(
            budget.clone(),
            engine.clone(),
            component::warm_slots(&knobs).bytes(),
        ));
        let state = PoolState {
            engine: engine.clone(),
            pre: loaded.pre,
            knobs: knobs.clone(),
            rules: knobs.allow_outbound.clone().into(),
            reuse: reuse as usize,
            concurrent: concurrent as usize,
            mode: knobs.reuse,
            switch: Arc::default(),
            next_instance: AtomicU64::new(1),
            gate: Arc::new(Gate::new(concurrent as usize)),
            stats: stats.clone(),
            budget: budget.clone(),
            config: Arc::new(knobs.config_vars.iter().cloned().collect()),
            dispatch,
            _epoch: EpochTicker::spawn(engine, retained.clone()),
            retained,
            wide,
            resets_by_copy: !component::resets_written_pages_only(&knobs, largest_memory),
        };
        Pool {
            state: Arc::new(state),
            direct: idle,
            admission: Admission::new(
                knobs.max_concurrent_requests,
                knobs.queue_limit(),
                knobs.max_queue_wait,
                stats.clone(),
            ),
            world: loaded.world,
            stats,
            name: loaded.name,
            cache: loaded.cache,
            knobs,
            largest_memory,
        }
    }

    /// Creates one instance: proves that the component links and that its
    /// start-up code runs. A WASIp2 instance is kept idle for the first
    /// request (which a cold start waits for) unless one is idle already
    /// (a probe called again); a WASIp3 one is dropped off this task.
    /// Needs a tokio runtime.
    pub async fn probe(&self) -> Result<(), LoadError> {
        let state = &self.state;
        if let Some(idle) = &self.direct {
            return match Box::pin(state.create_p2()).await {
                Ok(live) => {
                    let timeout = self.knobs.idle_instance_timeout;
                    let spare = if timeout.is_zero() {
                        Some(live)
                    } else {
                        idle.put_if_none(live, timeout)
                    };
                    if let Some(live) = spare {
                        state.retire(live);
                    }
                    Ok(())
                }
                Err(e) => Err(LoadError::Instantiate {
                    what: self.name.clone(),
                    reason: format!("{e:#}"),
                }),
            };
        }
        let mut store = state.new_store(0);
        let r = tokio::time::timeout(
            self.knobs.request_timeout,
            state.pre.instantiate_async(&mut store),
        )
        .await;
        let reason = match r {
            Ok(Ok(_)) => {
                state.budget.saw_instance(store.data().limits.memory());
                // Not on the way to serving: giving the slot back resets its
                // memory, up to 16 MiB copied for an interpreter guest.
                tokio::task::spawn_blocking(move || drop(store));
                return Ok(());
            }
            Ok(Err(e)) => format!("{e:#}"),
            Err(_) => "timed out".to_string(),
        };
        Err(LoadError::Instantiate {
            what: self.name.clone(),
            reason,
        })
    }

    pub fn world(&self) -> &World {
        &self.world
    }

    pub fn knobs(&self) -> &Knobs {
        &self.knobs
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// How the component was obtained (cache hit, compiled ...).
    pub fn cache_outcome(&self) -> crate::engine::cache::CacheOutcome {
        self.cache
    }

    /// Effective reuse limits: (total per instance, concurrent per instance).
    pub fn reuse_limits(&self) -> (usize, usize) {
        let s = &self.state;
        (s.reuse, s.concurrent)
    }

    /// Whether linear memories reserve 4 GiB of address space each, so
    /// that compiled code needs no bounds checks (see
    /// [`component::engine`]).
    pub fn wide_memories(&self) -> bool {
        self.state.wide.is_some() || self.knobs.max_memory_size >= component::WIDE_RESERVATION
    }

    /// How idle instance slots stay warm, and whether they reset only the
    /// pages an instance wrote (see [`component::resets_written_pages_only`]).
    pub fn warm_slots(&self) -> (component::WarmSlots, bool) {
        (
            component::warm_slots(&self.knobs),
            component::resets_written_pages_only(&self.knobs, self.largest_memory),
        )
    }

    /// The component's largest initial linear memory, in bytes, if known.
    pub fn largest_initial_memory(&self) -> Option<u64> {
        self.largest_memory
    }

    pub fn stats(&self) -> Snapshot {
        self.stats.snapshot()
    }

    pub fn stats_handle(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The memory budget the pool's guests draw on.
    pub fn budget(&self) -> &Arc<MemoryBudget> {
        &self.state.budget
    }

    /// Refuses every later request with [`Rejection::Closed`].
    pub fn close(&self) {
        self.admission.close();
    }

    /// Serves one request: waits for admission, dispatches it to an
    /// instance and waits (at most `request-timeout`) for the response head.
    /// Needs a tokio runtime.
    pub async fn handle(
        &self,
        request: http::Request<WasiBody>,
    ) -> Result<http::Response<ResponseBody>, RequestError> {
        self.stats.requests.fetch_add(1, Relaxed);
        let result = self.dispatch(request).await;
        match &result {
            Ok(_) => self.stats.responses.fetch_add(1, Relaxed),
            Err(RequestError::Rejected(_)) => {
                self.stats.rejected.fetch_add(1, Relaxed);
                self.stats.failed.fetch_add(1, Relaxed)
            }
            Err(RequestError::Timeout) => {
                self.stats.timeouts.fetch_add(1, Relaxed);
                self.stats.failed.fetch_add(1, Relaxed)
            }
            Err(_) => self.stats.failed.fetch_add(1, Relaxed),
        };
        result
    }

    async fn dispatch(
        &self,
        mut request: http::Request<WasiBody>,
    ) -> Result<http::Response<ResponseBody>, RequestError> {
        // wasmtime refuses (with a trap) a request that has neither an
        // authority in its URI nor a Host header, as HTTP/1.0 clients and
        // C hosts may send; name the server instead.
        if request.uri().authority().is_none()
            && !request.headers().contains_key(http::header::HOST)
        {
            request.headers_mut().insert(
                http::header::HOST,
                http::HeaderValue::from_static("localhost"),
            );
        }
        let trace = crate::telemetry::trace::of(&request);
        let asked = Instant::now();
        let permit = self.admission.admit().await;
        let waited = match &permit {
            Ok(p) => p.waited,
            Err(r) => *r == Rejection::QueueTimeout,
        };
        if let Some(t) = &trace
            && waited
        {
            t.queued(asked, Instant::now());
        }
        let permit = permit?;
        let started = Instant::now();
        let state = &self.state;
        // Under `reuse = auto`, keep what a retry on a fresh instance needs.
        let replay =
            if state.mode == ReuseMode::Auto && state.reuse > 1 && !state.switch.is_confirmed() {
                let (parts, body) = request.into_parts();
                let (body, replay) = ReplayableBody::wrap(body);
                let head = RequestHead::of(&parts);
                request = http::Request::from_parts(parts, body);
                Some((head, replay))
            } else {
                None
            };
        let ticket = Ticket::with_trace(trace);
        let first = self
            .attempt(request, &ticket, self.knobs.request_timeout)
            .await;
        let result = match (first, replay) {
            (Err(e @ (RequestError::Trap(_) | RequestError::Guest(_))), Some((head, replay)))
                if ticket.reused.load(Relaxed) =>
            {
                // Boxed: a rare path whose future would otherwise make
                // every request's future twice as large.
                Box::pin(self.retry_fresh(e, head, &replay, started)).await
            }
            (first, _) => first,
        };
        result.map(|response| {
            response.map(|inner| ResponseBody {
                inner,
                _permit: Some(permit),
                abort: None,
            })
        })
    }

    /// A request failed on a reused instance: stop reuse and send it again,
    /// to a fresh instance, if its body can be replayed. If the fresh
    /// instance answers, reuse stays off for this component.
    async fn retry_fresh(
        &self,
        failure: RequestError,
        head: RequestHead,
        replay: &Replay,
        started: Instant,
    ) -> Result<http::Response<WasiBody>, RequestError> {
        let Some(body) = replay.take() else {
            return Err(failure);
        };
        let left = self.knobs.request_timeout.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Err(failure);
        }
        let switch = &self.state.switch;
        switch.suspect();
        self.stats.retries.fetch_add(1, Relaxed);
        let ticket = Ticket::with_trace(head.trace.clone());
        match self.attempt(head.with_body(body), &ticket, left).await {
            Ok(response) => {
                if switch.confirm() {
                    self.stats.reuse_fallbacks.fetch_add(1, Relaxed);
                    tracing::warn!(
                        component = %self.name,
                        "a reused instance failed a request that a fresh instance then answered \
                         ({failure}); instances of this component are no longer reused \
                         (set `reuse = \"always\"` to keep reusing them)"
                    );
                }
                Ok(response)
            }
            Err(e) => {
                switch.acquit();
                Err(e)
            }
        }
    }

    /// One try at a request: dispatch to an instance, wait at most
    /// `timeout` for the response head, classify failures. The response
    /// says which instance served it ([`Served`]).
    async fn attempt(
        &self,
        request: http::Request<WasiBody>,
        ticket: &Arc<Ticket>,
        timeout: Duration,
    ) -> Result<http::Response<WasiBody>, RequestError> {
        let mut r = self.attempt_on(request, ticket, timeout).await;
        if let Some(t) = &ticket.trace {
            t.answered();
        }
        if let Ok(response) = &mut r {
            response.extensions_mut().insert(Served {
                instance: ticket.instance.load(Relaxed),
                reused: ticket.reused.load(Relaxed),
            });
        }
        r
    }

    async fn attempt_on(
        &self,
        request: http::Request<WasiBody>,
        ticket: &Arc<Ticket>,
        timeout: Duration,
    ) -> Result<http::Response<WasiBody>, RequestError> {
        if let Some(idle) = &self.direct {
            return self.attempt_direct(idle, request, ticket, timeout).await;
        }
        let gate = &self.state.gate;
        let sent = Instant::now();
        let mut abandoned = ExpireIfAbandoned {
            ticket,
            deadline: sent + timeout + TEARDOWN_GRACE,
            armed: true,
        };
        let result = tokio::time::timeout(timeout, p3::serve(&self.state, request, ticket)).await;
        abandoned.armed = false;
        gate.observe(sent.elapsed());
        match result {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(p3::Failure::Create(e))) => Err(instantiate_failure(&e)),
            Ok(Err(p3::Failure::Call(e))) => Err(match classify(e) {
                // A trap ends the instance's whole event loop; its requests
                // then look as if the guest had never answered. The
                // worker's own outcome, due right after, tells them apart.
                RequestError::Guest(msg) => match ticket.worker.get() {
                    Some(w) if w.trapped_within(Duration::from_millis(100)).await => {
                        RequestError::Trap(msg)
                    }
                    _ => RequestError::Guest(msg),
                },
                other => other,
            }),
            Err(_elapsed) => {
                ticket.expire();
                Err(RequestError::Timeout)
            }
        }
    }

    /// [`Pool::attempt`] for WASIp2: the guest runs on this task.
    async fn attempt_direct(
        &self,
        idle: &Arc<Idle<Live>>,
        request: http::Request<WasiBody>,
        ticket: &Arc<Ticket>,
        timeout: Duration,
    ) -> Result<http::Response<WasiBody>, RequestError> {
        let state = &self.state;
        let deadline = Instant::now() + timeout;
        let work = async {
            // Under `reuse = auto` with reuse switched off, instances that
            // served once are never picked again (and no longer kept).
            let reusable = if state.switch.is_off() {
                idle.clear();
                None
            } else {
                idle.take()
            };
            let mut live = match reusable {
                Some(live) => live,
                // Boxed: instantiation is rare next to reuse, and its
                // future would add to every request's.
                None => {
                    let from = Instant::now();
                    let live = Box::pin(state.create_p2())
                        .await
                        .map_err(|e| instantiate_failure(&e))?;
                    if let Some(t) = &ticket.trace {
                        t.instantiated(from, Instant::now());
                    }
                    live
                }
            };
            ticket.taken_by(live.id, live.served, &self.stats);
            live.served += 1;
            if let Some(t) = &ticket.trace {
                live.store.data_mut().trace_begin(t.clone());
            }
            let finish = PoolState::finish_p2(self.state.clone(), idle.clone());
            // The guest may run on after answering, as long as the
            // teardown deadline of the WASIp3 path allows.
            let rest_deadline = deadline + TEARDOWN_GRACE;
            match p2::call(live, request, rest_deadline, finish).await {
                Answer::Response(r) => Ok(r),
                Answer::ErrorCode(code) => Err(RequestError::Guest(format!(
                    "the guest answered with an error: {code:?}"
                ))),
                Answer::NoResponse => Err(RequestError::Guest(
                    "guest never invoked `response-outparam::set` method".into(),
                )),
                Answer::Trap(msg) => Err(RequestError::Trap(msg)),
            }
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_elapsed) => {
                tracing::warn!("request timed out; its instance, if it had one, is discarded");
                Err(RequestError::Timeout)
            }
        }
    }

    /// Sends `GET /` twice to one instance (the pool must allow reuse):
    /// tells whether the component answers on a reused instance. Needs a
    /// tokio runtime.
    pub async fn probe_reuse(&self) -> ReuseProbe {
        let get = get_root;
        async fn finish(r: http::Response<ResponseBody>) -> Result<(), String> {
            use http_body_util::BodyExt as _;
            r.into_body()
                .collect()
                .await
                .map(drop)
                .map_err(|e| format!("{e}"))
        }
        match self.handle(get()).await {
            Ok(r) => {
                if let Err(e) = finish(r).await {
                    return ReuseProbe::Inconclusive(format!("the first response failed: {e}"));
                }
            }
            Err(e) => return ReuseProbe::Inconclusive(format!("the first request failed: {e}")),
        }
        // The instance becomes available again once its event loop idles.
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let reused_before = self.stats.instances_reused.load(Relaxed);
            let result = self.handle(get()).await;
            let on_reused = self.stats.instances_reused.load(Relaxed) > reused_before;
            match result {
                Ok(r) => match finish(r).await {
                    Ok(()) if on_reused => return ReuseProbe::Reusable,
                    Ok(()) => continue,
                    Err(e) => return ReuseProbe::NotReusable(format!("the response failed: {e}")),
                },
                Err(e) if on_reused => return ReuseProbe::NotReusable(e.to_string()),
                Err(e) => {
                    return ReuseProbe::Inconclusive(format!("a fresh instance failed: {e}"));
                }
            }
        }
        ReuseProbe::Inconclusive("no request reached a reused instance".into())
    }

    /// Whether `reuse = auto` found that this component fails on reused
    /// instances (it then uses each instance once).
    pub fn reuse_disabled(&self) -> bool {
        self.state.switch.is_confirmed()
    }
}

/// An empty request body.
pub fn empty_body() -> WasiBody {
    use http_body_util::BodyExt as _;
    http_body_util::Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// `GET http://localhost/` without a body, as probes and benchmarks send.
pub fn get_root() -> http::Request<WasiBody> {
    let mut r = http::Request::new(empty_body());
    *r.uri_mut() = http::Uri::from_static("http://localhost/");
    r
}

/// What [`Pool::probe_reuse`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReuseProbe {
    /// A reused instance answered.
    Reusable,
    /// A reused instance failed (why).
    NotReusable(String),
    /// The probe could not tell (why).
    Inconclusive(String),
}

/// What is needed to send a request again (its body aside).
struct RequestHead {
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    headers: http::HeaderMap,
    trace: Option<Arc<RequestTrace>>,
}

impl RequestHead {
    fn of(parts: &http::request::Parts) -> RequestHead {
        RequestHead {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
            trace: parts.extensions.get::<Arc<RequestTrace>>().cloned(),
        }
    }

    fn with_body(self, body: WasiBody) -> http::Request<WasiBody> {
        let mut r = http::Request::new(body);
        *r.method_mut() = self.method;
        *r.uri_mut() = self.uri;
        *r.version_mut() = self.version;
        *r.headers_mut() = self.headers;
        r
    }
}

/// Tells the instance a request is over once its deadline passes, if the
/// caller went away before the answer (the client hung up). The call's
/// expiration future waits only for the ticket, so that a request costs one
/// timer (the caller's timeout), not two.
struct ExpireIfAbandoned<'a> {
    ticket: &'a Arc<Ticket>,
    deadline: Instant,
    armed: bool,
}

impl Drop for ExpireIfAbandoned<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let ticket = self.ticket.clone();
        let left = self.deadline.saturating_duration_since(Instant::now());
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn(async move {
                tokio::time::sleep(left).await;
                ticket.expire();
            })),
            Err(_) => ticket.expire(),
        }
    }
}

/// No instance was made: the memory budget could not hold one more, even
/// after waiting `max-queue-wait` for memory to be freed.
#[derive(Debug, thiserror::Error)]
#[error("the memory budget cannot hold another instance")]
struct BudgetSpent;

/// A failure to make an instance, as a request error.
fn instantiate_failure(e: &wasmtime::Error) -> RequestError {
    if e.is::<BudgetSpent>() {
        RequestError::Rejected(Rejection::MemoryBudget)
    } else {
        RequestError::Instantiate(format!("{e:#}"))
    }
}

fn classify(e: wasmtime::Error) -> RequestError {
    if e.downcast_ref::<ExpirationError>().is_some() {
        RequestError::Timeout
    } else if e.downcast_ref::<TrapOrPanicError>().is_some()
        // A WASIp2 trap arrives as the cause of "guest never invoked
        // response-outparam::set".
        || e.chain().any(|c| c.downcast_ref::<wasmtime::Trap>().is_some())
    {
        RequestError::Trap(format!("{e:#}"))
    } else {
        RequestError::Guest(format!("{e:#}"))
    }
}

/// How instances are made, and the policy they follow; shared by the pool
/// and by every instance still running for it.
pub(crate) struct PoolState {
    engine: Engine,
    pre: ProxyPre<Host>,
    pub(crate) knobs: Arc<Knobs>,
    rules: Arc<[OutboundRule]>,
    pub(crate) reuse: usize,
    pub(crate) concurrent: usize,
    mode: ReuseMode,
    pub(crate) switch: Arc<ReuseSwitch>,
    next_instance: AtomicU64,
    /// Holds WASIp3 instances to what the requests in flight need.
    pub(crate) gate: Arc<Gate>,
    pub(crate) stats: Arc<Stats>,
    budget: Arc<MemoryBudget>,
    /// The guests' wasi:config variables.
    config: Arc<wasmtime_wasi_config::WasiConfigVariables>,
    /// Routing of WASIp3 requests (unused by WASIp2 pools).
    pub(crate) dispatch: p3::Dispatch,
    /// Lives as long as any instance does (running ones hold the state), so
    /// guests of a pool that was swapped out by a reload still yield.
    _epoch: EpochTicker,
    /// What the engine's idle slots keep resident, charged to the budget.
    retained: Arc<Retained>,
    /// The address space its memories reserved (see `component::engine`).
    wide: Option<component::WideClaim>,
    /// Whether a slot given back copies its memory's image back (see
    /// `component::resets_written_pages_only`): then instances are dropped
    /// after their response, not before.
    resets_by_copy: bool,
}

impl PoolState {
    fn new_store(&self, instance_id: u64) -> Store<Host> {
        let mut store = Store::new(
            &self.engine,
            Host::new(
                &self.knobs,
                self.rules.clone(),
                instance_id,
                self.budget.clone(),
                self.retained.clone(),
                self.config.clone(),
            ),
        );
        store.limiter_async(|h| &mut h.limits);
        // Its fiber stack, which a deep guest may touch all of.
        store.data_mut().limits.count_stack(component::STACK_SIZE);
        // Each epoch tick makes running guest code yield to the executor, so
        // a busy loop cannot keep its thread: timers (request timeout,
        // expiration) still fire and other tasks still run.
        store.epoch_deadline_async_yield_and_update(1);
        store.set_epoch_deadline(1);
        store
    }
}

impl PoolState {
    /// A new store and instance, counted as live; instantiation is bounded
    /// by the request timeout.
    async fn create(&self) -> wasmtime::Result<(u64, Store<Host>, Proxy)> {
        // The new instance will start in a slot that an ended one kept
        // resident, if there is one, and take that memory back.
        self.retained.sync();
        let credit = || self.retained.credit();
        if !self.budget.has_room_for_instance(credit()) {
            // Idle instances go first: their memory serves nobody.
            self.budget
                .reclaim_until(|| self.budget.has_room_for_instance(credit()));
            self.retained.sync();
            if !self.budget.has_room_for_instance(credit())
                && !self
                    .budget
                    .wait_for_room(self.knobs.max_queue_wait, credit)
                    .await
            {
                return Err(wasmtime::Error::new(BudgetSpent));
            }
        }
        let id = self.next_instance.fetch_add(1, Relaxed);
        let mut store = self.new_store(id);
        // Instantiation is bounded like a request.
        let proxy = match tokio::time::timeout(
            self.knobs.request_timeout,
            self.pre.instantiate_async(&mut store),
        )
        .await
        {
            Ok(Ok(proxy)) => proxy,
            Ok(Err(e)) => {
                self.stats.instantiation_failures.fetch_add(1, Relaxed);
                tracing::warn!(instance = id, "instantiation failed: {e:#}");
                return Err(e);
            }
            Err(_) => {
                self.stats.instantiation_failures.fetch_add(1, Relaxed);
                tracing::warn!(instance = id, "instantiation timed out");
                return Err(wasmtime::format_err!("instantiation timed out"));
            }
        };
        self.stats.instance_started();
        self.budget.saw_instance(store.data().limits.memory());
        tracing::debug!(instance = id, "instance created");
        Ok((id, store, proxy))
    }

    /// Whether an instance that has taken `served` requests may take
    /// another under the reuse policy (its count, and `reuse = auto`).
    pub(crate) fn takes_another(&self, served: u64) -> bool {
        served < self.reuse as u64 && !(served > 0 && self.switch.is_off())
    }

    /// Whether an instance that has taken `served` requests, and ended
    /// well, is kept idle for another.
    fn keeps_idle(&self, served: u64) -> bool {
        self.takes_another(served) && !self.knobs.idle_instance_timeout.is_zero()
    }

    /// Drops a WASIp2 instance that takes no more requests. Where giving
    /// its slot back copies up to 16 MiB (an interpreter's heap, and the
    /// first time faults it in: 20 ms of a componentize-py cold start), in
    /// a task of its own, so that the response on hand does not wait;
    /// otherwise here (a task costs a compiled guest's fresh instance more
    /// than its reset: 12 µs against 150 µs of server CPU per request).
    fn retire(&self, live: Live) {
        match tokio::runtime::Handle::try_current() {
            Ok(rt) if self.resets_by_copy => drop(rt.spawn(async move { drop(live) })),
            _ => drop(live),
        }
    }

    /// A new WASIp3 instance; `slot` is its place among the gate's
    /// accepting instances.
    pub(crate) async fn create_p3(&self, slot: GateSlot) -> wasmtime::Result<p3::Live> {
        let (id, store, proxy) = self.create().await?;
        Ok(p3::Live {
            store,
            proxy,
            id,
            served: 0,
            worker: Arc::default(),
            slot,
            stats: self.stats.clone(),
            trapped: false,
        })
    }

    /// What becomes of a WASIp3 instance whose loop has nothing left: kept
    /// for another request while the reuse policy allows, dropped otherwise.
    pub(crate) fn finish_p3(&self, mut live: p3::Live, result: wasmtime::Result<()>) {
        match result {
            Ok(()) => {
                if self.keeps_idle(live.served) && !live.worker.poisoned.load(Relaxed) {
                    self.dispatch
                        .idle
                        .put(live, self.knobs.idle_instance_timeout);
                } else if live.worker.poisoned.load(Relaxed) {
                    tracing::warn!(
                        instance = live.id,
                        "instance discarded after a request timeout"
                    );
                } else {
                    tracing::debug!(instance = live.id, served = live.served, "instance retired");
                }
            }
            Err(e) => {
                live.trapped = true;
                self.stats.traps.fetch_add(1, Relaxed);
                tracing::warn!(instance = live.id, "instance discarded after a trap: {e:#}");
            }
        }
    }

    /// A new WASIp2 instance for the direct path.
    async fn create_p2(&self) -> wasmtime::Result<Live> {
        let (id, store, proxy) = self.create().await?;
        let Proxy::P2(proxy) = proxy else {
            // `Pool` takes the direct path only for WASIp2 components.
            return Err(wasmtime::format_err!("not a WASIp2 component"));
        };
        Ok(Live {
            store,
            proxy,
            id,
            served: 0,
            stats: self.stats.clone(),
        })
    }

    /// What the direct path does with an instance once `handle` returned:
    /// keep it for another request while the reuse policy allows, drop it
    /// otherwise. `state` keeps the epoch ticker running meanwhile.
    fn finish_p2(state: Arc<PoolState>, idle: Arc<Idle<Live>>) -> p2::Finish {
        Box::new(move |mut live: Live, result: wasmtime::Result<()>| {
            // The request is over: its trace is not this instance's.
            live.store.data_mut().trace_clear();
            match result {
                Ok(()) => {
                    if state.keeps_idle(live.served) {
                        idle.put(live, state.knobs.idle_instance_timeout);
                    } else {
                        tracing::debug!(
                            instance = live.id,
                            served = live.served,
                            "instance retired"
                        );
                        state.retire(live);
                    }
                }
                Err(e) => {
                    state.stats.traps.fetch_add(1, Relaxed);
                    tracing::warn!(instance = live.id, "instance discarded after a trap: {e:#}");
                    state.retire(live);
                }
            }
        })
    }
}

/// Advances the engine's epoch every [`EPOCH_TICK`] until dropped.
struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EpochTicker {
    /// Also keeps `retained` up to date (every [`retained::SYNC_EVERY`]).
    fn spawn(engine: Engine, retained: Arc<Retained>) -> EpochTicker {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let sync_every = (retained::SYNC_EVERY.as_millis() / EPOCH_TICK.as_millis()).max(1);
        let thread = std::thread::Builder::new()
            .name("wasmpool-epoch".into())
            .spawn(move || {
                let mut ticks = 0u128;
                while !flag.load(Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                    ticks += 1;
                    if ticks.is_multiple_of(sync_every) {
                        retained.sync();
                    }
                }
            })
            .ok();
        EpochTicker { stop, thread }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
