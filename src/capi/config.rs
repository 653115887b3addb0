//! `wasmpool_config`: the knobs for a handler. Owned by the caller; a
//! handler copies what it needs, so a config can be reused and freed at
//! any time after `wasmpool_handler_new`.

use super::wasmpool_result;
use super::{Failure, boundary, boundary_ptr, boundary_void, handle_mut, str_arg};
use crate::config::KnobArgs;
use crate::config::{Knobs, OutboundRule};
use crate::telemetry::trace::{self, OtelFile};
use std::ffi::c_char;
use std::time::Duration;

/// How completion callbacks are delivered.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum wasmpool_completion_mode {
    /// Callbacks run on an engine thread as soon as a response is ready
    /// (the default).
    WASMPOOL_COMPLETION_ENGINE = 0,
    /// Callbacks are queued; the host runs them on its own thread with
    /// `wasmpool_handler_poll`, when `wasmpool_handler_completion_fd` is
    /// readable.
    WASMPOOL_COMPLETION_POLL = 1,
}

/// Whether instances are reused (the `reuse` knob).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum wasmpool_reuse_mode {
    /// Reuse as the reuse counts say; when a reused instance fails a
    /// request that a fresh instance then answers, retry it there and stop
    /// reusing instances of the component (the default).
    WASMPOOL_REUSE_AUTO = 0,
    /// Reuse as the reuse counts say, whatever happens.
    WASMPOOL_REUSE_ALWAYS = 1,
    /// One request per instance.
    WASMPOOL_REUSE_NEVER = 2,
}

/// Configuration for `wasmpool_handler_new`. Create with
/// `wasmpool_config_new`, free with `wasmpool_config_free`. Not thread-safe:
/// do not use one config from two threads at once.
pub struct wasmpool_config {
    pub(crate) knobs: Knobs,
    pub(crate) completion: wasmpool_completion_mode,
    /// Pushes start their request on the pushing thread
    /// (`wasmpool_config_set_inline`).
    pub(crate) inline: bool,
    pub(crate) engine_threads: usize,
    /// Largest body `wasmpool_handler_push` / `_call` collect.
    pub(crate) max_response_size: u64,
    /// Trace export (`wasmpool_config_set_otel`); off without an endpoint.
    pub(crate) otel: OtelFile,
    /// W3C trace context propagation (default on).
    pub(crate) trace_context: bool,
    /// The component named by the last file loaded
    /// (`wasmpool_config_load_file`), for `wasmpool_config_component`.
    pub(crate) component: Option<std::ffi::CString>,
    /// The handler takes this share (1/n) of the memory budget
    /// (`wasmpool_config_set_memory_budget_share`).
    pub(crate) budget_share: u32,
}

impl wasmpool_config {
    /// The trace settings: the config's keys only (a library does not
    /// read the process's `OTEL_*` variables behind its host's back).
    pub(crate) fn trace_settings(&self) -> Result<trace::Settings, Failure> {
        trace::Settings::from_sources(self.trace_context, &self.otel, &|_| None)
            .map_err(|e| Failure::invalid(e.to_string()))
    }
}

/// Default of `wasmpool_config_set_max_response_size`.
pub const DEFAULT_MAX_RESPONSE_SIZE: u64 = 64 << 20;

/// A config with the same defaults as the command line. Free it with
/// `wasmpool_config_free`. Returns NULL only on allocation failure.
#[unsafe(no_mangle)]
pub extern "C" fn wasmpool_config_new() -> *mut wasmpool_config {
    boundary_ptr(|| {
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .clamp(1, 4);
        Ok(Box::into_raw(Box::new(wasmpool_config {
            knobs: Knobs::default(),
            completion: wasmpool_completion_mode::WASMPOOL_COMPLETION_ENGINE,
            inline: false,
            engine_threads: threads,
            max_response_size: DEFAULT_MAX_RESPONSE_SIZE,
            otel: OtelFile::default(),
            trace_context: true,
            component: None,
            budget_share: 1,
        })))
    })
}

/// Frees a config. NULL is ignored.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_config_free(cfg: *mut wasmpool_config) {
    boundary_void(|| {
        if !cfg.is_null() {
            // SAFETY: `cfg` came from `wasmpool_config_new` and is freed once (documented).
            drop(unsafe { Box::from_raw(cfg) });
        }
    })
}

