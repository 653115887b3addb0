//! WASIp3 requests: wasmpool's own dispatcher.
//!
//! A WASIp3 instance serves its requests from an event loop
//! (`Store::run_concurrent`), several at once. Nobody owns that loop for
//! the instance's whole life. A request that takes an idle instance (or
//! makes one) runs the loop on its own task until its response head is
//! ready; the response body then drives the loop while the client reads
//! it, and when the loop has nothing left the instance goes back to the
//! idle list. The loop moves to a task of its own ("detached") only when
//! other requests joined it, when its owner gives up (timeout, client
//! gone), or when work outlives the response body. A detached loop is
//! torn down once it has made no progress (taken a request, answered one,
//! or produced a frame of a response body) for
//! `request-timeout` plus a grace period, so a streaming response outlives
//! the timeout while a stuck guest does not.
//!
//! Where a request goes, in this order:
//! 1. a running loop that advertised room: all its tasks wait on I/O, it
//!    has fewer requests than `max-instance-concurrent-reuse-count`, and
//!    its reuse count allows one more. One advertisement admits one
//!    request; the loop advertises again once it is waiting again.
//! 2. an idle instance (the most recently used);
//! 3. a new instance, if the [`Gate`](super::spare::Gate) agrees that the
//!    live instances could not hold the requests in flight; otherwise the
//!    request waits for a loop to advertise room (or for the gate's
//!    starvation bound).
//!
//! Invariants: an instance is in the idle list or inside exactly one loop
//! future; a loop future is polled by exactly one of its owner's request
//! task, its owner's response body, or a detached task; a request accepted
//! by a loop gets exactly one reply (a response, an error, or its request
//! back when the loop closed before taking it).

use crate::engine::host::Host;
use crate::engine::idle::Parked;
use crate::engine::pool::{PoolState, Ticket, WorkerShared};
use crate::engine::spare::GateSlot;
use crate::engine::stats::Stats;
use futures::channel::oneshot;
use futures::stream::{FuturesUnordered, StreamExt as _};
use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use wasmtime::component::Accessor;
use wasmtime::{AsContextMut as _, Store};
use wasmtime_wasi_http::WasiBody;
use wasmtime_wasi_http::handler::{Prepared, Proxy, TrapOrPanicError};

// (No aliases named `Request` or `Response`: cbindgen, which reads the
// whole crate for the C header, would take them for `http`'s.)
type Reply = oneshot::Sender<wasmtime::Result<http::Response<WasiBody>>>;

/// One WASIp3 instance and its store; counted in `instances_live` (and, until
/// it stops taking requests, among the gate's accepting instances) while it
/// exists.
pub(crate) struct Live {
    pub store: Store<Host>,
    pub proxy: Proxy,
    pub id: u64,
    /// Requests this instance has taken.
    pub served: u64,
    pub worker: Arc<WorkerShared>,
    pub slot: GateSlot,
    pub stats: Arc<Stats>,
    /// Set before a drop that follows a trap.
    pub trapped: bool,
}

impl Drop for Live {
    fn drop(&mut self) {
        self.stats.instances_live.fetch_sub(1, Relaxed);
        self.slot.stop();
        self.worker.end(self.trapped);
    }
}

impl Parked for Live {
    fn id(&self) -> u64 {
        self.id
    }
    fn served(&self) -> u64 {
        self.served
    }
}

/// Why [`serve`] has no response.
pub(crate) enum Failure {
    /// No instance could be made.
    Create(wasmtime::Error),
    /// The instance failed the request (error code, trap, expiry).
    Call(wasmtime::Error),
}

/// A request on its way to a loop.
struct Job {
    request: http::Request<WasiBody>,
    ticket: Arc<Ticket>,
    reply: Reply,
}

/// The loop closed before taking the request: it goes elsewhere.
#[derive(Debug, thiserror::Error)]
#[error("the instance closed before taking the request")]
struct Bounced(Mutex<Option<http::Request<WasiBody>>>);

impl Job {
    fn bounce(self) {
        let back = Bounced(Mutex::new(Some(self.request)));
        let _ = self.reply.send(Err(wasmtime::Error::new(back)));
    }
}

/// The request back, if `e` says it was bounced.
fn bounced(e: &wasmtime::Error) -> Option<http::Request<WasiBody>> {
    e.downcast_ref::<Bounced>()
        .and_then(|b| b.0.lock().unwrap_or_else(|p| p.into_inner()).take())
}

