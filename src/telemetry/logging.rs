//! Log output on stderr: human-readable on a terminal or pipe, plain
//! `<N>`-prefixed lines when stderr is the journal (`JOURNAL_STREAM`), or
//! JSON lines for log shippers.

use std::fmt;
use std::io::IsTerminal;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable (journal-style when stderr is the journal).
    Human,
    /// One JSON object per line.
    Json,
}

/// Whether stderr is the stream systemd connected to the journal: the
/// `JOURNAL_STREAM` variable names its device and inode.
pub fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    match std::fs::File::from(fd).metadata() {
        Ok(m) => m.dev() == dev && m.ino() == ino,
        Err(_) => false,
    }
}

/// Installs the global subscriber. `WASMPOOL_LOG` sets the filter
/// (default `info`).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_env("WASMPOOL_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    use crate::telemetry::access::Shape;
    let (installed, shape) = match format {
        LogFormat::Json => (b.json().try_init(), Some(Shape::Json)),
        LogFormat::Human if stderr_is_journal() => (
            b.with_ansi(false).event_format(Journal).try_init(),
            Some(Shape::Journal),
        ),
        LogFormat::Human => {
            let ansi = std::io::stderr().is_terminal();
            // Coloured lines (a terminal) stay with tracing-subscriber.
            (
                b.with_ansi(ansi).try_init(),
                (!ansi).then_some(Shape::Human),
            )
        }
    };
    // Access lines are formatted by the access log itself in the same shape
    // (see `telemetry::access`), only once this subscriber is the one in place.
    if let (Ok(()), Some(shape)) = (installed, shape) {
        crate::telemetry::access::install_shape(shape);
    }
}

/// `<PRIORITY>target: message fields`, no timestamp, no colour: journald
/// adds its own timestamp and reads the syslog priority prefix.
struct Journal;

impl<S, N> FormatEvent<S, N> for Journal
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let priority = match *event.metadata().level() {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            Level::DEBUG | Level::TRACE => 7,
        };
        write!(w, "<{priority}>")?;
        match event.metadata().target() {
            "guest" => write!(w, "guest: ")?,
            "access" => write!(w, "access: ")?,
            _ => {}
        }
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}
