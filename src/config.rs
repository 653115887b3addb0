//! The knobs: one definition serves as the command-line flags (clap) and as
//! the keys of the TOML config file (serde), so the names can never drift
//! apart. [`KnobArgs`] holds what a user set (every field optional);
//! [`Knobs`] is the resolved, validated set with defaults filled in.

use crate::error::ConfigError;
use crate::units;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Defaults, named after `wasmtime serve`'s where it has the knob.
pub mod defaults {
    use std::time::Duration;
    /// `max-instance-reuse-count` for WASIp2 components.
    pub const P2_MAX_INSTANCE_REUSE_COUNT: u32 = 1;
    /// `max-instance-reuse-count` for WASIp3 components.
    pub const P3_MAX_INSTANCE_REUSE_COUNT: u32 = 128;
    /// `max-instance-concurrent-reuse-count` for WASIp2 components (they
    /// cannot run two requests at once in one instance).
    pub const P2_MAX_INSTANCE_CONCURRENT_REUSE_COUNT: u32 = 1;
    /// `max-instance-concurrent-reuse-count` for WASIp3 components.
    pub const P3_MAX_INSTANCE_CONCURRENT_REUSE_COUNT: u32 = 16;
    pub const IDLE_INSTANCE_TIMEOUT: Duration = Duration::from_secs(1);
    pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
    pub const MAX_CONCURRENT_REQUESTS: u32 = 1000;
    pub const MAX_CONCURRENT_CONNECTIONS: u32 = 1000;
    pub const MAX_QUEUE_WAIT: Duration = Duration::from_secs(1);
    pub const MAX_MEMORY_SIZE: u64 = 128 << 20;
    pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
    pub const MAX_REQUEST_HEADERS: u32 = 100;
    pub const MAX_REQUEST_HEADER_SIZE: u64 = 16 << 10;
    pub const MAX_REQUEST_BODY_SIZE: u64 = 16 << 20;
    /// nginx's `client_body_timeout` is 60s, Apache's mod_reqtimeout 20s.
    pub const CLIENT_BODY_TIMEOUT: Duration = Duration::from_secs(10);
    /// Apache's mod_reqtimeout `MinRate` is 500 bytes/s.
    pub const CLIENT_BODY_MIN_RATE: u64 = 1 << 10;
    pub const CLIENT_BODY_BUFFER_SIZE: u64 = 64 << 10;
    /// nginx's `send_timeout` is 60s.
    pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);
    pub const SEND_MIN_RATE: u64 = 1 << 10;
    pub const RESPONSE_BUFFER_SIZE: u64 = 256 << 10;
    /// About twenty versions of a componentize-py guest (43 MiB compiled).
    pub const CACHE_MAX_SIZE: u64 = 1 << 30;
    /// nginx's `http2_max_concurrent_streams` is 128.
    pub const MAX_CONCURRENT_STREAMS: u32 = 128;
    /// nginx's `keepalive_timeout` is 75s, Apache's 5s.
    pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(30);
    /// Share of `max-concurrent-connections` one client address may take
    /// by default...
    pub const PER_CLIENT_SHARE: u32 = 4;
    /// ... when that share is at least this much; smaller servers get no
    /// per-client split by default.
    pub const PER_CLIENT_FLOOR: u32 = 64;
    /// Requests one client address may have in flight by default (when
    /// `max-concurrent-requests` is at least four times this): enough for
    /// a browser or a busy API client, few enough that one client's
    /// requests cannot queue everyone else behind them on the CPUs.
    pub const MAX_REQUESTS_PER_CLIENT: u32 = 64;
    /// Address served when neither `--listen` nor inherited sockets say otherwise.
    pub const LISTEN: &str = "127.0.0.1:8080";
}

/// Smallest request-head buffer the HTTP/1 parser accepts.
pub const MIN_REQUEST_HEADER_SIZE: u64 = 8 << 10;
/// Largest linear memory a 32-bit wasm memory can have.
pub const MAX_MAX_MEMORY_SIZE: u64 = 4 << 30;
/// One wasm page: the smallest useful `max-memory-size`.
pub const MIN_MAX_MEMORY_SIZE: u64 = 64 << 10;
/// Largest minimum transfer rate a knob may ask of a client.
pub const MAX_MIN_RATE: u64 = 100 << 20;
/// Largest `client-body-buffer-size` and `response-buffer-size`.
pub const MAX_BUFFER_SIZE: u64 = 16 << 20;

/// The `memory-budget` knob.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum MemoryBudgetArg {
    /// Follow the cgroup memory limit, else physical memory.
    #[default]
    Auto,
    Bytes(u64),
}

impl MemoryBudgetArg {
    pub fn parse(s: &str) -> Result<MemoryBudgetArg, String> {
        if s.trim().eq_ignore_ascii_case("auto") {
            return Ok(MemoryBudgetArg::Auto);
        }
        units::parse_positive_size(s)
            .map(MemoryBudgetArg::Bytes)
            .map_err(|e| format!("{e} (or `auto`)"))
    }
}

impl std::fmt::Display for MemoryBudgetArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MemoryBudgetArg::Auto => f.write_str("auto"),
            MemoryBudgetArg::Bytes(b) => f.write_str(&units::format_size(*b)),
        }
    }
}

/// How instances of a component are reused (the `reuse` knob).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReuseMode {
    /// Reuse as the reuse knobs say; stop reusing when reused instances
    /// fail requests that fresh ones answer.
    #[default]
    Auto,
    /// Reuse as the reuse knobs say, whatever happens.
    Always,
    /// One request per instance.
    Never,
}

impl std::fmt::Display for ReuseMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReuseMode::Auto => "auto",
            ReuseMode::Always => "always",
            ReuseMode::Never => "never",
        })
    }
}

