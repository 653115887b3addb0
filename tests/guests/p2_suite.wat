;; WASIp2 test guest: one behaviour per path.
;;   /echo      method, path, headers and body back in the body
;;   /counter   a per-instance counter (1 on a fresh instance)
;;   /sleep/N   sleeps N milliseconds, then answers
;;   /busy      loops forever without answering
;;   /trap      traps before answering
;;   /trap-after answers, then traps
;;   /bomb      grows memory until refused, then traps
;;   /log       writes a line to stdout, then answers
;;   /silent    returns without answering
;;   /grow/N    grows memory by N pages (64 KiB each); traps if refused
;;   /hold/N    like /grow/N, then sleeps 1 s before answering (the memory
;;              stays held meanwhile)
;;   /env       the environment, one KEY=VALUE per line
;;   /once      like /echo on a fresh instance; on a reused one it returns
;;              without answering (as componentize-js guests do)
;;   /stain     the byte count at address 60000, then adds one to it (0 on a
;;              fresh instance: memory must be clean whatever the slot served)
;;   /scatter   grows memory to 1 MiB and writes a byte into every other 4 KiB
;;              page of it (128 separate places, as interpreters write all
;;              over their heap), then answers with the number of writes
;;   /zeros/N   N bytes of "x", streamed in 64 KiB pieces (stops when the
;;              client goes away)
;;   /trailers  "with trailers\n", then the trailer `x-checksum: c0ffee`
;;              (declared in a `trailer` response header)
;;   anything else: "hello from p2"
;; Memory: 0..1024 return areas, 1024..4096 constant data, heap from 64 KiB
;; (a bump allocator reset at each request: WASIp2 instances run one request
;; at a time).
(module
  (import "wasi:http/types@0.2.12" "[constructor]fields" (func $fields_new (result i32)))
  (import "wasi:http/types@0.2.12" "[constructor]outgoing-response" (func $resp_new (param i32) (result i32)))
  (import "wasi:http/types@0.2.12" "[method]outgoing-response.set-status-code" (func $set_status (param i32 i32) (result i32)))
  (import "wasi:http/types@0.2.12" "[method]outgoing-response.body" (func $resp_body (param i32 i32)))
  (import "wasi:http/types@0.2.12" "[method]outgoing-body.write" (func $body_write (param i32 i32)))
  (import "wasi:http/types@0.2.12" "[static]outgoing-body.finish" (func $body_finish (param i32 i32 i32 i32)))
  (import "wasi:http/types@0.2.12" "[static]response-outparam.set"
    (func $outparam_set (param i32 i32 i32 i32 i64 i32 i32 i32 i32)))
  (import "wasi:http/types@0.2.12" "[method]incoming-request.method" (func $req_method (param i32 i32)))
  (import "wasi:http/types@0.2.12" "[method]incoming-request.path-with-query" (func $req_path (param i32 i32)))
  (import "wasi:http/types@0.2.12" "[method]incoming-request.headers" (func $req_headers (param i32) (result i32)))
  (import "wasi:http/types@0.2.12" "[method]incoming-request.consume" (func $req_consume (param i32 i32)))
  (import "wasi:http/types@0.2.12" "[method]incoming-body.stream" (func $ibody_stream (param i32 i32)))
  (import "wasi:http/types@0.2.12" "[method]fields.entries" (func $fields_entries (param i32 i32)))
  (import "wasi:http/types@0.2.12" "[method]fields.append" (func $fields_append (param i32 i32 i32 i32 i32 i32)))
  (import "wasi:http/types@0.2.12" "[resource-drop]fields" (func $drop_fields (param i32)))
  (import "wasi:http/types@0.2.12" "[resource-drop]incoming-request" (func $drop_req (param i32)))
  (import "wasi:http/types@0.2.12" "[resource-drop]incoming-body" (func $drop_ibody (param i32)))
  (import "wasi:http/types@0.2.12" "[resource-drop]response-outparam" (func $drop_outparam (param i32)))
  (import "wasi:io/streams@0.2.12" "[method]output-stream.blocking-write-and-flush" (func $write (param i32 i32 i32 i32)))
  (import "wasi:io/streams@0.2.12" "[method]input-stream.blocking-read" (func $read (param i32 i64 i32)))
  (import "wasi:io/streams@0.2.12" "[resource-drop]output-stream" (func $drop_ostream (param i32)))
  (import "wasi:io/streams@0.2.12" "[resource-drop]input-stream" (func $drop_istream (param i32)))
  (import "wasi:io/poll@0.2.12" "[method]pollable.block" (func $block (param i32)))
  (import "wasi:io/poll@0.2.12" "[resource-drop]pollable" (func $drop_pollable (param i32)))
  (import "wasi:clocks/monotonic-clock@0.2.12" "subscribe-duration" (func $subscribe (param i64) (result i32)))
  (import "wasi:cli/stdout@0.2.12" "get-stdout" (func $get_stdout (result i32)))
  (import "wasi:cli/environment@0.2.12" "get-environment" (func $get_env (param i32)))

  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 65536))
  (global $count (mut i32) (i32.const 0))
  (global $body (mut i32) (i32.const 0))

  ;; method names, 8 bytes apart, and their lengths
  (data (i32.const 1024) "GET\00\00\00\00\00HEAD\00\00\00\00POST\00\00\00\00PUT\00\00\00\00\00DELETE\00\00CONNECT\00OPTIONS\00TRACE\00\00\00PATCH\00\00\00")
  (data (i32.const 1100) "\03\04\04\03\06\07\07\05\05")
  (data (i32.const 1200) "/echo")
  (data (i32.const 1210) "/counter")
  (data (i32.const 1220) "/sleep")
  (data (i32.const 1230) "/busy")
  (data (i32.const 1240) "/trap-after")
  (data (i32.const 1260) "/trap")
  (data (i32.const 1270) "/bomb")
  (data (i32.const 1280) "/log")
  (data (i32.const 1290) "/silent")
  (data (i32.const 1300) "hello from p2\n")
  (data (i32.const 1320) "slept\n")
  (data (i32.const 1330) "about to trap\n")
  (data (i32.const 1350) "guest log line from p2\n")
  (data (i32.const 1380) ": \n =")
  (data (i32.const 1390) "/grow")
  (data (i32.const 1400) "/env")
  (data (i32.const 1410) "grown\n")
  (data (i32.const 1420) "/once")
  (data (i32.const 1430) "/stain")
  (data (i32.const 1440) "/hold")
  (data (i32.const 1450) "/scatter")
  (data (i32.const 1460) "/zeros")
  (data (i32.const 1470) "/trailers")
  (data (i32.const 1480) "x-checksum")
  (data (i32.const 1495) "c0ffee")
  (data (i32.const 1510) "with trailers\n")
  (data (i32.const 1525) "trailer")

  (func $cabi_realloc (export "cabi_realloc") (param $old i32) (param $old_size i32) (param $align i32) (param $size i32) (result i32)
    (local $ptr i32) (local $end i32)
    (local.set $ptr
      (i32.and (i32.add (global.get $heap) (i32.sub (local.get $align) (i32.const 1)))
               (i32.sub (i32.const 0) (local.get $align))))
    (local.set $end (i32.add (local.get $ptr) (local.get $size)))
    (if (i32.gt_u (local.get $end) (i32.mul (memory.size) (i32.const 65536)))
      (then
        (if (i32.eq (memory.grow (i32.add (i32.shr_u (i32.sub (local.get $end) (i32.mul (memory.size) (i32.const 65536))) (i32.const 16)) (i32.const 1)))
                    (i32.const -1))
          (then unreachable))))
    (global.set $heap (local.get $end))
    (if (local.get $old_size)
      (then (memory.copy (local.get $ptr) (local.get $old) (local.get $old_size))))
    (local.get $ptr))

  (func $starts_with (param $p i32) (param $n i32) (param $lit i32) (param $m i32) (result i32)
    (local $i i32)
    (if (i32.lt_u (local.get $n) (local.get $m)) (then (return (i32.const 0))))
    (block $done
      (loop $l
        (br_if $done (i32.ge_u (local.get $i) (local.get $m)))
        (if (i32.ne (i32.load8_u (i32.add (local.get $p) (local.get $i)))
                    (i32.load8_u (i32.add (local.get $lit) (local.get $i))))
          (then (return (i32.const 0))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $l)))
    (i32.const 1))

  ;; number made of the decimal digits in [p, p+n)
  (func $digits (param $p i32) (param $n i32) (result i32)
    (local $i i32) (local $c i32) (local $v i32)
    (block $done
      (loop $l
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (local.set $c (i32.load8_u (i32.add (local.get $p) (local.get $i))))
        (if (i32.and (i32.ge_u (local.get $c) (i32.const 48)) (i32.le_u (local.get $c) (i32.const 57)))
          (then (local.set $v (i32.add (i32.mul (local.get $v) (i32.const 10)) (i32.sub (local.get $c) (i32.const 48))))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $l)))
    (local.get $v))

  ;; writes `v` in decimal at 512.., returns the length
  (func $itoa (param $v i32) (result i32)
    (local $i i32) (local $j i32) (local $t i32)
    (loop $l
      (i32.store8 (i32.add (i32.const 512) (local.get $i)) (i32.add (i32.const 48) (i32.rem_u (local.get $v) (i32.const 10))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (local.set $v (i32.div_u (local.get $v) (i32.const 10)))
      (br_if $l (local.get $v)))
    ;; reverse
    (local.set $j (i32.sub (local.get $i) (i32.const 1)))
    (local.set $t (i32.const 0))
    (block $done
      (loop $r
        (br_if $done (i32.ge_s (local.get $t) (local.get $j)))
        (i32.store8 (i32.const 600) (i32.load8_u (i32.add (i32.const 512) (local.get $t))))
        (i32.store8 (i32.add (i32.const 512) (local.get $t)) (i32.load8_u (i32.add (i32.const 512) (local.get $j))))
        (i32.store8 (i32.add (i32.const 512) (local.get $j)) (i32.load8_u (i32.const 600)))
        (local.set $t (i32.add (local.get $t) (i32.const 1)))
        (local.set $j (i32.sub (local.get $j) (i32.const 1)))
        (br $r)))
    (local.get $i))

  ;; writes all of [p, p+n) to the stream, 4096 bytes at a time
  (func $write_all (param $s i32) (param $p i32) (param $n i32)
    (local $c i32)
    (block $done
      (loop $l
        (br_if $done (i32.eqz (local.get $n)))
        (local.set $c (select (i32.const 4096) (local.get $n) (i32.gt_u (local.get $n) (i32.const 4096))))
        (call $write (local.get $s) (local.get $p) (local.get $c) (i32.const 48))
        (br_if $done (i32.load8_u (i32.const 48)))
        (local.set $p (i32.add (local.get $p) (local.get $c)))
        (local.set $n (i32.sub (local.get $n) (local.get $c)))
        (br $l))))

  ;; sends the response head; returns the body's output stream
  (func $begin (param $out i32) (param $status i32) (result i32)
    (local $resp i32)
    (local.set $resp (call $resp_new (call $fields_new)))
    (drop (call $set_status (local.get $resp) (local.get $status)))
    (call $resp_body (local.get $resp) (i32.const 16))
    (global.set $body (i32.load (i32.const 20)))
    (call $body_write (global.get $body) (i32.const 24))
    (call $outparam_set (local.get $out) (i32.const 0) (local.get $resp) (i32.const 0) (i64.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0))
    (i32.load (i32.const 28)))

  (func $end (param $stream i32)
    (call $drop_ostream (local.get $stream))
    (call $body_finish (global.get $body) (i32.const 0) (i32.const 0) (i32.const 32)))

  ;; a body, then trailers (outgoing-body.finish with some(trailers))
  (func $trailers (param $out i32)
    (local $s i32) (local $t i32) (local $h i32) (local $resp i32)
    (local.set $h (call $fields_new))
    (call $fields_append (local.get $h) (i32.const 1525) (i32.const 7) (i32.const 1480) (i32.const 10) (i32.const 32))
    (local.set $resp (call $resp_new (local.get $h)))
    (drop (call $set_status (local.get $resp) (i32.const 200)))
    (call $resp_body (local.get $resp) (i32.const 16))
    (global.set $body (i32.load (i32.const 20)))
    (call $body_write (global.get $body) (i32.const 24))
    (call $outparam_set (local.get $out) (i32.const 0) (local.get $resp) (i32.const 0) (i64.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0))
    (local.set $s (i32.load (i32.const 28)))
    (call $write_all (local.get $s) (i32.const 1510) (i32.const 14))
    (call $drop_ostream (local.get $s))
    (local.set $t (call $fields_new))
    (call $fields_append (local.get $t) (i32.const 1480) (i32.const 10) (i32.const 1495) (i32.const 6) (i32.const 32))
    (call $body_finish (global.get $body) (i32.const 1) (local.get $t) (i32.const 32)))

  (func $respond (param $out i32) (param $status i32) (param $p i32) (param $n i32)
    (local $s i32)
    (local.set $s (call $begin (local.get $out) (local.get $status)))
    (call $write_all (local.get $s) (local.get $p) (local.get $n))
    (call $end (local.get $s)))

  (func $sleep_ms (param $ms i32)
    (local $p i32)
    (local.set $p (call $subscribe (i64.mul (i64.extend_i32_u (local.get $ms)) (i64.const 1000000))))
    (call $block (local.get $p))
    (call $drop_pollable (local.get $p)))

  (func $zeros (param $out i32) (param $n i32)
    (local $s i32) (local $c i32)
    (memory.fill (i32.const 65536) (i32.const 120) (i32.const 65536))
    (local.set $s (call $begin (local.get $out) (i32.const 200)))
    (block $done
      (loop $l
        (br_if $done (i32.eqz (local.get $n)))
        (local.set $c (select (i32.const 65536) (local.get $n) (i32.gt_u (local.get $n) (i32.const 65536))))
        (call $write_all (local.get $s) (i32.const 65536) (local.get $c))
        (br_if $done (i32.load8_u (i32.const 48)))
        (local.set $n (i32.sub (local.get $n) (local.get $c)))
        (br $l)))
    (call $end (local.get $s)))

  (func $echo (param $req i32) (param $out i32)
    (local $s i32) (local $m i32) (local $h i32) (local $list i32) (local $n i32) (local $e i32)
    (local $ib i32) (local $is i32)
    (local.set $s (call $begin (local.get $out) (i32.const 200)))
    ;; method
    (call $req_method (local.get $req) (i32.const 64))
    (local.set $m (i32.load8_u (i32.const 64)))
    (if (i32.eq (local.get $m) (i32.const 9))
      (then (call $write_all (local.get $s) (i32.load (i32.const 68)) (i32.load (i32.const 72))))
      (else (call $write_all (local.get $s) (i32.add (i32.const 1024) (i32.mul (local.get $m) (i32.const 8)))
                                            (i32.load8_u (i32.add (i32.const 1100) (local.get $m))))))
    (call $write_all (local.get $s) (i32.const 1383) (i32.const 1))
    ;; path
    (call $req_path (local.get $req) (i32.const 80))
    (if (i32.load8_u (i32.const 80))
      (then (call $write_all (local.get $s) (i32.load (i32.const 84)) (i32.load (i32.const 88)))))
    (call $write_all (local.get $s) (i32.const 1382) (i32.const 1))
    ;; headers
    (local.set $h (call $req_headers (local.get $req)))
    (call $fields_entries (local.get $h) (i32.const 96))
    (local.set $list (i32.load (i32.const 96)))
    (local.set $n (i32.load (i32.const 100)))
    (block $done
      (loop $l
        (br_if $done (i32.eqz (local.get $n)))
        (local.set $e (local.get $list))
        (call $write_all (local.get $s) (i32.load (local.get $e)) (i32.load offset=4 (local.get $e)))
        (call $write_all (local.get $s) (i32.const 1380) (i32.const 2))
        (call $write_all (local.get $s) (i32.load offset=8 (local.get $e)) (i32.load offset=12 (local.get $e)))
        (call $write_all (local.get $s) (i32.const 1382) (i32.const 1))
        (local.set $list (i32.add (local.get $list) (i32.const 16)))
        (local.set $n (i32.sub (local.get $n) (i32.const 1)))
        (br $l)))
    (call $drop_fields (local.get $h))
    (call $write_all (local.get $s) (i32.const 1382) (i32.const 1))
    ;; body
    (call $req_consume (local.get $req) (i32.const 112))
    (if (i32.eqz (i32.load8_u (i32.const 112)))
      (then
        (local.set $ib (i32.load (i32.const 116)))
        (call $ibody_stream (local.get $ib) (i32.const 120))
        (local.set $is (i32.load (i32.const 124)))
        (block $eof
          (loop $r
            (call $read (local.get $is) (i64.const 65536) (i32.const 128))
            (br_if $eof (i32.load8_u (i32.const 128)))
            (call $write_all (local.get $s) (i32.load (i32.const 132)) (i32.load (i32.const 136)))
            (global.set $heap (i32.const 65536))
            (br $r)))
        (call $drop_istream (local.get $is))
        (call $drop_ibody (local.get $ib))))
    (call $end (local.get $s)))

  (func (export "wasi:http/incoming-handler@0.2.12#handle") (param $req i32) (param $out i32)
    (local $p i32) (local $n i32) (local $s i32)
    (global.set $heap (i32.const 65536))
    (global.set $count (i32.add (global.get $count) (i32.const 1)))
    (call $req_path (local.get $req) (i32.const 0))
    (if (i32.load8_u (i32.const 0))
      (then (local.set $p (i32.load (i32.const 4))) (local.set $n (i32.load (i32.const 8)))))
    (block $routed
      (if (call $starts_with (local.get $p) (local.get $n) (i32.const 1420) (i32.const 5))
        (then
          (if (i32.eq (global.get $count) (i32.const 1))
            (then (call $echo (local.get $req) (local.get $out)))
            (else (call $drop_outparam (local.get $out))))
          (br $routed)))
      (if (call $starts_with (local.get $p) (local.get $n) (i32.const 1200) (i32.const 5))
        (then (call $echo (local.get $req) (local.get $out)) (br $routed)))
      (if (call $starts_with (local.get $p) (local.get $n) (i32.const 1210) (i32.const 8))
        (then (call $respond (local.get $out) (i32.const 200) (i32.const 512) (call $itoa (global.get $count))) (br $routed)))
      (if (call $starts_with (local.get $p) (local.get $n) (i32.const 1220) (i32.const 6))
        (then
          (call $sleep_ms (call $digits (local.get $p) (local.get $n)))
          (call $respond (local.get $out) (i32.const 200) (i32.const 1320) (i32.const 6)) (br $routed)))
      (if (call $starts_with (local.get $p) (local.get $n) (i32.const 1230) (i32.const 5))
        (then (loop $spin (br $spin))))
      (if (call $starts_with (local.get $p) (local.get $n) (i32.const 1240) (i32.const 11))
        (then (call $respond (local.get $out) (i32.const 200) (i32.const 1330) (i32.const 14)) unreachable))
      (if (call $starts_with (local.get $p) (local.get $n) (i32.const 1260) (i32.const 5))
        (then unreachable))
      (if (call $starts_with (local.get $p) (local.get $n) (i32.const 1270) (i32.const 5))
        (then (loop $grow (br_if $grow (i32.ne (memory.grow (i32.const 16)) (i32.const -1)))) unreachable))
      (if (call $starts_with (local.get $p) (local.get $n) (i32.const 1280) (i32.const 4))
        (then
          (local.set $s (call $get_stdout))
          (call $write_all (local.get $s) (i32.const 1350) (i32.const 23))
          (call $drop_ostream (local.get $s))
          (call $respond (local.get $out) (i32.const 200) (i32.const 1300) (i32.const 14)) (br $routed)))
      (if (call $starts_with (local.get $p) (local.get $n) (i32.const 1290) (i32.const 7))
        (then (call $drop_outparam (local.get $out)) (br $routed)))
      (if (call $starts_with (local.get $p) (local.get $n) (i32.const 1390) (i32.const 5))
        (then
          (if (i32.eq (memory.grow (call $digits (local.get $p) (local.get $n))) (i32.const -1)) (then unreachable))
          (call $respond (local.get $out) (i32.const 200) (i32.const 1410) (i32.const 6)) (br $routed)))
      (if (call $starts_with (local.get $p) (local.get $n) (i32.const 1440) (i32.const 5))
        (then
          (if (i32.eq (memory.grow (call $digits (local.get $p) (local.get $n))) (i32.const -1)) (then unreachable))
          (call $sleep_ms (i32.const 1000))
          (call $respond (local.get $out) (i32.const 200) (i32.const 1410) (i32.const 6)) (br $routed)))
      (if (call $starts_with (local.get $p) (local.get $n) (i32.const 1400) (i32.const 4))
        (then (call $env (local.get $out)) (br $routed)))
      (if (call $starts_with (local.get $p) (local.get $n) (i32.const 1470) (i32.const 9))
        (then (call $trailers (local.get $out)) (br $routed)))
      (if (call $starts_with (local.get $p) (local.get $n) (i32.const 1460) (i32.const 6))
        (then (call $zeros (local.get $out) (call $digits (local.get $p) (local.get $n))) (br $routed)))
      (if (call $starts_with (local.get $p) (local.get $n) (i32.const 1430) (i32.const 6))
        (then
          (call $respond (local.get $out) (i32.const 200) (i32.const 512)
            (call $itoa (i32.load (i32.const 60000))))
          (i32.store (i32.const 60000) (i32.add (i32.load (i32.const 60000)) (i32.const 1)))
          (br $routed)))
      (if (call $starts_with (local.get $p) (local.get $n) (i32.const 1450) (i32.const 8))
        (then
          (if (i32.lt_u (memory.size) (i32.const 16))
            (then (if (i32.eq (memory.grow (i32.sub (i32.const 16) (memory.size))) (i32.const -1))
              (then unreachable))))
          (local.set $n (i32.const 0))
          (loop $w
            (i32.store8 (i32.mul (local.get $n) (i32.const 8192)) (i32.const 1))
            (local.set $n (i32.add (local.get $n) (i32.const 1)))
            (br_if $w (i32.lt_u (local.get $n) (i32.const 128))))
          (call $respond (local.get $out) (i32.const 200) (i32.const 512) (call $itoa (local.get $n)))
          (br $routed)))
      (call $respond (local.get $out) (i32.const 200) (i32.const 1300) (i32.const 14)))
    (call $drop_req (local.get $req)))

  (func $env (param $out i32)
    (local $s i32) (local $list i32) (local $n i32)
    (local.set $s (call $begin (local.get $out) (i32.const 200)))
    (call $get_env (i32.const 96))
    (local.set $list (i32.load (i32.const 96)))
    (local.set $n (i32.load (i32.const 100)))
    (block $done
      (loop $l
        (br_if $done (i32.eqz (local.get $n)))
        (call $write_all (local.get $s) (i32.load (local.get $list)) (i32.load offset=4 (local.get $list)))
        (call $write_all (local.get $s) (i32.const 1384) (i32.const 1))
        (call $write_all (local.get $s) (i32.load offset=8 (local.get $list)) (i32.load offset=12 (local.get $list)))
        (call $write_all (local.get $s) (i32.const 1382) (i32.const 1))
        (local.set $list (i32.add (local.get $list) (i32.const 16)))
        (local.set $n (i32.sub (local.get $n) (i32.const 1)))
        (br $l)))
    (call $end (local.get $s)))
)
