//! Command-line interface: `serve`, `compile` and `check`. Errors leave as
//! one line on stderr and a non-zero exit code.

use crate::config::{KnobArgs, Knobs, ReuseMode};
use crate::engine::cache::CacheOutcome;
use crate::engine::component::{self, Source};
use crate::engine::pool::{Pool, ReuseProbe};
use crate::http::ListenAddr;
use crate::http::listener::ListenSpec;
use crate::service::ServeOptions;
use crate::telemetry::logging::LogFormat;
use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "wasmpool",
    version,
    about = "Serve wasi:http WebAssembly components from a pool of reused instances"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    pub log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a component over HTTP.
    Serve(Box<ServeArgs>),
    /// Compile a component into the compile cache.
    Compile(ComponentArgs),
    /// Say which wasi:http world a component implements and whether it links.
    Check(ComponentArgs),
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The component (.wasm); may instead be named by `component` in the config file.
    #[arg(value_name = "COMPONENT")]
    pub component: Option<PathBuf>,
    /// Address to listen on: HOST:PORT, [V6]:PORT or unix:/path (repeatable)
    /// [default: 127.0.0.1:8080]. TCP addresses serve TLS when --tls-cert is
    /// set; https://HOST:PORT or http://HOST:PORT says so for one address.
    /// Ignored when the service manager passes sockets (LISTEN_FDS).
    #[arg(long, value_name = "ADDR")]
    pub listen: Vec<ListenSpec>,
    /// TOML config file; its keys are the flags' names, and flags override
    /// it. Re-read on SIGHUP.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// On SIGTERM/SIGINT, how long running requests may take to finish [default: 30s].
    #[arg(long, value_name = "DURATION", value_parser = crate::units::parse_duration)]
    pub drain_timeout: Option<Duration>,
    /// On SIGTERM, how long to keep accepting and serving with /readyz
    /// already answering 503, so load balancers stop sending before the
    /// listeners close; a second SIGTERM (or SIGINT) ends it early
    /// [default: 0 with socket activation, else 5s].
    #[arg(long, value_name = "DURATION", env = "WASMPOOL_SHUTDOWN_DELAY", value_parser = crate::units::parse_duration)]
    pub shutdown_delay: Option<Duration>,
    /// With socket activation: exit (status 0) after this long with no open
    /// connection and no request; the service manager starts wasmpool again
    /// on the next connection.
    #[arg(long, value_name = "DURATION", value_parser = crate::units::parse_positive_duration)]
    pub exit_idle_after: Option<Duration>,
    /// Serve Prometheus metrics at http://ADDR/metrics, and health for load
    /// balancers at /healthz and /readyz (HOST:PORT or unix:/path).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<ListenAddr>,
    /// PEM certificate chain: TCP listeners serve TLS 1.2/1.3 (ALPN h2,
    /// http/1.1). Re-read on SIGHUP.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// With socket activation: serve TLS only on the inherited sockets of
    /// this name (FileDescriptorName=; repeatable) [default: every TCP socket].
    #[arg(long = "tls-socket", value_name = "NAME")]
    pub tls_sockets: Vec<String>,
    /// With socket activation: serve plain HTTP on the inherited socket of
    /// this name although TLS is configured (repeatable).
    #[arg(long = "plain-socket", value_name = "NAME")]
    pub plain_sockets: Vec<String>,
    /// One log line per request (client, method, target, status, bytes,
    /// duration, instance): on, off, stderr, or a file (reopened on
    /// SIGUSR1) [default: on: $LOGS_DIRECTORY/access.log under systemd's
    /// LogsDirectory=, else stderr].
    #[arg(long, value_name = "on|off|stderr|FILE", value_parser = crate::config::AccessLogArg::parse)]
    pub access_log: Option<crate::config::AccessLogArg>,
    /// Bytes of access lines each thread gathers before writing them in
    /// one write; 0 writes every line at once [default: 64KiB].
    #[arg(long, value_name = "SIZE", value_parser = crate::units::parse_size)]
    pub access_log_buffer: Option<u64>,
    /// The longest an access line waits in a buffer [default: 1s].
    #[arg(long, value_name = "DURATION", value_parser = crate::units::parse_positive_duration)]
    pub access_log_flush: Option<Duration>,
    #[command(flatten)]
    pub knobs: KnobArgs,
}

#[derive(Debug, clap::Args)]
pub struct ComponentArgs {
    /// The component (.wasm); may instead be named by `component` in the config file.
    #[arg(value_name = "COMPONENT")]
    pub component: Option<PathBuf>,
    /// TOML config file (the knobs that shape compilation, such as
    /// max-memory-size, must match the ones `serve` uses to hit the cache).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub knobs: KnobArgs,
}