/// Knobs as given by a user: on the command line or in the config file.
/// `None` (or an empty list) means "not set here".
#[derive(Debug, Default, Clone, clap::Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct KnobArgs {
    /// Requests one instance may serve in its lifetime before it is dropped
    /// [default: 1 for WASIp2, 128 for WASIp3].
    #[arg(long, value_name = "N", value_parser = units::parse_positive_count)]
    #[serde(default, deserialize_with = "de::positive_count")]
    pub max_instance_reuse_count: Option<u32>,

    /// Whether instances are reused: `auto` reuses them as the reuse knobs
    /// say until a reused instance fails a request that a fresh one then
    /// answers, and from then on uses each instance once; `always` never
    /// falls back; `never` uses each instance for one request [default: auto].
    #[arg(long, value_enum, value_name = "MODE")]
    #[serde(default)]
    pub reuse: Option<ReuseMode>,

    /// Requests one instance may serve at the same time
    /// [default: 1 for WASIp2, 16 for WASIp3; WASIp2 instances always serve one at a time].
    #[arg(long, value_name = "N", value_parser = units::parse_positive_count)]
    #[serde(default, deserialize_with = "de::positive_count")]
    pub max_instance_concurrent_reuse_count: Option<u32>,

    /// How long an idle instance is kept for reuse before it is dropped [default: 1s].
    #[arg(long, value_name = "DURATION", value_parser = units::parse_duration)]
    #[serde(default, deserialize_with = "de::duration")]
    pub idle_instance_timeout: Option<Duration>,

    /// Longest time a request may take to produce a response head; past it the
    /// client gets 504 and the instance is never reused [default: 30s].
    #[arg(long, value_name = "DURATION", value_parser = units::parse_positive_duration)]
    #[serde(default, deserialize_with = "de::positive_duration")]
    pub request_timeout: Option<Duration>,

    /// Requests handled at the same time; more wait in the queue [default: 1000].
    #[arg(long, value_name = "N", value_parser = units::parse_positive_count)]
    #[serde(default, deserialize_with = "de::positive_count")]
    pub max_concurrent_requests: Option<u32>,

    /// Connections open at the same time; more wait in the listen backlog [default: 1000].
    #[arg(long, value_name = "N", value_parser = units::parse_positive_count)]
    #[serde(default, deserialize_with = "de::positive_count")]
    pub max_concurrent_connections: Option<u32>,

    /// Requests that may wait for a free slot; when the queue is full the
    /// answer is 503 at once [default: equal to --max-concurrent-requests].
    #[arg(long, value_name = "N", value_parser = units::parse_count)]
    #[serde(default, deserialize_with = "de::count")]
    pub max_queued_requests: Option<u32>,

    /// Longest a queued request waits for a slot before it gets 503 [default: 1s].
    #[arg(long, value_name = "DURATION", value_parser = units::parse_duration)]
    #[serde(default, deserialize_with = "de::duration")]
    pub max_queue_wait: Option<Duration>,

    /// Largest linear memory of one instance, in bytes or with a unit [default: 128MiB].
    #[arg(long, value_name = "SIZE", value_parser = units::parse_positive_size)]
    #[serde(default, deserialize_with = "de::positive_size")]
    pub max_memory_size: Option<u64>,

    /// Bytes of each linear memory kept resident (reset in place) when an
    /// instance ends, so the next instance in that slot takes no page faults
    /// for them; costs up to that much RSS per slot used; at most
    /// max-memory-size is kept [default: automatic: each slot keeps up to
    /// 16MiB of each memory (the pages its instances wrote; all of it for a
    /// component that starts with 4MiB or more, an interpreter's heap), and
    /// warm slots at most 256MiB or an eighth of the memory limit; what slots
    /// keep past that is counted in the memory budget].
    #[arg(long, value_name = "SIZE", value_parser = units::parse_size)]
    #[serde(default, deserialize_with = "de::size")]
    pub memory_keep_resident: Option<u64>,

    /// Time a client has to send a complete request head [default: 10s].
    #[arg(long, value_name = "DURATION", value_parser = units::parse_positive_duration)]
    #[serde(default, deserialize_with = "de::positive_duration")]
    pub header_read_timeout: Option<Duration>,

    /// Most header fields a request may carry; more gets 431 [default: 100].
    #[arg(long, value_name = "N", value_parser = units::parse_positive_count)]
    #[serde(default, deserialize_with = "de::positive_count")]
    pub max_request_headers: Option<u32>,

    /// Largest request head (request line and headers); larger gets 431
    /// [default: 16KiB, at least 8KiB].
    #[arg(long, value_name = "SIZE", value_parser = units::parse_positive_size)]
    #[serde(default, deserialize_with = "de::positive_size")]
    pub max_request_header_size: Option<u64>,

    /// Largest request body; larger gets 413 [default: 16MiB].
    #[arg(long, value_name = "SIZE", value_parser = units::parse_size)]
    #[serde(default, deserialize_with = "de::size")]
    pub max_request_body_size: Option<u64>,

    /// Longest a client may pause while sending a request body; then 408
    /// and the connection is closed (stops slow-body attacks) [default: 10s].
    #[arg(long, value_name = "DURATION", value_parser = units::parse_positive_duration)]
    #[serde(default, deserialize_with = "de::positive_duration")]
    pub client_body_timeout: Option<Duration>,

    /// Slowest a request body may arrive, in bytes per second: after
    /// client-body-timeout, each second of waiting must have brought this
    /// much on average, else 408; 0 for no minimum [default: 1KiB/s].
    #[arg(long, value_name = "RATE", value_parser = units::parse_rate)]
    #[serde(default, deserialize_with = "de::rate")]
    pub client_body_min_rate: Option<u64>,

    /// Request bodies up to this size are received in full before the
    /// request takes an admission slot or an instance, so a slow sender
    /// costs a buffer, not a guest; larger bodies stream in once this much
    /// has arrived [default: 64KiB, at most 16MiB].
    #[arg(long, value_name = "SIZE", value_parser = units::parse_size)]
    #[serde(default, deserialize_with = "de::size")]
    pub client_body_buffer_size: Option<u64>,

    /// Longest writing a response to a client may make no progress; then
    /// the connection is closed and the request's instance and slot are
    /// freed (stops slow-reader attacks). On HTTP/2 this also holds for
    /// each stream: one whose client takes none of its next 16KiB (keeps
    /// its window shut) for this long closes the connection [default: 10s].
    #[arg(long, value_name = "DURATION", value_parser = units::parse_positive_duration)]
    #[serde(default, deserialize_with = "de::positive_duration")]
    pub send_timeout: Option<Duration>,

    /// Slowest a client may read a response, in bytes per second, once
    /// its socket is full: after send-timeout each second of waiting must
    /// have taken this much on average, else the connection is closed; 0
    /// for no minimum [default: 1KiB/s].
    #[arg(long, value_name = "RATE", value_parser = units::parse_rate)]
    #[serde(default, deserialize_with = "de::rate")]
    pub send_min_rate: Option<u64>,

    /// Most of a response read ahead of a client that does not keep up, so
    /// the guest can finish and free its instance and slot; 0 to let the
    /// guest wait for the client [default: 256KiB, at most 16MiB].
    #[arg(long, value_name = "SIZE", value_parser = units::parse_size)]
    #[serde(default, deserialize_with = "de::size")]
    pub response_buffer_size: Option<u64>,

    /// How long an idle keep-alive connection stays open waiting for its
    /// next request [default: 30s]. Idle connections are also the first
    /// closed when max-concurrent-connections is reached.
    #[arg(long, value_name = "DURATION", value_parser = units::parse_positive_duration)]
    #[serde(default, deserialize_with = "de::positive_duration")]
    pub keepalive_timeout: Option<Duration>,

    /// Connections one client address may hold open on TCP listeners
    /// (unix-socket listeners are exempt: a proxy in front speaks for many
    /// clients) [default: a quarter of max-concurrent-connections when
    /// that is 64 or more, else no limit].
    #[arg(long, value_name = "N", value_parser = units::parse_positive_count)]
    #[serde(default, deserialize_with = "de::positive_count")]
    pub max_connections_per_client: Option<u32>,

    /// Requests one client address may have in flight on TCP listeners;
    /// more get 429 [default: 64; no limit when max-concurrent-requests is
    /// below 256].
    #[arg(long, value_name = "N", value_parser = units::parse_positive_count)]
    #[serde(default, deserialize_with = "de::positive_count")]
    pub max_requests_per_client: Option<u32>,

    /// Most memory all guests together may hold (linear memories and
    /// buffered request bodies): a size, or `auto` for the service's
    /// cgroup memory limit (MemoryMax=) or else physical memory, less
    /// headroom for the process [default: auto].
    #[arg(long, value_name = "SIZE|auto", value_parser = MemoryBudgetArg::parse)]
    #[serde(default, deserialize_with = "de::memory_budget")]
    pub memory_budget: Option<MemoryBudgetArg>,

    /// Directory of the compile cache [default: $CACHE_DIRECTORY, else
    /// $XDG_CACHE_HOME/wasmpool, else ~/.cache/wasmpool].
    #[arg(long, value_name = "DIR")]
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,

    /// A read-only compile cache looked in when cache-dir has no entry:
    /// one filled at build time (`wasmpool compile --cache-dir DIR`), so a
    /// container whose cache-dir is an empty volume compiles nothing
    /// [default: none].
    #[arg(long, value_name = "DIR")]
    #[serde(default)]
    pub cache_seed_dir: Option<PathBuf>,

    /// Most disk space the compile cache may take: after storing a new
    /// entry, the entries used longest ago are removed until the cache
    /// fits (the new one always stays); 0 for no limit [default: 1GiB].
    #[arg(long, value_name = "SIZE", value_parser = units::parse_size)]
    #[serde(default, deserialize_with = "de::size")]
    pub cache_max_size: Option<u64>,

    /// Compile on every start; neither read nor write the compile cache.
    #[arg(long)]
    #[serde(default)]
    pub no_cache: bool,

    /// An environment variable for the guest (repeatable); the guest sees no
    /// other variables.
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env_arg)]
    #[serde(default)]
    pub env: Vec<String>,

    /// A host the guest may send HTTP requests to (repeatable); without a
    /// port any port is allowed. Every other outgoing request is refused.
    #[arg(long = "allow-outbound", value_name = "HOST[:PORT]", value_parser = parse_outbound_arg)]
    #[serde(default)]
    pub allow_outbound: Vec<String>,

    /// HTTP/2 streams (requests) one connection may have open at once
    /// [default: 128].
    #[arg(long, value_name = "N", value_parser = units::parse_positive_count)]
    #[serde(default, deserialize_with = "de::positive_count")]
    pub max_concurrent_streams: Option<u32>,

    /// A host directory the guest may read, at GUEST (default: the same
    /// path) inside the guest (repeatable); read-only.
    #[arg(long = "dir", value_name = "HOST[::GUEST]", value_parser = parse_dir_arg)]
    #[serde(default)]
    pub dir: Vec<String>,

    /// Like --dir, but the guest may also write to it.
    #[arg(long = "dir-rw", value_name = "HOST[::GUEST]", value_parser = parse_dir_arg)]
    #[serde(default)]
    pub dir_rw: Vec<String>,

    /// A wasi:config/store variable for the guest (repeatable); the guest
    /// sees no others.
    #[arg(long = "config-var", value_name = "KEY=VALUE", value_parser = parse_config_var_arg)]
    #[serde(default)]
    pub config_var: Vec<String>,
}