/// Applies `change` to a copy of the knobs and keeps it only if valid.
fn set(cfg: *mut wasmpool_config, change: impl FnOnce(&mut Knobs)) -> wasmpool_result {
    boundary(|| {
        // SAFETY: see `handle_mut`.
        let cfg = unsafe { handle_mut(cfg, "cfg") }?;
        let mut k = cfg.knobs.clone();
        change(&mut k);
        k.validate().map_err(|e| Failure::invalid(e.to_string()))?;
        cfg.knobs = k;
        Ok(())
    })
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

/// Requests one instance serves in its lifetime (default: 1 for WASIp2,
/// 128 for WASIp3). 0 is invalid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_config_set_max_instance_reuse_count(
    cfg: *mut wasmpool_config,
    n: u32,
) -> wasmpool_result {
    set(cfg, |k| k.max_instance_reuse_count = Some(n))
}

/// Requests one instance serves at the same time (default: 1 for WASIp2,
/// 16 for WASIp3). 0 is invalid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_config_set_max_instance_concurrent_reuse_count(
    cfg: *mut wasmpool_config,
    n: u32,
) -> wasmpool_result {
    set(cfg, |k| k.max_instance_concurrent_reuse_count = Some(n))
}

/// How long an idle instance is kept for reuse, in milliseconds (default
/// 1000; 0 drops idle instances at once).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_config_set_idle_instance_timeout_ms(
    cfg: *mut wasmpool_config,
    millis: u64,
) -> wasmpool_result {
    set(cfg, |k| k.idle_instance_timeout = ms(millis))
}

/// Longest time a request may take to produce its whole response, in
/// milliseconds (default 30000). 0 is invalid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_config_set_request_timeout_ms(
    cfg: *mut wasmpool_config,
    millis: u64,
) -> wasmpool_result {
    set(cfg, |k| k.request_timeout = ms(millis))
}

/// Requests handled at the same time (default 1000); more wait in the
/// queue. 0 is invalid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_config_set_max_concurrent_requests(
    cfg: *mut wasmpool_config,
    n: u32,
) -> wasmpool_result {
    set(cfg, |k| k.max_concurrent_requests = n)
}

/// Requests that may wait for a free slot (default: equal to the
/// concurrent limit); 0 refuses at once when all slots are busy.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_config_set_max_queued_requests(
    cfg: *mut wasmpool_config,
    n: u32,
) -> wasmpool_result {
    set(cfg, |k| k.max_queued_requests = Some(n))
}

/// Longest a queued request waits for a slot, in milliseconds (default 1000).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_config_set_max_queue_wait_ms(
    cfg: *mut wasmpool_config,
    millis: u64,
) -> wasmpool_result {
    set(cfg, |k| k.max_queue_wait = ms(millis))
}

/// Largest linear memory of one instance, in bytes (default 128 MiB; from
/// 64 KiB to 4 GiB).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_config_set_max_memory_size(
    cfg: *mut wasmpool_config,
    bytes: u64,
) -> wasmpool_result {
    set(cfg, |k| k.max_memory_size = bytes)
}

/// Bytes of each linear memory kept resident (reset in place) when an
/// instance ends (at most the maximum memory size is kept). Without this
/// call it is automatic: each slot keeps up to 16 MiB of each memory (the
/// pages its instances wrote; all of it for a component that starts with
/// 4 MiB or more, an interpreter's heap), warm slots at most 256 MiB or an
/// eighth of the memory limit together; what all slots keep past that is
/// counted in the memory budget.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_config_set_memory_keep_resident(
    cfg: *mut wasmpool_config,
    bytes: u64,
) -> wasmpool_result {
    set(cfg, |k| k.memory_keep_resident = Some(bytes))
}

/// Largest response body `wasmpool_handler_push` and
/// `wasmpool_handler_call` collect, in bytes (default 64 MiB); a larger
/// one fails with `WASMPOOL_TOO_LARGE`. Streamed bodies
/// (`wasmpool_handler_push_streaming`) have no such limit. 0 is invalid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_config_set_max_response_size(
    cfg: *mut wasmpool_config,
    bytes: u64,
) -> wasmpool_result {
    boundary(|| {
        // SAFETY: see `handle_mut`.
        let cfg = unsafe { handle_mut(cfg, "cfg") }?;
        if bytes == 0 {
            return Err(Failure::invalid(
                "max_response_size must be greater than zero",
            ));
        }
        cfg.max_response_size = bytes;
        Ok(())
    })
}

