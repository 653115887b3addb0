//! `wasmpool serve` as a managed service: inherited sockets, sd_notify
//! (ready, status, watchdog, reload, stopping), drain on SIGTERM/SIGINT,
//! reload on SIGHUP, exit when idle, and the metrics endpoint.

pub mod admin;
pub mod notify;
mod options;
pub mod sockets;

pub use options::ServeOptions;
use options::Settled;

use crate::config::Knobs;
use crate::engine::component::Source;
use crate::engine::pool::{Pool, Staged};
use crate::engine::stats::Shared;
use crate::error::LoadError;
use crate::http::tls::Tls;
use crate::http::{self as front, Front, Listener};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::{access, trace};
use anyhow::{Context as _, Result, bail};
use notify::Notifier;
use sockets::Inherited;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use tokio::signal::unix::{SignalKind, signal};

/// The longest the drain waits for queued spans to reach the collector.
const TRACE_FLUSH: Duration = Duration::from_secs(3);

/// Why the service stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Signal(&'static str),
    Idle,
}

/// Runs the service until it is told to stop, then drains and returns.
/// `inherited` are the sockets from the service manager, taken before any
/// thread started.
pub fn run(opts: ServeOptions, inherited: Vec<Inherited>) -> Result<()> {
    let settled = opts.settle()?;
    // Before anything is loaded or bound: a file that cannot be opened is
    // a one-line error at once.
    if let Some(a) = &settled.access_log {
        access::install(access::open(a)?);
    }
    trace::install(
        trace::Tracer::start(settled.trace.clone()).context("cannot start the trace exporter")?,
    );
    if let Some(to) = trace::exporting() {
        tracing::info!("exporting traces to {to}");
    }
    if settled.exit_idle_after.is_some() && inherited.is_empty() {
        bail!(
            "--exit-idle-after needs socket activation (LISTEN_FDS): without a service manager holding the socket, connections after the exit would be refused"
        );
    }
    // The first load starts now, beside the set-up below: making the engine
    // is most of a cold start (wasmtime sets a guard page on each of its
    // fiber stacks, 2,000 at the defaults), and it needs neither the
    // runtime nor the shared counters.
    let staging = Staging::start(settled.knobs.clone(), settled.component.clone())?;
    raise_fd_limit(settled.knobs.max_concurrent_connections);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("wasmpool")
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(serve(opts, settled, inherited, staging))
}

/// A load running on a thread of its own (see [`Pool::stage`]); [`load`]
/// finishes it.
struct Staging(futures::channel::oneshot::Receiver<Result<Staged, LoadError>>);

impl Staging {
    fn start(knobs: Knobs, component: PathBuf) -> Result<Staging> {
        let (tx, rx) = futures::channel::oneshot::channel();
        std::thread::Builder::new()
            .name("wasmpool-load".into())
            .spawn(move || {
                // (A panic drops `tx`: the receiver learns of it.)
                let _ = tx.send(Pool::stage(knobs, &Source::File(component)));
            })
            .context("cannot start the loader thread")?;
        Ok(Staging(rx))
    }
}

/// Descriptors besides connections: listeners, the compile cache, the
/// runtime's own, a reload's files.
const SPARE_FDS: u64 = 64;

/// Raises the soft limit on open files to the hard limit (the soft one
/// is often 1024, fewer than `max-concurrent-connections` needs), and warns
/// when even the hard limit is too low for the connections allowed.
fn raise_fd_limit(connections: u32) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write one struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
        }
    }
    let need = connections as u64 + SPARE_FDS;
    if lim.rlim_cur < need {
        tracing::warn!(
            "open-file limit {} is below max-concurrent-connections + {SPARE_FDS} ({need}): \
             connections beyond it fail to be accepted (raise LimitNOFILE= or ulimit -n)",
            lim.rlim_cur
        );
    }
}