fn parse_dir_arg(s: &str) -> Result<String, String> {
    Preopen::parse(s, false).map(|_| s.to_string())
}

fn parse_config_var_arg(s: &str) -> Result<String, String> {
    parse_config_var(s).map(|_| s.to_string())
}

/// Splits a wasi:config variable `KEY=VALUE`.
pub fn parse_config_var(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() && !k.contains('\0') && !v.contains('\0') => {
            Ok((k.to_string(), v.to_string()))
        }
        _ => Err(format!(
            "invalid config variable `{s}`: expected KEY=VALUE with a non-empty KEY"
        )),
    }
}

/// A directory preopened for the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preopen {
    pub host: PathBuf,
    pub guest: String,
    pub writable: bool,
}

impl Preopen {
    /// Parses `HOST[::GUEST]` (the syntax of `wasmtime run --dir`).
    pub fn parse(s: &str, writable: bool) -> Result<Preopen, String> {
        let (host, guest) = match s.split_once("::") {
            Some((h, g)) => (h, g),
            None => (s, s),
        };
        if host.is_empty() || guest.is_empty() || host.contains('\0') || guest.contains('\0') {
            return Err(format!(
                "invalid directory `{s}`: expected HOST or HOST::GUEST"
            ));
        }
        Ok(Preopen {
            host: PathBuf::from(host),
            guest: guest.to_string(),
            writable,
        })
    }

