//! The C API's request side, through its exported functions: the request
//! builder (any method, URI, header and body bytes) and the streaming
//! calls in any order (stream a body, write, add trailers, finish, abort,
//! cancel, push, read a streamed response, free), against a live handler
//! serving the WASIp2 and WASIp3 suite guests. Whatever the order, every
//! call returns a code and never crashes, leaks or panics across the
//! boundary (run under AddressSanitizer); a pushed request's callback runs
//! exactly once and a refused one's never; misuse in the wrong state (a
//! write or trailer after the end, a second end, a second cancel) is
//! `WASMPOOL_MISUSE`.
#![no_main]
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use std::ffi::{CString, c_void};
use std::path::Path;
use std::ptr::null_mut;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;
use wasmpool::capi::*;
use wasmpool_result::*;

#[derive(Arbitrary, Debug)]
struct Input {
    method: Vec<u8>,
    uri: Vec<u8>,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    body: Vec<u8>,
    free_unpushed: bool,
    /// Which guest a push goes to: WASIp3 or WASIp2.
    p3: bool,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    StreamBody,
    SetBody(Vec<u8>),
    CancelHandle,
    /// A request for a known route of the suite guests instead of the
    /// fuzzed one (so pushes reach a guest).
    Route(u8),
    Push {
        streaming: bool,
    },
    Write(Vec<u8>),
    WriteNull(u8),
    AddTrailer(Vec<u8>, Vec<u8>),
    WriterReady,
    Finish,
    Abort,
    FreeWriter,
    Cancel,
    FreeCancel,
    Wait,
    Read(u16),
    ResponseReady,
    Trailers,
    FreeResponse,
}

const ROUTES: &[(&str, &str)] = &[
    ("POST", "/echo"),
    ("GET", "/"),
    ("POST", "/echo?x=1"),
    ("PUT", "/echo"),
    ("GET", "/missing"),
];

fn cstring(mut b: Vec<u8>) -> CString {
    b.retain(|c| *c != 0);
    CString::new(b).expect("no NUL left")
}

struct Handler(*mut wasmpool_handler);
// SAFETY: handlers are thread-safe (documented in wasmpool.h).
unsafe impl Send for Handler {}
unsafe impl Sync for Handler {}

fn component(wat: &str, world: &str) -> Vec<u8> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut module = wat::parse_file(root.join("tests/guests").join(wat)).expect("suite WAT");
    let mut resolve = wit_parser::Resolve::default();
    let (pkg, _) = resolve
        .push_dir(root.join("tests/guests/wit").join(world))
        .expect("suite WIT");
    let world = resolve.select_world(&[pkg], Some(world)).expect("world");
    wit_component::embed_component_metadata(
        &mut module,
        &resolve,
        world,
        wit_component::StringEncoding::UTF8,
    )
    .expect("metadata");
    wit_component::ComponentEncoder::default()
        .module(&module)
        .expect("module")
        .validate(true)
        .encode()
        .expect("component")
}

/// One handler per guest for the whole run: making one per input would
/// fuzz the compiler, not the API.
fn handler(p3: bool) -> *mut wasmpool_handler {
    static P2: OnceLock<Handler> = OnceLock::new();
    static P3: OnceLock<Handler> = OnceLock::new();
    let (cell, wat, world) = if p3 {
        (&P3, "p3_suite.wat", "p3")
    } else {
        (&P2, "p2_suite.wat", "p2")
    };
    cell.get_or_init(|| {
        let bytes = component(wat, world);
        // SAFETY: valid config and bytes; the handler lives for the run.
        unsafe {
            let cfg = wasmpool_config_new();
            assert_eq!(
                wasmpool_config_set_request_timeout_ms(cfg, 2_000),
                WASMPOOL_OK
            );
            assert_eq!(wasmpool_config_set_no_cache(cfg, true), WASMPOOL_OK);
            assert_eq!(
                wasmpool_config_set_max_response_size(cfg, 1 << 20),
                WASMPOOL_OK
            );
            let mut h = null_mut();
            let r = wasmpool_handler_new_from_bytes(cfg, bytes.as_ptr(), bytes.len(), &mut h);
            assert_eq!(r, WASMPOOL_OK, "handler: {r:?}");
            wasmpool_config_free(cfg);
            Handler(h)
        }
    })
    .0
}

/// Where the callback of one pushed request reports.
#[derive(Default)]
struct Slot {
    done: Mutex<(u32, Option<wasmpool_result>, usize)>,
    cv: Condvar,
}

unsafe extern "C" fn on_response(
    ud: *mut c_void,
    r: wasmpool_result,
    resp: *mut wasmpool_response,
) {
    // SAFETY: `ud` is the Arc the push handed over; taking it back here a
    // second time would be a double free that ASan reports.
    let slot = unsafe { Arc::from_raw(ud as *const Slot) };
    let mut d = slot.done.lock().unwrap();
    d.0 += 1;
    assert_eq!(d.0, 1, "a callback ran twice");
    assert_eq!(
        r == WASMPOOL_OK,
        !resp.is_null(),
        "a response comes with OK only"
    );
    d.1 = Some(r);
    d.2 = resp as usize;
    slot.cv.notify_all();
}

