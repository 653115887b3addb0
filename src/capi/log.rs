//! `wasmpool_set_logger`: what libwasmpool logs (guest stdout and stderr
//! lines, and its own warnings, such as a compile cache it cannot write)
//! handed to the host, which has a log of its own. Without a logger the
//! library logs nothing.

use super::wasmpool_result;
use super::{Failure, boundary};
use arc_swap::ArcSwapOption;
use std::ffi::c_void;
use std::fmt::Write as _;
use std::sync::Arc;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// How severe a log record is.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum wasmpool_log_level {
    WASMPOOL_LOG_ERROR = 1,
    WASMPOOL_LOG_WARN = 2,
    WASMPOOL_LOG_INFO = 3,
    WASMPOOL_LOG_DEBUG = 4,
}

use wasmpool_log_level::*;

/// Receives one log record: its level, whether it is a line the guest
/// wrote (to stdout: INFO, to stderr: WARN), and the text (`len` bytes,
/// UTF-8, no newline, not NUL-terminated, valid during the call only).
pub type wasmpool_log_callback = Option<
    unsafe extern "C" fn(
        userdata: *mut c_void,
        level: wasmpool_log_level,
        guest: bool,
        message: *const u8,
        len: usize,
    ),
>;

struct Logger {
    cb: unsafe extern "C" fn(*mut c_void, wasmpool_log_level, bool, *const u8, usize),
    userdata: usize,
    max: wasmpool_log_level,
}

static LOGGER: ArcSwapOption<Logger> = ArcSwapOption::const_empty();

/// The logger's level (0: no logger), for callsites to skip cheaply.
static MAX: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn filter() -> tracing_subscriber::filter::LevelFilter {
    use tracing_subscriber::filter::LevelFilter;
    match MAX.load(std::sync::atomic::Ordering::Relaxed) {
        0 => LevelFilter::OFF,
        1 => LevelFilter::ERROR,
        2 => LevelFilter::WARN,
        3 => LevelFilter::INFO,
        _ => LevelFilter::DEBUG,
    }
}

fn level_of(l: &Level) -> wasmpool_log_level {
    match *l {
        Level::ERROR => WASMPOOL_LOG_ERROR,
        Level::WARN => WASMPOOL_LOG_WARN,
        Level::INFO => WASMPOOL_LOG_INFO,
        _ => WASMPOOL_LOG_DEBUG,
    }
}

/// The event's message, then its other fields as ` key=value`.
#[derive(Default)]
struct Text {
    message: String,
    fields: String,
}

impl Visit for Text {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={value}", field.name());
        }
    }
}

/// The global subscriber's one layer: every event at or above the
/// logger's level goes to the logger.
struct HostLayer;

impl<S: Subscriber> Layer<S> for HostLayer {
    fn max_level_hint(&self) -> Option<tracing_subscriber::filter::LevelFilter> {
        Some(filter())
    }

    fn enabled(&self, meta: &tracing::Metadata<'_>, _ctx: Context<'_, S>) -> bool {
        filter() >= *meta.level()
    }

    fn register_callsite(
        &self,
        meta: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        if filter() >= *meta.level() {
            tracing::subscriber::Interest::always()
        } else {
            tracing::subscriber::Interest::never()
        }
    }

    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let Some(logger) = LOGGER.load_full() else {
            return;
        };
        let meta = event.metadata();
        let level = level_of(meta.level());
        if level > logger.max {
            return;
        }
        let mut text = Text::default();
        event.record(&mut text);
        let guest = meta.target() == "guest";
        let line = if guest {
            // "instance=3 stream=stdout" first: what the guest wrote last.
            format!("guest{}: {}", text.fields, text.message)
        } else {
            text.message + &text.fields
        };
        // SAFETY: the host's callback, as it asked (documented: any thread).
        unsafe {
            (logger.cb)(
                logger.userdata as *mut c_void,
                level,
                guest,
                line.as_ptr(),
                line.len(),
            )
        };
    }
}

/// Hands what libwasmpool logs to `cb`, at `max_level` and more severe
/// (`WASMPOOL_LOG_INFO` includes the guests' stdout lines, `..._WARN` their
/// stderr lines). `cb` runs on whatever thread logs, often an engine
/// thread, several at once: it must be thread-safe, quick, and must not
/// call back into wasmpool. NULL `cb` stops logging (a call running on
/// another thread may still finish). Process-wide: the last call wins. The
/// library installs a global `tracing` subscriber the first time; if the
/// process already has one (a Rust host's), the result is
/// `WASMPOOL_MISUSE`. Errors: `WASMPOOL_INVALID_ARGUMENT` for an unknown
/// level.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_set_logger(
    cb: wasmpool_log_callback,
    userdata: *mut c_void,
    max_level: u32,
) -> wasmpool_result {
    static INSTALLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    boundary(|| {
        let max = match max_level {
            1 => WASMPOOL_LOG_ERROR,
            2 => WASMPOOL_LOG_WARN,
            3 => WASMPOOL_LOG_INFO,
            4 => WASMPOOL_LOG_DEBUG,
            other => return Err(Failure::invalid(format!("unknown log level {other}"))),
        };
        let Some(cb) = cb else {
            LOGGER.store(None);
            MAX.store(0, std::sync::atomic::Ordering::Relaxed);
            tracing::callsite::rebuild_interest_cache();
            return Ok(());
        };
        let installed = *INSTALLED.get_or_init(|| {
            use tracing_subscriber::layer::SubscriberExt;
            tracing::subscriber::set_global_default(tracing_subscriber::registry().with(HostLayer))
                .is_ok()
        });
        if !installed {
            return Err(Failure::new(
                wasmpool_result::WASMPOOL_MISUSE,
                "the process already has a global tracing subscriber",
            ));
        }
        LOGGER.store(Some(Arc::new(Logger {
            cb,
            userdata: userdata as usize,
            max,
        })));
        MAX.store(max as u32, std::sync::atomic::Ordering::Relaxed);
        tracing::callsite::rebuild_interest_cache();
        Ok(())
    })
}
