//! The Rust side of the C API (`include/wasmpool.h`, generated from this
//! module by cbindgen in `build.rs`).
//!
//! Conventions, after rustls-ffi: each opaque handle is one Rust type with
//! one ownership rule; every exported function checks its pointers
//! (`WASMPOOL_NULL_ARGUMENT`) and catches panics (`WASMPOOL_PANIC`); the
//! result codes are stable and never renumbered; the reason for the last
//! failure on a thread is kept for `wasmpool_last_error`.
#![allow(non_camel_case_types, clippy::missing_safety_doc)]

mod config;
mod handler;
mod inline;
mod log;
mod message;
mod stream;

pub use config::*;
pub use handler::*;
pub use log::*;
pub use message::*;
pub use stream::*;

use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};

/// Result of a wasmpool call. The numbers are stable: new codes are added
/// at the end, existing ones are never renumbered.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum wasmpool_result {
    /// Success.
    WASMPOOL_OK = 0,
    /// A required pointer argument was NULL.
    WASMPOOL_NULL_ARGUMENT = 1,
    /// An argument had an invalid value (a zero where that makes no sense,
    /// an unparsable method, URI or header, a path that is not UTF-8 ...).
    WASMPOOL_INVALID_ARGUMENT = 2,
    /// The component could not be loaded, compiled, linked or instantiated.
    WASMPOOL_COMPONENT_ERROR = 3,
    /// Backpressure: no capacity within the queue limits (HTTP 503).
    WASMPOOL_OVERLOADED = 4,
    /// The guest did not respond within the request timeout (HTTP 504).
    WASMPOOL_TIMEOUT = 5,
    /// The guest trapped (HTTP 500); its instance was discarded.
    WASMPOOL_TRAP = 6,
    /// The handler is shutting down and takes no new requests.
    WASMPOOL_SHUTTING_DOWN = 7,
    /// A panic inside wasmpool was caught at the API boundary.
    WASMPOOL_PANIC = 8,
    /// An I/O error, such as a component file that cannot be read.
    WASMPOOL_IO = 9,
    /// The guest failed without trapping (for example it returned an
    /// error code or never set a response) (HTTP 500).
    WASMPOOL_GUEST_ERROR = 10,
    /// The call is not allowed here, for example `wasmpool_handler_free`
    /// or `wasmpool_handler_call` from inside a completion callback, or not
    /// now: a body written after its end, a request cancelled twice.
    WASMPOOL_MISUSE = 11,
    /// The request was cancelled (`wasmpool_cancel_request`), or its stream ended
    /// because the other side went away.
    WASMPOOL_CANCELLED = 12,
    /// A stream cannot go on now (a full body buffer to write to, an empty
    /// one to read from); its ready callback says when to try again.
    WASMPOOL_WOULD_BLOCK = 13,
    /// A body is larger than its limit (`max_response_size` for buffered
    /// responses, `max_request_body_size` for requests).
    WASMPOOL_TOO_LARGE = 14,
}

use wasmpool_result::*;

/// A failed call: its code and the message for `wasmpool_last_error`.
pub(crate) struct Failure {
    pub code: wasmpool_result,
    pub message: String,
}

impl Failure {
    pub fn new(code: wasmpool_result, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }
    pub fn null(what: &str) -> Failure {
        Failure::new(WASMPOOL_NULL_ARGUMENT, format!("{what} is NULL"))
    }
    pub fn invalid(message: impl Into<String>) -> Failure {
        Failure::new(WASMPOOL_INVALID_ARGUMENT, message)
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

pub(crate) fn set_last_error(message: &str) {
    let c = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Runs `f` behind the panic boundary, turning its outcome into a code.
pub(crate) fn boundary(f: impl FnOnce() -> Result<(), Failure>) -> wasmpool_result {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => WASMPOOL_OK,
        Ok(Err(fail)) => {
            set_last_error(&fail.message);
            fail.code
        }
        Err(p) => {
            set_last_error(&format!("panic in wasmpool: {}", panic_message(&*p)));
            WASMPOOL_PANIC
        }
    }
}

/// Like [`boundary`] for functions that return a pointer (NULL on failure).
pub(crate) fn boundary_ptr<T>(f: impl FnOnce() -> Result<*mut T, Failure>) -> *mut T {
    let mut out = std::ptr::null_mut();
    boundary(|| {
        out = f()?;
        Ok(())
    });
    out
}

/// Like [`boundary`] for functions without a result (destructors).
pub(crate) fn boundary_void(f: impl FnOnce()) {
    boundary(|| {
        f();
        Ok(())
    });
}

/// Borrows a C string as UTF-8.
pub(crate) unsafe fn str_arg<'a>(p: *const c_char, what: &str) -> Result<&'a str, Failure> {
    if p.is_null() {
        return Err(Failure::null(what));
    }
    // SAFETY: the caller passes a NUL-terminated string (documented).
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|_| Failure::invalid(format!("{what} is not valid UTF-8")))
}

/// Borrows `len` bytes at `p` (NULL is fine when `len` is 0).
pub(crate) unsafe fn bytes_arg<'a>(
    p: *const u8,
    len: usize,
    what: &str,
) -> Result<&'a [u8], Failure> {
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(Failure::null(what));
    }
    // SAFETY: the caller passes `len` readable bytes (documented).
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// Borrows a handle.
pub(crate) unsafe fn handle_ref<'a, T>(p: *const T, what: &str) -> Result<&'a T, Failure> {
    // SAFETY: a non-NULL handle points to a live object of its type (documented).
    unsafe { p.as_ref() }.ok_or_else(|| Failure::null(what))
}

/// Borrows a handle mutably.
pub(crate) unsafe fn handle_mut<'a, T>(p: *mut T, what: &str) -> Result<&'a mut T, Failure> {
    // SAFETY: as for `handle_ref`, and no other reference is alive (documented).
    unsafe { p.as_mut() }.ok_or_else(|| Failure::null(what))
}

/// The library version, e.g. "0.1.0". The string is static.
#[unsafe(no_mangle)]
pub extern "C" fn wasmpool_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// A static, human-readable name for a result code (a `wasmpool_result`
/// value); unknown codes give "unknown result".
#[unsafe(no_mangle)]
pub extern "C" fn wasmpool_result_str(result: u32) -> *const c_char {
    let s: &'static str = match result {
        0 => "ok\0",
        1 => "null argument\0",
        2 => "invalid argument\0",
        3 => "component error\0",
        4 => "overloaded\0",
        5 => "timeout\0",
        6 => "guest trapped\0",
        7 => "shutting down\0",
        8 => "panic\0",
        9 => "I/O error\0",
        10 => "guest error\0",
        11 => "misuse\0",
        12 => "cancelled\0",
        13 => "would block\0",
        14 => "too large\0",
        _ => "unknown result\0",
    };
    s.as_ptr().cast()
}

/// The message of the last failed call on this thread (for example why a
/// component did not link), or "" if none failed yet. The pointer stays
/// valid until the next failing wasmpool call on the same thread.
#[unsafe(no_mangle)]
pub extern "C" fn wasmpool_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}