/// The routing state of a pool's WASIp3 instances.
#[derive(Default)]
pub(crate) struct Dispatch {
    pub idle: Arc<crate::engine::idle::Idle<Live>>,
    /// Loops that advertised room for one more request, most recent last.
    spare: Mutex<Vec<Arc<Run>>>,
}

impl Dispatch {
    /// Hands `job` to a loop that advertised room; returns its run.
    #[allow(clippy::result_large_err)] // the job comes back as it went, unboxed
    fn join(&self, mut job: Job) -> Result<Arc<Run>, Job> {
        loop {
            let Some(run) = self.spare.lock().unwrap().pop() else {
                return Err(job);
            };
            match run.push(job) {
                Ok(()) => return Ok(run),
                Err(back) => job = back,
            }
        }
    }

    fn advertise(&self, run: &Arc<Run>) -> bool {
        {
            let mut s = run.state.lock().unwrap();
            if s.closed || s.advertised || !s.room {
                return false;
            }
            s.advertised = true;
        }
        self.spare.lock().unwrap().push(run.clone());
        true
    }
}

/// One run of an instance's event loop (from taking the instance out of
/// the idle list, or making it, to parking or dropping it).
struct Run {
    state: Mutex<RunState>,
    waker: futures::task::AtomicWaker,
    instance: u64,
    /// How long a detached loop may go without progress before it is
    /// torn down.
    busy_timeout: Duration,
    /// Torn down for making no progress: its response bodies that had not
    /// ended fail rather than end as if complete. (Set before the
    /// instance is dropped, which ends the guest's streams.)
    torn_down: AtomicBool,
}

struct RunState {
    /// Requests handed over and not yet taken.
    jobs: VecDeque<Job>,
    /// Takes no more requests (parking, attached to a body, or ending).
    closed: bool,
    /// Requests other than the first were handed to this run.
    joined: usize,
    /// In the dispatcher's list of loops with room.
    advertised: bool,
    /// The loop would take another request now.
    room: bool,
    /// Requests taken and not yet answered.
    outstanding: usize,
    /// The last sign of progress: a request taken, a frame of a response
    /// body or, with none outstanding, an answer.
    busy_since: Instant,
}

impl RunState {
    fn close(&mut self) {
        self.closed = true;
        self.room = false;
    }
}

impl Run {
    fn new(instance: u64, busy_timeout: Duration) -> Run {
        Run {
            state: Mutex::new(RunState {
                jobs: VecDeque::new(),
                closed: false,
                joined: 0,
                advertised: false,
                room: false,
                outstanding: 0,
                busy_since: Instant::now(),
            }),
            waker: Default::default(),
            instance,
            busy_timeout,
            torn_down: AtomicBool::new(false),
        }
    }

    #[allow(clippy::result_large_err)] // the job comes back as it went, unboxed
    fn push(&self, job: Job) -> Result<(), Job> {
        {
            let mut s = self.state.lock().unwrap();
            if s.closed || !s.advertised || !s.room {
                // Stale: it may advertise again once it has room.
                s.advertised = false;
                return Err(job);
            }
            s.advertised = false;
            s.room = false;
            s.joined += 1;
            s.jobs.push_back(job);
        }
        self.waker.wake();
        Ok(())
    }

    fn pop(&self) -> Option<Job> {
        self.state.lock().unwrap().jobs.pop_front()
    }

    /// Takes no more requests; those handed over go elsewhere.
    fn close(&self) {
        let jobs = {
            let mut s = self.state.lock().unwrap();
            s.close();
            std::mem::take(&mut s.jobs)
        };
        jobs.into_iter().for_each(Job::bounce);
    }

    /// Closes the run if no request waits for it.
    fn close_if_idle(&self) -> bool {
        let mut s = self.state.lock().unwrap();
        if s.jobs.is_empty() {
            s.close();
        }
        s.closed
    }

    /// Closes the run if no other request ever joined it: its owner's
    /// response body may then drive it alone.
    fn attach(&self) -> bool {
        let mut s = self.state.lock().unwrap();
        if s.joined == 0 && s.jobs.is_empty() {
            s.close();
        }
        s.closed
    }

    /// When a detached loop is torn down unless it makes progress.
    fn deadline(&self) -> Instant {
        self.state.lock().unwrap().busy_since + self.busy_timeout
    }