/// Largest request body, in bytes (default 16 MiB; 0 allows none): a
/// longer streamed body fails for the guest, and the writer says
/// `WASMPOOL_CANCELLED` once the request ends.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_config_set_max_request_body_size(
    cfg: *mut wasmpool_config,
    bytes: u64,
) -> wasmpool_result {
    set(cfg, |k| k.max_request_body_size = bytes)
}

/// Most memory all instances of the handler may hold together, in bytes
/// (linear memories and fiber stacks): a `memory.grow` that would cross it
/// waits briefly for memory to be freed and then fails for that guest only
/// (WASMPOOL_TRAP for its request); while no new instance fits, requests
/// wait in the queue and then fail with WASMPOOL_OVERLOADED. 0 (the
/// default) follows the process's cgroup memory limit, else physical
/// memory, less what the process needs itself. At least 64 KiB; more than
/// the process may use at all is invalid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_config_set_memory_budget(
    cfg: *mut wasmpool_config,
    bytes: u64,
) -> wasmpool_result {
    use crate::config::MemoryBudgetArg;
    let arg = match bytes {
        0 => MemoryBudgetArg::Auto,
        b => MemoryBudgetArg::Bytes(b),
    };
    if !cfg.is_null()
        && let Err(e) = check_budget(arg)
    {
        return boundary(|| Err(Failure::invalid(e.to_string())));
    }
    set(cfg, |k| k.memory_budget = arg)
}

/// An explicit budget above what this process may use at all is refused
/// when it is set, not when a handler is made (an automatic one is
/// resolved then).
fn check_budget(arg: crate::config::MemoryBudgetArg) -> Result<(), crate::error::ConfigError> {
    match arg {
        crate::config::MemoryBudgetArg::Bytes(_) => {
            crate::engine::budget::resolve(arg, 0).map(|_| ())
        }
        crate::config::MemoryBudgetArg::Auto => Ok(()),
    }
}

/// Directory of the compile cache (a copy of the string is kept). The
/// default follows the command line: $CACHE_DIRECTORY, else
/// $XDG_CACHE_HOME/wasmpool, else ~/.cache/wasmpool. An empty string is
/// invalid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_config_set_cache_dir(
    cfg: *mut wasmpool_config,
    dir: *const c_char,
) -> wasmpool_result {
    boundary(|| {
        // SAFETY: see `str_arg`.
        let dir = unsafe { str_arg(dir, "dir") }?;
        if dir.is_empty() {
            return Err(Failure::invalid("cache directory is empty"));
        }
        // SAFETY: see `handle_mut`.
        unsafe { handle_mut(cfg, "cfg") }?.knobs.cache_dir = Some(dir.into());
        Ok(())
    })
}

/// Most disk space the compile cache may take, in bytes (default 1 GiB; 0
/// for no limit): when a new entry is stored, the entries used longest ago
/// are removed until the cache fits (never the new one).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_config_set_cache_max_size(
    cfg: *mut wasmpool_config,
    bytes: u64,
) -> wasmpool_result {
    set(cfg, |k| k.cache_max_size = bytes)
}

/// Whether to skip the compile cache (neither read nor write it).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_config_set_no_cache(
    cfg: *mut wasmpool_config,
    no_cache: bool,
) -> wasmpool_result {
    set(cfg, |k| k.no_cache = no_cache)
}

/// Adds an environment variable for the guest (the guest sees no others).
/// `key` must be non-empty and both strings valid UTF-8.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_config_add_env(
    cfg: *mut wasmpool_config,
    key: *const c_char,
    value: *const c_char,
) -> wasmpool_result {
    boundary(|| {
        // SAFETY: see `str_arg`.
        let (key, value) = unsafe { (str_arg(key, "key")?, str_arg(value, "value")?) };
        if key.is_empty() || key.contains('=') {
            return Err(Failure::invalid(format!("invalid environment key `{key}`")));
        }
        // SAFETY: see `handle_mut`.
        let k = &mut unsafe { handle_mut(cfg, "cfg") }?.knobs;
        k.env.retain(|(old, _)| old != key);
        k.env.push((key.into(), value.into()));
        Ok(())
    })
}