async fn serve(
    opts: ServeOptions,
    settled: Settled,
    inherited: Vec<Inherited>,
    staging: Staging,
) -> Result<()> {
    // Signal handlers first, so a SIGHUP or SIGTERM during start-up is
    // handled rather than killing the process.
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sighup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    let mut sigusr1 = signal(SignalKind::user_defined1()).context("cannot handle SIGUSR1")?;
    let notifier = Notifier;
    let shared = Shared::new(&settled.knobs)?;
    let stats = shared.stats.clone();

    let socket_activated = !inherited.is_empty();
    let shutdown_delay = settled.shutdown_delay(socket_activated);
    let pool = load(staging, shared.clone(), notifier).await?;
    shared.apply(pool.knobs())?;
    tracing::info!(component = pool.name(), world = %pool.world(), cache = ?pool.cache_outcome(), "component ready");

    let tls = match &settled.tls {
        Some(files) => Some(Arc::new(Tls::new(files.clone())?)),
        None => None,
    };
    let mut listeners = Vec::new();
    if inherited.is_empty() {
        for spec in &settled.listen {
            let l = Listener::bind(&spec.addr)
                .await
                .with_context(|| format!("cannot listen on {}", spec.addr))?
                .with_tls(settled.bound_tls(spec));
            let bound = l.describe();
            tracing::info!("serving on {bound}");
            eprintln!("Serving {} on {bound}/", protocol(&l));
            listeners.push(l);
        }
    } else {
        if !opts.listen.is_empty() {
            tracing::info!("sockets inherited from the service manager: --listen ignored");
        }
        for s in inherited {
            let name = s.name.clone();
            let l = s
                .into_listener()
                .with_context(|| format!("cannot use inherited socket {name}"))?;
            let l = {
                let tls = settled.inherited_tls(&name, &l);
                l.with_tls(tls)
            };
            let addr = l.describe();
            tracing::info!(name, "serving on inherited socket {addr}");
            eprintln!("Serving {} on {addr}/ (inherited: {name})", protocol(&l));
            listeners.push(l);
        }
    }
    if !socket_activated && settled.listen_defaulted && in_container() {
        tracing::warn!(
            "listening on the default {} inside a container: nothing outside it can connect; listen on 0.0.0.0:PORT (`listen` in the config file or --listen)",
            crate::config::defaults::LISTEN
        );
    }
    if tls.is_some() && !listeners.iter().any(Listener::is_tls) {
        tracing::warn!("tls-cert and tls-key are set but no listener serves TLS");
    }

    let ready = Arc::new(admin::Readiness::default());
    let metrics = Metrics::new(shared.clone(), ready.clone());
    let front = Front::with_metrics(Arc::new(pool), Some(metrics.clone()));
    if let Some(tls) = &tls {
        front.set_tls(tls.clone());
    }
    front.set_access_log(settled.access_log.is_some());
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    // The admin listener answers until the drain is over.
    let (admin_stop_tx, admin_stop_rx) = tokio::sync::watch::channel(false);
    let admin_task = match &settled.metrics_listen {
        Some(addr) => {
            let l = Listener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for metrics on {addr}"))?;
            let at = l.local_addr()?;
            tracing::info!("metrics and health on {at}");
            eprintln!("Metrics on {at}/metrics");
            Some(tokio::spawn(admin::serve(
                l,
                metrics,
                ready.clone(),
                admin_stop_rx,
            )))
        }
        None => None,
    };
    let mut server = tokio::spawn(front::serve(
        front.clone(),
        listeners,
        async move {
            let _ = stop_rx.changed().await;
        },
        settled.drain_timeout,
    ));

    let mut status = Status {
        front: front.clone(),
        last_reload: None,
        draining: None,
        sent: String::new(),
    };
    notifier.ready(&status.text());
    ready.set(true);
    tracing::info!("ready");

    let watchdog = sd_notify::watchdog_enabled();
    let mut watchdog_tick =
        tokio::time::interval(watchdog.map(|d| d / 2).unwrap_or(Duration::from_secs(3600)));
    let mut status_tick = tokio::time::interval(Duration::from_secs(2));
    let idle_check = settled
        .exit_idle_after
        .map(|d| (d / 4).clamp(Duration::from_millis(50), Duration::from_secs(1)));
    let mut idle_tick = tokio::time::interval(idle_check.unwrap_or(Duration::from_secs(3600)));
    let mut reload: Option<tokio::task::JoinHandle<Result<Reloaded>>> = None;
    let mut reload_again = false;
    // Set by the first SIGTERM when there is a shutdown delay: until then
    // everything goes on (requests, reloads, the watchdog), but /readyz
    // answers 503.
    let mut delay_ends: Option<tokio::time::Instant> = None;

    let stop = loop {
        tokio::select! {
            _ = sigterm.recv() => {
                if delay_ends.is_some() {
                    tracing::info!("SIGTERM again: ending the shutdown delay");
                    break Stop::Signal("SIGTERM");
                }
                if shutdown_delay.is_zero() {
                    break Stop::Signal("SIGTERM");
                }
                ready.set_draining();
                front.begin_shutdown();
                delay_ends = Some(tokio::time::Instant::now() + shutdown_delay);
                tracing::info!(
                    "SIGTERM: draining; still serving for the shutdown delay ({}) with /readyz at 503, then stopping accepting (SIGTERM again to stop now)",
                    humantime::format_duration(shutdown_delay)
                );
                status.draining = Some(shutdown_delay);
                status.send_if_changed(notifier);
            }
            _ = async { tokio::time::sleep_until(delay_ends.expect("guarded")).await }, if delay_ends.is_some() => {
                break Stop::Signal("SIGTERM");
            }
            _ = sigint.recv() => break Stop::Signal("SIGINT"),
            _ = sigusr1.recv() => match access::reopen() {
                Ok(()) => tracing::info!("SIGUSR1: access log reopened"),
                Err(e) => tracing::error!("SIGUSR1: {e}; still writing to the old file"),
            },
            _ = sighup.recv() => {
                if reload.is_some() {
                    reload_again = true;
                } else {
                    reload = Some(start_reload(&opts, &shared, tls.clone(), notifier));
                }
            }
            done = async { reload.as_mut().expect("guarded").await }, if reload.is_some() => {
                reload = None;
                status.last_reload = Some(finish_reload(done, &front, &stats));
                notifier.ready(&status.text());
                if std::mem::take(&mut reload_again) {
                    reload = Some(start_reload(&opts, &shared, tls.clone(), notifier));
                }
            }
            _ = watchdog_tick.tick(), if watchdog.is_some() => {
                if healthy(&server, watchdog.unwrap_or_default() / 4).await {
                    notifier.watchdog();
                } else {
                    tracing::error!("request path unhealthy: not pinging the watchdog");
                }
            }
            _ = status_tick.tick() => status.send_if_changed(notifier),
            _ = idle_tick.tick(), if settled.exit_idle_after.is_some() => {
                let limit = settled.exit_idle_after.unwrap_or_default();
                let a = front.activity();
                if a.connections() == 0 && stats.in_flight.load(Relaxed) == 0 && stats.queued.load(Relaxed) == 0 && a.idle_for() >= limit {
                    break Stop::Idle;
                }
            }
            r = &mut server => {
                // The accept loops only end when told to; this is a bug or a panic.
                bail!("the server stopped unexpectedly: {r:?}");
            }
        }
    };
    match stop {
        Stop::Signal(_) if delay_ends.is_some() => {
            tracing::info!("shutdown delay over: stopping accepting, draining")
        }
        Stop::Signal(sig) => tracing::info!("{sig}: draining"),
        Stop::Idle => tracing::info!(
            "idle for {:?}: exiting; the service manager keeps the socket",
            settled.exit_idle_after.unwrap_or_default()
        ),
    }
    let in_flight = stats.in_flight.load(Relaxed);
    ready.set_draining();
    front.begin_shutdown();
    notifier.stopping(&format!("Stopping: draining {in_flight} requests"));
    let _ = stop_tx.send(true);
    let _ = server.await;
    let _ = admin_stop_tx.send(true);
    if let Some(t) = admin_task {
        let _ = t.await;
    }
    access::flush();
    trace::flush(TRACE_FLUSH);
    tracing::info!("stopped");
    Ok(())
}