unsafe extern "C" fn ready(_: *mut c_void) {}

fn wait(slot: &Slot, t: Duration) -> bool {
    let d = slot.done.lock().unwrap();
    let (d, _) = slot.cv.wait_timeout_while(d, t, |d| d.0 == 0).unwrap();
    d.0 > 0
}

fn ok_or(r: wasmpool_result, allowed: &[wasmpool_result]) {
    assert!(r == WASMPOOL_OK || allowed.contains(&r), "unexpected {r:?}");
}

fuzz_target!(
    // The handlers (engine threads, runtime, instances) are made once,
    // before the first input.
    init: {
        handler(false);
        handler(true);
    },
    |input: Input| {
    let method = cstring(input.method);
    let uri = cstring(input.uri);
    // SAFETY: valid NUL-terminated strings; every handle is used only
    // while alive and freed once.
    unsafe {
        let mut req = wasmpool_request_new(method.as_ptr(), uri.as_ptr());
        for (name, value) in &input.headers {
            let name = cstring(name.clone());
            let r = wasmpool_request_add_header(req, name.as_ptr(), value.as_ptr(), value.len());
            if req.is_null() {
                assert_eq!(r, WASMPOOL_NULL_ARGUMENT);
            }
        }
        let r = wasmpool_request_set_body(req, input.body.as_ptr(), input.body.len());
        if !req.is_null() {
            assert_eq!(r, WASMPOOL_OK);
        }

        let mut writer: *mut wasmpool_body_writer = null_mut();
        let mut writer_ended = false;
        let mut cancel: *mut wasmpool_cancel = null_mut();
        let mut cancelled = false;
        let mut slot: Option<Arc<Slot>> = None;
        let mut resp: *mut wasmpool_response = null_mut();
        let mut buf = vec![0u8; 1 << 16];
        for op in input.ops.into_iter().take(64) {
            match op {
                Op::Route(i) => {
                    if !req.is_null() {
                        wasmpool_request_free(req);
                    }
                    let (m, u) = ROUTES[i as usize % ROUTES.len()];
                    let (m, u) = (CString::new(m).unwrap(), CString::new(u).unwrap());
                    req = wasmpool_request_new(m.as_ptr(), u.as_ptr());
                    assert!(!req.is_null());
                }
                Op::StreamBody => {
                    let mut w = null_mut();
                    let r = wasmpool_request_stream_body(req, &mut w);
                    if req.is_null() {
                        assert_eq!(r, WASMPOOL_NULL_ARGUMENT);
                    } else if writer.is_null() && r == WASMPOOL_OK {
                        writer = w;
                        writer_ended = false;
                    } else {
                        // Once per request, and not after set_body.
                        ok_or(r, &[WASMPOOL_MISUSE]);
                        if r == WASMPOOL_OK {
                            wasmpool_body_writer_free(w);
                        }
                    }
                }
                Op::SetBody(b) => {
                    let r = wasmpool_request_set_body(req, b.as_ptr(), b.len());
                    ok_or(r, &[WASMPOOL_NULL_ARGUMENT, WASMPOOL_MISUSE]);
                }
                Op::CancelHandle => {
                    let c = wasmpool_request_cancel_handle(req);
                    assert_eq!(c.is_null(), req.is_null());
                    if cancel.is_null() {
                        cancel = c;
                    } else {
                        wasmpool_cancel_free(c);
                    }
                }
                Op::Push { streaming } => {
                    if slot.is_some() {
                        // One request in flight per input.
                        continue;
                    }
                    let h = handler(input.p3);
                    let s = Arc::new(Slot::default());
                    let ud = Arc::into_raw(s.clone()) as *mut c_void;
                    let r = if streaming {
                        wasmpool_handler_push_streaming(h, req, Some(on_response), ud)
                    } else {
                        wasmpool_handler_push(h, req, Some(on_response), ud)
                    };
                    // Push always takes the request.
                    let was_null = req.is_null();
                    req = null_mut();
                    if r == WASMPOOL_OK {
                        assert!(!was_null);
                        slot = Some(s);
                    } else {
                        if was_null {
                            assert_eq!(r, WASMPOOL_NULL_ARGUMENT);
                        }
                        // Refused: the callback never runs; its Arc is ours.
                        drop(Arc::from_raw(ud as *const Slot));
                        assert_eq!(s.done.lock().unwrap().0, 0);
                    }
                }
                Op::Write(data) => {
                    let r = wasmpool_body_writer_write(writer, data.as_ptr(), data.len());
                    if writer.is_null() {
                        assert_eq!(r, WASMPOOL_NULL_ARGUMENT);
                    } else if writer_ended {
                        assert_eq!(r, WASMPOOL_MISUSE);
                    } else {
                        ok_or(r, &[WASMPOOL_WOULD_BLOCK, WASMPOOL_CANCELLED, WASMPOOL_GUEST_ERROR, WASMPOOL_TIMEOUT, WASMPOOL_TRAP, WASMPOOL_TOO_LARGE, WASMPOOL_SHUTTING_DOWN]);
                    }
                }
                Op::WriteNull(len) => {
                    let r = wasmpool_body_writer_write(writer, std::ptr::null(), len as usize);
                    if writer.is_null() || len > 0 {
                        assert_eq!(r, WASMPOOL_NULL_ARGUMENT);
                    }
                }
                Op::AddTrailer(n, v) => {
                    let n = cstring(n);
                    let r = wasmpool_body_writer_add_trailer(writer, n.as_ptr(), v.as_ptr(), v.len());
                    if writer.is_null() {
                        assert_eq!(r, WASMPOOL_NULL_ARGUMENT);
                    } else if writer_ended && r != WASMPOOL_INVALID_ARGUMENT {
                        assert_eq!(r, WASMPOOL_MISUSE);
                    }
                }
                Op::WriterReady => {
                    let r = wasmpool_body_writer_set_ready_callback(writer, Some(ready), null_mut());
                    assert_eq!(r == WASMPOOL_OK, !writer.is_null());
                }
                Op::Finish | Op::Abort => {
                    let r = if matches!(op, Op::Finish) {
                        wasmpool_body_writer_finish(writer)
                    } else {
                        wasmpool_body_writer_abort(writer)
                    };
                    if writer.is_null() {
                        assert_eq!(r, WASMPOOL_NULL_ARGUMENT);
                    } else if writer_ended {
                        assert_eq!(r, WASMPOOL_MISUSE, "a second end");
                    } else {
                        assert_eq!(r, WASMPOOL_OK);
                        writer_ended = true;
                    }
                }
                Op::FreeWriter => {
                    wasmpool_body_writer_free(writer);
                    writer = null_mut();
                }
                Op::Cancel => {
                    let r = wasmpool_cancel_request(cancel);
                    if cancel.is_null() {
                        assert_eq!(r, WASMPOOL_NULL_ARGUMENT);
                    } else if cancelled {
                        assert_eq!(r, WASMPOOL_MISUSE, "a second cancel");
                    } else {
                        ok_or(r, &[WASMPOOL_MISUSE]);
                        cancelled = true;
                    }
                }
                Op::FreeCancel => {
                    wasmpool_cancel_free(cancel);
                    cancel = null_mut();
                    cancelled = false;
                }
                Op::Wait => {
                    if let Some(s) = &slot {
                        wait(s, Duration::from_millis(50));
                        let d = s.done.lock().unwrap();
                        if d.0 == 1 && resp.is_null() && d.2 != 0 {
                            resp = d.2 as *mut wasmpool_response;
                        }
                    }
                }
                Op::Read(cap) => {
                    let mut n = usize::MAX;
                    let cap = (cap as usize).min(buf.len());
                    let r = wasmpool_response_read(resp, buf.as_mut_ptr(), cap, &mut n);
                    if resp.is_null() {
                        assert_eq!(r, WASMPOOL_NULL_ARGUMENT);
                    } else if r == WASMPOOL_OK {
                        assert!(n <= cap);
                    }
                }
                Op::ResponseReady => {
                    let r = wasmpool_response_set_ready_callback(resp, Some(ready), null_mut());
                    assert_eq!(r == WASMPOOL_OK, !resp.is_null());
                }
                Op::Trailers => {
                    let count = wasmpool_response_trailer_count(resp);
                    for i in 0..=count {
                        let (mut n, mut nl, mut v, mut vl) = (std::ptr::null(), 0, std::ptr::null(), 0);
                        let r = wasmpool_response_trailer(resp, i, &mut n, &mut nl, &mut v, &mut vl);
                        assert_eq!(r == WASMPOOL_OK, i < count);
                    }
                }
                Op::FreeResponse => {
                    wasmpool_response_free(resp);
                    resp = null_mut();
                    if let Some(s) = &slot {
                        // Taken: do not pick it up again.
                        s.done.lock().unwrap().2 = 0;
                    }
                }
            }
        }

        // Tear down in any state: the request, the writer (aborting an
        // unfinished body, which ends the guest's read), then the pushed
        // request's callback must come (the request timeout bounds it).
        if input.free_unpushed || !req.is_null() {
            wasmpool_request_free(req);
        }
        wasmpool_body_writer_free(writer);
        if let Some(s) = &slot {
            assert!(wait(s, Duration::from_secs(30)), "a pushed request never completed");
            let d = s.done.lock().unwrap();
            if resp.is_null() && d.2 != 0 {
                resp = d.2 as *mut wasmpool_response;
            }
        }
        wasmpool_response_free(resp);
        wasmpool_cancel_free(cancel);
        let _ = wasmpool_last_error();
    }
});