/// Lets the guest open the host directory `host_dir` as `guest_dir`
/// (both non-empty UTF-8; `guest_dir` NULL means the same path): read-only
/// unless `writable`. The directory must exist (else
/// WASMPOOL_INVALID_ARGUMENT). Guests see no other files.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_config_add_dir(
    cfg: *mut wasmpool_config,
    host_dir: *const c_char,
    guest_dir: *const c_char,
    writable: bool,
) -> wasmpool_result {
    boundary(|| {
        // SAFETY: see `str_arg`.
        let host = unsafe { str_arg(host_dir, "host_dir") }?;
        let guest = if guest_dir.is_null() {
            host
        } else {
            // SAFETY: as above.
            unsafe { str_arg(guest_dir, "guest_dir") }?
        };
        // SAFETY: see `handle_mut`.
        let cfg = unsafe { handle_mut(cfg, "cfg") }?;
        let arg = KnobArgs {
            dir: if writable {
                vec![]
            } else {
                vec![format!("{host}::{guest}")]
            },
            dir_rw: if writable {
                vec![format!("{host}::{guest}")]
            } else {
                vec![]
            },
            ..Default::default()
        };
        let resolved = arg.resolve().map_err(|e| Failure::invalid(e.to_string()))?;
        cfg.knobs.dirs.extend(resolved.dirs);
        Ok(())
    })
}

/// Sets a wasi:config/store variable for the guest (`key` non-empty; both
/// UTF-8); the guest sees no others. A later value for a key replaces the
/// earlier one.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_config_add_config_var(
    cfg: *mut wasmpool_config,
    key: *const c_char,
    value: *const c_char,
) -> wasmpool_result {
    boundary(|| {
        // SAFETY: see `str_arg`.
        let (key, value) = unsafe { (str_arg(key, "key")?, str_arg(value, "value")?) };
        if key.contains('=') {
            return Err(Failure::invalid(format!(
                "invalid config variable key `{key}`"
            )));
        }
        let (key, value) =
            crate::config::parse_config_var(&format!("{key}={value}")).map_err(Failure::invalid)?;
        // SAFETY: see `handle_mut`.
        let k = &mut unsafe { handle_mut(cfg, "cfg") }?.knobs;
        k.config_vars.retain(|(old, _)| *old != key);
        k.config_vars.push((key, value));
        Ok(())
    })
}

/// Allows outgoing HTTP requests to `host` or `host:port` (every other
/// outgoing request is refused).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_config_add_allow_outbound(
    cfg: *mut wasmpool_config,
    host: *const c_char,
) -> wasmpool_result {
    boundary(|| {
        // SAFETY: see `str_arg`.
        let rule =
            OutboundRule::parse(unsafe { str_arg(host, "host") }?).map_err(Failure::invalid)?;
        // SAFETY: see `handle_mut`.
        unsafe { handle_mut(cfg, "cfg") }?
            .knobs
            .allow_outbound
            .push(rule);
        Ok(())
    })
}

/// Sets one OpenTelemetry trace export setting, by the key it has in the
/// `[otel]` table of the server's config file: `endpoint`,
/// `traces-endpoint`, `headers`, `service-name`, `resource-attributes`,
/// `traces-sampler`, `traces-sampler-arg` (the meanings of the
/// `OTEL_EXPORTER_OTLP_*`, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`
/// and `OTEL_TRACES_SAMPLER*` variables, which a handler does not read).
/// `value` NULL unsets the key. With `endpoint` or `traces-endpoint` set,
/// the handler exports a server span per pushed request (continuing a
/// request's `traceparent` header) and its children, as the server does.
/// Both strings are copied. Errors: `WASMPOOL_INVALID_ARGUMENT` for an
/// unknown key or a value that does not parse (the message names the key).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_config_set_otel(
    cfg: *mut wasmpool_config,
    key: *const c_char,
    value: *const c_char,
) -> wasmpool_result {
    boundary(|| {
        // SAFETY: see `str_arg`.
        let key = unsafe { str_arg(key, "key") }?;
        let value = if value.is_null() {
            None
        } else {
            // SAFETY: see `str_arg`.
            Some(unsafe { str_arg(value, "value") }?.to_string())
        };
        // SAFETY: see `handle_mut`.
        let cfg = unsafe { handle_mut(cfg, "cfg") }?;
        let mut otel = cfg.otel.clone();
        let slot = match key {
            "endpoint" => &mut otel.endpoint,
            "traces-endpoint" => &mut otel.traces_endpoint,
            "headers" => &mut otel.headers,
            "service-name" => &mut otel.service_name,
            "resource-attributes" => &mut otel.resource_attributes,
            "traces-sampler" => &mut otel.traces_sampler,
            "traces-sampler-arg" => &mut otel.traces_sampler_arg,
            other => return Err(Failure::invalid(format!("unknown otel key `{other}`"))),
        };
        *slot = value;
        trace::Settings::from_sources(cfg.trace_context, &otel, &|_| None)
            .map_err(|e| Failure::invalid(e.to_string()))?;
        cfg.otel = otel;
        Ok(())
    })
}

