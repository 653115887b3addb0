//! Command-line interface: `serve`, `compile` and `check`. Errors leave as
//! one line on stderr and a non-zero exit code.

use crate::component::Source;
use crate::config::{FileConfig, KnobArgs, Knobs, defaults};
use crate::pool::Pool;
use crate::server::{self, Front, ListenAddr, Listener};
use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
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

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a component over HTTP.
    Serve(ServeArgs),
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
    /// [default: 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR")]
    pub listen: Vec<ListenAddr>,
    /// TOML config file; its keys are the flags' names, and flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// On SIGTERM/SIGINT, how long running requests may take to finish.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = crate::units::parse_duration)]
    pub drain_timeout: Duration,
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

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("WASMPOOL_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Human => b.try_init(),
        LogFormat::Json => b.json().try_init(),
    };
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(a) => serve(a),
        Command::Compile(a) => compile(a),
        Command::Check(a) => check(a),
    }
}

/// Merges the config file (if any) with the flags.
fn settle(
    config: Option<&PathBuf>,
    component: Option<PathBuf>,
    knobs: KnobArgs,
) -> Result<(PathBuf, Knobs, FileConfig)> {
    let file = match config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let knobs = file.knobs.clone().overlay(knobs).resolve()?;
    let Some(component) = component.or_else(|| file.component.clone()) else {
        bail!("no component given: pass COMPONENT or set `component` in the config file");
    };
    Ok((component, knobs, file))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("wasmpool")
        .build()
        .context("cannot start the async runtime")
}

fn compile(a: ComponentArgs) -> Result<()> {
    let (component, mut knobs, _) = settle(a.config.as_ref(), a.component, a.knobs)?;
    if knobs.no_cache {
        bail!("`compile` fills the compile cache; it cannot run with no-cache");
    }
    let dir = knobs
        .cache_dir
        .clone()
        .or_else(crate::cache::default_dir)
        .context("no cache directory: set --cache-dir, $XDG_CACHE_HOME or $HOME")?;
    knobs.cache_dir = Some(dir.clone());
    let pool = Pool::load(knobs, &Source::File(component.clone()))?;
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
    let (component, knobs, _) = settle(a.config.as_ref(), a.component, a.knobs)?;
    let pool = Pool::load(knobs, &Source::File(component.clone()))?;
    runtime()?.block_on(pool.probe())?;
    let (reuse, concurrent) = pool.reuse_limits();
    println!(
        "{}: {}; links and instantiates: ok; reuse: up to {reuse} requests per instance, {concurrent} at a time",
        component.display(),
        pool.world()
    );
    Ok(())
}

fn serve(a: ServeArgs) -> Result<()> {
    let (component, knobs, file) = settle(a.config.as_ref(), a.component, a.knobs)?;
    let listen: Vec<ListenAddr> = if !a.listen.is_empty() {
        a.listen
    } else if !file.listen.is_empty() {
        file.listen
            .iter()
            .map(|s| s.parse().map_err(anyhow::Error::msg))
            .collect::<Result<_>>()?
    } else {
        vec![defaults::LISTEN.parse().expect("default address parses")]
    };
    let rt = runtime()?;
    rt.block_on(async move {
        let source = Source::File(component);
        let pool = tokio::task::spawn_blocking(move || Pool::load(knobs, &source)).await??;
        pool.probe().await?;
        tracing::info!(
            component = pool.name(),
            world = %pool.world(),
            cache = ?pool.cache_outcome(),
            "component ready"
        );
        let mut listeners = Vec::new();
        for addr in &listen {
            let l = Listener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            let bound = l.local_addr()?;
            tracing::info!("serving on {bound}");
            eprintln!("Serving HTTP on {bound}/");
            listeners.push(l);
        }
        let front = Front::new(Arc::new(pool));
        server::serve(front, listeners, shutdown_signal(), a.drain_timeout).await;
        Ok(())
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = i.recv() => tracing::info!("SIGINT: shutting down"),
            }
        }
        _ => std::future::pending::<()>().await,
    }
}