    /// The host directory must exist and be a directory.
    fn check(&self) -> Result<(), String> {
        match std::fs::metadata(&self.host) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(format!("{} is not a directory", self.host.display())),
            Err(e) => Err(format!("directory {}: {e}", self.host.display())),
        }
    }
}

fn parse_env_arg(s: &str) -> Result<String, String> {
    parse_env(s).map(|_| s.to_string())
}

fn parse_outbound_arg(s: &str) -> Result<String, String> {
    OutboundRule::parse(s).map(|_| s.to_string())
}

/// Splits `KEY=VALUE`.
pub fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !k.contains('\0') && !v.contains('\0') => {
            Ok((k.to_string(), v.to_string()))
        }
        _ => Err(format!(
            "invalid environment entry `{s}`: expected KEY=VALUE"
        )),
    }
}

/// One `allow-outbound` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundRule {
    /// Lower-cased host name or IP address (IPv6 without brackets).
    pub host: String,
    /// `None` allows every port.
    pub port: Option<u16>,
}

impl OutboundRule {
    /// Parses `HOST`, `HOST:PORT`, `[V6]` or `[V6]:PORT`.
    pub fn parse(s: &str) -> Result<OutboundRule, String> {
        let bad = || format!("invalid outbound host `{s}`: expected HOST or HOST:PORT");
        let t = s.trim();
        let (host, port) = if let Some(rest) = t.strip_prefix('[') {
            let (h, after) = rest.split_once(']').ok_or_else(bad)?;
            match after {
                "" => (h, None),
                p => (h, Some(p.strip_prefix(':').ok_or_else(bad)?)),
            }
        } else {
            match t.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') => (h, Some(p)),
                Some(_) => (t, None), // bare IPv6 address
                None => (t, None),
            }
        };
        if host.is_empty() || host.contains('/') || host.contains(char::is_whitespace) {
            return Err(bad());
        }
        let port = match port {
            Some(p) => Some(p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?),
            None => None,
        };
        Ok(OutboundRule {
            host: host.to_ascii_lowercase(),
            port,
        })
    }

    /// Whether a request to `host:port` is allowed by this rule.
    pub fn allows(&self, host: &str, port: u16) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        self.host.eq_ignore_ascii_case(host) && self.port.is_none_or(|p| p == port)
    }
}

impl KnobArgs {
    /// Overlays `other` on `self`: scalars set in `other` win; lists are
    /// appended (later `env` entries win over earlier ones with the same key).
    pub fn overlay(mut self, other: KnobArgs) -> KnobArgs {
        macro_rules! take {
            ($($f:ident),*) => { $( if other.$f.is_some() { self.$f = other.$f; } )* };
        }
        take!(
            max_instance_reuse_count,
            reuse,
            max_instance_concurrent_reuse_count,
            idle_instance_timeout,
            request_timeout,
            max_concurrent_requests,
            max_concurrent_connections,
            max_queued_requests,
            max_queue_wait,
            max_memory_size,
            memory_keep_resident,
            header_read_timeout,
            max_request_headers,
            max_request_header_size,
            max_request_body_size,
            client_body_timeout,
            client_body_min_rate,
            client_body_buffer_size,
            send_timeout,
            send_min_rate,
            response_buffer_size,
            keepalive_timeout,
            max_connections_per_client,
            max_requests_per_client,
            memory_budget,
            cache_dir,
            cache_seed_dir,
            cache_max_size
        );
        self.no_cache |= other.no_cache;
        self.env.extend(other.env);
        self.allow_outbound.extend(other.allow_outbound);
        if other.max_concurrent_streams.is_some() {
            self.max_concurrent_streams = other.max_concurrent_streams;
        }
        self.dir.extend(other.dir);
        self.dir_rw.extend(other.dir_rw);
        self.config_var.extend(other.config_var);
        self
    }

    /// Fills in defaults and checks values that depend on each other.
    pub fn resolve(&self) -> Result<Knobs, ConfigError> {
        self.resolve_over(&Knobs::default())
    }

    /// Like [`KnobArgs::resolve`], with `base` in place of the defaults:
    /// what is set here wins; lists are appended to `base`'s (a later
    /// `env` or `config-var` entry wins over an earlier one of its key).
    pub fn resolve_over(&self, base: &Knobs) -> Result<Knobs, ConfigError> {
        let d = base;
        let k = Knobs {
            max_instance_reuse_count: self.max_instance_reuse_count.or(d.max_instance_reuse_count),
            reuse: self.reuse.unwrap_or(d.reuse),
            max_instance_concurrent_reuse_count: self
                .max_instance_concurrent_reuse_count
                .or(d.max_instance_concurrent_reuse_count),
            idle_instance_timeout: self
                .idle_instance_timeout
                .unwrap_or(d.idle_instance_timeout),
            request_timeout: self.request_timeout.unwrap_or(d.request_timeout),
            max_concurrent_requests: self
                .max_concurrent_requests
                .unwrap_or(d.max_concurrent_requests),
            max_concurrent_connections: self
                .max_concurrent_connections
                .unwrap_or(d.max_concurrent_connections),
            max_queued_requests: self.max_queued_requests.or(d.max_queued_requests),
            max_queue_wait: self.max_queue_wait.unwrap_or(d.max_queue_wait),
            max_memory_size: self.max_memory_size.unwrap_or(d.max_memory_size),
            memory_keep_resident: self.memory_keep_resident.or(d.memory_keep_resident),
            header_read_timeout: self.header_read_timeout.unwrap_or(d.header_read_timeout),
            max_request_headers: self.max_request_headers.unwrap_or(d.max_request_headers),
            max_request_header_size: self
                .max_request_header_size
                .unwrap_or(d.max_request_header_size),
            max_request_body_size: self
                .max_request_body_size
                .unwrap_or(d.max_request_body_size),
            client_body_timeout: self.client_body_timeout.unwrap_or(d.client_body_timeout),
            client_body_min_rate: self.client_body_min_rate.unwrap_or(d.client_body_min_rate),
            client_body_buffer_size: self
                .client_body_buffer_size
                .unwrap_or(d.client_body_buffer_size),
            send_timeout: self.send_timeout.unwrap_or(d.send_timeout),
            send_min_rate: self.send_min_rate.unwrap_or(d.send_min_rate),
            response_buffer_size: self.response_buffer_size.unwrap_or(d.response_buffer_size),
            keepalive_timeout: self.keepalive_timeout.unwrap_or(d.keepalive_timeout),
            max_connections_per_client: self
                .max_connections_per_client
                .or(d.max_connections_per_client),
            max_requests_per_client: self.max_requests_per_client.or(d.max_requests_per_client),
            memory_budget: self.memory_budget.unwrap_or(d.memory_budget),
            cache_dir: self.cache_dir.clone().or_else(|| d.cache_dir.clone()),
            cache_seed_dir: self
                .cache_seed_dir
                .clone()
                .or_else(|| d.cache_seed_dir.clone()),
            cache_max_size: self.cache_max_size.unwrap_or(d.cache_max_size),
            no_cache: self.no_cache || d.no_cache,
            env: {
                let mut env: Vec<(String, String)> = d.env.clone();
                for e in &self.env {
                    let (k, v) = parse_env(e).map_err(ConfigError::invalid("env"))?;
                    env.retain(|(old, _)| *old != k);
                    env.push((k, v));
                }
                env
            },
            max_concurrent_streams: self
                .max_concurrent_streams
                .unwrap_or(d.max_concurrent_streams),
            dirs: {
                let mut dirs = d.dirs.clone();
                for (list, writable, key) in
                    [(&self.dir, false, "dir"), (&self.dir_rw, true, "dir-rw")]
                {
                    for d in list {
                        let p = Preopen::parse(d, writable).map_err(ConfigError::invalid(key))?;
                        p.check().map_err(ConfigError::invalid(key))?;
                        dirs.push(p);
                    }
                }
                dirs
            },
            config_vars: {
                let mut vars: Vec<(String, String)> = d.config_vars.clone();
                for v in &self.config_var {
                    let (k, v) = parse_config_var(v).map_err(ConfigError::invalid("config-var"))?;
                    vars.retain(|(old, _)| *old != k);
                    vars.push((k, v));
                }
                vars
            },
            allow_outbound: {
                let mut rules = d.allow_outbound.clone();
                for s in &self.allow_outbound {
                    rules.push(
                        OutboundRule::parse(s).map_err(ConfigError::invalid("allow-outbound"))?,
                    );
                }
                rules
            },
        };
        k.validate()?;
        Ok(k)
    }
}

