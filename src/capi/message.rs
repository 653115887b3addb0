//! `wasmpool_request` (built by the host, consumed by a push) and
//! `wasmpool_response` (built by the engine, owned by the host).

use super::stream::{
    CancelState, Pipe, STREAM_BUFFER, StreamBody, wasmpool_body_writer, wasmpool_cancel,
};
use super::wasmpool_result;
use super::{
    Failure, boundary, boundary_ptr, boundary_void, bytes_arg, handle_mut, handle_ref, str_arg,
};
use bytes::Bytes;
use std::ffi::{c_char, c_void};
use std::sync::{Arc, Mutex, OnceLock};

/// An HTTP request being built. Create with `wasmpool_request_new`; it is
/// consumed by `wasmpool_handler_push` / `wasmpool_handler_call` (whatever
/// they return) or freed with `wasmpool_request_free`, never both. Not
/// thread-safe.
pub struct wasmpool_request {
    pub(crate) method: http::Method,
    pub(crate) uri: http::Uri,
    pub(crate) headers: http::HeaderMap,
    pub(crate) body: Bytes,
    /// The body the host writes after pushing (`wasmpool_request_stream_body`).
    pub(crate) stream: Option<Arc<Pipe>>,
    /// Shared with the request's cancel handles.
    pub(crate) cancel: Option<Arc<CancelState>>,
}

/// An HTTP response: its head, and a body that is either complete
/// (`wasmpool_handler_push`, `wasmpool_handler_call`) or streams
/// (`wasmpool_handler_push_streaming`). Owned by whoever received it; free
/// it with `wasmpool_response_free` (which stops a body still streaming).
/// The head and a complete body may be read from any thread; reading a
/// body (`wasmpool_response_read`) from one thread at a time.
pub struct wasmpool_response {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(Bytes, Bytes)>,
    pub(crate) body: ResponseBody,
    /// Trailers, once the body ended.
    pub(crate) trailers: OnceLock<Vec<(Bytes, Bytes)>>,
    /// The instance that answered.
    pub(crate) served: Option<crate::engine::pool::Served>,
}

/// A response body: complete, or streaming from the guest.
pub(crate) enum ResponseBody {
    Full {
        bytes: Bytes,
        /// How much `wasmpool_response_read` has handed out.
        read: Mutex<usize>,
    },
    Stream(StreamBody),
}

impl wasmpool_response {
    pub(crate) fn full(
        status: u16,
        headers: Vec<(Bytes, Bytes)>,
        body: Bytes,
        trailers: Vec<(Bytes, Bytes)>,
    ) -> wasmpool_response {
        wasmpool_response {
            status,
            headers,
            body: ResponseBody::Full {
                bytes: body,
                read: Mutex::new(0),
            },
            trailers: OnceLock::from(trailers),
            served: None,
        }
    }

    /// The trailers, if the body ended.
    fn trailers(&self) -> Option<&Vec<(Bytes, Bytes)>> {
        if let Some(t) = self.trailers.get() {
            return Some(t);
        }
        match &self.body {
            ResponseBody::Stream(s) => s.trailers().map(|t| self.trailers.get_or_init(|| t)),
            ResponseBody::Full { .. } => None,
        }
    }
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
            stream: None,
            cancel: None,
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
        if req.stream.is_some() {
            return Err(Failure::new(
                wasmpool_result::WASMPOOL_MISUSE,
                "the body streams (wasmpool_request_stream_body): write it with the body writer",
            ));
        }
        req.body = Bytes::copy_from_slice(b);
        Ok(())
    })
}

