//! `wasmpool serve` as a managed service: inherited sockets, sd_notify
//! (ready, status, watchdog, reload, stopping), drain on SIGTERM/SIGINT,
//! reload on SIGHUP, exit when idle, and the metrics endpoint.

pub mod notify;
pub mod sockets;

use crate::config::{FileConfig, KnobArgs, Knobs, defaults};
use crate::engine::component::Source;
use crate::engine::pool::Pool;
use crate::engine::stats::Shared;
use crate::http::{self as front, Front, ListenAddr, Listener};
use crate::metrics::Metrics;
use anyhow::{Context as _, Result, bail};
use notify::Notifier;
use sockets::Inherited;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use tokio::signal::unix::{SignalKind, signal};

/// What `serve` was asked to do (flags; the config file is re-read on reload).
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    pub component: Option<PathBuf>,
    pub config: Option<PathBuf>,
    pub listen: Vec<ListenAddr>,
    pub knobs: KnobArgs,
    pub drain_timeout: Option<Duration>,
    pub exit_idle_after: Option<Duration>,
    pub metrics_listen: Option<ListenAddr>,
}

/// The flags and the config file, merged.
pub(crate) struct Settled {
    pub(crate) component: PathBuf,
    pub(crate) knobs: Knobs,
    listen: Vec<ListenAddr>,
    drain_timeout: Duration,
    exit_idle_after: Option<Duration>,
    metrics_listen: Option<ListenAddr>,
}

impl ServeOptions {
    pub(crate) fn settle(&self) -> Result<Settled> {
        let file = match &self.config {
            Some(p) => FileConfig::load(p)?,
            None => FileConfig::default(),
        };
        let knobs = file.knobs.clone().overlay(self.knobs.clone()).resolve()?;
        let Some(component) = self.component.clone().or(file.component.clone()) else {
            bail!("no component given: pass COMPONENT or set `component` in the config file");
        };
        let parse = |s: &String| s.parse::<ListenAddr>().map_err(anyhow::Error::msg);
        let listen = if !self.listen.is_empty() {
            self.listen.clone()
        } else if !file.listen.is_empty() {
            file.listen.iter().map(parse).collect::<Result<_>>()?
        } else {
            vec![defaults::LISTEN.parse().expect("default address parses")]
        };
        let metrics_listen = match (&self.metrics_listen, &file.metrics_listen) {
            (Some(a), _) => Some(a.clone()),
            (None, Some(s)) => Some(parse(s)?),
            (None, None) => None,
        };
        Ok(Settled {
            component,
            knobs,
            listen,
            drain_timeout: self
                .drain_timeout
                .or(file.drain_timeout)
                .unwrap_or(Duration::from_secs(30)),
            exit_idle_after: self.exit_idle_after.or(file.exit_idle_after),
            metrics_listen,
        })
    }
}

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
    if settled.exit_idle_after.is_some() && inherited.is_empty() {
        bail!(
            "--exit-idle-after needs socket activation (LISTEN_FDS): without a service manager holding the socket, connections after the exit would be refused"
        );
    }
    raise_fd_limit(settled.knobs.max_concurrent_connections);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("wasmpool")
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(serve(opts, settled, inherited))
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

