//! The C API request builder, through its exported functions: any method,
//! URI, header and body bytes give a request or an error code, never a
//! crash, leak or panic across the boundary (run under AddressSanitizer).
#![no_main]
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use std::ffi::CString;
use wasmpool::capi::*;

#[derive(Arbitrary, Debug)]
struct Input {
    method: Vec<u8>,
    uri: Vec<u8>,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    body: Vec<u8>,
    free_unpushed: bool,
}

fn cstring(mut b: Vec<u8>) -> CString {
    b.retain(|c| *c != 0);
    CString::new(b).expect("no NUL left")
}

fuzz_target!(|input: Input| {
    let method = cstring(input.method);
    let uri = cstring(input.uri);
    // SAFETY: valid NUL-terminated strings; every handle is used only
    // while alive and freed once.
    unsafe {
        let req = wasmpool_request_new(method.as_ptr(), uri.as_ptr());
        for (name, value) in &input.headers {
            let name = cstring(name.clone());
            let r = wasmpool_request_add_header(req, name.as_ptr(), value.as_ptr(), value.len());
            if req.is_null() {
                assert_eq!(r, wasmpool_result::WASMPOOL_NULL_ARGUMENT);
            }
        }
        let r = wasmpool_request_set_body(req, input.body.as_ptr(), input.body.len());
        if !req.is_null() {
            assert_eq!(r, wasmpool_result::WASMPOOL_OK);
        }
        if input.free_unpushed || !req.is_null() {
            wasmpool_request_free(req);
        }
        let _ = wasmpool_last_error();
    }
});