/// The resolved knobs of one pool.
#[derive(Debug, Clone, PartialEq)]
pub struct Knobs {
    /// `None`: the default for the component's world.
    pub max_instance_reuse_count: Option<u32>,
    pub reuse: ReuseMode,
    /// `None`: the default for the component's world.
    pub max_instance_concurrent_reuse_count: Option<u32>,
    pub idle_instance_timeout: Duration,
    pub request_timeout: Duration,
    pub max_concurrent_requests: u32,
    pub max_concurrent_connections: u32,
    /// `None`: equal to `max_concurrent_requests`.
    pub max_queued_requests: Option<u32>,
    pub max_queue_wait: Duration,
    pub max_memory_size: u64,
    /// `None`: automatic (see `engine::component::warm_slots`).
    pub memory_keep_resident: Option<u64>,
    pub header_read_timeout: Duration,
    pub max_request_headers: u32,
    pub max_request_header_size: u64,
    pub max_request_body_size: u64,
    pub client_body_timeout: Duration,
    /// Bytes per second; 0 for no minimum.
    pub client_body_min_rate: u64,
    pub client_body_buffer_size: u64,
    pub send_timeout: Duration,
    /// Bytes per second; 0 for no minimum.
    pub send_min_rate: u64,
    pub response_buffer_size: u64,
    pub keepalive_timeout: Duration,
    /// `None`: a quarter of `max_concurrent_connections`.
    pub max_connections_per_client: Option<u32>,
    /// `None`: a quarter of `max_concurrent_requests`.
    pub max_requests_per_client: Option<u32>,
    pub memory_budget: MemoryBudgetArg,
    pub cache_dir: Option<PathBuf>,
    /// `None`: no seed.
    pub cache_seed_dir: Option<PathBuf>,
    /// Bytes; 0 for no limit.
    pub cache_max_size: u64,
    pub no_cache: bool,
    pub env: Vec<(String, String)>,
    pub allow_outbound: Vec<OutboundRule>,
    pub max_concurrent_streams: u32,
    /// Directories preopened for the guest.
    pub dirs: Vec<Preopen>,
    /// wasi:config/store variables.
    pub config_vars: Vec<(String, String)>,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            max_instance_reuse_count: None,
            reuse: ReuseMode::Auto,
            max_instance_concurrent_reuse_count: None,
            idle_instance_timeout: defaults::IDLE_INSTANCE_TIMEOUT,
            request_timeout: defaults::REQUEST_TIMEOUT,
            max_concurrent_requests: defaults::MAX_CONCURRENT_REQUESTS,
            max_concurrent_connections: defaults::MAX_CONCURRENT_CONNECTIONS,
            max_queued_requests: None,
            max_queue_wait: defaults::MAX_QUEUE_WAIT,
            max_memory_size: defaults::MAX_MEMORY_SIZE,
            memory_keep_resident: None,
            header_read_timeout: defaults::HEADER_READ_TIMEOUT,
            max_request_headers: defaults::MAX_REQUEST_HEADERS,
            max_request_header_size: defaults::MAX_REQUEST_HEADER_SIZE,
            max_request_body_size: defaults::MAX_REQUEST_BODY_SIZE,
            client_body_timeout: defaults::CLIENT_BODY_TIMEOUT,
            client_body_min_rate: defaults::CLIENT_BODY_MIN_RATE,
            client_body_buffer_size: defaults::CLIENT_BODY_BUFFER_SIZE,
            send_timeout: defaults::SEND_TIMEOUT,
            send_min_rate: defaults::SEND_MIN_RATE,
            response_buffer_size: defaults::RESPONSE_BUFFER_SIZE,
            keepalive_timeout: defaults::KEEPALIVE_TIMEOUT,
            max_connections_per_client: None,
            max_requests_per_client: None,
            memory_budget: MemoryBudgetArg::Auto,
            cache_dir: None,
            cache_seed_dir: None,
            cache_max_size: defaults::CACHE_MAX_SIZE,
            no_cache: false,
            env: Vec::new(),
            allow_outbound: Vec::new(),
            max_concurrent_streams: defaults::MAX_CONCURRENT_STREAMS,
            dirs: Vec::new(),
            config_vars: Vec::new(),
        }
    }
}