/// Loads and proves a component off the request path, asking the service
/// manager for more time while a slow compile runs.
async fn load(staging: Staging, shared: Shared, notifier: Notifier) -> Result<Pool> {
    let extender = notifier.enabled().then(|| {
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            loop {
                notifier.extend_timeout(Duration::from_secs(20));
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        })
    });
    let staged = staging.0.await;
    if let Some(e) = extender {
        e.abort();
    }
    let pool = staged
        .ok()
        .context("the loader panicked")??
        .into_pool(&shared);
    pool.probe().await?;
    Ok(pool)
}

/// Whether this process runs in a container (podman's, docker's, or a
/// Kubernetes pod's), where a loopback address is reachable from nowhere.
fn in_container() -> bool {
    std::path::Path::new("/run/.containerenv").exists()
        || std::path::Path::new("/.dockerenv").exists()
        || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
}

/// What `serve` says it serves on `l`.
fn protocol(l: &Listener) -> &'static str {
    if l.is_tls() { "HTTPS" } else { "HTTP" }
}

/// Re-reads the config, the component and the certificate off the request
/// path. The certificate goes live last, so a reload that fails anywhere
/// changes nothing.
fn start_reload(
    opts: &ServeOptions,
    shared: &Shared,
    tls: Option<Arc<Tls>>,
    notifier: Notifier,
) -> tokio::task::JoinHandle<Result<Reloaded>> {
    tracing::info!("SIGHUP: reloading");
    notifier.reloading();
    let opts = opts.clone();
    let shared = shared.clone();
    tokio::spawn(async move {
        let settled = opts.settle()?;
        let knobs = settled.knobs.clone();
        let files = settled.tls.clone();
        // Opened now, put in use by `finish_reload`: a file that cannot be
        // opened fails the reload before anything changed.
        let access_log = settled.access_log.as_ref().map(access::open).transpose()?;
        let tracer =
            trace::prepare(settled.trace.clone()).context("cannot start the trace exporter")?;
        let staging = Staging::start(settled.knobs, settled.component)?;
        let pool = load(staging, shared.clone(), notifier).await?;
        match (&tls, files) {
            (Some(tls), Some(files)) => {
                let same = *tls.files() == files;
                tokio::task::spawn_blocking({
                    let tls = tls.clone();
                    move || tls.reload(files)
                })
                .await
                .context("the certificate loader panicked")??;
                if !same {
                    tracing::info!("TLS certificate files changed");
                }
            }
            (None, Some(_)) => {
                tracing::warn!(
                    "tls-cert and tls-key take effect on a restart (no listener serves TLS now)"
                )
            }
            (Some(_), None) => tracing::warn!(
                "tls-cert and tls-key were removed: TLS listeners keep the last certificate until a restart"
            ),
            (None, None) => {}
        }
        shared.apply(&knobs)?;
        Ok(Reloaded {
            pool,
            access_log,
            tracer,
        })
    })
}