/// W3C trace context (default on): a pushed request's `traceparent` is
/// continued and carried to the guest's outbound requests. 0 turns it off.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_config_set_trace_context(
    cfg: *mut wasmpool_config,
    on: bool,
) -> wasmpool_result {
    boundary(|| {
        // SAFETY: see `handle_mut`.
        unsafe { handle_mut(cfg, "cfg") }?.trace_context = on;
        Ok(())
    })
}

/// Whether instances are reused: a `wasmpool_reuse_mode` value
/// (default `WASMPOOL_REUSE_AUTO`). Other values are invalid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_config_set_reuse_mode(
    cfg: *mut wasmpool_config,
    mode: u32,
) -> wasmpool_result {
    use crate::config::ReuseMode;
    let mode = match mode {
        0 => Some(ReuseMode::Auto),
        1 => Some(ReuseMode::Always),
        2 => Some(ReuseMode::Never),
        _ => None,
    };
    match mode {
        Some(m) => set(cfg, |k| k.reuse = m),
        None => boundary(|| {
            // SAFETY: see `handle_mut`.
            unsafe { handle_mut(cfg, "cfg") }?;
            Err(Failure::invalid("unknown reuse mode".to_string()))
        }),
    }
}

/// How completion callbacks are delivered: `WASMPOOL_COMPLETION_ENGINE`
/// (default) or `WASMPOOL_COMPLETION_POLL`. Other values are invalid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_config_set_completion_mode(
    cfg: *mut wasmpool_config,
    mode: u32,
) -> wasmpool_result {
    boundary(|| {
        let mode = match mode {
            0 => wasmpool_completion_mode::WASMPOOL_COMPLETION_ENGINE,
            1 => wasmpool_completion_mode::WASMPOOL_COMPLETION_POLL,
            other => return Err(Failure::invalid(format!("unknown completion mode {other}"))),
        };
        // SAFETY: see `handle_mut`.
        unsafe { handle_mut(cfg, "cfg") }?.completion = mode;
        Ok(())
    })
}

/// With `inline` true, `wasmpool_handler_push` and
/// `wasmpool_handler_push_streaming` run the request on the calling thread
/// until it completes or has to wait (for an instance, for more of the
/// request body, for the guest's outbound I/O, or for the host to read the
/// response), and only then hand it to the engine threads; a guest that
/// computes holds the calling thread for at most about one epoch tick
/// (10 ms) before it moves too. A small request then never wakes another
/// thread: for hosts whose event loop pushes and polls on one thread. The
/// callbacks still run only inside `wasmpool_handler_poll` (the completion
/// fd is readable when a push completed its request), and the logger
/// (`wasmpool_set_logger`) may also be called on the pushing thread.
/// Needs `WASMPOOL_COMPLETION_POLL` (`wasmpool_handler_new` refuses it in
/// engine mode). Default false.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_config_set_inline(
    cfg: *mut wasmpool_config,
    inline: bool,
) -> wasmpool_result {
    boundary(|| {
        // SAFETY: see `handle_mut`.
        unsafe { handle_mut(cfg, "cfg") }?.inline = inline;
        Ok(())
    })
}

/// Engine threads the handler runs (default: the number of CPUs, at most
/// 4). 0 is invalid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_config_set_engine_threads(
    cfg: *mut wasmpool_config,
    n: u32,
) -> wasmpool_result {
    boundary(|| {
        if n == 0 || n > 1024 {
            return Err(Failure::invalid(format!(
                "engine threads must be 1..=1024, not {n}"
            )));
        }
        // SAFETY: see `handle_mut`.
        unsafe { handle_mut(cfg, "cfg") }?.engine_threads = n as usize;
        Ok(())
    })
}

/// Divides the memory budget: the handler takes `1/n` of it, whether it
/// is automatic or set (`wasmpool_config_set_memory_budget`), and at least
/// 64 KiB. For hosts that run one handler per process in `n` processes
/// (nginx's worker processes): together they keep to one budget. Default
/// 1. 0 is invalid.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_config_set_memory_budget_share(
    cfg: *mut wasmpool_config,
    n: u32,
) -> wasmpool_result {
    boundary(|| {
        // SAFETY: see `handle_mut`.
        let cfg = unsafe { handle_mut(cfg, "cfg") }?;
        if n == 0 {
            return Err(Failure::invalid(
                "the memory budget share must be 1 or more",
            ));
        }
        cfg.budget_share = n;
        Ok(())
    })
}