/// Makes the body a stream that the host writes after pushing the request,
/// chunk by chunk and from any thread, with the writer put in `*out` (the
/// host owns it: `wasmpool_body_writer_free`). The engine buffers at most
/// 256 KiB of it; past that, writes say `WASMPOOL_WOULD_BLOCK` until the
/// guest has read on. Only once per request, and not with
/// `wasmpool_request_set_body` (`WASMPOOL_MISUSE`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_request_stream_body(
    req: *mut wasmpool_request,
    out: *mut *mut wasmpool_body_writer,
) -> wasmpool_result {
    boundary(|| {
        // SAFETY: see `handle_mut`.
        let req = unsafe { handle_mut(req, "req") }?;
        if out.is_null() {
            return Err(Failure::null("out"));
        }
        if req.stream.is_some() || !req.body.is_empty() {
            return Err(Failure::new(
                wasmpool_result::WASMPOOL_MISUSE,
                "the request already has a body",
            ));
        }
        let pipe = Pipe::new(STREAM_BUFFER);
        req.stream = Some(pipe.clone());
        // SAFETY: checked for NULL above.
        unsafe { *out = Box::into_raw(Box::new(wasmpool_body_writer::new(pipe))) };
        Ok(())
    })
}

/// A handle that cancels this request once it is pushed (see
/// `wasmpool_cancel_request`); the host owns it and frees it with
/// `wasmpool_cancel_free`. NULL if `req` is NULL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_request_cancel_handle(
    req: *mut wasmpool_request,
) -> *mut wasmpool_cancel {
    boundary_ptr(|| {
        // SAFETY: see `handle_mut`.
        let req = unsafe { handle_mut(req, "req") }?;
        let state = req.cancel.get_or_insert_with(Arc::default).clone();
        Ok(Box::into_raw(Box::new(wasmpool_cancel { state })))
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

/// The id of the component instance that produced the response: ids
/// count up from 1 for each component a handler loads (a reload starts
/// again), so two responses with one id from one load came from one
/// instance. 0 if `resp` is NULL or did not come from an instance.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_response_instance_id(resp: *const wasmpool_response) -> u64 {
    served(resp).map_or(0, |s| s.instance)
}

/// Whether the instance that produced the response had served a request
/// before this one (it was reused); false if `resp` is NULL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_response_reused(resp: *const wasmpool_response) -> bool {
    served(resp).is_some_and(|s| s.reused)
}

/// Which instance answered `resp`; None (and the last error set) for NULL.
fn served(resp: *const wasmpool_response) -> Option<crate::engine::pool::Served> {
    let mut served = None;
    boundary(|| {
        // SAFETY: see `handle_ref`.
        served = unsafe { handle_ref(resp, "resp") }?.served;
        Ok(())
    });
    served
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
        // SAFETY: the outputs are NULL or writable (documented).
        unsafe {
            field_at(
                &r.headers, index, "header", name, name_len, value, value_len,
            )
        }
    })
}

/// Field `index` of `fields` into the four outputs (checked for NULL),
/// as pointers into the response; `what` names the list in errors.
///
/// # Safety
/// Each output pointer is NULL or valid for a write.
unsafe fn field_at(
    fields: &[(Bytes, Bytes)],
    index: usize,
    what: &str,
    name: *mut *const u8,
    name_len: *mut usize,
    value: *mut *const u8,
    value_len: *mut usize,
) -> Result<(), Failure> {
    if name.is_null() || name_len.is_null() || value.is_null() || value_len.is_null() {
        return Err(Failure::null("an output pointer"));
    }
    let (n, v) = fields.get(index).ok_or_else(|| {
        Failure::invalid(format!(
            "{what} index {index} out of range ({} {what}s)",
            fields.len()
        ))
    })?;
    // SAFETY: all four outputs were checked for NULL above and are valid
    // for writes (the caller's contract).
    unsafe {
        *name = n.as_ptr();
        *name_len = n.len();
        *value = v.as_ptr();
        *value_len = v.len();
    }
    Ok(())
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
        match &r.body {
            ResponseBody::Full { bytes, .. } => {
                if !bytes.is_empty() {
                    out = bytes.as_ptr();
                    // SAFETY: checked for NULL above.
                    unsafe { *len = bytes.len() };
                }
            }
            ResponseBody::Stream(_) => {
                return Err(Failure::new(
                    wasmpool_result::WASMPOOL_MISUSE,
                    "the body streams: read it with wasmpool_response_read",
                ));
            }
        }
        Ok(())
    });
    out
}

