;; The smallest useful wasi:http component: answers every request with
;; 200 and "Hello from wasmpool!". A WASIp2 incoming handler written by
;; hand against the canonical ABI; `cargo test --test example_hello` turns
;; it into ../hello.wasm (set WASMPOOL_BLESS=1 to rewrite that file).
(module
  (import "wasi:http/types@0.2.12" "[constructor]fields" (func $fields_new (result i32)))
  (import "wasi:http/types@0.2.12" "[constructor]outgoing-response" (func $resp_new (param i32) (result i32)))
  (import "wasi:http/types@0.2.12" "[method]outgoing-response.body" (func $resp_body (param i32 i32)))
  (import "wasi:http/types@0.2.12" "[method]outgoing-body.write" (func $body_write (param i32 i32)))
  (import "wasi:http/types@0.2.12" "[static]outgoing-body.finish" (func $body_finish (param i32 i32 i32 i32)))
  (import "wasi:http/types@0.2.12" "[static]response-outparam.set"
    (func $outparam_set (param i32 i32 i32 i32 i64 i32 i32 i32 i32)))
  (import "wasi:http/types@0.2.12" "[resource-drop]incoming-request" (func $drop_req (param i32)))
  (import "wasi:io/streams@0.2.12" "[method]output-stream.blocking-write-and-flush" (func $write (param i32 i32 i32 i32)))
  (import "wasi:io/streams@0.2.12" "[resource-drop]output-stream" (func $drop_stream (param i32)))

  (memory (export "memory") 1)
  (data (i32.const 256) "Hello from wasmpool!\n")

  (func (export "wasi:http/incoming-handler@0.2.12#handle") (param $req i32) (param $out i32)
    (local $resp i32) (local $body i32) (local $stream i32)
    (call $drop_req (local.get $req))
    ;; response with empty headers (status 200 is the default)
    (local.set $resp (call $resp_new (call $fields_new)))
    ;; result<outgoing-body> at 0: tag, handle
    (call $resp_body (local.get $resp) (i32.const 0))
    (local.set $body (i32.load (i32.const 4)))
    ;; result<output-stream> at 8
    (call $body_write (local.get $body) (i32.const 8))
    (local.set $stream (i32.load (i32.const 12)))
    ;; hand the head to the host: ok(resp)
    (call $outparam_set (local.get $out) (i32.const 0) (local.get $resp)
      (i32.const 0) (i64.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0))
    (call $write (local.get $stream) (i32.const 256) (i32.const 21) (i32.const 16))
    (call $drop_stream (local.get $stream))
    ;; finish(body, none)
    (call $body_finish (local.get $body) (i32.const 0) (i32.const 0) (i32.const 24)))

  ;; the host hands back nothing that needs memory, but components that
  ;; receive lists must export an allocator
  (func (export "cabi_realloc") (param i32 i32 i32 i32) (result i32)
    (i32.const 1024))
)