impl ComponentArgs {
    /// The component and knobs from the flags and the config file.
    fn settle(self) -> Result<(PathBuf, Knobs)> {
        let s = ServeOptions {
            component: self.component,
            config: self.config,
            knobs: self.knobs,
            ..Default::default()
        }
        .settle()?;
        Ok((s.component, s.knobs))
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    library_backtraces_off();
    let cli = Cli::parse();
    crate::telemetry::logging::init(cli.log_format);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Turns off the backtraces libraries capture in their error values, unless
/// `RUST_LIB_BACKTRACE` asks for them. `RUST_BACKTRACE=1` (set to debug a
/// panic, whose backtrace it still gives) would otherwise turn them on too,
/// and wasmtime builds an error value whenever it drops a store: one
/// backtrace per fresh instance, a third of the requests/s of p2 hello with
/// a fresh instance per request (43,000 against 64,000 on the benchmark
/// machine).
fn library_backtraces_off() {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // SAFETY: called first thing in `main`, before any thread exists.
        unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    }
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(a) => {
            let a = *a;
            // SAFETY: no thread has been started yet (logging set-up starts none).
            let inherited = unsafe { crate::service::sockets::take() }?;
            crate::service::run(
                ServeOptions {
                    component: a.component,
                    config: a.config,
                    listen: a.listen,
                    knobs: a.knobs,
                    drain_timeout: a.drain_timeout,
                    shutdown_delay: a.shutdown_delay,
                    exit_idle_after: a.exit_idle_after,
                    metrics_listen: a.metrics_listen,
                    tls_cert: a.tls_cert,
                    tls_key: a.tls_key,
                    tls_sockets: a.tls_sockets,
                    plain_sockets: a.plain_sockets,
                    access_log: a.access_log,
                    access_log_buffer: a.access_log_buffer,
                    access_log_flush: a.access_log_flush,
                },
                inherited,
            )
        }
        Command::Compile(a) => compile(a),
        Command::Check(a) => check(a),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("wasmpool")
        .build()
        .context("cannot start the async runtime")
}

fn compile(a: ComponentArgs) -> Result<()> {
    let (component, mut knobs) = a.settle()?;
    if knobs.no_cache {
        bail!("`compile` fills the compile cache; it cannot run with no-cache");
    }
    let dir = knobs
        .cache_dir
        .clone()
        .or_else(crate::engine::cache::default_dir)
        .context("no cache directory: set --cache-dir, $XDG_CACHE_HOME or $HOME")?;
    knobs.cache_dir = Some(dir.clone());
    let pool = Pool::load(knobs, &Source::File(component.clone()))?;
    if pool.cache_outcome() == CacheOutcome::Compiled {
        bail!(
            "could not write the compile cache in {}: make it writable for this user",
            dir.display()
        );
    }
    println!(
        "{}: {} ({:?}, cache {})",
        component.display(),
        pool.world(),
        pool.cache_outcome(),
        dir.display()
    );
    Ok(())
}

fn check(a: ComponentArgs) -> Result<()> {
    let (component, knobs) = a.settle()?;
    let pool = Pool::load(knobs.clone(), &Source::File(component.clone()))?;
    let rt = runtime()?;
    rt.block_on(pool.probe())?;
    let (reuse, concurrent) = pool.reuse_limits();
    let requests = if reuse == 1 { "request" } else { "requests" };
    println!(
        "{}: {}; links and instantiates: ok; reuse: up to {reuse} {requests} per instance, {concurrent} at a time",
        component.display(),
        pool.world()
    );
    if pool.wide_memories() {
        println!(
            "memories: 4 GiB of address space reserved each: compiled code needs no bounds checks"
        );
    } else {
        println!(
            "memories: only max-memory-size reserved each (not enough address space for 4 GiB): compiled code checks bounds"
        );
    }
    let (warm, written_only) = pool.warm_slots();
    let initial = pool
        .largest_initial_memory()
        .map_or("unknown".to_string(), crate::units::format_size);
    let keep = crate::units::format_size(warm.keep);
    println!(
        "warm slots: {} kept, each keeping {}; largest initial memory {initial}",
        warm.count,
        match (knobs.memory_keep_resident.is_some(), written_only) {
            (true, _) => format!("{keep} of each memory (memory-keep-resident), reset by copying"),
            (false, true) => format!("the pages its instances wrote, up to {keep} of each memory"),
            (false, false) => format!(
                "up to {keep} of each memory whole, reset by copying (an initial memory of {} or more is an interpreter's heap)",
                crate::units::format_size(component::COPY_FROM)
            ),
        }
    );
    // Whether instances survive reuse: GET / twice on one instance.
    let mode = knobs.reuse;
    let probe_knobs = crate::Knobs {
        max_instance_reuse_count: Some(2),
        max_instance_concurrent_reuse_count: Some(1),
        reuse: ReuseMode::Always,
        ..knobs
    };
    let probe = Pool::load(probe_knobs, &Source::File(component.clone()))?;
    let found = rt.block_on(probe.probe_reuse());
    match found {
        ReuseProbe::Reusable => println!("reuse probe (GET / twice on one instance): ok"),
        ReuseProbe::NotReusable(why) => println!(
            "reuse probe (GET / twice on one instance): FAILS on a reused instance ({why}); {}",
            match mode {
                ReuseMode::Auto =>
                    "with reuse = auto (the default) wasmpool uses each instance once after the first such failure",
                ReuseMode::Always => "reuse = always will serve errors: use auto or never",
                ReuseMode::Never => "reuse = never uses each instance once",
            }
        ),
        ReuseProbe::Inconclusive(why) => {
            println!("reuse probe (GET / twice on one instance): inconclusive ({why})")
        }
    }
    Ok(())
}