impl Knobs {
    /// Checks every value; the setters of the C API and the file loader
    /// both end here, so an invalid value is an error, never a clamp.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn nonzero(name: &'static str, ok: bool) -> Result<(), ConfigError> {
            if ok {
                Ok(())
            } else {
                Err(ConfigError::Invalid {
                    key: name,
                    reason: "must be greater than zero".into(),
                })
            }
        }
        nonzero(
            "max-instance-reuse-count",
            self.max_instance_reuse_count != Some(0),
        )?;
        nonzero(
            "max-instance-concurrent-reuse-count",
            self.max_instance_concurrent_reuse_count != Some(0),
        )?;
        nonzero("request-timeout", !self.request_timeout.is_zero())?;
        nonzero("max-concurrent-requests", self.max_concurrent_requests > 0)?;
        nonzero(
            "max-concurrent-connections",
            self.max_concurrent_connections > 0,
        )?;
        nonzero("header-read-timeout", !self.header_read_timeout.is_zero())?;
        nonzero("max-request-headers", self.max_request_headers > 0)?;
        nonzero("client-body-timeout", !self.client_body_timeout.is_zero())?;
        nonzero("send-timeout", !self.send_timeout.is_zero())?;
        nonzero("keepalive-timeout", !self.keepalive_timeout.is_zero())?;
        nonzero(
            "max-connections-per-client",
            self.max_connections_per_client != Some(0),
        )?;
        nonzero(
            "max-requests-per-client",
            self.max_requests_per_client != Some(0),
        )?;
        for (key, rate) in [
            ("client-body-min-rate", self.client_body_min_rate),
            ("send-min-rate", self.send_min_rate),
        ] {
            // Faster than any link: every client would be cut off.
            if rate > MAX_MIN_RATE {
                return Err(ConfigError::Invalid {
                    key,
                    reason: format!(
                        "{}/s would cut off every client; at most {}/s",
                        units::format_size(rate),
                        units::format_size(MAX_MIN_RATE)
                    ),
                });
            }
        }
        for (key, size) in [
            ("client-body-buffer-size", self.client_body_buffer_size),
            ("response-buffer-size", self.response_buffer_size),
        ] {
            if size > MAX_BUFFER_SIZE {
                return Err(ConfigError::Invalid {
                    key,
                    reason: format!(
                        "{} is more than {}: every connection may hold a buffer this large",
                        units::format_size(size),
                        units::format_size(MAX_BUFFER_SIZE)
                    ),
                });
            }
        }
        for (key, n, of_key, total) in [
            (
                "max-connections-per-client",
                self.max_connections_per_client,
                "max-concurrent-connections",
                self.max_concurrent_connections,
            ),
            (
                "max-requests-per-client",
                self.max_requests_per_client,
                "max-concurrent-requests",
                self.max_concurrent_requests,
            ),
        ] {
            if let Some(n) = n
                && n > total
            {
                return Err(ConfigError::Invalid {
                    key,
                    reason: format!("{n} is more than {of_key} ({total})"),
                });
            }
        }
        if let MemoryBudgetArg::Bytes(b) = self.memory_budget
            && b < MIN_MAX_MEMORY_SIZE
        {
            return Err(ConfigError::Invalid {
                key: "memory-budget",
                reason: format!(
                    "{} cannot hold a single 64KiB memory",
                    units::format_size(b)
                ),
            });
        }
        if !(MIN_MAX_MEMORY_SIZE..=MAX_MAX_MEMORY_SIZE).contains(&self.max_memory_size) {
            return Err(ConfigError::Invalid {
                key: "max-memory-size",
                reason: format!(
                    "{} bytes is outside 64KiB..=4GiB (a 32-bit linear memory)",
                    self.max_memory_size
                ),
            });
        }
        if self.max_request_header_size < MIN_REQUEST_HEADER_SIZE {
            return Err(ConfigError::Invalid {
                key: "max-request-header-size",
                reason: format!(
                    "{} bytes is below the HTTP/1 minimum of 8KiB",
                    self.max_request_header_size
                ),
            });
        }
        // Timeouts far beyond any sensible value would overflow deadline
        // arithmetic; a year is plenty.
        const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
        for (key, d) in [
            ("idle-instance-timeout", self.idle_instance_timeout),
            ("request-timeout", self.request_timeout),
            ("max-queue-wait", self.max_queue_wait),
            ("header-read-timeout", self.header_read_timeout),
            ("client-body-timeout", self.client_body_timeout),
            ("send-timeout", self.send_timeout),
            ("keepalive-timeout", self.keepalive_timeout),
        ] {
            if d > YEAR {
                return Err(ConfigError::Invalid {
                    key,
                    reason: "longer than a year".into(),
                });
            }
        }
        Ok(())
    }

    /// Effective per-client connection limit.
    pub fn connections_per_client(&self) -> u32 {
        self.max_connections_per_client
            .unwrap_or_else(|| per_client_share(self.max_concurrent_connections))
    }

    /// Effective per-client limit of requests in flight.
    pub fn requests_per_client(&self) -> u32 {
        self.max_requests_per_client.unwrap_or({
            let d = defaults::MAX_REQUESTS_PER_CLIENT;
            if self.max_concurrent_requests >= 4 * d {
                d
            } else {
                u32::MAX
            }
        })
    }

    /// Effective queue bound.
    pub fn queue_limit(&self) -> u32 {
        self.max_queued_requests
            .unwrap_or(self.max_concurrent_requests)
    }
}

/// The default share of `total` one client may hold: a quarter when that
/// is at least [`defaults::PER_CLIENT_FLOOR`], else no limit (`u32::MAX`).
pub fn per_client_share(total: u32) -> u32 {
    match total / defaults::PER_CLIENT_SHARE {
        share if share >= defaults::PER_CLIENT_FLOOR => share,
        _ => u32::MAX,
    }
}