/// Reads the next bytes of the body into `buf` (at most `cap`); `*n` says
/// how many. `WASMPOOL_OK` with `*n` > 0: data; with `*n` = 0: the end (the
/// trailers are readable now). `WASMPOOL_WOULD_BLOCK`: nothing yet; the
/// ready callback (`wasmpool_response_set_ready_callback`) runs when there
/// is. Other codes: the body failed (`WASMPOOL_CANCELLED`,
/// `WASMPOOL_GUEST_ERROR`, `WASMPOOL_SHUTTING_DOWN` once the handler is
/// freed; see `wasmpool_last_error`). Works for complete bodies too. The
/// guest writes only as fast as the host reads: a slow reader makes the
/// guest wait, not the engine buffer (at most 256 KiB).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_response_read(
    resp: *mut wasmpool_response,
    buf: *mut u8,
    cap: usize,
    n: *mut usize,
) -> wasmpool_result {
    boundary(|| {
        if n.is_null() {
            return Err(Failure::null("n"));
        }
        // SAFETY: checked for NULL above.
        unsafe { *n = 0 };
        // SAFETY: see `handle_ref`.
        let r = unsafe { handle_ref(resp, "resp") }?;
        if cap > 0 && buf.is_null() {
            return Err(Failure::null("buf"));
        }
        let out: &mut [u8] = if cap == 0 {
            &mut []
        } else {
            // SAFETY: the host passes `cap` writable bytes (documented).
            unsafe { std::slice::from_raw_parts_mut(buf, cap) }
        };
        let got = match &r.body {
            ResponseBody::Full { bytes, read } => {
                let mut pos = read.lock().unwrap_or_else(|e| e.into_inner());
                let take = (bytes.len() - *pos).min(out.len());
                out[..take].copy_from_slice(&bytes[*pos..*pos + take]);
                *pos += take;
                take
            }
            ResponseBody::Stream(s) => s.read(out)?,
        };
        // SAFETY: checked for NULL above.
        unsafe { *n = got };
        Ok(())
    })
}

/// Sets the callback that runs when a streamed body has more to read (or
/// ended) after `wasmpool_response_read` said `WASMPOOL_WOULD_BLOCK` (see
/// `wasmpool_ready_callback`). A complete body never needs it.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_response_set_ready_callback(
    resp: *mut wasmpool_response,
    cb: super::stream::wasmpool_ready_callback,
    userdata: *mut c_void,
) -> wasmpool_result {
    boundary(|| {
        // SAFETY: see `handle_ref`.
        let r = unsafe { handle_ref(resp, "resp") }?;
        let cb = cb.ok_or_else(|| Failure::null("cb"))?;
        if let ResponseBody::Stream(s) = &r.body {
            s.set_ready_callback(cb, userdata);
        }
        Ok(())
    })
}

/// Number of trailer fields; 0 until the body ended (or if `resp` is
/// NULL).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_response_trailer_count(resp: *const wasmpool_response) -> usize {
    // SAFETY: see `handle_ref`.
    unsafe { handle_ref(resp, "resp") }
        .ok()
        .and_then(|r| r.trailers().map(Vec::len))
        .unwrap_or(0)
}

/// Trailer `index` (from 0), once the body ended: pointers into the
/// response (valid until it is freed) and lengths, as for headers.
/// `WASMPOOL_INVALID_ARGUMENT` when `index` is out of range,
/// `WASMPOOL_MISUSE` before the body ended.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmpool_response_trailer(
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
        let t = r.trailers().ok_or_else(|| {
            Failure::new(
                wasmpool_result::WASMPOOL_MISUSE,
                "the body has not ended: no trailers yet",
            )
        })?;
        // SAFETY: the outputs are NULL or writable (documented).
        unsafe { field_at(t, index, "trailer", name, name_len, value, value_len) }
    })
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
