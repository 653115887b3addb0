;; A WASIp2 handler importing an interface that no host provides.
(module
  (import "wasmpool:other/missing-host" "f" (func $f))
  (func (export "wasi:http/incoming-handler@0.2.12#handle") (param i32 i32)
    (call $f)))