/// Reads the TOML config file of `wasmpool serve --config` at `path` and
/// applies its settings to `cfg`: the knobs it sets replace the config's
/// (lists such as `env`, `dir` and `config-vars` are appended), the
/// `[otel]` keys it sets and `trace-context` likewise; settings it does not
/// mention keep their values, so a host calls this first and its own
/// setters after to override the file. A relative `component` path is
/// relative to the file's directory (as for the server; give `dir`,
/// `cache-dir` and other paths absolute). Keys only the server's own front end
/// uses (`listen`, `metrics-listen`, `tls-*`, `access-log*`,
/// `drain-timeout`, `shutdown-delay`, `exit-idle-after`, and the
/// connection-level knobs: header, body, send and keep-alive timeouts and
/// rates, per-client limits, `max-concurrent-connections`,
/// `max-concurrent-streams`, `client-body-buffer-size`,
/// `response-buffer-size`, request-head limits) are checked and kept but
/// have no effect on a handler. The file's `component` is available from
/// `wasmpool_config_component`. On any error `cfg` is unchanged.
/// Errors: `WASMPOOL_IO` (the file cannot be read),
/// `WASMPOOL_INVALID_ARGUMENT` (it does not parse, or a value is invalid:
/// the message names the file, the line where known, and the key).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_config_load_file(
    cfg: *mut wasmpool_config,
    path: *const c_char,
) -> wasmpool_result {
    use crate::config::FileConfig;
    use crate::error::ConfigError;
    boundary(|| {
        // SAFETY: see `str_arg`.
        let path = std::path::Path::new(unsafe { str_arg(path, "path") }?);
        // SAFETY: see `handle_mut`.
        let cfg = unsafe { handle_mut(cfg, "cfg") }?;
        let file = FileConfig::load(path).map_err(|e| match e {
            ConfigError::Read { .. } => Failure::new(wasmpool_result::WASMPOOL_IO, e.to_string()),
            e => Failure::invalid(e.to_string()),
        })?;
        let in_file = |e: ConfigError| {
            let line = match &e {
                ConfigError::Invalid { key, .. } => std::fs::read_to_string(path)
                    .ok()
                    .and_then(|text| crate::config::line_of_key(&text, key))
                    .map(|n| format!(", line {n}"))
                    .unwrap_or_default(),
                _ => String::new(),
            };
            Failure::invalid(format!("{}{line}: {e}", path.display()))
        };
        let knobs = file.knobs.resolve_over(&cfg.knobs).map_err(in_file)?;
        check_budget(knobs.memory_budget).map_err(in_file)?;
        let mut otel = cfg.otel.clone();
        otel.overlay(file.otel);
        let trace_context = file.trace_context.unwrap_or(cfg.trace_context);
        trace::Settings::from_sources(trace_context, &otel, &|_| None)
            .map_err(|e| Failure::invalid(format!("{}: {e}", path.display())))?;
        let component = match file.component {
            Some(p) => Some(
                std::ffi::CString::new(p.to_str().ok_or_else(|| {
                    Failure::invalid(format!("{}: `component` is not UTF-8", path.display()))
                })?)
                .map_err(|_| {
                    Failure::invalid(format!("{}: `component` contains NUL", path.display()))
                })?,
            ),
            None => None,
        };
        cfg.knobs = knobs;
        cfg.otel = otel;
        cfg.trace_context = trace_context;
        cfg.component = component;
        Ok(())
    })
}

/// The component the last file loaded into `cfg` names (its `component`
/// key, made absolute against the file's directory when relative), or
/// NULL when it names none or no file was loaded. The string belongs to
/// `cfg`: valid until the next `wasmpool_config_load_file` or
/// `wasmpool_config_free`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_config_component(cfg: *const wasmpool_config) -> *const c_char {
    let mut out = std::ptr::null();
    boundary(|| {
        // SAFETY: see `handle_ref`.
        let cfg = unsafe { super::handle_ref(cfg, "cfg") }?;
        out = cfg.component.as_ref().map_or(out, |c| c.as_ptr());
        Ok(())
    });
    out
}