    /// A response body produced a frame, ended or was dropped: progress
    /// (after the end, the loop gets a whole timeout for what is left).
    /// A client that takes no frame for that long is not progress: on a
    /// detached loop its response is cut then, whatever the HTTP front's
    /// send timeouts (which HTTP/2 flow control can escape) would allow.
    fn touch(&self) {
        self.state.lock().unwrap().busy_since = Instant::now();
    }
}

/// One request's call on a loop: whether it answered (false: expired).
type Call<'a> = Pin<Box<dyn Future<Output = wasmtime::Result<bool>> + Send + 'a>>;

/// Closes its run however the loop future ends (dropped included).
struct CloseOnDrop(Arc<Run>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// A running event loop: the future that drives it, and its run.
struct Loop {
    fut: Pin<Box<dyn Future<Output = ()> + Send>>,
    run: Arc<Run>,
    /// The runtime it was started on: a body may be dropped elsewhere (a
    /// C host's thread).
    rt: tokio::runtime::Handle,
}

/// Moves a loop to a task of its own, which tears the instance down once
/// the loop has been busy past its deadline.
fn detach(lp: Loop) {
    let rt = lp.rt.clone();
    // (On a runtime shutting down the task, and the instance, is dropped.)
    rt.spawn(async move {
        let Loop { mut fut, run, .. } = lp;
        loop {
            let deadline = run.deadline();
            tokio::select! {
                () = &mut fut => return,
                () = tokio::time::sleep_until(deadline.into()) => {
                    if Instant::now() >= run.deadline() {
                        run.torn_down.store(true, Relaxed);
                        tracing::warn!(
                            instance = run.instance,
                            "instance discarded after a request timeout"
                        );
                        return;
                    }
                }
            }
        }
    });
}

/// Detaches the loop it holds when dropped.
struct Driver(Option<Loop>);

impl Driver {
    /// Polls the loop, if it still runs (it is gone once finished).
    fn poll(&mut self, cx: &mut Context<'_>) {
        if let Some(lp) = self.0.as_mut()
            && lp.fut.as_mut().poll(cx).is_ready()
        {
            self.0 = None;
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(lp) = self.0.take() {
            detach(lp);
        }
    }
}

/// The response body of a request served by a loop. It drives the loop
/// while it is read if its request owns the loop (and detaches it when
/// dropped first), and its frames count as the loop's progress, so a
/// response that streams for longer than `request-timeout` is not cut by
/// the detached loop's deadline.
struct LoopBody {
    inner: WasiBody,
    run: Arc<Run>,
    lp: Driver,
}

impl LoopBody {
    fn wrap(
        response: http::Response<WasiBody>,
        run: Arc<Run>,
        lp: Option<Loop>,
    ) -> http::Response<WasiBody> {
        use http_body_util::BodyExt as _;
        response.map(|inner| {
            LoopBody {
                inner,
                run,
                lp: Driver(lp),
            }
            .boxed_unsync()
        })
    }
}

impl http_body::Body for LoopBody {
    type Data = bytes::Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        this.lp.poll(cx);
        let mut r = Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(r, Poll::Ready(None)) && this.run.torn_down.load(Relaxed) {
            // The guest's stream ended because its instance was dropped.
            r = Poll::Ready(Some(Err(wasmtime_wasi_http::Error::InternalError(Some(
                "instance discarded after a request timeout".into(),
            )))));
        }
        match &r {
            Poll::Ready(Some(Ok(_))) => this.run.touch(),
            Poll::Ready(None | Some(Err(_))) => {
                if let Some(lp) = this.lp.0.take() {
                    // Work past the body (post-return) goes on by itself,
                    // with a whole timeout from here.
                    this.run.touch();
                    detach(lp);
                }
            }
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoopBody {
    fn drop(&mut self) {
        // (A loop detached from here gets its deadline from now, not from
        // the response head, which may be long ago.)
        self.run.touch();
    }
}

/// Serves `request` on a WASIp3 instance of `state` and returns its
/// response head (see the module documentation for where it runs).
pub(crate) async fn serve(
    state: &Arc<PoolState>,
    mut request: http::Request<WasiBody>,
    ticket: &Arc<Ticket>,
) -> Result<http::Response<WasiBody>, Failure> {
    let dispatch = &state.dispatch;
    let gate = &state.gate;
    let mut refused_since: Option<Instant> = None;
    loop {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            request,
            ticket: ticket.clone(),
            reply,
        };
        // Under `reuse = auto` with reuse switched off, an instance that
        // served once takes nothing more: every request gets a new one.
        let reusing = !state.switch.is_off();
        let joined = if reusing {
            dispatch.join(job)
        } else {
            Err(job)
        };
        let job = match joined {
            Ok(run) => match answer(rx).await.map(|r| LoopBody::wrap(r, run, None)) {
                Err(Failure::Call(e)) => match bounced(&e) {
                    Some(back) => {
                        request = back;
                        continue;
                    }
                    None => return Err(Failure::Call(e)),
                },
                other => return other,
            },
            Err(job) => {
                if !reusing {
                    dispatch.idle.clear();
                }
                job
            }
        };
        let live = match reusing.then(|| dispatch.idle.take()).flatten() {
            Some(live) => live,
            None => {
                let in_flight = state.stats.in_flight.load(Relaxed) as usize;
                match gate.slot(in_flight) {
                    Ok(slot) => {
                        let from = Instant::now();
                        let live = state.create_p3(slot).await.map_err(Failure::Create)?;
                        if let Some(t) = &ticket.trace {
                            t.instantiated(from, Instant::now());
                        }
                        live
                    }
                    Err(_spare) => {
                        // Live instances could hold the requests in flight:
                        // wait for one to advertise room, but not forever.
                        let since = *refused_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= gate.starved_after() {
                            gate.starved();
                            refused_since = None;
                        }
                        gate.wait().await;
                        request = job.request;
                        continue;
                    }
                }
            }
        };
        match own(state, live, job, rx).await {
            Err(Failure::Call(e)) => match bounced(&e) {
                Some(back) => request = back,
                None => return Err(Failure::Call(e)),
            },
            other => return other,
        }
    }
}

/// The reply to a request handed to a loop.
async fn answer(
    rx: oneshot::Receiver<wasmtime::Result<http::Response<WasiBody>>>,
) -> Result<http::Response<WasiBody>, Failure> {
    match rx.await {
        Ok(r) => r.map_err(Failure::Call),
        // The loop ended without a word: its instance trapped (or was torn
        // down after a timeout).
        Err(_) => Err(Failure::Call(TrapOrPanicError.into())),
    }
}

/// Runs `live`'s loop on this task, with `job` as its first request, until
/// the response head is ready; then lets the response body drive the loop,
/// or detaches it.
async fn own(
    state: &Arc<PoolState>,
    live: Live,
    job: Job,
    mut rx: oneshot::Receiver<wasmtime::Result<http::Response<WasiBody>>>,
) -> Result<http::Response<WasiBody>, Failure> {
    let run = Arc::new(Run::new(
        live.id,
        state.knobs.request_timeout + crate::engine::pool::TEARDOWN_GRACE,
    ));
    let mut driver = Driver(Some(event_loop(state.clone(), live, run.clone(), job)));
    let head = poll_fn(|cx| {
        // The loop first: it is what makes progress.
        driver.poll(cx);
        Pin::new(&mut rx).poll(cx)
    })
    .await;
    let response = match head {
        Ok(r) => r.map_err(Failure::Call)?,
        Err(_) => return Err(Failure::Call(TrapOrPanicError.into())),
    };
    Ok(match driver.0.take() {
        None => response,
        Some(lp) if run.attach() => LoopBody::wrap(response, run, Some(lp)),
        Some(lp) => {
            detach(lp);
            LoopBody::wrap(response, run, None)
        }
    })
}

/// Tells a request's call that the caller gave up on it (see
/// [`Ticket::expire`]).
async fn expiry(ticket: Arc<Ticket>) {
    let notified = ticket.notify.notified();
    let mut notified = pin!(notified);
    notified.as_mut().enable();
    if ticket.expired.load(Relaxed) {
        return;
    }
    notified.await
}

/// The future of one run of `live`'s event loop, `first` its first
/// request. When the loop has nothing left, the instance is parked or
/// dropped ([`PoolState::finish_p3`]).
fn event_loop(state: Arc<PoolState>, live: Live, run: Arc<Run>, first: Job) -> Loop {
    let for_loop = run.clone();
    let fut = async move {
        let run = for_loop;
        let mut live = live;
        let closer = CloseOnDrop(run.clone());
        let result = {
            let Live {
                store,
                proxy,
                id,
                served,
                worker,
                slot,
                stats,
                ..
            } = &mut live;
            let (id, proxy, worker) = (*id, &*proxy, &*worker);
            let concurrent = state.concurrent;
            let state_ref = &state;
            let run_ref = &run;
            let inner = store.run_concurrent(async move |accessor: &Accessor<Host>| {
                let Proxy::P3(guest) = proxy else {
                    return Err(wasmtime::format_err!("not a WASIp3 component"));
                };
                let func = *guest.wasi_http_handler().func_handle().func();
                let mut futures: FuturesUnordered<Call<'_>> = FuturesUnordered::new();
                let mut first = Some(first);
                let mut open = true;
                poll_fn(|cx| {
                    loop {
                        // Answers first: a request that expired stops
                        // this instance from taking more.
                        match futures.poll_next_unpin(cx) {
                            Poll::Ready(Some(Ok(answered))) => {
                                let mut s = run_ref.state.lock().unwrap();
                                s.outstanding -= 1;
                                if s.outstanding == 0 {
                                    s.busy_since = Instant::now();
                                }
                                if !answered {
                                    worker.poisoned.store(true, Relaxed);
                                }
                            }
                            Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                            Poll::Ready(None) | Poll::Pending => {}
                        }
                        if open
                            && (worker.poisoned.load(Relaxed) || !state_ref.takes_another(*served))
                        {
                            // This instance takes no more requests.
                            open = false;
                            slot.stop();
                            run_ref.close();
                            if let Some(job) = first.take() {
                                job.bounce();
                            }
                        }
                        let ready = accessor.poll_ready_for_concurrent_call(func, cx).is_ready();
                        let room = open && ready && futures.len() < concurrent;
                        if room {
                            let job = first.take().or_else(|| {
                                run_ref.waker.register(cx.waker());
                                run_ref.pop()
                            });
                            if let Some(Job {
                                request,
                                ticket,
                                reply,
                            }) = job
                            {
                                ticket.taken_by(id, *served, stats);
                                *served += 1;
                                let _ = ticket.worker.set(worker.clone());
                                if ticket.expired.load(Relaxed) {
                                    worker.poisoned.store(true, Relaxed);
                                }
                                {
                                    let mut s = run_ref.state.lock().unwrap();
                                    s.outstanding += 1;
                                    s.busy_since = Instant::now();
                                }
                                let trace = ticket.trace.clone();
                                let prepared = accessor.with(|mut store| {
                                    if let Some(t) = &trace {
                                        store.data_mut().trace_begin(t.clone());
                                    }
                                    Prepared::new(
                                        store.as_context_mut(),
                                        proxy,
                                        request,
                                        <Host as wasmtime_wasi_http::WasiHttpView>::http,
                                        reply,
                                    )
                                });
                                let expired = expiry(ticket);
                                futures.push(Box::pin(async move {
                                    let r = prepared?.run(accessor, expired).await;
                                    if let Some(t) = &trace {
                                        accessor.with(|mut s| s.data_mut().trace_end(t));
                                    }
                                    r
                                }));
                                continue;
                            }
                        }
                        run_ref.state.lock().unwrap().room = room;
                        if !futures.is_empty()
                            || accessor.poll_no_interesting_tasks(cx).is_pending()
                            // Waiting for the guest to lift its backpressure.
                            || first.is_some()
                        {
                            return Poll::Pending;
                        }
                        // Nothing left to do: park, unless a request was
                        // handed over meanwhile.
                        if !open || run_ref.close_if_idle() {
                            return Poll::Ready(Ok(()));
                        }
                        if !room {
                            // Backpressure: wait for it to lift.
                            return Poll::Pending;
                        }
                    }
                })
                .await
            });
            let mut inner = pin!(inner);
            let dispatch = &state.dispatch;
            poll_fn(|cx| {
                let poll = inner.as_mut().poll(cx);
                // Every task of the loop waits: it may take another request.
                if poll.is_pending() && dispatch.advertise(&run) {
                    state.gate.has_room();
                }
                poll
            })
            .await
            .and_then(|r| r)
        };
        drop(closer);
        state.finish_p3(live, result);
    };
    Loop {
        fut: Box::pin(fut),
        run,
        rt: tokio::runtime::Handle::current(),
    }
}
