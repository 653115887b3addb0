//! Library error types. The binary adds context with `anyhow` at its edges;
//! the C API maps each variant to a stable result code.

use std::path::PathBuf;

/// A bad knob, flag or config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid value for `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error("cannot read config file {}: {io}", path.display())]
    Read { path: PathBuf, io: std::io::Error },
    #[error("{}{message}", path.as_ref().map(|p| format!("invalid config file {}: ", p.display())).unwrap_or_default())]
    Parse {
        path: Option<PathBuf>,
        message: String,
    },
}

impl ConfigError {
    /// Adapter for `map_err` on a parser's `String` error.
    pub fn invalid(key: &'static str) -> impl Fn(String) -> ConfigError {
        move |reason| ConfigError::Invalid { key, reason }
    }
}

/// Why a component could not be loaded, compiled or linked.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    // The I/O error is part of the message, not a `source`: a chain
    // printed with `{:#}` would say it twice.
    #[error("cannot read component {}: {io}", path.display())]
    Read { path: PathBuf, io: std::io::Error },
    #[error(
        "{0}: this is a core WebAssembly module, not a component (wrap it with `wasm-tools component new`)"
    )]
    CoreModule(String),
    #[error("{0}: not a WebAssembly component (no `\\0asm` header)")]
    NotWasm(String),
    #[error("{what}: does not compile: {reason}")]
    Compile { what: String, reason: String },
    #[error(
        "{what}: implements neither `wasi:http/incoming-handler@0.2.x` (WASIp2) nor `wasi:http/handler@0.3.0` (WASIp3); it exports: {exports}"
    )]
    WrongWorld { what: String, exports: String },
    #[error("{what}: does not link: {reason}")]
    Link { what: String, reason: String },
    #[error("{what}: the first instance failed to start: {reason}")]
    Instantiate { what: String, reason: String },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot set up the engine: {0}")]
    Engine(String),
}
