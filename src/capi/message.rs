//! `wasmpool_request` (built by the host, consumed by a push) and
//! `wasmpool_response` (built by the engine, owned by the host).

use super::wasmpool_result;
use super::{
    Failure, boundary, boundary_ptr, boundary_void, bytes_arg, handle_mut, handle_ref, str_arg,
};
use bytes::Bytes;
use std::ffi::c_char;

/// An HTTP request being built. Create with `wasmpool_request_new`; it is
/// consumed by `wasmpool_handler_push` / `wasmpool_handler_call` (whatever
/// they return) or freed with `wasmpool_request_free`, never both. Not
/// thread-safe.
pub struct wasmpool_request {
    pub(crate) method: http::Method,
    pub(crate) uri: http::Uri,
    pub(crate) headers: http::HeaderMap,
    pub(crate) body: Bytes,
}

/// A complete HTTP response. Owned by whoever received it; free it with
/// `wasmpool_response_free`. Read-only, so it may be read from any thread.
pub struct wasmpool_response {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(Bytes, Bytes)>,
    pub(crate) body: Bytes,
}

/// A request with `method` (e.g. "GET", or any valid token) and `uri`, in
/// origin form ("/path?query") or absolute form ("http://host/path"). Both
/// strings are copied. Returns NULL if either is NULL or invalid (see
/// `wasmpool_last_error`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_request_new(
    method: *const c_char,
    uri: *const c_char,
) -> *mut wasmpool_request {
    boundary_ptr(|| {
        // SAFETY: see `str_arg`.
        let (m, u) = unsafe { (str_arg(method, "method")?, str_arg(uri, "uri")?) };
        let method = http::Method::from_bytes(m.as_bytes())
            .map_err(|_| Failure::invalid(format!("invalid method `{m}`")))?;
        let uri: http::Uri = u
            .parse()
            .map_err(|e| Failure::invalid(format!("invalid uri `{u}`: {e}")))?;
        if uri.path_and_query().is_none() && uri.scheme().is_none() {
            return Err(Failure::invalid(format!(
                "invalid uri `{u}`: expected /path or http://host/path"
            )));
        }
        Ok(Box::into_raw(Box::new(wasmpool_request {
            method,
            uri,
            headers: http::HeaderMap::new(),
            body: Bytes::new(),
        })))
    })
}

/// Adds a header (repeatable for the same name). `name` must be a valid
/// header name; `value` is `value_len` bytes (copied) without CR, LF or NUL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_request_add_header(
    req: *mut wasmpool_request,
    name: *const c_char,
    value: *const u8,
    value_len: usize,
) -> wasmpool_result {
    boundary(|| {
        // The handle first: a NULL request is WASMPOOL_NULL_ARGUMENT
        // whatever the other arguments are.
        // SAFETY: see `handle_mut`.
        let req = unsafe { handle_mut(req, "req") }?;
        // SAFETY: see `str_arg` and `bytes_arg`.
        let (n, v) = unsafe {
            (
                str_arg(name, "name")?,
                bytes_arg(value, value_len, "value")?,
            )
        };
        let name = http::HeaderName::from_bytes(n.as_bytes())
            .map_err(|_| Failure::invalid(format!("invalid header name `{n}`")))?;
        let value = http::HeaderValue::from_bytes(v)
            .map_err(|_| Failure::invalid(format!("invalid value for header `{n}`")))?;
        req.headers.append(name, value);
        Ok(())
    })
}

/// Sets the body to a copy of `len` bytes at `body` (NULL is fine when
/// `len` is 0); replaces any earlier body.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_request_set_body(
    req: *mut wasmpool_request,
    body: *const u8,
    len: usize,
) -> wasmpool_result {
    boundary(|| {
        // SAFETY: see `handle_mut`.
        let req = unsafe { handle_mut(req, "req") }?;
        // SAFETY: see `bytes_arg`.
        let b = unsafe { bytes_arg(body, len, "body") }?;
        req.body = Bytes::copy_from_slice(b);
        Ok(())
    })
}

/// Frees a request that was not pushed. NULL is ignored.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_request_free(req: *mut wasmpool_request) {
    boundary_void(|| {
        if !req.is_null() {
            // SAFETY: `req` came from `wasmpool_request_new` and is freed once.
            drop(unsafe { Box::from_raw(req) });
        }
    })
}

/// The status code; 0 if `resp` is NULL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_response_status(resp: *const wasmpool_response) -> u16 {
    // SAFETY: see `handle_ref`.
    unsafe { handle_ref(resp, "resp") }
        .map(|r| r.status)
        .unwrap_or(0)
}

/// Number of header fields (a name that repeats counts each time); 0 if
/// `resp` is NULL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_response_header_count(resp: *const wasmpool_response) -> usize {
    // SAFETY: see `handle_ref`.
    unsafe { handle_ref(resp, "resp") }
        .map(|r| r.headers.len())
        .unwrap_or(0)
}

/// Header `index` (from 0): its name and value as pointers into the
/// response (valid until it is freed) and their lengths; not
/// NUL-terminated. `WASMPOOL_INVALID_ARGUMENT` when `index` is out of range.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_response_header(
    resp: *const wasmpool_response,
    index: usize,
    name: *mut *const u8,
    name_len: *mut usize,
    value: *mut *const u8,
    value_len: *mut usize,
) -> wasmpool_result {
    boundary(|| {
        // SAFETY: see `handle_ref`.
        let r = unsafe { handle_ref(resp, "resp") }?;
        if name.is_null() || name_len.is_null() || value.is_null() || value_len.is_null() {
            return Err(Failure::null("an output pointer"));
        }
        let (n, v) = r.headers.get(index).ok_or_else(|| {
            Failure::invalid(format!(
                "header index {index} out of range ({} headers)",
                r.headers.len()
            ))
        })?;
        // SAFETY: all four outputs were checked for NULL above.
        unsafe {
            *name = n.as_ptr();
            *name_len = n.len();
            *value = v.as_ptr();
            *value_len = v.len();
        }
        Ok(())
    })
}

/// The body: a pointer into the response (valid until it is freed) and its
/// length in `*len`. Returns NULL with `*len` = 0 when the body is empty or
/// `resp` is NULL. `len` may not be NULL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_response_body(
    resp: *const wasmpool_response,
    len: *mut usize,
) -> *const u8 {
    let mut out: *const u8 = std::ptr::null();
    boundary(|| {
        if len.is_null() {
            return Err(Failure::null("len"));
        }
        // SAFETY: checked for NULL above.
        unsafe { *len = 0 };
        // SAFETY: see `handle_ref`.
        let r = unsafe { handle_ref(resp, "resp") }?;
        if !r.body.is_empty() {
            out = r.body.as_ptr();
            // SAFETY: checked for NULL above.
            unsafe { *len = r.body.len() };
        }
        Ok(())
    });
    out
}

/// Frees a response. NULL is ignored.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_response_free(resp: *mut wasmpool_response) {
    boundary_void(|| {
        if !resp.is_null() {
            // SAFETY: `resp` was handed out by wasmpool and is freed once.
            drop(unsafe { Box::from_raw(resp) });
        }
    })
}