/// A config file: the component, the listen addresses and the knobs.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    /// Path of the component; relative paths are relative to the file.
    #[serde(default)]
    pub component: Option<PathBuf>,
    /// Addresses to listen on (`HOST:PORT`, `[V6]:PORT` or `unix:/path`).
    #[serde(default)]
    pub listen: Vec<String>,
    /// Address of the Prometheus metrics endpoint.
    #[serde(default)]
    pub metrics_listen: Option<String>,
    /// How long running requests may take to finish on SIGTERM.
    #[serde(default, deserialize_with = "de::duration")]
    pub drain_timeout: Option<Duration>,
    /// On SIGTERM, how long to keep serving with /readyz at 503 before
    /// the listeners close.
    #[serde(default, deserialize_with = "de::duration")]
    pub shutdown_delay: Option<Duration>,
    /// With socket activation: exit after this long without connections.
    #[serde(default, deserialize_with = "de::positive_duration")]
    pub exit_idle_after: Option<Duration>,
    /// PEM certificate chain for TLS listeners (relative to the file).
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of the certificate (relative to the file).
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Names (LISTEN_FDNAMES) of inherited sockets that serve TLS.
    #[serde(default)]
    pub tls_sockets: Vec<String>,
    /// Names of inherited sockets that serve plain HTTP.
    #[serde(default)]
    pub plain_sockets: Vec<String>,
    /// One log line per request: on, off, stderr or a file.
    #[serde(default, deserialize_with = "de::access_log")]
    pub access_log: Option<AccessLogArg>,
    /// Bytes of access lines a thread gathers before writing them.
    #[serde(default, deserialize_with = "de::size")]
    pub access_log_buffer: Option<u64>,
    /// The longest an access line waits in a buffer.
    #[serde(default, deserialize_with = "de::positive_duration")]
    pub access_log_flush: Option<Duration>,
    /// wasi:config/store variables, as a table.
    #[serde(default)]
    pub config_vars: std::collections::BTreeMap<String, String>,
    /// W3C trace context: continue an incoming `traceparent`, carry it to
    /// the guest's outbound requests (default true).
    #[serde(default)]
    pub trace_context: Option<bool>,
    /// OpenTelemetry trace export: the `OTEL_*` variables' meanings.
    #[serde(default)]
    pub otel: crate::telemetry::trace::OtelFile,
    #[serde(flatten)]
    pub knobs: KnobArgs,
}

impl FileConfig {
    /// Reads and parses a TOML config file.
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|io| ConfigError::Read {
            path: path.to_path_buf(),
            io,
        })?;
        let mut cfg = FileConfig::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: Some(path.to_path_buf()),
                message,
            },
            other => other,
        })?;
        if let Some(dir) = path.parent() {
            let access_log = match &mut cfg.access_log {
                Some(AccessLogArg::File(p)) => Some(p),
                _ => None,
            };
            for p in [&mut cfg.component, &mut cfg.tls_cert, &mut cfg.tls_key]
                .into_iter()
                .flatten()
                .chain(access_log)
            {
                if p.is_relative() {
                    *p = dir.join(&*p);
                }
            }
        }

        Ok(cfg)
    }

    /// Parses TOML text.
    pub fn parse(text: &str) -> Result<FileConfig, ConfigError> {
        let fail = |message| ConfigError::Parse {
            path: None,
            message,
        };
        // Syntax first: toml knows where those are.
        let table: toml::Table = toml::from_str(text).map_err(|e| fail(located(text, &e)))?;
        let mut cfg = FileConfig::deserialize(table.clone()).map_err(|e| {
            // A bad value: through `flatten` serde forgets where it was, so
            // find the key that fails on its own.
            let culprit = table.iter().find(|(k, v)| {
                let mut one = toml::Table::new();
                one.insert(k.to_string(), (*v).clone());
                FileConfig::deserialize(one).is_err()
            });
            match culprit {
                Some((key, _)) => fail(format!(
                    "{}`{key}`: {}",
                    line_of_key(text, key)
                        .map(|n| format!("line {n}, "))
                        .unwrap_or_default(),
                    e.message()
                )),
                None => fail(e.message().to_string()),
            }
        })?;
        // The table's variables, then `config-var` entries (which win).
        let vars: Vec<String> = std::mem::take(&mut cfg.config_vars)
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        cfg.knobs.config_var = vars.into_iter().chain(cfg.knobs.config_var).collect();
        Ok(cfg)
    }
}

/// A TOML syntax error with its line: "line 3: message".
fn located(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            let start = span.start.min(text.len());
            let line = text[..start].matches('\n').count() + 1;
            format!("line {line}: {}", e.message())
        }
        None => e.message().to_string(),
    }
}

/// The line on which top-level `key` is set.
pub(crate) fn line_of_key(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            let rest = l
                .strip_prefix(key)
                .or_else(|| l.strip_prefix(&format!("\"{key}\"")));
            rest.is_some_and(|r| r.trim_start().starts_with('='))
        })
        .map(|i| i + 1)
}

/// The `access-log` knob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogArg {
    /// No access log.
    Off,
    /// The default place: `$LOGS_DIRECTORY/access.log` when systemd's
    /// `LogsDirectory=` set it, else stderr.
    On,
    /// Standard error (the journal under systemd).
    Stderr,
    /// A file, appended to.
    File(PathBuf),
}

impl AccessLogArg {
    pub fn parse(s: &str) -> Result<AccessLogArg, String> {
        Ok(match s {
            "on" | "true" | "yes" => AccessLogArg::On,
            "off" | "false" | "no" => AccessLogArg::Off,
            "stderr" => AccessLogArg::Stderr,
            "" => return Err("expected on, off, stderr or a file path".into()),
            p if p.contains('/') || p.ends_with(".log") => AccessLogArg::File(PathBuf::from(p)),
            _ => {
                return Err(format!(
                    "`{s}`: expected on, off, stderr or a file path (with a `/`, or ending in .log)"
                ));
            }
        })
    }
}

/// The first directory a systemd `*Directory=` setting passed in `var`
/// (`$CACHE_DIRECTORY`, `$LOGS_DIRECTORY`: colon-separated when it names
/// several), if it is set and not empty.
pub fn systemd_directory(var: &str) -> Option<PathBuf> {
    let dirs = std::env::var_os(var)?;
    let first = dirs.to_string_lossy().split(':').next()?.to_string();
    (!first.is_empty()).then(|| PathBuf::from(first))
}