/// What a reload prepared, to be put in use at once.
struct Reloaded {
    pool: Pool,
    access_log: Option<access::Opened>,
    /// `None`: the trace settings did not change.
    tracer: Option<trace::Tracer>,
}

/// Swaps in a successfully reloaded pool. Listen addresses and the
/// connection limit belong to the sockets and stay until a restart.
fn finish_reload(
    done: Result<Result<Reloaded>, tokio::task::JoinError>,
    front: &Front,
    stats: &crate::engine::Stats,
) -> ReloadResult {
    match done.map_err(anyhow::Error::from).and_then(|r| r) {
        Ok(Reloaded {
            pool,
            access_log,
            tracer,
        }) => {
            front.set_access_log(access_log.is_some());
            if let Some(a) = access_log {
                access::install(a);
            }
            if let Some(t) = tracer {
                trace::install(t);
            }
            let (old, new) = (front.pool().knobs().clone(), pool.knobs().clone());
            if old.max_concurrent_connections != new.max_concurrent_connections {
                tracing::warn!("max-concurrent-connections changes take effect after a restart");
            }
            tracing::info!(component = pool.name(), world = %pool.world(), "reloaded; new requests go to the new component");
            front.swap(Arc::new(pool));
            stats.reloads.fetch_add(1, Relaxed);
            ReloadResult {
                at: Instant::now(),
                error: None,
            }
        }
        Err(e) => {
            let why = format!("{e:#}");
            tracing::error!("reload failed, still serving the previous component: {why}");
            stats.reload_failures.fetch_add(1, Relaxed);
            ReloadResult {
                at: Instant::now(),
                error: Some(why),
            }
        }
    }
}

struct ReloadResult {
    at: Instant,
    error: Option<String>,
}

/// The `STATUS=` line.
struct Status {
    front: Arc<Front>,
    last_reload: Option<ReloadResult>,
    /// The shutdown delay, once SIGTERM started it.
    draining: Option<Duration>,
    sent: String,
}

impl Status {
    fn text(&self) -> String {
        let pool = self.front.pool();
        let s = pool.stats();
        let reload = match &self.last_reload {
            None => "none".to_string(),
            Some(ReloadResult { at, error: None }) => format!("ok {}s ago", at.elapsed().as_secs()),
            Some(ReloadResult { at, error: Some(e) }) => {
                format!(
                    "FAILED {}s ago, serving the previous component: {e}",
                    at.elapsed().as_secs()
                )
            }
        };
        let reuse = if pool.reuse_disabled() {
            "; reuse off (the component fails on reused instances)"
        } else {
            ""
        };
        let budget = pool.budget();
        let state = match self.draining {
            Some(d) => format!(
                "Draining (shutdown delay {}, /readyz 503, still serving)",
                humantime::format_duration(d)
            ),
            None => "Serving".to_string(),
        };
        format!(
            "{state} {} ({}): {} requests served, {} live instances, {} queued, memory {} of {}; last reload: {reload}{reuse}",
            pool.name(),
            pool.world(),
            s.responses,
            s.instances_live,
            s.queued,
            crate::units::format_size(budget.used()),
            crate::units::format_size(budget.limit()),
        )
    }

    fn send_if_changed(&mut self, notifier: Notifier) {
        let text = self.text();
        if text != self.sent {
            notifier.status(&text);
            self.sent = text;
        }
    }
}

/// The request path is healthy when the accept loops still run and the
/// runtime schedules a new task promptly (a wedged engine does neither).
async fn healthy(server: &tokio::task::JoinHandle<()>, within: Duration) -> bool {
    !server.is_finished()
        && tokio::time::timeout(within, tokio::spawn(async {}))
            .await
            .is_ok_and(|r| r.is_ok())
}