async fn serve(opts: ServeOptions, settled: Settled, inherited: Vec<Inherited>) -> Result<()> {
    // Signal handlers first, so a SIGHUP or SIGTERM during start-up is
    // handled rather than killing the process.
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sighup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    let notifier = Notifier;
    let shared = Shared::new(&settled.knobs)?;
    let stats = shared.stats.clone();

    let pool = load(
        settled.knobs.clone(),
        settled.component.clone(),
        shared.clone(),
        notifier,
    )
    .await?;
    shared.apply(pool.knobs())?;
    tracing::info!(component = pool.name(), world = %pool.world(), cache = ?pool.cache_outcome(), "component ready");

    let mut listeners = Vec::new();
    if inherited.is_empty() {
        for addr in &settled.listen {
            let l = Listener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            let bound = l.local_addr()?;
            tracing::info!("serving on {bound}");
            eprintln!("Serving HTTP on {bound}/");
            listeners.push(l);
        }
    } else {
        if !opts.listen.is_empty() {
            tracing::info!("sockets inherited from the service manager: --listen ignored");
        }
        for s in inherited {
            let (name, addr) = (s.name.clone(), s.describe());
            listeners.push(
                s.into_listener()
                    .with_context(|| format!("cannot use inherited socket {name}"))?,
            );
            tracing::info!(name, "serving on inherited socket {addr}");
            eprintln!("Serving HTTP on {addr}/ (inherited: {name})");
        }
    }

    let metrics = Metrics::new(shared.clone());
    let front = Front::with_metrics(Arc::new(pool), Some(metrics.clone()));
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let metrics_task = match &settled.metrics_listen {
        Some(addr) => {
            let l = Listener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for metrics on {addr}"))?;
            tracing::info!("metrics on {}", l.local_addr()?);
            eprintln!("Metrics on {}/metrics", l.local_addr()?);
            Some(tokio::spawn(serve_metrics(l, metrics, stop_rx.clone())))
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
        sent: String::new(),
    };
    notifier.ready(&status.text());
    tracing::info!("ready");

    let watchdog = sd_notify::watchdog_enabled();
    let mut watchdog_tick =
        tokio::time::interval(watchdog.map(|d| d / 2).unwrap_or(Duration::from_secs(3600)));
    let mut status_tick = tokio::time::interval(Duration::from_secs(2));
    let idle_check = settled
        .exit_idle_after
        .map(|d| (d / 4).clamp(Duration::from_millis(50), Duration::from_secs(1)));
    let mut idle_tick = tokio::time::interval(idle_check.unwrap_or(Duration::from_secs(3600)));
    let mut reload: Option<tokio::task::JoinHandle<Result<Pool>>> = None;
    let mut reload_again = false;

    let stop = loop {
        tokio::select! {
            _ = sigterm.recv() => break Stop::Signal("SIGTERM"),
            _ = sigint.recv() => break Stop::Signal("SIGINT"),
            _ = sighup.recv() => {
                if reload.is_some() {
                    reload_again = true;
                } else {
                    reload = Some(start_reload(&opts, &shared, notifier));
                }
            }
            done = async { reload.as_mut().expect("guarded").await }, if reload.is_some() => {
                reload = None;
                status.last_reload = Some(finish_reload(done, &front, &stats));
                notifier.ready(&status.text());
                if std::mem::take(&mut reload_again) {
                    reload = Some(start_reload(&opts, &shared, notifier));
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
        Stop::Signal(sig) => tracing::info!("{sig}: draining"),
        Stop::Idle => tracing::info!(
            "idle for {:?}: exiting; the service manager keeps the socket",
            settled.exit_idle_after.unwrap_or_default()
        ),
    }
    let in_flight = stats.in_flight.load(Relaxed);
    notifier.stopping(&format!("Stopping: draining {in_flight} requests"));
    let _ = stop_tx.send(true);
    let _ = server.await;
    if let Some(t) = metrics_task {
        let _ = t.await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Loads and proves a component off the request path, asking the service
/// manager for more time while a slow compile runs.
async fn load(
    knobs: Knobs,
    component: PathBuf,
    shared: Shared,
    notifier: Notifier,
) -> Result<Pool> {
    let extender = notifier.enabled().then(|| {
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            loop {
                notifier.extend_timeout(Duration::from_secs(20));
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        })
    });
    let source = Source::File(component);
    let result =
        tokio::task::spawn_blocking(move || Pool::load_shared(knobs, &source, &shared)).await;
    if let Some(e) = extender {
        e.abort();
    }
    let pool = result.context("the loader panicked")??;
    pool.probe().await?;
    Ok(pool)
}

fn start_reload(
    opts: &ServeOptions,
    shared: &Shared,
    notifier: Notifier,
) -> tokio::task::JoinHandle<Result<Pool>> {
    tracing::info!("SIGHUP: reloading");
    notifier.reloading();
    let opts = opts.clone();
    let shared = shared.clone();
    tokio::spawn(async move {
        let settled = opts.settle()?;
        let knobs = settled.knobs.clone();
        let pool = load(settled.knobs, settled.component, shared.clone(), notifier).await?;
        shared.apply(&knobs)?;
        Ok(pool)
    })
}

/// Swaps in a successfully reloaded pool. Listen addresses and the
/// connection limit belong to the sockets and stay until a restart.
fn finish_reload(
    done: Result<Result<Pool>, tokio::task::JoinError>,
    front: &Front,
    stats: &crate::engine::Stats,
) -> ReloadResult {
    match done.map_err(anyhow::Error::from).and_then(|r| r) {
        Ok(pool) => {
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
        format!(
            "Serving {} ({}): {} requests served, {} live instances, {} queued, memory {} of {}; last reload: {reload}{reuse}",
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

async fn serve_metrics(
    listener: Listener,
    metrics: Arc<Metrics>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use http_body_util::Full;
    let front_metrics = metrics;
    loop {
        let io: Box<dyn front::Io> = tokio::select! {
            _ = stop.changed() => break,
            a = listener.accept() => match a { Ok(a) => a.io, Err(_) => { tokio::time::sleep(Duration::from_millis(50)).await; continue } },
        };
        let m = front_metrics.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let m = m.clone();
                    async move {
                        let r = if req.uri().path() == "/metrics" {
                            http::Response::builder()
                                .header(
                                    http::header::CONTENT_TYPE,
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                )
                                .body(Full::new(bytes::Bytes::from(m.render())))
                        } else {
                            http::Response::builder().status(404).body(Full::new(
                                bytes::Bytes::from_static(b"metrics are at /metrics\n"),
                            ))
                        };
                        Ok::<_, std::convert::Infallible>(r.expect("valid response"))
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
                .await;
        });
    }
}
