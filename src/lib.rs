//! wasmpool: serve `wasi:http` WebAssembly components (WASIp2 and WASIp3)
//! from a pool of reused instances, with backpressure, hard timeouts,
//! limits and a compile cache.

pub mod admission;
pub mod cache;
pub mod capi;
pub mod cli;
pub mod component;
pub mod config;
mod direct;
pub mod error;
pub mod host;
pub mod logging;
pub mod metrics;
pub mod pool;
mod reuse;
pub mod server;
pub mod service;
mod spare;
pub mod stats;
pub mod units;

pub use component::{Source, World};
pub use config::{KnobArgs, Knobs};
pub use error::{ConfigError, LoadError};
pub use pool::{Pool, RequestError, ResponseBody};
