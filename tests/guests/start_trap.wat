;; A WASIp2 handler whose instantiation always fails: its core start
;; function traps, so no instance of it can ever be made.
(module
  (import "wasi:http/types@0.2.12" "[resource-drop]incoming-request" (func $drop_req (param i32)))
  (import "wasi:http/types@0.2.12" "[resource-drop]response-outparam" (func $drop_out (param i32)))
  (memory (export "memory") 1)
  (func $boom unreachable)
  (start $boom)
  (func (export "wasi:http/incoming-handler@0.2.12#handle") (param $req i32) (param $out i32)
    (call $drop_req (local.get $req))
    (call $drop_out (local.get $out)))
  (func (export "cabi_realloc") (param i32 i32 i32 i32) (result i32)
    (i32.const 1024))
)
