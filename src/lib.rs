//! wasmpool: serve `wasi:http` WebAssembly components (WASIp2 and WASIp3)
//! from a pool of reused instances, with backpressure, hard timeouts,
//! limits and a compile cache.
//!
//! - [`engine`]: the component, its pool of instances, admission, stats.
//! - [`http`]: the HTTP front (listeners, connection limits, timeouts).
//! - [`service`]: `wasmpool serve` as a managed service (systemd).
//! - [`telemetry`]: the log, the access log and the metrics.
//! - [`capi`]: the C API.
//! - [`config`], [`units`], [`error`]: knobs shared by all of them.

pub mod capi;
pub mod cli;
pub mod config;
pub mod engine;
pub mod error;
pub mod http;
pub mod service;
pub mod telemetry;
pub mod units;

pub use config::{KnobArgs, Knobs};
pub use engine::{Pool, RequestError, ResponseBody, Source, World};
pub use error::{ConfigError, LoadError};
