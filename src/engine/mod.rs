//! The engine: a loaded component and the instances that serve it.
//!
//! How a request flows through it (see [`Pool::handle`]):
//!
//! 1. [`admission`] bounds the requests running at once and queues the
//!    rest for a while (503 when the queue is full or the wait too long).
//! 2. [`pool`] dispatches the request. WASIp2 components run it on the
//!    caller's task ([`p2`]). WASIp3 ones go through wasmpool's dispatcher
//!    ([`p3`]): to a running instance that has room for one more, else to
//!    an idle instance whose event loop then runs on the caller's task,
//!    else to a new instance if [`spare`] agrees the live ones are too
//!    few. Idle instances of both wait in [`idle`]. Under `reuse = auto`
//!    [`reuse`] keeps what a retry on a fresh instance needs.
//! 3. The response head comes back within the request timeout (else 504
//!    and the instance is retired); the admission slot is held until the
//!    response body ends.
//!
//! Instances come from [`component`] (engine configuration, linker, world
//! detection) through the compile [`cache`]; each has a [`host`] state
//! that grants nothing by default. [`stats`] counts what happens.

pub mod admission;
pub mod budget;
pub mod cache;
pub mod component;
pub mod host;
mod idle;
mod p2;
mod p3;
pub mod pool;
pub mod retained;
mod reuse;
mod spare;
pub mod stats;

pub use admission::Rejection;
pub use component::{Source, World};
pub use pool::{Pool, RequestError, ResponseBody, ReuseProbe, Served, empty_body, get_root};
pub use stats::{Snapshot, Stats};