/// serde helpers that route through the same parsers as the flags.
mod de {
    use crate::units;
    use serde::{Deserialize, Deserializer, de::Error};
    use std::time::Duration;

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumOrStr {
        Num(i64),
        Str(String),
    }

    fn text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        Ok(match NumOrStr::deserialize(d)? {
            NumOrStr::Num(n) => n.to_string(),
            NumOrStr::Str(s) => s,
        })
    }

    macro_rules! via {
        ($name:ident, $ty:ty, $parser:path) => {
            pub fn $name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<$ty>, D::Error> {
                $parser(&text(d)?).map(Some).map_err(D::Error::custom)
            }
        };
    }

    via!(duration, Duration, units::parse_duration);
    via!(positive_duration, Duration, units::parse_positive_duration);
    via!(size, u64, units::parse_size);
    via!(positive_size, u64, units::parse_positive_size);
    via!(count, u32, units::parse_count);
    via!(rate, u64, units::parse_rate);
    via!(
        memory_budget,
        crate::config::MemoryBudgetArg,
        crate::config::MemoryBudgetArg::parse
    );
    via!(positive_count, u32, units::parse_positive_count);

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum BoolOrStr {
        Bool(bool),
        Str(String),
    }

    pub fn access_log<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<crate::config::AccessLogArg>, D::Error> {
        use crate::config::AccessLogArg;
        match BoolOrStr::deserialize(d)? {
            BoolOrStr::Bool(true) => Ok(Some(AccessLogArg::On)),
            BoolOrStr::Bool(false) => Ok(Some(AccessLogArg::Off)),
            BoolOrStr::Str(s) => AccessLogArg::parse(&s).map(Some).map_err(D::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_keys_match_flags() {
        let f = FileConfig::parse(
            r#"
            component = "app.wasm"
            listen = ["127.0.0.1:9000"]
            max-instance-reuse-count = 8
            request-timeout = "5s"
            max-memory-size = "64MiB"
            memory-keep-resident = "2MiB"
            max-request-body-size = 1024
            env = ["A=1", "A=2", "B=x=y"]
            allow-outbound = ["example.com:443"]
            "#,
        )
        .unwrap();
        let k = f.knobs.resolve().unwrap();
        assert_eq!(k.max_instance_reuse_count, Some(8));
        assert_eq!(k.request_timeout, Duration::from_secs(5));
        assert_eq!(k.max_memory_size, 64 << 20);
        assert_eq!(k.memory_keep_resident, Some(2 << 20));
        assert_eq!(k.max_request_body_size, 1024);
        assert_eq!(
            k.env,
            vec![("A".into(), "2".into()), ("B".into(), "x=y".into())]
        );
        assert_eq!(
            k.allow_outbound[0],
            OutboundRule {
                host: "example.com".into(),
                port: Some(443)
            }
        );
    }

    #[test]
    fn bad_files_are_refused() {
        for (text, needle) in [
            ("no-such-knob = 1", "unknown field"),
            ("max-instance-reuse-count = 0", "at least 1"),
            ("max-instance-reuse-count = -2", "negative"),
            ("request-timeout = \"5\"", "needs a unit"),
            ("request-timeout = \"0s\"", "greater than zero"),
            ("max-memory-size = \"lots\"", "invalid size"),
            ("max-concurrent-requests = \"x\"", "invalid number"),
        ] {
            let err = FileConfig::parse(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
        let k = KnobArgs {
            max_memory_size: Some(8 << 30),
            ..Default::default()
        };
        assert!(
            k.resolve()
                .unwrap_err()
                .to_string()
                .contains("max-memory-size")
        );
        let k = KnobArgs {
            max_request_header_size: Some(1000),
            ..Default::default()
        };
        assert!(k.resolve().unwrap_err().to_string().contains("8KiB"));
    }

    #[test]
    fn file_errors_name_the_line_and_key() {
        let err = FileConfig::parse("request-timeout = \"5s\"\nmax-instance-reuse-count = 0\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "line 2, `max-instance-reuse-count`: must be at least 1, not 0"
        );
        let err = FileConfig::parse("\n\nno-such-knob = 1")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("line 3") && err.contains("no-such-knob"),
            "{err}"
        );
        let err = FileConfig::parse("x = [").unwrap_err().to_string();
        assert!(err.starts_with("line 1:"), "{err}");
    }

    #[test]
    fn flags_override_file() {
        let file = KnobArgs {
            max_concurrent_requests: Some(5),
            request_timeout: Some(Duration::from_secs(9)),
            ..Default::default()
        };
        let cli = KnobArgs {
            max_concurrent_requests: Some(7),
            ..Default::default()
        };
        let k = file.overlay(cli).resolve().unwrap();
        assert_eq!(k.max_concurrent_requests, 7);
        assert_eq!(k.request_timeout, Duration::from_secs(9));
        assert_eq!(k.queue_limit(), 7);
    }

    #[test]
    fn per_client_defaults() {
        assert_eq!(per_client_share(1000), 250);
        assert_eq!(per_client_share(256), 64);
        assert_eq!(per_client_share(255), u32::MAX);
        assert_eq!(per_client_share(1), u32::MAX);
        let k = KnobArgs::default().resolve().unwrap();
        assert_eq!(
            (k.connections_per_client(), k.requests_per_client()),
            (250, 64)
        );
        let bad = KnobArgs {
            max_concurrent_connections: Some(10),
            max_connections_per_client: Some(11),
            ..Default::default()
        };
        assert!(
            bad.resolve()
                .unwrap_err()
                .to_string()
                .contains("max-concurrent-connections")
        );
    }

    #[test]
    fn outbound_rules() {
        let r = OutboundRule::parse("Example.com").unwrap();
        assert!(r.allows("example.COM", 80) && r.allows("example.com", 8443));
        let r = OutboundRule::parse("127.0.0.1:8081").unwrap();
        assert!(r.allows("127.0.0.1", 8081) && !r.allows("127.0.0.1", 8082));
        let r = OutboundRule::parse("[::1]:80").unwrap();
        assert!(r.allows("[::1]", 80));
        assert!(OutboundRule::parse("host:0").is_err());
        assert!(OutboundRule::parse("host:http").is_err());
        assert!(OutboundRule::parse("").is_err());
        assert!(OutboundRule::parse("a/b").is_err());
    }
}
